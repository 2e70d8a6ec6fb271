//! The device's queue work, without threads or epoll: the `net` thread's
//! loop drives it, and so do the tests and the fuzzer, step by step.

use super::header::{HDR_LEN, MAX_FRAME, VIRTIO_NET_F_MRG_RXBUF};
use super::rx::{deliver, Delivery};
use super::tap::Tap;
use super::tx::send_chain;
use super::warn::RateLimitedWarn;
use std::io;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Index of the receive queue.
pub const RX: usize = 0;
/// Index of the transmit queue.
pub const TX: usize = 1;
/// Most TX chains or RX frames served per step, so neither direction
/// (nor the stop request) waits on the other for long.
pub const BUDGET: usize = 256;

/// Retries in a row before a frame waits for a notification: a guest
/// whose avail index runs ahead of its ring would otherwise keep us here.
const MAX_RETRIES: usize = 8;

/// What a step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Step {
    /// Buffers were used and the guest wants an interrupt for them.
    pub notify: bool,
    /// The budget ran out with work left: step again without waiting.
    pub more: bool,
}

/// The two queues, the tap, and the one frame that may wait for RX
/// buffers.
pub struct NetQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    tap: Arc<Tap>,
    mergeable: bool,
    /// One frame's room; `pending` bytes of it hold a frame not yet in
    /// the guest.
    frame: Box<[u8]>,
    pending: Option<usize>,
    /// Out of RX buffers with a frame pending: the tap is not read until
    /// the guest notifies the RX queue.
    rx_blocked: bool,
    /// The tap's far side is gone (or reads fail for good): stop reading.
    tap_gone: bool,
    tx_warn: RateLimitedWarn,
    rx_warn: RateLimitedWarn,
    tap_warn: RateLimitedWarn,
}

impl NetQueues {
    /// Queue work for the driver's `rx` and `tx` with the acked
    /// `features`.
    pub fn new(mem: GuestMemoryMmap, rx: Queue, tx: Queue, tap: Arc<Tap>, features: u64) -> Self {
        NetQueues {
            mem,
            rx,
            tx,
            tap,
            mergeable: features & VIRTIO_NET_F_MRG_RXBUF != 0,
            frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            pending: None,
            rx_blocked: false,
            tap_gone: false,
            tx_warn: RateLimitedWarn::new("malformed TX chain dropped"),
            rx_warn: RateLimitedWarn::new("RX"),
            tap_warn: RateLimitedWarn::new("frame from the tap dropped"),
        }
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// True while a frame waits for RX buffers (the tap is not read).
    pub fn rx_blocked(&self) -> bool {
        self.rx_blocked
    }

    /// True if a frame from the tap waits for the guest.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// True once the tap's far side is gone.
    pub fn tap_gone(&self) -> bool {
        self.tap_gone
    }

    /// Whether the loop should wait for the tap to be readable.
    pub fn wants_tap(&self) -> bool {
        !self.rx_blocked && !self.tap_gone
    }

    /// The driver notified the RX queue: it may have added buffers.
    pub fn rx_notified(&mut self) {
        self.rx_blocked = false;
    }

    /// Sends what the guest queued on TX.
    pub fn process_tx(&mut self) -> Step {
        let mem = self.mem.clone();
        let mut used = false;
        let mut served = 0usize;
        let mut more = false;
        'ring: loop {
            // Errors here mean the ring left guest memory; the pop below
            // then finds nothing.
            let _ = self.tx.disable_notification(&mem);
            let mut popped = false;
            while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
                popped = true;
                let head = chain.head_index();
                if let Err(e) = send_chain(&self.tap, &mem, chain) {
                    self.tx_warn.warn(&e);
                }
                if let Err(e) = self.tx.add_used(&mem, head, 0) {
                    self.tx_warn.warn(&e);
                    break 'ring;
                }
                used = true;
                served += 1;
                if served >= BUDGET {
                    // Notifications stay off: the caller steps again.
                    more = true;
                    break 'ring;
                }
            }
            // Buffers added after the pop and before this are served now;
            // but an avail index further ahead than the ring is long
            // pops nothing yet always looks new: that is no reason to
            // go round again.
            match self.tx.enable_notification(&mem) {
                Ok(true) if popped => continue,
                Ok(true) => {
                    self.tx_warn
                        .warn(&"the TX avail index runs ahead of the ring");
                    break;
                }
                _ => break,
            }
        }
        Step {
            notify: used && self.tx.needs_notification(&mem).unwrap_or(true),
            more,
        }
    }

    /// Moves frames from the tap into the guest's RX buffers until the
    /// tap has none, the guest has no room, or the budget is spent.
    pub fn process_rx(&mut self) -> Step {
        if !self.wants_tap() {
            return Step::default();
        }
        let mem = self.mem.clone();
        let mut used = false;
        let mut more = false;
        let mut frames = 0usize;
        let mut retries = 0usize;
        // Notifications matter only while blocked; they are turned back
        // on then.
        let _ = self.rx.disable_notification(&mem);
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if frames >= BUDGET {
                        more = true;
                        break;
                    }
                    match self.tap.read_frame(&mut self.frame) {
                        Ok(0) => {
                            tracing::error!("virtio-net: the tap's far side is gone; RX stops");
                            self.tap_gone = true;
                            break;
                        }
                        Ok(n) if n < HDR_LEN => {
                            frames += 1;
                            self.tap_warn
                                .warn(&format_args!("{n} bytes, shorter than the vnet header"));
                            continue;
                        }
                        Ok(n) => {
                            frames += 1;
                            self.pending = Some(n);
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "virtio-net: reading the tap failed; RX stops");
                            self.tap_gone = true;
                            break;
                        }
                    }
                }
            };
            let frame = &mut self.frame[..len];
            match deliver(
                &mut self.rx,
                &mem,
                frame,
                self.mergeable,
                &mut self.rx_warn,
                &mut used,
            ) {
                Delivery::Delivered | Delivery::Dropped => {
                    self.pending = None;
                    retries = 0;
                }
                Delivery::Retry if retries < MAX_RETRIES => retries += 1,
                Delivery::Retry | Delivery::NoRoom => {
                    self.rx_blocked = true;
                    break;
                }
            }
        }
        Step {
            notify: used && self.rx.needs_notification(&mem).unwrap_or(true),
            more,
        }
    }
}
