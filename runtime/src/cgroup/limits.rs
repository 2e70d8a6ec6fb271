//! What a pod cgroup is limited to: the pod's summed resources (CRI
//! `LinuxPodSandboxConfig.resources`) plus an overhead for the VMM and
//! guest, the larger of kubelet's (RuntimeClass `overhead`, CRI
//! `overhead`) and the configured one, resource by resource.

use super::CgroupError;
use k8s_cri::v1 as cri;

/// The CFS period kubelet uses, and vmcri when a request gives none.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// cgroup v1's bounds on cpu.shares (kubelet's MinShares, MaxShares).
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;

/// CPU and memory of one CRI `LinuxContainerResources`, as vmcri uses them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit; `None` when the request sets none (0).
    pub memory_bytes: Option<u64>,
    /// CPU limit in millicores (quota / period); `None` when unset (a
    /// quota of 0 or -1).
    pub cpu_millis: Option<u64>,
    /// CFS period the quota was given in.
    pub cpu_period_us: u64,
    /// cpu.shares (kubelet sends the pod's summed requests); `None` when 0.
    pub cpu_shares: Option<u64>,
}

impl Resources {
    /// The figures of `r` (none when absent); negative memory, quota
    /// below -1, a negative period or negative shares are refused.
    pub fn from_cri(
        what: &str,
        r: Option<&cri::LinuxContainerResources>,
    ) -> Result<Resources, CgroupError> {
        let Some(r) = r else {
            return Ok(Resources {
                cpu_period_us: DEFAULT_CPU_PERIOD_US,
                ..Default::default()
            });
        };
        let bad = |field: &str, v: i64| {
            CgroupError::InvalidResources(format!("{what}.{field} {v} is out of range"))
        };
        let memory_bytes = match r.memory_limit_in_bytes {
            0 => None,
            m => Some(u64::try_from(m).map_err(|_| bad("memory_limit_in_bytes", m))?),
        };
        let cpu_period_us = match r.cpu_period {
            0 => DEFAULT_CPU_PERIOD_US,
            p => u64::try_from(p).map_err(|_| bad("cpu_period", p))?,
        };
        let cpu_millis = match r.cpu_quota {
            0 | -1 => None,
            q => {
                let q = u64::try_from(q).map_err(|_| bad("cpu_quota", q))?;
                Some(q.saturating_mul(1000) / cpu_period_us)
            }
        };
        let cpu_shares = match r.cpu_shares {
            0 => None,
            s => Some(u64::try_from(s).map_err(|_| bad("cpu_shares", s))?),
        };
        Ok(Resources {
            memory_bytes,
            cpu_millis,
            cpu_period_us,
            cpu_shares,
        })
    }
}

/// The configured floor of a pod's overhead (`[microvm] overhead_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overhead {
    /// Memory beyond the pod's limit.
    pub memory_bytes: u64,
    /// CPU beyond the pod's limit, in millicores.
    pub cpu_millis: u64,
}

/// What RunPodSandbox says of a pod's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodResources {
    /// The sum of its containers' (`resources`).
    pub pod: Resources,
    /// kubelet's overhead from the RuntimeClass (`overhead`).
    pub overhead: Resources,
}

/// A CFS quota over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    /// Microseconds of CPU per period.
    pub quota_us: u64,
    /// The period.
    pub period_us: u64,
}

/// The limits a pod cgroup gets; `None` leaves the kernel's default
/// (unlimited, or the parent's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.limit_in_bytes / memory.max.
    pub memory_bytes: Option<u64>,
    /// cpu.cfs_quota_us and cfs_period_us / cpu.max.
    pub cpu: Option<CpuQuota>,
    /// cpu.shares (v2: converted to cpu.weight).
    pub cpu_shares: Option<u64>,
}

/// kubelet's MilliCPUToShares: 1024 shares a core.
fn millis_to_shares(millis: u64) -> u64 {
    millis.saturating_mul(1024) / 1000
}

impl Limits {
    /// The limits of a pod: each of its limits plus the larger of the two
    /// overheads (kubelet's RuntimeClass overhead, the configured floor).
    /// What the pod leaves unlimited stays unlimited: a pod with no memory
    /// limit gets none, overhead or not (it may use the node, as it would
    /// with runc).
    pub fn for_pod(r: &PodResources, floor: Overhead) -> Limits {
        let memory_overhead = r.overhead.memory_bytes.unwrap_or(0).max(floor.memory_bytes);
        let cpu_overhead = r.overhead.cpu_millis.unwrap_or(0).max(floor.cpu_millis);
        let shares_overhead = r
            .overhead
            .cpu_shares
            .unwrap_or(0)
            .max(millis_to_shares(floor.cpu_millis));
        let period_us = r.pod.cpu_period_us;
        Limits {
            memory_bytes: r
                .pod
                .memory_bytes
                .map(|m| m.saturating_add(memory_overhead)),
            cpu: r.pod.cpu_millis.map(|m| CpuQuota {
                // The kernel's floor on a quota is 1 ms.
                quota_us: (m.saturating_add(cpu_overhead).saturating_mul(period_us) / 1000)
                    .max(1000),
                period_us,
            }),
            cpu_shares: r.pod.cpu_shares.map(|s| {
                s.saturating_add(shares_overhead)
                    .clamp(MIN_SHARES, MAX_SHARES)
            }),
        }
    }
}

/// cgroup v2's cpu.weight for v1 `shares` (the conversion runc and
/// kubelet use: 2 → 1, 1024 → 39, 262144 → 10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(MIN_SHARES, MAX_SHARES);
    1 + ((s - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cri_resources(memory: i64, quota: i64, shares: i64) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            memory_limit_in_bytes: memory,
            cpu_period: 100_000,
            cpu_quota: quota,
            cpu_shares: shares,
            ..Default::default()
        }
    }

    #[test]
    fn cri_resources_are_read_and_bad_ones_refused() {
        let r =
            Resources::from_cri("resources", Some(&cri_resources(256 << 20, 50_000, 512))).unwrap();
        assert_eq!(r.memory_bytes, Some(256 * MIB));
        assert_eq!(r.cpu_millis, Some(500));
        assert_eq!(r.cpu_shares, Some(512));
        // Unset and unlimited.
        let none = Resources::from_cri("resources", Some(&cri_resources(0, -1, 0))).unwrap();
        assert_eq!(
            (none.memory_bytes, none.cpu_millis, none.cpu_shares),
            (None, None, None)
        );
        assert_eq!(Resources::from_cri("resources", None).unwrap(), none);
        // Another period.
        let mut other = cri_resources(0, 25_000, 0);
        other.cpu_period = 50_000;
        let r = Resources::from_cri("overhead", Some(&other)).unwrap();
        assert_eq!((r.cpu_millis, r.cpu_period_us), (Some(500), 50_000));
        for bad in [
            cri_resources(-5, 0, 0),
            cri_resources(0, -2, 0),
            cri_resources(0, 0, -1),
            cri::LinuxContainerResources {
                cpu_period: -1,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                Resources::from_cri("resources", Some(&bad)),
                Err(CgroupError::InvalidResources(_))
            ));
        }
    }

    #[test]
    fn limits_are_the_pods_plus_the_larger_overhead() {
        let floor = Overhead {
            memory_bytes: 128 * MIB,
            cpu_millis: 100,
        };
        let pod = |memory, quota, shares| PodResources {
            pod: Resources::from_cri("r", Some(&cri_resources(memory, quota, shares))).unwrap(),
            overhead: Resources::default(),
        };
        // The configured floor alone.
        let l = Limits::for_pod(&pod(256 << 20, 50_000, 512), floor);
        assert_eq!(l.memory_bytes, Some(384 * MIB));
        assert_eq!(
            l.cpu,
            Some(CpuQuota {
                quota_us: 60_000,
                period_us: 100_000
            })
        );
        assert_eq!(l.cpu_shares, Some(512 + 102));
        // kubelet's RuntimeClass overhead, where larger, wins; where
        // smaller, the floor does.
        let mut r = pod(256 << 20, 50_000, 512);
        r.overhead = Resources::from_cri("o", Some(&cri_resources(200 << 20, 5_000, 256))).unwrap();
        let l = Limits::for_pod(&r, floor);
        assert_eq!(l.memory_bytes, Some(456 * MIB));
        assert_eq!(l.cpu.map(|c| c.quota_us), Some(60_000));
        assert_eq!(l.cpu_shares, Some(768));
        // No pod limit, no limit: overhead is added to limits only.
        let l = Limits::for_pod(&pod(0, -1, 0), floor);
        assert_eq!(l, Limits::default());
        // Overflow saturates instead of wrapping to a tiny limit.
        let l = Limits::for_pod(
            &pod(i64::MAX, 0, 0),
            Overhead {
                memory_bytes: u64::MAX,
                cpu_millis: 0,
            },
        );
        assert_eq!(l.memory_bytes, Some(u64::MAX));
        // A tiny quota is raised to the kernel's 1 ms floor.
        let l = Limits::for_pod(&pod(0, 1, 0), Overhead::default());
        assert_eq!(l.cpu.map(|c| c.quota_us), Some(1000));
    }

    #[test]
    fn shares_convert_to_weights_as_runc_does() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }
}
