//! Where the agent listens: AF_VSOCK in the guest, a Unix socket on the
//! host (the `process` backend and tests).

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `vsock:PORT` on any CID.
    Vsock(u32),
    /// `unix:PATH`.
    Unix(std::path::PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| format!("bad vsock port in {s:?}"));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty unix socket path".into());
            }
            return Ok(Listen::Unix(path.into()));
        }
        Err(format!("expected vsock:PORT or unix:PATH, got {s:?}"))
    }
}

/// An accepted AF_VSOCK connection, driven by tokio's reactor.
pub struct VsockConn {
    inner: AsyncFd<vsock::VsockStream>,
}

impl VsockConn {
    fn new(stream: vsock::VsockStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        // SAFETY: the VsockStream owns its fd, which stays open and the
        // same until the AsyncFd (which owns the stream) is dropped.
        let inner = unsafe { AsyncFd::register(stream) }.map_err(io::Error::from)?;
        Ok(VsockConn { inner })
    }
}

fn fd_read(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

fn fd_write(fd: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    // MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE.
    Ok(rustix::net::send(
        fd,
        buf,
        rustix::net::SendFlags::NOSIGNAL,
    )?)
}

impl AsyncRead for VsockConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| fd_read(inner.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(cx))?;
            match guard.try_io(|inner| fd_write(inner.get_ref(), buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl Connected for VsockConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Accepts vsock connections on `port` forever, handing them to `tx`.
pub async fn accept_vsock(
    port: u32,
    tx: tokio::sync::mpsc::Sender<io::Result<VsockConn>>,
) -> io::Result<()> {
    let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)?;
    listener.set_nonblocking(true)?;
    // SAFETY: as for VsockConn: the listener owns its fd for the AsyncFd's life.
    let listener = unsafe { AsyncFd::register(listener) }.map_err(io::Error::from)?;
    loop {
        let mut guard = listener.readable().await?;
        match guard.try_io(|l| l.get_ref().accept()) {
            Ok(Ok((stream, _addr))) => {
                if tx.send(VsockConn::new(stream)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "vsock accept failed"),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("vsock:1024".parse(), Ok(Listen::Vsock(1024)));
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }
}
