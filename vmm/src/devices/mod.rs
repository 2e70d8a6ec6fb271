//! Emulated devices and the buses that route guest accesses to them.

/// Logs a warning the guest can trigger at will, at an exponentially
/// thinning rate (1st, 2nd, 4th, 8th... occurrence of each call site), so a
/// hostile guest cannot flood the host's logs.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(occurrences = n, $($arg)+);
        }
    }};
}

pub mod bus;
pub mod fs;
pub mod fs_policy;
pub mod legacy;
pub mod net;
pub mod rng;
pub mod serial;
pub mod thread;
pub mod virtio_mmio;
pub mod vsock;

use std::io;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Something a device asks of the whole VM after a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest pulled the reset line: it rebooted or powered off.
    Reset,
    /// The guest reported a kernel panic.
    Panic,
}

/// An interrupt line into KVM's in-kernel irqchip, through an irqfd.
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine {
    /// A new, unregistered line for `gsi`.
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(IrqLine {
            evt: EventFd::new(EFD_NONBLOCK)?,
            gsi,
        })
    }

    /// The eventfd KVM listens on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The GSI the line is wired to.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Raises the (edge-triggered) interrupt.
    pub fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}
