//! The p2pos NAT lab: topologies of Linux network namespaces with real NAT
//! rules (nftables, conntrack) and a real UPnP/NAT-PMP/PCP router daemon
//! (miniupnpd), running real `p2pos` binaries.
//!
//! ```text
//!            internet namespace: bridge br0, 11.0.0.1/16, 2001:db8::1/64
//!        ┌────────────┬──────────────┬────────────────────┐
//!  public host     router r1 (wan 11.0.2.1)     router r2 ...
//!  11.0.1.x        lan bridge 192.168.1.1/24
//!                     └── host 192.168.1.10, 192.168.1.11 ...
//! ```
//!
//! The lab's "internet" uses 11.0.0.0/16 and 2001:db8::/64: ranges that
//! exist only inside the lab's namespaces (nothing is routed out of them),
//! and that miniupnpd accepts as a public WAN address. A `cgn` router is a
//! carrier NAT (WAN on the internet, LAN 100.64.N.0/24) with a home router
//! behind it. Every lab has a unique namespace prefix and removes all of its
//! namespaces when dropped, also when a test panics; `p2pos-lab clean`
//! removes the leftovers of a killed run.

pub mod keepalivebench;
pub mod lanbench;
pub mod matrix;
pub mod probe;
pub mod router;
pub mod topology;

pub use router::{RouterKind, RouterOptions};
pub use topology::{HostId, Lab, LabError, RouterId};

/// Prefix of every namespace the lab creates.
pub const NS_PREFIX: &str = "p2l";

/// Whether this process can build labs (root).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// For lab tests: a new lab, or `None` (with a loud SKIPPED) when not
/// root. Under CI (`CI` set) a missing root fails the test instead.
pub fn lab_for_test() -> Option<Lab> {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "lab tests must run as root in CI"
        );
        eprintln!("SKIPPED: lab tests need root to create network namespaces; run the suite as root to include them");
        return None;
    }
    Some(Lab::new().expect("lab"))
}

/// For lab tests: the `p2pos` binary cargo built next to the test binary.
pub fn p2pos_next_to_tests() -> std::path::PathBuf {
    // target/debug/deps/<test>-… -> target/debug/p2pos
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("p2pos");
    assert!(
        bin.exists(),
        "the p2pos binary is not built next to the tests: run cargo test --workspace"
    );
    bin
}

/// Removes every lab namespace (all runs), e.g. after a killed run.
/// Returns how many were removed.
pub fn clean_all() -> usize {
    clean_prefix(NS_PREFIX)
}

/// Removes the namespaces whose names start with `prefix`.
pub fn clean_prefix(prefix: &str) -> usize {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return 0;
    };
    let mut removed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(prefix) {
            kill_namespace_processes(name);
            let ok = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                removed += 1;
            }
        }
    }
    removed
}

/// Kills every process still running in namespace `ns`.
pub fn kill_namespace_processes(ns: &str) {
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
}
