//! containerd 1.6 + runc (Debian's packages) as the reference the
//! benchmarks run beside vmcri, driven through its CRI socket by the same
//! clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Installs containerd and runc with apt if containerd is missing.
pub fn ensure_containerd() {
    if Command::new("containerd").arg("--version").output().is_ok() {
        return;
    }
    eprintln!("installing containerd and runc (Debian packages)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "containerd", "runc"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "apt-get install containerd runc failed");
}

/// A running containerd, killed when dropped.
pub struct Containerd {
    child: Child,
    /// Its CRI socket.
    pub socket: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a containerd's CRI plugin finds CNI, and the network namespace
/// it runs in (a test's own: its pods' bridge and addresses stay there).
pub struct CniSetup<'a> {
    /// The conflist directory.
    pub conf_dir: &'a Path,
    /// The plugin directory.
    pub bin_dir: &'a Path,
    /// The namespace file containerd is started in (with nsenter).
    pub netns: &'a Path,
}

/// Starts containerd with its state under `dir/ctrd`, pulling
/// `127.0.0.1:<registry>` over plain HTTP, its sandbox image
/// `127.0.0.1:<registry>/pause:v1`, and `oom_score_adj` clamped (this
/// host lacks CAP_SYS_RESOURCE). Without `cni`, its CNI directories are
/// empty: pods must use the node's network.
pub fn start_containerd(dir: &Path, registry: u16, cni: Option<CniSetup>) -> Containerd {
    let base = dir.join("ctrd");
    for d in ["root", "state", "cni-conf", "cni-bin"] {
        std::fs::create_dir_all(base.join(d)).expect("containerd's directories");
    }
    let socket = base.join("containerd.sock");
    let config = base.join("config.toml");
    let (conf_dir, bin_dir) = match &cni {
        Some(c) => (c.conf_dir.to_path_buf(), c.bin_dir.to_path_buf()),
        None => (base.join("cni-conf"), base.join("cni-bin")),
    };
    std::fs::write(
        &config,
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:{registry}/pause:v1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cnibin}"
    conf_dir = "{cniconf}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."127.0.0.1:{registry}"]
    endpoint = ["http://127.0.0.1:{registry}"]
"#,
            root = base.join("root").display(),
            state = base.join("state").display(),
            socket = socket.display(),
            cnibin = bin_dir.display(),
            cniconf = conf_dir.display(),
        ),
    )
    .expect("write containerd's config");
    let mut cmd = match &cni {
        Some(c) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", c.netns.display()))
                .arg("--")
                .arg("containerd");
            cmd
        }
        None => Command::new("containerd"),
    };
    let log = std::fs::File::create(base.join("containerd.log")).expect("containerd's log");
    let child = cmd
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start containerd");
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Containerd { child, socket }
}
