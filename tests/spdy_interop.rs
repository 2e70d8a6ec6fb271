//! Wire compatibility of the streaming server with the SPDY library that
//! kubelet and client-go use, github.com/moby/spdystream: a small Go
//! client (tests/go-spdy-client) speaks like client-go's SPDY executor
//! (remotecommand v4/v5) and port forwarder against a real
//! `vmcri_streaming::Server` with a fake handler.
//!
//! Needs Go and the spdystream sources from Debian:
//! `apt-get install -y golang-go golang-github-docker-spdystream-dev`.
//! Without them the tests fail (CI installs them). With
//! `SPDY_INTEROP_VERBOSE=1` each run of the client is shown; add `DEBUG=1`
//! for spdystream's own frame log.

use bytes::Bytes;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use vmcri_streaming::{
    AttachRequest, BoxFuture, Config, ExecRequest, Forward, Handler, Io, Outcome,
    PortForwardRequest, Request, Server,
};

const SPDYSTREAM_SRC: &str = "/usr/share/gocode/src/github.com/moby/spdystream";
const GOPATH: &str = "/usr/share/gocode";
const INSTALL: &str = "apt-get install -y golang-go golang-github-docker-spdystream-dev";

/// The Go client, built once per test run.
fn go_client() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_go_client) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_go_client() -> Result<PathBuf, String> {
    match Command::new("go").arg("version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "`go version` failed ({}): {}; install Go and spdystream: {INSTALL}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ))
        }
        Err(e) => {
            return Err(format!(
                "the SPDY interop tests need Go ({e}); install: {INSTALL}"
            ))
        }
    }
    if !Path::new(SPDYSTREAM_SRC).join("connection.go").is_file() {
        return Err(format!(
            "the SPDY interop tests need moby/spdystream's sources at {SPDYSTREAM_SRC}; install: {INSTALL}"
        ));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-spdy-client");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let bin = dir.join("go-spdy-client");
    let out = Command::new("go")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-o"])
        .arg(&bin)
        .arg("./go-spdy-client")
        // GOPATH mode: Debian ships spdystream as GOPATH sources, and no
        // module is ever downloaded.
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .map_err(|e| format!("run go build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building tests/go-spdy-client failed ({}):\n{}{}\n(needs: {INSTALL})",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// Runs the Go client with `args` and returns the JSON it printed.
async fn run_go(args: Vec<String>) -> Value {
    let shown = args.join(" ");
    // Building (the first time) and running block: off the runtime.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(go_client())
            .args(&args)
            .args(["-timeout", "60s"])
            .output()
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    .expect("run go-spdy-client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if std::env::var_os("SPDY_INTEROP_VERBOSE").is_some() {
        eprintln!("go-spdy-client {shown}:\nstdout: {stdout}\nstderr: {stderr}");
    }
    assert!(
        out.status.success(),
        "go-spdy-client {shown} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("go-spdy-client printed no JSON ({e}): {stdout}\nstderr: {stderr}")
    })
}

/// Commands of the fake runtime:
/// - `upper CODE`: stdin (to its EOF) uppercased on stdout, `to-stderr` on
///   stderr, exits with CODE;
/// - `line`: echoes the first line of stdin and exits 0 without waiting
///   for stdin's EOF;
/// - `resize`: prints the first terminal size it gets, exits 0;
/// - `big N`: N bytes of output, exits 0.
///
/// Port 8080 echoes; port 9 refuses.
struct Fake;

impl Handler for Fake {
    fn exec(&self, req: ExecRequest, mut io: Io) -> BoxFuture<Outcome> {
        Box::pin(async move {
            let stdout = io.stdout.take();
            let stderr = io.stderr.take();
            match req.cmd.first().map(String::as_str) {
                Some("upper") => {
                    let code: i32 = req.cmd.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                    let mut input = Vec::new();
                    if let Some(rx) = io.stdin.as_mut() {
                        while let Some(b) = rx.recv().await {
                            input.extend_from_slice(&b);
                        }
                    }
                    if let Some(tx) = &stdout {
                        let _ = tx.send(Bytes::from(input.to_ascii_uppercase())).await;
                    }
                    if let Some(tx) = &stderr {
                        let _ = tx.send(Bytes::from_static(b"to-stderr")).await;
                    }
                    Outcome::Exited(code)
                }
                Some("line") => {
                    let mut input = Vec::new();
                    if let Some(rx) = io.stdin.as_mut() {
                        while !input.contains(&b'\n') {
                            match rx.recv().await {
                                Some(b) => input.extend_from_slice(&b),
                                None => break,
                            }
                        }
                    }
                    let line = input.split(|b| *b == b'\n').next().unwrap_or_default();
                    if let Some(tx) = &stdout {
                        let _ = tx.send(Bytes::copy_from_slice(line)).await;
                    }
                    Outcome::Exited(0)
                }
                Some("resize") => {
                    let Some(mut sizes) = io.resize.take() else {
                        return Outcome::Failed("no resize stream".into());
                    };
                    let Some(size) = sizes.recv().await else {
                        return Outcome::Failed("the resize stream ended".into());
                    };
                    if let Some(tx) = &stdout {
                        let msg = format!("size {}x{}", size.width, size.height);
                        let _ = tx.send(Bytes::from(msg)).await;
                    }
                    Outcome::Exited(0)
                }
                Some("big") => {
                    let n: usize = req.cmd.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                    if let Some(tx) = &stdout {
                        let chunk = Bytes::from(vec![b'x'; 10_000]);
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(chunk.len());
                            if tx.send(chunk.slice(..k)).await.is_err() {
                                break;
                            }
                            left -= k;
                        }
                    }
                    Outcome::Exited(0)
                }
                other => Outcome::Failed(format!("unknown command {other:?}")),
            }
        })
    }

    fn attach(&self, _req: AttachRequest, _io: Io) -> BoxFuture<Outcome> {
        Box::pin(async { Outcome::Failed("attach is not faked".into()) })
    }

    fn port_forward(&self, _sandbox_id: String, conn: Forward) -> BoxFuture<Result<(), String>> {
        Box::pin(async move {
            let Forward {
                port,
                mut incoming,
                outgoing,
            } = conn;
            if port != 8080 {
                return Err("connection refused".into());
            }
            while let Some(b) = incoming.recv().await {
                if outgoing.send(b).await.is_err() {
                    break;
                }
            }
            Ok(())
        })
    }
}

async fn server() -> Server {
    let config = Config {
        address: "127.0.0.1:0".parse().unwrap(),
        token_ttl: Duration::from_secs(60),
        stream_creation_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3600),
    };
    Server::start(config, Arc::new(Fake)).await.unwrap()
}

fn exec_url(server: &Server, cmd: &[&str], stdin: bool, tty: bool) -> String {
    server
        .url(Request::Exec(ExecRequest {
            container_id: "c1".into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        }))
        .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The error stream's Status.
fn status(result: &Value) -> Value {
    let raw = result["error"].as_str().expect("error is a string");
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("error stream {raw:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_v4_non_zero_exit_reaches_client_go() {
    let server = server().await;
    let url = exec_url(&server, &["upper", "3"], true, false);
    let r = run_go(args(&[
        "-mode",
        "exec",
        "-url",
        &url,
        "-stdin",
        "-input",
        "hello from go",
    ]))
    .await;
    assert_eq!(r["protocol"], "v4.channel.k8s.io", "{r}");
    assert_eq!(r["stdout"], "HELLO FROM GO", "{r}");
    assert_eq!(r["stderr"], "to-stderr", "{r}");
    let s = status(&r);
    assert_eq!(s["status"], "Failure", "{s}");
    assert_eq!(s["reason"], "NonZeroExitCode", "{s}");
    assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode", "{s}");
    assert_eq!(s["details"]["causes"][0]["message"], "3", "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_v5_success() {
    let server = server().await;
    let url = exec_url(&server, &["upper", "0"], true, false);
    let r = run_go(args(&[
        "-mode",
        "exec",
        "-url",
        &url,
        // Offers what client-go offers since v1.30: v5, v4, v3, v2, v1.
        "-protocol",
        "v5.channel.k8s.io",
        "-stdin",
        "-input",
        "ok",
    ]))
    .await;
    assert_eq!(r["protocol"], "v5.channel.k8s.io", "{r}");
    assert_eq!(r["stdout"], "OK", "{r}");
    assert_eq!(r["stderr"], "to-stderr", "{r}");
    let s = status(&r);
    assert_eq!(s["status"], "Success", "{s}");
}

/// The command exits while the client's stdin is still open (an
/// interactive shell's `exit`): the client must still see every stream end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ends_while_client_stdin_stays_open() {
    let server = server().await;
    let url = exec_url(&server, &["line"], true, false);
    let r = run_go(args(&[
        "-mode",
        "exec",
        "-url",
        &url,
        "-stdin",
        "-input",
        "first line\nsecond",
        "-keep-stdin-open",
    ]))
    .await;
    assert_eq!(r["stdout"], "first line", "{r}");
    assert_eq!(r["stderr"], "", "{r}");
    assert_eq!(status(&r)["status"], "Success", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_without_stdin_and_with_large_output() {
    let server = server().await;
    let n = 1 << 20;
    let url = exec_url(&server, &["big", &n.to_string()], false, false);
    let r = run_go(args(&["-mode", "exec", "-url", &url])).await;
    let out = r["stdout"].as_str().unwrap();
    assert_eq!(out.len(), n, "stdout length");
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(status(&r)["status"], "Success", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_resize_reaches_the_handler() {
    let server = server().await;
    let url = exec_url(&server, &["resize"], false, true);
    let r = run_go(args(&[
        "-mode", "exec", "-url", &url, "-tty", "-width", "100", "-height", "30",
    ]))
    .await;
    assert_eq!(r["stdout"], "size 100x30", "{r}");
    assert_eq!(r["stderr"], "", "{r}");
    assert_eq!(status(&r)["status"], "Success", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_echoes_and_reports_errors_concurrently() {
    let server = server().await;
    let url = server
        .url(Request::PortForward(PortForwardRequest {
            sandbox_id: "pod1".into(),
            ports: Vec::new(),
        }))
        .unwrap();
    let requests = 8;
    let r = run_go(args(&[
        "-mode",
        "portforward",
        "-url",
        &url,
        "-ports",
        "8080,9",
        "-requests",
        &requests.to_string(),
        "-payload",
        "ping",
    ]))
    .await;
    let results = r.as_array().expect("an array");
    assert_eq!(results.len(), requests, "{r}");
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["requestID"], i.to_string(), "{res}");
        assert_eq!(
            res["conn_open_at_eof"], true,
            "the data stream ended by the connection closing, not by FIN: {res}"
        );
        if i % 2 == 0 {
            assert_eq!(res["port"], 8080, "{res}");
            assert_eq!(res["data"], format!("ping-{i}"), "{res}");
            assert_eq!(res["error"], "", "{res}");
        } else {
            assert_eq!(res["port"], 9, "{res}");
            assert_eq!(res["data"], "", "{res}");
            let err = res["error"].as_str().unwrap();
            assert!(err.contains("connection refused"), "{res}");
            assert!(err.contains("port 9"), "{res}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_large_payloads_echo_intact() {
    let server = server().await;
    let url = server
        .url(Request::PortForward(PortForwardRequest {
            sandbox_id: "pod1".into(),
            ports: vec![8080],
        }))
        .unwrap();
    let (requests, repeat) = (4, 40_000);
    let r = run_go(args(&[
        "-mode",
        "portforward",
        "-url",
        &url,
        "-ports",
        "8080",
        "-requests",
        &requests.to_string(),
        "-payload",
        "bulk",
        "-repeat",
        &repeat.to_string(),
    ]))
    .await;
    let results = r.as_array().expect("an array");
    assert_eq!(results.len(), requests);
    for (i, res) in results.iter().enumerate() {
        let want = format!("bulk-{i}").repeat(repeat);
        let got = res["data"].as_str().unwrap();
        assert_eq!(got.len(), want.len(), "request {i}: echoed length");
        assert!(got == want, "request {i}: echo differs");
        assert_eq!(res["error"], "", "{res}");
    }
}
