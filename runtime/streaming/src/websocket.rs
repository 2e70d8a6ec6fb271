//! The Kubernetes channel protocol over WebSocket (`v4.channel.k8s.io`,
//! `v5.channel.k8s.io`, and port-forward): every binary message starts with
//! its channel number. A message the protocol does not allow (text, empty,
//! an unknown channel) closes that connection with a reason, and nothing
//! else.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest message or frame accepted from a client.
pub const MAX_MESSAGE: usize = 1 << 20;

/// tungstenite's settings for our connections.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// A WebSocket connection speaking the channel protocol.
pub struct WsConn {
    /// (channel, payload) of each client message; ends when the client
    /// leaves or broke the protocol.
    pub incoming: mpsc::Receiver<(u8, Bytes)>,
    out: mpsc::Sender<Message>,
    gone: watch::Receiver<bool>,
    reader: crate::AbortOnDrop,
    writer: JoinHandle<()>,
}

/// The sending side of one channel.
#[derive(Clone)]
pub struct ChannelOut {
    channel: u8,
    out: mpsc::Sender<Message>,
}

impl ChannelOut {
    /// Sends `data` on the channel; false once the connection is gone.
    pub async fn write(&self, data: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.push(self.channel);
        msg.extend_from_slice(data);
        self.out.send(Message::Binary(msg.into())).await.is_ok()
    }

    /// Closes the whole connection: the client broke the protocol.
    pub async fn close(&self, reason: &str) {
        close_with(&self.out, CloseCode::Unsupported, reason).await;
    }
}

/// Sends a close frame with `reason` through `out`.
async fn close_with(out: &mpsc::Sender<Message>, code: CloseCode, reason: &str) {
    let _ = out
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        })))
        .await;
}

impl WsConn {
    /// Serves the channel protocol on `ws`; client messages on channels
    /// `allowed` refuses close the connection.
    pub fn start<IO>(
        ws: WebSocketStream<IO>,
        allowed: impl Fn(u8) -> bool + Send + 'static,
    ) -> WsConn
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::channel::<Message>(64);
        let (in_tx, incoming) = mpsc::channel(16);
        let (gone_tx, gone) = watch::channel(false);
        let mut left = gone.clone();
        // Writes until every sender is gone or the client is (it left, or
        // the connection went idle); what is queued still goes out.
        let writer = tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = out_rx.recv() => m,
                    _ = async { let _ = left.wait_for(|g| *g).await; } => out_rx.try_recv().ok(),
                };
                let Some(m) = m else { break };
                let closing = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || closing {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let reader = tokio::spawn({
            let out = out.clone();
            async move {
                while let Some(msg) = stream.next().await {
                    let bad = match msg {
                        Ok(Message::Binary(b)) => match b.first() {
                            None => Some("an empty message names no channel"),
                            Some(&ch) if !allowed(ch) => {
                                Some("a message on a channel the client may not write")
                            }
                            Some(&ch) => {
                                if in_tx.send((ch, b.slice(1..))).await.is_err() {
                                    // Nobody reads any more; keep draining
                                    // so close frames are still seen.
                                }
                                None
                            }
                        },
                        Ok(Message::Text(_)) => {
                            Some("text messages are not part of the binary channel protocol")
                        }
                        Ok(Message::Close(_)) => break,
                        Ok(_) => None,
                        Err(e) => {
                            tracing::debug!(error = %e, "WebSocket read");
                            break;
                        }
                    };
                    if let Some(reason) = bad {
                        tracing::warn!(reason, "closing a WebSocket that broke the protocol");
                        close_with(&out, CloseCode::Unsupported, reason).await;
                        break;
                    }
                }
                gone_tx.send_replace(true);
            }
        });
        WsConn {
            incoming,
            out,
            gone,
            reader: crate::AbortOnDrop(reader),
            writer,
        }
    }

    /// The sending side of `channel`.
    pub fn channel(&self, channel: u8) -> ChannelOut {
        ChannelOut {
            channel,
            out: self.out.clone(),
        }
    }

    /// A receiver that turns true once the client has left.
    pub fn gone(&self) -> watch::Receiver<bool> {
        self.gone.clone()
    }

    /// Sends what is queued, then a normal close.
    pub async fn close(self) {
        close_with(&self.out, CloseCode::Normal, "").await;
        drop(self.out);
        crate::join_or_abort(self.writer, Duration::from_secs(5)).await;
        // Give the client a moment to answer the close, then stop reading.
        let mut reader = self.reader;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader.0).await;
    }
}
