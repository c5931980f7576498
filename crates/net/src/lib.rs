//! p2pos I/O driver: the node's one UDP socket, the QUIC endpoint on it, and
//! TLS pinned to ed25519 keys.
//!
//! - [`socket`]: wraps quinn's UDP socket, diverts the overlay's datagrams
//!   (first-byte demultiplexing, see `p2pos_proto::packet`) and applies the
//!   private-network framing.
//! - [`tls`]: rustls configured for raw public keys (RFC 7250) so that both
//!   ends authenticate by their peer IDs, with no certificates at all.
//! - [`endpoint`]: binds the socket and builds the quinn endpoint.
//! - [`overlay`]: answers and sends the overlay's own datagrams.

pub mod endpoint;
pub mod overlay;
pub mod paths;
pub mod socket;
pub mod tls;
pub mod trace;

pub use endpoint::{transport_config, BindError, BoundEndpoint, DialKind, EndpointOptions};
pub use paths::{is_virtual, Route};
pub use socket::{canonical, dest_for, SocketCounters};
