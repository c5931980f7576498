//! Two nodes behind port-restricted NATs connect by key: each keeps a home
//! (a reachable node), publishes it in its peer record, and the home
//! forwards the connect request so both sides punch at once. Root only.

use std::time::Duration;

use p2pos_lab::matrix::{
    lookup, ping_by_key, session_with, start_node, start_node_with, status, two_behind, wait_for,
    TwoBehind,
};
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
    let (code, resp) = ping_by_key(&a, &b);
    assert_eq!(code, 200, "{resp}\n{}", status(&a));
    let pong: Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(
        pong["path"],
        "punched",
        "{pong}\nA: {}\nB: {}",
        status(&a),
        status(&b)
    );
    let session = session_with(&b, &a);
    assert_eq!(session["path"], "punched", "{session}");
    // Punch datagrams cross both NATs. Not necessarily before the ping
    // returns: B punches on the introduction, and A's direct dial may get
    // through the hole B's first punch opened before A's own NAT lets B's
    // punches in (A then never punches, its signalling being dropped once
    // the dial wins). B's later rounds, 40 ms apart, reach A once the
    // session has opened A's NAT.
    let punches = |n| {
        status(n)["counters"]["punches_received"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_for(
        Duration::from_secs(3),
        "punch datagram received on either side",
        || punches(&a) + punches(&b) > 0,
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
    std::thread::sleep(Duration::from_secs(20));
    let (code, resp) = ping_by_key(&a, &b);
    assert_eq!(code, 200, "{resp}\nA: {}\nB: {}", status(&a), status(&b));
}

/// Two hosts with IPv6 behind stateful firewalls (dual-stack nodes)
/// connect by key by punching, and the session runs over IPv6.
#[test]
fn hosts_behind_stateful_ipv6_firewalls_punch_over_ipv6() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let mut firewalled = |name: &str| {
        let r = lab
            .add_router(RouterKind::Firewall, RouterOptions::default())
            .unwrap();
        lab.add_host(r, name).unwrap()
    };
    let (ha, hb) = (firewalled("a"), firewalled("b"));
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let _n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let dual = ["--dht-client", "--listen", "[::]:7447"];
    let a = start_node_with(&mut lab, ha, 7447, &p2pos, &entry, &dual).unwrap();
    let b = start_node_with(&mut lab, hb, 7447, &p2pos, &entry, &dual).unwrap();
    let b_v6 = lab
        .host(hb)
        .ipv6
        .expect("firewall hosts have IPv6")
        .to_string();
    for n in [&a, &b] {
        wait_for(Duration::from_secs(60), "a home", || {
            let s = status(n);
            s["reachable"] == false && s["homes"].as_array().is_some_and(|h| !h.is_empty())
        });
    }
    wait_for(
        Duration::from_secs(30),
        "b's record with its IPv6 address",
        || {
            let r = lookup(&a, &b);
            r["homes"].as_array().is_some_and(|h| !h.is_empty())
                && r["addrs"]
                    .as_array()
                    .is_some_and(|x| x.iter().any(|x| x.as_str().unwrap_or("").contains(&b_v6)))
        },
    );
    let (code, resp) = ping_by_key(&a, &b);
    assert_eq!(code, 200, "{resp}\nA: {}\nB: {}", status(&a), status(&b));
    let session = session_with(&a, &b);
    assert_eq!(session["path"], "punched", "{session}");
    assert!(
        session["remote_addr"]
            .as_str()
            .unwrap_or("")
            .contains(&b_v6),
        "not over IPv6: {session}"
    );
}
