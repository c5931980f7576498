//! `p2pos-lab keepalive-bench`: how many keepalives an idle node behind a
//! NAT sends once it has measured its router's binding timeout, against a
//! fixed 25 s keepalive (WireGuard's; libp2p uses 15 s) on the same
//! sessions.
//!
//! Two public nodes and one node behind a port-restricted router whose
//! binding timeout is `--udp-timeout`; the NATed node keeps sessions with
//! both (its homes). After it has measured, its keepalives are counted over
//! an idle window, and the sessions must still be the same ones at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::matrix::{api, session_survived, start_node, LabNode};
use crate::{Lab, LabError, RouterKind, RouterOptions};

/// What to run.
#[derive(Debug, Clone)]
pub struct KeepaliveBenchOptions {
    /// The router's binding timeout (s).
    pub udp_timeout_s: u32,
    /// The idle window over which keepalives are counted.
    pub idle: Duration,
    /// The p2pos binary.
    pub p2pos: PathBuf,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct KeepaliveBenchReport {
    /// The router's binding timeout (s).
    pub router_timeout_s: u32,
    /// The interval the node settled on (s).
    pub interval_s: f64,
    /// Interval as a share of the router's timeout.
    pub interval_share_of_timeout: f64,
    /// Time from start to a measured interval (s).
    pub measure_s: f64,
    /// Sessions kept alive.
    pub sessions: usize,
    /// Keepalives sent per hour on those sessions, counted.
    pub keepalives_per_hour: f64,
    /// The same sessions with a fixed 25 s keepalive.
    pub fixed_25s_per_hour: f64,
    /// How many times fewer.
    pub reduction: f64,
    /// Whether every session outlived the idle window.
    pub sessions_survived: bool,
}

fn status(node: &LabNode) -> serde_json::Value {
    let (_, body) = api(&node.data_dir, "GET", "/v1/status", None);
    serde_json::from_str(&body).unwrap_or_default()
}

/// Runs the benchmark.
pub fn run(
    options: &KeepaliveBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<KeepaliveBenchReport, LabError> {
    let mut lab = Lab::new()?;
    let p1 = lab.add_public_host("p1")?;
    let p2 = lab.add_public_host("p2")?;
    let router = lab.add_router(
        RouterKind::PortRestricted,
        RouterOptions {
            udp_timeout_s: options.udp_timeout_s,
            ..RouterOptions::default()
        },
    )?;
    let ha = lab.add_host(router, "a")?;
    let n1 = start_node(&mut lab, p1, 7447, &options.p2pos, &[])?;
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let n2 = start_node(&mut lab, p2, 7447, &options.p2pos, &entry)?;
    let a = start_node(&mut lab, ha, 7447, &options.p2pos, &entry)?;
    let start = Instant::now();
    let limit = Duration::from_secs(3600);
    progress("waiting for the NATed node to measure its router's binding timeout");
    let mut last = String::new();
    let settled = loop {
        let s = status(&a);
        let k = &s["keepalive"];
        let line = format!(
            "round {}: alive {} s, dead {} s, interval {} s ({})",
            k["rounds"],
            k["binding_alive_s"],
            k["binding_dead_s"],
            s["keepalive_interval_s"],
            k["source"]
        );
        if line != last {
            progress(&line);
            last = line;
        }
        if k["source"] == "measured" {
            break s;
        }
        if start.elapsed() > limit {
            return Err(LabError::Command {
                command: "keepalive-bench".into(),
                stderr: format!("no measured interval within {limit:?}: {k}"),
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let measure_s = start.elapsed().as_secs_f64();
    let interval_s = settled["keepalive_interval_s"].as_f64().unwrap_or(0.0);
    let sessions = settled["sessions"].as_array().map_or(0, Vec::len);
    let sent_before = settled["keepalive"]["sent"].as_u64().unwrap_or(0);
    progress(&format!(
        "counting keepalives over {} s of idle",
        options.idle.as_secs()
    ));
    std::thread::sleep(options.idle);
    let after = status(&a);
    let sent = after["keepalive"]["sent"].as_u64().unwrap_or(0) - sent_before;
    let hours = options.idle.as_secs_f64() / 3600.0;
    let keepalives_per_hour = sent as f64 / hours;
    let fixed_25s_per_hour = sessions as f64 * 3600.0 / 25.0;
    let sessions_survived = [&n1, &n2]
        .iter()
        .all(|p| session_survived(&a, p, options.idle));
    Ok(KeepaliveBenchReport {
        router_timeout_s: options.udp_timeout_s,
        interval_s,
        interval_share_of_timeout: interval_s / f64::from(options.udp_timeout_s),
        measure_s,
        sessions,
        keepalives_per_hour,
        fixed_25s_per_hour,
        reduction: fixed_25s_per_hour / keepalives_per_hour.max(1e-9),
        sessions_survived,
    })
}

/// The report as text.
pub fn render(r: &KeepaliveBenchReport) -> String {
    format!(
        "router binding timeout {} s → interval {:.1} s ({:.0}% of it), measured in {:.0} s\n\
         {} idle sessions: {:.1} keepalives/hour vs {:.0} with a fixed 25 s keepalive ({:.1}× fewer); sessions survived: {}\n",
        r.router_timeout_s,
        r.interval_s,
        r.interval_share_of_timeout * 100.0,
        r.measure_s,
        r.sessions,
        r.keepalives_per_hour,
        r.fixed_25s_per_hour,
        r.reduction,
        r.sessions_survived
    )
}
