//! TCP tunnels: `expose` offers a local TCP service to peers; `forward`
//! carries a local TCP port to a peer's service.
//!
//! Each TCP connection is one QUIC stream. A FIN on either side is passed on
//! as a FIN (half-close), so protocols that shut down one direction first
//! work. When either side fails (connection refused, reset), the other side
//! is reset too: the peer's stream gets a reset, a local TCP connection gets
//! an RST (linger 0), so both ends see an error rather than a clean end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pos_proto::stream::StreamStatus;
use p2pos_proto::PeerId;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::node::{ListenError, Node, STREAM_FAILED};
use crate::status::{ExposeStatus, ForwardStatus, TunnelsStatus};

/// How long `expose` waits for its local target to accept a connection.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of each direction's copy buffer.
const COPY_BUFFER: usize = 64 * 1024;

/// Bytes carried by one spliced connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpliceStats {
    /// From the local side to the peer.
    pub up: u64,
    /// From the peer to the local side.
    pub down: u64,
}

/// Copies both ways between a local byte stream and a QUIC stream until
/// both directions are finished, passing half-closes on. On an error in
/// either direction the QUIC stream is reset; the caller resets the local
/// side.
pub async fn splice<S>(
    local: S,
    send: SendStream,
    recv: RecvStream,
) -> Result<SpliceStats, std::io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (local_read, local_write) = tokio::io::split(local);
    splice_halves(local_read, local_write, send, recv).await
}

async fn splice_halves<R, W>(
    mut local_read: R,
    mut local_write: W,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<SpliceStats, std::io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // 64 KiB copy buffers: tokio's default 8 KiB costs a third of the
    // throughput in small QUIC writes.
    let up = async {
        let mut local_read = tokio::io::BufReader::with_capacity(COPY_BUFFER, &mut local_read);
        let n = tokio::io::copy_buf(&mut local_read, &mut send).await?;
        send.finish().map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(n)
    };
    let down = async {
        let mut recv = tokio::io::BufReader::with_capacity(COPY_BUFFER, &mut recv);
        let n = tokio::io::copy_buf(&mut recv, &mut local_write).await?;
        local_write.shutdown().await?;
        Ok::<_, std::io::Error>(n)
    };
    match tokio::try_join!(up, down) {
        Ok((up, down)) => {
            // Wait until the peer has everything, so a node that stops right
            // after does not cut the tail off.
            let _ = send.stopped().await;
            Ok(SpliceStats { up, down })
        }
        Err(e) => {
            let _ = send.reset(VarInt::from_u32(STREAM_FAILED));
            let _ = recv.stop(VarInt::from_u32(STREAM_FAILED));
            Err(e)
        }
    }
}

/// Splices a TCP connection; on error the TCP side gets an RST.
async fn splice_tcp(mut tcp: TcpStream, send: SendStream, recv: RecvStream) {
    let (r, w) = tcp.split();
    if let Err(e) = splice_halves(r, w, send, recv).await {
        tracing::debug!("tunnel connection failed: {e}");
        // Linger 0 makes close() send an RST: the local app sees an error.
        let _ = tcp.set_zero_linger();
    }
}

#[derive(Debug)]
struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
}

#[derive(Debug)]
enum TunnelKind {
    Expose {
        service: String,
        target: SocketAddr,
    },
    Forward {
        listen: SocketAddr,
        peer: PeerId,
        service: String,
    },
}

#[derive(Debug)]
struct Tunnel {
    kind: TunnelKind,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

/// The node's tunnels, for status and removal.
#[derive(Debug, Default)]
pub struct TunnelRegistry {
    next_id: AtomicU64,
    tunnels: Mutex<HashMap<u64, Tunnel>>,
}

impl TunnelRegistry {
    fn add(&self, kind: TunnelKind, counters: Arc<Counters>, task: JoinHandle<()>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Tunnel {
                    kind,
                    counters,
                    task,
                },
            );
        id
    }

    /// Stops and removes tunnel `id`; false if there is none.
    pub fn remove(&self, id: u64) -> bool {
        let removed = self
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match removed {
            Some(t) => {
                t.task.abort();
                true
            }
            None => false,
        }
    }

    pub(crate) fn stop_all(&self) {
        for (_, t) in self
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            t.task.abort();
        }
    }

    /// Status of every tunnel.
    pub fn status(&self) -> TunnelsStatus {
        let mut status = TunnelsStatus::default();
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<&u64> = tunnels.keys().collect();
        ids.sort();
        for id in ids {
            let t = &tunnels[id];
            let connections = t.counters.connections.load(Ordering::Relaxed);
            let active = t.counters.active.load(Ordering::Relaxed);
            match &t.kind {
                TunnelKind::Expose { service, target } => status.exposes.push(ExposeStatus {
                    id: *id,
                    service: service.clone(),
                    target: target.to_string(),
                    connections,
                    active,
                }),
                TunnelKind::Forward {
                    listen,
                    peer,
                    service,
                } => status.forwards.push(ForwardStatus {
                    id: *id,
                    listen: listen.to_string(),
                    peer: peer.to_string(),
                    service: service.clone(),
                    connections,
                    active,
                }),
            }
        }
        status
    }
}

struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.connections.fetch_add(1, Ordering::Relaxed);
        counters.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counters.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a forward could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The local port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Node {
    /// Offers the local TCP service at `target` to peers as `service`.
    /// Returns the tunnel's id (see [`Node::remove_tunnel`]).
    pub fn expose(&self, service: &str, target: SocketAddr) -> Result<u64, ListenError> {
        let mut listener = self.listen(service, &format!("TCP {target}"))?;
        let counters = Arc::new(Counters {
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        let task_counters = counters.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = listener.accept().await {
                let counters = task_counters.clone();
                tokio::spawn(async move {
                    let peer = incoming.peer;
                    let tcp =
                        tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target))
                            .await;
                    let tcp = match tcp {
                        Ok(Ok(tcp)) => tcp,
                        Ok(Err(e)) => {
                            tracing::info!(peer = %peer.short(), %target, "tunnel target refused: {e}");
                            incoming
                                .reject(
                                    StreamStatus::Failed,
                                    &format!("cannot reach {target}: {e}"),
                                )
                                .await;
                            return;
                        }
                        Err(_) => {
                            incoming
                                .reject(
                                    StreamStatus::Failed,
                                    &format!("cannot reach {target}: timed out"),
                                )
                                .await;
                            return;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let Ok(stream) = incoming.accept().await else {
                        return;
                    };
                    let _active = ActiveGuard::new(&counters);
                    splice_tcp(tcp, stream.send, stream.recv).await;
                });
            }
        });
        Ok(self.inner.tunnels.add(
            TunnelKind::Expose {
                service: service.to_owned(),
                target,
            },
            counters,
            task,
        ))
    }

    /// Listens on local TCP `listen` and carries every connection to
    /// `service` on `peer`. Returns the tunnel's id and the bound address.
    pub async fn forward(
        &self,
        listen: SocketAddr,
        peer: PeerId,
        service: &str,
        addr: Option<SocketAddr>,
    ) -> Result<(u64, SocketAddr), ForwardError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ForwardError::Bind {
                addr: listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| ForwardError::Bind {
            addr: listen,
            source,
        })?;
        let counters = Arc::new(Counters {
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        let task_counters = counters.clone();
        let node = self.clone();
        let service_name = service.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, from)) = listener.accept().await else {
                    continue;
                };
                let node = node.clone();
                let service = service_name.clone();
                let counters = task_counters.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match node.open_stream(peer, &service, addr).await {
                        Ok(stream) => {
                            let _active = ActiveGuard::new(&counters);
                            splice_tcp(tcp, stream.send, stream.recv).await;
                        }
                        Err(e) => {
                            tracing::warn!(%from, "forward to {}/{service} failed: {e}", peer.short());
                            let _ = tcp.set_zero_linger();
                        }
                    }
                });
            }
        });
        let id = self.inner.tunnels.add(
            TunnelKind::Forward {
                listen: bound,
                peer,
                service: service.to_owned(),
            },
            counters,
            task,
        );
        Ok((id, bound))
    }

    /// Stops tunnel `id` (an expose or a forward); false if there is none.
    pub fn remove_tunnel(&self, id: u64) -> bool {
        self.inner.tunnels.remove(id)
    }
}
