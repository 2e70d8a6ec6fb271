//! The device against a driver made of virtio-queue's mock rings, with a
//! seqpacket socket pair as the tap; and once against a real tap in a
//! network namespace of the test's own.

use super::header::*;
use super::queues::{NetQueues, BUDGET};
use super::tap::Tap;
use super::{MacAddr, Net};
use crate::devices::virtio_mmio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::IrqLine;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 256;
const RXQ: u64 = 0;
const TXQ: u64 = 0x1_0000;
const TX_DATA: u64 = 0x2_0000;
const RX_DATA: u64 = 0x10_0000;
const MEM: usize = 0x80_0000;

fn seqpacket_pair() -> (Tap, UnixDatagram) {
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
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and ours alone.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let peer = UnixDatagram::from(b);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (Tap::from_seqpacket(a).unwrap(), peer)
}

/// A guest: memory, the two mock rings, and where the next chain goes.
struct Guest {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    rx_next: u16,
    tx_next: u16,
    rx_used_seen: u16,
}

impl Guest {
    fn new() -> Guest {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
        ));
        Guest {
            mem,
            rx: MockSplitQueue::create(mem, GuestAddress(RXQ), QSIZE),
            tx: MockSplitQueue::create(mem, GuestAddress(TXQ), QSIZE),
            rx_next: 0,
            tx_next: 0,
            rx_used_seen: 0,
        }
    }

    fn queues(&self) -> (Queue, Queue) {
        (
            self.rx.create_queue().unwrap(),
            self.tx.create_queue().unwrap(),
        )
    }

    fn net(&self, tap: Tap, features: u64) -> NetQueues {
        let (rx, tx) = self.queues();
        NetQueues::new(self.mem.clone(), rx, tx, Arc::new(tap), features)
    }

    fn chain(descs: &[(u64, u32, u16)], at: u16) -> Vec<RawDescriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = u16::try_from(i).unwrap();
                let (flags, next) = if usize::from(i) + 1 < n {
                    (flags | F_NEXT, at + i + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    /// Queues a TX chain of (addr, len, flags) descriptors.
    fn post_tx(&mut self, descs: &[(u64, u32, u16)]) {
        let raw = Self::chain(descs, self.tx_next);
        self.tx.add_desc_chains(&raw, self.tx_next).unwrap();
        self.tx_next += u16::try_from(descs.len()).unwrap();
    }

    /// Writes `bytes` at TX_DATA + `off` and queues them as one chain cut
    /// into `pieces` descriptors.
    fn send(&mut self, off: u64, bytes: &[u8], pieces: usize) {
        let at = TX_DATA + off;
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let step = bytes.len().div_ceil(pieces);
        let descs: Vec<_> = bytes
            .chunks(step)
            .scan(at, |addr, c| {
                let d = (*addr, u32::try_from(c.len()).unwrap(), 0);
                *addr += c.len() as u64;
                Some(d)
            })
            .collect();
        self.post_tx(&descs);
    }

    /// Posts `n` RX chains of one `size`-byte buffer each; returns their
    /// addresses.
    fn post_rx(&mut self, n: usize, size: u32) -> Vec<u64> {
        let mut addrs = Vec::new();
        for _ in 0..n {
            let addr = RX_DATA + u64::from(self.rx_next) * 0x1_0000 / 4;
            let raw = Self::chain(&[(addr, size, F_WRITE)], self.rx_next);
            self.rx.add_desc_chains(&raw, self.rx_next).unwrap();
            self.rx_next += 1;
            addrs.push(addr);
        }
        addrs
    }

    fn tx_used(&self) -> Vec<(u32, u32)> {
        let used = self.tx.used();
        (0..used.idx().load())
            .map(|i| {
                let e = used.ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// RX used elements since the last call: (head, len).
    fn take_rx_used(&mut self) -> Vec<(u32, u32)> {
        let used = self.rx.used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.rx_used_seen != idx {
            let e = used
                .ring()
                .ref_at(usize::from(self.rx_used_seen % QSIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.rx_used_seen += 1;
        }
        out
    }

    /// The frame a run of used RX buffers holds (each chain posted by
    /// post_rx, so head `h` is at RX_DATA + h * 0x4000).
    fn read_rx(&self, used: &[(u32, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(head, len) in used {
            let mut buf = vec![0u8; len as usize];
            let addr = RX_DATA + u64::from(head) * 0x4000;
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }
}

/// A vnet header (no offloads) and an Ethernet frame of `len` bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap_or(0))));
    f
}

fn num_buffers(bytes: &[u8]) -> u16 {
    u16::from_le_bytes([bytes[NUM_BUFFERS_OFFSET], bytes[NUM_BUFFERS_OFFSET + 1]])
}

fn recv(peer: &UnixDatagram) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME + 100];
    let n = peer.recv(&mut buf).expect("a frame from the device");
    buf.truncate(n);
    buf
}

#[test]
fn a_tx_frame_reaches_the_tap_with_its_vnet_header() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1);
    let mut f = frame(1500, 7);
    // Checksum offload asked for: the header must arrive as the guest
    // wrote it.
    f[0] = 1;
    f[6..8].copy_from_slice(&34u16.to_le_bytes());
    g.send(0, &f, 3);
    let step = net.process_tx();
    assert!(step.notify && !step.more);
    assert_eq!(recv(&peer), f);
    assert_eq!(g.tx_used(), vec![(0, 0)]);
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_next_good_one_still_goes() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1);
    g.post_tx(&[(TX_DATA, 12, 0), (TX_DATA + 12, 100, F_WRITE)]);
    g.post_tx(&[(0xffff_0000_0000, 200, 0)]);
    g.post_tx(&[(TX_DATA, 40_000, 0), (TX_DATA + 40_000, 40_000, 0)]);
    g.post_tx(&[(TX_DATA, 11, 0)]);
    g.post_tx(&[(MEM as u64 - 10, 100, 0)]);
    let good = frame(60, 9);
    g.send(0x4_0000, &good, 1);
    net.process_tx();
    let used = g.tx_used();
    assert_eq!(used.len(), 6, "every chain is returned: {used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(recv(&peer), good, "only the good frame went out");
    peer.set_nonblocking(true).unwrap();
    assert!(peer.recv(&mut [0u8; 64]).is_err(), "nothing else went out");
}

#[test]
fn avail_indexes_beyond_the_ring_do_not_spin_either_queue() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    g.tx.avail().idx().store(1000);
    g.rx.avail().idx().store(1000);
    peer.send(&frame(100, 1)).unwrap();
    // Both return (a spin would hang the test), using nothing.
    assert!(!net.process_tx().notify);
    assert!(!net.process_rx().notify);
    assert!(net.rx_blocked() && net.has_pending());
    assert!(g.tx_used().is_empty() && g.take_rx_used().is_empty());
}

#[test]
fn a_large_frame_fills_several_mergeable_buffers() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    g.post_rx(20, 4096);
    let f = frame(60_000, 3);
    peer.send(&f).unwrap();
    let step = net.process_rx();
    assert!(step.notify);
    let used = g.take_rx_used();
    let n = f.len().div_ceil(4096);
    assert_eq!(used.len(), n);
    assert!(used[..n - 1].iter().all(|&(_, len)| len == 4096));
    assert_eq!(used[n - 1].1 as usize, f.len() - 4096 * (n - 1));
    let got = g.read_rx(&used);
    assert_eq!(usize::from(num_buffers(&got)), n);
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
    assert_eq!(got[..NUM_BUFFERS_OFFSET], f[..NUM_BUFFERS_OFFSET]);
    assert!(!net.rx_blocked() && !net.has_pending());
}

#[test]
fn a_zero_length_rx_descriptor_does_not_cut_the_frame_short() {
    // Found by the net fuzz target: the copy stopped at the first empty
    // descriptor, so the guest got a frame shorter than the one sent.
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    let addr = RX_DATA;
    let raw = Guest::chain(
        &[
            (addr, 4096, F_WRITE),
            (addr + 4096, 0, F_WRITE),
            (addr + 4096, 8192, F_WRITE),
        ],
        0,
    );
    g.rx.add_desc_chains(&raw, 0).unwrap();
    let f = frame(10_000, 7);
    peer.send(&f).unwrap();
    net.process_rx();
    let used = g.take_rx_used();
    let len = u32::try_from(f.len()).unwrap();
    assert_eq!(used, vec![(0, len)], "one chain, the whole frame");
    let mut got = vec![0u8; f.len()];
    g.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
}

#[test]
fn a_frame_waits_for_buffers_and_then_arrives_whole() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    g.post_rx(1, 4096);
    let first = frame(10_000, 1);
    let second = frame(100, 2);
    peer.send(&first).unwrap();
    peer.send(&second).unwrap();
    let step = net.process_rx();
    assert_eq!(
        step,
        Default::default(),
        "nothing used, nothing left to spin on"
    );
    assert!(net.rx_blocked() && net.has_pending());
    assert!(!net.wants_tap(), "the tap is not watched while blocked");
    assert!(g.take_rx_used().is_empty());
    // The driver asked to be told: notifications are on.
    assert_eq!(g.mem.read_obj::<u16>(g.rx.used_addr()).unwrap(), 0);
    // No notification yet: stepping again reads nothing more.
    assert_eq!(net.process_rx(), Default::default());
    // The guest adds buffers and notifies.
    g.post_rx(4, 4096);
    net.rx_notified();
    net.process_rx();
    let used = g.take_rx_used();
    assert_eq!(used.len(), 4, "3 for the first frame, 1 for the second");
    let got = g.read_rx(&used[..3]);
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(got[HDR_LEN..], first[HDR_LEN..]);
    let got = g.read_rx(&used[3..]);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(got[HDR_LEN..], second[HDR_LEN..]);
    assert!(!net.rx_blocked() && !net.has_pending());
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain_or_is_dropped() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1);
    g.post_rx(2, 2048);
    peer.send(&frame(5000, 1)).unwrap();
    let small = frame(1000, 2);
    peer.send(&small).unwrap();
    net.process_rx();
    let used = g.take_rx_used();
    assert_eq!(
        used.len(),
        1,
        "the big frame was dropped, the small one kept"
    );
    let got = g.read_rx(&used);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(got[HDR_LEN..], small[HDR_LEN..]);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    // Readable, outside memory, too small for a header; then a good one.
    for descs in [
        [(RX_DATA, 4096, 0)],
        [(0xffff_0000_0000, 4096, F_WRITE)],
        [(RX_DATA, 4, F_WRITE)],
    ] {
        let raw = Guest::chain(&descs, g.rx_next);
        g.rx.add_desc_chains(&raw, g.rx_next).unwrap();
        g.rx_next += 1;
    }
    g.post_rx(1, 4096);
    let f = frame(500, 4);
    peer.send(&f).unwrap();
    net.process_rx();
    let used = g.take_rx_used();
    assert_eq!(used[..3], [(0, 0), (1, 0), (2, 0)]);
    assert_eq!(used.len(), 4);
    assert_eq!(g.read_rx(&used[3..])[HDR_LEN..], f[HDR_LEN..]);
}

#[test]
fn rx_stops_after_its_budget_and_says_there_is_more() {
    let mut g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    g.post_rx(usize::from(QSIZE), 1024);
    for i in 0..=BUDGET {
        peer.send(&frame(60, u8::try_from(i % 256).unwrap()))
            .unwrap();
    }
    let step = net.process_rx();
    assert!(step.more);
    assert_eq!(g.take_rx_used().len(), BUDGET);
}

#[test]
fn a_tap_whose_far_side_is_gone_is_no_longer_read() {
    let g = Guest::new();
    let (tap, peer) = seqpacket_pair();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1);
    drop(peer);
    net.process_rx();
    assert!(net.tap_gone() && !net.wants_tap());
}

fn device(mtu: Option<u16>) -> (Net, UnixDatagram) {
    let (tap, peer) = seqpacket_pair();
    let net = Net::new(Arc::new(tap), MacAddr([2, 0, 0, 0, 0, 9]), mtu).unwrap();
    (net, peer)
}

#[test]
fn the_config_space_holds_mac_status_and_mtu_and_hostile_accesses_are_harmless() {
    let (mut net, _peer) = device(Some(1400));
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], [2, 0, 0, 0, 0, 9]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);
    assert!(net.features() & VIRTIO_NET_F_MTU != 0);
    for (offset, len) in [(11, 8), (12, 4), (u64::MAX, 4), (u64::MAX - 2, 8), (3, 1)] {
        let mut data = vec![0xaa; len];
        net.read_config(offset, &mut data);
        net.write_config(offset, &data);
    }
    net.write_config(0, &[0xff; 12]);
    let mut again = [0u8; 12];
    net.read_config(0, &mut again);
    assert_eq!(again, cfg, "the guest cannot change the config space");
    let (net, _peer) = device(None);
    assert_eq!(net.features() & VIRTIO_NET_F_MTU, 0);
}

#[test]
fn the_net_thread_serves_both_queues_under_its_seccomp_role() {
    let mut g = Guest::new();
    let (mut net, peer) = device(None);
    let (rx, tx) = g.queues();
    let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(IrqLine::new(5).unwrap())));
    let notifiers: Vec<Arc<EventFd>> = (0..2)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let features = net.features();
    net.activate(
        g.mem.clone(),
        features,
        vec![rx, tx],
        interrupt.clone(),
        notifiers.clone(),
    )
    .unwrap();
    let out = frame(800, 5);
    g.send(0, &out, 2);
    notifiers[1].write(1).unwrap();
    assert_eq!(recv(&peer), out);
    // A frame before any buffer: it waits for the RX notification.
    let inbound = frame(3000, 6);
    peer.send(&inbound).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.take_rx_used().is_empty());
    g.post_rx(1, 4096);
    notifiers[0].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let used = g.take_rx_used();
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "the frame never arrived");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(g.read_rx(&used)[HDR_LEN..], inbound[HDR_LEN..]);
    assert!(interrupt.status() & 1 != 0, "the guest was interrupted");
    net.reset();
}

/// `struct ifreq` with the name and a short (flags) or int (index).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

fn ifreq(name: &str) -> IfReq {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        value: 0,
        _pad: [0; 20],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// An Ethernet frame of our own experimental ethertype (0x88b5), which
/// nothing in the namespace answers.
fn ether(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}

/// The test body, on a thread that moved into a network namespace of its
/// own: nothing it sends can leave that namespace, which holds only
/// loopback and the tap. `Ok(Some(reason))`: skipped.
fn through_a_real_tap() -> Result<Option<String>, String> {
    // SAFETY: unshare(2) of this thread's network namespace only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Ok(Some(os_err("unshare(CLONE_NEWNET)")));
    }
    let tun = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(f) => f,
        Err(e) => return Ok(Some(format!("/dev/net/tun: {e}"))),
    };
    let name = "vmcri-t0";
    let mut req = ifreq(name);
    req.value = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads (and may write back) a struct ifreq.
    if unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&tun),
            libc::TUNSETIFF,
            &raw mut req,
        )
    } < 0
    {
        return Err(os_err("TUNSETIFF"));
    }
    let eth_p_all = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
    // SAFETY: socket(2) with plain arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(eth_p_all),
        )
    };
    if fd < 0 {
        return Err(os_err("packet socket"));
    }
    // SAFETY: a new fd of ours.
    let packet = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write a
    // struct ifreq.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            return Err(os_err("SIOCGIFFLAGS"));
        }
        req.value |= libc::IFF_UP;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req) < 0 {
            return Err(os_err("SIOCSIFFLAGS"));
        }
        req = ifreq(name);
        if libc::ioctl(fd, libc::SIOCGIFINDEX, &raw mut req) < 0 {
            return Err(os_err("SIOCGIFINDEX"));
        }
    }
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = eth_p_all;
    addr.sll_ifindex = req.value;
    addr.sll_halen = 6;
    let addr_len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap();
    // SAFETY: bind to a sockaddr_ll of the size given.
    if unsafe { libc::bind(fd, (&raw const addr).cast(), addr_len) } < 0 {
        return Err(os_err("bind the packet socket"));
    }
    let tap = Tap::from_inherited_fd(std::os::fd::IntoRawFd::into_raw_fd(tun))
        .map_err(|e| e.to_string())?;
    let mut g = Guest::new();
    let mut net = g.net(tap, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
    // What activation does with a driver that takes every offload.
    let all = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6;
    net.tap()
        .set_offloads(tun_offloads(all))
        .map_err(|e| e.to_string())?;

    // Guest to tap: the frame comes out of the interface as sent, the
    // vnet header gone.
    let guest_mac = [2, 0, 0, 0, 0, 9];
    let out = ether([0xff; 6], guest_mac, b"vmcri virtio-net to tap");
    let mut with_hdr = vec![0u8; HDR_LEN];
    with_hdr.extend_from_slice(&out);
    g.send(0, &with_hdr, 2);
    net.process_tx();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 2048];
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll one pollfd; recv into buf.
        let n = unsafe {
            if libc::poll(&raw mut pfd, 1, 100) <= 0 {
                0
            } else {
                libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)
            }
        };
        if n > 0 && buf[..usize::try_from(n).unwrap()] == out[..] {
            break;
        }
        if Instant::now() > deadline {
            return Err("the frame never came out of the tap".into());
        }
    }

    // Tap to guest: a frame sent on the interface reaches the guest's
    // buffers (among whatever else the kernel sends on a new link).
    let inbound = ether(guest_mac, [2, 0, 0, 0, 0, 0xaa], b"tap to vmcri virtio-net");
    // SAFETY: sendto with the bound address.
    let sent = unsafe {
        libc::sendto(
            fd,
            inbound.as_ptr().cast(),
            inbound.len(),
            0,
            (&raw const addr).cast(),
            addr_len,
        )
    };
    if sent < 0 {
        return Err(os_err("send on the interface"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if g.rx_next < QSIZE - 8 {
            g.post_rx(8, 2048);
            net.rx_notified();
        }
        net.process_rx();
        let used = g.take_rx_used();
        let found = used.iter().any(|u| {
            let got = g.read_rx(std::slice::from_ref(u));
            got.len() > HDR_LEN && got[HDR_LEN..] == inbound[..]
        });
        if found {
            break;
        }
        if Instant::now() > deadline {
            return Err("the frame never reached the guest".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(packet);
    Ok(None)
}

#[test]
fn frames_cross_a_real_tap_in_a_throwaway_network_namespace() {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a network namespace and a tap need root");
        return;
    }
    let result = std::thread::spawn(through_a_real_tap)
        .join()
        .expect("the namespace thread panicked");
    match result {
        Ok(None) => {}
        Ok(Some(reason)) => eprintln!("skipped: {reason}"),
        Err(e) => panic!("{e}"),
    }
}
