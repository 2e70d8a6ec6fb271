//! Sandbox records on disk: one JSON file per sandbox, replaced
//! atomically (write, fsync, rename), so a daemon killed at any moment
//! restarts with every record either old or new, never torn.

use crate::config::Backend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Pod metadata from the CRI request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Attempt number.
    pub attempt: u32,
}

/// Whether a sandbox can run containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Running, its agent answering.
    Ready,
    /// Stopped, failed, or its VM/agent died.
    NotReady,
}

/// The process behind a sandbox (the VMM, or the agent on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// PID.
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22),
    /// which tells our process from a later one reusing the PID.
    pub start_ticks: u64,
}

/// The pod-level namespace modes RunPodSandbox asked for, as CRI's
/// `NamespaceMode` values (0 POD, 1 CONTAINER, 2 NODE, 3 TARGET), kept to
/// echo them in PodSandboxStatus: kubelet recreates a sandbox whose
/// status says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceModes {
    /// Network namespace mode.
    pub network: i32,
    /// PID namespace mode.
    pub pid: i32,
    /// IPC namespace mode.
    pub ipc: i32,
}

impl NamespaceModes {
    /// The pod runs on the node's network (`hostNetwork`).
    pub fn host_network(&self) -> bool {
        self.network == k8s_cri::v1::NamespaceMode::Node as i32
    }
}

/// Everything the daemon knows about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox ID (64 hex digits).
    pub id: String,
    /// Pod metadata.
    pub meta: PodMeta,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// RuntimeClass handler that ran it.
    pub handler: String,
    /// Its backend.
    pub backend: Backend,
    /// Creation time, nanoseconds since the epoch.
    pub created_at_ns: i64,
    /// State.
    pub state: SandboxState,
    /// Why it is not ready, if it is not.
    pub reason: Option<String>,
    /// Its process, while one runs.
    pub process: Option<ProcessRef>,
    /// Where its agent listens (vsock.sock or agent.sock).
    pub agent_socket: PathBuf,
    /// Its private directory.
    pub dir: PathBuf,
    /// The pod's log directory from kubelet.
    pub log_directory: String,
    /// Hostname.
    pub hostname: String,
    /// Pod-level namespace modes (records from before they were kept
    /// read as all-POD, the default).
    #[serde(default)]
    pub namespaces: NamespaceModes,
}

/// Errors of the store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// I/O on the state root.
    #[error("state store {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A record that cannot be encoded.
    #[error("encoding sandbox record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The sandbox records under `<root>/sandboxes/`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Replaces `path` with `data` so that a crash at any moment leaves the
/// old or the new content, never a torn file: write a sibling, fsync it,
/// rename it over `path`, fsync the directory.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A temporary name beside `path` that no concurrent save shares:
/// `.<name>.<pid>.<counter>.tmp`.
fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Creates `dir` and its missing parents, each private to root (0700);
/// an existing `dir` is made 0700 too.
pub fn private_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Store {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let dir = root.join("sandboxes");
        private_dirs(&dir).map_err(io_err(&dir))?;
        // A private mount of its own: pods' binds stay in this namespace.
        std::fs::File::open(root)
            .and_then(|parent| {
                crate::hostfs::mounts::private_root(
                    std::os::fd::AsFd::as_fd(&parent),
                    std::ffi::OsStr::new("sandboxes"),
                )
            })
            .map_err(io_err(&dir))?;
        Ok(Store { dir })
    }

    /// The private directory of sandbox `id`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("sandbox.json")
    }

    /// Writes `rec` atomically.
    pub fn save(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(&rec.id);
        private_dirs(&dir).map_err(io_err(&dir))?;
        let path = self.record_path(&rec.id);
        let data = serde_json::to_vec_pretty(rec)?;
        write_atomically(&path, &data).map_err(io_err(&path))
    }

    /// Removes sandbox `id`'s record and directory.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(id);
        // Unbind the share first; removal never deletes through a mount
        // (a pod's share binds host volumes) nor follows a symlink.
        crate::shared::SharedDir::new(&dir)
            .release_all()
            .and_then(|()| crate::hostfs::remove::remove_tree(&dir))
            .map_err(io_err(&dir))
    }

    /// Every readable record. A record that cannot be parsed is reported
    /// and skipped, never fatal: one bad file must not stop the daemon.
    pub fn load_all(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let path = entry.path().join("sandbox.json");
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<SandboxRecord>(&bytes) {
                    Ok(rec) => out.push(rec),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "skipping unreadable sandbox record")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "skipping unreadable sandbox record")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            meta: PodMeta {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 0,
            },
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: BTreeMap::new(),
            handler: "vmcri".into(),
            backend: Backend::Process,
            created_at_ns: 1,
            state: SandboxState::Ready,
            reason: None,
            process: Some(ProcessRef {
                pid: 42,
                start_ticks: 7,
            }),
            agent_socket: "/x".into(),
            dir: "/d".into(),
            log_directory: String::new(),
            hostname: "h".into(),
            namespaces: NamespaceModes::default(),
        }
    }

    /// A store root whose `sandboxes` mount is undone when dropped.
    struct Root(tempfile::TempDir);

    impl Root {
        fn new() -> Root {
            Root(tempfile::tempdir().unwrap())
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            if let Ok(d) = std::fs::File::open(self.0.path()) {
                let _ = crate::hostfs::mounts::unmount_at(&d, std::ffi::OsStr::new("sandboxes"));
            }
        }
    }

    #[test]
    fn sandboxes_is_a_private_mount_and_opening_again_keeps_one() {
        let root = Root::new();
        Store::open(root.path()).unwrap();
        Store::open(root.path()).unwrap();
        let sandboxes = root.path().join("sandboxes");
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours: Vec<&str> = info
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(sandboxes.to_str().unwrap()))
            .collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        // Optional fields (shared:N, master:N) would name a peer group.
        let optional: Vec<&str> = ours[0]
            .split(' ')
            .skip(6)
            .take_while(|f| *f != "-")
            .collect();
        assert!(optional.is_empty(), "not private: {}", ours[0]);
        let mode = std::fs::metadata(&sandboxes).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn concurrent_saves_of_one_record_never_tear_it() {
        let root = Root::new();
        let store = Store::open(root.path()).unwrap();
        std::thread::scope(|s| {
            for i in 0..8 {
                let store = &store;
                s.spawn(move || {
                    let mut r = record("same");
                    r.hostname = format!("h{i}");
                    for _ in 0..20 {
                        store.save(&r).unwrap();
                    }
                });
            }
        });
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        // No temporary file is left beside the record.
        let left: Vec<_> = std::fs::read_dir(store.sandbox_dir("same"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("sandbox.json")]);
    }

    #[test]
    fn records_round_trip_and_remove() {
        let root = Root::new();
        let store = Store::open(root.path()).unwrap();
        store.save(&record("a")).unwrap();
        let mut b = record("b");
        store.save(&b).unwrap();
        b.state = SandboxState::NotReady;
        store.save(&b).unwrap();
        let mut all = store.load_all().unwrap();
        all.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(all, vec![record("a"), b]);
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_record_is_skipped() {
        let root = Root::new();
        let store = Store::open(root.path()).unwrap();
        store.save(&record("good")).unwrap();
        std::fs::create_dir_all(store.sandbox_dir("bad")).unwrap();
        std::fs::write(store.record_path("bad"), b"{ torn").unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "good");
    }
}
