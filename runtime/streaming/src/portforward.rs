//! Port forwarding streams (`portforward.k8s.io`).
//!
//! Over SPDY the client opens two streams per connection, `error` and
//! `data`, with the same `requestID` and `port` headers; many connections
//! share one SPDY connection. Over WebSocket the ports come in the URL's
//! `port` parameters; port i uses channel 2i for data and 2i+1 for
//! errors, and the server starts each channel with the port number
//! (two bytes, little-endian).

use crate::session::{Connection, Incoming, StreamOut};
use crate::websocket::WsConn;
use crate::{Forward, Handler, PortForwardRequest};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Chunks buffered towards the client per connection.
const OUT_CHUNKS: usize = 16;

/// A port header, or why it is unusable.
pub fn parse_port(text: &str, req: &PortForwardRequest) -> Result<u16, String> {
    let port: u16 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid port {text:?}: want 1-65535"))?;
    if !req.ports.is_empty() && !req.ports.contains(&port) {
        return Err(format!(
            "port {port} was not among the ports this URL was issued for"
        ));
    }
    Ok(port)
}

/// Runs one forwarded connection: the handler's bytes go to `data`, its
/// error (if any) to `error`; both end when it does.
async fn forward(
    handler: Arc<dyn Handler>,
    sandbox_id: String,
    port: u16,
    incoming: mpsc::Receiver<Bytes>,
    data: impl DataOut,
    error: impl DataOut,
) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(OUT_CHUNKS);
    let conn = Forward {
        port,
        incoming,
        outgoing: tx,
    };
    let run = handler.port_forward(sandbox_id.clone(), conn);
    let copy = async {
        while let Some(b) = rx.recv().await {
            if !data.write(b).await {
                while rx.recv().await.is_some() {}
                break;
            }
        }
    };
    let (result, ()) = tokio::join!(run, copy);
    if let Err(e) = result {
        let msg = format!("error forwarding port {port} to pod {sandbox_id}: {e}");
        tracing::info!(sandbox_id, port, error = %e, "port forward failed");
        error.write(Bytes::from(msg)).await;
    }
    data.finish().await;
    error.finish().await;
}

/// Where a forwarded connection's bytes (or error) go.
pub trait DataOut: Send + Sync {
    /// Sends; false once the client is gone.
    fn write(&self, b: Bytes) -> impl std::future::Future<Output = bool> + Send;
    /// Ends the stream.
    fn finish(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl DataOut for StreamOut {
    async fn write(&self, b: Bytes) -> bool {
        StreamOut::write(self, b).await
    }
    async fn finish(&self) {
        StreamOut::finish(self).await
    }
}

impl DataOut for crate::websocket::ChannelOut {
    async fn write(&self, b: Bytes) -> bool {
        crate::websocket::ChannelOut::write(self, &b).await
    }
    async fn finish(&self) {}
}

/// The streams of one request ID, as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<Incoming>,
    data: Option<Incoming>,
    since: Option<tokio::time::Instant>,
}

/// Serves port forwarding on a SPDY connection until the client leaves.
pub async fn serve_spdy(
    mut conn: Connection,
    req: PortForwardRequest,
    handler: Arc<dyn Handler>,
    creation_timeout: Duration,
) {
    let mut pending: HashMap<String, Pair> = HashMap::new();
    let mut running = JoinSet::new();
    let mut sweep = tokio::time::interval(creation_timeout.max(Duration::from_millis(100)) / 2);
    loop {
        let s = tokio::select! {
            s = conn.streams.recv() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sweep.tick() => {
                // A pair whose other half never came: reset what we hold.
                let now = tokio::time::Instant::now();
                let stale: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| now.duration_since(t) >= creation_timeout))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in stale {
                    if let Some(p) = pending.remove(&k) {
                        for s in [p.error, p.data].into_iter().flatten() {
                            conn.stream(s.id).reset(crate::spdy::rst::CANCEL).await;
                        }
                    }
                }
                continue;
            }
            Some(_) = running.join_next(), if !running.is_empty() => continue,
        };
        let kind = s.header("streamtype").unwrap_or_default().to_string();
        let port = s.header("port").map(|p| parse_port(p, &req));
        let request_id = s.header("requestid").map(str::to_string);
        let (Some(Ok(port)), Some(request_id)) = (port, request_id) else {
            tracing::warn!(
                stream_id = s.id,
                "port-forward stream without a valid port or requestID"
            );
            conn.stream(s.id)
                .reset(crate::spdy::rst::PROTOCOL_ERROR)
                .await;
            continue;
        };
        let pair = pending.entry(request_id.clone()).or_default();
        let slot = match kind.as_str() {
            "error" => &mut pair.error,
            "data" => &mut pair.data,
            _ => {
                conn.stream(s.id)
                    .reset(crate::spdy::rst::PROTOCOL_ERROR)
                    .await;
                continue;
            }
        };
        conn.claim(slot, s).await;
        pair.since.get_or_insert_with(tokio::time::Instant::now);
        if pair.error.is_some() && pair.data.is_some() {
            let Some(Pair {
                error: Some(error),
                data: Some(data),
                ..
            }) = pending.remove(&request_id)
            else {
                continue;
            };
            let data_out = conn.stream(data.id);
            let error_out = conn.stream(error.id);
            running.spawn(forward(
                handler.clone(),
                req.sandbox_id.clone(),
                port,
                data.data,
                data_out,
                error_out,
            ));
        }
    }
    // The client left: its connections end with it.
    running.shutdown().await;
    conn.close().await;
}

/// Serves port forwarding of `ports` on a WebSocket.
pub async fn serve_ws(
    mut conn: WsConn,
    req: PortForwardRequest,
    ports: Vec<u16>,
    handler: Arc<dyn Handler>,
) {
    let mut inputs = Vec::new();
    let mut running = JoinSet::new();
    for (i, port) in ports.iter().enumerate() {
        // Two channels a port, numbered in one byte: at most 128 ports
        // (the server allows far fewer).
        let (Ok(data_ch), Ok(err_ch)) = (u8::try_from(2 * i), u8::try_from(2 * i + 1)) else {
            return;
        };
        let data = conn.channel(data_ch);
        let error = conn.channel(err_ch);
        let prefix = port.to_le_bytes();
        if !data.write(&prefix).await || !error.write(&prefix).await {
            return;
        }
        let (tx, rx) = mpsc::channel(OUT_CHUNKS);
        inputs.push(Some(tx));
        running.spawn(forward(
            handler.clone(),
            req.sandbox_id.clone(),
            *port,
            rx,
            data,
            error,
        ));
    }
    let mut gone = conn.gone();
    loop {
        tokio::select! {
            m = conn.incoming.recv() => match m {
                Some((ch, data)) => {
                    if ch % 2 == 0 {
                        if let Some(Some(tx)) = inputs.get(usize::from(ch / 2)) {
                            let _ = tx.send(data).await;
                        }
                    }
                }
                // The client left (or broke the protocol): stop forwarding.
                None => break,
            },
            r = running.join_next() => match r {
                Some(_) => continue,
                // Every connection ended.
                None => break,
            },
            _ = async { let _ = gone.wait_for(|g| *g).await; } => break,
        }
    }
    running.shutdown().await;
    conn.close().await;
}

/// Channels a port-forward client may write: the data channels of `n`
/// ports (their error channels are the server's).
pub fn client_channel(n: usize) -> impl Fn(u8) -> bool + Send + 'static {
    move |ch| ch % 2 == 0 && usize::from(ch / 2) < n
}
