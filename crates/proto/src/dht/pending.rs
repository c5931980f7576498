//! Requests waiting for their answers, with the earliest deadline among
//! them kept. A node is asked for its next timer after every datagram and
//! timer it handles, and its timer handler looked for overdue requests
//! each time it fired: reading every waiting request for that took 6% of
//! a 10^6-node simulation. Now only taking out the last of the requests
//! due first reads the others: requests sent together share a deadline,
//! and taking a request out, which searched the rest as soon as the first
//! of them was answered, was 3.6% of a 10^6 profile. (Keeping the IDs and
//! deadlines in a dense array of their own instead of a map was tried: 3%
//! slower, from the growth of two arrays.)

use rustc_hash::FxHashMap;

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

/// Requests by transaction ID.
#[derive(Debug, Clone)]
pub(super) struct Requests<T> {
    map: FxHashMap<u64, T>,
    /// The least [`Deadlines::due_ms`] in `map`, `u64::MAX` when empty.
    due_ms: u64,
    /// How many requests fall due at `due_ms`. Requests sent together
    /// (a lookup's, a refresh's pings) share their deadlines, so the
    /// first answers leave others due then, and need no new search.
    at_due: u32,
}

impl<T> Default for Requests<T> {
    fn default() -> Self {
        Requests {
            map: FxHashMap::default(),
            due_ms: u64::MAX,
            at_due: 0,
        }
    }
}

impl<T: Deadlines> Requests<T> {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn contains_key(&self, txid: u64) -> bool {
        self.map.contains_key(&txid)
    }

    pub(super) fn get(&self, txid: u64) -> Option<&T> {
        self.map.get(&txid)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.map.values()
    }

    /// Heap bytes of the map (not of what its entries point to).
    pub(super) fn heap_bytes(&self) -> usize {
        super::map_heap_bytes(&self.map)
    }

    /// When the first request falls due, if any waits.
    pub(super) fn due_ms(&self) -> Option<u64> {
        (!self.map.is_empty()).then_some(self.due_ms)
    }

    /// Adds a request, or replaces the one with its ID.
    pub(super) fn insert(&mut self, txid: u64, request: T) {
        let due = request.due_ms();
        if let Some(old) = self.map.insert(txid, request) {
            if old.due_ms() <= self.due_ms {
                // The search counts the new request too.
                self.recompute();
                return;
            }
        }
        count_due(&mut self.due_ms, &mut self.at_due, due);
    }

    pub(super) fn remove(&mut self, txid: u64) -> Option<T> {
        let request = self.map.remove(&txid)?;
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
    /// requests' IDs in order (the map's order is random, and the same
    /// seed must give the same run).
    pub(super) fn take_stalled(&mut self, now_ms: u64) -> Vec<u64> {
        if self.due_ms > now_ms {
            return Vec::new();
        }
        let mut stalled: Vec<u64> = self
            .map
            .iter_mut()
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
            .map
            .iter()
            .filter(|(_, r)| r.deadline_ms() <= now_ms)
            .map(|(txid, _)| *txid)
            .collect();
        expired.sort_unstable();
        expired
    }

    /// Frees the map's memory once it is empty.
    pub(super) fn release_idle(&mut self) {
        if self.map.is_empty() && self.map.capacity() > 0 {
            self.map = FxHashMap::default();
        }
    }

    fn recompute(&mut self) {
        self.due_ms = u64::MAX;
        self.at_due = 0;
        for due in self.map.values().map(T::due_ms) {
            count_due(&mut self.due_ms, &mut self.at_due, due);
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
    use super::{Deadlines, Requests};
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
        Remove(u64),
        Stall(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few IDs, so inserts replace and removes hit.
        // Few times too, so that requests share deadlines.
        let req =
            (0u64..12, proptest::option::of(0u64..12)).prop_map(|(hard, soft)| Req { hard, soft });
        prop_oneof![
            (0u64..8, req).prop_map(|(t, r)| Op::Insert(t, r)),
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
                        model.insert(t, r);
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
