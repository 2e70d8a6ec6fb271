//! Pod networking: a network namespace per pod ([`netns`]), set up by the
//! CNI plugins of the configured network ([`cni`]), and what a backend
//! needs of the outcome ([`PodNetwork`], in the sandbox record).
//!
//! The sandbox layer drives it: the namespace is recorded, then made,
//! then ADD runs, all before the backend starts, so every backend reads
//! the pod's network from its record. DEL runs at stop (and for a pod a
//! crash left half-made, at restart); the namespace goes with the pod.

pub mod cni;
pub mod netns;

use crate::config::{CniConfig, Config};
use crate::lock::lock;
use crate::store::SandboxRecord;
use cni::config::{Chosen, NetworkList};
use cni::{Attachment, CniError, Plugins};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// The interface CNI makes in the pod's namespace.
pub const IFNAME: &str = "eth0";

/// Annotations kubelet passes a pod's traffic limits in.
const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// Errors of pod networking, each mapping to one gRPC status.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// No usable network config (FailedPrecondition).
    #[error("cni plugin not initialized: {0}")]
    NotReady(String),
    /// The request cannot be networked as asked (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// A plugin failed (Unavailable, as a retry may succeed).
    #[error(transparent)]
    Cni(#[from] CniError),
    /// Making or removing the pod's namespace, or its CNI state, failed
    /// (Internal).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// An address with its prefix length, written as CIDR (`10.0.0.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An interface of the CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address, if the plugin gave it.
    pub mac: String,
    /// The namespace it is in (empty: the host's).
    pub sandbox: String,
}

/// An address of the CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address and its prefix length.
    pub address: Cidr,
    /// Its gateway.
    pub gateway: Option<IpAddr>,
    /// Index into [`PodNetwork::interfaces`] of the interface it is on.
    pub interface: Option<usize>,
}

/// A route of the CNI result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: Cidr,
    /// Next hop (none: the interface's gateway).
    pub gw: Option<IpAddr>,
}

/// DNS settings of the CNI result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    pub nameservers: Vec<String>,
    /// Local domain.
    pub domain: String,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

/// A pod's network as its backend needs it: the namespace CNI set up
/// and what the plugins made there (the final ADD result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pod's network namespace (a bind-mounted nsfs file).
    pub netns: PathBuf,
    /// Interfaces, host-side and in the namespace.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS.
    pub dns: Dns,
}

impl PodNetwork {
    /// The pod's IP for CRI: the first IPv4 address if any (containerd's
    /// choice), then the others in order.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.ips.iter().map(|i| i.address.addr).collect();
        if let Some(v4) = ips.iter().position(IpAddr::is_ipv4) {
            let first = ips.remove(v4);
            ips.insert(0, first);
        }
        ips
    }
}

/// A CRI port mapping, as the `portMappings` capability passes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    /// Port on the node.
    pub host_port: i32,
    /// Port in the pod.
    pub container_port: i32,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    /// Node address to bind (empty: all).
    pub host_ip: String,
}

/// What of a RunPodSandbox request the network setup reads.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    /// Port mappings.
    pub port_mappings: Vec<PortMapping>,
    /// The pod's DNS config.
    pub dns: Option<k8s_cri::v1::DnsConfig>,
}

/// The config in use and what it was read from, to see when to reload.
struct Loaded {
    dir_mtime: Option<SystemTime>,
    chosen: Result<Chosen, String>,
}

/// Pod networking: the netns directory, the CNI config and plugins.
pub struct Network {
    settings: CniConfig,
    netns_dir: PathBuf,
    plugins: Plugins,
    loaded: Mutex<Option<Loaded>>,
    pod_cidr: Mutex<String>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
    move |source| NetworkError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

impl Network {
    /// Pod networking as `config` sets it, namespaces under
    /// `<root>/netns` (a private mount of its own: process-backend agents
    /// detach it from their copy of the mount table, so that no pod's
    /// mount namespace holds another pod's network namespace alive).
    pub fn new(config: &Config) -> Result<Network, NetworkError> {
        let netns_dir = config.root.join("netns");
        crate::store::private_dirs(&netns_dir).map_err(io_err("creating", &netns_dir))?;
        std::fs::File::open(&config.root)
            .and_then(|root| {
                crate::hostfs::mounts::private_root(
                    std::os::fd::AsFd::as_fd(&root),
                    std::ffi::OsStr::new("netns"),
                )
            })
            .map_err(io_err("mounting", &netns_dir))?;
        Ok(Network {
            settings: config.cni.clone(),
            netns_dir,
            plugins: Plugins::new(
                config.cni.bin_dirs.clone(),
                Duration::from_secs(config.cni.plugin_timeout_secs),
            ),
            loaded: Mutex::new(None),
            pod_cidr: Mutex::new(String::new()),
        })
    }

    /// Whether pods are networked through CNI (`[cni] enabled`).
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Where the namespaces are bound.
    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    /// Where sandbox `id`'s namespace is bound.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        self.netns_dir.join(id)
    }

    /// Sets the pod CIDR kubelet gave (`ipRanges`).
    pub fn set_pod_cidr(&self, cidr: String) {
        *lock(&self.pod_cidr) = cidr;
    }

    /// The pod CIDR kubelet gave, if any.
    pub fn pod_cidr(&self) -> String {
        lock(&self.pod_cidr).clone()
    }

    /// The network config in use, re-read if the conf dir or the chosen
    /// file changed; with every plugin binary present.
    pub fn current(&self) -> Result<NetworkList, String> {
        if !self.settings.enabled {
            return Err("pod networking is disabled ([cni] enabled = false)".into());
        }
        let dir = &self.settings.conf_dir;
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let dir_mtime = mtime(dir);
        let mut loaded = lock(&self.loaded);
        let fresh = loaded.as_ref().is_some_and(|l| {
            l.dir_mtime == dir_mtime
                && matches!(&l.chosen, Ok(c) if mtime(&c.file) == c.mtime && c.mtime.is_some())
        });
        if !fresh {
            let chosen = cni::config::choose(dir);
            match &chosen {
                Ok(c) => {
                    tracing::info!(file = %c.file.display(), network = %c.list.name, "CNI network config loaded")
                }
                Err(e) => tracing::warn!(error = %e, "no CNI network config"),
            }
            *loaded = Some(Loaded { dir_mtime, chosen });
        }
        let chosen = match loaded.as_ref().map(|l| &l.chosen) {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err("no network config loaded".into()),
        };
        let missing = self.plugins.missing(&chosen.list);
        if !missing.is_empty() {
            return Err(format!(
                "{}: plugin binaries {} not found in {}",
                chosen.file.display(),
                missing.join(", "),
                self.settings
                    .bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(chosen.list.clone())
    }

    /// NetworkReady: `Err((reason, message))` while pods cannot be
    /// networked.
    pub fn ready(&self) -> Result<(), (&'static str, String)> {
        if !self.settings.enabled {
            return Err((
                "NetworkDisabled",
                "pod networking is disabled ([cni] enabled = false): pods have only loopback"
                    .into(),
            ));
        }
        self.current().map(|_| ()).map_err(|e| {
            (
                "NetworkPluginNotReady",
                format!("cni plugin not initialized: {e}"),
            )
        })
    }

    /// Makes the namespace at `path` (off the async workers).
    pub async fn create_netns(&self, path: &Path) -> Result<(), NetworkError> {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || netns::create(&p))
            .await
            .unwrap_or_else(|j| Err(std::io::Error::other(j.to_string())))
            .map_err(io_err("making the pod network namespace", path))
    }

    /// Removes the namespace at `path`; gone already is fine.
    pub fn remove_netns(&self, path: &Path) -> Result<(), NetworkError> {
        netns::remove(path).map_err(io_err("removing the pod network namespace", path))
    }

    /// Removes namespaces under the netns dir whose sandbox is not in
    /// `known` (a crash between making one and recording its pod's end).
    pub fn remove_orphans(&self, known: &HashSet<String>) {
        for e in std::fs::read_dir(&self.netns_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::warn!(sandbox_id = %name, "removing the network namespace of a pod that is gone");
                if let Err(err) = netns::remove(&e.path()) {
                    tracing::warn!(sandbox_id = %name, error = %err, "removing a leftover network namespace");
                }
            }
        }
    }

    /// CNI ADD for sandbox `rec`, whose namespace exists at `netns`, with
    /// network `list`. What it is run with is kept in the sandbox's
    /// directory before the first plugin runs; on failure what ADD did is
    /// undone (DEL) and the error is the plugin's.
    pub async fn add(
        &self,
        rec: &SandboxRecord,
        netns: &Path,
        list: NetworkList,
        req: &NetworkRequest,
    ) -> Result<PodNetwork, NetworkError> {
        let mut att = Attachment {
            list: list.json.clone(),
            container_id: rec.id.clone(),
            netns: netns.to_path_buf(),
            ifname: IFNAME.into(),
            args: cni_args(rec)?,
            capabilities: capabilities(req, &rec.annotations, &self.pod_cidr())?,
            result: None,
        };
        let path = cni::attachment_path(&rec.dir);
        save(&path, &att)?;
        tracing::info!(sandbox_id = %rec.id, network = %list.name, "CNI ADD");
        let added = self.plugins.add(&att).await;
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(sandbox_id = %rec.id, error = %e, "CNI ADD failed; undoing it");
                if let Err(del) = self.teardown(rec).await {
                    tracing::warn!(sandbox_id = %rec.id, error = %del, "CNI DEL after a failed ADD");
                }
                return Err(e.into());
            }
        };
        let parsed = cni::result::parse(&result).map_err(|msg| CniError::Result {
            plugin: list.name.clone(),
            command: "ADD",
            msg,
        })?;
        att.result = Some(result);
        save(&path, &att)?;
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            interfaces: parsed.interfaces,
            ips: parsed.ips,
            routes: parsed.routes,
            dns: parsed.dns,
        })
    }

    /// CNI DEL for sandbox `rec` with what its ADD was run with, if an ADD
    /// was started and not yet undone; the kept state goes once DEL
    /// succeeds, so a second call does nothing.
    pub async fn teardown(&self, rec: &SandboxRecord) -> Result<(), NetworkError> {
        let path = cni::attachment_path(&rec.dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let att: Attachment = serde_json::from_slice(&bytes)
            .map_err(|e| CniError::Cache(format!("{}: {e}", path.display())))?;
        let exists = netns::is_netns(&att.netns);
        tracing::info!(sandbox_id = %rec.id, netns_exists = exists, "CNI DEL");
        self.plugins.del(&att, exists).await?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// CNI CHECK of sandbox `rec`'s network, if it has one.
    pub async fn check(&self, rec: &SandboxRecord) -> Result<(), NetworkError> {
        let path = cni::attachment_path(&rec.dir);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(());
        };
        let att: Attachment = serde_json::from_slice(&bytes)
            .map_err(|e| CniError::Cache(format!("{}: {e}", path.display())))?;
        Ok(self.plugins.check(&att).await?)
    }
}

fn save(path: &Path, att: &Attachment) -> Result<(), NetworkError> {
    let data = serde_json::to_vec_pretty(att)
        .map_err(|e| io_err("writing", path)(std::io::Error::other(e)))?;
    crate::store::write_atomically(path, &data).map_err(io_err("writing", path))
}

/// CNI_ARGS for a pod, as kubelet's runtimes pass them.
pub fn cni_args(rec: &SandboxRecord) -> Result<Vec<(String, String)>, NetworkError> {
    let args = vec![
        ("IgnoreUnknown".to_string(), "1".to_string()),
        ("K8S_POD_NAMESPACE".into(), rec.meta.namespace.clone()),
        ("K8S_POD_NAME".into(), rec.meta.name.clone()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), rec.id.clone()),
        ("K8S_POD_UID".into(), rec.meta.uid.clone()),
    ];
    // ';' and '=' delimit CNI_ARGS: a value holding one would add arguments.
    if let Some((k, v)) = args.iter().find(|(_, v)| v.contains([';', '=', '\0'])) {
        return Err(NetworkError::Invalid(format!(
            "RunPodSandbox: {k} {v:?} cannot be passed to CNI plugins (it holds ';', '=' or NUL)"
        )));
    }
    Ok(args)
}

/// The runtime config of every capability vmcri can fill for this pod;
/// each plugin is given those it declares.
pub fn capabilities(
    req: &NetworkRequest,
    annotations: &BTreeMap<String, String>,
    pod_cidr: &str,
) -> Result<Map<String, Value>, NetworkError> {
    let mut caps = Map::new();
    // Like containerd: mappings without a host port publish nothing.
    let ports: Vec<Value> = req
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| {
            json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol,
                "hostIP": p.host_ip,
            })
        })
        .collect();
    caps.insert("portMappings".into(), Value::Array(ports));
    if let Some(dns) = &req.dns {
        caps.insert(
            "dns".into(),
            json!({"servers": dns.servers, "searches": dns.searches, "options": dns.options}),
        );
    }
    if !pod_cidr.is_empty() {
        caps.insert("ipRanges".into(), json!([[{"subnet": pod_cidr}]]));
    }
    let rate = |key: &str| -> Result<Option<u64>, NetworkError> {
        annotations
            .get(key)
            .map(|v| {
                bandwidth(v)
                    .map_err(|e| NetworkError::Invalid(format!("annotation {key}={v:?}: {e}")))
            })
            .transpose()
    };
    let (ingress, egress) = (rate(INGRESS_BANDWIDTH)?, rate(EGRESS_BANDWIDTH)?);
    if ingress.is_some() || egress.is_some() {
        // containerd's conversion: the rate in bits per second, and the
        // largest burst, for each direction limited.
        let mut bw = Map::new();
        if let Some(r) = ingress {
            bw.insert("ingressRate".into(), r.into());
            bw.insert("ingressBurst".into(), u64::from(u32::MAX).into());
        }
        if let Some(r) = egress {
            bw.insert("egressRate".into(), r.into());
            bw.insert("egressBurst".into(), u64::from(u32::MAX).into());
        }
        caps.insert("bandwidth".into(), Value::Object(bw));
    }
    Ok(caps)
}

/// A bandwidth annotation's value in bits per second: a Kubernetes
/// quantity (`10M`, `1.5Gi`, `100k`), rounded up, within kubelet's
/// bounds of 1k to 1P.
pub fn bandwidth(s: &str) -> Result<u64, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || int.len() + frac.len() > 30 {
        return Err("not a quantity".into());
    }
    let digits = |d: &str| -> Result<u128, String> {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u128>().map_err(|_| "not a quantity".to_string())
        }
    };
    // (multiplier, divisor) of the suffix.
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        _ => return Err(format!("unknown suffix {suffix:?}")),
    };
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| "too long")?);
    let mantissa = digits(int)? * scale + digits(frac)?;
    let value = (mantissa * mul).div_ceil(scale * div);
    if value < 1_000 {
        return Err("unreasonably small (< 1kbit)".into());
    }
    if value > 1_000_000_000_000_000 {
        return Err("unreasonably large (> 1Pbit)".into());
    }
    u64::try_from(value).map_err(|_| "too large".into())
}

#[cfg(test)]
mod tests;
