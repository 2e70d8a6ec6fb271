//! The process backend: the agent as a host process in fresh namespaces,
//! with no VM. For development and fast tests; opt-in, and its pods have
//! only the host kernel between them and the node.

use super::{
    etc_files, find_binary, refuse_host_pid_and_ipc, socket_dir, stop_process, wait_ready,
    BackendError, Boot, ContainerContext, Exposed, SandboxBackend, Spawned,
};
use crate::cgroup::Placement;
use crate::config::{Backend, Config, Handler, Switch};
use crate::store::{NamespaceModes, ProcessRef, SandboxRecord};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vmcri_agent_client::{Agent, AgentAddr};

/// Pods as host processes.
pub struct HostProcess {
    config: Arc<Config>,
    /// The lowest oom_score_adj containers may get, fixed for the
    /// daemon's life (its capabilities and its own score).
    oom_floor: Option<i32>,
}

impl HostProcess {
    /// The backend configured by `config` (`[process]`, `[agent]`).
    pub fn new(config: Arc<Config>) -> HostProcess {
        let oom_floor = oom_score_adj_floor(config.process.restrict_oom_score_adj);
        HostProcess { config, oom_floor }
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.config.agent.call_timeout_secs)
    }

    fn addr(rec: &SandboxRecord) -> AgentAddr {
        AgentAddr::Unix(rec.agent_socket.clone())
    }
}

#[tonic::async_trait]
impl SandboxBackend for HostProcess {
    fn kind(&self) -> Backend {
        Backend::Process
    }

    fn process_name(&self) -> &'static str {
        "agent"
    }

    fn agent_socket(&self, socket_dir: &Path) -> PathBuf {
        socket_dir.join("agent.sock")
    }

    /// The node's network can be shared (DaemonSets such as kube-proxy
    /// and CNI agents need it), its PIDs and IPC cannot.
    fn check_namespaces(&self, ns: &NamespaceModes) -> Result<(), BackendError> {
        refuse_host_pid_and_ipc(ns)
    }

    fn etc_dir(&self, sandbox_dir: &Path) -> PathBuf {
        sandbox_dir.join("etc")
    }

    /// The agent puts each container in a host cgroup of its own (with
    /// the container's limits, under `/vmcri/<sandbox id>`); the agent
    /// itself is the daemon's helper, and its containers' figures are
    /// the host kernel's already.
    fn runs_in_pod_cgroup(&self) -> bool {
        false
    }

    async fn start(
        &self,
        rec: &SandboxRecord,
        _handler: &Handler,
        _cgroup: Placement,
        spawned: Spawned<'_>,
    ) -> Result<ProcessRef, BackendError> {
        socket_dir(rec)?;
        let log = rec.dir.join("agent.log");
        let agent = find_binary(&self.config.process.agent, "vmcri-agent")?;
        let mut cmd = Command::new(&agent);
        cmd.arg("--listen")
            .arg(format!("unix:{}", rec.agent_socket.display()))
            .arg("--state")
            .arg(rec.dir.join("agent"));
        let hostname = rec.hostname.clone().into_bytes();
        // The pod's namespace CNI set up, opened here and entered in the
        // child; hostNetwork pods (DaemonSets) keep the node's network,
        // and with CNI disabled the agent makes a private one.
        let net = match (rec.namespaces.host_network(), &rec.netns) {
            (true, _) => Net::Host,
            (false, Some(path)) => Net::Join(
                std::fs::File::open(path)
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(|source| BackendError::Spawn {
                        what: format!("opening the pod network namespace {}", path.display()),
                        source,
                    })?,
            ),
            (false, None) => Net::Private,
        };
        let netns_fd = match &net {
            Net::Join(fd) => Some(std::os::fd::AsRawFd::as_raw_fd(fd)),
            _ => None,
        };
        let private = matches!(net, Net::Private);
        // The agent's copy of the mount table must not hold other pods'
        // namespaces alive: it detaches their directory.
        let netns_dir = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
            self.config.root.join("netns").as_os_str(),
        ))
        .ok();
        let p = super::host_process::spawn_detached(cmd, &log, move || {
            enter_namespaces(&hostname, netns_fd, private, netns_dir.as_deref())
        })
        .map_err(|source| BackendError::Spawn {
            what: agent.display().to_string(),
            source,
        })?;
        // The child has entered it (or failed to start): ours can close.
        drop(net);
        let boot = Boot {
            what: "agent",
            log,
            addr: Self::addr(rec),
            ready_within: Duration::from_secs(self.config.process.boot_timeout_secs),
            call_timeout: self.call_timeout(),
        };
        Ok(wait_ready(rec, p, spawned, boot).await?.0)
    }

    async fn agent(&self, rec: &SandboxRecord) -> Result<Agent, BackendError> {
        let t = self.call_timeout();
        Ok(Agent::connect(Self::addr(rec), t, t).await?)
    }

    async fn stop(&self, rec: &SandboxRecord) {
        let grace = Duration::from_secs(self.config.agent.stop_timeout_secs);
        stop_process(rec, Self::addr(rec), grace).await;
        // In a microVM cgroups live and die in the guest; here they are
        // the host's.
        remove_host_cgroups(&rec.id);
    }

    fn container_context(&self, rec: &SandboxRecord) -> ContainerContext {
        let etc = self.etc_dir(&rec.dir);
        ContainerContext {
            etc_files: etc_files(&etc, &etc),
            in_vm: false,
            min_oom_score_adj: self.oom_floor,
        }
    }

    /// The agent runs on the host: it reaches layers and volumes where
    /// they are.
    fn expose(
        &self,
        _rec: &SandboxRecord,
        _id: &str,
        layers: &[(String, PathBuf)],
        mounts: &[k8s_cri::v1::Mount],
    ) -> Result<Exposed, BackendError> {
        Ok(Exposed {
            layers: layers
                .iter()
                .map(|(_, p)| p.display().to_string())
                .collect(),
            mount_sources: mounts.iter().map(|m| m.host_path.clone()).collect(),
        })
    }

    fn release_container(&self, _rec: &SandboxRecord, _id: &str) -> std::io::Result<()> {
        Ok(())
    }

    fn release_all(&self, _sandbox_dir: &Path) -> std::io::Result<()> {
        Ok(())
    }
}

/// CAP_SYS_RESOURCE's bit in the capability sets of /proc/PID/status.
const CAP_SYS_RESOURCE: u32 = 24;

/// The lowest oom_score_adj the process backend's containers may ask for:
/// the daemon's own when restricting (`on`, or `auto` without
/// CAP_SYS_RESOURCE, which lowering it needs), else none.
pub fn oom_score_adj_floor(setting: Switch) -> Option<i32> {
    let restrict = match setting {
        Switch::On => true,
        Switch::Off => false,
        Switch::Auto => !has_capability(CAP_SYS_RESOURCE),
    };
    if !restrict {
        return None;
    }
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether this process has capability `bit` in its effective set.
fn has_capability(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// Removes the (empty, once its processes are gone) cgroups the process
/// backend's containers had on the host: `<hierarchy>/vmcri/<sandbox>/*`.
/// In a microVM they live and die in the guest.
pub fn remove_host_cgroups(sandbox_id: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.join("vmcri").join(sandbox_id)];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        bases.push(e.path().join("vmcri").join(sandbox_id));
    }
    for base in bases.iter().filter(|b| b.is_dir()) {
        for c in std::fs::read_dir(base).into_iter().flatten().flatten() {
            if c.path().is_dir() {
                let _ = std::fs::remove_dir(c.path());
            }
        }
        if let Err(e) = std::fs::remove_dir(base) {
            tracing::warn!(sandbox_id, path = %base.display(), error = %e, "cannot remove cgroup");
        }
    }
}

/// The network an agent runs in.
enum Net {
    /// The node's (hostNetwork).
    Host,
    /// The pod's namespace, open.
    Join(std::os::fd::OwnedFd),
    /// A fresh one of its own, only loopback (`[cni] enabled = false`).
    Private,
}

/// Runs in the agent's child before exec: the pod's network namespace
/// joined (`netns_fd`) or a private one made (`private_net`), new mount,
/// IPC, UTS and PID namespaces (the agent's children land in the new PID
/// namespace), mounts made private, `netns_dir` detached, the pod's
/// hostname set. Only async-signal-safe syscalls.
fn enter_namespaces(
    hostname: &[u8],
    netns_fd: Option<std::os::fd::RawFd>,
    private_net: bool,
    netns_dir: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID;
    if private_net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: setns/unshare/mount/umount2/sethostname with valid
    // arguments (the fd is open in the parent until the spawn returns).
    unsafe {
        if let Some(fd) = netns_fd {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::unshare(flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if let Some(dir) = netns_dir {
            // Not a mount (CNI disabled before) is fine.
            libc::umount2(dir.as_ptr(), libc::MNT_DETACH);
        }
        if !hostname.is_empty() && libc::sethostname(hostname.as_ptr().cast(), hostname.len()) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oom_floor_follows_the_switch() {
        assert_eq!(oom_score_adj_floor(Switch::Off), None);
        let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(oom_score_adj_floor(Switch::On), Some(own));
        // This machine lacks CAP_SYS_RESOURCE (../shared/HOST-KVM.md);
        // a machine that has it needs no floor.
        let expected = (!has_capability(CAP_SYS_RESOURCE)).then_some(own);
        assert_eq!(oom_score_adj_floor(Switch::Auto), expected);
        // CAP_CHOWN (bit 0): root here has it.
        assert!(has_capability(0));
    }
}
