//! Pod network namespaces, each bind-mounted on a file so that it lives
//! without a process in it and is found again after a restart.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// statfs magic of nsfs, the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Whether `path` is a namespace file (a live, bind-mounted namespace).
pub fn is_netns(path: &Path) -> bool {
    let Ok(c) = cstring(path) else { return false };
    // SAFETY: statfs on a valid C string into a zeroed struct we own.
    // f_type's width differs between architectures.
    #[allow(clippy::useless_conversion)]
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && i64::from(st.f_type) == NSFS_MAGIC
    }
}

/// Makes a fresh network namespace, with loopback up, and binds it on
/// `path` (created; an existing namespace there, from a crash, is
/// replaced). Blocking.
pub fn create(path: &Path) -> io::Result<()> {
    remove(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let target = cstring(path)?;
    // A thread of its own enters the new namespace, binds it and ends:
    // no other thread of the daemon ever runs in it.
    let made = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> io::Result<()> {
            let source = c"/proc/thread-self/ns/net";
            // SAFETY: unshare affects only this thread (it shares no fs
            // state the call needs to split); mount with valid C strings.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            loopback_up()
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")));
    if let Err(e) = made {
        let _ = remove(path);
        return Err(e);
    }
    Ok(())
}

/// Sets `lo` up in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a socket we close, and SIOC[GS]IFFLAGS on a zeroed ifreq
    // whose name is "lo" (NUL-terminated within IFNAMSIZ).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = libc::c_char::from_ne_bytes([*b]);
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            // IFF_UP is 1: it fits.
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Unbinds and deletes the namespace file at `path`; the namespace ends
/// once nothing else holds it. Nothing there is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    let c = cstring(path)?;
    // Every stacked bind, should a crash have left more than one.
    for _ in 0..16 {
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Not a mount point, or nothing there.
                Some(libc::EINVAL) | Some(libc::ENOENT) => break,
                _ => return Err(e),
            }
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_made_with_loopback_up_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ns");
        create(&p).unwrap();
        assert!(is_netns(&p));
        // A second create (a crash's leftover) replaces it.
        create(&p).unwrap();
        assert!(is_netns(&p));
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", p.display()))
            .args(["ip", "-o", "link", "show", "lo"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("LOOPBACK,UP"), "{text}");
        // Only loopback: a fresh namespace.
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", p.display()))
            .args(["ip", "-o", "link"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
        remove(&p).unwrap();
        assert!(!p.exists());
        assert!(!is_netns(&p));
        remove(&p).unwrap();
    }
}
