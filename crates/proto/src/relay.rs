//! Relayed sessions: a reachable node forwards the QUIC packets of two
//! peers that found no direct path, without being able to read them, and
//! the peers keep looking for a direct path and move the session to it.
//!
//! **Circuits** are set up on the built-in stream service `p2pos/relay`
//! inside sessions, with length-prefixed frames (`length u16 | body`):
//!
//! ```text
//! Connect (A → relay):  1 | target key 32 | mapping (1) | candidates
//! Offer (relay → B):    2 | from key 32 | circuit u64 | mapping | candidates
//! Accept (B → relay):   3 | mapping | candidates
//! Opened (relay → A):   4 | circuit u64 | mapping | candidates
//! Refused:              5 | reason (UTF-8)
//! candidates:           n (1) | addr*
//! ```
//!
//! The relay adds the address it sees each side at to the front of that
//! side's candidates. `mapping` is the sender's NAT mapping (codes of the
//! peer record), passed on to the other side: it decides the many-ports
//! search below. Both streams stay open for the circuit's life: when
//! either ends, or either side's session with the relay closes, the relay
//! drops the circuit.
//!
//! **Relayed packets** (overlay type 28) are `header | QUIC packet`, with
//! the 11-byte header `0x30 | version | 28 | circuit u64`. The relay
//! forwards a packet from one end of a circuit to the other unchanged, and
//! only between the two addresses the circuit was opened for.
//!
//! **Path probes** (overlay types 29 and 30, `circuit u64 | nonce u64`):
//! each end sends [`PathMessage::Probe`] to the other's candidates from its
//! own port and answers a probe naming one of its circuits with an
//! [`PathMessage::Ack`] to its source. An ack for a probe this end sent
//! proves a direct path both ways; the end then sends the session's packets
//! there. An ack is the size of its probe.
//!
//! **Many ports.** Where one side's NAT maps per destination (the *hard*
//! side) and the other's does not (the *easy* side), probing candidates
//! cannot work against port-restricted filtering: the hard side's port
//! toward the easy side is unknown. Then, once, the hard side sends one
//! probe from each of [`SPRAY_SOCKETS`] fresh sockets to the easy side,
//! opening as many mappings, and the easy side probes [`SPRAY_PROBES`]
//! random ports of the hard side's address (≈98% to hit one of them: the
//! birthday bound). A round that misses is run once more with fresh
//! sockets, [`SPRAY_WINDOW`] later ([`SPRAY_ROUNDS`] in all: ≈99.97%).
//! Only the address of a peer this node already has a relayed session
//! with is sprayed, at most that often per session, paced at
//! [`SPRAY_PER_TICK`] probes per 100 ms.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::overlay::{DecodeError, OVERLAY_VERSION};
use crate::packet::OVERLAY_TAG;
use crate::reach::Mapping;
use crate::rng::SplitMix64;
use crate::traversal::{
    decode_addrs, decode_key, decode_reason, decode_u64, done, encode_addrs, encode_reason,
    frame_kind, frame_len, length_prefixed, mapping_code, mapping_of, TraversalError,
};
use crate::PeerId;

/// Overlay type of a relayed QUIC packet.
pub const TYPE_RELAYED: u8 = 28;
/// Overlay type of a path probe.
pub const TYPE_PATH_PROBE: u8 = 29;
/// Overlay type of a path probe's answer.
pub const TYPE_PATH_ACK: u8 = 30;
/// Bytes a relayed packet carries before the QUIC packet.
pub const RELAY_HEADER: usize = 11;
/// Candidates in a circuit message, at most.
pub const MAX_CANDIDATES: usize = 16;
/// Largest circuit-setup frame body.
pub const MAX_RELAY_FRAME: usize = 1024;

/// The header of a relayed packet on `circuit`.
pub fn relayed_header(circuit: u64) -> [u8; RELAY_HEADER] {
    let mut h = [0u8; RELAY_HEADER];
    h[0] = OVERLAY_TAG;
    h[1] = OVERLAY_VERSION;
    h[2] = TYPE_RELAYED;
    h[3..].copy_from_slice(&circuit.to_be_bytes());
    h
}

/// Whether `datagram` (an overlay datagram) is a relayed packet.
pub fn is_relayed(datagram: &[u8]) -> bool {
    datagram.len() > RELAY_HEADER
        && datagram[0] == OVERLAY_TAG
        && datagram[1] == OVERLAY_VERSION
        && datagram[2] == TYPE_RELAYED
}

/// Splits a relayed packet into its circuit and the QUIC packet it
/// carries. The payload must look like QUIC (fixed bit set), so a relay
/// never forwards anything else.
pub fn parse_relayed(datagram: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    if !is_relayed(datagram) {
        return Err(DecodeError::NotOverlay);
    }
    let circuit = u64::from_be_bytes(
        datagram[3..RELAY_HEADER]
            .try_into()
            .map_err(|_| DecodeError::Length)?,
    );
    let payload = &datagram[RELAY_HEADER..];
    if crate::packet::classify(payload) != crate::packet::PacketKind::Quic {
        return Err(DecodeError::Invalid);
    }
    Ok((circuit, payload))
}

/// A path probe or its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathMessage {
    /// "Can you hear me here?", for the session relayed on `circuit`.
    Probe {
        /// The circuit the session runs on.
        circuit: u64,
        /// Echoed by the ack.
        nonce: u64,
    },
    /// The answer, sent to the probe's source.
    Ack {
        /// The probe's circuit.
        circuit: u64,
        /// The probe's nonce.
        nonce: u64,
    },
}

/// Size of a path message on the wire.
pub const PATH_MESSAGE_LEN: usize = 3 + 16;

impl PathMessage {
    /// Encodes the datagram.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, circuit, nonce) = match *self {
            PathMessage::Probe { circuit, nonce } => (TYPE_PATH_PROBE, circuit, nonce),
            PathMessage::Ack { circuit, nonce } => (TYPE_PATH_ACK, circuit, nonce),
        };
        let mut out = Vec::with_capacity(PATH_MESSAGE_LEN);
        out.extend_from_slice(&[OVERLAY_TAG, OVERLAY_VERSION, kind]);
        out.extend_from_slice(&circuit.to_be_bytes());
        out.extend_from_slice(&nonce.to_be_bytes());
        out
    }

    /// Whether `datagram` is a path message (by its type byte).
    pub fn is_path(datagram: &[u8]) -> bool {
        datagram.len() >= 3
            && datagram[0] == OVERLAY_TAG
            && matches!(datagram[2], TYPE_PATH_PROBE | TYPE_PATH_ACK)
    }

    /// Decodes a datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        if datagram.first() != Some(&OVERLAY_TAG) {
            return Err(DecodeError::NotOverlay);
        }
        if datagram.len() != PATH_MESSAGE_LEN {
            return Err(DecodeError::Length);
        }
        if datagram[1] != OVERLAY_VERSION {
            return Err(DecodeError::Version(datagram[1]));
        }
        let word =
            |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().unwrap_or([0; 8]));
        let (circuit, nonce) = (word(3), word(11));
        match datagram[2] {
            TYPE_PATH_PROBE => Ok(PathMessage::Probe { circuit, nonce }),
            TYPE_PATH_ACK => Ok(PathMessage::Ack { circuit, nonce }),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// A circuit-setup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMessage {
    /// To a relay: "relay a session between me and `target`".
    Connect {
        /// The peer to reach (it must have a session with the relay).
        target: PeerId,
        /// The requester's NAT mapping.
        mapping: Mapping,
        /// Where the requester can be reached directly.
        candidates: Vec<SocketAddr>,
    },
    /// From the relay to the target: "`from` wants a relayed session".
    Offer {
        /// The requester, as the relay's session authenticated it.
        from: PeerId,
        /// The circuit the session will use.
        circuit: u64,
        /// The requester's NAT mapping.
        mapping: Mapping,
        /// The requester's candidates.
        candidates: Vec<SocketAddr>,
    },
    /// The target accepts.
    Accept {
        /// The target's NAT mapping.
        mapping: Mapping,
        /// Where the target can be reached directly.
        candidates: Vec<SocketAddr>,
    },
    /// From the relay to the requester: the circuit is open.
    Opened {
        /// The circuit.
        circuit: u64,
        /// The target's NAT mapping.
        mapping: Mapping,
        /// The target's candidates.
        candidates: Vec<SocketAddr>,
    },
    /// The request cannot be served.
    Refused {
        /// Why.
        reason: String,
    },
}

impl RelayMessage {
    /// Encodes a frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            RelayMessage::Connect {
                target,
                mapping,
                candidates,
            } => {
                body.push(1);
                body.extend_from_slice(target.as_bytes());
                body.push(mapping_code(*mapping));
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            RelayMessage::Offer {
                from,
                circuit,
                mapping,
                candidates,
            } => {
                body.push(2);
                body.extend_from_slice(from.as_bytes());
                body.extend_from_slice(&circuit.to_be_bytes());
                body.push(mapping_code(*mapping));
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            RelayMessage::Accept {
                mapping,
                candidates,
            } => {
                body.push(3);
                body.push(mapping_code(*mapping));
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            RelayMessage::Opened {
                circuit,
                mapping,
                candidates,
            } => {
                body.push(4);
                body.extend_from_slice(&circuit.to_be_bytes());
                body.push(mapping_code(*mapping));
                encode_addrs(candidates, MAX_CANDIDATES, &mut body);
            }
            RelayMessage::Refused { reason } => {
                body.push(5);
                encode_reason(reason, &mut body);
            }
        }
        length_prefixed(body)
    }

    /// Reads a frame's length prefix: the body length, if acceptable.
    pub fn frame_len(prefix: [u8; 2]) -> Result<usize, TraversalError> {
        frame_len(prefix, MAX_RELAY_FRAME)
    }

    /// Decodes a frame body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, TraversalError> {
        let (kind, rest) = frame_kind(body, MAX_RELAY_FRAME)?;
        match kind {
            1 => {
                let (target, rest) = decode_key(rest)?;
                let (mapping, rest) = decode_mapping(rest)?;
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(RelayMessage::Connect {
                    target,
                    mapping,
                    candidates,
                })
            }
            2 => {
                let (from, rest) = decode_key(rest)?;
                let (circuit, rest) = decode_u64(rest)?;
                let (mapping, rest) = decode_mapping(rest)?;
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(RelayMessage::Offer {
                    from,
                    circuit,
                    mapping,
                    candidates,
                })
            }
            3 => {
                let (mapping, rest) = decode_mapping(rest)?;
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(RelayMessage::Accept {
                    mapping,
                    candidates,
                })
            }
            4 => {
                let (circuit, rest) = decode_u64(rest)?;
                let (mapping, rest) = decode_mapping(rest)?;
                let (candidates, rest) = decode_addrs(rest, MAX_CANDIDATES)?;
                done(rest)?;
                Ok(RelayMessage::Opened {
                    circuit,
                    mapping,
                    candidates,
                })
            }
            5 => Ok(RelayMessage::Refused {
                reason: decode_reason(rest)?,
            }),
            other => Err(TraversalError::Unsupported(other)),
        }
    }
}

fn decode_mapping(bytes: &[u8]) -> Result<(Mapping, &[u8]), TraversalError> {
    let (&code, rest) = bytes.split_first().ok_or(TraversalError::Length)?;
    Ok((mapping_of(code)?, rest))
}

/// What a relay's owner allows. No limit on a circuit's duration or
/// total bytes: a relayed file transfer or call runs as long as it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Whether this node relays at all (it also must be reachable).
    pub enabled: bool,
    /// Circuits open at once, in total.
    pub max_circuits: usize,
    /// Circuits open at once with one peer at either end.
    pub max_circuits_per_peer: usize,
    /// Bytes per second one circuit may carry (both directions together).
    pub circuit_rate: u64,
    /// Bytes per second all circuits together may carry.
    pub total_rate: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            enabled: true,
            max_circuits: 128,
            max_circuits_per_peer: 4,
            circuit_rate: 8 << 20,
            total_rate: 32 << 20,
        }
    }
}

/// Why a relay refused a circuit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    /// Relaying is off on this node.
    #[error("this node does not relay (its owner turned relaying off)")]
    Disabled,
    /// All circuit slots are taken.
    #[error("this relay carries its maximum of {0} circuits")]
    Full(usize),
    /// One of the peers has its maximum of circuits here.
    #[error("a peer of this circuit already has {0} circuits on this relay")]
    PeerFull(usize),
}

/// A token bucket of bytes, refilled at `rate` per second, holding at most
/// one second's worth.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Duration,
}

impl Bucket {
    fn new(rate: u64, now: Duration) -> Self {
        Bucket {
            tokens: rate as f64,
            at: now,
        }
    }

    fn refill(&mut self, rate: u64, now: Duration) {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate as f64).min(rate as f64);
        self.at = now;
    }
}

#[derive(Debug, Clone)]
struct Circuit {
    a: (PeerId, SocketAddr),
    b: (PeerId, SocketAddr),
    bucket: Bucket,
    bytes: u64,
}

/// What to do with a relayed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Send it on, unchanged, to this address.
    To(SocketAddr),
    /// No such circuit, or the source is not one of its ends.
    Unknown,
    /// Over the circuit's or the relay's rate.
    OverQuota,
}

/// Counters of a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Circuits open now.
    pub circuits: usize,
    /// Circuits opened since start.
    pub opened: u64,
    /// Circuits refused since start.
    pub refused: u64,
    /// Packets and bytes forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Packets dropped for a rate limit.
    pub over_quota: u64,
    /// Packets for no circuit of this relay (or from a stranger).
    pub unknown: u64,
}

/// The circuits a relay forwards for, with its owner's limits (sans-IO:
/// time and randomness come from the caller).
#[derive(Debug)]
pub struct RelayTable {
    limits: RelayLimits,
    circuits: HashMap<u64, Circuit>,
    total: Bucket,
    rng: SplitMix64,
    stats: RelayStats,
}

impl RelayTable {
    /// An empty table; `seed` draws circuit ids.
    pub fn new(limits: RelayLimits, seed: u64, now: Duration) -> Self {
        RelayTable {
            limits,
            circuits: HashMap::new(),
            total: Bucket::new(limits.total_rate, now),
            rng: SplitMix64(seed),
            stats: RelayStats::default(),
        }
    }

    /// The owner's limits.
    pub fn limits(&self) -> RelayLimits {
        self.limits
    }

    /// Opens a circuit between `a` (the requester) and `b`, each at the
    /// address this relay's session with it uses.
    pub fn open(
        &mut self,
        now: Duration,
        a: (PeerId, SocketAddr),
        b: (PeerId, SocketAddr),
    ) -> Result<u64, RelayRefusal> {
        let refusal = if !self.limits.enabled {
            Some(RelayRefusal::Disabled)
        } else if self.circuits.len() >= self.limits.max_circuits {
            Some(RelayRefusal::Full(self.limits.max_circuits))
        } else if [a.0, b.0].iter().any(|p| {
            self.circuits
                .values()
                .filter(|c| c.a.0 == *p || c.b.0 == *p)
                .count()
                >= self.limits.max_circuits_per_peer
        }) {
            Some(RelayRefusal::PeerFull(self.limits.max_circuits_per_peer))
        } else {
            None
        };
        if let Some(r) = refusal {
            self.stats.refused += 1;
            return Err(r);
        }
        let mut id = self.rng.next_u64();
        while id == 0 || self.circuits.contains_key(&id) {
            id = self.rng.next_u64();
        }
        self.circuits.insert(
            id,
            Circuit {
                a,
                b,
                bucket: Bucket::new(self.limits.circuit_rate, now),
                bytes: 0,
            },
        );
        self.stats.opened += 1;
        Ok(id)
    }

    /// Closes a circuit (no-op if it is gone).
    pub fn close(&mut self, circuit: u64) {
        self.circuits.remove(&circuit);
    }

    /// Decides what to do with a relayed packet of `len` bytes from `src`.
    pub fn forward(&mut self, now: Duration, src: SocketAddr, circuit: u64, len: usize) -> Forward {
        let Some(c) = self.circuits.get_mut(&circuit) else {
            self.stats.unknown += 1;
            return Forward::Unknown;
        };
        let dest = if src == c.a.1 {
            c.b.1
        } else if src == c.b.1 {
            c.a.1
        } else {
            self.stats.unknown += 1;
            return Forward::Unknown;
        };
        let cost = len as f64;
        c.bucket.refill(self.limits.circuit_rate, now);
        self.total.refill(self.limits.total_rate, now);
        if c.bucket.tokens < cost || self.total.tokens < cost {
            self.stats.over_quota += 1;
            return Forward::OverQuota;
        }
        c.bucket.tokens -= cost;
        self.total.tokens -= cost;
        c.bytes += len as u64;
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        Forward::To(dest)
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            circuits: self.circuits.len(),
            ..self.stats
        }
    }
}

/// Delays between probe rounds: soon at first, then every
/// [`PROBE_INTERVAL_MAX`].
pub const PROBE_SCHEDULE: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// The longest time between probe rounds while a session is relayed.
pub const PROBE_INTERVAL_MAX: Duration = Duration::from_secs(10);
/// Sockets the hard side opens for the many-ports search.
pub const SPRAY_SOCKETS: usize = 256;
/// Random ports of the hard side the easy side probes.
pub const SPRAY_PROBES: usize = 1024;
/// Many-ports probes sent per 100 ms, at most.
pub const SPRAY_PER_TICK: usize = 64;
/// When the hard side opens its sockets, after the search starts.
pub const SPRAY_HARD_AT: Duration = Duration::from_millis(1500);
/// When the easy side starts probing, after the search starts.
pub const SPRAY_EASY_AT: Duration = Duration::from_millis(2500);
/// How long the hard side keeps its sockets, and resends from them every
/// second, without a hit; a round of the search on both sides.
pub const SPRAY_WINDOW: Duration = Duration::from_secs(10);
/// Rounds of the many-ports search at most: a round misses with odds of
/// about e^-4 (1.7%), and a second, with other random ports on both sides,
/// squares that.
pub const SPRAY_ROUNDS: u8 = 2;

/// A side's part in the many-ports search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SprayRole {
    /// Its NAT maps per destination: it opens many sockets.
    Hard,
    /// Its NAT maps the same port for every destination: it probes many
    /// ports of the hard side.
    Easy,
}

/// This side's part in the many-ports search, if one is worth running:
/// exactly one of the two NATs maps per destination (two such NATs need
/// ~64k probes for the same odds; that pair stays relayed).
pub fn spray_role(own: Mapping, peer: Mapping) -> Option<SprayRole> {
    let easy = |m: Mapping| matches!(m, Mapping::EndpointIndependent | Mapping::None);
    if own.is_endpoint_dependent() && easy(peer) {
        Some(SprayRole::Hard)
    } else if easy(own) && peer.is_endpoint_dependent() {
        Some(SprayRole::Easy)
    } else {
        None
    }
}

/// What the many-ports search asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SprayAction {
    /// Hard side: open `count` sockets and send `datagram` to `to` from
    /// each.
    Open {
        /// Sockets to open.
        count: usize,
        /// The easy side's address.
        to: SocketAddr,
        /// The probe to send.
        datagram: Vec<u8>,
    },
    /// Hard side: send `datagram` to `to` again from every socket.
    Resend {
        /// The easy side's address.
        to: SocketAddr,
        /// The probe.
        datagram: Vec<u8>,
    },
    /// Hard side: no hit; close the sockets.
    Close,
    /// Easy side: send these probes from the node's own socket.
    Probes(Vec<(SocketAddr, Vec<u8>)>),
}

#[derive(Debug, Clone)]
struct Spray {
    role: SprayRole,
    target: SocketAddr,
    nonce: u64,
    /// When the current round started (or starts).
    start: Duration,
    /// Rounds started before the current one.
    round: u8,
    /// Hard: resends done; easy: probes sent.
    sent: usize,
    next: Duration,
    done: bool,
}

impl Spray {
    /// Moves to the next round, [`SPRAY_WINDOW`] after this one started;
    /// false if this was the last.
    fn next_round(&mut self) -> bool {
        if self.round + 1 >= SPRAY_ROUNDS {
            return false;
        }
        self.round += 1;
        self.start += SPRAY_WINDOW;
        self.sent = 0;
        self.next = self.start;
        true
    }
}

/// The shortest time between two probes triggered by the peer's probes.
pub const TRIGGER_GAP: Duration = Duration::from_secs(1);
/// Probes awaiting an ack at most (older ones are forgotten).
const MAX_OUTSTANDING: usize = 64;

/// One end's search for a direct path for a relayed session (sans-IO).
///
/// It probes the peer's candidates on [`PROBE_SCHEDULE`], then every
/// [`PROBE_INTERVAL_MAX`], until a probe is acked; a probe received from
/// the peer adds its source as a candidate and is answered by a probe
/// there at once.
#[derive(Debug, Clone)]
pub struct PathSearch {
    circuit: u64,
    relay: SocketAddr,
    candidates: Vec<SocketAddr>,
    round: usize,
    next: Duration,
    outstanding: Vec<(u64, SocketAddr)>,
    found: Option<SocketAddr>,
    triggered: Option<Duration>,
    spray: Option<Spray>,
}

impl PathSearch {
    /// Starts a search for the session on `circuit` (relayed by `relay`,
    /// which is never a candidate).
    pub fn new(circuit: u64, relay: SocketAddr, now: Duration) -> Self {
        PathSearch {
            circuit,
            relay,
            candidates: Vec::new(),
            round: 0,
            next: now,
            outstanding: Vec::new(),
            found: None,
            triggered: None,
            spray: None,
        }
    }

    /// The direct path found, if any.
    pub fn found(&self) -> Option<SocketAddr> {
        self.found
    }

    /// Takes `addr` as the direct path (the hard side, on the first probe
    /// that reached one of its many sockets); `false` if a path was
    /// already found.
    pub fn settle(&mut self, addr: SocketAddr) -> bool {
        if self.found.is_some() {
            return false;
        }
        self.found = Some(addr);
        true
    }

    /// Plans the many-ports search as `role`, toward the peer's first
    /// candidate (the address its relay sees it at).
    pub fn plan_spray(&mut self, role: SprayRole, now: Duration, rng: &mut SplitMix64) {
        let Some(&target) = self.candidates.first() else {
            return;
        };
        let start = now
            + match role {
                SprayRole::Hard => SPRAY_HARD_AT,
                SprayRole::Easy => SPRAY_EASY_AT,
            };
        self.spray = Some(Spray {
            role,
            target,
            nonce: rng.next_u64(),
            start,
            round: 0,
            sent: 0,
            next: start,
            done: false,
        });
    }

    /// The many-ports steps due at `now`.
    pub fn poll_spray(&mut self, now: Duration, rng: &mut SplitMix64) -> Option<SprayAction> {
        let found = self.found.is_some();
        let circuit = self.circuit;
        let spray = self.spray.as_mut()?;
        if spray.done || now < spray.next {
            return None;
        }
        let probe = |nonce| PathMessage::Probe { circuit, nonce }.encode();
        match spray.role {
            SprayRole::Hard if spray.sent == 0 && !found => {
                spray.sent = 1;
                spray.next = now + Duration::from_secs(1);
                Some(SprayAction::Open {
                    count: SPRAY_SOCKETS,
                    to: spray.target,
                    datagram: probe(spray.nonce),
                })
            }
            SprayRole::Hard if found => {
                spray.done = true;
                None
            }
            SprayRole::Hard if now >= spray.start + SPRAY_WINDOW => {
                // A miss: close these sockets, and open others for the
                // next round at once (it is due now; the easy side starts
                // its next round as long after its first as this side does).
                if !spray.next_round() {
                    spray.done = true;
                }
                Some(SprayAction::Close)
            }
            SprayRole::Hard => {
                spray.sent += 1;
                spray.next = now + Duration::from_secs(1);
                Some(SprayAction::Resend {
                    to: spray.target,
                    datagram: probe(spray.nonce),
                })
            }
            SprayRole::Easy => {
                if found {
                    spray.done = true;
                    return None;
                }
                if spray.sent >= SPRAY_PROBES {
                    if !spray.next_round() {
                        spray.done = true;
                    }
                    return None;
                }
                let n = SPRAY_PER_TICK.min(SPRAY_PROBES - spray.sent);
                spray.sent += n;
                spray.next = now + Duration::from_millis(100);
                let ip = spray.target.ip();
                let probes = (0..n)
                    .map(|_| {
                        let port = 1024 + rng.below(65536 - 1024) as u16;
                        (SocketAddr::new(ip, port), probe(spray.nonce))
                    })
                    .collect();
                Some(SprayAction::Probes(probes))
            }
        }
    }

    /// Adds candidates of the peer (duplicates, the relay's address and
    /// unspecified addresses are left out).
    pub fn add_candidates(&mut self, addrs: &[SocketAddr]) {
        for a in addrs {
            if a.ip().is_unspecified()
                || a.port() == 0
                || *a == self.relay
                || self.candidates.contains(a)
                || self.candidates.len() >= 2 * MAX_CANDIDATES
            {
                continue;
            }
            self.candidates.push(*a);
        }
    }

    /// The peer probed us from `src`: a path from it works, so unless a
    /// path is already found, `src` is probed back at once (at most once
    /// per [`TRIGGER_GAP`]) — its ack proves the way back. Returns that
    /// probe.
    pub fn handle_probe(
        &mut self,
        src: SocketAddr,
        now: Duration,
        rng: &mut SplitMix64,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        self.add_candidates(&[src]);
        if self.found.is_some()
            || !self.candidates.contains(&src)
            || self.triggered.is_some_and(|at| now < at + TRIGGER_GAP)
        {
            return None;
        }
        self.triggered = Some(now);
        Some((src, self.probe(src, rng)))
    }

    fn probe(&mut self, to: SocketAddr, rng: &mut SplitMix64) -> Vec<u8> {
        let nonce = rng.next_u64();
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding.remove(0);
        }
        self.outstanding.push((nonce, to));
        PathMessage::Probe {
            circuit: self.circuit,
            nonce,
        }
        .encode()
    }

    /// When [`Self::poll_probes`] has something to send next.
    pub fn next_wakeup(&self) -> Option<Duration> {
        if self.found.is_some() || self.candidates.is_empty() {
            None
        } else {
            Some(self.next)
        }
    }

    /// The probes due at `now`: `(destination, datagram)`.
    pub fn poll_probes(
        &mut self,
        now: Duration,
        rng: &mut SplitMix64,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        if self.found.is_some() || now < self.next || self.candidates.is_empty() {
            return Vec::new();
        }
        let candidates = self.candidates.clone();
        let out = candidates
            .into_iter()
            .map(|to| (to, self.probe(to, rng)))
            .collect();
        self.round += 1;
        let delay = PROBE_SCHEDULE
            .get(self.round)
            .copied()
            .unwrap_or(PROBE_INTERVAL_MAX)
            .min(PROBE_INTERVAL_MAX);
        self.next = now + delay;
        out
    }

    /// An ack from `src`: the direct path, if it answers a probe this end
    /// sent there.
    pub fn handle_ack(&mut self, src: SocketAddr, nonce: u64) -> Option<SocketAddr> {
        let sprayed = self.spray.as_ref().is_some_and(|s| {
            s.nonce == nonce
                && match s.role {
                    // The easy side probed many ports of this address.
                    SprayRole::Easy => s.target.ip() == src.ip(),
                    SprayRole::Hard => s.target == src,
                }
        });
        if !sprayed {
            let pos = self
                .outstanding
                .iter()
                .position(|&(n, to)| n == nonce && to == src)?;
            self.outstanding.remove(pos);
        }
        if self.found.is_none() {
            self.found = Some(src);
            return Some(src);
        }
        None
    }
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

    const T0: Duration = Duration::ZERO;

    #[test]
    fn messages_round_trip() {
        let c = vec![addr("1.2.3.4:5"), addr("[2001:db8::1]:7")];
        for m in [
            RelayMessage::Connect {
                target: peer(1),
                mapping: Mapping::EndpointIndependent,
                candidates: c.clone(),
            },
            RelayMessage::Offer {
                from: peer(2),
                circuit: 77,
                mapping: Mapping::EndpointDependentRandom,
                candidates: c.clone(),
            },
            RelayMessage::Accept {
                mapping: Mapping::Unknown,
                candidates: vec![],
            },
            RelayMessage::Opened {
                circuit: u64::MAX,
                mapping: Mapping::None,
                candidates: c,
            },
            RelayMessage::Refused {
                reason: "full".into(),
            },
        ] {
            let frame = m.encode();
            let len = RelayMessage::frame_len([frame[0], frame[1]]).unwrap();
            assert_eq!(len, frame.len() - 2);
            assert_eq!(RelayMessage::decode(&frame[2..]).unwrap(), m);
        }
        for m in [
            PathMessage::Probe {
                circuit: 1,
                nonce: 2,
            },
            PathMessage::Ack {
                circuit: 3,
                nonce: 4,
            },
        ] {
            let d = m.encode();
            assert!(PathMessage::is_path(&d));
            assert_eq!(PathMessage::decode(&d).unwrap(), m);
        }
    }

    #[test]
    fn relayed_packets_carry_only_quic() {
        let mut d = relayed_header(9).to_vec();
        d.extend_from_slice(&[0x41, 1, 2, 3]);
        assert_eq!(parse_relayed(&d).unwrap(), (9, &[0x41, 1, 2, 3][..]));
        let mut bad = relayed_header(9).to_vec();
        bad.extend_from_slice(&[0x30, 1, 2]);
        assert_eq!(parse_relayed(&bad), Err(DecodeError::Invalid));
        assert!(parse_relayed(&relayed_header(9)).is_err());
    }

    #[test]
    fn relay_forwards_only_between_the_circuit_ends() {
        let (a, b, x) = (addr("10.0.0.1:1"), addr("10.0.0.2:2"), addr("10.0.0.3:3"));
        let mut t = RelayTable::new(RelayLimits::default(), 1, T0);
        let c = t.open(T0, (peer(1), a), (peer(2), b)).unwrap();
        assert_eq!(t.forward(T0, a, c, 1200), Forward::To(b));
        assert_eq!(t.forward(T0, b, c, 1200), Forward::To(a));
        assert_eq!(t.forward(T0, x, c, 1200), Forward::Unknown);
        assert_eq!(t.forward(T0, a, c + 1, 1200), Forward::Unknown);
        t.close(c);
        assert_eq!(t.forward(T0, a, c, 1200), Forward::Unknown);
        assert_eq!(t.stats().packets, 2);
        assert_eq!(t.stats().unknown, 3);
    }

    #[test]
    fn relay_limits_circuits_and_rate() {
        let limits = RelayLimits {
            max_circuits: 3,
            max_circuits_per_peer: 2,
            circuit_rate: 10_000,
            total_rate: 15_000,
            ..RelayLimits::default()
        };
        let mut t = RelayTable::new(limits, 1, T0);
        let a = addr("10.0.0.1:1");
        let c1 = t.open(T0, (peer(1), a), (peer(2), a)).unwrap();
        t.open(T0, (peer(1), a), (peer(3), a)).unwrap();
        assert_eq!(
            t.open(T0, (peer(1), a), (peer(4), a)),
            Err(RelayRefusal::PeerFull(2))
        );
        t.open(T0, (peer(5), a), (peer(6), a)).unwrap();
        assert_eq!(
            t.open(T0, (peer(7), a), (peer(8), a)),
            Err(RelayRefusal::Full(3))
        );
        // A full second's worth of bytes, then nothing until time passes.
        let sent = (0..20)
            .filter(|_| t.forward(T0, a, c1, 1000) != Forward::OverQuota)
            .count();
        assert_eq!(sent, 10);
        assert_eq!(
            t.forward(Duration::from_millis(500), a, c1, 1000),
            Forward::To(a)
        );
        let off = RelayLimits {
            enabled: false,
            ..limits
        };
        let mut t = RelayTable::new(off, 1, T0);
        assert_eq!(
            t.open(T0, (peer(1), a), (peer(2), a)),
            Err(RelayRefusal::Disabled)
        );
    }

    #[test]
    fn search_probes_on_schedule_and_accepts_only_its_own_acks() {
        let relay = addr("9.9.9.9:1");
        let (p, q) = (addr("1.1.1.1:1"), addr("2.2.2.2:2"));
        let mut s = PathSearch::new(5, relay, T0);
        let mut rng = SplitMix64(3);
        assert_eq!(s.next_wakeup(), None);
        s.add_candidates(&[relay, p, p, addr("0.0.0.0:1")]);
        let probes = s.poll_probes(T0, &mut rng);
        assert_eq!(probes.len(), 1);
        assert!(s.poll_probes(T0, &mut rng).is_empty());
        assert_eq!(s.next_wakeup(), Some(Duration::from_millis(500)));
        let PathMessage::Probe { nonce, circuit } = PathMessage::decode(&probes[0].1).unwrap()
        else {
            panic!("not a probe")
        };
        assert_eq!(circuit, 5);
        // A probe from the peer is probed back at once, once a second.
        let t = Duration::from_millis(100);
        let (to, back) = s.handle_probe(q, t, &mut rng).unwrap();
        assert_eq!(to, q);
        assert!(s.handle_probe(q, t, &mut rng).is_none());
        let PathMessage::Probe {
            nonce: back_nonce, ..
        } = PathMessage::decode(&back).unwrap()
        else {
            panic!("not a probe")
        };
        // Wrong nonce, or the right nonce from elsewhere: ignored.
        assert_eq!(s.handle_ack(p, nonce ^ 1), None);
        assert_eq!(s.handle_ack(q, nonce), None);
        assert_eq!(s.handle_ack(p, back_nonce), None);
        assert_eq!(s.handle_ack(p, nonce), Some(p));
        assert_eq!(s.found(), Some(p));
        // Once found, nothing else settles it.
        assert!(!s.settle(q));
        assert_eq!(s.found(), Some(p));
        assert_eq!(s.next_wakeup(), None);
        assert!(s.poll_probes(Duration::from_secs(100), &mut rng).is_empty());
    }

    #[test]
    fn search_keeps_probing_at_the_slowest_interval() {
        let mut s = PathSearch::new(1, addr("9.9.9.9:1"), T0);
        s.add_candidates(&[addr("1.1.1.1:1")]);
        let mut rng = SplitMix64(1);
        let mut now = T0;
        for _ in 0..20 {
            now = s.next_wakeup().unwrap();
            assert_eq!(s.poll_probes(now, &mut rng).len(), 1);
        }
        assert_eq!(s.next_wakeup().unwrap() - now, PROBE_INTERVAL_MAX);
    }

    #[test]
    fn many_ports_only_where_exactly_one_side_maps_per_destination() {
        use Mapping::*;
        assert_eq!(
            spray_role(EndpointDependentRandom, EndpointIndependent),
            Some(SprayRole::Hard)
        );
        assert_eq!(
            spray_role(None, EndpointDependentSequential),
            Some(SprayRole::Easy)
        );
        assert_eq!(
            spray_role(EndpointDependentRandom, EndpointDependentRandom),
            Option::None
        );
        assert_eq!(
            spray_role(EndpointIndependent, EndpointIndependent),
            Option::None
        );
        assert_eq!(spray_role(Unknown, EndpointDependentRandom), Option::None);
    }

    #[test]
    fn the_easy_side_sprays_a_bounded_number_of_ports_of_one_address() {
        let hard = addr("11.0.2.2:40000");
        let mut s = PathSearch::new(1, addr("9.9.9.9:1"), T0);
        s.add_candidates(&[hard]);
        let mut rng = SplitMix64(7);
        s.plan_spray(SprayRole::Easy, T0, &mut rng);
        assert_eq!(s.poll_spray(T0, &mut rng), None);
        let mut now = SPRAY_EASY_AT;
        let mut sent = Vec::new();
        let mut rounds = Vec::new();
        while now < SPRAY_EASY_AT + SPRAY_WINDOW * 4 {
            match s.poll_spray(now, &mut rng) {
                Some(SprayAction::Probes(p)) => {
                    assert!(p.len() <= SPRAY_PER_TICK);
                    if sent.len() % SPRAY_PROBES == 0 {
                        rounds.push(now);
                    }
                    sent.extend(p);
                }
                Some(other) => panic!("the easy side only probes, not {other:?}"),
                None => {}
            }
            now += Duration::from_millis(100);
        }
        // Each round, a window apart, probes SPRAY_PROBES ports.
        assert_eq!(sent.len(), SPRAY_PROBES * usize::from(SPRAY_ROUNDS));
        assert_eq!(rounds, [SPRAY_EASY_AT, SPRAY_EASY_AT + SPRAY_WINDOW]);
        assert!(sent
            .iter()
            .all(|(a, _)| a.ip() == hard.ip() && a.port() >= 1024));
        // An ack from any of those ports with the spray's nonce is a path.
        let PathMessage::Probe { nonce, .. } = PathMessage::decode(&sent[5].1).unwrap() else {
            panic!("not a probe")
        };
        assert_eq!(s.handle_ack(addr("11.0.2.3:5"), nonce), None);
        assert_eq!(s.handle_ack(sent[5].0, nonce), Some(sent[5].0));
    }

    #[test]
    fn the_hard_side_opens_sockets_resends_then_gives_up() {
        let easy = addr("11.0.2.1:7447");
        let mut s = PathSearch::new(1, addr("9.9.9.9:1"), T0);
        s.add_candidates(&[easy]);
        let mut rng = SplitMix64(7);
        s.plan_spray(SprayRole::Hard, T0, &mut rng);
        let Some(SprayAction::Open { count, to, .. }) = s.poll_spray(SPRAY_HARD_AT, &mut rng)
        else {
            panic!("expected the sockets to open")
        };
        assert_eq!((count, to), (SPRAY_SOCKETS, easy));
        let mut now = SPRAY_HARD_AT;
        let (mut resends, mut opens, mut closes) = (0, 1, 0);
        while now < SPRAY_HARD_AT + SPRAY_WINDOW * 4 {
            now += Duration::from_secs(1);
            match s.poll_spray(now, &mut rng) {
                Some(SprayAction::Resend { .. }) => resends += 1,
                Some(SprayAction::Open { count, to, .. }) => {
                    // A miss: fresh sockets for the next round.
                    assert_eq!((count, to), (SPRAY_SOCKETS, easy));
                    assert_eq!(closes, opens);
                    opens += 1;
                }
                Some(SprayAction::Close) => closes += 1,
                None => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((opens, closes), (SPRAY_ROUNDS, SPRAY_ROUNDS));
        assert!((10..=20).contains(&resends), "{resends}");
    }

    #[test]
    fn a_hit_ends_the_many_ports_search() {
        let easy = addr("11.0.2.1:7447");
        let mut s = PathSearch::new(1, addr("9.9.9.9:1"), T0);
        s.add_candidates(&[easy]);
        let mut rng = SplitMix64(7);
        s.plan_spray(SprayRole::Hard, T0, &mut rng);
        assert!(matches!(
            s.poll_spray(SPRAY_HARD_AT, &mut rng),
            Some(SprayAction::Open { .. })
        ));
        s.found = Some(easy);
        let mut now = SPRAY_HARD_AT;
        while now < SPRAY_HARD_AT + SPRAY_WINDOW * 4 {
            now += Duration::from_secs(1);
            assert_eq!(s.poll_spray(now, &mut rng), None);
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = RelayMessage::decode(&bytes);
            let _ = PathMessage::decode(&bytes);
            let _ = parse_relayed(&bytes);
        }
    }
}
