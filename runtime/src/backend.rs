//! Sandbox backends: what runs behind a pod. `microvm` starts one
//! `vmcri-vmm` per pod with the agent as the guest's init; `process`
//! starts the same agent on the host in fresh namespaces. Above this
//! module the CRI logic is the same for both.

use crate::config::{Backend, Config, Handler, Switch};
use crate::process;
use crate::store::{ProcessRef, SandboxRecord};
use std::path::{Path, PathBuf};
use std::process::Command;
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
}

/// Starts, reaches and stops sandboxes.
pub struct Backends {
    config: Arc<Config>,
}

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

/// The newest file named `file` in `<cache>/<kind>/*/`.
fn newest_cached(
    cache: &Path,
    kind: &str,
    file: &str,
    hint: &str,
) -> Result<PathBuf, BackendError> {
    let dir = cache.join(kind);
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    newest.ok_or_else(|| {
        BackendError::Missing(format!(
            "no {file} in {} and none configured: run {hint}",
            dir.display()
        ))
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Backends {
    /// Backends configured by `config`.
    pub fn new(config: Arc<Config>) -> Self {
        Backends { config }
    }

    /// The agent address of a sandbox whose sockets live in `socket_dir`.
    pub fn agent_socket(backend: Backend, socket_dir: &Path) -> PathBuf {
        match backend {
            Backend::Microvm => socket_dir.join("vsock.sock"),
            Backend::Process => socket_dir.join("agent.sock"),
        }
    }

    fn addr(rec: &SandboxRecord) -> AgentAddr {
        match rec.backend {
            Backend::Microvm => AgentAddr::vm(&rec.agent_socket),
            Backend::Process => AgentAddr::Unix(rec.agent_socket.clone()),
        }
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.config.agent.call_timeout_secs)
    }

    /// Starts the sandbox `rec` describes and waits for its agent.
    /// `spawned` runs as soon as the process exists, before the wait, so
    /// the caller can persist it: a daemon killed during a boot must find
    /// the process again and end it.
    pub async fn start(
        &self,
        rec: &SandboxRecord,
        handler: &Handler,
        spawned: impl FnOnce(ProcessRef) -> std::io::Result<()>,
    ) -> Result<ProcessRef, BackendError> {
        if let Some(parent) = rec.agent_socket.parent() {
            crate::store::private_dirs(parent).map_err(|source| BackendError::Spawn {
                what: format!("socket directory {}", parent.display()),
                source,
            })?;
        }
        let log = rec.dir.join(match rec.backend {
            Backend::Microvm => "vmm.log",
            Backend::Process => "agent.log",
        });
        let (what, proc_ref, ready_within) = match rec.backend {
            Backend::Microvm => {
                let c = &self.config.microvm;
                let vmm = find_binary(&c.vmm, "vmcri-vmm")?;
                let kernel = if c.kernel.as_os_str().is_empty() {
                    newest_cached(
                        &self.config.cache,
                        "kernel",
                        "vmlinux",
                        "guest-kernel/build",
                    )?
                } else {
                    c.kernel.clone()
                };
                let initrd = if c.initrd.as_os_str().is_empty() {
                    newest_cached(
                        &self.config.cache,
                        "agent",
                        "initrd.cpio",
                        "agent/build-initramfs",
                    )?
                } else {
                    c.initrd.clone()
                };
                let shared = crate::shared::SharedDir::new(&rec.dir);
                shared.prepare().map_err(|source| BackendError::Spawn {
                    what: format!("the pod's share in {}", rec.dir.display()),
                    source,
                })?;
                let mut cmd = Command::new(&vmm);
                cmd.arg("--kernel")
                    .arg(&kernel)
                    .arg("--initrd")
                    .arg(&initrd)
                    .args([
                        "--memory",
                        &handler.memory_mib.to_string(),
                        "--vcpus",
                        &handler.vcpus.to_string(),
                    ])
                    .arg("--vsock")
                    .arg(&rec.agent_socket)
                    .arg("--serial")
                    .arg(rec.dir.join("console.log"))
                    .arg("--shared-dir")
                    .arg(shared.path())
                    .arg("--cmdline")
                    // The agent sets the guest's hostname from here.
                    .arg(format!("quiet vmcri.hostname={}", rec.hostname));
                let p = process::spawn_detached(cmd, &log, || Ok(())).map_err(|source| {
                    BackendError::Spawn {
                        what: vmm.display().to_string(),
                        source,
                    }
                })?;
                ("VMM", p, Duration::from_secs(c.boot_timeout_secs))
            }
            Backend::Process => {
                let agent = find_binary(&self.config.process.agent, "vmcri-agent")?;
                let mut cmd = Command::new(&agent);
                cmd.arg("--listen")
                    .arg(format!("unix:{}", rec.agent_socket.display()))
                    .arg("--state")
                    .arg(rec.dir.join("agent"));
                let hostname = rec.hostname.clone().into_bytes();
                // hostNetwork pods (DaemonSets) keep the node's network.
                let host_network = rec.namespaces.host_network();
                let p = process::spawn_detached(cmd, &log, move || {
                    enter_namespaces(&hostname, host_network)
                })
                .map_err(|source| BackendError::Spawn {
                    what: agent.display().to_string(),
                    source,
                })?;
                (
                    "agent",
                    p,
                    Duration::from_secs(self.config.process.boot_timeout_secs),
                )
            }
        };
        tracing::info!(sandbox_id = %rec.id, backend = %rec.backend, pid = proc_ref.pid, "sandbox process started");
        if let Err(source) = spawned(proc_ref) {
            process::kill(&proc_ref);
            return Err(BackendError::Spawn {
                what: "recording the sandbox's process".into(),
                source,
            });
        }
        let connect = Agent::connect(Self::addr(rec), ready_within, self.call_timeout());
        // Give up early if the process dies instead of waiting out the deadline.
        let died = async {
            while process::alive(&proc_ref) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            r = connect => match r {
                Ok(_) => Ok(proc_ref),
                Err(e) => {
                    process::kill(&proc_ref);
                    Err(e.into())
                }
            },
            () = died => Err(BackendError::DiedAtStart { what, log_tail: log_tail(&log) }),
        }
    }

    /// Connects to a running sandbox's agent (it is expected to be up).
    pub async fn agent(&self, rec: &SandboxRecord) -> Result<Agent, BackendError> {
        Ok(Agent::connect(Self::addr(rec), self.call_timeout(), self.call_timeout()).await?)
    }

    /// Stops a sandbox: asks its agent to shut down, then kills its
    /// process if it has not ended within the grace period.
    pub async fn stop(&self, rec: &SandboxRecord) {
        let Some(p) = rec.process else { return };
        if !process::alive(&p) {
            if rec.backend == Backend::Process {
                remove_host_cgroups(&rec.id);
            }
            return;
        }
        let grace = Duration::from_secs(self.config.agent.stop_timeout_secs);
        let polite = async {
            if let Ok(agent) = Agent::connect(Self::addr(rec), Duration::from_secs(2), grace).await
            {
                if let Err(e) = agent.shutdown().await {
                    tracing::warn!(sandbox_id = %rec.id, error = %e, "agent shutdown failed; killing");
                }
            }
        };
        let _ = tokio::time::timeout(grace, polite).await;
        if !process::wait_gone(&p, grace).await {
            tracing::warn!(sandbox_id = %rec.id, pid = p.pid, "sandbox did not stop in time; killing");
            process::kill(&p);
            process::wait_gone(&p, Duration::from_secs(5)).await;
        }
        if rec.backend == Backend::Process {
            remove_host_cgroups(&rec.id);
        }
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

/// Runs in the agent's child before exec: new mount, IPC, UTS, network
/// (unless the pod uses the node's) and PID namespaces (the agent's children land in the new PID
/// namespace), mounts made private, the pod's hostname set. Only
/// async-signal-safe syscalls.
fn enter_namespaces(hostname: &[u8], host_network: bool) -> std::io::Result<()> {
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID;
    if !host_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare/mount/sethostname with valid arguments.
    unsafe {
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
