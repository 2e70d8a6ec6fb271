//! The content store under the state root: blobs by digest, verified
//! while they stream in, and unpacked layers by chain ID, each unpacked
//! once and shared by every container of every pod that uses it.
//!
//! Layout: `blobs/sha256/<hex>`, `layers/<chain-id hex>/` (with
//! `layers/.<hex>.usage`, what it takes), `tmp/`.

use crate::limits::{Budget, Exhausted, Limits, Room, Usage};
use crate::unpack::{self, Compression, UnpackError, UnpackStats};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A sha256 content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; anything else is refused, so a
    /// digest can be used as a file name safely.
    pub fn parse(s: &str) -> Result<Digest, ContentError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| {
            ContentError::BadDigest(format!("{s:?}: only sha256 digests are supported"))
        })?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ContentError::BadDigest(format!(
                "{s:?}: expected 64 lowercase hex digits"
            )));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    fn from_hash(h: Sha256) -> Digest {
        Digest {
            hex: hex::encode(h.finalize()),
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        let mut h = Sha256::new();
        h.update(data);
        Digest::from_hash(h)
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The chain ID of a layer (OCI image spec): its diff ID for the
    /// bottom layer, else sha256 of "<parent chain ID> <diff ID>".
    pub fn chain(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
        match parent {
            None => diff_id.clone(),
            Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Errors of the content store.
#[derive(Debug, Error)]
pub enum ContentError {
    /// A malformed or unsupported digest.
    #[error("invalid digest {0}")]
    BadDigest(String),
    /// Content that does not match its digest or size: nothing is kept.
    #[error("content of {expected} does not verify: {why}")]
    Mismatch {
        /// What it should have been.
        expected: String,
        /// What was wrong.
        why: String,
    },
    /// The blob is not in the store.
    #[error("blob {0} is not in the content store")]
    MissingBlob(String),
    /// Unpacking failed.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// A bound was reached: a blob longer than announced, or no room left
    /// above the free-space floor.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// I/O on the store.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
}

fn io_at(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContentError {
    let what = what.into();
    move |source| ContentError::Io { what, source }
}

/// An exclusive lock on a file, held until dropped (flock: it also
/// serialises other vmcri processes sharing the store).
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock, ContentError> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_at(format!("open lock {}", path.display())))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_at(format!("lock {}", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(FileLock { _file: f })
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    /// Opens (creating) the store under `root`, private to root: layers
    /// may hold setuid files.
    pub fn open(root: &Path) -> Result<ContentStore, ContentError> {
        for d in ["blobs/sha256", "layers", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_at(format!("create {}", p.display())))?;
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(io_at(format!("chmod {}", root.display())))?;
        Ok(ContentStore {
            root: root.to_path_buf(),
        })
    }

    /// Takes the store's exclusive lock (blocking), held until the file is
    /// dropped: pulls and garbage collection take it, so a collection in
    /// another process (`vmcri images prune`) never deletes what a pull in
    /// the daemon is writing.
    pub fn lock(&self) -> Result<fs::File, ContentError> {
        use std::os::fd::AsRawFd;
        let path = self.root.join("lock");
        let f = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_at(format!("open {}", path.display())))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(f);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_at(format!("lock {}", path.display()))(e));
            }
        }
    }

    /// A fresh path for a download in progress (not yet verified).
    pub fn scratch_path(&self) -> PathBuf {
        unique_in(&self.root.join("tmp"))
    }

    /// Where blob `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// True if blob `d` is stored.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Where the layer with chain ID `chain` is unpacked.
    pub fn layer_path(&self, chain: &Digest) -> PathBuf {
        self.root.join("layers").join(chain.hex())
    }

    /// Streams a blob in, verifying its size (if known) and digest as it
    /// goes; only verified content is ever visible under its digest.
    pub fn put_blob<R: Read>(
        &self,
        expected: &Digest,
        size: Option<u64>,
        mut reader: R,
    ) -> Result<PathBuf, ContentError> {
        let dest = self.blob_path(expected);
        if dest.is_file() {
            return Ok(dest);
        }
        let mut scratch = Scratch::new(self.scratch_path());
        let mut verifier = Verifier::new(expected, size);
        let mut f = fs::File::create(&scratch.path)
            .map_err(io_at(format!("create {}", scratch.path.display())))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_at(format!("receive {expected}"))(e)),
            };
            verifier.update(&buf[..n])?;
            f.write_all(&buf[..n])
                .map_err(io_at(format!("write {expected}")))?;
        }
        f.sync_all().map_err(io_at("sync blob"))?;
        verifier.finish()?;
        fs::rename(&scratch.path, &dest).map_err(io_at(format!("store {expected}")))?;
        scratch.keep = true;
        Ok(dest)
    }

    /// What the store's filesystem can still take above the floor set by
    /// `limits`.
    pub fn room(&self, limits: &Limits) -> Result<Room, ContentError> {
        Room::of(&self.root, limits).map_err(io_at(format!("statvfs {}", self.root.display())))
    }

    /// Starts receiving blob `expected` of exactly `size` bytes, if the
    /// store's filesystem has room for it above its floor. Nothing is
    /// visible under the digest until [`BlobWriter::commit`] verified it.
    pub async fn begin_blob(
        &self,
        expected: &Digest,
        size: u64,
        limits: &Limits,
    ) -> Result<BlobWriter, ContentError> {
        self.room(limits)?.fits(size)?;
        let scratch = Scratch::new(self.scratch_path());
        let file = tokio::fs::File::create(&scratch.path)
            .await
            .map_err(io_at(format!("create {}", scratch.path.display())))?;
        Ok(BlobWriter {
            file,
            scratch,
            verifier: Verifier::new(expected, Some(size)),
            dest: self.blob_path(expected),
        })
    }

    /// Unpacks stored blob `blob` as the layer with chain ID `chain`,
    /// checking the uncompressed stream against `diff_id`, within the
    /// layer's budget, what `image_used` (the image's lower layers) left of
    /// the image's, and the room above the free-space floor. Concurrent
    /// callers for the same layer wait for one another; the layer is
    /// unpacked once.
    pub fn unpack(
        &self,
        blob: &Digest,
        media_type: &str,
        diff_id: &Digest,
        chain: &Digest,
        limits: &Limits,
        image_used: Usage,
    ) -> Result<Unpacked, ContentError> {
        let dest = self.layer_path(chain);
        let _lock = FileLock::acquire(&self.layer_file(chain, "lock"))?;
        if dest.is_dir() {
            let usage = self.layer_usage(chain)?;
            return Ok(Unpacked {
                path: dest,
                stats: None,
                usage,
            });
        }
        let compression = Compression::from_media_type(media_type)?;
        let path = self.blob_path(blob);
        let file =
            fs::File::open(&path).map_err(|_| ContentError::MissingBlob(blob.to_string()))?;
        let budget = Budget::for_layer(limits)
            .within_image(limits, image_used)
            .within_room(&self.room(limits)?);
        let stats = unpack::unpack_layer_verified(
            io::BufReader::new(file),
            compression,
            &dest,
            limits,
            &budget,
            |uncompressed| {
                let got = Digest::from_hash(uncompressed);
                (&got == diff_id).then_some(()).ok_or_else(|| {
                    format!("layer {blob} unpacks to {got}, its diff ID should be {diff_id}")
                })
            },
        )?;
        let usage = Usage {
            bytes: stats.bytes,
            inodes: stats.inodes,
        };
        self.record_usage(chain, usage)?;
        Ok(Unpacked {
            path: dest,
            stats: Some(stats),
            usage,
        })
    }

    /// `layers/.<hex>.<suffix>`: a file beside the layer, never inside it
    /// (the layer directory is what containers see).
    fn layer_file(&self, chain: &Digest, suffix: &str) -> PathBuf {
        self.root
            .join("layers")
            .join(format!(".{}.{suffix}", chain.hex()))
    }

    fn record_usage(&self, chain: &Digest, usage: Usage) -> Result<(), ContentError> {
        let path = self.layer_file(chain, "usage");
        fs::write(&path, format!("{} {}\n", usage.bytes, usage.inodes))
            .map_err(io_at(format!("write {}", path.display())))
    }

    /// What the unpacked layer `chain` takes: as recorded when it was
    /// unpacked, or measured (and recorded) for a layer unpacked before
    /// usage was recorded. The caller holds the layer's lock.
    fn layer_usage(&self, chain: &Digest) -> Result<Usage, ContentError> {
        let recorded = fs::read_to_string(self.layer_file(chain, "usage"))
            .ok()
            .and_then(|text| {
                let (bytes, inodes) = text.trim().split_once(' ')?;
                Some(Usage {
                    bytes: bytes.parse().ok()?,
                    inodes: inodes.parse().ok()?,
                })
            });
        if let Some(usage) = recorded {
            return Ok(usage);
        }
        let usage = measure(&self.layer_path(chain));
        self.record_usage(chain, usage)?;
        Ok(usage)
    }
}

/// A layer in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Its directory.
    pub path: PathBuf,
    /// What unpacking did; `None` when it was already there.
    pub stats: Option<UnpackStats>,
    /// What it takes.
    pub usage: Usage,
}

/// File content bytes and entries under `dir` (not counting `dir`).
fn measure(dir: &Path) -> Usage {
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            usage.inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                usage.bytes += m.len();
            }
        }
    }
    usage
}

/// A scratch file, removed when dropped unless kept: a pull that fails,
/// or is cancelled with its future dropped, leaves nothing in `tmp/`.
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(path: PathBuf) -> Scratch {
        Scratch { path, keep: false }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Counts and hashes a blob as it arrives; the first byte past its
/// announced size fails at once, so a registry cannot make us store more.
struct Verifier {
    expected: Digest,
    size: Option<u64>,
    hash: Sha256,
    len: u64,
}

impl Verifier {
    fn new(expected: &Digest, size: Option<u64>) -> Verifier {
        Verifier {
            expected: expected.clone(),
            size,
            hash: Sha256::new(),
            len: 0,
        }
    }

    fn update(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        let len = self.len.saturating_add(chunk.len() as u64);
        if let Some(size) = self.size.filter(|s| len > *s) {
            return Err(Exhausted::BlobTooLong {
                digest: self.expected.to_string(),
                size,
            }
            .into());
        }
        self.hash.update(chunk);
        self.len = len;
        Ok(())
    }

    /// Fails if the blob is short of its size or does not match its digest.
    fn finish(&self) -> Result<(), ContentError> {
        if let Some(s) = self.size.filter(|s| self.len != *s) {
            return Err(ContentError::Mismatch {
                expected: self.expected.to_string(),
                why: format!("{} bytes, expected {s}", self.len),
            });
        }
        let got = Digest::from_hash(self.hash.clone());
        if got != self.expected {
            return Err(ContentError::Mismatch {
                expected: self.expected.to_string(),
                why: format!("digest is {got}"),
            });
        }
        Ok(())
    }
}

/// A blob being received into the store (see
/// [`ContentStore::begin_blob`]). Dropped before [`BlobWriter::commit`],
/// it leaves nothing behind.
pub struct BlobWriter {
    file: tokio::fs::File,
    scratch: Scratch,
    verifier: Verifier,
    dest: PathBuf,
}

impl BlobWriter {
    /// Takes the next bytes; fails the moment the blob would be longer
    /// than its descriptor says.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        use tokio::io::AsyncWriteExt;
        self.verifier.update(chunk)?;
        self.file
            .write_all(chunk)
            .await
            .map_err(io_at(format!("write {}", self.verifier.expected)))
    }

    /// Fails if what was written so far is not the whole blob: short of
    /// its size, or another digest.
    pub fn verify(&self) -> Result<(), ContentError> {
        self.verifier.finish()
    }

    /// Verifies size and digest and makes the blob visible in the store.
    pub async fn commit(self) -> Result<PathBuf, ContentError> {
        use tokio::io::AsyncWriteExt;
        let BlobWriter {
            mut file,
            mut scratch,
            verifier,
            dest,
        } = self;
        file.flush().await.map_err(io_at("flush blob"))?;
        file.sync_all().await.map_err(io_at("sync blob"))?;
        drop(file);
        let what = verifier.expected.to_string();
        verifier.finish()?;
        tokio::fs::rename(&scratch.path, &dest)
            .await
            .map_err(io_at(format!("store {what}")))?;
        scratch.keep = true;
        Ok(dest)
    }
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs deleted.
    pub blobs: u64,
    /// Unpacked layers deleted.
    pub layers: u64,
}

impl ContentStore {
    /// Deletes every blob and layer not in `keep_blobs` / `keep_layers`,
    /// with leftovers of interrupted pulls (scratch files, partial
    /// layers). The caller must hold off pulls while this runs.
    pub fn gc(
        &self,
        keep_blobs: &BTreeSet<Digest>,
        keep_layers: &BTreeSet<Digest>,
    ) -> Result<GcStats, ContentError> {
        let mut stats = GcStats::default();
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs)
            .map_err(io_at(format!("list {}", blobs.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep =
                Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| keep_blobs.contains(&d));
            if !keep {
                fs::remove_file(e.path())
                    .map_err(io_at(format!("remove {}", e.path().display())))?;
                stats.blobs += 1;
            }
        }
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers)
            .map_err(io_at(format!("list {}", layers.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let chain = name
                .trim_start_matches('.')
                .split('.')
                .next()
                .unwrap_or("")
                .to_string();
            let kept =
                Digest::parse(&format!("sha256:{chain}")).is_ok_and(|d| keep_layers.contains(&d));
            let is_layer = !name.starts_with('.');
            if is_layer && kept {
                continue;
            }
            let beside = name.ends_with(".lock") || name.ends_with(".usage");
            if !is_layer && beside && kept {
                continue;
            }
            let path = e.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_at(format!("remove {}", path.display())))?;
            if is_layer {
                stats.layers += 1;
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp)
            .map_err(io_at(format!("list {}", tmp.display())))?
            .flatten()
        {
            let _ = fs::remove_file(e.path());
        }
        Ok(stats)
    }
}

fn unique_in(dir: &Path) -> PathBuf {
    let mut b = [0u8; 8];
    // Cannot fail once the pool is up; if it did, the name would still
    // hold the process ID (with zeros for the random part).
    let _ = getrandom::fill(&mut b);
    dir.join(format!("blob-{}-{}", std::process::id(), hex::encode(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_strictly() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        for bad in [
            "sha512:00",
            "sha256:../../etc/passwd",
            "sha256:ABCDEF",
            "2cf24dba",
            "",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(Digest::chain(None, &a), a);
        assert_eq!(
            Digest::chain(Some(&a), &b),
            Digest::of(format!("{a} {b}").as_bytes())
        );
    }

    #[test]
    fn verified_blobs_are_stored_and_bad_ones_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let data = b"layer bytes";
        let d = Digest::of(data);
        store
            .put_blob(&d, Some(data.len() as u64), &data[..])
            .unwrap();
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), data);
        // Again: already there.
        store.put_blob(&d, None, &b"ignored"[..]).unwrap();

        let wrong = Digest::of(b"something else");
        let err = store.put_blob(&wrong, None, &data[..]).unwrap_err();
        assert!(matches!(err, ContentError::Mismatch { .. }), "{err}");
        assert!(!store.has_blob(&wrong));
        let other = Digest::of(b"abc");
        assert!(
            matches!(
                store.put_blob(&other, Some(2), &b"abc"[..]),
                Err(ContentError::Exhausted(Exhausted::BlobTooLong {
                    size: 2,
                    ..
                }))
            ),
            "longer than announced"
        );
        assert!(
            matches!(
                store.put_blob(&other, Some(4), &b"abc"[..]),
                Err(ContentError::Mismatch { .. })
            ),
            "short read"
        );
        assert!(!store.has_blob(&other));
        assert_eq!(
            fs::read_dir(tmp.path().join("tmp")).unwrap().count(),
            0,
            "no temp files left"
        );
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;

    #[test]
    fn gc_keeps_what_is_referenced_and_removes_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let mut chains = Vec::new();
        let mut blobs = Vec::new();
        for name in ["a", "b"] {
            let tar = tar_with(name, name.as_bytes());
            let blob = gzip(&tar);
            let d = Digest::of(&blob);
            store.put_blob(&d, None, &blob[..]).unwrap();
            let diff = Digest::of(&tar);
            let chain = Digest::chain(None, &diff);
            store
                .unpack(&d, GZ, &diff, &chain, &Limits::default(), Usage::default())
                .unwrap();
            chains.push(chain);
            blobs.push(d);
        }
        std::fs::write(store.scratch_path(), b"interrupted download").unwrap();
        std::fs::create_dir_all(tmp.path().join("layers/.deadbeef.partial")).unwrap();
        let stats = store
            .gc(
                &BTreeSet::from([blobs[0].clone()]),
                &BTreeSet::from([chains[0].clone()]),
            )
            .unwrap();
        assert_eq!(
            stats,
            GcStats {
                blobs: 1,
                layers: 1
            }
        );
        assert!(store.has_blob(&blobs[0]) && !store.has_blob(&blobs[1]));
        assert!(store.layer_path(&chains[0]).join("a").exists());
        assert!(!store.layer_path(&chains[1]).exists());
        assert!(!tmp.path().join("layers/.deadbeef.partial").exists());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(),
            0
        );
    }

    fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    #[test]
    fn layers_unpack_once_by_chain_id_and_verify_their_diff_id() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let tar = tar_with("etc/os-release", b"ID=test\n");
        let blob = gzip(&tar);
        let blob_d = Digest::of(&blob);
        let diff_id = Digest::of(&tar);
        store
            .put_blob(&blob_d, Some(blob.len() as u64), &blob[..])
            .unwrap();
        let chain = Digest::chain(None, &diff_id);
        let first = store
            .unpack(
                &blob_d,
                GZ,
                &diff_id,
                &chain,
                &Limits::default(),
                Usage::default(),
            )
            .unwrap();
        assert!(first.stats.is_some());
        assert_eq!(
            first.usage,
            Usage {
                bytes: 8,
                inodes: 2
            },
            "etc/ and the file"
        );
        let dir = first.path;
        assert_eq!(fs::read(dir.join("etc/os-release")).unwrap(), b"ID=test\n");
        // Second time: shared, not unpacked again, its usage as recorded.
        let again = store
            .unpack(
                &blob_d,
                GZ,
                &diff_id,
                &chain,
                &Limits::default(),
                Usage::default(),
            )
            .unwrap();
        assert_eq!((&again.path, again.stats), (&dir, None));
        assert_eq!(again.usage, first.usage);
        // A layer from before usage was recorded is measured once.
        fs::remove_file(tmp.path().join(format!("layers/.{}.usage", chain.hex()))).unwrap();
        let measured = store
            .unpack(
                &blob_d,
                GZ,
                &diff_id,
                &chain,
                &Limits::default(),
                Usage::default(),
            )
            .unwrap();
        assert_eq!(measured.usage, first.usage);
        // Shared layers count against every image that uses them.
        let tight = Limits {
            max_image_bytes: 10,
            ..Limits::default()
        };
        let used = Usage {
            bytes: 5,
            inodes: 0,
        };
        assert!(tight.check_image(used.plus(measured.usage)).is_err());
    }

    #[test]
    fn a_layer_whose_content_does_not_match_its_diff_id_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let blob = gzip(&tar_with("a", b"1"));
        let blob_d = Digest::of(&blob);
        store.put_blob(&blob_d, None, &blob[..]).unwrap();
        let lie = Digest::of(b"not this layer");
        let chain = Digest::chain(None, &lie);
        let err = store
            .unpack(
                &blob_d,
                GZ,
                &lie,
                &chain,
                &Limits::default(),
                Usage::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("diff ID"), "{err}");
        assert!(!store.layer_path(&chain).exists());
        let missing = Digest::of(b"nope");
        assert!(matches!(
            store.unpack(
                &missing,
                GZ,
                &lie,
                &chain,
                &Limits::default(),
                Usage::default()
            ),
            Err(ContentError::MissingBlob(_))
        ));
    }

    #[test]
    fn concurrent_unpacks_of_one_layer_share_the_work() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContentStore::open(tmp.path()).unwrap();
        let files: Vec<u8> = vec![9; 256 * 1024];
        let tar = tar_with("big", &files);
        let blob = gzip(&tar);
        let blob_d = Digest::of(&blob);
        store.put_blob(&blob_d, None, &blob[..]).unwrap();
        let diff_id = Digest::of(&tar);
        let chain = Digest::chain(None, &diff_id);
        let unpacked: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        store
                            .unpack(
                                &blob_d,
                                GZ,
                                &diff_id,
                                &chain,
                                &Limits::default(),
                                Usage::default(),
                            )
                            .unwrap()
                            .stats
                            .is_some()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            unpacked.iter().filter(|u| **u).count(),
            1,
            "exactly one thread unpacked"
        );
        assert_eq!(
            fs::read(store.layer_path(&chain).join("big"))
                .unwrap()
                .len(),
            files.len()
        );
    }
}
