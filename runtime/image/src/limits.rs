//! Bounds on what a pull may take: the documents it reads whole
//! (manifests, image indexes, configs), the bytes and inodes of each
//! unpacked layer and of each image, and the free space it must leave on
//! the store's filesystem. Every bound that trips is an [`Exhausted`], so
//! callers tell "too big" from "broken" by variant, never by message.

use std::io;
use std::path::Path;
use thiserror::Error;

/// The largest manifest, image index or image config read. They are JSON
/// read whole into memory to be parsed, and real ones are a few KiB; this
/// is containerd's bound too.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// Bounds on a pull and on the layers it unpacks; the daemon's `[images]`
/// configuration is this struct (the tar format bounds are fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Bytes one layer may unpack to: its uncompressed tar stream, and
    /// separately the file content it writes (sparse entries expand).
    pub max_layer_bytes: u64,
    /// Entries one layer may create: files, directories (implied parents
    /// too), links, whiteouts; an upper bound on its inodes.
    pub max_layer_inodes: u64,
    /// Bytes all the layers of one image may unpack to, shared ones too.
    pub max_image_bytes: u64,
    /// Entries all the layers of one image may create, shared ones too.
    pub max_image_inodes: u64,
    /// Bytes a pull must leave free on the store's filesystem.
    pub min_free_bytes: u64,
    /// Percent of the store's filesystem (blocks, and inodes where it
    /// counts them) a pull must leave free; the higher floor applies.
    pub min_free_percent: u8,
    /// Size of one PAX header or GNU long name/link.
    #[serde(skip, default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: u64,
    /// Length of one path.
    #[serde(skip, default = "default_max_path_len")]
    pub max_path_len: usize,
}

fn default_max_metadata_bytes() -> u64 {
    Limits::default().max_metadata_bytes
}

fn default_max_path_len() -> usize {
    Limits::default().max_path_len
}

impl Default for Limits {
    /// Room for the largest real images (CUDA and ML images unpack to a
    /// few tens of GiB, in layers of a few GiB) and little beyond.
    fn default() -> Self {
        Limits {
            max_layer_bytes: 16 << 30,
            max_layer_inodes: 1 << 20,
            max_image_bytes: 64 << 30,
            max_image_inodes: 4 << 20,
            min_free_bytes: 1 << 30,
            min_free_percent: 0,
            max_metadata_bytes: 1 << 20,
            max_path_len: 4096,
        }
    }
}

/// A bound a pull ran into.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Exhausted {
    /// The registry sent more than the blob's descriptor announced.
    #[error("blob {digest} is longer than the {size} bytes its descriptor gives")]
    BlobTooLong {
        /// The blob.
        digest: String,
        /// Its announced size.
        size: u64,
    },
    /// A manifest, index or config larger than [`MAX_DOCUMENT_BYTES`].
    #[error("the {what} is larger than {limit} bytes")]
    DocumentTooLarge {
        /// Which document.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// A layer past `max_layer_bytes`.
    #[error("a layer unpacks to more than {limit} bytes ([images] max_layer_bytes)")]
    LayerBytes {
        /// The bound.
        limit: u64,
    },
    /// A layer past `max_layer_inodes`.
    #[error("a layer has more than {limit} entries ([images] max_layer_inodes)")]
    LayerInodes {
        /// The bound.
        limit: u64,
    },
    /// An image past `max_image_bytes`.
    #[error("the image unpacks to more than {limit} bytes ([images] max_image_bytes)")]
    ImageBytes {
        /// The bound.
        limit: u64,
    },
    /// An image past `max_image_inodes`.
    #[error("the image has more than {limit} entries ([images] max_image_inodes)")]
    ImageInodes {
        /// The bound.
        limit: u64,
    },
    /// The store's filesystem would drop below its free-space floor.
    #[error("the pull would leave less than {floor} bytes free on {path} ([images] min_free_bytes, min_free_percent)")]
    FreeSpace {
        /// The store.
        path: String,
        /// The floor, in bytes.
        floor: u64,
    },
    /// The store's filesystem would drop below its free-inode floor.
    #[error(
        "the pull would leave less than {floor} free inodes on {path} ([images] min_free_percent)"
    )]
    FreeInodes {
        /// The store.
        path: String,
        /// The floor, in inodes.
        floor: u64,
    },
}

/// What a layer or an image takes once unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries (an upper bound on inodes).
    pub inodes: u64,
}

impl Usage {
    /// Both figures added, saturating.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            bytes: self.bytes.saturating_add(other.bytes),
            inodes: self.inodes.saturating_add(other.inodes),
        }
    }
}

impl Limits {
    /// Fails when `used`, all the layers of an image, is over the image's
    /// budget (a layer already unpacked for another image counts too).
    pub fn check_image(&self, used: Usage) -> Result<(), Exhausted> {
        if used.bytes > self.max_image_bytes {
            return Err(Exhausted::ImageBytes {
                limit: self.max_image_bytes,
            });
        }
        if used.inodes > self.max_image_inodes {
            return Err(Exhausted::ImageInodes {
                limit: self.max_image_inodes,
            });
        }
        Ok(())
    }
}

/// What the store's filesystem can still take above its floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// Bytes above the floor.
    pub bytes: u64,
    /// Inodes above the floor; `None` where the filesystem does not count
    /// inodes (btrfs reports none).
    pub inodes: Option<u64>,
    path: String,
    floor_bytes: u64,
    floor_inodes: u64,
}

impl Room {
    /// The room on the filesystem holding `path` (statvfs), above the
    /// floor `limits` set.
    // statvfs field widths vary by target; u64::from is a no-op here.
    #[allow(clippy::useless_conversion)]
    pub fn of(path: &Path, limits: &Limits) -> io::Result<Room> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: all-zero bytes are a valid statvfs.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a statvfs to fill.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = u64::from(s.f_frsize);
        let percent = |total: u64| total / 100 * u64::from(limits.min_free_percent.min(100));
        let total_bytes = u64::from(s.f_blocks).saturating_mul(frsize);
        let floor_bytes = limits.min_free_bytes.max(percent(total_bytes));
        let floor_inodes = percent(u64::from(s.f_files));
        let counts_inodes = s.f_files != 0;
        Ok(Room {
            bytes: u64::from(s.f_bavail)
                .saturating_mul(frsize)
                .saturating_sub(floor_bytes),
            inodes: counts_inodes.then(|| u64::from(s.f_favail).saturating_sub(floor_inodes)),
            path: path.display().to_string(),
            floor_bytes,
            floor_inodes,
        })
    }

    /// Fails unless `bytes` more fit above the floor.
    pub fn fits(&self, bytes: u64) -> Result<(), Exhausted> {
        if bytes > self.bytes {
            return Err(self.no_space());
        }
        Ok(())
    }

    fn no_space(&self) -> Exhausted {
        Exhausted::FreeSpace {
            path: self.path.clone(),
            floor: self.floor_bytes,
        }
    }

    fn no_inodes(&self) -> Exhausted {
        Exhausted::FreeInodes {
            path: self.path.clone(),
            floor: self.floor_inodes,
        }
    }
}

/// One figure of a layer's budget: how much is left, and the bound to
/// report when it runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    left: u64,
    exhausted: Exhausted,
}

impl Cap {
    fn new(left: u64, exhausted: Exhausted) -> Cap {
        Cap { left, exhausted }
    }

    /// This cap, or `left` with its own bound if that is tighter.
    fn tighter(self, left: u64, exhausted: Exhausted) -> Cap {
        if left < self.left {
            Cap { left, exhausted }
        } else {
            self
        }
    }

    /// How much may still be used.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The bound this cap reports.
    pub fn exhausted(&self) -> &Exhausted {
        &self.exhausted
    }

    /// Fails when `used` is more than is left.
    pub fn check(&self, used: u64) -> Result<(), Exhausted> {
        if used > self.left {
            return Err(self.exhausted.clone());
        }
        Ok(())
    }
}

/// What one layer may still take: the tightest of its own budget, what
/// is left of its image's, and the room above the floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of file content (and of the uncompressed stream).
    pub bytes: Cap,
    /// Entries.
    pub inodes: Cap,
}

impl Budget {
    /// The layer's own budget.
    pub fn for_layer(limits: &Limits) -> Budget {
        Budget {
            bytes: Cap::new(
                limits.max_layer_bytes,
                Exhausted::LayerBytes {
                    limit: limits.max_layer_bytes,
                },
            ),
            inodes: Cap::new(
                limits.max_layer_inodes,
                Exhausted::LayerInodes {
                    limit: limits.max_layer_inodes,
                },
            ),
        }
    }

    /// Also within what the image's lower layers (`used`) left of its
    /// budget.
    pub fn within_image(self, limits: &Limits, used: Usage) -> Budget {
        Budget {
            bytes: self.bytes.tighter(
                limits.max_image_bytes.saturating_sub(used.bytes),
                Exhausted::ImageBytes {
                    limit: limits.max_image_bytes,
                },
            ),
            inodes: self.inodes.tighter(
                limits.max_image_inodes.saturating_sub(used.inodes),
                Exhausted::ImageInodes {
                    limit: limits.max_image_inodes,
                },
            ),
        }
    }

    /// Also within the room above the store's floor.
    pub fn within_room(self, room: &Room) -> Budget {
        let inodes = match room.inodes {
            Some(n) => self.inodes.tighter(n, room.no_inodes()),
            None => self.inodes,
        };
        Budget {
            bytes: self.bytes.tighter(room.bytes, room.no_space()),
            inodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_layer_bytes: 100,
            max_layer_inodes: 10,
            max_image_bytes: 150,
            max_image_inodes: 30,
            ..Limits::default()
        }
    }

    #[test]
    fn the_tightest_bound_is_the_one_reported() {
        let l = limits();
        let b = Budget::for_layer(&l);
        assert_eq!(b.bytes.left(), 100);
        assert_eq!(
            b.bytes.check(101),
            Err(Exhausted::LayerBytes { limit: 100 })
        );
        let b = b.within_image(
            &l,
            Usage {
                bytes: 120,
                inodes: 5,
            },
        );
        assert_eq!(b.bytes.left(), 30);
        assert_eq!(b.bytes.check(31), Err(Exhausted::ImageBytes { limit: 150 }));
        assert_eq!(b.inodes.left(), 10, "the layer's own bound is tighter");
        let room = Room {
            bytes: 7,
            inodes: None,
            path: "/s".into(),
            floor_bytes: 9,
            floor_inodes: 0,
        };
        let b = b.within_room(&room);
        assert_eq!(
            b.bytes.check(8),
            Err(Exhausted::FreeSpace {
                path: "/s".into(),
                floor: 9
            })
        );
        assert_eq!(b.inodes.left(), 10, "no inode count, no inode floor");
        assert!(room.fits(7).is_ok() && room.fits(8).is_err());
    }

    #[test]
    fn image_totals_are_checked() {
        let l = limits();
        assert!(l
            .check_image(Usage {
                bytes: 150,
                inodes: 30
            })
            .is_ok());
        assert_eq!(
            l.check_image(Usage {
                bytes: 151,
                inodes: 0
            }),
            Err(Exhausted::ImageBytes { limit: 150 })
        );
        assert_eq!(
            l.check_image(Usage {
                bytes: 0,
                inodes: 31
            }),
            Err(Exhausted::ImageInodes { limit: 30 })
        );
    }

    #[test]
    fn the_floor_is_the_higher_of_bytes_and_percent() {
        let dir = tempfile::tempdir().unwrap();
        let none = Limits {
            min_free_bytes: 0,
            min_free_percent: 0,
            ..Limits::default()
        };
        let free = Room::of(dir.path(), &none).unwrap();
        assert_eq!(free.floor_bytes, 0);
        let all = Limits {
            min_free_percent: 100,
            ..none
        };
        let room = Room::of(dir.path(), &all).unwrap();
        assert_eq!(room.bytes, 0, "a 100% floor leaves no room");
        assert!(matches!(room.fits(1), Err(Exhausted::FreeSpace { .. })));
        let huge = Limits {
            min_free_bytes: u64::MAX,
            ..none
        };
        assert_eq!(Room::of(dir.path(), &huge).unwrap().bytes, 0);
    }
}
