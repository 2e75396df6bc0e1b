//! The Driver's protocol logic as a state machine, with no I/O, no tokio and
//! no clock: frames go in, frames and events come out, as `quinn-proto` is
//! for `quinn`.
//!
//! A [`Machine`] is one connection to a Junction seen from the Driver's side.
//! It owns everything the protocol asks a Driver to remember: the credit
//! balance and sequence counter of every capability handle, which handles
//! move when passed on, the ports this connection owns and the messages
//! handed to the application and not yet consumed, batching of `Credit`
//! acknowledgements, pending calls and pending requests. The tokio shell in
//! this crate ([`crate::Driver`]) keeps one behind a mutex and only moves
//! bytes, wakes tasks and turns events into futures resolving; a simulated
//! harness can drive one directly.
//!
//! # Driving it
//!
//! Methods sort into four kinds, as in `quinn-proto`'s `Connection`:
//!
//! - constructors: [`Machine::new`] queues a `Hello` and waits for the
//!   `Welcome` (reported as [`Event::Welcomed`]); [`Machine::from_welcome`]
//!   starts after a handshake done elsewhere;
//! - input: [`Machine::handle_frame`] for every frame the Junction sent, in
//!   order, and [`Machine::handle_road_closed`] when the Road ends;
//! - application commands: [`Machine::open_port`], [`Machine::mint`],
//!   [`Machine::send`], [`Machine::call`], [`Machine::reply`],
//!   [`Machine::read`], [`Machine::close_port`],
//!   [`Machine::drop_capability`], and the rest; they check what can be
//!   checked locally and queue frames;
//! - output: after any input or command, call [`Machine::poll_transmit`]
//!   until `None` and write the frames in that order, and
//!   [`Machine::poll_event`] until `None` and act on the events.
//!
//! ```
//! use bytes::Bytes;
//! use junction_driver::machine::{Event, Machine};
//! use junction_road::{Address, Frame, Header, Rights, Welcome};
//!
//! let welcome = Welcome {
//!     version: junction_road::PROTOCOL_VERSION,
//!     junction: 1,
//!     home: Address::new(1, 1),
//!     max_frame: 1 << 20,
//!     window: 256,
//!     max_handles: 1024,
//!     max_ports: 64,
//!     max_pending_calls: 64,
//!     nonce: [0; 32],
//! };
//! let mut m = Machine::from_welcome(welcome);
//! let req = m.open_port()?;
//! assert!(matches!(m.poll_transmit(), Some(Frame { header: Header::OpenPort { .. }, .. })));
//! m.handle_frame(Frame::bare(Header::PortOpened { req, address: Address::new(1, 2) }));
//! assert!(matches!(m.poll_event(), Some(Event::PortOpened { .. })));
//! # Ok::<(), junction_driver::machine::CommandError>(())
//! ```
//!
//! # The rules it keeps
//!
//! - `Credit` for a port only ever counts messages the application said it
//!   consumed ([`Machine::read`]). Closing a port credits exactly those, then
//!   sends `ClosePort`; messages for it still unread, or arriving later, are
//!   not credited, so the Junction reports them `Undeliverable` to their
//!   senders. A message for a port this connection never had is credited and
//!   dropped at once.
//! - A send takes its sequence number in the same step that queues its frame.
//! - A capability that moves (send-once, or with a message budget) is gone
//!   once attached to a message (and a send-once one once used): using it
//!   again fails locally with [`CommandError::Moved`] and sends nothing.

use std::collections::VecDeque;

use bytes::Bytes;
use junction_road::control::CONTROL_HANDLE;
use junction_road::frame::{MAX_CAPS_PER_MESSAGE, credit_cost};
use junction_road::{
    Address, Call, Deliver, ErrorCode, Frame, Granted, Header, Hello, MAGIC, PROTOCOL_VERSION,
    Reason, Rights, Send, Welcome,
};
use rustc_hash::FxHashMap;

/// Room kept in every frame for its header (with up to 64 capabilities):
/// a payload may be at most `max_frame` minus this.
pub const FRAME_ALLOWANCE: usize = 1024;

/// Replies are acknowledged in batches of this many at most, or at once
/// when the Junction asks.
const HOME_ACK_BATCH: u32 = 32;

/// How many dropped handles keep their address for later `Undeliverable`
/// notices: a bounded memory, so a notice after a drop can still say where
/// the messages were going.
const REMEMBERED_DROPS: usize = 256;

/// One connection's protocol state, seen from the Driver (see the module
/// documentation for how to drive it).
#[derive(Debug)]
pub struct Machine {
    welcome: Option<Welcome>,
    closed: Option<String>,
    /// Keys are ids this driver or its junction chose: a fast non-keyed
    /// hash is safe.
    caps: FxHashMap<u32, Cap>,
    /// Send credit, one lane per port this connection sends to: every
    /// metered capability to the port spends from it.
    lanes: FxHashMap<Address, Lane>,
    /// Recently dropped handles and the port each reached, newest last.
    dropped: VecDeque<(u32, Address)>,
    ports: FxHashMap<u16, PortState>,
    requests: FxHashMap<u32, Request>,
    calls: FxHashMap<u64, CallState>,
    /// Replies delivered and not yet acknowledged with `Credit`.
    home_acks: u32,
    next_req: u32,
    next_tag: u64,
    transmits: VecDeque<Frame>,
    events: VecDeque<Event>,
}

/// One lane of send credit, kept by the rule the Junction keeps it by (see
/// docs/protocol.md, section 7.2): it starts with the window the first
/// capability to its port brings, and is forgotten when no capability sends
/// on it and all its credit is back.
#[derive(Debug, Clone, Copy)]
struct Lane {
    credits: u32,
    caps: u32,
}

/// What the machine knows of one capability handle.
#[derive(Debug, Clone, Copy)]
struct Cap {
    rights: Rights,
    address: Address,
    /// The sequence number the next `Send`/`Call` on it takes.
    seq: u64,
    moves: bool,
    /// It moved away (passed on, or a send-once one used): not held any more.
    gone: bool,
    dead: Option<Reason>,
    watching: bool,
}

impl Cap {
    fn new(rights: Rights, address: Address, moves: bool) -> Self {
        Self {
            rights,
            address,
            seq: 0,
            moves,
            gone: false,
            dead: None,
            watching: false,
        }
    }

    fn granted(g: &Granted) -> Self {
        // A send-once capability moves whatever the Junction says.
        Self::new(
            g.rights,
            g.address,
            g.moves || g.rights.contains(Rights::SEND_ONCE),
        )
    }

    /// Whether sending on it spends its lane's credit.
    fn metered(&self) -> bool {
        !self.rights.contains(Rights::SEND_ONCE) && self.address.port != 0
    }
}

#[derive(Debug, Clone, Copy)]
enum PortState {
    /// Open: messages handed to the application and how many of them it
    /// consumed since the last `Credit`, with their cost.
    Open {
        unread: u32,
        consumed: u32,
        consumed_cost: u32,
    },
    /// `ClosePort` sent, `PortClosed` not yet received: what arrives for it
    /// is dropped uncredited.
    Closing,
}

#[derive(Debug, Clone, Copy)]
enum Request {
    OpenPort,
    Mint {
        address: Address,
        rights: Rights,
        moves: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Waiting,
    /// The application gave up (a timeout); the Junction still counts it.
    Abandoned,
}

/// A snapshot of what the machine knows of a capability handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapabilityState {
    /// Its rights.
    pub rights: Rights,
    /// The port it reaches, for diagnostics.
    pub address: Address,
    /// Send credit units left.
    pub credits: u32,
    /// The sequence number its next message will take.
    pub next_seq: u64,
    /// Whether it moves when passed on (send-once, or a message budget).
    pub moves: bool,
    /// Whether it moved away already: this connection no longer holds it.
    pub gone: bool,
    /// Why it is dead, if the machine learnt that it is.
    pub dead: Option<Reason>,
}

/// What the application must learn of, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake is done (only for a machine made with [`Machine::new`]).
    Welcomed(Welcome),
    /// A message for an open port. Once the application has consumed it,
    /// it must call [`Machine::read`] (or close the port). Its capabilities
    /// are now held; its `reply` handle answers it with [`Machine::reply`].
    Delivered {
        /// The delivery header: port, origin, capabilities, reply, ack.
        deliver: Deliver,
        /// The payload.
        payload: Bytes,
    },
    /// The reply to a call; the call is over. Its acknowledgement is the
    /// machine's business.
    Replied {
        /// The call's tag, as [`Machine::call`] returned it.
        tag: u64,
        /// The delivery header of the reply.
        deliver: Deliver,
        /// The reply's payload.
        payload: Bytes,
    },
    /// A call will get no reply; it is over.
    CallFailed {
        /// The call's tag.
        tag: u64,
        /// Why.
        reason: Reason,
    },
    /// The Junction refused a call's frame; it is over.
    CallRefused {
        /// The call's tag.
        tag: u64,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// An `open_port` request succeeded.
    PortOpened {
        /// The request id [`Machine::open_port`] returned.
        req: u32,
        /// The new port.
        address: Address,
    },
    /// A `mint` or `attenuate` request succeeded: a new handle.
    Minted {
        /// The request id.
        req: u32,
        /// The new handle.
        handle: u32,
        /// Its rights.
        rights: Rights,
        /// The port it reaches.
        address: Address,
        /// Whether it moves when passed on.
        moves: bool,
    },
    /// The Junction refused a request.
    Refused {
        /// The request id.
        req: u32,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// Send credit came back to the lane to a port: a send on any handle
    /// to it that failed with [`CommandError::NoCredit`] may succeed now.
    SendCredit {
        /// The port.
        port: Address,
        /// The lane's balance now.
        credits: u32,
    },
    /// A held capability is dead (a `Dead` frame, or an `Undeliverable`
    /// that says so). Sends on it fail from now on.
    Dead {
        /// The handle.
        handle: u32,
        /// Why.
        reason: Reason,
    },
    /// Messages sent on a handle were not delivered; reported even when the
    /// handle was dropped since.
    Undeliverable {
        /// The handle they were sent on.
        handle: u32,
        /// The port they were for, when the machine still knows it.
        address: Option<Address>,
        /// The sequence number of the first, as [`Machine::send`] returned it.
        first_seq: u64,
        /// How many consecutive messages.
        count: u32,
        /// Why.
        reason: Reason,
    },
    /// No capability to this owned port is left (answers
    /// [`Machine::watch_senders`] once).
    NoSenders {
        /// The port number.
        port: u16,
    },
    /// An owned port is closed; the machine forgot it.
    PortClosed {
        /// The port number.
        port: u16,
        /// Why.
        reason: Reason,
    },
    /// The answer to [`Machine::ping`].
    Pong {
        /// The nonce `ping` returned.
        nonce: u64,
    },
    /// The Junction reported an error that answers no request or call.
    Notice {
        /// The handle concerned, if any.
        handle: Option<u32>,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// The connection is over; every pending request and call ends with it,
    /// and commands fail with [`CommandError::Closed`].
    Closed {
        /// What happened, for people.
        reason: String,
    },
    /// The Junction took this connection's proven identity away (its
    /// certificate was revoked or expired), and the names it registered.
    IdentityWithdrawn {
        /// The names lost with it.
        names: Vec<junction_identity::ServiceName>,
        /// Why, for people.
        reason: String,
    },
}

/// Why a command was refused locally; nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The handshake is not done yet.
    #[error("the handshake with the junction is not done yet; wait for the Welcome")]
    NotWelcomed,
    /// The connection is over.
    #[error("the connection to the junction is closed: {reason}")]
    Closed {
        /// What happened.
        reason: String,
    },
    /// The handle is not one this connection holds.
    #[error("handle {handle} is not a capability this connection holds")]
    UnknownHandle {
        /// The handle.
        handle: u32,
    },
    /// The port is not one this connection has open.
    #[error("port {port} is not a port this connection has open")]
    UnknownPort {
        /// The port number.
        port: u16,
    },
    /// The capability has too little send credit: wait for
    /// [`Event::SendCredit`] on the handle and try again.
    #[error(
        "handle {handle} has {available} send credits and this message costs {needed}; wait for the receiver to catch up"
    )]
    NoCredit {
        /// The handle.
        handle: u32,
        /// What the message costs.
        needed: u32,
        /// What is left.
        available: u32,
    },
    /// The capability is dead.
    #[error("capability {handle} is dead: {reason}")]
    Dead {
        /// The handle.
        handle: u32,
        /// Why.
        reason: Reason,
    },
    /// The capability moved away already.
    #[error(
        "capability {handle} is no longer held here: it moves (send-once, or with a message budget) and was already used up or attached to a message; get a new one"
    )]
    Moved {
        /// The handle.
        handle: u32,
    },
    /// An attached capability lacks the grant right.
    #[error("capability {handle} has rights {rights} without grant, so it cannot be passed on")]
    NotGrantable {
        /// Its handle.
        handle: u32,
        /// Its rights.
        rights: Rights,
    },
    /// The capability list is not one the Junction would take.
    #[error("bad capability list: {detail}")]
    BadCapabilityList {
        /// What is wrong with it.
        detail: String,
    },
    /// The payload does not fit in one frame.
    #[error(
        "a payload of {len} bytes is larger than the {max} bytes one message may carry; send it in parts"
    )]
    TooLarge {
        /// Its length.
        len: usize,
        /// The most one message may carry.
        max: usize,
    },
    /// As many calls are pending as the Junction allows.
    #[error("{max} calls are waiting for replies, the limit; read replies before calling again")]
    TooManyPendingCalls {
        /// The limit from the Welcome.
        max: u32,
    },
}

impl Machine {
    /// A machine that starts the handshake: the first transmit is a `Hello`
    /// with `label` and `max_frame` (the largest frame this Driver accepts).
    /// Feed it the Junction's answer; a `Welcome` gives [`Event::Welcomed`],
    /// a refusal [`Event::Closed`].
    pub fn new(label: String, max_frame: u32) -> Self {
        let mut machine = Self::empty();
        machine
            .transmits
            .push_back(Frame::bare(Header::Hello(Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                max_frame,
                label,
            })));
        machine
    }

    /// A machine for a connection whose handshake is done.
    pub fn from_welcome(welcome: Welcome) -> Self {
        let mut machine = Self::empty();
        machine.welcomed(welcome);
        machine
    }

    fn empty() -> Self {
        Self {
            welcome: None,
            closed: None,
            caps: FxHashMap::default(),
            lanes: FxHashMap::default(),
            dropped: VecDeque::new(),
            ports: FxHashMap::default(),
            requests: FxHashMap::default(),
            calls: FxHashMap::default(),
            home_acks: 0,
            next_req: 1,
            next_tag: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    fn welcomed(&mut self, welcome: Welcome) {
        // Handle 0 reaches the control port: unmetered, never dropped.
        self.caps.insert(
            CONTROL_HANDLE,
            Cap::new(Rights::SEND, Address::new(welcome.junction, 0), false),
        );
        self.welcome = Some(welcome);
    }

    // Getters.

    /// The Welcome, once the handshake is done.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// Why the connection is over, if it is.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// What the machine knows of a handle this connection holds.
    pub fn capability(&self, handle: u32) -> Option<CapabilityState> {
        self.caps.get(&handle).map(|c| CapabilityState {
            rights: c.rights,
            address: c.address,
            credits: if c.metered() {
                self.lanes.get(&c.address).map_or(0, |l| l.credits)
            } else {
                u32::from(!c.gone)
            },
            next_seq: c.seq,
            moves: c.moves,
            gone: c.gone,
            dead: c.dead,
        })
    }

    /// Calls waiting for their answer, abandoned ones included (the
    /// Junction counts them until they end).
    pub fn pending_calls(&self) -> usize {
        self.calls.len()
    }

    /// The largest payload one message may carry.
    pub fn max_payload(&self) -> usize {
        self.welcome.as_ref().map_or(0, |w| {
            (w.max_frame as usize).saturating_sub(FRAME_ALLOWANCE)
        })
    }

    // Output.

    /// The next frame to write to the Junction, in order.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// The next thing the application must learn of, in order.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // Input.

    /// Takes one frame from the Junction.
    pub fn handle_frame(&mut self, frame: Frame) {
        if self.closed.is_some() {
            return;
        }
        let Frame { header, payload } = frame;
        let Some(welcome) = &self.welcome else {
            match header {
                Header::Welcome(w) => {
                    self.welcomed(w.clone());
                    self.events.push_back(Event::Welcomed(w));
                }
                Header::Error(e) => {
                    self.close(format!("the junction refused the handshake: {}", e.message))
                }
                other => self.close(format!(
                    "the junction refused the handshake: expected a Welcome, got {other:?}"
                )),
            }
            return;
        };
        let home = welcome.home.port;
        match header {
            Header::Deliver(d) if d.tag != 0 && d.port == home => self.reply_arrived(d, payload),
            Header::Deliver(d) => self.deliver(d, payload),
            Header::SendCredit { port, count } => {
                if let Some(lane) = self.lanes.get_mut(&port) {
                    lane.credits = lane.credits.saturating_add(count);
                    let credits = lane.credits;
                    self.end_lane_if_idle(port);
                    self.events.push_back(Event::SendCredit { port, credits });
                }
            }
            Header::CallFailed { tag, reason } => {
                if self.calls.remove(&tag) == Some(CallState::Waiting) {
                    self.events.push_back(Event::CallFailed { tag, reason });
                }
            }
            Header::Undeliverable {
                handle,
                first_seq,
                count,
                reason,
            } => {
                let address = match self.caps.get(&handle) {
                    Some(cap) => Some(cap.address),
                    None => self
                        .dropped
                        .iter()
                        .rev()
                        .find(|(h, _)| *h == handle)
                        .map(|&(_, a)| a),
                };
                self.mark_dead(handle, reason);
                self.events.push_back(Event::Undeliverable {
                    handle,
                    address,
                    first_seq,
                    count,
                    reason,
                });
            }
            Header::Dead { handle, reason } => self.mark_dead(handle, reason),
            Header::PortOpened { req, address } => match self.requests.remove(&req) {
                Some(Request::OpenPort) => {
                    self.ports.insert(
                        address.port,
                        PortState::Open {
                            unread: 0,
                            consumed: 0,
                            consumed_cost: 0,
                        },
                    );
                    self.events.push_back(Event::PortOpened { req, address });
                }
                other => {
                    tracing::debug!(req, ?other, "a PortOpened answered no OpenPort");
                    if let Some(request) = other {
                        self.requests.insert(req, request);
                    }
                }
            },
            Header::Minted {
                req,
                handle,
                credits,
            } => match self.requests.remove(&req) {
                Some(Request::Mint {
                    address,
                    rights,
                    moves,
                }) => {
                    self.hold_one(handle, Cap::new(rights, address, moves), credits);
                    self.events.push_back(Event::Minted {
                        req,
                        handle,
                        rights,
                        address,
                        moves,
                    });
                }
                other => {
                    // Nobody waits for this handle: give it back.
                    tracing::debug!(req, ?other, "a Minted answered no Mint");
                    if let Some(request) = other {
                        self.requests.insert(req, request);
                    }
                    self.transmits
                        .push_back(Frame::bare(Header::Drop { handle }));
                }
            },
            Header::PortClosed { port, reason } => {
                self.ports.remove(&port);
                self.events.push_back(Event::PortClosed { port, reason });
            }
            Header::Error(e) => {
                if e.req != 0 {
                    if self.requests.remove(&e.req).is_some() {
                        self.events.push_back(Event::Refused {
                            req: e.req,
                            code: e.code,
                            message: e.message,
                        });
                    }
                } else if e.tag != 0 {
                    if self.calls.remove(&e.tag) == Some(CallState::Waiting) {
                        self.events.push_back(Event::CallRefused {
                            tag: e.tag,
                            code: e.code,
                            message: e.message,
                        });
                    }
                } else {
                    self.events.push_back(Event::Notice {
                        handle: (e.handle != u32::MAX).then_some(e.handle),
                        code: e.code,
                        message: e.message,
                    });
                }
            }
            Header::Ping { nonce } => self
                .transmits
                .push_back(Frame::bare(Header::Pong { nonce })),
            Header::Pong { nonce } => self.events.push_back(Event::Pong { nonce }),
            Header::NoSenders { port } => self.events.push_back(Event::NoSenders { port }),
            Header::Goodbye { reason } => {
                self.close(format!("the junction said goodbye: {reason}"))
            }
            Header::IdentityWithdrawn { names, reason } => self
                .events
                .push_back(Event::IdentityWithdrawn { names, reason }),
            other => tracing::debug!(?other, "ignored an unexpected frame"),
        }
    }

    /// The Road is gone (end of stream or a broken frame): the connection
    /// is over.
    pub fn handle_road_closed(&mut self, reason: String) {
        if self.closed.is_none() {
            self.close(reason);
        }
    }

    fn close(&mut self, reason: String) {
        self.closed = Some(reason.clone());
        self.requests.clear();
        self.calls.clear();
        self.ports.clear();
        self.transmits.clear();
        self.events.push_back(Event::Closed { reason });
    }

    /// A reply on the home port: acknowledged in batches, whoever waits.
    fn reply_arrived(&mut self, d: Deliver, payload: Bytes) {
        let (home, max_pending) = match &self.welcome {
            Some(w) => (w.home.port, w.max_pending_calls),
            None => return,
        };
        self.home_acks += 1;
        if d.ack || self.home_acks >= (max_pending / 4).clamp(1, HOME_ACK_BATCH) {
            let count = std::mem::take(&mut self.home_acks);
            self.transmits
                .push_back(Frame::bare(Header::Credit { port: home, count }));
        }
        match self.calls.remove(&d.tag) {
            Some(CallState::Waiting) => {
                self.hold(&d.caps);
                self.events.push_back(Event::Replied {
                    tag: d.tag,
                    deliver: d,
                    payload,
                });
            }
            // Late (abandoned) or unknown: nobody takes its capabilities.
            _ => self.give_back(&d.caps, None),
        }
    }

    fn deliver(&mut self, d: Deliver, payload: Bytes) {
        match self.ports.get_mut(&d.port) {
            Some(PortState::Open { unread, .. }) => {
                *unread = unread.saturating_add(1);
                self.hold(&d.caps);
                self.events.push_back(Event::Delivered {
                    deliver: d,
                    payload,
                });
            }
            Some(PortState::Closing) => {
                // Not credited: when the Junction handles our ClosePort it
                // tells the sender, and removes a call's reply capability.
                self.give_back(&d.caps, None);
            }
            None => {
                // A port this connection never had (or its home port outside
                // a call): consumed and dropped.
                tracing::debug!(
                    port = d.port,
                    "dropped a message for a port with no receiver"
                );
                self.transmits.push_back(Frame::bare(Header::Credit {
                    port: d.port,
                    count: 1,
                }));
                self.give_back(&d.caps, d.reply);
            }
        }
    }

    /// Records capabilities handed over in a delivery.
    fn hold(&mut self, caps: &[Granted]) {
        for g in caps {
            self.hold_one(g.handle, Cap::granted(g), g.credits);
        }
    }

    /// Records a new capability; a metered one joins its port's lane, which
    /// starts with `window` if this connection has none.
    fn hold_one(&mut self, handle: u32, cap: Cap, window: u32) {
        if cap.metered() {
            self.lanes
                .entry(cap.address)
                .or_insert(Lane {
                    credits: window,
                    caps: 0,
                })
                .caps += 1;
        }
        if let Some(old) = self.caps.insert(handle, cap) {
            // The Junction reused a handle the application had not dropped
            // yet; the old capability is gone from its table.
            self.left(&old);
        }
    }

    /// A capability is no longer held (dropped, moved, used up): it stops
    /// counting in its lane.
    fn left(&mut self, cap: &Cap) {
        if cap.metered() && !cap.gone {
            if let Some(lane) = self.lanes.get_mut(&cap.address) {
                lane.caps = lane.caps.saturating_sub(1);
            }
            self.end_lane_if_idle(cap.address);
        }
    }

    /// Forgets a lane with no capability and all its credit back, as the
    /// Junction does.
    fn end_lane_if_idle(&mut self, port: Address) {
        let window = self.welcome.as_ref().map_or(0, |w| w.window);
        if self
            .lanes
            .get(&port)
            .is_some_and(|l| l.caps == 0 && l.credits >= window)
        {
            self.lanes.remove(&port);
        }
    }

    /// Drops capabilities of a message nobody will see.
    fn give_back(&mut self, caps: &[Granted], reply: Option<u32>) {
        for handle in caps.iter().map(|g| g.handle).chain(reply) {
            self.transmits
                .push_back(Frame::bare(Header::Drop { handle }));
        }
    }

    fn mark_dead(&mut self, handle: u32, reason: Reason) {
        if let Some(cap) = self.caps.get_mut(&handle)
            && cap.dead.is_none()
        {
            cap.dead = Some(reason);
            self.events.push_back(Event::Dead { handle, reason });
        }
    }

    // Application commands.

    fn check_open(&self) -> Result<&Welcome, CommandError> {
        if let Some(reason) = &self.closed {
            return Err(CommandError::Closed {
                reason: reason.clone(),
            });
        }
        self.welcome.as_ref().ok_or(CommandError::NotWelcomed)
    }

    fn request(&mut self, request: Request, header: impl FnOnce(u32) -> Header) -> u32 {
        let req = self.next_req;
        // Ids wrap after four billion requests; 0 means "no request".
        self.next_req = self.next_req.checked_add(1).unwrap_or(1);
        self.requests.insert(req, request);
        self.transmits.push_back(Frame::bare(header(req)));
        req
    }

    /// Asks for a new port. Answered by [`Event::PortOpened`] or
    /// [`Event::Refused`] with the returned request id.
    pub fn open_port(&mut self) -> Result<u32, CommandError> {
        self.check_open()?;
        Ok(self.request(Request::OpenPort, |req| Header::OpenPort { req }))
    }

    /// Asks for a capability to an open port with `rights`. Answered by
    /// [`Event::Minted`] or [`Event::Refused`].
    pub fn mint(&mut self, port: u16, rights: Rights) -> Result<u32, CommandError> {
        let junction = self.check_open()?.junction;
        if !matches!(self.ports.get(&port), Some(PortState::Open { .. })) {
            return Err(CommandError::UnknownPort { port });
        }
        let request = Request::Mint {
            address: Address::new(junction, port),
            rights,
            moves: rights.contains(Rights::SEND_ONCE),
        };
        Ok(self.request(request, |req| Header::Mint { req, port, rights }))
    }

    /// Asks for a narrower capability from `handle` (see
    /// [`junction_road::Attenuate`]). One with a message budget, or
    /// send-once, moves when passed on. Answered by [`Event::Minted`] or
    /// [`Event::Refused`].
    pub fn attenuate(
        &mut self,
        handle: u32,
        rights: Rights,
        expires_at: Option<u64>,
        max_messages: Option<u32>,
        revocable: bool,
    ) -> Result<u32, CommandError> {
        self.check_open()?;
        let cap = self.held(handle)?;
        // A budget is inherited when none is named: an original that moves
        // (it cannot be send-once: those are not attenuated) has one.
        let request = Request::Mint {
            address: cap.address,
            rights,
            moves: max_messages.is_some() || cap.moves || rights.contains(Rights::SEND_ONCE),
        };
        Ok(self.request(request, |req| {
            Header::Attenuate(junction_road::Attenuate {
                req,
                handle,
                rights,
                expires_at,
                max_messages,
                revocable,
            })
        }))
    }

    /// A capability this connection still holds.
    fn held(&self, handle: u32) -> Result<&Cap, CommandError> {
        match self.caps.get(&handle) {
            None => Err(CommandError::UnknownHandle { handle }),
            Some(cap) if cap.gone => Err(CommandError::Moved { handle }),
            Some(cap) => Ok(cap),
        }
    }

    /// Sends `payload` on `handle` with `caps` attached; returns the
    /// message's sequence number on the handle, which
    /// [`Event::Undeliverable`] refers to. Without enough credit it fails
    /// with [`CommandError::NoCredit`] and queues nothing.
    pub fn send(&mut self, handle: u32, caps: &[u32], payload: Bytes) -> Result<u64, CommandError> {
        self.try_send(handle, caps, &mut { payload })
    }

    /// As [`Machine::send`], but takes the payload out of `payload` only
    /// when it queues the frame: a shell that waits for credit keeps it for
    /// the next try without cloning it.
    pub fn try_send(
        &mut self,
        handle: u32,
        caps: &[u32],
        payload: &mut Bytes,
    ) -> Result<u64, CommandError> {
        self.message(handle, caps, payload, None)
    }

    /// Calls the port behind `handle`; returns the call's tag. The call ends
    /// with exactly one of [`Event::Replied`], [`Event::CallFailed`],
    /// [`Event::CallRefused`] with that tag, or [`Event::Closed`].
    pub fn call(&mut self, handle: u32, caps: &[u32], payload: Bytes) -> Result<u64, CommandError> {
        self.try_call(handle, caps, &mut { payload })
    }

    /// As [`Machine::call`], taking the payload only when the frame is
    /// queued (see [`Machine::try_send`]).
    pub fn try_call(
        &mut self,
        handle: u32,
        caps: &[u32],
        payload: &mut Bytes,
    ) -> Result<u64, CommandError> {
        let max = self.check_open()?.max_pending_calls;
        if self.calls.len() >= max as usize {
            return Err(CommandError::TooManyPendingCalls { max });
        }
        let tag = self.next_tag;
        self.message(handle, caps, payload, Some(tag))?;
        self.next_tag += 1;
        self.calls.insert(tag, CallState::Waiting);
        Ok(tag)
    }

    fn next_tag(&mut self) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        tag
    }

    fn message(
        &mut self,
        handle: u32,
        caps: &[u32],
        payload: &mut Bytes,
        tag: Option<u64>,
    ) -> Result<u64, CommandError> {
        self.check_open()?;
        self.check_size(payload.len())?;
        if !caps.is_empty() {
            // The capability sent on is judged first, then what it carries.
            self.held(handle)?;
            self.check_attachments(handle, caps)?;
        }
        let cap = match self.caps.get_mut(&handle) {
            None => return Err(CommandError::UnknownHandle { handle }),
            Some(cap) if cap.gone => return Err(CommandError::Moved { handle }),
            Some(cap) => cap,
        };
        if let Some(reason) = cap.dead {
            return Err(CommandError::Dead { handle, reason });
        }
        let send_once = cap.rights.contains(Rights::SEND_ONCE);
        let cost = credit_cost(payload.len());
        if cap.metered() {
            let lane = self.lanes.get_mut(&cap.address);
            let available = lane.as_ref().map_or(0, |l| l.credits);
            match lane {
                Some(lane) if lane.credits >= cost => lane.credits -= cost,
                _ => {
                    return Err(CommandError::NoCredit {
                        handle,
                        needed: cost,
                        available,
                    });
                }
            }
        }
        let seq = cap.seq;
        cap.seq += 1;
        if send_once {
            // Used up by this message (send-once is never metered).
            cap.gone = true;
        }
        if !caps.is_empty() {
            self.attached(caps);
        }
        let caps = caps.to_vec();
        let header = match tag {
            Some(tag) => Header::Call(Call { handle, tag, caps }),
            None => Header::Send(Send { handle, caps }),
        };
        self.transmits
            .push_back(Frame::with_payload(header, std::mem::take(payload)));
        Ok(seq)
    }

    fn check_size(&self, len: usize) -> Result<(), CommandError> {
        let max = self.max_payload();
        if len > max {
            return Err(CommandError::TooLarge { len, max });
        }
        Ok(())
    }

    /// Checks a capability list as the Junction will, so that a bad one
    /// costs nothing.
    fn check_attachments(&self, on: u32, caps: &[u32]) -> Result<(), CommandError> {
        if caps.len() > MAX_CAPS_PER_MESSAGE {
            return Err(CommandError::BadCapabilityList {
                detail: format!(
                    "a message carries at most {MAX_CAPS_PER_MESSAGE} capabilities; this one had {}",
                    caps.len()
                ),
            });
        }
        for (i, &handle) in caps.iter().enumerate() {
            if handle == on {
                return Err(CommandError::BadCapabilityList {
                    detail: format!("handle {handle} is the one the message is sent on"),
                });
            }
            if caps[..i].contains(&handle) {
                return Err(CommandError::BadCapabilityList {
                    detail: format!("handle {handle} is listed twice"),
                });
            }
            let cap = self.held(handle)?;
            if !cap.rights.contains(Rights::GRANT) {
                return Err(CommandError::NotGrantable {
                    handle,
                    rights: cap.rights,
                });
            }
        }
        Ok(())
    }

    /// Marks attached capabilities that move as gone.
    fn attached(&mut self, caps: &[u32]) {
        for handle in caps {
            if let Some(&cap) = self.caps.get(handle)
                && cap.moves
                && !cap.gone
            {
                self.left(&cap);
                if let Some(cap) = self.caps.get_mut(handle) {
                    cap.gone = true;
                }
            }
        }
    }

    /// Answers a call on its `reply` handle (from [`Event::Delivered`]).
    /// The machine does not track reply handles: answer each once, or drop
    /// it with [`Machine::drop_reply`].
    pub fn reply(&mut self, reply: u32, caps: &[u32], payload: Bytes) -> Result<(), CommandError> {
        self.check_open()?;
        self.check_size(payload.len())?;
        self.check_attachments(reply, caps)?;
        self.attached(caps);
        let header = Header::Send(Send {
            handle: reply,
            caps: caps.to_vec(),
        });
        self.transmits
            .push_back(Frame::with_payload(header, payload));
        Ok(())
    }

    /// Gives up answering a call: its caller gets `CallFailed` with
    /// [`Reason::ReplyDropped`].
    pub fn drop_reply(&mut self, reply: u32) {
        if self.closed.is_none() {
            self.transmits
                .push_back(Frame::bare(Header::Drop { handle: reply }));
        }
    }

    /// Stops waiting for a call (a timeout) and tells the Junction, which
    /// stops counting it as pending and kills the callee's reply capability
    /// (`Cancel`). The call ends without an event: with its
    /// `CallFailed{Cancelled}`, or with its reply if that was already on the
    /// way, which is then acknowledged and dropped.
    pub fn abandon_call(&mut self, tag: u64) {
        if let Some(state) = self.calls.get_mut(&tag)
            && *state == CallState::Waiting
        {
            *state = CallState::Abandoned;
            if self.closed.is_none() {
                self.transmits
                    .push_back(Frame::bare(Header::Cancel { tag }));
            }
        }
    }

    /// The application no longer holds `handle`: gives it back to the
    /// Junction (unless it moved away already). Later `Undeliverable`
    /// notices for it still come, with its address while remembered.
    pub fn drop_capability(&mut self, handle: u32) {
        if handle == CONTROL_HANDLE {
            return;
        }
        let cap = self.caps.remove(&handle);
        if let Some(cap) = cap {
            self.left(&cap);
            if self.dropped.len() == REMEMBERED_DROPS {
                self.dropped.pop_front();
            }
            self.dropped.push_back((handle, cap.address));
        }
        if self.closed.is_none() && !cap.is_some_and(|c| c.gone) {
            self.transmits
                .push_back(Frame::bare(Header::Drop { handle }));
        }
    }

    /// The application consumed one message of `payload_len` bytes
    /// delivered to `port` ([`Event::Delivered`]), with its `ack` flag:
    /// acknowledges in batches of [`Machine::ack_batch`] credit units, or
    /// at once on `ack`.
    pub fn read(&mut self, port: u16, payload_len: usize, ack: bool) {
        self.consumed(port, 1, credit_cost(payload_len), ack);
    }

    /// The application consumed `count` more messages delivered to `port`,
    /// costing `cost` credit units in all; `ack` if any had its ack flag.
    /// A shell may add reads up itself while their cost stays below
    /// [`Machine::ack_batch`] and none asks for an ack, since no `Credit`
    /// would be due before: one call per batch instead of one per message.
    pub fn consumed(&mut self, port: u16, count: u32, cost: u32, ack: bool) {
        let batch = self.ack_batch();
        if let Some(PortState::Open {
            unread,
            consumed,
            consumed_cost,
        }) = self.ports.get_mut(&port)
        {
            // Reads of messages the machine did not hand out would credit
            // messages the application never had.
            let count = count.min(*unread);
            if count == 0 {
                return;
            }
            *unread -= count;
            *consumed += count;
            *consumed_cost = consumed_cost.saturating_add(cost);
            if ack || *consumed_cost >= batch {
                let count = std::mem::take(consumed);
                *consumed_cost = 0;
                self.transmits
                    .push_back(Frame::bare(Header::Credit { port, count }));
            }
        }
    }

    /// The credit units of messages read after which an ordinary port is
    /// acknowledged: a quarter window (at least 1).
    pub fn ack_batch(&self) -> u32 {
        self.welcome.as_ref().map_or(1, |w| (w.window / 4).max(1))
    }

    /// Messages handed to the application on `port` and not yet read.
    pub fn unread(&self, port: u16) -> u32 {
        match self.ports.get(&port) {
            Some(PortState::Open { unread, .. }) => *unread,
            _ => 0,
        }
    }

    /// Closes an open port: credits exactly the messages read, then sends
    /// `ClosePort`. Messages unread or still to come for it are not
    /// credited; the Junction reports them undeliverable to their senders
    /// and fails their calls. [`Event::PortClosed`] follows.
    pub fn close_port(&mut self, port: u16) {
        if self.closed.is_some() {
            return;
        }
        if let Some(state) = self.ports.get_mut(&port)
            && let PortState::Open { consumed, .. } = *state
        {
            *state = PortState::Closing;
            if consumed > 0 {
                self.transmits.push_back(Frame::bare(Header::Credit {
                    port,
                    count: consumed,
                }));
            }
            self.transmits
                .push_back(Frame::bare(Header::ClosePort { port }));
        }
    }

    /// Asks to hear when the port behind `handle` dies ([`Event::Dead`]);
    /// asking twice sends one `Watch`.
    pub fn watch(&mut self, handle: u32) -> Result<(), CommandError> {
        self.check_open()?;
        self.held(handle)?;
        if let Some(cap) = self.caps.get_mut(&handle)
            && !cap.watching
        {
            cap.watching = true;
            self.transmits
                .push_back(Frame::bare(Header::Watch { handle }));
        }
        Ok(())
    }

    /// Asks to hear once when no capability to the owned `port` is left
    /// ([`Event::NoSenders`]).
    pub fn watch_senders(&mut self, port: u16) -> Result<(), CommandError> {
        self.check_open()?;
        if !matches!(self.ports.get(&port), Some(PortState::Open { .. })) {
            return Err(CommandError::UnknownPort { port });
        }
        self.transmits
            .push_back(Frame::bare(Header::WatchSenders { port }));
        Ok(())
    }

    /// Revokes the revocable capability `handle` and all derived from it.
    /// It watches the handle first, so its own death comes back as
    /// [`Event::Dead`] with [`Reason::Revoked`]; a refusal comes as
    /// [`Event::Notice`].
    pub fn revoke(&mut self, handle: u32) -> Result<(), CommandError> {
        self.watch(handle)?;
        self.transmits
            .push_back(Frame::bare(Header::Revoke { handle }));
        Ok(())
    }

    /// Sends a `Ping`; the [`Event::Pong`] with the returned nonce says the
    /// Junction has handled everything sent before it.
    pub fn ping(&mut self) -> Result<u64, CommandError> {
        self.check_open()?;
        let nonce = self.next_tag();
        self.transmits
            .push_back(Frame::bare(Header::Ping { nonce }));
        Ok(nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_road::ErrorFrame;

    const HOME: u16 = 1;
    const WINDOW: u32 = 16;

    fn welcome() -> Welcome {
        Welcome {
            version: PROTOCOL_VERSION,
            junction: 7,
            home: Address::new(7, HOME),
            max_frame: 1 << 20,
            window: WINDOW,
            max_handles: 1024,
            max_ports: 64,
            max_pending_calls: 8,
            nonce: [0; 32],
        }
    }

    fn transmits(m: &mut Machine) -> Vec<Header> {
        std::iter::from_fn(|| m.poll_transmit())
            .map(|f| f.header)
            .collect()
    }

    fn events(m: &mut Machine) -> Vec<Event> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    /// A machine with an open port 2 and a capability (handle 10) to a
    /// port elsewhere with a full window; output drained.
    fn machine() -> Machine {
        let mut m = Machine::from_welcome(welcome());
        let req = m.open_port().unwrap();
        m.handle_frame(Frame::bare(Header::PortOpened {
            req,
            address: Address::new(7, 2),
        }));
        let req = m.mint(2, Rights::SEND | Rights::GRANT).unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req,
            handle: 10,
            credits: WINDOW,
        }));
        let _ = transmits(&mut m);
        let _ = events(&mut m);
        m
    }

    fn granted(handle: u32, rights: Rights, moves: bool) -> Granted {
        Granted {
            handle,
            rights,
            credits: WINDOW,
            address: Address::new(7, 9),
            moves,
        }
    }

    fn deliver(port: u16, tag: u64, caps: Vec<Granted>, reply: Option<u32>, ack: bool) -> Frame {
        Frame::with_payload(
            Header::Deliver(Deliver {
                port,
                origin: Address::new(7, 5),
                tag,
                reply,
                caps,
                ack,
                identity: None,
            }),
            Bytes::from_static(b"hi"),
        )
    }

    #[test]
    fn handshake_from_frames() {
        let mut m = Machine::new("test".into(), 1 << 20);
        assert!(matches!(transmits(&mut m)[..], [Header::Hello(_)]));
        assert_eq!(m.open_port(), Err(CommandError::NotWelcomed));
        m.handle_frame(Frame::bare(Header::Welcome(welcome())));
        assert!(matches!(events(&mut m)[..], [Event::Welcomed(_)]));
        assert!(m.open_port().is_ok());

        let mut refused = Machine::new("test".into(), 1 << 20);
        refused.handle_frame(Frame::bare(Header::Error(ErrorFrame {
            req: 0,
            handle: u32::MAX,
            tag: 0,
            code: ErrorCode::UnsupportedVersion,
            message: "no".into(),
        })));
        assert!(matches!(events(&mut refused)[..], [Event::Closed { .. }]));
        assert!(matches!(
            refused.open_port(),
            Err(CommandError::Closed { .. })
        ));
    }

    /// Issue 7: every handle to one port spends from one lane, which ends
    /// when no handle uses it and its credit is back, as the Junction's
    /// does.
    #[test]
    fn handles_to_one_port_share_a_lane() {
        let mut m = machine();
        let req = m.mint(2, Rights::SEND).unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req,
            handle: 11,
            credits: WINDOW,
        }));
        let _ = events(&mut m);
        let big = Bytes::from(vec![0u8; 16 * 1024]); // costs 2
        for _ in 0..4 {
            m.send(10, &[], big.clone()).unwrap();
            m.send(11, &[], big.clone()).unwrap();
        }
        assert!(matches!(
            m.send(11, &[], Bytes::new()),
            Err(CommandError::NoCredit { available: 0, .. })
        ));
        assert_eq!(m.capability(10).map(|c| c.credits), Some(0));
        m.drop_capability(10);
        m.drop_capability(11);
        // Credit still owed keeps the lane; once it is all back, it ends.
        m.handle_frame(Frame::bare(Header::SendCredit {
            port: Address::new(7, 2),
            count: WINDOW,
        }));
        assert!(m.lanes.is_empty());
        let req = m.mint(2, Rights::SEND).unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req,
            handle: 12,
            credits: WINDOW,
        }));
        assert_eq!(m.capability(12).map(|c| c.credits), Some(WINDOW));
    }

    #[test]
    fn credits_are_spent_and_come_back() {
        let mut m = machine();
        let big = Bytes::from(vec![0u8; 16 * 1024]); // costs 2
        for seq in 0..8 {
            assert_eq!(m.send(10, &[], big.clone()), Ok(seq));
        }
        assert_eq!(transmits(&mut m).len(), 8);
        // Out of credit: refused locally, nothing queued, no seq taken.
        assert_eq!(
            m.send(10, &[], Bytes::from_static(b"x")),
            Err(CommandError::NoCredit {
                handle: 10,
                needed: 1,
                available: 0
            })
        );
        assert!(m.poll_transmit().is_none());
        // A payload kept by try_send survives the refusal.
        let mut payload = Bytes::from_static(b"keep");
        assert!(m.try_send(10, &[], &mut payload).is_err());
        assert_eq!(&payload[..], b"keep");

        m.handle_frame(Frame::bare(Header::SendCredit {
            port: Address::new(7, 2),
            count: 3,
        }));
        assert_eq!(
            events(&mut m),
            [Event::SendCredit {
                port: Address::new(7, 2),
                credits: 3
            }]
        );
        assert_eq!(m.try_send(10, &[], &mut payload), Ok(8));
        assert!(payload.is_empty());
        assert_eq!(m.capability(10).map(|c| c.credits), Some(2));
        // The control handle is never metered.
        for _ in 0..100 {
            m.call(CONTROL_HANDLE, &[], Bytes::new()).unwrap();
            let tag = m.next_tag - 1;
            m.abandon_call(tag);
            m.handle_frame(Frame::bare(Header::CallFailed {
                tag,
                reason: Reason::Shutdown,
            }));
        }
    }

    #[test]
    fn sequence_numbers_follow_the_frames() {
        // Two senders on one capability: the seq each gets names the frame
        // queued in the same step, whatever the interleaving.
        let mut m = machine();
        let mut sent = Vec::new();
        for i in 0..6u8 {
            let seq = if i % 2 == 0 {
                m.send(10, &[], Bytes::from(vec![i])).unwrap()
            } else {
                m.call(10, &[], Bytes::from(vec![i])).unwrap();
                m.capability(10).unwrap().next_seq - 1
            };
            sent.push((seq, i));
        }
        let frames: Vec<Frame> = std::iter::from_fn(|| m.poll_transmit()).collect();
        for (n, (seq, i)) in sent.into_iter().enumerate() {
            assert_eq!(seq, n as u64);
            assert_eq!(&frames[n].payload[..], &[i]);
        }
    }

    #[test]
    fn port_acks_come_in_quarter_window_batches_or_at_once() {
        let mut m = machine();
        for _ in 0..6 {
            m.handle_frame(deliver(2, 0, vec![], None, false));
        }
        assert_eq!(events(&mut m).len(), 6);
        assert!(
            transmits(&mut m).is_empty(),
            "nothing read, nothing credited"
        );
        for _ in 0..3 {
            m.read(2, 2, false);
        }
        assert!(transmits(&mut m).is_empty());
        m.read(2, 2, false);
        assert_eq!(transmits(&mut m), [Header::Credit { port: 2, count: 4 }]);
        // An ack flag reports at once what was read so far.
        m.read(2, 2, true);
        assert_eq!(transmits(&mut m), [Header::Credit { port: 2, count: 1 }]);
        // A large message fills a batch by its cost alone.
        m.read(2, 64 * 1024, false);
        assert_eq!(transmits(&mut m), [Header::Credit { port: 2, count: 1 }]);
        // A read of nothing delivered credits nothing.
        m.read(2, 2, true);
        assert!(transmits(&mut m).is_empty());
    }

    #[test]
    fn replies_are_acked_on_the_home_port_in_batches() {
        let mut m = machine();
        // max_pending_calls 8: batches of 2.
        let a = m.call(10, &[], Bytes::new()).unwrap();
        let b = m.call(10, &[], Bytes::new()).unwrap();
        let c = m.call(10, &[], Bytes::new()).unwrap();
        let _ = transmits(&mut m);
        m.handle_frame(deliver(HOME, a, vec![], None, false));
        assert!(transmits(&mut m).is_empty());
        m.handle_frame(deliver(HOME, b, vec![], None, false));
        assert_eq!(
            transmits(&mut m),
            [Header::Credit {
                port: HOME,
                count: 2
            }]
        );
        m.handle_frame(deliver(HOME, c, vec![], None, true));
        assert_eq!(
            transmits(&mut m),
            [Header::Credit {
                port: HOME,
                count: 1
            }]
        );
        assert_eq!(events(&mut m).len(), 3);
    }

    #[test]
    fn a_call_ends_exactly_once() {
        let mut m = machine();
        let replied = m.call(10, &[], Bytes::new()).unwrap();
        let failed = m.call(10, &[], Bytes::new()).unwrap();
        let refused = m.call(10, &[], Bytes::new()).unwrap();
        assert_eq!(m.pending_calls(), 3);
        m.handle_frame(deliver(HOME, replied, vec![], None, false));
        m.handle_frame(Frame::bare(Header::CallFailed {
            tag: failed,
            reason: Reason::ReplyDropped,
        }));
        m.handle_frame(Frame::bare(Header::Error(ErrorFrame {
            req: 0,
            handle: 10,
            tag: refused,
            code: ErrorCode::TooManyPendingCalls,
            message: "full".into(),
        })));
        // Anything more about those tags is ignored.
        m.handle_frame(Frame::bare(Header::CallFailed {
            tag: replied,
            reason: Reason::OwnerGone,
        }));
        m.handle_frame(deliver(HOME, failed, vec![], None, false));
        let ends: Vec<u64> = events(&mut m)
            .into_iter()
            .map(|e| match e {
                Event::Replied { tag, .. } => tag,
                Event::CallFailed { tag, .. } => tag,
                Event::CallRefused { tag, .. } => tag,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ends, [replied, failed, refused]);
        assert_eq!(m.pending_calls(), 0);
    }

    #[test]
    fn an_abandoned_call_is_cancelled_and_ends_quietly() {
        let mut m = machine();
        let tag = m.call(10, &[], Bytes::new()).unwrap();
        let _ = transmits(&mut m);
        m.abandon_call(tag);
        assert_eq!(transmits(&mut m), [Header::Cancel { tag }]);
        assert_eq!(m.pending_calls(), 1, "counted until the junction says");
        m.handle_frame(Frame::bare(Header::CallFailed {
            tag,
            reason: Reason::Cancelled,
        }));
        assert!(events(&mut m).is_empty());
        assert_eq!(m.pending_calls(), 0);
    }

    #[test]
    fn an_abandoned_call_still_counts_and_its_late_reply_is_given_back() {
        let mut m = machine();
        let tag = m.call(10, &[], Bytes::new()).unwrap();
        let _ = transmits(&mut m);
        m.abandon_call(tag);
        assert_eq!(transmits(&mut m), [Header::Cancel { tag }]);
        assert_eq!(m.pending_calls(), 1);
        let cap = granted(40, Rights::SEND, false);
        m.handle_frame(deliver(HOME, tag, vec![cap], None, true));
        assert!(events(&mut m).is_empty());
        assert_eq!(
            transmits(&mut m),
            [
                Header::Credit {
                    port: HOME,
                    count: 1
                },
                Header::Drop { handle: 40 }
            ]
        );
        assert_eq!(m.pending_calls(), 0);
    }

    #[test]
    fn pending_calls_are_bounded_by_the_welcome() {
        let mut m = machine();
        for _ in 0..8 {
            m.call(CONTROL_HANDLE, &[], Bytes::new()).unwrap();
        }
        assert_eq!(
            m.call(CONTROL_HANDLE, &[], Bytes::new()),
            Err(CommandError::TooManyPendingCalls { max: 8 })
        );
    }

    #[test]
    fn closing_ends_every_call_and_request() {
        let mut m = machine();
        m.call(10, &[], Bytes::new()).unwrap();
        m.open_port().unwrap();
        m.handle_frame(Frame::bare(Header::Goodbye {
            reason: "bye".into(),
        }));
        assert!(matches!(events(&mut m)[..], [Event::Closed { .. }]));
        assert_eq!(m.pending_calls(), 0);
        assert!(matches!(
            m.send(10, &[], Bytes::new()),
            Err(CommandError::Closed { .. })
        ));
        assert!(m.poll_transmit().is_none());
    }

    /// Race 1: closing a port credits exactly what was read, then closes;
    /// what was unread, or arrives after, is never credited.
    #[test]
    fn closing_a_port_credits_only_what_was_read() {
        let mut m = machine();
        for _ in 0..3 {
            m.handle_frame(deliver(2, 0, vec![], None, false));
        }
        let _ = events(&mut m);
        m.read(2, 2, false);
        m.close_port(2);
        assert_eq!(
            transmits(&mut m),
            [
                Header::Credit { port: 2, count: 1 },
                Header::ClosePort { port: 2 }
            ]
        );
        // A late read of a message the application still held changes
        // nothing.
        m.read(2, 2, true);
        // Still in flight when we closed: dropped uncredited; its
        // capabilities are given back, its reply the junction removes.
        let cap = granted(41, Rights::SEND, false);
        m.handle_frame(deliver(2, 0, vec![cap], Some(42), true));
        assert_eq!(transmits(&mut m), [Header::Drop { handle: 41 }]);
        assert!(events(&mut m).is_empty());
        m.handle_frame(Frame::bare(Header::PortClosed {
            port: 2,
            reason: Reason::PortClosed,
        }));
        assert!(matches!(
            events(&mut m)[..],
            [Event::PortClosed { port: 2, .. }]
        ));
        // Closing twice sends nothing more.
        m.close_port(2);
        assert!(transmits(&mut m).is_empty());
    }

    #[test]
    fn closing_a_port_with_nothing_read_sends_only_close_port() {
        let mut m = machine();
        m.handle_frame(deliver(2, 0, vec![], None, true));
        let _ = events(&mut m);
        m.close_port(2);
        assert_eq!(transmits(&mut m), [Header::ClosePort { port: 2 }]);
    }

    #[test]
    fn a_message_for_an_unknown_port_is_credited_and_dropped() {
        let mut m = machine();
        let cap = granted(43, Rights::SEND, false);
        m.handle_frame(deliver(99, 0, vec![cap], Some(44), false));
        assert!(events(&mut m).is_empty());
        assert_eq!(
            transmits(&mut m),
            [
                Header::Credit { port: 99, count: 1 },
                Header::Drop { handle: 43 },
                Header::Drop { handle: 44 }
            ]
        );
    }

    #[test]
    fn a_granted_capability_that_moves_is_gone_once_attached() {
        let mut m = machine();
        let budget = granted(50, Rights::SEND | Rights::GRANT, true);
        let copy = granted(51, Rights::SEND | Rights::GRANT, false);
        m.handle_frame(deliver(2, 0, vec![budget, copy], None, false));
        let _ = events(&mut m);
        assert!(m.capability(50).unwrap().moves);
        assert!(!m.capability(51).unwrap().moves);
        // Its own sends do not move a budgeted capability.
        m.send(50, &[], Bytes::new()).unwrap();
        m.send(10, &[50, 51], Bytes::new()).unwrap();
        let _ = transmits(&mut m);
        assert!(m.capability(50).unwrap().gone);
        assert!(!m.capability(51).unwrap().gone);
        assert_eq!(
            m.send(50, &[], Bytes::new()),
            Err(CommandError::Moved { handle: 50 })
        );
        assert_eq!(
            m.send(10, &[50], Bytes::new()),
            Err(CommandError::Moved { handle: 50 })
        );
        assert_eq!(
            m.call(10, &[51, 50], Bytes::new()),
            Err(CommandError::Moved { handle: 50 })
        );
        assert_eq!(
            m.reply(77, &[50], Bytes::new()),
            Err(CommandError::Moved { handle: 50 })
        );
        assert!(
            transmits(&mut m).is_empty(),
            "no frame for a moved capability"
        );
        assert_eq!(m.pending_calls(), 0);
        // It left the table with the message: no Drop for it.
        m.drop_capability(50);
        m.drop_capability(51);
        assert_eq!(transmits(&mut m), [Header::Drop { handle: 51 }]);
    }

    #[test]
    fn a_send_once_capability_is_used_up_by_its_message() {
        let mut m = machine();
        let req = m.mint(2, Rights::SEND_ONCE).unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req,
            handle: 60,
            credits: 1,
        }));
        assert!(matches!(
            events(&mut m)[..],
            [Event::Minted {
                handle: 60,
                moves: true,
                ..
            }]
        ));
        let _ = transmits(&mut m);
        m.send(60, &[], Bytes::new()).unwrap();
        assert_eq!(
            m.send(60, &[], Bytes::new()),
            Err(CommandError::Moved { handle: 60 })
        );
        assert_eq!(transmits(&mut m).len(), 1);
        m.drop_capability(60);
        assert!(transmits(&mut m).is_empty());
    }

    #[test]
    fn attenuating_with_a_budget_makes_a_capability_that_moves() {
        let mut m = machine();
        let budget = m
            .attenuate(10, Rights::SEND | Rights::GRANT, None, Some(3), false)
            .unwrap();
        let plain = m
            .attenuate(10, Rights::SEND | Rights::GRANT, Some(99), None, true)
            .unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req: budget,
            handle: 70,
            credits: WINDOW,
        }));
        m.handle_frame(Frame::bare(Header::Minted {
            req: plain,
            handle: 71,
            credits: WINDOW,
        }));
        assert!(m.capability(70).unwrap().moves);
        assert!(!m.capability(71).unwrap().moves);
        assert_eq!(m.capability(70).unwrap().address, Address::new(7, 2));
        // Attenuating a budgeted capability without naming a budget
        // inherits it (found by the simulation): that one moves too.
        let inherited = m
            .attenuate(70, Rights::SEND | Rights::GRANT, None, None, false)
            .unwrap();
        m.handle_frame(Frame::bare(Header::Minted {
            req: inherited,
            handle: 72,
            credits: WINDOW,
        }));
        assert!(m.capability(72).unwrap().moves);
    }

    #[test]
    fn undeliverable_after_a_drop_still_reaches_the_application() {
        let mut m = machine();
        assert_eq!(m.send(10, &[], Bytes::new()), Ok(0));
        m.drop_capability(10);
        assert_eq!(transmits(&mut m).last(), Some(&Header::Drop { handle: 10 }));
        m.handle_frame(Frame::bare(Header::Undeliverable {
            handle: 10,
            first_seq: 0,
            count: 1,
            reason: Reason::PortClosed,
        }));
        assert_eq!(
            events(&mut m),
            [Event::Undeliverable {
                handle: 10,
                address: Some(Address::new(7, 2)),
                first_seq: 0,
                count: 1,
                reason: Reason::PortClosed,
            }]
        );
        // A handle never seen gets its notice too, without an address.
        m.handle_frame(Frame::bare(Header::Undeliverable {
            handle: 12345,
            first_seq: 4,
            count: 2,
            reason: Reason::OwnerGone,
        }));
        assert!(matches!(
            events(&mut m)[..],
            [Event::Undeliverable { address: None, .. }]
        ));
    }

    #[test]
    fn a_dead_capability_refuses_sends_and_is_reported_once() {
        let mut m = machine();
        m.watch(10).unwrap();
        m.watch(10).unwrap();
        assert_eq!(transmits(&mut m), [Header::Watch { handle: 10 }]);
        m.handle_frame(Frame::bare(Header::Dead {
            handle: 10,
            reason: Reason::Revoked,
        }));
        m.handle_frame(Frame::bare(Header::Undeliverable {
            handle: 10,
            first_seq: 0,
            count: 1,
            reason: Reason::Revoked,
        }));
        let ev = events(&mut m);
        assert_eq!(
            ev[0],
            Event::Dead {
                handle: 10,
                reason: Reason::Revoked
            }
        );
        assert!(matches!(ev[1], Event::Undeliverable { .. }));
        assert_eq!(ev.len(), 2);
        assert_eq!(
            m.send(10, &[], Bytes::new()),
            Err(CommandError::Dead {
                handle: 10,
                reason: Reason::Revoked
            })
        );
    }

    #[test]
    fn attachments_are_checked_before_anything_is_spent() {
        let mut m = machine();
        let no_grant = granted(80, Rights::SEND, false);
        m.handle_frame(deliver(2, 0, vec![no_grant], None, false));
        let _ = events(&mut m);
        assert!(matches!(
            m.send(10, &[80], Bytes::new()),
            Err(CommandError::NotGrantable { handle: 80, .. })
        ));
        assert!(matches!(
            m.send(10, &[10], Bytes::new()),
            Err(CommandError::BadCapabilityList { .. })
        ));
        assert_eq!(
            m.send(10, &[999], Bytes::new()),
            Err(CommandError::UnknownHandle { handle: 999 })
        );
        assert_eq!(m.capability(10).unwrap().credits, WINDOW);
        assert_eq!(m.capability(10).unwrap().next_seq, 0);
        assert!(transmits(&mut m).is_empty());
    }
}
