//! The virtio-net device's queue work: guest TX chains (well-formed or
//! raw descriptors, any header), guest RX buffers of any shape, and
//! frames from the tap side of any length, interleaved with the device's
//! steps. The tap is one end of a seqpacket socket pair.
//!
//! Checked besides panics: every TX chain is returned with length 0, and
//! a well-formed one reaches the tap byte for byte (nothing else does);
//! every RX buffer used fits what was posted, frames come out whole, in
//! order, with `num_buffers` right (1 without mergeable buffers) and
//! their own bytes; a device that is not waiting for buffers leaves
//! nothing unread on the tap.

use crate::input::Input;
use crate::virtq::{Desc, DriverQueue, F_WRITE};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmcri_vmm::devices::net::header::{
    HDR_LEN, MAX_FRAME, NUM_BUFFERS_OFFSET, VIRTIO_NET_F_MRG_RXBUF,
};
use vmcri_vmm::devices::net::{NetQueues, Tap};

const QUEUE_SIZE: u16 = 64;
const RXQ: u64 = 0;
const TXQ: u64 = 0x2000;
const RX_DATA: u64 = 0x1_0000;
/// Per RX slot: one maximal frame and a gap.
const RX_SLOT: u64 = 0x1_0100;
const TX_DATA: u64 = 0x12_0000;
/// Per TX slot: one maximal frame, gaps, and a little over.
const TX_SLOT: u64 = 0x1_0200;
const MEM_SIZE: usize = 0x24_0000;
/// Bounds on one input's work, so each run stays fast.
const MAX_OPS: usize = 256;
/// How the input's first byte picks the features.
const FEATURE_MRG: u8 = 1;
const FEATURE_EVENT_IDX: u8 = 2;

struct World {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    net: NetQueues,
    peer: UnixDatagram,
    mergeable: bool,
    /// What each RX slot was posted with.
    rx_posted: Vec<Vec<Desc>>,
    /// Frames sent on the tap side, not yet seen or skipped in the guest.
    inbound: VecDeque<Vec<u8>>,
    /// Used RX elements of a frame still being gathered.
    partial: Vec<u8>,
    partial_left: u16,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut w = World::new(input.u8());
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % 8 {
            0 | 1 => w.send_frame(&mut input),
            2 => w.send_raw(&mut input),
            3 => w.post_rx(&mut input),
            4 | 5 => w.host_send(&mut input),
            6 => w.notify_rx(),
            _ => w.rx_step(),
        }
    }
    w.finish();
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-int array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both fds are new and ours alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl World {
    fn new(features: u8) -> World {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let rx = DriverQueue::new(&mem, RXQ, QUEUE_SIZE);
        let tx = DriverQueue::new(&mem, TXQ, QUEUE_SIZE);
        let (mut rxq, mut txq): (Queue, Queue) = (rx.device_queue(), tx.device_queue());
        let event_idx = features & FEATURE_EVENT_IDX != 0;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        let mergeable = features & FEATURE_MRG != 0;
        let acked = if mergeable { VIRTIO_NET_F_MRG_RXBUF } else { 0 };
        let (ours, theirs) = seqpacket_pair();
        let tap = Tap::from_seqpacket(ours).expect("a seqpacket tap");
        let peer = UnixDatagram::from(theirs);
        peer.set_nonblocking(true).expect("nonblocking peer");
        let net = NetQueues::new(mem.clone(), rxq, txq, Arc::new(tap), acked);
        let slots = usize::from(rx.slots());
        World {
            mem,
            rx,
            tx,
            net,
            peer,
            mergeable,
            rx_posted: vec![Vec::new(); slots],
            inbound: VecDeque::new(),
            partial: Vec::new(),
            partial_left: 0,
        }
    }

    /// A header (any bytes) and a frame in up to three descriptors,
    /// sometimes one marked device-writable.
    fn send_frame(&mut self, input: &mut Input) {
        let mut bytes = input.array::<HDR_LEN>().to_vec();
        let sel = input.u8();
        if sel & 0x80 != 0 {
            // Large frames without large inputs: one byte repeated, up to
            // a little past the limit.
            let n = (usize::from(input.u16()) + 16).min(MAX_FRAME + 8 - HDR_LEN);
            bytes.extend(std::iter::repeat_n(sel, n));
        } else {
            bytes.extend_from_slice(input.short_bytes());
        }
        if sel & 0x40 != 0 {
            // Shorter than a header now and then.
            bytes.truncate(usize::from(sel & 0xf));
        }
        let cuts = input.u8();
        let mut pieces = Vec::new();
        let mut rest = &bytes[..];
        for k in 0..2 {
            if cuts & (1 << k) != 0 && !rest.is_empty() {
                let at = usize::from(input.u16()) % (rest.len() + 1);
                let (a, b) = rest.split_at(at);
                pieces.push(a);
                rest = b;
            }
        }
        pieces.push(rest);
        if !self.tx.has_room(&self.mem) {
            return;
        }
        let mut addr = TX_DATA + u64::from(self.tx.next_slot()) * TX_SLOT;
        let mut descs = Vec::new();
        let mut writable = false;
        for (k, p) in pieces.iter().enumerate() {
            self.mem
                .write_slice(p, GuestAddress(addr))
                .expect("slot inside guest memory");
            let flags = if cuts & (0x10 << k) != 0 { F_WRITE } else { 0 };
            writable |= flags != 0;
            descs.push(Desc {
                addr,
                len: u32::try_from(p.len()).expect("a frame under 4 GiB"),
                flags,
                next: 0,
            });
            addr += p.len() as u64 + 8;
        }
        self.tx.push(&self.mem, &descs, true);
        let valid = !writable && (HDR_LEN..=MAX_FRAME).contains(&bytes.len());
        self.tx_step(valid.then_some(bytes));
    }

    /// A chain of raw descriptors: any address, length, flags and next.
    fn send_raw(&mut self, input: &mut Input) {
        let n = 1 + usize::from(input.u8() % 4);
        let base = TX_DATA + u64::from(self.tx.next_slot()) * TX_SLOT;
        let descs: Vec<Desc> = (0..n)
            .map(|_| {
                let sel = input.u8();
                Desc {
                    addr: if sel & 1 == 0 {
                        base + u64::from(input.u16())
                    } else {
                        input.u64()
                    },
                    len: if sel & 2 == 0 {
                        u32::from(input.u16())
                    } else {
                        input.u32()
                    },
                    flags: input.u16() & 0x7,
                    next: input.u16(),
                }
            })
            .collect();
        self.tx.push(&self.mem, &descs, false);
        self.tx_step(None);
    }

    /// Steps TX; `expect` is the frame that must reach the tap, if the
    /// chain was well-formed.
    fn tx_step(&mut self, expect: Option<Vec<u8>>) {
        self.net.process_tx();
        assert_eq!(
            self.tx.outstanding(&self.mem),
            0,
            "process_tx left TX chains unreturned"
        );
        for used in self.tx.take_used(&self.mem) {
            assert_eq!(used.len, 0, "the device wrote into a TX chain");
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME + 64];
        loop {
            match self.peer.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        match expect {
            Some(frame) => assert_eq!(got, vec![frame], "the tap did not get the frame"),
            // A raw chain may happen to be well-formed; at most one frame.
            None => assert!(got.len() <= 1, "one chain sent {} frames", got.len()),
        }
    }

    /// RX chains of chosen sizes over up to three descriptors; the guest
    /// notifies or not.
    fn post_rx(&mut self, input: &mut Input) {
        let chains = 1 + input.u8() % 4;
        for _ in 0..chains {
            if !self.rx.has_room(&self.mem) {
                break;
            }
            let slot = self.rx.next_slot();
            let mut addr = RX_DATA + u64::from(slot) * RX_SLOT;
            let n = 1 + input.u8() % 3;
            let mut descs = Vec::new();
            let mut room = RX_SLOT - 0x100;
            for _ in 0..n {
                let sel = input.u8();
                let len = match (sel & 0x3f) % 6 {
                    0 => 1526,
                    1 => 4096,
                    2 => u32::try_from(MAX_FRAME).unwrap_or(u32::MAX),
                    3 => u32::from(input.u8()),
                    _ => u32::from(input.u16()),
                }
                .min(u32::try_from(room).unwrap_or(0));
                room -= u64::from(len);
                // Now and then a device-readable buffer, or one outside
                // guest memory: driver bugs.
                let (addr_here, flags) = match sel >> 6 {
                    0 => (0xffff_ffff_0000, F_WRITE),
                    1 => (addr, 0),
                    _ => (addr, F_WRITE),
                };
                descs.push(Desc {
                    addr: addr_here,
                    len,
                    flags,
                    next: 0,
                });
                addr += u64::from(len);
            }
            self.rx_posted[usize::from(slot)] = descs.clone();
            self.rx.push(&self.mem, &descs, true);
        }
        if input.bool() {
            self.notify_rx();
        }
    }

    fn notify_rx(&mut self) {
        self.net.rx_notified();
        self.rx_step();
    }

    /// A frame from the tap side: any bytes, large, or a runt.
    fn host_send(&mut self, input: &mut Input) {
        let sel = input.u8();
        let frame = match sel % 4 {
            0 => {
                let n = usize::from(input.u16()) + usize::from(input.u8() & 0x3f);
                vec![sel; n.min(MAX_FRAME + 16)]
            }
            1 => input.bytes(usize::from(sel >> 4)).to_vec(),
            _ => {
                let mut f = input.array::<HDR_LEN>().to_vec();
                f.extend_from_slice(input.short_bytes());
                f
            }
        };
        // An empty datagram reads as the far side hanging up.
        if frame.is_empty() {
            return;
        }
        if self.peer.send(&frame).is_err() {
            return;
        }
        if frame.len() >= HDR_LEN {
            // Longer than a read takes: cut as the tap's reader sees it.
            let mut f = frame;
            f.truncate(MAX_FRAME);
            self.inbound.push_back(f);
        }
    }

    fn rx_step(&mut self) {
        self.net.process_rx();
        self.check_rx();
    }

    /// Used RX buffers must fit their chain and, gathered per frame, be
    /// the next frames sent (some may have been dropped) with the
    /// device's `num_buffers`.
    fn check_rx(&mut self) {
        for used in self.rx.take_used(&self.mem) {
            let slot = self
                .rx
                .slot_of(used)
                .expect("the device returned a head the driver never posted");
            let descs = &self.rx_posted[usize::from(slot)];
            let room: u64 = descs
                .iter()
                .filter(|d| d.flags & F_WRITE != 0)
                .map(|d| u64::from(d.len))
                .sum();
            assert!(
                u64::from(used.len) <= room,
                "device wrote {} bytes into a {room}-byte buffer",
                used.len
            );
            if used.len == 0 {
                assert_eq!(self.partial_left, 0, "an empty buffer amid a frame");
                continue;
            }
            let mut bytes = Vec::new();
            let mut left = used.len as usize;
            for d in descs {
                let n = (d.len as usize).min(left);
                let mut buf = vec![0u8; n];
                self.mem
                    .read_slice(&mut buf, GuestAddress(d.addr))
                    .expect("the device wrote only inside guest memory");
                bytes.extend_from_slice(&buf);
                left -= n;
            }
            if self.partial_left == 0 {
                assert!(
                    bytes.len() >= HDR_LEN,
                    "a frame's first buffer has no header"
                );
                let n =
                    u16::from_le_bytes([bytes[NUM_BUFFERS_OFFSET], bytes[NUM_BUFFERS_OFFSET + 1]]);
                assert!(n >= 1, "num_buffers 0");
                assert!(
                    self.mergeable || n == 1,
                    "num_buffers {n} without MRG_RXBUF"
                );
                self.partial_left = n;
            }
            self.partial.extend_from_slice(&bytes);
            self.partial_left -= 1;
            if self.partial_left == 0 {
                let frame = std::mem::take(&mut self.partial);
                self.match_inbound(&frame);
            }
        }
    }

    /// `frame` must be one of the frames sent, the earlier ones dropped.
    fn match_inbound(&mut self, frame: &[u8]) {
        let same = |sent: &[u8]| {
            sent.len() == frame.len()
                && sent[..NUM_BUFFERS_OFFSET] == frame[..NUM_BUFFERS_OFFSET]
                && sent[HDR_LEN..] == frame[HDR_LEN..]
        };
        while let Some(sent) = self.inbound.pop_front() {
            if same(&sent) {
                return;
            }
        }
        panic!("the guest got a {}-byte frame nobody sent", frame.len());
    }

    /// Drains: a device not waiting for buffers must have read the tap
    /// dry.
    fn finish(&mut self) {
        for _ in 0..8 {
            let step = self.net.process_rx();
            self.check_rx();
            if !step.more {
                break;
            }
        }
        if self.net.rx_blocked() || self.net.tap_gone() {
            return;
        }
        let mut buf = vec![0u8; 16];
        match self.net.tap().read_frame(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("a frame was left on the tap: {other:?}"),
        }
    }
}
