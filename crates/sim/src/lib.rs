//! The p2pos simulator: a deterministic discrete-event world that drives the
//! real `p2pos_proto` DHT state machines.
//!
//! - **Clock**: virtual milliseconds; the loop jumps to the next event.
//! - **Randomness**: one seeded generator for the world and one seed per
//!   node; the same seed gives the same run, number for number.
//! - **Network**: nodes sit on a unit square with an access delay each; the
//!   one-way delay between two nodes is their access delays plus 50 ms per
//!   unit of distance, which gives RTTs from about 10 to 270 ms with a median
//!   near 80 ms. Datagrams are lost with a configured probability, and to a
//!   node that left.
//! - **Churn**: session lengths are Pareto (shape 1.5, heavy-tailed) with a
//!   given median; a leaving node vanishes without notice and a new node
//!   (new key, new address) takes its slot and joins through a random server.
//! - **Addresses** are `u32`s spread over the space, so the DHT's per-/24
//!   diversity limit sees realistic networks; each is a keyed bijection of
//!   its node's slot and generation, so the simulator finds a datagram's
//!   destination without a map (the `addr` module).
//! - **Tables** at the start are built from the global ID list (as PeerSim
//!   does) to skip 10^5–10^6 joins; nodes that join later run the real join.
//!
//! - **NATs** (`--nat realistic`): every node gets a router kind from a
//!   mix; only reachable kinds serve the DHT, and connections by key
//!   (`--connects`) run through emulated routers (see [`nat`]).

mod addr;
mod handoff;
pub mod nat;
mod queue;
mod world;

pub use world::{run, Introductions, RequestRates, SimConfig, SimMemory, SimReport, TablesByAge};

/// Parses a duration like `90s`, `30m`, `1h`, `1h30m` or `250ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let mut total_ms: u64 = 0;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    if s.trim().is_empty() {
        return Err("empty duration".into());
    }
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 1h"))?;
        num.clear();
        let unit_ms = match c {
            'h' => 3_600_000,
            's' => 1000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            _ => return Err(format!("invalid duration {s:?}: units are ms, s, m, h")),
        };
        total_ms += n * unit_ms;
    }
    if !num.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: a number needs a unit (s, m, h)"
        ));
    }
    Ok(std::time::Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
