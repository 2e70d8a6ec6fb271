//! The 16550 UART console (vm-superio), output to stdout or a file.

use super::bus::BusDevice;
use super::{IrqLine, VmRequest};
use std::io::{self, Write};
use std::sync::Arc;
use vm_superio::{Serial, Trigger};

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Registers of a 16550.
pub const UART_PORT_RANGE: u64 = 8;

/// Adapts an [`IrqLine`] to vm-superio's interrupt trait.
pub struct SerialIrq(pub Arc<IrqLine>);

impl Trigger for SerialIrq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The console UART. vm-superio flushes its writer after every byte, so
/// whoever follows the output sees it as the guest writes it.
pub struct Console {
    uart: Serial<SerialIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Console {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: Arc<IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Console {
            uart: Serial::new(SerialIrq(irq), out),
        }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Console {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *b) {
                // A console that cannot write (disk full, closed pipe) must
                // not stop the guest; say so once per failing write.
                tracing::warn!(error = ?e, "serial console write failed");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_at_once() {
        let sink = Sink::default();
        let irq = Arc::new(IrqLine::new(COM1_IRQ).unwrap());
        let mut console = Console::new(irq, Box::new(sink.clone()));
        for b in b"hello" {
            console.write(0, &[*b]);
        }
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"hello",
            "no partial line held back"
        );
        console.write(0, b"\n");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let irq = Arc::new(IrqLine::new(COM1_IRQ).unwrap());
        let mut console = Console::new(irq, Box::new(io::sink()));
        let mut lsr = [0];
        console.read(5, &mut lsr);
        assert_ne!(
            lsr[0] & 0x20,
            0,
            "THR empty, or the guest driver would spin"
        );
    }
}
