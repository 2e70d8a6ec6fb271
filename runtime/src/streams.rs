//! The daemon's side of the streaming server: exec, attach and
//! port-forward carried by the pod's agent, so every byte goes through the
//! sandbox boundary (the VM), never the host's namespaces. Exec and
//! port-forward, whose pace a remote client sets, each get a connection of
//! their own; attach reads the log copier's output and only writes to the
//! agent, on the sandbox's channel.

use crate::container::{pref, ContainerError, Containers};
use crate::id::new_id;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::StreamExt;
use vmcri_proto::agent::v1 as pb;
use vmcri_streaming::{
    AttachRequest, BoxFuture, ExecRequest, Forward, Handler, Io, Outcome, TermSize,
};

/// Runs streams through the agents of `containers`' sandboxes.
pub struct StreamHandler {
    containers: Arc<Containers>,
}

impl StreamHandler {
    /// A handler for `containers`.
    pub fn new(containers: Arc<Containers>) -> StreamHandler {
        StreamHandler { containers }
    }
}

fn outcome(r: Result<i32, ContainerError>) -> Outcome {
    match r {
        Ok(code) => Outcome::Exited(code),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Forwards resize events to the process's terminal.
fn forward_resizes(
    agent: vmcri_agent_client::Agent,
    process: pb::ProcessRef,
    mut sizes: tokio::sync::mpsc::Receiver<TermSize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(s) = sizes.recv().await {
            if let Err(e) = agent.resize(process.clone(), s.height, s.width).await {
                tracing::debug!(container_id = %process.container_id, error = %e, "resize");
            }
        }
    })
}

/// Sends a chunk of output to the client's stdout or stderr, as it came,
/// unless the client did not ask for that stream or is gone.
async fn deliver(io: &Io, chunk: pb::OutputChunk) {
    let stream = if chunk.stream == pb::output_chunk::Stream::Stderr as i32 {
        &io.stderr
    } else {
        &io.stdout
    };
    if let Some(tx) = stream {
        let _ = tx.send(Bytes::from(chunk.data)).await;
    }
}

async fn exec(
    containers: Arc<Containers>,
    req: ExecRequest,
    mut io: Io,
) -> Result<i32, ContainerError> {
    let (rec, agent) = containers.running_for_stream(&req.container_id).await?;
    let exec_id = new_id()[..16].to_string();
    agent
        .exec_process(pb::ExecProcessRequest {
            container_id: rec.id.clone(),
            exec_id: exec_id.clone(),
            args: req.cmd,
            env: Vec::new(),
            cwd: String::new(),
            tty: req.tty,
            stdin: io.stdin.is_some(),
        })
        .await?;
    tracing::info!(container_id = %rec.id, exec_id, tty = req.tty, "streaming exec started");
    let process = pref(&rec.id, &exec_id);
    let stdin = io.stdin.take().map(|rx| {
        let (agent, process) = (agent.clone(), process.clone());
        tokio::spawn(async move { agent.write_stdin(process, rx, true).await })
    });
    let resize = io
        .resize
        .take()
        .map(|rx| forward_resizes(agent.clone(), process.clone(), rx));
    let mut output = agent.read_output(process.clone(), 0).await?;
    while let Some(chunk) = output.next().await {
        let Ok(chunk) = chunk else { break };
        deliver(&io, chunk).await;
    }
    let ended = agent.wait(process).await;
    if let Some(t) = resize {
        t.abort();
    }
    if let Some(t) = stdin {
        t.abort();
    }
    let code = ended?.exit_code;
    tracing::info!(container_id = %rec.id, exec_id, exit_code = code, "streaming exec ended");
    Ok(code)
}

async fn attach(
    containers: Arc<Containers>,
    req: AttachRequest,
    mut io: Io,
) -> Result<i32, ContainerError> {
    let (rec, agent, mut output, mut exited) = containers.attach(&req.container_id).await?;
    let process = pref(&rec.id, "");
    // The container's stdin outlives this client unless it asked for
    // stdin_once; closing it is then the first client's EOF.
    let stdin = match io.stdin.take() {
        Some(rx) if rec.stdin => {
            let (agent, process, once) = (agent.clone(), process.clone(), rec.stdin_once);
            Some(tokio::spawn(async move {
                agent.write_stdin(process, rx, once).await
            }))
        }
        _ => None,
    };
    let resize = match io.resize.take() {
        Some(rx) if rec.tty => Some(forward_resizes(agent.clone(), process, rx)),
        _ => None,
    };
    tracing::info!(container_id = %rec.id, "attached");
    loop {
        tokio::select! {
            chunk = output.recv() => match chunk {
                Ok(c) => deliver(&io, c).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(container_id = %rec.id, chunks = n, "an attached client fell behind and lost output (the log has it)");
                }
                Err(RecvError::Closed) => break,
            },
            _ = async { let _ = exited.wait_for(|e| *e).await; } => {
                // Hand over what was copied before the exit was recorded.
                while let Ok(c) = output.try_recv() {
                    deliver(&io, c).await;
                }
                break;
            }
        }
    }
    if let Some(t) = resize {
        t.abort();
    }
    if let Some(t) = stdin {
        t.abort();
    }
    // As containerd: an attach that saw the container end succeeded; the
    // exit code is in ContainerStatus.
    Ok(0)
}

async fn port_forward(
    containers: Arc<Containers>,
    sandbox_id: String,
    conn: Forward,
) -> Result<(), String> {
    let (sandbox, agent) = containers
        .sandbox_agent_for_stream(&sandbox_id)
        .await
        .map_err(|e| e.to_string())?;
    let mut back = agent
        .port_forward(conn.port, conn.incoming)
        .await
        .map_err(|e| match e {
            vmcri_agent_client::ClientError::Rpc { status, .. } => status.message().to_string(),
            other => other.to_string(),
        })?;
    tracing::debug!(sandbox_id = %sandbox.record.id, port = conn.port, "forwarding");
    while let Some(m) = back.next().await {
        let chunk = m.map_err(|s| s.message().to_string())?;
        if !chunk.data.is_empty() && conn.outgoing.send(Bytes::from(chunk.data)).await.is_err() {
            break;
        }
        if chunk.eof {
            break;
        }
    }
    Ok(())
}

impl Handler for StreamHandler {
    fn exec(&self, req: ExecRequest, io: Io) -> BoxFuture<Outcome> {
        let containers = self.containers.clone();
        Box::pin(async move { outcome(exec(containers, req, io).await) })
    }

    fn attach(&self, req: AttachRequest, io: Io) -> BoxFuture<Outcome> {
        let containers = self.containers.clone();
        Box::pin(async move { outcome(attach(containers, req, io).await) })
    }

    fn port_forward(&self, sandbox_id: String, conn: Forward) -> BoxFuture<Result<(), String>> {
        let containers = self.containers.clone();
        Box::pin(port_forward(containers, sandbox_id, conn))
    }
}
