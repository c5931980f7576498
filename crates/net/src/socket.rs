//! The node's one UDP socket, shared by QUIC and the overlay.
//!
//! [`OverlaySocket`] implements quinn's `AsyncUdpSocket` on top of quinn's
//! own socket (so GSO/GRO and ECN still work). On receive it classifies each
//! datagram by its first byte: QUIC packets go on to quinn; overlay
//! datagrams go to a bounded channel for the overlay; anything else is
//! dropped and counted. In a private network it first checks and strips the
//! frame of every datagram (each GRO segment separately), and frames every
//! datagram it sends (each GSO segment separately, so segmentation offload
//! keeps working; QUIC's MTU is lowered by the frame size to make room).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use p2pos_proto::network::{FrameError, NetworkKey, FRAME_OVERHEAD};
use p2pos_proto::packet::{classify, PacketKind};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// Datagrams waiting for the overlay before new ones are dropped.
pub const OVERLAY_QUEUE: usize = 1024;

/// Counters of what the socket dropped, for status and metrics.
#[derive(Debug, Default)]
pub struct SocketCounters {
    /// Overlay datagrams received and queued.
    pub overlay_received: AtomicU64,
    /// Overlay datagrams dropped because the overlay's queue was full.
    pub overlay_queue_full: AtomicU64,
    /// Datagrams with a first byte nothing uses (garbage, scans).
    pub unknown_dropped: AtomicU64,
    /// Datagrams from a node of another network (private or public).
    pub foreign_network_dropped: AtomicU64,
    /// Private-network frames whose tag did not verify.
    pub bad_frame_dropped: AtomicU64,
}

impl SocketCounters {
    fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A datagram for the overlay: its source and bytes (without framing).
pub type OverlayDatagram = (SocketAddr, Bytes);

/// quinn's socket with first-byte demultiplexing and private framing.
pub struct OverlaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    network: Option<NetworkKey>,
    overlay_tx: mpsc::Sender<OverlayDatagram>,
    counters: Arc<SocketCounters>,
    seal_buf: Mutex<Vec<u8>>,
}

impl fmt::Debug for OverlaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverlaySocket")
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

/// What to do with one received datagram (or GRO segment).
enum Verdict {
    /// Hand to quinn; the QUIC bytes start at this offset.
    Quic(usize),
    /// Handed to the overlay or dropped.
    Consumed,
}

impl OverlaySocket {
    /// Wraps `inner`; overlay datagrams are sent into `overlay_tx`.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        network: Option<NetworkKey>,
        overlay_tx: mpsc::Sender<OverlayDatagram>,
        counters: Arc<SocketCounters>,
    ) -> Self {
        OverlaySocket {
            inner,
            network,
            overlay_tx,
            counters,
            seal_buf: Mutex::new(Vec::with_capacity(2048)),
        }
    }

    /// Sends an overlay datagram (framed in a private network). Waits while
    /// the socket's send buffer is full.
    pub async fn send_overlay(
        self: &Arc<Self>,
        dest: SocketAddr,
        datagram: &[u8],
    ) -> io::Result<()> {
        let dest = match self.inner.local_addr() {
            Ok(local) => dest_for(local, dest),
            Err(_) => dest,
        };
        let mut poller = self.clone().create_io_poller();
        loop {
            let transmit = Transmit {
                destination: dest,
                ecn: None,
                contents: datagram,
                segment_size: None,
                src_ip: None,
            };
            match self.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
                }
                other => return other,
            }
        }
    }

    fn judge(&self, src: SocketAddr, datagram: &mut [u8]) -> Verdict {
        let mut start = 0;
        if let Some(key) = &self.network {
            match key.open(datagram) {
                Ok(_) => start = FRAME_OVERHEAD,
                Err(FrameError::OtherNetwork(id)) => {
                    let n = SocketCounters::bump(&self.counters.foreign_network_dropped);
                    if n.is_power_of_two() {
                        tracing::warn!(%src, other_network = %id, dropped = n, "dropped traffic from a node of another private network (different network secret)");
                    }
                    return Verdict::Consumed;
                }
                Err(FrameError::BadTag) => {
                    SocketCounters::bump(&self.counters.bad_frame_dropped);
                    return Verdict::Consumed;
                }
                Err(FrameError::NotAFrame) => {
                    let n = if classify(datagram) == PacketKind::Unknown {
                        SocketCounters::bump(&self.counters.unknown_dropped)
                    } else {
                        let n = SocketCounters::bump(&self.counters.foreign_network_dropped);
                        if n.is_power_of_two() {
                            tracing::warn!(%src, dropped = n, "dropped traffic from a node of the public network: this node is in a private network");
                        }
                        n
                    };
                    let _ = n;
                    return Verdict::Consumed;
                }
            }
        }
        let inner = &datagram[start..];
        match classify(inner) {
            PacketKind::Quic => Verdict::Quic(start),
            PacketKind::Overlay => {
                let bytes = Bytes::copy_from_slice(inner);
                match self.overlay_tx.try_send((src, bytes)) {
                    Ok(()) => SocketCounters::bump(&self.counters.overlay_received),
                    Err(_) => SocketCounters::bump(&self.counters.overlay_queue_full),
                };
                Verdict::Consumed
            }
            PacketKind::PrivateFrame => {
                // Only reached on a public node (a private node opened the
                // frame above, and frames are never nested).
                let n = SocketCounters::bump(&self.counters.foreign_network_dropped);
                if n.is_power_of_two() {
                    tracing::warn!(%src, dropped = n, "dropped traffic from a node of a private network: this node is in the public network");
                }
                Verdict::Consumed
            }
            PacketKind::Unknown => {
                SocketCounters::bump(&self.counters.unknown_dropped);
                Verdict::Consumed
            }
        }
    }

    /// Filters one received message (possibly several GRO segments of
    /// `stride` bytes) in place; returns the bytes left for quinn.
    fn filter_message(&self, src: SocketAddr, buf: &mut [u8], len: usize, stride: usize) -> usize {
        let stride = stride.max(1);
        let mut write = 0;
        let mut read = 0;
        while read < len {
            let end = (read + stride).min(len);
            match self.judge(src, &mut buf[read..end]) {
                Verdict::Quic(skip) => {
                    let seg_len = end - read - skip;
                    if write != read + skip {
                        buf.copy_within(read + skip..end, write);
                    }
                    write += seg_len;
                }
                Verdict::Consumed => {}
            }
            read = end;
        }
        write
    }
}

impl AsyncUdpSocket for OverlaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(key) = &self.network else {
            return self.inner.try_send(transmit);
        };
        // Frame every segment of a GSO batch; all but the last keep equal
        // sizes, so the framed batch is still a valid GSO batch.
        let contents = transmit.contents;
        let segment = transmit.segment_size.unwrap_or(contents.len()).max(1);
        let mut buf = self.seal_buf.lock().unwrap_or_else(|p| p.into_inner());
        buf.clear();
        let mut header = [0u8; FRAME_OVERHEAD];
        for chunk in contents.chunks(segment) {
            key.write_header(chunk, &mut header);
            buf.extend_from_slice(&header);
            buf.extend_from_slice(chunk);
        }
        self.inner.try_send(&Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn,
            contents: &buf,
            segment_size: transmit.segment_size.map(|s| s + FRAME_OVERHEAD),
            src_ip: transmit.src_ip,
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                let left = self.filter_message(m.addr, &mut bufs[i], m.len, m.stride);
                if left == 0 {
                    continue;
                }
                // Every segment lost its frame header, if any, so the
                // stride shrinks by the same amount.
                let stride = if m.stride >= m.len {
                    left
                } else if self.network.is_some() {
                    m.stride.saturating_sub(FRAME_OVERHEAD).clamp(1, left)
                } else {
                    m.stride
                };
                if kept != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[kept][..left].copy_from_slice(&tail[0][..left]);
                }
                meta[kept] = RecvMeta {
                    len: left,
                    stride,
                    ..m
                };
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The destination a socket bound at `local` sends to for `dest`: a
/// dual-stack (IPv6) socket reaches IPv4 peers by IPv4-mapped addresses.
pub fn dest_for(local: SocketAddr, dest: SocketAddr) -> SocketAddr {
    match (local, dest) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => dest,
    }
}
