//! AFL++ entry point of the `vsock` target (see `vmcri_fuzz::vsock`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::vsock::run(data);
    });
}
