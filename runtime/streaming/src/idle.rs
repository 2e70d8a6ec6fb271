//! Idle streams end: a connection with no bytes either way for the idle
//! timeout is closed from under its protocol (reads end, writes fail), as
//! kubelet's stream idle timeout does. What runs behind it sees the client
//! leave; an exec still runs to its end, as on any disconnect.

use futures_util::task::AtomicWaker;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Activity shared by an [`IdleIo`] and its watchdog.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_ms: AtomicU64,
    closed: AtomicBool,
    reader: AtomicWaker,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// An upgraded connection that counts its activity and can be closed.
pub struct IdleIo<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

/// Wraps `inner`; the returned future closes it after `timeout` without
/// activity, and is dropped (harmlessly) when the connection ends first.
pub fn watch<IO>(
    inner: IO,
    timeout: Duration,
) -> (IdleIo<IO>, impl std::future::Future<Output = ()>) {
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        reader: AtomicWaker::new(),
    });
    let watchdog = {
        let a = activity.clone();
        async move {
            loop {
                let last = a.start + Duration::from_millis(a.last_ms.load(Ordering::Relaxed));
                let until = last + timeout;
                if Instant::now() >= until {
                    tracing::info!(idle = ?timeout, "closing an idle streaming connection");
                    a.closed.store(true, Ordering::Release);
                    a.reader.wake();
                    return;
                }
                tokio::time::sleep_until(until).await;
            }
        }
    };
    (IdleIo { inner, activity }, watchdog)
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the streaming connection was idle too long",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.activity.reader.register(cx.waker());
        if self.activity.closed.load(Ordering::Acquire) {
            // End of stream: the protocol sees the client leave.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.activity.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(closed()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_quiet_connection_closes_and_a_busy_one_does_not() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (mut io, watchdog) = watch(ours, Duration::from_millis(300));
        let dog = tokio::spawn(watchdog);
        // Activity every 100 ms keeps it open past the timeout.
        for _ in 0..6 {
            theirs.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!dog.is_finished());
        // Then silence: a pending read ends and writes fail.
        let t = std::time::Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(io.read(&mut b).await.unwrap(), 0);
        // 300 ms after the last byte, which came 100 ms before the read.
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
        assert!(io.write_all(b"y").await.is_err());
    }
}
