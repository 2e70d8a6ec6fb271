//! Sandbox backends: what runs behind a pod. [`microvm`] starts one
//! `vmcri-vmm` per pod with the agent as the guest's init; [`process`]
//! starts the same agent on the host in fresh namespaces. Everything
//! above this module drives a sandbox through [`SandboxBackend`] and
//! never asks which kind it has ([`host_process`] serves both: recovery
//! finds either kind's process with it).

pub mod host_process;
pub mod microvm;
pub mod process;

use crate::cgroup::Placement;
use crate::config::{Backend, Config, Handler};
use crate::store::{NamespaceModes, ProcessRef, SandboxRecord};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vmcri_agent_client::{Agent, AgentAddr, ClientError};

/// Errors starting or reaching a sandbox.
#[derive(Debug, Error)]
pub enum BackendError {
    /// A guest artifact or binary could not be found.
    #[error("{0}")]
    Missing(String),
    /// The process could not be started.
    #[error("starting {what}: {source}")]
    Spawn {
        /// What.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The agent did not come up, or failed.
    #[error("{0}")]
    Agent(#[from] ClientError),
    /// The sandbox's process died during start.
    #[error("the sandbox's {what} exited during start; its log ends with:\n{log_tail}")]
    DiedAtStart {
        /// VMM or agent.
        what: &'static str,
        /// Last lines of its log.
        log_tail: String,
    },
    /// A pod-level setting this backend cannot give (InvalidArgument).
    #[error("{0}")]
    Refused(String),
    /// Connecting the sandbox to its pod network failed.
    #[error("connecting the sandbox to its pod network: {0}")]
    Network(String),
    /// Making a container's files reachable by its agent failed.
    #[error("exposing the container's files to its sandbox: {0}")]
    Expose(std::io::Error),
}

/// Called with the sandbox's process as soon as it exists, before the
/// agent is waited for, so the caller can persist it: a daemon killed
/// during a boot must find the process again and end it.
pub type Spawned<'a> = Box<dyn FnOnce(ProcessRef) -> std::io::Result<()> + Send + 'a>;

/// A container's files as its agent reaches them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposed {
    /// The image's layer directories, lowest first.
    pub layers: Vec<String>,
    /// Each CRI mount's source, in the order of the container's mounts.
    pub mount_sources: Vec<String>,
}

/// What a backend contributes to each container's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerContext {
    /// The pod's /etc files: (container path, source as the agent sees it).
    pub etc_files: Vec<(String, String)>,
    /// Whether a VM stands between the container and the host. Without
    /// one the host kernel is the only wall: no CAP_MKNOD, and seccomp
    /// profiles nothing would enforce are refused.
    pub in_vm: bool,
    /// The lowest oom_score_adj the host lets a container have.
    pub min_oom_score_adj: Option<i32>,
}

/// One kind of sandbox: how it starts, is reached, stops, and gives its
/// containers their files.
#[tonic::async_trait]
pub trait SandboxBackend: Send + Sync {
    /// The kind, as recorded with each sandbox.
    fn kind(&self) -> Backend;

    /// What the sandbox's process is called in messages ("VMM", "agent").
    fn process_name(&self) -> &'static str;

    /// Where a sandbox's agent listens, given its private socket directory.
    fn agent_socket(&self, socket_dir: &Path) -> PathBuf;

    /// Refuses, before anything starts, pod-level namespace modes this
    /// backend cannot give (with [`BackendError::Refused`]).
    fn check_namespaces(&self, ns: &NamespaceModes) -> Result<(), BackendError>;

    /// Where the pod's /etc files (hosts, resolv.conf, hostname) are
    /// written on the host, for the sandbox in `sandbox_dir`.
    fn etc_dir(&self, sandbox_dir: &Path) -> PathBuf;

    /// Whether the sandbox's process runs in the pod's host cgroup
    /// (`crate::cgroup`), which then also gives the pod's CPU and memory
    /// stats.
    fn runs_in_pod_cgroup(&self) -> bool;

    /// Starts the sandbox `rec` describes and waits for its agent. The
    /// process enters `cgroup` before it execs (a backend that does not
    /// run in the pod cgroup is given [`Placement::none`]).
    async fn start(
        &self,
        rec: &SandboxRecord,
        handler: &Handler,
        cgroup: Placement,
        spawned: Spawned<'_>,
    ) -> Result<ProcessRef, BackendError>;

    /// Whether the sandbox's process `p` still runs.
    fn alive(&self, p: &ProcessRef) -> bool {
        host_process::alive(p)
    }

    /// Why the sandbox's process ended on its own, if it said so: the
    /// last line it wrote to its log as it exited.
    fn death_note(&self, _rec: &SandboxRecord) -> Option<String> {
        None
    }

    /// Ends process `p` of a sandbox nobody waits for (recovery).
    fn kill(&self, p: &ProcessRef) {
        host_process::kill(p);
        host_process::wait_gone_blocking(p, Duration::from_secs(5));
    }

    /// Connects to a running sandbox's agent.
    async fn agent(&self, rec: &SandboxRecord) -> Result<Agent, BackendError>;

    /// Stops a sandbox: its agent is asked to shut down, and its process
    /// is killed if it has not ended within the grace period.
    async fn stop(&self, rec: &SandboxRecord);

    /// What the sandbox gives each container's spec.
    fn container_context(&self, rec: &SandboxRecord) -> ContainerContext;

    /// Makes container `id`'s image layers and the sources of its
    /// `mounts` reachable by the sandbox's agent. Blocking (mount
    /// syscalls): call it off the async workers.
    fn expose(
        &self,
        rec: &SandboxRecord,
        id: &str,
        layers: &[(String, PathBuf)],
        mounts: &[k8s_cri::v1::Mount],
    ) -> Result<Exposed, BackendError>;

    /// Undoes [`SandboxBackend::expose`] for container `id`.
    fn release_container(&self, rec: &SandboxRecord, id: &str) -> std::io::Result<()>;

    /// Undoes everything the sandbox exposed, before its directory goes.
    fn release_all(&self, sandbox_dir: &Path) -> std::io::Result<()>;
}

/// The backends of the configured handlers, by kind.
#[derive(Clone)]
pub struct Backends {
    microvm: Arc<dyn SandboxBackend>,
    process: Arc<dyn SandboxBackend>,
}

impl Backends {
    /// The real backends, configured by `config`.
    pub fn new(config: Arc<Config>) -> Backends {
        Backends {
            microvm: Arc::new(microvm::MicroVm::new(config.clone())),
            process: Arc::new(process::HostProcess::new(config)),
        }
    }

    /// One backend serving every kind (tests).
    #[cfg(test)]
    pub fn only(backend: Arc<dyn SandboxBackend>) -> Backends {
        Backends {
            microvm: backend.clone(),
            process: backend,
        }
    }

    /// The backend of `kind`.
    pub fn get(&self, kind: Backend) -> Arc<dyn SandboxBackend> {
        match kind {
            Backend::Microvm => self.microvm.clone(),
            Backend::Process => self.process.clone(),
        }
    }
}

impl Backend {
    /// Whether pods of this kind have a VM between them and the host.
    pub fn isolates_with_a_vm(self) -> bool {
        match self {
            Backend::Microvm => true,
            Backend::Process => false,
        }
    }
}

/// Where to find binary `name`: `configured` if set, else beside the
/// running executable, else on `$PATH`.
fn find_binary(configured: &Path, name: &str) -> Result<PathBuf, BackendError> {
    if !configured.as_os_str().is_empty() {
        return Ok(configured.to_path_buf());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let beside = dir.join(name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BackendError::Missing(format!(
                "cannot find {name}: not configured, not beside vmcri, not on $PATH"
            ))
        })
}

/// Refuses the node's PID and IPC namespaces, which no vmcri pod can have
/// in either backend.
pub(crate) fn refuse_host_pid_and_ipc(ns: &NamespaceModes) -> Result<(), BackendError> {
    ns.refuse_host_pid_and_ipc().map_err(|what| {
        BackendError::Refused(format!("RunPodSandbox: {what} is not available in vmcri"))
    })
}

/// The last line of the log at `path` that starts with `prefix`, looked
/// for only in its last 4 KiB and cut to 300 bytes: the log is written by
/// a process the guest may have subverted.
fn last_line_with(path: &Path, prefix: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 4096;
    const MAX_NOTE: usize = 300;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut tail = Vec::new();
    file.take(TAIL).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().find(|l| l.starts_with(prefix))?;
    let mut end = line.len().min(MAX_NOTE);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_string())
}

/// The last lines of the log at `path`.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Creates the sandbox's private socket directory.
pub(crate) fn socket_dir(rec: &SandboxRecord) -> Result<(), BackendError> {
    if let Some(parent) = rec.agent_socket.parent() {
        crate::store::private_dirs(parent).map_err(|source| BackendError::Spawn {
            what: format!("socket directory {}", parent.display()),
            source,
        })?;
    }
    Ok(())
}

/// How a started sandbox process is waited for.
struct Boot {
    /// What the process is ("VMM", "agent").
    what: &'static str,
    /// Its log, whose tail explains a death at start.
    log: PathBuf,
    /// Where its agent answers.
    addr: AgentAddr,
    /// How long the agent may take to answer.
    ready_within: Duration,
    /// The deadline of each agent call.
    call_timeout: Duration,
}

/// Records the spawned process through `spawned`, then waits for its
/// agent as `boot` says; gives up early if the process dies, and kills it
/// on failure. Returns the process and the agent's first connection.
async fn wait_ready(
    rec: &SandboxRecord,
    proc_ref: ProcessRef,
    spawned: Spawned<'_>,
    boot: Boot,
) -> Result<(ProcessRef, Agent), BackendError> {
    let Boot {
        what,
        log,
        addr,
        ready_within,
        call_timeout,
    } = boot;
    tracing::info!(sandbox_id = %rec.id, backend = %rec.backend, pid = proc_ref.pid, "sandbox process started");
    if let Err(source) = spawned(proc_ref) {
        host_process::kill(&proc_ref);
        return Err(BackendError::Spawn {
            what: "recording the sandbox's process".into(),
            source,
        });
    }
    let connect = Agent::connect(addr, ready_within, call_timeout);
    let died = async {
        while host_process::alive(&proc_ref) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        r = connect => match r {
            Ok(agent) => Ok((proc_ref, agent)),
            Err(e) => {
                host_process::kill(&proc_ref);
                Err(e.into())
            }
        },
        () = died => Err(BackendError::DiedAtStart { what, log_tail: log_tail(&log) }),
    }
}

/// Asks the agent at `addr` to shut down, then kills the process if it
/// has not ended within `grace`.
async fn stop_process(rec: &SandboxRecord, addr: AgentAddr, grace: Duration) {
    let Some(p) = rec.process else { return };
    if !host_process::alive(&p) {
        return;
    }
    let polite = async {
        if let Ok(agent) = Agent::connect(addr, Duration::from_secs(2), grace).await {
            if let Err(e) = agent.shutdown().await {
                tracing::warn!(sandbox_id = %rec.id, error = %e, "agent shutdown failed; killing");
            }
        }
    };
    let _ = tokio::time::timeout(grace, polite).await;
    if !host_process::wait_gone(&p, grace).await {
        tracing::warn!(sandbox_id = %rec.id, pid = p.pid, "sandbox did not stop in time; killing");
        host_process::kill(&p);
        host_process::wait_gone(&p, Duration::from_secs(5)).await;
    }
}

/// The pod's /etc files present in `etc`, each with the path the agent
/// mounts it from (`agent_dir`/name).
pub(crate) fn etc_files(etc: &Path, agent_dir: &Path) -> Vec<(String, String)> {
    crate::sandbox::pod_files::FILES
        .iter()
        .filter(|(name, _)| etc.join(name).is_file())
        .map(|(name, dest)| (dest.to_string(), agent_dir.join(name).display().to_string()))
        .collect()
}

#[cfg(test)]
mod death_note_tests {
    use super::last_line_with;

    #[test]
    fn the_last_matching_line_is_found_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let long = "x".repeat(1000);
        std::fs::write(
            &log,
            format!("noise\nvmcri-vmm: first\nguest said vmcri-vmm: fake\nvmcri-vmm: killed by signal 31 {long}\nmore noise\n"),
        )
        .unwrap();
        let note = last_line_with(&log, "vmcri-vmm: ").unwrap();
        assert!(note.starts_with("vmcri-vmm: killed by signal 31"));
        assert_eq!(note.len(), 300);
        std::fs::write(&log, "nothing here\n").unwrap();
        assert_eq!(last_line_with(&log, "vmcri-vmm: "), None);
        assert_eq!(
            last_line_with(&dir.path().join("absent"), "vmcri-vmm: "),
            None
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRI's NamespaceMode values.
    const POD: i32 = 0;
    const CONTAINER: i32 = 1;
    const NODE: i32 = 2;

    #[test]
    fn node_namespaces_are_refused_where_the_backend_cannot_give_them() {
        let config = Arc::new(Config::load(None).unwrap());
        let backends = Backends::new(config);
        let (vm, host) = (
            backends.get(Backend::Microvm),
            backends.get(Backend::Process),
        );
        let ns = |network, pid, ipc| NamespaceModes { network, pid, ipc };
        let refused = |b: &Arc<dyn SandboxBackend>, n: NamespaceModes| {
            matches!(b.check_namespaces(&n), Err(BackendError::Refused(_)))
        };
        // hostNetwork: the process backend shares the node's network; a
        // microVM pod never can.
        assert!(refused(&vm, ns(NODE, CONTAINER, POD)));
        assert!(host.check_namespaces(&ns(NODE, CONTAINER, POD)).is_ok());
        // hostPID and hostIPC: nowhere.
        for b in [&vm, &host] {
            assert!(refused(b, ns(POD, NODE, POD)));
            assert!(refused(b, ns(POD, POD, NODE)));
            // What kubelet sends for an ordinary pod.
            assert!(b.check_namespaces(&ns(POD, CONTAINER, POD)).is_ok());
        }
    }

    #[test]
    fn each_kind_has_its_backend() {
        let backends = Backends::new(Arc::new(Config::load(None).unwrap()));
        for kind in [Backend::Microvm, Backend::Process] {
            assert_eq!(backends.get(kind).kind(), kind);
        }
        assert!(Backend::Microvm.isolates_with_a_vm());
        assert!(!Backend::Process.isolates_with_a_vm());
    }
}
