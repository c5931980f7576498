//! Port mapping: asking the home router to forward the node's UDP port
//! (PCP, falling back to NAT-PMP, through `crab_nat`; then UPnP IGD,
//! through `igd-next`).
//!
//! A node behind a NAT asks its default gateway for a mapping of its port
//! (the same external port if the router agrees), renews it every
//! [`RENEW_EVERY`] (well before the lease ends; a router that restarted and
//! forgot the mapping gets it back at the next renewal, and a failed
//! renewal is noticed and shown), and deletes it on a clean stop. The
//! mapped address goes first in the node's peer record and candidates;
//! dial-backs then find the node reachable and it serves the DHT.
//!
//! UPnP IGD finds the router by SSDP (a multicast search on the LAN, sent
//! from the address that reaches the default gateway) and asks for the
//! same external port with the same lease; a renewal asks again.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use serde::{Deserialize, Serialize};

use crate::Node;

/// Lease asked for.
pub const LEASE: Duration = Duration::from_secs(2 * 3600);
/// Renewal period (a lost mapping is back within it).
pub const RENEW_EVERY: Duration = Duration::from_secs(5 * 60);
/// Time before trying again when no gateway answered.
const RETRY: Duration = Duration::from_secs(10 * 60);

/// What `status` shows of port mapping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortMappingStatus {
    /// `mapped`, `trying`, `unavailable: <why>` or `off`.
    pub state: String,
    /// `pcp`, `nat-pmp` or `upnp-igd`.
    pub protocol: Option<String>,
    /// The gateway asked.
    pub gateway: Option<String>,
    /// The mapped public address.
    pub external: Option<String>,
    /// Lease granted (s).
    pub lease_s: Option<u64>,
    /// Renewals done.
    pub renewals: u64,
    /// Renewals that failed (the router forgot or refused; mapped again).
    pub lost: u64,
}

/// Shared port-mapping state of a node.
#[derive(Debug, Default)]
pub(crate) struct PortMapState {
    status: Mutex<PortMappingStatus>,
    mapping: tokio::sync::Mutex<Option<Held>>,
}

type IgdGateway = igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>;

/// A mapping the router granted.
#[derive(Debug, Clone)]
enum Held {
    /// By PCP or NAT-PMP.
    Nat(PortMapping),
    /// By UPnP IGD: the gateway, the port, and the local address mapped.
    Igd {
        gateway: Box<IgdGateway>,
        port: u16,
        local: SocketAddr,
        external: SocketAddr,
    },
}

impl Held {
    fn protocol(&self) -> &'static str {
        match self {
            Held::Nat(m) => match m.mapping_type() {
                PortMappingType::Pcp { .. } => "pcp",
                PortMappingType::NatPmp => "nat-pmp",
            },
            Held::Igd { .. } => "upnp-igd",
        }
    }

    fn lease_s(&self) -> u64 {
        match self {
            Held::Nat(m) => u64::from(m.lifetime()),
            Held::Igd { .. } => LEASE.as_secs(),
        }
    }

    /// Asks the router to keep the mapping; the external address.
    async fn renew(&mut self, known: Option<IpAddr>) -> Result<SocketAddr, String> {
        match self {
            Held::Nat(m) => {
                m.renew().await.map_err(|e| e.to_string())?;
                let ip = known.ok_or("the external address is not known")?;
                Ok(SocketAddr::new(ip, m.external_port().get()))
            }
            Held::Igd {
                gateway,
                port,
                local,
                external,
            } => {
                igd_add(gateway, *port, *local).await?;
                Ok(*external)
            }
        }
    }

    async fn release(self) {
        match self {
            Held::Nat(m) => {
                let _ = m.try_drop().await;
            }
            Held::Igd { gateway, port, .. } => {
                let _ = gateway
                    .remove_port(igd_next::PortMappingProtocol::UDP, port)
                    .await;
            }
        }
    }
}

async fn igd_add(gateway: &IgdGateway, port: u16, local: SocketAddr) -> Result<(), String> {
    gateway
        .add_port(
            igd_next::PortMappingProtocol::UDP,
            port,
            local,
            LEASE.as_secs() as u32,
            "p2pos",
        )
        .await
        .map_err(|e| e.to_string())
}

/// Maps `port` by UPnP IGD: finds the gateway from `client`, asks for the
/// same external port.
async fn map_igd(client: IpAddr, port: u16) -> Result<(Held, SocketAddr), String> {
    let mut options = igd_next::SearchOptions::default();
    options.bind_addr = SocketAddr::new(client, 0);
    options.timeout = Some(Duration::from_secs(3));
    options.single_search_timeout = Some(Duration::from_secs(2));
    let gateway = igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(|e| format!("no UPnP IGD gateway: {e}"))?;
    let local = SocketAddr::new(client, port);
    igd_add(&gateway, port, local).await?;
    let ip = gateway.get_external_ip().await.map_err(|e| e.to_string())?;
    let external = SocketAddr::new(ip.to_canonical(), port);
    let held = Held::Igd {
        gateway: Box::new(gateway),
        port,
        local,
        external,
    };
    Ok((held, external))
}

impl PortMapState {
    pub(crate) fn off() -> Self {
        PortMapState {
            status: Mutex::new(PortMappingStatus {
                state: "off".into(),
                ..PortMappingStatus::default()
            }),
            mapping: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn status(&self) -> PortMappingStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The mapped public address, if there is one.
    pub(crate) fn external(&self) -> Option<SocketAddr> {
        self.status()
            .external
            .and_then(|e| e.parse().ok())
            .filter(|_| self.status().state == "mapped")
    }

    fn update(&self, f: impl FnOnce(&mut PortMappingStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Deletes the mapping (clean stop).
    pub(crate) async fn release(&self) {
        if let Some(m) = self.mapping.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), m.release()).await;
        }
    }
}

/// The IPv4 default gateway, from the kernel's routing table.
fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[1] == "00000000" {
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            // The table holds it in host (little-endian) byte order.
            Some(Ipv4Addr::from(gw.swap_bytes()))
        } else {
            None
        }
    })
}

/// The local address used to reach `gateway`.
fn local_ip_toward(gateway: Ipv4Addr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn timeouts() -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 3,
        max_retry_timeout: Some(Duration::from_secs(2)),
    }
}

/// Maps `port`: PCP or NAT-PMP first, then UPnP IGD.
async fn map(
    gateway: Ipv4Addr,
    client: IpAddr,
    port: NonZeroU16,
) -> Result<(Held, SocketAddr), String> {
    match map_pcp_or_pmp(gateway, client, port).await {
        Ok((m, external)) => Ok((Held::Nat(m), external)),
        Err(pcp) => map_igd(client, port.get())
            .await
            .map_err(|igd| format!("PCP/NAT-PMP: {pcp}; UPnP IGD: {igd}")),
    }
}

async fn map_pcp_or_pmp(
    gateway: Ipv4Addr,
    client: IpAddr,
    port: NonZeroU16,
) -> Result<(PortMapping, SocketAddr), String> {
    let options = PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(LEASE.as_secs() as u32),
        timeout_config: Some(timeouts()),
    };
    let mapping = PortMapping::new(gateway.into(), client, InternetProtocol::Udp, port, options)
        .await
        .map_err(|e| e.to_string())?;
    let ip = match mapping.mapping_type() {
        PortMappingType::Pcp { external_ip, .. } => external_ip,
        PortMappingType::NatPmp => {
            crab_nat::natpmp::external_address(gateway.into(), Some(timeouts()))
                .await
                .map(IpAddr::V4)
                .map_err(|e| e.to_string())?
        }
    };
    let external = SocketAddr::new(ip.to_canonical(), mapping.external_port().get());
    Ok((mapping, external))
}

/// Starts the port-mapping task of `node`.
pub(crate) fn spawn(node: &Node) {
    let weak = Arc::downgrade(&node.inner);
    let port = node.local_addr().port();
    tokio::spawn(async move {
        let Some(port) = NonZeroU16::new(port) else {
            return;
        };
        loop {
            let Some(inner) = weak.upgrade() else { break };
            let node = Node { inner };
            let state = &node.inner.portmap;
            let wait = match default_gateway().and_then(|g| local_ip_toward(g).map(|c| (g, c))) {
                None => {
                    state.update(|s| s.state = "unavailable: no IPv4 default gateway".into());
                    RETRY
                }
                Some((gateway, client)) => {
                    state.update(|s| {
                        s.gateway = Some(gateway.to_string());
                        if s.state != "mapped" {
                            s.state = "trying".into();
                        }
                    });
                    let mut held = state.mapping.lock().await.take();
                    let had = held.is_some();
                    let renewed = match held.as_mut() {
                        Some(m) => match m.renew(state.external().map(|a| a.ip())).await {
                            Ok(external) => Some((m.clone(), external)),
                            Err(e) => {
                                tracing::debug!("renewing the port mapping failed: {e}");
                                None
                            }
                        },
                        None => None,
                    };
                    let result = match renewed {
                        Some(r) => Ok(r),
                        None => map(gateway, client, port).await,
                    };
                    match result {
                        Ok((mapping, external)) => {
                            let protocol = mapping.protocol();
                            tracing::info!(%external, protocol, "port mapped by the router");
                            state.update(|s| {
                                s.state = "mapped".into();
                                s.protocol = Some(protocol.into());
                                s.external = Some(external.to_string());
                                s.lease_s = Some(mapping.lease_s());
                                if had {
                                    s.renewals += 1;
                                }
                            });
                            *state.mapping.lock().await = Some(mapping);
                            if let Some(dht) = node.dht() {
                                dht.set_mapped_addr(Some(external));
                            }
                            RENEW_EVERY
                        }
                        Err(e) => {
                            if had {
                                tracing::warn!("the router no longer maps the port: {e}");
                                state.update(|s| s.lost += 1);
                            }
                            *state.mapping.lock().await = None;
                            if let Some(dht) = node.dht() {
                                dht.set_mapped_addr(None);
                            }
                            state.update(|s| {
                                s.state = format!("unavailable: {e}");
                                s.external = None;
                            });
                            RETRY
                        }
                    }
                }
            };
            drop(node);
            tokio::time::sleep(wait).await;
        }
    });
}
