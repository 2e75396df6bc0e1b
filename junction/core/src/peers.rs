//! Other junctions of the bus, as parties of the core: one end-to-end
//! session each ([`crate::session`]), carried as the payload of `Forward`
//! frames along the route routing chose ([`crate::routing`]).
//!
//! Between junctions with junction keys, every session frame that other
//! junctions carry is sealed end to end and every hello checked
//! ([`crate::secure`]); such a session sends only once its channel has
//! keys. Between neighbours whose route is their Highway alone, frames go
//! in clear inside its TLS (`direct`), and keys are agreed meanwhile for
//! a route through others.
//!
//! The session sends only while a route exists (a frame it hands out and
//! nobody carries would later be reported undelivered when it may have
//! arrived), and is told when its route changes, so that it sends again at
//! once over the new one.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use junction_road::Chained;
use junction_road::control::{Sealing, SessionInfo};
use junction_road::highway::{HighwayFrame, Hops};
use junction_road::secure as envelope;
use junction_road::session as wire;

use crate::secure::{Channel, ChannelStats, Me, Origin, Received};
use crate::session::{SendError, Session, SessionConfig};
use crate::{Core, Output, quiet, routing};

/// One other junction this one exchanges traffic with.
#[derive(Debug)]
pub(crate) struct Peer {
    session: Session,
    /// Its keys and handshake.
    channel: Channel,
    /// The route its traffic last went by.
    route: Option<Hops>,
}

/// The other junctions, by id.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    peers: BTreeMap<u16, Peer>,
    /// While a batch of frames is handled: the peers to pump at its end.
    pub(crate) batch: Option<Vec<u16>>,
    /// Peers with messages sent but not yet transmitted: what a driver's
    /// frames send goes out when the shell next polls the core, together.
    dirty: Vec<u16>,
    /// Whether the shell holds transmissions back until the end of a read
    /// batch ([`Core::hold_transmits`]).
    holding: bool,
}

impl Peers {
    /// The soonest deadline of any session.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .flat_map(|p| {
                let session = p.session.poll_timeout();
                [session, p.channel.poll_timeout(p.session.is_busy())]
            })
            .flatten()
            .min()
    }

    /// How many junctions it keeps a session with.
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

impl Core {
    /// Sends `payload` on `lane` of the end-to-end session with junction
    /// `to`: handed up there once and in order per lane
    /// ([`crate::session::SessionEvent::Delivered`] in [`Output::Session`]),
    /// or this junction is told what became of it
    /// ([`crate::session::SessionEvent::Ended`]). Refused when the lane's
    /// window is full (wait for [`crate::session::SessionEvent::Acked`]).
    pub fn junction_send(&mut self, to: u16, lane: u32, payload: Bytes) -> Result<u64, SendError> {
        let seq = self.session_send(to, lane, payload.into())?;
        self.pump_peer(to);
        Ok(seq)
    }

    /// Sends `payload` on `lane` to junction `to`, transmitted when the
    /// shell next polls the core, without handing out the session's events
    /// (the caller may be handling one).
    pub(crate) fn session_send(
        &mut self,
        to: u16,
        lane: u32,
        payload: Chained,
    ) -> Result<u64, SendError> {
        let now = self.now.instant;
        let seq = self.peer(to).session.send(now, lane, payload)?;
        if !self.peers.dirty.contains(&to) {
            self.peers.dirty.push(to);
        }
        Ok(seq)
    }

    /// Transmits what was sent to other junctions since the shell last
    /// polled: many messages to one junction share seals and frames.
    pub(crate) fn transmit_dirty(&mut self) {
        self.ship_all_settling();
        for id in std::mem::take(&mut self.peers.dirty) {
            self.transmit_peer(id);
        }
    }

    /// Whether messages wait for [`Core::transmit_dirty`] and may go now.
    pub(crate) fn has_dirty(&self) -> bool {
        !self.peers.holding && (!self.peers.dirty.is_empty() || self.has_settling())
    }

    /// Holds back what driver frames send to other junctions until
    /// [`Core::release_transmits`]: the shell holds them while it handles a
    /// batch of frames read together, so that many small messages share
    /// one seal and one `Forward` frame. Everything else comes out of
    /// [`Core::poll_output`] as usual.
    pub fn hold_transmits(&mut self) {
        self.peers.holding = true;
    }

    /// Ends [`Core::hold_transmits`]: what was held comes out of the next
    /// [`Core::poll_output`]. Whether anything was held.
    pub fn release_transmits(&mut self) -> bool {
        std::mem::take(&mut self.peers.holding)
            && (!self.peers.dirty.is_empty() || self.has_settling())
    }

    /// The session with junction `to`, made on first use.
    fn peer(&mut self, to: u16) -> &mut Peer {
        let incarnation = self.router.incarnation();
        let window = self.config.window;
        self.peers.peers.entry(to).or_insert_with(|| Peer {
            session: Session::new(
                incarnation,
                SessionConfig {
                    window,
                    persistent_from: junction_road::remote::CONTROL_LANE_BASE,
                    ..SessionConfig::default()
                },
            ),
            channel: Channel::default(),
            route: None,
        })
    }

    /// What the channel with junction `peer` refused so far, if there is
    /// one: altered, forged or replayed frames, refused hellos.
    pub fn session_security(&self, peer: u16) -> Option<ChannelStats> {
        self.peers.peers.get(&peer).map(|p| p.channel.stats())
    }

    /// Every session with another junction, by junction, as a listing
    /// shows it.
    pub(crate) fn session_infos(&self) -> impl Iterator<Item = SessionInfo> + '_ {
        let counts = if self.peers.len() == 0 {
            Default::default()
        } else {
            self.remote.counts_by_junction()
        };
        let keyed = self.config.junction_identity.is_some();
        self.peers.peers.iter().map(move |(&junction, p)| {
            let footprint = p.session.footprint();
            let stats = p.channel.stats();
            let (imports, exports) = counts.get(&junction).copied().unwrap_or_default();
            SessionInfo {
                junction,
                incarnation: p.session.peer_incarnation(),
                lanes_out: saturate(footprint.lanes_out),
                lanes_in: saturate(footprint.lanes_in),
                unacked: saturate(footprint.unacked),
                sealing: match (keyed, p.channel.ready()) {
                    (false, _) => Sealing::Clear,
                    _ if p.route.is_some_and(|r| r.as_slice() == [junction]) => Sealing::Direct,
                    (true, false) => Sealing::Keying,
                    (true, true) => Sealing::Sealed,
                },
                handshakes: stats.handshakes,
                refused: stats
                    .unsealed
                    .saturating_add(stats.replayed)
                    .saturating_add(stats.hellos_refused)
                    .saturating_add(stats.malformed),
                imports,
                exports,
            }
        })
    }

    /// Session traffic from junction `from` arrived: a hello, a sealed
    /// frame, or a frame in clear (with no junction key, or `direct`: it
    /// came straight from `from` over their Highway).
    pub(crate) fn session_arrived(&mut self, from: u16, bytes: Bytes, direct: bool) {
        let now = self.now.instant;
        let known = self.router.incarnation_of(from);
        if self.config.junction_identity.is_some() && known.is_none() {
            // Its hellos could not be answered; and peers stay bounded by
            // the junctions routing knows.
            return self.refuse_traffic(from, "routing knows no junction of its origin");
        }
        self.peer(from);
        let me = self
            .config
            .junction_identity
            .as_ref()
            .map(|(key, chain)| Me {
                junction: self.config.junction,
                incarnation: self.router.incarnation(),
                key,
                chain,
            });
        let checks = routing::Checks {
            trust: &self.config.trust,
            revocations: self.config.revocations.as_ref(),
            trust_unsigned: self.config.trust_unsigned_routing,
            now: self.now.unix,
        };
        let Some(p) = self.peers.peers.get_mut(&from) else {
            return;
        };
        let origin = Origin {
            junction: from,
            known: known.unwrap_or(0),
            direct,
        };
        let received = p.channel.receive(now, me.as_ref(), origin, &checks, &bytes);
        let mut learned = None;
        // Session frames came: the peer lives in the incarnation routing
        // knows, whatever they say.
        if let (Ok(Received::Frame(_) | Received::Frames(_)), Some(incarnation)) =
            (&received, known)
        {
            p.session.handle_incarnation(now, incarnation);
            learned = Some(incarnation);
        }
        let mut take = |frame: &Bytes| match wire::decode(frame) {
            Ok((frame, payload)) => p
                .session
                .handle_frame(now, frame, payload)
                .map_err(|e| format!("refused a session frame: {e}")),
            Err(e) => Err(format!("refused a session frame: {e}")),
        };
        let result = match received {
            Ok(Received::Frame(bytes)) => take(&bytes),
            // Each frame of a batch stands alone, as if it came by itself:
            // one refused does not take the others with it.
            Ok(Received::Frames(batch)) => envelope::batch_frames(&batch)
                .map(|frame| {
                    frame
                        .map_err(|e| format!("dropped session traffic: {e}"))
                        .and_then(|frame| take(&frame))
                })
                .fold(Ok(()), Result::and),
            Ok(Received::Hello { incarnation }) => {
                p.session.handle_incarnation(now, incarnation);
                learned = Some(incarnation);
                Ok(())
            }
            Ok(Received::Nothing) => Ok(()),
            Err(e) => Err(format!("dropped session traffic: {e}")),
        };
        if let Err(e) = result
            && let Some(unlogged) = self.quiet.sessions.admit(now)
        {
            tracing::warn!(junction = from, "{e}{}", quiet::more(unlogged));
        }
        if let Some(incarnation) = learned {
            self.remote_incarnation(from, incarnation);
        }
        match self.peers.batch.as_mut() {
            // Within a batch of frames: one pump per peer at its end, so
            // that what they deliver goes up together and one
            // acknowledgement answers them all.
            Some(batch) => {
                if !batch.contains(&from) {
                    batch.push(from);
                }
            }
            None => self.pump_peer(from),
        }
    }

    /// Ends a batch of Highway frames: the peers they came from are pumped.
    pub(crate) fn end_batch(&mut self) {
        for peer in self.peers.batch.take().unwrap_or_default() {
            self.pump_peer(peer);
        }
    }

    /// Traffic to junction `to` could not be passed on: the next route
    /// found, even the same one, gets everything sent again.
    pub(crate) fn session_unroutable(&mut self, to: u16) {
        if let Some(p) = self.peers.peers.get_mut(&to) {
            p.route = None;
        }
    }

    /// Time passed for the sessions.
    pub(crate) fn peers_timeout(&mut self) {
        let now = self.now.instant;
        for p in self.peers.peers.values_mut() {
            p.session.handle_timeout(now);
            p.channel.handle_timeout(now);
        }
        self.pump_peers();
    }

    /// Routing learnt something: sessions hear of restarted peers and of
    /// new routes.
    pub(crate) fn peers_rerouted(&mut self) {
        let now = self.now.instant;
        let ids: Vec<u16> = self.peers.peers.keys().copied().collect();
        for id in ids {
            if let Some(incarnation) = self.router.incarnation_of(id)
                && let Some(p) = self.peers.peers.get_mut(&id)
            {
                p.session.handle_incarnation(now, incarnation);
                self.remote_incarnation(id, incarnation);
            }
        }
        // A holder junction that lost its route starts its lease now.
        self.remote_timeout();
        self.pump_peers();
    }

    /// Sends what every session has to send, and hands its events out:
    /// after what may concern them all (time, routes).
    pub(crate) fn pump_peers(&mut self) {
        let ids: Vec<u16> = self.peers.peers.keys().copied().collect();
        for id in ids {
            self.pump_peer(id);
        }
    }

    /// Sends what the session with junction `id` has to send, over its
    /// current route, and hands its events out: those of remote
    /// capabilities' lanes to [`crate::remote`], the others to the shell.
    fn pump_peer(&mut self, id: u16) {
        self.transmit_peer(id);
        while let Some(event) = self
            .peers
            .peers
            .get_mut(&id)
            .and_then(|p| p.session.poll_event())
        {
            self.session_event(id, event);
        }
    }

    /// Sends what the session with junction `id` has to send, over its
    /// current route.
    fn transmit_peer(&mut self, id: u16) {
        let now = self.now.instant;
        let me = self.config.junction;
        let route = self
            .router
            .route(id)
            .and_then(|r| Hops::new(&r.path).map(|hops| (r.path[0], hops)));
        let Some(p) = self.peers.peers.get_mut(&id) else {
            return;
        };
        if let Some((next, hops)) = route {
            if p.route != Some(hops) {
                p.route = Some(hops);
                p.session.route_changed(now);
                p.channel.route_changed(now);
            }
            let direct = next == id;
            let forward = |payload| Output::Highway {
                to: next,
                frame: HighwayFrame::Forward {
                    from: me,
                    to: id,
                    route: hops,
                },
                payload,
            };
            if let Some((key, chain)) = &self.config.junction_identity {
                let own = Me {
                    junction: me,
                    incarnation: self.router.incarnation(),
                    key,
                    chain,
                };
                self.out
                    .extend(p.channel.take_outgoing().map(|b| forward(b.into())));
                self.out
                    .extend(p.channel.poll_confirmation().map(|b| forward(b.into())));
                if p.channel.take_fresh_keys() && !direct {
                    p.session.route_changed(now);
                }
                if !p.channel.ready() {
                    // No keys yet: a handshake runs, even while the route
                    // is direct, so that a reroute finds them ready.
                    let busy = p.session.is_busy();
                    match p.channel.poll_hello(now, &own, id, busy) {
                        Ok(hello) => self.out.extend(hello.map(|b| forward(b.into()))),
                        Err(e) => tracing::error!("no session hello for junction {id}: {e}"),
                    }
                }
                if direct {
                    // Straight to the peer over their Highway: its TLS
                    // authenticates and encrypts the whole way, so a seal
                    // would only do it again.
                    let out = &mut self.out;
                    gather(&mut p.session, now, |frames| {
                        out.push_back(forward(in_clear(frames)));
                        true
                    });
                } else if p.channel.ready() {
                    // Through other junctions, sealed. With no keys yet the
                    // session holds its frames (as with no route) while the
                    // handshake runs.
                    let channel = &mut p.channel;
                    let out = &mut self.out;
                    gather(&mut p.session, now, |frames| {
                        let sealed = match frames {
                            [(frame, payload)] => channel.seal(frame, payload),
                            _ => channel.seal_batch(frames),
                        };
                        sealed.map(|s| out.push_back(forward(s.into()))).is_some()
                    });
                }
            } else {
                gather(&mut p.session, now, |frames| {
                    self.out.push_back(forward(in_clear(frames)));
                    true
                });
            }
        } else {
            // No way there now: nothing goes out, so nothing is lost
            // that might have arrived.
            p.route = None;
        }
    }
}

/// Hands what `session` has to send to `emit` in batches of up to
/// [`envelope::BATCH_BYTES`] (a frame that large goes alone), so that small
/// messages share a seal and a `Forward` frame. Stops when `emit` says it
/// could not send.
fn gather(
    session: &mut Session,
    now: Instant,
    mut emit: impl FnMut(&[(wire::SessionFrame, Chained)]) -> bool,
) {
    let mut batch: Vec<(wire::SessionFrame, Chained)> = Vec::new();
    let mut size = 0;
    while let Some(t) = session.poll_transmit(now) {
        let len = t.payload.len() + 64;
        if !batch.is_empty() && size + len > envelope::BATCH_BYTES {
            if !emit(&batch) {
                return;
            }
            batch.clear();
            size = 0;
        }
        size += len;
        batch.push((t.frame, t.payload));
    }
    if !batch.is_empty() {
        emit(&batch);
    }
}

/// Session frames in clear: a `Plain` envelope for one, a `PlainBatch` for
/// more.
fn in_clear(frames: &[(wire::SessionFrame, Chained)]) -> Chained {
    match frames {
        [(frame, payload)] => envelope::plain(frame, payload),
        _ => envelope::plain_batch(frames).into(),
    }
}

/// A count as a listing's `u32`, saturating.
fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
