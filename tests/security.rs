//! The host against a hostile guest and curious local users, through
//! `vmcri serve` and a real microVM:
//! - a privileged container mounts the pod's virtio-fs share itself and
//!   tries to plant symlinks where the runtime binds next, to write
//!   where only the host writes, and builds deep trees and links to host
//!   files in its writable volume; the next container creation and the
//!   pod's removal touch nothing outside the pod's directories;
//! - an unprivileged local user can list no pod's files, read no volume
//!   and run no image's setuid binary;
//! - a daemon killed with `kill -9` while a microVM boots leaves, after a
//!   restart and RemovePodSandbox, no VMM, no mount and no directory.

use k8s_cri::v1 as cri;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmcri_tests::pods::*;
use vmcri_tests::registry::{busybox_layout, push, Entry};
use vmcri_tests::Scratch;

/// Mount points (from mountinfo) at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(dir))
        })
        .map(str::to_string)
        .collect()
}

/// Mounts (mountinfo lines) under `dir` other than the daemon's own
/// private `<root>/sandboxes` and `<root>/netns` mounts, which live as
/// long as the root.
fn pod_mounts(dir: &Path, root: &Path) -> Vec<String> {
    let own = [root.join("sandboxes"), root.join("netns")];
    mounts_under(dir)
        .into_iter()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_none_or(|m| !own.iter().any(|o| Path::new(m) == o))
        })
        .collect()
}

/// The permission bits of `p`.
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// PIDs of `vmcri-vmm` processes whose command line mentions `dir`.
fn vmms_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("vmcri-vmm") && cmd.contains(&needle)
        })
        .collect()
}

/// Runs `sh -c script` as the unprivileged user 65534; true if it
/// succeeded.
fn as_nobody(script: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run sh as nobody")
        .status
        .success()
}

/// Runs `sh -c script` as root; true if it succeeded.
fn as_root(script: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .expect("run sh")
        .success()
}

/// The one sandbox directory under the daemon's root.
fn sandbox_dir(root: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.remove(0)
}

/// What the hostile container runs: it mounts the share itself and tries
/// every write the host must not let it make, printing a marker for each
/// that worked; then it fills its writable volume with a deep tree and
/// links to host paths, which the host must never follow.
const HOSTILE: &str = r#"
mkdir -p /m && mount -t virtiofs vmcri /m && echo MOUNTED
ls /m/layers /m/containers /m/etc >/dev/null && echo LISTED
for c in $NEXT; do ln -s "$CANARY" "/m/layers/$c" 2>/dev/null && echo "BREACH planted $c"; done
mkdir "/m/layers/$FIRST/x" 2>/dev/null && echo "BREACH wrote into a layer"
touch /m/evil 2>/dev/null && echo "BREACH wrote the top"
mkdir /m/containers/evil 2>/dev/null && echo "BREACH wrote containers/"
ln -s "$CANARY_FILE" /m/etc/evil 2>/dev/null && echo "BREACH wrote etc/"
echo x > /m/etc/hosts 2>/dev/null && echo "BREACH rewrote etc/hosts"
mkdir -p "/rw/$DEEP" && echo DEEP
ln -s "$CANARY_FILE" /rw/link && ln -s / /rw/root && ln -s "$CANARY" "/rw/$DEEP/link" && echo LINKED
mknod /rw/null c 1 3 2>/dev/null && echo "BREACH made a device node"
touch /rw/suid && chmod 4755 /rw/suid 2>/dev/null && echo "BREACH made a setuid file"
if command -v setfattr >/dev/null; then
  setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= /rw/suid 2>/dev/null && echo "BREACH wrote security.capability"
fi
mkfifo /rw/fifo && echo FIFO
echo HOSTILE-DONE
exec sleep 3600
"#;

/// A privileged container as a hostile guest against its pod's share,
/// and an unprivileged local user against the pod's files on the host.
#[test]
fn a_hostile_guest_and_local_users_reach_nothing_outside_the_pod() {
    let s = Scratch::new("security-share").unwrap();
    let setup = setup(&s);
    let root = setup.dir.join("root");
    let logs = setup.dir.join("pod-logs");
    let (data, rw) = host_volumes(&setup.dir, "secret token\n");
    // Host paths the guest aims at.
    let canary = setup.dir.join("canary");
    std::fs::create_dir(&canary).unwrap();
    let canary_file = setup.dir.join("canary-file");
    std::fs::write(&canary_file, "keep").unwrap();
    // A second image, whose layer the runtime binds only later.
    let second = setup.dir.join("second");
    std::fs::create_dir(&second).unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let layout = busybox_layout(
        &second,
        &[
            Entry::File("etc/second", b"second image\n", 0o644),
            Entry::File("bin/suid-sh", &busybox, 0o4755),
        ],
        IMAGE_CONFIG,
    );
    push(&layout, setup._registry.port, "second");
    let second_image = format!("127.0.0.1:{}/second:v1", setup._registry.port);
    // Each level costs the emulated guest kernel about a second here; the
    // 20,000-deep removal is a unit test (runtime/src/hostfs/remove.rs).
    let deep = ["d"; 8].join("/");

    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let first_layers: Vec<String> = std::fs::read_dir(root.join("content/layers"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        pull(&mut images, &second_image).await;
        let next: Vec<String> = std::fs::read_dir(root.join("content/layers"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !first_layers.contains(n))
            .collect();
        assert!(!next.is_empty(), "the second image adds a layer");

        let pod = run_pod_with(&mut rt, "hostile", &logs, "vmcri").await;
        let mut c = container("hostile", &setup.image, &["sh", "-c", HOSTILE]);
        c.envs = [
            ("NEXT", next.join(" ")),
            ("FIRST", first_layers.join(" ")),
            ("CANARY", canary.display().to_string()),
            ("CANARY_FILE", canary_file.display().to_string()),
            ("DEEP", deep.clone()),
        ]
        .into_iter()
        .map(|(k, v)| cri::KeyValue {
            key: k.into(),
            value: v,
        })
        .collect();
        c.mounts = vec![cri::Mount {
            container_path: "/rw".into(),
            host_path: rw.display().to_string(),
            ..Default::default()
        }];
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let hostile = create(&mut rt, &pod, c, &logs).await.expect("create");
        rt.start_container(cri::StartContainerRequest {
            container_id: hostile.clone(),
        })
        .await
        .expect("start");
        let log = wait_for_log(&logs.join("hostile/0.log"), "HOSTILE-DONE").await;
        // The attack really ran: the share was mounted and listed, and the
        // writable volume took the deep tree and the links.
        for step in ["MOUNTED", "LISTED", "DEEP", "LINKED", "FIFO"] {
            assert!(log.contains(step), "{step} missing:\n{log}");
        }
        assert!(!log.contains("BREACH"), "{log}");

        // The next creation binds the layer the guest aimed at, and a
        // volume; both land inside the pod's directories only.
        let mut c2 = container(
            "second",
            &second_image,
            &["sh", "-c", "cat /etc/second; exec sleep 3600"],
        );
        c2.mounts = vec![cri::Mount {
            container_path: "/data".into(),
            host_path: data.display().to_string(),
            readonly: true,
            ..Default::default()
        }];
        let second_id = create(&mut rt, &pod, c2, &logs)
            .await
            .expect("create the second");
        rt.start_container(cri::StartContainerRequest {
            container_id: second_id.clone(),
        })
        .await
        .expect("start the second");
        wait_for_log(&logs.join("second/0.log"), "second image").await;
        assert_eq!(std::fs::read_dir(&canary).unwrap().count(), 0);
        assert_eq!(std::fs::read_to_string(&canary_file).unwrap(), "keep");
        let sandbox = sandbox_dir(&root);
        let ours = pod_mounts(&setup.dir, &root);
        assert!(!ours.is_empty());
        for m in &ours {
            let point = m.split(' ').nth(4).unwrap();
            assert!(
                Path::new(point).starts_with(&sandbox),
                "a mount outside the pod: {m}"
            );
            let opts: Vec<&str> = m.split(' ').nth(5).unwrap().split(',').collect();
            for flag in ["nosuid", "nodev"] {
                assert!(opts.contains(&flag), "{flag} missing: {m}");
            }
        }

        // Local users: root can reach these files, nobody cannot.
        let view = sandbox.join("shared");
        let layer_dirs: Vec<PathBuf> = next.iter().map(|c| view.join("layers").join(c)).collect();
        let suid = layer_dirs
            .iter()
            .map(|d| d.join("bin/suid-sh"))
            .find(|p| p.exists())
            .expect("the setuid binary is in the share");
        let volume = std::fs::read_dir(view.join("containers"))
            .unwrap()
            .flatten()
            .map(|e| e.path().join("0/file"))
            .find(|p| p.exists())
            .expect("the volume is in the share");
        let checks = [
            format!("ls {}", root.display()),
            format!("ls {}", view.display()),
            format!("cat {}", volume.display()),
            format!("{} -c 'id -u'", suid.display()),
            format!("ls {}", root.join("content").display()),
        ];
        for c in &checks[..3] {
            assert!(as_root(c), "root cannot {c}: the check proves nothing");
        }
        assert!(as_nobody("true"), "cannot run anything as nobody");
        for c in &checks {
            assert!(!as_nobody(c), "an unprivileged user could {c}");
        }
        // Each wall on its own, not only the root's: every level is
        // private to root, and the binds are nosuid (checked above).
        for dir in [
            root.clone(),
            root.join("sandboxes"),
            sandbox.clone(),
            sandbox.join("mounts"),
            view.clone(),
            root.join("run"),
        ] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }

        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("RemovePodSandbox");
        rt.version(cri::VersionRequest::default())
            .await
            .expect("the daemon is still up");
    });
    // Nothing of the pod is left, and nothing of the host was touched: the
    // volume keeps the guest's tree and links, their targets their data.
    let left = pod_mounts(&setup.dir, &root);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        std::fs::read_dir(root.join("sandboxes")).unwrap().count(),
        0
    );
    assert_eq!(std::fs::read_dir(&canary).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(&canary_file).unwrap(), "keep");
    assert_eq!(
        std::fs::read_to_string(data.join("file")).unwrap(),
        "secret token\n"
    );
    assert!(
        rw.join(&deep).is_dir(),
        "the guest's tree in the volume is the host's to keep"
    );
    assert!(std::fs::symlink_metadata(rw.join("link")).is_ok());
    // virtio-fs made no device node and no setuid file on the host; a
    // FIFO (a positive control) it did make.
    assert!(std::fs::symlink_metadata(rw.join("null")).is_err());
    let suid = std::fs::metadata(rw.join("suid")).expect("the guest's plain file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&suid.permissions()) & 0o6000,
        0
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(rw.join("fifo"))
            .unwrap()
            .file_type()
    ));
}

/// `kill -9` of the daemon while a microVM boots: the restarted daemon
/// ends the VMM, and RemovePodSandbox leaves no process, mount or
/// directory.
#[test]
fn a_daemon_killed_during_a_boot_leaks_no_vmm_mount_or_directory() {
    let s = Scratch::new("security-kill9").unwrap();
    let mut setup = setup(&s);
    let root = setup.dir.join("root");
    let logs = setup.dir.join("pod-logs");
    let runtime = rt();
    let socket = setup.daemon.socket.clone();
    // RunPodSandbox in the background: it will never get its answer.
    let booting = runtime.spawn(async move {
        let ch = vmcri_tests::unix_channel(&socket).await;
        let mut rt = k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(ch);
        let _ = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config("booting", &logs)),
                runtime_handler: "vmcri".into(),
            })
            .await;
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while vmms_under(&root).is_empty() {
        assert!(Instant::now() < deadline, "no VMM started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmm = vmms_under(&root);
    setup.daemon.kill9();
    // The share was set up before the VMM started: there is something
    // to clean up.
    assert!(!pod_mounts(&setup.dir, &root).is_empty());
    runtime.block_on(async {
        let _ = booting.await;
    });
    setup.daemon.restart();
    runtime.block_on(async {
        let (mut rt, _) = clients(&setup.daemon).await;
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert_eq!(pods[0].state, cri::PodSandboxState::SandboxNotready as i32);
        // Recovery ended the VMM nobody waits for (it may take a moment
        // to exit on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(60);
        while vmm.iter().any(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vmcri-vmm"))
        }) {
            assert!(
                Instant::now() < deadline,
                "VMM {vmm:?} survived the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pods[0].id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    assert!(vmms_under(&root).is_empty());
    let left = pod_mounts(&setup.dir, &root);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        std::fs::read_dir(root.join("sandboxes")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(root.join("run"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}
