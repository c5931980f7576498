//! Nodes learn their NAT and reachability from peers only: observed
//! addresses classify the mapping, dial-backs through DHT peers the
//! filtering, and in `auto` mode the verdict makes a node a DHT server or a
//! client. Root only (network namespaces).

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{start_node, status, LabNode};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

/// Waits (up to `limit`) until `node` has a reachability verdict and its
/// mapping is classified; returns its status.
fn settled(node: &LabNode, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(node);
        if !s["reachable"].is_null() && s["nat"]["mapping"] != "unknown" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no verdict within {limit:?}: {}",
            serde_json::to_string_pretty(&s).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nodes_classify_their_nat_and_serve_the_dht_only_when_reachable() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let opts = RouterOptions::default();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let p3 = lab.add_public_host("p3").unwrap();
    let behind = |lab: &mut p2pos_lab::Lab, kind| {
        let r = lab.add_router(kind, opts).unwrap();
        lab.add_host(r, &format!("{kind}")).unwrap()
    };
    let port_restricted = behind(&mut lab, RouterKind::PortRestricted);
    let symmetric = behind(&mut lab, RouterKind::SymmetricRandom);

    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let n3 = start_node(&mut lab, p3, 7447, &p2pos, &entry).unwrap();
    let nr = start_node(&mut lab, port_restricted, 7447, &p2pos, &entry).unwrap();
    let ns = start_node(&mut lab, symmetric, 7447, &p2pos, &entry).unwrap();

    let limit = Duration::from_secs(60);
    for public in [&n1, &n2, &n3] {
        let s = settled(public, limit);
        assert_eq!(s["reachable"], true, "{}", s["nat"]);
        assert_eq!(s["nat"]["mapping"], "none", "{}", s["nat"]);
        assert_eq!(s["dht"]["server"], true);
    }
    let s = settled(&nr, limit);
    assert_eq!(s["reachable"], false, "{}", s["nat"]);
    assert_eq!(s["nat"]["mapping"], "endpoint-independent", "{}", s["nat"]);
    assert_eq!(
        s["nat"]["filtering"], "address-and-port-dependent",
        "{}",
        s["nat"]
    );
    assert_eq!(
        s["dht"]["server"], false,
        "an unreachable node must not serve"
    );
    let observed = s["nat"]["observed_addrs"][0].as_str().unwrap_or("");
    let router_ip = lab.router(p2pos_lab::RouterId(0)).public_ip.to_string();
    assert!(observed.starts_with(&router_ip), "{observed}");

    let s = settled(&ns, limit);
    assert_eq!(s["reachable"], false, "{}", s["nat"]);
    assert_eq!(
        s["nat"]["mapping"], "endpoint-dependent-random",
        "{}",
        s["nat"]
    );
    assert_eq!(s["dht"]["server"], false);

    // doctor explains it.
    let out = std::process::Command::new(&p2pos)
        .arg("--data-dir")
        .arg(&nr.data_dir)
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("only peers this node contacted"), "{text}");
}

#[test]
fn a_node_behind_carrier_grade_nat_finds_it_on_the_path_to_its_home() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let opts = RouterOptions::default();
    let public = lab.add_public_host("p").unwrap();
    let cgn = lab.add_router(RouterKind::Cgn, opts).unwrap();
    let behind_cgn = lab.add_host(cgn, "cgn").unwrap();
    let plain = lab.add_router(RouterKind::PortRestricted, opts).unwrap();
    let behind_plain = lab.add_host(plain, "pr").unwrap();
    let home = start_node(&mut lab, public, 7448, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7448", home.peer_id, lab.host(public).ipv4)];
    let nc = start_node(&mut lab, behind_cgn, 7448, &p2pos, &entry).unwrap();
    let np = start_node(&mut lab, behind_plain, 7448, &p2pos, &entry).unwrap();
    // The home router maps nothing and reports no external address, so
    // only the routers on the path to its home can tell.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&nc);
        if s["nat"]["cgn"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no carrier-NAT verdict: {}",
            serde_json::to_string_pretty(&s).unwrap()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let s = settled(&np, Duration::from_secs(60));
    assert_ne!(s["nat"]["cgn"], true, "{}", s["nat"]);
}
