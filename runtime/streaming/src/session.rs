//! A server-side SPDY/3.1 connection, as Kubernetes clients use it: the
//! client opens streams (SYN_STREAM with a `streamtype` header), the
//! server accepts each with SYN_REPLY, and both send DATA until FIN.
//!
//! One task reads frames and routes them to per-stream channels; one task
//! writes the frames every stream queues, in order, through one encoder
//! (header compression is a single zlib stream per direction).
//!
//! Flow control: Go's spdystream, which kubelet and client-go use, neither
//! sends nor honours WINDOW_UPDATE, so this side never waits for window;
//! it still grants window for what it consumed, for clients that count.
//! Backpressure comes from the bounded channels instead: a stream whose
//! consumer is slow stops the reader, and with it the client's writes.

use crate::spdy::{self, Frame, FrameDecoder, FrameEncoder, Headers, SpdyError, StreamDecoder};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Largest frame payload accepted (SPDY allows 16 MiB; clients send 32 KiB).
const MAX_FRAME: usize = 1 << 20;
/// Largest inflated header block.
const MAX_HEADERS: usize = 64 * 1024;
/// Most streams open at once on one connection.
const MAX_STREAMS: usize = 1024;
/// Chunks buffered per inbound stream.
const INBOUND_CHUNKS: usize = 16;
/// Largest DATA frame sent.
const MAX_DATA: usize = 32 * 1024;
/// Window granted back once this much was consumed.
const WINDOW_BATCH: u32 = 32 * 1024;

/// A stream the client opened.
pub struct Incoming {
    /// Its ID.
    pub id: u32,
    /// Its headers (names lowercase).
    pub headers: Headers,
    /// Its data; closes at the client's FIN or RST.
    pub data: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Frame>,
}

impl Incoming {
    /// Accepts the stream (SYN_REPLY). A stream the protocol refuses is
    /// reset instead, never replied to, as kubelet does.
    pub async fn accept(&self) {
        let reply = Frame::SynReply {
            stream_id: self.id,
            fin: false,
            headers: Vec::new(),
        };
        let _ = self.out.send(reply).await;
    }

    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The sending side of one stream.
#[derive(Clone)]
pub struct StreamOut {
    id: u32,
    out: mpsc::Sender<Frame>,
}

impl StreamOut {
    /// Sends `data`; false once the connection is gone.
    pub async fn write(&self, mut data: Bytes) -> bool {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA));
            let frame = Frame::Data {
                stream_id: self.id,
                fin: false,
                data: chunk,
            };
            if self.out.send(frame).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Ends the stream from this side (FIN).
    pub async fn finish(&self) {
        let _ = self
            .out
            .send(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            })
            .await;
    }

    /// Resets the stream.
    pub async fn reset(&self, status: u32) {
        let _ = self
            .out
            .send(Frame::RstStream {
                stream_id: self.id,
                status,
            })
            .await;
    }
}

/// A server-side SPDY connection.
pub struct Connection {
    /// Streams as the client opens them; ends when the client leaves.
    pub streams: mpsc::Receiver<Incoming>,
    out: mpsc::Sender<Frame>,
    gone: watch::Receiver<bool>,
    reader: crate::AbortOnDrop,
    writer: JoinHandle<()>,
}

impl Connection {
    /// Serves SPDY on `io` (after the HTTP upgrade).
    pub fn start<IO>(io: IO) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (out, out_rx) = mpsc::channel(64);
        let (streams_tx, streams) = mpsc::channel(16);
        let (gone_tx, gone) = watch::channel(false);
        let writer = tokio::spawn(write_frames(wr, out_rx, gone.clone()));
        let reader = tokio::spawn({
            let out = out.clone();
            async move {
                read_frames(rd, out, streams_tx).await;
                gone_tx.send_replace(true);
            }
        });
        Connection {
            streams,
            out,
            gone,
            reader: crate::AbortOnDrop(reader),
            writer,
        }
    }

    /// The sending side of stream `id`.
    pub fn stream(&self, id: u32) -> StreamOut {
        StreamOut {
            id,
            out: self.out.clone(),
        }
    }

    /// Puts `s` into `slot` and accepts it, or resets it when the slot
    /// is taken (a second stream of one kind).
    pub async fn claim(&self, slot: &mut Option<Incoming>, s: Incoming) {
        if slot.is_some() {
            self.stream(s.id).reset(spdy::rst::PROTOCOL_ERROR).await;
            return;
        }
        s.accept().await;
        *slot = Some(s);
    }

    /// A receiver that turns true once the client has left.
    pub fn gone(&self) -> watch::Receiver<bool> {
        self.gone.clone()
    }

    /// Says goodbye (GOAWAY), sends what is queued and closes.
    pub async fn close(self) {
        let _ = self
            .out
            .send(Frame::GoAway {
                last_good_stream_id: 0,
                status: spdy::goaway::OK,
            })
            .await;
        drop(self.reader);
        drop(self.out);
        // Stream senders still held elsewhere would keep the writer alive.
        crate::join_or_abort(self.writer, Duration::from_secs(5)).await;
    }
}

/// Writes queued frames until every sender is gone, or the client is (it
/// left, or the connection went idle): then what is queued goes out and
/// the connection is shut.
async fn write_frames<W: AsyncWrite + Send + Unpin>(
    wr: W,
    mut frames: mpsc::Receiver<Frame>,
    mut gone: watch::Receiver<bool>,
) {
    let mut sink = FramedWrite::new(wr, FrameEncoder::new());
    loop {
        let f = tokio::select! {
            f = frames.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = async { let _ = gone.wait_for(|g| *g).await; } => {
                while let Ok(f) = frames.try_recv() {
                    if sink.feed(f).await.is_err() {
                        break;
                    }
                }
                let _ = sink.flush().await;
                break;
            }
        };
        if sink.feed(f).await.is_err() {
            return;
        }
        // Batch whatever else is queued into one flush.
        while let Ok(f) = frames.try_recv() {
            if sink.feed(f).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.get_mut().shutdown().await;
}

async fn read_frames<R: AsyncRead + Send + Unpin>(
    rd: R,
    out: mpsc::Sender<Frame>,
    new_streams: mpsc::Sender<Incoming>,
) {
    let mut frames = FramedRead::new(rd, StreamDecoder(FrameDecoder::new(MAX_FRAME, MAX_HEADERS)));
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut consumed: HashMap<u32, u32> = HashMap::new();
    let mut consumed_total: u32 = 0;
    let mut last_id = 0u32;
    let rst = |stream_id, status| Frame::RstStream { stream_id, status };
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(Ok(f)) => f,
            Ok(Err(SpdyError::InvalidFrame {
                stream_id,
                status,
                reason,
            })) => {
                tracing::warn!(
                    stream_id,
                    reason,
                    "invalid SPDY frame: resetting its stream"
                );
                if let Some(id) = stream_id {
                    open.remove(&id);
                    let _ = out.send(rst(id, status)).await;
                }
                continue;
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "SPDY connection failed");
                let _ = out
                    .send(Frame::GoAway {
                        last_good_stream_id: last_id,
                        status: spdy::goaway::PROTOCOL_ERROR,
                    })
                    .await;
                return;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                headers,
                ..
            } => {
                if stream_id % 2 == 0 || stream_id <= last_id {
                    let _ = out.send(rst(stream_id, spdy::rst::PROTOCOL_ERROR)).await;
                    continue;
                }
                last_id = stream_id;
                if open.len() >= MAX_STREAMS {
                    let _ = out.send(rst(stream_id, spdy::rst::REFUSED_STREAM)).await;
                    continue;
                }
                if !headers.iter().any(|(k, _)| k == "streamtype") {
                    tracing::warn!(stream_id, "SPDY stream without a streamType header");
                    let _ = out.send(rst(stream_id, spdy::rst::PROTOCOL_ERROR)).await;
                    continue;
                }
                let (tx, data) = mpsc::channel(INBOUND_CHUNKS);
                if !fin {
                    open.insert(stream_id, tx);
                }
                let incoming = Incoming {
                    id: stream_id,
                    headers,
                    data,
                    out: out.clone(),
                };
                if new_streams.send(incoming).await.is_err() {
                    let _ = out.send(rst(stream_id, spdy::rst::REFUSED_STREAM)).await;
                }
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                // At most 2^24-1: the decoder checked the length field.
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                match open.get(&stream_id) {
                    // A consumer that went away no longer cares.
                    Some(tx) if !data.is_empty() => {
                        let _ = tx.send(data).await;
                    }
                    Some(_) => {}
                    None if stream_id > last_id => {
                        let _ = out.send(rst(stream_id, spdy::rst::INVALID_STREAM)).await;
                    }
                    // Data for a stream that ended: dropped, as the spec says.
                    None => {}
                }
                if fin {
                    open.remove(&stream_id);
                    consumed.remove(&stream_id);
                } else if open.contains_key(&stream_id) {
                    let c = consumed.entry(stream_id).or_default();
                    *c += n;
                    if *c >= WINDOW_BATCH {
                        let delta = std::mem::take(c);
                        let _ = out.send(Frame::WindowUpdate { stream_id, delta }).await;
                    }
                }
                consumed_total += n;
                if consumed_total >= WINDOW_BATCH {
                    let delta = std::mem::take(&mut consumed_total);
                    let _ = out
                        .send(Frame::WindowUpdate {
                            stream_id: 0,
                            delta,
                        })
                        .await;
                }
            }
            Frame::RstStream { stream_id, .. } => {
                open.remove(&stream_id);
                consumed.remove(&stream_id);
            }
            Frame::Ping { id } => {
                let _ = out.send(Frame::Ping { id }).await;
            }
            Frame::GoAway { .. } => return,
            Frame::SynReply { .. }
            | Frame::Settings { .. }
            | Frame::Headers { .. }
            | Frame::WindowUpdate { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    #[tokio::test]
    async fn an_invalid_frame_resets_only_its_stream() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = Connection::start(server);
        let (client_rd, mut client_wr) = tokio::io::split(client);
        let mut enc = FrameEncoder::new();
        let mut buf = bytes::BytesMut::new();
        // RST_STREAM of the wrong length, then DATA for a stream never
        // opened, then a good stream.
        buf.extend_from_slice(&[0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1]);
        let frames = [
            Frame::Data {
                stream_id: 7,
                fin: false,
                data: Bytes::from_static(b"stray"),
            },
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: vec![("streamtype".into(), "error".into())],
            },
        ];
        for f in frames {
            enc.encode(f, &mut buf).unwrap();
        }
        client_wr.write_all(&buf).await.unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), conn.streams.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((s.id, s.header("streamtype")), (1, Some("error")));
        s.accept().await;
        // The client got a reset for the stray stream and the reply.
        let mut frames = FramedRead::new(
            client_rd,
            StreamDecoder(FrameDecoder::new(1 << 20, 1 << 16)),
        );
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match frames.next().await {
                Some(Ok(Ok(f))) => seen.push(f),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(seen.contains(&Frame::RstStream {
            stream_id: 7,
            status: spdy::rst::INVALID_STREAM
        }));
        assert!(seen
            .iter()
            .any(|f| matches!(f, Frame::SynReply { stream_id: 1, .. })));
    }
}
