//! A microVM pod's shared directory (`<sandbox dir>/shared`), served to
//! the guest over virtio-fs and mounted there at [`GUEST_SHARED`]. The
//! runtime bind-mounts into it what containers need: image layers
//! read-only under `layers/<chain id>` (once per pod, however many
//! containers use them) and each container's CRI volumes under
//! `containers/<id>/<n>`. Removal unmounts first and never deletes through
//! a mount: a volume's files belong to the host.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the guest agent mounts the share.
pub const GUEST_SHARED: &str = "/run/vmcri/shared";

/// The share of one pod.
#[derive(Debug, Clone)]
pub struct SharedDir {
    host: PathBuf,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn mount(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let s = src.map(cpath).transpose()?;
    let t = cpath(target)?;
    // SAFETY: valid NUL-terminated strings (or null) that outlive the call.
    let rc = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount on {}: {e}", target.display()),
        ));
    }
    Ok(())
}

/// Bind-mounts `src` (recursively) on `target`, read-only if asked; a
/// failed remount leaves nothing mounted.
fn bind(src: &Path, target: &Path, readonly: bool) -> io::Result<()> {
    mount(Some(src), target, libc::MS_BIND | libc::MS_REC)?;
    if readonly {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        if let Err(e) = mount(None, target, flags) {
            let _ = unmount_all(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

fn is_mount_point(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

/// Unmounts everything at or below `dir` (lazily: busy files stay
/// readable to whoever holds them), then checks nothing is left.
fn unmount_all(dir: &Path) -> io::Result<()> {
    for m in mounts_under(dir) {
        let t = cpath(&m)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("unmount {}: {e}", m.display()),
                ));
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(io::Error::other(format!(
            "{} still has mounts ({}); not deleting through them",
            dir.display(),
            left[0].display()
        )));
    }
    Ok(())
}

/// Removes `dir` after unmounting everything under it.
pub fn remove_safely(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    unmount_all(dir)?;
    std::fs::remove_dir_all(dir)
}

impl SharedDir {
    /// The share at `host` (created on first use).
    pub fn new(host: PathBuf) -> SharedDir {
        SharedDir { host }
    }

    /// The host directory the VMM serves.
    pub fn path(&self) -> &Path {
        &self.host
    }

    fn guest(rel: &Path) -> String {
        Path::new(GUEST_SHARED).join(rel).display().to_string()
    }

    /// Exposes image layer `chain_hex` (at `src`) read-only; returns its
    /// path in the guest. Idempotent.
    pub fn expose_layer(&self, chain_hex: &str, src: &Path) -> io::Result<String> {
        if chain_hex.is_empty() || !chain_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad layer chain ID",
            ));
        }
        let rel = Path::new("layers").join(chain_hex);
        let target = self.host.join(&rel);
        if !is_mount_point(&target) {
            std::fs::create_dir_all(&target)?;
            bind(src, &target, true)?;
        }
        Ok(Self::guest(&rel))
    }

    /// Exposes volume `index` of container `id` (a file or directory at
    /// `src`); returns its path in the guest.
    pub fn expose_volume(
        &self,
        id: &str,
        index: usize,
        src: &Path,
        readonly: bool,
    ) -> io::Result<String> {
        let rel = Path::new("containers").join(id).join(index.to_string());
        let target = self.host.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if src.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            std::fs::File::create(&target)?;
        }
        bind(src, &target, readonly)?;
        Ok(Self::guest(&rel))
    }

    /// Unexposes container `id`'s volumes.
    pub fn release_container(&self, id: &str) -> io::Result<()> {
        remove_safely(&self.host.join("containers").join(id))
    }

    /// Unexposes everything and removes the share.
    pub fn release_all(&self) -> io::Result<()> {
        remove_safely(&self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b/c"), PathBuf::from("/a b/c"));
        assert_eq!(unescape(r"/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/end\04"), PathBuf::from(r"/end\04"));
    }

    // Needs root (bind mounts), which the test machine has.
    #[test]
    fn layers_are_read_only_volumes_follow_the_request_and_removal_spares_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let volume = dir.path().join("volume");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(layer.join("f"), "layer file").unwrap();
        std::fs::write(volume.join("v"), "volume file").unwrap();
        let file_volume = dir.path().join("hosts");
        std::fs::write(&file_volume, "127.0.0.1 localhost\n").unwrap();
        let share = SharedDir::new(dir.path().join("shared"));

        let g = share.expose_layer("abc123", &layer).unwrap();
        assert_eq!(g, "/run/vmcri/shared/layers/abc123");
        // Exposing again is a no-op, not a second mount.
        share.expose_layer("abc123", &layer).unwrap();
        assert_eq!(mounts_under(&share.path().join("layers")).len(), 1);
        let exposed = share.path().join("layers/abc123");
        assert_eq!(
            std::fs::read_to_string(exposed.join("f")).unwrap(),
            "layer file"
        );
        assert!(
            std::fs::write(exposed.join("new"), "x").is_err(),
            "layer writable"
        );
        assert!(share.expose_layer("../x", &layer).is_err());

        share.expose_volume("c1", 0, &volume, false).unwrap();
        share.expose_volume("c1", 1, &volume, true).unwrap();
        share.expose_volume("c1", 2, &file_volume, true).unwrap();
        let c1 = share.path().join("containers/c1");
        std::fs::write(c1.join("0/w"), "written").unwrap();
        assert_eq!(
            std::fs::read_to_string(volume.join("w")).unwrap(),
            "written"
        );
        assert!(
            std::fs::write(c1.join("1/w2"), "x").is_err(),
            "read-only volume writable"
        );
        assert_eq!(
            std::fs::read_to_string(c1.join("2")).unwrap(),
            "127.0.0.1 localhost\n"
        );

        share.release_container("c1").unwrap();
        assert!(!c1.exists());
        share.release_all().unwrap();
        assert!(!share.path().exists());
        // The host's files survived both removals.
        assert_eq!(
            std::fs::read_to_string(layer.join("f")).unwrap(),
            "layer file"
        );
        assert_eq!(
            std::fs::read_to_string(volume.join("v")).unwrap(),
            "volume file"
        );
        assert_eq!(
            std::fs::read_to_string(volume.join("w")).unwrap(),
            "written"
        );
        assert!(file_volume.exists());
    }
}
