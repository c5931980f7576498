//! The matrix runs real daemons in the lab and reports every pair, with the
//! cause of each failure.

use p2pos_lab::matrix::{self, MatrixOptions};
use p2pos_lab::RouterKind;

#[test]
fn matrix_reports_every_pair_with_causes() {
    let Some(lab) = p2pos_lab::lab_for_test() else {
        return;
    };
    drop(lab); // the matrix builds its own labs
    let p2pos = p2pos_lab::p2pos_next_to_tests();
    let kinds = vec![
        RouterKind::Public,
        RouterKind::PortRestricted,
        RouterKind::Upnp,
    ];
    let options = MatrixOptions {
        kinds: kinds.clone(),
        udp_timeout_s: 5,
        p2pos,
        idle_check: true,
        behind_nat: true,
    };
    let report = matrix::run(&options, &mut |_| {}).expect("matrix ran");
    assert_eq!(report.pairs.len(), 9);
    for p in &report.pairs {
        // Either connected with a path and a time, or a cause.
        if p.connected {
            assert!(p.path.is_some() && p.ttfb_ms.is_some(), "{p:?}");
            assert!(p.survived_idle.is_some(), "{p:?}");
        } else {
            assert!(p.error.as_deref().is_some_and(|e| !e.is_empty()), "{p:?}");
        }
    }
    assert_eq!(report.behind_nat.hosts, matrix::BEHIND_NAT_KINDS.len());
    assert_eq!(report.behind_nat.pairs, 7 * 6);
    // The network with no public host forms and every pair connects.
    assert_eq!(
        report.behind_nat.connected, report.behind_nat.pairs,
        "everyone behind NAT: {:?}",
        report.behind_nat.failures
    );
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "from_kind",
        "to_kind",
        "connected",
        "path",
        "ttfb_ms",
        "survived_idle",
        "error",
    ] {
        assert!(json["pairs"][0].get(key).is_some(), "missing {key}");
    }
    for key in ["hosts", "pairs", "connected", "direct"] {
        assert!(json["behind_nat"].get(key).is_some(), "missing {key}");
    }
    let table = matrix::render(&report, &kinds);
    assert!(table.contains("port-restricted"), "{table}");
}
