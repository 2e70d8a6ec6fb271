//! Assembling a microVM from a [`VmConfig`] and running it to its end.

use crate::boot::{self, BootError};
use crate::cmdline::{self, KernelCmdlineError, MmioDeviceArg};
use crate::cpuid::CpuProfile;
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::fs::FsDevice;
use crate::devices::legacy::{
    I8042Reset, PanicPort, I8042_DATA_PORT, I8042_PORT_RANGE, PANIC_PORT,
};
use crate::devices::net::{MacAddr, Net, Tap};
use crate::devices::rng::Rng;
use crate::devices::serial::{Bounded, Console, COM1_IRQ, COM1_PORT, UART_PORT_RANGE};
use crate::devices::virtio_mmio::{self, MmioTransport, VirtioDevice};
use crate::devices::vsock::Vsock;
use crate::devices::IrqLine;
use crate::exit::ExitReason;
use crate::layout::{self, LayoutError};
use crate::mptable::{self, MpTableError};
use crate::seccomp::{self, Role};
use crate::vcpu::{Buses, Vcpu, VcpuError};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// First GSI handed to virtio-mmio devices (0-4 are the PIT, keyboard,
/// cascade and COM ports).
const VIRTIO_FIRST_IRQ: u32 = 5;
/// Last GSI of KVM's IOAPIC.
const LAST_IRQ: u32 = 23;

/// Most console bytes written to a file; beyond that output is dropped,
/// so a guest cannot fill the host's disk.
pub const SERIAL_FILE_LIMIT: u64 = 16 << 20;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated, holding at most
    /// [`SERIAL_FILE_LIMIT`] bytes.
    File(PathBuf),
    /// Nowhere.
    Discard,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed vmlinux with a PVH entry.
    pub kernel: PathBuf,
    /// Uncompressed cpio (newc) initramfs.
    pub initrd: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Extra kernel command line, after the VMM's own options.
    pub cmdline_extra: Option<String>,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// CPUID profile.
    pub cpu_profile: CpuProfile,
    /// End the VM if it runs longer than this.
    pub timeout: Option<Duration>,
    /// Hybrid vsock: the host-side Unix socket, if the VM has a vsock device.
    pub vsock: Option<VsockConfig>,
    /// A host directory shared over virtio-fs, if any.
    pub shared_fs: Option<SharedFsConfig>,
    /// A network card over a tap, if any.
    pub net: Option<NetConfig>,
}

/// The virtio-net device's settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The tap the runtime handed over, already validated.
    pub tap: Arc<Tap>,
    /// The guest interface's MAC.
    pub mac: MacAddr,
    /// The guest interface's MTU, if set.
    pub mtu: Option<u16>,
}

/// The virtio-fs device's settings.
#[derive(Debug, Clone)]
pub struct SharedFsConfig {
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
    /// The host directory served; nothing outside it is reachable.
    pub dir: PathBuf,
}

/// The vsock device's settings.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// Guest CID (3 or more).
    pub guest_cid: u64,
    /// Host-side Unix socket; guest connections to host port P go to
    /// `<path>_P`.
    pub uds_path: PathBuf,
}

/// Errors in building a VM.
#[derive(Debug, Error)]
pub enum BuildError {
    /// Memory size out of range.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// vCPU count out of range.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Kernel or initramfs problem.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Command line problem.
    #[error(transparent)]
    Cmdline(#[from] KernelCmdlineError),
    /// The shared directory cannot be served.
    #[error("{0}")]
    SharedFs(String),
    /// A KVM call failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be configured.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory could not be allocated or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Devices overlap.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A host resource (file, eventfd, thread) could not be had.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Too many devices for the interrupt lines.
    #[error("too many virtio devices: only GSIs {VIRTIO_FIRST_IRQ}-{LAST_IRQ} are available")]
    TooManyDevices,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// A built VM, ready to run.
pub struct Vm {
    // Kept open for the VM's lifetime: the vCPUs belong to it.
    _kvm: Kvm,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    console: Arc<Mutex<Console>>,
    timeout: Option<Duration>,
}

impl Vm {
    /// Builds the VM `config` describes; nothing runs yet.
    pub fn build(config: &VmConfig) -> Result<Vm, BuildError> {
        mptable::build(config.vcpus)?; // validate the count before touching KVM
        let regions = layout::ram_regions(config.memory_mib)?;

        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;

        let mem = GuestMemoryMmap::<()>::from_ranges(&regions)
            .map_err(|e| BuildError::Memory(e.to_string()))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| BuildError::Memory(e.to_string()))?;
            let kvm_region = kvm_userspace_memory_region {
                slot: u32::try_from(slot)
                    .map_err(|_| BuildError::Memory("too many memory regions".into()))?,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // returned Vm keeps for as long as the VM exists.
            unsafe { vm.set_user_memory_region(kvm_region) }
                .map_err(kvm_err("register guest memory"))?;
        }

        // Devices.
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let com1_irq = Arc::new(IrqLine::new(COM1_IRQ).map_err(io_err("serial eventfd"))?);
        vm.register_irqfd(com1_irq.eventfd(), com1_irq.gsi())
            .map_err(kvm_err("register serial irqfd"))?;
        let out: Box<dyn Write + Send> = match &config.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(p) => Box::new(Bounded::new(
                std::fs::File::create(p)
                    .map_err(io_err(format!("create serial output {}", p.display())))?,
                SERIAL_FILE_LIMIT,
            )),
            SerialOutput::Discard => Box::new(std::io::sink()),
        };
        let console = Arc::new(Mutex::new(Console::new(com1_irq, out)));
        pio.insert(console.clone(), COM1_PORT, UART_PORT_RANGE)?;
        pio.insert(
            Arc::new(Mutex::new(I8042Reset)),
            I8042_DATA_PORT,
            I8042_PORT_RANGE,
        )?;
        pio.insert(Arc::new(Mutex::new(PanicPort)), PANIC_PORT, 1)?;

        let rng = Rng::new().map_err(io_err("virtio-rng thread"))?;
        let mut virtio: Vec<Box<dyn VirtioDevice>> = vec![Box::new(rng)];
        if let Some(v) = &config.vsock {
            let dev = Vsock::new(v.guest_cid, &v.uds_path)
                .map_err(io_err(format!("vsock socket {}", v.uds_path.display())))?;
            virtio.push(Box::new(dev));
        }
        if let Some(f) = &config.shared_fs {
            let dev =
                FsDevice::new(&f.tag, &f.dir).map_err(|e| BuildError::SharedFs(e.to_string()))?;
            virtio.push(Box::new(dev));
        }
        if let Some(n) = &config.net {
            let dev = Net::new(n.tap.clone(), n.mac, n.mtu).map_err(io_err("virtio-net thread"))?;
            virtio.push(Box::new(dev));
        }
        let mut mmio_args = Vec::new();
        for (i, device) in virtio.into_iter().enumerate() {
            let irq = u32::try_from(i)
                .ok()
                .and_then(|i| VIRTIO_FIRST_IRQ.checked_add(i))
                .filter(|irq| *irq <= LAST_IRQ)
                .ok_or(BuildError::TooManyDevices)?;
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let line = Arc::new(IrqLine::new(irq).map_err(io_err("virtio eventfd"))?);
            vm.register_irqfd(line.eventfd(), irq)
                .map_err(kvm_err("register virtio irqfd"))?;
            let transport = MmioTransport::new(device, mem.clone(), line)
                .map_err(io_err("virtio queue eventfd"))?;
            // Queue notifications go straight to the device's thread.
            for (queue, notifier) in transport.notifiers().iter().enumerate() {
                let queue = u32::try_from(queue).map_err(|_| BuildError::TooManyDevices)?;
                vm.register_ioevent(
                    notifier,
                    &IoEventAddress::Mmio(base + virtio_mmio::reg::QUEUE_NOTIFY),
                    queue,
                )
                .map_err(kvm_err("register a queue notify ioeventfd"))?;
            }
            let transport: SharedDevice = Arc::new(Mutex::new(transport));
            mmio.insert(transport, base, layout::VIRTIO_MMIO_SIZE)?;
            mmio_args.push(MmioDeviceArg {
                base,
                size: layout::VIRTIO_MMIO_SIZE,
                irq,
            });
        }

        // Guest image and boot tables.
        let (entry, kernel_end) = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = boot::load_initrd(
            &mem,
            &config.initrd,
            kernel_end,
            layout::low_ram_end(config.memory_mib),
        )?;
        let cmdline = cmdline::build(
            config.cpu_profile,
            &mmio_args,
            config.cmdline_extra.as_deref(),
        )?;
        let e820 = layout::e820_map(config.memory_mib)?;
        let boot_entry = boot::write_pvh_info(&mem, entry, &cmdline, &e820, initrd)?;
        boot::write_gdt(&mem)?;
        mem.write_slice(
            &mptable::build(config.vcpus)?,
            GuestAddress(layout::MPTABLE_ADDR),
        )
        .map_err(|e| BuildError::Memory(e.to_string()))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            vcpus.push(Vcpu::configure(
                id,
                config.vcpus,
                fd,
                &supported,
                config.cpu_profile,
                &boot_entry,
            )?);
        }

        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            vcpus,
            buses: Arc::new(Buses { pio, mmio }),
            console,
            timeout: config.timeout,
        })
    }

    /// Runs the guest until it ends, and says why.
    pub fn run(self) -> Result<ExitReason, BuildError> {
        kick_signal::install().map_err(io_err("install vCPU kick signal"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            let (buses, stop, tx) = (self.buses.clone(), stop.clone(), tx.clone());
            let id = vcpu.id();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // Before the first KVM_RUN: from here on the guest
                    // drives this thread.
                    if let Err(e) = seccomp::install(Role::Vcpu) {
                        let _ = tx.send(ExitReason::KvmError(format!("vCPU {id}: {e}")));
                        return;
                    }
                    if let Some(reason) = vcpu.run(&buses, &stop) {
                        let _ = tx.send(reason);
                    }
                })
                .map_err(io_err(format!("spawn vCPU {id} thread")))?;
            threads.push(handle);
        }
        drop(tx);
        // Every thread the VMM will have exists now.
        let main_filter = seccomp::install(Role::Main);

        let reason = match main_filter.map_err(|e| e.to_string()).and(Ok(self.timeout)) {
            Err(e) => ExitReason::KvmError(format!("main thread: {e}")),
            Ok(timeout) => match timeout {
                Some(t) => match rx.recv_timeout(t) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => ExitReason::Timeout,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        ExitReason::KvmError("all vCPU threads ended without a reason".into())
                    }
                },
                None => rx.recv().unwrap_or_else(|_| {
                    ExitReason::KvmError("all vCPU threads ended without a reason".into())
                }),
            },
        };

        // Stop the other vCPUs: a signal interrupts KVM_RUN; repeat until
        // each has seen `stop`, since one may be between checks.
        stop.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        for handle in threads {
            while !handle.is_finished() && Instant::now() < deadline {
                kick_signal::kick(handle.as_pthread_t());
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        if let Err(e) = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
        {
            tracing::warn!(error = %e, "flushing the serial console");
        }
        Ok(reason)
    }
}

/// The real-time signal that interrupts a vCPU's KVM_RUN.
mod kick_signal {
    use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    fn signum() -> libc::c_int {
        SIGRTMIN()
    }

    pub fn install() -> std::io::Result<()> {
        register_signal_handler(signum(), noop)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    pub fn kick(thread: libc::pthread_t) {
        // SAFETY: the thread is alive (not joined) and the signal has a
        // handler installed, so delivery only interrupts KVM_RUN.
        unsafe {
            libc::pthread_kill(thread, signum());
        }
    }
}
