//! The vsock muxer's TX/RX paths and its connection state machine.
//!
//! The input is a program: packets the guest sends (well-formed or raw
//! descriptor chains), rx buffers it posts, and what host clients and a
//! host service do on their Unix sockets, interleaved with the worker
//! loop's steps (epoll dispatch, sweeps at chosen times, rx filling).
//!
//! Checked besides panics: every tx chain is returned, and every packet
//! the device writes into an rx buffer fits the buffer and is a
//! well-formed stream packet from the host to this guest.

use crate::input::Input;
use crate::virtq::{Desc, DriverQueue, F_WRITE};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmcri_vmm::devices::vsock::muxer::{Muxer, Timeouts};
use vmcri_vmm::devices::vsock::packet::{
    op, PacketHeader, HEADER_SIZE, MAX_PAYLOAD, TYPE_STREAM, VSOCK_HOST_CID,
};
use vmm_sys_util::epoll::EpollEvent;

const GUEST_CID: u64 = 3;
/// The host service the guest may connect to (bound at `vsock.sock_52`).
const SERVICE_PORT: u32 = 52;
const QUEUE_SIZE: u16 = 64;
const RXQ: u64 = 0;
const TXQ: u64 = 0x2000;
/// Per-slot data: room for a header, a 64 KiB payload and gaps.
const SLOT_BYTES: u64 = 0x1_2000;
const RX_DATA: u64 = 0x1_0000;
const TX_DATA: u64 = 0x20_0000;
const MEM_SIZE: usize = 0x40_0000;
/// Bounds on one input's work, so each run stays fast.
const MAX_OPS: usize = 256;
const MAX_HOST_SOCKETS: usize = 16;
/// `HEADER_SIZE` as a descriptor length.
const HDR_LEN: u32 = 44;
const _: () = assert!(HDR_LEN as usize == HEADER_SIZE);

struct World {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    rxq: Queue,
    txq: Queue,
    muxer: Muxer,
    service: UnixListener,
    /// Host ends of sockets: clients of the muxer's listener and
    /// connections the service accepted.
    host: Vec<UnixStream>,
    /// What each rx slot was posted with.
    rx_posted: Vec<Vec<Desc>>,
    /// Ports seen in the device's packets, for the guest to address.
    host_ports: Vec<u32>,
    guest_ports: Vec<u32>,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut w = World::new();
    let mut input = Input::new(data);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % 11 {
            0 | 1 => w.send_packet(&mut input),
            2 => w.send_raw(&mut input),
            3 => w.post_rx(&mut input),
            4 => w.host_connect(&mut input),
            5 => w.host_write(&mut input),
            6 => w.host_read(&mut input),
            7 => w.host_close(&mut input),
            8 => w.pump(),
            9 => {
                let later = Duration::from_millis(u64::from(input.u16()) * 10);
                w.muxer.sweep(Instant::now() + later);
                w.rx_step();
            }
            _ => w.rx_step(),
        }
    }
    w.pump();
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).expect("bind the muxer's socket");
        let mut service_path = uds.clone().into_os_string();
        service_path.push(format!("_{SERVICE_PORT}"));
        let service = UnixListener::bind(&service_path).expect("bind the host service");
        service.set_nonblocking(true).expect("nonblocking service");
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let rx = DriverQueue::new(&mem, RXQ, QUEUE_SIZE);
        let tx = DriverQueue::new(&mem, TXQ, QUEUE_SIZE);
        let (rxq, txq) = (rx.device_queue(), tx.device_queue());
        let muxer =
            Muxer::with_timeouts(GUEST_CID, &uds, listener, Timeouts::default()).expect("muxer");
        let slots = usize::from(rx.slots());
        World {
            _dir: dir,
            uds,
            mem,
            rx,
            tx,
            rxq,
            txq,
            muxer,
            service,
            host: Vec::new(),
            rx_posted: vec![Vec::new(); slots],
            host_ports: Vec::new(),
            guest_ports: vec![1024, 5000],
        }
    }

    fn port(&mut self, input: &mut Input, known: &[u32]) -> u32 {
        let b = input.u8();
        match b % 4 {
            0 => input.u32(),
            _ if known.is_empty() => u32::from(b),
            _ => known[usize::from(b / 4) % known.len()],
        }
    }

    /// A packet header mostly as a guest would send it; each field may
    /// also be anything.
    fn header(&mut self, input: &mut Input, payload_len: usize) -> PacketHeader {
        let ctl = input.u16();
        let pick_op = input.u8();
        let op = if ctl & 1 == 0 {
            u16::from(pick_op % 8)
        } else {
            input.u16()
        };
        let host_known: Vec<u32> = std::iter::once(SERVICE_PORT)
            .chain(self.host_ports.iter().copied())
            .collect();
        let guest_known = self.guest_ports.clone();
        let dst_port = self.port(input, &host_known);
        let src_port = self.port(input, &guest_known);
        let len = if ctl & 2 == 0 {
            u32::try_from(payload_len).unwrap_or(u32::MAX)
        } else {
            input.u32()
        };
        PacketHeader {
            src_cid: if ctl & 4 == 0 { GUEST_CID } else { input.u64() },
            dst_cid: if ctl & 8 == 0 {
                VSOCK_HOST_CID
            } else {
                input.u64()
            },
            src_port,
            dst_port,
            len,
            type_: if ctl & 16 == 0 {
                TYPE_STREAM
            } else {
                input.u16()
            },
            op,
            flags: if ctl & 32 == 0 {
                0
            } else {
                u32::from(input.u8())
            },
            buf_alloc: if ctl & 64 == 0 {
                256 * 1024
            } else {
                input.u32()
            },
            fwd_cnt: if ctl & 128 == 0 { 0 } else { input.u32() },
        }
    }

    /// A packet in a chain of up to three readable descriptors.
    fn send_packet(&mut self, input: &mut Input) {
        let big = input.u8();
        let payload: Vec<u8> = if big & 0x80 != 0 {
            // Large payloads without large inputs: one byte repeated.
            let n = (usize::from(input.u16()) << 1).min(MAX_PAYLOAD as usize + 8);
            vec![big; n]
        } else {
            input.short_bytes().to_vec()
        };
        let hdr = self.header(input, payload.len());
        let mut bytes = hdr.swap_le().as_slice().to_vec();
        bytes.extend_from_slice(&payload);
        // Up to three pieces, cut where the input says.
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
        let Some(slot) = self.tx.has_room(&self.mem).then(|| self.tx.next_slot()) else {
            return;
        };
        let mut addr = TX_DATA + u64::from(slot) * SLOT_BYTES;
        let mut descs = Vec::new();
        for (k, p) in pieces.iter().enumerate() {
            self.mem
                .write_slice(p, GuestAddress(addr))
                .expect("slot inside guest memory");
            let flags = if cuts & (0x10 << k) != 0 { F_WRITE } else { 0 };
            descs.push(Desc {
                addr,
                len: u32::try_from(p.len()).expect("a packet under 4 GiB"),
                flags,
                next: 0,
            });
            addr += p.len() as u64 + 8;
        }
        self.tx.push(&self.mem, &descs, true);
        self.tx_step();
    }

    /// A chain of raw descriptors: any address, length, flags and next.
    fn send_raw(&mut self, input: &mut Input) {
        let n = 1 + usize::from(input.u8() % 4);
        let base = TX_DATA + u64::from(self.tx.next_slot()) * SLOT_BYTES;
        let descs: Vec<Desc> = (0..n)
            .map(|_| {
                let sel = input.u8();
                let addr = if sel & 1 == 0 {
                    base + u64::from(input.u16())
                } else {
                    input.u64()
                };
                Desc {
                    addr,
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
        // Some bytes at the chain's first buffer, to look like a header.
        let bytes = input.short_bytes().to_vec();
        let _ = self.mem.write_slice(&bytes, GuestAddress(base));
        self.tx.push(&self.mem, &descs, false);
        self.tx_step();
    }

    fn tx_step(&mut self) {
        self.muxer.process_tx(&mut self.txq, &self.mem);
        assert_eq!(
            self.tx.outstanding(&self.mem),
            0,
            "process_tx left tx chains unreturned"
        );
        self.tx.take_used(&self.mem);
    }

    /// Rx buffers of chosen sizes, split over descriptors.
    fn post_rx(&mut self, input: &mut Input) {
        let chains = 1 + input.u8() % 4;
        for _ in 0..chains {
            if !self.rx.has_room(&self.mem) {
                break;
            }
            let slot = self.rx.next_slot();
            let mut addr = RX_DATA + u64::from(slot) * SLOT_BYTES;
            let n = 1 + input.u8() % 3;
            let mut descs = Vec::new();
            for _ in 0..n {
                let sel = input.u8();
                let len = match sel % 6 {
                    0 => HDR_LEN,
                    1 => 4096 + HDR_LEN,
                    2 => MAX_PAYLOAD + HDR_LEN,
                    3 => u32::from(input.u8()),
                    _ => u32::from(input.u16()),
                };
                // Now and then a device-readable buffer: a driver bug.
                let flags = if sel & 0x80 != 0 { 0 } else { F_WRITE };
                descs.push(Desc {
                    addr,
                    len,
                    flags,
                    next: 0,
                });
                addr += u64::from(len);
            }
            let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
            if total > SLOT_BYTES {
                // Keep buffers inside the slot; trim the last.
                let over = total - SLOT_BYTES;
                if let Some(last) = descs.last_mut() {
                    last.len = last.len.saturating_sub(u32::try_from(over).unwrap_or(0));
                }
            }
            self.rx_posted[usize::from(slot)] = descs.clone();
            self.rx.push(&self.mem, &descs, true);
        }
        self.rx_step();
    }

    fn rx_step(&mut self) {
        self.muxer.process_rx(&mut self.rxq, &self.mem);
        self.muxer.update_interest();
        self.check_rx();
    }

    /// Every packet the device wrote must fit its buffer and be a
    /// well-formed packet from the host to this guest.
    fn check_rx(&mut self) {
        for used in self.rx.take_used(&self.mem) {
            let slot = self
                .rx
                .slot_of(used)
                .expect("the device returned a head the driver never posted");
            let writable: Vec<Desc> = self.rx_posted[usize::from(slot)]
                .iter()
                .copied()
                .filter(|d| d.flags & F_WRITE != 0)
                .collect();
            let room: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
            assert!(
                u64::from(used.len) <= room,
                "device wrote {} bytes into a {room}-byte buffer",
                used.len
            );
            if used.len == 0 {
                continue;
            }
            assert!(
                used.len as usize >= HEADER_SIZE,
                "a {}-byte packet is shorter than its header",
                used.len
            );
            let mut bytes = Vec::new();
            for d in &writable {
                let mut buf = vec![0u8; d.len as usize];
                self.mem
                    .read_slice(&mut buf, GuestAddress(d.addr))
                    .expect("posted buffers are in memory");
                bytes.extend_from_slice(&buf);
            }
            let hdr = PacketHeader::from_slice(&bytes[..HEADER_SIZE])
                .expect("header-sized slice")
                .swap_le();
            let (src_cid, dst_cid, len, type_, op) =
                (hdr.src_cid, hdr.dst_cid, hdr.len, hdr.type_, hdr.op);
            assert_eq!(src_cid, VSOCK_HOST_CID, "packet not from the host");
            assert_eq!(dst_cid, GUEST_CID, "packet not to this guest");
            assert_eq!(type_, TYPE_STREAM);
            assert!((op::REQUEST..=op::CREDIT_REQUEST).contains(&op), "op {op}");
            assert!(len <= MAX_PAYLOAD, "payload of {len} bytes");
            assert_eq!(
                len as usize + HEADER_SIZE,
                used.len as usize,
                "used length does not match the packet"
            );
            assert!(op == op::RW || len == 0, "control packet with payload");
            let (src_port, dst_port) = (hdr.src_port, hdr.dst_port);
            if self.host_ports.len() < 16 && !self.host_ports.contains(&src_port) {
                self.host_ports.push(src_port);
            }
            if self.guest_ports.len() < 16 && !self.guest_ports.contains(&dst_port) {
                self.guest_ports.push(dst_port);
            }
        }
    }

    fn host_connect(&mut self, input: &mut Input) {
        if self.host.len() >= MAX_HOST_SOCKETS {
            return;
        }
        let Ok(mut s) = UnixStream::connect(&self.uds) else {
            return;
        };
        let sel = input.u8();
        let line = match sel % 4 {
            0 => input.short_bytes().to_vec(),
            1 => format!("CONNECT {}\n", input.u32()).into_bytes(),
            _ => {
                let port = input.pick(&self.guest_ports).unwrap_or(1024);
                format!("CONNECT {port}\n").into_bytes()
            }
        };
        let _ = s.write_all(&line);
        let _ = s.set_nonblocking(true);
        self.host.push(s);
    }

    fn host_socket(&mut self, input: &mut Input) -> Option<usize> {
        let i = usize::from(input.u8());
        (!self.host.is_empty()).then(|| i % self.host.len())
    }

    fn host_write(&mut self, input: &mut Input) {
        let Some(i) = self.host_socket(input) else {
            return;
        };
        let sel = input.u8();
        let data = if sel & 0x80 != 0 {
            vec![sel; usize::from(input.u16()) * 4]
        } else {
            input.short_bytes().to_vec()
        };
        let _ = self.host[i].write(&data);
    }

    fn host_read(&mut self, input: &mut Input) {
        let Some(i) = self.host_socket(input) else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..16 {
            match self.host[i].read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn host_close(&mut self, input: &mut Input) {
        let Some(i) = self.host_socket(input) else {
            return;
        };
        match input.u8() % 3 {
            0 => {
                self.host.swap_remove(i);
            }
            1 => {
                let _ = self.host[i].shutdown(Shutdown::Write);
            }
            _ => {
                let _ = self.host[i].shutdown(Shutdown::Read);
            }
        }
    }

    /// The worker's loop until nothing is pending, without waiting.
    fn pump(&mut self) {
        while self.host.len() < MAX_HOST_SOCKETS {
            match self.service.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(true);
                    self.host.push(s);
                }
                Err(_) => break,
            }
        }
        // A few rounds: an accepted client's handshake shows up in the
        // round after its accept, the guest's data in the one after that.
        let mut events = vec![EpollEvent::default(); 32];
        for _ in 0..4 {
            let n = self.muxer.epoll().wait(0, &mut events).unwrap_or(0);
            for ev in &events[..n] {
                self.muxer.handle_event(ev.data(), ev.event_set());
            }
            self.muxer.sweep(Instant::now());
            self.rx_step();
            if n == 0 {
                break;
            }
        }
    }
}
