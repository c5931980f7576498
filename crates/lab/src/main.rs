//! `p2pos-lab`: the NAT lab's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use p2pos_lab::matrix::{self, MatrixOptions};
use p2pos_lab::{probe, RouterKind};

#[derive(Parser)]
#[command(
    name = "p2pos-lab",
    version,
    about = "The p2pos NAT lab: real routers in network namespaces (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// For every ordered pair of router kinds, try to reach a host behind
    /// one from a host behind the other by peer ID only.
    Matrix {
        /// Comma-separated kinds (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Option<Vec<RouterKind>>,
        /// Every router's UDP binding timeout in seconds.
        #[arg(long, default_value_t = 10)]
        udp_timeout: u32,
        /// Skip the idle-survival check (two binding timeouts).
        #[arg(long)]
        no_idle_check: bool,
        /// Skip the everyone-behind-NAT network.
        #[arg(long)]
        no_behind_nat: bool,
        /// The p2pos binary (default: next to this one).
        #[arg(long)]
        p2pos: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The LAN figures: discovery and reconnect times over many restarts,
    /// and the mDNS traffic of an idle node.
    LanBench {
        /// Restarts (samples per figure).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Idle window for the traffic count, in seconds.
        #[arg(long, default_value_t = 300)]
        idle: u64,
        /// The p2pos binary (default: next to this one).
        #[arg(long)]
        p2pos: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Keepalives of an idle node behind a NAT once it has measured its
    /// router's binding timeout, against a fixed 25 s keepalive.
    KeepaliveBench {
        /// The router's UDP binding timeout in seconds.
        #[arg(long, default_value_t = 300)]
        udp_timeout: u32,
        /// Idle window for the count, in seconds.
        #[arg(long, default_value_t = 600)]
        idle: u64,
        /// The p2pos binary (default: next to this one).
        #[arg(long)]
        p2pos: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove every namespace a lab left behind (after a killed run).
    Clean,
    /// UDP probe used inside lab namespaces.
    #[command(subcommand, hide = true)]
    Probe(ProbeCommand),
}

#[derive(Subcommand)]
enum ProbeCommand {
    /// Answer probes with the address they came from.
    Reflect {
        #[arg(long)]
        port: u16,
    },
    /// Send probes from one port, then print what arrives (JSON lines).
    Session {
        #[arg(long)]
        bind: u16,
        #[arg(long)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 2000)]
        listen_ms: u64,
        #[arg(long)]
        interval_ms: Option<u64>,
    },
    /// Send one datagram.
    Send {
        #[arg(long)]
        bind: u16,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "unsolicited")]
        payload: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pos-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM: remove this run's namespaces, then exit.
fn clean_on_interrupt() -> Result<(), ctrlc::Error> {
    let prefix = format!("{}{}x", p2pos_lab::NS_PREFIX, std::process::id());
    ctrlc::set_handler(move || {
        let n = p2pos_lab::clean_prefix(&prefix);
        eprintln!("\ninterrupted: removed {n} lab namespaces");
        std::process::exit(130);
    })
}

/// `--p2pos`, or the p2pos binary next to this one.
fn p2pos_binary(given: Option<PathBuf>) -> Result<PathBuf, Box<dyn std::error::Error>> {
    match given {
        Some(p) => Ok(p),
        None => Ok(std::env::current_exe()?
            .parent()
            .map(|d| d.join("p2pos"))
            .filter(|p| p.exists())
            .ok_or(
                "p2pos binary not found next to p2pos-lab: build the workspace, or pass --p2pos",
            )?),
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Matrix {
            kinds,
            udp_timeout,
            no_idle_check,
            no_behind_nat,
            p2pos,
            json,
        } => {
            clean_on_interrupt()?;
            let p2pos = p2pos_binary(p2pos)?;
            let kinds = kinds.unwrap_or_else(|| RouterKind::ALL.to_vec());
            let options = MatrixOptions {
                kinds: kinds.clone(),
                udp_timeout_s: udp_timeout,
                p2pos,
                idle_check: !no_idle_check,
                behind_nat: !no_behind_nat,
            };
            let report = matrix::run(&options, &mut |msg| eprintln!("… {msg}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", matrix::render(&report, &kinds));
            }
        }
        Command::LanBench {
            runs,
            idle,
            p2pos,
            json,
        } => {
            clean_on_interrupt()?;
            let options = p2pos_lab::lanbench::LanBenchOptions {
                runs,
                idle: Duration::from_secs(idle),
                p2pos: p2pos_binary(p2pos)?,
            };
            let report = p2pos_lab::lanbench::run(&options, &mut |msg| eprintln!("… {msg}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", p2pos_lab::lanbench::render(&report));
            }
        }
        Command::KeepaliveBench {
            udp_timeout,
            idle,
            p2pos,
            json,
        } => {
            clean_on_interrupt()?;
            let options = p2pos_lab::keepalivebench::KeepaliveBenchOptions {
                udp_timeout_s: udp_timeout,
                idle: Duration::from_secs(idle),
                p2pos: p2pos_binary(p2pos)?,
            };
            let report = p2pos_lab::keepalivebench::run(&options, &mut |msg| eprintln!("… {msg}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", p2pos_lab::keepalivebench::render(&report));
            }
        }
        Command::Clean => {
            let n = p2pos_lab::clean_all();
            eprintln!("removed {n} lab namespaces");
        }
        Command::Probe(ProbeCommand::Reflect { port }) => probe::reflect(port)?,
        Command::Probe(ProbeCommand::Session {
            bind,
            to,
            listen_ms,
            interval_ms,
        }) => {
            let got = probe::session(
                bind,
                &to,
                Duration::from_millis(listen_ms),
                interval_ms.map(Duration::from_millis),
            )?;
            for r in got {
                println!("{}", serde_json::to_string(&r)?);
            }
        }
        Command::Probe(ProbeCommand::Send { bind, to, payload }) => {
            probe::send(bind, to, &payload)?
        }
    }
    Ok(())
}
