//! Per-thread seccomp allowlists, one per thread role (as Firecracker
//! does), built with `seccompiler`.
//!
//! Each thread installs the filter of its role before it touches guest
//! data: vCPU threads before their first KVM_RUN, device threads when they
//! start (see [`crate::devices::thread`]), the main thread once the VM is
//! running. A syscall outside the list kills the whole VMM with SIGSYS:
//! a device thread the guest has subverted must not go on. The lists were
//! taken from traces of the VMM serving the end-to-end tests (strace -ff,
//! one file per thread), and hold nothing the role does not need: no
//! `execve`, no `open_by_handle_at`, no `mount`, no `ptrace`, no new
//! sockets outside the vsock thread.
//!
//! `--seccomp log` logs what would have been refused (the kernel's audit
//! log) and `--seccomp off` installs nothing: both are for debugging.
//! `VMCRI_VMM_SECCOMP_DENY=ROLE:NR[,ROLE:NR...]` takes syscall NR out of
//! a role's list (`fs:217` refuses getdents64 to the virtio-fs thread):
//! it only ever makes a filter stricter, and lets a test prove that a
//! refused syscall ends the pod with the reason.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// How filters are applied, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A syscall outside the list kills the VMM (the default).
    Enforce,
    /// Outside syscalls are allowed and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

/// What a thread does, which decides its allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs a vCPU: KVM_RUN and the few exits handled in place.
    Vcpu,
    /// Serves a simple device's queues (virtio-rng).
    Device,
    /// The vsock muxer: guest streams to and from Unix sockets.
    Vsock,
    /// Serves virtio-fs requests against the shared directory.
    Fs,
    /// Moves frames between the virtio-net queues and the tap.
    Net,
    /// The main thread once the VM runs: waits for the end, stops the
    /// vCPUs, flushes the console.
    Main,
}

static MODE: OnceLock<Mode> = OnceLock::new();
static DENIED: OnceLock<Vec<(Role, i64)>> = OnceLock::new();

/// Takes the syscalls of `spec` (`ROLE:NR,...`, roles `vcpu`, `device`,
/// `vsock`, `fs`, `net`, `main`) out of their roles' lists; the first call wins.
pub fn deny_also(spec: &str) -> Result<(), String> {
    let _ = DENIED.set(parse_denied(spec)?);
    Ok(())
}

fn parse_denied(spec: &str) -> Result<Vec<(Role, i64)>, String> {
    let mut denied = Vec::new();
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (role, nr) = item
            .split_once(':')
            .ok_or_else(|| format!("{item:?} is not ROLE:NR"))?;
        let role = match role {
            "vcpu" => Role::Vcpu,
            "device" => Role::Device,
            "vsock" => Role::Vsock,
            "fs" => Role::Fs,
            "net" => Role::Net,
            "main" => Role::Main,
            other => return Err(format!("unknown thread role {other:?}")),
        };
        let nr = nr
            .parse::<i64>()
            .map_err(|_| format!("{nr:?} is not a syscall number"))?;
        denied.push((role, nr));
    }
    Ok(denied)
}

/// Sets the process-wide mode; the first call wins. Threads started
/// before any call get [`Mode::Enforce`].
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

fn mode() -> Mode {
    *MODE.get_or_init(|| Mode::Enforce)
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile.
    #[error("building the {role:?} filter: {msg}")]
    Build {
        /// Whose filter.
        role: Role,
        /// Cause.
        msg: String,
    },
    /// The kernel refused the filter.
    #[error("installing the {role:?} filter: {msg}")]
    Install {
        /// Whose filter.
        role: Role,
        /// Cause.
        msg: String,
    },
}

/// Installs the filter of `role` on the calling thread (nothing with
/// [`Mode::Off`]).
pub fn install(role: Role) -> Result<(), SeccompError> {
    let action = match mode() {
        Mode::Off => return Ok(()),
        Mode::Enforce => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let program = program(role, action)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
        role,
        msg: e.to_string(),
    })
}

/// The BPF program of `role`, with `mismatch` for what is not allowed.
pub fn program(role: Role, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |e: &dyn std::fmt::Display| SeccompError::Build {
        role,
        msg: e.to_string(),
    };
    let rules = rules(role).map_err(|e| build(&e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(&e))?;
    BpfProgram::try_from(filter).map_err(|e| build(&e))
}

/// Syscalls every thread of ours makes: memory allocation, locks,
/// signals, time, thread exit, and logging to stderr.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // abort() signals itself; without it an abort would read as a
    // seccomp refusal. The PID namespace holds only the VMM.
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
];

/// Event loops over eventfds and sockets.
const EPOLL: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
];

/// The net loop: it waits on an epoll set built at activation, adding
/// and removing the tap as RX buffers come and go; frames move with
/// read and writev (in [`COMMON`]). No socket calls. fcntl: the std
/// checks fds it takes ownership of with F_GETFD (debug builds), when
/// the loop's eventfds and epoll are dropped here.
const NET: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_fcntl,
];

/// The vsock muxer: accepts and makes Unix stream connections.
const VSOCK: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// The passthrough file system: everything it does to files, by fd.
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    // Acting as the guest's user: per-thread credentials and umask.
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_syncfs,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_umask,
    // Kernels before 5.8 have no mount ID in statx; the passthrough then
    // asks name_to_handle_at. Its counterpart, open_by_handle_at, stays
    // refused.
    libc::SYS_name_to_handle_at,
];

/// KVM_RUN.
const KVM_RUN: u64 = 0xae80;
/// KVM_GET_REGS, for the registers in an error message.
const KVM_GET_REGS: u64 = 0x8090_ae81;
/// TUNSETOFFLOAD: the net thread sets the offloads its driver acked.
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
/// FIONBIO: a socket made non-blocking (the vsock listener, when the
/// vsock thread sets the device up for its driver).
const FIONBIO: u64 = 0x5421;

/// The ioctls each role may make; nothing that changes the VM's layout.
fn ioctls(role: Role) -> &'static [u64] {
    match role {
        Role::Vcpu => &[KVM_RUN, KVM_GET_REGS],
        Role::Vsock => &[FIONBIO],
        Role::Net => &[TUNSETOFFLOAD],
        Role::Device | Role::Fs | Role::Main => &[],
    }
}

fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |list: &[i64]| {
        for &nr in list {
            map.insert(nr, Vec::new());
        }
    };
    allow(COMMON);
    match role {
        // Activating a device (an MMIO write) only hands it shared
        // eventfds and waits while the device's own thread sets up its
        // epoll set and sockets (devices::thread): nothing beyond COMMON.
        Role::Vcpu => {}
        Role::Device => allow(EPOLL),
        Role::Vsock => {
            allow(EPOLL);
            allow(VSOCK);
        }
        Role::Fs => {
            allow(EPOLL);
            allow(FS);
        }
        Role::Net => allow(NET),
        Role::Main => {
            allow(&[libc::SYS_fsync]);
            // Debug builds check an fd with fcntl as they drop it (std's
            // debug assertion), and the main thread drops /dev/kvm on exit.
            if cfg!(debug_assertions) {
                allow(&[libc::SYS_fcntl]);
            }
        }
    }
    if role == Role::Vsock {
        // Unix sockets only (guest connections to host ports): no IP.
        map.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::try_from(libc::AF_UNIX).unwrap_or_default(),
            )?])?],
        );
    }
    let mut allowed = Vec::new();
    for &request in ioctls(role) {
        allowed.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            request,
        )?])?);
    }
    if !allowed.is_empty() {
        map.insert(libc::SYS_ioctl, allowed);
    }
    for (r, nr) in DENIED.get().map(Vec::as_slice).unwrap_or_default() {
        if *r == role {
            map.remove(nr);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_specs_are_parsed_strictly() {
        assert_eq!(
            parse_denied("fs:217,vcpu:1").unwrap(),
            vec![(Role::Fs, 217), (Role::Vcpu, 1)]
        );
        for bad in ["fs", "disk:1", "fs:x"] {
            assert!(parse_denied(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_role_compiles() {
        for role in [
            Role::Vcpu,
            Role::Device,
            Role::Vsock,
            Role::Fs,
            Role::Net,
            Role::Main,
        ] {
            let p = program(role, SeccompAction::KillProcess).unwrap();
            assert!(!p.is_empty());
        }
    }

    /// Runs `f` in a child process whose thread has `role`'s filter and
    /// returns how the child ended.
    fn in_child(role: Role, f: fn()) -> libc::c_int {
        let program = program(role, SeccompAction::KillProcess).unwrap();
        // SAFETY: the child only installs a prepared filter, calls `f`
        // (plain syscalls) and exits; the test thread is the only one
        // that continues in it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: leaving the forked child at once.
                unsafe { libc::_exit(3) };
            }
            f();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_device_thread_that_tries_execve_is_killed() {
        let status = in_child(Role::Device, || {
            // SAFETY: execve with null arguments; the filter stops it
            // before the kernel looks at them.
            unsafe {
                libc::syscall(libc::SYS_execve, std::ptr::null::<u8>(), 0, 0);
            }
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn the_vsock_thread_may_open_unix_sockets_only() {
        let status = in_child(Role::Vsock, || {
            // SAFETY: socket(2) with plain arguments; the fd is left to
            // the child's exit.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(4) };
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
        let status = in_child(Role::Vsock, || {
            // SAFETY: as above; the filter stops it first.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn the_net_thread_opens_no_socket_and_makes_no_other_ioctl() {
        let status = in_child(Role::Net, || {
            // SAFETY: socket(2) with plain arguments; the filter stops it.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = in_child(Role::Net, || {
            // SAFETY: TUNSETIFF on stdin with a null pointer; the filter
            // stops it before the kernel looks at it.
            unsafe { libc::ioctl(0, libc::TUNSETIFF, std::ptr::null_mut::<u8>()) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = in_child(Role::Net, || {
            // SAFETY: TUNSETOFFLOAD on stdin, not a tap: allowed by the
            // filter, refused by the kernel (ENOTTY or EBADFD).
            unsafe { libc::ioctl(0, libc::TUNSETOFFLOAD, 0u64) };
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }

    #[test]
    fn a_vcpu_thread_may_only_make_its_kvm_ioctls() {
        let status = in_child(Role::Vcpu, || {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: an ioctl on stdin the filter refuses first
            // (TIOCGWINSZ into a local).
            unsafe {
                libc::ioctl(0, libc::TIOCGWINSZ, &mut ws);
            }
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let status = in_child(Role::Vcpu, || {
            // SAFETY: getpid has no arguments.
            unsafe {
                libc::getpid();
            }
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn a_vcpu_thread_sets_nothing_up_itself_no_epoll_dup_or_fionbio() {
        let refused: [fn(); 3] = [
            || {
                // SAFETY: epoll_create1 with no flags; the filter stops it.
                unsafe { libc::epoll_create1(0) };
            },
            || {
                // SAFETY: dup of stdin; the filter stops it.
                unsafe { libc::dup(0) };
            },
            || {
                let mut on: libc::c_int = 1;
                // SAFETY: FIONBIO on stdin with a local; the filter stops it.
                unsafe { libc::ioctl(0, libc::FIONBIO, &mut on) };
            },
        ];
        for f in refused {
            let status = in_child(Role::Vcpu, f);
            assert!(libc::WIFSIGNALED(status), "status {status:#x}");
            assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        }
    }
}
