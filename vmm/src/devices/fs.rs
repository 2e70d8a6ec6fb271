//! virtio-fs (virtio 1.2, 5.11): one host directory shared with the guest,
//! served by `fuse-backend-rs`'s passthrough file system inside this VMM
//! process (no external virtiofsd), as Dragonball does.
//!
//! `fuse-backend-rs` pins older `vm-memory`/`virtio-queue` releases than
//! the rest of the VMM. This module bridges them: at activation it builds
//! a second view of the same guest RAM (no copy, no second mapping owner)
//! and queues with the addresses the driver programmed, in the versions
//! the crate speaks. Nothing outside this file sees the older types.
//!
//! Requests are served on the device's own thread (`fs0`, see
//! [`super::thread`]), so a guest's file I/O never stalls its vCPUs. The
//! passthrough file system resolves every name with `openat` relative to
//! directories it opened under the shared root, refuses `/` in names, and
//! never opens by file handle (`inode_file_handles` off). It accepts `.`
//! and `..` lookups (for NFS export), which the guest's FUSE client never
//! sends: we refuse them before they reach it, so no guest request can
//! walk up from anything it was given.
//!
//! In front of it, [`super::fs_policy::Guarded`] refuses what must not
//! reach the host at all: device nodes, setuid files and `security.*` or
//! `trusted.*` xattr writes.

use super::fs_policy::Guarded;
use super::thread::{DeviceThread, QueueWorker};
use super::virtio_mmio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::seccomp::Role;
use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, Writer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use virtio_queue_fuse::{Queue as FsQueue, QueueT as FsQueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_memory_fuse::{
    GuestAddress as FsAddress, GuestMemoryMmap as FsMemory, GuestRegionMmap as FsRegion,
    MmapRegion as FsMmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue size for the high-priority and the request queue.
const QUEUE_SIZE: u16 = 256;
/// Bytes of the tag field in the config space.
pub const TAG_LEN: usize = 36;
/// FUSE_LOOKUP.
const FUSE_LOOKUP: u32 = 1;
/// FUSE names are at most this long (NAME_MAX).
const NAME_MAX: usize = 255;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or does not fit the config space.
    #[error("virtio-fs tag {0:?} must be 1-36 bytes")]
    Tag(String),
    /// The device's thread could not be started.
    #[error("virtio-fs thread: {0}")]
    Thread(std::io::Error),
    /// The shared directory cannot be served.
    #[error("virtio-fs shared directory {path}: {msg}")]
    Root {
        /// Path.
        path: String,
        /// Cause.
        msg: String,
    },
}

/// The passthrough file system, behind the host's policy on what a guest
/// may create (see [`super::fs_policy`]).
type Fs = Guarded<PassthroughFs<()>>;

struct Active {
    server: Arc<Server<Arc<Fs>>>,
    mem: FsMemory,
    queues: Vec<FsQueue>,
    interrupt: Arc<VirtioInterrupt>,
    /// The owner of the mapping `mem` views, held for as long as the
    /// view: the queue loop runs on its own thread, and must never read
    /// guest memory another owner has already unmapped. Declared last,
    /// so it is dropped after the view.
    _guest: GuestMemoryMmap,
}

/// The virtio-fs device.
pub struct FsDevice {
    tag: String,
    server: Arc<Server<Arc<Fs>>>,
    thread: DeviceThread,
    worker: QueueWorker,
}

/// A view of the same guest RAM in `fuse-backend-rs`'s `vm-memory`.
fn bridge_memory(mem: &GuestMemoryMmap) -> Result<FsMemory, ActivateError> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let len = usize::try_from(r.len())
            .map_err(|_| ActivateError::Device("guest memory region beyond usize".into()))?;
        // SAFETY: the pointer and length are those of a live mapping that
        // `mem` keeps mapped, and `Active` holds a clone of `mem` for as
        // long as this view lives;
        // build_raw does not take ownership, so nothing is unmapped twice.
        let mapping = unsafe {
            FsMmapRegion::build_raw(
                r.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|_| ActivateError::Device("cannot view guest memory for virtio-fs".into()))?;
        let region = FsRegion::new(mapping, FsAddress(r.start_addr().0))
            .ok_or_else(|| ActivateError::Device("guest memory region overflows".into()))?;
        regions.push(region);
    }
    FsMemory::from_regions(regions)
        .map_err(|_| ActivateError::Device("cannot view guest memory for virtio-fs".into()))
}

/// The driver's queue, as the older `virtio-queue` sees it.
fn bridge_queue(q: &Queue, mem: &FsMemory, index: usize) -> Result<FsQueue, ActivateError> {
    let mut fq = FsQueue::new(q.max_size()).map_err(|_| ActivateError::QueueNotReady(index))?;
    fq.set_size(q.size());
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the low half of a 64-bit guest address"
    )]
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.desc_table());
    fq.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    fq.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    fq.set_used_ring_address(lo, hi);
    fq.set_ready(q.ready());
    if !fq.is_valid(mem) {
        return Err(ActivateError::QueueNotReady(index));
    }
    Ok(fq)
}

impl FsDevice {
    /// Serves `root` to the guest under `tag`.
    pub fn new(tag: &str, root: &Path) -> Result<FsDevice, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let root_err = |msg: String| FsError::Root {
            path: root.display().to_string(),
            msg,
        };
        let root_dir = root
            .canonicalize()
            .map_err(|e| root_err(e.to_string()))?
            .to_str()
            .ok_or_else(|| root_err("not UTF-8".into()))?
            .to_string();
        let config = Config {
            root_dir,
            // Whiteouts in image layers are xattrs (trusted.overlay.*).
            xattr: true,
            do_import: true,
            // The host changes volumes (ConfigMaps, Secrets) under the guest:
            // cache little so updates show within a second.
            cache_policy: CachePolicy::Auto,
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            inode_file_handles: false,
            ..Default::default()
        };
        let fs = PassthroughFs::new(config).map_err(|e| root_err(e.to_string()))?;
        fs.import().map_err(|e| root_err(e.to_string()))?;
        let fs = Guarded::new(fs);
        Ok(FsDevice {
            tag: tag.to_string(),
            server: Arc::new(Server::new(Arc::new(fs))),
            thread: DeviceThread::spawn("fs0", Role::Fs).map_err(FsError::Thread)?,
            worker: QueueWorker::new().map_err(FsError::Thread)?,
        })
    }
}

impl Active {
    /// The `unique` of a LOOKUP of `.` or `..`, which we answer ourselves.
    fn dot_lookup(reader: &mut Reader<'_, ()>) -> Option<u64> {
        use std::io::Read;
        let h: InHeader = reader.read_obj().ok()?;
        if h.opcode != FUSE_LOOKUP {
            return None;
        }
        let mut name = [0u8; NAME_MAX + 1];
        let want = (h.len as usize)
            .saturating_sub(std::mem::size_of::<InHeader>())
            .min(name.len());
        let got = reader.read(&mut name[..want]).ok()?;
        let name = name[..got].split(|b| *b == 0).next()?;
        (name == b"." || name == b"..").then_some(h.unique)
    }

    fn process(&mut self, index: u16) {
        let Some(queue) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        let mem = &self.mem;
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let dot = Reader::from_descriptor_chain(mem, chain.clone())
                .ok()
                .and_then(|mut r| Self::dot_lookup(&mut r));
            let written = match (
                Reader::from_descriptor_chain(mem, chain.clone()),
                fuse_backend_rs::transport::VirtioFsWriter::new(mem, chain),
            ) {
                (Ok(_), Ok(mut w)) if dot.is_some() => {
                    let reply = OutHeader {
                        len: u32::try_from(std::mem::size_of::<OutHeader>())
                            .expect("a FUSE header is 16 bytes"),
                        error: -libc::ENOENT,
                        unique: dot.unwrap_or(0),
                    };
                    w.write_obj(reply).map(|()| reply.len as usize).unwrap_or(0)
                }
                (Ok(r), Ok(w)) => {
                    match self.server.handle_message(r, Writer::from(w), None, None) {
                        Ok(n) => n,
                        Err(e) => {
                            guest_warn!(error = %e, "virtio-fs request failed");
                            0
                        }
                    }
                }
                _ => {
                    guest_warn!("virtio-fs: malformed descriptor chain");
                    0
                }
            };
            // A used length is 32 bits (virtio 1.1, 2.6.8).
            let written = u32::try_from(written).unwrap_or(u32::MAX);
            if let Err(e) = queue.add_used(mem, head, written) {
                guest_warn!(error = %e, "virtio-fs: cannot return a buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Drop for FsDevice {
    fn drop(&mut self) {
        // The queue loop first: the thread's own drop waits for its job.
        self.worker.stop();
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // High-priority queue (FORGET, interrupts) and one request queue.
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError> {
        let fs_mem = bridge_memory(&mem)?;
        let queues = queues
            .iter()
            .enumerate()
            .map(|(i, q)| bridge_queue(q, &fs_mem, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut active = Active {
            server: self.server.clone(),
            mem: fs_mem,
            queues,
            interrupt,
            _guest: mem,
        };
        self.worker
            .start(&self.thread, notifiers, move |index| active.process(index))
            .map_err(|e| ActivateError::Device(e.to_string()))
    }

    fn reset(&mut self) {
        self.worker.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLine;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;
    const FUSE_LOOKUP: u32 = 1;
    const FUSE_GETATTR: u32 = 3;
    const FUSE_READLINK: u32 = 5;
    const FUSE_OPEN: u32 = 14;
    const FUSE_READ: u32 = 15;
    const FUSE_RELEASE: u32 = 18;
    const FUSE_INIT: u32 = 26;
    const ROOT: u64 = 1;

    struct Harness {
        // Held so its thread serves the queue until the harness is dropped.
        _dev: FsDevice,
        notifiers: Vec<Arc<EventFd>>,
        mem: GuestMemoryMmap,
        queue: MockSplitQueue<'static, GuestMemoryMmap>,
        unique: u64,
        next_used: u16,
        next_desc: u16,
        _dir: tempfile::TempDir,
    }

    fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&opcode.to_le_bytes());
        h.extend_from_slice(&unique.to_le_bytes());
        h.extend_from_slice(&nodeid.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // uid
        h.extend_from_slice(&0u32.to_le_bytes()); // gid
        h.extend_from_slice(&1u32.to_le_bytes()); // pid
        h.extend_from_slice(&0u32.to_le_bytes()); // padding
        h
    }

    impl Harness {
        /// A device sharing a directory with `file` ("secret-free data"),
        /// and `escape`, a symlink to the host's /etc/hostname.
        fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("file"), b"shared data").unwrap();
            std::os::unix::fs::symlink("/etc/hostname", dir.path().join("escape")).unwrap();
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap(),
            ));
            let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
            let mut dev = FsDevice::new("shared", dir.path()).unwrap();
            let irq = Arc::new(VirtioInterrupt::new(Arc::new(IrqLine::new(5).unwrap())));
            let hiprio = MockSplitQueue::create(mem, GuestAddress(0x10_0000), QUEUE_SIZE);
            let notifiers: Vec<Arc<EventFd>> = (0..2)
                .map(|_| Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()))
                .collect();
            dev.activate(
                mem.clone(),
                VIRTIO_F_VERSION_1,
                vec![
                    hiprio.create_queue().unwrap(),
                    queue.create_queue().unwrap(),
                ],
                irq,
                notifiers.clone(),
            )
            .unwrap();
            let mut h = Harness {
                _dev: dev,
                notifiers,
                mem: mem.clone(),
                queue,
                unique: 0,
                next_used: 0,
                next_desc: 0,
                _dir: dir,
            };
            let mut init = Vec::new();
            for v in [7u32, 31, 0, 0] {
                init.extend_from_slice(&v.to_le_bytes());
            }
            let (err, _) = h.call(FUSE_INIT, 0, &init, 4096);
            assert_eq!(err, 0, "INIT failed");
            h
        }

        /// Sends one request; returns (error, reply body).
        fn call(
            &mut self,
            opcode: u32,
            nodeid: u64,
            body: &[u8],
            reply_len: u32,
        ) -> (i32, Vec<u8>) {
            self.unique += 1;
            let req_len = u32::try_from(40 + body.len()).unwrap();
            let mut req = in_header(req_len, opcode, self.unique, nodeid);
            req.extend_from_slice(body);
            let base = 0x4_0000 + u64::from(self.next_desc) * 0x2000;
            let (req_addr, reply_addr) = (GuestAddress(base), GuestAddress(base + 0x1000));
            self.mem.write_slice(&req, req_addr).unwrap();
            let d = self.next_desc;
            let descs = [
                RawDescriptor::from(SplitDescriptor::new(
                    req_addr.0,
                    u32::try_from(req.len()).unwrap(),
                    VRING_DESC_F_NEXT,
                    d + 1,
                )),
                RawDescriptor::from(SplitDescriptor::new(
                    reply_addr.0,
                    reply_len,
                    VRING_DESC_F_WRITE,
                    0,
                )),
            ];
            self.queue.add_desc_chains(&descs, d).unwrap();
            self.next_desc += 2;
            self.notifiers[1].write(1).unwrap();
            // Served on the device's thread: wait for the used ring.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let used_idx: u16 = self
                    .mem
                    .read_obj(self.queue.used_addr().unchecked_add(2))
                    .unwrap();
                if used_idx == self.next_used + 1 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "request not completed"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.next_used += 1;
            let mut out = vec![0u8; reply_len as usize];
            self.mem.read_slice(&mut out, reply_addr).unwrap();
            let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
            let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
            (err, out[16..len.max(16)].to_vec())
        }

        fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<u64, i32> {
            let mut n = name.to_vec();
            n.push(0);
            match self.call(FUSE_LOOKUP, parent, &n, 256) {
                (0, body) => Ok(u64::from_le_bytes(body[0..8].try_into().unwrap())),
                (e, _) => Err(e),
            }
        }

        /// Opens `node` read-only and reads up to 64 bytes.
        fn open_read(&mut self, node: u64) -> Result<Vec<u8>, i32> {
            let (e, body) = self.call(FUSE_OPEN, node, &[0u8; 8], 64);
            if e != 0 {
                return Err(e);
            }
            let fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
            let mut read = Vec::new();
            read.extend_from_slice(&fh.to_le_bytes());
            read.extend_from_slice(&0u64.to_le_bytes()); // offset
            read.extend_from_slice(&64u32.to_le_bytes()); // size
            read.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
            match self.call(FUSE_READ, node, &read, 16 + 64) {
                (0, data) => Ok(data),
                (e, _) => Err(e),
            }
        }
    }

    #[test]
    fn reports_its_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FsDevice::new("vmcri", dir.path()).unwrap();
        let mut cfg = [0u8; 40];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[..5], b"vmcri");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        assert!(FsDevice::new("", dir.path()).is_err());
        assert!(FsDevice::new(&"x".repeat(37), dir.path()).is_err());
        assert!(FsDevice::new("t", Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn serves_files_under_the_shared_directory() {
        let mut h = Harness::new();
        let node = h.lookup(ROOT, b"file").expect("lookup file");
        assert_eq!(h.open_read(node).unwrap(), b"shared data");
        let (e, _) = h.call(FUSE_GETATTR, node, &[0u8; 16], 256);
        assert_eq!(e, 0);
    }

    /// READ's body: handle `fh`, offset 0, `size` bytes, file `flags`.
    fn read_in(fh: u64, size: u32, flags: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&fh.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // offset
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // read_flags
        b.extend_from_slice(&0u64.to_le_bytes()); // lock_owner
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // padding
        b
    }

    /// Found by fuzzing (fuzz/corpus/fs/read-flags-double-close): I/O
    /// whose flags the host refused with F_SETFL closed the handle's
    /// descriptor, which a later open reused and the handle's release
    /// then closed under it (see `fs_policy`).
    #[test]
    fn io_flags_the_host_refuses_do_not_close_a_handles_descriptor() {
        let mut h = Harness::new();
        // A directory opened with OPEN, then read with O_DIRECT, which no
        // directory supports.
        let (e, body) = h.call(FUSE_OPEN, ROOT, &[0u8; 8], 64);
        assert_eq!(e, 0);
        let dir_fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let o_direct = u32::try_from(libc::O_DIRECT).unwrap();
        let (e, _) = h.call(FUSE_READ, ROOT, &read_in(dir_fh, 64, o_direct), 16 + 64);
        assert_ne!(e, 0, "reading a directory");
        // A file opened next would take a descriptor closed above.
        let node = h.lookup(ROOT, b"file").unwrap();
        let (e, body) = h.call(FUSE_OPEN, node, &[0u8; 8], 64);
        assert_eq!(e, 0);
        let file_fh = u64::from_le_bytes(body[0..8].try_into().unwrap());
        let mut release = Vec::new();
        release.extend_from_slice(&dir_fh.to_le_bytes());
        release.extend_from_slice(&[0u8; 16]);
        assert_eq!(h.call(FUSE_RELEASE, ROOT, &release, 16).0, 0);
        // The directory's release must not have closed the file.
        let (e, data) = h.call(FUSE_READ, node, &read_in(file_fh, 64, 0), 16 + 64);
        assert_eq!((e, &data[..]), (0, &b"shared data"[..]));
    }

    #[test]
    fn crafted_requests_cannot_leave_the_shared_directory() {
        let mut h = Harness::new();
        // Names that climb or contain separators are refused outright.
        for name in [&b".."[..], b"../etc", b"/etc", b"file/../../etc", b"."] {
            assert!(
                h.lookup(ROOT, name).is_err(),
                "lookup {:?} succeeded",
                String::from_utf8_lossy(name)
            );
        }
        // A symlink to a host file is only a symlink: the guest gets its
        // text, and opening its node does not follow it on the host.
        let link = h.lookup(ROOT, b"escape").expect("lookup symlink");
        let (e, target) = h.call(FUSE_READLINK, link, &[], 256);
        assert_eq!((e, &target[..]), (0, &b"/etc/hostname"[..]));
        let host = std::fs::read("/etc/hostname").unwrap_or_default();
        match h.open_read(link) {
            Err(e) => assert!(e < 0),
            Ok(data) => assert!(
                host.is_empty() || data != host[..data.len().min(host.len())],
                "read the host's /etc/hostname"
            ),
        }
        // Node IDs the device never handed out are refused.
        for forged in [0u64, 1000, 0xdead_beef, u64::MAX] {
            let (e, _) = h.call(FUSE_GETATTR, forged, &[0u8; 16], 256);
            assert_ne!(e, 0, "GETATTR on forged node {forged:#x} succeeded");
        }
        // After all that the device still serves.
        let node = h.lookup(ROOT, b"file").unwrap();
        assert_eq!(h.open_read(node).unwrap(), b"shared data");
    }
}
