//! The daemon's services wired as `vmcri serve` wires them, over a
//! [`FakeBackend`] and a temporary state root: CRI rules tested in
//! seconds, with no VM and no host process.

use super::backend::FakeBackend;
use crate::backend::Backends;
use crate::cgroup::PodCgroups;
use crate::config::Config;
use crate::container::Containers;
use crate::cri::Cri;
use crate::images::Images;
use crate::network::Network;
use crate::sandbox::Sandboxes;
use crate::store::Store;
use crate::streams::StreamHandler;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The busybox-like image every test container runs.
pub(crate) const IMAGE: &str = "registry.test/busybox:1";

/// A state root whose `sandboxes` mount is undone when dropped.
pub(crate) struct Root(tempfile::TempDir);

impl Root {
    pub(crate) fn new() -> Root {
        Root(tempfile::tempdir().expect("a temporary directory"))
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(d) = std::fs::File::open(self.0.path()) {
            for name in ["sandboxes", "netns"] {
                let _ = crate::hostfs::mounts::unmount_at(&d, std::ffi::OsStr::new(name));
            }
        }
    }
}

/// A daemon: its CRI services, the backend behind them, and its root.
pub(crate) struct Daemon {
    /// The RuntimeService and ImageService.
    pub cri: Arc<Cri>,
    /// The sandbox service under them.
    pub sandboxes: Arc<Sandboxes>,
    /// The container service under them.
    pub containers: Arc<Containers>,
    /// The image service.
    pub images: Arc<Images>,
    /// The backend every handler uses.
    pub backend: Arc<FakeBackend>,
    // Dropped last: the services hold paths under it.
    root: Arc<Root>,
}

impl Daemon {
    /// A fresh daemon with [`IMAGE`] pulled.
    pub(crate) async fn start() -> Daemon {
        let d = Daemon::open(Arc::new(Root::new()), Arc::new(FakeBackend::new())).await;
        d.images.add_local(
            IMAGE,
            &serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": []}
            }),
        );
        d
    }

    /// This daemon's root and backend, to open it again (a restart: run
    /// each incarnation on a runtime of its own and drop that runtime, so
    /// no task of the old one lives on).
    pub(crate) fn parts(&self) -> (Arc<Root>, Arc<FakeBackend>) {
        (self.root.clone(), self.backend.clone())
    }

    /// The daemon of `root`, recovered from what its store holds.
    pub(crate) async fn open(root: Arc<Root>, backend: Arc<FakeBackend>) -> Daemon {
        // Pods without CNI unless a test sets it up.
        Daemon::open_with(root, backend, |c| c.cni.enabled = false).await
    }

    /// As [`Daemon::open`], its configuration changed by `tweak` first.
    pub(crate) async fn open_with(
        root: Arc<Root>,
        backend: Arc<FakeBackend>,
        tweak: impl FnOnce(&mut Config),
    ) -> Daemon {
        let mut config = Config::load(None).expect("the embedded configuration loads");
        config.root = root.path().to_path_buf();
        tweak(&mut config);
        let config = Arc::new(config);
        let network = Arc::new(Network::new(&config).expect("pod networking"));
        let store = Store::open(root.path()).expect("the store opens");
        let snapshot = store.load().expect("the store loads");
        let sandboxes = Arc::new(
            Sandboxes::recover(
                config.clone(),
                store.clone(),
                Backends::only(backend.clone()),
                // No process stands behind a fake sandbox.
                Arc::new(PodCgroups::over(None, &config).expect("the default cgroup parent")),
                network,
                snapshot.sandboxes,
            )
            .expect("sandboxes recover"),
        );
        let images = Arc::new(
            Images::open(root.path(), store, snapshot.images, Default::default())
                .expect("the image store opens"),
        );
        let containers =
            Containers::recover(sandboxes.clone(), images.clone(), snapshot.containers);
        let streaming = vmcri_streaming::Server::start(
            vmcri_streaming::Config {
                address: "127.0.0.1:0".parse().expect("an address"),
                token_ttl: Duration::from_secs(60),
                stream_creation_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(5),
            },
            Arc::new(StreamHandler::new(containers.clone())),
        )
        .await
        .expect("the streaming server starts");
        let cri = Arc::new(Cri::new(
            config,
            sandboxes.clone(),
            containers.clone(),
            images.clone(),
            Arc::new(streaming),
        ));
        Daemon {
            cri,
            sandboxes,
            containers,
            images,
            backend,
            root,
        }
    }
}
