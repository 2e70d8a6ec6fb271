//! One vsock stream between a guest socket and a host Unix socket: its
//! state, its credit accounting in both directions, and the control
//! packets it owes the guest.

use super::packet::{
    op, PacketHeader, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID,
};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

/// `n` bytes as an increment of a credit counter, which counts bytes
/// modulo 2^32 (virtio 1.1, 5.10.6.3).
#[allow(
    clippy::cast_possible_truncation,
    reason = "vsock credit counters count bytes modulo 2^32"
)]
fn counted(n: usize) -> Wrapping<u32> {
    Wrapping(n as u32)
}

/// Guest data we accept per connection before the host side reads it:
/// the receive buffer we advertise. The guest may not exceed it, so this
/// bounds what the VMM ever holds for a slow host reader.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST owed or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host side connected, RESPONSE owed.
    PeerInit,
    /// Data flows.
    Established,
    /// We told the guest we are done (SHUTDOWN); waiting for its RST.
    Closing,
}

/// Control packets the connection owes the guest, sent as rx buffers allow.
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown: bool,
    rst: bool,
}

/// A connection, keyed by (host port, guest port).
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    state: State,
    owed: Owed,
    /// Bytes not yet taken by the host socket: the handshake reply, then
    /// guest data (bounded by BUF_ALLOC).
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (the `OK` line), not the
    /// guest's, and so not counted in `fwd_cnt`.
    ours_queued: usize,
    /// Guest bytes delivered to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest will send no more.
    peer_done_sending: bool,
    /// The guest will receive no more.
    peer_done_receiving: bool,
    /// The host socket reached end of file or failed.
    host_eof: bool,
    /// Epoll reported a hang-up or an error on the host socket. It keeps
    /// reporting it whatever the event mask, so the socket stays out of
    /// epoll from then on; it no longer needs it, as neither reads nor
    /// writes can block any more.
    host_hup: bool,
    /// The host socket has data we have not read yet.
    pub host_readable: bool,
    /// When to give up waiting on the guest (connect or close).
    pub deadline: Option<Instant>,
    /// How long the guest may stall the teardown once the host side is
    /// gone (see `muxer::CLOSE_TIMEOUT`).
    close_timeout: Duration,
}

/// What the muxer should do with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Drop it now, without telling the guest.
    Drop,
    /// Drop it now and send the guest an RST for it.
    Reset,
}

impl Connection {
    /// A host-initiated connection to guest port `peer_port`, which the
    /// guest must accept by `deadline`.
    pub fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
        close_timeout: Duration,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            State::LocalInit,
            close_timeout,
        );
        c.owed.request = true;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection, already connected on the host side.
    pub fn guest_initiated(
        stream: UnixStream,
        guest_cid: u64,
        hdr: &PacketHeader,
        close_timeout: Duration,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            hdr.dst_port,
            hdr.src_port,
            State::PeerInit,
            close_timeout,
        );
        c.owed.response = true;
        c.update_peer_credit(hdr);
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: State,
        close_timeout: Duration,
    ) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            owed: Owed::default(),
            to_host: VecDeque::new(),
            ours_queued: 0,
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_done_sending: false,
            peer_done_receiving: false,
            host_eof: false,
            host_hup: false,
            host_readable: false,
            deadline: None,
            close_timeout,
        }
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        self.state
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) -> Verdict {
        self.update_peer_credit(hdr);
        match hdr.op {
            op::RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                self.deadline = None;
                let line = super::handshake::ok_line(self.local_port);
                // Queued like data, so a slow host reader cannot lose it.
                self.to_host.extend(line.as_bytes());
                self.ours_queued += line.len();
                self.flush_to_host();
            }
            op::RW if self.state == State::Established && !self.peer_done_sending => {
                if self.to_host.len() - self.ours_queued + payload.len() > BUF_ALLOC as usize {
                    // The guest ignored the credit we gave it.
                    guest_warn!(
                        local_port = self.local_port,
                        peer_port = self.peer_port,
                        "vsock: guest overran its credit; resetting"
                    );
                    return self.reset();
                }
                self.to_host.extend(payload);
                self.flush_to_host();
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.owed.credit_update = true,
            op::SHUTDOWN => {
                self.peer_done_receiving |= hdr.flags & SHUTDOWN_RCV != 0;
                self.peer_done_sending |= hdr.flags & SHUTDOWN_SEND != 0;
                if self.peer_done_sending {
                    self.flush_to_host();
                }
                if self.peer_done_sending && self.peer_done_receiving {
                    // Both ways closed: answer with RST, as Linux expects.
                    return self.reset();
                }
            }
            op::RST => return Verdict::Drop,
            _ => return self.reset(),
        }
        self.verdict()
    }

    /// Marks the connection for an RST: the muxer sends it and drops the
    /// connection.
    pub fn reset(&mut self) -> Verdict {
        self.owed = Owed {
            rst: true,
            ..Owed::default()
        };
        self.state = State::Closing;
        self.deadline = None;
        Verdict::Reset
    }

    /// What the muxer should do with the connection now: reset it once it
    /// owes an RST (the muxer queues that itself, so a guest that posts no
    /// rx buffers cannot keep the host socket open), drop it once its RST
    /// went out.
    pub fn verdict(&self) -> Verdict {
        if self.owed.rst {
            Verdict::Reset
        } else if self.state == State::Closing && !self.owed.shutdown && self.deadline.is_none() {
            Verdict::Drop
        } else {
            Verdict::Keep
        }
    }

    /// Moves queued guest data to the host socket, as much as it takes.
    pub fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.ours_queued);
                    self.ours_queued -= ours;
                    self.fwd_cnt += counted(n - ours);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The host side is gone: nothing more can be delivered.
                    self.to_host.clear();
                    self.ours_queued = 0;
                    self.on_host_eof();
                    break;
                }
            }
        }
        if self.peer_done_sending && self.to_host.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about freed buffer space once half of it is back,
        // rather than after every write.
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= BUF_ALLOC / 2 {
            self.owed.credit_update = true;
        }
    }

    /// True if guest data waits for the host socket to become writable.
    pub fn wants_host_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// True if we should read the host socket when it has data.
    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_done_receiving
            && self.peer_credit() > 0
    }

    /// The epoll events to register the host socket for; `None` if it must
    /// not be in the epoll set at all. That is the case once the host
    /// side hung up: epoll reports a hang-up on every wait whatever the
    /// mask, and the socket needs no more waiting. Otherwise the mask may
    /// be empty, while the guest cannot take data (no credit or no rx
    /// buffers: `host_readable` stays set until a read would block) and
    /// nothing waits for the host: the registration then only watches for
    /// the hang-up, which comes once and takes the socket out.
    pub fn host_interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        if self.wants_host_read() && !self.host_readable {
            events |= EventSet::IN;
        }
        if self.wants_host_write() {
            events |= EventSet::OUT;
        }
        Some(events)
    }

    /// True if a control packet or data is waiting for an rx buffer.
    pub fn has_rx_work(&self) -> bool {
        let o = self.owed;
        o.request
            || o.response
            || o.credit_update
            || o.shutdown
            || o.rst
            || (self.host_readable && self.wants_host_read())
    }

    /// The header of a packet from the host side of this connection.
    pub fn header(&self, op: u16, len: u32, flags: u32) -> PacketHeader {
        PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next control packet owed, if any, marking it sent. After our
    /// SHUTDOWN the guest owes an RST, which it must send within the close
    /// timeout.
    pub fn next_control(&mut self) -> Option<PacketHeader> {
        let close_deadline = Instant::now() + self.close_timeout;
        let o = &mut self.owed;
        let (op, flags) = if o.rst {
            o.rst = false;
            self.deadline = None;
            (op::RST, 0)
        } else if o.request {
            o.request = false;
            (op::REQUEST, 0)
        } else if o.response {
            o.response = false;
            self.state = State::Established;
            (op::RESPONSE, 0)
        } else if o.shutdown {
            o.shutdown = false;
            self.deadline = Some(close_deadline);
            (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        } else if o.credit_update {
            o.credit_update = false;
            (op::CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        let hdr = self.header(op, 0, flags);
        if op != op::REQUEST {
            self.fwd_cnt_told = self.fwd_cnt;
        }
        Some(hdr)
    }

    /// Reads host data for the guest, at most `max` bytes. `Ok(0)` means
    /// nothing to send now.
    pub fn read_host(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let max = max
            .min(self.peer_credit() as usize)
            .min(MAX_PAYLOAD as usize);
        if max == 0 || !self.wants_host_read() {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; max];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.on_host_eof();
                    return Ok(Vec::new());
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.rx_cnt += counted(n);
                    self.fwd_cnt_told = self.fwd_cnt;
                    if self.host_hup {
                        // The guest is draining what the host left: slow
                        // perhaps, but not stalled.
                        self.deadline = Some(Instant::now() + self.close_timeout);
                    }
                    return Ok(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Ok(Vec::new());
                }
                Err(e) => {
                    self.on_host_eof();
                    return Err(e);
                }
            }
        }
    }

    /// The host closed its socket: tell the guest, then wait for its RST.
    pub fn on_host_eof(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        match self.state {
            State::Established => {
                self.owed.shutdown = true;
                self.state = State::Closing;
                self.linger();
            }
            State::LocalInit | State::PeerInit => {
                self.reset();
            }
            State::Closing => {}
        }
    }

    /// Epoll reported a hang-up or an error on the host socket: the host
    /// side is gone. What it wrote before is still read for the guest (a
    /// read returns it, then end of file, without blocking); what the
    /// guest sent can no longer be delivered.
    pub fn on_host_hangup(&mut self) {
        if self.host_hup {
            return;
        }
        self.host_hup = true;
        self.host_readable = true;
        self.to_host.clear();
        self.ours_queued = 0;
        match self.state {
            // The client left before the guest accepted: nobody to connect.
            State::LocalInit => {
                self.reset();
            }
            State::PeerInit | State::Established => self.linger(),
            State::Closing => {}
        }
    }

    /// The host side is gone: start the clock on the teardown, so a guest
    /// that takes nothing more (no rx buffers, no credit, no RST) cannot
    /// keep the connection forever. A running deadline is kept.
    fn linger(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.close_timeout);
        }
    }

    /// The deadline passed: give up on the guest and reset.
    pub fn expire(&mut self) {
        self.reset();
    }
}
