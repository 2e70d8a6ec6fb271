//! RuntimeService: pod sandboxes, containers, streaming URLs, stats,
//! status and events.

use super::convert::*;
use super::{run_to_completion, unimplemented, Cri, EventStream, CRI_API_VERSION, RUNTIME_NAME};
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use futures_util::future::join_all;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use std::collections::{BTreeMap, HashMap};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

impl Cri {
    /// The stats of ready pod `rec` and of its live containers. A pod with
    /// a host cgroup (microVM) has its CPU and memory from there, never
    /// from the guest, and gets them even when its guest does not answer
    /// (its containers then have no figures); otherwise the agent's
    /// account is the pod's. The process count is the guest's either
    /// way: its processes take no host PIDs.
    async fn pod_stats(&self, rec: &SandboxRecord) -> Result<cri::PodSandboxStats, Status> {
        let guest = self.containers.sandbox_stats(&rec.id).await;
        let (usage, process_count, each) = match self.sandboxes.host_usage(rec) {
            None => {
                let (total, each) = guest?;
                (Some(usage_of_agent(&total)), Some(total.pids_current), each)
            }
            Some(host) => {
                let usage = host
                    .inspect_err(|e| {
                        tracing::warn!(sandbox_id = %rec.id, error = %e, "reading the pod's cgroup");
                    })
                    .ok();
                match guest {
                    Ok((total, each)) => (usage, Some(total.pids_current), each),
                    Err(e) => {
                        tracing::warn!(sandbox_id = %rec.id, error = %e, "container stats from the guest");
                        (usage, None, HashMap::new())
                    }
                }
            }
        };
        let containers: Vec<cri::ContainerStats> = self
            .containers
            .list()
            .iter()
            .filter(|c| c.sandbox_id == rec.id && c.state != ContainerState::Exited)
            .map(|c| stats_of(c, each.get(&c.id)))
            .collect();
        Ok(pod_sandbox_stats(
            rec,
            usage.as_ref(),
            process_count,
            containers,
        ))
    }
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let run = run_request(req.into_inner())?;
        // Not cancelled with the call: kubelet's deadline must not leave a
        // VMM booting with nobody to record or end it.
        let sandboxes = self.sandboxes.clone();
        let id = run_to_completion(async move { sandboxes.run(run).await }).await??;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        self.containers
            .stop_pod(&req.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        self.containers
            .remove_pod(&req.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        let rec = self.sandboxes.get(&req.pod_sandbox_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            let verbose = serde_json::json!({
                "backend": rec.backend.to_string(),
                "pid": rec.process.map(|p| p.pid),
                "agentSocket": rec.agent_socket,
                "dir": rec.dir,
                "reason": rec.reason,
                "hostname": rec.hostname,
                "netns": rec.netns,
                "network": rec.network,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&rec)),
            info,
            containers_statuses: self
                .containers
                .list()
                .iter()
                .filter(|c| c.sandbox_id == rec.id)
                .map(container_status)
                .collect(),
            timestamp: crate::id::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut items: Vec<cri::PodSandbox> = self
            .sandboxes
            .list()
            .iter()
            .filter(|r| matches_filter(r, &filter))
            .map(|r| cri::PodSandbox {
                id: r.id.clone(),
                metadata: Some(metadata(r)),
                state: state_of(r),
                created_at: r.created_at_ns,
                labels: to_hash(&r.labels),
                annotations: to_hash(&r.annotations),
                runtime_handler: r.handler.clone(),
            })
            .collect();
        items.sort_by_key(|p| p.created_at);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer: config is required"))?;
        // Not cancelled with the call: a create cut off half-way would
        // leave volumes bound and the name taken.
        let containers = self.containers.clone();
        let pod = req.pod_sandbox_id;
        let container_id =
            run_to_completion(async move { containers.create(&pod, config).await }).await??;
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        self.containers
            .start(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        let timeout = std::time::Duration::from_secs(req.timeout.max(0).unsigned_abs());
        self.containers.stop(&req.container_id, timeout).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        self.containers
            .remove(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut containers: Vec<cri::Container> = self
            .containers
            .list()
            .iter()
            .filter(|r| container_matches(r, &filter))
            .map(|r| cri::Container {
                id: r.id.clone(),
                pod_sandbox_id: r.sandbox_id.clone(),
                metadata: Some(container_metadata(r)),
                image: Some(image_spec(r)),
                image_ref: r.image_ref.clone(),
                state: container_state(r),
                created_at: r.created_at_ns,
                labels: to_hash(&r.labels),
                annotations: to_hash(&r.annotations),
                image_id: r.image_ref.clone(),
            })
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        let rec = self.containers.get(&req.container_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "sandboxID": rec.sandbox_id,
                "image": rec.image,
                "user": {"uid": rec.uid, "gid": rec.gid, "additionalGids": rec.additional_gids},
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status(&rec)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        let linux = req.linux.ok_or_else(|| {
            Status::invalid_argument("UpdateContainerResources: linux resources are required")
        })?;
        self.containers
            .update_resources(&req.container_id, &linux)
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        self.containers
            .reopen_log(&req.into_inner().container_id)
            .await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        if req.timeout < 0 {
            return Err(Status::invalid_argument(
                "ExecSync: timeout must not be negative",
            ));
        }
        let r = self
            .containers
            .exec_sync(
                &req.container_id,
                req.cmd,
                std::time::Duration::from_secs(req.timeout.unsigned_abs()),
            )
            .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        }))
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = req.into_inner();
        crate::container::check_program("Exec", &req.cmd)?;
        check_streams("Exec", req.tty, req.stdin, req.stdout, req.stderr)?;
        let rec = self.containers.get(&req.container_id)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "Exec: container {} is not running",
                rec.id
            )));
        }
        let url = self.stream_url(vmcri_streaming::Request::Exec(
            vmcri_streaming::ExecRequest {
                container_id: rec.id,
                cmd: req.cmd,
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        ))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = req.into_inner();
        check_streams("Attach", req.tty, req.stdin, req.stdout, req.stderr)?;
        let rec = self.containers.get(&req.container_id)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "Attach: container {} is not running",
                rec.id
            )));
        }
        if req.stdin && !rec.stdin {
            return Err(Status::invalid_argument(format!(
                "Attach: container {} was created without stdin",
                rec.id
            )));
        }
        if req.tty != rec.tty {
            return Err(Status::invalid_argument(format!(
                "Attach: tty={} but container {} was created with tty={}",
                req.tty, rec.id, rec.tty
            )));
        }
        let url = self.stream_url(vmcri_streaming::Request::Attach(
            vmcri_streaming::AttachRequest {
                container_id: rec.id,
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        ))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = req.into_inner();
        let rec = self.sandboxes.get(&req.pod_sandbox_id)?;
        if rec.state != SandboxState::Ready {
            return Err(Status::failed_precondition(format!(
                "PortForward: pod sandbox {} is not ready",
                rec.id
            )));
        }
        let ports = req
            .port
            .iter()
            .map(|p| {
                u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                    Status::invalid_argument(format!("PortForward: port {p} is not 1-65535"))
                })
            })
            .collect::<Result<Vec<u16>, Status>>()?;
        let url = self.stream_url(vmcri_streaming::Request::PortForward(
            vmcri_streaming::PortForwardRequest {
                sandbox_id: rec.id,
                ports,
            },
        ))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let rec = self.containers.get(&req.into_inner().container_id)?;
        let stats = if rec.state == ContainerState::Exited {
            HashMap::new()
        } else {
            self.containers
                .stats(&rec.sandbox_id, vec![rec.id.clone()])
                .await?
        };
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats_of(&rec, stats.get(&rec.id))),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let filter = cri::ContainerFilter {
            id: f.id,
            pod_sandbox_id: f.pod_sandbox_id,
            label_selector: f.label_selector,
            state: None,
        };
        // Exited containers have no cgroup left to read.
        let records: Vec<ContainerRecord> = self
            .containers
            .list()
            .into_iter()
            .filter(|r| container_matches(r, &filter) && r.state != ContainerState::Exited)
            .collect();
        let mut by_sandbox: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &records {
            by_sandbox
                .entry(r.sandbox_id.clone())
                .or_default()
                .push(r.id.clone());
        }
        // Every sandbox at once, each under its own deadline: one stalled
        // or unreachable guest must not delay or hide the others' stats.
        let replies = join_all(by_sandbox.into_iter().map(|(sandbox, ids)| async move {
            (self.containers.stats(&sandbox, ids).await, sandbox)
        }))
        .await;
        let mut all = HashMap::new();
        for (reply, sandbox) in replies {
            match reply {
                Ok(s) => all.extend(s),
                Err(e) => tracing::warn!(sandbox_id = %sandbox, error = %e, "container stats"),
            }
        }
        let stats = records
            .iter()
            .map(|r| stats_of(r, all.get(&r.id)))
            .collect();
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let sandbox = self
            .sandboxes
            .sandbox(&req.into_inner().pod_sandbox_id)?
            .ready()?;
        let stats = self.pod_stats(&sandbox.record).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let filter = cri::PodSandboxFilter {
            id: f.id,
            label_selector: f.label_selector,
            // Only running pods have stats to read.
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32,
            }),
        };
        // Every pod at once, each under its own deadline (see above).
        let pods: Vec<SandboxRecord> = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|rec| matches_filter(rec, &filter))
            .collect();
        let replies = join_all(pods.iter().map(|rec| self.pod_stats(rec))).await;
        let mut stats = Vec::new();
        for (reply, rec) in replies.into_iter().zip(&pods) {
            match reply {
                Ok(s) => stats.push(s),
                Err(e) => tracing::warn!(sandbox_id = %rec.id, error = %e, "pod sandbox stats"),
            }
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "runtime config updated");
        self.sandboxes.network().set_pod_cidr(cidr);
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            match self.sandboxes.network().ready() {
                Ok(()) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: true,
                    reason: String::new(),
                    message: String::new(),
                },
                Err((reason, message)) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: false,
                    reason: reason.into(),
                    message,
                },
            },
        ];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            let handlers: BTreeMap<&String, String> = self
                .config
                .handlers
                .iter()
                .map(|(k, h)| (k, h.backend.to_string()))
                .collect();
            let cidr = self.sandboxes.network().pod_cidr();
            let isolation = if self
                .config
                .handlers
                .values()
                .any(|h| !h.backend.isolates_with_a_vm())
            {
                "some handlers use the process backend: pods there have no VM isolation"
            } else {
                "every handler runs pods in microVMs"
            };
            let v = serde_json::json!({
                "handlers": handlers,
                "defaultHandler": self.config.default_handler,
                "podCIDR": cidr,
                "isolation": isolation,
            });
            info.insert("config".into(), v.to_string());
        }
        // The default handler also answers to the empty name, as kubelet
        // asks for it when a pod has no RuntimeClass.
        let runtime_handlers = std::iter::once(String::new())
            .chain(self.config.handlers.keys().cloned())
            .map(|name| cri::RuntimeHandler {
                name,
                features: Some(cri::RuntimeHandlerFeatures::default()),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: Some(cri::RuntimeFeatures::default()),
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented("CheckpointContainer"))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        // A subscriber too slow to keep up is told, not silently skipped.
        let lagged = |e| Status::data_loss(format!("event stream lagged: {e}"));
        let pods = BroadcastStream::new(self.sandboxes.subscribe()).map(move |item| match item {
            Ok(ev) => Ok(event(ev)),
            Err(e) => Err(lagged(e)),
        });
        let sandboxes = self.sandboxes.clone();
        let containers =
            BroadcastStream::new(self.containers.subscribe()).map(move |item| match item {
                Ok(ev) => {
                    let sandbox = sandboxes.get(&ev.record.sandbox_id).ok();
                    Ok(container_event(ev, sandbox))
                }
                Err(e) => Err(lagged(e)),
            });
        Ok(Response::new(Box::pin(pods.merge(containers))))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented("ListMetricDescriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented("ListPodSandboxMetrics"))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}
