//! What `p2pos status` and `GET /v1/status` show. Field names are stable:
//! later versions add fields and never rename these.

use serde::{Deserialize, Serialize};

/// A snapshot of the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's peer ID.
    pub peer_id: String,
    /// p2pos version.
    pub version: String,
    /// `public` or `private:<network id>`.
    pub network: String,
    /// Addresses peers can dial.
    pub listen_addrs: Vec<String>,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Live sessions.
    pub sessions: Vec<SessionStatus>,
    /// Services registered on this node.
    pub services: Vec<ServiceStatus>,
    /// Exposed services and forwarded ports.
    pub tunnels: TunnelsStatus,
    /// The DHT: routing table size, traffic, the published peer record.
    pub dht: Option<crate::dht::DhtStatus>,
    /// Whether nodes this one never contacted can reach it (null: not known
    /// yet; decided by dial-backs through DHT peers).
    pub reachable: Option<bool>,
    /// Reachable nodes this one keeps sessions with so that peers can
    /// reach it through them (only while it is not reachable itself).
    pub homes: Vec<crate::dht::HomeStatus>,
    /// The NAT as peers see it: mapping, filtering, observed addresses.
    pub nat: Option<crate::dht::ReachStatus>,
    /// Seconds between keepalives on idle sessions.
    pub keepalive_interval_s: f64,
    /// The port mapping the router gave (PCP / NAT-PMP).
    pub port_mapping: crate::portmap::PortMappingStatus,
    /// How the keepalive interval was found, and the measurement behind it.
    pub keepalive: crate::keepalive::KeepaliveStatus,
    /// LAN discovery: mDNS state and the peers found on the LAN.
    pub lan: crate::lan::LanStatus,
    /// What this node relays for others, and its own relayed sessions.
    pub relay: RelayStatus,
    /// Counters, including every kind of dropped input.
    pub counters: CountersStatus,
}

/// Relay load and relayed sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Whether this node relays for others.
    pub enabled: bool,
    /// Circuits it relays now.
    pub circuits: usize,
    /// Circuits opened since start.
    pub circuits_opened: u64,
    /// Circuit requests refused (limits, relaying off).
    pub circuits_refused: u64,
    /// Bytes forwarded for others since start.
    pub bytes_relayed: u64,
    /// Packets forwarded for others since start.
    pub packets_relayed: u64,
    /// Packets dropped for a rate limit.
    pub over_quota_dropped: u64,
    /// Packets for no circuit of this relay.
    pub unknown_dropped: u64,
    /// Limits: KiB/s per circuit and in total, circuits in total and per peer.
    pub circuit_kib_s: u64,
    /// KiB/s of all circuits together.
    pub total_kib_s: u64,
    /// Circuits at once, in total.
    pub max_circuits: usize,
    /// Circuits at once involving one peer.
    pub max_circuits_per_peer: usize,
    /// This node's own sessions running through a relay now.
    pub relayed_sessions: usize,
    /// This node's relayed sessions that moved to a direct path.
    pub upgraded_to_direct: u64,
    /// Relayed packets of this node's own sessions received / sent.
    pub own_packets_in: u64,
    /// Relayed packets of this node's own sessions sent.
    pub own_packets_out: u64,
}

/// One session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The peer's ID.
    pub peer: String,
    /// How the session reaches the peer: `lan`, `direct` or `punched`
    /// (later also `relayed:<relay-peer-id>`).
    pub path: String,
    /// Smoothed round-trip time.
    pub rtt_ms: f64,
    /// The peer's address.
    pub remote_addr: String,
    /// `outbound` (this node dialed) or `inbound`.
    pub direction: String,
    /// Seconds since the session was established.
    pub age_s: u64,
    /// UDP bytes sent on this session.
    pub bytes_sent: u64,
    /// UDP bytes received on this session.
    pub bytes_received: u64,
}

/// A registered service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its name.
    pub name: String,
    /// What it offers.
    pub description: String,
    /// Who sees it in this node's service list.
    pub visibility: crate::services::Visibility,
}

/// Tunnels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelsStatus {
    /// Local TCP services offered to peers.
    pub exposes: Vec<ExposeStatus>,
    /// Local ports forwarded to peers' services.
    pub forwards: Vec<ForwardStatus>,
}

/// One exposed service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExposeStatus {
    /// Id for `DELETE /v1/exposes/{id}`.
    pub id: u64,
    /// The service name.
    pub service: String,
    /// The local TCP target.
    pub target: String,
    /// Connections carried so far.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
}

/// One forwarded port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// Id for `DELETE /v1/forwards/{id}`.
    pub id: u64,
    /// The local TCP address listened on.
    pub listen: String,
    /// The peer.
    pub peer: String,
    /// The peer's service.
    pub service: String,
    /// Connections carried so far.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
}

/// Counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CountersStatus {
    /// Sessions established.
    pub sessions_opened: u64,
    /// Sessions closed because a twin session won.
    pub duplicate_sessions_closed: u64,
    /// Incoming handshakes refused for load.
    pub handshakes_refused: u64,
    /// Streams peers opened.
    pub streams_in: u64,
    /// Streams this node opened.
    pub streams_out: u64,
    /// Incoming streams refused (no service, busy).
    pub streams_refused: u64,
    /// Incoming streams with an invalid header.
    pub bad_stream_headers: u64,
    /// Datagrams for no service or a full queue.
    pub datagrams_dropped: u64,
    /// Overlay datagrams received.
    pub overlay_received: u64,
    /// Overlay datagrams dropped: queue full.
    pub overlay_queue_full: u64,
    /// Overlay datagrams that did not decode.
    pub overlay_malformed: u64,
    /// Probes answered.
    pub probes_answered: u64,
    /// Probes dropped by the rate limit.
    pub probes_rate_limited: u64,
    /// Punch datagrams received (hole punching).
    pub punches_received: u64,
    /// Datagrams with an unknown first byte.
    pub unknown_datagrams_dropped: u64,
    /// Datagrams from nodes of another network.
    pub foreign_network_dropped: u64,
    /// Private frames with a bad tag.
    pub bad_frame_dropped: u64,
}
