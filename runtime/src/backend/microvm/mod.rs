//! The microVM backend: one `vmcri-vmm` per pod, the agent as the guest's
//! init, reached over hybrid vsock; a container's files reach the guest
//! through the pod's [`share`].

pub mod net;
pub mod share;

use super::{
    etc_files, find_binary, refuse_host_pid_and_ipc, socket_dir, stop_process, wait_ready,
    BackendError, Boot, ContainerContext, Exposed, SandboxBackend, Spawned,
};
use crate::cgroup::Placement;
use crate::config::{Backend, Config, Handler};
use crate::network::PodNetwork;
use crate::store::{NamespaceModes, ProcessRef, SandboxRecord};
use share::SharedDir;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use vmcri_agent_client::{Agent, AgentAddr};
use vmcri_proto::agent::v1 as pb;

/// Pods in microVMs.
pub struct MicroVm {
    config: Arc<Config>,
}

impl MicroVm {
    /// The backend configured by `config` (`[microvm]`, `[agent]`).
    pub fn new(config: Arc<Config>) -> MicroVm {
        MicroVm { config }
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.config.agent.call_timeout_secs)
    }

    fn command(
        &self,
        rec: &SandboxRecord,
        handler: &Handler,
        nic: Option<&net::VmNic>,
    ) -> Result<Command, BackendError> {
        let c = &self.config.microvm;
        let vmm = find_binary(&c.vmm, "vmcri-vmm")?;
        let kernel = if c.kernel.as_os_str().is_empty() {
            newest_cached(
                &self.config.cache,
                "kernel",
                "vmlinux",
                "guest-kernel/build",
            )?
        } else {
            c.kernel.clone()
        };
        let initrd = if c.initrd.as_os_str().is_empty() {
            newest_cached(
                &self.config.cache,
                "agent",
                "initrd.cpio",
                "agent/build-initramfs",
            )?
        } else {
            c.initrd.clone()
        };
        let shared = SharedDir::new(&rec.dir);
        shared.prepare().map_err(|source| BackendError::Spawn {
            what: format!("the pod's share in {}", rec.dir.display()),
            source,
        })?;
        // The VMM mounts its jail's root here, in its own mount namespace:
        // on the host it stays an empty directory.
        let jail = rec.dir.join("jail");
        crate::store::private_dirs(&jail).map_err(|source| BackendError::Spawn {
            what: format!("the VMM's jail directory {}", jail.display()),
            source,
        })?;
        let mut cmd = Command::new(&vmm);
        // A panic's backtrace would read the binary's files, which the
        // jailed VMM's seccomp filters refuse: the VMM would die of
        // SIGSYS instead of reporting its panic.
        cmd.env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        cmd.arg("--jail")
            .arg(&jail)
            .args(["--seccomp", c.seccomp.as_arg()])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args([
                "--memory",
                &handler.memory_mib.to_string(),
                "--vcpus",
                &handler.vcpus.to_string(),
            ])
            .arg("--vsock")
            .arg(&rec.agent_socket)
            .arg("--serial")
            .arg(rec.dir.join("console.log"))
            .arg("--shared-dir")
            .arg(shared.path())
            .arg("--cmdline")
            // The agent sets the guest's hostname from here.
            .arg(format!("quiet vmcri.hostname={}", rec.hostname));
        if let Some(nic) = nic {
            // The fd stays open across exec (see `net::inherit`).
            cmd.arg("--net").arg(net::vmm_arg(nic, nic.tap.as_raw_fd()));
        }
        Ok(cmd)
    }
}

/// A pod's CNI interface, as its VM is connected to it.
struct PodLink {
    /// The pod's network namespace.
    netns: PathBuf,
    /// The CNI interface in it (`eth0`).
    ifname: String,
    /// Its addresses with prefix lengths.
    addresses: Vec<String>,
    /// The pod's routes.
    routes: Vec<pb::Route>,
}

/// The pod network CNI gave `rec`, as its VM is connected to it; none
/// when it has none (CNI disabled).
fn pod_link(rec: &SandboxRecord) -> Option<PodLink> {
    let net = rec.network.as_ref()?;
    Some(link_of(net))
}

/// The CNI interface in the pod's namespace (the first the result places
/// in a sandbox, as plugins report the container side), its addresses,
/// and the routes. A route without a gateway takes the gateway of an
/// address of its family, as the CNI spec leaves it to the runtime.
fn link_of(net: &PodNetwork) -> PodLink {
    let found = net
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| !i.sandbox.is_empty());
    let (index, ifname) = match found {
        Some((i, iface)) => (Some(i), iface.name.clone()),
        // CNI_IFNAME is always eth0.
        None => (None, "eth0".to_owned()),
    };
    let ips: Vec<_> = net
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == index)
        .collect();
    let addresses = ips.iter().map(|ip| ip.address.to_string()).collect();
    let routes = net
        .routes
        .iter()
        .map(|r| {
            let gw = r.gw.or_else(|| {
                ips.iter()
                    .filter(|ip| ip.address.addr.is_ipv4() == r.dst.addr.is_ipv4())
                    .find_map(|ip| ip.gateway)
            });
            pb::Route {
                destination: r.dst.to_string(),
                gateway: gw.map(|g| g.to_string()).unwrap_or_default(),
                device: ifname.clone(),
            }
        })
        .collect();
    PodLink {
        netns: net.netns.clone(),
        ifname,
        addresses,
        routes,
    }
}

/// The newest file named `file` in `<cache>/<kind>/*/`.
fn newest_cached(
    cache: &Path,
    kind: &str,
    file: &str,
    hint: &str,
) -> Result<PathBuf, BackendError> {
    let dir = cache.join(kind);
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    newest.ok_or_else(|| {
        BackendError::Missing(format!(
            "no {file} in {} and none configured: run {hint}",
            dir.display()
        ))
    })
}

#[tonic::async_trait]
impl SandboxBackend for MicroVm {
    fn kind(&self) -> Backend {
        Backend::Microvm
    }

    fn process_name(&self) -> &'static str {
        "VMM"
    }

    fn agent_socket(&self, socket_dir: &Path) -> PathBuf {
        socket_dir.join("vsock.sock")
    }

    fn check_namespaces(&self, ns: &NamespaceModes) -> Result<(), BackendError> {
        if ns.host_network() {
            return Err(BackendError::Refused(
                "RunPodSandbox: host networking (hostNetwork) is not available in a microVM \
                 pod, whose network is the VM's; run it with a process handler"
                    .into(),
            ));
        }
        refuse_host_pid_and_ipc(ns)
    }

    fn etc_dir(&self, sandbox_dir: &Path) -> PathBuf {
        SharedDir::new(sandbox_dir).etc_dir()
    }

    /// The VMM holds the guest's memory: the pod's limits apply to it.
    fn runs_in_pod_cgroup(&self) -> bool {
        true
    }

    async fn start(
        &self,
        rec: &SandboxRecord,
        handler: &Handler,
        cgroup: Placement,
        spawned: Spawned<'_>,
    ) -> Result<ProcessRef, BackendError> {
        socket_dir(rec)?;
        let log = rec.dir.join("vmm.log");
        let link = pod_link(rec);
        let nic = match &link {
            Some(l) => {
                let (netns, ifname) = (l.netns.clone(), l.ifname.clone());
                let made = tokio::task::spawn_blocking(move || net::connect(&netns, &ifname))
                    .await
                    .map_err(|e| BackendError::Network(e.to_string()))?;
                Some(made.map_err(|e| BackendError::Network(e.to_string()))?)
            }
            None => None,
        };
        let cmd = self.command(rec, handler, nic.as_ref())?;
        let vmm = cmd.get_program().to_owned();
        let tap_fd = nic.as_ref().map(|n| n.tap.as_raw_fd());
        // Into the pod cgroup before exec, so every page of guest memory
        // the VMM touches is charged there (its children inherit it).
        let p = super::host_process::spawn_detached(cmd, &log, move || {
            cgroup.enter()?;
            match tap_fd {
                Some(fd) => net::inherit(fd),
                None => Ok(()),
            }
        })
        .map_err(|source| BackendError::Spawn {
            what: Path::new(&vmm).display().to_string(),
            source,
        })?;
        // The VMM holds the tap now; when it goes, the tap goes.
        let nic = nic.map(|n| (n.mac, n.mtu));
        let boot = Boot {
            what: "VMM",
            log,
            addr: AgentAddr::vm(&rec.agent_socket),
            ready_within: Duration::from_secs(self.config.microvm.boot_timeout_secs),
            call_timeout: self.call_timeout(),
        };
        let (p, agent) = wait_ready(rec, p, spawned, boot).await?;
        if let (Some(l), Some((mac, mtu))) = (link, nic) {
            let iface = pb::Interface {
                name: l.ifname.clone(),
                mac_address: net::format_mac(&mac),
                addresses: l.addresses,
                mtu,
            };
            let started = std::time::Instant::now();
            if let Err(e) = agent.update_interfaces(vec![iface], l.routes).await {
                super::host_process::kill(&p);
                return Err(BackendError::Network(format!(
                    "configuring the guest's {}: {e}",
                    l.ifname
                )));
            }
            // What networking adds to a VM's start after boot (the tap and
            // CNI ADD come before it): the figure the benchmark reports.
            tracing::info!(
                sandbox_id = %rec.id,
                interface = %l.ifname,
                took_ms = started.elapsed().as_millis(),
                "guest interface configured"
            );
        }
        Ok(p)
    }

    fn death_note(&self, rec: &SandboxRecord) -> Option<String> {
        // The VMM's (or its keeper's) last words: "vmcri-vmm: the jailed
        // VMM was killed by signal 31 (SIGSYS: ...)", a guest panic, ...
        super::last_line_with(&rec.dir.join("vmm.log"), "vmcri-vmm: ")
    }

    async fn agent(&self, rec: &SandboxRecord) -> Result<Agent, BackendError> {
        let t = self.call_timeout();
        Ok(Agent::connect(AgentAddr::vm(&rec.agent_socket), t, t).await?)
    }

    async fn stop(&self, rec: &SandboxRecord) {
        let grace = Duration::from_secs(self.config.agent.stop_timeout_secs);
        stop_process(rec, AgentAddr::vm(&rec.agent_socket), grace).await;
    }

    fn container_context(&self, rec: &SandboxRecord) -> ContainerContext {
        let guest_etc = Path::new(share::GUEST_SHARED).join("etc");
        ContainerContext {
            etc_files: etc_files(&self.etc_dir(&rec.dir), &guest_etc),
            in_vm: true,
            // In a VM the agent is root with every capability.
            min_oom_score_adj: None,
        }
    }

    fn expose(
        &self,
        rec: &SandboxRecord,
        id: &str,
        layers: &[(String, PathBuf)],
        mounts: &[k8s_cri::v1::Mount],
    ) -> Result<Exposed, BackendError> {
        let shared = SharedDir::new(&rec.dir);
        let result = (|| {
            let mut exposed = Exposed::default();
            for (chain, path) in layers {
                let hex = chain.trim_start_matches("sha256:");
                exposed.layers.push(shared.expose_layer(hex, path)?);
            }
            for (i, m) in mounts.iter().enumerate() {
                let source = Path::new(&m.host_path);
                exposed
                    .mount_sources
                    .push(shared.expose_volume(id, i, source, m.readonly)?);
            }
            Ok::<_, std::io::Error>(exposed)
        })();
        result.map_err(|e| {
            let _ = shared.release_container(id);
            BackendError::Expose(e)
        })
    }

    fn release_container(&self, rec: &SandboxRecord, id: &str) -> std::io::Result<()> {
        SharedDir::new(&rec.dir).release_container(id)
    }

    fn release_all(&self, sandbox_dir: &Path) -> std::io::Result<()> {
        SharedDir::new(sandbox_dir).release_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Cidr, Dns, Interface, IpConfig, Route};

    fn cidr(s: &str) -> Cidr {
        let (a, p) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix: p.parse().unwrap(),
        }
    }

    /// What the bridge plugin reports: the host veth, the bridge, and
    /// the pod's eth0; a default route, and one without a gateway.
    #[test]
    fn the_guest_gets_the_pod_side_interface_its_addresses_and_gatewayed_routes() {
        let net = PodNetwork {
            netns: "/run/vmcri/netns/x".into(),
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "aa:00:00:00:00:01".into(),
                    sandbox: String::new(),
                },
                Interface {
                    name: "veth1".into(),
                    mac: "aa:00:00:00:00:02".into(),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:f4:01:05".into(),
                    sandbox: "/run/vmcri/netns/x".into(),
                },
            ],
            ips: vec![
                IpConfig {
                    address: cidr("10.244.1.5/24"),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(2),
                },
                IpConfig {
                    address: cidr("fd00:10::5/64"),
                    gateway: Some("fd00:10::1".parse().unwrap()),
                    interface: Some(2),
                },
                // Another interface's address is not the guest's.
                IpConfig {
                    address: cidr("10.9.9.9/32"),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![
                Route {
                    dst: cidr("0.0.0.0/0"),
                    gw: Some("10.244.1.254".parse().unwrap()),
                },
                Route {
                    dst: cidr("10.96.0.0/12"),
                    gw: None,
                },
                Route {
                    dst: cidr("::/0"),
                    gw: None,
                },
            ],
            dns: Dns::default(),
        };
        let l = link_of(&net);
        assert_eq!(l.netns, Path::new("/run/vmcri/netns/x"));
        assert_eq!(l.ifname, "eth0");
        assert_eq!(l.addresses, ["10.244.1.5/24", "fd00:10::5/64"]);
        let routes: Vec<_> = l
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.as_str(),
                    r.gateway.as_str(),
                    r.device.as_str(),
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0", "10.244.1.254", "eth0"),
                ("10.96.0.0/12", "10.244.1.1", "eth0"),
                ("::/0", "fd00:10::1", "eth0"),
            ]
        );
    }
}
