//! vmcri's agent API: the generated protobuf types and tonic client and
//! server for `vmcri.agent.v1`.

/// The agent API, version 1.
pub mod agent {
    /// Version 1 of the API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("vmcri.agent.v1");
    }
}

/// Major version of the agent API this crate speaks.
pub const AGENT_API_VERSION: u32 = 1;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
