//! Terminals: libcontainer opens a pseudo-terminal inside the container and
//! sends its master over a Unix socket (the OCI console socket); the agent
//! keeps the master to pump output, write input and resize.

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::Interest;

/// A listening console socket; the socket file goes when it drops.
pub struct ConsoleSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens at `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> io::Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        Ok(ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the terminal master the container process sent. The
    /// process connected before libcontainer's build returned, so this
    /// only waits if it failed; `timeout` bounds that.
    pub async fn receive(&self, timeout: Duration) -> io::Result<OwnedFd> {
        tokio::time::timeout(timeout, self.receive_fds())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the container never sent its terminal",
                )
            })?
            .and_then(first_fd)
    }

    /// The descriptors of the first message on the first connection.
    async fn receive_fds(&self) -> io::Result<Vec<RawFd>> {
        let (stream, _) = self.listener.accept().await?;
        stream
            .async_io(Interest::READABLE, || {
                let mut name = [0u8; 64];
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let mut iov = [IoSliceMut::new(&mut name)];
                let msg = recvmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(got) = cmsg {
                        fds.extend(got);
                    }
                }
                Ok(fds)
            })
            .await
    }
}

/// Owns every received descriptor and keeps the first, the master.
fn first_fd(fds: Vec<RawFd>) -> io::Result<OwnedFd> {
    let mut master = None;
    for fd in fds {
        // SAFETY: SCM_RIGHTS gave us these descriptors; each is owned
        // exactly once here (extras close on drop).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if master.is_none() {
            master = Some(owned);
        }
    }
    master.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the console socket carried no terminal descriptor",
        )
    })
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets the terminal's window size.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(master, size)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;

    #[tokio::test]
    async fn a_descriptor_sent_over_the_socket_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&dir.path().join("c.sock")).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let client = std::os::unix::net::UnixStream::connect(sock.path()).unwrap();
        let fds = [pty.master.as_raw_fd()];
        sendmsg::<UnixAddr>(
            client.as_raw_fd(),
            &[IoSlice::new(b"/dev/ptmx")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let master = sock.receive(Duration::from_secs(5)).await.unwrap();
        resize(&master, 33, 101).unwrap();
        let ws = rustix::termios::tcgetwinsize(&pty.slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
    }

    #[tokio::test]
    async fn a_process_that_never_connects_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&dir.path().join("c.sock")).unwrap();
        let e = sock.receive(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
