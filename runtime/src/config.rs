//! The daemon's configuration: embedded defaults, overridden by an
//! optional TOML file, overridden by command-line flags.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The defaults, documented; `vmcri config` prints them.
pub const DEFAULT_CONFIG: &str = r#"# vmcri configuration. Every key is optional; these are the defaults.

# CRI socket kubelet and crictl connect to.
listen = "/run/vmcri/vmcri.sock"
# Persistent state (sandbox records) lives here.
root = "/var/lib/vmcri"
# Runtime handler used when a pod names none (RuntimeClass handler "").
default_handler = "vmcri"
# Cache of built guest artifacts (guest-kernel/build, agent/build-initramfs).
cache = "/var/cache/vmcri"

# RuntimeClass handlers. backend = "microvm": one VM per pod, the product.
# backend = "process" runs the agent in host namespaces with NO VM
# isolation, for development only; it must be named here to exist:
#   [handlers.vmcri-process]
#   backend = "process"
[handlers.vmcri]
backend = "microvm"
vcpus = 1
memory_mib = 256

[microvm]
# Guest kernel and agent initramfs; empty = the newest in `cache`.
kernel = ""
initrd = ""
# vmcri-vmm binary; empty = next to the vmcri binary, else $PATH.
vmm = ""
# How long a guest may take to boot and answer (nested KVM is slow).
boot_timeout_secs = 300
# Per-thread seccomp filters in the (always jailed) VMM: "enforce" (a
# syscall outside a thread's allowlist kills the VMM and the pod reports
# NOTREADY with the reason); "log" or "off" only to debug a refusal.
seccomp = "enforce"
# What a pod's VMM may use beyond its containers' limits: the VMM itself,
# the guest kernel and agent, KVM's page tables. Added to the pod's memory
# and CPU limits in its host cgroup ([cgroups]); kubelet's RuntimeClass
# `overhead` is used instead where it is larger. A pod with no memory
# (CPU) limit gets no memory (CPU) limit, overhead or not.
overhead_memory_mib = 128
overhead_cpu_millis = 100

[cgroups]
# Each microVM pod's VMM runs in the host cgroup
# <cgroup_parent>/vmcri-<sandbox id> (cgroupfs form, as kubelet's cgroupfs
# driver sends it; v1 and v2 are found at start), limited to the pod's
# resources plus [microvm] overhead, its CPU and memory counted there for
# the pod's stats, and removed with the pod. false runs VMMs in the
# daemon's own cgroup (hosts without a writable cgroupfs).
enabled = true
# The parent when RunPodSandbox gives none (crictl).
default_parent = "/vmcri"

[cni]
# Pod networking through CNI plugins. Each pod (but hostNetwork ones) gets
# a network namespace of its own, bind-mounted at <root>/netns/<sandbox id>,
# and the plugins of the first network config in conf_dir (files ending in
# .conflist, .conf or .json, in lexical order, the first that parses, as
# containerd picks it) set it up. The config is re-read when conf_dir or
# that file changes. Without a valid config NetworkReady is false, and
# RunPodSandbox of a pod-network pod fails (FailedPrecondition).
# enabled = false: no CNI; pods get a private network namespace with only
# loopback, and NetworkReady is false (reason NetworkDisabled).
enabled = true
conf_dir = "/etc/cni/net.d"
# Where plugin binaries are looked up, in order.
bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
# Deadline of one plugin call (ADD, DEL or CHECK of one plugin of the list).
plugin_timeout_secs = 60

[process]
# vmcri-agent binary; empty = next to the vmcri binary, else $PATH.
agent = ""
boot_timeout_secs = 30
# Raise a container's oom_score_adj to the daemon's own when it asks for
# less (kubelet gives Guaranteed pods -997): a host without
# CAP_SYS_RESOURCE cannot lower it, and the container would fail to
# start. "auto" does so exactly when the daemon lacks the capability, as
# containerd's restrict_oom_score_adj; or "on", "off".
restrict_oom_score_adj = "auto"

# Registries, in the spirit of containerd's hosts.toml. Registries on
# loopback (localhost, 127.0.0.0/8, [::1]) are reached over plain HTTP with
# no entry here. Example:
#   [registries."registry.k8s.io"]
#   mirrors = ["http://127.0.0.1:5000"]   # tried in order, then the registry
#   insecure = false                      # plain HTTP to the registry itself
#   ca_file = "/etc/vmcri/ca.pem"
[registries]

[images]
# Bounds on every pull: a registry is never trusted to send what it says.
# Manifests, indexes and configs are capped at 4 MiB (fixed), and a blob
# at the size its descriptor gives. Each layer, and all the layers of an
# image together, unpack within these (bytes of file content; entries
# bound the inodes); a bomb stops there and leaves nothing behind.
max_layer_bytes = 17179869184    # 16 GiB
max_layer_inodes = 1048576
max_image_bytes = 68719476736    # 64 GiB
max_image_inodes = 4194304
# A pull fails rather than leave less than this free on the filesystem of
# `root`: the higher of the two floors applies (percent of its size, and
# of its inodes where it counts them).
min_free_bytes = 1073741824      # 1 GiB
min_free_percent = 0

[streaming]
# The server behind Exec, Attach and PortForward URLs (kubelet connects to
# it on the node). Port 0 picks a free port.
address = "127.0.0.1:0"
# How long a URL stays valid; each works once.
token_ttl_secs = 60
# How long a client may take to open its streams once connected.
stream_creation_timeout_secs = 30
# A connection with no bytes either way for this long is closed (kubelet's
# stream idle timeout); an exec behind it runs on to its end.
idle_timeout_secs = 14400

[agent]
# Deadline of every call to a guest agent.
call_timeout_secs = 30
# Grace period for a sandbox to shut down before it is killed.
stop_timeout_secs = 10
# Deadline of one sandbox's stats in a listing: pods are asked all at
# once, and one that has not answered by then is left out, so a stalled
# guest never delays the node's stats.
stats_timeout_secs = 10
"#;

/// Sandbox backend of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One `vmcri-vmm` microVM per pod.
    Microvm,
    /// The agent as a host process in fresh namespaces.
    Process,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Microvm => "microvm",
            Backend::Process => "process",
        })
    }
}

/// One RuntimeClass handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handler {
    /// Its backend.
    pub backend: Backend,
    /// vCPUs of each pod VM.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Memory of each pod VM.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory() -> u64 {
    256
}

/// `[microvm]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicrovmConfig {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Agent initramfs.
    pub initrd: PathBuf,
    /// VMM binary.
    pub vmm: PathBuf,
    /// Boot deadline.
    pub boot_timeout_secs: u64,
    /// The VMM's seccomp mode.
    pub seccomp: SeccompMode,
    /// Memory a pod's VMM and guest may use beyond the pod's limit.
    pub overhead_memory_mib: u64,
    /// CPU a pod's VMM and guest may use beyond the pod's limit.
    pub overhead_cpu_millis: u64,
}

/// How the VMM's seccomp filters act (`vmcri-vmm --seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A refused syscall kills the VMM.
    Enforce,
    /// Refusals are only logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    /// The VMM's flag value.
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

/// `[cgroups]`: the host cgroups of microVM pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupsConfig {
    /// Whether pods get host cgroups.
    pub enabled: bool,
    /// The parent when a request names none.
    pub default_parent: String,
}

/// `[cni]`: pod networking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniConfig {
    /// Whether pods are networked through CNI.
    pub enabled: bool,
    /// Where network configs are read from.
    pub conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Deadline of one plugin call.
    pub plugin_timeout_secs: u64,
}

/// `[process]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Agent binary.
    pub agent: PathBuf,
    /// Start deadline.
    pub boot_timeout_secs: u64,
    /// Whether containers' oom_score_adj is clamped to the daemon's.
    pub restrict_oom_score_adj: Switch,
}

/// A setting that can also follow what the host allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// Decided from the host.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// `[agent]`.
/// `[streaming]`: the exec/attach/port-forward server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingConfig {
    /// Listen address (`host:port`).
    pub address: std::net::SocketAddr,
    /// Lifetime of an issued URL.
    pub token_ttl_secs: u64,
    /// Time a client has to open its streams.
    pub stream_creation_timeout_secs: u64,
    /// Idle connections close after this long.
    pub idle_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[agent]`: deadlines of calls into sandboxes' agents.
pub struct AgentConfig {
    /// Per-call deadline.
    pub call_timeout_secs: u64,
    /// Stop grace period.
    pub stop_timeout_secs: u64,
    /// Deadline of one sandbox's stats.
    pub stats_timeout_secs: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// CRI socket.
    pub listen: PathBuf,
    /// State root.
    pub root: PathBuf,
    /// Default handler.
    pub default_handler: String,
    /// Artifact cache.
    pub cache: PathBuf,
    /// Handlers by RuntimeClass handler name.
    pub handlers: BTreeMap<String, Handler>,
    /// microVM settings.
    pub microvm: MicrovmConfig,
    /// Pod cgroups.
    pub cgroups: CgroupsConfig,
    /// Pod networking.
    pub cni: CniConfig,
    /// Process backend settings.
    pub process: ProcessConfig,
    /// Agent settings.
    pub agent: AgentConfig,
    /// The streaming server.
    pub streaming: StreamingConfig,
    /// Per-registry settings by registry host.
    pub registries: BTreeMap<String, vmcri_image::registry::RegistryConfig>,
    /// Bounds on pulls.
    pub images: vmcri_image::limits::Limits,
}

/// Errors in loading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("config {path}: {source}")]
    Parse {
        /// Path.
        path: String,
        /// Cause.
        source: toml::de::Error,
    },
    /// Values that cannot work together.
    #[error("config: {0}")]
    Invalid(String),
}

/// Merges `overlay` onto `base`, table by table. A handler is replaced
/// whole (its defaults would not make sense for another backend), while
/// handlers the overlay does not name are kept.
fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(toml::Value::Table(handlers)) if k == "handlers" || k == "registries" => {
                        if let toml::Value::Table(named) = v {
                            handlers.extend(named);
                        }
                    }
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

impl Config {
    /// The embedded defaults, with `file` (if any) laid over them.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let parse = |text: &str, path: &str| {
            text.parse::<toml::Value>()
                .map_err(|source| ConfigError::Parse {
                    path: path.to_string(),
                    source,
                })
        };
        let mut value = parse(DEFAULT_CONFIG, "<embedded defaults>")?;
        if let Some(path) = file {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: name.clone(),
                source,
            })?;
            merge(&mut value, parse(&text, &name)?);
        }
        let config: Config = value.try_into().map_err(|source| ConfigError::Parse {
            path: file.map(|p| p.display().to_string()).unwrap_or_default(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.handlers.contains_key(&self.default_handler) {
            return Err(ConfigError::Invalid(format!(
                "default_handler {:?} is not a configured handler",
                self.default_handler
            )));
        }
        if self.streaming.token_ttl_secs == 0
            || self.streaming.stream_creation_timeout_secs == 0
            || self.streaming.idle_timeout_secs == 0
        {
            return Err(ConfigError::Invalid(
                "streaming: token_ttl_secs, stream_creation_timeout_secs and idle_timeout_secs must be positive"
                    .into(),
            ));
        }
        for (name, h) in &self.handlers {
            if h.backend == Backend::Microvm && (h.vcpus == 0 || h.vcpus > 32 || h.memory_mib < 64)
            {
                return Err(ConfigError::Invalid(format!(
                    "handler {name}: vcpus must be 1-32 and memory_mib at least 64"
                )));
            }
        }
        if self.agent.stats_timeout_secs == 0 || self.agent.call_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "agent: call_timeout_secs and stats_timeout_secs must be at least 1".into(),
            ));
        }
        crate::cgroup::path::CgroupPath::parse(&self.cgroups.default_parent)
            .map_err(|e| ConfigError::Invalid(format!("cgroups: default_parent: {e}")))?;
        if self.cni.plugin_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "cni: plugin_timeout_secs must be at least 1".into(),
            ));
        }
        if self.images.min_free_percent > 100 {
            return Err(ConfigError::Invalid(
                "images: min_free_percent must be 0-100".into(),
            ));
        }
        Ok(())
    }

    /// The handler for a RuntimeClass handler name ("" = the default).
    pub fn handler(&self, name: &str) -> Option<(&str, &Handler)> {
        let name = if name.is_empty() {
            self.default_handler.as_str()
        } else {
            name
        };
        self.handlers
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn embedded_defaults_load() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.listen, PathBuf::from("/run/vmcri/vmcri.sock"));
        assert_eq!(c.handler("").unwrap().1.backend, Backend::Microvm);
        assert!(c.handler("nope").is_none());
        // The process backend has no VM: it exists only when configured.
        assert!(c.handlers.values().all(|h| h.backend == Backend::Microvm));
        assert!(c.handler("vmcri-process").is_none());
    }

    #[test]
    fn the_process_backend_is_opt_in() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[handlers.vmcri-process]\nbackend = \"process\"").unwrap();
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(
            c.handler("vmcri-process").unwrap().1.backend,
            Backend::Process
        );
    }

    #[test]
    fn file_overrides_only_what_it_names() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "root = \"/tmp/x\"\n[microvm]\nboot_timeout_secs = 5\n[handlers.big]\nbackend = \"microvm\"\nvcpus = 4\nmemory_mib = 1024").unwrap();
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.root, PathBuf::from("/tmp/x"));
        assert_eq!(c.microvm.boot_timeout_secs, 5);
        assert_eq!(c.microvm.vmm, PathBuf::from(""));
        assert_eq!(c.handler("big").unwrap().1.vcpus, 4);
        assert!(c.handler("vmcri").is_some(), "default handlers remain");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "lisen = \"/x\"").unwrap();
        assert!(matches!(
            Config::load(Some(f.path())),
            Err(ConfigError::Parse { .. })
        ));
        let mut g = tempfile::NamedTempFile::new().unwrap();
        writeln!(g, "default_handler = \"missing\"").unwrap();
        assert!(matches!(
            Config::load(Some(g.path())),
            Err(ConfigError::Invalid(_))
        ));
        let mut h = tempfile::NamedTempFile::new().unwrap();
        writeln!(h, "[handlers.x]\nbackend = \"microvm\"\nvcpus = 0").unwrap();
        assert!(matches!(
            Config::load(Some(h.path())),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::load(Some(Path::new("/nonexistent.toml"))),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn cgroups_default_as_documented_and_a_bad_parent_is_refused() {
        let c = Config::load(None).unwrap();
        assert!(c.cgroups.enabled);
        assert_eq!(c.cgroups.default_parent, "/vmcri");
        assert_eq!(
            (c.microvm.overhead_memory_mib, c.microvm.overhead_cpu_millis),
            (128, 100)
        );
        for bad in ["vmcri", "/a/../b", "kubepods.slice"] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            writeln!(f, "[cgroups]\ndefault_parent = {bad:?}").unwrap();
            assert!(
                matches!(Config::load(Some(f.path())), Err(ConfigError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cni_defaults_as_documented_and_overrides() {
        let c = Config::load(None).unwrap();
        assert!(c.cni.enabled);
        assert_eq!(c.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(
            c.cni.bin_dirs,
            [Path::new("/opt/cni/bin"), Path::new("/usr/lib/cni")]
        );
        assert_eq!(c.cni.plugin_timeout_secs, 60);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[cni]\nenabled = false\nbin_dirs = [\"/x\"]").unwrap();
        let c = Config::load(Some(f.path())).unwrap();
        assert!(!c.cni.enabled);
        assert_eq!(c.cni.bin_dirs, [Path::new("/x")]);
        assert_eq!(c.cni.conf_dir, Path::new("/etc/cni/net.d"));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[cni]\nplugin_timeout_secs = 0").unwrap();
        assert!(matches!(
            Config::load(Some(f.path())),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn image_limits_default_as_documented_and_override() {
        let c = Config::load(None).unwrap();
        assert_eq!(
            c.images,
            vmcri_image::limits::Limits::default(),
            "the embedded [images] is the crate's defaults"
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[images]\nmax_layer_bytes = 1024\nmin_free_percent = 10").unwrap();
        let c = Config::load(Some(f.path())).unwrap();
        assert_eq!(c.images.max_layer_bytes, 1024);
        assert_eq!(c.images.min_free_percent, 10);
        assert_eq!(c.images.max_image_inodes, 4194304, "the rest stay");
        let mut g = tempfile::NamedTempFile::new().unwrap();
        writeln!(g, "[images]\nmin_free_percent = 101").unwrap();
        assert!(matches!(
            Config::load(Some(g.path())),
            Err(ConfigError::Invalid(_))
        ));
    }
}
