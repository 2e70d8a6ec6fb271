//! The host side of hybrid vsock: a Unix listener for host-initiated
//! connections, Unix clients for guest-initiated ones, and the connection
//! table that turns guest packets into socket I/O and back.

use super::connection::{Connection, State, Verdict};
use super::handshake::{self, MAX_LINE};
use super::packet::{op, PacketHeader, HEADER_SIZE, MAX_PAYLOAD, TYPE_STREAM, VSOCK_HOST_CID};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Most connections per VM; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Most RSTs for unknown connections waiting for rx buffers; beyond that
/// the oldest is dropped (the guest's own timeouts cover it).
const MAX_QUEUED_RSTS: usize = 1024;
/// How long a host client may take to send `CONNECT <port>\n`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to accept a host connection. Generous: a
/// guest kernel here runs ~1000x slower than on bare metal.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may stall the teardown of a connection whose host
/// side is gone: to take what the host left (each packet it takes
/// restarts the clock) and our SHUTDOWN, then to answer with RST. Then
/// the connection is reset. Without it a hostile guest could hold the host
/// socket and a connection slot forever, by posting no rx buffers, giving
/// no credit or never answering; a live Linux guest answers at once
/// unless its application has not read everything yet.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause of the listener after accept() failed for want of fds or
/// memory: the client stays in the backlog, so the listener stays
/// readable and retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest such pause: the pause doubles while accept() keeps failing,
/// and this bounds how late we notice that resources freed up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll token of the listener; connection tokens are their fds.
pub const LISTENER_TOKEN: u64 = u64::MAX - 1;

type Key = (u32, u32);

/// The muxer's timeouts and backoffs; the defaults are the constants
/// above, tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a host client may take to send `CONNECT <port>\n`.
    pub handshake: Duration,
    /// How long the guest may take to accept a host connection.
    pub connect: Duration,
    /// How long the guest may stall a teardown (see `CLOSE_TIMEOUT`).
    pub close: Duration,
    /// First pause of the listener after a failed accept().
    pub accept_backoff_min: Duration,
    /// Longest pause of the listener.
    pub accept_backoff_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: HANDSHAKE_TIMEOUT,
            connect: CONNECT_TIMEOUT,
            close: CLOSE_TIMEOUT,
            accept_backoff_min: ACCEPT_BACKOFF_MIN,
            accept_backoff_max: ACCEPT_BACKOFF_MAX,
        }
    }
}

/// The listener's pauses after accept() failures that retrying at once
/// cannot fix (out of fds or memory): growing while the failures last.
#[derive(Debug, Clone, Copy)]
struct AcceptBackoff {
    min: Duration,
    max: Duration,
    /// The pause after the next failure.
    next: Duration,
    /// While paused: when to try again.
    until: Option<Instant>,
}

impl AcceptBackoff {
    fn new(min: Duration, max: Duration) -> Self {
        AcceptBackoff {
            min,
            max,
            next: min,
            until: None,
        }
    }

    /// accept() failed at `now`: pause, twice as long as the last time.
    fn fail(&mut self, now: Instant) {
        self.until = Some(now + self.next);
        self.next = self.next.saturating_mul(2).min(self.max);
    }

    /// The backlog drained: the listener is healthy again.
    fn clear(&mut self) {
        self.until = None;
        self.next = self.min;
    }

    fn paused(&self) -> bool {
        self.until.is_some()
    }

    fn due(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u <= now)
    }
}

/// What an accept() error means for the listener.
#[derive(Debug, PartialEq, Eq)]
enum AcceptError {
    /// Try the next client now: interrupted, or this client gave up.
    Retry,
    /// The backlog is empty.
    Drained,
    /// Out of fds, memory or buffers: trying again at once would fail the
    /// same way.
    BackOff,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.kind() {
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => AcceptError::Retry,
        io::ErrorKind::WouldBlock => AcceptError::Drained,
        _ => AcceptError::BackOff,
    }
}

struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Counters for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Guest packets dropped as malformed.
    pub malformed: u64,
    /// accept() failures that paused the listener.
    pub accept_failures: u64,
}

/// The connection table and its sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    interest: HashMap<RawFd, EventSet>,
    rsts: VecDeque<PacketHeader>,
    next_local_port: u32,
    stats: Stats,
    timeouts: Timeouts,
    backoff: AcceptBackoff,
}

fn epoll_event(events: EventSet, token: u64) -> EpollEvent {
    EpollEvent::new(events, token)
}

impl Muxer {
    /// A muxer serving `listener` (bound at the VM's `vsock.sock`).
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> io::Result<Self> {
        Self::with_timeouts(guest_cid, uds_path, listener, Timeouts::default())
    }

    /// [`Muxer::new`] with other timeouts.
    pub fn with_timeouts(
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
        timeouts: Timeouts,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            epoll_event(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            interest: HashMap::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            stats: Stats::default(),
            timeouts,
            backoff: AcceptBackoff::new(timeouts.accept_backoff_min, timeouts.accept_backoff_max),
        })
    }

    /// Gives back the listener (when the device is reset).
    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    /// The epoll set, for the worker to add its own fds with tokens below
    /// [`LISTENER_TOKEN`] that cannot collide with fds.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn queue_rst(&mut self, to: &PacketHeader) {
        self.push_rst(PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn push_rst(&mut self, rst: PacketHeader) {
        if self.rsts.len() >= MAX_QUEUED_RSTS {
            self.rsts.pop_front();
        }
        self.rsts.push_back(rst);
    }

    // ---- guest -> host -------------------------------------------------

    /// Consumes every packet the guest queued on the tx queue. Returns
    /// true if buffers were returned (the guest may need an interrupt).
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Err(why) = self.handle_tx_chain(mem, chain) {
                self.stats.malformed += 1;
                guest_warn!(why, "vsock: dropping malformed packet from the guest");
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                guest_warn!(error = %e, "vsock: cannot return a tx buffer");
                break;
            }
            used = true;
        }
        used
    }

    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), &'static str> {
        let mut reader = Reader::new(mem, chain).map_err(|_| "descriptor outside guest memory")?;
        if reader.available_bytes() < HEADER_SIZE {
            return Err("chain shorter than a header");
        }
        let hdr = reader
            .read_obj::<PacketHeader>()
            .map_err(|_| "unreadable header")?
            .swap_le();
        if hdr.len > MAX_PAYLOAD {
            return Err("payload length over 64 KiB");
        }
        if reader.available_bytes() < hdr.len as usize {
            return Err("payload length beyond the chain");
        }
        let mut payload = vec![0u8; hdr.len as usize];
        reader
            .read_exact(&mut payload)
            .map_err(|_| "unreadable payload")?;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            return Err("wrong source or destination CID");
        }
        if hdr.type_ != TYPE_STREAM {
            self.queue_rst(&hdr);
            return Err("not a stream packet");
        }
        self.on_guest_packet(&hdr, &payload);
        Ok(())
    }

    fn on_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(hdr, payload);
            self.apply(key, verdict);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(hdr),
            op::RST => {}
            _ => self.queue_rst(hdr),
        }
    }

    /// The guest connects to host port P: reach `<vsock.sock>_P`.
    fn guest_connect(&mut self, hdr: &PacketHeader) {
        let port = hdr.dst_port;
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!(
                port,
                "vsock: connection limit reached; refusing guest connect"
            );
            self.queue_rst(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(_) => {
                self.queue_rst(hdr);
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            self.queue_rst(hdr);
            return;
        }
        let conn = Connection::guest_initiated(stream, self.guest_cid, hdr, self.timeouts.close);
        self.insert(conn);
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream().as_raw_fd();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.refresh_interest(key);
    }

    /// Takes a connection out of the table and epoll; dropping it closes
    /// the host socket.
    fn remove(&mut self, key: Key) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream().as_raw_fd();
        self.by_fd.remove(&fd);
        self.unregister(fd);
        Some(conn)
    }

    /// Does what a connection's verdict says.
    fn apply(&mut self, key: Key, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Drop => {
                self.remove(key);
            }
            Verdict::Reset => {
                // The RST waits in our queue rather than in the connection,
                // so the host socket closes now, rx buffers or not.
                if let Some(conn) = self.remove(key) {
                    self.push_rst(conn.header(op::RST, 0, 0));
                }
            }
        }
    }

    /// Registers a connection's socket for what it can use now.
    fn refresh_interest(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            let (fd, events) = (conn.stream().as_raw_fd(), conn.host_interest());
            self.set_interest(fd, events);
        }
    }

    /// Registers `fd` for `events`, or takes it out of epoll for `None`.
    fn set_interest(&mut self, fd: RawFd, events: Option<EventSet>) {
        let Some(events) = events else {
            self.unregister(fd);
            return;
        };
        let op = match self.interest.get(&fd) {
            Some(cur) if *cur == events => return,
            Some(_) => ControlOperation::Modify,
            None => ControlOperation::Add,
        };
        // A registered descriptor is never negative.
        let Ok(token) = u64::try_from(fd) else {
            return;
        };
        if self.epoll.ctl(op, fd, epoll_event(events, token)).is_ok() {
            self.interest.insert(fd, events);
        }
    }

    fn unregister(&mut self, fd: RawFd) {
        if self.interest.remove(&fd).is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                epoll_event(EventSet::empty(), 0),
            );
        }
    }

    // ---- host sockets --------------------------------------------------

    /// Handles one epoll event for the listener or a socket.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_all(Instant::now());
            return;
        }
        let Ok(fd) = RawFd::try_from(token) else {
            return;
        };
        if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.on_host_event(key, events);
        }
    }

    fn on_host_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.on_host_hangup();
        } else {
            if events.contains(EventSet::IN) {
                conn.host_readable = true;
            }
            if events.contains(EventSet::OUT) {
                conn.flush_to_host();
            }
        }
        let verdict = conn.verdict();
        self.apply(key, verdict);
        // At once, not at the next update_interest(): a hang-up is
        // reported again on every wait until the socket leaves epoll.
        self.refresh_interest(key);
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.start_handshake(stream, now),
                Err(e) => match classify_accept_error(&e) {
                    AcceptError::Retry => continue,
                    AcceptError::Drained => return self.resume_listener(now),
                    AcceptError::BackOff => return self.pause_listener(now, &e),
                },
            }
        }
    }

    fn start_handshake(&mut self, stream: UnixStream, now: Instant) {
        if self.handshakes.len() >= MAX_HANDSHAKES || stream.set_nonblocking(true).is_err() {
            tracing::warn!("vsock: too many pending host handshakes; dropping a client");
            return;
        }
        let fd = stream.as_raw_fd();
        self.handshakes.insert(
            fd,
            Handshake {
                stream,
                buf: Vec::with_capacity(MAX_LINE),
                deadline: now + self.timeouts.handshake,
            },
        );
        self.set_interest(fd, Some(EventSet::IN));
    }

    /// Takes the listener out of epoll for a while after accept() failed
    /// with `e`: the client is still in the backlog, so epoll would report
    /// the listener on every wait. sweep() tries again when the pause ends.
    fn pause_listener(&mut self, now: Instant, e: &io::Error) {
        if !self.backoff.paused() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                epoll_event(EventSet::empty(), 0),
            );
        }
        self.backoff.fail(now);
        self.stats.accept_failures += 1;
        // Rate-limited: the guest can run us out of fds, with one host
        // socket per connection it opens.
        guest_warn!(error = %e, "vsock: cannot accept host connections; retrying later");
    }

    /// The backlog drained: puts the listener back in epoll if paused.
    fn resume_listener(&mut self, now: Instant) {
        if self.backoff.paused() {
            let added = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                epoll_event(EventSet::IN, LISTENER_TOKEN),
            );
            if let Err(e) = added {
                return self.pause_listener(now, &e);
            }
        }
        self.backoff.clear();
    }

    fn drop_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        let hs = self.handshakes.remove(&fd)?;
        self.unregister(fd);
        Some(hs)
    }

    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // Read byte-wise up to the newline so nothing after it (the first
        // bytes of the stream) is consumed here.
        let mut byte = [0u8; 1];
        let parsed = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) => {
                    hs.buf.push(byte[0]);
                    match handshake::parse_connect(&hs.buf) {
                        Ok(Some((port, _))) => break Ok(Some(port)),
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "vsock: bad handshake from a host client");
                            break Err(());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(_) => break Err(()),
            }
        };
        match parsed {
            Ok(None) => {}
            Err(()) => {
                self.drop_handshake(fd);
            }
            Ok(Some(port)) => {
                let Some(hs) = self.drop_handshake(fd) else {
                    return;
                };
                if self.conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!(
                        port,
                        "vsock: connection limit reached; refusing host connect"
                    );
                    return;
                }
                let local_port = self.allocate_local_port(port);
                let conn = Connection::host_initiated(
                    hs.stream,
                    self.guest_cid,
                    local_port,
                    port,
                    Instant::now() + self.timeouts.connect,
                    self.timeouts.close,
                );
                self.insert(conn);
            }
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// Times out stale handshakes and connections, and retries accept()
    /// after a pause; call periodically, and at [`Muxer::next_deadline`].
    pub fn sweep(&mut self, now: Instant) {
        if self.backoff.due(now) {
            self.accept_all(now);
        }
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            self.drop_handshake(fd);
        }
        for conn in self.conns.values_mut() {
            if conn.deadline.is_some_and(|d| d <= now) {
                if conn.state() == State::LocalInit {
                    tracing::warn!(
                        peer_port = conn.peer_port,
                        "vsock: guest did not accept a host connection in time"
                    );
                }
                conn.expire();
            }
        }
        self.reap();
    }

    /// Drops or resets the connections whose state calls for it.
    fn reap(&mut self) {
        let settled: Vec<(Key, Verdict)> = self
            .conns
            .iter()
            .map(|(k, c)| (*k, c.verdict()))
            .filter(|(_, v)| *v != Verdict::Keep)
            .collect();
        for (key, verdict) in settled {
            self.apply(key, verdict);
        }
    }

    /// The nearest deadline, for the worker's epoll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let hs = self.handshakes.values().map(|h| h.deadline);
        let cs = self.conns.values().filter_map(|c| c.deadline);
        hs.chain(cs).chain(self.backoff.until).min()
    }

    /// Re-registers each socket for what its connection can use now.
    pub fn update_interest(&mut self) {
        let wanted: Vec<(RawFd, Option<EventSet>)> = self
            .conns
            .values()
            .map(|c| (c.stream().as_raw_fd(), c.host_interest()))
            .collect();
        for (fd, ev) in wanted {
            self.set_interest(fd, ev);
        }
    }

    // ---- host -> guest -------------------------------------------------

    /// True if something waits for an rx buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || self.conns.values().any(Connection::has_rx_work)
    }

    /// Fills rx buffers with what is owed to the guest. Returns true if
    /// buffers were used.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.has_rx_work() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(mem, chain) {
                Ok(mut w) => self.fill_rx(&mut w),
                Err(_) => {
                    self.stats.malformed += 1;
                    guest_warn!("vsock: rx buffer outside guest memory");
                    Some(0)
                }
            };
            match written {
                Some(len) => {
                    // A used length is 32 bits (virtio 1.1, 2.6.8).
                    let len = u32::try_from(len).unwrap_or(u32::MAX);
                    if queue.add_used(mem, head, len).is_err() {
                        break;
                    }
                    used = true;
                }
                None => {
                    queue.go_to_previous_position();
                    break;
                }
            }
        }
        self.reap();
        used
    }

    /// Writes one packet into `w`; `None` if there was nothing to send
    /// after all, `Some(0)` if the buffer was unusable.
    fn fill_rx(&mut self, w: &mut Writer<'_>) -> Option<usize> {
        if w.available_bytes() < HEADER_SIZE {
            self.stats.malformed += 1;
            return Some(0);
        }
        if let Some(hdr) = self.rsts.pop_front() {
            return write_packet(w, &hdr, &[]);
        }
        for conn in self.conns.values_mut() {
            if let Some(hdr) = conn.next_control() {
                return write_packet(w, &hdr, &[]);
            }
        }
        let room = w.available_bytes() - HEADER_SIZE;
        for conn in self.conns.values_mut() {
            if !(conn.host_readable && conn.wants_host_read()) {
                continue;
            }
            match conn.read_host(room) {
                Ok(data) if !data.is_empty() => {
                    let len =
                        u32::try_from(data.len()).expect("read_host reads at most MAX_PAYLOAD");
                    let hdr = conn.header(op::RW, len, 0);
                    return write_packet(w, &hdr, &data);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "vsock: host socket read failed"),
            }
            // EOF or nothing read: a control packet may now be owed.
            if let Some(hdr) = conn.next_control() {
                return write_packet(w, &hdr, &[]);
            }
        }
        None
    }
}

fn write_packet(w: &mut Writer<'_>, hdr: &PacketHeader, data: &[u8]) -> Option<usize> {
    if w.write_obj(hdr.swap_le()).is_err() || w.write_all(data).is_err() {
        return Some(0);
    }
    Some(HEADER_SIZE + data.len())
}

#[cfg(test)]
mod tests {
    use super::super::connection::BUF_ALLOC;
    use super::super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    /// `HEADER_SIZE` as a descriptor length.
    const HDR_LEN: u32 = 44;
    const _: () = assert!(HDR_LEN as usize == HEADER_SIZE);
    const RX_BUF: u32 = 4096 + HDR_LEN;

    /// A guest side for the muxer: mock rx/tx queues in guest memory.
    struct Guest {
        mem: &'static GuestMemoryMmap,
        rxq: MockSplitQueue<'static, GuestMemoryMmap>,
        txq: MockSplitQueue<'static, GuestMemoryMmap>,
        rx: Queue,
        tx: Queue,
        rx_next_desc: u16,
        tx_next_desc: u16,
        rx_seen: u16,
        tx_data: u64,
        dir: tempfile::TempDir,
        muxer: Muxer,
    }

    fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    impl Guest {
        fn new() -> Guest {
            Guest::with_timeouts(Timeouts::default())
        }

        fn with_timeouts(timeouts: Timeouts) -> Guest {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
            ));
            let rxq = MockSplitQueue::create(mem, GuestAddress(0), 256);
            let txq = MockSplitQueue::create(mem, GuestAddress(0x10_0000), 256);
            let rx = rxq.create_queue().unwrap();
            let tx = txq.create_queue().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vsock.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let muxer = Muxer::with_timeouts(GUEST_CID, &path, listener, timeouts).unwrap();
            Guest {
                mem,
                rxq,
                txq,
                rx,
                tx,
                rx_next_desc: 0,
                tx_next_desc: 0,
                rx_seen: 0,
                tx_data: 0x40_0000,
                dir,
                muxer,
            }
        }

        fn uds(&self) -> PathBuf {
            self.dir.path().join("vsock.sock")
        }

        /// Opens a stream from guest port `from` to a host listener on
        /// port `to` (bound here), with `rx` buffers posted and
        /// `buf_alloc` advertised; returns the host's end once the guest
        /// has its RESPONSE.
        fn open_to_host(&mut self, from: u32, to: u32, rx: u16, buf_alloc: u32) -> UnixStream {
            let mut path = self.uds().into_os_string();
            path.push(format!("_{to}"));
            let host = UnixListener::bind(&path).unwrap();
            self.post_rx(rx);
            let mut req = hdr(op::REQUEST, from, to, 0);
            req.buf_alloc = buf_alloc;
            self.send(req, &[]);
            self.pump();
            assert_eq!(ops(&self.received()), vec![op::RESPONSE]);
            host.accept().unwrap().0
        }

        /// Posts `n` rx buffers.
        fn post_rx(&mut self, n: u16) {
            for _ in 0..n {
                let i = self.rx_next_desc;
                let addr = 0x80_0000 + u64::from(i) * u64::from(RX_BUF);
                let d = RawDescriptor::from(SplitDescriptor::new(addr, RX_BUF, F_WRITE, 0));
                self.rxq.add_desc_chains(&[d], i).unwrap();
                self.rx_next_desc += 1;
            }
        }

        /// Queues raw descriptors (one chain) on tx and runs the muxer.
        fn send_raw(&mut self, descs: &[RawDescriptor]) {
            self.txq.add_desc_chains(descs, self.tx_next_desc).unwrap();
            self.tx_next_desc += u16::try_from(descs.len()).unwrap();
            self.muxer.process_tx(&mut self.tx, self.mem);
        }

        /// Sends a well-formed packet: header and payload in two descriptors.
        fn send(&mut self, h: PacketHeader, payload: &[u8]) {
            let h_addr = self.tx_data;
            let p_addr = h_addr + 0x100;
            self.tx_data += 0x1_0000 + payload.len() as u64;
            self.mem
                .write_obj(h.swap_le(), GuestAddress(h_addr))
                .unwrap();
            self.mem.write_slice(payload, GuestAddress(p_addr)).unwrap();
            let i = self.tx_next_desc;
            let descs = if payload.is_empty() {
                vec![RawDescriptor::from(SplitDescriptor::new(
                    h_addr, HDR_LEN, 0, 0,
                ))]
            } else {
                vec![
                    RawDescriptor::from(SplitDescriptor::new(h_addr, HDR_LEN, F_NEXT, i + 1)),
                    RawDescriptor::from(SplitDescriptor::new(
                        p_addr,
                        u32::try_from(payload.len()).unwrap(),
                        0,
                        0,
                    )),
                ]
            };
            self.send_raw(&descs);
        }

        /// Dispatches pending socket events, then fills rx buffers.
        fn pump(&mut self) {
            for _ in 0..3 {
                let mut events = vec![EpollEvent::default(); 16];
                let n = self.muxer.epoll().wait(50, &mut events).unwrap();
                for ev in &events[..n] {
                    self.muxer.handle_event(ev.data(), ev.event_set());
                }
                self.muxer.sweep(Instant::now());
                self.muxer.process_rx(&mut self.rx, self.mem);
                self.muxer.update_interest();
            }
        }

        /// Runs the worker's loop for `period` and counts the epoll waits
        /// that returned events: each costs a trip through the loop, so a
        /// muxer with nothing it can do must not be woken.
        fn wakeups_over(&mut self, period: Duration) -> usize {
            let end = Instant::now() + period;
            let mut events = vec![EpollEvent::default(); 16];
            let mut wakeups = 0;
            while Instant::now() < end {
                let n = self.muxer.epoll().wait(5, &mut events).unwrap();
                wakeups += usize::from(n > 0);
                for ev in &events[..n] {
                    self.muxer.handle_event(ev.data(), ev.event_set());
                }
                self.muxer.sweep(Instant::now());
                self.muxer.process_rx(&mut self.rx, self.mem);
                self.muxer.update_interest();
            }
            wakeups
        }

        /// Packets the device put in rx buffers since the last call.
        fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            let used = self.rxq.used();
            let idx = used.idx().load();
            let mut out = Vec::new();
            while self.rx_seen != idx {
                let elem = used
                    .ring()
                    .ref_at(usize::from(self.rx_seen))
                    .unwrap()
                    .load();
                let addr = 0x80_0000 + u64::from(elem.id()) * u64::from(RX_BUF);
                let h: PacketHeader = self
                    .mem
                    .read_obj::<PacketHeader>(GuestAddress(addr))
                    .unwrap()
                    .swap_le();
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                    .unwrap();
                assert_eq!(elem.len() as usize, HEADER_SIZE + data.len());
                out.push((h, data));
                self.rx_seen += 1;
            }
            out
        }
    }

    fn ops(pkts: &[(PacketHeader, Vec<u8>)]) -> Vec<u16> {
        pkts.iter().map(|(h, _)| h.op).collect()
    }

    #[test]
    fn guest_connect_without_host_listener_is_reset() {
        let mut g = Guest::new();
        g.post_rx(4);
        g.send(hdr(op::REQUEST, 5000, 77, 0), &[]);
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::RST]);
        let (h, _) = &got[0];
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (77, 5000, GUEST_CID));
        assert_eq!(g.muxer.connection_count(), 0);
    }

    #[test]
    fn guest_initiated_stream_carries_data_both_ways_and_closes() {
        let mut g = Guest::new();
        let mut peer = g.open_to_host(6000, 52, 8, 64 * 1024);

        g.send(hdr(op::RW, 6000, 52, 5), b"hello");
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        peer.write_all(b"world").unwrap();
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::RW]);
        assert_eq!(got[0].1, b"world");
        assert_eq!({ got[0].0.buf_alloc }, BUF_ALLOC);

        // Guest closes both ways: host sees EOF, guest gets the final RST.
        let mut sd = hdr(op::SHUTDOWN, 6000, 52, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(sd, &[]);
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::RST]);
        assert_eq!(peer.read(&mut buf).unwrap(), 0, "host side sees EOF");
        assert_eq!(g.muxer.connection_count(), 0);
    }

    #[test]
    fn host_initiated_connect_handshake_and_host_close() {
        let mut g = Guest::new();
        g.post_rx(8);
        let mut client = UnixStream::connect(g.uds()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::REQUEST]);
        let req = got[0].0;
        assert_eq!((req.dst_port, req.dst_cid), (1024, GUEST_CID));
        let host_port = req.src_port;

        g.send(hdr(op::RESPONSE, 1024, host_port, 0), &[]);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, format!("OK {host_port}\n").as_bytes());

        client.write_all(b"ping").unwrap();
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::RW]);
        assert_eq!(got[0].1, b"ping");

        drop(client);
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::SHUTDOWN]);
        assert_eq!({ got[0].0.flags }, SHUTDOWN_RCV | SHUTDOWN_SEND);
        g.send(hdr(op::RST, 1024, host_port, 0), &[]);
        assert_eq!(g.muxer.connection_count(), 0);
    }

    #[test]
    fn host_data_waits_for_guest_credit_and_rx_buffers() {
        let mut g = Guest::new();
        g.post_rx(1);
        let mut client = UnixStream::connect(g.uds()).unwrap();
        client.write_all(b"CONNECT 9\n").unwrap();
        g.pump();
        let host_port = g.received()[0].0.src_port;
        // The guest accepts but advertises a 3-byte buffer.
        let mut resp = hdr(op::RESPONSE, 9, host_port, 0);
        resp.buf_alloc = 3;
        g.send(resp, &[]);
        client.write_all(b"abcdef").unwrap();
        g.pump();
        assert!(g.received().is_empty(), "no rx buffer posted");
        g.post_rx(4);
        g.pump();
        let got = g.received();
        assert_eq!(
            got.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
            vec![b"abc".to_vec()],
            "only 3 bytes of credit"
        );
        // The guest consumed them: credit for three more.
        let mut upd = hdr(op::CREDIT_UPDATE, 9, host_port, 0);
        upd.buf_alloc = 3;
        upd.fwd_cnt = 3;
        g.send(upd, &[]);
        g.pump();
        assert_eq!(g.received()[0].1, b"def");
    }

    #[test]
    fn guest_that_overruns_its_credit_is_reset() {
        let mut g = Guest::new();
        let _peer = g.open_to_host(6001, 53, 8, 64 * 1024);
        // The host never reads; its socket buffer fills, then ours.
        let chunk = vec![7u8; MAX_PAYLOAD as usize];
        let mut sent = 0usize;
        while g.muxer.connection_count() == 1 && sent < 64 << 20 {
            g.send(hdr(op::RW, 6001, 53, MAX_PAYLOAD), &chunk);
            sent += chunk.len();
            g.pump();
            if ops(&g.received()).contains(&op::RST) {
                break;
            }
        }
        assert!(sent < 64 << 20, "guest was never reset");
        assert_eq!(g.muxer.connection_count(), 0);
    }

    #[test]
    fn malformed_chains_are_dropped_without_panic() {
        let mut g = Guest::new();
        g.post_rx(8);
        let base = 0x60_0000;
        // 1: a 10-byte chain, shorter than a header.
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(base, 10, 0, 0))]);
        // 2: payload length over the limit.
        g.mem
            .write_obj(
                hdr(op::RW, 1, 2, MAX_PAYLOAD + 1).swap_le(),
                GuestAddress(base),
            )
            .unwrap();
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(
            base, HDR_LEN, 0, 0,
        ))]);
        // 3: payload length beyond the chain.
        g.mem
            .write_obj(hdr(op::RW, 1, 2, 100).swap_le(), GuestAddress(base))
            .unwrap();
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(
            base,
            HDR_LEN + 10,
            0,
            0,
        ))]);
        // 4: descriptor outside guest memory.
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(
            0xffff_ffff_0000,
            64,
            0,
            0,
        ))]);
        // 5: only a device-writable descriptor.
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(
            base, 64, F_WRITE, 0,
        ))]);
        // 6: spoofed source CID.
        let mut spoof = hdr(op::REQUEST, 1, 2, 0);
        spoof.src_cid = 99;
        g.mem
            .write_obj(spoof.swap_le(), GuestAddress(base))
            .unwrap();
        g.send_raw(&[RawDescriptor::from(SplitDescriptor::new(
            base, HDR_LEN, 0, 0,
        ))]);
        // 7: a length that overflows when summed across descriptors.
        let i = g.tx_next_desc;
        g.send_raw(&[
            RawDescriptor::from(SplitDescriptor::new(base, u32::MAX, F_NEXT, i + 1)),
            RawDescriptor::from(SplitDescriptor::new(base, u32::MAX, 0, 0)),
        ]);
        assert_eq!(g.muxer.stats().malformed, 7);
        assert_eq!(
            g.txq.used().idx().load(),
            7,
            "every chain is returned to the guest"
        );
        g.pump();
        assert!(g.received().is_empty(), "nothing answered to garbage");

        // 8: a datagram packet gets an RST; 9: data for an unknown stream too.
        let mut dgram = hdr(op::RW, 1, 2, 0);
        dgram.type_ = 3;
        g.send(dgram, &[]);
        g.send(hdr(op::RW, 4, 5, 3), b"abc");
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::RST, op::RST]);
        assert_eq!(g.muxer.connection_count(), 0);
    }

    #[test]
    fn many_concurrent_host_connections_each_get_their_own_stream() {
        let mut g = Guest::new();
        g.post_rx(200);
        let mut clients: Vec<UnixStream> = (0..32)
            .map(|_| {
                let mut c = UnixStream::connect(g.uds()).unwrap();
                c.write_all(b"CONNECT 1024\n").unwrap();
                c
            })
            .collect();
        g.pump();
        let reqs = g.received();
        assert_eq!(reqs.len(), 32);
        let mut ports: Vec<u32> = reqs.iter().map(|(h, _)| h.src_port).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 32, "each connection has its own host port");
        for (h, _) in &reqs {
            g.send(hdr(op::RESPONSE, 1024, h.src_port, 0), &[]);
        }
        for c in clients.iter_mut() {
            let mut line = [0u8; 14];
            c.read_exact(&mut line).unwrap();
            assert!(line.starts_with(b"OK "));
            let port: u32 = std::str::from_utf8(&line[3..13]).unwrap().parse().unwrap();
            c.write_all(format!("from {port}").as_bytes()).unwrap();
        }
        g.pump();
        let data = g.received();
        assert_eq!(data.len(), 32);
        for (h, payload) in data {
            assert_eq!(
                payload,
                format!("from {}", { h.src_port }).into_bytes(),
                "data stays on its own stream"
            );
        }
        assert_eq!(g.muxer.connection_count(), 32);
    }

    #[test]
    fn bad_handshakes_are_closed() {
        let mut g = Guest::new();
        g.post_rx(4);
        let mut junk = UnixStream::connect(g.uds()).unwrap();
        junk.write_all(b"HELLO THERE\n").unwrap();
        let mut long = UnixStream::connect(g.uds()).unwrap();
        long.write_all(&[b'A'; 100]).unwrap();
        g.pump();
        // Closed: EOF, or a reset where our unread bytes were discarded.
        let closed = |s: &mut UnixStream| match s.read(&mut [0u8; 8]) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        };
        assert!(closed(&mut junk));
        assert!(closed(&mut long));
        assert!(g.received().is_empty(), "the guest never hears of them");
    }

    #[test]
    fn host_hangup_while_guest_posts_no_buffers_does_not_spin() {
        let mut g = Guest::new();
        g.post_rx(1);
        let mut client = UnixStream::connect(g.uds()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        g.pump();
        let host_port = g.received()[0].0.src_port;
        g.send(hdr(op::RESPONSE, 1024, host_port, 0), &[]);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        // The guest's only buffer went to the REQUEST; now the host hangs up.
        drop(client);
        let wakeups = g.wakeups_over(Duration::from_millis(200));
        assert!(wakeups < 5, "{wakeups} wakeups in 200 ms");
        assert!(g.muxer.interest.is_empty(), "the socket left epoll");
        // Once the guest posts buffers it hears of the close.
        g.post_rx(2);
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::SHUTDOWN]);
    }

    #[test]
    fn host_hangup_while_guest_gives_no_credit_does_not_spin() {
        let mut g = Guest::new();
        let mut peer = g.open_to_host(6002, 54, 8, 0);
        peer.write_all(b"bye").unwrap();
        drop(peer);
        let wakeups = g.wakeups_over(Duration::from_millis(200));
        assert!(wakeups < 5, "{wakeups} wakeups in 200 ms");
        assert!(g.muxer.interest.is_empty(), "the socket left epoll");
        assert!(g.received().is_empty(), "no credit, no data");
        // Credit arrives: the data, then the close.
        let mut upd = hdr(op::CREDIT_UPDATE, 6002, 54, 0);
        upd.buf_alloc = 4096;
        g.send(upd, &[]);
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::RW, op::SHUTDOWN]);
        assert_eq!(got[0].1, b"bye");
    }

    /// Set in the environment of the child that runs [`emfile_child`].
    const EMFILE_CHILD_ENV: &str = "VMCRI_VSOCK_TEST_EMFILE_CHILD";

    /// accept() failing with EMFILE must back off, not spin. The body runs
    /// in a child process of its own (this test binary, re-executed, not
    /// forked) because it lowers the fd limit of the whole process.
    #[test]
    fn accept_out_of_fds_backs_off_and_recovers() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "devices::vsock::muxer::tests::emfile_child",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(EMFILE_CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The body of [`accept_out_of_fds_backs_off_and_recovers`]; does
    /// nothing unless run by it.
    #[test]
    fn emfile_child() {
        if std::env::var_os(EMFILE_CHILD_ENV).is_none() {
            return;
        }
        let mut g = Guest::new();
        g.post_rx(1);
        let mut client = UnixStream::connect(g.uds()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        // open() takes the lowest free fd, so every fd below `spare` is in
        // use: with the limit just above it, accept() finds none.
        let spare = std::fs::File::open("/dev/null").unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for the kernel to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        lim.rlim_cur = libc::rlim_t::try_from(spare.as_raw_fd()).unwrap() + 1;
        // SAFETY: `lim` is a valid rlimit; only this child process is affected.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let low = lim.rlim_cur;
        let wakeups = g.wakeups_over(Duration::from_millis(200));
        assert!(wakeups < 5, "{wakeups} wakeups in 200 ms");
        // Retries at 0, 10, 30, 70 and 150 ms at most.
        let failures = g.muxer.stats().accept_failures;
        assert!((1..=6).contains(&failures), "{failures} failed accepts");
        assert!(g.received().is_empty());
        // fds free up: a retry accepts the client.
        drop(spare);
        lim.rlim_cur = lim.rlim_max.min(low + 64);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let end = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < end {
            g.pump();
            got = g.received();
        }
        assert_eq!(ops(&got), vec![op::REQUEST]);
        // The listener is back in epoll: the next client needs no retry.
        let mut next = UnixStream::connect(g.uds()).unwrap();
        next.write_all(b"CONNECT 1025\n").unwrap();
        g.post_rx(1);
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::REQUEST]);
        assert_eq!(g.muxer.stats().accept_failures, failures);
    }

    #[test]
    fn teardown_deadline_resets_a_guest_that_takes_nothing() {
        let mut g = Guest::new();
        g.post_rx(1);
        let mut client = UnixStream::connect(g.uds()).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        g.pump();
        let host_port = g.received()[0].0.src_port;
        g.send(hdr(op::RESPONSE, 1024, host_port, 0), &[]);
        client.read_exact(&mut [0u8; 14]).unwrap();
        client.write_all(b"unread").unwrap();
        // The host leaves; the guest posts no buffer for the data or our
        // SHUTDOWN.
        drop(client);
        g.pump();
        assert_eq!(g.muxer.connection_count(), 1);
        let deadline = g.muxer.next_deadline().unwrap();
        assert!(deadline <= Instant::now() + CLOSE_TIMEOUT);
        g.muxer.sweep(deadline);
        assert_eq!(g.muxer.connection_count(), 0, "reset at the deadline");
        g.post_rx(2);
        g.pump();
        let got = g.received();
        assert_eq!(ops(&got), vec![op::RST]);
        assert_eq!({ got[0].0.src_port }, host_port);
    }

    #[test]
    fn unanswered_shutdown_is_reset_at_the_deadline() {
        let close = Duration::from_millis(40);
        let mut g = Guest::with_timeouts(Timeouts {
            close,
            ..Timeouts::default()
        });
        drop(g.open_to_host(6004, 56, 8, 64 * 1024));
        // pump() waits 3 x 50 ms: the guest gets our SHUTDOWN, does not
        // answer, and is reset once `close` has passed.
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::SHUTDOWN, op::RST]);
        assert_eq!(g.muxer.connection_count(), 0);
        assert_eq!(g.muxer.next_deadline(), None);
    }

    #[test]
    fn reset_closes_the_host_socket_without_waiting_for_rx_buffers() {
        let mut g = Guest::new();
        let mut peer = g.open_to_host(6003, 55, 1, 64 * 1024);
        // An op no guest may send resets the connection; there is no rx
        // buffer for the RST.
        g.send(hdr(99, 6003, 55, 0), &[]);
        assert_eq!(g.muxer.connection_count(), 0);
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(peer.read(&mut [0u8; 8]).unwrap(), 0, "host sees EOF");
        g.post_rx(1);
        g.pump();
        assert_eq!(ops(&g.received()), vec![op::RST]);
    }

    #[test]
    fn accept_backoff_doubles_up_to_its_cap_and_clears() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(50));
        let mut b = AcceptBackoff::new(min, max);
        let t = Instant::now();
        assert!(!b.paused() && !b.due(t));
        let pauses: Vec<Duration> = (0..5)
            .map(|_| {
                b.fail(t);
                b.until.unwrap() - t
            })
            .collect();
        assert_eq!(pauses, [10, 20, 40, 50, 50].map(Duration::from_millis));
        assert!(b.paused());
        assert!(!b.due(t + Duration::from_millis(49)));
        assert!(b.due(t + max));
        b.clear();
        assert!(!b.paused());
        b.fail(t);
        assert_eq!(b.until, Some(t + min), "back to the shortest pause");
    }

    #[test]
    fn accept_errors_out_of_resources_back_off() {
        let kind = |errno| classify_accept_error(&io::Error::from_raw_os_error(errno));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(kind(errno), AcceptError::BackOff, "errno {errno}");
        }
        assert_eq!(kind(libc::EAGAIN), AcceptError::Drained);
        assert_eq!(kind(libc::EINTR), AcceptError::Retry);
        assert_eq!(kind(libc::ECONNABORTED), AcceptError::Retry);
    }
}
