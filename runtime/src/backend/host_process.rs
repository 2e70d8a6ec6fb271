//! The processes behind sandboxes: spawned detached (own session, not
//! killed with the daemon, so a daemon restart leaves pods running) and
//! recognised again after a restart by PID plus start time.

use crate::store::ProcessRef;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The start time of `pid` in clock ticks since boot, and whether it is a
/// zombie (dead but not reaped), from /proc/PID/stat.
fn stat(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// True if the process `p` names is still running (not a zombie, not a
/// different process that reused the PID).
pub fn alive(p: &ProcessRef) -> bool {
    matches!(stat(p.pid), Some((start, zombie)) if start == p.start_ticks && !zombie)
}

/// Spawns `cmd` detached, its output appended to `log`. Namespaces or
/// other setup go in `pre_exec`, which runs in the child before exec.
pub fn spawn_detached(
    mut cmd: Command,
    log: &Path,
    pre_exec: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<ProcessRef> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure only makes async-signal-safe syscalls (setsid,
    // and whatever `pre_exec` does, which must follow the same rule).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            pre_exec()
        });
    }
    let mut child = cmd.spawn()?;
    let Ok(pid) = i32::try_from(child.id()) else {
        // Linux PIDs fit a pid_t; should one not, nothing is left behind.
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other(format!(
            "PID {} does not fit a pid_t",
            child.id()
        )));
    };
    // Reap it when it exits, for as long as this daemon lives; after a
    // daemon restart the process is no longer our child.
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })?;
    let start_ticks = stat(pid)
        .map(|(s, _)| s)
        .ok_or_else(|| std::io::Error::other(format!("process {pid} vanished at start")))?;
    Ok(ProcessRef { pid, start_ticks })
}

/// Sends SIGKILL to `p` if it is still the same process.
pub fn kill(p: &ProcessRef) {
    if alive(p) {
        // SAFETY: plain kill(2) of a PID we verified is ours.
        unsafe {
            libc::kill(p.pid, libc::SIGKILL);
        }
    }
}

/// Waits up to `within` for `p` to end; true if it did.
pub async fn wait_gone(p: &ProcessRef, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while alive(p) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// The live `vmcri-*` processes (vmcri-vmm, vmcri-agent) with their
/// arguments, read from /proc once. A sandbox's VMM names its directory
/// in `--serial` and `--shared-dir`, a host agent in `--state`: recovery
/// finds by it a process spawned just before a crash, whose reference
/// never reached the disk.
pub struct OurProcesses(Vec<(ProcessRef, Vec<PathBuf>)>);

impl OurProcesses {
    /// Reads /proc.
    pub fn scan() -> OurProcesses {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return OurProcesses(Vec::new());
        };
        let found = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let mut args = cmdline
                    .split(|b| *b == 0)
                    .map(|a| PathBuf::from(std::ffi::OsStr::from_bytes(a)));
                // Only our own binaries: an admin's `less console.log` is
                // not a sandbox.
                let ours = args.next().is_some_and(|a| {
                    a.file_name()
                        .is_some_and(|n| n.as_bytes().starts_with(b"vmcri-"))
                });
                let (start_ticks, zombie) = stat(pid)?;
                (ours && !zombie).then(|| (ProcessRef { pid, start_ticks }, args.collect()))
            })
            .collect();
        OurProcesses(found)
    }

    /// Those with an argument at or below `dir`.
    pub fn under(&self, dir: &Path) -> Vec<ProcessRef> {
        self.0
            .iter()
            .filter(|(_, args)| args.iter().any(|a| a.starts_with(dir)))
            .map(|(p, _)| *p)
            .collect()
    }
}

/// [`wait_gone`] for synchronous code (recovery at start-up).
pub fn wait_gone_blocking(p: &ProcessRef, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while alive(p) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detached_process_is_tracked_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = spawn_detached(cmd, &dir.path().join("log"), || Ok(())).unwrap();
        assert!(alive(&p));
        // A different start time means a different process.
        assert!(!alive(&ProcessRef {
            pid: p.pid,
            start_ticks: p.start_ticks + 1
        }));
        kill(&p);
        assert!(wait_gone(&p, Duration::from_secs(5)).await);
        assert!(!alive(&p));
    }

    #[tokio::test]
    async fn a_process_is_found_by_a_path_in_its_arguments() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in named like our binaries, with a path argument; tail
        // never forks (a forking shell's child would briefly carry the
        // same arguments).
        let log = dir.path().join("console.log");
        std::fs::write(&log, "").unwrap();
        let bin = dir.path().join("vmcri-fake");
        std::os::unix::fs::symlink("/usr/bin/tail", &bin).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("-f").arg(&log);
        let p = spawn_detached(cmd, &dir.path().join("log"), || Ok(())).unwrap();
        assert_eq!(OurProcesses::scan().under(dir.path()), vec![p]);
        // Another program with the same argument is not ours to end.
        let mut other_cmd = Command::new("tail");
        other_cmd.arg("-f").arg(&log);
        let not_ours = spawn_detached(other_cmd, &dir.path().join("log"), || Ok(())).unwrap();
        assert_eq!(OurProcesses::scan().under(dir.path()), vec![p]);
        kill(&not_ours);
        let other = tempfile::tempdir().unwrap();
        assert!(OurProcesses::scan().under(other.path()).is_empty());
        kill(&p);
        assert!(wait_gone(&p, Duration::from_secs(5)).await);
        assert!(OurProcesses::scan().under(dir.path()).is_empty());
    }

    #[test]
    fn nonexistent_pid_is_not_alive() {
        assert!(!alive(&ProcessRef {
            pid: i32::MAX,
            start_ticks: 0
        }));
    }
}
