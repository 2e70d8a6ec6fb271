//! The virtio-mmio transport (virtio 1.1, section 4.2), version 2 only.
//!
//! The guest finds each device through `virtio_mmio.device=` on its command
//! line; the transport negotiates features, collects queue addresses and
//! hands the queues to the device once the driver says DRIVER_OK.

use super::bus::BusDevice;
use super::{IrqLine, VmRequest};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// "virt", little-endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("vmcr" would do; any value is legal).
const VENDOR_ID: u32 = 0x766d_6372;

/// Feature bit every device offers: virtio 1.x semantics.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event indices suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues are live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a queue has used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs, reason = "named as in the virtio spec, 4.2.2")]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    /// Public: the VM registers an ioeventfd on it.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors a device may give when the driver starts it.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// A queue the device needs is not ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device could not start for its own reason.
    #[error("device failed to activate: {0}")]
    Device(String),
}

/// The interrupt a device raises, with the status register it shares
/// with the transport.
#[derive(Debug)]
pub struct VirtioInterrupt {
    line: Arc<IrqLine>,
    status: AtomicU32,
}

impl VirtioInterrupt {
    /// An interrupt on `line`.
    pub fn new(line: Arc<IrqLine>) -> Self {
        VirtioInterrupt {
            line,
            status: AtomicU32::new(0),
        }
    }

    /// Tells the guest that a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Tells the guest the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::error!(gsi = self.line.gsi(), error = %e, "cannot raise virtio interrupt");
        }
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Copies the config space bytes at `offset` into `data`; bytes past the
/// end read as zero (the guest chooses offset and width).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at).copied())
            .unwrap_or(0);
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (4 = entropy, 19 = vsock, 26 = fs, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers; must include [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; ignored by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the negotiated features and the driver's
    /// queues. `notifiers[i]` fires whenever the driver notifies queue `i`
    /// (through an ioeventfd, without a VM exit to us); the device serves
    /// its queues on a thread of its own, never on the caller's (a vCPU),
    /// and sets up there what its loop needs (epoll sets, sockets): the
    /// vCPU's seccomp allowlist has none of those calls.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state: its queue work has
    /// stopped and the queues are dropped when this returns.
    fn reset(&mut self);
}

/// One virtio device exposed through an MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    /// Shared with the active device: handing them over must not dup
    /// them on the vCPU thread.
    notifiers: Vec<Arc<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Puts `device` behind a transport raising `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqLine>,
    ) -> io::Result<Self> {
        let queues = Self::fresh_queues(device.as_ref());
        let notifiers = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<_>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queues,
            notifiers,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Queue `i`'s notification eventfd: the VM registers it as an
    /// ioeventfd on [`reg::QUEUE_NOTIFY`] with datamatch `i`, so a notify
    /// wakes the device's thread without an exit to the vCPU thread.
    pub fn notifiers(&self) -> &[Arc<EventFd>] {
        &self.notifiers
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    /// The device's current status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are only writable while the driver sets the
        // device up, never under a running device.
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
        // Notifications for the old queues must not wake the next run.
        for n in &self.notifiers {
            let _ = n.read();
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Spec 3.1.1: refuse FEATURES_OK; the driver reads it back.
                value &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 && !self.activated {
            if value & status::FEATURES_OK == 0 {
                value |= status::DEVICE_NEEDS_RESET;
            } else {
                match self.activate() {
                    Ok(()) => self.activated = true,
                    Err(e) => {
                        guest_warn!(device = self.device.device_type(), error = %e, "virtio device activation failed");
                        value |= status::DEVICE_NEEDS_RESET;
                    }
                }
            }
        }
        self.status = value;
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::Device(format!(
                    "queue {i} has an invalid size or ring address"
                )));
            }
            q.set_event_idx(event_idx);
        }
        let notifiers = self.notifiers.clone();
        let queues = std::mem::replace(&mut self.queues, Self::fresh_queues(self.device.as_ref()));
        self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            self.interrupt.clone(),
            notifiers,
        )
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "the low half of the 64-bit feature bits"
                )]
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue ignores sizes that are not a power of two
                    // or exceed the maximum; is_valid() rejects them later.
                    // One beyond 16 bits is ignored the same way.
                    if let Ok(size) = u16::try_from(v) {
                        q.set_size(size);
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            // Only reached when no ioeventfd took the write (unit tests,
            // or a kernel without them): the same eventfd, the same path.
            reg::QUEUE_NOTIFY => {
                if self.activated && self.status & status::DEVICE_NEEDS_RESET == 0 {
                    if let Some(n) = usize::try_from(v).ok().and_then(|i| self.notifiers.get(i)) {
                        if let Err(e) = n.write(1) {
                            tracing::warn!(error = %e, "cannot signal a queue notification");
                        }
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!(
                offset,
                value = v,
                "write to read-only or unknown virtio-mmio register"
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers below the config space are 32-bit and aligned (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_u32(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return None;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_u32(offset, u32::from_le_bytes(bytes));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, usize)>,
        notifiers: Vec<Arc<EventFd>>,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Log>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            features: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
            notifiers: Vec<Arc<EventFd>>,
        ) -> Result<(), ActivateError> {
            let mut log = self.0.lock().unwrap();
            log.activations.push((features, queues.len()));
            log.notifiers = notifiers;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(IrqLine::new(5).unwrap());
        (
            MmioTransport::new(Box::new(FakeDevice(log.clone())), mem, irq).unwrap(),
            log,
        )
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// Drives the transport as Linux's virtio_mmio driver does.
    fn setup(t: &mut MmioTransport, driver_features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(
            t,
            reg::DRIVER_FEATURES,
            (driver_features & 0xffff_ffff).try_into().unwrap(),
        );
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, 0x1000);
        w(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(t, reg::QUEUE_READY, 1);
    }

    const DRIVER_READY: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identifies_as_virtio_mmio_v2() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 4);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::DEVICE_FEATURES),
            1,
            "VERSION_1 in the high word"
        );
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        let mut cfg = [0; 2];
        t.read(reg::CONFIG + 3, &mut cfg);
        assert_eq!(cfg, [3, 3]);
    }

    #[test]
    fn driver_ok_activates_with_negotiated_features_and_notifies_reach_device() {
        let (mut t, log) = transport();
        setup(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, DRIVER_READY);
        assert_eq!(r(&mut t, reg::STATUS), DRIVER_READY);
        assert_eq!(
            log.lock().unwrap().activations,
            vec![(VIRTIO_F_VERSION_1, 1)]
        );
        let log = log.lock().unwrap();
        assert_eq!(log.notifiers.len(), 1);
        assert!(log.notifiers[0].read().is_err(), "nothing notified yet");
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(
            log.notifiers[0].read().unwrap(),
            1,
            "the device's eventfd fires"
        );
        w(&mut t, reg::QUEUE_NOTIFY, 7);
        assert!(
            log.notifiers[0].read().is_err(),
            "a queue that does not exist"
        );
    }

    #[test]
    fn unoffered_features_are_refused() {
        let (mut t, log) = transport();
        setup(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, DRIVER_READY);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn legacy_drivers_without_version_1_are_refused() {
        let (mut t, _) = transport();
        setup(&mut t, 0);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_with_rings_outside_memory_does_not_activate() {
        let (mut t, log) = transport();
        setup(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        w(&mut t, reg::STATUS, DRIVER_READY);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(log.lock().unwrap().activations.is_empty());
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(
            t.notifiers()[0].read().is_err(),
            "no notify to an inactive device"
        );
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let (mut t, log) = transport();
        setup(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, DRIVER_READY);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // And the device can be brought up again.
        setup(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::STATUS, DRIVER_READY);
        assert_eq!(log.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn misaligned_or_narrow_register_accesses_are_ignored() {
        let (mut t, _) = transport();
        let mut d = [0xff; 2];
        t.read(reg::MAGIC, &mut d);
        assert_eq!(d, [0, 0]);
        t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn interrupt_ack_clears_only_acked_bits() {
        let (mut t, _) = transport();
        t.interrupt.signal_used_queue();
        t.interrupt.signal_config_change();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING | INT_CONFIG);
        w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    }
}
