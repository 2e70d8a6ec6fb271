//! How a VM ended, and the process exit code that says so.

use std::fmt;

/// The guest rebooted or powered off (i8042 reset, `reboot=k`).
pub const EXIT_CLEAN: i32 = 0;
/// The VMM could not set the VM up: bad kernel, initramfs, sizes, KVM.
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Bad command-line usage (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// The guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 10;
/// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
pub const EXIT_TRIPLE_FAULT: i32 = 11;
/// KVM failed to run the guest (internal error, failed entry, bad exit).
pub const EXIT_KVM_ERROR: i32 = 12;
/// The host-side deadline passed before the guest ended.
pub const EXIT_TIMEOUT: i32 = 13;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Clean guest reboot or power-off.
    Reset,
    /// Guest kernel panic, reported on the panic port.
    GuestPanic,
    /// Triple fault.
    TripleFault,
    /// KVM could not run a vCPU.
    KvmError(String),
    /// The `--timeout` deadline passed.
    Timeout,
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::Reset => EXIT_CLEAN,
            ExitReason::GuestPanic => EXIT_GUEST_PANIC,
            ExitReason::TripleFault => EXIT_TRIPLE_FAULT,
            ExitReason::KvmError(_) => EXIT_KVM_ERROR,
            ExitReason::Timeout => EXIT_TIMEOUT,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "guest reset (clean shutdown)"),
            ExitReason::GuestPanic => write!(f, "guest kernel panic"),
            ExitReason::TripleFault => write!(f, "guest triple fault"),
            ExitReason::KvmError(e) => write!(f, "KVM error: {e}"),
            ExitReason::Timeout => write!(f, "host-side timeout"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_distinct_code() {
        let reasons = [
            ExitReason::Reset,
            ExitReason::GuestPanic,
            ExitReason::TripleFault,
            ExitReason::KvmError("x".into()),
            ExitReason::Timeout,
        ];
        let mut codes: Vec<i32> = reasons.iter().map(ExitReason::code).collect();
        codes.extend([EXIT_SETUP_ERROR, EXIT_USAGE]);
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert_eq!(ExitReason::Reset.code(), 0);
    }
}
