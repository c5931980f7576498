//! Devices on one LAN find each other by themselves (mDNS), connect by key
//! over the LAN, and see each other's services come and go.
//!
//! Root only (network namespaces): without root these print SKIPPED, under
//! CI they fail instead.

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{api, ping_by_key, start_node, start_node_with, LabNode};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

fn get(node: &LabNode, path: &str) -> Value {
    let (status, body) = api(&node.data_dir, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns
/// whether it held.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lan_peers(node: &LabNode) -> Vec<String> {
    get(node, "/v1/status")["lan"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["peer"].as_str().map(str::to_owned))
        .collect()
}

fn shows_service(node: &LabNode, owner: &LabNode, service: &str) -> bool {
    get(node, "/v1/peer-services?lan=true")
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["peer"] == owner.peer_id.as_str() && s["name"] == service)
}

fn ping(from: &LabNode, to: &LabNode) -> Value {
    let (status, resp) = ping_by_key(from, to);
    assert_eq!(status, 200, "ping by key failed: {resp}");
    serde_json::from_str(&resp).expect("JSON")
}

fn session_with<'a>(status: &'a Value, peer: &LabNode) -> Option<&'a Value> {
    status["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["peer"] == peer.peer_id.as_str())
}

#[test]
fn three_hosts_on_a_lan_without_uplink_form_a_network() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let switch = lab.add_switch().expect("switch");
    let hosts: Vec<_> = (0..3)
        .map(|i| lab.add_host(switch, &format!("dev{i}")).expect("host"))
        .collect();
    let mut nodes: Vec<LabNode> = hosts
        .iter()
        .map(|h| start_node(&mut lab, *h, 7447, &p2pos, &[]).expect("node"))
        .collect();
    // A guest of another (private) network on the same LAN.
    let guest_host = lab.add_host(switch, "guest").expect("host");
    let secret = lab.file("guest.secret");
    std::fs::write(&secret, "guest network secret, 32 bytes!!").unwrap();
    let secret_arg = secret.to_string_lossy().into_owned();
    let guest = start_node_with(
        &mut lab,
        guest_host,
        7447,
        &p2pos,
        &[],
        &["--network-secret", &secret_arg],
    )
    .expect("guest node");

    // Everyone finds everyone, with no bootstrap and no internet.
    for n in &nodes {
        assert!(
            within(Duration::from_secs(10), || lan_peers(n).len() == 2),
            "{} found only {:?}",
            n.peer_id,
            lan_peers(n)
        );
    }
    // The guest's network and the public one ignore each other.
    assert!(
        within(Duration::from_secs(10), || {
            get(&guest, "/v1/status")["lan"]["ignored_other_network"]
                .as_u64()
                .unwrap_or(0)
                >= 3
        }),
        "the guest did not see (and ignore) the others' announcements"
    );
    assert!(lan_peers(&guest).is_empty());
    for n in &nodes {
        assert!(!lan_peers(n).contains(&guest.peer_id));
    }
    // Every ordered pair connects by key, over the LAN.
    for a in &nodes {
        for b in &nodes {
            if a.peer_id != b.peer_id {
                let pong = ping(a, b);
                assert_eq!(pong["path"], "lan", "{pong}");
            }
        }
    }
    // The DHT formed among them: a lookup by key finds the record.
    assert!(
        within(Duration::from_secs(10), || {
            let body = format!("{{\"peer\":\"{}\"}}", nodes[2].peer_id);
            api(&nodes[0].data_dir, "POST", "/v1/lookup", Some(&body)).0 == 200
        }),
        "the LAN's DHT did not find node 2's record"
    );

    // A service registered on one node appears on the others within 5 s.
    let (status, body) = api(
        &nodes[0].data_dir,
        "PUT",
        "/v1/services/printer",
        Some(r#"{"description":"colour laser, 2nd floor"}"#),
    );
    assert_eq!(status, 201, "{body}");
    for n in &nodes[1..] {
        assert!(
            within(Duration::from_secs(5), || shows_service(
                n, &nodes[0], "printer"
            )),
            "the printer did not appear on {} within 5 s",
            n.peer_id
        );
    }
    let listed = get(&nodes[1], "/v1/peer-services");
    let printer = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "printer")
        .unwrap();
    assert_eq!(printer["description"], "colour laser, 2nd floor");
    assert_eq!(printer["lan"], true);
    // A hidden service is not shown.
    let (status, _) = api(
        &nodes[0].data_dir,
        "PUT",
        "/v1/services/diary",
        Some(r#"{"visibility":"hidden"}"#),
    );
    assert_eq!(status, 201);

    // Its node stops: the service disappears within 10 s.
    let child = nodes[0].child;
    lab.stop_child(child, Duration::from_secs(5));
    for n in &nodes[1..] {
        assert!(
            within(Duration::from_secs(10), || !shows_service(
                n, &nodes[0], "printer"
            )),
            "the printer did not disappear from {} within 10 s",
            n.peer_id
        );
        assert!(!shows_service(n, &nodes[0], "diary"));
    }
    // The node comes back: it reconnects by itself.
    p2pos_lab::matrix::restart_node(&mut lab, &mut nodes[0], &p2pos).expect("restart");
    let back = &nodes[0];
    for n in &nodes[1..] {
        assert!(
            within(Duration::from_secs(10), || session_with(
                &get(n, "/v1/status"),
                back
            )
            .is_some()),
            "{} did not reconnect to the restarted node",
            n.peer_id
        );
    }
}

#[test]
fn hosts_behind_one_home_router_talk_over_the_lan() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let public = lab.add_public_host("bootstrap").expect("public host");
    let router = lab
        .add_router(RouterKind::PortRestricted, RouterOptions::default())
        .expect("router");
    let a = lab.add_host(router, "laptop").expect("host");
    let b = lab.add_host(router, "tv").expect("host");
    let boot = start_node(&mut lab, public, 7447, &p2pos, &[]).expect("bootstrap node");
    let entry = vec![format!("{}@{}:7447", boot.peer_id, lab.host(public).ipv4)];
    let na = start_node(&mut lab, a, 7447, &p2pos, &entry).expect("node a");
    let nb = start_node(&mut lab, b, 7447, &p2pos, &entry).expect("node b");
    // Both also learn their public address from the bootstrap node.
    for n in [&na, &nb] {
        assert!(
            within(Duration::from_secs(10), || get(n, "/v1/status")["nat"]
                ["observed_addrs"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a.as_str().is_some_and(
                    |a| a.starts_with(&lab.router(router).public_ip.to_string())
                ))),
            "no observed public address"
        );
    }
    assert!(
        within(Duration::from_secs(10), || lan_peers(&na)
            == [nb.peer_id.clone()]),
        "a did not find b on the LAN"
    );
    let pong = ping(&na, &nb);
    assert_eq!(pong["path"], "lan", "{pong}");
    let status = get(&na, "/v1/status");
    let session = session_with(&status, &nb).expect("session with b");
    assert_eq!(session["path"], "lan", "{session}");
    let lan_prefix = {
        let o = lab.router(router).lan_net.octets();
        format!("{}.{}.{}.", o[0], o[1], o[2])
    };
    assert!(
        session["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&lan_prefix)),
        "{session}"
    );
}
