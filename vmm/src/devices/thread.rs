//! The threads devices run on, off the vCPUs.
//!
//! Every virtio device gets a thread of its own, named after it (`rng`,
//! `vsock`, `fs0`): a guest's file I/O then never stalls its vCPU, one
//! device's stall never holds another's, and each thread can carry the
//! seccomp allowlist of its role alone.
//!
//! The threads are spawned while the VM is built, not when the driver
//! activates a device: activation is an MMIO write, handled on a vCPU
//! thread, and a thread inherits its creator's seccomp filter, so a thread
//! spawned there would be held to the vCPU's allowlist as well as its own.
//! A device thread waits for work: activation hands it a job (the device's
//! queue loop), which runs until the device is reset.
//!
//! Whatever activation sets up (epoll sets, non-blocking sockets, the
//! vsock muxer) is set up on the device's thread too, by
//! [`DeviceThread::start`], while the vCPU waits for the verdict: the
//! vCPU's allowlist then holds no epoll, dup or ioctl beyond KVM's own.

use crate::seccomp::{self, Role};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

type Job = Box<dyn FnOnce() + Send>;

/// A device's own thread, waiting for jobs.
pub struct DeviceThread {
    name: String,
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

/// A job handed to a [`DeviceThread`]; [`Task::join`] waits for its end.
pub struct Task<T> {
    result: mpsc::Receiver<T>,
}

impl<T> Task<T> {
    /// Waits for the job to end and returns what it returned, or `None`
    /// if it panicked.
    pub fn join(self) -> Option<T> {
        self.result.recv().ok()
    }
}

impl DeviceThread {
    /// Spawns thread `name`, which installs the seccomp filter of `role`
    /// before it runs anything; fails if the filter cannot be installed.
    pub fn spawn(name: &str, role: Role) -> io::Result<DeviceThread> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let installed = seccomp::install(role);
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        match ready.recv() {
            Ok(Ok(())) => Ok(DeviceThread {
                name: name.to_string(),
                jobs: Some(jobs),
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(io::Error::other(format!(
                    "thread {name}: seccomp filter: {e}"
                )))
            }
            Err(_) => Err(io::Error::other(format!("thread {name} ended at start"))),
        }
    }

    /// Runs `setup` on the thread (after any job before it has ended) and
    /// waits for it: its error is returned here. If it succeeded, `work`
    /// then runs on the thread with what it made, and the task waits for
    /// `work`'s end.
    pub fn start<S: 'static, T: Send + 'static>(
        &self,
        setup: impl FnOnce() -> io::Result<S> + Send + 'static,
        work: impl FnOnce(S) -> T + Send + 'static,
    ) -> io::Result<Task<T>> {
        let (verdict_tx, verdict) = mpsc::channel();
        let (tx, result) = mpsc::channel();
        self.send(Box::new(move || match setup() {
            Ok(made) => {
                let _ = verdict_tx.send(Ok(()));
                let _ = tx.send(work(made));
            }
            Err(e) => {
                let _ = verdict_tx.send(Err(e));
            }
        }))?;
        match verdict.recv() {
            Ok(Ok(())) => Ok(Task { result }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other(format!(
                "device thread {}: setup panicked",
                self.name
            ))),
        }
    }

    /// Runs `job` on the thread, after any job before it has ended.
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Task<T>> {
        let (tx, result) = mpsc::channel();
        self.send(Box::new(move || {
            let _ = tx.send(job());
        }))?;
        Ok(Task { result })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| io::Error::other(format!("device thread {} has ended", self.name)))
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its job has returned:
        // a device must stop its job (QueueWorker::stop) before its
        // thread is dropped, or this join waits forever.
        self.jobs = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The epoll token of the stop eventfd in [`serve_queues`].
const STOP_TOKEN: u64 = u64::MAX;

/// An epoll set over the queue `notifiers` (token: the queue index) and
/// `stop`, for [`serve_queues`].
pub fn queue_epoll(notifiers: &[Arc<EventFd>], stop: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for (i, n) in notifiers.iter().enumerate() {
        let index = u16::try_from(i).map_err(|_| io::Error::other("too many queues"))?;
        epoll.ctl(
            ControlOperation::Add,
            n.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::from(index)),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    Ok(epoll)
}

/// Calls `notify(i)` whenever the driver notifies queue `i` (its eventfd,
/// `notifiers[i]`, fires), until `stop` fires; `epoll` is
/// [`queue_epoll`]'s. Every queue is served once at the start: the driver
/// may have queued buffers before the first notification reached us.
pub fn serve_queues(
    epoll: &Epoll,
    notifiers: &[Arc<EventFd>],
    stop: &EventFd,
    mut notify: impl FnMut(u16),
) -> io::Result<()> {
    for i in 0..notifiers.len() {
        if let Ok(index) = u16::try_from(i) {
            notify(index);
        }
    }
    let mut events = vec![EpollEvent::default(); notifiers.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = stop.read();
                return Ok(());
            }
            let Ok(index) = u16::try_from(token) else {
                continue;
            };
            if let Some(n) = notifiers.get(usize::from(index)) {
                // Clears the count before serving, so a notification that
                // arrives while we serve wakes us again.
                let _ = n.read();
                notify(index);
            }
        }
    }
}

/// A device's queue loop running on its thread, and the eventfd that ends
/// it.
pub struct QueueWorker {
    stop: Arc<EventFd>,
    task: Option<Task<io::Result<()>>>,
}

impl QueueWorker {
    /// A worker that is not running.
    pub fn new() -> io::Result<QueueWorker> {
        Ok(QueueWorker {
            stop: Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?),
            task: None,
        })
    }

    /// Runs [`serve_queues`] on `thread` with `notify`, until [`Self::stop`];
    /// its epoll set is made there first, and its failure returned here.
    pub fn start(
        &mut self,
        thread: &DeviceThread,
        notifiers: Vec<Arc<EventFd>>,
        mut notify: impl FnMut(u16) + Send + 'static,
    ) -> io::Result<()> {
        self.stop();
        let stop = self.stop.clone();
        let name = thread.name.clone();
        let setup_stop = stop.clone();
        let task = thread.start(
            move || Ok((queue_epoll(&notifiers, &setup_stop)?, notifiers)),
            move |(epoll, notifiers)| {
                let result = serve_queues(&epoll, &notifiers, &stop, &mut notify);
                if let Err(e) = &result {
                    tracing::error!(thread = %name, error = %e, "device queue loop failed");
                }
                result
            },
        )?;
        self.task = Some(task);
        Ok(())
    }

    /// Ends the loop, if running, and waits until it has.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = self.stop.write(1);
            let _ = task.join();
            // A loop that ended on its own left the stop count behind.
            let _ = self.stop.read();
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn jobs_run_on_the_named_thread_in_order() {
        let t = DeviceThread::spawn("test-dev", Role::Device).unwrap();
        let a = t
            .run(|| std::thread::current().name().map(str::to_string))
            .unwrap();
        let b = t.run(|| 2).unwrap();
        assert_eq!(a.join().unwrap().as_deref(), Some("test-dev"));
        assert_eq!(b.join(), Some(2));
    }

    #[test]
    fn notifications_reach_the_queue_loop_until_it_is_stopped() {
        let thread = DeviceThread::spawn("test-q", Role::Device).unwrap();
        let notifiers: Vec<Arc<EventFd>> = (0..2)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut worker = QueueWorker::new().unwrap();
        let log = seen.clone();
        worker
            .start(&thread, notifiers.clone(), move |i| {
                log.lock().unwrap().push(i)
            })
            .unwrap();
        wait_for("the initial pass", || seen.lock().unwrap().len() == 2);
        notifiers[1].write(1).unwrap();
        wait_for("queue 1", || seen.lock().unwrap().len() == 3);
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 1]);
        worker.stop();
        notifiers[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            seen.lock().unwrap().len(),
            3,
            "a stopped loop serves nothing"
        );
        // The thread takes the next job.
        let log = seen.clone();
        worker
            .start(&thread, notifiers.clone(), move |i| {
                log.lock().unwrap().push(i)
            })
            .unwrap();
        wait_for("a restarted loop", || seen.lock().unwrap().len() >= 5);
    }

    #[test]
    fn setup_runs_on_the_thread_and_its_error_comes_back_to_the_caller() {
        let t = DeviceThread::spawn("test-setup", Role::Device).unwrap();
        let err = t
            .start(
                || -> io::Result<()> { Err(io::Error::other("no epoll today")) },
                |()| 1,
            )
            .err()
            .expect("the setup's error");
        assert!(err.to_string().contains("no epoll today"), "{err}");
        // The thread survives a failed setup and takes the next job; what
        // setup made reaches the work, both on the device's thread.
        let task = t
            .start(
                || Ok(std::thread::current().name().map(str::to_string)),
                |made| (made, std::thread::current().name().map(str::to_string)),
            )
            .unwrap();
        let (setup_on, work_on) = task.join().unwrap();
        assert_eq!(setup_on.as_deref(), Some("test-setup"));
        assert_eq!(work_on.as_deref(), Some("test-setup"));
    }
}
