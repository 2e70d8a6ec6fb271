//! The container engine: OCI bundles run with youki's `libcontainer`, each
//! on an overlay of its image layers, with stdio on pipes the agent pumps
//! and exits delivered by the agent's reaper.
//!
//! Layout under the agent's state directory:
//! `containers/<id>/{config.json, rootfs/, scratch/{upper,work}}` and
//! `libcontainer/<id>/` (libcontainer's own state).

pub mod cgroup;
pub mod console;
pub mod process;
pub mod reaper;
pub mod rootfs;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use oci_spec::runtime::{RootBuilder, Spec};
use process::{Exit, Proc};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Most exec processes a container keeps before new ones are refused.
const MAX_EXECS: usize = 256;
/// How long a process on a terminal may take to send its master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of engine operations; each maps to one gRPC status.
#[derive(Debug, Error)]
pub enum EngineError {
    /// Bad request (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// Unknown container or process (NotFound).
    #[error("{0}")]
    NotFound(String),
    /// The ID is taken (AlreadyExists).
    #[error("{0}")]
    Exists(String),
    /// Wrong state for the operation (FailedPrecondition).
    #[error("{0}")]
    State(String),
    /// The engine or the kernel failed (Internal).
    #[error("{0}")]
    Failed(String),
}

/// What a container is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created, its init waiting for start.
    Created,
    /// Started.
    Running,
    /// Its init has ended.
    Exited,
}

/// How a process ended, with the OOM verdict for a container's init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The exit.
    pub exit: Exit,
    /// The OOM killer ended it.
    pub oom_killed: bool,
    /// When it started, nanoseconds since the epoch (0: never started).
    pub started_at_ns: i64,
}

struct Container {
    dir: PathBuf,
    cgroup: String,
    lc: Mutex<LcContainer>,
    init: Arc<Proc>,
    started_at_ns: Mutex<i64>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

/// All containers of this sandbox.
pub struct Engine {
    containers_dir: PathBuf,
    lc_root: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The directory console sockets live in, held open: sockets are
    /// named through `/proc/self/fd/<it>/` because a state directory
    /// deep on a host can exceed the 108 bytes of a socket address.
    tty_dir: OwnedFd,
    tty_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn failed(what: &str) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Failed(format!("{what}: {e}"))
}

/// On nested kvm-pvm hosts (`vmcri_pvm` on the kernel command line) the
/// guest kernel saves only SSE state while user code runs AVX natively, so
/// two processes using AVX corrupt each other (a container's `sleep` died
/// of SIGSEGV during an exec). glibc then gets told to keep to SSE; other
/// runtimes and bare-metal hosts are unaffected.
/// The variable is set once per boot: the command line is read at the
/// first container, not at every create and exec.
fn nested_avx_workaround() -> Option<(&'static str, &'static str)> {
    static NESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let nested = NESTED.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "vmcri_pvm"))
    });
    nested.then_some((
        "GLIBC_TUNABLES",
        "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX_VNNI,-FMA,-FMA4,-F16C,-AVX_Fast_Unaligned_Load",
    ))
}

/// Container IDs become directory names: keep them to what libcontainer
/// and the host runtime generate.
fn check_id(kind: &str, id: &str) -> Result<(), EngineError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid {kind} ID {id:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

impl Engine {
    /// An engine keeping its state under `state_dir`.
    pub fn new(state_dir: &Path) -> std::io::Result<Engine> {
        let containers_dir = state_dir.join("containers");
        let lc_root = state_dir.join("libcontainer");
        let tty_dir = state_dir.join("tty");
        std::fs::create_dir_all(&containers_dir)?;
        std::fs::create_dir_all(&lc_root)?;
        std::fs::create_dir_all(&tty_dir)?;
        let tty_dir = OwnedFd::from(std::fs::File::open(&tty_dir)?);
        Ok(Engine {
            containers_dir,
            lc_root,
            containers: Mutex::new(HashMap::new()),
            tty_dir,
            tty_seq: AtomicU64::new(0),
        })
    }

    /// A console socket for a new process on a terminal.
    fn console_socket(&self) -> Result<console::ConsoleSocket, EngineError> {
        let n = self.tty_seq.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}/{n}.sock",
            self.tty_dir.as_raw_fd()
        ));
        console::ConsoleSocket::bind(&path).map_err(failed("console socket"))
    }

    /// Starts a process with libcontainer's `build` and tracks it, on a
    /// terminal when `tty` (the master arrives over a console socket),
    /// else on pipes.
    async fn spawn<T>(
        &self,
        tty: bool,
        stdin: bool,
        build: impl FnOnce(ContainerBuilder) -> Result<(i32, T), EngineError>,
        id: &str,
    ) -> Result<(Proc, T), EngineError> {
        if tty {
            let socket = self.console_socket()?;
            let null = process::null_stdio().map_err(failed("stdio"))?;
            let builder = self
                .builder(id, null)?
                .with_console_socket(Some(socket.path()));
            let (pid, made) = build(builder)?;
            let master = match socket.receive(CONSOLE_TIMEOUT).await {
                Ok(m) => m,
                Err(e) => {
                    // Our own unreaped child: its PID cannot have been reused.
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                    return Err(EngineError::Failed(format!("terminal: {e}")));
                }
            };
            let p = Proc::track_tty(pid, master, stdin).map_err(failed("tracking process"))?;
            Ok((p, made))
        } else {
            let (host, child) = process::stdio(stdin).map_err(failed("stdio pipes"))?;
            let (pid, made) = build(self.builder(id, child)?)?;
            let p = Proc::track(pid, host).map_err(failed("tracking process"))?;
            Ok((p, made))
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, EngineError> {
        lock(&self.containers).get(id).cloned().ok_or_else(|| {
            EngineError::NotFound(format!("container {id} not found in the sandbox"))
        })
    }

    /// Creates container `id` from an OCI spec, its root an overlay of
    /// `layers` (lowest first). Its init waits for [`Engine::start`].
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        layers: &[PathBuf],
        stdin: bool,
    ) -> Result<u32, EngineError> {
        check_id("container", id)?;
        if lock(&self.containers).contains_key(id) {
            return Err(EngineError::Exists(format!(
                "container {id} already exists"
            )));
        }
        let mut spec: Spec = serde_json::from_slice(spec_json)
            .map_err(|e| EngineError::Invalid(format!("invalid OCI spec: {e}")))?;
        if spec
            .process()
            .as_ref()
            .is_none_or(|p| p.args().as_ref().is_none_or(Vec::is_empty))
        {
            return Err(EngineError::Invalid(
                "the OCI spec has no process args".into(),
            ));
        }
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let root = RootBuilder::default()
            .path("rootfs")
            .readonly(readonly)
            .build()
            .map_err(|e| EngineError::Invalid(format!("OCI root: {e}")))?;
        spec.set_root(Some(root));
        if let (Some((key, value)), Some(p)) = (nested_avx_workaround(), spec.process_mut()) {
            let mut env = p.env().clone().unwrap_or_default();
            if !env.iter().any(|e| e.starts_with(&format!("{key}="))) {
                env.push(format!("{key}={value}"));
            }
            p.set_env(Some(env));
        }
        let cgroup = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();

        let dir = self.containers_dir.join(id);
        if dir.exists() {
            // Leftovers of a failed create: nothing in them is in use.
            let _ = rootfs::unmount(&dir.join("rootfs"));
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).map_err(failed("container directory"))?;
        let made = self.assemble(id, &dir, &spec, layers, stdin).await;
        match made {
            Ok((lc, init)) => {
                // A started process's PID is positive.
                let pid = u32::try_from(init.pid).unwrap_or_default();
                let c = Arc::new(Container {
                    dir,
                    cgroup,
                    lc: Mutex::new(lc),
                    init: Arc::new(init),
                    started_at_ns: Mutex::new(0),
                    execs: Mutex::new(HashMap::new()),
                });
                lock(&self.containers).insert(id.to_string(), c);
                tracing::info!(container_id = id, pid, "container created");
                Ok(pid)
            }
            Err(e) => {
                let _ = rootfs::unmount(&dir.join("rootfs"));
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(self.lc_root.join(id));
                Err(e)
            }
        }
    }

    async fn assemble(
        &self,
        id: &str,
        dir: &Path,
        spec: &Spec,
        layers: &[PathBuf],
        stdin: bool,
    ) -> Result<(LcContainer, Proc), EngineError> {
        let json = serde_json::to_vec_pretty(spec)
            .map_err(|e| EngineError::Invalid(format!("OCI spec: {e}")))?;
        std::fs::write(dir.join("config.json"), json).map_err(failed("writing config.json"))?;
        rootfs::mount(layers, &dir.join("scratch"), &dir.join("rootfs")).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::NotFound
            ) {
                EngineError::Invalid(format!("rootfs: {e}"))
            } else {
                EngineError::Failed(format!("rootfs: {e}"))
            }
        })?;
        let tty = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let build = |b: ContainerBuilder| {
            let lc = b
                .as_init(dir)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| EngineError::Failed(format!("creating container: {e}")))?;
            let pid = lc
                .pid()
                .ok_or_else(|| EngineError::Failed("libcontainer reported no init PID".into()))?;
            Ok((pid.as_raw(), lc))
        };
        let (init, lc) = self.spawn(tty, stdin, build, id).await?;
        Ok((lc, init))
    }

    /// A libcontainer builder for container `id` with `child` as stdio.
    fn builder(
        &self,
        id: &str,
        child: process::ChildStdio,
    ) -> Result<ContainerBuilder, EngineError> {
        Ok(
            ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_executor(DefaultExecutor {})
                .with_root_path(&self.lc_root)
                .map_err(|e| EngineError::Failed(format!("libcontainer root: {e}")))?
                .with_stdin(child.stdin)
                .with_stdout(child.stdout)
                .with_stderr(child.stderr),
        )
    }

    /// Starts a created container's process.
    pub fn start(&self, id: &str) -> Result<(), EngineError> {
        let c = self.get(id)?;
        if c.init.exited().is_some() {
            return Err(EngineError::State(format!("container {id} has exited")));
        }
        let mut started = lock(&c.started_at_ns);
        if *started != 0 {
            return Err(EngineError::State(format!(
                "container {id} is already started"
            )));
        }
        lock(&c.lc)
            .start()
            .map_err(|e| EngineError::Failed(format!("starting container {id}: {e}")))?;
        *started = vmcri_proto::now_ns();
        tracing::info!(container_id = id, "container started");
        Ok(())
    }

    /// The phase of container `id`.
    pub fn phase(&self, id: &str) -> Result<Phase, EngineError> {
        let c = self.get(id)?;
        Ok(if c.init.exited().is_some() {
            Phase::Exited
        } else if *lock(&c.started_at_ns) == 0 {
            Phase::Created
        } else {
            Phase::Running
        })
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Proc>), EngineError> {
        let c = self.get(id)?;
        let p = if exec_id.is_empty() {
            c.init.clone()
        } else {
            lock(&c.execs).get(exec_id).cloned().ok_or_else(|| {
                EngineError::NotFound(format!("exec {exec_id} not found in container {id}"))
            })?
        };
        Ok((c, p))
    }

    /// The process `exec_id` of container `id` ("" is its init).
    pub fn proc(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>, EngineError> {
        Ok(self.process(id, exec_id)?.1)
    }

    /// Waits for a process to end. An exec is forgotten once waited for.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Ended, EngineError> {
        let (c, p) = self.process(id, exec_id)?;
        let exit = p.wait().await;
        let started_at_ns = if exec_id.is_empty() {
            *lock(&c.started_at_ns)
        } else {
            lock(&c.execs).remove(exec_id);
            0
        };
        // SIGKILL plus an OOM kill recorded in the container's cgroup.
        let oom_killed = exec_id.is_empty()
            && i32::try_from(exit.signal) == Ok(libc::SIGKILL)
            && cgroup::stats(&c.cgroup).is_some_and(|s| s.oom_kills > 0);
        Ok(Ended {
            exit,
            oom_killed,
            started_at_ns,
        })
    }

    /// Sets the terminal size of a process on a terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), EngineError> {
        let p = self.proc(id, exec_id)?;
        p.resize(rows, cols).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Unsupported {
                EngineError::State(format!("{e}: it was not started with a TTY"))
            } else {
                EngineError::Failed(format!("resizing the terminal: {e}"))
            }
        })
    }

    /// Signals a process.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), EngineError> {
        let sig = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| EngineError::Invalid(format!("invalid signal {signal}")))?;
        let p = self.proc(id, exec_id)?;
        p.signal(sig).map_err(failed("signal"))
    }

    /// Runs `args` in running container `id` as exec `exec_id`, with the
    /// container's user, capabilities and limits (as containerd does) and
    /// `env` over the container's environment.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: Vec<String>,
        env: HashMap<String, String>,
        cwd: Option<PathBuf>,
        tty: bool,
        stdin: bool,
    ) -> Result<u32, EngineError> {
        check_id("exec", exec_id)?;
        if args.is_empty() {
            return Err(EngineError::Invalid("exec: no command given".into()));
        }
        if cwd.as_ref().is_some_and(|c| !c.is_absolute()) {
            return Err(EngineError::Invalid("exec: cwd must be absolute".into()));
        }
        let c = self.get(id)?;
        if self.phase(id)? != Phase::Running {
            return Err(EngineError::State(format!("container {id} is not running")));
        }
        {
            let execs = lock(&c.execs);
            if execs.contains_key(exec_id) {
                return Err(EngineError::Exists(format!(
                    "exec {exec_id} already exists"
                )));
            }
            if execs.len() >= MAX_EXECS {
                return Err(EngineError::State(format!(
                    "container {id} has {MAX_EXECS} unwaited execs"
                )));
            }
        }
        let process_file = c.dir.join(format!("exec-{exec_id}.json"));
        exec_process(
            &c.dir.join("config.json"),
            &process_file,
            args,
            env,
            cwd,
            tty,
        )?;
        let build = |b: ContainerBuilder| {
            let pid = b
                .as_tenant()
                .with_process(Some(&process_file))
                .with_detach(true)
                .build()
                .map_err(|e| {
                    let msg = format!("exec in container {id}: {e}");
                    // libcontainer checks the executable before it execs: a
                    // missing one is the request's fault.
                    if msg.contains("not found") {
                        EngineError::Invalid(msg)
                    } else {
                        EngineError::Failed(msg)
                    }
                })?;
            Ok((pid.as_raw(), ()))
        };
        let spawned = self.spawn(tty, stdin, build, id).await;
        let _ = std::fs::remove_file(&process_file);
        let (p, ()) = spawned?;
        // A started process's PID is positive.
        let pid = u32::try_from(p.pid).unwrap_or_default();
        lock(&c.execs).insert(exec_id.to_string(), Arc::new(p));
        Ok(pid)
    }

    /// Stops (SIGTERM, then SIGKILL after `timeout`) and deletes container
    /// `id`, its execs, cgroup, rootfs and state. Unknown IDs succeed.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        let Ok(c) = self.get(id) else {
            return Ok(());
        };
        if c.init.exited().is_none() {
            if !timeout.is_zero() && *lock(&c.started_at_ns) != 0 {
                c.init.signal(libc::SIGTERM).map_err(failed("SIGTERM"))?;
                let _ = tokio::time::timeout(timeout, c.init.wait()).await;
            }
            c.init.signal(libc::SIGKILL).map_err(failed("SIGKILL"))?;
            c.init.wait().await;
        }
        let execs: Vec<Arc<Proc>> = lock(&c.execs).drain().map(|(_, p)| p).collect();
        for p in execs {
            let _ = p.signal(libc::SIGKILL);
            p.wait().await;
        }
        {
            let mut lc = lock(&c.lc);
            let _ = lc.refresh_status();
            // Force: a shared-PID-namespace container may leave children.
            if let Err(e) = lc.delete(true) {
                tracing::warn!(container_id = id, error = %e, "libcontainer delete");
                let _ = std::fs::remove_dir_all(self.lc_root.join(id));
            }
        }
        rootfs::unmount(&c.dir.join("rootfs")).map_err(failed("unmounting rootfs"))?;
        std::fs::remove_dir_all(&c.dir).map_err(failed("removing container directory"))?;
        lock(&self.containers).remove(id);
        tracing::info!(container_id = id, "container removed");
        Ok(())
    }

    /// Applies new cgroup limits to running container `id`.
    pub fn update_resources(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), EngineError> {
        use libcgroups::common::{
            create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt,
        };
        let c = self.get(id)?;
        if c.init.exited().is_some() {
            return Err(EngineError::State(format!("container {id} has exited")));
        }
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: PathBuf::from(&c.cgroup),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|e| EngineError::Failed(format!("cgroup of container {id}: {e}")))?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| EngineError::Failed(format!("updating container {id}'s cgroup: {e}")))
    }

    /// Statistics of container `id`'s cgroup.
    pub fn stats(&self, id: &str) -> Result<Option<cgroup::Stats>, EngineError> {
        Ok(cgroup::stats(&self.get(id)?.cgroup))
    }

    /// Statistics of the cgroup holding all containers (the parent of
    /// theirs); zero when there are none yet.
    pub fn sandbox_stats(&self) -> cgroup::Stats {
        let parent = lock(&self.containers).values().find_map(|c| {
            std::path::Path::new(&c.cgroup)
                .parent()
                .map(|p| p.display().to_string())
        });
        parent.and_then(|p| cgroup::stats(&p)).unwrap_or_default()
    }

    /// IDs of all containers.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.containers).keys().cloned().collect()
    }
}

/// Writes the OCI process of an exec to `out`: the container's own
/// process from `config` (user, capabilities, rlimits, no_new_privs) with
/// the exec's arguments, `env` over the container's environment, its cwd
/// and terminal.
fn exec_process(
    config: &Path,
    out: &Path,
    args: Vec<String>,
    env: HashMap<String, String>,
    cwd: Option<PathBuf>,
    tty: bool,
) -> Result<(), EngineError> {
    let spec = Spec::load(config)
        .map_err(|e| EngineError::Failed(format!("the container's config.json: {e}")))?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| EngineError::Failed("the container's spec has no process".into()))?;
    let mut merged: Vec<String> = process
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            !env.contains_key(key)
        })
        .collect();
    let mut extra: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    extra.sort();
    merged.extend(extra);
    process.set_args(Some(args));
    process.set_env(Some(merged));
    if let Some(cwd) = cwd {
        process.set_cwd(cwd);
    }
    process.set_terminal(Some(tty));
    process.set_console_size(None);
    let json = serde_json::to_vec(&process)
        .map_err(|e| EngineError::Failed(format!("exec process: {e}")))?;
    std::fs::write(out, json).map_err(failed("writing the exec's process"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_the_state_directory_are_refused() {
        for bad in ["", "..", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id("container", bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "0123456789abcdef", "a-b_c.d"] {
            assert!(check_id("container", good).is_ok(), "{good:?}");
        }
    }
}
