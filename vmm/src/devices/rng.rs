//! virtio-rng (virtio 1.1, 5.4): fills the guest's buffers from the host's
//! getrandom(2), so the guest's entropy pool is ready without waiting.

use super::thread::{DeviceThread, QueueWorker};
use super::virtio_mmio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::seccomp::Role;
use std::io;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Virtio device ID of an entropy source.
const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered to the guest.
const QUEUE_SIZE: u16 = 64;
/// Bytes served per descriptor at most: a guest asking for gigabytes gets
/// a short read, not a stalled vCPU.
const MAX_CHUNK: u32 = 64 * 1024;

/// The entropy device; its queue is served on its own thread, `rng`.
pub struct Rng {
    thread: DeviceThread,
    worker: QueueWorker,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

impl Rng {
    /// A new, inactive device, with its thread waiting.
    pub fn new() -> io::Result<Self> {
        Ok(Rng {
            thread: DeviceThread::spawn("rng", Role::Device)?,
            worker: QueueWorker::new()?,
        })
    }
}

impl Active {
    fn process(&mut self) {
        let mut used_any = false;
        let mem = self.mem.clone();
        while let Some(chain) = self.queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    // A device-readable buffer on an entropy queue is a
                    // driver bug: skip it, serve the rest.
                    continue;
                }
                let len = desc.len().min(MAX_CHUNK);
                let mut buf = vec![0u8; len as usize];
                if getrandom::fill(&mut buf).is_err() {
                    break;
                }
                match mem.write_slice(&buf, desc.addr()) {
                    Ok(()) => written = written.saturating_add(len),
                    Err(e) => {
                        guest_warn!(error = %e, "virtio-rng: descriptor outside guest memory");
                        break;
                    }
                }
            }
            if let Err(e) = self.queue.add_used(&mem, head, written) {
                guest_warn!(error = %e, "virtio-rng: cannot return buffer");
                break;
            }
            used_any = true;
        }
        if used_any && self.queue.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        // The queue loop first: the thread's own drop waits for its job.
        self.worker.stop();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        notifiers: Vec<Arc<EventFd>>,
    ) -> Result<(), ActivateError> {
        let queue = queues
            .drain(..)
            .next()
            .filter(|q| q.ready())
            .ok_or(ActivateError::QueueNotReady(0))?;
        let mut active = Active {
            mem,
            queue,
            interrupt,
        };
        self.worker
            .start(&self.thread, notifiers, move |_| active.process())
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
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const VRING_DESC_F_WRITE: u16 = 2;

    fn run(
        descs: &[RawDescriptor],
    ) -> (
        GuestMemoryMmap,
        MockSplitQueue<'static, GuestMemoryMmap>,
        u32,
    ) {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        ));
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(IrqLine::new(5).unwrap())));
        let mut rng = Rng::new().unwrap();
        let notifier = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        rng.activate(
            mem.clone(),
            VIRTIO_F_VERSION_1,
            vec![queue],
            interrupt.clone(),
            vec![notifier.clone()],
        )
        .unwrap();
        notifier.write(1).unwrap();
        // Served on the device's thread: wait for the used ring to move.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.used().idx().load() == 0 {
            assert!(Instant::now() < deadline, "the rng thread served nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        rng.reset();
        (mem.clone(), vq, interrupt.status())
    }

    #[test]
    fn fills_writable_buffers_and_reports_length() {
        let desc = RawDescriptor::from(SplitDescriptor::new(0x8000, 256, VRING_DESC_F_WRITE, 0));
        let (mem, vq, irq) = run(&[desc]);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1);
        let elem = used.ring().ref_at(0).unwrap().load();
        assert_eq!(elem.len(), 256);
        let mut buf = [0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert!(buf.iter().any(|b| *b != 0), "buffer was filled");
        assert_eq!(irq, 1, "guest interrupted");
    }

    #[test]
    fn buffer_outside_guest_memory_is_returned_empty_without_panic() {
        let desc = RawDescriptor::from(SplitDescriptor::new(
            0xffff_0000,
            4096,
            VRING_DESC_F_WRITE,
            0,
        ));
        let (_mem, vq, _) = run(&[desc]);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1);
        assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn an_active_device_is_dropped_without_a_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(IrqLine::new(5).unwrap())));
        let notifier = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut rng = Rng::new().unwrap();
        rng.activate(
            mem.clone(),
            VIRTIO_F_VERSION_1,
            vec![queue],
            interrupt,
            vec![notifier],
        )
        .unwrap();
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(rng);
            let _ = done.send(());
        });
        assert!(
            dropped.recv_timeout(Duration::from_secs(10)).is_ok(),
            "dropping an active device hangs"
        );
    }

    #[test]
    fn readable_buffers_are_skipped() {
        let desc = RawDescriptor::from(SplitDescriptor::new(0x8000, 64, 0, 0));
        let (_mem, vq, _) = run(&[desc]);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}
