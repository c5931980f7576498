//! Keeping sessions alive at the rate this node's NAT needs.
//!
//! - **Measuring** (`p2pos_proto::keepalive`): when the node sits behind a
//!   NAT, it opens test bindings from [`SLOTS`] spare UDP sockets toward a
//!   helper (a home, or a DHT server) and finds how long the NAT keeps an
//!   idle binding. It measures again after a network change.
//! - **Helping**: every node answers other nodes' binding messages
//!   (bounded, and never with more than one datagram of the same size).
//! - **Keeping alive**: QUIC keepalives are off on non-LAN sessions; every
//!   second this task looks at each session and, if the node sent nothing
//!   on it for the keepalive interval, sends one tiny ack-eliciting
//!   datagram (service `p2pos/ka`, dropped silently by the peer). The
//!   interval is the measured one (0.9 × the longest idle a binding
//!   survived), the configured one while nothing is measured, and
//!   [`NO_NAT_INTERVAL`] with no NAT and no stateful firewall (a host
//!   with a public address that is not reachable sits behind one, whose
//!   state expires like a NAT binding: it is measured the same way). A session that received
//!   nothing for [`DEAD_AFTER_INTERVALS`] intervals (and at least the
//!   configured idle timeout) is closed as dead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2pos_proto::keepalive::{Action, BindingHelper, BindingTimer, Message, SLOTS};
use p2pos_proto::stream::encode_datagram;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::Node;

/// The datagram service of keepalives.
pub const KEEPALIVE_SERVICE: &str = "p2pos/ka";
/// Keepalive interval of a node with no NAT (its peers keep their own NATs'
/// bindings).
pub const NO_NAT_INTERVAL: Duration = Duration::from_secs(540);
/// A session silent for this many intervals is dead.
pub const DEAD_AFTER_INTERVALS: u32 = 3;
/// How often sessions are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Binding messages a helper answers per second at most.
const HELPS_PER_SECOND: u32 = 100;

/// What `status` shows of keepalives.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeepaliveStatus {
    /// Seconds between keepalives on an idle session.
    pub interval_s: f64,
    /// `measured`, `measuring` (the configured interval until measured),
    /// `configured` (no NAT measurement possible yet) or `no-nat`.
    pub source: String,
    /// The longest idle time a test binding survived (s).
    pub binding_alive_s: Option<f64>,
    /// The shortest idle time a test binding did not survive (s).
    pub binding_dead_s: Option<f64>,
    /// Measurement rounds run.
    pub rounds: u32,
    /// Keepalive datagrams sent.
    pub sent: u64,
    /// Sessions closed because their peer went silent.
    pub dead_sessions_closed: u64,
}

/// Shared keepalive state of a node.
#[derive(Debug)]
pub(crate) struct KeepaliveState {
    configured: Duration,
    dead_floor: Duration,
    status: Mutex<KeepaliveStatus>,
    sent: AtomicU64,
    dead_closed: AtomicU64,
}

impl KeepaliveState {
    pub(crate) fn new(configured: Duration, idle_timeout: Duration) -> Self {
        KeepaliveState {
            configured,
            dead_floor: idle_timeout,
            status: Mutex::new(KeepaliveStatus {
                interval_s: configured.as_secs_f64(),
                source: "configured".into(),
                ..KeepaliveStatus::default()
            }),
            sent: AtomicU64::new(0),
            dead_closed: AtomicU64::new(0),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.status().interval_s)
    }

    pub(crate) fn status(&self) -> KeepaliveStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.sent = self.sent.load(Ordering::Relaxed);
        s.dead_sessions_closed = self.dead_closed.load(Ordering::Relaxed);
        s
    }

    fn set(&self, interval: Duration, source: &str, timer: Option<&BindingTimer>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.interval_s = interval.as_secs_f64();
        s.source = source.to_owned();
        if let Some(t) = timer {
            let (alive, dead) = t.bounds();
            s.binding_alive_s = alive.map(|d| d.as_secs_f64());
            s.binding_dead_s = dead.map(|d| d.as_secs_f64());
            s.rounds = t.rounds();
        }
    }
}

use crate::dht::unix_now;

/// Starts the measuring/helping task and the session keepalive task.
pub(crate) fn spawn(node: &Node, inbox: mpsc::Receiver<(SocketAddr, Bytes)>) {
    spawn_measure(node, inbox);
    spawn_keeper(node);
}

fn spawn_measure(node: &Node, mut inbox: mpsc::Receiver<(SocketAddr, Bytes)>) {
    let weak = Arc::downgrade(&node.inner);
    let overlay = node.inner_overlay();
    let network = node.inner.network.clone();
    let v6 = node.local_addr().is_ipv6();
    tokio::spawn(async move {
        let mut helper: BindingHelper<SocketAddr> = BindingHelper::default();
        let mut window = (Instant::now(), 0u32);
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let mut timer = BindingTimer::new(u64::from_le_bytes(seed));
        let mut measuring_with: Option<SocketAddr> = None;
        let mut network_changes = 0u64;
        let (slot_tx, mut slot_rx) = mpsc::channel::<(usize, Vec<u8>)>(64);
        let mut slots: Vec<Arc<tokio::net::UdpSocket>> = Vec::new();
        loop {
            let sleep = timer
                .poll_timeout()
                .map(|t| t.saturating_sub(unix_now()))
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5));
            tokio::select! {
                msg = inbox.recv() => {
                    let Some((src, bytes)) = msg else { break };
                    let src = crate::node::canonical(src);
                    let Ok(message) = Message::decode(&bytes) else { continue };
                    // Helping is rate limited; a flood costs nothing more.
                    if window.0.elapsed() >= Duration::from_secs(1) {
                        window = (Instant::now(), 0);
                    }
                    if window.1 >= HELPS_PER_SECOND {
                        continue;
                    }
                    window.1 += 1;
                    if let Some((to, datagram)) = helper.handle(unix_now(), src, message) {
                        let _ = overlay.send(to, &datagram).await;
                    }
                }
                got = slot_rx.recv() => {
                    if let Some((slot, bytes)) = got {
                        let bytes = match &network {
                            Some(key) => match key.open(&bytes) {
                                Ok(inner) => inner.to_vec(),
                                Err(_) => continue,
                            },
                            None => bytes,
                        };
                        if let Ok(Message::BindingPing { id }) = Message::decode(&bytes) {
                            timer.handle_ping(unix_now(), slot, id);
                        }
                    }
                }
                _ = tokio::time::sleep(sleep) => timer.handle_timeout(unix_now()),
            }
            let Some(inner) = weak.upgrade() else { break };
            let node = Node { inner };
            // What is there to measure, and with whom?
            let reach = node.dht().map(|d| d.reach_status());
            let mapping = reach
                .as_ref()
                .map(|r| r.mapping.clone())
                .unwrap_or_default();
            let changes = reach.as_ref().map_or(0, |r| r.network_changes);
            if changes != network_changes {
                network_changes = changes;
                timer.reset();
                measuring_with = None;
            }
            let state = &node.inner.keepalive;
            let reachable = reach.as_ref().and_then(|r| r.reachable);
            if mapping == "none" {
                match reachable {
                    // No NAT and nothing filtering: no binding to keep.
                    Some(true) => {
                        state.set(NO_NAT_INTERVAL, "no-nat", None);
                        continue;
                    }
                    None => continue,
                    // A stateful firewall: its connection state expires
                    // like a NAT binding; measure it.
                    Some(false) => {}
                }
            }
            // An unknown mapping class does not stop the measurement: it
            // needs only a helper (a node whose own NAT verdict is pending
            // would otherwise keep the default interval for good).
            if mapping.is_empty() {
                continue;
            }
            if measuring_with.is_none() {
                let home = node
                    .inner
                    .homes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first()
                    .map(|h| h.addr);
                let helper_addr = home.or_else(|| {
                    node.dht()
                        .and_then(|d| d.known_servers().first().map(|(_, a)| *a))
                });
                if let Some(addr) = helper_addr {
                    if slots.is_empty() {
                        slots = open_slots(v6, &slot_tx).await;
                    }
                    if slots.len() == SLOTS {
                        tracing::info!(helper = %addr, "measuring the NAT's binding timeout");
                        measuring_with = Some(addr);
                        timer.start(unix_now());
                    }
                }
            }
            if let Some(helper_addr) = measuring_with {
                while let Some(action) = timer.poll_action() {
                    let (socket, datagram) = match action {
                        Action::Open { slot, id } => (
                            slots.get(slot).cloned(),
                            Message::BindingOpen { id }.encode(),
                        ),
                        Action::Check { id } => (None, Message::BindingCheck { id }.encode()),
                    };
                    match socket {
                        Some(socket) => {
                            let datagram = crate::dht::seal(network.as_ref(), datagram);
                            let to = p2pos_net::dest_for(crate::dht::any_addr(v6), helper_addr);
                            let _ = socket.send_to(&datagram, to).await;
                        }
                        None => {
                            let _ = overlay.send(helper_addr, &datagram).await;
                        }
                    }
                }
            }
            match timer.interval() {
                Some(i) => {
                    let source = if timer.is_done() {
                        "measured"
                    } else {
                        "measuring"
                    };
                    let i = i.max(Duration::from_secs(1));
                    if state.interval() != i || state.status().source != source {
                        tracing::info!(interval = ?i, source, "keepalive interval");
                    }
                    state.set(i, source, Some(&timer));
                }
                None => state.set(state.configured, "configured", Some(&timer)),
            }
        }
    });
}

/// Binds the spare sockets and starts their receive loops.
async fn open_slots(
    v6: bool,
    tx: &mpsc::Sender<(usize, Vec<u8>)>,
) -> Vec<Arc<tokio::net::UdpSocket>> {
    let any = crate::dht::any_addr(v6);
    let mut out = Vec::new();
    for slot in 0..SLOTS {
        let Ok(socket) = tokio::net::UdpSocket::bind(any).await else {
            return Vec::new();
        };
        let socket = Arc::new(socket);
        let reader = socket.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                if tx.send((slot, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        });
        out.push(socket);
    }
    out
}

struct Watch {
    tx: u64,
    tx_changed: Instant,
    rx: u64,
    rx_changed: Instant,
}

/// Sends keepalives on idle sessions and closes dead ones.
fn spawn_keeper(node: &Node) {
    let weak = Arc::downgrade(&node.inner);
    tokio::spawn(async move {
        let mut watched: HashMap<usize, Watch> = HashMap::new();
        let keepalive = Bytes::from(encode_datagram(KEEPALIVE_SERVICE, &[]));
        loop {
            tokio::time::sleep(TICK).await;
            let Some(inner) = weak.upgrade() else { break };
            let node = Node { inner };
            let state = &node.inner.keepalive;
            let interval = state.interval();
            let dead_after = (interval * DEAD_AFTER_INTERVALS).max(state.dead_floor);
            let now = Instant::now();
            let sessions = node.session_connections();
            let live: std::collections::HashSet<usize> =
                sessions.iter().map(|c| c.stable_id()).collect();
            watched.retain(|id, _| live.contains(id));
            for conn in sessions {
                let remote = crate::node::canonical(conn.remote_address());
                if p2pos_proto::session::is_local_ip(remote.ip())
                    && !remote.ip().is_loopback()
                    && !p2pos_net::is_virtual(remote)
                {
                    // LAN sessions run QUIC's own short timers.
                    continue;
                }
                let stats = conn.stats();
                let w = watched.entry(conn.stable_id()).or_insert(Watch {
                    tx: stats.udp_tx.datagrams,
                    tx_changed: now,
                    rx: stats.udp_rx.datagrams,
                    rx_changed: now,
                });
                if stats.udp_tx.datagrams != w.tx {
                    w.tx = stats.udp_tx.datagrams;
                    w.tx_changed = now;
                }
                if stats.udp_rx.datagrams != w.rx {
                    w.rx = stats.udp_rx.datagrams;
                    w.rx_changed = now;
                }
                if now.duration_since(w.rx_changed) >= dead_after {
                    state.dead_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(remote = %remote, "closing a session whose peer went silent");
                    conn.close(
                        quinn::VarInt::from_u32(crate::node::CLOSE_DEAD),
                        b"peer silent",
                    );
                    continue;
                }
                // The check runs once a second: send up to one tick early
                // rather than up to one tick late.
                if now.duration_since(w.tx_changed) + TICK >= interval
                    && conn.send_datagram(keepalive.clone()).is_ok()
                {
                    state.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
}
