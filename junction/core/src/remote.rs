//! Capabilities between junctions: imports, exports, names, and calls,
//! carried by the end-to-end sessions of [`crate::peers`] as the frames of
//! [`junction_road::remote`].
//!
//! - **Imports are stand-in ports.** A capability to a port on junction C
//!   is, on junction A, an ordinary capability to a local port that stands
//!   in for it ([`Proxy::Import`], owned by no connection). So everything the
//!   core does for a local port holds for a remote one unchanged: rights,
//!   lanes and credit, budgets, expiry, revocation, watching, and the
//!   messages in flight, which the stand-in keeps until C says they were
//!   consumed ([`RemoteFrame::Settled`]) — so a slow receiver on C slows its
//!   senders on A exactly as a local one would, and a flow to another port
//!   is not held up. When C says the port died, the stand-in dies with the
//!   same reason, and its watchers and the senders of what was in flight
//!   hear as they do locally.
//! - **Exports are anchored capabilities.** What C grants junction A is a
//!   capability C itself keeps for A, in a table of A's exports (a party
//!   keyed by junction id, not a driver connection: it sends nothing and
//!   its limits are A's alone), holding exactly what was granted: rights,
//!   expiry, revocable lineages, budget. Every message from A names its
//!   export and C checks it there, so revocation, expiry and budgets hold
//!   across junctions as they do locally, whatever A does; when one ends
//!   the export, A hears ([`RemoteFrame::Dead`]). C counts the grants it
//!   made of each export (a lookup answered, a capability passed in a
//!   message), and A gives them back when its last capability to the
//!   stand-in is gone ([`RemoteFrame::Release`]); the anchor counts as a
//!   sender of the port meanwhile, so a port's no-senders notice waits for
//!   every junction. A junction C never granted a port reaches nothing.
//! - **Calls** are answered through a stand-in per calling junction
//!   ([`Proxy::Replies`]): the callee's reply capability reaches it, and a
//!   reply, or the capability's death, goes back as [`RemoteFrame::Reply`]
//!   or [`RemoteFrame::CallFailed`] under the caller junction's id for the
//!   call.
//! - **Junctions restart and vanish.** When the session reports a peer's
//!   new incarnation, everything shared with its earlier life ends: imports
//!   die with `JunctionRestarted`, its exports are released, calls fail.
//!   Messages to ports travel on data lanes, which the session gives up on
//!   when the owner stays out of reach: each given-up message is reported
//!   to its sender, and its call failed, with `JunctionUnreachable` (its
//!   fate is unknown), and the import lives on. Everything else travels on
//!   control lanes the session never gives up on, so a partition delays
//!   grants, releases, settlements and deaths but loses none, and both
//!   ends agree again once it heals. An owner keeps the exports of a
//!   holder that stays unreachable for [`crate::Config::export_lease`], so
//!   that a partition does not fire a no-senders notice early.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use junction_identity::ServiceName;
use junction_road::control::ControlReply;
use junction_road::frame::credit_cost;
use junction_road::highway::{MAX_ANNOUNCED_NAME_BYTES, MAX_ANNOUNCED_NAMES};
use junction_road::monitor::MessageKind;
use junction_road::remote::{
    self as wire, CALL_LANE, Carried, Possession, REMOTE_LANE_BASE, RemoteFrame, RemotePort,
    RemoteSend, control_lane, data_lane,
};
use junction_road::{
    Address, Chained, Deliver, ErrorCode, ErrorFrame, Frame, Granted, Header, Reason, Rights,
};

use crate::caps::{CallAt, Cap, CapRef, ReplyRoute, Target};
use crate::control::refused;
use crate::path::Envelope;
use crate::ports::{InFlight, PortTable, port_key};
use crate::session::{Ending, SendError, SessionEvent};
use crate::slab::Key;
use crate::{ConnId, Core, Output, Refusal, quiet};
use junction_identity::CapabilityToken;

/// What a stand-in port stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proxy {
    /// A port on another junction, imported.
    Import {
        /// The junction that owns it.
        owner: u16,
        /// The port there.
        port: RemotePort,
        /// Grants received and not released.
        grants: u32,
        /// This junction's number for the next message to it.
        next_n: u64,
        /// Credit units of the messages in flight to it.
        units: u32,
        /// Why every capability to it is dead, when the owner said so.
        dead: Option<Reason>,
        /// While the owner has not yet answered the token this junction
        /// was passed it with: the `Open` request (its `port.export` is
        /// not known until then).
        opening: Option<u32>,
    },
    /// Reply capabilities for calls from junction `caller` reach it.
    Replies {
        /// The calling junction.
        caller: u16,
    },
}

impl Proxy {
    /// Why every capability to it is dead, if the owner said so.
    pub(crate) fn dead(self) -> Option<Reason> {
        match self {
            Proxy::Import { dead, .. } => dead,
            Proxy::Replies { .. } => None,
        }
    }
}

/// A frame waiting for room on a session lane, and the message it is, if
/// it is one to an import.
type Waiting = (Chained, Option<SentMessage>);

/// A message to an import, as the session carries it: its stand-in, its
/// number there, and the call it makes (0 for none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SentMessage {
    key: Key,
    n: u64,
    call: u64,
}

/// What this junction exports to one holder junction: the grants of one
/// anchor capability in the holder's export table.
#[derive(Debug, Clone, Copy)]
struct Export {
    /// Grants made and not released.
    grants: u32,
    /// Credit units of the holder's messages delivered and not consumed.
    units: u32,
}

/// How many messages' worth of credit units one import may have in flight,
/// in windows: what several drivers of one junction share toward one
/// remote port, and what the owner holds for one holder at most.
const IMPORT_WINDOWS: u32 = 4;

/// How long an import is kept after its token was passed on to a third
/// junction (which opens it with the owner promptly), or a capability to
/// it was sent home, though nothing here uses it any more.
const DELEGATION_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// Lookups waiting for another junction's answer, at most.
const MAX_PENDING_LOOKUPS: usize = 1024;

/// The remote state of the core.
#[derive(Debug, Default)]
pub(crate) struct Remote {
    /// Stand-ins for imported ports, by owner and port.
    imports: HashMap<(u16, RemotePort), Key>,
    /// Stand-ins for calls from each junction.
    replies: HashMap<u16, Key>,
    /// Exports by (port number, holder junction, anchor handle).
    exports: BTreeMap<(u16, u16, u32), Export>,
    /// Each holder junction's table of anchors.
    parties: HashMap<u16, ConnId>,
    /// Calls made from here to another junction: (callee junction, call id)
    /// to the caller and its tag.
    calls_out: HashMap<(u16, u64), (ConnId, u64)>,
    next_call: u64,
    /// Calls from other junctions answered here: (caller junction, its
    /// call id) to the reply capability.
    calls_in: HashMap<(u16, u64), CapRef>,
    /// Lookups asked of other junctions: (owner, request) to the caller
    /// and its tag, and the name.
    lookups: HashMap<(u16, u32), (ConnId, u64, ServiceName)>,
    next_req: u32,
    /// Frames a session lane had no room for yet, in order, per (peer,
    /// lane).
    backlog: HashMap<(u16, u32), VecDeque<Waiting>>,
    /// Messages to imports the session has not yet handed up at their
    /// owner, per (owner, lane), by session number: numbers only grow on a
    /// lane, so each list is in order and an acknowledgement takes from
    /// its front.
    sent: BTreeMap<(u16, u32), VecDeque<(u64, SentMessage)>>,
    /// The incarnation each peer was last known by.
    incarnations: HashMap<u16, u64>,
    /// Holder junctions with no route, since when.
    unreachable: HashMap<u16, Instant>,
    /// Remote frames refused since start.
    refused: u64,
    /// Tokens for the imports it holds (by stand-in), to pass them on.
    tokens: HashMap<Key, CapabilityToken>,
    /// Stand-ins waiting for their owner to open a token: (owner, open)
    /// to the stand-in.
    opening: HashMap<(u16, u32), Key>,
    next_open: u32,
    /// Messages to stand-ins still opening, in order.
    waiting: HashMap<Key, VecDeque<Envelope>>,
    /// Imports kept after their token was passed on, until then, so that
    /// the owner still has the grant the token names when the third
    /// junction opens it.
    holds: BTreeMap<(Instant, Key), ()>,
    /// The stand-in being killed, and the address its lane is known by:
    /// credit given back as it dies still names that lane.
    pub(crate) dying: Option<(u16, Address)>,
    /// Settlements not yet shipped, in the order they were made: the
    /// consumption reported by a batch of frames goes out as one
    /// `Settled` per run of messages, not one per report.
    settling: Vec<Settling>,
}

/// Messages `first..first + count` that holder junction `to` sent to
/// `port` were settled here, and it has not been told yet.
#[derive(Debug, Clone, Copy)]
struct Settling {
    to: u16,
    port: RemotePort,
    first: u64,
    count: u32,
}

impl Remote {
    /// The reply capability for call `call` from `junction` is now at `at`.
    pub(crate) fn reply_is_at(&mut self, junction: u16, call: u64, at: CapRef) {
        self.calls_in.insert((junction, call), at);
    }

    /// The address a driver knows port number `number`'s lane by: the
    /// remote port's, for a stand-in.
    pub(crate) fn lane_address(&self, ports: &PortTable, me: u16, number: u16) -> Address {
        if let Some((dying, address)) = self.dying
            && dying == number
        {
            return address;
        }
        match ports
            .key(number)
            .and_then(|k| ports.get(k))
            .and_then(|p| p.proxy)
        {
            Some(Proxy::Import { owner, port, .. }) => Address::new(owner, port.port),
            Some(Proxy::Replies { caller }) => Address::new(caller, 0),
            None => Address::new(me, number),
        }
    }

    /// Whether `conn` is a holder junction's table of exports.
    pub(crate) fn is_party(&self, conn: ConnId) -> bool {
        self.parties.values().any(|&p| p == conn)
    }

    /// For each junction, how many of its ports this one imports and how
    /// many exports it holds here (one per anchor), for listings: one pass
    /// over both tables.
    pub(crate) fn counts_by_junction(&self) -> BTreeMap<u16, (u32, u32)> {
        let mut counts: BTreeMap<u16, (u32, u32)> = BTreeMap::new();
        for &(owner, _) in self.imports.keys() {
            counts.entry(owner).or_default().0 += 1;
        }
        for &(_, holder, _) in self.exports.keys() {
            counts.entry(holder).or_default().1 += 1;
        }
        counts
    }

    /// Entries held, for the footprint: imports, exports, calls, lookups,
    /// frames waiting for session room.
    pub(crate) fn len(&self) -> usize {
        self.imports.len()
            + self.replies.len()
            + self.exports.len()
            + self.calls_out.len()
            + self.calls_in.len()
            + self.lookups.len()
            + self.backlog.values().map(VecDeque::len).sum::<usize>()
            + self.sent.values().map(VecDeque::len).sum::<usize>()
            + self.tokens.len()
            + self.opening.len()
            + self.waiting.values().map(VecDeque::len).sum::<usize>()
            + self.holds.len()
    }

    /// Notes message `seq` of `lane` to `owner` as sent to an import.
    fn note_sent(&mut self, owner: u16, lane: u32, seq: u64, message: SentMessage) {
        self.sent
            .entry((owner, lane))
            .or_default()
            .push_back((seq, message));
    }

    /// Forgets the messages of `lane` to `owner` numbered below `upto`.
    fn forget_sent(&mut self, owner: u16, lane: u32, upto: u64) {
        if let Some(list) = self.sent.get_mut(&(owner, lane)) {
            while list.front().is_some_and(|&(n, _)| n < upto) {
                list.pop_front();
            }
            if list.is_empty() {
                self.sent.remove(&(owner, lane));
            }
        }
    }

    /// Takes the messages of `lane` to `owner` numbered in `range`, in
    /// order.
    fn take_sent(
        &mut self,
        owner: u16,
        lane: u32,
        range: std::ops::Range<u64>,
    ) -> Vec<SentMessage> {
        let Some(list) = self.sent.get_mut(&(owner, lane)) else {
            return Vec::new();
        };
        let start = list.partition_point(|&(n, _)| n < range.start);
        let end = list.partition_point(|&(n, _)| n < range.end);
        let taken = list.drain(start..end).map(|(_, m)| m).collect();
        if list.is_empty() {
            self.sent.remove(&(owner, lane));
        }
        taken
    }

    /// When the soonest export lease or import hold runs out.
    pub(crate) fn next_lease(&self, lease: std::time::Duration) -> Option<Instant> {
        let lease = self.unreachable.values().min().map(|&since| since + lease);
        let hold = self.holds.keys().next().map(|&(at, _)| at);
        lease.into_iter().chain(hold).min()
    }
}

impl Core {
    /// How many frames about capabilities other junctions sent were
    /// refused since this junction started (each is logged, at most once a
    /// second): forged exports, tokens that do not hold, bad bytes.
    pub fn remote_refusals(&self) -> u64 {
        self.remote.refused
    }

    /// The address a driver knows the lane to port number `number` by.
    pub(crate) fn lane_address(&self, number: u16) -> Address {
        self.remote
            .lane_address(&self.ports, self.config.junction, number)
    }

    /// Sends a remote frame without a payload to junction `to` on `lane`,
    /// after whatever waits for room on that lane.
    fn ship(&mut self, to: u16, lane: u32, frame: &RemoteFrame) {
        self.ship_noted(to, lane, frame, &Bytes::new(), None);
    }

    /// [`Core::ship`] for a frame with a payload (a message or a reply).
    /// For a message to an import, the session's number for it is
    /// `noted`, so that if the session gives it up, its sender is told
    /// which message.
    fn ship_noted(
        &mut self,
        to: u16,
        lane: u32,
        frame: &RemoteFrame,
        payload: &Bytes,
        noted: Option<SentMessage>,
    ) {
        if !self.remote.settling.is_empty() {
            // What this port's holder is owed goes first: a lane keeps the
            // order things were said in (a `Dead` after a settlement must
            // not overtake it).
            self.ship_settling(|s| s.to == to && control_lane(s.port.port) == lane);
        }
        self.ship_now(to, lane, frame, payload, noted);
    }

    /// Settlements wait, to be merged with those that follow, until the
    /// junction next transmits or something else goes on their lane.
    fn settle_later(&mut self, to: u16, port: RemotePort, first: u64, count: u32) {
        let pending = self
            .remote
            .settling
            .iter_mut()
            .find(|s| s.to == to && s.port == port);
        match pending {
            Some(s)
                if s.first.checked_add(u64::from(s.count)) == Some(first)
                    && s.count.checked_add(count).is_some() =>
            {
                s.count += count;
            }
            Some(_) => {
                // Not a continuation: what waits on the lane goes first.
                let lane = control_lane(port.port);
                self.ship_settling(|s| s.to == to && control_lane(s.port.port) == lane);
                self.remote.settling.push(Settling {
                    to,
                    port,
                    first,
                    count,
                });
            }
            None => self.remote.settling.push(Settling {
                to,
                port,
                first,
                count,
            }),
        }
    }

    /// Ships the pending settlements that `which` picks, in order.
    fn ship_settling(&mut self, which: impl Fn(&Settling) -> bool) {
        let mut pending = std::mem::take(&mut self.remote.settling);
        for s in pending.iter().filter(|s| which(s)) {
            let frame = RemoteFrame::Settled {
                port: s.port,
                first: s.first,
                count: s.count,
            };
            self.ship_now(s.to, control_lane(s.port.port), &frame, &Bytes::new(), None);
        }
        pending.retain(|s| !which(s));
        self.remote.settling = pending;
    }

    /// Ships every pending settlement.
    pub(crate) fn ship_all_settling(&mut self) {
        if !self.remote.settling.is_empty() {
            self.ship_settling(|_| true);
        }
    }

    /// Whether settlements wait to be shipped.
    pub(crate) fn has_settling(&self) -> bool {
        !self.remote.settling.is_empty()
    }

    /// [`Core::ship_noted`], behind nothing that waits to be merged.
    fn ship_now(
        &mut self,
        to: u16,
        lane: u32,
        frame: &RemoteFrame,
        payload: &Bytes,
        noted: Option<SentMessage>,
    ) {
        let bytes = wire::chained(frame, payload);
        if let Some(waiting) = self.remote.backlog.get_mut(&(to, lane)) {
            waiting.push_back((bytes, noted));
            return;
        }
        match self.session_send(to, lane, bytes.clone()) {
            Ok(seq) => {
                if let Some(message) = noted {
                    self.remote.note_sent(to, lane, seq, message);
                }
            }
            Err(SendError::NoCredit { .. }) => {
                self.remote
                    .backlog
                    .entry((to, lane))
                    .or_default()
                    .push_back((bytes, noted));
            }
            Err(e) => {
                // Frames are bounded by the largest driver frame, and the
                // window holds two of those; a session has room for the
                // remote lanes. Neither can happen; say so if it does.
                tracing::error!(junction = to, "a remote frame could not be sent: {e}");
            }
        }
    }

    /// A session lane to `to` got room: what waited for it goes.
    fn ship_backlog(&mut self, to: u16, lane: u32) {
        while let Some((bytes, noted)) = self
            .remote
            .backlog
            .get_mut(&(to, lane))
            .and_then(|w| w.front().cloned())
        {
            match self.session_send(to, lane, bytes) {
                Ok(seq) => {
                    if let Some(message) = noted {
                        self.remote.note_sent(to, lane, seq, message);
                    }
                    if let Some(w) = self.remote.backlog.get_mut(&(to, lane)) {
                        w.pop_front();
                    }
                }
                Err(_) => return,
            }
        }
        self.remote.backlog.remove(&(to, lane));
    }

    /// An event of the session with junction `peer`.
    pub(crate) fn session_event(&mut self, peer: u16, event: SessionEvent) {
        match event {
            SessionEvent::Delivered { lane, payload, .. } if lane >= REMOTE_LANE_BASE => {
                self.remote_arrived(peer, payload);
            }
            SessionEvent::Acked { lane, upto, .. } if lane >= REMOTE_LANE_BASE => {
                // Handed up there: what becomes of them is the owner's to
                // say now.
                self.remote.forget_sent(peer, lane, upto);
                self.ship_backlog(peer, lane);
            }
            SessionEvent::Ended {
                lane,
                first_seq,
                count,
                why,
                ..
            } if lane >= REMOTE_LANE_BASE => {
                match why {
                    Ending::PeerRestarted => self.junction_lost(peer, Reason::JunctionRestarted),
                    Ending::Unreachable => {
                        // Only messages to ports are given up (control
                        // lanes persist): their senders hear, one by one.
                        let end = first_seq.saturating_add(count);
                        for message in self.remote.take_sent(peer, lane, first_seq..end) {
                            self.message_lost(peer, message);
                        }
                    }
                }
                self.ship_backlog(peer, lane);
            }
            event => self.out.push_back(Output::Session { peer, event }),
        }
    }

    /// The session gave up on a message to an import of `owner`'s: it may
    /// or may not have arrived. Its sender is told so, and a call it made
    /// fails so.
    fn message_lost(&mut self, owner: u16, message: SentMessage) {
        let SentMessage { key, n, call } = message;
        let reason = Reason::JunctionUnreachable;
        let tag = if call != 0 {
            self.remote
                .calls_out
                .remove(&(owner, call))
                .and_then(|(caller, tag)| {
                    let c = self.conns.get_mut(caller.key())?;
                    c.calls.remove(&tag)?;
                    c.pending_calls = c.pending_calls.saturating_sub(1);
                    Some(tag)
                })
        } else {
            None
        };
        let number = key.index as u16;
        let Some(p) = self.ports.get_mut(key) else {
            return;
        };
        let Some(i) = p.in_flight.iter().position(|e| e.n == n) else {
            return;
        };
        let entry = p.in_flight.remove(i).unwrap_or_else(|| unreachable!());
        if let Some(Proxy::Import { units, .. }) = p.proxy.as_mut() {
            *units = units.saturating_sub(entry.cost);
        }
        if let Some(at) = entry.flow
            && self.settle(at, 1, entry.cost, number)
        {
            self.refuse_message(at.conn, at.handle, entry.seq, tag, reason);
        }
        if self.ports.get(key).is_some_and(|p| p.senders == 0) {
            self.proxy_idle(key);
        }
    }

    /// Junction `peer` is known by `incarnation`: if it restarted,
    /// everything shared with its earlier life ends.
    pub(crate) fn remote_incarnation(&mut self, peer: u16, incarnation: u64) {
        let known = self.remote.incarnations.insert(peer, incarnation);
        if known.is_some_and(|k| k < incarnation) {
            self.junction_lost(peer, Reason::JunctionRestarted);
        }
    }

    /// Junction `peer` restarted: everything shared with its earlier life
    /// ends, with `reason`.
    fn junction_lost(&mut self, peer: u16, reason: Reason) {
        let imports: Vec<Key> = self
            .remote
            .imports
            .iter()
            .filter(|((owner, _), _)| *owner == peer)
            .map(|(_, &k)| k)
            .chain(
                self.remote
                    .opening
                    .iter()
                    .filter(|((owner, _), _)| *owner == peer)
                    .map(|(_, &k)| k),
            )
            .collect();
        for key in imports {
            self.fail_waiting(key, reason);
            self.kill_port(key, reason);
        }
        let calls: Vec<(u64, (ConnId, u64))> = self
            .remote
            .calls_out
            .iter()
            .filter(|((j, _), _)| *j == peer)
            .map(|(&(_, call), &to)| (call, to))
            .collect();
        for (call, _) in calls {
            self.remote_call_ended(peer, call, reason);
        }
        let lookups: Vec<u32> = self
            .remote
            .lookups
            .keys()
            .filter(|(j, _)| *j == peer)
            .map(|&(_, req)| req)
            .collect();
        for req in lookups {
            if let Some((conn, tag, name)) = self.remote.lookups.remove(&(peer, req)) {
                let what = format!(
                    "{name} is registered on junction {peer}, which did not answer: {reason}"
                );
                self.control_answer(conn, tag, refused(Refusal::NameNotFound { what }), None);
            }
        }
        if reason == Reason::JunctionRestarted {
            // Its earlier life held nothing it can still use or release.
            self.drop_exports_of(peer);
            self.remote.calls_in.retain(|(j, _), _| *j != peer);
            if let Some(key) = self.remote.replies.remove(&peer) {
                self.kill_port(key, reason);
            }
            self.remote.backlog.retain(|(j, _), _| *j != peer);
            self.remote.sent.retain(|(j, _), _| *j != peer);
        }
    }

    /// Every export to `holder` ends: its anchors leave their table, and
    /// it no longer counts as a sender.
    fn drop_exports_of(&mut self, holder: u16) {
        self.remote.exports.retain(|&(_, h, _), _| h != holder);
        self.remote.unreachable.remove(&holder);
        if let Some(party) = self.remote.parties.remove(&holder) {
            self.forget(party, Reason::JunctionRestarted);
        }
    }

    /// Holder junction `holder`'s table of exports, made on first use.
    fn party(&mut self, holder: u16) -> Option<ConnId> {
        if let Some(&party) = self.remote.parties.get(&holder) {
            return Some(party);
        }
        let party = self.new_party(holder);
        self.remote.parties.insert(holder, party);
        Some(party)
    }

    /// A capability like `source` (same port, rights, expiry, lineages and
    /// budgets) exported to `holder`: an anchor already made for it gets
    /// one grant more, else a new anchor. `None` when the holder's table of
    /// exports is full.
    fn export(&mut self, holder: u16, source: &Cap) -> Option<RemotePort> {
        let key = source.port();
        let number = key.index as u16;
        let party = self.party(holder)?;
        let same = |a: &Cap| {
            a.port() == key
                && a.rights == source.rights
                && a.expires_at == source.expires_at
                && a.lineages == source.lineages
                && a.budgets == source.budgets
                && a.dead.is_none()
        };
        let found = self
            .remote
            .exports
            .range((number, holder, 0)..=(number, holder, u32::MAX))
            .map(|(&(_, _, anchor), _)| anchor)
            .find(|&anchor| self.cap(party, anchor).is_some_and(same));
        let anchor = match found {
            Some(anchor) => {
                if let Some(e) = self.remote.exports.get_mut(&(number, holder, anchor)) {
                    e.grants = e.grants.saturating_add(1);
                }
                anchor
            }
            None => {
                let flow = self.new_flow();
                let mut copy = source.copy(flow);
                copy.reply_to = None;
                let anchor = self.insert_cap(party, copy)?;
                self.remote.exports.insert(
                    (number, holder, anchor),
                    Export {
                        grants: 1,
                        units: 0,
                    },
                );
                anchor
            }
        };
        Some(RemotePort {
            port: number,
            generation: key.generation,
            export: anchor,
        })
    }

    /// The table and anchor of `port`'s export to `from`, if it is one.
    fn anchor(&self, from: u16, port: RemotePort) -> Option<(ConnId, &Cap)> {
        let party = *self.remote.parties.get(&from)?;
        if !self
            .remote
            .exports
            .contains_key(&(port.port, from, port.export))
        {
            return None;
        }
        let cap = self.cap(party, port.export)?;
        (cap.port() == port_key(port.port, port.generation)).then_some((party, cap))
    }

    /// An anchor died on its own (revoked, expired, budget spent): its
    /// holder junction hears. The dead anchor stays until the holder
    /// releases it, so that what the holder sends meanwhile is refused
    /// with the reason, and what it sent before is still settled.
    pub(crate) fn export_died(&mut self, party: ConnId, anchor: u32, reason: Reason) {
        let Some(holder) = self
            .remote
            .parties
            .iter()
            .find(|&(_, &p)| p == party)
            .map(|(&h, _)| h)
        else {
            return;
        };
        let Some(key) = self.cap(party, anchor).map(|c| c.port()) else {
            return;
        };
        let port = RemotePort {
            port: key.index as u16,
            generation: key.generation,
            export: anchor,
        };
        self.ship(
            holder,
            control_lane(port.port),
            &RemoteFrame::Dead { port, reason },
        );
    }

    /// Junction `from` gives back `grants` grants of an export.
    fn released(&mut self, from: u16, port: RemotePort, grants: u32) {
        let k = (port.port, from, port.export);
        let Some(party) = self.anchor(from, port).map(|(p, _)| p) else {
            return;
        };
        if let Some(e) = self.remote.exports.get_mut(&k) {
            e.grants = e.grants.saturating_sub(grants);
            if e.grants == 0 {
                self.remote.exports.remove(&k);
                self.remove_cap(party, port.export, Reason::ReplyDropped);
            }
        }
    }

    /// Leases: a holder junction that stayed unreachable for
    /// `export_lease` gives up its exports.
    pub(crate) fn remote_timeout(&mut self) {
        let now = self.now.instant;
        while let Some((&(at, key), _)) = self.remote.holds.first_key_value()
            && at <= now
        {
            self.remote.holds.remove(&(at, key));
            if self.ports.get(key).is_some_and(|p| p.senders == 0) {
                self.proxy_idle(key);
            }
        }
        let lease = self.config.export_lease;
        let holders: Vec<u16> = self.remote.parties.keys().copied().collect();
        for holder in holders {
            if self.router.route(holder).is_some() {
                self.remote.unreachable.remove(&holder);
                continue;
            }
            let since = *self.remote.unreachable.entry(holder).or_insert(now);
            if now >= since + lease {
                tracing::info!(
                    junction = holder,
                    "junction unreachable for {lease:?}: its capabilities to ports here are released"
                );
                self.drop_exports_of(holder);
            }
        }
    }

    /// `name` is not registered here: ask the junction that announces it.
    pub(crate) fn lookup_elsewhere(
        &mut self,
        conn: ConnId,
        tag: u64,
        name: ServiceName,
    ) -> Option<(ControlReply, Option<Granted>)> {
        let owner = self
            .name_owner(&name)
            .filter(|&o| o != self.config.junction);
        let Some(owner) = owner else {
            let what = format!("no service is registered as {name}");
            return Some((refused(Refusal::NameNotFound { what }), None));
        };
        if self.remote.lookups.len() >= MAX_PENDING_LOOKUPS {
            let what = format!(
                "{name} is on junction {owner}, and {MAX_PENDING_LOOKUPS} lookups wait for other junctions already; try again"
            );
            return Some((refused(Refusal::NameNotFound { what }), None));
        }
        self.remote.next_req = self.remote.next_req.wrapping_add(1).max(1);
        let req = self.remote.next_req;
        self.remote
            .lookups
            .insert((owner, req), (conn, tag, name.clone()));
        self.ship(owner, CALL_LANE, &RemoteFrame::Lookup { req, name });
        None
    }

    /// Tells routing the names registered here, for other junctions.
    pub(crate) fn announce_names(&mut self) {
        let names: Vec<ServiceName> = self.registry.iter().map(|(n, _)| n.clone()).collect();
        self.router_names(names);
        self.pump_router();
    }

    /// The reachable junction that announces `name`.
    fn name_owner(&mut self, name: &ServiceName) -> Option<u16> {
        self.router.owner_of(name)
    }

    /// Routing announces these names for this junction. Past the
    /// announcement's bounds, the first names in order that fit are
    /// announced, and the others can be looked up here only (said in the
    /// log): a local registration never fails for the bus's sake.
    fn router_names(&mut self, mut names: Vec<ServiceName>) {
        names.sort_unstable();
        let mut bytes = 0;
        let fit = names
            .iter()
            .take(MAX_ANNOUNCED_NAMES)
            .take_while(|n| {
                bytes += n.as_str().len();
                bytes <= MAX_ANNOUNCED_NAME_BYTES
            })
            .count();
        let left_out = names.len() - fit;
        names.truncate(fit);
        if let Err(e) = self.router.announce_names(names) {
            tracing::error!("the names registered here could not be announced: {e}");
        }
        if left_out > 0
            && let Some(unlogged) = self.quiet.routing.admit(self.now.instant)
        {
            tracing::warn!(
                "{left_out} names registered here are past what a junction announces ({MAX_ANNOUNCED_NAMES} names, {MAX_ANNOUNCED_NAME_BYTES} bytes): other junctions cannot look them up{}",
                quiet::more(unlogged)
            );
        }
    }

    /// A message admitted on a capability to stand-in `key`: it goes to
    /// the junction the stand-in is for.
    pub(crate) fn deliver_remote(&mut self, envelope: Envelope, key: Key) {
        let Some(proxy) = self.ports.get(key).and_then(|p| p.proxy) else {
            return;
        };
        let (to, lane) = match proxy {
            Proxy::Import {
                dead: Some(reason), ..
            } => {
                // Every capability to it died with its export: as a send
                // on a dead local capability.
                return self.undeliverable(envelope, key, reason);
            }
            Proxy::Import {
                opening: Some(_), ..
            } => {
                // Sent once the owner opens the token, in order.
                self.remote
                    .waiting
                    .entry(key)
                    .or_default()
                    .push_back(envelope);
                return;
            }
            Proxy::Import { owner, port, .. } => (owner, data_lane(port.port)),
            Proxy::Replies { caller } => (caller, CALL_LANE),
        };
        let carried = match self.carry(&envelope, to) {
            Ok(carried) => carried,
            Err(refusal) => {
                let Envelope {
                    from,
                    via,
                    flow,
                    cost,
                    call,
                    reply_to,
                    caps,
                    ..
                } = envelope;
                if let Some(at) = flow {
                    self.settle(at, 1, cost, key.index as u16);
                }
                if let Some(route) = reply_to {
                    // The reply capability was used by a refused reply.
                    self.call_failed(route, Reason::ReplyDropped);
                }
                self.release_moving(from, &caps);
                self.refuse_call(from, 0, via, call.unwrap_or(0), refusal);
                return;
            }
        };
        match proxy {
            Proxy::Import { owner, port, .. } => {
                self.send_to_import(envelope, key, owner, port, carried)
            }
            Proxy::Replies { .. } => {
                let Some(ReplyRoute::Remote { junction, call }) = envelope.reply_to else {
                    return;
                };
                self.remote.calls_in.remove(&(junction, call));
                self.observe_shipped(
                    Address::new(junction, 0),
                    envelope.origin,
                    envelope.from,
                    MessageKind::Reply,
                    carried.len(),
                    &envelope.payload,
                );
                let frame = RemoteFrame::Reply {
                    call,
                    caps: carried,
                };
                self.ship_noted(junction, lane, &frame, &envelope.payload, None);
                self.carried_away(envelope.from, &envelope.caps);
            }
        }
    }

    fn send_to_import(
        &mut self,
        envelope: Envelope,
        key: Key,
        owner: u16,
        port: RemotePort,
        caps: Vec<Carried>,
    ) {
        let window = self.config.window.saturating_mul(IMPORT_WINDOWS);
        let Envelope {
            from,
            origin,
            via,
            flow,
            seq,
            cost,
            call,
            payload,
            low_credit,
            caps: handles,
            ..
        } = envelope;
        let n = match self.ports.get_mut(key).and_then(|p| p.proxy.as_mut()) {
            Some(Proxy::Import { next_n, units, .. }) if *units + cost <= window || *units == 0 => {
                *units += cost;
                *next_n += 1;
                *next_n - 1
            }
            _ => {
                if let Some(at) = flow {
                    self.settle(at, 1, cost, key.index as u16);
                }
                self.release_moving(from, &handles);
                let refusal = Refusal::NoCredit { handle: via, cost };
                self.refuse_call(from, 0, via, call.unwrap_or(0), refusal);
                return;
            }
        };
        let call = match call {
            Some(tag) => {
                self.remote.next_call += 1;
                let id = self.remote.next_call;
                self.remote.calls_out.insert((owner, id), (from, tag));
                if let Some(c) = self.conns.get_mut(from.key()) {
                    c.calls.insert(
                        tag,
                        CallAt::Remote {
                            junction: owner,
                            call: id,
                        },
                    );
                    c.pending_calls += 1;
                }
                id
            }
            None => 0,
        };
        if let Some(p) = self.ports.get_mut(key) {
            p.in_flight.push_back(InFlight {
                flow,
                cost,
                seq,
                reply: None,
                is_reply: false,
                junction: 0,
                export: 0,
                n,
            });
        }
        let identity = self
            .conns
            .get(from.key())
            .and_then(|c| c.identity.as_ref().map(|(id, _)| id.as_ref().clone()));
        let kind = if call == 0 {
            MessageKind::Send
        } else {
            MessageKind::Call
        };
        let to = Address::new(owner, port.port);
        self.observe_shipped(to, origin, from, kind, caps.len(), &payload);
        let frame = RemoteFrame::Send(RemoteSend {
            port,
            n,
            origin,
            identity,
            call,
            ack: low_credit,
            caps,
        });
        let noted = SentMessage { key, n, call };
        self.ship_noted(owner, data_lane(port.port), &frame, &payload, Some(noted));
        self.carried_away(from, &handles);
    }

    /// The capabilities a message to junction `to` carries, as they travel;
    /// checked first, so that a refusal changes nothing (exports made for
    /// the message are given back). A capability to a port here is exported
    /// to `to`; one to a port of `to` goes home; one to a port of a third
    /// junction goes as its token, delegated to `to`.
    fn carry(&mut self, envelope: &Envelope, to: u16) -> Result<Vec<Carried>, Refusal> {
        let caps = &envelope.caps;
        if caps.is_empty() {
            return Ok(Vec::new());
        }
        let from = envelope.from;
        let Some(c) = self.conns.get(from.key()) else {
            return Err(Refusal::UnknownHandle {
                handle: envelope.via,
            });
        };
        let mut sources = Vec::with_capacity(caps.len());
        let mut tokens = Vec::new();
        for (i, &handle) in caps.iter().enumerate() {
            if caps[..i].contains(&handle) || handle == envelope.via {
                return Err(Refusal::RepeatedAttachment { handle });
            }
            let Some(cap) = c.caps.get(handle) else {
                return Err(Refusal::UnknownAttachment { handle });
            };
            let rights = cap.rights;
            if !rights.contains(Rights::GRANT) {
                return Err(Refusal::NotGrantable { handle, rights });
            }
            if cap.reply_to.is_some() {
                return Err(Refusal::CannotCross {
                    handle,
                    why: "it is a reply capability, which answers its call on this junction".into(),
                });
            }
            match self.ports.get(cap.port()).and_then(|p| p.proxy) {
                None => {}
                Some(Proxy::Import { owner, .. }) if owner == to => {}
                Some(Proxy::Import { .. }) => {
                    // Signed here, once: nothing after can refuse it.
                    let token = self
                        .delegation(cap.port(), to, rights, cap.expires_at)
                        .map_err(|why| Refusal::CannotCross { handle, why })?;
                    tokens.push((handle, token));
                }
                Some(Proxy::Replies { .. }) => {
                    return Err(Refusal::CannotCross {
                        handle,
                        why: "it answers a call from another junction".into(),
                    });
                }
            }
            sources.push(cap.clone());
        }
        let mut carried = Vec::with_capacity(sources.len());
        let mut tokens = tokens.into_iter();
        for (source, &handle) in sources.iter().zip(caps) {
            let rights = source.rights;
            match self.ports.get(source.port()).and_then(|p| p.proxy) {
                Some(Proxy::Import { owner, port, .. }) if owner == to => {
                    // The import's grants go back only after this message
                    // has been taken (messages and releases travel on
                    // different lanes): kept a while, as for a token.
                    let until = self.now.instant + DELEGATION_HOLD;
                    self.remote.holds.insert((until, source.port()), ());
                    carried.push(Carried::Home { port, rights });
                }
                Some(Proxy::Import { .. }) => {
                    let Some((_, token)) = tokens.find(|(h, _)| *h == handle) else {
                        continue;
                    };
                    // The grant the token names must outlive its journey.
                    let until = self.now.instant + DELEGATION_HOLD;
                    self.remote.holds.insert((until, source.port()), ());
                    carried.push(Carried::Token { token });
                }
                _ => match self.export(to, source) {
                    Some(port) => {
                        let token = self.issue_token(to, port, source);
                        carried.push(Carried::Grant {
                            port,
                            rights,
                            token,
                        });
                    }
                    None => {
                        // The grants made for this message go back.
                        for item in &carried {
                            if let Carried::Grant { port, .. } = item {
                                self.released(to, *port, 1);
                            }
                        }
                        let limit = self.config.max_handles;
                        return Err(Refusal::CannotCross {
                            handle,
                            why: format!(
                                "this junction exports {limit} capabilities to junction {to} already, the most it keeps"
                            ),
                        });
                    }
                },
            }
        }
        Ok(carried)
    }

    /// The attachments of a message that left for another junction: moving
    /// ones leave the sender's table.
    fn carried_away(&mut self, from: ConnId, caps: &[u32]) {
        for &handle in caps {
            if self.cap(from, handle).is_some_and(|cap| cap.moves())
                && let Some(cap) = self.take_cap(from, handle)
            {
                self.sender_gone(cap.port());
            }
        }
    }

    /// One grant more of `port` on junction `owner`: the stand-in for it,
    /// made on first use. `None` when no port number is free.
    fn import(
        &mut self,
        owner: u16,
        port: RemotePort,
        token: Option<CapabilityToken>,
    ) -> Option<Key> {
        if let Some(&key) = self.remote.imports.get(&(owner, port))
            && let Some(Proxy::Import { grants, .. }) =
                self.ports.get_mut(key).and_then(|p| p.proxy.as_mut())
        {
            *grants = grants.saturating_add(1);
            if let Some(token) = token {
                self.remote.tokens.insert(key, token);
            }
            return Some(key);
        }
        let key = self.ports.open_proxy(Proxy::Import {
            owner,
            port,
            grants: 1,
            next_n: 0,
            units: 0,
            dead: None,
            opening: None,
        });
        match key {
            Some(key) => {
                self.remote.imports.insert((owner, port), key);
                if let Some(token) = token {
                    self.remote.tokens.insert(key, token);
                }
            }
            None => {
                // Nothing can hold it: the grant goes back at once.
                self.ship(
                    owner,
                    control_lane(port.port),
                    &RemoteFrame::Release { port, grants: 1 },
                );
            }
        }
        key
    }

    /// The stand-in reply capabilities for calls from `caller` reach.
    fn replies_port(&mut self, caller: u16) -> Option<Key> {
        if let Some(&key) = self.remote.replies.get(&caller)
            && self.ports.get(key).is_some()
        {
            return Some(key);
        }
        let key = self.ports.open_proxy(Proxy::Replies { caller })?;
        self.remote.replies.insert(caller, key);
        Some(key)
    }

    /// The owner says an import died. A port's death (closed, owner gone,
    /// restart) ends the stand-in and reports what was in flight
    /// undeliverable, as locally; a capability's own death (revoked,
    /// expired, spent) makes every capability to the stand-in dead, while
    /// what was in flight is still settled as the owner reports it.
    fn import_died(&mut self, from: u16, port: RemotePort, reason: Reason) {
        let Some(&key) = self.remote.imports.get(&(from, port)) else {
            return;
        };
        if !matches!(
            reason,
            Reason::Revoked | Reason::Expired | Reason::Exhausted
        ) {
            self.kill_port(key, reason);
            return;
        }
        let Some(p) = self.ports.get_mut(key) else {
            return;
        };
        if let Some(Proxy::Import { dead, .. }) = p.proxy.as_mut() {
            dead.get_or_insert(reason);
        }
        let watchers = std::mem::take(&mut p.watchers);
        for at in watchers {
            self.cap_died(at.conn, at.handle, reason, |c| c.flow == at.flow);
        }
    }

    /// A stand-in has no capabilities left: an import with nothing in
    /// flight gives its grants back and goes. Stand-ins for replies live as
    /// long as their junction's session.
    pub(crate) fn proxy_idle(&mut self, key: Key) {
        let Some(p) = self.ports.get(key) else {
            return;
        };
        let Some(Proxy::Import {
            owner,
            port,
            grants,
            opening,
            ..
        }) = p.proxy
        else {
            return;
        };
        let held = self.remote.holds.keys().any(|&(_, k)| k == key);
        if p.senders > 0 || !p.in_flight.is_empty() || opening.is_some() || held {
            return;
        }
        self.ports.remove(key, Reason::PortClosed);
        self.remote.imports.remove(&(owner, port));
        self.remote.tokens.remove(&key);
        self.ship(
            owner,
            control_lane(port.port),
            &RemoteFrame::Release { port, grants },
        );
    }

    /// Port `key` died here (with stand-in `proxy`, if it was one): holders
    /// of an export hear, and a stand-in's books go.
    pub(crate) fn remote_port_died(&mut self, key: Key, proxy: Option<&Proxy>, reason: Reason) {
        match proxy {
            Some(Proxy::Import {
                owner,
                port,
                opening,
                ..
            }) => {
                self.remote.imports.remove(&(*owner, *port));
                self.remote.tokens.remove(&key);
                if let Some(open) = opening {
                    self.remote.opening.remove(&(*owner, *open));
                }
                return;
            }
            Some(Proxy::Replies { caller }) => {
                self.remote.replies.remove(caller);
                return;
            }
            None => {}
        }
        let number = key.index as u16;
        let exports: Vec<(u16, u32)> = self
            .remote
            .exports
            .range((number, 0, 0)..=(number, u16::MAX, u32::MAX))
            .map(|(&(_, h, a), _)| (h, a))
            .collect();
        for (holder, anchor) in exports {
            self.remote.exports.remove(&(number, holder, anchor));
            let Some(&party) = self.remote.parties.get(&holder) else {
                continue;
            };
            // The anchor goes with its port.
            let generation = self.cap(party, anchor).map(|c| c.port().generation);
            self.take_cap(party, anchor);
            if generation != Some(key.generation) {
                continue;
            }
            let port = RemotePort {
                port: number,
                generation: key.generation,
                export: anchor,
            };
            self.ship(
                holder,
                control_lane(number),
                &RemoteFrame::Dead { port, reason },
            );
        }
    }

    /// Consumption of messages from other junctions, reported by the owner
    /// of port `key`: (junction, export, number, cost) per message, oldest
    /// first.
    pub(crate) fn remote_settled(&mut self, key: Key, settled: &[(u16, u32, u64, u32)]) {
        let mut i = 0;
        while i < settled.len() {
            let (junction, export, first, cost) = settled[i];
            let mut count = 1u32;
            let mut units = cost;
            while let Some(&(j, e, n, cost)) = settled.get(i + count as usize)
                && (j, e) == (junction, export)
                && n == first + u64::from(count)
            {
                count += 1;
                units += cost;
            }
            i += count as usize;
            let port = RemotePort {
                port: key.index as u16,
                generation: key.generation,
                export,
            };
            if let Some(e) = self.remote.exports.get_mut(&(port.port, junction, export)) {
                e.units = e.units.saturating_sub(units);
            }
            self.settle_later(junction, port, first, count);
        }
    }

    /// The call `call` from junction `junction` ends without a reply: its
    /// caller's junction hears.
    pub(crate) fn remote_call_failed(&mut self, junction: u16, call: u64, reason: Reason) {
        if self.remote.calls_in.remove(&(junction, call)).is_some() {
            self.ship(
                junction,
                CALL_LANE,
                &RemoteFrame::CallFailed { call, reason },
            );
        }
    }

    /// A caller here gave up on its call `call` to `junction`.
    pub(crate) fn remote_cancel(&mut self, junction: u16, call: u64) {
        if self.remote.calls_out.remove(&(junction, call)).is_some() {
            self.ship(junction, CALL_LANE, &RemoteFrame::Cancel { call });
        }
    }

    /// Connection `conn` left with these calls: those to other junctions
    /// are cancelled there; lookups it waited for are forgotten.
    pub(crate) fn remote_caller_gone(&mut self, conn: ConnId, calls: &HashMap<u64, CallAt>) {
        for at in calls.values() {
            if let CallAt::Remote { junction, call } = *at {
                self.remote_cancel(junction, call);
            }
        }
        self.remote.lookups.retain(|_, (c, _, _)| *c != conn);
    }

    /// Call `call` to `junction` ends without a reply, for `reason`.
    fn remote_call_ended(&mut self, junction: u16, call: u64, reason: Reason) {
        let Some((caller, tag)) = self.remote.calls_out.remove(&(junction, call)) else {
            return;
        };
        let Some(c) = self.conns.get_mut(caller.key()) else {
            return;
        };
        if c.calls.remove(&tag).is_some() {
            c.pending_calls = c.pending_calls.saturating_sub(1);
            self.frame(caller, Header::CallFailed { tag, reason });
        }
    }

    /// Logs, rate-limited, a remote frame that junction `from` should not
    /// have sent.
    fn refuse_remote(&mut self, from: u16, why: &str) {
        self.remote.refused += 1;
        if let Some(unlogged) = self.quiet.routing.admit(self.now.instant) {
            tracing::warn!(
                junction = from,
                "refused a remote frame: {why}{}",
                quiet::more(unlogged)
            );
        }
    }

    /// A remote frame arrived from junction `from` over their session.
    fn remote_arrived(&mut self, from: u16, bytes: Bytes) {
        let (frame, payload) = match wire::decode(&bytes) {
            Ok(decoded) => decoded,
            Err(e) => return self.refuse_remote(from, &e.to_string()),
        };
        match frame {
            RemoteFrame::Lookup { req, name } => self.answer_lookup(from, req, name),
            found @ RemoteFrame::Found { .. } => self.found(from, found),
            RemoteFrame::NotFound { req, message } => {
                if let Some((conn, tag, _)) = self.remote.lookups.remove(&(from, req)) {
                    let what = format!("junction {from}: {message}");
                    self.control_answer(conn, tag, refused(Refusal::NameNotFound { what }), None);
                }
            }
            RemoteFrame::Send(send) => self.remote_send(from, send, payload),
            RemoteFrame::Settled { port, first, count } => {
                self.import_settled(from, port, first, u64::from(count), None);
            }
            RemoteFrame::Refused {
                port,
                n,
                call,
                code,
                message,
            } => {
                let tag = if call != 0 {
                    self.forget_remote_call(from, call)
                } else {
                    0
                };
                self.import_settled(from, port, n, 1, Some((code, message, tag)));
            }
            RemoteFrame::Dead { port, reason } => self.import_died(from, port, reason),
            RemoteFrame::Release { port, grants } => self.released(from, port, grants),
            RemoteFrame::Reply { call, caps } => self.remote_reply(from, call, caps, payload),
            RemoteFrame::CallFailed { call, reason } => self.remote_call_ended(from, call, reason),
            RemoteFrame::Open { open, token } => self.open(from, open, token),
            RemoteFrame::Opened { open, port } => self.opened(from, open, port),
            RemoteFrame::OpenRefused {
                open,
                reason,
                message,
            } => {
                if let Some(key) = self.remote.opening.remove(&(from, open)) {
                    let why = format!(
                        "junction {from} refused a capability passed on to here: {message}"
                    );
                    self.refuse_remote(from, &why);
                    self.fail_waiting(key, reason);
                    self.kill_port(key, reason);
                }
            }
            RemoteFrame::Cancel { call } => {
                if let Some(at) = self.remote.calls_in.get(&(from, call)).copied() {
                    self.cap_died(at.conn, at.handle, Reason::Cancelled, |cap| {
                        cap.flow == at.flow
                    });
                }
            }
        }
    }

    /// A call to `junction` is over without a reply to deliver (refused
    /// there): it stops counting as pending.
    /// Its tag, for the refusal (0 if the caller is gone).
    fn forget_remote_call(&mut self, junction: u16, call: u64) -> u64 {
        if let Some((caller, tag)) = self.remote.calls_out.remove(&(junction, call))
            && let Some(c) = self.conns.get_mut(caller.key())
            && c.calls.remove(&tag).is_some()
        {
            c.pending_calls = c.pending_calls.saturating_sub(1);
            return tag;
        }
        0
    }

    /// Junction `from` asks for a capability to the service `name`.
    fn answer_lookup(&mut self, from: u16, req: u32, name: ServiceName) {
        let Some(reg) = self.registry.get(&name).cloned() else {
            let message = format!("no service is registered as {name}");
            self.ship(from, CALL_LANE, &RemoteFrame::NotFound { req, message });
            return;
        };
        let flow = self.new_flow();
        let source = Cap::new(Target::Local(reg.port), reg.rights, None, flow);
        let Some(port) = self.export(from, &source) else {
            let limit = self.config.max_handles;
            let message = format!(
                "junction {} exports {limit} capabilities to junction {from} already, the most it keeps",
                self.config.junction
            );
            self.ship(from, CALL_LANE, &RemoteFrame::NotFound { req, message });
            return;
        };
        let frame = RemoteFrame::Found {
            req,
            port,
            rights: reg.rights,
            chain: reg.chain.map(|c| c.as_ref().clone()),
            proof: reg
                .proof
                .map(|(nonce, signature)| Possession { nonce, signature }),
            token: self.issue_token(from, port, &source),
        };
        self.ship(from, control_lane(port.port), &frame);
    }

    /// Junction `from` answered lookup `req`: the asker gets a capability
    /// to the stand-in, once the certificate chain is shown to grant the
    /// name.
    fn found(&mut self, from: u16, found: RemoteFrame) {
        let RemoteFrame::Found {
            req,
            port,
            rights,
            chain,
            proof,
            token,
        } = found
        else {
            return;
        };
        let lookup = self.remote.lookups.remove(&(from, req));
        let Some(key) = self.import(from, port, token) else {
            if let Some((conn, tag, _)) = lookup {
                let reply = refused(Refusal::NoFreePort);
                self.control_answer(conn, tag, reply, None);
            }
            return;
        };
        let Some((conn, tag, name)) = lookup else {
            // Nobody waits (the asker left): the grant goes back.
            self.proxy_idle(key);
            return;
        };
        if let Err(what) = self.check_found(from, &name, chain.as_deref(), proof.as_ref(), rights) {
            self.proxy_idle(key);
            let what = format!("junction {from} answered for {name} with {what}");
            self.refuse_remote(from, &what);
            self.control_answer(conn, tag, refused(Refusal::NameNotFound { what }), None);
            return;
        }
        let limit = self.config.max_handles;
        let handle = if self.has_room(conn, 1) {
            self.new_cap(conn, key, rights, None)
        } else {
            None
        };
        let Some(handle) = handle else {
            self.proxy_idle(key);
            self.control_answer(conn, tag, refused(Refusal::TooManyHandles { limit }), None);
            return;
        };
        let address = Address::new(from, port.port);
        let granted = Granted {
            handle,
            rights,
            credits: self.initial_credits(rights),
            address,
            moves: rights.contains(Rights::SEND_ONCE),
        };
        self.control_answer(
            conn,
            tag,
            ControlReply::Found { address, chain },
            Some(granted),
        );
    }

    /// What a looker-up checks of junction `from`'s answer: rights a
    /// capability can have, and a chain that this junction trusts, that
    /// grants the name, and whose key the service proved it holds to
    /// `from` (or a name in the development namespace, with none).
    fn check_found(
        &self,
        from: u16,
        name: &ServiceName,
        chain: Option<&[junction_identity::Certificate]>,
        proof: Option<&Possession>,
        rights: Rights,
    ) -> Result<(), String> {
        if !rights.is_valid() {
            return Err(format!("rights {rights}, which no capability has"));
        }
        match chain {
            Some(chain) => {
                let leaf = self
                    .config
                    .trust
                    .verify_chain(chain, self.now.unix, self.config.revocations.as_ref())
                    .map_err(|e| format!("a certificate chain this junction refuses: {e}"))?;
                if !leaf.grants(name) {
                    return Err("a certificate that does not grant the name".into());
                }
                let proof =
                    proof.ok_or("a certificate but no proof that the service holds its key")?;
                junction_identity::verify_possession(leaf, &proof.nonce, from, &proof.signature)
                    .map_err(|e| {
                        format!("a proof of possession not made for junction {from}: {e}")
                    })?;
                Ok(())
            }
            None if self.config.dev_namespace.iter().any(|p| p.matches(name)) => Ok(()),
            None => Err("no certificate, outside the development namespace".into()),
        }
    }

    /// Messages `first..first + count` to the import of `port` from `from`
    /// are settled; `refused` says why they were turned away, if they were.
    fn import_settled(
        &mut self,
        from: u16,
        port: RemotePort,
        first: u64,
        count: u64,
        refused: Option<(ErrorCode, String, u64)>,
    ) {
        let Some(&key) = self.remote.imports.get(&(from, port)) else {
            return;
        };
        let number = key.index as u16;
        let dead = match self.ports.get(key).and_then(|p| p.proxy) {
            Some(Proxy::Import { dead, .. }) => dead,
            _ => None,
        };
        let mut done = Vec::new();
        if let Some(p) = self.ports.get_mut(key) {
            let end = first.saturating_add(count);
            let start = p.in_flight.partition_point(|e| e.n < first);
            let stop = p.in_flight.partition_point(|e| e.n < end);
            done.extend(p.in_flight.drain(start..stop));
            let units: u32 = done.iter().map(|e| e.cost).sum();
            if let Some(Proxy::Import { units: held, .. }) = p.proxy.as_mut() {
                *held = held.saturating_sub(units);
            }
        }
        if refused.is_none() {
            // Consumed: their credit goes back once per run of one flow, as
            // a local port's consumption is reported, not once a message.
            let mut i = 0;
            while i < done.len() {
                let Some(at) = done[i].flow else {
                    i += 1;
                    continue;
                };
                let (mut count, mut units) = (0u32, 0u32);
                while let Some(e) = done.get(i)
                    && e.flow == Some(at)
                {
                    count += 1;
                    units += e.cost;
                    i += 1;
                }
                self.settle(at, count, units, number);
            }
        }
        for entry in done.iter().filter(|_| refused.is_some()) {
            if let Some(at) = entry.flow {
                let told = self.settle(at, 1, entry.cost, number);
                match (&refused, dead) {
                    (Some((_, _, tag)), Some(reason)) if told => {
                        // Sent on a capability that died meanwhile: as a
                        // local send on a dead capability is told.
                        let call = (*tag != 0).then_some(*tag);
                        self.refuse_message(at.conn, at.handle, entry.seq, call, reason);
                    }
                    (Some((code, message, tag)), _) if told => {
                        self.out.push_back(Output::Frame {
                            conn: at.conn,
                            frame: Frame::bare(Header::Error(ErrorFrame {
                                req: 0,
                                handle: at.handle,
                                tag: *tag,
                                code: *code,
                                message: format!("junction {from} refused the message: {message}"),
                            })),
                        });
                    }
                    _ => {}
                }
            }
        }
        if self.ports.get(key).is_some_and(|p| p.senders == 0) {
            self.proxy_idle(key);
        }
    }

    /// A message from a driver on junction `from` to a port here, by the
    /// export it names; checked there as a local send is checked on its
    /// capability.
    fn remote_send(&mut self, from: u16, send: RemoteSend, payload: Bytes) {
        let RemoteSend {
            port,
            n,
            origin,
            identity,
            call,
            ack,
            caps,
        } = send;
        let key = port_key(port.port, port.generation);
        let lane = control_lane(port.port);
        let refuse = |code: ErrorCode, message: String| RemoteFrame::Refused {
            port,
            n,
            call,
            code,
            message,
        };
        if origin.junction != from {
            let why = format!("a message from junction {from} claims origin {origin}");
            self.refuse_remote(from, &why);
            self.ship(from, lane, &refuse(ErrorCode::MissingRight, why));
            return;
        }
        let owner = self.ports.get(key).and_then(|p| p.owner);
        let now = self.now.unix;
        let anchor = self.anchor(from, port).map(|(party, cap)| {
            let dead = cap
                .dead
                .or(cap
                    .expires_at
                    .is_some_and(|at| now >= at)
                    .then_some(Reason::Expired))
                .or(self
                    .books
                    .exhausted(&cap.budgets)
                    .then_some(Reason::Exhausted));
            (party, dead, cap.budgets.clone())
        });
        let (party, budgets) = match (owner, anchor) {
            (Some(_), Some((party, None, budgets))) => (party, budgets),
            (Some(_), Some((party, Some(reason), _))) => {
                // Dead on its own (the holder hears now if it has not), and
                // so is this message.
                self.cap_died(party, port.export, reason, |_| true);
                let why = format!("the capability is dead: {reason}");
                self.ship(from, lane, &refuse(ErrorCode::MissingRight, why));
                return;
            }
            (None, _) => {
                let reason = self.ports.death_reason(key);
                self.ship(from, lane, &RemoteFrame::Dead { port, reason });
                return;
            }
            (Some(_), None) => {
                let why = format!(
                    "junction {from} holds no capability to port {}",
                    Address::new(self.config.junction, port.port)
                );
                self.refuse_remote(from, &why);
                self.ship(from, lane, &refuse(ErrorCode::MissingRight, why));
                return;
            }
        };
        let Some(owner) = owner else {
            return;
        };
        let cost = credit_cost(payload.len());
        let limit = self.config.window.saturating_mul(IMPORT_WINDOWS);
        let units = self
            .remote
            .exports
            .get(&(port.port, from, port.export))
            .map_or(0, |e| e.units);
        if units > 0 && units + cost > limit {
            let why = format!(
                "junction {from} has {units} credit units in flight to this port, the most is {limit}"
            );
            self.refuse_remote(from, &why);
            self.ship(from, lane, &refuse(ErrorCode::NoCredit, why));
            return;
        }
        let slot = call == 0
            || self
                .conns
                .get(owner.key())
                .is_some_and(|c| c.caps.has_slot());
        if !slot || !self.has_room(owner, caps.len()) {
            let why = Refusal::ReceiverFull.to_string();
            self.ship(from, lane, &refuse(ErrorCode::TooManyHandles, why));
            return;
        }
        // A capability coming home must be one this junction gave `from`,
        // alive, with at least the rights it comes with.
        for item in &caps {
            if let Carried::Home { port: home, rights } = *item {
                let given = self
                    .anchor(from, home)
                    .is_some_and(|(_, a)| a.dead.is_none() && a.rights.contains(rights));
                if !given {
                    let why = format!(
                        "junction {from} passed on a capability to port {} it does not hold",
                        Address::new(self.config.junction, home.port)
                    );
                    self.refuse_remote(from, &why);
                    self.ship(from, lane, &refuse(ErrorCode::MissingRight, why));
                    return;
                }
            }
        }
        // One message from each budget the export draws from, as locally.
        let exhausted = !budgets.is_empty() && self.books.spend(&budgets);
        let granted = self.receive_carried(from, owner, &caps);
        let reply = if call != 0 {
            let route = ReplyRoute::Remote {
                junction: from,
                call,
            };
            let handle = self
                .replies_port(from)
                .and_then(|k| self.new_cap(owner, k, Rights::SEND_ONCE, Some(route)));
            if let Some(handle) = handle {
                self.track_call(route, owner, handle, true);
            }
            handle
        } else {
            None
        };
        if let Some(e) = self.remote.exports.get_mut(&(port.port, from, port.export)) {
            e.units += cost;
        }
        if let Some(p) = self.ports.get_mut(key) {
            p.in_flight.push_back(InFlight {
                flow: None,
                cost,
                seq: 0,
                reply,
                is_reply: false,
                junction: from,
                export: port.export,
                n,
            });
        }
        let deliver = Deliver {
            port: port.port,
            origin,
            tag: 0,
            reply,
            caps: granted,
            ack,
            identity: identity.map(Arc::new),
        };
        self.out.push_back(Output::Frame {
            conn: owner,
            frame: Frame::with_payload(Header::Deliver(deliver), payload),
        });
        if exhausted {
            self.budget_spent(party, port.export);
        }
    }

    /// Capabilities that came from junction `from`, into `to`'s table: a
    /// grant becomes a capability to a stand-in; one coming home, a copy of
    /// its anchor, with every limit it was granted with; a token passed on
    /// from a third junction, a capability to a stand-in that opens it with
    /// its owner.
    fn receive_carried(&mut self, from: u16, to: ConnId, caps: &[Carried]) -> Vec<Granted> {
        let mut granted = Vec::with_capacity(caps.len());
        for item in caps {
            let flow = self.new_flow();
            let (cap, address) = match item {
                Carried::Grant {
                    port,
                    rights,
                    token,
                } => {
                    let (port, rights) = (*port, *rights);
                    let Some(key) = self.import(from, port, token.clone()) else {
                        continue;
                    };
                    let cap = Cap::new(Target::Local(key), rights, None, flow);
                    (cap, Address::new(from, port.port))
                }
                Carried::Token { token } => {
                    let Some((key, rights)) = self.open_token(from, token.clone()) else {
                        continue;
                    };
                    let cap = Cap::new(Target::Local(key), rights, None, flow);
                    (cap, Address::new(token.body.owner, token.body.port))
                }
                &Carried::Home { port, rights } => {
                    let Some(mut cap) = self.anchor(from, port).map(|(_, a)| a.copy(flow)) else {
                        continue;
                    };
                    cap.rights = rights;
                    (cap, Address::new(self.config.junction, port.port))
                }
            };
            let (rights, moves, key) = (cap.rights, cap.moves(), cap.port());
            let Some(handle) = self.insert_cap(to, cap) else {
                if !matches!(item, Carried::Home { .. }) {
                    self.proxy_idle(key);
                }
                continue;
            };
            granted.push(Granted {
                handle,
                rights,
                credits: self.initial_credits(rights),
                address,
                moves,
            });
        }
        granted
    }

    /// The reply to call `call` came from junction `from`.
    fn remote_reply(&mut self, from: u16, call: u64, caps: Vec<Carried>, payload: Bytes) {
        let Some((caller, tag)) = self.remote.calls_out.remove(&(from, call)) else {
            // Cancelled, or its caller left: grants it carried go back.
            self.release_grants(from, &caps);
            return;
        };
        let home = self.conns.get(caller.key()).map(|c| c.home);
        let Some(home) = home.and_then(|h| self.ports.key(h)) else {
            self.release_grants(from, &caps);
            return;
        };
        if !self.has_room(caller, caps.len()) {
            self.release_grants(from, &caps);
            self.remote_call_ended_here(caller, tag, Reason::ReplyDropped);
            return;
        }
        if let Some(c) = self.conns.get_mut(caller.key()) {
            c.calls.remove(&tag);
        }
        let granted = self.receive_carried(from, caller, &caps);
        if let Some(p) = self.ports.get_mut(home) {
            p.in_flight.push_back(InFlight {
                flow: None,
                cost: 0,
                seq: 0,
                reply: None,
                is_reply: true,
                junction: 0,
                export: 0,
                n: 0,
            });
        }
        let ack = self
            .conns
            .get(caller.key())
            .is_some_and(|c| c.pending_calls >= self.config.max_pending_calls / 2);
        let deliver = Deliver {
            port: home.index as u16,
            origin: Address::new(from, 0),
            tag,
            reply: None,
            caps: granted,
            ack,
            identity: None,
        };
        self.out.push_back(Output::Frame {
            conn: caller,
            frame: Frame::with_payload(Header::Deliver(deliver), payload),
        });
    }

    /// The call `tag` of `caller` ends here, for `reason`.
    fn remote_call_ended_here(&mut self, caller: ConnId, tag: u64, reason: Reason) {
        if let Some(c) = self.conns.get_mut(caller.key())
            && c.calls.remove(&tag).is_some()
        {
            c.pending_calls = c.pending_calls.saturating_sub(1);
            self.frame(caller, Header::CallFailed { tag, reason });
        }
    }

    /// Grants that came from junction `from` with nobody to take them go
    /// back at once.
    fn release_grants(&mut self, from: u16, caps: &[Carried]) {
        for item in caps {
            if let Carried::Grant { port, .. } = *item {
                self.ship(
                    from,
                    control_lane(port.port),
                    &RemoteFrame::Release { port, grants: 1 },
                );
            }
        }
    }

    /// A token for a grant of `port` to `holder`, signed with this
    /// junction's key, describing `anchor` (the exported capability);
    /// `None` for a junction without a key.
    fn issue_token(&self, holder: u16, port: RemotePort, anchor: &Cap) -> Option<CapabilityToken> {
        let (key, _) = self.config.junction_identity.as_ref()?;
        let body = junction_identity::TokenBody {
            owner: self.config.junction,
            port: port.port,
            generation: port.generation,
            export: port.export,
            rights: anchor.rights.bits(),
            holder,
            expires_at: anchor.expires_at.unwrap_or(u64::MAX),
            serial: anchor.flow.0,
            budget: self.books.left(&anchor.budgets),
        };
        Some(CapabilityToken::issue(body, key))
    }

    /// The token for stand-in `key`, delegated to junction `to` with
    /// `rights` until `expires_at` (the capability's own limits), or why
    /// it cannot be passed on.
    fn delegation(
        &self,
        key: Key,
        to: u16,
        rights: Rights,
        expires_at: Option<u64>,
    ) -> Result<CapabilityToken, String> {
        let owner = match self.ports.get(key).and_then(|p| p.proxy) {
            Some(Proxy::Import { owner, .. }) => owner,
            _ => return Err("it is not held from another junction".into()),
        };
        let Some((my_key, _)) = self.config.junction_identity.as_ref() else {
            return Err(format!(
                "it reaches a port on junction {owner}, and passing it on to junction {to} needs a token signed by junction keys, which this junction has none of"
            ));
        };
        let Some(token) = self.remote.tokens.get(&key) else {
            return Err(format!(
                "it reaches a port on junction {owner}, which gave no token for it (a junction without a key)"
            ));
        };
        let (_, held, expiry) = token.current();
        let expiry = expires_at.map_or(expiry, |e| e.min(expiry));
        token
            .delegate(my_key, to, rights.bits() & held, expiry)
            .map_err(|e| format!("its token cannot be passed on: {e}"))
    }

    /// A token junction `from` passed on to here: a stand-in that opens it
    /// with the owner, and the rights it carries. `None` (the capability is
    /// left out of the message) when the token is not for this junction or
    /// names no rights a capability can have.
    fn open_token(&mut self, from: u16, token: CapabilityToken) -> Option<(Key, Rights)> {
        let (holder, bits, _) = token.current();
        let rights = Rights::from_bits(bits).filter(|r| r.is_valid());
        let owner = token.body.owner;
        let (true, Some(rights)) = (
            holder == self.config.junction && owner != self.config.junction,
            rights,
        ) else {
            self.refuse_remote(from, "a token passed on to here is not for this junction");
            return None;
        };
        self.remote.next_open = self.remote.next_open.wrapping_add(1);
        let open = self.remote.next_open;
        let port = RemotePort {
            port: token.body.port,
            generation: token.body.generation,
            export: u32::MAX,
        };
        let key = self.ports.open_proxy(Proxy::Import {
            owner,
            port,
            grants: 0,
            next_n: 0,
            units: 0,
            dead: None,
            opening: Some(open),
        })?;
        self.remote.opening.insert((owner, open), key);
        self.ship(
            owner,
            control_lane(port.port),
            &RemoteFrame::Open { open, token },
        );
        Some((key, rights))
    }

    /// Junction `from` presents a token to open: verified once, here; if it
    /// holds, `from` gets an export of its own, inheriting everything the
    /// grant the token names has (lineages, budget, expiry), narrowed to
    /// the token's rights and expiry.
    fn open(&mut self, from: u16, open: u32, token: CapabilityToken) {
        let port = RemotePort {
            port: token.body.port,
            generation: token.body.generation,
            export: token.body.export,
        };
        let lane = control_lane(port.port);
        let refuse = |reason: Reason, message: String| RemoteFrame::OpenRefused {
            open,
            reason,
            message,
        };
        let me = self.config.junction;
        let grantee = token.body.holder;
        let verified = token.verify(from, self.now.unix, |id| self.router.junction_key(id));
        let token = match verified {
            Ok(token) if token.body.owner == me => token.into_inner(),
            Ok(_) => {
                let why = "the token is not for a port of this junction".to_string();
                self.refuse_remote(from, &why);
                return self.ship(from, lane, &refuse(Reason::Revoked, why));
            }
            Err(e) => {
                let reason = match e {
                    junction_identity::IdentityError::TokenExpired { .. } => Reason::Expired,
                    _ => Reason::Revoked,
                };
                let why = format!("the token does not hold: {e}");
                self.refuse_remote(from, &why);
                return self.ship(from, lane, &refuse(reason, why));
            }
        };
        let Some(source) = self.anchor(grantee, port).map(|(_, a)| a.clone()) else {
            let why = format!(
                "junction {grantee}'s capability it was passed on from is gone (released, or its port closed)"
            );
            return self.ship(
                from,
                lane,
                &refuse(
                    self.ports
                        .death_reason(port_key(port.port, port.generation)),
                    why,
                ),
            );
        };
        if let Some(reason) = source.dead {
            let why = format!("the capability it was passed on from is dead: {reason}");
            return self.ship(from, lane, &refuse(reason, why));
        }
        let (_, bits, expiry) = token.current();
        let flow = self.new_flow();
        let mut cap = source.copy(flow);
        cap.rights = Rights::from_bits(bits & source.rights.bits()).unwrap_or(Rights::NONE);
        if expiry != u64::MAX {
            cap.expires_at = Some(cap.expires_at.map_or(expiry, |e| e.min(expiry)));
        }
        let anchor = self
            .party(from)
            .and_then(|party| self.insert_cap(party, cap));
        let Some(anchor) = anchor else {
            let limit = self.config.max_handles;
            let why = format!(
                "junction {me} exports {limit} capabilities to junction {from} already, the most it keeps"
            );
            return self.ship(from, lane, &refuse(Reason::Revoked, why));
        };
        self.remote.exports.insert(
            (port.port, from, anchor),
            Export {
                grants: 1,
                units: 0,
            },
        );
        let port = RemotePort {
            export: anchor,
            ..port
        };
        self.ship(from, lane, &RemoteFrame::Opened { open, port });
    }

    /// The owner opened the token a stand-in waited for: it is an import
    /// like any other now, and what waited for it goes.
    fn opened(&mut self, from: u16, open: u32, port: RemotePort) {
        let Some(key) = self.remote.opening.remove(&(from, open)) else {
            // Its stand-in died meanwhile: the grant goes back.
            return self.ship(
                from,
                control_lane(port.port),
                &RemoteFrame::Release { port, grants: 1 },
            );
        };
        if let Some(Proxy::Import {
            port: p,
            grants,
            opening,
            ..
        }) = self.ports.get_mut(key).and_then(|p| p.proxy.as_mut())
        {
            *p = port;
            *grants = 1;
            *opening = None;
        }
        self.remote.imports.insert((from, port), key);
        for envelope in self.remote.waiting.remove(&key).unwrap_or_default() {
            self.deliver_remote(envelope, key);
        }
        if self.ports.get(key).is_some_and(|p| p.senders == 0) {
            self.proxy_idle(key);
        }
    }

    /// Messages that waited for stand-in `key` to open will never go: their
    /// senders hear, as for a dead capability.
    fn fail_waiting(&mut self, key: Key, reason: Reason) {
        for envelope in self.remote.waiting.remove(&key).unwrap_or_default() {
            self.undeliverable(envelope, key, reason);
        }
    }

    /// A message for stand-in `key` that will never go: its credit comes
    /// back, its moving attachments leave, and its sender hears it is
    /// undeliverable for `reason` (its call fails), as for a dead port.
    fn undeliverable(&mut self, envelope: Envelope, key: Key, reason: Reason) {
        let Envelope {
            from,
            via,
            flow,
            seq,
            cost,
            call,
            caps,
            ..
        } = envelope;
        if let Some(at) = flow {
            self.settle(at, 1, cost, key.index as u16);
        }
        self.release_moving(from, &caps);
        self.refuse_message(from, via, seq, call, reason);
    }
}
