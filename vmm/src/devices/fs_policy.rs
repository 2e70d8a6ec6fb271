//! What a guest may not do to the host through virtio-fs, whatever its
//! privilege in the VM: create device nodes, make a file setuid (or
//! setgid, unless it is a directory), or write `security.*` and
//! `trusted.*` extended attributes (file capabilities, SELinux labels,
//! overlay metadata). The VMM acts as root on the host, and a volume the
//! guest writes is also a host directory that host processes (kubelet,
//! other pods) use: a setuid-root binary or a device node planted there
//! would be a way out of the VM.
//!
//! [`Guarded`] wraps the passthrough file system and refuses those
//! requests with EPERM before they reach it; everything else is passed
//! through unchanged. Reading such attributes stays allowed: image layers
//! carry `security.capability` and `trusted.overlay.*` that the guest
//! needs, and layers are read-only anyway.
//!
//! It also keeps READ and WRITE away from a double close in
//! `fuse-backend-rs` 0.14: when a request's file flags differ from those
//! its handle was opened with, the passthrough applies them with
//! `fcntl(F_SETFL)` on a `File` borrowed from the handle, and if that
//! fails (O_DIRECT on a directory or a file system without direct I/O,
//! toggling O_APPEND on an append-only file, O_NOATIME without
//! CAP_FOWNER) the early return drops the `File`, closing the handle's
//! descriptor while the handle still owns it. Its number is then reused
//! by the next open anywhere in the VMM, and the handle's later close
//! closes that one. [`Guarded`] therefore passes each READ and WRITE the
//! flags its handle was opened with, so the passthrough never calls
//! F_SETFL. Nothing is lost: the guest kernel computes append offsets
//! itself, and the other flags only tune the host's side.

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The file-type bits of a mode.
const S_IFMT: u32 = libc::S_IFMT;
/// setuid and setgid.
const SUID: u32 = libc::S_ISUID;
const SGID: u32 = libc::S_ISGID;

fn refused(what: &str) -> io::Error {
    tracing::warn!(
        what,
        "virtio-fs: refused a guest request the host does not allow"
    );
    io::Error::from_raw_os_error(libc::EPERM)
}

/// Whether creating a node of `mode` is refused: devices, and setuid or
/// setgid files (a setgid directory, which only passes its group on, is
/// fine).
fn refuse_mode(mode: u32) -> Option<&'static str> {
    let kind = mode & S_IFMT;
    if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
        return Some("a device node");
    }
    if mode & SUID != 0 {
        return Some("a setuid file");
    }
    if mode & SGID != 0 && kind != libc::S_IFDIR {
        return Some("a setgid file");
    }
    None
}

/// Whether writing (or removing) extended attribute `name` is refused.
fn refuse_xattr(name: &CStr) -> bool {
    let name = name.to_bytes();
    name.starts_with(b"security.") || name.starts_with(b"trusted.")
}

/// A file system with the host's policy in front of it, and the open
/// flags of each open handle (see the module's documentation).
pub struct Guarded<F>(pub F, Mutex<HashMap<u64, u32>>);

impl<F: FileSystem> Guarded<F> {
    /// `fs` behind the policy.
    pub fn new(fs: F) -> Self {
        Guarded(fs, Mutex::new(HashMap::new()))
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, u32>> {
        // The map holds plain values: a panic elsewhere cannot leave it
        // half-updated.
        self.1.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the flags `handle` was opened with.
    fn opened(&self, handle: Option<F::Handle>, flags: u32) {
        if let Some(h) = handle {
            self.handles().insert(h.into(), flags);
        }
    }

    /// The flags to hand the passthrough for I/O on `handle`: those it
    /// was opened with, so it never changes them with F_SETFL. A handle
    /// it does not know is refused by the passthrough before any F_SETFL.
    fn io_flags(&self, handle: u64, requested: u32) -> u32 {
        self.handles().get(&handle).copied().unwrap_or(requested)
    }

    /// Whether a mode change of `inode` to `mode` is refused: setuid on
    /// anything, setgid on anything but a directory.
    fn refuse_chmod(
        &self,
        ctx: &Context,
        inode: F::Inode,
        mode: u32,
        handle: Option<F::Handle>,
    ) -> io::Result<Option<&'static str>> {
        if mode & (SUID | SGID) == 0 {
            return Ok(None);
        }
        if mode & SUID != 0 {
            return Ok(Some("making a file setuid"));
        }
        let (st, _) = self.0.getattr(ctx, inode, handle)?;
        Ok((st.st_mode & S_IFMT != libc::S_IFDIR).then_some("making a file setgid"))
    }
}

impl<F: FileSystem> FileSystem for Guarded<F>
where
    F::Inode: Copy,
    F::Handle: Copy,
{
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.0.init(capable)
    }

    fn destroy(&self) {
        self.0.destroy()
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<libc::statvfs64> {
        self.0.statfs(ctx, inode)
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.0.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.0.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.0.batch_forget(ctx, requests)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let (handle, opts) = self.0.opendir(ctx, inode, flags)?;
        self.opened(handle, flags);
        Ok((handle, opts))
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.releasedir(ctx, inode, flags, handle)?;
        self.handles().remove(&handle.into());
        Ok(())
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        // mkdir(2)'s mode has no type bits: the node is a directory.
        if let Some(what) = refuse_mode((mode & !S_IFMT) | libc::S_IFDIR) {
            return Err(refused(what));
        }
        self.0.mkdir(ctx, parent, name, mode, umask)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.0.rmdir(ctx, parent, name)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let (handle, opts, passthrough) = self.0.open(ctx, inode, flags, fuse_flags)?;
        self.opened(handle, flags);
        Ok((handle, opts, passthrough))
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the FileSystem trait's signature"
    )]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.0
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handles().remove(&handle.into());
        Ok(())
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        // create(2) makes regular files.
        if let Some(what) = refuse_mode((args.mode & !S_IFMT) | libc::S_IFREG) {
            return Err(refused(what));
        }
        let flags = args.flags;
        let (entry, handle, opts, passthrough) = self.0.create(ctx, parent, name, args)?;
        self.opened(handle, flags);
        Ok((entry, handle, opts, passthrough))
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.0.unlink(ctx, parent, name)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the FileSystem trait's signature"
    )]
    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = self.io_flags(handle.into(), flags);
        self.0
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the FileSystem trait's signature"
    )]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let flags = self.io_flags(handle.into(), flags);
        self.0.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.0.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: libc::stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(libc::stat64, Duration)> {
        if valid.contains(SetattrValid::MODE) {
            if let Some(what) = self.refuse_chmod(ctx, inode, attr.st_mode, handle)? {
                return Err(refused(what));
            }
        }
        self.0.setattr(ctx, inode, attr, handle, valid)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.0.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if let Some(what) = refuse_mode(mode) {
            return Err(refused(what));
        }
        self.0.mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.0.link(ctx, inode, newparent, newname)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.0.symlink(ctx, linkname, parent, name)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.0.readlink(ctx, inode)
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.0.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsync(ctx, inode, datasync, handle)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsyncdir(ctx, inode, datasync, handle)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.0.access(ctx, inode, mask)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if refuse_xattr(name) {
            return Err(refused("writing a security.* or trusted.* attribute"));
        }
        self.0.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.0.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.0.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        if refuse_xattr(name) {
            return Err(refused("removing a security.* or trusted.* attribute"));
        }
        self.0.removexattr(ctx, inode, name)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.0.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.0.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::api::filesystem::ROOT_ID;
    use fuse_backend_rs::passthrough::{Config, PassthroughFs};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn fs(root: &std::path::Path) -> Guarded<PassthroughFs<()>> {
        let config = Config {
            root_dir: root.display().to_string(),
            xattr: true,
            do_import: true,
            inode_file_handles: false,
            ..Default::default()
        };
        let fs = PassthroughFs::new(config).unwrap();
        fs.import().unwrap();
        let fs = Guarded::new(fs);
        fs.init(FsOptions::empty()).unwrap();
        fs
    }

    fn eperm<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
        r.expect_err("refused").raw_os_error() == Some(libc::EPERM)
    }

    fn create(fs: &Guarded<PassthroughFs<()>>, name: &CStr, mode: u32) -> io::Result<Entry> {
        let args = CreateIn {
            flags: u32::try_from(libc::O_RDWR).unwrap(),
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        fs.create(&Context::new(), ROOT_ID, name, args)
            .map(|(entry, _, _, _)| entry)
    }

    fn chmod(fs: &Guarded<PassthroughFs<()>>, inode: u64, mode: u32) -> io::Result<()> {
        let ctx = Context::new();
        let (mut attr, _) = fs.getattr(&ctx, inode, None)?;
        attr.st_mode = mode;
        fs.setattr(&ctx, inode, attr, None, SetattrValid::MODE)
            .map(|_| ())
    }

    #[test]
    fn device_nodes_and_setuid_files_are_refused_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path());
        let ctx = Context::new();
        let null = u32::try_from(libc::makedev(1, 3)).unwrap();
        for (name, mode) in [
            (c"char", libc::S_IFCHR | 0o666),
            (c"block", libc::S_IFBLK | 0o600),
            (c"suid", libc::S_IFREG | 0o4755),
            (c"sgid", libc::S_IFREG | 0o2755),
        ] {
            assert!(
                eperm(fs.mknod(&ctx, ROOT_ID, name, mode, null, 0)),
                "{name:?}"
            );
        }
        assert!(eperm(create(&fs, c"created-suid", 0o4755)));
        assert!(eperm(create(&fs, c"created-sgid", 0o2711)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // What a workload needs still works: files, FIFOs, sockets.
        fs.mknod(&ctx, ROOT_ID, c"fifo", libc::S_IFIFO | 0o600, 0, 0)
            .unwrap();
        fs.mknod(&ctx, ROOT_ID, c"sock", libc::S_IFSOCK | 0o600, 0, 0)
            .unwrap();
        create(&fs, c"plain", 0o755).unwrap();
        let meta = std::fs::metadata(dir.path().join("fifo")).unwrap();
        assert!(meta.file_type().is_fifo());
    }

    #[test]
    fn setuid_by_chmod_is_refused_and_a_setgid_directory_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path());
        let ctx = Context::new();
        let file = create(&fs, c"bin", 0o755).unwrap().inode;
        assert!(eperm(chmod(&fs, file, libc::S_IFREG | 0o4755)));
        assert!(eperm(chmod(&fs, file, libc::S_IFREG | 0o2755)));
        chmod(&fs, file, libc::S_IFREG | 0o700).unwrap();
        let mode = std::fs::metadata(dir.path().join("bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
        // Shared group directories (setgid) are what volumes use.
        let shared = fs.mkdir(&ctx, ROOT_ID, c"shared", 0o2775, 0).unwrap().inode;
        chmod(&fs, shared, libc::S_IFDIR | 0o2770).unwrap();
        assert!(eperm(fs.mkdir(&ctx, ROOT_ID, c"suid-dir", 0o4755, 0)));
    }

    #[test]
    fn security_and_trusted_attributes_are_not_written_user_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path());
        let ctx = Context::new();
        let file = create(&fs, c"f", 0o644).unwrap().inode;
        for name in [
            c"security.capability",
            c"trusted.overlay.opaque",
            c"security.selinux",
        ] {
            assert!(eperm(fs.setxattr(&ctx, file, name, b"x", 0)), "{name:?}");
            assert!(eperm(fs.removexattr(&ctx, file, name)), "{name:?}");
        }
        fs.setxattr(&ctx, file, c"user.note", b"kept", 0).unwrap();
        assert!(matches!(
            fs.getxattr(&ctx, file, c"user.note", 64).unwrap(),
            GetxattrReply::Value(v) if v == b"kept"
        ));
    }
}
