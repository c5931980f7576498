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
//!
//! It also carries relayed sessions (see [`crate::paths`] and
//! `p2pos_proto::relay`): packets QUIC sends to a virtual address go
//! through a relay or straight to the peer, whichever the address's route
//! says, and relayed or direct packets of such a session reach QUIC from
//! the virtual address. As a relay, the socket forwards the packets of
//! its circuits itself, on the receive path, within the owner's limits.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use p2pos_proto::network::{FrameError, NetworkKey, FRAME_OVERHEAD};
use p2pos_proto::packet::{classify, PacketKind};
use p2pos_proto::relay::{
    is_relayed, parse_relayed, relayed_header, Forward, RelayLimits, RelayStats, RelayTable,
    RELAY_HEADER,
};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::paths::{is_virtual, Paths, Route};

/// Datagrams waiting for the overlay before new ones are dropped.
pub const OVERLAY_QUEUE: usize = 1024;
/// Relayed packets for this node's sessions waiting for QUIC, at most.
pub const RELAYED_QUEUE: usize = 512;

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
    /// Relayed packets received for this node's own sessions.
    pub relayed_in: AtomicU64,
    /// Relayed packets sent for this node's own sessions.
    pub relayed_out: AtomicU64,
    /// Relayed packets dropped: malformed, for no circuit, or queue full.
    pub relayed_dropped: AtomicU64,
}

impl SocketCounters {
    fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A datagram for the overlay: its source and bytes (without framing).
pub type OverlayDatagram = (SocketAddr, Bytes);

/// A path probe or ack: the extra socket it came in on (`None`: the
/// node's own socket), its source and bytes.
pub type PathDatagram = (Option<u32>, SocketAddr, Bytes);

/// One of the node's extra sockets (many-ports search).
struct Side {
    socket: Arc<tokio::net::UdpSocket>,
    task: tokio::task::JoinHandle<()>,
}

/// Relayed QUIC packets for one of this node's sessions: from the
/// session's virtual address, `stride` bytes each (the last may be
/// shorter).
struct Queued {
    from: SocketAddr,
    packets: Vec<u8>,
    stride: usize,
}

/// quinn's socket with first-byte demultiplexing and private framing.
pub struct OverlaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    network: Option<NetworkKey>,
    overlay_tx: mpsc::Sender<OverlayDatagram>,
    counters: Arc<SocketCounters>,
    seal_buf: Mutex<Vec<u8>>,
    relay_buf: Mutex<Vec<u8>>,
    paths: RwLock<Paths>,
    /// Set once any virtual address exists: until then the hot paths skip
    /// the table.
    any_paths: AtomicBool,
    relay: Mutex<RelayTable>,
    /// Relayed packets for this node's sessions, waiting for QUIC.
    relayed: Mutex<VecDeque<Queued>>,
    started: Instant,
    sides: Mutex<HashMap<u32, Side>>,
    next_side: AtomicU32,
    /// Where extra sockets send path messages (set by the endpoint).
    path_tx: Mutex<Option<mpsc::Sender<PathDatagram>>>,
    /// QUIC's receive waker: packets queued from an extra socket wake it.
    recv_waker: Mutex<Option<Waker>>,
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
            relay_buf: Mutex::new(Vec::with_capacity(2048)),
            paths: RwLock::default(),
            any_paths: AtomicBool::new(false),
            relay: Mutex::new(RelayTable::new(
                RelayLimits::default(),
                rand_seed(),
                std::time::Duration::ZERO,
            )),
            relayed: Mutex::new(VecDeque::new()),
            started: Instant::now(),
            sides: Mutex::default(),
            next_side: AtomicU32::new(1),
            path_tx: Mutex::default(),
            recv_waker: Mutex::default(),
        }
    }

    /// Where path messages from extra sockets go.
    pub fn set_path_inbox(&self, tx: mpsc::Sender<PathDatagram>) {
        *self.path_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Opens `count` extra sockets (on fresh ports); returns their ids.
    /// Must run in a tokio runtime.
    pub fn open_sides(self: &Arc<Self>, count: usize) -> Vec<u32> {
        let ipv6 = self
            .inner
            .local_addr()
            .map(|a| a.is_ipv6())
            .unwrap_or(false);
        let bind: SocketAddr = if ipv6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let socket = match std::net::UdpSocket::bind(bind)
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(tokio::net::UdpSocket::from_std)
            {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::debug!("could not open an extra socket: {e}");
                    break;
                }
            };
            let id = self.next_side.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(side_loop(Arc::downgrade(self), id, socket.clone()));
            self.sides
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Side { socket, task });
            ids.push(id);
        }
        ids
    }

    /// Closes extra sockets.
    pub fn close_sides(&self, ids: &[u32]) {
        let mut sides = self.sides.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(side) = sides.remove(id) {
                side.task.abort();
            }
        }
    }

    /// Sends a datagram from extra socket `side` (framed in a private
    /// network).
    pub fn send_from_side(&self, side: u32, dest: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let socket = self
            .sides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&side)
            .map(|s| s.socket.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such extra socket"))?;
        let dest = match socket.local_addr() {
            Ok(local) => dest_for(local, dest),
            Err(_) => dest,
        };
        match &self.network {
            None => socket.try_send_to(datagram, dest).map(|_| ()),
            Some(key) => {
                let mut framed = vec![0u8; FRAME_OVERHEAD];
                let mut header = [0u8; FRAME_OVERHEAD];
                key.write_header(datagram, &mut header);
                framed.copy_from_slice(&header);
                framed.extend_from_slice(datagram);
                socket.try_send_to(&framed, dest).map(|_| ())
            }
        }
    }

    /// Sends the packets of the session at `v` from extra socket `side`
    /// to `addr` from now on.
    pub fn set_via(&self, v: SocketAddr, side: u32, addr: SocketAddr) {
        self.paths_write().set_via(v, side, canonical(addr));
    }

    fn wake_quic(&self) {
        if let Some(w) = self
            .recv_waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            w.wake();
        }
    }

    fn paths_read(&self) -> std::sync::RwLockReadGuard<'_, Paths> {
        self.paths.read().unwrap_or_else(|p| p.into_inner())
    }

    fn paths_write(&self) -> std::sync::RwLockWriteGuard<'_, Paths> {
        self.any_paths.store(true, Ordering::Relaxed);
        self.paths.write().unwrap_or_else(|p| p.into_inner())
    }

    fn relay_table(&self) -> std::sync::MutexGuard<'_, RelayTable> {
        self.relay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A virtual address for a session relayed by `relay` (the address of
    /// this node's session with it) on `circuit`; `None` if too many exist.
    pub fn add_relayed_path(&self, relay: SocketAddr, circuit: u64) -> Option<SocketAddr> {
        let ipv6 = self.inner.local_addr().map(|a| a.is_ipv6()).unwrap_or(true);
        self.paths_write()
            .add_relayed(ipv6, canonical(relay), circuit)
    }

    /// The route of virtual address `v`.
    pub fn route(&self, v: SocketAddr) -> Option<Route> {
        if !is_virtual(v) {
            return None;
        }
        self.paths_read().route(v)
    }

    /// The virtual address of the session relayed on `circuit`.
    pub fn path_for_circuit(&self, circuit: u64) -> Option<SocketAddr> {
        self.paths_read().by_circuit_id(circuit)
    }

    /// Direct packets from `src` belong to the session at `v`.
    pub fn learn_direct(&self, src: SocketAddr, v: SocketAddr) {
        self.paths_write().learn_direct(canonical(src), v);
    }

    /// Sends the packets of the session at `v` straight to `addr`.
    pub fn set_direct(&self, v: SocketAddr, addr: SocketAddr) {
        self.paths_write().set_direct(v, canonical(addr));
    }

    /// Forgets the virtual address `v`.
    pub fn remove_path(&self, v: SocketAddr) {
        self.paths_write().remove(v);
    }

    /// Sets the limits this node relays within (before opening circuits).
    pub fn set_relay_limits(&self, limits: RelayLimits) {
        *self.relay_table() = RelayTable::new(limits, rand_seed(), self.started.elapsed());
    }

    /// The limits this node relays within.
    pub fn relay_limits(&self) -> RelayLimits {
        self.relay_table().limits()
    }

    /// Opens a circuit between two peers, each at the address of this
    /// node's session with it.
    pub fn open_circuit(
        &self,
        a: (p2pos_proto::PeerId, SocketAddr),
        b: (p2pos_proto::PeerId, SocketAddr),
    ) -> Result<u64, p2pos_proto::relay::RelayRefusal> {
        let now = self.started.elapsed();
        self.relay_table()
            .open(now, (a.0, canonical(a.1)), (b.0, canonical(b.1)))
    }

    /// Closes a circuit this node relays.
    pub fn close_circuit(&self, circuit: u64) {
        self.relay_table().close(circuit);
    }

    /// What this node relayed.
    pub fn relay_stats(&self) -> RelayStats {
        self.relay_table().stats()
    }

    /// Sends a datagram as it is (framed in a private network).
    fn send_framed(&self, transmit: &Transmit) -> io::Result<()> {
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

    fn dest(&self, addr: SocketAddr) -> SocketAddr {
        match self.inner.local_addr() {
            Ok(local) => dest_for(local, addr),
            Err(_) => addr,
        }
    }

    /// Sends QUIC's packets for the virtual address `v` along its route.
    fn send_virtual(&self, transmit: &Transmit) -> io::Result<()> {
        let route = self.paths_read().route(transmit.destination);
        match route {
            // The session's path is gone: QUIC will time the session out.
            None => Ok(()),
            Some(Route::Direct(addr)) => self.send_framed(&Transmit {
                destination: self.dest(addr),
                src_ip: None,
                ..*transmit
            }),
            Some(Route::Via { side, addr }) => {
                let segment = transmit
                    .segment_size
                    .unwrap_or(transmit.contents.len())
                    .max(1);
                for chunk in transmit.contents.chunks(segment) {
                    match self.send_from_side(side, addr, chunk) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                        other => other?,
                    }
                }
                Ok(())
            }
            Some(Route::Relayed { relay, circuit }) => {
                let contents = transmit.contents;
                let segment = transmit.segment_size.unwrap_or(contents.len()).max(1);
                let header = relayed_header(circuit);
                let mut buf = self.relay_buf.lock().unwrap_or_else(|p| p.into_inner());
                buf.clear();
                let mut n = 0;
                for chunk in contents.chunks(segment) {
                    buf.extend_from_slice(&header);
                    buf.extend_from_slice(chunk);
                    n += 1;
                }
                self.counters.relayed_out.fetch_add(n, Ordering::Relaxed);
                self.send_framed(&Transmit {
                    destination: self.dest(relay),
                    ecn: None,
                    contents: &buf,
                    segment_size: transmit.segment_size.map(|s| s + RELAY_HEADER),
                    src_ip: None,
                })
            }
        }
    }

    /// A relayed packet arrived from `src`: queue it for one of this
    /// node's sessions, or forward it as a relay.
    fn handle_relayed(&self, src: SocketAddr, datagram: &[u8]) {
        let src = canonical(src);
        let Ok((circuit, payload)) = parse_relayed(datagram) else {
            SocketCounters::bump(&self.counters.relayed_dropped);
            return;
        };
        let own = if self.any_paths.load(Ordering::Relaxed) {
            self.paths_read().from_relay(src, circuit)
        } else {
            None
        };
        if let Some(v) = own {
            self.queue_relayed(v, payload.to_vec(), payload.len());
            return;
        }
        let now = self.started.elapsed();
        let verdict = self
            .relay_table()
            .forward(now, src, circuit, datagram.len());
        if let Forward::To(dest) = verdict {
            let _ = self.send_framed(&Transmit {
                destination: self.dest(dest),
                ecn: None,
                contents: datagram,
                segment_size: None,
                src_ip: None,
            });
        }
    }

    fn queue_relayed(&self, from: SocketAddr, packets: Vec<u8>, stride: usize) {
        let mut queue = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() < RELAYED_QUEUE {
            let count = packets.len().div_ceil(stride.max(1)) as u64;
            queue.push_back(Queued {
                from,
                packets,
                stride,
            });
            self.counters.relayed_in.fetch_add(count, Ordering::Relaxed);
        } else {
            SocketCounters::bump(&self.counters.relayed_dropped);
        }
    }

    /// A batch of relayed packets received at once (GRO), all on one
    /// circuit from one source: queued for QUIC or forwarded as one batch
    /// (GSO), instead of one by one. Returns whether the batch was taken.
    fn relayed_batch(&self, src: SocketAddr, batch: &[u8], stride: usize) -> bool {
        let Ok((circuit, _)) = parse_relayed(&batch[..stride]) else {
            return false;
        };
        let header = &batch[..RELAY_HEADER];
        let same = batch.chunks(stride).all(|seg| {
            seg.len() > RELAY_HEADER
                && seg[..RELAY_HEADER] == *header
                && classify(&seg[RELAY_HEADER..]) == PacketKind::Quic
        });
        if !same {
            return false;
        }
        let src = canonical(src);
        let own = self.paths_read().from_relay(src, circuit);
        if let Some(v) = own {
            let mut packets = Vec::with_capacity(batch.len());
            for seg in batch.chunks(stride) {
                packets.extend_from_slice(&seg[RELAY_HEADER..]);
            }
            self.queue_relayed(v, packets, stride - RELAY_HEADER);
            return true;
        }
        if self.inner.max_transmit_segments() <= 1 {
            return false;
        }
        let now = self.started.elapsed();
        let verdict = self.relay_table().forward(now, src, circuit, batch.len());
        if let Forward::To(dest) = verdict {
            let _ = self.inner.try_send(&Transmit {
                destination: self.dest(dest),
                ecn: None,
                contents: batch,
                segment_size: Some(stride),
                src_ip: None,
            });
        }
        true
    }

    /// Moves queued relayed packets into QUIC's buffers; returns how many.
    fn drain_relayed(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut queue = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(q) = queue.pop_front() else { break };
            let len = q.packets.len();
            if len > bufs[n].len() {
                SocketCounters::bump(&self.counters.relayed_dropped);
                continue;
            }
            bufs[n][..len].copy_from_slice(&q.packets);
            meta[n] = RecvMeta {
                addr: q.from,
                len,
                stride: q.stride.clamp(1, len),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        n
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
            PacketKind::Overlay if is_relayed(inner) => {
                self.handle_relayed(src, inner);
                Verdict::Consumed
            }
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
        if self.network.is_none()
            && stride < len
            && is_relayed(&buf[..stride])
            && self.relayed_batch(src, &buf[..len], stride)
        {
            return 0;
        }
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
        if is_virtual(transmit.destination) {
            return self.send_virtual(transmit);
        }
        self.send_framed(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut waker = self.recv_waker.lock().unwrap_or_else(|p| p.into_inner());
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        loop {
            let queued = self.drain_relayed(bufs, meta);
            if queued > 0 {
                return Poll::Ready(Ok(queued));
            }
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let remap = self.any_paths.load(Ordering::Relaxed) && self.paths_read().has_direct();
            let mut kept = 0;
            for i in 0..n {
                let mut m = meta[i];
                let left = self.filter_message(m.addr, &mut bufs[i], m.len, m.stride);
                if remap && left > 0 {
                    // A session that moved off its relay: QUIC knows the
                    // peer by its virtual address.
                    if let Some(v) = self.paths_read().from_direct(canonical(m.addr)) {
                        m.addr = v;
                        m.dst_ip = None;
                    }
                }
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
            if kept == 0 {
                // Relayed packets for this node may have arrived in this
                // batch: hand them over now.
                let queued = self.drain_relayed(bufs, meta);
                if queued > 0 {
                    return Poll::Ready(Ok(queued));
                }
                continue;
            }
            // Any relayed packets queued by this batch are delivered on
            // QUIC's next call, which follows at once.
            if !self
                .relayed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(kept));
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

/// Receives on an extra socket: QUIC packets of a session routed through it
/// go to QUIC, path messages to the node.
async fn side_loop(socket: Weak<OverlaySocket>, id: u32, side: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, src)) = side.recv_from(&mut buf).await else {
            return;
        };
        let Some(main) = socket.upgrade() else { return };
        let datagram = match &main.network {
            None => &buf[..n],
            Some(key) => match key.open(&buf[..n]) {
                Ok(inner) => inner,
                Err(_) => continue,
            },
        };
        let src = canonical(src);
        match classify(datagram) {
            PacketKind::Quic => {
                let v = main.paths_read().from_side(id, src);
                if let Some(v) = v {
                    main.queue_relayed(v, datagram.to_vec(), datagram.len());
                    main.wake_quic();
                }
            }
            PacketKind::Overlay if p2pos_proto::relay::PathMessage::is_path(datagram) => {
                let tx = main
                    .path_tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some(tx) = tx {
                    let _ = tx.try_send((Some(id), src, Bytes::copy_from_slice(datagram)));
                }
            }
            _ => {}
        }
    }
}

/// Maps an IPv4-mapped IPv6 address back to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
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
