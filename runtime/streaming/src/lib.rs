//! The streaming server behind CRI Exec, Attach and PortForward.
//!
//! The CRI calls return a one-time URL ([`Server::url`]); kubelet (or
//! crictl) connects to it and upgrades to SPDY/3.1 or WebSocket with the
//! Kubernetes subprotocols: `v4.channel.k8s.io`/`v5.channel.k8s.io` for
//! exec and attach, `portforward.k8s.io` for port-forward. The streams are
//! handed to a [`Handler`], which the daemon implements with the guest
//! agent's RPCs.

mod idle;
mod portforward;
mod remotecommand;
mod server;
mod session;
pub mod spdy;
mod tokens;
mod websocket;

pub use server::{Config, Server};
pub use tokens::TokenError;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;

/// A task aborted when this handle drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits up to `after` for `task` to end, then aborts it.
async fn join_or_abort(mut task: tokio::task::JoinHandle<()>, after: std::time::Duration) {
    if tokio::time::timeout(after, &mut task).await.is_err() {
        task.abort();
    }
}

/// A boxed future, as [`Handler`] methods return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What an Exec URL runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The container.
    pub container_id: String,
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// On a terminal (stdout and stderr merged; resize events).
    pub tty: bool,
    /// The client sends stdin.
    pub stdin: bool,
    /// The client wants stdout.
    pub stdout: bool,
    /// The client wants stderr (never with `tty`).
    pub stderr: bool,
}

/// What an Attach URL attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The container.
    pub container_id: String,
    /// The container runs on a terminal.
    pub tty: bool,
    /// The client sends stdin.
    pub stdin: bool,
    /// The client wants stdout.
    pub stdout: bool,
    /// The client wants stderr (never with `tty`).
    pub stderr: bool,
}

/// What a PortForward URL reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardRequest {
    /// The pod sandbox.
    pub sandbox_id: String,
    /// Ports the client may forward to; empty allows any (SPDY clients
    /// name ports per stream).
    pub ports: Vec<u16>,
}

/// A request a URL was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Exec.
    Exec(ExecRequest),
    /// Attach.
    Attach(AttachRequest),
    /// PortForward.
    PortForward(PortForwardRequest),
}

impl Request {
    /// The URL path segment of its kind.
    fn kind(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::Attach(_) => "attach",
            Request::PortForward(_) => "portforward",
        }
    }
}

/// A terminal size, as the resize stream sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TermSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The client's streams of an exec or attach. A `None` stream was not
/// requested. Input channels close at the client's EOF; dropping an output
/// sender ends that stream for the client.
#[derive(Debug, Default)]
pub struct Io {
    /// Standard input.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Standard output (the terminal's output with a TTY).
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Standard error.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal size changes.
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// One forwarded connection: bytes from the client, and a sender for
/// bytes to it (dropping it ends the client's stream).
#[derive(Debug)]
pub struct Forward {
    /// The port inside the pod.
    pub port: u16,
    /// Bytes from the client; closes at its EOF.
    pub incoming: mpsc::Receiver<Bytes>,
    /// Bytes to the client.
    pub outgoing: mpsc::Sender<Bytes>,
}

/// How an exec ended, for the client's error stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code.
    Exited(i32),
    /// It could not run, or the runtime failed: the message says why.
    Failed(String),
}

/// The daemon's side: runs what the streams are for.
pub trait Handler: Send + Sync + 'static {
    /// Runs an exec with the client's streams until the process exits.
    fn exec(&self, req: ExecRequest, io: Io) -> BoxFuture<Outcome>;
    /// Attaches the client's streams to a running container until it exits
    /// (`Exited` with its code) or the client leaves (the future is
    /// dropped).
    fn attach(&self, req: AttachRequest, io: Io) -> BoxFuture<Outcome>;
    /// Forwards one connection to `port` in sandbox `sandbox_id` until
    /// either side ends it; `Err` is shown to the client.
    fn port_forward(&self, sandbox_id: String, conn: Forward) -> BoxFuture<Result<(), String>>;
}
