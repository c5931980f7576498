//! One iterative lookup: the candidates it knows, sorted by distance to the
//! target, and which of them it has asked.

/// Answers a get waits for after it found a record (the highest sequence
/// among them wins).
pub const GET_CONFIRMATIONS: u8 = 2;

use super::address::Address;
use super::record::SignedRecord;
use super::NodeId;

/// What a lookup is for.
#[derive(Debug, Clone)]
pub(crate) enum LookupKind {
    /// Find the k closest nodes.
    FindNode,
    /// Find a record.
    GetRecord,
    /// Find the k closest, then store the record there.
    Put(SignedRecord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    InFlight,
    /// Asked, slower than the soft timeout: still welcome to answer, but no
    /// longer holds one of the α slots nor blocks the end of the search.
    Stalled,
    Answered,
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate<A> {
    distance: NodeId,
    id: NodeId,
    addr: A,
    state: State,
    hop: u8,
}

/// An iterative lookup.
#[derive(Debug, Clone)]
pub(crate) struct Lookup<A> {
    pub target: NodeId,
    pub kind: LookupKind,
    pub started_ms: u64,
    pub found: Option<(SignedRecord, u8)>,
    /// Answers received since a record was first found.
    answers_since_found: u8,
    /// Put phase: acks still expected and records stored.
    pub put_waiting: usize,
    pub put_stored: usize,
    pub put_started: bool,
    pub contacted: u32,
    /// Ask `FindPeer` instead of `FindNode`: nodes that know the target
    /// introduce this node to it (see `wire`).
    pub introduce: bool,
    /// With `introduce`: the txid of each `FindPeer` sent, and the hop of
    /// the node asked (the target's answer through its introduction echoes
    /// the txid, possibly after the node's own answer).
    pub introducers: Vec<(u64, u8)>,
    candidates: Vec<Candidate<A>>,
    k: usize,
    alpha: usize,
    eager: usize,
}

impl<A: Address> Lookup<A> {
    /// Heap bytes the lookup holds besides itself.
    pub fn heap_bytes(&self) -> usize {
        self.candidates.capacity() * std::mem::size_of::<Candidate<A>>()
            + self.introducers.capacity() * std::mem::size_of::<(u64, u8)>()
            + self.found.as_ref().map_or(0, |(r, _)| r.heap_bytes())
    }

    /// A lookup keeping `alpha` requests in flight, and its `eager` closest
    /// live candidates asked whatever is in flight.
    pub fn new(
        target: NodeId,
        kind: LookupKind,
        (k, alpha, eager): (usize, usize, usize),
        started_ms: u64,
    ) -> Self {
        Lookup {
            target,
            kind,
            started_ms,
            found: None,
            answers_since_found: 0,
            put_waiting: 0,
            put_stored: 0,
            put_started: false,
            contacted: 0,
            introduce: false,
            introducers: Vec::new(),
            candidates: Vec::new(),
            k,
            alpha,
            eager,
        }
    }

    /// Adds nodes learned at `hop` (deduplicated, kept sorted and bounded).
    /// A candidate not asked yet that a shorter path names again is asked
    /// at that path's hop.
    pub fn add(&mut self, nodes: impl IntoIterator<Item = (NodeId, A)>, hop: u8, me: &NodeId) {
        for (id, addr) in nodes {
            if id == *me {
                continue;
            }
            if let Some(c) = self.candidates.iter_mut().find(|c| c.id == id) {
                if c.state == State::New {
                    c.hop = c.hop.min(hop);
                }
                continue;
            }
            let distance = id.distance(&self.target);
            let pos = self.candidates.partition_point(|c| c.distance < distance);
            if pos >= self.k * 3 {
                continue;
            }
            self.candidates.insert(
                pos,
                Candidate {
                    distance,
                    id,
                    addr,
                    state: State::New,
                    hop,
                },
            );
            self.candidates.truncate(self.k * 3);
        }
    }

    /// Candidates to ask now: the closest not yet asked among the k closest
    /// still alive, keeping at most α requests in flight; and the `eager`
    /// closest whatever is in flight. When an answer names nodes closer than
    /// any asked, they are asked at once instead of waiting for a slot held
    /// by a request to a farther node: the lookup follows the fastest path.
    pub fn next_queries(&mut self) -> Vec<(NodeId, A, u8)> {
        let in_flight = self
            .candidates
            .iter()
            .filter(|c| c.state == State::InFlight)
            .count();
        let mut out = Vec::new();
        let mut alive = 0;
        for c in self.candidates.iter_mut() {
            if matches!(c.state, State::Failed | State::Stalled) {
                continue;
            }
            alive += 1;
            if alive > self.k {
                break;
            }
            if c.state == State::New && (alive <= self.eager || in_flight + out.len() < self.alpha)
            {
                c.state = State::InFlight;
                out.push((c.id, c.addr, c.hop));
            }
        }
        self.contacted += out.len() as u32;
        out
    }

    pub fn on_answer(&mut self, id: &NodeId) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.id == *id) {
            c.state = State::Answered;
        }
        if self.found.is_some() {
            self.answers_since_found = self.answers_since_found.saturating_add(1);
        }
    }

    /// The query to `id` passed its soft timeout.
    pub fn on_stall(&mut self, id: &NodeId) {
        if let Some(c) = self
            .candidates
            .iter_mut()
            .find(|c| c.id == *id && c.state == State::InFlight)
        {
            c.state = State::Stalled;
        }
    }

    pub fn on_failure(&mut self, id: &NodeId) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.id == *id) {
            c.state = State::Failed;
        }
    }

    /// The hop at which `id` was asked.
    pub fn hop_of(&self, id: &NodeId) -> u8 {
        self.candidates
            .iter()
            .find(|c| c.id == *id)
            .map(|c| c.hop)
            .unwrap_or(1)
    }

    /// Whether the search phase is over: a record was found (get), or the
    /// k closest live candidates have all answered.
    pub fn search_done(&self) -> bool {
        // A get waits for a few more answers after the first record, so a
        // holder that missed the owner's latest update cannot decide alone.
        if matches!(self.kind, LookupKind::GetRecord)
            && self.found.is_some()
            && self.answers_since_found >= GET_CONFIRMATIONS
        {
            return true;
        }
        // Looking for a node and it answered: found.
        if matches!(self.kind, LookupKind::FindNode)
            && self
                .candidates
                .iter()
                .any(|c| c.id == self.target && c.state == State::Answered)
        {
            return true;
        }
        let mut alive = 0;
        for c in &self.candidates {
            match c.state {
                State::Failed | State::Stalled => continue,
                State::New | State::InFlight => return false,
                State::Answered => {}
            }
            alive += 1;
            if alive >= self.k {
                break;
            }
        }
        true
    }

    /// The k closest candidates that answered, closest first.
    pub fn closest_answered(&self) -> Vec<(NodeId, A)> {
        self.candidates
            .iter()
            .filter(|c| c.state == State::Answered)
            .take(self.k)
            .map(|c| (c.id, c.addr))
            .collect()
    }

    /// Hops of the lookup: the round in which the closest answering node
    /// (the target itself, if it exists) was asked.
    pub fn hops(&self) -> u8 {
        if let Some((_, hop)) = &self.found {
            return *hop;
        }
        self.candidates
            .iter()
            .find(|c| c.state == State::Answered)
            .map(|c| c.hop)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: u8) -> NodeId {
        let mut b = [0u8; crate::dht::ID_BYTES];
        b[0] = first;
        NodeId(b)
    }

    /// With α = 2, the two closest are asked; the closer one answers and
    /// names two nodes closer still while the other request is in flight.
    fn asked_after_a_closer_answer(eager: usize) -> Vec<NodeId> {
        let (target, me) = (id(0), id(0xff));
        let mut lookup: Lookup<u32> = Lookup::new(target, LookupKind::FindNode, (20, 2, eager), 0);
        lookup.add([(id(0x80), 1), (id(0x70), 2), (id(0x60), 3)], 1, &me);
        let first: Vec<NodeId> = lookup.next_queries().iter().map(|q| q.0).collect();
        assert_eq!(first, [id(0x60), id(0x70)]);
        lookup.on_answer(&id(0x60));
        lookup.add([(id(0x10), 4), (id(0x20), 5)], 2, &me);
        lookup.next_queries().iter().map(|q| q.0).collect()
    }

    #[test]
    fn a_candidate_named_again_by_a_shorter_path_is_asked_at_its_hop() {
        let (target, me) = (id(0), id(0xff));
        let mut lookup: Lookup<u32> = Lookup::new(target, LookupKind::FindNode, (20, 1, 0), 0);
        lookup.add([(id(0x80), 1), (id(0x70), 2)], 1, &me);
        assert_eq!(lookup.next_queries(), [(id(0x70), 2, 1)]);
        lookup.on_answer(&id(0x70));
        // A hop-3 answer names 0x10 and 0x20; before either is asked, a
        // hop-2 answer names 0x20 again.
        lookup.add([(id(0x10), 4), (id(0x20), 5)], 3, &me);
        lookup.add([(id(0x20), 5)], 2, &me);
        let asked: Vec<_> = std::iter::from_fn(|| {
            let q = lookup.next_queries();
            q.first().inspect(|q| lookup.on_answer(&q.0)).copied()
        })
        .collect();
        assert_eq!(&asked[..2], [(id(0x10), 4, 3), (id(0x20), 5, 2)]);
        // Once asked, a candidate keeps the hop it was asked at.
        lookup.add([(id(0x10), 4)], 1, &me);
        assert_eq!(lookup.hop_of(&id(0x10)), 3);
    }

    #[test]
    fn closer_nodes_wait_for_a_slot_unless_eager() {
        assert_eq!(asked_after_a_closer_answer(0), [id(0x10)]);
        assert_eq!(asked_after_a_closer_answer(2), [id(0x10), id(0x20)]);
    }
}
