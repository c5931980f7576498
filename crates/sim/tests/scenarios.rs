//! Scenario tests: the real DHT state machines in the simulated world, with
//! fixed seeds. A failing scenario prints its seed and the whole report.

use std::time::Duration;

use p2pos_sim::{run, SimConfig, SimReport};

fn sim(
    nodes: usize,
    minutes: u64,
    churn_minutes: Option<u64>,
    lookups: usize,
    records: usize,
    seed: u64,
) -> SimReport {
    let cfg = SimConfig {
        nodes,
        duration: Duration::from_secs(minutes * 60),
        median_session: churn_minutes.map(|m| Duration::from_secs(m * 60)),
        lookups,
        records,
        seed,
        warmup: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let report = run(&cfg);
    eprintln!("seed {seed}: {}", serde_json::to_string(&report).unwrap());
    report
}

#[test]
fn lookups_converge_without_churn() {
    let r = sim(2000, 6, None, 500, 50, 7);
    assert!(r.lookups >= 450, "seed 7: {r:?}");
    assert!(r.lookup_success_rate >= 0.99, "seed 7: {r:?}");
    assert!(r.hops_p99 <= 6, "seed 7: {r:?}");
    assert!(
        r.put_success_rate >= 0.99 && r.get_success_rate >= 0.99,
        "seed 7: {r:?}"
    );
}

#[test]
fn same_seed_same_numbers() {
    let a = sim(500, 4, Some(10), 100, 10, 3);
    let b = sim(500, 4, Some(10), 100, 10, 3);
    assert_eq!(strip(a), strip(b));
}

/// The figures without what depends on the machine.
fn strip(r: SimReport) -> SimReport {
    SimReport {
        wall_s: 0.0,
        setup_s: 0.0,
        events_s: 0.0,
        peak_rss_mb: 0.0,
        memory_mb: Default::default(),
        ..r
    }
}

#[test]
fn two_threads_give_the_numbers_of_one() {
    let with = |threads| {
        let cfg = SimConfig {
            nodes: 1500,
            duration: Duration::from_secs(240),
            median_session: Some(Duration::from_secs(600)),
            lookups: 200,
            records: 20,
            seed: 13,
            warmup: Duration::from_secs(60),
            threads,
            ..SimConfig::default()
        };
        strip(run(&cfg))
    };
    let one = with(1);
    assert!(one.departures > 0 && one.lookups > 150, "seed 13: {one:?}");
    assert_eq!(one, with(2), "seed 13");
}

#[test]
fn the_simulated_signatures_give_the_same_numbers_as_ed25519() {
    use p2pos_proto::dht::{DhtConfig, Signatures};
    let with = |signatures| {
        let cfg = SimConfig {
            nodes: 400,
            duration: Duration::from_secs(12 * 60),
            median_session: Some(Duration::from_secs(8 * 60)),
            lookups: 100,
            records: 20,
            seed: 5,
            warmup: Duration::from_secs(60),
            dht: DhtConfig {
                signatures,
                ..DhtConfig::default()
            },
            key_pairs: true,
            ..SimConfig::default()
        };
        strip(run(&cfg))
    };
    let real = with(Signatures::Ed25519);
    assert!(
        real.departures > 0 && real.put_success_rate > 0.9,
        "seed 5: {real:?}"
    );
    assert_eq!(real, with(Signatures::SimulatedInsecure), "seed 5");
}

#[test]
fn lookups_and_records_hold_up_under_churn() {
    // Median session 10 minutes over 20 minutes: most nodes are replaced.
    let r = sim(2000, 20, Some(10), 600, 60, 11);
    assert!(r.departures > 1000, "seed 11: {r:?}");
    assert!(r.lookup_success_rate >= 0.98, "seed 11: {r:?}");
    assert!(r.get_success_rate >= 0.95, "seed 11: {r:?}");
}

#[test]
fn connections_through_a_realistic_mix_of_nats() {
    let seed = 5;
    let cfg = SimConfig {
        nodes: 2000,
        duration: Duration::from_secs(5 * 60),
        lookups: 100,
        records: 0,
        seed,
        warmup: Duration::from_secs(60),
        nat_mix: Some(p2pos_sim::nat::REALISTIC_MIX.to_vec()),
        connects: 2000,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("seed {seed}: {}", serde_json::to_string(&r).unwrap());
    assert!(r.connects >= 1900, "seed {seed}: {r:?}");
    assert!(r.connect_success_rate >= 0.999, "seed {seed}: {r:?}");
    // Only two per-destination NATs stay relayed: about 0.2² of pairs.
    assert!(r.direct_share >= 0.93, "seed {seed}: {r:?}");
    assert!(r.relayed_share > 0.0, "seed {seed}: {r:?}");
    assert!(r.relay_circuits_max >= 1, "seed {seed}: {r:?}");
    // Same seed, same numbers.
    let again = run(&cfg);
    assert_eq!(
        (
            again.direct_share,
            again.connect_ms_p50,
            again.signalling_bytes_per_node_per_s
        ),
        (
            r.direct_share,
            r.connect_ms_p50,
            r.signalling_bytes_per_node_per_s
        )
    );
}
