//! Integration tests: real `p2pos up` processes on loopback.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn id_is_stable_and_printed_alone() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(bin())
            .arg("--data-dir")
            .arg(dir.path())
            .arg("id")
            .output()
            .unwrap()
    };
    let a = run();
    let b = run();
    assert!(a.status.success());
    let id = String::from_utf8(a.stdout.clone()).unwrap();
    assert_eq!(id.trim().len(), 55, "{id:?}");
    assert_eq!(id.lines().count(), 1);
    assert_eq!(a.stdout, b.stdout);
}

/// `p2pos sim --json` prints the issue's keys, and the same seed gives the
/// same figures (on huge pages, the default, the simulator runs itself
/// again on Linux: the output is that of the second run, whole; on small
/// pages it does not).
#[test]
fn sim_json_has_its_keys_and_repeats_with_the_seed() {
    let run = |huge_pages: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["sim", "--nodes", "300", "--duration", "2m", "--lookups"])
            .args(["40", "--seed", "7", "--json"]);
        cmd.env_remove("_RJEM_MALLOC_CONF");
        if !huge_pages {
            cmd.arg("--small-pages");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in [
            "nodes",
            "lookups",
            "lookup_success_rate",
            "hops_p50",
            "hops_p90",
            "hops_p99",
            "latency_ms_p50",
            "latency_ms_p90",
            "latency_ms_p99",
            "put_success_rate",
            "get_success_rate",
            "maintenance_bytes_per_node_per_s",
            "wall_s",
            "peak_rss_mb",
            "seed",
        ] {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        // What a run measures of the machine, not of the network.
        for key in ["wall_s", "setup_s", "events_s", "peak_rss_mb", "memory_mb"] {
            v.as_object_mut().unwrap().remove(key);
        }
        v
    };
    let huge = run(true);
    assert_eq!(huge["nodes"], 300);
    assert_eq!(huge["seed"], 7);
    assert_eq!(huge["lookups"], 40);
    assert!(
        huge["lookup_success_rate"].as_f64().unwrap() > 0.9,
        "{huge}"
    );
    assert_eq!(huge, run(false));
}

#[test]
fn stream_of_20_mb_arrives_byte_identical() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    let data: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut listener = Command::new(bin())
        .arg("--data-dir")
        .arg(b.path())
        .args(["listen", "chat"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("service registered", Duration::from_secs(10), || {
        b.status()["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    });
    let mut connect = Command::new(bin())
        .arg("--data-dir")
        .arg(a.path())
        .args(["connect", &b.peer_id, "chat", "--addr", &b.addr_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = connect.stdin.take().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        })
    };
    let mut received = Vec::new();
    listener
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut received)
        .unwrap();
    writer.join().unwrap();
    assert!(connect.wait().unwrap().success());
    assert!(listener.wait().unwrap().success());
    assert_eq!(received.len(), data.len());
    assert!(received == data, "stream content differs");
    // The path of the session is shown.
    let sessions = a.status()["sessions"].clone();
    assert_eq!(sessions[0]["peer"], b.peer_id.as_str());
    assert_eq!(sessions[0]["path"], "lan");
    assert!(sessions[0]["rtt_ms"].as_f64().is_some());
}

#[test]
fn dialing_under_a_wrong_id_fails_clearly() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    let c = Daemon::start(&[]);
    // c's ID at b's address.
    let out = a.cmd(&["ping", &c.peer_id, "--addr", &b.addr_string()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("presented another peer ID"), "{err}");
    assert!(a.status()["sessions"].as_array().unwrap().is_empty());
    // A typo in an ID is caught before any dial.
    let mut typo = b.peer_id.clone().into_bytes();
    typo[3] = if typo[3] == b'a' { b'b' } else { b'a' };
    let out = a.cmd(&[
        "ping",
        std::str::from_utf8(&typo).unwrap(),
        "--addr",
        &b.addr_string(),
    ]);
    assert_fails_with(&out, "checksum");
}

#[test]
fn private_network_refuses_public_node_and_other_networks() {
    let secrets = tempfile::tempdir().unwrap();
    let s1 = secrets.path().join("net1.secret");
    let s2 = secrets.path().join("net2.secret");
    for s in [&s1, &s2] {
        let out = Command::new(bin())
            .args(["network", "new"])
            .arg(s)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let p1 = Daemon::start(&["--network-secret", s1.to_str().unwrap()]);
    let p2 = Daemon::start(&["--network-secret", s1.to_str().unwrap()]);
    let other = Daemon::start(&["--network-secret", s2.to_str().unwrap()]);
    let public = Daemon::start(&[]);

    // Same network: works.
    let out = p1.cmd(&["ping", &p2.peer_id, "--addr", &p2.addr_string(), "-c", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(p1.status()["network"]
        .as_str()
        .unwrap()
        .starts_with("private:"));

    // Public -> private, private -> public, private -> other private: no answer.
    for (from, to) in [(&public, &p1), (&p1, &public), (&other, &p1)] {
        let out = from.cmd(&["ping", &to.peer_id, "--addr", &to.addr_string(), "-c", "1"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("different network"),
            "{}",
            stderr(&out)
        );
    }
    // Probes (overlay datagrams) get no answer across networks either.
    let out = public.cmd(&["probe", &p1.addr_string()]);
    assert!(!out.status.success());
    // The receiving nodes counted and logged the foreign traffic.
    assert!(
        p1.status()["counters"]["foreign_network_dropped"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        public.status()["counters"]["foreign_network_dropped"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        p1.log().contains("another private network") || p1.log().contains("public network"),
        "{}",
        p1.log()
    );
}

#[test]
fn api_rejects_bad_requests_and_keeps_running() {
    let port = free_tcp_port();
    let api_addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--api-tcp", &api_addr]);
    let token = std::fs::read_to_string(d.path().join("api.token")).unwrap();
    let token = token.trim();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.path().join("api.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let tcp = || TcpStream::connect(&api_addr).unwrap();
    // No token, wrong token.
    let (status, body) = raw_http(&mut tcp(), "GET", "/v1/status", None, &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("api.token"));
    let (status, _) = raw_http(
        &mut tcp(),
        "GET",
        "/v1/status",
        None,
        &["Authorization: Bearer nope"],
    );
    assert_eq!(status, 401);
    // Right token.
    let auth = format!("Authorization: Bearer {token}");
    let (status, body) = raw_http(&mut tcp(), "GET", "/v1/status", None, &[&auth]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&d.peer_id));

    // Garbage over the Unix socket.
    for (method, path, body) in [
        ("POST", "/v1/ping", Some("{not json")),
        ("POST", "/v1/ping", Some("{\"peer\": \"abc\"}")),
        ("POST", "/v1/ping", Some("{\"peer\": 5}")),
        (
            "POST",
            "/v1/datagrams",
            Some("{\"peer\":\"x\",\"service\":\"s\",\"data\":\"!!\"}"),
        ),
        ("PUT", "/v1/services/Bad%20Name", None),
        ("POST", "/v1/streams?peer=zz&service=chat", None),
        ("GET", "/v1/nothing-here", None),
        ("DELETE", "/v1/forwards/notanumber", None),
        ("POST", "/v1/exposes", Some("[1,2,3]")),
    ] {
        let (status, resp) = d.api(method, path, body);
        assert!(
            (400..500).contains(&status),
            "{method} {path} {body:?} -> {status} {resp}"
        );
        assert!(resp.contains("\"error\""), "{resp}");
    }
    // Raw garbage bytes on the socket.
    let mut s = std::os::unix::net::UnixStream::connect(d.path().join("api.sock")).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    // Still running and answering.
    assert_eq!(d.api("GET", "/v1/status", None).0, 200);
}

#[test]
fn random_datagrams_leave_the_node_running_and_answering() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..1000 {
        let len = (next() % 1400) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer a share to each demultiplexer branch.
        if !buf.is_empty() {
            buf[0] = match i % 5 {
                0 => 0xc0 | (buf[0] & 0x3f), // QUIC long header
                1 => 0x40 | (buf[0] & 0x3f), // QUIC short header
                2 => 0x30,                   // overlay
                3 => 0x31,                   // private frame
                _ => buf[0],
            };
        }
        sock.send_to(&buf, a.addr).unwrap();
        if i % 20 == 0 {
            // Pace the flood a little so the kernel's socket buffer keeps it.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = b.cmd(&["ping", &a.peer_id, "--addr", &a.addr_string(), "-c", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.cmd(&["probe", &a.addr_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:"));
    let counters = a.status()["counters"].clone();
    // Every kind of garbage was seen and counted (QUIC-looking junk is
    // dropped inside QUIC itself).
    for kind in [
        "unknown_datagrams_dropped",
        "overlay_malformed",
        "foreign_network_dropped",
    ] {
        assert!(counters[kind].as_u64().unwrap() > 50, "{kind}: {counters}");
    }
}

#[test]
fn forwarded_tcp_echo_carries_50_concurrent_connections() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    // A TCP echo server next to b.
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                // Half-close seen: answer with our own FIN.
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let out = b.cmd(&["expose", "echo", &echo_port.to_string(), "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let local_port = free_tcp_port();
    let out = a.cmd(&[
        "forward",
        &local_port.to_string(),
        &b.peer_id,
        "echo",
        "--addr",
        &b.addr_string(),
        "--detach",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let workers: Vec<_> = (0..50u32)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", local_port)).unwrap();
                let msg: Vec<u8> = (0..100_000u32).map(|j| (j ^ i) as u8).collect();
                let mut reader = s.try_clone().unwrap();
                let reading = std::thread::spawn(move || {
                    let mut back = Vec::new();
                    reader.read_to_end(&mut back).unwrap();
                    back
                });
                s.write_all(&msg).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap(); // half-close
                let back = reading.join().unwrap();
                assert_eq!(back, msg, "connection {i}");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let status = a.status();
    assert_eq!(status["tunnels"]["forwards"][0]["connections"], 50);
    assert_eq!(b.status()["tunnels"]["exposes"][0]["connections"], 50);
}

#[test]
fn tunnel_errors_reach_both_ends() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    // Expose a port nothing listens on.
    let dead_port = free_tcp_port();
    let out = b.cmd(&["expose", "dead", &dead_port.to_string(), "--detach"]);
    assert!(out.status.success());
    let local_port = free_tcp_port();
    let out = a.cmd(&[
        "forward",
        &local_port.to_string(),
        &b.peer_id,
        "dead",
        "--addr",
        &b.addr_string(),
        "--detach",
    ]);
    assert!(out.status.success());
    let mut s = TcpStream::connect(("127.0.0.1", local_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    // The forwarding side resets the connection: an error, not data or a hang.
    assert!(
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // And `connect` to a missing service says so.
    let out = a.cmd(&["connect", &b.peer_id, "nothing", "--addr", &b.addr_string()]);
    assert_fails_with(&out, "no such service");
}

#[test]
fn second_daemon_on_same_data_dir_is_refused() {
    let a = Daemon::start(&[]);
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(a.path())
        .args(["up", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("another p2pos daemon"), "{err}");
    assert!(err.contains(&format!("pid {}", a.child.id())), "{err}");
    // The first daemon is unharmed and stops cleanly on SIGTERM.
    assert_eq!(a.api("GET", "/v1/status", None).0, 200);
    assert!(a.stop().success());
}

#[test]
fn corrupt_or_exposed_key_refuses_to_start_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("id")
        .status()
        .unwrap()
        .success());
    let key = dir.path().join("identity.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_fails_with(&out, "chmod 600");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(&key, "garbage").unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_fails_with(&out, "corrupt");
}

#[test]
fn commands_without_a_daemon_say_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["status"])
        .output()
        .unwrap();
    assert_fails_with(&out, "p2pos up --data-dir");
}

#[test]
fn config_prints_effective_values_and_rejects_typos() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["config", "--listen", "127.0.0.1:9000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9000\""), "{text}");
    assert!(text.contains("keepalive_s"), "{text}");
    std::fs::write(dir.path().join("config.toml"), "listn = 1\n").unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["config"])
        .output()
        .unwrap();
    assert_fails_with(&out, "listn");
}

#[test]
fn peers_are_remembered_across_restarts() {
    let b = Daemon::start(&[]);
    let a = Daemon::start(&[]);
    let out = a.cmd(&["ping", &b.peer_id, "--addr", &b.addr_string(), "-c", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a_dir = a.into_dir();
    // Restart a on the same data dir: it finds b without --addr.
    let a = Daemon::start_in(a_dir, &[]);
    let out = a.cmd(&["ping", &b.peer_id, "-c", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let peers = a.cmd(&["peers", "--json"]);
    assert!(String::from_utf8_lossy(&peers.stdout).contains(&b.peer_id));
}

#[test]
fn python_example_client_streams_and_datagrams() {
    let a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    let script = workspace_root().join("examples/python/p2pos_client.py");
    let py = |d: &Daemon, args: &[&str]| {
        Command::new("python3")
            .arg(&script)
            .arg("--data-dir")
            .arg(d.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = py(&a, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&a.peer_id));

    let mut server = Command::new("python3")
        .arg(&script)
        .arg("--data-dir")
        .arg(b.path())
        .args(["echo-server", "pyecho"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    server
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    let out = py(
        &a,
        &[
            "send",
            &b.peer_id,
            "pyecho",
            "hello over p2pos",
            "--addr",
            &b.addr_string(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello over p2pos"
    );
    assert!(server.wait().unwrap().success());

    // Datagrams: register a service on b through the API, send from a.
    assert_eq!(b.api("PUT", "/v1/services/dgram", None).0, 201);
    let out = py(
        &a,
        &[
            "datagram",
            &b.peer_id,
            "dgram",
            "ping-datagram",
            "--addr",
            &b.addr_string(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = py(&b, &["recv-datagrams", "dgram", "--timeout-ms", "5000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ping-datagram") && text.contains(&a.peer_id),
        "{text}"
    );
    // Errors come back as messages.
    let out = py(
        &a,
        &[
            "send",
            &b.peer_id,
            "missing",
            "x",
            "--addr",
            &b.addr_string(),
        ],
    );
    assert_fails_with(&out, "no such service");
}

#[test]
fn demo_runs_and_exits_cleanly() {
    let out = Command::new(bin())
        .args(["demo", "--nodes", "3", "--duration", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"], 3);
    assert_eq!(v["sessions_per_pair"], 1.0);
    assert_eq!(v["errors"], 0);
    assert!(v["streams_verified"].as_u64().unwrap() > 0);
}

#[test]
fn bootstrap_peers_get_a_session_at_start() {
    let b = Daemon::start(&[]);
    let entry = format!("{}@{}", b.peer_id, b.addr_string());
    let a = Daemon::start(&["--bootstrap", &entry]);
    wait_until("bootstrap session", Duration::from_secs(10), || {
        a.status()["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["peer"] == b.peer_id.as_str()))
    });
    // A malformed entry is refused with the expected form.
    let out = Command::new(bin())
        .args(["config", "--bootstrap", "nonsense"])
        .output()
        .unwrap();
    assert_fails_with(&out, "<peer-id>@<ip:port>");
}

#[test]
fn ten_daemons_find_each_other_by_key() {
    let first = Daemon::start(&[]);
    let entry = format!("{}@{}", first.peer_id, first.addr_string());
    let mut nodes = vec![first];
    for _ in 0..9 {
        nodes.push(Daemon::start(&["--bootstrap", &entry]));
    }
    // Every node has joined and published its peer record.
    for n in &nodes[1..] {
        wait_until("peer record published", Duration::from_secs(20), || {
            n.status()["dht"]["peer_record_seq"].as_u64().unwrap_or(0) > 0
        });
    }
    for (i, a) in nodes.iter().enumerate() {
        for (j, b) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let out = a.cmd(&["lookup", &b.peer_id, "--json"]);
            assert!(out.status.success(), "{i} -> {j}: {}", stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["addrs"][0], b.addr_string().as_str(), "{i} -> {j}: {v}");
        }
    }
    // Reach a peer by key alone: no address, never met before.
    let out = nodes[4].cmd(&["ping", &nodes[7].peer_id, "-c", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Records: put on one node, get from another.
    let out = nodes[2].cmd(&["dht", "put", "motd", "hello from node 2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = nodes[8].cmd(&["dht", "get", &nodes[2].peer_id, "motd"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from node 2"
    );
    // A peer that never joined: a clear error, not a hang.
    let dir = tempfile::tempdir().unwrap();
    let stranger = Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .arg("id")
        .output()
        .unwrap();
    let stranger = String::from_utf8(stranger.stdout).unwrap();
    let out = nodes[1].cmd(&["lookup", stranger.trim()]);
    assert_fails_with(&out, "no record found");
    let out = nodes[1].cmd(&["ping", stranger.trim(), "-c", "1"]);
    assert_fails_with(&out, "not found in the DHT");
}

#[test]
fn peers_see_the_services_their_owner_shows_them_and_are_told_of_changes() {
    let owner = Daemon::start(&[]);
    let friend = Daemon::start(&[]);
    let stranger = Daemon::start(&[]);
    let reg = |name: &str, body: &str| {
        let (status, resp) = owner.api("PUT", &format!("/v1/services/{name}"), Some(body));
        assert_eq!(status, 201, "{resp}");
    };
    reg("chat", r#"{"description":"say hi","visibility":"public"}"#);
    reg("diary", r#"{"visibility":"hidden"}"#);
    reg(
        "vip",
        &format!(r#"{{"visibility":{{"peers":["{}"]}}}}"#, friend.peer_id),
    );
    let (status, resp) = owner.api(
        "PUT",
        "/v1/services/bad",
        Some(r#"{"visibility":"everyone"}"#),
    );
    assert_eq!(status, 400, "{resp}");
    assert!(
        resp.contains("visibility") || resp.contains("everyone"),
        "{resp}"
    );

    // The friend watches before it connects: it is told of what appears.
    let mut watch = std::process::Command::new(bin())
        .arg("--data-dir")
        .arg(friend.path())
        .args(["services", "--watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for peer in [&friend, &stranger] {
        let out = peer.cmd(&[
            "ping",
            &owner.peer_id,
            "--addr",
            &owner.addr_string(),
            "-c",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 2 {
        let line = lines.next().expect("watch ended").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["event"], "appeared", "{event}");
        assert_eq!(event["peer"], owner.peer_id.as_str());
        seen.push(event["name"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["chat", "vip"]);

    let list = |d: &Daemon| -> Vec<String> {
        let out = d.cmd(&["services", "--json"]);
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(list(&friend), ["chat", "vip"]);
    assert_eq!(list(&stranger), ["chat"]);
    let human = friend.cmd(&["services"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("say hi"));

    // Removing a service is seen at once.
    let (status, _) = owner.api("DELETE", "/v1/services/chat", None);
    assert_eq!(status, 204);
    let line = lines.next().expect("watch ended").unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (event["event"].as_str(), event["name"].as_str()),
        (Some("disappeared"), Some("chat"))
    );
    let _ = watch.kill();
    let _ = watch.wait();
}
