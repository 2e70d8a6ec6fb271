//! The daemon's state on disk, in one place: sandbox, container and image
//! records, each replaced atomically (write, fsync, rename), so a daemon
//! killed at any moment restarts with every record either old or new,
//! never torn. [`Store::load`] is the one entry point of recovery.
//!
//! ```text
//! <root>/images.json                          the image table
//! <root>/sandboxes/<id>/sandbox.json          a sandbox
//! <root>/sandboxes/<id>/containers/<c>.json   its containers
//! <root>/sandboxes/<id>/containers/<c>.logpos where each log copy stands
//! ```

mod container;
mod image;
mod sandbox;

pub use container::{ContainerRecord, ContainerState, MountRecord};
pub use image::ImageRecord;
pub use sandbox::{NamespaceModes, PodMeta, ProcessRef, SandboxRecord, SandboxState};

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

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
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Everything recovery starts from, as found on disk.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every readable sandbox record.
    pub sandboxes: Vec<SandboxRecord>,
    /// Every readable container record of those sandboxes.
    pub containers: Vec<ContainerRecord>,
    /// The image table, by image ID.
    pub images: BTreeMap<String, ImageRecord>,
}

/// The records under a state root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    sandboxes: PathBuf,
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
        Ok(Store {
            root: root.to_path_buf(),
            sandboxes: dir,
        })
    }

    /// Reads every record: what recovery starts from. A record that cannot
    /// be parsed is reported and skipped, never fatal: one bad file must
    /// not stop the daemon.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let sandboxes = self.load_sandboxes()?;
        let containers = sandboxes
            .iter()
            .flat_map(|s| container::load_all(&self.sandbox_dir(&s.id)))
            .collect();
        Ok(Snapshot {
            sandboxes,
            containers,
            images: image::load(&self.root),
        })
    }

    /// The private directory of sandbox `id`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.sandboxes.join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("sandbox.json")
    }

    /// Writes sandbox record `rec` atomically.
    pub fn save_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(&rec.id);
        private_dirs(&dir).map_err(io_err(&dir))?;
        let path = self.record_path(&rec.id);
        let data = serde_json::to_vec_pretty(rec)?;
        write_atomically(&path, &data).map_err(io_err(&path))
    }

    /// Removes sandbox `id`'s directory with its records. Removal stops
    /// at any mount and never follows a symlink, so the backend must have
    /// released what it bound there first.
    pub fn remove_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.sandbox_dir(id);
        crate::hostfs::remove::remove_tree(&dir).map_err(io_err(&dir))
    }

    fn load_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.sandboxes).map_err(io_err(&self.sandboxes))? {
            let entry = entry.map_err(io_err(&self.sandboxes))?;
            if let Some(rec) = read_record(&entry.path().join("sandbox.json")) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Writes container record `rec` atomically, beside its sandbox's.
    pub fn save_container(&self, rec: &ContainerRecord) -> Result<(), StoreError> {
        container::save(&self.sandbox_dir(&rec.sandbox_id), rec)
    }

    /// Removes container `id`'s records (and its log position); a record
    /// already gone is not an error.
    pub fn remove_container(&self, sandbox_id: &str, id: &str) -> Result<(), StoreError> {
        container::remove(&self.sandbox_dir(sandbox_id), id)
    }

    /// Where the log copy of container `id` records its position.
    pub fn log_position_path(&self, sandbox_id: &str, id: &str) -> PathBuf {
        container::log_position_path(&self.sandbox_dir(sandbox_id), id)
    }

    /// Writes the image table atomically.
    pub fn save_images(&self, images: &BTreeMap<String, ImageRecord>) -> Result<(), StoreError> {
        image::save(&self.root, images)
    }

    /// The image table of the state root `root`, read without opening a
    /// store (`vmcri images prune` runs beside a serving daemon).
    pub fn read_images(root: &Path) -> BTreeMap<String, ImageRecord> {
        image::load(root)
    }
}

/// A JSON record at `path`: `None` if it is absent, or unreadable (which
/// is logged).
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "skipping unreadable record");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(
            |e| tracing::error!(path = %path.display(), error = %e, "skipping unreadable record"),
        )
        .ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Backend;

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
            cgroup: None,
            netns: None,
            network: None,
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
                        store.save_sandbox(&r).unwrap();
                    }
                });
            }
        });
        let all = store.load().unwrap().sandboxes;
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
        store.save_sandbox(&record("a")).unwrap();
        let mut b = record("b");
        store.save_sandbox(&b).unwrap();
        b.state = SandboxState::NotReady;
        store.save_sandbox(&b).unwrap();
        let mut all = store.load().unwrap().sandboxes;
        all.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(all, vec![record("a"), b]);
        store.remove_sandbox("a").unwrap();
        store.remove_sandbox("a").unwrap();
        assert_eq!(store.load().unwrap().sandboxes.len(), 1);
    }

    #[test]
    fn records_from_before_cgroups_load_and_new_ones_keep_theirs() {
        let root = Root::new();
        let store = Store::open(root.path()).unwrap();
        let mut old = serde_json::to_value(record("old")).unwrap();
        old.as_object_mut().unwrap().remove("cgroup");
        std::fs::create_dir_all(store.sandbox_dir("old")).unwrap();
        std::fs::write(store.record_path("old"), old.to_string()).unwrap();
        let mut new = record("new");
        new.cgroup = Some("/kubepods/pod1/vmcri-new".into());
        store.save_sandbox(&new).unwrap();
        let mut all = store.load().unwrap().sandboxes;
        all.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(all, vec![new, record("old")]);
    }

    #[test]
    fn a_corrupt_record_is_skipped() {
        let root = Root::new();
        let store = Store::open(root.path()).unwrap();
        store.save_sandbox(&record("good")).unwrap();
        std::fs::create_dir_all(store.sandbox_dir("bad")).unwrap();
        std::fs::write(store.record_path("bad"), b"{ torn").unwrap();
        let all = store.load().unwrap().sandboxes;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "good");
    }
}
