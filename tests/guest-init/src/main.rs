//! Minimal static init for boot tests and benchmarks. Built with
//! `-C target-feature=+crt-static` and packed as /init.
//!
//! It prints [`MARKER`] on the console, then acts on `vmcri_test=` from the
//! kernel command line (which the kernel passes to init as environment):
//! - `reboot` (default): sync and reboot, which ends the VM cleanly;
//! - `panic`: exit, so the kernel panics ("Attempted to kill init");
//! - `hwrng`: read 32 bytes from /dev/hwrng (the virtio-rng device) and
//!   print how many arrived, then reboot;
//! - `vsock-dial`: connect to the host (CID 2) on vsock port 5000, send a
//!   line, print the reply, then reboot;
//! - `idle`: stay up (for measurements the host takes while the guest runs).

use std::io::{Read, Write};

/// Printed as soon as init runs.
const MARKER: &str = "VMCRI-GUEST-INIT-READY";

fn reboot() -> ! {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
    // reboot(2) only returns on error: there is nothing left to do but
    // let the kernel panic on init's exit, which the VMM reports.
    std::process::exit(1);
}

fn read_hwrng() -> std::io::Result<usize> {
    let dev = c"/dev";
    let fstype = c"devtmpfs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            dev.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/hwrng")?.read_exact(&mut buf)?;
    Ok(buf.len())
}

/// Connects to host port 5000 over AF_VSOCK, says hello, returns the reply.
fn vsock_dial() -> std::io::Result<String> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own fd; the File closes it.
    let mut sock = unsafe { std::fs::File::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family =
        libc::sa_family_t::try_from(libc::AF_VSOCK).expect("AF_VSOCK fits sa_family_t");
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = 5000;
    // SAFETY: addr is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>())
                .expect("sockaddr_vm's size fits socklen_t"),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.write_all(b"hello from the guest\n")?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while sock.read(&mut byte)? == 1 && byte[0] != b'\n' {
        reply.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn main() {
    let mode = std::env::var("vmcri_test").unwrap_or_else(|_| "reboot".into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARKER} mode={mode}");
    let _ = out.flush();
    match mode.as_str() {
        "panic" => std::process::exit(3),
        "idle" => loop {
            // SAFETY: pause(2) has no arguments and only returns on a signal.
            unsafe { libc::pause() };
        },
        "hwrng" => {
            match read_hwrng() {
                Ok(n) => {
                    let _ = writeln!(out, "hwrng: read {n} bytes");
                }
                Err(e) => {
                    let _ = writeln!(out, "hwrng: error: {e}");
                }
            }
            let _ = out.flush();
            reboot();
        }
        "vsock-dial" => {
            match vsock_dial() {
                Ok(reply) => {
                    let _ = writeln!(out, "vsock-dial: got {reply:?}");
                }
                Err(e) => {
                    let _ = writeln!(out, "vsock-dial: error: {e}");
                }
            }
            let _ = out.flush();
            reboot();
        }
        _ => reboot(),
    }
}
