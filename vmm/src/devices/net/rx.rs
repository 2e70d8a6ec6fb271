//! Tap to guest: one frame at a time into the guest's RX chains, spread
//! over several with VIRTIO_NET_F_MRG_RXBUF (`num_buffers` says how
//! many). Nothing is used until the whole frame fits: if the guest has
//! too few buffers, the chains taken are given back (`next_avail` rolls
//! back) and the frame waits.

use super::header::{HDR_LEN, NUM_BUFFERS_OFFSET};
use super::warn::RateLimitedWarn;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It is in the guest's buffers.
    Delivered,
    /// It can never fit the guest's buffers as posted; it was dropped.
    Dropped,
    /// Too few buffers; the guest added some meanwhile: try again.
    Retry,
    /// Too few buffers; the RX queue's next notification says more came.
    NoRoom,
}

/// A chain's device-writable pieces and their total.
struct RxChain {
    head: u16,
    pieces: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// Checks a popped RX chain: device-writable, inside guest memory, and
/// big enough (the first of a frame must hold the whole header).
fn rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    first: bool,
) -> Result<RxChain, &'static str> {
    let head = chain.head_index();
    let mut pieces = Vec::new();
    let mut capacity = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            return Err("a device-readable descriptor in an RX chain");
        }
        let len = usize::try_from(desc.len()).map_err(|_| "a descriptor too long")?;
        if !mem.check_range(desc.addr(), len) {
            return Err("an RX descriptor outside guest memory");
        }
        capacity = capacity.saturating_add(len);
        pieces.push((desc.addr(), len));
    }
    let least = if first { HDR_LEN } else { 1 };
    if capacity < least {
        return Err("an RX chain too small for the header");
    }
    Ok(RxChain {
        head,
        pieces,
        capacity,
    })
}

/// Puts `frame` (vnet header first) into the guest's RX buffers. Sets
/// `*used` if anything went onto the used ring. A malformed chain that
/// would be the frame's first is returned at once with length 0; one
/// after good chains ends the attempt (a frame's buffers are consecutive
/// on the used ring): the frame is dropped and the good chains kept.
pub fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    warn: &mut RateLimitedWarn,
    used: &mut bool,
) -> Delivery {
    let len = frame.len();
    let mut start = queue.next_avail();
    let mut chains: Vec<RxChain> = Vec::new();
    let mut capacity = 0usize;
    let mut popped: u16 = 0;
    while capacity < len {
        if !mergeable && !chains.is_empty() {
            queue.set_next_avail(start);
            warn.warn(&format_args!(
                "a {len}-byte frame does not fit a {capacity}-byte buffer (no mergeable buffers); dropped"
            ));
            return Delivery::Dropped;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            if popped >= queue.size() {
                queue.set_next_avail(start);
                warn.warn(&format_args!(
                    "a {len}-byte frame does not fit the whole RX ring ({capacity} bytes); dropped"
                ));
                return Delivery::Dropped;
            }
            // Ask for a notification before giving the chains back: with
            // EVENT_IDX, avail_event must be past what we have seen, or
            // the guest's next buffers would not notify us.
            let fresh = queue.enable_notification(mem);
            queue.set_next_avail(start);
            return match fresh {
                Ok(true) => Delivery::Retry,
                _ => Delivery::NoRoom,
            };
        };
        popped = popped.saturating_add(1);
        let head = chain.head_index();
        match rx_chain(mem, chain, chains.is_empty()) {
            Ok(c) => {
                capacity = capacity.saturating_add(c.capacity);
                chains.push(c);
            }
            Err(why) if chains.is_empty() => {
                warn.warn(&format_args!("{why}; returned empty"));
                if queue.add_used(mem, head, 0).is_err() {
                    queue.set_next_avail(start);
                    return Delivery::NoRoom;
                }
                *used = true;
                start = queue.next_avail();
            }
            Err(why) => {
                queue.set_next_avail(start);
                warn.warn(&format_args!(
                    "{why}, amid the buffers of a {len}-byte frame; the frame is dropped"
                ));
                return Delivery::Dropped;
            }
        }
    }
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&count.to_le_bytes());
    let mut off = 0usize;
    for chain in chains {
        let mut written = 0usize;
        for (addr, piece) in chain.pieces {
            if off == len {
                break;
            }
            // A zero-length descriptor holds nothing: skip it, do not end
            // the frame there (that delivered a frame cut short).
            let n = piece.min(len - off);
            if n == 0 {
                continue;
            }
            // Checked in rx_chain; guest memory does not shrink.
            if mem.write_slice(&frame[off..off + n], addr).is_err() {
                break;
            }
            off += n;
            written += n;
        }
        let written = u32::try_from(written).unwrap_or(u32::MAX);
        if queue.add_used(mem, chain.head, written).is_err() {
            warn.warn(&"the RX used ring is outside guest memory");
            break;
        }
        *used = true;
    }
    Delivery::Delivered
}
