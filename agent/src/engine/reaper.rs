//! The agent's one reaper. Container processes are the agent's children
//! (libcontainer clones them with CLONE_PARENT, so they exit with
//! SIGCHLD), and as an init the agent also inherits orphans: every exit
//! is reaped here, on SIGCHLD, and handed to whoever watches that PID.
//! One waiter for all children avoids two waiters racing for one status.

use super::process::{now_ns, Exit};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::watch;

/// Exits nobody watched yet, kept for a watcher registering late.
const MAX_UNCLAIMED: usize = 1024;

#[derive(Default)]
struct Registry {
    watchers: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: VecDeque<(i32, Exit)>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Registry::default))
}

/// Watches child `pid`: the receiver holds its exit once reaped.
pub fn watch(pid: i32) -> watch::Receiver<Option<Exit>> {
    with(|r| {
        if let Some(i) = r.unclaimed.iter().position(|(p, _)| *p == pid) {
            let exit = r.unclaimed.remove(i).map(|(_, e)| e);
            return watch::channel(exit).1;
        }
        let (tx, rx) = watch::channel(None);
        r.watchers.insert(pid, tx);
        rx
    })
}

fn exit_of(info: &libc::siginfo_t) -> Exit {
    // SAFETY: waitid filled a CLD_* siginfo.
    let status = unsafe { info.si_status() };
    let (code, signal) = match info.si_code {
        libc::CLD_EXITED => (status, 0),
        _ => (128 + status, status as u32),
    };
    Exit {
        code,
        signal,
        at_ns: now_ns(),
    }
}

/// Reaps every exited child without blocking and delivers each exit to
/// its watcher; returns how many were reaped.
pub fn reap() -> usize {
    let mut n = 0;
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a valid siginfo pointer. __WALL: children
        // cloned without SIGCHLD count too.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::__WALL,
            )
        };
        // SAFETY: si_pid is valid for CLD_* siginfo; zero means none ready.
        let pid = unsafe { info.si_pid() };
        if rc != 0 || pid == 0 {
            return n;
        }
        n += 1;
        let exit = exit_of(&info);
        with(|r| match r.watchers.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(Some(exit));
            }
            None => {
                if r.unclaimed.len() >= MAX_UNCLAIMED {
                    r.unclaimed.pop_front();
                }
                r.unclaimed.push_back((pid, exit));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn spawn(cmd: &str) -> i32 {
        let child = std::process::Command::new("sh")
            .args(["-c", cmd])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // The reaper owns the status from here.
        std::mem::forget(child);
        pid
    }

    fn reap_until(rx: &watch::Receiver<Option<Exit>>) -> Exit {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            reap();
            if let Some(e) = *rx.borrow() {
                return e;
            }
            assert!(Instant::now() < deadline, "child never reaped");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // One test: the registry and waitid(P_ALL) are process-wide.
    #[test]
    fn exits_reach_watchers_early_or_late_with_codes_and_signals() {
        let pid = spawn("exit 3");
        let rx = watch(pid);
        assert_eq!(reap_until(&rx).code, 3);

        let pid = spawn("kill -9 $$");
        let rx = watch(pid);
        let e = reap_until(&rx);
        assert_eq!((e.code, e.signal), (137, 9));

        // Reaped before anyone watched: the exit waits for its watcher.
        let pid = spawn("exit 5");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !with(|r| r.unclaimed.iter().any(|(p, _)| *p == pid)) {
            reap();
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(watch(pid).borrow().map(|e| e.code), Some(5));
    }
}
