//! Writes the hand-made seed corpora into `fuzz/corpus/<target>/`:
//! `cargo run -p vmcri-fuzz --example make_seeds`. Each seed is spelled
//! out in the target's input language (see each target's `run`), with
//! what it exercises in its name. Findings are added beside them by hand.

use bytes::{BufMut, Bytes, BytesMut};
use std::path::Path;
use tokio_util::codec::Encoder;
use vmcri_streaming::spdy::{Frame, FrameEncoder, Setting};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), data).expect("seed");
}

/// Bytes of little-endian fields, for spelling out inputs.
#[derive(Default)]
struct Seed(Vec<u8>);

impl Seed {
    fn b(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn w(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn d(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn q(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-prefixed string (one length byte).
    fn s(mut self, v: &[u8]) -> Self {
        self.0.push(u8::try_from(v.len()).expect("short"));
        self.0.extend_from_slice(v);
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

// ---- vsock -------------------------------------------------------------

mod vsock {
    use super::Seed;

    pub const PACKET: u8 = 0;
    pub const RAW: u8 = 2;
    pub const POST_RX: u8 = 3;
    pub const HOST_CONNECT: u8 = 4;
    pub const HOST_WRITE: u8 = 5;
    pub const HOST_READ: u8 = 6;
    pub const HOST_CLOSE: u8 = 7;
    pub const PUMP: u8 = 8;
    pub const SWEEP: u8 = 9;

    /// Port choices: index `i` into the known ports.
    pub fn known(i: u8) -> u8 {
        1 + 4 * i
    }

    /// `n` rx chains of one 4 KiB buffer each.
    pub fn post_rx(s: Seed, n: u8) -> Seed {
        let mut s = s.b(POST_RX).b(n - 1);
        for _ in 0..n {
            s = s.b(0).b(1);
        }
        s
    }

    /// A well-formed packet: op, host port and guest port (as known-port
    /// indexes), payload, optional flags and credit.
    pub fn packet(s: Seed, op: u8, host: u8, guest: u8, payload: &[u8], flags: Option<u8>) -> Seed {
        let ctl: u16 = if flags.is_some() { 32 } else { 0 };
        let mut s = s
            .b(PACKET)
            .b(0)
            .s(payload)
            .w(ctl)
            .b(op)
            .b(known(host))
            .b(known(guest));
        if let Some(f) = flags {
            s = s.b(f);
        }
        s.b(0)
    }
}

fn vsock_seeds() {
    use vsock::*;
    // The guest connects to the host service (port 52), sends and
    // receives data, then closes both ways.
    let s = post_rx(Seed::default(), 4);
    let s = packet(s, 1, 0, 0, b"", None).b(PUMP);
    let s = packet(s, 5, 0, 0, b"hello", None).b(PUMP);
    let s = s
        .b(HOST_READ)
        .b(0)
        .b(HOST_WRITE)
        .b(0)
        .b(0)
        .s(b"world")
        .b(PUMP);
    let s = post_rx(s, 2);
    let s = packet(s, 4, 0, 0, b"", Some(3)).b(PUMP);
    write("vsock", "guest-connect-data-shutdown", &s.0);

    // A host client connects to guest port 1024; the guest accepts; data
    // both ways; the host hangs up; the guest answers RST.
    let s = post_rx(Seed::default(), 4);
    let s = s.b(HOST_CONNECT).b(1).d(1024).b(PUMP);
    let s = packet(s, 2, 1, 0, b"", None).b(PUMP);
    let s = s
        .b(HOST_READ)
        .b(0)
        .b(HOST_WRITE)
        .b(0)
        .b(0)
        .s(b"ping")
        .b(PUMP);
    let s = post_rx(s, 2);
    let s = packet(s, 5, 1, 0, b"pong", None).b(PUMP);
    let s = s.b(HOST_CLOSE).b(0).b(0).b(PUMP);
    let s = packet(s, 3, 1, 0, b"", None).b(PUMP);
    write("vsock", "host-connect-data-hangup", &s.0);

    // Credit: the guest advertises 3 bytes, the host sends more; then a
    // credit update and a credit request.
    let s = post_rx(Seed::default(), 4);
    let s = s.b(HOST_CONNECT).b(1).d(9).b(PUMP);
    let s = s
        .b(PACKET)
        .b(0)
        .s(b"")
        .w(64)
        .b(2)
        .b(known(1))
        .b(known(2))
        .d(3)
        .b(0)
        .b(PUMP);
    let s = s.b(HOST_WRITE).b(0).b(0).s(b"abcdef").b(PUMP);
    let s = post_rx(s, 3);
    let s = s
        .b(PACKET)
        .b(0)
        .s(b"")
        .w(64 | 128)
        .b(6)
        .b(known(1))
        .b(known(2))
        .d(3)
        .d(3)
        .b(0)
        .b(PUMP);
    let s = packet(s, 7, 1, 2, b"", None).b(PUMP);
    write("vsock", "credit-limits-host-data", &s.0);

    // Malformed chains: too short, a lying length, an address outside
    // memory, a writable-only chain, a spoofed CID, an RST and data for
    // no connection.
    let s = post_rx(Seed::default(), 4);
    let s = s.b(RAW).b(0).b(0).w(0).w(10).w(0).w(0).s(&[0; 10]);
    let s = s
        .b(RAW)
        .b(0)
        .b(1)
        .q(0xffff_ffff_0000)
        .w(64)
        .w(0)
        .w(0)
        .s(b"");
    let s = s.b(RAW).b(0).b(0).w(0).w(64).w(2).w(0).s(b"");
    let s = s
        .b(PACKET)
        .b(0)
        .s(b"abc")
        .w(2)
        .b(5)
        .b(known(0))
        .b(known(0))
        .d(1000)
        .b(0);
    let s = s
        .b(PACKET)
        .b(0)
        .s(b"")
        .w(4)
        .b(1)
        .b(known(0))
        .b(known(0))
        .q(99)
        .b(0);
    let s = packet(s, 3, 0, 0, b"", None);
    let s = packet(s, 5, 0, 0, b"to nobody", None).b(PUMP);
    write("vsock", "malformed-chains", &s.0);

    // A split packet across three descriptors, a large payload, and a
    // sweep far in the future (timeouts).
    let s = post_rx(Seed::default(), 4);
    let s = s.b(HOST_CONNECT).b(1).d(7).b(PUMP);
    let s = s
        .b(PACKET)
        .b(0)
        .s(b"payload")
        .w(0)
        .b(1)
        .b(known(0))
        .b(known(1))
        .b(3)
        .w(10)
        .w(20);
    let s = s.b(PUMP).b(SWEEP).w(2000).b(PUMP);
    write("vsock", "split-chain-and-timeouts", &s.0);
}

// ---- fs ----------------------------------------------------------------

mod fuse {
    use super::Seed;

    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const CREATE: u32 = 35;

    use vmcri_fuzz::fs::{FIXED, NAMES, OPCODES};

    fn idx<T: PartialEq>(table: &[T], v: T) -> u8 {
        u8::try_from(table.iter().position(|x| *x == v).expect("in the table")).expect("small")
    }

    /// One request: opcode, node (index into the nodes learnt so far:
    /// 0 is the root, then in the order replies handed them out), a
    /// fixed part, up to two names, the fh to patch in (index).
    pub struct Req<'a> {
        pub op: u32,
        pub node: u8,
        pub fixed: &'a [u8],
        pub names: &'a [&'a [u8]],
        pub fh: Option<u8>,
        pub link_node: Option<u8>,
        pub data: Option<(u16, u8)>,
    }

    pub fn req(op: u32, node: u8, fixed: &[u8], names: &[&[u8]]) -> Vec<u8> {
        Req {
            op,
            node,
            fixed,
            names,
            fh: None,
            link_node: None,
            data: None,
        }
        .encode()
    }

    impl Req<'_> {
        pub fn encode(&self) -> Vec<u8> {
            let mut ctl: u16 = 0;
            if self.fh.is_some() {
                ctl |= 4;
            }
            if self.link_node.is_some() {
                ctl |= 8;
            }
            if !self.names.is_empty() {
                ctl |= 16;
            }
            if self.names.len() > 1 {
                ctl |= 32;
            }
            if self.data.is_some() {
                ctl |= 128;
            }
            let mut s = Seed::default()
                .w(ctl)
                .b(idx(OPCODES, self.op))
                .b(self.node)
                .b(idx(FIXED, self.fixed.len()))
                .raw(self.fixed);
            if let Some(fh) = self.fh {
                s = s.b(fh);
            }
            if let Some(n) = self.link_node {
                s = s.b(n);
            }
            for name in self.names {
                s = s.b(idx(NAMES, *name));
            }
            if let Some((n, byte)) = self.data {
                s = s.w(n).b(byte);
            }
            s.0
        }
    }

    /// Mode and umask, as MKDIR takes them.
    pub fn mkdir_in(mode: u32) -> Vec<u8> {
        Seed::default().d(mode).d(0o022).0
    }

    /// READ/WRITE's fixed part: fh (patched), offset, size.
    pub fn rw_in(offset: u64, size: u32) -> Vec<u8> {
        Seed::default().q(0).q(offset).d(size).d(0).q(0).d(0).d(0).0
    }
}

fn fs_seeds() {
    use fuse::*;
    let init = Seed::default().d(0).0;
    let open_ro = Seed::default().d(0).d(0).0;
    let cat = |parts: &[Vec<u8>]| {
        let mut v = init.clone();
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    // Read a shared file: LOOKUP, OPEN, READ, GETATTR.
    write(
        "fs",
        "lookup-open-read",
        &cat(&[
            req(LOOKUP, 0, &[], &[b"file"]),
            req(OPEN, 1, &open_ro, &[]),
            Req {
                op: READ,
                node: 1,
                fixed: &rw_in(0, 64),
                names: &[],
                fh: Some(0),
                link_node: None,
                data: None,
            }
            .encode(),
            req(GETATTR, 1, &[0; 16], &[]),
        ]),
    );
    // Names that climb are refused; symlinks are only read, never followed.
    write(
        "fs",
        "climb-and-symlinks",
        &cat(&[
            req(LOOKUP, 0, &[], &[b".."]),
            req(LOOKUP, 0, &[], &[b"."]),
            req(LOOKUP, 0, &[], &[b"../outside"]),
            req(LOOKUP, 0, &[], &[b"escape"]),
            req(READLINK, 1, &[], &[]),
            req(OPEN, 1, &open_ro, &[]),
            req(LOOKUP, 0, &[], &[b"abs"]),
            req(OPEN, 2, &open_ro, &[]),
            req(LOOKUP, 0, &[], &[b"up"]),
            req(OPENDIR, 3, &open_ro, &[]),
            req(LOOKUP, 3, &[], &[b"outside"]),
        ]),
    );
    // Make things: a directory, a file written through CREATE's handle,
    // a symlink, a hard link, a rename, an unlink, a FIFO, an xattr.
    write(
        "fs",
        "create-write-link-rename",
        &cat(&[
            req(MKDIR, 0, &mkdir_in(0o755), &[b"new"]),
            req(
                CREATE,
                1,
                &Seed::default().d(0o1 | 0o100).d(0o644).d(0o022).d(0).0,
                &[b"new2"],
            ),
            Req {
                op: WRITE,
                node: 2,
                fixed: &rw_in(0, 300),
                names: &[],
                fh: Some(0),
                link_node: None,
                data: Some((300, b'x')),
            }
            .encode(),
            req(SYMLINK, 0, &[], &[b"marker", b"../outside"]),
            Req {
                op: LINK,
                node: 0,
                fixed: &[0; 8],
                names: &[b"abs"],
                fh: None,
                link_node: Some(2),
                data: None,
            }
            .encode(),
            Req {
                op: RENAME,
                node: 1,
                fixed: &[0; 8],
                names: &[b"new2", b"new2"],
                fh: None,
                link_node: Some(0),
                data: None,
            }
            .encode(),
            req(UNLINK, 0, &[], &[b"abs"]),
            req(
                MKNOD,
                0,
                &Seed::default().d(0o10644).d(0).d(0o022).d(0).0,
                &[b"inner"],
            ),
            req(
                SETXATTR,
                0,
                &Seed::default().d(1).d(0).0,
                &[b"user.x", b"."],
            ),
        ]),
    );
    // Directory listing, and SETATTR on a file (chmod, truncate).
    let mut setattr = vec![0u8; 88];
    setattr[0] = 1 | 8; // FATTR_MODE | FATTR_SIZE
    setattr[16..24].copy_from_slice(&4u64.to_le_bytes());
    setattr[68..72].copy_from_slice(&0o100600u32.to_le_bytes());
    write(
        "fs",
        "readdir-setattr",
        &cat(&[
            req(OPENDIR, 0, &open_ro, &[]),
            Req {
                op: READDIR,
                node: 0,
                fixed: &rw_in(0, 4096),
                names: &[],
                fh: Some(0),
                link_node: None,
                data: None,
            }
            .encode(),
            req(LOOKUP, 0, &[], &[b"file"]),
            req(SETATTR, 1, &setattr, &[]),
        ]),
    );
}

// ---- mmio --------------------------------------------------------------

fn mmio_seeds() {
    const NEGOTIATE: u8 = 3;
    const SETUP_QUEUE: u8 = 4;
    const STATUS: u8 = 5;
    const PUSH: u8 = 7;
    const NOTIFY: u8 = 8;
    const REFUSE: u8 = 9;
    // The probe, brought up as Linux does, given a chain, notified, reset
    // and brought up again.
    let bring_up = |s: Seed| {
        s.b(NEGOTIATE)
            .b(0)
            .b(0x28)
            .b(SETUP_QUEUE)
            .b(0)
            .b(0)
            .b(SETUP_QUEUE)
            .b(1)
            .b(0)
            .b(STATUS)
            .b(2)
    };
    let s = bring_up(Seed::default().b(0));
    let s = s.b(PUSH).b(0).b(1).b(0).w(0).w(16).b(0).w(0x100).w(16);
    let s = s.b(NOTIFY).b(0).b(STATUS).b(0);
    let s = bring_up(s).b(NOTIFY).b(1);
    write("mmio", "probe-bring-up-notify-reset", &s.0);
    // The entropy device the same way.
    let s = bring_up(Seed::default().b(1));
    let s = s.b(PUSH).b(0).b(1).b(0).w(0).w(16).b(0).w(0x100).w(64);
    let s = s.b(NOTIFY).b(0).b(STATUS).b(0);
    write("mmio", "rng-bring-up-notify-reset", &s.0);
    // Refused features, a queue outside memory, a failing activation,
    // raw register reads and writes at odd widths.
    let s = Seed::default()
        .b(0)
        .b(NEGOTIATE)
        .b(1)
        .q(1 << 5)
        .b(STATUS)
        .b(2);
    let s = s.b(NEGOTIATE).b(0).b(0).b(SETUP_QUEUE).b(0).b(4);
    let s = s
        .q(0xffff_0000)
        .q(0x10)
        .q(0x20)
        .b(STATUS)
        .b(2)
        .b(NOTIFY)
        .b(0);
    let s = s.b(STATUS).b(0).b(REFUSE);
    let s = bring_up(s);
    let s = s
        .b(1)
        .b(0x80)
        .w(0x0fd)
        .b(3)
        .b(2)
        .b(0x80)
        .w(0x100)
        .b(2)
        .raw(&[1, 2]);
    write("mmio", "refusals-and-odd-accesses", &s.0);
}

// ---- net ---------------------------------------------------------------

mod net {
    use super::Seed;

    pub const MRG: u8 = 1;
    pub const EVENT_IDX: u8 = 2;
    pub const FRAME: u8 = 0;
    pub const RAW: u8 = 2;
    pub const POST_RX: u8 = 3;
    pub const HOST_SEND: u8 = 4;
    pub const NOTIFY: u8 = 6;
    pub const STEP: u8 = 7;

    /// A header asking for checksum offload (flags, gso_type, hdr_len,
    /// gso_size, csum_start, csum_offset, num_buffers).
    pub fn header(s: Seed) -> Seed {
        s.b(1).b(0).w(0).w(0).w(34).w(16).w(0)
    }

    /// A guest frame with a short payload, cut at `cuts` (bits 0-1 cut,
    /// 4-6 make a piece device-writable).
    pub fn frame(s: Seed, payload: &[u8], cuts: u8, at: &[u16]) -> Seed {
        let mut s = header(s.b(FRAME)).b(0).s(payload).b(cuts);
        for a in at {
            s = s.w(*a);
        }
        s
    }

    /// A guest frame of `n + 16` copies of `fill` (bit 7 set).
    pub fn big_frame(s: Seed, fill: u8, n: u16) -> Seed {
        header(s.b(FRAME)).b(0x80 | fill).w(n).b(0)
    }

    /// `chains` RX chains, each of the given descriptor size choices
    /// (0: 1526, 1: 4096, 2: a maximal frame; +0x40 readable, +0x00
    /// with bit 7 clear and 6 clear: outside memory), then a notify.
    pub fn post_rx(s: Seed, chains: &[&[u8]], notify: bool) -> Seed {
        let mut s = s.b(POST_RX).b(u8::try_from(chains.len() - 1).expect("few"));
        for c in chains {
            s = s.b(u8::try_from(c.len() - 1).expect("few"));
            for sel in *c {
                s = s.b(*sel);
            }
        }
        s.b(u8::from(notify))
    }

    /// A tap-side frame of `n + extra` copies of `fill` (`fill % 4 == 0`).
    pub fn host_big(s: Seed, fill: u8, n: u16, extra: u8) -> Seed {
        s.b(HOST_SEND).b(fill).w(n).b(extra)
    }

    /// A tap-side frame: a zero header and `payload`.
    pub fn host_frame(s: Seed, payload: &[u8]) -> Seed {
        s.b(HOST_SEND).b(2).raw(&[0; 12]).s(payload)
    }
}

fn net_seeds() {
    use net::*;
    const GOOD: u8 = 0x80;
    // Frames from the guest: whole, cut in three, large, too large, and
    // with a device-writable piece.
    let s = Seed::default().b(MRG);
    let s = frame(
        s,
        b"\xff\xff\xff\xff\xff\xff\x02\0\0\0\0\x09\x88\xb5hello",
        0,
        &[],
    );
    let s = frame(s, &[7; 100], 3, &[20, 30]);
    let s = big_frame(s, 0x11, 60_000);
    let s = big_frame(s, 0x12, 65_535);
    let s = frame(s, &[8; 40], 0x21, &[10]);
    write("net", "tx-frames", &s.0);

    // A 60000-byte frame from the tap over 4 KiB buffers: too few, then
    // enough once the guest adds some and notifies.
    let four_k: &[u8] = &[GOOD | 1, GOOD | 1, GOOD | 1];
    let s = Seed::default().b(MRG | EVENT_IDX);
    let s = post_rx(s, &[four_k, four_k, four_k, four_k], true);
    let s = host_big(s, 0, 60_000, 0).b(STEP);
    let s = host_frame(s, b"a small one after it").b(STEP);
    let s = post_rx(s, &[four_k, four_k], false).b(NOTIFY).b(STEP);
    write("net", "rx-mergeable-waits-for-buffers", &s.0);

    // Without mergeable buffers: frames that fit one chain, one that does
    // not, runts, and one past the largest frame.
    let s = Seed::default().b(0);
    let s = post_rx(s, &[&[GOOD], &[GOOD], &[GOOD | 2], &[GOOD]], true);
    let s = host_frame(s, &[1; 200]);
    let s = host_big(s, 4, 3000, 0);
    let s = s.b(HOST_SEND).b(0x51).raw(&[1, 2, 3, 4, 5]);
    let s = host_big(s, 8, 65_535, 0x3f);
    let s = host_frame(s, &[2; 60]).b(STEP).b(NOTIFY);
    write("net", "rx-single-buffers-drops-and-runts", &s.0);

    // Driver bugs: raw TX chains (writable, outside memory, looping), RX
    // chains that are readable or outside memory amid good ones.
    let s = Seed::default().b(MRG);
    let s = s
        .b(RAW)
        .b(1)
        .b(0)
        .w(0)
        .w(64)
        .w(0)
        .w(1)
        .b(0)
        .w(64)
        .w(64)
        .w(2)
        .w(0);
    let s = s.b(RAW).b(0).b(1).q(0xffff_ffff_0000).w(1500).w(0).w(0);
    let s = s
        .b(RAW)
        .b(1)
        .b(0)
        .w(0)
        .w(64)
        .w(1)
        .w(0)
        .b(0)
        .w(64)
        .w(64)
        .w(1)
        .w(0);
    let s = post_rx(s, &[&[0x40 | 1], &[1], &[GOOD | 1, 1], &[GOOD | 1]], true);
    let s = host_frame(s, &[3; 250]).b(STEP);
    let s = host_big(s, 0, 5000, 0).b(STEP);
    let s = post_rx(s, &[&[GOOD | 2]], true);
    write("net", "malformed-chains", &s.0);
}

// ---- spdy --------------------------------------------------------------

fn spdy_seeds() {
    let headers = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // What kubelet's client sends: a session's worth of frames, encoded
    // for real (compressed header blocks).
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    for f in [
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: 7,
                value: 65536,
            }],
        },
        Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: headers(&[("streamtype", "error")]),
        },
        Frame::SynStream {
            stream_id: 3,
            associated_id: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: headers(&[("streamtype", "stdin")]),
        },
        Frame::Data {
            stream_id: 3,
            fin: false,
            data: Bytes::from_static(b"echo hi\n"),
        },
        Frame::WindowUpdate {
            stream_id: 0,
            delta: 1 << 20,
        },
        Frame::Ping { id: 1 },
        Frame::Headers {
            stream_id: 3,
            fin: true,
            headers: headers(&[("x", "y\0z")]),
        },
        Frame::RstStream {
            stream_id: 1,
            status: 5,
        },
        Frame::GoAway {
            last_good_stream_id: 3,
            status: 0,
        },
    ] {
        enc.encode(f, &mut wire).expect("encodes");
    }
    let mut raw = vec![0u8, 0];
    raw.extend_from_slice(&wire);
    write("spdy", "raw-session", &raw);

    // The same stream fed a byte at a time (chunk size 1).
    let mut bytewise = vec![0u8, 0];
    bytewise.extend_from_slice(&wire[..wire.len().min(200)]);
    write("spdy", "raw-session-prefix", &bytewise);

    // Raw frames a hostile client could send: bad version, oversized
    // length, stream 0, short fixed parts, unknown types.
    let mut bad = BytesMut::new();
    bad.put_slice(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 10]);
    bad.put_slice(&[0; 10]);
    write("spdy", "raw-bad-version", &[&[0u8, 7][..], &bad].concat());
    let mut frames = BytesMut::new();
    frames.put_slice(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 1, 2, 3]); // short PING
    frames.put_slice(&[0x80, 0x03, 0x00, 0x05, 0, 0, 0, 0]); // NOOP
    frames.put_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0]); // DATA on stream 0
    frames.put_slice(&[0x80, 0x03, 0x00, 0x09, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]); // delta 0
    frames.put_slice(&[0x80, 0x03, 0x00, 0x01, 0, 0xff, 0xff, 0xff]); // huge
    write(
        "spdy",
        "raw-invalid-frames",
        &[&[0u8, 3][..], &frames].concat(),
    );

    // Built mode: stored-block header blocks, valid then hostile.
    let name = |s: &[u8]| [&[u8::try_from(s.len()).expect("short")][..], s].concat();
    let mut b = vec![1u8, 16, 1];
    // SYN_STREAM (kind index 0), stream 1, assoc 0, two good pairs
    // (each: a selector, a name from the table, a value).
    b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 2]);
    b.extend_from_slice(&[0, 1]);
    b.extend_from_slice(&name(b"stdout"));
    b.extend_from_slice(&[0, 2]);
    b.extend_from_slice(&name(b"8080"));
    // HEADERS (index 2) on stream 1: a duplicate and an upper-case name.
    b.extend_from_slice(&[0, 2, 0, 1, 2]);
    b.extend_from_slice(&[0, 7]);
    b.extend_from_slice(&name(b"a"));
    b.extend_from_slice(&[0, 7]);
    b.extend_from_slice(&name(b"b"));
    // SYN_REPLY (index 1): a pair count far beyond the block.
    b.extend_from_slice(&[0, 1, 0, 5, 8 | 1]);
    b.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
    b.extend_from_slice(&[0, 5]);
    b.extend_from_slice(&name(b"v"));
    // A DATA frame and a raw control frame.
    b.extend_from_slice(&[3]);
    b.extend_from_slice(&5u32.to_le_bytes());
    b.extend_from_slice(&[1]);
    b.extend_from_slice(&name(b"data"));
    b.extend_from_slice(&[2]);
    b.extend_from_slice(&6u16.to_le_bytes());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&name(&[0, 0, 0, 9]));
    write("spdy", "built-header-blocks", &b);
}

// ---- unpack ------------------------------------------------------------

fn unpack_seeds() {
    use vmcri_fuzz::unpack::{LINKS, NAMES, TYPES};
    let idx = |t: &[&[u8]], v: &[u8]| {
        u8::try_from(t.iter().position(|x| *x == v).expect("in table")).expect("small")
    };
    let ty =
        |c: u8| u8::try_from(TYPES.iter().position(|x| *x == c).expect("type")).expect("small");
    // An entry: control 0 (names, types, links from the tables, default
    // mode, uid 0), then name, type, link, mode (0o755), content.
    let entry = |name: &[u8], kind: u8, link: &[u8], data: &[u8]| {
        let mut v = vec![0u8, idx(NAMES, name), ty(kind), idx(LINKS, link), 0];
        v.push(u8::try_from(data.len()).expect("short"));
        v.extend_from_slice(data);
        v
    };
    let layer = |mode: u8, entries: &[Vec<u8>]| {
        let mut v = vec![mode];
        for e in entries {
            v.extend_from_slice(e);
        }
        v
    };
    let ordinary = [
        entry(b"dir/", b'5', b"", b""),
        entry(b"a", b'5', b"", b""),
        entry(b"a/b", b'0', b"", b"content"),
        entry(b"link", b'2', b"a/b", b""),
        entry(b"a/b/c", b'1', b"a/b", b""),
        entry(b".wh.a", b'0', b"", b""),
        entry(b"a/.wh..wh..opq", b'0', b"", b""),
        entry(b"outside", b'6', b"", b""),
    ];
    write("unpack", "ordinary-layer", &layer(0, &ordinary));
    write("unpack", "ordinary-layer-gzip", &layer(2, &ordinary));
    // Escapes: climbing names, a path through a symlink that leaves, a
    // hard link to outside, a whiteout of "..", devices.
    write(
        "unpack",
        "escapes",
        &layer(
            0,
            &[
                entry(b"../x", b'0', b"", b"x"),
                entry(b"link", b'2', b"../../outside", b""),
                entry(b"link/x", b'0', b"", b"x"),
            ],
        ),
    );
    write(
        "unpack",
        "hardlink-out",
        &layer(0, &[entry(b"a", b'1', b"../../outside/marker", b"")]),
    );
    write(
        "unpack",
        "symlink-replaces-dir",
        &layer(
            0,
            &[
                entry(b"a", b'5', b"", b""),
                entry(b"a/b", b'0', b"", b"x"),
                entry(b"link", b'2', b"../../outside", b""),
                entry(b"/abs", b'3', b"", b""),
                entry(b"//a//b", b'4', b"", b""),
            ],
        ),
    );
    // A raw tar from the tar crate, a long GNU name, and raw gzip.
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    builder
        .append_data(&mut h, "x".repeat(150), &b"hello"[..])
        .expect("tar");
    let tar = builder.into_inner().expect("tar");
    write("unpack", "raw-gnu-long-name", &[&[3u8][..], &tar].concat());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    write("unpack", "raw-gzip", &[&[4u8][..], &gz].concat());
}

fn main() {
    vsock_seeds();
    fs_seeds();
    mmio_seeds();
    net_seeds();
    spdy_seeds();
    unpack_seeds();
}
