//! What `junction monitor` and the traffic counters see: the values of the
//! control port's `Monitor` and `Traffic` requests (docs/protocol.md §19
//! and §20).
//!
//! A monitor names a port it owns; the junction then delivers one
//! [`MonitorEvent`] per message it sees as an ordinary message on that
//! port, from the control port (`J.0`), its payload a postcard-encoded
//! `MonitorEvent`. Fields are only ever added at the end.

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::frame::{Identity, Rights};

/// The most events a monitor may have delivered and not yet consumed; past
/// it the junction drops the monitor's events (never the traffic) and
/// counts them in [`MonitorEvent::dropped`].
pub const MONITOR_QUEUE: u32 = 1024;

/// The most bytes of a message's payload an event carries (the full size
/// is in [`MonitorEvent::size`]), as tcpdump's snap length.
pub const MONITOR_SNAPLEN: usize = 4096;

/// The most monitors one junction feeds at once.
pub const MAX_MONITORS: usize = 8;

/// The name a certificate must grant for its holder to monitor metadata.
pub const MONITOR_NAME: &str = "junction.monitor";

/// The name a certificate must grant for its holder to monitor payloads too.
pub const MONITOR_PAYLOAD_NAME: &str = "junction.monitor.payload";

/// The most rows of each list in a [`TrafficReport`]; the rest are folded
/// into its `other_*` totals.
pub const MAX_TRAFFIC_ROWS: usize = 64;

/// Which messages a monitor wants. Each non-empty list must match (any of
/// its entries); empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorFilter {
    /// Service names: the target port's registered names, or the sender's
    /// (names registered for its connection's ports, or certified).
    pub names: Vec<String>,
    /// Senders: a prefix (at least 4 hex digits) of the proven key, a name
    /// its certificate grants, `uid:N` for a local sender's user id, or
    /// `anonymous` for a sender that proved no identity.
    pub identities: Vec<String>,
    /// Port addresses, origin or target.
    pub ports: Vec<Address>,
    /// Junction ids, origin's or target's.
    pub junctions: Vec<u16>,
}

/// What kind of message an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// A one-way message.
    Send,
    /// A call (it carries a reply capability).
    Call,
    /// A reply to a call.
    Reply,
    /// A notice from the junction to a driver: a dead capability, a closed
    /// port, no senders, an undeliverable message, a failed call.
    Notice,
}

impl MessageKind {
    /// `send`, `call`, `reply`, `notice`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Send => "send",
            MessageKind::Call => "call",
            MessageKind::Reply => "reply",
            MessageKind::Notice => "notice",
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A capability that travelled with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSeen {
    /// The port it reaches.
    pub address: Address,
    /// Its rights.
    pub rights: Rights,
}

/// One message, as a monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    /// Milliseconds since the Unix epoch, as the junction last read its
    /// clock (to within its event loop's turn).
    pub unix_ms: u64,
    /// What it is.
    pub kind: MessageKind,
    /// The sender's home port (`J.0` for the junction itself).
    pub origin: Address,
    /// The sender's proven identity, if it proved one.
    pub identity: Option<Identity>,
    /// The sender's user id, for a sender on this junction that the OS
    /// named.
    pub uid: Option<u32>,
    /// The port it goes to. For a reply leaving for another junction, that
    /// junction's control port: the caller's port is known only there.
    pub target: Address,
    /// The names registered for the target port (on this junction).
    pub names: Vec<String>,
    /// For a sender on this junction, the names registered for its
    /// connection's ports: a service's replies come from its home port.
    pub origin_names: Vec<String>,
    /// Its payload's size in bytes.
    pub size: u32,
    /// The capabilities it carries.
    pub caps: Vec<CapSeen>,
    /// For a notice, what it says.
    pub notice: Option<String>,
    /// Events this monitor lost so far because it did not keep up.
    pub dropped: u64,
    /// The first [`MONITOR_SNAPLEN`] bytes of the payload, when the monitor
    /// asked for payloads and may see them.
    pub payload: Option<Vec<u8>>,
}

/// Messages and bytes, sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Messages sent.
    pub sent_messages: u64,
    /// Payload bytes sent.
    pub sent_bytes: u64,
    /// Messages received.
    pub received_messages: u64,
    /// Payload bytes received.
    pub received_bytes: u64,
}

impl Tally {
    /// Adds `other` to this one.
    pub fn add(&mut self, other: &Tally) {
        self.sent_messages = self.sent_messages.wrapping_add(other.sent_messages);
        self.sent_bytes = self.sent_bytes.wrapping_add(other.sent_bytes);
        self.received_messages = self.received_messages.wrapping_add(other.received_messages);
        self.received_bytes = self.received_bytes.wrapping_add(other.received_bytes);
    }

    /// Counts one message of `bytes` sent.
    #[inline]
    pub fn sent(&mut self, bytes: usize) {
        self.sent_messages = self.sent_messages.wrapping_add(1);
        self.sent_bytes = self.sent_bytes.wrapping_add(bytes as u64);
    }

    /// Counts one message of `bytes` received.
    #[inline]
    pub fn received(&mut self, bytes: usize) {
        self.received_messages = self.received_messages.wrapping_add(1);
        self.received_bytes = self.received_bytes.wrapping_add(bytes as u64);
    }

    /// Messages both ways: what lists are sorted by.
    pub fn messages(&self) -> u64 {
        self.sent_messages.saturating_add(self.received_messages)
    }
}

/// The traffic of one identity: every connection that proved it, or every
/// anonymous connection of one user id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityTraffic {
    /// The identity: the first 16 hex digits of its key and its names, or
    /// `uid N` for anonymous connections of user N, or `anonymous`.
    pub identity: String,
    /// Its connections now open.
    pub connections: u32,
    /// What they sent and received, since the junction started (closed
    /// connections included).
    pub tally: Tally,
}

/// The traffic of one open port: messages delivered to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTraffic {
    /// The port.
    pub address: Address,
    /// Its registered names.
    pub names: Vec<String>,
    /// What its owner's connection sent from it is counted per identity;
    /// here, what it received.
    pub tally: Tally,
}

/// The traffic with one other junction, end to end (messages this
/// junction sent to its ports, and received from its senders).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JunctionTraffic {
    /// The other junction.
    pub junction: u16,
    /// What went there and came from there.
    pub tally: Tally,
}

/// Traffic counters of one junction, the answer to `Traffic`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// This junction's id.
    pub junction: u16,
    /// Everything its drivers sent and received.
    pub total: Tally,
    /// By identity, busiest first, at most [`MAX_TRAFFIC_ROWS`].
    pub identities: Vec<IdentityTraffic>,
    /// The identities left out, together.
    pub other_identities: Tally,
    /// By open port, busiest first, at most [`MAX_TRAFFIC_ROWS`].
    pub ports: Vec<PortTraffic>,
    /// The ports left out, together.
    pub other_ports: Tally,
    /// By other junction, busiest first, at most [`MAX_TRAFFIC_ROWS`].
    pub junctions: Vec<JunctionTraffic>,
    /// The junctions left out, together.
    pub other_junctions: Tally,
    /// Monitors attached now.
    pub monitors: u32,
    /// Monitor events dropped because their monitor did not keep up, since
    /// the junction started.
    pub monitor_drops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let event = MonitorEvent {
            unix_ms: 1,
            kind: MessageKind::Call,
            origin: Address::new(1, 3),
            identity: None,
            uid: Some(1000),
            target: Address::new(2, 4),
            names: vec!["echo".into()],
            origin_names: vec![],
            size: 5,
            caps: vec![CapSeen {
                address: Address::new(1, 3),
                rights: Rights::SEND,
            }],
            notice: None,
            dropped: 7,
            payload: Some(b"hello".to_vec()),
        };
        let bytes = postcard::to_allocvec(&event).unwrap();
        assert_eq!(postcard::from_bytes::<MonitorEvent>(&bytes).unwrap(), event);
    }

    /// The examples in docs/protocol.md section 19, byte for byte.
    #[test]
    fn requests_and_events_encode_as_documented() {
        use crate::control::{ControlReply, ControlRequest};
        let request = ControlRequest::Monitor {
            port: 4,
            filter: MonitorFilter {
                names: vec!["echo".into()],
                ..Default::default()
            },
            payloads: true,
        };
        assert_eq!(
            postcard::to_allocvec(&request).unwrap(),
            [
                0x06, 0x04, 0x01, 0x04, b'e', b'c', b'h', b'o', 0x00, 0x00, 0x00, 0x01
            ]
        );
        assert_eq!(
            postcard::to_allocvec(&ControlRequest::Traffic).unwrap(),
            [0x07]
        );
        let reply = ControlReply::Monitoring {
            payloads: true,
            queue: MONITOR_QUEUE,
        };
        assert_eq!(
            postcard::to_allocvec(&reply).unwrap(),
            [0x07, 0x01, 0x80, 0x08]
        );
        let event = MonitorEvent {
            unix_ms: 1000,
            kind: MessageKind::Send,
            origin: Address::new(1, 5),
            identity: None,
            uid: Some(1000),
            target: Address::new(1, 2),
            names: vec!["echo".into()],
            origin_names: vec![],
            size: 2,
            caps: vec![],
            notice: None,
            dropped: 0,
            payload: Some(b"hi".to_vec()),
        };
        #[rustfmt::skip]
        let want = [
            0xE8, 0x07, 0x00, 0x01, 0x05, 0x00, 0x01, 0xE8, 0x07, 0x01, 0x02,
            0x01, 0x04, b'e', b'c', b'h', b'o', 0x00, 0x02, 0x00, 0x00, 0x00,
            0x01, 0x02, b'h', b'i',
        ];
        assert_eq!(postcard::to_allocvec(&event).unwrap(), want);
    }

    #[test]
    fn tallies_add_up() {
        let mut a = Tally::default();
        a.sent(3);
        a.received(4);
        let mut b = a;
        b.add(&a);
        assert_eq!(b.sent_messages, 2);
        assert_eq!(b.sent_bytes, 6);
        assert_eq!(b.received_bytes, 8);
        assert_eq!(b.messages(), 4);
    }
}
