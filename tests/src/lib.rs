//! Shared helpers for vmcri's end-to-end tests: locating (or building) the
//! guest kernel, the VMM and the static guest programs.
//!
//! `tests/run` builds everything once and passes the paths in
//! `VMCRI_KERNEL`, `VMCRI_VMM`, `VMCRI_GUEST_INIT`, `VMCRI_AGENT_INITRD`,
//! `VMCRI_AGENT` and `VMCRI_BIN`; run alone, a test
//! builds what is missing itself, in `target/e2e` so it never waits on the
//! lock of the `cargo test` that runs it.

pub mod containerd;
pub mod kubelet;
pub mod network;
pub mod pods;
pub mod registry;
pub mod streams;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Paths of the artifacts an end-to-end test needs.
#[derive(Debug)]
pub struct Artifacts {
    /// Guest vmlinux.
    pub kernel: PathBuf,
    /// `vmcri-vmm` binary.
    pub vmm: PathBuf,
    /// Static test init.
    pub guest_init: PathBuf,
    /// Initramfs with the static agent as /init.
    pub agent_initrd: PathBuf,
    /// The agent built for the host (the `process` backend).
    pub agent: PathBuf,
    /// The `vmcri` daemon binary.
    pub vmcri: PathBuf,
}

fn last_line_of(cmd: &mut Command) -> Result<PathBuf> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("no output")?;
    Ok(PathBuf::from(line.trim()))
}

fn cargo_build(args: &[&str], static_crt: bool) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--release", "--target-dir"])
        .arg(repo_root().join("target/e2e"))
        .args(args);
    if static_crt {
        cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    }
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(())
}

/// Builds `package` (a workspace package whose binary has its name) as a
/// static program for inside pods and guests, into `target/e2e`; its path.
pub fn static_program(package: &str) -> Result<PathBuf> {
    cargo_build(
        &["-p", package, "--target", "x86_64-unknown-linux-gnu"],
        true,
    )?;
    Ok(repo_root()
        .join("target/e2e/x86_64-unknown-linux-gnu/release")
        .join(package))
}

fn from_env_or(var: &str, build: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Ok(PathBuf::from(p)),
        None => build(),
    }
}

fn locate() -> Result<Artifacts> {
    let kernel = from_env_or("VMCRI_KERNEL", || {
        last_line_of(&mut Command::new(repo_root().join("guest-kernel/build")))
    })?;
    let vmm = from_env_or("VMCRI_VMM", || {
        cargo_build(&["-p", "vmcri-vmm"], false)?;
        Ok(repo_root().join("target/e2e/release/vmcri-vmm"))
    })?;
    let guest_init = from_env_or("VMCRI_GUEST_INIT", || {
        cargo_build(
            &[
                "-p",
                "vmcri-guest-init",
                "--target",
                "x86_64-unknown-linux-gnu",
            ],
            true,
        )?;
        Ok(repo_root().join("target/e2e/x86_64-unknown-linux-gnu/release/vmcri-guest-init"))
    })?;
    let agent_initrd = from_env_or("VMCRI_AGENT_INITRD", || {
        last_line_of(&mut Command::new(repo_root().join("agent/build-initramfs")))
    })?;
    let agent = from_env_or("VMCRI_AGENT", || {
        cargo_build(&["-p", "vmcri-agent"], false)?;
        Ok(repo_root().join("target/e2e/release/vmcri-agent"))
    })?;
    let vmcri = from_env_or("VMCRI_BIN", || {
        cargo_build(&["-p", "vmcri-runtime"], false)?;
        Ok(repo_root().join("target/e2e/release/vmcri"))
    })?;
    for p in [&kernel, &vmm, &guest_init, &agent_initrd, &agent, &vmcri] {
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
    }
    Ok(Artifacts {
        kernel,
        vmm,
        guest_init,
        agent_initrd,
        agent,
        vmcri,
    })
}

/// The artifacts, located or built once per test process.
pub fn artifacts() -> &'static Artifacts {
    static CELL: OnceLock<Artifacts> = OnceLock::new();
    CELL.get_or_init(|| match locate() {
        Ok(a) => a,
        Err(e) => panic!("end-to-end artifacts unavailable: {e:#}"),
    })
}

/// Writes an initramfs holding `init` (plus the standard skeleton) to
/// `out`.
pub fn write_initramfs(init: &Path, out: &Path) -> Result<()> {
    let mut archive = vmcri_initramfs::Initramfs::new();
    archive.with_skeleton()?.host_file("init", init)?;
    let file = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    archive.write_to(std::io::BufWriter::new(file))?;
    Ok(())
}

/// A scratch directory removed on drop, unless `VMCRI_KEEP_SCRATCH` is
/// set (to read daemon, agent and VMM logs after a failure).
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("vmcri-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("VMCRI_KEEP_SCRATCH").is_some() {
            eprintln!("keeping scratch directory {}", self.0.display());
            return;
        }
        // A failed test can leave a pod behind with host directories bound
        // into its share: unmount them rather than delete through them.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.0))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gRPC channel over the Unix socket at `path`.
pub async fn unix_channel(path: &Path) -> tonic::transport::Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to a gRPC Unix socket")
}

/// A `vmcri serve` under test, on its own socket and state root, killed
/// when dropped (its pods are left to the test).
pub struct Daemon {
    child: std::process::Child,
    /// Its CRI socket.
    pub socket: PathBuf,
    /// Its state root.
    pub root: PathBuf,
    config: PathBuf,
    /// The network namespace it runs in (the test's own if `None`).
    netns: Option<PathBuf>,
}

impl Daemon {
    /// Starts the daemon in `dir` with `config` (TOML) laid over its
    /// defaults, and waits for its socket. A config without a `[cni]`
    /// table gets `enabled = false`: pods with only loopback, for tests
    /// that do not test networking (and must not touch the host's).
    pub fn start(dir: &Path, config: &str) -> Daemon {
        Daemon::start_in(dir, config, None)
    }

    /// As [`Daemon::start`], the daemon in network namespace `netns` (a
    /// namespace file, entered with nsenter, which keeps the mounts).
    pub fn start_in(dir: &Path, config: &str, netns: Option<&Path>) -> Daemon {
        let path = dir.join("vmcri.toml");
        let config = if config.contains("[cni]") {
            config.to_string()
        } else {
            format!("{config}\n[cni]\nenabled = false\n")
        };
        std::fs::write(&path, config).expect("write daemon config");
        let mut d = Daemon {
            child: Command::new("true").spawn().expect("spawn placeholder"),
            socket: dir.join("cri.sock"),
            root: dir.join("root"),
            config: path,
            netns: netns.map(Path::to_path_buf),
        };
        d.restart();
        d
    }

    /// Starts the daemon (again), on the same socket, root and config.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match &self.netns {
            // nsenter execs the daemon: its PID is the daemon's.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(&artifacts().vmcri);
                c
            }
            None => Command::new(&artifacts().vmcri),
        };
        self.child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .spawn()
            .expect("spawn vmcri serve");
        for _ in 0..1000 {
            if self.socket.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("vmcri serve did not create its socket");
    }

    /// SIGKILLs the daemon, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A channel to its CRI socket.
    pub async fn channel(&self) -> tonic::transport::Channel {
        unix_channel(&self.socket).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
