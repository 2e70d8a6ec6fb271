//! Agent RPC round trip (p50/p99) and stream throughput, over hybrid vsock
//! into a microVM, next to the same agent on a plain Unix socket on the
//! host as the reference, in one run.
//!
//! It also prices the daemon's two ways of making a call: dialing the
//! agent for every call (connect, handshake, Health; the path before each
//! sandbox kept one channel) against a call on the sandbox's open channel.
//!
//! `cargo bench -p vmcri-tests --bench agent_rpc`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmcri_agent_client::{Agent, AgentAddr};
use vmcri_tests::{artifacts, Scratch};

const ROUND_TRIPS: usize = 300;
/// Fresh connections priced: each is a new connection into the guest.
const DIALS: usize = 30;
// Small enough to finish in about a minute on nested software KVM,
// where every guest packet costs emulated kernel time.
const STREAM_BYTES: u64 = 16 << 20;

struct Figures {
    /// Connect, handshake and Health on a new connection.
    dial_p50: Duration,
    p50: Duration,
    p99: Duration,
    mb_per_s: f64,
}

async fn measure(agent: &Agent, addr: &AgentAddr) -> Figures {
    let mut dials = Vec::with_capacity(DIALS);
    for _ in 0..DIALS {
        let t = Instant::now();
        let fresh = Agent::connect(
            addr.clone(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .await
        .expect("dial");
        dials.push(t.elapsed());
        drop(fresh);
    }
    dials.sort();
    // Warm up the connection.
    for _ in 0..10 {
        agent.health().await.expect("health");
    }
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        agent.health().await.expect("health");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let t = Instant::now();
    let got = agent
        .probe(STREAM_BYTES, 64 * 1024, Duration::from_secs(600))
        .await
        .expect("probe");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, STREAM_BYTES);
    Figures {
        dial_p50: dials[dials.len() / 2],
        p50: rtts[rtts.len() / 2],
        p99: rtts[rtts.len() * 99 / 100],
        mb_per_s: STREAM_BYTES as f64 / f64::from(1 << 20) / secs,
    }
}

fn main() {
    let a = artifacts();
    let scratch = Scratch::new("bench-agent").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let uds = scratch.0.join("vsock.sock");
    let mut vm = Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.agent_initrd)
        .args([
            "--memory",
            "128",
            "--vcpus",
            "1",
            "--cmdline",
            "quiet",
            "--vsock",
        ])
        .arg(&uds)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vsock = rt.block_on(async {
        let agent = Agent::connect(
            AgentAddr::vm(&uds),
            Duration::from_secs(300),
            Duration::from_secs(60),
        )
        .await
        .expect("agent in VM");
        let f = measure(&agent, &AgentAddr::vm(&uds)).await;
        let _ = agent.shutdown().await;
        f
    });
    let _ = vm.wait();

    let sock = scratch.0.join("agent.sock");
    let mut host_agent = Command::new(&a.agent)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let unix = rt.block_on(async {
        let agent = Agent::connect(
            AgentAddr::Unix(sock.clone()),
            Duration::from_secs(20),
            Duration::from_secs(60),
        )
        .await
        .expect("host agent");
        let f = measure(&agent, &AgentAddr::Unix(sock.clone())).await;
        let _ = agent.shutdown().await;
        f
    });
    let _ = host_agent.wait();

    println!(
        "agent RPC over hybrid vsock (microVM, 1 vCPU) vs Unix socket (same agent on the host):"
    );
    println!("  {:28} {:>12} {:>12} {:>8}", "", "vsock", "unix", "ratio");
    let row = |name: &str, v: f64, u: f64, unit: &str| {
        println!(
            "  {name:28} {v:>9.1} {unit:2} {u:>9.1} {unit:2} {:>8.2}",
            v / u
        )
    };
    row(
        "Health round trip p50",
        vsock.p50.as_secs_f64() * 1e6,
        unix.p50.as_secs_f64() * 1e6,
        "us",
    );
    row(
        "Health round trip p99",
        vsock.p99.as_secs_f64() * 1e6,
        unix.p99.as_secs_f64() * 1e6,
        "us",
    );
    row(
        "StreamProbe throughput",
        vsock.mb_per_s,
        unix.mb_per_s,
        "MB",
    );
    println!(
        "  (throughput in MiB/s over {} MiB; {ROUND_TRIPS} round trips)",
        STREAM_BYTES >> 20
    );
    println!();
    println!("a daemon call's fixed cost: a new connection per call (before) vs the sandbox's channel (now):");
    println!("  {:28} {:>12} {:>12}", "", "vsock", "unix");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  {:28} {:>9.2} ms {:>9.2} ms",
        "dial + Health p50 (before)",
        ms(vsock.dial_p50),
        ms(unix.dial_p50)
    );
    println!(
        "  {:28} {:>9.2} ms {:>9.2} ms",
        "call on the channel p50",
        ms(vsock.p50),
        ms(unix.p50)
    );
    println!(
        "  {:28} {:>11.1}x {:>11.1}x",
        "saved per call",
        vsock.dial_p50.as_secs_f64() / vsock.p50.as_secs_f64(),
        unix.dial_p50.as_secs_f64() / unix.p50.as_secs_f64()
    );
    println!("  ({DIALS} dials)");
}
