//! Deleting a directory tree a guest may have built: iteratively (a
//! 20,000-deep chain neither overflows the stack nor runs out of fds),
//! with at most three fds open, never following a symlink (a link is
//! removed, not its target), and never crossing into a mount (a bound
//! volume is the host's: removal stops there with an error instead).

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How many passes that removed nothing one removal tolerates.
const MAX_RETRIES: u32 = 1000;

fn open_child(dir: impl AsFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn identity(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

fn refuse_mount(name: &CStr) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{} is a mount point: not deleting through it",
            name.to_string_lossy()
        ),
    )
}

/// What one pass over a directory found.
enum Next {
    /// A subdirectory to descend into.
    Descend(CString),
    /// The directory is empty now.
    Empty,
}

/// Unlinks every non-directory entry of `dir` and returns the first
/// subdirectory, if any.
fn sweep(dir: &OwnedFd) -> io::Result<Next> {
    let mut entries = Dir::read_from(dir).map_err(io::Error::from)?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => {
                let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)?;
                FileType::from_raw_mode(st.st_mode) == FileType::Directory
            }
            _ => false,
        };
        if is_dir {
            return Ok(Next::Descend(name.to_owned()));
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            // Replaced by a directory since the listing.
            Err(rustix::io::Errno::ISDIR) => return Ok(Next::Descend(name.to_owned())),
            // A file with a bind on it.
            Err(rustix::io::Errno::BUSY) => return Err(refuse_mount(name)),
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(Next::Empty)
}

/// Removes `name` in directory `parent` and everything under it, as the
/// module says. A missing `name` is not an error.
pub fn remove_tree_at(parent: impl AsFd, name: &OsStr) -> io::Result<()> {
    let parent = parent.as_fd();
    let top_name = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))?;
    if super::mounts::is_mount_point(parent, name).unwrap_or(false) {
        return Err(refuse_mount(&top_name));
    }
    let top = match open_child(parent, &top_name) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // A file or a symlink: unlink it, never what it points at.
        Err(rustix::io::Errno::NOTDIR) | Err(rustix::io::Errno::LOOP) => {
            return match rustix::fs::unlinkat(parent, top_name.as_c_str(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(io::Error::from(e)),
            };
        }
        Err(e) => return Err(io::Error::from(e)),
    };
    let mount = super::mounts::mount_id(&top)?;
    // The path from `top` down to `cur`: each step's name and the
    // identity of the directory it was taken from, to check `..` on the
    // way back up (a guest moving directories meanwhile is caught).
    let mut path: Vec<(CString, (u64, u64))> = Vec::new();
    let mut cur = top;
    // Passes that removed nothing (an entry changing under us, a file
    // system that lists what it will not delete) are retried a bounded
    // number of times, never forever.
    let mut retries = 0u32;
    let mut retry = || {
        retries += 1;
        if retries > MAX_RETRIES {
            return Err(io::Error::other(
                "the tree keeps changing while it is removed; giving up",
            ));
        }
        Ok(())
    };
    loop {
        match sweep(&cur)? {
            Next::Descend(child) => {
                let fd = match open_child(&cur, &child) {
                    Ok(fd) => fd,
                    // Replaced or removed since the listing.
                    Err(rustix::io::Errno::NOTDIR)
                    | Err(rustix::io::Errno::LOOP)
                    | Err(rustix::io::Errno::NOENT) => {
                        retry()?;
                        continue;
                    }
                    Err(e) => return Err(io::Error::from(e)),
                };
                if super::mounts::mount_id(&fd)? != mount {
                    return Err(refuse_mount(&child));
                }
                path.push((child, identity(&cur)?));
                cur = fd;
            }
            Next::Empty => {
                let Some((name, expected)) = path.pop() else {
                    drop(cur);
                    return match rustix::fs::unlinkat(
                        parent,
                        top_name.as_c_str(),
                        AtFlags::REMOVEDIR,
                    ) {
                        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                        Err(e) => Err(io::Error::from(e)),
                    };
                };
                let up = open_child(&cur, c"..").map_err(io::Error::from)?;
                if identity(&up)? != expected {
                    return Err(io::Error::other(
                        "a directory was moved while its tree was being removed",
                    ));
                }
                drop(cur);
                match rustix::fs::unlinkat(&up, name.as_c_str(), AtFlags::REMOVEDIR) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    // Refilled meanwhile: the next sweep of `up` finds it.
                    Err(rustix::io::Errno::NOTEMPTY) => retry()?,
                    Err(rustix::io::Errno::BUSY) => return Err(refuse_mount(&name)),
                    Err(e) => return Err(io::Error::from(e)),
                }
                cur = up;
            }
        }
    }
}

/// Removes `path` and everything under it (see [`remove_tree_at`]); the
/// path's parent is resolved normally, so it must be a path the runtime
/// owns.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot remove {}", path.display()),
            ))
        }
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = match std::fs::File::open(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_tree_at(&dir, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    /// Builds a chain of `depth` nested directories under `top` with
    /// fds, as a guest would (paths that long cannot be named at once).
    fn chain(top: &Path, depth: usize, leaf_link: &Path) {
        std::fs::create_dir(top).unwrap();
        let mut cur: OwnedFd = std::fs::File::open(top).unwrap().into();
        for _ in 0..depth {
            rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).unwrap();
            cur = open_child(&cur, c"d").unwrap();
        }
        rustix::fs::symlinkat(leaf_link, &cur, c"link").unwrap();
        rustix::fs::symlinkat(c"/", &cur, c"root").unwrap();
    }

    #[test]
    fn a_20000_deep_chain_with_links_to_host_files_goes_and_the_targets_stay() {
        let t = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, "host").unwrap();
        let top = t.path().join("share");
        chain(&top, 20_000, &secret);
        // Siblings at the top: a link to a host directory and a file.
        symlink(host.path(), top.join("hostdir")).unwrap();
        std::fs::write(top.join("f"), "x").unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host");
        assert!(host.path().is_dir());
        // No fd of ours is left open on anything that was in the tree.
        let leaked: Vec<PathBuf> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|p| p.starts_with(t.path()))
            .collect();
        assert!(leaked.is_empty(), "fds leaked: {leaked:?}");
    }

    #[test]
    fn a_symlink_at_the_top_is_unlinked_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("keep"), "k").unwrap();
        symlink(host.path(), t.path().join("share")).unwrap();
        remove_tree(&t.path().join("share")).unwrap();
        assert!(std::fs::symlink_metadata(t.path().join("share")).is_err());
        assert!(host.path().join("keep").exists());
        // Missing is fine.
        remove_tree(&t.path().join("share")).unwrap();
    }

    // Needs root (a bind mount), which the test machine has.
    #[test]
    fn removal_stops_at_a_mount_and_spares_what_is_under_it() {
        let t = tempfile::tempdir().unwrap();
        let vol = tempfile::tempdir().unwrap();
        std::fs::write(vol.path().join("data"), "volume").unwrap();
        let target = t.path().join("share/containers/c1/0");
        std::fs::create_dir_all(&target).unwrap();
        let fd: OwnedFd = std::fs::File::open(&target).unwrap().into();
        super::super::mounts::bind(
            vol.path(),
            &fd,
            super::super::mounts::BindOptions {
                readonly: false,
                recursive: true,
            },
        )
        .unwrap();
        drop(fd);
        let e = remove_tree(&t.path().join("share")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        assert_eq!(
            std::fs::read_to_string(vol.path().join("data")).unwrap(),
            "volume"
        );
        let parent: OwnedFd = std::fs::File::open(target.parent().unwrap())
            .unwrap()
            .into();
        assert_eq!(
            super::super::mounts::unmount_at(&parent, OsStr::new("0")).unwrap(),
            1
        );
        remove_tree(&t.path().join("share")).unwrap();
        assert!(!t.path().join("share").exists());
        assert!(vol.path().join("data").exists());
    }
}
