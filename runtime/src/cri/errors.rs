//! The one mapping from domain errors to gRPC status codes.

use crate::backend::BackendError;
use crate::cgroup::CgroupError;
use crate::container::ContainerError;
use crate::images::ImageError;
use crate::network::cni::CniError;
use crate::network::NetworkError;
use crate::sandbox::SandboxError;
use tonic::Status;
use vmcri_image::pull::PullError;

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Status {
        let msg = e.to_string();
        match e {
            ContainerError::Invalid(_) => Status::invalid_argument(msg),
            ContainerError::Unsupported(_) => Status::unimplemented(msg),
            ContainerError::NotFound(_) => Status::not_found(msg),
            ContainerError::Exists(_) => Status::already_exists(msg),
            ContainerError::State(_) => Status::failed_precondition(msg),
            ContainerError::Timeout(_) => Status::deadline_exceeded(msg),
            ContainerError::Sandbox(e) => e.into(),
            ContainerError::Image(e) => (*e).into(),
            // The agent's own verdict (InvalidArgument, NotFound, ...) stands.
            ContainerError::Agent(vmcri_agent_client::ClientError::Rpc { status, .. }) => {
                Status::new(status.code(), format!("agent: {}", status.message()))
            }
            ContainerError::Agent(_) => Status::unavailable(msg),
            ContainerError::Store(_) | ContainerError::Io(_) => Status::internal(msg),
        }
    }
}

impl From<SandboxError> for Status {
    fn from(e: SandboxError) -> Status {
        let msg = e.to_string();
        match e {
            SandboxError::Invalid(_) => Status::invalid_argument(msg),
            SandboxError::NotFound(_) => Status::not_found(msg),
            SandboxError::Exists { .. } => Status::already_exists(msg),
            SandboxError::NotReady { .. } => Status::failed_precondition(msg),
            SandboxError::Backend(BackendError::Refused(_)) => Status::invalid_argument(msg),
            SandboxError::OutOfMemory(_) => Status::resource_exhausted(msg),
            SandboxError::Backend(BackendError::Expose(_)) => Status::internal(msg),
            SandboxError::Backend(_) => Status::unavailable(msg),
            SandboxError::Cgroup(e) => Status::new(Status::from(e).code(), msg),
            SandboxError::Store(_) => Status::internal(msg),
            SandboxError::Network(e) => Status::new(Status::from(e).code(), msg),
        }
    }
}

impl From<NetworkError> for Status {
    fn from(e: NetworkError) -> Status {
        let msg = e.to_string();
        match e {
            NetworkError::NotReady(_) => Status::failed_precondition(msg),
            NetworkError::Invalid(_) => Status::invalid_argument(msg),
            // The config names a plugin that is not installed.
            NetworkError::Cni(CniError::NotFound { .. }) => Status::failed_precondition(msg),
            // Our own kept state no longer reads.
            NetworkError::Cni(CniError::Cache(_)) => Status::internal(msg),
            // A plugin failing (or timing out) may succeed on kubelet's retry.
            NetworkError::Cni(_) => Status::unavailable(msg),
            NetworkError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<CgroupError> for Status {
    fn from(e: CgroupError) -> Status {
        let msg = e.to_string();
        match e {
            CgroupError::InvalidPath(_) | CgroupError::InvalidResources(_) => {
                Status::invalid_argument(msg)
            }
            // The pod's processes are still dying: a retry succeeds.
            CgroupError::Busy { .. } => Status::unavailable(msg),
            CgroupError::NoHierarchy(_) => Status::failed_precondition(msg),
            CgroupError::Io { .. } | CgroupError::Parse { .. } => Status::internal(msg),
        }
    }
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Status {
        let msg = e.to_string();
        match e {
            ImageError::Reference(_) => Status::invalid_argument(msg),
            ImageError::Pull(PullError::Unauthorized { .. }) => Status::unauthenticated(msg),
            ImageError::Pull(PullError::Registry { .. }) => Status::unavailable(msg),
            ImageError::Pull(PullError::Invalid { .. }) => Status::failed_precondition(msg),
            // Too large, or too little disk left: every bound a pull hits.
            ImageError::Pull(PullError::Exhausted { .. }) => Status::resource_exhausted(msg),
            ImageError::Pull(PullError::Content(_))
            | ImageError::Content(_)
            | ImageError::Store(_)
            | ImageError::Io { .. } => Status::internal(msg),
        }
    }
}
