//! Image records: the table of images the daemon knows, in one file
//! (`images.json`) replaced atomically.

use super::{io_err, write_atomically, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Image ID: the config digest.
    pub id: String,
    /// Tags, as normalised references (`docker.io/library/busybox:latest`).
    pub repo_tags: Vec<String>,
    /// `name@sha256:<manifest>` for each name it was pulled as.
    pub repo_digests: Vec<String>,
    /// Compressed size.
    pub size: u64,
    /// Layer chain IDs, bottom first.
    pub chain: Vec<String>,
    /// The config's `User`.
    pub user: String,
    /// Blobs (config and layers) it keeps alive in the store.
    #[serde(default)]
    pub blobs: Vec<String>,
}

impl ImageRecord {
    /// Numeric user from the config, if `User` starts with one.
    pub fn uid(&self) -> Option<i64> {
        self.user.split(':').next().and_then(|u| u.parse().ok())
    }

    /// User name from the config, if `User` names one.
    pub fn username(&self) -> String {
        let u = self.user.split(':').next().unwrap_or("");
        if u.parse::<i64>().is_ok() {
            String::new()
        } else {
            u.to_string()
        }
    }
}

fn table_path(root: &Path) -> PathBuf {
    root.join("images.json")
}

/// The table under `root`; an unreadable one is reported and read as
/// empty (the content stays, and `vmcri images prune` keeps what a pull
/// records again).
pub(super) fn load(root: &Path) -> BTreeMap<String, ImageRecord> {
    let path = table_path(root);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "image metadata unreadable; starting with none");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

pub(super) fn save(root: &Path, images: &BTreeMap<String, ImageRecord>) -> Result<(), StoreError> {
    let path = table_path(root);
    let data = serde_json::to_vec_pretty(images)?;
    write_atomically(&path, &data).map_err(io_err(&path))
}
