//! `p2pos-lab lan-bench`: the LAN figures. Two hosts on a switch with no
//! uplink; node A runs throughout, node B is started, stopped and killed
//! over and over:
//!
//! - discovery: from B's process start until B lists A as a LAN peer (B is
//!   restarted 1.5 s after it stopped: mDNS answers a query for the same
//!   record at most once a second);
//! - reconnect: from B's restart (after a clean stop) until A holds a new
//!   session with B; and the same after B was killed (no goodbye at all);
//! - idle multicast: mDNS packets and bytes A sends per minute while both
//!   sit idle (counted by an nftables rule in A's namespace).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::matrix::{api, restart_node, start_node, LabNode};
use crate::{Lab, LabError};

/// What to run.
#[derive(Debug, Clone)]
pub struct LanBenchOptions {
    /// Restarts of B (each gives one sample of each figure).
    pub runs: usize,
    /// Length of the idle window for the multicast count.
    pub idle: Duration,
    /// The p2pos binary.
    pub p2pos: PathBuf,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct LanBenchReport {
    /// Samples per figure.
    pub runs: usize,
    /// Start of a node → it lists its LAN peer, p50 (ms).
    pub discovery_ms_p50: f64,
    /// The same, p99 (ms).
    pub discovery_ms_p99: f64,
    /// Restart after a clean stop → the peer holds a new session, p50 (ms).
    pub reconnect_ms_p50: f64,
    /// The same, p99 (ms).
    pub reconnect_ms_p99: f64,
    /// Restart after a kill → the peer holds a new session, p50 (ms).
    pub reconnect_after_kill_ms_p50: f64,
    /// The same, p99 (ms).
    pub reconnect_after_kill_ms_p99: f64,
    /// Length of the idle window (s).
    pub idle_s: u64,
    /// mDNS packets one idle node sends per minute.
    pub multicast_packets_per_min: f64,
    /// mDNS bytes (IP payload) one idle node sends per minute.
    pub multicast_bytes_per_min: f64,
}

/// Pause between a node's stop and its restart.
const RESTART_PAUSE: Duration = Duration::from_millis(1500);

fn status(node: &LabNode) -> serde_json::Value {
    let (_, body) = api(&node.data_dir, "GET", "/v1/status", None);
    serde_json::from_str(&body).unwrap_or_default()
}

fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Result<Duration, LabError> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(LabError::Command {
        command: "lan-bench".into(),
        stderr: format!("condition not met within {limit:?}"),
    })
}

fn sessions_opened(node: &LabNode) -> u64 {
    status(node)["counters"]["sessions_opened"]
        .as_u64()
        .unwrap_or(0)
}

fn has_session(a: &LabNode, b: &LabNode) -> bool {
    status(a)["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["peer"] == b.peer_id.as_str())
}

fn lists_lan_peer(node: &LabNode, peer: &LabNode) -> bool {
    status(node)["lan"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["peer"] == peer.peer_id.as_str())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    if samples.is_empty() {
        return 0.0;
    }
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

/// Restarts B and measures (time to discover A, time until A holds a
/// session with B opened after the restart).
fn restart_and_measure(
    lab: &mut Lab,
    a: &LabNode,
    b: &mut LabNode,
    p2pos: &std::path::Path,
) -> Result<(f64, f64), LabError> {
    let opened_before = sessions_opened(a);
    // mDNS multicasts a record at most once a second (RFC 6762 §6): a node
    // restarted within a second of the last answer waits out that limit.
    // Devices do not restart that fast; leave the limit out of the figure.
    std::thread::sleep(RESTART_PAUSE);
    let start = Instant::now();
    restart_node(lab, b, p2pos)?;
    let limit = Duration::from_secs(30);
    let mut discovered = None;
    let mut reconnected = None;
    wait_until(limit, || {
        if discovered.is_none() && lists_lan_peer(b, a) {
            discovered = Some(start.elapsed());
        }
        if reconnected.is_none() && sessions_opened(a) > opened_before && has_session(a, b) {
            reconnected = Some(start.elapsed());
        }
        discovered.is_some() && reconnected.is_some()
    })?;
    let ms = |d: Option<Duration>| d.unwrap_or_default().as_secs_f64() * 1000.0;
    Ok((ms(discovered), ms(reconnected)))
}

/// Runs the benchmark; `progress` is told what is happening.
pub fn run(
    options: &LanBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<LanBenchReport, LabError> {
    let mut lab = Lab::new()?;
    let switch = lab.add_switch()?;
    let ha = lab.add_host(switch, "a")?;
    let hb = lab.add_host(switch, "b")?;
    let a = start_node(&mut lab, ha, 7447, &options.p2pos, &[])?;
    let mut b = start_node(&mut lab, hb, 7447, &options.p2pos, &[])?;
    wait_until(Duration::from_secs(30), || has_session(&a, &b))?;

    let (mut discovery, mut reconnect, mut after_kill) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..options.runs {
        progress(&format!("run {}/{}", run + 1, options.runs));
        lab.stop_child(b.child, Duration::from_secs(5));
        wait_until(Duration::from_secs(15), || !has_session(&a, &b))?;
        let (d, r) = restart_and_measure(&mut lab, &a, &mut b, &options.p2pos)?;
        discovery.push(d);
        reconnect.push(r);
        lab.kill_child(b.child);
        let (_, k) = restart_and_measure(&mut lab, &a, &mut b, &options.p2pos)?;
        after_kill.push(k);
    }

    progress(&format!(
        "counting mDNS traffic of an idle node for {} s",
        options.idle.as_secs()
    ));
    let ns = lab.host(ha).ns.clone();
    lab.sh(
        &ns,
        "nft add table inet p2mc && nft add counter inet p2mc mdns \
         && nft add chain inet p2mc out '{ type filter hook output priority 0; }' \
         && nft add rule inet p2mc out udp dport 5353 counter name mdns",
    )?;
    std::thread::sleep(options.idle);
    let out = lab.sh(&ns, "nft list counter inet p2mc mdns")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let number_after = |word: &str| -> f64 {
        text.split_whitespace()
            .skip_while(|w| *w != word)
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0)
    };
    let minutes = options.idle.as_secs_f64() / 60.0;
    Ok(LanBenchReport {
        runs: options.runs,
        discovery_ms_p50: percentile(&mut discovery, 0.5),
        discovery_ms_p99: percentile(&mut discovery, 0.99),
        reconnect_ms_p50: percentile(&mut reconnect, 0.5),
        reconnect_ms_p99: percentile(&mut reconnect, 0.99),
        reconnect_after_kill_ms_p50: percentile(&mut after_kill, 0.5),
        reconnect_after_kill_ms_p99: percentile(&mut after_kill, 0.99),
        idle_s: options.idle.as_secs(),
        multicast_packets_per_min: number_after("packets") / minutes,
        multicast_bytes_per_min: number_after("bytes") / minutes,
    })
}

/// The report as a table.
pub fn render(r: &LanBenchReport) -> String {
    format!(
        "LAN figures over {} restarts\n\
         {:<44} p50 {:>8.0} ms   p99 {:>8.0} ms\n\
         {:<44} p50 {:>8.0} ms   p99 {:>8.0} ms\n\
         {:<44} p50 {:>8.0} ms   p99 {:>8.0} ms\n\
         idle mDNS traffic per node ({} s window): {:.1} packets/min, {:.0} bytes/min\n",
        r.runs,
        "start → LAN peer discovered",
        r.discovery_ms_p50,
        r.discovery_ms_p99,
        "restart (clean stop) → session again",
        r.reconnect_ms_p50,
        r.reconnect_ms_p99,
        "restart (killed, no goodbye) → session again",
        r.reconnect_after_kill_ms_p50,
        r.reconnect_after_kill_ms_p99,
        r.idle_s,
        r.multicast_packets_per_min,
        r.multicast_bytes_per_min,
    )
}
