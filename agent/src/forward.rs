//! Port forwarding: one agent stream per forwarded connection, relayed to
//! a TCP port on the sandbox's loopback. It runs in the agent, so it
//! reaches what listens inside the VM (or the pod's network namespace in
//! the process backend), never the host's network.

use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use vmcri_proto::agent::v1 as pb;

/// How long connecting to a local port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest chunk relayed at once.
const CHUNK_BYTES: usize = 32 * 1024;

/// Connects to `localhost:<port>`: IPv4 first, then IPv6, as containerd
/// resolves `localhost`.
pub async fn connect(port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no loopback address");
    for addr in [
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ] {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

/// Relays `conn` both ways: the host's chunks (starting with `first`) to
/// the connection, half-closing it at the host's EOF; the connection's
/// bytes back as the returned stream, which ends with an EOF chunk.
pub fn relay(
    conn: TcpStream,
    first: pb::ForwardChunk,
    mut inbound: Streaming<pb::ForwardChunk>,
) -> ReceiverStream<Result<pb::ForwardChunk, Status>> {
    let (mut rd, mut wr) = conn.into_split();
    tokio::spawn(async move {
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            if !c.data.is_empty() && wr.write_all(&c.data).await.is_err() {
                return;
            }
            if c.eof {
                break;
            }
            chunk = match inbound.next().await {
                Some(Ok(c)) => Some(c),
                // The host went away: end the connection.
                _ => return,
            };
        }
        let _ = wr.shutdown().await;
    });
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let msg = match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = tx
                        .send(Ok(pb::ForwardChunk {
                            eof: true,
                            ..Default::default()
                        }))
                        .await;
                    return;
                }
                Ok(n) => Ok(pb::ForwardChunk {
                    data: buf[..n].to_vec(),
                    ..Default::default()
                }),
                Err(e) => Err(Status::aborted(format!(
                    "reading the forwarded connection: {e}"
                ))),
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
