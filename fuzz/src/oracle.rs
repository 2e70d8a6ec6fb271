//! Inode stamps: how the escape checks tell that something outside the
//! directory a target works in was touched.
//!
//! A stamp holds an inode's identity, mode, ownership, link count, size
//! and its three times. Creating, removing or renaming an entry changes
//! its directory's mtime and ctime; writing, chmod, chown, linking or
//! xattrs change the inode's ctime (which no system call can set back);
//! reading a file or listing a directory changes its atime once
//! [`age`] has put the atime before the mtime, since `relatime` then
//! updates it on the next access. Taking a stamp only stats, which
//! changes nothing.

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Inode metadata compared before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Inode number.
    pub ino: u64,
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last access (seconds, nanoseconds).
    pub atime: (i64, i64),
    /// Last content change.
    pub mtime: (i64, i64),
    /// Last inode change.
    pub ctime: (i64, i64),
}

/// The stamp of `path` (not following a final symlink).
pub fn stamp(path: &Path) -> Stamp {
    let m = fs::symlink_metadata(path).expect("a watched path exists");
    Stamp {
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        size: m.size(),
        atime: (m.atime(), m.atime_nsec()),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }
}

/// Sets `path`'s atime before its mtime, so the next access updates it.
pub fn age(path: &Path) {
    let epoch = SystemTime::UNIX_EPOCH;
    let times = FileTimes::new()
        .set_accessed(epoch + Duration::from_secs(1_000_000))
        .set_modified(epoch + Duration::from_secs(2_000_000));
    File::open(path)
        .and_then(|f| f.set_times(times))
        .expect("set times");
}

/// Paths that must not change, with their stamps.
#[derive(Debug, Default)]
pub struct Watch(Vec<(PathBuf, Stamp)>);

impl Watch {
    /// Ages each path (so reads show) and takes its stamp.
    pub fn new(paths: &[PathBuf]) -> Watch {
        for p in paths {
            age(p);
        }
        Watch(paths.iter().map(|p| (p.clone(), stamp(p))).collect())
    }

    /// Takes the stamps again: what happened so far is setup.
    pub fn rebase(&mut self) {
        for (p, s) in &mut self.0 {
            *s = stamp(p);
        }
    }

    /// The inode numbers watched.
    pub fn inodes(&self) -> Vec<u64> {
        self.0.iter().map(|(_, s)| s.ino).collect()
    }

    /// Panics if any watched path changed; `what` names the culprit.
    pub fn check(&self, what: &str) {
        for (p, before) in &self.0 {
            let now = stamp(p);
            assert_eq!(*before, now, "{what} reached {}", p.display());
        }
    }
}
