//! Which services a node shows to whom, and what it knows of its peers'.
//!
//! Every session carries one `p2pos/services` stream in each direction (see
//! `p2pos_proto::lan`): the node that opened it is told the services the
//! other node shows it, at once and again on every change. The list a peer
//! sees follows each service's [`Visibility`], decided per peer by the
//! owner. When the stream or its session ends, the peer's services
//! disappear; [`ServiceEvent`]s tell subscribers (`GET /v1/services/events`,
//! `p2pos services --watch`) what appeared and what disappeared.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use p2pos_proto::lan::ServiceAd;
use p2pos_proto::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// The built-in stream service that carries service lists.
pub const SERVICES_SERVICE: &str = "p2pos/services";

/// Who may see a service in its node's service list. (Who may *open* it is
/// the service's own business: a hidden service still accepts streams from
/// peers that know its name.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "VisibilityJson", into = "VisibilityJson")]
pub enum Visibility {
    /// Peers whose session with this node runs over the LAN (the default).
    #[default]
    Lan,
    /// Every peer with a session.
    Public,
    /// Only these peers, wherever they are.
    Peers(Vec<PeerId>),
    /// Nobody.
    Hidden,
}

/// The JSON form: `"lan"`, `"public"`, `"hidden"` or `{"peers": [ids]}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum VisibilityJson {
    Lan,
    Public,
    Peers(Vec<String>),
    Hidden,
}

impl TryFrom<VisibilityJson> for Visibility {
    type Error = String;
    fn try_from(v: VisibilityJson) -> Result<Self, String> {
        Ok(match v {
            VisibilityJson::Lan => Visibility::Lan,
            VisibilityJson::Public => Visibility::Public,
            VisibilityJson::Hidden => Visibility::Hidden,
            VisibilityJson::Peers(ids) => Visibility::parse(&format!("peers:{}", ids.join(",")))?,
        })
    }
}

impl From<Visibility> for VisibilityJson {
    fn from(v: Visibility) -> Self {
        match v {
            Visibility::Lan => VisibilityJson::Lan,
            Visibility::Public => VisibilityJson::Public,
            Visibility::Hidden => VisibilityJson::Hidden,
            Visibility::Peers(p) => {
                VisibilityJson::Peers(p.iter().map(|p| p.to_string()).collect())
            }
        }
    }
}

impl Visibility {
    /// Whether `peer`, whose session runs over the LAN or not (`lan`), sees
    /// the service.
    pub fn shows_to(&self, peer: &PeerId, lan: bool) -> bool {
        match self {
            Visibility::Lan => lan,
            Visibility::Public => true,
            Visibility::Peers(peers) => peers.contains(peer),
            Visibility::Hidden => false,
        }
    }

    /// Parses the command-line form: `lan`, `public`, `hidden`, or
    /// `peers:<id>,<id>…`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "lan" => Ok(Visibility::Lan),
            "public" => Ok(Visibility::Public),
            "hidden" => Ok(Visibility::Hidden),
            other => match other.strip_prefix("peers:") {
                Some(list) => list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.trim()
                            .parse::<PeerId>()
                            .map_err(|e| format!("{s:?} is not a peer ID: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|peers| {
                        if peers.is_empty() {
                            Err("peers: needs at least one peer ID".to_owned())
                        } else {
                            Ok(Visibility::Peers(peers))
                        }
                    }),
                None => Err(format!(
                    "unknown visibility {other:?}: use lan, public, hidden or peers:<id>,<id>"
                )),
            },
        }
    }
}

/// A peer's service as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteService {
    /// The peer offering it.
    pub peer: String,
    /// Service name.
    pub name: String,
    /// What it offers.
    pub description: String,
    /// Whether the peer is on this node's LAN (found by mDNS or reached
    /// over a LAN path).
    pub lan: bool,
}

/// Something that happened to a peer's service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEvent {
    /// `appeared` or `disappeared`.
    pub event: String,
    /// The service.
    #[serde(flatten)]
    pub service: RemoteService,
    /// When this node learned it, Unix milliseconds.
    pub at_ms: u64,
}

struct Known {
    /// The session (QUIC stable id) whose stream delivered the list.
    conn: usize,
    lan: bool,
    services: Vec<ServiceAd>,
}

/// The services of this node's peers.
pub(crate) struct RemoteServices {
    known: Mutex<HashMap<PeerId, Known>>,
    events: broadcast::Sender<ServiceEvent>,
}

impl Default for RemoteServices {
    fn default() -> Self {
        RemoteServices {
            known: Mutex::default(),
            events: broadcast::channel(1024).0,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RemoteServices {
    fn emit(&self, event: &str, peer: &PeerId, lan: bool, ad: &ServiceAd) {
        let _ = self.events.send(ServiceEvent {
            event: event.to_owned(),
            service: RemoteService {
                peer: peer.to_string(),
                name: ad.name.clone(),
                description: ad.description.clone(),
                lan,
            },
            at_ms: now_ms(),
        });
    }

    /// `peer` now shows `services` over session `conn`.
    pub(crate) fn update(
        &self,
        peer: PeerId,
        conn: usize,
        lan: bool,
        mut services: Vec<ServiceAd>,
    ) {
        services.sort();
        services.dedup_by(|a, b| a.name == b.name);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let old = known.insert(
            peer,
            Known {
                conn,
                lan,
                services: services.clone(),
            },
        );
        let old = old.map(|k| k.services).unwrap_or_default();
        for gone in old.iter().filter(|o| !services.contains(o)) {
            self.emit("disappeared", &peer, lan, gone);
        }
        for new in services.iter().filter(|s| !old.contains(s)) {
            self.emit("appeared", &peer, lan, new);
        }
    }

    /// The stream of session `conn` with `peer` ended: its services are gone
    /// unless another session already took over.
    pub(crate) fn forget(&self, peer: PeerId, conn: usize) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.get(&peer).map(|k| k.conn) != Some(conn) {
            return;
        }
        if let Some(k) = known.remove(&peer) {
            for gone in &k.services {
                self.emit("disappeared", &peer, k.lan, gone);
            }
        }
    }

    /// Every known service of every peer.
    pub(crate) fn list(&self) -> Vec<RemoteService> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<RemoteService> = known
            .iter()
            .flat_map(|(peer, k)| {
                k.services.iter().map(move |s| RemoteService {
                    peer: peer.to_string(),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    lan: k.lan,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.peer, &a.name).cmp(&(&b.peer, &b.name)));
        out
    }

    /// Events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pos_proto::Keypair;

    fn peer(n: u8) -> PeerId {
        Keypair::from_seed([n; 32]).peer_id()
    }

    fn ad(name: &str) -> ServiceAd {
        ServiceAd {
            name: name.into(),
            description: format!("{name} service"),
        }
    }

    #[test]
    fn visibility_decides_per_peer() {
        let (a, b) = (peer(1), peer(2));
        assert!(Visibility::Lan.shows_to(&a, true));
        assert!(!Visibility::Lan.shows_to(&a, false));
        assert!(Visibility::Public.shows_to(&a, false));
        assert!(!Visibility::Hidden.shows_to(&a, true));
        let named = Visibility::Peers(vec![a]);
        assert!(named.shows_to(&a, false));
        assert!(!named.shows_to(&b, true));
    }

    #[test]
    fn visibility_parses_and_serialises() {
        assert_eq!(Visibility::parse("public"), Ok(Visibility::Public));
        let p = peer(1);
        assert_eq!(
            Visibility::parse(&format!("peers:{p}")),
            Ok(Visibility::Peers(vec![p]))
        );
        assert!(Visibility::parse("peers:").is_err());
        assert!(Visibility::parse("peers:nope")
            .unwrap_err()
            .contains("not a peer ID"));
        assert!(Visibility::parse("friends")
            .unwrap_err()
            .contains("use lan, public"));
        assert_eq!(serde_json::to_string(&Visibility::Lan).unwrap(), "\"lan\"");
        let json = format!("{{\"peers\":[\"{p}\"]}}");
        assert_eq!(
            serde_json::from_str::<Visibility>(&json).unwrap(),
            Visibility::Peers(vec![p])
        );
    }

    #[test]
    fn updates_emit_differences_and_forget_respects_the_newer_session() {
        let r = RemoteServices::default();
        let mut events = r.subscribe();
        let p = peer(1);
        r.update(p, 1, true, vec![ad("chat"), ad("tv")]);
        r.update(p, 1, true, vec![ad("tv"), ad("printer")]);
        let got: Vec<(String, String)> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| (e.event, e.service.name))
            .collect();
        assert_eq!(
            got,
            vec![
                ("appeared".into(), "chat".into()),
                ("appeared".into(), "tv".into()),
                ("disappeared".into(), "chat".into()),
                ("appeared".into(), "printer".into()),
            ]
        );
        // A second session takes over with the same list: nothing changes,
        // and the end of the first one's stream removes nothing.
        r.update(p, 2, true, vec![ad("printer"), ad("tv")]);
        r.forget(p, 1);
        assert!(events.try_recv().is_err());
        assert_eq!(r.list().len(), 2);
        r.forget(p, 2);
        assert_eq!(r.list().len(), 0);
        assert_eq!(
            std::iter::from_fn(|| events.try_recv().ok())
                .filter(|e| e.event == "disappeared")
                .count(),
            2
        );
    }
}
