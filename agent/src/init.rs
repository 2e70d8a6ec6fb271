//! PID 1 duties: the filesystems every guest needs, the loopback
//! interface, and the PID namespace of the process backend. Done with
//! syscalls only: in this machine's guest one fork+exec costs over a
//! second.

use std::ffi::CString;
use std::io;

/// A mount made at boot: (source, target, fstype, flags, data).
const BOOT_MOUNTS: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
    (
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
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
    mount_one("vmcri-root", NEW_ROOT, "tmpfs", 0, "mode=0755")?;
    std::env::set_current_dir(NEW_ROOT)?;
    let dot = cstr(".")?;
    let slash = cstr("/")?;
    // SAFETY: valid NUL-terminated strings; MS_MOVE of the mount we made.
    if unsafe {
        libc::mount(
            dot.as_ptr(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: chroot to the current directory, now mounted on /.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// Mounts /proc, /sys, /dev, /run and the cgroup2 hierarchy. A target
/// that is already mounted (EBUSY) is fine.
pub fn mount_filesystems() -> io::Result<()> {
    for (source, target, fstype, flags, data) in BOOT_MOUNTS {
        std::fs::create_dir_all(target)?;
        let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                s.as_ptr(),
                t.as_ptr(),
                f.as_ptr(),
                *flags,
                d.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
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
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
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
    // SAFETY: a valid buffer and its length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings `lo` up with an ioctl (no netlink needed for one flag).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a socket we own; req is a valid ifreq.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
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
    // SAFETY: fork before any thread exists (main calls this first).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        return true;
    }
    if pid < 0 {
        eprintln!(
            "vmcri-agent: fork into the PID namespace: {}",
            io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code);
}

fn mount_one(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    if unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} on {target}: {e}"),
        ));
    }
    Ok(())
}

/// Mounts a procfs of our PID namespace on /proc (our mount namespace is
/// private, so the host's /proc is untouched).
pub fn mount_private_proc() -> io::Result<()> {
    mount_one(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )
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
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0700",
    )
}

/// A close-on-exec duplicate of stderr (stderr itself if dup fails).
pub fn private_stderr() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC on fd 2 returns a new descriptor we own.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    let fd = if fd < 0 { 2 } else { fd };
    // SAFETY: fd is open and from here owned by the File.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// Syncs filesystems and reboots the guest, which ends the VM.
pub fn reboot() -> io::Error {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
    io::Error::last_os_error()
}
