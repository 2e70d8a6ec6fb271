//! Container cgroup statistics and OOM kills, read from cgroup v2 (the
//! guest) or cgroup v1 (a host running the `process` backend).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What the kernel accounts for a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory charged, bytes.
    pub memory_usage_bytes: u64,
    /// Usage minus inactive file pages (what kubelet evicts on).
    pub working_set_bytes: u64,
    /// Anonymous memory, bytes.
    pub rss_bytes: u64,
    /// Page faults.
    pub page_faults: u64,
    /// Major page faults.
    pub major_page_faults: u64,
    /// Live tasks.
    pub pids: u64,
    /// Processes the OOM killer killed in it.
    pub oom_kills: u64,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.stat, cpu.stat, memory.events, ...).
fn read_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// True when /sys/fs/cgroup is the unified (v2) hierarchy.
pub fn unified() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// A cgroup path made relative, refusing `..` so a spec cannot point us
/// at another cgroup's files.
fn relative(cgroup: &str) -> Option<PathBuf> {
    let p = Path::new(cgroup.trim_start_matches('/'));
    p.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| p.to_path_buf())
}

/// Statistics of `cgroup` (as in the OCI spec's cgroupsPath); None if it
/// does not exist.
pub fn stats(cgroup: &str) -> Option<Stats> {
    let rel = relative(cgroup)?;
    let root = Path::new(CGROUP_ROOT);
    if unified() {
        let dir = root.join(&rel);
        if !dir.is_dir() {
            return None;
        }
        let cpu = read_keyed(&dir.join("cpu.stat"));
        let mem = read_keyed(&dir.join("memory.stat"));
        let usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
        let inactive = mem.get("inactive_file").copied().unwrap_or(0);
        Some(Stats {
            cpu_usage_ns: cpu.get("usage_usec").copied().unwrap_or(0) * 1000,
            memory_usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(inactive),
            rss_bytes: mem.get("anon").copied().unwrap_or(0),
            page_faults: mem.get("pgfault").copied().unwrap_or(0),
            major_page_faults: mem.get("pgmajfault").copied().unwrap_or(0),
            pids: read_u64(&dir.join("pids.current")).unwrap_or(0),
            oom_kills: read_keyed(&dir.join("memory.events"))
                .get("oom_kill")
                .copied()
                .unwrap_or(0),
        })
    } else {
        let memory = root.join("memory").join(&rel);
        let cpuacct = root.join("cpuacct").join(&rel);
        if !memory.is_dir() && !cpuacct.is_dir() {
            return None;
        }
        let mem = read_keyed(&memory.join("memory.stat"));
        let usage = read_u64(&memory.join("memory.usage_in_bytes")).unwrap_or(0);
        let inactive = mem.get("total_inactive_file").copied().unwrap_or(0);
        Some(Stats {
            cpu_usage_ns: read_u64(&cpuacct.join("cpuacct.usage")).unwrap_or(0),
            memory_usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(inactive),
            rss_bytes: mem.get("total_rss").copied().unwrap_or(0),
            page_faults: mem.get("total_pgfault").copied().unwrap_or(0),
            major_page_faults: mem.get("total_pgmajfault").copied().unwrap_or(0),
            pids: read_u64(&root.join("pids").join(&rel).join("pids.current")).unwrap_or(0),
            oom_kills: read_keyed(&memory.join("memory.oom_control"))
                .get("oom_kill")
                .copied()
                .unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_that_climb_out() {
        assert!(relative("/vmcri/../../etc").is_none());
        assert_eq!(relative("/vmcri/a/b"), Some(PathBuf::from("vmcri/a/b")));
        assert!(stats("/../x").is_none());
    }

    #[test]
    fn parses_keyed_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.stat");
        std::fs::write(&f, "anon 4096\nfile 8192\nbroken\n").unwrap();
        let m = read_keyed(&f);
        assert_eq!(m.get("anon"), Some(&4096));
        assert_eq!(m.get("file"), Some(&8192));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn a_missing_cgroup_has_no_stats() {
        assert!(stats("/vmcri-test-no-such-cgroup/x").is_none());
    }
}
