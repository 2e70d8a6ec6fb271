//! virtio-net (virtio 1.1, 5.1) over a tap the runtime opened in the
//! pod's network namespace and handed to the VMM by fd: the VMM opens no
//! tun device and needs no network namespace of its own.
//!
//! - `config`: the `--net fd=N,mac=M[,mtu=U]` argument;
//! - `tap`: the host side (a validated tap, or a seqpacket socket in
//!   tests and the fuzzer);
//! - `header`: feature bits and the 12-byte `virtio_net_hdr_v1`, passed
//!   through unchanged both ways (the tap speaks the same header);
//! - `tx`, `rx`: one direction each; `queues`: both queues and the one
//!   frame that may wait for guest buffers, stepped by the loop;
//! - `device`: the virtio device and its loop on the `net` thread
//!   (seccomp role `Net`).
//! - `warn`: the rate limit on warnings a guest can cause.

pub mod config;
pub mod device;
pub mod header;
pub mod queues;
pub mod rx;
pub mod tap;
pub mod tx;
pub mod warn;

pub use config::{MacAddr, NetSpec, NetSpecError};
pub use device::Net;
pub use queues::{NetQueues, Step};
pub use tap::{Tap, TapError};

#[cfg(test)]
mod tests;
