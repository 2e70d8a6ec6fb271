//! Bind mounts made and undone through fds, identified by mount ID.
//!
//! A bind is cloned with `open_tree`, given its flags with
//! `mount_setattr` while still detached, and only then attached with
//! `move_mount` onto a target fd opened beneath a trusted directory. So a
//! mount is never visible, not even for an instant, without `nosuid`,
//! `nodev`, `noexec` (and `ro` where asked), and copies that propagate to
//! a pod's read-only view inherit exactly those flags.

use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
use rustix::mount::{MoveMountFlags, OpenTreeFlags, UnmountFlags};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

// linux/mount.h: mount_setattr(2) attributes and its argument.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// Every mount the runtime makes for a guest carries these.
const LOCKED_DOWN: u64 = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Propagation of a mount.
#[derive(Debug, Clone, Copy)]
pub enum Propagation {
    /// Its own peer group: mounts made under it reach its slaves.
    Shared,
    /// Receives mounts from its master, sends none back.
    Slave,
    /// Neither.
    Private,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH [| AT_RECURSIVE], attr)`; no
/// crate wraps it yet (rustix has the other new mount syscalls).
fn setattr(fd: BorrowedFd<'_>, recursive: bool, attr: &MountAttr) -> io::Result<()> {
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: `fd` is a valid fd, the path a valid empty C string and
    // `attr` a live, properly laid out mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the propagation of the mount at `fd` (the mount itself, not its
/// children).
pub fn set_propagation(fd: impl AsFd, p: Propagation) -> io::Result<()> {
    set_propagation_tree(fd, p, false)
}

/// Sets the propagation of the mount at `fd`, and of every mount under it
/// if `recursive`.
fn set_propagation_tree(fd: impl AsFd, p: Propagation, recursive: bool) -> io::Result<()> {
    let propagation = match p {
        Propagation::Shared => libc::MS_SHARED,
        Propagation::Slave => libc::MS_SLAVE,
        Propagation::Private => libc::MS_PRIVATE,
    };
    setattr(
        fd.as_fd(),
        recursive,
        &MountAttr {
            attr_set: 0,
            attr_clr: 0,
            propagation,
            userns_fd: 0,
        },
    )
}

/// The ID of the mount `fd` lives on.
pub fn mount_id(fd: impl AsFd) -> io::Result<u64> {
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
        .map_err(io::Error::from)?;
    if !StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel reports no mount IDs (Linux 5.8 or later is needed)",
        ));
    }
    Ok(st.stx_mnt_id)
}

/// Whether `name` in `dir` is the root of a mount (a bind target),
/// without following a symlink there; a missing `name` is not.
pub fn is_mount_point(dir: impl AsFd, name: &OsStr) -> io::Result<bool> {
    let st = match rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the kernel does not tell mount roots (Linux 5.8 or later is needed)",
    ))
}

/// How a bind is attached.
#[derive(Debug, Clone, Copy)]
pub struct BindOptions {
    /// Read-only, recursively.
    pub readonly: bool,
    /// Clone the source's submounts too.
    pub recursive: bool,
}

/// Binds `src` (a host path the runtime trusts: an image layer, a volume
/// kubelet named) onto `target`, an fd opened beneath a trusted
/// directory, with `nosuid,nodev,noexec` (and `ro` if asked) set before
/// it is attached. Returns the new mount's ID.
pub fn bind(src: &Path, target: impl AsFd, opts: BindOptions) -> io::Result<u64> {
    let src = rustix::fs::open(
        src,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {}", src.display(), io::Error::from(e)),
        )
    })?;
    bind_fd(src.as_fd(), target, opts)
}

/// Opens `path` (absolute) as an `O_PATH` fd without following any
/// symlink on the way: a volume's path may run through a directory
/// another pod's guest can write, and a link planted there must not
/// choose what the host binds.
pub fn open_source(path: &Path) -> io::Result<OwnedFd> {
    let rel = path.strip_prefix("/").map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not an absolute path", path.display()),
        )
    })?;
    let root = rustix::fs::open(
        "/",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(io::Error::from)?;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        &root,
        rel,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::NO_SYMLINKS | rustix::fs::ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| {
        let why = if e == rustix::io::Errno::LOOP {
            "a symlink on its path (give the resolved path)".to_string()
        } else {
            io::Error::from(e).to_string()
        };
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {why}", path.display()),
        )
    })
}

/// [`bind`] from a source already opened (see [`open_source`]).
pub fn bind_fd(src: BorrowedFd<'_>, target: impl AsFd, opts: BindOptions) -> io::Result<u64> {
    let mut set = LOCKED_DOWN;
    if opts.readonly {
        set |= MOUNT_ATTR_RDONLY;
    }
    let depth = if opts.recursive {
        Depth::Tree
    } else {
        Depth::Top
    };
    let tree = detached_clone(src, depth, set)?;
    // The clone and every submount it copied would otherwise stay in
    // their sources' peer groups: mounts made under the target would
    // propagate back to the host's tree, and host mounts made later
    // under a volume would reach the guest with the host's flags.
    set_propagation_tree(&tree, Propagation::Private, opts.recursive)?;
    attach(tree, target)
}

/// How much of a mount tree [`detached_clone`] takes and flags.
#[derive(Clone, Copy, PartialEq)]
enum Depth {
    /// The top mount only.
    Top,
    /// The top and its submounts, all cloned; `attrs` on the top only.
    TreeFlagTop,
    /// The top and its submounts, all cloned and flagged.
    Tree,
}

/// A detached clone of the mount at `src`, with mount attributes `attrs`
/// set before anyone can see it.
fn detached_clone(src: BorrowedFd<'_>, depth: Depth, attrs: u64) -> io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if depth != Depth::Top {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(src, "", flags).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cloning a mount: {}", io::Error::from(e)),
        )
    })?;
    setattr(
        tree.as_fd(),
        depth == Depth::Tree,
        &MountAttr {
            attr_set: attrs,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        },
    )?;
    Ok(tree)
}

fn attach(tree: OwnedFd, target: impl AsFd) -> io::Result<u64> {
    rustix::mount::move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(io::Error::from)?;
    mount_id(&tree)
}

/// Makes directory `dir` (an fd) a mount of its own in a new peer group,
/// `nosuid,nodev,noexec`: binds made under it then propagate to its
/// slaves (see [`read_only_view`]). Returns the mount, as an fd.
pub fn shared_root(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let tree = detached_clone(dir, Depth::Top, LOCKED_DOWN)?;
    // A clone of a shared mount joins its peer group, and so does a mount
    // attached under a shared parent: leave both, then start a group of
    // our own.
    set_propagation(&tree, Propagation::Private)?;
    // Attaching onto `dir` covers the directory the clone shows.
    attach(tree.try_clone()?, dir)?;
    set_propagation(&tree, Propagation::Private)?;
    set_propagation(&tree, Propagation::Shared)?;
    Ok(tree)
}

/// Makes directory `dir` a mount of its own, private: mounts made below
/// it never propagate to the host's other namespaces (systemd makes `/`
/// shared, so without this every pod's binds would be copied into
/// every service's mount namespace and could be added to from there).
/// If `name` in `parent` is a mount root already (a restarted daemon),
/// it is only made private again.
pub fn private_root(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let dir = super::beneath::open_dir(parent, Path::new(name), false)?;
    if is_mount_point(parent, name)? {
        return set_propagation(&dir, Propagation::Private);
    }
    let dir = dir.as_fd();
    let tree = detached_clone(dir, Depth::Top, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)?;
    set_propagation(&tree, Propagation::Private)?;
    attach(tree.try_clone()?, dir)?;
    // Attached under a shared parent it joined that parent's peers'
    // copies of it: leave them.
    set_propagation(&tree, Propagation::Private)
}

/// Gives `target` (an fd of an empty directory) a read-only view of the
/// shared mount `source`: a recursive clone whose top is
/// `ro,nosuid,nodev,noexec` and that receives, as a slave, every bind
/// later made under `source`, each with the flags it was made with.
pub fn read_only_view(source: impl AsFd, target: impl AsFd) -> io::Result<u64> {
    let tree = detached_clone(
        source.as_fd(),
        Depth::TreeFlagTop,
        MOUNT_ATTR_RDONLY | LOCKED_DOWN,
    )?;
    // A slave before it is attached, and every mount in it: binds under
    // `source` reach the view, nothing in the view ever reaches `source`.
    set_propagation_tree(&tree, Propagation::Slave, true)?;
    let id = attach(tree.try_clone()?, target)?;
    // Again once attached: under a shared parent it would have become
    // shared with that parent's peers.
    set_propagation_tree(&tree, Propagation::Slave, true)?;
    Ok(id)
}

/// Lazily unmounts every mount stacked on `name` in `dir` (busy files
/// stay usable by whoever holds them). Returns how many went.
pub fn unmount_at(dir: impl AsFd, name: &OsStr) -> io::Result<usize> {
    let dir = dir.as_fd();
    // More than a few stacked mounts is nothing we made: stop there.
    for n in 0..64 {
        if !is_mount_point(dir, name)? {
            return Ok(n);
        }
        let fd = rustix::fs::openat(
            dir,
            name,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(io::Error::from)?;
        // The fd names the mount's root; its /proc link reaches exactly
        // that mount, whatever path strings mountinfo shows.
        match rustix::mount::unmount(
            format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
            UnmountFlags::DETACH,
        ) {
            // Detached meanwhile by a concurrent release: look again.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Err(io::Error::other(format!(
        "more than 64 mounts stacked on {}",
        Path::new(name).display()
    )))
}
