//! `vmcri-agent`: PID 1 of a vmcri pod VM. Sets the guest up, then serves
//! the agent API over vsock (or a Unix socket for tests without a VM).

mod init;
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
}

fn main() {
    let pid1 = std::process::id() == 1;
    // As PID 1 the kernel hands us its unknown options as arguments
    // (`noxsave`, ...): parse leniently there.
    let args = if pid1 {
        Args::try_parse().unwrap_or(Args {
            listen: format!("vsock:{AGENT_VSOCK_PORT}"),
        })
    } else {
        Args::parse()
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMCRI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = run(pid1, &args);
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

fn run(pid1: bool, args: &Args) -> Result<()> {
    let listen: Listen = args.listen.parse().map_err(anyhow::Error::msg)?;
    if pid1 {
        init::mount_filesystems().context("mounting boot filesystems")?;
    }
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
    runtime.block_on(serve(pid1, listen))
}

async fn serve(pid1: bool, listen: Listen) -> Result<()> {
    let shutdown = Arc::new(Notify::new());
    if pid1 {
        tokio::spawn(async {
            let Ok(mut sigchld) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            else {
                tracing::error!("cannot watch SIGCHLD; orphans will not be reaped");
                return;
            };
            while sigchld.recv().await.is_some() {
                init::reap_zombies();
            }
        });
    }
    let service = AgentServer::new(service::AgentService::new(shutdown.clone()))
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
            eprintln!("vmcri-agent: serving on unix:{}", path.display());
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
                .await?;
        }
    }
    Ok(())
}
