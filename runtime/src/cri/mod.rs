//! The CRI v1 services, as thin tonic handlers: each turns its request
//! into a call of the [`crate::sandbox`], [`crate::container`] or
//! [`crate::images`] service and the answer back into CRI messages
//! ([`convert`]); every domain error becomes a gRPC status in one place
//! ([`errors`]). What is not supported (checkpoints, metrics) answers
//! Unimplemented with a message; nothing silently succeeds.

mod convert;
mod errors;
mod image;
mod runtime;
#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::container::Containers;
use crate::images::Images;
use crate::sandbox::Sandboxes;
use k8s_cri::v1 as cri;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::Status;

/// Version reported to kubelet.
pub const RUNTIME_NAME: &str = "vmcri";
/// The CRI API version we serve.
pub const CRI_API_VERSION: &str = "v1";

/// The RuntimeService and ImageService.
pub struct Cri {
    config: Arc<Config>,
    sandboxes: Arc<Sandboxes>,
    containers: Arc<Containers>,
    images: Arc<Images>,
    streaming: Arc<vmcri_streaming::Server>,
}

impl Cri {
    /// Serves `sandboxes`, their containers and `images` under `config`.
    pub fn new(
        config: Arc<Config>,
        sandboxes: Arc<Sandboxes>,
        containers: Arc<Containers>,
        images: Arc<Images>,
        streaming: Arc<vmcri_streaming::Server>,
    ) -> Self {
        Cri {
            config,
            sandboxes,
            containers,
            images,
            streaming,
        }
    }

    /// A one-time streaming URL for `req`.
    fn stream_url(&self, req: vmcri_streaming::Request) -> Result<String, Status> {
        self.streaming.url(req).map_err(|e| match e {
            vmcri_streaming::TokenError::Full => Status::resource_exhausted(e.to_string()),
            other => Status::internal(other.to_string()),
        })
    }
}

/// Runs `f` on its own task, so that a client that gives up (kubelet's
/// deadline) does not cancel it half-way; its result still reaches a
/// caller that waits.
async fn run_to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(f)
        .await
        .map_err(|e| Status::internal(format!("the operation's task failed: {e}")))
}

/// An Unimplemented status naming what is missing.
fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "vmcri {}: {what} is not implemented yet",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The stream of GetContainerEvents.
type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;
