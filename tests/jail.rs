//! A microVM pod's VMM, seen from the host: jailed (its own mount and PID
//! namespaces, a root holding only its VM's files), seccomp-filtered per
//! thread, with no new privileges and only the capabilities virtio-fs
//! needs; and a syscall outside a thread's allowlist ends the pod, which
//! then says why.

use k8s_cri::v1 as cri;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use vmcri_tests::pods::*;
use vmcri_tests::Scratch;

/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID.
const FS_CAPS: u64 = 0xdb;

/// The VMM processes of `pod`: (keeper, jailed), told apart by their PID
/// namespaces (the jailed one is PID 1 of its own).
fn vmm_of(pod: &str) -> (i32, i32) {
    let mut keeper = None;
    let mut jailed = None;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !(cmd.contains("vmcri-vmm") && cmd.contains(pod)) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        match field(&status, "NSpid").split_whitespace().count() {
            1 => keeper = Some(pid),
            2 => jailed = Some(pid),
            n => panic!("VMM {pid} in {n} PID namespaces"),
        }
    }
    (
        keeper.expect("no keeper VMM process"),
        jailed.expect("no jailed VMM process"),
    )
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in status"))
        .trim()
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_microvm_pods_vmm_runs_jailed_filtered_and_with_few_capabilities() {
    let s = Scratch::new("jail").unwrap();
    let daemon = process_daemon(&s.0, "");
    let logs = s.0.join("pod-logs");
    let runtime = rt();
    let pod = runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        run_pod_with(&mut rt, "jailed", &logs, "vmcri").await
    });
    let (keeper, vmm) = vmm_of(&pod);

    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert_eq!(field(&status, "Seccomp"), "2", "filter mode");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let caps = u64::from_str_radix(field(&status, set), 16).unwrap();
        assert_eq!(caps, FS_CAPS, "{set} {caps:#x}");
    }
    assert_eq!(field(&status, "CapInh"), "0000000000000000");
    assert_eq!(field(&status, "CapAmb"), "0000000000000000");
    // The keeper, which runs nothing of the guest's, has nothing.
    let keeper_status = std::fs::read_to_string(format!("/proc/{keeper}/status")).unwrap();
    assert_eq!(field(&keeper_status, "CapEff"), "0000000000000000");

    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        assert_ne!(ours, its, "the VMM shares the host's {ns} namespace");
    }

    // Its root holds its VM's files and nothing else.
    let root = Path::new("/proc").join(vmm.to_string()).join("root");
    let expected: BTreeSet<String> = [
        "console.log",
        "dev",
        "initrd",
        "kernel",
        "proc",
        "share",
        "vsock",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names(&root), expected);
    let dev = names(&root.join("dev"));
    assert!(dev.contains("kvm"), "{dev:?}");
    for d in &dev {
        assert!(
            ["kvm", "null", "urandom", "net"].contains(&d.as_str()),
            "/dev/{d}"
        );
    }
    let proc = names(&root.join("proc"));
    for hidden in ["sys", "kcore", "kallsyms", "mounts"] {
        assert!(
            !proc.contains(hidden),
            "/proc/{hidden} is visible: {proc:?}"
        );
    }
    assert!(
        std::fs::write(root.join("planted"), b"x").is_err(),
        "the jail's root is read-only"
    );

    // Devices run on threads of their own, off the vCPU.
    let threads: BTreeSet<String> = std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    for t in ["vcpu0", "rng", "vsock", "fs0"] {
        assert!(threads.contains(t), "no thread {t}: {threads:?}");
    }

    runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    assert!(
        !Path::new(&format!("/proc/{keeper}")).exists(),
        "keeper left"
    );
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "VMM left");
}

/// mkdirat(2), which the virtio-fs thread makes when the guest creates a
/// directory in a writable volume.
const SYS_MKDIRAT: i64 = 258;

#[test]
fn a_syscall_outside_a_threads_allowlist_ends_the_pod_with_the_reason() {
    let s = Scratch::new("seccomp-kill").unwrap();
    // The VMM's fs thread is refused mkdirat, as if its list lacked it.
    std::env::set_var("VMCRI_VMM_SECCOMP_DENY", format!("fs:{SYS_MKDIRAT}"));
    let daemon = process_daemon(&s.0, "");
    std::env::remove_var("VMCRI_VMM_SECCOMP_DENY");
    let logs = s.0.join("pod-logs");
    let image = shared_test_image();
    let (_, rw) = host_volumes(&s.0, "");
    let runtime = rt();
    runtime.block_on(async {
        let (mut rt, mut images) = clients(&daemon).await;
        pull(&mut images, &image).await;
        let pod = run_pod_with(&mut rt, "refused", &logs, "vmcri").await;
        let mut config = container("mk", &image, &["sh", "-c", "mkdir /rw/dir; sleep 600"]);
        config.mounts = vec![cri::Mount {
            container_path: "/rw".into(),
            host_path: rw.display().to_string(),
            ..Default::default()
        }];
        let id = create(&mut rt, &pod, config, &logs)
            .await
            .expect("CreateContainer");
        // The VMM may die before StartContainer has its answer.
        let _ = rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await;
        let deadline = Instant::now() + SLOW;
        let reason = loop {
            let status = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: true,
                })
                .await
                .expect("PodSandboxStatus")
                .into_inner();
            let state = status.status.as_ref().map(|s| s.state);
            if state == Some(cri::PodSandboxState::SandboxNotready as i32) {
                let info: serde_json::Value =
                    serde_json::from_str(&status.info["info"]).expect("verbose info");
                break info["reason"].as_str().unwrap_or_default().to_string();
            }
            assert!(Instant::now() < deadline, "the pod never became NOTREADY");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(reason.contains("SIGSYS"), "{reason}");
        assert!(reason.contains("seccomp"), "{reason}");
        assert!(!rw.join("dir").exists(), "the refused mkdir happened");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
}
