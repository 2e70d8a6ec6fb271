//! A throwaway OCI registry on loopback (Debian's docker-registry) and
//! image layouts pushed into it with skopeo.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running registry, killed when dropped.
pub struct Registry {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a registry storing its data in `dir`.
pub fn start_registry(dir: &Path) -> Registry {
    start_registry_with(dir, None)
}

/// Starts a registry that, given an htpasswd file (bcrypt), demands
/// basic auth for everything.
pub fn start_registry_with(dir: &Path, htpasswd: Option<&Path>) -> Registry {
    let auth = htpasswd.map_or(String::new(), |p| {
        format!(
            "auth:\n  htpasswd:\n    realm: vmcri-test\n    path: {}\n",
            p.display()
        )
    });
    let storage = format!(
        "filesystem:\n    rootdirectory: {}",
        dir.join("registry-data").display()
    );
    spawn_registry(dir, &storage, &auth, Command::new("docker-registry"))
}

/// Starts a registry that keeps its images in memory and is killed when
/// the thread that starts it ends (its parent-death signal): started from
/// a thread that lasts as long as the test process, it is a registry the
/// process's tests can share and that ends with them.
pub fn start_registry_in_memory(dir: &Path) -> Registry {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("docker-registry");
    // SAFETY: prctl(2) is async-signal-safe and only arms the child's own
    // parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    spawn_registry(dir, "inmemory: {}", "", cmd)
}

/// Runs `cmd` as a registry on a free port with `storage` (YAML under
/// `storage:`) and `auth` (YAML, may be empty), its config in `dir`, and
/// waits until it listens.
fn spawn_registry(dir: &Path, storage: &str, auth: &str, mut cmd: Command) -> Registry {
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  {storage}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}"
        ),
    )
    .unwrap();
    let child = cmd
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (Debian package docker-registry) must be installed");
    // Owned from here, so a failed start still reaps it.
    let registry = Registry { child, port };
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return registry;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("docker-registry did not start");
}

/// Pushes tag `v1` of the layout to `127.0.0.1:<port>/<repo>:v1`.
pub fn push(layout: &Path, port: u16, repo: &str) {
    push_as(layout, port, repo, None)
}

/// [`push`] with `user:password` credentials.
pub fn push_as(layout: &Path, port: u16, repo: &str, creds: Option<&str>) {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]);
    if let Some(c) = creds {
        cmd.arg("--dest-creds").arg(c);
    }
    let out = cmd
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://127.0.0.1:{port}/{repo}:v1"))
        .output()
        .expect("skopeo must be installed");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One file of an image layer.
pub enum Entry<'a> {
    /// A regular file with its mode.
    File(&'a str, &'a [u8], u32),
    /// A symlink to a target.
    Symlink(&'a str, &'a str),
    /// A directory.
    Dir(&'a str),
}

/// Writes a one-layer OCI image layout at `dir/layout` whose config is
/// `config` (the image config's `config` object, JSON), tagged v1.
pub fn layout(dir: &Path, entries: &[Entry], config: &str) -> PathBuf {
    layout_layers(dir, &[entries], config)
}

/// A gzip tar layer of `entries`: (compressed blob, diff ID hex).
fn tar_layer(entries: &[Entry]) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::File(path, data, mode) => {
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                tar.append_data(&mut h, path, *data).unwrap();
            }
            Entry::Symlink(path, target) => {
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, path, target).unwrap();
            }
            Entry::Dir(path) => {
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                tar.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256_hex(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Like [`layout`], with one layer per entry list, lowest first.
pub fn layout_layers(dir: &Path, layers: &[&[Entry]], config: &str) -> PathBuf {
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut diff_ids = Vec::new();
    let mut descriptors = Vec::new();
    for entries in layers {
        let (layer, diff_id) = tar_layer(entries);
        let layer_d = sha256_hex(&layer);
        std::fs::write(blobs.join(&layer_d), &layer).unwrap();
        diff_ids.push(format!("\"sha256:{diff_id}\""));
        descriptors.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_d}","size":{}}}"#,
            layer.len()
        ));
    }
    let diff_ids = diff_ids.join(",");
    let descriptors = descriptors.join(",");
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":[{diff_ids}]}}}}"#
    );
    let config_d = sha256_hex(config.as_bytes());
    std::fs::write(blobs.join(&config_d), &config).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_d}","size":{}}},"layers":[{descriptors}]}}"#,
        config.len(),
    );
    let manifest_d = sha256_hex(manifest.as_bytes());
    std::fs::write(blobs.join(&manifest_d), &manifest).unwrap();
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_d}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    layout
}

/// Applets the busybox test image links.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "id", "env", "pwd", "hostname", "touch", "mkdir", "yes",
    "head", "true", "false", "kill", "ps", "wc", "seq", "grep", "rm", "dd", "nc", "stty", "tty",
];

/// A busybox image layout from Debian's busybox-static, with an `app`
/// user (1000) in /etc/passwd and `extra` files.
pub fn busybox_layout(dir: &Path, extra: &[Entry], config: &str) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian package busybox-static) must be installed");
    let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
    let group = b"root:x:0:\napp:x:1000:\nwheel:x:10:app\n";
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("etc"),
        Entry::Dir("tmp"),
        Entry::Dir("home"),
        Entry::Dir("home/app"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::File("etc/passwd", passwd, 0o644),
        Entry::File("etc/group", group, 0o644),
    ];
    let links: Vec<String> = BUSYBOX_APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        entries.push(Entry::Symlink(l, "busybox"));
    }
    for e in extra {
        entries.push(match e {
            Entry::File(p, d, m) => Entry::File(p, d, *m),
            Entry::Symlink(p, t) => Entry::Symlink(p, t),
            Entry::Dir(p) => Entry::Dir(p),
        });
    }
    layout(dir, &entries, config)
}
