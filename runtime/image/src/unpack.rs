//! Unpacking one OCI layer (tar, optionally gzip or zstd) into its own
//! directory, safely and atomically.
//!
//! Safety: entry paths are normalised and any `..` is refused; absolute
//! paths land inside the layer; no parent directory is ever reached
//! through a symlink; hard links must point at entries already inside the
//! layer; device nodes are skipped (a shared layer must never carry a
//! host device into a pod); ownership is numeric; metadata entries and the
//! whole archive are size-limited before anything is buffered.
//!
//! Whiteouts become overlayfs whiteouts (`.wh.name` -> a 0:0 character
//! device `name`; `.wh..wh..opq` -> `trusted.overlay.opaque=y` on the
//! directory), so layer directories stack directly as overlay lowers.
//!
//! Atomicity: the layer is built in `.<name>.partial` beside its final
//! place and renamed into place only when complete, so a crash never
//! leaves a half-unpacked layer that looks finished.

use crate::hashing::HashingReader;
use crate::limits::{Budget, Cap, Exhausted};
use crate::tar_guard::TarGuard;
use sha2::Sha256;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

pub use crate::limits::Limits;

/// Layer compression, from the OCI media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type names.
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(UnpackError::Invalid(format!(
                "unsupported layer media type {other:?}"
            ))),
        }
    }
}

/// What an unpack did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries read.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes skipped.
    pub skipped_devices: u64,
    /// Whiteouts (including opaque markers) applied.
    pub whiteouts: u64,
    /// Entries counted against the inode budget: every entry, and every
    /// parent directory made for one.
    pub inodes: u64,
}

/// Why a layer could not be unpacked. Nothing is left behind on error.
#[derive(Debug, Error)]
pub enum UnpackError {
    /// An entry tried to reach outside the layer.
    #[error("layer entry escapes the layer: {0}")]
    Escape(String),
    /// A malformed archive or entry.
    #[error("invalid layer: {0}")]
    Invalid(String),
    /// Reading or writing failed (a corrupt stream shows up here too).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
    /// The destination already exists.
    #[error("layer directory {0} already exists")]
    Exists(String),
    /// The layer ran out of budget (bytes, inodes or free space).
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

fn io_at(what: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError {
    let what = what.into();
    move |source| UnpackError::Io { what, source }
}

fn display(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Normalises an entry path to components inside the layer. `None` for
/// the layer root itself ("./").
fn normalize(raw: &[u8], limits: &Limits) -> Result<Option<PathBuf>, UnpackError> {
    if raw.len() > limits.max_path_len {
        return Err(UnpackError::Invalid(format!(
            "path of {} bytes exceeds {}",
            raw.len(),
            limits.max_path_len
        )));
    }
    if raw.contains(&0) {
        return Err(UnpackError::Invalid(format!(
            "path {:?} contains NUL",
            display(raw)
        )));
    }
    let mut out = PathBuf::new();
    for comp in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::Escape(display(raw)))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Counts what a layer creates against its inode budget.
struct InodeMeter<'a> {
    used: u64,
    cap: &'a Cap,
}

impl InodeMeter<'_> {
    /// Counts one more, failing past the budget before it is made.
    fn charge(&mut self) -> Result<(), UnpackError> {
        self.used += 1;
        Ok(self.cap.check(self.used)?)
    }
}

/// Ensures every directory above `rel` exists inside `root`, refusing to
/// pass through symlinks. Returns the parent's real path. Directories it
/// makes count against the inode budget: a deep path makes many.
fn safe_parent(root: &Path, rel: &Path, meter: &mut InodeMeter) -> Result<PathBuf, UnpackError> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for comp in parent.components() {
            cur.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::Escape(format!(
                        "{} passes through the symlink {}",
                        rel.display(),
                        comp.as_os_str().to_string_lossy()
                    )));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Invalid(format!(
                        "{}: a parent is not a directory",
                        rel.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    meter.charge()?;
                    fs::create_dir(&cur).map_err(io_at(format!("create {}", cur.display())))?;
                }
                Err(e) => return Err(io_at(format!("stat {}", cur.display()))(e)),
            }
        }
    }
    Ok(cur)
}

/// True if `path`, under `root`, is a directory reached from `root`
/// through directories only, no component a symlink. The layer is being
/// built by this thread alone, so the answer holds until it acts on it.
fn reached_without_symlinks(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let mut cur = root.to_path_buf();
    rel.components().all(|c| {
        cur.push(c);
        fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir())
    })
}

/// Removes whatever an earlier entry left at `path` (later entries win),
/// keeping a directory when a directory replaces it.
fn clear(path: &Path, keep_dir: bool) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && keep_dir => Ok(()),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).map_err(io_at(format!("replace {}", path.display())))
        }
        Ok(_) => fs::remove_file(path).map_err(io_at(format!("replace {}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(format!("stat {}", path.display()))(e)),
    }
}

fn cpath(path: &Path) -> Result<CString, UnpackError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| UnpackError::Invalid(format!("{} contains NUL", path.display())))
}

fn lchown(path: &Path, uid: u64, gid: u64) -> Result<(), UnpackError> {
    let c = cpath(path)?;
    let (uid, gid) = (u32::try_from(uid), u32::try_from(gid));
    let (Ok(uid), Ok(gid)) = (uid, gid) else {
        return Err(UnpackError::Invalid(format!(
            "{}: uid/gid out of range",
            path.display()
        )));
    };
    // SAFETY: valid C string; lchown does not follow symlinks.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(io_at(format!("chown {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> Result<(), UnpackError> {
    let c = cpath(path)?;
    // SAFETY: valid C string.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } != 0 {
        return Err(io_at(format!("mknod {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn set_opaque(dir: &Path) -> Result<(), UnpackError> {
    let c = cpath(dir)?;
    let name = c"trusted.overlay.opaque";
    // SAFETY: valid C strings and a 1-byte value.
    if unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) } != 0 {
        return Err(io_at(format!("mark {} opaque", dir.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn decoder<'a, R: Read + 'a>(
    blob: R,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(io_at("start zstd decoder"))?)
        }
    })
}

/// Unpacks the layer `blob` into `dest`, which must not exist yet, within
/// the layer budget of `limits`.
pub fn unpack_layer<R: Read>(
    blob: R,
    compression: Compression,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    let budget = Budget::for_layer(limits);
    unpack_layer_verified(blob, compression, dest, limits, &budget, |_| Ok(()))
}

/// Like [`unpack_layer`], within `budget` (which may be tighter than the
/// layer's own: what is left of the image's, or of the disk), and
/// `verify` sees the sha256 of the whole uncompressed stream (the layer's
/// diff ID) and can refuse the layer before it is moved into place.
pub fn unpack_layer_verified<R: Read>(
    blob: R,
    compression: Compression,
    dest: &Path,
    limits: &Limits,
    budget: &Budget,
    verify: impl FnOnce(Sha256) -> Result<(), String>,
) -> Result<UnpackStats, UnpackError> {
    if dest.exists() {
        return Err(UnpackError::Exists(dest.display().to_string()));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| UnpackError::Invalid(format!("bad layer directory {}", dest.display())))?;
    let partial = dest.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    // A partial layer from an interrupted unpack is garbage.
    clear(&partial, false)?;
    fs::create_dir_all(&partial).map_err(io_at(format!("create {}", partial.display())))?;
    let outcome = extract(blob, compression, &partial, limits, budget).and_then(|(stats, hash)| {
        verify(hash).map_err(UnpackError::Invalid)?;
        Ok(stats)
    });
    match outcome {
        Ok(stats) => {
            fs::rename(&partial, dest)
                .map_err(io_at(format!("move layer into {}", dest.display())))?;
            Ok(stats)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

fn extract<R: Read>(
    blob: R,
    compression: Compression,
    root: &Path,
    limits: &Limits,
    budget: &Budget,
) -> Result<(UnpackStats, Sha256), UnpackError> {
    let hashing = HashingReader::new(decoder(blob, compression)?);
    // The stream itself is bounded too: a bomb of padding or of entries
    // that write nothing still stops at the byte budget, and quickly.
    let guarded = TarGuard::new(hashing, limits.max_metadata_bytes, budget.bytes.left());
    let mut archive = tar::Archive::new(guarded);
    let walked = walk(&mut archive, root, limits, budget);
    let mut rest = archive.into_inner();
    // The diff ID covers the whole stream, end-of-archive padding included.
    let drained = walked.and_then(|stats| {
        io::copy(&mut rest, &mut io::sink()).map_err(io_at("read layer end"))?;
        Ok(stats)
    });
    // The guard's error may reach us wrapped by the tar crate: ask it.
    if rest.over_total() {
        return Err(budget.bytes.exhausted().clone().into());
    }
    Ok((drained?, rest.into_inner().finish()))
}

/// Creates the archive's entries under `root`.
fn walk<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Path,
    limits: &Limits,
    budget: &Budget,
) -> Result<UnpackStats, UnpackError> {
    let mut stats = UnpackStats::default();
    let mut meter = InodeMeter {
        used: 0,
        cap: &budget.inodes,
    };
    // Directory modes are applied last: a read-only directory must not
    // stop later entries from being created inside it.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(io_at("read layer"))? {
        let mut entry = entry.map_err(io_at("read layer entry"))?;
        stats.entries += 1;
        // Every entry counts, even one that makes nothing: the budget
        // bounds the work too.
        meter.charge()?;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = normalize(&raw, limits)? else {
            continue;
        };
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header
            .mode()
            .map_err(io_at(format!("{}: mode", rel.display())))?
            & 0o7777;
        let uid = header
            .uid()
            .map_err(io_at(format!("{}: uid", rel.display())))?;
        let gid = header
            .gid()
            .map_err(io_at(format!("{}: gid", rel.display())))?;
        let parent = safe_parent(root, &rel, &mut meter)?;
        let Some(file_name) = rel.file_name() else {
            continue;
        };
        let target = parent.join(file_name);
        let base = file_name.as_bytes();

        if let Some(hidden) = base.strip_prefix(b".wh.") {
            stats.whiteouts += 1;
            if hidden == b".wh..opq" {
                set_opaque(&parent)?;
            } else {
                if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/')
                {
                    return Err(UnpackError::Escape(display(&raw)));
                }
                let hidden_path = parent.join(std::ffi::OsStr::from_bytes(hidden));
                clear(&hidden_path, false)?;
                mknod(&hidden_path, libc::S_IFCHR, 0)?;
            }
            continue;
        }

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                clear(&target, true)?;
                if !target.is_dir() {
                    fs::create_dir(&target)
                        .map_err(io_at(format!("create {}", target.display())))?;
                }
                lchown(&target, uid, gid)?;
                dir_modes.push((target, mode));
            }
            T::Regular | T::Continuous => {
                clear(&target, false)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_at(format!("create {}", target.display())))?;
                // One byte past the budget is enough to refuse.
                let left = budget.bytes.left().saturating_sub(stats.bytes);
                stats.bytes += io::copy(&mut (&mut entry).take(left.saturating_add(1)), &mut f)
                    .map_err(io_at(format!("write {}", target.display())))?;
                budget.bytes.check(stats.bytes)?;
                lchown(&target, uid, gid)?;
                // After chown, which clears setuid bits.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io_at(format!("chmod {}", target.display())))?;
            }
            T::Symlink => {
                let link = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::Invalid(format!("{}: symlink without a target", rel.display()))
                })?;
                clear(&target, false)?;
                // The target text may point anywhere: it is never followed
                // while unpacking, and in the guest it resolves inside the
                // container's root.
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target)
                    .map_err(io_at(format!("symlink {}", target.display())))?;
                lchown(&target, uid, gid)?;
            }
            T::Link => {
                let link = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::Invalid(format!("{}: hard link without a target", rel.display()))
                })?;
                let link_rel =
                    normalize(&link, limits)?.ok_or_else(|| UnpackError::Escape(display(&link)))?;
                let link_parent = safe_parent(root, &link_rel, &mut meter)?;
                let source = link_parent.join(link_rel.file_name().unwrap_or_default());
                let meta = fs::symlink_metadata(&source).map_err(|_| {
                    UnpackError::Invalid(format!(
                        "{}: hard link to {} which is not in the layer",
                        rel.display(),
                        display(&link)
                    ))
                })?;
                if meta.is_dir() {
                    return Err(UnpackError::Invalid(format!(
                        "{}: hard link to a directory",
                        rel.display()
                    )));
                }
                clear(&target, false)?;
                fs::hard_link(&source, &target)
                    .map_err(io_at(format!("link {}", target.display())))?;
            }
            T::Fifo => {
                clear(&target, false)?;
                mknod(&target, libc::S_IFIFO | mode, 0)?;
                lchown(&target, uid, gid)?;
            }
            T::Char | T::Block => {
                stats.skipped_devices += 1;
                tracing::debug!(path = %rel.display(), "skipping device node in layer");
            }
            _ => {}
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        // A later entry may have replaced the directory, or one above it,
        // with a symlink; chmod follows symlinks, so it would change
        // whatever the link points at, outside the layer.
        if !reached_without_symlinks(root, &dir) {
            continue;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(io_at(format!("chmod {}", dir.display())))?;
    }
    stats.inodes = meter.used;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// One raw ustar entry, built by hand so tests can say anything a
    /// hostile archive could.
    fn entry(name: &[u8], typeflag: u8, data: &[u8], link: &[u8], mode: u32) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
        h[108..116].copy_from_slice(b"0001750\0"); // uid 1000
        h[116..124].copy_from_slice(b"0001750\0"); // gid 1000
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    struct Scene {
        _tmp: tempfile::TempDir,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn scene() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host data").unwrap();
        let dest = tmp.path().join("layers").join("sha256-abc");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        Scene {
            dest,
            outside,
            _tmp: tmp,
        }
    }

    fn unpack(s: &Scene, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
        unpack_layer(
            &gzip(tar)[..],
            Compression::Gzip,
            &s.dest,
            &Limits::default(),
        )
    }

    /// The outside directory is exactly as the scene made it.
    fn outside_untouched(s: &Scene) {
        let names: Vec<_> = fs::read_dir(&s.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        assert_eq!(fs::read(s.outside.join("secret")).unwrap(), b"host data");
    }

    fn nothing_left(s: &Scene) {
        let names: Vec<_> = fs::read_dir(s.dest.parent().unwrap()).unwrap().collect();
        assert!(
            names.is_empty(),
            "a failed unpack leaves nothing behind: {names:?}"
        );
    }

    /// Found by fuzzing (fuzz/corpus/unpack/chmod-through-replaced-dir):
    /// directory modes are applied last, by path, and a later entry had
    /// replaced the directory (or its parent) with a symlink out of the
    /// layer, so the chmod landed on the host directory it pointed at.
    #[test]
    fn directory_modes_never_follow_a_symlink_that_replaced_the_directory() {
        use std::os::unix::fs::PermissionsExt;
        let s = scene();
        let inner = s.outside.join("b");
        fs::create_dir(&inner).unwrap();
        for d in [&s.outside, &inner] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).unwrap();
        }
        let target = s.outside.as_os_str().as_bytes().to_vec();
        let tar = archive(&[
            entry(b"a/", b'5', b"", b"", 0o777),
            entry(b"a/b/", b'5', b"", b"", 0o777),
            entry(b"a", b'2', b"", &target, 0o777),
        ]);
        unpack(&s, &tar).unwrap();
        for d in [&s.outside, &inner] {
            let mode = fs::metadata(d).unwrap().permissions().mode() & 0o7777;
            assert_eq!(
                mode,
                0o700,
                "{} was chmodded through the layer",
                d.display()
            );
        }
        assert!(fs::symlink_metadata(s.dest.join("a"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_normal_layer_unpacks_with_modes_owners_links_and_whiteouts() {
        let s = scene();
        let tar = archive(&[
            entry(b"./", b'5', b"", b"", 0o755),
            entry(b"bin/", b'5', b"", b"", 0o755),
            entry(b"bin/tool", b'0', b"#!/bin/sh\n", b"", 0o4755),
            entry(b"bin/alias", b'2', b"", b"tool", 0o777),
            entry(b"bin/hard", b'1', b"", b"bin/tool", 0o755),
            entry(b"/etc/abs", b'0', b"x", b"", 0o644),
            entry(b"ro/", b'5', b"", b"", 0o555),
            entry(b"ro/inside", b'0', b"y", b"", 0o644),
            entry(b"gone/.wh.file", b'0', b"", b"", 0o644),
            entry(b"opaque/.wh..wh..opq", b'0', b"", b"", 0o644),
            entry(b"dev/sda", b'3', b"", b"", 0o660),
            entry(b"run/fifo", b'6', b"", b"", 0o644),
        ]);
        let stats = unpack(&s, &tar).unwrap();
        assert_eq!(stats.skipped_devices, 1);
        assert_eq!(stats.whiteouts, 2);
        let tool = fs::metadata(s.dest.join("bin/tool")).unwrap();
        assert_eq!(
            tool.mode() & 0o7777,
            0o4755,
            "setuid kept, as the image says"
        );
        assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
        assert_eq!(
            fs::read_link(s.dest.join("bin/alias")).unwrap(),
            PathBuf::from("tool")
        );
        assert_eq!(
            fs::metadata(s.dest.join("bin/hard")).unwrap().ino(),
            tool.ino()
        );
        assert_eq!(
            fs::read(s.dest.join("etc/abs")).unwrap(),
            b"x",
            "absolute paths stay inside"
        );
        assert_eq!(
            fs::metadata(s.dest.join("ro")).unwrap().mode() & 0o777,
            0o555
        );
        assert_eq!(fs::read(s.dest.join("ro/inside")).unwrap(), b"y");
        let wh = fs::symlink_metadata(s.dest.join("gone/file")).unwrap();
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "overlay whiteout"
        );
        let mut v = [0u8; 4];
        let c = CString::new(s.dest.join("opaque").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and buffer.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                v.len(),
            )
        };
        assert_eq!(&v[..usize::try_from(n).unwrap_or(0)], b"y");
        assert!(
            !s.dest.join("dev/sda").exists(),
            "device nodes are never created"
        );
        assert!(fs::symlink_metadata(s.dest.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(!s.dest.with_file_name(".sha256-abc.partial").exists());
    }

    #[test]
    fn dotdot_paths_are_refused() {
        for name in [&b"../outside/evil"[..], b"a/../../outside/evil", b"./../x"] {
            let s = scene();
            let err = unpack(&s, &archive(&[entry(name, b'0', b"pwned", b"", 0o644)])).unwrap_err();
            assert!(
                matches!(err, UnpackError::Escape(_)),
                "{}: {err}",
                display(name)
            );
            outside_untouched(&s);
            nothing_left(&s);
        }
    }

    #[test]
    fn writing_through_a_symlinked_parent_is_refused() {
        let s = scene();
        let out = s.outside.display().to_string();
        let tar = archive(&[
            entry(b"escape", b'2', b"", out.as_bytes(), 0o777),
            entry(b"escape/evil", b'0', b"pwned", b"", 0o644),
        ]);
        let err = unpack(&s, &tar).unwrap_err();
        assert!(matches!(err, UnpackError::Escape(_)), "{err}");
        outside_untouched(&s);
        nothing_left(&s);
    }

    #[test]
    fn hard_links_to_outside_or_through_symlinks_are_refused() {
        let s = scene();
        let secret = s.outside.join("secret").display().to_string();
        for tar in [
            archive(&[entry(b"h", b'1', b"", b"../outside/secret", 0o644)]),
            archive(&[entry(b"h", b'1', b"", secret.as_bytes(), 0o644)]),
            archive(&[
                entry(
                    b"l",
                    b'2',
                    b"",
                    s.outside.display().to_string().as_bytes(),
                    0o777,
                ),
                entry(b"h", b'1', b"", b"l/secret", 0o644),
            ]),
        ] {
            assert!(unpack(&s, &tar).is_err());
            outside_untouched(&s);
            nothing_left(&s);
        }
        // The host file's link count shows no new link was made to it.
        assert_eq!(fs::metadata(s.outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn a_later_entry_replacing_a_symlink_does_not_write_through_it() {
        let s = scene();
        let secret = s.outside.join("secret").display().to_string();
        let tar = archive(&[
            entry(b"f", b'2', b"", secret.as_bytes(), 0o777),
            entry(b"f", b'0', b"new", b"", 0o644),
        ]);
        unpack(&s, &tar).unwrap();
        assert_eq!(fs::read(s.dest.join("f")).unwrap(), b"new");
        outside_untouched(&s);
    }

    #[test]
    fn huge_metadata_headers_are_refused_without_buffering() {
        let s = scene();
        // A PAX header that declares 64 GiB, followed by zeros: compresses
        // to almost nothing.
        let mut tar = entry(b"pax", b'x', b"", b"", 0o644);
        // GNU base-256: an octal field cannot hold that much.
        tar[124..136].fill(0);
        tar[124] = 0x80;
        tar[128..136].copy_from_slice(&(64u64 << 30).to_be_bytes());
        tar[148..156].copy_from_slice(b"        ");
        let sum: u32 = tar[..512].iter().map(|b| u32::from(*b)).sum();
        tar[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        tar.extend(vec![0u8; 1 << 20]);
        let err = unpack(&s, &tar).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        nothing_left(&s);
    }

    #[test]
    fn truncated_or_corrupt_streams_leave_nothing() {
        let s = scene();
        let mut tar = archive(&[entry(b"big", b'0', &[1u8; 4096], b"", 0o644)]);
        tar.truncate(1000);
        assert!(unpack(&s, &tar).is_err());
        nothing_left(&s);
        let mut gz = gzip(&archive(&[entry(b"a", b'0', b"hello", b"", 0o644)]));
        let mid = gz.len() / 2;
        gz[mid] ^= 0xff;
        assert!(unpack_layer(&gz[..], Compression::Gzip, &s.dest, &Limits::default()).is_err());
        nothing_left(&s);
    }

    #[test]
    fn inode_and_byte_budgets_hold_and_leave_nothing() {
        let s = scene();
        let limits = Limits {
            max_layer_inodes: 5,
            ..Limits::default()
        };
        let many: Vec<Vec<u8>> = (0..10)
            .map(|i| entry(format!("f{i}").as_bytes(), b'0', b"", b"", 0o644))
            .collect();
        let err =
            unpack_layer(&archive(&many)[..], Compression::None, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::Exhausted(Exhausted::LayerInodes { limit: 5 })
            ),
            "{err}"
        );
        nothing_left(&s);
        // One entry, but five parent directories made for it.
        let deep = archive(&[entry(b"a/b/c/d/e/f", b'0', b"", b"", 0o644)]);
        let err = unpack_layer(&deep[..], Compression::None, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(err, UnpackError::Exhausted(Exhausted::LayerInodes { .. })),
            "{err}"
        );
        nothing_left(&s);
        let limits = Limits {
            max_layer_bytes: 2048,
            ..Limits::default()
        };
        let big = archive(&[entry(b"f", b'0', &[0u8; 8192], b"", 0o644)]);
        let err = unpack_layer(&big[..], Compression::None, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::Exhausted(Exhausted::LayerBytes { limit: 2048 })
            ),
            "{err}"
        );
        nothing_left(&s);
        let fits = archive(&[entry(b"f", b'0', &[0u8; 100], b"", 0o644)]);
        let stats = unpack_layer(&fits[..], Compression::None, &s.dest, &limits).unwrap();
        assert_eq!((stats.bytes, stats.inodes), (100, 1));
    }

    #[test]
    fn a_tighter_budget_reports_its_own_bound() {
        let s = scene();
        let limits = Limits::default();
        let budget = Budget::for_layer(&limits).within_image(
            &Limits {
                max_image_bytes: 1000,
                ..limits
            },
            crate::limits::Usage::default(),
        );
        let big = archive(&[entry(b"f", b'0', &[0u8; 4096], b"", 0o644)]);
        let err = unpack_layer_verified(
            &zstd::encode_all(&big[..], 3).unwrap()[..],
            Compression::Zstd,
            &s.dest,
            &limits,
            &budget,
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::Exhausted(Exhausted::ImageBytes { limit: 1000 })
            ),
            "{err}"
        );
        nothing_left(&s);
    }

    #[test]
    fn zstd_layers_and_media_types() {
        let s = scene();
        let tar = archive(&[entry(b"z", b'0', b"zstd!", b"", 0o644)]);
        let z = zstd::encode_all(&tar[..], 3).unwrap();
        let c =
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap();
        unpack_layer(&z[..], c, &s.dest, &Limits::default()).unwrap();
        assert_eq!(fs::read(s.dest.join("z")).unwrap(), b"zstd!");
        assert!(Compression::from_media_type("application/x-rar").is_err());
        let again = unpack_layer(&z[..], c, &s.dest, &Limits::default()).unwrap_err();
        assert!(matches!(again, UnpackError::Exists(_)));
    }

    #[test]
    fn a_stale_partial_from_a_crash_is_discarded() {
        let s = scene();
        let partial = s.dest.with_file_name(".sha256-abc.partial");
        fs::create_dir_all(partial.join("junk")).unwrap();
        unpack(&s, &archive(&[entry(b"ok", b'0', b"1", b"", 0o644)])).unwrap();
        assert!(!s.dest.join("junk").exists());
        assert!(!partial.exists());
    }
}
