//! End-to-end sessions between two junctions, sans-IO: one [`Session`] per
//! peer junction, carrying messages both ways over whatever path routing
//! chooses, and keeping the delivery contract across hops, cut links and
//! restarts: each message is handed up once, in order per lane, or its
//! sender is told what became of it.
//!
//! - **Incarnations.** Each junction has an incarnation, chosen when it
//!   starts and greater than in any earlier life (its start time, as in
//!   routing). Every frame names its sender's and the one it is meant for.
//!   A destination takes data only when it names its own incarnation, and
//!   answers anything else with a [`SessionReset`] naming it, so the sender
//!   learns it (at first contact, when the sender names 0) or learns the
//!   destination restarted. Frames from an older incarnation of the peer are
//!   ignored; nothing of an earlier life is taken for the current one.
//! - **Lanes.** The sender picks a lane per flow; each lane numbers its
//!   messages from 0 and is acknowledged cumulatively ([`SessionAck`]'s
//!   `upto`: every message below it was handed up).
//! - **Credit bounds what a sender keeps.** A sender keeps each message until
//!   it is acknowledged, at most `window` credit units per lane
//!   ([`credit_cost`]); a send beyond that is refused ([`SendError::NoCredit`])
//!   and the caller waits for an [`SessionEvent::Acked`].
//! - **Duplicates and gaps at the destination.** The destination hands up
//!   only the next message it expects on a lane; an earlier one is a
//!   duplicate and is dropped, a later one is dropped too (go-back-N: the
//!   sender resends from its oldest unacknowledged). So the destination
//!   buffers nothing: its reorder buffer is empty by construction, at the
//!   cost of resending what a reordering path delivered early. Either way it
//!   acknowledges, so a sender whose acknowledgement was lost hears again.
//! - **Retransmission** of a lane's unacknowledged messages when its timer
//!   runs out (`rto`, or the measured round trip and four times its
//!   variation if longer, so a slow path is not flooded with copies of
//!   what is still on its way; doubled on each timeout without progress up
//!   to `max_rto`), and at once, for every lane, when the caller says the
//!   route changed ([`Session::route_changed`]).
//! - **Outcomes.** When the peer restarts, or a lane makes no progress for
//!   `give_up` (30 s by default), every message not acknowledged ends with an
//!   [`Outcome`] its sender is told: [`Outcome::Unknown`] if it was ever
//!   sent to a known incarnation of the peer (it may have been handed up),
//!   [`Outcome::Undelivered`] if it never was (it cannot have been: the
//!   destination takes nothing addressed to incarnation 0). A restart starts
//!   a new session, with every lane numbered from 0 again; giving up on a
//!   lane moves its `base` past what was given up, which tells the
//!   destination not to wait for it, and traffic goes on.
//!
//! Between junctions with keys, these frames travel sealed end to end
//! ([`crate::secure`]): what reaches a session was sent by its peer, once.
//! Nothing here relies on it beyond bounding what a peer can make this
//! junction hold.
//!
//! Driven like the core: `send` and `handle_*` with the time, drained with
//! [`Session::poll_transmit`] (frames for the peer, over the current route)
//! and [`Session::poll_event`] (deliveries, acknowledgements, outcomes), and
//! woken at [`Session::poll_timeout`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use junction_road::Chained;
use junction_road::frame::credit_cost;
pub use junction_road::session::{SessionAck, SessionData, SessionFrame, SessionReset};

/// How a session behaves; both ends of one should agree on `window` and
/// `max_lanes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Credit units a lane may have unacknowledged (a message costs
    /// [`credit_cost`] of its payload), and so at most that many messages.
    pub window: u32,
    /// The most lanes a session keeps each way. Lanes live as long as the
    /// session (their numbering must go on), so this bounds its memory.
    pub max_lanes: usize,
    /// How long a lane waits for an acknowledgement before resending.
    pub rto: Duration,
    /// The longest that wait grows to, doubling on each timeout.
    pub max_rto: Duration,
    /// How long a lane with unacknowledged messages may go without progress
    /// before they are given up, with their outcomes.
    pub give_up: Duration,
    /// Lanes from this one on are never given up for want of progress:
    /// what is sent on them is kept until it is acknowledged or the peer
    /// restarts (state both ends must agree on, which a partition delays
    /// but must not lose). Their messages still count against the window.
    pub persistent_from: u32,
    /// How long an acknowledgement may wait for data going the other way
    /// to ride with (a call's reply, say), so that a round trip costs two
    /// frames, not four. It goes at once past a quarter window of messages
    /// received, and for a duplicate or a gap (the sender is resending).
    pub ack_delay: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            window: 1024,
            max_lanes: 256,
            rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(5),
            give_up: Duration::from_secs(30),
            persistent_from: u32::MAX,
            ack_delay: Duration::from_millis(2),
        }
    }
}

/// What became of a message whose acknowledgement never came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was sent at least once to a known incarnation of the peer, and may
    /// have been handed up there.
    Unknown,
    /// It was not handed up, and never will be: it was never sent to an
    /// incarnation that could take it.
    Undelivered,
}

/// Why messages were given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The peer is a new incarnation: the session with its earlier life is
    /// over.
    PeerRestarted,
    /// The lane made no progress for `give_up`.
    Unreachable,
}

/// What the session tells its caller.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// At the destination: the next message of a lane, handed up once.
    Delivered {
        /// The lane.
        lane: u32,
        /// Its number on the lane.
        seq: u64,
        /// What it carries.
        payload: Bytes,
    },
    /// At the sender: the peer has every message of `lane` below `upto`;
    /// `units` of credit come back.
    Acked {
        /// The lane.
        lane: u32,
        /// Every message below it is acknowledged.
        upto: u64,
        /// Credit units freed.
        units: u32,
    },
    /// At the sender: `count` messages of `lane` from `first_seq` end
    /// without an acknowledgement; `units` of credit come back.
    Ended {
        /// The lane.
        lane: u32,
        /// The first of them.
        first_seq: u64,
        /// How many consecutive messages.
        count: u64,
        /// Credit units freed.
        units: u32,
        /// What became of them.
        outcome: Outcome,
        /// Why they were given up.
        why: Ending,
    },
}

/// A frame for the peer, to go over the current route.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The frame.
    pub frame: SessionFrame,
    /// Its payload: a message's for data, empty otherwise.
    pub payload: Chained,
}

/// Why a send was refused; nothing was kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The lane's window is full: wait for an acknowledgement (or an
    /// outcome) to bring credit back.
    #[error(
        "lane {lane} has {available} credit units free and the message needs {needed}; wait for acknowledgements"
    )]
    NoCredit {
        /// The lane.
        lane: u32,
        /// What the message costs.
        needed: u32,
        /// What the lane has free.
        available: u32,
    },
    /// The message costs more than a whole window: it can never be sent.
    #[error("the message costs {cost} credit units, more than a lane's whole window of {window}")]
    TooLarge {
        /// What it costs.
        cost: u32,
        /// The window.
        window: u32,
    },
    /// The session has as many lanes as it may, and this is a new one.
    #[error("this session has {limit} lanes already, the most it keeps; send on one of them")]
    TooManyLanes {
        /// The limit.
        limit: usize,
    },
}

/// Why a frame from the peer was not taken. The session is unchanged but
/// for what the variant says; none is fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The frame says its sender has incarnation 0, which none has.
    #[error("the frame names incarnation 0 as its sender's; incarnations start at 1")]
    NoIncarnation,
    /// The frame comes from an earlier life of the peer.
    #[error(
        "the frame comes from incarnation {from} of the peer, older than {known}, its current one"
    )]
    Stale {
        /// The incarnation it names.
        from: u64,
        /// The peer's current one.
        known: u64,
    },
    /// The frame is meant for another incarnation of this junction (or its
    /// sender did not know this one); data is answered with a reset.
    #[error("the frame is meant for incarnation {to} of this junction, which is {me}")]
    NotThisIncarnation {
        /// The incarnation it names.
        to: u64,
        /// This junction's.
        me: u64,
    },
    /// Data numbered below the base it names.
    #[error("data on lane {lane} numbered {seq}, below its own base {base}")]
    BaseAfterSeq {
        /// The lane.
        lane: u32,
        /// Its number.
        seq: u64,
        /// The base it names.
        base: u64,
    },
    /// Data numbered further from its base than a window of messages.
    #[error(
        "data on lane {lane} numbered {seq}, beyond the window of {window} messages from its base {base}"
    )]
    SeqBeyondWindow {
        /// The lane.
        lane: u32,
        /// Its number.
        seq: u64,
        /// The base it names.
        base: u64,
        /// The window.
        window: u32,
    },
    /// Data numbered `u64::MAX`, which no sender reaches.
    #[error("data on lane {lane} numbered 2^64 - 1, which no sender reaches")]
    LastSeq {
        /// The lane.
        lane: u32,
    },
    /// Data opening a lane when the session has as many as it may.
    #[error("data opens lane {lane}, but this session has {limit} lanes already")]
    TooManyLanes {
        /// The lane.
        lane: u32,
        /// The limit.
        limit: usize,
    },
    /// An acknowledgement for a lane this junction never sent on.
    #[error("an acknowledgement for lane {lane}, on which nothing was sent")]
    UnknownLane {
        /// The lane.
        lane: u32,
    },
    /// An acknowledgement of messages never sent.
    #[error(
        "an acknowledgement of lane {lane} up to {upto}, but only {sent} messages were sent on it"
    )]
    AckBeyondSent {
        /// The lane.
        lane: u32,
        /// What it acknowledged.
        upto: u64,
        /// How many were sent.
        sent: u64,
    },
}

/// What a session holds, for bounds checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionFootprint {
    /// Lanes it sends on.
    pub lanes_out: usize,
    /// Lanes it receives on.
    pub lanes_in: usize,
    /// Messages kept unacknowledged, over all lanes.
    pub unacked: usize,
    /// Their credit units.
    pub unacked_units: u64,
    /// The most credit units one lane keeps.
    pub max_lane_units: u32,
    /// Messages kept out of order at the destination: always 0 (go-back-N).
    pub reordered: usize,
    /// Events not yet polled.
    pub events: usize,
}

/// A message kept until it is acknowledged.
#[derive(Debug)]
struct Pending {
    payload: Chained,
    cost: u32,
    /// Sent at least once to a known incarnation of the peer: if it is
    /// given up, its fate is unknown.
    sent: bool,
    /// When it was transmitted, while it has been transmitted only once:
    /// its acknowledgement then times the round trip (that of a resent one
    /// could answer either copy, and is not taken: Karn's rule).
    timed_from: Option<Instant>,
}

/// A lane this junction sends on.
#[derive(Debug, Default)]
struct OutLane {
    /// The number the next message will take.
    next_seq: u64,
    /// The number of `unacked[0]` (`next_seq` when it is empty).
    base: u64,
    unacked: VecDeque<Pending>,
    /// Their credit units.
    units: u32,
    /// The next number to (re)transmit.
    cursor: u64,
    /// One more than the highest number ever transmitted.
    sent_upto: u64,
    /// In the `ready` queue.
    queued: bool,
    /// When to resend, once something was transmitted.
    resend_at: Option<Instant>,
    /// Timeouts in a row without progress.
    backoff: u32,
    /// Since when it has waited for progress, while it keeps anything.
    stalled_since: Option<Instant>,
}

/// A lane this junction receives on.
#[derive(Debug, Default)]
struct InLane {
    /// The next number to hand up.
    expected: u64,
    /// In the `acks` queue.
    ack_due: bool,
}

/// One junction's session with one peer junction, both ways.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    me: u64,
    /// The peer's incarnation as far as known; 0 before first contact.
    peer: u64,
    sending: BTreeMap<u32, OutLane>,
    receiving: BTreeMap<u32, InLane>,
    /// Lanes with something to transmit, round robin.
    ready: VecDeque<u32>,
    /// Lanes owing an acknowledgement.
    acks: VecDeque<u32>,
    /// A reset owed to this incarnation of the peer.
    reset: Option<u64>,
    events: VecDeque<SessionEvent>,
    /// When the acknowledgements owed must go, with or without data.
    ack_at: Option<Instant>,
    /// That time came: they go at the next transmit (which waits for a
    /// route), without waking the caller again.
    acks_due: bool,
    /// Messages received since acknowledgements last went.
    unacked_in: u32,
    /// The round trip to the peer as acknowledgements have timed it.
    rtt: RoundTrip,
}

/// A smoothed round trip and its variation, as TCP keeps them (RFC 6298),
/// from which a lane's resend timer is set: on a path slower than `rto`
/// (a long or busy one), the timer waits as long as acknowledgements take
/// instead of resending what is still on its way.
#[derive(Debug, Default, Clone, Copy)]
struct RoundTrip {
    smoothed: Option<Duration>,
    variation: Duration,
}

impl RoundTrip {
    fn sample(&mut self, rtt: Duration) {
        match self.smoothed {
            None => {
                self.smoothed = Some(rtt);
                self.variation = rtt / 2;
            }
            Some(srtt) => {
                self.variation = (self.variation * 3 + srtt.abs_diff(rtt)) / 4;
                self.smoothed = Some((srtt * 7 + rtt) / 8);
            }
        }
    }
}

/// How long a lane waits for an acknowledgement after `backoff` timeouts
/// in a row: `config.rto`, or the measured round trip and four times its
/// variation if longer; doubled per timeout up to `config.max_rto` (or
/// the measured wait, if that is longer).
fn resend_after(config: &SessionConfig, rtt: &RoundTrip, backoff: u32) -> Duration {
    let measured = rtt
        .smoothed
        .map_or(Duration::ZERO, |srtt| srtt + rtt.variation * 4);
    let base = config.rto.max(measured);
    base.saturating_mul(1u32 << backoff.min(16))
        .min(config.max_rto.max(base))
}

impl Session {
    /// A session of this junction, in its `incarnation` (at least 1; the
    /// one its link states carry), with a peer whose incarnation it does not
    /// know yet.
    pub fn new(incarnation: u64, config: SessionConfig) -> Self {
        let config = SessionConfig {
            window: config.window.max(1),
            max_lanes: config.max_lanes.max(1),
            ..config
        };
        Self {
            config,
            me: incarnation.max(1),
            peer: 0,
            sending: BTreeMap::new(),
            receiving: BTreeMap::new(),
            ready: VecDeque::new(),
            acks: VecDeque::new(),
            reset: None,
            events: VecDeque::new(),
            ack_at: None,
            acks_due: false,
            unacked_in: 0,
            rtt: RoundTrip::default(),
        }
    }

    /// This junction's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.me
    }

    /// The peer's incarnation as far as known; 0 before first contact.
    pub fn peer_incarnation(&self) -> u64 {
        self.peer
    }

    /// Credit units free on `lane`.
    pub fn credit(&self, lane: u32) -> u32 {
        let used = self.sending.get(&lane).map_or(0, |l| l.units);
        self.config.window - used
    }

    /// Sends `payload` on `lane`: kept until acknowledged, transmitted at the
    /// next [`Session::poll_transmit`]. Its number on the lane, or why not.
    pub fn send(
        &mut self,
        now: Instant,
        lane: u32,
        payload: impl Into<Chained>,
    ) -> Result<u64, SendError> {
        let payload = payload.into();
        let window = self.config.window;
        let cost = credit_cost(payload.len());
        if cost > window {
            return Err(SendError::TooLarge { cost, window });
        }
        if !self.sending.contains_key(&lane) && self.sending.len() >= self.config.max_lanes {
            let limit = self.config.max_lanes;
            return Err(SendError::TooManyLanes { limit });
        }
        let l = self.sending.entry(lane).or_default();
        if l.units.saturating_add(cost) > window {
            let available = window - l.units;
            return Err(SendError::NoCredit {
                lane,
                needed: cost,
                available,
            });
        }
        let seq = l.next_seq;
        l.next_seq += 1;
        l.units += cost;
        l.unacked.push_back(Pending {
            payload,
            cost,
            sent: false,
            timed_from: None,
        });
        if l.stalled_since.is_none() {
            l.stalled_since = Some(now);
        }
        enqueue(&mut self.ready, l, lane);
        Ok(seq)
    }

    /// The caller learned the peer's incarnation elsewhere (a newer one in
    /// its link state, say): a greater one than known means it restarted.
    pub fn handle_incarnation(&mut self, now: Instant, incarnation: u64) {
        if incarnation > self.peer {
            self.learn(now, incarnation);
        }
    }

    /// A frame from the peer, with its payload (empty but for data).
    pub fn handle_frame(
        &mut self,
        now: Instant,
        frame: SessionFrame,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        let from = frame.from_incarnation();
        if from == 0 {
            return Err(SessionError::NoIncarnation);
        }
        if from < self.peer {
            let known = self.peer;
            return Err(SessionError::Stale { from, known });
        }
        if from > self.peer {
            // Whatever it says, the peer lives in this incarnation now.
            self.learn(now, from);
        }
        let to = frame.to_incarnation();
        if to != self.me {
            if matches!(frame, SessionFrame::Data(_)) {
                self.reset = Some(from);
            }
            let me = self.me;
            return Err(SessionError::NotThisIncarnation { to, me });
        }
        match frame {
            SessionFrame::Data(d) => self.data(now, d, payload),
            SessionFrame::Ack(a) => self.ack(now, a),
            // Learning its incarnation was all there was to it.
            SessionFrame::Reset(_) => Ok(()),
        }
    }

    /// The path to the peer changed: everything unacknowledged goes again,
    /// over the new one, at once.
    pub fn route_changed(&mut self, _now: Instant) {
        // A new path: its round trip is to be measured again.
        self.rtt = RoundTrip::default();
        for (&lane, l) in self.sending.iter_mut() {
            l.resend_at = None;
            l.backoff = 0;
            if !l.unacked.is_empty() {
                l.cursor = l.base;
                enqueue(&mut self.ready, l, lane);
            }
        }
    }

    /// Whether it keeps messages not yet acknowledged, on any lane: it has
    /// something to deliver (which a persistent lane may keep with no
    /// deadline, so [`Session::poll_timeout`] does not tell).
    pub fn is_busy(&self) -> bool {
        self.sending.values().any(|l| !l.unacked.is_empty())
    }

    /// When to call [`Session::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let give_up = self.config.give_up;
        let persistent = self.config.persistent_from;
        self.sending
            .iter()
            .flat_map(|(&lane, l)| {
                [
                    l.resend_at,
                    l.stalled_since
                        .filter(|_| lane < persistent)
                        .and_then(|t| t.checked_add(give_up)),
                ]
            })
            .flatten()
            .chain(self.ack_at)
            .min()
    }

    /// Runs what is due by `now`: resending, and giving up on lanes that
    /// made no progress for `give_up`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ack_at.is_some_and(|at| at <= now) {
            self.ack_at = None;
            self.acks_due = true;
        }
        let config = self.config;
        for (&lane, l) in self.sending.iter_mut() {
            let give_up_at = l
                .stalled_since
                .filter(|_| lane < config.persistent_from)
                .and_then(|t| t.checked_add(config.give_up));
            if give_up_at.is_some_and(|t| t <= now) {
                give_up_lane(&mut self.events, lane, l, Ending::Unreachable);
                continue;
            }
            if l.resend_at.is_some_and(|t| t <= now) {
                l.resend_at = None;
                l.backoff = l.backoff.saturating_add(1);
                l.cursor = l.base;
                enqueue(&mut self.ready, l, lane);
            }
        }
    }

    /// The next frame for the peer. Poll only while there is a route to it:
    /// a message never polled out is known undelivered if given up.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(to) = self.reset.take() {
            let frame = SessionFrame::Reset(SessionReset {
                from_incarnation: self.me,
                to_incarnation: to,
            });
            return Some(Transmit {
                frame,
                payload: Chained::default(),
            });
        }
        // Acknowledgements go when due, or with data going anyway; all of
        // them, once they go.
        let acks_go =
            self.acks_due || self.ack_at.is_some_and(|at| at <= now) || !self.ready.is_empty();
        while let Some(lane) = if acks_go { self.acks.pop_front() } else { None } {
            if self.acks.is_empty() {
                self.ack_at = None;
                self.acks_due = false;
                self.unacked_in = 0;
            }
            let Some(l) = self.receiving.get_mut(&lane) else {
                continue;
            };
            l.ack_due = false;
            let frame = SessionFrame::Ack(SessionAck {
                from_incarnation: self.me,
                to_incarnation: self.peer,
                lane,
                upto: l.expected,
            });
            return Some(Transmit {
                frame,
                payload: Chained::default(),
            });
        }
        if self.acks.is_empty() {
            // Nothing owed (a restart cleared it): no timer for nothing.
            self.ack_at = None;
            self.acks_due = false;
        }
        while let Some(lane) = self.ready.pop_front() {
            let Some(l) = self.sending.get_mut(&lane) else {
                continue;
            };
            l.queued = false;
            l.cursor = l.cursor.max(l.base);
            let Some(p) = usize::try_from(l.cursor - l.base)
                .ok()
                .and_then(|i| l.unacked.get_mut(i))
            else {
                continue;
            };
            // Data for incarnation 0 is never taken, so it does not count
            // as sent.
            p.sent |= self.peer != 0;
            p.timed_from = (l.cursor >= l.sent_upto).then_some(now);
            let frame = SessionFrame::Data(SessionData {
                from_incarnation: self.me,
                to_incarnation: self.peer,
                lane,
                seq: l.cursor,
                base: l.base,
            });
            let payload = p.payload.clone();
            l.cursor += 1;
            l.sent_upto = l.sent_upto.max(l.cursor);
            if l.resend_at.is_none() {
                let rto = resend_after(&self.config, &self.rtt, l.backoff);
                l.resend_at = now.checked_add(rto);
            }
            if l.cursor < l.next_seq {
                enqueue(&mut self.ready, l, lane);
            }
            return Some(Transmit { frame, payload });
        }
        None
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// What it holds.
    pub fn footprint(&self) -> SessionFootprint {
        SessionFootprint {
            lanes_out: self.sending.len(),
            lanes_in: self.receiving.len(),
            unacked: self.sending.values().map(|l| l.unacked.len()).sum(),
            unacked_units: self.sending.values().map(|l| u64::from(l.units)).sum(),
            max_lane_units: self.sending.values().map(|l| l.units).max().unwrap_or(0),
            reordered: 0,
            events: self.events.len(),
        }
    }

    /// The peer's incarnation is `incarnation`, greater than known.
    fn learn(&mut self, now: Instant, incarnation: u64) {
        let first_contact = self.peer == 0;
        self.peer = incarnation;
        if first_contact {
            // Nothing sent so far was taken (it named incarnation 0), and
            // nothing was received: send it all again, now addressed.
            self.route_changed(now);
            return;
        }
        // A new life of the peer: the session with the old one is over.
        // What it did not acknowledge ends with an outcome, and every lane
        // starts again from 0.
        for (&lane, l) in self.sending.iter_mut() {
            give_up_lane(&mut self.events, lane, l, Ending::PeerRestarted);
        }
        self.sending.clear();
        self.receiving.clear();
        self.ready.clear();
        self.acks.clear();
        self.ack_at = None;
        self.acks_due = false;
        self.unacked_in = 0;
        self.reset = None;
        self.rtt = RoundTrip::default();
    }

    fn data(&mut self, now: Instant, d: SessionData, payload: Bytes) -> Result<(), SessionError> {
        let (lane, seq, base) = (d.lane, d.seq, d.base);
        if seq < base {
            return Err(SessionError::BaseAfterSeq { lane, seq, base });
        }
        if seq == u64::MAX {
            // No sender gets there; refused so that the count cannot wrap.
            return Err(SessionError::LastSeq { lane });
        }
        let window = self.config.window;
        if seq - base >= u64::from(window) {
            return Err(SessionError::SeqBeyondWindow {
                lane,
                seq,
                base,
                window,
            });
        }
        if !self.receiving.contains_key(&lane) && self.receiving.len() >= self.config.max_lanes {
            let limit = self.config.max_lanes;
            return Err(SessionError::TooManyLanes { lane, limit });
        }
        let l = self.receiving.entry(lane).or_default();
        // The sender gave up on what is below its base and told its caller:
        // it will never come.
        l.expected = l.expected.max(base);
        let in_order = seq == l.expected;
        if in_order {
            l.expected += 1;
            self.events
                .push_back(SessionEvent::Delivered { lane, seq, payload });
        }
        // A duplicate, or one that came early: dropped, but acknowledged
        // either way, so that the sender hears where this end is.
        if !l.ack_due {
            l.ack_due = true;
            self.acks.push_back(lane);
        }
        self.unacked_in = self.unacked_in.saturating_add(1);
        // A sender resending, or one a quarter window ahead, hears at once;
        // otherwise the acknowledgement waits a little for data to ride.
        let due = if !in_order || self.unacked_in >= (self.config.window / 4).max(1) {
            now
        } else {
            now + self.config.ack_delay
        };
        self.ack_at = Some(self.ack_at.map_or(due, |at| at.min(due)));
        Ok(())
    }

    fn ack(&mut self, now: Instant, a: SessionAck) -> Result<(), SessionError> {
        let (lane, upto) = (a.lane, a.upto);
        let Some(l) = self.sending.get_mut(&lane) else {
            return Err(SessionError::UnknownLane { lane });
        };
        if upto > l.sent_upto {
            let sent = l.sent_upto;
            return Err(SessionError::AckBeyondSent { lane, upto, sent });
        }
        if upto <= l.base {
            return Ok(());
        }
        let mut units = 0;
        let mut timed = None;
        while l.base < upto {
            let Some(p) = l.unacked.pop_front() else {
                break;
            };
            units += p.cost;
            l.base += 1;
            timed = p.timed_from;
        }
        l.units -= units;
        l.cursor = l.cursor.max(l.base);
        // The newest message acknowledged, if it went only once, times the
        // round trip (its acknowledgement may have waited for data going
        // back, which the timer must allow for anyway), and the timer
        // starts over from it. Otherwise the timer stays backed off (Karn's
        // rule): reset by every acknowledgement, it would never outgrow a
        // round trip longer than `rto`, resending each message while it is
        // on its way.
        if let Some(sent) = timed {
            let rtt = now.saturating_duration_since(sent);
            self.rtt.sample(rtt.min(self.config.give_up / 2));
            l.backoff = 0;
        }
        let waiting = (!l.unacked.is_empty()).then_some(now);
        l.stalled_since = waiting;
        let rto = resend_after(&self.config, &self.rtt, l.backoff);
        l.resend_at = waiting.and_then(|now| now.checked_add(rto));
        self.events
            .push_back(SessionEvent::Acked { lane, upto, units });
        Ok(())
    }
}

/// Puts a lane in the round of lanes with something to transmit, once.
fn enqueue(ready: &mut VecDeque<u32>, l: &mut OutLane, lane: u32) {
    if !l.queued {
        l.queued = true;
        ready.push_back(lane);
    }
}

/// Every unacknowledged message of a lane ends, in runs of one outcome; the
/// lane goes on after them.
fn give_up_lane(events: &mut VecDeque<SessionEvent>, lane: u32, l: &mut OutLane, why: Ending) {
    let mut first_seq = l.base;
    let mut run: Option<(Outcome, u64, u32)> = None;
    for p in l.unacked.drain(..) {
        let outcome = if p.sent {
            Outcome::Unknown
        } else {
            Outcome::Undelivered
        };
        match &mut run {
            Some((o, count, units)) if *o == outcome => {
                *count += 1;
                *units += p.cost;
            }
            _ => {
                if let Some((outcome, count, units)) = run.take() {
                    events.push_back(SessionEvent::Ended {
                        lane,
                        first_seq,
                        count,
                        units,
                        outcome,
                        why,
                    });
                    first_seq += count;
                }
                run = Some((outcome, 1, p.cost));
            }
        }
    }
    if let Some((outcome, count, units)) = run {
        events.push_back(SessionEvent::Ended {
            lane,
            first_seq,
            count,
            units,
            outcome,
            why,
        });
    }
    l.base = l.next_seq;
    l.cursor = l.next_seq;
    l.units = 0;
    l.resend_at = None;
    l.backoff = 0;
    l.stalled_since = None;
}

#[cfg(test)]
mod tests;
