//! CRI plumbing shared by the end-to-end tests: a daemon with the process
//! backend by default and a microVM handler, a busybox image in a registry
//! on loopback, and short forms of the CRI calls.

use crate::registry::{
    busybox_layout, push, start_registry, start_registry_in_memory, Entry, Registry,
};
use crate::{artifacts, Daemon, Scratch};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The test image's config: a command, environment and working directory.
pub const IMAGE_CONFIG: &str = r#"{"Cmd":["sh","-c","echo from-image-cmd; exec sleep 3600"],"Env":["FROM_IMAGE=yes","PATH=/bin"],"WorkingDir":"/home/app"}"#;

/// A registry with the test image, and a daemon.
pub struct Setup {
    /// The registry the image is in.
    pub _registry: Registry,
    /// The daemon.
    pub daemon: Daemon,
    /// The image's reference.
    pub image: String,
    /// The scratch directory.
    pub dir: PathBuf,
}

/// The registry with the busybox image and a daemon using the process
/// backend by default (`vmcri` runs pods in microVMs).
pub fn setup(s: &Scratch) -> Setup {
    setup_with(s, "")
}

/// As [`setup`], with `extra` appended to the daemon's config.
pub fn setup_with(s: &Scratch, extra: &str) -> Setup {
    let registry = start_registry(&s.0);
    push(&test_image_layout(&s.0), registry.port, "busybox");
    let daemon = process_daemon(&s.0, extra);
    Setup {
        image: format!("127.0.0.1:{}/busybox:v1", registry.port),
        _registry: registry,
        daemon,
        dir: s.0.clone(),
    }
}

/// A daemon in `dir` using the process backend by default (`vmcri` runs
/// pods in microVMs), with `extra` appended to its config: for tests that
/// need no image.
pub fn process_daemon(dir: &Path, extra: &str) -> Daemon {
    process_daemon_with(dir, "", extra)
}

/// [`process_daemon`] with `microvm` added to its `[microvm]` table.
pub fn process_daemon_with(dir: &Path, microvm: &str, extra: &str) -> Daemon {
    let a = artifacts();
    Daemon::start(
        dir,
        &format!(
            "default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n[process]\nagent = \"{}\"\nboot_timeout_secs = 30\n[microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\n{microvm}\n[handlers.vmcri]\nbackend = \"microvm\"\nvcpus = 1\nmemory_mib = 256\n[agent]\nstop_timeout_secs = 5\ncall_timeout_secs = 180\n{extra}",
            a.agent.display(),
            a.kernel.display(),
            a.agent_initrd.display(),
            a.vmm.display(),
        ),
    )
}

/// The reference of the test image in a registry shared by the tests of
/// this process, for tests that only pull it: none of them starts a
/// registry or pushes. The registry starts on first use, from a thread
/// that lasts as long as the process, and dies with the process.
pub fn shared_test_image() -> String {
    static PORT: OnceLock<u16> = OnceLock::new();
    let port = *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let s = Scratch::new("shared-registry").unwrap();
            let registry = start_registry_in_memory(&s.0);
            push(&test_image_layout(&s.0), registry.port, "busybox");
            tx.send(registry.port).unwrap();
            // Its config is read and the image held in memory.
            drop(s);
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared registry did not start")
    });
    format!("127.0.0.1:{port}/busybox:v1")
}

/// The test image's OCI layout, written to `dir`. Its files are built once
/// per test process (compressing busybox takes a while in a debug build)
/// and copied for every later setup.
fn test_image_layout(dir: &Path) -> PathBuf {
    static FILES: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    let layout = dir.join("layout");
    let files = FILES.get_or_init(|| {
        let built = busybox_layout(
            dir,
            &[Entry::File("etc/image-file", b"from the image\n", 0o644)],
            IMAGE_CONFIG,
        );
        let blobs = std::fs::read_dir(built.join("blobs/sha256"))
            .unwrap()
            .map(|e| Path::new("blobs/sha256").join(e.unwrap().file_name()));
        ["index.json", "oci-layout"]
            .into_iter()
            .map(PathBuf::from)
            .chain(blobs)
            .map(|rel| {
                let data = std::fs::read(built.join(&rel)).unwrap();
                (rel, data)
            })
            .collect()
    });
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    for (rel, data) in files {
        std::fs::write(layout.join(rel), data).unwrap();
    }
    layout
}

/// Two host directories for volumes: `data` (with `file` holding
/// `content`) and an empty `rw`.
pub fn host_volumes(dir: &Path, content: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let rw = dir.join("rw");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(data.join("file"), content).unwrap();
    (data, rw)
}

/// CRI clients of `d`.
pub async fn clients(d: &Daemon) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    let ch = d.channel().await;
    (
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    )
}

/// Pulls `image`.
pub async fn pull(images: &mut ImageServiceClient<Channel>, image: &str) {
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("PullImage");
}

/// A multi-threaded runtime for a test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A pod config logging to `logs`, with DNS settings.
pub fn pod_config(name: &str, logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        ..Default::default()
    }
}

/// Runs a pod with the default handler.
pub async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, name: &str, logs: &Path) -> String {
    run_pod_with(rt, name, logs, "").await
}

/// Runs a pod with `handler`.
pub async fn run_pod_with(
    rt: &mut RuntimeServiceClient<Channel>,
    name: &str,
    logs: &Path,
    handler: &str,
) -> String {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(pod_config(name, logs)),
        runtime_handler: handler.into(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// A container config running `command`, logging to `<name>/0.log`.
pub fn container(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// Creates a container in `pod`.
pub async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: cri::ContainerConfig,
    logs: &Path,
) -> Result<String, tonic::Status> {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config("unused", logs)),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// Creates a container in `pod` and starts it; its ID.
pub async fn create_started(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: cri::ContainerConfig,
    logs: &Path,
) -> String {
    let id = create(rt, pod, config, logs)
        .await
        .expect("CreateContainer");
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

/// ContainerStatus.
pub async fn cstatus(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<cri::ContainerStatus, tonic::Status> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .map(|r| r.into_inner().status.expect("status"))
}

/// ExecSync with a timeout in seconds.
pub async fn exec(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .map(|r| r.into_inner())
}

/// Deadline for what a microVM does slowly on nested hosts.
pub const SLOW: Duration = Duration::from_secs(180);

/// Waits (up to [`SLOW`]) for container `id` to reach `state`.
pub async fn wait_state(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: cri::ContainerState,
) -> cri::ContainerStatus {
    let deadline = Instant::now() + SLOW;
    loop {
        let s = cstatus(rt, id).await.expect("ContainerStatus");
        if s.state == state as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} never reached {state:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to [`SLOW`]) for the log at `path` to contain `needle`.
pub async fn wait_for_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + SLOW;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks every line is `<RFC3339Nano> <stream> <P|F> <text>` and returns
/// (stream, tag, text) triples.
pub fn parse_cri_log(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next().unwrap();
            assert!(
                ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "timestamp {ts:?} in {l:?}"
            );
            let stream = it.next().unwrap().to_string();
            assert!(stream == "stdout" || stream == "stderr", "{l:?}");
            let tag = it.next().unwrap().to_string();
            assert!(tag == "P" || tag == "F", "{l:?}");
            (stream, tag, it.next().unwrap_or("").to_string())
        })
        .collect()
}
