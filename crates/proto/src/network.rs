//! Private networks: a node of one network cannot complete a handshake with,
//! or get any answer from, a node of another.
//!
//! A node is in the public network unless it is given a network secret. In a
//! private network every datagram the node sends (QUIC and overlay alike) is
//! wrapped in a frame:
//!
//! ```text
//! PRIVATE_FRAME_TAG (0x31) | network id (8) | tag (16) | inner datagram
//! ```
//!
//! - `network id` = the first 8 bytes of BLAKE3 `derive_key("p2pos network
//!   id v1", secret)`: lets a receiver tell "another private network" from
//!   "garbage" for a clear log line, and reveals nothing about the secret.
//! - `tag` = the first 16 bytes of keyed BLAKE3 over the inner datagram, with
//!   the key `derive_key("p2pos network mac v1", secret)`: only holders of
//!   the secret can make a frame the receiver accepts.
//!
//! A datagram that is not a valid frame of the node's own network is
//! dropped before QUIC or the overlay sees it, so the sender gets no answer
//! at all: no handshake, no version negotiation, no stateless reset. A public
//! node drops every frame (its first byte is no QUIC packet and no public
//! overlay message), so public and private never mix.
//!
//! QUIC already encrypts and authenticates its packets; the frame only
//! decides membership, so a MAC (not a second encryption) is enough.

use crate::packet::PRIVATE_FRAME_TAG;

/// Bytes a frame adds in front of the inner datagram.
pub const FRAME_OVERHEAD: usize = 1 + 8 + 16;

/// Identifies a private network on the wire (not secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkId(pub [u8; 8]);

impl std::fmt::Display for NetworkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The key material of one private network.
#[derive(Clone)]
pub struct NetworkKey {
    id: NetworkId,
    mac_key: [u8; 32],
}

/// Why a datagram is not a frame of this node's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a private-network frame at all (public traffic or garbage).
    #[error("not a private-network frame")]
    NotAFrame,
    /// A well-formed frame of another private network.
    #[error("frame of another private network ({0})")]
    OtherNetwork(NetworkId),
    /// The tag does not match: forged, corrupt, or a wrong secret with a
    /// colliding id.
    #[error("frame tag does not verify")]
    BadTag,
}

/// Why a network secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Too short to resist guessing.
    #[error("a network secret needs at least 16 bytes, this has {0}")]
    TooShort(usize),
}

impl NetworkKey {
    /// Derives the network from its shared secret (the contents of the
    /// secret file, surrounding whitespace removed by the caller if wanted).
    pub fn from_secret(secret: &[u8]) -> Result<Self, SecretError> {
        if secret.len() < 16 {
            return Err(SecretError::TooShort(secret.len()));
        }
        let id_full = blake3::derive_key("p2pos network id v1", secret);
        let mut id = [0u8; 8];
        id.copy_from_slice(&id_full[..8]);
        Ok(NetworkKey {
            id: NetworkId(id),
            mac_key: blake3::derive_key("p2pos network mac v1", secret),
        })
    }

    /// The network's public id.
    pub fn id(&self) -> NetworkId {
        self.id
    }

    /// The tag a member of this network puts in `peer`'s LAN announcement:
    /// members recognise each other by it, while to anyone else every
    /// member's tag is a different random-looking value that names no
    /// network and links no two members.
    pub fn lan_tag(&self, peer: &crate::PeerId) -> [u8; 8] {
        let key = blake3::derive_key("p2pos lan announcement tag v1", &self.mac_key);
        let hash = blake3::keyed_hash(&key, peer.as_bytes());
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash.as_bytes()[..8]);
        tag
    }

    fn tag(&self, inner: &[u8]) -> [u8; 16] {
        let hash = blake3::keyed_hash(&self.mac_key, inner);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&hash.as_bytes()[..16]);
        tag
    }

    /// Writes the frame header for `inner` into `out[..FRAME_OVERHEAD]`.
    pub fn write_header(&self, inner: &[u8], out: &mut [u8; FRAME_OVERHEAD]) {
        out[0] = PRIVATE_FRAME_TAG;
        out[1..9].copy_from_slice(&self.id.0);
        out[9..].copy_from_slice(&self.tag(inner));
    }

    /// Wraps `inner` in a frame, in a new buffer.
    pub fn seal(&self, inner: &[u8]) -> Vec<u8> {
        let mut header = [0u8; FRAME_OVERHEAD];
        self.write_header(inner, &mut header);
        let mut out = Vec::with_capacity(FRAME_OVERHEAD + inner.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(inner);
        out
    }

    /// Checks a received datagram; returns the inner datagram if it is a
    /// valid frame of this network.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], FrameError> {
        if datagram.len() < FRAME_OVERHEAD || datagram[0] != PRIVATE_FRAME_TAG {
            return Err(FrameError::NotAFrame);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&datagram[1..9]);
        if id != self.id.0 {
            return Err(FrameError::OtherNetwork(NetworkId(id)));
        }
        let inner = &datagram[FRAME_OVERHEAD..];
        // Constant-time comparison: the tag is a MAC.
        let expected = self.tag(inner);
        let diff = expected
            .iter()
            .zip(&datagram[9..FRAME_OVERHEAD])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(FrameError::BadTag);
        }
        Ok(inner)
    }
}

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetworkKey({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> NetworkKey {
        NetworkKey::from_secret(s.as_bytes()).unwrap()
    }

    #[test]
    fn frames_open_only_in_their_network() {
        let a = key("correct horse battery staple");
        let b = key("another secret of some length");
        let frame = a.seal(b"\xc0quic initial");
        assert_eq!(a.open(&frame), Ok(&b"\xc0quic initial"[..]));
        assert_eq!(b.open(&frame), Err(FrameError::OtherNetwork(a.id())));
        assert_eq!(a.open(b"\xc0quic initial"), Err(FrameError::NotAFrame));
        let mut forged = frame.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(a.open(&forged), Err(FrameError::BadTag));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            NetworkKey::from_secret(b"short").unwrap_err(),
            SecretError::TooShort(5)
        );
    }

    proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = key("0123456789abcdef").open(&bytes);
        }
    }
}
