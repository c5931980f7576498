//! p2pos protocol core.
//!
//! Everything here is deterministic and free of I/O: no sockets, no tokio, no
//! clock and no global randomness. Callers hand in bytes, keys and time; the
//! functions and state machines hand back bytes, decisions and events. The
//! same code runs in the daemon (`p2pos-net`, `p2pos-node`) and, later, in the
//! simulator.
//!
//! Modules:
//! - [`identity`]: ed25519 keys, the [`PeerId`] and its text form.
//! - [`packet`]: the first-byte demultiplexing of the node's one UDP port.
//! - [`overlay`]: the overlay's own datagrams (probes today; DHT and punching
//!   messages later).
//! - [`network`]: the framing that keeps a private network apart from every
//!   other network.
//! - [`stream`]: the header that opens an application stream or datagram for
//!   a named service inside a QUIC session.
//! - [`keepalive`]: measuring how long the NAT keeps an idle binding, for
//!   the keepalive interval.
//! - [`lan`]: the mDNS announcement of a node on its LAN and the service
//!   lists peers exchange.
//! - [`reach`]: reachability from peers only — NAT mapping from observed
//!   addresses, filtering and reachability from dial-backs.
//! - [`traversal`]: the peer record (addresses, homes, NAT class), the
//!   signalling homes forward, and the punch datagram.
//! - [`session`]: rules shared by both ends of a session (which of two
//!   simultaneous sessions survives, how a path is named).

pub mod dht;
pub mod identity;
pub mod keepalive;
pub mod lan;
pub mod network;
pub mod overlay;
pub mod packet;
pub mod prefetch;
pub mod reach;
pub mod relay;
pub mod rng;
pub mod session;
pub mod stream;
pub mod traversal;

pub use identity::{Keypair, PeerId, PeerIdParseError};
