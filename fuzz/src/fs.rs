//! virtio-fs request handling ([`FsDevice`]) against a temporary shared
//! directory.
//!
//! Layout of each run, in a fresh temporary directory `T`:
//!
//! ```text
//! T/root/            the shared directory: file, dir/, dir/inner,
//!                    escape -> ../outside/marker, abs -> T/outside/marker,
//!                    up -> .. (symlinks a careless server would follow)
//! T/outside/marker   what must stay out of reach
//! ```
//!
//! The oracle: after every request, `T`, `T/outside` and the marker
//! carry the same inode metadata as before the first one, atime
//! included. Creating, removing or renaming anything in `T` or
//! `T/outside` changes a directory's mtime and ctime; writing, chmod,
//! chown, linking or xattrs on the marker change its ctime; reading it or
//! listing either directory changes an atime: every atime is set before
//! its mtime, so `relatime` updates it on the next access. The oracle
//! itself only stats, which changes nothing.
//!
//! The input starts with the FUSE_INIT flags, then a sequence of
//! requests: opcode, node (one the device handed out, or any), a fixed
//! part, names from a table (or any bytes), a reply buffer, all chosen by
//! the input. Node IDs and file handles from replies are remembered so
//! later requests can use them.

use crate::input::Input;
use crate::oracle::Watch;
use crate::virtq::{Desc, DriverQueue, F_WRITE};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmcri_vmm::devices::fs::FsDevice;
use vmcri_vmm::devices::virtio_mmio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use vmcri_vmm::devices::IrqLine;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZE: u16 = 64;
const HIPRIO: u64 = 0;
const REQUESTS: u64 = 0x1000;
const DATA: u64 = 0x10_0000;
/// Per slot: the request at +0, the reply at +REPLY.
const SLOT_BYTES: u64 = 0x2_0000;
const REPLY: u64 = 0x1_0000;
/// Room for the request before the reply.
const REPLY_ROOM: usize = 0x1_0000;
const MEM_SIZE: usize = 0x60_0000;
const MAX_REQUESTS: usize = 64;
/// Largest file the fuzzer may make: writes past it fail with EFBIG
/// instead of filling the disk.
const MAX_FILE_BYTES: u64 = 16 << 20;

const IN_HEADER: usize = 40;

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("a small length")
}

const OUT_HEADER: usize = 16;
const ENTRY_OUT: usize = 128;

mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const SYMLINK: u32 = 6;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const CREATE: u32 = 35;
}

/// The opcodes a Linux guest sends (1-51 less the reserved 7, 19).
pub const OPCODES: &[u32] = &[
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28,
    29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51,
];

/// Sizes of the fixed parts of request bodies.
pub const FIXED: &[usize] = &[0, 4, 8, 16, 24, 40, 48, 64, 88];

/// Names worth trying, the hostile ones first.
pub const NAMES: &[&[u8]] = &[
    b"..",
    b".",
    b"../outside",
    b"outside",
    b"marker",
    b"file",
    b"dir",
    b"inner",
    b"escape",
    b"abs",
    b"up",
    b"new",
    b"new2",
    b"dir/inner",
    b"",
    b"trusted.overlay.opaque",
    b"security.capability",
    b"user.x",
];

/// Bounds file sizes for the whole process (once): a write or fallocate
/// past the limit fails with EFBIG, its SIGXFSZ ignored.
fn limit_file_size() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let lim = libc::rlimit {
            rlim_cur: MAX_FILE_BYTES,
            rlim_max: MAX_FILE_BYTES,
        };
        // SAFETY: a valid rlimit; only this process's file size limit changes.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) };
        assert_eq!(set, 0, "setrlimit(RLIMIT_FSIZE)");
        // SAFETY: ignoring a signal installs no handler code.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    });
}

struct Scene {
    _tmp: tempfile::TempDir,
    watch: Watch,
}

impl Scene {
    fn new() -> (Scene, PathBuf) {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let t = tmp.path().to_path_buf();
        let root = t.join("root");
        let outside = t.join("outside");
        let marker = outside.join("marker");
        fs::create_dir(&root).expect("root");
        fs::create_dir(&outside).expect("outside");
        fs::write(&marker, b"host secret").expect("marker");
        fs::write(root.join("file"), b"shared data").expect("file");
        fs::create_dir(root.join("dir")).expect("dir");
        fs::write(root.join("dir/inner"), b"inner").expect("inner");
        use std::os::unix::fs::symlink;
        symlink("../outside/marker", root.join("escape")).expect("escape");
        symlink(&marker, root.join("abs")).expect("abs");
        symlink("..", root.join("up")).expect("up");
        // Children first: aging a directory's entries does not touch it.
        let watch = Watch::new(&[marker, outside, t]);
        (Scene { _tmp: tmp, watch }, root)
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    queues: [DriverQueue; 2],
    // Held so its thread serves the queues while the input runs.
    _dev: FsDevice,
    notifiers: Vec<Arc<EventFd>>,
    irq: Arc<IrqLine>,
    unique: u64,
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

impl Guest {
    /// Sends one request on `queue`; returns the reply bytes the device
    /// wrote (empty if none).
    fn call(&mut self, queue: usize, request: &[u8], reply_lens: &[u32], split: usize) -> Vec<u8> {
        let q = &mut self.queues[queue];
        let slot = q.next_slot();
        let base = DATA + (u64::from(slot) + 16 * queue as u64) * SLOT_BYTES;
        let request = &request[..request.len().min(REPLY_ROOM)];
        self.mem
            .write_slice(request, GuestAddress(base))
            .expect("request inside guest memory");
        let mut descs = Vec::new();
        let (a, b) = request.split_at(split.min(request.len()));
        for (off, part) in [(0, a), (a.len() as u64, b)] {
            if !part.is_empty() || descs.is_empty() {
                descs.push(Desc {
                    addr: base + off,
                    len: u32::try_from(part.len()).expect("under 64 KiB"),
                    flags: 0,
                    next: 0,
                });
            }
        }
        let mut addr = base + REPLY;
        for &len in reply_lens {
            descs.push(Desc {
                addr,
                len,
                flags: F_WRITE,
                next: 0,
            });
            addr += u64::from(len);
        }
        q.push(&self.mem, &descs, true)
            .expect("the device completes every request");
        self.notifiers[queue].write(1).expect("notify");
        // The device serves the queue on its thread and raises the
        // interrupt once the request is used.
        wait_readable(self.irq.eventfd().as_raw_fd());
        let _ = self.irq.eventfd().read();
        let q = &mut self.queues[queue];
        assert_eq!(q.outstanding(&self.mem), 0, "a request was not completed");
        let used = q.take_used(&self.mem);
        let written = used.last().map_or(0, |u| u.len);
        let room: u32 = reply_lens.iter().sum();
        assert!(
            written <= room,
            "device reports {written} bytes written into {room}"
        );
        let mut out = vec![0u8; written as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(base + REPLY))
            .expect("reply inside guest memory");
        out
    }

    /// Builds one request from the input, sends it, and learns the node
    /// IDs and file handles its reply hands out.
    fn request(&mut self, input: &mut Input) -> u32 {
        let ctl = input.u16();
        let opcode = if ctl & 1 == 0 {
            input.pick(OPCODES).unwrap_or(opcode::LOOKUP)
        } else {
            input.u32()
        };
        let node_sel = input.u8();
        let nodeid = if node_sel & 0x80 != 0 {
            input.u64()
        } else {
            self.nodes[usize::from(node_sel) % self.nodes.len()]
        };
        let mut body = Vec::new();
        let fixed = if ctl & 2 == 0 {
            input.pick(FIXED).unwrap_or(0)
        } else {
            usize::from(input.u8())
        };
        body.extend_from_slice(input.bytes(fixed));
        body.resize(fixed, 0);
        if ctl & 4 != 0 && !self.handles.is_empty() && body.len() >= 8 {
            let fh = self.handles[usize::from(input.u8()) % self.handles.len()];
            body[..8].copy_from_slice(&fh.to_le_bytes());
        }
        if ctl & 8 != 0 && body.len() >= 8 {
            // LINK's and RENAME's first field is a node.
            let n = self.nodes[usize::from(input.u8()) % self.nodes.len()];
            body[..8].copy_from_slice(&n.to_le_bytes());
        }
        for bit in [16, 32] {
            if ctl & bit != 0 {
                let name = input.pick(NAMES).unwrap_or(b"file");
                body.extend_from_slice(name);
                body.push(0);
            }
        }
        if ctl & 64 != 0 {
            body.extend_from_slice(input.short_bytes());
        }
        if ctl & 128 != 0 {
            // A large payload (WRITE, SETXATTR) without a large input.
            let n = usize::from(input.u16());
            body.extend(std::iter::repeat_n(input.u8(), n));
        }
        let uid_gid: u32 = if ctl & 0x100 == 0 { 0 } else { 1000 };
        self.unique += 1;
        let true_len = IN_HEADER + body.len();
        let len = if ctl & 0x200 == 0 {
            u32::try_from(true_len).unwrap_or(u32::MAX)
        } else {
            input.u32()
        };
        let mut req = Vec::with_capacity(true_len);
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&uid_gid.to_le_bytes());
        req.extend_from_slice(&uid_gid.to_le_bytes());
        req.extend_from_slice(&1u32.to_le_bytes()); // pid
        req.extend_from_slice(&0u32.to_le_bytes()); // padding
        req.extend_from_slice(&body);
        let reply_lens: Vec<u32> = match (ctl >> 10) & 7 {
            0 => vec![4096],
            1 => vec![len32(OUT_HEADER + ENTRY_OUT + 16)],
            2 => vec![len32(OUT_HEADER), 4096],
            3 => vec![],
            4 => vec![u32::from(input.u8())],
            5 => vec![u32::from(input.u16())],
            _ => vec![0x8000, 0x8000],
        };
        let split = if ctl & 0x2000 == 0 {
            usize::MAX
        } else {
            usize::from(input.u16())
        };
        // Mostly the request queue; now and then the high-priority one.
        let queue = if ctl & 0xc000 == 0xc000 { 0 } else { 1 };
        let reply = self.call(queue, &req, &reply_lens, split);
        self.learn(opcode, &reply);
        opcode
    }

    fn learn(&mut self, opcode: u32, reply: &[u8]) {
        let field = |at: usize| -> Option<u64> {
            let b = reply.get(at..at + 8)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        let error = reply
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map_or(-1, i32::from_le_bytes);
        if error != 0 {
            return;
        }
        use opcode::*;
        if matches!(opcode, LOOKUP | MKNOD | MKDIR | SYMLINK | LINK | CREATE) {
            if let Some(n) = field(OUT_HEADER) {
                if self.nodes.len() < 32 && n != 0 && !self.nodes.contains(&n) {
                    self.nodes.push(n);
                }
            }
        }
        let fh_at = match opcode {
            OPEN | OPENDIR => Some(OUT_HEADER),
            CREATE => Some(OUT_HEADER + ENTRY_OUT),
            _ => None,
        };
        if let Some(fh) = fh_at.and_then(field) {
            if self.handles.len() < 32 && !self.handles.contains(&fh) {
                self.handles.push(fh);
            }
        }
    }
}

/// Waits until `fd` is readable; a request the device never completes
/// is a bug (a hang AFL reports), so the wait is long but bounded.
fn wait_readable(fd: std::os::fd::RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert!(n == 1, "the device completed no request within 10 s");
}

/// Runs one input.
pub fn run(data: &[u8]) {
    limit_file_size();
    let (mut scene, root) = Scene::new();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let queues = [
        DriverQueue::new(&mem, HIPRIO, QUEUE_SIZE),
        DriverQueue::new(&mem, REQUESTS, QUEUE_SIZE),
    ];
    vmcri_vmm::seccomp::set_mode(vmcri_vmm::seccomp::Mode::Off);
    let mut dev = FsDevice::new("fuzz", &root).expect("virtio-fs device");
    let line = Arc::new(IrqLine::new(5).expect("eventfd"));
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    let notifiers: Vec<Arc<EventFd>> = (0..2)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
        .collect();
    dev.activate(
        mem.clone(),
        VIRTIO_F_VERSION_1,
        queues.iter().map(DriverQueue::device_queue).collect(),
        irq,
        notifiers.clone(),
    )
    .expect("activate");
    let mut guest = Guest {
        mem,
        queues,
        _dev: dev,
        notifiers,
        irq: line,
        unique: 0,
        nodes: vec![1],
        handles: Vec::new(),
    };
    let mut input = Input::new(data);
    let mut init = Vec::new();
    init.extend_from_slice(&len32(IN_HEADER + 16).to_le_bytes());
    init.extend_from_slice(&opcode::INIT.to_le_bytes());
    init.extend_from_slice(&0u64.to_le_bytes());
    init.extend_from_slice(&0u64.to_le_bytes());
    init.extend_from_slice(&[0u8; 16]);
    for v in [7u32, 31, 0, input.u32()] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    guest.call(1, &init, &[4096], usize::MAX);
    scene.watch.rebase();
    let mut n = 0;
    while !input.is_empty() && n < MAX_REQUESTS {
        n += 1;
        let op = guest.request(&mut input);
        scene.watch.check(&format!(
            "request {n} (opcode {op}), outside the shared directory,"
        ));
    }
}
