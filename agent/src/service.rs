//! The agent API implementation: guest info, health, the transport probe,
//! shutdown, port forwarding, and the container RPCs over
//! [`crate::engine`]. Sandbox networking answers `Unimplemented` until its
//! issue lands.

use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use vmcri_proto::agent::v1 as pb;
use vmcri_proto::agent::v1::agent_server::Agent;
use vmcri_proto::AGENT_API_VERSION;

use crate::engine::{cgroup, process, Engine, EngineError};
use crate::forward;
use crate::network::{self, NetConfig, NetError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Largest probe the host may ask for.
pub const MAX_PROBE_BYTES: u64 = 1 << 30;
/// Largest probe chunk.
pub const MAX_PROBE_CHUNK: u32 = 1 << 20;
const DEFAULT_PROBE_CHUNK: u32 = 64 * 1024;

/// The agent's state.
pub struct AgentService {
    shutdown: Arc<Notify>,
    engine: Arc<Engine>,
}

impl AgentService {
    /// A service running containers with `engine`, whose Shutdown RPC
    /// notifies `shutdown`.
    pub fn new(shutdown: Arc<Notify>, engine: Arc<Engine>) -> Self {
        AgentService { shutdown, engine }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let msg = e.to_string();
        match e {
            EngineError::Invalid(_) => Status::invalid_argument(msg),
            EngineError::NotFound(_) => Status::not_found(msg),
            EngineError::Exists(_) => Status::already_exists(msg),
            EngineError::State(_) => Status::failed_precondition(msg),
            EngineError::Failed(_) => Status::internal(msg),
        }
    }
}

fn process_ref(p: Option<pb::ProcessRef>) -> Result<pb::ProcessRef, Status> {
    p.filter(|p| !p.container_id.is_empty())
        .ok_or_else(|| Status::invalid_argument("process.container_id is required"))
}

fn stats_pb(s: &cgroup::Stats) -> pb::CgroupStats {
    pb::CgroupStats {
        cpu_usage_ns: s.cpu_usage_ns,
        memory_usage_bytes: s.memory_usage_bytes,
        memory_working_set_bytes: s.working_set_bytes,
        memory_rss_bytes: s.rss_bytes,
        memory_page_faults: s.page_faults,
        memory_major_page_faults: s.major_page_faults,
        pids_current: s.pids,
        oom_kills: s.oom_kills,
        timestamp_ns: vmcri_proto::now_ns(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn net_status(e: NetError) -> Status {
    let msg = format!("UpdateInterfaces: {e}");
    match e {
        NetError::Invalid(_) => Status::invalid_argument(msg),
        NetError::NoSuchLink(_) => Status::failed_precondition(msg),
        NetError::Netlink { .. } | NetError::Io(_) => Status::internal(msg),
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "vmcri-agent {}: {rpc} is not implemented yet",
        env!("CARGO_PKG_VERSION")
    ))
}

fn uptime_ms() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    // Both fields are non-negative for CLOCK_BOOTTIME.
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1000 + nanos / 1_000_000
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

fn memory_bytes() -> u64 {
    let si = rustix::system::sysinfo();
    si.totalram.saturating_mul(u64::from(si.mem_unit))
}

/// Online CPUs. sysconf(_SC_NPROCESSORS_ONLN) through nix (rustix has no
/// sysconf); 0 if unknown.
fn online_cpus() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            status: pb::health_response::Status::Serving as i32,
        }))
    }

    async fn get_guest_info(
        &self,
        _: Request<pb::GuestInfoRequest>,
    ) -> Result<Response<pb::GuestInfo>, Status> {
        let cpus = online_cpus();
        Ok(Response::new(pb::GuestInfo {
            api_version: AGENT_API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            cpus,
            memory_bytes: memory_bytes(),
            uptime_ms: uptime_ms(),
        }))
    }

    type StreamProbeStream = BoxStream<pb::ProbeChunk>;

    async fn stream_probe(
        &self,
        req: Request<pb::ProbeRequest>,
    ) -> Result<Response<Self::StreamProbeStream>, Status> {
        let req = req.into_inner();
        if req.bytes > MAX_PROBE_BYTES {
            return Err(Status::invalid_argument(format!(
                "probe of {} bytes exceeds {MAX_PROBE_BYTES}",
                req.bytes
            )));
        }
        let chunk = match req.chunk_size {
            0 => DEFAULT_PROBE_CHUNK,
            n if n > MAX_PROBE_CHUNK => {
                return Err(Status::invalid_argument(format!(
                    "chunk size {n} exceeds {MAX_PROBE_CHUNK}"
                )));
            }
            n => n,
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let filler = vec![0x5a_u8; chunk as usize];
            let mut left = req.bytes;
            while left > 0 {
                let n = usize::try_from(left).map_or(filler.len(), |l| l.min(filler.len()));
                if tx
                    .send(Ok(pb::ProbeChunk {
                        data: filler[..n].to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                left -= n as u64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn setup_sandbox(
        &self,
        _: Request<pb::SetupSandboxRequest>,
    ) -> Result<Response<pb::SetupSandboxResponse>, Status> {
        Err(not_yet("SetupSandbox"))
    }

    async fn update_interfaces(
        &self,
        req: Request<pb::UpdateInterfacesRequest>,
    ) -> Result<Response<pb::UpdateInterfacesResponse>, Status> {
        let req = req.into_inner();
        let cfg = NetConfig::from_request(&req.interfaces, &req.routes).map_err(net_status)?;
        network::apply(&cfg).await.map_err(net_status)?;
        Ok(Response::new(pb::UpdateInterfacesResponse {}))
    }

    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        if !req.mounts.is_empty() {
            return Err(Status::invalid_argument(
                "CreateContainer: mounts belong in the OCI spec; the mounts field is reserved",
            ));
        }
        let layers: Vec<PathBuf> = req.rootfs_layers.iter().map(PathBuf::from).collect();
        let pid = self
            .engine
            .create(&req.container_id, &req.oci_spec_json, &layers, req.stdin)
            .await?;
        Ok(Response::new(pb::CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        self.engine.start(&req.into_inner().container_id)?;
        Ok(Response::new(pb::StartContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let req = req.into_inner();
        self.engine
            .remove(
                &req.container_id,
                Duration::from_secs(u64::from(req.timeout_secs)),
            )
            .await?;
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }

    async fn update_container_resources(
        &self,
        req: Request<pb::UpdateResourcesRequest>,
    ) -> Result<Response<pb::UpdateResourcesResponse>, Status> {
        let req = req.into_inner();
        let r = req.resources.unwrap_or_default();
        let positive = |v: i64| (v > 0).then_some(v);
        let nonzero = |v: u64| (v > 0).then_some(v);
        let text = |v: &str| (!v.is_empty()).then(|| v.to_string());
        // The OCI shape, checked by oci-spec as it parses.
        let json = serde_json::json!({
            "cpu": {
                "quota": positive(r.cpu_quota),
                "period": nonzero(r.cpu_period),
                "shares": nonzero(r.cpu_shares),
                "cpus": text(&r.cpuset_cpus),
                "mems": text(&r.cpuset_mems),
            },
            "memory": {"limit": positive(r.memory_limit_bytes)},
            "pids": positive(r.pids_limit).map(|l| serde_json::json!({"limit": l})),
            "unified": (!r.unified.is_empty()).then_some(&r.unified),
        });
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_value(json)
            .map_err(|e| Status::invalid_argument(format!("resources: {e}")))?;
        self.engine
            .update_resources(&req.container_id, &resources)?;
        Ok(Response::new(pb::UpdateResourcesResponse {}))
    }

    async fn exec_process(
        &self,
        req: Request<pb::ExecProcessRequest>,
    ) -> Result<Response<pb::ExecProcessResponse>, Status> {
        let req = req.into_inner();
        let env: HashMap<String, String> = req
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(Status::invalid_argument(format!(
                    "ExecProcess: env entry {kv:?} is not KEY=VALUE"
                ))),
            })
            .collect::<Result<_, _>>()?;
        let cwd = (!req.cwd.is_empty()).then(|| PathBuf::from(&req.cwd));
        let pid = self
            .engine
            .exec(
                &req.container_id,
                &req.exec_id,
                req.args,
                env,
                cwd,
                req.tty,
                req.stdin,
            )
            .await?;
        Ok(Response::new(pb::ExecProcessResponse { pid }))
    }

    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let req = req.into_inner();
        let p = process_ref(req.process)?;
        self.engine
            .signal(&p.container_id, &p.exec_id, req.signal)?;
        Ok(Response::new(pb::SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        req: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        let p = process_ref(req.into_inner().process)?;
        let ended = self.engine.wait(&p.container_id, &p.exec_id).await?;
        use pb::wait_process_response::Reason;
        let reason = if ended.oom_killed {
            Reason::OomKilled
        } else if ended.exit.signal != 0 {
            Reason::Signaled
        } else {
            Reason::Exited
        };
        Ok(Response::new(pb::WaitProcessResponse {
            exit_code: ended.exit.code,
            signal: ended.exit.signal,
            reason: reason as i32,
            started_at_ns: ended.started_at_ns,
            finished_at_ns: ended.exit.at_ns,
        }))
    }

    async fn write_stdin(
        &self,
        req: Request<Streaming<pb::StdinChunk>>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let mut chunks = req.into_inner();
        let Some(first) = chunks.next().await.transpose()? else {
            return Ok(Response::new(pb::WriteStdinResponse { bytes_written: 0 }));
        };
        let p = process_ref(first.process.clone())?;
        let proc = self.engine.proc(&p.container_id, &p.exec_id)?;
        let mut written = 0u64;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            let n = proc
                .write_stdin(&c.data, c.eof)
                .await
                .map_err(|e| Status::failed_precondition(format!("stdin: {e}")))?;
            written += n as u64;
            if c.eof {
                break;
            }
            chunk = chunks.next().await.transpose()?;
        }
        Ok(Response::new(pb::WriteStdinResponse {
            bytes_written: written,
        }))
    }

    type ReadOutputStream = BoxStream<pb::OutputChunk>;

    async fn read_output(
        &self,
        req: Request<pb::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let req = req.into_inner();
        let p = process_ref(req.process)?;
        let proc = self.engine.proc(&p.container_id, &p.exec_id)?;
        // Holding the reader for the stream's life keeps readers one at a
        // time; a new reader resumes from the offset it says it saved.
        let mut reader = proc.output().await;
        reader.acknowledge(req.from_offset);
        let mut pos = req.from_offset;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some((offset, c)) = reader.next_after(pos).await {
                pos = offset + c.data.len() as u64;
                let stream = match c.stream {
                    process::Stream::Stdout => pb::output_chunk::Stream::Stdout,
                    process::Stream::Stderr => pb::output_chunk::Stream::Stderr,
                };
                let chunk = pb::OutputChunk {
                    stream: stream as i32,
                    data: c.data,
                    timestamp_ns: c.at_ns,
                    offset,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    // The reader left; the next one resumes from its offset.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resize_tty(
        &self,
        req: Request<pb::ResizeTtyRequest>,
    ) -> Result<Response<pb::ResizeTtyResponse>, Status> {
        let req = req.into_inner();
        let p = process_ref(req.process)?;
        let dim = |v: u32, what: &str| {
            u16::try_from(v).map_err(|_| {
                Status::invalid_argument(format!("ResizeTty: {what} {v} exceeds 65535"))
            })
        };
        let (rows, cols) = (dim(req.rows, "rows")?, dim(req.cols, "cols")?);
        self.engine
            .resize(&p.container_id, &p.exec_id, rows, cols)?;
        Ok(Response::new(pb::ResizeTtyResponse {}))
    }

    async fn container_stats(
        &self,
        req: Request<pb::ContainerStatsRequest>,
    ) -> Result<Response<pb::ContainerStatsResponse>, Status> {
        let req = req.into_inner();
        let ids = if req.container_ids.is_empty() {
            self.engine.ids()
        } else {
            req.container_ids
        };
        let mut stats = HashMap::new();
        for id in ids {
            if let Some(s) = self.engine.stats(&id)? {
                stats.insert(id, stats_pb(&s));
            }
        }
        Ok(Response::new(pb::ContainerStatsResponse { stats }))
    }

    async fn sandbox_stats(
        &self,
        _: Request<pb::SandboxStatsRequest>,
    ) -> Result<Response<pb::SandboxStatsResponse>, Status> {
        Ok(Response::new(pb::SandboxStatsResponse {
            stats: Some(stats_pb(&self.engine.sandbox_stats())),
        }))
    }

    type PortForwardStream = BoxStream<pb::ForwardChunk>;

    async fn port_forward(
        &self,
        req: Request<Streaming<pb::ForwardChunk>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound.next().await.transpose()?.ok_or_else(|| {
            Status::invalid_argument("PortForward: the stream ended before its port")
        })?;
        let port = u16::try_from(first.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("PortForward: port {} is not 1-65535", first.port))
            })?;
        let conn = forward::connect(port).await.map_err(|e| {
            Status::unavailable(format!(
                "connecting to localhost:{port} in the sandbox: {e}"
            ))
        })?;
        Ok(Response::new(Box::pin(forward::relay(
            conn, first, inbound,
        ))))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        // Containers go first: on a host (process backend) their cgroups
        // would otherwise outlive the sandbox.
        for id in self.engine.ids() {
            if let Err(e) = self.engine.remove(&id, Duration::ZERO).await {
                tracing::warn!(container_id = %id, error = %e, "removing container at shutdown");
            }
        }
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
