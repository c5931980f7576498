//! Two nodes behind port-restricted NATs connect by key: each keeps a home
//! (a reachable node), publishes it in its peer record, and the home
//! forwards the connect request so both sides punch at once. Root only.

use std::time::Duration;

use p2pos_lab::matrix::{api, start_node, start_node_with, status, wait_for as wait, LabNode};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

fn lookup(from: &LabNode, peer: &LabNode) -> Value {
    let body = format!("{{\"peer\":\"{}\"}}", peer.peer_id);
    let (_, resp) = api(&from.data_dir, "POST", "/v1/lookup", Some(&body));
    serde_json::from_str(&resp).unwrap_or_default()
}

#[test]
fn nodes_behind_port_restricted_nats_connect_by_key_through_a_home() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let behind = |lab: &mut p2pos_lab::Lab, name: &str| {
        let r = lab
            .add_router(RouterKind::PortRestricted, RouterOptions::default())
            .unwrap();
        lab.add_host(r, name).unwrap()
    };
    let ha = behind(&mut lab, "a");
    let hb = behind(&mut lab, "b");
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let _n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    // DHT clients from the start: in a network this small, two DHT servers
    // would exchange DHT traffic and so open each other's NATs by chance;
    // clients only talk to servers, as two random nodes of a large network.
    let client = ["--dht-client"];
    let a = start_node_with(&mut lab, ha, 7447, &p2pos, &entry, &client).unwrap();
    let b = start_node_with(&mut lab, hb, 7447, &p2pos, &entry, &client).unwrap();

    for n in [&a, &b] {
        wait(Duration::from_secs(60), "a home", || {
            let s = status(n);
            s["reachable"] == false && s["homes"].as_array().is_some_and(|h| !h.is_empty())
        });
    }
    wait(Duration::from_secs(30), "b's record with its homes", || {
        lookup(&a, &b)["homes"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    });
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
