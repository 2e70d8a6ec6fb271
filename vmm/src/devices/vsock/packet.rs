//! The virtio-vsock packet header (virtio 1.1, 5.10.6) and its constants.

use vm_memory::ByteValued;

/// The host's CID, the only peer our guests may address.
pub const VSOCK_HOST_CID: u64 = 2;
/// Stream sockets, the only type we carry.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, or closed for good).
    pub const RST: u16 = 3;
    /// One or both directions closed; `flags` says which.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Largest payload we accept in one packet; Linux never sends more than
/// 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The 44-byte little-endian header that starts every packet.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

// SAFETY: plain integers, packed, no padding; any bit pattern is valid.
unsafe impl ByteValued for PacketHeader {}

/// Size of [`PacketHeader`] on the wire.
pub const HEADER_SIZE: usize = std::mem::size_of::<PacketHeader>();

impl PacketHeader {
    /// The header converted from wire (little-endian) to host order, or
    /// back: the conversion is its own inverse.
    pub fn swap_le(self) -> Self {
        PacketHeader {
            src_cid: u64::from_le(self.src_cid),
            dst_cid: u64::from_le(self.dst_cid),
            src_port: u32::from_le(self.src_port),
            dst_port: u32::from_le(self.dst_port),
            len: u32::from_le(self.len),
            type_: u16::from_le(self.type_),
            op: u16::from_le(self.op),
            flags: u32::from_le(self.flags),
            buf_alloc: u32::from_le(self.buf_alloc),
            fwd_cnt: u32::from_le(self.fwd_cnt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes_as_the_spec_says() {
        assert_eq!(HEADER_SIZE, 44);
    }
}
