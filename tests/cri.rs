//! `vmcri serve` through a CRI v1 client: pod sandbox RPCs with their
//! error codes, events, and recovery after `kill -9` of the daemon, in the
//! `process` backend. A microVM pod is booted by containers.rs, which runs
//! a container in it.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::Path;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use vmcri_tests::{artifacts, Daemon, Scratch};

/// A daemon whose default handler is the process backend, with a
/// microVM handler too, on the artifacts under test.
fn start_daemon(dir: &Path) -> Daemon {
    let a = artifacts();
    Daemon::start(
        dir,
        &format!(
            "default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n[microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\n[handlers.vmcri]\nbackend = \"microvm\"\nvcpus = 1\nmemory_mib = 128\n[process]\nagent = \"{}\"\nboot_timeout_secs = 30\n[agent]\nstop_timeout_secs = 5\n",
            a.kernel.display(),
            a.agent_initrd.display(),
            a.vmm.display(),
            a.agent.display()
        ),
    )
}

async fn clients(d: &Daemon) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    let channel = d.channel().await;
    (
        RuntimeServiceClient::new(channel.clone()),
        ImageServiceClient::new(channel),
    )
}

fn pod(name: &str, attempt: u32, labels: &[(&str, &str)]) -> cri::RunPodSandboxRequest {
    cri::RunPodSandboxRequest {
        config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt,
            }),
            hostname: name.into(),
            log_directory: "/var/log/pods/test".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        runtime_handler: String::new(),
    }
}

async fn status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<cri::PodSandboxStatusResponse, tonic::Status> {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: true,
    })
    .await
    .map(|r| r.into_inner())
}

async fn list(
    rt: &mut RuntimeServiceClient<Channel>,
    filter: cri::PodSandboxFilter,
) -> Vec<String> {
    rt.list_pod_sandbox(cri::ListPodSandboxRequest {
        filter: Some(filter),
    })
    .await
    .unwrap()
    .into_inner()
    .items
    .into_iter()
    .map(|p| p.id)
    .collect()
}

fn state(s: &cri::PodSandboxStatusResponse) -> i32 {
    s.status.as_ref().unwrap().state
}

const READY: i32 = cri::PodSandboxState::SandboxReady as i32;
const NOTREADY: i32 = cri::PodSandboxState::SandboxNotready as i32;

fn verbose_pid(s: &cri::PodSandboxStatusResponse) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(s.info.get("info")?).ok()?;
    v["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn runtime_identity_status_and_config() {
    let scratch = Scratch::new("cri-identity").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, mut img) = clients(&daemon).await;
        let v = rt
            .version(cri::VersionRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
            ("vmcri", "v1")
        );
        let s = rt
            .status(cri::StatusRequest { verbose: true })
            .await
            .unwrap()
            .into_inner();
        let conds = s.status.unwrap().conditions;
        assert!(conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status));
        assert!(conds
            .iter()
            .any(|c| c.r#type == "NetworkReady" && !c.status && !c.message.is_empty()));
        assert!(s.info["config"].contains("no VM isolation"), "{:?}", s.info);
        let names: Vec<String> = s.runtime_handlers.iter().map(|h| h.name.clone()).collect();
        assert!(
            names.contains(&"vmcri".to_string()) && names.contains(&"vmcri-process".to_string())
        );
        let c = rt
            .runtime_config(cri::RuntimeConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            c.linux.unwrap().cgroup_driver,
            cri::CgroupDriver::Cgroupfs as i32
        );
        let upd = cri::UpdateRuntimeConfigRequest {
            runtime_config: Some(cri::RuntimeConfig {
                network_config: Some(cri::NetworkConfig {
                    pod_cidr: "10.88.0.0/16".into(),
                }),
            }),
        };
        rt.update_runtime_config(upd).await.unwrap();
        let s = rt
            .status(cri::StatusRequest { verbose: true })
            .await
            .unwrap()
            .into_inner();
        assert!(s.info["config"].contains("10.88.0.0/16"));
        // Image service error paths (pulls from a real registry: images.rs).
        let none = img
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(none.images.is_empty());
        let spec = |i: &str| {
            Some(cri::ImageSpec {
                image: i.into(),
                ..Default::default()
            })
        };
        let st = img
            .image_status(cri::ImageStatusRequest {
                image: spec("busybox"),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            st.image.is_none(),
            "an absent image is no error, just no image"
        );
        let pull = |i: &str| cri::PullImageRequest {
            image: spec(i),
            auth: None,
            sandbox_config: None,
        };
        let e = img.pull_image(pull("Not A Reference")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = img
            .pull_image(cri::PullImageRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // Nothing listens on port 1 of loopback: the registry is unavailable.
        let e = img
            .pull_image(pull("127.0.0.1:1/nothing/here:v1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        img.remove_image(cri::RemoveImageRequest {
            image: spec("never-pulled"),
        })
        .await
        .unwrap();
        let fs = img
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(fs.image_filesystems[0]
            .fs_id
            .as_ref()
            .unwrap()
            .mountpoint
            .ends_with("content"));
    });
}

/// Runs pod `name` (attempt 0) with `labels`; its ID.
async fn run(
    rt: &mut RuntimeServiceClient<Channel>,
    name: &str,
    labels: &[(&str, &str)],
) -> String {
    rt.run_pod_sandbox(pod(name, 0, labels))
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

/// Runs pods `a` (`app=web`) and `b` (`app=db`) at once; their IDs.
async fn run_web_and_db(rt: &RuntimeServiceClient<Channel>, a: &str, b: &str) -> (String, String) {
    let (mut rt_a, mut rt_b) = (rt.clone(), rt.clone());
    tokio::join!(
        run(&mut rt_a, a, &[("app", "web")]),
        run(&mut rt_b, b, &[("app", "db")])
    )
}

async fn stop(rt: &mut RuntimeServiceClient<Channel>, id: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("StopPodSandbox");
}

async fn remove(rt: &mut RuntimeServiceClient<Channel>, id: &str) {
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// A new pod is ready, with a 64-character ID, its name, labels, handler and
/// process; its metadata again is AlreadyExists.
#[test]
fn run_pod_sandbox_gives_a_ready_pod_once_per_metadata() {
    let scratch = Scratch::new("cri-run").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let a = run(&mut rt, "ready", &[("app", "web")]).await;
        assert_eq!(a.len(), 64);
        let sa = status(&mut rt, &a).await.unwrap();
        assert_eq!(state(&sa), READY);
        let st = sa.status.as_ref().unwrap();
        assert_eq!(st.metadata.as_ref().unwrap().name, "ready");
        assert_eq!(st.labels["app"], "web");
        assert_eq!(st.runtime_handler, "vmcri-process");
        assert!(verbose_pid(&sa).is_some(), "{:?}", sa.info);
        let dup = rt.run_pod_sandbox(pod("ready", 0, &[])).await.unwrap_err();
        assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
        remove(&mut rt, &a).await;
    });
}

#[test]
fn list_pod_sandbox_filters_by_id_prefix_label_and_state() {
    let scratch = Scratch::new("cri-list").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let (a, b) = run_web_and_db(&rt, "web", "db").await;
        assert_eq!(
            list(
                &mut rt,
                cri::PodSandboxFilter {
                    id: a[..12].into(),
                    ..Default::default()
                }
            )
            .await,
            vec![a.clone()]
        );
        let db = cri::PodSandboxFilter {
            label_selector: [("app".to_string(), "db".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(list(&mut rt, db).await, vec![b.clone()]);
        assert_eq!(
            list(&mut rt, cri::PodSandboxFilter::default()).await.len(),
            2
        );
        stop(&mut rt, &a).await;
        let ready = cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue { state: READY }),
            ..Default::default()
        };
        assert_eq!(list(&mut rt, ready).await, vec![b.clone()]);
        remove(&mut rt, &a).await;
        remove(&mut rt, &b).await;
    });
}

/// Stop and remove, each twice without error: a stopped pod is NotReady
/// with no process, a removed one NotFound, and removing a running pod
/// stops it first; each pod's events say created, started, stopped,
/// deleted, in order.
#[test]
fn a_pod_goes_ready_notready_removed_with_an_event_at_each_step() {
    let scratch = Scratch::new("cri-lifecycle").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let mut events = rt
            .get_container_events(cri::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let (a, b) = run_web_and_db(&rt, "a", "b").await;

        stop(&mut rt, &a).await;
        stop(&mut rt, &a).await;
        let sa = status(&mut rt, &a).await.unwrap();
        assert_eq!(state(&sa), NOTREADY);
        assert_eq!(verbose_pid(&sa), None, "no process once stopped");

        remove(&mut rt, &a).await;
        remove(&mut rt, &a).await;
        assert_eq!(
            status(&mut rt, &a).await.unwrap_err().code(),
            Code::NotFound
        );
        // Removing a running sandbox stops it first.
        remove(&mut rt, &b).await;
        assert!(list(&mut rt, cri::PodSandboxFilter::default())
            .await
            .is_empty());

        // Events: created, started for both; stopped and deleted for both.
        let mut seen = Vec::new();
        while seen.len() < 8 {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("event")
                .unwrap()
                .unwrap();
            seen.push((ev.container_id, ev.container_event_type));
        }
        use cri::ContainerEventType as E;
        for id in [&a, &b] {
            let kinds: Vec<i32> = seen
                .iter()
                .filter(|(i, _)| i == id)
                .map(|(_, k)| *k)
                .collect();
            assert_eq!(
                kinds,
                vec![
                    E::ContainerCreatedEvent as i32,
                    E::ContainerStartedEvent as i32,
                    E::ContainerStoppedEvent as i32,
                    E::ContainerDeletedEvent as i32
                ],
                "{id}"
            );
        }
    });
}

/// No metadata, a relative log directory, an unknown handler (named in
/// the message) or an empty ID are InvalidArgument; an unknown pod's
/// status or stop is NotFound.
#[test]
fn malformed_pod_requests_are_refused_with_their_codes() {
    let scratch = Scratch::new("cri-bad-pods").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let mut no_meta = pod("c", 0, &[]);
        no_meta.config.as_mut().unwrap().metadata = None;
        assert_eq!(
            rt.run_pod_sandbox(no_meta).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let mut rel_logs = pod("c", 0, &[]);
        rel_logs.config.as_mut().unwrap().log_directory = "logs".into();
        assert_eq!(
            rt.run_pod_sandbox(rel_logs).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let mut bad_handler = pod("c", 0, &[]);
        bad_handler.runtime_handler = "kata".into();
        let e = rt.run_pod_sandbox(bad_handler).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("kata"), "{}", e.message());
        assert_eq!(
            status(&mut rt, "ffff").await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            status(&mut rt, "").await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let e = rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: "ffff".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
}

/// Container error paths (the lifecycle itself: containers.rs): an
/// unknown pod, no image, an image not pulled (saying so) and an unknown
/// container, none leaving a container behind.
#[test]
fn container_requests_without_a_pod_image_or_container_fail_with_their_codes() {
    let scratch = Scratch::new("cri-container-errors").unwrap();
    let daemon = start_daemon(&scratch.0);
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let c = run(&mut rt, "c", &[]).await;
        let create = |sandbox: &str, image: &str| cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: None,
        };
        assert_eq!(
            rt.create_container(create("ffff", "busybox"))
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        assert_eq!(
            rt.create_container(create(&c, ""))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        let e = rt
            .create_container(create(&c, "busybox"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("pull it first"), "{}", e.message());
        let e = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: "nope".into(),
                cmd: vec!["true".into()],
                timeout: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(rt
            .list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty());
        remove(&mut rt, &c).await;
    });
}

#[test]
fn daemon_kill_9_and_restart_recovers_every_pod() {
    let scratch = Scratch::new("cri-restart").unwrap();
    let mut daemon = start_daemon(&scratch.0);
    let runtime = rt();
    let (keep, lose, lose_pid) = runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let keep = rt
            .run_pod_sandbox(pod("keep", 0, &[]))
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let lose = rt
            .run_pod_sandbox(pod("lose", 0, &[]))
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let stopped = rt
            .run_pod_sandbox(pod("stopped", 0, &[]))
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: stopped,
        })
        .await
        .unwrap();
        let lose_pid = verbose_pid(&status(&mut rt, &lose).await.unwrap()).unwrap();
        (keep, lose, lose_pid)
    });
    daemon.kill9();
    // While the daemon is down, one pod's agent dies.
    // SAFETY: signalling a PID the daemon reported as this pod's agent.
    unsafe { libc::kill(lose_pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    daemon.restart();
    runtime.block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        assert_eq!(
            list(&mut rt, cri::PodSandboxFilter::default()).await.len(),
            3,
            "every pod is still known"
        );
        let k = status(&mut rt, &keep).await.unwrap();
        assert_eq!(state(&k), READY, "the surviving pod is still ready");
        let l = status(&mut rt, &lose).await.unwrap();
        assert_eq!(state(&l), NOTREADY);
        assert!(
            l.info["info"].contains("exited while vmcri was not running"),
            "{:?}",
            l.info
        );
        let dup = rt.run_pod_sandbox(pod("keep", 0, &[])).await.unwrap_err();
        assert_eq!(
            dup.code(),
            Code::AlreadyExists,
            "recovered names stay reserved"
        );
        // The surviving pod is still reachable: stopping it is clean and quick.
        let t = std::time::Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: keep.clone(),
        })
        .await
        .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "stopped through its agent, not by timeout"
        );
        for id in [keep, lose] {
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
                .unwrap();
        }
    });
}

/// kubelet's hostNetwork pod, with the namespace options of
/// `../shared/kubelet-requests/RunPodSandbox-hostnetwork.json`: the
/// process backend runs it on the node's network and its status echoes
/// what was asked, the same each time and with no network field (no IP);
/// a microVM handler refuses it up front with InvalidArgument.
#[test]
fn host_network_pods_run_in_the_process_backend_and_are_refused_in_a_microvm() {
    let scratch = Scratch::new("cri-hostnet").unwrap();
    let daemon = start_daemon(&scratch.0);
    let hostnet = |name: &str, handler: &str| {
        let mut r = pod(name, 0, &[]);
        r.runtime_handler = handler.into();
        if let Some(c) = r.config.as_mut() {
            c.linux = Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        r
    };
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let id = rt
            .run_pod_sandbox(hostnet("hostnet", ""))
            .await
            .expect("a hostNetwork pod in the process backend")
            .into_inner()
            .pod_sandbox_id;
        let first = status(&mut rt, &id).await.unwrap();
        let st = first.status.clone().unwrap();
        assert_eq!(st.network, None, "no IP: no network field");
        let o = st.linux.unwrap().namespaces.unwrap().options.unwrap();
        assert_eq!(
            (o.network, o.pid, o.ipc),
            (
                cri::NamespaceMode::Node as i32,
                cri::NamespaceMode::Container as i32,
                cri::NamespaceMode::Pod as i32
            )
        );
        assert_eq!(
            status(&mut rt, &id).await.unwrap().status,
            first.status,
            "PodSandboxStatus changed between two calls"
        );
        // The agent is in the node's network namespace, not a new one.
        let pid = verbose_pid(&first).expect("the agent's PID");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap()
        );
        // An ordinary pod gets a network namespace of its own.
        let own = rt
            .run_pod_sandbox(pod("own-net", 0, &[]))
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let s = status(&mut rt, &own).await.unwrap();
        let own_pid = verbose_pid(&s).unwrap();
        assert_ne!(
            std::fs::read_link(format!("/proc/{own_pid}/ns/net")).unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap()
        );

        let e = rt
            .run_pod_sandbox(hostnet("hostnet-vm", "vmcri"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("hostNetwork"), "{}", e.message());
        let pods = list(&mut rt, cri::PodSandboxFilter::default()).await;
        assert_eq!(pods.len(), 2, "the refused pod left a record: {pods:?}");

        // The default handler also answers to the empty name.
        let names: Vec<String> = rt
            .status(cri::StatusRequest { verbose: false })
            .await
            .unwrap()
            .into_inner()
            .runtime_handlers
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert!(names.contains(&String::new()), "{names:?}");

        for id in [id, own] {
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
                .unwrap();
        }
    });
}
