//! End-to-end authentication and encryption of the sessions between
//! junctions ([`crate::session`]), sans-IO: a transit junction passes
//! `Forward` payloads on, and can neither read, alter, forge nor replay
//! them undetected.
//!
//! - **Keys.** Per peer junction, a channel holds the session's keys,
//!   agreed by X25519 between ephemeral keys that each junction signs with
//!   its junction key (its hello, checked against the bus's trust store as
//!   routing checks link-state seals), and derived by HKDF over both ids,
//!   both incarnations and both ephemeral keys (`junction-identity`'s
//!   `secure` module). Each direction has its key; every frame is sealed
//!   with ChaCha20-Poly1305 under a counter that is its nonce.
//! - **Handshake.** The junction with the lower id initiates: it sends a
//!   hello with a fresh ephemeral key and no echo, resent on a timer
//!   ([`HELLO_FIRST`] doubling to [`HELLO_MAX`], for at most
//!   [`HANDSHAKE_GIVE_UP`]), and at once when the route changes. The other, the responder, answers each new one
//!   with a hello of its own, with a fresh ephemeral key and the
//!   initiator's echoed; it derives the keys at once but sends under them
//!   only once a frame sealed under them arrives (the initiator sends an
//!   empty one, a confirmation, as soon as it has them): so a replayed old
//!   hello can make it compute keys, never lose the working ones. The
//!   initiator takes only an answer that echoes its ephemeral key of the
//!   moment, which no one could have signed before it existed. A responder
//!   that needs keys (it has traffic, or received a frame it cannot open:
//!   it restarted) sends a hello with no echo, which asks the initiator
//!   for a handshake. Every ephemeral private key serves one agreement
//!   (ring's are single-use): a new handshake, a new key.
//! - **Replays.** Each key set keeps a window of the last [`WINDOW`]
//!   counters (as WireGuard and IPsec do): a counter seen, or older than the
//!   window, is dropped.
//! - **Bounds.** A channel holds at most three key sets (the current one,
//!   the one before it for frames still in flight, and a responder's
//!   unconfirmed one), one ephemeral key, one hello of its own, and the
//!   last hello it checked; hello checks cost signatures, so at most
//!   [`MAX_HELLO_CHECKS_PER_SECOND`] a second are made per peer.
//!
//! The session polls frames only once its channel has keys, as it does only
//! once there is a route: a frame never sent is truthfully undelivered.
//!
//! A junction with no junction key (development, with
//! `trust_unsigned_routing`) sends and takes session frames in clear
//! ([`Envelope::Plain`]): unauthenticated, readable and forgeable by any
//! junction on the way. A junction with a key refuses them, but for those
//! that come straight from their origin over its Highway (`Origin`'s
//! `direct`), whose TLS authenticated that neighbour and protects the
//! whole way; it sends its own that way too (`crate::peers`).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use junction_identity::secure::{EPHEMERAL_LEN, Ephemeral, HelloTranscript, Party, SessionKeys};
use junction_identity::{IdentityError, PublicKey};
use junction_road::Chained;
use junction_road::secure::{self as envelope, Envelope, EnvelopeError, SessionHello};
use junction_road::session::SessionFrame;

use crate::routing::{self, ChainRefused};

/// The first interval between hellos of a handshake.
pub const HELLO_FIRST: Duration = Duration::from_millis(200);

/// The longest interval between hellos, doubling from [`HELLO_FIRST`].
pub const HELLO_MAX: Duration = Duration::from_secs(5);

/// How long an initiator keeps a handshake going that no answer completes.
pub const HANDSHAKE_GIVE_UP: Duration = Duration::from_secs(30);

/// Counters of the replay window.
pub const WINDOW: u64 = 64;

/// The most hellos a peer's are checked (certificate chain and signature)
/// in one second; more are dropped unchecked until the next second.
pub const MAX_HELLO_CHECKS_PER_SECOND: u32 = 16;

/// How soon after a handshake an initiator starts another when asked.
const REHANDSHAKE_AFTER: Duration = Duration::from_secs(1);

/// What a channel refused, by kind, since it was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStats {
    /// Sealed frames that did not open under any keys: altered, forged, or
    /// sealed under keys this junction does not have.
    pub unsealed: u64,
    /// Sealed frames whose counter was seen already, or is older than the
    /// window: replays.
    pub replayed: u64,
    /// Hellos refused: bad chain or signature, wrong junction, stale
    /// incarnation, or over the checking budget.
    pub hellos_refused: u64,
    /// Session frames in clear where keys are required, or envelopes that
    /// did not decode.
    pub malformed: u64,
    /// Handshakes completed (keys in use).
    pub handshakes: u64,
}

/// Why something from a peer was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The envelope does not decode, or a sealed frame does not open.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A replayed sealed frame.
    #[error("a sealed session frame with counter {counter} was seen already (a replay)")]
    Replayed {
        /// Its counter.
        counter: u64,
    },
    /// A hello whose chain does not certify its sender.
    #[error("a session hello is refused: {0}")]
    Chain(#[from] ChainRefused),
    /// A hello whose signature does not hold.
    #[error("a session hello's signature does not verify")]
    BadSignature,
    /// A hello from an earlier life of its sender.
    #[error(
        "a session hello names incarnation {incarnation}, older than {known}, the sender's known one"
    )]
    Stale {
        /// The incarnation it names.
        incarnation: u64,
        /// The one known.
        known: u64,
    },
    /// Too many hellos this second.
    #[error(
        "more than {MAX_HELLO_CHECKS_PER_SECOND} session hellos this second; the rest are dropped unchecked"
    )]
    TooManyHellos,
    /// A hello whose ephemeral key makes no agreement.
    #[error(transparent)]
    Agreement(IdentityError),
    /// Session frames in clear, and this junction has a key.
    #[error(
        "a session frame came in clear; this junction has a junction key and takes only sealed ones"
    )]
    Plaintext,
    /// Sealed frames or hellos, and this junction has no key.
    #[error(
        "a sealed session frame or hello came; this junction has no junction key and takes only frames in clear"
    )]
    NoKey,
}

/// A key set in use, with its counters.
#[derive(Debug)]
struct Keyed {
    keys: SessionKeys,
    /// The counter of the next frame sealed.
    next: u64,
    replay: Replay,
}

impl Keyed {
    fn new(keys: SessionKeys) -> Self {
        Self {
            keys,
            next: 0,
            replay: Replay::default(),
        }
    }
}

/// The replay window of one key set: the highest counter taken, and which
/// of the [`WINDOW`] below it were.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Replay {
    /// One more than the highest counter taken; 0 before the first.
    top: u64,
    /// Bit i: counter `top - 1 - i` was taken.
    seen: u64,
}

impl Replay {
    /// Whether `counter` may still be taken.
    pub(crate) fn fresh(&self, counter: u64) -> bool {
        if counter == u64::MAX {
            // Never sealed (a sender stops below it), and `top` could not
            // pass it.
            return false;
        }
        if counter >= self.top {
            return true;
        }
        let back = self.top - 1 - counter;
        back < WINDOW && self.seen & (1 << back) == 0
    }

    /// Marks `counter` taken (it was [`Replay::fresh`] and opened).
    pub(crate) fn take(&mut self, counter: u64) {
        if counter >= self.top {
            let shift = counter - self.top + 1;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = counter + 1;
        } else {
            self.seen |= 1 << (self.top - 1 - counter);
        }
    }
}

/// An initiator's handshake under way.
#[derive(Debug)]
struct Pending {
    ephemeral: Ephemeral,
    started: Instant,
}

/// The keys and handshake of the session with one peer junction.
#[derive(Debug)]
pub(crate) struct Channel {
    /// Keys the session's frames go under, in use at both ends.
    current: Option<Keyed>,
    /// The keys before, to open frames still on their way.
    previous: Option<Keyed>,
    /// A responder's keys from the last hello it answered, until a frame
    /// sealed under them arrives.
    candidate: Option<Keyed>,
    /// An initiator's handshake under way.
    pending: Option<Pending>,
    /// The hello this junction sends (again) until keys are in use: an
    /// initiator's own, or a responder's answer or request.
    hello: Option<Bytes>,
    /// A responder's answer: the initiator's ephemeral key it answers.
    answered: Option<[u8; EPHEMERAL_LEN]>,
    /// When to send the hello again, and the interval after that.
    hello_at: Option<Instant>,
    /// The hello is to be sent at the next chance.
    due: bool,
    interval: Duration,
    /// When the last handshake completed.
    keyed_at: Option<Instant>,
    /// The last hello that passed its checks, so that the same one again
    /// costs none.
    checked: Option<SessionHello>,
    /// Hello checks made in the current second (Unix), and that second.
    checks: (u64, u32),
    /// An initiator owes the responder a confirmation under new keys.
    confirm: bool,
    /// A hello to send back to the peer as soon as there is a route.
    outgoing: Option<Bytes>,
    /// Keys came into use since the session was last told.
    fresh: bool,
    stats: ChannelStats,
}

impl Default for Channel {
    fn default() -> Self {
        Self {
            current: None,
            previous: None,
            candidate: None,
            pending: None,
            hello: None,
            answered: None,
            hello_at: None,
            due: false,
            interval: HELLO_FIRST,
            keyed_at: None,
            checked: None,
            checks: (0, 0),
            confirm: false,
            outgoing: None,
            fresh: false,
            stats: ChannelStats::default(),
        }
    }
}

/// Who this junction is, for its channels.
pub(crate) struct Me<'a> {
    pub(crate) junction: u16,
    pub(crate) incarnation: u64,
    pub(crate) key: &'a junction_identity::SecretKey,
    pub(crate) chain: &'a [junction_identity::Certificate],
}

impl Me<'_> {
    /// A hello from this junction to `peer`.
    fn hello(&self, peer: u16, ephemeral: [u8; EPHEMERAL_LEN], echo: Option<[u8; 32]>) -> Bytes {
        let transcript = HelloTranscript {
            from: self.junction,
            to: peer,
            incarnation: self.incarnation,
            ephemeral,
            echo,
        };
        let hello = Envelope::Hello(SessionHello {
            incarnation: self.incarnation,
            ephemeral,
            echo,
            chain: self.chain.to_vec(),
            signature: transcript.sign(self.key),
        });
        let mut buf = BytesMut::new();
        envelope::encode(&hello, &mut buf);
        buf.freeze()
    }
}

/// Where a payload for a channel came from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    /// The peer junction it names as its sender.
    pub(crate) junction: u16,
    /// The peer's incarnation as routing knows it (0: unknown).
    pub(crate) known: u64,
    /// It came straight from the peer over their Highway, whose TLS
    /// authenticated the peer: no junction carried it on the way.
    pub(crate) direct: bool,
}

/// What a channel made of a payload from its peer.
#[derive(Debug)]
pub(crate) enum Received {
    /// A session frame, opened (or in clear where that is the mode).
    Frame(Bytes),
    /// Several session frames, opened (or in clear), as a batch
    /// ([`junction_road::secure::batch_frames`] splits it).
    Frames(Bytes),
    /// A hello was taken; the peer lives in this incarnation.
    Hello {
        /// The incarnation its hello names.
        incarnation: u64,
    },
    /// Nothing for the session (a confirmation, a hello needing nothing).
    Nothing,
}

impl Channel {
    /// Whether the session may send: keys are in use.
    pub(crate) fn ready(&self) -> bool {
        self.current.is_some()
    }

    /// Whether keys came into use since last asked: the session then
    /// sends everything it holds at once.
    pub(crate) fn take_fresh_keys(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    /// A hello owed to the peer, to send over the current route.
    pub(crate) fn take_outgoing(&mut self) -> Option<Bytes> {
        self.outgoing.take()
    }

    /// What it refused so far.
    pub(crate) fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// When it needs [`Channel::handle_timeout`]: while a hello is to be
    /// sent again and `busy` (the session has traffic waiting) or an
    /// initiator's handshake runs.
    pub(crate) fn poll_timeout(&self, busy: bool) -> Option<Instant> {
        if busy || self.pending.is_some() {
            self.hello_at
        } else {
            None
        }
    }

    /// Time passed: the hello is due again, or an initiator's handshake
    /// that ran too long ends.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.started) >= HANDSHAKE_GIVE_UP)
        {
            self.pending = None;
            self.hello = None;
            self.hello_at = None;
            self.due = false;
        }
        if self.hello_at.is_some_and(|at| at <= now) {
            self.nudge(now);
        }
    }

    /// The route to the peer changed: the hellos of a handshake under way
    /// may have gone the dead way, so the hello goes again now and its
    /// interval starts over, as a session resends its frames at once
    /// ([`crate::session::Session::route_changed`]).
    pub(crate) fn route_changed(&mut self, now: Instant) {
        if self.hello.is_some() && !self.ready() {
            self.interval = HELLO_FIRST;
            self.nudge(now);
        }
    }

    /// The hello is due now; the next time after the interval, doubled.
    fn nudge(&mut self, now: Instant) {
        self.due = true;
        self.hello_at = now.checked_add(self.interval);
        self.interval = (self.interval * 2).min(HELLO_MAX);
    }

    /// The hello to send now, if keys are wanted: `busy` (the session has
    /// traffic waiting), or a handshake runs. Starts a handshake if none
    /// runs and the session is busy.
    pub(crate) fn poll_hello(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
        busy: bool,
    ) -> Result<Option<Bytes>, IdentityError> {
        if self.hello.is_none() && !busy {
            return Ok(None);
        }
        self.want_keys(now, me, peer)
    }

    /// Keys are wanted (the session has traffic, or a frame came that no
    /// keys open): starts a handshake if none runs, and returns the hello
    /// to send now, if one is due.
    fn want_keys(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
    ) -> Result<Option<Bytes>, IdentityError> {
        if self.hello.is_none() {
            let ephemeral = Ephemeral::generate()?;
            self.hello = Some(me.hello(peer, ephemeral.public(), None));
            if me.junction < peer {
                self.pending = Some(Pending {
                    ephemeral,
                    started: now,
                });
            }
            self.due = true;
            self.hello_at = now.checked_add(HELLO_FIRST);
            self.interval = HELLO_FIRST * 2;
        }
        Ok(self.hello_due())
    }

    /// The hello, if it is due.
    fn hello_due(&mut self) -> Option<Bytes> {
        if std::mem::take(&mut self.due) {
            self.hello.clone()
        } else {
            None
        }
    }

    /// Seals a session frame for the peer; `None` if there are no keys in
    /// use (or they are worn out: a handshake follows).
    pub(crate) fn seal(&mut self, frame: &SessionFrame, payload: &Chained) -> Option<Bytes> {
        let (keys, counter) = self.next_seal()?;
        envelope::seal(keys, counter, frame, payload).ok()
    }

    /// Seals several session frames together for the peer, or nothing
    /// without keys (as [`Channel::seal`]).
    pub(crate) fn seal_batch(&mut self, frames: &[(SessionFrame, Chained)]) -> Option<Bytes> {
        let (keys, counter) = self.next_seal()?;
        envelope::seal_batch(keys, counter, frames).ok()
    }

    /// The keys in use and the next counter to seal under them, taken.
    fn next_seal(&mut self) -> Option<(&SessionKeys, u64)> {
        let k = self.current.as_mut()?;
        let counter = k.next;
        let Some(next) = counter.checked_add(1) else {
            // 2^64 frames under one key set: never in practice; a new
            // handshake, to be safe.
            self.current = None;
            return None;
        };
        k.next = next;
        let k = self.current.as_ref()?;
        Some((&k.keys, counter))
    }

    /// The confirmation an initiator owes under new keys, if any.
    pub(crate) fn poll_confirmation(&mut self) -> Option<Bytes> {
        if !std::mem::take(&mut self.confirm) {
            return None;
        }
        let k = self.current.as_mut()?;
        let counter = k.next;
        k.next = counter.checked_add(1)?;
        envelope::seal_empty(&k.keys, counter).ok()
    }

    /// A `Forward` payload from the peer (in clear if `me` is `None`, or
    /// if it came `direct`ly). Returns what it was, or why it was dropped;
    /// a hello to send back waits in [`Channel::take_outgoing`].
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        me: Option<&Me<'_>>,
        origin: Origin,
        checks: &routing::Checks<'_>,
        bytes: &Bytes,
    ) -> Result<Received, ChannelError> {
        let (result, back) = match self.receive_inner(now, me, origin, checks, bytes) {
            Ok((received, back)) => (Ok(received), back),
            Err((e, back)) => (Err(e), back),
        };
        if back.is_some() {
            self.outgoing = back;
        }
        result
    }

    #[allow(clippy::type_complexity)]
    fn receive_inner(
        &mut self,
        now: Instant,
        me: Option<&Me<'_>>,
        origin: Origin,
        checks: &routing::Checks<'_>,
        bytes: &Bytes,
    ) -> Result<(Received, Option<Bytes>), (ChannelError, Option<Bytes>)> {
        let Origin {
            junction: peer,
            known,
            direct,
        } = origin;
        let decoded = envelope::decode(bytes);
        let (env, body) = match decoded {
            Ok(d) => d,
            Err(e) => {
                self.stats.malformed += 1;
                return Err((e.into(), None));
            }
        };
        let Some(me) = me else {
            return match env {
                Envelope::Plain => Ok((Received::Frame(body), None)),
                Envelope::PlainBatch => Ok((Received::Frames(body), None)),
                _ => {
                    self.stats.malformed += 1;
                    Err((ChannelError::NoKey, None))
                }
            };
        };
        match env {
            // Its Highway's TLS authenticated the peer and protects the
            // hop, which is the whole way.
            Envelope::Plain if direct => Ok((Received::Frame(body), None)),
            Envelope::PlainBatch if direct => Ok((Received::Frames(body), None)),
            Envelope::Plain | Envelope::PlainBatch => {
                self.stats.malformed += 1;
                Err((ChannelError::Plaintext, None))
            }
            Envelope::Sealed { counter } => self.open(now, me, peer, counter, body, false),
            Envelope::SealedBatch { counter } => self.open(now, me, peer, counter, body, true),
            Envelope::Hello(hello) => {
                let checked = self.check_hello(me, peer, known, checks, &hello);
                if let Err(e) = checked {
                    self.stats.hellos_refused += 1;
                    return Err((e, None));
                }
                let incarnation = hello.incarnation;
                let back = if me.junction < peer {
                    self.hello_as_initiator(now, me, peer, hello)
                } else {
                    self.hello_as_responder(now, me, peer, hello)
                }
                .map_err(|e| (ChannelError::Agreement(e), None))?;
                Ok((Received::Hello { incarnation }, back))
            }
        }
    }

    /// Opens a sealed frame (or `batch`) under whichever keys it was
    /// sealed with.
    fn open(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
        counter: u64,
        body: Bytes,
        batch: bool,
    ) -> Result<(Received, Option<Bytes>), (ChannelError, Option<Bytes>)> {
        let mut replayed = false;
        let mut opened = None;
        for (slot, k) in [&self.candidate, &self.current, &self.previous]
            .into_iter()
            .enumerate()
        {
            let Some(k) = k else { continue };
            if !k.replay.fresh(counter) {
                replayed = true;
                continue;
            }
            if let Ok(plain) = envelope::open(&k.keys, counter, body.clone()) {
                opened = Some((slot, plain));
                break;
            }
        }
        let Some((slot, plain)) = opened else {
            let nothing = self.current.is_none() && self.candidate.is_none();
            // No keys at all: the peer has keys this junction lost (it
            // restarted), so a handshake is due.
            let back = if nothing {
                // Again only once its interval is past: the peer may send
                // many such frames.
                if self.hello.is_some() && self.hello_at.is_none_or(|at| at <= now) {
                    self.nudge(now);
                }
                self.want_keys(now, me, peer).ok().flatten()
            } else {
                None
            };
            return Err(if replayed {
                self.stats.replayed += 1;
                (ChannelError::Replayed { counter }, back)
            } else {
                self.stats.unsealed += 1;
                let e = EnvelopeError::Unsealed(IdentityError::Unsealed);
                (ChannelError::Envelope(e), back)
            });
        };
        let slots = [&mut self.candidate, &mut self.current, &mut self.previous];
        if let Some(k) = slots.into_iter().nth(slot).and_then(Option::as_mut) {
            k.replay.take(counter);
        }
        if slot == 0 {
            // The initiator uses the keys this junction answered with:
            // they are the session's now.
            self.previous = self.current.take();
            self.current = self.candidate.take();
            self.keyed(now);
        }
        let received = if plain.is_empty() {
            Received::Nothing
        } else if batch {
            Received::Frames(plain)
        } else {
            Received::Frame(plain)
        };
        Ok((received, None))
    }

    /// Keys came into use.
    fn keyed(&mut self, now: Instant) {
        self.stats.handshakes += 1;
        self.fresh = true;
        self.keyed_at = Some(now);
        self.hello = None;
        self.hello_at = None;
        self.due = false;
        self.interval = HELLO_FIRST;
    }

    /// The checks of a peer's hello: budget, incarnation, chain, signature.
    fn check_hello(
        &mut self,
        me: &Me<'_>,
        peer: u16,
        known: u64,
        checks: &routing::Checks<'_>,
        hello: &SessionHello,
    ) -> Result<(), ChannelError> {
        let known = known.max(
            self.current
                .as_ref()
                .map_or(0, |k| k.keys.peer().incarnation),
        );
        if hello.incarnation < known {
            return Err(ChannelError::Stale {
                incarnation: hello.incarnation,
                known,
            });
        }
        if self.checked.as_ref() == Some(hello) {
            return Ok(());
        }
        let (second, count) = self.checks;
        let count = if second == checks.now { count } else { 0 };
        if count >= MAX_HELLO_CHECKS_PER_SECOND {
            return Err(ChannelError::TooManyHellos);
        }
        self.checks = (checks.now, count + 1);
        let key: PublicKey = routing::certified_junction(&hello.chain, peer, checks)?;
        let transcript = HelloTranscript {
            from: peer,
            to: me.junction,
            incarnation: hello.incarnation,
            ephemeral: hello.ephemeral,
            echo: hello.echo,
        };
        transcript
            .verify(&key, &hello.signature)
            .map_err(|_| ChannelError::BadSignature)?;
        self.checked = Some(hello.clone());
        Ok(())
    }

    /// A checked hello from the responder: an answer completes the
    /// handshake under way; a request starts one.
    fn hello_as_initiator(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
        hello: SessionHello,
    ) -> Result<Option<Bytes>, IdentityError> {
        match hello.echo {
            Some(echo) => {
                let ours = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.ephemeral.public() == echo);
                if !ours {
                    let done = self.current.as_ref().is_some_and(|k| {
                        k.keys.own().ephemeral == echo && k.keys.peer().ephemeral == hello.ephemeral
                    });
                    if done {
                        // The answer again: the responder never got the
                        // confirmation.
                        self.confirm = true;
                        return Ok(None);
                    }
                    // An answer to a handshake this junction gave up: the
                    // responder still wants keys.
                    return self.asked(now, me, peer, hello.incarnation);
                }
                let Some(pending) = self.pending.take() else {
                    return Ok(None);
                };
                let keys = pending.ephemeral.agree(
                    me.junction,
                    me.incarnation,
                    Party {
                        junction: peer,
                        incarnation: hello.incarnation,
                        ephemeral: hello.ephemeral,
                    },
                )?;
                self.previous = self.current.replace(Keyed::new(keys));
                self.keyed(now);
                self.confirm = true;
                Ok(None)
            }
            None => self.asked(now, me, peer, hello.incarnation),
        }
    }

    /// The responder, in `incarnation`, asks for keys: it has none (it
    /// restarted), or a replay asks. A handshake never costs the keys in
    /// use, and one starts at most once a second unless the responder is
    /// a new life.
    fn asked(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
        incarnation: u64,
    ) -> Result<Option<Bytes>, IdentityError> {
        let newer = self
            .current
            .as_ref()
            .is_none_or(|k| incarnation > k.keys.peer().incarnation);
        let recent = self
            .keyed_at
            .is_some_and(|at| now.saturating_duration_since(at) < REHANDSHAKE_AFTER);
        if self.pending.is_some() {
            self.due = true;
            return Ok(self.hello_due());
        }
        if !newer && recent {
            return Ok(None);
        }
        self.hello = None;
        self.want_keys(now, me, peer)
    }

    /// A checked hello from the initiator: a new one gets new keys and an
    /// answer; the same again gets the same answer.
    fn hello_as_responder(
        &mut self,
        now: Instant,
        me: &Me<'_>,
        peer: u16,
        hello: SessionHello,
    ) -> Result<Option<Bytes>, IdentityError> {
        if hello.echo.is_some() {
            // Initiators never echo.
            return Ok(None);
        }
        if self.answered == Some(hello.ephemeral) {
            return Ok(self.hello.clone());
        }
        let ephemeral = Ephemeral::generate()?;
        let public = ephemeral.public();
        let keys = ephemeral.agree(
            me.junction,
            me.incarnation,
            Party {
                junction: peer,
                incarnation: hello.incarnation,
                ephemeral: hello.ephemeral,
            },
        )?;
        self.candidate = Some(Keyed::new(keys));
        self.answered = Some(hello.ephemeral);
        let answer = me.hello(peer, public, Some(hello.ephemeral));
        // The answer is sent now and again only when the initiator repeats
        // its hello; a request of this junction's is not wanted any more.
        self.hello = Some(answer.clone());
        self.hello_at = now.checked_add(HELLO_MAX);
        self.interval = HELLO_MAX;
        self.due = false;
        Ok(Some(answer))
    }
}

#[cfg(test)]
mod tests {
    use junction_identity::{CertBody, Certificate, Role, SecretKey, TrustStore};

    use super::*;

    /// A payload from junction `junction`, carried by others.
    fn transit(junction: u16, known: u64) -> Origin {
        Origin {
            junction,
            known,
            direct: false,
        }
    }

    /// A keyed junction takes session frames in clear only straight from
    /// their origin over its Highway; carried by anyone else, they are
    /// dropped as forgeable.
    #[test]
    fn frames_in_clear_are_taken_only_straight_from_the_neighbour_they_name() {
        let (authority, trust) = authority();
        let (key, chain) = junction(&authority, 3);
        let me = Me {
            junction: 3,
            incarnation: 7,
            key: &key,
            chain: &chain,
        };
        let checks = checks_at(&trust, 100);
        let data = junction_road::session::SessionFrame::Ack(junction_road::session::SessionAck {
            from_incarnation: 5,
            to_incarnation: 7,
            lane: 1,
            upto: 0,
        });
        let plain = envelope::plain(&data, &Chained::default()).to_bytes();
        let batch = envelope::plain_batch(&[(data, Chained::default())]);
        let mut channel = Channel::default();
        let now = Instant::now();
        let direct = Origin {
            direct: true,
            ..transit(1, 5)
        };
        let got = channel.receive(now, Some(&me), direct, &checks, &plain);
        assert!(matches!(got, Ok(Received::Frame(_))), "{got:?}");
        let got = channel.receive(now, Some(&me), direct, &checks, &batch);
        assert!(matches!(got, Ok(Received::Frames(_))), "{got:?}");
        for p in [&plain, &batch] {
            let got = channel.receive(now, Some(&me), transit(1, 5), &checks, p);
            assert_eq!(got.unwrap_err(), ChannelError::Plaintext);
        }
        assert_eq!(channel.stats().malformed, 2);
        assert!(!channel.ready(), "frames in clear make no keys");
    }

    /// A new bus authority, and a trust store that holds it.
    fn authority() -> (SecretKey, TrustStore) {
        let authority = SecretKey::generate().unwrap();
        let mut trust = TrustStore::new();
        trust
            .add_authority(&Certificate::authority(&authority, 99, 0, u64::MAX).unwrap())
            .unwrap();
        (authority, trust)
    }

    /// The checks of a junction that trusts `trust`, at Unix second `now`.
    fn checks_at(trust: &TrustStore, now: u64) -> routing::Checks<'_> {
        routing::Checks {
            trust,
            revocations: None,
            trust_unsigned: false,
            now,
        }
    }

    /// A key certified by `authority` for junction `id`.
    fn junction(authority: &SecretKey, id: u16) -> (SecretKey, Vec<Certificate>) {
        let key = SecretKey::generate().unwrap();
        let body = CertBody {
            version: 1,
            serial: u64::from(id),
            subject: key.public(),
            role: Role::Junction { id },
            not_before: 0,
            not_after: u64::MAX,
            issuer: authority.public(),
        };
        let cert = Certificate::issue(body, authority).unwrap();
        (key, vec![cert])
    }

    /// Hellos claiming junction 1 but signed with another key are checked
    /// at most [`MAX_HELLO_CHECKS_PER_SECOND`] times a second; the next
    /// second, junction 1's own hello is checked, taken and answered.
    #[test]
    fn hello_checks_are_budgeted_per_peer_and_second() {
        let (authority, trust) = authority();
        let (one_key, one_chain) = junction(&authority, 1);
        let (three_key, three_chain) = junction(&authority, 3);
        let me = Me {
            junction: 3,
            incarnation: 7,
            key: &three_key,
            chain: &three_chain,
        };
        let mut checks = checks_at(&trust, 100);
        let mut channel = Channel::default();
        let now = Instant::now();
        let forger = SecretKey::generate().unwrap();
        let forged = Me {
            junction: 1,
            incarnation: 5,
            key: &forger,
            chain: &one_chain,
        };
        let mut refusals = Vec::new();
        for i in 0..20u8 {
            let hello = forged.hello(3, [i + 1; 32], None);
            let got = channel.receive(now, Some(&me), transit(1, 5), &checks, &hello);
            refusals.push(got.unwrap_err());
        }
        let bad = refusals
            .iter()
            .filter(|e| **e == ChannelError::BadSignature)
            .count();
        let unchecked = refusals
            .iter()
            .filter(|e| **e == ChannelError::TooManyHellos)
            .count();
        assert_eq!((bad, unchecked), (16, 4));
        assert_eq!(channel.stats().hellos_refused, 20);
        assert!(channel.take_outgoing().is_none());
        checks.now = 101;
        let real = Me {
            junction: 1,
            incarnation: 5,
            key: &one_key,
            chain: &one_chain,
        };
        let hello = real.hello(3, Ephemeral::generate().unwrap().public(), None);
        let got = channel.receive(now, Some(&me), transit(1, 5), &checks, &hello);
        assert!(matches!(got, Ok(Received::Hello { incarnation: 5 })));
        assert!(channel.take_outgoing().is_some(), "answered");
        assert!(
            !channel.ready(),
            "keys wait for the initiator's first frame"
        );
        // A hello from an earlier life is refused unchecked.
        let old = Me {
            incarnation: 4,
            ..real
        };
        let hello = old.hello(3, Ephemeral::generate().unwrap().public(), None);
        let got = channel.receive(now, Some(&me), transit(1, 5), &checks, &hello);
        assert!(matches!(got, Err(ChannelError::Stale { .. })));
    }

    #[test]
    fn the_replay_window_takes_each_counter_once_within_64() {
        let mut r = Replay::default();
        for c in [0u64, 2, 1, 5, 70] {
            assert!(r.fresh(c), "{c}");
            r.take(c);
            assert!(!r.fresh(c), "{c} again");
        }
        assert!(!r.fresh(6), "more than 64 below the highest");
        assert!(r.fresh(7) && r.fresh(69) && r.fresh(71));
        r.take(69);
        assert!(!r.fresh(69));
        r.take(1000);
        assert!(!r.fresh(70) && !r.fresh(936) && r.fresh(937) && !r.fresh(1000));
        r.take(u64::MAX - 1);
        assert!(!r.fresh(u64::MAX), "the last counter is never taken");
    }
}
