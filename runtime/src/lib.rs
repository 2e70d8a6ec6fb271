//! vmcri's CRI daemon: RuntimeService and ImageService over a Unix
//! socket, pod sandboxes as microVMs or host processes.

pub mod backend;
pub mod config;
pub mod container;
pub mod cri;
pub mod hostfs;
pub mod images;
pub mod logs;
pub mod pod_files;
pub mod process;
pub mod sandbox;
pub mod shared;
pub mod socket;
pub mod spec;
pub mod store;
pub mod streams;
#[cfg(test)]
pub(crate) mod testing;
