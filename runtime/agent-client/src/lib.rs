//! Host-side client of `vmcri-agent`: dials the VM's hybrid-vsock socket
//! (or the agent's Unix socket in the `process` backend), waits for the
//! agent to come up within a deadline, and wraps every call in a
//! deadline. Replies are bounded in size; the guest is not trusted.

use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use vmcri_proto::agent::v1 as pb;
use vmcri_proto::agent::v1::agent_client::AgentClient;
use vmcri_proto::{AGENT_API_VERSION, AGENT_VSOCK_PORT};

pub mod output;

pub use output::{OutputStream, MAX_OUTPUT_CHUNK};
/// gRPC status codes, re-exported for callers matching on errors.
pub use tonic::Code;

/// Longest `OK <port>` line accepted from the VMM.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Largest reply decoded from the guest.
pub const MAX_REPLY: usize = 4 << 20;

/// How to reach an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// Through the VMM's hybrid-vsock socket, to a guest port.
    HybridVsock {
        /// The VM's `vsock.sock`.
        uds: PathBuf,
        /// Guest port (the agent's is [`AGENT_VSOCK_PORT`]).
        port: u32,
    },
    /// A Unix socket the agent listens on directly.
    Unix(PathBuf),
}

impl AgentAddr {
    /// The agent of the VM whose hybrid-vsock socket is `uds`.
    pub fn vm(uds: impl Into<PathBuf>) -> Self {
        AgentAddr::HybridVsock {
            uds: uds.into(),
            port: AGENT_VSOCK_PORT,
        }
    }
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::HybridVsock { uds, port } => {
                write!(f, "vsock port {port} via {}", uds.display())
            }
            AgentAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Errors talking to the agent.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("connecting to the agent at {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The VMM refused the vsock handshake or answered garbage.
    #[error("hybrid vsock handshake: {0}")]
    Handshake(String),
    /// The agent was not up by the deadline.
    #[error("the agent at {addr} did not answer within {waited:?}: {last}")]
    NotReady {
        /// Where.
        addr: String,
        /// How long we waited.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// A call took longer than its deadline.
    #[error("agent call {call} timed out after {after:?}")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// Its deadline.
        after: Duration,
    },
    /// The agent answered with an error.
    #[error("agent call {call}: {status}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// What the agent (or transport) said.
        status: tonic::Status,
    },
    /// The agent's answer makes no sense.
    #[error("agent call {call}: invalid reply: {why}")]
    InvalidReply {
        /// The RPC.
        call: &'static str,
        /// What was wrong.
        why: String,
    },
}

/// Opens a byte stream to the agent's address, doing the hybrid-vsock
/// handshake when needed.
pub async fn dial(addr: &AgentAddr) -> Result<UnixStream, ClientError> {
    let connect_err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    match addr {
        AgentAddr::Unix(path) => UnixStream::connect(path).await.map_err(connect_err),
        AgentAddr::HybridVsock { uds, port } => {
            let mut stream = UnixStream::connect(uds).await.map_err(connect_err)?;
            stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(connect_err)?;
            // Byte by byte: the agent's first HTTP/2 frame may follow the
            // newline at once and must stay in the stream.
            let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
            loop {
                let b = stream.read_u8().await.map_err(|e| {
                    ClientError::Handshake(format!(
                        "connection closed before OK (guest port {port} not listening?): {e}"
                    ))
                })?;
                if b == b'\n' {
                    break;
                }
                line.push(b);
                if line.len() >= MAX_HANDSHAKE_LINE {
                    return Err(ClientError::Handshake("reply line too long".into()));
                }
            }
            parse_ok(&line)?;
            Ok(stream)
        }
    }
}

/// Checks an `OK <port>` reply (without its newline).
pub fn parse_ok(line: &[u8]) -> Result<u32, ClientError> {
    let text = String::from_utf8_lossy(line);
    text.strip_prefix("OK ")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| ClientError::Handshake(format!("expected 'OK <port>', got {text:?}")))
}

/// A connected agent.
#[derive(Debug, Clone)]
pub struct Agent {
    client: AgentClient<Channel>,
    call_timeout: Duration,
}

async fn deadline<T>(
    call: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(after, fut).await {
        Err(_) => Err(ClientError::Timeout { call, after }),
        Ok(Err(status)) => Err(ClientError::Rpc { call, status }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

impl Agent {
    /// Connects to the agent at `addr`, retrying until it answers Health
    /// or `ready_within` passes. `call_timeout` bounds every later call.
    pub async fn connect(
        addr: AgentAddr,
        ready_within: Duration,
        call_timeout: Duration,
    ) -> Result<Agent, ClientError> {
        let start = tokio::time::Instant::now();
        let mut last = String::from("no attempt made");
        while start.elapsed() < ready_within {
            match Self::connect_once(addr.clone(), call_timeout).await {
                Ok(agent) => match agent.health().await {
                    Ok(()) => return Ok(agent),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ClientError::NotReady {
            addr: addr.to_string(),
            waited: ready_within,
            last,
        })
    }

    async fn connect_once(addr: AgentAddr, call_timeout: Duration) -> Result<Agent, ClientError> {
        let endpoint = Endpoint::from_static("http://vmcri-agent")
            // No endpoint-wide timeout: waits and output streams last as
            // long as the process; unary calls get `deadline` instead.
            .connect_timeout(call_timeout);
        let target = addr.clone();
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let target = target.clone();
                async move {
                    dial(&target)
                        .await
                        .map(TokioIo::new)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                }
            }))
            .await
            .map_err(|e| ClientError::Connect {
                addr: addr.to_string(),
                source: std::io::Error::other(e),
            })?;
        let client = AgentClient::new(channel).max_decoding_message_size(MAX_REPLY);
        Ok(Agent {
            client,
            call_timeout,
        })
    }

    /// Liveness: Ok when the agent says it is serving.
    pub async fn health(&self) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let r = deadline("Health", self.call_timeout, c.health(pb::HealthRequest {})).await?;
        if r.status != pb::health_response::Status::Serving as i32 {
            return Err(ClientError::InvalidReply {
                call: "Health",
                why: format!("status {}", r.status),
            });
        }
        Ok(())
    }

    /// Guest information; refuses an agent speaking another API version.
    pub async fn guest_info(&self) -> Result<pb::GuestInfo, ClientError> {
        let mut c = self.client.clone();
        let info = deadline(
            "GetGuestInfo",
            self.call_timeout,
            c.get_guest_info(pb::GuestInfoRequest {}),
        )
        .await?;
        if info.api_version != AGENT_API_VERSION {
            return Err(ClientError::InvalidReply {
                call: "GetGuestInfo",
                why: format!(
                    "agent speaks API v{}, we speak v{AGENT_API_VERSION}",
                    info.api_version
                ),
            });
        }
        Ok(info)
    }

    /// Streams `bytes` bytes from the agent and returns how many arrived;
    /// the whole transfer must finish within `within`.
    pub async fn probe(
        &self,
        bytes: u64,
        chunk_size: u32,
        within: Duration,
    ) -> Result<u64, ClientError> {
        let mut c = self.client.clone();
        let transfer = async move {
            let mut stream = c
                .stream_probe(pb::ProbeRequest { bytes, chunk_size })
                .await
                .map_err(|status| ClientError::Rpc {
                    call: "StreamProbe",
                    status,
                })?
                .into_inner();
            let mut got = 0u64;
            while let Some(chunk) = stream.message().await.map_err(|status| ClientError::Rpc {
                call: "StreamProbe",
                status,
            })? {
                got += chunk.data.len() as u64;
                if got > bytes {
                    return Err(ClientError::InvalidReply {
                        call: "StreamProbe",
                        why: format!("agent sent more than the {bytes} bytes asked"),
                    });
                }
            }
            Ok(got)
        };
        tokio::time::timeout(within, transfer)
            .await
            .map_err(|_| ClientError::Timeout {
                call: "StreamProbe",
                after: within,
            })?
    }

    /// Creates a container from an OCI spec; returns its init PID.
    pub async fn create_container(
        &self,
        req: pb::CreateContainerRequest,
    ) -> Result<u32, ClientError> {
        let mut c = self.client.clone();
        let r = deadline(
            "CreateContainer",
            self.call_timeout,
            c.create_container(req),
        )
        .await?;
        Ok(r.pid)
    }

    /// Starts a created container.
    pub async fn start_container(&self, id: &str) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::StartContainerRequest {
            container_id: id.to_string(),
        };
        deadline("StartContainer", self.call_timeout, c.start_container(req)).await?;
        Ok(())
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and deletes a container.
    pub async fn remove_container(&self, id: &str, grace: Duration) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::RemoveContainerRequest {
            container_id: id.to_string(),
            timeout_secs: u32::try_from(grace.as_secs()).unwrap_or(u32::MAX),
        };
        deadline(
            "RemoveContainer",
            self.call_timeout + grace,
            c.remove_container(req),
        )
        .await?;
        Ok(())
    }

    /// Starts a process in a running container; returns its PID.
    pub async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<u32, ClientError> {
        let mut c = self.client.clone();
        let r = deadline("ExecProcess", self.call_timeout, c.exec_process(req)).await?;
        Ok(r.pid)
    }

    /// Sends a signal to a process.
    pub async fn signal(&self, process: pb::ProcessRef, signal: u32) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::SignalProcessRequest {
            process: Some(process),
            signal,
        };
        deadline("SignalProcess", self.call_timeout, c.signal_process(req)).await?;
        Ok(())
    }

    /// Waits for a process to end, however long that takes.
    pub async fn wait(
        &self,
        process: pb::ProcessRef,
    ) -> Result<pb::WaitProcessResponse, ClientError> {
        let mut c = self.client.clone();
        let req = pb::WaitProcessRequest {
            process: Some(process),
        };
        c.wait_process(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| ClientError::Rpc {
                call: "WaitProcess",
                status,
            })
    }

    /// The process's output from `from_offset` on (what the caller has
    /// saved so far); ends when the process's stdout and stderr are closed.
    pub async fn read_output(
        &self,
        process: pb::ProcessRef,
        from_offset: u64,
    ) -> Result<OutputStream, ClientError> {
        let mut c = self.client.clone();
        let req = pb::ReadOutputRequest {
            process: Some(process),
            from_offset,
        };
        deadline("ReadOutput", self.call_timeout, c.read_output(req))
            .await
            .map(OutputStream::new)
    }

    /// Cgroup statistics of the given containers (all when empty).
    pub async fn container_stats(
        &self,
        ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, pb::CgroupStats>, ClientError> {
        let mut c = self.client.clone();
        let req = pb::ContainerStatsRequest { container_ids: ids };
        Ok(
            deadline("ContainerStats", self.call_timeout, c.container_stats(req))
                .await?
                .stats,
        )
    }

    /// Applies new cgroup limits to a running container.
    pub async fn update_resources(
        &self,
        id: &str,
        resources: pb::Resources,
    ) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::UpdateResourcesRequest {
            container_id: id.to_string(),
            resources: Some(resources),
        };
        deadline(
            "UpdateContainerResources",
            self.call_timeout,
            c.update_container_resources(req),
        )
        .await?;
        Ok(())
    }

    /// Gives the guest's NICs their names, MTUs and addresses, and adds
    /// the routes (the pod network CNI made on the host).
    pub async fn update_interfaces(
        &self,
        interfaces: Vec<pb::Interface>,
        routes: Vec<pb::Route>,
    ) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::UpdateInterfacesRequest { interfaces, routes };
        deadline(
            "UpdateInterfaces",
            self.call_timeout,
            c.update_interfaces(req),
        )
        .await?;
        Ok(())
    }

    /// Cgroup statistics of all the sandbox's containers together.
    pub async fn sandbox_stats(&self) -> Result<pb::CgroupStats, ClientError> {
        let mut c = self.client.clone();
        let r = deadline(
            "SandboxStats",
            self.call_timeout,
            c.sandbox_stats(pb::SandboxStatsRequest {}),
        )
        .await?;
        Ok(r.stats.unwrap_or_default())
    }

    /// Feeds `data` to the process's stdin until the channel closes; then,
    /// with `close`, closes its stdin. Returns the bytes written.
    pub async fn write_stdin(
        &self,
        process: pb::ProcessRef,
        mut data: tokio::sync::mpsc::Receiver<bytes::Bytes>,
        close: bool,
    ) -> Result<u64, ClientError> {
        let mut c = self.client.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = Some(process);
            while let Some(b) = data.recv().await {
                let chunk = pb::StdinChunk {
                    process: first.take(),
                    data: b.to_vec(),
                    eof: false,
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            if close || first.is_some() {
                let _ = tx
                    .send(pb::StdinChunk {
                        process: first.take(),
                        data: Vec::new(),
                        eof: close,
                    })
                    .await;
            }
        });
        let r = c
            .write_stdin(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|status| ClientError::Rpc {
                call: "WriteStdin",
                status,
            })?;
        Ok(r.into_inner().bytes_written)
    }

    /// Sets the terminal size of a process on a terminal.
    pub async fn resize(
        &self,
        process: pb::ProcessRef,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        let req = pb::ResizeTtyRequest {
            process: Some(process),
            rows: u32::from(rows),
            cols: u32::from(cols),
        };
        deadline("ResizeTty", self.call_timeout, c.resize_tty(req)).await?;
        Ok(())
    }

    /// Opens a connection to TCP `port` on the sandbox's loopback; `data`
    /// goes to it (its end half-closes the connection) and the returned
    /// stream carries what comes back, ending with an EOF chunk.
    pub async fn port_forward(
        &self,
        port: u16,
        mut data: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> Result<tonic::Streaming<pb::ForwardChunk>, ClientError> {
        let mut c = self.client.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = pb::ForwardChunk {
            port: u32::from(port),
            ..Default::default()
        };
        // The agent connects once it has the first message.
        let _ = tx.send(first).await;
        tokio::spawn(async move {
            while let Some(b) = data.recv().await {
                let chunk = pb::ForwardChunk {
                    data: b.to_vec(),
                    ..Default::default()
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(pb::ForwardChunk {
                    eof: true,
                    ..Default::default()
                })
                .await;
        });
        deadline(
            "PortForward",
            self.call_timeout,
            c.port_forward(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
    }

    /// Asks the guest to sync and reboot, which ends the VM.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        let mut c = self.client.clone();
        deadline(
            "Shutdown",
            self.call_timeout,
            c.shutdown(pb::ShutdownRequest {}),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn ok_line_parsing() {
        assert_eq!(parse_ok(b"OK 1073741824").unwrap(), 1073741824);
        for bad in [&b"OK"[..], b"OK x", b"NO 5", b"ok 5", b"OK 99999999999"] {
            assert!(parse_ok(bad).is_err(), "{bad:?}");
        }
    }

    /// A fake VMM socket that answers the handshake with `reply`.
    async fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                // Keep the stream open briefly, then drop.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_garbage_and_overlong_replies_are_errors() {
        let (_d, path) = fake_vmm(b"HELLO\n").await;
        let err = dial(&AgentAddr::vm(&path)).await.unwrap_err();
        assert!(matches!(err, ClientError::Handshake(_)), "{err}");
        let (_d2, path2) = fake_vmm(&[b'O'; 100]).await;
        let err = dial(&AgentAddr::vm(&path2)).await.unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[tokio::test]
    async fn handshake_leaves_following_bytes_in_the_stream() {
        let (_d, path) = fake_vmm(b"OK 1073741824\nPRI").await;
        let mut s = dial(&AgentAddr::vm(&path)).await.unwrap();
        let mut rest = [0u8; 3];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"PRI");
    }

    #[tokio::test]
    async fn unreachable_agent_fails_by_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let addr = AgentAddr::Unix(dir.path().join("nobody.sock"));
        let start = std::time::Instant::now();
        let err = Agent::connect(addr, Duration::from_millis(300), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotReady { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_times_out() {
        // Accepts, completes the handshake, then says nothing at all.
        let (_d, path) = fake_vmm(b"OK 1\n").await;
        let err = Agent::connect(
            AgentAddr::vm(&path),
            Duration::from_millis(500),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::NotReady { .. }), "{err}");
    }
}
