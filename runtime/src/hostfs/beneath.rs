//! Opening and creating paths beneath a directory fd with `openat2`:
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, plus
//! `RESOLVE_NO_XDEV` where a walk must not enter a mount (a bound volume
//! is the host's, never a place to create mount points in).

use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

/// Resolution that stays beneath the starting fd and follows no link.
const STRICT: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens directory `rel` beneath `root`. With `same_mount`, a walk that
/// would enter another mount fails (EXDEV).
pub fn open_dir(root: impl AsFd, rel: &Path, same_mount: bool) -> io::Result<OwnedFd> {
    let resolve = if same_mount {
        STRICT | ResolveFlags::NO_XDEV
    } else {
        STRICT
    };
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )
    .map_err(io::Error::from)
}

/// Opens `rel` beneath `root` as an `O_PATH` fd (a mount target, or a
/// handle to check), without following a final symlink.
pub fn open_path(root: impl AsFd, rel: &Path) -> io::Result<OwnedFd> {
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STRICT | ResolveFlags::NO_XDEV,
    )
    .map_err(io::Error::from)
}

/// Checks that `rel` is a plain relative path: no root, `..` or `.`.
fn plain(rel: &Path) -> io::Result<()> {
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a plain relative path", rel.display()),
        ))
    }
}

/// Creates directory `rel` and its missing parents beneath `root` with
/// `mode` (never entering a symlink or another mount) and opens it.
pub fn mkdirs(root: impl AsFd, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
    plain(rel)?;
    let mut cur = open_dir(root, Path::new("."), true)?;
    for c in rel.components() {
        match rustix::fs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        cur = open_dir(&cur, Path::new(c.as_os_str()), true)?;
    }
    Ok(cur)
}

/// Creates the empty regular file `rel` beneath `root` (its parents as
/// directories with `dir_mode`), or accepts one that exists; never
/// follows or replaces a symlink. Returns an `O_PATH` fd of the file.
pub fn mkfile(root: impl AsFd, rel: &Path, dir_mode: u32) -> io::Result<OwnedFd> {
    plain(rel)?;
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path")),
    };
    let dir = mkdirs(root, parent, dir_mode)?;
    match rustix::fs::openat2(
        &dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
        STRICT | ResolveFlags::NO_XDEV,
    ) {
        Ok(_) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    let fd = open_path(&dir, Path::new(name))?;
    let st = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a regular file", rel.display()),
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn root_fd(p: &Path) -> OwnedFd {
        std::fs::File::open(p).unwrap().into()
    }

    #[test]
    fn creates_nested_directories_with_their_mode() {
        let t = tempfile::tempdir().unwrap();
        let fd = root_fd(t.path());
        mkdirs(&fd, Path::new("a/b/c"), 0o700).unwrap();
        mkdirs(&fd, Path::new("a/b/c"), 0o700).unwrap();
        let m = std::fs::metadata(t.path().join("a/b")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn symlinks_and_dotdot_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("layers")).unwrap();
        symlink(outside.path(), t.path().join("layers/evil")).unwrap();
        symlink(outside.path(), t.path().join("linkdir")).unwrap();
        let fd = root_fd(t.path());
        // A final symlink and a symlink in the middle both fail.
        assert!(mkdirs(&fd, Path::new("layers/evil"), 0o700).is_err());
        assert!(mkdirs(&fd, Path::new("linkdir/x"), 0o700).is_err());
        assert!(mkfile(&fd, Path::new("linkdir/f"), 0o700).is_err());
        assert!(mkdirs(&fd, Path::new("../x"), 0o700).is_err());
        assert!(open_dir(&fd, Path::new("layers/evil"), false).is_err());
        assert!(open_dir(&fd, Path::new(".."), false).is_err());
        // Nothing appeared outside.
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_mount_point_is_created_once_and_never_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let fd = root_fd(t.path());
        mkfile(&fd, Path::new("c/0"), 0o700).unwrap();
        mkfile(&fd, Path::new("c/0"), 0o700).unwrap();
        assert!(t.path().join("c/0").is_file());
        symlink(&victim, t.path().join("c/1")).unwrap();
        assert!(mkfile(&fd, Path::new("c/1"), 0o700).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::create_dir(t.path().join("c/2")).unwrap();
        assert!(mkfile(&fd, Path::new("c/2"), 0o700).is_err());
    }
}
