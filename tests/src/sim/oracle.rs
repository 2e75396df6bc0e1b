//! The delivery-contract oracle: it replays a world's trace of frames in and
//! out of the core against a shadow model of ports and capabilities of its
//! own, and checks the contract of `DESIGN.md` end to end.
//!
//! It looks only at the core boundary (the frames of the trace) and at what
//! applications recorded ([`Records`]), never inside the core or the
//! driver, so it judges whichever driver the processes run.
//!
//! What it checks:
//!
//! - **Delivered once, to the right place**: no message is delivered twice;
//!   every delivery goes to the owner of the very port incarnation the
//!   sending capability was made for (port numbers are reused), with the
//!   sender's home port as origin.
//! - **Nothing on a dead capability**: no delivery after the core handled
//!   the death of the port, the revocation of a lineage the capability
//!   belongs to, its expiry, or the use of its whole message budget.
//! - **No silent loss**: a message that was not delivered, or was delivered
//!   but not confirmed consumed (`Credit`) when its port died, is reported
//!   to its sender (`Undeliverable` covering its sequence number, an
//!   `Error` answering its frame, or for a call `CallFailed`/`Error`) —
//!   unless the sender crashed, or no longer held the handle when the port
//!   died (the protocol reports nothing then), or sent it on a send-once
//!   capability.
//! - **No false claims**: no message confirmed consumed is reported
//!   undeliverable.
//! - **Calls end exactly once** (at most once for a crashed caller).
//! - **Per-flow order**: each receiver consumes the messages of one sending
//!   capability in the order they were sent.
//! - **Replies match calls**: a reply reaches the caller of the call it
//!   answers. A `Call` on a reply capability is refused (`UnexpectedFrame`,
//!   or `BadTag` for tag 0) and the call it answers fails with
//!   `ReplyDropped`; no `CallFailed` names tag 0.
//! - **Capabilities leave as protocol 6.1 says**: a send-once capability
//!   is used up by its use, even when dead on its own; a message that is
//!   not delivered (refused, undeliverable, or shown to the control port)
//!   takes the moving capabilities it attaches out of the sender's table.
//!   The shadow's tables follow these rules, and [`shadow_handles`] gives
//!   them to the audit at quiescence (`workload::audit`).
//! - **Bounded memory**: at every delivery, what one connection has in
//!   flight to one port (its lane), over all its capabilities to the port,
//!   costs at most the window; every `Listing` the control port
//!   gives out counts exactly the messages in flight per port that the
//!   shadow counts, and no connection is above its limits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write;

use junction_core::Config;
use junction_road::control::{ControlReply, Listing};
use junction_road::frame::credit_cost;
use junction_road::{Deliver, ErrorCode, Frame, Header, Reason, Rights};

use super::workload::{CallEnd, MsgId, MsgKind, Records};
use super::{ProcessId, TraceEntry, Traced};

/// What the oracle counted, for the report.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Data messages the core handled.
    pub messages: u64,
    /// Of those, delivered.
    pub delivered: u64,
    /// Reported undeliverable (or refused) to a sender.
    pub told: u64,
    /// Calls made (control calls included).
    pub calls: u64,
    /// Listings compared with the shadow.
    pub listings: u64,
    /// Frames in the trace.
    pub frames: u64,
    /// Capabilities passed inside messages.
    pub passed: u64,
    /// Lineages revoked.
    pub revocations: u64,
    /// Deliveries of messages sent on a capability of a revocable lineage,
    /// with an expiry, or with a budget: those the "nothing on a dead
    /// capability" checks look at.
    pub limited_deliveries: u64,
    /// Calls on a reply capability (or with tag 0 on one), checked refused.
    pub misused_replies: u64,
    /// Frames written to a connection the core had already forgotten.
    pub to_forgotten: u64,
    /// `Dead` notices checked.
    pub dead: u64,
    /// `NoSenders` notices checked.
    pub no_senders: u64,
    /// `Undeliverable` notices, by reason.
    pub undeliverable: BTreeMap<String, u64>,
}

impl Summary {
    /// Adds another run's counts to these.
    pub fn add(&mut self, other: &Summary) {
        self.messages += other.messages;
        self.delivered += other.delivered;
        self.told += other.told;
        self.calls += other.calls;
        self.listings += other.listings;
        self.frames += other.frames;
        self.passed += other.passed;
        self.revocations += other.revocations;
        self.limited_deliveries += other.limited_deliveries;
        self.no_senders += other.no_senders;
        self.dead += other.dead;
        self.to_forgotten += other.to_forgotten;
        self.misused_replies += other.misused_replies;
        for (k, v) in &other.undeliverable {
            *self.undeliverable.entry(k.clone()).or_default() += v;
        }
    }
}

/// A port incarnation in the shadow.
#[derive(Debug)]
struct PortInc {
    number: u16,
    owner: u64,
    alive: bool,
    /// Deliveries not yet consumed: the message (if a data message) and
    /// the metered capability and cost it came on.
    fifo: VecDeque<InFlight>,
}

/// One delivery not yet consumed.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The data message, if it is one.
    id: Option<MsgId>,
    /// The lane (sender, port number) and credit units it came on, if
    /// metered.
    metered: Option<(LaneKey, u32)>,
    /// For a call: the reply handle it put into the receiver's table.
    reply: Option<u32>,
}

/// A capability in the shadow: connection, handle, and which capability
/// that handle is (handles can be reused).
type CapKey = (u64, u32, u64);

/// A lane: the sending connection and the port number it sends to.
type LaneKey = (u64, u16);

#[derive(Debug, Clone)]
struct ShadowCap {
    inst: u64,
    inc: Option<usize>,
    rights: Rights,
    lineages: Vec<u64>,
    root: Option<u64>,
    expires_at: Option<u64>,
    /// The budgets it spends from, shared with every capability
    /// attenuated from the same one (ids into `Shadow::budgets`).
    budgets: Vec<u64>,
    seq: u64,
    /// For a reply capability: the caller's connection and tag.
    reply_to: Option<(u64, u64)>,
    /// Its holder watches it.
    watched: bool,
    /// Dead on its own: its port died while it was watched.
    dead_on_own: bool,
}

impl ShadowCap {
    /// A capability with no limits.
    fn plain(inc: Option<usize>, rights: Rights) -> Self {
        Self {
            inst: 0,
            inc,
            rights,
            lineages: Vec::new(),
            root: None,
            expires_at: None,
            budgets: Vec::new(),
            seq: 0,
            reply_to: None,
            watched: false,
            dead_on_own: false,
        }
    }

    fn moves(&self) -> bool {
        self.rights.contains(Rights::SEND_ONCE) || !self.budgets.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
enum Req {
    Mint { inc: Option<usize>, rights: Rights },
    Attenuate(AttenuateReq),
}

#[derive(Debug, Clone, Copy)]
struct AttenuateReq {
    from: u32,
    rights: Rights,
    expires_at: Option<u64>,
    max_messages: Option<u32>,
    revocable: bool,
}

/// A data message, as the core saw it.
#[derive(Debug)]
struct Msg {
    key: CapKey,
    seq: u64,
    conn: u64,
    send_once: bool,
    delivered: u32,
    confirmed: bool,
    /// Its port died with it unconsumed while its sender held the handle.
    must_tell: bool,
    told: bool,
    told_undeliverable: bool,
}

/// The input a step is handling, for attributing its outputs.
#[derive(Debug, Clone)]
enum Input {
    None,
    Message {
        conn: u64,
        handle: u32,
        /// The capability sent on, as it was before the core handled it.
        cap: Option<Box<ShadowCap>>,
        caps: Vec<u32>,
        tag: Option<u64>,
        id: Option<MsgId>,
        /// Whether the step delivered it.
        delivered: bool,
    },
    Other,
}

/// A `Call` on a reply capability, or one with tag 0 on it: the junction
/// must refuse it with `code`, and the call it answers fails with
/// `ReplyDropped` (protocol 6.1 steps 3 and 5), both in the same step.
#[derive(Debug, Clone, Copy)]
struct ReplyMisused {
    sender: u64,
    handle: u32,
    tag: u64,
    code: ErrorCode,
    refused: bool,
    /// The caller's connection and tag, while the caller is connected.
    caller: Option<(u64, u64)>,
    dropped: bool,
}

/// The shadow model and what it found.
struct Shadow<'a> {
    config: &'a Config,
    window: u32,
    incs: Vec<PortInc>,
    live_port: HashMap<u16, usize>,
    home: HashMap<u64, usize>,
    pid_of: HashMap<u64, ProcessId>,
    ended: HashSet<u64>,
    caps: HashMap<(u64, u32), ShadowCap>,
    next_inst: u64,
    next_lineage: u64,
    revoked: HashSet<u64>,
    /// Messages left in each budget, by the shadow's own ids.
    budgets: HashMap<u64, u32>,
    next_budget: u64,
    reqs: HashMap<(u64, u32), Req>,
    msgs: HashMap<MsgId, Msg>,
    by_seq: HashMap<(CapKey, u64), MsgId>,
    /// The data message each call carried.
    call_msg: HashMap<(u64, u64), MsgId>,
    /// The latest capability each handle named, for notices after a drop.
    last_inst: HashMap<(u64, u32), u64>,
    /// Calls by caller connection and tag: how many times each ended.
    calls: BTreeMap<(u64, u64), u32>,
    in_flight_cost: HashMap<LaneKey, u32>,
    /// Calls (by process and tag) whose reply capability a rogue held at
    /// the end.
    rogue_held_calls: HashSet<(ProcessId, u64)>,
    /// How many `Dead` notices and `Watch` requests each capability had.
    dead_told: HashMap<CapKey, (u32, u32)>,
    input: Input,
    reply_misused: Option<ReplyMisused>,
    /// A call cancelled this step while its reply capability was out:
    /// caller, tag, and whether `CallFailed{Cancelled}` ended it.
    cancelled: Option<(u64, u64, bool)>,
    step: u64,
    unix: u64,
    errors: Vec<String>,
    summary: Summary,
}

/// Checks a finished run. `records` are every process's records, by
/// process id; `alive` says which processes were alive at the end. Returns
/// what it counted, or every violation it found, one per line.
pub fn check(
    config: &Config,
    trace: &[TraceEntry],
    records: &[(ProcessId, &Records)],
    alive: &dyn Fn(ProcessId) -> bool,
) -> Result<Summary, String> {
    let mut s = replay(config, trace);
    s.finish(alive, records);
    check_records(records, alive, &s.rogue_held_calls, &mut s.errors);
    if s.errors.is_empty() {
        Ok(s.summary)
    } else {
        let mut out = String::new();
        for e in &s.errors {
            let _ = writeln!(out, "{e}");
        }
        Err(out)
    }
}

/// Runs the shadow model over a trace.
fn replay<'a>(config: &'a Config, trace: &[TraceEntry]) -> Shadow<'a> {
    let window = config
        .window
        .max(2 * credit_cost(config.max_frame as usize));
    let mut s = Shadow {
        config,
        window,
        incs: Vec::new(),
        live_port: HashMap::new(),
        home: HashMap::new(),
        pid_of: HashMap::new(),
        ended: HashSet::new(),
        caps: HashMap::new(),
        next_inst: 0,
        next_lineage: 1,
        revoked: HashSet::new(),
        budgets: HashMap::new(),
        next_budget: 1,
        reqs: HashMap::new(),
        msgs: HashMap::new(),
        by_seq: HashMap::new(),
        call_msg: HashMap::new(),
        last_inst: HashMap::new(),
        calls: BTreeMap::new(),
        in_flight_cost: HashMap::new(),
        rogue_held_calls: HashSet::new(),
        dead_told: HashMap::new(),
        input: Input::None,
        reply_misused: None,
        cancelled: None,
        step: u64::MAX,
        unix: 0,
        errors: Vec::new(),
        summary: Summary::default(),
    };
    for entry in trace {
        if entry.step != s.step {
            s.end_step();
            s.step = entry.step;
        }
        s.unix = entry.unix;
        s.entry(&entry.what);
        if s.errors.len() > 20 {
            break;
        }
    }
    s.end_step();
    s
}

/// What the shadow model says one connection holds at the end of a trace.
#[derive(Debug, Clone, Default)]
pub struct ShadowHandles {
    /// Every handle in its table.
    pub held: BTreeSet<u32>,
    /// The owner connection of the live port each handle reaches (handles
    /// to dead ports, and the control handle, are missing).
    pub live_targets: BTreeMap<u32, u64>,
}

/// The capability handles the shadow model says each connection holds at
/// the end of a trace, for the audit.
pub fn shadow_handles(config: &Config, trace: &[TraceEntry]) -> BTreeMap<u64, ShadowHandles> {
    let s = replay(config, trace);
    let mut out: BTreeMap<u64, ShadowHandles> = BTreeMap::new();
    for (&(conn, handle), cap) in &s.caps {
        let entry = out.entry(conn).or_default();
        entry.held.insert(handle);
        if let Some(inc) = cap.inc.map(|i| &s.incs[i])
            && inc.alive
        {
            entry.live_targets.insert(handle, inc.owner);
        }
    }
    out
}

impl Shadow<'_> {
    /// A step is over: a message it did not deliver (refused or
    /// undeliverable, or shown to the control port) takes the capabilities
    /// that move among its attachments out of the sender's table all the
    /// same (protocol 6.1).
    fn end_step(&mut self) {
        if let Input::Message {
            conn,
            ref caps,
            delivered: false,
            ..
        } = self.input
        {
            let caps = caps.clone();
            for h in caps {
                if self.caps.get(&(conn, h)).is_some_and(ShadowCap::moves) {
                    self.caps.remove(&(conn, h));
                }
            }
        }
        self.input = Input::None;
        if let Some((caller, tag, false)) = self.cancelled.take() {
            self.fail(format!(
                "c{caller} cancelled call {tag} before its reply, and it did not fail with Cancelled"
            ));
        }
        if let Some(m) = self.reply_misused.take() {
            self.summary.misused_replies += 1;
            if !m.refused {
                self.fail(format!(
                    "c{}'s Call (tag {}) on reply handle {:#x} was not refused with {:?}",
                    m.sender, m.tag, m.handle, m.code
                ));
            }
            if let Some((caller, tag)) = m.caller
                && !m.dropped
            {
                self.fail(format!(
                    "c{caller}'s call {tag} was answered by a Call on its reply capability \
                     and did not fail with ReplyDropped"
                ));
            }
        }
    }

    fn fail(&mut self, message: String) {
        let step = self.step;
        self.errors.push(format!("step {step}: {message}"));
    }

    fn entry(&mut self, what: &Traced) {
        match what {
            Traced::Connected { conn, pid, .. } => {
                self.pid_of.insert(*conn, *pid);
            }
            Traced::CoreIn { conn, frame, .. } => {
                self.summary.frames += 1;
                self.core_in(*conn, frame);
            }
            Traced::CoreOut { conn, frame, .. } => {
                self.summary.frames += 1;
                self.core_out(*conn, frame);
            }
            Traced::CoreClosed { conn, .. } | Traced::Disconnected { conn, .. } => {
                self.input = Input::Other;
                self.conn_ended(*conn);
            }
            Traced::Timeout { .. }
            | Traced::Crashed { .. }
            | Traced::HighwayIn { .. }
            | Traced::Session { .. }
            | Traced::Unroutable { .. }
            | Traced::LinkChanged { .. } => self.input = Input::Other,
        }
    }

    fn new_inc(&mut self, number: u16, owner: u64) -> usize {
        if let Some(&old) = self.live_port.get(&number)
            && self.incs[old].alive
        {
            self.fail(format!(
                "port {number} opened for c{owner} while its previous incarnation is alive"
            ));
        }
        self.incs.push(PortInc {
            number,
            owner,
            alive: true,
            fifo: VecDeque::new(),
        });
        let id = self.incs.len() - 1;
        self.live_port.insert(number, id);
        id
    }

    fn insert_cap(&mut self, conn: u64, handle: u32, mut cap: ShadowCap) {
        cap.inst = self.next_inst;
        self.next_inst += 1;
        self.last_inst.insert((conn, handle), cap.inst);
        if self.caps.insert((conn, handle), cap).is_some() {
            self.fail(format!(
                "c{conn} was given handle {handle:#x}, which it already holds"
            ));
        }
    }

    fn cap_key(&self, conn: u64, handle: u32) -> Option<CapKey> {
        self.caps
            .get(&(conn, handle))
            .map(|c| (conn, handle, c.inst))
    }

    fn kill_inc(&mut self, inc: usize) {
        if !self.incs[inc].alive {
            return;
        }
        self.incs[inc].alive = false;
        let fifo = std::mem::take(&mut self.incs[inc].fifo);
        let owner = self.incs[inc].owner;
        // Capabilities watched when their port died are dead on their own.
        for cap in self.caps.values_mut() {
            if cap.inc == Some(inc) && cap.watched {
                cap.dead_on_own = true;
            }
        }
        for InFlight { id, metered, reply } in fifo {
            // An unconsumed call's reply capability leaves the receiver.
            if let Some(reply) = reply {
                self.caps.remove(&(owner, reply));
            }
            if let Some((key, cost)) = metered {
                self.release_cost(key, cost);
            }
            let Some(id) = id else { continue };
            let held = self.msgs.get(&id).map(|m| {
                let (conn, handle, inst) = m.key;
                !m.send_once
                    && self
                        .caps
                        .get(&(conn, handle))
                        .is_some_and(|c| c.inst == inst)
            });
            if let (Some(true), Some(m)) = (held, self.msgs.get_mut(&id)) {
                m.must_tell = true;
            }
        }
    }

    fn release_cost(&mut self, key: LaneKey, cost: u32) {
        if let Some(c) = self.in_flight_cost.get_mut(&key) {
            *c = c.saturating_sub(cost);
        }
    }

    fn conn_ended(&mut self, conn: u64) {
        if !self.ended.insert(conn) {
            return;
        }
        let owned: Vec<usize> = (0..self.incs.len())
            .filter(|&i| self.incs[i].alive && self.incs[i].owner == conn)
            .collect();
        for inc in owned {
            self.kill_inc(inc);
        }
        self.caps.retain(|&(c, _), _| c != conn);
    }

    fn core_in(&mut self, conn: u64, frame: &Frame) {
        self.input = Input::Other;
        match &frame.header {
            Header::Mint { req, port, rights } => {
                let inc = self
                    .live_port
                    .get(port)
                    .copied()
                    .filter(|&i| self.incs[i].alive && self.incs[i].owner == conn);
                self.reqs.insert(
                    (conn, *req),
                    Req::Mint {
                        inc,
                        rights: *rights,
                    },
                );
            }
            Header::Attenuate(a) => {
                self.reqs.insert(
                    (conn, a.req),
                    Req::Attenuate(AttenuateReq {
                        from: a.handle,
                        rights: a.rights,
                        expires_at: a.expires_at,
                        max_messages: a.max_messages,
                        revocable: a.revocable,
                    }),
                );
            }
            Header::Drop { handle } if *handle != 0 => {
                self.caps.remove(&(conn, *handle));
            }
            Header::Watch { handle } => {
                if let Some(key) = self.cap_key(conn, *handle) {
                    self.dead_told.entry(key).or_default().1 += 1;
                }
                if let Some(cap) = self.caps.get_mut(&(conn, *handle)) {
                    // Watched after its port died: dead on its own now.
                    cap.dead_on_own |= cap.inc.is_some_and(|i| !self.incs[i].alive);
                    cap.watched = true;
                }
            }
            Header::Revoke { handle } => {
                if let Some(l) = self.caps.get(&(conn, *handle)).and_then(|c| c.root)
                    && self.revoked.insert(l)
                {
                    self.summary.revocations += 1;
                }
            }
            Header::ClosePort { port } => {
                let home = self.home.get(&conn).copied();
                if let Some(&inc) = self.live_port.get(port)
                    && self.incs[inc].alive
                    && self.incs[inc].owner == conn
                    && Some(inc) != home
                {
                    self.kill_inc(inc);
                }
            }
            Header::Credit { port, count } => {
                if let Some(&inc) = self.live_port.get(port)
                    && self.incs[inc].alive
                    && self.incs[inc].owner == conn
                {
                    let n = (*count as usize).min(self.incs[inc].fifo.len());
                    let done: Vec<_> = self.incs[inc].fifo.drain(..n).collect();
                    for InFlight { id, metered, .. } in done {
                        if let Some((key, cost)) = metered {
                            self.release_cost(key, cost);
                        }
                        if let Some(m) = id.and_then(|id| self.msgs.get_mut(&id)) {
                            m.confirmed = true;
                        }
                    }
                }
            }
            Header::Cancel { tag } => {
                // A call whose reply is not yet sent ends now; its reply
                // capability is dead on its own, wherever it went.
                if let Some(cap) = self
                    .caps
                    .values_mut()
                    .find(|c| c.reply_to == Some((conn, *tag)) && !c.dead_on_own)
                {
                    cap.dead_on_own = true;
                    self.cancelled = Some((conn, *tag, false));
                }
            }
            Header::Send(send) => self.message(conn, send.handle, send.caps.clone(), None, frame),
            Header::Call(call) => {
                self.message(conn, call.handle, call.caps.clone(), Some(call.tag), frame)
            }
            _ => {}
        }
    }

    fn message(&mut self, conn: u64, handle: u32, caps: Vec<u32>, tag: Option<u64>, frame: &Frame) {
        let id = MsgId::parse(&frame.payload);
        if let Some(tag) = tag
            && tag != 0
        {
            self.summary.calls += 1;
            self.calls.entry((conn, tag)).or_insert(0);
        }
        let key = self.cap_key(conn, handle);
        let before = self.caps.get(&(conn, handle)).cloned();
        let mut seq = 0;
        let mut send_once = false;
        if let Some(cap) = self.caps.get_mut(&(conn, handle)) {
            seq = cap.seq;
            cap.seq += 1;
            // A send-once capability is used up by its use, whatever
            // becomes of the message, even when dead on its own.
            send_once = cap.rights.contains(Rights::SEND_ONCE);
        }
        if let (Some(id), Some(tag)) = (id, tag) {
            self.call_msg.insert((conn, tag), id);
        }
        if let Some(id) = id
            && handle != 0
        {
            // A handle the shadow does not know: the core must refuse it
            // (UnknownHandle), which tells the sender.
            let key = key.unwrap_or((conn, handle, u64::MAX));
            self.summary.messages += 1;
            if self.msgs.contains_key(&id) {
                self.fail(format!("message {id:?} was sent twice"));
            }
            self.msgs.insert(
                id,
                Msg {
                    key,
                    seq,
                    conn,
                    send_once,
                    delivered: 0,
                    confirmed: false,
                    must_tell: false,
                    told: false,
                    told_undeliverable: false,
                },
            );
            self.by_seq.insert((key, seq), id);
        }
        self.input = Input::Message {
            conn,
            handle,
            cap: before.clone().map(Box::new),
            caps,
            tag,
            id,
            delivered: false,
        };
        if let (Some(tag), Some(cap)) = (tag, &before)
            && let Some((caller, caller_tag)) = cap.reply_to
            && (tag == 0 || !cap.dead_on_own)
        {
            self.reply_misused = Some(ReplyMisused {
                sender: conn,
                handle,
                tag,
                code: if tag == 0 {
                    ErrorCode::BadTag
                } else {
                    ErrorCode::UnexpectedFrame
                },
                refused: false,
                caller: (!self.ended.contains(&caller)).then_some((caller, caller_tag)),
                dropped: false,
            });
        }
        if send_once {
            self.caps.remove(&(conn, handle));
        }
    }

    fn core_out(&mut self, conn: u64, frame: &Frame) {
        if self.ended.contains(&conn) {
            // While it forgets a connection, the core kills its ports and
            // writes the notices that causes to everyone, the connection
            // itself included: nobody reads those.
            self.summary.to_forgotten += 1;
            return;
        }
        match &frame.header {
            Header::Welcome(w) => {
                let inc = self.new_inc(w.home.port, conn);
                self.home.insert(conn, inc);
                self.insert_cap(conn, 0, ShadowCap::plain(None, Rights::SEND));
            }
            Header::PortOpened { address, .. } => {
                self.new_inc(address.port, conn);
            }
            Header::Minted { req, handle, .. } => self.minted(conn, *req, *handle),
            Header::Error(e) => {
                if let Some(m) = &mut self.reply_misused
                    && m.sender == conn
                    && m.handle == e.handle
                    && m.tag == e.tag
                    && m.code == e.code
                {
                    m.refused = true;
                }
                if e.req != 0 {
                    self.reqs.remove(&(conn, e.req));
                }
                if e.tag != 0 {
                    self.call_ended(conn, e.tag);
                }
                if let Input::Message {
                    conn: c,
                    handle,
                    id: Some(id),
                    ..
                } = self.input
                    && c == conn
                    && e.handle == handle
                    && let Some(m) = self.msgs.get_mut(&id)
                {
                    m.told = true;
                }
            }
            // A `Call` with tag 0 is refused with BadTag before anything
            // else: no notice names tag 0 (protocol 6.1 step 3).
            Header::CallFailed { tag: 0, reason } => {
                self.fail(format!(
                    "c{conn} was told CallFailed with tag 0 ({reason:?})"
                ));
            }
            Header::CallFailed { tag, reason } => {
                if let Some((caller, cancelled, told)) = &mut self.cancelled
                    && *caller == conn
                    && *cancelled == *tag
                    && *reason == Reason::Cancelled
                {
                    *told = true;
                }
                if let Some(m) = &mut self.reply_misused
                    && m.caller == Some((conn, *tag))
                    && *reason == Reason::ReplyDropped
                {
                    m.dropped = true;
                }
                self.call_ended(conn, *tag);
                if let Some(id) = self.call_msg.get(&(conn, *tag))
                    && let Some(m) = self.msgs.get_mut(id)
                {
                    m.told = true;
                }
            }
            Header::Undeliverable {
                handle,
                first_seq,
                count,
                reason,
            } => {
                *self
                    .summary
                    .undeliverable
                    .entry(format!("{reason:?}"))
                    .or_default() += u64::from(*count);
                let Some(key) = self
                    .cap_key(conn, *handle)
                    .or_else(|| self.last_key(conn, *handle))
                else {
                    self.fail(format!(
                        "c{conn} told Undeliverable on handle {handle:#x} it never held"
                    ));
                    return;
                };
                for seq in *first_seq..first_seq.saturating_add(u64::from(*count)) {
                    let Some(&id) = self.by_seq.get(&(key, seq)) else {
                        continue;
                    };
                    let Some(m) = self.msgs.get_mut(&id) else {
                        continue;
                    };
                    m.told = true;
                    m.told_undeliverable = true;
                    if m.confirmed {
                        let e = format!(
                            "message {id:?} (c{conn} handle {handle:#x} seq {seq}) was consumed, \
                             yet reported Undeliverable ({reason:?})"
                        );
                        self.fail(e);
                    }
                }
            }
            Header::Deliver(d) => self.delivered(conn, d, frame),
            Header::Dead { handle, reason } => {
                // A watched capability hears of its death once; a Watch on
                // a dead one is answered at once, so never more Dead than
                // Watch.
                match self.cap_key(conn, *handle) {
                    Some(key) => {
                        let told = self.dead_told.entry(key).or_default();
                        told.0 += 1;
                        let (dead, watches) = *told;
                        if dead > watches {
                            self.fail(format!(
                                "c{conn} was told {dead} times that handle {handle:#x} is dead \
                                 (now {reason:?}), after {watches} Watch"
                            ));
                        }
                    }
                    None => self.fail(format!(
                        "c{conn} was told handle {handle:#x} is dead, which it does not hold"
                    )),
                }
                self.summary.dead += 1;
            }
            Header::NoSenders { port } => {
                // Told when the last capability went: none may be left.
                let owned = self
                    .live_port
                    .get(port)
                    .is_some_and(|&i| self.incs[i].alive && self.incs[i].owner == conn);
                // Moving attachments of a message this step refuses leave
                // now: they may be the last.
                let leaving = match &self.input {
                    Input::Message { conn, caps, .. } => caps
                        .iter()
                        .filter(|&&h| {
                            self.caps.get(&(*conn, h)).is_some_and(|c| {
                                c.moves() && c.inc.is_some_and(|i| self.incs[i].number == *port)
                            })
                        })
                        .count(),
                    _ => 0,
                };
                let senders = self.senders(*port).map(|n| n.saturating_sub(leaving));
                if !owned || senders != Some(0) {
                    self.fail(format!(
                        "c{conn} heard NoSenders for port {port} (owned: {owned}), which has {senders:?} senders"
                    ));
                }
                self.summary.no_senders += 1;
            }
            _ => {}
        }
    }

    /// The capability a dropped handle was, for late notices.
    fn last_key(&self, conn: u64, handle: u32) -> Option<CapKey> {
        self.last_inst
            .get(&(conn, handle))
            .map(|&inst| (conn, handle, inst))
    }

    fn call_ended(&mut self, conn: u64, tag: u64) {
        match self.calls.get_mut(&(conn, tag)) {
            Some(n) => {
                *n += 1;
                let n = *n;
                if n > 1 {
                    self.fail(format!("call {tag} of c{conn} ended {n} times"));
                }
            }
            None => self.fail(format!(
                "c{conn} told the end of call {tag}, which it never made"
            )),
        }
    }

    fn minted(&mut self, conn: u64, req: u32, handle: u32) {
        let Some(r) = self.reqs.remove(&(conn, req)) else {
            self.fail(format!("Minted for c{conn} answers no request {req}"));
            return;
        };
        let cap = match r {
            Req::Mint { inc, rights } => {
                if inc.is_none() {
                    self.fail(format!("c{conn} minted on a port it does not own"));
                }
                ShadowCap::plain(inc, rights)
            }
            Req::Attenuate(a) => {
                let Some(from) = self.caps.get(&(conn, a.from)).cloned() else {
                    self.fail(format!(
                        "c{conn} attenuated handle {:#x}, which it does not hold",
                        a.from
                    ));
                    return;
                };
                let mut lineages = from.lineages.clone();
                // Budgets are shared, never copied: the new capability
                // spends from the original's, and from its own if it has one.
                let mut budgets = from.budgets.clone();
                if let Some(n) = a.max_messages {
                    let b = self.next_budget;
                    self.next_budget += 1;
                    self.budgets.insert(b, n);
                    budgets.push(b);
                }
                let root = a.revocable.then(|| {
                    let l = self.next_lineage;
                    self.next_lineage += 1;
                    lineages.push(l);
                    l
                });
                ShadowCap {
                    inst: 0,
                    inc: from.inc,
                    rights: a.rights,
                    lineages,
                    root,
                    expires_at: a.expires_at.or(from.expires_at),
                    budgets,
                    seq: 0,
                    reply_to: None,
                    watched: false,
                    dead_on_own: from.dead_on_own,
                }
            }
        };
        self.insert_cap(conn, handle, cap);
    }

    fn delivered(&mut self, conn: u64, d: &Deliver, frame: &Frame) {
        let Some(&inc) = self.live_port.get(&d.port) else {
            self.fail(format!(
                "c{conn} got a delivery to port {}, never opened",
                d.port
            ));
            return;
        };
        if !self.incs[inc].alive || self.incs[inc].owner != conn {
            self.fail(format!(
                "c{conn} got a delivery to port {}, which it does not own",
                d.port
            ));
            return;
        }
        if d.origin.port == 0 {
            // A control reply: it ends a call and may carry a capability.
            self.call_ended(conn, d.tag);
            if let Ok(ControlReply::Listing(listing)) =
                postcard::from_bytes::<ControlReply>(&frame.payload)
            {
                self.listing(&listing);
            }
            for g in &d.caps {
                let inc = self
                    .live_port
                    .get(&g.address.port)
                    .copied()
                    .filter(|&i| self.incs[i].alive);
                self.insert_cap(conn, g.handle, ShadowCap::plain(inc, g.rights));
            }
            self.incs[inc].fifo.push_back(InFlight {
                id: None,
                metered: None,
                reply: None,
            });
            return;
        }
        let Input::Message {
            conn: sender,
            handle,
            cap: Some(ref cap),
            ref caps,
            tag,
            id,
            ..
        } = self.input
        else {
            self.fail(format!(
                "c{conn} got a delivery on port {} that no message on a held capability caused",
                d.port
            ));
            return;
        };
        let (cap, caps) = ((**cap).clone(), caps.clone());
        if cap.reply_to.is_some() && tag.is_some() {
            self.fail(format!(
                "c{sender} made a Call on reply handle {handle:#x} and it was delivered, not refused"
            ));
        }
        if let Input::Message { delivered, .. } = &mut self.input {
            *delivered = true;
        }
        self.check_delivery(conn, d, sender, &cap, inc, id);
        // Budget: one message of each it draws from is gone (the core may
        // have spent more, on messages it refused; never fewer).
        for b in &cap.budgets {
            if let Some(left) = self.budgets.get_mut(b) {
                *left = left.saturating_sub(1);
            }
        }
        // Capabilities travel: copies keep the limits and lineages; those
        // that move leave the sender.
        if caps.len() != d.caps.len() {
            self.fail(format!(
                "c{sender} passed {} capabilities, c{conn} got {}",
                caps.len(),
                d.caps.len()
            ));
        }
        self.summary.passed += d.caps.len() as u64;
        if !cap.lineages.is_empty() || cap.expires_at.is_some() || !cap.budgets.is_empty() {
            self.summary.limited_deliveries += 1;
        }
        for (h, g) in caps.iter().zip(&d.caps) {
            let Some(src) = self.caps.get(&(sender, *h)).cloned() else {
                self.fail(format!(
                    "c{sender} passed handle {h:#x}, which it does not hold"
                ));
                continue;
            };
            if src.moves() {
                self.caps.remove(&(sender, *h));
            }
            if g.rights != src.rights || g.moves != src.moves() {
                self.fail(format!(
                    "a passed capability changed: {} moves {} became {} moves {}",
                    src.rights,
                    src.moves(),
                    g.rights,
                    g.moves
                ));
            }
            let copy = ShadowCap {
                inst: 0,
                root: None,
                seq: 0,
                watched: false,
                ..src
            };
            self.insert_cap(conn, g.handle, copy);
        }
        // A call: the receiver now holds a reply capability to the caller.
        match (tag, d.reply) {
            (Some(tag), Some(reply)) => {
                let caller_home = self.home.get(&sender).copied();
                let mut r = ShadowCap::plain(caller_home, Rights::SEND_ONCE);
                r.reply_to = Some((sender, tag));
                self.insert_cap(conn, reply, r);
            }
            (None, None) => {}
            (tag, reply) => self.fail(format!(
                "a message with call tag {tag:?} was delivered with reply capability {reply:?}"
            )),
        }
        let metered = !cap.rights.contains(Rights::SEND_ONCE);
        let key = (sender, self.incs[inc].number);
        let cost = credit_cost(frame.payload.len());
        if metered {
            let c = self.in_flight_cost.entry(key).or_insert(0);
            *c += cost;
            let c = *c;
            if c > self.window {
                self.fail(format!(
                    "c{sender} has {c} credit units in flight to port {} (sent on handle {handle:#x}), above the window {}",
                    key.1, self.window
                ));
            }
        }
        self.incs[inc].fifo.push_back(InFlight {
            id,
            metered: metered.then_some((key, cost)),
            reply: d.reply,
        });
    }

    fn check_delivery(
        &mut self,
        conn: u64,
        d: &Deliver,
        sender: u64,
        cap: &ShadowCap,
        inc: usize,
        id: Option<MsgId>,
    ) {
        if let Some(id) = id
            && let Some(m) = self.msgs.get_mut(&id)
        {
            m.delivered += 1;
            if m.delivered > 1 {
                self.fail(format!("message {id:?} delivered twice"));
            }
            self.summary.delivered += 1;
        }
        if cap.inc != Some(inc) {
            self.fail(format!(
                "message {id:?} from c{sender} reached port {} of c{conn}, not the port its capability was made for",
                d.port
            ));
        }
        if let Some(&l) = cap.lineages.iter().find(|l| self.revoked.contains(l)) {
            self.fail(format!(
                "message {id:?} from c{sender} delivered on a capability of revoked lineage {l}"
            ));
        }
        if let Some(at) = cap.expires_at
            && self.unix >= at
        {
            let unix = self.unix;
            self.fail(format!(
                "message {id:?} from c{sender} delivered at {unix} on a capability that expired at {at}"
            ));
        }
        if cap.budgets.iter().any(|b| self.budgets.get(b) == Some(&0)) {
            self.fail(format!(
                "message {id:?} from c{sender} delivered on a capability with no budget left"
            ));
        }
        let origin_ok = self
            .home
            .get(&sender)
            .is_some_and(|&h| self.incs[h].number == d.origin.port);
        if !origin_ok {
            self.fail(format!(
                "message {id:?} from c{sender} carries origin {}, not its home port",
                d.origin
            ));
        }
        match cap.reply_to {
            // A reply: it must reach the caller with the call's tag, and
            // ends that call.
            Some((caller, tag)) => {
                if caller != conn || d.tag != tag {
                    self.fail(format!(
                        "a reply for call {tag} of c{caller} reached c{conn} with tag {}",
                        d.tag
                    ));
                }
                self.call_ended(caller, tag);
            }
            None if d.tag != 0 => {
                self.fail(format!("a message that is no reply carries tag {}", d.tag));
            }
            None => {}
        }
    }

    /// Capabilities in any table that reach the live port `number`.
    fn senders(&self, number: u16) -> Option<usize> {
        let inc = self
            .live_port
            .get(&number)
            .copied()
            .filter(|&i| self.incs[i].alive)?;
        Some(self.caps.values().filter(|c| c.inc == Some(inc)).count())
    }

    fn listing(&mut self, listing: &Listing) {
        self.summary.listings += 1;
        for p in &listing.ports {
            if p.address.port == 0 {
                continue;
            }
            let shadow = self
                .live_port
                .get(&p.address.port)
                .filter(|&&i| self.incs[i].alive)
                .map(|&i| self.incs[i].fifo.len());
            if shadow != Some(p.queued as usize) {
                self.fail(format!(
                    "the listing counts {} messages queued on port {}, the shadow {shadow:?}",
                    p.queued, p.address
                ));
            }
            let senders = self.senders(p.address.port);
            if senders != Some(p.senders as usize) {
                self.fail(format!(
                    "the listing counts {} senders to port {}, the shadow {senders:?}",
                    p.senders, p.address
                ));
            }
        }
        for c in &listing.connections {
            let shadow = self.caps.keys().filter(|&&(conn, _)| conn == c.id).count();
            if c.handles as usize != shadow {
                self.fail(format!(
                    "the listing counts {} handles for c{}, the shadow {shadow}",
                    c.handles, c.id
                ));
            }
        }
        for c in &listing.connections {
            let replies = self
                .caps
                .iter()
                .filter(|&(&(conn, _), cap)| conn == c.id && cap.reply_to.is_some())
                .count();
            if c.replies as usize != replies {
                self.fail(format!(
                    "the listing counts {} reply capabilities for c{}, the shadow {replies}",
                    c.replies, c.id
                ));
            }
            // Replies do not count against the handle limit.
            if c.pending_calls > self.config.max_pending_calls
                || c.handles.saturating_sub(c.replies) > self.config.max_handles
                || c.ports > self.config.max_ports
            {
                self.fail(format!("connection {} is above its limits: {c:?}", c.id));
            }
        }
    }

    fn finish(&mut self, alive: &dyn Fn(ProcessId) -> bool, records: &[(ProcessId, &Records)]) {
        let conn_alive = |s: &Self, conn: u64| {
            !s.ended.contains(&conn) && s.pid_of.get(&conn).is_some_and(|&p| alive(p))
        };
        let mut problems = Vec::new();
        // What the applications handed their drivers agrees with what
        // reached the core, and the drivers passed on what the core said.
        let records: HashMap<ProcessId, &Records> = records.iter().copied().collect();
        for (&pid, r) in &records {
            if r.rogue {
                continue;
            }
            for sent in &r.sent {
                let Some(m) = self.msgs.get(&sent.id) else {
                    if alive(pid) {
                        problems.push(format!(
                            "p{pid} sent {:?}, which never reached the junction",
                            sent.id
                        ));
                    }
                    continue;
                };
                if m.key.1 != sent.handle || m.seq != sent.seq {
                    problems.push(format!(
                        "p{pid} sent {:?} as handle {:#x} seq {}, the junction counted handle {:#x} seq {}",
                        sent.id, sent.handle, sent.seq, m.key.1, m.seq
                    ));
                }
                let reported = r.undeliverable.iter().any(|&(h, first, count, _)| {
                    h == sent.handle && (first..first + u64::from(count)).contains(&sent.seq)
                });
                if m.told_undeliverable && alive(pid) && !reported {
                    problems.push(format!(
                        "p{pid}'s driver did not report {:?} (handle {:#x} seq {}) undeliverable",
                        sent.id, sent.handle, sent.seq
                    ));
                }
            }
        }
        for (id, m) in &self.msgs {
            if m.told {
                self.summary.told += 1;
            }
            if !conn_alive(self, m.conn) {
                continue;
            }
            let (_, handle, _) = m.key;
            if m.delivered == 0 && !m.told {
                problems.push(format!(
                    "message {id:?} (c{} handle {handle:#x} seq {}) was neither delivered nor reported to its sender",
                    m.conn, m.seq
                ));
            }
            if m.must_tell && !m.confirmed && !m.told_undeliverable && !m.told {
                problems.push(format!(
                    "message {id:?} (c{} handle {handle:#x} seq {}) died unconsumed with its port, and its sender was not told",
                    m.conn, m.seq
                ));
            }
        }
        // A call whose reply capability a rogue still holds is the rogue's
        // to answer (honest applications answer everything before the end).
        let rogue = |conn: u64| {
            self.pid_of
                .get(&conn)
                .and_then(|p| records.get(p))
                .is_some_and(|r| r.rogue)
        };
        let held_by_rogue: HashSet<(u64, u64)> = self
            .caps
            .iter()
            .filter(|((holder, _), _)| rogue(*holder))
            .filter_map(|(_, c)| c.reply_to)
            .collect();
        for &(conn, tag) in &held_by_rogue {
            if let Some(&pid) = self.pid_of.get(&conn) {
                self.rogue_held_calls.insert((pid, tag));
            }
        }
        for (&(conn, tag), &ends) in &self.calls {
            if ends == 0 && conn_alive(self, conn) && !held_by_rogue.contains(&(conn, tag)) {
                problems.push(format!("call {tag} of c{conn} never ended"));
            }
        }
        problems.sort();
        for p in problems {
            self.errors.push(format!("at the end: {p}"));
        }
    }
}

/// Checks what the applications recorded: each message consumed once, in
/// per-flow order; each call of a live process ended exactly once, and a
/// reply answers the call it ended.
fn check_records(
    records: &[(ProcessId, &Records)],
    alive: &dyn Fn(ProcessId) -> bool,
    rogue_held: &HashSet<(ProcessId, u64)>,
    errors: &mut Vec<String>,
) {
    let mut sent = HashMap::new();
    for (_, r) in records {
        for s in &r.sent {
            sent.insert(s.id, s);
        }
    }
    let mut seen = BTreeSet::new();
    for (pid, r) in records {
        if r.rogue {
            continue;
        }
        // Per receiver: the last sequence number consumed per flow.
        let mut last: HashMap<(ProcessId, u64), u64> = HashMap::new();
        for c in &r.consumed {
            if !seen.insert(c.id) {
                errors.push(format!("p{pid} consumed {:?}, consumed before", c.id));
            }
            let Some(s) = sent.get(&c.id) else {
                errors.push(format!("p{pid} consumed {:?}, which nobody sent", c.id));
                continue;
            };
            if s.target.port != c.port {
                errors.push(format!(
                    "p{pid} consumed {:?} on port {}, sent to {}",
                    c.id, c.port, s.target
                ));
            }
            if let MsgKind::Reply { .. } = s.kind {
                continue;
            }
            let flow = (s.id.pid, s.instance);
            if let Some(&prev) = last.get(&flow)
                && prev >= s.seq
            {
                errors.push(format!(
                    "p{pid} consumed seq {} after seq {prev} of the flow from p{} capability #{}",
                    s.seq, flow.0, flow.1
                ));
            }
            last.insert(flow, s.seq);
        }
        for s in &r.sent {
            let MsgKind::Call { tag } = s.kind else {
                continue;
            };
            let ends = r.call_ends.get(&tag).map_or(&[][..], |v| &v[..]);
            let unanswered = ends.is_empty() && alive(*pid) && !rogue_held.contains(&(*pid, tag));
            if ends.len() > 1 || unanswered {
                errors.push(format!(
                    "p{pid}'s call {tag} ({:?}) ended {} times: {ends:?}",
                    s.id,
                    ends.len()
                ));
            }
            if let Some(CallEnd::Replied(Some(reply))) = ends.first() {
                match sent.get(reply).map(|r| r.kind) {
                    Some(MsgKind::Reply { call }) if call == s.id => {}
                    other => errors.push(format!(
                        "p{pid}'s call {tag} ({:?}) got reply {reply:?}, which answers {other:?}",
                        s.id
                    )),
                }
            }
        }
    }
}
