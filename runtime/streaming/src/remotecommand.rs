//! Exec and attach streams (Kubernetes remotecommand, protocols v4 and
//! v5): stdin, stdout, stderr, terminal resize, and the outcome written to
//! the error stream as a Kubernetes `Status` object.
//!
//! Over SPDY each is its own stream, named by its `streamType` header;
//! over WebSocket each is a channel: 0 stdin, 1 stdout, 2 stderr, 3 error,
//! 4 resize, and in v5 a message on channel 255 closes the channel it
//! names (stdin's EOF).

use crate::session::{Connection, StreamOut};
use crate::websocket::{ChannelOut, WsConn};
use crate::{BoxFuture, Io, Outcome, TermSize};
use bytes::Bytes;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Which streams the request asked for.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// stdin.
    pub stdin: bool,
    /// stdout.
    pub stdout: bool,
    /// stderr (ignored with a TTY: the terminal merges it into stdout).
    pub stderr: bool,
    /// A terminal, with resize events.
    pub tty: bool,
}

/// Runs the exec or attach with the streams it gets.
pub type Run = Box<dyn FnOnce(Io) -> BoxFuture<Outcome> + Send>;

/// How long draining output may take once the process is done.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest pending (incomplete) resize message.
const MAX_RESIZE_BYTES: usize = 4096;

/// The outcome as a Kubernetes `Status` (metav1), as kubelet writes it.
pub fn status(outcome: &Outcome) -> Vec<u8> {
    let v = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(msg) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": msg,
            "reason": "InternalError",
            "details": {"causes": [{"message": msg}]},
            "code": 500,
        }),
    };
    v.to_string().into_bytes()
}

/// Decodes the resize stream: JSON objects `{"Width":..,"Height":..}`
/// back to back, possibly split across messages.
#[derive(Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    /// Feeds bytes; returns the sizes completed, or why the stream is bad.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<TermSize>, String> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<TermSize>();
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(s)) => {
                    sizes.push(s);
                    used = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(format!("bad resize event: {e}")),
                None => {
                    used = it.byte_offset();
                    break;
                }
            }
        }
        self.buf.drain(..used);
        if self.buf.len() > MAX_RESIZE_BYTES {
            return Err("resize event too long".into());
        }
        Ok(sizes)
    }
}

/// Where an output stream goes.
#[derive(Clone)]
enum Out {
    Spdy(StreamOut),
    Ws(ChannelOut),
}

impl Out {
    async fn write(&self, data: Bytes) -> bool {
        match self {
            Out::Spdy(s) => s.write(data).await,
            Out::Ws(c) => c.write(&data).await,
        }
    }

    async fn finish(&self) {
        if let Out::Spdy(s) = self {
            s.finish().await;
        }
    }
}

/// A sender feeding `out`, and the task doing it. Once the client is
/// gone the task keeps draining, so the producer never blocks on it.
fn pump(out: Out) -> (mpsc::Sender<Bytes>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let task = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if !out.write(b).await {
                while rx.recv().await.is_some() {}
                return;
            }
        }
        out.finish().await;
    });
    (tx, task)
}

async fn join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, t).await;
    }
}

/// Runs `run` until done, or, when `cancel_on_leave` (attach), until the
/// client leaves; None when the client left first.
async fn run_until(
    run: Run,
    io: Io,
    mut gone: tokio::sync::watch::Receiver<bool>,
    cancel_on_leave: bool,
) -> Option<Outcome> {
    let fut = run(io);
    if !cancel_on_leave {
        return Some(fut.await);
    }
    tokio::select! {
        o = fut => Some(o),
        _ = async { let _ = gone.wait_for(|g| *g).await; } => None,
    }
}

/// Serves an exec or attach on a SPDY connection: waits (up to
/// `creation_timeout`) for the client's streams, runs, reports.
pub async fn serve_spdy(
    mut conn: Connection,
    opts: Opts,
    creation_timeout: Duration,
    run: Run,
    cancel_on_leave: bool,
) {
    let deadline = tokio::time::Instant::now() + creation_timeout;
    let (mut error, mut stdin, mut stdout, mut stderr, mut resize) = (None, None, None, None, None);
    loop {
        let complete = error.is_some()
            && (!opts.stdin || stdin.is_some())
            && (!opts.stdout || stdout.is_some())
            && (!opts.stderr || opts.tty || stderr.is_some())
            && (!opts.tty || resize.is_some());
        if complete {
            break;
        }
        let s = match tokio::time::timeout_at(deadline, conn.streams.recv()).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!("the client did not open its streams in time");
                conn.close().await;
                return;
            }
        };
        let slot = match s.header("streamtype") {
            Some("error") => &mut error,
            Some("stdin") => &mut stdin,
            Some("stdout") => &mut stdout,
            Some("stderr") => &mut stderr,
            Some("resize") => &mut resize,
            other => {
                tracing::warn!(stream_type = ?other, "unexpected SPDY stream type");
                conn.stream(s.id)
                    .reset(crate::spdy::rst::PROTOCOL_ERROR)
                    .await;
                continue;
            }
        };
        conn.claim(slot, s).await;
    }
    let Some(error) = error else { return };
    let mut io = Io::default();
    let mut tasks = Vec::new();
    if opts.stdin {
        io.stdin = stdin.map(|s| s.data);
    }
    if let Some(s) = stdout.filter(|_| opts.stdout) {
        let (tx, t) = pump(Out::Spdy(conn.stream(s.id)));
        io.stdout = Some(tx);
        tasks.push(t);
    }
    if let Some(s) = stderr.filter(|_| opts.stderr && !opts.tty) {
        let (tx, t) = pump(Out::Spdy(conn.stream(s.id)));
        io.stderr = Some(tx);
        tasks.push(t);
    }
    if let Some(mut s) = resize.filter(|_| opts.tty) {
        let (tx, rx) = mpsc::channel(4);
        io.resize = Some(rx);
        let out = conn.stream(s.id);
        tokio::spawn(async move {
            let mut dec = ResizeDecoder::default();
            while let Some(b) = s.data.recv().await {
                match dec.feed(&b) {
                    Ok(sizes) => {
                        for size in sizes {
                            let _ = tx.send(size).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "resetting the resize stream");
                        out.reset(crate::spdy::rst::PROTOCOL_ERROR).await;
                        return;
                    }
                }
            }
        });
    }
    let outcome = run_until(run, io, conn.gone(), cancel_on_leave).await;
    join(tasks).await;
    if let Some(outcome) = outcome {
        let err = conn.stream(error.id);
        err.write(Bytes::from(status(&outcome))).await;
        err.finish().await;
    }
    conn.close().await;
}

/// Serves an exec or attach on a WebSocket (`v5` allows closing stdin).
pub async fn serve_ws(mut conn: WsConn, v5: bool, opts: Opts, run: Run, cancel_on_leave: bool) {
    let mut io = Io::default();
    let mut tasks = Vec::new();
    let (stdin_tx, stdin_rx) = mpsc::channel(16);
    if opts.stdin {
        io.stdin = Some(stdin_rx);
    }
    if opts.stdout {
        let (tx, t) = pump(Out::Ws(conn.channel(1)));
        io.stdout = Some(tx);
        tasks.push(t);
    }
    if opts.stderr && !opts.tty {
        let (tx, t) = pump(Out::Ws(conn.channel(2)));
        io.stderr = Some(tx);
        tasks.push(t);
    }
    let (resize_tx, resize_rx) = mpsc::channel(4);
    if opts.tty {
        io.resize = Some(resize_rx);
    }
    let mut incoming = std::mem::replace(&mut conn.incoming, mpsc::channel(1).1);
    let errors = conn.channel(3);
    tokio::spawn(async move {
        let mut stdin = Some(stdin_tx);
        let mut dec = ResizeDecoder::default();
        while let Some((ch, data)) = incoming.recv().await {
            match ch {
                0 => {
                    if let Some(tx) = &stdin {
                        let _ = tx.send(data).await;
                    }
                }
                4 => match dec.feed(&data) {
                    Ok(sizes) => {
                        for s in sizes {
                            let _ = resize_tx.send(s).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad resize message");
                        errors.close(&e).await;
                        return;
                    }
                },
                255 if v5 && data.first() == Some(&0) => stdin = None,
                _ => {}
            }
        }
    });
    let outcome = run_until(run, io, conn.gone(), cancel_on_leave).await;
    join(tasks).await;
    if let Some(outcome) = outcome {
        conn.channel(3).write(&status(&outcome)).await;
    }
    conn.close().await;
}

/// Channels a client may write for exec and attach.
pub fn client_channel(v5: bool) -> impl Fn(u8) -> bool + Send + 'static {
    move |ch| ch == 0 || ch == 4 || (v5 && ch == 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_events_split_and_joined_decode() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.feed(br#"{"Width":80,"Hei"#).unwrap(), vec![]);
        let got = d.feed(br#"ght":24}{"Width":100,"Height":30}"#).unwrap();
        assert_eq!(
            got,
            vec![
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 100,
                    height: 30
                }
            ]
        );
        assert!(d.feed(b"{\"Width\":\"wide\"}").is_err());
        let mut d = ResizeDecoder::default();
        let mut long = br#"{"Width":"#.to_vec();
        long.extend([b' '; 5000]);
        assert!(d.feed(&long).is_err(), "unbounded pending resize bytes");
    }

    #[test]
    fn outcomes_read_as_kubernetes_status() {
        let ok: serde_json::Value = serde_json::from_slice(&status(&Outcome::Exited(0))).unwrap();
        assert_eq!(ok["status"], "Success");
        let bad: serde_json::Value = serde_json::from_slice(&status(&Outcome::Exited(3))).unwrap();
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
        let failed: serde_json::Value =
            serde_json::from_slice(&status(&Outcome::Failed("no such container".into()))).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["message"], "no such container");
    }
}
