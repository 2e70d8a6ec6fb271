//! Exec, attach and port-forward through `vmcri serve`'s streaming server,
//! over SPDY/3.1 and WebSocket, in the process backend and in a microVM:
//! stdin and its EOF, exit codes, terminals and resize, attach beside the
//! log, port-forward to a server inside the pod (and to a closed port),
//! one-time tokens, malformed frames and the CRI error codes.

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;
use vmcri_tests::pods::*;
use vmcri_tests::streams::*;
use vmcri_tests::Scratch;

async fn exec_url(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
    tty: bool,
    stdin: bool,
) -> String {
    rt.exec(cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    })
    .await
    .expect("Exec")
    .into_inner()
    .url
}

async fn attach_url(rt: &mut RuntimeServiceClient<Channel>, id: &str, tty: bool) -> String {
    rt.attach(cri::AttachRequest {
        container_id: id.into(),
        stdin: true,
        tty,
        stdout: true,
        stderr: !tty,
    })
    .await
    .expect("Attach")
    .into_inner()
    .url
}

async fn forward_url(rt: &mut RuntimeServiceClient<Channel>, pod: &str, ports: &[i32]) -> String {
    rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

async fn start(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    c: cri::ContainerConfig,
    logs: &Path,
) -> String {
    let id = create(rt, pod, c, logs).await.expect("CreateContainer");
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

/// Stops and removes a pod: its agent or VM must not outlive the test.
async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// The containers every streaming test uses.
struct Pod {
    id: String,
    /// An echo server on 8080 (busybox nc), also the exec target.
    echo: String,
    /// stdin + stdin_once, no TTY: echoes lines until EOF.
    reader: String,
    /// A shell on a TTY with stdin.
    shell: String,
}

async fn pod_with_containers(
    rt: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    image: &str,
    logs: &Path,
) -> Pod {
    let t0 = Instant::now();
    let id = run_pod_with(rt, "streams", logs, handler).await;
    eprintln!("pod ready in {:?}", t0.elapsed());
    let echo = start(
        rt,
        &id,
        container("echo", image, &["nc", "-ll", "-p", "8080", "-e", "cat"]),
        logs,
    )
    .await;
    let mut c = container(
        "reader",
        image,
        &[
            "sh",
            "-c",
            "while read l; do echo \"got $l\"; done; echo bye",
        ],
    );
    c.stdin = true;
    c.stdin_once = true;
    let reader = start(rt, &id, c, logs).await;
    let mut c = container("shell", image, &["sh"]);
    c.stdin = true;
    c.tty = true;
    let shell = start(rt, &id, c, logs).await;
    wait_state(rt, &shell, cri::ContainerState::ContainerRunning).await;
    eprintln!("three containers running after {:?}", t0.elapsed());
    Pod {
        id,
        echo,
        reader,
        shell,
    }
}

/// What must work in every backend.
async fn streams_work(rt: &mut RuntimeServiceClient<Channel>, pod: &Pod, logs: &Path) {
    // Exec over SPDY (v4): stdin to its EOF, stdout, stderr, exit code.
    let t0 = Instant::now();
    let url = exec_url(
        rt,
        &pod.echo,
        &["sh", "-c", "cat; echo to-stderr >&2; exit 3"],
        false,
        true,
    )
    .await;
    let io = ExecIo {
        stdin: Some(b"hello spdy\n"),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let o = spdy_exec(&url, "v4.channel.k8s.io", io)
        .await
        .expect("exec over SPDY");
    assert_eq!(
        (o.out(), o.err(), o.exit_code()),
        ("hello spdy\n".into(), "to-stderr\n".into(), Some(3)),
        "{o:?}"
    );
    assert_eq!(o.status["reason"], "NonZeroExitCode", "{o:?}");
    eprintln!("SPDY exec round trip: {:?}", t0.elapsed());

    // Exec on a terminal over SPDY (v5): the resize reaches it.
    let size_loop = "for i in $(seq 100); do s=$(stty size); [ \"$s\" = \"30 100\" ] && break; sleep 0.1; done; echo \"size $s\"; tty";
    let url = exec_url(rt, &pod.echo, &["sh", "-c", size_loop], true, false).await;
    let io = ExecIo {
        stdout: true,
        tty: Some((100, 30)),
        ..Default::default()
    };
    let o = spdy_exec(&url, "v5.channel.k8s.io", io)
        .await
        .expect("TTY exec over SPDY");
    assert!(
        o.out().contains("size 30 100") && o.out().contains("/dev/pts/"),
        "{o:?}"
    );
    assert_eq!(o.exit_code(), Some(0), "{o:?}");

    // Exec over WebSocket v5: stdin closed with the CLOSE signal.
    let t0 = Instant::now();
    let url = exec_url(rt, &pod.echo, &["cat"], false, true).await;
    let io = ExecIo {
        stdin: Some(b"hello ws"),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let o = ws_exec(&url, "v5.channel.k8s.io", io)
        .await
        .expect("exec over WebSocket");
    assert_eq!(
        (o.out(), o.exit_code()),
        ("hello ws".into(), Some(0)),
        "{o:?}"
    );
    assert_eq!(o.status["status"], "Success");
    eprintln!("WebSocket exec round trip: {:?}", t0.elapsed());

    // WebSocket v4, no stdin: both outputs and the exit code.
    let url = exec_url(
        rt,
        &pod.echo,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        false,
        false,
    )
    .await;
    let o = ws_exec(
        &url,
        "v4.channel.k8s.io",
        ExecIo {
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (o.out(), o.err(), o.exit_code()),
        ("out\n".into(), "err\n".into(), Some(7)),
        "{o:?}"
    );

    // A command that does not exist: a Failure status, not a hang.
    let url = exec_url(rt, &pod.echo, &["/no/such/binary"], false, false).await;
    let o = spdy_exec(
        &url,
        "v4.channel.k8s.io",
        ExecIo {
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(o.status["status"], "Failure", "{o:?}");
    assert!(
        o.status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/no/such/binary"),
        "{o:?}"
    );

    // Attach over SPDY to a stdin_once container: its stdin ends with ours.
    let url = attach_url(rt, &pod.reader, false).await;
    let io = ExecIo {
        stdin: Some(b"a\nb\n"),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let o = spdy_exec(&url, "v4.channel.k8s.io", io)
        .await
        .expect("attach over SPDY");
    assert_eq!(o.out(), "got a\ngot b\nbye\n", "{o:?}");
    assert_eq!(o.status["status"], "Success", "{o:?}");
    // The log still has everything the attached client saw.
    let text = wait_for_log(&logs.join("reader/0.log"), "bye").await;
    let lines: Vec<String> = parse_cri_log(&text).into_iter().map(|e| e.2).collect();
    assert_eq!(lines, ["got a", "got b", "bye"], "{text}");
    wait_state(rt, &pod.reader, cri::ContainerState::ContainerExited).await;

    // Attach over WebSocket to a shell on a terminal.
    let url = attach_url(rt, &pod.shell, true).await;
    let io = ExecIo {
        stdin: Some(b"echo hi-$((40+2)); exit\n"),
        keep_stdin_open: true,
        stdout: true,
        tty: Some((80, 24)),
        ..Default::default()
    };
    let o = ws_exec(&url, "v5.channel.k8s.io", io)
        .await
        .expect("attach over WebSocket");
    assert!(o.out().contains("hi-42"), "{o:?}");
    wait_state(rt, &pod.shell, cri::ContainerState::ContainerExited).await;

    // Port-forward over SPDY: concurrent connections to a server inside
    // the pod, data intact both ways; a closed port answers on the error
    // stream instead of hanging.
    let big: Vec<u8> = (0..251u8).cycle().take(256 * 1024).collect();
    let url = forward_url(rt, &pod.id, &[]).await;
    let conns = [
        (8080, b"one".to_vec()),
        (8080, big.clone()),
        (8080, b"three".to_vec()),
        (9, b"x".to_vec()),
    ];
    let r = spdy_forward(&url, &conns)
        .await
        .expect("port-forward over SPDY");
    assert_eq!(r[0].data, b"one");
    assert!(
        r[1].data == big,
        "256 KiB came back as {} bytes",
        r[1].data.len()
    );
    assert_eq!(r[2].data, b"three");
    assert!(
        r[..3].iter().all(|f| f.error.is_empty()),
        "{:?}",
        &r[..3].iter().map(|f| &f.error).collect::<Vec<_>>()
    );
    assert!(
        r[3].data.is_empty() && r[3].error.contains("refused"),
        "closed port gave {:?}",
        r[3].error
    );

    // Port-forward over WebSocket.
    let url = forward_url(rt, &pod.id, &[8080]).await;
    let r = ws_forward(&url, &[(8080, b"over websocket".to_vec(), 14)])
        .await
        .expect("port-forward over WebSocket");
    assert_eq!(r[0].data, b"over websocket", "{:?}", r[0]);
}

#[test]
fn process_backend_streams() {
    let s = Scratch::new("streaming").unwrap();
    let setup = setup_with(
        &s,
        "[streaming]\ntoken_ttl_secs = 3\nidle_timeout_secs = 3\n",
    );
    let logs = setup.dir.join("pod-logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let pod = pod_with_containers(&mut rt, "", &setup.image, &logs).await;
        streams_work(&mut rt, &pod, &logs).await;

        // A URL works once.
        let url = exec_url(&mut rt, &pod.echo, &["true"], false, false).await;
        let io = || ExecIo {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        assert_eq!(
            spdy_exec(&url, "v4.channel.k8s.io", io())
                .await
                .unwrap()
                .exit_code(),
            Some(0)
        );
        let e = spdy_exec(&url, "v4.channel.k8s.io", io())
            .await
            .expect_err("reused token");
        assert_eq!(refused_code(&e), Some(404), "{e}");
        // It expires (this daemon's TTL is 3 s).
        let url = exec_url(&mut rt, &pod.echo, &["true"], false, false).await;
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let e = ws_exec(&url, "v4.channel.k8s.io", io())
            .await
            .expect_err("expired token");
        assert_eq!(refused_code(&e), Some(404), "{e}");
        // It is bound to its kind, and spent by misuse.
        let url = exec_url(&mut rt, &pod.echo, &["true"], false, false).await;
        let e = spdy_exec(
            &url.replace("/exec/", "/attach/"),
            "v4.channel.k8s.io",
            io(),
        )
        .await
        .expect_err("exec token on /attach");
        assert_eq!(refused_code(&e), Some(400), "{e}");
        let e = spdy_exec(&url, "v4.channel.k8s.io", io())
            .await
            .expect_err("spent token");
        assert_eq!(refused_code(&e), Some(404), "{e}");
        // An unsupported protocol is refused before the token is spent.
        let url = exec_url(&mut rt, &pod.echo, &["true"], false, false).await;
        let e = spdy_exec(&url, "v1.channel.k8s.io", io())
            .await
            .expect_err("v1");
        assert_eq!(refused_code(&e), Some(403), "{e}");
        assert_eq!(
            spdy_exec(&url, "v4.channel.k8s.io", io())
                .await
                .unwrap()
                .exit_code(),
            Some(0)
        );
        // WebSocket port-forward only to the ports the URL was issued for.
        let url = forward_url(&mut rt, &pod.id, &[8080]).await;
        let e = ws_forward(&url, &[(22, b"x".to_vec(), 1)])
            .await
            .expect_err("port outside the request");
        assert_eq!(refused_code(&e), Some(403), "{e}");

        // Malformed SPDY frames reset their stream; the connection goes on.
        let url = forward_url(&mut rt, &pod.id, &[]).await;
        let mut c = Spdy::connect(&url, &["portforward.k8s.io"]).await.unwrap();
        // DATA on a stream never opened.
        c.send(99, b"stray", false).await.unwrap();
        // A PING of the wrong length (control frame, version 3, type 6).
        c.send_raw(vec![0x80, 3, 0, 6, 0, 0, 0, 5, 0, 0, 0, 1, 0])
            .await
            .unwrap();
        // A stream without a streamType, and one with a bad port.
        assert!(c.open(&[("port", "8080")]).await.is_err());
        assert!(c
            .open(&[
                ("streamType", "data"),
                ("port", "99999"),
                ("requestID", "0")
            ])
            .await
            .is_err());
        let mut error = c
            .open(&[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", "1"),
            ])
            .await
            .unwrap();
        let mut data = c
            .open(&[("streamType", "data"), ("port", "8080"), ("requestID", "1")])
            .await
            .unwrap();
        c.send(data.id, b"still works", true).await.unwrap();
        let (d, e) = tokio::time::timeout(STEP, async {
            tokio::join!(data.read_all(), error.read_all())
        })
        .await
        .unwrap();
        assert_eq!((d, e), (b"still works".to_vec(), Vec::new()));
        assert!(
            c.resets.lock().unwrap().contains(&(99, 2)),
            "no INVALID_STREAM reset: {:?}",
            c.resets.lock().unwrap()
        );

        // A WebSocket message outside the protocol closes that connection
        // with a reason; the next one works.
        let url = exec_url(&mut rt, &pod.echo, &["sleep", "1"], false, true).await;
        let (mut ws, _) = ws_connect(&url, "", &["v4.channel.k8s.io"]).await.unwrap();
        use futures_util::{SinkExt, StreamExt};
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            "not binary".into(),
        ))
        .await
        .unwrap();
        let close = tokio::time::timeout(STEP, async {
            while let Some(m) = ws.next().await {
                if let Ok(tokio_tungstenite::tungstenite::Message::Close(f)) = m {
                    return f;
                }
            }
            None
        })
        .await
        .unwrap();
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1003));
        let url = exec_url(&mut rt, &pod.echo, &["echo", "fine"], false, false).await;
        assert_eq!(
            ws_exec(&url, "v4.channel.k8s.io", io())
                .await
                .unwrap()
                .out(),
            "fine\n"
        );

        // A connection quiet for the idle timeout (3 s here) is closed: the
        // client's streams end before the 60 s command does, with no status.
        let url = exec_url(&mut rt, &pod.echo, &["sleep", "60"], false, false).await;
        let t0 = Instant::now();
        let o = spdy_exec(&url, "v4.channel.k8s.io", io()).await.unwrap();
        assert!(
            o.status.is_null() && t0.elapsed() < Duration::from_secs(30),
            "{o:?} after {:?}",
            t0.elapsed()
        );

        // The CRI calls check their requests.
        let code = |r: Result<tonic::Response<cri::ExecResponse>, tonic::Status>| {
            r.expect_err("must fail").code()
        };
        let req = |cmd: &[&str], tty, stdin, stdout, stderr| cri::ExecRequest {
            container_id: pod.echo.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout,
            stderr,
        };
        assert_eq!(
            code(rt.exec(req(&[], false, false, true, true)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(rt.exec(req(&["sh"], true, false, true, true)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(rt.exec(req(&["sh"], false, false, false, false)).await),
            Code::InvalidArgument
        );
        let mut unknown = req(&["sh"], false, false, true, false);
        unknown.container_id = "no-such-container".into();
        assert_eq!(code(rt.exec(unknown).await), Code::NotFound);
        let mut exited = req(&["sh"], false, false, true, false);
        exited.container_id = pod.reader.clone();
        assert_eq!(code(rt.exec(exited).await), Code::FailedPrecondition);
        let attach = |id: &str, stdin, tty| cri::AttachRequest {
            container_id: id.into(),
            stdin,
            tty,
            stdout: true,
            stderr: !tty,
        };
        let acode = |r: Result<tonic::Response<cri::AttachResponse>, tonic::Status>| {
            r.expect_err("must fail").code()
        };
        assert_eq!(
            acode(rt.attach(attach(&pod.echo, true, false)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            acode(rt.attach(attach(&pod.echo, false, true)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            acode(rt.attach(attach(&pod.reader, false, false)).await),
            Code::FailedPrecondition
        );
        let pf = |pod: &str, port: i32| cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![port],
        };
        let pcode = |r: Result<tonic::Response<cri::PortForwardResponse>, tonic::Status>| {
            r.expect_err("must fail").code()
        };
        assert_eq!(
            pcode(rt.port_forward(pf("no-such-pod", 80)).await),
            Code::NotFound
        );
        assert_eq!(
            pcode(rt.port_forward(pf(&pod.id, 70000)).await),
            Code::InvalidArgument
        );
        remove_pod(&mut rt, &pod.id).await;
    });
}

#[test]
fn microvm_streams() {
    let s = Scratch::new("streaming-microvm").unwrap();
    let setup = setup(&s);
    let logs = setup.dir.join("pod-logs");
    rt().block_on(async {
        let (mut rt, mut images) = clients(&setup.daemon).await;
        pull(&mut images, &setup.image).await;
        let pod = pod_with_containers(&mut rt, "vmcri", &setup.image, &logs).await;
        streams_work(&mut rt, &pod, &logs).await;
        remove_pod(&mut rt, &pod.id).await;
    });
}
