//! Test clients for the streaming server: SPDY/3.1 (as kubelet's and
//! crictl's Go client speaks it) on our own frame codec, and WebSocket on
//! tokio-tungstenite.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::{FramedRead, FramedWrite};
use vmcri_streaming::spdy::{Frame, FrameDecoder, FrameEncoder, StreamDecoder};

/// How long any single step may take (microVM execs take ~10 s here).
pub const STEP: Duration = Duration::from_secs(120);

/// What an exec or attach gave the client.
#[derive(Debug, Default)]
pub struct Output {
    /// stdout bytes.
    pub stdout: Vec<u8>,
    /// stderr bytes.
    pub stderr: Vec<u8>,
    /// The error stream's Status object (Null if none came).
    pub status: serde_json::Value,
}

impl Output {
    /// stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// The exit code the Status says (0 for Success).
    pub fn exit_code(&self) -> Option<i32> {
        if self.status["status"] == "Success" {
            return Some(0);
        }
        self.status["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("streaming URLs are http://")?;
    let (host, path) = rest.split_once('/').context("URL without a path")?;
    Ok((host.to_string(), format!("/{path}")))
}

/// An HTTP response that was not an upgrade.
#[derive(Debug)]
pub struct Refused {
    /// Status code.
    pub code: u16,
    /// Body text.
    pub body: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.code, self.body)
    }
}
impl std::error::Error for Refused {}

/// The HTTP status of a refused upgrade, if that is what `e` is.
pub fn refused_code(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<Refused>().map(|r| r.code)
}

struct StreamState {
    data: mpsc::UnboundedSender<Bytes>,
    reply: Option<oneshot::Sender<Result<(), u32>>>,
}

/// A SPDY client connection.
pub struct Spdy {
    out: mpsc::Sender<Frame>,
    raw: mpsc::Sender<Vec<u8>>,
    streams: Arc<Mutex<HashMap<u32, StreamState>>>,
    next_id: u32,
    /// The protocol the server chose.
    pub protocol: String,
    /// RST_STREAM frames received: (stream, status).
    pub resets: Arc<Mutex<Vec<(u32, u32)>>>,
    /// Whether the server sent GOAWAY or closed.
    pub closed: Arc<Mutex<bool>>,
}

/// A stream the client opened.
pub struct SpdyStream {
    /// Its ID.
    pub id: u32,
    /// Data the server sent; ends at its FIN or RST.
    pub data: mpsc::UnboundedReceiver<Bytes>,
}

impl SpdyStream {
    /// Everything until the server's FIN.
    pub async fn read_all(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(b) = self.data.recv().await {
            all.extend_from_slice(&b);
        }
        all
    }
}

impl Spdy {
    /// Upgrades `url` to SPDY/3.1 offering `protocols`.
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<Spdy> {
        let (host, path) = split_url(url)?;
        let mut tcp = TcpStream::connect(&host)
            .await
            .with_context(|| format!("connect {host}"))?;
        // As Go's net package: no Nagle delay on small frames.
        tcp.set_nodelay(true)?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
        );
        for p in protocols {
            req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await?;
        // Read the response head byte by byte: SPDY frames may follow it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await? == 0 {
                bail!("the server closed during the upgrade");
            }
            head.push(b[0]);
            if head.len() > 16 * 1024 {
                bail!("response head too long");
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        let header = |name: &str| {
            text.lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                })
                .map(|(_, v)| v.trim().to_string())
        };
        if code != 101 {
            let len: usize = header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len.min(64 * 1024)];
            let _ = tcp.read_exact(&mut body).await;
            return Err(Refused {
                code,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            }
            .into());
        }
        let protocol = header("x-stream-protocol-version").unwrap_or_default();
        let (rd, wr) = tcp.into_split();
        let (out, mut out_rx) = mpsc::channel::<Frame>(64);
        let (raw, mut raw_rx) = mpsc::channel::<Vec<u8>>(4);
        let streams: Arc<Mutex<HashMap<u32, StreamState>>> = Arc::default();
        let resets: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
        let closed: Arc<Mutex<bool>> = Arc::default();
        tokio::spawn(async move {
            let mut sink = FramedWrite::new(wr, FrameEncoder::new());
            loop {
                tokio::select! {
                    f = out_rx.recv() => match f {
                        Some(f) => if let Err(e) = sink.send(f).await {
                            eprintln!("SPDY client: writing a frame: {e}");
                            return;
                        },
                        None => return,
                    },
                    r = raw_rx.recv() => match r {
                        Some(bytes) => if let Err(e) = sink.get_mut().write_all(&bytes).await {
                            eprintln!("SPDY client: writing raw bytes: {e}");
                            return;
                        },
                        None => return,
                    },
                }
            }
        });
        tokio::spawn({
            let (streams, resets, closed, out) =
                (streams.clone(), resets.clone(), closed.clone(), out.clone());
            async move {
                let mut frames =
                    FramedRead::new(rd, StreamDecoder(FrameDecoder::new(1 << 24, 1 << 20)));
                loop {
                    let f = match frames.next().await {
                        Some(Ok(Ok(f))) => f,
                        Some(Ok(Err(e))) => {
                            eprintln!("SPDY client: skipping an invalid frame: {e}");
                            continue;
                        }
                        Some(Err(e)) => {
                            eprintln!("SPDY client: reading: {e}");
                            break;
                        }
                        None => break,
                    };
                    let mut map = streams.lock().unwrap();
                    match f {
                        Frame::SynReply { stream_id, .. } => {
                            if let Some(tx) = map.get_mut(&stream_id).and_then(|s| s.reply.take()) {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        Frame::Data {
                            stream_id,
                            fin,
                            data,
                        } => {
                            if let Some(s) = map.get(&stream_id) {
                                if !data.is_empty() {
                                    let _ = s.data.send(data);
                                }
                            }
                            if fin {
                                map.remove(&stream_id);
                            }
                        }
                        Frame::RstStream { stream_id, status } => {
                            resets.lock().unwrap().push((stream_id, status));
                            if let Some(mut s) = map.remove(&stream_id) {
                                if let Some(tx) = s.reply.take() {
                                    let _ = tx.send(Err(status));
                                }
                            }
                        }
                        Frame::Ping { id } => {
                            drop(map);
                            let _ = out.send(Frame::Ping { id }).await;
                            continue;
                        }
                        Frame::GoAway { .. } => break,
                        _ => {}
                    }
                }
                *closed.lock().unwrap() = true;
                streams.lock().unwrap().clear();
            }
        });
        Ok(Spdy {
            out,
            raw,
            streams,
            next_id: 1,
            protocol,
            resets,
            closed,
        })
    }

    /// Opens a stream with `headers` and waits for the server's reply.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> Result<SpdyStream> {
        let id = self.next_id;
        self.next_id += 2;
        let (data_tx, data) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.streams.lock().unwrap().insert(
            id,
            StreamState {
                data: data_tx,
                reply: Some(reply_tx),
            },
        );
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.to_string()))
            .collect();
        self.out
            .send(Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers,
            })
            .await?;
        match tokio::time::timeout(STEP, reply_rx).await {
            Ok(Ok(Ok(()))) => Ok(SpdyStream { id, data }),
            Ok(Ok(Err(status))) => bail!("stream {id} was reset with status {status}"),
            Ok(Err(_)) => bail!("the connection closed before stream {id} was accepted"),
            Err(_) => bail!("no reply for stream {id}"),
        }
    }

    /// Sends data on a stream in frames of at most 32 KiB, as client-go's
    /// copy loop does; `fin` ends this side.
    pub async fn send(&self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        let mut chunks: Vec<&[u8]> = data.chunks(32 * 1024).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            self.out
                .send(Frame::Data {
                    stream_id: id,
                    fin: fin && i == last,
                    data: Bytes::copy_from_slice(c),
                })
                .await?;
        }
        Ok(())
    }

    /// Writes raw bytes on the connection (for malformed frames).
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<()> {
        self.raw.send(bytes).await?;
        Ok(())
    }
}

/// Exec or attach streams to open and feed.
#[derive(Debug, Clone, Default)]
pub struct ExecIo<'a> {
    /// Send this on stdin, then close it.
    pub stdin: Option<&'a [u8]>,
    /// Keep stdin open (attach without stdin_once) instead of closing it.
    pub keep_stdin_open: bool,
    /// Read stdout.
    pub stdout: bool,
    /// Read stderr.
    pub stderr: bool,
    /// A terminal, with this first size (width, height).
    pub tty: Option<(u16, u16)>,
}

/// Runs an exec or attach over SPDY with `protocol`.
pub async fn spdy_exec(url: &str, protocol: &str, io: ExecIo<'_>) -> Result<Output> {
    let mut c = Spdy::connect(url, &[protocol]).await?;
    let mut error = c.open(&[("streamType", "error")]).await?;
    let stdin = match io.stdin {
        Some(_) => Some(c.open(&[("streamType", "stdin")]).await?),
        None => None,
    };
    let mut stdout = match io.stdout {
        true => Some(c.open(&[("streamType", "stdout")]).await?),
        false => None,
    };
    let mut stderr = match io.stderr && io.tty.is_none() {
        true => Some(c.open(&[("streamType", "stderr")]).await?),
        false => None,
    };
    if let Some((w, h)) = io.tty {
        let resize = c.open(&[("streamType", "resize")]).await?;
        c.send(
            resize.id,
            format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes(),
            false,
        )
        .await?;
    }
    if let (Some(s), Some(data)) = (&stdin, io.stdin) {
        c.send(s.id, data, !io.keep_stdin_open).await?;
    }
    let run = async {
        let out = async {
            match &mut stdout {
                Some(s) => s.read_all().await,
                None => Vec::new(),
            }
        };
        let err = async {
            match &mut stderr {
                Some(s) => s.read_all().await,
                None => Vec::new(),
            }
        };
        let (o, e, status) = tokio::join!(out, err, error.read_all());
        (o, e, status)
    };
    let (stdout, stderr, status) = tokio::time::timeout(STEP, run)
        .await
        .context("exec over SPDY timed out")?;
    let status = if status.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&status)
            .with_context(|| format!("status {:?}", String::from_utf8_lossy(&status)))?
    };
    Ok(Output {
        stdout,
        stderr,
        status,
    })
}

/// One forwarded connection's result: what came back, and the error text.
#[derive(Debug, Default, Clone)]
pub struct Forwarded {
    /// Data from the pod.
    pub data: Vec<u8>,
    /// Text on the error stream.
    pub error: String,
}

/// Forwards one connection per (port, payload) at once over one SPDY
/// connection; each sends its payload, half-closes and reads to the end.
pub async fn spdy_forward(url: &str, conns: &[(u16, Vec<u8>)]) -> Result<Vec<Forwarded>> {
    let mut c = Spdy::connect(url, &["portforward.k8s.io"]).await?;
    if c.protocol != "portforward.k8s.io" {
        bail!("server chose {:?}", c.protocol);
    }
    let mut pending = Vec::new();
    for (i, (port, payload)) in conns.iter().enumerate() {
        let (port, rid) = (port.to_string(), i.to_string());
        let error = c
            .open(&[
                ("streamType", "error"),
                ("port", &port),
                ("requestID", &rid),
            ])
            .await?;
        let data = c
            .open(&[("streamType", "data"), ("port", &port), ("requestID", &rid)])
            .await?;
        pending.push((error, data, payload.clone()));
    }
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for (mut error, mut data, payload) in pending {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.send(data.id, &payload, true).await?;
            let (d, e) = tokio::join!(data.read_all(), error.read_all());
            Ok::<_, anyhow::Error>(Forwarded {
                data: d,
                error: String::from_utf8_lossy(&e).into_owned(),
            })
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            tokio::time::timeout(STEP, t)
                .await
                .context("port-forward timed out")???,
        );
    }
    Ok(results)
}

/// A WebSocket connection to a streaming URL.
pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Upgrades `url` (plus `query`) to WebSocket offering `protocols`;
/// returns the socket and the chosen protocol.
pub async fn ws_connect(url: &str, query: &str, protocols: &[&str]) -> Result<(Ws, String)> {
    let (host, _) = split_url(url)?;
    let ws_url = format!("ws://{}{query}", url.trim_start_matches("http://"));
    let mut req = ws_url.into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.join(", ").parse()?);
    let tcp = TcpStream::connect(&host).await?;
    tcp.set_nodelay(true)?;
    let (ws, resp) = match tokio_tungstenite::client_async(req, tcp).await {
        Ok(r) => r,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(Refused {
                code: resp.status().as_u16(),
                body: body.trim().to_string(),
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let chosen = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((ws, chosen))
}

/// Runs an exec or attach over WebSocket with `protocol`; with v5 the
/// stdin is closed with the CLOSE signal after it is sent.
pub async fn ws_exec(url: &str, protocol: &str, io: ExecIo<'_>) -> Result<Output> {
    let (mut ws, chosen) = ws_connect(url, "", &[protocol]).await?;
    if chosen != protocol {
        bail!("server chose {chosen:?}, not {protocol}");
    }
    if let Some((w, h)) = io.tty {
        let mut m = vec![4u8];
        m.extend_from_slice(format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes());
        ws.send(Message::Binary(m.into())).await?;
    }
    if let Some(data) = io.stdin {
        let mut m = vec![0u8];
        m.extend_from_slice(data);
        ws.send(Message::Binary(m.into())).await?;
        if protocol.starts_with("v5") && !io.keep_stdin_open {
            ws.send(Message::Binary(vec![255u8, 0].into())).await?;
        }
    }
    let mut out = Output::default();
    let mut status = Vec::new();
    let read = async {
        while let Some(m) = ws.next().await {
            match m? {
                Message::Binary(b) if !b.is_empty() => match b[0] {
                    1 => out.stdout.extend_from_slice(&b[1..]),
                    2 => out.stderr.extend_from_slice(&b[1..]),
                    3 => status.extend_from_slice(&b[1..]),
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(STEP, read)
        .await
        .context("exec over WebSocket timed out")??;
    if !status.is_empty() {
        out.status = serde_json::from_slice(&status)?;
    }
    Ok(out)
}

/// Forwards `ports` over one WebSocket: sends each payload on its data
/// channel and reads until each data channel has `expect[i]` bytes or an
/// error arrived; then closes.
pub async fn ws_forward(url: &str, conns: &[(u16, Vec<u8>, usize)]) -> Result<Vec<Forwarded>> {
    let query: Vec<String> = conns.iter().map(|(p, _, _)| format!("port={p}")).collect();
    let (mut ws, _) = ws_connect(
        url,
        &format!("?{}", query.join("&")),
        &["portforward.k8s.io"],
    )
    .await?;
    let mut results = vec![Forwarded::default(); conns.len()];
    let mut prefixes = vec![0usize; conns.len() * 2];
    for (i, (_, payload, _)) in conns.iter().enumerate() {
        let mut m = vec![u8::try_from(2 * i).context("too many ports for one-byte channels")?];
        m.extend_from_slice(payload);
        ws.send(Message::Binary(m.into())).await?;
    }
    let read = async {
        while let Some(m) = ws.next().await {
            if let Message::Binary(b) = m? {
                let Some(&ch) = b.first() else { continue };
                let ch = usize::from(ch);
                let i = ch / 2;
                if i >= conns.len() {
                    bail!("message on unknown channel {ch}");
                }
                let mut data = &b[1..];
                // Each channel starts with its port, little-endian.
                if prefixes[ch] < 2 {
                    let take = (2 - prefixes[ch]).min(data.len());
                    prefixes[ch] += take;
                    data = &data[take..];
                }
                if ch % 2 == 0 {
                    results[i].data.extend_from_slice(data);
                } else {
                    results[i].error.push_str(&String::from_utf8_lossy(data));
                }
            }
            let done = results
                .iter()
                .zip(conns)
                .all(|(r, (_, _, want))| r.data.len() >= *want || !r.error.is_empty());
            if done {
                break;
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(STEP, read)
        .await
        .context("port-forward over WebSocket timed out")??;
    let _ = ws.close(None).await;
    Ok(results)
}
