//! Every request in `../shared/kubelet-requests/` (what kubelet 1.32
//! sent to vmcri), replayed with our own IDs, image and paths through a
//! pod's whole life in the process backend. Each call succeeds, or fails
//! with the specific error the CRI documents for it; a microVM handler
//! refuses the hostNetwork pod up front.

use k8s_cri::v1 as cri;
use serde_json::Value;
use tonic::Code;
use vmcri_tests::kubelet::{all_captures, capture, captures, parse, set};
use vmcri_tests::pods::*;
use vmcri_tests::Scratch;

/// The captures this test replays; a new capture must be added here.
const REPLAYED: &[&str] = &[
    "ContainerStatus",
    "CreateContainer",
    "CreateContainer-guaranteed-qos",
    "CreateContainer-with-hugepage-limits",
    "Exec",
    "ExecSync",
    "ImageStatus",
    "ListContainerStats",
    "ListContainers",
    "ListPodSandbox",
    "PodSandboxStatus",
    "PortForward",
    "PullImage",
    "RemoveContainer",
    "RemovePodSandbox",
    "RunPodSandbox",
    "RunPodSandbox-hostnetwork",
    "StartContainer",
    "Status",
    "StopContainer",
    "StopPodSandbox",
];

#[test]
fn every_captured_kubelet_request_replays() {
    assert_eq!(
        all_captures(&captures()),
        REPLAYED.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "captures and replayed requests differ"
    );
    let s = Scratch::new("kubelet-replay").unwrap();
    let setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    let termination_log = setup.dir.join("termination-log");
    std::fs::write(&termination_log, "").unwrap();
    let image = setup.image.clone();
    // A capture with our paths and image in place of the capture's.
    let ours = |name: &str| -> Value {
        let mut v = capture(name);
        for p in ["/config/log_directory", "/sandbox_config/log_directory"] {
            if v.pointer(p).is_some() {
                set(&mut v, p, logs.display().to_string());
            }
        }
        if v.pointer("/config/image/image").is_some() {
            set(&mut v, "/config/image/image", image.clone());
        }
        if v.pointer("/image/image").is_some() {
            set(&mut v, "/image/image", image.clone());
        }
        if let Some(mounts) = v
            .pointer_mut("/config/mounts")
            .and_then(Value::as_array_mut)
        {
            for m in mounts {
                m["host_path"] = termination_log.display().to_string().into();
            }
        }
        v
    };
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        rt.status(parse::<cri::StatusRequest>(ours("Status")))
            .await
            .expect("Status");
        images
            .pull_image(parse::<cri::PullImageRequest>(ours("PullImage")))
            .await
            .expect("PullImage");
        let st = images
            .image_status(parse::<cri::ImageStatusRequest>(ours("ImageStatus")))
            .await
            .expect("ImageStatus")
            .into_inner();
        assert!(st.image.is_some(), "the pulled image is known");

        let pod = rt
            .run_pod_sandbox(parse::<cri::RunPodSandboxRequest>(ours("RunPodSandbox")))
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let hostnet = ours("RunPodSandbox-hostnetwork");
        let refused = rt
            .run_pod_sandbox({
                let mut r = parse::<cri::RunPodSandboxRequest>(hostnet.clone());
                r.runtime_handler = "vmcri".into();
                r
            })
            .await
            .expect_err("hostNetwork in a microVM");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        // The refusal left nothing: the same request runs in the process
        // backend.
        let hostnet_pod = rt
            .run_pod_sandbox(parse::<cri::RunPodSandboxRequest>(hostnet))
            .await
            .expect("RunPodSandbox with hostNetwork, process backend")
            .into_inner()
            .pod_sandbox_id;

        let with_pod = |name: &str| {
            let mut v = ours(name);
            set(&mut v, "/pod_sandbox_id", pod.clone());
            v
        };
        let status = rt
            .pod_sandbox_status(parse::<cri::PodSandboxStatusRequest>(with_pod(
                "PodSandboxStatus",
            )))
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.network, None);

        // The three container shapes kubelet sends; the one with hugepage
        // limits was captured in the hostNetwork pod, and asks for the
        // node's network.
        let mut ids = Vec::new();
        for (capture_name, name, in_pod) in [
            ("CreateContainer", "hello", &pod),
            (
                "CreateContainer-with-hugepage-limits",
                "hugepages",
                &hostnet_pod,
            ),
            ("CreateContainer-guaranteed-qos", "guaranteed", &pod),
        ] {
            let mut v = ours(capture_name);
            set(&mut v, "/pod_sandbox_id", in_pod.clone());
            set(&mut v, "/config/metadata/name", name);
            set(&mut v, "/config/log_path", format!("{name}/0.log"));
            let id = rt
                .create_container(parse::<cri::CreateContainerRequest>(v))
                .await
                .unwrap_or_else(|e| panic!("{capture_name}: {e:?}"))
                .into_inner()
                .container_id;
            ids.push(id);
        }
        let with_container = |name: &str, id: &str| {
            let mut v = ours(name);
            set(&mut v, "/container_id", id.to_string());
            v
        };
        for id in &ids {
            rt.start_container(parse::<cri::StartContainerRequest>(with_container(
                "StartContainer",
                id,
            )))
            .await
            .expect("StartContainer");
        }
        wait_for_log(&logs.join("hello/0.log"), "hello-from-kubelet").await;
        let hello = &ids[0];
        let cs = rt
            .container_status(parse::<cri::ContainerStatusRequest>(with_container(
                "ContainerStatus",
                hello,
            )))
            .await
            .expect("ContainerStatus")
            .into_inner();
        assert_eq!(
            cs.status.unwrap().state,
            cri::ContainerState::ContainerRunning as i32
        );
        let listed = rt
            .list_containers(parse::<cri::ListContainersRequest>(ours("ListContainers")))
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
        assert_eq!(listed.len(), 3);
        rt.list_pod_sandbox(parse::<cri::ListPodSandboxRequest>(ours("ListPodSandbox")))
            .await
            .expect("ListPodSandbox");
        let stats = rt
            .list_container_stats(parse::<cri::ListContainerStatsRequest>(ours(
                "ListContainerStats",
            )))
            .await
            .expect("ListContainerStats")
            .into_inner()
            .stats;
        assert_eq!(stats.len(), 3);
        // The captured ExecSync runs `[""]`: no program, InvalidArgument.
        let e = rt
            .exec_sync(parse::<cri::ExecSyncRequest>(with_container(
                "ExecSync", hello,
            )))
            .await
            .expect_err("ExecSync of an empty command");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let url = rt
            .exec(parse::<cri::ExecRequest>(with_container("Exec", hello)))
            .await
            .expect("Exec")
            .into_inner()
            .url;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        rt.port_forward(parse::<cri::PortForwardRequest>(with_pod("PortForward")))
            .await
            .expect("PortForward");

        for id in &ids {
            let mut stop = with_container("StopContainer", id);
            // kubelet's 30 s grace; the shell ignores SIGTERM as PID 1.
            set(&mut stop, "/timeout", 2);
            rt.stop_container(parse::<cri::StopContainerRequest>(stop))
                .await
                .expect("StopContainer");
            rt.remove_container(parse::<cri::RemoveContainerRequest>(with_container(
                "RemoveContainer",
                id,
            )))
            .await
            .expect("RemoveContainer");
        }
        for p in [&pod, &hostnet_pod] {
            let mut stop = ours("StopPodSandbox");
            set(&mut stop, "/pod_sandbox_id", p.to_string());
            rt.stop_pod_sandbox(parse::<cri::StopPodSandboxRequest>(stop))
                .await
                .expect("StopPodSandbox");
            let mut remove = ours("RemovePodSandbox");
            set(&mut remove, "/pod_sandbox_id", p.to_string());
            rt.remove_pod_sandbox(parse::<cri::RemovePodSandboxRequest>(remove))
                .await
                .expect("RemovePodSandbox");
        }
        let left = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(left.is_empty(), "{left:?}");
    });
}
