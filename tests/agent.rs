//! The guest agent answers over hybrid vsock from inside a microVM, and
//! over a Unix socket on the host; guest-initiated vsock connections reach
//! host listeners; a VMM killed mid-stream fails the host side cleanly.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmcri_agent_client::{Agent, AgentAddr, ClientError};
use vmcri_tests::{artifacts, write_initramfs, Scratch};

/// Host-side limits; a guest boot takes ~50 s here with the agent's
/// initramfs, far less on bare metal.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn spawn_vm(initrd: &std::path::Path, vsock: &std::path::Path, extra: &str) -> Child {
    let a = artifacts();
    Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "128", "--vcpus", "1", "--timeout", "400"])
        .arg("--vsock")
        .arg(vsock)
        .args(["--cmdline", &format!("quiet {extra}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn agent_in_a_microvm_answers_over_hybrid_vsock_and_a_killed_vmm_fails_cleanly() {
    let a = artifacts();
    let scratch = Scratch::new("agent-vm").unwrap();
    let uds = scratch.0.join("vsock.sock");
    let mut vm = spawn_vm(&a.agent_initrd, &uds, "");
    let rt = runtime();
    let result = rt.block_on(async {
        let agent = Agent::connect(AgentAddr::vm(&uds), BOOT_DEADLINE, CALL_TIMEOUT).await?;
        agent.health().await?;
        let info = agent.guest_info().await?;
        assert_eq!(info.api_version, 1);
        assert_eq!(info.cpus, 1);
        assert!(info.kernel_release.starts_with("6.1."), "{info:?}");
        assert!(
            info.memory_bytes > 64 << 20 && info.memory_bytes <= 128 << 20,
            "{info:?}"
        );
        assert_eq!(agent.probe(1 << 20, 0, CALL_TIMEOUT).await?, 1 << 20);

        // Kill the VMM in the middle of a long stream: the host side must
        // fail promptly, not hang.
        let streaming = {
            let agent = agent.clone();
            tokio::spawn(async move { agent.probe(1 << 30, 0, Duration::from_secs(600)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        vm.kill().unwrap();
        let killed_at = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(20), streaming).await;
        let outcome = outcome.expect("host side hung after the VMM died").unwrap();
        assert!(
            matches!(outcome, Err(ClientError::Rpc { .. })),
            "{outcome:?}"
        );
        assert!(killed_at.elapsed() < Duration::from_secs(20));
        // And new calls fail fast too.
        assert!(agent.health().await.is_err());
        Ok::<_, ClientError>(())
    });
    let _ = vm.kill();
    let out = vm.wait_with_output().unwrap();
    if let Err(e) = result {
        panic!(
            "{e}\n--- console ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn agent_shutdown_ends_the_vm_cleanly() {
    let a = artifacts();
    let scratch = Scratch::new("agent-shutdown").unwrap();
    let uds = scratch.0.join("vsock.sock");
    let vm = spawn_vm(&a.agent_initrd, &uds, "");
    let rt = runtime();
    let result = rt.block_on(async {
        let agent = Agent::connect(AgentAddr::vm(&uds), BOOT_DEADLINE, CALL_TIMEOUT).await?;
        agent.shutdown().await
    });
    let out = vm.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(result.is_ok(), "{result:?}\n{console}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn guest_initiated_vsock_connection_reaches_the_host_listener() {
    let a = artifacts();
    let scratch = Scratch::new("vsock-dial").unwrap();
    let uds = scratch.0.join("vsock.sock");
    let mut port_path = uds.clone().into_os_string();
    port_path.push("_5000");
    let listener = UnixListener::bind(&port_path).unwrap();
    let initrd = scratch.0.join("init.cpio");
    write_initramfs(&a.guest_init, &initrd).unwrap();
    let vm = spawn_vm(&initrd, &uds, "vmcri_test=vsock-dial");
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(b"pong\n").unwrap();
        line
    });
    let out = vm.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("vsock-dial: got \"pong\""),
        "{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.join().unwrap(), "hello from the guest\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_refused() {
    // Without a host listener on port 5000 the guest's connect is reset.
    let a = artifacts();
    let scratch = Scratch::new("vsock-refused").unwrap();
    let uds = scratch.0.join("vsock.sock");
    let initrd = scratch.0.join("init.cpio");
    write_initramfs(&a.guest_init, &initrd).unwrap();
    let out = spawn_vm(&initrd, &uds, "vmcri_test=vsock-dial")
        .wait_with_output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("vsock-dial: error: Connection reset by peer"),
        "{console}"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn agent_on_a_unix_socket_serves_the_same_api() {
    let a = artifacts();
    let scratch = Scratch::new("agent-unix").unwrap();
    let sock = scratch.0.join("agent.sock");
    let mut agent_proc = Command::new(&a.agent)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = runtime();
    let result = rt.block_on(async {
        let agent = Agent::connect(AgentAddr::Unix(sock.clone()), Duration::from_secs(20), CALL_TIMEOUT).await?;
        let info = agent.guest_info().await?;
        assert_eq!(info.api_version, 1);
        assert_eq!(agent.probe(4 << 20, 0, CALL_TIMEOUT).await?, 4 << 20);
        // Out-of-range requests are refused with InvalidArgument.
        let err = agent.probe(u64::MAX, 0, CALL_TIMEOUT).await.unwrap_err();
        assert!(matches!(&err, ClientError::Rpc { status, .. } if status.code() == tonic_code_invalid_argument()), "{err}");
        agent.shutdown().await
    });
    assert!(result.is_ok(), "{result:?}");
    let status = agent_proc.wait().unwrap();
    assert!(
        status.success(),
        "agent exits 0 after Shutdown outside a VM"
    );
}

fn tonic_code_invalid_argument() -> vmcri_agent_client::Code {
    vmcri_agent_client::Code::InvalidArgument
}
