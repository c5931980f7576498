//! The lab's routers behave as their kinds say. These tests pin the lab
//! itself, so that a green matrix later means something.
//!
//! They need root (network namespaces). Without root they say loudly that
//! they were skipped; under CI (`CI` set) they fail instead.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use p2pos_lab::probe::Received;
use p2pos_lab::{HostId, Lab, RouterKind, RouterOptions};

const PROBE: &str = env!("CARGO_BIN_EXE_p2pos-lab");

fn lab() -> Option<Lab> {
    p2pos_lab::lab_for_test()
}

fn opts(udp_timeout_s: u32) -> RouterOptions {
    RouterOptions {
        udp_timeout_s,
        ..RouterOptions::default()
    }
}

/// Public reflectors S1 (ports 9000 and 9001), S2 (9000), and a silent S3.
struct World {
    s1: HostId,
    s2: HostId,
    s3: HostId,
}

fn world(lab: &mut Lab) -> World {
    let s1 = lab.add_public_host("s1").unwrap();
    let s2 = lab.add_public_host("s2").unwrap();
    let s3 = lab.add_public_host("s3").unwrap();
    for (h, port) in [(s1, "9000"), (s1, "9001"), (s2, "9000")] {
        lab.spawn(
            h,
            Path::new(PROBE),
            &["probe", "reflect", "--port", port],
            None,
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    World { s1, s2, s3 }
}

fn addr(lab: &Lab, host: HostId, port: u16) -> SocketAddr {
    SocketAddr::from((lab.host(host).ipv4, port))
}

/// Runs a probe session on `host` from port `bind` to `targets` for
/// `listen_ms`, calling `during` half a second in; returns what arrived.
fn session(
    lab: &mut Lab,
    host: HostId,
    bind: u16,
    targets: &[SocketAddr],
    listen_ms: u64,
    during: impl FnOnce(&Lab),
) -> Vec<Received> {
    let bind_s = bind.to_string();
    let listen_s = listen_ms.to_string();
    let mut args = vec![
        "probe",
        "session",
        "--bind",
        &bind_s,
        "--listen-ms",
        &listen_s,
    ];
    let target_strings: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    for t in &target_strings {
        args.push("--to");
        args.push(t);
    }
    let idx = lab.spawn(host, Path::new(PROBE), &args, None).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    during(lab);
    let out = lab.wait_child(idx).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn send(lab: &Lab, from: HostId, bind: u16, to: SocketAddr, payload: &str) {
    let out = lab
        .exec(
            from,
            Path::new(PROBE),
            &[
                "probe",
                "send",
                "--bind",
                &bind.to_string(),
                "--to",
                &to.to_string(),
                "--payload",
                payload,
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that `host` reaches `dst` over IPv6 (one echo).
fn assert_ping6(lab: &Lab, host: HostId, dst: &str) {
    let out = lab
        .exec(host, Path::new("ping"), &["-6", "-c", "1", "-W", "2", dst])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn observed(got: &[Received], from: SocketAddr) -> Option<SocketAddr> {
    got.iter()
        .find(|r| r.from == from)
        .and_then(|r| r.observed())
}

fn arrived(got: &[Received], payload: &str) -> bool {
    got.iter().any(|r| r.payload == payload)
}

/// Sends unsolicited datagrams to `mapped` from S1's other port, from S2's
/// other port and from S3; returns which arrived (s1, s2, s3).
fn unsolicited(
    lab: &mut Lab,
    w: &World,
    host: HostId,
    bind: u16,
    mapped: SocketAddr,
) -> (bool, bool, bool, Vec<Received>) {
    let targets = [addr(lab, w.s1, 9000), addr(lab, w.s2, 9000)];
    let (s1, s2, s3) = (w.s1, w.s2, w.s3);
    let got = session(lab, host, bind, &targets, 1500, |lab| {
        send(lab, s1, 9100, mapped, "from-s1-other-port");
        send(lab, s2, 9100, mapped, "from-s2-other-port");
        send(lab, s3, 9100, mapped, "from-s3");
    });
    (
        arrived(&got, "from-s1-other-port"),
        arrived(&got, "from-s2-other-port"),
        arrived(&got, "from-s3"),
        got,
    )
}

#[test]
fn public_hosts_are_reachable_unsolicited_on_ipv4_and_ipv6() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let h = lab.add_public_host("h").unwrap();
    let own = addr(&lab, h, 7001);
    let (s1, s2, s3, got) = unsolicited(&mut lab, &w, h, 7001, own);
    assert_eq!(observed(&got, addr(&lab, w.s1, 9000)), Some(own));
    assert_eq!((s1, s2, s3), (true, true, true), "{got:?}");
    let v6 = lab.host(w.s1).ipv6.unwrap().to_string();
    assert_ping6(&lab, h, &v6);
}

#[test]
fn port_restricted_maps_independently_and_filters_by_address_and_port() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab
        .add_router(RouterKind::PortRestricted, opts(30))
        .unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let public = lab.router(r).public_ip;
    let mapped = SocketAddr::from((public, 7001));
    let (s1, s2, s3, got) = unsolicited(&mut lab, &w, h, 7001, mapped);
    // Endpoint-independent mapping, port kept: both reflectors see the same.
    assert_eq!(
        observed(&got, addr(&lab, w.s1, 9000)),
        Some(mapped),
        "{got:?}"
    );
    assert_eq!(
        observed(&got, addr(&lab, w.s2, 9000)),
        Some(mapped),
        "{got:?}"
    );
    // Address-and-port-dependent filtering: replies only.
    assert_eq!((s1, s2, s3), (false, false, false), "{got:?}");
}

#[test]
fn restricted_filters_by_address_only() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::Restricted, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let mapped = SocketAddr::from((lab.router(r).public_ip, 7001));
    let (s1, s2, s3, got) = unsolicited(&mut lab, &w, h, 7001, mapped);
    assert_eq!(observed(&got, addr(&lab, w.s1, 9000)), Some(mapped));
    assert_eq!((s1, s2, s3), (true, true, false), "{got:?}");
}

#[test]
fn full_cone_lets_anyone_in_once_mapped() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::FullCone, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let mapped = SocketAddr::from((lab.router(r).public_ip, 7001));
    let (s1, s2, s3, got) = unsolicited(&mut lab, &w, h, 7001, mapped);
    assert_eq!(observed(&got, addr(&lab, w.s2, 9000)), Some(mapped));
    assert_eq!((s1, s2, s3), (true, true, true), "{got:?}");
}

/// The ports a router of `kind` maps one host socket to for three
/// destinations (S1:9000, S1:9001, S2:9000).
fn mapped_ports(lab: &mut Lab, w: &World, kind: RouterKind) -> Vec<u16> {
    let r = lab.add_router(kind, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let targets = [
        addr(lab, w.s1, 9000),
        addr(lab, w.s1, 9001),
        addr(lab, w.s2, 9000),
    ];
    let got = session(lab, h, 7001, &targets, 1000, |_| {});
    targets
        .iter()
        .map(|t| observed(&got, *t).expect("reply").port())
        .collect()
}

#[test]
fn symmetric_random_maps_each_destination_to_a_random_port() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let ports = mapped_ports(&mut lab, &w, RouterKind::SymmetricRandom);
    assert!(
        ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2],
        "{ports:?}"
    );
    assert!(!ports.contains(&7001), "{ports:?}");
}

#[test]
fn symmetric_sequential_allocates_ports_in_order() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let ports = mapped_ports(&mut lab, &w, RouterKind::SymmetricSequential);
    assert_eq!(ports[1], ports[0] + 1, "{ports:?}");
    assert_eq!(ports[2], ports[1] + 1, "{ports:?}");
}

#[test]
fn firewall_routes_public_addresses_and_admits_replies_only() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::Firewall, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let own = SocketAddr::from((lab.host(h).ipv4, 7001));
    assert!(lab.host(h).ipv6.is_some());
    let (s1, s2, s3, got) = unsolicited(&mut lab, &w, h, 7001, own);
    // No NAT: the reflector sees the host's own address.
    assert_eq!(observed(&got, addr(&lab, w.s1, 9000)), Some(own));
    assert_eq!((s1, s2, s3), (false, false, false), "{got:?}");
    // IPv6: the host reaches the internet's IPv6 side through the firewall.
    assert_ping6(&lab, h, "2001:db8::1:1");
}

#[test]
fn bindings_expire_after_the_router_timeout() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::PortRestricted, opts(2)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let mapped = SocketAddr::from((lab.router(r).public_ip, 7001));
    let silent = addr(&lab, w.s3, 9200);
    let s3 = w.s3;
    // One outbound datagram to S3 (nothing answers there), then S3 "replies"
    // from that port at once (a reply: admitted) and after the binding died.
    let got = session(&mut lab, h, 7001, &[silent], 6500, |lab| {
        send(lab, s3, 9200, mapped, "reply-in-time");
        std::thread::sleep(Duration::from_millis(4500));
        send(lab, s3, 9200, mapped, "reply-too-late");
    });
    assert!(arrived(&got, "reply-in-time"), "{got:?}");
    assert!(!arrived(&got, "reply-too-late"), "{got:?}");
}

#[test]
fn upnp_mapping_lets_inbound_traffic_in() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::Upnp, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let host_ip = lab.host(h).ipv4.to_string();
    let mapped = SocketAddr::from((lab.router(r).public_ip, 7001));
    // Before a mapping: port-restricted behaviour.
    let (_, _, s3_before, _) = unsolicited(&mut lab, &w, h, 7001, mapped);
    assert!(!s3_before);
    // miniupnpd may take a moment to start listening.
    let mut added = None;
    for _ in 0..30 {
        let out = lab
            .exec(
                h,
                Path::new("upnpc"),
                &["-a", &host_ip, "7001", "7001", "UDP"],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("is redirected to internal") {
            added = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(added.is_some(), "upnpc could not add a mapping");
    // A fresh source port: the earlier attempt from S3:9100 left a
    // conntrack entry for that exact tuple, which would bypass the new DNAT.
    let s3 = w.s3;
    let got = session(&mut lab, h, 7001, &[], 1500, |lab| {
        send(lab, s3, 9101, mapped, "via-upnp")
    });
    assert!(arrived(&got, "via-upnp"), "{got:?}");
}

#[test]
fn cgn_puts_the_home_router_behind_a_carrier_nat() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let r = lab.add_router(RouterKind::Cgn, opts(30)).unwrap();
    let h = lab.add_host(r, "h").unwrap();
    let router = lab.router(r).clone();
    assert_eq!(router.wan_ip.octets()[..2], [100, 64]);
    let targets = [addr(&lab, w.s1, 9000)];
    let got = session(&mut lab, h, 7001, &targets, 1000, |_| {});
    let seen = observed(&got, targets[0]).expect("reply through two NATs");
    assert_eq!(seen.ip(), std::net::IpAddr::V4(router.public_ip));
    // UPnP on the home router could never help: its WAN is not public.
    assert_ne!(router.public_ip, router.wan_ip);
}

#[test]
fn udp_blocked_and_lossy_routers_drop_udp() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    let blocked = lab.add_router(RouterKind::UdpBlocked, opts(30)).unwrap();
    let hb = lab.add_host(blocked, "blocked").unwrap();
    let lossy = lab
        .add_router(
            RouterKind::PortRestricted,
            RouterOptions {
                loss_percent: 100,
                ..opts(30)
            },
        )
        .unwrap();
    let hl = lab.add_host(lossy, "lossy").unwrap();
    let targets = [addr(&lab, w.s1, 9000)];
    for h in [hb, hl] {
        let got = session(&mut lab, h, 7001, &targets, 800, |_| {});
        assert!(got.is_empty(), "{got:?}");
    }
    // TCP still leaves the UDP-blocked LAN (a host there can reach the
    // internet at all).
    let out = lab
        .exec(hb, Path::new("ping"), &["-c", "1", "-W", "2", "11.0.0.1"])
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn hairpinning_is_per_router() {
    let Some(mut lab) = lab() else { return };
    let w = world(&mut lab);
    for hairpin in [true, false] {
        let r = lab
            .add_router(
                RouterKind::PortRestricted,
                RouterOptions {
                    hairpin,
                    ..opts(30)
                },
            )
            .unwrap();
        let h1 = lab.add_host(r, "h1").unwrap();
        let h2 = lab.add_host(r, "h2").unwrap();
        let public = lab.router(r).public_ip;
        let targets = [addr(&lab, w.s1, 9000)];
        // h2 maps port 7002 by talking to S1; h1 sends to the public
        // address of that mapping.
        let got = session(&mut lab, h2, 7002, &targets, 1500, |lab| {
            send(lab, h1, 7001, SocketAddr::from((public, 7002)), "hairpin");
        });
        assert_eq!(
            arrived(&got, "hairpin"),
            hairpin,
            "hairpin={hairpin}: {got:?}"
        );
    }
}

#[test]
fn labs_remove_their_namespaces() {
    let Some(lab) = lab() else { return };
    let prefix = lab.prefix().to_owned();
    drop(lab);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&prefix));
}
