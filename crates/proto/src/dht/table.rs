//! The routing table: k-buckets by common-prefix length with the node's own
//! ID, each with a replacement cache and a per-network diversity limit.
//!
//! Buckets are created lazily up to the deepest one in use, so a table at
//! 10^6 nodes holds about 17 buckets, not 256.

use super::address::Address;
use super::{NodeId, ID_BITS};

/// A known DHT server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact<A> {
    /// Its ID.
    pub id: NodeId,
    /// Where it answers.
    pub addr: A,
    /// When it last answered, in 8-second steps since the Unix epoch (the
    /// high 29 bits: until 2106); whether it is unverified (bit 2, see
    /// [`Contact::unverified`]); and the RPCs to it that failed in a row
    /// since (the low 2 bits). Packed, a contact with a `u32` address takes
    /// 24 bytes instead of 28, and most of a big network's memory is
    /// routing tables.
    seen: u32,
}

/// The bit of [`Contact::seen`] that marks an unverified contact.
const UNVERIFIED: u32 = 4;

/// The bits of [`Contact::seen`] that are not its time.
const NOT_TIME: u32 = 7;

impl<A> Contact<A> {
    /// A contact last heard from at `last_seen` (seconds since the Unix
    /// epoch), with no failures.
    pub fn new(id: NodeId, addr: A, last_seen: u64) -> Self {
        Contact {
            id,
            addr,
            seen: secs32(last_seen) & !NOT_TIME,
        }
    }

    /// A contact that a proven contact's answer named at `named` (seconds
    /// since the Unix epoch) and that has not proven its ID to this node
    /// yet: good for the node's own lookups (whose first request to it asks
    /// for the proof), never handed to others.
    pub fn unverified(id: NodeId, addr: A, named: u64) -> Self {
        Contact {
            id,
            addr,
            seen: (secs32(named) & !NOT_TIME) | UNVERIFIED,
        }
    }

    /// Whether it proved its ID to this node (see [`Contact::unverified`]).
    pub fn is_verified(&self) -> bool {
        self.seen & UNVERIFIED == 0
    }

    /// When it last answered (seconds since the Unix epoch, rounded down
    /// to 8 s), or when it was named, if it is unverified.
    pub fn last_seen(&self) -> u64 {
        u64::from(self.seen & !NOT_TIME)
    }

    /// RPCs to it that failed in a row.
    pub fn failures(&self) -> u8 {
        (self.seen & 3) as u8
    }

    /// Records an answer at `secs` of a verified contact (an unverified
    /// one's time changes only when it proves its ID: see
    /// [`RoutingTable::insert`]).
    fn set_seen(&mut self, secs: u64) {
        if self.is_verified() {
            self.seen = secs32(secs) & !NOT_TIME;
        }
    }

    fn add_failure(&mut self) {
        if self.failures() < 3 {
            self.seen += 1;
        }
    }
}

/// What happened to a contact offered to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome<A> {
    /// Added to its bucket.
    Inserted,
    /// Already there: refreshed.
    Updated,
    /// The bucket is full: the contact waits in the replacement cache; the
    /// caller should check that `oldest` is still alive.
    Pending {
        /// The least recently seen entry of the bucket.
        oldest: Contact<A>,
    },
    /// Too many entries of the bucket share its network.
    Diversity,
    /// It is this node.
    SelfId,
}

/// One bucket: its entries, then its replacement cache (oldest first), in
/// one vector. Two vectors and a 64-bit time took 56 bytes per bucket
/// before any contact, and a table at 10^6 nodes has about 17 buckets.
#[derive(Debug, Clone)]
struct Bucket<A> {
    contacts: Vec<Contact<A>>,
    /// How many of `contacts` are entries (the rest wait as replacements).
    entry_count: u16,
    /// When a lookup last covered the bucket (Unix seconds).
    last_refresh: u32,
}

impl<A> Default for Bucket<A> {
    fn default() -> Self {
        Bucket {
            contacts: Vec::new(),
            entry_count: 0,
            last_refresh: 0,
        }
    }
}

impl<A> Bucket<A> {
    fn entries(&self) -> &[Contact<A>] {
        &self.contacts[..usize::from(self.entry_count)]
    }

    fn entries_mut(&mut self) -> &mut [Contact<A>] {
        &mut self.contacts[..usize::from(self.entry_count)]
    }

    fn replacements(&self) -> &[Contact<A>] {
        &self.contacts[usize::from(self.entry_count)..]
    }

    fn push_entry(&mut self, contact: Contact<A>) {
        super::grow_within_class(&mut self.contacts, 1);
        self.contacts.insert(usize::from(self.entry_count), contact);
        self.entry_count += 1;
    }

    fn remove_entry(&mut self, pos: usize) {
        self.entry_count -= 1;
        self.contacts.remove(pos);
    }

    /// Adds the freshest replacement; the oldest goes if `max` are waiting.
    fn push_replacement(&mut self, contact: Contact<A>, max: usize) {
        if self.replacements().len() >= max {
            self.contacts.remove(usize::from(self.entry_count));
        }
        super::grow_within_class(&mut self.contacts, 1);
        self.contacts.push(contact);
    }

    fn retain_replacements(&mut self, keep: impl Fn(&Contact<A>) -> bool) {
        let mut i = usize::from(self.entry_count);
        while i < self.contacts.len() {
            if keep(&self.contacts[i]) {
                i += 1;
            } else {
                self.contacts.remove(i);
            }
        }
    }

    /// The freshest replacement takes the place of a removed entry.
    fn promote_replacement(&mut self) {
        if self.contacts.len() > usize::from(self.entry_count) {
            // The freshest is last, right where the next entry goes when
            // it is the only one; otherwise move it there.
            let r = self.contacts.pop().expect("a replacement");
            self.contacts.insert(usize::from(self.entry_count), r);
            self.entry_count += 1;
        }
    }
}

/// Unix seconds as stored in a contact.
pub fn secs32(secs: u64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Failed RPCs in a row after which a contact is dropped.
pub const MAX_FAILURES: u8 = 2;

/// The routing table.
#[derive(Debug, Clone)]
pub struct RoutingTable<A> {
    me: NodeId,
    k: usize,
    max_per_prefix: usize,
    buckets: Vec<Bucket<A>>,
    /// Where the walk for stale contacts goes on: bucket, place in it (see
    /// [`RoutingTable::next_stale`]).
    walk: (u16, u16),
}

impl<A: Address> RoutingTable<A> {
    /// An empty table for node `me`.
    pub fn new(me: NodeId, k: usize, max_per_prefix: usize) -> Self {
        RoutingTable {
            me,
            k: k.max(1),
            max_per_prefix: max_per_prefix.max(1),
            buckets: Vec::new(),
            walk: (0, 0),
        }
    }

    fn bucket_index(&self, id: &NodeId) -> Option<usize> {
        let cpl = self.me.common_prefix(id);
        (cpl < ID_BITS).then_some(cpl)
    }

    /// Offers a verified contact to the table (an unverified entry with
    /// its ID becomes verified).
    pub fn insert(&mut self, contact: Contact<A>) -> InsertOutcome<A> {
        debug_assert!(contact.is_verified(), "see RoutingTable::insert_unverified");
        let Some(index) = self.bucket_index(&contact.id) else {
            return InsertOutcome::SelfId;
        };
        let (k, max_per_prefix) = (self.k, self.max_per_prefix);
        let bucket = self.bucket_creating(index);
        if let Some(c) = bucket.entries_mut().iter_mut().find(|c| c.id == contact.id) {
            c.addr = contact.addr;
            c.seen = contact.seen & !NOT_TIME;
            return InsertOutcome::Updated;
        }
        let net = contact.addr.network();
        if bucket
            .entries()
            .iter()
            .filter(|c| c.addr.network() == net)
            .count()
            >= max_per_prefix
        {
            return InsertOutcome::Diversity;
        }
        if bucket.entries().len() < k {
            // Buckets grow one entry at a time: doubling would leave 12 of
            // 32 slots unused in every full bucket, and most of a big
            // network's memory is routing tables. Inserts are rare (a
            // verified newcomer), so the copies cost nothing.
            bucket.push_entry(contact);
            return InsertOutcome::Inserted;
        }
        bucket.retain_replacements(|c| c.id != contact.id);
        bucket.push_replacement(contact, k.div_ceil(2));
        let oldest = *bucket
            .entries()
            .iter()
            .min_by_key(|c| c.last_seen())
            .expect("a full bucket has entries");
        InsertOutcome::Pending { oldest }
    }

    /// Adds `id` at `addr`, named at `named` (seconds), as an unverified
    /// contact (see [`Contact::unverified`]) if it would enter its bucket
    /// now ([`RoutingTable::has_room_for`]): never to a replacement cache,
    /// never in place of an entry. Whether it was added.
    pub fn insert_unverified(&mut self, id: NodeId, addr: A, named: u64) -> bool {
        let index = match self.bucket_index(&id) {
            Some(index) if self.has_room_for(&id, &addr) => index,
            _ => return false,
        };
        self.bucket_creating(index)
            .push_entry(Contact::unverified(id, addr, named));
        true
    }

    /// Bucket `index`, created (with the ones before it) if need be.
    fn bucket_creating(&mut self, index: usize) -> &mut Bucket<A> {
        if self.buckets.len() <= index {
            self.buckets.reserve_exact(index + 1 - self.buckets.len());
            self.buckets.resize_with(index + 1, Bucket::default);
        }
        &mut self.buckets[index]
    }

    /// Whether a new contact `id` at `addr` would enter its bucket now (not
    /// present, bucket not full, diversity limit not reached).
    pub fn has_room_for(&self, id: &NodeId, addr: &A) -> bool {
        let Some(index) = self.bucket_index(id) else {
            return false;
        };
        let Some(bucket) = self.buckets.get(index) else {
            return true;
        };
        if bucket.entries().iter().any(|c| c.id == *id) || bucket.entries().len() >= self.k {
            return false;
        }
        let net = addr.network();
        bucket
            .entries()
            .iter()
            .filter(|c| c.addr.network() == net)
            .count()
            < self.max_per_prefix
    }

    /// Free entries in the bucket that covers `target`.
    pub fn room_for(&self, target: &NodeId) -> usize {
        let Some(index) = self.bucket_index(target) else {
            return 0;
        };
        let used = self.buckets.get(index).map_or(0, |b| b.entries().len());
        self.k.saturating_sub(used)
    }

    /// Whether a verified contact `id` at `addr` would be kept: it would
    /// enter its bucket, or wait in the bucket's replacement cache, which
    /// has room or holds an entry last seen before `stale_before` (seconds).
    /// Lookups ask a node to prove its ID only then: a proof costs a
    /// signature and its check, and is wasted on a contact the table drops.
    pub fn would_keep(&self, id: &NodeId, addr: &A, stale_before: u64) -> bool {
        if self.has_room_for(id, addr) {
            return true;
        }
        let Some(bucket) = self
            .bucket_index(id)
            .and_then(|index| self.buckets.get(index))
        else {
            return false;
        };
        bucket.entries().len() >= self.k
            && !bucket.entries().iter().any(|c| c.id == *id)
            && !bucket.replacements().iter().any(|c| c.id == *id)
            && (bucket.replacements().len() < self.k.div_ceil(2)
                || bucket
                    .replacements()
                    .first()
                    .is_some_and(|c| c.last_seen() < stale_before))
    }

    /// Records that `id` answered at `now` (if it is verified: an
    /// unverified contact is seen only once it proved its ID).
    pub fn mark_seen(&mut self, id: &NodeId, now: u64) {
        if let Some(c) = self.get_mut(id) {
            c.set_seen(now);
        }
    }

    /// Records that `id` was heard from at `now`, from `addr`: only if that
    /// is the address its entry has (and it is verified).
    pub fn mark_seen_at(&mut self, id: &NodeId, addr: &A, now: u64) {
        if let Some(c) = self.get_mut(id).filter(|c| c.addr == *addr) {
            c.set_seen(now);
        }
    }

    /// Records a failed RPC to `id`; after [`MAX_FAILURES`] in a row the
    /// contact is dropped and the freshest replacement takes its place.
    /// Returns whether it was dropped.
    pub fn record_failure(&mut self, id: &NodeId) -> bool {
        let Some(index) = self.bucket_index(id) else {
            return false;
        };
        let Some(bucket) = self.buckets.get_mut(index) else {
            return false;
        };
        let Some(pos) = bucket.entries().iter().position(|c| c.id == *id) else {
            bucket.retain_replacements(|c| c.id != *id);
            return false;
        };
        bucket.entries_mut()[pos].add_failure();
        if bucket.entries()[pos].failures() < MAX_FAILURES {
            return false;
        }
        bucket.remove_entry(pos);
        bucket.promote_replacement();
        true
    }

    /// Drops `id` (it stopped serving, or left a request sent twice
    /// unanswered); the freshest replacement takes its place. Returns
    /// whether it was there.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let Some(bucket) = self
            .bucket_index(id)
            .and_then(|index| self.buckets.get_mut(index))
        else {
            return false;
        };
        bucket.retain_replacements(|c| c.id != *id);
        let Some(pos) = bucket.entries().iter().position(|c| c.id == *id) else {
            return false;
        };
        bucket.remove_entry(pos);
        bucket.promote_replacement();
        true
    }

    fn get_mut(&mut self, id: &NodeId) -> Option<&mut Contact<A>> {
        let index = self.bucket_index(id)?;
        self.buckets
            .get_mut(index)?
            .entries_mut()
            .iter_mut()
            .find(|c| c.id == *id)
    }

    /// The contact with `id`, if present.
    pub fn get(&self, id: &NodeId) -> Option<&Contact<A>> {
        let index = self.bucket_index(id)?;
        self.buckets
            .get(index)?
            .entries()
            .iter()
            .find(|c| c.id == *id)
    }

    /// The `n` contacts closest to `target`, closest first.
    ///
    /// Reads only the buckets it needs. With `i` the common prefix of this
    /// node and `target`, bucket `i` holds the contacts sharing more than
    /// `i` bits with `target`; every deeper bucket's contacts share exactly
    /// `i`; bucket `j < i`'s share exactly `j`. So the order is bucket `i`,
    /// then the deeper buckets together, then buckets `i - 1` down to 0,
    /// each sorted by distance.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<Contact<A>> {
        self.closest_where(target, n, |_| true)
    }

    /// The `n` contacts closest to `target` among those `keep` accepts,
    /// closest first (see [`RoutingTable::closest`]).
    pub fn closest_where(
        &self,
        target: &NodeId,
        n: usize,
        keep: impl Fn(&Contact<A>) -> bool,
    ) -> Vec<Contact<A>> {
        let i = self.me.common_prefix(target);
        let mut out: Vec<Contact<A>> = Vec::with_capacity(n.min(self.k * 3));
        // One buffer for each group's contacts and their distances (each
        // computed once, as one number, not once per comparison). Only the
        // `room` closest of a group are sorted: distances differ, so which
        // they are does not depend on how they are picked. A group is a
        // bucket, or the deeper ones, which hold about a bucket together:
        // room for two, so that it is allocated once.
        let mut keyed: Vec<(u128, Contact<A>)> = Vec::with_capacity(self.k * 2);
        let mut take_sorted =
            |out: &mut Vec<Contact<A>>, group: &mut dyn Iterator<Item = &Contact<A>>| {
                let room = n.saturating_sub(out.len());
                keyed.clear();
                keyed.extend(
                    group
                        .filter(|c| keep(c))
                        .map(|c| (u128::from_be_bytes(c.id.distance(target).0), *c)),
                );
                if keyed.len() > room && room > 0 {
                    keyed.select_nth_unstable_by_key(room - 1, |a| a.0);
                    keyed.truncate(room);
                }
                keyed.sort_unstable_by_key(|a| a.0);
                out.extend(keyed.iter().take(room).map(|(_, c)| *c));
            };
        if let Some(b) = self.buckets.get(i) {
            take_sorted(&mut out, &mut b.entries().iter());
        }
        if out.len() < n && i + 1 < self.buckets.len() {
            let mut deeper = self.buckets[i + 1..]
                .iter()
                .flat_map(|b| b.entries().iter());
            take_sorted(&mut out, &mut deeper);
        }
        for j in (0..i.min(self.buckets.len())).rev() {
            if out.len() >= n {
                break;
            }
            take_sorted(&mut out, &mut self.buckets[j].entries().iter());
        }
        out
    }

    /// Asks the memory for the buckets' heads (see [`crate::prefetch`]).
    pub fn prefetch(&self) {
        crate::prefetch::prefetch_slice(&self.buckets);
    }

    /// Asks the memory for the place of the bucket that covers `id` (where
    /// its entries are, how many).
    pub fn prefetch_bucket_place(&self, id: &NodeId) {
        if let Some(b) = self.bucket_index(id).and_then(|i| self.buckets.get(i)) {
            crate::prefetch::prefetch_lines(b, 1);
        }
    }

    /// Asks the memory for the entries of the bucket that covers `id`
    /// (its place must have arrived: see [`RoutingTable::prefetch`] and
    /// [`RoutingTable::prefetch_bucket_place`]).
    pub fn prefetch_bucket_of(&self, id: &NodeId) {
        if let Some(b) = self.bucket_index(id).and_then(|i| self.buckets.get(i)) {
            crate::prefetch::prefetch_slice(b.entries());
        }
    }

    /// Heap bytes the table holds (its capacity, not only what is in use).
    pub fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket<A>>()
            + self
                .buckets
                .iter()
                .map(|b| b.contacts.capacity() * std::mem::size_of::<Contact<A>>())
                .sum::<usize>()
    }

    /// All contacts (not the replacements), bucket by bucket.
    pub fn contacts(&self) -> impl Iterator<Item = &Contact<A>> {
        self.buckets.iter().flat_map(|b| b.entries().iter())
    }

    /// Number of contacts.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.entries().len()).sum()
    }

    /// Number of contacts waiting in replacement caches.
    pub fn replacement_count(&self) -> usize {
        self.buckets.iter().map(|b| b.replacements().len()).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.entries().is_empty())
    }

    /// Number of buckets allocated.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Indices of buckets that are not full but should be, and were not
    /// refreshed since `before` (seconds), marking them refreshed at `now`.
    ///
    /// Buckets near the deepest one in use are under-full by nature (few
    /// nodes share that long a prefix with this node): a lookup of the
    /// node's own ID refreshes them all at once, so they are left out. A
    /// bucket should be full if a deeper one is, or if it lies
    /// `log2(bucket size)` buckets above the deepest non-empty one (it
    /// covers some bucket size nodes or more). The second rule is what a
    /// new node's table needs: after its join lookup no bucket may be full
    /// yet. A bucket that cannot be full (fewer nodes share its prefix)
    /// costs one request a refresh period.
    pub fn take_stale_buckets(&mut self, before: u64, now: u64) -> Vec<usize> {
        let k = self.k;
        let Some(deepest) = self.buckets.iter().rposition(|b| !b.entries().is_empty()) else {
            return Vec::new();
        };
        let deepest_full = self.buckets.iter().rposition(|b| b.entries().len() >= k);
        let margin = k.ilog2() as usize;
        let should_be_full = deepest_full
            .unwrap_or(0)
            .max(deepest.saturating_sub(margin));
        let mut out = Vec::new();
        for (i, b) in self.buckets.iter_mut().enumerate().take(should_be_full) {
            if b.entries().len() < k && u64::from(b.last_refresh) < before {
                b.last_refresh = secs32(now);
                out.push(i);
            }
        }
        out
    }

    /// Up to `max` contacts not seen since `before` (seconds): the next
    /// ones of a walk through the table that goes on where the last call
    /// stopped, bucket by bucket, round and round.
    ///
    /// A call reads only as far as it must. On a server most of a table is
    /// stale (a contact is pinged 20 minutes after it was last heard, and
    /// 5 to 20 pings a minute check 450 entries in 23 to 90 minutes), so a
    /// call reads a few entries past the `max` it returns; scanning every
    /// entry each minute for the least recently seen (which, with every
    /// stale contact checked in turn, are the ones the walk reaches too)
    /// read the whole table once a minute, and was 5-9% of the
    /// simulator's time. A call reads every entry once at most: fewer
    /// stale contacts than `max` are all returned.
    pub fn next_stale(&mut self, before: u64, max: usize) -> Vec<Contact<A>> {
        let total = self.len();
        let mut out = Vec::with_capacity(max.min(total));
        let (mut b, mut place) = (usize::from(self.walk.0), usize::from(self.walk.1));
        let mut read = 0;
        while read < total && out.len() < max {
            if b >= self.buckets.len() {
                (b, place) = (0, 0);
            }
            let entries = self.buckets[b].entries();
            let Some(c) = entries.get(place) else {
                (b, place) = (b + 1, 0);
                continue;
            };
            read += 1;
            place += 1;
            if c.last_seen() < before {
                out.push(*c);
            }
        }
        // A table has at most `ID_BITS` buckets, and a bucket `k` entries
        // (32 by default); a place beyond `u16::MAX` (a bucket size set
        // that high) only makes the next call start elsewhere.
        self.walk = (b as u16, place as u16);
        out
    }

    /// Marks the bucket that covers `target` as refreshed.
    pub fn touch_bucket(&mut self, target: &NodeId, now: u64) {
        if let Some(i) = self.bucket_index(target) {
            if let Some(b) = self.buckets.get_mut(i) {
                b.last_refresh = secs32(now);
            }
        }
    }

    /// Makes the bucket that covers `target` due for a refresh at the next
    /// [`RoutingTable::take_stale_buckets`].
    pub fn refresh_soon(&mut self, target: &NodeId) {
        let index = self.bucket_index(target);
        if let Some(b) = index.and_then(|i| self.buckets.get_mut(i)) {
            b.last_refresh = 0;
        }
    }

    /// Marks bucket `index` as refreshed at `at` (seconds).
    pub fn set_refreshed(&mut self, index: usize, at: u64) {
        if let Some(b) = self.buckets.get_mut(index) {
            b.last_refresh = secs32(at);
        }
    }

    /// Checks the table's invariants (for tests): every entry is in the
    /// bucket of its prefix length, no bucket over k, no duplicate IDs, the
    /// diversity limit holds.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, b) in self.buckets.iter().enumerate() {
            if b.entries().len() > self.k {
                return Err(format!("bucket {i} holds {} > k", b.entries().len()));
            }
            for c in b.entries() {
                if self.me.common_prefix(&c.id) != i {
                    return Err(format!("{:?} in bucket {i}", c.id));
                }
                if !seen.insert(c.id) {
                    return Err(format!("{:?} twice", c.id));
                }
                let same = b
                    .entries()
                    .iter()
                    .filter(|x| x.addr.network() == c.addr.network())
                    .count();
                if same > self.max_per_prefix {
                    return Err(format!("bucket {i}: {same} entries of one network"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::ID_BYTES;
    use proptest::prelude::*;

    fn contact(id: [u8; ID_BYTES], addr: u32, t: u64) -> Contact<u32> {
        Contact::new(NodeId(id), addr, t)
    }

    #[test]
    fn proofs_are_asked_only_for_contacts_the_table_would_keep() {
        let me = NodeId([0; ID_BYTES]);
        let mut table = RoutingTable::new(me, 4, 4);
        let id = |i: u32| {
            let mut b = [0u8; ID_BYTES];
            b[0] = 0x80; // bucket 0
            b[1..5].copy_from_slice(&i.to_be_bytes());
            b
        };
        let addr = |i: u32| i << 8;
        for i in 0..4 {
            assert!(
                table.would_keep(&NodeId(id(i)), &addr(i), 0),
                "room in the bucket"
            );
            table.insert(contact(id(i), addr(i), 100));
        }
        assert!(
            !table.would_keep(&NodeId(id(0)), &addr(0), 0),
            "already there"
        );
        // Full bucket: the replacement cache (k/2 = 2) still has room.
        for i in 4..6 {
            assert!(table.would_keep(&NodeId(id(i)), &addr(i), 0));
            table.insert(contact(id(i), addr(i), 100 + u64::from(i)));
        }
        // Both full and fresh: a proof would be wasted.
        assert!(!table.would_keep(&NodeId(id(9)), &addr(9), 100));
        // The oldest replacement is stale: worth replacing.
        assert!(table.would_keep(&NodeId(id(9)), &addr(9), 105));
    }

    #[test]
    fn a_flood_from_one_network_cannot_fill_a_bucket() {
        let me = NodeId([0; ID_BYTES]);
        let mut table = RoutingTable::new(me, 20, 2);
        let mut accepted = 0;
        for i in 0..1000u32 {
            let mut id = [0u8; ID_BYTES];
            id[0] = 0x80; // all in bucket 0
            id[1..5].copy_from_slice(&i.to_be_bytes());
            // All from 10.1.2.0/24.
            if table.insert(contact(id, 0x0a01_0200 | (i & 0xff), 0)) == InsertOutcome::Inserted {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 2);
    }

    #[test]
    fn a_contact_keeps_its_time_and_failures_apart() {
        let now = 1_800_000_123;
        let mut c = contact([1; ID_BYTES], 7, now);
        assert_eq!(c.last_seen(), now - now % 8);
        assert_eq!(c.failures(), 0);
        for want in [1, 2, 3, 3] {
            c.add_failure();
            assert_eq!(c.failures(), want);
            assert_eq!(c.last_seen(), now - now % 8);
            assert!(c.is_verified());
        }
        c.set_seen(now + 9);
        assert_eq!((c.last_seen(), c.failures()), (now + 9 - (now + 9) % 8, 0));
        let mut u = Contact::unverified(NodeId([2; ID_BYTES]), 7, now);
        u.add_failure();
        assert_eq!((u.last_seen(), u.failures()), (now - now % 8, 1));
        assert!(!u.is_verified());
        assert_eq!(std::mem::size_of::<Contact<u32>>(), 24);
    }

    #[test]
    fn a_contact_is_marked_seen_only_from_its_own_address() {
        let me = NodeId([0; ID_BYTES]);
        let mut table: RoutingTable<u32> = RoutingTable::new(me, 4, 2);
        let mut id = [0; ID_BYTES];
        id[0] = 0x80;
        table.insert(contact(id, 1 << 8, 104));
        table.mark_seen_at(&NodeId(id), &(2 << 8), 504);
        assert_eq!(table.get(&NodeId(id)).unwrap().last_seen(), 104);
        table.mark_seen_at(&NodeId(id), &(1 << 8), 504);
        assert_eq!(table.get(&NodeId(id)).unwrap().last_seen(), 504);
    }

    #[test]
    fn an_unverified_contact_stays_so_until_it_proves_its_id() {
        let me = NodeId([0; ID_BYTES]);
        let mut table: RoutingTable<u32> = RoutingTable::new(me, 3, 1);
        let id = |i: u8| {
            let mut b = [0u8; ID_BYTES];
            b[0] = 0x80; // bucket 0
            b[1] = i;
            NodeId(b)
        };
        table.insert(contact(id(1).0, 1 << 8, 100));
        assert!(table.insert_unverified(id(2), 2 << 8, 100));
        // Only where a verified contact would enter: not twice, not past a
        // network's share, not into a full bucket (nor its replacements).
        assert!(!table.insert_unverified(id(2), 2 << 8, 100));
        assert!(!table.insert_unverified(id(3), (1 << 8) | 1, 100));
        assert!(table.insert_unverified(id(4), 4 << 8, 100));
        assert!(!table.insert_unverified(id(5), 5 << 8, 100));
        assert_eq!(table.len(), 3);
        assert_eq!(table.replacement_count(), 0);
        let c = *table.get(&id(2)).unwrap();
        assert!(!c.is_verified());
        // Traffic that does not prove the ID does not make it fresh.
        table.mark_seen(&id(2), 500);
        table.mark_seen_at(&id(2), &(2 << 8), 500);
        assert_eq!(table.get(&id(2)).unwrap().last_seen(), 96);
        // Answers to others leave it out; the node's own lookups do not.
        let verified = table.closest_where(&id(2), 10, |c| c.is_verified());
        assert!(verified.iter().all(|c| c.id != id(2)));
        assert!(table.closest(&id(2), 10).iter().any(|c| c.id == id(2)));
        // Its proof makes it verified, at the address it answered from.
        assert_eq!(
            table.insert(contact(id(2).0, 9 << 8, 504)),
            InsertOutcome::Updated
        );
        let c = *table.get(&id(2)).unwrap();
        assert!(c.is_verified());
        assert_eq!((c.addr, c.last_seen()), (9 << 8, 504));
        assert!(table.check_invariants().is_ok());
    }

    #[test]
    fn failures_promote_replacements() {
        let me = NodeId([0; ID_BYTES]);
        let mut table = RoutingTable::new(me, 2, 8);
        let ids: Vec<[u8; ID_BYTES]> = (1..=3u8)
            .map(|i| {
                let mut id = [0u8; ID_BYTES];
                id[0] = 0x80;
                id[1] = i;
                id
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            table.insert(contact(*id, (i as u32) << 8, i as u64));
        }
        assert_eq!(table.len(), 2);
        for _ in 1..MAX_FAILURES {
            assert!(!table.record_failure(&NodeId(ids[0])));
        }
        assert!(table.record_failure(&NodeId(ids[0])));
        assert!(table.get(&NodeId(ids[2])).is_some());
        assert!(table.get(&NodeId(ids[0])).is_none());
    }

    proptest! {
        #[test]
        fn invariants_hold_under_random_inserts_and_failures(
            me in any::<[u8; ID_BYTES]>(),
            ops in proptest::collection::vec(
                (any::<[u8; ID_BYTES]>(), 0u32..64, any::<bool>(), any::<bool>()),
                1..400,
            ),
        ) {
            let mut table = RoutingTable::new(NodeId(me), 4, 2);
            for (t, (id, net, fail, verified)) in ops.into_iter().enumerate() {
                if verified {
                    table.insert(contact(id, net << 8, t as u64));
                } else {
                    table.insert_unverified(NodeId(id), net << 8, t as u64);
                }
                if fail {
                    table.record_failure(&NodeId(id));
                }
                prop_assert!(table.check_invariants().is_ok(), "{:?}", table.check_invariants());
            }
        }

        #[test]
        fn the_walk_returns_every_stale_contact_in_turn(
            ops in proptest::collection::vec((any::<[u8; ID_BYTES]>(), 0u64..40), 1..300),
            before in 0u64..50,
            max in 1usize..30,
            drop_every in 2usize..10,
        ) {
            let mut table = RoutingTable::new(NodeId([0; ID_BYTES]), 20, 64);
            for (i, (id, seen)) in ops.into_iter().enumerate() {
                table.insert(contact(id, (i as u32) << 8, 1_000_000 + 4 * seen));
            }
            let before = 1_000_000 + 4 * before;
            let stale: Vec<NodeId> = table
                .contacts()
                .filter(|c| c.last_seen() < before)
                .map(|c| c.id)
                .collect();
            // Calls enough for one round return every stale contact once,
            // and only stale ones.
            let mut got: Vec<NodeId> = Vec::new();
            for _ in 0..stale.len().div_ceil(max) {
                let next = table.next_stale(before, max);
                prop_assert_eq!(next.len(), max.min(stale.len()));
                prop_assert!(next.iter().all(|c| c.last_seen() < before));
                got.extend(next.iter().map(|c| c.id));
            }
            got.truncate(stale.len());
            got.sort_unstable();
            let mut want = stale.clone();
            want.sort_unstable();
            prop_assert_eq!(got, want);
            // Entries leaving under the walk do not derail it.
            let ids: Vec<NodeId> = table.contacts().map(|c| c.id).collect();
            for id in ids.iter().step_by(drop_every) {
                table.remove(id);
                let next = table.next_stale(before, max);
                prop_assert!(next.iter().all(|c| c.last_seen() < before));
                let left = table.contacts().filter(|c| c.last_seen() < before).count();
                prop_assert_eq!(next.len(), max.min(left));
            }
        }

        #[test]
        fn closest_is_sorted_and_truly_closest(
            me in any::<[u8; ID_BYTES]>(),
            ids in proptest::collection::vec(any::<[u8; ID_BYTES]>(), 1..200),
            target in any::<[u8; ID_BYTES]>(),
        ) {
            let mut table = RoutingTable::new(NodeId(me), 20, 64);
            let target = NodeId(target);
            for (i, id) in ids.iter().enumerate() {
                // A third share a random prefix with this node, a third
                // with the target: deep buckets and near targets get tested.
                let id = match i % 3 {
                    0 => NodeId(me).random_with_prefix(id[0] as usize, *id),
                    1 => target.random_with_prefix(id[0] as usize, *id),
                    _ => NodeId(*id),
                };
                table.insert(contact(id.0, (i as u32) << 8, 0));
            }
            for n in [1, 8, 20, 50] {
                let got = table.closest(&target, n);
                let mut all: Vec<NodeId> = table.closest(&target, usize::MAX).iter().map(|c| c.id).collect();
                prop_assert_eq!(all.len(), table.len());
                all.sort_unstable_by_key(|id| id.distance(&target));
                all.truncate(n);
                let got_ids: Vec<NodeId> = got.iter().map(|c| c.id).collect();
                prop_assert_eq!(got_ids, all);
            }
            let got = table.closest(&target, 8);
            for w in got.windows(2) {
                prop_assert!(w[0].id.distance(&target) <= w[1].id.distance(&target));
            }
            if let Some(last) = got.last() {
                let worst = last.id.distance(&target);
                let closer = table.closest(&target, usize::MAX).iter().filter(|c| c.id.distance(&target) < worst).count();
                prop_assert!(closer < got.len());
            }
        }
    }
}
