//! Guest to tap: each TX chain is one vnet header and frame, written to
//! the tap straight from guest memory with one writev.

use super::header::{HDR_LEN, MAX_FRAME};
use super::tap::Tap;
use std::io;
use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// Most iovecs one writev takes (IOV_MAX); a longer chain is malformed.
const MAX_IOV: usize = 1024;

/// Why a TX chain was not sent.
#[derive(Debug, Error)]
pub enum TxError {
    /// The driver marked a TX buffer device-writable.
    #[error("a write-only descriptor in a TX chain")]
    WriteOnly,
    /// A buffer lies outside guest memory.
    #[error("a descriptor outside guest memory")]
    BadAddress,
    /// Header and frame exceed [`MAX_FRAME`].
    #[error("a chain longer than {MAX_FRAME} bytes")]
    TooLong,
    /// The chain cannot even hold the vnet header.
    #[error("a {0}-byte chain, shorter than the {HDR_LEN}-byte header")]
    TooShort(usize),
    /// More pieces than one writev takes.
    #[error("a chain in more than {MAX_IOV} pieces")]
    TooManyPieces,
    /// The tap refused the frame (full, down, or a header it rejects).
    #[error("the tap refused the frame: {0}")]
    Tap(io::Error),
}

/// Sends the frame `chain` holds to `tap`; the chain is consumed either
/// way and its used length is 0 (the device writes nothing into it).
pub fn send_chain(
    tap: &Tap,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<usize, TxError> {
    let mut slices = Vec::new();
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        let len = usize::try_from(desc.len()).map_err(|_| TxError::TooLong)?;
        total = total.saturating_add(len);
        if total > MAX_FRAME {
            return Err(TxError::TooLong);
        }
        for slice in mem.get_slices(desc.addr(), len) {
            slices.push(slice.map_err(|_| TxError::BadAddress)?);
        }
        if slices.len() > MAX_IOV {
            return Err(TxError::TooManyPieces);
        }
    }
    if total < HDR_LEN {
        return Err(TxError::TooShort(total));
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        })
        .collect();
    // SAFETY: each iovec is a guest memory slice that get_slices checked
    // lies inside a mapping `mem` keeps alive (and its guard pins) for
    // the whole call; the guest may change the bytes meanwhile, which
    // only changes the frame it sends.
    let sent = unsafe { tap.write_frame(&iov) }.map_err(TxError::Tap)?;
    Ok(sent)
}
