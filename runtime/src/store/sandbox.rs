//! Sandbox records: what the daemon knows about each pod sandbox.

use crate::config::Backend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// CRI's `NamespaceMode::NODE`: the host's namespace.
const NODE: i32 = k8s_cri::v1::NamespaceMode::Node as i32;

/// Pod metadata from the CRI request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Attempt number.
    pub attempt: u32,
}

/// Whether a sandbox can run containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Running, its agent answering.
    Ready,
    /// Stopped, failed, or its VM/agent died.
    NotReady,
}

/// The process behind a sandbox (the VMM, or the agent on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// PID.
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22),
    /// which tells our process from a later one reusing the PID.
    pub start_ticks: u64,
}

/// The pod-level namespace modes RunPodSandbox asked for, as CRI's
/// `NamespaceMode` values (0 POD, 1 CONTAINER, 2 NODE, 3 TARGET), kept to
/// echo them in PodSandboxStatus: kubelet recreates a sandbox whose
/// status says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceModes {
    /// Network namespace mode.
    pub network: i32,
    /// PID namespace mode.
    pub pid: i32,
    /// IPC namespace mode.
    pub ipc: i32,
}

impl NamespaceModes {
    /// The pod runs on the node's network (`hostNetwork`).
    pub fn host_network(&self) -> bool {
        self.network == NODE
    }

    /// Names the node namespace asked for that no vmcri pod can have: the
    /// host's PIDs or IPC.
    pub fn refuse_host_pid_and_ipc(&self) -> Result<(), &'static str> {
        if self.pid == NODE {
            return Err("the host's PID namespace (hostPID)");
        }
        if self.ipc == NODE {
            return Err("the host's IPC namespace (hostIPC)");
        }
        Ok(())
    }
}

/// Everything the daemon knows about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox ID (64 hex digits).
    pub id: String,
    /// Pod metadata.
    pub meta: PodMeta,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// RuntimeClass handler that ran it.
    pub handler: String,
    /// Its backend.
    pub backend: Backend,
    /// Creation time, nanoseconds since the epoch.
    pub created_at_ns: i64,
    /// State.
    pub state: SandboxState,
    /// Why it is not ready, if it is not.
    pub reason: Option<String>,
    /// Its process, while one runs.
    pub process: Option<ProcessRef>,
    /// Where its agent listens (vsock.sock or agent.sock).
    pub agent_socket: PathBuf,
    /// Its private directory.
    pub dir: PathBuf,
    /// The pod's log directory from kubelet.
    pub log_directory: String,
    /// Hostname.
    pub hostname: String,
    /// Pod-level namespace modes (records from before they were kept
    /// read as all-POD, the default).
    #[serde(default)]
    pub namespaces: NamespaceModes,
    /// Its host cgroup (cgroupfs path, `<parent>/vmcri-<id>`), recorded
    /// before it is made so that removal finds it after any restart;
    /// `None` for pods without one (process backend, cgroups disabled,
    /// records from before cgroups).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The pod's network namespace (`<root>/netns/<id>`), recorded before
    /// it is made so that removal and recovery find it; `None` for
    /// hostNetwork pods and with `[cni] enabled = false`.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The pod's network as CNI set it up: filled before the backend
    /// starts, which reads it; cleared once CNI DEL has released it.
    #[serde(default)]
    pub network: Option<crate::network::PodNetwork>,
}
