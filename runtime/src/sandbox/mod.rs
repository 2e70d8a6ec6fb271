//! The sandbox service: CRI pod-sandbox semantics (names, states,
//! idempotent stop and remove, recovery) over the store and a backend.
//! Each sandbox owns its backend handle and one channel to its agent
//! ([`Sandbox::agent`]), multiplexed by every call and stream.

pub mod pod_files;

use crate::backend::{BackendError, Backends, SandboxBackend};
use crate::cgroup::limits::PodResources;
use crate::cgroup::path::CgroupPath;
use crate::cgroup::stats::Usage;
use crate::cgroup::{CgroupError, Placement, PodCgroups};
use crate::config::Config;
use crate::id::{new_id, now_ns};
use crate::lock::lock;
use crate::network::{Network, NetworkError, NetworkRequest};
use crate::store::{
    NamespaceModes, PodMeta, ProcessRef, SandboxRecord, SandboxState, Store, StoreError,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::broadcast;
use vmcri_agent_client::Agent;

/// Errors of sandbox operations, each mapping to one gRPC status.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// Bad request (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// Unknown sandbox (NotFound).
    #[error("pod sandbox {0} not found")]
    NotFound(String),
    /// Same metadata as an existing sandbox (AlreadyExists).
    #[error("a pod sandbox named {name}/{namespace} (uid {uid}, attempt {attempt}) already exists: {id}")]
    Exists {
        /// Name.
        name: String,
        /// Namespace.
        namespace: String,
        /// UID.
        uid: String,
        /// Attempt.
        attempt: u32,
        /// The existing sandbox.
        id: String,
    },
    /// Not ready for what was asked (FailedPrecondition).
    #[error("pod sandbox {id} is not ready{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotReady {
        /// The sandbox.
        id: String,
        /// Why, if known.
        reason: Option<String>,
    },
    /// Starting or reaching the sandbox failed (Unavailable/Internal).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Making, filling or removing the pod's host cgroup failed.
    #[error("the pod's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    /// Persisting state failed (Internal).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sandbox's process was killed for memory in its pod cgroup
    /// (ResourceExhausted).
    #[error("{0}")]
    OutOfMemory(String),
    /// Setting up or tearing down the pod's network failed.
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// A lifecycle event, published to GetContainerEvents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Record created.
    Created,
    /// Ready (a sandbox) or running (a container).
    Started,
    /// Stopped.
    Stopped,
    /// Removed.
    Deleted,
}

/// An event and the sandbox it concerns (its last state).
#[derive(Debug, Clone)]
pub struct SandboxEvent {
    /// What happened.
    pub kind: EventKind,
    /// The sandbox after it happened.
    pub record: SandboxRecord,
    /// When, nanoseconds since the epoch.
    pub at_ns: i64,
}

/// What RunPodSandbox asks for, validated.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Metadata.
    pub meta: PodMeta,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// RuntimeClass handler.
    pub handler: String,
    /// Hostname.
    pub hostname: String,
    /// Log directory.
    pub log_directory: String,
    /// DNS for the pod's resolv.conf (the host's when absent).
    pub dns: Option<k8s_cri::v1::DnsConfig>,
    /// Pod-level namespace modes.
    pub namespaces: NamespaceModes,
    /// Parent of the pod's host cgroup (the configured default if none).
    pub cgroup_parent: Option<CgroupPath>,
    /// The pod's summed resources and kubelet's overhead.
    pub resources: PodResources,
    /// What CNI is given: port mappings and DNS.
    pub network: NetworkRequest,
}

/// A sandbox as its users see it: its record at one moment, the backend
/// that runs it and its agent channel.
#[derive(Clone)]
pub struct Sandbox {
    /// The record.
    pub record: SandboxRecord,
    backend: Arc<dyn SandboxBackend>,
    channel: Arc<AgentChannel>,
}

/// The one agent channel of a sandbox, opened on first use: an HTTP/2
/// connection every call and stream of the sandbox shares, so a call
/// costs no dial, handshake or health check. If the connection breaks,
/// tonic's channel dials again (through the same hybrid-vsock dialer)
/// for the next call; it is dropped when the sandbox stops or dies. The
/// first callers wait for one dial rather than each making their own.
#[derive(Default)]
struct AgentChannel(tokio::sync::Mutex<Option<Agent>>);

impl AgentChannel {
    /// Forgets the connection (the sandbox stopped or died). A dial in
    /// progress meanwhile is left to finish: it reaches a sandbox that is
    /// not ready, so nothing calls through it.
    fn close(&self) {
        if let Ok(mut open) = self.0.try_lock() {
            *open = None;
        }
    }
}

impl Sandbox {
    /// Its backend.
    pub fn backend(&self) -> &dyn SandboxBackend {
        self.backend.as_ref()
    }

    /// Its agent, on the sandbox's channel (opened if this is the first
    /// call since the daemon started); it is expected to be up.
    pub async fn agent(&self) -> Result<Agent, SandboxError> {
        let mut open = self.channel.0.lock().await;
        if let Some(agent) = open.as_ref() {
            return Ok(agent.clone());
        }
        let agent = self.backend.agent(&self.record).await?;
        *open = Some(agent.clone());
        Ok(agent)
    }

    /// A connection to its agent of its own, outside the sandbox's
    /// channel, for a stream a remote client paces (exec output,
    /// port-forward): HTTP/2 flow control would let a stalled client's
    /// unread data hold the shared connection's window, and with it every
    /// log copy and call of the pod.
    pub async fn own_agent(&self) -> Result<Agent, SandboxError> {
        Ok(self.backend.agent(&self.record).await?)
    }

    /// FailedPrecondition unless it is ready.
    pub fn ready(self) -> Result<Sandbox, SandboxError> {
        if self.record.state != SandboxState::Ready {
            return Err(SandboxError::NotReady {
                id: self.record.id,
                reason: self.record.reason,
            });
        }
        Ok(self)
    }
}

struct Entry {
    /// Serialises lifecycle operations on one sandbox (a boot can take
    /// minutes on nested KVM; other sandboxes are not held up).
    op: tokio::sync::Mutex<()>,
    record: Mutex<SandboxRecord>,
    backend: Arc<dyn SandboxBackend>,
    channel: Arc<AgentChannel>,
}

impl Entry {
    fn new(record: SandboxRecord, backend: Arc<dyn SandboxBackend>) -> Arc<Entry> {
        Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            backend,
            channel: Arc::default(),
        })
    }
}

/// All sandboxes.
pub struct Sandboxes {
    config: Arc<Config>,
    store: Store,
    backends: Backends,
    cgroups: Arc<PodCgroups>,
    network: Arc<Network>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    events: broadcast::Sender<SandboxEvent>,
    /// Sandboxes a crash left half-made, whose network
    /// [`Sandboxes::recover_network`] undoes.
    unfinished: Mutex<Vec<String>>,
}

impl Sandboxes {
    /// The sandboxes of `records` (what the store held), reconciled with
    /// what is running: a sandbox whose process died while the daemon was
    /// down is NotReady, and one that was still starting is ended.
    pub fn recover(
        config: Arc<Config>,
        store: Store,
        backends: Backends,
        cgroups: Arc<PodCgroups>,
        network: Arc<Network>,
        records: Vec<SandboxRecord>,
    ) -> Result<Sandboxes, SandboxError> {
        let mut entries = HashMap::new();
        let mut unfinished = Vec::new();
        // Read once, not once per sandbox.
        let running = crate::backend::host_process::OurProcesses::scan();
        for mut rec in records {
            let backend = backends.get(rec.backend);
            if rec.state == SandboxState::NotReady
                && (rec.process.is_some() || rec.reason.as_deref() == Some("starting"))
            {
                unfinished.push(rec.id.clone());
            }
            if rec.state == SandboxState::NotReady {
                // The daemon died while this sandbox booted: nobody will
                // wait for it, so its process must not outlive the boot.
                // It is found by its saved reference or, if it was spawned
                // just before the crash, by its sandbox directory.
                let mut procs: Vec<ProcessRef> = rec.process.into_iter().collect();
                procs.extend(running.under(&rec.dir));
                for p in procs.iter().filter(|p| backend.alive(p)) {
                    tracing::warn!(sandbox_id = %rec.id, pid = p.pid, "sandbox was still starting when vmcri stopped; ending its process");
                    backend.kill(p);
                }
                if rec.process.take().is_some() || rec.reason.as_deref() == Some("starting") {
                    rec.reason = Some("vmcri stopped while the sandbox was starting".into());
                    store.save_sandbox(&rec)?;
                }
            }
            if rec.state == SandboxState::Ready && !rec.process.is_some_and(|p| backend.alive(&p)) {
                tracing::warn!(sandbox_id = %rec.id, "sandbox process exited while vmcri was down");
                rec.state = SandboxState::NotReady;
                rec.reason = Some(format!(
                    "the sandbox's {} exited while vmcri was not running",
                    backend.process_name()
                ));
                rec.process = None;
                store.save_sandbox(&rec)?;
            }
            entries.insert(rec.id.clone(), Entry::new(rec, backend));
        }
        tracing::info!(sandboxes = entries.len(), "recovered sandbox state");
        let (events, _) = broadcast::channel(1024);
        Ok(Sandboxes {
            backends,
            cgroups,
            network,
            config,
            store,
            entries: Mutex::new(entries),
            events,
            unfinished: Mutex::new(unfinished),
        })
    }

    /// The network side of recovery, once the daemon runs: CNI DEL and
    /// namespace removal for sandboxes a crash left half-made (their ADD
    /// may have run), and removal of namespaces whose sandbox is gone.
    pub async fn recover_network(&self) {
        let unfinished = std::mem::take(&mut *lock(&self.unfinished));
        for id in unfinished {
            let Ok(entry) = self.entry(&id) else { continue };
            let _op = entry.op.lock().await;
            let rec = lock(&entry.record).clone();
            if let Err(e) = self.release_network(&rec).await {
                tracing::warn!(sandbox_id = %id, error = %e, "undoing the network of a sandbox that was starting");
                continue;
            }
            if let Some(path) = &rec.netns {
                if let Err(e) = self.network.remove_netns(path) {
                    tracing::warn!(sandbox_id = %id, error = %e, "removing the network namespace of a sandbox that was starting");
                }
            }
            tracing::info!(sandbox_id = %id, "network of a sandbox that was starting undone");
        }
        let known = lock(&self.entries).keys().cloned().collect();
        self.network.remove_orphans(&known);
    }

    /// Pod networking.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// CNI DEL for `rec` (nothing if it has no network, or DEL already
    /// ran), then its record forgets the network.
    async fn release_network(&self, rec: &SandboxRecord) -> Result<(), SandboxError> {
        self.network.teardown(rec).await?;
        if rec.network.is_some() {
            if let Ok(entry) = self.entry(&rec.id) {
                let done = {
                    let mut r = lock(&entry.record);
                    r.network = None;
                    r.clone()
                };
                self.store.save_sandbox(&done)?;
            }
        }
        Ok(())
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store sandboxes and their containers are kept in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Subscribes to sandbox events.
    pub fn subscribe(&self) -> broadcast::Receiver<SandboxEvent> {
        self.events.subscribe()
    }

    fn publish(&self, kind: EventKind, record: &SandboxRecord) {
        let _ = self.events.send(SandboxEvent {
            kind,
            record: record.clone(),
            at_ns: now_ns(),
        });
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, SandboxError> {
        lock(&self.entries)
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    /// Resolves a full ID or a unique prefix, as crictl users type them.
    pub fn resolve(&self, id: &str) -> Result<String, SandboxError> {
        if id.is_empty() {
            return Err(SandboxError::Invalid("pod sandbox ID is empty".into()));
        }
        let entries = lock(&self.entries);
        if entries.contains_key(id) {
            return Ok(id.to_string());
        }
        let mut matches = entries.keys().filter(|k| k.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(one), None) => Ok(one.clone()),
            (Some(_), Some(_)) => Err(SandboxError::Invalid(format!(
                "pod sandbox ID prefix {id} is ambiguous"
            ))),
            _ => Err(SandboxError::NotFound(id.to_string())),
        }
    }

    /// RunPodSandbox.
    pub async fn run(&self, req: RunRequest) -> Result<String, SandboxError> {
        let (handler_name, handler) = self
            .config
            .handler(&req.handler)
            .map(|(n, h)| (n.to_string(), h.clone()))
            .ok_or_else(|| {
                SandboxError::Invalid(format!(
                    "unknown runtime handler {:?}; configured: {}",
                    req.handler,
                    self.handler_names()
                ))
            })?;
        let backend = self.backends.get(handler.backend);
        backend.check_namespaces(&req.namespaces)?;
        // Checked before anything is made: without a network config a
        // pod-network pod cannot start (containerd's "cni plugin not
        // initialized"); hostNetwork pods need none.
        let pod_network = !req.namespaces.host_network() && self.network.enabled();
        let list = if pod_network {
            Some(self.network.current().map_err(NetworkError::NotReady)?)
        } else {
            None
        };
        let id = new_id();
        let dir = self.store.sandbox_dir(&id);
        let socket_dir = self.config.root.join("run").join(&id[..16]);
        let cgroup = (backend.runs_in_pod_cgroup() && self.cgroups.enabled())
            .then(|| self.cgroups.path_for(req.cgroup_parent.as_ref(), &id));
        let mut rec = SandboxRecord {
            id: id.clone(),
            meta: req.meta.clone(),
            labels: req.labels,
            annotations: req.annotations,
            handler: handler_name,
            backend: backend.kind(),
            created_at_ns: now_ns(),
            state: SandboxState::NotReady,
            reason: Some("starting".into()),
            process: None,
            agent_socket: backend.agent_socket(&socket_dir),
            dir: dir.clone(),
            log_directory: req.log_directory,
            hostname: req.hostname,
            namespaces: req.namespaces,
            cgroup: cgroup.as_ref().map(|c| c.to_string()),
            netns: pod_network.then(|| self.network.netns_path(&id)),
            network: None,
        };
        let entry = Entry::new(rec.clone(), backend.clone());
        let _op = entry.op.lock().await;
        {
            let mut entries = lock(&self.entries);
            if let Some(existing) = entries.values().find(|e| lock(&e.record).meta == req.meta) {
                let m = &req.meta;
                return Err(SandboxError::Exists {
                    name: m.name.clone(),
                    namespace: m.namespace.clone(),
                    uid: m.uid.clone(),
                    attempt: m.attempt,
                    id: lock(&existing.record).id.clone(),
                });
            }
            entries.insert(id.clone(), entry.clone());
        }
        // Persist before starting: a crash mid-boot leaves a NotReady record.
        let etc = backend.etc_dir(&dir);
        let saved = self.store.save_sandbox(&rec).and_then(|()| {
            pod_files::write(&etc, &rec.hostname, req.dns.as_ref()).map_err(|source| {
                StoreError::Io {
                    path: etc.display().to_string(),
                    source,
                }
            })
        });
        if let Err(e) = saved {
            self.forget(&rec, &socket_dir).await;
            return Err(e.into());
        }
        // Made and limited before the VMM exists: it allocates guest
        // memory in it from the start.
        let placement = match cgroup {
            Some(path) => {
                let resources = req.resources;
                let made = self
                    .off_workers(path.to_string(), move |c| c.create(&path, &resources))
                    .await;
                match made {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(sandbox_id = %id, error = %e, "cannot make the pod's cgroup");
                        self.forget(&rec, &socket_dir).await;
                        return Err(e.into());
                    }
                }
            }
            None => Placement::none(),
        };
        // The namespace (recorded above, so a crash leaves it findable)
        // and CNI ADD, before the backend starts: it reads rec.network.
        if let (Some(path), Some(list)) = (rec.netns.clone(), list) {
            let set = async {
                self.network.create_netns(&path).await?;
                self.network.add(&rec, &path, list, &req.network).await
            };
            let saved = match set.await {
                Ok(net) => {
                    tracing::info!(sandbox_id = %id, ips = ?net.pod_ips(), "pod network set up");
                    rec.network = Some(net);
                    lock(&entry.record).network = rec.network.clone();
                    self.store.save_sandbox(&rec).map_err(SandboxError::from)
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = saved {
                tracing::error!(sandbox_id = %id, error = %e, "pod network setup failed");
                self.forget(&rec, &socket_dir).await;
                return Err(e);
            }
        }
        self.publish(EventKind::Created, &rec);
        tracing::info!(sandbox_id = %id, backend = %rec.backend, name = %req.meta.name, "starting pod sandbox");
        let spawned = Box::new(|p: ProcessRef| {
            let booting = {
                let mut r = lock(&entry.record);
                r.process = Some(p);
                r.clone()
            };
            self.store
                .save_sandbox(&booting)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        match backend.start(&rec, &handler, placement, spawned).await {
            Ok(p) => {
                let done = {
                    let mut r = lock(&entry.record);
                    r.process = Some(p);
                    r.state = SandboxState::Ready;
                    r.reason = None;
                    r.clone()
                };
                self.store.save_sandbox(&done)?;
                self.publish(EventKind::Started, &done);
                Ok(id)
            }
            Err(e) => {
                // Read before the cgroup goes with the record.
                let e = match (&e, self.oom_note(&rec)) {
                    (BackendError::DiedAtStart { what, .. }, Some(note)) => {
                        SandboxError::OutOfMemory(format!(
                            "the sandbox's {what} was killed while starting: {note}"
                        ))
                    }
                    _ => e.into(),
                };
                // Nothing half-made stays behind: the caller retries with the
                // same metadata, so the record must go (start killed the
                // process if it had one).
                self.forget(&rec, &socket_dir).await;
                tracing::error!(sandbox_id = %id, error = %e, "pod sandbox failed to start");
                Err(e)
            }
        }
    }

    /// Drops a sandbox that never started, with everything made for it.
    async fn forget(&self, rec: &SandboxRecord, socket_dir: &std::path::Path) {
        lock(&self.entries).remove(&rec.id);
        // DEL before the namespace goes: plugins delete their interfaces
        // in it and release the addresses.
        if let Err(e) = self.network.teardown(rec).await {
            tracing::warn!(sandbox_id = %rec.id, error = %e, "CNI DEL of a sandbox that did not start");
        }
        if let Some(path) = &rec.netns {
            if let Err(e) = self.network.remove_netns(path) {
                tracing::warn!(sandbox_id = %rec.id, error = %e, "removing the network namespace of a sandbox that did not start");
            }
        }
        if let Err(e) = self.remove_cgroup(rec).await {
            tracing::warn!(sandbox_id = %rec.id, error = %e, "removing the cgroup of a sandbox that did not start");
        }
        let backend = self.backends.get(rec.backend);
        if let Err(e) = backend
            .release_all(&rec.dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.store
                    .remove_sandbox(&rec.id)
                    .map_err(|e| e.to_string())
            })
        {
            tracing::warn!(sandbox_id = %rec.id, error = %e, "cleaning up a sandbox that did not start");
        }
        let _ = crate::hostfs::remove::remove_tree(socket_dir);
    }

    /// Removes the pod's host cgroup, if it has one (off the async
    /// workers: it may wait for killed processes to be gone).
    async fn remove_cgroup(&self, rec: &SandboxRecord) -> Result<(), CgroupError> {
        let Some(path) = rec.cgroup.clone() else {
            return Ok(());
        };
        self.off_workers(path.clone(), move |c| c.remove(&path))
            .await?;
        tracing::debug!(sandbox_id = %rec.id, cgroup = ?rec.cgroup, "pod cgroup removed");
        Ok(())
    }

    /// Runs blocking cgroup work `f` (on cgroup `path`) on a blocking
    /// thread.
    async fn off_workers<T: Send + 'static>(
        &self,
        path: String,
        f: impl FnOnce(&PodCgroups) -> Result<T, CgroupError> + Send + 'static,
    ) -> Result<T, CgroupError> {
        let cgroups = self.cgroups.clone();
        tokio::task::spawn_blocking(move || f(&cgroups))
            .await
            .unwrap_or_else(|join| {
                Err(CgroupError::Io {
                    path: path.into(),
                    source: std::io::Error::other(join.to_string()),
                })
            })
    }

    /// The host's account of the pod's CPU and memory, from its cgroup;
    /// `None` for a pod without one (its agent's figures stand).
    pub fn host_usage(&self, rec: &SandboxRecord) -> Option<Result<Usage, CgroupError>> {
        let path = rec.cgroup.as_deref()?;
        Some(self.cgroups.usage(path))
    }

    fn handler_names(&self) -> String {
        self.config
            .handlers
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// StopPodSandbox: idempotent for a known sandbox. The caller stops
    /// its containers first.
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let id = self.resolve(id)?;
        let entry = self.entry(&id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if rec.state == SandboxState::NotReady && rec.process.is_none() {
            // Stopped already, or its process died: DEL if it has not
            // run (or failed before); nothing otherwise.
            return self.release_network(&rec).await;
        }
        {
            // Stopping: a status read meanwhile must not take the
            // process's end for a crash.
            let mut r = lock(&entry.record);
            r.state = SandboxState::NotReady;
            r.reason = Some("stopping".into());
        }
        entry.backend.stop(&rec).await;
        entry.channel.close();
        // The VMM is gone; so must be anything left in its cgroup. A
        // failure here is retried by RemovePodSandbox, which reports it.
        if let Err(e) = self.remove_cgroup(&rec).await {
            tracing::warn!(sandbox_id = %rec.id, error = %e, "pod cgroup not removed at stop");
        }
        let done = {
            let mut r = lock(&entry.record);
            r.state = SandboxState::NotReady;
            r.reason = Some("stopped".into());
            r.process = None;
            r.clone()
        };
        self.store.save_sandbox(&done)?;
        self.publish(EventKind::Stopped, &done);
        // After the sandbox's processes are gone. A failure is reported,
        // and the next stop (kubelet retries) runs DEL again.
        self.release_network(&done).await
    }

    /// RemovePodSandbox: stops if needed; removing an unknown or already
    /// removed sandbox succeeds (its resources are already reclaimed).
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop(&id).await?;
        let entry = self.entry(&id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        // Also when the VMM died on its own (kill -9) or the daemon
        // restarted since: the record names the cgroup. An error keeps
        // the record, so kubelet's retry tries again.
        self.remove_cgroup(&rec).await?;
        // Unbind what the backend exposed first: removal never deletes
        // through a mount (a pod's share binds host volumes).
        entry
            .backend
            .release_all(&rec.dir)
            .map_err(|source| StoreError::Io {
                path: rec.dir.display().to_string(),
                source,
            })?;
        if let Some(path) = &rec.netns {
            self.network.remove_netns(path)?;
        }
        self.store.remove_sandbox(&id)?;
        if let Some(dir) = rec.agent_socket.parent() {
            let _ = crate::hostfs::remove::remove_tree(dir);
        }
        lock(&self.entries).remove(&id);
        self.publish(EventKind::Deleted, &rec);
        Ok(())
    }

    /// The sandbox's record, with its readiness re-checked.
    pub fn get(&self, id: &str) -> Result<SandboxRecord, SandboxError> {
        Ok(self.sandbox(id)?.record)
    }

    /// The sandbox, with its readiness re-checked.
    pub fn sandbox(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let id = self.resolve(id)?;
        let entry = self.entry(&id)?;
        let mut r = lock(&entry.record);
        self.refresh(&mut r, &entry);
        Ok(Sandbox {
            record: r.clone(),
            backend: entry.backend.clone(),
            channel: entry.channel.clone(),
        })
    }

    /// Marks a Ready sandbox whose process died NotReady.
    fn refresh(&self, r: &mut SandboxRecord, entry: &Entry) {
        let backend = entry.backend.as_ref();
        if r.state == SandboxState::Ready && !r.process.is_some_and(|p| backend.alive(&p)) {
            entry.channel.close();
            // The OOM killer's SIGKILL leaves no last words of its own.
            let note = match (backend.death_note(r), self.oom_note(r)) {
                (Some(d), Some(o)) => Some(format!("{d}; {o}")),
                (d, o) => d.or(o),
            };
            tracing::warn!(sandbox_id = %r.id, note = note.as_deref().unwrap_or(""), "sandbox process exited unexpectedly");
            r.state = SandboxState::NotReady;
            r.reason = Some(format!(
                "the sandbox's {} exited unexpectedly{}",
                backend.process_name(),
                note.map(|n| format!(": {n}")).unwrap_or_default()
            ));
            r.process = None;
            if let Err(e) = self.store.save_sandbox(r) {
                tracing::error!(sandbox_id = %r.id, error = %e, "persisting sandbox state");
            }
            self.publish(EventKind::Stopped, r);
        }
    }

    /// Says so when the kernel's OOM killer has killed in the sandbox's
    /// pod cgroup, with the limit it enforced.
    fn oom_note(&self, rec: &SandboxRecord) -> Option<String> {
        let path = rec.cgroup.as_deref()?;
        let oom = self.cgroups.oom(path).ok()?;
        (oom.kills > 0).then(|| {
            let limit = oom
                .limit_bytes
                .map(|l| format!("{} MiB", l >> 20))
                .unwrap_or_else(|| "none".into());
            format!(
                "out of memory: the kernel's OOM killer killed {} process(es) in the pod's \
                 cgroup {path}, whose limit ({limit}) is the pod's memory limit plus \
                 [microvm] overhead_memory_mib",
                oom.kills
            )
        })
    }

    /// All sandboxes, readiness re-checked.
    pub fn list(&self) -> Vec<SandboxRecord> {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        entries
            .iter()
            .map(|e| {
                let mut r = lock(&e.record);
                self.refresh(&mut r, e);
                r.clone()
            })
            .collect()
    }
}
