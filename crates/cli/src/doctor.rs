//! `p2pos doctor`: what the node knows about its connectivity, from its own
//! status (no server of ours is asked anything), and what to do about it.

use serde::Serialize;
use serde_json::Value;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// `ok`, `warn`, `fail` or `info`.
    pub level: String,
    /// What was found.
    pub finding: String,
    /// What to do, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The node's peer ID.
    pub peer_id: String,
    /// `public` or `private:<id>`.
    pub network: String,
    /// Whether every check is `ok` or `info`.
    pub healthy: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

fn check(name: &str, level: &str, finding: String, fix: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        level: level.to_owned(),
        finding,
        fix: fix.map(str::to_owned),
    }
}

/// Builds the report from `GET /v1/status`.
pub fn diagnose(s: &Value) -> Report {
    let str_of = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let mut checks = Vec::new();
    let uptime = s["uptime_s"].as_u64().unwrap_or(0);
    let settling = uptime < 15;

    let listen: Vec<String> = s["listen_addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    checks.push(check(
        "addresses",
        if listen.is_empty() { "fail" } else { "ok" },
        format!("listening on {}", listen.join(", ")),
        listen
            .is_empty()
            .then_some("the host has no usable address: connect it to a network"),
    ));

    let dht = &s["dht"];
    let contacts = dht["routing_table_size"].as_u64().unwrap_or(0);
    checks.push(if dht.is_null() {
        check("dht", "warn", "the DHT is off".into(), None)
    } else if contacts == 0 {
        check(
            "dht",
            if settling { "info" } else { "fail" },
            "no DHT contacts: this node cannot find peers by key".into(),
            Some("give it a peer to join through: p2pos up --bootstrap <peer-id>@<ip:port>, or start another node on this LAN"),
        )
    } else {
        check(
            "dht",
            "ok",
            format!(
                "{contacts} contacts; this node is a DHT {} ({} mode)",
                if dht["server"].as_bool() == Some(true) {
                    "server"
                } else {
                    "client"
                },
                str_of(&dht["mode"])
            ),
            None,
        )
    });

    let nat = &s["nat"];
    let observed: Vec<String> = nat["observed_addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    let dht_received = dht["received"].as_u64().unwrap_or(0);
    let dht_sent = dht["sent"].as_u64().unwrap_or(0);
    if observed.is_empty() && dht_sent > 10 && dht_received == 0 && !settling {
        checks.push(check(
            "udp",
            "fail",
            format!("{dht_sent} DHT datagrams sent, none answered: outbound UDP looks blocked"),
            Some("allow UDP on this network (p2pos uses one UDP port), or use another network"),
        ));
    }
    let mapping = str_of(&nat["mapping"]);
    let filtering = str_of(&nat["filtering"]);
    checks.push(check(
        "nat mapping",
        match mapping.as_str() {
            "none" | "endpoint-independent" => "ok",
            "unknown" => "info",
            _ => "warn",
        },
        format!(
            "{mapping}{}",
            if observed.is_empty() {
                String::new()
            } else {
                format!("; peers see this node at {}", observed.join(", "))
            }
        ),
        match mapping.as_str() {
            "unknown" => Some("needs answers from two public DHT peers: wait, or add bootstrap peers"),
            "endpoint-dependent-random" | "endpoint-dependent-sequential" => Some(
                "the router picks a new port for every peer: direct connections need many-port punching or a relay; enabling UPnP/NAT-PMP/PCP on the router helps",
            ),
            _ => None,
        },
    ));
    if nat["cgn"].as_bool() == Some(true) {
        checks.push(check(
            "carrier-grade nat",
            "warn",
            "this network sits behind a second NAT run by the ISP (carrier-grade NAT)".to_owned(),
            Some("a port mapping on your own router cannot make this node reachable; peers reach it by hole punching or through a relay, or ask the ISP for a public (or IPv6) address"),
        ));
    }
    let reachable = s["reachable"].as_bool();
    checks.push(check(
        "reachability",
        match reachable {
            Some(true) => "ok",
            Some(false) => "warn",
            None => "info",
        },
        match reachable {
            Some(true) => "nodes that never contacted this one can reach it".to_owned(),
            Some(false) => format!(
                "only peers this node contacted can reach it (filtering {filtering})"
            ),
            None => "not known yet: no dial-back check has given a verdict".to_owned(),
        },
        match reachable {
            Some(false) => Some("peers reach it through hole punching, coordinated by other nodes, or a relay; a port mapping (UPnP/NAT-PMP/PCP on the router) makes it reachable"),
            None => Some("a check needs a DHT peer that knows a third node: wait a minute, or add bootstrap peers"),
            _ => None,
        },
    ));

    let pm = &s["port_mapping"];
    if !pm.is_null() {
        let state = str_of(&pm["state"]);
        checks.push(check(
            "port mapping",
            if state == "mapped" { "ok" } else { "info" },
            match state.as_str() {
                "mapped" => format!(
                    "the router maps {} to this node ({})",
                    str_of(&pm["external"]),
                    str_of(&pm["protocol"])
                ),
                other => other.to_owned(),
            },
            (state.starts_with("unavailable") && reachable == Some(false)).then_some(
                "enable PCP or NAT-PMP (often called UPnP / NAT-PMP) on the router to be reachable",
            ),
        ));
    }
    let ka = &s["keepalive"];
    if !ka.is_null() {
        checks.push(check(
            "keepalive",
            "info",
            format!(
                "every {:.0} s on idle sessions ({})",
                s["keepalive_interval_s"].as_f64().unwrap_or(0.0),
                str_of(&ka["source"])
            ),
            None,
        ));
    }

    let lan = &s["lan"];
    let mdns = str_of(&lan["mdns"]);
    let lan_peers = lan["peers"].as_array().map_or(0, Vec::len);
    checks.push(check(
        "lan",
        if mdns.starts_with("failed") { "warn" } else { "info" },
        format!("mDNS {mdns}; {lan_peers} peer(s) found on the LAN"),
        mdns.starts_with("failed")
            .then_some("LAN discovery needs a multicast-capable interface; peers on the LAN can still connect by address"),
    ));

    let foreign = s["counters"]["foreign_network_dropped"]
        .as_u64()
        .unwrap_or(0);
    if foreign > 0 {
        checks.push(check(
            "network",
            "info",
            format!("{foreign} datagrams from nodes of another network were dropped"),
            Some("peers must use the same network secret (or none) to talk"),
        ));
    }
    let healthy = checks.iter().all(|c| c.level == "ok" || c.level == "info");
    Report {
        peer_id: str_of(&s["peer_id"]),
        network: str_of(&s["network"]),
        healthy,
        checks,
    }
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = format!("p2pos doctor for {} ({})\n", r.peer_id, r.network);
    for c in &r.checks {
        let mark = match c.level.as_str() {
            "ok" => "ok  ",
            "warn" => "WARN",
            "fail" => "FAIL",
            _ => "info",
        };
        out.push_str(&format!("[{mark}] {:<13} {}\n", c.name, c.finding));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("       {:<13} → {fix}\n", ""));
        }
    }
    out.push_str(if r.healthy {
        "no problems found\n"
    } else {
        "problems found: see the lines marked WARN or FAIL\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lonely_node_is_told_to_bootstrap() {
        let s = json!({
            "peer_id": "x", "network": "public", "uptime_s": 60,
            "listen_addrs": ["192.168.1.10:7447"],
            "dht": { "routing_table_size": 0, "server": true, "mode": "auto", "sent": 30, "received": 0 },
            "nat": { "mapping": "unknown", "filtering": "unknown", "observed_addrs": [] },
            "reachable": null,
            "lan": { "mdns": "on", "peers": [] },
            "counters": {}
        });
        let r = diagnose(&s);
        assert!(!r.healthy);
        let text = render(&r);
        assert!(text.contains("--bootstrap"), "{text}");
        assert!(text.contains("UDP looks blocked"), "{text}");
    }

    #[test]
    fn a_reachable_node_is_healthy() {
        let s = json!({
            "peer_id": "x", "network": "public", "uptime_s": 60,
            "listen_addrs": ["11.0.1.1:7447"],
            "dht": { "routing_table_size": 5, "server": true, "mode": "auto", "sent": 30, "received": 30 },
            "nat": { "mapping": "none", "filtering": "endpoint-independent", "observed_addrs": ["11.0.1.1:7447"] },
            "reachable": true,
            "lan": { "mdns": "on", "peers": [] },
            "counters": {}
        });
        let r = diagnose(&s);
        assert!(r.healthy, "{}", render(&r));
    }

    #[test]
    fn carrier_grade_nat_is_explained() {
        let s = json!({
            "peer_id": "x", "network": "public", "uptime_s": 60,
            "listen_addrs": ["192.168.1.10:7447"],
            "dht": { "routing_table_size": 5, "server": false, "mode": "auto", "sent": 30, "received": 30 },
            "nat": { "mapping": "endpoint-independent", "filtering": "address-and-port-dependent", "cgn": true, "observed_addrs": ["198.51.100.7:40000"] },
            "reachable": false,
            "lan": { "mdns": "on", "peers": [] },
            "counters": {}
        });
        let text = render(&diagnose(&s));
        assert!(text.contains("carrier-grade NAT"), "{text}");
        assert!(text.contains("relay"), "{text}");
    }
}
