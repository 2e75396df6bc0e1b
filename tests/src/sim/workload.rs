//! Simulated applications: a real driver [`Machine`] per process, and an
//! application on top of it that performs random operations ([`Op`]) and
//! records what it sent and what it learnt, for the oracle.
//!
//! Operations name things by index ("the 3rd capability I hold", taken
//! modulo how many there are), so any sequence of operations is valid
//! whatever state the process is in, and one seed gives one run.
//!
//! Every message carries its id in its payload ([`MsgId`]), so the oracle
//! can follow it through the junction and into its receiver.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use junction_driver::machine::{CommandError, Event, Machine};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest, Listing};
use junction_road::{Address, Frame, Granted, Reason, Rights};

use super::{Ctx, Process, ProcessId, Rng, World};

/// The first bytes of every simulated message's payload.
const PAYLOAD_MAGIC: [u8; 2] = *b"JS";

/// A message's id, unique in a run: the sending process and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    /// The process that sent it.
    pub pid: ProcessId,
    /// Its number among that process's messages, from 0.
    pub n: u64,
}

impl MsgId {
    /// A payload of `len` bytes (at least 18) carrying this id.
    pub fn payload(self, len: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(len.max(18));
        b.put_slice(&PAYLOAD_MAGIC);
        b.put_u64(self.pid as u64);
        b.put_u64(self.n);
        b.resize(len.max(18), 0xA5);
        b.freeze()
    }

    /// The id a simulated message's payload carries; `None` for anything
    /// else (control replies).
    pub fn parse(payload: &[u8]) -> Option<MsgId> {
        let rest = payload.strip_prefix(&PAYLOAD_MAGIC)?;
        let pid = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let n = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
        Some(MsgId {
            pid: usize::try_from(pid).ok()?,
            n,
        })
    }
}

/// What a message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    /// A one-way message.
    Send,
    /// A call with this tag.
    Call {
        /// The call's tag.
        tag: u64,
    },
    /// The reply to a call.
    Reply {
        /// The call it answers.
        call: MsgId,
    },
}

/// A message an application handed to its driver, and the driver queued.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Its id.
    pub id: MsgId,
    /// The handle it was sent on.
    pub handle: u32,
    /// Which capability that handle was at the time, counted by the sender
    /// (a handle number can come back for another capability).
    pub instance: u64,
    /// Its sequence number on the handle.
    pub seq: u64,
    /// What it was.
    pub kind: MsgKind,
    /// The port the capability reaches, as the sender knows it.
    pub target: Address,
    /// Payload length.
    pub len: usize,
}

/// A message an application consumed.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Its id.
    pub id: MsgId,
    /// The port it came to.
    pub port: u16,
    /// The origin the junction stamped.
    pub origin: Address,
}

/// How a call ended, as the application learnt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// A reply came; the reply's id, when it is a simulated message.
    Replied(Option<MsgId>),
    /// The junction said it will get no reply.
    Failed(Reason),
    /// The junction refused the call's frame.
    Refused,
    /// The connection ended first.
    Closed,
    /// The application gave up waiting (a timeout): the driver cancelled
    /// it, and the call ends without another event.
    Abandoned,
}

/// Everything an application recorded, for the oracle.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// Messages it sent, in order.
    pub sent: Vec<Sent>,
    /// Messages it consumed, in order.
    pub consumed: Vec<Consumed>,
    /// How each of its calls ended, by tag (more than one entry is a bug).
    pub call_ends: BTreeMap<u64, Vec<CallEnd>>,
    /// `Undeliverable` notices: handle, first sequence number, count, reason.
    pub undeliverable: Vec<(u32, u64, u32, Reason)>,
    /// Listings the control port answered with, and when.
    pub listings: Vec<(Duration, Listing)>,
    /// Commands the driver refused locally, by kind, for statistics.
    pub refused_locally: u64,
    /// Operations applied.
    pub ops: u64,
    /// The process wrote frames behind its driver's back (a hostile or
    /// broken driver): what it recorded is not what its driver knows, so
    /// only the junction-side checks apply to it.
    pub rogue: bool,
}

/// A capability the application holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    handle: u32,
    instance: u64,
    rights: Rights,
    address: Address,
    /// A revocable root this application made.
    root: bool,
    /// It has a message budget (so it moves when passed on).
    budgeted: bool,
}

/// A message waiting for the application to read it.
#[derive(Debug, Clone)]
struct Unread {
    port: u16,
    id: Option<MsgId>,
    origin: Address,
    len: usize,
    ack: bool,
    reply: Option<u32>,
}

/// A call the application received and owes an answer to.
#[derive(Debug, Clone, Copy)]
struct Owed {
    reply: u32,
    call: Option<MsgId>,
}

/// One random operation of an application. Indices are taken modulo the
/// number of things there are to choose from.
#[derive(Debug, Clone)]
pub enum Op {
    /// Open a port and register it as `sim.p<pid>-<n>` (development namespace).
    OpenPort,
    /// Mint a capability to one of its ports.
    Mint {
        /// Which port.
        port: usize,
        /// Which rights: send, send-once, each with or without grant.
        rights: usize,
    },
    /// Look up another process's registered port.
    Lookup {
        /// Which process (modulo the number of processes).
        pid: usize,
        /// Which of its ports.
        port: usize,
    },
    /// Send on a held capability, passing up to two others along.
    Send {
        /// Which capability.
        cap: usize,
        /// Which capabilities to attach.
        attach: Vec<usize>,
        /// Payload length.
        len: usize,
    },
    /// Call on a held capability.
    Call {
        /// Which capability.
        cap: usize,
        /// Which capabilities to attach.
        attach: Vec<usize>,
    },
    /// Read up to `n` waiting messages, in arrival order; calls among them
    /// are answered at once with probability `answer` percent, else owed.
    Read {
        /// How many.
        n: usize,
        /// Percent of calls answered at once.
        answer: u8,
    },
    /// Answer an owed call, passing a capability along or not.
    Reply {
        /// Which owed call.
        owed: usize,
        /// Which capabilities to attach.
        attach: Vec<usize>,
    },
    /// Drop an owed call's reply capability: its caller hears ReplyDropped.
    DropReply {
        /// Which owed call.
        owed: usize,
    },
    /// Drop a held capability.
    Drop {
        /// Which capability.
        cap: usize,
    },
    /// Make a narrower capability from a held one.
    Attenuate {
        /// Which capability.
        cap: usize,
        /// Keep grant?
        grant: bool,
        /// Expire this many seconds from now.
        expires_in: Option<u64>,
        /// A message budget.
        budget: Option<u32>,
        /// Make it a revocable root.
        revocable: bool,
    },
    /// Revoke a revocable root it made.
    Revoke {
        /// Which root.
        root: usize,
    },
    /// Watch a held capability.
    Watch {
        /// Which capability.
        cap: usize,
    },
    /// Ask to hear when one of its ports has no senders left.
    WatchSenders {
        /// Which port.
        port: usize,
    },
    /// Close one of its ports.
    ClosePort {
        /// Which port.
        port: usize,
    },
    /// Ask the control port for a listing.
    List,
    /// Write one well-framed frame no honest driver would write, chosen
    /// by `seed`, behind the driver's back (see [`Records::rogue`]).
    Raw {
        /// What to write.
        seed: u64,
    },
    /// Answer an owed call with a `Call` on its reply capability, not a
    /// `Send`, behind the driver's back (a rogue): the junction refuses it
    /// and the caller's call fails with `ReplyDropped`.
    ReplyWithCall {
        /// Which owed call.
        owed: usize,
    },
    /// Give up waiting for one of its calls, as a timeout does: the driver
    /// cancels it.
    Abandon {
        /// Which waiting call.
        call: usize,
    },
}

impl Op {
    /// A random operation, weighted towards messages.
    pub fn random(rng: &mut Rng) -> Op {
        let attach = |rng: &mut Rng| -> Vec<usize> {
            match rng.below(10) {
                0..=5 => Vec::new(),
                6..=8 => vec![rng.index(64)],
                _ => vec![rng.index(64), rng.index(64)],
            }
        };
        match rng.below(100) {
            0..=3 => Op::OpenPort,
            4..=9 => Op::Mint {
                port: rng.index(16),
                rights: rng.index(4),
            },
            10..=15 => Op::Lookup {
                pid: rng.index(64),
                port: rng.index(8),
            },
            16..=39 => Op::Send {
                cap: rng.index(64),
                attach: attach(rng),
                len: if rng.chance(10) {
                    16 * 1024 + rng.index(20_000)
                } else {
                    18 + rng.index(40)
                },
            },
            40..=51 => Op::Call {
                cap: rng.index(64),
                attach: attach(rng),
            },
            52..=69 => Op::Read {
                n: 1 + rng.index(8),
                answer: rng.below(100) as u8,
            },
            70..=74 => Op::Reply {
                owed: rng.index(16),
                attach: attach(rng),
            },
            75..=76 => Op::DropReply {
                owed: rng.index(16),
            },
            77..=81 => Op::Drop { cap: rng.index(64) },
            82..=88 => Op::Attenuate {
                cap: rng.index(64),
                grant: rng.chance(60),
                expires_in: rng.chance(30).then(|| rng.below(4)),
                budget: rng.chance(40).then(|| 1 + rng.below(4) as u32),
                revocable: rng.chance(50),
            },
            89..=92 => Op::Revoke { root: rng.index(8) },
            93 => Op::Watch { cap: rng.index(64) },
            94 => Op::WatchSenders {
                port: rng.index(16),
            },
            95..=96 => Op::ClosePort {
                port: rng.index(16),
            },
            97 => Op::Abandon {
                call: rng.index(16),
            },
            _ => Op::List,
        }
    }
}

/// The rights an [`Op::Mint`] chooses from (each also with grant).
const MINT_RIGHTS: [Rights; 2] = [Rights::SEND, Rights::SEND_ONCE];

/// A simulated process: a real driver [`Machine`] and a small application.
#[derive(Debug)]
pub struct Client {
    pid: ProcessId,
    /// The driver state machine.
    pub machine: Machine,
    /// Decides whether the plan makes this process a rogue.
    rogue_seed: u64,
    home: Option<Address>,
    ports: Vec<u16>,
    /// Ports registered under a name, and their names' numbers.
    next_name: u32,
    held: Vec<Held>,
    next_instance: u64,
    unread: VecDeque<Unread>,
    owed: Vec<Owed>,
    /// Requests in flight whose answer needs more than holding the handle.
    requests: BTreeMap<u32, Pending>,
    /// Control calls in flight and what they were.
    control_calls: BTreeMap<u64, ControlKind>,
    /// Its calls to ports still waiting for their end, by tag.
    waiting: Vec<u64>,
    next_msg: u64,
    closed: bool,
    /// Frames written behind the driver's back.
    raw: VecDeque<Frame>,
    /// What it recorded.
    pub records: Records,
}

/// What to do when a request is answered.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// An attenuation: whether it makes a revocable root, whether the new
    /// capability has a budget.
    Attenuate { root: bool, budgeted: bool },
    /// The first capability to a new port: register it.
    Register,
}

#[derive(Debug, Clone, Copy)]
enum ControlKind {
    Register,
    Lookup,
    List,
}

impl Client {
    /// A process that will be `pid` in the world; it starts with a Hello.
    pub fn new(pid: ProcessId) -> Self {
        Self {
            pid,
            machine: Machine::new(format!("sim-{pid}"), 1 << 20),
            // Spread over processes, and fixed by the pid alone.
            rogue_seed: Rng::new(pid as u64).next_u64(),
            home: None,
            ports: Vec::new(),
            next_name: 0,
            held: Vec::new(),
            next_instance: 0,
            unread: VecDeque::new(),
            owed: Vec::new(),
            requests: BTreeMap::new(),
            control_calls: BTreeMap::new(),
            waiting: Vec::new(),
            next_msg: 0,
            closed: false,
            raw: VecDeque::new(),
            records: Records::default(),
        }
    }

    /// The name a process registers its `n`th port under.
    pub fn port_name(pid: ProcessId, n: usize) -> String {
        format!("sim.p{pid}-{n}")
    }

    /// How many capability handles the application believes its connection
    /// holds: those it keeps, the control handle, owed reply handles, and
    /// reply handles of messages it has not read yet.
    pub fn believed_handles(&self) -> usize {
        1 + self.held.len()
            + self.owed.len()
            + self.unread.iter().filter(|u| u.reply.is_some()).count()
    }

    /// The handles behind [`Client::believed_handles`], for diagnostics.
    pub fn believed_handle_list(&self) -> Vec<u32> {
        let mut v: Vec<u32> = std::iter::once(CONTROL_HANDLE)
            .chain(self.held.iter().map(|h| h.handle))
            .chain(self.owed.iter().map(|o| o.reply))
            .chain(self.unread.iter().filter_map(|u| u.reply))
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether the handshake is done and the connection is not over.
    pub fn is_ready(&self) -> bool {
        self.home.is_some() && !self.closed
    }

    /// Whether the application has nothing left to do on its own: nothing
    /// unread, no call owed.
    pub fn is_settled(&self) -> bool {
        self.closed || (self.unread.is_empty() && self.owed.is_empty())
    }

    /// Reads everything waiting and answers every owed call: what a
    /// well-behaved application does before the run is checked.
    pub fn settle(&mut self, rng: &mut Rng) {
        while !self.unread.is_empty() {
            self.read(usize::MAX, 100, rng);
        }
        while !self.owed.is_empty() {
            // A refused reply gives its capability back: the caller hears.
            let _ = self.reply(0, &[]);
        }
    }

    /// Applies one operation.
    pub fn apply(&mut self, op: &Op, ctx: &mut Ctx<'_>, processes: usize) {
        if self.closed || self.home.is_none() {
            return;
        }
        self.records.ops += 1;
        let result = match op {
            Op::OpenPort => self.machine.open_port().map(drop),
            Op::Mint { port, rights } => match self.pick_port(*port) {
                Some(port) => {
                    let mut r = MINT_RIGHTS[rights % MINT_RIGHTS.len()];
                    if (rights / MINT_RIGHTS.len()) % 2 == 1 {
                        r = r | Rights::GRANT;
                    }
                    self.machine.mint(port, r).map(drop)
                }
                None => Ok(()),
            },
            Op::Lookup { pid, port } => {
                let name = Self::port_name(pid % processes.max(1), *port);
                self.control(ControlKind::Lookup, &name, &[])
            }
            Op::Send { cap, attach, len } => self.send(*cap, attach, *len, false),
            Op::Call { cap, attach } => self.send(*cap, attach, 18, true),
            Op::Read { n, answer } => {
                self.read(*n, *answer, ctx.rng);
                Ok(())
            }
            Op::Reply { owed, attach } => {
                if self.owed.is_empty() {
                    Ok(())
                } else {
                    let attach = self.pick_attach(attach, None);
                    self.reply(owed % self.owed.len(), &attach)
                }
            }
            Op::DropReply { owed } => {
                if !self.owed.is_empty() {
                    let o = self.owed.remove(owed % self.owed.len());
                    self.machine.drop_reply(o.reply);
                }
                Ok(())
            }
            Op::Drop { cap } => {
                if let Some(i) = self.pick_cap(*cap) {
                    let h = self.held.remove(i);
                    self.machine.drop_capability(h.handle);
                }
                Ok(())
            }
            Op::Attenuate {
                cap,
                grant,
                expires_in,
                budget,
                revocable,
            } => match self.pick_cap(*cap) {
                Some(i) => {
                    let h = self.held[i];
                    let mut rights = Rights::SEND;
                    if *grant && h.rights.contains(Rights::GRANT) {
                        rights = rights | Rights::GRANT;
                    }
                    let expires_at = expires_in.map(|s| ctx.now.unix + s);
                    let budget = *budget;
                    let r = self
                        .machine
                        .attenuate(h.handle, rights, expires_at, budget, *revocable);
                    if let Ok(req) = &r {
                        let pending = Pending::Attenuate {
                            root: *revocable,
                            budgeted: h.budgeted || budget.is_some(),
                        };
                        self.requests.insert(*req, pending);
                    }
                    r.map(drop)
                }
                None => Ok(()),
            },
            Op::Revoke { root } => {
                let roots: Vec<usize> = (0..self.held.len())
                    .filter(|&i| self.held[i].root)
                    .collect();
                if roots.is_empty() {
                    Ok(())
                } else {
                    let h = self.held[roots[root % roots.len()]];
                    self.machine.revoke(h.handle)
                }
            }
            Op::Watch { cap } => match self.pick_cap(*cap) {
                Some(i) => self.machine.watch(self.held[i].handle),
                None => Ok(()),
            },
            Op::WatchSenders { port } => match self.pick_port(*port) {
                Some(port) => self.machine.watch_senders(port),
                None => Ok(()),
            },
            Op::ClosePort { port } => {
                if let Some(port) = self.pick_port(*port) {
                    self.ports.retain(|&p| p != port);
                    // Messages waiting on it are dropped uncredited, as
                    // the machine does: their senders hear Undeliverable.
                    self.unread.retain(|u| u.port != port);
                    self.machine.close_port(port);
                }
                Ok(())
            }
            Op::Raw { seed } => {
                self.records.rogue = true;
                let home = self.home.map_or(0, |h| h.port);
                let frame = raw_frame(&mut Rng::new(*seed), home);
                self.raw.push_back(frame);
                Ok(())
            }
            Op::ReplyWithCall { owed } => {
                if !self.owed.is_empty() {
                    self.records.rogue = true;
                    let o = self.owed.remove(owed % self.owed.len());
                    self.raw.push_back(Frame::with_payload(
                        junction_road::Header::Call(junction_road::Call {
                            handle: o.reply,
                            // A tag of its own per call, far above the driver's.
                            tag: (1 << 41) + self.records.ops,
                            caps: Vec::new(),
                        }),
                        Bytes::from_static(b"a reply that calls back"),
                    ));
                }
                Ok(())
            }
            Op::Abandon { call } => {
                if !self.waiting.is_empty() {
                    let tag = self.waiting[call % self.waiting.len()];
                    self.machine.abandon_call(tag);
                    self.call_ended(tag, CallEnd::Abandoned);
                }
                Ok(())
            }
            Op::List => {
                let payload = postcard::to_allocvec(&ControlRequest::List)
                    .map(Bytes::from)
                    .unwrap_or_default();
                match self.machine.call(CONTROL_HANDLE, &[], payload) {
                    Ok(tag) => {
                        self.control_calls.insert(tag, ControlKind::List);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if result.is_err() {
            self.records.refused_locally += 1;
        }
        self.drain_events(ctx.elapsed);
    }

    fn pick_port(&self, i: usize) -> Option<u16> {
        (!self.ports.is_empty()).then(|| self.ports[i % self.ports.len()])
    }

    fn pick_cap(&self, i: usize) -> Option<usize> {
        (!self.held.is_empty()).then(|| i % self.held.len())
    }

    /// The handles to attach: distinct, with grant, not `on`.
    fn pick_attach(&self, attach: &[usize], on: Option<u32>) -> Vec<u32> {
        let mut handles = Vec::new();
        for &a in attach {
            if let Some(i) = self.pick_cap(a) {
                let h = self.held[i];
                if Some(h.handle) != on
                    && h.rights.contains(Rights::GRANT)
                    && !handles.contains(&h.handle)
                {
                    handles.push(h.handle);
                }
            }
        }
        handles
    }

    fn next_id(&mut self) -> MsgId {
        let id = MsgId {
            pid: self.pid,
            n: self.next_msg,
        };
        self.next_msg += 1;
        id
    }

    fn send(
        &mut self,
        cap: usize,
        attach: &[usize],
        len: usize,
        call: bool,
    ) -> Result<(), CommandError> {
        let Some(i) = self.pick_cap(cap) else {
            return Ok(());
        };
        let h = self.held[i];
        let attach = self.pick_attach(attach, Some(h.handle));
        let id = self.next_id();
        let payload = id.payload(len);
        let seq = self.machine.capability(h.handle).map_or(0, |c| c.next_seq);
        let kind = if call {
            let tag = self.machine.call(h.handle, &attach, payload)?;
            self.waiting.push(tag);
            MsgKind::Call { tag }
        } else {
            let s = self.machine.send(h.handle, &attach, payload)?;
            debug_assert_eq!(s, seq);
            MsgKind::Send
        };
        self.records.sent.push(Sent {
            id,
            handle: h.handle,
            instance: h.instance,
            seq,
            kind,
            target: h.address,
            len,
        });
        self.forget_moved(h.handle, &attach);
        Ok(())
    }

    /// Forgets handles that moved away with a message.
    fn forget_moved(&mut self, on: u32, attach: &[u32]) {
        let machine = &self.machine;
        self.held.retain(|h| {
            if h.handle != on && !attach.contains(&h.handle) {
                return true;
            }
            machine.capability(h.handle).is_some_and(|c| !c.gone)
        });
    }

    fn reply(&mut self, i: usize, attach: &[u32]) -> Result<(), CommandError> {
        let o = self.owed.remove(i);
        let id = self.next_id();
        let r = self.machine.reply(o.reply, attach, id.payload(18));
        match (&r, o.call) {
            (Ok(()), Some(call)) => {
                self.records.sent.push(Sent {
                    id,
                    handle: o.reply,
                    instance: u64::MAX,
                    seq: 0,
                    kind: MsgKind::Reply { call },
                    target: Address::new(0, 0),
                    len: 18,
                });
                self.forget_moved(u32::MAX, attach);
            }
            (Ok(()), None) => {}
            (Err(_), _) => {
                // Could not answer (e.g. an attached capability died): give
                // the reply capability back so the caller hears.
                self.machine.drop_reply(o.reply);
            }
        }
        r
    }

    fn read(&mut self, n: usize, answer: u8, rng: &mut Rng) {
        for _ in 0..n {
            let Some(u) = self.unread.pop_front() else {
                return;
            };
            self.machine.read(u.port, u.len, u.ack);
            if let Some(id) = u.id {
                self.records.consumed.push(Consumed {
                    id,
                    port: u.port,
                    origin: u.origin,
                });
            }
            if let Some(reply) = u.reply {
                let owed = Owed { reply, call: u.id };
                self.owed.push(owed);
                if rng.below(100) < u64::from(answer) {
                    let last = self.owed.len() - 1;
                    let _ = self.reply(last, &[]);
                }
            }
        }
    }

    fn control(&mut self, kind: ControlKind, name: &str, caps: &[u32]) -> Result<(), CommandError> {
        let Ok(name) = junction_driver::ServiceName::new(name) else {
            return Ok(());
        };
        let request = match kind {
            ControlKind::Register => ControlRequest::Register { name },
            _ => ControlRequest::Lookup { name },
        };
        let payload = postcard::to_allocvec(&request)
            .map(Bytes::from)
            .unwrap_or_default();
        let tag = self.machine.call(CONTROL_HANDLE, caps, payload)?;
        self.control_calls.insert(tag, kind);
        Ok(())
    }

    fn hold(&mut self, g: &Granted) {
        let instance = self.next_instance;
        self.next_instance += 1;
        self.held.push(Held {
            handle: g.handle,
            instance,
            rights: g.rights,
            address: g.address,
            root: false,
            budgeted: g.moves && !g.rights.contains(Rights::SEND_ONCE),
        });
    }

    fn call_ended(&mut self, tag: u64, end: CallEnd) {
        if self.control_calls.remove(&tag).is_some() {
            return;
        }
        self.waiting.retain(|&t| t != tag);
        self.records.call_ends.entry(tag).or_default().push(end);
    }

    /// Acts on everything the machine reported.
    fn drain_events(&mut self, elapsed: Duration) {
        while let Some(event) = self.machine.poll_event() {
            match event {
                Event::Welcomed(w) => {
                    self.home = Some(w.home);
                    // Every process serves one port from the start.
                    let _ = self.machine.open_port();
                }
                Event::Delivered { deliver, payload } => {
                    for g in &deliver.caps {
                        self.hold(g);
                    }
                    self.unread.push_back(Unread {
                        port: deliver.port,
                        id: MsgId::parse(&payload),
                        origin: deliver.origin,
                        len: payload.len(),
                        ack: deliver.ack,
                        reply: deliver.reply,
                    });
                }
                Event::Replied {
                    tag,
                    deliver,
                    payload,
                } => {
                    for g in &deliver.caps {
                        self.hold(g);
                    }
                    match self.control_calls.remove(&tag) {
                        Some(kind) => self.control_replied(kind, &payload, elapsed),
                        None => self.call_ended(tag, CallEnd::Replied(MsgId::parse(&payload))),
                    }
                }
                Event::CallFailed { tag, reason } => self.call_ended(tag, CallEnd::Failed(reason)),
                Event::CallRefused { tag, .. } => self.call_ended(tag, CallEnd::Refused),
                Event::PortOpened { address, .. } => {
                    self.ports.push(address.port);
                    // Register it, so that others can look it up.
                    if let Ok(req) = self
                        .machine
                        .mint(address.port, Rights::SEND | Rights::GRANT)
                    {
                        self.requests.insert(req, Pending::Register);
                    }
                }
                Event::Minted {
                    req,
                    handle,
                    rights,
                    address,
                    ..
                } => {
                    let instance = self.next_instance;
                    self.next_instance += 1;
                    let pending = self.requests.remove(&req);
                    self.held.push(Held {
                        handle,
                        instance,
                        rights,
                        address,
                        root: matches!(pending, Some(Pending::Attenuate { root: true, .. })),
                        budgeted: matches!(
                            pending,
                            Some(Pending::Attenuate { budgeted: true, .. })
                        ),
                    });
                    if let Some(Pending::Register) = pending {
                        let name = Self::port_name(self.pid, self.next_name as usize);
                        self.next_name += 1;
                        let _ = self.control(ControlKind::Register, &name, &[handle]);
                    }
                }
                Event::Undeliverable {
                    handle,
                    first_seq,
                    count,
                    reason,
                    ..
                } => self
                    .records
                    .undeliverable
                    .push((handle, first_seq, count, reason)),
                Event::Refused { req, .. } => {
                    self.requests.remove(&req);
                }
                Event::Closed { .. } => self.closed = true,
                _ => {}
            }
        }
    }

    fn control_replied(&mut self, kind: ControlKind, payload: &[u8], elapsed: Duration) {
        if let (ControlKind::List, Ok(ControlReply::Listing(listing))) =
            (kind, postcard::from_bytes::<ControlReply>(payload))
        {
            self.records.listings.push((elapsed, listing));
        }
    }
}

impl Process for Client {
    fn poll_transmit(&mut self) -> Option<Frame> {
        self.machine
            .poll_transmit()
            .or_else(|| self.raw.pop_front())
    }

    fn handle_frame(&mut self, frame: Frame, ctx: &mut Ctx<'_>) {
        self.machine.handle_frame(frame);
        self.drain_events(ctx.elapsed);
    }

    fn handle_road_closed(&mut self, ctx: &mut Ctx<'_>) {
        self.machine
            .handle_road_closed("the junction closed the road".into());
        self.drain_events(ctx.elapsed);
    }
}

/// The shape of one simulated run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Processes attached at the start.
    pub processes: usize,
    /// Operations applied, each by a random live process.
    pub ops: usize,
    /// Percent of operations that are a crash instead (and a new process
    /// joins, so the population stays).
    pub crash_percent: u64,
    /// Percent of pauses that are long (a second or more: expiries).
    pub long_pause_percent: u64,
    /// Percent of the processes joining after a crash that never say
    /// Hello: the junction must close them at its Hello deadline.
    pub mute_percent: u64,
    /// Percent of processes that also write frames behind their driver's
    /// back, one operation in three ([`Op::Raw`], now and then
    /// [`Op::ReplyWithCall`]).
    pub rogue_percent: u64,
    /// The latency of every Road.
    pub latency: super::Latency,
    /// The junction's configuration.
    pub config: junction_core::Config,
}

impl Plan {
    /// A small, tight configuration: few credits, few handles, few pending
    /// calls, so that limits are hit often.
    pub fn tight(processes: usize, ops: usize) -> Self {
        let config = junction_core::Config {
            max_frame: junction_road::MIN_MAX_FRAME,
            // Raised by the core to twice the largest frame's cost (10).
            window: 1,
            max_handles: 48,
            max_ports: 6,
            max_pending_calls: 8,
            dev_namespace: vec![
                junction_identity::NamePattern::new("sim.*").expect("a valid pattern"),
            ],
            ..junction_core::Config::default()
        };
        Self {
            processes,
            ops,
            crash_percent: 1,
            long_pause_percent: 3,
            rogue_percent: 0,
            mute_percent: 0,
            latency: super::Latency::default(),
            config,
        }
    }
}

/// What a run did, for reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Operations applied by applications.
    pub ops: u64,
    /// World steps taken.
    pub steps: u64,
    /// Simulated time.
    pub elapsed: Duration,
    /// Processes crashed.
    pub crashes: usize,
    /// What the oracle counted.
    pub summary: super::oracle::Summary,
    /// The trace's digest.
    pub digest: u64,
    /// What the run did, in order, for reading a failure.
    pub script: Vec<Scripted>,
}

/// One thing a random run did.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// A process applied an operation.
    Op {
        /// When.
        at: Duration,
        /// Which process.
        pid: ProcessId,
        /// What.
        op: Op,
    },
    /// A process crashed and another joined (mute: it never says Hello).
    Crash {
        /// When.
        at: Duration,
        /// Which process crashed.
        pid: ProcessId,
        /// The process that joined.
        joined: ProcessId,
        /// Whether the new one never says Hello.
        mute: bool,
    },
}

/// Runs `plan` from `seed`: random operations by random processes, crashes,
/// time passing; then every live application settles (reads everything,
/// answers every call) until the world is quiet, and the oracle checks the
/// whole trace. A [`super::Failure`] names the seed that replays it.
pub fn run(seed: u64, plan: &Plan) -> Result<Report, super::Failure> {
    let (mut world, report) = run_world(seed, plan, |_| {})?;
    audit(&mut world)?;
    let summary = check(&world, plan)?;
    Ok(Report { summary, ..report })
}

/// Checks a quiet world's whole run with the oracle.
pub fn check(world: &World<Client>, plan: &Plan) -> Result<super::oracle::Summary, super::Failure> {
    let records: Vec<(ProcessId, &Records)> = (0..world.process_count())
        .filter_map(|pid| world.remains(pid).map(|c| (pid, &c.records)))
        .collect();
    let alive = |pid: ProcessId| world.is_alive(pid);
    super::oracle::check(&plan.config, world.trace(), &records, &alive)
        .map_err(|e| world.failure(format!("the delivery contract is broken:\n{e}")))
}

/// Runs `plan` from `seed` and hands back the quiet world, unchecked by
/// the oracle (the cores' invariants were checked at every step). `setup`
/// may change the world before anything happens (e.g. its latencies).
pub fn run_world(
    seed: u64,
    plan: &Plan,
    setup: impl FnOnce(&mut World<Client>),
) -> Result<(World<Client>, Report), super::Failure> {
    let mut world = World::new(seed, plan.config.clone());
    world.road_latency = plan.latency;
    setup(&mut world);
    let mut ops = world.rng().fork();
    let client = Client::new;
    for _ in 0..plan.processes {
        let pid = world.process_count();
        world.add_process(0, client(pid));
    }
    let mut crashes = 0;
    let mut script = Vec::new();
    for _ in 0..plan.ops {
        let pause = if ops.chance(plan.long_pause_percent) {
            ops.between(Duration::from_millis(500), Duration::from_millis(2500))
        } else {
            ops.between(Duration::ZERO, Duration::from_micros(800))
        };
        let until = world.elapsed() + pause;
        world.run_until(until)?;
        let live: Vec<ProcessId> = (0..world.process_count())
            .filter(|&p| world.is_alive(p))
            .collect();
        if live.is_empty() {
            break;
        }
        let pid = live[ops.index(live.len())];
        if ops.chance(plan.crash_percent) {
            world.crash(pid);
            crashes += 1;
            let new = world.process_count();
            let mut client = client(new);
            let mute = ops.chance(plan.mute_percent);
            if mute {
                // Its Hello never leaves.
                let _ = client.machine.poll_transmit();
            }
            world.add_process(0, client);
            script.push(Scripted::Crash {
                at: world.elapsed(),
                pid,
                joined: new,
                mute,
            });
            continue;
        }
        let rogue = world
            .process(pid)
            .is_some_and(|c| c.rogue_seed % 100 < plan.rogue_percent);
        let op = if rogue && ops.chance(33) {
            if ops.chance(10) {
                Op::ReplyWithCall {
                    owed: ops.index(16),
                }
            } else {
                Op::Raw {
                    seed: ops.next_u64(),
                }
            }
        } else {
            Op::random(&mut ops)
        };
        let population = world.process_count();
        world.act(pid, |c, ctx| c.apply(&op, ctx, population));
        script.push(Scripted::Op {
            at: world.elapsed(),
            pid,
            op,
        });
    }
    settle(&mut world)?;
    let report = Report {
        seed,
        ops: (0..world.process_count())
            .filter_map(|p| world.remains(p))
            .map(|c| c.records.ops)
            .sum(),
        steps: world.steps(),
        elapsed: world.elapsed(),
        crashes,
        summary: super::oracle::Summary::default(),
        digest: world.digest(),
        script,
    };
    Ok((world, report))
}

/// Runs a fixed script: `processes` processes attach, then each step
/// `(pid, op)` is applied and the world runs until it is quiet; then every
/// application settles and the run is audited and checked, as [`run`]
/// does. For regression tests that pin one bug with a few operations.
pub fn run_script(
    seed: u64,
    plan: &Plan,
    script: &[(ProcessId, Op)],
) -> Result<Report, super::Failure> {
    let mut world = World::new(seed, plan.config.clone());
    world.road_latency = plan.latency;
    for _ in 0..plan.processes {
        let pid = world.process_count();
        world.add_process(0, Client::new(pid));
    }
    world.run_until_idle(1_000_000)?;
    let population = world.process_count();
    for (pid, op) in script {
        world.act(*pid, |c, ctx| c.apply(op, ctx, population));
        world.run_until_idle(1_000_000)?;
    }
    settle(&mut world)?;
    audit(&mut world)?;
    let summary = check(&world, plan)?;
    Ok(Report {
        seed,
        ops: script.len() as u64,
        steps: world.steps(),
        elapsed: world.elapsed(),
        crashes: 0,
        summary,
        digest: world.digest(),
        script: script
            .iter()
            .map(|(pid, op)| Scripted::Op {
                at: Duration::ZERO,
                pid: *pid,
                op: op.clone(),
            })
            .collect(),
    })
}

/// Once the world is quiet: the junction holds exactly the capability
/// handles the oracle's shadow says each live connection holds, and each
/// live honest application believes it holds exactly those (a rogue wrote
/// frames behind its driver's back, so only its count is compared). A
/// difference is a handle leaked (or lost) between driver and junction:
/// memory the junction keeps for nothing, and a limit (`max_handles`)
/// reached early.
pub fn audit(world: &mut World<Client>) -> Result<(), super::Failure> {
    let ready = |p: ProcessId| world.process(p).is_some_and(Client::is_ready);
    let Some(auditor) = (0..world.process_count()).find(|&p| ready(p)) else {
        return Ok(());
    };
    let before = world
        .remains(auditor)
        .map_or(0, |c| c.records.listings.len());
    world.act(auditor, |c, ctx| {
        let population = 1;
        c.apply(&Op::List, ctx, population)
    });
    settle(world)?;
    let Some(listing) = world
        .remains(auditor)
        .filter(|c| c.records.listings.len() > before)
        .and_then(|c| c.records.listings.last())
        .map(|(_, l)| l.clone())
    else {
        return Err(world.failure(format!("p{auditor} got no listing for the audit")));
    };
    let mut problems = Vec::new();
    let config = world.nodes()[0].core.config();
    let shadows = super::oracle::shadow_handles(config, world.trace());
    let window = config.window;
    for pid in 0..world.process_count() {
        let (Some(c), Some(road)) = (world.process(pid), world.road(pid)) else {
            continue;
        };
        if !c.is_ready() {
            continue;
        }
        let conn = road.conn.get();
        let Some(info) = listing.connections.iter().find(|i| i.id == conn) else {
            problems.push(format!("p{pid} (c{conn}) is missing from the listing"));
            continue;
        };
        let shadow = shadows.get(&conn).cloned().unwrap_or_default();
        if info.handles as usize != shadow.held.len() {
            problems.push(format!(
                "the junction holds {} handles for p{pid} (c{conn}), the oracle's shadow {}: {:x?}",
                info.handles,
                shadow.held.len(),
                shadow.held
            ));
        }
        if c.records.rogue {
            continue;
        }
        let believed: BTreeSet<u32> = c.believed_handle_list().into_iter().collect();
        if believed.len() != c.believed_handles() {
            problems.push(format!(
                "p{pid} counts a handle twice: {:x?}",
                c.believed_handle_list()
            ));
        }
        let phantom: Vec<u32> = believed.difference(&shadow.held).copied().collect();
        let leaked: Vec<u32> = shadow.held.difference(&believed).copied().collect();
        // Credit comes back: once everything is read, no send capability
        // to a live port served by an honest process is left below half
        // its window (below that the junction asks for a prompt Credit).
        for h in &c.held {
            let Some(owner) = shadow.live_targets.get(&h.handle) else {
                continue;
            };
            let owner_honest = (0..world.process_count()).any(|p| {
                world.road(p).is_some_and(|r| r.conn.get() == *owner)
                    && world
                        .process(p)
                        .is_some_and(|o| o.is_ready() && !o.records.rogue)
            });
            let Some(state) = c.machine.capability(h.handle) else {
                continue;
            };
            if owner_honest
                && !h.rights.contains(Rights::SEND_ONCE)
                && state.dead.is_none()
                && !state.gone
                && state.credits < window / 2
            {
                problems.push(format!(
                    "p{pid}'s handle {:#x} to {} has {} credits left of {window} after everything was read",
                    h.handle, h.address, state.credits
                ));
            }
        }
        if !phantom.is_empty() || !leaked.is_empty() {
            problems.push(format!(
                "p{pid} (c{conn}) believes it holds {phantom:x?}, which the junction does not \
                 hold, and does not know of {leaked:x?}, which it does"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(world.failure(format!("the audit failed:\n{}", problems.join("\n"))))
    }
}

/// Lets every live application read and answer everything until the world
/// is quiet.
pub fn settle(world: &mut World<Client>) -> Result<(), super::Failure> {
    for _ in 0..1000 {
        world.run_until_idle(1_000_000)?;
        let mut busy = false;
        for pid in 0..world.process_count() {
            let settled = world.act(pid, |c, ctx| {
                let was = c.is_settled();
                c.settle(ctx.rng);
                was
            });
            busy |= settled == Some(false);
        }
        if !busy {
            world.run_until_idle(1_000_000)?;
            return Ok(());
        }
    }
    Err(world.failure("the applications never settled".into()))
}

/// A well-framed frame a driver may send but an honest one would not:
/// unknown handles and ports, bad rights, zero tags, long or repeated
/// capability lists, credit never delivered, frames only a junction sends.
/// Request ids and call tags stay far above what a driver machine uses, so
/// that answers are not taken for its own.
fn raw_frame(rng: &mut Rng, home: u16) -> Frame {
    use junction_road::{Attenuate, Call, Header, Send};
    let handle = |rng: &mut Rng| -> u32 {
        match rng.below(4) {
            0 => rng.below(8) as u32,
            1 => (1 << 16) | rng.below(8) as u32,
            2 => u32::MAX,
            _ => rng.below(64) as u32,
        }
    };
    let port = |rng: &mut Rng| -> u16 {
        match rng.below(4) {
            0 => home,
            1 => 0,
            _ => rng.below(24) as u16,
        }
    };
    let caps = |rng: &mut Rng| -> Vec<u32> {
        let n = match rng.below(10) {
            0 => 65 + rng.index(4),
            1..=5 => 0,
            _ => 1 + rng.index(3),
        };
        (0..n).map(|_| rng.below(6) as u32).collect()
    };
    let req = (1 << 30) + rng.below(1 << 20) as u32;
    let tag = if rng.chance(20) {
        0
    } else {
        (1 << 40) + rng.below(1 << 20)
    };
    let rights = rng.below(256) as u8;
    let header = match rng.below(14) {
        0 => Header::Credit {
            port: port(rng),
            count: rng.below(6) as u32,
        },
        1 => Header::Drop {
            handle: handle(rng),
        },
        2 | 3 => Header::Send(Send {
            handle: handle(rng),
            caps: caps(rng),
        }),
        // Reply handles among the guesses too: such a call is refused.
        4 | 5 => Header::Call(Call {
            handle: handle(rng),
            tag,
            caps: caps(rng),
        }),
        6 => Header::Mint {
            req,
            port: port(rng),
            rights: Rights::from_bits(rights & 7).unwrap_or(Rights::SEND),
        },
        7 => Header::Attenuate(Attenuate {
            req,
            handle: handle(rng),
            rights: Rights::from_bits(rights & 7).unwrap_or(Rights::SEND),
            expires_at: rng.chance(50).then(|| 1_800_000_000 + rng.below(400)),
            max_messages: rng.chance(50).then(|| rng.below(3) as u32),
            revocable: rng.chance(50),
        }),
        8 => Header::Revoke {
            handle: handle(rng),
        },
        9 => Header::ClosePort { port: port(rng) },
        10 => Header::Watch {
            handle: handle(rng),
        },
        11 => Header::WatchSenders { port: port(rng) },
        12 => Header::Ping {
            nonce: rng.next_u64(),
        },
        _ => match rng.below(5) {
            // Behind its driver's back: its own calls, or none.
            3 => Header::Cancel {
                tag: 1 + rng.below(16),
            },
            0 => Header::SendCredit {
                port: junction_road::Address::new(1, port(rng)),
                count: 1,
            },
            1 => Header::Hello(junction_road::Hello {
                magic: junction_road::MAGIC,
                version: junction_road::PROTOCOL_VERSION,
                max_frame: 1 << 20,
                label: "again".into(),
            }),
            2 => Header::NoSenders { port: port(rng) },
            _ => Header::Pong { nonce: 7 },
        },
    };
    let payload = if rng.chance(30) {
        // A control request, or what looks like one.
        let name = junction_driver::ServiceName::new(format!("sim.p{}-0", rng.below(8)));
        let request = match (rng.below(3), name) {
            (1.., Ok(name)) => ControlRequest::Lookup { name },
            _ => ControlRequest::List,
        };
        postcard::to_allocvec(&request)
            .map(Bytes::from)
            .unwrap_or_default()
    } else {
        Bytes::from(vec![0x5A; rng.index(40)])
    };
    Frame::with_payload(header, payload)
}
