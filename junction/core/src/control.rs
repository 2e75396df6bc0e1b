//! The control port (port 0): name registration, lookup and listings.

use bytes::Bytes;
use junction_road::control::{
    ConnectionInfo, ControlReply, ControlRequest, Listing, PortInfo, RouteInfo, WithdrawnName,
};
use junction_road::{Address, Deliver, Frame, Granted, Header, Rights};

use super::{ConnId, Core, Output, Refusal};
use crate::ports::{CONTROL_PORT, InFlight};
use crate::registry::Registration;

impl Core {
    /// A call to the control port: answer it on the caller's home port.
    pub(super) fn control_call(&mut self, conn: ConnId, tag: u64, caps: &[u32], payload: &Bytes) {
        let answer = match postcard::from_bytes::<ControlRequest>(payload) {
            Ok(request) => self.control_request(conn, tag, request, caps),
            Err(e) => Some((
                refused(Refusal::BadControlRequest {
                    reason: e.to_string(),
                }),
                None,
            )),
        };
        if let Some((reply, granted)) = answer {
            self.control_answer(conn, tag, reply, granted);
        }
    }

    /// Answers `conn`'s control call `tag`, now or once another junction
    /// answered it.
    pub(crate) fn control_answer(
        &mut self,
        conn: ConnId,
        tag: u64,
        reply: ControlReply,
        granted: Option<Granted>,
    ) {
        let payload = postcard::to_allocvec(&reply).expect("control replies always serialize");
        let Some(c) = self.conns.get_mut(conn.key()) else {
            return;
        };
        c.pending_calls += 1;
        let ack = c.pending_calls >= self.config.max_pending_calls / 2;
        let home = c.home;
        if let Some(key) = self.ports.key(home)
            && let Some(p) = self.ports.get_mut(key)
        {
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
        let deliver = Deliver {
            port: home,
            origin: Address::new(self.config.junction, CONTROL_PORT),
            tag,
            reply: None,
            caps: granted.into_iter().collect(),
            ack,
            identity: None,
        };
        self.out.push_back(Output::Frame {
            conn,
            frame: Frame::with_payload(Header::Deliver(deliver), Bytes::from(payload)),
        });
    }

    /// The answer to a control request, or `None` when it comes later
    /// (from another junction, see [`Core::control_answer`]).
    fn control_request(
        &mut self,
        conn: ConnId,
        tag: u64,
        request: ControlRequest,
        caps: &[u32],
    ) -> Option<(ControlReply, Option<Granted>)> {
        Some(match request {
            ControlRequest::Register { name } => (self.register(conn, name, caps), None),
            ControlRequest::Unregister { name } => {
                let owned = self.registry.get(&name).is_some_and(|reg| {
                    self.ports
                        .get(reg.port)
                        .is_some_and(|p| p.owner == Some(conn))
                });
                if !owned {
                    let what = format!("{name} is not registered by this connection");
                    return Some((refused(Refusal::NameNotFound { what }), None));
                }
                if let Some(reg) = self.registry.remove(&name)
                    && let Some(p) = self.ports.get_mut(reg.port)
                {
                    p.names.retain(|n| n != &name);
                }
                self.announce_names();
                (ControlReply::Unregistered, None)
            }
            ControlRequest::Lookup { name } => {
                let limit = self.config.max_handles;
                let full = || Some((refused(Refusal::TooManyHandles { limit }), None));
                if !self.has_room(conn, 1) {
                    return full();
                }
                let Some(reg) = self.registry.get(&name).cloned() else {
                    return self.lookup_elsewhere(conn, tag, name);
                };
                let Some(handle) = self.new_cap(conn, reg.port, reg.rights, None) else {
                    return full();
                };
                let address = Address::new(self.config.junction, reg.port.index as u16);
                let granted = Granted {
                    handle,
                    rights: reg.rights,
                    credits: self.initial_credits(reg.rights),
                    address,
                    moves: reg.rights.contains(Rights::SEND_ONCE),
                };
                let chain = reg.chain.map(|c| c.as_ref().clone());
                (ControlReply::Found { address, chain }, Some(granted))
            }
            ControlRequest::List => (ControlReply::Listing(self.listing()), None),
            ControlRequest::Authenticate { chain, proof } => {
                (self.authenticate(conn, chain, &proof), None)
            }
            ControlRequest::Reload => match self.reload_answer.take() {
                Some((asker, reply)) if asker == conn => (reply, None),
                _ => (refused(Refusal::ReloadUnavailable), None),
            },
            ControlRequest::Monitor {
                port,
                filter,
                payloads,
            } => (self.start_monitor(conn, port, filter, payloads), None),
            ControlRequest::Traffic => (ControlReply::Traffic(self.traffic()), None),
        })
    }

    fn register(
        &mut self,
        conn: ConnId,
        name: junction_identity::ServiceName,
        caps: &[u32],
    ) -> ControlReply {
        let &[handle] = caps else {
            return refused(Refusal::BadRegistration {
                what: format!(
                    "registering {name} needs exactly one capability (to the service's port); {} came",
                    caps.len()
                ),
            });
        };
        let Some(cap) = self.cap(conn, handle) else {
            return refused(Refusal::UnknownHandle { handle });
        };
        let (port, rights) = (cap.port(), cap.rights);
        if !rights.contains(Rights::SEND | Rights::GRANT) {
            return refused(Refusal::BadRegistration {
                what: format!(
                    "registering {name} needs a capability with send and grant rights; it has {rights}"
                ),
            });
        }
        if self.ports.get(port).and_then(|p| p.owner) != Some(conn) {
            return refused(Refusal::BadRegistration {
                what: format!(
                    "a name can only be registered for a port this connection owns ({name})"
                ),
            });
        }
        // Names are bounded per connection, so the registry is bounded by
        // the connections; counting costs at most `max_ports` lookups.
        let limit = self.config.max_names;
        if self.names_of(conn) >= limit as usize {
            self.log_refusal(conn, &format!("{name}: {limit} names already"));
            return refused(Refusal::TooManyNames { limit });
        }
        let chain = match self.conns.get(conn.key()).and_then(|c| c.identity.clone()) {
            Some((identity, chain)) if identity.names.contains(&name) => Some(chain),
            _ if self.config.dev_namespace.iter().any(|p| p.matches(&name)) => None,
            identity => {
                let what = match identity {
                    Some((identity, _)) => format!(
                        "{name} is not granted by this connection's certificate (it grants {})",
                        if identity.names.is_empty() {
                            "no names".to_string()
                        } else {
                            identity
                                .names
                                .iter()
                                .map(|n| n.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                    None => format!(
                        "registering {name} needs a service certificate granting it: authenticate this connection first"
                    ),
                };
                self.log_refusal(conn, &what);
                return refused(Refusal::NameNotGranted { what });
            }
        };
        let without_certificate = chain.is_none();
        let proof = chain.as_ref().and_then(|_| {
            let c = self.conns.get(conn.key())?;
            Some((c.nonce, c.proof.clone()?))
        });
        let registration = Registration {
            port,
            rights,
            chain,
            proof,
        };
        if let Err(existing) = self.registry.insert(name.clone(), registration) {
            let by = Address::new(self.config.junction, existing.port.index as u16);
            self.log_refusal(conn, &format!("{name} is taken"));
            return refused(Refusal::NameTaken { name, by });
        }
        // Logged only now that it is done: a name taken by another is
        // refused above, and must not have been logged as registered.
        if without_certificate && let Some(unlogged) = self.quiet.dev_names.admit(self.now.instant)
        {
            tracing::warn!(
                conn = %conn,
                "{name} registered without a certificate, in the development namespace{}",
                crate::quiet::more(unlogged)
            );
        }
        self.announce_names();
        if let Some(p) = self.ports.get_mut(port) {
            p.withdrawn.retain(|(n, _)| n != &name);
            p.names.push(name);
        }
        ControlReply::Registered
    }

    /// A snapshot of ports, connections, names, Highways, routes and
    /// sessions, cut to fit one frame: Highways, routes and sessions may
    /// each take up to an eighth of the room, then ports and connections
    /// share what is left as before (ports up to half, then connections,
    /// then ports again). Each list is a prefix; what is left out is
    /// counted in its `more_*` field, and never built.
    pub fn listing(&mut self) -> Listing {
        let junction = self.config.junction;
        let room = (self.config.max_frame as usize).saturating_sub(LISTING_ALLOWANCE);
        let mut left = room;
        let share = room / 8;
        let highways = take_within(self.highways.iter().cloned(), &mut left, share, |h| {
            postcard::to_allocvec(h).ok().map(|b| b.len())
        });
        let more_highways = self.highways.len() - highways.len();
        let routes = self.router.routes();
        let total_routes = routes.len();
        let routes = routes.map(|(to, route, incarnation)| RouteInfo {
            junction: to,
            next_hop: route.path.first().copied().unwrap_or(to),
            cost: route.cost,
            path: route.path.clone(),
            incarnation,
        });
        let routes = take_within(routes, &mut left, share, |r| {
            postcard::to_allocvec(r).ok().map(|b| b.len())
        });
        let more_routes = total_routes - routes.len();
        let total_sessions = self.peers.len();
        let sessions = take_within(self.session_infos(), &mut left, share, |s| {
            postcard::to_allocvec(s).ok().map(|b| b.len())
        });
        let more_sessions = total_sessions - sessions.len();
        let room = left;
        let port_info = |(key, p): (crate::slab::Key, &crate::ports::Port)| PortInfo {
            address: Address::new(junction, key.index as u16),
            owner: p.owner.map(ConnId::get),
            queued: p.in_flight.len() as u32,
            senders: p.senders,
            watchers: p.watchers.len() as u32,
            names: p.names.iter().map(|n| n.to_string()).collect(),
            home: p.home,
        };
        let connection_info = |c: &super::Conn| ConnectionInfo {
            id: c.serial,
            label: c.label.clone(),
            road: c.peer.road.to_string(),
            pid: c.peer.pid,
            uid: c.peer.uid,
            home: Address::new(junction, c.home),
            ports: c.ports.len() as u32,
            handles: c.caps.len() as u32,
            replies: c.caps.replies(),
            pending_calls: c.pending_calls,
            identity: c.identity.as_ref().map(|(id, _)| {
                let names: Vec<String> = id.names.iter().map(|n| n.to_string()).collect();
                if names.is_empty() {
                    id.key.to_hex()[..16].to_string()
                } else {
                    format!("{} {}", &id.key.to_hex()[..16], names.join(","))
                }
            }),
        };
        let total_ports = self.ports.iter().count();
        let total_connections = self.conns.iter().filter(|(_, c)| c.ready).count();
        let mut port_infos = self.ports.iter().map(port_info).peekable();
        let mut connection_infos = self
            .conns
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(_, c)| connection_info(c))
            .peekable();
        let (mut ports, mut connections) = (Vec::new(), Vec::new());
        let mut left = room;
        // Ports take up to half, connections what remains, then ports what
        // connections left.
        let port_size = |p: &PortInfo| postcard::to_allocvec(p).ok().map(|b| b.len());
        let connection_size = |c: &ConnectionInfo| postcard::to_allocvec(c).ok().map(|b| b.len());
        fill(&mut port_infos, &mut ports, &mut left, room / 2, port_size);
        fill(
            &mut connection_infos,
            &mut connections,
            &mut left,
            0,
            connection_size,
        );
        fill(&mut port_infos, &mut ports, &mut left, 0, port_size);
        // Withdrawn names of the listed ports (a prefix of the table, in
        // its order), in what room is left.
        let all_withdrawn = self.ports.iter().take(ports.len()).flat_map(|(key, p)| {
            let port = Address::new(junction, key.index as u16);
            p.withdrawn.iter().map(move |(name, reason)| WithdrawnName {
                port,
                name: name.to_string(),
                reason: reason.to_string(),
            })
        });
        let total_withdrawn: usize = self
            .ports
            .iter()
            .take(ports.len())
            .map(|(_, p)| p.withdrawn.len())
            .sum();
        let mut withdrawn_iter = all_withdrawn.peekable();
        let mut withdrawn = Vec::new();
        fill(
            &mut withdrawn_iter,
            &mut withdrawn,
            &mut left,
            0,
            |w: &WithdrawnName| postcard::to_allocvec(w).ok().map(|b| b.len()),
        );
        Listing {
            junction,
            more_ports: (total_ports - ports.len()) as u32,
            more_connections: (total_connections - connections.len()) as u32,
            ports,
            connections,
            highways,
            routes,
            sessions,
            more_highways: more_highways as u32,
            more_routes: more_routes as u32,
            more_sessions: more_sessions as u32,
            more_withdrawn: (total_withdrawn - withdrawn.len()) as u32,
            withdrawn,
        }
    }
}

/// Room kept in a listing's frame for the `Deliver` header, the lists'
/// lengths and the counts of what was left out.
const LISTING_ALLOWANCE: usize = 1024;

/// The first entries of `from` that fit in `share` bytes (and in `left`),
/// each `size` bytes encoded, taking their size from `left`.
fn take_within<T>(
    from: impl Iterator<Item = T>,
    left: &mut usize,
    share: usize,
    size: impl Fn(&T) -> Option<usize>,
) -> Vec<T> {
    let mut budget = share.min(*left);
    let start = budget;
    let mut into = Vec::new();
    fill(&mut from.peekable(), &mut into, &mut budget, 0, size);
    *left -= start - budget;
    into
}

/// Moves entries from `from` to `into` while each fits in `left` bytes and
/// at least `keep` bytes stay free; stops at the first that does not, so a
/// listing shows a prefix.
fn fill<T>(
    from: &mut std::iter::Peekable<impl Iterator<Item = T>>,
    into: &mut Vec<T>,
    left: &mut usize,
    keep: usize,
    size: impl Fn(&T) -> Option<usize>,
) {
    while let Some(next) = from.peek() {
        let size = size(next).unwrap_or(usize::MAX);
        if size.saturating_add(keep) > *left {
            return;
        }
        *left -= size;
        into.extend(from.next());
    }
}

impl Core {
    /// How many names `conn`'s ports hold.
    fn names_of(&self, conn: ConnId) -> usize {
        self.conns.get(conn.key()).map_or(0, |c| {
            c.ports
                .iter()
                .filter_map(|&n| self.ports.key(n).and_then(|k| self.ports.get(k)))
                .map(|p| p.names.len())
                .sum()
        })
    }
}

/// A control request's refusal, as its reply.
pub(crate) fn refused(refusal: Refusal) -> ControlReply {
    ControlReply::Refused {
        code: refusal.code(),
        message: refusal.to_string(),
    }
}
