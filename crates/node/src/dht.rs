//! The DHT in the node: one task owns the sans-IO `p2pos_proto::dht::Dht`
//! and drives it with the overlay's DHT datagrams, tokio timers and
//! commands from the node.
//!
//! The task also keeps the node's **peer record** in the DHT: a record named
//! `peer`, signed by the node, whose value lists the addresses it can be
//! reached at (its listen addresses and the address DHT peers see it at).
//! It is published once the node has joined, again whenever the observed
//! address changes, and re-signed every 30 minutes (it expires after an
//! hour).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use p2pos_net::overlay::Overlay;
use p2pos_proto::dht::{record_key, Dht, DhtConfig, DhtEvent, NodeId, QueryId, SignedRecord};
use p2pos_proto::overlay::{decode_addr, encode_addr};
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

/// What `status` shows of the DHT.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DhtStatus {
    /// Whether this node serves routing and storage.
    pub server: bool,
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
    /// The record's sequence number.
    pub seq: u64,
    /// When the record expires (Unix seconds).
    pub expires: u64,
    /// Lookup rounds.
    pub hops: u8,
    /// Lookup time.
    pub elapsed_ms: u64,
}

enum Command {
    Bootstrap(SocketAddr),
    Get(NodeId, oneshot::Sender<DhtEvent<SocketAddr>>),
    Put(SignedRecord, oneshot::Sender<DhtEvent<SocketAddr>>),
}

/// Handle to the node's DHT task.
#[derive(Debug, Clone)]
pub struct DhtHandle {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<DhtStatus>>,
    keypair: Keypair,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Encodes a list of addresses as a peer record value.
pub fn encode_peer_addrs(addrs: &[SocketAddr]) -> Vec<u8> {
    let mut out = vec![addrs.len().min(32) as u8];
    for a in addrs.iter().take(32) {
        encode_addr(a, &mut out);
    }
    out
}

/// Decodes a peer record value.
pub fn decode_peer_addrs(mut value: &[u8]) -> Option<Vec<SocketAddr>> {
    let (&n, rest) = value.split_first()?;
    value = rest;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let (a, rest) = decode_addr(value).ok()?;
        out.push(a);
        value = rest;
    }
    value.is_empty().then_some(out)
}

impl DhtHandle {
    /// Starts the DHT task. `inbox`: the socket's DHT datagrams; `local`:
    /// addresses to publish besides the observed one; `v6_socket`: whether
    /// the socket is IPv6 (IPv4 peers are then reached by mapped addresses).
    pub fn spawn(
        keypair: Keypair,
        config: DhtConfig,
        overlay: Overlay,
        mut inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
        local: Vec<SocketAddr>,
        v6_socket: bool,
    ) -> DhtHandle {
        let (commands, mut rx) = mpsc::channel(256);
        let status = Arc::new(Mutex::new(DhtStatus {
            server: config.server,
            ..DhtStatus::default()
        }));
        let handle = DhtHandle {
            commands,
            status: status.clone(),
            keypair: keypair.clone(),
        };
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let mut dht: Dht<SocketAddr> = Dht::new(
            keypair.clone(),
            config,
            u64::from_le_bytes(seed),
            unix_now(),
        );
        tokio::spawn(async move {
            let mut waiting: HashMap<QueryId, oneshot::Sender<DhtEvent<SocketAddr>>> =
                HashMap::new();
            let mut published: Option<(Vec<SocketAddr>, Duration)> = None;
            let mut seq = 0u64;
            // The put of the peer record in flight, and the last sequence
            // some node confirmed storing.
            let mut peer_put: Option<QueryId> = None;
            let mut stored_seq = 0u64;
            let mut retry_at = Duration::ZERO;
            loop {
                let sleep = dht
                    .poll_timeout()
                    .map(|t| t.saturating_sub(unix_now()))
                    .unwrap_or(Duration::from_secs(60))
                    .min(Duration::from_secs(60));
                tokio::select! {
                    msg = inbox.recv() => match msg {
                        Some((src, bytes)) => {
                            let src = crate::node::canonical(src);
                            let _ = dht.handle_datagram(unix_now(), src, &bytes);
                        }
                        None => break,
                    },
                    cmd = rx.recv() => match cmd {
                        Some(Command::Bootstrap(addr)) => dht.add_bootstrap(unix_now(), crate::node::canonical(addr)),
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
                    _ = tokio::time::sleep(sleep) => dht.handle_timeout(unix_now()),
                }
                // Keep the peer record current once the node has contacts.
                let now = unix_now();
                if !dht.table().is_empty() {
                    let mut addrs = local.clone();
                    if let Some(o) = dht.observed_addr() {
                        if !addrs.contains(&o) {
                            addrs.insert(0, o);
                        }
                    }
                    let stale = published.as_ref().is_none_or(|(a, at)| {
                        *a != addrs || now.saturating_sub(*at) >= PEER_RECORD_REFRESH
                    });
                    if stale && peer_put.is_none() && now >= retry_at {
                        seq = seq.max(now.as_millis() as u64);
                        let expires = (now + RECORD_TTL).as_secs();
                        if let Ok(record) = SignedRecord::sign(
                            &keypair,
                            PEER_RECORD,
                            seq,
                            expires,
                            &encode_peer_addrs(&addrs),
                        ) {
                            peer_put = Some(dht.put(now, record));
                            published = Some((addrs, now));
                        }
                    }
                }
                while let Some((to, bytes)) = dht.poll_transmit() {
                    let to = match (v6_socket, to) {
                        (true, SocketAddr::V4(v4)) => {
                            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                        }
                        _ => to,
                    };
                    let _ = overlay.send(to, &bytes).await;
                }
                while let Some(event) = dht.poll_event() {
                    let q = match &event {
                        DhtEvent::LookupDone { query, .. }
                        | DhtEvent::GetDone { query, .. }
                        | DhtEvent::PutDone { query, .. } => *query,
                    };
                    if peer_put == Some(q) {
                        peer_put = None;
                        match event {
                            DhtEvent::PutDone { stored, .. } if stored > 0 => stored_seq = seq,
                            // Stored nowhere: publish again, not before
                            // PEER_RECORD_RETRY.
                            _ => {
                                published = None;
                                retry_at = unix_now() + PEER_RECORD_RETRY;
                            }
                        }
                        continue;
                    }
                    if let Some(tx) = waiting.remove(&q) {
                        let _ = tx.send(event);
                    }
                }
                let c = dht.counters();
                let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                *s = DhtStatus {
                    server: dht.is_server(),
                    routing_table_size: dht.table().len(),
                    records_held: dht.records().len(),
                    sent: c.sent,
                    bytes_sent: c.bytes_sent,
                    received: c.received,
                    bytes_received: c.bytes_received,
                    timeouts: c.timeouts,
                    malformed: c.malformed,
                    observed_addr: dht.observed_addr().map(|a| a.to_string()),
                    peer_record_seq: stored_seq,
                };
            }
        });
        handle
    }

    /// Contacts a node at `addr` to join the DHT through it.
    pub fn bootstrap(&self, addr: SocketAddr) {
        let _ = self.commands.try_send(Command::Bootstrap(addr));
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
        let (record, hops, elapsed_ms) = self.get(peer, PEER_RECORD).await?;
        let addrs = decode_peer_addrs(&record.value)
            .ok_or_else(|| DhtError::Malformed(peer.to_string()))?;
        Ok(PeerLookup {
            peer: peer.to_string(),
            addrs,
            seq: record.seq,
            expires: record.expires,
            hops,
            elapsed_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addrs_round_trip_and_reject_garbage() {
        let addrs: Vec<SocketAddr> = vec![
            "192.0.2.1:7447".parse().unwrap(),
            "[2001:db8::1]:7447".parse().unwrap(),
        ];
        assert_eq!(decode_peer_addrs(&encode_peer_addrs(&addrs)), Some(addrs));
        assert_eq!(decode_peer_addrs(&[3, 4, 1]), None);
        assert_eq!(decode_peer_addrs(&[]), None);
    }
}
