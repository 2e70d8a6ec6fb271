//! The pod sandbox manager: CRI semantics over the store and backends.

use crate::backend::{BackendError, Backends};
use crate::config::{Backend, Config};
use crate::process;
use crate::store::{
    NamespaceModes, PodMeta, ProcessRef, SandboxRecord, SandboxState, Store, StoreError,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::broadcast;

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
    /// Starting or reaching the sandbox failed (Unavailable/Internal).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Persisting state failed (Internal).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A sandbox lifecycle event, published to GetContainerEvents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Record created.
    Created,
    /// Ready.
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
}

struct Entry {
    /// Serialises lifecycle operations on one sandbox (a boot can take
    /// minutes on nested KVM; other sandboxes are not held up).
    op: tokio::sync::Mutex<()>,
    record: Mutex<SandboxRecord>,
}

/// All sandboxes.
pub struct Sandboxes {
    config: Arc<Config>,
    store: Store,
    backends: Backends,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    events: broadcast::Sender<SandboxEvent>,
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A fresh 64-hex-digit ID.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    // SAFETY: b is valid for 32 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // getrandom(2) does not fail for 32 bytes once the pool is up;
        // fall back to time and PID rather than refusing the pod.
        let seed = now_ns() as u128 ^ (u128::from(std::process::id()) << 64);
        b[..16].copy_from_slice(&seed.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sandboxes {
    /// Loads persisted sandboxes and reconciles them with what is running:
    /// a sandbox whose process died while the daemon was down is NotReady.
    pub fn recover(config: Arc<Config>, store: Store) -> Result<Sandboxes, SandboxError> {
        let mut entries = HashMap::new();
        // Read once, not once per sandbox.
        let running = process::OurProcesses::scan();
        for mut rec in store.load_all()? {
            if rec.state == SandboxState::NotReady {
                // The daemon died while this sandbox booted: nobody will
                // wait for it, so its process must not outlive the boot.
                // It is found by its saved reference or, if it was spawned
                // just before the crash, by its sandbox directory.
                let mut procs: Vec<ProcessRef> = rec.process.into_iter().collect();
                procs.extend(running.under(&rec.dir));
                for p in procs.iter().filter(|p| process::alive(p)) {
                    tracing::warn!(sandbox_id = %rec.id, pid = p.pid, "sandbox was still starting when vmcri stopped; ending its process");
                    process::kill(p);
                    process::wait_gone_blocking(p, std::time::Duration::from_secs(5));
                }
                if rec.process.take().is_some() {
                    rec.reason = Some("vmcri stopped while the sandbox was starting".into());
                    store.save(&rec)?;
                }
            }
            if rec.state == SandboxState::Ready && !rec.process.is_some_and(|p| process::alive(&p))
            {
                tracing::warn!(sandbox_id = %rec.id, "sandbox process exited while vmcri was down");
                rec.state = SandboxState::NotReady;
                rec.reason = Some(format!(
                    "the sandbox's {} exited while vmcri was not running",
                    what(&rec)
                ));
                rec.process = None;
                store.save(&rec)?;
            }
            entries.insert(
                rec.id.clone(),
                Arc::new(Entry {
                    op: tokio::sync::Mutex::new(()),
                    record: Mutex::new(rec),
                }),
            );
        }
        tracing::info!(sandboxes = entries.len(), "recovered sandbox state");
        let (events, _) = broadcast::channel(1024);
        Ok(Sandboxes {
            backends: Backends::new(config.clone()),
            config,
            store,
            entries: Mutex::new(entries),
            events,
        })
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.config
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
        check_namespaces(&req.namespaces, handler.backend)?;
        let id = new_id();
        let dir = self.store.sandbox_dir(&id);
        let socket_dir = self.config.root.join("run").join(&id[..16]);
        let rec = SandboxRecord {
            id: id.clone(),
            meta: req.meta.clone(),
            labels: req.labels,
            annotations: req.annotations,
            handler: handler_name,
            backend: handler.backend,
            created_at_ns: now_ns(),
            state: SandboxState::NotReady,
            reason: Some("starting".into()),
            process: None,
            agent_socket: Backends::agent_socket(handler.backend, &socket_dir),
            dir: dir.clone(),
            log_directory: req.log_directory,
            hostname: req.hostname,
            namespaces: req.namespaces,
        };
        let entry = Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(rec.clone()),
        });
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
        let etc = crate::pod_files::host_dir(&dir, rec.backend == crate::config::Backend::Microvm);
        let saved = self.store.save(&rec).and_then(|()| {
            crate::pod_files::write(&etc, &rec.hostname, req.dns.as_ref()).map_err(|source| {
                StoreError::Io {
                    path: etc.display().to_string(),
                    source,
                }
            })
        });
        if let Err(e) = saved {
            let _ = self.store.remove(&id);
            lock(&self.entries).remove(&id);
            return Err(e.into());
        }
        self.publish(EventKind::Created, &rec);
        tracing::info!(sandbox_id = %id, backend = %handler.backend, name = %req.meta.name, "starting pod sandbox");
        let spawned = |p: ProcessRef| {
            let mut r = lock(&entry.record);
            r.process = Some(p);
            let booting = r.clone();
            drop(r);
            self.store
                .save(&booting)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        match self.backends.start(&rec, &handler, spawned).await {
            Ok(p) => {
                let mut r = lock(&entry.record);
                r.process = Some(p);
                r.state = SandboxState::Ready;
                r.reason = None;
                let done = r.clone();
                drop(r);
                self.store.save(&done)?;
                self.publish(EventKind::Started, &done);
                Ok(id)
            }
            Err(e) => {
                // Nothing half-made stays behind: the caller retries with the
                // same metadata, so the record must go (start killed the
                // process if it had one).
                lock(&self.entries).remove(&id);
                let _ = self.store.remove(&id);
                let _ = crate::hostfs::remove::remove_tree(&socket_dir);
                tracing::error!(sandbox_id = %id, error = %e, "pod sandbox failed to start");
                Err(e.into())
            }
        }
    }

    fn handler_names(&self) -> String {
        self.config
            .handlers
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// StopPodSandbox: idempotent for a known sandbox.
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let id = self.resolve(id)?;
        let entry = self.entry(&id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if rec.state == SandboxState::NotReady && rec.process.is_none() {
            return Ok(());
        }
        {
            // Stopping: a status read meanwhile must not take the
            // process's end for a crash.
            let mut r = lock(&entry.record);
            r.state = SandboxState::NotReady;
            r.reason = Some("stopping".into());
        }
        self.backends.stop(&rec).await;
        let mut r = lock(&entry.record);
        r.state = SandboxState::NotReady;
        r.reason = Some("stopped".into());
        r.process = None;
        let done = r.clone();
        drop(r);
        self.store.save(&done)?;
        self.publish(EventKind::Stopped, &done);
        Ok(())
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
        self.store.remove(&id)?;
        if let Some(dir) = rec.agent_socket.parent() {
            let _ = crate::hostfs::remove::remove_tree(dir);
        }
        lock(&self.entries).remove(&id);
        self.publish(EventKind::Deleted, &rec);
        Ok(())
    }

    /// The sandbox's record, with its readiness re-checked.
    pub fn get(&self, id: &str) -> Result<SandboxRecord, SandboxError> {
        let id = self.resolve(id)?;
        let entry = self.entry(&id)?;
        let mut r = lock(&entry.record);
        self.refresh(&mut r);
        Ok(r.clone())
    }

    /// Marks a Ready sandbox whose process died NotReady.
    fn refresh(&self, r: &mut SandboxRecord) {
        if r.state == SandboxState::Ready && !r.process.is_some_and(|p| process::alive(&p)) {
            tracing::warn!(sandbox_id = %r.id, "sandbox process exited unexpectedly");
            r.state = SandboxState::NotReady;
            r.reason = Some(format!("the sandbox's {} exited unexpectedly", what(r)));
            r.process = None;
            if let Err(e) = self.store.save(r) {
                tracing::error!(sandbox_id = %r.id, error = %e, "persisting sandbox state");
            }
            self.publish(EventKind::Stopped, r);
        }
    }

    /// A connection to a Ready sandbox's agent.
    pub async fn agent(
        &self,
        rec: &SandboxRecord,
    ) -> Result<vmcri_agent_client::Agent, SandboxError> {
        Ok(self.backends.agent(rec).await?)
    }

    /// All sandboxes, readiness re-checked.
    pub fn list(&self) -> Vec<SandboxRecord> {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        entries
            .iter()
            .map(|e| {
                let mut r = lock(&e.record);
                self.refresh(&mut r);
                r.clone()
            })
            .collect()
    }
}

/// CRI's `NamespaceMode::NODE`: the host's namespace.
const NODE: i32 = k8s_cri::v1::NamespaceMode::Node as i32;

/// Refuses, before anything starts, the pod-level namespaces a backend
/// cannot give: a microVM pod has the VM's network, PIDs and IPC, never
/// the node's; the process backend can share the node's network (for
/// DaemonSets such as kube-proxy and CNI agents) but not its PIDs or IPC.
fn check_namespaces(ns: &NamespaceModes, backend: Backend) -> Result<(), SandboxError> {
    let refuse = |what: &str, why: &str| {
        Err(SandboxError::Invalid(format!(
            "RunPodSandbox: {what} is not available {why}"
        )))
    };
    match backend {
        Backend::Microvm if ns.host_network() => refuse(
            "host networking (hostNetwork)",
            "in a microVM pod, whose network is the VM's; run it with a process handler",
        ),
        _ if ns.pid == NODE => refuse("the host's PID namespace (hostPID)", "in vmcri"),
        _ if ns.ipc == NODE => refuse("the host's IPC namespace (hostIPC)", "in vmcri"),
        _ => Ok(()),
    }
}

fn what(rec: &SandboxRecord) -> &'static str {
    match rec.backend {
        crate::config::Backend::Microvm => "VMM",
        crate::config::Backend::Process => "agent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_namespaces_are_refused_where_the_backend_cannot_give_them() {
        let ns = |network, pid, ipc| NamespaceModes { network, pid, ipc };
        let refused = |n: NamespaceModes, b: Backend| {
            matches!(check_namespaces(&n, b), Err(SandboxError::Invalid(_)))
        };
        // hostNetwork: the process backend shares the node's network; a
        // microVM pod never can.
        assert!(refused(ns(NODE, 1, 0), Backend::Microvm));
        assert!(check_namespaces(&ns(NODE, 1, 0), Backend::Process).is_ok());
        // hostPID and hostIPC: nowhere.
        for b in [Backend::Microvm, Backend::Process] {
            assert!(refused(ns(0, NODE, 0), b));
            assert!(refused(ns(0, 0, NODE), b));
            // What kubelet sends for an ordinary pod.
            assert!(check_namespaces(&ns(0, 1, 0), b).is_ok());
        }
    }
}
