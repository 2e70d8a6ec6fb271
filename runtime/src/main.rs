//! `vmcri`: the CRI daemon (`vmcri serve`) and its helpers.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::UnixListenerStream;
use vmcri_runtime::backend::Backends;
use vmcri_runtime::cgroup::PodCgroups;
use vmcri_runtime::config::{Backend, Config, DEFAULT_CONFIG};
use vmcri_runtime::container::Containers;
use vmcri_runtime::cri::Cri;
use vmcri_runtime::images::Images;
use vmcri_runtime::network::Network;
use vmcri_runtime::sandbox::Sandboxes;
use vmcri_runtime::store::Store;
use vmcri_runtime::streams::StreamHandler;

/// Largest CRI request accepted.
const MAX_REQUEST: usize = 16 << 20;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Microvm,
    Process,
}

/// vmcri: a Kubernetes container runtime that runs every pod in its own microVM.
#[derive(Debug, Parser)]
#[command(name = "vmcri", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve CRI v1 (RuntimeService and ImageService) on a Unix socket.
    Serve {
        /// TOML configuration laid over the embedded defaults (`vmcri config`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// CRI socket path.
        #[arg(long)]
        listen: Option<PathBuf>,
        /// State root.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Backend of the default runtime handler.
        #[arg(long, value_enum)]
        sandbox_backend: Option<BackendArg>,
    },
    /// Print the embedded default configuration, with every key documented.
    Config,
    /// Manage the image store.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Delete blobs and layers no image references, and leftovers of
    /// interrupted pulls. Safe while `vmcri serve` runs on the same root.
    Prune {
        /// TOML configuration (for its state root).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State root (overrides the configuration).
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMCRI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Config => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Images {
            command: ImagesCommand::Prune { config, root },
        } => {
            let cfg = Config::load(config.as_deref())?;
            let root = root.unwrap_or(cfg.root);
            let stats = Images::prune(&root)
                .with_context(|| format!("pruning the image store under {}", root.display()))?;
            println!(
                "deleted {} blobs and {} unpacked layers",
                stats.blobs, stats.layers
            );
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            root,
            sandbox_backend,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(r) = root {
                cfg.root = r;
            }
            if let Some(b) = sandbox_backend {
                let default = cfg.default_handler.clone();
                if let Some(h) = cfg.handlers.get_mut(&default) {
                    h.backend = match b {
                        BackendArg::Microvm => Backend::Microvm,
                        BackendArg::Process => Backend::Process,
                    };
                }
            }
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(serve(Arc::new(cfg)))
        }
    }
}

async fn serve(config: Arc<Config>) -> Result<()> {
    for (name, h) in &config.handlers {
        if !h.backend.isolates_with_a_vm() {
            tracing::warn!(handler = %name, "handler uses the process backend: its pods run on the host in namespaces, WITHOUT VM isolation");
        }
    }
    // Host state is private to root: no local user may enter a pod's files.
    vmcri_runtime::store::private_dirs(&config.root)
        .with_context(|| format!("creating state root {}", config.root.display()))?;
    let store = Store::open(&config.root)?;
    let snapshot = store.load()?;
    let cgroups = PodCgroups::new(&config).context("pod cgroups ([cgroups])")?;
    match cgroups.hierarchy() {
        Some(h) => tracing::info!(hierarchy = ?h, "microVM pods run in host cgroups"),
        None => {
            tracing::warn!("[cgroups] enabled = false: VMMs run unlimited in the daemon's cgroup")
        }
    }
    let network = Network::new(&config).context("pod networking ([cni])")?;
    if let Err((reason, message)) = network.ready() {
        tracing::warn!(reason, message, "pod network not ready");
    }
    let sandboxes = Arc::new(Sandboxes::recover(
        config.clone(),
        store.clone(),
        Backends::new(config.clone()),
        Arc::new(cgroups),
        Arc::new(network),
        snapshot.sandboxes,
    )?);
    sandboxes.recover_network().await;
    if let Some(dir) = config.listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = vmcri_runtime::socket::bind_private(&config.listen)
        .with_context(|| format!("binding {}", config.listen.display()))?;
    let images = Arc::new(
        Images::open(
            &config.root,
            store,
            snapshot.images,
            config.registries.clone(),
        )?
        .with_limits(config.images),
    );
    let containers = Containers::recover(sandboxes.clone(), images.clone(), snapshot.containers);
    let streaming = vmcri_streaming::Server::start(
        vmcri_streaming::Config {
            address: config.streaming.address,
            token_ttl: Duration::from_secs(config.streaming.token_ttl_secs),
            stream_creation_timeout: Duration::from_secs(
                config.streaming.stream_creation_timeout_secs,
            ),
            idle_timeout: Duration::from_secs(config.streaming.idle_timeout_secs),
        },
        Arc::new(StreamHandler::new(containers.clone())),
    )
    .await
    .with_context(|| format!("streaming server on {}", config.streaming.address))?;
    let cri = Arc::new(Cri::new(
        config.clone(),
        sandboxes,
        containers,
        images,
        Arc::new(streaming),
    ));
    let runtime =
        RuntimeServiceServer::from_arc(cri.clone()).max_decoding_message_size(MAX_REQUEST);
    let images = ImageServiceServer::from_arc(cri).max_decoding_message_size(MAX_REQUEST);
    tracing::info!(socket = %config.listen.display(), root = %config.root.display(), "vmcri serving CRI v1");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Pods keep running: a restarted daemon picks them up again.
        tracing::info!("vmcri stopping; pods keep running");
    };
    tonic::transport::Server::builder()
        .add_service(runtime)
        .add_service(images)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
