//! The junction's Highways: the QUIC endpoint that carries what the core
//! says to other junctions, driven on the junction's own current-thread
//! runtime. The protocol is sans-IO in `junction-highway` (the link state
//! machine, the wire, TLS with bus identities); this module only moves
//! bytes and events between quinn, [`Links`] and the core.
//!
//! - One endpoint: it accepts Highways (with `--quic-listen`) and dials the
//!   configured peers. A connection counts as a link only once [`Links`]
//!   admits it, after the peer's `Hello` on the control stream: a client the
//!   server refused still sees its QUIC connect succeed.
//! - The **control stream** (bidirectional, opened by the dialer) carries
//!   hellos, keep-alives and link states, ahead of traffic (a higher quinn
//!   priority), so bulk traffic never delays them; **data streams**
//!   (unidirectional) carry forwarded traffic, one per destination
//!   junction, so unrelated flows never block each other.
//! - Each stream has a writer task fed by a queue; the core's output is
//!   encoded into it at once, and the task writes what has gathered in one
//!   call. What waits is bounded per Highway ([`HIGHWAY_QUEUE_BYTES`];
//!   traffic past it is dropped, and sessions resend it), and a writer
//!   that makes no progress for [`STALLED_WRITE`] closes its Highway.
//! - Each stream's reader takes all that quinn holds for it in one read,
//!   so the frames of many packets reach the core together.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use junction_highway::link::{ConnId, LinkConfig, LinkOutput, Links, PeerInfo};
use junction_highway::wire::{ControlFrame, Decoder, Encoder};
use junction_highway::{PeerPolicy, Revocations, TlsIdentity, TransportSettings};
use junction_road::Chained;
use junction_road::control::{HighwayInfo, HighwayState};
use junction_road::highway::HighwayFrame;
use tokio::sync::mpsc;

use crate::ratelog::RateLimitedWarn;

/// How often a link's control stream carries a keep-alive; three missed
/// end the link.
pub const KEEPALIVE: Duration = Duration::from_millis(250);

/// The most bytes queued for one Highway's streams and not yet taken by
/// quinn (which holds up to its own send window, 10 MB, beyond them);
/// traffic past it is dropped, and sessions resend it.
pub const HIGHWAY_QUEUE_BYTES: usize = 64 << 20;

/// The most data streams a junction opens on one Highway. Traffic for
/// destination junction `d` takes stream `d % DATA_STREAMS`, so flows to up
/// to this many destinations never share a stream, and the count stays
/// under the streams a neighbour lets it open at once (quinn's default,
/// 100): a stream per destination, kept for the link's life, would stall
/// the first destination past that for good.
pub const DATA_STREAMS: u16 = 64;

/// How long a Highway stream's writer may make no progress while traffic
/// waits before the link is closed: the neighbour takes nothing in.
pub const STALLED_WRITE: Duration = Duration::from_secs(30);

/// The QUIC application error code of a link closed for
/// [`STALLED_WRITE`].
const STALLED_CODE: u32 = 3;

/// The control stream's send priority in quinn, above the data streams'
/// default 0.
const CONTROL_PRIORITY: i32 = 1;

/// What a junction needs to run its Highways.
pub struct HighwaySetup {
    /// This junction's id.
    pub junction: u16,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its TLS identity, made from its bus key and chain.
    pub identity: TlsIdentity,
    /// Who it admits: the bus authority and the revocation list in force.
    pub policy: PeerPolicy,
    /// Where to accept Highways, if anywhere.
    pub listen: Option<SocketAddr>,
    /// The junctions to dial.
    pub peers: Vec<(u16, SocketAddr)>,
    /// Of those, the ones configured by host name (`name`, port): resolved
    /// again before each dial, so that a peer that moves, or whose name
    /// did not resolve yet when this junction started, is still reached.
    pub names: HashMap<u16, (String, u16)>,
}

/// Why the Highways could not start.
#[derive(Debug, thiserror::Error)]
pub enum HighwayStartError {
    /// The TLS configuration could not be made.
    #[error("cannot set up Highways: {0}")]
    Config(#[from] junction_highway::HighwayError),
    /// The link configuration was refused.
    #[error("cannot set up Highways: {0}")]
    Links(#[from] junction_highway::link::ConfigError),
    /// The UDP socket could not be bound.
    #[error("cannot listen for Highways on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// One QUIC connection to another junction.
struct Link {
    conn: quinn::Connection,
    /// The control stream's queue, once the stream is open.
    control: RefCell<Option<mpsc::UnboundedSender<Bytes>>>,
    /// Data streams' queues, by stream ([`Link::data_queue`]).
    data: RefCell<HashMap<u16, mpsc::UnboundedSender<Bytes>>>,
    /// Where it goes.
    remote: SocketAddr,
    bytes_out: Cell<u64>,
    bytes_in: Cell<u64>,
    /// Bytes queued for its streams and not yet taken by quinn.
    queued: Cell<usize>,
}

/// The Highways of one junction.
pub struct Highways {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    links: RefCell<Links>,
    conns: RefCell<HashMap<u64, Rc<Link>>>,
    /// The admitted connection of each neighbour.
    up: RefCell<HashMap<u16, u64>>,
    next: Cell<u64>,
    encoder: Encoder,
    /// Wakes the driver when the links' deadline may have moved.
    wake: tokio::sync::Notify,
    revocations: Revocations,
    /// Who is admitted, to check the links up again when it changes.
    policy: PeerPolicy,
    /// Peers configured by host name, resolved before each dial.
    names: HashMap<u16, (String, u16)>,
    /// Traffic dropped for a full Highway queue.
    full: RateLimitedWarn,
}

/// What the driver asks of the junction around it: the core's side.
pub trait Junction: 'static {
    /// Neighbour `peer` is linked (or no longer is).
    fn highway_changed(&self, peer: u16, up: bool);
    /// A frame came from neighbour `peer`.
    fn highway_frame(&self, peer: u16, frame: HighwayFrame, payload: Bytes);
    /// Frames that came together from neighbour `peer` (one read).
    fn highway_frames(&self, peer: u16, frames: Vec<(HighwayFrame, Bytes)>);
}

impl Highways {
    /// Binds the endpoint. Must be called inside the junction's runtime.
    pub fn new(setup: HighwaySetup) -> Result<Rc<Self>, HighwayStartError> {
        let transport = TransportSettings::default();
        let server = junction_highway::server_config(&setup.identity, &setup.policy, &transport)?;
        let client = junction_highway::client_config(&setup.identity, &setup.policy, &transport)?;
        let bind = setup
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let endpoint = if setup.listen.is_some() {
            quinn::Endpoint::server(server, bind)
        } else {
            quinn::Endpoint::client(bind)
        }
        .map_err(|source| HighwayStartError::Bind { addr: bind, source })?;
        let mut config = LinkConfig::new(setup.junction, setup.incarnation);
        config.peers = setup.peers;
        // Three missed keep-alives end a link: a cut is noticed, and
        // traffic rerouted, within a second.
        config.timers.keepalive = KEEPALIVE;
        config.seed = setup.incarnation ^ u64::from(setup.junction);
        let links = Links::new(config, Instant::now())?;
        Ok(Rc::new(Self {
            endpoint,
            client,
            links: RefCell::new(links),
            conns: RefCell::new(HashMap::new()),
            up: RefCell::new(HashMap::new()),
            next: Cell::new(1),
            encoder: Encoder::default(),
            wake: tokio::sync::Notify::new(),
            revocations: setup.policy.revocations().clone(),
            policy: setup.policy,
            names: setup.names,
            full: RateLimitedWarn::new("dropped traffic for a Highway whose queue is full"),
        }))
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The revocation list Highways are admitted under, to replace on
    /// SIGHUP.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Runs the Highways until the endpoint closes: accepts, dials, and
    /// keeps the links' timers.
    pub async fn run(self: Rc<Self>, junction: Rc<dyn Junction>) {
        self.drain(&junction);
        loop {
            let deadline = self.links.borrow().poll_timeout();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = timer => {
                    self.links.borrow_mut().handle_timeout(Instant::now());
                }
                () = self.wake.notified() => {}
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let this = self.clone();
                        let junction = junction.clone();
                        tokio::task::spawn_local(async move {
                            this.accepted(incoming, junction).await;
                        });
                    }
                    None => return,
                },
            }
            self.drain(&junction);
        }
    }

    /// Checks every connection's peer again (the revocation list changed):
    /// one whose certificate no longer passes is closed, with the reason.
    pub fn recheck(&self) {
        let now = crate::unix_now();
        let refused: Vec<(u64, String)> = self
            .conns
            .borrow()
            .iter()
            .filter_map(|(&id, link)| {
                junction_highway::check_connection(&self.policy, &link.conn, now)
                    .err()
                    .map(|e| (id, e.to_string()))
            })
            .collect();
        for (id, why) in refused {
            if let Some(link) = self.conns.borrow_mut().remove(&id) {
                tracing::warn!(remote = %link.remote, "closing a Highway: {why}");
                link.conn.close(1u32.into(), why.as_bytes());
            }
            self.links
                .borrow_mut()
                .handle_closed(ConnId(id), Instant::now());
        }
        self.wake.notify_one();
    }

    /// Closes every Highway, saying why.
    pub fn close(&self, reason: &str) {
        self.endpoint.close(0u32.into(), reason.as_bytes());
    }

    /// What `junction ls` shows of the neighbours (the control port's
    /// `Listing` carries it).
    pub fn info(&self) -> Vec<HighwayInfo> {
        let links = self.links.borrow();
        let conns = self.conns.borrow();
        links
            .peers()
            .map(|p: PeerInfo| {
                use junction_highway::link::PeerState;
                let (state, conn, rtt) = match p.state {
                    PeerState::Up { conn, rtt, .. } => (HighwayState::Up, Some(conn), rtt),
                    PeerState::Connecting { conn } => (HighwayState::Connecting, Some(conn), None),
                    PeerState::Dialing => (HighwayState::Dialing, None, None),
                    _ => (HighwayState::Waiting, None, None),
                };
                let link = conn.and_then(|c| conns.get(&c.0));
                let named = self.names.get(&p.junction);
                HighwayInfo {
                    junction: p.junction,
                    address: named
                        .map(|(host, port)| format!("{host}:{port}"))
                        .or_else(|| p.addr.map(|a| a.to_string()))
                        .or_else(|| link.map(|l| l.remote.to_string())),
                    state,
                    rtt_us: rtt.map(|r| r.as_micros() as u64),
                    bytes_out: link.map_or(0, |l| l.bytes_out.get()),
                    bytes_in: link.map_or(0, |l| l.bytes_in.get()),
                }
            })
            .collect()
    }

    /// Sends what the core has for neighbour `to`: link states on the
    /// control stream, forwarded traffic on the data stream of its final
    /// destination. Dropped if `to` is not linked (routing will route
    /// around it, and sessions resend).
    pub fn send(&self, to: u16, frame: &HighwayFrame, payload: Chained) {
        let Some(link) = self
            .up
            .borrow()
            .get(&to)
            .and_then(|c| self.conns.borrow().get(c).cloned())
        else {
            tracing::debug!(to, "no Highway to junction {to}: frame dropped");
            return;
        };
        let mut buf = BytesMut::new();
        let destination = match frame {
            HighwayFrame::LinkState(ls) => {
                let control = ControlFrame::LinkState(ls.clone());
                if let Err(e) = self.encoder.control(&control, &mut buf) {
                    tracing::error!(to, "a link state could not be encoded: {e}");
                    return;
                }
                let queue = link.control.borrow().clone();
                if let Some(queue) = queue {
                    link.enqueue(&queue, buf.freeze());
                }
                return;
            }
            HighwayFrame::Forward { to: dest, .. } => *dest,
            HighwayFrame::Unroutable { from, .. } => *from,
        };
        // The payload's pieces follow the frame's head as they are: the
        // stream's writer copies small ones together and hands large ones to
        // quinn whole.
        if let Err(e) = self.encoder.data_head(frame, payload.len(), &mut buf) {
            tracing::warn!(to, "traffic could not be encoded for junction {to}: {e}");
            return;
        }
        if !link.has_room(buf.len() + payload.len()) {
            // The neighbour takes in too little: like a lost packet,
            // sessions resend it; a writer stuck for STALLED_WRITE closes
            // the link.
            self.full.warn(format_args!(
                "junction {to}, {} bytes queued",
                link.queued.get()
            ));
            return;
        }
        let queue = link.data_queue(destination);
        link.enqueue(&queue, buf.freeze());
        let (head, body) = payload.into_pieces();
        for piece in [head, body] {
            if !piece.is_empty() {
                link.enqueue(&queue, piece);
            }
        }
    }

    /// Does what the link state machine asks, and tells the junction of
    /// links that came up or went down.
    fn drain(self: &Rc<Self>, junction: &Rc<dyn Junction>) {
        loop {
            let output = self.links.borrow_mut().poll_output();
            let Some(output) = output else {
                return;
            };
            match output {
                LinkOutput::Dial { peer, addr } => {
                    let this = self.clone();
                    let junction = junction.clone();
                    tokio::task::spawn_local(async move {
                        this.dial(peer, addr, junction).await;
                    });
                }
                LinkOutput::Send { conn, frame } => {
                    let mut buf = BytesMut::new();
                    if self.encoder.control(&frame, &mut buf).is_ok()
                        && let Some(link) = self.conns.borrow().get(&conn.0)
                        && let Some(queue) = link.control.borrow().as_ref()
                    {
                        link.enqueue(queue, buf.freeze());
                    }
                }
                LinkOutput::Close { conn, reason } => {
                    let link = self.conns.borrow_mut().remove(&conn.0);
                    if let Some(link) = link {
                        use junction_highway::link::CloseReason;
                        match reason {
                            // Ordinary: a pair keeps one connection, a new
                            // life replaces the old, a junction stops.
                            CloseReason::BothDialed { .. }
                            | CloseReason::Replaced { .. }
                            | CloseReason::Shutdown => {
                                tracing::info!(remote = %link.remote, "closing a Highway: {reason}");
                            }
                            _ => {
                                tracing::warn!(remote = %link.remote, "refused a Highway: {reason}");
                            }
                        }
                        let text = reason.to_string();
                        let goodbye = ControlFrame::Goodbye {
                            reason: text.clone(),
                        };
                        let mut buf = BytesMut::new();
                        if self.encoder.control(&goodbye, &mut buf).is_ok()
                            && let Some(queue) = link.control.borrow().as_ref()
                        {
                            link.enqueue(queue, buf.freeze());
                        }
                        link.conn.close(1u32.into(), text.as_bytes());
                    }
                }
                LinkOutput::Up {
                    peer, conn, rtt, ..
                } => {
                    tracing::info!(junction = peer, ?rtt, "Highway up");
                    self.up.borrow_mut().insert(peer, conn.0);
                    junction.highway_changed(peer, true);
                }
                LinkOutput::Down { peer } => {
                    tracing::info!(junction = peer, "Highway down");
                    self.up.borrow_mut().remove(&peer);
                    junction.highway_changed(peer, false);
                }
                _ => {}
            }
        }
    }

    fn register(&self, conn: quinn::Connection) -> (u64, Rc<Link>) {
        let id = self.next.get();
        self.next.set(id + 1);
        let link = Rc::new(Link::new(conn));
        self.conns.borrow_mut().insert(id, link.clone());
        (id, link)
    }

    /// Dials `peer` at `addr` (its host name resolved again, if it has
    /// one) and keeps the connection.
    async fn dial(self: Rc<Self>, peer: u16, addr: SocketAddr, junction: Rc<dyn Junction>) {
        let addr = match self.names.get(&peer).cloned() {
            None => addr,
            Some((host, port)) => match resolve(&host, port, self.local_addr()).await {
                Ok(addr) => addr,
                Err(e) => {
                    tracing::warn!(junction = peer, "cannot dial: {e}; trying again later");
                    return self.failed(peer, &junction);
                }
            },
        };
        let name = junction_highway::cert::server_name(peer);
        let connecting = match self.endpoint.connect_with(self.client.clone(), addr, &name) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(junction = peer, %addr, "cannot dial: {e}");
                return self.failed(peer, &junction);
            }
        };
        let conn = match connecting.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(junction = peer, %addr, "Highway refused: {e}");
                return self.failed(peer, &junction);
            }
        };
        // A server that refused us shows it here, on the first stream.
        let (send, recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::warn!(junction = peer, %addr, "Highway refused: {e}");
                return self.failed(peer, &junction);
            }
        };
        let (id, link) = self.register(conn);
        self.start(&link, id, send, recv, junction.clone());
        let now = Instant::now();
        {
            let mut links = self.links.borrow_mut();
            links.handle_dialed(ConnId(id), peer, now);
            links.handle_certificate(ConnId(id), peer, now);
        }
        self.drain(&junction);
        self.wake.notify_one();
    }

    fn failed(&self, peer: u16, _junction: &Rc<dyn Junction>) {
        self.links
            .borrow_mut()
            .handle_dial_failed(peer, Instant::now());
        self.wake.notify_one();
    }

    /// A peer dialled this junction.
    async fn accepted(self: Rc<Self>, incoming: quinn::Incoming, junction: Rc<dyn Junction>) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(%remote, "refused a Highway: {e}");
                return;
            }
        };
        let Some(peer) = junction_highway::connection_peer_junction(&conn) else {
            conn.close(1u32.into(), b"no junction certificate");
            return;
        };
        // The dialer opens the control stream first; nothing is said
        // before it exists.
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, "a Highway ended before its control stream: {e}");
                return;
            }
        };
        let (id, link) = self.register(conn);
        self.start(&link, id, send, recv, junction.clone());
        {
            let now = Instant::now();
            let mut links = self.links.borrow_mut();
            links.handle_accepted(ConnId(id), now);
            links.handle_certificate(ConnId(id), peer, now);
        }
        self.drain(&junction);
        self.wake.notify_one();
    }

    /// Starts the control stream's writer and reader and the acceptor of
    /// data streams of a connection.
    fn start(
        self: &Rc<Self>,
        link: &Rc<Link>,
        id: u64,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        junction: Rc<dyn Junction>,
    ) {
        // Control frames go before any traffic waiting in the connection,
        // so bulk traffic never delays a keep-alive into a missed one.
        let _ = send.set_priority(CONTROL_PRIORITY);
        let (tx, rx) = mpsc::unbounded_channel();
        *link.control.borrow_mut() = Some(tx);
        let l = link.clone();
        tokio::task::spawn_local(async move { write_all(send, rx, &l, STALLED_WRITE).await });
        let this = self.clone();
        let j = junction.clone();
        let l = link.clone();
        tokio::task::spawn_local(async move {
            this.read_control(id, l, recv, j).await;
        });
        let this = self.clone();
        let l = link.clone();
        tokio::task::spawn_local(async move {
            while let Ok(stream) = l.conn.accept_uni().await {
                let this = this.clone();
                let junction = junction.clone();
                let l = l.clone();
                tokio::task::spawn_local(async move {
                    this.read_data(id, l, stream, junction).await;
                });
            }
        });
    }

    async fn read_control(
        self: Rc<Self>,
        id: u64,
        link: Rc<Link>,
        mut recv: quinn::RecvStream,
        junction: Rc<dyn Junction>,
    ) {
        let mut decoder = Decoder::default();
        while read_more(&mut recv, &link, &mut decoder).await {
            loop {
                match decoder.next_control() {
                    Ok(Some(frame)) => {
                        let routed = self.links.borrow_mut().handle_control(
                            ConnId(id),
                            frame,
                            Instant::now(),
                        );
                        if let Some((peer, ls)) = routed {
                            junction.highway_frame(peer, HighwayFrame::LinkState(ls), Bytes::new());
                        }
                        self.drain(&junction);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(remote = %link.remote, "bad control frame on a Highway: {e}");
                        if e.is_fatal() {
                            link.conn.close(2u32.into(), b"bad control frame");
                            self.closed(id, &junction);
                            return;
                        }
                    }
                }
            }
        }
        self.closed(id, &junction);
    }

    async fn read_data(
        self: Rc<Self>,
        id: u64,
        link: Rc<Link>,
        mut recv: quinn::RecvStream,
        junction: Rc<dyn Junction>,
    ) {
        let mut decoder = Decoder::default();
        while read_more(&mut recv, &link, &mut decoder).await {
            let mut frames = Vec::new();
            let mut fatal = false;
            loop {
                match decoder.next_data() {
                    Ok(Some(frame)) => frames.push((frame.header, frame.payload)),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(remote = %link.remote, "bad data frame on a Highway: {e}");
                        if e.is_fatal() {
                            fatal = true;
                            break;
                        }
                    }
                }
            }
            if !frames.is_empty() {
                let peer = self
                    .links
                    .borrow_mut()
                    .handle_traffic(ConnId(id), Instant::now());
                // Data may overtake the Hello on another stream; before
                // admission it is dropped (sessions resend).
                if let Some(peer) = peer {
                    junction.highway_frames(peer, frames);
                }
            }
            if fatal {
                return;
            }
        }
    }

    fn closed(self: &Rc<Self>, id: u64, junction: &Rc<dyn Junction>) {
        self.conns.borrow_mut().remove(&id);
        self.links
            .borrow_mut()
            .handle_closed(ConnId(id), Instant::now());
        self.drain(junction);
        self.wake.notify_one();
    }
}

/// Reads everything that has arrived on `recv` (up to [`READ_CHUNKS`]
/// pieces, as quinn received them) into `decoder`, counting it on `link`;
/// false when the stream has ended (or failed). Taking all that waits in
/// one read lets the frames of many packets go to the core together.
async fn read_more(recv: &mut quinn::RecvStream, link: &Link, decoder: &mut Decoder) -> bool {
    let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
    match recv.read_chunks(&mut chunks).await {
        Ok(Some(n)) => {
            for chunk in &chunks[..n] {
                link.bytes_in.set(link.bytes_in.get() + chunk.len() as u64);
                decoder.feed(chunk);
            }
            true
        }
        Ok(None) | Err(_) => false,
    }
}

/// The most pieces one read of a Highway stream takes from quinn.
const READ_CHUNKS: usize = 32;

/// Pieces of a stream at least this long go to quinn as they are; shorter
/// ones are copied together, which costs less than quinn's bookkeeping of
/// each.
const WHOLE_FROM: usize = 4096;

/// The most bytes gathered from the queue into one write.
const WRITE_BYTES: usize = 256 * 1024;

/// Writes what is queued for a stream, everything gathered so far in one
/// write, until the queue or the stream ends. A write that makes no
/// progress for `stall` (the neighbour takes nothing in) closes the link;
/// what was not written leaves the link's count either way.
async fn write_all(
    mut stream: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    link: &Link,
    stall: Duration,
) {
    let mut small = BytesMut::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut gathered = 0;
        let mut next = Some(first);
        while let Some(piece) = next {
            gathered += piece.len();
            if piece.len() >= WHOLE_FROM {
                if !small.is_empty() {
                    chunks.push(small.split().freeze());
                }
                chunks.push(piece);
            } else {
                small.extend_from_slice(&piece);
            }
            next = if gathered < WRITE_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        let written = write_chunks(&mut stream, &mut chunks, link, stall).await;
        link.queued.set(link.queued.get().saturating_sub(gathered));
        chunks.clear();
        if !written {
            return forget(rx, link);
        }
    }
    let _ = stream.finish();
}

/// Writes `chunks` whole; false if the stream failed, or made no progress
/// for `stall`, in which case the link is closed.
async fn write_chunks(
    stream: &mut quinn::SendStream,
    chunks: &mut [Bytes],
    link: &Link,
    stall: Duration,
) -> bool {
    let mut rest = chunks;
    while !rest.is_empty() {
        match tokio::time::timeout(stall, stream.write_chunks(rest)).await {
            Ok(Ok(written)) => rest = &mut rest[written.chunks..],
            Ok(Err(_)) => return false,
            Err(_) => {
                tracing::warn!(
                    remote = %link.remote,
                    "a Highway took nothing in for {stall:?} while traffic waited: closing it"
                );
                link.conn.close(STALLED_CODE.into(), b"took nothing in");
                return false;
            }
        }
    }
    true
}

/// A stream's queue that will not be written: its bytes leave the link's
/// count.
fn forget(mut rx: mpsc::UnboundedReceiver<Bytes>, link: &Link) {
    rx.close();
    while let Ok(piece) = rx.try_recv() {
        link.queued
            .set(link.queued.get().saturating_sub(piece.len()));
    }
}

impl Link {
    fn new(conn: quinn::Connection) -> Self {
        Self {
            remote: conn.remote_address(),
            conn,
            control: RefCell::new(None),
            data: RefCell::new(HashMap::new()),
            bytes_out: Cell::new(0),
            bytes_in: Cell::new(0),
            queued: Cell::new(0),
        }
    }

    /// The queue of the data stream that traffic for junction
    /// `destination` takes, its stream opened (and its writer started) on
    /// first use: one of at most [`DATA_STREAMS`], by the destination's id.
    fn data_queue(self: &Rc<Self>, destination: u16) -> mpsc::UnboundedSender<Bytes> {
        let stream = destination % DATA_STREAMS;
        if let Some(queue) = self.data.borrow().get(&stream)
            && !queue.is_closed()
        {
            return queue.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.data.borrow_mut().insert(stream, tx.clone());
        let link = self.clone();
        tokio::task::spawn_local(async move {
            match link.conn.open_uni().await {
                Ok(stream) => write_all(stream, rx, &link, STALLED_WRITE).await,
                Err(_) => forget(rx, &link),
            }
        });
        tx
    }

    /// Whether `len` more bytes of traffic fit in its queues
    /// ([`HIGHWAY_QUEUE_BYTES`]).
    fn has_room(&self, len: usize) -> bool {
        self.queued.get() + len <= HIGHWAY_QUEUE_BYTES
    }

    /// Queues `piece` for one of its streams, counted until quinn takes it.
    fn enqueue(&self, queue: &mpsc::UnboundedSender<Bytes>, piece: Bytes) {
        let len = piece.len();
        if queue.send(piece).is_ok() {
            self.queued.set(self.queued.get() + len);
            self.bytes_out.set(self.bytes_out.get() + len as u64);
        }
    }
}

/// The first address `host` resolves to, with `port`, of the family the
/// endpoint at `local` can reach (an IPv4 socket cannot send to `::1`).
async fn resolve(host: &str, port: u16, local: Option<SocketAddr>) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let reachable = |a: &&SocketAddr| local.is_none_or(|l| l.is_ipv4() == a.is_ipv4());
    addrs
        .iter()
        .find(reachable)
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// The driver's configuration from the junction's own: its TLS identity
/// from its bus key and chain, and the peers' addresses (a host name that
/// does not resolve yet is resolved again at each dial).
pub fn setup(
    junction: u16,
    incarnation: u64,
    key: &junction_identity::SecretKey,
    chain: &[junction_identity::Certificate],
    trust: junction_identity::TrustStore,
    revocations: Option<junction_identity::Verified<junction_identity::RevocationList>>,
    settings: &crate::shell::Highways,
) -> anyhow::Result<HighwaySetup> {
    use anyhow::Context;
    let identity = TlsIdentity::new(key, chain).context("this junction's Highway identity")?;
    let policy = PeerPolicy::new(trust, Revocations::new(revocations));
    let mut peers = Vec::new();
    let mut names = HashMap::new();
    for p in &settings.peers {
        if let Ok(ip) = p.host.parse::<std::net::IpAddr>() {
            peers.push((p.junction, SocketAddr::new(ip, p.port)));
            continue;
        }
        names.insert(p.junction, (p.host.clone(), p.port));
        // A name is resolved at each dial; this first answer is only what
        // the link keeps until then.
        let first = std::net::ToSocketAddrs::to_socket_addrs(&(p.host.as_str(), p.port))
            .ok()
            .and_then(|mut a| a.find(SocketAddr::is_ipv4));
        if first.is_none() {
            tracing::warn!(
                junction = p.junction,
                "peer {p} does not resolve now; it is tried again at each dial"
            );
        }
        let unresolved = SocketAddr::from(([0, 0, 0, 0], p.port));
        peers.push((p.junction, first.unwrap_or(unresolved)));
    }
    Ok(HighwaySetup {
        junction,
        incarnation,
        identity,
        policy,
        listen: settings.listen,
        peers,
        names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_identity::Role;

    /// A QUIC connection from junction 1 to junction 2 on loopback, with
    /// real bus identities: both endpoints and both ends.
    async fn pair() -> [(quinn::Endpoint, quinn::Connection); 2] {
        let authority = crate::authority::LocalAuthority::new().unwrap();
        let policy = PeerPolicy::new(authority.trust(), Revocations::new(None));
        let transport = TransportSettings::default();
        let identity = |id: u16| {
            let (key, chain) = authority
                .issue(u64::from(id), Role::Junction { id })
                .unwrap();
            TlsIdentity::new(&key, &chain).unwrap()
        };
        let server_config =
            junction_highway::server_config(&identity(2), &policy, &transport).unwrap();
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_config =
            junction_highway::client_config(&identity(1), &policy, &transport).unwrap();
        let dial = client
            .connect_with(
                client_config,
                server.local_addr().unwrap(),
                &junction_highway::cert::server_name(2),
            )
            .unwrap();
        let (dialed, accepted) = tokio::join!(dial, async { server.accept().await.unwrap().await });
        [(client, dialed.unwrap()), (server, accepted.unwrap())]
    }

    /// Traffic for three times as many destinations as a neighbour lets a
    /// junction open streams at once (quinn's default, 100) all arrives
    /// while the streams stay open, as they do for a link's life: the
    /// destinations share at most [`DATA_STREAMS`] streams. With a stream
    /// per destination, the 101st never opened.
    #[tokio::test]
    async fn traffic_for_hundreds_of_destinations_shares_a_bounded_set_of_streams() {
        let [(_near, conn), (_far, far)] = pair().await;
        let (tx, mut arrived) = mpsc::unbounded_channel::<u16>();
        let streams = Rc::new(Cell::new(0usize));
        let accepting = {
            let streams = streams.clone();
            async move {
                while let Ok(mut stream) = far.accept_uni().await {
                    streams.set(streams.get() + 1);
                    let tx = tx.clone();
                    tokio::task::spawn_local(async move {
                        let mut id = [0u8; 2];
                        while stream.read_exact(&mut id).await.is_ok() {
                            let _ = tx.send(u16::from_be_bytes(id));
                        }
                    });
                }
            }
        };
        tokio::task::LocalSet::new()
            .run_until(async move {
                tokio::task::spawn_local(accepting);
                let link = Rc::new(Link::new(conn));
                for destination in 0..300u16 {
                    let queue = link.data_queue(destination);
                    link.enqueue(&queue, Bytes::from(destination.to_be_bytes().to_vec()));
                }
                let mut got = Vec::new();
                while got.len() < 300 {
                    let next = tokio::time::timeout(Duration::from_secs(20), arrived.recv());
                    match next.await {
                        Ok(Some(id)) => got.push(id),
                        _ => panic!("{} of 300 destinations heard from", got.len()),
                    }
                }
                got.sort_unstable();
                assert_eq!(got, (0..300).collect::<Vec<_>>());
                assert_eq!(link.data.borrow().len(), usize::from(DATA_STREAMS));
                assert_eq!(streams.get(), usize::from(DATA_STREAMS));
            })
            .await;
    }

    /// Queues eight 1 MiB pieces for a new stream of `link`.
    async fn queue_eight_mib(link: &Link) -> (quinn::SendStream, mpsc::UnboundedReceiver<Bytes>) {
        let stream = link.conn.open_uni().await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        for i in 0..8u8 {
            link.enqueue(&tx, Bytes::from(vec![i; 1 << 20]));
        }
        (stream, rx)
    }

    /// A neighbour that reads its stream gets it all, and the link's
    /// count of queued bytes goes back to zero; one that takes nothing in
    /// stops the writer at quinn's flow control, and once the writer has
    /// made no progress for its deadline the link is closed and its queue
    /// leaves the count.
    #[tokio::test]
    async fn a_neighbour_that_takes_nothing_in_is_closed_and_its_queue_freed() {
        let [(_near, conn), (_far, far)] = pair().await;
        let link = Link::new(conn);

        let (stream, rx) = queue_eight_mib(&link).await;
        assert_eq!(link.queued.get(), 8 << 20);
        assert!(link.has_room(HIGHWAY_QUEUE_BYTES - (8 << 20)));
        assert!(!link.has_room(HIGHWAY_QUEUE_BYTES - (8 << 20) + 1));
        let reader = async {
            let mut stream = far.accept_uni().await.unwrap();
            stream.read_to_end(16 << 20).await.unwrap().len()
        };
        // The writer ends with its queue (the sender is gone). A deadline
        // a busy machine cannot reach while the neighbour reads.
        let patient = write_all(stream, rx, &link, Duration::from_secs(20));
        let (read, ()) = tokio::join!(reader, patient);
        assert_eq!(read, 8 << 20, "all of it arrived");
        assert_eq!(link.queued.get(), 0);
        assert!(
            link.conn.close_reason().is_none(),
            "a reading neighbour stays"
        );

        // Now nobody reads the next stream.
        let (stream, rx) = queue_eight_mib(&link).await;
        let stall = Duration::from_millis(500);
        tokio::time::timeout(Duration::from_secs(30), write_all(stream, rx, &link, stall))
            .await
            .expect("the stalled writer gave up");
        assert!(
            matches!(
                link.conn.close_reason(),
                Some(quinn::ConnectionError::LocallyClosed)
            ),
            "{:?}",
            link.conn.close_reason()
        );
        assert_eq!(link.queued.get(), 0, "what waited left the count");
    }
}
