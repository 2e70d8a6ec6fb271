//! The virtio-net wire format (virtio 1.1, 5.1): feature bits, the
//! per-packet header, and how acked guest offloads map to the tap's.

/// Device handles packets with partial checksum (the guest may leave
/// checksums to the host).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// Driver handles packets with partial checksum (we may hand it some).
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The config space's `mtu` is valid.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The config space's `mac` is valid.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Driver can receive TSOv4 (large TCP/IPv4 segments).
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// Driver can receive TSOv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// Device can receive TSOv4 from the guest.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// Device can receive TSOv6 from the guest.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// Driver can merge receive buffers: one frame may span several chains.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The config space's `status` is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Size of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers): with VERSION_1 every
/// packet carries all 12 bytes, and the tap is told the same size.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest header plus frame either way: a 64 KiB GSO packet with its
/// Ethernet header (65550 bytes) and the virtio-net header.
pub const MAX_FRAME: usize = 65562;

/// TUN_F_* offloads for TUNSETOFFLOAD: what the tap may hand us, which
/// is what the guest driver acked it can receive. The tap refuses TSO
/// without checksum offload, as does the virtio spec (GUEST_TSO* need
/// GUEST_CSUM).
pub fn tun_offloads(acked: u64) -> u32 {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_what_the_guest_can_receive() {
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(tun_offloads(VIRTIO_NET_F_GUEST_TSO4), 0, "TSO needs CSUM");
        assert_eq!(tun_offloads(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4), 0);
        assert_eq!(
            tun_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
        assert_eq!(
            tun_offloads(
                VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
