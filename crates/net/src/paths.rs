//! Virtual peer addresses: how a session moves between a relay and a
//! direct path without QUIC noticing.
//!
//! A relayed session is dialed (or accepted) at a *virtual address* that
//! no host has: an IPv6 address in `fd70:3270:6f73::/48` on a dual-stack
//! socket, an IPv4 one in `240.0.0.0/8` (reserved, never routed) on an
//! IPv4 socket. The socket maps each virtual address to a [`Route`]:
//! through a relay's circuit, or straight to the peer once a direct path is
//! proven. Packets the socket receives on either route are handed to QUIC
//! as coming from the virtual address, so QUIC sees one unchanging peer
//! address and its streams carry on across the move.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Where a virtual address's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through `relay`'s circuit `circuit`.
    Relayed {
        /// The relay's address (as this node's session with it uses).
        relay: SocketAddr,
        /// The circuit.
        circuit: u64,
    },
    /// Straight to the peer at this address.
    Direct(SocketAddr),
    /// To the peer at `addr` from one of the node's extra sockets (the
    /// many-ports search found the path there).
    Via {
        /// The extra socket.
        side: u32,
        /// The peer's address.
        addr: SocketAddr,
    },
}

const V6_PREFIX: [u16; 3] = [0xfd70, 0x3270, 0x6f73];
const V4_FIRST: u8 = 240;
const VIRTUAL_PORT: u16 = 1;

/// Whether `addr` is a virtual address (see the module docs).
pub fn is_virtual(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(ip) => ip.segments()[..3] == V6_PREFIX,
        IpAddr::V4(ip) => ip.octets()[0] == V4_FIRST,
    }
}

fn virtual_addr(ipv6: bool, n: u32) -> SocketAddr {
    let ip: IpAddr = if ipv6 {
        let [p0, p1, p2] = V6_PREFIX;
        Ipv6Addr::new(p0, p1, p2, 0, 0, 0, (n >> 16) as u16, n as u16).into()
    } else {
        let [_, b, c, d] = n.to_be_bytes();
        Ipv4Addr::new(V4_FIRST, b, c, d).into()
    };
    SocketAddr::new(ip, VIRTUAL_PORT)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    route: Route,
    relay: SocketAddr,
    circuit: u64,
}

/// The socket's table of virtual addresses.
#[derive(Debug, Default)]
pub struct Paths {
    by_virtual: HashMap<SocketAddr, Entry>,
    by_circuit: HashMap<(SocketAddr, u64), SocketAddr>,
    by_direct: HashMap<SocketAddr, SocketAddr>,
    by_side: HashMap<(u32, SocketAddr), SocketAddr>,
    next: u32,
}

/// Virtual addresses in use at once, at most.
pub const MAX_VIRTUAL: usize = 4096;

impl Paths {
    /// A new virtual address for the session relayed by `relay` on
    /// `circuit`; `None` if the table is full.
    pub fn add_relayed(
        &mut self,
        ipv6: bool,
        relay: SocketAddr,
        circuit: u64,
    ) -> Option<SocketAddr> {
        if let Some(v) = self.by_circuit.get(&(relay, circuit)) {
            return Some(*v);
        }
        if self.by_virtual.len() >= MAX_VIRTUAL {
            return None;
        }
        let v = loop {
            self.next = self.next.wrapping_add(1) & 0x00ff_ffff;
            let v = virtual_addr(ipv6, self.next.max(1));
            if !self.by_virtual.contains_key(&v) {
                break v;
            }
        };
        self.by_virtual.insert(
            v,
            Entry {
                route: Route::Relayed { relay, circuit },
                relay,
                circuit,
            },
        );
        self.by_circuit.insert((relay, circuit), v);
        Some(v)
    }

    /// The route of a virtual address.
    pub fn route(&self, v: SocketAddr) -> Option<Route> {
        self.by_virtual.get(&v).map(|e| e.route)
    }

    /// The virtual address of a session relayed on `circuit` (by any
    /// relay: circuit ids are 64 random bits).
    pub fn by_circuit_id(&self, circuit: u64) -> Option<SocketAddr> {
        self.by_virtual
            .iter()
            .find(|(_, e)| e.circuit == circuit)
            .map(|(v, _)| *v)
    }

    /// The virtual address packets from `relay` on `circuit` belong to.
    pub fn from_relay(&self, relay: SocketAddr, circuit: u64) -> Option<SocketAddr> {
        self.by_circuit.get(&(relay, circuit)).copied()
    }

    /// The virtual address direct packets from `src` belong to.
    pub fn from_direct(&self, src: SocketAddr) -> Option<SocketAddr> {
        self.by_direct.get(&src).copied()
    }

    /// Whether any direct packets are to be remapped.
    pub fn has_direct(&self) -> bool {
        !self.by_direct.is_empty()
    }

    /// Packets from `src` (the peer's direct address) belong to `v`.
    pub fn learn_direct(&mut self, src: SocketAddr, v: SocketAddr) {
        if self.by_virtual.contains_key(&v) && self.by_direct.len() < MAX_VIRTUAL {
            self.by_direct.insert(src, v);
        }
    }

    /// Sends `v`'s packets straight to `addr` from now on.
    pub fn set_direct(&mut self, v: SocketAddr, addr: SocketAddr) {
        if let Some(e) = self.by_virtual.get_mut(&v) {
            e.route = Route::Direct(addr);
            self.by_direct.insert(addr, v);
        }
    }

    /// Sends `v`'s packets to `addr` from extra socket `side` from now on.
    pub fn set_via(&mut self, v: SocketAddr, side: u32, addr: SocketAddr) {
        if let Some(e) = self.by_virtual.get_mut(&v) {
            e.route = Route::Via { side, addr };
            self.by_side.insert((side, addr), v);
        }
    }

    /// The virtual address packets from `src` on extra socket `side`
    /// belong to.
    pub fn from_side(&self, side: u32, src: SocketAddr) -> Option<SocketAddr> {
        self.by_side.get(&(side, src)).copied()
    }

    /// Forgets `v` and everything that maps to it.
    pub fn remove(&mut self, v: SocketAddr) {
        if let Some(e) = self.by_virtual.remove(&v) {
            self.by_circuit.remove(&(e.relay, e.circuit));
        }
        self.by_direct.retain(|_, to| *to != v);
        self.by_side.retain(|_, to| *to != v);
    }

    /// Whether no virtual address is in use.
    pub fn is_empty(&self) -> bool {
        self.by_virtual.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn virtual_addresses_are_recognised_and_distinct() {
        let mut p = Paths::default();
        let relay = addr("[::ffff:10.0.0.1]:7447");
        let v1 = p.add_relayed(true, relay, 1).unwrap();
        let v2 = p.add_relayed(true, relay, 2).unwrap();
        assert_ne!(v1, v2);
        assert!(is_virtual(v1) && v1.is_ipv6());
        assert_eq!(p.add_relayed(true, relay, 1), Some(v1));
        let v4 = p.add_relayed(false, relay, 3).unwrap();
        assert!(is_virtual(v4) && v4.is_ipv4());
        assert!(!is_virtual(addr("10.0.0.1:1")));
        assert!(!is_virtual(addr("[2001:db8::1]:1")));
        assert_eq!(p.from_relay(relay, 2), Some(v2));
        assert_eq!(p.by_circuit_id(2), Some(v2));
        assert_eq!(p.route(v1), Some(Route::Relayed { relay, circuit: 1 }));
    }

    #[test]
    fn a_session_moves_to_a_direct_path_and_keeps_its_relay_route_in() {
        let mut p = Paths::default();
        let relay = addr("10.0.0.1:7447");
        let peer = addr("10.0.0.9:7447");
        let v = p.add_relayed(false, relay, 7).unwrap();
        assert_eq!(p.from_direct(peer), None);
        p.set_direct(v, peer);
        assert_eq!(p.route(v), Some(Route::Direct(peer)));
        assert_eq!(p.from_direct(peer), Some(v));
        // Packets still in flight through the relay reach the session.
        assert_eq!(p.from_relay(relay, 7), Some(v));
        p.remove(v);
        assert_eq!(p.from_direct(peer), None);
        assert_eq!(p.from_relay(relay, 7), None);
        assert!(p.is_empty());
    }
}
