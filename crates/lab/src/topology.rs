//! Building a lab: namespaces, links, addresses, routers, hosts, processes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::router::{self, RouterKind, RouterOptions};
use crate::NS_PREFIX;

/// Why the lab could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Not running as root.
    #[error("the lab needs root to create network namespaces (run as root, or with sudo)")]
    NotRoot,
    /// A tool is missing.
    #[error(
        "{tool} is missing: install the Debian package {package} (./scripts/test installs it)"
    )]
    MissingTool {
        /// The command.
        tool: &'static str,
        /// The package that has it.
        package: &'static str,
    },
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The lab ran out of addresses.
    #[error("too many {0} in one lab")]
    Full(&'static str),
    /// File system or process error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A router in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterId(pub usize);

/// A host in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostId(pub usize);

/// A router's facts.
#[derive(Debug, Clone)]
pub struct Router {
    /// Its kind.
    pub kind: RouterKind,
    /// Its namespace (the home router's, for `cgn`).
    pub ns: String,
    /// The public address its hosts appear at.
    pub public_ip: Ipv4Addr,
    /// The home router's own WAN address (differs from `public_ip` behind CGN).
    pub wan_ip: Ipv4Addr,
    /// The LAN /24 network address.
    pub lan_net: Ipv4Addr,
    /// Its options.
    pub options: RouterOptions,
    /// Whether it connects its LAN to the internet (`false`: a plain
    /// switch, see [`Lab::add_switch`]).
    pub uplink: bool,
    hosts: u8,
}

/// A host's facts.
#[derive(Debug, Clone)]
pub struct Host {
    /// A readable name.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address (public and firewall hosts).
    pub ipv6: Option<Ipv6Addr>,
    /// The router it sits behind, if any.
    pub router: Option<RouterId>,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running lab. Dropping it stops its processes and removes its
/// namespaces.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    routers: Vec<Router>,
    hosts: Vec<Host>,
    public_hosts: u8,
    workdir: tempfile::TempDir,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("{cmd:?}").replace('"', ""),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

fn check_tool(tool: &'static str, package: &'static str) -> Result<(), LabError> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).exists()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).exists();
    if found {
        Ok(())
    } else {
        Err(LabError::MissingTool { tool, package })
    }
}

impl Lab {
    /// Creates the lab's internet. Needs root, `ip` and `nft`.
    pub fn new() -> Result<Lab, LabError> {
        if !crate::is_root() {
            return Err(LabError::NotRoot);
        }
        check_tool("ip", "iproute2")?;
        check_tool("nft", "nftables")?;
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}x{n}-", std::process::id());
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            routers: Vec::new(),
            hosts: Vec::new(),
            public_hosts: 0,
            workdir: tempfile::tempdir()?,
        };
        let inet = lab.add_ns("inet")?;
        lab.sh(
            &inet,
            "ip link add br0 type bridge && ip link set br0 up && ip link set lo up",
        )?;
        lab.sh(
            &inet,
            "ip addr add 11.0.0.1/16 dev br0 && ip -6 addr add 2001:db8::1/64 dev br0 nodad",
        )?;
        lab.sysctl(&inet, "net.ipv4.ip_forward", "1")?;
        lab.sysctl(&inet, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(lab)
    }

    /// The namespace name prefix of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A directory that lives as long as the lab.
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    fn inet(&self) -> String {
        format!("{}inet", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> Result<String, LabError> {
        let ns = format!("{}{name}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &ns]))?;
        self.namespaces.push(ns.clone());
        self.sh(&ns, "ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command line inside namespace `ns`.
    pub fn sh(&self, ns: &str, script: &str) -> Result<Output, LabError> {
        run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<(), LabError> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]))?;
        Ok(())
    }

    /// Connects `ns` to the internet bridge with `v4`/`v6` and a default route.
    fn attach_to_internet(
        &self,
        ns: &str,
        ifname: &str,
        port: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<(), LabError> {
        let inet = self.inet();
        run(Command::new("ip").args([
            "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns",
            &inet,
        ]))?;
        self.sh(
            &inet,
            &format!("ip link set {port} master br0 && ip link set {port} up"),
        )?;
        self.sh(
            ns,
            &format!(
                "ip link set {ifname} up && ip addr add {v4}/16 dev {ifname} && ip route add default via 11.0.0.1 \
                 && ip -6 addr add {v6}/64 dev {ifname} nodad && ip -6 route add default via 2001:db8::1"
            ),
        )?;
        Ok(())
    }

    /// Adds a host directly on the internet (kind `public`).
    pub fn add_public_host(&mut self, name: &str) -> Result<HostId, LabError> {
        self.public_hosts = self
            .public_hosts
            .checked_add(1)
            .ok_or(LabError::Full("public hosts"))?;
        let j = self.public_hosts;
        let ns = self.add_ns(&format!("p{j}"))?;
        let v4 = Ipv4Addr::new(11, 0, 1, j);
        let v6: Ipv6Addr = format!("2001:db8::1:{j:x}").parse().expect("valid literal");
        self.attach_to_internet(&ns, "eth0", &format!("p{j}"), v4, v6)?;
        self.hosts.push(Host {
            name: name.to_owned(),
            ns,
            ipv4: v4,
            ipv6: Some(v6),
            router: None,
        });
        Ok(HostId(self.hosts.len() - 1))
    }

    /// Adds a router of `kind` (not `public`: use [`Lab::add_public_host`]).
    pub fn add_router(
        &mut self,
        kind: RouterKind,
        options: RouterOptions,
    ) -> Result<RouterId, LabError> {
        assert_ne!(kind, RouterKind::Public, "a public host has no router");
        if kind == RouterKind::Upnp {
            check_tool("miniupnpd", "miniupnpd")?;
        }
        if kind == RouterKind::Cgn || kind == RouterKind::Upnp {
            check_tool("conntrack", "conntrack")?;
        }
        let i = u8::try_from(self.routers.len() + 1).map_err(|_| LabError::Full("routers"))?;
        let wan_public = Ipv4Addr::new(11, 0, 2, i);
        let wan_v6: Ipv6Addr = format!("2001:db8::2:{i:x}").parse().expect("valid literal");
        // Firewall LANs are routed public addresses; NAT LANs are private.
        let lan_net = if kind == RouterKind::Firewall {
            Ipv4Addr::new(12, i, 0, 0)
        } else {
            Ipv4Addr::new(192, 168, i, 0)
        };
        let ns = self.add_ns(&format!("r{i}"))?;
        let home_wan = if kind == RouterKind::Cgn {
            // The carrier's NAT: internet on one side, 100.64.i.0/24 on the other.
            let carrier = self.add_ns(&format!("c{i}"))?;
            self.attach_to_internet(&carrier, "wan", &format!("c{i}"), wan_public, wan_v6)?;
            self.sysctl(&carrier, "net.ipv4.ip_forward", "1")?;
            let carrier_lan = Ipv4Addr::new(100, 64, i, 1);
            let home = Ipv4Addr::new(100, 64, i, 2);
            run(Command::new("ip").args([
                "link", "add", "wan", "netns", &ns, "type", "veth", "peer", "name", "lan", "netns",
                &carrier,
            ]))?;
            self.sh(
                &carrier,
                &format!("ip link set lan up && ip addr add {carrier_lan}/24 dev lan"),
            )?;
            self.sh(&ns, &format!("ip link set wan up && ip addr add {home}/24 dev wan && ip route add default via {carrier_lan}"))?;
            let carrier_rules = router::ruleset(
                RouterKind::PortRestricted,
                wan_public,
                Ipv4Addr::new(100, 64, i, 0),
                &options,
            );
            self.load_rules(&carrier, &carrier_rules)?;
            self.set_udp_timeout(&carrier, options.udp_timeout_s)?;
            home
        } else {
            self.attach_to_internet(&ns, "wan", &format!("r{i}"), wan_public, wan_v6)?;
            wan_public
        };
        self.sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        self.sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")?;
        let gw = Ipv4Addr::new(
            lan_net.octets()[0],
            lan_net.octets()[1],
            lan_net.octets()[2],
            1,
        );
        self.sh(
            &ns,
            &format!(
                "ip link add lan type bridge && ip link set lan up && ip addr add {gw}/24 dev lan"
            ),
        )?;
        if kind == RouterKind::Firewall {
            let v6_lan = format!("2001:db8:{i:x}::1");
            self.sh(&ns, &format!("ip -6 addr add {v6_lan}/64 dev lan nodad"))?;
            // The internet routes the firewall's public LAN to it.
            self.sh(
                &self.inet(),
                &format!("ip route add {lan_net}/24 via {wan_public} && ip -6 route add 2001:db8:{i:x}::/64 via {wan_v6}"),
            )?;
        }
        let home_kind = if kind == RouterKind::Cgn {
            RouterKind::PortRestricted
        } else {
            kind
        };
        self.load_rules(
            &ns,
            &router::ruleset(home_kind, home_wan, lan_net, &options),
        )?;
        self.set_udp_timeout(&ns, options.udp_timeout_s)?;
        if kind == RouterKind::Upnp {
            let conf = self.workdir().join(format!("miniupnpd-r{i}.conf"));
            std::fs::write(
                &conf,
                router::miniupnpd_config(lan_net, u32::from(i), options.igd_only),
            )?;
            let pid = self.workdir().join(format!("miniupnpd-r{i}.pid"));
            let log = std::fs::File::create(self.workdir().join(format!("miniupnpd-r{i}.log")))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns, "miniupnpd", "-d", "-f"])
                .arg(&conf)
                .arg("-P")
                .arg(&pid)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            self.children.push(child);
        }
        self.routers.push(Router {
            kind,
            ns,
            public_ip: wan_public,
            wan_ip: home_wan,
            lan_net,
            options,
            uplink: true,
            hosts: 0,
        });
        Ok(RouterId(self.routers.len() - 1))
    }

    /// Adds a LAN segment with no uplink: a switch (a bridge in its own
    /// namespace) and no router; its hosts get 10.77.N.0/24 addresses, no
    /// default route and no internet. Use [`Lab::add_host`] to fill it.
    pub fn add_switch(&mut self) -> Result<RouterId, LabError> {
        let i = u8::try_from(self.routers.len() + 1).map_err(|_| LabError::Full("routers"))?;
        let ns = self.add_ns(&format!("s{i}"))?;
        self.sh(&ns, "ip link add lan type bridge && ip link set lan up")?;
        self.routers.push(Router {
            kind: RouterKind::Public,
            ns,
            public_ip: Ipv4Addr::UNSPECIFIED,
            wan_ip: Ipv4Addr::UNSPECIFIED,
            lan_net: Ipv4Addr::new(10, 77, i, 0),
            options: RouterOptions::default(),
            uplink: false,
            hosts: 0,
        });
        Ok(RouterId(self.routers.len() - 1))
    }

    fn load_rules(&self, ns: &str, rules: &str) -> Result<(), LabError> {
        let file = self.workdir().join(format!("{ns}.nft"));
        std::fs::write(&file, rules)?;
        run(Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f"])
            .arg(&file))?;
        Ok(())
    }

    fn set_udp_timeout(&self, ns: &str, seconds: u32) -> Result<(), LabError> {
        let s = seconds.max(1).to_string();
        self.sysctl(ns, "net.netfilter.nf_conntrack_udp_timeout", &s)?;
        self.sysctl(ns, "net.netfilter.nf_conntrack_udp_timeout_stream", &s)?;
        Ok(())
    }

    /// Adds a host on `router`'s LAN.
    pub fn add_host(&mut self, router: RouterId, name: &str) -> Result<HostId, LabError> {
        let r = self.routers.get_mut(router.0).expect("router of this lab");
        r.hosts = r
            .hosts
            .checked_add(1)
            .filter(|h| *h < 200)
            .ok_or(LabError::Full("hosts on one LAN"))?;
        let h = r.hosts;
        let (rns, lan_net, kind, uplink) = (r.ns.clone(), r.lan_net, r.kind, r.uplink);
        let idx = self.hosts.len() + 1;
        let ns = self.add_ns(&format!("h{idx}"))?;
        let o = lan_net.octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], 9 + h);
        let gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &format!("h{h}"),
            "netns",
            &rns,
        ]))?;
        self.sh(
            &rns,
            &format!("ip link set h{h} master lan && ip link set h{h} up"),
        )?;
        let route = if uplink {
            format!(" && ip route add default via {gw}")
        } else {
            String::new()
        };
        self.sh(
            &ns,
            &format!("ip link set eth0 up && ip addr add {ip}/24 dev eth0{route}"),
        )?;
        let mut ipv6 = None;
        if kind == RouterKind::Firewall && uplink {
            let i = router.0 + 1;
            let v6: Ipv6Addr = format!("2001:db8:{i:x}::{:x}", 9 + h)
                .parse()
                .expect("valid literal");
            self.sh(&ns, &format!("ip -6 addr add {v6}/64 dev eth0 nodad && ip -6 route add default via 2001:db8:{i:x}::1"))?;
            ipv6 = Some(v6);
        }
        self.hosts.push(Host {
            name: name.to_owned(),
            ns,
            ipv4: ip,
            ipv6,
            router: Some(router),
        });
        Ok(HostId(self.hosts.len() - 1))
    }

    /// A host's facts.
    pub fn host(&self, id: HostId) -> &Host {
        &self.hosts[id.0]
    }

    /// A router's facts.
    pub fn router(&self, id: RouterId) -> &Router {
        &self.routers[id.0]
    }

    /// Runs a program in a host's namespace and waits for it.
    pub fn exec(&self, host: HostId, program: &Path, args: &[&str]) -> Result<Output, LabError> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.host(host).ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Starts a program in a host's namespace; it is killed with the lab.
    /// Returns its index for [`Lab::wait_child`].
    pub fn spawn(
        &mut self,
        host: HostId,
        program: &Path,
        args: &[&str],
        log: Option<&Path>,
    ) -> Result<usize, LabError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host(host).ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = std::fs::File::create(path)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        self.children.push(cmd.spawn()?);
        Ok(self.children.len() - 1)
    }

    /// Stops a spawned program the way Ctrl-C would (SIGTERM) and waits up
    /// to `grace` for it to exit before killing it.
    pub fn stop_child(&mut self, index: usize, grace: std::time::Duration) {
        let child = &mut self.children[index];
        // The child is `ip netns exec …`, which execs the program: same pid.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills a spawned program at once (SIGKILL: no goodbye of any kind).
    pub fn kill_child(&mut self, index: usize) {
        let child = &mut self.children[index];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for a spawned program and returns its output (if piped).
    pub fn wait_child(&mut self, index: usize) -> Result<Output, LabError> {
        let child = std::mem::replace(&mut self.children[index], Command::new("true").spawn()?);
        Ok(child.wait_with_output()?)
    }

    /// The path of a file in the lab's work directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.workdir().join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("P2POS_LAB_KEEP").is_some() {
            eprintln!(
                "P2POS_LAB_KEEP is set: keeping lab {} and its files in {} (remove with: p2pos-lab clean)",
                self.prefix,
                self.workdir.path().display()
            );
            let dir = std::mem::replace(&mut self.workdir, tempfile::tempdir().expect("temp dir"));
            let _ = dir.keep();
            for child in &mut self.children {
                let _ = child.try_wait();
            }
            self.children.clear();
            return;
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            crate::kill_namespace_processes(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
