//! Container records: what the daemon knows about each container, kept
//! beside its sandbox's record (`containers/<id>.json`).

use super::{io_err, read_record, write_atomically, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Started and not known to have ended.
    Running,
    /// Ended (or never able to start).
    Exited,
}

/// A CRI mount as recorded for ContainerStatus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Path in the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Read-only.
    pub readonly: bool,
    /// CRI propagation value.
    pub propagation: i32,
}

/// Everything the daemon knows about a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Container ID.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// Metadata name.
    pub name: String,
    /// Metadata attempt.
    pub attempt: u32,
    /// The image as the user named it.
    pub image: String,
    /// The image ID (config digest).
    pub image_ref: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// State.
    pub state: ContainerState,
    /// Created, ns since the epoch.
    pub created_at_ns: i64,
    /// Started (0: never).
    pub started_at_ns: i64,
    /// Finished (0: not yet).
    pub finished_at_ns: i64,
    /// Exit code once exited.
    pub exit_code: i32,
    /// CRI reason (Completed, Error, OOMKilled, ...).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Absolute log path, or empty for no log.
    pub log_path: String,
    /// CRI mounts.
    pub mounts: Vec<MountRecord>,
    /// UID it runs as.
    pub uid: u32,
    /// GID it runs as.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Whether it has a stdin (attach writes to it).
    #[serde(default)]
    pub stdin: bool,
    /// Its stdin closes when the first attached client closes its own.
    #[serde(default)]
    pub stdin_once: bool,
    /// It runs on a terminal.
    #[serde(default)]
    pub tty: bool,
}

fn record_path(sandbox_dir: &Path, id: &str) -> PathBuf {
    sandbox_dir.join("containers").join(format!("{id}.json"))
}

/// Where the log copy of container `id` records its position.
pub(super) fn log_position_path(sandbox_dir: &Path, id: &str) -> PathBuf {
    sandbox_dir.join("containers").join(format!("{id}.logpos"))
}

pub(super) fn save(sandbox_dir: &Path, rec: &ContainerRecord) -> Result<(), StoreError> {
    // Never the sandbox's directory itself: a container whose exit is
    // recorded after its sandbox was removed must not bring the directory
    // back (nothing would ever remove it again).
    let dir = sandbox_dir.join("containers");
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&dir)(e)),
    }
    let path = record_path(sandbox_dir, &rec.id);
    let data = serde_json::to_vec_pretty(rec)?;
    write_atomically(&path, &data).map_err(io_err(&path))
}

pub(super) fn remove(sandbox_dir: &Path, id: &str) -> Result<(), StoreError> {
    // The position only serves a copy that has ended: losing it is harmless.
    let _ = std::fs::remove_file(log_position_path(sandbox_dir, id));
    let path = record_path(sandbox_dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Every readable container record of the sandbox in `sandbox_dir`.
pub(super) fn load_all(sandbox_dir: &Path) -> Vec<ContainerRecord> {
    let dir = sandbox_dir.join("containers");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| read_record(&p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ContainerState;

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: "s".into(),
            name: "c".into(),
            attempt: 0,
            image: "i".into(),
            image_ref: "sha256:00".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            state: ContainerState::Exited,
            created_at_ns: 1,
            started_at_ns: 2,
            finished_at_ns: 3,
            exit_code: 0,
            reason: "Completed".into(),
            message: String::new(),
            log_path: String::new(),
            mounts: Vec::new(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            stdin: false,
            stdin_once: false,
            tty: false,
        }
    }

    #[test]
    fn records_round_trip_and_a_removed_sandbox_stays_removed() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = root.path().join("s");
        std::fs::create_dir(&sandbox).unwrap();
        save(&sandbox, &record("a")).unwrap();
        save(&sandbox, &record("b")).unwrap();
        let mut ids: Vec<String> = load_all(&sandbox).into_iter().map(|r| r.id).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        remove(&sandbox, "a").unwrap();
        remove(&sandbox, "a").unwrap();
        assert_eq!(load_all(&sandbox).len(), 1);
        // A late save for a sandbox whose directory is gone fails and
        // makes nothing.
        std::fs::remove_dir_all(&sandbox).unwrap();
        assert!(save(&sandbox, &record("late")).is_err());
        assert!(!sandbox.exists());
    }
}
