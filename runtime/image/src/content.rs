//! The content store under the state root: blobs by digest, verified
//! while they stream in, and unpacked layers by chain ID, each unpacked
//! once and shared by every container of every pod that uses it.
//!
//! Layout: `blobs/sha256/<hex>`, `layers/<chain-id hex>/`, `tmp/`.

use crate::hashing::HashingReader;
use crate::unpack::{self, Compression, Limits, UnpackError, UnpackStats};
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
            hex: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
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
        reader: R,
    ) -> Result<PathBuf, ContentError> {
        let dest = self.blob_path(expected);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self.scratch_path();
        // One byte more than announced is enough to tell a lying size.
        let mut src = HashingReader::new(reader.take(size.map_or(u64::MAX, |s| s + 1)));
        let result = (|| {
            let mut f =
                fs::File::create(&tmp).map_err(io_at(format!("create {}", tmp.display())))?;
            io::copy(&mut src, &mut f).map_err(io_at(format!("receive {expected}")))?;
            f.flush().map_err(io_at("flush blob"))?;
            f.sync_all().map_err(io_at("sync blob"))?;
            if let Some(s) = size {
                if src.len() != s {
                    return Err(ContentError::Mismatch {
                        expected: expected.to_string(),
                        why: format!("{} bytes, expected {s}", src.len()),
                    });
                }
            }
            let got = Digest::from_hash(src.finish());
            if &got != expected {
                return Err(ContentError::Mismatch {
                    expected: expected.to_string(),
                    why: format!("digest is {got}"),
                });
            }
            fs::rename(&tmp, &dest).map_err(io_at(format!("store {expected}")))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| dest)
    }

    /// Unpacks stored blob `blob` as the layer with chain ID `chain`,
    /// checking the uncompressed stream against `diff_id`. Concurrent
    /// callers for the same layer wait for one another; the layer is
    /// unpacked once.
    pub fn unpack(
        &self,
        blob: &Digest,
        media_type: &str,
        diff_id: &Digest,
        chain: &Digest,
        limits: &Limits,
    ) -> Result<(PathBuf, Option<UnpackStats>), ContentError> {
        let dest = self.layer_path(chain);
        let _lock = FileLock::acquire(
            &self
                .root
                .join("layers")
                .join(format!(".{}.lock", chain.hex())),
        )?;
        if dest.is_dir() {
            return Ok((dest, None));
        }
        let compression = Compression::from_media_type(media_type)?;
        let path = self.blob_path(blob);
        let file =
            fs::File::open(&path).map_err(|_| ContentError::MissingBlob(blob.to_string()))?;
        let stats = unpack::unpack_layer_verified(
            io::BufReader::new(file),
            compression,
            &dest,
            limits,
            |uncompressed| {
                let got = Digest::from_hash(uncompressed);
                (&got == diff_id).then_some(()).ok_or_else(|| {
                    format!("layer {blob} unpacks to {got}, its diff ID should be {diff_id}")
                })
            },
        )?;
        Ok((dest, Some(stats)))
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
            if !is_layer && name.ends_with(".lock") && kept {
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
    // SAFETY: b is valid for 8 bytes.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
    dir.join(format!("blob-{}-{name}", std::process::id()))
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
            store.put_blob(&other, Some(2), &b"abc"[..]).is_err(),
            "size mismatch"
        );
        assert!(
            store.put_blob(&other, Some(4), &b"abc"[..]).is_err(),
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
                .unpack(&d, GZ, &diff, &chain, &Limits::default())
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
        let (dir, stats) = store
            .unpack(&blob_d, GZ, &diff_id, &chain, &Limits::default())
            .unwrap();
        assert!(stats.is_some());
        assert_eq!(fs::read(dir.join("etc/os-release")).unwrap(), b"ID=test\n");
        // Second time: shared, not unpacked again.
        let (again, stats) = store
            .unpack(&blob_d, GZ, &diff_id, &chain, &Limits::default())
            .unwrap();
        assert_eq!((again, stats), (dir, None));
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
            .unpack(&blob_d, GZ, &lie, &chain, &Limits::default())
            .unwrap_err();
        assert!(err.to_string().contains("diff ID"), "{err}");
        assert!(!store.layer_path(&chain).exists());
        let missing = Digest::of(b"nope");
        assert!(matches!(
            store.unpack(&missing, GZ, &lie, &chain, &Limits::default()),
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
                            .unpack(&blob_d, GZ, &diff_id, &chain, &Limits::default())
                            .unwrap()
                            .1
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
