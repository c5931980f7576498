//! A node behind a router that speaks PCP / NAT-PMP, or only UPnP IGD
//! (miniupnpd), gets its port mapped, publishes the mapped address, is
//! found reachable, serves the DHT, and deletes the mapping when it stops.
//! Root only.

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{api, start_node, status, wait_for as wait};
use p2pos_lab::router::{UPNP_NAT_CHAIN, UPNP_TABLE};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

#[test]
fn a_node_mapped_by_pcp_or_nat_pmp_is_reachable_and_removes_its_mapping_on_stop() {
    mapped_node_is_reachable(RouterOptions::default(), &["pcp", "nat-pmp"]);
}

#[test]
fn a_node_mapped_by_upnp_igd_is_reachable_and_removes_its_mapping_on_stop() {
    let igd_only = RouterOptions {
        igd_only: true,
        ..RouterOptions::default()
    };
    mapped_node_is_reachable(igd_only, &["upnp-igd"]);
}

fn mapped_node_is_reachable(options: RouterOptions, protocols: &[&str]) {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let p3 = lab.add_public_host("p3").unwrap();
    let router = lab.add_router(RouterKind::Upnp, options).unwrap();
    let ha = lab.add_host(router, "a").unwrap();
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let _n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let _n3 = start_node(&mut lab, p3, 7447, &p2pos, &entry).unwrap();
    // miniupnpd may take a moment to listen.
    std::thread::sleep(Duration::from_millis(500));
    let a = start_node(&mut lab, ha, 7447, &p2pos, &entry).unwrap();

    wait(Duration::from_secs(30), "a port mapping", || {
        status(&a)["port_mapping"]["state"] == "mapped"
    });
    let s = status(&a);
    let pm = &s["port_mapping"];
    let public_ip = lab.router(router).public_ip.to_string();
    assert!(
        pm["external"]
            .as_str()
            .unwrap_or("")
            .starts_with(&public_ip),
        "{pm}"
    );
    assert!(
        protocols.contains(&pm["protocol"].as_str().unwrap_or("")),
        "{pm}"
    );
    let rules = |lab: &p2pos_lab::Lab| {
        let out = lab
            .sh(
                &lab.router(router).ns,
                &format!("nft list chain inet {UPNP_TABLE} {UPNP_NAT_CHAIN}"),
            )
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = rules(&lab);
    assert!(before.contains("7447"), "no mapping rule: {before}");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&a);
        if s["reachable"] == true && s["dht"]["server"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reachable verdict within 60 s: {}",
            s["nat"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its record leads with the mapped address.
    let body = format!("{{\"peer\":\"{}\"}}", a.peer_id);
    wait(
        Duration::from_secs(30),
        "the mapped address in the record",
        || {
            let (_, resp) = api(&n1.data_dir, "POST", "/v1/lookup", Some(&body));
            let v: Value = serde_json::from_str(&resp).unwrap_or_default();
            v["addrs"][0] == pm["external"]
        },
    );

    lab.stop_child(a.child, Duration::from_secs(5));
    let after = rules(&lab);
    assert!(
        !after.contains("7447"),
        "the mapping outlived the node: {after}"
    );
}
