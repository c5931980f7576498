//! Two nodes behind port-restricted NATs connect by key: each keeps a home
//! (a reachable node), publishes it in its peer record, and the home
//! forwards the connect request so both sides punch at once. Root only.

use p2pos_lab::matrix::{api, status, two_behind, TwoBehind};
use p2pos_lab::RouterKind;
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
