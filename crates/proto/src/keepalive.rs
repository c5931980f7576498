//! Measuring how long the node's NAT keeps an idle UDP binding, so that
//! sessions are kept alive at the rate this router needs instead of a fixed
//! 15–25 s.
//!
//! The node opens test bindings from spare sockets ("slots"): a slot sends
//! [`Message::BindingOpen`] to a helper (a peer it has a session with), the
//! helper remembers where it came from and answers [`Message::BindingPing`]
//! at once (so the slot knows the binding exists). The slot then stays
//! silent for its idle time; the node asks the helper, from its main port,
//! with [`Message::BindingCheck`], and the helper pings the slot's binding
//! again. A ping that arrives means the binding outlived that idle time.
//!
//! [`BindingTimer`] runs rounds of [`SLOTS`] slots with different idle
//! times: doubling while every binding survives, then bisecting between the
//! longest idle that survived and the shortest that did not, until they are
//! within [`PRECISION`] of each other. The keepalive interval is
//! [`SAFETY`] × the longest idle that survived: always shorter than the
//! router's timeout, and within 20% of it once the search is done.
//!
//! Wire (overlay types 25–27): `id u64` after `OVERLAY_TAG | version |
//! type`. A helper answers every message with at most one datagram of the
//! same size, to an address it saw a `BindingOpen` come from.

use std::collections::VecDeque;
use std::time::Duration;

use crate::overlay::{split_header, DecodeError, OVERLAY_VERSION};
use crate::packet::OVERLAY_TAG;

/// Overlay type: open a test binding.
pub const TYPE_BINDING_OPEN: u8 = 25;
/// Overlay type: ask the helper to ping a test binding.
pub const TYPE_BINDING_CHECK: u8 = 26;
/// Overlay type: the helper's ping.
pub const TYPE_BINDING_PING: u8 = 27;

/// Test bindings per round.
pub const SLOTS: usize = 4;
/// The search stops when the gap is below this fraction of the longest
/// surviving idle time.
pub const PRECISION: f64 = 0.1;
/// The keepalive interval is this fraction of the longest surviving idle.
pub const SAFETY: f64 = 0.9;
/// The first round's idle times.
pub const FIRST_ROUND: [Duration; SLOTS] = [
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(40),
    Duration::from_secs(80),
];
/// Idle times are never tested beyond this: a binding that survives it
/// gets a keepalive of [`SAFETY`] × this.
pub const MAX_IDLE: Duration = Duration::from_secs(600);
/// Nor below this.
pub const MIN_IDLE: Duration = Duration::from_secs(2);
/// How long to wait for a ping.
pub const PING_WAIT: Duration = Duration::from_secs(2);
/// Opens retried before a slot gives up.
const OPEN_TRIES: u8 = 3;

/// A binding-measurement message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Slot → helper: remember where this came from, ping it now.
    BindingOpen {
        /// The test binding's id.
        id: u64,
    },
    /// Node → helper: ping the binding opened with this id.
    BindingCheck {
        /// The test binding's id.
        id: u64,
    },
    /// Helper → slot.
    BindingPing {
        /// The test binding's id.
        id: u64,
    },
}

impl Message {
    /// Encodes the datagram.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, id) = match *self {
            Message::BindingOpen { id } => (TYPE_BINDING_OPEN, id),
            Message::BindingCheck { id } => (TYPE_BINDING_CHECK, id),
            Message::BindingPing { id } => (TYPE_BINDING_PING, id),
        };
        let mut out = vec![OVERLAY_TAG, OVERLAY_VERSION, kind];
        out.extend_from_slice(&id.to_be_bytes());
        out
    }

    /// Whether `datagram` is one of these messages (by its type byte).
    pub fn is_binding(datagram: &[u8]) -> bool {
        matches!(datagram.get(2), Some(25..=27))
    }

    /// Decodes a datagram.
    pub fn decode(datagram: &[u8]) -> Result<Self, DecodeError> {
        let (kind, id, body) = split_header(datagram)?;
        if !body.is_empty() {
            return Err(DecodeError::Length);
        }
        match kind {
            TYPE_BINDING_OPEN => Ok(Message::BindingOpen { id }),
            TYPE_BINDING_CHECK => Ok(Message::BindingCheck { id }),
            TYPE_BINDING_PING => Ok(Message::BindingPing { id }),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// What the node should send for the measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send `BindingOpen { id }` from spare socket `slot` to the helper.
    Open {
        /// Which spare socket.
        slot: usize,
        /// The binding's id.
        id: u64,
    },
    /// Send `BindingCheck { id }` from the main socket to the helper.
    Check {
        /// The binding's id.
        id: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SlotState {
    Opening { sent: Duration, tries: u8 },
    Idle { since: Duration },
    Checking { sent: Duration },
    Done,
}

#[derive(Debug, Clone)]
struct Slot {
    id: u64,
    idle: Duration,
    state: SlotState,
}

/// The measurement (sans-IO): feed it pings and time, send its actions.
#[derive(Debug)]
pub struct BindingTimer {
    slots: Vec<Slot>,
    alive_max: Option<Duration>,
    dead_min: Option<Duration>,
    next_id: u64,
    rounds: u32,
    done: bool,
    actions: VecDeque<Action>,
}

impl BindingTimer {
    /// A measurement whose binding ids start from `seed`.
    pub fn new(seed: u64) -> Self {
        BindingTimer {
            slots: Vec::new(),
            alive_max: None,
            dead_min: None,
            next_id: seed | 1,
            rounds: 0,
            done: false,
            actions: VecDeque::new(),
        }
    }

    /// Starts the first round (or the next one) at `now`.
    pub fn start(&mut self, now: Duration) {
        if self.slots.is_empty() && !self.done {
            self.plan_round(now);
        }
    }

    /// The network changed: everything measured is void.
    pub fn reset(&mut self) {
        let seed = self.next_id;
        *self = BindingTimer::new(seed);
    }

    fn plan_round(&mut self, now: Duration) {
        let idles: Vec<Duration> = match (self.alive_max, self.dead_min) {
            _ if self.rounds == 0 => FIRST_ROUND.to_vec(),
            (alive, None) => {
                // Everything survived: reach further.
                let base = alive.unwrap_or(FIRST_ROUND[SLOTS - 1]);
                (1..=SLOTS as u32)
                    .map(|i| (base * 2u32.pow(i)).min(MAX_IDLE))
                    .collect()
            }
            (alive, Some(dead)) => {
                let low = alive.unwrap_or(MIN_IDLE);
                let step = dead.saturating_sub(low) / (SLOTS as u32 + 1);
                (1..=SLOTS as u32).map(|i| low + step * i).collect()
            }
        };
        let mut idles: Vec<Duration> = idles.into_iter().map(|d| d.max(MIN_IDLE)).collect();
        idles.dedup();
        self.rounds += 1;
        self.slots = idles
            .into_iter()
            .enumerate()
            .map(|(slot, idle)| {
                let id = self.next_id;
                self.next_id = self
                    .next_id
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                self.actions.push_back(Action::Open { slot, id });
                Slot {
                    id,
                    idle,
                    state: SlotState::Opening {
                        sent: now,
                        tries: 1,
                    },
                }
            })
            .collect();
    }

    /// A ping for binding `id` arrived on spare socket `slot`.
    pub fn handle_ping(&mut self, now: Duration, slot: usize, id: u64) {
        let Some(s) = self.slots.get_mut(slot).filter(|s| s.id == id) else {
            return;
        };
        match s.state {
            SlotState::Opening { .. } => s.state = SlotState::Idle { since: now },
            SlotState::Checking { .. } => {
                let idle = s.idle;
                self.alive_max = Some(self.alive_max.map_or(idle, |a| a.max(idle)));
                // Shorter idles survive too: no need to wait for them.
                for other in &mut self.slots {
                    if other.idle <= idle {
                        other.state = SlotState::Done;
                    }
                }
                self.finish_round_if_done(now);
            }
            _ => {}
        }
    }

    /// Drives the timers.
    pub fn handle_timeout(&mut self, now: Duration) {
        let mut dead = Vec::new();
        for (slot, s) in self.slots.iter_mut().enumerate() {
            match s.state {
                SlotState::Opening { sent, tries } if now >= sent + PING_WAIT => {
                    if tries < OPEN_TRIES {
                        s.state = SlotState::Opening {
                            sent: now,
                            tries: tries + 1,
                        };
                        self.actions.push_back(Action::Open { slot, id: s.id });
                    } else {
                        // The helper never answered: this slot says nothing.
                        s.state = SlotState::Done;
                    }
                }
                SlotState::Idle { since } if now >= since + s.idle => {
                    s.state = SlotState::Checking { sent: now };
                    self.actions.push_back(Action::Check { id: s.id });
                }
                SlotState::Checking { sent } if now >= sent + PING_WAIT => {
                    s.state = SlotState::Done;
                    dead.push(s.idle);
                }
                _ => {}
            }
        }
        for idle in dead {
            self.dead_min = Some(self.dead_min.map_or(idle, |d| d.min(idle)));
            // Longer idles die too: no need to wait for them.
            for other in &mut self.slots {
                if other.idle >= idle {
                    other.state = SlotState::Done;
                }
            }
        }
        self.finish_round_if_done(now);
    }

    fn finish_round_if_done(&mut self, now: Duration) {
        if self.slots.is_empty() || self.slots.iter().any(|s| s.state != SlotState::Done) {
            return;
        }
        self.slots.clear();
        let converged = match (self.alive_max, self.dead_min) {
            (Some(a), _) if a >= MAX_IDLE => true,
            (Some(a), Some(d)) => d.saturating_sub(a).as_secs_f64() <= PRECISION * a.as_secs_f64(),
            (None, Some(d)) => d <= MIN_IDLE,
            _ => false,
        };
        if converged || self.rounds >= 12 {
            self.done = true;
        } else {
            self.plan_round(now);
        }
    }

    /// The keepalive interval measured so far: [`SAFETY`] × the longest
    /// idle time a binding survived (`None` before any survived).
    pub fn interval(&self) -> Option<Duration> {
        self.alive_max.map(|a| a.mul_f64(SAFETY))
    }

    /// The longest idle time a binding survived, and the shortest it did
    /// not.
    pub fn bounds(&self) -> (Option<Duration>, Option<Duration>) {
        (self.alive_max, self.dead_min)
    }

    /// Whether the search is over.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Rounds started.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The next thing to send.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Opening { sent, .. } | SlotState::Checking { sent } => {
                    Some(sent + PING_WAIT)
                }
                SlotState::Idle { since } => Some(since + s.idle),
                SlotState::Done => None,
            })
            .min()
    }
}

/// The helper's side: where each test binding's `BindingOpen` came from.
/// Bounded: the oldest entries go first.
#[derive(Debug)]
pub struct BindingHelper<A> {
    bindings: VecDeque<(u64, A, Duration)>,
}

impl<A> Default for BindingHelper<A> {
    fn default() -> Self {
        BindingHelper {
            bindings: VecDeque::new(),
        }
    }
}

/// Test bindings a helper remembers at most.
pub const MAX_HELPED_BINDINGS: usize = 1024;
/// How long a helper remembers one.
pub const HELPED_BINDING_TTL: Duration = Duration::from_secs(15 * 60);

impl<A: Copy + PartialEq> BindingHelper<A> {
    /// Handles a message from `from`; returns the datagram to send and where.
    pub fn handle(&mut self, now: Duration, from: A, message: Message) -> Option<(A, Vec<u8>)> {
        self.bindings
            .retain(|(_, _, at)| now < *at + HELPED_BINDING_TTL);
        match message {
            Message::BindingOpen { id } => {
                self.bindings.retain(|(i, _, _)| *i != id);
                if self.bindings.len() >= MAX_HELPED_BINDINGS {
                    self.bindings.pop_front();
                }
                self.bindings.push_back((id, from, now));
                Some((from, Message::BindingPing { id }.encode()))
            }
            Message::BindingCheck { id } => self
                .bindings
                .iter()
                .find(|(i, _, _)| *i == id)
                .map(|(_, to, _)| (*to, Message::BindingPing { id }.encode())),
            Message::BindingPing { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs a whole measurement against a NAT that forgets idle bindings
    /// after `timeout`; returns the interval and the time it took.
    fn measure(timeout: Duration) -> (Duration, Duration) {
        let mut t = BindingTimer::new(7);
        let mut now = Duration::ZERO;
        t.start(now);
        // When each slot's binding was last used, per id.
        let mut last_used: std::collections::HashMap<u64, Duration> = Default::default();
        let mut slot_of: std::collections::HashMap<u64, usize> = Default::default();
        for _ in 0..100_000 {
            while let Some(a) = t.poll_action() {
                match a {
                    Action::Open { slot, id } => {
                        last_used.insert(id, now);
                        slot_of.insert(id, slot);
                        t.handle_ping(now, slot, id);
                    }
                    Action::Check { id } => {
                        if now.saturating_sub(last_used[&id]) < timeout {
                            t.handle_ping(now, slot_of[&id], id);
                        }
                    }
                }
            }
            if t.is_done() {
                return (t.interval().unwrap_or_default(), now);
            }
            now = t.poll_timeout().expect("a timer runs");
            t.handle_timeout(now);
        }
        panic!("did not converge");
    }

    #[test]
    fn converges_to_a_safe_interval_within_bounds() {
        for secs in [10u64, 15, 30, 65, 120, 300] {
            let timeout = Duration::from_secs(secs);
            let (interval, took) = measure(timeout);
            assert!(
                interval < timeout,
                "{secs}s: interval {interval:?} not below the timeout"
            );
            assert!(
                interval.as_secs_f64() >= 0.7 * timeout.as_secs_f64(),
                "{secs}s: interval {interval:?} under 70% of the timeout"
            );
            assert!(
                took < Duration::from_secs(30 * 60),
                "{secs}s: took {took:?}"
            );
            if secs == 15 {
                assert!(took < Duration::from_secs(90), "{secs}s: took {took:?}");
            }
        }
        // Bindings that live longer than the longest test: capped.
        let (interval, _) = measure(Duration::from_secs(3600));
        assert_eq!(interval, MAX_IDLE.mul_f64(SAFETY));
    }

    #[test]
    fn a_helper_that_never_answers_yields_no_interval() {
        let mut t = BindingTimer::new(1);
        t.start(Duration::ZERO);
        for _ in 0..50 {
            while t.poll_action().is_some() {}
            match t.poll_timeout() {
                Some(next) => t.handle_timeout(next),
                None => break,
            }
        }
        assert_eq!(t.interval(), None);
    }

    #[test]
    fn helper_pings_only_where_an_open_came_from_and_is_bounded() {
        let mut h: BindingHelper<u32> = BindingHelper::default();
        let now = Duration::ZERO;
        assert_eq!(h.handle(now, 5, Message::BindingCheck { id: 1 }), None);
        let (to, _) = h.handle(now, 5, Message::BindingOpen { id: 1 }).unwrap();
        assert_eq!(to, 5);
        // The check may come from another address (the main port).
        let (to, bytes) = h.handle(now, 9, Message::BindingCheck { id: 1 }).unwrap();
        assert_eq!(
            (to, Message::decode(&bytes)),
            (5, Ok(Message::BindingPing { id: 1 }))
        );
        for i in 0..(MAX_HELPED_BINDINGS as u64 + 10) {
            h.handle(now, 7, Message::BindingOpen { id: 100 + i });
        }
        assert_eq!(h.bindings.len(), MAX_HELPED_BINDINGS);
        assert_eq!(
            h.handle(HELPED_BINDING_TTL * 2, 9, Message::BindingCheck { id: 200 }),
            None
        );
    }

    proptest! {
        #[test]
        fn messages_round_trip_and_decoding_never_panics(id in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            for m in [Message::BindingOpen { id }, Message::BindingCheck { id }, Message::BindingPing { id }] {
                prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
                prop_assert!(Message::is_binding(&m.encode()));
            }
            let _ = Message::decode(&bytes);
        }
    }
}
