//! p2pos benchmarks. Every figure is measured in this run against a
//! baseline measured in the same run on the same machine:
//!
//! - bulk stream throughput through two p2pos nodes vs plain quinn (same TLS
//!   and transport settings, a plain UDP socket, no node around it);
//! - the same through a private network (per-datagram framing);
//! - time from "open a stream to a peer we have no session with" to the
//!   first byte, vs plain quinn connect + stream;
//! - TCP tunnel (forward -> QUIC -> expose) throughput vs a direct loopback
//!   TCP copy;
//! - idle daemon RSS and CPU (the release `p2pos up` binary), alone and
//!   holding one idle session.
//!
//! Run: `cargo run --release -p p2pos-bench [-- --json] [--mib N]`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use p2pos_net::tls::TlsIdentity;
use p2pos_net::EndpointOptions;
use p2pos_node::{Keypair, NetworkKey, Node};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 64 * 1024;

struct Args {
    json: bool,
    mib: usize,
    runs: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        json: false,
        mib: 256,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = true,
            "--mib" => args.mib = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.mib),
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.runs),
            "--help" | "-h" => {
                println!("p2pos-bench [--json] [--mib N (default 256)] [--runs N (default 3)]");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}; see --help");
                std::process::exit(2);
            }
        }
    }
    args
}

fn keypair(seed: u8) -> Keypair {
    Keypair::from_seed([seed; 32])
}

/// Sends `bytes` over `send`, and the receiver counts them; returns MB/s.
async fn pump(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    bytes: usize,
) -> Result<f64> {
    let start = Instant::now();
    let chunk = vec![0xa5u8; CHUNK];
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0usize;
        loop {
            match recv.read(&mut buf).await? {
                Some(n) => total += n,
                None => return Ok::<_, anyhow::Error>(total),
            }
        }
    });
    let mut sent = 0;
    while sent < bytes {
        let n = CHUNK.min(bytes - sent);
        send.write_all(&chunk[..n]).await?;
        sent += n;
    }
    send.finish()?;
    let got = reader.await??;
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Plain quinn: two endpoints on plain UDP sockets, same TLS and transport.
async fn plain_quinn_pair() -> Result<(
    quinn::Endpoint,
    quinn::Endpoint,
    SocketAddr,
    TlsIdentity,
    Keypair,
)> {
    let server_key = keypair(1);
    let client_key = keypair(2);
    let options = EndpointOptions::default();
    let transport = Arc::new(p2pos_net::transport_config(&options));
    let server_tls = TlsIdentity::new(&server_key)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(
        server_tls.server_config()?,
    )?));
    server_config.transport_config(transport.clone());
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let server_addr = server.local_addr()?;
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    Ok((
        server,
        client,
        server_addr,
        TlsIdentity::new(&client_key)?,
        server_key,
    ))
}

fn plain_client_config(client_tls: &TlsIdentity, server: &Keypair) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(client_tls.client_config(server.peer_id())?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(p2pos_net::transport_config(
        &EndpointOptions::default(),
    )));
    Ok(config)
}

async fn plain_quinn_throughput(bytes: usize) -> Result<f64> {
    let (server, client, addr, client_tls, server_key) = plain_quinn_pair().await?;
    let acceptor = tokio::spawn(async move {
        let conn = server.accept().await.context("no incoming")?.await?;
        let (send, recv) = conn.accept_bi().await?;
        Ok::<_, anyhow::Error>((conn, send, recv, server))
    });
    let conn = client
        .connect_with(
            plain_client_config(&client_tls, &server_key)?,
            addr,
            "p2pos",
        )?
        .await?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(b"x").await?; // make the stream known to the peer
    let (_sconn, ssend, mut srecv, _server) = acceptor.await??;
    let mut one = [0u8; 1];
    srecv.read_exact(&mut one).await?;
    drop(ssend);
    let _ = recv;
    pump(send, srecv, bytes).await
}

async fn node_pair(network: Option<NetworkKey>) -> Result<(Node, Node)> {
    let mut a = Node::builder().listen("127.0.0.1:0".parse()?);
    let mut b = Node::builder().listen("127.0.0.1:0".parse()?);
    if let Some(key) = network {
        a = a.network(key.clone());
        b = b.network(key);
    }
    Ok((a.spawn().await?, b.spawn().await?))
}

async fn p2pos_throughput(bytes: usize, network: Option<NetworkKey>) -> Result<f64> {
    let (a, b) = node_pair(network).await?;
    stream_throughput(a, b, bytes).await
}

/// A to B through a third node relaying on loopback (the move to a direct
/// path is off, so every byte goes through the relay).
async fn relayed_throughput(bytes: usize) -> Result<f64> {
    // The owner's rate limits are not what is measured here.
    let unlimited = p2pos_node::RelayLimits {
        circuit_rate: 1 << 40,
        total_rate: 1 << 40,
        ..Default::default()
    };
    let relay = Node::builder()
        .listen("127.0.0.1:0".parse()?)
        .relay_limits(unlimited)
        .spawn()
        .await?;
    let node = || {
        Node::builder()
            .listen("127.0.0.1:0".parse().expect("valid literal"))
            .direct_upgrade(false)
            .spawn()
    };
    let (a, b) = (node().await?, node().await?);
    b.connect(relay.peer_id(), Some(relay.local_addr())).await?;
    a.connect_relayed(b.peer_id(), relay.peer_id(), relay.local_addr())
        .await?;
    let mbps = stream_throughput(a, b, bytes).await?;
    relay.shutdown().await;
    Ok(mbps)
}

async fn stream_throughput(a: Node, b: Node, bytes: usize) -> Result<f64> {
    let mut svc = b.listen("sink", "")?;
    let accept = tokio::spawn(async move {
        let incoming = svc.accept().await.context("no stream")?;
        let s = incoming.accept().await?;
        Ok::<_, anyhow::Error>((s, svc))
    });
    let out = a
        .open_stream(b.peer_id(), "sink", Some(b.local_addr()))
        .await?;
    let (inb, _svc) = accept.await??;
    let mbps = pump(out.send, inb.recv, bytes).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(mbps)
}

/// Time from "open a stream to a peer with no session" to its first byte.
async fn p2pos_first_byte() -> Result<Duration> {
    let (a, b) = node_pair(None).await?;
    let mut svc = b.listen("hello", "")?;
    tokio::spawn(async move {
        while let Some(incoming) = svc.accept().await {
            if let Ok(mut s) = incoming.accept().await {
                let _ = s.send.write_all(b"!").await;
                let _ = s.send.finish();
                let _ = s.send.stopped().await;
            }
        }
    });
    let start = Instant::now();
    let mut s = a
        .open_stream(b.peer_id(), "hello", Some(b.local_addr()))
        .await?;
    let mut one = [0u8; 1];
    s.recv.read_exact(&mut one).await?;
    let t = start.elapsed();
    a.shutdown().await;
    b.shutdown().await;
    Ok(t)
}

async fn plain_quinn_first_byte() -> Result<Duration> {
    let (server, client, addr, client_tls, server_key) = plain_quinn_pair().await?;
    let config = plain_client_config(&client_tls, &server_key)?;
    tokio::spawn(async move {
        if let Some(incoming) = server.accept().await {
            if let Ok(conn) = incoming.await {
                if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut b = [0u8; 1];
                    let _ = recv.read_exact(&mut b).await;
                    let _ = send.write_all(b"!").await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            }
        }
    });
    let start = Instant::now();
    let conn = client.connect_with(config, addr, "p2pos")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"?").await?;
    let mut one = [0u8; 1];
    recv.read_exact(&mut one).await?;
    Ok(start.elapsed())
}

async fn tcp_sink() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Sends `bytes` to a TCP address that answers with the count; MB/s.
async fn tcp_send(addr: SocketAddr, bytes: usize) -> Result<f64> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        let n = CHUNK.min(bytes - sent);
        s.write_all(&chunk[..n]).await?;
        sent += n;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    if u64::from_be_bytes(count) as usize != bytes {
        bail!(
            "tunnel delivered {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

async fn tunnel_throughput(bytes: usize) -> Result<f64> {
    let sink = tcp_sink().await?;
    let (a, b) = node_pair(None).await?;
    b.expose("sink", sink).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, local) = a
        .forward(
            "127.0.0.1:0".parse()?,
            b.peer_id(),
            "sink",
            Some(b.local_addr()),
        )
        .await?;
    let mbps = tcp_send(local, bytes).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(mbps)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after the comm they are 12 and 13.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

struct Idle {
    rss_mib: f64,
    cpu_percent: f64,
}

/// Starts release daemons and measures the first one while idle.
fn idle_daemon(with_session: bool, settle: Duration, window: Duration) -> Result<Idle> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("p2pos");
    if !bin.exists() {
        bail!(
            "{} not found: build it with cargo build --release -p p2pos",
            bin.display()
        );
    }
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let ports = [free_port()?, free_port()?];
    let mut children = Vec::new();
    for (dir, port) in dirs.iter().zip(ports) {
        children.push(ChildGuard(
            std::process::Command::new(&bin)
                .arg("--data-dir")
                .arg(dir.path())
                .args(["up", "--listen", &format!("127.0.0.1:{port}")])
                .stderr(std::process::Stdio::null())
                .spawn()?,
        ));
        if !with_session {
            break;
        }
    }
    let wait_for = |dir: &std::path::Path| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("api.sock").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for d in dirs.iter().take(children.len()) {
        wait_for(d.path());
    }
    if with_session {
        let id = std::process::Command::new(&bin)
            .arg("--data-dir")
            .arg(dirs[1].path())
            .arg("id")
            .output()?;
        let id = String::from_utf8(id.stdout)?.trim().to_owned();
        let out = std::process::Command::new(&bin)
            .arg("--data-dir")
            .arg(dirs[0].path())
            .args([
                "ping",
                &id,
                "--addr",
                &format!("127.0.0.1:{}", ports[1]),
                "-c",
                "1",
            ])
            .output()?;
        if !out.status.success() {
            bail!("ping failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::thread::sleep(settle);
    let pid = children[0].0.id();
    let ticks0 = proc_cpu_ticks(pid).context("cpu ticks")?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let ticks1 = proc_cpu_ticks(pid).context("cpu ticks")?;
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = proc_rss_kib(pid).context("rss")?;
    // Clock ticks are 1/100 s on Linux.
    Ok(Idle {
        rss_mib: rss as f64 / 1024.0,
        cpu_percent: (ticks1 - ticks0) as f64 / 100.0 / elapsed * 100.0,
    })
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn main() -> Result<()> {
    let args = parse_args();
    let bytes = args.mib * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let secret = NetworkKey::from_secret(b"benchmark private network secret")?;

    let mut quinn_runs = Vec::new();
    let mut p2pos_runs = Vec::new();
    let mut private_runs = Vec::new();
    let mut tcp_runs = Vec::new();
    let mut tunnel_runs = Vec::new();
    let mut relayed_runs = Vec::new();
    for run in 0..args.runs {
        eprintln!(
            "run {}/{}: {} MiB per transfer",
            run + 1,
            args.runs,
            args.mib
        );
        // Interleave baseline and subject so drift hits both alike.
        quinn_runs.push(rt.block_on(plain_quinn_throughput(bytes))?);
        p2pos_runs.push(rt.block_on(p2pos_throughput(bytes, None))?);
        private_runs.push(rt.block_on(p2pos_throughput(bytes, Some(secret.clone())))?);
        let sink = rt.block_on(tcp_sink())?;
        tcp_runs.push(rt.block_on(tcp_send(sink, bytes))?);
        tunnel_runs.push(rt.block_on(tunnel_throughput(bytes))?);
        relayed_runs.push(rt.block_on(relayed_throughput(bytes))?);
    }
    let mut fb_quinn = Vec::new();
    let mut fb_p2pos = Vec::new();
    for _ in 0..30 {
        fb_quinn.push(rt.block_on(plain_quinn_first_byte())?.as_secs_f64() * 1000.0);
        fb_p2pos.push(rt.block_on(p2pos_first_byte())?.as_secs_f64() * 1000.0);
    }
    drop(rt);
    eprintln!("idle daemon: settling and measuring (about 40 s)");
    let idle_alone = idle_daemon(false, Duration::from_secs(5), Duration::from_secs(15))?;
    let idle_session = idle_daemon(true, Duration::from_secs(5), Duration::from_secs(15))?;

    let (q, p, pv) = (median(quinn_runs), median(p2pos_runs), median(private_runs));
    let (t, tu) = (median(tcp_runs), median(tunnel_runs));
    let rl = median(relayed_runs);
    let (fq, fp) = (median(fb_quinn), median(fb_p2pos));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "transfer_mib": args.mib,
                "runs": args.runs,
                "plain_quinn_mb_s": q,
                "p2pos_stream_mb_s": p,
                "p2pos_vs_quinn": p / q,
                "p2pos_private_mb_s": pv,
                "p2pos_private_vs_quinn": pv / q,
                "direct_tcp_mb_s": t,
                "tunnel_mb_s": tu,
                "tunnel_vs_tcp": tu / t,
                "relayed_stream_mb_s": rl,
                "relayed_vs_direct": rl / p,
                "first_byte_ms_plain_quinn_p50": fq,
                "first_byte_ms_p2pos_p50": fp,
                "idle_rss_mib": idle_alone.rss_mib,
                "idle_cpu_percent": idle_alone.cpu_percent,
                "idle_with_session_rss_mib": idle_session.rss_mib,
                "idle_with_session_cpu_percent": idle_session.cpu_percent,
            })
        );
    } else {
        println!(
            "p2pos benchmark ({} MiB per transfer, median of {} runs, loopback)",
            args.mib, args.runs
        );
        println!();
        println!(
            "{:<44} {:>12} {:>12} {:>8}",
            "figure", "baseline", "p2pos", "ratio"
        );
        println!(
            "{:<44} {:>9.0} MB/s {:>7.0} MB/s {:>7.1}%",
            "bulk stream vs plain quinn",
            q,
            p,
            p / q * 100.0
        );
        println!(
            "{:<44} {:>9.0} MB/s {:>7.0} MB/s {:>7.1}%",
            "bulk stream, private network vs plain quinn",
            q,
            pv,
            pv / q * 100.0
        );
        println!(
            "{:<44} {:>9.0} MB/s {:>7.0} MB/s {:>7.1}%",
            "bulk stream, relayed vs direct p2pos",
            p,
            rl,
            rl / p * 100.0
        );
        println!(
            "{:<44} {:>9.0} MB/s {:>7.0} MB/s {:>7.1}%",
            "TCP tunnel vs direct loopback TCP",
            t,
            tu,
            tu / t * 100.0
        );
        println!(
            "{:<44} {:>10.2} ms {:>9.2} ms {:>7.2}x",
            "connect to first byte (fresh session, p50)",
            fq,
            fp,
            fp / fq
        );
        println!();
        println!(
            "idle daemon:                 RSS {:>6.1} MiB   CPU {:.3}%",
            idle_alone.rss_mib, idle_alone.cpu_percent
        );
        println!(
            "idle daemon, 1 idle session: RSS {:>6.1} MiB   CPU {:.3}%",
            idle_session.rss_mib, idle_session.cpu_percent
        );
    }
    Ok(())
}
