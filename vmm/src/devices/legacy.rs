//! The few legacy PC ports a microVM guest touches: the i8042 reset line
//! and the panic notification port.

use super::bus::BusDevice;
use super::VmRequest;

/// i8042 data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// i8042 command/status port (the data port + 4); the range covers both.
pub const I8042_PORT_RANGE: u64 = 5;
/// The I/O port our guest kernel writes to on panic (`vmcri_panic_port=`),
/// the pvpanic ISA convention.
pub const PANIC_PORT: u64 = 0x505;
/// i8042 command "pulse output line 0": the CPU reset used by `reboot=k`.
const I8042_CMD_RESET: u8 = 0xfe;
/// Offset of the command register from the data port.
const I8042_COMMAND_OFFSET: u64 = 4;
/// pvpanic event bit: guest panicked.
const PVPANIC_PANICKED: u8 = 1;

/// Just enough of an i8042 for `reboot=k`: status reads say "input buffer
/// empty" so the kernel's wait loop ends, and the reset command ends the VM.
#[derive(Debug, Default)]
pub struct I8042Reset;

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        (offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET))
            .then_some(VmRequest::Reset)
    }
}

/// The pvpanic-style port: a write with the "panicked" bit is a guest panic.
#[derive(Debug, Default)]
pub struct PanicPort;

impl BusDevice for PanicPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Advertise the one event we understand, as pvpanic does.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
        data.first()
            .filter(|b| *b & PVPANIC_PANICKED != 0)
            .map(|_| VmRequest::Panic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let mut k = I8042Reset;
        assert_eq!(k.write(4, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(k.write(4, &[0xd1]), None);
        assert_eq!(k.write(0, &[0xfe]), None, "0xfe on the data port is data");
        let mut status = [0xff];
        k.read(4, &mut status);
        assert_eq!(status, [0], "input buffer must read as empty");
    }

    #[test]
    fn panic_port_reports_panics_only() {
        let mut p = PanicPort;
        assert_eq!(p.write(0, &[1]), Some(VmRequest::Panic));
        assert_eq!(p.write(0, &[2]), None, "crash-loaded event is not a panic");
        assert_eq!(p.write(0, &[]), None);
    }
}
