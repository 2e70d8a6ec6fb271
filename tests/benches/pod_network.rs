//! Pod-to-pod TCP on one CNI bridge (Debian's bridge + host-local +
//! portmap + loopback), all inside a network namespace of the bench's
//! own: bulk throughput with busybox `dd | nc` and small HTTP requests
//! (busybox `nc` to busybox `httpd`), between process pods (host veths
//! on a bridge: the kernel path a runc pod takes) and to and from a
//! microVM pod (virtio-net on a tap, tc-redirected to its CNI veth).
//!
//! `cargo bench -p vmcri-tests --bench pod_network [-- --mib N]`

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use vmcri_tests::network::*;
use vmcri_tests::pods::*;
use vmcri_tests::registry::{busybox_layout, push, start_registry, Entry};
use vmcri_tests::{artifacts, Daemon, Scratch};

const REQUESTS: usize = 20;

fn mib() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

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

/// A container serving httpd on :80 and sleeping; its ID.
async fn box_in(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    name: &str,
    image: &str,
    logs: &Path,
) -> String {
    let script = "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 80 -h /tmp/www && exec sleep 3600";
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

/// MB/s of `mib` MiB from container `from` to a listener in pod `to`
/// (at `to_ip`:5001), as the listener times it from its first byte to
/// the end, on its own clock (a VM's and the host's are not compared).
/// The listener is a container of its own, whose log carries the result:
/// an exec'd background job would outlive its ExecSync. Busybox's small
/// `nc` quits at EOF on its stdin, so the listener's stdin stays open.
async fn bulk(
    rt: &mut RuntimeServiceClient<Channel>,
    from: &str,
    (to, to_ip): (&str, &str),
    mib: usize,
    (image, logs, tag): (&str, &Path, &str),
) -> Option<f64> {
    let name = format!("rx-{tag}");
    let script = "sleep 900 | nc -l -p 5001 | { dd bs=1 count=1 of=/dev/null 2>/dev/null; \
                  a=$(cut -d' ' -f1 /proc/uptime); n=$(wc -c); b=$(cut -d' ' -f1 /proc/uptime); \
                  echo \"RX $n $a $b\"; }";
    create_started(rt, to, container(&name, image, &["sh", "-c", script]), logs).await;
    // Connect until the listener listens (a VM's takes a while).
    let deadline = Instant::now() + Duration::from_secs(300);
    let send = format!(
        "dd if=/dev/zero bs=64k count={} 2>/dev/null | nc {to_ip} 5001 && echo SENT",
        mib * 16
    );
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
        if let Some([n, a, b]) = rx.as_deref() {
            // The first byte went to dd; a run too short to time is void.
            if n + 1.0 < (mib << 20) as f64 || b <= a {
                eprintln!("{tag}: short or untimed transfer: {text}");
                return None;
            }
            return Some((n + 1.0) / f64::from(1 << 20) / (b - a));
        }
        if Instant::now() > deadline {
            eprintln!("{tag}: the listener never finished: {text}");
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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

fn main() {
    let mib = mib();
    let s = Scratch::new("bench-net").unwrap();
    let ns = TestNetns::new("bench");
    let registry = start_registry(&s.0);
    let layout = busybox_layout(
        &s.0,
        &[Entry::Symlink("bin/httpd", "busybox")],
        IMAGE_CONFIG,
    );
    push(&layout, registry.port, "web");
    ns.forward_loopback(registry.port);
    let image = format!("127.0.0.1:{}/web:v1", registry.port);
    let conf_dir = s.0.join("net.d");
    let ipam = s.0.join("ipam");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-bench.conflist"),
        conflist("cni0", "10.244.90.0/24", &ipam, &[]),
    )
    .unwrap();
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
    let logs = s.0.join("logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&daemon).await;
        pull(&mut images, &image).await;
        let (pa, ip_pa, t_pa) = run_timed(&mut rt, "proc-a", "", &logs).await;
        let (pb, ip_pb, _) = run_timed(&mut rt, "proc-b", "", &logs).await;
        let (vm, ip_vm, t_vm) = run_timed(&mut rt, "vm", "vmcri", &logs).await;
        let ca = box_in(&mut rt, &pa, "a", &image, &logs).await;
        box_in(&mut rt, &pb, "b", &image, &logs).await;
        let cv = box_in(&mut rt, &vm, "v", &image, &logs).await;
        // httpd comes up in the VM in its own time.
        let deadline = Instant::now() + Duration::from_secs(300);
        while !sh(&mut rt, &ca, &http_get("nc", &ip_vm, 80)).await.contains(" 200 ") {
            assert!(Instant::now() < deadline, "httpd in the VM never answered");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }

        let pp = bulk(&mut rt, &ca, (&pb, &ip_pb), mib, (&image, &logs, "pp")).await;
        let pv = bulk(&mut rt, &ca, (&vm, &ip_vm), mib, (&image, &logs, "pv")).await;
        let vp = bulk(&mut rt, &cv, (&pa, &ip_pa), mib, (&image, &logs, "vp")).await;
        let lp = requests(&mut rt, &ca, &ip_pb).await;
        let lv = requests(&mut rt, &ca, &ip_vm).await;

        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "failed".into());
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.3}x", a / b),
            _ => "-".into(),
        };
        println!("pod network on one CNI bridge (in a test netns), {mib} MiB per transfer, {REQUESTS} sequential HTTP requests:");
        println!("| path | TCP MB/s | ms per HTTP request |");
        println!("|---|---|---|");
        println!("| process pod -> process pod (host veths, the runc path) | {} | {} |", f(pp), f(lp));
        println!("| process pod -> microVM pod (into the guest) | {} | {} |", f(pv), f(lv));
        println!("| microVM pod -> process pod (out of the guest) | {} | |", f(vp));
        println!("| microVM in / process | {} | {} |", r(pv, pp), r(lv, lp));
        println!("| microVM out / process | {} | |", r(vp, pp));
        println!(
            "RunPodSandbox with CNI ADD: process pod {:.0} ms; microVM pod {:.1} s (boot included)",
            t_pa.as_secs_f64() * 1e3,
            t_vm.as_secs_f64()
        );
        for pod in [&pa, &pb, &vm] {
            let _ = rt
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await;
            let _ = rt
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await;
        }
    });
}
