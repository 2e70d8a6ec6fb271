//! The VMM boots our guest kernel to a user-space init on this machine's
//! KVM, and its exit status says how the guest ended.

use std::path::Path;
use std::process::{Command, Output};
use vmcri_tests::{artifacts, write_initramfs, Scratch};

/// Printed by the test init (tests/guest-init) as soon as it runs.
const MARKER: &str = "VMCRI-GUEST-INIT-READY";
/// Host-side safety net: a guest boot takes ~35 s of emulated kernel time
/// here, so this only catches a hung guest.
const TIMEOUT_SECS: &str = "400";

fn boot(tag: &str, vcpus: u8, mode: &str) -> Output {
    let a = artifacts();
    let scratch = Scratch::new(tag).unwrap();
    let initrd = scratch.0.join("initrd.cpio");
    write_initramfs(&a.guest_init, &initrd).unwrap();
    Command::new(&a.vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "128", "--vcpus", &vcpus.to_string()])
        .args(["--cmdline", &format!("quiet vmcri_test={mode}")])
        .args(["--timeout", TIMEOUT_SECS])
        .output()
        .unwrap()
}

fn console(out: &Output) -> String {
    format!(
        "--- console ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn guest_reaches_init_and_its_reboot_ends_the_vm_cleanly() {
    let out = boot("reboot", 1, "reboot");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{MARKER} mode=reboot")),
        "{}",
        console(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", console(&out));
}

#[test]
fn guest_kernel_panic_gives_the_panic_exit_status() {
    let out = boot("panic", 1, "panic");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{MARKER} mode=panic")),
        "{}",
        console(&out)
    );
    assert!(text.contains("Kernel panic"), "{}", console(&out));
    assert_eq!(out.status.code(), Some(10), "{}", console(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest kernel panic"));
}

#[test]
fn two_vcpu_guest_reads_entropy_from_virtio_rng() {
    let out = boot("hwrng", 2, "hwrng");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hwrng: read 32 bytes"), "{}", console(&out));
    assert_eq!(out.status.code(), Some(0), "{}", console(&out));
}

fn vmm_fails(args: &[&str], expect_code: i32, expect_msg: &str) {
    let a = artifacts();
    let out = Command::new(&a.vmm).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(expect_code), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expect_msg),
        "{args:?}: expected {expect_msg:?} in {stderr}"
    );
}

#[test]
fn bad_inputs_fail_before_boot_with_a_clear_error() {
    let a = artifacts();
    let scratch = Scratch::new("badinput").unwrap();
    let initrd = scratch.0.join("ok.cpio");
    write_initramfs(&a.guest_init, &initrd).unwrap();
    let gz = scratch.0.join("initrd.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]).unwrap();
    let not_elf = scratch.0.join("bzImage");
    std::fs::write(&not_elf, vec![0u8; 8192]).unwrap();
    let kernel = a.kernel.to_str().unwrap();
    let initrd = initrd.to_str().unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();

    vmm_fails(
        &["--kernel", "/nonexistent/vmlinux", "--initrd", initrd],
        1,
        "cannot open kernel /nonexistent/vmlinux",
    );
    vmm_fails(
        &["--kernel", &p(&not_elf), "--initrd", initrd],
        1,
        "not a loadable x86-64 ELF vmlinux",
    );
    vmm_fails(
        &["--kernel", kernel, "--initrd", &p(&gz)],
        1,
        "not an uncompressed cpio",
    );
    vmm_fails(
        &["--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        1,
        "cannot read initramfs",
    );
    vmm_fails(
        &["--kernel", kernel, "--initrd", initrd, "--memory", "8"],
        1,
        "guest memory must be between",
    );
    vmm_fails(
        &["--kernel", kernel, "--initrd", initrd, "--vcpus", "0"],
        1,
        "1 to 32 vCPUs",
    );
    vmm_fails(
        &["--kernel", kernel, "--initrd", initrd, "--vcpus", "33"],
        1,
        "1 to 32 vCPUs",
    );
    let long = "x".repeat(3000);
    vmm_fails(
        &["--kernel", kernel, "--initrd", initrd, "--cmdline", &long],
        1,
        "kernel command line",
    );
    vmm_fails(&["--kernel", kernel], 2, "--initrd");
    vmm_fails(
        &["--kernel", kernel, "--initrd", initrd, "--memory", "lots"],
        2,
        "invalid value",
    );
}
