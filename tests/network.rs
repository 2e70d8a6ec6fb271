//! Pod networking through CNI in the `process` backend, with Debian's
//! containernetworking-plugins (bridge, host-local, portmap, loopback):
//! pod IPs, pod-to-pod and namespace-to-pod traffic, hostPorts, teardown
//! that leaves nothing, readiness, and the faults (a failing plugin, a
//! daemon killed mid-ADD).
//!
//! Every test runs the daemon, its bridge and its pods in a network
//! namespace of its own (`TestNetns`), with its own 10.244.X.0/24; no
//! packet leaves it but the registry forwarder's, loopback to loopback.

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;
use vmcri_tests::network::*;
use vmcri_tests::pods::*;
use vmcri_tests::registry::{busybox_layout, push, start_registry, Entry, Registry};
use vmcri_tests::streams::spdy_forward;
use vmcri_tests::{artifacts, Daemon, Scratch};

/// A daemon in a test namespace, with the web image in a registry it
/// reaches, and the test's CNI directories.
struct Net {
    ns: TestNetns,
    daemon: Daemon,
    image: String,
    dir: PathBuf,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    ipam_dir: PathBuf,
    _registry: Registry,
}

/// Sets up `tag`'s namespace, registry and daemon; `conflist` (given the
/// IPAM dir) is written first when given.
fn net(s: &Scratch, tag: &str, conflist: Option<&dyn Fn(&Path) -> String>) -> Net {
    let ns = TestNetns::new(tag);
    let registry = start_registry(&s.0);
    let layout = busybox_layout(
        &s.0,
        &[Entry::Symlink("bin/httpd", "busybox")],
        IMAGE_CONFIG,
    );
    push(&layout, registry.port, "web");
    ns.forward_loopback(registry.port);
    let conf_dir = s.0.join("net.d");
    let bin_dir = s.0.join("cni-bin");
    let ipam_dir = s.0.join("ipam");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    if let Some(c) = conflist {
        std::fs::write(conf_dir.join("10-test.conflist"), c(&ipam_dir)).unwrap();
    }
    let a = artifacts();
    // The default handler runs process pods; `vmcri` runs microVMs.
    let config = format!(
        "default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n[process]\nagent = \"{}\"\n[microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\n[handlers.vmcri]\nbackend = \"microvm\"\nvcpus = 1\nmemory_mib = 256\n[agent]\nstop_timeout_secs = 5\ncall_timeout_secs = 180\n{}",
        a.agent.display(),
        a.kernel.display(),
        a.agent_initrd.display(),
        a.vmm.display(),
        cni_config(&conf_dir, &[&bin_dir, Path::new(DEBIAN_CNI_BIN)]),
    );
    let daemon = Daemon::start_in(&s.0, &config, Some(&ns.path()));
    Net {
        image: format!("127.0.0.1:{}/web:v1", registry.port),
        ns,
        daemon,
        dir: s.0.clone(),
        conf_dir,
        bin_dir,
        ipam_dir,
        _registry: registry,
    }
}

impl Net {
    /// A plugin script in the test's bin dir (looked up before Debian's).
    fn plugin(&self, name: &str, body: &str) {
        let p = self.bin_dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Asserts nothing of any pod is left: no lease, no namespace file,
    /// no veth.
    fn assert_clean(&self) {
        assert_eq!(leases(&self.ipam_dir), Vec::<String>::new(), "leases left");
        let netns: Vec<_> = std::fs::read_dir(self.daemon.root.join("netns"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(netns.is_empty(), "namespace files left: {netns:?}");
        let veths: Vec<String> = self
            .ns
            .links()
            .into_iter()
            .filter(|l| l.contains("veth"))
            .collect();
        assert!(veths.is_empty(), "veths left: {veths:?}");
    }
}

async fn network_ready(rt: &mut RuntimeServiceClient<Channel>) -> cri::RuntimeCondition {
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    status
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap()
}

fn web_pod(name: &str, logs: &Path, host_port: Option<i32>) -> cri::PodSandboxConfig {
    let mut c = pod_config(name, logs);
    if let Some(p) = host_port {
        c.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port: p,
            host_ip: String::new(),
        }];
    }
    c
}

async fn run(
    rt: &mut RuntimeServiceClient<Channel>,
    config: cri::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    run_with(rt, config, "").await
}

async fn run_with(
    rt: &mut RuntimeServiceClient<Channel>,
    config: cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: handler.into(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn pod_status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> cri::PodSandboxStatus {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

/// Starts busybox httpd serving `body` in pod `pod`; its container ID.
async fn serve(rt: &mut RuntimeServiceClient<Channel>, n: &Net, pod: &str, body: &str) -> String {
    let script = format!(
        "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"
    );
    create_started(
        rt,
        pod,
        container(&format!("web-{body}"), &n.image, &["sh", "-c", &script]),
        &n.dir,
    )
    .await
}

/// The body `GET /` of `ip`:80 gives, from inside container `id`, retried
/// while httpd comes up.
async fn fetch_in(rt: &mut RuntimeServiceClient<Channel>, id: &str, ip: &str) -> String {
    fetch_in_within(rt, id, ip, Duration::from_secs(20)).await
}

/// [`fetch_in`], retrying for up to `patience`: an exec in a microVM
/// takes seconds on software-nested KVM, more while other VMs boot.
async fn fetch_in_within(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    ip: &str,
    patience: Duration,
) -> String {
    let deadline = Instant::now() + patience;
    let script = http_get("nc", ip, 80);
    let exec_timeout = i64::try_from(patience.as_secs())
        .unwrap_or(i64::MAX)
        .max(10);
    loop {
        let r = exec(rt, id, &["sh", "-c", &script], exec_timeout)
            .await
            .expect("ExecSync");
        let out = String::from_utf8_lossy(&r.stdout);
        if let Some(body) = ok_body(&out) {
            return body;
        }
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(Instant::now() < deadline, "{ip}: {out} {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The body `GET /` of `addr` (`ip:port`) gives, from the test namespace
/// (the host's busybox `nc`), retried while httpd comes up.
async fn fetch_from_ns(ns: &TestNetns, addr: &str) -> String {
    fetch_from_ns_within(ns, addr, Duration::from_secs(20)).await
}

/// [`fetch_from_ns`], retrying for up to `patience` (a server in a
/// microVM takes a while to listen on software-nested KVM).
async fn fetch_from_ns_within(ns: &TestNetns, addr: &str, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    let (ip, port) = addr.rsplit_once(':').expect("ip:port");
    let script = http_get("busybox nc", ip, port.parse().expect("a port"));
    loop {
        let out = ns.output(&["sh", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(body) = ok_body(&text) {
            return body;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(Instant::now() < deadline, "{addr}: {text} {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The body `GET /` of port 80 in pod `pod` gives through CRI
/// PortForward (SPDY, as kubectl port-forward), from the test's side of
/// a loopback forwarder into the daemon's namespace.
async fn fetch_forwarded(rt: &mut RuntimeServiceClient<Channel>, n: &Net, pod: &str) -> String {
    let url = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![80],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    const LOOPBACK: &str = "http://127.0.0.1:";
    let (port, path) = url
        .strip_prefix(LOOPBACK)
        .and_then(|rest| rest.split_once('/'))
        .expect("a streaming URL on loopback, with a port and a path");
    let local = n.ns.forward_into(port.parse().expect("a port"));
    let url = format!("{LOOPBACK}{local}/{path}");
    let get = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    let r = spdy_forward(&url, &[(80, get)])
        .await
        .expect("port-forward over SPDY");
    let text = String::from_utf8_lossy(&r[0].data).into_owned();
    ok_body(&text).unwrap_or_else(|| panic!("port-forward to {pod}:80: {text} {}", r[0].error))
}

/// Kills pod `id`'s sandbox process (a process pod's agent, a microVM
/// pod's VMM) with SIGKILL and waits up to `patience` until the pod is
/// NOTREADY; the pod's verbose info, read before.
async fn kill_sandbox_process(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    patience: Duration,
) -> serde_json::Value {
    let verbose = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(&verbose.info["info"]).expect("verbose info");
    let pid = i32::try_from(info["pid"].as_i64().expect("a pid")).expect("a pid");
    // SAFETY: kill(2) of the sandbox process of a pod this test made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + patience;
    while pod_status(rt, id).await.state != cri::PodSandboxState::SandboxNotready as i32 {
        assert!(Instant::now() < deadline, "pod {id} is still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info
}

async fn stop_and_remove(rt: &mut RuntimeServiceClient<Channel>, id: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("StopPodSandbox");
    // Idempotent: DEL ran once.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("a second StopPodSandbox");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

#[test]
fn pods_get_ips_reach_each_other_and_leave_nothing() {
    let s = Scratch::new("net-pods").unwrap();
    let n = net(
        &s,
        "pods",
        Some(&|ipam| conflist("cni0", "10.244.71.0/24", ipam, &[])),
    );
    rt().block_on(async {
        let (mut rt, mut images) = clients(&n.daemon).await;
        let ready = network_ready(&mut rt).await;
        assert!(ready.status, "{ready:?}");
        pull(&mut images, &n.image).await;

        let t = Instant::now();
        let a = run(&mut rt, web_pod("net-a", &n.dir, Some(18080)))
            .await
            .expect("RunPodSandbox a");
        eprintln!("RunPodSandbox with CNI took {:?}", t.elapsed());
        let b = run(&mut rt, web_pod("net-b", &n.dir, None))
            .await
            .expect("RunPodSandbox b");
        let ip =
            |s: &cri::PodSandboxStatus| s.network.as_ref().expect("a network status").ip.clone();
        let (ip_a, ip_b) = (
            ip(&pod_status(&mut rt, &a).await),
            ip(&pod_status(&mut rt, &b).await),
        );
        for ip in [&ip_a, &ip_b] {
            assert!(ip.starts_with("10.244.71."), "{ip}");
        }
        assert_ne!(ip_a, ip_b);
        assert!(n.daemon.root.join("netns").join(&a).exists());

        let ca = serve(&mut rt, &n, &a, "pod-a").await;
        let cb = serve(&mut rt, &n, &b, "pod-b").await;
        // Pod to pod, both ways, by IP.
        assert_eq!(fetch_in(&mut rt, &cb, &ip_a).await, "pod-a");
        assert_eq!(fetch_in(&mut rt, &ca, &ip_b).await, "pod-b");
        // The test's namespace reaches every pod.
        assert_eq!(fetch_from_ns(&n.ns, &format!("{ip_a}:80")).await, "pod-a");
        assert_eq!(fetch_from_ns(&n.ns, &format!("{ip_b}:80")).await, "pod-b");
        // The hostPort, on the namespace's bridge address.
        assert_eq!(fetch_from_ns(&n.ns, "10.244.71.1:18080").await, "pod-a");
        // Port-forward reaches the pod's own localhost in its netns.
        assert_eq!(fetch_forwarded(&mut rt, &n, &b).await, "pod-b");
        assert_eq!(leases(&n.ipam_dir).len(), 2);

        rt.stop_container(cri::StopContainerRequest {
            container_id: ca.clone(),
            timeout: 2,
        })
        .await
        .expect("StopContainer");
        stop_and_remove(&mut rt, &a).await;
        assert_eq!(leases(&n.ipam_dir).len(), 1);

        // Pod b's agent dies: its stop still releases its network.
        let info = kill_sandbox_process(&mut rt, &b, Duration::from_secs(10)).await;
        assert_eq!(info["network"]["ips"][0]["address"], format!("{ip_b}/24"));
        stop_and_remove(&mut rt, &b).await;
        n.assert_clean();
        // The hostPort's rules went with the pod.
        let nat = n.ns.run(&["iptables-save", "-t", "nat"]);
        assert!(!nat.contains("18080"), "{nat}");
    });
}

#[test]
fn without_a_valid_config_the_network_is_not_ready_and_pods_do_not_start() {
    let s = Scratch::new("net-notready").unwrap();
    let n = net(&s, "notready", None);
    rt().block_on(async {
        let (mut rt, _) = clients(&n.daemon).await;
        let c = network_ready(&mut rt).await;
        assert!(!c.status);
        assert_eq!(c.reason, "NetworkPluginNotReady");
        assert!(
            c.message.contains("no network config found"),
            "{}",
            c.message
        );

        std::fs::write(
            n.conf_dir.join("10-test.conflist"),
            "{\"cniVersion\":\"1.0.0\",",
        )
        .unwrap();
        let c = network_ready(&mut rt).await;
        assert!(!c.status);
        assert!(
            c.message.contains("10-test.conflist: invalid JSON"),
            "{}",
            c.message
        );
        let e = run(&mut rt, web_pod("nope", &n.dir, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("cni plugin not initialized"),
            "{}",
            e.message()
        );

        // A plugin that is not installed.
        std::fs::write(
            n.conf_dir.join("10-test.conflist"),
            conflist(
                "cni1",
                "10.244.72.0/24",
                &n.ipam_dir,
                &[r#"{"type":"no-such-plugin"}"#],
            ),
        )
        .unwrap();
        let c = network_ready(&mut rt).await;
        assert!(c.message.contains("no-such-plugin"), "{}", c.message);

        // Fixed: ready, without a restart.
        std::fs::write(
            n.conf_dir.join("10-test.conflist"),
            conflist("cni1", "10.244.72.0/24", &n.ipam_dir, &[]),
        )
        .unwrap();
        assert!(network_ready(&mut rt).await.status);
        let listed = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(listed.is_empty());
    });
}

#[test]
fn a_plugin_failing_mid_add_leaks_nothing() {
    let s = Scratch::new("net-fail").unwrap();
    let n = net(
        &s,
        "fail",
        Some(&|ipam| conflist("cni2", "10.244.73.0/24", ipam, &[r#"{"type":"fail-add"}"#])),
    );
    // After bridge and host-local did their part.
    n.plugin(
        "fail-add",
        "cat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then echo '{\"cniVersion\":\"1.0.0\",\"code\":101,\"msg\":\"fail-add refuses\",\"details\":\"on purpose\"}'; exit 1; fi",
    );
    rt().block_on(async {
        let (mut rt, _) = clients(&n.daemon).await;
        assert!(network_ready(&mut rt).await.status);
        let e = run(&mut rt, web_pod("doomed", &n.dir, Some(18081)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains(
                "CNI plugin fail-add ADD failed: fail-add refuses (code 101): on purpose"
            ),
            "{}",
            e.message()
        );
        let listed = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(listed.is_empty(), "{listed:?}");
        n.assert_clean();
        let sandboxes: Vec<_> = std::fs::read_dir(n.daemon.root.join("sandboxes"))
            .unwrap()
            .flatten()
            .collect();
        assert!(sandboxes.is_empty(), "{sandboxes:?}");
    });
}

#[test]
fn a_daemon_killed_between_add_and_ready_cleans_up_on_restart() {
    let s = Scratch::new("net-crash").unwrap();
    let mut n = net(
        &s,
        "crash",
        Some(&|ipam| conflist("cni3", "10.244.74.0/24", ipam, &[r#"{"type":"block-add"}"#])),
    );
    // Passes the previous result on, but first, while `block` exists,
    // says so and waits: the daemon is killed meanwhile.
    let block = n.dir.join("block");
    let blocked = n.dir.join("blocked");
    n.plugin(
        "block-add",
        &format!(
            "input=$(cat)\nif [ \"$CNI_COMMAND\" = ADD ] && [ -e {block} ]; then echo $$ > {blocked}.tmp; mv {blocked}.tmp {blocked}; exec sleep 60; fi\n[ \"$CNI_COMMAND\" = ADD ] && printf '%s' \"$input\" | jq -c .prevResult\ntrue",
            block = block.display(),
            blocked = blocked.display()
        ),
    );
    std::fs::write(&block, "").unwrap();
    rt().block_on(async {
        let (rt, _) = clients(&n.daemon).await;
        let mut rt2 = rt.clone();
        let dir = n.dir.clone();
        let pending =
            tokio::spawn(async move { run(&mut rt2, web_pod("crash", &dir, None)).await });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !blocked.exists() {
            assert!(Instant::now() < deadline, "the plugin never blocked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // bridge and host-local ran: an address is leased, a veth made.
        assert_eq!(leases(&n.ipam_dir).len(), 1);
        assert!(n.ns.links().iter().any(|l| l.contains("veth")));
        n.daemon.kill9();
        let pid: i32 = std::fs::read_to_string(&blocked)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) of the plugin process this test made block.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(pending.await.unwrap().is_err());
        std::fs::remove_file(&block).unwrap();

        n.daemon.restart();
        let (mut rt, _) = clients(&n.daemon).await;
        // Recovery ran DEL and removed the namespace before serving.
        n.assert_clean();
        let listed = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].state,
            cri::PodSandboxState::SandboxNotready as i32
        );
        let st = pod_status(&mut rt, &listed[0].id).await;
        assert_eq!(st.network, None);
        stop_and_remove(&mut rt, &listed[0].id).await;
        n.assert_clean();
        assert!(rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty());
    });
}

/// The product path: microVM pods on the same bridge as a process pod.
/// Each VM's NIC is a tap beside its pod's CNI veth with tc redirects
/// both ways, configured in the guest with the CNI addresses: the VMs
/// reach each other and the process pod, the test's namespace reaches
/// them, a hostPort reaches one, and removal leaves no lease, namespace
/// or veth (the taps lived in the pods' namespaces and went with them).
#[test]
fn microvm_pods_share_the_bridge_with_process_pods_and_leave_nothing() {
    let s = Scratch::new("net-vms").unwrap();
    let n = net(
        &s,
        "vms",
        Some(&|ipam| conflist("cni0", "10.244.72.0/24", ipam, &[])),
    );
    let patience = Duration::from_secs(240);
    rt().block_on(async {
        let (mut rt, mut images) = clients(&n.daemon).await;
        pull(&mut images, &n.image).await;
        // Both VMs boot at once, as kubelet would start them.
        let (mut rt_a, mut rt_b) = (rt.clone(), rt.clone());
        let (a, b) = tokio::join!(
            run_with(&mut rt_a, web_pod("vm-a", &n.dir, Some(18081)), "vmcri"),
            run_with(&mut rt_b, web_pod("vm-b", &n.dir, None), "vmcri"),
        );
        let (a, b) = (
            a.expect("RunPodSandbox vm-a"),
            b.expect("RunPodSandbox vm-b"),
        );
        let p = run(&mut rt, web_pod("proc", &n.dir, None))
            .await
            .expect("RunPodSandbox proc");
        let ip = |s: &cri::PodSandboxStatus| s.network.as_ref().expect("a pod IP").ip.clone();
        let ip_a = ip(&pod_status(&mut rt, &a).await);
        let ip_b = ip(&pod_status(&mut rt, &b).await);
        let ip_p = ip(&pod_status(&mut rt, &p).await);
        for ip in [&ip_a, &ip_b, &ip_p] {
            assert!(ip.starts_with("10.244.72."), "{ip}");
        }
        // In a VM pod's namespace: the tap, redirected to and from eth0.
        let pod_ns = n.daemon.root.join("netns").join(&a);
        let tc = n.ns.run(&[
            "nsenter",
            &format!("--net={}", pod_ns.display()),
            "tc",
            "filter",
            "show",
            "dev",
            "eth0",
            "ingress",
        ]);
        assert!(tc.contains("mirred") && tc.contains("vmtap0"), "{tc}");

        let (_, cb) = tokio::join!(
            serve(&mut rt_a, &n, &a, "vm-a"),
            serve(&mut rt_b, &n, &b, "vm-b")
        );
        let cp = serve(&mut rt, &n, &p, "proc").await;
        // Process pod -> VM, and VM -> VM (each VM's NIC both ways).
        assert_eq!(fetch_in_within(&mut rt, &cp, &ip_a, patience).await, "vm-a");
        assert_eq!(fetch_in_within(&mut rt, &cb, &ip_a, patience).await, "vm-a");
        // The test's namespace reaches the VMs, and vm-a through its
        // hostPort on the bridge address.
        assert_eq!(
            fetch_from_ns_within(&n.ns, &format!("{ip_b}:80"), patience).await,
            "vm-b"
        );
        assert_eq!(
            fetch_from_ns_within(&n.ns, "10.244.72.1:18081", patience).await,
            "vm-a"
        );
        // Port-forward goes through the agent to the guest's localhost,
        // beside the pod network.
        assert_eq!(fetch_forwarded(&mut rt, &n, &b).await, "vm-b");
        // vm-b's VMM dies: its stop still runs DEL (assert_clean below
        // finds its lease, netns and veth gone).
        kill_sandbox_process(&mut rt, &b, Duration::from_secs(60)).await;

        for pod in [&a, &b, &p] {
            stop_and_remove(&mut rt, pod).await;
        }
        n.assert_clean();
        let nat = n.ns.run(&["iptables-save", "-t", "nat"]);
        assert!(!nat.contains("18081"), "{nat}");
    });
}
