//! `p2pos up`: the node as a daemon, with its local API.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use p2pos_proto::network::NetworkKey;
use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;
use crate::data_dir::{DataDir, IdentityError};
use crate::node::{Node, NodeError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the data dir.
    #[error("another p2pos daemon{} is running with data dir {dir}; stop it first, or give this one its own --data-dir", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning {
        /// The data dir.
        dir: PathBuf,
        /// The other daemon's pid, if known.
        pid: Option<u32>,
    },
    /// The network secret is unusable.
    #[error("network secret {path}: {reason}; create one with: p2pos network new {path}")]
    NetworkSecret {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The node failed to start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Identity or data dir problem.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The API could not be served.
    #[error("cannot serve the local API on {what}: {source}")]
    Api {
        /// Where.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configured expose failed.
    #[error("config expose: {0}")]
    Expose(String),
}

/// Holds the data dir's lock file while the daemon runs.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock of `dir`, or says who holds it.
    pub fn acquire(dir: &DataDir) -> Result<Self, DaemonError> {
        let path = dir.file("daemon.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| IdentityError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(DaemonError::AlreadyRunning {
                    dir: dir.path().to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(IdentityError::Io { path, source }.into());
            }
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(DaemonLock { _file: file })
    }
}

/// Reads a network secret file.
pub fn load_network_key(path: &Path) -> Result<NetworkKey, DaemonError> {
    let bad = |reason: String| DaemonError::NetworkSecret {
        path: path.to_owned(),
        reason,
    };
    let text = fs::read(path).map_err(|e| bad(e.to_string()))?;
    let trimmed = text.trim_ascii();
    NetworkKey::from_secret(trimmed).map_err(|e| bad(e.to_string()))
}

/// How long to wait between attempts to reach a bootstrap peer.
const BOOTSTRAP_RETRY: std::time::Duration = std::time::Duration::from_secs(15);

/// Opens a session to a bootstrap peer, retrying until it works; then
/// re-opens it whenever it closes (for as long as the node runs).
async fn keep_bootstrap_session(node: Node, peer: crate::config::BootstrapPeer) {
    let weak = std::sync::Arc::downgrade(&node.inner);
    drop(node);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let node = Node { inner };
        match node.connect(peer.peer, Some(peer.addr)).await {
            Ok(()) => tracing::debug!(%peer, "bootstrap session up"),
            Err(crate::node::ConnectError::Shutdown) => return,
            Err(e) => tracing::warn!(%peer, "bootstrap peer unreachable: {e}"),
        }
        drop(node);
        tokio::time::sleep(BOOTSTRAP_RETRY).await;
    }
}

/// A running daemon: the node and its API servers.
#[derive(Debug)]
pub struct Daemon {
    /// The node.
    pub node: Node,
    /// The TCP API address, if served.
    pub api_tcp: Option<std::net::SocketAddr>,
    socket_path: PathBuf,
    _lock: DaemonLock,
}

impl Daemon {
    /// Starts the node and the API of `data_dir` with `config`.
    pub async fn start(data_dir: &Path, config: &Config) -> Result<Self, DaemonError> {
        let dir = DataDir::open(data_dir)?;
        let lock = DaemonLock::acquire(&dir)?;
        let mut builder = Node::builder()
            .dht(true, config.dht.mode)
            .mdns(config.lan.mdns)
            .port_mapping(config.nat.port_mapping)
            .relay_limits(config.relay.limits())
            .data_dir(dir.path())
            .listen(config.listen)
            .session_timers(
                std::time::Duration::from_secs(config.session.idle_timeout_s),
                std::time::Duration::from_secs(config.session.keepalive_s),
            );
        if let Some(path) = &config.network_secret_file {
            let path = if path.is_relative() {
                dir.path().join(path)
            } else {
                path.clone()
            };
            builder = builder.network(load_network_key(&path)?);
        }
        let node = builder.spawn().await?;

        let socket_path = dir.api_socket();
        // We hold the lock, so a socket file left here is stale.
        let _ = fs::remove_file(&socket_path);
        let unix = UnixListener::bind(&socket_path).map_err(|source| DaemonError::Api {
            what: socket_path.display().to_string(),
            source,
        })?;
        let _ = fs::set_permissions(&socket_path, fs::Permissions::from_mode(0o600));

        let mut api_tcp = None;
        let unix_router = match config.api.tcp {
            None => crate::api::router(node.clone(), None),
            Some(addr) => {
                let token = dir.load_or_create_token()?;
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Api {
                        what: addr.to_string(),
                        source,
                    })?;
                api_tcp = tcp.local_addr().ok();
                let (unix_router, tcp_router) = crate::api::routers(node.clone(), token);
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(tcp, tcp_router).await {
                        tracing::error!("TCP API stopped: {e}");
                    }
                });
                unix_router
            }
        };
        tokio::spawn(async move {
            if let Err(e) = axum::serve(unix, unix_router).await {
                tracing::error!("API stopped: {e}");
            }
        });

        for e in &config.expose {
            node.expose(&e.service, e.target)
                .map_err(|err| DaemonError::Expose(format!("{}: {err}", e.service)))?;
        }
        let bootstrap = config
            .bootstrap_peers()
            .map_err(|e| DaemonError::Expose(e.to_string()))?;
        if let Some(dht) = node.dht() {
            for peer in &bootstrap {
                dht.bootstrap(peer.addr);
            }
            // Peers met in earlier runs help rejoin when the list is empty
            // or its nodes are gone.
            let mut known = node.known_peers();
            known.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_seen));
            for (_, e) in known.into_iter().take(8) {
                dht.bootstrap(e.last_addr);
            }
        }
        for peer in bootstrap {
            tokio::spawn(keep_bootstrap_session(node.clone(), peer));
        }
        Ok(Daemon {
            node,
            api_tcp,
            socket_path,
            _lock: lock,
        })
    }

    /// Stops the node and removes the API socket.
    pub async fn stop(self) {
        self.node.shutdown().await;
        let _ = fs::remove_file(&self.socket_path);
    }
}
