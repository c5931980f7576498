//! The DHT in the node: one task owns the sans-IO `p2pos_proto::dht::Dht`
//! and drives it with the overlay's DHT datagrams, tokio timers and
//! commands from the node.
//!
//! The task also keeps the node's **peer record** in the DHT: a record named
//! `peer`, signed by the node, whose value lists the addresses it can be
//! reached at (its listen addresses and the address DHT peers see it at).
//! It is published once the node has contacts, again whenever what it
//! says changes (addresses, homes, the NAT verdict), and re-signed every
//! 30 minutes (it expires after an hour); see `PeerRecordPublisher`.
//!
//! And it runs the node's **reachability** checks (`p2pos_proto::reach`):
//! observed addresses from DHT responses classify the NAT's mapping,
//! dial-backs through DHT peers decide filtering and whether the node is
//! reachable, and in `auto` mode that verdict makes the node a DHT server
//! or a client. It serves other nodes' dial-back requests too. Every
//! [`NETWORK_CHECK`] it looks at the host's addresses (and at jumps of the
//! clock, i.e. sleep and wake): on a change it forgets what it learned,
//! checks again and republishes the peer record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use p2pos_net::overlay::Overlay;
use p2pos_proto::dht::{record_key, Dht, DhtConfig, DhtEvent, NodeId, QueryId, SignedRecord};
use p2pos_proto::network::NetworkKey;
use p2pos_proto::reach::{self, DialBackService, ReachConfig, ReachEvent, Reachability};
use p2pos_proto::traversal::{Home, PeerInfo};
use p2pos_proto::{Keypair, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// Name of the peer record.
pub const PEER_RECORD: &[u8] = b"peer";
/// How long a published record lives.
const RECORD_TTL: Duration = Duration::from_secs(3600);
/// How long to wait before publishing again after a put stored nowhere.
const PEER_RECORD_RETRY: Duration = Duration::from_secs(10);
/// How often the peer record is re-signed.
const PEER_RECORD_REFRESH: Duration = Duration::from_secs(1800);

/// Keeps the node's peer record in the DHT: one put at a time, a new one
/// when the value changes (once the put in flight ends) and every
/// [`PEER_RECORD_REFRESH`], again after [`PEER_RECORD_RETRY`] when a put
/// stored nowhere. The task asks it after every event and wakes at
/// [`PeerRecordPublisher::wake`], so a change never waits for unrelated
/// traffic.
#[derive(Debug, Default)]
struct PeerRecordPublisher {
    /// The value last put, and when.
    published: Option<(Vec<u8>, Duration)>,
    /// The sequence of the last put.
    seq: u64,
    /// The put in flight.
    put: Option<QueryId>,
    /// The last sequence some node confirmed storing.
    stored_seq: u64,
    /// No put before this (after one that stored nowhere).
    retry_at: Duration,
}

impl PeerRecordPublisher {
    /// The record to put now for `value`, if one is due; the caller puts
    /// it and hands the query to [`Self::started`].
    fn due(&mut self, keypair: &Keypair, now: Duration, value: Vec<u8>) -> Option<SignedRecord> {
        if self.put.is_some() || now < self.retry_at {
            return None;
        }
        let stale = self
            .published
            .as_ref()
            .is_none_or(|(v, at)| *v != value || now.saturating_sub(*at) >= PEER_RECORD_REFRESH);
        if !stale {
            return None;
        }
        let seq = self.seq.max(now.as_millis() as u64);
        let expires = (now + RECORD_TTL).as_secs();
        let record = SignedRecord::sign(keypair, PEER_RECORD, seq, expires, &value).ok()?;
        self.seq = seq;
        self.published = Some((value, now));
        Some(record)
    }

    fn started(&mut self, query: QueryId) {
        self.put = Some(query);
    }

    /// Takes `event` if it ends this publisher's put.
    fn on_event(&mut self, now: Duration, event: &DhtEvent<SocketAddr>) -> bool {
        let DhtEvent::PutDone { query, stored, .. } = event else {
            return false;
        };
        if self.put != Some(*query) {
            return false;
        }
        self.put = None;
        if *stored > 0 {
            self.stored_seq = self.seq;
            tracing::debug!(seq = self.seq, stored, "peer record stored");
        } else {
            self.published = None;
            self.retry_at = now + PEER_RECORD_RETRY;
            tracing::debug!(
                seq = self.seq,
                "peer record stored nowhere: publishing again in {PEER_RECORD_RETRY:?}"
            );
        }
        true
    }

    /// When the task must run again for the record (a retry or the
    /// refresh), if no put is in flight and that time is still ahead (a
    /// record due while the node has no contacts waits for them, not for
    /// a timer that would fire at once, over and over).
    fn wake(&self, now: Duration) -> Option<Duration> {
        if self.put.is_some() {
            return None;
        }
        let at = match &self.published {
            None => self.retry_at,
            Some((_, at)) => *at + PEER_RECORD_REFRESH,
        };
        (at > now).then_some(at)
    }

    /// Forgets what was put: the next call of [`Self::due`] publishes.
    fn republish(&mut self) {
        self.published = None;
    }
}

/// How often the task looks for network changes.
pub const NETWORK_CHECK: Duration = Duration::from_secs(10);
/// Dial-back requests and relays this node serves per second at most.
const DIAL_BACKS_PER_SECOND: u32 = 20;

/// IPs this node sent anything to (bounded, oldest forgotten first): a
/// dial-back probe from one of them says less than one from a stranger.
#[derive(Debug, Default)]
pub struct ContactedIps {
    order: std::collections::VecDeque<std::net::IpAddr>,
    set: std::collections::HashSet<std::net::IpAddr>,
}

/// IPs remembered in [`ContactedIps`].
pub const CONTACTED_IPS: usize = 4096;

impl ContactedIps {
    /// Notes that this node sent to `ip`.
    pub fn note(&mut self, ip: std::net::IpAddr) {
        let ip = ip.to_canonical();
        if self.set.insert(ip) {
            self.order.push_back(ip);
            if self.order.len() > CONTACTED_IPS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    /// Whether this node sent to `ip`.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.set.contains(&ip.to_canonical())
    }

    /// The most recent of them as a Bloom filter for dial-back requests.
    pub fn filter(&self) -> reach::IpFilter {
        let mut f = reach::IpFilter::default();
        for ip in self.order.iter().rev().take(64) {
            f.insert(*ip);
        }
        f
    }
}

/// Whether the node serves the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Serve while reachability checks say the node is reachable (it starts
    /// as a server, and turns client when a check says it is not).
    #[default]
    Auto,
    /// Always serve.
    Server,
    /// Never serve, only query.
    Client,
}

/// What the node knows about its reachability and NAT.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReachStatus {
    /// Whether nodes it never contacted can reach it (null: not known yet).
    pub reachable: Option<bool>,
    /// NAT mapping: none, endpoint-independent,
    /// endpoint-dependent-sequential, endpoint-dependent-random or unknown.
    pub mapping: String,
    /// NAT filtering: endpoint-independent, address-dependent,
    /// address-and-port-dependent or unknown.
    pub filtering: String,
    /// Whether the node sits behind carrier-grade NAT (null: not known).
    pub cgn: Option<bool>,
    /// The addresses peers see this node at, most frequent first.
    pub observed_addrs: Vec<String>,
    /// Dial-back checks run.
    pub checks: u64,
    /// Network changes noticed (addresses, sleep and wake).
    pub network_changes: u64,
    /// Dial-back requests served for other nodes.
    pub dial_backs_served: u64,
    /// Dial-back requests and relays refused by the rate limit.
    pub dial_backs_rate_limited: u64,
}

/// What `status` shows of the DHT.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DhtStatus {
    /// Whether this node serves routing and storage.
    pub server: bool,
    /// auto, server or client.
    pub mode: String,
    /// Contacts in the routing table.
    pub routing_table_size: usize,
    /// Records held for others.
    pub records_held: usize,
    /// DHT datagrams sent.
    pub sent: u64,
    /// DHT bytes sent.
    pub bytes_sent: u64,
    /// DHT datagrams received.
    pub received: u64,
    /// DHT bytes received.
    pub bytes_received: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// DHT datagrams that did not decode.
    pub malformed: u64,
    /// Introductions sent: asked for a peer in the table, this node told
    /// the peer who asks (see `p2pos_proto::dht::RequestBody::FindPeer`).
    pub introductions_sent: u64,
    /// Introductions of askers to this node that it answered.
    pub introductions_answered: u64,
    /// This node's lookups whose target answered through an introduction.
    pub introduced: u64,
    /// The address DHT peers last saw this node at.
    pub observed_addr: Option<String>,
    /// Sequence number of the peer record some node has confirmed storing
    /// (0: not yet).
    pub peer_record_seq: u64,
}

/// Why a DHT query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DhtError {
    /// The DHT task is gone (node stopping).
    #[error("the DHT is not running")]
    Stopped,
    /// No record under that key.
    #[error("no record found for {0} in the DHT")]
    NotFound(String),
    /// The record's value is not a peer record.
    #[error("the peer record of {0} is malformed")]
    Malformed(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
}

/// A peer's record as found in the DHT.
#[derive(Debug, Clone, Serialize)]
pub struct PeerLookup {
    /// The peer.
    pub peer: String,
    /// Addresses from its record.
    pub addrs: Vec<SocketAddr>,
    /// Its homes: reachable nodes that forward connect requests to it.
    pub homes: Vec<HomeStatus>,
    /// Its NAT's mapping, as it measured.
    pub mapping: String,
    /// Its NAT's filtering, as it measured.
    pub filtering: String,
    /// Whether nodes it never contacted can reach it.
    pub reachable: bool,
    /// The record's sequence number.
    pub seq: u64,
    /// When the record expires (Unix seconds).
    pub expires: u64,
    /// Lookup rounds.
    pub hops: u8,
    /// Lookup time.
    pub elapsed_ms: u64,
}

/// A home, as status and lookups show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeStatus {
    /// The home's peer ID.
    pub peer: String,
    /// Its address.
    pub addr: String,
}

impl From<&Home> for HomeStatus {
    fn from(h: &Home) -> Self {
        HomeStatus {
            peer: h.peer.to_string(),
            addr: h.addr.to_string(),
        }
    }
}

/// Servers whose keys were verified, remembered as home candidates.
const KNOWN_SERVERS: usize = 64;

enum Command {
    Bootstrap(SocketAddr),
    SetHomes(Vec<Home>),
    Recheck,
    PortMapped(bool),
    Get(NodeId, oneshot::Sender<DhtEvent<SocketAddr>>),
    Put(SignedRecord, oneshot::Sender<DhtEvent<SocketAddr>>),
}

/// Handle to the node's DHT task.
#[derive(Debug, Clone)]
pub struct DhtHandle {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<DhtStatus>>,
    reach: Arc<Mutex<ReachStatus>>,
    contacted: Arc<Mutex<ContactedIps>>,
    known_servers: Arc<Mutex<std::collections::VecDeque<(PeerId, SocketAddr)>>>,
    mapped: Arc<Mutex<Option<SocketAddr>>>,
    /// The carrier-NAT verdict from tracing the path to a home (`None`:
    /// not traced, or the trace could not tell).
    path_cgn: Arc<Mutex<Option<bool>>>,
    keypair: Keypair,
}

/// How the DHT task is set up.
#[derive(Debug, Clone)]
pub struct DhtOptions {
    /// Server, client, or decided by reachability.
    pub mode: DhtMode,
    /// The private network, for datagrams sent from other ports.
    pub network: Option<NetworkKey>,
    /// The node's bound socket address.
    pub bound: SocketAddr,
}

pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl DhtHandle {
    /// Starts the DHT task. `inbox`: the socket's DHT and reachability
    /// datagrams.
    pub fn spawn(
        keypair: Keypair,
        mut config: DhtConfig,
        overlay: Overlay,
        mut inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
        options: DhtOptions,
    ) -> DhtHandle {
        config.server = options.mode != DhtMode::Client;
        config.track_peers = true;
        let v6_socket = options.bound.is_ipv6();
        let mut local = publishable_addrs(options.bound);
        let (commands, mut rx) = mpsc::channel(256);
        let mode_name = serde_json::to_value(options.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let status = Arc::new(Mutex::new(DhtStatus {
            server: config.server,
            mode: mode_name.clone(),
            ..DhtStatus::default()
        }));
        let reach_status = Arc::new(Mutex::new(ReachStatus {
            mapping: "unknown".into(),
            filtering: "unknown".into(),
            ..ReachStatus::default()
        }));
        let handle = DhtHandle {
            commands,
            status: status.clone(),
            reach: reach_status.clone(),
            contacted: Arc::default(),
            known_servers: Arc::default(),
            mapped: Arc::default(),
            path_cgn: Arc::default(),
            keypair: keypair.clone(),
        };
        let mapped_addr = handle.mapped.clone();
        let path_cgn = handle.path_cgn.clone();
        let known_servers = handle.known_servers.clone();
        let mut homes: Vec<Home> = Vec::new();
        let contacted = handle.contacted.clone();
        let send = {
            let overlay = overlay.clone();
            let contacted = contacted.clone();
            move |to: SocketAddr, bytes: Vec<u8>| {
                let overlay = overlay.clone();
                contacted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .note(to.ip());
                async move {
                    let _ = overlay.send(to, &bytes).await;
                }
            }
        };
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let mut dht: Dht<SocketAddr> = Dht::new(
            keypair.clone(),
            config,
            u64::from_le_bytes(seed),
            unix_now(),
        );
        let mut reach = Reachability::new(
            ReachConfig::default(),
            local.clone(),
            u64::from_le_bytes(seed).rotate_left(17),
        );
        let mut dial_backs = DialBackService::new(DIAL_BACKS_PER_SECOND);
        let mut network_changes = 0u64;
        tokio::spawn(async move {
            let mut waiting: HashMap<QueryId, oneshot::Sender<DhtEvent<SocketAddr>>> =
                HashMap::new();
            let mut next_network_check = tokio::time::Instant::now() + NETWORK_CHECK;
            let mut last_wall = unix_now();
            let mut peer_record = PeerRecordPublisher::default();
            loop {
                let wake = [
                    dht.poll_timeout(),
                    reach.poll_timeout(),
                    peer_record.wake(unix_now()),
                ]
                .into_iter()
                .flatten()
                .min();
                let sleep = wake
                    .map(|t| t.saturating_sub(unix_now()))
                    .unwrap_or(Duration::from_secs(60))
                    .min(Duration::from_secs(60));
                tokio::select! {
                    msg = inbox.recv() => match msg {
                        Some((src, bytes)) => {
                            let src = crate::node::canonical(src);
                            if reach::Message::is_reach(&bytes) {
                                let contacted_ip = contacted.lock().unwrap_or_else(|p| p.into_inner()).contains(src.ip());
                                let actions = handle_reach_datagram(&mut dht, &mut reach, &mut dial_backs, src, &bytes, contacted_ip);
                                for (to, datagram) in actions.send {
                                    send(to, datagram).await;
                                }
                                if let Some((to, datagram)) = actions.send_from_alt_port {
                                    send_from_other_port(options.network.as_ref(), v6_socket, to, datagram).await;
                                }
                            } else {
                                let _ = dht.handle_datagram(unix_now(), src, &bytes);
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(next_network_check) => {
                        next_network_check = tokio::time::Instant::now() + NETWORK_CHECK;
                        let now_wall = unix_now();
                        // The clock jumped well past the check interval: the
                        // host slept, and its NAT bindings are likely gone.
                        let woke = now_wall.saturating_sub(last_wall) > NETWORK_CHECK * 3;
                        last_wall = now_wall;
                        let addrs = publishable_addrs(options.bound);
                        if addrs != local || woke {
                            network_changes += 1;
                            tracing::info!(?addrs, woke, "network changed: checking reachability again");
                            local = addrs;
                            reach.network_changed(local.clone());
                            peer_record.republish();
                            for c in dht.table().closest(&dht.id(), 8) {
                                dht.add_bootstrap(unix_now(), c.addr);
                            }
                        }
                    },
                    cmd = rx.recv() => match cmd {
                        Some(Command::Bootstrap(addr)) => dht.add_bootstrap(unix_now(), crate::node::canonical(addr)),
                        Some(Command::SetHomes(h)) => homes = h,
                        Some(Command::Recheck) => reach.recheck_soon(unix_now()),
                        Some(Command::PortMapped(m)) => reach.set_port_mapped(unix_now(), m),
                        Some(Command::Get(key, tx)) => {
                            let q = dht.get(unix_now(), key);
                            waiting.insert(q, tx);
                        }
                        Some(Command::Put(record, tx)) => {
                            let q = dht.put(unix_now(), record);
                            waiting.insert(q, tx);
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep(sleep) => {
                        dht.handle_timeout(unix_now());
                        reach.handle_timeout(unix_now());
                    }
                }
                // Reachability: observations in, checks out, verdicts to
                // the DHT mode.
                while let Some((responder, observed)) = dht.poll_observation() {
                    reach.observe(responder, observed);
                }
                while let Some((addr, peer)) = dht.poll_verified() {
                    let mut known = known_servers.lock().unwrap_or_else(|p| p.into_inner());
                    known.retain(|(p, _)| *p != peer);
                    if known.len() >= KNOWN_SERVERS {
                        known.pop_front();
                    }
                    known.push_back((peer, addr));
                }
                let now = unix_now();
                if reach.check_due(now) {
                    let helpers: Vec<SocketAddr> = dht
                        .table()
                        .closest(&dht.id(), 8)
                        .into_iter()
                        .map(|c| c.addr)
                        .chain(dht.recent_sources())
                        .collect();
                    let filter = contacted.lock().unwrap_or_else(|p| p.into_inner()).filter();
                    reach.start_check(now, &dedup(helpers), filter);
                }
                while let Some((to, bytes)) = reach.poll_transmit() {
                    send(to, bytes).await;
                }
                while let Some(ReachEvent::Reachable(verdict)) = reach.poll_event() {
                    tracing::info!(reachable = ?verdict, mapping = reach.mapping().as_str(), filtering = reach.filtering().as_str(), "reachability");
                    if let (DhtMode::Auto, Some(reachable)) = (options.mode, verdict) {
                        if dht.is_server() != reachable {
                            tracing::info!(
                                "DHT mode: {}",
                                if reachable { "server" } else { "client" }
                            );
                            dht.set_server(unix_now(), reachable);
                        }
                    }
                }
                // The events first: the end of a put lets the next one start.
                dispatch_events(&mut dht, &mut waiting, &mut peer_record);
                // Keep the peer record current once the node has contacts.
                let now = unix_now();
                if !dht.table().is_empty() {
                    // Public addresses first, then the host's own (LAN).
                    let mut addrs: Vec<SocketAddr> = mapped_addr
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .copied()
                        .collect();
                    for a in reach.public_addrs().into_iter().take(4) {
                        if !addrs.contains(&a) {
                            addrs.push(a);
                        }
                    }
                    for a in &local {
                        if !addrs.contains(a) {
                            addrs.push(*a);
                        }
                    }
                    let value = PeerInfo {
                        addrs,
                        homes: homes.clone(),
                        mapping: reach.mapping(),
                        filtering: reach.filtering(),
                        reachable: reach.reachable() == Some(true),
                    }
                    .encode();
                    if let Some(record) = peer_record.due(&keypair, now, value) {
                        tracing::debug!(
                            seq = record.seq,
                            homes = homes.len(),
                            "publishing the peer record"
                        );
                        peer_record.started(dht.put(now, record));
                    }
                }
                // A put may end at once (nothing to send it to).
                dispatch_events(&mut dht, &mut waiting, &mut peer_record);
                while let Some((to, bytes)) = dht.poll_transmit() {
                    send(to, bytes).await;
                }
                let c = dht.counters();
                let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                *reach_status.lock().unwrap_or_else(|p| p.into_inner()) = ReachStatus {
                    reachable: reach.reachable(),
                    mapping: reach.mapping().as_str().to_owned(),
                    filtering: reach.filtering().as_str().to_owned(),
                    cgn: p2pos_proto::reach::judge_cgn(
                        &local.iter().map(|a| a.ip()).collect::<Vec<_>>(),
                        mapped_addr
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .map(|a| a.ip()),
                        &reach
                            .observed_addrs()
                            .iter()
                            .map(|a| a.ip())
                            .collect::<Vec<_>>(),
                    )
                    .or(*path_cgn.lock().unwrap_or_else(|p| p.into_inner())),
                    observed_addrs: reach
                        .observed_addrs()
                        .iter()
                        .map(|a| a.to_string())
                        .collect(),
                    checks: reach.checks(),
                    network_changes,
                    dial_backs_served: dial_backs.served,
                    dial_backs_rate_limited: dial_backs.rate_limited,
                };
                *s = DhtStatus {
                    server: dht.is_server(),
                    mode: mode_name.clone(),
                    routing_table_size: dht.table().len(),
                    records_held: dht.records().len(),
                    sent: c.sent,
                    bytes_sent: c.bytes_sent,
                    received: c.received,
                    bytes_received: c.bytes_received,
                    timeouts: c.timeouts,
                    malformed: c.malformed,
                    introductions_sent: c.introductions_sent,
                    introductions_answered: c.introductions_answered,
                    introduced: c.introduced,
                    observed_addr: dht.observed_addr().map(|a| a.to_string()),
                    peer_record_seq: peer_record.stored_seq,
                };
            }
        });
        handle
    }

    /// Contacts a node at `addr` to join the DHT through it.
    pub fn bootstrap(&self, addr: SocketAddr) {
        let _ = self.commands.try_send(Command::Bootstrap(addr));
    }

    /// Servers whose keys were verified recently, newest first: the
    /// candidates for homes.
    pub fn known_servers(&self) -> Vec<(PeerId, SocketAddr)> {
        self.known_servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .copied()
            .collect()
    }

    /// Publishes the address the router maps to this node (first in the
    /// peer record), or withdraws it.
    pub fn set_mapped_addr(&self, addr: Option<SocketAddr>) {
        let changed = {
            let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
            let changed = m.is_some() != addr.is_some();
            *m = addr;
            changed
        };
        if changed {
            let _ = self.commands.try_send(Command::PortMapped(addr.is_some()));
        }
    }

    /// Records the carrier-NAT verdict from tracing the path to a peer.
    pub fn set_path_cgn(&self, verdict: Option<bool>) {
        *self.path_cgn.lock().unwrap_or_else(|p| p.into_inner()) = verdict;
    }

    /// Runs a reachability check soon (something changed, e.g. a port
    /// mapping appeared or went away).
    pub fn recheck_reachability(&self) {
        let _ = self.commands.try_send(Command::Recheck);
    }

    /// Publishes these homes in the peer record.
    pub fn set_homes(&self, homes: Vec<Home>) {
        let _ = self.commands.try_send(Command::SetHomes(homes));
    }

    /// Notes that this node sent to `ip` (e.g. a session's peer).
    pub fn note_contacted(&self, ip: std::net::IpAddr) {
        self.contacted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(ip);
    }

    /// Reachability and NAT, as far as known.
    pub fn reach_status(&self) -> ReachStatus {
        self.reach.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The DHT's status.
    pub fn status(&self) -> DhtStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn query(
        &self,
        make: impl FnOnce(oneshot::Sender<DhtEvent<SocketAddr>>) -> Command,
    ) -> Result<DhtEvent<SocketAddr>, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| DhtError::Stopped)?;
        rx.await.map_err(|_| DhtError::Stopped)
    }

    /// Fetches the record `name` of `owner`.
    pub async fn get(
        &self,
        owner: PeerId,
        name: &[u8],
    ) -> Result<(SignedRecord, u8, u64), DhtError> {
        match self
            .query(|tx| Command::Get(record_key(&owner, name), tx))
            .await?
        {
            DhtEvent::GetDone {
                record: Some(r),
                hops,
                elapsed_ms,
                ..
            } => Ok((r, hops, elapsed_ms)),
            _ => Err(DhtError::NotFound(owner.to_string())),
        }
    }

    /// Publishes a record `name` of this node; returns how many nodes stored it.
    pub async fn put(&self, name: &[u8], value: &[u8]) -> Result<usize, DhtError> {
        let now = unix_now();
        let record = SignedRecord::sign(
            &self.keypair,
            name,
            now.as_millis() as u64,
            (now + RECORD_TTL).as_secs(),
            value,
        )
        .map_err(|e| DhtError::Invalid(e.to_string()))?;
        match self.query(|tx| Command::Put(record, tx)).await? {
            DhtEvent::PutDone { stored, .. } => Ok(stored),
            _ => Err(DhtError::Stopped),
        }
    }

    /// Finds a peer's addresses through its peer record.
    pub async fn lookup_peer(&self, peer: PeerId) -> Result<PeerLookup, DhtError> {
        self.lookup_peer_info(peer).await.map(|(lookup, _)| lookup)
    }

    /// Finds a peer's record: for display, and as the record itself.
    pub async fn lookup_peer_info(&self, peer: PeerId) -> Result<(PeerLookup, PeerInfo), DhtError> {
        let (record, hops, elapsed_ms) = self.get(peer, PEER_RECORD).await?;
        let info =
            PeerInfo::decode(&record.value).map_err(|_| DhtError::Malformed(peer.to_string()))?;
        let lookup = PeerLookup {
            peer: peer.to_string(),
            addrs: info.addrs.clone(),
            homes: info.homes.iter().map(HomeStatus::from).collect(),
            mapping: info.mapping.as_str().to_owned(),
            filtering: info.filtering.as_str().to_owned(),
            reachable: info.reachable,
            seq: record.seq,
            expires: record.expires,
            hops,
            elapsed_ms,
        };
        Ok((lookup, info))
    }
}

/// The wildcard address of a fresh socket of the node's family.
pub(crate) fn any_addr(v6_socket: bool) -> SocketAddr {
    if v6_socket {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// Frames `datagram` for the private network, if any.
pub(crate) fn seal(network: Option<&NetworkKey>, datagram: Vec<u8>) -> Vec<u8> {
    match network {
        Some(key) => key.seal(&datagram),
        None => datagram,
    }
}

/// Hands the DHT's events to the peer record's publisher or to the
/// commands waiting for them.
fn dispatch_events(
    dht: &mut Dht<SocketAddr>,
    waiting: &mut HashMap<QueryId, oneshot::Sender<DhtEvent<SocketAddr>>>,
    peer_record: &mut PeerRecordPublisher,
) {
    while let Some(event) = dht.poll_event() {
        if peer_record.on_event(unix_now(), &event) {
            continue;
        }
        let q = match &event {
            DhtEvent::LookupDone { query, .. }
            | DhtEvent::GetDone { query, .. }
            | DhtEvent::PutDone { query, .. } => *query,
        };
        if let Some(tx) = waiting.remove(&q) {
            let _ = tx.send(event);
        }
    }
}

fn dedup(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    addrs
}

/// The addresses to publish in the peer record besides the observed ones:
/// the host's interface addresses on the bound port (loopback ones only
/// for a loopback-bound node).
pub fn publishable_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    crate::node::listen_addrs_for(bound)
        .into_iter()
        .filter(|a| !a.ip().is_loopback() || bound.ip().is_loopback())
        .collect()
}

/// Handles a reachability datagram: as the requester (acks, probes), the
/// helper (requests) or the third node (relays). Returns what to send.
fn handle_reach_datagram(
    dht: &mut Dht<SocketAddr>,
    reach: &mut Reachability,
    service: &mut DialBackService,
    src: SocketAddr,
    bytes: &[u8],
    contacted_ip: bool,
) -> reach::DialBackActions {
    let Ok(message) = reach::Message::decode(bytes) else {
        return reach::DialBackActions::default();
    };
    let now = unix_now();
    match message {
        reach::Message::DialBackRequest { id, contacted } => {
            // Third-node candidates: nodes this one talks to.
            let candidates: Vec<SocketAddr> = dedup(
                dht.table()
                    .closest(&dht.id(), 16)
                    .into_iter()
                    .map(|c| c.addr)
                    .chain(dht.recent_sources())
                    .collect(),
            )
            .into_iter()
            .filter(|a| *a != src)
            .collect();
            service.handle_request(now, src, id, &contacted, &candidates)
        }
        reach::Message::DialBackRelay { id, target } => service.handle_relay(now, id, target),
        other => {
            reach.handle_reply(now, src, &other, contacted_ip);
            reach::DialBackActions::default()
        }
    }
}

/// Sends one datagram from a fresh ephemeral port (framed for the private
/// network, if any): a port the receiver never sent to.
async fn send_from_other_port(
    network: Option<&NetworkKey>,
    v6_socket: bool,
    to: SocketAddr,
    datagram: Vec<u8>,
) {
    let datagram = seal(network, datagram);
    if let Ok(socket) = tokio::net::UdpSocket::bind(any_addr(v6_socket)).await {
        let _ = socket
            .send_to(&datagram, p2pos_net::dest_for(any_addr(v6_socket), to))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacted_ips_are_bounded_and_filtered() {
        let mut c = ContactedIps::default();
        for i in 0..(CONTACTED_IPS as u32 + 10) {
            c.note(std::net::Ipv4Addr::from(0x0b00_0000 + i).into());
        }
        assert_eq!(c.order.len(), CONTACTED_IPS);
        assert!(!c.contains(std::net::Ipv4Addr::from(0x0b00_0000).into()));
        let newest: std::net::IpAddr =
            std::net::Ipv4Addr::from(0x0b00_0000 + CONTACTED_IPS as u32 + 9).into();
        assert!(c.contains(newest));
        assert!(c.filter().may_contain(newest));
    }

    fn put_done(query: QueryId, stored: usize) -> DhtEvent<SocketAddr> {
        DhtEvent::PutDone {
            query,
            key: NodeId([0; p2pos_proto::dht::ID_BYTES]),
            stored,
            elapsed_ms: 5,
        }
    }

    #[test]
    fn a_record_that_changes_during_a_put_is_put_again_when_that_one_ends() {
        let keypair = Keypair::from_seed([3; 32]);
        let mut p = PeerRecordPublisher::default();
        let t = Duration::from_secs(1_000);
        let first = p.due(&keypair, t, b"no homes".to_vec()).expect("first put");
        p.started(QueryId(1));
        // The homes arrive while the first put is in flight: it waits.
        let later = t + Duration::from_millis(300);
        assert!(p.due(&keypair, later, b"two homes".to_vec()).is_none());
        assert_eq!(p.wake(later), None);
        // Another query's end is not the publisher's.
        assert!(!p.on_event(later, &put_done(QueryId(7), 2)));
        assert!(p.on_event(later, &put_done(QueryId(1), 2)));
        assert_eq!(p.stored_seq, first.seq);
        let second = p
            .due(&keypair, later, b"two homes".to_vec())
            .expect("the changed value goes out as soon as the first put ends");
        assert!(second.seq > first.seq);
        assert_eq!(second.value, b"two homes");
    }

    #[test]
    fn a_put_that_stored_nowhere_is_retried_at_the_time_the_task_wakes() {
        let keypair = Keypair::from_seed([4; 32]);
        let mut p = PeerRecordPublisher::default();
        let t = Duration::from_secs(1_000);
        p.due(&keypair, t, b"v".to_vec()).expect("first put");
        p.started(QueryId(1));
        assert!(p.on_event(t, &put_done(QueryId(1), 0)));
        assert_eq!(p.stored_seq, 0);
        let retry = t + PEER_RECORD_RETRY;
        assert_eq!(p.wake(t), Some(retry));
        assert!(p
            .due(&keypair, retry - Duration::from_millis(1), b"v".to_vec())
            .is_none());
        let again = p.due(&keypair, retry, b"v".to_vec()).expect("retried");
        p.started(QueryId(2));
        assert!(p.on_event(retry, &put_done(QueryId(2), 3)));
        assert_eq!(p.stored_seq, again.seq);
        // Stored: the next wake is the refresh, and nothing is due before it.
        assert_eq!(p.wake(retry), Some(retry + PEER_RECORD_REFRESH));
        let before = retry + PEER_RECORD_REFRESH - Duration::from_secs(1);
        assert!(p.due(&keypair, before, b"v".to_vec()).is_none());
        // Due but not put (no contacts): no timer that fires at once.
        assert_eq!(p.wake(retry + PEER_RECORD_REFRESH), None);
        assert!(p
            .due(&keypair, retry + PEER_RECORD_REFRESH, b"v".to_vec())
            .is_some());
    }
}
