//! Watching and counting the traffic: monitors (`junction monitor`) and the
//! traffic counters (`junction top`, the metrics endpoint).
//!
//! Both look at what leaves the core: every `Deliver` the shell drains
//! with [`Core::poll_output`] is one message received, and every message
//! shipped to another junction one sent there. Counting is a few additions
//! on structures the message path holds anyway (the sending and receiving
//! connection, the receiving port); watching costs one test of an empty
//! list while nobody watches, and allocates only for a monitor.
//!
//! A monitor is a port its connection owns: each event is delivered to it
//! as an ordinary message from the control port. Its queue is that port's
//! messages delivered and not yet consumed, at most [`MONITOR_QUEUE`]; past
//! it the monitor's events are dropped and counted, and the traffic goes
//! on. Monitor events never count as traffic, and never pause a sender.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use junction_road::control::ControlReply;
use junction_road::monitor::{
    CapSeen, IdentityTraffic, JunctionTraffic, MAX_MONITORS, MAX_TRAFFIC_ROWS, MONITOR_NAME,
    MONITOR_PAYLOAD_NAME, MONITOR_QUEUE, MONITOR_SNAPLEN, MessageKind, MonitorEvent, MonitorFilter,
    PortTraffic, Tally, TrafficReport,
};
use junction_road::{Address, Deliver, Frame, Header, Identity};

use crate::control::refused;
use crate::ports::{CONTROL_PORT, InFlight};
use crate::slab::Key;
use crate::{ConnId, Core, Output, Refusal};

/// Identities of closed connections whose counts are kept apart; the
/// others are folded into one "other" tally.
pub(crate) const MAX_DEPARTED_IDENTITIES: usize = 256;

/// Other junctions counted apart; the others are folded together.
pub(crate) const MAX_COUNTED_JUNCTIONS: usize = 256;

/// Monitors and traffic counts beyond those kept on connections and ports.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    monitors: Vec<Monitor>,
    /// Events dropped for monitors that did not keep up, ever.
    drops: u64,
    /// Identities of closed connections, by label, and the rest together.
    departed: HashMap<String, Tally>,
    other_departed: Tally,
    /// Other junctions, by id, and the rest together.
    junctions: BTreeMap<u16, Tally>,
    other_junctions: Tally,
    /// A moment on both clocks, to stamp events in milliseconds.
    epoch: Option<(std::time::Instant, u64)>,
}

#[derive(Debug)]
struct Monitor {
    conn: ConnId,
    port: Key,
    filter: MonitorFilter,
    payloads: bool,
    dropped: u64,
}

impl Watch {
    /// Whether anyone watches: the message path's one test.
    #[inline(always)]
    pub(crate) fn watched(&self) -> bool {
        !self.monitors.is_empty()
    }

    /// Now in Unix milliseconds. The wall clock comes in whole seconds:
    /// the monotonic clock counts from the first moment seen in the latest
    /// second, so stamps are late by at most the gap between events.
    fn unix_ms(&mut self, now: crate::Now) -> u64 {
        let since = |(at, unix): (std::time::Instant, u64)| {
            unix.saturating_mul(1000)
                .saturating_add(now.instant.saturating_duration_since(at).as_millis() as u64)
        };
        match self.epoch {
            Some(epoch) if since(epoch) >= now.unix.saturating_mul(1000) => since(epoch),
            _ => {
                self.epoch = Some((now.instant, now.unix));
                now.unix.saturating_mul(1000)
            }
        }
    }

    /// The tally of junction `id`.
    #[inline]
    pub(crate) fn junction(&mut self, id: u16) -> &mut Tally {
        if self.junctions.len() < MAX_COUNTED_JUNCTIONS || self.junctions.contains_key(&id) {
            self.junctions.entry(id).or_default()
        } else {
            &mut self.other_junctions
        }
    }

    /// A closed connection's counts, kept under its identity's label.
    pub(crate) fn depart(&mut self, label: String, tally: &Tally) {
        if tally.messages() == 0 {
            return;
        }
        let room = self.departed.len() < MAX_DEPARTED_IDENTITIES;
        match self.departed.get_mut(&label) {
            Some(t) => t.add(tally),
            None if room => {
                self.departed.insert(label, *tally);
            }
            None => self.other_departed.add(tally),
        }
    }
}

/// A message as a monitor sees it, before it is filtered and encoded.
struct Seen<'a> {
    kind: MessageKind,
    origin: Address,
    identity: Option<&'a Identity>,
    uid: Option<u32>,
    target: Address,
    names: Vec<String>,
    origin_names: Vec<String>,
    size: usize,
    caps: Vec<CapSeen>,
    notice: Option<String>,
}

impl Core {
    /// Counts and shows one output on its way to the shell.
    #[inline(always)]
    pub(crate) fn observe(&mut self, conn: ConnId, frame: &Frame) {
        match &frame.header {
            Header::Deliver(d) => self.observe_delivery(conn, d, &frame.payload),
            Header::Dead { .. }
            | Header::NoSenders { .. }
            | Header::PortClosed { .. }
            | Header::Undeliverable { .. }
            | Header::CallFailed { .. }
                if self.watch.watched() =>
            {
                self.monitor_notice(conn, &frame.header)
            }
            _ => {}
        }
    }

    #[inline(always)]
    fn observe_delivery(&mut self, conn: ConnId, d: &Deliver, payload: &Bytes) {
        let me = self.config.junction;
        // Control replies and monitor events are not traffic.
        if d.origin == Address::new(me, CONTROL_PORT) {
            return;
        }
        let bytes = payload.len();
        if let Some(c) = self.conns.get_mut(conn.key()) {
            c.traffic.received(bytes);
        }
        if let Some(key) = self.ports.key(d.port)
            && let Some(p) = self.ports.get_mut(key)
        {
            p.traffic.received(bytes);
        }
        if d.origin.junction != me {
            self.watch.junction(d.origin.junction).received(bytes);
        }
        if self.watch.watched() {
            self.monitor_delivery(d, payload);
        }
    }

    /// A message left for junction `to`: counted, and shown to monitors.
    #[inline]
    pub(crate) fn observe_shipped(
        &mut self,
        to: Address,
        origin: Address,
        from: ConnId,
        kind: MessageKind,
        caps: usize,
        payload: &Bytes,
    ) {
        self.watch.junction(to.junction).sent(payload.len());
        if !self.watch.watched() {
            return;
        }
        let identity = self
            .conns
            .get(from.key())
            .and_then(|c| c.identity.as_ref().map(|(id, _)| id.clone()));
        let uid = self.conns.get(from.key()).and_then(|c| c.peer.uid);
        let seen = Seen {
            kind,
            origin,
            identity: identity.as_deref(),
            uid,
            target: to,
            names: Vec::new(),
            origin_names: self.conn_names(from),
            size: payload.len(),
            // What travels is tokens; their count is what is known here.
            caps: vec![
                CapSeen {
                    address: to,
                    rights: junction_road::Rights::NONE
                };
                caps
            ],
            notice: None,
        };
        self.emit(&seen, payload);
    }

    fn monitor_delivery(&mut self, d: &Deliver, payload: &Bytes) {
        let me = self.config.junction;
        // A monitor does not watch its own events.
        if self.is_monitor_port(d.port) {
            return;
        }
        let kind = if d.reply.is_some() {
            MessageKind::Call
        } else if d.tag != 0 {
            MessageKind::Reply
        } else {
            MessageKind::Send
        };
        let sender = (d.origin.junction == me)
            .then(|| self.ports.key(d.origin.port))
            .flatten()
            .and_then(|k| self.ports.get(k))
            .and_then(|p| p.owner);
        let uid = sender
            .and_then(|owner| self.conns.get(owner.key()))
            .and_then(|c| c.peer.uid);
        let origin_names = sender.map(|s| self.conn_names(s)).unwrap_or_default();
        let seen = Seen {
            kind,
            origin: d.origin,
            identity: d.identity.as_deref(),
            uid,
            target: Address::new(me, d.port),
            names: self.port_names(d.port),
            origin_names,
            size: payload.len(),
            caps: d
                .caps
                .iter()
                .map(|g| CapSeen {
                    address: g.address,
                    rights: g.rights,
                })
                .collect(),
            notice: None,
        };
        self.emit(&seen, payload);
    }

    fn monitor_notice(&mut self, conn: ConnId, header: &Header) {
        let me = self.config.junction;
        let home = self.conns.get(conn.key()).map_or(0, |c| c.home);
        let (port, notice) = match header {
            Header::Dead { handle, reason } => (home, format!("handle {handle} dead: {reason}")),
            Header::NoSenders { port } => (*port, "no senders".to_string()),
            Header::PortClosed { port, reason } => (*port, format!("port closed: {reason}")),
            Header::Undeliverable {
                handle,
                count,
                reason,
                ..
            } => (
                home,
                format!("{count} undeliverable on handle {handle}: {reason}"),
            ),
            Header::CallFailed { tag, reason } => (home, format!("call {tag} failed: {reason}")),
            _ => return,
        };
        if self.is_monitor_port(port) {
            return;
        }
        let seen = Seen {
            kind: MessageKind::Notice,
            origin: Address::new(me, CONTROL_PORT),
            identity: None,
            uid: None,
            target: Address::new(me, port),
            names: self.port_names(port),
            origin_names: Vec::new(),
            size: 0,
            caps: Vec::new(),
            notice: Some(notice),
        };
        self.emit(&seen, &Bytes::new());
    }

    fn is_monitor_port(&self, port: u16) -> bool {
        self.ports
            .key(port)
            .is_some_and(|key| self.watch.monitors.iter().any(|m| m.port == key))
    }

    /// The names registered for any of `conn`'s ports.
    fn conn_names(&self, conn: ConnId) -> Vec<String> {
        let Some(c) = self.conns.get(conn.key()) else {
            return Vec::new();
        };
        c.ports.iter().flat_map(|&n| self.port_names(n)).collect()
    }

    fn port_names(&self, port: u16) -> Vec<String> {
        self.ports
            .key(port)
            .and_then(|k| self.ports.get(k))
            .map(|p| p.names.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    /// Hands `seen` to every monitor it matches that has room; counts a
    /// drop for those that have none. Monitors whose port is gone leave.
    fn emit(&mut self, seen: &Seen<'_>, payload: &Bytes) {
        let me = self.config.junction;
        let unix_ms = self.watch.unix_ms(self.now);
        let mut monitors = std::mem::take(&mut self.watch.monitors);
        monitors.retain(|m| {
            self.ports
                .get(m.port)
                .is_some_and(|p| p.owner == Some(m.conn))
        });
        for m in &mut monitors {
            if !matches(&m.filter, seen) {
                continue;
            }
            let Some(p) = self.ports.get_mut(m.port) else {
                continue;
            };
            let queued = p.in_flight.len() as u32;
            if queued >= MONITOR_QUEUE {
                m.dropped += 1;
                self.watch.drops += 1;
                continue;
            }
            p.in_flight.push_back(InFlight {
                flow: None,
                cost: 0,
                seq: 0,
                reply: None,
                is_reply: false,
                junction: 0,
                export: 0,
                n: 0,
            });
            let event = MonitorEvent {
                unix_ms,
                kind: seen.kind,
                origin: seen.origin,
                identity: seen.identity.cloned(),
                uid: seen.uid,
                target: seen.target,
                names: cut(&seen.names),
                origin_names: cut(&seen.origin_names),
                size: u32::try_from(seen.size).unwrap_or(u32::MAX),
                caps: seen.caps.clone(),
                notice: seen.notice.clone(),
                dropped: m.dropped,
                payload: m
                    .payloads
                    .then(|| payload[..payload.len().min(MONITOR_SNAPLEN)].to_vec()),
            };
            let room = 64 + event.payload.as_ref().map_or(0, Vec::len);
            let Ok(bytes) = postcard::to_extend(&event, Vec::with_capacity(room)) else {
                continue;
            };
            let deliver = Deliver {
                port: m.port.index as u16,
                origin: Address::new(me, CONTROL_PORT),
                tag: 0,
                reply: None,
                caps: Vec::new(),
                // A quarter full: the monitor should say what it read.
                ack: queued >= MONITOR_QUEUE / 4,
                identity: None,
            };
            self.out.push_back(Output::Frame {
                conn: m.conn,
                frame: Frame::with_payload(Header::Deliver(deliver), Bytes::from(bytes)),
            });
        }
        // Nothing in the loop above adds a monitor: put the list back.
        self.watch.monitors = monitors;
    }

    /// `Monitor`: events for `conn`'s port `port` from now on.
    pub(crate) fn start_monitor(
        &mut self,
        conn: ConnId,
        port: u16,
        filter: MonitorFilter,
        payloads: bool,
    ) -> ControlReply {
        let refuse = |why: String| refused(Refusal::MonitorRefused { why });
        let Some(key) = self.owned_port(conn, port) else {
            return refused(Refusal::UnknownPort { port });
        };
        if self.ports.get(key).is_some_and(|p| p.home) {
            return refuse("events cannot go to a home port; open a port for them".into());
        }
        let Some(may_see_payloads) = self.may_monitor(conn) else {
            return refuse(format!(
                "only the junction's own user, root, or an identity whose certificate grants \
                 {MONITOR_NAME} may monitor"
            ));
        };
        if payloads && !may_see_payloads {
            return refuse(format!(
                "payloads are shown only to the junction's own user, root, or an identity whose \
                 certificate grants {MONITOR_PAYLOAD_NAME}; monitor without payloads"
            ));
        }
        self.watch.monitors.retain(|m| {
            self.ports
                .get(m.port)
                .is_some_and(|p| p.owner == Some(m.conn))
                && m.port != key
        });
        // The last place is kept for the junction's own user and root, so
        // that certified monitors cannot lock the operator out.
        let limit = if self.privileged(conn) {
            MAX_MONITORS
        } else {
            MAX_MONITORS - 1
        };
        if self.watch.monitors.len() >= limit {
            return refuse(format!(
                "{} monitors are attached already; try again when one has left",
                self.watch.monitors.len()
            ));
        }
        tracing::info!(conn = %conn, port, payloads, "monitor attached");
        self.watch.monitors.push(Monitor {
            conn,
            port: key,
            filter,
            payloads,
            dropped: 0,
        });
        ControlReply::Monitoring {
            payloads,
            queue: MONITOR_QUEUE,
        }
    }

    /// Whether `conn` runs as the junction's own user or root.
    fn privileged(&self, conn: ConnId) -> bool {
        self.conns.get(conn.key()).is_some_and(|c| {
            c.peer
                .uid
                .is_some_and(|u| u == 0 || Some(u) == self.config.owner_uid)
        })
    }

    /// Whether `conn` may monitor: `Some(true)` with payloads.
    fn may_monitor(&self, conn: ConnId) -> Option<bool> {
        if self.privileged(conn) {
            return Some(true);
        }
        let c = self.conns.get(conn.key())?;
        let (identity, _) = c.identity.as_ref()?;
        let grants = |name: &str| identity.names.iter().any(|n| n.as_ref() == name);
        if grants(MONITOR_PAYLOAD_NAME) {
            Some(true)
        } else if grants(MONITOR_NAME) {
            Some(false)
        } else {
            None
        }
    }

    /// The label a connection's traffic is counted under.
    pub(crate) fn traffic_label(c: &crate::Conn) -> String {
        match (&c.identity, c.peer.uid) {
            (Some((id, _)), _) => identity_label(id),
            (None, Some(uid)) => format!("uid {uid}"),
            (None, None) => "anonymous".to_string(),
        }
    }

    /// A connection leaves: its counts stay with its identity.
    pub(crate) fn traffic_departs(&mut self, c: &crate::Conn) {
        if c.ready {
            let label = Self::traffic_label(c);
            self.watch.depart(label, &c.traffic);
        }
    }

    /// The counters, as `Traffic` answers them.
    pub fn traffic(&self) -> TrafficReport {
        let mut total = Tally::default();
        let mut by_identity: HashMap<String, (u32, Tally)> = HashMap::new();
        for (label, tally) in &self.watch.departed {
            by_identity.insert(label.clone(), (0, *tally));
        }
        let mut other_identities = self.watch.other_departed;
        total.add(&self.watch.other_departed);
        for tally in self.watch.departed.values() {
            total.add(tally);
        }
        for (_, c) in self.conns.iter().filter(|(_, c)| c.ready) {
            total.add(&c.traffic);
            let entry = by_identity.entry(Self::traffic_label(c)).or_default();
            entry.0 += 1;
            entry.1.add(&c.traffic);
        }
        let mut identities: Vec<IdentityTraffic> = by_identity
            .into_iter()
            .map(|(identity, (connections, tally))| IdentityTraffic {
                identity,
                connections,
                tally,
            })
            .collect();
        identities.sort_by(|a, b| {
            b.tally
                .messages()
                .cmp(&a.tally.messages())
                .then_with(|| a.identity.cmp(&b.identity))
        });
        for rest in identities.drain(identities.len().min(MAX_TRAFFIC_ROWS)..) {
            other_identities.add(&rest.tally);
        }
        let me = self.config.junction;
        let mut ports: Vec<PortTraffic> = self
            .ports
            .iter()
            .filter(|(_, p)| p.owner.is_some() && p.traffic.messages() > 0)
            .map(|(key, p)| PortTraffic {
                address: Address::new(me, key.index as u16),
                names: some_names(&p.names),
                tally: p.traffic,
            })
            .collect();
        ports.sort_by(|a, b| {
            b.tally
                .messages()
                .cmp(&a.tally.messages())
                .then_with(|| a.address.cmp(&b.address))
        });
        let mut other_ports = Tally::default();
        for rest in ports.drain(ports.len().min(MAX_TRAFFIC_ROWS)..) {
            other_ports.add(&rest.tally);
        }
        let mut junctions: Vec<JunctionTraffic> = self
            .watch
            .junctions
            .iter()
            .map(|(&junction, &tally)| JunctionTraffic { junction, tally })
            .collect();
        junctions.sort_by(|a, b| {
            b.tally
                .messages()
                .cmp(&a.tally.messages())
                .then_with(|| a.junction.cmp(&b.junction))
        });
        let mut other_junctions = self.watch.other_junctions;
        for rest in junctions.drain(junctions.len().min(MAX_TRAFFIC_ROWS)..) {
            other_junctions.add(&rest.tally);
        }
        TrafficReport {
            junction: me,
            total,
            identities,
            other_identities,
            ports,
            other_ports,
            junctions,
            other_junctions,
            monitors: self.watch.monitors.len() as u32,
            monitor_drops: self.watch.drops,
        }
    }
}

/// An identity as traffic is counted under it: the first 16 hex digits of
/// its key, and its names (at most 80 characters of them).
fn identity_label(id: &Identity) -> String {
    let key = &id.key.to_hex()[..16];
    if id.names.is_empty() {
        return key.to_string();
    }
    let mut names = id
        .names
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if names.len() > 80 {
        let mut cut = 80;
        while !names.is_char_boundary(cut) {
            cut -= 1;
        }
        names.truncate(cut);
        names.push('…');
    }
    format!("{key} {names}")
}

/// A port's names for a traffic row: those that fit in 80 bytes, then
/// `…` if any are left out, so that every row stays small.
fn some_names(names: &[junction_identity::ServiceName]) -> Vec<String> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    cut(&names)
}

/// The names that fit in 80 bytes, then `…` if any are left out.
fn cut(names: &[String]) -> Vec<String> {
    let mut room = 80usize;
    let mut out = Vec::new();
    for name in names {
        let name = name.clone();
        if name.len() > room {
            out.push("…".to_string());
            break;
        }
        room -= name.len();
        out.push(name);
    }
    out
}

/// Whether `seen` passes `filter`.
fn matches(filter: &MonitorFilter, seen: &Seen<'_>) -> bool {
    let names = filter.names.is_empty()
        || filter.names.iter().any(|want| {
            seen.names.iter().any(|n| n == want)
                || seen.origin_names.iter().any(|n| n == want)
                || seen
                    .identity
                    .is_some_and(|id| id.names.iter().any(|n| n.as_ref() == want.as_str()))
        });
    let identities = filter.identities.is_empty()
        || filter
            .identities
            .iter()
            .any(|want| identity_matches(want, seen));
    let ports = filter.ports.is_empty()
        || filter
            .ports
            .iter()
            .any(|&a| a == seen.origin || a == seen.target);
    let junctions = filter.junctions.is_empty()
        || filter
            .junctions
            .iter()
            .any(|&j| j == seen.origin.junction || j == seen.target.junction);
    names && identities && ports && junctions
}

/// Whether the sender of `seen` is `want`: a key prefix of at least four
/// hex digits, a certified name, `uid:N`, or `anonymous`.
fn identity_matches(want: &str, seen: &Seen<'_>) -> bool {
    if let Some(uid) = want.strip_prefix("uid:") {
        return seen.uid.is_some_and(|u| u.to_string() == uid);
    }
    match seen.identity {
        None => want == "anonymous",
        Some(id) => {
            (want.len() >= 4 && id.key.to_hex().starts_with(&want.to_ascii_lowercase()))
                || id.names.iter().any(|n| n.as_ref() == want)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(names: &[&str], uid: Option<u32>) -> Seen<'static> {
        Seen {
            kind: MessageKind::Send,
            origin: Address::new(1, 5),
            identity: None,
            uid,
            target: Address::new(2, 7),
            names: names.iter().map(|n| n.to_string()).collect(),
            origin_names: Vec::new(),
            size: 3,
            caps: Vec::new(),
            notice: None,
        }
    }

    #[test]
    fn filters_need_every_list_to_match() {
        let s = seen(&["echo"], Some(1000));
        assert!(matches(&MonitorFilter::default(), &s));
        let by_name = MonitorFilter {
            names: vec!["echo".into(), "other".into()],
            ..Default::default()
        };
        assert!(matches(&by_name, &s));
        let wrong_name = MonitorFilter {
            names: vec!["other".into()],
            ..Default::default()
        };
        assert!(!matches(&wrong_name, &s));
        let by_port = MonitorFilter {
            ports: vec![Address::new(2, 7)],
            junctions: vec![1],
            ..Default::default()
        };
        assert!(matches(&by_port, &s));
        let wrong_junction = MonitorFilter {
            junctions: vec![3],
            ..by_port
        };
        assert!(!matches(&wrong_junction, &s));
        let by_uid = MonitorFilter {
            identities: vec!["uid:1000".into()],
            ..Default::default()
        };
        assert!(matches(&by_uid, &s));
        let anonymous = MonitorFilter {
            identities: vec!["anonymous".into()],
            ..Default::default()
        };
        assert!(matches(&anonymous, &s));
        let other_uid = MonitorFilter {
            identities: vec!["uid:0".into()],
            ..Default::default()
        };
        assert!(!matches(&other_uid, &s));
    }

    #[test]
    fn departed_identities_are_bounded() {
        let mut watch = Watch::default();
        let mut one = Tally::default();
        one.sent(10);
        for i in 0..MAX_DEPARTED_IDENTITIES + 10 {
            watch.depart(format!("uid {i}"), &one);
        }
        watch.depart("uid 0".into(), &one);
        assert_eq!(watch.departed.len(), MAX_DEPARTED_IDENTITIES);
        assert_eq!(watch.other_departed.sent_messages, 10);
        assert_eq!(watch.departed["uid 0"].sent_messages, 2);
        for j in 0..(MAX_COUNTED_JUNCTIONS as u16 + 5) {
            watch.junction(j + 1).sent(1);
        }
        assert_eq!(watch.junctions.len(), MAX_COUNTED_JUNCTIONS);
        assert_eq!(watch.other_junctions.sent_messages, 5);
    }
}
