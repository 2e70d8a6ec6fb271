//! vmcri's CRI daemon: RuntimeService and ImageService over a Unix
//! socket, pod sandboxes as microVMs or host processes.
//!
//! Layers, top down (ARCHITECTURE.md traces a call through them):
//! [`cri`] (thin tonic handlers, conversions, the one error mapping) →
//! [`container`], [`sandbox`] and [`images`] (the services) →
//! [`backend`] (microVM or host process) and [`store`] (records on disk).

pub mod backend;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod cri;
pub mod hostfs;
pub mod id;
pub mod images;
pub mod lock;
pub mod network;
pub mod sandbox;
pub mod socket;
pub mod store;
pub mod streams;
#[cfg(test)]
pub(crate) mod testing;
