//! virtio-mmio register sequences ([`MmioTransport`]): reads and writes at
//! any offset and width, feature negotiation, queue setup, activation,
//! notifies and resets, with the guest memory the rings live in written
//! by the input too.
//!
//! Behind the transport sits either the real entropy device or a probe
//! that checks what the transport promises its devices: activation only
//! with offered features including VERSION_1, only with valid queues, at
//! most once until a reset; notifies and resets only while active. The
//! probe echoes readable bytes into writable ones, so its queues see real
//! descriptor chains. Checked at the transport: a status of 0 resets it.

use crate::input::Input;
use crate::virtq::{Desc, DriverQueue, F_WRITE};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmcri_vmm::devices::bus::BusDevice;
use vmcri_vmm::devices::rng::Rng;
use vmcri_vmm::devices::virtio_mmio::{
    status, ActivateError, MmioTransport, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use vmcri_vmm::devices::IrqLine;
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_BASES: [u64; 2] = [0x0, 0x1000];
const QUEUE_SIZES: [u16; 2] = [16, 8];
const DATA: u64 = 0x2000;
const MAX_OPS: usize = 512;
/// A device-specific feature bit the probe offers besides the generic ones.
const PROBE_FEATURE: u64 = 1 << 3;
const PROBE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | PROBE_FEATURE;

/// Register offsets (virtio 1.1, 4.2.2).
const REGS: &[u64] = &[
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100, 0x104, 0x107,
];
const STATUS: u64 = 0x070;
const QUEUE_READY: u64 = 0x044;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NOTIFY: u64 = 0x050;

#[derive(Default)]
struct ProbeState {
    active: bool,
    queues: Vec<Queue>,
    mem: Option<GuestMemoryMmap>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    /// The queue notifiers the transport handed over.
    notifiers: Vec<Arc<EventFd>>,
    /// The next activation fails, as a device's may.
    refuse: bool,
    config: [u8; 8],
}

struct Probe(Arc<Mutex<ProbeState>>);

impl Probe {
    fn state(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        0x7f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        PROBE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmcri_vmm::devices::virtio_mmio::read_config_bytes(&self.state().config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = at.and_then(|at| st.config.get_mut(at)) {
                *slot = *b;
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError> {
        let mut st = self.state();
        assert!(!st.active, "activated twice without a reset");
        assert_eq!(notifiers.len(), QUEUE_SIZES.len(), "one notifier per queue");
        assert_eq!(
            features & !PROBE_FEATURES,
            0,
            "activated with features never offered: {features:#x}"
        );
        assert_ne!(
            features & VIRTIO_F_VERSION_1,
            0,
            "activated without VERSION_1"
        );
        assert_eq!(queues.len(), QUEUE_SIZES.len(), "one queue per size");
        for (i, q) in queues.iter().enumerate() {
            assert!(
                !q.ready() || q.is_valid(&mem),
                "queue {i} handed over ready but invalid"
            );
        }
        if std::mem::take(&mut st.refuse) {
            return Err(ActivateError::Device("refused by the fuzzer".into()));
        }
        st.active = true;
        st.queues = queues;
        st.mem = Some(mem);
        st.interrupt = Some(interrupt);
        st.notifiers = notifiers;
        Ok(())
    }

    fn reset(&mut self) {
        let mut st = self.state();
        assert!(st.active, "reset of a device that was never activated");
        st.active = false;
        st.queues.clear();
        st.mem = None;
        st.interrupt = None;
        st.notifiers.clear();
    }
}

impl Probe {
    /// Serves the queues whose notifier fired, as a device thread would;
    /// here synchronously, after each register access.
    fn serve_notified(&self) {
        let fired: Vec<u16> = {
            let st = self.state();
            (0..st.notifiers.len())
                .filter(|&i| st.notifiers[i].read().is_ok())
                .filter_map(|i| u16::try_from(i).ok())
                .collect()
        };
        for i in fired {
            self.serve(i);
        }
    }

    fn serve(&self, index: u16) {
        let mut st = self.state();
        assert!(st.active, "notify reached an inactive device");
        let (Some(mem), Some(irq)) = (st.mem.clone(), st.interrupt.clone()) else {
            return;
        };
        let Some(q) = st.queues.get_mut(usize::from(index)) else {
            return;
        };
        if !q.ready() {
            return;
        }
        let mut used = false;
        // Bounded: a hostile driver can make the avail index run far ahead.
        for _ in 0..64 {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut buf = vec![0u8; 4096];
            let got = Reader::new(&mem, chain.clone())
                .ok()
                .and_then(|mut r| std::io::Read::read(&mut r, &mut buf).ok())
                .unwrap_or(0);
            let wrote = Writer::new(&mem, chain)
                .ok()
                .and_then(|mut w| std::io::Write::write(&mut w, &buf[..got]).ok())
                .unwrap_or(0);
            if q.add_used(&mem, head, u32::try_from(wrote).unwrap_or(0))
                .is_err()
            {
                break;
            }
            used = true;
        }
        if used && q.needs_notification(&mem).unwrap_or(true) {
            irq.signal_used_queue();
        }
    }
}

struct World {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    probe: Option<Arc<Mutex<ProbeState>>>,
    drivers: [DriverQueue; 2],
}

impl World {
    fn w(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
        self.serve_notified();
    }

    /// A queue notification reaches the probe through its eventfd.
    fn serve_notified(&self) {
        if let Some(st) = &self.probe {
            Probe(st.clone()).serve_notified();
        }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn offset(input: &mut Input) -> u64 {
        let sel = input.u8();
        if sel & 0x80 == 0 {
            REGS[usize::from(sel) % REGS.len()]
        } else {
            u64::from(input.u16())
        }
    }

    fn value(&mut self, input: &mut Input) -> u32 {
        match input.u8() % 8 {
            0 => 0,
            1 => 1,
            2 => input.u8().into(),
            3 => input.u16().into(),
            4 => u32::MAX,
            _ => input.u32(),
        }
    }

    /// What Linux's driver does for queue `q`, with the input's changes.
    fn setup_queue(&mut self, input: &mut Input) {
        let q = input.u8() % 3;
        let sel = input.u8();
        self.w(QUEUE_SEL, u32::from(q));
        let i = usize::from(q.min(1));
        let size = if sel & 1 == 0 {
            u32::from(QUEUE_SIZES[i])
        } else {
            self.value(input)
        };
        self.w(0x038, size);
        let base = if sel & 2 == 0 {
            QUEUE_BASES[i]
        } else {
            u64::from(input.u16())
        };
        let size16 = u16::try_from(size).unwrap_or(0);
        let avail = base + 16 * u64::from(size16);
        let used = (avail + 6 + 2 * u64::from(size16)).next_multiple_of(4);
        for (lo, addr) in [(0x080, base), (0x090, avail), (0x0a0, used)] {
            let addr = if sel & 4 == 0 { addr } else { input.u64() };
            self.w(lo, u32::try_from(addr & 0xffff_ffff).unwrap_or(0));
            self.w(lo + 4, u32::try_from(addr >> 32).unwrap_or(0));
        }
        if sel & 8 == 0 {
            self.w(QUEUE_READY, 1);
        }
    }

    fn negotiate(&mut self, input: &mut Input) {
        let sel = input.u8();
        // From a reset, as Linux does, unless the input says otherwise;
        // only then is FEATURES_OK's answer known.
        let fresh = sel & 2 == 0;
        if fresh {
            self.status_write(0);
        }
        self.w(STATUS, status::ACKNOWLEDGE);
        self.w(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = if sel & 1 == 0 {
            VIRTIO_F_VERSION_1 | (PROBE_FEATURES & u64::from(input.u8()))
        } else {
            input.u64()
        };
        for (word, v) in [(0u32, features), (1, features >> 32)] {
            self.w(0x024, word);
            self.w(0x020, u32::try_from(v & 0xffff_ffff).unwrap_or(0));
        }
        self.w(
            STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        if fresh {
            let ok = self.r(STATUS) & status::FEATURES_OK != 0;
            let valid =
                features & !self.device_features() == 0 && features & VIRTIO_F_VERSION_1 != 0;
            assert_eq!(ok, valid, "FEATURES_OK for features {features:#x}");
        }
    }

    fn device_features(&mut self) -> u64 {
        self.w(0x014, 0);
        let lo = self.r(0x010);
        self.w(0x014, 1);
        let hi = self.r(0x010);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn status_write(&mut self, v: u32) {
        self.w(STATUS, v);
        if v == 0 {
            assert_eq!(self.r(STATUS), 0, "status 0 did not reset the device");
            for q in 0..3 {
                self.w(QUEUE_SEL, q);
                assert_eq!(self.r(QUEUE_READY), 0, "queue {q} still ready after reset");
            }
            if let Some(p) = &self.probe {
                let st = p.lock().unwrap_or_else(|e| e.into_inner());
                assert!(!st.active, "device still active after reset");
            }
        }
    }

    fn push_chain(&mut self, input: &mut Input) {
        let q = usize::from(input.u8() & 1);
        let n = 1 + input.u8() % 3;
        let mut descs = Vec::new();
        for k in 0..n {
            let sel = input.u8();
            descs.push(Desc {
                addr: DATA + u64::from(input.u16() % 0xc000),
                len: u32::from(input.u16() % 0x2000),
                flags: if sel & 1 == 0 && k > 0 { F_WRITE } else { 0 },
                next: 0,
            });
        }
        if self.drivers[q].has_room(&self.mem) {
            self.drivers[q].push(&self.mem, &descs, true);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    // The harness's own syscalls are not the VMM's: no filters here.
    vmcri_vmm::seccomp::set_mode(vmcri_vmm::seccomp::Mode::Off);
    let mut input = Input::new(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let drivers = [
        DriverQueue::new(&mem, QUEUE_BASES[0], QUEUE_SIZES[0]),
        DriverQueue::new(&mem, QUEUE_BASES[1], QUEUE_SIZES[1]),
    ];
    let irq = Arc::new(IrqLine::new(5).expect("eventfd"));
    let (device, probe): (Box<dyn VirtioDevice>, _) = if input.u8() & 1 == 0 {
        let st = Arc::new(Mutex::new(ProbeState::default()));
        (Box::new(Probe(st.clone())), Some(st))
    } else {
        (Box::new(Rng::new().expect("rng thread")), None)
    };
    let t = MmioTransport::new(device, mem.clone(), irq).expect("transport eventfds");
    let mut w = World {
        mem,
        t,
        probe,
        drivers,
    };
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % 10 {
            0 => {
                let off = World::offset(&mut input);
                let v = w.value(&mut input);
                if off == STATUS {
                    w.status_write(v);
                } else {
                    w.w(off, v);
                }
            }
            1 => {
                let off = World::offset(&mut input);
                let width = usize::from(input.u8() % 9);
                let mut d = vec![0u8; width];
                w.t.read(off, &mut d);
            }
            2 => {
                let off = World::offset(&mut input);
                let n = usize::from(input.u8() % 9);
                let d = input.bytes(n).to_vec();
                w.t.write(off, &d);
                w.serve_notified();
            }
            3 => w.negotiate(&mut input),
            4 => w.setup_queue(&mut input),
            5 => {
                let v = match input.u8() % 4 {
                    0 => 0,
                    1 => status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                    2 => {
                        status::ACKNOWLEDGE
                            | status::DRIVER
                            | status::FEATURES_OK
                            | status::DRIVER_OK
                    }
                    _ => input.u8().into(),
                };
                w.status_write(v);
            }
            6 => {
                let addr = u64::from(input.u16());
                let bytes = input.short_bytes().to_vec();
                let _ = w.mem.write_slice(&bytes, GuestAddress(addr));
            }
            7 => w.push_chain(&mut input),
            8 => {
                let v = u32::from(input.u8() % 3);
                w.w(QUEUE_NOTIFY, v);
            }
            _ => {
                if let Some(p) = &w.probe {
                    p.lock().unwrap_or_else(|e| e.into_inner()).refuse = true;
                }
            }
        }
    }
}
