//! The DHT: a Kademlia network over 128-bit node IDs, run by the nodes
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
//! - **IDs bound to keys.** A node ID is the first 128 bits of BLAKE3 of the
//!   node's ed25519 public key. A node enters a routing table only after
//!   proving it holds that key: the request asks for a proof, and the
//!   response carries the public key and a signature over the request's
//!   random transaction id and the requester's ID. So neither an off-path
//!   spoofer (who cannot see the transaction id) nor a responder claiming
//!   someone else's ID can plant a contact. The nodes a proven contact
//!   names in answer to a bucket refresh of a client, or of a server's
//!   first buckets (`DhtConfig::unverified_buckets`), enter the bucket
//!   *unverified*: the node's own lookups use them, every request to one
//!   asks for its proof (a wrong one removes it at once), and it is
//!   handed to no one (answers, introductions) until it has proven its ID.
//!   A lying contact can thus only make this node ask nodes that are not
//!   there, as its lookup answers always could; nothing it names reaches
//!   anyone else.
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
mod pending;
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

/// The size an allocation of `bytes` takes in an allocator with four size
/// classes per power of two, on 16-byte steps up to 128 bytes (jemalloc's,
/// the simulator's allocator).
fn size_class(bytes: usize) -> usize {
    if bytes <= 128 {
        return bytes.next_multiple_of(16).max(16);
    }
    let step = bytes.next_power_of_two() / 8;
    bytes.next_multiple_of(step)
}

/// Makes room in `v` for `more` items past its length, growing its
/// capacity to what the allocation of that length holds anyway (its size
/// class). Tables and cookie jars grew by exactly what they needed, to keep
/// a million simulated nodes within memory, and every such growth was a
/// reallocation (10% of the simulator's time, most of it the allocator
/// looking up the block's size); rounded up to the class, the memory is
/// the same and a bucket reallocates four times as it doubles.
pub(crate) fn grow_within_class<T>(v: &mut Vec<T>, more: usize) {
    let item = std::mem::size_of::<T>();
    if v.capacity() - v.len() >= more || item == 0 {
        return;
    }
    let want = v.len() + more;
    let cap = size_class(want * item) / item;
    v.reserve_exact(cap.max(want) - v.len());
}

pub use address::Address;
pub use node::{Dht, DhtConfig, DhtCounters, DhtEvent, MemoryUse, QueryId, RequestsSent};
pub use record::{
    record_key, RecordError, RecordStore, Signatures, SignedRecord, MAX_RECORD_VALUE,
};
pub use table::{Contact, InsertOutcome, RoutingTable};
pub use wire::{
    peek_ids, peek_response_txid, DhtMessage, Introduction, Request, RequestBody, Response,
    ResponseBody, WireError, MAX_NODES,
};

/// The overlay message types of DHT datagrams (for demultiplexing).
pub mod wire_types {
    pub use super::wire::{TYPE_INTRODUCTION, TYPE_REQUEST, TYPE_RESPONSE};
}

/// Bytes of a DHT identifier.
pub const ID_BYTES: usize = 16;

/// Bits of a DHT identifier.
pub const ID_BITS: usize = ID_BYTES * 8;

/// A 128-bit DHT identifier: of a node (the first 128 bits of BLAKE3 of
/// its public key) or of a record's key.
///
/// 128 bits, not 256: finding a key whose ID equals someone else's still
/// takes 2^128 hashes, and IDs are most of what the DHT stores and sends
/// (a contact in a table, in a lookup, in every answer). Two keys of one
/// owner can collide after 2^64 hashes, which harms only that owner.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; ID_BYTES]);

impl NodeId {
    /// The node ID of a peer: the first 128 bits of BLAKE3 of its public
    /// key.
    pub fn of_peer(peer: &crate::PeerId) -> Self {
        Self::from_hash(blake3::hash(peer.as_bytes()).as_bytes())
    }

    /// The ID made of the first 128 bits of a 256-bit hash.
    pub fn from_hash(hash: &[u8; 32]) -> Self {
        let mut id = [0u8; ID_BYTES];
        id.copy_from_slice(&hash[..ID_BYTES]);
        NodeId(id)
    }

    fn bits(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    /// XOR distance to `other`.
    pub fn distance(&self, other: &NodeId) -> NodeId {
        NodeId((self.bits() ^ other.bits()).to_be_bytes())
    }

    /// Length of the common prefix with `other`, in bits (128 if equal).
    pub fn common_prefix(&self, other: &NodeId) -> usize {
        (self.bits() ^ other.bits()).leading_zeros() as usize
    }

    /// A random ID that shares exactly `prefix` bits with `self` (for
    /// refreshing the bucket of that prefix length).
    pub fn random_with_prefix(&self, prefix: usize, random: [u8; ID_BYTES]) -> NodeId {
        // The first `prefix` bits are ours, the next one is flipped, the
        // rest are random.
        let flip = 1u128 << (ID_BITS - 1 - prefix.min(ID_BITS - 1));
        let below = flip - 1;
        let ours = !(below | flip);
        let bits =
            (self.bits() & ours) | (!self.bits() & flip) | (u128::from_be_bytes(random) & below);
        NodeId(bits.to_be_bytes())
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

    #[test]
    fn size_classes_are_jemallocs() {
        let classes: Vec<usize> = [
            1, 16, 17, 120, 128, 129, 200, 256, 257, 500, 513, 1100, 5000,
        ]
        .into_iter()
        .map(size_class)
        .collect();
        assert_eq!(
            classes,
            [16, 16, 32, 128, 128, 160, 224, 256, 320, 512, 640, 1280, 5120]
        );
    }

    proptest! {
        /// Growth makes the room asked for, and the capacity's bytes never
        /// leave the size class of the length asked for.
        #[test]
        fn growth_stays_within_the_size_class(len in 0usize..3000, more in 1usize..400) {
            let mut v: Vec<[u8; 24]> = Vec::with_capacity(len);
            v.resize(len, [0; 24]);
            v.shrink_to_fit();
            grow_within_class(&mut v, more);
            prop_assert!(v.capacity() >= len + more);
            prop_assert!(v.capacity() * 24 <= size_class((len + more) * 24).max((len + more) * 24));
        }

        #[test]
        fn random_with_prefix_has_that_prefix(me in any::<[u8; ID_BYTES]>(), r in any::<[u8; ID_BYTES]>(), prefix in 0usize..ID_BITS) {
            let me = NodeId(me);
            let id = me.random_with_prefix(prefix, r);
            prop_assert_eq!(me.common_prefix(&id), prefix);
        }

        #[test]
        fn xor_metric(a in any::<[u8; ID_BYTES]>(), b in any::<[u8; ID_BYTES]>()) {
            let (a, b) = (NodeId(a), NodeId(b));
            prop_assert_eq!(a.distance(&b), b.distance(&a));
            prop_assert_eq!(a.distance(&a), NodeId([0; ID_BYTES]));
            prop_assert_eq!(a.common_prefix(&b), a.distance(&b).common_prefix(&NodeId([0; ID_BYTES])));
        }
    }
}
