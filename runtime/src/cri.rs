//! The CRI v1 services: pod sandboxes, containers, images, and the URLs of
//! the streaming server. What is not supported (checkpoints, metrics)
//! answers Unimplemented with a message; nothing silently succeeds.

use crate::config::Config;
use crate::container::{
    ContainerError, ContainerEvent, ContainerRecord, ContainerState, Containers,
};
use crate::images::{ImageError, ImageRecord, Images};
use crate::sandbox::{EventKind, RunRequest, SandboxError, SandboxEvent, Sandboxes};
use crate::store::{NamespaceModes, PodMeta, SandboxRecord, SandboxState};
use futures_util::future::join_all;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use vmcri_image::pull::{Credentials, PullError};

/// Version reported to kubelet.
pub const RUNTIME_NAME: &str = "vmcri";
/// The CRI API version we serve.
pub const CRI_API_VERSION: &str = "v1";

/// The RuntimeService and ImageService.
pub struct Cri {
    config: Arc<Config>,
    sandboxes: Arc<Sandboxes>,
    containers: Arc<Containers>,
    images: Arc<Images>,
    pod_cidr: Mutex<String>,
    streaming: Arc<vmcri_streaming::Server>,
}

impl Cri {
    /// Serves `sandboxes`, their containers and `images` under `config`.
    pub fn new(
        config: Arc<Config>,
        sandboxes: Arc<Sandboxes>,
        containers: Arc<Containers>,
        images: Arc<Images>,
        streaming: Arc<vmcri_streaming::Server>,
    ) -> Self {
        Cri {
            config,
            sandboxes,
            containers,
            images,
            pod_cidr: Mutex::new(String::new()),
            streaming,
        }
    }

    /// A one-time streaming URL for `req`.
    fn stream_url(&self, req: vmcri_streaming::Request) -> Result<String, Status> {
        self.streaming.url(req).map_err(|e| match e {
            vmcri_streaming::TokenError::Full => Status::resource_exhausted(e.to_string()),
            other => Status::internal(other.to_string()),
        })
    }
}

/// Runs `f` on its own task, so that a client that gives up (kubelet's
/// deadline) does not cancel it half-way; its result still reaches a
/// caller that waits.
async fn run_to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(f)
        .await
        .map_err(|e| Status::internal(format!("the operation's task failed: {e}")))
}

impl Cri {
    async fn pod_stats(&self, rec: &SandboxRecord) -> Result<cri::PodSandboxStats, Status> {
        let (total, each) = self.containers.sandbox_stats(&rec.id).await?;
        let containers = self
            .containers
            .list()
            .iter()
            .filter(|c| c.sandbox_id == rec.id && c.state != ContainerState::Exited)
            .map(|c| stats_of(c, each.get(&c.id)))
            .collect();
        let ts = total.timestamp_ns;
        let v = |x: u64| Some(cri::UInt64Value { value: x });
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: rec.id.clone(),
                metadata: Some(metadata(rec)),
                labels: to_hash(&rec.labels),
                annotations: to_hash(&rec.annotations),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: ts,
                    usage_core_nano_seconds: v(total.cpu_usage_ns),
                    usage_nano_cores: None,
                }),
                memory: Some(cri::MemoryUsage {
                    timestamp: ts,
                    working_set_bytes: v(total.memory_working_set_bytes),
                    available_bytes: None,
                    usage_bytes: v(total.memory_usage_bytes),
                    rss_bytes: v(total.memory_rss_bytes),
                    page_faults: v(total.memory_page_faults),
                    major_page_faults: v(total.memory_major_page_faults),
                }),
                // Pod networking has not landed.
                network: None,
                process: Some(cri::ProcessUsage {
                    timestamp: ts,
                    process_count: v(total.pids_current),
                }),
                containers,
            }),
            windows: None,
        })
    }
}

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Status {
        let msg = e.to_string();
        match e {
            ContainerError::Invalid(_) => Status::invalid_argument(msg),
            ContainerError::Unsupported(_) => Status::unimplemented(msg),
            ContainerError::NotFound(_) => Status::not_found(msg),
            ContainerError::Exists(_) => Status::already_exists(msg),
            ContainerError::State(_) => Status::failed_precondition(msg),
            ContainerError::Timeout(_) => Status::deadline_exceeded(msg),
            ContainerError::Sandbox(e) => e.into(),
            // The agent's own verdict (InvalidArgument, NotFound, ...) stands.
            ContainerError::Agent(vmcri_agent_client::ClientError::Rpc { status, .. }) => {
                Status::new(status.code(), format!("agent: {}", status.message()))
            }
            ContainerError::Agent(_) => Status::unavailable(msg),
            ContainerError::Io(_) => Status::internal(msg),
        }
    }
}

fn container_state(r: &ContainerRecord) -> i32 {
    match r.state {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
    }
}

fn container_metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

fn image_spec(r: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: r.image.clone(),
        ..Default::default()
    }
}

fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: container_state(r),
        created_at: r.created_at_ns,
        started_at: r.started_at_ns,
        finished_at: r.finished_at_ns,
        exit_code: r.exit_code,
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: to_hash(&r.labels),
        annotations: to_hash(&r.annotations),
        mounts: r
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.clone(),
        resources: None,
        image_id: r.image_ref.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(r.uid),
                gid: i64::from(r.gid),
                supplemental_groups: r.additional_gids.iter().map(|g| i64::from(*g)).collect(),
            }),
        }),
    }
}

fn container_matches(r: &ContainerRecord, f: &cri::ContainerFilter) -> bool {
    (f.id.is_empty() || r.id.starts_with(&f.id))
        && (f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
        && f.state
            .as_ref()
            .is_none_or(|s| s.state == container_state(r))
        && f.label_selector
            .iter()
            .all(|(k, v)| r.labels.get(k) == Some(v))
}

fn stats_of(
    r: &ContainerRecord,
    s: Option<&vmcri_proto::agent::v1::CgroupStats>,
) -> cri::ContainerStats {
    let ts = s.map_or_else(crate::sandbox::now_ns, |s| s.timestamp_ns);
    let v = |x: u64| Some(cri::UInt64Value { value: x });
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: to_hash(&r.labels),
            annotations: to_hash(&r.annotations),
        }),
        cpu: s.map(|s| cri::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: v(s.cpu_usage_ns),
            usage_nano_cores: None,
        }),
        memory: s.map(|s| cri::MemoryUsage {
            timestamp: ts,
            working_set_bytes: v(s.memory_working_set_bytes),
            available_bytes: None,
            usage_bytes: v(s.memory_usage_bytes),
            rss_bytes: v(s.memory_rss_bytes),
            page_faults: v(s.memory_page_faults),
            major_page_faults: v(s.memory_major_page_faults),
        }),
        writable_layer: None,
        swap: None,
    }
}

fn event_type(kind: EventKind) -> i32 {
    let t = match kind {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    t as i32
}

fn container_event(
    ev: ContainerEvent,
    sandbox: Option<SandboxRecord>,
) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: ev.record.id.clone(),
        container_event_type: event_type(ev.kind),
        created_at: ev.at_ns,
        pod_sandbox_status: sandbox.as_ref().map(sandbox_status),
        containers_statuses: vec![container_status(&ev.record)],
    }
}

impl From<SandboxError> for Status {
    fn from(e: SandboxError) -> Status {
        let msg = e.to_string();
        match e {
            SandboxError::Invalid(_) => Status::invalid_argument(msg),
            SandboxError::NotFound(_) => Status::not_found(msg),
            SandboxError::Exists { .. } => Status::already_exists(msg),
            SandboxError::Backend(_) => Status::unavailable(msg),
            SandboxError::Store(_) => Status::internal(msg),
        }
    }
}

fn to_hash(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn state_of(rec: &SandboxRecord) -> i32 {
    match rec.state {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn metadata(rec: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: rec.meta.name.clone(),
        uid: rec.meta.uid.clone(),
        namespace: rec.meta.namespace.clone(),
        attempt: rec.meta.attempt,
    }
}

fn sandbox_status(rec: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: rec.id.clone(),
        metadata: Some(metadata(rec)),
        state: state_of(rec),
        created_at: rec.created_at_ns,
        // Pod networking has not landed: no IP, so no field (kubelet reads
        // an empty one as a lost IP and recreates the sandbox).
        network: None,
        // What RunPodSandbox asked for: kubelet compares it.
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: rec.namespaces.network,
                    pid: rec.namespaces.pid,
                    ipc: rec.namespaces.ipc,
                    ..Default::default()
                }),
            }),
        }),
        labels: to_hash(&rec.labels),
        annotations: to_hash(&rec.annotations),
        runtime_handler: rec.handler.clone(),
    }
}

/// The stream combination rules of Exec and Attach, as kubelet has them.
fn check_streams(
    call: &str,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), Status> {
    if tty && stderr {
        return Err(Status::invalid_argument(format!(
            "{call}: tty and stderr cannot both be true (a terminal merges stderr into stdout)"
        )));
    }
    if !stdin && !stdout && !stderr {
        return Err(Status::invalid_argument(format!(
            "{call}: one of stdin, stdout or stderr must be set"
        )));
    }
    Ok(())
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "vmcri {}: {what} is not implemented yet",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Validates and converts a RunPodSandbox request.
fn run_request(req: cri::RunPodSandboxRequest) -> Result<RunRequest, Status> {
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is required"))?;
    let m = config
        .metadata
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config.metadata is required"))?;
    for (field, value) in [
        ("name", &m.name),
        ("uid", &m.uid),
        ("namespace", &m.namespace),
    ] {
        if value.is_empty() {
            return Err(Status::invalid_argument(format!(
                "RunPodSandbox: metadata.{field} is required"
            )));
        }
    }
    if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox: log_directory {:?} must be an absolute path",
            config.log_directory
        )));
    }
    // RFC 1123 labels: the hostname also travels on the guest's kernel
    // command line.
    let valid_hostname = config.hostname.len() <= 64
        && config
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if let Some(dns) = &config.dns_config {
        crate::pod_files::validate_dns(dns)
            .map_err(|e| Status::invalid_argument(format!("RunPodSandbox: {e}")))?;
    }
    if !valid_hostname {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox: invalid hostname {:?}",
            config.hostname
        )));
    }
    Ok(RunRequest {
        meta: PodMeta {
            name: m.name,
            uid: m.uid,
            namespace: m.namespace,
            attempt: m.attempt,
        },
        labels: config.labels.into_iter().collect(),
        annotations: config.annotations.into_iter().collect(),
        handler: req.runtime_handler,
        hostname: config.hostname,
        log_directory: config.log_directory,
        dns: config.dns_config,
        namespaces: config
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .map(|o| NamespaceModes {
                network: o.network,
                pid: o.pid,
                ipc: o.ipc,
            })
            .unwrap_or_default(),
    })
}

fn matches_filter(rec: &SandboxRecord, f: &cri::PodSandboxFilter) -> bool {
    (f.id.is_empty() || rec.id.starts_with(&f.id))
        && f.state.as_ref().is_none_or(|s| s.state == state_of(rec))
        && f.label_selector
            .iter()
            .all(|(k, v)| rec.labels.get(k) == Some(v))
}

fn event(ev: SandboxEvent) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: ev.record.id.clone(),
        container_event_type: event_type(ev.kind),
        created_at: ev.at_ns,
        pod_sandbox_status: Some(sandbox_status(&ev.record)),
        containers_statuses: Vec::new(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let run = run_request(req.into_inner())?;
        // Not cancelled with the call: kubelet's deadline must not leave a
        // VMM booting with nobody to record or end it.
        let sandboxes = self.sandboxes.clone();
        let id = run_to_completion(async move { sandboxes.run(run).await }).await??;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let id = match self.sandboxes.resolve(&id) {
            Ok(id) => id,
            Err(e) => return Err(e.into()),
        };
        self.containers.stop_all(&id).await;
        self.sandboxes.stop(&id).await?;
        self.containers.sandbox_stopped(&id);
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        let id = match self.sandboxes.resolve(&id) {
            Ok(id) => id,
            // Already gone: removal is idempotent.
            Err(SandboxError::NotFound(_)) => {
                return Ok(Response::new(cri::RemovePodSandboxResponse {}))
            }
            Err(e) => return Err(e.into()),
        };
        self.containers.stop_all(&id).await;
        self.sandboxes.remove(&id).await?;
        self.containers.sandbox_removed(&id);
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        let rec = self.sandboxes.get(&req.pod_sandbox_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            let verbose = serde_json::json!({
                "backend": rec.backend.to_string(),
                "pid": rec.process.map(|p| p.pid),
                "agentSocket": rec.agent_socket,
                "dir": rec.dir,
                "reason": rec.reason,
                "hostname": rec.hostname,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&rec)),
            info,
            containers_statuses: self
                .containers
                .list()
                .iter()
                .filter(|c| c.sandbox_id == rec.id)
                .map(container_status)
                .collect(),
            timestamp: crate::sandbox::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut items: Vec<cri::PodSandbox> = self
            .sandboxes
            .list()
            .iter()
            .filter(|r| matches_filter(r, &filter))
            .map(|r| cri::PodSandbox {
                id: r.id.clone(),
                metadata: Some(metadata(r)),
                state: state_of(r),
                created_at: r.created_at_ns,
                labels: to_hash(&r.labels),
                annotations: to_hash(&r.annotations),
                runtime_handler: r.handler.clone(),
            })
            .collect();
        items.sort_by_key(|p| p.created_at);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer: config is required"))?;
        // Not cancelled with the call: a create cut off half-way would
        // leave volumes bound and the name taken.
        let containers = self.containers.clone();
        let pod = req.pod_sandbox_id;
        let container_id =
            run_to_completion(async move { containers.create(&pod, config).await }).await??;
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.containers
            .start(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        let timeout = std::time::Duration::from_secs(req.timeout.max(0) as u64);
        self.containers.stop(&req.container_id, timeout).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        self.containers
            .remove(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut containers: Vec<cri::Container> = self
            .containers
            .list()
            .iter()
            .filter(|r| container_matches(r, &filter))
            .map(|r| cri::Container {
                id: r.id.clone(),
                pod_sandbox_id: r.sandbox_id.clone(),
                metadata: Some(container_metadata(r)),
                image: Some(image_spec(r)),
                image_ref: r.image_ref.clone(),
                state: container_state(r),
                created_at: r.created_at_ns,
                labels: to_hash(&r.labels),
                annotations: to_hash(&r.annotations),
                image_id: r.image_ref.clone(),
            })
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        let rec = self.containers.get(&req.container_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "sandboxID": rec.sandbox_id,
                "image": rec.image,
                "user": {"uid": rec.uid, "gid": rec.gid, "additionalGids": rec.additional_gids},
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status(&rec)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        let linux = req.linux.ok_or_else(|| {
            Status::invalid_argument("UpdateContainerResources: linux resources are required")
        })?;
        self.containers
            .update_resources(&req.container_id, &linux)
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.containers
            .reopen_log(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        if req.timeout < 0 {
            return Err(Status::invalid_argument(
                "ExecSync: timeout must not be negative",
            ));
        }
        let r = self
            .containers
            .exec_sync(
                &req.container_id,
                req.cmd,
                std::time::Duration::from_secs(req.timeout as u64),
            )
            .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        }))
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = req.into_inner();
        crate::container::check_program("Exec", &req.cmd)?;
        check_streams("Exec", req.tty, req.stdin, req.stdout, req.stderr)?;
        let rec = self.containers.get(&req.container_id)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "Exec: container {} is not running",
                rec.id
            )));
        }
        let url = self.stream_url(vmcri_streaming::Request::Exec(
            vmcri_streaming::ExecRequest {
                container_id: rec.id,
                cmd: req.cmd,
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        ))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = req.into_inner();
        check_streams("Attach", req.tty, req.stdin, req.stdout, req.stderr)?;
        let rec = self.containers.get(&req.container_id)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "Attach: container {} is not running",
                rec.id
            )));
        }
        if req.stdin && !rec.stdin {
            return Err(Status::invalid_argument(format!(
                "Attach: container {} was created without stdin",
                rec.id
            )));
        }
        if req.tty != rec.tty {
            return Err(Status::invalid_argument(format!(
                "Attach: tty={} but container {} was created with tty={}",
                req.tty, rec.id, rec.tty
            )));
        }
        let url = self.stream_url(vmcri_streaming::Request::Attach(
            vmcri_streaming::AttachRequest {
                container_id: rec.id,
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        ))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = req.into_inner();
        let rec = self.sandboxes.get(&req.pod_sandbox_id)?;
        if rec.state != SandboxState::Ready {
            return Err(Status::failed_precondition(format!(
                "PortForward: pod sandbox {} is not ready",
                rec.id
            )));
        }
        let ports = req
            .port
            .iter()
            .map(|p| {
                u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                    Status::invalid_argument(format!("PortForward: port {p} is not 1-65535"))
                })
            })
            .collect::<Result<Vec<u16>, Status>>()?;
        let url = self.stream_url(vmcri_streaming::Request::PortForward(
            vmcri_streaming::PortForwardRequest {
                sandbox_id: rec.id,
                ports,
            },
        ))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let rec = self.containers.get(&req.into_inner().container_id)?;
        let stats = if rec.state == ContainerState::Exited {
            HashMap::new()
        } else {
            self.containers
                .stats(&rec.sandbox_id, vec![rec.id.clone()])
                .await?
        };
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats_of(&rec, stats.get(&rec.id))),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let filter = cri::ContainerFilter {
            id: f.id,
            pod_sandbox_id: f.pod_sandbox_id,
            label_selector: f.label_selector,
            state: None,
        };
        // Exited containers have no cgroup left to read.
        let records: Vec<ContainerRecord> = self
            .containers
            .list()
            .into_iter()
            .filter(|r| container_matches(r, &filter) && r.state != ContainerState::Exited)
            .collect();
        let mut by_sandbox: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &records {
            by_sandbox
                .entry(r.sandbox_id.clone())
                .or_default()
                .push(r.id.clone());
        }
        // Every sandbox at once, each under its own deadline: one stalled
        // or unreachable guest must not delay or hide the others' stats.
        let replies = join_all(by_sandbox.into_iter().map(|(sandbox, ids)| async move {
            (self.containers.stats(&sandbox, ids).await, sandbox)
        }))
        .await;
        let mut all = HashMap::new();
        for (reply, sandbox) in replies {
            match reply {
                Ok(s) => all.extend(s),
                Err(e) => tracing::warn!(sandbox_id = %sandbox, error = %e, "container stats"),
            }
        }
        let stats = records
            .iter()
            .map(|r| stats_of(r, all.get(&r.id)))
            .collect();
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let rec = self.sandboxes.get(&req.into_inner().pod_sandbox_id)?;
        if rec.state != SandboxState::Ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                rec.id
            )));
        }
        let stats = self.pod_stats(&rec).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let filter = cri::PodSandboxFilter {
            id: f.id,
            label_selector: f.label_selector,
            // Only running pods have stats to read.
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
        };
        // Every pod at once, each under its own deadline (see above).
        let pods: Vec<SandboxRecord> = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|rec| matches_filter(rec, &filter))
            .collect();
        let replies = join_all(pods.iter().map(|rec| self.pod_stats(rec))).await;
        let mut stats = Vec::new();
        for (reply, rec) in replies.into_iter().zip(&pods) {
            match reply {
                Ok(s) => stats.push(s),
                Err(e) => tracing::warn!(sandbox_id = %rec.id, error = %e, "pod sandbox stats"),
            }
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "runtime config updated");
        *self.pod_cidr.lock().unwrap_or_else(|e| e.into_inner()) = cidr;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NoPodNetwork".into(),
                message: "vmcri does not set up pod networking yet".into(),
            },
        ];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            let handlers: BTreeMap<&String, String> = self
                .config
                .handlers
                .iter()
                .map(|(k, h)| (k, h.backend.to_string()))
                .collect();
            let cidr = self
                .pod_cidr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let isolation = if self
                .config
                .handlers
                .values()
                .any(|h| h.backend == crate::config::Backend::Process)
            {
                "some handlers use the process backend: pods there have no VM isolation"
            } else {
                "every handler runs pods in microVMs"
            };
            let v = serde_json::json!({
                "handlers": handlers,
                "defaultHandler": self.config.default_handler,
                "podCIDR": cidr,
                "isolation": isolation,
            });
            info.insert("config".into(), v.to_string());
        }
        // The default handler also answers to the empty name, as kubelet
        // asks for it when a pod has no RuntimeClass.
        let runtime_handlers = std::iter::once(String::new())
            .chain(self.config.handlers.keys().cloned())
            .map(|name| cri::RuntimeHandler {
                name,
                features: Some(cri::RuntimeHandlerFeatures::default()),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures::default()),
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented("CheckpointContainer"))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        // A subscriber too slow to keep up is told, not silently skipped.
        let lagged = |e| Status::data_loss(format!("event stream lagged: {e}"));
        let pods = BroadcastStream::new(self.sandboxes.subscribe()).map(move |item| match item {
            Ok(ev) => Ok(event(ev)),
            Err(e) => Err(lagged(e)),
        });
        let sandboxes = self.sandboxes.clone();
        let containers =
            BroadcastStream::new(self.containers.subscribe()).map(move |item| match item {
                Ok(ev) => {
                    let sandbox = sandboxes.get(&ev.record.sandbox_id).ok();
                    Ok(container_event(ev, sandbox))
                }
                Err(e) => Err(lagged(e)),
            });
        Ok(Response::new(Box::pin(pods.merge(containers))))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented("ListMetricDescriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented("ListPodSandboxMetrics"))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Status {
        let msg = e.to_string();
        match e {
            ImageError::Reference(_) => Status::invalid_argument(msg),
            ImageError::Pull(PullError::Unauthorized { .. }) => Status::unauthenticated(msg),
            ImageError::Pull(PullError::Registry { .. }) => Status::unavailable(msg),
            ImageError::Pull(PullError::Invalid { .. }) => Status::failed_precondition(msg),
            // Too large, or too little disk left: every bound a pull hits.
            ImageError::Pull(PullError::Exhausted { .. }) => Status::resource_exhausted(msg),
            ImageError::Pull(PullError::Content(_))
            | ImageError::Content(_)
            | ImageError::Io { .. } => Status::internal(msg),
        }
    }
}

/// Registry credentials from a CRI AuthConfig: user and password, or the
/// base64 `user:password` of `auth`.
fn credentials(auth: Option<cri::AuthConfig>) -> Result<Option<Credentials>, Status> {
    use base64::Engine as _;
    let Some(a) = auth else { return Ok(None) };
    if !a.username.is_empty() {
        return Ok(Some(Credentials {
            username: a.username,
            password: a.password,
        }));
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| Status::invalid_argument("auth: not base64"))?;
        let text =
            String::from_utf8(raw).map_err(|_| Status::invalid_argument("auth: not UTF-8"))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth: expected user:password"))?;
        return Ok(Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }));
    }
    if !a.identity_token.is_empty() || !a.registry_token.is_empty() {
        return Err(Status::unimplemented(
            "token-based registry auth is not implemented yet; use username/password",
        ));
    }
    Ok(None)
}

fn to_cri_image(r: &ImageRecord) -> cri::Image {
    cri::Image {
        id: r.id.clone(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid: r.uid().map(|value| cri::Int64Value { value }),
        username: r.username(),
        spec: Some(cri::ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

fn image_name(spec: Option<cri::ImageSpec>, rpc: &str) -> Result<String, Status> {
    spec.map(|s| s.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Status::invalid_argument(format!("{rpc}: image is required")))
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let images = match filter {
            Some(f) => self
                .images
                .find(&f)
                .into_iter()
                .map(|r| to_cri_image(&r))
                .collect(),
            None => self.images.list().iter().map(to_cri_image).collect(),
        };
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = image_name(req.image, "ImageStatus")?;
        // An absent image is not an error: the answer carries no image.
        let found = self.images.find(&name);
        let mut info = HashMap::new();
        if let (true, Some(r)) = (req.verbose, &found) {
            info.insert(
                "info".to_string(),
                serde_json::json!({ "chain": r.chain, "user": r.user }).to_string(),
            );
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: found.as_ref().map(to_cri_image),
            info,
        }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = image_name(req.image, "PullImage")?;
        let creds = credentials(req.auth)?;
        let id = self.images.pull(&name, creds).await?;
        Ok(Response::new(cri::PullImageResponse { image_ref: id }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = image_name(req.into_inner().image, "RemoveImage")?;
        if let Some(rec) = self.images.find(&name) {
            // Dropping one of several tags leaves the image; anything that
            // would delete it must wait until no container uses it.
            let only_a_tag = rec.repo_tags.len() > 1
                && vmcri_image::reference::Reference::parse(&name)
                    .is_ok_and(|r| rec.repo_tags.contains(&r.to_string()));
            if !only_a_tag {
                if let Some(c) = self.containers.uses_image(&rec.id) {
                    return Err(Status::failed_precondition(format!(
                        "image {name} is in use by container {c}; remove the container first"
                    )));
                }
            }
        }
        self.images.remove(&name).await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let (bytes, inodes, root) = self.images.usage();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: crate::sandbox::now_ns(),
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: root.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, log_dir: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                log_directory: log_dir.into(),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }
    }

    #[test]
    fn the_status_echoes_the_namespace_options_and_has_no_network_field() {
        let mut r = req("p", "");
        r.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let run = run_request(r).unwrap();
        assert_eq!(
            run.namespaces,
            NamespaceModes {
                network: 2,
                pid: 1,
                ipc: 0
            }
        );
        let mut rec = crate::store::tests::record("s1");
        rec.namespaces = run.namespaces;
        let status = sandbox_status(&rec);
        // No IP yet: no network field at all, which kubelet tells from a
        // lost IP.
        assert_eq!(status.network, None);
        let options = status
            .linux
            .as_ref()
            .and_then(|l| l.namespaces.as_ref())
            .and_then(|n| n.options.as_ref())
            .unwrap();
        assert_eq!((options.network, options.pid, options.ipc), (2, 1, 0));
        // The same answer every time.
        assert_eq!(status, sandbox_status(&rec));
        // Without options, the defaults (all POD) are what is echoed.
        assert_eq!(
            run_request(req("p", "")).unwrap().namespaces,
            NamespaceModes::default()
        );
    }

    #[test]
    fn run_requests_are_validated() {
        assert!(run_request(req("p", "/var/log/pods/x")).is_ok());
        let code = |r| run_request(r).unwrap_err().code();
        assert_eq!(code(req("", "")), tonic::Code::InvalidArgument);
        assert_eq!(code(req("p", "relative/dir")), tonic::Code::InvalidArgument);
        assert_eq!(
            code(cri::RunPodSandboxRequest::default()),
            tonic::Code::InvalidArgument
        );
        let mut no_meta = req("p", "");
        no_meta.config.as_mut().unwrap().metadata = None;
        assert!(run_request(no_meta)
            .unwrap_err()
            .message()
            .contains("metadata"));
    }
}
