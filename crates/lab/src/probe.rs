//! A tiny UDP probe used inside lab namespaces to pin router behaviour:
//! `p2pos-lab probe reflect|session|send`.
//!
//! - `reflect`: answers every `P2L? <tag>` with `P2L! <tag> <source addr>`,
//!   telling the sender its mapped address (as a peer would).
//! - `session`: from one bound port, sends `P2L? <tag>` to each target, then
//!   records every datagram that arrives for a while (replies and
//!   unsolicited ones) as JSON lines.
//! - `send`: sends one datagram from a bound port.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One datagram a `session` received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Received {
    /// Its source.
    pub from: SocketAddr,
    /// Its payload as text.
    pub payload: String,
}

impl Received {
    /// The mapped address a reflector reported, if this is its answer.
    pub fn observed(&self) -> Option<SocketAddr> {
        let mut words = self.payload.split_whitespace();
        (words.next()? == "P2L!").then_some(())?;
        words.nth(1)?.parse().ok()
    }
}

/// Answers probes on `port` forever.
pub fn reflect(port: u16) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, src) = sock.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(tag) = text.strip_prefix("P2L? ") {
            let reply = format!("P2L! {} {src}", tag.trim());
            let _ = sock.send_to(reply.as_bytes(), src);
        }
    }
}

/// Sends a probe to each target from `bind`, then collects datagrams for
/// `listen`. Probes are re-sent every `interval` (if set) to keep the
/// bindings alive.
pub fn session(
    bind: u16,
    targets: &[SocketAddr],
    listen: Duration,
    interval: Option<Duration>,
) -> std::io::Result<Vec<Received>> {
    let sock = UdpSocket::bind(("0.0.0.0", bind))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let send_all = |round: u32| {
        for (i, t) in targets.iter().enumerate() {
            let _ = sock.send_to(format!("P2L? {i}.{round}").as_bytes(), t);
        }
    };
    send_all(0);
    let start = Instant::now();
    let mut last = start;
    let mut round = 0;
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while start.elapsed() < listen {
        if let Some(iv) = interval {
            if last.elapsed() >= iv {
                round += 1;
                send_all(round);
                last = Instant::now();
            }
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => out.push(Received {
                from,
                payload: String::from_utf8_lossy(&buf[..n]).into_owned(),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Sends one datagram from `bind` to `to`.
pub fn send(bind: u16, to: SocketAddr, payload: &str) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", bind))?;
    sock.send_to(payload.as_bytes(), to)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_address_is_parsed_from_a_reflector_reply() {
        let r = Received {
            from: "11.0.1.1:9000".parse().unwrap(),
            payload: "P2L! 0.0 11.0.2.3:7001".into(),
        };
        assert_eq!(r.observed(), Some("11.0.2.3:7001".parse().unwrap()));
        let other = Received {
            from: r.from,
            payload: "hello".into(),
        };
        assert_eq!(other.observed(), None);
    }

    #[test]
    fn session_and_reflector_on_loopback() {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::thread::spawn(move || reflect(port));
        std::thread::sleep(Duration::from_millis(100));
        let bind = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let got = session(
            bind,
            &[SocketAddr::from(([127, 0, 0, 1], port))],
            Duration::from_millis(300),
            None,
        )
        .unwrap();
        assert_eq!(got[0].observed().unwrap().port(), bind);
    }
}
