//! A process the agent started (a container's init or an exec): its exit,
//! delivered by the reaper, and its output, pumped from pipes into a
//! bounded channel.
//!
//! Output is never dropped: when nobody reads and the channel is full, the
//! pumps stop reading, the pipe fills and the writer blocks, as it would
//! on a slow terminal.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Mutex as AsyncMutex, OwnedMutexGuard};
use vmcri_proto::now_ns;

/// Chunks buffered per process before its pumps stop reading.
const OUTPUT_CHUNKS: usize = 64;
/// Largest chunk read at once.
const CHUNK_BYTES: usize = 32 * 1024;

/// Output kept after it was sent, for a reader resuming after a crash.
const RETAINED_BYTES: usize = 1 << 20;
/// At most this many retained chunks (small writes make many).
const RETAINED_CHUNKS: usize = 4096;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Output read from a process.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Its stream.
    pub stream: Stream,
    /// The bytes.
    pub data: Vec<u8>,
    /// When the agent read them, nanoseconds since the epoch.
    pub at_ns: i64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code (128 + signal when a signal ended it).
    pub code: i32,
    /// The signal that ended it, or 0.
    pub signal: u32,
    /// When, nanoseconds since the epoch.
    pub at_ns: i64,
}

/// A process's output with offsets, and the window of it already sent.
pub struct Output {
    rx: mpsc::Receiver<Chunk>,
    /// (offset, chunk) of sent output, oldest first.
    retained: VecDeque<(u64, Chunk)>,
    retained_bytes: usize,
    /// Offset of the next byte not yet received from the pumps.
    next: u64,
}

impl Output {
    fn new(rx: mpsc::Receiver<Chunk>) -> Output {
        Output {
            rx,
            retained: VecDeque::new(),
            retained_bytes: 0,
            next: 0,
        }
    }

    /// Forgets retained output before `offset`: the reader has saved it.
    pub fn acknowledge(&mut self, offset: u64) {
        while let Some((off, c)) = self.retained.front() {
            if off + c.data.len() as u64 > offset {
                break;
            }
            self.retained_bytes -= c.data.len();
            self.retained.pop_front();
        }
    }

    fn retain(&mut self, off: u64, chunk: &Chunk) {
        self.retained.push_back((off, chunk.clone()));
        self.retained_bytes += chunk.data.len();
        while self.retained_bytes > RETAINED_BYTES || self.retained.len() > RETAINED_CHUNKS {
            match self.retained.pop_front() {
                Some((_, c)) => self.retained_bytes -= c.data.len(),
                None => break,
            }
        }
    }

    /// The output from offset `pos` on: retained output first (cut to
    /// start at `pos` if it can), then new output. None once the process's
    /// stdout and stderr are closed and everything was handed out.
    pub async fn next_after(&mut self, pos: u64) -> Option<(u64, Chunk)> {
        if pos < self.next {
            let found = self
                .retained
                .iter()
                .find(|(off, c)| off + c.data.len() as u64 > pos)
                .cloned();
            if let Some((off, mut c)) = found {
                // Output older than the window is gone; resume at its start.
                let skip = usize::try_from(pos.saturating_sub(off))
                    .map_or(c.data.len(), |s| s.min(c.data.len()));
                c.data.drain(..skip);
                return Some((off + skip as u64, c));
            }
        }
        let c = self.rx.recv().await?;
        let off = self.next;
        self.next += c.data.len() as u64;
        self.retain(off, &c);
        Some((off, c))
    }
}

/// The reading end of a process's output; one reader at a time.
pub type OutputReader = OwnedMutexGuard<Output>;

/// A started process.
pub struct Proc {
    /// PID in the agent's PID namespace.
    pub pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    output: Arc<AsyncMutex<Output>>,
    stdin: Arc<AsyncMutex<Option<AsyncFd<File>>>>,
    /// The terminal master, when it runs on a terminal.
    tty: Option<OwnedFd>,
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

async fn pump(fd: OwnedFd, stream: Stream, tx: mpsc::Sender<Chunk>) {
    if let Err(e) = set_nonblocking(&fd) {
        tracing::error!(error = %e, "output pipe");
        return;
    }
    // SAFETY: the AsyncFd owns the file, whose descriptor stays the same
    // until the AsyncFd drops.
    let Ok(fd) = (unsafe { AsyncFd::register(File::from(fd)) }) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        match guard.try_io(|f| f.get_ref().read(&mut buf)) {
            Ok(Ok(0)) => return,
            // A terminal master reads EIO once every slave is closed.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return,
            Ok(Ok(n)) => {
                let chunk = Chunk {
                    stream,
                    data: buf[..n].to_vec(),
                    at_ns: now_ns(),
                };
                // Waits while the channel is full: that is the backpressure.
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading process output");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

/// The host ends of a process's stdio, before it starts.
pub struct Stdio {
    /// Write end for the process's stdin, if it has one.
    pub stdin: Option<OwnedFd>,
    /// Read end of stdout.
    pub stdout: OwnedFd,
    /// Read end of stderr.
    pub stderr: OwnedFd,
}

/// The process ends of a process's stdio, handed to libcontainer.
pub struct ChildStdio {
    /// Read end of stdin (a pipe, or /dev/null).
    pub stdin: OwnedFd,
    /// Write end of stdout.
    pub stdout: OwnedFd,
    /// Write end of stderr.
    pub stderr: OwnedFd,
}

/// Pipes for a new process; `stdin` false gives it /dev/null.
pub fn stdio(stdin: bool) -> io::Result<(Stdio, ChildStdio)> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (in_host, in_child) = if stdin {
        let (r, w) = pipe()?;
        (Some(w), r)
    } else {
        (None, OwnedFd::from(File::open("/dev/null")?))
    };
    Ok((
        Stdio {
            stdin: in_host,
            stdout: out_r,
            stderr: err_r,
        },
        ChildStdio {
            stdin: in_child,
            stdout: out_w,
            stderr: err_w,
        },
    ))
}

fn writer(fd: OwnedFd) -> io::Result<AsyncFd<File>> {
    set_nonblocking(&fd)?;
    // SAFETY: as in `pump`: the AsyncFd owns the file.
    unsafe { AsyncFd::register(File::from(fd)) }.map_err(io::Error::from)
}

/// /dev/null as all three: a process on a terminal gets the terminal
/// instead once it starts.
pub fn null_stdio() -> io::Result<ChildStdio> {
    let null = |write: bool| File::options().read(!write).write(write).open("/dev/null");
    Ok(ChildStdio {
        stdin: OwnedFd::from(null(false)?),
        stdout: OwnedFd::from(null(true)?),
        stderr: OwnedFd::from(null(true)?),
    })
}

impl Proc {
    /// Tracks the started process `pid` with the host ends of its stdio.
    pub fn track(pid: i32, stdio: Stdio) -> io::Result<Proc> {
        let stdin = stdio.stdin.map(writer).transpose()?;
        let exit = super::reaper::watch(pid);
        let (tx, rx) = mpsc::channel(OUTPUT_CHUNKS);
        tokio::spawn(pump(stdio.stdout, Stream::Stdout, tx.clone()));
        tokio::spawn(pump(stdio.stderr, Stream::Stderr, tx));
        Ok(Proc {
            pid,
            exit,
            output: Arc::new(AsyncMutex::new(Output::new(rx))),
            stdin: Arc::new(AsyncMutex::new(stdin)),
            tty: None,
        })
    }

    /// Tracks the started process `pid` running on the terminal whose
    /// master is `master`: its output (stdout and stderr merged, as on
    /// any terminal) and, with `stdin`, its input go through the master.
    pub fn track_tty(pid: i32, master: OwnedFd, stdin: bool) -> io::Result<Proc> {
        let stdin = if stdin {
            Some(writer(master.try_clone()?)?)
        } else {
            None
        };
        let exit = super::reaper::watch(pid);
        let (tx, rx) = mpsc::channel(OUTPUT_CHUNKS);
        tokio::spawn(pump(master.try_clone()?, Stream::Stdout, tx));
        Ok(Proc {
            pid,
            exit,
            output: Arc::new(AsyncMutex::new(Output::new(rx))),
            stdin: Arc::new(AsyncMutex::new(stdin)),
            tty: Some(master),
        })
    }

    /// Sets its terminal's size.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        match &self.tty {
            Some(master) => super::console::resize(master, rows, cols),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the process has no terminal",
            )),
        }
    }

    /// How it ended, if it has.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for it to end.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The watcher always sends before it ends; this is only
                // reached if its task was dropped with the runtime.
                return Exit {
                    code: 255,
                    signal: 0,
                    at_ns: now_ns(),
                };
            }
        }
    }

    /// Sends `signal` unless it has already ended (its PID may be reused).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.exited().is_some() {
            return Ok(());
        }
        // libc's kill: nix's and rustix's (safely) take only named
        // signals, and the agent API allows real-time ones too (1..=64).
        // SAFETY: kill(2) takes no pointers; it signals our own unreaped
        // child, whose PID cannot have been reused while it is unreaped.
        if unsafe { libc::kill(self.pid, signal) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes the output reader, waiting while another reader holds it.
    pub async fn output(&self) -> OutputReader {
        self.output.clone().lock_owned().await
    }

    /// Writes to its stdin; `eof` closes it afterwards. Fails if it has
    /// no stdin or it was closed.
    pub async fn write_stdin(&self, data: &[u8], eof: bool) -> io::Result<usize> {
        let mut guard = self.stdin.lock().await;
        let Some(fd) = guard.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the process has no open stdin",
            ));
        };
        write_all(fd, data).await?;
        if eof {
            if self.tty.is_some() {
                // A terminal cannot be half-closed: end of input is the
                // EOF character, as when a user types ^D.
                write_all(fd, &[4u8]).await?;
            }
            *guard = None;
        }
        Ok(data.len())
    }
}

/// Writes all of `data` to non-blocking `fd`, on the agent's own thread:
/// a helper thread would risk the AVX-state corruption nested hosts have
/// (main.rs).
async fn write_all(fd: &AsyncFd<File>, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let mut ready = fd.writable().await?;
        match ready.try_io(|f| f.get_ref().write(&data[done..])) {
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> Chunk {
        Chunk {
            stream: Stream::Stdout,
            data: data.to_vec(),
            at_ns: 0,
        }
    }

    #[tokio::test]
    async fn a_new_reader_resumes_from_its_saved_offset() {
        let (tx, rx) = mpsc::channel(8);
        let mut out = Output::new(rx);
        tx.send(chunk(b"hello ")).await.unwrap();
        tx.send(chunk(b"world")).await.unwrap();
        let (o1, c1) = out.next_after(0).await.unwrap();
        let (o2, c2) = out.next_after(6).await.unwrap();
        assert_eq!(
            (o1, &c1.data[..], o2, &c2.data[..]),
            (0, &b"hello "[..], 6, &b"world"[..])
        );
        // The first reader died having saved 3 bytes: the rest comes again.
        out.acknowledge(3);
        let (o, c) = out.next_after(3).await.unwrap();
        assert_eq!((o, &c.data[..]), (3, &b"lo "[..]));
        let (o, c) = out.next_after(6).await.unwrap();
        assert_eq!((o, &c.data[..]), (6, &b"world"[..]));
        drop(tx);
        assert!(out.next_after(11).await.is_none());
    }

    #[tokio::test]
    async fn the_window_is_bounded() {
        let (tx, rx) = mpsc::channel(8);
        let mut out = Output::new(rx);
        let big = vec![b'x'; 64 * 1024];
        let mut pos = 0;
        for _ in 0..40 {
            tx.send(chunk(&big)).await.unwrap();
            let (o, c) = out.next_after(pos).await.unwrap();
            pos = o + c.data.len() as u64;
        }
        assert!(out.retained_bytes <= RETAINED_BYTES);
        // Asking for output older than the window starts at its oldest.
        let (o, _) = out.next_after(0).await.unwrap();
        assert!(o > 0 && o < pos);
    }
}
