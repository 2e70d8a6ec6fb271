//! The kernel command line: what the VMM itself needs, then the user's.

use crate::cpuid::CpuProfile;
use crate::devices::legacy::PANIC_PORT;
use crate::layout::CMDLINE_MAX_SIZE;
use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use thiserror::Error;

/// Options every vmcri guest boots with:
/// - the 16550 at 0x3f8 is the console;
/// - `reboot=k`: reboot through the i8042 reset line, which ends the VM
///   (without ACPI a power-off would only halt);
/// - `panic=1`: a panicking guest resets if the panic port went unheard;
/// - `tsc=reliable no_timer_check`: skip clock checks that cost seconds of
///   emulated kernel time on nested hosts and are moot under KVM;
/// - `i8042.*`, `pci=off`: there is no keyboard controller beyond the reset
///   line, and no PCI.
const BASE_ARGS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=1",
    "tsc=reliable",
    "no_timer_check",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
];

/// Errors in building the command line.
#[derive(Debug, Error)]
pub enum KernelCmdlineError {
    /// The result does not fit the kernel's buffer, or an argument is invalid.
    #[error("kernel command line: {0} (the limit is {max} bytes including the NUL)", max = CMDLINE_MAX_SIZE)]
    Invalid(#[from] CmdlineError),
}

/// A virtio-mmio device the guest should probe: `size@base:irq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceArg {
    /// Window base address.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// GSI the device raises.
    pub irq: u32,
}

/// Builds the command line: base options, the CPU profile's options, the
/// panic port, the virtio-mmio devices, then `extra` as given by the user.
pub fn build(
    profile: CpuProfile,
    devices: &[MmioDeviceArg],
    extra: Option<&str>,
) -> Result<Cmdline, KernelCmdlineError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    for arg in BASE_ARGS.iter().chain(profile.kernel_args()) {
        cmdline.insert_str(arg)?;
    }
    cmdline.insert_str(format!("vmcri_panic_port={PANIC_PORT:#x}"))?;
    for dev in devices {
        cmdline.insert_str(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            dev.size >> 10,
            dev.base,
            dev.irq
        ))?;
    }
    if let Some(extra) = extra.map(str::trim).filter(|s| !s.is_empty()) {
        cmdline.insert_str(extra)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn base_options_come_first_and_user_options_last() {
        let c = build(CpuProfile::Host, &[], Some("init=/bin/sh quiet")).unwrap();
        let s = text(&c);
        assert!(s.starts_with("console=ttyS0 reboot=k panic=1"), "{s}");
        assert!(s.contains("vmcri_panic_port=0x505"), "{s}");
        assert!(s.ends_with("init=/bin/sh quiet"), "{s}");
        assert!(!s.contains("vmcri_pvm"), "{s}");
    }

    #[test]
    fn nested_profile_adds_its_workarounds() {
        let s = text(&build(CpuProfile::NestedSoftware, &[], None).unwrap());
        assert!(s.contains(" vmcri_pvm noxsave "), "{s}");
    }

    #[test]
    fn virtio_devices_are_declared() {
        let devs = [
            MmioDeviceArg {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceArg {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let s = text(&build(CpuProfile::Host, &devs, None).unwrap());
        assert!(
            s.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
            "{s}"
        );
    }

    #[test]
    fn blank_extra_is_ignored() {
        let s = text(&build(CpuProfile::Host, &[], Some("   ")).unwrap());
        assert!(s.ends_with("vmcri_panic_port=0x505"), "{s}");
    }

    #[test]
    fn oversized_command_line_is_rejected() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = build(CpuProfile::Host, &[], Some(&long)).unwrap_err();
        assert!(err.to_string().contains("2048"), "{err}");
    }

    #[test]
    fn invalid_characters_are_rejected() {
        assert!(build(CpuProfile::Host, &[], Some("a\u{1}b")).is_err());
    }
}
