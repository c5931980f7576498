//! The overlay task: answers probes and matches probe replies to requests.
//!
//! Probes are answered to any source: a reply is never larger than its probe
//! (see `p2pos_proto::overlay`), so they cannot amplify, and replies are rate
//! limited per node to bound the work a flood can cause.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2pos_proto::dht::wire_types::{TYPE_INTRODUCTION, TYPE_REQUEST, TYPE_RESPONSE};
use p2pos_proto::overlay::Message;
use tokio::sync::{mpsc, oneshot};

use crate::socket::{OverlayDatagram, OverlaySocket};

/// Probe replies sent per second at most; further probes are dropped.
pub const PROBE_REPLIES_PER_SECOND: u32 = 200;
/// Probes awaiting a reply at once, at most.
pub const MAX_PENDING_PROBES: usize = 256;

/// Why a probe got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The node has too many probes in flight.
    #[error("too many probes in flight")]
    TooMany,
    /// Sending failed.
    #[error("could not send the probe: {0}")]
    Send(#[from] io::Error),
    /// No reply within the timeout.
    #[error("no probe reply within {0:?}")]
    Timeout(Duration),
}

/// Counters of the overlay task.
#[derive(Debug, Default)]
pub struct OverlayCounters {
    /// Probes answered.
    pub probes_answered: AtomicU64,
    /// Probes dropped by the rate limit.
    pub probes_rate_limited: AtomicU64,
    /// Datagrams that did not decode.
    pub malformed: AtomicU64,
    /// DHT datagrams dropped because the DHT's queue was full.
    pub dht_queue_full: AtomicU64,
    /// Punch datagrams received (they only open NAT bindings: dropped).
    pub punches_received: AtomicU64,
}

/// Handle to the overlay: send probes, read counters.
#[derive(Clone, Debug)]
pub struct Overlay {
    socket: Arc<OverlaySocket>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<SocketAddr>>>>,
    next_id: Arc<AtomicU64>,
    /// What the overlay task did.
    pub counters: Arc<OverlayCounters>,
}

impl Overlay {
    /// Starts the overlay task on `rx`, the socket's overlay queue. DHT and
    /// reachability datagrams (overlay types 10–12 and 20–23) go on to
    /// `dht`, the DHT task's queue; binding-measurement ones (25–27) to
    /// `binding`, the keepalive task's; path probes (29–30) to `paths`, the
    /// relayed sessions' task.
    pub fn spawn(
        socket: Arc<OverlaySocket>,
        mut rx: mpsc::Receiver<OverlayDatagram>,
        id_seed: u64,
        dht: mpsc::Sender<OverlayDatagram>,
        binding: mpsc::Sender<OverlayDatagram>,
        paths: mpsc::Sender<crate::socket::PathDatagram>,
    ) -> Self {
        let overlay = Overlay {
            socket,
            pending: Arc::default(),
            next_id: Arc::new(AtomicU64::new(id_seed)),
            counters: Arc::default(),
        };
        let task = overlay.clone();
        tokio::spawn(async move {
            let mut window = Instant::now();
            let mut replies_in_window = 0u32;
            while let Some((src, datagram)) = rx.recv().await {
                if matches!(
                    datagram.get(2),
                    Some(&TYPE_REQUEST) | Some(&TYPE_RESPONSE) | Some(&TYPE_INTRODUCTION)
                ) || p2pos_proto::reach::Message::is_reach(&datagram)
                {
                    if dht.try_send((src, datagram)).is_err() {
                        task.counters.dht_queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if p2pos_proto::keepalive::Message::is_binding(&datagram) {
                    if binding.try_send((src, datagram)).is_err() {
                        task.counters.dht_queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if p2pos_proto::relay::PathMessage::is_path(&datagram) {
                    if paths.try_send((None, src, datagram)).is_err() {
                        task.counters.dht_queue_full.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if p2pos_proto::traversal::decode_punch(&datagram).is_ok() {
                    tracing::debug!(%src, "punch received");
                    task.counters
                        .punches_received
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match Message::decode(&datagram) {
                    Ok(Message::Probe { id }) => {
                        let now = Instant::now();
                        if now.duration_since(window) >= Duration::from_secs(1) {
                            window = now;
                            replies_in_window = 0;
                        }
                        if replies_in_window >= PROBE_REPLIES_PER_SECOND {
                            task.counters
                                .probes_rate_limited
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        replies_in_window += 1;
                        let reply = Message::ProbeReply { id, observed: src }.encode();
                        if task.socket.send_overlay(src, &reply).await.is_ok() {
                            task.counters
                                .probes_answered
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Message::ProbeReply { id, observed }) => {
                        let waiter = task
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(observed);
                        }
                    }
                    Err(_) => {
                        task.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        overlay
    }

    /// Sends an overlay datagram (e.g. from the DHT) to `dest`.
    pub async fn send(&self, dest: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_overlay(dest, datagram).await
    }

    /// Sends a probe to `dest`; returns the address `dest` saw us at.
    pub async fn probe(
        &self,
        dest: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, ProbeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= MAX_PENDING_PROBES {
                return Err(ProbeError::TooMany);
            }
            pending.insert(id, tx);
        }
        let result = async {
            self.socket
                .send_overlay(dest, &Message::Probe { id }.encode())
                .await?;
            tokio::time::timeout(timeout, rx)
                .await
                .map_err(|_| ProbeError::Timeout(timeout))?
                .map_err(|_| ProbeError::Timeout(timeout))
        }
        .await;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        result
    }
}
