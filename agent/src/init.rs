//! PID 1 duties: the filesystems every guest needs, the loopback
//! interface, and the PID namespace of the process backend. Done with
//! syscalls only: in this machine's guest one fork+exec costs over a
//! second.

use rustix::io::Errno;
use rustix::mount::MountFlags;
use rustix::process::{Pid, WaitOptions};
use std::ffi::{CStr, CString};
use std::io;

/// nosuid, nodev, noexec: the flags of the kernel's own filesystems.
const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// A mount made at boot: (source, target, fstype, flags, data).
const BOOT_MOUNTS: &[(&str, &str, &str, MountFlags, &CStr)] = &[
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, c""),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, c""),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        c"mode=0755",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MountFlags::NOSUID.union(MountFlags::NODEV),
        c"mode=0755",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        c"",
    ),
];

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Moves the root from the initramfs onto a tmpfs (as switch_root does,
/// without copying: the running agent needs nothing from the old root).
/// The kernel refuses pivot_root(2) while the root is the initial ramfs,
/// and container runtimes pivot into every container's rootfs; chroot
/// instead would let a container with CAP_SYS_CHROOT climb back out.
pub fn leave_initramfs() -> io::Result<()> {
    const NEW_ROOT: &str = "/.vmcri-root";
    std::fs::create_dir_all(NEW_ROOT)?;
    mount_one(
        "vmcri-root",
        NEW_ROOT,
        "tmpfs",
        MountFlags::empty(),
        c"mode=0755",
    )?;
    std::env::set_current_dir(NEW_ROOT)?;
    // MS_MOVE of the mount we made onto /, then chroot into it.
    rustix::mount::mount_move(c".", c"/")?;
    rustix::process::chroot(c".")?;
    std::env::set_current_dir("/")
}

/// Mounts /proc, /sys, /dev, /run and the cgroup2 hierarchy. A target
/// that is already mounted (EBUSY) is fine.
pub fn mount_filesystems() -> io::Result<()> {
    for (source, target, fstype, flags, data) in BOOT_MOUNTS {
        std::fs::create_dir_all(target)?;
        let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
        match rustix::mount::mount(s, t, f, *flags, *data) {
            Ok(()) | Err(Errno::BUSY) => {}
            Err(errno) => {
                let err = io::Error::from(errno);
                return Err(io::Error::new(
                    err.kind(),
                    format!("mount {fstype} on {target}: {err}"),
                ));
            }
        }
    }
    Ok(())
}

/// Where the pod's virtio-fs share (image layers, volumes) is mounted.
pub const SHARED_DIR: &str = "/run/vmcri/shared";
/// The virtio-fs tag the VMM gives the share.
const SHARED_TAG: &str = "vmcri";

/// Mounts the pod's virtio-fs share on [`SHARED_DIR`]; false when the VM
/// has no share (a VM started without one runs no containers from images).
pub fn mount_shared() -> io::Result<bool> {
    // The kernel answers an unknown tag with EINVAL, like any other bad
    // mount: look for a virtio-fs device (ID 26) first.
    let has_fs_device = std::fs::read_dir("/sys/bus/virtio/devices")
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| {
            std::fs::read_to_string(d.path().join("device")).is_ok_and(|id| id.trim() == "0x001a")
        });
    if !has_fs_device {
        return Ok(false);
    }
    std::fs::create_dir_all(SHARED_DIR)?;
    mount_one(
        SHARED_TAG,
        SHARED_DIR,
        "virtiofs",
        MountFlags::NOSUID.union(MountFlags::NODEV),
        c"",
    )?;
    Ok(true)
}

/// Sets the hostname the runtime put on the kernel command line
/// (`vmcri.hostname=NAME`); none there leaves the kernel's.
pub fn hostname_from_cmdline() -> io::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let Some(name) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vmcri.hostname="))
        .filter(|n| !n.is_empty())
    else {
        return Ok(());
    };
    rustix::system::sethostname(name.as_bytes())?;
    Ok(())
}

// SIOCGIFFLAGS and SIOCSIFFLAGS: neither nix nor rustix wraps interface
// flags, so the two ioctls are declared with nix's macros (over libc's
// ifreq) rather than called through libc.
nix::ioctl_readwrite_bad!(
    /// SIOCGIFFLAGS: reads the flags of the interface `ifr_name` names.
    get_if_flags,
    libc::SIOCGIFFLAGS,
    libc::ifreq
);
nix::ioctl_write_ptr_bad!(
    /// SIOCSIFFLAGS: sets the flags of the interface `ifr_name` names.
    set_if_flags,
    libc::SIOCSIFFLAGS,
    libc::ifreq
);

/// Brings `lo` up with an ioctl (no netlink needed for one flag).
pub fn loopback_up() -> io::Result<()> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    use std::os::fd::AsRawFd;
    let sock = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = src.cast_signed();
    }
    // SAFETY: `sock` is an open socket; `req` is a valid ifreq, named and
    // big enough for SIOCGIFFLAGS to fill in its flags.
    unsafe { get_if_flags(sock.as_raw_fd(), &mut req) }?;
    let up = libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING)
        .expect("IFF_UP and IFF_RUNNING fit ifr_flags");
    // SAFETY: SIOCGIFFLAGS set the flags member of the union, so reading
    // it reads what the kernel wrote.
    unsafe { req.ifr_ifru.ifru_flags |= up };
    // SAFETY: `sock` is an open socket; `req` is a valid ifreq that
    // SIOCSIFFLAGS only reads. The socket closes when `sock` drops.
    unsafe { set_if_flags(sock.as_raw_fd(), &req) }?;
    Ok(())
}

/// True when our children would land in another PID namespace than ours
/// (the runtime unshared one for us).
pub fn pid_namespace_pending() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/pid"),
        std::fs::read_link("/proc/self/ns/pid_for_children"),
    ) {
        (Ok(own), Ok(children)) => own != children,
        // The link is absent while a fresh namespace has no process yet.
        (Ok(_), Err(e)) => e.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Forks; the child, PID 1 of the new namespace, returns true. The parent
/// stays as the process the runtime tracks: it waits for the child and
/// exits with its status. The child dies with the parent, so killing the
/// tracked PID ends the pod.
pub fn become_namespace_init() -> bool {
    // SAFETY: fork before any thread exists (main calls this first), so
    // the child is a copy of a single-threaded process.
    let child = match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            return true;
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => Pid::from_raw(child.as_raw()),
        Err(e) => {
            eprintln!("vmcri-agent: fork into the PID namespace: {e}");
            std::process::exit(1);
        }
    };
    // A parent's fork returns the child's PID, which is positive.
    let Some(child) = child else {
        std::process::exit(1);
    };
    let status = loop {
        // rustix's waitpid keeps the raw status; nix's cannot express a
        // child killed by a real-time signal.
        match rustix::process::waitpid(Some(child), WaitOptions::empty()) {
            Ok(Some((_, status))) => break status,
            Ok(None) | Err(Errno::INTR) => {}
            Err(_) => std::process::exit(1),
        }
    };
    let code = status
        .exit_status()
        .unwrap_or_else(|| 128 + status.terminating_signal().unwrap_or(0));
    std::process::exit(code);
}

fn mount_one(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &CStr,
) -> io::Result<()> {
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    rustix::mount::mount(s, t, f, flags, data).map_err(|errno| {
        let e = io::Error::from(errno);
        io::Error::new(e.kind(), format!("mount {fstype} on {target}: {e}"))
    })
}

/// Mounts a procfs of our PID namespace on /proc (our mount namespace is
/// private, so the host's /proc is untouched).
pub fn mount_private_proc() -> io::Result<()> {
    mount_one("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, c"")
}

/// Mounts a tmpfs on `dir`: container writable layers live in memory
/// and vanish with the sandbox's mount namespace.
pub fn mount_state_tmpfs(dir: &std::path::Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = dir
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "state path is not UTF-8"))?;
    mount_one(
        "vmcri",
        target,
        "tmpfs",
        MountFlags::NOSUID.union(MountFlags::NODEV),
        c"mode=0700",
    )
}

/// A close-on-exec duplicate of stderr (stderr itself if dup fails).
pub fn private_stderr() -> std::fs::File {
    use std::os::fd::FromRawFd;
    match rustix::io::fcntl_dupfd_cloexec(io::stderr(), 3) {
        Ok(fd) => fd.into(),
        // SAFETY: fd 2 is open for the agent's whole life (the kernel's
        // console for PID 1, the runtime's log file in the process
        // backend) and nothing else closes it, so the File may own it.
        Err(_) => unsafe { std::fs::File::from_raw_fd(2) },
    }
}

/// Syncs filesystems and reboots the guest, which ends the VM.
pub fn reboot() -> io::Error {
    rustix::fs::sync();
    match rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        Ok(()) => io::Error::other("reboot returned"),
        Err(errno) => errno.into(),
    }
}
