//! What one microVM pod costs the host, and what the VMM's confinement
//! costs: boot to agent-ready and host memory of the VMM as the runtime
//! runs it (jailed, seccomp enforced) next to the same VMM unconfined
//! (our path before the jail), and, given `VMCRI_BASELINE_VMM`, next to
//! another VMM binary (e.g. one built from before the device threads).
//!
//! Memory is read from `/proc/PID/smaps` once the agent answers: the
//! guest's RAM is the VMM's one anonymous mapping of the guest's size, so
//! what the VMM holds beyond it (binary, heap, stacks, device buffers,
//! the jail's keeper) is its own overhead, the figure RuntimeClass
//! `overhead` and `[microvm] overhead_memory_mib` should cover.
//!
//! `cargo bench -p vmcri-tests --bench vmm_footprint [-- --runs N]`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmcri_agent_client::{Agent, AgentAddr};
use vmcri_tests::{artifacts, Scratch};

const GUEST_MIB: u64 = 256;

fn runs() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// Kilobytes of one process, from smaps: all of it, and the guest RAM.
#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    rss_kb: u64,
    pss_kb: u64,
    guest_rss_kb: u64,
    guest_pss_kb: u64,
}

impl Memory {
    fn add(self, o: Memory) -> Memory {
        Memory {
            rss_kb: self.rss_kb + o.rss_kb,
            pss_kb: self.pss_kb + o.pss_kb,
            guest_rss_kb: self.guest_rss_kb + o.guest_rss_kb,
            guest_pss_kb: self.guest_pss_kb + o.guest_pss_kb,
        }
    }
    fn own_rss_kb(&self) -> u64 {
        self.rss_kb - self.guest_rss_kb
    }
    fn own_pss_kb(&self) -> u64 {
        self.pss_kb - self.guest_pss_kb
    }
}

fn smaps(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut m = Memory::default();
    let mut in_guest = false;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let path = line.split_whitespace().nth(5);
            in_guest = size == GUEST_MIB << 20 && path.is_none();
            continue;
        }
        let kb: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => {
                m.rss_kb += kb;
                if in_guest {
                    m.guest_rss_kb += kb;
                }
            }
            "Pss:" => {
                m.pss_kb += kb;
                if in_guest {
                    m.guest_pss_kb += kb;
                }
            }
            _ => {}
        }
    }
    m
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

#[derive(Clone, Copy)]
struct Run {
    ready: Duration,
    memory: Memory,
    processes: usize,
}

fn boot(vmm: &Path, dir: &Path, confined: bool, rt: &tokio::runtime::Runtime) -> Run {
    let a = artifacts();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let uds = dir.join("vsock.sock");
    let mut cmd = Command::new(vmm);
    cmd.env_remove("RUST_BACKTRACE");
    if confined {
        let jail = dir.join("jail");
        std::fs::create_dir_all(&jail).unwrap();
        cmd.arg("--jail").arg(&jail).args(["--seccomp", "enforce"]);
    }
    cmd.arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.agent_initrd)
        .args([
            "--memory",
            &GUEST_MIB.to_string(),
            "--vcpus",
            "1",
            "--cmdline",
            "quiet",
        ])
        .arg("--vsock")
        .arg(&uds)
        .arg("--serial")
        .arg(dir.join("console.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let t = Instant::now();
    let mut child: Child = cmd.spawn().expect("spawn the VMM");
    let agent = rt.block_on(Agent::connect(
        AgentAddr::vm(&uds),
        Duration::from_secs(600),
        Duration::from_secs(60),
    ));
    let ready = t.elapsed();
    let agent = agent.expect("the agent answers");
    // Let boot-time work settle before reading memory.
    std::thread::sleep(Duration::from_secs(2));
    let pids = tree(child.id());
    let memory = pids
        .iter()
        .map(|&p| smaps(p))
        .fold(Memory::default(), Memory::add);
    let _ = rt.block_on(agent.shutdown());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    Run {
        ready,
        memory,
        processes: pids.len(),
    }
}

fn median<T: Copy, K: Ord>(v: &[T], key: impl Fn(&T) -> K) -> T {
    let mut s = v.to_vec();
    s.sort_by_key(|x| key(x));
    s[s.len() / 2]
}

fn main() {
    let a = artifacts();
    let scratch = Scratch::new("bench-footprint").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = runs();
    let mut setups: Vec<(String, PathBuf, bool)> = vec![
        (
            "jailed + seccomp (the runtime's)".into(),
            a.vmm.clone(),
            true,
        ),
        ("unconfined (before the jail)".into(), a.vmm.clone(), false),
    ];
    if let Some(base) = std::env::var_os("VMCRI_BASELINE_VMM") {
        setups.push((
            "VMCRI_BASELINE_VMM, unconfined".into(),
            PathBuf::from(base),
            false,
        ));
    }
    let mut results = Vec::new();
    for (name, vmm, confined) in &setups {
        let mut rs = Vec::new();
        for i in 0..runs {
            let r = boot(
                vmm,
                &scratch.0.join(format!("vm-{}-{i}", results.len())),
                *confined,
                &rt,
            );
            eprintln!(
                "{name} run {i}: ready {:.2} s, RSS {} KiB (guest {} KiB)",
                r.ready.as_secs_f64(),
                r.memory.rss_kb,
                r.memory.guest_rss_kb
            );
            rs.push(r);
        }
        let ready = median(&rs, |r| r.ready).ready;
        let mem = median(&rs, |r| r.memory.own_rss_kb()).memory;
        let procs = rs[0].processes;
        results.push((name.clone(), ready, mem, procs));
    }

    println!("microVM footprint: {GUEST_MIB} MiB guest, 1 vCPU, medians of {runs} boots each");
    println!("| VMM | boot to agent-ready | processes | VMM RSS own | VMM PSS own | guest RAM touched (RSS) |");
    println!("|---|---|---|---|---|---|");
    for (name, ready, m, procs) in &results {
        println!(
            "| {name} | {:.2} s | {procs} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            ready.as_secs_f64(),
            m.own_rss_kb() as f64 / 1024.0,
            m.own_pss_kb() as f64 / 1024.0,
            m.guest_rss_kb as f64 / 1024.0
        );
    }
    if let [(_, r0, m0, _), rest @ ..] = &results[..] {
        for (name, r, m, _) in rest {
            println!(
                "| ratio, the runtime's / {name} | {:.3}x | | {:.2}x | {:.2}x | {:.2}x |",
                r0.as_secs_f64() / r.as_secs_f64(),
                m0.own_rss_kb() as f64 / m.own_rss_kb().max(1) as f64,
                m0.own_pss_kb() as f64 / m.own_pss_kb().max(1) as f64,
                m0.guest_rss_kb as f64 / m.guest_rss_kb.max(1) as f64
            );
        }
    }
    println!("(own = everything the VMM's processes hold beyond the guest's RAM mapping)");
}
