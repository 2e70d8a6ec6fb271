//! The agent API implementation. Guest info, health, the transport probe
//! and shutdown are served here; the container engine arrives with the
//! CRI daemon (issue 4) and its RPCs answer `Unimplemented` until then.

use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use vmcri_proto::agent::v1 as pb;
use vmcri_proto::agent::v1::agent_server::Agent;
use vmcri_proto::AGENT_API_VERSION;

/// Largest probe the host may ask for.
pub const MAX_PROBE_BYTES: u64 = 1 << 30;
/// Largest probe chunk.
pub const MAX_PROBE_CHUNK: u32 = 1 << 20;
const DEFAULT_PROBE_CHUNK: u32 = 64 * 1024;

/// The agent's state.
pub struct AgentService {
    shutdown: Arc<Notify>,
}

impl AgentService {
    /// A service whose Shutdown RPC notifies `shutdown`.
    pub fn new(shutdown: Arc<Notify>) -> Self {
        AgentService { shutdown }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "vmcri-agent {}: {rpc} is not implemented yet (the container engine arrives with the CRI daemon)",
        env!("CARGO_PKG_VERSION")
    ))
}

fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn memory_bytes() -> u64 {
    // SAFETY: sysinfo is plain data; sysinfo(2) fills it.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return 0;
    }
    (si.totalram as u64).saturating_mul(u64::from(si.mem_unit))
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
        // SAFETY: sysconf with a constant name.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0) as u32;
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
                let n = left.min(u64::from(chunk)) as usize;
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
        _: Request<pb::UpdateInterfacesRequest>,
    ) -> Result<Response<pb::UpdateInterfacesResponse>, Status> {
        Err(not_yet("UpdateInterfaces"))
    }

    async fn create_container(
        &self,
        _: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        Err(not_yet("CreateContainer"))
    }

    async fn start_container(
        &self,
        _: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        Err(not_yet("StartContainer"))
    }

    async fn remove_container(
        &self,
        _: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        Err(not_yet("RemoveContainer"))
    }

    async fn update_container_resources(
        &self,
        _: Request<pb::UpdateResourcesRequest>,
    ) -> Result<Response<pb::UpdateResourcesResponse>, Status> {
        Err(not_yet("UpdateContainerResources"))
    }

    async fn exec_process(
        &self,
        _: Request<pb::ExecProcessRequest>,
    ) -> Result<Response<pb::ExecProcessResponse>, Status> {
        Err(not_yet("ExecProcess"))
    }

    async fn signal_process(
        &self,
        _: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        Err(not_yet("SignalProcess"))
    }

    async fn wait_process(
        &self,
        _: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        Err(not_yet("WaitProcess"))
    }

    async fn write_stdin(
        &self,
        _: Request<Streaming<pb::StdinChunk>>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        Err(not_yet("WriteStdin"))
    }

    type ReadOutputStream = BoxStream<pb::OutputChunk>;

    async fn read_output(
        &self,
        _: Request<pb::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        Err(not_yet("ReadOutput"))
    }

    async fn resize_tty(
        &self,
        _: Request<pb::ResizeTtyRequest>,
    ) -> Result<Response<pb::ResizeTtyResponse>, Status> {
        Err(not_yet("ResizeTty"))
    }

    async fn container_stats(
        &self,
        _: Request<pb::ContainerStatsRequest>,
    ) -> Result<Response<pb::ContainerStatsResponse>, Status> {
        Err(not_yet("ContainerStats"))
    }

    async fn sandbox_stats(
        &self,
        _: Request<pb::SandboxStatsRequest>,
    ) -> Result<Response<pb::SandboxStatsResponse>, Status> {
        Err(not_yet("SandboxStats"))
    }

    type PortForwardStream = BoxStream<pb::ForwardChunk>;

    async fn port_forward(
        &self,
        _: Request<Streaming<pb::ForwardChunk>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Err(not_yet("PortForward"))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        tracing::info!("shutdown requested");
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
