//! DHT messages: single overlay datagrams on the node's UDP port.
//!
//! ```text
//! 0x30 | version 1 | type (10 request, 11 response, 12 introduction) | fields…
//! Request:  txid u64 | sender id 16 | flags u8 (1 server, 2 want proof) |
//!           cookie u64 | body tag u8 | body | zero padding
//! Response: txid u64 | responder id 16 | observed addr | cookie u64 |
//!           proof u8 (0, or 1 + public key 32 + signature 64) |
//!           body tag u8 | body
//! Bodies:   Ping | FindNode target | GetRecord key | PutRecord record
//!           | FindPeer target
//!           Pong | Nodes n × (id, addr) | Record has? record n × (id, addr)
//!           | PutAck stored u8
//! Introduction: txid u64 | asker id 16 | asker addr | zero padding to 51
//! ```
//!
//! An introduction is what a node asked `FindPeer(target)` sends to the
//! target when the target is in its table: the asker's request txid, ID
//! and address, so the target answers the asker directly (a pong with its
//! ID proof) half a round trip sooner than the asker could ask it. It is
//! never answered to its sender, and it is padded so that the answer it
//! causes is at most 3× its size.
//!
//! Every length is checked; decoding never panics (fuzzed).

use super::address::Address;
use super::record::SignedRecord;
use super::{NodeId, ID_BYTES};
use crate::overlay::OVERLAY_VERSION;
use crate::packet::OVERLAY_TAG;
use crate::PeerId;

/// Overlay message type of DHT requests.
pub const TYPE_REQUEST: u8 = 10;
/// Overlay message type of DHT responses.
pub const TYPE_RESPONSE: u8 = 11;
/// Overlay message type of introductions.
pub const TYPE_INTRODUCTION: u8 = 12;
/// Smallest introduction: its answer (a pong with a proof) is at most 3×
/// as large.
pub const INTRODUCTION_PAD: usize = 51;
/// Largest DHT datagram.
pub const MAX_DHT_DATAGRAM: usize = 1400;
/// Most contacts in one response (a decoder refuses more).
pub const MAX_NODES: usize = 24;

/// Why a datagram is not a valid DHT message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a DHT message.
    #[error("not a DHT message")]
    NotDht,
    /// Too short or too long.
    #[error("DHT message has the wrong length")]
    Length,
    /// A field has a value the format does not allow.
    #[error("DHT message has an invalid field")]
    Invalid,
    /// An address does not decode.
    #[error("DHT message has an invalid address")]
    Address,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Transaction id, echoed by the response.
    pub txid: u64,
    /// The requester's node ID.
    pub sender: NodeId,
    /// Whether the requester serves the DHT (and may be added to tables).
    pub server: bool,
    /// Whether the responder must prove its ID.
    pub want_proof: bool,
    /// The cookie the responder issued to this address, or 0.
    pub cookie: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// Are you there?
    Ping,
    /// The k closest nodes to `target` you know.
    FindNode(NodeId),
    /// The record under this key, or closer nodes.
    GetRecord(NodeId),
    /// Store this record (boxed: a request waiting for its answer is kept
    /// for retransmission, and most requests carry no record).
    PutRecord(Box<SignedRecord>),
    /// As `FindNode`, and if `target` is in the responder's table, an
    /// introduction to it (see the module docs). Asked by reachable nodes
    /// looking for a peer: only they can take the target's unsolicited
    /// answer.
    FindPeer(NodeId),
}

/// An introduction: someone asked for this node (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduction<A> {
    /// The txid of the asker's request, which the answer echoes.
    pub txid: u64,
    /// The asker's node ID (the answer's proof signs it).
    pub asker: NodeId,
    /// The asker's address, as the introducer saw it.
    pub addr: A,
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<A> {
    /// The request's transaction id.
    pub txid: u64,
    /// The responder's node ID.
    pub responder: NodeId,
    /// The address the request came from, as the responder saw it.
    pub observed: A,
    /// A cookie for future requests from that address.
    pub cookie: u64,
    /// Proof of the responder's ID: its public key and a signature over the
    /// request's txid and the requester's ID.
    pub proof: Option<(PeerId, [u8; 64])>,
    /// The answer.
    pub body: ResponseBody<A>,
}

/// A response's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody<A> {
    /// Yes.
    Pong,
    /// Closest known nodes.
    Nodes(Vec<(NodeId, A)>),
    /// The record, if held, and closer nodes.
    Record(Option<SignedRecord>, Vec<(NodeId, A)>),
    /// Whether the record was stored.
    PutAck(bool),
}

/// Any DHT message.
// Decoded and handled at once, never stored: boxing the larger variant
// would cost an allocation per response for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhtMessage<A> {
    /// A request.
    Request(Request),
    /// A response.
    Response(Response<A>),
    /// An introduction.
    Introduction(Introduction<A>),
}

/// The bytes a proof signs.
pub fn proof_message(txid: u64, requester: &NodeId) -> [u8; PROOF_MESSAGE_BYTES] {
    let mut m = [0; PROOF_MESSAGE_BYTES];
    let (domain, rest) = m.split_at_mut(PROOF_DOMAIN.len());
    let (id, key) = rest.split_at_mut(8);
    domain.copy_from_slice(PROOF_DOMAIN);
    id.copy_from_slice(&txid.to_be_bytes());
    key.copy_from_slice(&requester.0);
    m
}

const PROOF_DOMAIN: &[u8] = b"p2pos dht proof v1";
const PROOF_MESSAGE_BYTES: usize = PROOF_DOMAIN.len() + 8 + ID_BYTES;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Length);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(
            self.bytes(8)?.try_into().map_err(|_| WireError::Length)?,
        ))
    }
    fn id(&mut self) -> Result<NodeId, WireError> {
        Ok(NodeId(
            self.bytes(ID_BYTES)?
                .try_into()
                .map_err(|_| WireError::Length)?,
        ))
    }
    fn addr<A: Address>(&mut self) -> Result<A, WireError> {
        let (a, rest) = A::decode(self.0)?;
        self.0 = rest;
        Ok(a)
    }
    fn nodes<A: Address>(&mut self) -> Result<Vec<(NodeId, A)>, WireError> {
        let n = usize::from(self.u8()?);
        if n > MAX_NODES {
            return Err(WireError::Invalid);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push((self.id()?, self.addr()?));
        }
        Ok(out)
    }
    fn record(&mut self) -> Result<SignedRecord, WireError> {
        let (r, rest) = SignedRecord::decode(self.0)?;
        self.0 = rest;
        Ok(r)
    }
}

fn put_nodes<A: Address>(nodes: &[(NodeId, A)], out: &mut Vec<u8>) {
    let n = nodes.len().min(MAX_NODES);
    out.push(n as u8);
    for (id, a) in &nodes[..n] {
        out.extend_from_slice(&id.0);
        a.encode(out);
    }
}

impl Request {
    /// Encodes the request, zero-padded to at least `pad_to` bytes.
    pub fn encode(&self, pad_to: usize) -> Vec<u8> {
        let record = match &self.body {
            RequestBody::PutRecord(r) => r.encoded_len(),
            _ => 0,
        };
        let mut out = Vec::with_capacity(pad_to.max(64 + record));
        out.extend_from_slice(&[OVERLAY_TAG, OVERLAY_VERSION, TYPE_REQUEST]);
        out.extend_from_slice(&self.txid.to_be_bytes());
        out.extend_from_slice(&self.sender.0);
        out.push(u8::from(self.server) | (u8::from(self.want_proof) << 1));
        out.extend_from_slice(&self.cookie.to_be_bytes());
        match &self.body {
            RequestBody::Ping => out.push(0),
            RequestBody::FindNode(t) => {
                out.push(1);
                out.extend_from_slice(&t.0);
            }
            RequestBody::GetRecord(k) => {
                out.push(2);
                out.extend_from_slice(&k.0);
            }
            RequestBody::PutRecord(r) => {
                out.push(3);
                r.encode(&mut out);
            }
            RequestBody::FindPeer(t) => {
                out.push(4);
                out.extend_from_slice(&t.0);
            }
        }
        if out.len() < pad_to {
            out.resize(pad_to.min(MAX_DHT_DATAGRAM), 0);
        }
        out
    }
}

impl<A: Address> Introduction<A> {
    /// Encodes the introduction, padded to [`INTRODUCTION_PAD`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[OVERLAY_TAG, OVERLAY_VERSION, TYPE_INTRODUCTION]);
        out.extend_from_slice(&self.txid.to_be_bytes());
        out.extend_from_slice(&self.asker.0);
        self.addr.encode(&mut out);
        if out.len() < INTRODUCTION_PAD {
            out.resize(INTRODUCTION_PAD, 0);
        }
        out
    }
}

impl<A: Address> Response<A> {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        // Room for all of it at once: answers of 10 contacts were grown
        // twice on their way.
        let (record, nodes) = match &self.body {
            ResponseBody::Nodes(nodes) => (0, nodes.len()),
            ResponseBody::Record(r, nodes) => {
                (r.as_ref().map_or(0, |r| r.encoded_len()), nodes.len())
            }
            _ => (0, 0),
        };
        // Head, txid, responder, cookie, proof (flag, key, signature), body
        // tag, record flag, contact count; then the observed address.
        const HEAD: usize = 3 + 8 + ID_BYTES + 8 + (1 + 32 + 64) + 3;
        let nodes = nodes.min(MAX_NODES) * (ID_BYTES + A::MAX_ENCODED);
        let mut out = Vec::with_capacity(HEAD + A::MAX_ENCODED + nodes + record);
        out.extend_from_slice(&[OVERLAY_TAG, OVERLAY_VERSION, TYPE_RESPONSE]);
        out.extend_from_slice(&self.txid.to_be_bytes());
        out.extend_from_slice(&self.responder.0);
        self.observed.encode(&mut out);
        out.extend_from_slice(&self.cookie.to_be_bytes());
        match &self.proof {
            None => out.push(0),
            Some((key, sig)) => {
                out.push(1);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(sig);
            }
        }
        match &self.body {
            ResponseBody::Pong => out.push(0),
            ResponseBody::Nodes(nodes) => {
                out.push(1);
                put_nodes(nodes, &mut out);
            }
            ResponseBody::Record(record, nodes) => {
                out.push(2);
                match record {
                    Some(r) => {
                        out.push(1);
                        r.encode(&mut out);
                    }
                    None => out.push(0),
                }
                put_nodes(nodes, &mut out);
            }
            ResponseBody::PutAck(stored) => {
                out.push(3);
                out.push(u8::from(*stored));
            }
        }
        out
    }
}

/// The node IDs a datagram names in its first bytes, read without
/// decoding it: a request's sender and (for a search) its target, a
/// response's responder. For hints (what memory the datagram's handling
/// will read); whatever the bytes, the answer is only ever a guess, and
/// nothing is checked.
pub fn peek_ids(datagram: &[u8]) -> [Option<NodeId>; 2] {
    const ID_AT: usize = 3 + 8;
    const TARGET_AT: usize = ID_AT + ID_BYTES + 1 + 8 + 1;
    let id_at = |at: usize| {
        datagram
            .get(at..at + ID_BYTES)
            .and_then(|b| b.try_into().ok())
            .map(NodeId)
    };
    match datagram.get(2) {
        Some(&TYPE_REQUEST) => {
            let target = match datagram.get(TARGET_AT - 1) {
                Some(1 | 2 | 4) => id_at(TARGET_AT),
                _ => None,
            };
            [id_at(ID_AT), target]
        }
        Some(&TYPE_RESPONSE) => [id_at(ID_AT), None],
        _ => [None, None],
    }
}

/// The transaction ID of a response, read without decoding it (a hint,
/// like [`peek_ids`]).
pub fn peek_response_txid(datagram: &[u8]) -> Option<u64> {
    if datagram.get(2) != Some(&TYPE_RESPONSE) {
        return None;
    }
    Some(u64::from_be_bytes(datagram.get(3..11)?.try_into().ok()?))
}

impl<A: Address> DhtMessage<A> {
    /// Decodes a datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, WireError> {
        if datagram.len() > MAX_DHT_DATAGRAM {
            return Err(WireError::Length);
        }
        let mut r = Reader(datagram);
        let head = r.bytes(3)?;
        if head[0] != OVERLAY_TAG || head[1] != OVERLAY_VERSION {
            return Err(WireError::NotDht);
        }
        match head[2] {
            TYPE_REQUEST => {
                let txid = r.u64()?;
                let sender = r.id()?;
                let flags = r.u8()?;
                if flags & !3 != 0 {
                    return Err(WireError::Invalid);
                }
                let cookie = r.u64()?;
                let body = match r.u8()? {
                    0 => RequestBody::Ping,
                    1 => RequestBody::FindNode(r.id()?),
                    2 => RequestBody::GetRecord(r.id()?),
                    3 => RequestBody::PutRecord(Box::new(r.record()?)),
                    4 => RequestBody::FindPeer(r.id()?),
                    _ => return Err(WireError::Invalid),
                };
                if r.0.iter().any(|&b| b != 0) {
                    return Err(WireError::Invalid);
                }
                Ok(DhtMessage::Request(Request {
                    txid,
                    sender,
                    server: flags & 1 != 0,
                    want_proof: flags & 2 != 0,
                    cookie,
                    body,
                }))
            }
            TYPE_RESPONSE => {
                let txid = r.u64()?;
                let responder = r.id()?;
                let observed = r.addr()?;
                let cookie = r.u64()?;
                let proof = match r.u8()? {
                    0 => None,
                    1 => {
                        // Checked by the proof's signature check.
                        let key = PeerId::from_bytes_unchecked(
                            r.bytes(32)?.try_into().map_err(|_| WireError::Length)?,
                        );
                        let sig: [u8; 64] =
                            r.bytes(64)?.try_into().map_err(|_| WireError::Length)?;
                        Some((key, sig))
                    }
                    _ => return Err(WireError::Invalid),
                };
                let body = match r.u8()? {
                    0 => ResponseBody::Pong,
                    1 => ResponseBody::Nodes(r.nodes()?),
                    2 => {
                        let record = match r.u8()? {
                            0 => None,
                            1 => Some(r.record()?),
                            _ => return Err(WireError::Invalid),
                        };
                        ResponseBody::Record(record, r.nodes()?)
                    }
                    3 => ResponseBody::PutAck(r.u8()? != 0),
                    _ => return Err(WireError::Invalid),
                };
                if !r.0.is_empty() {
                    return Err(WireError::Length);
                }
                Ok(DhtMessage::Response(Response {
                    txid,
                    responder,
                    observed,
                    cookie,
                    proof,
                    body,
                }))
            }
            TYPE_INTRODUCTION => {
                // Shorter ones would make answers more than 3× their size.
                if datagram.len() < INTRODUCTION_PAD {
                    return Err(WireError::Length);
                }
                let txid = r.u64()?;
                let asker = r.id()?;
                let addr = r.addr()?;
                if r.0.iter().any(|&b| b != 0) {
                    return Err(WireError::Invalid);
                }
                Ok(DhtMessage::Introduction(Introduction { txid, asker, addr }))
            }
            _ => Err(WireError::NotDht),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    /// What [`peek_ids`] should find in a message's bytes.
    fn named_ids<A>(m: &DhtMessage<A>) -> [Option<NodeId>; 2] {
        match m {
            DhtMessage::Request(r) => [
                Some(r.sender),
                match r.body {
                    RequestBody::FindNode(t)
                    | RequestBody::GetRecord(t)
                    | RequestBody::FindPeer(t) => Some(t),
                    _ => None,
                },
            ],
            DhtMessage::Response(r) => [Some(r.responder), None],
            DhtMessage::Introduction(_) => [None, None],
        }
    }

    #[test]
    fn round_trips() {
        let kp = Keypair::from_seed([5; 32]);
        let record = SignedRecord::sign(&kp, b"peer", 3, 100, b"value").unwrap();
        let requests = [
            RequestBody::Ping,
            RequestBody::FindNode(NodeId([1; ID_BYTES])),
            RequestBody::GetRecord(NodeId([2; ID_BYTES])),
            RequestBody::PutRecord(Box::new(record.clone())),
            RequestBody::FindPeer(NodeId([3; ID_BYTES])),
        ];
        for (i, body) in requests.into_iter().enumerate() {
            let req = Request {
                txid: i as u64,
                sender: NodeId([9; ID_BYTES]),
                server: true,
                want_proof: i % 2 == 0,
                cookie: 77,
                body,
            };
            for pad in [0, 300] {
                let bytes = req.encode(pad);
                assert!(bytes.len() >= pad);
                assert_eq!(
                    DhtMessage::<SocketAddr>::decode(&bytes),
                    Ok(DhtMessage::Request(req.clone()))
                );
                let message = DhtMessage::<SocketAddr>::Request(req.clone());
                assert_eq!(peek_ids(&bytes), named_ids(&message));
                assert_eq!(peek_response_txid(&bytes), None);
            }
        }
        let a: SocketAddr = "192.0.2.1:7447".parse().unwrap();
        let bodies = [
            ResponseBody::Pong,
            ResponseBody::Nodes(vec![(NodeId([3; ID_BYTES]), a); 20]),
            ResponseBody::Record(Some(record), vec![(NodeId([4; ID_BYTES]), a)]),
            ResponseBody::Record(None, vec![]),
            ResponseBody::PutAck(true),
        ];
        for body in bodies {
            let resp = Response {
                txid: 1,
                responder: NodeId([8; ID_BYTES]),
                observed: a,
                cookie: 5,
                proof: Some((kp.peer_id(), [7; 64])),
                body,
            };
            assert_eq!(
                DhtMessage::decode(&resp.encode()),
                Ok(DhtMessage::Response(resp.clone()))
            );
            assert_eq!(peek_ids(&resp.encode()), [Some(resp.responder), None]);
            assert_eq!(peek_response_txid(&resp.encode()), Some(resp.txid));
        }
    }

    #[test]
    fn introductions_round_trip_padded() {
        for addr in ["192.0.2.1:7447", "[2001:db8::1]:7447"] {
            let intro = Introduction {
                txid: 9,
                asker: NodeId([6; ID_BYTES]),
                addr: addr.parse::<SocketAddr>().unwrap(),
            };
            let bytes = intro.encode();
            assert!(bytes.len() >= INTRODUCTION_PAD);
            assert_eq!(
                DhtMessage::decode(&bytes),
                Ok(DhtMessage::Introduction(intro))
            );
            // Cut below the pad: refused.
            assert_eq!(
                DhtMessage::<SocketAddr>::decode(&bytes[..INTRODUCTION_PAD - 1]),
                Err(WireError::Length)
            );
        }
    }

    #[test]
    fn a_full_answer_fits_three_times_a_padded_request() {
        let a: SocketAddr = "[2001:db8::1]:7447".parse().unwrap();
        let resp = Response {
            txid: 1,
            responder: NodeId([8; ID_BYTES]),
            observed: a,
            cookie: 5,
            proof: Some((Keypair::from_seed([1; 32]).peer_id(), [0; 64])),
            body: ResponseBody::Nodes(vec![
                (NodeId([3; ID_BYTES]), a);
                super::super::node::ANSWER_NODES
            ]),
        };
        let len = resp.encode().len();
        assert!(
            len <= 3 * super::super::node::UNVERIFIED_REQUEST_PAD,
            "{len}"
        );
        // And a pong with a proof fits 3× a padded ping.
        let pong = Response {
            body: ResponseBody::Pong,
            ..resp
        };
        assert!(pong.encode().len() <= 3 * super::super::node::PROOF_REQUEST_PAD);
        // So does the answer to an introduction, which goes to the asker.
        assert!(pong.encode().len() <= 3 * INTRODUCTION_PAD);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut tagged = vec![OVERLAY_TAG, OVERLAY_VERSION, TYPE_REQUEST];
            tagged.extend_from_slice(&bytes);
            let _ = DhtMessage::<SocketAddr>::decode(&tagged);
            tagged[2] = TYPE_RESPONSE;
            let _ = DhtMessage::<SocketAddr>::decode(&tagged);
            tagged[2] = TYPE_INTRODUCTION;
            let _ = DhtMessage::<SocketAddr>::decode(&tagged);
            let _ = DhtMessage::<u32>::decode(&tagged);
            let _ = DhtMessage::<u32>::decode(&tagged);
            let _ = DhtMessage::<u32>::decode(&bytes);
            // What decodes names the IDs the quick read finds.
            for b in [&tagged, &bytes] {
                if let Ok(m) = DhtMessage::<u32>::decode(b) {
                    prop_assert_eq!(peek_ids(b), named_ids(&m));
                    let txid = match m {
                        DhtMessage::Response(r) => Some(r.txid),
                        _ => None,
                    };
                    prop_assert_eq!(peek_response_txid(b), txid);
                }
            }
        }
    }
}
