//! The overlay's own datagrams, sent beside QUIC on the node's UDP port.
//!
//! Layout: `OVERLAY_TAG (0x30) | version (1) | type (1) | body`. Every
//! request carries a 64-bit id that its reply echoes. Bodies are fixed
//! layouts in network byte order; decoding checks every length and rejects
//! trailing bytes, so a hostile datagram yields a [`DecodeError`], never a
//! panic.
//!
//! Today the overlay has one exchange, the probe: any node answers a
//! [`Message::Probe`] with a [`Message::ProbeReply`] telling the address it
//! saw the probe come from. It is how a node learns its public address from
//! its peers (no STUN server), and a liveness check that needs no session.
//! A reply is never larger than its request, so probes cannot amplify.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::packet::OVERLAY_TAG;

/// Version of the overlay datagram format.
pub const OVERLAY_VERSION: u8 = 1;
/// Largest overlay datagram p2pos sends or accepts.
pub const MAX_OVERLAY_DATAGRAM: usize = 1200;

const TYPE_PROBE: u8 = 1;
const TYPE_PROBE_REPLY: u8 = 2;

/// Size of a probe on the wire. Probes are padded to this size so that a
/// reply (which carries an address) is never larger than its request.
pub const PROBE_LEN: usize = 3 + 8 + 19;

/// An overlay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Tell me the address you see me at." Padded to [`PROBE_LEN`].
    Probe {
        /// Request id, echoed by the reply.
        id: u64,
    },
    /// The answer to a probe.
    ProbeReply {
        /// The probe's id.
        id: u64,
        /// The source address the responder saw the probe come from.
        observed: SocketAddr,
    },
}

/// Why a datagram is not a valid overlay message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Does not start with the overlay's first byte.
    #[error("not an overlay datagram")]
    NotOverlay,
    /// A format version this node does not speak.
    #[error("unsupported overlay version {0}")]
    Version(u8),
    /// A message type this node does not know.
    #[error("unknown overlay message type {0}")]
    UnknownType(u8),
    /// Shorter than its type requires, or longer than allowed.
    #[error("overlay message has the wrong length")]
    Length,
    /// A field holds a value the format does not allow.
    #[error("overlay message has an invalid field")]
    Invalid,
}

impl Message {
    /// Encodes the message into a new datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PROBE_LEN);
        out.push(OVERLAY_TAG);
        out.push(OVERLAY_VERSION);
        match self {
            Message::Probe { id } => {
                out.push(TYPE_PROBE);
                out.extend_from_slice(&id.to_be_bytes());
                out.resize(PROBE_LEN, 0);
            }
            Message::ProbeReply { id, observed } => {
                out.push(TYPE_PROBE_REPLY);
                out.extend_from_slice(&id.to_be_bytes());
                encode_addr(observed, &mut out);
            }
        }
        out
    }

    /// Decodes a datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        let (kind, id, body) = split_header(datagram)?;
        match kind {
            TYPE_PROBE => {
                // The padding must be present (anti-amplification) and zero.
                if datagram.len() != PROBE_LEN {
                    return Err(DecodeError::Length);
                }
                if body.iter().any(|&b| b != 0) {
                    return Err(DecodeError::Invalid);
                }
                Ok(Message::Probe { id })
            }
            TYPE_PROBE_REPLY => {
                let (observed, rest) = decode_addr(body)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Length);
                }
                Ok(Message::ProbeReply { id, observed })
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// Checks an overlay datagram's tag, version and size, and splits it into
/// `(type, id, body)`: every overlay message starts with a 64-bit id.
pub fn split_header(datagram: &[u8]) -> Result<(u8, u64, &[u8]), DecodeError> {
    if datagram.len() > MAX_OVERLAY_DATAGRAM {
        return Err(DecodeError::Length);
    }
    let (&tag, rest) = datagram.split_first().ok_or(DecodeError::NotOverlay)?;
    if tag != OVERLAY_TAG {
        return Err(DecodeError::NotOverlay);
    }
    let (&version, rest) = rest.split_first().ok_or(DecodeError::Length)?;
    if version != OVERLAY_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (&kind, body) = rest.split_first().ok_or(DecodeError::Length)?;
    let id = read_u64(body)?;
    Ok((kind, id, &body[8..]))
}

fn read_u64(bytes: &[u8]) -> Result<u64, DecodeError> {
    let head: [u8; 8] = bytes
        .get(..8)
        .ok_or(DecodeError::Length)?
        .try_into()
        .map_err(|_| DecodeError::Length)?;
    Ok(u64::from_be_bytes(head))
}

/// Encodes a socket address: family (4 or 6), address bytes, port.
pub fn encode_addr(addr: &SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Decodes an address written by [`encode_addr`]; returns it and the rest.
pub fn decode_addr(bytes: &[u8]) -> Result<(SocketAddr, &[u8]), DecodeError> {
    let (&family, rest) = bytes.split_first().ok_or(DecodeError::Length)?;
    let ip_len = match family {
        4 => 4,
        6 => 16,
        _ => return Err(DecodeError::Invalid),
    };
    if rest.len() < ip_len + 2 {
        return Err(DecodeError::Length);
    }
    let ip = if family == 4 {
        let o: [u8; 4] = rest[..4].try_into().map_err(|_| DecodeError::Length)?;
        IpAddr::V4(Ipv4Addr::from(o))
    } else {
        let o: [u8; 16] = rest[..16].try_into().map_err(|_| DecodeError::Length)?;
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let port = u16::from_be_bytes([rest[ip_len], rest[ip_len + 1]]);
    Ok((SocketAddr::new(ip, port), &rest[ip_len + 2..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reply_is_never_larger_than_probe() {
        let v6: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
        let reply = Message::ProbeReply {
            id: u64::MAX,
            observed: v6,
        };
        assert!(reply.encode().len() <= Message::Probe { id: 1 }.encode().len());
    }

    #[test]
    fn rejects_short_probe_and_bad_version() {
        let mut probe = Message::Probe { id: 7 }.encode();
        probe.pop();
        assert_eq!(Message::decode(&probe), Err(DecodeError::Length));
        let mut probe = Message::Probe { id: 7 }.encode();
        probe[1] = 9;
        assert_eq!(Message::decode(&probe), Err(DecodeError::Version(9)));
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<u64>(), ip in any::<[u8; 16]>(), port in any::<u16>(), v4 in any::<bool>()) {
            let observed = if v4 {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])), port)
            } else {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
            };
            for m in [Message::Probe { id }, Message::ProbeReply { id, observed }] {
                prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(&bytes);
            let mut tagged = vec![OVERLAY_TAG, OVERLAY_VERSION];
            tagged.extend_from_slice(&bytes);
            let _ = Message::decode(&tagged);
        }
    }
}
