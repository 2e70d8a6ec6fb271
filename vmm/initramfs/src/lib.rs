//! Builds uncompressed cpio (newc) archives: the initramfs format Linux
//! unpacks fastest, which matters when the guest kernel is emulated.
//!
//! The newc format is fixed-width ASCII headers; writing it by hand is a
//! hundred lines, while the cpio crates on crates.io are unmaintained or
//! read-only.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Component, Path};
use thiserror::Error;

/// Errors in building an archive.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// An archive path that is absolute, empty, or climbs with `..`.
    #[error("invalid archive path {0:?}: paths are relative, without '..' or empty parts")]
    BadPath(String),
    /// Two entries with the same path.
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    /// A file too large for the newc format's 32-bit size.
    #[error("{0:?} is larger than 4 GiB, which cpio newc cannot hold")]
    TooLarge(String),
    /// More entries than the newc format's 32-bit inode numbers can count.
    #[error("{0} entries are more than cpio newc can number")]
    TooManyEntries(usize),
    /// Reading a host file or writing the archive failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        source: io::Error,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug)]
struct Entry {
    path: String,
    mode: u32,
    data: Vec<u8>,
    rdev: (u32, u32),
}

/// An archive being assembled in memory. Parent directories are added
/// automatically (mode 0755) before their children.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
    paths: BTreeSet<String>,
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let bad = || InitramfsError::BadPath(path.to_string());
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(bad)?),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(
        &mut self,
        path: &str,
        mode: u32,
        data: Vec<u8>,
        rdev: (u32, u32),
    ) -> Result<(), InitramfsError> {
        let path = normalize(path)?;
        // Create missing parents first, so the kernel can unpack in order.
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if self.paths.insert(parent.clone()) {
                self.entries.push(Entry {
                    path: parent.clone(),
                    mode: S_IFDIR | 0o755,
                    data: Vec::new(),
                    rdev: (0, 0),
                });
            }
        }
        if !self.paths.insert(path.clone()) {
            // An explicit directory may repeat an implicit parent.
            if mode & 0o170000 == S_IFDIR {
                if let Some(e) = self
                    .entries
                    .iter_mut()
                    .find(|e| e.path == path && e.mode & 0o170000 == S_IFDIR)
                {
                    e.mode = mode;
                    return Ok(());
                }
            }
            return Err(InitramfsError::Duplicate(path));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge(path));
        }
        self.entries.push(Entry {
            path,
            mode,
            data,
            rdev,
        });
        Ok(())
    }

    /// Adds a directory with permission bits `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self, InitramfsError> {
        self.add(path, S_IFDIR | (perm & 0o7777), Vec::new(), (0, 0))?;
        Ok(self)
    }

    /// Adds a regular file with `data` and permission bits `perm`.
    pub fn file(
        &mut self,
        path: &str,
        data: Vec<u8>,
        perm: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.add(path, S_IFREG | (perm & 0o7777), data, (0, 0))?;
        Ok(self)
    }

    /// Adds the host file `src` at `path`, keeping its permission bits.
    pub fn host_file(&mut self, path: &str, src: &Path) -> Result<&mut Self, InitramfsError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |what: &str| {
            let what = format!("{what} {}", src.display());
            move |source| InitramfsError::Io { what, source }
        };
        let meta = std::fs::metadata(src).map_err(io("stat"))?;
        let data = std::fs::read(src).map_err(io("read"))?;
        self.file(path, data, meta.permissions().mode())
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.add(path, S_IFLNK | 0o777, target.as_bytes().to_vec(), (0, 0))?;
        Ok(self)
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.add(path, S_IFCHR | (perm & 0o7777), Vec::new(), (major, minor))?;
        Ok(self)
    }

    /// The standard skeleton: `/dev/console` for init's stdio, and the
    /// mount points init fills.
    pub fn with_skeleton(&mut self) -> Result<&mut Self, InitramfsError> {
        self.char_device("dev/console", 0o600, 5, 1)?;
        for d in ["proc", "sys", "run", "tmp"] {
            self.dir(d, 0o755)?;
        }
        Ok(self)
    }

    /// Writes the archive, ending with the trailer. Timestamps are zero and
    /// inode numbers sequential, so equal inputs give identical bytes.
    pub fn write_to<W: Write>(&self, mut out: W) -> Result<(), InitramfsError> {
        let io = |source| InitramfsError::Io {
            what: "write archive".into(),
            source,
        };
        for (i, e) in self.entries.iter().enumerate() {
            let nlink = if e.mode & 0o170000 == S_IFDIR { 2 } else { 1 };
            let ino = u32::try_from(i + 1)
                .map_err(|_| InitramfsError::TooManyEntries(self.entries.len()))?;
            write_entry(&mut out, ino, e.mode, nlink, &e.path, &e.data, e.rdev).map_err(io)?;
        }
        write_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0)).map_err(io)?;
        out.flush().map_err(io)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn pad4<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

fn write_entry<W: Write>(
    out: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) -> io::Result<()> {
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        namesize = name.len() + 1,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, header.len() + name.len() + 1)?;
    out.write_all(data)?;
    pad4(out, data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, rdev) of one parsed entry.
    type Parsed = (String, u32, Vec<u8>, (u32, u32));

    /// Parses a newc archive back into its entries.
    fn parse(mut b: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        loop {
            assert_eq!(&b[..6], b"070701");
            let h = &b[..110];
            let (mode, size, rmaj, rmin, namesize) = (
                field(h, 1),
                field(h, 6) as usize,
                field(h, 9),
                field(h, 10),
                field(h, 11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = b[data_start..data_start + size].to_vec();
            b = &b[(data_start + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, (rmaj, rmin)));
        }
    }

    #[test]
    fn round_trips_files_dirs_links_and_devices_with_parents_first() {
        let mut a = Initramfs::new();
        a.with_skeleton().unwrap();
        a.file("init", b"#!ELF".to_vec(), 0o755).unwrap();
        a.file("etc/deep/conf", b"x=1\n".to_vec(), 0o644).unwrap();
        a.symlink("bin/sh", "/init").unwrap();
        let entries = parse(&a.to_bytes().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "proc",
                "sys",
                "run",
                "tmp",
                "init",
                "etc",
                "etc/deep",
                "etc/deep/conf",
                "bin",
                "bin/sh"
            ]
        );
        let console = &entries[1];
        assert_eq!((console.1, console.3), (S_IFCHR | 0o600, (5, 1)));
        let init = &entries[6];
        assert_eq!(
            (init.1, init.2.as_slice()),
            (S_IFREG | 0o755, &b"#!ELF"[..])
        );
        assert_eq!(entries[11].2, b"/init");
    }

    #[test]
    fn output_is_deterministic_and_aligned() {
        let build = || {
            let mut a = Initramfs::new();
            a.file("a", vec![1; 5], 0o644).unwrap();
            a.file("bb", vec![2; 3], 0o644).unwrap();
            a.to_bytes().unwrap()
        };
        let (x, y) = (build(), build());
        assert_eq!(x, y);
        assert_eq!(x.len() % 4, 0);
    }

    #[test]
    fn escaping_or_duplicate_paths_are_rejected() {
        let mut a = Initramfs::new();
        for bad in ["/init", "../x", "a/../../x", "", "."] {
            assert!(
                matches!(a.file(bad, vec![], 0o644), Err(InitramfsError::BadPath(_))),
                "{bad:?}"
            );
        }
        a.file("x", vec![], 0o644).unwrap();
        assert!(matches!(
            a.file("./x", vec![], 0o644),
            Err(InitramfsError::Duplicate(_))
        ));
        // An explicit directory over an implicit parent just sets its mode.
        a.file("d/f", vec![], 0o644).unwrap();
        a.dir("d", 0o700).unwrap();
        let entries = parse(&a.to_bytes().unwrap());
        assert_eq!(
            entries.iter().find(|e| e.0 == "d").unwrap().1,
            S_IFDIR | 0o700
        );
    }

    #[test]
    fn missing_host_file_names_the_path() {
        let err = Initramfs::new()
            .host_file("init", Path::new("/nonexistent/init"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/init"), "{err}");
    }
}
