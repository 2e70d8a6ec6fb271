//! Address-range dispatch of port I/O and MMIO exits to devices.

use super::VmRequest;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A device on a bus, addressed by offset from its base.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`; may ask something of the VM.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors in assembling a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping ranges, each owned by a device.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        let offset = addr - r.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= r.len).then_some((r, offset))
    }

    /// Dispatches a read; returns false (leaving `data` alone) if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, offset)) => {
                lock(&r.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `None` if nothing is there or the device asks nothing.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<VmRequest> {
        let (r, offset) = self.find(addr, data.len())?;
        let request = lock(&r.device).write(offset, data);
        request
    }
}

/// Locks a device. A device whose lock was poisoned by a panicking vCPU
/// thread is still usable: its state is plain registers, and the VM is
/// being torn down anyway.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last: Vec<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.fill.wrapping_add(offset.to_le_bytes()[0]));
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            self.last.push((offset, data.to_vec()));
            (data == [0xfe]).then_some(VmRequest::Reset)
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last: vec![], fill }))
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new();
        let a = recorder(0x10);
        let b = recorder(0x20);
        bus.insert(a.clone(), 0x60, 1).unwrap();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [0x25]);
        assert_eq!(bus.write(0x60, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(a.lock().unwrap().last, vec![(0, vec![0xfe])]);
        assert_eq!(bus.write(0x3f9, &[1]), None);
        assert_eq!(b.lock().unwrap().last, vec![(1, vec![1])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(recorder(0), 0x1000, 0x100).unwrap();
        let mut d = [0xaa; 4];
        assert!(!bus.read(0xfff, &mut d));
        assert!(
            !bus.read(0x10fe, &mut d),
            "access crossing the end of the range"
        );
        assert!(!bus.read(0x1100, &mut d));
        assert_eq!(d, [0xaa; 4]);
        assert!(bus.read(0x10fc, &mut d));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(recorder(0), 0x1000, 0x100).unwrap();
        assert!(bus.insert(recorder(0), 0x10ff, 1).is_err());
        assert!(bus.insert(recorder(0), 0xf00, 0x101).is_err());
        assert_eq!(
            bus.insert(recorder(0), 0x2000, 0),
            Err(BusError::Empty(0x2000))
        );
        assert!(bus.insert(recorder(0), u64::MAX, 2).is_err());
        bus.insert(recorder(0), 0x1100, 1).unwrap();
    }
}
