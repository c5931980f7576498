//! Signed mutable records, stored at the k nodes closest to their key.
//!
//! A record is `(owner, name, seq, expires, value)` signed by the owner's
//! ed25519 key. Its key is BLAKE3 over `"p2pos record v1" | owner | name`,
//! so only the owner can write under it. Holders verify on store, clients
//! verify on fetch; a higher `seq` replaces a lower one, never the reverse;
//! holders drop records when they expire. The peer record (addresses, later
//! homes and NAT class) is the record named `peer`.

use std::collections::HashMap;

use super::address::Address;
use super::wire::WireError;
use super::NodeId;
use crate::{Keypair, PeerId};

/// Largest record value.
pub const MAX_RECORD_VALUE: usize = 1000;
/// Longest record name.
pub const MAX_RECORD_NAME: usize = 64;
const CONTEXT: &[u8] = b"p2pos record v1";

/// How the DHT signs and checks ID proofs and records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signatures {
    /// ed25519 with the node's key: what every node uses.
    #[default]
    Ed25519,
    /// Simulator only, never a node: a keyed hash of the signer's ID and
    /// the message stands in for the signature (the same 64 bytes on the
    /// wire). It needs no secret, so anyone can forge it. It exists so a
    /// million simulated nodes are not bound by signature arithmetic. No
    /// protocol decision reads signature bytes, only whether they verify,
    /// so a run gives the same figures with either scheme.
    SimulatedInsecure,
}

impl Signatures {
    /// Signs `message` as `keypair`.
    pub fn sign(self, keypair: &Keypair, message: &[u8]) -> [u8; 64] {
        match self {
            Signatures::Ed25519 => keypair.sign(message),
            Signatures::SimulatedInsecure => simulated_signature(&keypair.peer_id(), message),
        }
    }

    /// Whether `signature` is `signer`'s over `message`.
    pub fn verify(self, signer: &PeerId, message: &[u8], signature: &[u8; 64]) -> bool {
        match self {
            Signatures::Ed25519 => signer.verify(message, signature),
            Signatures::SimulatedInsecure => simulated_signature(signer, message) == *signature,
        }
    }
}

/// The insecure scheme's signature of `signer` over `message` (it needs
/// no key): 128-bit SipHash-2-4 of both under a fixed key, four times
/// over. A simulated hour of 10^6 nodes signs and checks some 10^8 ID
/// proofs, and SipHash over a few dozen bytes is cheaper than BLAKE3's
/// key derivation and extended output (three compressions). Nothing but
/// the check against the same function reads the bytes.
pub(crate) fn simulated_signature(signer: &PeerId, message: &[u8]) -> [u8; 64] {
    use std::hash::Hasher;
    let mut h = siphasher::sip128::SipHasher24::new_with_key(b"p2pos simulated ");
    h.write(signer.as_bytes());
    h.write(message);
    let tag = siphasher::sip128::Hasher128::finish128(&h).as_bytes();
    let mut out = [0u8; 64];
    for quarter in out.chunks_exact_mut(tag.len()) {
        quarter.copy_from_slice(&tag);
    }
    out
}

/// The key a record of `owner` named `name` is stored under.
pub fn record_key(owner: &PeerId, name: &[u8]) -> NodeId {
    let mut h = blake3::Hasher::new();
    h.update(CONTEXT);
    h.update(owner.as_bytes());
    h.update(name);
    NodeId::from_hash(h.finalize().as_bytes())
}

/// A signed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// Who signed it.
    pub owner: PeerId,
    /// Its name under the owner (at most [`MAX_RECORD_NAME`] bytes).
    pub name: Vec<u8>,
    /// Sequence number: higher wins.
    pub seq: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// The value (at most [`MAX_RECORD_VALUE`] bytes).
    pub value: Vec<u8>,
    /// ed25519 signature over the fields above.
    pub signature: [u8; 64],
}

/// Why a record is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Value or name too long.
    #[error("record too large")]
    TooLarge,
    /// The signature does not verify.
    #[error("record signature does not verify")]
    BadSignature,
    /// Already expired.
    #[error("record expired")]
    Expired,
    /// A record with a higher sequence number is stored.
    #[error("a newer record (higher sequence) is stored")]
    Stale,
    /// The store is full for this source or in total.
    #[error("record store full")]
    Full,
}

impl SignedRecord {
    fn signed_bytes(owner: &PeerId, name: &[u8], seq: u64, expires: u64, value: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CONTEXT.len() + 32 + 1 + name.len() + 16 + value.len());
        m.extend_from_slice(CONTEXT);
        m.extend_from_slice(owner.as_bytes());
        m.push(name.len() as u8);
        m.extend_from_slice(name);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&expires.to_be_bytes());
        m.extend_from_slice(value);
        m
    }

    /// Signs a new record.
    pub fn sign(
        keypair: &Keypair,
        name: &[u8],
        seq: u64,
        expires: u64,
        value: &[u8],
    ) -> Result<Self, RecordError> {
        Self::sign_with(Signatures::Ed25519, keypair, name, seq, expires, value)
    }

    /// Signs a new record with `scheme`.
    pub fn sign_with(
        scheme: Signatures,
        keypair: &Keypair,
        name: &[u8],
        seq: u64,
        expires: u64,
        value: &[u8],
    ) -> Result<Self, RecordError> {
        if name.len() > MAX_RECORD_NAME || value.len() > MAX_RECORD_VALUE {
            return Err(RecordError::TooLarge);
        }
        let owner = keypair.peer_id();
        let signature = scheme.sign(
            keypair,
            &Self::signed_bytes(&owner, name, seq, expires, value),
        );
        Ok(SignedRecord {
            owner,
            name: name.to_vec(),
            seq,
            expires,
            value: value.to_vec(),
            signature,
        })
    }

    /// Heap bytes its name and value hold.
    pub fn heap_bytes(&self) -> usize {
        self.name.capacity() + self.value.capacity()
    }

    /// The key it is stored under.
    pub fn key(&self) -> NodeId {
        record_key(&self.owner, &self.name)
    }

    /// Checks sizes, signature and expiry at `now` (Unix seconds).
    pub fn verify(&self, now: u64) -> Result<(), RecordError> {
        self.verify_with(Signatures::Ed25519, now)
    }

    /// [`Self::verify`] with the signature `scheme`.
    pub fn verify_with(&self, scheme: Signatures, now: u64) -> Result<(), RecordError> {
        if self.name.len() > MAX_RECORD_NAME || self.value.len() > MAX_RECORD_VALUE {
            return Err(RecordError::TooLarge);
        }
        if self.expires <= now {
            return Err(RecordError::Expired);
        }
        let signed =
            Self::signed_bytes(&self.owner, &self.name, self.seq, self.expires, &self.value);
        if !scheme.verify(&self.owner, &signed, &self.signature) {
            return Err(RecordError::BadSignature);
        }
        Ok(())
    }

    /// The length of [`SignedRecord::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        32 + 1 + self.name.len() + 8 + 8 + 2 + self.value.len() + self.signature.len()
    }

    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.owner.as_bytes());
        out.push(self.name.len() as u8);
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&(self.value.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.value);
        out.extend_from_slice(&self.signature);
    }

    /// Reads one record; returns it and the rest. The signature is not
    /// checked here (see [`SignedRecord::verify`]).
    pub fn decode(buf: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let take = |b: &[u8], n: usize| -> Result<(Vec<u8>, usize), WireError> {
            b.get(..n).map(|s| (s.to_vec(), n)).ok_or(WireError::Length)
        };
        let mut at = 0;
        let (owner, n) = take(&buf[at..], 32)?;
        at += n;
        // A bad owner key fails the signature check that precedes any use.
        let owner = PeerId::from_bytes_unchecked(owner.try_into().map_err(|_| WireError::Length)?);
        let name_len = usize::from(*buf.get(at).ok_or(WireError::Length)?);
        at += 1;
        if name_len > MAX_RECORD_NAME {
            return Err(WireError::Invalid);
        }
        let (name, n) = take(&buf[at..], name_len)?;
        at += n;
        let (seq, n) = take(&buf[at..], 8)?;
        at += n;
        let (expires, n) = take(&buf[at..], 8)?;
        at += n;
        let (vlen, n) = take(&buf[at..], 2)?;
        at += n;
        let vlen = usize::from(u16::from_be_bytes([vlen[0], vlen[1]]));
        if vlen > MAX_RECORD_VALUE {
            return Err(WireError::Invalid);
        }
        let (value, n) = take(&buf[at..], vlen)?;
        at += n;
        let (sig, n) = take(&buf[at..], 64)?;
        at += n;
        let record = SignedRecord {
            owner,
            name,
            seq: u64::from_be_bytes(seq.try_into().map_err(|_| WireError::Length)?),
            expires: u64::from_be_bytes(expires.try_into().map_err(|_| WireError::Length)?),
            value,
            signature: sig.try_into().map_err(|_| WireError::Length)?,
        };
        Ok((record, &buf[at..]))
    }
}

/// The source network of records a node stores for itself (no address maps
/// to it but by a 2^-62 hash chance).
const LOCAL_NETWORK: u64 = u64::MAX;

#[derive(Debug, Clone)]
struct Stored {
    record: SignedRecord,
    network: u64,
}

/// The records a node holds for others, bounded in total and per source
/// network.
#[derive(Debug, Clone)]
pub struct RecordStore {
    records: HashMap<NodeId, Stored>,
    max_records: usize,
    max_per_network: usize,
    signatures: Signatures,
}

impl RecordStore {
    /// An empty store.
    pub fn new(max_records: usize, max_per_network: usize) -> Self {
        RecordStore {
            records: HashMap::new(),
            max_records,
            max_per_network,
            signatures: Signatures::Ed25519,
        }
    }

    /// The store checking signatures with `scheme`.
    pub fn with_signatures(mut self, scheme: Signatures) -> Self {
        self.signatures = scheme;
        self
    }

    /// Stores `record` sent from `source` at `now` (Unix seconds). Returns
    /// whether the stored record changed.
    pub fn put<A: Address>(
        &mut self,
        record: SignedRecord,
        source: A,
        now: u64,
    ) -> Result<bool, RecordError> {
        self.put_from(record, source.network(), now)
    }

    /// Stores a record this node put itself, as one of the closest servers
    /// to its key (in a network of fewer than k servers, the only place it
    /// can live). Local records share one source network, so they are
    /// bounded like any source's.
    pub fn put_local(&mut self, record: SignedRecord, now: u64) -> Result<bool, RecordError> {
        self.put_from(record, LOCAL_NETWORK, now)
    }

    fn put_from(
        &mut self,
        record: SignedRecord,
        network: u64,
        now: u64,
    ) -> Result<bool, RecordError> {
        let key = record.key();
        // The same record again (a republish): nothing to check or change.
        if let Some(existing) = self.records.get(&key) {
            if existing.record == record && record.expires > now {
                return Ok(false);
            }
        }
        record.verify_with(self.signatures, now)?;
        if let Some(existing) = self.records.get_mut(&key) {
            if existing.record.seq > record.seq {
                return Err(RecordError::Stale);
            }
            if existing.record.seq == record.seq {
                return Ok(false);
            }
            existing.record = record;
            return Ok(true);
        }
        if self.records.len() >= self.max_records {
            self.expire(now);
            if self.records.len() >= self.max_records {
                return Err(RecordError::Full);
            }
        }
        let from_network = self
            .records
            .values()
            .filter(|s| s.network == network)
            .count();
        if from_network >= self.max_per_network {
            return Err(RecordError::Full);
        }
        self.records.insert(key, Stored { record, network });
        Ok(true)
    }

    /// The unexpired record under `key`.
    pub fn get(&self, key: &NodeId, now: u64) -> Option<&SignedRecord> {
        self.records
            .get(key)
            .map(|s| &s.record)
            .filter(|r| r.expires > now)
    }

    /// Drops expired records; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, s| s.record.expires > now);
        before - self.records.len()
    }

    /// Drops every record (a node that stops serving holds none: a copy
    /// it kept would go stale without anyone updating it).
    pub fn clear(&mut self) {
        self.records.clear();
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Heap bytes the store holds (its capacity, not only what is in use).
    pub fn heap_bytes(&self) -> usize {
        super::map_heap_bytes(&self.records)
            + self
                .records
                .values()
                .map(|s| s.record.heap_bytes())
                .sum::<usize>()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kp(seed: u8) -> Keypair {
        Keypair::from_seed([seed; 32])
    }

    #[test]
    fn forged_and_expired_records_are_refused() {
        let r = SignedRecord::sign(&kp(1), b"peer", 1, 1000, b"addrs").unwrap();
        assert_eq!(r.verify(10), Ok(()));
        assert_eq!(r.verify(1000), Err(RecordError::Expired));
        let mut forged = r.clone();
        forged.value = b"other".to_vec();
        assert_eq!(forged.verify(10), Err(RecordError::BadSignature));
        let mut stolen = r.clone();
        stolen.owner = kp(2).peer_id();
        assert_eq!(stolen.verify(10), Err(RecordError::BadSignature));
        assert!(SignedRecord::sign(&kp(1), b"x", 1, 1000, &[0; 1001]).is_err());
    }

    #[test]
    fn store_is_bounded_per_network() {
        let mut store = RecordStore::new(100, 3);
        for i in 0..5u8 {
            let r = SignedRecord::sign(&kp(i), b"peer", 1, 1000, b"v").unwrap();
            let res = store.put(r, 0x0a00_0001u32, 10);
            assert_eq!(res.is_ok(), i < 3);
        }
    }

    proptest! {
        #[test]
        fn lower_sequence_never_replaces_higher(seqs in proptest::collection::vec(0u64..20, 1..30)) {
            let mut store = RecordStore::new(10, 10);
            let key = kp(7);
            let mut highest = None::<u64>;
            for s in seqs {
                let r = SignedRecord::sign(&key, b"peer", s, 10_000, &s.to_be_bytes()).unwrap();
                let _ = store.put(r.clone(), 1u32, 5);
                highest = Some(highest.map_or(s, |h| h.max(s)));
                let held = store.get(&r.key(), 5).unwrap();
                prop_assert_eq!(Some(held.seq), highest);
            }
        }

        #[test]
        fn wire_round_trip(name in proptest::collection::vec(any::<u8>(), 0..64), value in proptest::collection::vec(any::<u8>(), 0..1000), seq in any::<u64>()) {
            let r = SignedRecord::sign(&kp(3), &name, seq, 99, &value).unwrap();
            let mut buf = Vec::new();
            r.encode(&mut buf);
            prop_assert_eq!(r.encoded_len(), buf.len());
            let (back, rest) = SignedRecord::decode(&buf).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(back, r);
        }
    }
}
