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

/// A writer that passes at most `limit` bytes, then notes the truncation
/// once and drops the rest: a guest must not be able to fill the host's
/// disk through its console.
pub struct Bounded<W: Write> {
    inner: W,
    left: u64,
    truncated: bool,
}

impl<W: Write> Bounded<W> {
    /// Wraps `inner`, letting `limit` bytes through.
    pub fn new(inner: W, limit: u64) -> Self {
        Bounded {
            inner,
            left: limit,
            truncated: false,
        }
    }
}

impl<W: Write> Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            if !self.truncated {
                self.truncated = true;
                let _ = self.inner.write_all(
                    b"\n[vmcri-vmm: console output limit reached; the rest is dropped]\n",
                );
            }
            // Claim the bytes as written: the guest is not to stall.
            return Ok(buf.len());
        }
        let n = usize::try_from(self.left).map_or(buf.len(), |left| left.min(buf.len()));
        let written = self.inner.write(&buf[..n])?;
        self.left -= written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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
                // not stop the guest.
                guest_warn!(error = ?e, "serial console write failed");
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
    fn bounded_output_stops_at_its_limit_and_says_so_once() {
        let sink = Sink::default();
        let mut w = Bounded::new(sink.clone(), 4);
        w.write_all(b"abcdef").unwrap();
        w.write_all(b"ghi").unwrap();
        let out = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("abcd\n[vmcri-vmm: console output limit reached"),
            "{text}"
        );
        assert_eq!(text.matches("limit reached").count(), 1);
        assert!(!text.contains("ef") && !text.contains("ghi"));
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
