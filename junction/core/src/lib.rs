//! The Junction's core: ports, capability tables, the name registry and
//! routing, as a state machine with no I/O.
//!
//! The shell feeds it events and drains what it must do next:
//!
//! - `handle_*` methods take input: a connection arrived
//!   ([`Core::handle_connected`]), a frame arrived ([`Core::handle_frame`]), a
//!   frame could not be read ([`Core::handle_frame_error`]), a connection went
//!   away ([`Core::handle_disconnected`]), the junction is stopping
//!   ([`Core::handle_shutdown`]);
//! - [`Core::poll_output`] yields [`Output`]s, frames to write and connections
//!   to close, in the order they must happen. Drain it after every input.
//!
//! The core never blocks, never allocates per forwarded message in the steady
//! state, and never panics on anything a peer sends.
//!
//! # Flow control
//!
//! Every send capability handle carries send credits, `window` units when it
//! is created. Each `Send` or `Call` spends [`credit_cost`] units: one, plus
//! one per 16 KiB of payload, so the window bounds both messages and bytes. The message is delivered to the
//! port owner at once and recorded in the port's in-flight queue; when the
//! owner reports it consumed (`Credit`), the credit goes back to the handle it
//! was sent on (`SendCredit`). So a slow receiver stops exactly the handles
//! that send to it, and the memory a port can tie up is bounded by its
//! senders' windows. Replies travel on send-once capabilities, which never wait
//! for credit; what bounds them is the caller's limit of pending calls, which
//! stay pending until the caller consumes the reply. A client that never reads
//! its replies therefore stalls only its own calls.

mod attenuation;
mod authentication;
mod control;
mod slab;
#[cfg(test)]
mod tests;
mod time;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use junction_identity::{
    Certificate, NamePattern, RevocationList, ServiceName, TrustStore, Verified,
};
use junction_road::codec::FrameError;
use junction_road::control::CONTROL_HANDLE;
pub use junction_road::frame::{MAX_CAPS_PER_MESSAGE, credit_cost};
use junction_road::{
    Address, Deliver, ErrorCode, ErrorFrame, Frame, Granted, Header, Identity, MAGIC,
    PROTOCOL_VERSION, Reason, Rights, Welcome,
};

use crate::slab::{Key, Slab};
pub use crate::time::Now;
use crate::time::{FifoTimers, WallTimers};

/// Limits and identity of one junction.
#[derive(Debug, Clone)]
pub struct Config {
    /// This junction's id (1 to 65534).
    pub junction: u16,
    /// The largest frame accepted from a Driver.
    pub max_frame: u32,
    /// Send credits each new capability handle starts with, in units of
    /// [`credit_cost`]; at least twice the cost of the largest frame.
    pub window: u32,
    /// Capability handles one connection may hold.
    pub max_handles: u32,
    /// Ports one connection may own, its home port included.
    pub max_ports: u32,
    /// Calls one connection may have waiting for a reply.
    pub max_pending_calls: u32,
    /// The authorities whose certificates this junction believes.
    pub trust: TrustStore,
    /// Certificates and keys the authority revoked.
    pub revocations: Option<Verified<RevocationList>>,
    /// Names that may be registered without a certificate, for development.
    /// Empty (off) by default.
    pub dev_namespace: Vec<NamePattern>,
    /// How long a new connection may take to deliver its whole Hello frame.
    pub hello_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            junction: 1,
            max_frame: junction_road::DEFAULT_MAX_FRAME,
            window: 1024,
            max_handles: 4096,
            max_ports: 256,
            max_pending_calls: 1024,
            trust: TrustStore::new(),
            revocations: None,
            dev_namespace: Vec::new(),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection's id, unique for the life of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    key: Key,
    serial: u64,
}

impl ConnId {
    fn key(self) -> Key {
        self.key
    }

    /// The id as a number, for logs and listings: connections are counted
    /// from 1 as they arrive.
    pub fn get(self) -> u64 {
        self.serial
    }

    /// A small dense index: no two live connections share it, so a shell
    /// can keep per-connection state in a vector.
    pub fn slot(self) -> usize {
        self.key().index as usize
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.serial)
    }
}

/// What the shell knows about a peer before it speaks.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// How it is attached: `unix`, `stdio`.
    pub road: &'static str,
    /// Its process id, from the OS.
    pub pid: Option<u32>,
    /// Its user id, from the OS.
    pub uid: Option<u32>,
    /// Its group id, from the OS.
    pub gid: Option<u32>,
    /// Fresh random bytes for the Welcome, for proofs of key possession.
    pub nonce: [u8; 32],
}

/// What the shell must do next.
#[derive(Debug)]
#[must_use]
pub enum Output {
    /// Write `frame` to `conn`.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// Flush what was written to `conn`, then close it. The core has already
    /// forgotten it.
    Close {
        /// The connection.
        conn: ConnId,
        /// Why, for the log.
        reason: String,
    },
}

/// The junction's state machine. See the module documentation.
#[derive(Debug)]
pub struct Core {
    config: Config,
    conns: Slab<Conn>,
    ports: Slab<Port>,
    /// Why each port slot's last port died, to tell late senders.
    port_deaths: HashMap<u32, (u32, Reason)>,
    names: HashMap<ServiceName, Registration>,
    out: VecDeque<Output>,
    credit_scratch: Vec<(ConnId, u32, u32)>,
    next_serial: u64,
    /// The time of the input being handled.
    now: Now,
    /// When each connection that has not said Hello yet must have.
    hello_deadlines: FifoTimers<ConnId>,
    /// When proven identities lapse with their certificates.
    identity_expiries: WallTimers<ConnId>,
    /// Members of each revocable lineage, for `Revoke`.
    lineages: HashMap<u64, Vec<(ConnId, u32)>>,
    next_lineage: u64,
    /// Capabilities with an expiry, soonest first, for `handle_timeout`.
    expiries: WallTimers<(ConnId, u32)>,
}

#[derive(Debug)]
struct Conn {
    peer: Peer,
    label: String,
    ready: bool,
    home: u16,
    ports: Vec<u16>,
    caps: Slab<Cap>,
    pending_calls: u32,
    serial: u64,
    /// What a proof of possession on this connection must sign.
    nonce: [u8; 32],
    /// The identity it proved, and the chain it proved it with.
    identity: Option<(Arc<Identity>, Arc<Vec<Certificate>>)>,
    /// When the first certificate of that chain expires.
    identity_until: u64,
}

/// A capability in a connection's table.
#[derive(Debug, Clone)]
struct Cap {
    port: Key,
    rights: Rights,
    credits: u32,
    /// Sequence number of the next message sent on this handle.
    seq: u64,
    /// For a send-once reply capability: the caller and its tag.
    reply_to: Option<(ConnId, u64)>,
    /// Dead on its own (revoked, expired, budget used up), port alive or not.
    dead: Option<Reason>,
    /// Seconds since the Unix epoch from which it is dead.
    expires_at: Option<u64>,
    /// Messages it may still send; a budgeted capability moves, never copies.
    remaining: Option<u32>,
    /// The revocable lineages it belongs to.
    lineages: Vec<u64>,
    /// The lineage this handle is the revocable root of.
    root: Option<u64>,
    /// Whether its holder asked to hear of its death.
    watched: bool,
}

impl Cap {
    fn new(port: Key, rights: Rights, credits: u32, reply_to: Option<(ConnId, u64)>) -> Self {
        Self {
            port,
            rights,
            credits,
            seq: 0,
            reply_to,
            dead: None,
            expires_at: None,
            remaining: None,
            lineages: Vec::new(),
            root: None,
            watched: false,
        }
    }

    /// Whether it must move rather than copy when passed on.
    fn moves(&self) -> bool {
        self.rights.contains(Rights::SEND_ONCE) || self.remaining.is_some()
    }
}

#[derive(Debug)]
struct Port {
    /// `None` for the control port.
    owner: Option<ConnId>,
    in_flight: VecDeque<InFlight>,
    senders: u32,
    watchers: Vec<(ConnId, u32)>,
    names: Vec<ServiceName>,
    home: bool,
    /// Whether the owner asked to hear when `senders` reaches zero.
    watch_senders: bool,
}

/// A message delivered to a port's owner and not yet consumed.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The handle it was sent on, to return the credit to.
    sender: Option<(ConnId, u32)>,
    /// The credit units it cost.
    cost: u32,
    seq: u64,
    /// The send-once reply capability it carried into the owner's table.
    reply: Option<u32>,
    /// Whether it is a reply to one of the owner's calls.
    is_reply: bool,
}

#[derive(Debug, Clone)]
struct Registration {
    port: Key,
    rights: Rights,
    /// The chain the registrant proved; `None` in the development namespace.
    chain: Option<Arc<Vec<Certificate>>>,
}

/// No handle, in an [`ErrorFrame`].
const NO_HANDLE: u32 = u32::MAX;
const CONTROL_PORT: u16 = 0;

fn handle_of(key: Key) -> u32 {
    (key.generation << 16) | key.index
}

fn key_of(handle: u32) -> Key {
    Key {
        index: handle & 0xFFFF,
        generation: handle >> 16,
    }
}

fn port_key(number: u16, generation: u32) -> Key {
    Key {
        index: u32::from(number),
        generation,
    }
}

impl Core {
    /// A core with no connections, holding only the control port, started
    /// at `now`. A window smaller than twice the cost of the largest frame is
    /// raised to that.
    pub fn new(mut config: Config, now: Now) -> Self {
        // Twice the largest frame's cost: a sender that stalls has then been
        // below half its window, and the receiver was asked to report.
        config.window = config
            .window
            .max(2 * credit_cost(config.max_frame as usize));
        // Handles pack a 16-bit slot index; handle 0 is always needed.
        config.max_handles = config.max_handles.clamp(1, 0xFFFF);
        let mut ports = Slab::with_limit(u32::from(u16::MAX) + 1);
        let control = ports.insert(Port {
            owner: None,
            in_flight: VecDeque::new(),
            senders: 0,
            watchers: Vec::new(),
            names: Vec::new(),
            home: false,
            watch_senders: false,
        });
        debug_assert_eq!(control.map(|k| k.index), Some(0));
        Self {
            conns: Slab::with_limit(u32::MAX),
            ports,
            port_deaths: HashMap::new(),
            names: HashMap::new(),
            out: VecDeque::new(),
            credit_scratch: Vec::new(),
            next_serial: 1,
            now,
            hello_deadlines: FifoTimers::new(),
            identity_expiries: WallTimers::new(),
            lineages: HashMap::new(),
            next_lineage: 1,
            expiries: WallTimers::new(),
            config,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many connections are attached.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// When the core next needs [`Core::handle_timeout`], if ever: the
    /// shell sleeps until then, or until the next input. Ask again after
    /// every input; the answer only moves earlier when input arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let now = self.now;
        let wall = [self.expiries.next(), self.identity_expiries.next()]
            .into_iter()
            .flatten()
            .min()
            .map(|at| now.instant_of(at));
        [self.hello_deadlines.next(), wall]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed: connections that did not say Hello in time are closed,
    /// identities whose certificates expired are withdrawn, capabilities
    /// whose expiry has come die and their watchers are told.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        while let Some(conn) = self.hello_deadlines.pop_due(now.instant) {
            if self.conns.get(conn.key()).is_some_and(|c| !c.ready) {
                let timeout = self.config.hello_timeout;
                self.error(
                    conn,
                    0,
                    NO_HANDLE,
                    ErrorCode::HandshakeRequired,
                    format!("no complete Hello frame within {timeout:?} of connecting"),
                );
                self.close(conn, format!("no Hello within {timeout:?}"));
            }
        }
        while let Some((at, conn)) = self.identity_expiries.pop_due(now.unix) {
            self.expire_identity(conn, at);
        }
        // Entries of dropped capabilities linger until their time; keep the
        // heap from growing with them.
        if self.expiries.len() > 4096 {
            let mut expiries = std::mem::replace(&mut self.expiries, WallTimers::new());
            expiries.retain(|at, (conn, handle)| {
                self.cap(conn, handle)
                    .is_some_and(|c| c.expires_at == Some(at))
            });
            self.expiries = expiries;
        }
        while let Some((at, (conn, handle))) = self.expiries.pop_due(now.unix) {
            self.cap_died(conn, handle, Reason::Expired, |cap| {
                cap.expires_at == Some(at)
            });
        }
    }

    /// Checks that the core's books agree with its tables: sender counts,
    /// credit windows, pending calls, port owners, registrations. For tests
    /// and simulations, after every step; it walks the whole state.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut senders: HashMap<Key, u32> = HashMap::new();
        let window = self.config.window;
        for (_, c) in self.conns.iter() {
            for (handle, cap) in c.caps.iter() {
                if cap.port.index == u32::from(CONTROL_PORT) {
                    continue;
                }
                *senders.entry(cap.port).or_default() += 1;
                if !cap.rights.contains(Rights::SEND_ONCE) && cap.credits > window {
                    return Err(format!(
                        "c{} handle {:#x} holds {} credits, above the window of {window}",
                        c.serial,
                        handle_of(handle),
                        cap.credits
                    ));
                }
            }
            if c.pending_calls > self.config.max_pending_calls {
                return Err(format!(
                    "c{} has {} pending calls, above the limit",
                    c.serial, c.pending_calls
                ));
            }
        }
        for (key, port) in self.ports.iter() {
            if key.index == u32::from(CONTROL_PORT) {
                continue;
            }
            let counted = senders.get(&key).copied().unwrap_or(0);
            if port.senders != counted {
                return Err(format!(
                    "port {} counts {} senders but {counted} capabilities reach it",
                    key.index, port.senders
                ));
            }
            match port.owner {
                Some(owner) if self.conns.get(owner.key()).is_some() => {}
                _ => return Err(format!("port {} outlived its owner", key.index)),
            }
        }
        for (name, reg) in &self.names {
            if self.ports.get(reg.port).is_none() {
                return Err(format!("{name} names a dead port"));
            }
        }
        Ok(())
    }

    /// The next thing the shell must do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// A new connection arrived; it must deliver a whole Hello frame within
    /// the configured `hello_timeout`, or be closed.
    pub fn handle_connected(&mut self, peer: Peer, now: Now) -> ConnId {
        self.now = now;
        let nonce = peer.nonce;
        let conn = Conn {
            peer,
            label: String::new(),
            ready: false,
            home: 0,
            ports: Vec::new(),
            caps: Slab::with_limit_and_mask(self.config.max_handles, 0xFFFF),
            pending_calls: 0,
            serial: self.next_serial,
            nonce,
            identity: None,
            identity_until: 0,
        };
        self.next_serial += 1;
        let serial = conn.serial;
        let key = self
            .conns
            .insert(conn)
            .expect("connection slots are 32-bit; the OS runs out of sockets first");
        let id = ConnId { key, serial };
        self.hello_deadlines
            .push(now.instant + self.config.hello_timeout, id);
        id
    }

    /// The connection's reader could not make a frame out of its bytes.
    pub fn handle_frame_error(&mut self, conn: ConnId, error: &FrameError) {
        let code = match error {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::BadHeader,
        };
        self.error(conn, 0, NO_HANDLE, code, error.to_string());
        if error.is_fatal() {
            self.close(conn, format!("broken framing: {error}"));
        }
    }

    /// The connection is gone: its ports die, its capabilities are dropped.
    pub fn handle_disconnected(&mut self, conn: ConnId) {
        self.forget(conn, Reason::OwnerGone);
    }

    /// The junction is stopping: every connection is told and closed.
    pub fn handle_shutdown(&mut self) {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .map(|(key, c)| ConnId {
                key,
                serial: c.serial,
            })
            .collect();
        for conn in conns {
            self.frame(
                conn,
                Header::Goodbye {
                    reason: "the junction is shutting down".into(),
                },
            );
            self.forget(conn, Reason::Shutdown);
            self.out.push_back(Output::Close {
                conn,
                reason: "junction shutdown".into(),
            });
        }
    }

    /// A frame arrived on `conn` at `now`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: Frame, now: Now) {
        self.now = now;
        let Some(c) = self.conns.get(conn.key()) else {
            return;
        };
        if !c.ready {
            self.handshake(conn, frame.header);
            return;
        }
        match frame.header {
            Header::OpenPort { req } => self.open_port(conn, req),
            Header::ClosePort { port } => self.close_port(conn, port),
            Header::Mint { req, port, rights } => self.mint(conn, req, port, rights),
            Header::Drop { handle } => self.drop_handle(conn, handle),
            Header::Watch { handle } => self.watch(conn, handle),
            Header::Send(send) => self.send(conn, send.handle, None, send.caps, frame.payload),
            Header::Call(call) => {
                self.send(conn, call.handle, Some(call.tag), call.caps, frame.payload)
            }
            Header::Credit { port, count } => self.credit(conn, port, count),
            Header::Attenuate(a) => self.attenuate(conn, a),
            Header::Revoke { handle } => self.revoke(conn, handle),
            Header::WatchSenders { port } => self.watch_senders(conn, port),
            Header::Ping { nonce } => self.frame(conn, Header::Pong { nonce }),
            Header::Pong { .. } => {}
            other => self.error(
                conn,
                0,
                NO_HANDLE,
                ErrorCode::UnexpectedFrame,
                format!(
                    "a driver may not send {}; see docs/protocol.md for the frames a driver sends",
                    frame_name(&other)
                ),
            ),
        }
    }

    fn handshake(&mut self, conn: ConnId, header: Header) {
        let hello = match header {
            Header::Hello(hello) if hello.magic == MAGIC => hello,
            other => {
                self.error(
                    conn,
                    0,
                    NO_HANDLE,
                    ErrorCode::HandshakeRequired,
                    format!(
                        "expected a Hello frame with magic JNCT first, got {}",
                        frame_name(&other)
                    ),
                );
                self.close(conn, "no handshake".into());
                return;
            }
        };
        if hello.version != PROTOCOL_VERSION {
            self.error(
                conn,
                0,
                NO_HANDLE,
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this junction speaks version {PROTOCOL_VERSION}",
                    hello.version
                ),
            );
            self.close(conn, format!("unsupported version {}", hello.version));
            return;
        }
        let Some(home) = self.new_port(conn, true) else {
            self.error(
                conn,
                0,
                NO_HANDLE,
                ErrorCode::TooManyPorts,
                "the junction has no free port numbers; try again later".into(),
            );
            self.close(conn, "no free port for a home port".into());
            return;
        };
        let config = &self.config;
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            junction: config.junction,
            home: Address::new(config.junction, home),
            max_frame: config.max_frame,
            window: config.window,
            max_handles: config.max_handles,
            max_ports: config.max_ports,
            max_pending_calls: config.max_pending_calls,
            nonce: self.conns.get(conn.key()).map_or([0; 32], |c| c.nonce),
        };
        let Some(c) = self.conns.get_mut(conn.key()) else {
            return;
        };
        c.ready = true;
        c.home = home;
        // Labels are shown to people: printable characters only.
        c.label = hello
            .label
            .chars()
            .filter(|ch| !ch.is_control())
            .take(64)
            .collect();
        // The control capability: handle 0, the first entry of the table.
        let control = c.caps.insert(Cap::new(
            port_key(CONTROL_PORT, 0),
            Rights::SEND,
            u32::MAX,
            None,
        ));
        debug_assert_eq!(control.map(handle_of), Some(CONTROL_HANDLE));
        self.frame(conn, Header::Welcome(welcome));
    }

    fn new_port(&mut self, owner: ConnId, home: bool) -> Option<u16> {
        let max_ports = self.config.max_ports as usize;
        let c = self.conns.get(owner.key())?;
        if c.ports.len() >= max_ports {
            return None;
        }
        let key = self.ports.insert(Port {
            owner: Some(owner),
            in_flight: VecDeque::new(),
            senders: 0,
            watchers: Vec::new(),
            names: Vec::new(),
            home,
            watch_senders: false,
        })?;
        let number = u16::try_from(key.index).ok()?;
        self.conns.get_mut(owner.key())?.ports.push(number);
        Some(number)
    }

    fn open_port(&mut self, conn: ConnId, req: u32) {
        match self.new_port(conn, false) {
            Some(port) => {
                let address = Address::new(self.config.junction, port);
                self.frame(conn, Header::PortOpened { req, address });
            }
            None => self.error(
                conn,
                req,
                NO_HANDLE,
                ErrorCode::TooManyPorts,
                format!(
                    "this connection owns {} ports already, the limit; close one first",
                    self.config.max_ports
                ),
            ),
        }
    }

    /// The key of a live port `number` owned by `conn`.
    fn owned_port(&self, conn: ConnId, number: u16) -> Option<Key> {
        let c = self.conns.get(conn.key())?;
        if !c.ports.contains(&number) {
            return None;
        }
        let generation = self.ports.generation_of(u32::from(number))?;
        Some(port_key(number, generation))
    }

    fn close_port(&mut self, conn: ConnId, port: u16) {
        let home = self.conns.get(conn.key()).map(|c| c.home);
        match self.owned_port(conn, port) {
            Some(_) if home == Some(port) => self.error(
                conn,
                0,
                NO_HANDLE,
                ErrorCode::UnknownPort,
                format!(
                    "port {port} is this connection's home port; it closes with the connection"
                ),
            ),
            Some(key) => {
                self.kill_port(key, Reason::PortClosed);
                self.frame(
                    conn,
                    Header::PortClosed {
                        port,
                        reason: Reason::PortClosed,
                    },
                );
            }
            None => self.unknown_port(conn, 0, port),
        }
    }

    fn mint(&mut self, conn: ConnId, req: u32, port: u16, rights: Rights) {
        if !rights.is_valid() {
            self.error(
                conn,
                req,
                NO_HANDLE,
                ErrorCode::BadRights,
                format!("rights {rights} are not a valid set: give exactly one of send and send-once, optionally with grant"),
            );
            return;
        }
        let Some(key) = self.owned_port(conn, port) else {
            self.unknown_port(conn, req, port);
            return;
        };
        let credits = self.initial_credits(rights);
        match self.new_cap(conn, key, rights, None) {
            Some(handle) => self.frame(
                conn,
                Header::Minted {
                    req,
                    handle,
                    credits,
                },
            ),
            None => self.too_many_handles(conn, req),
        }
    }

    fn initial_credits(&self, rights: Rights) -> u32 {
        if rights.contains(Rights::SEND_ONCE) {
            1
        } else {
            self.config.window
        }
    }

    /// Puts a new capability into `conn`'s table; `None` when the table is full.
    fn new_cap(
        &mut self,
        conn: ConnId,
        port: Key,
        rights: Rights,
        reply_to: Option<(ConnId, u64)>,
    ) -> Option<u32> {
        let credits = self.initial_credits(rights);
        self.insert_cap(conn, Cap::new(port, rights, credits, reply_to))
    }

    /// Puts `cap` into `conn`'s table and into the books: sender counts,
    /// lineages, expiries. `None` when the table is full.
    fn insert_cap(&mut self, conn: ConnId, cap: Cap) -> Option<u32> {
        let port = cap.port;
        let expires_at = cap.expires_at;
        let lineages = cap.lineages.clone();
        let c = self.conns.get_mut(conn.key())?;
        let handle = handle_of(c.caps.insert(cap)?);
        if let Some(p) = self.ports.get_mut(port) {
            p.senders += 1;
        }
        for lineage in lineages {
            let members = self.lineages.entry(lineage).or_default();
            members.push((conn, handle));
            // Copies come and go: now and then, forget the ones gone.
            if members.len() >= 64 && members.len().is_power_of_two() {
                let mut members = std::mem::take(members);
                members.retain(|&(c, h)| {
                    self.conns
                        .get(c.key())
                        .and_then(|c| c.caps.get(key_of(h)))
                        .is_some_and(|cap| cap.lineages.contains(&lineage))
                });
                self.lineages.insert(lineage, members);
            }
        }
        if let Some(at) = expires_at {
            self.expiries.push(at, (conn, handle));
        }
        Some(handle)
    }

    /// A capability dies on its own (revoked, expired, budget spent), if it
    /// is still the one `which` recognises; its watcher is told.
    fn cap_died(
        &mut self,
        conn: ConnId,
        handle: u32,
        reason: Reason,
        which: impl Fn(&Cap) -> bool,
    ) {
        let Some(cap) = self
            .conns
            .get_mut(conn.key())
            .and_then(|c| c.caps.get_mut(key_of(handle)))
        else {
            return;
        };
        if cap.dead.is_some() || !which(cap) {
            return;
        }
        cap.dead = Some(reason);
        if cap.watched {
            self.frame(conn, Header::Dead { handle, reason });
        }
    }

    fn drop_handle(&mut self, conn: ConnId, handle: u32) {
        if handle == CONTROL_HANDLE {
            return;
        }
        if self
            .remove_cap(conn, handle, Reason::ReplyDropped)
            .is_none()
        {
            self.unknown_handle(conn, 0, handle);
        }
    }

    /// Takes a capability out of `conn`'s table. An unused reply capability
    /// fails its call with `reason`.
    fn remove_cap(&mut self, conn: ConnId, handle: u32, reason: Reason) -> Option<Cap> {
        let cap = self
            .conns
            .get_mut(conn.key())?
            .caps
            .remove(key_of(handle))?;
        self.release(&cap, reason);
        Some(cap)
    }

    /// One capability to `port` fewer; its owner hears if that was the last
    /// and it asked.
    fn sender_gone(&mut self, port: Key) {
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        p.senders = p.senders.saturating_sub(1);
        if p.senders == 0
            && p.watch_senders
            && let Some(owner) = p.owner
        {
            p.watch_senders = false;
            self.frame(
                owner,
                Header::NoSenders {
                    port: port.index as u16,
                },
            );
        }
    }

    /// `WatchSenders`: a one-time notice when the port has no senders.
    fn watch_senders(&mut self, conn: ConnId, number: u16) {
        let Some(key) = self.owned_port(conn, number) else {
            self.unknown_port(conn, 0, number);
            return;
        };
        let Some(p) = self.ports.get_mut(key) else {
            return;
        };
        if p.senders == 0 {
            p.watch_senders = false;
            self.frame(conn, Header::NoSenders { port: number });
        } else {
            p.watch_senders = true;
        }
    }

    /// What must happen when a capability leaves every table.
    fn release(&mut self, cap: &Cap, reason: Reason) {
        self.sender_gone(cap.port);
        // Without its root nobody can revoke the lineage: forget its members.
        if let Some(lineage) = cap.root {
            self.lineages.remove(&lineage);
        }
        if let Some((caller, tag)) = cap.reply_to {
            self.call_failed(caller, tag, reason);
        }
    }

    fn call_failed(&mut self, caller: ConnId, tag: u64, reason: Reason) {
        let Some(c) = self.conns.get_mut(caller.key()) else {
            return;
        };
        c.pending_calls = c.pending_calls.saturating_sub(1);
        self.frame(caller, Header::CallFailed { tag, reason });
    }

    fn watch(&mut self, conn: ConnId, handle: u32) {
        let now = self.now.unix;
        let Some(cap) = self
            .conns
            .get_mut(conn.key())
            .and_then(|c| c.caps.get_mut(key_of(handle)))
        else {
            self.unknown_handle(conn, 0, handle);
            return;
        };
        cap.watched = true;
        if let Some(reason) = cap.dead {
            self.frame(conn, Header::Dead { handle, reason });
            return;
        }
        if cap.expires_at.is_some_and(|at| now >= at) {
            self.cap_died(conn, handle, Reason::Expired, |_| true);
            return;
        }
        let port = cap.port;
        match self.ports.get_mut(port) {
            Some(p) => {
                if !p.watchers.contains(&(conn, handle)) {
                    p.watchers.push((conn, handle));
                }
            }
            None => {
                let reason = self.death_reason(port);
                // Told now: later deaths (revocation, expiry) stay quiet.
                self.cap_died(conn, handle, reason, |_| true);
            }
        }
    }

    fn cap(&self, conn: ConnId, handle: u32) -> Option<&Cap> {
        self.conns.get(conn.key())?.caps.get(key_of(handle))
    }

    fn death_reason(&self, port: Key) -> Reason {
        match self.port_deaths.get(&port.index) {
            Some(&(generation, reason)) if generation == port.generation => reason,
            _ => Reason::PortClosed,
        }
    }

    /// `Send` and `Call`: the message path.
    fn send(
        &mut self,
        conn: ConnId,
        handle: u32,
        call: Option<u64>,
        caps: Vec<u32>,
        payload: Bytes,
    ) {
        let cost = credit_cost(payload.len());
        let window = self.config.window;
        let max_pending = self.config.max_pending_calls;
        let mut low_credit = false;
        let now = self.now.unix;
        let mut exhausted = false;
        let checked = {
            let Some(c) = self.conns.get_mut(conn.key()) else {
                return;
            };
            let pending_full = call.is_some() && c.pending_calls >= max_pending;
            match c.caps.get_mut(key_of(handle)) {
                None => Err((ErrorCode::UnknownHandle, false)),
                Some(cap) => {
                    // Every frame naming a held handle takes a sequence
                    // number, refused or not, so both ends count alike.
                    let seq = cap.seq;
                    cap.seq += 1;
                    // Replies are never held back (the caller's pending-call
                    // limit bounds them), nor are control requests.
                    let metered = !cap.rights.contains(Rights::SEND_ONCE)
                        && cap.port.index != u32::from(CONTROL_PORT);
                    let expired = cap.expires_at.is_some_and(|at| now >= at);
                    if let Some(reason) = cap.dead.or(expired.then_some(Reason::Expired)) {
                        Ok(Err((reason, seq)))
                    } else if call == Some(0) {
                        Err((ErrorCode::BadTag, metered))
                    } else if caps.len() > MAX_CAPS_PER_MESSAGE {
                        Err((ErrorCode::BadCapabilityList, metered))
                    } else if pending_full {
                        Err((ErrorCode::TooManyPendingCalls, metered))
                    } else if metered && cap.credits < cost {
                        Err((ErrorCode::NoCredit, false))
                    } else {
                        if metered {
                            cap.credits -= cost;
                            low_credit = cap.credits < window / 2;
                        }
                        if let Some(left) = &mut cap.remaining {
                            *left = left.saturating_sub(1);
                            exhausted = *left == 0;
                        }
                        Ok(Ok((cap.port, cap.rights, seq, cap.reply_to)))
                    }
                }
            }
        };
        if exhausted {
            // The last unit is spent whatever becomes of this message.
            self.cap_died(conn, handle, Reason::Exhausted, |_| true);
        }
        let (port, rights, seq, reply_to) = match checked {
            Ok(Ok(v)) => v,
            Ok(Err((reason, seq))) => {
                // A capability dead on its own: the port may live, but not
                // for this holder.
                self.cap_died(conn, handle, reason, |_| true);
                self.refuse_message(conn, handle, seq, call, reason);
                return;
            }
            Err((code, refund)) => {
                // A refused reply still uses up its send-once capability
                // (the driver counts it as used): its call fails now rather
                // than at the caller's timeout.
                if let Some(c) = self.conns.get_mut(conn.key())
                    && c.caps
                        .get(key_of(handle))
                        .is_some_and(|cap| cap.rights.contains(Rights::SEND_ONCE))
                    && let Some(cap) = c.caps.remove(key_of(handle))
                {
                    self.release(&cap, Reason::ReplyDropped);
                }
                let message = match code {
                    ErrorCode::UnknownHandle => {
                        format!("handle {handle} is not in this connection's capability table")
                    }
                    ErrorCode::BadTag => "a call's tag must not be 0".to_string(),
                    ErrorCode::BadCapabilityList => format!(
                        "a message carries at most {MAX_CAPS_PER_MESSAGE} capabilities; this one had {}",
                        caps.len()
                    ),
                    ErrorCode::TooManyPendingCalls => format!(
                        "this connection has {max_pending} calls waiting for replies, the limit; read replies before calling again"
                    ),
                    _ => format!(
                        "handle {handle} has less than the {cost} send credits this message costs; wait for SendCredit before sending again"
                    ),
                };
                if refund {
                    // The driver spent the credit; the core did not take it.
                    self.frame(
                        conn,
                        Header::SendCredit {
                            handle,
                            count: cost,
                        },
                    );
                }
                self.call_error(conn, 0, handle, call.unwrap_or(0), code, message);
                return;
            }
        };

        if port.index == u32::from(CONTROL_PORT) {
            match call {
                Some(tag) => self.control_call(conn, tag, caps, &payload),
                None => self.error(
                    conn,
                    0,
                    handle,
                    ErrorCode::BadControlRequest,
                    "the control port answers calls only; use Call, not Send".into(),
                ),
            }
            return;
        }

        // A send-once capability is used up by this message, delivered or not.
        if rights.contains(Rights::SEND_ONCE) {
            if let Some(c) = self.conns.get_mut(conn.key()) {
                c.caps.remove(key_of(handle));
            }
            self.sender_gone(port);
        }

        let Some(owner) = self.ports.get(port).and_then(|p| p.owner) else {
            let reason = self.death_reason(port);
            self.refuse_message(conn, handle, seq, call, reason);
            return;
        };

        if let Err((code, message)) = self.check_transfer(conn, owner, handle, &caps, call) {
            self.return_credit(conn, handle, rights, reply_to, cost);
            self.call_error(conn, 0, handle, call.unwrap_or(0), code, message);
            return;
        }
        let granted = self.transfer(conn, owner, &caps);
        let origin = self.home_address(conn);

        let reply = match call {
            Some(tag) => {
                let caller_home = self.conns.get(conn.key()).map(|c| {
                    port_key(
                        c.home,
                        self.ports.generation_of(u32::from(c.home)).unwrap_or(0),
                    )
                });
                let reply_handle = caller_home.and_then(|home| {
                    self.new_cap(owner, home, Rights::SEND_ONCE, Some((conn, tag)))
                });
                if reply_handle.is_some()
                    && let Some(c) = self.conns.get_mut(conn.key())
                {
                    c.pending_calls += 1;
                }
                reply_handle
            }
            None => None,
        };
        let (tag, is_reply) = match reply_to {
            Some((_, tag)) => (tag, true),
            None => (0, false),
        };
        // Ask for a prompt report when the sender would soon stall: for a
        // send, its credit; for a reply, its caller's pending calls.
        let ack = low_credit
            || (is_reply
                && self
                    .conns
                    .get(owner.key())
                    .is_some_and(|c| c.pending_calls >= self.config.max_pending_calls / 2));
        let sender = (!rights.contains(Rights::SEND_ONCE)).then_some((conn, handle));
        if let Some(p) = self.ports.get_mut(port) {
            p.in_flight.push_back(InFlight {
                sender,
                cost,
                seq,
                reply,
                is_reply,
            });
        }
        let identity = self
            .conns
            .get(conn.key())
            .and_then(|c| c.identity.as_ref().map(|(id, _)| id.clone()));
        let deliver = Deliver {
            port: port.index as u16,
            origin,
            tag,
            reply,
            caps: granted,
            ack,
            identity,
        };
        self.out.push_back(Output::Frame {
            conn: owner,
            frame: Frame::with_payload(Header::Deliver(deliver), payload),
        });
    }

    /// A message to a dead port: the sender is told, and a call fails.
    fn refuse_message(
        &mut self,
        conn: ConnId,
        handle: u32,
        seq: u64,
        call: Option<u64>,
        reason: Reason,
    ) {
        if let Some(tag) = call {
            self.frame(conn, Header::CallFailed { tag, reason });
        }
        self.frame(
            conn,
            Header::Undeliverable {
                handle,
                first_seq: seq,
                count: 1,
                reason,
            },
        );
    }

    /// Gives back the credit of a refused message.
    fn return_credit(
        &mut self,
        conn: ConnId,
        handle: u32,
        rights: Rights,
        reply_to: Option<(ConnId, u64)>,
        cost: u32,
    ) {
        if rights.contains(Rights::SEND_ONCE) {
            // The reply capability was used up by a refused reply: the call fails.
            if let Some((caller, tag)) = reply_to {
                self.call_failed(caller, tag, Reason::ReplyDropped);
            }
            return;
        }
        if let Some(cap) = self
            .conns
            .get_mut(conn.key())
            .and_then(|c| c.caps.get_mut(key_of(handle)))
        {
            cap.credits += cost;
            self.frame(
                conn,
                Header::SendCredit {
                    handle,
                    count: cost,
                },
            );
        }
    }

    fn home_address(&self, conn: ConnId) -> Address {
        let home = self.conns.get(conn.key()).map_or(0, |c| c.home);
        Address::new(self.config.junction, home)
    }

    /// Checks that every capability in `caps` may travel from `from` to `to`.
    fn check_transfer(
        &self,
        from: ConnId,
        to: ConnId,
        sending_on: u32,
        caps: &[u32],
        call: Option<u64>,
    ) -> Result<(), (ErrorCode, String)> {
        if caps.is_empty() {
            if call.is_some() && !self.has_room(to, 1) {
                return Err(receiver_full());
            }
            return Ok(());
        }
        let c = self
            .conns
            .get(from.key())
            .ok_or((ErrorCode::UnknownHandle, "connection is gone".to_string()))?;
        for (i, &h) in caps.iter().enumerate() {
            if caps[..i].contains(&h) || h == sending_on {
                return Err((
                    ErrorCode::BadCapabilityList,
                    format!(
                        "capability {h} appears twice in the message or is the one it is sent on"
                    ),
                ));
            }
            let Some(cap) = c.caps.get(key_of(h)) else {
                return Err((
                    ErrorCode::UnknownHandle,
                    format!(
                        "handle {h} in the message's capability list is not in this connection's table"
                    ),
                ));
            };
            if !cap.rights.contains(Rights::GRANT) {
                return Err((
                    ErrorCode::MissingRight,
                    format!(
                        "capability {h} has rights {} without grant, so it cannot be passed on; nothing was sent",
                        cap.rights
                    ),
                ));
            }
        }
        let extra = caps.len() + usize::from(call.is_some());
        if !self.has_room(to, extra) {
            return Err(receiver_full());
        }
        Ok(())
    }

    fn has_room(&self, conn: ConnId, n: usize) -> bool {
        self.conns
            .get(conn.key())
            .is_some_and(|c| c.caps.len() + n <= self.config.max_handles as usize)
    }

    /// Moves send-once capabilities and copies the others from `from` to `to`.
    fn transfer(&mut self, from: ConnId, to: ConnId, caps: &[u32]) -> Vec<Granted> {
        let mut granted = Vec::with_capacity(caps.len());
        for &h in caps {
            let Some(cap) = self.cap(from, h).cloned() else {
                continue;
            };
            // The copy keeps every limit of the original, and its lineages,
            // but not the power to revoke. (Made before a moved original
            // leaves, so the port never looks sender-less in between.)
            let mut copy = Cap::new(
                cap.port,
                cap.rights,
                self.initial_credits(cap.rights),
                cap.reply_to,
            );
            copy.dead = cap.dead;
            copy.expires_at = cap.expires_at;
            copy.remaining = cap.remaining;
            copy.lineages = cap.lineages.clone();
            let inserted = self.insert_cap(to, copy);
            if cap.moves() {
                if let Some(c) = self.conns.get_mut(from.key()) {
                    c.caps.remove(key_of(h));
                }
                self.sender_gone(cap.port);
            }
            let Some(handle) = inserted else {
                continue;
            };
            granted.push(Granted {
                handle,
                rights: cap.rights,
                credits: self.initial_credits(cap.rights),
                address: Address::new(self.config.junction, cap.port.index as u16),
                moves: cap.moves(),
            });
        }
        granted
    }

    /// The owner of `port` consumed `count` messages: credits go back.
    fn credit(&mut self, conn: ConnId, port: u16, count: u32) {
        let Some(key) = self.owned_port(conn, port) else {
            self.unknown_port(conn, 0, port);
            return;
        };
        let mut returns = std::mem::take(&mut self.credit_scratch);
        let mut replies = 0u32;
        if let Some(p) = self.ports.get_mut(key) {
            let n = (count as usize).min(p.in_flight.len());
            for entry in p.in_flight.drain(..n) {
                if entry.is_reply {
                    replies += 1;
                }
                if let Some((sender, handle)) = entry.sender {
                    match returns.last_mut() {
                        Some((c, h, k)) if *c == sender && *h == handle => *k += entry.cost,
                        _ => returns.push((sender, handle, entry.cost)),
                    }
                }
            }
        }
        if replies > 0
            && let Some(c) = self.conns.get_mut(conn.key())
        {
            c.pending_calls = c.pending_calls.saturating_sub(replies);
        }
        for &(sender, handle, count) in &returns {
            let Some(cap) = self
                .conns
                .get_mut(sender.key())
                .and_then(|c| c.caps.get_mut(key_of(handle)))
            else {
                continue;
            };
            cap.credits = cap.credits.saturating_add(count);
            self.frame(sender, Header::SendCredit { handle, count });
        }
        returns.clear();
        self.credit_scratch = returns;
    }

    /// A port dies: unconsumed messages are reported undeliverable, reply
    /// capabilities they carried fail their calls, watchers are told.
    fn kill_port(&mut self, key: Key, reason: Reason) {
        let Some(port) = self.ports.remove(key) else {
            return;
        };
        self.port_deaths.insert(key.index, (key.generation, reason));
        let number = key.index as u16;
        if let Some(owner) = port.owner {
            if let Some(c) = self.conns.get_mut(owner.key()) {
                c.ports.retain(|&p| p != number);
                let replies = port.in_flight.iter().filter(|e| e.is_reply).count() as u32;
                c.pending_calls = c.pending_calls.saturating_sub(replies);
            }
            for entry in &port.in_flight {
                if let Some(reply) = entry.reply {
                    self.remove_cap(owner, reply, reason);
                }
            }
        }
        let mut i = 0;
        while i < port.in_flight.len() {
            let entry = port.in_flight[i];
            i += 1;
            let Some((sender, handle)) = entry.sender else {
                continue;
            };
            let mut count = 1u32;
            while let Some(next) = port.in_flight.get(i) {
                if next.sender == entry.sender && next.seq == entry.seq + u64::from(count) {
                    count += 1;
                    i += 1;
                } else {
                    break;
                }
            }
            if self.cap(sender, handle).is_some() {
                self.frame(
                    sender,
                    Header::Undeliverable {
                        handle,
                        first_seq: entry.seq,
                        count,
                        reason,
                    },
                );
            }
        }
        for (conn, handle) in port.watchers {
            if let Some(cap) = self
                .conns
                .get_mut(conn.key())
                .and_then(|c| c.caps.get_mut(key_of(handle)))
                && cap.port == key
                && cap.dead.is_none()
            {
                // Told once: later deaths (revocation, expiry) stay quiet.
                cap.dead = Some(reason);
                self.frame(conn, Header::Dead { handle, reason });
            }
        }
        for name in port.names {
            self.names.remove(&name);
        }
    }

    /// Removes a connection and everything it held.
    fn forget(&mut self, conn: ConnId, reason: Reason) {
        let Some(c) = self.conns.get(conn.key()) else {
            return;
        };
        let ports: Vec<u16> = c.ports.clone();
        for number in ports {
            if let Some(generation) = self.ports.generation_of(u32::from(number)) {
                self.kill_port(port_key(number, generation), reason);
            }
        }
        let Some(c) = self.conns.remove(conn.key()) else {
            return;
        };
        let call_reason = match reason {
            Reason::Shutdown => Reason::Shutdown,
            _ => Reason::OwnerGone,
        };
        for (_, cap) in c.caps.iter() {
            self.release(cap, call_reason);
        }
    }

    fn frame(&mut self, conn: ConnId, header: Header) {
        self.out.push_back(Output::Frame {
            conn,
            frame: Frame::bare(header),
        });
    }

    fn error(&mut self, conn: ConnId, req: u32, handle: u32, code: ErrorCode, message: String) {
        self.call_error(conn, req, handle, 0, code, message);
    }

    /// An error that answers a call with `tag` (0 for none).
    fn call_error(
        &mut self,
        conn: ConnId,
        req: u32,
        handle: u32,
        tag: u64,
        code: ErrorCode,
        message: String,
    ) {
        self.frame(
            conn,
            Header::Error(ErrorFrame {
                req,
                handle,
                tag,
                code,
                message,
            }),
        );
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        self.forget(conn, Reason::OwnerGone);
        self.out.push_back(Output::Close { conn, reason });
    }

    fn unknown_port(&mut self, conn: ConnId, req: u32, port: u16) {
        self.error(
            conn,
            req,
            NO_HANDLE,
            ErrorCode::UnknownPort,
            format!("this connection owns no open port {port}"),
        );
    }

    fn unknown_handle(&mut self, conn: ConnId, req: u32, handle: u32) {
        self.error(
            conn,
            req,
            handle,
            ErrorCode::UnknownHandle,
            format!("handle {handle} is not in this connection's capability table"),
        );
    }

    fn too_many_handles(&mut self, conn: ConnId, req: u32) {
        self.error(
            conn,
            req,
            NO_HANDLE,
            ErrorCode::TooManyHandles,
            format!(
                "this connection holds {} capability handles, the limit; drop some first",
                self.config.max_handles
            ),
        );
    }
}

fn receiver_full() -> (ErrorCode, String) {
    (
        ErrorCode::TooManyHandles,
        "the receiver's capability table is full; nothing was sent".into(),
    )
}

/// A frame's name for error messages.
fn frame_name(header: &Header) -> &'static str {
    match header {
        Header::Hello(_) => "Hello",
        Header::Welcome(_) => "Welcome",
        Header::OpenPort { .. } => "OpenPort",
        Header::PortOpened { .. } => "PortOpened",
        Header::ClosePort { .. } => "ClosePort",
        Header::PortClosed { .. } => "PortClosed",
        Header::Mint { .. } => "Mint",
        Header::Minted { .. } => "Minted",
        Header::Drop { .. } => "Drop",
        Header::Watch { .. } => "Watch",
        Header::Dead { .. } => "Dead",
        Header::Send(_) => "Send",
        Header::Call(_) => "Call",
        Header::Deliver(_) => "Deliver",
        Header::Credit { .. } => "Credit",
        Header::SendCredit { .. } => "SendCredit",
        Header::Undeliverable { .. } => "Undeliverable",
        Header::CallFailed { .. } => "CallFailed",
        Header::Error(_) => "Error",
        Header::Ping { .. } => "Ping",
        Header::Pong { .. } => "Pong",
        Header::Goodbye { .. } => "Goodbye",
        Header::Attenuate(_) => "Attenuate",
        Header::Revoke { .. } => "Revoke",
        Header::WatchSenders { .. } => "WatchSenders",
        Header::NoSenders { .. } => "NoSenders",
    }
}
