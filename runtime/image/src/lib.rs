//! Image layers for vmcri: the host side of the image service. Layers are
//! unpacked once into their own directories, which the pod VMs later see
//! read-only as overlay lower layers.

pub mod content;
pub mod hashing;
pub mod limits;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod tar_guard;
pub mod unpack;
