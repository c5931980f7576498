//! The routers between this host and a peer, from the ICMP "time exceeded"
//! answers to UDP datagrams sent with a small TTL (as traceroute does), read
//! from the socket's error queue (`IP_RECVERR`): no raw socket, no root.
//!
//! A node uses it to tell whether a carrier-grade NAT sits beyond its home
//! router (`p2pos_proto::reach::judge_cgn_path`). The datagrams never reach
//! the peer: the TTL runs out a few routers away.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The address of the router at each hop toward `target` (`None`: no
/// answer), for TTL 1 up to `max_ttl`, waiting up to `wait` for answers.
/// IPv4 only (carrier-grade NAT is an IPv4 matter). On systems without
/// `IP_RECVERR`, an `Unsupported` error.
pub fn hops(
    target: SocketAddr,
    max_ttl: u8,
    wait: Duration,
) -> std::io::Result<Vec<Option<IpAddr>>> {
    imp::hops(target, max_ttl, wait)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    /// ICMP "time exceeded".
    const ICMP_TIME_EXCEEDED: u8 = 11;
    /// Datagrams per TTL (an answer may be rate-limited or lost).
    const PROBES_PER_TTL: usize = 2;

    pub fn hops(
        target: SocketAddr,
        max_ttl: u8,
        wait: Duration,
    ) -> std::io::Result<Vec<Option<IpAddr>>> {
        let SocketAddr::V4(_) = target else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "path tracing is IPv4 only",
            ));
        };
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        let fd = socket.as_raw_fd();
        let on: libc::c_int = 1;
        // SAFETY: fd is a valid socket for the call; the option value is a
        // c_int that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut hops = vec![None; usize::from(max_ttl)];
        for ttl in 1..=max_ttl {
            socket.set_ttl(u32::from(ttl))?;
            for _ in 0..PROBES_PER_TTL {
                // The payload names the TTL: the error queue returns it.
                let _ = socket.send_to(&[b'p', b'2', ttl], target);
            }
        }
        let deadline = Instant::now() + wait;
        while hops.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut poll = libc::pollfd {
                fd,
                events: 0, // POLLERR is always reported
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n =
                unsafe { libc::poll(&mut poll, 1, left.as_millis().min(60_000) as libc::c_int) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            while let Some((ttl, router)) = read_error(fd) {
                if let Some(slot) = hops.get_mut(usize::from(ttl).wrapping_sub(1)) {
                    slot.get_or_insert(router);
                }
            }
        }
        Ok(hops)
    }

    /// One ICMP "time exceeded" from the error queue: the TTL our payload
    /// named and the router that sent it. `None` when the queue is empty.
    /// Other errors in the queue are skipped.
    fn read_error(fd: libc::c_int) -> Option<(u8, IpAddr)> {
        loop {
            let mut payload = [0u8; 16];
            let mut control = [0u64; 64]; // aligned for cmsghdr
            let mut iov = libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            };
            // SAFETY: msghdr is plain data; zeroed is a valid empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: msg points at buffers that outlive the call.
            let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
            if n < 0 {
                return None;
            }
            let ttl = (n >= 3 && payload[..2] == *b"p2").then_some(payload[2]);
            // SAFETY: the CMSG macros walk the control buffer recvmsg
            // filled, within msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            let mut found = None;
            while !cmsg.is_null() {
                // SAFETY: cmsg is non-null and inside the control buffer.
                let header = unsafe { &*cmsg };
                if header.cmsg_level == libc::IPPROTO_IP && header.cmsg_type == libc::IP_RECVERR {
                    // SAFETY: an IP_RECVERR message carries a
                    // sock_extended_err followed by the offender's address.
                    let err = unsafe {
                        std::ptr::read_unaligned(
                            libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err
                        )
                    };
                    if err.ee_origin == libc::SO_EE_ORIGIN_ICMP && err.ee_type == ICMP_TIME_EXCEEDED
                    {
                        // SAFETY: as above; the offender is a sockaddr_in
                        // for an ICMP (IPv4) error.
                        let offender = unsafe {
                            std::ptr::read_unaligned(libc::SO_EE_OFFENDER(
                                libc::CMSG_DATA(cmsg) as *const _
                            )
                                as *const libc::sockaddr_in)
                        };
                        if i32::from(offender.sin_family) == libc::AF_INET {
                            let ip =
                                std::net::Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr));
                            found = Some(IpAddr::V4(ip));
                        }
                    }
                }
                // SAFETY: as for CMSG_FIRSTHDR.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
            if let (Some(ttl), Some(router)) = (ttl, found) {
                return Some((ttl, router));
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    pub fn hops(
        _target: SocketAddr,
        _max_ttl: u8,
        _wait: Duration,
    ) -> std::io::Result<Vec<Option<IpAddr>>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "path tracing needs IP_RECVERR (Linux)",
        ))
    }
}
