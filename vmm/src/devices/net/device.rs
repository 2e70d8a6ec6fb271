//! The virtio device and its loop on the `net` thread.

use super::config::MacAddr;
use super::header::*;
use super::queues::{NetQueues, RX, TX};
use super::tap::Tap;
use crate::devices::thread::{DeviceThread, Task};
use crate::devices::virtio_mmio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::seccomp::Role;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Virtio device ID of a network card.
const VIRTIO_ID_NET: u32 = 1;
/// Size of each queue: room for a 64 KiB frame in 4 KiB buffers many
/// times over.
const QUEUE_SIZE: u16 = 256;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const STOP_TOKEN: u64 = 3;

/// The network device; its queues are served on its own thread, `net`.
pub struct Net {
    mac: MacAddr,
    mtu: Option<u16>,
    tap: Arc<Tap>,
    stop: Arc<EventFd>,
    thread: DeviceThread,
    worker: Option<Task<()>>,
}

impl Net {
    /// A device over `tap` whose guest interface has `mac` and, if given,
    /// `mtu`; its thread is started and waits.
    pub fn new(tap: Arc<Tap>, mac: MacAddr, mtu: Option<u16>) -> io::Result<Self> {
        Ok(Net {
            mac,
            mtu,
            tap,
            stop: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            thread: DeviceThread::spawn("net", Role::Net)?,
            worker: None,
        })
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = self.stop.write(1);
            if worker.join().is_none() {
                tracing::error!("virtio-net worker panicked");
            }
            let _ = self.stop.read();
        }
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

struct Worker {
    queues: NetQueues,
    features: u64,
    epoll: Epoll,
    notifiers: Vec<Arc<EventFd>>,
    interrupt: Arc<VirtioInterrupt>,
    tap_armed: bool,
}

impl Worker {
    fn run(mut self) {
        // The offloads the driver acked, set here rather than on the vCPU
        // thread that activates us: the Net role allows TUNSETOFFLOAD (on
        // its own tap, the only tun fd it holds), and the vCPU role stays
        // without tap ioctls. The tap had none until now, so a failure
        // leaves it sending plain frames, which every driver takes.
        if let Err(e) = self.queues.tap().set_offloads(tun_offloads(self.features)) {
            tracing::error!(error = %e, "virtio-net: cannot set the tap's offloads");
        }
        let mut events = [EpollEvent::default(); 4];
        loop {
            let tx = self.queues.process_tx();
            let rx = self.queues.process_rx();
            if tx.notify || rx.notify {
                self.interrupt.signal_used_queue();
            }
            if let Err(e) = self.arm_tap(self.queues.wants_tap()) {
                tracing::error!(error = %e, "virtio-net: epoll on the tap failed; stopping");
                return;
            }
            // Work left over: look at the events, but do not wait.
            let timeout = if tx.more || rx.more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net: epoll failed; stopping");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => return,
                    RX_TOKEN => {
                        let _ = self.notifiers[RX].read();
                        self.queues.rx_notified();
                    }
                    TX_TOKEN => {
                        let _ = self.notifiers[TX].read();
                    }
                    _ => {}
                }
            }
        }
    }

    /// Waits for the tap only while a frame read from it could go
    /// somewhere: the kernel's tap queue is the only backlog. Added and
    /// removed rather than modified to no events, since epoll reports a
    /// hang-up even then.
    fn arm_tap(&mut self, want: bool) -> io::Result<()> {
        if want == self.tap_armed {
            return Ok(());
        }
        let fd = self.queues.tap().as_raw_fd();
        if want {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TAP_TOKEN),
            )?;
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        }
        self.tap_armed = want;
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MRG_RXBUF;
        if self.mtu.is_some() {
            f |= VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    // Config writes are ignored (the default): with VERSION_1 the MAC is
    // the device's to set, and nothing else there is writable.

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError> {
        let device_err = |e: io::Error| ActivateError::Device(e.to_string());
        if queues.len() != 2 || notifiers.len() != 2 {
            return Err(ActivateError::Device("virtio-net needs two queues".into()));
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.stop_worker();
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        let (tap, stop) = (self.tap.clone(), self.stop.clone());
        // The epoll set is built on the net thread, whose role has the
        // epoll calls; the vCPU's has none.
        let setup = move || {
            let epoll = Epoll::new()?;
            let fds = [
                (notifiers[RX].as_raw_fd(), RX_TOKEN),
                (notifiers[TX].as_raw_fd(), TX_TOKEN),
                (stop.as_raw_fd(), STOP_TOKEN),
            ];
            for (fd, token) in fds {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )?;
            }
            Ok(Worker {
                queues: NetQueues::new(mem, rx, tx, tap, features),
                features,
                epoll,
                notifiers,
                interrupt,
                tap_armed: false,
            })
        };
        self.worker = Some(self.thread.start(setup, Worker::run).map_err(device_err)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}
