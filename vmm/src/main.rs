//! `vmcri-vmm`: boots one microVM and exits with a code that says how it ended.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use vmcri_vmm::exit::{EXIT_SETUP_ERROR, EXIT_USAGE};
use vmcri_vmm::{CpuProfile, SerialOutput, SharedFsConfig, Vm, VmConfig, VsockConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    /// Detect: `nested` when the host's KVM is kvm-pvm, else `host`.
    Auto,
    /// Pass KVM's supported features through.
    Host,
    /// Hide what software-nested KVM cannot emulate.
    Nested,
}

/// Boot a vmcri microVM.
///
/// Exit status: 0 the guest rebooted or powered off; 1 setup error; 2 bad
/// usage; 10 guest kernel panic; 11 triple fault; 12 KVM error; 13 timeout.
#[derive(Debug, Parser)]
#[command(name = "vmcri-vmm", version)]
struct Args {
    /// Uncompressed vmlinux with a PVH entry point.
    #[arg(long)]
    kernel: PathBuf,
    /// Uncompressed cpio (newc) initramfs.
    #[arg(long)]
    initrd: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Extra kernel command line, appended to the VMM's own options.
    #[arg(long)]
    cmdline: Option<String>,
    /// Serial console output: a file path (at most 16 MiB is kept), or `-`
    /// for stdout.
    #[arg(long, default_value = "-")]
    serial: String,
    /// CPUID profile.
    #[arg(long, value_enum, default_value_t = ProfileArg::Auto)]
    cpu_profile: ProfileArg,
    /// End the VM (exit 13) if it runs longer than this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Give the guest a vsock device whose host side is this Unix socket
    /// (`CONNECT <port>` to reach the guest; guest connections to host
    /// port P go to PATH_P).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Share this host directory with the guest over virtio-fs.
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts the shared directory by.
    #[arg(long, default_value = "vmcri")]
    shared_tag: String,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMCRI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        memory_mib: args.memory,
        vcpus: args.vcpus,
        cmdline_extra: args.cmdline,
        serial: match args.serial.as_str() {
            "-" => SerialOutput::Stdout,
            path => SerialOutput::File(path.into()),
        },
        cpu_profile: match args.cpu_profile {
            ProfileArg::Auto => CpuProfile::detect(),
            ProfileArg::Host => CpuProfile::Host,
            ProfileArg::Nested => CpuProfile::NestedSoftware,
        },
        timeout: args.timeout.map(Duration::from_secs),
        vsock: args.vsock.map(|uds_path| VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path,
        }),
        shared_fs: args.shared_dir.map(|dir| SharedFsConfig {
            tag: args.shared_tag,
            dir,
        }),
    };
    let result = Vm::build(&config).and_then(Vm::run);
    match result {
        Ok(reason) => {
            if reason.code() != 0 {
                eprintln!("vmcri-vmm: {reason}");
            }
            std::process::exit(reason.code());
        }
        Err(e) => {
            eprintln!("vmcri-vmm: {e}");
            std::process::exit(EXIT_SETUP_ERROR);
        }
    }
}
