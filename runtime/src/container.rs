//! The container manager: CRI container semantics over the sandboxes'
//! agents. Records live beside their sandbox's
//! (`<sandbox dir>/containers/<id>.json`, replaced atomically); one
//! supervisor task per live container copies its output into the CRI log
//! and records its exit, and is started again after a daemon restart.

use crate::config::Backend;
use crate::images::Images;
use crate::logs::{LogFile, Stream};
use crate::sandbox::{new_id, now_ns, EventKind, SandboxError, Sandboxes};
use crate::shared::SharedDir;
use crate::spec::{self, PodContext, SpecError};
use crate::store::{SandboxRecord, SandboxState};
use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use vmcri_agent_client::{Agent, ClientError};
use vmcri_proto::agent::v1 as pb;

/// Exit code recorded when a container's end could not be observed.
const UNKNOWN_EXIT: i32 = 255;
/// Most output ExecSync returns per stream; the rest is cut (kubelet
/// itself caps probe output far lower).
const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// Bytes of output held for attached clients (one ring per container,
/// shared by its clients, filled only while one is attached).
const ATTACH_BACKLOG_BYTES: usize = 16 << 20;
/// The ring's length in chunks: each holds at most
/// [`vmcri_agent_client::MAX_OUTPUT_CHUNK`] bytes, so the ring holds at
/// most [`ATTACH_BACKLOG_BYTES`].
const ATTACH_CHUNKS: usize = ATTACH_BACKLOG_BYTES / vmcri_agent_client::MAX_OUTPUT_CHUNK;
/// How long Stop waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Started and not known to have ended.
    Running,
    /// Ended (or never able to start).
    Exited,
}

/// A CRI mount as recorded for ContainerStatus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Path in the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Read-only.
    pub readonly: bool,
    /// CRI propagation value.
    pub propagation: i32,
}

/// Everything the daemon knows about a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container ID.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// Metadata name.
    pub name: String,
    /// Metadata attempt.
    pub attempt: u32,
    /// The image as the user named it.
    pub image: String,
    /// The image ID (config digest).
    pub image_ref: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// State.
    pub state: ContainerState,
    /// Created, ns since the epoch.
    pub created_at_ns: i64,
    /// Started (0: never).
    pub started_at_ns: i64,
    /// Finished (0: not yet).
    pub finished_at_ns: i64,
    /// Exit code once exited.
    pub exit_code: i32,
    /// CRI reason (Completed, Error, OOMKilled, ...).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Absolute log path, or empty for no log.
    pub log_path: String,
    /// CRI mounts.
    pub mounts: Vec<MountRecord>,
    /// UID it runs as.
    pub uid: u32,
    /// GID it runs as.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Whether it has a stdin (attach writes to it).
    #[serde(default)]
    pub stdin: bool,
    /// Its stdin closes when the first attached client closes its own.
    #[serde(default)]
    pub stdin_once: bool,
    /// It runs on a terminal.
    #[serde(default)]
    pub tty: bool,
}

/// Errors of container operations; each maps to one gRPC status.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// Bad request (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// Not supported (Unimplemented).
    #[error("{0}")]
    Unsupported(String),
    /// Unknown container or image (NotFound).
    #[error("{0}")]
    NotFound(String),
    /// Same name and attempt in the sandbox (AlreadyExists).
    #[error("{0}")]
    Exists(String),
    /// Wrong state (FailedPrecondition).
    #[error("{0}")]
    State(String),
    /// ExecSync ran out of time (DeadlineExceeded).
    #[error("{0}")]
    Timeout(String),
    /// Sandbox errors.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The agent refused or failed; its status is kept.
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    /// Local I/O (Internal).
    #[error("{0}")]
    Io(String),
}

impl From<SpecError> for ContainerError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::Invalid(m) => ContainerError::Invalid(m),
            SpecError::Unsupported(m) => ContainerError::Unsupported(m),
        }
    }
}

/// A container lifecycle event.
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    /// What happened.
    pub kind: EventKind,
    /// The container after it happened.
    pub record: ContainerRecord,
    /// When.
    pub at_ns: i64,
}

/// What ExecSync returns.
#[derive(Debug, Clone, Default)]
pub struct ExecResult {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit code.
    pub exit_code: i32,
}

type ReopenRequest = oneshot::Sender<std::io::Result<()>>;

struct Entry {
    op: tokio::sync::Mutex<()>,
    record: Mutex<ContainerRecord>,
    /// True once the record says Exited.
    exited: watch::Sender<bool>,
    /// The supervisor's log-reopen channel while it runs.
    reopen: Mutex<Option<mpsc::Sender<ReopenRequest>>>,
    /// The container's output as the log copier reads it, for attached
    /// clients; a client that lags loses output, the log never does.
    output: broadcast::Sender<pb::OutputChunk>,
}

/// All containers.
pub struct Containers {
    sandboxes: Arc<Sandboxes>,
    images: Arc<Images>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    events: broadcast::Sender<ContainerEvent>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn record_path(sandbox_dir: &Path, id: &str) -> PathBuf {
    sandbox_dir.join("containers").join(format!("{id}.json"))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |e| ContainerError::Io(format!("{what}: {e}"))
}

fn save_record(sandbox_dir: &Path, rec: &ContainerRecord) -> Result<(), ContainerError> {
    let path = record_path(sandbox_dir, &rec.id);
    let dir = path.parent().unwrap_or(sandbox_dir);
    std::fs::create_dir_all(dir).map_err(io("container records"))?;
    let data = serde_json::to_vec_pretty(rec).map_err(|e| ContainerError::Io(e.to_string()))?;
    crate::store::write_atomically(&path, &data).map_err(io("container record"))
}

/// A log path relative to the pod's log directory, refusing escapes.
fn log_path(dir: &str, rel: &str) -> Result<String, ContainerError> {
    if rel.is_empty() || dir.is_empty() {
        return Ok(String::new());
    }
    let p = Path::new(rel);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ContainerError::Invalid(format!(
            "log_path {rel:?} must be relative to the pod's log directory, without '..'"
        )));
    }
    Ok(Path::new(dir).join(p).display().to_string())
}

/// Exposes an image's layers and a container's volumes in a microVM pod's
/// share; returns the layers' and the volumes' paths in the guest.
fn expose(
    sandbox: &SandboxRecord,
    id: &str,
    image: &crate::images::ImageRecord,
    layers: &[PathBuf],
    config: &cri::ContainerConfig,
) -> Result<(Vec<String>, Vec<String>), ContainerError> {
    let shared = SharedDir::new(&sandbox.dir);
    let result = (|| {
        let mut guest_layers = Vec::new();
        for (chain, path) in image.chain.iter().zip(layers) {
            let hex = chain.trim_start_matches("sha256:");
            guest_layers.push(shared.expose_layer(hex, path)?);
        }
        let mut sources = Vec::new();
        for (i, m) in config.mounts.iter().enumerate() {
            sources.push(shared.expose_volume(id, i, Path::new(&m.host_path), m.readonly)?);
        }
        Ok::<_, std::io::Error>((guest_layers, sources))
    })();
    result.map_err(|e| {
        let _ = shared.release_container(id);
        ContainerError::Io(format!("exposing the container's files to its VM: {e}"))
    })
}

/// AlreadyExists if sandbox `sandbox_id` has a container with `meta`'s
/// name and attempt.
fn taken(
    entries: &HashMap<String, Arc<Entry>>,
    sandbox_id: &str,
    meta: &cri::ContainerMetadata,
) -> Option<ContainerError> {
    entries.values().find_map(|e| {
        let r = lock(&e.record);
        (r.sandbox_id == sandbox_id && r.name == meta.name && r.attempt == meta.attempt).then(
            || {
                ContainerError::Exists(format!(
                "a container named {} (attempt {}) already exists in pod sandbox {sandbox_id}: {}",
                meta.name, meta.attempt, r.id
            ))
            },
        )
    })
}

pub(crate) fn pref(id: &str, exec_id: &str) -> pb::ProcessRef {
    pb::ProcessRef {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
    }
}

impl Containers {
    /// Loads the containers of every known sandbox and resumes supervising
    /// the live ones; containers of sandboxes that are gone are Exited.
    pub fn recover(sandboxes: Arc<Sandboxes>, images: Arc<Images>) -> Arc<Containers> {
        let (events, _) = broadcast::channel(1024);
        let this = Arc::new(Containers {
            sandboxes,
            images,
            entries: Mutex::new(HashMap::new()),
            events,
        });
        let mut live = Vec::new();
        for sandbox in this.sandboxes.list() {
            let dir = sandbox.dir.join("containers");
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let rec: ContainerRecord = match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "skipping unreadable container record");
                        continue;
                    }
                };
                let entry = this.insert(rec.clone());
                if rec.state != ContainerState::Exited {
                    if sandbox.state == SandboxState::Ready {
                        live.push(entry);
                    } else {
                        this.mark_exited(
                            &entry,
                            UNKNOWN_EXIT,
                            "SandboxExited",
                            "the pod sandbox stopped while vmcri was not running",
                            now_ns(),
                        );
                    }
                }
            }
        }
        tracing::info!(
            containers = lock(&this.entries).len(),
            "recovered container state"
        );
        for entry in live {
            this.clone().supervise(entry);
        }
        this
    }

    fn insert(&self, rec: ContainerRecord) -> Arc<Entry> {
        let (exited, _) = watch::channel(rec.state == ContainerState::Exited);
        let entry = Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(rec.clone()),
            exited,
            reopen: Mutex::new(None),
            output: broadcast::channel(ATTACH_CHUNKS).0,
        });
        lock(&self.entries).insert(rec.id, entry.clone());
        entry
    }

    /// Subscribes to container events.
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.events.subscribe()
    }

    fn publish(&self, kind: EventKind, record: &ContainerRecord) {
        let _ = self.events.send(ContainerEvent {
            kind,
            record: record.clone(),
            at_ns: now_ns(),
        });
    }

    fn save(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        let sandbox = self.sandboxes.get(&rec.sandbox_id)?;
        save_record(&sandbox.dir, rec)
    }

    /// Resolves a full ID or unique prefix.
    pub fn resolve(&self, id: &str) -> Result<String, ContainerError> {
        if id.is_empty() {
            return Err(ContainerError::Invalid("container ID is empty".into()));
        }
        let entries = lock(&self.entries);
        if entries.contains_key(id) {
            return Ok(id.to_string());
        }
        let mut m = entries.keys().filter(|k| k.starts_with(id));
        match (m.next(), m.next()) {
            (Some(one), None) => Ok(one.clone()),
            (Some(_), Some(_)) => Err(ContainerError::Invalid(format!(
                "container ID prefix {id} is ambiguous"
            ))),
            _ => Err(ContainerError::NotFound(format!(
                "container {id} not found"
            ))),
        }
    }

    fn entry(&self, id: &str) -> Result<(String, Arc<Entry>), ContainerError> {
        let id = self.resolve(id)?;
        let e = lock(&self.entries)
            .get(&id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id} not found")))?;
        Ok((id, e))
    }

    /// The record of container `id`.
    pub fn get(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        Ok(lock(&self.entry(id)?.1.record).clone())
    }

    /// All records.
    pub fn list(&self) -> Vec<ContainerRecord> {
        lock(&self.entries)
            .values()
            .map(|e| lock(&e.record).clone())
            .collect()
    }

    /// True if a container uses image `image_id`.
    pub fn uses_image(&self, image_id: &str) -> Option<String> {
        lock(&self.entries)
            .values()
            .map(|e| lock(&e.record).clone())
            .find(|r| r.image_ref == image_id)
            .map(|r| r.id)
    }

    async fn ready_sandbox(&self, id: &str) -> Result<(SandboxRecord, Agent), ContainerError> {
        let sandbox = self.sandboxes.get(id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(ContainerError::State(format!(
                "pod sandbox {id} is not ready{}",
                sandbox
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )));
        }
        let agent = self.sandboxes.agent(&sandbox).await?;
        Ok((sandbox, agent))
    }

    /// The agent of running container `id` (resolved), with its record.
    pub async fn running(&self, id: &str) -> Result<(ContainerRecord, Agent), ContainerError> {
        let (id, entry) = self.entry(id)?;
        let rec = lock(&entry.record).clone();
        if rec.state != ContainerState::Running {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        let (_, agent) = self.ready_sandbox(&rec.sandbox_id).await?;
        Ok((rec, agent))
    }

    /// Attaches to running container `id`'s output: its chunks from now
    /// on, and a receiver that turns true once it has exited.
    pub async fn attach(
        &self,
        id: &str,
    ) -> Result<
        (
            ContainerRecord,
            Agent,
            broadcast::Receiver<pb::OutputChunk>,
            watch::Receiver<bool>,
        ),
        ContainerError,
    > {
        let (rec, agent) = self.running(id).await?;
        let (_, entry) = self.entry(&rec.id)?;
        let output = entry.output.subscribe();
        Ok((rec, agent, output, entry.exited.subscribe()))
    }

    /// The ready sandbox `id` and its agent.
    pub async fn sandbox_agent(&self, id: &str) -> Result<(SandboxRecord, Agent), ContainerError> {
        let id = self.sandboxes.resolve(id)?;
        self.ready_sandbox(&id).await
    }

    /// CreateContainer.
    pub async fn create(
        self: &Arc<Self>,
        sandbox_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, ContainerError> {
        let meta = config.metadata.clone().ok_or_else(|| {
            ContainerError::Invalid("CreateContainer: config.metadata is required".into())
        })?;
        if meta.name.is_empty() {
            return Err(ContainerError::Invalid(
                "CreateContainer: metadata.name is required".into(),
            ));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(ContainerError::Invalid(
                "CreateContainer: image is required".into(),
            ));
        }
        let sandbox_id = self.sandboxes.resolve(sandbox_id)?;
        let (sandbox, agent) = self.ready_sandbox(&sandbox_id).await?;
        let log = log_path(&sandbox.log_directory, &config.log_path)?;
        let image = self.images.find(&image_name).ok_or_else(|| {
            ContainerError::NotFound(format!("image {image_name:?} not found: pull it first"))
        })?;
        let layers = self.images.layer_paths(&image);
        let image_config = self
            .images
            .config(&image)
            .map_err(|e| ContainerError::Io(format!("image {image_name}: {e}")))?;
        let id = new_id();
        if let Some(e) = taken(&lock(&self.entries), &sandbox_id, &meta) {
            return Err(e);
        }
        let microvm = sandbox.backend == Backend::Microvm;
        let etc = crate::pod_files::host_dir(&sandbox.dir, microvm);
        let pod = PodContext {
            sandbox_id: sandbox_id.clone(),
            etc_files: crate::pod_files::FILES
                .iter()
                .filter(|(name, _)| etc.join(name).is_file())
                .map(|(name, dest)| {
                    let source = if microvm {
                        format!("{}/etc/{name}", crate::shared::GUEST_SHARED)
                    } else {
                        etc.join(name).display().to_string()
                    };
                    (dest.to_string(), source)
                })
                .collect(),
            in_vm: microvm,
            host_network: sandbox.namespaces.host_network(),
            // In a VM the agent is root with every capability.
            min_oom_score_adj: if microvm {
                None
            } else {
                crate::backend::oom_score_adj_floor(
                    self.sandboxes.config().process.restrict_oom_score_adj,
                )
            },
        };
        // Validate before anything is exposed to the guest.
        let mut built = spec::build(&id, &config, &image_config, &layers, &pod)?;
        let mut agent_layers: Vec<String> =
            layers.iter().map(|p| p.display().to_string()).collect();
        if microvm {
            // Mount syscalls block (a volume on a hung NFS server): keep
            // them off the async workers.
            let (guest_layers, sources) = {
                let (sandbox, id, image, layers, config) = (
                    sandbox.clone(),
                    id.clone(),
                    image.clone(),
                    layers.clone(),
                    config.clone(),
                );
                tokio::task::spawn_blocking(move || expose(&sandbox, &id, &image, &layers, &config))
                    .await
                    .map_err(|e| {
                        ContainerError::Io(format!("exposing the container's files: {e}"))
                    })??
            };
            agent_layers = guest_layers;
            built.set_mount_sources(&sources)?;
        }
        let oci_spec_json = built.to_json()?;
        let rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox_id.clone(),
            name: meta.name.clone(),
            attempt: meta.attempt,
            image: image_name,
            image_ref: image.id.clone(),
            labels: config.labels.clone().into_iter().collect(),
            annotations: config.annotations.clone().into_iter().collect(),
            state: ContainerState::Created,
            created_at_ns: now_ns(),
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: log,
            mounts: config
                .mounts
                .iter()
                .map(|m| MountRecord {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.clone(),
                    readonly: m.readonly,
                    propagation: m.propagation,
                })
                .collect(),
            uid: built.user.uid,
            gid: built.user.gid,
            additional_gids: built.user.additional_gids.clone(),
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
        };
        // Hold the name while the agent works, so a concurrent create with
        // the same metadata fails instead of racing.
        let entry = {
            let mut entries = lock(&self.entries);
            if let Some(e) = taken(&entries, &sandbox_id, &meta) {
                drop(entries);
                if microvm {
                    let _ = SharedDir::new(&sandbox.dir).release_container(&id);
                }
                return Err(e);
            }
            let (exited, _) = watch::channel(false);
            let entry = Arc::new(Entry {
                op: tokio::sync::Mutex::new(()),
                record: Mutex::new(rec.clone()),
                exited,
                reopen: Mutex::new(None),
                output: broadcast::channel(ATTACH_CHUNKS).0,
            });
            entries.insert(id.clone(), entry.clone());
            entry
        };
        let _op = entry.op.lock().await;
        let req = pb::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec_json,
            rootfs_layers: agent_layers,
            mounts: Vec::new(),
            tty: config.tty,
            stdin: config.stdin,
        };
        let made = async {
            agent.create_container(req).await?;
            save_record(&sandbox.dir, &rec)
        }
        .await;
        if let Err(e) = made {
            lock(&self.entries).remove(&id);
            let _ = agent.remove_container(&id, Duration::ZERO).await;
            let _ = SharedDir::new(&sandbox.dir).release_container(&id);
            tracing::error!(sandbox_id = %sandbox_id, container_id = %id, error = %e, "container create failed");
            return Err(e);
        }
        tracing::info!(sandbox_id = %sandbox_id, container_id = %id, name = %meta.name, "container created");
        self.publish(EventKind::Created, &rec);
        self.clone().supervise(entry.clone());
        Ok(id)
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let (id, entry) = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if rec.state != ContainerState::Created {
            return Err(ContainerError::State(format!(
                "container {id} is {:?}, not Created: it can start only once",
                rec.state
            )));
        }
        let (_, agent) = self.ready_sandbox(&rec.sandbox_id).await?;
        if let Err(e) = agent.start_container(&id).await {
            self.mark_exited(&entry, UNKNOWN_EXIT, "StartError", &e.to_string(), now_ns());
            return Err(e.into());
        }
        let done = {
            let mut r = lock(&entry.record);
            // The supervisor may already have seen a fast exit.
            if r.state == ContainerState::Created {
                r.state = ContainerState::Running;
            }
            r.started_at_ns = now_ns();
            r.clone()
        };
        self.save(&done)?;
        tracing::info!(container_id = %id, "container started");
        self.publish(EventKind::Started, &done);
        Ok(())
    }

    /// Records an exit once; later calls keep the first.
    fn mark_exited(&self, entry: &Entry, code: i32, reason: &str, message: &str, at_ns: i64) {
        let done = {
            let mut r = lock(&entry.record);
            if r.state == ContainerState::Exited {
                return;
            }
            r.state = ContainerState::Exited;
            r.exit_code = code;
            r.reason = reason.to_string();
            r.message = message.to_string();
            r.finished_at_ns = at_ns;
            r.clone()
        };
        if let Err(e) = self.save(&done) {
            tracing::error!(container_id = %done.id, error = %e, "persisting container exit");
        }
        entry.exited.send_replace(true);
        tracing::info!(container_id = %done.id, exit_code = code, reason, "container exited");
        self.publish(EventKind::Stopped, &done);
    }

    /// Copies the container's output into its log and records its exit.
    fn supervise(self: Arc<Self>, entry: Arc<Entry>) {
        tokio::spawn(async move {
            let rec = lock(&entry.record).clone();
            let id = rec.id.clone();
            let agent = match self.sandboxes.get(&rec.sandbox_id) {
                Ok(s) => self.sandboxes.agent(&s).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let agent = match agent {
                Ok(a) => a,
                Err(e) => {
                    self.mark_exited(&entry, UNKNOWN_EXIT, "SandboxUnreachable", &e, now_ns());
                    return;
                }
            };
            let (reopen_tx, reopen_rx) = mpsc::channel(4);
            *lock(&entry.reopen) = Some(reopen_tx);
            let sandbox_dir = self
                .sandboxes
                .get(&rec.sandbox_id)
                .map(|s| s.dir)
                .unwrap_or_default();
            let copier = tokio::spawn(copy_output(
                agent.clone(),
                rec.clone(),
                sandbox_dir,
                reopen_rx,
                entry.output.clone(),
            ));
            match agent.wait(pref(&id, "")).await {
                Ok(w) => {
                    use pb::wait_process_response::Reason;
                    let reason = match Reason::try_from(w.reason) {
                        Ok(Reason::OomKilled) => "OOMKilled",
                        _ if w.exit_code == 0 => "Completed",
                        _ => "Error",
                    };
                    // The log holds everything before the exit is reported.
                    let _ = tokio::time::timeout(Duration::from_secs(5), copier).await;
                    self.mark_exited(&entry, w.exit_code, reason, "", w.finished_at_ns);
                }
                Err(e) => {
                    copier.abort();
                    self.mark_exited(
                        &entry,
                        UNKNOWN_EXIT,
                        "Unknown",
                        &format!("lost the container's sandbox: {e}"),
                        now_ns(),
                    );
                }
            }
            *lock(&entry.reopen) = None;
        });
    }

    /// StopContainer: SIGTERM, SIGKILL after `timeout`; idempotent.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let (id, entry) = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if rec.state == ContainerState::Exited {
            return Ok(());
        }
        let sandbox = self.sandboxes.get(&rec.sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            self.mark_exited(
                &entry,
                UNKNOWN_EXIT,
                "SandboxExited",
                "the pod sandbox is not running",
                now_ns(),
            );
            return Ok(());
        }
        let agent = self.sandboxes.agent(&sandbox).await?;
        let mut exited = entry.exited.subscribe();
        if rec.state == ContainerState::Running && !timeout.is_zero() {
            agent.signal(pref(&id, ""), libc::SIGTERM as u32).await?;
            let _ = tokio::time::timeout(timeout, exited.wait_for(|e| *e)).await;
        }
        if !*exited.borrow() {
            agent.signal(pref(&id, ""), libc::SIGKILL as u32).await?;
            if tokio::time::timeout(KILL_WAIT, exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                return Err(ContainerError::Io(format!(
                    "container {id} did not exit within {KILL_WAIT:?} of SIGKILL"
                )));
            }
        }
        Ok(())
    }

    /// RemoveContainer: kills it if needed and deletes it everywhere;
    /// unknown IDs succeed.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let (id, entry) = match self.entry(id) {
            Ok(x) => x,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop(&id, Duration::ZERO).await?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if let Ok(sandbox) = self.sandboxes.get(&rec.sandbox_id) {
            if sandbox.state == SandboxState::Ready {
                let agent = self.sandboxes.agent(&sandbox).await?;
                agent.remove_container(&id, Duration::ZERO).await?;
            }
            let _ = std::fs::remove_file(LogPosition::path(&sandbox.dir, &id));
            SharedDir::new(&sandbox.dir)
                .release_container(&id)
                .map_err(io("unexposing the container's volumes"))?;
            match std::fs::remove_file(record_path(&sandbox.dir, &id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing container record")(e)),
            }
        }
        lock(&self.entries).remove(&id);
        tracing::info!(container_id = %id, "container removed");
        self.publish(EventKind::Deleted, &rec);
        Ok(())
    }

    /// Kills every live container of a sandbox before the sandbox stops.
    pub async fn stop_all(&self, sandbox_id: &str) {
        for rec in self.list() {
            if rec.sandbox_id == sandbox_id && rec.state != ContainerState::Exited {
                if let Err(e) = self.stop(&rec.id, Duration::ZERO).await {
                    tracing::warn!(container_id = %rec.id, error = %e, "stopping container with its sandbox");
                }
            }
        }
    }

    /// Marks the containers of a stopped sandbox exited.
    pub fn sandbox_stopped(&self, sandbox_id: &str) {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        for e in entries {
            let r = lock(&e.record).clone();
            if r.sandbox_id == sandbox_id && r.state != ContainerState::Exited {
                self.mark_exited(
                    &e,
                    UNKNOWN_EXIT,
                    "SandboxExited",
                    "the pod sandbox stopped",
                    now_ns(),
                );
            }
        }
    }

    /// Forgets the containers of a removed sandbox (their records go with
    /// its directory).
    pub fn sandbox_removed(&self, sandbox_id: &str) {
        let gone: Vec<ContainerRecord> = {
            let mut entries = lock(&self.entries);
            let ids: Vec<String> = entries
                .iter()
                .filter(|(_, e)| lock(&e.record).sandbox_id == sandbox_id)
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter()
                .filter_map(|id| entries.remove(id))
                .map(|e| lock(&e.record).clone())
                .collect()
        };
        for rec in gone {
            self.publish(EventKind::Deleted, &rec);
        }
    }

    /// ExecSync: runs `cmd` in the container and collects its output;
    /// `timeout` zero means none.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecResult, ContainerError> {
        check_program("ExecSync", &cmd)?;
        let (rec, agent) = self.running(id).await?;
        let id = rec.id;
        let exec_id = new_id()[..16].to_string();
        agent
            .exec_process(pb::ExecProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                args: cmd,
                env: Vec::new(),
                cwd: String::new(),
                tty: false,
                stdin: false,
            })
            .await?;
        let process = pref(&id, &exec_id);
        let run = async {
            let mut output = agent.read_output(process.clone(), 0).await?;
            let mut out = ExecResult::default();
            while let Some(chunk) = output.next().await {
                let Ok(chunk) = chunk else { break };
                let buf = if chunk.stream == pb::output_chunk::Stream::Stderr as i32 {
                    &mut out.stderr
                } else {
                    &mut out.stdout
                };
                let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
            }
            let w = agent.wait(process.clone()).await?;
            out.exit_code = w.exit_code;
            Ok::<_, ContainerError>(out)
        };
        if timeout.is_zero() {
            return run.await;
        }
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                let _ = agent.signal(process.clone(), libc::SIGKILL as u32).await;
                // Collect it so the agent forgets it.
                let _ = tokio::time::timeout(KILL_WAIT, agent.wait(process)).await;
                Err(ContainerError::Timeout(format!(
                    "ExecSync in container {id} timed out after {}s",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// ReopenContainerLog: the log file is closed and opened again at its
    /// path (kubelet has renamed the old one).
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let (id, entry) = self.entry(id)?;
        if lock(&entry.record).state != ContainerState::Running {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        let tx = lock(&entry.reopen)
            .clone()
            .ok_or_else(|| ContainerError::State(format!("container {id} has no log writer")))?;
        let (done_tx, done_rx) = oneshot::channel();
        tx.send(done_tx)
            .await
            .map_err(|_| ContainerError::State(format!("container {id} is no longer logging")))?;
        done_rx
            .await
            .map_err(|_| ContainerError::State(format!("container {id} is no longer logging")))?
            .map_err(io("reopening the log"))
    }

    /// UpdateContainerResources: new CPU and memory limits for a running
    /// (or created) container.
    pub async fn update_resources(
        &self,
        id: &str,
        r: &cri::LinuxContainerResources,
    ) -> Result<(), ContainerError> {
        let (id, entry) = self.entry(id)?;
        let rec = lock(&entry.record).clone();
        if rec.state == ContainerState::Exited {
            return Err(ContainerError::State(format!("container {id} has exited")));
        }
        if r.cpu_quota < -1 || r.cpu_period < 0 || r.cpu_shares < 0 || r.memory_limit_in_bytes < 0 {
            return Err(ContainerError::Invalid("negative resource limit".into()));
        }
        if !r.hugepage_limits.is_empty() {
            return Err(ContainerError::Unsupported(
                "hugepage limits are not supported yet".into(),
            ));
        }
        let (_, agent) = self.ready_sandbox(&rec.sandbox_id).await?;
        let resources = pb::Resources {
            cpu_quota: r.cpu_quota,
            cpu_period: r.cpu_period as u64,
            cpu_shares: r.cpu_shares as u64,
            cpuset_cpus: r.cpuset_cpus.clone(),
            cpuset_mems: r.cpuset_mems.clone(),
            memory_limit_bytes: r.memory_limit_in_bytes,
            pids_limit: 0,
            unified: r.unified.clone(),
        };
        agent.update_resources(&id, resources).await?;
        tracing::info!(container_id = %id, "container resources updated");
        Ok(())
    }

    /// Cgroup statistics of a ready sandbox's containers together, and of
    /// each. The agent's reply is the guest's word: IDs it names that are
    /// not this pod's (another pod's, made-up ones) are dropped.
    pub async fn sandbox_stats(
        &self,
        sandbox_id: &str,
    ) -> Result<(pb::CgroupStats, HashMap<String, pb::CgroupStats>), ContainerError> {
        let own: Vec<String> = lock(&self.entries)
            .values()
            .filter_map(|e| {
                let r = lock(&e.record);
                (r.sandbox_id == sandbox_id).then(|| r.id.clone())
            })
            .collect();
        self.within_stats_deadline(sandbox_id, async {
            let (_, agent) = self.ready_sandbox(sandbox_id).await?;
            let total = agent.sandbox_stats().await?;
            let each = agent.container_stats(own.clone()).await?;
            Ok((total, only(each, &own)))
        })
        .await
    }

    /// Cgroup statistics of containers `ids` of a ready sandbox; the
    /// reply keeps only those IDs (see [`Containers::sandbox_stats`]).
    pub async fn stats(
        &self,
        sandbox_id: &str,
        ids: Vec<String>,
    ) -> Result<HashMap<String, pb::CgroupStats>, ContainerError> {
        self.within_stats_deadline(sandbox_id, async {
            let (_, agent) = self.ready_sandbox(sandbox_id).await?;
            let stats = agent.container_stats(ids.clone()).await?;
            Ok(only(stats, &ids))
        })
        .await
    }

    /// Runs a stats query under `[agent] stats_timeout_secs`.
    async fn within_stats_deadline<T>(
        &self,
        sandbox_id: &str,
        f: impl std::future::Future<Output = Result<T, ContainerError>>,
    ) -> Result<T, ContainerError> {
        let after = Duration::from_secs(self.sandboxes.config().agent.stats_timeout_secs);
        tokio::time::timeout(after, f).await.unwrap_or_else(|_| {
            Err(ContainerError::Timeout(format!(
                "pod sandbox {sandbox_id} gave no stats within {after:?}"
            )))
        })
    }
}

/// Refuses an exec command without a program name: kubelet has been
/// seen to send `[""]`.
pub fn check_program(call: &str, cmd: &[String]) -> Result<(), ContainerError> {
    if cmd.first().is_none_or(String::is_empty) {
        return Err(ContainerError::Invalid(format!(
            "{call}: cmd is empty (it needs a program name)"
        )));
    }
    Ok(())
}

/// Keeps the stats of `ids` only: an agent's reply is the guest's word,
/// and stats it gives for other pods' containers (or made-up ones) must
/// not reach, or overwrite, anyone's figures.
fn only(
    mut stats: HashMap<String, pb::CgroupStats>,
    ids: &[String],
) -> HashMap<String, pb::CgroupStats> {
    stats.retain(|id, _| ids.contains(id));
    stats
}

/// Where a container's log copy stands, saved after every write so a
/// restarted daemon resumes exactly there: the output offset written, and
/// the log file's length and inode after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LogPosition {
    offset: u64,
    len: u64,
    inode: u64,
}

/// Fixed-size records, rewritten in place with one write.
const POSITION_RECORD: usize = 64;

impl LogPosition {
    fn path(sandbox_dir: &Path, id: &str) -> PathBuf {
        sandbox_dir.join("containers").join(format!("{id}.logpos"))
    }

    fn load(path: &Path) -> LogPosition {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v[..] {
            [offset, len, inode] => LogPosition { offset, len, inode },
            _ => LogPosition::default(),
        }
    }

    fn encode(&self) -> [u8; POSITION_RECORD] {
        let mut rec = [b' '; POSITION_RECORD];
        let text = format!("{} {} {}", self.offset, self.len, self.inode);
        rec[..text.len()].copy_from_slice(text.as_bytes());
        rec[POSITION_RECORD - 1] = b'\n';
        rec
    }
}

/// Streams the container's output from the agent into its log file until
/// the output ends, serving reopen requests between chunks. After a
/// restart it resumes at the saved position: output written after the
/// last save is cut from the log and written again, so nothing is lost
/// or doubled.
async fn copy_output(
    agent: Agent,
    rec: ContainerRecord,
    sandbox_dir: PathBuf,
    mut reopen: mpsc::Receiver<ReopenRequest>,
    attached: broadcast::Sender<pb::OutputChunk>,
) {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let id = rec.id.clone();
    let pos_path = LogPosition::path(&sandbox_dir, &id);
    let mut pos = LogPosition::load(&pos_path);
    let log_file = Path::new(&rec.log_path);
    if !rec.log_path.is_empty() {
        if let Ok(m) = std::fs::metadata(log_file) {
            // Same file as at the last save: drop what came after it.
            if m.ino() == pos.inode && m.len() > pos.len {
                if let Err(e) = std::fs::File::options()
                    .write(true)
                    .open(log_file)
                    .and_then(|f| f.set_len(pos.len))
                {
                    tracing::warn!(container_id = %id, error = %e, "trimming the log to its saved position");
                }
            }
        }
    }
    let mut output = match agent.read_output(pref(&id, ""), pos.offset).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(container_id = %id, error = %e, "cannot read container output");
            return;
        }
    };
    let mut log = if rec.log_path.is_empty() {
        None
    } else {
        match LogFile::open(log_file) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(container_id = %id, path = %rec.log_path, error = %e, "cannot open container log");
                None
            }
        }
    };
    let pos_file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&pos_path);
    loop {
        tokio::select! {
            chunk = output.next() => {
                let Some(Ok(mut chunk)) = chunk else { return };
                // A resumed stream may start before what we hold.
                if chunk.offset < pos.offset {
                    let skip = (pos.offset - chunk.offset).min(chunk.data.len() as u64) as usize;
                    chunk.data.drain(..skip);
                    chunk.offset += skip as u64;
                }
                if chunk.data.is_empty() {
                    continue;
                }
                if chunk.offset > pos.offset {
                    tracing::warn!(container_id = %id, lost = chunk.offset - pos.offset, "container output older than the agent's window was lost");
                }
                let stream = if chunk.stream == pb::output_chunk::Stream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                // The offset is the guest's word: one that would overflow
                // is a lie, and the rest of the stream is not trusted.
                let Some(end) = chunk.offset.checked_add(chunk.data.len() as u64) else {
                    tracing::warn!(container_id = %id, "agent sent an impossible output offset; stopped copying");
                    return;
                };
                pos.offset = end;
                if attached.receiver_count() > 0 {
                    let _ = attached.send(chunk.clone());
                }
                if let Some(l) = log.as_mut() {
                    if let Err(e) = l.write(stream, chunk.timestamp_ns, &chunk.data) {
                        tracing::error!(container_id = %id, error = %e, "writing container log");
                    }
                    if let Ok((len, inode)) = l.position() {
                        pos.len = len;
                        pos.inode = inode;
                    }
                }
                if let Ok(f) = &pos_file {
                    if let Err(e) = f.write_all_at(&pos.encode(), 0) {
                        tracing::warn!(container_id = %id, error = %e, "saving the log position");
                    }
                }
            }
            Some(done) = reopen.recv() => {
                let r = match log.as_mut() {
                    Some(l) => l.reopen(),
                    None => Ok(()),
                };
                let _ = done.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_reply_keeps_only_the_pods_own_containers() {
        let cpu = |n| pb::CgroupStats {
            cpu_usage_ns: n,
            ..Default::default()
        };
        let reply: HashMap<String, pb::CgroupStats> = [
            ("mine".to_string(), cpu(1)),
            ("other-pods".to_string(), cpu(999)),
            ("made-up".to_string(), cpu(7)),
        ]
        .into();
        let kept = only(reply, &["mine".to_string(), "absent".to_string()]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept["mine"].cpu_usage_ns, 1);
    }

    #[test]
    fn log_paths_stay_in_the_pod_log_directory() {
        assert_eq!(
            log_path("/var/log/pods/x", "c/0.log").unwrap(),
            "/var/log/pods/x/c/0.log"
        );
        assert_eq!(log_path("", "c/0.log").unwrap(), "");
        assert_eq!(log_path("/d", "").unwrap(), "");
        for bad in ["../x.log", "/etc/passwd", "c/../../x"] {
            assert!(log_path("/d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn log_positions_round_trip_in_fixed_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.logpos");
        let p = LogPosition {
            offset: 123_456,
            len: 789,
            inode: 42,
        };
        std::fs::write(&path, p.encode()).unwrap();
        assert_eq!(LogPosition::load(&path), p);
        // A shorter record over a longer one leaves no stale digits.
        let q = LogPosition {
            offset: 1,
            len: 2,
            inode: 3,
        };
        std::fs::write(&path, q.encode()).unwrap();
        assert_eq!(LogPosition::load(&path), q);
        assert_eq!(
            LogPosition::load(&dir.path().join("missing")),
            LogPosition::default()
        );
    }
}
