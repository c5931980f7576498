//! The node's one UDP port carries QUIC and the overlay's own datagrams; the
//! first byte of a datagram says which.
//!
//! Every QUIC packet p2pos sends has the QUIC "fixed bit" (0x40) set: RFC 9000
//! §17 requires it, and p2pos endpoints never negotiate greasing it away
//! (RFC 9287). So QUIC owns first bytes 64–127 (short header) and 192–255
//! (long header), as in RFC 9443's multiplexing table. The overlay takes two
//! values below 64, leaving the rest unassigned (counted and dropped).

/// First byte of an overlay datagram on the public network (see [`crate::overlay`]).
pub const OVERLAY_TAG: u8 = 0x30;
/// First byte of a private-network frame (see [`crate::network`]).
pub const PRIVATE_FRAME_TAG: u8 = 0x31;

/// What a datagram arriving on the node's port is, judged by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// A QUIC packet: goes to the QUIC endpoint.
    Quic,
    /// An overlay datagram of the public network.
    Overlay,
    /// A frame of some private network.
    PrivateFrame,
    /// Empty, or a first byte nothing of p2pos uses: dropped and counted.
    Unknown,
}

/// Classifies a datagram by its first byte.
pub fn classify(datagram: &[u8]) -> PacketKind {
    match datagram.first() {
        Some(b) if b & 0x40 != 0 => PacketKind::Quic,
        Some(&OVERLAY_TAG) => PacketKind::Overlay,
        Some(&PRIVATE_FRAME_TAG) => PacketKind::PrivateFrame,
        _ => PacketKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_headers_are_quic() {
        assert_eq!(classify(&[0xc0, 0, 0, 0, 1]), PacketKind::Quic); // long header
        assert_eq!(classify(&[0x41, 1, 2]), PacketKind::Quic); // short header
        assert_eq!(classify(&[OVERLAY_TAG]), PacketKind::Overlay);
        assert_eq!(classify(&[PRIVATE_FRAME_TAG, 1]), PacketKind::PrivateFrame);
        assert_eq!(classify(&[]), PacketKind::Unknown);
        assert_eq!(classify(&[0x00, 0x01]), PacketKind::Unknown); // a STUN header
        assert_eq!(classify(&[0x80]), PacketKind::Unknown); // greased QUIC bit
    }

    #[test]
    fn every_first_byte_has_one_kind() {
        let quic = (0..=255u8)
            .filter(|&b| classify(&[b]) == PacketKind::Quic)
            .count();
        assert_eq!(quic, 128);
    }
}
