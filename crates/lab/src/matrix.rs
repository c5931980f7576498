//! The connectivity matrix: for every ordered pair of router kinds, a host
//! behind the first tries to reach a host behind the second by peer ID only,
//! with real `p2pos up` daemons; and an "everyone behind NAT" network with no
//! public host at all.
//!
//! Each kind gets two routers with one host each, so a pair of the same kind
//! uses two different routers of that kind. A public bootstrap node runs
//! beside them. Every connected pair is then left idle for two binding
//! timeouts and checked again: the session must still be the same one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::router::{RouterKind, RouterOptions};
use crate::topology::{HostId, Lab, LabError};

/// What to run.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// The kinds to pair.
    pub kinds: Vec<RouterKind>,
    /// Every router's UDP binding timeout (scaled down to keep runs short).
    pub udp_timeout_s: u32,
    /// The `p2pos` binary.
    pub p2pos: PathBuf,
    /// Check that idle sessions survive two binding timeouts.
    pub idle_check: bool,
    /// Also run the "everyone behind NAT" network.
    pub behind_nat: bool,
}

/// One ordered pair.
#[derive(Debug, Clone, Serialize)]
pub struct PairResult {
    /// Kind of the dialing host's router.
    pub from_kind: String,
    /// Kind of the dialed host's router.
    pub to_kind: String,
    /// Whether a session came up.
    pub connected: bool,
    /// The session's path (`lan`, `direct`, `punched`, `relayed:<id>`),
    /// after a relayed session had [`UPGRADE_WAIT`] to move to a direct
    /// path.
    pub path: Option<String>,
    /// The path the session started on, if it moved since.
    pub first_path: Option<String>,
    /// When a relayed session moved to a direct path, after the first byte.
    pub moved_after_ms: Option<f64>,
    /// Time from the request to the first echoed byte.
    pub ttfb_ms: Option<f64>,
    /// Whether the session outlived two idle binding timeouts.
    pub survived_idle: Option<bool>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The "everyone behind NAT" network.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BehindNat {
    /// Hosts in it.
    pub hosts: usize,
    /// Ordered pairs tried.
    pub pairs: usize,
    /// Pairs that connected.
    pub connected: usize,
    /// Pairs that connected without a relay.
    pub direct: usize,
    /// The pairs that failed, and why.
    pub failures: Vec<PairResult>,
}

/// The whole report (`p2pos-lab matrix --json`).
#[derive(Debug, Clone, Serialize)]
pub struct MatrixReport {
    /// Every ordered pair.
    pub pairs: Vec<PairResult>,
    /// The keepalive interval each node settled on, after the pairs.
    pub keepalive: Vec<KeepaliveResult>,
    /// The network with no public host.
    pub behind_nat: BehindNat,
}

/// The keepalive interval one node settled on.
#[derive(Debug, Clone, Serialize)]
pub struct KeepaliveResult {
    /// Its router's kind.
    pub kind: String,
    /// The interval (s).
    pub interval_s: f64,
    /// `measured`, `measuring`, `configured` or `no-nat`.
    pub source: String,
    /// The interval over the router's binding timeout.
    pub share_of_timeout: f64,
}

/// A p2pos daemon running in a lab host.
#[derive(Debug)]
pub struct LabNode {
    /// Its host.
    pub host: HostId,
    /// Its data dir (on the shared file system; the API socket works from
    /// any namespace).
    pub data_dir: PathBuf,
    /// Its peer ID.
    pub peer_id: String,
    /// Its process, for [`Lab::stop_child`].
    pub child: usize,
    /// The arguments it was started with, for [`restart_node`].
    pub args: Vec<String>,
}

/// Starts `p2pos up` on `host`, listening on UDP `port`, with `bootstrap`
/// (`<peer-id>@<ip:port>` entries) as its bootstrap list.
pub fn start_node(
    lab: &mut Lab,
    host: HostId,
    port: u16,
    p2pos: &Path,
    bootstrap: &[String],
) -> Result<LabNode, LabError> {
    start_node_with(lab, host, port, p2pos, bootstrap, &[])
}

/// [`start_node`] with extra `p2pos up` arguments.
pub fn start_node_with(
    lab: &mut Lab,
    host: HostId,
    port: u16,
    p2pos: &Path,
    bootstrap: &[String],
    extra: &[&str],
) -> Result<LabNode, LabError> {
    let data_dir = lab.file(&format!("node-{}", host.0));
    std::fs::create_dir_all(&data_dir)?;
    let id = std::process::Command::new(p2pos)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("id")
        .output()?;
    if !id.status.success() {
        return Err(LabError::Command {
            command: "p2pos id".into(),
            stderr: String::from_utf8_lossy(&id.stderr).into_owned(),
        });
    }
    let peer_id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
    let dir = data_dir.to_string_lossy().into_owned();
    // `--listen` in `extra` (e.g. `[::]:PORT` for dual stack) replaces the
    // IPv4 default.
    let listen = extra
        .iter()
        .position(|a| *a == "--listen")
        .and_then(|i| extra.get(i + 1))
        .map(|l| l.to_string())
        .unwrap_or_else(|| format!("0.0.0.0:{port}"));
    let extra: Vec<&str> = match extra.iter().position(|a| *a == "--listen") {
        Some(i) => extra
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i && *j != i + 1)
            .map(|(_, a)| *a)
            .collect(),
        None => extra.to_vec(),
    };
    let log = data_dir.join("daemon.log");
    let mut args = vec![
        "--data-dir",
        dir.as_str(),
        "up",
        "--listen",
        listen.as_str(),
    ];
    for b in bootstrap {
        args.push("--bootstrap");
        args.push(b);
    }
    args.extend_from_slice(&extra);
    let child = lab.spawn(host, p2pos, &args, Some(&log))?;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    wait_for_api(lab, host, &data_dir, &log)?;
    Ok(LabNode {
        host,
        data_dir,
        peer_id,
        child,
        args,
    })
}

/// Starts a stopped node again with the same identity and arguments.
pub fn restart_node(lab: &mut Lab, node: &mut LabNode, p2pos: &Path) -> Result<(), LabError> {
    let log = node.data_dir.join("daemon.log");
    let args: Vec<&str> = node.args.iter().map(String::as_str).collect();
    node.child = lab.spawn(node.host, p2pos, &args, Some(&log))?;
    wait_for_api(lab, node.host, &node.data_dir, &log)
}

fn wait_for_api(lab: &Lab, host: HostId, data_dir: &Path, log: &Path) -> Result<(), LabError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while api(data_dir, "GET", "/v1/status", None).0 != 200 {
        if Instant::now() > deadline {
            return Err(LabError::Command {
                command: format!("p2pos up in {}", lab.host(host).ns),
                stderr: std::fs::read_to_string(log).unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One request to a node's local API: (status, body). Status 0: no daemon.
pub fn api(data_dir: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let Ok(mut s) = UnixStream::connect(data_dir.join("api.sock")) else {
        return (0, String::new());
    };
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A node's `GET /v1/status`, parsed (`null` when the daemon does not
/// answer).
pub fn status(node: &LabNode) -> serde_json::Value {
    let (_, body) = api(&node.data_dir, "GET", "/v1/status", None);
    serde_json::from_str(&body).unwrap_or_default()
}

/// For tests: polls `check` every 100 ms until it holds; panics naming
/// `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, check: impl FnMut() -> bool) {
    wait_for_explained(limit, what, check, String::new);
}

/// [`wait_for`], with `explain`'s text (say, the nodes' status and logs)
/// in the panic message.
pub fn wait_for_explained(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
    explain: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            panic!("no {what} within {limit:?}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node's status and the last lines of its daemon's log, for failure
/// messages.
pub fn describe(name: &str, node: &LabNode) -> String {
    const LINES: usize = 40;
    let log = std::fs::read_to_string(node.data_dir.join("daemon.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    format!(
        "== {name} ({}): status {}\n-- the last {LINES} lines of its log:\n{tail}\n",
        node.peer_id,
        status(node)
    )
}

/// Has `from` reach `to` by peer ID only (a one-echo ping); returns the
/// result without the idle check.
pub fn try_pair(
    from: &LabNode,
    to: &LabNode,
    from_kind: RouterKind,
    to_kind: RouterKind,
) -> PairResult {
    let start = Instant::now();
    let (status, resp) = ping_by_key(from, to);
    let elapsed = start.elapsed();
    let value: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
    let mut result = PairResult {
        from_kind: from_kind.to_string(),
        to_kind: to_kind.to_string(),
        connected: false,
        path: None,
        first_path: None,
        moved_after_ms: None,
        ttfb_ms: None,
        survived_idle: None,
        error: None,
    };
    if status == 200 {
        result.connected = true;
        result.path = value["path"].as_str().map(str::to_owned);
        result.ttfb_ms = Some(elapsed.as_secs_f64() * 1000.0);
        if result
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with("relayed"))
        {
            let relayed = Instant::now();
            while relayed.elapsed() < UPGRADE_WAIT {
                let now = session_path(from, to);
                if !now.is_empty() && !now.starts_with("relayed") {
                    result.first_path = result.path.replace(now);
                    result.moved_after_ms = Some(relayed.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    } else {
        result.error = Some(
            value["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("API answered {status}")),
        );
    }
    result
}

/// How long a relayed pair gets to move to a direct path.
pub const UPGRADE_WAIT: Duration = Duration::from_secs(12);

/// Whether `from` still holds a session with `to` that is at least
/// `min_age` old (the same session, not a new one).
pub fn session_survived(from: &LabNode, to: &LabNode, min_age: Duration) -> bool {
    let (status, body) = api(&from.data_dir, "GET", "/v1/status", None);
    if status != 200 {
        return false;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["sessions"].as_array().into_iter().flatten().any(|s| {
        s["peer"].as_str() == Some(to.peer_id.as_str())
            && s["age_s"].as_u64().unwrap_or(0) >= min_age.as_secs()
    })
}

fn host_behind(
    lab: &mut Lab,
    kind: RouterKind,
    name: &str,
    options: RouterOptions,
) -> Result<HostId, LabError> {
    if kind == RouterKind::Public {
        lab.add_public_host(name)
    } else {
        let r = lab.add_router(kind, options)?;
        lab.add_host(r, name)
    }
}

/// How long the matrix waits for nodes to settle before trying pairs.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Whether a node has settled: it knows whether it is reachable, has homes
/// if it is not, and its peer record is stored somewhere; for a node with
/// homes, the record the DHT gives back lists them (the first record a node
/// publishes, before it knows its reachability, has none).
pub fn is_settled(node: &LabNode) -> bool {
    let (status, body) = api(&node.data_dir, "GET", "/v1/status", None);
    if status != 200 {
        return false;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let homes = v["homes"].as_array().is_some_and(|h| !h.is_empty());
    let published = v["dht"]["peer_record_seq"].as_u64().unwrap_or(0) > 0;
    match v["reachable"].as_bool() {
        Some(true) => published,
        Some(false) => {
            homes
                && published
                && lookup(node, node)["homes"]
                    .as_array()
                    .is_some_and(|h| !h.is_empty())
        }
        None => false,
    }
}

/// Waits up to `limit` for `nodes` to settle; returns how many did not.
pub fn settle<'a>(nodes: impl Iterator<Item = &'a LabNode>, limit: Duration) -> usize {
    let nodes: Vec<&LabNode> = nodes.collect();
    let deadline = Instant::now() + limit;
    loop {
        let unsettled = nodes.iter().filter(|n| !is_settled(n)).count();
        if unsettled == 0 || Instant::now() > deadline {
            return unsettled;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the matrix. `progress` is told what is happening.
pub fn run(
    options: &MatrixOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<MatrixReport, LabError> {
    let router_options = RouterOptions {
        udp_timeout_s: options.udp_timeout_s,
        ..RouterOptions::default()
    };
    let mut lab = Lab::new()?;
    progress(&format!(
        "building the lab ({} kinds, 2 hosts each, and a public bootstrap node)",
        options.kinds.len()
    ));
    let bootstrap = lab.add_public_host("bootstrap")?;
    let mut port = 7000u16;
    let mut next_port = || {
        port += 1;
        port
    };
    let bootstrap_port = next_port();
    let bootstrap_node = start_node(&mut lab, bootstrap, bootstrap_port, &options.p2pos, &[])?;
    let bootstrap_list = vec![format!(
        "{}@{}:{bootstrap_port}",
        bootstrap_node.peer_id,
        lab.host(bootstrap).ipv4
    )];
    let mut nodes: Vec<(RouterKind, [LabNode; 2])> = Vec::new();
    for &kind in &options.kinds {
        let a = host_behind(&mut lab, kind, &format!("{kind}-a"), router_options)?;
        let b = host_behind(&mut lab, kind, &format!("{kind}-b"), router_options)?;
        let na = start_node(&mut lab, a, next_port(), &options.p2pos, &bootstrap_list)?;
        let nb = start_node(&mut lab, b, next_port(), &options.p2pos, &bootstrap_list)?;
        nodes.push((kind, [na, nb]));
    }
    progress("waiting for every node to settle (reachability verdict, homes, peer record)");
    let unsettled = settle(nodes.iter().flat_map(|(_, n)| n.iter()), SETTLE_LIMIT);
    if unsettled > 0 {
        progress(&format!(
            "{unsettled} nodes did not settle within {} s; going on",
            SETTLE_LIMIT.as_secs()
        ));
    }
    let mut pairs = Vec::new();
    let total = nodes.len() * nodes.len();
    for (from_kind, from) in &nodes {
        for (to_kind, to) in &nodes {
            progress(&format!(
                "pair {}/{total}: {from_kind} -> {to_kind}",
                pairs.len() + 1
            ));
            pairs.push((
                try_pair(&from[0], &to[1], *from_kind, *to_kind),
                &from[0],
                &to[1],
            ));
        }
    }
    if options.idle_check && pairs.iter().any(|(p, _, _)| p.connected) {
        let idle = Duration::from_secs(2 * u64::from(options.udp_timeout_s) + 2);
        progress(&format!(
            "leaving connected sessions idle for {} s (two binding timeouts)",
            idle.as_secs()
        ));
        let start = Instant::now();
        std::thread::sleep(idle);
        for (p, from, to) in &mut pairs {
            if p.connected {
                p.survived_idle = Some(session_survived(
                    from,
                    to,
                    start.elapsed().saturating_sub(Duration::from_secs(1)),
                ));
            }
        }
    }
    let pairs: Vec<PairResult> = pairs.into_iter().map(|(p, _, _)| p).collect();
    let keepalive = nodes
        .iter()
        .flat_map(|(kind, n)| n.iter().map(move |n| (kind, n)))
        .map(|(kind, n)| {
            let s = status(n);
            let interval_s = s["keepalive_interval_s"].as_f64().unwrap_or(0.0);
            KeepaliveResult {
                kind: kind.to_string(),
                interval_s,
                source: s["keepalive"]["source"].as_str().unwrap_or("").to_owned(),
                share_of_timeout: interval_s / f64::from(options.udp_timeout_s.max(1)),
            }
        })
        .collect();
    drop(lab);

    let behind_nat = if options.behind_nat {
        progress("building the everyone-behind-NAT network");
        run_behind_nat(options, router_options)?
    } else {
        BehindNat::default()
    };
    Ok(MatrixReport {
        pairs,
        keepalive,
        behind_nat,
    })
}

/// Kinds in the network with no public host (the first, `upnp`, maps its
/// port and is everyone's bootstrap; at least one can accept
/// unsolicited traffic: upnp, full-cone).
pub const BEHIND_NAT_KINDS: [RouterKind; 7] = [
    RouterKind::Upnp,
    RouterKind::FullCone,
    RouterKind::Restricted,
    RouterKind::PortRestricted,
    RouterKind::SymmetricSequential,
    RouterKind::SymmetricRandom,
    RouterKind::Cgn,
];

fn run_behind_nat(
    options: &MatrixOptions,
    router_options: RouterOptions,
) -> Result<BehindNat, LabError> {
    let mut lab = Lab::new()?;
    let mut nodes: Vec<(RouterKind, LabNode)> = Vec::new();
    // No public host. The first node sits behind the UPnP router; once its
    // router has mapped its port, its public address is the others'
    // bootstrap entry (an invite someone shares), as a network of home
    // machines would start.
    let mut bootstrap: Vec<String> = Vec::new();
    for (i, kind) in BEHIND_NAT_KINDS.iter().enumerate() {
        let h = host_behind(&mut lab, *kind, &format!("{kind}"), router_options)?;
        let node = start_node(&mut lab, h, 7100 + i as u16, &options.p2pos, &bootstrap)?;
        if i == 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            let external = loop {
                let (_, body) = api(&node.data_dir, "GET", "/v1/status", None);
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if let Some(e) = v["port_mapping"]["external"].as_str() {
                    break e.to_owned();
                }
                if Instant::now() > deadline {
                    return Err(LabError::Command {
                        command: "behind-NAT network".into(),
                        stderr: format!(
                            "the {kind} node got no port mapping: {}",
                            v["port_mapping"]
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            bootstrap.push(format!("{}@{external}", node.peer_id));
        }
        nodes.push((*kind, node));
    }
    settle(nodes.iter().map(|(_, n)| n), SETTLE_LIMIT);
    let mut report = BehindNat {
        hosts: nodes.len(),
        ..BehindNat::default()
    };
    for (fk, from) in &nodes {
        for (tk, to) in &nodes {
            if from.peer_id == to.peer_id {
                continue;
            }
            report.pairs += 1;
            let r = try_pair(from, to, *fk, *tk);
            if r.connected {
                report.connected += 1;
                if !r.path.as_deref().unwrap_or("").starts_with("relayed") {
                    report.direct += 1;
                }
            } else {
                report.failures.push(r);
            }
        }
    }
    Ok(report)
}

/// The report as a table for people.
pub fn render(report: &MatrixReport, kinds: &[RouterKind]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let width = kinds
        .iter()
        .map(|k| k.name().len())
        .max()
        .unwrap_or(8)
        .max(8);
    let _ = write!(out, "{:>width$} │", "from \\ to");
    for k in kinds {
        let _ = write!(out, " {:^10}", abbreviate(k.name()));
    }
    out.push('\n');
    let _ = writeln!(out, "{}", "─".repeat(width + 2 + 11 * kinds.len()));
    for from in kinds {
        let _ = write!(out, "{:>width$} │", from.name());
        for to in kinds {
            let cell = report
                .pairs
                .iter()
                .find(|p| p.from_kind == from.name() && p.to_kind == to.name())
                .map(|p| match (&p.path, p.survived_idle) {
                    (Some(path), Some(false)) => format!("{}!idle", abbreviate(path)),
                    (Some(path), _) => abbreviate(path),
                    _ => "✘".to_owned(),
                })
                .unwrap_or_default();
            let _ = write!(out, " {cell:^10}");
        }
        out.push('\n');
    }
    let connected = report.pairs.iter().filter(|p| p.connected).count();
    let _ = writeln!(out, "\nconnected {connected}/{} pairs", report.pairs.len());
    let mut moved: Vec<f64> = report
        .pairs
        .iter()
        .filter_map(|p| p.moved_after_ms)
        .collect();
    if !moved.is_empty() {
        moved.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "  {} started relayed and moved to a direct path (median {:.1} s after the first byte)",
            moved.len(),
            moved[moved.len() / 2] / 1000.0
        );
    }
    let relayed = report
        .pairs
        .iter()
        .filter(|p| p.path.as_deref().is_some_and(|x| x.starts_with("relayed")))
        .count();
    if relayed > 0 {
        let _ = writeln!(out, "  {relayed} stayed relayed");
    }
    let mut errors: Vec<(String, usize)> = Vec::new();
    for p in &report.pairs {
        if let Some(e) = &p.error {
            let e = &without_peer_ids(e);
            match errors.iter_mut().find(|(m, _)| m == e) {
                Some((_, n)) => *n += 1,
                None => errors.push((e.clone(), 1)),
            }
        }
    }
    for (e, n) in errors {
        let _ = writeln!(out, "  {n:>3} × {e}");
    }
    if !report.keepalive.is_empty() {
        let _ = writeln!(out, "keepalive interval / binding timeout:");
        for k in &report.keepalive {
            let _ = writeln!(
                out,
                "  {:>20} {:>6.1} s  {:>4.0}%  {}",
                k.kind,
                k.interval_s,
                k.share_of_timeout * 100.0,
                k.source
            );
        }
    }
    let b = &report.behind_nat;
    if b.hosts > 0 {
        let _ = writeln!(
            out,
            "everyone behind NAT: {} hosts, {}/{} pairs connected, {} direct",
            b.hosts, b.connected, b.pairs, b.direct
        );
        for f in &b.failures {
            let _ = writeln!(
                out,
                "  ✘ {} -> {}: {}",
                f.from_kind,
                f.to_kind,
                without_peer_ids(f.error.as_deref().unwrap_or(""))
            );
        }
    }
    out
}

/// Replaces peer IDs in a message by `<peer>`, so equal causes group.
fn without_peer_ids(message: &str) -> String {
    message
        .split(' ')
        .map(|w| {
            let core = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
            if core.len() == 55
                && core
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
            {
                w.replace(core, "<peer>")
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn abbreviate(s: &str) -> String {
    let mut s = s.to_owned();
    s.truncate(10);
    s
}

/// Two DHT servers on public hosts and two DHT clients, `a` and `b`,
/// each behind its own router.
#[derive(Debug)]
pub struct TwoBehind {
    /// The servers (homes and relays of the clients).
    pub servers: Vec<LabNode>,
    /// The first client.
    pub a: LabNode,
    /// The second client.
    pub b: LabNode,
}

/// Starts [`TwoBehind`] with routers of `kinds` (with `routers`' options),
/// writing `server_config`
/// into the servers' config files, and waits until both clients have a
/// home and a NAT verdict and `a` finds `b`'s record with its homes.
///
/// The clients are DHT clients from the start: in a network this small,
/// two DHT servers would exchange DHT traffic and so open each other's
/// NATs by chance; clients only talk to servers, as two random nodes of a
/// large network do. Two servers, because the mapping is judged from what
/// several peers see.
pub fn two_behind(
    lab: &mut Lab,
    p2pos: &Path,
    kinds: [RouterKind; 2],
    routers: RouterOptions,
    server_config: &str,
) -> Result<TwoBehind, LabError> {
    let p1 = lab.add_public_host("p1")?;
    let p2 = lab.add_public_host("p2")?;
    let ha = host_behind(lab, kinds[0], "a", routers)?;
    let hb = host_behind(lab, kinds[1], "b", routers)?;
    for p in [p1, p2] {
        let dir = lab.file(&format!("node-{}", p.0));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("config.toml"), server_config)?;
    }
    let n1 = start_node(lab, p1, 7447, p2pos, &[])?;
    let entry = vec![format!("{}@{}:7447", n1.peer_id, lab.host(p1).ipv4)];
    let n2 = start_node(lab, p2, 7447, p2pos, &entry)?;
    let client = ["--dht-client"];
    let a = start_node_with(lab, ha, 7447, p2pos, &entry, &client)?;
    let b = start_node_with(lab, hb, 7447, p2pos, &entry, &client)?;
    for (name, n) in [("a", &a), ("b", &b)] {
        wait_for_explained(
            Duration::from_secs(60),
            &format!("home and NAT verdict for {name}"),
            || {
                let s = status(n);
                s["reachable"] == false
                    && s["homes"].as_array().is_some_and(|h| !h.is_empty())
                    && s["nat"]["mapping"] != "unknown"
            },
            || describe(name, n),
        );
    }
    wait_for_explained(
        Duration::from_secs(30),
        "b's record with its homes",
        || {
            lookup(&a, &b)["homes"]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        },
        || {
            format!(
                "a's lookup of b: {}\n{}{}",
                lookup(&a, &b),
                describe("a", &a),
                describe("b", &b)
            )
        },
    );
    Ok(TwoBehind {
        servers: vec![n1, n2],
        a,
        b,
    })
}

/// One ping from `from` to `to` by peer ID alone (the API's status code
/// and body).
pub fn ping_by_key(from: &LabNode, to: &LabNode) -> (u16, String) {
    let body = format!("{{\"peer\":\"{}\",\"count\":1}}", to.peer_id);
    api(&from.data_dir, "POST", "/v1/ping", Some(&body))
}

/// `peer`'s record as `from` finds it in the DHT (`null` if not found).
pub fn lookup(from: &LabNode, peer: &LabNode) -> serde_json::Value {
    let body = format!("{{\"peer\":\"{}\"}}", peer.peer_id);
    let (_, resp) = api(&from.data_dir, "POST", "/v1/lookup", Some(&body));
    serde_json::from_str(&resp).unwrap_or_default()
}

/// The path of `from`'s session with `peer` (empty if none).
pub fn session_path(from: &LabNode, peer: &LabNode) -> String {
    session_with(from, peer)["path"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `from`'s session with `peer`, as its status shows it (`null` if none).
pub fn session_with(from: &LabNode, peer: &LabNode) -> serde_json::Value {
    status(from)["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["peer"] == peer.peer_id.as_str())
        .cloned()
        .unwrap_or_default()
}
