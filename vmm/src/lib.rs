//! vmcri's virtual machine monitor: a KVM microVM booted straight into a
//! PVH vmlinux with an uncompressed initramfs, a serial console, the
//! i8042 reset line and virtio-mmio devices. One process runs one VM.

pub mod boot;
pub mod cmdline;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod layout;
pub mod mptable;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use cpuid::CpuProfile;
pub use exit::ExitReason;
pub use vm::{NetConfig, SerialOutput, SharedFsConfig, Vm, VmConfig, VsockConfig};
