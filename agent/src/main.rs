//! `vmcri-agent`: PID 1 of a vmcri pod VM. Sets the guest up, then serves
//! the agent API over vsock (or a Unix socket for tests without a VM).

mod engine;
mod forward;
mod init;
mod network;
mod service;
mod transport;

use anyhow::{Context, Result};
use clap::Parser;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use transport::Listen;
use vmcri_proto::agent::v1::agent_server::AgentServer;
use vmcri_proto::AGENT_VSOCK_PORT;

/// Largest request the agent decodes (OCI specs and stdin chunks fit).
const MAX_MESSAGE: usize = 16 << 20;

/// The vmcri guest agent.
#[derive(Debug, Parser)]
#[command(name = "vmcri-agent", version)]
struct Args {
    /// Where to serve: vsock:PORT or unix:PATH.
    #[arg(long, default_value_t = format!("vsock:{AGENT_VSOCK_PORT}"))]
    listen: String,
    /// Where container state, bundles and writable layers live (in the
    /// process backend a tmpfs is mounted there, in the sandbox's mount
    /// namespace).
    #[arg(long, default_value = "/run/vmcri")]
    state: std::path::PathBuf,
}

fn main() {
    let pid1 = std::process::id() == 1;
    // As PID 1 the kernel hands us its unknown options as arguments
    // (`noxsave`, ...): parse leniently there.
    let args = if pid1 {
        Args::try_parse().unwrap_or(Args {
            listen: format!("vsock:{AGENT_VSOCK_PORT}"),
            state: "/run/vmcri".into(),
        })
    } else {
        Args::parse()
    };
    // Log through a private copy of stderr: the container engine logs
    // from processes whose fd 2 is already the container's stderr, and
    // agent logs must never land in a container's output.
    let log = init::private_stderr();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMCRI_LOG")
                // libcgroups warns about every controller a host lacks,
                // libcontainer about the seccomp support we build without.
                .unwrap_or_else(|_| {
                    "warn,libcgroups=error,libcontainer::process::init::process=error".into()
                }),
        )
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(ansi)
        .init();
    // On a host (the process backend) the runtime gives us a fresh PID
    // namespace for our children: fork once so the agent itself is that
    // namespace's init, as it is in a VM, and the pod's processes die with it.
    let ns_init = !pid1 && init::pid_namespace_pending() && init::become_namespace_init();
    let result = run(pid1, ns_init, &args);
    if let Err(e) = &result {
        eprintln!("vmcri-agent: {e:#}");
    }
    if pid1 {
        // PID 1 must never exit: that panics the kernel. End the VM instead.
        let e = init::reboot();
        eprintln!("vmcri-agent: reboot failed: {e}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

fn run(pid1: bool, ns_init: bool, args: &Args) -> Result<()> {
    let listen: Listen = args.listen.parse().map_err(anyhow::Error::msg)?;
    if pid1 {
        init::leave_initramfs().context("moving the root off the initramfs")?;
        init::mount_filesystems().context("mounting boot filesystems")?;
        init::hostname_from_cmdline().context("setting the pod's hostname")?;
        match init::mount_shared() {
            Ok(true) => {}
            Ok(false) => eprintln!("vmcri-agent: no virtio-fs share; containers cannot start"),
            Err(e) => return Err(e).context("mounting the pod's virtio-fs share"),
        }
    }
    if ns_init {
        // PIDs we see must match /proc, which the container engine reads.
        init::mount_private_proc().context("mounting /proc for the PID namespace")?;
        // Our mount namespace is the sandbox's own: container scratch
        // space there lives in memory and goes with the sandbox.
        init::mount_state_tmpfs(&args.state)
            .with_context(|| format!("mounting a tmpfs on {}", args.state.display()))?;
    }
    let engine = std::sync::Arc::new(
        engine::Engine::new(&args.state)
            .with_context(|| format!("container state in {}", args.state.display()))?,
    );
    // In a VM, and in the fresh network namespace of the process backend,
    // lo starts down.
    if let Err(e) = init::loopback_up() {
        if pid1 {
            return Err(e).context("bringing up lo");
        }
        tracing::warn!(error = %e, "cannot bring up lo");
    }
    // One thread: on kvm-pvm hosts guest user code runs natively with AVX
    // while the guest kernel (noxsave) only switches SSE state, so two
    // guest threads using AVX corrupt each other's registers. A single
    // agent thread is also the lighter choice on any host.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(listen, engine))
}

async fn serve(listen: Listen, engine: Arc<engine::Engine>) -> Result<()> {
    let shutdown = Arc::new(Notify::new());
    // Always reap: container processes are our children, and as an
    // init we also inherit orphans.
    tokio::spawn(async {
        let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        else {
            tracing::error!("cannot watch SIGCHLD; exits will not be seen");
            return;
        };
        // Children may have ended before the handler was installed.
        engine::reaper::reap();
        while sigchld.recv().await.is_some() {
            engine::reaper::reap();
        }
    });
    let service = AgentServer::new(service::AgentService::new(shutdown.clone(), engine))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service);
    let stop = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.notified().await;
            // Let the Shutdown reply reach the host before the VM goes.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match listen {
        Listen::Vsock(port) => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                if let Err(e) = transport::accept_vsock(port, tx).await {
                    tracing::error!(error = %e, port, "vsock listener failed");
                }
            });
            eprintln!("vmcri-agent: serving on vsock port {port}");
            router
                .serve_with_incoming_shutdown(ReceiverStream::new(rx), stop)
                .await?;
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("bind {}", path.display()))?;
            // Only root may drive the agent, whatever the umask (the
            // runtime keeps the socket's directory 0700 as well).
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("chmod {}", path.display()))?;
            eprintln!("vmcri-agent: serving on unix:{}", path.display());
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
                .await?;
        }
    }
    Ok(())
}
