//! LAN discovery: the node announces itself with mDNS/DNS-SD (through
//! `mdns-sd`) and browses for other nodes of its network on the same LAN.
//!
//! What is announced is in `p2pos_proto::lan`. A node that finds a LAN peer
//! remembers its LAN addresses (dials to that peer try them first, so LAN
//! peers talk over the LAN even when they also know each other's public
//! addresses), gives one to the DHT as a contact (so a LAN with no internet
//! and no bootstrap list still forms a DHT), and opens a session with it:
//! the node with the smaller peer ID at once, the other one after
//! [`SECOND_DIAL_DELAY`] if no session came, so the two do not race.
//!
//! A node that stops sends mDNS goodbyes and closes its sessions; one that
//! vanishes is noticed when its LAN session times out (sessions dialed to
//! LAN addresses use the short LAN timers of `p2pos_net`). One that comes
//! back announces itself again and is dialed again.
//!
//! Traffic: mdns-sd follows RFC 6762 (queries back off to once an hour,
//! records are refreshed near the end of their TTL), so an idle node sends
//! a few multicast packets a minute at most; see docs/BENCHMARKS.md.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use p2pos_proto::lan::{Announcement, SERVICE_TYPE};
use p2pos_proto::PeerId;
use serde::{Deserialize, Serialize};

use crate::node::Inner;
use crate::Node;

/// How long the node with the larger ID waits for the other one's dial
/// before dialing itself.
pub const SECOND_DIAL_DELAY: Duration = Duration::from_millis(300);
/// Longest wait between dials of a LAN peer that cannot be reached.
pub const MAX_REDIAL_BACKOFF: Duration = Duration::from_secs(30);
/// How long a stopping node waits for its mDNS goodbye to be sent.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// A node found on the LAN.
#[derive(Debug, Clone)]
struct LanPeer {
    addrs: Vec<SocketAddr>,
    fullname: String,
    seen: Instant,
}

#[derive(Debug, Default)]
struct LanCounters {
    announcements: AtomicU64,
    ignored_other_network: AtomicU64,
    malformed: AtomicU64,
    goodbyes: AtomicU64,
}

/// LAN discovery of one node.
pub struct LanDiscovery {
    daemon: ServiceDaemon,
    fullname: String,
    peers: Arc<Mutex<HashMap<PeerId, LanPeer>>>,
    /// LAN peers a dial task is working on.
    dialing: Mutex<std::collections::HashSet<PeerId>>,
    counters: Arc<LanCounters>,
}

impl std::fmt::Debug for LanDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanDiscovery")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

/// LAN discovery in `p2pos status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LanStatus {
    /// `on`, `off` (disabled or bound to loopback) or `failed: <why>`.
    pub mdns: String,
    /// Nodes of this network found on the LAN.
    pub peers: Vec<LanPeerStatus>,
    /// Announcements of this network's nodes received.
    pub announcements: u64,
    /// Announcements of other networks, ignored.
    pub ignored_other_network: u64,
    /// Announcements that did not parse.
    pub malformed: u64,
    /// Goodbyes (a node leaving) received.
    pub goodbyes: u64,
}

/// A LAN peer in `p2pos status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LanPeerStatus {
    /// Its peer ID.
    pub peer: String,
    /// Its LAN addresses.
    pub addrs: Vec<String>,
    /// Seconds since its announcement was last received.
    pub seen_s: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LanDiscovery {
    /// Starts announcing and browsing for `node`, whose socket is bound to
    /// `bound`. Fails when the host has no multicast-capable interface or
    /// mDNS cannot bind.
    pub(crate) fn start(node: &Node, bound: SocketAddr) -> Result<LanDiscovery, String> {
        let daemon = ServiceDaemon::new().map_err(|e| e.to_string())?;
        let result = Self::configure(&daemon, node, bound);
        match result {
            Ok((fullname, receiver)) => {
                let discovery = LanDiscovery {
                    daemon,
                    fullname,
                    peers: Arc::default(),
                    dialing: Mutex::default(),
                    counters: Arc::default(),
                };
                discovery.spawn_browser(Arc::downgrade(&node.inner), receiver, bound);
                Ok(discovery)
            }
            Err(e) => {
                let _ = daemon.shutdown();
                Err(e)
            }
        }
    }

    fn configure(
        daemon: &ServiceDaemon,
        node: &Node,
        bound: SocketAddr,
    ) -> Result<(String, mdns_sd::Receiver<ServiceEvent>), String> {
        let e = |e: mdns_sd::Error| e.to_string();
        daemon
            .disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])
            .map_err(e)?;
        if !bound.ip().is_unspecified() {
            // Announce only on the interface of the bound address.
            daemon.disable_interface(IfKind::All).map_err(e)?;
            daemon
                .enable_interface(IfKind::Addr(bound.ip()))
                .map_err(e)?;
        } else if bound.is_ipv4() {
            daemon.disable_interface(IfKind::IPv6).map_err(e)?;
        }
        let me = node.peer_id();
        let announcement = Announcement::new(me, node.inner.network.as_ref());
        let txt: Vec<(String, String)> = announcement.txt();
        let txt: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let host = format!("p2pos-{}.local.", &me.to_string()[..16]);
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &me.to_string(),
            &host,
            (),
            bound.port(),
            &txt[..],
        )
        .map_err(e)?
        .enable_addr_auto();
        // The instance name is the peer ID: only this node's own key can
        // claim it, so probing for conflicts (750 ms) is skipped.
        let mut info = info;
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_owned();
        daemon.register(info).map_err(e)?;
        let receiver = daemon.browse(SERVICE_TYPE).map_err(e)?;
        Ok((fullname, receiver))
    }

    fn spawn_browser(
        &self,
        node: Weak<Inner>,
        receiver: mdns_sd::Receiver<ServiceEvent>,
        bound: SocketAddr,
    ) {
        let peers = self.peers.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            while let Ok(event) = receiver.recv_async().await {
                let Some(inner) = node.upgrade() else { break };
                let node = Node { inner };
                match event {
                    ServiceEvent::ServiceResolved(info) => {
                        let txt = info
                            .get_properties()
                            .iter()
                            .map(|p| (p.key(), p.val()))
                            .collect::<Vec<_>>();
                        let announcement = match Announcement::parse(txt) {
                            Ok(a) => a,
                            Err(e) => {
                                counters.malformed.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(name = %info.get_fullname(), "ignoring LAN announcement: {e}");
                                continue;
                            }
                        };
                        if announcement.peer == node.peer_id() {
                            continue;
                        }
                        if !announcement.is_in(node.inner.network.as_ref()) {
                            counters
                                .ignored_other_network
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let addrs = usable_addrs(
                            info.get_addresses().iter().map(|a| a.to_ip_addr()),
                            info.get_port(),
                            bound,
                        );
                        if addrs.is_empty() {
                            counters.malformed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        counters.announcements.fetch_add(1, Ordering::Relaxed);
                        let peer = announcement.peer;
                        let new = lock(&peers)
                            .insert(
                                peer,
                                LanPeer {
                                    addrs: addrs.clone(),
                                    fullname: info.get_fullname().to_owned(),
                                    seen: Instant::now(),
                                },
                            )
                            .is_none();
                        if new {
                            tracing::info!(peer = %peer, addrs = ?addrs, "found a LAN peer");
                        }
                        node.lan_peer_found(peer, &addrs);
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        let mut peers = lock(&peers);
                        let gone: Vec<PeerId> = peers
                            .iter()
                            .filter(|(_, p)| p.fullname == fullname)
                            .map(|(id, _)| *id)
                            .collect();
                        for peer in gone {
                            peers.remove(&peer);
                            counters.goodbyes.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(peer = %peer, "LAN peer left");
                        }
                    }
                    _ => {}
                }
            }
        });
    }

    /// The LAN addresses of `peer`, if it was found on the LAN.
    pub fn addrs_of(&self, peer: &PeerId) -> Option<Vec<SocketAddr>> {
        lock(&self.peers).get(peer).map(|p| p.addrs.clone())
    }

    /// Claims the dial task of `peer`: false if one runs already.
    pub(crate) fn start_dialing(&self, peer: PeerId) -> bool {
        lock(&self.dialing).insert(peer)
    }

    /// The dial task of `peer` ended.
    pub(crate) fn done_dialing(&self, peer: &PeerId) {
        lock(&self.dialing).remove(peer);
    }

    /// Whether `peer` was found on the LAN.
    pub fn knows(&self, peer: &PeerId) -> bool {
        lock(&self.peers).contains_key(peer)
    }

    /// For `p2pos status`.
    pub fn status(&self) -> LanStatus {
        let mut peers: Vec<LanPeerStatus> = lock(&self.peers)
            .iter()
            .map(|(id, p)| LanPeerStatus {
                peer: id.to_string(),
                addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                seen_s: p.seen.elapsed().as_secs(),
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LanStatus {
            mdns: "on".to_owned(),
            peers,
            announcements: get(&self.counters.announcements),
            ignored_other_network: get(&self.counters.ignored_other_network),
            malformed: get(&self.counters.malformed),
            goodbyes: get(&self.counters.goodbyes),
        }
    }

    /// Says goodbye on the LAN and stops mDNS.
    pub async fn stop(&self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv_async()).await;
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv_async()).await;
        }
    }
}

/// The addresses of an announcement this node can dial: IPv6 link-local
/// ones need a scope and are left out; IPv6 only on an IPv6 socket;
/// loopback only for a loopback-bound node.
fn usable_addrs(
    ips: impl Iterator<Item = IpAddr>,
    port: u16,
    bound: SocketAddr,
) -> Vec<SocketAddr> {
    if port == 0 {
        return Vec::new();
    }
    let mut out: Vec<SocketAddr> = ips
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .filter(|ip| ip.is_loopback() == bound.ip().is_loopback())
        .filter(|ip| match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => bound.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    // IPv4 first: on a LAN it is the address every host has.
    out.sort_by_key(|a| (a.is_ipv6(), *a));
    out.dedup();
    out.truncate(8);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_addresses_leave_out_what_cannot_be_dialed() {
        let ips: Vec<IpAddr> = [
            "fe80::1",
            "192.168.1.20",
            "fd00::20",
            "127.0.0.1",
            "0.0.0.0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let v6: SocketAddr = "[::]:7447".parse().unwrap();
        let v4: SocketAddr = "0.0.0.0:7447".parse().unwrap();
        let got = usable_addrs(ips.iter().copied(), 7447, v6);
        let want: Vec<SocketAddr> = vec![
            "192.168.1.20:7447".parse().unwrap(),
            "[fd00::20]:7447".parse().unwrap(),
        ];
        assert_eq!(got, want);
        assert_eq!(
            usable_addrs(ips.iter().copied(), 7447, v4),
            want[..1].to_vec()
        );
        assert!(usable_addrs(ips.iter().copied(), 0, v4).is_empty());
    }
}
