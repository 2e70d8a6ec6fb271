//! Replays every committed corpus file of every target: the seeds and
//! each past finding stay regression tests, run by plain `cargo test`.

use std::path::Path;

fn replay(target: &str) {
    let run = vmcri_fuzz::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .expect("a known target");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus", dir.display());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        eprintln!("{target}: {}", f.display());
        run(&data);
    }
}

#[test]
fn vsock_corpus() {
    replay("vsock");
}

#[test]
fn fs_corpus() {
    replay("fs");
}

#[test]
fn mmio_corpus() {
    replay("mmio");
}

#[test]
fn net_corpus() {
    replay("net");
}

#[test]
fn spdy_corpus() {
    replay("spdy");
}

#[test]
fn unpack_corpus() {
    replay("unpack");
}
