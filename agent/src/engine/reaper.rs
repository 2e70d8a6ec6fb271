//! The agent's one reaper. Container processes are the agent's children
//! (libcontainer clones them with CLONE_PARENT, so they exit with
//! SIGCHLD), and as an init the agent also inherits orphans: every exit
//! is reaped here, on SIGCHLD, and handed to whoever watches that PID.
//! One waiter for all children avoids two waiters racing for one status.

use super::process::Exit;
use rustix::process::{WaitOptions, WaitStatus};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::watch;
use vmcri_proto::now_ns;

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

fn exit_of(status: WaitStatus) -> Exit {
    let (code, signal) = match status.exit_status() {
        Some(code) => (code, 0),
        None => {
            let signal = status.terminating_signal().unwrap_or(0);
            (128 + signal, u32::try_from(signal).unwrap_or(0))
        }
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
    // __WALL: children cloned without SIGCHLD count too (rustix has no
    // name for it, but passes the bits through).
    let options = WaitOptions::NOHANG | WaitOptions::from_bits_retain(libc::__WALL.cast_unsigned());
    let mut n = 0;
    loop {
        // wait4(-1) rather than waitid: rustix's waitid does not report
        // the PID, and nix's fails (after reaping) on a child killed by a
        // real-time signal. Without WUNTRACED both report only exits.
        let Ok(Some((pid, status))) = rustix::process::wait(options) else {
            return n;
        };
        let pid = pid.as_raw_nonzero().get();
        n += 1;
        let exit = exit_of(status);
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
        let pid = i32::try_from(child.id()).unwrap();
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
