//! The driver's side of a split virtqueue in guest memory: what the guest
//! kernel would write, so targets can hand devices descriptor chains built
//! from fuzz input.
//!
//! Each chain head owns a block of [`SLOT_DESCS`] descriptor-table entries
//! (slot `k` starts at `k * SLOT_DESCS`); slots are reused round-robin,
//! which is safe while at most `size / SLOT_DESCS` chains are outstanding
//! and the device completes them in order, as every device here does.
//! Unlike virtio-queue's `MockSplitQueue`, the rings wrap, so an input
//! may queue any number of chains.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor-table entries per chain slot: the longest chain built.
pub const SLOT_DESCS: u16 = 4;
/// VRING_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT.
pub const F_INDIRECT: u16 = 4;

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `F_*` flags.
    pub flags: u16,
    /// Next descriptor, when `F_NEXT` is set.
    pub next: u16,
}

/// One used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head index of the returned chain.
    pub id: u32,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A split virtqueue as the driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Lays a queue of `size` entries (a power of two, at least
    /// `SLOT_DESCS`) out at `base` and zeroes its rings.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; usize::try_from(end - base).expect("a small queue")];
        mem.write_slice(&zeros, GuestAddress(base))
            .expect("queue inside guest memory");
        DriverQueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Bytes the rings take from `base`.
    pub fn footprint(size: u16) -> u64 {
        let used = (16 * u64::from(size) + 6 + 2 * u64::from(size)).next_multiple_of(4);
        used + 6 + 8 * u64::from(size)
    }

    /// The queue as the device gets it after the driver set it up.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("a valid queue size");
        q.set_size(self.size);
        let split = |a: u64| {
            let lo = u32::try_from(a & 0xffff_ffff).expect("masked to 32 bits");
            let hi = u32::try_from(a >> 32).expect("shifted to 32 bits");
            (Some(lo), Some(hi))
        };
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Number of chain slots.
    pub fn slots(&self) -> u16 {
        self.size / SLOT_DESCS
    }

    /// The slot the next [`DriverQueue::push`] uses.
    pub fn next_slot(&self) -> u16 {
        self.avail_idx % self.slots()
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// The driver's avail index: chains made available so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available and not yet returned.
    pub fn outstanding(&self, mem: &GuestMemoryMmap) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx(mem))
    }

    /// True if a chain slot is free.
    pub fn has_room(&self, mem: &GuestMemoryMmap) -> bool {
        self.outstanding(mem) < self.slots()
    }

    /// Writes `descs` (at most [`SLOT_DESCS`]) into the next slot and
    /// makes the chain available; returns the slot, or `None` if every
    /// slot is in use. With `link`, each descriptor but the last gets
    /// `F_NEXT` and points at the following one; without, flags and next
    /// are written as given (chains may then run anywhere).
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[Desc], link: bool) -> Option<u16> {
        if !self.has_room(mem) || descs.is_empty() {
            return None;
        }
        let slot = self.next_slot();
        let head = slot * SLOT_DESCS;
        for (i, d) in descs.iter().take(usize::from(SLOT_DESCS)).enumerate() {
            let i = u16::try_from(i).expect("at most SLOT_DESCS");
            let mut d = *d;
            if link {
                let last = usize::from(i) + 1 == descs.len().min(usize::from(SLOT_DESCS));
                if last {
                    d.flags &= !F_NEXT;
                    d.next = 0;
                } else {
                    d.flags |= F_NEXT;
                    d.next = head + i + 1;
                }
            }
            let at = GuestAddress(self.desc + 16 * u64::from(head + i));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            mem.write_slice(&raw, at)
                .expect("descriptor table in memory");
        }
        let ring_at = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(ring_at))
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail ring in memory");
        Some(slot)
    }

    /// Used elements the device returned since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<Used> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id = mem
                .read_obj::<u32>(GuestAddress(at))
                .map_or(0, u32::from_le);
            let len = mem
                .read_obj::<u32>(GuestAddress(at + 4))
                .map_or(0, u32::from_le);
            out.push(Used { id, len });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The slot a used element's head index belongs to.
    pub fn slot_of(&self, used: Used) -> Option<u16> {
        let id = u16::try_from(used.id).ok()?;
        (id < self.size && id % SLOT_DESCS == 0).then_some(id / SLOT_DESCS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_wrap_and_chains_come_out_as_pushed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut dq = DriverQueue::new(&mem, 0, 16);
        let mut q = dq.device_queue();
        assert!(q.is_valid(&mem));
        for round in 0..40u32 {
            let descs = [
                Desc {
                    addr: 0x8000,
                    len: round,
                    flags: 0,
                    next: 0,
                },
                Desc {
                    addr: 0x9000,
                    len: 7,
                    flags: F_WRITE,
                    next: 0,
                },
            ];
            dq.push(&mem, &descs, true).unwrap();
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let head = chain.head_index();
            let lens: Vec<u32> = chain.map(|d| d.len()).collect();
            assert_eq!(lens, vec![round, 7]);
            q.add_used(&mem, head, 3).unwrap();
            let used = dq.take_used(&mem);
            assert_eq!(used.len(), 1);
            assert_eq!(dq.slot_of(used[0]), Some(u16::try_from(round % 4).unwrap()));
        }
    }
}
