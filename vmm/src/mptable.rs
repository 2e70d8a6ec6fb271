//! Intel MultiProcessor Specification 1.4 tables, which tell a guest
//! without ACPI where its CPUs, IOAPIC and interrupt routing are.
//!
//! Written by hand: the format is a few fixed-size little-endian records,
//! and no maintained crate produces it without pulling in a whole VMM.

use crate::layout::{EBDA_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};
use thiserror::Error;

/// Most vCPUs whose entries fit in the kilobyte the table occupies.
pub const MAX_VCPUS: u8 = 32;
/// IOAPIC input pins (KVM's in-kernel IOAPIC has 24).
const IOAPIC_PINS: u8 = 24;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Family 6, as a CPU signature in processor entries; Linux ignores it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

/// Errors in building the MP table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    /// vCPU count outside 1..=MAX_VCPUS.
    #[error("the MP table describes 1 to {MAX_VCPUS} vCPUs, asked for {0}")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The floating pointer and configuration table for `vcpus` CPUs, laid out
/// to be written at [`MPTABLE_ADDR`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let config_addr = u32::try_from(MPTABLE_ADDR).expect("the MP table lies below 1 MiB") + 16;
    let ioapic_id = vcpus;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n arrives on IOAPIC pin n; pin 0 carries the 8259's ExtINT.
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { MP_IRQ_EXTINT } else { MP_IRQ_INT };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 takes ExtINT, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let length = u16::try_from(44 + entries.len()).map_err(|_| MpTableError::VcpuCount(vcpus))?;
    header.extend_from_slice(&length.to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"VMCRI   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_addr.to_le_bytes());
    table.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    debug_assert!(table.len() as u64 <= EBDA_END - MPTABLE_ADDR);
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for vcpus in [1, 2, MAX_VCPUS] {
            let t = build(vcpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let ptr = u64::from(u32::from_le_bytes(t[4..8].try_into().unwrap()));
            let config = &t[usize::try_from(ptr - MPTABLE_ADDR).unwrap()..];
            assert_eq!(&config[0..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(&config[..len]), 0, "config table checksum");
            assert!(
                t.len() as u64 <= EBDA_END - MPTABLE_ADDR,
                "{vcpus} vCPUs overflow the reserved KiB"
            );
        }
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let t = build(4).unwrap();
        let entries = &t[16 + 44..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(4).collect();
        for (id, e) in cpus.iter().enumerate() {
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1] as usize, id);
            assert_eq!(e[3] & CPU_BOOT_PROCESSOR != 0, id == 0);
        }
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert_eq!(build(0), Err(MpTableError::VcpuCount(0)));
        assert_eq!(
            build(MAX_VCPUS + 1),
            Err(MpTableError::VcpuCount(MAX_VCPUS + 1))
        );
    }
}
