//! AFL++ entry point of the `spdy` target (see `vmcri_fuzz::spdy`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::spdy::run(data);
    });
}
