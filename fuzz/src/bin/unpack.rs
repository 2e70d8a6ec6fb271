//! AFL++ entry point of the `unpack` target (see `vmcri_fuzz::unpack`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::unpack::run(data);
    });
}
