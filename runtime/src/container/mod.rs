//! The container service: CRI container semantics (names, states,
//! idempotent stop and remove, recovery) over the sandboxes' agents, and
//! the pod-level sequences that span a sandbox's containers.

mod exec;
pub mod log;
pub mod spec;
mod stats;
mod supervisor;

pub use exec::{check_program, ExecResult};

use crate::id::{new_id, now_ns};
use crate::images::Images;
use crate::lock::lock;
use crate::sandbox::{EventKind, Sandbox, SandboxError, Sandboxes};
use crate::store::{ContainerRecord, ContainerState, MountRecord, SandboxState, Store, StoreError};
use k8s_cri::v1 as cri;
use spec::{PodContext, SpecError};
use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use vmcri_agent_client::{Agent, ClientError};
use vmcri_proto::agent::v1 as pb;

/// Exit code recorded when a container's end could not be observed.
const UNKNOWN_EXIT: i32 = 255;
/// Bytes of output held for attached clients (one ring per container,
/// shared by its clients, filled only while one is attached).
const ATTACH_BACKLOG_BYTES: usize = 16 << 20;
/// The ring's length in chunks: each holds at most
/// [`vmcri_agent_client::MAX_OUTPUT_CHUNK`] bytes, so the ring holds at
/// most [`ATTACH_BACKLOG_BYTES`].
const ATTACH_CHUNKS: usize = ATTACH_BACKLOG_BYTES / vmcri_agent_client::MAX_OUTPUT_CHUNK;
/// How long Stop waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

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
    /// Persisting state failed (Internal).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image service failed.
    #[error(transparent)]
    Image(Box<crate::images::ImageError>),
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

impl From<crate::backend::BackendError> for ContainerError {
    fn from(e: crate::backend::BackendError) -> Self {
        ContainerError::Sandbox(e.into())
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

/// A log reopen asked of the supervisor, answered when done.
pub(crate) type ReopenRequest = oneshot::Sender<std::io::Result<()>>;

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

impl Entry {
    fn new(rec: ContainerRecord) -> Arc<Entry> {
        let (exited, _) = watch::channel(rec.state == ContainerState::Exited);
        Arc::new(Entry {
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(rec),
            exited,
            reopen: Mutex::new(None),
            output: broadcast::channel(ATTACH_CHUNKS).0,
        })
    }
}

/// All containers.
pub struct Containers {
    sandboxes: Arc<Sandboxes>,
    images: Arc<Images>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    events: broadcast::Sender<ContainerEvent>,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |e| ContainerError::Io(format!("{what}: {e}"))
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

/// The agent's name for process `exec_id` of container `id` (its init
/// when `exec_id` is empty).
pub(crate) fn pref(id: &str, exec_id: &str) -> pb::ProcessRef {
    pb::ProcessRef {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
    }
}

impl Containers {
    /// The containers of `records` (what the store held): the live ones of
    /// ready sandboxes are supervised again, the others are Exited.
    pub fn recover(
        sandboxes: Arc<Sandboxes>,
        images: Arc<Images>,
        records: Vec<ContainerRecord>,
    ) -> Arc<Containers> {
        let (events, _) = broadcast::channel(1024);
        let this = Arc::new(Containers {
            sandboxes,
            images,
            entries: Mutex::new(HashMap::new()),
            events,
        });
        let mut live = Vec::new();
        for rec in records {
            let sandbox_ready = this
                .sandboxes
                .get(&rec.sandbox_id)
                .is_ok_and(|s| s.state == SandboxState::Ready);
            let entry = this.insert(rec.clone());
            if rec.state != ContainerState::Exited {
                if sandbox_ready {
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
        let entry = Entry::new(rec.clone());
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

    fn store(&self) -> &Store {
        self.sandboxes.store()
    }

    fn save(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        Ok(self.store().save_container(rec)?)
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

    /// RemoveImage: refused while a container uses the image, unless only
    /// one of its several tags goes (the image stays).
    pub async fn remove_image(&self, name: &str) -> Result<(), ContainerError> {
        if let Some(rec) = self.images.find(name) {
            let only_a_tag = rec.repo_tags.len() > 1
                && vmcri_image::reference::Reference::parse(name)
                    .is_ok_and(|r| rec.repo_tags.contains(&r.to_string()));
            if !only_a_tag {
                if let Some(c) = self.uses_image(&rec.id) {
                    return Err(ContainerError::State(format!(
                        "image {name} is in use by container {c}; remove the container first"
                    )));
                }
            }
        }
        self.images
            .remove(name)
            .await
            .map_err(|e| ContainerError::Image(Box::new(e)))
    }

    /// True if a container uses image `image_id`.
    pub fn uses_image(&self, image_id: &str) -> Option<String> {
        lock(&self.entries)
            .values()
            .map(|e| lock(&e.record).clone())
            .find(|r| r.image_ref == image_id)
            .map(|r| r.id)
    }

    /// Ready sandbox `id` (resolved) and its agent.
    async fn ready_sandbox(&self, id: &str) -> Result<(Sandbox, Agent), ContainerError> {
        let sandbox = self.sandboxes.sandbox(id)?.ready()?;
        let agent = sandbox.agent().await?;
        Ok((sandbox, agent))
    }

    /// The agent of running container `id` (resolved), with its record.
    pub async fn running(&self, id: &str) -> Result<(ContainerRecord, Agent), ContainerError> {
        let rec = self.running_record(id)?;
        let (_, agent) = self.ready_sandbox(&rec.sandbox_id).await?;
        Ok((rec, agent))
    }

    /// The record of container `id` (resolved), FailedPrecondition unless
    /// it is running.
    fn running_record(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        let (id, entry) = self.entry(id)?;
        let rec = lock(&entry.record).clone();
        if rec.state != ContainerState::Running {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        Ok(rec)
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

    /// The ready sandbox `id` (a full ID or unique prefix) and a
    /// connection of its own to its agent, for a stream a remote client
    /// paces (see [`Sandbox::own_agent`]).
    pub async fn sandbox_agent_for_stream(
        &self,
        id: &str,
    ) -> Result<(Sandbox, Agent), ContainerError> {
        let sandbox = self.sandboxes.sandbox(id)?.ready()?;
        let agent = sandbox.own_agent().await?;
        Ok((sandbox, agent))
    }

    /// As [`Containers::running`], with a connection of its own to the
    /// agent, for a stream a remote client paces.
    pub async fn running_for_stream(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, Agent), ContainerError> {
        let rec = self.running_record(id)?;
        let (_, agent) = self.sandbox_agent_for_stream(&rec.sandbox_id).await?;
        Ok((rec, agent))
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
        let (sandbox, agent) = self.ready_sandbox(sandbox_id).await?;
        let sandbox_id = sandbox.record.id.clone();
        let log = log_path(&sandbox.record.log_directory, &config.log_path)?;
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
        let context = sandbox.backend().container_context(&sandbox.record);
        let pod = PodContext {
            sandbox_id: sandbox_id.clone(),
            etc_files: context.etc_files,
            in_vm: context.in_vm,
            host_network: sandbox.record.namespaces.host_network(),
            min_oom_score_adj: context.min_oom_score_adj,
        };
        // Validate before anything is exposed to the guest.
        let mut built = spec::build(&id, &config, &image_config, &layers, &pod)?;
        // Mount syscalls block (a volume on a hung NFS server): keep them
        // off the async workers.
        let exposed = {
            let (sandbox, id, config) = (sandbox.clone(), id.clone(), config.clone());
            let chain: Vec<(String, std::path::PathBuf)> = image
                .chain
                .iter()
                .cloned()
                .zip(layers.iter().cloned())
                .collect();
            tokio::task::spawn_blocking(move || {
                sandbox
                    .backend()
                    .expose(&sandbox.record, &id, &chain, &config.mounts)
            })
            .await
            .map_err(|e| ContainerError::Io(format!("exposing the container's files: {e}")))??
        };
        let release = |why: &str| {
            if let Err(e) = sandbox.backend().release_container(&sandbox.record, &id) {
                tracing::warn!(sandbox_id = %sandbox_id, container_id = %id, error = %e, "releasing the files of a container {why}");
            }
        };
        let oci_spec_json = match built
            .set_mount_sources(&exposed.mount_sources)
            .and_then(|()| built.to_json())
        {
            Ok(json) => json,
            Err(e) => {
                release("whose spec failed");
                return Err(e.into());
            }
        };
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
                release("whose name was taken meanwhile");
                return Err(e);
            }
            let entry = Entry::new(rec.clone());
            entries.insert(id.clone(), entry.clone());
            entry
        };
        let _op = entry.op.lock().await;
        let req = pb::CreateContainerRequest {
            container_id: id.clone(),
            oci_spec_json,
            rootfs_layers: exposed.layers,
            mounts: Vec::new(),
            tty: config.tty,
            stdin: config.stdin,
        };
        let made = async {
            agent.create_container(req).await?;
            self.save(&rec)
        }
        .await;
        if let Err(e) = made {
            lock(&self.entries).remove(&id);
            let _ = agent.remove_container(&id, Duration::ZERO).await;
            release("that failed to be created");
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

    /// StopContainer: SIGTERM, SIGKILL after `timeout`; idempotent.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let (id, entry) = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = lock(&entry.record).clone();
        if rec.state == ContainerState::Exited {
            return Ok(());
        }
        let sandbox = self.sandboxes.sandbox(&rec.sandbox_id)?;
        if sandbox.record.state != SandboxState::Ready {
            self.mark_exited(
                &entry,
                UNKNOWN_EXIT,
                "SandboxExited",
                "the pod sandbox is not running",
                now_ns(),
            );
            return Ok(());
        }
        let agent = sandbox.agent().await?;
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
        if let Ok(sandbox) = self.sandboxes.sandbox(&rec.sandbox_id) {
            if sandbox.record.state == SandboxState::Ready {
                let agent = sandbox.agent().await?;
                agent.remove_container(&id, Duration::ZERO).await?;
            }
            sandbox
                .backend()
                .release_container(&sandbox.record, &id)
                .map_err(io("unexposing the container's volumes"))?;
            self.store().remove_container(&rec.sandbox_id, &id)?;
        }
        lock(&self.entries).remove(&id);
        tracing::info!(container_id = %id, "container removed");
        self.publish(EventKind::Deleted, &rec);
        Ok(())
    }

    /// StopPodSandbox: the pod's containers are killed, then its sandbox
    /// stops, then their records say so.
    pub async fn stop_pod(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        let id = self.sandboxes.resolve(sandbox_id)?;
        self.stop_all(&id).await;
        self.sandboxes.stop(&id).await?;
        self.sandbox_stopped(&id);
        Ok(())
    }

    /// RemovePodSandbox: as [`Containers::stop_pod`], then the sandbox and
    /// its containers are deleted; an unknown sandbox is already gone.
    pub async fn remove_pod(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        let id = match self.sandboxes.resolve(sandbox_id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.stop_all(&id).await;
        self.sandboxes.remove(&id).await?;
        self.sandbox_removed(&id);
        Ok(())
    }

    /// Kills every live container of a sandbox before the sandbox stops.
    async fn stop_all(&self, sandbox_id: &str) {
        for rec in self.list() {
            if rec.sandbox_id == sandbox_id && rec.state != ContainerState::Exited {
                if let Err(e) = self.stop(&rec.id, Duration::ZERO).await {
                    tracing::warn!(container_id = %rec.id, error = %e, "stopping container with its sandbox");
                }
            }
        }
    }

    /// Marks the containers of a stopped sandbox exited.
    fn sandbox_stopped(&self, sandbox_id: &str) {
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
    fn sandbox_removed(&self, sandbox_id: &str) {
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
            // Checked non-negative above.
            cpu_period: r.cpu_period.unsigned_abs(),
            cpu_shares: r.cpu_shares.unsigned_abs(),
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
