//! A sandbox backend with no process behind it: each sandbox is a
//! [`FakeAgent`] on the sandbox's agent socket, and its "process" is a
//! number this backend calls alive until the sandbox stops or a test
//! crashes it.

use super::agent::FakeAgent;
use crate::backend::{BackendError, ContainerContext, Exposed, SandboxBackend, Spawned};
use crate::cgroup::Placement;
use crate::config::{Backend, Handler};
use crate::lock::lock;
use crate::store::{NamespaceModes, ProcessRef, SandboxRecord};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vmcri_agent_client::{Agent, AgentAddr};

/// The fake agents' per-call deadline: far above what they take, so a
/// loaded machine fails nothing, and below the tests' patience.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sandboxes as in-memory agents.
pub(crate) struct FakeBackend {
    /// Where the agents run: a runtime of their own, so they outlive the
    /// daemon's (a test restarts the daemon by dropping its runtime).
    agents_runtime: Option<tokio::runtime::Runtime>,
    agents: Mutex<HashMap<String, FakeAgent>>,
    alive: Mutex<HashSet<i32>>,
    next_pid: AtomicI32,
    /// (sandbox, container) pairs whose files are exposed.
    exposed: Mutex<BTreeSet<(String, String)>>,
    /// The next start fails with this message.
    fail_start: Mutex<Option<String>>,
    /// Connections made to agents through [`SandboxBackend::agent`].
    dials: AtomicUsize,
    /// The `network` of each record a start was given, in order.
    started_networks: Mutex<Vec<Option<crate::network::PodNetwork>>>,
}

impl FakeBackend {
    pub(crate) fn new() -> FakeBackend {
        let agents_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the fake agents");
        FakeBackend {
            agents_runtime: Some(agents_runtime),
            agents: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashSet::new()),
            // Far above any real PID: nothing here may name a real process.
            next_pid: AtomicI32::new(1 << 30),
            exposed: Mutex::new(BTreeSet::new()),
            fail_start: Mutex::new(None),
            dials: AtomicUsize::new(0),
            started_networks: Mutex::new(Vec::new()),
        }
    }

    /// The `network` of each record a start was given, in order.
    pub(crate) fn started_networks(&self) -> Vec<Option<crate::network::PodNetwork>> {
        lock(&self.started_networks).clone()
    }

    /// Runs `f` on sandbox `id`'s agent.
    pub(crate) fn with_agent<T>(&self, id: &str, f: impl FnOnce(&FakeAgent) -> T) -> T {
        let agents = lock(&self.agents);
        let agent = agents
            .get(id)
            .unwrap_or_else(|| panic!("FakeBackend: no agent for sandbox {id}"));
        f(agent)
    }

    /// Makes sandbox `rec`'s process die, as a crashed VMM would.
    pub(crate) fn crash(&self, rec: &SandboxRecord) {
        if let Some(p) = rec.process {
            lock(&self.alive).remove(&p.pid);
        }
        lock(&self.agents).remove(&rec.id);
    }

    /// The next start fails with `why`.
    pub(crate) fn fail_next_start(&self, why: &str) {
        *lock(&self.fail_start) = Some(why.to_string());
    }

    /// How many connections the daemon opened to agents.
    pub(crate) fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// The containers of sandbox `id` whose files are exposed.
    pub(crate) fn exposed(&self, id: &str) -> Vec<String> {
        lock(&self.exposed)
            .iter()
            .filter(|(s, _)| s == id)
            .map(|(_, c)| c.clone())
            .collect()
    }

    fn addr(rec: &SandboxRecord) -> AgentAddr {
        AgentAddr::Unix(rec.agent_socket.clone())
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        lock(&self.agents).clear();
        if let Some(rt) = self.agents_runtime.take() {
            // Dropping a runtime blocks, which async tests may not.
            rt.shutdown_background();
        }
    }
}

#[tonic::async_trait]
impl SandboxBackend for FakeBackend {
    fn kind(&self) -> Backend {
        Backend::Microvm
    }

    fn process_name(&self) -> &'static str {
        "VMM"
    }

    fn agent_socket(&self, socket_dir: &Path) -> PathBuf {
        socket_dir.join("agent.sock")
    }

    fn check_namespaces(&self, ns: &NamespaceModes) -> Result<(), BackendError> {
        crate::backend::refuse_host_pid_and_ipc(ns)
    }

    fn etc_dir(&self, sandbox_dir: &Path) -> PathBuf {
        sandbox_dir.join("etc")
    }

    /// As a VMM would; the test daemon runs with pod cgroups disabled,
    /// as no process stands behind a fake sandbox.
    fn runs_in_pod_cgroup(&self) -> bool {
        true
    }

    async fn start(
        &self,
        rec: &SandboxRecord,
        _handler: &Handler,
        _cgroup: Placement,
        spawned: Spawned<'_>,
    ) -> Result<ProcessRef, BackendError> {
        lock(&self.started_networks).push(rec.network.clone());
        if let Some(why) = lock(&self.fail_start).take() {
            return Err(BackendError::Missing(why));
        }
        crate::backend::socket_dir(rec)?;
        let p = ProcessRef {
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            start_ticks: 1,
        };
        lock(&self.alive).insert(p.pid);
        spawned(p).map_err(|source| BackendError::Spawn {
            what: "recording the process".into(),
            source,
        })?;
        let agent = {
            let _on = self.agents_runtime.as_ref().map(|rt| rt.enter());
            FakeAgent::serve(&rec.agent_socket)
        };
        lock(&self.agents).insert(rec.id.clone(), agent);
        Ok(p)
    }

    fn alive(&self, p: &ProcessRef) -> bool {
        lock(&self.alive).contains(&p.pid)
    }

    fn kill(&self, p: &ProcessRef) {
        lock(&self.alive).remove(&p.pid);
    }

    async fn agent(&self, rec: &SandboxRecord) -> Result<Agent, BackendError> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let t = CALL_TIMEOUT;
        Ok(Agent::connect(Self::addr(rec), t, t).await?)
    }

    async fn stop(&self, rec: &SandboxRecord) {
        // Its own connection, as the real backends' polite shutdown.
        let t = CALL_TIMEOUT;
        if let Ok(agent) = Agent::connect(Self::addr(rec), t, t).await {
            let _ = agent.shutdown().await;
        }
        // Dropping it stops its server.
        lock(&self.agents).remove(&rec.id);
        if let Some(p) = rec.process {
            lock(&self.alive).remove(&p.pid);
        }
    }

    fn container_context(&self, rec: &SandboxRecord) -> ContainerContext {
        let etc = self.etc_dir(&rec.dir);
        ContainerContext {
            etc_files: crate::backend::etc_files(&etc, &etc),
            in_vm: true,
            min_oom_score_adj: None,
        }
    }

    fn expose(
        &self,
        rec: &SandboxRecord,
        id: &str,
        layers: &[(String, PathBuf)],
        mounts: &[k8s_cri::v1::Mount],
    ) -> Result<Exposed, BackendError> {
        lock(&self.exposed).insert((rec.id.clone(), id.to_string()));
        Ok(Exposed {
            layers: layers
                .iter()
                .map(|(_, p)| p.display().to_string())
                .collect(),
            mount_sources: mounts.iter().map(|m| m.host_path.clone()).collect(),
        })
    }

    fn release_container(&self, rec: &SandboxRecord, id: &str) -> std::io::Result<()> {
        lock(&self.exposed).remove(&(rec.id.clone(), id.to_string()));
        Ok(())
    }

    fn release_all(&self, sandbox_dir: &Path) -> std::io::Result<()> {
        let id = sandbox_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        lock(&self.exposed).retain(|(s, _)| *s != id);
        Ok(())
    }
}
