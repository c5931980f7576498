//! Rules both ends of a session apply the same way.

use std::net::{IpAddr, SocketAddr};

use crate::PeerId;

/// Which of two live sessions between the same two peers survives.
///
/// When both peers dial each other at once, each ends up with two sessions:
/// one it dialed and one it accepted. Both apply this rule to the same pair
/// and so keep the same one: the session dialed by the peer with the smaller
/// ID. If both sessions were dialed by the same peer (a reconnect after a
/// restart, say), the newer one wins.
///
/// Returns `true` if the `new` session should replace the `existing` one.
pub fn new_session_wins(existing_dialer: PeerId, new_dialer: PeerId) -> bool {
    if existing_dialer == new_dialer {
        return true;
    }
    new_dialer < existing_dialer
}

/// How a session reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A peer on the same local network (private, link-local or loopback
    /// address).
    Lan,
    /// A public address reached without NAT traversal.
    Direct,
    /// A public address reached by hole punching, coordinated through the
    /// peer's home.
    Punched,
}

impl PathKind {
    /// The path name used in status output and the local API.
    pub fn as_str(&self) -> &'static str {
        match self {
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Punched => "punched",
        }
    }

    /// Classifies the path to a remote address.
    pub fn for_remote(addr: SocketAddr) -> Self {
        Self::for_session(addr, false)
    }

    /// Classifies a session's path: `punched` when it was made by hole
    /// punching, unless it runs over the LAN anyway.
    pub fn for_session(addr: SocketAddr, punched: bool) -> Self {
        if is_local_ip(addr.ip()) {
            PathKind::Lan
        } else if punched {
            PathKind::Punched
        } else {
            PathKind::Direct
        }
    }
}

/// Whether an address belongs to a local network: loopback, private
/// (RFC 1918), link-local, or IPv6 unique-local (RFC 4193).
pub fn is_local_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_local_ip(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    #[test]
    fn both_ends_keep_the_same_session() {
        let a = Keypair::from_seed([1; 32]).peer_id();
        let b = Keypair::from_seed([2; 32]).peer_id();
        // A holds the session it dialed and accepts B's; B holds the reverse.
        let a_replaces = new_session_wins(a, b);
        let b_replaces = new_session_wins(b, a);
        // Exactly one side replaces: both end with the same session.
        assert_ne!(a_replaces, b_replaces);
        let kept_dialer = if a_replaces { b } else { a };
        assert_eq!(kept_dialer, a.min(b));
    }

    #[test]
    fn reconnect_from_same_dialer_replaces() {
        let a = Keypair::from_seed([1; 32]).peer_id();
        assert!(new_session_wins(a, a));
    }

    #[test]
    fn paths() {
        for local in [
            "127.0.0.1:1",
            "10.1.2.3:1",
            "192.168.1.1:1",
            "[fd00::1]:1",
            "[fe80::1]:1",
            "[::1]:1",
            "[::ffff:192.168.0.2]:1",
        ] {
            assert_eq!(
                PathKind::for_remote(local.parse().unwrap()),
                PathKind::Lan,
                "{local}"
            );
        }
        for public in ["8.8.8.8:1", "[2001:db8::1]:1"] {
            assert_eq!(
                PathKind::for_remote(public.parse().unwrap()),
                PathKind::Direct
            );
        }
    }
}
