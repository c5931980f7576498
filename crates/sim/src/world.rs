//! The simulated world and its event loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pos_proto::dht::{
    map_heap_bytes, Dht, DhtConfig, DhtEvent, NodeId, QueryId, RequestsSent, Signatures,
    SignedRecord,
};
use p2pos_proto::prefetch::prefetch_lines;
use p2pos_proto::rng::SplitMix64;
use p2pos_proto::Keypair;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::addr::AddrPlan;
use crate::handoff::{CloseOnDrop, Handoff};
use crate::queue::EventQueue;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes online at any time.
    pub nodes: usize,
    /// Simulated time.
    pub duration: Duration,
    /// Median session length; `None`: no churn.
    pub median_session: Option<Duration>,
    /// Lookups of random server IDs, spread over the run after the warm-up.
    pub lookups: usize,
    /// Records put (each fetched once, a minute later, by another node).
    pub records: usize,
    /// The seed of everything.
    pub seed: u64,
    /// Share of nodes that are DHT clients (not reachable).
    pub client_fraction: f64,
    /// Datagram loss probability.
    pub loss: f64,
    /// Time before lookups start.
    pub warmup: Duration,
    /// DHT settings of every node (by default with
    /// [`Signatures::SimulatedInsecure`]: the same figures as ed25519, at a
    /// third of the CPU).
    pub dht: DhtConfig,
    /// Report progress on stderr.
    pub progress: bool,
    /// Router kinds of the nodes (`None`: no NATs; `client_fraction`
    /// decides who serves). With a mix, reachable kinds serve.
    pub nat_mix: Option<Vec<(crate::nat::NatKind, f64)>>,
    /// Connections by key between random online nodes, spread over the
    /// run after the warm-up (with a NAT mix).
    pub connects: usize,
    /// Derive an ed25519 key pair for every node even with the insecure
    /// scheme, so that both schemes give the same network run for run. By
    /// default the insecure scheme's identities are 32 random bytes
    /// standing for a public key (deriving a million key pairs took a
    /// minute at a simulator's start).
    pub key_pairs: bool,
    /// Threads to run on (0: up to two, if the machine has them and the
    /// network is large enough to gain). The numbers do not depend on it.
    pub threads: usize,
    /// The allocator's heap in use and held beyond that (bytes), for the
    /// report, when the program does not use glibc's allocator.
    pub allocator_heap: Option<fn() -> (usize, usize)>,
}

/// Below this many nodes a window holds too few events to share out.
const THREADS_FROM_NODES: usize = 50_000;

impl SimConfig {
    /// The threads a run uses.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 if self.nodes >= THREADS_FROM_NODES => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(PARTITIONS),
            0 => 1,
            n => n.min(PARTITIONS),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 1000,
            duration: Duration::from_secs(600),
            median_session: None,
            lookups: 1000,
            records: 100,
            seed: 1,
            client_fraction: 0.3,
            loss: 0.0,
            warmup: Duration::from_secs(60),
            dht: DhtConfig {
                signatures: Signatures::SimulatedInsecure,
                ..DhtConfig::default()
            },
            progress: false,
            nat_mix: None,
            connects: 0,
            key_pairs: false,
            threads: 0,
            allocator_heap: None,
        }
    }
}

/// The figures of a run (`p2pos sim --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SimReport {
    /// Nodes online at any time.
    pub nodes: usize,
    /// Lookups measured (targets still online at the end of the lookup).
    pub lookups: usize,
    /// Share of lookups that found their target.
    pub lookup_success_rate: f64,
    /// Hops of successful lookups.
    pub hops_p50: u32,
    /// 90th percentile.
    pub hops_p90: u32,
    /// 99th percentile.
    pub hops_p99: u32,
    /// Mean hops (the percentiles move in whole hops; this shows the
    /// steps between).
    pub hops_mean: f64,
    /// Share of successful lookups that took 0, 1, 2, ... hops (the last
    /// entry: that many or more).
    pub hops_share: Vec<f64>,
    /// Lookup latency (ms).
    pub latency_ms_p50: u64,
    /// 90th percentile.
    pub latency_ms_p90: u64,
    /// 99th percentile.
    pub latency_ms_p99: u64,
    /// Lookup latency p50 of the lookups started by servers (reachable:
    /// they ask to be introduced to their target, see
    /// `RequestBody::FindPeer`) and by clients (ms).
    pub latency_ms_p50_servers: u64,
    /// See `latency_ms_p50_servers`.
    pub latency_ms_p50_clients: u64,
    /// Introductions over the run: sent by nodes asked for a peer in their
    /// table, answered by the peers (at most one per asker), and lookups
    /// whose target answered through one.
    pub introductions: Introductions,
    /// Median RTT between two nodes in this world (ms), for the ratios.
    pub rtt_ms_p50: u64,
    /// Share of puts stored on at least one node.
    pub put_success_rate: f64,
    /// Share of gets (a minute after the put, by another node) that found
    /// the record.
    pub get_success_rate: f64,
    /// Hops of successful gets (the round in which the first holder that
    /// returned the record was asked): what finding a peer's record costs.
    pub get_hops_p50: u32,
    /// 99th percentile.
    pub get_hops_p99: u32,
    /// Time of successful gets, until the get ends (a few more holders
    /// confirm no higher sequence exists) (ms).
    pub get_latency_ms_p50: u64,
    /// 99th percentile.
    pub get_latency_ms_p99: u64,
    /// DHT bytes sent per node per second, all nodes.
    pub maintenance_bytes_per_node_per_s: f64,
    /// The same for servers.
    pub maintenance_bytes_per_server_per_s: f64,
    /// The same for clients.
    pub maintenance_bytes_per_client_per_s: f64,
    /// ID proofs (an ed25519 signature each, and its check) per node per
    /// second: the simulator's main CPU cost.
    pub proofs_per_node_per_s: f64,
    /// DHT requests sent per node per second, by purpose (first attempts
    /// and retries): where the maintenance traffic goes.
    pub requests_per_node_per_s: RequestRates,
    /// Nodes that left (and were replaced).
    pub departures: u64,
    /// Events processed.
    pub events: u64,
    /// Of them, datagrams delivered.
    pub deliveries: u64,
    /// Of them, node timers that fired (retries, soft timeouts of lookup
    /// queries, maintenance; a timer whose node had nothing due counts too).
    pub timers: u64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Of them, building the world (nodes and their routing tables).
    pub setup_s: f64,
    /// Of them, running its events (the rest is the report).
    pub events_s: f64,
    /// Peak resident memory (MB).
    pub peak_rss_mb: f64,
    /// Connections by key tried (targets still online at the end).
    pub connects: usize,
    /// Share of them that made a session.
    pub connect_success_rate: f64,
    /// Share of sessions on a direct path (direct, punched, or relayed and
    /// then moved to a direct path).
    pub direct_share: f64,
    /// Share of sessions that stayed relayed.
    pub relayed_share: f64,
    /// Time from the connect request to the session (handshake done at
    /// the initiator), the cold fetch of the peer record included (ms).
    pub connect_ms_p50: u64,
    /// 99th percentile.
    pub connect_ms_p99: u64,
    /// The same with the peer record already known (no fetch).
    pub connect_cached_ms_p50: u64,
    /// 99th percentile.
    pub connect_cached_ms_p99: u64,
    /// Circuits opened per relaying node over the run: mean.
    pub relay_circuits_per_relay_mean: f64,
    /// The busiest relay's circuits.
    pub relay_circuits_max: u64,
    /// Signalling (home introductions, punches, relay setup, path probes)
    /// bytes per node per second.
    pub signalling_bytes_per_node_per_s: f64,
    /// Heap the nodes hold at the end of the run, by part (MB). Not quite
    /// the same from run to run: a hash map's capacity after removals
    /// depends on its randomly seeded hashes.
    pub memory_mb: SimMemory,
    /// The seed.
    pub seed: u64,
}

/// Requests per node per second, by purpose.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct RequestRates {
    /// Lookups, gets and the search phase of puts (own lookups included).
    pub queries: f64,
    /// Stores of records.
    pub stores: f64,
    /// Liveness pings of stale contacts.
    pub liveness: f64,
    /// Pings verifying new server requesters and bootstrap nodes.
    pub verify: f64,
    /// Proof pings of nodes a server's refresh named for a deeper bucket.
    pub fill: f64,
    /// Bucket refreshes.
    pub refresh: f64,
}

/// Memory held at the end of a run, by part (MB; capacities, so what the
/// allocator has handed out, not its free space or the event queue).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SimMemory {
    /// The DHT nodes' fixed parts.
    pub dht_nodes: f64,
    /// Routing tables.
    pub tables: f64,
    /// Requests waiting for answers.
    pub requests: f64,
    /// Lookups under way.
    pub lookups: f64,
    /// Records.
    pub records: f64,
    /// Cookies.
    pub cookies: f64,
    /// Unpolled datagrams and events.
    pub queues: f64,
    /// The simulator's own per-node state and pending queries.
    pub world: f64,
    /// The allocator's heap in use, all of the process (glibc's, or the
    /// one `SimConfig::allocator_heap` gives: jemalloc's in `p2pos sim`).
    pub allocator_in_use: f64,
    /// Memory the allocator holds beyond that: free space inside glibc's
    /// heap, or what jemalloc keeps resident beyond what is in use (what
    /// fragmentation costs).
    pub allocator_free: f64,
    /// Routing-table entries per live node, mean.
    pub table_entries_mean: f64,
    /// Contacts in replacement caches per live node, mean.
    pub table_replacements_mean: f64,
    /// Share of routing-table entries whose node has left (the table does
    /// not know yet).
    pub table_dead_share: f64,
    /// Share of routing-table entries that have not proven their ID to
    /// their table's node yet (named by a refresh, not yet asked).
    pub table_unverified_share: f64,
    /// Round trip from a node to the live entries of its table, mean (ms;
    /// the latency model's): how near the table keeps its contacts.
    pub table_rtt_ms_mean: f64,
    /// Routing tables by the age of their node: how fast a new node's
    /// table fills, and how dead entries pile up in old ones.
    pub tables_by_age: Vec<TablesByAge>,
}

/// The routing tables of the nodes of one age band at the end of a run.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TablesByAge {
    /// Nodes up for at least this many minutes (and less than the next
    /// band's).
    pub min_age_min: u64,
    /// Live nodes in the band.
    pub nodes: usize,
    /// Table entries per node, mean.
    pub entries_mean: f64,
    /// Of them, nodes that left, per node, mean.
    pub dead_mean: f64,
    /// Of them, unverified ones, per node, mean.
    pub unverified_mean: f64,
}

/// Lower bounds of the age bands (minutes).
const AGE_BANDS_MIN: [u64; 6] = [0, 2, 5, 10, 20, 40];

/// What [`SimMemory::of`] counts, over some of the nodes (the bands'
/// means are still sums).
struct Tally {
    sum: p2pos_proto::dht::MemoryUse,
    live: usize,
    entries: usize,
    replacements: usize,
    dead: usize,
    unverified: usize,
    live_entries: usize,
    rtt_sum: u64,
    bands: [TablesByAge; AGE_BANDS_MIN.len()],
}

impl Tally {
    /// Counts the nodes of `range`.
    fn of(w: &World, range: std::ops::Range<usize>) -> Self {
        let mut t = Tally {
            sum: p2pos_proto::dht::MemoryUse::default(),
            live: 0,
            entries: 0,
            replacements: 0,
            dead: 0,
            unverified: 0,
            live_entries: 0,
            rtt_sum: 0,
            bands: AGE_BANDS_MIN.map(|min_age_min| TablesByAge {
                min_age_min,
                ..TablesByAge::default()
            }),
        };
        for i in range {
            // The next node's state is read at random, and each contact
            // names a node whose route, slot and place are read at random
            // too: asked for first, all of them, the memory fetches them
            // side by side (one after another, the 450 million contacts of
            // 10^6 nodes took 20 s).
            let next = w.parts[(i + 1) % PARTITIONS]
                .slots
                .get((i + 1) / PARTITIONS);
            if let Some(next) = next.and_then(|s| s.dht.as_deref()) {
                prefetch_lines(next, 1);
                next.prefetch();
            }
            let Some(dht) = w.dht(i as u32) else {
                continue;
            };
            for c in dht.table().contacts() {
                let j = w.shared.addrs.slot(c.addr) as usize;
                if let Some(route) = w.shared.routes.get(j) {
                    prefetch_lines(route, 1);
                    prefetch_lines(&w.shared.places[j], 1);
                    prefetch_lines(&w.parts[j % PARTITIONS].slots[j / PARTITIONS], 1);
                }
            }
            t.sum.add(&dht.memory_use());
            t.live += 1;
            let len = dht.table().len();
            t.entries += len;
            t.replacements += dht.table().replacement_count();
            let mut gone = 0;
            let mut unverified = 0;
            for c in dht.table().contacts() {
                unverified += usize::from(!c.is_verified());
                match w.shared.node_at(c.addr) {
                    Some(j) if w.online(j) && w.place(j).id == c.id => {
                        t.live_entries += 1;
                        t.rtt_sum += 2 * w.shared.one_way_ms(i as u32, j);
                    }
                    _ => gone += 1,
                }
            }
            t.dead += gone;
            t.unverified += unverified;
            let age_min = (w.now - w.online_since[i]) / 60_000;
            let band = AGE_BANDS_MIN.partition_point(|&b| b <= age_min) - 1;
            t.bands[band].nodes += 1;
            t.bands[band].entries_mean += len as f64;
            t.bands[band].dead_mean += gone as f64;
            t.bands[band].unverified_mean += unverified as f64;
        }
        t
    }

    /// The counts of both (sums of whole numbers: the same in any order).
    fn merge(mut self, other: Tally) -> Tally {
        self.sum.add(&other.sum);
        self.live += other.live;
        self.entries += other.entries;
        self.replacements += other.replacements;
        self.dead += other.dead;
        self.unverified += other.unverified;
        self.live_entries += other.live_entries;
        self.rtt_sum += other.rtt_sum;
        for (b, o) in self.bands.iter_mut().zip(other.bands) {
            b.nodes += o.nodes;
            b.entries_mean += o.entries_mean;
            b.dead_mean += o.dead_mean;
            b.unverified_mean += o.unverified_mean;
        }
        self
    }
}

impl SimMemory {
    fn of(w: &World) -> Self {
        // Each thread of the run counts its share of the nodes.
        let n = w.shared.places.len();
        let threads = w.cfg.threads();
        let tally = if threads <= 1 {
            Tally::of(w, 0..n)
        } else {
            std::thread::scope(|s| {
                let counting: Vec<_> = (0..threads)
                    .map(|t| n * t / threads..n * (t + 1) / threads)
                    .map(|share| s.spawn(move || Tally::of(w, share)))
                    .collect();
                counting
                    .into_iter()
                    .map(|t| t.join().expect("a count of the tables panicked"))
                    .reduce(Tally::merge)
                    .expect("at least two shares")
            })
        };
        let Tally {
            sum,
            live,
            entries,
            replacements,
            dead,
            unverified,
            live_entries,
            rtt_sum,
            mut bands,
        } = tally;
        for b in &mut bands {
            let n = b.nodes.max(1) as f64;
            b.entries_mean /= n;
            b.dead_mean /= n;
            b.unverified_mean /= n;
        }
        let mean = |n: usize| n as f64 / live.max(1) as f64;
        use std::mem::size_of;
        let world = w.shared.places.capacity() * size_of::<Place>()
            + w.parts
                .iter()
                .map(|p| p.slots.capacity() * size_of::<Slot>())
                .sum::<usize>()
            + w.shared.routes.capacity() * size_of::<Route>()
            + map_heap_bytes(&w.pending)
            + w.online_since.capacity() * size_of::<u64>();
        let mb = |b: usize| b as f64 / 1e6;
        let heap = w.cfg.allocator_heap.map_or_else(allocator_heap, |f| f());
        SimMemory {
            dht_nodes: mb(sum.node),
            tables: mb(sum.table),
            requests: mb(sum.requests),
            lookups: mb(sum.lookups),
            records: mb(sum.records),
            cookies: mb(sum.cookies),
            queues: mb(sum.queues),
            world: mb(world),
            allocator_in_use: mb(heap.0),
            allocator_free: mb(heap.1),
            table_entries_mean: mean(entries),
            table_replacements_mean: mean(replacements),
            table_dead_share: dead as f64 / entries.max(1) as f64,
            table_unverified_share: unverified as f64 / entries.max(1) as f64,
            table_rtt_ms_mean: rtt_sum as f64 / live_entries.max(1) as f64,
            tables_by_age: bands.to_vec(),
        }
    }
}

/// Logical partitions of the nodes: node `i` belongs to partition `i %
/// PARTITIONS`, which runs its datagrams and timers with its own queue and
/// random numbers. The partitions of one window of time run side by side,
/// on as many threads as there are; their count is fixed, so the numbers
/// do not depend on the threads.
const PARTITIONS: usize = 2;

/// The shortest one-way delay between two nodes (ms): the length of a
/// window. A datagram sent within a window arrives after it, so the
/// partitions of one window need nothing from each other. 5 ms, an RTT of
/// 10 ms, the shortest the latency model has anyway but for 0.03% of
/// pairs (two nodes with the fastest access links next to each other);
/// until session 28 it was 2 ms, and the partitions met 2.5 times as often
/// (1.8 million times in a simulated hour), each time for a millisecond or
/// less of work.
const WINDOW_MS: u64 = 5;

/// Runs one window of every partition, up to the time given.
type RunWindow<'a> = dyn FnMut(&mut Vec<Part>, &Arc<Shared>, u64) + 'a;

/// What a partition runs.
enum Local {
    Deliver { to: u32, from: u32, bytes: Vec<u8> },
    Timer { node: u32, gen: u32 },
}

/// What the world runs between windows, at the start of the window they
/// fall in (up to a window early).
enum Global {
    Leave {
        node: u32,
        gen: u32,
    },
    Lookup,
    Put,
    Get {
        key: NodeId,
        seq: u64,
        owner: u32,
    },
    Progress,
    Connect,
    ConnectGet {
        from: u32,
        to: u32,
        to_gen: u32,
        key: NodeId,
    },
}

/// Where a node is and what it is: set when it is created, and only read
/// while the partitions run.
/// Its address is in its [`Route`], its generation in its [`Slot`].
struct Place {
    id: NodeId,
    server: bool,
    nat: crate::nat::NatKind,
}

/// Where a node's datagrams go: its address, and where it sits (for the
/// delays). Apart from [`Place`]: every datagram sent reads the route of
/// its destination, at random among a million, and 16 bytes a node keep
/// the routes within the cache far better than a whole place would.
#[derive(Clone, Copy)]
struct Route {
    addr: u32,
    x: f32,
    y: f32,
    access_ms: f32,
}

/// A node's state in its partition.
struct Slot {
    dht: Option<Box<Dht<u32>>>,
    /// When the node's timer is due: the one timer event in the queue
    /// that counts (others for it are stale).
    timer_at: u64,
    /// The latest timer event in the queue for the node (`u64::MAX`:
    /// none), usually its next maintenance: when the node is due then
    /// again, that event counts again, and no second one is queued. A node
    /// that sent a request and heard back within the timeout went back to
    /// its maintenance time each time, and every time a new event for it
    /// went into the heap beside the stale one.
    timer_queued: u64,
    /// The node's generation: a new node in the slot has the next one.
    /// Read with the timer fields, so a stale timer costs no other read.
    gen: u32,
}

/// What the partitions read: the places and routes of the nodes.
struct Shared {
    places: Vec<Place>,
    routes: Vec<Route>,
    addrs: AddrPlan,
    loss: f64,
}

impl Shared {
    /// The node at `addr`, if one is there now.
    fn node_at(&self, addr: u32) -> Option<u32> {
        let i = self.addrs.slot(addr);
        let route = self.routes.get(i as usize)?;
        (route.addr == addr).then_some(i)
    }

    fn one_way_ms(&self, a: u32, b: u32) -> u64 {
        let (na, nb) = (&self.routes[a as usize], &self.routes[b as usize]);
        let d = ((na.x - nb.x).powi(2) + (na.y - nb.y).powi(2)).sqrt();
        // Every access link takes at least a millisecond each way, and
        // every path at least the window.
        (na.access_ms + nb.access_ms + d * 50.0).max(WINDOW_MS as f32) as u64
    }
}

/// A query of a node that ended, for the world to count.
struct Done {
    node: u32,
    gen: u32,
    at: u64,
    event: DhtEvent<u32>,
}

/// A partition: its nodes' state, queue and random numbers, and the
/// datagrams it sent to other partitions in the last window.
struct Part {
    index: usize,
    now: u64,
    queue: EventQueue<Local>,
    /// Node `i` of this partition at `slots[i / PARTITIONS]`.
    slots: Vec<Slot>,
    rng: SplitMix64,
    /// Datagrams for each partition, sent in this window.
    outbox: Vec<Vec<(u64, Local)>>,
    /// Datagrams from each partition, sent in the last window.
    inbox: Vec<Vec<(u64, Local)>>,
    done: Vec<Done>,
    events: u64,
    deliveries: u64,
    timers: u64,
    /// [`Part::flush`]'s buffers.
    out_buf: Vec<(u32, Vec<u8>)>,
    event_buf: Vec<DhtEvent<u32>>,
}

/// See [`SimReport::introductions`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Introductions {
    /// Lookups started (the denominator of the rest).
    pub lookups_started: u64,
    /// Introductions sent.
    pub sent: u64,
    /// Introductions the targets answered.
    pub answered: u64,
    /// Introductions dropped (one per asker; the rate limit).
    pub dropped: u64,
    /// Lookups whose target answered through an introduction.
    pub introduced: u64,
}

#[derive(Default)]
struct Stats {
    latency_servers: Vec<u64>,
    latency_clients: Vec<u64>,
    introductions: Introductions,
    hops: Vec<u32>,
    latency: Vec<u64>,
    get_hops: Vec<u32>,
    get_latency: Vec<u64>,
    lookups: usize,
    lookups_ok: usize,
    puts: usize,
    puts_ok: usize,
    gets: usize,
    gets_ok: usize,
    departures: u64,
    server_bytes: u128,
    proofs: u64,
    requests: RequestsSent,
    client_bytes: u128,
    server_seconds: f64,
    client_seconds: f64,
    connects: usize,
    connects_ok: usize,
    paths: [usize; 4],
    connect_ms: Vec<u64>,
    connect_cached_ms: Vec<u64>,
    signalling_bytes: u128,
    relay_circuits: HashMap<u32, u64>,
}

enum Pending {
    Lookup {
        target: NodeId,
        target_node: u32,
        target_gen: u32,
    },
    Get {
        seq: u64,
    },
    Put,
    /// A connecting node's get of its target's peer record.
    Connect {
        target_node: u32,
        target_gen: u32,
    },
    /// A target's put of its peer record (not counted with the puts).
    PeerRecord,
}

struct World {
    cfg: SimConfig,
    /// The DHT settings, one copy for all nodes.
    dht_cfg: Arc<DhtConfig>,
    rng: SplitMix64,
    now: u64,
    global: EventQueue<Global>,
    /// Shared with the partitions' threads during a window, changed only
    /// between windows (when this is its only reference).
    shared: Arc<Shared>,
    parts: Vec<Part>,
    pending: FxHashMap<(u32, u32, QueryId), (Pending, u64)>,
    stats: Stats,
    /// Global events run.
    events: u64,
    online_since: Vec<u64>,
}

/// Simulated time starts here (seconds since the Unix epoch), so records
/// carry realistic expiry times.
const EPOCH_S: u64 = 1_800_000_000;

/// The nodes of the start started their protocol state (timers, budgets)
/// within this long, and last heard from their contacts within it (without
/// churn they have been up for that long; with churn, see
/// `World::start_age_ms`): a network that has been running, not one whose
/// nodes all started together. Otherwise every node's first
/// self-lookup, bucket refresh and stale-contact pings fell due in the same
/// minute, 30 minutes in (at 10^6 nodes that minute alone took longer than
/// the 30 before it).
const WARM_START_MS: u64 = 30 * 60 * 1000;

/// The shape of the Pareto distribution of session lengths (see
/// `World::session_left_ms`; `World::start_age_ms`'s formula is for it).
const SESSION_SHAPE: f64 = 1.5;

/// Ages of the start beyond a year count as a year.
const MAX_AGE_MS: u64 = 365 * 24 * 3600 * 1000;

/// Entries of [`SimReport::hops_share`].
const HOPS_SHARE_LEN: usize = 8;

fn mean(v: &[u32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64
}

/// Share of the values equal to 0, 1, ..., `len - 2`, and of `len - 1` or
/// more.
fn shares(v: &[u32], len: usize) -> Vec<f64> {
    let mut counts = vec![0usize; len];
    for &x in v {
        counts[(x as usize).min(len - 1)] += 1;
    }
    counts
        .into_iter()
        .map(|c| c as f64 / v.len().max(1) as f64)
        .collect()
}

fn percentile<T: Copy + Ord + Default>(v: &mut [T], p: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn sim_time(now: u64) -> Duration {
    Duration::from_millis(EPOCH_S * 1000 + now)
}

impl Part {
    fn new(index: usize, seed: u64) -> Self {
        Part {
            index,
            now: 0,
            queue: EventQueue::new(),
            slots: Vec::new(),
            rng: SplitMix64(seed),
            outbox: (0..PARTITIONS).map(|_| Vec::new()).collect(),
            inbox: (0..PARTITIONS).map(|_| Vec::new()).collect(),
            done: Vec::new(),
            events: 0,
            deliveries: 0,
            timers: 0,
            out_buf: Vec::new(),
            event_buf: Vec::new(),
        }
    }

    fn slot(&mut self, i: u32) -> &mut Slot {
        &mut self.slots[i as usize / PARTITIONS]
    }

    /// Runs the window that ends at `limit`: first the datagrams the other
    /// partitions sent in the last one.
    fn run_window(&mut self, shared: &Shared, limit: u64) {
        for from in 0..PARTITIONS {
            let mut inbox = std::mem::take(&mut self.inbox[from]);
            for (at, local) in inbox.drain(..) {
                self.queue.push(at, local);
            }
            self.inbox[from] = inbox;
        }
        while let Some((at, local)) = self.queue.pop_before(limit) {
            self.prefetch(shared);
            self.now = at;
            self.events += 1;
            self.step(shared, local);
        }
    }

    /// Asks the memory for what the next events will read while this one
    /// runs, in four stages, each one event before the read it serves
    /// depends on: the slot of the event four ahead; the state of the node
    /// of the event three ahead (its slot has arrived) and its datagram;
    /// for the event two ahead what that state points to that the event
    /// will read (for a datagram the places of the buckets of the IDs it
    /// names, a response's request and the cookies; for a timer the places
    /// of all the buckets and the cookies) and its route; and for the next
    /// event the entries of those buckets (their places have arrived). A
    /// node's state is read at random among a million, and the step waited
    /// for each of these.
    fn prefetch(&self, shared: &Shared) {
        let node = |local: &Local| match local {
            Local::Deliver { to, .. } => *to,
            Local::Timer { node, .. } => *node,
        };
        let dht = |local: &Local| -> Option<&Dht<u32>> {
            self.slots[node(local) as usize / PARTITIONS].dht.as_deref()
        };
        if let Some(fourth) = self.queue.peek_same_time(3) {
            prefetch_lines(&self.slots[node(fourth) as usize / PARTITIONS], 1);
        }
        if let Some(third) = self.queue.peek_same_time(2) {
            if let Some(state) = dht(third) {
                prefetch_lines(state, std::mem::size_of::<Dht<u32>>().div_ceil(64));
            }
            if let Local::Deliver { bytes, .. } = third {
                prefetch_lines(bytes.as_ptr(), bytes.len().div_ceil(64));
            }
        }
        if let Some(second) = self.queue.peek_same_time(1) {
            prefetch_lines(&shared.routes[node(second) as usize], 1);
            if let Some(state) = dht(second) {
                match second {
                    Local::Deliver { bytes, .. } => state.prefetch_datagram_early(bytes),
                    Local::Timer { .. } => state.prefetch(),
                }
            }
        }
        if let Some(next @ Local::Deliver { bytes, .. }) = self.queue.peek_same_time(0) {
            if let Some(state) = dht(next) {
                state.prefetch_datagram(bytes);
            }
        }
    }

    fn step(&mut self, shared: &Shared, local: Local) {
        let now = sim_time(self.now);
        match local {
            Local::Deliver { to, from, bytes } => {
                self.deliveries += 1;
                let Some(dht) = self.slot(to).dht.as_mut() else {
                    return;
                };
                let _ = dht.handle_datagram(now, from, &bytes);
                self.flush(shared, to);
            }
            Local::Timer { node, gen } => {
                let at = self.now;
                let slot = self.slot(node);
                if slot.gen != gen {
                    return;
                }
                if slot.timer_queued == at {
                    slot.timer_queued = u64::MAX;
                }
                if slot.timer_at != at {
                    return;
                }
                slot.timer_at = u64::MAX;
                if let Some(dht) = slot.dht.as_mut() {
                    dht.handle_timeout(now);
                }
                self.timers += 1;
                self.flush(shared, node);
            }
        }
    }

    /// Drains what node `i` wants to send and report, and re-arms its timer.
    fn flush(&mut self, shared: &Shared, i: u32) {
        let mut out = std::mem::take(&mut self.out_buf);
        let mut events = std::mem::take(&mut self.event_buf);
        let timer = {
            let Some(dht) = self.slot(i).dht.as_mut() else {
                return;
            };
            while let Some(t) = dht.poll_transmit() {
                // Its destination's route is read below, after the events
                // and the timer: the memory has that long to fetch it.
                let to = shared.addrs.slot(t.0) as usize;
                if let Some(route) = shared.routes.get(to) {
                    prefetch_lines(route, 1);
                }
                out.push(t);
            }
            while let Some(e) = dht.poll_event() {
                events.push(e);
            }
            dht.poll_timeout()
        };
        let from = shared.routes[i as usize].addr;
        for (to_addr, bytes) in out.drain(..) {
            if shared.loss > 0.0 && self.rng.unit() < shared.loss {
                continue;
            }
            let Some(to) = shared.node_at(to_addr) else {
                continue;
            };
            let at = self.now + shared.one_way_ms(i, to);
            let local = Local::Deliver { to, from, bytes };
            let part = to as usize % PARTITIONS;
            if part == self.index {
                self.queue.push(at, local);
            } else {
                self.outbox[part].push((at, local));
            }
        }
        self.out_buf = out;
        let gen = self.slots[i as usize / PARTITIONS].gen;
        for event in events.drain(..) {
            self.done.push(Done {
                node: i,
                gen,
                at: self.now,
                event,
            });
        }
        self.event_buf = events;
        if let Some(t) = timer {
            let at = (t.as_millis() as u64)
                .saturating_sub(EPOCH_S * 1000)
                .max(self.now);
            let slot = &mut self.slots[i as usize / PARTITIONS];
            // The node is due at `at` now, earlier or later than before (a
            // request was answered: it is usually due at its next
            // maintenance again). An event that was queued for another
            // time finds itself stale, and wakes no node with nothing due.
            if at != slot.timer_at {
                slot.timer_at = at;
                if at != slot.timer_queued {
                    slot.timer_queued = match slot.timer_queued {
                        u64::MAX => at,
                        queued => queued.max(at),
                    };
                    self.queue.push(at, Local::Timer { node: i, gen });
                }
            }
        }
    }
}

/// What every partition's table build reads (see `World::build_tables`).
struct TableBuild<'a> {
    /// The servers, sorted by ID.
    servers: &'a [(NodeId, u32)],
    places: &'a [Place],
    bucket_size: usize,
    refresh_ms: u64,
    now: Duration,
}

impl TableBuild<'_> {
    /// Fills the tables of the nodes of `part`.
    fn part(&self, part: &mut Part, seed: u64) {
        let servers = self.servers;
        let k = self.bucket_size;
        let mut rng = SplitMix64(seed);
        // One buffer, reused for every node.
        let mut picks: Vec<(NodeId, u32)> = Vec::new();
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        for (position, slot) in part.slots.iter_mut().enumerate() {
            let i = position * PARTITIONS + part.index;
            let me = self.places[i].id;
            picks.clear();
            // `lo..hi`: the servers sharing the first `prefix` bits with me
            // (a range of the sorted list). Bit `prefix` splits it into the
            // ones of bucket `prefix` and the ones sharing more.
            let (mut lo, mut hi) = (0, servers.len());
            for prefix in 0..256usize {
                let split = lo + servers[lo..hi].partition_point(|s| !bit(&s.0, prefix));
                let (other, same) = if bit(&me, prefix) {
                    (lo..split, split..hi)
                } else {
                    (split..hi, lo..split)
                };
                let count = other.len();
                if count <= k {
                    picks.extend_from_slice(&servers[other]);
                } else {
                    // k distinct ones (Floyd's sampling).
                    chosen.clear();
                    for j in count - k..count {
                        let t = rng.below(j + 1);
                        chosen.push(if chosen.contains(&t) { j } else { t });
                    }
                    picks.extend(chosen.iter().map(|&j| servers[other.start + j]));
                }
                (lo, hi) = (same.start, same.end);
                // Deeper buckets are empty once no other server shares
                // this prefix.
                if hi - lo == 0 || (hi - lo == 1 && servers[lo].0 == me) {
                    break;
                }
            }
            let dht = slot.dht.as_deref_mut().expect("online");
            for &(id, addr) in &picks {
                // Heard from at some point of the warm start.
                let seen = self.now - Duration::from_millis(rng.next_u64() % WARM_START_MS);
                dht.seed_contact(id, addr, seen);
            }
            // Each bucket refreshed at some point of the last refresh
            // period (all due at once, every node refreshed its buckets
            // in the first second: 21 events a node, and the requests'
            // state then took a fifth of the heap for good, as holes).
            for b in 0..dht.table().bucket_count() {
                let at = self.now - Duration::from_millis(rng.next_u64() % self.refresh_ms);
                dht.seed_refreshed(b, at);
            }
        }
    }
}

impl World {
    fn now_d(&self) -> Duration {
        sim_time(self.now)
    }

    fn one_way_ms(&self, a: u32, b: u32) -> u64 {
        self.shared.one_way_ms(a, b)
    }

    fn place(&self, i: u32) -> &Place {
        &self.shared.places[i as usize]
    }

    fn addr(&self, i: u32) -> u32 {
        self.shared.routes[i as usize].addr
    }

    fn gen(&self, i: u32) -> u32 {
        self.parts[i as usize % PARTITIONS].slots[i as usize / PARTITIONS].gen
    }

    fn dht(&self, i: u32) -> Option<&Dht<u32>> {
        self.parts[i as usize % PARTITIONS].slots[i as usize / PARTITIONS]
            .dht
            .as_deref()
    }

    fn dht_mut(&mut self, i: u32) -> Option<&mut Dht<u32>> {
        self.parts[i as usize % PARTITIONS]
            .slot(i)
            .dht
            .as_deref_mut()
    }

    fn online(&self, i: u32) -> bool {
        self.dht(i).is_some()
    }

    /// Events run so far: the partitions' and the global ones.
    fn all_events(&self) -> u64 {
        self.events + self.parts.iter().map(|p| p.events).sum::<u64>()
    }

    /// Runs the windows up to `end` (inclusive) on `threads` threads.
    fn run_until(&mut self, end: u64, threads: usize) {
        let run = |w: &mut World, window: &mut RunWindow| {
            let mut t = 0;
            while t <= end {
                let limit = (t + WINDOW_MS).min(end + 1);
                w.now = t;
                w.exchange();
                while let Some((_, global)) = w.global.pop_before(limit) {
                    w.step(global);
                }
                window(&mut w.parts, &w.shared, limit);
                t = limit;
            }
            w.now = end;
            w.exchange();
        };
        if threads <= 1 {
            run(self, &mut |parts, shared, limit| {
                for part in parts {
                    part.run_window(shared, limit);
                }
            });
            return;
        }
        // The first partition runs on this thread, each other one on a
        // thread of its own, which gets the partition and the shared state
        // for a window and hands the partition back at its end; the world's
        // serial work (the exchange, churn, lookups) runs in between.
        type Job = (Part, Arc<Shared>, u64);
        let done: Vec<Handoff<Part>> = (1..PARTITIONS)
            .map(|_| Handoff::new(std::thread::current()))
            .collect();
        std::thread::scope(|s| {
            // Each thread makes the mailbox it receives on (it needs the
            // thread) and sends it over once.
            let (mailboxes, mailbox) = std::sync::mpsc::channel();
            for (worker, done) in done.iter().enumerate() {
                let mailboxes = mailboxes.clone();
                s.spawn(move || {
                    let _close = CloseOnDrop(done);
                    let jobs = Arc::new(Handoff::<Job>::new(std::thread::current()));
                    let sent = mailboxes.send((worker, Arc::clone(&jobs)));
                    drop(mailboxes);
                    if sent.is_err() {
                        return;
                    }
                    while let Some((mut part, shared, limit)) = jobs.recv() {
                        part.run_window(&shared, limit);
                        // The world changes the shared state between
                        // windows: only its own reference may remain.
                        drop(shared);
                        done.send(part);
                    }
                });
            }
            drop(mailboxes);
            let mut jobs: Vec<(usize, Arc<Handoff<Job>>)> =
                mailbox.iter().take(done.len()).collect();
            jobs.sort_by_key(|&(worker, _)| worker);
            // Closed before any check can unwind: no thread waits forever.
            let _close: Vec<_> = jobs.iter().map(|(_, j)| CloseOnDrop(&**j)).collect();
            assert_eq!(jobs.len(), done.len(), "a partition's thread panicked");
            run(self, &mut |parts, shared, limit| {
                for (_, job) in jobs.iter().rev() {
                    let part = parts.pop().expect("a partition per thread");
                    job.send((part, Arc::clone(shared), limit));
                }
                parts[0].run_window(shared, limit);
                for done in &done {
                    let part = done.recv().expect("a partition's thread panicked");
                    parts.push(part);
                }
            });
        });
    }

    /// The time left in the session of a node that has been up for
    /// `up_ms`: a session drawn from the Pareto distribution given that it
    /// lasted `up_ms` so far, minus `up_ms`. Drawn from scratch for the
    /// nodes of the warm start, every one of them stayed at least the
    /// Pareto minimum (18.9 min at median 30): nobody left in the first 19
    /// minutes, and then half the network left within 11. (See
    /// `World::start_age_ms` for how long they have been up.)
    fn session_left_ms(&mut self, up_ms: u64) -> Option<u64> {
        // Given S > t (t at least xm), S / t is Pareto with minimum 1 and
        // the same shape.
        let floor = self.session_min_ms()?.max(up_ms as f64);
        let u = self.rng.unit().max(1e-12);
        let session = floor / u.powf(1.0 / SESSION_SHAPE);
        Some((session - up_ms as f64) as u64)
    }

    /// The minimum `xm` of the Pareto sessions (ms), with churn: their
    /// median is `xm * 2^(1 / shape)`.
    fn session_min_ms(&self) -> Option<f64> {
        let median = self.cfg.median_session?.as_millis() as f64;
        Some(median / 2f64.powf(1.0 / SESSION_SHAPE))
    }

    /// How long a node of the start has been up: with churn, drawn from
    /// the ages of the nodes online in a network where nodes have been
    /// coming and going for ever (its steady state); without, up to 30
    /// minutes.
    ///
    /// In the steady state the age of an online node has the density
    /// `P(S > a) / E[S]` for a session `S`: with Pareto sessions of
    /// minimum `xm` and shape 1.5 (`E[S] = 3 xm`), a third of the nodes are
    /// younger than `xm` (uniformly), and the rest have Pareto ages of
    /// shape 1/2: half are older than 34 minutes at a median session of
    /// 30, a quarter than 2.2 hours, a tenth than 14 hours. Before session
    /// 28 every node of the start had been up for at most 30 minutes: a
    /// network that had all joined within the last half hour, of which
    /// some 84% left within the hour. It lost about 1.4 times as many
    /// nodes an hour as the steady state does (1.06 times its size at a
    /// median of 30 minutes: 10,626 departures at 10^4, against 14,612).
    fn start_age_ms(&mut self) -> u64 {
        let Some(xm) = self.session_min_ms() else {
            return self.rng.next_u64() % WARM_START_MS;
        };
        // P(age > a) = 1 - a / (3 xm) up to xm, (2/3) (xm / a)^(1/2) beyond.
        let v = self.rng.unit().max(1e-12);
        let age = if v >= 2.0 / 3.0 {
            3.0 * xm * (1.0 - v)
        } else {
            xm * (2.0 / (3.0 * v)).powi(2)
        };
        age.min(MAX_AGE_MS as f64) as u64
    }

    /// Creates the node in slot `index`, up for `up_ms` already (a new
    /// identity each time).
    fn spawn(&mut self, index: u32, up_ms: u64) {
        // The node's protocol state (its timers' phases, a client's byte
        // budget) is as if it had started within the last 30 minutes: a
        // node up for hours has no timer left that it started at its
        // start, and its budget is spent as it goes.
        let phase_ms = up_ms % WARM_START_MS;
        let mut gen = if (index as usize) < self.shared.places.len() {
            self.gen(index) + 1
        } else {
            0
        };
        // Address 0 is nobody's.
        if self.shared.addrs.addr(index, gen) == 0 {
            gen += 1;
        }
        let addr = self.shared.addrs.addr(index, gen);
        let identity = self.rng.bytes();
        let nat = match &self.cfg.nat_mix {
            Some(mix) => crate::nat::NatKind::draw(mix, &mut self.rng),
            None => crate::nat::NatKind::Public,
        };
        let server = match self.cfg.nat_mix {
            Some(_) => nat.reachable(),
            None => self.rng.unit() >= self.cfg.client_fraction,
        };
        let seed = self.rng.next_u64();
        let started = self.now_d() - Duration::from_millis(phase_ms);
        let config = self.dht_cfg.clone();
        // The insecure scheme's nodes need no key pair: their identity
        // stands for a public key.
        let simulated = if self.cfg.key_pairs {
            None
        } else {
            Dht::with_simulated_identity(identity, config.clone(), server, seed, started)
        };
        let mut dht = match simulated {
            Some(dht) => dht,
            None => {
                let keypair = Keypair::from_seed(identity);
                Dht::with_shared_config(keypair, config, server, seed, started)
            }
        };
        if up_ms > 0 {
            // A node of the start runs its maintenance at a random time of
            // the period, as in a network that has been running, not with
            // every other node at the first instant.
            let period = self.dht_cfg.maintenance.as_millis().max(1) as u64;
            let at = self.now_d() + Duration::from_millis(self.rng.next_u64() % period);
            dht.seed_maintenance(at);
        }
        let u = self.rng.unit() as f32;
        let place = Place {
            id: dht.id(),
            server,
            nat,
        };
        let route = Route {
            addr,
            x: self.rng.unit() as f32,
            y: self.rng.unit() as f32,
            access_ms: 1.0 + 30.0 * u * u,
        };
        let slot = Slot {
            dht: Some(Box::new(dht)),
            timer_at: u64::MAX,
            timer_queued: u64::MAX,
            gen,
        };
        let part = &mut self.parts[index as usize % PARTITIONS];
        let shared = Arc::get_mut(&mut self.shared).expect("no window runs while a node spawns");
        if (index as usize) < shared.places.len() {
            shared.places[index as usize] = place;
            shared.routes[index as usize] = route;
            *part.slot(index) = slot;
            self.online_since[index as usize] = self.now;
        } else {
            debug_assert_eq!(index as usize, shared.places.len());
            shared.places.push(place);
            shared.routes.push(route);
            part.slots.push(slot);
            self.online_since.push(self.now);
        }
        if let Some(s) = self.session_left_ms(up_ms) {
            self.global
                .push(self.now + s.max(1000), Global::Leave { node: index, gen });
        }
    }

    /// Fills every routing table from the global sorted list of servers:
    /// each partition's tables with random numbers of its own, on a thread
    /// of its own if the run has them (the same tables either way). Built
    /// one after another they took 18 s of compute at 10^6 nodes, and
    /// their memory's first touch (the kernel zeroing 11 GB) as long again.
    fn build_tables(&mut self, threads: usize) {
        let mut servers: Vec<(NodeId, u32)> = self
            .shared
            .places
            .iter()
            .zip(&self.shared.routes)
            .filter(|(n, _)| n.server)
            .map(|(n, r)| (n.id, r.addr))
            .collect();
        servers.sort_unstable_by_key(|s| s.0);
        let seeds: Vec<u64> = self.parts.iter().map(|_| self.rng.next_u64()).collect();
        let build = TableBuild {
            servers: &servers,
            places: &self.shared.places,
            bucket_size: self.cfg.dht.bucket_size,
            refresh_ms: self.cfg.dht.bucket_refresh.as_millis().max(1) as u64,
            now: self.now_d(),
        };
        let jobs = self.parts.iter_mut().zip(seeds);
        if threads <= 1 {
            for (part, seed) in jobs {
                build.part(part, seed);
            }
            return;
        }
        std::thread::scope(|s| {
            for (part, seed) in jobs {
                let build = &build;
                s.spawn(move || build.part(part, seed));
            }
        });
    }

    fn random_online(&mut self, want_server: bool) -> Option<u32> {
        for _ in 0..64 {
            let i = self.rng.below(self.shared.places.len()) as u32;
            if self.online(i) && (!want_server || self.place(i).server) {
                return Some(i);
            }
        }
        None
    }

    /// Node `i`'s transmits, events and timer, between windows.
    fn flush(&mut self, i: u32) {
        let part = &mut self.parts[i as usize % PARTITIONS];
        part.now = self.now;
        part.flush(&self.shared, i);
    }

    /// Between windows: the datagrams each partition sent to another go
    /// to its inbox, and the queries that ended are counted.
    fn exchange(&mut self) {
        for from in 0..PARTITIONS {
            for to in 0..PARTITIONS {
                if from == to || self.parts[from].outbox[to].is_empty() {
                    continue;
                }
                let sent = std::mem::take(&mut self.parts[from].outbox[to]);
                debug_assert!(self.parts[to].inbox[from].is_empty());
                let drained = std::mem::replace(&mut self.parts[to].inbox[from], sent);
                self.parts[from].outbox[to] = drained;
            }
        }

        for p in 0..PARTITIONS {
            let mut done = std::mem::take(&mut self.parts[p].done);
            for d in done.drain(..) {
                self.on_event(d);
            }
            self.parts[p].done = done;
        }
    }

    fn on_event(&mut self, done: Done) {
        let Done {
            node: i,
            gen,
            at,
            event: e,
        } = done;
        let query = match &e {
            DhtEvent::LookupDone { query, .. }
            | DhtEvent::GetDone { query, .. }
            | DhtEvent::PutDone { query, .. } => *query,
        };
        let Some((pending, started)) = self.pending.remove(&(i, gen, query)) else {
            return;
        };
        let measure = at >= self.cfg.warmup.as_millis() as u64;
        match (pending, e) {
            (
                Pending::Lookup {
                    target,
                    target_node,
                    target_gen,
                },
                DhtEvent::LookupDone { closest, hops, .. },
            ) => {
                if self.gen(target_node) != target_gen || !self.online(target_node) {
                    return; // the target left meanwhile: not a fair question
                }
                if !measure {
                    return;
                }
                self.stats.lookups += 1;
                if closest.iter().any(|(id, _)| *id == target) {
                    self.stats.lookups_ok += 1;
                    self.stats.hops.push(u32::from(hops));
                    self.stats.latency.push(at - started);
                    if self.place(i).server {
                        self.stats.latency_servers.push(at - started);
                    } else {
                        self.stats.latency_clients.push(at - started);
                    }
                }
            }
            (Pending::Get { seq }, DhtEvent::GetDone { record, hops, .. }) => {
                self.stats.gets += 1;
                if record.is_some_and(|r| r.seq == seq) {
                    self.stats.gets_ok += 1;
                    self.stats.get_hops.push(u32::from(hops));
                    self.stats.get_latency.push(at - started);
                }
            }
            (Pending::Put, DhtEvent::PutDone { stored, .. }) => {
                self.stats.puts += 1;
                if stored > 0 {
                    self.stats.puts_ok += 1;
                }
            }
            (
                Pending::Connect {
                    target_node,
                    target_gen,
                },
                DhtEvent::GetDone { record, .. },
            ) => {
                if self.gen(target_node) != target_gen || !self.online(target_node) {
                    return;
                }
                self.stats.connects += 1;
                if record.is_some() {
                    let get_ms = at - started;
                    self.connect(i, target_node, get_ms);
                }
            }
            _ => {}
        }
    }

    /// A random online node looks up a random online node (a server if
    /// `server_target`); `pending` says what the answer is for.
    fn start_lookup(&mut self) {
        let (Some(from), Some(target_node)) = (self.random_online(false), self.random_online(true))
        else {
            return;
        };
        if from == target_node {
            return;
        }
        let target = self.place(target_node).id;
        let target_gen = self.gen(target_node);
        self.stats.introductions.lookups_started += 1;
        let pending = Pending::Lookup {
            target,
            target_node,
            target_gen,
        };
        self.query(from, pending, |dht, now| dht.lookup(now, target));
    }

    /// Starts a query on node `node` (it must be online) and tracks it as
    /// `pending` until its event.
    fn query(
        &mut self,
        node: u32,
        pending: Pending,
        start: impl FnOnce(&mut Dht<u32>, Duration) -> QueryId,
    ) {
        let now = self.now_d();
        let gen = self.gen(node);
        let q = start(self.dht_mut(node).expect("online"), now);
        self.pending.insert((node, gen, q), (pending, self.now));
        self.flush(node);
    }

    /// `owner` puts a record (signed with a fresh key, as a node puts its
    /// peer record on its own behalf) expiring in two hours; returns its key.
    fn put_record(&mut self, owner: u32, label: &[u8], value: &[u8], pending: Pending) -> NodeId {
        let record_kp = Keypair::from_seed(self.rng.bytes());
        let record = SignedRecord::sign_with(
            self.cfg.dht.signatures,
            &record_kp,
            label,
            self.now,
            EPOCH_S + self.now / 1000 + 7200,
            value,
        )
        .expect("small record");
        let key = record.key();
        self.query(owner, pending, |dht, now| dht.put(now, record));
        key
    }

    /// `from` gets the record at `key`.
    fn start_get(&mut self, from: u32, key: NodeId, pending: Pending) {
        self.query(from, pending, |dht, now| dht.get(now, key));
    }

    /// Node `a` connects to `b` (whose peer record it just fetched).
    fn connect(&mut self, a: u32, b: u32, lookup_ms: u64) {
        use crate::nat::{connect, Nat, Path, Rtts};
        // B's home: a reachable server (B's own record names it).
        let home = (0..64).find_map(|_| {
            let h = self.rng.below(self.shared.places.len()) as u32;
            let n = self.place(h);
            (self.online(h) && n.server && n.nat.reachable() && h != a && h != b).then_some(h)
        });
        let Some(h) = home else { return };
        let rtt = Rtts {
            ab: 2 * self.one_way_ms(a, b),
            ah: 2 * self.one_way_ms(a, h),
            hb: 2 * self.one_way_ms(h, b),
        };
        let (na, nb) = (self.place(a), self.place(b));
        let mut nat_a = Nat::new(na.nat, self.addr(a));
        let mut nat_b = Nat::new(nb.nat, self.addr(b));
        let h_addr = std::net::SocketAddr::from((self.addr(h).to_be_bytes(), 7447));
        let out = connect(&mut nat_a, &mut nat_b, h_addr, rtt, &mut self.rng);
        self.stats.connects_ok += 1;
        self.stats.connect_ms.push(lookup_ms + out.connect_ms);
        self.stats.connect_cached_ms.push(out.connect_ms);
        self.stats.signalling_bytes += u128::from(out.signalling_bytes);
        let slot = match out.path {
            Path::Direct => 0,
            Path::Punched => 1,
            Path::Upgraded => 2,
            Path::Relayed => 3,
        };
        self.stats.paths[slot] += 1;
        if matches!(out.path, Path::Upgraded | Path::Relayed) {
            *self.stats.relay_circuits.entry(h).or_default() += 1;
        }
    }

    fn account_bytes(&mut self, i: u32) {
        let server = self.place(i).server;
        let (now, since) = (self.now, self.online_since[i as usize]);
        if let Some(dht) = self.dht(i) {
            let counters = dht.counters().clone();
            let bytes = counters.bytes_sent;
            self.stats.proofs += counters.proofs_signed;
            let intro = &mut self.stats.introductions;
            intro.sent += counters.introductions_sent;
            intro.answered += counters.introductions_answered;
            intro.dropped += counters.introductions_dropped;
            intro.introduced += counters.introduced;
            self.stats.requests.add(&counters.requests);
            let secs = (now - since) as f64 / 1000.0;
            if server {
                self.stats.server_bytes += u128::from(bytes);
                self.stats.server_seconds += secs;
            } else {
                self.stats.client_bytes += u128::from(bytes);
                self.stats.client_seconds += secs;
            }
        }
    }

    /// Runs a global event, at the start of the window it falls in.
    fn step(&mut self, global: Global) {
        self.events += 1;
        match global {
            Global::Leave { node, gen } => {
                if self.gen(node) != gen {
                    return;
                }
                self.stats.departures += 1;
                self.account_bytes(node);
                self.parts[node as usize % PARTITIONS].slot(node).dht = None;
                self.spawn(node, 0);
                let now = self.now_d();
                // Through another node: one that bootstraps from itself
                // stays alone.
                let bootstrap = (0..8)
                    .filter_map(|_| self.random_online(true))
                    .find(|&b| b != node);
                if let Some(b) = bootstrap {
                    let baddr = self.addr(b);
                    if let Some(dht) = self.dht_mut(node) {
                        dht.add_bootstrap(now, baddr);
                    }
                }
                self.flush(node);
            }
            Global::Lookup => self.start_lookup(),
            Global::Put => {
                let Some(owner) = self.random_online(false) else {
                    return;
                };
                let seq = self.now;
                let key = self.put_record(owner, b"sim", &[0x42u8; 200], Pending::Put);
                self.global
                    .push(self.now + 60_000, Global::Get { key, seq, owner });
            }
            Global::Get { key, seq, owner } => {
                let Some(mut from) = self.random_online(false) else {
                    return;
                };
                if from == owner {
                    from = (from + 1) % self.shared.places.len() as u32;
                    if !self.online(from) {
                        return;
                    }
                }
                self.start_get(from, key, Pending::Get { seq });
            }
            Global::Connect => {
                // The target published its peer record (as every node does
                // at start); a minute later the initiator fetches it cold.
                let (Some(from), Some(to)) = (self.random_online(false), self.random_online(false))
                else {
                    return;
                };
                if from == to {
                    return;
                }
                let to_gen = self.gen(to);
                let key = self.put_record(to, b"peer", &[0x50u8; 80], Pending::PeerRecord);
                let get = Global::ConnectGet {
                    from,
                    to,
                    to_gen,
                    key,
                };
                self.global.push(self.now + 60_000, get);
            }
            Global::ConnectGet {
                from,
                to,
                to_gen,
                key,
            } => {
                if !self.online(from) {
                    return;
                }
                let pending = Pending::Connect {
                    target_node: to,
                    target_gen: to_gen,
                };
                self.start_get(from, key, pending);
            }
            Global::Progress => {
                if self.cfg.progress {
                    let total = self.cfg.duration.as_millis() as u64;
                    eprint!(
                        "\rsim: {:>5.1}% of {} simulated, {} events, {} lookups measured   ",
                        self.now as f64 / total as f64 * 100.0,
                        fmt_duration(self.cfg.duration),
                        self.all_events(),
                        self.stats.lookups
                    );
                }
                let step = (self.cfg.duration.as_millis() as u64 / 100).max(1000);
                self.global.push(self.now + step, Global::Progress);
            }
        }
    }
}

/// Bit `i` of `id`, from the most significant.
fn bit(id: &NodeId, i: usize) -> bool {
    id.0[i / 8] & (0x80 >> (i % 8)) != 0
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Bytes the allocator's heap has in use and free (glibc's `mallinfo2`;
/// the simulator runs on one thread, so one arena).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn allocator_heap() -> (usize, usize) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd, info.fordblks)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn allocator_heap() -> (usize, usize) {
    (0, 0)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Runs a simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    let wall = Instant::now();
    let mut rng = SplitMix64(cfg.seed);
    let parts = (0..PARTITIONS)
        .map(|p| Part::new(p, rng.next_u64()))
        .collect();
    let addrs = AddrPlan::new(cfg.nodes, (rng.next_u64() >> 32) as u32);
    let mut w = World {
        rng,
        cfg: cfg.clone(),
        dht_cfg: Arc::new(cfg.dht.clone()),
        now: 0,
        global: EventQueue::new(),
        shared: Arc::new(Shared {
            places: Vec::with_capacity(cfg.nodes),
            routes: Vec::with_capacity(cfg.nodes),
            addrs,
            loss: cfg.loss,
        }),
        parts,
        pending: FxHashMap::default(),
        stats: Stats::default(),
        events: 0,
        online_since: Vec::with_capacity(cfg.nodes),
    };
    for i in 0..cfg.nodes {
        let up_ms = w.start_age_ms();
        w.spawn(i as u32, up_ms);
    }
    if cfg.progress {
        eprintln!("sim: {} nodes created, building routing tables", cfg.nodes);
    }
    w.build_tables(cfg.threads());
    for i in 0..cfg.nodes as u32 {
        w.flush(i);
    }
    // The median RTT of this world, from random pairs.
    let mut rtts: Vec<u64> = (0..10_000)
        .map(|_| {
            let a = w.rng.below(cfg.nodes) as u32;
            let b = w.rng.below(cfg.nodes) as u32;
            2 * w.one_way_ms(a, b)
        })
        .collect();
    let rtt_p50 = percentile(&mut rtts, 0.5);
    let warm = cfg.warmup.as_millis() as u64;
    let end = cfg.duration.as_millis() as u64;
    let window = end.saturating_sub(warm + 90_000).max(1);
    for _ in 0..cfg.lookups {
        let at = warm + w.rng.next_u64() % window;
        w.global.push(at, Global::Lookup);
    }
    for _ in 0..cfg.records {
        let at = warm + w.rng.next_u64() % window;
        w.global.push(at, Global::Put);
    }
    if cfg.nat_mix.is_some() {
        for _ in 0..cfg.connects {
            let at = warm + w.rng.next_u64() % window;
            w.global.push(at, Global::Connect);
        }
    }
    w.global.push(0, Global::Progress);
    let setup_s = wall.elapsed().as_secs_f64();
    w.run_until(end, cfg.threads());
    let events_s = wall.elapsed().as_secs_f64() - setup_s;
    for i in 0..w.shared.places.len() as u32 {
        w.account_bytes(i);
    }
    if cfg.progress {
        eprintln!();
    }
    let memory_mb = SimMemory::of(&w);
    let events = w.all_events();
    let deliveries = w.parts.iter().map(|p| p.deliveries).sum();
    let timers = w.parts.iter().map(|p| p.timers).sum();
    let s = &mut w.stats;
    let per = |bytes: u128, secs: f64| if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
    SimReport {
        nodes: cfg.nodes,
        lookups: s.lookups,
        lookup_success_rate: if s.lookups > 0 {
            s.lookups_ok as f64 / s.lookups as f64
        } else {
            0.0
        },
        hops_mean: mean(&s.hops),
        hops_share: shares(&s.hops, HOPS_SHARE_LEN),
        hops_p50: percentile(&mut s.hops, 0.5),
        hops_p90: percentile(&mut s.hops, 0.9),
        hops_p99: percentile(&mut s.hops, 0.99),
        latency_ms_p50: percentile(&mut s.latency, 0.5),
        latency_ms_p90: percentile(&mut s.latency, 0.9),
        latency_ms_p99: percentile(&mut s.latency, 0.99),
        latency_ms_p50_servers: percentile(&mut s.latency_servers, 0.5),
        latency_ms_p50_clients: percentile(&mut s.latency_clients, 0.5),
        introductions: s.introductions,
        rtt_ms_p50: rtt_p50,
        put_success_rate: if s.puts > 0 {
            s.puts_ok as f64 / s.puts as f64
        } else {
            0.0
        },
        get_success_rate: if s.gets > 0 {
            s.gets_ok as f64 / s.gets as f64
        } else {
            0.0
        },
        get_hops_p50: percentile(&mut s.get_hops, 0.5),
        get_hops_p99: percentile(&mut s.get_hops, 0.99),
        get_latency_ms_p50: percentile(&mut s.get_latency, 0.5),
        get_latency_ms_p99: percentile(&mut s.get_latency, 0.99),
        maintenance_bytes_per_node_per_s: per(
            s.server_bytes + s.client_bytes,
            s.server_seconds + s.client_seconds,
        ),
        maintenance_bytes_per_server_per_s: per(s.server_bytes, s.server_seconds),
        maintenance_bytes_per_client_per_s: per(s.client_bytes, s.client_seconds),
        proofs_per_node_per_s: per(u128::from(s.proofs), s.server_seconds + s.client_seconds),
        requests_per_node_per_s: {
            let secs = s.server_seconds + s.client_seconds;
            let r = &s.requests;
            let rate = |n: u64| per(u128::from(n), secs);
            RequestRates {
                queries: rate(r.queries),
                stores: rate(r.stores),
                liveness: rate(r.liveness),
                verify: rate(r.verify),
                fill: rate(r.fill),
                refresh: rate(r.refresh),
            }
        },
        departures: s.departures,
        events,
        deliveries,
        timers,
        wall_s: wall.elapsed().as_secs_f64(),
        setup_s,
        events_s,
        peak_rss_mb: peak_rss_mb(),
        connects: s.connects,
        connect_success_rate: share(s.connects_ok, s.connects),
        direct_share: share(s.paths[0] + s.paths[1] + s.paths[2], s.connects_ok),
        relayed_share: share(s.paths[3], s.connects_ok),
        connect_ms_p50: percentile(&mut s.connect_ms, 0.5),
        connect_ms_p99: percentile(&mut s.connect_ms, 0.99),
        connect_cached_ms_p50: percentile(&mut s.connect_cached_ms, 0.5),
        connect_cached_ms_p99: percentile(&mut s.connect_cached_ms, 0.99),
        relay_circuits_per_relay_mean: if s.relay_circuits.is_empty() {
            0.0
        } else {
            s.relay_circuits.values().sum::<u64>() as f64 / s.relay_circuits.len() as f64
        },
        relay_circuits_max: s.relay_circuits.values().copied().max().unwrap_or(0),
        signalling_bytes_per_node_per_s: s.signalling_bytes as f64
            / (cfg.nodes as f64 * (end.saturating_sub(warm)) as f64 / 1000.0).max(1.0),
        memory_mb,
        seed: cfg.seed,
    }
}
