//! Binding the node's UDP port and the QUIC endpoint on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use p2pos_proto::network::NetworkKey;
use p2pos_proto::{Keypair, PeerId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::mpsc;

use crate::overlay::Overlay;
use crate::socket::{OverlaySocket, SocketCounters, OVERLAY_QUEUE};
use crate::tls::{TlsIdentity, TlsSetupError};

/// Settings of the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Address to bind. `[::]:port` gives one dual-stack socket for IPv4 and
    /// IPv6.
    pub listen: SocketAddr,
    /// The private network, or `None` for the public one.
    pub network: Option<NetworkKey>,
    /// How long a silent session lives.
    pub idle_timeout: Duration,
    /// Interval of QUIC keepalives on idle sessions.
    pub keepalive: Duration,
    /// Concurrent streams a peer may open in one session.
    pub max_streams: u32,
    /// The node keeps sessions alive itself (at the interval its NAT
    /// needs) and judges their liveness: QUIC keepalives are off and the
    /// QUIC idle timeout is [`APP_KEEPALIVE_IDLE_LIMIT`] (LAN dials keep
    /// their short QUIC timers).
    pub app_keepalive: bool,
}

/// QUIC idle timeout when the node keeps sessions alive itself.
pub const APP_KEEPALIVE_IDLE_LIMIT: Duration = Duration::from_secs(20 * 60);

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            listen: "[::]:0".parse().expect("valid literal"),
            network: None,
            idle_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            max_streams: 1024,
            app_keepalive: false,
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP port could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// A running endpoint: QUIC plus the overlay on one socket.
#[derive(Debug, Clone)]
pub struct BoundEndpoint {
    /// The QUIC endpoint.
    pub quic: quinn::Endpoint,
    /// The overlay.
    pub overlay: Overlay,
    /// What the socket dropped.
    pub counters: Arc<SocketCounters>,
    /// The address actually bound.
    pub local_addr: SocketAddr,
    /// The socket (relayed paths, relay circuits).
    pub socket: Arc<OverlaySocket>,
    /// Path probes received (taken once by the node's relayed-path task).
    pub path_inbox: Arc<std::sync::Mutex<Option<mpsc::Receiver<crate::socket::PathDatagram>>>>,
    /// DHT datagrams received (taken once by the node's DHT task).
    pub dht_inbox: Arc<std::sync::Mutex<Option<mpsc::Receiver<crate::socket::OverlayDatagram>>>>,
    /// Binding-measurement datagrams received (taken once by the node's
    /// keepalive task).
    pub binding_inbox:
        Arc<std::sync::Mutex<Option<mpsc::Receiver<crate::socket::OverlayDatagram>>>>,
    tls: TlsIdentity,
    transport: Arc<quinn::TransportConfig>,
    lan_transport: Arc<quinn::TransportConfig>,
    punch_transport: Arc<quinn::TransportConfig>,
}

/// What a dial is for; it decides the session's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialKind {
    /// A peer's published or remembered address.
    Normal,
    /// A peer found on the LAN: the short LAN timers ([`LAN_IDLE_TIMEOUT`],
    /// [`LAN_KEEPALIVE`]).
    Lan,
    /// Through a NAT being punched at the same moment: the first Initial
    /// may be dropped before the peer's punch opens its NAT, so the
    /// handshake starts with a short initial RTT ([`PUNCH_INITIAL_RTT`]) and
    /// retransmits sooner.
    Punch,
}

/// Initial RTT estimate of punched dials.
pub const PUNCH_INITIAL_RTT: Duration = Duration::from_millis(100);

/// Idle timeout of sessions dialed over the LAN at most: a device that
/// leaves the LAN without a goodbye is noticed within it.
pub const LAN_IDLE_TIMEOUT: Duration = Duration::from_secs(9);
/// Keepalive interval of sessions dialed over the LAN at most (unicast on
/// the LAN is cheap; it never crosses a router).
pub const LAN_KEEPALIVE: Duration = Duration::from_secs(3);

impl BoundEndpoint {
    /// Binds the socket and starts QUIC and the overlay on it. Must run in a
    /// tokio runtime.
    pub fn bind(keypair: &Keypair, options: &EndpointOptions) -> Result<Self, BindError> {
        let std_socket = bind_udp(options.listen).map_err(|source| BindError::Bind {
            addr: options.listen,
            source,
        })?;
        let runtime = quinn::default_runtime().ok_or_else(|| BindError::Bind {
            addr: options.listen,
            source: std::io::Error::other("no async runtime"),
        })?;
        let inner = runtime
            .wrap_udp_socket(std_socket)
            .map_err(|source| BindError::Bind {
                addr: options.listen,
                source,
            })?;
        let local_addr = inner.local_addr().map_err(|source| BindError::Bind {
            addr: options.listen,
            source,
        })?;
        let counters = Arc::new(SocketCounters::default());
        let (overlay_tx, overlay_rx) = mpsc::channel(OVERLAY_QUEUE);
        let socket = Arc::new(OverlaySocket::new(
            inner,
            options.network.clone(),
            overlay_tx,
            counters.clone(),
        ));

        let tls = TlsIdentity::new(keypair)?;
        let transport = transport_config(options);
        let transport = Arc::new(transport);
        let mut punch = transport_config(options);
        punch.initial_rtt(PUNCH_INITIAL_RTT);
        let punch_transport = Arc::new(punch);
        let lan_transport = Arc::new(transport_config(&EndpointOptions {
            idle_timeout: options.idle_timeout.min(LAN_IDLE_TIMEOUT),
            keepalive: options.keepalive.min(LAN_KEEPALIVE),
            app_keepalive: false,
            ..options.clone()
        }));

        let quic_server = QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| TlsSetupError::from_display(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server.transport_config(transport.clone());

        let mut endpoint_config = quinn::EndpointConfig::default();
        // Keep the QUIC fixed bit set: the first-byte demultiplexing relies on it.
        endpoint_config.grease_quic_bit(false);
        let quic = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket.clone(),
            runtime,
        )
        .map_err(|source| BindError::Bind {
            addr: options.listen,
            source,
        })?;
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&keypair.peer_id().as_bytes()[..8]);
        let (dht_tx, dht_rx) = mpsc::channel(OVERLAY_QUEUE);
        let (binding_tx, binding_rx) = mpsc::channel(OVERLAY_QUEUE);
        let (path_tx, path_rx) = mpsc::channel(OVERLAY_QUEUE);
        socket.set_path_inbox(path_tx.clone());
        let overlay = Overlay::spawn(
            socket.clone(),
            overlay_rx,
            u64::from_le_bytes(seed),
            dht_tx,
            binding_tx,
            path_tx,
        );
        Ok(BoundEndpoint {
            quic,
            overlay,
            counters,
            local_addr,
            socket,
            path_inbox: Arc::new(std::sync::Mutex::new(Some(path_rx))),
            dht_inbox: Arc::new(std::sync::Mutex::new(Some(dht_rx))),
            binding_inbox: Arc::new(std::sync::Mutex::new(Some(binding_rx))),
            tls,
            transport,
            lan_transport,
            punch_transport,
        })
    }

    /// Starts a QUIC handshake with `addr`, accepting only `peer` there.
    pub fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        kind: DialKind,
    ) -> Result<quinn::Connecting, quinn::ConnectError> {
        let tls = self
            .tls
            .client_config(peer)
            .map_err(|_| quinn::ConnectError::EndpointStopping)?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|_| quinn::ConnectError::EndpointStopping)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(match kind {
            DialKind::Normal => self.transport.clone(),
            DialKind::Lan => self.lan_transport.clone(),
            DialKind::Punch => self.punch_transport.clone(),
        });
        let addr = crate::socket::dest_for(self.local_addr, addr);
        self.quic
            .connect_with(config, addr, crate::tls::SERVER_NAME)
    }
}

/// The QUIC transport settings of every p2pos session (also used by the
/// benchmarks' plain-quinn baseline, so both run with the same settings).
pub fn transport_config(options: &EndpointOptions) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let (idle, keepalive) = if options.app_keepalive {
        (APP_KEEPALIVE_IDLE_LIMIT, None)
    } else {
        (options.idle_timeout, Some(options.keepalive))
    };
    transport
        .max_idle_timeout(Some(
            idle.try_into()
                .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ))
        .keep_alive_interval(keepalive)
        .max_concurrent_bidi_streams(options.max_streams.into())
        .max_concurrent_uni_streams(16u32.into());
    if options.network.is_some() {
        // Leave room for the private-network frame in every datagram.
        let overhead = p2pos_proto::network::FRAME_OVERHEAD as u16;
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(1452 - overhead);
        transport
            .mtu_discovery_config(Some(mtu))
            .initial_mtu(1200 - overhead)
            .min_mtu(1200 - overhead);
    }
    transport
}

impl TlsSetupError {
    fn from_display(e: &dyn std::fmt::Display) -> Self {
        TlsSetupError::new(e.to_string())
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    match std::net::UdpSocket::bind(addr) {
        // No IPv6 on this host: fall back to IPv4 on the same port.
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            std::net::UdpSocket::bind(v4).map_err(|_| e)
        }
        other => other,
    }
}
