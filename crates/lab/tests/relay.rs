//! Two nodes whose routers cannot reach each other (a blocking rule on one
//! of them) connect by key through a relay, one of the target's homes.
//! When the rule is removed in the middle of a 100 MB stream, the session
//! moves to a direct path and the stream arrives byte-identical. Root only.

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{api, start_node, start_node_with, status, wait_for as wait, LabNode};
use p2pos_lab::{RouterKind, RouterOptions};
use serde_json::Value;

fn session_path(n: &LabNode, peer: &LabNode) -> String {
    status(n)["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["peer"] == peer.peer_id.as_str())
        .and_then(|s| s["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn a_relayed_session_moves_to_a_direct_path_when_the_block_is_lifted() {
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
        (r, lab.add_host(r, name).unwrap())
    };
    let (ra, ha) = behind(&mut lab, "a");
    let (rb, hb) = behind(&mut lab, "b");
    // The relays carry 4 MiB/s per circuit, so that the 100 MB stream is
    // still running when the block is lifted.
    for p in [p1, p2] {
        let dir = lab.file(&format!("node-{}", p.0));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), "[relay]\ncircuit_kib_s = 4096\n").unwrap();
    }
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let _n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let client = ["--dht-client"];
    let a = start_node_with(&mut lab, ha, 7447, &p2pos, &entry, &client).unwrap();
    let b = start_node_with(&mut lab, hb, 7447, &p2pos, &entry, &client).unwrap();
    for n in [&a, &b] {
        wait(Duration::from_secs(60), "a home", || {
            let s = status(n);
            s["reachable"] == false && s["homes"].as_array().is_some_and(|h| !h.is_empty())
        });
    }
    let lookup = || {
        let body = format!("{{\"peer\":\"{}\"}}", b.peer_id);
        let (_, resp) = api(&a.data_dir, "POST", "/v1/lookup", Some(&body));
        serde_json::from_str::<Value>(&resp).unwrap_or_default()
    };
    wait(Duration::from_secs(30), "b's record with its homes", || {
        lookup()["homes"].as_array().is_some_and(|h| !h.is_empty())
    });

    // The block: a's router drops everything to and from b's router.
    let ra_ns = lab.router(ra).ns.clone();
    let rb_ip = lab.router(rb).public_ip;
    lab.sh(
        &ra_ns,
        &format!(
            "nft add table inet p2pblock && \
             nft add chain inet p2pblock gate '{{ type filter hook forward priority -10; }}' && \
             nft add rule inet p2pblock gate ip daddr {rb_ip} drop && \
             nft add rule inet p2pblock gate ip saddr {rb_ip} drop"
        ),
    )
    .unwrap();

    let body = format!("{{\"peer\":\"{}\",\"count\":1}}", b.peer_id);
    let (code, resp) = api(&a.data_dir, "POST", "/v1/ping", Some(&body));
    assert_eq!(code, 200, "{resp}\nA: {}\nB: {}", status(&a), status(&b));
    let path = session_path(&a, &b);
    assert!(
        path.starts_with("relayed:"),
        "{path}\nA: {}\nB: {}",
        status(&a),
        status(&b)
    );
    wait(Duration::from_secs(5), "b's side relayed", || {
        session_path(&b, &a) == path
    });

    // 100 MB from a to b over the relayed session.
    let payload = lab.file("payload");
    let received = lab.file("received");
    lab.sh(
        &lab.host(ha).ns,
        &format!(
            "head -c 100000000 /dev/urandom > {}",
            payload.to_string_lossy()
        ),
    )
    .unwrap();
    let p2pos_s = p2pos.to_string_lossy().into_owned();
    let listen = format!(
        "{p2pos_s} --data-dir {} listen bulk > {}",
        b.data_dir.to_string_lossy(),
        received.to_string_lossy()
    );
    let send = format!(
        "{p2pos_s} --data-dir {} connect {} bulk < {} > /dev/null",
        a.data_dir.to_string_lossy(),
        b.peer_id,
        payload.to_string_lossy()
    );
    let (hb_ns, ha_ns) = (lab.host(hb).ns.clone(), lab.host(ha).ns.clone());
    let started = Instant::now();
    let moved_after = std::thread::scope(|s| {
        let lab = &lab;
        let listener = s.spawn(|| lab.sh(&hb_ns, &listen));
        std::thread::sleep(Duration::from_millis(500));
        let sender = s.spawn(|| lab.sh(&ha_ns, &send));
        // Lift the block while the stream runs through the relay.
        std::thread::sleep(Duration::from_secs(3));
        let relayed_bytes = status(&n1)["relay"]["bytes_relayed"].as_u64().unwrap_or(0)
            + status(&_n2)["relay"]["bytes_relayed"].as_u64().unwrap_or(0);
        assert!(
            relayed_bytes > 1_000_000,
            "the stream is not going through the relay: {relayed_bytes} bytes relayed"
        );
        lab.sh(&ra_ns, "nft delete table inet p2pblock").unwrap();
        let lifted = Instant::now();
        wait(Duration::from_secs(30), "a direct path", || {
            session_path(&a, &b) == "punched" && session_path(&b, &a) == "punched"
        });
        let moved_after = lifted.elapsed();
        sender.join().unwrap().unwrap();
        listener.join().unwrap().unwrap();
        moved_after
    });
    eprintln!(
        "moved to a direct path {:.1}s after the block was lifted; 100 MB in {:.1}s",
        moved_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let hash = |p: &std::path::Path| {
        let out = std::process::Command::new("sha256sum")
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        std::fs::metadata(&received).map(|m| m.len()).unwrap_or(0),
        100_000_000
    );
    assert_eq!(hash(&payload), hash(&received), "the stream was corrupted");
    assert!(status(&a)["relay"]["upgraded_to_direct"].as_u64() >= Some(1));
}

#[test]
fn a_symmetric_nat_and_a_port_restricted_one_end_up_direct_by_many_ports() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let p1 = lab.add_public_host("p1").unwrap();
    let p2 = lab.add_public_host("p2").unwrap();
    let mut behind = |kind: RouterKind, name: &str| {
        let r = lab.add_router(kind, RouterOptions::default()).unwrap();
        lab.add_host(r, name).unwrap()
    };
    let ha = behind(RouterKind::PortRestricted, "a");
    let hb = behind(RouterKind::SymmetricRandom, "b");
    let n1 = start_node(&mut lab, p1, 7447, &p2pos, &[]).unwrap();
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    // Two servers: the mapping is judged from what several peers see.
    let _n2 = start_node(&mut lab, p2, 7447, &p2pos, &entry).unwrap();
    let client = ["--dht-client"];
    let a = start_node_with(&mut lab, ha, 7447, &p2pos, &entry, &client).unwrap();
    let b = start_node_with(&mut lab, hb, 7447, &p2pos, &entry, &client).unwrap();
    for n in [&a, &b] {
        wait(Duration::from_secs(60), "a home and a NAT verdict", || {
            let s = status(n);
            s["homes"].as_array().is_some_and(|h| !h.is_empty()) && s["nat"]["mapping"] != "unknown"
        });
    }
    assert_eq!(status(&b)["nat"]["mapping"], "endpoint-dependent-random");
    wait(Duration::from_secs(30), "b's record with its homes", || {
        let body = format!("{{\"peer\":\"{}\"}}", b.peer_id);
        let (_, resp) = api(&a.data_dir, "POST", "/v1/lookup", Some(&body));
        serde_json::from_str::<Value>(&resp).unwrap_or_default()["homes"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    });
    let body = format!("{{\"peer\":\"{}\",\"count\":1}}", b.peer_id);
    let (code, resp) = api(&a.data_dir, "POST", "/v1/ping", Some(&body));
    assert_eq!(code, 200, "{resp}\nA: {}\nB: {}", status(&a), status(&b));
    let started = Instant::now();
    wait(
        Duration::from_secs(30),
        "a direct path on both ends",
        || session_path(&a, &b) == "punched" && session_path(&b, &a) == "punched",
    );
    let moved = std::fs::read_to_string(b.data_dir.join("daemon.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("moved to a direct path"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    eprintln!(
        "direct {:.1}s after the session started; b: {moved:?}",
        started.elapsed().as_secs_f64()
    );
    // The session works on its new path.
    let (code, resp) = api(&a.data_dir, "POST", "/v1/ping", Some(&body));
    assert_eq!(code, 200, "{resp}");
}
