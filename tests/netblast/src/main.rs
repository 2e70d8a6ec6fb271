//! A static TCP probe for `tests/benches/pod_network.rs`, run inside
//! pods of every runtime alike (a runc pod, a process pod, a microVM).
//!
//! busybox's `nc` copies in 1 KiB reads and writes, so in a guest whose
//! kernel is emulated it measures its own syscalls, not the network: one
//! 1 KiB segment per ~120 ms went out of a microVM here, each acknowledged
//! within 0.1 ms. This probe moves 256 KiB per call, as a real workload
//! would, and serves requests without forking (busybox httpd forks per
//! connection, which is what a request into a guest measured).
//!
//! - `recv PORT`: accepts one connection and reads it to its end; prints
//!   `RX <bytes> <seconds from the first byte to the end>` on its own
//!   clock.
//! - `send IP:PORT MIB`: connects (retrying while nothing listens, for up
//!   to 300 s), writes MIB MiB, half-closes, waits for the peer to close;
//!   prints `SENT`.
//! - `serve PORT`: answers each connection's line with `ok`, one
//!   connection at a time, forever.
//! - `ping IP:PORT N`: N requests one after another, each on a new
//!   connection (connect, line, answer, close); prints `PING <ms per
//!   request>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 * 1024;
/// Longest request or answer line read: a peer cannot make us buffer more.
const LINE_MAX: u64 = 64;

fn recv(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!("RX {total} {secs:.6}");
    Ok(())
}

fn connect(addr: &str, patience: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + patience;
    loop {
        match TcpStream::connect(addr) {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

fn send(addr: &str, mib: u64) -> std::io::Result<()> {
    let mut conn = connect(addr, Duration::from_secs(300))?;
    let buf = vec![0u8; CHUNK];
    let mut left = mib << 20;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    // The receiver closes once it has read everything.
    let mut rest = [0u8; 64];
    while conn.read(&mut rest)? > 0 {}
    println!("SENT");
    Ok(())
}

fn serve(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new((&conn).take(LINE_MAX));
        if reader.read_line(&mut line).is_ok() {
            let _ = (&conn).write_all(b"ok\n");
        }
    }
    Ok(())
}

fn ping(addr: &str, n: u32) -> std::io::Result<()> {
    // The first connection may wait for the server to listen; it is not
    // counted.
    drop(connect(addr, Duration::from_secs(300))?);
    let t = Instant::now();
    for _ in 0..n {
        let mut conn = TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        conn.write_all(b"x\n")?;
        let mut answer = String::new();
        BufReader::new((&conn).take(LINE_MAX)).read_line(&mut answer)?;
        if answer != "ok\n" {
            return Err(std::io::Error::other(format!("answer {answer:?}")));
        }
    }
    println!(
        "PING {:.3}",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(n.max(1))
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let result = match arg(0) {
        "recv" => arg(1).parse().map_err(std::io::Error::other).and_then(recv),
        "send" => arg(2)
            .parse()
            .map_err(std::io::Error::other)
            .and_then(|mib| send(arg(1), mib)),
        "serve" => arg(1)
            .parse()
            .map_err(std::io::Error::other)
            .and_then(serve),
        "ping" => arg(2)
            .parse()
            .map_err(std::io::Error::other)
            .and_then(|n| ping(arg(1), n)),
        _ => Err(std::io::Error::other(
            "usage: vmcri-netblast recv PORT | send IP:PORT MIB | serve PORT | ping IP:PORT N",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmcri-netblast: {e}");
            ExitCode::FAILURE
        }
    }
}
