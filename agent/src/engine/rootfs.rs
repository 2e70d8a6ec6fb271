//! Container root filesystems: an overlay of the image's read-only layers
//! with a private writable layer, so containers sharing layers never see
//! each other's writes.

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The kernel reads mount options from one page.
const MAX_OPTIONS: usize = 4095;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// The overlay option string for `layers` (lowest first).
pub fn overlay_options(layers: &[PathBuf], upper: &Path, work: &Path) -> io::Result<String> {
    if layers.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a container needs at least one image layer",
        ));
    }
    let mut lower = Vec::with_capacity(layers.len());
    // Overlayfs lists the top layer first.
    for l in layers.iter().rev() {
        let s = l.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "layer path is not UTF-8")
        })?;
        // ':' separates layers and ',' options; neither may appear in one.
        if !l.is_absolute() || s.contains([':', ',']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid layer path {s:?}"),
            ));
        }
        if !l.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("layer {s} is not a directory"),
            ));
        }
        lower.push(s);
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() > MAX_OPTIONS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} layers make overlay options of {} bytes, over the kernel's {MAX_OPTIONS}",
                layers.len(),
                options.len()
            ),
        ));
    }
    Ok(options)
}

/// Mounts the overlay of `layers` (lowest first) on `target`, with its
/// writable layer in `scratch/upper` and `scratch/work`.
pub fn mount(layers: &[PathBuf], scratch: &Path, target: &Path) -> io::Result<()> {
    let upper = scratch.join("upper");
    let work = scratch.join("work");
    for d in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(d)?;
    }
    let options = CString::new(overlay_options(layers, &upper, &work)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in layer path"))?;
    let t = cpath(target)?;
    rustix::mount::mount(
        c"overlay",
        t,
        c"overlay",
        MountFlags::empty(),
        options.as_c_str(),
    )
    .map_err(|errno| {
        let e = io::Error::from(errno);
        io::Error::new(
            e.kind(),
            format!("mount overlay on {}: {e}", target.display()),
        )
    })
}

/// Detaches whatever is mounted on `target`; nothing mounted is fine.
pub fn unmount(target: &Path) -> io::Result<()> {
    let t = cpath(target)?;
    match rustix::mount::unmount(t, UnmountFlags::DETACH) {
        Ok(()) | Err(Errno::INVAL | Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_top_layer_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let o = overlay_options(&[a.clone(), b.clone()], Path::new("/u"), Path::new("/w")).unwrap();
        assert_eq!(
            o,
            format!(
                "lowerdir={}:{},upperdir=/u,workdir=/w",
                b.display(),
                a.display()
            )
        );
    }

    #[test]
    fn refuses_separators_missing_layers_and_no_layers() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("a:b");
        std::fs::create_dir(&bad).unwrap();
        let up = Path::new("/u");
        assert!(overlay_options(&[bad], up, up).is_err());
        assert!(overlay_options(&[dir.path().join("missing")], up, up).is_err());
        assert!(overlay_options(&[PathBuf::from("relative")], up, up).is_err());
        assert!(overlay_options(&[], up, up).is_err());
    }

    #[test]
    fn refuses_options_longer_than_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<PathBuf> = (0..200)
            .map(|i| {
                let p = dir.path().join(format!("{i:0>40}"));
                std::fs::create_dir(&p).unwrap();
                p
            })
            .collect();
        let e = overlay_options(&layers, Path::new("/u"), Path::new("/w")).unwrap_err();
        assert!(e.to_string().contains("over the kernel"), "{e}");
    }
}
