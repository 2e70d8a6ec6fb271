//! The VMM's jail, set up by the VMM itself before it opens anything of
//! the guest's (`--jail DIR`), after Firecracker's jailer.
//!
//! - New mount, PID, IPC, UTS and network namespaces (the VMM needs no
//!   network: vsock is path-based Unix sockets, which cross network
//!   namespaces, and virtio-net uses the tap fd `--net` hands in, opened
//!   in the pod's namespace and inherited here like every fd: nothing in
//!   the jail closes it; a subverted VMM reaches no host port, metadata
//!   service or abstract socket). A PID namespace only applies
//!   to children, so the process forks: the parent (the "keeper") stays
//!   outside, waits, and exits with the jailed VMM's status; the child is
//!   PID 1 of its namespace and dies with the keeper (`PDEATHSIG`), so the
//!   runtime still tracks and kills one process.
//! - The root becomes `DIR` with a tmpfs on it, holding only what the VM
//!   needs: `kernel` and `initrd` (read-only binds), `console.log`, the
//!   vsock socket directory at `vsock/`, the pod's share at `share/`,
//!   `dev/` with `kvm`, `null`, `urandom` and `net/tun`, and a `proc/`
//!   trimmed to our own processes (`subset=pid`). Every mount is
//!   `nosuid,nodev,noexec` except the device binds; the devices and
//!   `proc/` are read-only (no chmod of the host's /dev/kvm, no write to
//!   /proc/sysrq-trigger), and so is the tmpfs once built. The host's mounts propagate into the jail
//!   (the root is made a slave, not private): a container created later
//!   binds its layers into the share, and the guest must see them.
//! - No new privileges; rlimits on open files and file size (SIGXFSZ is
//!   ignored, so a guest filling a volume gets EFBIG, not a dead VMM);
//!   not dumpable and no core files: a crash must not copy guest memory
//!   to the host's disk or to a core_pattern pipe.
//! - Capabilities cut to what virtio-fs needs to act for the guest's
//!   users (chown, DAC override, fowner, fsetid, setuid, setgid), and none
//!   without a shared directory. Gone: CAP_SYS_ADMIN (no mounts, no
//!   escape from the pivot), CAP_DAC_READ_SEARCH (no open_by_handle_at),
//!   CAP_MKNOD, CAP_SETFCAP, CAP_NET_ADMIN, CAP_SYS_PTRACE and the rest,
//!   from the bounding set too.
//!
//! The VMM stays uid 0 inside the jail: the share holds image layers and
//! volumes owned by the guest's uids as the host sees them, and the
//! passthrough file system must create files with those owners. A user
//! namespace would need an idmapped mount of every layer and volume;
//! until then the mount namespace, the capability cut and seccomp are
//! what confine it (see the README's Security section).

use caps::{CapSet, Capability, CapsHashSet};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors setting up the jail.
#[derive(Debug, Error)]
#[error("jail: {what}: {source}")]
pub struct JailError {
    what: String,
    source: io::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError { what, source }
}

/// The host paths the jail is built from.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// An empty directory: the tmpfs root is mounted on it, in the VMM's
    /// own mount namespace only.
    pub dir: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The serial console file, created or truncated here, if any.
    pub serial: Option<PathBuf>,
    /// The vsock Unix socket; its directory is bound into the jail.
    pub vsock: Option<PathBuf>,
    /// The shared directory.
    pub share: Option<PathBuf>,
    /// RLIMIT_NOFILE: virtio-fs holds an fd per inode the guest looks up.
    pub max_open_files: u64,
    /// RLIMIT_FSIZE, in bytes.
    pub max_file_size: u64,
}

/// The same files, as seen from inside the jail.
#[derive(Debug, Clone)]
pub struct Jailed {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The serial console file.
    pub serial: Option<PathBuf>,
    /// The vsock Unix socket.
    pub vsock: Option<PathBuf>,
    /// The shared directory.
    pub share: Option<PathBuf>,
}

/// Device nodes the VMM may open; `net/tun` only where the host has it.
const DEVICES: &[&str] = &["kvm", "null", "urandom", "net/tun"];

/// What the jailed VMM keeps when it serves a shared directory.
const FS_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
];

/// Exit status of the keeper when the jailed VMM was killed by signal N:
/// 128 + N, as a shell reports it.
const SIGNAL_EXIT_BASE: i32 = 128;

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError {
        what: format!("{} has a NUL byte", p.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn last_os_error<T>(what: String) -> Result<T, JailError> {
    Err(JailError {
        what,
        source: io::Error::last_os_error(),
    })
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source_c = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return last_os_error(format!(
            "mount {} on {}",
            source.map_or("-".into(), |s| s.display().to_string()),
            target.display()
        ));
    }
    Ok(())
}

const HARDENED: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Binds `source` at `target` (made first, as a file or a directory like
/// `source`), then applies `flags` to the new mount.
fn bind(
    source: &Path,
    target: &Path,
    flags: libc::c_ulong,
    recursive: bool,
) -> Result<(), JailError> {
    let meta = std::fs::metadata(source).map_err(err(format!("{}", source.display())))?;
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(err(format!("mkdir {}", parent.display())))?;
    }
    if meta.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(target)
            .map_err(err(format!("mkdir {}", target.display())))?;
    } else {
        File::create(target).map_err(err(format!("create {}", target.display())))?;
    }
    let rec = if recursive { libc::MS_REC } else { 0 };
    mount(Some(source), target, None, libc::MS_BIND | rec, None)?;
    if flags != 0 {
        mount(
            None,
            target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            None,
        )?;
    }
    Ok(())
}

/// Enters the jail `spec` describes. Returns in the jailed child, with
/// the paths to use from now on; the calling process becomes the keeper
/// and never returns from here (it exits with the child's status).
pub fn enter(spec: &JailSpec) -> Result<Jailed, JailError> {
    // SAFETY: plain unshare(2); the process is still single-threaded (no
    // thread is spawned before the jail), as CLONE_NEWNS requires.
    let rc = unsafe {
        libc::unshare(
            libc::CLONE_NEWNS
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWNET,
        )
    };
    if rc != 0 {
        return last_os_error("unshare mount, PID, IPC, UTS and network namespaces".into());
    }
    // The keeper holds the pipe's write end for its whole life: the child
    // sees EOF once it is gone. getppid() cannot tell, since the keeper
    // is outside the child's PID namespace (it reads 0 either way).
    let mut alive = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-int array.
    if unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return last_os_error("pipe".into());
    }
    let [alive_read, alive_write] = alive;
    // SAFETY: the process is single-threaded, so the child may run any
    // code; the parent only waits and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return last_os_error("fork into the PID namespace".into());
    }
    if child > 0 {
        // SAFETY: closing our copy of the read end, an fd we own.
        unsafe { libc::close(alive_read) };
        keep(child);
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a signal number; closing our
    // copy of the write end, an fd we own.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::close(alive_write);
    }
    let mut byte = 0u8;
    // SAFETY: a one-byte read into a local.
    let n = unsafe { libc::read(alive_read, (&raw mut byte).cast(), 1) };
    // SAFETY: closing the read end, an fd we own.
    unsafe { libc::close(alive_read) };
    if n == 0 {
        // EOF: the keeper died before PDEATHSIG was set.
        std::process::exit(1);
    }
    build(spec)
}

/// The keeper: waits for the jailed VMM and exits as it did.
fn keep(child: libc::pid_t) -> ! {
    // The keeper runs nothing of the guest's; it needs no capability to
    // wait for its own child.
    let _ = caps::clear(None, CapSet::Effective);
    let _ = caps::clear(None, CapSet::Permitted);
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child into a local.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!(
                "vmcri-vmm: waiting for the jailed VMM: {}",
                io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let signal = libc::WTERMSIG(status);
    let why = match signal {
        libc::SIGSYS => " (SIGSYS: a syscall outside its seccomp allowlist)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT: it panicked or aborted)",
        _ => "",
    };
    eprintln!("vmcri-vmm: the jailed VMM was killed by signal {signal}{why}");
    std::process::exit(SIGNAL_EXIT_BASE + signal);
}

/// Builds the jail's root and moves into it; then the limits and the
/// capability cut.
fn build(spec: &JailSpec) -> Result<Jailed, JailError> {
    let root = &spec.dir;
    // Host mounts propagate in (later container binds), ours never out.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_SLAVE,
        None,
    )?;
    mount(
        Some(Path::new("vmcri-jail")),
        root,
        Some("tmpfs"),
        HARDENED,
        Some("mode=0755,size=1m,nr_inodes=256"),
    )?;
    let ro = HARDENED | libc::MS_RDONLY;
    bind(&spec.kernel, &root.join("kernel"), ro, false)?;
    bind(&spec.initrd, &root.join("initrd"), ro, false)?;
    let serial = match &spec.serial {
        Some(path) => {
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(err(format!("create {}", path.display())))?;
            bind(path, &root.join("console.log"), HARDENED, false)?;
            Some(PathBuf::from("/console.log"))
        }
        None => None,
    };
    let vsock = match &spec.vsock {
        Some(socket) => {
            let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
                return Err(JailError {
                    what: format!("vsock socket {}", socket.display()),
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                });
            };
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            bind(dir, &root.join("vsock"), HARDENED, false)?;
            Some(Path::new("/vsock").join(name))
        }
        None => None,
    };
    let share = match &spec.share {
        Some(dir) => {
            // Recursive: the share's layers and volumes are binds of their
            // own, each keeping its flags (read-only layers stay so).
            bind(dir, &root.join("share"), 0, true)?;
            Some(PathBuf::from("/share"))
        }
        None => None,
    };
    for dev in DEVICES {
        let host = Path::new("/dev").join(dev);
        if host.exists() {
            // Read-only: I/O on a device node still works, a chmod or
            // chown of the host's node does not.
            bind(
                &host,
                &root.join("dev").join(dev),
                libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_RDONLY,
                false,
            )?;
        }
    }
    let proc_dir = root.join("proc");
    std::fs::DirBuilder::new()
        .mode(0o555)
        .create(&proc_dir)
        .map_err(err("mkdir proc"))?;
    // subset=pid (Linux 5.8) hides everything but our processes: no
    // /proc/sys, no kcore; older kernels get the whole of our own procfs.
    // Read-only either way: virtio-fs reopens through /proc/self/fd,
    // where the target's own mount decides, and nothing writes here.
    let proc_flags = HARDENED | libc::MS_RDONLY;
    if mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        proc_flags,
        Some("subset=pid"),
    )
    .is_err()
    {
        mount(
            Some(Path::new("proc")),
            &proc_dir,
            Some("proc"),
            proc_flags,
            None,
        )?;
    }

    pivot(root)?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | HARDENED,
        None,
    )?;
    let name = b"vmcri-vmm";
    // SAFETY: sethostname with a buffer and its length, in our own UTS
    // namespace.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };

    limits(spec)?;
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) has no pointer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return last_os_error("not dumpable".into());
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) has no pointer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return last_os_error("no_new_privs".into());
    }
    let keep: &[Capability] = if spec.share.is_some() { FS_CAPS } else { &[] };
    drop_capabilities(keep)?;
    Ok(Jailed {
        kernel: PathBuf::from("/kernel"),
        initrd: PathBuf::from("/initrd"),
        serial,
        vsock,
        share,
    })
}

/// Makes `root` the root: pivot_root(".", ".") stacks the old root on
/// the new one, and a lazy unmount drops it, so no path leads back out.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(err(format!("chdir {}", root.display())))?;
    let dot = c".";
    // SAFETY: pivot_root with two NUL-terminated strings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return last_os_error("pivot_root".into());
    }
    // SAFETY: umount2 of "." (the old root, stacked on top).
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return last_os_error("detach the old root".into());
    }
    std::env::set_current_dir("/").map_err(err("chdir /"))
}

fn limits(spec: &JailSpec) -> Result<(), JailError> {
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    for (resource, value, what) in [
        (libc::RLIMIT_NOFILE, spec.max_open_files, "RLIMIT_NOFILE"),
        (libc::RLIMIT_FSIZE, spec.max_file_size, "RLIMIT_FSIZE"),
        // Every thread exists before the VM runs, and seccomp refuses
        // clone after that; root is exempt from NPROC anyway, so this is
        // for a VMM run as another user.
        (libc::RLIMIT_NPROC, 256, "RLIMIT_NPROC"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
    ] {
        // Only ever lowered: raising a hard limit needs CAP_SYS_RESOURCE,
        // which a host may not grant (this one does not).
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a valid rlimit struct.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return last_os_error(what.to_string());
        }
        let value = value.min(current.rlim_max);
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit with a valid rlimit struct.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return last_os_error(what.to_string());
        }
    }
    Ok(())
}

/// Keeps `keep` in the effective and permitted sets, nothing inheritable
/// or ambient, and empties the bounding set of everything else.
fn drop_capabilities(keep: &[Capability]) -> Result<(), JailError> {
    let cap_err = |what: &str| {
        let what = what.to_string();
        move |e: caps::errors::CapsError| JailError {
            what,
            source: io::Error::other(e.to_string()),
        }
    };
    let keep: CapsHashSet = keep.iter().copied().collect();
    for cap in caps::all() {
        // A capability this kernel does not know (CAP_BPF before 5.8...)
        // cannot be held: PR_CAPBSET_READ fails for it, and there is
        // nothing to drop.
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            // Needs CAP_SETPCAP, which goes with the sets below.
            caps::drop(None, CapSet::Bounding, cap).map_err(cap_err("bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(cap_err("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(cap_err("inheritable set"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(cap_err("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(cap_err("permitted set"))?;
    Ok(())
}

/// Whether this process runs as root, which the jail needs to set up.
pub fn can_jail() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_system_capabilities_exclude_the_dangerous_ones() {
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_MKNOD,
            Capability::CAP_SETFCAP,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_CHROOT,
        ] {
            assert!(!FS_CAPS.contains(&cap), "{cap} must be dropped");
        }
    }

    #[test]
    fn a_path_with_a_nul_byte_is_refused() {
        let bad = PathBuf::from(std::ffi::OsStr::from_bytes(b"a\0b"));
        assert!(cstr(&bad).is_err());
    }
}
