//! A reader that watches a tar stream go by and stops it before the `tar`
//! crate buffers an oversized metadata entry.
//!
//! The `tar` crate reads PAX extended headers and GNU long names whole
//! into memory, whatever size their header declares: a few megabytes of
//! gzip can declare gigabytes. This guard parses each 512-byte header as
//! it streams (only the type flag and size fields) and fails the read when
//! a metadata entry is larger than the limit, or the archive larger than
//! its own. Hand-written because no crate offers the hook; the fields it
//! reads are fixed by POSIX ustar.

use std::io::{self, Read};

/// A tar block: every header and padded payload is a whole number of them.
const BLOCK_LEN: usize = 512;
const BLOCK: u64 = BLOCK_LEN as u64;

/// Types whose payload the tar crate reads into memory.
fn is_metadata(typeflag: u8) -> bool {
    matches!(typeflag, b'x' | b'g' | b'L' | b'K')
}

/// Decodes a tar numeric field: octal text, or GNU base-256 when the high
/// bit of the first byte is set.
pub fn parse_size(field: &[u8]) -> Option<u64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let mut v: u64 = u64::from(first & 0x7f);
            for b in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
            }
            return Some(v);
        }
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

/// The guard; wraps the decompressed layer stream.
pub struct TarGuard<R> {
    inner: R,
    max_metadata: u64,
    max_total: u64,
    total: u64,
    /// Set once the archive went past `max_total`: the tar crate may
    /// wrap the I/O error, so the caller asks here instead.
    over_total: bool,
    header: [u8; BLOCK_LEN],
    header_len: usize,
    /// Payload bytes (padded to blocks) left in the current entry.
    payload_left: u64,
}

impl<R: Read> TarGuard<R> {
    /// Guards `inner`: metadata entries up to `max_metadata` bytes, the
    /// whole archive up to `max_total`.
    pub fn new(inner: R, max_metadata: u64, max_total: u64) -> Self {
        TarGuard {
            inner,
            max_metadata,
            max_total,
            total: 0,
            over_total: false,
            header: [0; BLOCK_LEN],
            header_len: 0,
            payload_left: 0,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .map_or(bytes.len(), |left| left.min(bytes.len()));
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == BLOCK_LEN {
                self.header_len = 0;
                let size = parse_size(&self.header[124..136]).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "tar header with an invalid size field",
                    )
                })?;
                let typeflag = self.header[156];
                if is_metadata(typeflag) && size > self.max_metadata {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "tar metadata entry (type {:?}) of {size} bytes exceeds the {} byte limit",
                            typeflag as char, self.max_metadata
                        ),
                    ));
                }
                // Directories, links and devices have no payload whatever
                // their size field says; the tar crate skips `size` bytes
                // for the rest, so follow it.
                let has_payload = !matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6');
                if has_payload {
                    self.payload_left =
                        size.div_ceil(BLOCK).checked_mul(BLOCK).ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "tar entry size overflows")
                        })?;
                }
            }
        }
        Ok(())
    }
}

impl<R> TarGuard<R> {
    /// True once the archive went past its byte limit.
    pub fn over_total(&self) -> bool {
        self.over_total
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.max_total {
            self.over_total = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("layer exceeds the {} byte limit", self.max_total),
            ));
        }
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_octal_and_base256() {
        assert_eq!(parse_size(b"00000000644\0"), Some(0o644));
        assert_eq!(parse_size(b"     17 \0\0\0\0"), Some(0o17));
        assert_eq!(
            parse_size(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        assert_eq!(parse_size(b"\0\0\0"), Some(0));
        assert_eq!(parse_size(b"9999\0"), None);
        assert_eq!(parse_size(&[0xff; 12]), None, "base-256 overflow");
    }

    fn header(typeflag: u8, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"file");
        // GNU base-256, which holds any size.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
        h[156] = typeflag;
        h
    }

    #[test]
    fn oversized_pax_header_is_refused_before_its_payload() {
        let stream = header(b'x', 1 << 40);
        let mut g = TarGuard::new(&stream[..], 1 << 20, u64::MAX);
        let mut buf = [0u8; 700];
        let err = g.read(&mut buf).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn payloads_are_skipped_and_headers_found_across_reads() {
        let mut stream = header(b'0', 10);
        stream.extend(vec![7u8; 512]); // payload, padded
        stream.extend(header(b'L', 5000)); // long name over the limit
        let mut g = TarGuard::new(&stream[..], 4096, u64::MAX);
        let mut small = [0u8; 100];
        let mut result = Ok(0);
        for _ in 0..20 {
            result = g.read(&mut small);
            if result.is_err() {
                break;
            }
        }
        assert!(
            result.is_err(),
            "the long-name header behind a payload was seen"
        );
    }

    #[test]
    fn archive_total_is_bounded() {
        let stream = vec![0u8; 4096];
        let mut g = TarGuard::new(&stream[..], 1024, 1000);
        let mut out = Vec::new();
        assert!(!g.over_total());
        assert!(g.read_to_end(&mut out).is_err());
        assert!(g.over_total());
    }
}
