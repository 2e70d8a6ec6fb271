//! A pod cgroup's CPU and memory usage as the host kernel counts it, the
//! figures kubelet's eviction and `kubectl top` use: for a microVM pod
//! the guest's own account is the guest's word, this is not.

use super::hierarchy::Hierarchy;
use super::CgroupError;
use std::path::Path;

/// CPU and memory usage of a cgroup at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// When it was read, nanoseconds since the epoch.
    pub timestamp_ns: i64,
    /// Cumulative CPU time.
    pub cpu_usage_ns: u64,
    /// Memory charged, page cache included.
    pub memory_usage_bytes: u64,
    /// Usage less inactive file pages, floored at 0 (cAdvisor's working
    /// set, which kubelet evicts by).
    pub memory_working_set_bytes: u64,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`).
    pub memory_rss_bytes: u64,
    /// Page faults, where the kernel counts them.
    pub page_faults: Option<u64>,
    /// Major page faults, where the kernel counts them.
    pub major_page_faults: Option<u64>,
}

/// The value of `key` in a flat-keyed file (`memory.stat`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A number on its own in `path`.
fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        what: format!("{:?} is not a number", text.trim()),
    })
}

/// `key` of the flat-keyed file `path`, which must have it.
fn required(path: &Path, text: &str, key: &str) -> Result<u64, CgroupError> {
    keyed(text, key).ok_or_else(|| CgroupError::Parse {
        path: path.to_path_buf(),
        what: format!("no {key}"),
    })
}

/// The usage of cgroup `relative` in `h`.
pub fn read_usage(h: &Hierarchy, relative: &str) -> Result<Usage, CgroupError> {
    let timestamp_ns = crate::id::now_ns();
    match h {
        Hierarchy::Unified(root) => {
            let dir = root.join(relative);
            let cpu_path = dir.join("cpu.stat");
            let cpu = read(&cpu_path)?;
            let stat_path = dir.join("memory.stat");
            let stat = read(&stat_path)?;
            let usage = read_u64(&dir.join("memory.current"))?;
            let inactive = required(&stat_path, &stat, "inactive_file")?;
            Ok(Usage {
                timestamp_ns,
                cpu_usage_ns: required(&cpu_path, &cpu, "usage_usec")?.saturating_mul(1000),
                memory_usage_bytes: usage,
                memory_working_set_bytes: usage.saturating_sub(inactive),
                memory_rss_bytes: required(&stat_path, &stat, "anon")?,
                page_faults: keyed(&stat, "pgfault"),
                major_page_faults: keyed(&stat, "pgmajfault"),
            })
        }
        Hierarchy::Legacy(m) => {
            let memory = m.memory.join(relative);
            let stat_path = memory.join("memory.stat");
            let stat = read(&stat_path)?;
            let usage = read_u64(&memory.join("memory.usage_in_bytes"))?;
            // The `total_` figures count the cgroup's descendants too.
            let inactive = required(&stat_path, &stat, "total_inactive_file")?;
            Ok(Usage {
                timestamp_ns,
                cpu_usage_ns: read_u64(&m.cpuacct.join(relative).join("cpuacct.usage"))?,
                memory_usage_bytes: usage,
                memory_working_set_bytes: usage.saturating_sub(inactive),
                memory_rss_bytes: required(&stat_path, &stat, "total_rss")?,
                page_faults: keyed(&stat, "total_pgfault"),
                major_page_faults: keyed(&stat, "total_pgmajfault"),
            })
        }
    }
}

/// What the kernel's OOM killer did in a cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Oom {
    /// Processes it killed there (the kernel counts them since 4.13).
    pub kills: u64,
    /// The cgroup's memory limit, if it has one.
    pub limit_bytes: Option<u64>,
}

/// The OOM kills in cgroup `relative` of `h`, and its memory limit.
pub fn read_oom(h: &Hierarchy, relative: &str) -> Result<Oom, CgroupError> {
    let (events, limit) = match h {
        Hierarchy::Unified(root) => {
            let dir = root.join(relative);
            (dir.join("memory.events"), dir.join("memory.max"))
        }
        Hierarchy::Legacy(m) => {
            let dir = m.memory.join(relative);
            (
                dir.join("memory.oom_control"),
                dir.join("memory.limit_in_bytes"),
            )
        }
    };
    let text = read(&events)?;
    let kills = required(&events, &text, "oom_kill")?;
    let limit = read(&limit)?;
    // "max" (v2), or v1's "no limit" (the largest page-aligned i64).
    let limit_bytes = limit
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&l| l < (i64::MAX as u64) & !0xfff);
    Ok(Oom { kills, limit_bytes })
}

#[cfg(test)]
mod tests {
    use super::super::hierarchy::LegacyMounts;
    use super::*;

    #[test]
    fn v1_usage_is_read_as_cadvisor_reads_it() {
        let root = tempfile::tempdir().unwrap();
        let m = |c: &str| root.path().join(c);
        let h = Hierarchy::Legacy(LegacyMounts {
            memory: m("memory"),
            cpu: m("cpu"),
            cpuacct: m("cpuacct"),
            pids: None,
        });
        let memory = m("memory").join("p/vmcri-x");
        let cpuacct = m("cpuacct").join("p/vmcri-x");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::create_dir_all(&cpuacct).unwrap();
        std::fs::write(cpuacct.join("cpuacct.usage"), "123456789\n").unwrap();
        std::fs::write(memory.join("memory.usage_in_bytes"), "10000\n").unwrap();
        std::fs::write(
            memory.join("memory.stat"),
            "cache 1\nrss 2\ninactive_file 3\ntotal_cache 500\ntotal_rss 7000\n\
             total_inactive_file 2500\ntotal_pgfault 42\ntotal_pgmajfault 4\n",
        )
        .unwrap();
        let u = read_usage(&h, "p/vmcri-x").unwrap();
        assert_eq!(u.cpu_usage_ns, 123_456_789);
        assert_eq!(u.memory_usage_bytes, 10_000);
        assert_eq!(u.memory_working_set_bytes, 7_500);
        assert_eq!(u.memory_rss_bytes, 7_000);
        assert_eq!((u.page_faults, u.major_page_faults), (Some(42), Some(4)));
        assert!(u.timestamp_ns > 0);
        // More inactive file pages than usage (they are read apart): 0.
        std::fs::write(memory.join("memory.usage_in_bytes"), "100\n").unwrap();
        assert_eq!(
            read_usage(&h, "p/vmcri-x")
                .unwrap()
                .memory_working_set_bytes,
            0
        );
        // A malformed file is an error, not a zero.
        std::fs::write(memory.join("memory.usage_in_bytes"), "lots\n").unwrap();
        assert!(matches!(
            read_usage(&h, "p/vmcri-x"),
            Err(CgroupError::Parse { .. })
        ));
        // A cgroup that is not there.
        assert!(matches!(
            read_usage(&h, "gone"),
            Err(CgroupError::Io { .. })
        ));
    }

    #[test]
    fn v2_usage_is_read_as_cadvisor_reads_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p/vmcri-x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.current"), "8192\n").unwrap();
        std::fs::write(
            dir.join("memory.stat"),
            "anon 4096\nfile 4096\ninactive_file 1024\npgfault 9\npgmajfault 1\n",
        )
        .unwrap();
        let h = Hierarchy::Unified(root.path().to_path_buf());
        let u = read_usage(&h, "p/vmcri-x").unwrap();
        assert_eq!(u.cpu_usage_ns, 2_500_000);
        assert_eq!(u.memory_usage_bytes, 8192);
        assert_eq!(u.memory_working_set_bytes, 7168);
        assert_eq!(u.memory_rss_bytes, 4096);
        assert_eq!((u.page_faults, u.major_page_faults), (Some(9), Some(1)));
        // Without page fault counters (older kernels): none, not zero.
        std::fs::write(dir.join("memory.stat"), "anon 1\ninactive_file 0\n").unwrap();
        let u = read_usage(&h, "p/vmcri-x").unwrap();
        assert_eq!((u.page_faults, u.major_page_faults), (None, None));
        // A missing required key is an error.
        std::fs::write(dir.join("memory.stat"), "anon 1\n").unwrap();
        assert!(matches!(
            read_usage(&h, "p/vmcri-x"),
            Err(CgroupError::Parse { .. })
        ));
    }

    #[test]
    fn oom_kills_and_the_limit_are_read_in_both_hierarchies() {
        let root = tempfile::tempdir().unwrap();
        let m = |c: &str| root.path().join(c);
        let h = Hierarchy::Legacy(LegacyMounts {
            memory: m("memory"),
            cpu: m("cpu"),
            cpuacct: m("cpuacct"),
            pids: None,
        });
        let memory = m("memory").join("p/vmcri-x");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(memory.join("memory.limit_in_bytes"), "201326592\n").unwrap();
        assert_eq!(
            read_oom(&h, "p/vmcri-x").unwrap(),
            Oom {
                kills: 2,
                limit_bytes: Some(192 << 20)
            }
        );
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(read_oom(&h, "p/vmcri-x").unwrap().limit_bytes, None);
        // A kernel too old to count kills: an error, not a zero.
        std::fs::write(memory.join("memory.oom_control"), "under_oom 0\n").unwrap();
        assert!(read_oom(&h, "p/vmcri-x").is_err());

        let dir = m("v2").join("p/vmcri-x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        let h = Hierarchy::Unified(m("v2"));
        assert_eq!(
            read_oom(&h, "p/vmcri-x").unwrap(),
            Oom {
                kills: 1,
                limit_bytes: None
            }
        );
    }
}
