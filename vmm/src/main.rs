//! `vmcri-vmm`: boots one microVM and exits with a code that says how it ended.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmcri_vmm::devices::net::{NetSpec, Tap, TapError};
use vmcri_vmm::exit::{EXIT_SETUP_ERROR, EXIT_USAGE};
use vmcri_vmm::jail::{self, JailSpec};
use vmcri_vmm::seccomp;
use vmcri_vmm::{CpuProfile, NetConfig, SerialOutput, SharedFsConfig, Vm, VmConfig, VsockConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SeccompArg {
    /// A syscall outside a thread's allowlist kills the VMM.
    Enforce,
    /// Log what would be refused (kernel audit log); for debugging.
    Log,
    /// No filters; for debugging.
    Off,
}

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
    /// Give the guest a virtio-net card over a tap the caller opened
    /// (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, in the pod's network namespace)
    /// and left open, not close-on-exec, as fd N: `fd=N,mac=MAC[,mtu=M]`.
    #[arg(long, value_name = "fd=N,mac=MAC[,mtu=M]")]
    net: Option<NetSpec>,
    /// Run jailed, with this empty directory as the root: own mount, PID,
    /// IPC and UTS namespaces, only the VM's files, no new privileges,
    /// reduced capabilities (see the jail module). Needs root.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// Per-thread seccomp filters.
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    seccomp: SeccompArg,
    /// Most files the jailed VMM may hold open (virtio-fs keeps one per
    /// inode the guest has looked up).
    #[arg(long, default_value_t = 65536)]
    max_open_files: u64,
    /// Largest file, in MiB, the jailed VMM may write for the guest.
    #[arg(long, default_value_t = 64 << 10)]
    max_file_size_mib: u64,
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
    if let Ok(spec) = std::env::var("VMCRI_VMM_SECCOMP_DENY") {
        if let Err(e) = seccomp::deny_also(&spec) {
            eprintln!("vmcri-vmm: VMCRI_VMM_SECCOMP_DENY: {e}");
            std::process::exit(EXIT_USAGE);
        }
    }
    seccomp::set_mode(match args.seccomp {
        SeccompArg::Enforce => seccomp::Mode::Enforce,
        SeccompArg::Log => seccomp::Mode::Log,
        SeccompArg::Off => seccomp::Mode::Off,
    });
    // Detected before the jail, which has no /sys.
    let cpu_profile = match args.cpu_profile {
        ProfileArg::Auto => CpuProfile::detect(),
        ProfileArg::Host => CpuProfile::Host,
        ProfileArg::Nested => CpuProfile::NestedSoftware,
    };
    // Taken before the jail: checking the fd needs nothing of the host,
    // and the tap keeps working from the jail's empty network namespace.
    let net = match args.net.map(take_tap).transpose() {
        Ok(net) => net,
        Err((e, code)) => {
            eprintln!("vmcri-vmm: --net: {e}");
            std::process::exit(code);
        }
    };
    let mut args = args;
    if let Some(dir) = args.jail.take() {
        let serial = (args.serial != "-").then(|| PathBuf::from(&args.serial));
        let spec = JailSpec {
            dir,
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            serial,
            vsock: args.vsock.clone(),
            share: args.shared_dir.clone(),
            max_open_files: args.max_open_files,
            max_file_size: args.max_file_size_mib.saturating_mul(1 << 20),
        };
        // Only the jailed child returns; the keeper exits with its status.
        match jail::enter(&spec) {
            Ok(jailed) => {
                args.kernel = jailed.kernel;
                args.initrd = jailed.initrd;
                if let Some(serial) = jailed.serial {
                    args.serial = serial.display().to_string();
                }
                args.vsock = jailed.vsock;
                args.shared_dir = jailed.share;
            }
            Err(e) => {
                eprintln!("vmcri-vmm: {e}");
                std::process::exit(EXIT_SETUP_ERROR);
            }
        }
    }
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
        cpu_profile,
        timeout: args.timeout.map(Duration::from_secs),
        vsock: args.vsock.map(|uds_path| VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path,
        }),
        shared_fs: args.shared_dir.map(|dir| SharedFsConfig {
            tag: args.shared_tag,
            dir,
        }),
        net,
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

/// Takes over the tap `--net` names; a wrong fd is a usage error, a tap
/// that refuses setup a setup error.
fn take_tap(spec: NetSpec) -> Result<NetConfig, (TapError, i32)> {
    match Tap::from_inherited_fd(spec.fd) {
        Ok(tap) => Ok(NetConfig {
            tap: Arc::new(tap),
            mac: spec.mac,
            mtu: spec.mtu,
        }),
        Err(e @ TapError::Setup { .. }) => Err((e, EXIT_SETUP_ERROR)),
        Err(e) => Err((e, EXIT_USAGE)),
    }
}
