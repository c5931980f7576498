//! A node behind a NAT measures how long its router keeps idle bindings
//! and keeps its sessions alive at that rate: the interval it settles on is
//! at least 70% of the router's timeout, and idle sessions outlive two
//! timeouts. Router timeouts are scaled down to 15 s. Root only.

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{session_survived, start_node, status};
use p2pos_lab::{RouterKind, RouterOptions};

const TIMEOUT_S: u32 = 15;

#[test]
fn keepalive_follows_the_measured_binding_timeout_and_sessions_survive() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let router = lab
        .add_router(
            RouterKind::PortRestricted,
            RouterOptions {
                udp_timeout_s: TIMEOUT_S,
                ..RouterOptions::default()
            },
        )
        .unwrap();
    let ha = lab.add_host(router, "a").unwrap();
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let a = start_node(&mut lab, ha, 7447, &p2pos, &entry).unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    let settled = loop {
        let s = status(&a);
        if s["keepalive"]["source"] == "measured" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no measured keepalive within 180 s: {}",
            s["keepalive"]
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let interval = settled["keepalive_interval_s"].as_f64().unwrap();
    let timeout = f64::from(TIMEOUT_S);
    assert!(
        interval < timeout && interval >= 0.7 * timeout,
        "interval {interval} s for a {timeout} s router: {}",
        settled["keepalive"]
    );
    // The public nodes have no NAT: they leave keepalives to their peers.
    assert_eq!(status(&n1)["keepalive"]["source"], "no-nat");

    // Idle for two binding timeouts and more: the sessions with both public
    // nodes are still the same sessions.
    let idle = Duration::from_secs(2 * u64::from(TIMEOUT_S) + 3);
    std::thread::sleep(idle);
    for public in [&n1, &n2] {
        assert!(
            session_survived(&a, public, idle),
            "the session with {} did not survive {idle:?} idle: {}",
            public.peer_id,
            status(&a)["sessions"]
        );
    }
    let s = status(&a);
    assert!(s["keepalive"]["sent"].as_u64().unwrap_or(0) > 0);
    assert_eq!(s["keepalive"]["dead_sessions_closed"], 0);
}
