//! The HTTP side: serves `/exec/<token>`, `/attach/<token>` and
//! `/portforward/<token>`, negotiates SPDY/3.1 or WebSocket and the
//! Kubernetes subprotocol, and hands the upgraded connection to the
//! protocol modules.

use crate::remotecommand::{self, Opts, Run};
use crate::tokens::{TokenError, Tokens};
use crate::websocket::{self, WsConn};
use crate::{portforward, session, Handler, PortForwardRequest, Request};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Protocols for exec and attach over SPDY, most preferred first.
const SPDY_EXEC: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Over WebSocket.
const WS_EXEC: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Port-forward over SPDY.
const SPDY_PORTFORWARD: &[&str] = &["portforward.k8s.io"];
/// Port-forward over WebSocket.
const WS_PORTFORWARD: &[&str] = &["portforward.k8s.io", "v4.channel.k8s.io"];
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most ports one WebSocket port-forward may name (channels are bytes).
const MAX_WS_PORTS: usize = 64;

/// Where and how the server listens.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks one).
    pub address: SocketAddr,
    /// How long an issued URL stays valid.
    pub token_ttl: Duration,
    /// How long a client may take to open its streams after upgrading.
    pub stream_creation_timeout: Duration,
    /// A connection without a byte either way for this long is closed.
    pub idle_timeout: Duration,
}

struct Inner {
    tokens: Tokens,
    handler: Arc<dyn Handler>,
    creation_timeout: Duration,
    idle_timeout: Duration,
}

/// The running streaming server.
pub struct Server {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Server {
    /// Listens on `config.address` and serves streams with `handler`.
    pub async fn start(config: Config, handler: Arc<dyn Handler>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(config.address).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            tokens: Tokens::new(config.token_ttl),
            handler,
            creation_timeout: config.stream_creation_timeout,
            idle_timeout: config.idle_timeout,
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        tracing::info!(%addr, "streaming server listening");
        Ok(Server {
            inner,
            addr,
            accept,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A one-time URL for `req`.
    pub fn url(&self, req: Request) -> Result<String, TokenError> {
        let kind = req.kind();
        let token = self.inner.tokens.issue(req)?;
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            // Listening everywhere: loopback reaches it from this node.
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(format!("http://{addr}/{kind}/{token}"))
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "streaming server accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Interactive streams: small writes must not wait for ACKs.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY");
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(inner, req)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "streaming connection");
            }
            drop(permit);
        });
    }
}

fn reply(code: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(msg)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// All values of `name`, split at commas, trimmed.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The first protocol the client offers that we speak.
fn choose(offered: &[String], ours: &[&'static str]) -> Option<&'static str> {
    offered
        .iter()
        .find_map(|o| ours.iter().find(|p| **p == o.as_str()).copied())
}

enum Transport {
    Spdy,
    WebSocket,
}

/// The `port` query parameters of a WebSocket port-forward.
fn query_ports(query: &str, req: Option<&PortForwardRequest>) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "port" {
            let any = PortForwardRequest {
                sandbox_id: String::new(),
                ports: Vec::new(),
            };
            ports.push(portforward::parse_port(v, req.unwrap_or(&any))?);
        }
    }
    if ports.is_empty() {
        return Err("name at least one port=<n> in the URL".into());
    }
    if ports.len() > MAX_WS_PORTS {
        return Err(format!("at most {MAX_WS_PORTS} ports per connection"));
    }
    Ok(ports)
}

fn handle(inner: Arc<Inner>, mut req: hyper::Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (kind, token) = match (parts.next(), parts.next()) {
        (Some(k @ ("exec" | "attach" | "portforward")), Some(t))
            if !t.is_empty() && !t.contains('/') =>
        {
            (k.to_string(), t.to_string())
        }
        _ => return reply(StatusCode::NOT_FOUND, "no such streaming endpoint"),
    };
    if req.method() != Method::GET && req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    let headers = req.headers();
    let upgrade = list(headers, header::UPGRADE.as_str());
    let transport = if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
        Transport::WebSocket
    } else if upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
        Transport::Spdy
    } else {
        return reply(
            StatusCode::BAD_REQUEST,
            "this URL streams: upgrade to SPDY/3.1 or websocket",
        );
    };
    let portforward = kind == "portforward";
    // Negotiate before the token is spent, so a client can retry.
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let chosen = match transport {
        Transport::Spdy => {
            let offered = list(headers, "x-stream-protocol-version");
            let ours = if portforward {
                SPDY_PORTFORWARD
            } else {
                SPDY_EXEC
            };
            let chosen = if offered.is_empty() && portforward {
                Some(SPDY_PORTFORWARD[0])
            } else {
                choose(&offered, ours)
            };
            let Some(chosen) = chosen else {
                return reply(
                    StatusCode::FORBIDDEN,
                    format!(
                        "no protocol in X-Stream-Protocol-Version {offered:?} is supported; supported: {}",
                        ours.join(", ")
                    ),
                );
            };
            let h = response.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            h.insert(
                "x-stream-protocol-version",
                HeaderValue::from_static(chosen),
            );
            chosen
        }
        Transport::WebSocket => {
            let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
            let version_ok = headers
                .get(header::SEC_WEBSOCKET_VERSION)
                .is_some_and(|v| v == "13");
            let Some(key) = key.filter(|_| version_ok) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
                );
            };
            let offered = list(headers, header::SEC_WEBSOCKET_PROTOCOL.as_str());
            let ours = if portforward { WS_PORTFORWARD } else { WS_EXEC };
            let Some(chosen) = choose(&offered, ours) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "no protocol in Sec-WebSocket-Protocol {offered:?} is supported; supported: {}",
                        ours.join(", ")
                    ),
                );
            };
            let accept = derive_accept_key(key.as_bytes());
            let h = response.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            match HeaderValue::from_str(&accept) {
                Ok(v) => h.insert(header::SEC_WEBSOCKET_ACCEPT, v),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key"),
            };
            h.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(chosen),
            );
            chosen
        }
    };
    let ws_ports = if portforward && matches!(transport, Transport::WebSocket) {
        match query_ports(req.uri().query().unwrap_or_default(), None) {
            Ok(p) => Some(p),
            Err(e) => return reply(StatusCode::BAD_REQUEST, e),
        }
    } else {
        None
    };
    let request = match inner.tokens.take(&token, &kind) {
        Ok(r) => r,
        Err(e @ TokenError::WrongKind { .. }) => {
            return reply(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => return reply(StatusCode::NOT_FOUND, e.to_string()),
    };
    if let (Request::PortForward(pf), Some(_)) = (&request, &ws_ports) {
        if let Err(e) = query_ports(req.uri().query().unwrap_or_default(), Some(pf)) {
            return reply(StatusCode::FORBIDDEN, e);
        }
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (upgraded, _watchdog) = match on_upgrade.await {
            Ok(u) => {
                let (io, watchdog) = crate::idle::watch(TokioIo::new(u), inner.idle_timeout);
                // Ends with the connection's task (dropped when it is done).
                let dog = crate::AbortOnDrop(tokio::spawn(watchdog));
                (io, dog)
            }
            Err(e) => {
                tracing::warn!(error = %e, "streaming upgrade failed");
                return;
            }
        };
        let v5 = chosen == "v5.channel.k8s.io";
        let handler = inner.handler.clone();
        match transport {
            Transport::Spdy => {
                let conn = session::Connection::start(upgraded);
                match request {
                    Request::PortForward(pf) => {
                        portforward::serve_spdy(conn, pf, handler, inner.creation_timeout).await
                    }
                    Request::Exec(_) | Request::Attach(_) => {
                        if let Some((opts, run, attach)) = exec_or_attach(request, handler) {
                            remotecommand::serve_spdy(
                                conn,
                                opts,
                                inner.creation_timeout,
                                run,
                                attach,
                            )
                            .await
                        }
                    }
                }
            }
            Transport::WebSocket => {
                let ws = WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    Some(websocket::config()),
                )
                .await;
                match request {
                    Request::PortForward(pf) => {
                        let ports = ws_ports.unwrap_or_default();
                        let conn = WsConn::start(ws, portforward::client_channel(ports.len()));
                        portforward::serve_ws(conn, pf, ports, handler).await
                    }
                    Request::Exec(_) | Request::Attach(_) => {
                        if let Some((opts, run, attach)) = exec_or_attach(request, handler) {
                            let conn = WsConn::start(ws, remotecommand::client_channel(v5));
                            remotecommand::serve_ws(conn, v5, opts, run, attach).await
                        }
                    }
                }
            }
        }
    });
    response
}

/// The streams, the run and whether it is an attach, for an exec or
/// attach request.
fn exec_or_attach(req: Request, handler: Arc<dyn Handler>) -> Option<(Opts, Run, bool)> {
    Some(match req {
        Request::Exec(e) => {
            let opts = Opts {
                stdin: e.stdin,
                stdout: e.stdout,
                stderr: e.stderr,
                tty: e.tty,
            };
            (opts, Box::new(move |io| handler.exec(e, io)), false)
        }
        Request::Attach(a) => {
            let opts = Opts {
                stdin: a.stdin,
                stdout: a.stdout,
                stderr: a.stderr,
                tty: a.tty,
            };
            (opts, Box::new(move |io| handler.attach(a, io)), true)
        }
        Request::PortForward(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_offered_protocol_we_speak_wins() {
        let offered: Vec<String> = [
            "v3.channel.k8s.io",
            "v4.channel.k8s.io",
            "v5.channel.k8s.io",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(choose(&offered, SPDY_EXEC), Some("v4.channel.k8s.io"));
        assert_eq!(choose(&["v1".to_string()], SPDY_EXEC), None);
    }

    #[test]
    fn websocket_ports_come_from_the_query_and_obey_the_request() {
        assert_eq!(
            query_ports("port=80&port=8080", None).unwrap(),
            vec![80, 8080]
        );
        assert!(query_ports("", None).is_err());
        assert!(query_ports("port=0", None).is_err());
        assert!(query_ports("port=70000", None).is_err());
        let only_80 = PortForwardRequest {
            sandbox_id: "s".into(),
            ports: vec![80],
        };
        assert!(query_ports("port=80", Some(&only_80)).is_ok());
        assert!(query_ports("port=22", Some(&only_80)).is_err());
    }
}
