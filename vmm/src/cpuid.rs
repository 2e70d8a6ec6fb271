//! The CPUID the guest sees: KVM's supported set, with per-vCPU topology
//! and, on hosts that need it, the features their KVM cannot run masked.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use std::path::Path;

/// Which CPU features the guest is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports (bare-metal KVM).
    Host,
    /// KVM's set minus what software-assisted nested KVM ("PVM") cannot
    /// emulate in guest kernel mode, and minus hypercall-based paravirt
    /// features, whose `vmcall` never returns there.
    NestedSoftware,
}

/// Host module whose presence means KVM is the software-nested kind.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

impl CpuProfile {
    /// The profile this host needs.
    pub fn detect() -> Self {
        if Path::new(PVM_MODULE).exists() {
            CpuProfile::NestedSoftware
        } else {
            CpuProfile::Host
        }
    }

    /// Kernel options that go with the profile: our kernel's workaround
    /// switch, and `noxsave`: XSAVE's restore cannot be emulated, and on
    /// kvm-pvm the guest kernel still detects XSAVE with the CPUID bit
    /// hidden (the kernel warns that it passes the option on to init,
    /// but its early CPU setup has acted on it).
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            CpuProfile::Host => &[],
            CpuProfile::NestedSoftware => &["vmcri_pvm", "noxsave"],
        }
    }
}

/// Register of a CPUID entry.
#[derive(Debug, Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, subleaf, register, bits to clear) for [`CpuProfile::NestedSoftware`].
/// Measured on kvm-pvm hosts: each of these let a guest execute an
/// instruction the host's emulator cannot handle.
const NESTED_SOFTWARE_MASKS: &[(u32, u32, Reg, u32)] = &[
    // FMA, CX16, PCID, POPCNT, XSAVE, OSXSAVE, AVX, F16C, RDRAND
    (1, 0, Reg::Ecx, bits(&[12, 13, 17, 23, 26, 27, 28, 29, 30])),
    // FSGSBASE, SGX, HLE, AVX2, SMEP, ERMS, INVPCID, RTM, MPX, AVX512F/DQ,
    // RDSEED, SMAP, AVX512_IFMA, AVX512PF/ER/CD, AVX512BW/VL
    (
        7,
        0,
        Reg::Ebx,
        bits(&[
            0, 2, 4, 5, 7, 9, 10, 11, 14, 16, 17, 18, 20, 21, 26, 27, 28, 30, 31,
        ]),
    ),
    // AVX512_VBMI, UMIP, PKU, OSPKE, WAITPKG, AVX512_VBMI2, CET_SS, VAES,
    // VPCLMULQDQ, AVX512_VNNI, AVX512_BITALG, AVX512_VPOPCNTDQ, LA57, RDPID
    (
        7,
        0,
        Reg::Ecx,
        bits(&[1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 16, 22]),
    ),
    // AVX512_4VNNIW, AVX512_4FMAPS, FSRM, AVX512_VP2INTERSECT, CET_IBT,
    // AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8
    (7, 0, Reg::Edx, bits(&[2, 3, 4, 8, 20, 22, 23, 24, 25])),
    // AVX_VNNI, AVX512_BF16
    (7, 1, Reg::Eax, bits(&[4, 5])),
    // XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    (0xd, 1, Reg::Eax, bits(&[0, 1, 2, 3])),
    // KVM: PV_UNHALT, PV_TLB_FLUSH, PV_SEND_IPI, POLL_CONTROL,
    // PV_SCHED_YIELD, HC_MAP_GPA_RANGE, MIGRATION_CONTROL
    (
        KVM_CPUID_FEATURES,
        0,
        Reg::Eax,
        bits(&[7, 9, 11, 12, 13, 16, 17]),
    ),
];

/// KVM's paravirt feature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Turns KVM's supported CPUID into what vCPU `vcpu_id` of `vcpu_count`
/// sees under `profile`.
pub fn configure(cpuid: &mut CpuId, profile: CpuProfile, vcpu_id: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_id) << 24)
                    | (u32::from(vcpu_count) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Extended topology: EDX is the x2APIC ID.
            0xb | 0x1f => entry.edx = u32::from(vcpu_id),
            _ => {}
        }
        if profile == CpuProfile::NestedSoftware {
            for &(leaf, subleaf, reg, mask) in NESTED_SOFTWARE_MASKS {
                if entry.function == leaf && (entry.index == subleaf || !has_subleaves(leaf)) {
                    *reg_mut(entry, reg) &= !mask;
                }
            }
        }
    }
}

/// Leaves whose subleaf index is significant.
fn has_subleaves(leaf: u32) -> bool {
    matches!(leaf, 7 | 0xd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0, u32::MAX),
            entry(7, 0, u32::MAX),
            entry(7, 1, u32::MAX),
            entry(0xb, 0, u32::MAX),
            entry(0xd, 1, u32::MAX),
            entry(KVM_CPUID_FEATURES, 0, u32::MAX),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn nested_software_profile_hides_unemulatable_features() {
        let mut c = sample();
        configure(&mut c, CpuProfile::NestedSoftware, 0, 1);
        let l1 = find(&c, 1, 0);
        for bit in [13, 26, 27, 28] {
            assert_eq!(
                l1.ecx & (1 << bit),
                0,
                "leaf 1 ecx bit {bit} (CX16/XSAVE/AVX)"
            );
        }
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 7), 0, "SMEP");
        assert_eq!(l7.ebx & (1 << 20), 0, "SMAP");
        assert_eq!(l7.ecx & (1 << 2), 0, "UMIP");
        assert_eq!(find(&c, 0xd, 1).eax & 0xf, 0, "XSAVEOPT/C/S");
        let kvm = find(&c, KVM_CPUID_FEATURES, 0);
        for bit in [7, 9, 11] {
            assert_eq!(kvm.eax & (1 << bit), 0, "hypercall feature {bit}");
        }
        // The clock source must survive: KVM_FEATURE_CLOCKSOURCE2 is bit 3.
        assert_ne!(kvm.eax & (1 << 3), 0);
        // Unrelated bits stay: SSE3 (leaf 1 ecx bit 0), BMI1 (leaf 7 ebx bit 3).
        assert_ne!(l1.ecx & 1, 0);
        assert_ne!(l7.ebx & (1 << 3), 0);
    }

    #[test]
    fn host_profile_passes_features_through() {
        let mut c = sample();
        configure(&mut c, CpuProfile::Host, 0, 1);
        assert_eq!(find(&c, 7, 0).ebx, u32::MAX);
        assert_eq!(find(&c, 1, 0).ecx, u32::MAX);
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, u32::MAX);
    }

    #[test]
    fn topology_is_per_vcpu() {
        let mut c = sample();
        configure(&mut c, CpuProfile::Host, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 0).edx, 3, "x2APIC ID");

        let mut single = sample();
        configure(&mut single, CpuProfile::Host, 0, 1);
        assert_eq!(find(&single, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn profile_kernel_args() {
        assert!(CpuProfile::Host.kernel_args().is_empty());
        assert_eq!(
            CpuProfile::NestedSoftware.kernel_args(),
            &["vmcri_pvm", "noxsave"]
        );
    }
}
