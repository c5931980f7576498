//! Relayed sessions (wire formats in `p2pos_proto::relay`, the socket side
//! in `p2pos_net::paths`).
//!
//! - **When.** Connecting by key to a peer that is not reachable races a
//!   direct dial and hole punching; if neither has a session after
//!   [`RELAY_DEADLINE`] (at once when both NATs map per destination, where
//!   punching cannot work), a relay is tried as well, and the first session
//!   wins.
//! - **Who relays.** The target's homes: reachable nodes that already keep a
//!   session with it. A relay forwards only between the two addresses of
//!   its sessions with the two peers, within its owner's limits
//!   (`[relay]` in the config), and cannot read what it forwards: QUIC's
//!   encryption runs end to end between the peers.
//! - **Moving to a direct path.** Both peers probe each other's candidates
//!   from their own ports (which also punches their NATs) on a schedule
//!   that settles at one round every 10 s, for as long as the session is
//!   relayed. The first acked probe moves the session: QUIC knows the peer
//!   by a virtual address whose route the socket switches, so streams
//!   carry on unbroken. The circuit stays open as the session's way in for
//!   packets still in flight, and closes with the session.
//! - **Many ports.** Where exactly one side's NAT maps per destination, the
//!   search also runs the many-ports plan of `p2pos_proto::relay`: the hard
//!   side opens 256 extra sockets, the easy side probes 1024 random ports;
//!   a hit moves the session to the path through that extra socket.
//! - **Ending.** The circuit-setup streams stay open for the circuit's
//!   life. A relay drops the circuit when either stream or either session
//!   ends; a peer whose relayed session closes finishes its stream, and a
//!   peer whose relay goes away closes a session still relayed (so its
//!   apps redial rather than wait for a timeout).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use p2pos_net::Route;
use p2pos_proto::reach::Mapping;
use p2pos_proto::relay::{spray_role, PathMessage, PathSearch, RelayMessage, SprayAction};
use p2pos_proto::rng::SplitMix64;
use p2pos_proto::stream::StreamReply;
use p2pos_proto::traversal::Home;
use p2pos_proto::PeerId;
use quinn::{RecvStream, SendStream, VarInt};

use crate::node::{ConnectError, Session};
use crate::Node;

/// The built-in stream service that sets up relay circuits.
pub const RELAY_SERVICE: &str = "p2pos/relay";
/// How long direct dials and hole punching get before a relay is tried.
pub const RELAY_DEADLINE: Duration = Duration::from_secs(2);
/// How long setting up a circuit may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer that accepted a circuit waits for the session on it.
const SESSION_WAIT: Duration = Duration::from_secs(20);
/// How often the relayed-path task looks for probes to send.
const TICK: Duration = Duration::from_millis(100);
/// Session close code: the relay of a relayed session went away.
pub const CLOSE_RELAY_GONE: u32 = 4;

/// What the node knows about its relayed sessions.
#[derive(Debug)]
pub(crate) struct RelayedState {
    /// Virtual address → the peer expected there and the relay.
    paths: Mutex<HashMap<SocketAddr, (PeerId, PeerId)>>,
    /// Circuit → (virtual address, its search for a direct path).
    searches: Mutex<HashMap<u64, (SocketAddr, PathSearch)>>,
    /// Circuit → the extra sockets its many-ports search opened.
    sides: Mutex<HashMap<u64, Vec<u32>>>,
    rng: Mutex<SplitMix64>,
    epoch: Instant,
    /// Relayed sessions moved to a direct path.
    pub(crate) upgraded: std::sync::atomic::AtomicU64,
    /// Whether relayed sessions look for a direct path.
    upgrade: bool,
}

impl RelayedState {
    pub(crate) fn new(upgrade: bool) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        RelayedState {
            upgrade,
            paths: Mutex::default(),
            searches: Mutex::default(),
            sides: Mutex::default(),
            rng: Mutex::new(SplitMix64(u64::from_le_bytes(seed))),
            epoch: Instant::now(),
            upgraded: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RelayedState {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        v: SocketAddr,
        peer: PeerId,
        relay: PeerId,
        relay_addr: SocketAddr,
        circuit: u64,
        candidates: &[SocketAddr],
        mappings: (Mapping, Mapping),
    ) {
        lock(&self.paths).insert(v, (peer, relay));
        let now = self.now();
        let mut search = PathSearch::new(circuit, p2pos_net::canonical(relay_addr), now);
        if self.upgrade {
            search.add_candidates(candidates);
            if let Some(role) = spray_role(mappings.0, mappings.1) {
                search.plan_spray(role, now, &mut lock(&self.rng));
            }
        }
        lock(&self.searches).insert(circuit, (v, search));
    }

    fn forget(&self, socket: &p2pos_net::socket::OverlaySocket, v: SocketAddr, circuit: u64) {
        lock(&self.paths).remove(&v);
        lock(&self.searches).remove(&circuit);
        if let Some(ids) = lock(&self.sides).remove(&circuit) {
            socket.close_sides(&ids);
        }
    }

    /// The relay of the session at virtual address `v`.
    pub(crate) fn relay_of(&self, v: SocketAddr) -> Option<PeerId> {
        lock(&self.paths).get(&v).map(|(_, relay)| *relay)
    }

    /// Whether `peer` may hold a session at virtual address `v`.
    pub(crate) fn admits(&self, v: SocketAddr, peer: PeerId) -> bool {
        lock(&self.paths).get(&v).is_some_and(|(p, _)| *p == peer)
    }
}

/// A session's path name for status: `relayed:<relay>` while relayed.
pub(crate) fn path_name(node: &Node, remote: SocketAddr, punched: bool) -> (String, SocketAddr) {
    use p2pos_proto::session::PathKind;
    if !p2pos_net::is_virtual(remote) {
        return (
            PathKind::for_session(remote, punched).as_str().to_owned(),
            remote,
        );
    }
    match node.socket().route(remote) {
        Some(Route::Direct(addr) | Route::Via { addr, .. }) => {
            (PathKind::for_session(addr, true).as_str().to_owned(), addr)
        }
        Some(Route::Relayed { relay, .. }) => {
            let name = match node.inner.relayed.relay_of(remote) {
                Some(r) => format!("relayed:{r}"),
                None => "relayed".to_owned(),
            };
            (name, relay)
        }
        None => ("relayed".to_owned(), remote),
    }
}

/// Starts the task that answers path probes and probes for the node's
/// relayed sessions.
pub(crate) fn spawn_paths_task(node: &Node) {
    let Some(mut inbox) = node
        .inner
        .endpoint_path_inbox()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return;
    };
    let weak = std::sync::Arc::downgrade(&node.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                got = inbox.recv() => {
                    let Some((side, src, datagram)) = got else { break };
                    let Some(inner) = weak.upgrade() else { break };
                    handle_path_message(&Node { inner }, side, src, &datagram).await;
                }
                _ = tick.tick() => {
                    let Some(inner) = weak.upgrade() else { break };
                    send_due_probes(&Node { inner }).await;
                }
            }
        }
    });
}

async fn send_due_probes(node: &Node) {
    let state = &node.inner.relayed;
    let now = state.now();
    type Probes = Vec<(SocketAddr, Vec<u8>)>;
    let (mut due, sprays): (Probes, Vec<(u64, SprayAction)>) = {
        let mut searches = lock(&state.searches);
        let mut rng = lock(&state.rng);
        let due = searches
            .values_mut()
            .flat_map(|(_, s)| s.poll_probes(now, &mut rng))
            .collect();
        let sprays = searches
            .iter_mut()
            .filter_map(|(c, (_, s))| s.poll_spray(now, &mut rng).map(|a| (*c, a)))
            .collect();
        (due, sprays)
    };
    let socket = node.socket();
    for (circuit, action) in sprays {
        match action {
            SprayAction::Open {
                count,
                to,
                datagram,
            } => {
                let ids = socket.open_sides(count);
                tracing::debug!(circuit, sockets = ids.len(), %to, "many-ports search: sockets open");
                for id in &ids {
                    let _ = socket.send_from_side(*id, to, &datagram);
                }
                lock(&state.sides).entry(circuit).or_default().extend(ids);
            }
            SprayAction::Resend { to, datagram } => {
                let ids = lock(&state.sides)
                    .get(&circuit)
                    .cloned()
                    .unwrap_or_default();
                for id in ids {
                    let _ = socket.send_from_side(id, to, &datagram);
                }
            }
            SprayAction::Close => {
                if let Some(ids) = lock(&state.sides).remove(&circuit) {
                    socket.close_sides(&ids);
                }
            }
            SprayAction::Probes(probes) => due.extend(probes),
        }
    }
    let overlay = node.inner_overlay();
    for (to, datagram) in due {
        let _ = overlay.send(to, &datagram).await;
    }
}

async fn handle_path_message(node: &Node, side: Option<u32>, src: SocketAddr, datagram: &[u8]) {
    let state = &node.inner.relayed;
    let socket = node.socket();
    match PathMessage::decode(datagram) {
        Ok(PathMessage::Probe { circuit, nonce }) => {
            // Only probes for one of this node's relayed sessions are
            // answered (and an ack is no larger than its probe).
            let Some(v) = socket.path_for_circuit(circuit) else {
                return;
            };
            let ack = PathMessage::Ack { circuit, nonce }.encode();
            match side {
                Some(id) => {
                    // On one of the many sockets: the first probe to get
                    // through settles the path there (the easy side takes
                    // the first ack it gets, which is this socket's), and
                    // the other sockets close, so no second socket can
                    // answer and split the two sides' choices.
                    if settle_side(node, circuit, v, id, src) {
                        let _ = socket.send_from_side(id, src, &ack);
                    }
                }
                None => {
                    socket.learn_direct(src, v);
                    let back = lock(&state.searches)
                        .get_mut(&circuit)
                        .filter(|_| state.upgrade)
                        .and_then(|(_, search)| {
                            let now = state.now();
                            search.handle_probe(
                                p2pos_net::canonical(src),
                                now,
                                &mut lock(&state.rng),
                            )
                        });
                    let overlay = node.inner_overlay();
                    let _ = overlay.send(src, &ack).await;
                    if let Some((to, probe)) = back {
                        let _ = overlay.send(to, &probe).await;
                    }
                }
            }
        }
        Ok(PathMessage::Ack { circuit, nonce }) => {
            if let Some(id) = side {
                if let Some(v) = socket.path_for_circuit(circuit) {
                    settle_side(node, circuit, v, id, src);
                }
                return;
            }
            let found = lock(&state.searches).get_mut(&circuit).and_then(|(v, s)| {
                s.handle_ack(p2pos_net::canonical(src), nonce)
                    .map(|a| (*v, a))
            });
            let Some((v, addr)) = found else { return };
            socket.set_direct(v, addr);
            moved(node, v, addr, None);
        }
        Err(_) => {}
    }
}

/// Settles the relayed session on circuit `circuit` (at `v`) on extra
/// socket `id`, toward `src`, unless it settled elsewhere; returns whether
/// the session's path runs through that socket.
fn settle_side(node: &Node, circuit: u64, v: SocketAddr, id: u32, src: SocketAddr) -> bool {
    let state = &node.inner.relayed;
    let socket = node.socket();
    let mut sides = lock(&state.sides);
    let Some(ids) = sides.get_mut(&circuit) else {
        return false;
    };
    if !ids.contains(&id) {
        return false;
    }
    if ids.len() == 1 {
        return true;
    }
    let newly = lock(&state.searches)
        .get_mut(&circuit)
        .is_some_and(|(_, s)| s.settle(p2pos_net::canonical(src)));
    if !newly {
        return false;
    }
    let others: Vec<u32> = ids.iter().copied().filter(|i| *i != id).collect();
    ids.retain(|i| *i == id);
    drop(sides);
    socket.close_sides(&others);
    socket.set_via(v, id, src);
    moved(node, v, src, Some(id));
    true
}

fn moved(node: &Node, v: SocketAddr, addr: SocketAddr, side: Option<u32>) {
    let state = &node.inner.relayed;
    state
        .upgraded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let peer = lock(&state.paths).get(&v).map(|(p, _)| *p);
    tracing::info!(peer = ?peer, %addr, extra_socket = ?side, "relayed session moved to a direct path");
}

async fn write_msg(send: &mut SendStream, msg: &RelayMessage) -> Result<(), String> {
    crate::traversal::write_frame(send, &msg.encode()).await
}

async fn read_msg(recv: &mut RecvStream) -> Result<RelayMessage, String> {
    let body = crate::traversal::read_frame(recv, RelayMessage::frame_len, SETUP_TIMEOUT).await?;
    RelayMessage::decode(&body).map_err(|e| e.to_string())
}

/// Connects to `peer` through a relay: one of its homes.
pub(crate) async fn through_relay(
    node: &Node,
    peer: PeerId,
    homes: &[Home],
) -> Result<Session, ConnectError> {
    let mut last = ConnectError::Traversal {
        peer,
        reason: "its record lists no home to relay through".into(),
    };
    for home in homes
        .iter()
        .filter(|h| h.peer != node.peer_id() && h.peer != peer)
    {
        match through(node, peer, home).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::debug!(peer = %peer.short(), relay = %home.peer.short(), "relay failed: {e}");
                last = e;
            }
        }
    }
    Err(last)
}

async fn through(node: &Node, peer: PeerId, home: &Home) -> Result<Session, ConnectError> {
    let fail = |reason: String| ConnectError::Traversal {
        peer,
        reason: format!("relay {}: {reason}", home.peer.short()),
    };
    let relay = match node.live_session(&home.peer) {
        Some(s) => s,
        None => tokio::time::timeout(SETUP_TIMEOUT, node.connect_at(home.peer, home.addr))
            .await
            .map_err(|_| fail(format!("{} did not answer", home.addr)))?
            .map_err(|e| fail(e.to_string()))?,
    };
    let mut stream = node
        .open_on(&relay.conn, home.peer, RELAY_SERVICE)
        .await
        .map_err(|e| fail(format!("refused the relay service: {e}")))?;
    let own = crate::traversal::own_mapping(node);
    let connect = RelayMessage::Connect {
        target: peer,
        mapping: own,
        candidates: crate::traversal::own_candidates(node),
    };
    write_msg(&mut stream.send, &connect).await.map_err(fail)?;
    let (circuit, mapping, candidates) = match read_msg(&mut stream.recv).await.map_err(fail)? {
        RelayMessage::Opened {
            circuit,
            mapping,
            candidates,
        } => (circuit, mapping, candidates),
        RelayMessage::Refused { reason } => return Err(fail(reason)),
        other => return Err(fail(format!("unexpected answer {other:?}"))),
    };
    let socket = node.socket();
    let relay_addr = relay.conn.remote_address();
    let v = socket
        .add_relayed_path(relay_addr, circuit)
        .ok_or_else(|| fail("this node has too many relayed sessions".into()))?;
    node.inner.relayed.register(
        v,
        peer,
        home.peer,
        relay_addr,
        circuit,
        &candidates,
        (own, mapping),
    );
    // The path is held (and cleaned up) even if this dial is abandoned
    // because another path won.
    let node2 = node.clone();
    let (send, recv) = (stream.send, stream.recv);
    tokio::spawn(async move { hold(&node2, v, circuit, peer, send, recv).await });
    node.handshake(peer, v, p2pos_net::DialKind::Normal)
        .await
        .map(|conn| node.install(conn, peer, node.peer_id()))
}

/// Serves a `p2pos/relay` stream from `peer`: as a relay (a connect
/// request) or as the target of a circuit (an offer from its home).
pub(crate) async fn serve_relay(
    node: &Node,
    peer: PeerId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if send
        .write_all(&StreamReply::accepted().encode())
        .await
        .is_err()
    {
        return;
    }
    match read_msg(&mut recv).await {
        Ok(RelayMessage::Connect {
            target,
            mapping,
            candidates,
        }) => relay_for(node, peer, target, mapping, candidates, send, recv).await,
        Ok(RelayMessage::Offer {
            from,
            circuit,
            mapping,
            candidates,
        }) => {
            let offer = Offer {
                from,
                circuit,
                mapping,
                candidates,
            };
            accept_offer(node, peer, offer, send, recv).await
        }
        Ok(_) => {
            let refused = RelayMessage::Refused {
                reason: "unexpected relay message".into(),
            };
            let _ = write_msg(&mut send, &refused).await;
            let _ = send.finish();
        }
        Err(_) => {
            let _ = send.finish();
        }
    }
}

/// As a relay: opens a circuit between `from` and `target` and keeps it
/// while both streams and both sessions live.
async fn relay_for(
    node: &Node,
    from: PeerId,
    target: PeerId,
    from_mapping: Mapping,
    mut candidates: Vec<SocketAddr>,
    mut send: SendStream,
    recv: RecvStream,
) {
    let refuse = |reason: String| RelayMessage::Refused { reason };
    let outcome = async {
        let a = node
            .live_session(&from)
            .ok_or_else(|| "the session with the requester closed".to_owned())?;
        let b = node.live_session(&target).ok_or_else(|| {
            "this node has no session with that peer (it is not, or no longer, its home): look its record up again"
                .to_owned()
        })?;
        let socket = node.socket();
        let circuit = socket
            .open_circuit(
                (from, a.conn.remote_address()),
                (target, b.conn.remote_address()),
            )
            .map_err(|e| e.to_string())?;
        let opened = async {
            candidates.retain(|c| *c != p2pos_net::canonical(a.conn.remote_address()));
            candidates.insert(0, p2pos_net::canonical(a.conn.remote_address()));
            let mut offer_stream = node
                .open_on(&b.conn, target, RELAY_SERVICE)
                .await
                .map_err(|_| "the peer refused the relay service".to_owned())?;
            let offer = RelayMessage::Offer {
                from,
                circuit,
                mapping: from_mapping,
                candidates,
            };
            write_msg(&mut offer_stream.send, &offer).await?;
            match read_msg(&mut offer_stream.recv).await? {
                RelayMessage::Accept {
                    mapping,
                    mut candidates,
                } => {
                    let seen = p2pos_net::canonical(b.conn.remote_address());
                    candidates.retain(|c| *c != seen);
                    candidates.insert(0, seen);
                    Ok((offer_stream, (mapping, candidates)))
                }
                RelayMessage::Refused { reason } => Err(reason),
                other => Err(format!("the peer answered {other:?}")),
            }
        };
        match opened.await {
            Ok((offer_stream, b_candidates)) => Ok((circuit, a, b, offer_stream, b_candidates)),
            Err(e) => {
                socket.close_circuit(circuit);
                Err(e)
            }
        }
    }
    .await;
    let (circuit, a, b, offer_stream, (b_mapping, b_candidates)) = match outcome {
        Ok(x) => x,
        Err(reason) => {
            let _ = write_msg(&mut send, &refuse(reason)).await;
            let _ = send.finish();
            return;
        }
    };
    let opened = RelayMessage::Opened {
        circuit,
        mapping: b_mapping,
        candidates: b_candidates,
    };
    if write_msg(&mut send, &opened).await.is_ok() {
        tracing::info!(a = %from.short(), b = %target.short(), circuit, "relaying a session");
        let (mut a_recv, mut b_recv) = (recv, offer_stream.recv);
        let (mut buf_a, mut buf_b) = ([0u8; 64], [0u8; 64]);
        // Nothing more is sent on these streams: a read returns when one
        // ends.
        tokio::select! {
            _ = a_recv.read(&mut buf_a) => {}
            _ = b_recv.read(&mut buf_b) => {}
            _ = a.conn.closed() => {}
            _ = b.conn.closed() => {}
        }
        let mut b_send = offer_stream.send;
        let _ = b_send.finish();
    }
    node.socket().close_circuit(circuit);
    let _ = send.finish();
    tracing::debug!(circuit, "relay circuit closed");
}

/// A relay's offer of a circuit.
struct Offer {
    from: PeerId,
    circuit: u64,
    mapping: Mapping,
    candidates: Vec<SocketAddr>,
}

/// As the target: accepts a relayed session offered by its home `relay`.
async fn accept_offer(
    node: &Node,
    relay: PeerId,
    offer: Offer,
    mut send: SendStream,
    recv: RecvStream,
) {
    let Offer {
        from,
        circuit,
        mapping,
        candidates,
    } = offer;
    let refuse = |reason: &str| RelayMessage::Refused {
        reason: reason.to_owned(),
    };
    let Some(relay_session) = node.live_session(&relay) else {
        return;
    };
    if from == node.peer_id() {
        let _ = write_msg(&mut send, &refuse("a node cannot connect to itself")).await;
        return;
    }
    let relay_addr = relay_session.conn.remote_address();
    let Some(v) = node.socket().add_relayed_path(relay_addr, circuit) else {
        let _ = write_msg(&mut send, &refuse("the peer has too many relayed sessions")).await;
        return;
    };
    let own = crate::traversal::own_mapping(node);
    node.inner.relayed.register(
        v,
        from,
        relay,
        relay_addr,
        circuit,
        &candidates,
        (own, mapping),
    );
    let accept = RelayMessage::Accept {
        mapping: own,
        candidates: crate::traversal::own_candidates(node),
    };
    if write_msg(&mut send, &accept).await.is_err() {
        node.inner.relayed.forget(&node.socket(), v, circuit);
        node.socket().remove_path(v);
        return;
    }
    hold(node, v, circuit, from, send, recv).await;
}

/// Keeps a relayed path while its session lives; then forgets it and
/// ends the circuit-setup stream (so the relay drops the circuit). If the
/// relay ends the stream first while the session is still relayed, the
/// session is closed: its packets have nowhere to go.
async fn hold(
    node: &Node,
    v: SocketAddr,
    circuit: u64,
    peer: PeerId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let started = Instant::now();
    let mut seen = false;
    let mut relay_gone = false;
    let mut buf = [0u8; 64];
    loop {
        let session = node
            .live_session(&peer)
            .filter(|s| s.conn.remote_address() == v);
        match &session {
            Some(_) => seen = true,
            None if seen || started.elapsed() > SESSION_WAIT => break,
            None => {}
        }
        if relay_gone {
            if let Some(s) = &session {
                if matches!(node.socket().route(v), Some(Route::Relayed { .. })) {
                    s.conn
                        .close(VarInt::from_u32(CLOSE_RELAY_GONE), b"relay went away");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tokio::select! {
            r = recv.read(&mut buf) => {
                if !matches!(r, Ok(Some(_))) {
                    relay_gone = true;
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    node.inner.relayed.forget(&node.socket(), v, circuit);
    node.socket().remove_path(v);
    let _ = send.finish();
}
