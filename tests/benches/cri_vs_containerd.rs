//! vmcri next to containerd 1.6 + runc (Debian's packages), both driven
//! through their CRI sockets by the same client, in one run:
//!
//! - image pull + unpack of a multi-layer image from a local registry
//!   (a different image each run, so nothing is cached);
//! - pod start: RunPodSandbox + CreateContainer + StartContainer;
//! - ExecSync latency (`true`);
//! - virtio-fs: sequential read and file creation inside a container, in a
//!   microVM and in the process backend.
//!
//! `cargo bench -p vmcri-tests --bench cri_vs_containerd [-- --runs N --vm-runs M]`
//! Installs containerd and runc with apt if they are missing.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use vmcri_tests::containerd::{ensure_containerd, start_containerd};
use vmcri_tests::registry::{busybox_layout, layout_layers, push, start_registry, Entry};
use vmcri_tests::streams::{spdy_exec, spdy_forward, ExecIo};
use vmcri_tests::{artifacts, unix_channel, Daemon, Scratch};

const LAYER_MIB: usize = 8;
const LAYERS: usize = 3;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// An image of LAYERS layers of incompressible data, unique to `seed`.
fn multi_layer(dir: &Path, seed: usize) -> PathBuf {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (seed as u64).wrapping_mul(0x1000_0000_01b3);
    let mut data = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // The low byte of the xorshift state.
                state.to_le_bytes()[0]
            })
            .collect()
    };
    let blobs: Vec<Vec<u8>> = (0..LAYERS).map(|_| data(LAYER_MIB << 20)).collect();
    let names: Vec<String> = (0..LAYERS).map(|i| format!("layer{i}")).collect();
    let layers: Vec<Vec<Entry>> = names
        .iter()
        .zip(&blobs)
        .map(|(n, b)| vec![Entry::File(n, b, 0o644)])
        .collect();
    let refs: Vec<&[Entry]> = layers.iter().map(Vec::as_slice).collect();
    layout_layers(dir, &refs, r#"{"Cmd":["true"]}"#)
}

struct Cri {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    handler: String,
    host_network: bool,
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

impl Cri {
    fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "bench".into(),
                attempt: 0,
            }),
            // Pods on the node's network keep the node's hostname.
            hostname: if self.host_network {
                String::new()
            } else {
                name.into()
            },
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        // containerd has no CNI here: its pods use the node's network.
                        network: if self.host_network { 2 } else { 0 },
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn pull(&mut self, image: &str) -> Duration {
        let t = Instant::now();
        self.img
            .pull_image(cri::PullImageRequest {
                image: spec(image),
                ..Default::default()
            })
            .await
            .expect("PullImage");
        t.elapsed()
    }

    /// Starts a pod with one running container; returns (pod, container,
    /// time taken).
    async fn start_pod(
        &mut self,
        name: &str,
        image: &str,
        mounts: Vec<cri::Mount>,
    ) -> (String, String, Duration) {
        let t = Instant::now();
        let config = self.pod_config(name);
        let pod = self
            .rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.handler.clone(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let c = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: spec(image),
                    // An echo server for the port-forward figures, beside
                    // the sleep every figure execs into.
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        "nc -ll -p 18080 -e cat >/dev/null 2>&1 & exec sleep 3600".into(),
                    ],
                    mounts,
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: c.clone(),
            })
            .await
            .expect("StartContainer");
        (pod, c, t.elapsed())
    }

    async fn exec(&mut self, c: &str, cmd: &str) -> (Duration, String) {
        let t = Instant::now();
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: c.into(),
                cmd: vec!["sh".into(), "-c".into(), cmd.into()],
                timeout: 600,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        assert_eq!(
            r.exit_code,
            0,
            "{cmd}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        (t.elapsed(), String::from_utf8_lossy(&r.stdout).into_owned())
    }

    async fn remove_pod(&mut self, pod: &str) {
        let _ = self
            .rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        self.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .expect("RemovePodSandbox");
    }
}

#[derive(Default)]
struct Row {
    pull: Option<Duration>,
    start: Option<Duration>,
    exec: Option<Duration>,
}

fn fmt(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

/// Streaming figures of one backend: the median round trip of an exec of
/// `true` (CRI Exec, connect, SPDY streams, exit status) over `runs`, and
/// port-forward throughput: `mib` MiB echoed by busybox nc in the pod,
/// MB/s each way.
async fn stream_figures(
    cri: &mut Cri,
    pod: &str,
    c: &str,
    runs: usize,
    mib: usize,
) -> (Duration, f64) {
    let mut trips = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let url = cri
            .rt
            .exec(cri::ExecRequest {
                container_id: c.into(),
                cmd: vec!["true".into()],
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .await
            .expect("Exec")
            .into_inner()
            .url;
        let io = ExecIo {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let o = spdy_exec(&url, "v4.channel.k8s.io", io)
            .await
            .expect("exec over SPDY");
        assert_eq!(o.exit_code(), Some(0), "{o:?}");
        trips.push(t.elapsed());
    }
    let payload: Vec<u8> = (0..253u8).cycle().take(mib << 20).collect();
    let mut last = String::new();
    for _ in 0..100 {
        let url = cri
            .rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: vec![18080],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url;
        let t = Instant::now();
        let r = spdy_forward(&url, &[(18080, payload.clone())])
            .await
            .expect("port-forward");
        let secs = t.elapsed().as_secs_f64();
        if r[0].data.len() == payload.len() {
            assert!(r[0].data == payload, "port-forward corrupted data");
            return (median(trips), (mib as f64 * 1.048_576) / secs);
        }
        // The server may not listen yet.
        last = format!(
            "{} of {} bytes back; error stream: {:?}",
            r[0].data.len(),
            payload.len(),
            r[0].error
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("port-forward never echoed: {last}");
}

/// Seconds of a guest-side operation, from the container's own clock.
const TIMED: &str = "s=$(cat /proc/uptime); {CMD}; e=$(cat /proc/uptime); echo ${s%% *} ${e%% *}";

fn elapsed(out: &str) -> f64 {
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    v[1] - v[0]
}

/// (read MB/s, creates/s) of a container with the test volume at /data:
/// `reads` passes over the 64 MiB file and `creates` new files, sized so
/// each phase lasts well beyond /proc/uptime's 10 ms resolution.
async fn fs_figures(cri: &mut Cri, c: &str, reads: usize, creates: usize) -> (f64, f64) {
    let (_, out) = cri
        .exec(
            c,
            &TIMED.replace(
                "{CMD}",
                // dd reads into its buffer; cat would sendfile() to /dev/null
                // and read nothing.
                &format!("for r in $(seq {reads}); do dd if=/data/big of=/dev/null bs=1M 2>/dev/null; done"),
            ),
        )
        .await;
    let read = (64 * reads) as f64 / elapsed(&out).max(0.01);
    let (_, out) = cri
        .exec(
            c,
            &TIMED.replace(
                "{CMD}",
                &format!("i=0; while [ $i -lt {creates} ]; do : > /data/new-$i; i=$((i+1)); done"),
            ),
        )
        .await;
    let per_s = creates as f64 / elapsed(&out).max(0.01);
    cri.exec(c, "rm -f /data/new-*").await;
    (read, per_s)
}

fn main() {
    let runs = arg("--runs", 5);
    let vm_runs = arg("--vm-runs", 1);
    ensure_containerd();
    let a = artifacts();
    let scratch = Scratch::new("bench-cri").unwrap();
    let registry = start_registry(&scratch.0);
    let port = registry.port;
    let img_dir = scratch.0.join("images");
    let bb = busybox_layout(
        &img_dir.join("busybox"),
        &[],
        r#"{"Cmd":["/bin/sleep","2147483647"],"Env":["PATH=/bin"]}"#,
    );
    push(&bb, port, "busybox");
    push(&bb, port, "pause");
    // One pull image per backend and run, so no pull finds its layers cached.
    let pull_images = runs * 2;
    for i in 0..pull_images {
        let l = multi_layer(&img_dir.join(format!("multi{i}")), i);
        push(&l, port, &format!("multi{i}"));
    }
    let volume = scratch.0.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("big"), vec![7u8; 64 << 20]).unwrap();
    let mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: volume.display().to_string(),
        ..Default::default()
    }];

    let daemon = Daemon::start(
        &scratch.0,
        &format!(
            "default_handler = \"vmcri-process\"\n[handlers.vmcri-process]\nbackend = \"process\"\n[process]\nagent = \"{}\"\n[microvm]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\n[handlers.vmcri]\nbackend = \"microvm\"\nvcpus = 1\nmemory_mib = 256\n[agent]\ncall_timeout_secs = 300\n",
            a.agent.display(),
            a.kernel.display(),
            a.agent_initrd.display(),
            a.vmm.display()
        ),
    );
    let ctrd = start_containerd(&scratch.0, port, None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ours = daemon.channel().await;
        let theirs = unix_channel(&ctrd.socket).await;
        let mk = |ch: &Channel, handler: &str, host_network: bool| Cri {
            rt: RuntimeServiceClient::new(ch.clone()),
            img: ImageServiceClient::new(ch.clone()),
            handler: handler.into(),
            host_network,
        };
        let mut process = mk(&ours, "", false);
        let mut microvm = mk(&ours, "vmcri", false);
        let mut containerd = mk(&theirs, "", true);
        let busybox = format!("127.0.0.1:{port}/busybox:v1");
        process.pull(&busybox).await;
        containerd.pull(&busybox).await;
        containerd.pull(&format!("127.0.0.1:{port}/pause:v1")).await;

        let mut rows: Vec<(&str, Row)> = Vec::new();
        let mut pulls = (Vec::new(), Vec::new());
        for i in 0..runs {
            pulls.0.push(process.pull(&format!("127.0.0.1:{port}/multi{}:v1", 2 * i)).await);
            pulls.1.push(containerd.pull(&format!("127.0.0.1:{port}/multi{}:v1", 2 * i + 1)).await);
        }

        let mut fs = Vec::new();
        let mut streams = Vec::new();
        for (name, cri, n) in [("containerd+runc", &mut containerd, runs), ("vmcri process", &mut process, runs), ("vmcri microvm", &mut microvm, vm_runs)] {
            let mut starts = Vec::new();
            let mut execs = Vec::new();
            for i in 0..n {
                let (pod, c, t) = cri.start_pod(&format!("p{i}"), &busybox, mounts.clone()).await;
                starts.push(t);
                for _ in 0..if name.contains("microvm") { 3 } else { 10 } {
                    execs.push(cri.exec(&c, "true").await.0);
                }
                if i == 0 {
                    let vm = name.contains("microvm");
                    let (trips, mib) = if vm { (3, 1) } else { (10, 16) };
                    streams.push((name, stream_figures(cri, &pod, &c, trips, mib).await));
                }
                if i == 0 && name.starts_with("vmcri") {
                    let (reads, creates) = if name.contains("microvm") { (1, 100) } else { (20, 2000) };
                    fs.push((name, fs_figures(cri, &c, reads, creates).await));
                }
                cri.remove_pod(&pod).await;
            }
            rows.push((name, Row { pull: None, start: Some(median(starts)), exec: Some(median(execs)) }));
        }
        rows[0].1.pull = Some(median(pulls.1.clone()));
        rows[1].1.pull = Some(median(pulls.0.clone()));

        println!();
        println!("vmcri vs containerd 1.6 + runc, medians ({runs} runs; microVM {vm_runs}); pull: {LAYERS} x {LAYER_MIB} MiB image");
        println!("| | pull + unpack | RunPodSandbox + CreateContainer + StartContainer | ExecSync `true` |");
        println!("|---|---|---|---|");
        for (name, r) in &rows {
            println!("| {name} | {} | {} | {} |", fmt(r.pull), fmt(r.start), fmt(r.exec));
        }
        let base = &rows[0].1;
        for (name, r) in rows.iter().skip(1) {
            println!(
                "| {name} / containerd | {} | {} | {} |",
                ratio(r.pull, base.pull),
                ratio(r.start, base.start),
                ratio(r.exec, base.exec)
            );
        }
        println!();
        println!("Streaming: exec `true` over SPDY (CRI Exec to exit status, median) and port-forward through busybox nc echoing in the pod:");
        println!("| | exec round trip | port-forward MB/s each way |");
        println!("|---|---|---|");
        for (name, (trip, mbs)) in &streams {
            println!("| {name} | {:.4} s | {mbs:.3} |", trip.as_secs_f64());
        }
        let (ct, cm) = streams[0].1;
        for (name, (trip, mbs)) in &streams[1..] {
            println!("| {name} / containerd | {:.2}x | {:.3}x |", trip.as_secs_f64() / ct.as_secs_f64(), mbs / cm);
        }
        println!();
        println!("virtio-fs inside a container (sequential reads of a 64 MiB file; file creates), vs the same volume in the process backend:");
        println!("| | read MB/s | creates/s |");
        println!("|---|---|---|");
        for (name, (read, creates)) in &fs {
            println!("| {name} | {read:.1} | {creates:.1} |");
        }
        // Pushed in loop order: the process backend, then the microVM.
        if let [(_, (pr, pc)), (_, (vr, vc))] = fs.as_slice() {
            println!("| microvm / process | {:.3}x | {:.3}x |", vr / pr, vc / pc);
        }
    });
}
