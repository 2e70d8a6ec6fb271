//! OCI runtime specs from CRI container configs: what the image says
//! (entrypoint, cmd, env, working dir, user) merged with what kubelet asks
//! for (command, args, env, mounts, security context, resources), in the
//! shape containerd gives runc.
//!
//! The spec is built from `oci-spec`'s types (the ones the agent parses it
//! into), by options applied in order to a bare spec: each `with_*` sets one
//! part of it and refuses what that part cannot hold.

use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capabilities, Capability, Linux, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResources,
    LinuxResourcesBuilder, Mount, MountBuilder, Process, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use oci_spec::OciSpecError;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Capabilities a container gets unless it asks otherwise (containerd's
/// and Docker's default set).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, for privileged containers and "ALL".
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYSLOG",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ID_FILE: u64 = 1 << 20;

/// Why a container config cannot become a spec (InvalidArgument, or
/// Unimplemented for what we do not support).
#[derive(Debug, Error)]
pub enum SpecError {
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// Something vmcri does not support.
    #[error("{0}")]
    Unsupported(String),
}

/// What the sandbox contributes to each of its containers' specs.
#[derive(Debug, Clone)]
pub struct PodContext {
    /// Sandbox ID.
    pub sandbox_id: String,
    /// Files the pod shares into containers: (container path, source as
    /// the agent sees it) for /etc/hosts, /etc/resolv.conf, /etc/hostname.
    pub etc_files: Vec<(String, String)>,
    /// Whether the container runs in a microVM. Without one (the process
    /// backend) the host kernel is its only wall: it gets no CAP_MKNOD,
    /// and seccomp profiles it cannot enforce are refused.
    pub in_vm: bool,
    /// The lowest oom_score_adj a container may get: the host cannot
    /// lower it below this (see `[process] restrict_oom_score_adj`).
    pub min_oom_score_adj: Option<i32>,
    /// The pod runs on the node's network (a hostNetwork pod of the
    /// process backend).
    pub host_network: bool,
}

/// The user a container runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// UID.
    pub uid: u32,
    /// GID.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// The spec and what the runtime records from it.
#[derive(Debug, Clone)]
pub struct Built {
    /// The spec; its CRI volumes' sources are their host paths until
    /// [`Built::set_mount_sources`] says where the agent sees them.
    pub spec: Spec,
    /// The user it runs as.
    pub user: User,
    /// Its cgroup path.
    pub cgroup: String,
    /// Where in `spec.mounts` each CRI volume is, in `config.mounts` order.
    volumes: Vec<usize>,
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

/// A builder's refusal: a part the config filled in that the spec cannot
/// hold.
fn oci(e: OciSpecError) -> SpecError {
    invalid(format!(
        "the container config gives an invalid OCI spec: {e}"
    ))
}

/// Reads `rel` (like `etc/passwd`) from the topmost layer that has it, as
/// the container would see it. Only regular files under real directories
/// count: an image's symlink must not make us read a host file.
pub fn read_from_layers(layers: &[PathBuf], rel: &str) -> Option<String> {
    for layer in layers.iter().rev() {
        let mut p = layer.clone();
        let mut ok = true;
        let parts: Vec<&str> = rel.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if i + 1 < parts.len() && m.is_dir() => {}
                Ok(m) if i + 1 == parts.len() && m.is_file() => {}
                // A whiteout (0:0 char device) hides lower layers' copies.
                Ok(_) => return None,
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            let mut s = String::new();
            std::fs::File::open(&p)
                .ok()?
                .take(MAX_ID_FILE)
                .read_to_string(&mut s)
                .ok()?;
            return Some(s);
        }
    }
    None
}

/// `name:x:uid:gid:...` lines: (name, uid, gid).
fn passwd_entries(text: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some((
            *f.first()?,
            f.get(2)?.parse().ok()?,
            f.get(3)?.parse().ok()?,
        ))
    })
}

/// `name:x:gid:user,user` lines: (name, gid, members).
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect());
        Some((
            *f.first()?,
            f.get(2)?.parse().ok()?,
            members.unwrap_or_default(),
        ))
    })
}

/// Resolves the user: the CRI's run_as_user / run_as_username /
/// run_as_group win over the image's `User`; names come from the image's
/// /etc/passwd and /etc/group.
pub fn resolve_user(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image_user: &str,
    layers: &[PathBuf],
) -> Result<User, SpecError> {
    let passwd = read_from_layers(layers, "etc/passwd").unwrap_or_default();
    let group = read_from_layers(layers, "etc/group").unwrap_or_default();
    let (img_user, img_group) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let sc_user = sc.and_then(|s| s.run_as_user.as_ref()).map(|v| v.value);
    let sc_name = sc.map(|s| s.run_as_username.as_str()).unwrap_or("");
    let want: String = match (sc_user, sc_name) {
        (Some(uid), _) => uid.to_string(),
        (None, n) if !n.is_empty() => n.to_string(),
        _ => img_user.to_string(),
    };
    let (uid, mut gid, name) = if want.is_empty() {
        (0, 0, Some("root".to_string()))
    } else if let Ok(uid) = want.parse::<i64>() {
        let uid = u32::try_from(uid).map_err(|_| invalid(format!("invalid uid {uid}")))?;
        let entry = passwd_entries(&passwd).find(|(_, u, _)| *u == uid);
        (
            uid,
            entry.map_or(0, |e| e.2),
            entry.map(|e| e.0.to_string()),
        )
    } else {
        let (n, u, g) = passwd_entries(&passwd)
            .find(|(n, _, _)| *n == want)
            .ok_or_else(|| invalid(format!("user {want:?} is not in the image's /etc/passwd")))?;
        (u, g, Some(n.to_string()))
    };
    // The image's group applies only when the image's user is used.
    if sc_user.is_none() && sc_name.is_empty() {
        if let Some(g) = img_group.filter(|g| !g.is_empty()) {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => group_entries(&group)
                    .find(|(n, _, _)| n == &g)
                    .map(|e| e.1)
                    .ok_or_else(|| {
                        invalid(format!("group {g:?} is not in the image's /etc/group"))
                    })?,
            };
        }
    }
    if let Some(g) = sc.and_then(|s| s.run_as_group.as_ref()) {
        gid = u32::try_from(g.value).map_err(|_| invalid(format!("invalid gid {}", g.value)))?;
    }
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        for (_, g, members) in group_entries(&group) {
            if members.contains(&name.as_str()) && g != gid && !additional.contains(&g) {
                additional.push(g);
            }
        }
    }
    for g in sc
        .map(|s| s.supplemental_groups.as_slice())
        .unwrap_or_default()
    {
        let g =
            u32::try_from(*g).map_err(|_| invalid(format!("invalid supplemental group {g}")))?;
        if !additional.contains(&g) {
            additional.push(g);
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids: additional,
    })
}

fn capability_name(c: &str) -> String {
    let up = c.to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The container's oom_score_adj, raised to `floor` if it asks for less
/// (with a warning: the pod is then easier to OOM-kill than asked).
fn oom_score_adj(res: Option<&cri::LinuxContainerResources>, floor: Option<i32>) -> Option<i64> {
    let asked = res.map(|r| r.oom_score_adj).filter(|v| *v != 0)?;
    match floor {
        Some(f) if i64::from(f) > asked => {
            tracing::warn!(
                asked,
                floor = f,
                "oom_score_adj raised: this host cannot lower it below the daemon's own"
            );
            Some(i64::from(f))
        }
        _ => Some(asked),
    }
}

/// Refuses the seccomp profiles that would not be enforced. In a microVM
/// `RuntimeDefault` is accepted (the VM boundary, as in Kata, is what
/// stands between the container and the host); `Localhost` is not
/// supported anywhere yet. On the host nothing would enforce either.
// Kubelets before 1.25 still send the deprecated string form.
#[allow(deprecated)]
fn check_seccomp(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    in_vm: bool,
) -> Result<(), SpecError> {
    use cri::security_profile::ProfileType;
    let Some(sc) = sc else { return Ok(()) };
    let profile = match &sc.seccomp {
        Some(p) if p.profile_type == ProfileType::Localhost as i32 => Some("Localhost"),
        Some(p) if p.profile_type == ProfileType::RuntimeDefault as i32 => Some("RuntimeDefault"),
        Some(_) => None,
        // The deprecated string form kubelet may still send.
        None => match sc.seccomp_profile_path.as_str() {
            "" | "unconfined" => None,
            p if p.starts_with("localhost/") => Some("Localhost"),
            _ => Some("RuntimeDefault"),
        },
    };
    match profile {
        Some("Localhost") => Err(SpecError::Unsupported(
            "Localhost seccomp profiles are not supported yet".into(),
        )),
        Some(p) if !in_vm => Err(SpecError::Unsupported(format!(
            "the process backend cannot enforce the {p} seccomp profile (it has no VM and no \
             host filter); run the pod with a microVM handler or as Unconfined"
        ))),
        _ => Ok(()),
    }
}

fn capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    in_vm: bool,
) -> Result<Vec<String>, SpecError> {
    if sc.is_some_and(|s| s.privileged) {
        return Ok(ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect());
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .filter(|c| in_vm || **c != "CAP_MKNOD")
        .map(|s| s.to_string())
        .collect();
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        let known = |n: &str| ALL_CAPABILITIES.contains(&n);
        for add in &c.add_capabilities {
            if add.eq_ignore_ascii_case("ALL") {
                caps = ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
                continue;
            }
            let n = capability_name(add);
            if !known(&n) {
                return Err(invalid(format!("unknown capability {add:?}")));
            }
            if !caps.contains(&n) {
                caps.push(n);
            }
        }
        for drop in &c.drop_capabilities {
            if drop.eq_ignore_ascii_case("ALL") {
                caps.clear();
                continue;
            }
            let n = capability_name(drop);
            if !known(&n) {
                return Err(invalid(format!("unknown capability {drop:?}")));
            }
            caps.retain(|c| *c != n);
        }
        // Adds listed after an ALL drop still apply, as in containerd.
        if c.drop_capabilities
            .iter()
            .any(|d| d.eq_ignore_ascii_case("ALL"))
        {
            for add in &c.add_capabilities {
                let n = capability_name(add);
                if known(&n) && !caps.contains(&n) {
                    caps.push(n);
                }
            }
        }
    }
    Ok(caps)
}

/// The process args per the CRI: `command` replaces the image's
/// entrypoint (and then its cmd too); `args` replaces its cmd.
fn process_args(config: &cri::ContainerConfig, image: &ImageConfiguration) -> Vec<String> {
    let ic = image.config().as_ref();
    let entrypoint = ic.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = ic.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let mut args = if config.command.is_empty() {
        entrypoint
    } else {
        config.command.clone()
    };
    if !config.args.is_empty() {
        args.extend(config.args.iter().cloned());
    } else if config.command.is_empty() {
        args.extend(cmd);
    }
    args
}

fn environment(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(e) = env.iter_mut().find(|(ek, _)| ek == k) {
            e.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    let image_env = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    if !image_env.iter().any(|e| e.starts_with("PATH=")) {
        set("PATH", &DEFAULT_PATH[5..]);
    }
    for e in &image_env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        set(k, v);
    }
    for kv in &config.envs {
        if kv.key.is_empty() || kv.key.contains('=') || kv.key.contains('\0') {
            return Err(invalid(format!(
                "invalid environment variable name {:?}",
                kv.key
            )));
        }
        set(&kv.key, &kv.value);
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// `name` (like `CAP_NET_ADMIN`) as oci-spec's capability.
fn capability(name: &str) -> Result<Capability, SpecError> {
    name.strip_prefix("CAP_")
        .unwrap_or(name)
        .parse()
        .map_err(|_| invalid(format!("unknown capability {name:?}")))
}

/// The namespaces the container gets of its own; refuses the node's and
/// other containers' (which a VM cannot share).
fn namespaces(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    host_network: bool,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let opts = sc
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let ns = |typ| {
        LinuxNamespaceBuilder::default()
            .typ(typ)
            .build()
            .map_err(oci)
    };
    // Network and UTS are always the pod's (the agent's); mount and
    // cgroup are always the container's own.
    let mut out = vec![
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Cgroup)?,
    ];
    for (kind, typ, mode) in [
        ("pid", LinuxNamespaceType::Pid, opts.pid),
        ("ipc", LinuxNamespaceType::Ipc, opts.ipc),
    ] {
        match cri::NamespaceMode::try_from(mode) {
            Ok(cri::NamespaceMode::Pod) => {}
            Ok(cri::NamespaceMode::Container) => out.push(ns(typ)?),
            Ok(cri::NamespaceMode::Node) => {
                return Err(SpecError::Unsupported(format!(
                    "the node's {kind} namespace is not available to vmcri pods: they run in their own VM"
                )))
            }
            Ok(cri::NamespaceMode::Target) => {
                return Err(SpecError::Unsupported(format!(
                    "targeting another container's {kind} namespace is not supported yet"
                )))
            }
            Err(_) => return Err(invalid(format!("invalid {kind} namespace mode {mode}"))),
        }
    }
    // A hostNetwork pod's containers ask for the node's network, which
    // is then the pod's too.
    if opts.network == cri::NamespaceMode::Node as i32 && !host_network {
        return Err(SpecError::Unsupported(
            "host networking is not available to vmcri pods: they run in their own VM".into(),
        ));
    }
    if opts
        .userns_options
        .as_ref()
        .is_some_and(|u| u.mode == cri::NamespaceMode::Pod as i32)
    {
        return Err(SpecError::Unsupported(
            "user namespaces are not supported yet".into(),
        ));
    }
    Ok(out)
}

/// One mount, as runc reads it.
fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(oci)
}

/// The container's mounts: the standard filesystems, the pod's /etc
/// files, then its CRI volumes (sources: their host paths). Also returns
/// where each volume is among them.
fn mounts(
    config: &cri::ContainerConfig,
    pod: &PodContext,
    readonly_rootfs: bool,
) -> Result<(Vec<Mount>, Vec<usize>), SpecError> {
    let mut out = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
    ];
    let user_paths: Vec<&str> = config
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    for (dest, src) in &pod.etc_files {
        // kubelet's own (managed /etc/hosts) wins.
        if user_paths.contains(&dest.as_str()) {
            continue;
        }
        let mut options = vec!["rbind", "rprivate"];
        if readonly_rootfs {
            options.push("ro");
        }
        out.push(mount(dest, "bind", src, &options)?);
    }
    let mut volumes = Vec::with_capacity(config.mounts.len());
    for m in &config.mounts {
        if !Path::new(&m.container_path).is_absolute() {
            return Err(invalid(format!(
                "mount container_path {:?} must be absolute",
                m.container_path
            )));
        }
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(SpecError::Unsupported(
                "image volumes are not supported yet".into(),
            ));
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(SpecError::Unsupported(
                "ID-mapped mounts are not supported yet".into(),
            ));
        }
        let host = Path::new(&m.host_path);
        if !host.is_absolute() {
            return Err(invalid(format!(
                "mount host_path {:?} must be absolute",
                m.host_path
            )));
        }
        if !host.exists() {
            return Err(invalid(format!(
                "mount host_path {} does not exist",
                m.host_path
            )));
        }
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => "rprivate",
            Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
            Err(_) => {
                return Err(invalid(format!(
                    "invalid mount propagation {}",
                    m.propagation
                )))
            }
        };
        let mut options = vec!["rbind", propagation];
        if m.readonly {
            options.push("ro");
        }
        if m.recursive_read_only {
            return Err(SpecError::Unsupported(
                "recursive read-only mounts are not supported yet".into(),
            ));
        }
        volumes.push(out.len());
        out.push(mount(&m.container_path, "bind", &m.host_path, &options)?);
    }
    Ok((out, volumes))
}

/// The cgroup limits the CRI asks for.
fn resources(r: Option<&cri::LinuxContainerResources>) -> Result<LinuxResources, SpecError> {
    let Some(r) = r else {
        return Ok(LinuxResources::default());
    };
    // Only what is asked for is set: 0 is "not set" in the CRI.
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares.unsigned_abs());
    }
    if r.cpu_quota > 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period.unsigned_abs());
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    let mut memory = LinuxMemoryBuilder::default();
    if r.memory_limit_in_bytes < 0 || r.cpu_quota < -1 {
        return Err(invalid("negative resource limit"));
    }
    if r.memory_limit_in_bytes > 0 {
        memory = memory.limit(r.memory_limit_in_bytes);
        if r.memory_swap_limit_in_bytes > 0 {
            memory = memory.swap(r.memory_swap_limit_in_bytes);
        }
    }
    // kubelet sends a limit for every page size the node has, 0 when the
    // pod asks for none: a 0 limit (no huge pages) is what every
    // container already has.
    if let Some(h) = r.hugepage_limits.iter().find(|h| h.limit != 0) {
        return Err(SpecError::Unsupported(format!(
            "hugepage limits are not supported yet ({} pages: {} bytes asked)",
            h.page_size, h.limit
        )));
    }
    let mut out = LinuxResourcesBuilder::default()
        .cpu(cpu.build().map_err(oci)?)
        .memory(memory.build().map_err(oci)?);
    if !r.unified.is_empty() {
        out = out.unified(r.unified.clone());
    }
    out.build().map_err(oci)
}

/// A process with none of oci-spec's defaults (youki's: `sh`, a TERM, an
/// rlimit, a few capabilities): what the options leave unset stays so.
fn empty_process() -> Process {
    let mut p = Process::default();
    p.set_terminal(None)
        .set_args(None)
        .set_env(None)
        .set_capabilities(None)
        .set_rlimits(None)
        .set_no_new_privileges(None);
    p
}

/// A `linux` section with none of oci-spec's defaults (namespaces,
/// resources, masked paths).
fn empty_linux() -> Linux {
    let mut l = Linux::default();
    l.set_resources(None)
        .set_namespaces(None)
        .set_masked_paths(None)
        .set_readonly_paths(None);
    l
}

/// The spec's process, for an option to set part of.
fn process(spec: &mut Spec) -> &mut Process {
    spec.process_mut().get_or_insert_with(empty_process)
}

/// The spec's `linux` section, for an option to set part of.
fn linux(spec: &mut Spec) -> &mut Linux {
    spec.linux_mut().get_or_insert_with(empty_linux)
}

/// The spec the options start from: the OCI version, a writable `rootfs`,
/// and empty process, linux, mounts and annotations. The builders would
/// fill what is not set from youki's defaults (a hostname, a shell...);
/// those are cleared, so only what the options set reaches the agent.
fn base() -> Result<Spec, SpecError> {
    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(oci)?,
        )
        .process(empty_process())
        .linux(empty_linux())
        .mounts(Vec::new())
        .annotations(HashMap::new())
        .build()
        .map_err(oci)?;
    spec.set_hostname(None);
    Ok(spec)
}

/// Sets what the process runs: its args (the CRI's command and args over
/// the image's entrypoint and cmd), its working directory and whether it
/// has a terminal.
fn with_process(
    spec: &mut Spec,
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<(), SpecError> {
    let args = process_args(config, image);
    if args.is_empty() {
        return Err(invalid(
            "no command: the config has no command and the image no entrypoint or cmd",
        ));
    }
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else {
        image
            .config()
            .as_ref()
            .and_then(|c| c.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    if !cwd.starts_with('/') {
        return Err(invalid(format!("working_dir {cwd:?} must be absolute")));
    }
    process(spec)
        .set_terminal(Some(config.tty))
        .set_args(Some(args))
        .set_cwd(cwd.into());
    Ok(())
}

/// Sets the user the process runs as (its supplementary groups listed
/// even when there are none, as the agent has always been sent them).
fn with_user(spec: &mut Spec, user: &User) -> Result<(), SpecError> {
    let user = UserBuilder::default()
        .uid(user.uid)
        .gid(user.gid)
        .additional_gids(user.additional_gids.clone())
        .build()
        .map_err(oci)?;
    process(spec).set_user(user);
    Ok(())
}

/// Sets the process's capabilities (bounding, effective and permitted
/// alike) and no_new_privs from the security context.
fn with_security(
    spec: &mut Spec,
    sc: Option<&cri::LinuxContainerSecurityContext>,
    in_vm: bool,
) -> Result<(), SpecError> {
    let set = capabilities(sc, in_vm)?
        .iter()
        .map(|c| capability(c))
        .collect::<Result<Capabilities, _>>()?;
    let mut caps = LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .build()
        .map_err(oci)?;
    // Not containerd's either: the builder's defaults would add them.
    caps.set_inheritable(None).set_ambient(None);
    process(spec)
        .set_capabilities(Some(caps))
        .set_no_new_privileges(Some(sc.is_some_and(|s| s.no_new_privs)));
    Ok(())
}

/// Sets the mounts (see [`mounts`]); returns where each CRI volume is
/// among them.
fn with_mounts(
    spec: &mut Spec,
    config: &cri::ContainerConfig,
    pod: &PodContext,
    readonly_rootfs: bool,
) -> Result<Vec<usize>, SpecError> {
    let (mounts, volumes) = mounts(config, pod, readonly_rootfs)?;
    spec.set_mounts(Some(mounts));
    Ok(volumes)
}

/// Makes sysfs and cgroups writable, for privileged containers, as runc
/// and containerd do. Read-only volumes (secrets, configMaps) stay
/// read-only: privilege is not a licence to write what the pod was given
/// read-only.
fn with_writable_mounts(spec: &mut Spec) {
    for m in spec.mounts_mut().iter_mut().flatten() {
        let kernel_fs = matches!(m.typ().as_deref(), Some("sysfs" | "cgroup"));
        if let (true, Some(opts)) = (kernel_fs, m.options_mut()) {
            opts.retain(|o| o != "ro");
        }
    }
}

/// Sets the environment: a default PATH, the image's, then the CRI's.
fn with_env(
    spec: &mut Spec,
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<(), SpecError> {
    let env = environment(config, image)?;
    process(spec).set_env(Some(env));
    Ok(())
}

/// Sets the namespaces the container gets of its own (see [`namespaces`]).
fn with_namespaces(
    spec: &mut Spec,
    sc: Option<&cri::LinuxContainerSecurityContext>,
    host_network: bool,
) -> Result<(), SpecError> {
    let ns = namespaces(sc, host_network)?;
    linux(spec).set_namespaces(Some(ns));
    Ok(())
}

/// Sets the cgroup limits (always present, if only as `{}`).
fn with_resources(
    spec: &mut Spec,
    res: Option<&cri::LinuxContainerResources>,
) -> Result<(), SpecError> {
    let r = resources(res)?;
    linux(spec).set_resources(Some(r));
    Ok(())
}

/// Sets the container's cgroup path.
fn with_cgroup(spec: &mut Spec, cgroup: &str) {
    linux(spec).set_cgroups_path(Some(cgroup.into()));
}

/// Sets the masked and read-only /proc and /sys paths: the security
/// context's, else containerd's defaults; none for privileged containers.
fn with_masked_paths(spec: &mut Spec, sc: Option<&cri::LinuxContainerSecurityContext>) {
    let pick = |given: Option<&Vec<String>>, default: &[&str]| -> Vec<String> {
        match given {
            Some(g) if !g.is_empty() => g.clone(),
            _ => default.iter().map(|s| s.to_string()).collect(),
        }
    };
    let (masked, readonly) = if sc.is_some_and(|s| s.privileged) {
        (Vec::new(), Vec::new())
    } else {
        (
            pick(sc.map(|s| &s.masked_paths), MASKED_PATHS),
            pick(sc.map(|s| &s.readonly_paths), READONLY_PATHS),
        )
    };
    linux(spec)
        .set_masked_paths(Some(masked))
        .set_readonly_paths(Some(readonly));
}

/// Sets whether the root filesystem is read-only.
fn with_rootfs(spec: &mut Spec, readonly: bool) {
    spec.root_mut()
        .get_or_insert_with(Default::default)
        .set_readonly(Some(readonly));
}

/// Sets the annotations (kubelet's, passed through).
fn with_annotations(spec: &mut Spec, annotations: &HashMap<String, String>) {
    spec.set_annotations(Some(annotations.clone()));
}

/// Sets the process's oom_score_adj, if it asks for one (see
/// [`oom_score_adj`]).
fn with_oom_score_adj(
    spec: &mut Spec,
    res: Option<&cri::LinuxContainerResources>,
    floor: Option<i32>,
) -> Result<(), SpecError> {
    let adj = oom_score_adj(res, floor)
        .map(|v| {
            i32::try_from(v).map_err(|_| invalid(format!("oom_score_adj {v} is out of range")))
        })
        .transpose()?;
    process(spec).set_oom_score_adj(adj);
    Ok(())
}

/// Builds the OCI spec of container `container_id` in `pod` from its CRI
/// config, its image's config and its image layers (lowest first).
pub fn build(
    container_id: &str,
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
    layers: &[PathBuf],
    pod: &PodContext,
) -> Result<Built, SpecError> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let res = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    let image_user = image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let cgroup = format!("/vmcri/{}/{}", &pod.sandbox_id, container_id);
    // The options run in the order the checks always have, so a config
    // with several faults is refused for the same one.
    check_seccomp(sc, pod.in_vm)?;
    let mut spec = base()?;
    with_process(&mut spec, config, image)?;
    let user = resolve_user(sc, &image_user, layers)?;
    with_user(&mut spec, &user)?;
    with_security(&mut spec, sc, pod.in_vm)?;
    let volumes = with_mounts(
        &mut spec,
        config,
        pod,
        sc.is_some_and(|s| s.readonly_rootfs),
    )?;
    if sc.is_some_and(|s| s.privileged) {
        with_writable_mounts(&mut spec);
    }
    with_env(&mut spec, config, image)?;
    with_namespaces(&mut spec, sc, pod.host_network)?;
    with_resources(&mut spec, res)?;
    with_oom_score_adj(&mut spec, res, pod.min_oom_score_adj)?;
    with_cgroup(&mut spec, &cgroup);
    with_masked_paths(&mut spec, sc);
    with_rootfs(&mut spec, sc.is_some_and(|s| s.readonly_rootfs));
    with_annotations(&mut spec, &config.annotations);
    Ok(Built {
        spec,
        user,
        cgroup,
        volumes,
    })
}

impl Built {
    /// Replaces the sources of the CRI volume mounts, in the order of
    /// `config.mounts`, by where the agent sees them (in a microVM, their
    /// path in the pod's share). Fails, changing nothing, unless there is
    /// one source per volume.
    pub fn set_mount_sources(&mut self, sources: &[String]) -> Result<(), SpecError> {
        if sources.len() != self.volumes.len() {
            return Err(invalid(format!(
                "{} mount sources for {} volumes",
                sources.len(),
                self.volumes.len()
            )));
        }
        let mounts = self.spec.mounts_mut().get_or_insert_with(Vec::new);
        // `spec` is public: its mounts may have been changed since.
        if self.volumes.iter().any(|i| *i >= mounts.len()) {
            return Err(invalid("the spec's mounts changed after it was built"));
        }
        for (i, source) in self.volumes.iter().zip(sources) {
            if let Some(m) = mounts.get_mut(*i) {
                m.set_source(Some(source.into()));
            }
        }
        Ok(())
    }

    /// The spec as the agent reads it (config.json).
    pub fn to_json(&self) -> Result<Vec<u8>, SpecError> {
        serde_json::to_vec(&self.spec).map_err(|e| invalid(format!("encoding the OCI spec: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn image(json: &str) -> ImageConfiguration {
        serde_json::from_str(json).unwrap()
    }

    fn pod() -> PodContext {
        PodContext {
            sandbox_id: "s1".into(),
            etc_files: Vec::new(),
            in_vm: true,
            min_oom_score_adj: None,
            host_network: false,
        }
    }

    fn spec_of(
        config: &cri::ContainerConfig,
        img: &ImageConfiguration,
        layers: &[PathBuf],
    ) -> Spec {
        build("c1", config, img, layers, &pod()).unwrap().spec
    }

    fn proc_of(spec: &Spec) -> &Process {
        spec.process().as_ref().unwrap()
    }

    fn args_of(spec: &Spec) -> Vec<String> {
        proc_of(spec).args().clone().unwrap()
    }

    const IMG: &str = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
        "config":{"Entrypoint":["/bin/ep"],"Cmd":["a","b"],"Env":["PATH=/img","KEEP=1"],"WorkingDir":"/w","User":"app"}}"#;

    fn layer_with_passwd() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn command_replaces_entrypoint_and_cmd_args_replace_cmd() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let layers = vec![l.path().to_path_buf()];
        let mut c = cri::ContainerConfig::default();
        assert_eq!(args_of(&spec_of(&c, &img, &layers)), ["/bin/ep", "a", "b"]);
        c.args = vec!["x".into()];
        assert_eq!(args_of(&spec_of(&c, &img, &layers)), ["/bin/ep", "x"]);
        c.command = vec!["/bin/sh".into()];
        c.args = vec![];
        assert_eq!(args_of(&spec_of(&c, &img, &layers)), ["/bin/sh"]);
    }

    #[test]
    fn env_overrides_image_env_and_user_comes_from_the_image_passwd() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let c = cri::ContainerConfig {
            envs: vec![cri::KeyValue {
                key: "PATH".into(),
                value: "/mine".into(),
            }],
            ..Default::default()
        };
        let s = spec_of(&c, &img, &[l.path().to_path_buf()]);
        let p = proc_of(&s);
        assert_eq!(
            p.env().as_deref(),
            Some(&["PATH=/mine", "KEEP=1"].map(String::from)[..])
        );
        assert_eq!(p.cwd(), Path::new("/w"));
        assert_eq!(p.user().uid(), 1000);
        assert_eq!(p.user().gid(), 1000);
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[10][..]));
    }

    #[test]
    fn an_unknown_user_name_is_invalid() {
        let img = image(IMG);
        let empty = tempfile::tempdir().unwrap();
        let e = build(
            "c",
            &cri::ContainerConfig::default(),
            &img,
            &[empty.path().to_path_buf()],
            &pod(),
        )
        .unwrap_err();
        assert!(matches!(e, SpecError::Invalid(_)), "{e}");
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).unwrap();
        assert!(read_from_layers(&[dir.path().to_path_buf()], "etc/passwd").is_none());
        let dir2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir2.path().join("etc")).unwrap();
        assert!(read_from_layers(&[dir2.path().to_path_buf()], "etc/passwd").is_none());
    }

    #[test]
    fn capabilities_add_drop_and_privileged() {
        let mut sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["KILL".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let caps = capabilities(Some(&sc), true).unwrap();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        sc.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["ALL".into()],
            add_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        });
        assert_eq!(
            capabilities(Some(&sc), true).unwrap(),
            vec!["CAP_CHOWN".to_string()]
        );
        sc.capabilities = Some(cri::Capability {
            add_capabilities: vec!["BOGUS".into()],
            ..Default::default()
        });
        assert!(capabilities(Some(&sc), true).is_err());
        sc.capabilities = None;
        sc.privileged = true;
        assert_eq!(
            capabilities(Some(&sc), true).unwrap().len(),
            ALL_CAPABILITIES.len()
        );
    }

    #[test]
    fn a_negative_oom_score_adj_is_raised_to_the_floor_only_when_there_is_one() {
        let res = |v| cri::LinuxContainerResources {
            oom_score_adj: v,
            ..Default::default()
        };
        // kubelet's Guaranteed QoS pods ask for -997.
        assert_eq!(oom_score_adj(Some(&res(-997)), None), Some(-997));
        assert_eq!(oom_score_adj(Some(&res(-997)), Some(0)), Some(0));
        assert_eq!(oom_score_adj(Some(&res(-997)), Some(-999)), Some(-997));
        assert_eq!(oom_score_adj(Some(&res(1000)), Some(0)), Some(1000));
        assert_eq!(oom_score_adj(Some(&res(0)), Some(0)), None);
        assert_eq!(oom_score_adj(None, Some(0)), None);
    }

    #[test]
    fn on_the_host_mknod_is_not_a_default_capability() {
        let in_vm = capabilities(None, true).unwrap();
        assert!(in_vm.contains(&"CAP_MKNOD".to_string()));
        let host = capabilities(None, false).unwrap();
        assert!(!host.contains(&"CAP_MKNOD".to_string()));
        assert_eq!(host.len(), in_vm.len() - 1);
    }

    #[test]
    #[allow(deprecated)]
    fn seccomp_profiles_nothing_enforces_are_refused() {
        use cri::security_profile::ProfileType;
        let with = |t: ProfileType| cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: "p.json".into(),
            }),
            ..Default::default()
        };
        let legacy = |p: &str| cri::LinuxContainerSecurityContext {
            seccomp_profile_path: p.into(),
            ..Default::default()
        };
        // In a VM: RuntimeDefault is accepted, Localhost is not supported.
        assert!(check_seccomp(Some(&with(ProfileType::RuntimeDefault)), true).is_ok());
        assert!(check_seccomp(Some(&with(ProfileType::Unconfined)), true).is_ok());
        assert!(matches!(
            check_seccomp(Some(&with(ProfileType::Localhost)), true),
            Err(SpecError::Unsupported(_))
        ));
        // On the host, only Unconfined (or nothing) goes.
        for sc in [
            with(ProfileType::RuntimeDefault),
            with(ProfileType::Localhost),
            legacy("runtime/default"),
            legacy("docker/default"),
            legacy("localhost/p.json"),
        ] {
            assert!(
                matches!(
                    check_seccomp(Some(&sc), false),
                    Err(SpecError::Unsupported(_))
                ),
                "{sc:?}"
            );
        }
        assert!(check_seccomp(Some(&with(ProfileType::Unconfined)), false).is_ok());
        assert!(check_seccomp(Some(&legacy("unconfined")), false).is_ok());
        assert!(check_seccomp(None, false).is_ok());
    }

    #[test]
    fn namespaces_follow_the_options_and_host_ones_are_refused() {
        let mut sc = cri::LinuxContainerSecurityContext::default();
        use LinuxNamespaceType::{Cgroup, Mount, Pid};
        let types = |sc: &cri::LinuxContainerSecurityContext| -> Vec<LinuxNamespaceType> {
            namespaces(Some(sc), false)
                .unwrap()
                .iter()
                .map(|n| n.typ())
                .collect()
        };
        // Kubernetes' default: PID per container, IPC per pod.
        sc.namespace_options = Some(cri::NamespaceOption {
            pid: 1,
            ipc: 0,
            ..Default::default()
        });
        assert_eq!(types(&sc), [Mount, Cgroup, Pid]);
        sc.namespace_options = Some(cri::NamespaceOption {
            pid: 0,
            ipc: 0,
            ..Default::default()
        });
        assert_eq!(types(&sc), [Mount, Cgroup]);
        sc.namespace_options = Some(cri::NamespaceOption {
            pid: 2,
            ..Default::default()
        });
        assert!(matches!(
            namespaces(Some(&sc), false),
            Err(SpecError::Unsupported(_))
        ));
        sc.namespace_options = Some(cri::NamespaceOption {
            network: 2,
            ..Default::default()
        });
        assert!(matches!(
            namespaces(Some(&sc), false),
            Err(SpecError::Unsupported(_))
        ));
        // In a hostNetwork pod the node's network is the pod's.
        assert_eq!(
            namespaces(Some(&sc), true).unwrap(),
            namespaces(None, false).unwrap()
        );
    }

    #[test]
    fn mounts_need_absolute_existing_paths_and_keep_readonly() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let layers = vec![l.path().to_path_buf()];
        let mut c = cri::ContainerConfig {
            mounts: vec![cri::Mount {
                container_path: "/data".into(),
                host_path: l.path().display().to_string(),
                readonly: true,
                propagation: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = spec_of(&c, &img, &layers);
        let m = s
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/data"))
            .unwrap();
        assert_eq!(
            m.options().as_deref(),
            Some(&["rbind", "rslave", "ro"].map(String::from)[..])
        );
        c.mounts[0].container_path = "data".into();
        assert!(build("c", &c, &img, &layers, &pod()).is_err());
        c.mounts[0].container_path = "/data".into();
        c.mounts[0].host_path = "/no/such/dir".into();
        assert!(build("c", &c, &img, &layers, &pod()).is_err());
    }

    #[test]
    fn zero_hugepage_limits_are_accepted_and_others_refused() {
        let with = |limit| cri::LinuxContainerResources {
            hugepage_limits: vec![
                cri::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 0,
                },
                cri::HugepageLimit {
                    page_size: "1GB".into(),
                    limit,
                },
            ],
            ..Default::default()
        };
        // What kubelet sends on every container.
        assert!(resources(Some(&with(0))).is_ok());
        assert!(matches!(
            resources(Some(&with(1 << 30))),
            Err(SpecError::Unsupported(m)) if m.contains("1GB")
        ));
    }

    #[test]
    fn resources_become_cgroup_limits() {
        let r = cri::LinuxContainerResources {
            cpu_quota: 50000,
            cpu_period: 100000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        };
        let v = resources(Some(&r)).unwrap();
        assert_eq!(v.cpu().as_ref().and_then(|c| c.quota()), Some(50000));
        assert_eq!(v.cpu().as_ref().and_then(|c| c.shares()), Some(512));
        assert_eq!(v.memory().as_ref().and_then(|m| m.limit()), Some(64 << 20));
        let bad = cri::LinuxContainerResources {
            memory_limit_in_bytes: -5,
            ..Default::default()
        };
        assert!(resources(Some(&bad)).is_err());
    }

    #[test]
    fn no_command_anywhere_is_invalid() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#,
        );
        let e = build("c", &cri::ContainerConfig::default(), &img, &[], &pod()).unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
    }

    /// Representative configs whose spec is pinned by a fixture generated
    /// from the untyped implementation this module replaced: (name,
    /// config, pod, where the agent sees each volume).
    fn fixture_cases() -> Vec<(&'static str, cri::ContainerConfig, PodContext, Vec<String>)> {
        use cri::security_profile::ProfileType;
        let sc = |f: &dyn Fn(&mut cri::LinuxContainerSecurityContext)| {
            let mut sc = cri::LinuxContainerSecurityContext::default();
            f(&mut sc);
            Some(cri::LinuxContainerConfig {
                resources: None,
                security_context: Some(sc),
            })
        };
        let volume = |dest: &str, host: &str, readonly, propagation| cri::Mount {
            container_path: dest.into(),
            host_path: host.into(),
            readonly,
            propagation,
            ..Default::default()
        };
        let etc = |root: &str| {
            ["hosts", "resolv.conf", "hostname"]
                .iter()
                .map(|n| (format!("/etc/{n}"), format!("{root}/{n}")))
                .collect::<Vec<_>>()
        };
        let vm = pod();
        let host = PodContext {
            in_vm: false,
            ..pod()
        };
        vec![
            ("plain", cri::ContainerConfig::default(), vm.clone(), vec![]),
            (
                "privileged",
                cri::ContainerConfig {
                    linux: sc(&|s| s.privileged = true),
                    ..Default::default()
                },
                vm.clone(),
                vec![],
            ),
            (
                "readonly_rootfs_volumes_etc",
                cri::ContainerConfig {
                    mounts: vec![
                        volume("/data", "/tmp", true, 1),
                        volume("/cache", "/", false, 0),
                        // kubelet's managed /etc/hosts wins over the pod's.
                        volume("/etc/hosts", "/tmp", false, 2),
                    ],
                    linux: sc(&|s| {
                        s.readonly_rootfs = true;
                        s.seccomp = Some(cri::SecurityProfile {
                            profile_type: ProfileType::RuntimeDefault as i32,
                            localhost_ref: String::new(),
                        });
                    }),
                    ..Default::default()
                },
                PodContext {
                    etc_files: etc("/run/vmcri/shared/etc"),
                    ..vm.clone()
                },
                vec![
                    "/run/vmcri/shared/c1/0".into(),
                    "/run/vmcri/shared/c1/1".into(),
                    "/run/vmcri/shared/c1/2".into(),
                ],
            ),
            (
                "resources",
                cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        resources: Some(cri::LinuxContainerResources {
                            cpu_period: 100000,
                            cpu_quota: 50000,
                            cpu_shares: 512,
                            memory_limit_in_bytes: 64 << 20,
                            memory_swap_limit_in_bytes: 128 << 20,
                            oom_score_adj: -997,
                            cpuset_cpus: "0-1".into(),
                            cpuset_mems: "0".into(),
                            hugepage_limits: vec![cri::HugepageLimit {
                                page_size: "2MB".into(),
                                limit: 0,
                            }],
                            unified: [("memory.high".to_string(), "max".to_string())].into(),
                        }),
                        security_context: None,
                    }),
                    ..Default::default()
                },
                vm.clone(),
                vec![],
            ),
            (
                "resources_empty",
                cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        resources: Some(cri::LinuxContainerResources::default()),
                        security_context: None,
                    }),
                    ..Default::default()
                },
                vm.clone(),
                vec![],
            ),
            (
                "process_backend",
                cri::ContainerConfig {
                    command: vec!["/bin/sh".into()],
                    args: vec!["-c".into(), "sleep 1".into()],
                    envs: vec![cri::KeyValue {
                        key: "A".into(),
                        value: "b=c".into(),
                    }],
                    working_dir: "/srv".into(),
                    tty: true,
                    annotations: [("io.example/a".to_string(), "1".to_string())].into(),
                    mounts: vec![volume("/data", "/tmp", false, 0)],
                    linux: Some(cri::LinuxContainerConfig {
                        resources: Some(cri::LinuxContainerResources {
                            oom_score_adj: -997,
                            ..Default::default()
                        }),
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            capabilities: Some(cri::Capability {
                                add_capabilities: vec!["NET_ADMIN".into()],
                                drop_capabilities: vec!["KILL".into()],
                                ..Default::default()
                            }),
                            namespace_options: Some(cri::NamespaceOption {
                                pid: 1,
                                ipc: 0,
                                ..Default::default()
                            }),
                            run_as_user: Some(cri::Int64Value { value: 0 }),
                            supplemental_groups: vec![5, 10],
                            no_new_privs: true,
                            masked_paths: vec!["/proc/kcore".into()],
                            ..Default::default()
                        }),
                    }),
                    ..Default::default()
                },
                PodContext {
                    etc_files: etc("/var/lib/vmcri/pods/s1/etc"),
                    min_oom_score_adj: Some(0),
                    ..host.clone()
                },
                vec![],
            ),
            (
                "host_network",
                cri::ContainerConfig {
                    linux: sc(&|s| {
                        s.namespace_options = Some(cri::NamespaceOption {
                            network: 2,
                            pid: 1,
                            ..Default::default()
                        })
                    }),
                    ..Default::default()
                },
                PodContext {
                    host_network: true,
                    ..host
                },
                vec![],
            ),
        ]
    }

    /// The capability sets are sets: their order in the JSON is arbitrary.
    fn normalized(mut v: Value) -> Value {
        if let Some(caps) = v["process"]["capabilities"].as_object_mut() {
            for set in caps.values_mut() {
                if let Some(a) = set.as_array_mut() {
                    a.sort_by_key(|c| c.to_string());
                }
            }
        }
        v
    }

    fn fixture_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("src/container/spec/fixtures/{name}.json"))
    }

    #[test]
    fn the_spec_is_the_one_the_json_implementation_gave() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let layers = vec![l.path().to_path_buf()];
        for (name, config, pod, sources) in fixture_cases() {
            let mut built = build("c1", &config, &img, &layers, &pod).unwrap();
            // As CreateContainer does: only a microVM's volumes move.
            if pod.in_vm {
                built.set_mount_sources(&sources).unwrap();
            }
            let got = normalized(serde_json::from_slice(&built.to_json().unwrap()).unwrap());
            let want: Value =
                serde_json::from_str(&std::fs::read_to_string(fixture_path(name)).unwrap())
                    .unwrap();
            assert_eq!(got, normalized(want), "{name}");
        }
    }

    fn value(json: &str) -> Value {
        serde_json::from_str(json).unwrap()
    }

    fn json_of(spec: &Spec) -> Value {
        serde_json::to_value(spec).unwrap()
    }

    fn with_sc(sc: cri::LinuxContainerSecurityContext) -> cri::ContainerConfig {
        cri::ContainerConfig {
            linux: Some(cri::LinuxContainerConfig {
                resources: None,
                security_context: Some(sc),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_base_spec_has_none_of_oci_specs_defaults() {
        assert_eq!(
            json_of(&base().unwrap()),
            value(
                r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": false},
                    "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/"},
                    "linux": {}, "mounts": [], "annotations": {}}"#
            )
        );
    }

    #[test]
    fn with_process_sets_args_cwd_and_terminal_and_refuses_a_relative_cwd() {
        let img = image(IMG);
        let mut spec = base().unwrap();
        let mut c = cri::ContainerConfig {
            tty: true,
            ..Default::default()
        };
        with_process(&mut spec, &c, &img).unwrap();
        let p = proc_of(&spec);
        assert_eq!(
            p.args().as_deref(),
            Some(&["/bin/ep", "a", "b"].map(String::from)[..])
        );
        assert_eq!(p.cwd(), Path::new("/w"));
        assert_eq!(p.terminal(), Some(true));
        c.working_dir = "rel".into();
        let e = with_process(&mut spec, &c, &img).unwrap_err();
        assert!(
            matches!(&e, SpecError::Invalid(m) if m.contains("must be absolute")),
            "{e}"
        );
    }

    #[test]
    fn with_user_always_lists_supplementary_groups() {
        let mut spec = base().unwrap();
        let user = User {
            uid: 7,
            gid: 8,
            additional_gids: Vec::new(),
        };
        with_user(&mut spec, &user).unwrap();
        assert_eq!(
            json_of(&spec)["process"]["user"],
            value(r#"{"uid": 7, "gid": 8, "additionalGids": []}"#)
        );
    }

    #[test]
    fn with_security_sets_three_equal_capability_sets_and_no_new_privs() {
        let mut spec = base().unwrap();
        let sc = cri::LinuxContainerSecurityContext {
            no_new_privs: true,
            ..Default::default()
        };
        with_security(&mut spec, Some(&sc), false).unwrap();
        let p = proc_of(&spec);
        let caps = p.capabilities().as_ref().unwrap();
        let want: Capabilities = capabilities(Some(&sc), false)
            .unwrap()
            .iter()
            .map(|c| capability(c).unwrap())
            .collect();
        assert_eq!(caps.bounding().as_ref(), Some(&want));
        assert_eq!(caps.effective().as_ref(), Some(&want));
        assert_eq!(caps.permitted().as_ref(), Some(&want));
        assert!(caps.inheritable().is_none() && caps.ambient().is_none());
        assert!(!want.contains(&Capability::Mknod));
        assert_eq!(p.no_new_privileges(), Some(true));
    }

    #[test]
    fn every_capability_vmcri_knows_is_one_oci_spec_has() {
        for c in ALL_CAPABILITIES.iter().chain(DEFAULT_CAPABILITIES) {
            assert!(capability(c).is_ok(), "{c}");
        }
        assert_eq!(capability("CAP_SYS_ADMIN").unwrap(), Capability::SysAdmin);
        assert!(matches!(
            capability("CAP_BOGUS"),
            Err(SpecError::Invalid(_))
        ));
    }

    #[test]
    fn with_mounts_lets_volumes_replace_the_pods_etc_files_and_says_where_they_are() {
        let mut spec = base().unwrap();
        let c = cri::ContainerConfig {
            mounts: vec![cri::Mount {
                container_path: "/etc/hosts".into(),
                host_path: "/tmp".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let pod = PodContext {
            etc_files: vec![
                ("/etc/hosts".into(), "/share/hosts".into()),
                ("/etc/hostname".into(), "/share/hostname".into()),
            ],
            ..pod()
        };
        let volumes = with_mounts(&mut spec, &c, &pod, true).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let at = |dest: &str| {
            mounts
                .iter()
                .filter(|m| m.destination() == Path::new(dest))
                .collect::<Vec<_>>()
        };
        // The pod's /etc/hosts gives way; its /etc/hostname is read-only
        // with the rootfs.
        assert_eq!(at("/etc/hosts").len(), 1);
        assert_eq!(
            at("/etc/hosts")[0].source().as_deref(),
            Some(Path::new("/tmp"))
        );
        assert_eq!(
            at("/etc/hostname")[0].options().as_deref(),
            Some(&["rbind", "rprivate", "ro"].map(String::from)[..])
        );
        assert_eq!(volumes.len(), 1);
        assert_eq!(mounts[volumes[0]].destination(), Path::new("/etc/hosts"));
    }

    #[test]
    fn with_writable_mounts_makes_sysfs_and_cgroups_writable_and_nothing_else() {
        let mut spec = base().unwrap();
        let config = cri::ContainerConfig {
            mounts: vec![cri::Mount {
                container_path: "/etc/config".into(),
                host_path: std::env::temp_dir().display().to_string(),
                readonly: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        with_mounts(&mut spec, &config, &pod(), false).unwrap();
        let ro = |spec: &Spec| -> Vec<String> {
            let mounts = spec.mounts().as_ref().unwrap();
            mounts
                .iter()
                .filter(|m| m.options().iter().flatten().any(|o| o == "ro"))
                .map(|m| m.destination().display().to_string())
                .collect()
        };
        let before = ro(&spec);
        assert!(before.contains(&"/sys/fs/cgroup".to_string()), "{before:?}");
        with_writable_mounts(&mut spec);
        let after = ro(&spec);
        // A read-only volume (a secret, a configMap) stays read-only.
        let expected: Vec<String> = before
            .into_iter()
            .filter(|d| d != "/sys" && d != "/sys/fs/cgroup")
            .collect();
        assert_eq!(after, expected);
        assert_eq!(after, vec!["/etc/config".to_string()]);
    }

    #[test]
    fn with_env_refuses_names_that_are_no_names() {
        let img = image(IMG);
        for key in ["", "A=B", "A\0"] {
            let mut spec = base().unwrap();
            let c = cri::ContainerConfig {
                envs: vec![cri::KeyValue {
                    key: key.into(),
                    value: "v".into(),
                }],
                ..Default::default()
            };
            assert!(
                matches!(with_env(&mut spec, &c, &img), Err(SpecError::Invalid(_))),
                "{key:?}"
            );
        }
    }

    #[test]
    fn with_resources_is_always_present() {
        let mut spec = base().unwrap();
        with_resources(&mut spec, None).unwrap();
        assert_eq!(json_of(&spec)["linux"]["resources"], value(r#"{}"#));
        with_resources(&mut spec, Some(&cri::LinuxContainerResources::default())).unwrap();
        assert_eq!(
            json_of(&spec)["linux"]["resources"],
            value(r#"{"cpu": {}, "memory": {}}"#)
        );
    }

    #[test]
    fn with_masked_paths_takes_the_context_s_else_the_defaults_and_none_when_privileged() {
        let paths = |sc: &cri::LinuxContainerSecurityContext| {
            let mut spec = base().unwrap();
            with_masked_paths(&mut spec, Some(sc));
            let l = spec.linux().clone().unwrap();
            (
                l.masked_paths().clone().unwrap(),
                l.readonly_paths().clone().unwrap(),
            )
        };
        let mut sc = cri::LinuxContainerSecurityContext::default();
        assert_eq!(
            paths(&sc),
            (
                MASKED_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                READONLY_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
            )
        );
        sc.masked_paths = vec!["/proc/x".into()];
        assert_eq!(paths(&sc).0, ["/proc/x"]);
        assert_eq!(paths(&sc).1, READONLY_PATHS);
        sc.privileged = true;
        assert_eq!(paths(&sc), (Vec::new(), Vec::new()));
    }

    #[test]
    fn with_oom_score_adj_sets_only_what_is_asked_and_refuses_what_no_i32_holds() {
        let res = |v| cri::LinuxContainerResources {
            oom_score_adj: v,
            ..Default::default()
        };
        let adj = |r: Option<&cri::LinuxContainerResources>, floor| {
            let mut spec = base().unwrap();
            with_oom_score_adj(&mut spec, r, floor).map(|()| proc_of(&spec).oom_score_adj())
        };
        assert_eq!(adj(None, None).unwrap(), None);
        assert_eq!(adj(Some(&res(0)), None).unwrap(), None);
        assert_eq!(adj(Some(&res(-997)), None).unwrap(), Some(-997));
        assert_eq!(adj(Some(&res(-997)), Some(0)).unwrap(), Some(0));
        assert!(matches!(
            adj(Some(&res(i64::MAX)), None),
            Err(SpecError::Invalid(_))
        ));
    }

    #[test]
    fn with_rootfs_cgroup_and_annotations_set_what_they_name() {
        let mut spec = base().unwrap();
        with_rootfs(&mut spec, true);
        with_cgroup(&mut spec, "/vmcri/s/c");
        with_annotations(&mut spec, &[("a".to_string(), "b".to_string())].into());
        let v = json_of(&spec);
        assert_eq!(v["root"], value(r#"{"path": "rootfs", "readonly": true}"#));
        assert_eq!(v["linux"]["cgroupsPath"], "/vmcri/s/c");
        assert_eq!(v["annotations"], value(r#"{"a": "b"}"#));
    }

    #[test]
    fn set_mount_sources_replaces_the_volume_sources_in_order_and_needs_one_each() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let vol = |dest: &str, host: &str| cri::Mount {
            container_path: dest.into(),
            host_path: host.into(),
            ..Default::default()
        };
        let c = cri::ContainerConfig {
            mounts: vec![vol("/a", "/tmp"), vol("/b", "/")],
            ..Default::default()
        };
        let pod = PodContext {
            etc_files: vec![("/etc/hosts".into(), "/share/hosts".into())],
            ..pod()
        };
        let mut built = build("c1", &c, &img, &[l.path().to_path_buf()], &pod).unwrap();
        let sources = |b: &Built| -> Vec<(PathBuf, PathBuf)> {
            b.spec
                .mounts()
                .iter()
                .flatten()
                .filter(|m| m.typ().as_deref() == Some("bind"))
                .map(|m| (m.destination().clone(), m.source().clone().unwrap()))
                .collect()
        };
        let before = sources(&built);
        assert!(matches!(
            built.set_mount_sources(&["/x".into()]),
            Err(SpecError::Invalid(_))
        ));
        assert_eq!(sources(&built), before);
        built
            .set_mount_sources(&["/share/c1/0".into(), "/share/c1/1".into()])
            .unwrap();
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            sources(&built),
            [
                (p("/etc/hosts"), p("/share/hosts")),
                (p("/a"), p("/share/c1/0")),
                (p("/b"), p("/share/c1/1")),
            ]
        );
    }

    #[test]
    fn to_json_is_the_spec_the_agent_parses() {
        let img = image(IMG);
        let l = layer_with_passwd();
        let built = build(
            "c1",
            &cri::ContainerConfig::default(),
            &img,
            &[l.path().to_path_buf()],
            &pod(),
        )
        .unwrap();
        let parsed: Spec = serde_json::from_slice(&built.to_json().unwrap()).unwrap();
        assert_eq!(parsed, built.spec);
    }

    #[test]
    #[allow(deprecated)]
    fn a_config_with_several_faults_is_refused_for_the_first_checked() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#,
        );
        // Localhost seccomp is checked before the command.
        let c = with_sc(cri::LinuxContainerSecurityContext {
            seccomp_profile_path: "localhost/p.json".into(),
            ..Default::default()
        });
        assert!(matches!(
            build("c", &c, &img, &[], &pod()),
            Err(SpecError::Unsupported(_))
        ));
        // Capabilities before mounts, mounts before namespaces.
        let mut c = with_sc(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["BOGUS".into()],
                ..Default::default()
            }),
            namespace_options: Some(cri::NamespaceOption {
                pid: 2,
                ..Default::default()
            }),
            ..Default::default()
        });
        c.command = vec!["/bin/true".into()];
        c.mounts = vec![cri::Mount {
            container_path: "rel".into(),
            host_path: "/tmp".into(),
            ..Default::default()
        }];
        let e = build("c", &c, &img, &[], &pod()).unwrap_err();
        assert!(e.to_string().contains("unknown capability"), "{e}");
        if let Some(sc) = c.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
            sc.capabilities = None;
        }
        let e = build("c", &c, &img, &[], &pod()).unwrap_err();
        assert!(e.to_string().contains("must be absolute"), "{e}");
    }
}
