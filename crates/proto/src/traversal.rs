//! Connecting through NATs with no server of ours: the peer record that
//! says how to reach a node, the signalling messages its homes forward,
//! and the punch datagram.
//!
//! **Peer record** (the value of the DHT record named `peer`):
//!
//! ```text
//! version 2 | n addrs (1) | addrs | n homes (1) | (home key 32 | home addr)*
//!           | mapping (1) | filtering (1) | flags (1: bit 0 reachable)
//! ```
//!
//! **Signalling** runs on the built-in stream service `p2pos/signal`
//! inside sessions, as length-prefixed frames (`length u16 | body`):
//!
//! ```text
//! ConnectRequest (A → home):  1 | target key 32 | nonce u64 | candidates
//! Introduce (home → B):       2 | from key 32 | nonce u64 | candidates
//! Answer (B → home → A):      3 | nonce u64 | dial u8 | candidates
//! Refused (home or B → A):    4 | reason (UTF-8)
//! candidates:                 n (1) | addr*
//! ```
//!
//! The requester's identity in an `Introduce` is the one the home's session
//! with it authenticated: nobody can introduce themselves as someone else.
//!
//! **Punch** (overlay type 24): `id u64`, sent by both sides to the other's
//! candidates from the node's own port, so that each NAT has a binding for
//! the other before the QUIC handshake arrives. Receivers count and drop
//! punches.

use std::net::SocketAddr;

use crate::overlay::{decode_addr, encode_addr, split_header, DecodeError, OVERLAY_VERSION};
use crate::packet::OVERLAY_TAG;
use crate::reach::{Filtering, Mapping};
use crate::PeerId;

/// Overlay type of a punch datagram.
pub const TYPE_PUNCH: u8 = 24;
/// Version of the peer record value.
pub const PEER_RECORD_VERSION: u8 = 2;
/// Addresses in a peer record, at most.
pub const MAX_RECORD_ADDRS: usize = 16;
/// Homes in a peer record, at most.
pub const MAX_HOMES: usize = 4;
/// Candidates in a signalling message, at most.
pub const MAX_CANDIDATES: usize = 16;
/// Largest signalling frame body.
pub const MAX_SIGNAL_FRAME: usize = 1024;

/// Why bytes are not a valid record value or signalling frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraversalError {
    /// Ends early, too long, or too many entries.
    #[error("wrong length")]
    Length,
    /// A version or kind this node does not know.
    #[error("unsupported version or kind {0}")]
    Unsupported(u8),
    /// A field holds a value the format does not allow.
    #[error("invalid field")]
    Invalid,
}

impl From<DecodeError> for TraversalError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Invalid => TraversalError::Invalid,
            _ => TraversalError::Length,
        }
    }
}

/// A node's home: a reachable node it keeps a session with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Home {
    /// The home's peer ID.
    pub peer: PeerId,
    /// Where to reach it.
    pub addr: SocketAddr,
}

/// What a peer record says about reaching a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Addresses to try: LAN, observed, mapped.
    pub addrs: Vec<SocketAddr>,
    /// Reachable nodes that forward signalling to it.
    pub homes: Vec<Home>,
    /// Its NAT's mapping.
    pub mapping: Mapping,
    /// Its NAT's filtering.
    pub filtering: Filtering,
    /// Whether nodes it never contacted can reach it.
    pub reachable: bool,
}

pub(crate) fn mapping_code(m: Mapping) -> u8 {
    match m {
        Mapping::Unknown => 0,
        Mapping::None => 1,
        Mapping::EndpointIndependent => 2,
        Mapping::EndpointDependentSequential => 3,
        Mapping::EndpointDependentRandom => 4,
    }
}

pub(crate) fn mapping_of(code: u8) -> Result<Mapping, TraversalError> {
    Ok(match code {
        0 => Mapping::Unknown,
        1 => Mapping::None,
        2 => Mapping::EndpointIndependent,
        3 => Mapping::EndpointDependentSequential,
        4 => Mapping::EndpointDependentRandom,
        _ => return Err(TraversalError::Invalid),
    })
}

fn filtering_code(f: Filtering) -> u8 {
    match f {
        Filtering::Unknown => 0,
        Filtering::EndpointIndependent => 1,
        Filtering::AddressDependent => 2,
        Filtering::AddressAndPortDependent => 3,
    }
}

fn filtering_of(code: u8) -> Result<Filtering, TraversalError> {
    Ok(match code {
        0 => Filtering::Unknown,
        1 => Filtering::EndpointIndependent,
        2 => Filtering::AddressDependent,
        3 => Filtering::AddressAndPortDependent,
        _ => return Err(TraversalError::Invalid),
    })
}

pub(crate) fn encode_addrs(addrs: &[SocketAddr], max: usize, out: &mut Vec<u8>) {
    let addrs = &addrs[..addrs.len().min(max)];
    out.push(addrs.len() as u8);
    for a in addrs {
        encode_addr(a, out);
    }
}

pub(crate) fn decode_addrs(
    bytes: &[u8],
    max: usize,
) -> Result<(Vec<SocketAddr>, &[u8]), TraversalError> {
    let (&n, mut rest) = bytes.split_first().ok_or(TraversalError::Length)?;
    if usize::from(n) > max {
        return Err(TraversalError::Length);
    }
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let (a, r) = decode_addr(rest)?;
        out.push(a);
        rest = r;
    }
    Ok((out, rest))
}

pub(crate) fn decode_key(bytes: &[u8]) -> Result<(PeerId, &[u8]), TraversalError> {
    let key: [u8; 32] = bytes
        .get(..32)
        .ok_or(TraversalError::Length)?
        .try_into()
        .map_err(|_| TraversalError::Length)?;
    let peer = PeerId::from_bytes(key).map_err(|_| TraversalError::Invalid)?;
    Ok((peer, &bytes[32..]))
}

pub(crate) fn decode_u64(bytes: &[u8]) -> Result<(u64, &[u8]), TraversalError> {
    let v: [u8; 8] = bytes
        .get(..8)
        .ok_or(TraversalError::Length)?
        .try_into()
        .map_err(|_| TraversalError::Length)?;
    Ok((u64::from_be_bytes(v), &bytes[8..]))
}

impl PeerInfo {
    /// Encodes the record value (entries past the limits are left out).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PEER_RECORD_VERSION];
        encode_addrs(&self.addrs, MAX_RECORD_ADDRS, &mut out);
        let homes = &self.homes[..self.homes.len().min(MAX_HOMES)];
        out.push(homes.len() as u8);
        for h in homes {
            out.extend_from_slice(h.peer.as_bytes());
            encode_addr(&h.addr, &mut out);
        }
        out.push(mapping_code(self.mapping));
        out.push(filtering_code(self.filtering));
        out.push(u8::from(self.reachable));
        out
    }

    /// Decodes a record value.
    pub fn decode(bytes: &[u8]) -> Result<Self, TraversalError> {
        let (&version, rest) = bytes.split_first().ok_or(TraversalError::Length)?;
        if version != PEER_RECORD_VERSION {
            return Err(TraversalError::Unsupported(version));
        }
        let (addrs, rest) = decode_addrs(rest, MAX_RECORD_ADDRS)?;
        let (&n, mut rest) = rest.split_first().ok_or(TraversalError::Length)?;
        if usize::from(n) > MAX_HOMES {
            return Err(TraversalError::Length);
        }
        let mut homes = Vec::new();
        for _ in 0..n {
            let (peer, r) = decode_key(rest)?;
            let (addr, r) = decode_addr(r)?;
            homes.push(Home { peer, addr });
            rest = r;
        }
        let [m, f, flags] = rest else {
            return Err(TraversalError::Length);
        };
        if flags & !1 != 0 {
            return Err(TraversalError::Invalid);
        }
        Ok(PeerInfo {
            addrs,
            homes,
            mapping: mapping_of(*m)?,
            filtering: filtering_of(*f)?,
            reachable: flags & 1 == 1,
        })
    }
}

/// A signalling message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// To a home: "put me in touch with `target`".
    ConnectRequest {
        /// Who the requester wants to reach.
        target: PeerId,
        /// Ties the answer and the punches to this attempt.
        nonce: u64,
        /// Where the requester can be reached.
        candidates: Vec<SocketAddr>,
    },
    /// From a home to its node: "`from` wants to connect".
    Introduce {
        /// The requester, as the home's session authenticated it.
        from: PeerId,
        /// The request's nonce.
        nonce: u64,
        /// The requester's candidates.
        candidates: Vec<SocketAddr>,
    },
    /// The target's answer, forwarded to the requester.
    Answer {
        /// The request's nonce.
        nonce: u64,
        /// Whether the target dials too (its NAT maps per destination, so
        /// only its own packets create the mapping the requester needs).
        dial: bool,
        /// Where the target can be reached.
        candidates: Vec<SocketAddr>,
    },
    /// The request cannot be served.
    Refused {
        /// Why.
        reason: String,
    },
}

impl Signal {
    /// Encodes a frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Signal::ConnectRequest {
                target,
                nonce,
                candidates,
            } => {
                body.push(1);
                body.extend_from_slice(target.as_bytes());
                body.extend_from_slice(&nonce.to_be_bytes());
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            Signal::Introduce {
                from,
                nonce,
                candidates,
            } => {
                body.push(2);
                body.extend_from_slice(from.as_bytes());
                body.extend_from_slice(&nonce.to_be_bytes());
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            Signal::Answer {
                nonce,
                dial,
                candidates,
            } => {
                body.push(3);
                body.extend_from_slice(&nonce.to_be_bytes());
                body.push(u8::from(*dial));
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            Signal::Refused { reason } => {
                body.push(4);
                encode_reason(reason, &mut body);
            }
        }
        length_prefixed(body)
    }

    /// Reads a frame's length prefix: the body length, if acceptable.
    pub fn frame_len(prefix: [u8; 2]) -> Result<usize, TraversalError> {
        frame_len(prefix, MAX_SIGNAL_FRAME)
    }

    /// Decodes a frame body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, TraversalError> {
        let (kind, rest) = frame_kind(body, MAX_SIGNAL_FRAME)?;
        match kind {
            1 | 2 => {
                let (peer, rest) = decode_key(rest)?;
                let (nonce, rest) = decode_u64(rest)?;
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(if kind == 1 {
                    Signal::ConnectRequest {
                        target: peer,
                        nonce,
                        candidates,
                    }
                } else {
                    Signal::Introduce {
                        from: peer,
                        nonce,
                        candidates,
                    }
                })
            }
            3 => {
                let (nonce, rest) = decode_u64(rest)?;
                let (&dial, rest) = rest.split_first().ok_or(TraversalError::Length)?;
                if dial > 1 {
                    return Err(TraversalError::Invalid);
                }
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(Signal::Answer {
                    nonce,
                    dial: dial == 1,
                    candidates,
                })
            }
            4 => Ok(Signal::Refused {
                reason: decode_reason(rest)?,
            }),
            other => Err(TraversalError::Unsupported(other)),
        }
    }
}

/// The end of a frame body: nothing may follow.
pub(crate) fn done(rest: &[u8]) -> Result<(), TraversalError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(TraversalError::Length)
    }
}

/// A frame: `length u16 | body`.
pub(crate) fn length_prefixed(body: Vec<u8>) -> Vec<u8> {
    let mut frame = (body.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// A frame's body length from its prefix, if in `1..=max`.
pub(crate) fn frame_len(prefix: [u8; 2], max: usize) -> Result<usize, TraversalError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if len == 0 || len > max {
        return Err(TraversalError::Length);
    }
    Ok(len)
}

/// A frame body's kind byte and the rest.
pub(crate) fn frame_kind(body: &[u8], max: usize) -> Result<(u8, &[u8]), TraversalError> {
    if body.len() > max {
        return Err(TraversalError::Length);
    }
    let (&kind, rest) = body.split_first().ok_or(TraversalError::Length)?;
    Ok((kind, rest))
}

/// Longest refusal reason, in bytes.
const MAX_REASON: usize = 200;

pub(crate) fn encode_reason(reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(crate::lan::truncate_utf8(reason, MAX_REASON).as_bytes());
}

pub(crate) fn decode_reason(rest: &[u8]) -> Result<String, TraversalError> {
    let reason = std::str::from_utf8(rest).map_err(|_| TraversalError::Invalid)?;
    if reason.len() > MAX_REASON {
        return Err(TraversalError::Length);
    }
    Ok(reason.to_owned())
}

/// The punch datagram for attempt `id`.
pub fn encode_punch(id: u64) -> Vec<u8> {
    let mut out = vec![OVERLAY_TAG, OVERLAY_VERSION, TYPE_PUNCH];
    out.extend_from_slice(&id.to_be_bytes());
    out
}

/// Decodes a punch datagram: its attempt id.
pub fn decode_punch(datagram: &[u8]) -> Result<u64, DecodeError> {
    let (kind, id, body) = split_header(datagram)?;
    if kind != TYPE_PUNCH {
        return Err(DecodeError::UnknownType(kind));
    }
    if !body.is_empty() {
        return Err(DecodeError::Length);
    }
    Ok(id)
}

/// Whether the side answering a connect request should dial too: when its
/// own NAT maps per destination, the mapping toward the requester exists
/// only once it sends, so its packets must open the path.
pub fn answerer_dials(own_mapping: Mapping) -> bool {
    own_mapping.is_endpoint_dependent()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use proptest::prelude::*;

    fn peer(n: u8) -> PeerId {
        Keypair::from_seed([n; 32]).peer_id()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peer_info_round_trips_and_rejects_garbage() {
        let info = PeerInfo {
            addrs: vec![addr("192.168.1.10:7447"), addr("[2001:db8::1]:7447")],
            homes: vec![Home {
                peer: peer(1),
                addr: addr("11.0.1.1:7447"),
            }],
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressAndPortDependent,
            reachable: false,
        };
        let bytes = info.encode();
        assert_eq!(PeerInfo::decode(&bytes), Ok(info));
        assert_eq!(
            PeerInfo::decode(&bytes[..bytes.len() - 1]),
            Err(TraversalError::Length)
        );
        assert_eq!(
            PeerInfo::decode(&[1, 0]),
            Err(TraversalError::Unsupported(1))
        );
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] = 2;
        assert_eq!(PeerInfo::decode(&bad), Err(TraversalError::Invalid));
        let mut bad = bytes;
        bad[1] = 17;
        assert_eq!(PeerInfo::decode(&bad), Err(TraversalError::Length));
    }

    #[test]
    fn signals_round_trip() {
        let cands = vec![addr("11.0.2.1:7447"), addr("192.168.1.10:7447")];
        for s in [
            Signal::ConnectRequest {
                target: peer(2),
                nonce: 9,
                candidates: cands.clone(),
            },
            Signal::Introduce {
                from: peer(3),
                nonce: 9,
                candidates: cands.clone(),
            },
            Signal::Answer {
                nonce: 9,
                dial: true,
                candidates: cands,
            },
            Signal::Refused {
                reason: "not my node".into(),
            },
        ] {
            let frame = s.encode();
            let len = Signal::frame_len([frame[0], frame[1]]).unwrap();
            assert_eq!(len, frame.len() - 2);
            assert_eq!(Signal::decode(&frame[2..]), Ok(s));
        }
        assert_eq!(Signal::frame_len([0xff, 0xff]), Err(TraversalError::Length));
        assert_eq!(Signal::decode(&[9]), Err(TraversalError::Unsupported(9)));
    }

    #[test]
    fn punches_round_trip() {
        assert_eq!(decode_punch(&encode_punch(77)), Ok(77));
        let mut long = encode_punch(77);
        long.push(0);
        assert_eq!(decode_punch(&long), Err(DecodeError::Length));
    }

    #[test]
    fn only_a_per_destination_mapper_dials_back() {
        assert!(answerer_dials(Mapping::EndpointDependentRandom));
        assert!(!answerer_dials(Mapping::EndpointIndependent));
        assert!(!answerer_dials(Mapping::None));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PeerInfo::decode(&bytes);
            let _ = Signal::decode(&bytes);
            let _ = decode_punch(&bytes);
        }
    }
}
