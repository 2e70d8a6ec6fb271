//! vCPU setup and the per-vCPU thread that runs it.

use crate::boot::BootEntry;
use crate::cpuid::{self, CpuProfile};
use crate::devices::bus::Bus;
use crate::devices::VmRequest;
use crate::exit::ExitReason;
use crate::layout;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;

/// IA32_MISC_ENABLE and its fast-string bit, which Linux expects set.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// Local APIC LVT registers for LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 7;
const APIC_MODE_NMI: u32 = 4;
/// CR0.PE and CR0.ET: protected mode, paging off, as PVH entry requires.
const CR0_PE_ET: u64 = 0x11;
/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Errors in configuring a vCPU.
#[derive(Debug, Error)]
#[error("vCPU {id}: {what}: {source}")]
pub struct VcpuError {
    id: u8,
    what: &'static str,
    source: kvm_ioctls::Error,
}

/// The buses a vCPU dispatches its exits to.
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

fn segment(selector: u16, type_: u8, s: u8, db: u8, g: u8, limit: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l: 0,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn set_lvt(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = r.cast_unsigned();
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b.cast_signed();
    }
}

impl Vcpu {
    /// Configures vCPU `id` of `count`; the boot vCPU (0) gets the PVH
    /// entry state, the others wait for the guest's INIT/SIPI.
    pub fn configure(
        id: u8,
        count: u8,
        fd: VcpuFd,
        supported: &CpuId,
        profile: CpuProfile,
        boot: &BootEntry,
    ) -> Result<Self, VcpuError> {
        let err = |what| move |source| VcpuError { id, what, source };
        let mut cpuid = supported.clone();
        cpuid::configure(&mut cpuid, profile, id, count);
        fd.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;

        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        }])
        .map_err(|_| VcpuError {
            id,
            what: "build MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_msrs(&msrs).map_err(err("set MSRs"))?;

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(err("set FPU"))?;

        let mut lapic = fd.get_lapic().map_err(err("get LAPIC"))?;
        set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("set LAPIC"))?;

        if id == 0 {
            let mut sregs = fd.get_sregs().map_err(err("get sregs"))?;
            sregs.cs = segment(0x08, 0xb, 1, 1, 1, 0xffff_ffff);
            let data = segment(0x10, 0x3, 1, 1, 1, 0xffff_ffff);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(0x18, 0xb, 0, 0, 0, 0xfffff);
            sregs.gdt.base = layout::BOOT_GDT_ADDR;
            sregs.gdt.limit = u16::try_from(crate::boot::BOOT_GDT.len() * 8 - 1)
                .expect("the boot GDT has four entries");
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cr0 = CR0_PE_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            fd.set_sregs(&sregs).map_err(err("set sregs"))?;

            let regs = kvm_regs {
                rip: boot.entry.0,
                rbx: boot.start_info.0,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(err("set registers"))?;
        }
        Ok(Vcpu { id, fd })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until it asks the VM to end, KVM fails, or `stop` is
    /// set (checked whenever KVM_RUN is interrupted by a signal).
    pub fn run(mut self, buses: &Buses, stop: &AtomicBool) -> Option<ExitReason> {
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    buses.pio.write(u64::from(port), data).map(request_reason)
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    // An unclaimed port floats high, as on a real ISA bus.
                    if !buses.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    buses.mmio.write(addr, data).map(request_reason)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !buses.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    SYSTEM_EVENT_SHUTDOWN | SYSTEM_EVENT_RESET => ExitReason::Reset,
                    SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
                    other => ExitReason::KvmError(format!(
                        "vCPU {}: unknown system event {other}",
                        self.id
                    )),
                }),
                // The in-kernel irqchip handles HLT; seeing it means the
                // guest halted with nothing to wake it.
                Ok(VcpuExit::Hlt) => Some(ExitReason::KvmError(format!(
                    "vCPU {} halted for good",
                    self.id
                ))),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::KvmError(format!(
                    "vCPU {}: VM entry failed on host CPU {cpu}, hardware reason {reason:#x}",
                    self.id
                ))),
                Ok(VcpuExit::InternalError) => Some(ExitReason::KvmError(format!(
                    "vCPU {}: KVM internal error (an instruction KVM could not emulate?) at {}",
                    self.id,
                    self.where_()
                ))),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(ExitReason::KvmError(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    self.id
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::KvmError(format!(
                    "vCPU {}: KVM_RUN: {e}",
                    self.id
                ))),
            };
            if outcome.is_some() {
                return outcome;
            }
        }
    }
}

impl Vcpu {
    /// Where the vCPU stopped, for error messages.
    fn where_(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!("rip={:#x} rsp={:#x}", r.rip, r.rsp),
            Err(e) => format!("unknown rip ({e})"),
        }
    }
}

fn request_reason(request: VmRequest) -> ExitReason {
    match request {
        VmRequest::Reset => ExitReason::Reset,
        VmRequest::Panic => ExitReason::GuestPanic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_replaces_only_the_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Masked (bit 16) with fixed delivery and vector 0x30.
        for (r, b) in regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter_mut()
            .zip(0x0001_0030u32.to_le_bytes())
        {
            *r = b.cast_signed();
        }
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let bytes: Vec<u8> = regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter()
            .map(|c| c.cast_unsigned())
            .collect();
        assert_eq!(u32::from_le_bytes(bytes.try_into().unwrap()), 0x0001_0730);
    }
}
