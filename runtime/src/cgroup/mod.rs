//! Pod cgroups on the host: each microVM pod's VMM runs in
//! `<cgroup_parent>/vmcri-<sandbox id>`, limited to the pod's resources
//! plus an overhead, placed there before it allocates guest memory,
//! counted there for the pod's stats, and removed with the pod.
//!
//! Hand-written file writes rather than a crate such as `cgroups-rs`:
//! vmcri needs a handful of files per version, placement must be a bare
//! write(2) of `0` in a forked child (no allocation, no locks), and
//! every path is built from validated input ([`path`]).

pub mod hierarchy;
pub mod limits;
pub mod path;
pub mod stats;

use crate::config::Config;
use hierarchy::Hierarchy;
use limits::{Limits, Overhead, PodResources};
use path::CgroupPath;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long removal waits for a pod cgroup's processes to be gone after
/// killing them: a VMM unmapping gigabytes of guest memory takes a while.
const DRAIN_WITHIN: Duration = Duration::from_secs(10);

/// How deep removal follows child cgroups someone made in a pod cgroup.
const MAX_DEPTH: usize = 8;

/// Errors of pod cgroups.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// A cgroup path from the request is not acceptable (InvalidArgument).
    #[error("{0}")]
    InvalidPath(String),
    /// Resources from the request are out of range (InvalidArgument).
    #[error("{0}")]
    InvalidResources(String),
    /// The host has no cgroup hierarchy vmcri can use.
    #[error("no usable cgroup hierarchy ({0}); set [cgroups] enabled = false to run without pod cgroups")]
    NoHierarchy(String),
    /// Reading or writing a cgroup file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A cgroup file did not hold what the kernel writes there.
    #[error("{}: {what}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Processes remained in a pod cgroup after they were killed.
    #[error("cgroup {} still has processes {within:?} after they were killed; retry", path.display())]
    Busy {
        /// The cgroup's directory.
        path: PathBuf,
        /// How long removal waited.
        within: Duration,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` to control file `name` of `dir`. cgroupfs files exist
/// already (O_CREAT does nothing to them, and a missing one, such as a
/// controller's file where the controller is off, fails); the create
/// lets tests use plain directories as fake cgroup trees.
fn write(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(name);
    std::fs::write(&path, value).map_err(io_at(&path))
}

/// The open `cgroup.procs` files of a pod cgroup (one per hierarchy),
/// for the pod's process to move itself in between fork and exec.
#[derive(Debug, Default)]
pub struct Placement {
    procs: Vec<OwnedFd>,
}

impl Placement {
    /// No cgroup: [`Placement::enter`] does nothing.
    pub fn none() -> Placement {
        Placement::default()
    }

    /// Moves the calling process into the cgroup: writes `0` ("the
    /// writing process", in v1 and v2) to each `cgroup.procs`. Made for
    /// a `pre_exec` hook, so async-signal-safe: write(2) on fds opened
    /// beforehand, no allocation.
    pub fn enter(&self) -> std::io::Result<()> {
        for fd in &self.procs {
            rustix::io::write(fd.as_fd(), b"0")?;
        }
        Ok(())
    }
}

/// The host's pod cgroups: where they go, what they are limited to.
#[derive(Debug)]
pub struct PodCgroups {
    /// `None` when `[cgroups] enabled = false`.
    hierarchy: Option<Hierarchy>,
    default_parent: CgroupPath,
    overhead: Overhead,
}

impl PodCgroups {
    /// As `config` says (`[cgroups]`, `[microvm] overhead_*`), over the
    /// host's hierarchy if enabled.
    pub fn new(config: &Config) -> Result<PodCgroups, CgroupError> {
        let hierarchy = if config.cgroups.enabled {
            Some(Hierarchy::detect()?)
        } else {
            None
        };
        PodCgroups::over(hierarchy, config)
    }

    /// As `config` says, over `hierarchy` (tests give a fake one; `None`
    /// disables pod cgroups).
    pub fn over(hierarchy: Option<Hierarchy>, config: &Config) -> Result<PodCgroups, CgroupError> {
        Ok(PodCgroups {
            hierarchy,
            default_parent: CgroupPath::parse(&config.cgroups.default_parent)?,
            overhead: Overhead {
                memory_bytes: config.microvm.overhead_memory_mib.saturating_mul(1 << 20),
                cpu_millis: config.microvm.overhead_cpu_millis,
            },
        })
    }

    /// Whether pods get cgroups at all.
    pub fn enabled(&self) -> bool {
        self.hierarchy.is_some()
    }

    /// The hierarchy, if enabled.
    pub fn hierarchy(&self) -> Option<&Hierarchy> {
        self.hierarchy.as_ref()
    }

    /// The cgroup of sandbox `sandbox_id` under `parent` (the configured
    /// default when the request gave none).
    pub fn path_for(&self, parent: Option<&CgroupPath>, sandbox_id: &str) -> CgroupPath {
        parent.unwrap_or(&self.default_parent).pod(sandbox_id)
    }

    /// Creates cgroup `path`, limited as [`Limits::for_pod`] computes from
    /// `r`, and opens it for [`Placement::enter`]. Blocking (a few small
    /// file writes). On failure nothing it made is left but the parents.
    pub fn create(&self, path: &CgroupPath, r: &PodResources) -> Result<Placement, CgroupError> {
        let Some(h) = &self.hierarchy else {
            return Ok(Placement::none());
        };
        let limits = Limits::for_pod(r, self.overhead);
        let made = match h {
            Hierarchy::Unified(root) => create_unified(root, path, &limits),
            Hierarchy::Legacy(m) => create_legacy(h, m, path, &limits),
        };
        let opened = made.and_then(|()| {
            let procs = h
                .dirs(path.relative())
                .iter()
                .map(|dir| {
                    let p = dir.join("cgroup.procs");
                    File::options()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&p)
                        .map(OwnedFd::from)
                        .map_err(io_at(&p))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Placement { procs })
        });
        if opened.is_err() {
            for dir in h.dirs(path.relative()) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        opened
    }

    /// Removes cgroup `path` (as recorded) from every hierarchy: processes
    /// still in it are killed (they are the pod's: a VMM's children, or a
    /// VMM that outlived its stop), and it waits up to [`DRAIN_WITHIN`]
    /// for them to be gone, since rmdir fails with EBUSY until then.
    /// Already gone is success. Blocking.
    pub fn remove(&self, path: &str) -> Result<(), CgroupError> {
        let Some(h) = &self.hierarchy else {
            return Ok(());
        };
        let path = CgroupPath::parse(path)?;
        let deadline = Instant::now() + DRAIN_WITHIN;
        for dir in h.dirs(path.relative()) {
            remove_dir(&dir, deadline, MAX_DEPTH)?;
        }
        Ok(())
    }

    /// The OOM kills in cgroup `path` (as recorded), and its limit.
    pub fn oom(&self, path: &str) -> Result<stats::Oom, CgroupError> {
        let Some(h) = &self.hierarchy else {
            return Err(CgroupError::NoHierarchy("pod cgroups are disabled".into()));
        };
        stats::read_oom(h, CgroupPath::parse(path)?.relative())
    }

    /// The usage of cgroup `path` (as recorded).
    pub fn usage(&self, path: &str) -> Result<stats::Usage, CgroupError> {
        let Some(h) = &self.hierarchy else {
            return Err(CgroupError::NoHierarchy("pod cgroups are disabled".into()));
        };
        stats::read_usage(h, CgroupPath::parse(path)?.relative())
    }
}

/// cgroup v2: enables the memory and cpu controllers (pids where there)
/// at each level from the root down, makes the levels, then sets the
/// pod cgroup's limits.
fn create_unified(root: &Path, path: &CgroupPath, limits: &Limits) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    for component in path.relative().split('/') {
        enable_controllers(&dir)?;
        dir.push(component);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io_at(&dir)(e));
            }
            _ => {}
        }
    }
    if let Some(m) = limits.memory_bytes {
        write(&dir, "memory.max", &m.to_string())?;
    }
    if let Some(c) = limits.cpu {
        write(&dir, "cpu.max", &format!("{} {}", c.quota_us, c.period_us))?;
    }
    if let Some(s) = limits.cpu_shares {
        write(&dir, "cpu.weight", &limits::shares_to_weight(s).to_string())?;
    }
    Ok(())
}

/// Lets `dir`'s children have the memory and cpu controllers (and pids,
/// if the kernel has it), unless they already do.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let on = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let has = |c: &str| on.split_whitespace().any(|w| w == c);
    if !(has("memory") && has("cpu")) {
        write(dir, "cgroup.subtree_control", "+memory +cpu")?;
    }
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if !has("pids") && available.split_whitespace().any(|w| w == "pids") {
        // Only for kubelet's PID limits to count the VMM: not worth
        // failing a pod over.
        if let Err(e) = write(dir, "cgroup.subtree_control", "+pids") {
            tracing::debug!(error = %e, "pids controller not enabled");
        }
    }
    Ok(())
}

/// cgroup v1: makes the cgroup in every hierarchy vmcri uses, then sets
/// the memory and CPU limits.
fn create_legacy(
    h: &Hierarchy,
    m: &hierarchy::LegacyMounts,
    path: &CgroupPath,
    limits: &Limits,
) -> Result<(), CgroupError> {
    for dir in h.dirs(path.relative()) {
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    }
    if let Some(bytes) = limits.memory_bytes {
        write(
            &m.memory.join(path.relative()),
            "memory.limit_in_bytes",
            &bytes.to_string(),
        )?;
    }
    let cpu = m.cpu.join(path.relative());
    if let Some(c) = limits.cpu {
        let c = within_parent_quota(cpu.parent(), c);
        // The period first: a fresh cgroup has no quota to conflict with.
        write(&cpu, "cpu.cfs_period_us", &c.period_us.to_string())?;
        write(&cpu, "cpu.cfs_quota_us", &c.quota_us.to_string())?;
    }
    if let Some(s) = limits.cpu_shares {
        write(&cpu, "cpu.shares", &s.to_string())?;
    }
    Ok(())
}

/// `c`, lowered to the parent's CPU rate if that is lower: v1 refuses
/// (EINVAL) a child quota above its parent's, which happens when the
/// configured overhead exceeds the RuntimeClass overhead kubelet gave
/// the pod cgroup. The parent's limit binds either way.
fn within_parent_quota(parent: Option<&Path>, c: limits::CpuQuota) -> limits::CpuQuota {
    let read = |name: &str| -> Option<i64> {
        std::fs::read_to_string(parent?.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(pq), Some(pp)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")) else {
        return c;
    };
    let (Ok(pq), Ok(pp)) = (u64::try_from(pq), u64::try_from(pp)) else {
        // -1: the parent is unlimited.
        return c;
    };
    if pp == 0
        || u128::from(c.quota_us) * u128::from(pp) <= u128::from(pq) * u128::from(c.period_us)
    {
        return c;
    }
    let quota = u128::from(pq) * u128::from(c.period_us) / u128::from(pp);
    limits::CpuQuota {
        quota_us: u64::try_from(quota).unwrap_or(u64::MAX).max(1000),
        period_us: c.period_us,
    }
}

/// SIGKILLs every process in cgroup `dir` (v2's `cgroup.kill` where the
/// kernel has it, which also gets processes forking meanwhile).
fn kill_all(dir: &Path) {
    if dir.join("cgroup.kill").exists() && write(dir, "cgroup.kill", "1").is_ok() {
        return;
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 0 {
            // SAFETY: kill(2) of a PID just listed in the pod's own
            // cgroup; nothing else is placed there. (The PID could be
            // reused between the read and the kill only if the process
            // exited and the PID space wrapped in between.)
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Removes cgroup directory `dir` and any child cgroups, killing their
/// processes, until `deadline`.
fn remove_dir(dir: &Path, deadline: Instant, depth: usize) -> Result<(), CgroupError> {
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(io_at(dir)(e)),
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Busy {
                path: dir.to_path_buf(),
                within: DRAIN_WITHIN,
            });
        }
        kill_all(dir);
        if depth > 0 {
            let children = std::fs::read_dir(dir).into_iter().flatten().flatten();
            for child in children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                remove_dir(&child.path(), deadline, depth - 1)?;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::limits::Resources;
    use super::*;
    use crate::backend::host_process;
    use k8s_cri::v1 as cri;

    const MIB: u64 = 1 << 20;

    fn config() -> Config {
        let mut c = Config::load(None).unwrap();
        c.microvm.overhead_memory_mib = 100;
        c.microvm.overhead_cpu_millis = 100;
        c
    }

    fn resources(memory: i64, quota: i64, shares: i64) -> PodResources {
        let r = cri::LinuxContainerResources {
            memory_limit_in_bytes: memory,
            cpu_period: 100_000,
            cpu_quota: quota,
            cpu_shares: shares,
            ..Default::default()
        };
        PodResources {
            pod: Resources::from_cri("resources", Some(&r)).unwrap(),
            overhead: Resources::default(),
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap().trim().to_string()
    }

    #[test]
    fn a_v1_pod_cgroup_is_made_in_each_hierarchy_with_its_limits() {
        let root = tempfile::tempdir().unwrap();
        let m = |c: &str| root.path().join(c);
        let h = Hierarchy::Legacy(hierarchy::LegacyMounts {
            memory: m("memory"),
            cpu: m("cpu"),
            cpuacct: m("cpuacct"),
            pids: Some(m("pids")),
        });
        // kubelet's pod cgroup, with the pod's 0.5 CPU plus 0.05 of
        // RuntimeClass overhead: the configured 0.1 would exceed it.
        let parent = m("cpu").join("kubepods/pod1");
        std::fs::create_dir_all(&parent).unwrap();
        std::fs::write(parent.join("cpu.cfs_quota_us"), "55000\n").unwrap();
        std::fs::write(parent.join("cpu.cfs_period_us"), "100000\n").unwrap();
        let cgroups = PodCgroups::over(Some(h), &config()).unwrap();
        let parent = CgroupPath::parent("/kubepods/pod1").unwrap();
        let path = cgroups.path_for(parent.as_ref(), "abc");
        assert_eq!(path.as_str(), "/kubepods/pod1/vmcri-abc");
        let placement = cgroups
            .create(&path, &resources(256 << 20, 50_000, 512))
            .unwrap();
        assert_eq!(placement.procs.len(), 4, "memory, cpu, cpuacct, pids");
        let dir = |c: &str| m(c).join("kubepods/pod1/vmcri-abc");
        assert_eq!(
            read(&dir("memory").join("memory.limit_in_bytes")),
            (356 * MIB).to_string()
        );
        assert_eq!(read(&dir("cpu").join("cpu.cfs_quota_us")), "55000");
        assert_eq!(read(&dir("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&dir("cpu").join("cpu.shares")), "614");
        for c in ["cpuacct", "pids"] {
            assert!(dir(c).join("cgroup.procs").exists(), "{c}");
        }
        // Without the crictl default parent, and with no limits: none
        // written.
        let path = cgroups.path_for(None, "def");
        assert_eq!(path.as_str(), "/vmcri/vmcri-def");
        cgroups.create(&path, &resources(0, 0, 0)).unwrap();
        let memory = m("memory").join("vmcri/vmcri-def");
        assert!(memory.is_dir());
        assert!(!memory.join("memory.limit_in_bytes").exists());
        assert!(!m("cpu").join("vmcri/vmcri-def/cpu.cfs_quota_us").exists());
    }

    #[test]
    fn a_v2_pod_cgroup_enables_its_controllers_from_the_root_down() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let cgroups =
            PodCgroups::over(Some(Hierarchy::Unified(root.path().into())), &config()).unwrap();
        let path = cgroups.path_for(CgroupPath::parent("/kubepods/pod1").unwrap().as_ref(), "x");
        let placement = cgroups
            .create(&path, &resources(256 << 20, 50_000, 1024))
            .unwrap();
        assert_eq!(placement.procs.len(), 1);
        let dir = root.path().join("kubepods/pod1/vmcri-x");
        assert_eq!(read(&dir.join("memory.max")), (356 * MIB).to_string());
        assert_eq!(read(&dir.join("cpu.max")), "60000 100000");
        assert_eq!(read(&dir.join("cpu.weight")), "43");
        // Each level above the pod cgroup delegates memory and cpu (a fake
        // file keeps only the last write, so pids shows at the root).
        assert_eq!(read(&root.path().join("cgroup.subtree_control")), "+pids");
        for level in ["kubepods", "kubepods/pod1"] {
            assert_eq!(
                read(&root.path().join(level).join("cgroup.subtree_control")),
                "+memory +cpu"
            );
        }
    }

    #[test]
    fn a_failed_creation_leaves_no_pod_cgroup_and_removal_of_nothing_succeeds() {
        let root = tempfile::tempdir().unwrap();
        let cgroups =
            PodCgroups::over(Some(Hierarchy::Unified(root.path().into())), &config()).unwrap();
        let path = cgroups.path_for(None, "x");
        // A directory where memory.max would be written.
        let dir = root.path().join("vmcri/vmcri-x");
        std::fs::create_dir_all(dir.join("memory.max")).unwrap();
        assert!(matches!(
            cgroups.create(&path, &resources(1 << 20, 0, 0)),
            Err(CgroupError::Io { .. })
        ));
        // (On cgroupfs the half-made cgroup goes at once; a plain
        // directory keeps the obstacle.)
        std::fs::remove_dir(dir.join("memory.max")).unwrap();
        cgroups.remove(path.as_str()).unwrap();
        assert!(!dir.exists());
        cgroups.remove(path.as_str()).unwrap();
        // A tampered record cannot steer removal out of the hierarchy.
        assert!(matches!(
            cgroups.remove("/vmcri/../../etc"),
            Err(CgroupError::InvalidPath(_))
        ));
        // Disabled: nothing made, nothing to remove, no usage.
        let off = PodCgroups::over(None, &config()).unwrap();
        assert!(!off.enabled());
        assert!(off
            .create(&path, &resources(1, 0, 0))
            .unwrap()
            .procs
            .is_empty());
        off.remove(path.as_str()).unwrap();
        assert!(off.usage(path.as_str()).is_err());
    }

    /// On the host's real cgroupfs, where it is writable (root; skipped
    /// elsewhere): a process placed by `Placement::enter` in its pre_exec
    /// is in the cgroup, limited and counted; removal kills it, waits
    /// out EBUSY and leaves nothing.
    #[test]
    fn a_real_process_is_placed_counted_and_removed_on_the_host() {
        let Ok(h) = Hierarchy::detect() else {
            eprintln!("skipped: no cgroup hierarchy");
            return;
        };
        let mut c = config();
        c.cgroups.default_parent = format!("/vmcri-unit-{}", std::process::id());
        let cgroups = PodCgroups::over(Some(h.clone()), &c).unwrap();
        let path = cgroups.path_for(None, "placed");
        let placement = match cgroups.create(&path, &resources(64 << 20, 50_000, 0)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: cgroupfs not writable here: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        let p =
            host_process::spawn_detached(cmd, &dir.path().join("log"), move || placement.enter())
                .unwrap();
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        assert!(
            own.lines().any(|l| l.ends_with(&format!(":{path}"))),
            "{own}"
        );
        for d in h.dirs(path.relative()) {
            let procs = read(&d.join("cgroup.procs"));
            assert_eq!(procs, p.pid.to_string(), "{}", d.display());
        }
        match &h {
            Hierarchy::Legacy(m) => {
                let d = m.memory.join(path.relative());
                assert_eq!(
                    read(&d.join("memory.limit_in_bytes")),
                    (164 * MIB).to_string()
                );
            }
            Hierarchy::Unified(root) => {
                let d = root.join(path.relative());
                assert_eq!(read(&d.join("memory.max")), (164 * MIB).to_string());
            }
        }
        // What the process touches after its move is charged here.
        let deadline = Instant::now() + Duration::from_secs(10);
        while cgroups.usage(path.as_str()).unwrap().memory_usage_bytes == 0 {
            assert!(Instant::now() < deadline, "no memory charged");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The process is still there: removal kills it first.
        assert!(host_process::alive(&p));
        cgroups.remove(path.as_str()).unwrap();
        assert!(host_process::wait_gone_blocking(&p, Duration::from_secs(5)));
        for d in h.dirs(path.relative()) {
            assert!(!d.exists(), "{}", d.display());
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
        // Again: already gone is success.
        cgroups.remove(path.as_str()).unwrap();
    }
}
