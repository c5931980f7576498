//! The p2pos node: sessions by peer ID, services, TCP tunnels, the local API
//! for apps, and the daemon around them.
//!
//! Embedding a node in a Rust program:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use p2pos_node::Node;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let server = Node::builder().listen("127.0.0.1:0".parse()?).spawn().await?;
//! let mut chat = server.listen("chat", "a chat room")?;
//! tokio::spawn(async move {
//!     while let Some(incoming) = chat.accept().await {
//!         let mut stream = incoming.accept().await.unwrap();
//!         let mut text = String::new();
//!         stream.recv.read_to_string(&mut text).await.unwrap();
//!         println!("{} says {text}", stream.peer);
//!     }
//! });
//!
//! let client = Node::builder().listen("127.0.0.1:0".parse()?).spawn().await?;
//! let mut stream = client
//!     .open_stream(server.peer_id(), "chat", Some(server.local_addr()))
//!     .await?;
//! stream.send.write_all(b"hello").await?;
//! stream.send.finish()?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod daemon;
pub mod data_dir;
pub mod node;
pub mod status;
pub mod store;
pub mod tunnel;

pub use node::{
    BiStream, ConnectError, IncomingStream, Node, NodeBuilder, NodeError, OpenStreamError,
    ServiceListener,
};
pub use p2pos_proto::network::NetworkKey;
pub use p2pos_proto::{Keypair, PeerId};
