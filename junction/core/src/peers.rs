//! Other junctions of the bus, as parties of the core: one end-to-end
//! session each ([`crate::session`]), carried as the payload of `Forward`
//! frames along the route routing chose ([`crate::routing`]).
//!
//! The session sends only while a route exists (a frame it hands out and
//! nobody carries would later be reported undelivered when it may have
//! arrived), and is told when its route changes, so that it sends again at
//! once over the new one.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use junction_road::highway::{HighwayFrame, Hops};
use junction_road::session as wire;

use crate::session::{SendError, Session, SessionConfig};
use crate::{Core, Output, quiet};

/// One other junction this one exchanges traffic with.
#[derive(Debug)]
pub(crate) struct Peer {
    session: Session,
    /// The route its traffic last went by.
    route: Option<Hops>,
}

/// The other junctions, by id.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    peers: BTreeMap<u16, Peer>,
}

impl Peers {
    /// The soonest deadline of any session.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.session.poll_timeout())
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
        let seq = self.session_send(to, lane, payload)?;
        self.pump_peer(to);
        Ok(seq)
    }

    /// Sends `payload` on `lane` to junction `to` and transmits what can
    /// go now, without handing out the session's events (the caller may be
    /// handling one).
    pub(crate) fn session_send(
        &mut self,
        to: u16,
        lane: u32,
        payload: Bytes,
    ) -> Result<u64, SendError> {
        let now = self.now.instant;
        let seq = self.peer(to).session.send(now, lane, payload)?;
        self.transmit_peer(to);
        Ok(seq)
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
            route: None,
        })
    }

    /// Session traffic from junction `from` arrived.
    pub(crate) fn session_arrived(&mut self, from: u16, bytes: Bytes) {
        let now = self.now.instant;
        let (frame, payload) = match wire::decode(&bytes) {
            Ok(decoded) => decoded,
            Err(e) => return self.refuse_traffic(from, &e.to_string()),
        };
        if let Some(incarnation) = self.router.incarnation_of(from) {
            self.peer(from).session.handle_incarnation(now, incarnation);
            self.remote_incarnation(from, incarnation);
        }
        if let Err(e) = self.peer(from).session.handle_frame(now, frame, payload)
            && let Some(unlogged) = self.quiet.routing.admit(now)
        {
            tracing::warn!(
                junction = from,
                "refused a session frame: {e}{}",
                quiet::more(unlogged)
            );
        }
        self.pump_peer(from);
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
            }
            while let Some(t) = p.session.poll_transmit(now) {
                let mut buf = BytesMut::new();
                wire::encode(&t.frame, &t.payload, &mut buf);
                self.out.push_back(Output::Highway {
                    to: next,
                    frame: HighwayFrame::Forward {
                        from: me,
                        to: id,
                        route: hops,
                    },
                    payload: buf.freeze(),
                });
            }
        } else {
            // No way there now: nothing goes out, so nothing is lost
            // that might have arrived.
            p.route = None;
        }
    }
}
