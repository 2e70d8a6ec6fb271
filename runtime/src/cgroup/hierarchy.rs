//! Where the host's cgroup controllers are: one unified (v2) tree, or a
//! v1 tree per controller (hybrid hosts included, whose v2 mount carries
//! no controller), read from /proc/self/mountinfo at start.

use super::CgroupError;
use std::path::{Path, PathBuf};

/// The host's cgroup layout, as far as vmcri uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one tree; controllers are enabled per level through
    /// `cgroup.subtree_control`.
    Unified(PathBuf),
    /// cgroup v1: a mount per controller (or per group of co-mounted
    /// controllers, such as `cpu,cpuacct`).
    Legacy(LegacyMounts),
}

/// The v1 mount points vmcri uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMounts {
    /// `memory`: limits and memory stats.
    pub memory: PathBuf,
    /// `cpu`: CFS quota and shares.
    pub cpu: PathBuf,
    /// `cpuacct`: CPU usage.
    pub cpuacct: PathBuf,
    /// `pids`, if mounted: no limit is set, but kubelet's pod PID limit
    /// on the parent then counts the VMM's threads too.
    pub pids: Option<PathBuf>,
}

/// The v1 controllers vmcri places a pod's process in.
const LEGACY_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

impl Hierarchy {
    /// The host's layout, from /proc/self/mountinfo.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Hierarchy::from_mountinfo(&text)
    }

    /// The layout `mountinfo` (the text of /proc/PID/mountinfo)
    /// describes: v1 wherever the memory controller is mounted as v1
    /// (legacy and hybrid hosts), else the first cgroup2 mount.
    pub fn from_mountinfo(mountinfo: &str) -> Result<Hierarchy, CgroupError> {
        let mut legacy: [Option<PathBuf>; 4] = Default::default();
        let mut unified = None;
        for line in mountinfo.lines() {
            // ID parent major:minor root mount-point options [optional...] - type source super-options
            let mut halves = line.splitn(2, " - ");
            let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
                continue;
            };
            let Some(point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (fstype, super_opts) = (right.next(), right.nth(1).unwrap_or(""));
            match fstype {
                Some("cgroup") => {
                    for opt in super_opts.split(',') {
                        if let Some(i) = LEGACY_CONTROLLERS.iter().position(|c| *c == opt) {
                            legacy[i].get_or_insert_with(|| unescape(point));
                        }
                    }
                }
                Some("cgroup2") => {
                    unified.get_or_insert_with(|| unescape(point));
                }
                _ => {}
            }
        }
        let [memory, cpu, cpuacct, pids] = legacy;
        match (memory, cpu, cpuacct, unified) {
            (Some(memory), Some(cpu), Some(cpuacct), _) => Ok(Hierarchy::Legacy(LegacyMounts {
                memory,
                cpu,
                cpuacct,
                pids,
            })),
            (Some(_), ..) => Err(CgroupError::NoHierarchy(
                "cgroup v1 has memory but not both cpu and cpuacct mounted".into(),
            )),
            (None, _, _, Some(root)) => Ok(Hierarchy::Unified(root)),
            (None, _, _, None) => Err(CgroupError::NoHierarchy(
                "no cgroup v1 memory controller and no cgroup2 mount".into(),
            )),
        }
    }

    /// The directories of cgroup `relative` (a path without its leading
    /// `/`): one per distinct mount.
    pub fn dirs(&self, relative: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::Unified(root) => vec![root.join(relative)],
            Hierarchy::Legacy(m) => {
                let mut dirs: Vec<PathBuf> = Vec::new();
                let mounts = [
                    Some(&m.memory),
                    Some(&m.cpu),
                    Some(&m.cpuacct),
                    m.pids.as_ref(),
                ];
                for mount in mounts.into_iter().flatten() {
                    let d = mount.join(relative);
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
                dirs
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's mountinfo (hybrid: v1 controllers apart, an empty v2).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_hybrid_host_uses_its_v1_controllers() {
        let h = Hierarchy::from_mountinfo(HYBRID).unwrap();
        let Hierarchy::Legacy(m) = &h else {
            panic!("{h:?}")
        };
        assert_eq!(m.memory, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(m.cpuacct, Path::new("/sys/fs/cgroup/cpuacct"));
        assert_eq!(m.pids.as_deref(), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(
            h.dirs("vmcri/vmcri-x"),
            ["memory", "cpu", "cpuacct", "pids"]
                .map(|c| Path::new("/sys/fs/cgroup").join(c).join("vmcri/vmcri-x"))
        );
    }

    #[test]
    fn co_mounted_controllers_share_one_directory() {
        let text = "\
25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
26 24 0:23 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
";
        let h = Hierarchy::from_mountinfo(text).unwrap();
        assert_eq!(
            h.dirs("a"),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/a"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/a")
            ]
        );
    }

    #[test]
    fn a_unified_host_uses_its_one_tree() {
        let text = "\
24 30 0:22 / /sys rw shared:7 - sysfs sysfs rw
29 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let h = Hierarchy::from_mountinfo(text).unwrap();
        assert_eq!(h, Hierarchy::Unified(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(h.dirs("a/b"), vec![PathBuf::from("/sys/fs/cgroup/a/b")]);
    }

    #[test]
    fn hosts_without_usable_cgroups_are_told_apart() {
        assert!(matches!(
            Hierarchy::from_mountinfo("24 30 0:22 / /sys rw - sysfs sysfs rw\ngarbage\n"),
            Err(CgroupError::NoHierarchy(_))
        ));
        let memory_only = "26 24 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert!(matches!(
            Hierarchy::from_mountinfo(memory_only),
            Err(CgroupError::NoHierarchy(_))
        ));
        // Escaped mount points are decoded.
        let spaced = "1 1 0:1 / /cg\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Hierarchy::from_mountinfo(spaced).unwrap(),
            Hierarchy::Unified(PathBuf::from("/cg v2"))
        );
    }

    #[test]
    fn this_hosts_layout_is_found() {
        // Whatever it is, detection reads it without error where cgroups
        // are mounted at all.
        if std::path::Path::new("/sys/fs/cgroup").is_dir() {
            Hierarchy::detect().unwrap();
        }
    }
}
