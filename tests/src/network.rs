//! Network tests' scaffolding: a network namespace of the test's own that
//! the daemon, its CNI bridge and every pod address live in, a conflist
//! for Debian's containernetworking-plugins, and a way for the daemon in
//! there to reach the test's registry on loopback.
//!
//! Safety rule: nothing here configures the host's network namespace, and
//! the only traffic that crosses namespaces is the forwarder's, between
//! two loopbacks.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where Debian's containernetworking-plugins live.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// A network namespace made with `ip netns add`, removed when dropped.
pub struct TestNetns {
    /// Its name (`vmcri-test-<tag>-<pid>`).
    pub name: String,
}

impl TestNetns {
    /// A fresh namespace with loopback up.
    pub fn new(tag: &str) -> TestNetns {
        let name = format!("vmcri-test-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) must be installed");
        assert!(ok.success(), "ip netns add {name}");
        let ns = TestNetns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Its namespace file.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `cmd` in the namespace (nsenter: the mounts stay the test's).
    pub fn output(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(cmd)
            .output()
            .expect("run nsenter")
    }

    /// Runs `cmd` in the namespace; panics unless it succeeds. Its stdout.
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = self.output(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The namespace's links, one line each (`ip -o link`).
    pub fn links(&self) -> Vec<String> {
        self.run(&["ip", "-o", "link"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Makes `127.0.0.1:<port>` in the namespace reach `127.0.0.1:<port>`
    /// of the test's own namespace (its registry), for as long as the
    /// process runs: loopback to loopback, nothing else.
    pub fn forward_loopback(&self, port: u16) {
        let path = self.path();
        // A socket belongs to the namespace it was made in: make it from
        // a thread that entered the namespace and then ends.
        let listener = std::thread::spawn(move || {
            enter(&path);
            TcpListener::bind(("127.0.0.1", port)).expect("listen in the test netns")
        })
        .join()
        .expect("the listener thread");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                pipe(conn, upstream);
            }
        });
    }

    /// A port on the test's own loopback that reaches `127.0.0.1:<port>`
    /// in the namespace (a daemon's streaming server there), for as long
    /// as the process runs: loopback to loopback, nothing else.
    pub fn forward_into(&self, port: u16) -> u16 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("listen on loopback");
        let local = listener.local_addr().expect("the listener's port").port();
        let path = self.path();
        // The listener was made here, so what it accepts is the test's;
        // the sockets this thread makes after setns are the namespace's.
        std::thread::spawn(move || {
            enter(&path);
            for conn in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                pipe(conn, upstream);
            }
        });
        local
    }
}

/// Moves the calling thread (only) into the network namespace at `path`.
fn enter(path: &Path) {
    let ns = std::fs::File::open(path).expect("open the test netns");
    // SAFETY: setns on an open namespace fd, for this thread only.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

fn pipe(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        copy(a, b2);
        copy(b, a2);
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A conflist for Debian's plugins: bridge `bridge` (the gateway of
/// `subnet`, `10.244.X.0/24`) with host-local addresses kept in
/// `ipam_dir`, then `extra` plugin configs (JSON objects), then portmap
/// and loopback.
pub fn conflist(bridge: &str, subnet: &str, ipam_dir: &Path, extra: &[&str]) -> String {
    let mut plugins = vec![format!(
        r#"{{"type":"bridge","bridge":"{bridge}","isGateway":true,"ipMasq":false,"hairpinMode":true,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
        ipam_dir.display()
    )];
    plugins.extend(extra.iter().map(|e| e.to_string()));
    plugins.push(r#"{"type":"portmap","capabilities":{"portMappings":true}}"#.into());
    plugins.push(r#"{"type":"loopback"}"#.into());
    format!(
        r#"{{"cniVersion":"1.0.0","name":"vmcri-test","plugins":[{}]}}"#,
        plugins.join(",")
    )
}

/// The daemon config's `[cni]` table for configs in `conf_dir` and
/// plugins in `bin_dirs`.
pub fn cni_config(conf_dir: &Path, bin_dirs: &[&Path]) -> String {
    let dirs: Vec<String> = bin_dirs
        .iter()
        .map(|d| format!("\"{}\"", d.display()))
        .collect();
    format!(
        "[cni]\nenabled = true\nconf_dir = \"{}\"\nbin_dirs = [{}]\nplugin_timeout_secs = 30\n",
        conf_dir.display(),
        dirs.join(", ")
    )
}

/// The addresses host-local has leased in `ipam_dir` (its files named
/// by address).
pub fn leases(ipam_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for net in std::fs::read_dir(ipam_dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(net.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                out.push(name);
            }
        }
    }
    out
}

/// A shell command that asks `ip`:`port` for `GET /` over HTTP/1.0 with
/// the `nc` given (busybox's: the static busybox `wget` crashes on
/// addresses other than loopback, lacking glibc's lookup files).
pub fn http_get(nc: &str, ip: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {nc} -w 3 {ip} {port}")
}

/// The body of an HTTP `200` answer (after the headers' blank line),
/// trimmed; `None` for any other answer.
pub fn ok_body(answer: &str) -> Option<String> {
    if !answer.contains(" 200 ") {
        return None;
    }
    Some(
        answer
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
    )
}
