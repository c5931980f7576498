//! Two nodes behind port-restricted NATs connect by key: each keeps a home
//! (a reachable node), publishes it in its peer record, and the home
//! forwards the connect request so both sides punch at once. Root only.

use p2pos_lab::matrix::{api, status, two_behind, TwoBehind};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

#[test]
fn nodes_behind_port_restricted_nats_connect_by_key_through_a_home() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let TwoBehind { a, b, .. } = two_behind(
        &mut lab,
        &p2pos,
        [RouterKind::PortRestricted, RouterKind::PortRestricted],
        RouterOptions::default(),
        "",
    )
    .unwrap();
    let body = format!("{{\"peer\":\"{}\",\"count\":1}}", b.peer_id);
    let (code, resp) = api(&a.data_dir, "POST", "/v1/ping", Some(&body));
    assert_eq!(code, 200, "{resp}\n{}", status(&a));
    let pong: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(
        pong["path"],
        "punched",
        "{pong}\nA: {}\nB: {}",
        status(&a),
        status(&b)
    );
    let session = status(&b)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["peer"] == a.peer_id.as_str())
        .cloned()
        .expect("b holds the session");
    assert_eq!(session["path"], "punched", "{session}");
    assert!(
        status(&b)["counters"]["punches_received"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}

/// A host with a public address behind a stateful firewall is not
/// reachable: its firewall's state expires like a NAT binding, so it must
/// keep its sessions (to its homes above all) alive at the measured rate,
/// or nobody reaches it once it has been idle.
#[test]
fn a_host_behind_a_stateful_firewall_stays_reachable_through_its_home() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let routers = RouterOptions {
        udp_timeout_s: 8,
        ..RouterOptions::default()
    };
    let TwoBehind { a, b, .. } = two_behind(
        &mut lab,
        &p2pos,
        [RouterKind::PortRestricted, RouterKind::Firewall],
        routers,
        "",
    )
    .unwrap();
    assert_eq!(status(&b)["nat"]["mapping"], "none");
    assert_ne!(status(&b)["keepalive"]["source"], "no-nat");
    // Idle for more than two firewall timeouts, then connect by key.
    std::thread::sleep(std::time::Duration::from_secs(20));
    let body = format!("{{\"peer\":\"{}\",\"count\":1}}", b.peer_id);
    let (code, resp) = api(&a.data_dir, "POST", "/v1/ping", Some(&body));
    assert_eq!(code, 200, "{resp}\nA: {}\nB: {}", status(&a), status(&b));
}
