//! The CRI rules, driven through the tonic services exactly as kubelet
//! calls them, over the real services and store and a fake backend: no
//! VM, no host process, seconds for the lot.

use crate::testing::daemon::{Daemon, Root, IMAGE};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Request};

fn pod(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        labels: HashMap::from([("app".into(), name.into())]),
        ..Default::default()
    }
}

fn container(name: &str, attempt: u32) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "infinity".into()],
        labels: HashMap::from([("ctr".into(), name.into())]),
        ..Default::default()
    }
}

async fn run(d: &Daemon, name: &str) -> String {
    run_config(d, pod(name)).await.expect("RunPodSandbox")
}

async fn run_config(d: &Daemon, config: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    let req = cri::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    };
    Ok(d.cri
        .run_pod_sandbox(Request::new(req))
        .await?
        .into_inner()
        .pod_sandbox_id)
}

async fn create(
    d: &Daemon,
    sandbox: &str,
    config: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    let req = cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.into(),
        config: Some(config),
        sandbox_config: Some(pod("unused")),
    };
    Ok(d.cri
        .create_container(Request::new(req))
        .await?
        .into_inner()
        .container_id)
}

async fn start(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let req = cri::StartContainerRequest {
        container_id: id.into(),
    };
    d.cri.start_container(Request::new(req)).await.map(|_| ())
}

async fn stop_pod(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let req = cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    d.cri.stop_pod_sandbox(Request::new(req)).await.map(|_| ())
}

async fn remove_pod(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let req = cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    };
    d.cri
        .remove_pod_sandbox(Request::new(req))
        .await
        .map(|_| ())
}

async fn pod_status(d: &Daemon, id: &str) -> Result<cri::PodSandboxStatus, tonic::Status> {
    let req = cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    };
    Ok(d.cri
        .pod_sandbox_status(Request::new(req))
        .await?
        .into_inner()
        .status
        .expect("a status"))
}

async fn status(d: &Daemon, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
    let req = cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    };
    Ok(d.cri
        .container_status(Request::new(req))
        .await?
        .into_inner()
        .status
        .expect("a status"))
}

async fn stop(d: &Daemon, id: &str, timeout: i64) -> Result<(), tonic::Status> {
    let req = cri::StopContainerRequest {
        container_id: id.into(),
        timeout,
    };
    d.cri.stop_container(Request::new(req)).await.map(|_| ())
}

async fn remove(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    let req = cri::RemoveContainerRequest {
        container_id: id.into(),
    };
    d.cri.remove_container(Request::new(req)).await.map(|_| ())
}

async fn exec_sync(
    d: &Daemon,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    let req = cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    };
    Ok(d.cri.exec_sync(Request::new(req)).await?.into_inner())
}

/// How long a test waits for what the fake agent does at once: generous,
/// so a loaded machine (VMs booting beside the tests) fails nothing.
const PATIENCE: Duration = Duration::from_secs(60);

/// Waits (bounded by [`PATIENCE`]) until container `id` reports `state`.
async fn wait_state(d: &Daemon, id: &str, state: cri::ContainerState) -> cri::ContainerStatus {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let s = status(d, id).await.expect("ContainerStatus");
        if s.state == state as i32 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("container {id} never reached {state:?}");
}

const READY: i32 = cri::PodSandboxState::SandboxReady as i32;
const NOT_READY: i32 = cri::PodSandboxState::SandboxNotready as i32;

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call must fail").code()
}

#[tokio::test]
async fn stop_and_remove_of_a_pod_are_idempotent() {
    let d = Daemon::start().await;
    let id = run(&d, "web").await;
    assert_eq!(pod_status(&d, &id).await.unwrap().state, READY);
    stop_pod(&d, &id).await.unwrap();
    stop_pod(&d, &id).await.unwrap();
    let s = pod_status(&d, &id).await.unwrap();
    assert_eq!(s.state, NOT_READY);
    remove_pod(&d, &id).await.unwrap();
    remove_pod(&d, &id).await.unwrap();
    assert_eq!(code(pod_status(&d, &id).await), Code::NotFound);
    // Unknown: already gone.
    remove_pod(&d, &"f".repeat(64)).await.unwrap();
    // Removing a ready pod stops it (and its agent) first.
    let id = run(&d, "web").await;
    remove_pod(&d, &id).await.unwrap();
    assert!(d.backend.exposed(&id).is_empty());
}

#[tokio::test]
async fn pod_names_are_reserved_until_the_pod_is_removed() {
    let d = Daemon::start().await;
    let id = run(&d, "web").await;
    let again = run_config(&d, pod("web")).await;
    assert_eq!(code(again), Code::AlreadyExists);
    // Stopped still holds the name; removed frees it.
    stop_pod(&d, &id).await.unwrap();
    assert_eq!(code(run_config(&d, pod("web")).await), Code::AlreadyExists);
    remove_pod(&d, &id).await.unwrap();
    run(&d, "web").await;
    // Another attempt is another pod.
    let mut next = pod("web");
    next.metadata.as_mut().unwrap().attempt = 1;
    run_config(&d, next).await.unwrap();
}

#[tokio::test]
async fn a_pod_that_fails_to_start_leaves_nothing_and_can_be_retried() {
    let d = Daemon::start().await;
    d.backend.fail_next_start("no kernel");
    let failed = run_config(&d, pod("web")).await;
    assert_eq!(code(failed), Code::Unavailable);
    let list = d
        .cri
        .list_pod_sandbox(Request::new(cri::ListPodSandboxRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.items.is_empty());
    run(&d, "web").await;
}

#[tokio::test]
async fn container_names_are_reserved_per_pod_and_attempt() {
    let d = Daemon::start().await;
    let (a, b) = (run(&d, "a").await, run(&d, "b").await);
    let c = create(&d, &a, container("app", 0)).await.unwrap();
    assert_eq!(
        code(create(&d, &a, container("app", 0)).await),
        Code::AlreadyExists
    );
    create(&d, &a, container("app", 1)).await.unwrap();
    create(&d, &b, container("app", 0)).await.unwrap();
    remove(&d, &c).await.unwrap();
    create(&d, &a, container("app", 0)).await.unwrap();
}

#[tokio::test]
async fn container_state_errors_and_idempotent_stop_and_remove() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    assert_eq!(d.backend.exposed(&pod_id), vec![id.clone()]);
    // Not running yet: no exec.
    assert_eq!(
        code(exec_sync(&d, &id, &["true"], 0).await),
        Code::FailedPrecondition
    );
    start(&d, &id).await.unwrap();
    assert_eq!(code(start(&d, &id).await), Code::FailedPrecondition);
    assert_eq!(
        status(&d, &id).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    // It exits by itself; the exit is recorded with its code.
    d.backend.with_agent(&pod_id, |a| a.exit(&id, 3));
    let s = wait_state(&d, &id, cri::ContainerState::ContainerExited).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
    stop(&d, &id, 10).await.unwrap();
    remove(&d, &id).await.unwrap();
    remove(&d, &id).await.unwrap();
    assert_eq!(code(status(&d, &id).await), Code::NotFound);
    assert!(d.backend.exposed(&pod_id).is_empty());
    // A stopped pod takes no container.
    stop_pod(&d, &pod_id).await.unwrap();
    assert_eq!(
        code(create(&d, &pod_id, container("late", 0)).await),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_timeout() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let polite = create(&d, &pod_id, container("polite", 0)).await.unwrap();
    let stubborn = create(&d, &pod_id, container("stubborn", 0)).await.unwrap();
    d.backend
        .with_agent(&pod_id, |a| a.ignore_sigterm(&stubborn));
    for id in [&polite, &stubborn] {
        start(&d, id).await.unwrap();
    }
    stop(&d, &polite, 30).await.unwrap();
    assert_eq!(status(&d, &polite).await.unwrap().exit_code, 128 + 15);
    stop(&d, &stubborn, 1).await.unwrap();
    assert_eq!(status(&d, &stubborn).await.unwrap().exit_code, 128 + 9);
}

#[tokio::test]
async fn stopping_a_pod_ends_its_containers() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    start(&d, &id).await.unwrap();
    stop_pod(&d, &pod_id).await.unwrap();
    let s = status(&d, &id).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    remove_pod(&d, &pod_id).await.unwrap();
    assert_eq!(code(status(&d, &id).await), Code::NotFound);
}

#[tokio::test]
async fn exec_sync_returns_output_and_exit_code_and_keeps_its_deadline() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    start(&d, &id).await.unwrap();
    let r = exec_sync(&d, &id, &["echo", "hello"], 0).await.unwrap();
    assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hello\n"[..], 0));
    assert_eq!(
        exec_sync(&d, &id, &["false"], 0).await.unwrap().exit_code,
        1
    );
    assert_eq!(
        code(exec_sync(&d, &id, &["sleep", "30"], 1).await),
        Code::DeadlineExceeded
    );
    assert_eq!(
        code(exec_sync(&d, &id, &[""], 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(exec_sync(&d, &id, &["true"], -1).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn a_sandboxs_calls_and_streams_share_one_agent_channel() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    start(&d, &id).await.unwrap();
    for _ in 0..5 {
        exec_sync(&d, &id, &["true"], 0).await.unwrap();
    }
    let stats = cri::ContainerStatsRequest {
        container_id: id.clone(),
    };
    d.cri.container_stats(Request::new(stats)).await.unwrap();
    // Create, start, the supervisor's wait and output stream, five
    // execs and stats: one connection.
    assert_eq!(d.backend.dials(), 1);
    // A stopped sandbox's channel is gone with it; another pod has its own.
    stop_pod(&d, &pod_id).await.unwrap();
    let other = run(&d, "other").await;
    let c = create(&d, &other, container("app", 0)).await.unwrap();
    start(&d, &c).await.unwrap();
    assert_eq!(d.backend.dials(), 2);
}

/// An exec stream's pace is its remote client's: it gets a connection of
/// its own, and a client that stops reading holds up nothing else.
#[tokio::test]
async fn an_exec_stream_has_its_own_connection_and_a_stalled_client_holds_up_no_call() {
    use vmcri_streaming::Handler;
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    start(&d, &id).await.unwrap();
    let dials = d.backend.dials();
    let handler = crate::streams::StreamHandler::new(d.containers.clone());
    // Ten MiB of output for a client that never reads.
    let big = "x".repeat(10 << 20);
    d.backend.with_agent(&pod_id, |a| {
        a.set_exec_script(move |args| crate::testing::agent::Script {
            stdout: if args.first().is_some_and(|a| a == "flood") {
                big.clone().into_bytes()
            } else {
                Vec::new()
            },
            ..Default::default()
        })
    });
    // Three clients that never read: on one shared connection their
    // unread output (a stream window each) would hold its whole window.
    let mut stalled = Vec::new();
    let mut unread = Vec::new();
    for _ in 0..3 {
        let (stdout, rx) = tokio::sync::mpsc::channel(1);
        unread.push(rx);
        let io = vmcri_streaming::Io {
            stdin: None,
            stdout: Some(stdout),
            stderr: None,
            resize: None,
        };
        let req = vmcri_streaming::ExecRequest {
            container_id: id.clone(),
            cmd: vec!["flood".into()],
            tty: false,
            stdin: false,
            stdout: true,
            stderr: false,
        };
        stalled.push(tokio::spawn(handler.exec(req, io)));
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while d.backend.dials() < dials + 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.backend.dials(), dials + 3);
    // Let the floods fill what windows they can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stalled.iter().all(|t| !t.is_finished()));
    // The pod's channel still carries calls.
    for _ in 0..3 {
        let r = tokio::time::timeout(PATIENCE, exec_sync(&d, &id, &["true"], 0));
        r.await.expect("ExecSync is not held up").unwrap();
    }
    for t in stalled {
        t.abort();
    }
}

#[tokio::test]
async fn lists_filter_by_id_prefix_state_and_labels() {
    let d = Daemon::start().await;
    let (a, b) = (run(&d, "a").await, run(&d, "b").await);
    stop_pod(&d, &b).await.unwrap();
    let pods = |filter: cri::PodSandboxFilter| {
        let cri = d.cri.clone();
        async move {
            let req = cri::ListPodSandboxRequest {
                filter: Some(filter),
            };
            let items = cri
                .list_pod_sandbox(Request::new(req))
                .await
                .unwrap()
                .into_inner()
                .items;
            items.into_iter().map(|p| p.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        pods(cri::PodSandboxFilter::default()).await,
        vec![a.clone(), b.clone()]
    );
    let by_prefix = cri::PodSandboxFilter {
        id: a[..12].into(),
        ..Default::default()
    };
    assert_eq!(pods(by_prefix).await, vec![a.clone()]);
    let ready = cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue { state: READY }),
        ..Default::default()
    };
    assert_eq!(pods(ready).await, vec![a.clone()]);
    let labelled = cri::PodSandboxFilter {
        label_selector: HashMap::from([("app".into(), "b".into())]),
        ..Default::default()
    };
    assert_eq!(pods(labelled).await, vec![b.clone()]);

    let c1 = create(&d, &a, container("one", 0)).await.unwrap();
    let c2 = create(&d, &a, container("two", 0)).await.unwrap();
    start(&d, &c2).await.unwrap();
    let containers = |filter: cri::ContainerFilter| {
        let cri = d.cri.clone();
        async move {
            let req = cri::ListContainersRequest {
                filter: Some(filter),
            };
            let list = cri
                .list_containers(Request::new(req))
                .await
                .unwrap()
                .into_inner();
            list.containers
                .into_iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        containers(cri::ContainerFilter::default()).await,
        vec![c1.clone(), c2.clone()]
    );
    let running = cri::ContainerFilter {
        state: Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    };
    assert_eq!(containers(running).await, vec![c2.clone()]);
    let labelled = cri::ContainerFilter {
        label_selector: HashMap::from([("ctr".into(), "one".into())]),
        ..Default::default()
    };
    assert_eq!(containers(labelled).await, vec![c1.clone()]);
    let in_b = cri::ContainerFilter {
        pod_sandbox_id: b.clone(),
        ..Default::default()
    };
    assert!(containers(in_b).await.is_empty());
}

/// Every RPC that names a sandbox or container answers InvalidArgument
/// for an empty or ambiguous ID, NotFound for an unknown one.
#[tokio::test]
async fn every_rpc_maps_bad_ids_to_their_codes() {
    let d = Daemon::start().await;
    let unknown = "0".repeat(64);
    /// The code a call answered, Ok included.
    fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    for (id, want) in [
        (String::new(), Code::InvalidArgument),
        (unknown.clone(), Code::NotFound),
    ] {
        macro_rules! check {
            ($rpc:ident, $req:expr) => {
                let got = code_of(d.cri.$rpc(Request::new($req)).await);
                assert_eq!(got, want, "{} of {id:?}", stringify!($rpc));
            };
        }
        check!(
            pod_sandbox_status,
            cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            }
        );
        check!(
            stop_pod_sandbox,
            cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }
        );
        check!(
            port_forward,
            cri::PortForwardRequest {
                pod_sandbox_id: id.clone(),
                port: vec![80],
            }
        );
        check!(
            pod_sandbox_stats,
            cri::PodSandboxStatsRequest {
                pod_sandbox_id: id.clone(),
            }
        );
        check!(
            create_container,
            cri::CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                config: Some(container("x", 0)),
                sandbox_config: None,
            }
        );
        check!(
            start_container,
            cri::StartContainerRequest {
                container_id: id.clone(),
            }
        );
        check!(
            stop_container,
            cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }
        );
        check!(
            container_status,
            cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            }
        );
        check!(
            container_stats,
            cri::ContainerStatsRequest {
                container_id: id.clone(),
            }
        );
        check!(
            exec_sync,
            cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                timeout: 0,
            }
        );
        check!(
            exec,
            cri::ExecRequest {
                container_id: id.clone(),
                cmd: vec!["sh".into()],
                stdout: true,
                ..Default::default()
            }
        );
        check!(
            attach,
            cri::AttachRequest {
                container_id: id.clone(),
                stdout: true,
                ..Default::default()
            }
        );
        check!(
            reopen_container_log,
            cri::ReopenContainerLogRequest {
                container_id: id.clone(),
            }
        );
        check!(
            update_container_resources,
            cri::UpdateContainerResourcesRequest {
                container_id: id.clone(),
                linux: Some(Default::default()),
                ..Default::default()
            }
        );
    }
    // Removal of what is not there succeeds; of an empty ID does not.
    assert_eq!(code(remove_pod(&d, "").await), Code::InvalidArgument);
    assert_eq!(code(remove(&d, "").await), Code::InvalidArgument);
    remove(&d, &unknown).await.unwrap();
    // A prefix two pods share is ambiguous.
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(run(&d, &format!("p{n}")).await);
    }
    let shared = ids
        .iter()
        .enumerate()
        .find_map(|(i, a)| {
            ids[i + 1..]
                .iter()
                .find(|b| a[..1] == b[..1])
                .map(|_| a[..1].to_string())
        })
        .expect("40 IDs share a first digit");
    assert_eq!(code(pod_status(&d, &shared).await), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_and_missing_images_not_found() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let mut no_name = container("", 0);
    no_name.metadata.as_mut().unwrap().name.clear();
    assert_eq!(
        code(create(&d, &pod_id, no_name).await),
        Code::InvalidArgument
    );
    let mut no_image = container("a", 0);
    no_image.image = None;
    assert_eq!(
        code(create(&d, &pod_id, no_image).await),
        Code::InvalidArgument
    );
    let mut unpulled = container("b", 0);
    unpulled.image = Some(cri::ImageSpec {
        image: "registry.test/absent:1".into(),
        ..Default::default()
    });
    assert_eq!(code(create(&d, &pod_id, unpulled).await), Code::NotFound);
    let mut escaping = container("c", 0);
    escaping.log_path = "../../etc/x.log".into();
    let mut logged = pod("logged");
    logged.log_directory = "/var/log/pods/x".into();
    let logged = run_config(&d, logged).await.unwrap();
    assert_eq!(
        code(create(&d, &logged, escaping).await),
        Code::InvalidArgument
    );
    // hostPID: nowhere in vmcri, refused before anything starts.
    let mut host_pid = pod("hostpid");
    host_pid.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(code(run_config(&d, host_pid).await), Code::InvalidArgument);
    let unknown_handler = cri::RunPodSandboxRequest {
        config: Some(pod("h")),
        runtime_handler: "nope".into(),
    };
    let r = d.cri.run_pod_sandbox(Request::new(unknown_handler)).await;
    assert_eq!(code(r), Code::InvalidArgument);
}

#[tokio::test]
async fn image_requests_without_an_image_are_invalid_argument_and_absent_images_no_error() {
    let d = Daemon::start().await;
    let spec = |name: &str| {
        Some(cri::ImageSpec {
            image: name.into(),
            ..Default::default()
        })
    };
    let status = |image| cri::ImageStatusRequest {
        image,
        verbose: false,
    };
    let r = d.cri.image_status(Request::new(status(None))).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = d.cri.image_status(Request::new(status(spec("")))).await;
    assert_eq!(code(r), Code::InvalidArgument);
    // Absent: an answer without an image, not an error.
    let absent = d
        .cri
        .image_status(Request::new(status(spec("registry.test/absent:1"))));
    assert_eq!(absent.await.unwrap().into_inner().image, None);
    let found = d.cri.image_status(Request::new(status(spec(IMAGE))));
    assert!(found.await.unwrap().into_inner().image.is_some());
    let pull = |image| cri::PullImageRequest {
        image,
        ..Default::default()
    };
    let r = d.cri.pull_image(Request::new(pull(spec("")))).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = d
        .cri
        .pull_image(Request::new(pull(spec("Not A Reference"))))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let bad_auth = cri::PullImageRequest {
        image: spec(IMAGE),
        auth: Some(cri::AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = d.cri.pull_image(Request::new(bad_auth)).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let remove = cri::RemoveImageRequest { image: spec("") };
    let r = d.cri.remove_image(Request::new(remove)).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let list = d
        .cri
        .list_images(Request::new(cri::ListImagesRequest::default()));
    assert_eq!(list.await.unwrap().into_inner().images.len(), 1);
}

#[tokio::test]
async fn an_image_in_use_cannot_be_removed() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    let image = |name: &str| cri::RemoveImageRequest {
        image: Some(cri::ImageSpec {
            image: name.into(),
            ..Default::default()
        }),
    };
    let r = d.cri.remove_image(Request::new(image(IMAGE))).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    remove(&d, &id).await.unwrap();
    d.cri
        .remove_image(Request::new(image(IMAGE)))
        .await
        .unwrap();
    // Gone already: not an error.
    d.cri
        .remove_image(Request::new(image(IMAGE)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sandbox_whose_process_dies_is_not_ready_and_says_why() {
    let d = Daemon::start().await;
    let pod_id = run(&d, "web").await;
    let id = create(&d, &pod_id, container("app", 0)).await.unwrap();
    start(&d, &id).await.unwrap();
    let rec = d.sandboxes.get(&pod_id).unwrap();
    d.backend.crash(&rec);
    let s = pod_status(&d, &pod_id).await.unwrap();
    assert_eq!(s.state, NOT_READY);
    // The container's end is recorded once its agent is gone.
    let c = wait_state(&d, &id, cri::ContainerState::ContainerExited).await;
    assert_ne!(c.reason, "Completed");
    assert_eq!(
        code(exec_sync(&d, &id, &["true"], 0).await),
        Code::FailedPrecondition
    );
    stop_pod(&d, &pod_id).await.unwrap();
    remove_pod(&d, &pod_id).await.unwrap();
}

/// A restart recovers every record: ready pods with their running
/// containers keep going, a pod whose process died meanwhile is NotReady
/// and its containers exited.
#[test]
fn a_restarted_daemon_recovers_pods_and_containers_from_its_records() {
    // One thread each: after block_on no task of the daemon runs again,
    // and dropping the runtime drops them unpolled, as kill -9 would (a
    // multi-threaded one keeps polling tasks while it shuts down, and a
    // supervisor could record a lost connection as an exit).
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    };
    let first = runtime();
    let (parts, live, live_ctr, dead, dead_rec, dead_ctr) = first.block_on(async {
        let d = Daemon::start().await;
        let live = run(&d, "live").await;
        let live_ctr = create(&d, &live, container("app", 0)).await.unwrap();
        start(&d, &live_ctr).await.unwrap();
        let dead = run(&d, "dead").await;
        let dead_ctr = create(&d, &dead, container("app", 0)).await.unwrap();
        start(&d, &dead_ctr).await.unwrap();
        let dead_rec = d.sandboxes.get(&dead).unwrap();
        (d.parts(), live, live_ctr, dead, dead_rec, dead_ctr)
    });
    // Every task of the first daemon ends with its runtime.
    drop(first);
    // While the daemon is down, the "dead" pod's VMM dies.
    parts.1.crash(&dead_rec);

    let second = runtime();
    second.block_on(async {
        let (root, backend): (Arc<Root>, _) = parts;
        let d = Daemon::open(root, backend).await;
        assert_eq!(pod_status(&d, &live).await.unwrap().state, READY);
        assert_eq!(
            status(&d, &live_ctr).await.unwrap().state,
            cri::ContainerState::ContainerRunning as i32
        );
        // Its supervisor runs again: an exit now is recorded.
        d.backend.with_agent(&live, |a| a.exit(&live_ctr, 0));
        let s = wait_state(&d, &live_ctr, cri::ContainerState::ContainerExited).await;
        assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
        assert_eq!(pod_status(&d, &dead).await.unwrap().state, NOT_READY);
        let s = status(&d, &dead_ctr).await.unwrap();
        assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(s.reason, "SandboxExited", "{s:?}");
        remove_pod(&d, &dead).await.unwrap();
        remove_pod(&d, &live).await.unwrap();
    });
}

/// A daemon with CNI on, its conf dir holding a one-plugin list whose
/// fake plugin logs each call to `<bin>/log` and gives `10.244.5.5/24`.
async fn cni_daemon(bin: &std::path::Path, conf: &std::path::Path) -> Daemon {
    use std::os::unix::fs::PermissionsExt;
    let plugin = bin.join("fakenet");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND $CNI_CONTAINERID\" >> {}\n\
             [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"interfaces\":[{{\"name\":\"eth0\",\"mac\":\"0a:00:00:00:00:05\",\"sandbox\":\"'$CNI_NETNS'\"}}],\"ips\":[{{\"address\":\"fd00::5/64\",\"interface\":0}},{{\"address\":\"10.244.5.5/24\",\"gateway\":\"10.244.5.1\",\"interface\":0}}],\"routes\":[{{\"dst\":\"0.0.0.0/0\"}}]}}'\ntrue\n",
            bin.join("log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        conf.join("10-fake.conflist"),
        r#"{"cniVersion":"1.0.0","name":"fake","plugins":[{"type":"fakenet"}]}"#,
    )
    .unwrap();
    let (bin, conf) = (bin.to_path_buf(), conf.to_path_buf());
    Daemon::open_with(
        Arc::new(Root::new()),
        Arc::new(crate::testing::backend::FakeBackend::new()),
        move |c| {
            c.cni.enabled = true;
            c.cni.conf_dir = conf;
            c.cni.bin_dirs = vec![bin];
        },
    )
    .await
}

fn cni_calls(bin: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(bin.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_backend_starts_with_the_pod_network_and_stop_releases_it_once() {
    let bin = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let d = cni_daemon(bin.path(), conf.path()).await;
    let status = d
        .cri
        .status(Request::new(cri::StatusRequest { verbose: false }))
        .await
        .unwrap()
        .into_inner();
    let net = &status.status.unwrap().conditions[1];
    assert_eq!((net.r#type.as_str(), net.status), ("NetworkReady", true));

    let id = run(&d, "web").await;
    let rec = d.sandboxes.get(&id).unwrap();
    let netns = rec.netns.clone().unwrap();
    assert!(crate::network::netns::is_netns(&netns));
    // The contract with backends: start reads the netns and the result.
    let seen = d.backend.started_networks();
    let network = seen[0].clone().expect("start saw the pod network");
    assert_eq!(network.netns, netns);
    assert_eq!(network.interfaces[0].mac, "0a:00:00:00:00:05");
    assert_eq!(network.ips[1].gateway, Some("10.244.5.1".parse().unwrap()));
    assert_eq!(network.routes[0].dst.to_string(), "0.0.0.0/0");
    assert_eq!(Some(network), rec.network);
    let st = status_of(&d, &id).await;
    let ip = st.network.unwrap();
    assert_eq!(ip.ip, "10.244.5.5");
    assert_eq!(ip.additional_ips[0].ip, "fd00::5");

    for _ in 0..2 {
        d.cri
            .stop_pod_sandbox(Request::new(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .await
            .unwrap();
    }
    assert_eq!(
        cni_calls(bin.path()),
        [format!("ADD {id}"), format!("DEL {id}")]
    );
    assert_eq!(status_of(&d, &id).await.network, None);
    assert!(netns.exists());
    d.cri
        .remove_pod_sandbox(Request::new(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        }))
        .await
        .unwrap();
    assert!(!netns.exists());
}

#[tokio::test]
async fn a_backend_failing_after_add_leaves_no_network() {
    let bin = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let d = cni_daemon(bin.path(), conf.path()).await;
    d.backend.fail_next_start("no kernel");
    assert_eq!(code(run_config(&d, pod("web")).await), Code::Unavailable);
    let calls = cni_calls(bin.path());
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].starts_with("ADD ") && calls[1].starts_with("DEL "),
        "{calls:?}"
    );
    let left: Vec<_> = std::fs::read_dir(d.sandboxes.network().netns_dir())
        .unwrap()
        .collect();
    assert!(left.is_empty());

    // Without a config: FailedPrecondition, and nothing runs.
    std::fs::remove_file(conf.path().join("10-fake.conflist")).unwrap();
    let e = run_config(&d, pod("web")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("cni plugin not initialized"),
        "{}",
        e.message()
    );
    assert_eq!(cni_calls(bin.path()).len(), 2);
    assert_eq!(d.backend.started_networks().len(), 1);
}

async fn status_of(d: &Daemon, id: &str) -> cri::PodSandboxStatus {
    d.cri
        .pod_sandbox_status(Request::new(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        }))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}
