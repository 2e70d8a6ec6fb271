//! A reader that hashes (sha256) and counts what passes through it, for
//! verifying blobs and diff IDs while they stream.

use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

/// Hashes and counts the bytes read through it.
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    len: u64,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of everything read.
    pub fn finish(self) -> Sha256 {
        self.hash
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_counts_everything_read() {
        let mut r = HashingReader::new(&b"hello"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(
            hex::encode(r.finish().finalize()),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
