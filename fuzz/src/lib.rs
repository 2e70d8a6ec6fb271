//! Fuzz targets for the parts of vmcri that read what a guest, a remote
//! client or a registry hands them.
//!
//! Each target is a module with `run(data: &[u8])`, which panics on a
//! finding. The AFL++ binaries in `src/bin/` call it (built by `fuzz/run`
//! with `cargo afl`); `tests/corpus.rs` replays every file of
//! `fuzz/corpus/<target>/` through it as an ordinary test, so the seeds
//! and every past finding stay regression tests without afl.
//!
//! - [`vsock`]: the vsock muxer's TX/RX paths and connection state
//!   machine, driven through guest-memory virtqueues and host sockets;
//! - [`fs`]: virtio-fs requests against a temporary shared directory,
//!   checking nothing outside it is reached;
//! - [`mmio`]: virtio-mmio register sequences (features, queues,
//!   activate, reset) in front of a checking device;
//! - [`net`]: the virtio-net device's TX and RX queue work against a
//!   socket-pair tap, checking frames cross whole and in order;
//! - [`spdy`]: the SPDY/3 frame decoder and header inflation;
//! - [`unpack`]: OCI layer unpacking, checking nothing lands outside the
//!   layer directory.

pub mod fs;
pub mod input;
pub mod mmio;
pub mod net;
pub mod oracle;
pub mod spdy;
pub mod unpack;
pub mod virtq;
pub mod vsock;

/// A target's entry point: runs one input, panics on a finding.
pub type Target = fn(&[u8]);

/// Every target by name (its corpus directory and binary name).
pub const TARGETS: &[(&str, Target)] = &[
    ("vsock", vsock::run),
    ("fs", fs::run),
    ("mmio", mmio::run),
    ("net", net::run),
    ("spdy", spdy::run),
    ("unpack", unpack::run),
];
