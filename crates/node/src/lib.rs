//! The p2pos node: sessions by peer ID, services, TCP tunnels, the local API
//! for apps, and the daemon around them.
//!
//! Embedding a node in a Rust program:
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use p2pos_node::Node;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let server = Node::builder().listen("127.0.0.1:0".parse()?).spawn().await?;
//! let mut chat = server.listen("chat", "a chat room")?;
//! let received = tokio::spawn(async move {
//!     let incoming = chat.accept().await.expect("node running");
//!     let mut stream = incoming.accept().await.expect("stream accepted");
//!     let mut text = String::new();
//!     stream.recv.read_to_string(&mut text).await.expect("stream read");
//!     (stream.peer, text)
//! });
//!
//! let client = Node::builder().listen("127.0.0.1:0".parse()?).spawn().await?;
//! let mut stream = client
//!     .open_stream(server.peer_id(), "chat", Some(server.local_addr()))
//!     .await?;
//! stream.send.write_all(b"hello").await?;
//! stream.send.finish()?;
//!
//! let (from, text) = received.await?;
//! assert_eq!((from, text.as_str()), (client.peer_id(), "hello"));
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod daemon;
pub mod data_dir;
pub mod dht;
pub mod keepalive;
pub mod lan;
pub mod node;
pub mod portmap;
pub mod relay;
pub mod services;
pub mod status;
pub mod store;
pub mod traversal;
pub mod tunnel;

pub use node::{
    BiStream, ConnectError, IncomingStream, Node, NodeBuilder, NodeError, OpenStreamError,
    ServiceListener,
};
pub use p2pos_proto::network::NetworkKey;
pub use p2pos_proto::relay::RelayLimits;
pub use p2pos_proto::{Keypair, PeerId};
