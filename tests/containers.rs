//! Containers through `vmcri serve` in the `process` backend, with an
//! image built from Debian's busybox-static and pulled from a registry on
//! loopback: lifecycle, CRI logs and their rotation, ExecSync, mounts,
//! users, stats, events, the error codes, and recovery after `kill -9`.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use vmcri_tests::pods::*;
use vmcri_tests::{Daemon, Scratch};

/// The pod's hostname and DNS reach the container.
async fn assert_pod_files(rt: &mut RuntimeServiceClient<Channel>, id: &str, pod_name: &str) {
    let r = exec(
        rt,
        id,
        &[
            "sh",
            "-c",
            "hostname; cat /etc/hostname /etc/resolv.conf /etc/hosts",
        ],
        120,
    )
    .await
    .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.starts_with(&format!("{pod_name}\n{pod_name}\n")),
        "{out}"
    );
    assert!(
        out.contains("nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"),
        "{out}"
    );
    assert!(out.contains(&format!("127.0.1.1\t{pod_name}")), "{out}");
}

/// A daemon of its own with the test image pulled (from the registry the
/// tests share) and one pod running, named `name` (its hostname too, and
/// its scratch directory's tag): what each test of the container
/// lifecycle starts from. Fields drop in order: the daemon ends before
/// its scratch directory goes.
struct PodEnv {
    rt: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pod: String,
    name: String,
    image: String,
    logs: PathBuf,
    dir: PathBuf,
    _daemon: Daemon,
    _scratch: Scratch,
}

impl PodEnv {
    async fn new(name: &str) -> PodEnv {
        let scratch = Scratch::new(&format!("containers-{name}")).unwrap();
        let daemon = process_daemon(&scratch.0, "");
        let image = shared_test_image();
        let logs = scratch.0.join("pod-logs");
        let (mut rt, mut images) = clients(&daemon).await;
        // The pull and the pod's start, each slow in its own way, at once.
        let (_, pod) = tokio::join!(pull(&mut images, &image), run_pod(&mut rt, name, &logs));
        PodEnv {
            rt,
            images,
            pod,
            name: name.into(),
            image,
            logs,
            dir: scratch.0.clone(),
            _daemon: daemon,
            _scratch: scratch,
        }
    }

    /// A container of the test image running `command`.
    fn container(&self, name: &str, command: &[&str]) -> cri::ContainerConfig {
        container(name, &self.image, command)
    }

    /// The main container: output on both streams, a partial line, env
    /// from the image and its config, and two host volumes, `/data`
    /// read-only (the host's `data`, with `file`) and `/rw` (`rw`).
    fn main_container(&self) -> (cri::ContainerConfig, PathBuf, PathBuf) {
        let (data, rw) = host_volumes(&self.dir, "host data\n");
        let mut main = self.container(
            "main",
            &["sh", "-c", "echo out-line; echo err-line >&2; printf partial; echo $FROM_IMAGE $MINE; exec sleep 3600"],
        );
        main.envs = vec![cri::KeyValue {
            key: "MINE".into(),
            value: "mine".into(),
        }];
        main.mounts = vec![
            cri::Mount {
                container_path: "/data".into(),
                host_path: data.display().to_string(),
                readonly: true,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/rw".into(),
                host_path: rw.display().to_string(),
                ..Default::default()
            },
        ];
        (main, data, rw)
    }

    /// Creates `config` in the pod.
    async fn create(&mut self, config: cri::ContainerConfig) -> Result<String, tonic::Status> {
        create(&mut self.rt, &self.pod, config, &self.logs).await
    }

    /// Starts container `id`.
    async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// Creates and starts `config` in the pod.
    async fn run(&mut self, config: cri::ContainerConfig) -> String {
        let id = self.create(config).await.expect("CreateContainer");
        self.start(&id).await.expect("StartContainer");
        id
    }

    /// Creates and starts the main container, and waits for its output.
    async fn run_main(&mut self) -> (String, PathBuf, PathBuf) {
        let (main, data, rw) = self.main_container();
        let id = self.run(main).await;
        wait_for_log(&self.logs.join("main/0.log"), "yes mine").await;
        (id, data, rw)
    }

    /// Lists the containers `filter` selects.
    async fn list(&mut self, filter: cri::ContainerFilter) -> Vec<cri::Container> {
        self.rt
            .list_containers(cri::ListContainersRequest {
                filter: Some(filter),
            })
            .await
            .unwrap()
            .into_inner()
            .containers
    }

    /// Removes the image, as RemoveImage answers.
    async fn remove_image(&mut self) -> Result<(), tonic::Status> {
        let image = Some(cri::ImageSpec {
            image: self.image.clone(),
            ..Default::default()
        });
        self.images
            .remove_image(cri::RemoveImageRequest { image })
            .await
            .map(|_| ())
    }

    /// Removes the pod with its containers, as each test ends.
    async fn remove(mut self) {
        let pod_sandbox_id = self.pod.clone();
        self.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
            .await
            .expect("RemovePodSandbox");
    }
}

#[test]
fn pods_with_an_invalid_dns_server_or_hostname_are_refused() {
    let s = Scratch::new("containers-bad-pods").unwrap();
    let daemon = process_daemon(&s.0, "");
    let logs = s.0.join("pod-logs");
    rt().block_on(async {
        let (mut rt, _) = clients(&daemon).await;
        let mut bad = pod_config("bad-dns", &logs);
        bad.dns_config = Some(cri::DnsConfig {
            servers: vec!["dns.example".into()],
            ..Default::default()
        });
        let e = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(bad),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let mut bad = pod_config("bad-host", &logs);
        bad.hostname = "two words".into();
        let e = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(bad),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
}

/// Created, running, exited and removed, each state refusing what it
/// cannot do with its code, and an event at each step.
#[test]
fn a_container_goes_created_running_exited_removed_with_an_event_at_each_step() {
    rt().block_on(async {
        let mut env = PodEnv::new("lifecycle").await;
        let mut events = env
            .rt
            .get_container_events(cri::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let (main, _, _) = env.main_container();
        let id = env.create(main).await.expect("CreateContainer");
        let st = cstatus(&mut env.rt, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerCreated as i32);
        assert!(st.image_ref.starts_with("sha256:"), "{st:?}");
        assert_eq!(
            st.log_path,
            env.logs.join("main/0.log").display().to_string()
        );
        assert_eq!(st.mounts.len(), 2);
        assert_eq!(
            exec(&mut env.rt, &id, &["true"], 5)
                .await
                .expect_err("exec in a created container")
                .code(),
            Code::FailedPrecondition
        );

        env.start(&id).await.expect("StartContainer");
        let st = cstatus(&mut env.rt, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        assert!(st.started_at >= st.created_at && st.created_at > 0);
        assert_eq!(
            env.start(&id).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        wait_for_log(&env.logs.join("main/0.log"), "yes mine").await;

        // Stop: SIGTERM ends `sleep` (exit 143); stopping again is fine.
        let stop = |timeout| cri::StopContainerRequest {
            container_id: id.clone(),
            timeout,
        };
        env.rt
            .stop_container(stop(10))
            .await
            .expect("StopContainer");
        let st = cstatus(&mut env.rt, &id).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(st.exit_code, 143, "{st:?}");
        env.rt.stop_container(stop(10)).await.expect("second stop");
        assert_eq!(
            env.start(&id).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        // Remove, twice; then it is gone.
        let remove = || cri::RemoveContainerRequest {
            container_id: id.clone(),
        };
        env.rt
            .remove_container(remove())
            .await
            .expect("RemoveContainer");
        assert_eq!(
            cstatus(&mut env.rt, &id).await.unwrap_err().code(),
            Code::NotFound
        );
        env.rt
            .remove_container(remove())
            .await
            .expect("second remove");
        assert_eq!(
            env.rt.stop_container(stop(0)).await.unwrap_err().code(),
            Code::NotFound
        );

        // Its events, in order.
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < 4 {
            let ev = tokio::time::timeout_at(deadline, events.next())
                .await
                .expect("events")
                .unwrap()
                .unwrap();
            if ev.container_id == id {
                assert_eq!(ev.containers_statuses.len(), 1);
                seen.push(ev.container_event_type);
            }
        }
        use cri::ContainerEventType as E;
        assert_eq!(
            seen,
            [
                E::ContainerCreatedEvent as i32,
                E::ContainerStartedEvent as i32,
                E::ContainerStoppedEvent as i32,
                E::ContainerDeletedEvent as i32
            ]
        );
        env.remove().await;
    });
}

#[test]
fn invalid_container_configs_are_refused_with_their_codes_and_leave_nothing_behind() {
    rt().block_on(async {
        let mut env = PodEnv::new("bad-configs").await;
        let (main, data, _) = env.main_container();
        let id = env.create(main.clone()).await.expect("CreateContainer");
        let code = |r: Result<String, tonic::Status>| r.expect_err("must fail").code();
        assert_eq!(code(env.create(main).await), Code::AlreadyExists);
        let image = env.image.clone();
        assert_eq!(
            code(
                create(
                    &mut env.rt,
                    "no-such-pod",
                    container("x", &image, &["true"]),
                    &env.logs
                )
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(
                env.create(container("x", "127.0.0.1:1/never-pulled:v1", &["true"]))
                    .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(env.create(container("x", "", &["true"])).await),
            Code::InvalidArgument
        );
        let mut bad = env.container("x", &["true"]);
        bad.log_path = "../escape.log".into();
        assert_eq!(code(env.create(bad).await), Code::InvalidArgument);
        let mut bad = env.container("x", &["true"]);
        bad.mounts = vec![cri::Mount {
            container_path: "relative".into(),
            host_path: data.display().to_string(),
            ..Default::default()
        }];
        assert_eq!(code(env.create(bad).await), Code::InvalidArgument);
        let mut bad = env.container("x", &["true"]);
        bad.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_username: "nobody-here".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(code(env.create(bad).await), Code::InvalidArgument);
        let left: Vec<String> = env
            .list(Default::default())
            .await
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(left, [id], "a refused container was left behind");
        env.remove().await;
    });
}

#[test]
fn output_is_logged_in_the_cri_format_with_partial_lines() {
    rt().block_on(async {
        let mut env = PodEnv::new("cri-log").await;
        env.run_main().await;
        let text = wait_for_log(&env.logs.join("main/0.log"), "yes mine").await;
        let entries = parse_cri_log(&text);
        assert!(
            entries.contains(&("stdout".into(), "F".into(), "out-line".into())),
            "{text}"
        );
        assert!(
            entries.contains(&("stderr".into(), "F".into(), "err-line".into())),
            "{text}"
        );
        // The partial line ends either as its own P entry or joined with
        // the next write, depending on how the pipe was read.
        let joined: String = entries
            .iter()
            .filter(|e| e.0 == "stdout")
            .map(|e| {
                if e.1 == "P" {
                    e.2.clone()
                } else {
                    format!("{}\n", e.2)
                }
            })
            .collect();
        assert!(joined.contains("partialyes mine\n"), "{text}");
        env.remove().await;
    });
}

/// ExecSync's output, stderr and exit code, in the environment the
/// container runs in: env from the image and the config, the image's
/// working directory and user, and the pod's hostname and DNS.
#[test]
fn exec_sync_returns_output_and_exit_code_in_the_containers_env_and_the_pods_dns() {
    rt().block_on(async {
        let mut env = PodEnv::new("exec-env").await;
        let (id, _, _) = env.run_main().await;
        let r = exec(
            &mut env.rt,
            &id,
            &[
                "sh",
                "-c",
                "echo $FROM_IMAGE; pwd; id -u; echo oops >&2; exit 3",
            ],
            10,
        )
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "yes\n/home/app\n0\n");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "oops\n");
        assert_eq!(r.exit_code, 3);
        let name = env.name.clone();
        assert_pod_files(&mut env.rt, &id, &name).await;
        env.remove().await;
    });
}

/// A read-only volume takes no writes, a read-write one reaches the host,
/// and writes to the rootfs stay in the container's own layer.
#[test]
fn writes_reach_writable_volumes_only_and_never_the_shared_image_layer() {
    rt().block_on(async {
        let mut env = PodEnv::new("writes").await;
        let (id, data, rw) = env.run_main().await;
        let r = exec(&mut env.rt, &id, &["cat", "/data/file"], 10)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "host data\n");
        let r = exec(&mut env.rt, &id, &["touch", "/data/new"], 10)
            .await
            .unwrap();
        assert_ne!(r.exit_code, 0, "a read-only volume was writable");
        assert!(!data.join("new").exists());
        let r = exec(
            &mut env.rt,
            &id,
            &["sh", "-c", "echo from-container > /rw/f"],
            10,
        )
        .await
        .unwrap();
        assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(
            std::fs::read_to_string(rw.join("f")).unwrap(),
            "from-container\n"
        );
        let r = exec(
            &mut env.rt,
            &id,
            &["sh", "-c", "echo changed > /etc/passwd && cat /etc/passwd"],
            10,
        )
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "changed\n");
        let layers = env.dir.join("root/content/layers");
        for l in std::fs::read_dir(&layers)
            .unwrap()
            .flatten()
            .filter(|l| l.path().is_dir())
        {
            let p = std::fs::read_to_string(l.path().join("etc/passwd")).unwrap();
            assert!(
                p.starts_with("root:x:0:0"),
                "the shared layer was modified: {p}"
            );
        }
        env.remove().await;
    });
}

#[test]
fn exec_sync_times_out_and_refuses_bad_commands_with_their_codes() {
    rt().block_on(async {
        let mut env = PodEnv::new("exec-errors").await;
        let (id, _, _) = env.run_main().await;
        // A timeout kills the exec and says so.
        let t0 = Instant::now();
        let e = exec(&mut env.rt, &id, &["sleep", "30"], 1)
            .await
            .expect_err("timeout");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(15));
        assert_eq!(
            exec(&mut env.rt, &id, &[], 1).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            exec(&mut env.rt, "nope", &["true"], 1)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        let missing = exec(&mut env.rt, &id, &["/no/such/binary"], 5)
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
        assert!(missing.message().contains("/no/such/binary"), "{missing:?}");
        env.remove().await;
    });
}

#[test]
fn run_as_username_from_the_image_applies_to_the_container_and_its_execs() {
    rt().block_on(async {
        let mut env = PodEnv::new("named-user").await;
        let mut user = env.container(
            "user",
            &["sh", "-c", "id -u; id -g; id -G; exec sleep 3600"],
        );
        user.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_username: "app".into(),
                supplemental_groups: vec![4242],
                ..Default::default()
            }),
            ..Default::default()
        });
        let uid = env.run(user).await;
        let text = wait_for_log(&env.logs.join("user/0.log"), "4242").await;
        let lines: Vec<String> = parse_cri_log(&text).into_iter().map(|e| e.2).collect();
        assert_eq!(
            lines[..2],
            ["1000".to_string(), "1000".to_string()],
            "{text}"
        );
        assert!(
            lines[2].split(' ').any(|g| g == "10") && lines[2].contains("4242"),
            "{text}"
        );
        let st = cstatus(&mut env.rt, &uid).await.unwrap();
        let u = st.user.unwrap().linux.unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        // Execs run as the container's user, as in containerd.
        let r = exec(&mut env.rt, &uid, &["id", "-u"], 10).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "1000\n");
        env.remove().await;
    });
}

/// A container that ends says how: its exit code and reason (OOMKilled
/// past its memory limit), its times, and its last output.
#[test]
fn ended_containers_report_exit_code_and_reason_oom_kills_included() {
    rt().block_on(async {
        let mut env = PodEnv::new("ended").await;
        let mut hog = env.container(
            "hog",
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        );
        hog.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let hog = env.run(hog).await;
        let quick = env
            .run(env.container("quick", &["sh", "-c", "echo bye; exit 7"]))
            .await;
        let st = wait_state(&mut env.rt, &hog, cri::ContainerState::ContainerExited).await;
        assert_eq!(
            (st.reason.as_str(), st.exit_code),
            ("OOMKilled", 137),
            "{st:?}"
        );
        env.rt
            .remove_container(cri::RemoveContainerRequest { container_id: hog })
            .await
            .unwrap();
        let st = wait_state(&mut env.rt, &quick, cri::ContainerState::ContainerExited).await;
        assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"), "{st:?}");
        assert!(
            st.finished_at >= st.started_at && st.started_at > 0,
            "{st:?}"
        );
        wait_for_log(&env.logs.join("quick/0.log"), "stdout F bye").await;
        env.remove().await;
    });
}

#[test]
fn the_images_cmd_runs_when_the_config_gives_none() {
    rt().block_on(async {
        let mut env = PodEnv::new("image-cmd").await;
        env.run(env.container("default-cmd", &[])).await;
        wait_for_log(&env.logs.join("default-cmd/0.log"), "from-image-cmd").await;
        env.remove().await;
    });
}

/// Three running containers (`main`, `user`, `default-cmd`; `user` is the
/// only one labelled `app=user`) and one that has exited (`quick`).
async fn three_running_one_exited(env: &mut PodEnv) -> (String, String, String) {
    let (main, _, _) = env.run_main().await;
    let user = env
        .run(env.container("user", &["sh", "-c", "exec sleep 3600"]))
        .await;
    env.run(env.container("default-cmd", &[])).await;
    let quick = env
        .run(env.container("quick", &["sh", "-c", "echo bye; exit 7"]))
        .await;
    wait_state(&mut env.rt, &quick, cri::ContainerState::ContainerExited).await;
    (main, user, quick)
}

#[test]
fn list_containers_filters_by_state_label_pod_and_id_prefix() {
    rt().block_on(async {
        let mut env = PodEnv::new("list").await;
        let (id, uid, quick) = three_running_one_exited(&mut env).await;
        assert_eq!(env.list(Default::default()).await.len(), 4);
        let exited = env
            .list(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerExited as i32,
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(
            exited.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            [quick.as_str()]
        );
        let by_label = env
            .list(cri::ContainerFilter {
                label_selector: [("app".into(), "user".into())].into(),
                ..Default::default()
            })
            .await;
        assert_eq!(by_label.len(), 1);
        assert_eq!(by_label[0].id, uid);
        assert_eq!(
            env.list(cri::ContainerFilter {
                pod_sandbox_id: "ffff".into(),
                ..Default::default()
            })
            .await
            .len(),
            0
        );
        assert_eq!(
            env.list(cri::ContainerFilter {
                id: id[..12].into(),
                ..Default::default()
            })
            .await
            .len(),
            1
        );
        env.remove().await;
    });
}

#[test]
fn stats_come_from_the_running_containers_and_their_pod() {
    rt().block_on(async {
        let mut env = PodEnv::new("stats").await;
        let (id, _, _) = three_running_one_exited(&mut env).await;
        let stats = env
            .rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
        assert_eq!(stats.attributes.unwrap().id, id);
        assert!(
            stats
                .memory
                .and_then(|m| m.usage_bytes)
                .is_some_and(|u| u.value > 0),
            "no memory usage"
        );
        let all = env
            .rt
            .list_container_stats(cri::ListContainerStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .stats;
        assert_eq!(all.len(), 3, "running containers only");
        let pod_stats = env
            .rt
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: env.pod.clone(),
            })
            .await
            .expect("PodSandboxStats")
            .into_inner()
            .stats
            .unwrap();
        let linux = pod_stats.linux.unwrap();
        assert_eq!(linux.containers.len(), 3, "running containers");
        assert!(linux
            .memory
            .and_then(|m| m.usage_bytes)
            .is_some_and(|u| u.value > 0));
        assert!(linux
            .process
            .and_then(|p| p.process_count)
            .is_some_and(|n| n.value >= 3));
        let listed = env
            .rt
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .stats;
        assert_eq!(listed.len(), 1);
        env.remove().await;
    });
}

#[test]
fn updated_resource_limits_reach_the_containers_cgroup_and_bad_ones_are_refused() {
    rt().block_on(async {
        let mut env = PodEnv::new("update").await;
        let (id, _, _) = env.run_main().await;
        env.rt
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.clone(),
                linux: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 96 << 20,
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("UpdateContainerResources");
        let pod = &env.pod;
        let cg = |ctl: &str, file: &str| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{ctl}/vmcri/{pod}/{id}/{file}"))
                .or_else(|_| {
                    std::fs::read_to_string(format!("/sys/fs/cgroup/vmcri/{pod}/{id}/{file}"))
                })
                .unwrap_or_default()
        };
        let limit = cg("memory", "memory.limit_in_bytes") + &cg("", "memory.max");
        assert!(
            limit.contains(&(96u64 << 20).to_string()),
            "memory limit not applied: {limit:?}"
        );
        let bad = env
            .rt
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.clone(),
                linux: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: -1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
        env.remove().await;
    });
}

/// Stopping a pod ends its containers and takes no new ones; removing it
/// removes them, and only then can their image go.
#[test]
fn stopping_a_pod_ends_its_containers_and_removing_it_frees_their_image() {
    rt().block_on(async {
        let mut env = PodEnv::new("pod-stop").await;
        let (id, _, _) = env.run_main().await;
        // An image in use stays.
        assert_eq!(
            env.remove_image().await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        let pod_sandbox_id = env.pod.clone();
        env.rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id })
            .await
            .unwrap();
        let st = cstatus(&mut env.rt, &id).await.unwrap();
        assert_eq!(
            st.state,
            cri::ContainerState::ContainerExited as i32,
            "{st:?}"
        );
        let r = env.create(env.container("late", &["true"])).await;
        assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
        let pod_sandbox_id = env.pod.clone();
        env.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
            .await
            .unwrap();
        assert!(env.list(Default::default()).await.is_empty());
        // With no container left, the image can go.
        env.remove_image().await.expect("RemoveImage once unused");
    });
}

#[test]
fn log_rotation_loses_nothing() {
    let s = Scratch::new("containers-rotate").unwrap();
    let setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let pod = run_pod(&mut rt, "rotate", &logs).await;
        // A fast writer, in bursts of 200 lines, still writing when the
        // log is rotated.
        let id = create(&mut rt, &pod, container("count", &setup.image, &["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); echo $i; [ $((i % 200)) = 0 ] && sleep 0.02; done; exec sleep 3600"]), &logs)
            .await
            .unwrap();
        rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
        let log = logs.join("count/0.log");
        wait_for_log(&log, " 500\n").await;
        let rotated = logs.join("count/0.log.1");
        std::fs::rename(&log, &rotated).unwrap();
        rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: id.clone() }).await.expect("ReopenContainerLog");
        let rest = wait_for_log(&log, " 20000\n").await;
        assert!(!rest.contains(" 500\n"), "the rotation came too late to test anything");
        let mut numbers = Vec::new();
        for f in [&rotated, &log] {
            for (_, tag, text) in parse_cri_log(&std::fs::read_to_string(f).unwrap()) {
                assert_eq!(tag, "F");
                numbers.push(text.parse::<u32>().unwrap());
            }
        }
        assert_eq!(numbers, (1..=20000).collect::<Vec<_>>(), "lines lost or reordered across rotation");
        assert_eq!(
            rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: "nope".into() }).await.unwrap_err().code(),
            Code::NotFound
        );
        rt.stop_container(cri::StopContainerRequest { container_id: id.clone(), timeout: 0 }).await.unwrap();
        assert_eq!(
            rt.reopen_container_log(cri::ReopenContainerLogRequest { container_id: id.clone() }).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    });
}

#[test]
fn daemon_kill_9_keeps_containers_running_and_logging() {
    let s = Scratch::new("containers-kill9").unwrap();
    let mut setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let pod = run_pod(&mut rt, "survivor", &logs).await;
        let ticker = create(
            &mut rt,
            &pod,
            container(
                "ticker",
                &setup.image,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done",
                ],
            ),
            &logs,
        )
        .await
        .unwrap();
        let ender = create(
            &mut rt,
            &pod,
            container("ender", &setup.image, &["sh", "-c", "sleep 2; exit 4"]),
            &logs,
        )
        .await
        .unwrap();
        create(
            &mut rt,
            &pod,
            container("waiting", &setup.image, &["true"]),
            &logs,
        )
        .await
        .unwrap();
        for id in [&ticker, &ender] {
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        }
        wait_for_log(&logs.join("ticker/0.log"), "tick-3\n").await;
    });
    setup.daemon.kill9();
    // The ender exits while no daemon watches.
    std::thread::sleep(Duration::from_secs(3));
    setup.daemon.restart();
    rt().block_on(async {
        let (mut rt, _) = clients(&setup.daemon).await;
        let all = rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
        let by_name = |n: &str| {
            all.iter()
                .find(|c| c.metadata.as_ref().unwrap().name == n)
                .unwrap()
                .id
                .clone()
        };
        let (ticker, ender, waiting) = (by_name("ticker"), by_name("ender"), by_name("waiting"));
        assert_eq!(
            cstatus(&mut rt, &ticker).await.unwrap().state,
            cri::ContainerState::ContainerRunning as i32
        );
        assert_eq!(
            cstatus(&mut rt, &waiting).await.unwrap().state,
            cri::ContainerState::ContainerCreated as i32
        );
        let st = wait_state(&mut rt, &ender, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 4, "{st:?}");
        // Logging goes on where it stopped: no tick lost, none twice.
        let log = logs.join("ticker/0.log");
        let before = std::fs::read_to_string(&log).unwrap().lines().count();
        wait_for_log(&log, &format!("tick-{}\n", before + 20)).await;
        let ticks: Vec<u32> = parse_cri_log(&std::fs::read_to_string(&log).unwrap())
            .into_iter()
            .map(|e| e.2.trim_start_matches("tick-").parse().unwrap())
            .collect();
        assert_eq!(
            ticks,
            (1..=u32::try_from(ticks.len()).unwrap()).collect::<Vec<_>>(),
            "ticks lost or repeated across the restart"
        );
        let r = exec(&mut rt, &ticker, &["echo", "still here"], 10)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout), "still here\n");
        // The created one can still start.
        rt.start_container(cri::StartContainerRequest {
            container_id: waiting.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rt, &waiting, cri::ContainerState::ContainerExited).await;
        assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pods[0].id.clone(),
        })
        .await
        .unwrap();
    });
}

/// The core lifecycle in a microVM on this machine's KVM: the container
/// runs from its image's layers (shared over virtio-fs, overlaid in the
/// guest), writes only its own layer, sees its host volumes read-only or
/// read-write as asked, and sees host-side updates; stopping and removing
/// the pod ends the VMM and leaves the host's files alone.
#[test]
fn microvm_container_runs_from_its_image_and_sees_its_volumes() {
    let s = Scratch::new("containers-microvm").unwrap();
    let setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    let (data, rw) = host_volumes(&setup.dir, "v1\n");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let t0 = Instant::now();
        let pod = run_pod_with(&mut rt, "vm", &logs, "vmcri").await;
        eprintln!("microVM pod ready in {:?}", t0.elapsed());
        let mut c = container(
            "app",
            &setup.image,
            &["sh", "-c", "cat /etc/image-file; exec sleep 3600"],
        );
        c.mounts = vec![
            cri::Mount {
                container_path: "/data".into(),
                host_path: data.display().to_string(),
                readonly: true,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/rw".into(),
                host_path: rw.display().to_string(),
                ..Default::default()
            },
        ];
        let t0 = Instant::now();
        let id = create(&mut rt, &pod, c, &logs)
            .await
            .expect("CreateContainer in a microVM");
        eprintln!("CreateContainer in {:?}", t0.elapsed());
        let t0 = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
        let text = wait_for_log(&logs.join("app/0.log"), "from the image").await;
        eprintln!("StartContainer to first log line in {:?}", t0.elapsed());
        assert!(text.contains("stdout F from the image"), "{text}");

        let run = |cmd: &str| {
            let mut rt = rt.clone();
            let id = id.clone();
            let cmd = vec!["sh".to_string(), "-c".to_string(), cmd.to_string()];
            async move {
                rt.exec_sync(cri::ExecSyncRequest {
                    container_id: id,
                    cmd,
                    timeout: 120,
                })
                .await
                .expect("ExecSync")
                .into_inner()
            }
        };
        let t0 = Instant::now();
        let r = run("echo changed > /etc/image-file && cat /etc/image-file").await;
        eprintln!("ExecSync in {:?}", t0.elapsed());
        assert_eq!(
            (r.exit_code, String::from_utf8_lossy(&r.stdout).as_ref()),
            (0, "changed\n"),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        for l in std::fs::read_dir(setup.dir.join("root/content/layers"))
            .unwrap()
            .flatten()
            .filter(|l| l.path().is_dir())
        {
            let f = std::fs::read_to_string(l.path().join("etc/image-file")).unwrap();
            assert_eq!(f, "from the image\n", "the shared layer was modified");
        }
        assert_pod_files(&mut rt.clone(), &id, "vm").await;
        let r = run("cat /data/file").await;
        assert_eq!(String::from_utf8_lossy(&r.stdout), "v1\n");
        let r = run("touch /data/new").await;
        assert_ne!(r.exit_code, 0, "a read-only volume was writable");
        assert!(!data.join("new").exists());
        let r = run("echo from-vm > /rw/f").await;
        assert_eq!(r.exit_code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "from-vm\n");
        // A host-side update (as kubelet makes to a ConfigMap) shows.
        std::fs::write(data.join("file"), "v2\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = run("cat /data/file").await;
            if String::from_utf8_lossy(&r.stdout) == "v2\n" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the host update never showed: {:?}",
                String::from_utf8_lossy(&r.stdout)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 10,
        })
        .await
        .expect("StopContainer");
        let st = cstatus(&mut rt, &id).await.unwrap();
        assert_eq!(
            (st.state, st.exit_code),
            (cri::ContainerState::ContainerExited as i32, 143),
            "{st:?}"
        );
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("RemoveContainer");

        let status = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
        assert_eq!(info["backend"], "microvm");
        let vmm_pid = info["pid"].as_i64().unwrap();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        let cmdline =
            std::fs::read_to_string(format!("/proc/{vmm_pid}/cmdline")).unwrap_or_default();
        assert!(
            !cmdline.contains("vmcri-vmm"),
            "the VMM is gone after StopPodSandbox"
        );
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    });
    // Removing the pod unmounted its share before deleting it.
    assert_eq!(std::fs::read_to_string(data.join("file")).unwrap(), "v2\n");
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "from-vm\n");
    assert!(
        std::fs::read_dir(setup.dir.join("root/content/layers"))
            .unwrap()
            .count()
            > 0
    );
}

/// What kubelet sends on every container (`hugepage_limits` of 0 for
/// each page size; see `../shared/kubelet-requests/`) and on Guaranteed
/// QoS ones (`oom_score_adj` -997, which this host cannot set: it lacks
/// CAP_SYS_RESOURCE) runs in the process backend; the score is raised to
/// the daemon's own. ExecSync of `[""]` is InvalidArgument.
#[test]
fn kubelets_guaranteed_qos_containers_run_in_the_process_backend() {
    let s = Scratch::new("containers-qos").unwrap();
    let setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let pod = run_pod(&mut rt, "qos", &logs).await;
        let mut c = container(
            "qos",
            &setup.image,
            &["sh", "-c", "echo started; exec sleep 3600"],
        );
        c.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 128 << 20,
                oom_score_adj: -997,
                hugepage_limits: vec![
                    cri::HugepageLimit {
                        page_size: "2MB".into(),
                        limit: 0,
                    },
                    cri::HugepageLimit {
                        page_size: "1GB".into(),
                        limit: 0,
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = create(&mut rt, &pod, c, &logs)
            .await
            .expect("CreateContainer as kubelet sends it");
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer with oom_score_adj -997");
        wait_for_log(&logs.join("qos/0.log"), "started").await;
        let own = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        let r = exec(&mut rt, &id, &["cat", "/proc/self/oom_score_adj"], 60)
            .await
            .expect("ExecSync");
        let got = String::from_utf8_lossy(&r.stdout).trim().to_string();
        // Raised to the daemon's own (the test's, which it inherits) where
        // it could not be lowered; -997 where the host allows it.
        assert!(got == own.trim() || got == "-997", "oom_score_adj {got}");
        let e = exec(&mut rt, &id, &[""], 60).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    });
}
