//! The DHT: a Kademlia network over 256-bit node IDs, run by the nodes
//! themselves, for finding peers (and their signed records) by key.
//!
//! Everything here is sans-IO: [`Dht`] is given `now`, incoming datagrams and
//! commands, and gives back datagrams to send, the next timer and events. The
//! same state machine runs in the daemon (on the node's UDP port, addresses
//! `SocketAddr`) and in the simulator (addresses are node indices).
//!
//! Message flow of a lookup (iterative, α in parallel):
//!
//! ```text
//! A: FindNode(target) ──► the α closest known servers
//!    ◄── Nodes(k closest they know)      (each response: one hop further)
//!    FindNode(target) ──► the α closest not yet asked ... until the k
//!    closest known have all answered or failed
//! ```
//!
//! Design choices, with reasons:
//!
//! - **IDs bound to keys.** A node ID is BLAKE3 of the node's ed25519 public
//!   key. A node enters a routing table only after proving it holds that key:
//!   the request asks for a proof, and the response carries the public key
//!   and a signature over the request's random transaction id and the
//!   requester's ID. So neither an off-path spoofer (who cannot see the
//!   transaction id) nor a responder claiming someone else's ID can plant a
//!   contact.
//! - **Servers and clients.** Only nodes reachable from outside serve
//!   (routing and storage); clients only query and are never added to tables
//!   (IPFS learned that NATed servers poison routing).
//! - **Anti-amplification.** A response is at most 3× the size of its request
//!   unless the request carries a cookie the responder issued to that
//!   address (proof that the address receives). Requests without a cookie
//!   are padded so that a full answer still fits.
//! - **Diversity.** At most [`DhtConfig::max_per_prefix`] entries of one
//!   bucket share an IPv4 /24 (IPv6 /48), so a flood of IDs from one network
//!   cannot fill a bucket.
//! - **Records** are signed by their owner, carry a sequence number and an
//!   expiry, and are verified on store and on fetch; a lower sequence never
//!   replaces a higher one.

mod address;
mod lookup;
mod node;
mod record;
mod table;
mod wire;

/// Heap bytes of a hash map's table at its capacity (hashbrown keeps 1/8
/// of the slots free, in power-of-two tables, with a control byte each).
pub fn map_heap_bytes<K, V, S>(map: &std::collections::HashMap<K, V, S>) -> usize {
    match map.capacity() {
        0 => 0,
        cap => (cap * 8 / 7 + 1).next_power_of_two() * (std::mem::size_of::<(K, V)>() + 1),
    }
}

pub use address::Address;
pub use node::{Dht, DhtConfig, DhtCounters, DhtEvent, MemoryUse, QueryId, RequestsSent};
pub use record::{
    record_key, RecordError, RecordStore, Signatures, SignedRecord, MAX_RECORD_VALUE,
};
pub use table::{Contact, InsertOutcome, RoutingTable};
pub use wire::{DhtMessage, Request, RequestBody, Response, ResponseBody, WireError};

/// The overlay message types of DHT datagrams (for demultiplexing).
pub mod wire_types {
    pub use super::wire::{TYPE_REQUEST, TYPE_RESPONSE};
}

/// A 256-bit DHT identifier: of a node (BLAKE3 of its public key) or of a
/// record's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The node ID of a peer: BLAKE3 of its public key.
    pub fn of_peer(peer: &crate::PeerId) -> Self {
        NodeId(*blake3::hash(peer.as_bytes()).as_bytes())
    }

    /// XOR distance to `other`.
    pub fn distance(&self, other: &NodeId) -> NodeId {
        let mut d = [0u8; 32];
        for (i, byte) in d.iter_mut().enumerate() {
            *byte = self.0[i] ^ other.0[i];
        }
        NodeId(d)
    }

    /// Length of the common prefix with `other`, in bits (256 if equal).
    pub fn common_prefix(&self, other: &NodeId) -> usize {
        for i in 0..32 {
            let x = self.0[i] ^ other.0[i];
            if x != 0 {
                return i * 8 + x.leading_zeros() as usize;
            }
        }
        256
    }

    /// A random ID that shares exactly `prefix` bits with `self` (for
    /// refreshing the bucket of that prefix length).
    pub fn random_with_prefix(&self, prefix: usize, random: [u8; 32]) -> NodeId {
        let mut out = random;
        let prefix = prefix.min(255);
        for bit in 0..=prefix {
            let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
            let mine = self.0[byte] & mask;
            // Copy the first `prefix` bits, then flip the next one.
            let want = if bit < prefix { mine } else { mine ^ mask };
            out[byte] = (out[byte] & !mask) | want;
        }
        NodeId(out)
    }
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_with_prefix_has_that_prefix(me in any::<[u8; 32]>(), r in any::<[u8; 32]>(), prefix in 0usize..255) {
            let me = NodeId(me);
            let id = me.random_with_prefix(prefix, r);
            prop_assert_eq!(me.common_prefix(&id), prefix);
        }

        #[test]
        fn xor_metric(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (a, b) = (NodeId(a), NodeId(b));
            prop_assert_eq!(a.distance(&b), b.distance(&a));
            prop_assert_eq!(a.distance(&a), NodeId([0; 32]));
            prop_assert_eq!(a.common_prefix(&b), a.distance(&b).common_prefix(&NodeId([0; 32])));
        }
    }
}
