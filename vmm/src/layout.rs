//! Guest physical address layout and the e820 map the guest is given.
//!
//! Low memory holds the boot structures; the kernel and the initramfs live
//! above 1 MiB. Between [`MMIO_GAP_START`] and 4 GiB sits the device hole
//! (virtio-mmio windows, IOAPIC, local APIC); RAM that does not fit below
//! it continues at 4 GiB.

use thiserror::Error;
use vm_memory::GuestAddress;

/// GDT used while entering the kernel through PVH.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map (the e820 entries).
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Largest number of e820 entries we ever produce, bounding the memmap area.
pub const MAX_E820_ENTRIES: usize = 8;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Kernel command line capacity, including the terminating NUL
/// (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Intel MP table: in the last KiB of base memory, where Linux scans for it.
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
/// End of conventional memory; from here to 1 MiB is the legacy ISA hole.
pub const EBDA_END: u64 = 0xa_0000;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit device hole.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base (what the MP table announces).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS region, which must not overlap RAM or devices.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Smallest guest we accept: kernel, initramfs and page tables need room.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest we accept (1 TiB): a typo, not a pod, beyond that.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// e820 entry type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry: `[addr, addr + size)` of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Errors in sizing guest memory.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Memory outside the supported range.
    #[error(
        "guest memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, got {0} MiB"
    )]
    MemorySize(u64),
}

/// The RAM regions backing `mem_mib` MiB of guest memory: below the device
/// hole, and the remainder above 4 GiB.
pub fn ram_regions(mem_mib: u64) -> Result<Vec<(GuestAddress, usize)>, LayoutError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mem_mib) {
        return Err(LayoutError::MemorySize(mem_mib));
    }
    let bytes = mem_mib << 20;
    let low = bytes.min(MMIO_GAP_START);
    let size = |n: u64| usize::try_from(n).map_err(|_| LayoutError::MemorySize(mem_mib));
    let mut regions = vec![(GuestAddress(0), size(low)?)];
    if bytes > low {
        regions.push((GuestAddress(MMIO_GAP_END), size(bytes - low)?));
    }
    Ok(regions)
}

/// The e820 map for `mem_mib` MiB of RAM. The MP table's kilobyte below
/// 640 KiB is reserved so the guest never allocates over it.
pub fn e820_map(mem_mib: u64) -> Result<Vec<E820Entry>, LayoutError> {
    let regions = ram_regions(mem_mib)?;
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_ADDR,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: EBDA_END - MPTABLE_ADDR,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in regions {
        let begin = start.0.max(HIMEM_START);
        let end = start.0 + len as u64;
        map.push(E820Entry {
            addr: begin,
            size: end - begin,
            kind: E820_RAM,
        });
    }
    Ok(map)
}

/// The guest physical address of the highest byte of RAM below the device
/// hole, plus one: where the initramfs is placed beneath.
pub fn low_ram_end(mem_mib: u64) -> u64 {
    (mem_mib << 20).min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_ram(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_low_ram_mptable_hole_and_high_ram() {
        let map = e820_map(128).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mib in [32, 128, 3327, 3328, 3329, 8192] {
            let map = e820_map(mib).unwrap();
            assert!(map.len() <= MAX_E820_ENTRIES);
            for pair in map.windows(2) {
                assert!(
                    pair[0].addr + pair[0].size <= pair[1].addr,
                    "{mib}: {map:?}"
                );
            }
            for e in &map {
                let end = e.addr + e.size;
                assert!(
                    end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
                    "{mib}: {e:?} in the hole"
                );
            }
        }
    }

    #[test]
    fn large_guest_continues_above_4g_without_losing_memory() {
        let mib = 8192;
        let regions = ram_regions(mib).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].0, GuestAddress(1 << 32));
        let backed: u64 = regions.iter().map(|r| r.1 as u64).sum();
        assert_eq!(backed, mib << 20);
        // Everything backed is usable except the legacy hole below 1 MiB.
        let map = e820_map(mib).unwrap();
        assert_eq!(total_ram(&map), (mib << 20) - (HIMEM_START - MPTABLE_ADDR));
    }

    #[test]
    fn memory_bounds_are_enforced() {
        assert_eq!(ram_regions(16), Err(LayoutError::MemorySize(16)));
        assert_eq!(
            ram_regions(MAX_MEMORY_MIB + 1),
            Err(LayoutError::MemorySize(MAX_MEMORY_MIB + 1))
        );
        assert!(ram_regions(MIN_MEMORY_MIB).is_ok());
    }
}
