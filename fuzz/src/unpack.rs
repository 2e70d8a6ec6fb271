//! OCI layer unpacking ([`unpack_layer`]), checking that nothing lands
//! outside the layer directory.
//!
//! Layout of each run, in a fresh temporary directory `T`:
//!
//! ```text
//! T/outside/marker          what must stay out of reach
//! T/layers/sha256-layer     the destination (made by the unpack)
//! ```
//!
//! A layer's partial directory is `T/layers/.sha256-layer.partial`, so
//! `../../outside` from its top reaches `T/outside`.
//!
//! The input is either a raw stream (tar, or gzip or zstd of anything)
//! or a list of tar entries the harness writes as ustar headers (any
//! name, type, mode, owner, link target and content, GNU long names),
//! optionally gzipped.
//!
//! Checked besides panics: `T`, `T/outside` and the marker keep their
//! stamps (see [`crate::oracle`]); `T/layers` holds the layer after a
//! success and nothing after a failure; and no inode in the layer is one
//! of the watched ones (a hard link out).

use crate::input::Input;
use crate::oracle::Watch;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use vmcri_image::unpack::{unpack_layer, Compression, Limits};

const MAX_ENTRIES: usize = 32;

/// Entry names an input picks by index, the hostile ones included.
pub const NAMES: &[&[u8]] = &[
    b"a",
    b"a/b",
    b"a/b/c",
    b"dir/",
    b"link",
    b"link/x",
    b"../x",
    b"/abs",
    b"./",
    b".",
    b"..",
    b"a/../b",
    b".wh.a",
    b".wh..wh..opq",
    b"a/.wh.b",
    b"a/.wh..wh..opq",
    b"outside",
    b"//a//b",
];

/// Link targets an input picks by index.
pub const LINKS: &[&[u8]] = &[
    b"../../outside",
    b"../../outside/marker",
    b"..",
    b"/",
    b"a",
    b"a/b",
    b"link",
    b"dir",
    b".",
    b"",
];

/// Tar entry types an input picks by index.
pub const TYPES: &[u8] = b"0512346x7gLK";

/// Small bounds, so bombs are quick to refuse.
fn limits() -> Limits {
    Limits {
        max_layer_bytes: 1 << 20,
        max_layer_inodes: 256,
        max_image_bytes: 1 << 20,
        max_image_inodes: 256,
        min_free_bytes: 0,
        min_free_percent: 0,
        max_metadata_bytes: 64 << 10,
        max_path_len: 4096,
    }
}

/// One ustar header block for `name` (at most 100 bytes; longer names
/// need a GNU long-name entry first).
fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8], mode: u32, id: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, width: usize, bytes: &[u8]| {
        let n = bytes.len().min(width);
        h[at..at + n].copy_from_slice(&bytes[..n]);
    };
    put(&mut h, 0, 100, name);
    put(&mut h, 100, 8, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, 8, format!("{id:07o}\0").as_bytes());
    put(&mut h, 116, 8, format!("{id:07o}\0").as_bytes());
    put(&mut h, 124, 12, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, 12, b"00000000000\0");
    h[156] = typeflag;
    put(&mut h, 157, 100, link);
    put(&mut h, 257, 8, b"ustar\x0000");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    put(&mut h, 148, 8, format!("{sum:06o}\0 ").as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A tar archive of entries chosen by the input.
fn build_tar(input: &mut Input) -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = 0;
    while !input.is_empty() && n < MAX_ENTRIES {
        n += 1;
        let ctl = input.u8();
        let name = if ctl & 1 == 0 {
            input.pick(NAMES).unwrap_or(b"a").to_vec()
        } else {
            input.short_bytes().to_vec()
        };
        let typeflag = if ctl & 2 == 0 {
            input.pick(TYPES).unwrap_or(b'0')
        } else {
            input.u8()
        };
        let link = if ctl & 4 == 0 {
            input.pick(LINKS).unwrap_or(b"a").to_vec()
        } else {
            input.short_bytes().to_vec()
        };
        let mode = if ctl & 8 == 0 {
            input
                .pick(&[0o755, 0o644, 0o4755, 0o000, 0o1777])
                .unwrap_or(0o644)
        } else {
            u32::from(input.u16()) & 0o7777
        };
        let id = if ctl & 16 == 0 {
            0
        } else {
            u32::from(input.u16())
        };
        let data: Vec<u8> = if ctl & 32 == 0 {
            input.short_bytes().to_vec()
        } else {
            // Large content without a large input.
            vec![0x5a; usize::from(input.u16()) * 32]
        };
        if ctl & 64 != 0 || name.len() > 100 {
            // A GNU long name for the next entry.
            let mut long = name.clone();
            long.push(0);
            out.extend_from_slice(&header(
                b"././@LongLink",
                b'L',
                long.len() as u64,
                b"",
                0,
                0,
            ));
            out.extend_from_slice(&long);
            pad(&mut out);
        }
        let size = if ctl & 128 == 0 {
            data.len() as u64
        } else {
            u64::from(input.u32())
        };
        out.extend_from_slice(&header(&name, typeflag, size, &link, mode, id));
        out.extend_from_slice(&data);
        pad(&mut out);
    }
    if input.is_empty() {
        out.extend_from_slice(&[0u8; 1024]);
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip into memory");
    e.finish().expect("gzip into memory")
}

/// Every inode in `dir`, not following symlinks.
fn inodes_under(dir: &Path, out: &mut Vec<u64>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        out.push(m.ino());
        if m.is_dir() {
            inodes_under(&e.path(), out);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let t = tmp.path();
    let outside = t.join("outside");
    let marker = outside.join("marker");
    let layers = t.join("layers");
    let dest = layers.join("sha256-layer");
    fs::create_dir(&outside).expect("outside");
    fs::write(&marker, b"host secret").expect("marker");
    fs::create_dir(&layers).expect("layers");
    let watch = Watch::new(&[marker, outside, t.to_path_buf()]);

    let (blob, compression) = match mode % 6 {
        0 | 1 => (build_tar(&mut input), Compression::None),
        2 => (gzip(&build_tar(&mut input)), Compression::Gzip),
        3 => (input.rest().to_vec(), Compression::None),
        4 => (input.rest().to_vec(), Compression::Gzip),
        _ => (input.rest().to_vec(), Compression::Zstd),
    };
    let result = unpack_layer(&blob[..], compression, &dest, &limits());
    watch.check("unpacking a layer, outside its directory,");

    let mut left: Vec<String> = fs::read_dir(&layers)
        .expect("layers directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    match &result {
        Ok(_) => assert_eq!(left, ["sha256-layer"], "a finished layer, and only it"),
        Err(e) => assert!(left.is_empty(), "left behind {left:?} after: {e}"),
    }
    if result.is_ok() {
        let mut inside = Vec::new();
        inodes_under(&dest, &mut inside);
        for ino in watch.inodes() {
            assert!(
                !inside.contains(&ino),
                "the layer links inode {ino} from outside"
            );
        }
    }
    // The layer's modes may forbid removal by a non-root run: open them.
    make_removable(t);
}

/// Gives every directory under `dir` owner rwx so the temporary
/// directory can be removed whatever modes the layer set.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o700));
            make_removable(&p);
        }
    }
}
