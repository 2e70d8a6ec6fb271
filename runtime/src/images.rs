//! The image service: images pulled into the content store, named by the
//! references users asked for; their table is kept by the [`Store`].

use crate::lock::lock;
use crate::store::{ImageRecord, Store, StoreError};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;
use vmcri_image::content::{ContentError, ContentStore, Digest, GcStats};
use vmcri_image::pull::{self, Credentials, PullError};
use vmcri_image::reference::{Reference, ReferenceError};
use vmcri_image::registry::RegistryConfig;
use vmcri_image::unpack::Limits;

/// Errors of image operations.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A malformed reference (InvalidArgument).
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// Pull failures.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// Store failures.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The image table could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Local I/O on an image's files or the content store.
    #[error("image {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// The image table.
pub struct Images {
    root: PathBuf,
    records_store: Store,
    store: ContentStore,
    registries: BTreeMap<String, RegistryConfig>,
    records: Mutex<BTreeMap<String, ImageRecord>>,
    /// Bounds on pulls (`[images]`).
    limits: Limits,
    // Pulls of the same layer share work in the store; serialising whole
    // pulls here keeps the metadata updates simple.
    pulling: tokio::sync::Mutex<()>,
}

impl Images {
    /// The images of the state root `root`, whose table `store` keeps and
    /// recovery read as `records`.
    pub fn open(
        root: &Path,
        store: Store,
        records: BTreeMap<String, ImageRecord>,
        registries: BTreeMap<String, RegistryConfig>,
    ) -> Result<Images, ImageError> {
        Ok(Images {
            root: root.to_path_buf(),
            records_store: store,
            store: ContentStore::open(&root.join("content"))?,
            registries,
            records: Mutex::new(records),
            limits: Limits::default(),
            pulling: tokio::sync::Mutex::new(()),
        })
    }

    /// The table with pulls bounded by `limits` (the `[images]` config)
    /// rather than the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Images {
        self.limits = limits;
        self
    }

    fn save(&self, records: &BTreeMap<String, ImageRecord>) -> Result<(), ImageError> {
        Ok(self.records_store.save_images(records)?)
    }

    /// Pulls `image` and records it under the name asked for.
    pub async fn pull(
        &self,
        image: &str,
        creds: Option<Credentials>,
    ) -> Result<String, ImageError> {
        let reference = Reference::parse(image)?;
        let _one = self.pulling.lock().await;
        let _store = self.lock_store().await?;
        let pulled = pull::pull(
            &self.store,
            &reference,
            creds.as_ref(),
            &self.registries,
            &self.limits,
        )
        .await?;
        let config: serde_json::Value = serde_json::from_slice(&pulled.config).unwrap_or_default();
        let id = pulled.id.to_string();
        let mut records = lock(&self.records);
        // A tag moves to the image it now names.
        if let Some(tag) = reference
            .tag
            .as_ref()
            .map(|_| reference.to_string())
            .filter(|_| reference.digest.is_none())
        {
            for r in records.values_mut() {
                r.repo_tags.retain(|t| t != &tag);
            }
        }
        let rec = records.entry(id.clone()).or_insert_with(|| ImageRecord {
            id: id.clone(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            size: pulled.size,
            chain: pulled.chain.iter().map(ToString::to_string).collect(),
            user: config["config"]["User"].as_str().unwrap_or("").to_string(),
            blobs: pulled.blobs.iter().map(ToString::to_string).collect(),
        });
        if reference.digest.is_none() {
            let tag = reference.to_string();
            if !rec.repo_tags.contains(&tag) {
                rec.repo_tags.push(tag);
            }
        }
        let digest_ref = format!("{}@{}", reference.name(), pulled.manifest_digest);
        if !rec.repo_digests.contains(&digest_ref) {
            rec.repo_digests.push(digest_ref);
        }
        let snapshot = records.clone();
        drop(records);
        self.save(&snapshot)?;
        tracing::info!(image = %reference, id = %id, "image pulled");
        Ok(id)
    }

    /// Finds an image by ID (or unique ID prefix), tag or digest reference.
    pub fn find(&self, image: &str) -> Option<ImageRecord> {
        let records = lock(&self.records);
        let bare = image.strip_prefix("sha256:").unwrap_or(image);
        if bare.len() >= 12 && bare.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut m = records
                .values()
                .filter(|r| r.id.trim_start_matches("sha256:").starts_with(bare));
            if let (Some(one), None) = (m.next(), m.next()) {
                return Some(one.clone());
            }
        }
        let norm = Reference::parse(image).ok()?.to_string();
        records
            .values()
            .find(|r| r.repo_tags.contains(&norm) || r.repo_digests.contains(&norm))
            .cloned()
    }

    /// The unpacked layer directories of `rec`, lowest first.
    pub fn layer_paths(&self, rec: &ImageRecord) -> Vec<PathBuf> {
        rec.chain
            .iter()
            .filter_map(|c| Digest::parse(c).ok())
            .map(|d| self.store.layer_path(&d))
            .collect()
    }

    /// The image's configuration (entrypoint, env, user, ...), read from
    /// its verified config blob.
    pub fn config(
        &self,
        rec: &ImageRecord,
    ) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
        let digest = Digest::parse(&rec.id)?;
        let path = self.store.blob_path(&digest);
        let bytes = std::fs::read(&path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Every image.
    pub fn list(&self) -> Vec<ImageRecord> {
        lock(&self.records).values().cloned().collect()
    }

    /// Removes a tag, or (by ID or digest) the whole image; once an image
    /// is gone, the blobs and layers no other image uses are deleted.
    /// Unknown images are already gone: not an error.
    pub async fn remove(&self, image: &str) -> Result<(), ImageError> {
        let Some(rec) = self.find(image) else {
            return Ok(());
        };
        // No pull may add references while unreferenced content goes.
        let _no_pulls = self.pulling.lock().await;
        let _store = self.lock_store().await?;
        let mut records = lock(&self.records);
        let norm = Reference::parse(image).ok().map(|r| r.to_string());
        let by_tag = norm.as_ref().is_some_and(|n| rec.repo_tags.contains(n));
        if by_tag && rec.repo_tags.len() > 1 {
            if let Some(r) = records.get_mut(&rec.id) {
                r.repo_tags.retain(|t| Some(t) != norm.as_ref());
            }
        } else {
            records.remove(&rec.id);
        }
        let snapshot = records.clone();
        drop(records);
        self.save(&snapshot)?;
        if !snapshot.contains_key(&rec.id) {
            let stats = gc(&self.store, &snapshot)?;
            tracing::info!(image = %rec.id, blobs = stats.blobs, layers = stats.layers, "image removed");
        }
        Ok(())
    }

    /// The content store's cross-process lock, taken off the async
    /// threads (a prune in another process may hold it for a while).
    async fn lock_store(&self) -> Result<std::fs::File, ImageError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.lock())
            .await
            .map_err(|e| ImageError::Io {
                path: "content store lock".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(ImageError::from)
    }

    /// Deletes content no image references, with leftovers of interrupted
    /// pulls, under the state root `root`; safe while a daemon runs there
    /// (`vmcri images prune`).
    pub fn prune(root: &Path) -> Result<GcStats, ImageError> {
        let store = ContentStore::open(&root.join("content"))?;
        let _lock = store.lock()?;
        // Read the table under the lock: a pull that finished while we
        // waited has recorded its image by now.
        gc(&store, &Store::read_images(root))
    }

    /// (bytes, inodes) used by the content store, and its path.
    pub fn usage(&self) -> (u64, u64, PathBuf) {
        fn walk(p: &Path, acc: &mut (u64, u64)) {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::symlink_metadata(p) {
                acc.0 += m.blocks() * 512;
                acc.1 += 1;
                if m.is_dir() {
                    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                        walk(&e.path(), acc);
                    }
                }
            }
        }
        let root = self.root.join("content");
        let mut acc = (0, 0);
        walk(&root, &mut acc);
        (acc.0, acc.1, root)
    }
}

/// Deletes what no image in `records` references from `store`.
fn gc(
    store: &ContentStore,
    records: &BTreeMap<String, ImageRecord>,
) -> Result<GcStats, ImageError> {
    let parse = |s: &String| Digest::parse(s).ok();
    let blobs: BTreeSet<Digest> = records
        .values()
        .flat_map(|r| r.blobs.iter().filter_map(parse))
        .collect();
    let layers: BTreeSet<Digest> = records
        .values()
        .flat_map(|r| r.chain.iter().filter_map(parse))
        .collect();
    Ok(store.gc(&blobs, &layers)?)
}

#[cfg(test)]
impl Images {
    /// Records an image of no layers whose config is `config`, named
    /// `name`, as a pull would (tests of the services need an image but
    /// no registry).
    pub(crate) fn add_local(&self, name: &str, config: &serde_json::Value) -> ImageRecord {
        let bytes = serde_json::to_vec(config).expect("a JSON value encodes");
        let digest = Digest::of(&bytes);
        self.store
            .put_blob(&digest, Some(bytes.len() as u64), bytes.as_slice())
            .expect("the content store takes a blob");
        let reference = Reference::parse(name).expect("a valid image name");
        let rec = ImageRecord {
            id: digest.to_string(),
            repo_tags: vec![reference.to_string()],
            repo_digests: Vec::new(),
            size: bytes.len() as u64,
            chain: Vec::new(),
            user: String::new(),
            blobs: vec![digest.to_string()],
        };
        let mut records = lock(&self.records);
        records.insert(rec.id.clone(), rec.clone());
        let snapshot = records.clone();
        drop(records);
        self.save(&snapshot).expect("the image table saves");
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcri_image::limits::Exhausted;

    #[test]
    fn every_bound_a_pull_hits_is_resource_exhausted() {
        for why in [
            Exhausted::BlobTooLong {
                digest: "sha256:00".into(),
                size: 1,
            },
            Exhausted::DocumentTooLarge {
                what: "manifest",
                limit: 4 << 20,
            },
            Exhausted::LayerBytes { limit: 1 },
            Exhausted::ImageInodes { limit: 1 },
            Exhausted::FreeSpace {
                path: "/var/lib/vmcri/content".into(),
                floor: 1 << 30,
            },
        ] {
            let text = why.to_string();
            let status = tonic::Status::from(ImageError::Pull(PullError::Exhausted {
                reference: "docker.io/library/busybox:latest".into(),
                why,
            }));
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(
                status.message().contains("busybox") && status.message().contains(&text),
                "{}",
                status.message()
            );
        }
        let other = tonic::Status::from(ImageError::Pull(PullError::Invalid {
            reference: "x".into(),
            why: "y".into(),
        }));
        assert_eq!(other.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn limits_reach_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_layer_bytes: 1234,
            ..Limits::default()
        };
        let store = Store::open(dir.path()).unwrap();
        let images = Images::open(dir.path(), store, BTreeMap::new(), BTreeMap::new())
            .unwrap()
            .with_limits(limits);
        assert_eq!(images.limits, limits);
    }
}
