//! `p2pos`: the daemon, the command-line client of its local API, and the
//! demo.

mod client;
mod demo;
mod doctor;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hyper::Method;
use p2pos_node::config::Config;
use p2pos_node::data_dir::DataDir;
use p2pos_node::services::Visibility;
use p2pos_node::PeerId;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{query_value, ApiClient, RawStream};

#[derive(Parser)]
#[command(
    name = "p2pos",
    version,
    about = "p2pos: a peer-to-peer overlay. Nodes reach each other by key."
)]
struct Cli {
    /// The node's data directory (identity, peers, API socket).
    #[arg(long, global = true, env = "P2POS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's peer ID (creating the identity on first use).
    Id,
    /// Run the node in the foreground until Ctrl-C.
    Up(UpArgs),
    /// Print the effective configuration (config file plus defaults).
    Config(UpArgs),
    /// Check this node's connectivity and say what to fix: NAT, reachability,
    /// DHT, LAN.
    Doctor {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show identity, addresses, sessions and their paths.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List peers this node has met.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the round-trip time to a peer over an authenticated session.
    Ping {
        /// The peer's ID.
        peer: PeerId,
        /// The peer's address (IP:PORT), if this node does not know it.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Number of pings.
        #[arg(short, long, default_value_t = 3)]
        count: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Accept a stream for a service: the stream goes to stdout, stdin to the stream.
    Listen {
        /// The service name, e.g. chat.
        service: String,
        /// Keep accepting streams one after another (stdin is not sent).
        #[arg(short, long)]
        keep_open: bool,
        /// A short description peers see in their service lists.
        #[arg(short, long, default_value = "")]
        description: String,
        /// Who sees the service in this node's list: lan (peers on the LAN),
        /// public (every connected peer), hidden, or peers:<id>,<id>...
        #[arg(long, default_value = "lan", value_parser = parse_visibility)]
        visibility: Visibility,
    },
    /// List the services of peers on the LAN and of connected peers.
    Services {
        /// Only peers on the LAN.
        #[arg(long)]
        lan: bool,
        /// Print JSON (with --watch: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Keep running and print services as they appear and disappear.
        #[arg(long)]
        watch: bool,
    },
    /// Open a stream to a peer's service: stdin to the stream, the stream to stdout.
    Connect {
        /// The peer's ID.
        peer: PeerId,
        /// The service name.
        service: String,
        /// The peer's address (IP:PORT), if this node does not know it.
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Let peers reach a local TCP port as a service.
    Expose {
        /// The service name peers will use.
        service: String,
        /// Local TCP port, or IP:PORT.
        target: String,
        /// Leave it in the daemon and return (remove with the API).
        #[arg(long)]
        detach: bool,
    },
    /// Carry a local TCP port to a peer's service.
    Forward {
        /// Local port (on 127.0.0.1), or IP:PORT to listen on.
        local: String,
        /// The peer's ID.
        peer: PeerId,
        /// The peer's service.
        service: String,
        /// The peer's address (IP:PORT), if this node does not know it.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Leave it in the daemon and return (remove with the API).
        #[arg(long)]
        detach: bool,
    },
    /// Find a peer's record (its addresses) in the DHT by its ID.
    Lookup {
        /// The peer's ID.
        peer: PeerId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store and fetch signed records in the DHT (for tests and scripts).
    #[command(subcommand)]
    Dht(DhtCommand),
    /// Ask the node at an address which address it sees this node at.
    Probe {
        /// The other node's UDP address.
        addr: SocketAddr,
    },
    /// Private networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Start a small network of real nodes on loopback and show it working.
    Demo(demo::DemoArgs),
    /// Simulate a DHT network of many nodes (deterministic; same seed, same numbers).
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Nodes online at any time.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Simulated time, e.g. 90s, 30m, 1h.
    #[arg(long, default_value = "10m", value_parser = p2pos_sim::parse_duration)]
    duration: std::time::Duration,
    /// Churn, as median-session=DURATION (heavy-tailed sessions); default: none.
    #[arg(long, value_name = "median-session=DURATION")]
    churn: Option<String>,
    /// Lookups of random peers, spread over the run.
    #[arg(long, default_value_t = 10_000)]
    lookups: usize,
    /// Records put and fetched (default: a tenth of the lookups).
    #[arg(long)]
    records: Option<usize>,
    /// Share of nodes that are DHT clients (unreachable).
    #[arg(long, default_value_t = 0.3)]
    clients: f64,
    /// Datagram loss probability.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Routers in front of the nodes: `none`, or `realistic` (most map
    /// endpoint-independently, a fifth per destination, some CGN, a few
    /// UPnP; only reachable nodes serve the DHT, and --clients is ignored).
    #[arg(long, default_value = "none", value_parser = ["none", "realistic"])]
    nat: String,
    /// Connections by key between random nodes, spread over the run (with
    /// --nat realistic; default: as many as lookups).
    #[arg(long)]
    connects: Option<usize>,
    /// Replication factor k (a record's holders; a lookup ends when the k
    /// closest have answered).
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().k)]
    k: usize,
    /// Routing-table bucket size.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().bucket_size)]
    bucket_size: usize,
    /// A server takes the nodes a bucket refresh names into its first this
    /// many buckets unverified (its own lookups use them; they are handed
    /// to others once proven); into deeper ones after a proof ping each.
    /// 0: every entry of a server proven first; 128: none.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().unverified_buckets)]
    unverified_buckets: usize,
    /// Liveness pings a server sends per maintenance run (every two
    /// minutes) at most, to contacts silent for 20 minutes.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().pings_per_maintenance)]
    liveness_pings: usize,
    /// Liveness pings a client sends per maintenance run at most, to
    /// contacts silent for 30 minutes (no boost: its table serves only its
    /// own lookups).
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().client_pings_per_maintenance)]
    client_liveness_pings: usize,
    /// Each contact a run's liveness pings found gone earns one more ping
    /// at the next run, up to this many times --liveness-pings more.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().liveness_boost)]
    liveness_boost: usize,
    /// A client pings a contact not heard from for this long, e.g. 10m
    /// (default: the DHT's, 30 minutes).
    #[arg(long, value_parser = p2pos_sim::parse_duration)]
    contact_stale: Option<std::time::Duration>,
    /// A server pings a contact not heard from for this long (default:
    /// the DHT's, 20 minutes: its table answers everyone's lookups).
    #[arg(long, value_parser = p2pos_sim::parse_duration)]
    server_contact_stale: Option<std::time::Duration>,
    /// Refresh a bucket not touched for this long, e.g. 10m (default:
    /// the DHT's, 10 minutes).
    #[arg(long, value_parser = p2pos_sim::parse_duration)]
    bucket_refresh: Option<std::time::Duration>,
    /// How often a node runs its maintenance (bucket refreshes, liveness
    /// pings), e.g. 1m (default: the DHT's, two minutes).
    #[arg(long, value_parser = p2pos_sim::parse_duration)]
    maintenance: Option<std::time::Duration>,
    /// A client's byte budget for filling its table beyond its regular
    /// refreshes, in bytes sent per second of its life (after a first
    /// 8 KiB).
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().client_bytes_per_s)]
    client_bytes_per_s: u64,
    /// Contacts in one answer to a lookup query at most.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().answer_nodes)]
    answer_nodes: usize,
    /// Parallel requests per lookup.
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().alpha)]
    alpha: usize,
    /// Closest candidates a measured lookup, get or put always has asked,
    /// beyond the α in flight (0: only α; maintenance lookups use 0).
    #[arg(long, default_value_t = p2pos_proto::dht::DhtConfig::default().eager)]
    eager: usize,
    /// Whether reachable nodes ask to be introduced to the peer they look
    /// up (`off` for a baseline without).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    introductions: String,
    /// The seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sign ID proofs and records with real ed25519. By default the
    /// simulator uses a hash of the same size instead: the figures are the
    /// same, and runs are about three times faster.
    #[arg(long)]
    real_signatures: bool,
    /// Run on small pages. By default the simulator runs on transparent
    /// huge pages (Linux): at 10^6 nodes about 8% faster, for 24 MB more
    /// after 10 minutes (the churn hour's peak: 14,837 MiB)
    #[arg(long)]
    small_pages: bool,
    /// Run on transparent huge pages: the default (kept for scripts)
    #[arg(long, hide = true, conflicts_with = "small_pages")]
    huge_pages: bool,
    /// Threads (default: two from 50,000 nodes on, if the machine has
    /// them). The numbers are the same on any number of threads.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DhtCommand {
    /// Publish a record NAME of this node with VALUE (text, at most 1000 bytes).
    Put {
        /// The record's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Fetch the record NAME of PEER.
    Get {
        /// The owner's peer ID.
        peer: PeerId,
        /// The record's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Write a new random network secret to FILE (mode 0600). Give the same
    /// file to every node of the private network with --network-secret.
    New {
        /// Where to write the secret.
        file: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct UpArgs {
    /// Configuration file (default: config.toml in the data dir, if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to bind (default [::]:7447).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Join the private network whose secret is in FILE.
    #[arg(long, value_name = "FILE")]
    network_secret: Option<PathBuf>,
    /// Also serve the local API on this loopback TCP address (token in api.token).
    #[arg(long, value_name = "ADDR")]
    api_tcp: Option<SocketAddr>,
    /// Open a session to this peer at start, as <peer-id>@<ip:port> (repeatable).
    #[arg(long, value_name = "ID@ADDR")]
    bootstrap: Vec<String>,
    /// Only query the DHT, never serve it.
    #[arg(long, conflicts_with = "dht_server")]
    dht_client: bool,
    /// Always serve the DHT, even when reachability checks say this node is
    /// not reachable (default: decided by the checks).
    #[arg(long)]
    dht_server: bool,
    /// Do not announce this node or look for peers on the LAN (mDNS).
    #[arg(long)]
    no_mdns: bool,
}

fn data_dir(cli: &Cli) -> PathBuf {
    cli.data_dir.clone().unwrap_or_else(DataDir::default_path)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info,quinn=warn,quinn_proto=warn",
        1 => "debug,quinn=info,quinn_proto=info,hyper=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn effective_config(dir: &Path, args: &UpArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path, false)?,
        None => Config::load(&dir.join("config.toml"), true)?,
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(secret) = &args.network_secret {
        config.network_secret_file = Some(std::path::absolute(secret)?);
    }
    if let Some(tcp) = args.api_tcp {
        config.api.tcp = Some(tcp);
    }
    config.bootstrap.extend(args.bootstrap.iter().cloned());
    if args.dht_client {
        config.dht.mode = p2pos_node::dht::DhtMode::Client;
    }
    if args.dht_server {
        config.dht.mode = p2pos_node::dht::DhtMode::Server;
    }
    if args.no_mdns {
        config.lan.mdns = false;
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p2pos: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let dir = data_dir(&cli);
    let api = ApiClient::new(&dir);
    match cli.command {
        Command::Id => {
            let keypair = DataDir::open(&dir)?.load_or_create_identity()?;
            println!("{}", keypair.peer_id());
        }
        Command::Config(args) => print!("{}", effective_config(&dir, &args)?.to_toml()),
        Command::Up(args) => {
            init_logging(cli.verbose);
            let config = effective_config(&dir, &args)?;
            up(&dir, &config).await?;
        }
        Command::Doctor { json } => {
            let status = api.call(Method::GET, "/v1/status", None).await?;
            let report = doctor::diagnose(&status);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", doctor::render(&report));
            }
        }
        Command::Status { json } => {
            let status = api.call(Method::GET, "/v1/status", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Peers { json } => {
            let peers = api.call(Method::GET, "/v1/peers", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                for p in peers.as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<24} {}",
                        p["peer"].as_str().unwrap_or("?"),
                        p["last_addr"].as_str().unwrap_or("?"),
                        if p["connected"].as_bool() == Some(true) {
                            "connected"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Ping {
            peer,
            addr,
            count,
            json,
        } => {
            let body = json!({ "peer": peer.to_string(), "addr": addr.map(|a| a.to_string()), "count": count });
            let result = api.call(Method::POST, "/v1/ping", Some(&body)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let path = result["path"].as_str().unwrap_or("?");
                for (i, rtt) in result["rtt_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    println!(
                        "reply from {} via {path}: seq={} time={:.2} ms",
                        peer.short(),
                        i + 1,
                        rtt.as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
        Command::Listen {
            service,
            keep_open,
            description,
            visibility,
        } => {
            let registration = json!({ "description": description, "visibility": visibility });
            listen(&api, &service, &registration, keep_open).await?
        }
        Command::Services { lan, json, watch } => services(&api, lan, json, watch).await?,
        Command::Connect {
            peer,
            service,
            addr,
        } => {
            let mut path = format!("/v1/streams?peer={peer}&service={}", query_value(&service));
            if let Some(a) = addr {
                path.push_str(&format!("&addr={}", query_value(&a.to_string())));
            }
            let (stream, _) = api.upgrade(Method::POST, &path).await?;
            pipe_stdio(stream, true).await?;
        }
        Command::Expose {
            service,
            target,
            detach,
        } => {
            let target = parse_local(&target)?;
            let body = json!({ "service": service, "target": target.to_string() });
            let created = api.call(Method::POST, "/v1/exposes", Some(&body)).await?;
            let id = created["id"].as_u64().unwrap_or(0);
            eprintln!(
                "peers can now reach {target} as service {service:?} on this node (tunnel {id})"
            );
            if !detach {
                hold_until_signal(&api, &format!("/v1/exposes/{id}")).await?;
            }
        }
        Command::Forward {
            local,
            peer,
            service,
            addr,
            detach,
        } => {
            let listen = parse_local(&local)?;
            let body = json!({ "listen": listen.to_string(), "peer": peer.to_string(), "service": service, "addr": addr.map(|a| a.to_string()) });
            let created = api.call(Method::POST, "/v1/forwards", Some(&body)).await?;
            let id = created["id"].as_u64().unwrap_or(0);
            eprintln!(
                "forwarding {} -> {}/{service} (tunnel {id})",
                created["listen"].as_str().unwrap_or("?"),
                peer.short()
            );
            if !detach {
                hold_until_signal(&api, &format!("/v1/forwards/{id}")).await?;
            }
        }
        Command::Lookup { peer, json } => {
            let found = api
                .call(
                    Method::POST,
                    "/v1/lookup",
                    Some(&json!({ "peer": peer.to_string() })),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                println!("peer     {peer}");
                for a in found["addrs"].as_array().into_iter().flatten() {
                    println!("address  {}", a.as_str().unwrap_or("?"));
                }
                println!(
                    "record   seq {}  expires {}",
                    found["seq"], found["expires"]
                );
                println!(
                    "lookup   {} hops, {} ms",
                    found["hops"], found["elapsed_ms"]
                );
            }
        }
        Command::Dht(DhtCommand::Put { name, value }) => {
            let path = format!("/v1/dht/{}", query_value(&name));
            let r = api
                .call(Method::PUT, &path, Some(&json!({ "value": value })))
                .await?;
            println!("stored on {} nodes", r["stored"]);
        }
        Command::Dht(DhtCommand::Get { peer, name }) => {
            let path = format!("/v1/dht/{peer}/{}", query_value(&name));
            let r = api.call(Method::GET, &path, None).await?;
            println!("{}", r["value"].as_str().unwrap_or(""));
        }
        Command::Probe { addr } => {
            let result = api
                .call(
                    Method::POST,
                    "/v1/probe",
                    Some(&json!({ "addr": addr.to_string() })),
                )
                .await?;
            println!(
                "{} sees this node at {}",
                addr,
                result["observed"].as_str().unwrap_or("?")
            );
        }
        Command::Network(NetworkCommand::New { file }) => {
            let mut raw = [0u8; 32];
            getrandom_fill(&mut raw)?;
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            p2pos_node::data_dir::write_private(&file, format!("{hex}\n").as_bytes())
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", file.display())
                })?;
            eprintln!("wrote a new network secret to {}; give this file to every node of the network with --network-secret", file.display());
        }
        Command::Demo(args) => demo::run(args).await?,
        Command::Sim(args) => sim(args)?,
    }
    Ok(())
}

fn sim(args: SimArgs) -> Result<()> {
    #[cfg(target_os = "linux")]
    if !args.small_pages {
        sim_on_huge_pages();
    }
    let median_session = match &args.churn {
        None => None,
        Some(c) => {
            let value = c
                .strip_prefix("median-session=")
                .context("--churn takes median-session=DURATION, e.g. median-session=30m")?;
            Some(p2pos_sim::parse_duration(value).map_err(anyhow::Error::msg)?)
        }
    };
    if !(0.0..=1.0).contains(&args.clients) || !(0.0..1.0).contains(&args.loss) {
        anyhow::bail!("--clients is a share from 0 to 1 and --loss a probability below 1");
    }
    let defaults = p2pos_proto::dht::DhtConfig::default();
    let dht = p2pos_proto::dht::DhtConfig {
        k: args.k.max(1),
        bucket_size: args.bucket_size.max(1),
        pings_per_maintenance: args.liveness_pings,
        client_pings_per_maintenance: args.client_liveness_pings,
        unverified_buckets: args.unverified_buckets,
        liveness_boost: args.liveness_boost,
        contact_stale: args.contact_stale.unwrap_or(defaults.contact_stale),
        server_contact_stale: args
            .server_contact_stale
            .unwrap_or(defaults.server_contact_stale),
        bucket_refresh: args.bucket_refresh.unwrap_or(defaults.bucket_refresh),
        maintenance: args.maintenance.unwrap_or(defaults.maintenance),
        answer_nodes: args.answer_nodes.clamp(1, p2pos_proto::dht::MAX_NODES),
        client_bytes_per_s: args.client_bytes_per_s,
        alpha: args.alpha.max(1),
        eager: args.eager,
        introductions: args.introductions == "on",
        signatures: if args.real_signatures {
            p2pos_proto::dht::Signatures::Ed25519
        } else {
            p2pos_proto::dht::Signatures::SimulatedInsecure
        },
        ..defaults
    };
    let config = p2pos_sim::SimConfig {
        nodes: args.nodes.max(2),
        duration: args.duration,
        median_session,
        lookups: args.lookups,
        records: args.records.unwrap_or(args.lookups / 10),
        seed: args.seed,
        client_fraction: args.clients,
        loss: args.loss,
        warmup: std::time::Duration::from_secs(60).min(args.duration / 4),
        dht,
        progress: !args.json || std::io::IsTerminal::is_terminal(&std::io::stderr()),
        nat_mix: (args.nat == "realistic").then(|| p2pos_sim::nat::REALISTIC_MIX.to_vec()),
        connects: args.connects.unwrap_or(args.lookups),
        key_pairs: false,
        threads: args.threads,
        allocator_heap: allocator_heap(),
    };
    let r = p2pos_sim::run(&config);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rtt = r.rtt_ms_p50.max(1) as f64;
    println!("p2pos sim: {} nodes, seed {}", r.nodes, r.seed);
    println!(
        "  lookups          {} measured, {:.2}% found their target",
        r.lookups,
        r.lookup_success_rate * 100.0
    );
    let share = r
        .hops_share
        .iter()
        .enumerate()
        .filter(|(_, s)| **s >= 0.0005)
        .map(|(h, s)| format!("{h}: {:.1}%", s * 100.0))
        .collect::<Vec<_>>()
        .join("  ");
    println!(
        "  hops             p50 {}  p90 {}  p99 {}  mean {:.2}   [{share}]",
        r.hops_p50, r.hops_p90, r.hops_p99, r.hops_mean
    );
    println!(
        "  latency          p50 {} ms ({:.1}x RTT)  p90 {} ms  p99 {} ms ({:.1}x RTT)   [median RTT {} ms]",
        r.latency_ms_p50,
        r.latency_ms_p50 as f64 / rtt,
        r.latency_ms_p90,
        r.latency_ms_p99,
        r.latency_ms_p99 as f64 / rtt,
        r.rtt_ms_p50
    );
    let intro = &r.introductions;
    let per_lookup = |n: u64| n as f64 / intro.lookups_started.max(1) as f64;
    println!(
        "  introductions    p50 {} ms from servers (introduced), {} ms from clients;  per lookup: {:.2} sent, {:.2} answered, {:.2} dropped, {:.1}% found their target through one",
        r.latency_ms_p50_servers,
        r.latency_ms_p50_clients,
        per_lookup(intro.sent),
        per_lookup(intro.answered),
        per_lookup(intro.dropped),
        per_lookup(intro.introduced) * 100.0
    );
    println!(
        "  records          put {:.2}%  get {:.2}%;  gets: hops p50 {}  p99 {},  time p50 {} ms ({:.1}x RTT)  p99 {} ms",
        r.put_success_rate * 100.0,
        r.get_success_rate * 100.0,
        r.get_hops_p50,
        r.get_hops_p99,
        r.get_latency_ms_p50,
        r.get_latency_ms_p50 as f64 / rtt,
        r.get_latency_ms_p99
    );
    println!(
        "  DHT bytes/node/s servers {:.1}  clients {:.1}  all {:.1}",
        r.maintenance_bytes_per_server_per_s,
        r.maintenance_bytes_per_client_per_s,
        r.maintenance_bytes_per_node_per_s
    );
    println!(
        "  ID proofs        {:.4} per node per second (an ed25519 signature and its check each)",
        r.proofs_per_node_per_s
    );
    let q = &r.requests_per_node_per_s;
    println!(
        "  requests/node/s  queries {:.4}  stores {:.4}  liveness {:.4}  verify {:.4}  fill {:.4}  refresh {:.4}",
        q.queries, q.stores, q.liveness, q.verify, q.fill, q.refresh
    );
    if r.connects > 0 {
        println!(
            "  connects         {} by key, {:.2}% connected, {:.2}% direct, {:.2}% relayed",
            r.connects,
            r.connect_success_rate * 100.0,
            r.direct_share * 100.0,
            r.relayed_share * 100.0
        );
        println!(
            "  time to connect  record known: p50 {} ms ({:.1}x RTT)  p99 {} ms;  record fetched cold: p50 {} ms ({:.1}x RTT)  p99 {} ms",
            r.connect_cached_ms_p50,
            r.connect_cached_ms_p50 as f64 / rtt,
            r.connect_cached_ms_p99,
            r.connect_ms_p50,
            r.connect_ms_p50 as f64 / rtt,
            r.connect_ms_p99
        );
        println!(
            "  relays           {:.1} circuits per relaying node (max {}); signalling {:.2} B/node/s",
            r.relay_circuits_per_relay_mean,
            r.relay_circuits_max,
            r.signalling_bytes_per_node_per_s
        );
    }
    println!("  churn            {} departures", r.departures);
    println!(
        "  run              {} events ({} deliveries, {} timers) in {:.1} s wall ({:.1} s setting up, {:.1} s of events), peak RSS {:.0} MB",
        r.events, r.deliveries, r.timers, r.wall_s, r.setup_s, r.events_s, r.peak_rss_mb
    );
    let m = &r.memory_mb;
    println!(
        "  memory at end    tables {:.0} MB, DHT nodes {:.0}, requests {:.0}, lookups {:.0}, records {:.0}, cookies {:.0}, queues {:.0}, simulator {:.0}",
        m.tables, m.dht_nodes, m.requests, m.lookups, m.records, m.cookies, m.queues, m.world
    );
    if m.allocator_in_use > 0.0 {
        println!(
            "  allocator        {:.0} MB in use, {:.0} MB more resident",
            m.allocator_in_use, m.allocator_free
        );
    }
    println!(
        "  routing tables   {:.1} entries and {:.1} replacements per node, mean; {:.1}% of entries are nodes that left; live ones {:.0} ms away (round trip, mean)",
        m.table_entries_mean,
        m.table_replacements_mean,
        m.table_dead_share * 100.0,
        m.table_rtt_ms_mean
    );
    let bands: Vec<String> = m
        .tables_by_age
        .iter()
        .filter(|b| b.nodes > 0)
        .map(|b| {
            format!(
                "{}+ min: {} nodes, {:.0} ({:.0} gone)",
                b.min_age_min, b.nodes, b.entries_mean, b.dead_mean
            )
        })
        .collect();
    println!("  tables by age    {}", bands.join("; "));
    Ok(())
}

fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf)
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))
}

fn parse_local(s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .with_context(|| format!("{s:?} is neither a port nor an IP:PORT address"))
}

async fn up(dir: &Path, config: &Config) -> Result<()> {
    let daemon = p2pos_node::daemon::Daemon::start(dir, config).await?;
    let status = daemon.node.status();
    eprintln!("p2pos node {}", status.peer_id);
    eprintln!("  network:  {}", status.network);
    eprintln!("  udp:      {}", daemon.node.local_addr());
    eprintln!("  api:      {}", dir.join("api.sock").display());
    if let Some(tcp) = daemon.api_tcp {
        eprintln!(
            "  api tcp:  http://{tcp} (token in {})",
            dir.join("api.token").display()
        );
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    daemon.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn hold_until_signal(api: &ApiClient, delete_path: &str) -> Result<()> {
    eprintln!("press Ctrl-C to stop (or use --detach)");
    wait_for_signal().await;
    api.call(Method::DELETE, delete_path, None).await?;
    Ok(())
}

fn parse_visibility(s: &str) -> std::result::Result<Visibility, String> {
    Visibility::parse(s)
}

async fn services(api: &ApiClient, lan: bool, json: bool, watch: bool) -> Result<()> {
    let query = if lan { "?lan=true" } else { "" };
    if watch {
        let path = format!("/v1/peer-services/events{query}");
        let printing = api.events(&path, |name, data| {
            if json {
                println!("{data}");
                return;
            }
            let v: Value = serde_json::from_str(data).unwrap_or_default();
            let sign = match name {
                "appeared" => "+",
                "disappeared" => "-",
                _ => "?",
            };
            println!("{sign} {}", service_line(&v));
        });
        return tokio::select! {
            r = printing => r,
            _ = wait_for_signal() => Ok(()),
        };
    }
    let list = api
        .call(Method::GET, &format!("/v1/peer-services{query}"), None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let list = list.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        eprintln!(
            "no services found{}: peers show their services once a session with them is up",
            if lan { " on the LAN" } else { "" }
        );
    }
    for s in &list {
        println!("{}", service_line(s));
    }
    Ok(())
}

/// `PEER  SERVICE  [lan]  DESCRIPTION`.
fn service_line(v: &Value) -> String {
    format!(
        "{}  {:<16} {:<4} {}",
        v["peer"].as_str().unwrap_or("?"),
        v["name"].as_str().unwrap_or("?"),
        if v["lan"].as_bool() == Some(true) {
            "lan"
        } else {
            ""
        },
        v["description"].as_str().unwrap_or("")
    )
}

async fn listen(
    api: &ApiClient,
    service: &str,
    registration: &Value,
    keep_open: bool,
) -> Result<()> {
    let path = format!("/v1/services/{}", query_value(service));
    api.call(Method::PUT, &path, Some(registration)).await?;
    let accept_path = format!("{path}/accept");
    let result = async {
        loop {
            let (stream, peer) = api.upgrade(Method::POST, &accept_path).await?;
            eprintln!("stream from {}", peer.as_deref().unwrap_or("?"));
            pipe_stdio(stream, !keep_open).await?;
            if !keep_open {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = wait_for_signal() => Ok(()),
    };
    let _ = api.call(Method::DELETE, &path, None).await;
    outcome
}

/// Copies stdin to the stream (if `send_stdin`) and the stream to stdout
/// until both directions end.
async fn pipe_stdio(stream: RawStream, send_stdin: bool) -> Result<()> {
    let (mut read, mut write) = tokio::io::split(stream);
    let up = async {
        if send_stdin {
            let mut stdin = tokio::io::stdin();
            tokio::io::copy(&mut stdin, &mut write)
                .await
                .context("sending stdin")?;
        }
        write.shutdown().await.context("closing the stream")?;
        Ok::<_, anyhow::Error>(())
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read.read(&mut buf).await.context("the stream failed")?;
            if n == 0 {
                break;
            }
            stdout.write_all(&buf[..n]).await?;
        }
        stdout.flush().await?;
        Ok::<_, anyhow::Error>(())
    };
    let (a, b) = tokio::join!(up, down);
    b?;
    a?;
    Ok(())
}

fn print_status(s: &Value) {
    let str_of = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    println!("peer id:   {}", str_of(&s["peer_id"]));
    println!("network:   {}", str_of(&s["network"]));
    println!("uptime:    {} s", s["uptime_s"].as_u64().unwrap_or(0));
    println!(
        "listening: {}",
        s["listen_addrs"]
            .as_array()
            .map(|a| a.iter().map(str_of).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    let nat = &s["nat"];
    if !nat.is_null() {
        println!(
            "reachable: {}   (dht {})",
            match s["reachable"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "not known yet",
            },
            if s["dht"]["server"].as_bool() == Some(true) {
                "server"
            } else {
                "client"
            }
        );
        println!(
            "nat:       mapping {}, filtering {}; seen as {}",
            str_of(&nat["mapping"]),
            str_of(&nat["filtering"]),
            nat["observed_addrs"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map(|a| a.iter().map(str_of).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "-".into())
        );
    }
    let lan_peers = s["lan"]["peers"].as_array().map_or(0, Vec::len);
    println!(
        "lan:       mdns {}, {lan_peers} peer{} found",
        str_of(&s["lan"]["mdns"]),
        if lan_peers == 1 { "" } else { "s" }
    );
    let sessions = s["sessions"].as_array().cloned().unwrap_or_default();
    println!("sessions:  {}", sessions.len());
    if !sessions.is_empty() {
        println!(
            "  {:<12} {:<18} {:>9} {:<24} {:>10} {:>10}",
            "PEER", "PATH", "RTT", "ADDRESS", "SENT", "RECEIVED"
        );
        for x in sessions {
            // relayed:<relay id> is shown with the relay's ID shortened.
            let path = str_of(&x["path"]);
            let path = match path.split_once(':') {
                Some((kind, relay)) => format!("{kind}:{}", &relay[..8.min(relay.len())]),
                None => path,
            };
            println!(
                "  {:<12} {:<18} {:>6.2} ms {:<24} {:>10} {:>10}",
                &str_of(&x["peer"])[..10.min(str_of(&x["peer"]).len())],
                path,
                x["rtt_ms"].as_f64().unwrap_or(0.0),
                str_of(&x["remote_addr"]),
                human_bytes(x["bytes_sent"].as_u64().unwrap_or(0)),
                human_bytes(x["bytes_received"].as_u64().unwrap_or(0)),
            );
        }
    }
    let relay = &s["relay"];
    if relay["circuits_opened"].as_u64().unwrap_or(0) > 0
        || relay["relayed_sessions"].as_u64().unwrap_or(0) > 0
    {
        println!(
            "relay:     {} circuit{} now, {} relayed for others; {} own session{} relayed, {} moved to direct",
            relay["circuits"],
            if relay["circuits"] == 1 { "" } else { "s" },
            human_bytes(relay["bytes_relayed"].as_u64().unwrap_or(0)),
            relay["relayed_sessions"],
            if relay["relayed_sessions"] == 1 { "" } else { "s" },
            relay["upgraded_to_direct"],
        );
    }
    let services = s["services"].as_array().cloned().unwrap_or_default();
    if !services.is_empty() {
        println!(
            "services:  {}",
            services
                .iter()
                .map(|x| str_of(&x["name"]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for e in s["tunnels"]["exposes"].as_array().into_iter().flatten() {
        println!(
            "expose:    {} -> {} ({} active)",
            str_of(&e["service"]),
            str_of(&e["target"]),
            e["active"]
        );
    }
    for f in s["tunnels"]["forwards"].as_array().into_iter().flatten() {
        println!(
            "forward:   {} -> {}/{} ({} active)",
            str_of(&f["listen"]),
            &str_of(&f["peer"])[..10],
            str_of(&f["service"]),
            f["active"]
        );
    }
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The allocator's heap in use, and resident beyond that (bytes), for the
/// simulator's report.
#[cfg(not(target_env = "msvc"))]
fn allocator_heap() -> Option<fn() -> (usize, usize)> {
    Some(|| {
        use tikv_jemalloc_ctl::{epoch, stats};
        let figures = epoch::advance()
            .and_then(|_| Ok((stats::allocated::read()?, stats::resident::read()?)));
        figures.map_or((0, 0), |(allocated, resident)| {
            (allocated, resident.saturating_sub(allocated))
        })
    })
}

#[cfg(target_env = "msvc")]
fn allocator_heap() -> Option<fn() -> (usize, usize)> {
    None
}

/// Runs `p2pos sim` again on transparent huge pages, unless jemalloc's
/// options were given or `--small-pages` was. The simulator reads its
/// nodes' state (15 GB at 10^6 nodes) at random, and 2 MiB pages cut its
/// TLB misses: the first 10 minutes of the 10^6 churn hour took 273 s of
/// wall instead of 298 (session 26). They cost little memory now that
/// requests wait in slots and tables grow by size class: the hour peaks
/// at 14,837 MiB on them (session 20's code went over 16 GiB, and they
/// were asked for until session 26). jemalloc reads its options once,
/// before `main`, and the daemon stays on small pages (13 MB resident; 19
/// MB on huge ones), so the simulator runs itself again with them set. If
/// that fails it runs as it is.
#[cfg(target_os = "linux")]
fn sim_on_huge_pages() {
    use std::os::unix::process::CommandExt;
    const OPTIONS: &str = "_RJEM_MALLOC_CONF";
    if std::env::var_os(OPTIONS).is_some() {
        return;
    }
    // `exec` returns only if it failed.
    let err = std::env::current_exe().map_or_else(
        |err| err,
        |exe| {
            let mut args = std::env::args_os();
            let mut again = std::process::Command::new(exe);
            if let Some(name) = args.next() {
                again.arg0(name);
            }
            again
                .args(args)
                .env(OPTIONS, "thp:always,metadata_thp:always")
                .exec()
        },
    );
    tracing::debug!("the simulator runs on small pages: {err}");
}

/// jemalloc: the simulator runs 10–25% faster than on glibc's allocator,
/// for a fifth more memory; and on two threads glibc left the memory that
/// the start's nodes freed as they left in the main thread's arena.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// jemalloc, with growth of small allocations done as a new allocation,
/// a copy and a sized free. jemalloc's own `rallocx` is not told the old
/// size, so it first looks the pointer up in its page map: at 10^6
/// simulated nodes, 16 GB of them, that lookup missed the cache on nearly
/// every growth of a routing-table bucket or a cookie jar (`do_rallocx`
/// was 5.7% of a profile). A sized free needs no lookup, and the new
/// allocation is of the same size class `rallocx` would have moved it to.
#[cfg(not(target_env = "msvc"))]
struct Allocator;

/// The largest of jemalloc's small size classes (4 KiB pages). Larger
/// allocations can grow in place, so they keep `rallocx`.
#[cfg(not(target_env = "msvc"))]
const SMALL_MAX: usize = 14 * 1024;

#[cfg(not(target_env = "msvc"))]
// SAFETY: every call goes to jemalloc with the layouts Rust gave; `realloc`
// keeps the contract (the old block's bytes in the returned one, the old
// block freed only when a new one was returned).
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::GlobalAlloc::alloc(&tikv_jemallocator::Jemalloc, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { std::alloc::GlobalAlloc::alloc_zeroed(&tikv_jemallocator::Jemalloc, layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::GlobalAlloc::dealloc(&tikv_jemallocator::Jemalloc, ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let old_size = layout.size();
        // Alignments up to 16 and the size need no flags, so `nallocx(_,
        // 0)` gives the size classes jemalloc uses for both blocks.
        let align = layout.align();
        if new_size <= old_size || new_size > SMALL_MAX || align > 16 || align > old_size {
            // SAFETY: as above.
            return unsafe {
                std::alloc::GlobalAlloc::realloc(
                    &tikv_jemallocator::Jemalloc,
                    ptr,
                    layout,
                    new_size,
                )
            };
        }
        // SAFETY: `nallocx` only computes size classes.
        if unsafe {
            tikv_jemalloc_sys::nallocx(new_size, 0) == tikv_jemalloc_sys::nallocx(old_size, 0)
        } {
            // The block already holds `new_size`: jemalloc would keep it.
            return ptr;
        }
        // SAFETY: `new_size` is nonzero and, rounded up to `align`, does
        // not overflow (the caller's contract for `realloc`).
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a nonzero size, as above.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, apart, and at least `old_size`
            // long; the old one is freed with the layout it was given.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, old_size);
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// One arena for all threads instead of jemalloc's four a core. The
/// simulator's two threads take turns on every node, so a node's memory was
/// spread over both threads' arenas, and what departed nodes freed left
/// half-empty slabs in each: the 10^5-node churn hour peaked at 1755 MiB
/// with 661 MB of it free, and peaks at 1408 MiB (282 MB free) on one
/// arena, as fast. The daemon's threads allocate little.
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static NUL-terminated
    // string, which jemalloc reads as its options at start.
    Some(unsafe { &*c"narenas:1".as_ptr() });

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    fn byte(i: usize, align: usize) -> u8 {
        (i * 7 + align) as u8
    }

    /// Blocks grown through the small size classes and past them, then
    /// shrunk, keep their bytes and their alignment, at alignments the
    /// moving path takes and at those it leaves to jemalloc.
    #[test]
    fn realloc_keeps_bytes_and_alignment() {
        for align in [1usize, 8, 16, 32, 4096] {
            let mut size = 1;
            let mut layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a nonzero size; every block is used within its size
            // and freed once, with its layout.
            unsafe {
                let mut p = super::ALLOCATOR.alloc(layout);
                assert!(!p.is_null());
                *p = byte(0, align);
                let mut sizes: Vec<usize> = Vec::new();
                while size < 64 * 1024 {
                    sizes.push(size);
                    size += size / 3 + 1;
                }
                let shrinking: Vec<usize> = sizes.iter().rev().copied().collect();
                for new_size in sizes.into_iter().skip(1).chain([size]).chain(shrinking) {
                    p = super::ALLOCATOR.realloc(p, layout, new_size);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "aligned to {align}");
                    let kept = layout.size().min(new_size);
                    for i in 0..kept {
                        assert_eq!(*p.add(i), byte(i, align), "byte {i} of {kept}");
                    }
                    for i in kept..new_size {
                        *p.add(i) = byte(i, align);
                    }
                    layout = Layout::from_size_align(new_size, align).unwrap();
                }
                super::ALLOCATOR.dealloc(p, layout);
            }
        }
    }
}
