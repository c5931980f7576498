//! DHT behaviour in a small in-process network: real joins, instant
//! delivery, a virtual clock. Deterministic: every node's randomness comes
//! from its index.

use std::time::Duration;

use p2pos_proto::dht::{Dht, DhtConfig, DhtEvent, NodeId, SignedRecord, ID_BYTES};
use p2pos_proto::Keypair;

const T0: u64 = 1_800_000_000;

struct Net {
    nodes: Vec<Dht<u32>>,
    keys: Vec<Keypair>,
    alive: Vec<bool>,
    now: Duration,
}

fn addr(i: usize) -> u32 {
    ((i as u32 + 1) << 8) | 1
}

fn index(addr: u32) -> usize {
    (addr >> 8) as usize - 1
}

impl Net {
    fn new(n: usize, config: DhtConfig) -> Net {
        let now = Duration::from_secs(T0);
        let keys: Vec<Keypair> = (0..n)
            .map(|i| Keypair::from_seed(blake3::hash(&(i as u64).to_le_bytes()).into()))
            .collect();
        let nodes = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Dht::new(k.clone(), config.clone(), i as u64, now))
            .collect();
        let mut net = Net {
            nodes,
            keys,
            alive: vec![true; n],
            now,
        };
        // Every node joins through node 0, one after the other.
        for i in 1..n {
            net.nodes[i].add_bootstrap(now, addr(0));
            net.settle();
        }
        // Forget the join lookups' events.
        for node in &mut net.nodes {
            while node.poll_event().is_some() {}
        }
        net
    }

    /// Delivers every datagram until the network is quiet, firing timers
    /// when nothing else is left (virtual time jumps to them).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some((to, bytes)) = self.nodes[i].poll_transmit() {
                    moved = true;
                    let j = index(to);
                    if self.alive[i] && j < self.nodes.len() && self.alive[j] {
                        let now = self.now;
                        let _ = self.nodes[j].handle_datagram(now, addr(i), &bytes);
                    }
                }
            }
            if moved {
                continue;
            }
            // Quiet: fire the earliest pending request timeout, if any.
            let busy: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.alive[i] && self.nodes[i].lookups_in_progress() > 0)
                .collect();
            if busy.is_empty() {
                return;
            }
            self.now += Duration::from_millis(1100);
            for i in busy {
                let now = self.now;
                self.nodes[i].handle_timeout(now);
            }
        }
        panic!("network did not settle");
    }

    /// A node that has not joined yet; its index.
    fn add_node(&mut self, config: DhtConfig) -> usize {
        let i = self.nodes.len();
        let key = Keypair::from_seed([i as u8; 32]);
        self.nodes
            .push(Dht::new(key.clone(), config, i as u64, self.now));
        self.keys.push(key);
        self.alive.push(true);
        i
    }

    fn event(&mut self, i: usize) -> DhtEvent<u32> {
        self.settle();
        self.nodes[i].poll_event().expect("the query finished")
    }
}

fn config() -> DhtConfig {
    DhtConfig {
        k: 8,
        bucket_size: 8,
        ..DhtConfig::default()
    }
}

#[test]
fn every_node_finds_every_other_by_id() {
    let mut net = Net::new(60, config());
    for i in [5usize, 17, 42, 59] {
        for j in [0usize, 23, 58] {
            let target = net.nodes[j].id();
            let now = net.now;
            net.nodes[i].lookup(now, target);
            match net.event(i) {
                DhtEvent::LookupDone { closest, .. } => {
                    assert!(closest.iter().any(|(id, _)| *id == target), "{i} -> {j}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
    for n in &net.nodes {
        n.table().check_invariants().unwrap();
    }
}

#[test]
fn records_survive_the_loss_of_a_third_of_their_holders() {
    let mut net = Net::new(80, config());
    let now = net.now;
    let record = SignedRecord::sign(&net.keys[3], b"peer", 1, T0 + 3600, b"my addresses").unwrap();
    let key = record.key();
    net.nodes[3].put(now, record.clone());
    let stored = match net.event(3) {
        DhtEvent::PutDone { stored, .. } => stored,
        other => panic!("{other:?}"),
    };
    assert!(stored >= 6, "stored on {stored}");
    let holders: Vec<usize> = (0..net.nodes.len())
        .filter(|&i| net.nodes[i].records().get(&key, T0).is_some())
        .collect();
    for &h in holders.iter().take(holders.len() / 3) {
        if h != 3 && h != 70 {
            net.alive[h] = false;
        }
    }
    let now = net.now;
    net.nodes[70].get(now, key);
    match net.event(70) {
        DhtEvent::GetDone { record: got, .. } => assert_eq!(got, Some(record)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forged_and_older_records_do_not_replace_the_owners_newest() {
    let mut net = Net::new(50, config());
    let owner = net.keys[7].clone();
    let newest = SignedRecord::sign(&owner, b"peer", 5, T0 + 3600, b"seq 5").unwrap();
    let now = net.now;
    net.nodes[7].put(now, newest.clone());
    net.event(7);
    // An older record of the same owner, replayed by another node.
    let older = SignedRecord::sign(&owner, b"peer", 3, T0 + 3600, b"seq 3").unwrap();
    net.nodes[20].put(now, older);
    match net.event(20) {
        DhtEvent::PutDone { stored, .. } => assert_eq!(stored, 0),
        other => panic!("{other:?}"),
    }
    // A forged record: a higher sequence, not signed by the owner.
    let mut forged = SignedRecord::sign(&owner, b"peer", 9, T0 + 3600, b"seq 9").unwrap();
    forged.value = b"evil".to_vec();
    net.nodes[21].put(now, forged);
    match net.event(21) {
        DhtEvent::PutDone { stored, .. } => assert_eq!(stored, 0),
        other => panic!("{other:?}"),
    }
    net.nodes[30].get(now, newest.key());
    match net.event(30) {
        DhtEvent::GetDone { record, .. } => assert_eq!(record, Some(newest)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ids_cannot_be_spoofed_into_a_routing_table() {
    let mut net = Net::new(20, config());
    let victim = 4;
    let before = net.nodes[victim].table().len();
    // A response claiming to be a node that does not exist, for a txid the
    // victim never sent, from an address it never asked.
    let fake = p2pos_proto::dht::Response::<u32> {
        txid: 12345,
        responder: NodeId([0xab; ID_BYTES]),
        observed: addr(victim),
        cookie: 1,
        proof: Some((Keypair::from_seed([9; 32]).peer_id(), [0; 64])),
        body: p2pos_proto::dht::ResponseBody::Pong,
    };
    let now = net.now;
    net.nodes[victim]
        .handle_datagram(now, addr(999), &fake.encode())
        .unwrap();
    assert_eq!(net.nodes[victim].counters().unexpected_responses, 1);
    assert_eq!(net.nodes[victim].table().len(), before);
    assert!(net.nodes[victim]
        .table()
        .get(&NodeId([0xab; ID_BYTES]))
        .is_none());
}

#[test]
fn malformed_datagrams_are_counted_not_fatal() {
    let mut net = Net::new(5, config());
    let now = net.now;
    for len in 0..200usize {
        let junk: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let _ = net.nodes[1].handle_datagram(now, addr(3), &junk);
    }
    assert!(net.nodes[1].counters().malformed >= 190);
    // Still works.
    let target = net.nodes[4].id();
    net.nodes[1].lookup(now, target);
    assert!(matches!(net.event(1), DhtEvent::LookupDone { .. }));
}

#[test]
fn a_flood_of_ids_from_one_network_cannot_fill_a_bucket() {
    let mut net = Net::new(10, config());
    let victim_addr = addr(0);
    let now = net.now;
    // 60 attacking nodes with valid keys, all in 10.188.222.0/24.
    let mut attackers: Vec<(u32, Dht<u32>)> = (0..60u32)
        .map(|j| {
            let key = Keypair::from_seed(blake3::hash(&j.to_be_bytes()).into());
            let mut d = Dht::new(key, config(), u64::from(j), now);
            d.seed_contact(net.nodes[0].id(), victim_addr, now);
            (0x0abc_de00 | j, d)
        })
        .collect();
    for (_, d) in &mut attackers {
        d.lookup(now, NodeId([0x55; ID_BYTES]));
    }
    // Exchange datagrams between the victim and the attackers until quiet.
    for _ in 0..50 {
        let mut to_victim = Vec::new();
        for (a, d) in &mut attackers {
            while let Some((to, bytes)) = d.poll_transmit() {
                if to == victim_addr {
                    to_victim.push((*a, bytes));
                }
            }
        }
        for (from, bytes) in &to_victim {
            let _ = net.nodes[0].handle_datagram(now, *from, bytes);
        }
        let mut moved = !to_victim.is_empty();
        while let Some((to, bytes)) = net.nodes[0].poll_transmit() {
            if let Some((_, d)) = attackers.iter_mut().find(|(a, _)| *a == to) {
                let _ = d.handle_datagram(now, victim_addr, &bytes);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let table = net.nodes[0].table();
    table.check_invariants().unwrap();
    let from_flood = attackers
        .iter()
        .filter(|(_, d)| table.get(&d.id()).is_some())
        .count();
    // At most max_per_prefix (2) per bucket; IDs are spread over a few buckets.
    let buckets = table.bucket_count();
    assert!(
        from_flood <= 2 * buckets,
        "{from_flood} attackers in {buckets} buckets"
    );
    assert!(from_flood < 60 / 3, "{from_flood} of 60 attackers got in");
}

#[test]
fn a_server_that_turns_client_leaves_the_tables_it_was_in() {
    let mut net = Net::new(30, config());
    let leaver = 7usize;
    let id = net.nodes[leaver].id();
    let before = net
        .nodes
        .iter()
        .filter(|n| n.table().get(&id).is_some())
        .count();
    assert!(before > 0, "nobody knew the node to begin with");
    let now = net.now;
    net.nodes[leaver].set_server(now, false);
    net.settle();
    let after = net
        .nodes
        .iter()
        .filter(|n| n.table().get(&id).is_some())
        .count();
    assert_eq!(after, 0, "{after} of {before} tables still hold the node");
    let left: u64 = net.nodes.iter().map(|n| n.counters().contacts_left).sum();
    assert_eq!(left as usize, before);
    for n in &net.nodes {
        n.table().check_invariants().unwrap();
    }
}

#[test]
fn the_only_server_keeps_its_own_record_for_the_clients() {
    // A network's first reachable node is its only server: the record it
    // puts has no other server to live on, so it must hold it itself.
    let mut net = Net::new(3, config());
    let now = net.now;
    net.nodes[1].set_server(now, false);
    net.nodes[2].set_server(now, false);
    net.settle();
    assert_eq!(net.nodes[0].table().len(), 0, "clients left the table");
    let record = SignedRecord::sign(&net.keys[0], b"peer", 1, T0 + 3600, b"home here").unwrap();
    net.nodes[0].put(now, record.clone());
    net.event(0);
    net.nodes[2].get(now, record.key());
    match net.event(2) {
        DhtEvent::GetDone { record: got, .. } => assert_eq!(got, Some(record)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_server_that_turns_client_does_not_answer_its_gets_with_a_stale_copy() {
    // Every node serves at first (before its reachability verdict) and
    // stores the first version of a record; then all but node 0 turn
    // client, and the owner updates the record on the only server left.
    let mut net = Net::new(4, config());
    let now = net.now;
    let first = SignedRecord::sign(&net.keys[3], b"peer", 1, T0 + 3600, b"no home yet").unwrap();
    net.nodes[3].put(now, first.clone());
    net.event(3);
    assert!(net.nodes[1].records().get(&first.key(), T0).is_some());
    for i in 1..4 {
        net.nodes[i].set_server(now, false);
    }
    net.settle();
    assert!(
        net.nodes[1].records().is_empty(),
        "a client holds no records"
    );
    let second = SignedRecord::sign(&net.keys[3], b"peer", 2, T0 + 3600, b"home: 0").unwrap();
    net.nodes[3].put(now, second.clone());
    net.event(3);
    net.nodes[1].get(now, first.key());
    match net.event(1) {
        DhtEvent::GetDone { record: got, .. } => assert_eq!(got, Some(second)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_get_and_a_put_started_while_joining_wait_for_the_first_contact() {
    let mut net = Net::new(40, config());
    let now = net.now;
    let theirs = SignedRecord::sign(&net.keys[3], b"peer", 1, T0 + 3600, b"theirs").unwrap();
    net.nodes[3].put(now, theirs.clone());
    assert!(matches!(net.event(3), DhtEvent::PutDone { stored, .. } if stored >= 6));
    // A new node asks for both at once after `add_bootstrap`, before the
    // bootstrap node has answered.
    let new = net.add_node(config());
    let key = net.keys[new].clone();
    net.nodes[new].add_bootstrap(now, addr(0));
    net.nodes[new].get(now, theirs.key());
    let mine = SignedRecord::sign(&key, b"peer", 1, T0 + 3600, b"mine").unwrap();
    net.nodes[new].put(now, mine.clone());
    net.settle();
    let (mut got, mut stored) = (None, 0);
    while let Some(event) = net.nodes[new].poll_event() {
        match event {
            DhtEvent::GetDone { record, .. } => got = record,
            DhtEvent::PutDone { stored: n, .. } => stored = n,
            _ => {}
        }
    }
    assert_eq!(got, Some(theirs));
    assert!(stored >= 6, "stored on {stored}");
    let holders = (0..new).filter(|&i| net.nodes[i].records().get(&mine.key(), T0).is_some());
    assert!(holders.count() >= 6);
}

#[test]
fn a_node_that_lost_every_contact_joins_again_from_its_bootstrap() {
    let mut net = Net::new(30, config());
    let new = net.add_node(config());
    // The bootstrap node is away when the new node starts: its
    // verification ping and the retry go unanswered.
    net.alive[0] = false;
    let now = net.now;
    net.nodes[new].add_bootstrap(now, addr(0));
    net.settle();
    for _ in 0..3 {
        net.now += Duration::from_secs(2);
        let now = net.now;
        net.nodes[new].handle_timeout(now);
        net.settle();
    }
    assert!(net.nodes[new].table().is_empty());
    // It is back; at its next maintenance the node tries it again, and
    // joins.
    net.alive[0] = true;
    let due = net.nodes[new].poll_timeout().expect("maintenance");
    net.now = net.now.max(due);
    let now = net.now;
    net.nodes[new].handle_timeout(now);
    net.settle();
    assert!(
        net.nodes[new].table().len() >= 8,
        "{}",
        net.nodes[new].table().len()
    );
    let target = net.nodes[17].id();
    let now = net.now;
    net.nodes[new].lookup(now, target);
    loop {
        match net.event(new) {
            DhtEvent::LookupDone {
                closest, target: t, ..
            } if t == target => {
                assert!(closest.iter().any(|(id, _)| *id == target));
                break;
            }
            _ => continue,
        }
    }
}

#[test]
fn a_node_runs_its_maintenance_as_soon_as_it_has_joined() {
    let mut net = Net::new(30, config());
    let new = net.add_node(config());
    let start = net.now;
    net.nodes[new].add_bootstrap(start, addr(0));
    net.settle();
    assert_eq!(net.nodes[new].lookups_in_progress(), 0, "joined");
    // Its first run is due now, not a period or two after it started: it
    // refreshes the buckets far from its own ID at once.
    let due = net.nodes[new].poll_timeout().expect("maintenance");
    assert!(due <= net.now, "due {due:?}, now {:?}", net.now);
    let now = net.now;
    net.nodes[new].handle_timeout(now);
    let mut refreshes = 0;
    while let Some((to, bytes)) = net.nodes[new].poll_transmit() {
        refreshes += 1;
        let _ = net.nodes[index(to)].handle_datagram(now, addr(new), &bytes);
    }
    assert!(refreshes > 0, "the run refreshed no bucket");
    // Then every period from there, once what it sent is answered.
    net.settle();
    let next = net.nodes[new].poll_timeout().expect("maintenance");
    assert_eq!(next, now + config().maintenance);
}
