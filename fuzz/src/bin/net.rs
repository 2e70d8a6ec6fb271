//! AFL++ entry point of the `net` target (see `vmcri_fuzz::net`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        vmcri_fuzz::net::run(data);
    });
}
