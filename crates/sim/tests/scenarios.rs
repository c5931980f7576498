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
    let strip = |r: SimReport| SimReport {
        wall_s: 0.0,
        peak_rss_mb: 0.0,
        ..r
    };
    assert_eq!(strip(a), strip(b));
}

#[test]
fn lookups_and_records_hold_up_under_churn() {
    // Median session 10 minutes over 20 minutes: most nodes are replaced.
    let r = sim(2000, 20, Some(10), 600, 60, 11);
    assert!(r.departures > 1000, "seed 11: {r:?}");
    assert!(r.lookup_success_rate >= 0.98, "seed 11: {r:?}");
    assert!(r.get_success_rate >= 0.95, "seed 11: {r:?}");
}
