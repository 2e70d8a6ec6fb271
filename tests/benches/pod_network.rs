//! Pod-to-pod TCP on CNI bridges (Debian's bridge + host-local +
//! portmap + loopback), all inside a network namespace of the bench's
//! own: bulk throughput (`vmcri-netblast`, 256 KiB per call, or busybox
//! `dd | nc` with `--tool busybox`), small requests on fresh connections
//! (`vmcri-netblast ping`/`serve`, nothing forked) and HTTP requests
//! (busybox `nc` to busybox `httpd`), between containerd+runc pods (the
//! reference, with the same conflist on a bridge of its own), between
//! vmcri process pods (host veths on a bridge: the kernel path a runc
//! pod takes), and to and from a microVM pod (virtio-net on a tap,
//! tc-redirected to its CNI veth).
//!
//! `cargo bench -p vmcri-tests --bench pod_network [-- --mib N] [--only
//! cc,lc,pp,pv,vp,lp,lv] [--tool netblast|busybox] [--pcap DIR]`
//!
//! `--only` picks measurements (cc/pp/pv/vp: bulk runc->runc, process->
//! process, process->VM, VM->process; lc/lp/lv: requests between runc
//! pods, to a process pod, to the VM). `--pcap DIR` captures the VM's tap with
//! tcpdump into `DIR/vmtap0.pcap` and prints the guest's interrupt and
//! TCP counters around each VM measurement: where a transfer into or out
//! of a guest waits shows up there (gaps on the wire, retransmits,
//! timer-driven sends). Installs containerd and runc with apt if they are
//! missing.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use vmcri_tests::containerd::{ensure_containerd, start_containerd, CniSetup};
use vmcri_tests::network::*;
use vmcri_tests::pods::*;
use vmcri_tests::registry::{busybox_layout, push, start_registry, Entry};
use vmcri_tests::{artifacts, static_program, unix_channel, Daemon, Scratch};

const REQUESTS: usize = 20;

/// The value after `--name` on the command line.
fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn mib() -> usize {
    arg("--mib").and_then(|v| v.parse().ok()).unwrap_or(32)
}

/// Whether measurement `tag` was asked for (all are, without `--only`).
fn wanted(tag: &str) -> bool {
    arg("--only").is_none_or(|only| only.split(',').any(|t| t == tag))
}

/// The guest's counters that say where a transfer waited: virtio
/// interrupts, and TCP's retransmits, timeouts and loss probes.
const GUEST_COUNTERS: &str = "grep -i virtio /proc/interrupts; \
    awk '/^Tcp:/ {if (h) {for (i = 1; i <= NF; i++) if ($i + 0 > 0) printf \"%s=%s \", n[i], $i; print \"\"} \
    else {for (i = 1; i <= NF; i++) n[i] = $i; h = 1}}' /proc/net/snmp; \
    awk '/^TcpExt:/ {if (x) {for (i = 1; i <= NF; i++) if ($i + 0 > 0 && (n[i] ~ /Timeout|Probe|Retrans|Loss|Queue|Delayed|Prune|Drop/)) printf \"%s=%s \", n[i], $i; print \"\"} \
    else {for (i = 1; i <= NF; i++) n[i] = $i; x = 1}}' /proc/net/netstat";

/// Runs pod `name` with `handler`: its ID, its IP, and how long
/// RunPodSandbox took.
async fn run_timed(
    rt: &mut RuntimeServiceClient<Channel>,
    name: &str,
    handler: &str,
    logs: &Path,
) -> (String, String, Duration) {
    let t = Instant::now();
    let id = run_pod_with(rt, name, logs, handler).await;
    let took = t.elapsed();
    let ip = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .expect("a pod IP");
    (id, ip, took)
}

/// A container serving busybox httpd on :80 (it forks per connection)
/// and `vmcri-netblast serve` on :5002 (it does not); its ID.
async fn box_in(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    name: &str,
    image: &str,
    logs: &Path,
) -> String {
    let script = "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 80 -h /tmp/www && exec /bin/vmcri-netblast serve 5002";
    // kubelet makes each container's log directory; containerd does not.
    std::fs::create_dir_all(logs.join(name)).unwrap();
    create_started(rt, pod, container(name, image, &["sh", "-c", script]), logs).await
}

async fn sh(rt: &mut RuntimeServiceClient<Channel>, id: &str, script: &str) -> String {
    let r = exec(rt, id, &["sh", "-c", script], 600)
        .await
        .expect("ExecSync");
    format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    )
}

/// The bulk transfer tool (`--tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// `vmcri-netblast`: 256 KiB per read and write (the default).
    Netblast,
    /// busybox `dd | nc`, 1 KiB per read and write.
    Busybox,
}

fn tool() -> Tool {
    match arg("--tool").as_deref() {
        Some("busybox") => Tool::Busybox,
        _ => Tool::Netblast,
    }
}

/// MB/s of `mib` MiB from container `from` to a listener in pod `to`
/// (at `to_ip`:5001), as the listener times it from its first byte to
/// the end, on its own clock (a VM's and the host's are not compared).
/// The listener is a container of its own, whose log carries the result:
/// an exec'd background job would outlive its ExecSync.
async fn bulk(
    rt: &mut RuntimeServiceClient<Channel>,
    from: &str,
    (to, to_ip): (&str, &str),
    mib: usize,
    (image, logs, tag): (&str, &Path, &str),
) -> Option<f64> {
    let name = format!("rx-{tag}");
    std::fs::create_dir_all(logs.join(&name)).unwrap();
    let (listen, send) = match tool() {
        Tool::Netblast => (
            "exec /bin/vmcri-netblast recv 5001".to_string(),
            format!("/bin/vmcri-netblast send {to_ip}:5001 {mib}"),
        ),
        // Busybox's small `nc` quits at EOF on its stdin, so the
        // listener's stdin stays open; the first byte goes to dd, which
        // starts the clock.
        Tool::Busybox => (
            "sleep 900 | nc -l -p 5001 | { dd bs=1 count=1 of=/dev/null 2>/dev/null; \
             a=$(cut -d' ' -f1 /proc/uptime); n=$(wc -c); b=$(cut -d' ' -f1 /proc/uptime); \
             echo \"RX $((n + 1)) $(echo \"$b $a\" | awk '{print $1 - $2}')\"; }"
                .to_string(),
            format!(
                "dd if=/dev/zero bs=64k count={} 2>/dev/null | nc {to_ip} 5001 && echo SENT",
                mib * 16
            ),
        ),
    };
    create_started(
        rt,
        to,
        container(&name, image, &["sh", "-c", &listen]),
        logs,
    )
    .await;
    // Connect until the listener listens (a VM's takes a while).
    let deadline = Instant::now() + Duration::from_secs(300);
    while !sh(rt, from, &send).await.contains("SENT") {
        if Instant::now() > deadline {
            eprintln!("{tag}: the listener never answered");
            return None;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let log = logs.join(&name).join("0.log");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let rx: Option<Vec<f64>> = text
            .lines()
            .find_map(|l| l.split_once("RX "))
            .map(|(_, r)| {
                r.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            });
        if let Some([n, secs]) = rx.as_deref() {
            // A run too short to time is void.
            if *n < (mib << 20) as f64 || *secs <= 0.0 {
                eprintln!("{tag}: short or untimed transfer: {text}");
                return None;
            }
            return Some(n / f64::from(1 << 20) / secs);
        }
        if Instant::now() > deadline {
            eprintln!("{tag}: the listener never finished: {text}");
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Milliseconds per request to `to_ip`:5002 (`vmcri-netblast serve`),
/// `REQUESTS` of them one after another from container `from`, each on a
/// new connection: the handshake and one round trip, nothing forked.
async fn pings(rt: &mut RuntimeServiceClient<Channel>, from: &str, to_ip: &str) -> Option<f64> {
    let out = sh(
        rt,
        from,
        &format!("/bin/vmcri-netblast ping {to_ip}:5002 {REQUESTS}"),
    )
    .await;
    let ms = out
        .lines()
        .find_map(|l| l.strip_prefix("PING "))
        .and_then(|v| v.trim().parse().ok());
    if ms.is_none() {
        eprintln!("ping {to_ip}: {out}");
    }
    ms
}

/// Both request latencies from container `from` to `to_ip`: fresh
/// connections to `vmcri-netblast serve` ([`pings`]) and HTTP to busybox
/// httpd ([`requests`]).
async fn latencies(
    rt: &mut RuntimeServiceClient<Channel>,
    from: &str,
    to_ip: &str,
) -> (Option<f64>, Option<f64>) {
    (
        pings(rt, from, to_ip).await,
        requests(rt, from, to_ip).await,
    )
}

/// Milliseconds per HTTP request, `REQUESTS` of them one after another
/// from container `from` to `to_ip`:80.
async fn requests(rt: &mut RuntimeServiceClient<Channel>, from: &str, to_ip: &str) -> Option<f64> {
    // Warm up (ARP, httpd's first fork).
    sh(rt, from, &http_get("nc", to_ip, 80)).await;
    let script = format!(
        "i=0; while [ $i -lt {REQUESTS} ]; do {} | grep -c ' 200 '; i=$((i+1)); done",
        http_get("nc", to_ip, 80)
    );
    let t = Instant::now();
    let out = sh(rt, from, &script).await;
    let elapsed = t.elapsed();
    let ok = out.lines().filter(|l| l.trim() == "1").count();
    if ok != REQUESTS {
        eprintln!("{ok} of {REQUESTS} requests answered: {out}");
        return None;
    }
    Some(elapsed.as_secs_f64() * 1e3 / REQUESTS as f64)
}

/// tcpdump on the VM pod's tap (in the pod's netns) into
/// `dir/vmtap0.pcap`, headers only.
fn capture(root: &Path, pod: &str, dir: &Path) -> std::process::Child {
    std::fs::create_dir_all(dir).expect("the --pcap directory");
    let file = dir.join("vmtap0.pcap");
    // A previous run's file would look like a started capture.
    let _ = std::fs::remove_file(&file);
    let netns = root.join("netns").join(pod);
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["tcpdump", "-i", "vmtap0", "-s", "128", "-U", "-w"])
        .arg(&file)
        .spawn()
        .expect("tcpdump (apt install tcpdump)");
    // tcpdump makes its file once it captures: wait for that rather
    // than for a fixed time, however slow the machine is.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file.exists() {
        assert!(Instant::now() < deadline, "tcpdump never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("capturing the VM's tap into {}", file.display());
    child
}

/// The guest's counters (see [`GUEST_COUNTERS`]) if `traced`.
async fn counters(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    traced: bool,
) -> Option<String> {
    if traced {
        Some(sh(rt, id, GUEST_COUNTERS).await)
    } else {
        None
    }
}

fn report(tag: &str, before: Option<String>, after: Option<String>) {
    if let (Some(b), Some(a)) = (before, after) {
        eprintln!("{tag}: guest counters before:\n{b}{tag}: after:\n{a}");
    }
}

fn main() {
    let mib = mib();
    let with_vm = ["pv", "vp", "lv"].iter().any(|t| wanted(t));
    let with_containerd = ["cc", "lc"].iter().any(|t| wanted(t));
    if with_containerd {
        ensure_containerd();
    }
    let s = Scratch::new("bench-net").unwrap();
    let ns = TestNetns::new("bench");
    let registry = start_registry(&s.0);
    let netblast = std::fs::read(static_program("vmcri-netblast").expect("build vmcri-netblast"))
        .expect("read vmcri-netblast");
    let layout = busybox_layout(
        &s.0,
        &[
            Entry::Symlink("bin/httpd", "busybox"),
            Entry::File("bin/vmcri-netblast", &netblast, 0o755),
        ],
        IMAGE_CONFIG,
    );
    push(&layout, registry.port, "web");
    // containerd's sandbox image: the same busybox, sleeping.
    push(&layout, registry.port, "pause");
    ns.forward_loopback(registry.port);
    let image = format!("127.0.0.1:{}/web:v1", registry.port);
    // The same conflist for both runtimes, each on a bridge and subnet of
    // its own in the bench's namespace.
    let net_d = |tag: &str, bridge: &str, subnet: &str| {
        let conf_dir = s.0.join(format!("{tag}-net.d"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        let ipam = s.0.join(format!("{tag}-ipam"));
        std::fs::write(
            conf_dir.join("10-bench.conflist"),
            conflist(bridge, subnet, &ipam, &[]),
        )
        .unwrap();
        conf_dir
    };
    let conf_dir = net_d("vmcri", "cni0", "10.244.90.0/24");
    let a = artifacts();
    let config = format!(
        "default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n[process]\nagent = \"{}\"\n[microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\n[handlers.vmcri]\nbackend = \"microvm\"\nvcpus = 1\nmemory_mib = 256\n[agent]\nstop_timeout_secs = 5\ncall_timeout_secs = 600\n{}",
        a.agent.display(),
        a.kernel.display(),
        a.agent_initrd.display(),
        a.vmm.display(),
        cni_config(&conf_dir, &[Path::new(DEBIAN_CNI_BIN)]),
    );
    let daemon = Daemon::start_in(&s.0, &config, Some(&ns.path()));
    let ctrd_conf = net_d("containerd", "cni1", "10.244.91.0/24");
    let netns = ns.path();
    let ctrd = with_containerd.then(|| {
        start_containerd(
            &s.0,
            registry.port,
            Some(CniSetup {
                conf_dir: &ctrd_conf,
                bin_dir: Path::new(DEBIAN_CNI_BIN),
                netns: &netns,
            }),
        )
    });
    let logs = s.0.join("logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&daemon).await;
        pull(&mut images, &image).await;
        let mut pods = Vec::new();
        let (pa, ip_pa, t_pa) = run_timed(&mut rt, "proc-a", "", &logs).await;
        let (pb, ip_pb, _) = run_timed(&mut rt, "proc-b", "", &logs).await;
        pods.extend([pa.clone(), pb.clone()]);
        // What CNI ADD adds to a process pod: the same pod on the node's
        // network (no CNI at all).
        let t = Instant::now();
        let mut node_net = pod_config("proc-node", &logs);
        node_net.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let node_pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(node_net),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox on the node's network")
            .into_inner()
            .pod_sandbox_id;
        let t_node = t.elapsed();
        remove(&mut rt, &node_pod).await;
        let ca = box_in(&mut rt, &pa, "a", &image, &logs).await;
        box_in(&mut rt, &pb, "b", &image, &logs).await;

        let mut vm = None;
        if with_vm {
            let (id, ip, took) = run_timed(&mut rt, "vm", "vmcri", &logs).await;
            pods.push(id.clone());
            let cv = box_in(&mut rt, &id, "v", &image, &logs).await;
            // httpd comes up in the VM in its own time.
            let deadline = Instant::now() + Duration::from_secs(300);
            while !sh(&mut rt, &ca, &http_get("nc", &ip, 80)).await.contains(" 200 ") {
                assert!(Instant::now() < deadline, "httpd in the VM never answered");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            vm = Some((id, ip, took, cv));
        }

        let pp = if wanted("pp") {
            bulk(&mut rt, &ca, (&pb, &ip_pb), mib, (&image, &logs, "pp")).await
        } else {
            None
        };
        let lp = if wanted("lp") {
            latencies(&mut rt, &ca, &ip_pb).await
        } else {
            (None, None)
        };
        let (mut pv, mut vp, mut lv) = (None, None, (None, None));
        let mut t_vm = None;
        if let Some((vm, ip_vm, took, cv)) = &vm {
            t_vm = Some(*took);
            let pcap = arg("--pcap").map(|dir| capture(&daemon.root, vm, Path::new(&dir)));
            let traced = pcap.is_some();
            if wanted("pv") {
                let before = counters(&mut rt, cv, traced).await;
                pv = bulk(&mut rt, &ca, (vm, ip_vm), mib, (&image, &logs, "pv")).await;
                report("pv", before, counters(&mut rt, cv, traced).await);
            }
            if wanted("vp") {
                let before = counters(&mut rt, cv, traced).await;
                vp = bulk(&mut rt, cv, (&pa, &ip_pa), mib, (&image, &logs, "vp")).await;
                report("vp", before, counters(&mut rt, cv, traced).await);
            }
            if wanted("lv") {
                let before = counters(&mut rt, cv, traced).await;
                lv = latencies(&mut rt, &ca, ip_vm).await;
                report("lv", before, counters(&mut rt, cv, traced).await);
            }
            if let Some(mut tcpdump) = pcap {
                // SIGINT: tcpdump flushes its file and says how many it saw.
                let _ = std::process::Command::new("kill")
                    .args(["-INT", &tcpdump.id().to_string()])
                    .status();
                let _ = tcpdump.wait();
            }
        }

        let (mut cc, mut lc, mut t_c) = (None, (None, None), None);
        if let Some(ctrd) = &ctrd {
            let channel = unix_channel(&ctrd.socket).await;
            let mut crt = RuntimeServiceClient::new(channel.clone());
            let mut cimages = ImageServiceClient::new(channel);
            pull(&mut cimages, &image).await;
            pull(&mut cimages, &image.replace("/web:", "/pause:")).await;
            let (qa, _, took) = run_timed(&mut crt, "ctrd-a", "", &logs).await;
            let (qb, ip_qb, _) = run_timed(&mut crt, "ctrd-b", "", &logs).await;
            t_c = Some(took);
            let c_a = box_in(&mut crt, &qa, "ctrd-a", &image, &logs).await;
            box_in(&mut crt, &qb, "ctrd-b", &image, &logs).await;
            if wanted("cc") {
                cc = bulk(&mut crt, &c_a, (&qb, &ip_qb), mib, (&image, &logs, "cc")).await;
            }
            if wanted("lc") {
                lc = latencies(&mut crt, &c_a, &ip_qb).await;
            }
            for pod in [&qa, &qb] {
                remove(&mut crt, pod).await;
            }
        }

        let f = |v: Option<f64>| v.map(figure).unwrap_or_else(|| "-".into());
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if a > 0.0 && a / b < 0.01 => format!("1/{:.0}", b / a),
            (Some(a), Some(b)) => format!("{}x", figure(a / b)),
            _ => "-".into(),
        };
        println!(
            "pod network on CNI bridges (Debian's bridge + host-local, in a test netns), {mib} MiB per transfer ({:?}), {REQUESTS} sequential requests:",
            tool()
        );
        println!("| path | TCP MB/s | ms per request (new connection each) | ms per HTTP request (busybox httpd, forks per request) |");
        println!("|---|---|---|---|");
        println!("| containerd+runc pod -> containerd+runc pod (the reference) | {} | {} | {} |", f(cc), f(lc.0), f(lc.1));
        println!("| vmcri process pod -> process pod (host veths) | {} | {} | {} |", f(pp), f(lp.0), f(lp.1));
        println!("| process pod -> microVM pod (into the guest) | {} | {} | {} |", f(pv), f(lv.0), f(lv.1));
        println!("| microVM pod -> process pod (out of the guest) | {} | | |", f(vp));
        println!("| vmcri process / containerd+runc | {} | {} | {} |", r(pp, cc), r(lp.0, lc.0), r(lp.1, lc.1));
        println!("| microVM in / containerd+runc | {} | {} | {} |", r(pv, cc), r(lv.0, lc.0), r(lv.1, lc.1));
        println!("| microVM out / containerd+runc | {} | | |", r(vp, cc));
        let secs = |d: Option<Duration>| d.map(|d| format!("{:.3} s", d.as_secs_f64())).unwrap_or_else(|| "-".into());
        println!(
            "RunPodSandbox with CNI ADD: containerd+runc {}; vmcri process pod {} ({} on the node's network, no CNI); microVM pod {} (boot included; the daemon logs \"guest interface configured\" with what configuring the guest took)",
            secs(t_c),
            secs(Some(t_pa)),
            secs(Some(t_node)),
            secs(t_vm)
        );
        for pod in &pods {
            remove(&mut rt, pod).await;
        }
    });
}

/// Three significant digits or so: MB/s into a guest and out of a host
/// differ by four orders of magnitude.
fn figure(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Stops and removes `pod`, errors ignored (the bench is ending).
async fn remove(rt: &mut RuntimeServiceClient<Channel>, pod: &str) {
    let _ = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await;
    let _ = rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await;
}
