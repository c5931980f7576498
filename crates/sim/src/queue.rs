//! The simulator's event queue: a timing wheel of 1-ms slots for the near
//! future, a coarser wheel of 1-s slots for the next two minutes, and a
//! heap for the rest.
//!
//! Nearly every event is a datagram delivery (under 300 ms ahead) or a
//! request's timer (about a second ahead), so a slot per millisecond makes
//! pushing and popping them O(1); a binary heap of a million nodes' events
//! costs a cache miss per level instead. The fine wheel spans about 4 s.
//! The maintenance timers (one a node every two minutes) wait in the
//! coarse wheel: in a heap they cost about 20 levels of it each, most of
//! them misses. Events come out in exactly the order a heap keyed on
//! (time, sequence number) would give: a slot holds its events in
//! sequence order, because events are numbered as they are pushed, and
//! later events move from the heap into a coarse slot, and from a coarse
//! slot into fine ones, before any event can be pushed straight into
//! where they go.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Milliseconds the wheel covers.
const WHEEL_MS: u64 = 1 << 12;
/// A slot keeps an emptied buffer up to this capacity.
const SLOT_KEEP: usize = 64;
/// Milliseconds one slot of the coarse wheel covers.
const COARSE_MS: u64 = 1 << 10;
/// Slots of the coarse wheel.
const COARSE_SLOTS: u64 = 1 << 7;
/// Milliseconds the coarse wheel covers beyond the fine one: about two
/// minutes.
const COARSE_SPAN: u64 = COARSE_MS * COARSE_SLOTS;

/// An entry: when, its sequence number, and what.
pub(crate) struct Timed<T> {
    pub at: u64,
    pub seq: u64,
    pub item: T,
}

impl<T> PartialEq for Timed<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Timed<T> {}
impl<T> PartialOrd for Timed<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Timed<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Items ordered by time, then by push order.
pub(crate) struct EventQueue<T> {
    /// Slot `t % WHEEL_MS` holds the items for time `t`, for `now <= t <
    /// now + WHEEL_MS`.
    slots: Vec<Vec<Timed<T>>>,
    /// Items in the slots.
    in_wheel: usize,
    /// Items for `now` being handed out, last first.
    current: Vec<Timed<T>>,
    /// Items before this time are in the fine wheel's slots: a multiple of
    /// [`COARSE_MS`], above `now + WHEEL_MS - COARSE_MS` and at most `now +
    /// WHEEL_MS`.
    fine_end: u64,
    /// Slot `(t / COARSE_MS) % COARSE_SLOTS` holds the items for the times
    /// `t` from `fine_end` to `fine_end + COARSE_SPAN`, in push order.
    coarse: Vec<Vec<Timed<T>>>,
    /// Items in the coarse slots.
    in_coarse: usize,
    /// Items for `fine_end + COARSE_SPAN` and later.
    far: BinaryHeap<Reverse<Timed<T>>>,
    now: u64,
    seq: u64,
}

impl<T> EventQueue<T> {
    pub fn new() -> Self {
        EventQueue {
            slots: (0..WHEEL_MS).map(|_| Vec::new()).collect(),
            in_wheel: 0,
            current: Vec::new(),
            fine_end: WHEEL_MS / COARSE_MS * COARSE_MS,
            coarse: (0..COARSE_SLOTS).map(|_| Vec::new()).collect(),
            in_coarse: 0,
            far: BinaryHeap::new(),
            now: 0,
            seq: 0,
        }
    }

    /// Adds `item` for time `at` (never before the last popped item's).
    pub fn push(&mut self, at: u64, item: T) {
        debug_assert!(at >= self.now, "an event in the past");
        let at = at.max(self.now);
        self.seq += 1;
        let timed = Timed {
            at,
            seq: self.seq,
            item,
        };
        if at < self.fine_end {
            self.slots[(at % WHEEL_MS) as usize].push(timed);
            self.in_wheel += 1;
        } else if at < self.fine_end + COARSE_SPAN {
            self.coarse[coarse_slot(at)].push(timed);
            self.in_coarse += 1;
        } else {
            self.far.push(Reverse(timed));
        }
    }

    /// The item that [`EventQueue::pop_before`] gives `n` pops from now,
    /// if it is due at the same time as the last one popped.
    pub fn peek_same_time(&self, n: usize) -> Option<&T> {
        let len = self.current.len();
        len.checked_sub(n + 1).map(|i| &self.current[i].item)
    }

    /// The earliest item (the first pushed among equals), with its time.
    #[cfg(test)]
    pub fn pop(&mut self) -> Option<(u64, T)> {
        self.pop_before(u64::MAX)
    }

    /// The earliest item if it is due before `limit`. The queue's clock
    /// stays before `limit`: items can still be pushed for `limit` and
    /// later.
    pub fn pop_before(&mut self, limit: u64) -> Option<(u64, T)> {
        loop {
            // Items in `current` and the slot are due at `now`.
            if self.now >= limit {
                return None;
            }
            if let Some(t) = self.current.pop() {
                return Some((t.at, t.item));
            }
            let slot = &mut self.slots[(self.now % WHEEL_MS) as usize];
            if !slot.is_empty() {
                self.in_wheel -= slot.len();
                std::mem::swap(&mut self.current, slot);
                // The emptied buffer goes back to the slot, unless a burst
                // made it large: capacities travel around the wheel with
                // the swaps, and kept, they added up to 4 M events' worth
                // at 10^4 nodes.
                if slot.capacity() > SLOT_KEEP {
                    *slot = Vec::new();
                }
                self.current.reverse();
                continue;
            }
            let next = if self.in_wheel > 0 {
                self.now + 1
            } else if self.in_coarse > 0 {
                // When the first coarse slot with items moves into the
                // fine wheel (none of its items is due before).
                let mut start = self.fine_end;
                while self.coarse[coarse_slot(start)].is_empty() {
                    start += COARSE_MS;
                }
                start + COARSE_MS - WHEEL_MS
            } else {
                self.far.peek()?.0.at
            };
            if next >= limit {
                return None;
            }
            self.now = next;
            self.advance_wheels();
        }
    }

    /// Moves the items the fine wheel now reaches from their coarse slots
    /// into its slots, and those the coarse wheel reaches from the heap
    /// into its slots, in order, before anything can be pushed there
    /// directly.
    fn advance_wheels(&mut self) {
        let fine_end = (self.now + WHEEL_MS) / COARSE_MS * COARSE_MS;
        while self.fine_end < fine_end {
            let slot = coarse_slot(self.fine_end);
            if !self.coarse[slot].is_empty() {
                // The buffer goes with its items: this slot's next ones
                // come two minutes later, and kept, every slot would hold
                // the capacity of its largest burst.
                let items = std::mem::take(&mut self.coarse[slot]);
                self.in_coarse -= items.len();
                self.in_wheel += items.len();
                for t in items {
                    self.slots[(t.at % WHEEL_MS) as usize].push(t);
                }
            }
            self.fine_end += COARSE_MS;
            let coarse_end = self.fine_end + COARSE_SPAN;
            while let Some(Reverse(t)) = self.far.peek() {
                if t.at >= coarse_end {
                    break;
                }
                let Reverse(t) = self.far.pop().expect("peeked");
                self.coarse[coarse_slot(t.at)].push(t);
                self.in_coarse += 1;
            }
        }
    }
}

/// The coarse slot of time `at`.
fn coarse_slot(at: u64) -> usize {
    ((at / COARSE_MS) % COARSE_SLOTS) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Pops in the order of a heap keyed on (time, push order), with
        /// pushes between pops, near and far.
        #[test]
        fn pops_in_heap_order(ops in proptest::collection::vec((0u64..3, 0u64..200_000, any::<bool>()), 1..400)) {
            let mut q = EventQueue::new();
            let mut heap = BinaryHeap::new();
            let (mut seq, mut now) = (0u64, 0u64);
            for (i, (pops, delay, near)) in ops.into_iter().enumerate() {
                let at = now + if near { delay % 300 } else { delay };
                q.push(at, i);
                seq += 1;
                heap.push(Reverse((at, seq, i)));
                for _ in 0..pops {
                    let want = heap.pop().map(|Reverse((at, _, i))| (at, i));
                    let got = q.pop();
                    prop_assert_eq!(got, want);
                    if let Some((at, _)) = got {
                        now = at;
                    }
                }
            }
            while let Some(Reverse((at, _, i))) = heap.pop() {
                prop_assert_eq!(q.pop(), Some((at, i)));
            }
            prop_assert_eq!(q.pop(), None);
        }

        /// Pops only what is due before a rising limit, in the same order,
        /// with pushes from the last popped time on.
        #[test]
        fn pops_before_a_limit_in_heap_order(ops in proptest::collection::vec((0u64..3, 0u64..20_000, any::<bool>(), 0u64..40), 1..400)) {
            let mut q = EventQueue::new();
            let mut heap = BinaryHeap::new();
            let (mut seq, mut now, mut limit) = (0u64, 0u64, 0u64);
            for (i, (pops, delay, near, step)) in ops.into_iter().enumerate() {
                let at = now + if near { delay % 300 } else { delay };
                q.push(at, i);
                seq += 1;
                heap.push(Reverse((at, seq, i)));
                limit += step;
                for _ in 0..pops {
                    let want = match heap.peek() {
                        Some(Reverse((at, _, _))) if *at < limit => {
                            heap.pop().map(|Reverse((at, _, i))| (at, i))
                        }
                        _ => None,
                    };
                    let got = q.pop_before(limit);
                    prop_assert_eq!(got, want);
                    now = match got {
                        Some((at, _)) => at,
                        None => now.max(limit),
                    };
                }
            }
            while let Some(Reverse((at, _, i))) = heap.pop() {
                prop_assert_eq!(q.pop(), Some((at, i)));
            }
            prop_assert_eq!(q.pop(), None);
        }
    }
}
