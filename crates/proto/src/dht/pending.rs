//! Requests waiting for their answers, with the earliest deadline among
//! them kept. A node is asked for its next timer after every datagram and
//! timer it handles, and its timer handler looked for overdue requests
//! each time it fired: reading every waiting request for that took 6% of
//! a 10^6-node simulation. Now only taking out the last of the requests
//! due first reads the others: requests sent together share a deadline,
//! and taking a request out, which searched the rest as soon as the first
//! of them was answered, was 3.6% of a 10^6 profile. (Keeping the IDs and
//! deadlines in a dense array of their own beside a map was tried: 3%
//! slower, from the growth of two arrays.) The requests sit in slots that
//! their IDs name, not in a map (see [`Requests`]).

/// What [`Requests`] needs to know of a request's deadlines (ms).
pub(super) trait Deadlines {
    /// The hard deadline: the request is sent again or given up.
    fn deadline_ms(&self) -> u64;
    /// The soft one, if any: a lookup's query stops holding its slot.
    fn soft_deadline_ms(&self) -> Option<u64>;
    /// Clears the soft deadline.
    fn clear_soft_deadline(&mut self);

    /// When the request next needs its node.
    fn due_ms(&self) -> u64 {
        self.soft_deadline_ms()
            .map_or(self.deadline_ms(), |s| s.min(self.deadline_ms()))
    }
}

/// Bits of a transaction ID that name its request's slot.
const SLOT_BITS: u32 = 12;

/// Requests in flight at most: one per slot.
pub(super) const MAX_REQUESTS: usize = 1 << SLOT_BITS;

/// Requests by transaction ID, each in the slot its ID names: the ID's low
/// [`SLOT_BITS`] bits are the slot, the rest are random (52 bits that an
/// off-path spoofer must guess). An answer finds its request with one read
/// and no hash, and a caller that sees an answer coming can ask the memory
/// for its slot ([`Requests::prefetch`]): the hash map this replaced was a
/// cache miss on nearly every answer at 10^6 simulated nodes.
#[derive(Debug, Clone)]
pub(super) struct Requests<T> {
    slots: Vec<Option<(u64, T)>>,
    /// Requests in the slots.
    len: usize,
    /// The least [`Deadlines::due_ms`] of the requests, `u64::MAX` when
    /// there are none.
    due_ms: u64,
    /// How many requests fall due at `due_ms`. Requests sent together
    /// (a lookup's, a refresh's pings) share their deadlines, so the
    /// first answers leave others due then, and need no new search.
    at_due: u32,
}

impl<T> Default for Requests<T> {
    fn default() -> Self {
        Requests {
            slots: Vec::new(),
            len: 0,
            due_ms: u64::MAX,
            at_due: 0,
        }
    }
}

/// The slot a transaction ID names.
fn slot_of(txid: u64) -> usize {
    (txid & (MAX_REQUESTS as u64 - 1)) as usize
}

impl<T: Deadlines> Requests<T> {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, txid: u64) -> Option<&T> {
        match self.slots.get(slot_of(txid)) {
            Some(Some((t, request))) if *t == txid => Some(request),
            _ => None,
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten().map(|(_, r)| r)
    }

    /// Heap bytes of the slots (not of what the requests point to).
    pub(super) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<(u64, T)>>()
    }

    /// Asks the memory for the slot of `txid` (see [`crate::prefetch`]).
    pub(super) fn prefetch(&self, txid: u64) {
        if let Some(slot) = self.slots.get(slot_of(txid)) {
            crate::prefetch::prefetch_lines(
                slot,
                std::mem::size_of::<Option<(u64, T)>>().div_ceil(64) + 1,
            );
        }
    }

    /// When the first request falls due, if any waits.
    pub(super) fn due_ms(&self) -> Option<u64> {
        (self.len > 0).then_some(self.due_ms)
    }

    /// An ID for a new request: the first free slot and `random`; `None`
    /// if every slot is taken.
    pub(super) fn free_txid(&self, random: u64) -> Option<u64> {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.slots.len() < MAX_REQUESTS => self.slots.len(),
            None => return None,
        };
        // Never 0, which stands for "no ID" elsewhere.
        let high = match random << SLOT_BITS {
            0 => MAX_REQUESTS as u64,
            high => high,
        };
        Some(high | slot as u64)
    }

    /// Adds a request under its ID (from [`Requests::free_txid`], or its
    /// own when sent again), or replaces the one with that ID. A request
    /// of another ID in the same slot is dropped.
    pub(super) fn insert(&mut self, txid: u64, request: T) {
        let slot = slot_of(txid);
        if self.slots.len() <= slot {
            let more = slot + 1 - self.slots.len();
            super::grow_within_class(&mut self.slots, more);
            self.slots.resize_with(slot + 1, || None);
        }
        let held = self.slots[slot].as_ref().map(|(t, _)| *t);
        if let Some(other) = held.filter(|t| *t != txid) {
            // Another request holds the slot: it goes.
            self.remove(other);
        }
        let due = request.due_ms();
        if let Some((_, old)) = self.slots[slot].replace((txid, request)) {
            if old.due_ms() <= self.due_ms {
                // The search counts the new request too.
                self.recompute();
                return;
            }
        } else {
            self.len += 1;
        }
        count_due(&mut self.due_ms, &mut self.at_due, due);
    }

    pub(super) fn remove(&mut self, txid: u64) -> Option<T> {
        let slot = self.slots.get_mut(slot_of(txid))?;
        let (_, request) = slot.take_if(|(t, _)| *t == txid)?;
        self.len -= 1;
        if request.due_ms() <= self.due_ms {
            if self.at_due > 1 {
                self.at_due -= 1;
            } else {
                self.recompute();
            }
        }
        Some(request)
    }

    /// Clears the soft deadlines passed by `now_ms` and returns their
    /// requests' IDs in order (the same seed must give the same run).
    pub(super) fn take_stalled(&mut self, now_ms: u64) -> Vec<u64> {
        if self.due_ms > now_ms {
            return Vec::new();
        }
        let mut stalled: Vec<u64> = self
            .slots
            .iter_mut()
            .flatten()
            .filter(|(_, r)| r.soft_deadline_ms().is_some_and(|s| s <= now_ms))
            .map(|(txid, r)| {
                r.clear_soft_deadline();
                *txid
            })
            .collect();
        if !stalled.is_empty() {
            self.recompute();
        }
        stalled.sort_unstable();
        stalled
    }

    /// The IDs of the requests whose hard deadline passed by `now_ms`, in
    /// order.
    pub(super) fn expired(&self, now_ms: u64) -> Vec<u64> {
        if self.due_ms > now_ms {
            return Vec::new();
        }
        let mut expired: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|(_, r)| r.deadline_ms() <= now_ms)
            .map(|(txid, _)| *txid)
            .collect();
        expired.sort_unstable();
        expired
    }

    /// Frees the slots' memory once no request waits, and gives back the
    /// free slots at the end.
    pub(super) fn release_idle(&mut self) {
        if self.len == 0 {
            if self.slots.capacity() > 0 {
                self.slots = Vec::new();
            }
            return;
        }
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
    }

    fn recompute(&mut self) {
        self.due_ms = u64::MAX;
        self.at_due = 0;
        for (_, request) in self.slots.iter().flatten() {
            count_due(&mut self.due_ms, &mut self.at_due, request.due_ms());
        }
    }
}

/// Counts a request due at `due` into the earliest deadline `least` and
/// the number of requests due then.
fn count_due(least: &mut u64, at_least: &mut u32, due: u64) {
    match due.cmp(least) {
        std::cmp::Ordering::Less => {
            *least = due;
            *at_least = 1;
        }
        std::cmp::Ordering::Equal => *at_least += 1,
        std::cmp::Ordering::Greater => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{slot_of, Deadlines, Requests, MAX_REQUESTS};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Req {
        hard: u64,
        soft: Option<u64>,
    }

    impl Deadlines for Req {
        fn deadline_ms(&self) -> u64 {
            self.hard
        }
        fn soft_deadline_ms(&self) -> Option<u64> {
            self.soft
        }
        fn clear_soft_deadline(&mut self) {
            self.soft = None;
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, Req),
        New(u64, Req),
        Remove(u64),
        Stall(u64),
    }

    /// The model's insert: a request takes its ID's slot from whoever
    /// held it.
    fn model_insert(model: &mut BTreeMap<u64, Req>, txid: u64, r: Req) {
        model.retain(|t, _| *t == txid || slot_of(*t) != slot_of(txid));
        model.insert(txid, r);
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few IDs, so inserts replace and removes hit.
        // Few times too, so that requests share deadlines.
        let req =
            (0u64..12, proptest::option::of(0u64..12)).prop_map(|(hard, soft)| Req { hard, soft });
        prop_oneof![
            (0u64..8, req.clone()).prop_map(|(t, r)| Op::Insert(t, r)),
            (0u64..4, req.clone()).prop_map(|(random, r)| Op::New(random, r)),
            (0u64..8).prop_map(Op::Remove),
            (0u64..12).prop_map(Op::Stall),
        ]
    }

    proptest! {
        /// After any sequence of changes the earliest deadline is the
        /// least of the requests', and the overdue ones are found, as a
        /// plain map read in full says.
        #[test]
        fn due_and_overdue_match_a_full_read(ops in proptest::collection::vec(op(), 0..60), now in 0u64..12) {
            let mut requests = Requests::default();
            let mut model: BTreeMap<u64, Req> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(t, r) => {
                        requests.insert(t, r);
                        model_insert(&mut model, t, r);
                    }
                    Op::New(random, r) => {
                        let t = requests.free_txid(random).expect("a free slot");
                        prop_assert!(t != 0 && !model.contains_key(&t));
                        requests.insert(t, r);
                        model_insert(&mut model, t, r);
                    }
                    Op::Remove(t) => {
                        prop_assert_eq!(requests.remove(t), model.remove(&t));
                    }
                    Op::Stall(at) => {
                        let want: Vec<u64> = model
                            .iter_mut()
                            .filter(|(_, r)| r.soft.is_some_and(|s| s <= at))
                            .map(|(t, r)| {
                                r.soft = None;
                                *t
                            })
                            .collect();
                        prop_assert_eq!(requests.take_stalled(at), want);
                    }
                }
                prop_assert_eq!(requests.due_ms(), model.values().map(Req::due_ms).min());
                prop_assert_eq!(requests.len(), model.len());
                for t in (0..8).chain(model.keys().map(|t| t ^ (1 << 20))) {
                    prop_assert_eq!(requests.get(t), model.get(&t));
                }
                requests.release_idle();
            }
            let expired: Vec<u64> = model
                .iter()
                .filter(|(_, r)| r.hard <= now)
                .map(|(t, _)| *t)
                .collect();
            prop_assert_eq!(requests.expired(now), expired);
        }
    }

    #[test]
    fn ids_name_their_slots_and_run_out_with_them() {
        let mut requests = Requests::default();
        let req = Req {
            hard: 5,
            soft: None,
        };
        for i in 0..MAX_REQUESTS {
            let t = requests.free_txid(u64::MAX).expect("a free slot");
            assert_eq!(slot_of(t), i);
            requests.insert(t, req);
        }
        assert_eq!(requests.free_txid(7), None);
        assert_eq!(requests.values().count(), MAX_REQUESTS);
        // A freed slot is the next one taken, under a new random part.
        let old = (u64::MAX << 12) | 2;
        assert!(requests.remove(old).is_some());
        assert_eq!(requests.free_txid(9), Some(9 << 12 | 2));
        // The "no ID" is never given.
        let mut empty = Requests::<Req>::default();
        assert_ne!(empty.free_txid(0), Some(0));
        empty.release_idle();
    }

    #[test]
    fn an_emptied_map_gives_its_memory_back() {
        let mut requests = Requests::default();
        requests.insert(
            1,
            Req {
                hard: 5,
                soft: None,
            },
        );
        requests.release_idle();
        assert!(requests.heap_bytes() > 0);
        requests.remove(1);
        requests.release_idle();
        assert_eq!(requests.heap_bytes(), 0);
        assert_eq!(requests.due_ms(), None);
    }
}
