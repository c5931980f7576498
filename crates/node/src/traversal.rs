//! Reaching peers behind NATs with no server of ours: homes, signalling
//! and hole punching (wire formats in `p2pos_proto::traversal`).
//!
//! - **Homes.** A node that is not reachable (its reachability check says
//!   so, or has not said yet) keeps sessions with [`HOMES`] reachable
//!   nodes — DHT servers whose keys it verified, the nearest by round trip
//!   of up to 16, checked at once — and publishes them in its peer record. Its sessions with them keep its NAT binding open.
//! - **Signalling.** To reach such a peer B, a node A looks up B's record,
//!   opens a session with one of B's homes H and asks it, on the built-in
//!   stream service [`SIGNAL_SERVICE`], to introduce it. H forwards the
//!   request over its session with B (adding the address it sees A at),
//!   and B's answer back (adding the address it sees B at).
//! - **Punching.** B, on the introduction, sends punch datagrams to A's
//!   candidates from its own port, so that its NAT lets A in; A, on the
//!   answer, punches B's candidates and dials them all (QUIC with a short
//!   initial RTT, so a first Initial dropped before B's punch is retried
//!   soon). A side whose NAT maps per destination dials too: only its own
//!   packets create the mapping the other side can answer. The first
//!   handshake to complete wins; a simultaneous pair is settled by the twin
//!   rule.
//!
//! A direct dial of the record's addresses runs at the same time, so a
//! reachable peer costs no signalling.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pos_net::DialKind;
use p2pos_proto::reach::Mapping;
use p2pos_proto::stream::StreamReply;
use p2pos_proto::traversal::{answerer_dials, encode_punch, Home, PeerInfo, Signal};
use p2pos_proto::PeerId;
use quinn::{RecvStream, SendStream};

use crate::node::{ConnectError, Session};
use crate::Node;

/// The built-in stream service that carries signalling.
pub const SIGNAL_SERVICE: &str = "p2pos/signal";
/// Homes a node that is not reachable keeps.
pub const HOMES: usize = 2;
/// How often the homes are checked.
const HOME_CHECK: Duration = Duration::from_secs(5);
/// Home candidates compared by round trip at most.
const HOME_CANDIDATES: usize = 16;
/// How long checking a home candidate (its record, one probe) may take.
const HOME_CANDIDATE_CHECK: Duration = Duration::from_secs(20);
/// How long a home candidate's probe may take.
const HOME_PROBE: Duration = Duration::from_secs(1);
/// How long a dial to a home candidate may take.
const HOME_DIAL: Duration = Duration::from_secs(3);
/// How long a signalling exchange may take.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a punched dial may take.
const PUNCH_DIAL: Duration = Duration::from_secs(6);
/// Punch rounds per attempt, and the time between them.
const PUNCH_ROUNDS: u32 = 5;
const PUNCH_INTERVAL: Duration = Duration::from_millis(40);
/// A session made within this time of a punching attempt is a punched one.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(15);
/// Candidates a node offers at most.
const MAX_OWN_CANDIDATES: usize = 8;
/// Introductions a node handles at once, at most.
const MAX_INTRODUCTIONS: usize = 32;

/// Starts the task that keeps this node's homes while it is not reachable.
pub(crate) fn spawn_homes(node: &Node) {
    let weak = Arc::downgrade(&node.inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(HOME_CHECK).await;
            let Some(inner) = weak.upgrade() else { break };
            let node = Node { inner };
            keep_homes(&node).await;
        }
    });
}

async fn keep_homes(node: &Node) {
    let Some(dht) = node.dht() else { return };
    let reachable = dht.reach_status().reachable == Some(true);
    let mut homes = node
        .inner
        .homes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let before = homes.clone();
    if reachable {
        homes.clear();
    } else {
        homes.retain(|h| node.live_session(&h.peer).is_some());
        if homes.len() < HOMES {
            for (peer, addr) in best_home_candidates(node, dht, &homes).await {
                if homes.len() >= HOMES {
                    break;
                }
                if let Ok(Ok(())) =
                    tokio::time::timeout(HOME_DIAL, node.connect(peer, Some(addr))).await
                {
                    tracing::info!(home = %peer, %addr, "new home");
                    homes.push(Home { peer, addr });
                }
            }
        }
    }
    if before.is_empty() {
        if let Some(home) = homes.first() {
            trace_cgn(dht, home.addr);
        }
    }
    if homes != before {
        *node.inner.homes.lock().unwrap_or_else(|p| p.into_inner()) = homes.clone();
        dht.set_homes(homes);
    }
}

/// Routers on the path to a home, traced with small TTLs: the hops a
/// carrier-grade NAT would be among.
const CGN_TRACE_HOPS: u8 = 4;
/// How long the trace waits for the routers' answers.
const CGN_TRACE_WAIT: Duration = Duration::from_secs(2);

/// Judges whether a carrier-grade NAT sits beyond the home router from the
/// routers on the path to `home` (in the background; the verdict joins the
/// reachability status). A node gets new homes after its network changes,
/// so the path is traced again then.
fn trace_cgn(dht: &crate::dht::DhtHandle, home: SocketAddr) {
    let dht = dht.clone();
    tokio::task::spawn_blocking(move || {
        match p2pos_net::trace::hops(home, CGN_TRACE_HOPS, CGN_TRACE_WAIT) {
            Ok(hops) => {
                let verdict = p2pos_proto::reach::judge_cgn_path(&hops);
                tracing::debug!(?hops, ?verdict, "traced the path to a home");
                dht.set_path_cgn(verdict);
            }
            Err(e) => tracing::debug!("cannot trace the path to a home: {e}"),
        }
    });
}

/// Home candidates, nearest first: verified DHT servers whose own records
/// say they are reachable (a NATed node this one happens to have a path to
/// is no use to others), up to [`HOME_CANDIDATES`] of them, ordered by the
/// round trip of one probe. Homes are kept while their sessions live, so
/// a stable home is never swapped for a slightly nearer one.
async fn best_home_candidates(
    node: &Node,
    dht: &crate::dht::DhtHandle,
    homes: &[Home],
) -> Vec<(PeerId, SocketAddr)> {
    // Each candidate's record and round trip are checked at once, so a
    // slow or stale candidate does not hold up the others.
    let mut checks = tokio::task::JoinSet::new();
    for (peer, addr) in dht
        .known_servers()
        .into_iter()
        .filter(|(p, _)| *p != node.peer_id() && !homes.iter().any(|h| h.peer == *p))
        .take(HOME_CANDIDATES)
    {
        let (node, dht) = (node.clone(), dht.clone());
        checks.spawn(async move {
            let check = async {
                let (_, info) = dht.lookup_peer_info(peer).await.ok()?;
                if !info.reachable {
                    return None;
                }
                let start = std::time::Instant::now();
                node.probe(addr, HOME_PROBE).await.ok()?;
                Some((start.elapsed(), peer, addr))
            };
            tokio::time::timeout(HOME_CANDIDATE_CHECK, check)
                .await
                .ok()
                .flatten()
        });
    }
    let mut answered = Vec::new();
    while let Some(r) = checks.join_next().await {
        if let Ok(Some(x)) = r {
            answered.push(x);
        }
    }
    answered.sort_by_key(|(rtt, _, _)| *rtt);
    answered.into_iter().map(|(_, p, a)| (p, a)).collect()
}

/// The addresses this node offers a peer: the public ones peers see first,
/// then its own.
pub(crate) fn own_candidates(node: &Node) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = node.mapped_addr().into_iter().collect();
    let observed: Vec<SocketAddr> = node
        .dht()
        .map(|d| d.reach_status().observed_addrs)
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.parse().ok())
        .filter(|a: &SocketAddr| !p2pos_proto::session::is_local_ip(a.ip()))
        .collect();
    for a in observed
        .into_iter()
        .chain(crate::dht::publishable_addrs(node.local_addr()))
    {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out.truncate(MAX_OWN_CANDIDATES);
    out
}

pub(crate) fn own_mapping(node: &Node) -> Mapping {
    match node.dht().map(|d| d.reach_status().mapping) {
        Some(m) if m == Mapping::EndpointDependentRandom.as_str() => {
            Mapping::EndpointDependentRandom
        }
        Some(m) if m == Mapping::EndpointDependentSequential.as_str() => {
            Mapping::EndpointDependentSequential
        }
        _ => Mapping::EndpointIndependent,
    }
}

/// Sends punch datagrams for attempt `nonce` to every candidate, a few
/// rounds apart.
///
/// The first round goes out before this returns (the target answers only
/// after its NAT has seen it: the requester punches on the answer, and its
/// punches would be dropped by a NAT this node had not yet opened); the
/// other rounds follow in the background.
async fn punch(node: &Node, candidates: Vec<SocketAddr>, nonce: u64) {
    let overlay = node.inner_overlay();
    let datagram = encode_punch(nonce);
    tracing::debug!(?candidates, nonce, "punching");
    for to in &candidates {
        let _ = overlay.send(*to, &datagram).await;
    }
    tokio::spawn(async move {
        for _ in 1..PUNCH_ROUNDS {
            tokio::time::sleep(PUNCH_INTERVAL).await;
            for to in &candidates {
                let _ = overlay.send(*to, &datagram).await;
            }
        }
    });
}

/// A hole-punching attempt with a peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Punching {
    /// When it started.
    pub at: Instant,
    /// Who asked for the connection: its dial wins when both ends' dials
    /// make a session. `None` when both ends asked at once (the usual
    /// tie-break applies then).
    pub initiator: Option<PeerId>,
}

/// Notes a punching attempt with `peer` that `initiator` asked for.
fn mark_punching(node: &Node, peer: PeerId, initiator: PeerId) {
    let mut punching = node
        .inner
        .punching
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    punching.retain(|_, p| p.at.elapsed() < PUNCH_WINDOW);
    let initiator = match punching.get(&peer) {
        Some(p) if p.initiator != Some(initiator) => None,
        _ => Some(initiator),
    };
    punching.insert(
        peer,
        Punching {
            at: Instant::now(),
            initiator,
        },
    );
}

async fn write_signal(send: &mut SendStream, signal: &Signal) -> Result<(), String> {
    write_frame(send, &signal.encode()).await
}

async fn read_signal(recv: &mut RecvStream) -> Result<Signal, String> {
    let body = read_frame(recv, Signal::frame_len, SIGNAL_TIMEOUT).await?;
    Signal::decode(&body).map_err(|e| e.to_string())
}

/// Writes a length-prefixed control frame.
pub(crate) async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), String> {
    send.write_all(frame).await.map_err(|e| e.to_string())
}

/// Reads the body of a length-prefixed control frame (`len` judges the
/// prefix) within `timeout`.
pub(crate) async fn read_frame<E: std::fmt::Display>(
    recv: &mut RecvStream,
    len: impl Fn([u8; 2]) -> Result<usize, E>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let io = async {
        let mut prefix = [0u8; 2];
        recv.read_exact(&mut prefix)
            .await
            .map_err(|e| e.to_string())?;
        let len = len(prefix).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(body)
    };
    tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
}

/// Connects to `peer` using its record: a direct dial of its addresses and,
/// when it is not reachable, signalling through its homes, at once.
pub(crate) async fn connect_by_record(
    node: &Node,
    peer: PeerId,
    info: PeerInfo,
) -> Result<Session, ConnectError> {
    let direct = async {
        match node
            .handshake_any(peer, info.addrs.clone(), DialKind::Normal)
            .await
        {
            Ok(conn) => Ok(node.install(conn, peer, node.peer_id())),
            Err(e) => Err(e),
        }
    };
    if info.reachable {
        return direct.await;
    }
    if info.homes.is_empty() {
        // A record with neither: the peer has just started (it publishes
        // before it knows whether it is reachable) or has lost its homes.
        return direct.await.map_err(|e| match e {
            ConnectError::Timeout { addr, .. } => ConnectError::Traversal {
                peer,
                reason: format!(
                    "no answer from {addr}, and its record lists no home to signal through \
                     (it may have just started or lost its homes; try again in a few seconds)"
                ),
            },
            other => other,
        });
    }
    let via_homes = through_homes(node, peer, &info.homes);
    // Punching cannot open a path between two NATs that both map per
    // destination: relay at once there, and otherwise when the direct
    // dial and punching have not made a session within the deadline.
    let hopeless =
        own_mapping(node).is_endpoint_dependent() && info.mapping.is_endpoint_dependent();
    let wait = if hopeless {
        Duration::ZERO
    } else {
        crate::relay::RELAY_DEADLINE
    };
    let relayed = async {
        tokio::time::sleep(wait).await;
        if let Some(s) = node.live_session(&peer) {
            return Ok(s);
        }
        crate::relay::through_relay(node, peer, &info.homes).await
    };
    tokio::pin!(direct);
    tokio::pin!(via_homes);
    tokio::pin!(relayed);
    let (mut direct_err, mut homes_err, mut relay_err) = (None, None, None);
    loop {
        tokio::select! {
            r = &mut direct, if direct_err.is_none() => match r {
                Ok(s) => return Ok(s),
                Err(e) => direct_err = Some(e),
            },
            r = &mut via_homes, if homes_err.is_none() => match r {
                Ok(s) => return Ok(s),
                Err(e) => homes_err = Some(e),
            },
            r = &mut relayed, if relay_err.is_none() => match r {
                Ok(s) => return Ok(s),
                Err(e) => relay_err = Some(e),
            },
        }
        if direct_err.is_some() && homes_err.is_some() && relay_err.is_some() {
            // The relay's failure says the most: it was the last resort.
            return Err(relay_err
                .or(homes_err)
                .or(direct_err)
                .unwrap_or(ConnectError::NotFound(peer)));
        }
    }
}

async fn through_homes(node: &Node, peer: PeerId, homes: &[Home]) -> Result<Session, ConnectError> {
    let mut last = ConnectError::Traversal {
        peer,
        reason: "its record lists no home".into(),
    };
    for home in homes.iter().filter(|h| h.peer != node.peer_id()) {
        match through_home(node, peer, home).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::debug!(peer = %peer.short(), home = %home.peer.short(), "signalling failed: {e}");
                last = e;
            }
        }
    }
    Err(last)
}

async fn through_home(node: &Node, peer: PeerId, home: &Home) -> Result<Session, ConnectError> {
    let fail = |reason: String| ConnectError::Traversal { peer, reason };
    if node.live_session(&home.peer).is_none() {
        tokio::time::timeout(HOME_DIAL, node.connect_at(home.peer, home.addr))
            .await
            .map_err(|_| fail(format!("its home {} did not answer", home.addr)))?
            .map_err(|e| fail(format!("its home is unreachable: {e}")))?;
    }
    let session = node
        .live_session(&home.peer)
        .ok_or_else(|| fail("the session with its home closed".into()))?;
    let mut stream = node
        .open_on(&session.conn, home.peer, SIGNAL_SERVICE)
        .await
        .map_err(|e| fail(format!("its home refused signalling: {e}")))?;
    let mut nonce_bytes = [0u8; 8];
    let _ = getrandom::fill(&mut nonce_bytes);
    let nonce = u64::from_le_bytes(nonce_bytes);
    let request = Signal::ConnectRequest {
        target: peer,
        nonce,
        candidates: own_candidates(node),
    };
    // From here on, a session with the peer (even the direct dial's,
    // which the peer's punches may let through) is a punched one.
    mark_punching(node, peer, node.peer_id());
    write_signal(&mut stream.send, &request)
        .await
        .map_err(fail)?;
    let answer = read_signal(&mut stream.recv).await.map_err(fail)?;
    let _ = stream.send.finish();
    let (candidates, peer_dials) = match answer {
        Signal::Answer {
            nonce: n,
            dial,
            candidates,
        } if n == nonce => (candidates, dial),
        Signal::Refused { reason } => return Err(fail(reason)),
        other => return Err(fail(format!("unexpected signalling answer {other:?}"))),
    };
    punch(node, candidates.clone(), nonce).await;
    // Dial every candidate; if the peer dials too, its session may arrive
    // first as an inbound one.
    let dial = node.handshake_any(peer, candidates, DialKind::Punch);
    tokio::pin!(dial);
    let deadline = tokio::time::sleep(PUNCH_DIAL);
    tokio::pin!(deadline);
    let mut dial_done = false;
    loop {
        tokio::select! {
            r = &mut dial, if !dial_done => match r {
                Ok(conn) => return Ok(node.install_with(conn, peer, node.peer_id(), true)),
                Err(e) => {
                    dial_done = true;
                    if !peer_dials {
                        return Err(fail(format!("hole punching failed: {e}")));
                    }
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let Some(s) = node.live_session(&peer) {
                    return Ok(s);
                }
            }
            _ = &mut deadline => return Err(fail(format!("hole punching found no path within {}s", PUNCH_DIAL.as_secs()))),
        }
    }
}

static INTRODUCTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Serves a `p2pos/signal` stream from `peer`: as a home (a connect
/// request for one of its nodes) or as the target (an introduction).
pub(crate) async fn serve_signal(
    node: &Node,
    peer: PeerId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    use std::sync::atomic::Ordering;
    if INTRODUCTIONS.fetch_add(1, Ordering::Relaxed) >= MAX_INTRODUCTIONS {
        INTRODUCTIONS.fetch_sub(1, Ordering::Relaxed);
        let _ = send
            .write_all(
                &StreamReply {
                    status: p2pos_proto::stream::StreamStatus::Busy,
                    message: "too many signalling requests".into(),
                }
                .encode(),
            )
            .await;
        return;
    }
    if send
        .write_all(&StreamReply::accepted().encode())
        .await
        .is_ok()
    {
        let answer = match read_signal(&mut recv).await {
            Ok(Signal::ConnectRequest {
                target,
                nonce,
                candidates,
            }) => forward(node, peer, target, nonce, candidates).await,
            Ok(Signal::Introduce {
                from,
                nonce,
                candidates,
            }) if node.live_session(&peer).is_some() => {
                introduced(node, from, nonce, candidates).await
            }
            Ok(_) => Signal::Refused {
                reason: "unexpected signalling message".into(),
            },
            Err(e) => Signal::Refused { reason: e },
        };
        let _ = write_signal(&mut send, &answer).await;
        let _ = send.finish();
    }
    INTRODUCTIONS.fetch_sub(1, Ordering::Relaxed);
}

/// As a home: forwards `from`'s request to `target` and returns its answer.
async fn forward(
    node: &Node,
    from: PeerId,
    target: PeerId,
    nonce: u64,
    mut candidates: Vec<SocketAddr>,
) -> Signal {
    let refused = |reason: &str| Signal::Refused {
        reason: reason.to_owned(),
    };
    let Some(session) = node.live_session(&target) else {
        return refused(
            "this node is not (or no longer) a home of that peer: look its record up again",
        );
    };
    // The address this home sees the requester at: its NAT's mapping.
    if let Some(s) = node.live_session(&from) {
        let seen = crate::node::canonical(s.conn.remote_address());
        candidates.retain(|c| *c != seen);
        candidates.insert(0, seen);
    }
    // Answer the requester before its own wait ends, even if the peer's
    // session turns out dead.
    let exchange = async {
        let mut stream = node
            .open_on(&session.conn, target, SIGNAL_SERVICE)
            .await
            .map_err(|_| "the peer did not accept signalling from its home".to_owned())?;
        let intro = Signal::Introduce {
            from,
            nonce,
            candidates,
        };
        write_signal(&mut stream.send, &intro)
            .await
            .map_err(|_| "the session with the peer failed".to_owned())?;
        let answer = read_signal(&mut stream.recv).await;
        let _ = stream.send.finish();
        answer
    };
    let answer = match tokio::time::timeout(SIGNAL_TIMEOUT - Duration::from_secs(1), exchange).await
    {
        Ok(a) => a,
        Err(_) => {
            Err("the peer did not answer its home in time (its session may be gone)".to_owned())
        }
    };
    match answer {
        Ok(Signal::Answer {
            nonce,
            dial,
            candidates: mut answer_candidates,
        }) => {
            let seen = crate::node::canonical(session.conn.remote_address());
            answer_candidates.retain(|c| *c != seen);
            answer_candidates.insert(0, seen);
            Signal::Answer {
                nonce,
                dial,
                candidates: answer_candidates,
            }
        }
        Ok(other @ Signal::Refused { .. }) => other,
        Ok(_) => refused("the peer answered something unexpected"),
        Err(e) => refused(&e),
    }
}

/// As the target: punches toward `from`, dials it too if this node's NAT
/// maps per destination, and answers with this node's candidates.
async fn introduced(node: &Node, from: PeerId, nonce: u64, candidates: Vec<SocketAddr>) -> Signal {
    if from == node.peer_id() {
        return Signal::Refused {
            reason: "a node cannot connect to itself".into(),
        };
    }
    let candidates: Vec<SocketAddr> = candidates
        .into_iter()
        .take(p2pos_proto::traversal::MAX_CANDIDATES)
        .collect();
    mark_punching(node, from, from);
    punch(node, candidates.clone(), nonce).await;
    let dial = answerer_dials(own_mapping(node));
    if dial && node.live_session(&from).is_none() {
        let node = node.clone();
        tokio::spawn(async move {
            if let Ok(Ok(conn)) = tokio::time::timeout(
                PUNCH_DIAL,
                node.handshake_any(from, candidates, DialKind::Punch),
            )
            .await
            {
                node.install_with(conn, from, node.peer_id(), true);
            }
        });
    }
    Signal::Answer {
        nonce,
        dial,
        candidates: own_candidates(node),
    }
}
