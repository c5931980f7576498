//! NATs in the simulator, and connecting by key through them.
//!
//! Every node sits behind one router of a [`NatKind`], drawn from a mix
//! (default [`REALISTIC_MIX`]). A router is emulated at the level the
//! traversal depends on: its **mappings** (one external port per internal
//! port for endpoint-independent kinds, a new random port per destination
//! for symmetric ones) and its **filter** (which sources may come in on a
//! mapping: anyone, the addresses contacted, or the exact address and port
//! contacted). CGN is a port-restricted home NAT behind the carrier's
//! port-restricted NAT, which filters and maps the same way as one layer;
//! a port mapping on the home router does not help it.
//!
//! [`connect`] plays the node's connect-by-key procedure over these
//! routers, with the latency model's round trips: a direct dial of the
//! record's address, signalling through the target's home with punches
//! from both sides and the dials `node::traversal` makes, a relay through
//! the home after the 2 s deadline (at once for two per-destination NATs),
//! and then the relayed session's search for a direct path — the
//! many-ports plan comes from `p2pos_proto::relay::PathSearch` itself. The
//! bytes it counts are the real encodings of the signalling, relay and
//! path messages.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use p2pos_proto::reach::Mapping;
use p2pos_proto::relay::{
    spray_role, PathSearch, RelayMessage, SprayAction, SprayRole, SPRAY_EASY_AT, SPRAY_ROUNDS,
    SPRAY_SOCKETS, SPRAY_WINDOW,
};
use p2pos_proto::rng::SplitMix64;
use p2pos_proto::traversal::{encode_punch, Signal};
use p2pos_proto::{Keypair, PeerId};
use serde::Serialize;

/// A router kind, as in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// No NAT, no firewall.
    Public,
    /// A NAT that maps the node's port (UPnP / NAT-PMP / PCP).
    Upnp,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// A new random port per destination, address-and-port filtering.
    Symmetric,
    /// A port-restricted home NAT behind a carrier's NAT.
    Cgn,
}

/// The default mix: most NATs map endpoint-independently, a fifth per
/// destination, some sit behind carrier NAT, a few map ports.
pub const REALISTIC_MIX: [(NatKind, f64); 7] = [
    (NatKind::Public, 0.08),
    (NatKind::Upnp, 0.07),
    (NatKind::FullCone, 0.05),
    (NatKind::Restricted, 0.10),
    (NatKind::PortRestricted, 0.40),
    (NatKind::Symmetric, 0.20),
    (NatKind::Cgn, 0.10),
];

impl NatKind {
    /// Draws a kind from `mix`.
    pub fn draw(mix: &[(NatKind, f64)], rng: &mut SplitMix64) -> NatKind {
        let total: f64 = mix.iter().map(|(_, w)| w).sum();
        let mut u = rng.unit() * total;
        for (k, w) in mix {
            if u < *w {
                return *k;
            }
            u -= w;
        }
        mix.last().map_or(NatKind::Public, |(k, _)| *k)
    }

    /// Whether nodes that never contacted it reach its node's port.
    pub fn reachable(self) -> bool {
        matches!(self, NatKind::Public | NatKind::Upnp | NatKind::FullCone)
    }

    /// The mapping its node detects.
    pub fn mapping(self) -> Mapping {
        match self {
            NatKind::Public => Mapping::None,
            NatKind::Symmetric => Mapping::EndpointDependentRandom,
            _ => Mapping::EndpointIndependent,
        }
    }
}

/// The node's port behind every router.
const NODE_PORT: u16 = 7447;

/// One router's state.
#[derive(Debug, Clone)]
pub struct Nat {
    kind: NatKind,
    ip: u32,
    /// (internal port, destination if per-destination) → external port.
    mappings: HashMap<(u16, Option<SocketAddr>), u16>,
    /// External port → (internal port, sources contacted from it).
    inbound: HashMap<u16, (u16, HashSet<SocketAddr>)>,
}

impl Nat {
    /// A router of `kind` with public address `ip`.
    pub fn new(kind: NatKind, ip: u32) -> Self {
        Nat {
            kind,
            ip,
            mappings: HashMap::new(),
            inbound: HashMap::new(),
        }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.ip)), port)
    }

    /// Sends from internal `port` to `dest`: the source address the
    /// outside sees (the mapping is made, the filter opened).
    pub fn send(&mut self, port: u16, dest: SocketAddr, rng: &mut SplitMix64) -> SocketAddr {
        let per_destination = self.kind == NatKind::Symmetric;
        let key = (port, per_destination.then_some(dest));
        let ext = match self.kind {
            // No NAT, or the node's own port mapped to itself.
            NatKind::Public | NatKind::Upnp if port == NODE_PORT => port,
            NatKind::Public => port,
            _ => {
                let used: HashSet<u16> = self.inbound.keys().copied().collect();
                *self.mappings.entry(key).or_insert_with(|| loop {
                    let p = 1024 + rng.below(65536 - 1024) as u16;
                    if !used.contains(&p) {
                        break p;
                    }
                })
            }
        };
        self.inbound
            .entry(ext)
            .or_insert_with(|| (port, HashSet::new()))
            .1
            .insert(dest);
        self.addr(ext)
    }

    /// Whether a packet from `src` to external `port` gets in.
    pub fn admits(&self, port: u16, src: SocketAddr) -> bool {
        if matches!(self.kind, NatKind::Public) || (self.kind == NatKind::Upnp && port == NODE_PORT)
        {
            return true;
        }
        let Some((_, contacted)) = self.inbound.get(&port) else {
            return false;
        };
        match self.kind {
            NatKind::FullCone => true,
            NatKind::Restricted => contacted.iter().any(|c| c.ip() == src.ip()),
            _ => contacted.contains(&src),
        }
    }

    /// Forgets every mapping (bindings expired between connections).
    pub fn reset(&mut self) {
        self.mappings.clear();
        self.inbound.clear();
    }
}

/// How a connection ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A direct dial of the record's address.
    Direct,
    /// Hole punching through the target's home.
    Punched,
    /// Relayed, then moved to a direct path (many ports or probing).
    Upgraded,
    /// Relayed for good.
    Relayed,
}

/// One connection by key, played out.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The path the session settles on.
    pub path: Path,
    /// From the start (after the record is known) to the session (ms).
    pub connect_ms: u64,
    /// Signalling, relay-setup and path-search bytes sent by both sides
    /// and the home.
    pub signalling_bytes: u64,
}

/// The round trips the procedure needs (ms).
#[derive(Debug, Clone, Copy)]
pub struct Rtts {
    /// Initiator ↔ target.
    pub ab: u64,
    /// Initiator ↔ the target's home.
    pub ah: u64,
    /// Home ↔ target.
    pub hb: u64,
}

fn candidates_frame_len(n: usize) -> u64 {
    // A frame with `n` IPv4 candidates: measured on the real encoding.
    let peer = Keypair::from_seed([7; 32]).peer_id();
    let c: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from(([11, 0, 0, i as u8], 7447)))
        .collect();
    Signal::ConnectRequest {
        target: peer,
        nonce: 1,
        candidates: c,
    }
    .encode()
    .len() as u64
}

fn relay_setup_bytes(peer: PeerId) -> u64 {
    let c = vec![SocketAddr::from(([11, 0, 0, 1], 7447)); 2];
    [
        RelayMessage::Connect {
            target: peer,
            mapping: Mapping::EndpointIndependent,
            candidates: c.clone(),
        },
        RelayMessage::Offer {
            from: peer,
            circuit: 1,
            mapping: Mapping::EndpointIndependent,
            candidates: c.clone(),
        },
        RelayMessage::Accept {
            mapping: Mapping::EndpointIndependent,
            candidates: c.clone(),
        },
        RelayMessage::Opened {
            circuit: 1,
            mapping: Mapping::EndpointIndependent,
            candidates: c,
        },
    ]
    .iter()
    .map(|m| m.encode().len() as u64)
    .sum()
}

/// The node's relay deadline and punch rounds (as in `node::relay` and
/// `node::traversal`).
const RELAY_DEADLINE_MS: u64 = 2000;
const PUNCH_ROUNDS: u64 = 5;
/// Path probes are 19 bytes; a punch 11.
const PATH_PROBE_BYTES: u64 = 19;

/// Plays out a connection from `a` to `b` (whose home is `h`, a reachable
/// node), on fresh router state. `rng` draws ports and nonces.
pub fn connect(
    a: &mut Nat,
    b: &mut Nat,
    h_addr: SocketAddr,
    rtt: Rtts,
    rng: &mut SplitMix64,
) -> Outcome {
    let peer = Keypair::from_seed([9; 32]).peer_id();
    // B keeps a session with its home: its record's address is what the
    // home sees. A reaches the home the same way.
    let b_seen = b.send(NODE_PORT, h_addr, rng);
    let a_seen = a.send(NODE_PORT, h_addr, rng);
    let mut bytes = 0u64;

    // 1. Direct dial of the record's address.
    let a_src = a.send(NODE_PORT, b_seen, rng);
    if b.admits(b_seen.port(), a_src) {
        return Outcome {
            path: Path::Direct,
            connect_ms: rtt.ab,
            signalling_bytes: 0,
        };
    }

    // 2. Signalling through the home: a session with it (one handshake),
    // then request, introduction, answer.
    bytes += 2 * candidates_frame_len(2) + 2 * candidates_frame_len(2);
    let answer_at = rtt.ah + rtt.ah + rtt.hb;
    // B punches A's candidates (what the home sees of A); a per-destination
    // B dials them too.
    let punch = encode_punch(1).len() as u64;
    let b_src = b.send(NODE_PORT, a_seen, rng);
    bytes += PUNCH_ROUNDS * punch * 2;
    let b_dials = b.kind.mapping().is_endpoint_dependent();
    // A punches and dials B's candidates.
    let a_src = a.send(NODE_PORT, b_seen, rng);
    let a_in = b.admits(b_seen.port(), a_src);
    let b_in = b_dials && a.admits(a_seen.port(), b_src);
    if a_in || b_in {
        return Outcome {
            path: Path::Punched,
            connect_ms: answer_at + rtt.ab,
            signalling_bytes: bytes,
        };
    }

    // 3. Relay through the home, then the search for a direct path.
    let hopeless =
        a.kind.mapping().is_endpoint_dependent() && b.kind.mapping().is_endpoint_dependent();
    let relay_at = if hopeless { 0 } else { RELAY_DEADLINE_MS };
    // The relay request (A's session with the home exists by now), the
    // offer and its answer, then the QUIC handshake through the relay.
    let relayed_ms = relay_at.max(rtt.ah) + rtt.ah + rtt.hb + (rtt.ah + rtt.hb);
    bytes += relay_setup_bytes(peer);
    // Candidate probing repeats what punching tried: both sides probe each
    // other's candidates (a few rounds) — counted, and no new path.
    bytes += 6 * 2 * PATH_PROBE_BYTES;
    let role = spray_role(a.kind.mapping(), b.kind.mapping());
    let (hard, easy, easy_seen) = match role {
        Some(SprayRole::Hard) => (a, b, b_seen),
        Some(SprayRole::Easy) => (b, a, a_seen),
        None => {
            return Outcome {
                path: Path::Relayed,
                connect_ms: relayed_ms,
                signalling_bytes: bytes,
            }
        }
    };
    // Each round, the hard side opens fresh sockets toward the easy side's
    // address.
    fn hard_ports(
        hard: &mut Nat,
        easy: SocketAddr,
        round: u64,
        rng: &mut SplitMix64,
    ) -> HashSet<u16> {
        (0..SPRAY_SOCKETS as u16)
            .map(|i| {
                let socket = 20_000 + round as u16 * SPRAY_SOCKETS as u16 + i;
                hard.send(socket, easy, rng).port()
            })
            .collect()
    }
    let mut ports = hard_ports(hard, easy_seen, 0, rng);
    let mut round = 0;
    let hard_ip = hard.addr(0).ip();
    // The easy side's probes, as the real search plans them.
    let mut search = PathSearch::new(1, h_addr, Duration::ZERO);
    search.add_candidates(&[SocketAddr::new(hard_ip, b_seen.port())]);
    search.plan_spray(SprayRole::Easy, Duration::ZERO, rng);
    let mut now = SPRAY_EASY_AT;
    let end = SPRAY_EASY_AT + SPRAY_WINDOW * u32::from(SPRAY_ROUNDS);
    let mut sent = 0u64;
    let mut hit_at = None;
    while hit_at.is_none() && now < end {
        let r = ((now - SPRAY_EASY_AT).as_millis() / SPRAY_WINDOW.as_millis()) as u64;
        if r != round {
            round = r;
            ports = hard_ports(hard, easy_seen, round, rng);
        }
        if let Some(SprayAction::Probes(probes)) = search.poll_spray(now, rng) {
            for (to, _) in probes {
                sent += 1;
                let src = easy.send(NODE_PORT, to, rng);
                if hit_at.is_none() && ports.contains(&to.port()) && hard.admits(to.port(), src) {
                    hit_at = Some(now - SPRAY_EASY_AT);
                }
            }
        }
        now += Duration::from_millis(100);
    }
    // The hard side's probes: one per socket, resent every second while
    // searching.
    let resends = hit_at.map_or(u64::from(SPRAY_ROUNDS) * SPRAY_WINDOW.as_secs(), |t| {
        t.as_secs() + 1
    });
    bytes += (sent + SPRAY_SOCKETS as u64 * resends) * PATH_PROBE_BYTES;
    match hit_at {
        Some(_) => Outcome {
            path: Path::Upgraded,
            connect_ms: relayed_ms,
            signalling_bytes: bytes + 4 * PATH_PROBE_BYTES,
        },
        None => Outcome {
            path: Path::Relayed,
            connect_ms: relayed_ms,
            signalling_bytes: bytes,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(kind: NatKind, ip: u32) -> Nat {
        Nat::new(kind, ip)
    }

    fn outcome(a: NatKind, b: NatKind, seed: u64) -> Outcome {
        let mut rng = SplitMix64(seed);
        let h = SocketAddr::from(([11, 0, 0, 1], 7447));
        let rtt = Rtts {
            ab: 80,
            ah: 60,
            hb: 70,
        };
        connect(&mut nat(a, 1), &mut nat(b, 2), h, rtt, &mut rng)
    }

    #[test]
    fn paths_follow_the_router_kinds() {
        use NatKind::*;
        assert_eq!(outcome(PortRestricted, Public, 1).path, Path::Direct);
        assert_eq!(outcome(Symmetric, Upnp, 1).path, Path::Direct);
        assert_eq!(
            outcome(PortRestricted, PortRestricted, 1).path,
            Path::Punched
        );
        assert_eq!(outcome(Symmetric, Restricted, 1).path, Path::Punched);
        assert_eq!(outcome(Restricted, Symmetric, 1).path, Path::Punched);
        assert_eq!(outcome(Symmetric, Symmetric, 1).path, Path::Relayed);
        // Symmetric against port-restricted filtering: many ports, ≈98% a
        // round, two rounds.
        let upgraded = (0..200)
            .filter(|s| outcome(PortRestricted, Symmetric, *s).path == Path::Upgraded)
            .count();
        assert!(upgraded > 195, "{upgraded}/200");
    }

    #[test]
    fn the_mix_is_drawn_in_proportion() {
        let mut rng = SplitMix64(3);
        let n = 100_000;
        let sym = (0..n)
            .filter(|_| NatKind::draw(&REALISTIC_MIX, &mut rng) == NatKind::Symmetric)
            .count();
        assert!((sym as f64 / n as f64 - 0.20).abs() < 0.01);
    }
}
