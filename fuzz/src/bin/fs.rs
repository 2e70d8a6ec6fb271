//! AFL++ entry point of the `fs` target (see `vmcri_fuzz::fs`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::fs::run(data);
    });
}
