//! The node: sessions by peer ID, services, streams and datagrams.
//!
//! Message flow of a stream:
//!
//! 1. [`Node::open_stream`] finds or makes the session with the peer
//!    ([`Node::connect`]): a QUIC handshake in which both ends prove their
//!    keys (see `p2pos_net::tls`).
//! 2. It opens a QUIC bidirectional stream and writes a `StreamOpen` header
//!    naming the service (`p2pos_proto::stream`).
//! 3. The peer's session task reads the header and hands the stream to the
//!    service's [`ServiceListener`]; the service accepts (or rejects) it, and
//!    the reply travels back. From then on the stream carries the
//!    application's bytes.
//!
//! Simultaneous dials are resolved so that both ends keep the same session
//! and close the other with [`CLOSE_DUPLICATE`]: in a hole-punching attempt
//! the initiator's dial wins (its connect call has already handed that
//! session out), otherwise `p2pos_proto::session::new_session_wins` decides.
//! The losing session leaves the session table at once, but it is closed
//! only when the application streams on it have ended: a stream either end
//! opened on it just before the other end decided runs to its end instead of
//! being cut. A stream whose opening fails because the peer closed the
//! session as a duplicate waits (at most two seconds) for the twin the peer
//! kept and is retried on it, rather than dialing a third session that would
//! lose as well. Two sessions dialed by the same end within [`TWIN_WINDOW`]
//! are that end's parallel handshakes (to several addresses of the peer,
//! or by several routes at once): the first one stays, as the dialer
//! handed it out, and the later one is closed; a handshake the dialer gave
//! up on would otherwise replace the session in use at the other end. A
//! session arriving more than [`TWIN_WINDOW`] after the one it duplicates
//! replaces it: the peer lost the old one (it crashed and restarted, or its
//! address changed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2pos_net::{BoundEndpoint, DialKind, EndpointOptions};
use p2pos_proto::lan::{
    decode_service_list, encode_service_list, service_list_frame_len, ServiceAd, MAX_DESCRIPTION,
};
use p2pos_proto::network::NetworkKey;
use p2pos_proto::session::{new_session_wins, PathKind};
use p2pos_proto::stream::{
    decode_datagram, encode_datagram, validate_service_name, HeaderError, ServiceNameError,
    StreamOpen, StreamReply, StreamStatus, MAX_SERVICE_NAME,
};
use p2pos_proto::{Keypair, PeerId};
use quinn::{RecvStream, SendStream, VarInt};

use tokio::sync::{mpsc, watch};

use crate::data_dir::{DataDir, IdentityError};
use crate::lan::{LanDiscovery, LanStatus};
use crate::services::{RemoteService, RemoteServices, ServiceEvent, Visibility, SERVICES_SERVICE};
use crate::status::{CountersStatus, NodeStatus, ServiceStatus, SessionStatus};
use crate::store::PeerStore;
use crate::tunnel::TunnelRegistry;

/// QUIC close code: a duplicate session lost to its twin.
pub const CLOSE_DUPLICATE: u32 = 1;
/// QUIC close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 2;
/// QUIC close code: the peer sent nothing for too long.
pub const CLOSE_DEAD: u32 = 3;
/// Stream error code: the service or tunnel target failed.
pub const STREAM_FAILED: u32 = 1;

/// Streams waiting in a service's queue before new ones are refused as busy.
pub const SERVICE_BACKLOG: usize = 64;
/// Datagrams waiting in a service's queue before new ones are dropped.
pub const DATAGRAM_BACKLOG: usize = 256;
/// How long an opener waits for the dial to complete.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an opener waits for the service to accept a stream.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stream may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further incoming ones are refused.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Live sessions at most; handshakes beyond it are refused.
pub const MAX_SESSIONS: usize = 4096;
/// Peers whose last address is kept in memory (in front of the store).
const MAX_ADDRESS_BOOK: usize = 4096;

/// Sessions with one peer, dialed by different ends and established within
/// this time of each other, are twins of a simultaneous dial (see the module
/// docs); otherwise the later one replaces the earlier.
pub const TWIN_WINDOW: Duration = Duration::from_secs(5);

/// How long a stream opener whose session the peer closed as a duplicate
/// waits for the twin the peer kept to be established here, before it dials
/// again. The twin is already established at the peer, so it arrives within
/// a round trip; dialing instead would make a third session that loses too.
const TWIN_WAIT: Duration = Duration::from_secs(2);

/// The built-in echo service used by [`Node::ping`].
pub const PING_SERVICE: &str = "p2pos/ping";

/// Why a session could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// No address is known for the peer and the node has no DHT.
    #[error("no address known for peer {0}: pass its address (--addr IP:PORT)")]
    NoAddress(PeerId),
    /// The DHT has no record of the peer.
    #[error("peer {0} was not found in the DHT (offline, or not yet published): pass its address (--addr IP:PORT) if you know it")]
    NotFound(PeerId),
    /// The node at the address holds another key.
    #[error("the node at {addr} is not {expected}: it presented another peer ID (wrong ID or wrong address?)")]
    WrongPeer {
        /// The ID that was dialed.
        expected: PeerId,
        /// The address dialed.
        addr: SocketAddr,
    },
    /// No answer in time.
    #[error("no answer from {addr} within {}s: the peer is offline, unreachable, or in a different network", .after.as_secs())]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
        /// How long the dial waited.
        after: Duration,
    },
    /// The handshake failed for another reason.
    #[error("handshake with {addr} failed: {reason}")]
    Handshake {
        /// The address dialed.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// A node cannot open a session to itself.
    #[error("that is this node's own peer ID")]
    SelfDial,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Shutdown,
    /// The peer is behind a NAT and hole punching through its homes failed.
    #[error("could not reach {peer} through NAT: {reason}")]
    Traversal {
        /// The peer.
        peer: PeerId,
        /// What failed.
        reason: String,
    },
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenStreamError {
    /// No session.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The service name is invalid.
    #[error("invalid service name: {0}")]
    ServiceName(#[from] ServiceNameError),
    /// The peer refused the stream.
    #[error("peer {peer} refused the stream for service {service:?}: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// The service.
        service: String,
        /// What the peer said.
        reason: String,
        /// The status it answered.
        status: RefusalKind,
    },
    /// The session broke while opening.
    #[error("session with {peer} failed while opening the stream: {reason}")]
    Session {
        /// The peer.
        peer: PeerId,
        /// What failed.
        reason: String,
    },
}

/// Why a peer refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// No such service on the peer.
    NoSuchService,
    /// The service had too many streams waiting or did not accept in time.
    Busy,
    /// The service failed (e.g. a tunnel's target refused).
    Failed,
    /// Not offered to this peer.
    Forbidden,
}

/// Why a service could not be registered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ListenError {
    /// The name is invalid.
    #[error("invalid service name: {0}")]
    Name(#[from] ServiceNameError),
    /// The name is taken.
    #[error("service {0:?} is already registered on this node")]
    Taken(String),
    /// The name is reserved for the node.
    #[error("service names starting with p2pos/ are reserved")]
    Reserved,
    /// The description is too long.
    #[error("a service description has at most {MAX_DESCRIPTION} bytes, this one has {0}")]
    Description(usize),
}

/// Why a datagram could not be sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DatagramError {
    /// No session.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The service name is invalid.
    #[error("invalid service name: {0}")]
    ServiceName(#[from] ServiceNameError),
    /// Larger than the path allows.
    #[error("datagram of {size} bytes is larger than the session allows ({max})")]
    TooLarge {
        /// The size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// The session refused it.
    #[error("datagram not sent: {0}")]
    Send(String),
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Identity problem.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Socket or TLS problem.
    #[error(transparent)]
    Bind(#[from] p2pos_net::BindError),
    /// Store problem.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A stream between two nodes: the halves of a QUIC bidirectional stream.
#[derive(Debug)]
pub struct BiStream {
    /// The peer at the other end.
    pub peer: PeerId,
    /// Bytes to the peer. `finish()` is a half-close.
    pub send: SendStream,
    /// Bytes from the peer.
    pub recv: RecvStream,
    /// Keeps a session that lost to its twin open until the stream ends.
    held: Option<StreamHold>,
}

/// How many application streams a session carries. A session that lost to
/// its twin is closed when the count reaches zero, so that a stream opened on
/// it in the instant before the decision is not cut.
#[derive(Debug)]
pub(crate) struct StreamUse(watch::Sender<usize>);

impl StreamUse {
    fn new() -> Arc<Self> {
        Arc::new(Self(watch::Sender::new(0)))
    }

    /// Counts one more stream until the hold is dropped.
    fn hold(self: &Arc<Self>) -> StreamHold {
        self.0.send_modify(|n| *n += 1);
        StreamHold(self.clone())
    }

    /// Closes `conn` once no stream holds it (or at once if none does).
    fn retire(self: &Arc<Self>, conn: quinn::Connection) {
        let mut open = self.0.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = open.wait_for(|n| *n == 0) => {
                    conn.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate session");
                }
                _ = conn.closed() => {}
            }
        });
    }
}

/// One stream counted in a [`StreamUse`].
#[derive(Debug)]
struct StreamHold(Arc<StreamUse>);

impl Drop for StreamHold {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A stream a peer opened for a service, not yet accepted or rejected.
#[derive(Debug)]
pub struct IncomingStream {
    /// Who opened it.
    pub peer: PeerId,
    /// The service it asked for.
    pub service: String,
    /// When it arrived.
    pub arrived: Instant,
    send: Option<SendStream>,
    recv: Option<RecvStream>,
    held: Option<StreamHold>,
}

impl IncomingStream {
    /// Accepts the stream: tells the opener, and returns the stream.
    pub async fn accept(mut self) -> std::io::Result<BiStream> {
        let (Some(mut send), Some(recv)) = (self.send.take(), self.recv.take()) else {
            return Err(std::io::Error::other("stream already taken"));
        };
        send.write_all(&StreamReply::accepted().encode()).await?;
        Ok(BiStream {
            peer: self.peer,
            send,
            recv,
            held: self.held.take(),
        })
    }

    /// Rejects the stream with a reason the opener sees.
    pub async fn reject(mut self, status: StreamStatus, message: &str) {
        if let Some(mut send) = self.send.take() {
            let reply = StreamReply {
                status,
                message: message.to_owned(),
            };
            let _ = send.write_all(&reply.encode()).await;
            let _ = send.finish();
        }
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if let Some(mut send) = self.send.take() {
            let _ = send.reset(VarInt::from_u32(STREAM_FAILED));
        }
        if let Some(mut recv) = self.recv.take() {
            let _ = recv.stop(VarInt::from_u32(STREAM_FAILED));
        }
    }
}

/// A registered service: streams and datagrams peers send to it.
#[derive(Debug)]
pub struct ServiceListener {
    name: String,
    generation: u64,
    streams: mpsc::Receiver<IncomingStream>,
    datagrams: mpsc::Receiver<(PeerId, Bytes)>,
    node: Weak<Inner>,
}

impl ServiceListener {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next stream a peer opened; `None` once the node stops.
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.streams.recv().await
    }

    /// The next datagram a peer sent; `None` once the node stops.
    pub async fn recv_datagram(&mut self) -> Option<(PeerId, Bytes)> {
        self.datagrams.recv().await
    }

    /// A datagram if one is waiting.
    pub fn try_recv_datagram(&mut self) -> Option<(PeerId, Bytes)> {
        self.datagrams.try_recv().ok()
    }
}

impl Drop for ServiceListener {
    fn drop(&mut self) {
        if let Some(inner) = self.node.upgrade() {
            let mut services = lock(&inner.services);
            if services.get(&self.name).map(|s| s.generation) == Some(self.generation) {
                services.remove(&self.name);
                inner.services_changed.send_modify(|v| *v += 1);
            }
        }
    }
}

#[derive(Debug)]
struct ServiceEntry {
    generation: u64,
    description: String,
    visibility: Visibility,
    streams: mpsc::Sender<IncomingStream>,
    datagrams: mpsc::Sender<(PeerId, Bytes)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) conn: quinn::Connection,
    dialer: PeerId,
    established: Instant,
    /// Made by hole punching (path `punched` unless it runs over the LAN).
    punched: bool,
    /// The application streams it carries.
    streams: Arc<StreamUse>,
}

#[derive(Debug, Default)]
struct NodeCounters {
    sessions_opened: AtomicU64,
    duplicate_sessions_closed: AtomicU64,
    streams_in: AtomicU64,
    streams_out: AtomicU64,
    streams_refused: AtomicU64,
    bad_stream_headers: AtomicU64,
    datagrams_dropped: AtomicU64,
    handshakes_refused: AtomicU64,
}

pub(crate) struct Inner {
    keypair: Keypair,
    endpoint: BoundEndpoint,
    pub(crate) network: Option<NetworkKey>,
    pub(crate) keepalive: crate::keepalive::KeepaliveState,
    sessions: Mutex<HashMap<PeerId, Session>>,
    /// Last address of recent peers: lets a node redial a peer whose
    /// session just closed (e.g. the losing twin of a simultaneous dial)
    /// even without a peer store.
    address_book: Mutex<HashMap<PeerId, SocketAddr>>,
    dialing: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
    /// Woken each time a session is installed.
    installed: tokio::sync::Notify,
    services: Mutex<HashMap<String, ServiceEntry>>,
    service_generation: AtomicU64,
    /// Bumped whenever a service is registered or removed.
    services_changed: tokio::sync::watch::Sender<u64>,
    remote_services: RemoteServices,
    lan: std::sync::OnceLock<LanDiscovery>,
    /// Why LAN discovery is not running (`off` or `failed: …`).
    lan_off: Mutex<String>,
    /// Peers a hole-punching attempt runs with: a session with one of them
    /// made in the next seconds is a punched one.
    pub(crate) punching: Mutex<HashMap<PeerId, crate::traversal::Punching>>,
    /// The port mapping the router gave (PCP / NAT-PMP).
    pub(crate) portmap: crate::portmap::PortMapState,
    /// This node's homes (when it is not reachable).
    pub(crate) homes: Mutex<Vec<p2pos_proto::traversal::Home>>,
    /// This node's relayed sessions.
    pub(crate) relayed: crate::relay::RelayedState,
    pending_handshakes: AtomicU64,
    store: Option<PeerStore>,
    data_dir: Option<DataDir>,
    counters: NodeCounters,
    started: Instant,
    pub(crate) tunnels: TunnelRegistry,
    dht: std::sync::OnceLock<crate::dht::DhtHandle>,
}

impl Inner {
    pub(crate) fn endpoint_path_inbox(
        &self,
    ) -> &std::sync::Mutex<Option<mpsc::Receiver<p2pos_net::socket::PathDatagram>>> {
        &self.endpoint.path_inbox
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.keypair.peer_id())
            .field("local_addr", &self.endpoint.local_addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every
    // critical section is a single map operation), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a [`Node`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use p2pos_node::Node;
/// let node = Node::builder()
///     .data_dir("/tmp/p2pos-a")
///     .listen("127.0.0.1:0".parse()?)
///     .spawn()
///     .await?;
/// println!("I am {}", node.peer_id());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NodeBuilder {
    mdns: bool,
    port_mapping: bool,
    dht_enabled: bool,
    dht_mode: crate::dht::DhtMode,
    data_dir: Option<PathBuf>,
    keypair: Option<Keypair>,
    listen: Option<SocketAddr>,
    network: Option<NetworkKey>,
    idle_timeout: Option<Duration>,
    keepalive: Option<Duration>,
    relay: p2pos_proto::relay::RelayLimits,
    direct_upgrade: bool,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            mdns: false,
            port_mapping: false,
            dht_enabled: true,
            dht_mode: crate::dht::DhtMode::Auto,
            data_dir: None,
            keypair: None,
            listen: None,
            network: None,
            idle_timeout: None,
            keepalive: None,
            relay: p2pos_proto::relay::RelayLimits::default(),
            direct_upgrade: true,
        }
    }
}

impl NodeBuilder {
    /// Whether the node runs the DHT (default: yes), and whether it serves
    /// routing and storage (default: `auto`, decided by reachability).
    pub fn dht(mut self, enabled: bool, mode: crate::dht::DhtMode) -> Self {
        self.dht_enabled = enabled;
        self.dht_mode = mode;
        self
    }

    /// Whether the node announces itself and looks for peers on its LAN
    /// with mDNS (default: no; the daemon turns it on unless configured
    /// off). A node bound to a loopback address never does.
    pub fn mdns(mut self, enabled: bool) -> Self {
        self.mdns = enabled;
        self
    }

    /// Whether the node asks its router to map its port (PCP, NAT-PMP)
    /// when it sits behind a NAT (default: no; the daemon turns it on
    /// unless configured off). A node bound to loopback never does.
    pub fn port_mapping(mut self, enabled: bool) -> Self {
        self.port_mapping = enabled;
        self
    }

    /// Keep identity and peer store in this directory (created if needed).
    /// Without it the node has a fresh identity and remembers nothing.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Use this identity instead of the data dir's.
    pub fn keypair(mut self, keypair: Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// The UDP address to bind (default `[::]:0`, any free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Join a private network instead of the public one.
    pub fn network(mut self, key: NetworkKey) -> Self {
        self.network = Some(key);
        self
    }

    /// What this node relays for others, when it is reachable and a peer
    /// of one of its sessions cannot be reached directly (default:
    /// [`p2pos_proto::relay::RelayLimits::default`]).
    pub fn relay_limits(mut self, limits: p2pos_proto::relay::RelayLimits) -> Self {
        self.relay = limits;
        self
    }

    /// Whether relayed sessions look for a direct path and move to it
    /// (default: yes). Off only to measure relaying itself.
    pub fn direct_upgrade(mut self, enabled: bool) -> Self {
        self.direct_upgrade = enabled;
        self
    }

    /// Session idle timeout and keepalive interval.
    pub fn session_timers(mut self, idle_timeout: Duration, keepalive: Duration) -> Self {
        self.idle_timeout = Some(idle_timeout);
        self.keepalive = Some(keepalive);
        self
    }

    /// Binds the socket and starts the node. Must run inside a tokio
    /// runtime.
    pub async fn spawn(self) -> Result<Node, NodeError> {
        let data_dir = self.data_dir.map(DataDir::open).transpose()?;
        let keypair = match (self.keypair, &data_dir) {
            (Some(k), _) => k,
            (None, Some(dir)) => dir.load_or_create_identity()?,
            (None, None) => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
                Keypair::from_seed(seed)
            }
        };
        let store = match &data_dir {
            Some(dir) => Some(PeerStore::open(&dir.file("peers.redb"))?),
            None => None,
        };
        let mut options = EndpointOptions {
            network: self.network.clone(),
            ..EndpointOptions::default()
        };
        if let Some(listen) = self.listen {
            options.listen = listen;
        }
        if let Some(t) = self.idle_timeout {
            options.idle_timeout = t;
        }
        if let Some(k) = self.keepalive {
            options.keepalive = k;
        }
        options.app_keepalive = true;
        let endpoint = BoundEndpoint::bind(&keypair, &options)?;
        endpoint.socket.set_relay_limits(self.relay);
        let inner = Arc::new(Inner {
            keypair,
            endpoint,
            network: self.network,
            keepalive: crate::keepalive::KeepaliveState::new(
                options.keepalive,
                options.idle_timeout,
            ),
            sessions: Mutex::default(),
            address_book: Mutex::default(),
            dialing: Mutex::default(),
            installed: tokio::sync::Notify::new(),
            services: Mutex::default(),
            service_generation: AtomicU64::new(0),
            services_changed: tokio::sync::watch::channel(0).0,
            remote_services: RemoteServices::default(),
            lan: std::sync::OnceLock::new(),
            lan_off: Mutex::new("off".to_owned()),
            punching: Mutex::default(),
            portmap: crate::portmap::PortMapState::off(),
            homes: Mutex::default(),
            relayed: crate::relay::RelayedState::new(self.direct_upgrade),
            pending_handshakes: AtomicU64::new(0),
            store,
            data_dir,
            counters: NodeCounters::default(),
            started: Instant::now(),
            tunnels: TunnelRegistry::default(),
            dht: std::sync::OnceLock::new(),
        });
        let node = Node { inner };
        node.spawn_accept_loop();
        crate::relay::spawn_paths_task(&node);
        let binding_inbox = node
            .inner
            .endpoint
            .binding_inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(inbox) = binding_inbox {
            crate::keepalive::spawn(&node, inbox);
        }
        if self.dht_enabled {
            let inbox = node
                .inner
                .endpoint
                .dht_inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(inbox) = inbox {
                let handle = crate::dht::DhtHandle::spawn(
                    node.inner.keypair.clone(),
                    p2pos_proto::dht::DhtConfig::default(),
                    node.inner.endpoint.overlay.clone(),
                    inbox,
                    crate::dht::DhtOptions {
                        mode: self.dht_mode,
                        network: node.inner.network.clone(),
                        bound: node.local_addr(),
                    },
                );
                let _ = node.inner.dht.set(handle);
                crate::traversal::spawn_homes(&node);
            }
        }
        if self.port_mapping && !node.local_addr().ip().is_loopback() {
            crate::portmap::spawn(&node);
        }
        if self.mdns && !node.local_addr().ip().is_loopback() {
            match LanDiscovery::start(&node, node.local_addr()) {
                Ok(lan) => {
                    let _ = node.inner.lan.set(lan);
                }
                Err(e) => {
                    tracing::warn!("LAN discovery (mDNS) is off: {e}");
                    *lock(&node.inner.lan_off) = format!("failed: {e}");
                }
            }
        }
        tracing::info!(peer_id = %node.peer_id(), addr = %node.local_addr(), "node started");
        Ok(node)
    }
}

/// A running p2pos node. Cheap to clone; all clones are the same node.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl Node {
    /// Starts building a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.inner.keypair.peer_id()
    }

    /// The UDP address the node is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr
    }

    /// The data directory, if the node has one.
    pub fn data_dir(&self) -> Option<&DataDir> {
        self.inner.data_dir.as_ref()
    }

    /// Addresses peers can dial: the bound address, or with a wildcard
    /// bind, the address of every interface on the bound port.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        listen_addrs_for(self.local_addr())
    }

    fn spawn_accept_loop(&self) {
        let weak = Arc::downgrade(&self.inner);
        let endpoint = self.inner.endpoint.quic.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Some(inner) = weak.upgrade() else { break };
                if inner.pending_handshakes.load(Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES as u64
                {
                    inner
                        .counters
                        .handshakes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
                inner.pending_handshakes.fetch_add(1, Ordering::Relaxed);
                let node = Node { inner };
                tokio::spawn(async move {
                    let result = tokio::time::timeout(DIAL_TIMEOUT, async { incoming.await }).await;
                    node.inner
                        .pending_handshakes
                        .fetch_sub(1, Ordering::Relaxed);
                    match result {
                        Ok(Ok(conn)) => match p2pos_net::tls::peer_id_of(&conn) {
                            Some(peer)
                                if p2pos_net::is_virtual(conn.remote_address())
                                    && !node.inner.relayed.admits(conn.remote_address(), peer) =>
                            {
                                conn.close(
                                    VarInt::from_u32(0),
                                    b"not the peer this relayed path is for",
                                );
                            }
                            Some(peer) => {
                                node.install(conn, peer, peer);
                            }
                            None => conn.close(VarInt::from_u32(0), b"no peer key"),
                        },
                        Ok(Err(e)) => tracing::debug!("incoming handshake failed: {e}"),
                        Err(_) => tracing::debug!("incoming handshake timed out"),
                    }
                });
            }
        });
    }

    /// Records a new session; returns the session that survives (the new one
    /// or its twin, see the module docs).
    pub(crate) fn install(&self, conn: quinn::Connection, peer: PeerId, dialer: PeerId) -> Session {
        self.install_with(conn, peer, dialer, false)
    }

    /// [`Self::install`], saying whether hole punching made the session.
    pub(crate) fn install_with(
        &self,
        conn: quinn::Connection,
        peer: PeerId,
        dialer: PeerId,
        punched: bool,
    ) -> Session {
        let punch = lock(&self.inner.punching)
            .get(&peer)
            .copied()
            .filter(|p| p.at.elapsed() < crate::traversal::PUNCH_WINDOW);
        let punched = punched || punch.is_some();
        let new = Session {
            conn: conn.clone(),
            dialer,
            established: Instant::now(),
            punched,
            streams: StreamUse::new(),
        };
        {
            let mut sessions = lock(&self.inner.sessions);
            if let Some(existing) = sessions.get(&peer) {
                if existing.conn.close_reason().is_none()
                    && existing.conn.stable_id() != conn.stable_id()
                {
                    self.inner
                        .counters
                        .duplicate_sessions_closed
                        .fetch_add(1, Ordering::Relaxed);
                    // A session arriving more than TWIN_WINDOW after the
                    // existing one means the peer lost that one (e.g. it
                    // restarted): the new one wins. Within the window, the
                    // same end's parallel handshakes keep the first, and
                    // simultaneous dials by both ends keep the same one:
                    // in a punching attempt the initiator's (its connect
                    // call already handed that session out).
                    let keep_existing = existing.established.elapsed() < TWIN_WINDOW
                        && (existing.dialer == dialer
                            || match punch.and_then(|p| p.initiator) {
                                Some(initiator) => dialer != initiator,
                                None => !new_session_wins(existing.dialer, dialer),
                            });
                    if keep_existing {
                        tracing::debug!(peer = %peer.short(), "closing duplicate session (twin kept)");
                        // No stream was accepted on it yet: a peer's
                        // opening fails and is retried on the survivor.
                        conn.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate session");
                        return existing.clone();
                    }
                    tracing::debug!(peer = %peer.short(), "closing older duplicate session");
                    existing.streams.retire(existing.conn.clone());
                }
            }
            sessions.insert(peer, new.clone());
        }
        self.inner.installed.notify_waiters();
        self.inner
            .counters
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        let remote = canonical(conn.remote_address());
        let relayed = p2pos_net::is_virtual(remote);
        if !relayed {
            let mut book = lock(&self.inner.address_book);
            if book.len() >= MAX_ADDRESS_BOOK && !book.contains_key(&peer) {
                if let Some(evict) = book.keys().next().copied() {
                    book.remove(&evict);
                }
            }
            book.insert(peer, conn.remote_address());
        }
        tracing::info!(peer = %peer, %remote, direction = if dialer == self.peer_id() { "outbound" } else { "inbound" }, "session established");
        if let Some(dht) = self.inner.dht.get().filter(|_| !relayed) {
            dht.note_contacted(remote.ip());
        }
        if self.inner.store.is_some() && !relayed {
            // A store write syncs to disk: keep it off the async workers.
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(Err(e)) = inner.store.as_ref().map(|s| s.record(peer, remote)) {
                    tracing::warn!("{e}");
                }
            });
        }
        self.spawn_session_tasks(peer, conn.clone(), new.streams.clone());
        let node = self.clone();
        tokio::spawn(async move { node.subscribe_services(peer, conn).await });
        new
    }

    fn spawn_session_tasks(&self, peer: PeerId, conn: quinn::Connection, streams: Arc<StreamUse>) {
        let weak = Arc::downgrade(&self.inner);
        let streams_conn = conn.clone();
        let streams_weak = weak.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = streams_conn.accept_bi().await {
                let Some(inner) = streams_weak.upgrade() else {
                    break;
                };
                let node = Node { inner };
                let held = streams.hold();
                tokio::spawn(
                    async move { node.handle_incoming_stream(peer, send, recv, held).await },
                );
            }
        });
        let datagram_conn = conn.clone();
        let datagram_weak = weak.clone();
        tokio::spawn(async move {
            while let Ok(datagram) = datagram_conn.read_datagram().await {
                let Some(inner) = datagram_weak.upgrade() else {
                    break;
                };
                Node { inner }.handle_datagram(peer, datagram);
            }
        });
        tokio::spawn(async move {
            let reason = conn.closed().await;
            if let Some(inner) = weak.upgrade() {
                let mut sessions = lock(&inner.sessions);
                if sessions.get(&peer).map(|s| s.conn.stable_id()) == Some(conn.stable_id()) {
                    sessions.remove(&peer);
                    drop(sessions);
                    tracing::info!(peer = %peer, "session closed: {reason}");
                    // A LAN peer that did not say it is leaving is dialed
                    // again (e.g. it restarted, or a timeout cut a working
                    // session).
                    let leaving = matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == VarInt::from_u32(CLOSE_SHUTDOWN));
                    if !leaving {
                        Node { inner }.keep_lan_session(peer);
                    }
                }
            }
        });
    }

    async fn handle_incoming_stream(
        &self,
        peer: PeerId,
        mut send: SendStream,
        mut recv: RecvStream,
        held: StreamHold,
    ) {
        self.inner
            .counters
            .streams_in
            .fetch_add(1, Ordering::Relaxed);
        let header = tokio::time::timeout(HEADER_TIMEOUT, read_open_header(&mut recv)).await;
        let open = match header {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                self.inner
                    .counters
                    .bad_stream_headers
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer.short(), "bad stream header: {e}");
                let _ = send.reset(VarInt::from_u32(STREAM_FAILED));
                return;
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(STREAM_FAILED));
                return;
            }
        };
        // The node's own protocols follow the surviving session themselves;
        // only the application's streams (and pings) hold a losing one open.
        let internal = [
            SERVICES_SERVICE,
            crate::traversal::SIGNAL_SERVICE,
            crate::relay::RELAY_SERVICE,
        ];
        let held = (!internal.contains(&open.service.as_str())).then_some(held);
        if open.service == SERVICES_SERVICE {
            self.serve_services(peer, send, recv).await;
            return;
        }
        if open.service == crate::traversal::SIGNAL_SERVICE {
            crate::traversal::serve_signal(self, peer, send, recv).await;
            return;
        }
        if open.service == crate::relay::RELAY_SERVICE {
            crate::relay::serve_relay(self, peer, send, recv).await;
            return;
        }
        if open.service == PING_SERVICE {
            if send
                .write_all(&StreamReply::accepted().encode())
                .await
                .is_ok()
            {
                let _ = tokio::io::copy(&mut recv, &mut send).await;
                let _ = send.finish();
            }
            return;
        }
        let incoming = IncomingStream {
            peer,
            service: open.service.clone(),
            arrived: Instant::now(),
            send: Some(send),
            recv: Some(recv),
            held,
        };
        let sender = lock(&self.inner.services)
            .get(&open.service)
            .map(|s| s.streams.clone());
        let refusal = match sender {
            None => Some((
                StreamStatus::NoSuchService,
                "no such service on this node".to_owned(),
            )),
            Some(tx) => match tx.try_send(incoming) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back))
                | Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.inner
                        .counters
                        .streams_refused
                        .fetch_add(1, Ordering::Relaxed);
                    back.reject(StreamStatus::Busy, "service busy: too many streams waiting")
                        .await;
                    return;
                }
            },
        };
        if let Some((status, message)) = refusal {
            self.inner
                .counters
                .streams_refused
                .fetch_add(1, Ordering::Relaxed);
            incoming.reject(status, &message).await;
        }
    }

    fn handle_datagram(&self, peer: PeerId, datagram: Bytes) {
        let Ok((service, payload)) = decode_datagram(&datagram) else {
            self.inner
                .counters
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if service == crate::keepalive::KEEPALIVE_SERVICE {
            return;
        }
        let offset = datagram.len() - payload.len();
        let sender = lock(&self.inner.services)
            .get(service)
            .map(|s| s.datagrams.clone());
        let delivered =
            sender.is_some_and(|tx| tx.try_send((peer, datagram.slice(offset..))).is_ok());
        if !delivered {
            self.inner
                .counters
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn live_session(&self, peer: &PeerId) -> Option<Session> {
        lock(&self.inner.sessions)
            .get(peer)
            .filter(|s| s.conn.close_reason().is_none())
            .cloned()
    }

    /// Waits (at most [`TWIN_WAIT`]) for a live session with `peer`.
    async fn await_twin(&self, peer: PeerId) {
        let deadline = tokio::time::Instant::now() + TWIN_WAIT;
        loop {
            let installed = self.inner.installed.notified();
            if self.live_session(&peer).is_some()
                || tokio::time::timeout_at(deadline, installed).await.is_err()
            {
                return;
            }
        }
    }

    /// Makes sure a session with `peer` exists, dialing `addr` (or the
    /// address the peer store remembers) if there is none.
    pub async fn connect(
        &self,
        peer: PeerId,
        addr: Option<SocketAddr>,
    ) -> Result<(), ConnectError> {
        self.session(peer, addr).await.map(|_| ())
    }

    async fn session(
        &self,
        peer: PeerId,
        addr: Option<SocketAddr>,
    ) -> Result<Session, ConnectError> {
        if peer == self.peer_id() {
            return Err(ConnectError::SelfDial);
        }
        if let Some(s) = self.live_session(&peer) {
            return Ok(s);
        }
        let dial_lock = lock(&self.inner.dialing).entry(peer).or_default().clone();
        let result = {
            let _guard = dial_lock.lock().await;
            match self.live_session(&peer) {
                Some(s) => Ok(s),
                None => self.dial(peer, addr).await,
            }
        };
        let mut dialing = lock(&self.inner.dialing);
        if dialing
            .get(&peer)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            dialing.remove(&peer);
        }
        result
    }

    async fn dial(&self, peer: PeerId, addr: Option<SocketAddr>) -> Result<Session, ConnectError> {
        let remembered = || lock(&self.inner.address_book).get(&peer).copied();
        let stored = || {
            self.inner
                .store
                .as_ref()
                .and_then(|s| s.get(&peer).ok().flatten())
                .map(|e| e.last_addr)
        };
        if addr.is_none() {
            // LAN first: a peer found on the LAN is dialed there.
            if let Some(lan_addrs) = self.inner.lan.get().and_then(|l| l.addrs_of(&peer)) {
                match self.handshake_any(peer, lan_addrs, DialKind::Lan).await {
                    Ok(conn) => return Ok(self.install(conn, peer, self.peer_id())),
                    Err(e) => tracing::debug!(peer = %peer.short(), "LAN dial failed: {e}"),
                }
            }
        }
        if let Some(addr) = addr {
            let conn = self.handshake(peer, addr, DialKind::Normal).await?;
            return Ok(self.install(conn, peer, self.peer_id()));
        }
        let Some(last) = remembered().or_else(stored) else {
            return self.dial_by_record(peer).await;
        };
        if self.inner.dht.get().is_none() {
            let conn = self.handshake(peer, last, DialKind::Normal).await?;
            return Ok(self.install(conn, peer, self.peer_id()));
        }
        // Where the peer was last seen, and its record (which knows its
        // homes, and so how to get through its NAT), at once: an address
        // from an earlier session often leads nowhere now.
        let at_last = async {
            let conn = self.handshake(peer, last, DialKind::Normal).await?;
            Ok::<_, ConnectError>(self.install(conn, peer, self.peer_id()))
        };
        let by_record = self.dial_by_record(peer);
        tokio::pin!(at_last);
        tokio::pin!(by_record);
        tokio::select! {
            r = &mut at_last => match r {
                Ok(s) => Ok(s),
                Err(_) => by_record.await,
            },
            r = &mut by_record => match r {
                Ok(s) => Ok(s),
                Err(e) => at_last.await.map_err(|_| e),
            },
        }
    }

    /// Opens a session with `peer` through `relay` (at `relay_addr`), a
    /// node that has a session with `peer`, whether or not a direct path
    /// exists; it moves to a direct path once one is found. An existing
    /// session with `peer` is kept and nothing is dialed.
    pub async fn connect_relayed(
        &self,
        peer: PeerId,
        relay: PeerId,
        relay_addr: SocketAddr,
    ) -> Result<(), ConnectError> {
        if self.live_session(&peer).is_some() {
            return Ok(());
        }
        let home = p2pos_proto::traversal::Home {
            peer: relay,
            addr: relay_addr,
        };
        crate::relay::through_relay(self, peer, &[home])
            .await
            .map(|_| ())
    }

    /// Makes sure a session with `peer` exists, dialing exactly `addr` if
    /// there is none (never the DHT: signalling uses it to reach homes).
    pub(crate) async fn connect_at(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Session, ConnectError> {
        if let Some(s) = self.live_session(&peer) {
            return Ok(s);
        }
        let conn = self.handshake(peer, addr, DialKind::Normal).await?;
        Ok(self.install(conn, peer, self.peer_id()))
    }

    /// A QUIC handshake with `addr`, accepting only `peer` there.
    pub(crate) async fn handshake(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        kind: DialKind,
    ) -> Result<quinn::Connection, ConnectError> {
        let connecting = self
            .inner
            .endpoint
            .connect(peer, addr, kind)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => ConnectError::Shutdown,
                other => ConnectError::Handshake {
                    addr,
                    reason: other.to_string(),
                },
            })?;
        let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    after: DIAL_TIMEOUT,
                })
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                if reason.contains(p2pos_net::tls::PEER_ID_MISMATCH) {
                    return Err(ConnectError::WrongPeer {
                        expected: peer,
                        addr,
                    });
                }
                if matches!(e, quinn::ConnectionError::TimedOut) {
                    return Err(ConnectError::Timeout {
                        addr,
                        after: DIAL_TIMEOUT,
                    });
                }
                return Err(ConnectError::Handshake { addr, reason });
            }
            Ok(Ok(conn)) => conn,
        };
        Ok(conn)
    }

    /// Finds `peer`'s addresses through its peer record in the DHT and dials
    /// all of them at once: the first handshake to complete wins and the
    /// others are abandoned (a record often lists a LAN address that only
    /// peers on that LAN can reach).
    async fn dial_by_record(&self, peer: PeerId) -> Result<Session, ConnectError> {
        let Some(dht) = self.inner.dht.get() else {
            return Err(ConnectError::NoAddress(peer));
        };
        let (_, found) = dht
            .lookup_peer_info(peer)
            .await
            .map_err(|_| ConnectError::NotFound(peer))?;
        crate::traversal::connect_by_record(self, peer, found).await
    }

    /// Handshakes with `peer` at all of `addrs` at once; the first to
    /// complete wins and the others are abandoned.
    pub(crate) async fn handshake_any(
        &self,
        peer: PeerId,
        addrs: Vec<SocketAddr>,
        kind: DialKind,
    ) -> Result<quinn::Connection, ConnectError> {
        let mut attempts = tokio::task::JoinSet::new();
        // IPv6 first: where both families work, the IPv6 path (no NAT on
        // it, as a rule) wins; IPv4 follows a moment later.
        let has_v6 = addrs.iter().any(|a| {
            let a = canonical(*a);
            a.is_ipv6() && !p2pos_proto::session::is_local_ip(a.ip())
        });
        for addr in addrs {
            let node = self.clone();
            let delay = if has_v6 && canonical(addr).is_ipv4() {
                IPV4_AFTER_IPV6
            } else {
                Duration::ZERO
            };
            attempts.spawn(async move {
                tokio::time::sleep(delay).await;
                node.handshake(peer, addr, kind).await
            });
        }
        let mut last = ConnectError::NotFound(peer);
        while let Some(result) = attempts.join_next().await {
            match result {
                Ok(Ok(conn)) => {
                    // Dropping the set aborts the other handshakes.
                    return Ok(conn);
                }
                Ok(Err(e)) => {
                    // Keep the most telling failure: a wrong key beats a
                    // timeout.
                    if !matches!(last, ConnectError::WrongPeer { .. }) {
                        last = e;
                    }
                }
                Err(_) => {}
            }
        }
        Err(last)
    }

    /// The node's socket (relayed paths, relay circuits).
    pub(crate) fn socket(&self) -> Arc<p2pos_net::socket::OverlaySocket> {
        self.inner.endpoint.socket.clone()
    }

    /// The overlay of the node's socket (probes, punches).
    pub(crate) fn inner_overlay(&self) -> p2pos_net::overlay::Overlay {
        self.inner.endpoint.overlay.clone()
    }

    /// The node's DHT, if it runs one.
    pub fn dht(&self) -> Option<&crate::dht::DhtHandle> {
        self.inner.dht.get()
    }

    /// Opens a stream to `service` on `peer`. `addr` is a hint used when no
    /// session exists yet.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        service: &str,
        addr: Option<SocketAddr>,
    ) -> Result<BiStream, OpenStreamError> {
        validate_service_name(service)?;
        let mut last = None;
        for _ in 0..3 {
            let session = self.session(peer, addr).await?;
            let held = session.streams.hold();
            match self.open_on(&session.conn, peer, service).await {
                Ok(mut stream) => {
                    stream.held = Some(held);
                    self.inner
                        .counters
                        .streams_out
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                // The session lost to a twin (or died) under us: retry.
                Err(e @ OpenStreamError::Session { .. }) => {
                    if closed_as_duplicate(&session.conn) {
                        self.await_twin(peer).await;
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(OpenStreamError::Connect(ConnectError::Shutdown)))
    }

    pub(crate) async fn open_on(
        &self,
        conn: &quinn::Connection,
        peer: PeerId,
        service: &str,
    ) -> Result<BiStream, OpenStreamError> {
        let lost = |reason: String| OpenStreamError::Session { peer, reason };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        let open = StreamOpen {
            service: service.to_owned(),
        };
        send.write_all(&open.encode())
            .await
            .map_err(|e| lost(e.to_string()))?;
        let reply = tokio::time::timeout(ACCEPT_TIMEOUT, read_reply(&mut recv))
            .await
            .map_err(|_| OpenStreamError::Refused {
                peer,
                service: service.to_owned(),
                reason: format!(
                    "the service did not accept within {}s",
                    ACCEPT_TIMEOUT.as_secs()
                ),
                status: RefusalKind::Busy,
            })?
            .map_err(lost)?;
        let status = match reply.status {
            StreamStatus::Accepted => {
                return Ok(BiStream {
                    peer,
                    send,
                    recv,
                    held: None,
                })
            }
            StreamStatus::NoSuchService => RefusalKind::NoSuchService,
            StreamStatus::Busy => RefusalKind::Busy,
            StreamStatus::Failed => RefusalKind::Failed,
            StreamStatus::Forbidden => RefusalKind::Forbidden,
        };
        Err(OpenStreamError::Refused {
            peer,
            service: service.to_owned(),
            reason: reply.message,
            status,
        })
    }

    /// Registers a service; peers' streams and datagrams for it arrive at
    /// the returned listener until it is dropped.
    /// It is shown to peers on the LAN (see [`Node::listen_with`]).
    pub fn listen(&self, service: &str, description: &str) -> Result<ServiceListener, ListenError> {
        self.listen_with(service, description, Visibility::default())
    }

    /// Registers a service shown in this node's service list to the peers
    /// `visibility` names.
    pub fn listen_with(
        &self,
        service: &str,
        description: &str,
        visibility: Visibility,
    ) -> Result<ServiceListener, ListenError> {
        validate_service_name(service)?;
        if service.starts_with("p2pos/") {
            return Err(ListenError::Reserved);
        }
        if description.len() > MAX_DESCRIPTION {
            return Err(ListenError::Description(description.len()));
        }
        let mut services = lock(&self.inner.services);
        if services.contains_key(service) {
            return Err(ListenError::Taken(service.to_owned()));
        }
        let generation = self
            .inner
            .service_generation
            .fetch_add(1, Ordering::Relaxed);
        let (streams_tx, streams) = mpsc::channel(SERVICE_BACKLOG);
        let (datagrams_tx, datagrams) = mpsc::channel(DATAGRAM_BACKLOG);
        services.insert(
            service.to_owned(),
            ServiceEntry {
                generation,
                description: description.to_owned(),
                visibility,
                streams: streams_tx,
                datagrams: datagrams_tx,
            },
        );
        drop(services);
        self.inner.services_changed.send_modify(|v| *v += 1);
        Ok(ServiceListener {
            name: service.to_owned(),
            generation,
            streams,
            datagrams,
            node: Arc::downgrade(&self.inner),
        })
    }

    /// Sends a datagram to `service` on `peer` (unreliable, unordered).
    pub async fn send_datagram(
        &self,
        peer: PeerId,
        service: &str,
        payload: &[u8],
        addr: Option<SocketAddr>,
    ) -> Result<(), DatagramError> {
        validate_service_name(service)?;
        let session = self.session(peer, addr).await?;
        let datagram = encode_datagram(service, payload);
        let max = session.conn.max_datagram_size().unwrap_or(0);
        if datagram.len() > max {
            return Err(DatagramError::TooLarge {
                size: payload.len(),
                max: max.saturating_sub(1 + service.len()),
            });
        }
        session
            .conn
            .send_datagram(Bytes::from(datagram))
            .map_err(|e| DatagramError::Send(e.to_string()))
    }

    /// Measures the round trip to `peer` over an authenticated session:
    /// an 8-byte echo on the built-in ping service. Returns one RTT per
    /// echo.
    pub async fn ping(
        &self,
        peer: PeerId,
        addr: Option<SocketAddr>,
        count: u32,
    ) -> Result<Vec<Duration>, OpenStreamError> {
        let mut stream = self.open_stream(peer, PING_SERVICE, addr).await?;
        let mut rtts = Vec::new();
        for i in 0..count.max(1) {
            let start = Instant::now();
            let io = async {
                stream.send.write_all(&u64::from(i).to_be_bytes()).await?;
                let mut buf = [0u8; 8];
                stream
                    .recv
                    .read_exact(&mut buf)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            };
            io.await.map_err(|e| OpenStreamError::Session {
                peer,
                reason: e.to_string(),
            })?;
            rtts.push(start.elapsed());
        }
        let _ = stream.send.finish();
        Ok(rtts)
    }

    /// The public address the router maps to this node, if any.
    pub(crate) fn mapped_addr(&self) -> Option<SocketAddr> {
        self.inner.portmap.external()
    }

    /// The connections of all live sessions.
    pub(crate) fn session_connections(&self) -> Vec<quinn::Connection> {
        lock(&self.inner.sessions)
            .values()
            .filter(|s| s.conn.close_reason().is_none())
            .map(|s| s.conn.clone())
            .collect()
    }

    /// Whether `peer` is on this node's LAN: found by mDNS, or its session
    /// runs over a LAN path.
    pub fn is_lan_peer(&self, peer: &PeerId) -> bool {
        self.inner.lan.get().is_some_and(|l| l.knows(peer))
            || self.live_session(peer).is_some_and(|s| {
                crate::relay::path_name(self, canonical(s.conn.remote_address()), s.punched).0
                    == PathKind::Lan.as_str()
            })
    }

    /// LAN discovery's state.
    pub fn lan_status(&self) -> LanStatus {
        match self.inner.lan.get() {
            Some(lan) => lan.status(),
            None => LanStatus {
                mdns: lock(&self.inner.lan_off).clone(),
                ..LanStatus::default()
            },
        }
    }

    /// Called by LAN discovery: `peer` announced itself at `addrs`.
    pub(crate) fn lan_peer_found(&self, peer: PeerId, addrs: &[SocketAddr]) {
        if let (Some(dht), Some(addr)) = (self.inner.dht.get(), addrs.first()) {
            dht.bootstrap(*addr);
        }
        self.keep_lan_session(peer);
    }

    /// Makes sure a session with LAN peer `peer` exists, and keeps trying
    /// (with backoff) while the peer is on the LAN and has none: one task
    /// per peer.
    pub(crate) fn keep_lan_session(&self, peer: PeerId) {
        let Some(lan) = self.inner.lan.get() else {
            return;
        };
        if self.live_session(&peer).is_some() || !lan.start_dialing(peer) {
            return;
        }
        let node = self.clone();
        let me = self.peer_id();
        tokio::spawn(async move {
            let mut backoff = crate::lan::SECOND_DIAL_DELAY;
            // The smaller ID dials; the other side steps in only if it did not.
            let mut wait_first = me > peer;
            loop {
                if wait_first {
                    tokio::time::sleep(crate::lan::SECOND_DIAL_DELAY).await;
                    wait_first = false;
                }
                let lan = node.inner.lan.get().expect("set before the first dial");
                if node.live_session(&peer).is_some() || !lan.knows(&peer) {
                    break;
                }
                match node.connect(peer, None).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(peer = %peer.short(), "could not connect to LAN peer (retry in {backoff:?}): {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(crate::lan::MAX_REDIAL_BACKOFF);
                    }
                }
            }
            if let Some(lan) = node.inner.lan.get() {
                lan.done_dialing(&peer);
            }
        });
    }

    /// The services this node shows to `peer` (`lan`: whether its session
    /// runs over the LAN).
    fn services_for(&self, peer: &PeerId, lan: bool) -> Vec<ServiceAd> {
        let mut out: Vec<ServiceAd> = lock(&self.inner.services)
            .iter()
            .filter(|(_, s)| s.visibility.shows_to(peer, lan))
            .map(|(name, s)| ServiceAd {
                name: name.clone(),
                description: s.description.clone(),
            })
            .collect();
        out.sort();
        out
    }

    /// Serves `peer`'s subscription to this node's service list: the list
    /// now, and again on every change, until the peer closes the stream.
    async fn serve_services(&self, peer: PeerId, mut send: SendStream, mut recv: RecvStream) {
        if send
            .write_all(&StreamReply::accepted().encode())
            .await
            .is_err()
        {
            return;
        }
        let mut changes = self.inner.services_changed.subscribe();
        let mut last: Option<Vec<u8>> = None;
        let mut byte = [0u8; 1];
        loop {
            let lan = self.is_lan_peer(&peer);
            let frame = encode_service_list(&self.services_for(&peer, lan));
            if last.as_ref() != Some(&frame) {
                if send.write_all(&frame).await.is_err() {
                    return;
                }
                last = Some(frame);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                // The subscriber sends nothing: any read result means it is
                // gone (or misbehaving).
                _ = recv.read(&mut byte) => {
                    let _ = send.finish();
                    return;
                }
            }
        }
    }

    /// Subscribes to `peer`'s service list over session `conn`, until the
    /// stream or the session ends.
    async fn subscribe_services(&self, peer: PeerId, conn: quinn::Connection) {
        let id = conn.stable_id();
        let mut stream = match self.open_on(&conn, peer, SERVICES_SERVICE).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer.short(), "no service list from peer: {e}");
                return;
            }
        };
        loop {
            let mut prefix = [0u8; 4];
            if stream.recv.read_exact(&mut prefix).await.is_err() {
                break;
            }
            let Ok(len) = service_list_frame_len(prefix) else {
                self.inner
                    .counters
                    .bad_stream_headers
                    .fetch_add(1, Ordering::Relaxed);
                break;
            };
            let mut body = vec![0u8; len];
            if stream.recv.read_exact(&mut body).await.is_err() {
                break;
            }
            match decode_service_list(&body) {
                Ok(list) => {
                    let lan = self.is_lan_peer(&peer);
                    self.inner.remote_services.update(peer, id, lan, list);
                }
                Err(e) => {
                    self.inner
                        .counters
                        .bad_stream_headers
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.short(), "bad service list: {e}");
                    break;
                }
            }
        }
        let _ = stream.send.reset(VarInt::from_u32(0));
        self.inner.remote_services.forget(peer, id);
    }

    /// The services peers show this node (`lan_only`: only LAN peers').
    pub fn remote_services(&self, lan_only: bool) -> Vec<RemoteService> {
        self.inner
            .remote_services
            .list()
            .into_iter()
            .filter(|s| !lan_only || s.lan)
            .collect()
    }

    /// Events about peers' services from now on.
    pub fn service_events(&self) -> tokio::sync::broadcast::Receiver<ServiceEvent> {
        self.inner.remote_services.subscribe()
    }

    /// A snapshot of the node for `p2pos status` and the API.
    pub fn status(&self) -> NodeStatus {
        let me = self.peer_id();
        let mut sessions: Vec<SessionStatus> = lock(&self.inner.sessions)
            .iter()
            .filter(|(_, s)| s.conn.close_reason().is_none())
            .map(|(peer, s)| {
                let stats = s.conn.stats();
                let (path, remote) =
                    crate::relay::path_name(self, canonical(s.conn.remote_address()), s.punched);
                SessionStatus {
                    peer: peer.to_string(),
                    path,
                    rtt_ms: s.conn.rtt().as_secs_f64() * 1000.0,
                    remote_addr: remote.to_string(),
                    direction: if s.dialer == me {
                        "outbound"
                    } else {
                        "inbound"
                    }
                    .to_owned(),
                    age_s: s.established.elapsed().as_secs(),
                    bytes_sent: stats.udp_tx.bytes,
                    bytes_received: stats.udp_rx.bytes,
                }
            })
            .collect();
        sessions.sort_by(|a, b| a.peer.cmp(&b.peer));
        let mut services: Vec<ServiceStatus> = lock(&self.inner.services)
            .iter()
            .map(|(name, s)| ServiceStatus {
                name: name.clone(),
                description: s.description.clone(),
                visibility: s.visibility.clone(),
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let socket = &self.inner.endpoint.counters;
        let overlay = &self.inner.endpoint.overlay.counters;
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStatus {
            peer_id: me.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            network: match &self.inner.network {
                None => "public".to_owned(),
                Some(k) => format!("private:{}", k.id()),
            },
            listen_addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
            uptime_s: self.inner.started.elapsed().as_secs(),
            sessions,
            services,
            tunnels: self.inner.tunnels.status(),
            dht: self.inner.dht.get().map(|d| d.status()),
            reachable: self
                .inner
                .dht
                .get()
                .and_then(|d| d.reach_status().reachable),
            nat: self.inner.dht.get().map(|d| d.reach_status()),
            homes: lock(&self.inner.homes)
                .iter()
                .map(crate::dht::HomeStatus::from)
                .collect(),
            keepalive_interval_s: self.inner.keepalive.interval().as_secs_f64(),
            keepalive: self.inner.keepalive.status(),
            port_mapping: self.inner.portmap.status(),
            lan: self.lan_status(),
            relay: self.relay_status(),
            counters: CountersStatus {
                sessions_opened: get(&c.sessions_opened),
                duplicate_sessions_closed: get(&c.duplicate_sessions_closed),
                handshakes_refused: get(&c.handshakes_refused),
                streams_in: get(&c.streams_in),
                streams_out: get(&c.streams_out),
                streams_refused: get(&c.streams_refused),
                bad_stream_headers: get(&c.bad_stream_headers),
                datagrams_dropped: get(&c.datagrams_dropped),
                overlay_received: get(&socket.overlay_received),
                overlay_queue_full: get(&socket.overlay_queue_full),
                overlay_malformed: get(&overlay.malformed),
                probes_answered: get(&overlay.probes_answered),
                probes_rate_limited: get(&overlay.probes_rate_limited),
                punches_received: get(&overlay.punches_received),
                unknown_datagrams_dropped: get(&socket.unknown_dropped),
                foreign_network_dropped: get(&socket.foreign_network_dropped),
                bad_frame_dropped: get(&socket.bad_frame_dropped),
            },
        }
    }

    fn relay_status(&self) -> crate::status::RelayStatus {
        let socket = &self.inner.endpoint.socket;
        let stats = socket.relay_stats();
        let limits = socket.relay_limits();
        let counters = &self.inner.endpoint.counters;
        let relayed_sessions = lock(&self.inner.sessions)
            .values()
            .filter(|s| s.conn.close_reason().is_none())
            .filter(|s| {
                matches!(
                    socket.route(s.conn.remote_address()),
                    Some(p2pos_net::Route::Relayed { .. })
                )
            })
            .count();
        crate::status::RelayStatus {
            enabled: limits.enabled,
            circuits: stats.circuits,
            circuits_opened: stats.opened,
            circuits_refused: stats.refused,
            bytes_relayed: stats.bytes,
            packets_relayed: stats.packets,
            over_quota_dropped: stats.over_quota,
            unknown_dropped: stats.unknown,
            circuit_kib_s: limits.circuit_rate / 1024,
            total_kib_s: limits.total_rate / 1024,
            max_circuits: limits.max_circuits,
            max_circuits_per_peer: limits.max_circuits_per_peer,
            relayed_sessions,
            upgraded_to_direct: self.inner.relayed.upgraded.load(Ordering::Relaxed),
            own_packets_in: counters.relayed_in.load(Ordering::Relaxed),
            own_packets_out: counters.relayed_out.load(Ordering::Relaxed),
        }
    }

    /// Peers in the peer store.
    pub fn known_peers(&self) -> Vec<(PeerId, crate::store::PeerEntry)> {
        self.inner
            .store
            .as_ref()
            .and_then(|s| s.all().ok())
            .unwrap_or_default()
    }

    /// Asks the node at `addr` which address it sees this node at (an
    /// overlay probe; no session needed).
    pub async fn probe(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, p2pos_net::overlay::ProbeError> {
        self.inner
            .endpoint
            .overlay
            .probe(addr, timeout)
            .await
            .map(canonical)
    }

    /// Closes every session and the socket; waits briefly for peers to be
    /// told.
    pub async fn shutdown(&self) {
        if let Some(lan) = self.inner.lan.get() {
            lan.stop().await;
        }
        self.inner.portmap.release().await;
        self.inner.tunnels.stop_all();
        self.inner
            .endpoint
            .quic
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.quic.wait_idle())
            .await;
    }
}

/// Addresses peers can dial for a socket bound at `local`: the bound
/// address, or with a wildcard bind, the address of every interface on the
/// bound port (IPv6 link-local ones left out: they need a scope).
pub fn listen_addrs_for(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let v6_bound = local.is_ipv6();
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| v6_bound || ip.is_ipv4())
        .filter(
            |ip| !matches!(ip, std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80),
        )
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub use p2pos_net::canonical;

/// How long IPv4 dials wait behind IPv6 ones to the same peer.
pub const IPV4_AFTER_IPV6: Duration = Duration::from_millis(100);

async fn read_open_header(recv: &mut RecvStream) -> Result<StreamOpen, String> {
    let mut head = [0u8; 2];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let len = usize::from(head[1]).min(MAX_SERVICE_NAME + 1);
    let mut buf = vec![0u8; 2 + len];
    buf[..2].copy_from_slice(&head);
    if len > MAX_SERVICE_NAME {
        return Err(HeaderError::Name(ServiceNameError::Length).to_string());
    }
    recv.read_exact(&mut buf[2..])
        .await
        .map_err(|e| e.to_string())?;
    StreamOpen::decode(&buf)
        .map(|(open, _)| open)
        .map_err(|e| e.to_string())
}

async fn read_reply(recv: &mut RecvStream) -> Result<StreamReply, String> {
    let mut head = [0u8; 2];
    recv.read_exact(&mut head).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => "the peer closed the stream".to_owned(),
        quinn::ReadExactError::ReadError(r) => r.to_string(),
    })?;
    let mut buf = vec![0u8; 2 + usize::from(head[1])];
    buf[..2].copy_from_slice(&head);
    recv.read_exact(&mut buf[2..])
        .await
        .map_err(|e| e.to_string())?;
    StreamReply::decode(&buf)
        .map(|(r, _)| r)
        .map_err(|e| e.to_string())
}

/// Whether the peer closed `conn` because it keeps a twin of it.
fn closed_as_duplicate(conn: &quinn::Connection) -> bool {
    matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c))
        if c.error_code == VarInt::from_u32(CLOSE_DUPLICATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node() -> Node {
        Node::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .spawn()
            .await
            .unwrap()
    }

    async fn echo(stream: &mut BiStream, n: u64) {
        stream.send.write_all(&n.to_be_bytes()).await.unwrap();
        let mut back = [0u8; 8];
        stream.recv.read_exact(&mut back).await.unwrap();
        assert_eq!(u64::from_be_bytes(back), n);
    }

    #[tokio::test]
    async fn a_stream_on_a_losing_twin_runs_to_its_end() {
        let (x, y) = (node().await, node().await);
        // The second dial is made by the smaller ID, so it wins the pair.
        let (first, second) = if x.peer_id() < y.peer_id() {
            (y, x)
        } else {
            (x, y)
        };
        let mut stream = first
            .open_stream(second.peer_id(), PING_SERVICE, Some(second.local_addr()))
            .await
            .unwrap();
        echo(&mut stream, 1).await;
        let losing = first.live_session(&second.peer_id()).unwrap().conn;
        let winner = second
            .dial(first.peer_id(), Some(first.local_addr()))
            .await
            .unwrap();
        // Both ends now hand out the new session...
        tokio::time::timeout(Duration::from_secs(5), async {
            while first
                .live_session(&second.peer_id())
                .is_none_or(|s| s.conn.stable_id() == losing.stable_id())
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            second
                .live_session(&first.peer_id())
                .unwrap()
                .conn
                .stable_id(),
            winner.conn.stable_id()
        );
        // ...while the stream on the losing one still works.
        echo(&mut stream, 2).await;
        assert!(losing.close_reason().is_none());
        drop(stream);
        let reason = tokio::time::timeout(Duration::from_secs(5), losing.closed())
            .await
            .unwrap();
        assert!(
            matches!(&reason, quinn::ConnectionError::LocallyClosed)
                || closed_as_duplicate(&losing),
            "{reason}"
        );
        first.shutdown().await;
        second.shutdown().await;
    }
}
