//! AFL++ entry point of the `mmio` target (see `vmcri_fuzz::mmio`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::mmio::run(data);
    });
}
