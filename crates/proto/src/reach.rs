//! Reachability, from peers only: what a node learns about its own NAT
//! without any server of ours.
//!
//! **Mapping.** Every DHT response carries the address the responder saw
//! the request come from. [`Reachability::observe`] collects those per
//! responder IP: one observed address for every responder means the NAT
//! maps endpoint-independently (or there is no NAT, when the observed
//! address is one of the node's own); different ports mean it maps
//! endpoint-dependently, sequentially when the ports lie close together.
//!
//! **Filtering: dial-back.** The node asks a helper X (a DHT server it
//! talks to) for a dial-back. X answers with a [`Message::DialBackAck`]
//! and
//! - asks a third node Y, which this node never contacted, to send a
//!   [`Message::DialBackProbe`] to the address X saw (`via = THIRD`);
//! - sends a probe itself from another port (`via = ALT_PORT`).
//!
//! A probe from Y means anyone can reach the node unsolicited
//! (endpoint-independent filtering: it is *reachable*, and may serve the
//! DHT); a probe only from X's other port means the NAT filters by address;
//! neither, while X confirmed asking Y, means it filters by address and
//! port. The target of every probe is the address the helper saw, never an
//! address named in a message, so nobody can aim probes at a third party.
//!
//! Wire (overlay types 20–23, after `OVERLAY_TAG | version | type`):
//!
//! ```text
//! DialBackRequest: id u64 | contacted 32 (a 256-bit Bloom filter of the
//!                  IPs the requester sent to; the helper prefers a third
//!                  node outside it)
//! DialBackAck:     id u64 | relayed u8 (0/1)
//! DialBackRelay:   id u64 | target addr
//! DialBackProbe:   id u64 | via u8
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::overlay::{decode_addr, encode_addr, split_header, DecodeError, OVERLAY_VERSION};
use crate::packet::OVERLAY_TAG;

/// Overlay type of a dial-back request.
pub const TYPE_DIAL_BACK_REQUEST: u8 = 20;
/// Overlay type of a dial-back acknowledgement.
pub const TYPE_DIAL_BACK_ACK: u8 = 21;
/// Overlay type of a dial-back relay (helper to third node).
pub const TYPE_DIAL_BACK_RELAY: u8 = 22;
/// Overlay type of a dial-back probe.
pub const TYPE_DIAL_BACK_PROBE: u8 = 23;
/// Length of a dial-back request: padded so that neither the ack nor the
/// probes it causes are larger (no amplification).
pub const DIAL_BACK_REQUEST_LEN: usize = 3 + 8 + 32;

/// A probe sent by the third node.
pub const VIA_THIRD: u8 = 1;
/// A probe sent by the helper from another port.
pub const VIA_ALT_PORT: u8 = 2;

/// A reachability message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Have someone I never contacted send me a probe."
    DialBackRequest {
        /// Request id.
        id: u64,
        /// Bloom filter of the IPs the requester contacted ([`IpFilter`]).
        contacted: IpFilter,
    },
    /// The helper's answer: whether it found a third node to ask.
    DialBackAck {
        /// The request id.
        id: u64,
        /// A third node was asked.
        relayed: bool,
    },
    /// Helper to third node: "send a probe to `target`".
    DialBackRelay {
        /// The request id.
        id: u64,
        /// Where the helper saw the requester.
        target: SocketAddr,
    },
    /// The probe itself.
    DialBackProbe {
        /// The request id.
        id: u64,
        /// [`VIA_THIRD`] or [`VIA_ALT_PORT`].
        via: u8,
    },
}

impl Message {
    /// Encodes the message into a datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![OVERLAY_TAG, OVERLAY_VERSION];
        match self {
            Message::DialBackRequest { id, contacted } => {
                out.push(TYPE_DIAL_BACK_REQUEST);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&contacted.0);
            }
            Message::DialBackAck { id, relayed } => {
                out.push(TYPE_DIAL_BACK_ACK);
                out.extend_from_slice(&id.to_be_bytes());
                out.push(u8::from(*relayed));
            }
            Message::DialBackRelay { id, target } => {
                out.push(TYPE_DIAL_BACK_RELAY);
                out.extend_from_slice(&id.to_be_bytes());
                encode_addr(target, &mut out);
            }
            Message::DialBackProbe { id, via } => {
                out.push(TYPE_DIAL_BACK_PROBE);
                out.extend_from_slice(&id.to_be_bytes());
                out.push(*via);
            }
        }
        out
    }

    /// Whether `datagram` is one of these messages (by its type byte).
    pub fn is_reach(datagram: &[u8]) -> bool {
        matches!(datagram.get(2), Some(20..=23))
    }

    /// Decodes a datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        let (kind, id, body) = split_header(datagram)?;
        let flag = |body: &[u8]| match body {
            [b] => Ok(*b),
            _ => Err(DecodeError::Length),
        };
        match kind {
            TYPE_DIAL_BACK_REQUEST => {
                let contacted: [u8; 32] = body.try_into().map_err(|_| DecodeError::Length)?;
                Ok(Message::DialBackRequest {
                    id,
                    contacted: IpFilter(contacted),
                })
            }
            TYPE_DIAL_BACK_ACK => match flag(body)? {
                0 => Ok(Message::DialBackAck { id, relayed: false }),
                1 => Ok(Message::DialBackAck { id, relayed: true }),
                _ => Err(DecodeError::Invalid),
            },
            TYPE_DIAL_BACK_RELAY => {
                let (target, rest) = decode_addr(body)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Length);
                }
                Ok(Message::DialBackRelay { id, target })
            }
            TYPE_DIAL_BACK_PROBE => match flag(body)? {
                via @ (VIA_THIRD | VIA_ALT_PORT) => Ok(Message::DialBackProbe { id, via }),
                _ => Err(DecodeError::Invalid),
            },
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// A 256-bit Bloom filter of IP addresses (two bits per address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpFilter(pub [u8; 32]);

impl IpFilter {
    fn bits(ip: IpAddr) -> [u8; 2] {
        let bytes = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let h = blake3::hash(&bytes);
        [h.as_bytes()[0], h.as_bytes()[1]]
    }

    /// Adds `ip`.
    pub fn insert(&mut self, ip: IpAddr) {
        for b in Self::bits(ip) {
            self.0[usize::from(b / 8)] |= 1 << (b % 8);
        }
    }

    /// Whether `ip` may be in the filter (no false negatives).
    pub fn may_contain(&self, ip: IpAddr) -> bool {
        Self::bits(ip)
            .iter()
            .all(|b| self.0[usize::from(b / 8)] & (1 << (b % 8)) != 0)
    }
}

/// How the node's NAT maps its port to public addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not known yet (fewer than two responders).
    Unknown,
    /// The node's own address is what peers see: no NAT.
    None,
    /// One public address for every destination.
    EndpointIndependent,
    /// A new port per destination, allocated in sequence.
    EndpointDependentSequential,
    /// A new, random port per destination.
    EndpointDependentRandom,
}

impl Mapping {
    /// The name used in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mapping::Unknown => "unknown",
            Mapping::None => "none",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependentSequential => "endpoint-dependent-sequential",
            Mapping::EndpointDependentRandom => "endpoint-dependent-random",
        }
    }

    /// Whether peers see a different port for every destination.
    pub fn is_endpoint_dependent(&self) -> bool {
        matches!(
            self,
            Mapping::EndpointDependentSequential | Mapping::EndpointDependentRandom
        )
    }
}

/// Which unsolicited datagrams the node's NAT or firewall lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Not measured yet, or no helper could run the test.
    Unknown,
    /// Anyone may send to the mapped address.
    EndpointIndependent,
    /// Only addresses the node sent to (any port of them).
    AddressDependent,
    /// Only the exact addresses and ports the node sent to.
    AddressAndPortDependent,
}

impl Filtering {
    /// The name used in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Filtering::Unknown => "unknown",
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// Timing of the checks.
#[derive(Debug, Clone)]
pub struct ReachConfig {
    /// How long a helper has to make the probes arrive.
    pub attempt_timeout: Duration,
    /// Helpers asked per check.
    pub helpers_per_check: usize,
    /// Time between checks once a result stands.
    pub recheck: Duration,
    /// Longest time before an inconclusive check is retried; the first
    /// retries come sooner (5 s, doubling).
    pub retry: Duration,
    /// Time before looking again when the node knows no helper at all.
    pub no_helper_retry: Duration,
}

impl Default for ReachConfig {
    fn default() -> Self {
        ReachConfig {
            attempt_timeout: Duration::from_secs(3),
            helpers_per_check: 3,
            recheck: Duration::from_secs(30 * 60),
            retry: Duration::from_secs(30),
            no_helper_retry: Duration::from_secs(2),
        }
    }
}

/// Observations kept (one per responder IP).
pub const MAX_OBSERVATIONS: usize = 16;

#[derive(Debug, Clone)]
struct Attempt {
    id: u64,
    helper: SocketAddr,
    sent: Duration,
    relayed: Option<bool>,
    third: bool,
    alt_port: bool,
}

/// What changed, for the node to act on (server mode, peer record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReachEvent {
    /// The verdict on reachability changed.
    Reachable(Option<bool>),
}

/// The reachability state machine of one node (sans-IO).
#[derive(Debug)]
pub struct Reachability {
    config: ReachConfig,
    local: Vec<SocketAddr>,
    /// (responder, observed), newest last, one per responder IP.
    observations: VecDeque<(SocketAddr, SocketAddr)>,
    attempts: Vec<Attempt>,
    next_id: u64,
    next_check: Duration,
    filtering: Filtering,
    reachable: Option<bool>,
    checks: u64,
    /// Inconclusive checks in a row.
    inconclusive: u32,
    /// The router maps the node's port (PCP, NAT-PMP, UPnP).
    port_mapped: bool,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<ReachEvent>,
}

impl Reachability {
    /// A node whose socket is bound at `local` addresses; `seed` makes the
    /// request ids unpredictable.
    pub fn new(config: ReachConfig, local: Vec<SocketAddr>, seed: u64) -> Self {
        Reachability {
            config,
            local,
            observations: VecDeque::new(),
            attempts: Vec::new(),
            next_id: seed | 1,
            next_check: Duration::ZERO,
            filtering: Filtering::Unknown,
            reachable: None,
            checks: 0,
            inconclusive: 0,
            port_mapped: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The node's network changed (addresses, gateway, wake from sleep):
    /// forget what was learned and check again at once.
    pub fn network_changed(&mut self, local: Vec<SocketAddr>) {
        self.local = local;
        self.observations.clear();
        self.attempts.clear();
        self.filtering = Filtering::Unknown;
        self.inconclusive = 0;
        self.next_check = Duration::ZERO;
        self.set_reachable(None);
    }

    /// Whether the router maps the node's port (a port-mapping protocol
    /// said so); a change checks again soon.
    pub fn set_port_mapped(&mut self, now: Duration, mapped: bool) {
        if self.port_mapped != mapped {
            self.port_mapped = mapped;
            self.recheck_soon(now);
        }
    }

    /// Something that can change the verdict happened (e.g. the router
    /// mapped the port): check again as soon as possible, keeping what was
    /// learned.
    pub fn recheck_soon(&mut self, now: Duration) {
        if self.attempts.is_empty() {
            self.next_check = now;
        }
        self.inconclusive = 0;
    }

    /// `responder` saw this node at `observed`.
    pub fn observe(&mut self, responder: SocketAddr, observed: SocketAddr) {
        let ip = responder.ip().to_canonical();
        self.observations
            .retain(|(r, _)| r.ip().to_canonical() != ip);
        self.observations
            .push_back((responder, canonical(observed)));
        while self.observations.len() > MAX_OBSERVATIONS {
            self.observations.pop_front();
        }
    }

    /// The public addresses peers see, most frequent first.
    pub fn observed_addrs(&self) -> Vec<SocketAddr> {
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for (_, o) in &self.observations {
            *counts.entry(*o).or_default() += 1;
        }
        let mut out: Vec<(SocketAddr, usize)> = counts.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.into_iter().map(|(a, _)| a).collect()
    }

    /// The addresses public responders (not on the node's LAN) see, most
    /// frequent first: the node's public addresses.
    pub fn public_addrs(&self) -> Vec<SocketAddr> {
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for (r, o) in &self.observations {
            if !crate::session::is_local_ip(r.ip()) {
                *counts.entry(*o).or_default() += 1;
            }
        }
        let mut out: Vec<(SocketAddr, usize)> = counts.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.into_iter().map(|(a, _)| a).collect()
    }

    /// How the NAT maps, judged from the observations of public responders
    /// (responders on the node's own LAN see its LAN address and say
    /// nothing about the NAT).
    pub fn mapping(&self) -> Mapping {
        let public: Vec<&(SocketAddr, SocketAddr)> = self
            .observations
            .iter()
            .filter(|(r, _)| !crate::session::is_local_ip(r.ip()))
            .collect();
        if public.iter().any(|(_, o)| self.local.contains(o)) {
            return Mapping::None;
        }
        if public.len() < 2 {
            return Mapping::Unknown;
        }
        let first = public[0].1;
        if public.iter().all(|(_, o)| *o == first) {
            return Mapping::EndpointIndependent;
        }
        let mut ports: Vec<u16> = public.iter().map(|(_, o)| o.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        let same_ip = public.iter().all(|(_, o)| o.ip() == first.ip());
        let close = ports.windows(2).all(|w| w[1] - w[0] <= 32);
        if same_ip && close && ports.len() > 1 {
            Mapping::EndpointDependentSequential
        } else {
            Mapping::EndpointDependentRandom
        }
    }

    /// How the NAT filters (from the last dial-back check).
    pub fn filtering(&self) -> Filtering {
        self.filtering
    }

    /// Whether nodes that were never contacted can reach this node: `None`
    /// until a check ran.
    pub fn reachable(&self) -> Option<bool> {
        self.reachable
    }

    /// Dial-back checks started.
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// Whether a check is due; the node then calls [`Self::start_check`]
    /// with helpers.
    pub fn check_due(&self, now: Duration) -> bool {
        self.attempts.is_empty() && now >= self.next_check
    }

    /// Starts a check with up to `helpers_per_check` of `helpers` (DHT
    /// servers this node talks to). With no helper, retries later.
    ///
    /// `contacted` tells helpers which IPs to avoid as third nodes.
    pub fn start_check(&mut self, now: Duration, helpers: &[SocketAddr], contacted: IpFilter) {
        if !self.attempts.is_empty() {
            return;
        }
        if helpers.is_empty() {
            self.next_check = now + self.config.no_helper_retry;
            return;
        }
        self.checks += 1;
        for helper in helpers.iter().take(self.config.helpers_per_check) {
            let id = self.next_id;
            self.next_id = self
                .next_id
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.attempts.push(Attempt {
                id,
                helper: *helper,
                sent: now,
                relayed: None,
                third: false,
                alt_port: false,
            });
            self.transmits
                .push_back((*helper, Message::DialBackRequest { id, contacted }.encode()));
        }
    }

    /// Handles a reachability message addressed to this node as requester
    /// (acks and probes). Returns whether it was one of this node's.
    ///
    /// `contacted_ip`: whether this node ever sent anything to `from`'s IP.
    /// Only a probe from an IP the node never contacted proves that anyone
    /// can reach it; one from a contacted IP (on another port, as every
    /// probe is sent) proves only address-dependent filtering. On a LAN or
    /// loopback there is no NAT in between: any probe there counts.
    pub fn handle_reply(
        &mut self,
        now: Duration,
        from: SocketAddr,
        message: &Message,
        contacted_ip: bool,
    ) -> bool {
        let open = !contacted_ip || crate::session::is_local_ip(from.ip());
        let matched = match *message {
            Message::DialBackAck { id, relayed } => self
                .attempts
                .iter_mut()
                .find(|a| a.id == id && a.helper == canonical(from))
                .map(|a| a.relayed = Some(relayed))
                .is_some(),
            Message::DialBackProbe { id, via } => self
                .attempts
                .iter_mut()
                .find(|a| a.id == id)
                .map(|a| {
                    if via == VIA_THIRD && open
                        || via == VIA_ALT_PORT && crate::session::is_local_ip(from.ip())
                    {
                        a.third = true;
                    } else {
                        a.alt_port = true;
                    }
                })
                .is_some(),
            _ => false,
        };
        if matched {
            self.conclude_if_done(now, false);
        }
        matched
    }

    /// Drives timeouts.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self
            .attempts
            .iter()
            .any(|a| now >= a.sent + self.config.attempt_timeout)
        {
            self.conclude_if_done(now, true);
        }
    }

    /// When the node should call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.attempts.first() {
            Some(a) => Some(a.sent + self.config.attempt_timeout),
            None => Some(self.next_check),
        }
    }

    fn conclude_if_done(&mut self, now: Duration, timed_out: bool) {
        // With no NAT (peers see the node's own address), or a port the
        // router maps, a probe from another port getting in means nothing
        // filters it: in small networks every third node is one the node
        // already contacted.
        let no_nat = self.mapping() == Mapping::None || self.port_mapped;
        let any_third = self
            .attempts
            .iter()
            .any(|a| a.third || (no_nat && a.alt_port));
        if !any_third && !timed_out {
            // Keep waiting: a third-party probe may still come.
            return;
        }
        let any_alt = self.attempts.iter().any(|a| a.alt_port);
        // Silence after one relay may be a lost datagram: a "no" needs two
        // helpers that both found a third node.
        let relayed = self
            .attempts
            .iter()
            .filter(|a| a.relayed == Some(true))
            .count();
        let verdict = if any_third {
            self.filtering = Filtering::EndpointIndependent;
            Some(true)
        } else if relayed >= 2 {
            self.filtering = if any_alt {
                Filtering::AddressDependent
            } else {
                Filtering::AddressAndPortDependent
            };
            Some(false)
        } else {
            // Not enough evidence either way: try again later.
            None
        };
        self.attempts.clear();
        self.next_check = now
            + if verdict.is_some() {
                self.inconclusive = 0;
                self.config.recheck
            } else {
                self.inconclusive = self.inconclusive.saturating_add(1);
                (Duration::from_secs(5) * 2u32.saturating_pow(self.inconclusive - 1).min(64))
                    .min(self.config.retry)
            };
        if verdict.is_some() {
            self.set_reachable(verdict);
        }
    }

    fn set_reachable(&mut self, value: Option<bool>) {
        if self.reachable != value {
            self.reachable = value;
            self.events.push_back(ReachEvent::Reachable(value));
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ReachEvent> {
        self.events.pop_front()
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One relay target gets one probe per this interval at most.
pub const RELAY_TARGET_INTERVAL: Duration = Duration::from_secs(5);
/// Relay targets remembered for that limit.
pub const MAX_RELAY_TARGETS: usize = 256;

/// The helper's and the third node's side: rate limits and the choice of
/// the third node. Bounded: a flood of requests costs a counter, not
/// memory.
#[derive(Debug)]
pub struct DialBackService {
    per_second: u32,
    /// Recent relay targets and when they were probed (bounded).
    probed: VecDeque<(SocketAddr, Duration)>,
    window_start: Duration,
    in_window: u32,
    /// Requests and relays refused by the rate limit.
    pub rate_limited: u64,
    /// Requests served.
    pub served: u64,
}

/// What the helper or third node should send for a message it received.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DialBackActions {
    /// Datagrams to send from the node's port.
    pub send: Vec<(SocketAddr, Vec<u8>)>,
    /// A datagram to send from another (ephemeral) port.
    pub send_from_alt_port: Option<(SocketAddr, Vec<u8>)>,
}

impl DialBackService {
    /// Serves at most `per_second` requests and relays a second.
    pub fn new(per_second: u32) -> Self {
        DialBackService {
            per_second,
            probed: VecDeque::new(),
            window_start: Duration::ZERO,
            in_window: 0,
            rate_limited: 0,
            served: 0,
        }
    }

    fn admit(&mut self, now: Duration) -> bool {
        if now >= self.window_start + Duration::from_secs(1) {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window >= self.per_second {
            self.rate_limited += 1;
            return false;
        }
        self.in_window += 1;
        true
    }

    /// A request from `from`: pick a third node among `candidates` (nodes
    /// this node talks to) that shares no IP with `from`, ask it to probe,
    /// probe from another port, and acknowledge.
    pub fn handle_request(
        &mut self,
        now: Duration,
        from: SocketAddr,
        id: u64,
        contacted: &IpFilter,
        candidates: &[SocketAddr],
    ) -> DialBackActions {
        let mut actions = DialBackActions::default();
        if !self.admit(now) {
            return actions;
        }
        self.served += 1;
        let from = canonical(from);
        // Prefer a third node outside the requester's contacted filter.
        let eligible = |c: &SocketAddr| {
            c.ip() != from.ip() || (is_same_host_network(c.ip(), from.ip()) && *c != from)
        };
        let all: Vec<SocketAddr> = candidates.iter().map(|c| canonical(*c)).collect();
        let third = all
            .iter()
            .find(|c| eligible(c) && !contacted.may_contain(c.ip()))
            .or_else(|| all.iter().find(|c| eligible(c)))
            .copied();
        if let Some(third) = third {
            actions
                .send
                .push((third, Message::DialBackRelay { id, target: from }.encode()));
        }
        actions.send.push((
            from,
            Message::DialBackAck {
                id,
                relayed: third.is_some(),
            }
            .encode(),
        ));
        actions.send_from_alt_port = Some((
            from,
            Message::DialBackProbe {
                id,
                via: VIA_ALT_PORT,
            }
            .encode(),
        ));
        actions
    }

    /// A relay: probe `target` once, from another port (one the target
    /// never sent to, so that only its filtering decides whether the probe
    /// gets in). A probe is never larger than the relay that asks for it,
    /// and one target gets at most one probe per [`RELAY_TARGET_INTERVAL`],
    /// so relays cannot be used to flood anyone.
    pub fn handle_relay(&mut self, now: Duration, id: u64, target: SocketAddr) -> DialBackActions {
        let mut actions = DialBackActions::default();
        let target = canonical(target);
        self.probed
            .retain(|(_, at)| now < *at + RELAY_TARGET_INTERVAL);
        if self.probed.iter().any(|(t, _)| *t == target) {
            self.rate_limited += 1;
            return actions;
        }
        if !self.admit(now) {
            return actions;
        }
        if self.probed.len() >= MAX_RELAY_TARGETS {
            self.probed.pop_front();
        }
        self.probed.push_back((target, now));
        actions.send_from_alt_port = Some((
            target,
            Message::DialBackProbe { id, via: VIA_THIRD }.encode(),
        ));
        actions
    }
}

/// Loopback and LAN test networks put every node on one IP: there, another
/// port of the same IP is the best "third node" there is.
fn is_same_host_network(a: IpAddr, b: IpAddr) -> bool {
    a == b && (a.is_loopback() || crate::session::is_local_ip(a))
}

/// Whether a node sits behind carrier-grade NAT (`None`: cannot tell),
/// from its interface addresses, the external address its own router
/// reports for a port mapping (PCP, NAT-PMP, UPnP IGD), and the public
/// addresses peers see it at:
///
/// - an interface address in the shared space `100.64.0.0/10` (RFC 6598):
///   the host sits on a carrier's network itself (mobile, some ISPs);
/// - a router that reports a shared or private external address, or one
///   that peers do not see: another NAT sits beyond the home router;
/// - a router whose external address is what peers see, or an interface
///   address peers see: no carrier NAT.
pub fn judge_cgn(
    local: &[IpAddr],
    router_external: Option<IpAddr>,
    observed: &[IpAddr],
) -> Option<bool> {
    let shared = |ip: &IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64,
        IpAddr::V6(_) => false,
    };
    let private = |ip: &IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_private() || shared(&IpAddr::V4(v4)),
        IpAddr::V6(_) => false,
    };
    let seen = |ip: &IpAddr| {
        observed
            .iter()
            .any(|o| o.to_canonical() == ip.to_canonical())
    };
    if local.iter().any(shared) {
        return Some(true);
    }
    if let Some(ext) = router_external {
        if private(&ext) {
            return Some(true);
        }
        if !observed.is_empty() {
            return Some(!seen(&ext));
        }
    }
    if local.iter().any(|ip| ip.is_ipv4() && seen(ip)) {
        return Some(false);
    }
    None
}

/// Whether a carrier-grade NAT sits on the path to a peer (`None`: cannot
/// tell), from the routers that answered datagrams sent with TTL 1, 2, …
/// (`None` for a hop that did not answer):
///
/// - a router in the shared space `100.64.0.0/10` (RFC 6598) before the
///   first public one: a carrier NAT;
/// - the first public router reached with every earlier hop answering and
///   only the first (the home router) private: no carrier NAT;
/// - anything else (a silent hop, private routers beyond the home router,
///   no public router at all): cannot tell.
pub fn judge_cgn_path(hops: &[Option<IpAddr>]) -> Option<bool> {
    let mut unclear = false;
    for (i, hop) in hops.iter().enumerate() {
        let Some(ip) = hop else {
            unclear = true;
            continue;
        };
        let IpAddr::V4(v4) = ip.to_canonical() else {
            return None;
        };
        let o = v4.octets();
        if o[0] == 100 && (o[1] & 0xc0) == 64 {
            return Some(true);
        }
        let private = v4.is_private() || v4.is_loopback() || v4.is_link_local();
        if !private {
            return (!unclear).then_some(false);
        }
        if i > 0 {
            unclear = true;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn carrier_grade_nat_is_judged_from_the_routers_on_the_path() {
        use super::judge_cgn_path;
        let hop = |s: &str| -> Option<std::net::IpAddr> { Some(s.parse().unwrap()) };
        // Home router, then the carrier's NAT.
        assert_eq!(
            judge_cgn_path(&[hop("192.168.1.1"), hop("100.64.3.1"), hop("8.8.4.1")]),
            Some(true)
        );
        // Home router, then the ISP's public router.
        assert_eq!(
            judge_cgn_path(&[hop("192.168.1.1"), hop("84.1.2.3")]),
            Some(false)
        );
        // A silent hop or an ISP's private router hides what follows.
        assert_eq!(
            judge_cgn_path(&[hop("192.168.1.1"), None, hop("84.1.2.3")]),
            None
        );
        assert_eq!(
            judge_cgn_path(&[hop("192.168.1.1"), hop("10.0.0.1"), hop("84.1.2.3")]),
            None
        );
        // A carrier NAT is a carrier NAT even after a silent hop.
        assert_eq!(
            judge_cgn_path(&[hop("192.168.1.1"), None, hop("100.100.0.1")]),
            Some(true)
        );
        assert_eq!(judge_cgn_path(&[None, None]), None);
        assert_eq!(judge_cgn_path(&[]), None);
    }

    #[test]
    fn carrier_grade_nat_is_judged_from_what_the_node_knows() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let home = [ip("192.168.1.10")];
        // On the carrier's network itself.
        assert_eq!(judge_cgn(&[ip("100.72.3.4")], None, &[]), Some(true));
        // The router's external address is shared, private or not what
        // peers see.
        assert_eq!(judge_cgn(&home, Some(ip("100.64.0.9")), &[]), Some(true));
        assert_eq!(judge_cgn(&home, Some(ip("10.1.2.3")), &[]), Some(true));
        assert_eq!(
            judge_cgn(&home, Some(ip("203.0.113.5")), &[ip("198.51.100.7")]),
            Some(true)
        );
        assert_eq!(
            judge_cgn(&home, Some(ip("203.0.113.5")), &[ip("203.0.113.5")]),
            Some(false)
        );
        // A public interface address peers see: no NAT at all.
        assert_eq!(
            judge_cgn(&[ip("203.0.113.5")], None, &[ip("203.0.113.5")]),
            Some(false)
        );
        // Behind a router that maps nothing: cannot tell.
        assert_eq!(judge_cgn(&home, None, &[ip("203.0.113.5")]), None);
        assert_eq!(judge_cgn(&home, Some(ip("203.0.113.5")), &[]), None);
    }

    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn messages_round_trip_and_never_amplify() {
        let target = addr("[2001:db8::1]:65535");
        let msgs = [
            Message::DialBackRequest {
                id: 7,
                contacted: IpFilter([0xa5; 32]),
            },
            Message::DialBackAck {
                id: 7,
                relayed: true,
            },
            Message::DialBackRelay { id: 7, target },
            Message::DialBackProbe {
                id: 7,
                via: VIA_THIRD,
            },
            Message::DialBackProbe {
                id: 7,
                via: VIA_ALT_PORT,
            },
        ];
        for m in &msgs {
            let bytes = m.encode();
            assert!(Message::is_reach(&bytes));
            assert_eq!(Message::decode(&bytes).as_ref(), Ok(m));
            assert!(
                bytes.len() <= DIAL_BACK_REQUEST_LEN,
                "{m:?} is larger than a request"
            );
        }
        let mut short = Message::DialBackRequest {
            id: 1,
            contacted: IpFilter::default(),
        }
        .encode();
        short.pop();
        assert_eq!(Message::decode(&short), Err(DecodeError::Length));
        let bad_via = [
            OVERLAY_TAG,
            OVERLAY_VERSION,
            TYPE_DIAL_BACK_PROBE,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            9,
        ];
        assert_eq!(Message::decode(&bad_via), Err(DecodeError::Invalid));
    }

    fn mapping_of(observed: &[(&str, &str)]) -> Mapping {
        let mut r = Reachability::new(ReachConfig::default(), vec![addr("192.168.1.10:7447")], 1);
        for (responder, o) in observed {
            r.observe(addr(responder), addr(o));
        }
        r.mapping()
    }

    #[test]
    fn mapping_is_classified_from_observations() {
        assert_eq!(
            mapping_of(&[("11.0.0.1:1", "11.0.2.1:7447")]),
            Mapping::Unknown
        );
        assert_eq!(
            mapping_of(&[
                ("11.0.0.1:1", "11.0.2.1:7447"),
                ("11.0.0.2:1", "11.0.2.1:7447")
            ]),
            Mapping::EndpointIndependent
        );
        assert_eq!(
            mapping_of(&[
                ("11.0.0.1:1", "11.0.2.1:40001"),
                ("11.0.0.2:1", "11.0.2.1:40002"),
                ("11.0.0.3:1", "11.0.2.1:40003")
            ]),
            Mapping::EndpointDependentSequential
        );
        assert_eq!(
            mapping_of(&[
                ("11.0.0.1:1", "11.0.2.1:1234"),
                ("11.0.0.2:1", "11.0.2.1:50321")
            ]),
            Mapping::EndpointDependentRandom
        );
        // Seen at its own address by a public responder: no NAT.
        assert_eq!(
            mapping_of(&[("11.0.0.1:1", "192.168.1.10:7447")]),
            Mapping::None
        );
        // LAN responders say nothing about the NAT.
        assert_eq!(
            mapping_of(&[
                ("192.168.1.11:7447", "192.168.1.10:7447"),
                ("192.168.1.12:7447", "192.168.1.10:7447")
            ]),
            Mapping::Unknown
        );
    }

    #[test]
    fn one_observation_per_responder_ip_and_bounded() {
        let mut r = Reachability::new(ReachConfig::default(), vec![], 1);
        for i in 0..100u32 {
            r.observe(
                addr(&format!("11.0.{}.{}:1", i / 200, i % 200)),
                addr("11.0.2.1:7"),
            );
            r.observe(
                addr(&format!("11.0.{}.{}:2", i / 200, i % 200)),
                addr("11.0.2.1:7"),
            );
        }
        assert_eq!(r.observations.len(), MAX_OBSERVATIONS);
        assert_eq!(r.observed_addrs(), vec![addr("11.0.2.1:7")]);
    }

    /// Runs one check: helpers ack with `acks`; a third node's probe comes
    /// (from a contacted IP or not) if `third` is set; helpers' other-port
    /// probes come if `alt`.
    fn check(acks: &[bool], third: Option<bool>, alt: bool) -> (Option<bool>, Filtering) {
        let mut r = Reachability::new(ReachConfig::default(), vec![], 1);
        let helpers = [
            addr("11.0.1.1:7447"),
            addr("11.0.1.2:7447"),
            addr("11.0.1.3:7447"),
        ];
        let t0 = Duration::from_secs(100);
        assert!(r.check_due(t0));
        r.start_check(t0, &helpers[..acks.len()], IpFilter::default());
        let sent: Vec<(SocketAddr, Vec<u8>)> = std::iter::from_fn(|| r.poll_transmit()).collect();
        assert_eq!(sent.len(), acks.len());
        for ((to, bytes), relayed) in sent.iter().zip(acks) {
            let Ok(Message::DialBackRequest { id, .. }) = Message::decode(bytes) else {
                panic!()
            };
            // After a third-party probe the check is over: later acks match nothing.
            let ack = Message::DialBackAck {
                id,
                relayed: *relayed,
            };
            r.handle_reply(t0, *to, &ack, true);
            if alt {
                let probe = Message::DialBackProbe {
                    id,
                    via: VIA_ALT_PORT,
                };
                r.handle_reply(t0, addr("11.0.1.1:50000"), &probe, true);
            }
            if let Some(contacted) = third {
                let probe = Message::DialBackProbe { id, via: VIA_THIRD };
                r.handle_reply(t0, addr("11.0.9.9:40000"), &probe, contacted);
            }
        }
        r.handle_timeout(t0 + Duration::from_secs(5));
        assert!(!r.check_due(t0 + Duration::from_secs(6)));
        (r.reachable(), r.filtering())
    }

    #[test]
    fn dial_back_decides_reachability_and_filtering() {
        use Filtering::*;
        assert_eq!(
            check(&[true, true], Some(false), true),
            (Some(true), EndpointIndependent)
        );
        // A third node this node once contacted proves less.
        assert_eq!(
            check(&[true, true], Some(true), false),
            (Some(false), AddressDependent)
        );
        assert_eq!(
            check(&[true, true], None, true),
            (Some(false), AddressDependent)
        );
        assert_eq!(
            check(&[true, true], None, false),
            (Some(false), AddressAndPortDependent)
        );
        // One relayed helper's silence is no proof.
        assert_eq!(check(&[true, false], None, true), (None, Unknown));
        // No helper found a third node and nothing came: no verdict.
        assert_eq!(check(&[false, false], None, false), (None, Unknown));
    }

    /// Starts a check with one helper and delivers one probe for it from
    /// `from` (an IP the node contacted or not); returns the verdict.
    fn one_probe(r: &mut Reachability, from: &str, via: u8, contacted: bool) -> Option<bool> {
        r.start_check(
            Duration::ZERO,
            &[addr("11.0.1.2:7447")],
            IpFilter::default(),
        );
        let (_, bytes) = r.poll_transmit().unwrap();
        let Ok(Message::DialBackRequest { id, .. }) = Message::decode(&bytes) else {
            panic!()
        };
        let probe = Message::DialBackProbe { id, via };
        r.handle_reply(Duration::ZERO, addr(from), &probe, contacted);
        r.reachable()
    }

    #[test]
    fn without_nat_a_probe_from_another_port_proves_reachability() {
        let mut r = Reachability::new(ReachConfig::default(), vec![addr("11.0.1.1:7447")], 1);
        r.observe(addr("11.0.1.2:7447"), addr("11.0.1.1:7447"));
        assert_eq!(
            one_probe(&mut r, "11.0.1.3:40000", VIA_THIRD, true),
            Some(true)
        );
    }

    #[test]
    fn with_a_mapped_port_a_probe_from_another_port_proves_reachability() {
        let mut r = Reachability::new(ReachConfig::default(), vec![addr("192.168.1.10:7447")], 1);
        r.set_port_mapped(Duration::ZERO, true);
        assert!(r.check_due(Duration::ZERO));
        assert_eq!(
            one_probe(&mut r, "11.0.1.3:40000", VIA_THIRD, true),
            Some(true)
        );
    }

    #[test]
    fn probes_on_a_lan_or_loopback_prove_reachability() {
        let mut r = Reachability::new(ReachConfig::default(), vec![], 1);
        assert_eq!(
            one_probe(&mut r, "127.0.0.1:40000", VIA_ALT_PORT, true),
            Some(true)
        );
    }

    #[test]
    fn acks_from_the_wrong_address_and_unknown_ids_are_ignored() {
        let mut r = Reachability::new(ReachConfig::default(), vec![], 1);
        r.start_check(
            Duration::ZERO,
            &[addr("11.0.1.1:7447")],
            IpFilter::default(),
        );
        let (_, bytes) = r.poll_transmit().unwrap();
        let Ok(Message::DialBackRequest { id, .. }) = Message::decode(&bytes) else {
            panic!()
        };
        let ack = Message::DialBackAck { id, relayed: true };
        assert!(!r.handle_reply(Duration::ZERO, addr("11.0.6.6:7447"), &ack, true));
        let probe = Message::DialBackProbe {
            id: id ^ 1,
            via: VIA_THIRD,
        };
        assert!(!r.handle_reply(Duration::ZERO, addr("11.0.9.9:7447"), &probe, false));
        r.handle_timeout(Duration::from_secs(10));
        assert_eq!(r.reachable(), None);
    }

    #[test]
    fn helper_picks_a_third_node_on_another_ip_and_rate_limits() {
        let mut s = DialBackService::new(2);
        let from = addr("11.0.2.1:7447");
        let candidates = [addr("11.0.2.1:9999"), addr("11.0.1.5:7447")];
        let a = s.handle_request(Duration::ZERO, from, 9, &IpFilter::default(), &candidates);
        let relay = Message::DialBackRelay {
            id: 9,
            target: from,
        }
        .encode();
        assert_eq!(a.send[0], (addr("11.0.1.5:7447"), relay));
        assert_eq!(a.send[1].0, from);
        assert_eq!(a.send_from_alt_port.as_ref().unwrap().0, from);
        let lonely = s.handle_request(
            Duration::ZERO,
            from,
            10,
            &IpFilter::default(),
            &[addr("11.0.2.1:9999")],
        );
        let ack = Message::DialBackAck {
            id: 10,
            relayed: false,
        };
        assert_eq!(Message::decode(&lonely.send[0].1), Ok(ack));
        assert_eq!(
            s.handle_request(Duration::ZERO, from, 11, &IpFilter::default(), &candidates),
            DialBackActions::default()
        );
        assert_eq!(s.rate_limited, 1);
        // The third node probes from another port, once per target per interval.
        let probes = |a: DialBackActions| a.send_from_alt_port.into_iter().count();
        assert_eq!(probes(s.handle_relay(Duration::from_secs(2), 1, from)), 1);
        assert_eq!(probes(s.handle_relay(Duration::from_secs(3), 2, from)), 0);
        assert_eq!(probes(s.handle_relay(Duration::from_secs(8), 3, from)), 1);
    }

    #[test]
    fn helper_avoids_third_nodes_the_requester_contacted() {
        let mut s = DialBackService::new(10);
        let from = addr("11.0.2.1:7447");
        let mut contacted = IpFilter::default();
        contacted.insert(addr("11.0.1.5:7447").ip());
        assert!(contacted.may_contain("11.0.1.5".parse().unwrap()));
        let candidates = [addr("11.0.1.5:7447"), addr("11.0.1.6:7447")];
        let a = s.handle_request(Duration::ZERO, from, 1, &contacted, &candidates);
        assert_eq!(a.send[0].0, addr("11.0.1.6:7447"));
        // Everyone contacted: any third node is still better than none.
        let a = s.handle_request(Duration::ZERO, from, 2, &contacted, &candidates[..1]);
        assert_eq!(a.send[0].0, addr("11.0.1.5:7447"));
    }

    #[test]
    fn network_change_forgets_the_verdict() {
        let mut r = Reachability::new(ReachConfig::default(), vec![], 1);
        r.set_reachable(Some(true));
        r.observe(addr("11.0.0.1:1"), addr("11.0.2.1:7"));
        let _ = r.poll_event();
        r.network_changed(vec![addr("10.0.0.2:7447")]);
        assert_eq!(r.reachable(), None);
        assert_eq!(r.poll_event(), Some(ReachEvent::Reachable(None)));
        assert!(r.observed_addrs().is_empty());
        assert!(r.check_due(Duration::ZERO));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(&bytes);
            let mut tagged = vec![OVERLAY_TAG, OVERLAY_VERSION];
            tagged.extend_from_slice(&bytes);
            let _ = Message::decode(&tagged);
        }
    }
}
