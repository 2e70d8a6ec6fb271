//! Conversions between CRI messages and the services' records, and the
//! validation of requests on the way in.

use crate::cgroup::limits::{PodResources, Resources};
use crate::cgroup::path::CgroupPath;
use crate::cgroup::stats::Usage;
use crate::container::ContainerEvent;
use crate::network::{NetworkRequest, PortMapping};
use crate::sandbox::{EventKind, RunRequest, SandboxEvent};
use crate::store::{
    ContainerRecord, ContainerState, ImageRecord, NamespaceModes, PodMeta, SandboxRecord,
    SandboxState,
};
use k8s_cri::v1 as cri;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tonic::Status;
use vmcri_image::pull::Credentials;

pub(super) fn container_state(r: &ContainerRecord) -> i32 {
    match r.state {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
    }
}

pub(super) fn container_metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

pub(super) fn image_spec(r: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: r.image.clone(),
        ..Default::default()
    }
}

pub(super) fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: container_state(r),
        created_at: r.created_at_ns,
        started_at: r.started_at_ns,
        finished_at: r.finished_at_ns,
        exit_code: r.exit_code,
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: to_hash(&r.labels),
        annotations: to_hash(&r.annotations),
        mounts: r
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.clone(),
        resources: None,
        image_id: r.image_ref.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(r.uid),
                gid: i64::from(r.gid),
                supplemental_groups: r.additional_gids.iter().map(|g| i64::from(*g)).collect(),
            }),
        }),
    }
}

pub(super) fn container_matches(r: &ContainerRecord, f: &cri::ContainerFilter) -> bool {
    (f.id.is_empty() || r.id.starts_with(&f.id))
        && (f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
        && f.state
            .as_ref()
            .is_none_or(|s| s.state == container_state(r))
        && f.label_selector
            .iter()
            .all(|(k, v)| r.labels.get(k) == Some(v))
}

pub(super) fn stats_of(
    r: &ContainerRecord,
    s: Option<&vmcri_proto::agent::v1::CgroupStats>,
) -> cri::ContainerStats {
    let ts = s.map_or_else(crate::id::now_ns, |s| s.timestamp_ns);
    let v = |x: u64| Some(cri::UInt64Value { value: x });
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: to_hash(&r.labels),
            annotations: to_hash(&r.annotations),
        }),
        cpu: s.map(|s| cri::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: v(s.cpu_usage_ns),
            usage_nano_cores: None,
        }),
        memory: s.map(|s| cri::MemoryUsage {
            timestamp: ts,
            working_set_bytes: v(s.memory_working_set_bytes),
            available_bytes: None,
            usage_bytes: v(s.memory_usage_bytes),
            rss_bytes: v(s.memory_rss_bytes),
            page_faults: v(s.memory_page_faults),
            major_page_faults: v(s.memory_major_page_faults),
        }),
        writable_layer: None,
        swap: None,
    }
}

pub(super) fn event_type(kind: EventKind) -> i32 {
    let t = match kind {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    t as i32
}

pub(super) fn container_event(
    ev: ContainerEvent,
    sandbox: Option<SandboxRecord>,
) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: ev.record.id.clone(),
        container_event_type: event_type(ev.kind),
        created_at: ev.at_ns,
        pod_sandbox_status: sandbox.as_ref().map(sandbox_status),
        containers_statuses: vec![container_status(&ev.record)],
    }
}

pub(super) fn to_hash(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(super) fn state_of(rec: &SandboxRecord) -> i32 {
    match rec.state {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub(super) fn metadata(rec: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: rec.meta.name.clone(),
        uid: rec.meta.uid.clone(),
        namespace: rec.meta.namespace.clone(),
        attempt: rec.meta.attempt,
    }
}

pub(super) fn sandbox_status(rec: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: rec.id.clone(),
        metadata: Some(metadata(rec)),
        state: state_of(rec),
        created_at: rec.created_at_ns,
        // No IP, no field: kubelet reads an empty one as a lost IP and
        // recreates the sandbox.
        network: rec.network.as_ref().and_then(|n| {
            let mut ips = n.pod_ips().into_iter().map(|ip| ip.to_string());
            let ip = ips.next()?;
            Some(cri::PodSandboxNetworkStatus {
                ip,
                additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
            })
        }),
        // What RunPodSandbox asked for: kubelet compares it.
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: rec.namespaces.network,
                    pid: rec.namespaces.pid,
                    ipc: rec.namespaces.ipc,
                    ..Default::default()
                }),
            }),
        }),
        labels: to_hash(&rec.labels),
        annotations: to_hash(&rec.annotations),
        runtime_handler: rec.handler.clone(),
    }
}

/// The stream combination rules of Exec and Attach, as kubelet has them.
pub(super) fn check_streams(
    call: &str,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), Status> {
    if tty && stderr {
        return Err(Status::invalid_argument(format!(
            "{call}: tty and stderr cannot both be true (a terminal merges stderr into stdout)"
        )));
    }
    if !stdin && !stdout && !stderr {
        return Err(Status::invalid_argument(format!(
            "{call}: one of stdin, stdout or stderr must be set"
        )));
    }
    Ok(())
}

/// Validates and converts a RunPodSandbox request.
pub(super) fn run_request(req: cri::RunPodSandboxRequest) -> Result<RunRequest, Status> {
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is required"))?;
    let m = config
        .metadata
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config.metadata is required"))?;
    for (field, value) in [
        ("name", &m.name),
        ("uid", &m.uid),
        ("namespace", &m.namespace),
    ] {
        if value.is_empty() {
            return Err(Status::invalid_argument(format!(
                "RunPodSandbox: metadata.{field} is required"
            )));
        }
    }
    if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox: log_directory {:?} must be an absolute path",
            config.log_directory
        )));
    }
    // RFC 1123 labels: the hostname also travels on the guest's kernel
    // command line.
    let valid_hostname = config.hostname.len() <= 64
        && config
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if let Some(dns) = &config.dns_config {
        crate::sandbox::pod_files::validate_dns(dns)
            .map_err(|e| Status::invalid_argument(format!("RunPodSandbox: {e}")))?;
    }
    if !valid_hostname {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox: invalid hostname {:?}",
            config.hostname
        )));
    }
    let dns_for_cni = config.dns_config.clone();
    let linux = config.linux.unwrap_or_default();
    // Input like any other: it becomes a path under the host's cgroupfs.
    let cgroup_parent = CgroupPath::parent(&linux.cgroup_parent)?;
    let resources = PodResources {
        pod: Resources::from_cri("resources", linux.resources.as_ref())?,
        overhead: Resources::from_cri("overhead", linux.overhead.as_ref())?,
    };
    Ok(RunRequest {
        meta: PodMeta {
            name: m.name,
            uid: m.uid,
            namespace: m.namespace,
            attempt: m.attempt,
        },
        labels: config.labels.into_iter().collect(),
        annotations: config.annotations.into_iter().collect(),
        handler: req.runtime_handler,
        hostname: config.hostname,
        log_directory: config.log_directory,
        dns: config.dns_config.clone(),
        namespaces: linux
            .security_context
            .and_then(|s| s.namespace_options)
            .map(|o| NamespaceModes {
                network: o.network,
                pid: o.pid,
                ipc: o.ipc,
            })
            .unwrap_or_default(),
        cgroup_parent,
        resources,
        network: network_request(&config.port_mappings, dns_for_cni),
    })
}

/// The pod's port mappings and DNS, as CNI's capabilities pass them.
fn network_request(mappings: &[cri::PortMapping], dns: Option<cri::DnsConfig>) -> NetworkRequest {
    NetworkRequest {
        port_mappings: mappings
            .iter()
            .map(|m| PortMapping {
                host_port: m.host_port,
                container_port: m.container_port,
                protocol: cri::Protocol::try_from(m.protocol)
                    .unwrap_or(cri::Protocol::Tcp)
                    .as_str_name()
                    .to_ascii_lowercase(),
                host_ip: m.host_ip.clone(),
            })
            .collect(),
        dns,
    }
}

pub(super) fn matches_filter(rec: &SandboxRecord, f: &cri::PodSandboxFilter) -> bool {
    (f.id.is_empty() || rec.id.starts_with(&f.id))
        && f.state.as_ref().is_none_or(|s| s.state == state_of(rec))
        && f.label_selector
            .iter()
            .all(|(k, v)| rec.labels.get(k) == Some(v))
}

pub(super) fn event(ev: SandboxEvent) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: ev.record.id.clone(),
        container_event_type: event_type(ev.kind),
        created_at: ev.at_ns,
        pod_sandbox_status: Some(sandbox_status(&ev.record)),
        containers_statuses: Vec::new(),
    }
}

/// Registry credentials from a CRI AuthConfig: user and password, or the
/// base64 `user:password` of `auth`.
pub(super) fn credentials(auth: Option<cri::AuthConfig>) -> Result<Option<Credentials>, Status> {
    use base64::Engine as _;
    let Some(a) = auth else { return Ok(None) };
    if !a.username.is_empty() {
        return Ok(Some(Credentials {
            username: a.username,
            password: a.password,
        }));
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| Status::invalid_argument("auth: not base64"))?;
        let text =
            String::from_utf8(raw).map_err(|_| Status::invalid_argument("auth: not UTF-8"))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth: expected user:password"))?;
        return Ok(Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }));
    }
    if !a.identity_token.is_empty() || !a.registry_token.is_empty() {
        return Err(Status::unimplemented(
            "token-based registry auth is not implemented yet; use username/password",
        ));
    }
    Ok(None)
}

pub(super) fn to_cri_image(r: &ImageRecord) -> cri::Image {
    cri::Image {
        id: r.id.clone(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid: r.uid().map(|value| cri::Int64Value { value }),
        username: r.username(),
        spec: Some(cri::ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

pub(super) fn image_name(spec: Option<cri::ImageSpec>, rpc: &str) -> Result<String, Status> {
    spec.map(|s| s.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Status::invalid_argument(format!("{rpc}: image is required")))
}

/// A pod's CPU and memory as its agent counts them (the process
/// backend's, where the agent is the host's own helper).
pub(super) fn usage_of_agent(total: &vmcri_proto::agent::v1::CgroupStats) -> Usage {
    Usage {
        timestamp_ns: total.timestamp_ns,
        cpu_usage_ns: total.cpu_usage_ns,
        memory_usage_bytes: total.memory_usage_bytes,
        memory_working_set_bytes: total.memory_working_set_bytes,
        memory_rss_bytes: total.memory_rss_bytes,
        page_faults: Some(total.memory_page_faults),
        major_page_faults: Some(total.memory_major_page_faults),
    }
}

/// CRI pod stats: CPU and memory from `usage` (none if unknown), the
/// process count if known, `containers` already converted.
pub(super) fn pod_sandbox_stats(
    rec: &SandboxRecord,
    usage: Option<&Usage>,
    process_count: Option<u64>,
    containers: Vec<cri::ContainerStats>,
) -> cri::PodSandboxStats {
    let ts = usage.map_or_else(crate::id::now_ns, |u| u.timestamp_ns);
    let v = |x: u64| Some(cri::UInt64Value { value: x });
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: rec.id.clone(),
            metadata: Some(metadata(rec)),
            labels: to_hash(&rec.labels),
            annotations: to_hash(&rec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: usage.map(|u| cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: v(u.cpu_usage_ns),
                usage_nano_cores: None,
            }),
            memory: usage.map(|u| cri::MemoryUsage {
                timestamp: ts,
                working_set_bytes: v(u.memory_working_set_bytes),
                available_bytes: None,
                usage_bytes: v(u.memory_usage_bytes),
                rss_bytes: v(u.memory_rss_bytes),
                page_faults: u.page_faults.and_then(v),
                major_page_faults: u.major_page_faults.and_then(v),
            }),
            // Pod networking has not landed.
            network: None,
            process: process_count.map(|n| cri::ProcessUsage {
                timestamp: ts,
                process_count: v(n),
            }),
            containers,
        }),
        windows: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, log_dir: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                log_directory: log_dir.into(),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }
    }

    #[test]
    fn the_status_echoes_the_namespace_options_and_has_no_network_field() {
        let mut r = req("p", "");
        r.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let run = run_request(r).unwrap();
        assert_eq!(
            run.namespaces,
            NamespaceModes {
                network: 2,
                pid: 1,
                ipc: 0
            }
        );
        let mut rec = crate::store::tests::record("s1");
        rec.namespaces = run.namespaces;
        let status = sandbox_status(&rec);
        // No IP yet: no network field at all, which kubelet tells from a
        // lost IP.
        assert_eq!(status.network, None);
        let options = status
            .linux
            .as_ref()
            .and_then(|l| l.namespaces.as_ref())
            .and_then(|n| n.options.as_ref())
            .unwrap();
        assert_eq!((options.network, options.pid, options.ipc), (2, 1, 0));
        // The same answer every time.
        assert_eq!(status, sandbox_status(&rec));
        // Without options, the defaults (all POD) are what is echoed.
        assert_eq!(
            run_request(req("p", "")).unwrap().namespaces,
            NamespaceModes::default()
        );
    }

    #[test]
    fn run_requests_are_validated() {
        assert!(run_request(req("p", "/var/log/pods/x")).is_ok());
        let code = |r| run_request(r).unwrap_err().code();
        assert_eq!(code(req("", "")), tonic::Code::InvalidArgument);
        assert_eq!(code(req("p", "relative/dir")), tonic::Code::InvalidArgument);
        assert_eq!(
            code(cri::RunPodSandboxRequest::default()),
            tonic::Code::InvalidArgument
        );
        let mut no_meta = req("p", "");
        no_meta.config.as_mut().unwrap().metadata = None;
        assert!(run_request(no_meta)
            .unwrap_err()
            .message()
            .contains("metadata"));
    }

    #[test]
    fn the_cgroup_parent_and_resources_are_validated() {
        let with = |parent: &str, memory: i64| {
            let mut r = req("p", "");
            r.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: parent.into(),
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: memory,
                    ..Default::default()
                }),
                overhead: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            });
            run_request(r)
        };
        let run = with("/kubepods/burstable/pod-u1", 256 << 20).unwrap();
        assert_eq!(
            run.cgroup_parent.unwrap().as_str(),
            "/kubepods/burstable/pod-u1"
        );
        assert_eq!(run.resources.pod.memory_bytes, Some(256 << 20));
        assert_eq!(run.resources.overhead.memory_bytes, Some(64 << 20));
        // crictl sends none: the configured default applies later.
        assert_eq!(with("", 0).unwrap().cgroup_parent, None);
        for (parent, memory) in [
            ("/kubepods/../..", 0),
            ("kubepods", 0),
            ("kubepods-burstable-pod1.slice", 0),
            ("/kubepods", -1),
        ] {
            let e = with(parent, memory).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{parent}: {e}");
        }
    }

    #[test]
    fn pod_stats_carry_the_usage_given_and_leave_out_what_is_unknown() {
        let rec = crate::store::tests::record("s1");
        let usage = Usage {
            timestamp_ns: 5,
            cpu_usage_ns: 7,
            memory_usage_bytes: 100,
            memory_working_set_bytes: 60,
            memory_rss_bytes: 40,
            page_faults: Some(3),
            major_page_faults: None,
        };
        let s = pod_sandbox_stats(&rec, Some(&usage), None, Vec::new());
        let linux = s.linux.unwrap();
        let cpu = linux.cpu.unwrap();
        assert_eq!(
            (cpu.timestamp, cpu.usage_core_nano_seconds.unwrap().value),
            (5, 7)
        );
        let m = linux.memory.unwrap();
        assert_eq!(m.working_set_bytes.unwrap().value, 60);
        assert_eq!(m.page_faults.unwrap().value, 3);
        assert_eq!(m.major_page_faults, None);
        assert_eq!(linux.process, None);
        // Unreadable: no figures rather than zeros.
        let s = pod_sandbox_stats(&rec, None, Some(2), Vec::new());
        let linux = s.linux.unwrap();
        assert!(linux.cpu.is_none() && linux.memory.is_none());
        assert_eq!(linux.process.unwrap().process_count.unwrap().value, 2);
    }
}
