//! virtio-vsock (virtio 1.1, 5.10) with the host side on Unix sockets
//! ("hybrid vsock"), as Firecracker does: no vhost, nothing in the host
//! kernel beyond a Unix socket per VM.
//!
//! - `packet`: the wire header;
//! - `handshake`: the `CONNECT <port>` / `OK <port>` text protocol;
//! - `connection`: one stream's state machine and credit accounting;
//! - `muxer`: the connection table and the Unix sockets;
//! - this module: the virtio device and its worker, which owns the queues
//!   once the driver is ready and runs on the device's thread, `vsock`.

pub mod connection;
pub mod handshake;
pub mod muxer;
pub mod packet;

use super::thread::{DeviceThread, Task};
use super::virtio_mmio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::seccomp::Role;
use muxer::{Muxer, LISTENER_TOKEN};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Virtio device ID of a socket device.
const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// virtio_vsock_event ID: the transport was reset (after a snapshot
/// restore); the guest drops all its connections.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

const STOP_TOKEN: u64 = LISTENER_TOKEN - 1;
/// Queue `i`'s notifier has token `NOTIFY_TOKEN - i`.
const NOTIFY_TOKEN: u64 = LISTENER_TOKEN - 2;
/// Upper bound on an epoll wait, so deadlines are checked regularly.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    stop: Arc<EventFd>,
    thread: DeviceThread,
    worker: Option<Task<UnixListener>>,
}

impl Vsock {
    /// A device for guest CID `guest_cid`, listening for host connections
    /// at `uds_path` (a stale socket file there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {guest_cid} must be between 3 and 2^32-1"),
            ));
        }
        match std::fs::remove_file(uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(uds_path)?;
        // Only root may reach the guest's agent, whatever the umask; the
        // runtime also keeps the socket's directory 0700, so there is no
        // window between bind and chmod.
        std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
            stop: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            thread: DeviceThread::spawn("vsock", Role::Vsock)?,
            worker: None,
        })
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = self.stop.write(1);
            match worker.join() {
                Some(listener) => self.listener = Some(listener),
                None => tracing::error!(
                    "vsock worker panicked; host connections are no longer accepted"
                ),
            }
            let _ = self.stop.read();
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

struct Worker {
    muxer: Muxer,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    notifiers: Vec<Arc<EventFd>>,
}

impl Worker {
    fn run(mut self) -> UnixListener {
        let mut events = vec![EpollEvent::default(); 64];
        // Work may be queued before the first kick.
        self.process_queues();
        loop {
            let timeout = wait_millis(self.muxer.next_deadline(), Instant::now());
            let n = match self.muxer.epoll().wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(error = %e, "vsock worker: epoll failed; stopping");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => return self.muxer.into_listener(),
                    token => match notifier_index(token, self.notifiers.len()) {
                        Some(i) => {
                            let _ = self.notifiers[i].read();
                        }
                        None => self.muxer.handle_event(token, ev.event_set()),
                    },
                }
            }
            self.muxer.sweep(Instant::now());
            self.process_queues();
        }
        self.muxer.into_listener()
    }

    fn process_queues(&mut self) {
        let mut used = false;
        let (rx, rest) = self.queues.split_at_mut(TX);
        let tx = &mut rest[0];
        used |= self.muxer.process_tx(tx, &self.mem);
        used |= self.muxer.process_rx(&mut rx[RX], &self.mem);
        if self.muxer.has_rx_work() {
            // Out of rx buffers: ask the guest to tell us when it adds some.
            let _ = rx[RX].enable_notification(&self.mem);
        }
        self.muxer.update_interest();
        if used {
            let notify_rx = rx[RX].needs_notification(&self.mem).unwrap_or(true);
            let notify_tx = tx.needs_notification(&self.mem).unwrap_or(true);
            if notify_rx || notify_tx {
                self.interrupt.signal_used_queue();
            }
        }
    }
}

/// The queue whose notifier has epoll `token`, if it is one of the
/// `count` notifier tokens.
fn notifier_index(token: u64, count: usize) -> Option<usize> {
    let i = usize::try_from(NOTIFY_TOKEN.checked_sub(token)?).ok()?;
    (i < count).then_some(i)
}

/// The epoll timeout in milliseconds from `now` to `deadline`, at most
/// [`MAX_WAIT`]. Rounded up: rounded down, the wait would end just before
/// the deadline, and waits of 0 ms would follow until it passed.
fn wait_millis(deadline: Option<Instant>, now: Instant) -> i32 {
    let wait = deadline
        .map_or(MAX_WAIT, |d| d.saturating_duration_since(now))
        .min(MAX_WAIT);
    i32::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
}

/// Writes a transport-reset event into the guest's event queue: after a
/// snapshot restore the guest must drop connections whose host side is
/// gone. Returns false if the guest posted no event buffer.
pub fn send_transport_reset(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let written = match virtio_queue::Writer::new(mem, chain) {
        Ok(mut w) if w.available_bytes() >= 4 => w
            .write_obj(EVENT_TRANSPORT_RESET.to_le())
            .map(|_| 4)
            .unwrap_or(0),
        _ => 0,
    };
    queue.add_used(mem, head, written).is_ok() && written > 0
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError> {
        for (i, q) in queues.iter().enumerate().take(EVENT + 1) {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| ActivateError::Device("vsock listener unavailable".into()))?;
        let (cid, uds_path, stop) = (self.guest_cid, self.uds_path.clone(), self.stop.clone());
        // The muxer (its epoll set, the listener made non-blocking) is
        // built on the vsock thread, whose role has those calls.
        let setup = move || {
            let muxer = Muxer::new(cid, &uds_path, listener)?;
            let mut fds = vec![(stop.as_raw_fd(), STOP_TOKEN)];
            for (i, n) in notifiers.iter().enumerate() {
                fds.push((n.as_raw_fd(), NOTIFY_TOKEN - i as u64));
            }
            for (fd, token) in fds {
                muxer.epoll().ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )?;
            }
            Ok(Worker {
                muxer,
                mem,
                queues,
                interrupt,
                notifiers,
            })
        };
        let task = self
            .thread
            .start(setup, Worker::run)
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.worker = Some(task);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_waits_until_the_deadline_has_passed() {
        let now = Instant::now();
        let in_300us = Some(now + Duration::from_micros(300));
        assert_eq!(wait_millis(in_300us, now), 1, "not 0: that would spin");
        assert_eq!(wait_millis(Some(now + Duration::from_millis(7)), now), 7);
        assert_eq!(wait_millis(Some(now), now + Duration::from_secs(1)), 0);
        assert_eq!(wait_millis(Some(now + Duration::from_secs(60)), now), 1000);
        assert_eq!(wait_millis(None, now), 1000);
    }

    #[test]
    fn notifier_tokens_name_their_queue_and_nothing_else() {
        assert_eq!(notifier_index(NOTIFY_TOKEN, 3), Some(0));
        assert_eq!(notifier_index(NOTIFY_TOKEN - 2, 3), Some(2));
        assert_eq!(notifier_index(NOTIFY_TOKEN - 3, 3), None);
        assert_eq!(notifier_index(STOP_TOKEN, 3), None);
        assert_eq!(notifier_index(LISTENER_TOKEN, 3), None);
        assert_eq!(notifier_index(7, 3), None, "a socket's fd token");
    }

    #[test]
    fn the_agent_socket_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        // With the usual umask (022) a bound socket is 0755: only the
        // explicit mode makes it 0600.
        let _v = Vsock::new(3, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
