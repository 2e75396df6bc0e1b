//! The Junction's core: ports, capability tables, the name registry and
//! routing, as a state machine with no I/O and no clock.
//!
//! The shell feeds it events and drains what it must do next, as quinn
//! drives quinn-proto:
//!
//! - `handle_*` methods take input, each with the time it happens at
//!   ([`Now`]): a connection arrived ([`Core::handle_connected`]), a frame
//!   arrived ([`Core::handle_frame`]), a frame could not be read
//!   ([`Core::handle_frame_error`]), a connection went away
//!   ([`Core::handle_disconnected`]), a deadline came
//!   ([`Core::handle_timeout`]), the junction is stopping
//!   ([`Core::handle_shutdown`]);
//! - [`Core::poll_output`] yields [`Output`]s, frames to write and connections
//!   to close, in the order they must happen. Drain it after every input;
//! - [`Core::poll_timeout`] says when to call [`Core::handle_timeout`] next.
//!
//! The core never blocks, never reads a clock, never allocates per forwarded
//! message in the steady state, and never panics on anything a peer sends.
//!
//! # State, by owner
//!
//! - the port table (`ports`): ports, their owners, in-flight messages,
//!   watchers, and why dead ports died;
//! - one capability table per connection (`caps`): handles, targets, flows;
//! - the revocation, budget and expiry books (`books`): lineages and
//!   budgets hold exactly the capabilities in tables, and end with them;
//! - the name registry (`registry`);
//! - routes to other junctions ([`routing`]), and per other junction an
//!   end-to-end [`session`] (`peers`) sealed by its channel's keys
//!   ([`secure`]);
//! - the message path (`path`): a `Send` or `Call` is *admitted* (rights,
//!   credit, budget, expiry, attachments) into an envelope, a value that
//!   could be written to a wire, then *delivered* to its target.
//!
//! Every refusal is a [`Refusal`], which maps onto the wire's error codes.
//!
//! # Flow control
//!
//! Credit belongs to *lanes* (`lanes`): every metered capability one
//! connection holds to one port sends on the same lane, which holds one
//! `window` of credit however many such capabilities there are. Each `Send`
//! or `Call` spends [`credit_cost`] units of its lane: one, plus one per
//! 16 KiB of payload, so the window bounds both messages and bytes. The
//! message is delivered to the port owner at once and recorded in the port's
//! in-flight queue against the capability's *flow*, an id never reused, so
//! notices about it reach the right capability; when the owner reports it
//! consumed (`Credit`), or it turns out refused or undeliverable, the credit
//! goes back to the lane (`SendCredit`). So a slow receiver stops exactly the
//! lanes that send to it, and what one connection can tie up at one port is
//! one window, however many handles it mints, looks up or drops. Replies travel on
//! send-once capabilities, which never wait for credit; what bounds them is
//! the caller's limit of pending calls, which stay pending until the caller
//! consumes the reply. A client that never reads its replies therefore stalls
//! only its own calls.

mod attenuation;
mod authentication;
mod books;
mod caps;
mod control;
mod lanes;
mod monitor;
mod path;
mod peers;
mod ports;
mod quiet;
mod refusal;
mod registry;
mod remote;
pub mod routing;
pub mod secure;
pub mod session;
mod slab;
#[cfg(test)]
mod tests;
mod time;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use junction_identity::{
    Certificate, NamePattern, RevocationList, Signature, TrustStore, Verified,
};
use junction_road::codec::FrameError;
use junction_road::control::CONTROL_HANDLE;
pub use junction_road::frame::{MAX_CAPS_PER_MESSAGE, credit_cost};
use junction_road::highway::{HighwayFrame, Hops};
use junction_road::{
    Address, Chained, ErrorFrame, Frame, Header, Identity, MAGIC, PROTOCOL_VERSION, Reason, Rights,
    Welcome,
};

use crate::books::Books;
use crate::caps::{CallAt, Cap, CapRef, CapTable, FlowId, ReplyRoute, Target};
use crate::lanes::Lanes;
use crate::path::Orphans;
#[cfg(test)]
use crate::ports::port_key;
use crate::ports::{CONTROL_PORT, PortTable};
pub use crate::refusal::Refusal;
use crate::registry::Registry;
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
    /// Send credits of each lane (one connection's metered capabilities to
    /// one port), in units of
    /// [`credit_cost`]; at least twice the cost of the largest frame.
    pub window: u32,
    /// Capability handles one connection may hold.
    pub max_handles: u32,
    /// Ports one connection may own, its home port included.
    pub max_ports: u32,
    /// Calls one connection may have waiting for a reply.
    pub max_pending_calls: u32,
    /// Names one connection may register (certified or in the development
    /// namespace), so the registry is bounded by the connections.
    pub max_names: u32,
    /// The authorities whose certificates this junction believes.
    pub trust: TrustStore,
    /// Certificates and keys the authority revoked.
    pub revocations: Option<Verified<RevocationList>>,
    /// Names that may be registered without a certificate, for development.
    /// Empty (off) by default.
    pub dev_namespace: Vec<NamePattern>,
    /// How long a new connection may take to deliver its whole Hello frame.
    pub hello_timeout: Duration,
    /// This junction's life among its restarts: greater than in any earlier
    /// one (its start time in Unix seconds), so that what it says now
    /// outranks what it said before.
    pub incarnation: u64,
    /// Junctions whose routes it keeps, at most (the bus's size).
    pub max_junctions: usize,
    /// This junction's key and certificate chain (leaf first, a junction
    /// certificate for `junction`), which seal its link states; `None`
    /// sends them unsealed, which only junctions that trust unsigned
    /// routing take.
    pub junction_identity: Option<(Arc<junction_identity::SecretKey>, Vec<Certificate>)>,
    /// Whether unsealed link states are taken (a bus with no junction keys:
    /// development). Off by default: any neighbour could then describe any
    /// junction's links.
    pub trust_unsigned_routing: bool,
    /// How long a junction that holds capabilities to ports here may stay
    /// unreachable before they are released (and a port's no-senders
    /// notice may fire): long enough to ride out a partition.
    pub export_lease: Duration,
    /// The junction's own user id: it and root may monitor traffic,
    /// payloads included (`None`: only root and certified monitors).
    pub owner_uid: Option<u32>,
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
            max_names: 64,
            trust: TrustStore::new(),
            revocations: None,
            dev_namespace: Vec::new(),
            hello_timeout: Duration::from_secs(10),
            incarnation: 0,
            max_junctions: 4096,
            junction_identity: None,
            trust_unsigned_routing: false,
            export_lease: Duration::from_secs(600),
            owner_uid: None,
        }
    }
}

impl Config {
    /// What is wrong with this junction's own identity, if anything: a key
    /// its certificate does not name, a certificate for another junction id
    /// or role, or no certificate at all.
    pub fn identity_problem(&self) -> Option<String> {
        let (key, chain) = self.junction_identity.as_ref()?;
        let Some(leaf) = chain.first() else {
            return Some("this junction has a key but no certificate chain".into());
        };
        if leaf.body.subject != key.public() {
            return Some("this junction's key is not the one its certificate names".into());
        }
        let wanted = junction_identity::Role::Junction { id: self.junction };
        if leaf.body.role != wanted {
            return Some(format!(
                "this junction's certificate is for {}, but it is configured as junction {}",
                leaf.body.role, self.junction
            ));
        }
        None
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

    #[cfg(test)]
    pub(crate) fn for_tests(serial: u64) -> Self {
        Self {
            key: Key {
                index: serial as u32,
                generation: 0,
            },
            serial,
        }
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
    /// Send `frame` and its payload to the neighbour junction `to` over
    /// their Highway.
    Highway {
        /// The neighbour's junction id.
        to: u16,
        /// The frame.
        frame: HighwayFrame,
        /// Its payload: what a [`HighwayFrame::Forward`] carries, in the
        /// pieces it was put together from (a large message is not copied
        /// behind its headers).
        payload: Chained,
    },
    /// The end-to-end session with junction `peer` has news: a message
    /// handed up, acknowledged, or ended without an acknowledgement (see
    /// [`Core::junction_send`]).
    Session {
        /// The other junction.
        peer: u16,
        /// What happened.
        event: session::SessionEvent,
    },
    /// Traffic this junction sent to junction `to` could not be passed on
    /// at junction `at`: the route broke. Routing picks another as link
    /// states arrive, and the session sends again over it.
    Unroutable {
        /// The junction it was for.
        to: u16,
        /// Where it stopped.
        at: u16,
    },
}

/// What the core holds, counted: for the memory bounds in tests and
/// simulations. Every count is bounded by the limits in [`Config`] (see
/// docs/security.md); none grows with traffic alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Footprint {
    /// Connections attached, shaking hands or ready.
    pub connections: usize,
    /// Ports open, the control port included.
    pub ports: usize,
    /// Capabilities in all tables.
    pub capabilities: usize,
    /// Messages delivered and not yet consumed, in all ports.
    pub in_flight: usize,
    /// Flows whose capability left with messages in flight.
    pub orphan_flows: usize,
    /// Entries in the revocation, budget and expiry books, and port
    /// watchers.
    pub book_entries: usize,
    /// Registered names.
    pub names: usize,
    /// Lanes of send credit, in all connections.
    pub lanes: usize,
    /// Other junctions it keeps an end-to-end session with.
    pub peers: usize,
    /// Imports, exports, calls and lookups between junctions, and remote
    /// frames waiting for room in a session.
    pub remote: usize,
}

/// The junction's state machine. See the module documentation.
#[derive(Debug)]
pub struct Core {
    config: Config,
    conns: Slab<Conn>,
    ports: PortTable,
    registry: Registry,
    books: Books,
    /// Flows whose capability left with messages still in flight.
    orphans: Orphans,
    next_flow: u64,
    out: VecDeque<Output>,
    /// Credit returns gathered per flow: units, messages.
    credit_scratch: Vec<(CapRef, u32, u32)>,
    next_serial: u64,
    /// The time of the input being handled.
    now: Now,
    /// When each connection that has not said Hello yet must have.
    hello_deadlines: FifoTimers<ConnId>,
    /// When proven identities lapse with their certificates.
    identity_expiries: WallTimers<ConnId>,
    /// Warnings a peer can cause at will, rate-limited.
    quiet: quiet::Warnings,
    /// Routes to the other junctions of the bus.
    router: routing::Router,
    /// The other junctions this one exchanges traffic with.
    peers: peers::Peers,
    /// Ports this junction exports and imports, and calls between
    /// junctions.
    remote: remote::Remote,
    /// The port of a send-once capability just used, counted one sender
    /// fewer once its message is delivered.
    used_once: Option<Key>,
    /// The Highways as the shell last reported them, for listings: at most
    /// `max_junctions` ([`Core::set_highways`]).
    highways: Vec<junction_road::control::HighwayInfo>,
    /// The shell's answer to the `Reload` request a connection is about to
    /// make ([`Core::set_reload_answer`]).
    reload_answer: Option<(ConnId, junction_road::control::ControlReply)>,
    /// Monitors, and the traffic counts not kept on connections and ports.
    watch: monitor::Watch,
}

#[derive(Debug)]
struct Conn {
    peer: Peer,
    label: String,
    ready: bool,
    home: u16,
    ports: Vec<u16>,
    caps: CapTable,
    /// Its send credit, one lane per port it sends to.
    lanes: Lanes,
    /// Calls counted as pending until their reply is consumed, or they fail
    /// or are cancelled.
    pending_calls: u32,
    /// Its calls whose reply capability is still out, by tag: where that
    /// capability is, so that cancelling the call can kill it.
    calls: HashMap<u64, CallAt>,
    serial: u64,
    /// What a proof of possession on this connection must sign.
    nonce: [u8; 32],
    /// The identity it proved, and the chain it proved it with.
    identity: Option<(Arc<Identity>, Arc<Vec<Certificate>>)>,
    /// When the first certificate of that chain expires.
    identity_until: u64,
    /// Its one attempt to prove an identity failed (see `authenticate`).
    authentication_failed: bool,
    /// The proof of possession it proved its identity with, over `nonce`.
    proof: Option<Signature>,
    /// What it sent and received.
    traffic: junction_road::monitor::Tally,
}

/// No handle, in an [`ErrorFrame`].
const NO_HANDLE: u32 = u32::MAX;

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
        let mut router = routing::Router::new(
            config.junction,
            config.incarnation.max(1),
            config.max_junctions,
        );
        if let Some((key, chain)) = &config.junction_identity {
            // Misconfigured, every other junction would refuse this one's
            // link states in silence: say so at start.
            if let Some(problem) = config.identity_problem() {
                tracing::error!("{problem}: other junctions will refuse its routes");
            }
            router.sign_with(key.clone(), chain.clone());
        }
        Self {
            conns: Slab::with_limit(u32::MAX),
            ports: PortTable::new(),
            registry: Registry::default(),
            books: Books::new(),
            orphans: Orphans::default(),
            next_flow: 1,
            out: VecDeque::new(),
            credit_scratch: Vec::new(),
            next_serial: 1,
            now,
            hello_deadlines: FifoTimers::new(),
            identity_expiries: WallTimers::new(),
            quiet: quiet::Warnings::default(),
            router,
            peers: peers::Peers::default(),
            remote: remote::Remote::default(),
            used_once: None,
            highways: Vec::new(),
            reload_answer: None,
            watch: monitor::Watch::default(),
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
        let wall = [self.books.next_expiry(), self.identity_expiries.next()]
            .into_iter()
            .flatten()
            .min()
            .map(|at| now.instant_of(at));
        let lease = self.remote.next_lease(self.config.export_lease);
        [
            self.hello_deadlines.next(),
            wall,
            self.peers.next_timeout(),
            lease,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: connections that did not say Hello in time are closed,
    /// identities whose certificates expired are withdrawn, capabilities
    /// whose expiry has come die and their watchers are told.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        self.peers_timeout();
        self.remote_timeout();
        while let Some(conn) = self.hello_deadlines.pop_due(now.instant) {
            if self.conns.get(conn.key()).is_some_and(|c| !c.ready) {
                let timeout = self.config.hello_timeout;
                self.refuse(conn, 0, NO_HANDLE, Refusal::HelloTimeout { timeout });
                self.close(conn, format!("no Hello within {timeout:?}"));
            }
        }
        while let Some((at, conn)) = self.identity_expiries.pop_due(now.unix) {
            self.expire_identity(conn, at);
        }
        while let Some((at, cap)) = self.books.pop_expired(now.unix) {
            self.cap_died(cap.conn, cap.handle, Reason::Expired, |c| {
                c.flow == cap.flow && c.expires_at == Some(at)
            });
        }
    }

    /// Checks that the core's books agree with its tables: sender counts,
    /// credit windows, flows in flight, pending calls, port owners,
    /// registrations. For tests and simulations, after every step; it walks
    /// the whole state.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.ports.check()?;
        let mut senders: HashMap<Key, u32> = HashMap::new();
        let mut in_flight: HashMap<FlowId, u32> = HashMap::new();
        let mut lane_caps: HashMap<(u64, u16), u32> = HashMap::new();
        let mut lane_units: HashMap<(u64, u16), u32> = HashMap::new();
        let window = self.config.window;
        for (_, c) in self.conns.iter() {
            for (_, cap) in c.caps.iter() {
                let port = cap.port();
                if port.index == u32::from(CONTROL_PORT) {
                    continue;
                }
                *senders.entry(port).or_default() += 1;
                if cap.metered() {
                    *lane_caps.entry((c.serial, cap.port_number())).or_default() += 1;
                }
                if cap.in_flight > 0 {
                    in_flight.insert(cap.flow, cap.in_flight);
                }
            }
            if c.pending_calls > self.config.max_pending_calls {
                return Err(format!(
                    "c{} has {} pending calls, above the limit",
                    c.serial, c.pending_calls
                ));
            }
            if c.calls.len() > c.pending_calls as usize {
                return Err(format!(
                    "c{} tracks {} unanswered calls but counts {} pending",
                    c.serial,
                    c.calls.len(),
                    c.pending_calls
                ));
            }
            for (&tag, at) in &c.calls {
                let CallAt::Local(at) = at else {
                    continue;
                };
                let answers = self
                    .conns
                    .get(at.conn.key())
                    .and_then(|callee| callee.caps.get_ref(*at))
                    .is_some_and(|cap| {
                        matches!(cap.reply_to, Some(ReplyRoute::Local { caller, tag: t })
                            if caller.serial == c.serial && t == tag)
                    });
                if !answers {
                    return Err(format!(
                        "c{}'s call {tag} points to no reply capability for it",
                        c.serial
                    ));
                }
            }
        }
        let mut recorded: HashMap<FlowId, (ConnId, u32)> = HashMap::new();
        for (key, port) in self.ports.iter() {
            for entry in &port.in_flight {
                if let Some(at) = entry.flow {
                    recorded.entry(at.flow).or_insert((at.conn, 0)).1 += 1;
                    *lane_units
                        .entry((at.conn.serial, key.index as u16))
                        .or_default() += entry.cost;
                }
            }
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
                None if port.proxy.is_some() => {}
                _ => return Err(format!("port {} outlived its owner", key.index)),
            }
            for at in &port.watchers {
                let watching = self
                    .conns
                    .get(at.conn.key())
                    .and_then(|c| c.caps.get_ref(*at))
                    .is_some_and(|cap| cap.watched && cap.port() == key);
                if !watching {
                    return Err(format!(
                        "port {} keeps a watcher whose capability has gone",
                        key.index
                    ));
                }
            }
        }
        // Every flow's count of messages in flight is what the ports hold
        // for it, whether its capability is still held or has gone; a flow
        // neither held nor orphaned belongs to a connection that has left.
        for (flow, &n) in in_flight.iter().chain(self.orphans.iter()) {
            let held = recorded.get(flow).map_or(0, |r| r.1);
            if held != n {
                return Err(format!(
                    "flow {} counts {n} messages in flight, the ports hold {held}",
                    flow.0
                ));
            }
        }
        for (flow, (conn, _)) in &recorded {
            let accounted = in_flight.contains_key(flow) || self.orphans.get(*flow).is_some();
            if !accounted && self.conns.get(conn.key()).is_some() {
                return Err(format!(
                    "flow {} of a live connection has messages in flight but no capability",
                    flow.0
                ));
            }
        }
        // A lane holds the window less what is in flight on it, counts the
        // metered capabilities to its port, and ends when both are idle.
        for (_, c) in self.conns.iter() {
            for (port, lane) in c.lanes.iter() {
                let key = (c.serial, port);
                let caps = lane_caps.remove(&key).unwrap_or(0);
                let units = lane_units.remove(&key).unwrap_or(0);
                if lane.caps != caps {
                    return Err(format!(
                        "c{}'s lane to port {port} counts {} capabilities, the table holds {caps}",
                        c.serial, lane.caps
                    ));
                }
                if lane.credits + units != window {
                    return Err(format!(
                        "c{}'s lane to port {port} holds {} credits with {units} in flight, not the window of {window}",
                        c.serial, lane.credits
                    ));
                }
                if caps == 0 && units == 0 {
                    return Err(format!(
                        "c{}'s lane to port {port} outlived its capabilities and messages",
                        c.serial
                    ));
                }
            }
        }
        if let Some(((conn, port), _)) = lane_caps.iter().next() {
            return Err(format!(
                "c{conn} holds metered capabilities to port {port} but no lane"
            ));
        }
        for ((conn, port), units) in &lane_units {
            if self.conns.iter().any(|(_, c)| c.serial == *conn) {
                return Err(format!(
                    "c{conn} has {units} units in flight to port {port} but no lane"
                ));
            }
        }
        self.check_books()?;
        for (name, reg) in self.registry.iter() {
            if self.ports.get(reg.port).is_none() {
                return Err(format!("{name} names a dead port"));
            }
        }
        Ok(())
    }

    /// What the core holds now.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            connections: self.conns.len(),
            ports: self.ports.iter().count(),
            capabilities: self.conns.iter().map(|(_, c)| c.caps.len()).sum(),
            in_flight: self.ports.iter().map(|(_, p)| p.in_flight.len()).sum(),
            orphan_flows: self.orphans.iter().count(),
            book_entries: self.books.len()
                + self
                    .ports
                    .iter()
                    .map(|(_, p)| p.watchers.len())
                    .sum::<usize>(),
            names: self.registry.iter().count(),
            lanes: self.conns.iter().map(|(_, c)| c.lanes.len()).sum(),
            peers: self.peers.len(),
            remote: self.remote.len(),
        }
    }

    /// The shell's Highways as they stand, for the next listings: the core
    /// does not see the links' addresses, round trips or bytes, so the
    /// shell reports them before a listing is made. Kept until the next
    /// report; past `max_junctions` entries the rest are dropped.
    pub fn set_highways(&mut self, mut highways: Vec<junction_road::control::HighwayInfo>) {
        highways.truncate(self.config.max_junctions);
        self.highways = highways;
    }

    /// The answer to `conn`'s `Reload` control request, which the shell
    /// carried out (or refused) as the request arrived: reloading reads
    /// files, which the core never does. Used by the next `Reload` from
    /// `conn`; a `Reload` with no answer set is refused.
    pub fn set_reload_answer(&mut self, conn: ConnId, reply: junction_road::control::ControlReply) {
        self.reload_answer = Some((conn, reply));
    }

    /// A Highway to neighbour junction `neighbour` is up (authenticated by
    /// the shell), each hop over it costing `cost`.
    pub fn handle_highway_up(&mut self, neighbour: u16, cost: u32, now: Now) {
        self.now = now;
        self.router.link_up(neighbour, cost);
        self.pump_router();
        self.peers_rerouted();
    }

    /// The Highway to `neighbour` is down.
    pub fn handle_highway_down(&mut self, neighbour: u16, now: Now) {
        self.now = now;
        self.router.link_down(neighbour);
        self.pump_router();
        self.peers_rerouted();
    }

    /// Frames that arrived together from neighbour junction `neighbour`
    /// (one read of a Highway stream): as [`Core::handle_highway_frame`]
    /// for each, except that the sessions they concern are pumped once, at
    /// the end, so that one acknowledgement answers the batch and what it
    /// delivers is written together.
    pub fn handle_highway_frames(
        &mut self,
        neighbour: u16,
        frames: impl IntoIterator<Item = (HighwayFrame, Bytes)>,
        now: Now,
    ) {
        self.peers.batch.get_or_insert_with(Vec::new);
        for (frame, payload) in frames {
            self.handle_highway_frame(neighbour, frame, payload, now);
        }
        self.end_batch();
    }

    /// A frame arrived from neighbour junction `neighbour` over their
    /// Highway.
    pub fn handle_highway_frame(
        &mut self,
        neighbour: u16,
        frame: HighwayFrame,
        payload: Bytes,
        now: Now,
    ) {
        self.now = now;
        let from = neighbour;
        match frame {
            HighwayFrame::Forward { from, to, route } => {
                self.forward(neighbour, from, to, route, payload);
                return;
            }
            HighwayFrame::Unroutable {
                from,
                to,
                at,
                route,
            } => {
                self.unroutable(neighbour, from, to, at, route);
                return;
            }
            HighwayFrame::LinkState(ls) => {
                let checks = routing::Checks {
                    trust: &self.config.trust,
                    revocations: self.config.revocations.as_ref(),
                    trust_unsigned: self.config.trust_unsigned_routing,
                    now: now.unix,
                };
                if let Err(e) = self.router.handle_link_state(from, ls, &checks)
                    && let Some(unlogged) = self.quiet.routing.admit(now.instant)
                {
                    tracing::warn!(
                        neighbour = from,
                        "refused a link state: {e}{}",
                        quiet::more(unlogged)
                    );
                }
            }
        }
        self.pump_router();
        self.peers_rerouted();
    }

    /// The route to junction `to`, if it is reachable: the junctions after
    /// this one, the destination last.
    pub fn route(&mut self, to: u16) -> Option<&routing::Route> {
        self.router.route(to)
    }

    /// Queues what routing has to say to neighbours.
    pub(crate) fn pump_router(&mut self) {
        while let Some((to, ls)) = self.router.poll_transmit() {
            self.out.push_back(Output::Highway {
                to,
                frame: HighwayFrame::LinkState(ls),
                payload: Chained::default(),
            });
        }
    }

    /// Traffic from `from` to `to` came from `neighbour` along `route`: it
    /// is this junction's, or goes on to the next junction on the route, or
    /// goes back to `from` as unroutable. Traffic that did not come the way
    /// its route says, or whose route loops, is dropped.
    fn forward(&mut self, neighbour: u16, from: u16, to: u16, route: Hops, payload: Bytes) {
        let me = self.config.junction;
        let path = route.as_slice();
        let Some(here) = path.iter().position(|&j| j == me) else {
            return self.refuse_traffic(neighbour, "it is not on the route");
        };
        let came_from = if here == 0 { from } else { path[here - 1] };
        if came_from != neighbour || path.last() != Some(&to) || from == me {
            return self.refuse_traffic(neighbour, "it did not come the way its route says");
        }
        match self.router.next_hop(path) {
            Ok(None) => self.session_arrived(from, payload, path.len() == 1),
            Ok(Some(next)) => self.out.push_back(Output::Highway {
                to: next,
                frame: HighwayFrame::Forward { from, to, route },
                payload: payload.into(),
            }),
            Err(routing::RouteBroken::LinkDown { .. }) => {
                // Back the way it came: the junctions before this one,
                // reversed, then its origin.
                let back: Vec<u16> = path[..here].iter().rev().copied().chain([from]).collect();
                if let Some(route) = Hops::new(&back) {
                    self.out.push_back(Output::Highway {
                        to: back[0],
                        frame: HighwayFrame::Unroutable {
                            from,
                            to,
                            at: me,
                            route,
                        },
                        payload: Chained::default(),
                    });
                }
            }
            Err(e) => self.refuse_traffic(neighbour, &e.to_string()),
        }
    }

    /// An unroutable notice on its way back to the junction it concerns.
    fn unroutable(&mut self, neighbour: u16, from: u16, to: u16, at: u16, route: Hops) {
        let me = self.config.junction;
        let path = route.as_slice();
        let Some(here) = path.iter().position(|&j| j == me) else {
            return self.refuse_traffic(neighbour, "it is not on the route");
        };
        let came_from = if here == 0 { at } else { path[here - 1] };
        if came_from != neighbour || path.last() != Some(&from) {
            return self.refuse_traffic(neighbour, "it did not come the way its route says");
        }
        match self.router.next_hop(path) {
            Ok(None) => {
                self.session_unroutable(to);
                self.out.push_back(Output::Unroutable { to, at });
            }
            Ok(Some(next)) => self.out.push_back(Output::Highway {
                to: next,
                frame: HighwayFrame::Unroutable {
                    from,
                    to,
                    at,
                    route,
                },
                payload: Chained::default(),
            }),
            // The way back broke too; routing tells the origin soon enough.
            Err(_) => {}
        }
    }

    /// Traffic a neighbour should not have sent is dropped, logged at most
    /// once a second.
    fn refuse_traffic(&mut self, neighbour: u16, why: &str) {
        if let Some(unlogged) = self.quiet.routing.admit(self.now.instant) {
            tracing::warn!(
                neighbour,
                "dropped traffic from a neighbour junction: {why}{}",
                quiet::more(unlogged)
            );
        }
    }

    /// The next thing the shell must do, if any.
    #[inline]
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.has_dirty() {
            self.transmit_dirty();
        }
        let output = self.out.pop_front()?;
        if let Output::Frame { conn, frame } = &output {
            self.observe(*conn, frame);
        }
        Some(output)
    }

    /// The table of what this junction exports to junction `holder`: a
    /// party that holds capabilities and sends nothing, never a driver
    /// connection; its handle limit is `max_handles`.
    fn new_party(&mut self, holder: u16) -> ConnId {
        let peer = Peer::default();
        self.insert_conn(peer, format!("exports to junction {holder}"))
    }

    /// A new connection arrived; it must deliver a whole Hello frame within
    /// the configured `hello_timeout`, or be closed.
    pub fn handle_connected(&mut self, peer: Peer, now: Now) -> ConnId {
        self.now = now;
        let id = self.insert_conn(peer, String::new());
        self.hello_deadlines
            .push(now.instant + self.config.hello_timeout, id);
        id
    }

    /// A fresh entry in the connection table, with the next serial.
    fn insert_conn(&mut self, peer: Peer, label: String) -> ConnId {
        let nonce = peer.nonce;
        let conn = Conn {
            peer,
            label,
            ready: false,
            home: 0,
            ports: Vec::new(),
            caps: CapTable::new(self.config.max_handles),
            lanes: Lanes::default(),
            pending_calls: 0,
            calls: HashMap::new(),
            serial: self.next_serial,
            nonce,
            identity: None,
            identity_until: 0,
            authentication_failed: false,
            proof: None,
            traffic: Default::default(),
        };
        self.next_serial += 1;
        let serial = conn.serial;
        let key = self
            .conns
            .insert(conn)
            .expect("connection slots are 32-bit; the OS runs out of sockets first");
        ConnId { key, serial }
    }

    /// The connection's reader could not make a frame out of its bytes.
    pub fn handle_frame_error(&mut self, conn: ConnId, error: &FrameError) {
        let code = match error {
            FrameError::TooLarge { .. } => junction_road::ErrorCode::FrameTooLarge,
            _ => junction_road::ErrorCode::BadHeader,
        };
        self.frame(
            conn,
            Header::Error(ErrorFrame {
                req: 0,
                handle: NO_HANDLE,
                tag: 0,
                code,
                message: error.to_string(),
            }),
        );
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
            if self.remote.is_party(conn) {
                continue;
            }
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
            Header::Cancel { tag } => self.cancel(conn, tag),
            Header::Ping { nonce } => self.frame(conn, Header::Pong { nonce }),
            Header::Pong { .. } => {}
            other => self.refuse(
                conn,
                0,
                NO_HANDLE,
                Refusal::UnexpectedFrame {
                    frame: frame_name(&other),
                },
            ),
        }
    }

    fn handshake(&mut self, conn: ConnId, header: Header) {
        let hello = match header {
            Header::Hello(hello) if hello.magic == MAGIC => hello,
            other => {
                let got = frame_name(&other);
                self.refuse(conn, 0, NO_HANDLE, Refusal::HandshakeRequired { got });
                self.close(conn, "no handshake".into());
                return;
            }
        };
        if hello.version != PROTOCOL_VERSION {
            let version = hello.version;
            self.refuse(conn, 0, NO_HANDLE, Refusal::UnsupportedVersion { version });
            self.close(conn, format!("unsupported version {version}"));
            return;
        }
        let Some(home) = self.new_port(conn, true) else {
            self.refuse(conn, 0, NO_HANDLE, Refusal::NoFreePort);
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
        let flow = self.new_flow();
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
            Target::Local(PortTable::control()),
            Rights::SEND,
            None,
            flow,
        ));
        debug_assert_eq!(control, Some(CONTROL_HANDLE));
        self.frame(conn, Header::Welcome(welcome));
    }

    /// A flow id never used before.
    fn new_flow(&mut self) -> FlowId {
        let flow = FlowId(self.next_flow);
        self.next_flow += 1;
        flow
    }

    fn new_port(&mut self, owner: ConnId, home: bool) -> Option<u16> {
        let c = self.conns.get(owner.key())?;
        if c.ports.len() >= self.config.max_ports as usize {
            return None;
        }
        let number = self.ports.open(owner, home)?;
        self.conns.get_mut(owner.key())?.ports.push(number);
        Some(number)
    }

    fn open_port(&mut self, conn: ConnId, req: u32) {
        match self.new_port(conn, false) {
            Some(port) => {
                let address = Address::new(self.config.junction, port);
                self.frame(conn, Header::PortOpened { req, address });
            }
            None => {
                let limit = self.config.max_ports;
                self.refuse(conn, req, NO_HANDLE, Refusal::TooManyPorts { limit });
            }
        }
    }

    /// The key of a live port `number` owned by `conn`.
    fn owned_port(&self, conn: ConnId, number: u16) -> Option<Key> {
        let c = self.conns.get(conn.key())?;
        if !c.ports.contains(&number) {
            return None;
        }
        self.ports.key(number)
    }

    fn close_port(&mut self, conn: ConnId, port: u16) {
        let home = self.conns.get(conn.key()).map(|c| c.home);
        match self.owned_port(conn, port) {
            Some(_) if home == Some(port) => {
                self.refuse(conn, 0, NO_HANDLE, Refusal::HomePort { port })
            }
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
            None => self.refuse(conn, 0, NO_HANDLE, Refusal::UnknownPort { port }),
        }
    }

    fn mint(&mut self, conn: ConnId, req: u32, port: u16, rights: Rights) {
        if !rights.is_valid() {
            self.refuse(conn, req, NO_HANDLE, Refusal::BadRights { rights });
            return;
        }
        let Some(key) = self.owned_port(conn, port) else {
            self.refuse(conn, req, NO_HANDLE, Refusal::UnknownPort { port });
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

    /// Puts a new capability to local `port` into `conn`'s table; `None`
    /// when the table is full.
    fn new_cap(
        &mut self,
        conn: ConnId,
        port: Key,
        rights: Rights,
        reply_to: Option<ReplyRoute>,
    ) -> Option<u32> {
        let flow = self.new_flow();
        self.insert_cap(conn, Cap::new(Target::Local(port), rights, reply_to, flow))
    }

    /// Puts `cap` into `conn`'s table and into the books: sender counts,
    /// lineages, expiries. `None` when the table is full.
    fn insert_cap(&mut self, conn: ConnId, cap: Cap) -> Option<u32> {
        let port = cap.port();
        let flow = cap.flow;
        let expires_at = cap.expires_at;
        let metered = cap.metered();
        let c = self.conns.get_mut(conn.key())?;
        let handle = c.caps.insert(cap)?;
        if metered {
            c.lanes.join(port.index as u16, self.config.window);
        }
        if let Some(p) = self.ports.get_mut(port) {
            p.senders += 1;
        }
        let at = CapRef { conn, handle, flow };
        self.join_books(conn, handle);
        let conns = &self.conns;
        if let Some(when) = expires_at {
            self.books.expire_at(when, at, |when, m| {
                conns
                    .get(m.conn.key())
                    .and_then(|c| c.caps.get_ref(m))
                    .is_some_and(|cap| cap.expires_at == Some(when))
            });
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
            .and_then(|c| c.caps.get_mut(handle))
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
        if self.remote.is_party(conn) {
            self.export_died(conn, handle, reason);
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
            self.refuse(conn, 0, handle, Refusal::UnknownHandle { handle });
        }
    }

    /// Takes a capability out of `conn`'s table and every book. An unused
    /// reply capability fails its call with `reason`.
    fn remove_cap(&mut self, conn: ConnId, handle: u32, reason: Reason) -> Option<Cap> {
        let cap = self.take_cap(conn, handle)?;
        self.release(&cap, reason);
        Some(cap)
    }

    /// Takes a capability out of `conn`'s table; if messages sent on it are
    /// still in flight, its flow lives on until they are settled, so that
    /// its holder still hears what becomes of them.
    fn take_cap(&mut self, conn: ConnId, handle: u32) -> Option<Cap> {
        let c = self.conns.get_mut(conn.key())?;
        let cap = c.caps.remove(handle)?;
        if cap.metered() {
            c.lanes.leave(cap.port_number(), self.config.window);
        }
        if cap.in_flight > 0 {
            self.orphans.adopt(cap.flow, cap.in_flight);
        }
        self.unwatch(conn, handle, &cap);
        self.leave_books(conn, handle, &cap);
        Some(cap)
    }

    /// A capability leaves its table: it no longer watches its port.
    fn unwatch(&mut self, conn: ConnId, handle: u32, cap: &Cap) {
        if cap.watched
            && let Some(p) = self.ports.get_mut(cap.port())
        {
            p.watchers.remove(&CapRef {
                conn,
                handle,
                flow: cap.flow,
            });
        }
    }

    /// One capability to `port` fewer; its owner hears if that was the last
    /// and it asked.
    fn sender_gone(&mut self, port: Key) {
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        p.senders = p.senders.saturating_sub(1);
        if p.senders == 0 && p.proxy.is_some() {
            self.proxy_idle(port);
            return;
        }
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
            self.refuse(conn, 0, NO_HANDLE, Refusal::UnknownPort { port: number });
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
        self.sender_gone(cap.port());
        if let Some(route) = cap.reply_to {
            self.call_failed(route, reason);
        }
    }

    /// The call `route` answers ends without a reply, unless its caller
    /// cancelled it already.
    fn call_failed(&mut self, route: ReplyRoute, reason: Reason) {
        let (caller, tag) = match route {
            ReplyRoute::Local { caller, tag } => (caller, tag),
            ReplyRoute::Remote { junction, call } => {
                return self.remote_call_failed(junction, call, reason);
            }
        };
        let Some(c) = self.conns.get_mut(caller.key()) else {
            return;
        };
        if c.calls.remove(&tag).is_none() {
            return;
        }
        c.pending_calls = c.pending_calls.saturating_sub(1);
        self.frame(caller, Header::CallFailed { tag, reason });
    }

    /// `Cancel`: the caller gives up on call `tag`. It stops counting as
    /// pending at once, and the callee's reply capability dies, so a caller
    /// that times out is never pinned by a callee that holds its replies.
    /// A call already answered (its reply on the way) or unknown is left
    /// alone: the reply, when consumed, ends it.
    fn cancel(&mut self, conn: ConnId, tag: u64) {
        let Some(c) = self.conns.get_mut(conn.key()) else {
            return;
        };
        let Some(at) = c.calls.remove(&tag) else {
            return;
        };
        c.pending_calls = c.pending_calls.saturating_sub(1);
        match at {
            CallAt::Local(reply) => {
                self.cap_died(reply.conn, reply.handle, Reason::Cancelled, |cap| {
                    cap.flow == reply.flow
                });
            }
            CallAt::Remote { junction, call } => self.remote_cancel(junction, call),
        }
        self.frame(
            conn,
            Header::CallFailed {
                tag,
                reason: Reason::Cancelled,
            },
        );
    }

    fn watch(&mut self, conn: ConnId, handle: u32) {
        let now = self.now.unix;
        let Some(cap) = self
            .conns
            .get_mut(conn.key())
            .and_then(|c| c.caps.get_mut(handle))
        else {
            self.refuse(conn, 0, handle, Refusal::UnknownHandle { handle });
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
        // A budget it shares may have been used up by another capability.
        if self.books.exhausted(&cap.budgets) {
            self.cap_died(conn, handle, Reason::Exhausted, |_| true);
            return;
        }
        let at = CapRef {
            conn,
            handle,
            flow: cap.flow,
        };
        self.books.watch_budgets(&cap.budgets, at);
        let port = cap.port();
        match self.ports.get_mut(port) {
            Some(p) if let Some(reason) = p.proxy.and_then(|x| x.dead()) => {
                self.cap_died(conn, handle, reason, |_| true);
            }
            Some(p) => {
                p.watchers.insert(at);
            }
            None => {
                let reason = self.ports.death_reason(port);
                // Told now: later deaths (revocation, expiry) stay quiet.
                self.cap_died(conn, handle, reason, |_| true);
            }
        }
    }

    fn cap(&self, conn: ConnId, handle: u32) -> Option<&Cap> {
        self.conns.get(conn.key())?.caps.get(handle)
    }

    fn home_address(&self, conn: ConnId) -> Address {
        let home = self.conns.get(conn.key()).map_or(0, |c| c.home);
        Address::new(self.config.junction, home)
    }

    /// A port dies: unconsumed messages are reported undeliverable to the
    /// flows they came on, reply capabilities they carried fail their
    /// calls, watchers are told.
    fn kill_port(&mut self, key: Key, reason: Reason) {
        let number = key.index as u16;
        if self.ports.get(key).is_some_and(|p| p.proxy.is_some()) {
            self.remote.dying = Some((number, self.lane_address(number)));
        }
        let Some(port) = self.ports.remove(key, reason) else {
            return;
        };
        self.remote_port_died(key, port.proxy.as_ref(), reason);
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
            let Some(at) = entry.flow else {
                continue;
            };
            let mut count = 1u32;
            let mut units = entry.cost;
            while let Some(next) = port.in_flight.get(i) {
                if next.flow == entry.flow && next.seq == entry.seq + u64::from(count) {
                    count += 1;
                    units += next.cost;
                    i += 1;
                } else {
                    break;
                }
            }
            // The holder hears even if it has dropped the capability since.
            if self.settle(at, count, units, number) {
                self.frame(
                    at.conn,
                    Header::Undeliverable {
                        handle: at.handle,
                        first_seq: entry.seq,
                        count,
                        reason,
                    },
                );
            }
        }
        for at in port.watchers {
            if let Some(cap) = self
                .conns
                .get_mut(at.conn.key())
                .and_then(|c| c.caps.get_ref_mut(at))
                && cap.port() == key
                && cap.dead.is_none()
            {
                // Told once: later deaths (revocation, expiry) stay quiet.
                cap.dead = Some(reason);
                self.frame(
                    at.conn,
                    Header::Dead {
                        handle: at.handle,
                        reason,
                    },
                );
            }
        }
        if !port.names.is_empty() {
            for name in port.names {
                self.registry.remove(&name);
            }
            self.announce_names();
        }
        self.remote.dying = None;
    }

    /// Removes a connection and everything it held. It is taken out first,
    /// so that nothing its ports' deaths cause is addressed to it.
    fn forget(&mut self, conn: ConnId, reason: Reason) {
        let Some(c) = self.conns.remove(conn.key()) else {
            return;
        };
        self.traffic_departs(&c);
        self.remote_caller_gone(conn, &c.calls);
        for &number in &c.ports {
            if let Some(key) = self.ports.key(number) {
                self.kill_port(key, reason);
            }
        }
        let call_reason = match reason {
            Reason::Shutdown => Reason::Shutdown,
            _ => Reason::OwnerGone,
        };
        for (handle, cap) in c.caps.iter() {
            self.unwatch(conn, handle, cap);
            self.leave_books(conn, handle, cap);
            self.release(cap, call_reason);
        }
    }

    fn frame(&mut self, conn: ConnId, header: Header) {
        self.out.push_back(Output::Frame {
            conn,
            frame: Frame::bare(header),
        });
    }

    /// Tells `conn` its request `req` (0 for none) about `handle`
    /// ([`NO_HANDLE`] for none) was refused.
    fn refuse(&mut self, conn: ConnId, req: u32, handle: u32, refusal: Refusal) {
        self.refuse_call(conn, req, handle, 0, refusal);
    }

    /// A refusal that also answers a call with `tag` (0 for none).
    fn refuse_call(&mut self, conn: ConnId, req: u32, handle: u32, tag: u64, refusal: Refusal) {
        self.frame(
            conn,
            Header::Error(ErrorFrame {
                req,
                handle,
                tag,
                code: refusal.code(),
                message: refusal.to_string(),
            }),
        );
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        self.forget(conn, Reason::OwnerGone);
        self.out.push_back(Output::Close { conn, reason });
    }

    fn too_many_handles(&mut self, conn: ConnId, req: u32) {
        let limit = self.config.max_handles;
        self.refuse(conn, req, NO_HANDLE, Refusal::TooManyHandles { limit });
    }
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
        Header::Cancel { .. } => "Cancel",
        Header::IdentityWithdrawn { .. } => "IdentityWithdrawn",
    }
}
