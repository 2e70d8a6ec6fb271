//! Loading the guest: the vmlinux (ELF, entered through PVH), the
//! initramfs, the command line, and the tables the kernel reads at boot.

use crate::layout::{self, E820Entry};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// The initramfs is placed page-aligned.
const PAGE_SIZE: u64 = 4096;
/// Largest initramfs accepted: it is read whole into guest RAM.
pub const MAX_INITRD_SIZE: u64 = 1 << 30;

/// Errors in loading the guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// Path given.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel image is not a loadable ELF vmlinux.
    #[error("kernel {path} is not a loadable x86-64 ELF vmlinux: {source}")]
    LoadKernel {
        /// Path given.
        path: String,
        /// Cause.
        source: loader::Error,
    },
    /// The kernel has no PVH entry point.
    #[error("kernel {0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry(String),
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitrd {
        /// Path given.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The initramfs does not fit.
    #[error("initramfs {path} is {size} bytes; it must be non-empty and fit in guest RAM above the kernel ({room} bytes free, limit {MAX_INITRD_SIZE})")]
    InitrdSize {
        /// Path given.
        path: String,
        /// Its size.
        size: u64,
        /// Room left above the kernel.
        room: u64,
    },
    /// The initramfs is compressed or not a cpio archive.
    #[error("initramfs {0} is not an uncompressed cpio (newc) archive; compressed images cost tens of seconds to unpack in the guest")]
    InitrdFormat(String),
    /// Writing to guest memory failed.
    #[error("writing boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The command line cannot be rendered.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
}

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// 32-bit PVH entry point.
    pub entry: GuestAddress,
    /// Address of `hvm_start_info`, passed in EBX.
    pub start_info: GuestAddress,
}

/// Loads the vmlinux at `path`; returns its PVH entry and where it ends.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: name.clone(),
        source,
    })?;
    let result = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::LoadKernel {
        path: name.clone(),
        source,
    })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok((entry, result.kernel_end)),
        _ => Err(BootError::NoPvhEntry(name)),
    }
}

/// Loads the initramfs at `path` at the top of low RAM, above `kernel_end`.
/// Returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let name = path.display().to_string();
    let read_err = |source| BootError::ReadInitrd {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    let room = low_ram_end.saturating_sub(kernel_end.next_multiple_of(PAGE_SIZE));
    let len = match usize::try_from(size) {
        Ok(len) if size != 0 && size <= room && size <= MAX_INITRD_SIZE => len,
        _ => {
            return Err(BootError::InitrdSize {
                path: name,
                size,
                room,
            })
        }
    };
    file.rewind().map_err(read_err)?;
    let mut magic = [0u8; 6];
    file.read_exact(&mut magic).map_err(read_err)?;
    if &magic != b"070701" && &magic != b"070702" {
        return Err(BootError::InitrdFormat(name));
    }
    file.rewind().map_err(read_err)?;
    let addr = GuestAddress((low_ram_end - size) & !(PAGE_SIZE - 1));
    mem.read_exact_volatile_from(addr, &mut file, len)
        .map_err(BootError::GuestMemory)?;
    Ok((addr, size))
}

/// Writes the command line, e820 map, initramfs module and `hvm_start_info`.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    cmdline: &Cmdline,
    e820: &[E820Entry],
    initrd: (GuestAddress, u64),
) -> Result<BootEntry, BootError> {
    let cmdline = cmdline.as_cstring()?;
    mem.write_slice(
        cmdline.as_bytes_with_nul(),
        GuestAddress(layout::CMDLINE_ADDR),
    )?;

    for (i, e) in e820.iter().take(layout::MAX_E820_ENTRIES).enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = GuestAddress(layout::PVH_MEMMAP_ADDR)
            .unchecked_add((i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64);
        mem.write_obj(entry, at)?;
    }

    let module = hvm_modlist_entry {
        paddr: initrd.0.raw_value(),
        size: initrd.1,
        cmdline_paddr: 0,
        reserved: 0,
    };
    mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_ADDR))?;

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: 1,
        modlist_paddr: layout::PVH_MODLIST_ADDR,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(e820.len().min(layout::MAX_E820_ENTRIES))
            .expect("MAX_E820_ENTRIES fits u32"),
        reserved: 0,
    };
    mem.write_obj(start_info, GuestAddress(layout::PVH_START_INFO_ADDR))?;
    Ok(BootEntry {
        entry,
        start_info: GuestAddress(layout::PVH_START_INFO_ADDR),
    })
}

/// The boot GDT: null, flat 32-bit code, flat data, and a TSS, as the PVH
/// entry expects (selectors 0x08, 0x10, 0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0xfffff),
];

/// Packs a segment descriptor from its flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Writes [`BOOT_GDT`] to guest memory.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn gdt_entries_match_the_pvh_flat_segments() {
        assert_eq!(BOOT_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x000f_8b00_0000_ffff);
    }

    #[test]
    fn initrd_goes_page_aligned_at_the_top_of_low_ram() {
        let m = mem();
        let mut cpio = b"070701".to_vec();
        cpio.resize(5000, 0);
        let f = temp_file(&cpio);
        let (addr, size) = load_initrd(&m, f.path(), 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.0 % PAGE_SIZE, 0);
        assert!(addr.0 + size <= 64 << 20);
        let mut back = [0u8; 6];
        m.read_slice(&mut back, addr).unwrap();
        assert_eq!(&back, b"070701");
    }

    #[test]
    fn compressed_or_empty_or_oversized_initrd_is_rejected() {
        let m = mem();
        let gz = temp_file(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert!(matches!(
            load_initrd(&m, gz.path(), 0x200_0000, 64 << 20),
            Err(BootError::InitrdFormat(_))
        ));
        let empty = temp_file(b"");
        assert!(matches!(
            load_initrd(&m, empty.path(), 0x200_0000, 64 << 20),
            Err(BootError::InitrdSize { .. })
        ));
        let mut big = b"070701".to_vec();
        big.resize(3 << 20, 0);
        let f = temp_file(&big);
        let err = load_initrd(&m, f.path(), (64 << 20) - (2 << 20), 64 << 20).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdSize { size, .. } if size == 3 << 20),
            "{err}"
        );
        assert!(matches!(
            load_initrd(&m, Path::new("/nonexistent/initrd"), 0, 64 << 20),
            Err(BootError::ReadInitrd { .. })
        ));
    }

    #[test]
    fn non_elf_kernel_is_rejected_with_its_path() {
        let m = mem();
        let f = temp_file(&[0u8; 4096]);
        let err = load_kernel(&m, f.path()).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }));
        assert!(err.to_string().contains(&f.path().display().to_string()));
        assert!(matches!(
            load_kernel(&m, Path::new("/nonexistent/vmlinux")),
            Err(BootError::OpenKernel { .. })
        ));
    }

    #[test]
    fn start_info_points_at_cmdline_memmap_and_module() {
        let m = mem();
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let e820 = layout::e820_map(64).unwrap();
        let boot = write_pvh_info(
            &m,
            GuestAddress(0x100_0000),
            &cmdline,
            &e820,
            (GuestAddress(0x300_0000), 42),
        )
        .unwrap();
        let si: hvm_start_info = m.read_obj(boot.start_info).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.memmap_entries as usize, e820.len());
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, layout::E820_RAM));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 42));
        let mut text = [0u8; 14];
        m.read_slice(&mut text, GuestAddress(si.cmdline_paddr))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }
}
