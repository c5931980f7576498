//! The DHT state machine.
//!
//! Drive it like quinn-proto: feed [`Dht::handle_datagram`] with DHT
//! datagrams and call [`Dht::handle_timeout`] when the time from
//! [`Dht::poll_timeout`] has come; after either, drain
//! [`Dht::poll_transmit`] (datagrams to send) and [`Dht::poll_event`]
//! (finished lookups). Time is always passed in (`now`, since the Unix
//! epoch) and randomness comes from the seed given at creation, so a run is
//! reproducible.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;

use super::address::Address;
use super::lookup::{Lookup, LookupKind};
use super::pending::{Deadlines, Requests};
use super::record::{simulated_signature, RecordError, RecordStore, Signatures, SignedRecord};
use super::table::{Contact, InsertOutcome, RoutingTable};
use super::wire::{
    proof_message, DhtMessage, Introduction, Request, RequestBody, Response, ResponseBody,
    WireError,
};
use super::NodeId;
use crate::rng::SplitMix64;
use crate::Keypair;

/// Contacts in one answer by default ([`DhtConfig::answer_nodes`]).
pub const ANSWER_NODES: usize = 10;
/// Requests without a cookie that may get a list of contacts are padded to
/// this size so that a full answer (10 IPv6 contacts with a proof: 503
/// bytes) fits within 3× the request.
pub const UNVERIFIED_REQUEST_PAD: usize = 168;
/// Other requests that ask for an ID proof are padded to this size, so that
/// the answer with the proof (152 bytes with an IPv6 address) fits within
/// 3× the request.
pub const PROOF_REQUEST_PAD: usize = 51;
/// The shortest adaptive query timeout.
pub const MIN_QUERY_TIMEOUT_MS: u64 = 150;
/// Cookies this node keeps for other nodes' addresses.
const MAX_COOKIES: usize = 1024;
/// Cookies are kept for two periods of this length: responders accept the
/// cookies of their current and previous 10-minute epoch, so a cookie is
/// good for at least 10 minutes.
const COOKIE_PERIOD: Duration = Duration::from_secs(300);
/// Introductions a node answers a second at most (each costs a signature).
const MAX_INTRODUCTIONS_PER_S: u8 = 20;
/// Verification pings of new server requesters in flight at most.
const MAX_VERIFICATIONS: usize = 32;

/// API lookups that wait for the node to join, at most (more start at
/// once, from what the table holds).
const MAX_WAITING_FOR_JOIN: usize = 64;

/// Bootstrap addresses kept for rejoining with an empty table.
const MAX_BOOTSTRAPS: usize = 8;

/// How often a node whose table holds fewer than k/4 contacts joins again.
const REPAIR_INTERVAL_S: u64 = 5 * 60;

/// Settings of a DHT node.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// Replication factor: a record is stored at the k closest servers,
    /// and a lookup ends when the k closest live candidates have answered.
    pub k: usize,
    /// Entries of one routing-table bucket at most. Larger than k: the
    /// more contacts a table has in the bucket that covers a target, the
    /// closer to it the nodes it names, so lookups take fewer hops.
    pub bucket_size: usize,
    /// Requests in flight per lookup.
    pub alpha: usize,
    /// A lookup, get or put started through the API always has its this
    /// many closest live candidates asked, beyond the α in flight (see
    /// `Lookup::next_queries`); the node's own maintenance lookups do not.
    pub eager: usize,
    /// Whether a serving node's lookups for a peer ask to be introduced
    /// to it (`RequestBody::FindPeer`): the target answers the asker
    /// directly, half a round trip sooner.
    pub introductions: bool,
    /// Entries of one bucket from one /24 (IPv6 /48) at most.
    pub max_per_prefix: usize,
    /// How long to wait for a response to a ping or a store.
    pub rpc_timeout: Duration,
    /// The longest a lookup waits for one node before asking the next one
    /// instead (no retry: a lookup has other candidates). The actual wait
    /// adapts to measured RTTs (smoothed RTT + 4 deviations, as TCP's RTO),
    /// never below [`MIN_QUERY_TIMEOUT_MS`].
    pub query_timeout: Duration,
    /// Retries after a timeout.
    pub retries: u8,
    /// Refresh a bucket that is not full (but should be) and no lookup has
    /// touched for this long. A refresh is one request and the checks of
    /// the nodes it names, so it can be frequent: under churn, tables stay
    /// full only if their gaps are filled within minutes.
    pub bucket_refresh: Duration,
    /// Look up this node's own ID this often (refreshes the deep buckets,
    /// and tells the closest nodes this one is there).
    pub self_lookup: Duration,
    /// Contacts in one answer to FindNode or GetRecord at most (fewer than
    /// k: a lookup gathers the k closest from several answers, and an
    /// answer's contacts are most of the DHT's bytes).
    pub answer_nodes: usize,
    /// Ping a contact not heard from for this long (keeps full buckets
    /// alive and finds dead entries).
    pub contact_stale: Duration,
    /// The same for a server: its table answers the lookups of every node
    /// that asks it, and each dead entry it hands out costs them a wasted
    /// request.
    pub server_contact_stale: Duration,
    /// A server takes the nodes a bucket refresh names into its first
    /// this many buckets unverified (see `Contact::unverified`); into the
    /// deeper ones, only once they answered a proof ping each. The first
    /// buckets (half, a quarter... of the network) serve mostly the first
    /// hop of the node's own lookups; the deeper ones answer the lookups
    /// of others, which are handed only verified contacts. A client, whose
    /// table serves only its own lookups, takes them all unverified.
    pub unverified_buckets: usize,
    /// Liveness pings per maintenance run of a server at most, before the
    /// boost.
    pub pings_per_maintenance: usize,
    /// Liveness pings per maintenance run of a client at most. Its table
    /// serves only its own lookups, whose failed queries already drop the
    /// contacts that left (a ping settles each at once), and its bytes
    /// have the tighter goal.
    pub client_pings_per_maintenance: usize,
    /// Each contact a run's liveness pings found gone earns one more ping
    /// at the next run, up to this many times `pings_per_maintenance`
    /// more: a big table under churn loses more entries a run than the
    /// base finds, and a table that loses none pings only the base. On
    /// servers only: a client's table serves only its own lookups.
    pub liveness_boost: usize,
    /// A client's byte budget for filling its table beyond the regular
    /// refreshes: it repeats a refresh early (see `Dht::handle_response`)
    /// only while it has sent no more than `client_fill_burst` bytes plus
    /// this many a second of its life. Its other traffic is not held back.
    pub client_bytes_per_s: u64,
    /// See `client_bytes_per_s`: what a new client may spend at once,
    /// most of it on its join.
    pub client_fill_burst: u64,
    /// How often the owner re-stores its records.
    pub republish: Duration,
    /// How often maintenance runs (bucket refreshes, liveness pings,
    /// records' expiry). Every two minutes: a run's cost is mostly reading
    /// the node's state and table, whatever it then sends, so one run of
    /// twice the pings costs less than two (in a simulator of a million
    /// nodes, runs every minute were a quarter of its time). The first run
    /// follows the end of the node's join lookup at once.
    pub maintenance: Duration,
    /// Records held for others at most.
    pub max_records: usize,
    /// Records held from one source network at most.
    pub max_records_per_network: usize,
    /// Requests in flight at most (new ones wait their turn by failing fast).
    pub max_pending: usize,
    /// Whether this node serves routing and storage (reachable nodes only)
    /// at first (`Dht::new`; `Dht::with_shared_config` takes it apart,
    /// and `Dht::set_server` changes it).
    pub server: bool,
    /// Keep the last few (responder, observed address) pairs and request
    /// sources for the node's reachability checks (off in the simulator).
    pub track_peers: bool,
    /// How ID proofs and records are signed: ed25519, except in the
    /// simulator (see [`Signatures::SimulatedInsecure`]).
    pub signatures: Signatures,
}

/// A replacement-cache entry older than this is worth replacing with a
/// contact a lookup meets (and asks to prove its ID).
const REPLACEMENT_FRESH: Duration = Duration::from_secs(15 * 60);

/// Contacts a server's bucket refresh asks in turn when one does not
/// answer (a client's asks one).
const REFRESH_TRIES: u8 = 3;

/// Observations and request sources kept with `track_peers`.
pub const TRACKED_PEERS: usize = 16;

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            k: 20,
            bucket_size: 32,
            alpha: 8,
            eager: 12,
            introductions: true,
            max_per_prefix: 2,
            rpc_timeout: Duration::from_millis(1000),
            query_timeout: Duration::from_millis(500),
            retries: 1,
            bucket_refresh: Duration::from_secs(10 * 60),
            self_lookup: Duration::from_secs(30 * 60),
            answer_nodes: ANSWER_NODES,
            contact_stale: Duration::from_secs(30 * 60),
            server_contact_stale: Duration::from_secs(20 * 60),
            unverified_buckets: 5,
            pings_per_maintenance: 10,
            client_pings_per_maintenance: 6,
            liveness_boost: 3,
            client_bytes_per_s: 12,
            client_fill_burst: 8 * 1024,
            republish: Duration::from_secs(20 * 60),
            maintenance: Duration::from_secs(120),
            max_records: 4096,
            max_records_per_network: 256,
            max_pending: 512,
            server: true,
            track_peers: false,
            signatures: Signatures::Ed25519,
        }
    }
}

/// Identifies a lookup, get or put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryId(pub u64);

/// What the DHT reports.
#[derive(Debug, Clone, PartialEq)]
pub enum DhtEvent<A> {
    /// A lookup finished.
    LookupDone {
        /// Which.
        query: QueryId,
        /// Its target.
        target: NodeId,
        /// The k closest nodes that answered, closest first.
        closest: Vec<(NodeId, A)>,
        /// Sequential rounds until the closest node answered.
        hops: u8,
        /// Duration in milliseconds.
        elapsed_ms: u64,
    },
    /// A get finished.
    GetDone {
        /// Which.
        query: QueryId,
        /// The key.
        key: NodeId,
        /// The record, verified, if found.
        record: Option<SignedRecord>,
        /// Rounds until it was found.
        hops: u8,
        /// Duration in milliseconds.
        elapsed_ms: u64,
    },
    /// A put finished.
    PutDone {
        /// Which.
        query: QueryId,
        /// The key.
        key: NodeId,
        /// How many nodes stored it.
        stored: usize,
        /// Duration in milliseconds.
        elapsed_ms: u64,
    },
}

/// What the DHT did, for status and the simulator's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhtCounters {
    /// Datagrams sent.
    pub sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Requests that timed out (after retries).
    pub timeouts: u64,
    /// Datagrams that did not decode.
    pub malformed: u64,
    /// Responses with an unknown txid, from the wrong address or node.
    pub unexpected_responses: u64,
    /// Responses whose ID proof failed.
    pub bad_proofs: u64,
    /// Responses cut to 3× their request (no cookie).
    pub trimmed_responses: u64,
    /// Records refused (bad signature, stale, full...).
    pub records_refused: u64,
    /// Requests not sent because too many were in flight.
    pub overloaded: u64,
    /// Contacts dropped because they said they no longer serve.
    pub contacts_left: u64,
    /// ID proofs this node signed (answering requests that asked for one).
    pub proofs_signed: u64,
    /// ID proofs this node checked (answers to its requests).
    pub proofs_checked: u64,
    /// Introductions sent: a `FindPeer` asked for a contact of this node.
    pub introductions_sent: u64,
    /// Introductions answered (to the asker, with a proof).
    pub introductions_answered: u64,
    /// Introductions not answered: over the rate limit, or already
    /// answered for that asker.
    pub introductions_dropped: u64,
    /// Lookups of this node that the target answered through an
    /// introduction.
    pub introduced: u64,
    /// Requests sent (first attempts and retries), by what they were for.
    pub requests: RequestsSent,
}

/// Requests sent, by purpose: where a node's DHT traffic goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestsSent {
    /// Lookups, gets and the search phase of puts (own lookups included).
    pub queries: u64,
    /// Stores of records at the closest nodes.
    pub stores: u64,
    /// Liveness pings of stale contacts.
    pub liveness: u64,
    /// Pings verifying new server requesters and bootstrap nodes.
    pub verify: u64,
    /// Proof pings of nodes a server's refresh named for its deeper
    /// buckets (see `DhtConfig::unverified_buckets`).
    pub fill: u64,
    /// Bucket refreshes.
    pub refresh: u64,
}

impl RequestsSent {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &RequestsSent) {
        self.queries += other.queries;
        self.stores += other.stores;
        self.liveness += other.liveness;
        self.verify += other.verify;
        self.fill += other.fill;
        self.refresh += other.refresh;
    }

    fn count(&mut self, purpose: Purpose) {
        let slot = match purpose {
            Purpose::Query(_) => &mut self.queries,
            Purpose::Put(_) => &mut self.stores,
            Purpose::Liveness | Purpose::Leave => &mut self.liveness,
            Purpose::Verify => &mut self.verify,
            Purpose::Fill => &mut self.fill,
            Purpose::Refresh(_) => &mut self.refresh,
        };
        *slot += 1;
    }
}

#[derive(Debug, Clone, Copy)]
enum Purpose {
    Query(QueryId),
    Put(QueryId),
    /// Check that a contact still answers (its bucket is full and a
    /// newcomer waits).
    Liveness,
    /// A ping to a new address: verify the node and add it to the table.
    Verify,
    /// A ping to a node a server's refresh named for a free entry of a
    /// deeper bucket (bounded by the bucket's room, not by
    /// [`MAX_VERIFICATIONS`]).
    Fill,
    /// A bucket refresh: one contact is asked for the nodes of a random ID
    /// in the bucket; the ones the bucket has room for enter it unverified
    /// (see `Contact::unverified`), or after a proof ping each in a
    /// server's deeper buckets (`DhtConfig::unverified_buckets`). With how
    /// many contacts failed to answer it before.
    Refresh(u8),
    /// A ping that tells a contact this node no longer serves. The contact
    /// believes only a ping with its cookie (the address is proven): one
    /// that carried none is sent again with the cookie its answer gave.
    Leave,
}

/// Whether a request carries the cookie its destination gave this node (and
/// the cookie of its answer is kept): searches and stores, the requests
/// that without one are padded to 168 bytes (a ping asking for a proof
/// only to 51) and whose answers are trimmed to 3x; and a ping that says
/// this node no longer serves, which only a proven address may say (see
/// `Purpose::Leave`). Pings are 85% of a node's answers (liveness,
/// verify, and then the proof pings of every new entry); their cookies
/// were 90% of what a node kept, and one in a thousand pings found one to
/// carry (a contact is pinged 20 minutes or more after it was last heard
/// from, when its cookie is gone).
fn carries_cookie(body: &RequestBody, purpose: Purpose) -> bool {
    !matches!(body, RequestBody::Ping) || matches!(purpose, Purpose::Leave)
}

/// What signs this node's ID proofs: its key pair, or with the simulator's
/// insecure scheme only its peer ID (which is all that scheme uses; a key
/// pair takes 224 bytes, and a simulator holds a million).
#[derive(Debug)]
enum Signer {
    Ed25519(Box<Keypair>),
    SimulatedInsecure(crate::PeerId),
}

impl Signer {
    fn new(keypair: Keypair, scheme: Signatures) -> Self {
        match scheme {
            Signatures::Ed25519 => Signer::Ed25519(Box::new(keypair)),
            Signatures::SimulatedInsecure => Signer::SimulatedInsecure(keypair.peer_id()),
        }
    }

    fn peer_id(&self) -> crate::PeerId {
        match self {
            Signer::Ed25519(k) => k.peer_id(),
            Signer::SimulatedInsecure(p) => *p,
        }
    }

    fn sign(&self, message: &[u8]) -> [u8; 64] {
        match self {
            Signer::Ed25519(k) => Signatures::Ed25519.sign(k, message),
            Signer::SimulatedInsecure(p) => simulated_signature(p, message),
        }
    }
}

/// Cookies by address: a vector sorted by address, but for up to
/// [`JAR_TAIL`] new ones at its end, merged into the rest when that many
/// wait (a sorted insert moved half the vector each time; `memmove` was
/// 4% of a 10^6 profile). Grown by an eighth at a time. A node holds a
/// few dozen (those of its searches' and stores' answers only: see
/// [`carries_cookie`]); a hash map took twice the memory, and at a
/// million simulated nodes that is half a gigabyte. A cookie is kept as
/// two `u32` halves: next to a 4-byte address an entry takes 12 bytes,
/// not 16.
#[derive(Debug, Clone)]
struct CookieJar<A> {
    entries: Vec<(A, [u32; 2])>,
    /// The entries before this are sorted; the few after it are not.
    sorted: u16,
}

/// New addresses wait unsorted at most this many before they are merged.
const JAR_TAIL: usize = 16;

impl<A> Default for CookieJar<A> {
    fn default() -> Self {
        CookieJar {
            entries: Vec::new(),
            sorted: 0,
        }
    }
}

fn cookie_halves(cookie: u64) -> [u32; 2] {
    [(cookie >> 32) as u32, cookie as u32]
}

fn cookie_of_halves([high, low]: [u32; 2]) -> u64 {
    (u64::from(high) << 32) | u64::from(low)
}

impl<A: Address> CookieJar<A> {
    fn position(&self, addr: &A) -> Option<usize> {
        let (sorted, tail) = self.entries.split_at(usize::from(self.sorted));
        match sorted.binary_search_by(|(a, _)| a.cmp(addr)) {
            Ok(i) => Some(i),
            Err(_) => tail
                .iter()
                .position(|(a, _)| a == addr)
                .map(|i| i + sorted.len()),
        }
    }

    fn get(&self, addr: &A) -> Option<u64> {
        self.position(addr)
            .map(|i| cookie_of_halves(self.entries[i].1))
    }

    fn insert(&mut self, addr: A, cookie: u64) {
        if let Some(i) = self.position(&addr) {
            self.entries[i].1 = cookie_halves(cookie);
            return;
        }
        if self.entries.len() == self.entries.capacity() {
            // At most an eighth unused, or what the allocation holds
            // anyway.
            let more = self.entries.len() / 8 + 1;
            super::grow_within_class(&mut self.entries, more);
        }
        self.entries.push((addr, cookie_halves(cookie)));
        if self.entries.len() - usize::from(self.sorted) >= JAR_TAIL {
            // Two sorted runs: the stable sort merges them in one pass.
            self.entries.sort_by_key(|a| a.0);
            self.sorted = self.entries.len() as u16;
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Debug, Clone)]
struct Pending<A> {
    sent_ms: u64,
    /// Lookup queries: when the query stops holding an α slot.
    soft_deadline_ms: Option<u64>,
    to: A,
    to_id: Option<NodeId>,
    request: Request,
    pad: usize,
    deadline_ms: u64,
    attempts: u8,
    /// Sent again after a timeout (its answer gives no RTT sample).
    retransmitted: bool,
    purpose: Purpose,
}

impl<A> Deadlines for Pending<A> {
    fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    fn soft_deadline_ms(&self) -> Option<u64> {
        self.soft_deadline_ms
    }

    fn clear_soft_deadline(&mut self) {
        self.soft_deadline_ms = None;
    }
}

/// Heap bytes a node holds, by part (capacities, not only what is in
/// use): what a simulator of a million nodes must fit in memory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    /// The node itself (its fixed part).
    pub node: usize,
    /// The routing table.
    pub table: usize,
    /// Requests waiting for their answers.
    pub requests: usize,
    /// Lookups under way.
    pub lookups: usize,
    /// Records held for others and its own.
    pub records: usize,
    /// Cookies for other nodes' addresses.
    pub cookies: usize,
    /// Datagrams, events and observations not yet polled.
    pub queues: usize,
}

impl MemoryUse {
    /// Adds `other` part by part.
    pub fn add(&mut self, other: &MemoryUse) {
        self.node += other.node;
        self.table += other.table;
        self.requests += other.requests;
        self.lookups += other.lookups;
        self.records += other.records;
        self.cookies += other.cookies;
        self.queues += other.queues;
    }
}

/// A DHT node.
#[derive(Debug)]
pub struct Dht<A: Address> {
    /// Settings; shared by the simulator's nodes (its `server` is only the
    /// initial mode: see `server`).
    config: Arc<DhtConfig>,
    /// Whether this node serves now.
    server: bool,
    signer: Signer,
    id: NodeId,
    table: RoutingTable<A>,
    records: RecordStore,
    own_records: Vec<SignedRecord>,
    next_republish_ms: u64,
    /// Requests waiting for answers, each in the slot its txid names.
    pending: Requests<Pending<A>>,
    /// Lookups by ID. The keys are this node's own (sequential query IDs),
    /// so a keyed hash buys nothing against floods, and Fx is much cheaper
    /// than SipHash.
    lookups: FxHashMap<QueryId, Lookup<A>>,
    next_query: u64,
    rng: SplitMix64,
    /// The key of the cookies this node gives.
    cookie_key: [u8; 16],
    /// Cookies other nodes issued to this node in the current period.
    cookies: CookieJar<A>,
    /// Those of the period before (older ones may no longer be accepted).
    old_cookies: CookieJar<A>,
    next_cookie_rotation_ms: u64,
    verifying: usize,
    /// The lookup of this node's own ID that its first contact started
    /// (or a repair of a small table), while it runs.
    join: Option<QueryId>,
    /// The bootstrap addresses given, to join again from if every contact
    /// is lost.
    bootstraps: Vec<A>,
    last_repair_s: u64,
    /// Introductions answered in the current second (see
    /// [`Dht::handle_introduction`]).
    introductions: IntroductionLimit,
    /// Contacts that liveness pings found gone since the last maintenance:
    /// each earns one more ping at the next (see [`Dht::maintain`]).
    dead_found: u16,
    /// API lookups started while the node was joining (see
    /// [`Dht::joining`]): they start when it has joined, from a table that
    /// knows the node's neighbourhood, instead of from one contact or
    /// none.
    waiting_for_join: Vec<QueryId>,
    transmits: VecDeque<(A, Vec<u8>)>,
    events: VecDeque<DhtEvent<A>>,
    next_maintenance_ms: u64,
    last_self_lookup_s: u64,
    /// When this node was created (the start of its client byte budget).
    started_ms: u64,
    /// Smoothed RTT and its mean deviation (ms), from answered requests.
    srtt_ms: f64,
    rttvar_ms: f64,
    observed: Option<A>,
    /// What a daemon tracks of its peers (with `track_peers`; boxed, as a
    /// simulated node tracks nothing).
    tracked: Option<Box<Tracked<A>>>,
    counters: DhtCounters,
}

/// What bounds the introductions a node answers: at most
/// [`MAX_INTRODUCTIONS_PER_S`] a second, and one per asker (the nodes near
/// a target that an asker queries at once each introduce it).
#[derive(Debug, Default)]
struct IntroductionLimit {
    second: u32,
    answered: u8,
    /// The first bytes of the last askers answered this second.
    askers: [u32; 3],
}

impl IntroductionLimit {
    /// Whether an introduction of `asker` at `second` may be answered (and
    /// if so, counts it).
    fn admit(&mut self, second: u32, asker: &NodeId) -> bool {
        if second != self.second {
            *self = IntroductionLimit {
                second,
                ..IntroductionLimit::default()
            };
        }
        let key = u32::from_le_bytes(asker.0[..4].try_into().expect("4 bytes")) | 1;
        if self.answered >= MAX_INTRODUCTIONS_PER_S || self.askers.contains(&key) {
            return false;
        }
        self.askers[usize::from(self.answered) % self.askers.len()] = key;
        self.answered += 1;
        true
    }
}

/// Peers a node tracks for the daemon (`DhtConfig::track_peers`), each
/// list at most [`TRACKED_PEERS`] long.
#[derive(Debug)]
struct Tracked<A> {
    /// (responder, observed) pairs not yet polled.
    observations: VecDeque<(A, A)>,
    /// Recent sources of requests, newest last.
    recent_sources: VecDeque<A>,
    /// Servers whose key a proof verified, not yet polled.
    verified: VecDeque<(A, crate::PeerId)>,
}

impl<A> Default for Tracked<A> {
    fn default() -> Self {
        Tracked {
            observations: VecDeque::new(),
            recent_sources: VecDeque::new(),
            verified: VecDeque::new(),
        }
    }
}

/// Appends `item` to a tracked list, dropping its oldest when full.
fn track<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() >= TRACKED_PEERS {
        list.pop_front();
    }
    list.push_back(item);
}

fn ms(now: Duration) -> u64 {
    now.as_millis() as u64
}

impl<A: Address> Dht<A> {
    /// A DHT node with identity `keypair`, randomness from `seed`.
    pub fn new(keypair: Keypair, config: DhtConfig, seed: u64, now: Duration) -> Self {
        let server = config.server;
        Self::with_shared_config(keypair, Arc::new(config), server, seed, now)
    }

    /// A DHT node whose settings are shared with others (a simulator's
    /// million nodes need one copy), serving or not.
    pub fn with_shared_config(
        keypair: Keypair,
        config: Arc<DhtConfig>,
        server: bool,
        seed: u64,
        now: Duration,
    ) -> Self {
        let signer = Signer::new(keypair, config.signatures);
        Self::with_signer(signer, config, server, seed, now)
    }

    /// A simulated node whose identity is 32 random bytes standing for a
    /// public key: no key pair to derive (a scalar multiplication each, a
    /// million of them at a simulator's start). `None` unless `config`
    /// signs with [`Signatures::SimulatedInsecure`], the only scheme that
    /// needs no secret.
    pub fn with_simulated_identity(
        peer: [u8; 32],
        config: Arc<DhtConfig>,
        server: bool,
        seed: u64,
        now: Duration,
    ) -> Option<Self> {
        if config.signatures != Signatures::SimulatedInsecure {
            return None;
        }
        let signer = Signer::SimulatedInsecure(crate::PeerId::from_bytes_unchecked(peer));
        Some(Self::with_signer(signer, config, server, seed, now))
    }

    fn with_signer(
        signer: Signer,
        config: Arc<DhtConfig>,
        server: bool,
        seed: u64,
        now: Duration,
    ) -> Self {
        let id = NodeId::of_peer(&signer.peer_id());
        let mut rng = SplitMix64(seed ^ u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes")));
        // Drawn as 32 bytes, the first 16 used: the node's later draws, and
        // so the runs of a seed, stay comparable across versions.
        let drawn: [u8; 32] = rng.bytes();
        let cookie_key = drawn[..16].try_into().expect("16 bytes");
        let maintenance = config.maintenance.as_millis() as u64;
        // Spread maintenance over the interval so nodes started together do
        // not all refresh at once.
        let jitter = rng.next_u64() % maintenance.max(1);
        let tracked = config.track_peers.then(Box::default);
        Dht {
            table: RoutingTable::new(id, config.bucket_size, config.max_per_prefix),
            records: RecordStore::new(config.max_records, config.max_records_per_network)
                .with_signatures(config.signatures),
            next_republish_ms: ms(now) + config.republish.as_millis() as u64,
            next_maintenance_ms: ms(now) + jitter + maintenance,
            started_ms: ms(now),
            last_self_lookup_s: now.as_secs(),
            srtt_ms: 0.0,
            rttvar_ms: 0.0,
            signer,
            config,
            server,
            id,
            own_records: Vec::new(),
            pending: Requests::default(),
            lookups: FxHashMap::default(),
            next_query: 1,
            rng,
            cookie_key,
            cookies: CookieJar::default(),
            old_cookies: CookieJar::default(),
            next_cookie_rotation_ms: ms(now) + COOKIE_PERIOD.as_millis() as u64,
            verifying: 0,
            join: None,
            bootstraps: Vec::new(),
            last_repair_s: now.as_secs(),
            dead_found: 0,
            introductions: IntroductionLimit::default(),
            waiting_for_join: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            observed: None,
            tracked,
            counters: DhtCounters::default(),
        }
    }

    /// This node's DHT ID.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The routing table.
    pub fn table(&self) -> &RoutingTable<A> {
        &self.table
    }

    /// Heap bytes this node holds, by part.
    pub fn memory_use(&self) -> MemoryUse {
        use std::mem::size_of;
        MemoryUse {
            node: size_of::<Self>() + self.bootstraps.capacity() * size_of::<A>(),
            table: self.table.heap_bytes(),
            requests: self.pending.heap_bytes()
                + self
                    .pending
                    .values()
                    .map(|p| match &p.request.body {
                        RequestBody::PutRecord(r) => size_of::<SignedRecord>() + r.heap_bytes(),
                        _ => 0,
                    })
                    .sum::<usize>(),
            lookups: super::map_heap_bytes(&self.lookups)
                + self.lookups.values().map(Lookup::heap_bytes).sum::<usize>()
                + self.waiting_for_join.capacity() * size_of::<QueryId>(),
            records: self.records.heap_bytes()
                + self
                    .own_records
                    .iter()
                    .map(|r| size_of::<SignedRecord>() + r.heap_bytes())
                    .sum::<usize>(),
            cookies: (self.cookies.entries.capacity() + self.old_cookies.entries.capacity())
                * size_of::<(A, [u32; 2])>(),
            queues: self.transmits.capacity() * size_of::<(A, Vec<u8>)>()
                + self
                    .transmits
                    .iter()
                    .map(|(_, d)| d.capacity())
                    .sum::<usize>()
                + self.events.capacity() * size_of::<DhtEvent<A>>()
                + self.tracked.as_ref().map_or(0, |t| {
                    size_of::<Tracked<A>>()
                        + t.observations.capacity() * size_of::<(A, A)>()
                        + t.recent_sources.capacity() * size_of::<A>()
                        + t.verified.capacity() * size_of::<(A, crate::PeerId)>()
                }),
        }
    }

    /// The records held for others.
    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    /// Counters.
    pub fn counters(&self) -> &DhtCounters {
        &self.counters
    }

    /// The address the last responder saw this node at.
    pub fn observed_addr(&self) -> Option<A> {
        self.observed
    }

    /// The next (responder, observed address) pair from a response (with
    /// `track_peers`).
    pub fn poll_observation(&mut self) -> Option<(A, A)> {
        self.tracked.as_mut()?.observations.pop_front()
    }

    /// The next server whose peer key a proof verified, with its address
    /// (with `track_peers`): candidates for homes.
    pub fn poll_verified(&mut self) -> Option<(A, crate::PeerId)> {
        self.tracked.as_mut()?.verified.pop_front()
    }

    /// Nodes that recently sent this node requests, newest first (with
    /// `track_peers`).
    pub fn recent_sources(&self) -> Vec<A> {
        self.tracked
            .as_ref()
            .map(|t| t.recent_sources.iter().rev().copied().collect())
            .unwrap_or_default()
    }

    /// Whether this node serves routing and storage.
    pub fn is_server(&self) -> bool {
        self.server
    }

    /// Switches between server and client mode (when reachability changes).
    ///
    /// A server that turns client tells the contacts in its table (a ping
    /// that says it no longer serves), so they drop it instead of sending it
    /// lookups its NAT may never let in.
    pub fn set_server(&mut self, now: Duration, server: bool) {
        let was = self.server;
        self.server = server;
        if was && !server {
            // Records stored while serving stop being updated (puts go to
            // servers only): a stale copy must not answer this node's own
            // gets.
            self.records.clear();
            for c in self.table.closest(&self.id, 64) {
                self.ping(now, &c, Purpose::Leave);
            }
        }
    }

    /// Puts a contact in the routing table without verifying it. Only for
    /// simulators that build a network's tables directly instead of running
    /// every join; a node never calls it for contacts from the network.
    pub fn seed_contact(&mut self, id: NodeId, addr: A, now: Duration) {
        self.table.insert(Contact::new(id, addr, now.as_secs()));
    }

    /// Sets when this node's next maintenance runs: a simulator starting a
    /// network that has been running has its nodes' runs fall at random
    /// times of the period. (A node created as started some time ago
    /// would otherwise catch up at once: every node of the network ran
    /// maintenance, and held its pings, at the first instant.)
    pub fn seed_maintenance(&mut self, at: Duration) {
        self.next_maintenance_ms = ms(at);
    }

    /// Marks bucket `index` as last refreshed at `at`: a simulator starting
    /// a network that has been running seeds it with `seed_contact`, and
    /// its nodes refreshed their buckets at various times before, not all
    /// at its first instant.
    pub fn seed_refreshed(&mut self, index: usize, at: Duration) {
        self.table.set_refreshed(index, at.as_secs());
    }

    /// Contacts a known node at `addr` (bootstrap): verifies it, adds it to
    /// the table, and joins with a lookup of this node's own ID.
    pub fn add_bootstrap(&mut self, now: Duration, addr: A) {
        if !self.bootstraps.contains(&addr) {
            if self.bootstraps.len() >= MAX_BOOTSTRAPS {
                self.bootstraps.remove(0);
            }
            self.bootstraps.push(addr);
        }
        self.send_request(now, addr, None, RequestBody::Ping, true, Purpose::Verify);
    }

    /// Starts a lookup of the k nodes closest to `target`.
    pub fn lookup(&mut self, now: Duration, target: NodeId) -> QueryId {
        self.start(now, target, LookupKind::FindNode, true)
    }

    /// Starts fetching the record under `key`.
    pub fn get(&mut self, now: Duration, key: NodeId) -> QueryId {
        self.start(now, key, LookupKind::GetRecord, true)
    }

    /// Stores `record` at the k nodes closest to its key. If this node owns
    /// it, it is also republished until it expires or is replaced.
    pub fn put(&mut self, now: Duration, record: SignedRecord) -> QueryId {
        if record.owner == self.signer.peer_id() {
            self.own_records.retain(|r| r.key() != record.key());
            self.own_records.push(record.clone());
        }
        let key = record.key();
        self.start(now, key, LookupKind::Put(record), true)
    }

    /// Starts a lookup, for the API (eager) or for the node's maintenance.
    fn start(&mut self, now: Duration, target: NodeId, kind: LookupKind, for_api: bool) -> QueryId {
        let query = QueryId(self.next_query);
        self.next_query += 1;
        let eager = if for_api { self.config.eager } else { 0 };
        let shape = (self.config.k, self.config.alpha, eager);
        let mut lookup = Lookup::new(target, kind, shape, ms(now));
        // Looking for a peer, a reachable node asks to be introduced (only
        // it can take the target's unsolicited answer).
        lookup.introduce = self.config.introductions
            && for_api
            && self.server
            && matches!(lookup.kind, LookupKind::FindNode);
        // Only servers hold records (a node that stops serving drops them).
        if let LookupKind::GetRecord = lookup.kind {
            if let Some(r) = self.records.get(&target, now.as_secs()) {
                lookup.found = Some((r.clone(), 0));
            }
        }
        self.lookups.insert(query, lookup);
        if for_api && self.joining() && self.waiting_for_join.len() < MAX_WAITING_FOR_JOIN {
            self.waiting_for_join.push(query);
        } else {
            self.seed_and_advance(now, query);
        }
        query
    }

    /// Gives a lookup the closest contacts of the table and sends its
    /// first requests.
    fn seed_and_advance(&mut self, now: Duration, query: QueryId) {
        let Some(lookup) = self.lookups.get_mut(&query) else {
            return;
        };
        let target = lookup.target;
        let seeds = self.table.closest(&target, self.config.k);
        lookup.add(seeds.into_iter().map(|c| (c.id, c.addr)), 1, &self.id);
        self.table.touch_bucket(&target, now.as_secs());
        self.advance(now, query);
    }

    /// Looks up this node's own ID as a join: API lookups wait for it.
    fn join(&mut self, now: Duration) {
        let me = self.id;
        let join = self.start(now, me, LookupKind::FindNode, false);
        self.join = self.lookups.contains_key(&join).then_some(join);
    }

    /// Whether the node is joining: its join lookup runs, or its table is
    /// empty while a verification (of a bootstrap node, say) is in flight.
    fn joining(&self) -> bool {
        self.join.is_some() || (self.table.is_empty() && self.verifying > 0)
    }

    /// Starts the API lookups that waited, once the node is no longer
    /// joining (it joined, or its last verification failed).
    fn release_waiting_for_join(&mut self, now: Duration) {
        if self.joining() {
            return;
        }
        for query in std::mem::take(&mut self.waiting_for_join) {
            self.seed_and_advance(now, query);
        }
    }

    /// Sends what the lookup should send next, or finishes it.
    fn advance(&mut self, now: Duration, query: QueryId) {
        let Some(lookup) = self.lookups.get_mut(&query) else {
            return;
        };
        if !lookup.search_done() {
            let next = lookup.next_queries();
            let body = match lookup.kind {
                LookupKind::GetRecord => RequestBody::GetRecord(lookup.target),
                _ if lookup.introduce => RequestBody::FindPeer(lookup.target),
                _ => RequestBody::FindNode(lookup.target),
            };
            let stale_before = now.as_secs().saturating_sub(REPLACEMENT_FRESH.as_secs());
            for (id, addr, hop) in next {
                // A proof from an unverified entry, and from a new contact
                // only where the table would keep it.
                let want_proof = match self.table.get(&id).filter(|c| c.addr == addr) {
                    Some(c) => !c.is_verified(),
                    None => self.table.would_keep(&id, &addr, stale_before),
                };
                let txid = self.send_request(
                    now,
                    addr,
                    Some(id),
                    body.clone(),
                    want_proof,
                    Purpose::Query(query),
                );
                if let (Some(txid), RequestBody::FindPeer(_)) = (txid, &body) {
                    if let Some(lookup) = self.lookups.get_mut(&query) {
                        lookup.introducers.push((txid, hop));
                    }
                }
            }
            // Sending may fail at once (overload): check again.
            let lookup = self.lookups.get(&query).expect("present");
            if !lookup.search_done() {
                return;
            }
        }
        let lookup = self.lookups.get_mut(&query).expect("present");
        if let LookupKind::Put(record) = &lookup.kind {
            if !lookup.put_started {
                lookup.put_started = true;
                let targets = lookup.closest_answered();
                lookup.put_waiting = targets.len();
                let record = record.clone();
                // This node stores it too if it is among the closest servers
                // (with fewer than k servers, e.g. the first of a network,
                // its own record would otherwise live nowhere).
                let among_closest = targets.len() < self.config.k
                    || targets.last().is_some_and(|(last, _)| {
                        self.id.distance(&lookup.target) < last.distance(&lookup.target)
                    });
                if self.server && among_closest {
                    if let Err(RecordError::Full) =
                        self.records.put_local(record.clone(), now.as_secs())
                    {
                        self.counters.records_refused += 1;
                    }
                }
                for (id, addr) in targets {
                    self.send_request(
                        now,
                        addr,
                        Some(id),
                        RequestBody::PutRecord(Box::new(record.clone())),
                        false,
                        Purpose::Put(query),
                    );
                }
            }
            let lookup = self.lookups.get(&query).expect("present");
            if lookup.put_waiting > 0 {
                return;
            }
        }
        let lookup = self.lookups.remove(&query).expect("present");
        if self.join == Some(query) {
            self.join = None;
            self.release_waiting_for_join(now);
            // A node that has just joined knows its neighbourhood, and its
            // first maintenance refreshes the buckets far from it: at once,
            // not up to two periods later.
            self.next_maintenance_ms = self.next_maintenance_ms.min(ms(now));
        }
        let elapsed_ms = ms(now).saturating_sub(lookup.started_ms);
        let event = match &lookup.kind {
            LookupKind::FindNode => DhtEvent::LookupDone {
                query,
                target: lookup.target,
                closest: lookup.closest_answered(),
                hops: lookup.hops(),
                elapsed_ms,
            },
            LookupKind::GetRecord => DhtEvent::GetDone {
                query,
                key: lookup.target,
                hops: lookup.hops(),
                record: lookup.found.map(|(r, _)| r),
                elapsed_ms,
            },
            LookupKind::Put(_) => DhtEvent::PutDone {
                query,
                key: lookup.target,
                stored: lookup.put_stored,
                elapsed_ms,
            },
        };
        self.events.push_back(event);
    }

    /// The cookie this node gives `addr` in `epoch`: keyed, and never 0
    /// (which means none).
    ///
    /// SipHash-2-4 under a secret 128-bit key: a pseudorandom function made
    /// for short inputs such as this (an address and an epoch), a few
    /// times cheaper than keyed BLAKE3 on them, with no buffer. Only this
    /// node checks its cookies, so the address's in-process hash is input
    /// enough.
    fn cookie_for(&self, addr: &A, epoch: u64) -> u64 {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher24::new_with_key(&self.cookie_key);
        addr.hash(&mut h);
        h.write_u64(epoch);
        h.finish() | 1
    }

    /// Refreshes the bucket of `target` (a random ID in it): asks the
    /// closest contact for the nodes it knows near `target`, and verifies
    /// those the bucket has room for.
    ///
    /// Not a full lookup: the nodes near a random ID of the bucket are all
    /// in the bucket, so one answer names plenty of them, and a bucket
    /// under churn usually misses only one or two entries. A full lookup
    /// asked some 28 nodes for what one answer gives.
    ///
    /// A contact that does not answer is dropped (or marked failed), and the
    /// next closest is asked, [`REFRESH_TRIES`] in all: under churn a fifth
    /// of the entries may be nodes that left, and a refresh that gave up
    /// would leave its bucket short for another refresh period.
    fn refresh(&mut self, now: Duration, target: NodeId, failed: u8) {
        self.table.touch_bucket(&target, now.as_secs());
        let closest = self.table.closest(&target, usize::from(REFRESH_TRIES));
        if let Some(c) = closest.iter().find(|c| c.failures() == 0) {
            // The nodes it names enter the table unverified: it must have
            // proven its own ID first.
            self.send_request(
                now,
                c.addr,
                Some(c.id),
                RequestBody::FindNode(target),
                !c.is_verified(),
                Purpose::Refresh(failed),
            );
        }
    }

    /// A ping to a contact, for liveness or to say this node left (it
    /// carries this node's server flag).
    fn ping(&mut self, now: Duration, c: &Contact<A>, purpose: Purpose) {
        let want_proof = !c.is_verified();
        self.send_request(
            now,
            c.addr,
            Some(c.id),
            RequestBody::Ping,
            want_proof,
            purpose,
        );
    }

    fn send_request(
        &mut self,
        now: Duration,
        to: A,
        to_id: Option<NodeId>,
        body: RequestBody,
        want_proof: bool,
        purpose: Purpose,
    ) -> Option<u64> {
        if self.pending.len() >= self.config.max_pending {
            // Not the contact's fault: its entry is left as it is.
            self.counters.overloaded += 1;
            self.give_up(now, purpose, to_id);
            return None;
        }
        // Free while fewer than `max_pending` wait, unless that is set
        // above the slots there are.
        let Some(txid) = self.pending.free_txid(self.rng.next_u64()) else {
            self.counters.overloaded += 1;
            self.give_up(now, purpose, to_id);
            return None;
        };
        if matches!(purpose, Purpose::Verify) {
            if self.verifying >= MAX_VERIFICATIONS {
                self.counters.overloaded += 1;
                return None;
            }
            self.verifying += 1;
        }
        let cookie = if carries_cookie(&body, purpose) {
            self.cookies
                .get(&to)
                .or_else(|| self.old_cookies.get(&to))
                .unwrap_or(0)
        } else {
            0
        };
        // Without a cookie, a request that may get a large answer is padded
        // so the answer fits within 3x (anti-amplification).
        let pad = match (cookie, &body) {
            (
                0,
                RequestBody::FindNode(_) | RequestBody::FindPeer(_) | RequestBody::GetRecord(_),
            ) => UNVERIFIED_REQUEST_PAD,
            (0, _) if want_proof => PROOF_REQUEST_PAD,
            _ => 0,
        };
        let request = Request {
            txid,
            sender: self.id,
            server: self.server,
            want_proof,
            cookie,
            body,
        };
        // Lookups move on to other candidates rather than retry: after the
        // soft timeout (adaptive) the next candidate is asked; a late answer
        // is still used until the hard timeout.
        let (timeout, attempts, soft) = match purpose {
            Purpose::Query(_) => (
                self.config.query_timeout,
                self.config.retries.saturating_add(1),
                Some(ms(now) + self.query_timeout().as_millis() as u64),
            ),
            // A node a refresh named is one of several: no retry.
            Purpose::Fill => (
                self.config.rpc_timeout,
                self.config.retries.saturating_add(1),
                None,
            ),
            _ => (self.config.rpc_timeout, 1, None),
        };
        self.counters.requests.count(purpose);
        self.transmit(to, request.encode(pad));
        self.pending.insert(
            txid,
            Pending {
                sent_ms: ms(now),
                soft_deadline_ms: soft,
                to,
                to_id,
                request,
                pad,
                deadline_ms: ms(now) + timeout.as_millis() as u64,
                attempts,
                retransmitted: false,
                purpose,
            },
        );
        Some(txid)
    }

    /// When a lookup query stops holding its slot: RTO from the measured RTTs.
    fn query_timeout(&self) -> Duration {
        let max = self.config.query_timeout.as_millis() as u64;
        if self.srtt_ms == 0.0 {
            return Duration::from_millis(max);
        }
        let rto = (self.srtt_ms + 4.0 * self.rttvar_ms) as u64;
        Duration::from_millis(rto.clamp(MIN_QUERY_TIMEOUT_MS.min(max), max))
    }

    /// Folds one RTT sample into the estimate (RFC 6298's constants).
    fn sample_rtt(&mut self, rtt_ms: u64) {
        let r = rtt_ms as f64;
        if self.srtt_ms == 0.0 {
            self.srtt_ms = r;
            self.rttvar_ms = r / 2.0;
        } else {
            self.rttvar_ms = 0.75 * self.rttvar_ms + 0.25 * (self.srtt_ms - r).abs();
            self.srtt_ms = 0.875 * self.srtt_ms + 0.125 * r;
        }
    }

    fn transmit(&mut self, to: A, bytes: Vec<u8>) {
        self.counters.sent += 1;
        self.counters.bytes_sent += bytes.len() as u64;
        self.transmits.push_back((to, bytes));
    }

    /// A request failed for good: its contact is dropped if the request was
    /// sent twice, else charged one failure; its purpose learns of it.
    fn fail(&mut self, now: Duration, purpose: Purpose, to_id: Option<NodeId>, resent: bool) {
        if let Some(id) = to_id {
            // Sent twice without an answer (two datagrams lost, or the node
            // gone): under churn, waiting for a second such request kept
            // nodes that left in tables for many more minutes. One lost
            // query (lookups do not resend) only counts.
            if resent {
                if self.table.remove(&id) && matches!(purpose, Purpose::Liveness) {
                    self.dead_found = self.dead_found.saturating_add(1);
                }
            } else if !self.table.record_failure(&id) && matches!(purpose, Purpose::Query(_)) {
                // A lookup query is not resent: a ping (which is) settles
                // whether the node is still there, and one that left goes
                // within seconds instead of at the next lookup that picks it.
                if let Some(c) = self.table.get(&id).copied() {
                    if self.pending.len() < self.config.max_pending {
                        self.ping(now, &c, Purpose::Liveness);
                    }
                }
            }
        }
        self.give_up(now, purpose, to_id);
    }

    /// Ends a request without an answer for what it was sent for.
    fn give_up(&mut self, now: Duration, purpose: Purpose, to_id: Option<NodeId>) {
        match purpose {
            Purpose::Query(q) => {
                if let (Some(l), Some(id)) = (self.lookups.get_mut(&q), to_id) {
                    l.on_failure(&id);
                }
                self.advance(now, q);
            }
            Purpose::Put(q) => {
                if let Some(l) = self.lookups.get_mut(&q) {
                    l.put_waiting = l.put_waiting.saturating_sub(1);
                }
                self.advance(now, q);
            }
            Purpose::Verify => {
                self.verifying = self.verifying.saturating_sub(1);
                self.release_waiting_for_join(now);
            }
            Purpose::Liveness | Purpose::Refresh(_) | Purpose::Fill | Purpose::Leave => {}
        }
    }

    /// Handles a DHT datagram from `from`.
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        from: A,
        datagram: &[u8],
    ) -> Result<(), WireError> {
        self.counters.received += 1;
        self.counters.bytes_received += datagram.len() as u64;
        let message = match DhtMessage::<A>::decode(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.counters.malformed += 1;
                return Err(e);
            }
        };
        match message {
            DhtMessage::Request(req) => self.handle_request(now, from, req, datagram.len()),
            DhtMessage::Introduction(intro) => self.handle_introduction(now, intro),
            DhtMessage::Response(resp) => {
                self.handle_response(now, from, resp);
                self.release_idle();
            }
        }
        Ok(())
    }

    /// Frees the request and lookup maps once they are empty: a node is
    /// idle most of the time, and a burst of lookups would otherwise keep
    /// their memory for good (a million simulated nodes feel it).
    fn release_idle(&mut self) {
        self.pending.release_idle();
        if self.lookups.is_empty() && self.lookups.capacity() > 0 {
            self.lookups = FxHashMap::default();
        }
    }

    fn handle_request(&mut self, now: Duration, from: A, req: Request, request_len: usize) {
        let epoch = now.as_secs() / 600;
        // The cookie this node gives the source now (in its answer), and
        // the one a verified request carries.
        let cookie = self.cookie_for(&from, epoch);
        let verified = req.cookie != 0
            && (req.cookie == cookie
                || req.cookie == self.cookie_for(&from, epoch.saturating_sub(1)));
        // A contact that says it no longer serves leaves the table (only
        // from its own, proven address: nobody can evict it for it).
        if !req.server && verified {
            if let Some(c) = self.table.get(&req.sender) {
                if c.addr == from && self.table.remove(&req.sender) {
                    self.counters.contacts_left += 1;
                }
            }
        } else if verified {
            // A request from a contact's own, proven address shows that it
            // is there as well as its answer to a ping would: its entry
            // needs no liveness ping, and those go to the silent ones.
            self.table.mark_seen_at(&req.sender, &from, now.as_secs());
        }
        // Only sources that proved their address (a cookie) are remembered.
        if let (Some(t), true) = (&mut self.tracked, verified) {
            t.recent_sources.retain(|a| *a != from);
            track(&mut t.recent_sources, from);
        }
        let n = self.config.answer_nodes;
        let nodes_for = |table: &RoutingTable<A>, target: &NodeId| -> Vec<(NodeId, A)> {
            // Not the asker, nor a contact whose last request failed (most
            // of those have left: the asker would wait for it), nor one
            // that has not proven its ID to this node.
            table
                .closest_where(target, n, |c| {
                    c.id != req.sender && c.failures() == 0 && c.is_verified()
                })
                .into_iter()
                .map(|c| (c.id, c.addr))
                .collect()
        };
        // Asked for a peer this table holds (and whose last request did not
        // fail): introduce the asker to it.
        let introduce = match &req.body {
            RequestBody::FindPeer(target) if *target != req.sender => self
                .table
                .get(target)
                .filter(|c| c.failures() == 0 && c.is_verified())
                .map(|c| c.addr),
            _ => None,
        };
        let body = match &req.body {
            RequestBody::Ping => ResponseBody::Pong,
            RequestBody::FindNode(target) | RequestBody::FindPeer(target) => {
                ResponseBody::Nodes(nodes_for(&self.table, target))
            }
            RequestBody::GetRecord(key) => {
                // Only servers hold records for others.
                let record = if self.server {
                    self.records.get(key, now.as_secs()).cloned()
                } else {
                    None
                };
                ResponseBody::Record(record, nodes_for(&self.table, key))
            }
            RequestBody::PutRecord(record) => {
                let stored = self.server
                    && match self.records.put((**record).clone(), from, now.as_secs()) {
                        Ok(_) => true,
                        Err(_) => {
                            self.counters.records_refused += 1;
                            false
                        }
                    };
                ResponseBody::PutAck(stored)
            }
        };
        self.counters.proofs_signed += u64::from(req.want_proof);
        let proof = req.want_proof.then(|| {
            let sig = self.signer.sign(&proof_message(req.txid, &req.sender));
            (self.signer.peer_id(), sig)
        });
        let mut response = Response {
            txid: req.txid,
            responder: self.id,
            observed: from,
            cookie,
            proof,
            body,
        };
        let mut bytes = response.encode();
        // Anti-amplification: what an unverified request makes this node
        // and the target of its introduction send to its source is at most
        // 3× its size (the introduction's answer at most 3× the
        // introduction's).
        let limit = (3 * request_len)
            .saturating_sub(introduce.map_or(0, |_| 3 * super::wire::INTRODUCTION_PAD));
        if !verified && bytes.len() > limit {
            self.counters.trimmed_responses += 1;
            while bytes.len() > limit {
                let shrunk = match &mut response.body {
                    ResponseBody::Nodes(n) | ResponseBody::Record(_, n) if !n.is_empty() => {
                        n.pop();
                        true
                    }
                    ResponseBody::Record(r @ Some(_), _) => {
                        *r = None;
                        true
                    }
                    _ => false,
                };
                if !shrunk {
                    return; // cannot answer within the limit: stay silent
                }
                bytes = response.encode();
            }
        }
        self.transmit(from, bytes);
        if let Some(target_addr) = introduce {
            self.counters.introductions_sent += 1;
            let intro = Introduction {
                txid: req.txid,
                asker: req.sender,
                addr: from,
            };
            self.transmit(target_addr, intro.encode());
        }
        // A server we do not know yet, with room for it in its bucket: verify
        // it (it proves its ID) and add it. Pings never trigger this, or two
        // nodes with full buckets would verify each other forever.
        if req.server
            && !matches!(req.body, RequestBody::Ping)
            && req.sender != self.id
            && self.table.has_room_for(&req.sender, &from)
        {
            self.send_request(
                now,
                from,
                Some(req.sender),
                RequestBody::Ping,
                true,
                Purpose::Verify,
            );
        }
    }

    /// Someone asked a contact of this node for it: answer the asker at
    /// once, as if it had asked (a pong with this node's ID proof, which
    /// is what the asker accepts it by). Only a serving node is in tables
    /// to be introduced; the answer is at most 3× the introduction, at most
    /// one per asker and [`MAX_INTRODUCTIONS_PER_S`] a second.
    fn handle_introduction(&mut self, now: Duration, intro: Introduction<A>) {
        if !self.server || intro.asker == self.id {
            self.counters.introductions_dropped += 1;
            return;
        }
        if !self.introductions.admit(now.as_secs() as u32, &intro.asker) {
            self.counters.introductions_dropped += 1;
            return;
        }
        self.counters.introductions_answered += 1;
        self.counters.proofs_signed += 1;
        let sig = self.signer.sign(&proof_message(intro.txid, &intro.asker));
        let response = Response {
            txid: intro.txid,
            responder: self.id,
            observed: intro.addr,
            cookie: self.cookie_for(&intro.addr, now.as_secs() / 600),
            proof: Some((self.signer.peer_id(), sig)),
            body: ResponseBody::Pong,
        };
        self.transmit(intro.addr, response.encode());
    }

    /// Whether the response carries the responder's ID proof over its
    /// txid and this node's ID (counted, and counted as bad if not).
    fn check_proof(&mut self, resp: &Response<A>) -> bool {
        self.counters.proofs_checked += 1;
        let ok = resp.proof.as_ref().is_some_and(|(key, sig)| {
            NodeId::of_peer(key) == resp.responder
                && self
                    .config
                    .signatures
                    .verify(key, &proof_message(resp.txid, &self.id), sig)
        });
        if !ok {
            self.counters.bad_proofs += 1;
        }
        ok
    }

    /// An answer from the target of a lookup that sent `FindPeer` to
    /// another node, which introduced this node to it: it echoes the txid
    /// of that request (whose own answer may have come already) and proves
    /// its ID over it, and the lookup has found its target. Whether it was
    /// one (else the response is unexpected).
    fn handle_introduced(&mut self, now: Duration, from: A, resp: &Response<A>) -> bool {
        let Some(&query) = self.lookups.iter().find_map(|(q, l)| {
            (l.introduce
                && l.target == resp.responder
                && l.introducers.iter().any(|(t, _)| *t == resp.txid))
            .then_some(q)
        }) else {
            return false;
        };
        if !self.check_proof(resp) {
            return true;
        }
        let lookup = self.lookups.get_mut(&query).expect("present");
        self.counters.introduced += 1;
        let hop = lookup
            .introducers
            .iter()
            .find(|(t, _)| *t == resp.txid)
            .map_or(1, |(_, hop)| *hop)
            .saturating_add(1);
        lookup.add([(resp.responder, from)], hop, &self.id);
        lookup.on_answer(&resp.responder);
        self.keep_cookie(now, from, resp.cookie);
        self.table
            .mark_seen_at(&resp.responder, &from, now.as_secs());
        self.advance(now, query);
        true
    }

    fn handle_response(&mut self, now: Duration, from: A, resp: Response<A>) {
        let expected = self.pending.get(resp.txid).is_some_and(|p| p.to == from);
        if !expected && self.handle_introduced(now, from, &resp) {
            return;
        }
        let Some(pending) = self.pending.get(resp.txid) else {
            self.counters.unexpected_responses += 1;
            return;
        };
        if pending.to != from || pending.to_id.is_some_and(|id| id != resp.responder) {
            self.counters.unexpected_responses += 1;
            return;
        }
        let pending = self.pending.remove(resp.txid).expect("present");
        if !pending.retransmitted {
            // Only unambiguous samples (no retransmission), as Karn's rule.
            self.sample_rtt(ms(now).saturating_sub(pending.sent_ms));
        }
        if pending.request.want_proof {
            if !self.check_proof(&resp) {
                // An unverified entry that fails its proof was never what
                // its voucher said: it goes at once.
                if let Some(id) = pending.to_id {
                    if self.table.get(&id).is_some_and(|c| !c.is_verified()) {
                        self.table.remove(&id);
                    }
                }
                self.fail(now, pending.purpose, pending.to_id, false);
                return;
            }
            if let (Some(t), Some((key, _))) = (&mut self.tracked, &resp.proof) {
                track(&mut t.verified, (from, *key));
            }
        }
        if carries_cookie(&pending.request.body, pending.purpose) {
            self.keep_cookie(now, from, resp.cookie);
        }
        self.observed = Some(resp.observed);
        if let Some(t) = &mut self.tracked {
            track(&mut t.observations, (from, resp.observed));
        }
        // Only a verification's answer can be the first contact (and the
        // table's buckets are one more read of memory for every answer).
        let was_empty = matches!(pending.purpose, Purpose::Verify) && self.table.is_empty();
        if pending.request.want_proof {
            let contact = Contact::new(resp.responder, from, now.as_secs());
            if let InsertOutcome::Pending { oldest } = self.table.insert(contact) {
                if oldest.last_seen() + 60 < now.as_secs() {
                    self.ping(now, &oldest, Purpose::Liveness);
                }
            }
        } else {
            self.table.mark_seen(&resp.responder, now.as_secs());
        }
        match pending.purpose {
            Purpose::Query(q) => {
                let me = self.id;
                if let Some(lookup) = self.lookups.get_mut(&q) {
                    let hop = lookup.hop_of(&resp.responder);
                    lookup.on_answer(&resp.responder);
                    let nodes = match resp.body {
                        ResponseBody::Nodes(n) => n,
                        ResponseBody::Record(record, n) => {
                            // The record another holder already gave needs
                            // no second check.
                            let seen = |r: &SignedRecord| {
                                lookup.found.as_ref().is_some_and(|(f, _)| f == r)
                            };
                            if let Some(r) = record.filter(|r| !seen(r)) {
                                if r.key() == lookup.target
                                    && r.verify_with(self.config.signatures, now.as_secs()).is_ok()
                                {
                                    if lookup.found.as_ref().is_none_or(|(f, _)| f.seq < r.seq) {
                                        lookup.found = Some((r, hop));
                                    }
                                } else {
                                    self.counters.records_refused += 1;
                                }
                            }
                            n
                        }
                        _ => Vec::new(),
                    };
                    lookup.add(nodes, hop.saturating_add(1), &me);
                }
                self.advance(now, q);
            }
            Purpose::Put(q) => {
                if let Some(lookup) = self.lookups.get_mut(&q) {
                    lookup.put_waiting = lookup.put_waiting.saturating_sub(1);
                    if resp.body == ResponseBody::PutAck(true) {
                        lookup.put_stored += 1;
                    }
                }
                self.advance(now, q);
            }
            Purpose::Liveness | Purpose::Fill => {}
            Purpose::Leave => {
                if pending.request.cookie == 0 {
                    if let Some(id) = pending.to_id {
                        self.send_request(
                            now,
                            from,
                            Some(id),
                            RequestBody::Ping,
                            false,
                            Purpose::Leave,
                        );
                    }
                }
            }
            Purpose::Refresh(_) => {
                if let (ResponseBody::Nodes(nodes), RequestBody::FindNode(target)) =
                    (resp.body, &pending.request.body)
                {
                    // The closest first, as many as the bucket has room for,
                    // unverified on a client and in a server's first
                    // buckets: the node's own lookups use them at once
                    // (asking each for its proof the first time), and they
                    // are handed to others only once proven (by a lookup,
                    // or the liveness walk). One proof ping for each new
                    // entry was 44% of a million nodes' requests under
                    // churn, most of them spent on joining nodes. A
                    // server's deeper buckets, which answer others'
                    // lookups, take a node only once it answered a proof
                    // ping (a few may fail: the next refresh fills in).
                    let room_before = self.table.room_for(target);
                    let mut room = room_before;
                    let shallow = self.id.common_prefix(target) < self.config.unverified_buckets;
                    let unverified = !self.server || shallow;
                    for (id, addr) in nodes {
                        if room == 0 {
                            break;
                        }
                        let taken = if unverified {
                            self.table.insert_unverified(id, addr, now.as_secs())
                        } else if self.table.has_room_for(&id, &addr) {
                            self.send_request(
                                now,
                                addr,
                                Some(id),
                                RequestBody::Ping,
                                true,
                                Purpose::Fill,
                            );
                            true
                        } else {
                            false
                        };
                        room -= usize::from(taken);
                    }
                    // An answer that named nodes the bucket lacks, and not
                    // enough to fill it, means there are more: the bucket
                    // is refreshed again at the next maintenance instead
                    // of a refresh period later. A new node's table fills
                    // in minutes this way, bucket by bucket, 10 new
                    // entries a round. A client (whose table serves only
                    // its own lookups) keeps to its smaller byte budget:
                    // only while the bucket is less than half full, and
                    // only within its byte budget.
                    let wanted = if self.server {
                        0
                    } else {
                        self.config.bucket_size / 2
                    };
                    if room < room_before && room > wanted && self.may_fill(now) {
                        self.table.refresh_soon(target);
                    }
                }
            }
            Purpose::Verify => {
                self.verifying = self.verifying.saturating_sub(1);
                if was_empty && !self.table.is_empty() {
                    // First contact: join by looking up our own ID.
                    self.join(now);
                }
                self.release_waiting_for_join(now);
            }
        }
    }

    /// Whether this node may spend more bytes on filling its table: a
    /// server always, a client while it keeps to its budget
    /// (`DhtConfig::client_bytes_per_s`).
    fn may_fill(&self, now: Duration) -> bool {
        if self.server {
            return true;
        }
        let life_s = ms(now).saturating_sub(self.started_ms) / 1000;
        let allowed = self
            .config
            .client_fill_burst
            .saturating_add(self.config.client_bytes_per_s.saturating_mul(life_s));
        self.counters.bytes_sent <= allowed
    }

    /// Keeps the cookie `from` gave this node, starting a new period first
    /// if the current one already holds [`MAX_COOKIES`] other addresses.
    fn keep_cookie(&mut self, now: Duration, from: A, cookie: u64) {
        if self.cookies.len() >= MAX_COOKIES && self.cookies.get(&from).is_none() {
            self.rotate_cookies(now);
        }
        self.cookies.insert(from, cookie);
    }

    /// Starts a new cookie period: the current cookies become the old ones,
    /// the old ones go. A cookie is kept at most two periods (10 minutes),
    /// within which its issuer still accepts it.
    fn rotate_cookies(&mut self, now: Duration) {
        self.old_cookies = std::mem::take(&mut self.cookies);
        self.next_cookie_rotation_ms = ms(now) + COOKIE_PERIOD.as_millis() as u64;
    }

    /// Handles timers: retries, failures, maintenance.
    pub fn handle_timeout(&mut self, now: Duration) {
        let now_ms = ms(now);
        // Timers firing together are handled in txid order, not the map's
        // (random) order: the same seed must give the same run.
        let stalled: Vec<(QueryId, Option<NodeId>)> = self
            .pending
            .take_stalled(now_ms)
            .into_iter()
            .filter_map(|t| match self.pending.get(t)? {
                Pending {
                    purpose: Purpose::Query(q),
                    to_id,
                    ..
                } => Some((*q, *to_id)),
                _ => None,
            })
            .collect();
        for (q, id) in stalled {
            if let (Some(l), Some(id)) = (self.lookups.get_mut(&q), id) {
                l.on_stall(&id);
            }
            self.advance(now, q);
        }
        for txid in self.pending.expired(now_ms) {
            let Some(mut p) = self.pending.remove(txid) else {
                continue;
            };
            if p.attempts <= self.config.retries {
                p.attempts += 1;
                p.retransmitted = true;
                p.deadline_ms = now_ms + self.config.rpc_timeout.as_millis() as u64;
                self.counters.requests.count(p.purpose);
                self.transmit(p.to, p.request.encode(p.pad));
                self.pending.insert(txid, p);
            } else {
                self.counters.timeouts += 1;
                self.fail(now, p.purpose, p.to_id, p.retransmitted);
                if let (Purpose::Refresh(failed), RequestBody::FindNode(target)) =
                    (p.purpose, &p.request.body)
                {
                    // Clients (whose tables serve only their own lookups)
                    // keep to their smaller byte budget: one try.
                    if self.server && failed + 1 < REFRESH_TRIES {
                        self.refresh(now, *target, failed + 1);
                    }
                }
            }
        }
        if now_ms >= self.next_maintenance_ms {
            // The next run keeps this node's phase (its random offset from
            // creation): nodes that were asleep, or started long ago in a
            // simulator, must not all run maintenance in the same
            // millisecond from then on.
            let period = self.config.maintenance.as_millis().max(1) as u64;
            let missed = (now_ms - self.next_maintenance_ms) / period;
            self.next_maintenance_ms += (missed + 1) * period;
            self.maintain(now);
        }
        self.release_idle();
    }

    fn maintain(&mut self, now: Duration) {
        let secs = now.as_secs();
        self.records.expire(secs);
        if ms(now) >= self.next_cookie_rotation_ms {
            self.rotate_cookies(now);
        }
        let refresh = self.config.bucket_refresh.as_secs();
        // A new node refreshes its buckets at once (after its join lookup):
        // that is how it fills the buckets far from its own ID.
        for index in self
            .table
            .take_stale_buckets(secs.saturating_sub(refresh), secs)
        {
            let target = self.id.random_with_prefix(index, self.rng.bytes());
            self.refresh(now, target, 0);
        }
        // One lookup of our own ID refreshes the deep buckets (and tells our
        // closest neighbours we are here).
        if secs >= self.last_self_lookup_s + self.config.self_lookup.as_secs() {
            self.last_self_lookup_s = secs;
            let me = self.id;
            self.start(now, me, LookupKind::FindNode, false);
        }
        // A table far smaller than k (a join that met mostly nodes that had
        // left, or contacts that all left since) joins again: from the
        // contacts it has, or from the bootstrap nodes if it has none. No
        // bucket of such a table is due for a refresh, so nothing else
        // would mend it.
        if self.join.is_none() && self.table.len() < self.config.k.div_ceil(4) {
            if self.table.is_empty() {
                for addr in self.bootstraps.clone() {
                    self.send_request(now, addr, None, RequestBody::Ping, true, Purpose::Verify);
                }
            } else if secs >= self.last_repair_s + REPAIR_INTERVAL_S {
                self.last_repair_s = secs;
                self.join(now);
            }
        }
        // Pings in step with the table's losses (`liveness_boost`), on a
        // server: a client's table serves only its own lookups, and its
        // bytes have the tighter goal.
        let (base, boost) = if self.server {
            let base = self.config.pings_per_maintenance;
            let boost = usize::from(self.dead_found).min(base * self.config.liveness_boost);
            (base, boost)
        } else {
            (self.config.client_pings_per_maintenance, 0)
        };
        let pings = base + boost;
        self.dead_found = 0;
        let stale = if self.server {
            self.config.server_contact_stale
        } else {
            self.config.contact_stale
        };
        let stale_before = secs.saturating_sub(stale.as_secs());
        for c in self.table.next_stale(stale_before, pings) {
            self.ping(now, &c, Purpose::Liveness);
        }
        if ms(now) >= self.next_republish_ms {
            self.next_republish_ms = ms(now) + self.config.republish.as_millis() as u64;
            self.own_records.retain(|r| r.expires > secs);
            for record in self.own_records.clone() {
                let key = record.key();
                self.start(now, key, LookupKind::Put(record), false);
            }
        }
    }

    /// Asks the memory for the parts of this node's state that a call of
    /// [`Dht::handle_timeout`] reads beyond the node itself (the places of
    /// its table's buckets, the first steps of a search of its cookies),
    /// without waiting for them: a hint for a caller that knows a call is
    /// coming (the simulator, an event ahead; for a datagram see
    /// [`Dht::prefetch_datagram_early`]). It changes nothing the node does.
    pub fn prefetch(&self) {
        self.table.prefetch();
        self.prefetch_cookies();
    }

    fn prefetch_cookies(&self) {
        let cookies = &self.cookies.entries;
        for quarter in 1..4 {
            crate::prefetch::prefetch_lines(
                cookies.as_ptr().wrapping_add(cookies.len() * quarter / 4),
                1,
            );
        }
    }

    /// Asks the memory for where handling `datagram` will read: the places
    /// of the buckets of the IDs it names (a request's sender and target,
    /// a response's responder), and for a response its request and the
    /// first steps of the search of the cookies. The first of two hints
    /// for a datagram that is coming, this one once the node's state has
    /// arrived, [`Dht::prefetch_datagram`] an event later. They change
    /// nothing the node does. Only the buckets the datagram needs are
    /// asked for: all of their places, as [`Dht::prefetch`] asks for a
    /// timer, took nine lines of memory where one or two are read.
    pub fn prefetch_datagram_early(&self, datagram: &[u8]) {
        for id in super::wire::peek_ids(datagram).iter().flatten() {
            self.table.prefetch_bucket_place(id);
        }
        if let Some(txid) = super::wire::peek_response_txid(datagram) {
            self.pending.prefetch(txid);
            self.prefetch_cookies();
        }
    }

    /// Asks the memory for the table entries that handling `datagram`
    /// will read first: the buckets of the IDs it names (their places have
    /// arrived: see [`Dht::prefetch_datagram_early`]).
    pub fn prefetch_datagram(&self, datagram: &[u8]) {
        for id in super::wire::peek_ids(datagram).iter().flatten() {
            self.table.prefetch_bucket_of(id);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(A, Vec<u8>)> {
        let next = self.transmits.pop_front();
        if next.is_none() && self.transmits.capacity() > 0 {
            // Drained: give the buffer back, as the idle maps do.
            self.transmits = VecDeque::new();
        }
        next
    }

    /// When [`Dht::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let next = self.pending.due_ms().map_or(self.next_maintenance_ms, |p| {
            p.min(self.next_maintenance_ms)
        });
        Some(Duration::from_millis(next))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DhtEvent<A>> {
        let next = self.events.pop_front();
        if next.is_none() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        next
    }

    /// Lookups in progress.
    pub fn lookups_in_progress(&self) -> usize {
        self.lookups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{CookieJar, Dht, DhtConfig, DhtEvent};
    use crate::dht::{DhtMessage, NodeId, Request, RequestBody, Response, ResponseBody, ID_BYTES};
    use crate::Keypair;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    #[test]
    fn maintenance_keeps_its_phase_after_a_late_timer() {
        let start = Duration::from_secs(1_800_000_000);
        let mut dht: Dht<u32> =
            Dht::new(Keypair::from_seed([3; 32]), DhtConfig::default(), 7, start);
        let first = dht.poll_timeout().expect("a maintenance timer");
        let period = DhtConfig::default().maintenance;
        // Asleep for ten periods and a bit: the next run is where the
        // node's own schedule puts it, not a period after waking.
        dht.handle_timeout(first + period * 10 + Duration::from_millis(1234));
        assert_eq!(dht.poll_timeout(), Some(first + period * 11));
    }

    /// The requests a node sent since the last call: (to, request).
    fn requests_sent(dht: &mut Dht<u32>) -> Vec<(u32, Request)> {
        std::iter::from_fn(|| dht.poll_transmit())
            .filter_map(|(to, bytes)| match DhtMessage::<u32>::decode(&bytes) {
                Ok(DhtMessage::Request(r)) => Some((to, r)),
                _ => None,
            })
            .collect()
    }

    /// The FindNode (and FindPeer) requests a node sent since the last
    /// call: (to, target).
    fn find_nodes_sent(dht: &mut Dht<u32>) -> Vec<(u32, NodeId)> {
        requests_sent(dht)
            .into_iter()
            .filter_map(|(to, r)| match r.body {
                RequestBody::FindNode(target) | RequestBody::FindPeer(target) => Some((to, target)),
                _ => None,
            })
            .collect()
    }

    /// Asker `a` (reachable or not) knows only `b`; `b` knows the target
    /// `t`. Returns the three nodes after `a` started its lookup of `t`.
    fn introduction_setup(asker_serves: bool) -> [Dht<u32>; 3] {
        let start = Duration::from_secs(1_800_000_000);
        let node = |seed: u8, server: bool| {
            let config = DhtConfig {
                server,
                ..DhtConfig::default()
            };
            Dht::<u32>::new(
                Keypair::from_seed([seed; 32]),
                config,
                u64::from(seed),
                start,
            )
        };
        let (mut a, mut b, t) = (node(41, asker_serves), node(42, true), node(43, true));
        a.seed_contact(b.id(), 2 << 8, start);
        b.seed_contact(t.id(), 3 << 8, start);
        a.lookup(start, t.id());
        [a, b, t]
    }

    #[test]
    fn a_reachable_asker_is_introduced_and_the_target_answers_it_directly() {
        let now = Duration::from_secs(1_800_000_000);
        let (a_addr, b_addr, t_addr) = (1u32 << 8, 2u32 << 8, 3u32 << 8);
        let [mut a, mut b, mut t] = introduction_setup(true);
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert_eq!(sent.len(), 1);
        let req = match DhtMessage::<u32>::decode(&sent[0].1) {
            Ok(DhtMessage::Request(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(req.body, RequestBody::FindPeer(t.id()));
        b.handle_datagram(now, a_addr, &sent[0].1).unwrap();
        // Its answer to the asker (and a ping to verify it: a new server),
        // and an introduction to the target.
        let out: Vec<_> = std::iter::from_fn(|| b.poll_transmit())
            .filter(|(_, d)| !matches!(DhtMessage::<u32>::decode(d), Ok(DhtMessage::Request(_))))
            .collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, a_addr);
        assert_eq!(out[1].0, t_addr);
        assert_eq!(b.counters().introductions_sent, 1);
        match DhtMessage::<u32>::decode(&out[1].1) {
            Ok(DhtMessage::Introduction(i)) => {
                assert_eq!((i.txid, i.asker, i.addr), (req.txid, a.id(), a_addr));
            }
            other => panic!("{other:?}"),
        }
        t.handle_datagram(now, b_addr, &out[1].1).unwrap();
        let answer: Vec<_> = std::iter::from_fn(|| t.poll_transmit()).collect();
        assert_eq!(answer.len(), 1);
        assert_eq!(answer[0].0, a_addr);
        // The same introduction again (another node near the target asked
        // at once): not answered twice.
        t.handle_datagram(now, b_addr, &out[1].1).unwrap();
        assert!(t.poll_transmit().is_none());
        assert_eq!(t.counters().introductions_dropped, 1);
        // The introducer's answer comes first: it names the target, and
        // the asker asks it.
        a.handle_datagram(now + Duration::from_millis(20), b_addr, &out[0].1)
            .unwrap();
        let asked: Vec<_> = find_nodes_sent(&mut a);
        assert!(asked.contains(&(t_addr, t.id())), "{asked:?}");
        assert!(a.poll_event().is_none());
        // Then the target's answer through the introduction, which echoes
        // the txid of the request to b: found, a round trip sooner.
        a.handle_datagram(now + Duration::from_millis(30), t_addr, &answer[0].1)
            .unwrap();
        assert_eq!(a.counters().introduced, 1);
        match a.poll_event() {
            Some(DhtEvent::LookupDone { closest, hops, .. }) => {
                assert_eq!(closest[0], (t.id(), t_addr));
                assert_eq!(hops, 2, "the target counts as asked after b");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_introduced_answer_without_the_targets_proof_is_refused() {
        let now = Duration::from_secs(1_800_000_000);
        let [mut a, _, t] = introduction_setup(true);
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
        let Ok(DhtMessage::Request(req)) = DhtMessage::<u32>::decode(&sent[0].1) else {
            panic!("a request");
        };
        // Someone who saw the txid claims to be the target.
        let forged = Response {
            txid: req.txid,
            responder: t.id(),
            observed: 1u32 << 8,
            cookie: 1,
            proof: Some((Keypair::from_seed([9; 32]).peer_id(), [0; 64])),
            body: ResponseBody::Pong,
        };
        a.handle_datagram(now, 9 << 8, &forged.encode()).unwrap();
        assert_eq!(a.counters().introduced, 0);
        assert_eq!(a.counters().bad_proofs, 1);
        assert!(a.poll_event().is_none());
    }

    #[test]
    fn an_unreachable_asker_asks_for_no_introduction() {
        let [mut a, ..] = introduction_setup(false);
        let sent = requests_sent(&mut a);
        assert!(matches!(sent[0].1.body, RequestBody::FindNode(_)));
    }

    #[test]
    fn a_refresh_whose_contact_is_silent_drops_it_and_asks_the_next() {
        let (silent, next) = silent_refresh(true);
        assert_eq!(next.len(), 1, "the same refresh, asked again");
        assert_ne!(next[0], silent, "of the next contact");
    }

    #[test]
    fn a_clients_refresh_asks_one_contact() {
        let (_, next) = silent_refresh(false);
        assert_eq!(next, Vec::<u32>::new());
    }

    #[test]
    fn one_lost_query_does_not_drop_a_contact_two_do() {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig::default();
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([4; 32]), config.clone(), 9, start);
        let id = dht.id().random_with_prefix(0, [5; ID_BYTES]);
        dht.seed_contact(id, 1 << 8, start);
        let mut now = start;
        for lookups in 1..=2 {
            dht.lookup(now, id.random_with_prefix(40, [lookups; ID_BYTES]));
            let sent = find_nodes_sent(&mut dht);
            assert_eq!(sent.len(), 1, "the only contact is asked");
            // Queries are not resent: past the timeout the query failed.
            now += config.query_timeout + Duration::from_millis(1);
            dht.handle_timeout(now);
            assert!(find_nodes_sent(&mut dht).is_empty(), "no resend");
            let kept = dht.table().get(&id).is_some();
            assert_eq!(kept, lookups == 1, "after {lookups} lost queries");
        }
    }

    /// The pings a node sent since the last call: (to, txid).
    fn pings_sent(dht: &mut Dht<u32>) -> Vec<(u32, u64)> {
        requests_sent(dht)
            .into_iter()
            .filter(|(_, r)| r.body == RequestBody::Ping)
            .map(|(to, r)| (to, r.txid))
            .collect()
    }

    #[test]
    fn a_lost_query_is_followed_by_a_ping_that_settles_it() {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig::default();
        for answers in [false, true] {
            let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([4; 32]), config.clone(), 9, start);
            let (id, addr) = (dht.id().random_with_prefix(0, [5; ID_BYTES]), 1 << 8);
            dht.seed_contact(id, addr, start);
            dht.lookup(start, id.random_with_prefix(40, [1; ID_BYTES]));
            assert_eq!(find_nodes_sent(&mut dht).len(), 1);
            let mut now = start + config.query_timeout + Duration::from_millis(1);
            dht.handle_timeout(now);
            let pings = pings_sent(&mut dht);
            assert_eq!(pings.len(), 1, "the silent contact is pinged");
            assert_eq!(pings[0].0, addr);
            if answers {
                let pong = Response {
                    txid: pings[0].1,
                    responder: id,
                    observed: 9,
                    cookie: 1,
                    proof: None,
                    body: ResponseBody::Pong,
                };
                dht.handle_datagram(now, addr, &pong.encode()).unwrap();
            } else {
                // The ping is resent once, then given up.
                for _ in 0..2 {
                    now += config.rpc_timeout + Duration::from_millis(1);
                    dht.handle_timeout(now);
                }
            }
            assert_eq!(
                dht.table().get(&id).is_some(),
                answers,
                "answers: {answers}"
            );
        }
    }

    /// The default settings without refreshes and self-lookups: a
    /// maintenance run sends only liveness pings.
    fn only_liveness_pings() -> DhtConfig {
        DhtConfig {
            bucket_refresh: Duration::from_secs(u64::from(u32::MAX)),
            self_lookup: Duration::from_secs(u64::from(u32::MAX)),
            ..DhtConfig::default()
        }
    }

    #[test]
    fn liveness_pings_grow_with_the_contacts_they_find_gone() {
        // A server's pings grow with its losses; a client's do not.
        for server in [true, false] {
            let start = Duration::from_secs(1_800_000_000);
            let config = DhtConfig {
                server,
                ..only_liveness_pings()
            };
            let base = if server {
                config.pings_per_maintenance
            } else {
                config.client_pings_per_maintenance
            };
            let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([3; 32]), config.clone(), 7, start);
            let me = dht.id();
            // 300 contacts, 30 in each of buckets 0-9, each on its own /24.
            let mut addrs = HashMap::new();
            for n in 0..300u32 {
                let id = me.random_with_prefix(
                    (n / 30) as usize,
                    (n + 1).to_be_bytes().repeat(4).try_into().unwrap(),
                );
                dht.seed_contact(id, (n + 1) << 8, start);
                addrs.insert((n + 1) << 8, id);
            }
            assert_eq!(dht.table().len(), 300);
            // Maintenance after the contacts went stale; `answer` says whether
            // they answer. Returns the pings that run sent.
            let mut now = start + config.contact_stale + config.maintenance;
            let mut run = |dht: &mut Dht<u32>, answer: bool| -> usize {
                let next = dht.poll_timeout().expect("a maintenance timer").max(now);
                dht.handle_timeout(next);
                now = next;
                let pings = pings_sent(dht);
                for &(to, txid) in &pings {
                    if answer {
                        let pong = Response {
                            txid,
                            responder: addrs[&to],
                            observed: 9,
                            cookie: 1,
                            proof: None,
                            body: ResponseBody::Pong,
                        };
                        dht.handle_datagram(now, to, &pong.encode()).unwrap();
                    }
                }
                // Past the resend and the give-up, short of the next run.
                for _ in 0..2 {
                    now += config.rpc_timeout + Duration::from_millis(1);
                    dht.handle_timeout(now);
                }
                assert!(pings_sent(dht).len() <= pings.len(), "only resends");
                pings.len()
            };
            let gone: Vec<usize> = (0..5).map(|_| run(&mut dht, false)).collect();
            let answered: Vec<usize> = (0..2).map(|_| run(&mut dht, true)).collect();
            if !server {
                // A client's table serves only its own lookups: no boost.
                assert_eq!((gone, answered), (vec![base; 5], vec![base; 2]));
                continue;
            }
            assert_eq!(config.liveness_boost, 3);
            assert_eq!(gone, [1, 2, 3, 4, 4].map(|n| n * base), "capped at 4x");
            assert_eq!(dht.table().len(), 300 - 14 * base);
            // Answered, the next run is back to the base.
            assert_eq!(answered, [4 * base, base]);
        }
    }

    #[test]
    fn a_server_pings_contacts_silent_for_20_minutes_and_a_client_after_30() {
        let start = Duration::from_secs(1_800_000_000);
        let config = only_liveness_pings();
        assert_eq!(config.server_contact_stale, Duration::from_secs(20 * 60));
        assert_eq!(config.contact_stale, Duration::from_secs(30 * 60));
        // The first maintenance run after `at` minutes of silence.
        let pings_after = |server: bool, at: u64| {
            let mut dht: Dht<u32> = Dht::new(
                Keypair::from_seed([5; 32]),
                DhtConfig {
                    server,
                    ..config.clone()
                },
                7,
                start,
            );
            let me = dht.id();
            for n in 1..=8u32 {
                let id = me.random_with_prefix(0, [n as u8; ID_BYTES]);
                dht.seed_contact(id, n << 8, start);
            }
            let now = start + Duration::from_secs(at * 60);
            dht.handle_timeout(now);
            pings_sent(&mut dht).len()
        };
        assert_eq!(pings_after(true, 19), 0);
        assert_eq!(pings_after(true, 21), 8);
        assert_eq!(pings_after(false, 21), 0);
        // A client pings 6 a run at most, a server 10.
        assert_eq!(config.pings_per_maintenance, 10);
        assert_eq!(pings_after(false, 31), 6);
    }

    #[test]
    fn requests_refused_by_a_local_limit_do_not_count_against_contacts() {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig {
            max_pending: 2,
            ..DhtConfig::default()
        };
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([3; 32]), config, 7, start);
        let me = dht.id();
        for n in 1..=6u32 {
            let id = me.random_with_prefix(0, [n as u8; ID_BYTES]);
            dht.seed_contact(id, n << 8, start);
        }
        // The lookup asks all six at once; four are refused by the limit.
        dht.lookup(start, me.random_with_prefix(0, [9; ID_BYTES]));
        assert_eq!(requests_sent(&mut dht).len(), 2);
        assert_eq!(dht.counters().overloaded, 4);
        assert_eq!(dht.table().len(), 6);
        assert!(dht.table().contacts().all(|c| c.failures() == 0));
    }

    #[test]
    fn a_refresh_that_named_new_nodes_is_repeated_until_one_names_none() {
        let config = DhtConfig {
            k: 8,
            bucket_size: 8,
            ..DhtConfig::default()
        };
        assert_eq!(refreshes_of_bucket_0(config), [true, true, false]);
    }

    #[test]
    fn a_client_repeats_a_refresh_only_within_its_byte_budget() {
        // A client repeats while the bucket is under half full: 16 leaves
        // room for 11 after the first answer.
        let client = DhtConfig {
            k: 8,
            bucket_size: 16,
            server: false,
            ..DhtConfig::default()
        };
        assert_eq!(
            refreshes_of_bucket_0(client.clone()),
            [true, true, false],
            "within its budget"
        );
        let spent = DhtConfig {
            client_fill_burst: 0,
            client_bytes_per_s: 0,
            ..client
        };
        assert_eq!(refreshes_of_bucket_0(spent), [true, false, false]);
    }

    /// A node with two contacts in bucket 0 and one deep one: whether it
    /// refreshes bucket 0 at its first three maintenance runs, when the
    /// first answer names three nodes the bucket lacks and the next ones
    /// only the two it has.
    fn refreshes_of_bucket_0(config: DhtConfig) -> [bool; 3] {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig {
            self_lookup: Duration::from_secs(u64::from(u32::MAX)),
            ..config
        };
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([3; 32]), config.clone(), 7, start);
        let me = dht.id();
        // Two contacts in bucket 0, one deep enough that bucket 0 should be
        // full (log2(bucket size) buckets above the deepest one in use).
        let mut known = Vec::new();
        for (n, prefix) in [(1u32, 0usize), (2, 0), (3, 6)] {
            let id = me.random_with_prefix(prefix, [n as u8; ID_BYTES]);
            dht.seed_contact(id, n << 8, start);
            known.push((id, n << 8));
        }
        // Runs maintenance at `at` and answers bucket 0's refresh, if one
        // was sent, with `nodes`; returns whether there was one.
        let refresh_answered = |dht: &mut Dht<u32>, at: Duration, nodes: Vec<(NodeId, u32)>| {
            dht.handle_timeout(at);
            let sent = requests_sent(dht);
            let Some((to, req)) = sent.into_iter().find(
                |(_, r)| matches!(r.body, RequestBody::FindNode(t) if me.common_prefix(&t) == 0),
            ) else {
                return false;
            };
            let responder = known.iter().find(|(_, a)| *a == to).expect("a contact").0;
            let answer = Response {
                txid: req.txid,
                responder,
                observed: 9,
                cookie: 1,
                proof: None,
                body: ResponseBody::Nodes(nodes),
            };
            dht.handle_datagram(at, to, &answer.encode()).unwrap();
            true
        };
        let first = dht.poll_timeout().expect("a maintenance timer");
        let period = config.maintenance;
        let new = (1..=3)
            .map(|n| {
                (
                    me.random_with_prefix(0, [10 + n; ID_BYTES]),
                    u32::from(10 + n) << 8,
                )
            })
            .collect();
        let only_known = known[..2].to_vec();
        // After three nodes the bucket lacks, with room for more, a refresh
        // is repeated at the next maintenance, not a refresh period later;
        // after an answer naming none the bucket lacks, it is not.
        [
            refresh_answered(&mut dht, first, new),
            refresh_answered(&mut dht, first + period, only_known.clone()),
            refresh_answered(&mut dht, first + period * 2, only_known),
        ]
    }

    /// Gives `dht` (new at `start`) a contact in bucket 0 and a deep one
    /// (so that bucket 0 should be full), runs its first maintenance, and
    /// answers its refresh of bucket 0 from that contact with `named`.
    /// Returns the contact and when that was.
    fn refresh_of_bucket_0_names(
        dht: &mut Dht<u32>,
        start: Duration,
        named: Vec<(NodeId, u32)>,
    ) -> (NodeId, Duration) {
        let me = dht.id();
        let voucher = me.random_with_prefix(0, [1; ID_BYTES]);
        dht.seed_contact(voucher, 1 << 8, start);
        dht.seed_contact(me.random_with_prefix(6, [2; ID_BYTES]), 2 << 8, start);
        let first = dht.poll_timeout().expect("a maintenance timer");
        dht.handle_timeout(first);
        let (to, refresh) = requests_sent(dht)
            .into_iter()
            .find(|(_, r)| matches!(r.body, RequestBody::FindNode(t) if me.common_prefix(&t) == 0))
            .expect("bucket 0 refreshed");
        assert_eq!(to, 1 << 8);
        let answer = Response {
            txid: refresh.txid,
            responder: voucher,
            observed: 9,
            cookie: 1,
            proof: None,
            body: ResponseBody::Nodes(named),
        };
        dht.handle_datagram(first, 1 << 8, &answer.encode())
            .unwrap();
        (voucher, first)
    }

    /// What a node does with three new nodes its refresh of bucket 0
    /// named: the proof pings it sent, and how many entered unverified.
    fn named_to_bucket_0(config: DhtConfig) -> (usize, usize) {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig {
            self_lookup: Duration::from_secs(u64::from(u32::MAX)),
            ..config
        };
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([3; 32]), config, 5, start);
        let me = dht.id();
        let named = (10..13u8)
            .map(|n| (me.random_with_prefix(0, [n; ID_BYTES]), u32::from(n) << 8))
            .collect();
        refresh_of_bucket_0_names(&mut dht, start, named);
        let pings = requests_sent(&mut dht)
            .into_iter()
            .filter(|(_, r)| r.body == RequestBody::Ping && r.want_proof)
            .count();
        let unverified = dht.table().contacts().filter(|c| !c.is_verified()).count();
        (pings, unverified)
    }

    #[test]
    fn a_server_proves_the_nodes_of_its_deeper_buckets_first_a_client_never() {
        let deeper = DhtConfig {
            unverified_buckets: 0,
            ..DhtConfig::default()
        };
        assert_eq!(named_to_bucket_0(DhtConfig::default()), (0, 3));
        assert_eq!(named_to_bucket_0(deeper.clone()), (3, 0));
        let client = DhtConfig {
            server: false,
            ..deeper
        };
        assert_eq!(named_to_bucket_0(client), (0, 3));
    }

    #[test]
    fn nodes_a_refresh_names_are_unverified_until_they_prove_their_ids() {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig {
            self_lookup: Duration::from_secs(u64::from(u32::MAX)),
            ..DhtConfig::default()
        };
        let node =
            |seed: u8| Dht::<u32>::new(Keypair::from_seed([seed; 32]), config.clone(), 5, start);
        let mut dht = node(3);
        let me = dht.id();
        // Two real nodes of bucket 0, and an ID nobody at its address holds.
        let mut real: Vec<Dht<u32>> = (10..40u8)
            .map(node)
            .filter(|d| me.common_prefix(&d.id()) == 0)
            .take(2)
            .collect();
        let real_addr = |i: usize| (10 + i as u32) << 8;
        let fake = me.random_with_prefix(0, [9; ID_BYTES]);
        let fake_addr = 99 << 8;
        let mut named: Vec<(NodeId, u32)> = real
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id(), real_addr(i)))
            .collect();
        named.push((fake, fake_addr));
        let (voucher, first) = refresh_of_bucket_0_names(&mut dht, start, named.clone());
        // In the table at once, unverified, with no ping each.
        assert!(requests_sent(&mut dht).is_empty());
        for (id, _) in &named {
            let c = dht.table().get(id).expect("added");
            assert!(!c.is_verified());
        }
        // Never handed to others.
        let now = first + Duration::from_secs(1);
        let handed = nodes_named_to_an_asker(&mut dht, now, fake);
        assert!(handed.contains(&voucher));
        assert!(
            named.iter().all(|(id, _)| !handed.contains(id)),
            "{handed:?}"
        );
        // The node's own lookup asks them, each for its proof.
        dht.lookup(now, fake);
        let asked = requests_sent(&mut dht);
        for (id, addr) in &named {
            let (_, req) = asked.iter().find(|(to, _)| to == addr).expect("asked");
            assert!(req.want_proof, "{id:?}");
        }
        // A real node's proof makes it verified; the fake's answer, with
        // no proof of the ID it was named with, removes it.
        for (i, node) in real.iter_mut().enumerate() {
            let (_, req) = asked.iter().find(|(to, _)| *to == real_addr(i)).unwrap();
            node.handle_datagram(now, 7 << 8, &req.encode(super::UNVERIFIED_REQUEST_PAD))
                .unwrap();
            let pong = std::iter::from_fn(|| node.poll_transmit())
                .map(|(_, bytes)| bytes)
                .find(|b| matches!(DhtMessage::<u32>::decode(b), Ok(DhtMessage::Response(_))))
                .expect("an answer");
            dht.handle_datagram(now, real_addr(i), &pong).unwrap();
            assert!(dht.table().get(&node.id()).unwrap().is_verified());
        }
        let (_, req) = asked.iter().find(|(to, _)| *to == fake_addr).unwrap();
        let no_proof = Response {
            txid: req.txid,
            responder: fake,
            observed: 9,
            cookie: 1,
            proof: None,
            body: ResponseBody::Nodes(Vec::new()),
        };
        dht.handle_datagram(now, fake_addr, &no_proof.encode())
            .unwrap();
        assert!(dht.table().get(&fake).is_none());
    }

    #[test]
    fn answers_leave_out_contacts_whose_last_request_failed() {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig::default();
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([4; 32]), config.clone(), 9, start);
        let me = dht.id();
        let ids: Vec<NodeId> = (1..=3u8)
            .map(|n| me.random_with_prefix(0, [n; ID_BYTES]))
            .collect();
        // A lookup's query to the first is lost: one failure.
        dht.seed_contact(ids[0], 1 << 8, start);
        dht.lookup(start, ids[0]);
        requests_sent(&mut dht);
        let now = start + config.query_timeout * 4;
        dht.handle_timeout(now);
        requests_sent(&mut dht);
        for (n, id) in ids.iter().enumerate().skip(1) {
            dht.seed_contact(*id, (n as u32 + 1) << 8, now);
        }
        assert_eq!(dht.table().get(&ids[0]).map(|c| c.failures()), Some(1));
        let named = nodes_named_to_an_asker(&mut dht, now, ids[0]);
        assert_eq!(named.len(), 2);
        assert!(!named.contains(&ids[0]));
    }

    /// The nodes `dht` names to a server (with its cookie) that asks it
    /// for the nodes near `target`.
    fn nodes_named_to_an_asker(dht: &mut Dht<u32>, now: Duration, target: NodeId) -> Vec<NodeId> {
        let asker = 50 << 8;
        let ask = Request {
            txid: 77,
            sender: dht.id().random_with_prefix(0, [40; ID_BYTES]),
            cookie: dht.cookie_for(&asker, now.as_secs() / 600),
            server: true,
            want_proof: false,
            body: RequestBody::FindNode(target),
        };
        dht.handle_datagram(now, asker, &ask.encode(0)).unwrap();
        std::iter::from_fn(|| dht.poll_transmit())
            .find_map(|(_, bytes)| match DhtMessage::<u32>::decode(&bytes) {
                Ok(DhtMessage::Response(r)) if r.txid == 77 => match r.body {
                    ResponseBody::Nodes(n) => Some(n.into_iter().map(|(id, _)| id).collect()),
                    _ => None,
                },
                _ => None,
            })
            .expect("an answer")
    }

    /// A node whose refresh of bucket 0 gets no answer: the contact asked,
    /// and where the same refresh went after it was given up.
    fn silent_refresh(server: bool) -> (u32, Vec<u32>) {
        let start = Duration::from_secs(1_800_000_000);
        let config = DhtConfig {
            k: 4,
            bucket_size: 4,
            server,
            // No self-lookup: only the refreshes send FindNode.
            self_lookup: Duration::from_secs(u64::from(u32::MAX)),
            ..DhtConfig::default()
        };
        let mut dht: Dht<u32> = Dht::new(Keypair::from_seed([3; 32]), config.clone(), 7, start);
        let me = dht.id();
        // Two contacts in bucket 0, one deep enough that bucket 0 should be
        // full (log2(k) + 2 buckets above the deepest one in use).
        for (n, prefix) in [(1u32, 0usize), (2, 0), (3, 6)] {
            let id = me.random_with_prefix(prefix, [n as u8; ID_BYTES]);
            dht.seed_contact(id, n << 8, start);
        }
        let first = dht.poll_timeout().expect("a maintenance timer");
        dht.handle_timeout(first);
        let sent = find_nodes_sent(&mut dht);
        let &(silent, target) = sent
            .iter()
            .find(|(_, t)| me.common_prefix(t) == 0)
            .expect("bucket 0 refreshed");
        let silent_id = dht
            .table()
            .contacts()
            .find(|c| c.addr == silent)
            .expect("asked a contact")
            .id;
        // No answer (nor to the other buckets' refreshes): sent again after
        // the RPC timeout, then given up.
        let of_bucket_0 = |sent: Vec<(u32, NodeId)>| -> Vec<u32> {
            sent.into_iter()
                .filter(|(_, t)| *t == target)
                .map(|(to, _)| to)
                .collect()
        };
        dht.handle_timeout(first + config.rpc_timeout);
        assert_eq!(of_bucket_0(find_nodes_sent(&mut dht)), vec![silent]);
        dht.handle_timeout(first + config.rpc_timeout * 2);
        assert!(
            dht.table().get(&silent_id).is_none(),
            "a silent contact is dropped"
        );
        (silent, of_bucket_0(find_nodes_sent(&mut dht)))
    }

    #[test]
    fn cookies_are_odd_and_differ_by_address_epoch_and_node() {
        let start = Duration::from_secs(1_800_000_000);
        let node = |seed: u8| -> Dht<u32> {
            Dht::new(
                Keypair::from_seed([seed; 32]),
                DhtConfig::default(),
                9,
                start,
            )
        };
        let (a, b) = (node(1), node(2));
        let mut seen = HashSet::new();
        for addr in [1u32 << 8, 2 << 8, (1 << 8) + 1] {
            for epoch in [0, 1, 2_999_999] {
                for dht in [&a, &b] {
                    let cookie = dht.cookie_for(&addr, epoch);
                    assert_eq!(cookie & 1, 1);
                    assert_eq!(
                        cookie,
                        dht.cookie_for(&addr, epoch),
                        "the same cookie again"
                    );
                    assert!(seen.insert(cookie), "{addr} {epoch}: a cookie given before");
                }
            }
        }
    }

    #[test]
    fn a_cookie_takes_12_bytes_next_to_a_4_byte_address() {
        assert_eq!(size_of::<(u32, [u32; 2])>(), 12);
        for cookie in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(
                super::cookie_of_halves(super::cookie_halves(cookie)),
                cookie
            );
        }
    }

    proptest! {
        #[test]
        fn the_cookie_jar_answers_as_a_map(ops in proptest::collection::vec((0u32..64, any::<u64>()), 0..300)) {
            let mut jar = CookieJar::default();
            let mut model = HashMap::new();
            for (addr, cookie) in ops {
                jar.insert(addr, cookie);
                model.insert(addr, cookie);
                prop_assert_eq!(jar.len(), model.len());
                // At most an eighth unused, or what its size class holds.
                let most = jar.len() + jar.len() / 8 + 1;
                prop_assert!(jar.entries.capacity() * 12 <= crate::dht::size_class(most * 12).max(most * 12));
            }
            for addr in 0u32..64 {
                prop_assert_eq!(jar.get(&addr), model.get(&addr).copied());
            }
        }
    }
}
