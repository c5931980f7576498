//! What the DHT needs of an address: a wire form and a network prefix for
//! diversity limits. The daemon uses `SocketAddr`; the simulator uses `u32`
//! (an IPv4-like number whose top 24 bits are its "/24").

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use super::wire::WireError;

/// An address the DHT can carry in messages.
pub trait Address: Copy + Eq + Hash + Ord + std::fmt::Debug + Send + Sync + 'static {
    /// The longest wire form, in bytes.
    const MAX_ENCODED: usize;
    /// Appends the wire form.
    fn encode(&self, out: &mut Vec<u8>);
    /// Reads one address; returns it and the rest.
    fn decode(buf: &[u8]) -> Result<(Self, &[u8]), WireError>;
    /// The network this address belongs to for diversity limits: an IPv4
    /// /24 or an IPv6 /48.
    fn network(&self) -> u64;
}

impl Address for SocketAddr {
    /// Family, IPv6 address, port.
    const MAX_ENCODED: usize = 1 + 16 + 2;

    fn encode(&self, out: &mut Vec<u8>) {
        crate::overlay::encode_addr(self, out);
    }

    fn decode(buf: &[u8]) -> Result<(Self, &[u8]), WireError> {
        crate::overlay::decode_addr(buf).map_err(|_| WireError::Address)
    }

    fn network(&self) -> u64 {
        let ip = self.ip().to_canonical();
        if crate::session::is_local_ip(ip) {
            // On a LAN (or loopback) every node shares the prefix: a home
            // network must not be limited to two entries per bucket. Each
            // local address is its own "network".
            let mut buf = Vec::with_capacity(19);
            self.encode(&mut buf);
            let h = blake3::hash(&buf);
            return u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | (1 << 62);
        }
        match ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                (1 << 63) | (u64::from(s[0]) << 32) | (u64::from(s[1]) << 16) | u64::from(s[2])
            }
        }
    }
}

impl Address for u32 {
    const MAX_ENCODED: usize = 4;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }

    fn decode(buf: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let head: [u8; 4] = buf
            .get(..4)
            .ok_or(WireError::Length)?
            .try_into()
            .map_err(|_| WireError::Length)?;
        Ok((u32::from_be_bytes(head), &buf[4..]))
    }

    fn network(&self) -> u64 {
        u64::from(self >> 8)
    }
}
