//! Router kinds and the nftables rulesets that make them.
//!
//! Every router namespace has a WAN interface `wan` and a LAN bridge `lan`.
//! The rulesets are plain text so they can be read, unit-tested and loaded
//! with `nft -f`.
//!
//! How each kind is built (Linux conntrack does the mapping; nftables sets
//! the policy):
//!
//! | kind | mapping | filtering |
//! |---|---|---|
//! | `firewall` | none (routed public addresses, IPv4 and IPv6) | inbound only after outbound (address and port) |
//! | `full-cone` | masquerade: endpoint-independent, port kept | none once mapped: a dynamic map port → LAN host, refreshed by outbound packets, DNATs any inbound |
//! | `restricted` | as full-cone | inbound only from an IP the host has sent to (dynamic set port . remote IP) |
//! | `port-restricted` | masquerade | address and port dependent (conntrack) |
//! | `symmetric-random` | `masquerade fully-random`: a new random port per destination | address and port dependent |
//! | `symmetric-sequential` | `snat` to `numgen inc`: the next port per new mapping | address and port dependent |
//! | `upnp` | port-restricted, plus miniupnpd (UPnP IGD, NAT-PMP, PCP) adding port mappings | as port-restricted |
//! | `cgn` | two port-restricted NATs: the home router's WAN is in 100.64.0.0/10 | as port-restricted |
//! | `udp-blocked` | masquerade | all UDP from the LAN dropped |
//!
//! Dynamic sets and maps expire after the router's UDP binding timeout,
//! like the conntrack entries. Hairpinning (a LAN host reaching another via
//! the router's public address) uses the same port map, so it works where
//! ports are kept (not on the symmetric kinds).

use std::fmt::Write;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The kinds of router the lab builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouterKind {
    /// No router: the host sits on the internet.
    Public,
    /// No NAT, stateful firewall (as IPv6 home routers do).
    Firewall,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Endpoint-dependent mapping with random ports.
    SymmetricRandom,
    /// Endpoint-dependent mapping with ports allocated in order.
    SymmetricSequential,
    /// Port-restricted plus UPnP IGD, NAT-PMP and PCP (miniupnpd).
    Upnp,
    /// A home router behind a carrier-grade NAT.
    Cgn,
    /// Drops all UDP leaving the LAN.
    UdpBlocked,
}

impl RouterKind {
    /// Every kind, in a stable order.
    pub const ALL: [RouterKind; 10] = [
        RouterKind::Public,
        RouterKind::Firewall,
        RouterKind::FullCone,
        RouterKind::Restricted,
        RouterKind::PortRestricted,
        RouterKind::SymmetricRandom,
        RouterKind::SymmetricSequential,
        RouterKind::Upnp,
        RouterKind::Cgn,
        RouterKind::UdpBlocked,
    ];

    /// The kind's name on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            RouterKind::Public => "public",
            RouterKind::Firewall => "firewall",
            RouterKind::FullCone => "full-cone",
            RouterKind::Restricted => "restricted",
            RouterKind::PortRestricted => "port-restricted",
            RouterKind::SymmetricRandom => "symmetric-random",
            RouterKind::SymmetricSequential => "symmetric-sequential",
            RouterKind::Upnp => "upnp",
            RouterKind::Cgn => "cgn",
            RouterKind::UdpBlocked => "udp-blocked",
        }
    }

    /// Whether hosts behind it are NATed (have private addresses).
    pub fn is_nat(&self) -> bool {
        !matches!(self, RouterKind::Public | RouterKind::Firewall)
    }
}

impl std::fmt::Display for RouterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RouterKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RouterKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = RouterKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown router kind {s:?}; kinds: {}", names.join(", "))
            })
    }
}

/// Settings of one router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterOptions {
    /// Seconds an idle UDP binding lives (conntrack, sets and maps).
    pub udp_timeout_s: u32,
    /// Percent of forwarded packets dropped at random (0 = none).
    pub loss_percent: u8,
    /// Whether LAN hosts can reach each other through the public address.
    pub hairpin: bool,
    /// A `upnp` router that speaks only UPnP IGD (no PCP, no NAT-PMP).
    pub igd_only: bool,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            udp_timeout_s: 30,
            loss_percent: 0,
            hairpin: false,
            igd_only: false,
        }
    }
}

/// First port of a `symmetric-sequential` router's ring of ports.
pub const SEQUENTIAL_BASE: u16 = 20000;
/// Ports in that ring (mappings wrap around after this many).
pub const SEQUENTIAL_PORTS: u16 = 512;

/// Names of the chains miniupnpd manages (its config must match).
pub const UPNP_TABLE: &str = "filter";
/// Forward chain miniupnpd fills.
pub const UPNP_FORWARD_CHAIN: &str = "MINIUPNPD";
/// Prerouting chain miniupnpd fills.
pub const UPNP_NAT_CHAIN: &str = "prerouting_miniupnpd";
/// Postrouting chain miniupnpd fills.
pub const UPNP_POSTROUTING_CHAIN: &str = "postrouting_miniupnpd";

/// The nftables ruleset of a home router of `kind` (not `public`) whose
/// WAN address is `wan` and LAN `lan_net` (a /24).
pub fn ruleset(kind: RouterKind, wan: Ipv4Addr, lan_net: Ipv4Addr, opts: &RouterOptions) -> String {
    let t = opts.udp_timeout_s.max(1);
    let mut r = String::new();
    let table = if kind == RouterKind::Upnp {
        format!("inet {UPNP_TABLE}")
    } else {
        "inet lab".to_owned()
    };
    let _ = writeln!(r, "table {table} {{");
    let _ = writeln!(
        r,
        "  map cone {{ type inet_service : ipv4_addr; flags dynamic, timeout; timeout {t}s; }}"
    );
    let _ = writeln!(
        r,
        "  set contacted {{ type inet_service . ipv4_addr; flags dynamic, timeout; timeout {t}s; }}"
    );

    // Forwarding policy.
    let _ = writeln!(r, "  chain forward {{");
    let _ = writeln!(
        r,
        "    type filter hook forward priority filter; policy drop;"
    );
    match opts.loss_percent {
        0 => {}
        100.. => {
            let _ = writeln!(r, "    drop");
        }
        n => {
            let _ = writeln!(r, "    numgen random mod 100 < {n} drop");
        }
    }
    if kind == RouterKind::UdpBlocked {
        let _ = writeln!(r, "    iifname \"lan\" meta l4proto udp drop");
    }
    // Outbound UDP refreshes the port map (and the contacted set).
    let _ = writeln!(
        r,
        "    iifname \"lan\" oifname \"wan\" meta nfproto ipv4 meta l4proto udp update @cone {{ udp sport timeout {t}s : ip saddr }}"
    );
    let _ = writeln!(
        r,
        "    iifname \"lan\" oifname \"wan\" meta nfproto ipv4 meta l4proto udp update @contacted {{ udp sport . ip daddr timeout {t}s }}"
    );
    let _ = writeln!(r, "    ct state established,related accept");
    let _ = writeln!(r, "    iifname \"lan\" accept");
    let _ = writeln!(r, "    ct status dnat accept");
    if kind == RouterKind::Upnp {
        let _ = writeln!(r, "    jump {UPNP_FORWARD_CHAIN}");
    }
    let _ = writeln!(r, "  }}");
    if kind == RouterKind::Upnp {
        let _ = writeln!(r, "  chain {UPNP_FORWARD_CHAIN} {{ }}");
        let _ = writeln!(r, "  chain {UPNP_NAT_CHAIN} {{ }}");
        let _ = writeln!(r, "  chain {UPNP_POSTROUTING_CHAIN} {{ }}");
    }

    if kind.is_nat() {
        // The router itself: like every home router's firewall, nothing
        // unsolicited from the WAN side. (A dropped packet's conntrack entry
        // is never confirmed; an accepted one would take the port a LAN
        // host's later outbound flow to the same peer needs, and the NAT
        // would map that flow to another port.)
        let _ = writeln!(r, "  chain input {{");
        let _ = writeln!(
            r,
            "    type filter hook input priority filter; policy accept;"
        );
        let _ = writeln!(r, "    iifname \"wan\" ct state established,related accept");
        let _ = writeln!(r, "    iifname \"wan\" drop");
        let _ = writeln!(r, "  }}");
        // Inbound: DNAT where the kind's filtering allows it.
        let _ = writeln!(r, "  chain prerouting {{");
        let _ = writeln!(
            r,
            "    type nat hook prerouting priority dstnat; policy accept;"
        );
        if kind == RouterKind::Upnp {
            let _ = writeln!(r, "    jump {UPNP_NAT_CHAIN}");
        }
        match kind {
            RouterKind::FullCone => {
                let _ = writeln!(
                    r,
                    "    iifname \"wan\" meta l4proto udp dnat ip to udp dport map @cone"
                );
            }
            RouterKind::Restricted => {
                let _ = writeln!(
                    r,
                    "    iifname \"wan\" meta l4proto udp udp dport . ip saddr @contacted dnat ip to udp dport map @cone"
                );
            }
            _ => {}
        }
        if opts.hairpin {
            let _ = writeln!(
                r,
                "    iifname \"lan\" ip daddr {wan} meta l4proto udp dnat ip to udp dport map @cone"
            );
        }
        let _ = writeln!(r, "  }}");

        // Outbound: the mapping.
        let _ = writeln!(r, "  chain postrouting {{");
        let _ = writeln!(
            r,
            "    type nat hook postrouting priority srcnat; policy accept;"
        );
        if kind == RouterKind::Upnp {
            let _ = writeln!(r, "    jump {UPNP_POSTROUTING_CHAIN}");
        }
        if opts.hairpin {
            let _ = writeln!(
                r,
                "    oifname \"lan\" ip saddr {lan_net}/24 ct status dnat snat ip to {wan}"
            );
        }
        match kind {
            RouterKind::SymmetricRandom => {
                let _ = writeln!(r, "    oifname \"wan\" masquerade fully-random");
            }
            RouterKind::SymmetricSequential => {
                // A counter picks the next port of a ring. (numgen's value
                // cannot be the port directly: it lands byte-swapped.)
                let ports: Vec<String> = (0..SEQUENTIAL_PORTS)
                    .map(|n| format!("{n} : {}", SEQUENTIAL_BASE + n))
                    .collect();
                let _ = writeln!(
                    r,
                    "    oifname \"wan\" meta l4proto udp snat ip to {wan} : numgen inc mod {SEQUENTIAL_PORTS} map {{ {} }}",
                    ports.join(", ")
                );
                let _ = writeln!(r, "    oifname \"wan\" masquerade");
            }
            _ => {
                let _ = writeln!(r, "    oifname \"wan\" masquerade");
            }
        }
        let _ = writeln!(r, "  }}");
    }
    let _ = writeln!(r, "}}");
    r
}

/// The miniupnpd configuration for a `upnp` router.
pub fn miniupnpd_config(lan_net: Ipv4Addr, uuid_suffix: u32, igd_only: bool) -> String {
    let natpmp = if igd_only { "no" } else { "yes" };
    format!(
        "ext_ifname=wan\n\
         listening_ip=lan\n\
         http_port=0\n\
         enable_natpmp={natpmp}\n\
         enable_upnp=yes\n\
         secure_mode=yes\n\
         system_uptime=yes\n\
         min_lifetime=30\n\
         max_lifetime=86400\n\
         uuid=3f6a4b52-0000-4000-8000-{uuid_suffix:012x}\n\
         upnp_table_name={UPNP_TABLE}\n\
         upnp_nat_table_name={UPNP_TABLE}\n\
         upnp_forward_chain={UPNP_FORWARD_CHAIN}\n\
         upnp_nat_chain={UPNP_NAT_CHAIN}\n\
         upnp_nat_postrouting_chain={UPNP_POSTROUTING_CHAIN}\n\
         allow 1024-65535 {lan_net}/24 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(kind: RouterKind, hairpin: bool) -> String {
        let opts = RouterOptions {
            udp_timeout_s: 7,
            hairpin,
            ..RouterOptions::default()
        };
        ruleset(
            kind,
            Ipv4Addr::new(11, 0, 2, 1),
            Ipv4Addr::new(192, 168, 1, 0),
            &opts,
        )
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in RouterKind::ALL {
            assert_eq!(k.name().parse::<RouterKind>(), Ok(k));
        }
        assert!("cone"
            .parse::<RouterKind>()
            .unwrap_err()
            .contains("full-cone"));
    }

    #[test]
    fn each_kind_has_its_mapping_and_filtering() {
        assert!(rules(RouterKind::SymmetricRandom, false).contains("fully-random"));
        assert!(rules(RouterKind::SymmetricSequential, false).contains("numgen inc"));
        assert!(rules(RouterKind::FullCone, false).contains("dnat ip to udp dport map @cone"));
        assert!(rules(RouterKind::Restricted, false).contains("@contacted dnat"));
        assert!(!rules(RouterKind::PortRestricted, false).contains("dnat ip to"));
        assert!(rules(RouterKind::UdpBlocked, false).contains("meta l4proto udp drop"));
        assert!(!rules(RouterKind::Firewall, false).contains("masquerade"));
        assert!(rules(RouterKind::Upnp, false).contains("jump MINIUPNPD"));
        assert!(rules(RouterKind::PortRestricted, false).contains("timeout 7s"));
        assert!(rules(RouterKind::PortRestricted, true).contains("snat ip to 11.0.2.1"));
    }
}
