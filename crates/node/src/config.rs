//! The daemon's configuration (`config.toml` in the data dir, or `--config`).
//!
//! Every field has a default; `p2pos config` prints the effective values.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default UDP port of a node.
pub const DEFAULT_PORT: u16 = 7447;

/// The configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address the node binds (QUIC and overlay on one port).
    pub listen: SocketAddr,
    /// File holding the private network's secret; absent: public network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_secret_file: Option<PathBuf>,
    /// The local API.
    pub api: ApiConfig,
    /// Session settings.
    pub session: SessionConfig,
    /// DHT settings.
    pub dht: DhtSection,
    /// LAN settings.
    pub lan: LanSection,
    /// NAT settings.
    pub nat: NatSection,
    /// What this node relays for others.
    pub relay: RelaySection,
    /// Peers to open sessions with at start, as `<peer-id>@<ip:port>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bootstrap: Vec<String>,
    /// TCP services offered to peers from the start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<ExposeConfig>,
}

/// A bootstrap peer: its ID and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// The peer's ID.
    pub peer: p2pos_proto::PeerId,
    /// Its address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for BootstrapPeer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("bootstrap peer {s:?}: expected <peer-id>@<ip:port>"))?;
        let peer = id
            .parse()
            .map_err(|e| format!("bootstrap peer {s:?}: {e}"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("bootstrap peer {s:?}: {addr:?} is not an IP:PORT address"))?;
        Ok(BootstrapPeer { peer, addr })
    }
}

impl std::fmt::Display for BootstrapPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.peer, self.addr)
    }
}

/// Local API settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Also serve the API on this TCP address (loopback only), with the
    /// bearer token in `api.token`. The Unix socket is always served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
}

/// Session settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Seconds of silence after which a session is closed (at least; a
    /// longer measured keepalive interval stretches it to 3 intervals).
    pub idle_timeout_s: u64,
    /// Seconds between keepalives on an idle session until the node has
    /// measured how long its NAT keeps bindings (then the measured interval
    /// applies).
    pub keepalive_s: u64,
}

/// DHT settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DhtSection {
    /// `auto` (serve DHT routing and storage while reachability checks say
    /// nodes that were never contacted can reach this one), `server`
    /// (always) or `client` (only query).
    pub mode: crate::dht::DhtMode,
}

/// LAN settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LanSection {
    /// Announce this node and find peers on the LAN with mDNS
    /// (`_p2pos._udp.local`). Ignored when the node listens on loopback.
    pub mdns: bool,
}

impl Default for LanSection {
    fn default() -> Self {
        LanSection { mdns: true }
    }
}

/// NAT settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatSection {
    /// Ask the router to map the node's port (PCP, NAT-PMP) when behind a
    /// NAT. Ignored when the node listens on loopback.
    pub port_mapping: bool,
}

impl Default for NatSection {
    fn default() -> Self {
        NatSection { port_mapping: true }
    }
}

/// Relay settings: what this node carries for peers that cannot reach
/// each other directly (only while it is reachable, and only for peers it
/// has sessions with). There is no cap on a circuit's duration or bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// Relay at all.
    pub enabled: bool,
    /// Circuits at once, in total.
    pub max_circuits: usize,
    /// Circuits at once involving one peer.
    pub max_circuits_per_peer: usize,
    /// KiB per second one circuit may carry (both directions).
    pub circuit_kib_s: u64,
    /// KiB per second all circuits together may carry.
    pub total_kib_s: u64,
}

impl Default for RelaySection {
    fn default() -> Self {
        let d = p2pos_proto::relay::RelayLimits::default();
        RelaySection {
            enabled: d.enabled,
            max_circuits: d.max_circuits,
            max_circuits_per_peer: d.max_circuits_per_peer,
            circuit_kib_s: d.circuit_rate / 1024,
            total_kib_s: d.total_rate / 1024,
        }
    }
}

impl RelaySection {
    /// The limits the node applies.
    pub fn limits(&self) -> p2pos_proto::relay::RelayLimits {
        p2pos_proto::relay::RelayLimits {
            enabled: self.enabled,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            circuit_rate: self.circuit_kib_s.saturating_mul(1024),
            total_rate: self.total_kib_s.saturating_mul(1024),
        }
    }
}

/// A TCP service to expose.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExposeConfig {
    /// Service name peers ask for.
    pub service: String,
    /// The local TCP address behind it.
    pub target: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), DEFAULT_PORT),
            network_secret_file: None,
            api: ApiConfig::default(),
            session: SessionConfig::default(),
            dht: DhtSection::default(),
            lan: LanSection::default(),
            nat: NatSection::default(),
            relay: RelaySection::default(),
            bootstrap: Vec::new(),
            expose: Vec::new(),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout_s: 30,
            keepalive_s: 5,
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`; a missing file gives the defaults when `optional`.
    pub fn load(path: &std::path::Path, optional: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(tcp) = self.api.tcp {
            if !tcp.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "api.tcp = {tcp}: the API serves loopback only (use 127.0.0.1)"
                )));
            }
        }
        if self.session.keepalive_s == 0 || self.session.keepalive_s >= self.session.idle_timeout_s
        {
            return Err(ConfigError::Invalid(
                "session.keepalive_s must be at least 1 and less than session.idle_timeout_s"
                    .into(),
            ));
        }
        self.bootstrap_peers()?;
        for e in &self.expose {
            p2pos_proto::stream::validate_service_name(&e.service)
                .map_err(|err| ConfigError::Invalid(format!("expose {:?}: {err}", e.service)))?;
        }
        Ok(())
    }

    /// The bootstrap list, parsed.
    pub fn bootstrap_peers(&self) -> Result<Vec<BootstrapPeer>, ConfigError> {
        self.bootstrap
            .iter()
            .map(|b| b.parse().map_err(ConfigError::Invalid))
            .collect()
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip() {
        let text = Config::default().to_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, Config::default());
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"0.0.0.0:1\"\n").unwrap();
        let err = Config::load(&path, false).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn bootstrap_entries_are_checked() {
        let id = p2pos_proto::Keypair::from_seed([1; 32]).peer_id();
        let mut c = Config {
            bootstrap: vec![format!("{id}@192.0.2.1:7447")],
            ..Config::default()
        };
        assert_eq!(c.bootstrap_peers().unwrap()[0].addr.port(), 7447);
        c.bootstrap = vec![format!("{id}:7447")];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("<peer-id>@<ip:port>"));
    }

    #[test]
    fn api_must_be_loopback() {
        let mut c = Config::default();
        c.api.tcp = Some("0.0.0.0:7448".parse().unwrap());
        assert!(c.validate().is_err());
    }
}
