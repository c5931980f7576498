//! Two nodes whose routers cannot reach each other (a blocking rule on one
//! of them) connect by key through a relay, one of the target's homes.
//! When the rule is removed in the middle of a 100 MB stream, the session
//! moves to a direct path and the stream arrives byte-identical. Root only.

use std::time::{Duration, Instant};

use p2pos_lab::matrix::{
    ping_by_key, session_path, status, two_behind, wait_for as wait, TwoBehind,
};
use p2pos_lab::{RouterKind, RouterOptions};

#[test]
fn a_relayed_session_moves_to_a_direct_path_when_the_block_is_lifted() {
    let Some(mut lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    // The relays carry 4 MiB/s per circuit, so that the 100 MB stream is
    // still running when the block is lifted.
    let TwoBehind { servers, a, b } = two_behind(
        &mut lab,
        &p2pos,
        [RouterKind::PortRestricted, RouterKind::PortRestricted],
        RouterOptions::default(),
        "[relay]\ncircuit_kib_s = 4096\n",
    )
    .unwrap();
    let (ha, hb) = (a.host, b.host);
    let router_of = |h| lab.host(h).router.expect("behind a router");
    let (ra, rb) = (router_of(ha), router_of(hb));
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

    let (code, resp) = ping_by_key(&a, &b);
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
        let relayed_bytes: u64 = servers
            .iter()
            .map(|n| status(n)["relay"]["bytes_relayed"].as_u64().unwrap_or(0))
            .sum();
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
    let TwoBehind { a, b, .. } = two_behind(
        &mut lab,
        &p2pos,
        [RouterKind::PortRestricted, RouterKind::SymmetricRandom],
        RouterOptions::default(),
        "",
    )
    .unwrap();
    assert_eq!(status(&b)["nat"]["mapping"], "endpoint-dependent-random");
    let (code, resp) = ping_by_key(&a, &b);
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
    let (code, resp) = ping_by_key(&a, &b);
    assert_eq!(code, 200, "{resp}");
}
