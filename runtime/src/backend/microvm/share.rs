//! A microVM pod's share: what the VMM serves the guest over virtio-fs
//! and the agent mounts at [`GUEST_SHARED`].
//!
//! The guest is hostile, so the share is two directories (Kata's design):
//!
//! ```text
//! <sandbox dir>/mounts/   host-only: the runtime writes and binds here
//!     etc/                  the pod's hosts, resolv.conf, hostname
//!     layers/<chain id>     image layers, bound ro (once per pod)
//!     containers/<id>/<n>   each container's volumes, ro or rw as asked
//! <sandbox dir>/shared/   what the VMM serves: a read-only view of
//!                         mounts/ that receives every later bind
//! ```
//!
//! `mounts/` is a mount of its own in its own peer group and `shared/` a
//! slave clone of it whose top is read-only, so the guest can write only
//! inside volumes bound writable, and no host operation ever resolves a
//! path the guest could have written. Every mount carries
//! `nosuid,nodev,noexec`, is made through fds opened beneath the sandbox
//! directory without following symlinks, and is found again by mount ID.

use crate::hostfs::{beneath, mounts, remove};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the guest agent mounts the share.
pub const GUEST_SHARED: &str = "/run/vmcri/shared";

/// The host-only directory the runtime binds into.
const MOUNTS: &str = "mounts";
/// The guest's read-only view of it.
const VIEW: &str = "shared";
/// Mode of every directory the runtime makes here.
const PRIVATE_DIR: u32 = 0o700;

/// Serializes layer exposure, so two containers of one image created at
/// once bind its layers once.
static LAYERS: Mutex<()> = Mutex::new(());

/// The share of one pod.
#[derive(Debug, Clone)]
pub struct SharedDir {
    sandbox_dir: PathBuf,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// A name the runtime made (a hex chain ID, a container ID): one plain
/// path component.
fn check_name(kind: &str, name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(format!("bad {kind} {name:?}")));
    }
    Ok(())
}

impl SharedDir {
    /// The share of the sandbox whose private directory is `sandbox_dir`.
    pub fn new(sandbox_dir: &Path) -> SharedDir {
        SharedDir {
            sandbox_dir: sandbox_dir.to_path_buf(),
        }
    }

    /// The directory the VMM serves (the read-only view).
    pub fn path(&self) -> PathBuf {
        self.sandbox_dir.join(VIEW)
    }

    /// Where the host writes the pod's /etc files.
    pub fn etc_dir(&self) -> PathBuf {
        self.sandbox_dir.join(MOUNTS).join("etc")
    }

    fn guest(rel: &Path) -> String {
        Path::new(GUEST_SHARED).join(rel).display().to_string()
    }

    fn sandbox_fd(&self) -> io::Result<OwnedFd> {
        Ok(std::fs::File::open(&self.sandbox_dir)?.into())
    }

    /// `mounts/`, the mount (not the directory under it).
    fn mounts_fd(&self) -> io::Result<OwnedFd> {
        let sandbox = self.sandbox_fd()?;
        if !mounts::is_mount_point(&sandbox, OsStr::new(MOUNTS))? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the pod's share is not set up",
            ));
        }
        beneath::open_dir(&sandbox, Path::new(MOUNTS), false)
    }

    /// Sets up `mounts/` and the guest's view of it; idempotent, so a
    /// restarted daemon can call it again.
    pub fn prepare(&self) -> io::Result<()> {
        let sandbox = self.sandbox_fd()?;
        if !mounts::is_mount_point(&sandbox, OsStr::new(MOUNTS))? {
            let dir = beneath::mkdirs(&sandbox, Path::new(MOUNTS), PRIVATE_DIR)?;
            mounts::shared_root(dir.as_fd())?;
        }
        if !mounts::is_mount_point(&sandbox, OsStr::new(VIEW))? {
            let source = beneath::open_dir(&sandbox, Path::new(MOUNTS), false)?;
            let view = beneath::mkdirs(&sandbox, Path::new(VIEW), PRIVATE_DIR)?;
            mounts::read_only_view(&source, &view)?;
        }
        Ok(())
    }

    /// Exposes image layer `chain_hex` (at `src`) read-only; returns its
    /// path in the guest. Idempotent.
    pub fn expose_layer(&self, chain_hex: &str, src: &Path) -> io::Result<String> {
        if chain_hex.is_empty() || !chain_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("bad layer chain ID {chain_hex:?}")));
        }
        let rel = Path::new("layers").join(chain_hex);
        let _one = crate::lock::lock(&LAYERS);
        let root = self.mounts_fd()?;
        let layers = beneath::mkdirs(&root, Path::new("layers"), PRIVATE_DIR)?;
        if !mounts::is_mount_point(&layers, OsStr::new(chain_hex))? {
            let target = beneath::mkdirs(&layers, Path::new(chain_hex), PRIVATE_DIR)?;
            mounts::bind(
                src,
                &target,
                mounts::BindOptions {
                    readonly: true,
                    recursive: false,
                },
            )?;
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
        check_name("container ID", id)?;
        let rel = Path::new("containers").join(id).join(index.to_string());
        let source = mounts::open_source(src)?;
        let is_dir = rustix::fs::fstat(&source)
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
            .map_err(io::Error::from)?;
        let root = self.mounts_fd()?;
        let target = if is_dir {
            beneath::mkdirs(&root, &rel, PRIVATE_DIR)?
        } else {
            beneath::mkfile(&root, &rel, PRIVATE_DIR)?
        };
        mounts::bind_fd(
            source.as_fd(),
            &target,
            mounts::BindOptions {
                readonly,
                recursive: true,
            },
        )?;
        Ok(Self::guest(&rel))
    }

    /// Unexposes container `id`'s volumes.
    pub fn release_container(&self, id: &str) -> io::Result<()> {
        check_name("container ID", id)?;
        let root = match self.mounts_fd() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let containers = match beneath::open_dir(&root, Path::new("containers"), true) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match beneath::open_dir(&containers, Path::new(id), true) {
            Ok(dir) => {
                for entry in rustix::fs::Dir::read_from(&dir).map_err(io::Error::from)? {
                    let entry = entry.map_err(io::Error::from)?;
                    let name = entry.file_name();
                    if name != c"." && name != c".." {
                        mounts::unmount_at(&dir, OsStr::from_bytes(name.to_bytes()))?;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        remove::remove_tree_at(&containers, OsStr::new(id))
    }

    /// Unexposes everything (the view and every bind under `mounts/`, in
    /// one lazy unmount each) and deletes both directories.
    pub fn release_all(&self) -> io::Result<()> {
        let sandbox = match self.sandbox_fd() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for name in [VIEW, MOUNTS] {
            mounts::unmount_at(&sandbox, OsStr::new(name))?;
            remove::remove_tree_at(&sandbox, OsStr::new(name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mounted(path: &Path) -> bool {
        let parent = std::fs::File::open(path.parent().unwrap()).unwrap();
        mounts::is_mount_point(&parent, path.file_name().unwrap()).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        layer: PathBuf,
        volume: PathBuf,
        file_volume: PathBuf,
        share: SharedDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let volume = dir.path().join("volume");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(layer.join("f"), "layer file").unwrap();
        std::fs::write(volume.join("v"), "volume file").unwrap();
        let file_volume = dir.path().join("hosts");
        std::fs::write(&file_volume, "127.0.0.1 localhost\n").unwrap();
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let share = SharedDir::new(&sandbox);
        crate::sandbox::pod_files::write(&share.etc_dir(), "pod", None).unwrap();
        share.prepare().unwrap();
        Fixture {
            _dir: dir,
            layer,
            volume,
            file_volume,
            share,
        }
    }

    // These need root (bind mounts), which the test machine has.
    #[test]
    fn the_view_is_read_only_and_shows_layers_ro_and_volumes_as_asked() {
        let f = fixture();
        let view = f.share.path();
        // Prepare again (a restarted daemon): no second mount.
        f.share.prepare().unwrap();
        assert_eq!(
            std::fs::metadata(&view).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let g = f.share.expose_layer("abc123", &f.layer).unwrap();
        assert_eq!(g, "/run/vmcri/shared/layers/abc123");
        f.share.expose_layer("abc123", &f.layer).unwrap();
        assert_eq!(
            std::fs::read_to_string(view.join("layers/abc123/f")).unwrap(),
            "layer file"
        );
        assert!(f.share.expose_layer("../x", &f.layer).is_err());

        f.share.expose_volume("c1", 0, &f.volume, false).unwrap();
        f.share.expose_volume("c1", 1, &f.volume, true).unwrap();
        f.share
            .expose_volume("c1", 2, &f.file_volume, true)
            .unwrap();
        assert!(f.share.expose_volume("../c", 0, &f.volume, false).is_err());

        // What the guest can and cannot do through the view.
        let guest = |rel: &str| view.join(rel);
        std::fs::write(guest("containers/c1/0/w"), "written").unwrap();
        assert_eq!(
            std::fs::read_to_string(f.volume.join("w")).unwrap(),
            "written"
        );
        for (what, r) in [
            ("top", std::fs::write(guest("x"), "x")),
            ("layers/", std::fs::write(guest("layers/evil"), "x")),
            ("a layer", std::fs::write(guest("layers/abc123/new"), "x")),
            ("containers/", std::fs::write(guest("containers/c1/x"), "x")),
            (
                "a ro volume",
                std::fs::write(guest("containers/c1/1/w2"), "x"),
            ),
            ("etc/", std::fs::write(guest("etc/evil"), "x")),
            ("etc/hosts", std::fs::write(guest("etc/hosts"), "x")),
        ] {
            assert!(r.is_err(), "the guest could write in {what}");
        }
        assert!(symlink("/etc", guest("layers/next")).is_err());
        assert!(std::fs::create_dir(guest("containers/c2")).is_err());
        assert_eq!(
            std::fs::read_to_string(guest("containers/c1/2")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert!(std::fs::read_to_string(guest("etc/hosts"))
            .unwrap()
            .contains("127.0.1.1\tpod"));
        // Every mount in the pod is nosuid, nodev and noexec.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let sandbox = f.share.sandbox_dir.display().to_string();
        let ours: Vec<&str> = info
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| Path::new(m).starts_with(&sandbox))
            })
            .collect();
        assert_eq!(ours.len(), 2 + 2 * 4, "{ours:#?}");
        for l in &ours {
            let opts = l.split(' ').nth(5).unwrap();
            for flag in ["nosuid", "nodev", "noexec"] {
                assert!(opts.split(',').any(|o| o == flag), "{flag} missing: {l}");
            }
        }

        f.share.release_container("c1").unwrap();
        assert!(!guest("containers/c1").exists());
        assert!(!f
            .share
            .etc_dir()
            .parent()
            .unwrap()
            .join("containers/c1")
            .exists());
        f.share.release_all().unwrap();
        assert!(!view.exists());
        assert!(!f.share.sandbox_dir.join(MOUNTS).exists());
        // The host's files survived.
        assert_eq!(
            std::fs::read_to_string(f.layer.join("f")).unwrap(),
            "layer file"
        );
        assert_eq!(
            std::fs::read_to_string(f.volume.join("v")).unwrap(),
            "volume file"
        );
        assert!(f.file_volume.exists());
    }

    #[test]
    fn release_all_takes_every_mount_in_one_go() {
        let f = fixture();
        f.share.expose_layer("ab", &f.layer).unwrap();
        f.share.expose_volume("c9", 0, &f.volume, false).unwrap();
        assert!(mounted(&f.share.path().join("layers/ab")));
        f.share.release_all().unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| Path::new(m).starts_with(&f.share.sandbox_dir)));
        assert!(f.volume.join("v").exists());
        // Nothing left to release.
        f.share.release_all().unwrap();
        f.share.release_container("c9").unwrap();
    }
}
