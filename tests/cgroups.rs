//! A microVM pod's VMM in its host cgroup, through `vmcri serve`: placed
//! under kubelet's `cgroup_parent` before it boots, limited to the pod's
//! memory and CPU plus the overhead, counted there for PodSandboxStats,
//! and the cgroup gone after RemovePodSandbox even when the VMM was
//! killed with `kill -9`.

use k8s_cri::v1 as cri;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcri_tests::pods::*;
use vmcri_tests::Scratch;

const MIB: i64 = 1 << 20;

/// The mount point of the cgroup v1 `controller`, or of the cgroup2
/// tree when `controller` is not mounted as v1.
fn cgroup_mount(controller: &str) -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut unified = None;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let point = left.split(' ').nth(4).unwrap();
        let fields: Vec<&str> = right.split(' ').collect();
        match fields[0] {
            "cgroup" if fields[2].split(',').any(|o| o == controller) => return point.into(),
            "cgroup2" => unified = unified.or(Some(PathBuf::from(point))),
            _ => {}
        }
    }
    unified.expect("no cgroup mount")
}

/// Whether `pid` is a `vmcri-vmm` whose command line names `needle`.
fn is_vmm_of(pid: i32, needle: &str) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd);
    cmd.contains("vmcri-vmm") && cmd.contains(needle)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn a_microvm_pods_vmm_is_confined_counted_and_cleaned_up_in_its_cgroup() {
    let s = Scratch::new("cgroups").unwrap();
    let daemon = process_daemon(&s.0, "");
    let logs = s.0.join("pod-logs");
    // kubelet's form, under a parent of this test's own.
    let top = format!("vmcri-e2e-{}", std::process::id());
    let parent = format!("/{top}/burstable/pod-uid-cg");
    let memory = cgroup_mount("memory");
    let v1 = memory != cgroup_mount("no-such-controller");
    let cpu = cgroup_mount("cpu");

    let runtime = rt();
    let (pod, cgroup) = runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let mut config = pod_config("cg", &logs);
        config.linux = Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: parent.clone(),
            // What kubelet sends for one container limited to 256 MiB and
            // half a CPU, with a RuntimeClass overhead of 32 MiB: below
            // the configured 128 MiB, which therefore applies.
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 256 * MIB,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                ..Default::default()
            }),
            overhead: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 32 * MIB,
                ..Default::default()
            }),
            ..Default::default()
        });
        // A systemd-driver parent is refused, saying why.
        let mut systemd = config.clone();
        if let Some(l) = systemd.linux.as_mut() {
            l.cgroup_parent = "kubepods-burstable-podx.slice".into();
        }
        let refused = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(systemd),
                runtime_handler: "vmcri".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("cgroupfs"), "{refused:?}");

        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "vmcri".into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let cgroup = format!("{}/vmcri-{pod}", parent.trim_start_matches('/'));

        // The VMM is in the pod cgroup, in every hierarchy, limited to the
        // pod's limits plus the overhead.
        let procs = read(&memory.join(&cgroup).join("cgroup.procs"));
        let pids: Vec<i32> = procs.lines().map(|l| l.parse().unwrap()).collect();
        assert!(
            pids.iter().any(|p| is_vmm_of(*p, &pod)),
            "no VMM of {pod} among {pids:?}"
        );
        if v1 {
            assert_eq!(
                read(&memory.join(&cgroup).join("memory.limit_in_bytes")),
                (384 * MIB).to_string()
            );
            assert_eq!(read(&cpu.join(&cgroup).join("cpu.cfs_quota_us")), "60000");
            assert_eq!(read(&cpu.join(&cgroup).join("cpu.shares")), "614");
            assert_eq!(read(&cpu.join(&cgroup).join("cgroup.procs")), procs);
        } else {
            assert_eq!(
                read(&memory.join(&cgroup).join("memory.max")),
                (384 * MIB).to_string()
            );
            assert_eq!(read(&memory.join(&cgroup).join("cpu.max")), "60000 100000");
        }

        // The pod's CPU and memory are the host's account of the VMM: a
        // booted guest has touched megabytes of its memory.
        let stats = rt
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("PodSandboxStats")
            .into_inner()
            .stats
            .unwrap()
            .linux
            .unwrap();
        let usage = stats.memory.unwrap().usage_bytes.unwrap().value;
        assert!(usage > 8 << 20, "memory usage {usage}");
        let charged: u64 = if v1 {
            read(&memory.join(&cgroup).join("memory.max_usage_in_bytes"))
                .parse()
                .unwrap()
        } else {
            u64::MAX
        };
        assert!(usage <= charged, "{usage} > the cgroup's peak {charged}");
        assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
        (pod, cgroup)
    });

    // kill -9 of the VMM (and anything else in its cgroup): the pod's
    // removal must still find and remove the cgroup.
    let procs = read(&memory.join(&cgroup).join("cgroup.procs"));
    for pid in procs.lines().map(|l| l.parse::<i32>().unwrap()) {
        // SAFETY: kill(2) of the test pod's own processes.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&memory.join(&cgroup).join("cgroup.procs")).is_empty() {
        assert!(Instant::now() < deadline, "the VMM did not die");
        std::thread::sleep(Duration::from_millis(50));
    }
    runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    for mount in [
        &memory,
        &cpu,
        &cgroup_mount("cpuacct"),
        &cgroup_mount("pids"),
    ] {
        let dir = mount.join(&cgroup);
        assert!(!dir.exists(), "{} is left", dir.display());
        // The parents are kubelet's to remove; here, the test's.
        let mut p = dir.parent().map(Path::to_path_buf);
        while let Some(d) = p.filter(|d| d.starts_with(mount.join(&top))) {
            let _ = std::fs::remove_dir(&d);
            p = d.parent().map(Path::to_path_buf);
        }
    }
}

/// The pod cgroup is a wall, not a label: a VMM that needs more memory
/// than the pod's limit plus the overhead is killed by the host kernel,
/// and RunPodSandbox says so (ResourceExhausted, naming the limit) and
/// leaves nothing behind. Here the limit, 16 MiB with no overhead, is
/// less than the guest kernel the VMM must load.
#[test]
fn a_vmm_that_outgrows_the_pods_memory_limit_is_killed_and_the_pod_says_why() {
    let s = Scratch::new("cgroups-oom").unwrap();
    let daemon = process_daemon_with(&s.0, "overhead_memory_mib = 0", "");
    let logs = s.0.join("pod-logs");
    let top = format!("vmcri-e2e-oom-{}", std::process::id());
    let parent = format!("/{top}/pod-uid-oom");
    let memory = cgroup_mount("memory");
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let mut config = pod_config("oom", &logs);
        config.linux = Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: parent.clone(),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 16 * MIB,
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "vmcri".into(),
            })
            .await
            .expect_err("a VMM limited to 16 MiB cannot load its guest");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("out of memory") && e.message().contains("16 MiB"),
            "{e:?}"
        );
        let left = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(left.is_empty(), "{left:?}");
    });
    // The pod cgroup went with the failed pod; the parents are the test's.
    let top_dir = memory.join(&top);
    let pods: Vec<_> = std::fs::read_dir(top_dir.join("pod-uid-oom"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(pods.is_empty(), "left behind: {pods:?}");
    let _ = std::fs::remove_dir(top_dir.join("pod-uid-oom"));
    let _ = std::fs::remove_dir(&top_dir);
}
