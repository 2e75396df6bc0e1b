//! The link state machine, sans-IO: one [`Links`] per junction decides
//! which Highways to dial, which connections to admit, keep or close, and
//! when a neighbour is up or down (docs/protocol.md, section 18.4).
//!
//! - **Admission.** Each side sends its [`Hello`] first. A peer is up only
//!   once its `Hello` has arrived on a connection whose verified
//!   certificate (checked by the shell, reported with
//!   [`Links::handle_certificate`]) carries the same junction id, with the
//!   right version, an id that is neither reserved nor ours (nor, on a
//!   connection we dialed, another than the one we dialed), and an
//!   incarnation at least any known for it.
//! - **One connection per pair.** A greater incarnation on a new
//!   connection replaces the old one (down, then up); of two connections
//!   dialed by the same side, the newer wins; when both sides dialed at
//!   once, the connection dialed by the lower junction id is kept and the
//!   other closed, the same way on both sides whatever the order of events.
//! - **Liveness.** Keep-alives every [`Timers::keepalive`]; any traffic
//!   counts; a connection silent for [`Timers::liveness`] is closed and its
//!   peer goes down. Keep-alive acknowledgements give the round-trip time
//!   (smoothed as TCP does).
//! - **Redial.** A configured peer that is down is dialed again after a
//!   backoff that doubles from [`Timers::backoff_initial`] to
//!   [`Timers::backoff_max`], less up to a quarter of jitter drawn from the
//!   configured seed, and starts again once a link has stayed up for
//!   [`Timers::backoff_reset`]. A peer not in the configuration may connect;
//!   it is not redialled when it goes.
//! - **Bounds.** At most [`LinkConfig::max_pending`] accepted connections
//!   wait for their `Hello`, each for [`Timers::hello_timeout`]; a second
//!   `Hello` closes a connection; keep-alives are answered at most
//!   [`LinkConfig::max_acks_per_interval`] times per interval.
//!
//! Driven as quinn-proto's `Connection` is: feed it events with
//! `handle_*` and the time, then drain [`Links::poll_output`] until it
//! gives `None`, and call [`Links::handle_timeout`] at
//! [`Links::poll_timeout`]. It reads no clock and does no I/O.
//!
//! Two junctions wired by hand, as a shell would after the QUIC and TLS
//! handshakes (junction 1 dialed junction 2; each side's verifier found the
//! other's certificate good):
//!
//! ```
//! use std::time::Instant;
//! use junction_highway::link::{ConnId, LinkConfig, LinkOutput, Links};
//! use junction_highway::wire::ControlFrame;
//!
//! let now = Instant::now();
//! let mut one = LinkConfig::new(1, 1_700_000_000);
//! one.peers = vec![(2, "198.51.100.2:4433".parse().unwrap())];
//! let mut one = Links::new(one, now).unwrap();
//! let mut two = Links::new(LinkConfig::new(2, 1_700_000_100), now).unwrap();
//!
//! one.handle_timeout(now);
//! assert!(matches!(one.poll_output(), Some(LinkOutput::Dial { peer: 2, .. })));
//! // The shell dials; the connection is ConnId(7) at junction 1 and
//! // ConnId(3) at junction 2 (each shell names its own).
//! one.handle_dialed(ConnId(7), 2, now);
//! one.handle_certificate(ConnId(7), 2, now);
//! two.handle_accepted(ConnId(3), now);
//! two.handle_certificate(ConnId(3), 1, now);
//!
//! // Carry the control frames across until both are quiet.
//! fn carry(from: &mut Links, to: &mut Links, conn: ConnId, now: Instant) -> (bool, u32) {
//!     let (mut moved, mut ups) = (false, 0);
//!     while let Some(out) = from.poll_output() {
//!         moved = true;
//!         match out {
//!             LinkOutput::Send { frame, .. } => {
//!                 let _link_state = to.handle_control(conn, frame, now);
//!             }
//!             LinkOutput::Up { .. } => ups += 1,
//!             other => panic!("{other:?}"),
//!         }
//!     }
//!     (moved, ups)
//! }
//! let mut ups = 0;
//! loop {
//!     let (a, up_one) = carry(&mut one, &mut two, ConnId(3), now);
//!     let (b, up_two) = carry(&mut two, &mut one, ConnId(7), now);
//!     ups += up_one + up_two;
//!     if !a && !b {
//!         break;
//!     }
//! }
//! assert_eq!(ups, 2);
//! assert_eq!(one.conn(2), Some(ConnId(7)));
//! assert_eq!(two.peer(ConnId(3)), Some(1));
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use junction_road::highway::LinkState;

use crate::wire::{ControlFrame, Hello, VERSION};

/// A QUIC connection, named by the shell; never reused while the shell
/// may still report events about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// The timers of [`Links`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// How often a keep-alive goes out on each admitted connection (1 s).
    pub keepalive: Duration,
    /// How many keep-alive intervals of silence close a connection (3).
    pub missed_keepalives: u32,
    /// How long a connection may wait for its peer's `Hello` (5 s).
    pub hello_timeout: Duration,
    /// How long a dial may go unanswered by the shell before it counts as
    /// failed (10 s).
    pub dial_timeout: Duration,
    /// The first redial delay (100 ms).
    pub backoff_initial: Duration,
    /// The longest redial delay (10 s).
    pub backoff_max: Duration,
    /// How long a link must stay up for the backoff to start again from
    /// `backoff_initial` (10 s).
    pub backoff_reset: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(1),
            missed_keepalives: 3,
            hello_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            backoff_reset: Duration::from_secs(10),
        }
    }
}

impl Timers {
    /// How long a connection may stay silent before it is closed:
    /// `keepalive × missed_keepalives`.
    pub fn liveness(&self) -> Duration {
        self.keepalive.saturating_mul(self.missed_keepalives.max(1))
    }
}

/// What [`Links`] is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// This junction's id.
    pub junction: u16,
    /// This junction's incarnation: greater than in any earlier life.
    pub incarnation: u64,
    /// The peers to dial and keep linked: junction id and address.
    pub peers: Vec<(u16, SocketAddr)>,
    /// The timers.
    pub timers: Timers,
    /// The most accepted connections that may wait for their `Hello` at
    /// once (64); more are closed at once.
    pub max_pending: usize,
    /// The most keep-alives answered per connection and keep-alive
    /// interval (4); more are not answered (they still count as traffic).
    pub max_acks_per_interval: u32,
    /// Seeds the redial jitter, so that a run can be replayed.
    pub seed: u64,
}

impl LinkConfig {
    /// A configuration with default timers and bounds, no peers, seed 0.
    pub fn new(junction: u16, incarnation: u64) -> Self {
        Self {
            junction,
            incarnation,
            peers: Vec::new(),
            timers: Timers::default(),
            max_pending: 64,
            max_acks_per_interval: 4,
            seed: 0,
        }
    }
}

/// What is wrong with a [`LinkConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// This junction's id is 0 or 65535, which are reserved.
    #[error("junction id {0} is reserved (0 and 65535 are no junction's)")]
    ReservedId(u16),
    /// A peer's id is 0 or 65535, which are reserved.
    #[error("peer junction id {0} is reserved (0 and 65535 are no junction's)")]
    ReservedPeer(u16),
    /// A peer has this junction's own id.
    #[error("peer junction id {0} is this junction's own")]
    PeerIsSelf(u16),
    /// A peer is listed twice.
    #[error("peer junction {0} is listed twice")]
    DuplicatePeer(u16),
}

/// Why [`Links`] closes a connection; its `Display` is the reason sent in
/// the `Goodbye` and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer sent no `Hello` in time.
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    /// The peer speaks another Highway version.
    #[error("Highway version {got} is not the version spoken here ({VERSION})")]
    WrongVersion {
        /// The version its `Hello` named.
        got: u16,
    },
    /// The peer claims a reserved junction id.
    #[error("junction id {0} is reserved")]
    ReservedId(u16),
    /// The peer claims this junction's own id.
    #[error("the peer claims this junction's own id {0}")]
    OwnId(u16),
    /// The `Hello` names another junction than the verified certificate.
    #[error("the Hello claims junction {claimed} but the certificate is junction {certified}'s")]
    CertificateMismatch {
        /// The id in the `Hello`.
        claimed: u16,
        /// The id in the certificate.
        certified: u16,
    },
    /// We dialed one junction and another answered.
    #[error("dialed junction {dialed} but junction {answered} answered")]
    UnexpectedPeer {
        /// The junction dialed.
        dialed: u16,
        /// The junction whose `Hello` came.
        answered: u16,
    },
    /// The peer's incarnation is older than one already seen from it.
    #[error("incarnation {got} of junction {junction} is older than {known}, already seen")]
    StaleIncarnation {
        /// The peer.
        junction: u16,
        /// The incarnation its `Hello` named.
        got: u64,
        /// The greatest known.
        known: u64,
    },
    /// A frame other than `Hello` came before the `Hello`.
    #[error("a frame came before the Hello")]
    HelloFirst,
    /// A second `Hello` came on one connection.
    #[error("a second Hello on one connection")]
    SecondHello,
    /// Both sides dialed at once; this connection lost the tie-break.
    #[error("both junctions dialed: keeping the connection dialed by junction {kept_dialer}")]
    BothDialed {
        /// The junction that dialed the connection kept (the lower id).
        kept_dialer: u16,
    },
    /// A newer connection from the same peer replaced this one.
    #[error("replaced by a newer connection from junction {junction} (incarnation {incarnation})")]
    Replaced {
        /// The peer.
        junction: u16,
        /// The incarnation on the new connection.
        incarnation: u64,
    },
    /// Nothing came from the peer for the liveness timeout.
    #[error("nothing heard for {0:?}")]
    Silent(Duration),
    /// Too many accepted connections wait for their `Hello` already.
    #[error("too many connections wait for their Hello (at most {0})")]
    TooManyPending(usize),
    /// This junction is stopping.
    #[error("the junction is stopping")]
    Shutdown,
}

/// What [`Links`] asks the shell to do, or tells it.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkOutput {
    /// Dial `peer` at `addr`; report [`Links::handle_dialed`] or
    /// [`Links::handle_dial_failed`].
    Dial {
        /// The junction to dial.
        peer: u16,
        /// Where.
        addr: SocketAddr,
    },
    /// Send `frame` on the connection's control stream.
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: ControlFrame,
    },
    /// Close the connection, sending a `Goodbye` with the reason first if
    /// it can. No more events about it are needed (any are ignored).
    Close {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
    /// `peer` is up on `conn`: route through it.
    Up {
        /// The neighbour.
        peer: u16,
        /// Its connection.
        conn: ConnId,
        /// Its incarnation, from its `Hello`.
        incarnation: u64,
        /// The round trip measured so far on the connection, if any.
        rtt: Option<Duration>,
    },
    /// `peer`, up before, is down: route around it. When this junction
    /// closed the connection, the [`LinkOutput::Close`] comes first; when a
    /// new connection replaces it, a [`LinkOutput::Up`] follows at once.
    Down {
        /// The neighbour.
        peer: u16,
    },
}

/// Where a neighbour stands, for `junction ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerState {
    /// Linked.
    Up {
        /// Its connection.
        conn: ConnId,
        /// Its incarnation.
        incarnation: u64,
        /// The smoothed round trip, once measured.
        rtt: Option<Duration>,
        /// Since when.
        since: Instant,
    },
    /// Down; dialed again at `at`.
    Waiting {
        /// The next dial.
        at: Instant,
    },
    /// A dial was asked for and not yet reported.
    Dialing,
    /// Dialed, waiting for its `Hello`.
    Connecting {
        /// The connection.
        conn: ConnId,
    },
}

/// A neighbour, for `junction ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its junction id.
    pub junction: u16,
    /// Its configured address, `None` for a peer that dialed in unasked.
    pub addr: Option<SocketAddr>,
    /// Where it stands.
    pub state: PeerState,
}

/// The Highways of one junction: see the module documentation.
#[derive(Debug)]
pub struct Links {
    junction: u16,
    incarnation: u64,
    timers: Timers,
    max_pending: usize,
    max_acks: u32,
    rng: u64,
    peers: BTreeMap<u16, Peer>,
    conns: BTreeMap<ConnId, Conn>,
    /// The greatest incarnation seen from each junction.
    incarnations: BTreeMap<u16, u64>,
    out: VecDeque<LinkOutput>,
}

#[derive(Debug)]
struct Peer {
    /// `Some` for a configured peer, which is redialled.
    addr: Option<SocketAddr>,
    /// The admitted connection, and since when.
    up: Option<(ConnId, Instant)>,
    redial: Redial,
    /// The next redial delay, before jitter.
    backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redial {
    /// Up, or not configured.
    Idle,
    At(Instant),
    Dialing {
        deadline: Instant,
    },
    Connecting(ConnId),
}

#[derive(Debug)]
struct Conn {
    /// The junction we dialed, for a connection we dialed.
    dialed: Option<u16>,
    certified: Option<u16>,
    hello: Option<Hello>,
    admitted: bool,
    opened: Instant,
    last_heard: Instant,
    next_keepalive: Instant,
    next_nonce: u64,
    /// Keep-alives awaiting their acknowledgement: nonce, when sent.
    in_flight: VecDeque<(u64, Instant)>,
    srtt: Option<Duration>,
    acks_since: Instant,
    acks: u32,
}

impl Conn {
    fn new(dialed: Option<u16>, now: Instant, keepalive: Duration) -> Self {
        Self {
            dialed,
            certified: None,
            hello: None,
            admitted: false,
            opened: now,
            last_heard: now,
            next_keepalive: now + keepalive,
            next_nonce: 0,
            in_flight: VecDeque::new(),
            srtt: None,
            acks_since: now,
            acks: 0,
        }
    }
}

impl Links {
    /// The links of junction `config.junction`, which will dial every
    /// configured peer at its first [`Links::handle_timeout`] (at `now`).
    pub fn new(config: LinkConfig, now: Instant) -> Result<Self, ConfigError> {
        if reserved(config.junction) {
            return Err(ConfigError::ReservedId(config.junction));
        }
        let mut peers = BTreeMap::new();
        for &(id, addr) in &config.peers {
            if reserved(id) {
                return Err(ConfigError::ReservedPeer(id));
            }
            if id == config.junction {
                return Err(ConfigError::PeerIsSelf(id));
            }
            let peer = Peer {
                addr: Some(addr),
                up: None,
                redial: Redial::At(now),
                backoff: config.timers.backoff_initial,
            };
            if peers.insert(id, peer).is_some() {
                return Err(ConfigError::DuplicatePeer(id));
            }
        }
        Ok(Self {
            junction: config.junction,
            incarnation: config.incarnation,
            timers: config.timers,
            max_pending: config.max_pending,
            max_acks: config.max_acks_per_interval,
            rng: config.seed,
            peers,
            conns: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            out: VecDeque::new(),
        })
    }

    // Getters.

    /// This junction's id.
    pub fn junction(&self) -> u16 {
        self.junction
    }

    /// The peer admitted on `conn`, if it is admitted: the shell takes
    /// link states and data from that connection only then.
    pub fn peer(&self, conn: ConnId) -> Option<u16> {
        let c = self.conns.get(&conn)?;
        c.admitted.then_some(c.hello?.junction)
    }

    /// The connection `peer` is up on.
    pub fn conn(&self, peer: u16) -> Option<ConnId> {
        Some(self.peers.get(&peer)?.up?.0)
    }

    /// The smoothed round trip to `peer`, once measured.
    pub fn rtt(&self, peer: u16) -> Option<Duration> {
        self.conns.get(&self.conn(peer)?)?.srtt
    }

    /// Every neighbour that is configured or up, in id order.
    pub fn peers(&self) -> impl Iterator<Item = PeerInfo> + '_ {
        self.peers.iter().map(|(&junction, p)| {
            let state = match (p.up, p.redial) {
                (Some((conn, since)), _) => {
                    let c = self.conns.get(&conn);
                    PeerState::Up {
                        conn,
                        incarnation: c.and_then(|c| c.hello).map_or(0, |h| h.incarnation),
                        rtt: c.and_then(|c| c.srtt),
                        since,
                    }
                }
                (None, Redial::At(at)) => PeerState::Waiting { at },
                (None, Redial::Connecting(conn)) => PeerState::Connecting { conn },
                (None, Redial::Dialing { .. } | Redial::Idle) => PeerState::Dialing,
            };
            PeerInfo {
                junction,
                addr: p.addr,
                state,
            }
        })
    }

    // Input.

    /// A connection the shell dialed for `peer` is established (its
    /// certificate follows with [`Links::handle_certificate`]).
    pub fn handle_dialed(&mut self, conn: ConnId, peer: u16, now: Instant) {
        if self.conns.contains_key(&conn) {
            return;
        }
        if let Some(p) = self.peers.get_mut(&peer)
            && p.up.is_none()
        {
            p.redial = Redial::Connecting(conn);
        }
        self.open(conn, Some(peer), now);
    }

    /// A dial for `peer` failed.
    pub fn handle_dial_failed(&mut self, peer: u16, now: Instant) {
        if let Some(p) = self.peers.get(&peer)
            && matches!(p.redial, Redial::Dialing { .. })
        {
            self.retry(peer, now);
        }
    }

    /// A connection from an unknown peer was accepted (its certificate
    /// follows with [`Links::handle_certificate`]).
    pub fn handle_accepted(&mut self, conn: ConnId, now: Instant) {
        if self.conns.contains_key(&conn) {
            return;
        }
        let pending = self
            .conns
            .values()
            .filter(|c| !c.admitted && c.dialed.is_none())
            .count();
        if pending >= self.max_pending {
            self.out.push_back(LinkOutput::Close {
                conn,
                reason: CloseReason::TooManyPending(self.max_pending),
            });
            return;
        }
        self.open(conn, None, now);
    }

    /// The verified certificate of the peer on `conn` carries `junction`.
    /// The shell calls this only for a certificate its verifier accepted.
    pub fn handle_certificate(&mut self, conn: ConnId, junction: u16, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.certified.is_some() {
            return;
        }
        c.certified = Some(junction);
        if c.hello.is_some() {
            self.admit(conn, now);
        }
    }

    /// The peer's `Hello` arrived on `conn`.
    pub fn handle_hello(&mut self, conn: ConnId, hello: Hello, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.hello.is_some() {
            return self.close(conn, CloseReason::SecondHello, now);
        }
        c.last_heard = now;
        let refusal = if hello.version != VERSION {
            Some(CloseReason::WrongVersion { got: hello.version })
        } else if reserved(hello.junction) {
            Some(CloseReason::ReservedId(hello.junction))
        } else if hello.junction == self.junction {
            Some(CloseReason::OwnId(hello.junction))
        } else {
            c.dialed
                .filter(|&d| d != hello.junction)
                .map(|dialed| CloseReason::UnexpectedPeer {
                    dialed,
                    answered: hello.junction,
                })
        };
        if let Some(reason) = refusal {
            return self.close(conn, reason, now);
        }
        c.hello = Some(hello);
        if c.certified.is_some() {
            self.admit(conn, now);
        }
    }

    /// The peer sent a keep-alive on `conn`: it is answered (within the
    /// bound per interval).
    pub fn handle_keepalive(&mut self, conn: ConnId, nonce: u64, now: Instant) {
        let max = self.max_acks;
        let interval = self.timers.keepalive;
        let Some(c) = self.heard(conn, now) else {
            return;
        };
        if now >= c.acks_since + interval {
            c.acks_since = now;
            c.acks = 0;
        }
        if c.acks < max {
            c.acks += 1;
            self.out.push_back(LinkOutput::Send {
                conn,
                frame: ControlFrame::KeepAliveAck { nonce },
            });
        }
    }

    /// The peer acknowledged a keep-alive on `conn`.
    pub fn handle_keepalive_ack(&mut self, conn: ConnId, nonce: u64, now: Instant) {
        let Some(c) = self.heard(conn, now) else {
            return;
        };
        let Some(i) = c.in_flight.iter().position(|&(n, _)| n == nonce) else {
            return;
        };
        let sent = c.in_flight[i].1;
        c.in_flight.drain(..=i);
        let sample = now.saturating_duration_since(sent);
        c.srtt = Some(match c.srtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
    }

    /// A frame other than a control frame arrived on `conn` (any traffic
    /// counts as a sign of life). Returns the peer it comes from when it is
    /// admitted; data from a connection not yet admitted is to be dropped
    /// (it may legitimately overtake the `Hello`, on another stream).
    pub fn handle_traffic(&mut self, conn: ConnId, now: Instant) -> Option<u16> {
        let c = self.conns.get_mut(&conn)?;
        c.last_heard = now;
        self.peer(conn)
    }

    /// A control frame arrived on `conn`: dispatches to the `handle_*`
    /// above. Returns a link state, with the peer it came from, for
    /// routing, when the connection is admitted.
    pub fn handle_control(
        &mut self,
        conn: ConnId,
        frame: ControlFrame,
        now: Instant,
    ) -> Option<(u16, LinkState)> {
        match frame {
            ControlFrame::Hello(hello) => self.handle_hello(conn, hello, now),
            ControlFrame::KeepAlive { nonce } => self.handle_keepalive(conn, nonce, now),
            ControlFrame::KeepAliveAck { nonce } => self.handle_keepalive_ack(conn, nonce, now),
            ControlFrame::Goodbye { .. } => self.handle_closed(conn, now),
            ControlFrame::LinkState(ls) => {
                self.heard(conn, now)?;
                return Some((self.peer(conn)?, ls));
            }
        }
        None
    }

    /// The connection closed (by the peer, QUIC's idle timeout, or the
    /// network).
    pub fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        if let Some(c) = self.conns.remove(&conn) {
            self.forget(conn, c, now);
        }
    }

    /// Time passed: dials, keep-alives, timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u16> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up.is_none())
            .filter_map(|(&id, p)| match p.redial {
                Redial::At(at) | Redial::Dialing { deadline: at } if at <= now => Some(id),
                _ => None,
            })
            .collect();
        for id in due {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            match (p.redial, p.addr) {
                (Redial::At(_), Some(addr)) => {
                    p.redial = Redial::Dialing {
                        deadline: now + self.timers.dial_timeout,
                    };
                    self.out.push_back(LinkOutput::Dial { peer: id, addr });
                }
                _ => self.retry(id, now),
            }
        }

        let liveness = self.timers.liveness();
        let hello_timeout = self.timers.hello_timeout;
        let mut closing = Vec::new();
        for (&id, c) in &mut self.conns {
            if !c.admitted {
                if now >= c.opened + hello_timeout {
                    closing.push((id, CloseReason::HelloTimeout(hello_timeout)));
                }
                continue;
            }
            if now >= c.last_heard + liveness {
                closing.push((id, CloseReason::Silent(liveness)));
                continue;
            }
            if now >= c.next_keepalive {
                c.next_keepalive =
                    (c.next_keepalive + self.timers.keepalive).max(now + self.timers.keepalive / 2);
                let nonce = c.next_nonce;
                c.next_nonce += 1;
                c.in_flight.push_back((nonce, now));
                if c.in_flight.len() > self.timers.missed_keepalives as usize + 1 {
                    c.in_flight.pop_front();
                }
                self.out.push_back(LinkOutput::Send {
                    conn: id,
                    frame: ControlFrame::KeepAlive { nonce },
                });
            }
        }
        for (conn, reason) in closing {
            self.close(conn, reason, now);
        }
    }

    /// Adds a peer to dial and keep linked (a configuration reload), or
    /// changes its address; it is dialed at once unless it is up or a dial
    /// is under way.
    pub fn add_peer(
        &mut self,
        peer: u16,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<(), ConfigError> {
        if reserved(peer) {
            return Err(ConfigError::ReservedPeer(peer));
        }
        if peer == self.junction {
            return Err(ConfigError::PeerIsSelf(peer));
        }
        let p = self.peers.entry(peer).or_insert(Peer {
            addr: None,
            up: None,
            redial: Redial::Idle,
            backoff: self.timers.backoff_initial,
        });
        p.addr = Some(addr);
        if p.up.is_none() && matches!(p.redial, Redial::Idle | Redial::At(_)) {
            p.redial = Redial::At(now);
        }
        Ok(())
    }

    /// Stops dialing a peer (a configuration reload). A link to it that is
    /// up stays up, as for a peer that dialed in unasked, until it ends.
    pub fn remove_peer(&mut self, peer: u16) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.addr = None;
        p.redial = Redial::Idle;
        if p.up.is_none() {
            self.peers.remove(&peer);
        }
    }

    /// Closes every connection ([`CloseReason::Shutdown`]), each peer up
    /// going down, and dials no more: the junction is stopping.
    pub fn close_all(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.addr = None;
            p.redial = Redial::Idle;
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, CloseReason::Shutdown, now);
        }
        self.peers.clear();
    }

    // Output.

    /// What to do next; call until `None` after every input.
    pub fn poll_output(&mut self) -> Option<LinkOutput> {
        self.out.pop_front()
    }

    /// When to call [`Links::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().filter(|p| p.up.is_none());
        let dials = peers.filter_map(|p| match p.redial {
            Redial::At(at) | Redial::Dialing { deadline: at } => Some(at),
            _ => None,
        });
        let conns = self.conns.values().map(|c| {
            if c.admitted {
                c.next_keepalive.min(c.last_heard + self.timers.liveness())
            } else {
                c.opened + self.timers.hello_timeout
            }
        });
        dials.chain(conns).min()
    }

    // Inside.

    /// Starts a connection: our `Hello` first, then a keep-alive.
    fn open(&mut self, conn: ConnId, dialed: Option<u16>, now: Instant) {
        let mut c = Conn::new(dialed, now, self.timers.keepalive);
        c.in_flight.push_back((0, now));
        c.next_nonce = 1;
        self.conns.insert(conn, c);
        let hello = Hello {
            version: VERSION,
            junction: self.junction,
            incarnation: self.incarnation,
        };
        self.out.push_back(LinkOutput::Send {
            conn,
            frame: ControlFrame::Hello(hello),
        });
        self.out.push_back(LinkOutput::Send {
            conn,
            frame: ControlFrame::KeepAlive { nonce: 0 },
        });
    }

    /// Marks a sign of life on a connection whose `Hello` came; closes one
    /// whose `Hello` did not.
    fn heard(&mut self, conn: ConnId, now: Instant) -> Option<&mut Conn> {
        let c = self.conns.get_mut(&conn)?;
        if c.hello.is_none() {
            self.close(conn, CloseReason::HelloFirst, now);
            return None;
        }
        let c = self.conns.get_mut(&conn)?;
        c.last_heard = now;
        Some(c)
    }

    /// Admits the peer on `conn`, whose `Hello` and certificate both came,
    /// if they agree, deciding between it and any other connection.
    fn admit(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (Some(hello), Some(certified)) = (c.hello, c.certified) else {
            return;
        };
        let peer = hello.junction;
        if certified != peer {
            let reason = CloseReason::CertificateMismatch {
                claimed: peer,
                certified,
            };
            return self.close(conn, reason, now);
        }
        let known = self.incarnations.get(&peer).copied().unwrap_or(0);
        if hello.incarnation < known {
            let reason = CloseReason::StaleIncarnation {
                junction: peer,
                got: hello.incarnation,
                known,
            };
            return self.close(conn, reason, now);
        }
        let new_dialer = self.dialer(c, peer);
        // A replacement is not a failure: the backoff stays as it was (or
        // starts again, if the old link was up long enough).
        let mut backoff = None;
        if let Some(p) = self.peers.get(&peer)
            && let Some((old, since)) = p.up
        {
            backoff = Some(
                if now.saturating_duration_since(since) < self.timers.backoff_reset {
                    p.backoff
                } else {
                    self.timers.backoff_initial
                },
            );
            let (old_incarnation, old_dialer) = match self.conns.get(&old) {
                Some(o) => (o.hello.map_or(0, |h| h.incarnation), self.dialer(o, peer)),
                None => (0, new_dialer),
            };
            if hello.incarnation == old_incarnation && old_dialer != new_dialer {
                // Both dialed: the lower id's connection is kept.
                let kept_dialer = old_dialer.min(new_dialer);
                let reason = CloseReason::BothDialed { kept_dialer };
                if old_dialer == kept_dialer {
                    return self.close(conn, reason, now);
                }
                self.close(old, reason, now);
            } else {
                // A new life, or the same dialer again: the new one wins.
                let reason = CloseReason::Replaced {
                    junction: peer,
                    incarnation: hello.incarnation,
                };
                self.close(old, reason, now);
            }
        }
        self.incarnations.insert(peer, hello.incarnation);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.admitted = true;
        c.last_heard = now;
        let rtt = c.srtt;
        let initial = self.timers.backoff_initial;
        let p = self.peers.entry(peer).or_insert(Peer {
            addr: None,
            up: None,
            redial: Redial::Idle,
            backoff: initial,
        });
        p.up = Some((conn, now));
        p.redial = Redial::Idle;
        if let Some(backoff) = backoff {
            p.backoff = backoff;
        }
        self.out.push_back(LinkOutput::Up {
            peer,
            conn,
            incarnation: hello.incarnation,
            rtt,
        });
    }

    /// The junction that dialed a connection to `peer`.
    fn dialer(&self, c: &Conn, peer: u16) -> u16 {
        if c.dialed.is_some() {
            self.junction
        } else {
            peer
        }
    }

    /// Closes a connection and forgets it.
    fn close(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        if let Some(c) = self.conns.remove(&conn) {
            self.out.push_back(LinkOutput::Close { conn, reason });
            self.forget(conn, c, now);
        }
    }

    /// What follows a connection's end: its peer down, or a redial.
    fn forget(&mut self, conn: ConnId, c: Conn, now: Instant) {
        let peer = match (c.admitted, c.hello, c.dialed) {
            (true, Some(hello), _) => hello.junction,
            (_, _, Some(dialed)) => dialed,
            _ => return,
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match p.up {
            Some((up, since)) if up == conn => {
                p.up = None;
                if now.saturating_duration_since(since) >= self.timers.backoff_reset {
                    p.backoff = self.timers.backoff_initial;
                }
                self.out.push_back(LinkOutput::Down { peer });
                if p.addr.is_none() {
                    self.peers.remove(&peer);
                } else {
                    self.retry(peer, now);
                }
            }
            None if p.redial == Redial::Connecting(conn) => self.retry(peer, now),
            _ => {}
        }
    }

    /// Schedules the next dial of a configured peer that is down.
    fn retry(&mut self, peer: u16, now: Instant) {
        let max = self.timers.backoff_max;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.up.is_some() || p.addr.is_none() {
            return;
        }
        let base = p.backoff.min(max);
        p.backoff = base.saturating_mul(2).min(max);
        let quarter = u64::try_from(base.as_nanos() / 4).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(splitmix(&mut self.rng) % quarter.saturating_add(1));
        p.redial = Redial::At(now + (base - jitter));
    }
}

/// Whether a junction id is reserved: 0 ("this junction") and 65535.
fn reserved(id: u16) -> bool {
    id == 0 || id == u16::MAX
}

/// The next number of a SplitMix64 sequence.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
