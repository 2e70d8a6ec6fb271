//! The device's host side: a tap the runtime opened and handed over by
//! fd, or (for tests and the fuzzer) one end of an `AF_UNIX`
//! `SOCK_SEQPACKET` socket pair, which keeps frame boundaries as a tap
//! does. Either way one read is one frame and one write sends one; the
//! tap-only ioctls apply to a real tap alone.

use super::header::HDR_LEN;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use thiserror::Error;

/// Errors taking over a tap fd.
#[derive(Debug, Error)]
pub enum TapError {
    /// The number is not an open fd of ours.
    #[error("fd {fd} is not open: {source}")]
    NotOpen {
        /// The fd.
        fd: RawFd,
        /// Cause.
        source: io::Error,
    },
    /// The fd is open but not a tun/tap device.
    #[error("fd {fd} is not a tap device (TUNGETIFF: {source})")]
    NotTun {
        /// The fd.
        fd: RawFd,
        /// Cause.
        source: io::Error,
    },
    /// The tap was opened without a flag the device relies on.
    #[error("fd {fd} is a tun/tap without {missing} (flags {flags:#x}); open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    WrongFlags {
        /// The fd.
        fd: RawFd,
        /// The flags it has.
        flags: u16,
        /// What it lacks.
        missing: &'static str,
    },
    /// An ioctl or fcntl on the tap failed.
    #[error("fd {fd}: {what}: {source}")]
    Setup {
        /// The fd.
        fd: RawFd,
        /// The call.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// `struct ifreq` as TUNGETIFF fills it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The device's frame pipe.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    is_tap: bool,
}

impl Tap {
    /// Takes over `fd`, which the runtime opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and left to us: checks it is such a
    /// tap, makes it close-on-exec and non-blocking, sets its vnet header
    /// size to [`HDR_LEN`] and turns its offloads off until a driver
    /// acks some. Call once per fd, before any thread could close it.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Tap, TapError> {
        if fd < 3 {
            return Err(TapError::NotOpen {
                fd,
                source: io::Error::other("stdin, stdout and stderr are not taps"),
            });
        }
        // SAFETY: F_GETFD reads the fd's flags; a closed fd gives EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotOpen {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes, which IfReq
        // is) and nothing else; on a non-tun fd it fails with EBADFD,
        // ENOTTY or EINVAL and writes nothing.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &raw mut req) } < 0 {
            return Err(TapError::NotTun {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        #[allow(
            clippy::cast_sign_loss,
            reason = "ifr_flags is a bit set the kernel stores in a short"
        )]
        let flags = req.flags as u16;
        let has = |bit: libc::c_int| u16::try_from(bit).is_ok_and(|b| flags & b == b);
        let missing = if !has(libc::IFF_TAP) {
            Some("IFF_TAP (it is a tun: no Ethernet frames)")
        } else if !has(libc::IFF_NO_PI) {
            Some("IFF_NO_PI")
        } else if !has(libc::IFF_VNET_HDR) {
            Some("IFF_VNET_HDR")
        } else {
            None
        };
        if let Some(missing) = missing {
            return Err(TapError::WrongFlags { fd, flags, missing });
        }
        // SAFETY: the fd is open and, by the caller's contract, ours to
        // own from here on; nothing else closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let tap = Tap {
            fd: owned,
            is_tap: true,
        };
        tap.set_fd_flags()?;
        let size = libc::c_int::try_from(HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &raw const size) } < 0 {
            return Err(tap.setup_err("TUNSETVNETHDRSZ"));
        }
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// A frame pipe over a `SOCK_SEQPACKET` socket (tests, the fuzzer):
    /// frames keep their boundaries; there are no offloads to set.
    pub fn from_seqpacket(fd: OwnedFd) -> Result<Tap, TapError> {
        let tap = Tap { fd, is_tap: false };
        tap.set_fd_flags()?;
        Ok(tap)
    }

    /// True for a real tap.
    pub fn is_tap(&self) -> bool {
        self.is_tap
    }

    fn setup_err(&self, what: &'static str) -> TapError {
        TapError::Setup {
            fd: self.fd.as_raw_fd(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Close-on-exec (the VMM runs nothing, but a leak is one fork away)
    /// and non-blocking: the device loop waits in epoll, never in a read.
    fn set_fd_flags(&self) -> Result<(), TapError> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on an fd we own, with integer arguments.
        unsafe {
            if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
                return Err(self.setup_err("F_SETFD FD_CLOEXEC"));
            }
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(self.setup_err("F_SETFL O_NONBLOCK"));
            }
        }
        Ok(())
    }

    /// Sets the tap's TUN_F_* offloads (nothing on a socket). Runs on the
    /// `net` thread at activation, whose seccomp role allows this one
    /// ioctl.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(self.setup_err("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Reads one frame (vnet header first) into `buf`; a longer frame is
    /// cut to `buf`'s length. `Ok(0)` means the other end is gone.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for the whole call.
    pub unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many iovecs"))?;
        // SAFETY: the caller vouches for the iovecs; writev only reads.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_that_are_not_taps_are_refused() {
        assert!(matches!(
            Tap::from_inherited_fd(1),
            Err(TapError::NotOpen { .. })
        ));
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        assert!(matches!(
            Tap::from_inherited_fd(fd),
            Err(TapError::NotTun { .. })
        ));
        // Beyond any open fd (closing one of ours instead would race
        // with other tests reusing its number).
        assert!(matches!(
            Tap::from_inherited_fd(999_999),
            Err(TapError::NotOpen { .. })
        ));
    }
}
