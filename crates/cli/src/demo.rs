//! `p2pos demo`: a small network of real nodes on loopback, shown live.
//!
//! Each node is a full p2pos node (its own identity, UDP socket, QUIC
//! sessions, DHT) in a temporary data dir. The nodes join the DHT through
//! node 1 and publish their signed peer records; then every pair dials each
//! other by key alone at the same moment (the addresses come from the DHT,
//! and exactly one session survives each simultaneous dial); then the nodes
//! send streams of random bytes to each other's echo service and check that
//! every byte comes back unchanged.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use p2pos_node::Node;

use crate::human_bytes;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Number of nodes (2 to 16).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Seconds of traffic after the network has formed.
    #[arg(long, default_value_t = 6)]
    duration: u64,
    /// Print one JSON object at the end instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Totals {
    streams: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Small xorshift generator: the demo's traffic pattern need not be secure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if !(2..=16).contains(&args.nodes) {
        bail!("--nodes must be between 2 and 16");
    }
    let live = !args.json && std::io::stdout().is_terminal();
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let node = Node::builder()
            .data_dir(dir.path().join(format!("node-{}", i + 1)))
            .listen("127.0.0.1:0".parse()?)
            .spawn()
            .await?;
        start_echo(&node)?;
        nodes.push(node);
    }
    if !args.json {
        println!(
            "started {} nodes on loopback in {}",
            nodes.len(),
            dir.path().display()
        );
        for (i, n) in nodes.iter().enumerate() {
            println!("  node-{}  {}  udp {}", i + 1, n.peer_id(), n.local_addr());
        }
        println!("the nodes join the DHT through node-1 and publish their peer records...");
    }
    let first = nodes[0].local_addr();
    for n in &nodes[1..] {
        if let Some(dht) = n.dht() {
            dht.bootstrap(first);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    // Every node, node-1 included (it publishes once others have reached
    // it), must have its peer record out before anyone dials by key.
    while nodes
        .iter()
        .any(|n| n.status().dht.is_none_or(|d| d.peer_record_seq == 0))
    {
        if Instant::now() > deadline {
            bail!("the nodes did not join the DHT within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !args.json {
        println!("every pair now dials each other by key alone, at the same moment...");
    }

    // Simultaneous dials by key only: i -> j and j -> i at once for every
    // pair; the addresses come from the peer records in the DHT.
    let mut dials = Vec::new();
    for (i, a) in nodes.iter().enumerate() {
        for (j, b) in nodes.iter().enumerate() {
            if i != j {
                let (a, b_id) = (a.clone(), b.peer_id());
                dials.push(tokio::spawn(async move { a.connect(b_id, None).await }));
            }
        }
    }
    for d in dials {
        d.await?.context("dial by key failed")?;
    }
    let formed = started.elapsed();
    // Let the duplicate sessions close on both ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !args.json {
        println!(
            "network formed in {:.0} ms; sending streams for {} s",
            formed.as_secs_f64() * 1000.0,
            args.duration
        );
    }

    let totals = Arc::new(Totals::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let peers: Vec<_> = nodes
            .iter()
            .filter(|n| n.peer_id() != node.peer_id())
            .map(|n| n.peer_id())
            .collect();
        let totals = totals.clone();
        senders.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            while Instant::now() < deadline {
                let peer = peers[(rng.next() % peers.len() as u64) as usize];
                let size = 16 * 1024 + (rng.next() % (256 * 1024)) as usize;
                let payload: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
                match echo_once(&node, peer, &payload).await {
                    Ok(()) => {
                        totals.streams.fetch_add(1, Ordering::Relaxed);
                        totals.bytes.fetch_add(2 * size as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("demo stream failed: {e:#}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if live {
            print!("\x1b[H\x1b[2J");
            print_table(&nodes, &totals, started);
        }
    }
    for s in senders {
        s.await?;
    }

    let sessions: usize = nodes.iter().map(|n| n.status().sessions.len()).sum();
    let duplicates: u64 = nodes
        .iter()
        .map(|n| n.status().counters.duplicate_sessions_closed)
        .sum();
    let pairs = nodes.len() * (nodes.len() - 1);
    let streams = totals.streams.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    if args.json {
        let out = serde_json::json!({
            "nodes": nodes.len(),
            "sessions_per_pair": sessions as f64 / pairs as f64,
            "formed_ms": formed.as_secs_f64() * 1000.0,
            "duplicate_sessions_closed": duplicates,
            "streams_verified": streams,
            "bytes_echoed": bytes,
            "errors": errors,
            "status": nodes.iter().map(|n| n.status()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if !live {
            print_table(&nodes, &totals, started);
        }
        println!();
        println!(
            "{} nodes found each other by key through the DHT; every pair holds exactly one session ({} simultaneous-dial twins closed); {} streams echoed byte-identical, {} moved, {} errors",
            nodes.len(),
            duplicates,
            streams,
            human_bytes(bytes),
            errors
        );
    }
    for n in &nodes {
        n.shutdown().await;
    }
    if sessions != pairs {
        bail!("expected one session per pair, found {sessions} session ends for {pairs}");
    }
    if errors > 0 || streams == 0 {
        bail!("{errors} streams failed");
    }
    Ok(())
}

fn start_echo(node: &Node) -> Result<()> {
    let mut echo = node.listen("echo", "sends every byte back")?;
    tokio::spawn(async move {
        while let Some(incoming) = echo.accept().await {
            tokio::spawn(async move {
                if let Ok(mut s) = incoming.accept().await {
                    let _ = tokio::io::copy(&mut s.recv, &mut s.send).await;
                    let _ = s.send.finish();
                    let _ = s.send.stopped().await;
                }
            });
        }
    });
    Ok(())
}

async fn echo_once(node: &Node, peer: p2pos_node::PeerId, payload: &[u8]) -> Result<()> {
    let stream = node.open_stream(peer, "echo", None).await?;
    let (mut send, mut recv) = (stream.send, stream.recv);
    let writer = async {
        send.write_all(payload).await?;
        send.finish()?;
        Ok::<_, anyhow::Error>(())
    };
    let reader = async {
        let back = recv.read_to_end(payload.len() + 1).await?;
        Ok::<_, anyhow::Error>(back)
    };
    let (w, back) = tokio::join!(writer, reader);
    w?;
    if back? != payload {
        bail!("echo from {} differs from what was sent", peer.short());
    }
    Ok(())
}

fn print_table(nodes: &[Node], totals: &Totals, started: Instant) {
    println!(
        "p2pos demo — {} nodes — {:.1} s — {} streams verified, {} echoed, {} errors",
        nodes.len(),
        started.elapsed().as_secs_f64(),
        totals.streams.load(Ordering::Relaxed),
        human_bytes(totals.bytes.load(Ordering::Relaxed)),
        totals.errors.load(Ordering::Relaxed)
    );
    println!();
    println!(
        "{:<8} {:<12} {:<12} {:<6} {:>9} {:>11} {:>11}",
        "NODE", "ID", "PEER", "PATH", "RTT", "SENT", "RECEIVED"
    );
    for (i, n) in nodes.iter().enumerate() {
        let status = n.status();
        for s in &status.sessions {
            let peer_name = nodes
                .iter()
                .position(|m| m.peer_id().to_string() == s.peer)
                .map(|p| format!("node-{}", p + 1))
                .unwrap_or_else(|| s.peer[..10].to_owned());
            println!(
                "{:<8} {:<12} {:<12} {:<6} {:>6.2} ms {:>11} {:>11}",
                format!("node-{}", i + 1),
                n.peer_id().short(),
                peer_name,
                s.path,
                s.rtt_ms,
                human_bytes(s.bytes_sent),
                human_bytes(s.bytes_received)
            );
        }
    }
}
