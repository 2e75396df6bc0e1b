//! The core driven by events, no sockets: a small harness that connects
//! drivers, feeds frames and sorts the core's output into per-connection inboxes.

use std::collections::HashMap;

use bytes::Bytes;
use junction_road::control::{ControlReply, ControlRequest};
use junction_road::{
    Call, Deliver, ErrorCode, Frame, Granted, Header, Hello, MAGIC, PROTOCOL_VERSION, Reason,
    Rights, Send, Welcome,
};
use proptest::prelude::*;

use super::*;

/// What follows the one-unit refund a refused message's sender gets first:
/// the driver spent the credit, the core did not take it.
fn refunded(mut out: Vec<Header>) -> Vec<Header> {
    assert!(
        matches!(out.first(), Some(Header::SendCredit { count: 1, .. })),
        "no refund first: {out:?}"
    );
    out.remove(0);
    out
}

/// The address naming the lane to local port `port` (junction 1).
fn lane(port: u16) -> Address {
    Address::new(1, port)
}

struct Harness {
    core: Core,
    /// The fake clock every input is handed.
    now: Now,
    inbox: HashMap<ConnId, Vec<Header>>,
    payloads: HashMap<ConnId, Vec<Bytes>>,
    closed: Vec<ConnId>,
}

impl Harness {
    fn new() -> Self {
        Self::with(Self::config())
    }

    /// The tests' usual configuration: a small window.
    fn config() -> Config {
        Config {
            window: 4,
            // Small enough that the window need not grow to fit a frame.
            max_frame: 16 * 1024,
            dev_namespace: vec!["*".parse().unwrap()],
            ..Config::default()
        }
    }

    fn with(config: Config) -> Self {
        let now = Now::new(std::time::Instant::now(), 1_000);
        Self {
            core: Core::new(config, now),
            now,
            inbox: HashMap::new(),
            payloads: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Frame { conn, frame } => {
                    self.inbox.entry(conn).or_default().push(frame.header);
                    self.payloads.entry(conn).or_default().push(frame.payload);
                }
                Output::Close { conn, .. } => self.closed.push(conn),
                other => panic!("no other junction in these tests: {other:?}"),
            }
        }
    }

    fn connect(&mut self) -> (ConnId, Welcome) {
        self.connect_peer(Peer {
            road: "test",
            ..Peer::default()
        })
    }

    /// A connection from `peer`, through its Hello and Welcome.
    fn connect_peer(&mut self, peer: Peer) -> (ConnId, Welcome) {
        let conn = self.core.handle_connected(peer, self.now);
        self.feed(
            conn,
            Header::Hello(Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                max_frame: 1 << 20,
                label: "test".into(),
            }),
        );
        match self.take(conn).as_slice() {
            [Header::Welcome(w)] => (conn, w.clone()),
            other => panic!("expected a Welcome, got {other:?}"),
        }
    }

    fn feed(&mut self, conn: ConnId, header: Header) {
        self.feed_payload(conn, header, Bytes::new());
    }

    fn feed_payload(&mut self, conn: ConnId, header: Header, payload: Bytes) {
        self.core
            .handle_frame(conn, Frame::with_payload(header, payload), self.now);
        self.drain();
    }

    fn take(&mut self, conn: ConnId) -> Vec<Header> {
        self.payloads.remove(&conn);
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn open_port(&mut self, conn: ConnId) -> u16 {
        self.feed(conn, Header::OpenPort { req: 1 });
        match self.take(conn).as_slice() {
            [Header::PortOpened { address, .. }] => address.port,
            other => panic!("expected PortOpened, got {other:?}"),
        }
    }

    fn mint(&mut self, conn: ConnId, port: u16, rights: Rights) -> u32 {
        self.feed(
            conn,
            Header::Mint {
                req: 2,
                port,
                rights,
            },
        );
        match self.take(conn).as_slice() {
            [Header::Minted { handle, .. }] => *handle,
            other => panic!("expected Minted, got {other:?}"),
        }
    }

    fn send(&mut self, conn: ConnId, handle: u32, caps: Vec<u32>, payload: &'static [u8]) {
        self.feed_payload(
            conn,
            Header::Send(Send { handle, caps }),
            Bytes::from_static(payload),
        );
    }

    fn call(&mut self, conn: ConnId, handle: u32, tag: u64, payload: &'static [u8]) {
        self.feed_payload(
            conn,
            Header::Call(Call {
                handle,
                tag,
                caps: vec![],
            }),
            Bytes::from_static(payload),
        );
    }

    fn control(
        &mut self,
        conn: ConnId,
        request: ControlRequest,
        caps: Vec<u32>,
    ) -> (ControlReply, Vec<Granted>) {
        let payload = postcard::to_allocvec(&request).unwrap();
        self.feed_payload(
            conn,
            Header::Call(Call {
                handle: 0,
                tag: 99,
                caps,
            }),
            Bytes::from(payload),
        );
        let headers = self.inbox.remove(&conn).unwrap_or_default();
        let payloads = self.payloads.remove(&conn).unwrap_or_default();
        let [Header::Deliver(d)] = headers.as_slice() else {
            panic!("expected one Deliver, got {headers:?}")
        };
        assert_eq!(d.tag, 99);
        assert_eq!(d.origin.port, 0);
        let reply = postcard::from_bytes(&payloads[0]).unwrap();
        self.feed(
            conn,
            Header::Credit {
                port: d.port,
                count: 1,
            },
        );
        (reply, d.caps.clone())
    }

    fn delivered(&mut self, conn: ConnId) -> Vec<Deliver> {
        self.take(conn)
            .into_iter()
            .map(|h| match h {
                Header::Deliver(d) => d,
                other => panic!("expected Deliver, got {other:?}"),
            })
            .collect()
    }

    /// The core's own bookkeeping agrees with what its tables hold.
    fn check_invariants(&self) {
        if let Err(broken) = self.core.check_invariants() {
            panic!("{broken}");
        }
    }
}

fn error_code(headers: &[Header]) -> Option<ErrorCode> {
    headers.iter().find_map(|h| match h {
        Header::Error(e) => Some(e.code),
        _ => None,
    })
}

#[test]
fn handshake_gives_a_home_port_and_the_control_handle() {
    let mut h = Harness::new();
    let (_, w) = h.connect();
    assert_eq!(w.version, PROTOCOL_VERSION);
    assert_eq!(w.junction, 1);
    assert_ne!(w.home.port, 0);
    let (a, _) = h.connect();
    let (reply, _) = h.control(a, ControlRequest::List, vec![]);
    let ControlReply::Listing(listing) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(listing.connections.len(), 2);
    h.check_invariants();
}

#[test]
fn a_bad_first_frame_or_version_is_refused_and_closed() {
    let mut h = Harness::new();
    let conn = h.core.handle_connected(Peer::default(), h.now);
    h.feed(conn, Header::Ping { nonce: 1 });
    assert_eq!(
        error_code(&h.take(conn)),
        Some(ErrorCode::HandshakeRequired)
    );
    assert_eq!(h.closed, vec![conn]);

    let conn = h.core.handle_connected(Peer::default(), h.now);
    h.feed(
        conn,
        Header::Hello(Hello {
            magic: MAGIC,
            version: 99,
            max_frame: 1 << 20,
            label: String::new(),
        }),
    );
    let out = h.take(conn);
    assert_eq!(error_code(&out), Some(ErrorCode::UnsupportedVersion));
    assert!(matches!(&out[0], Header::Error(e) if e.message.contains("version 99")));
    assert!(h.closed.contains(&conn));
    assert_eq!(h.core.connections(), 0);
}

#[test]
fn a_connection_must_finish_its_hello_before_the_deadline() {
    let mut h = Harness::new();
    let timeout = h.core.config().hello_timeout;
    let silent = h.core.handle_connected(Peer::default(), h.now);
    assert_eq!(h.core.poll_timeout(), Some(h.now.instant + timeout));
    // One that says Hello in time is kept whatever the clock does later.
    let (ready, _) = h.connect();
    h.now = h.now.later(timeout / 2);
    h.core.handle_timeout(h.now);
    h.drain();
    assert!(h.closed.is_empty(), "nothing is due yet");
    h.now = h.now.later(timeout);
    h.core.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.closed, vec![silent]);
    let out = h.take(silent);
    assert_eq!(error_code(&out), Some(ErrorCode::HandshakeRequired));
    assert!(matches!(&out[0], Header::Error(e) if e.message.contains("Hello")));
    assert_eq!(h.core.connections(), 1);
    assert!(h.take(ready).is_empty());
    assert_eq!(h.core.poll_timeout(), None, "no timer is left");
}

#[test]
fn send_delivers_with_origin_and_credit_comes_back() {
    let mut h = Harness::new();
    let (a, wa) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let cap_b = h.mint(b, port, Rights::SEND | Rights::GRANT);
    let (reply, caps) = {
        h.control(
            b,
            ControlRequest::Register {
                name: "svc".parse().unwrap(),
            },
            vec![cap_b],
        )
    };
    assert_eq!(reply, ControlReply::Registered);
    assert!(caps.is_empty());
    let (reply, caps) = h.control(
        a,
        ControlRequest::Lookup {
            name: "svc".parse().unwrap(),
        },
        vec![],
    );
    assert!(matches!(reply, ControlReply::Found { .. }));
    let cap = caps[0].handle;
    assert_eq!(caps[0].credits, 4);

    h.send(a, cap, vec![], b"one");
    let d = h.delivered(b);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].port, port);
    assert_eq!(d[0].origin, wa.home, "origin is the sender's home port");
    assert!(h.take(a).is_empty());

    h.feed(b, Header::Credit { port, count: 1 });
    assert_eq!(
        h.take(a),
        vec![Header::SendCredit {
            port: lane(port),
            count: 1
        }]
    );
    h.check_invariants();
}

/// Issue 6: credit and notices go to the flow a message was sent on, never
/// to a newer capability that holds the same handle after 65,536 reuses of
/// its slot.
#[test]
fn notices_follow_the_flow_not_a_reused_handle() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let a_home = h.open_port(a);
    let old = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.send(a, old, vec![], b"in flight");
    assert_eq!(h.delivered(b).len(), 1);
    h.feed(a, Header::Drop { handle: old });
    // Churn `a`'s table until its slot generations go all the way round.
    let mut reused = false;
    for _ in 0..=0x1_0000 {
        let fresh = h.mint(a, a_home, Rights::SEND);
        reused |= fresh == old;
        h.feed(a, Header::Drop { handle: fresh });
    }
    assert!(
        !reused,
        "a handle with a message in flight was given to another capability"
    );
    let live = h.mint(a, a_home, Rights::SEND);
    // The owner closes the port: the dropped flow hears, the live one not.
    h.feed(b, Header::ClosePort { port });
    let heard = h.take(a);
    assert_eq!(
        heard,
        vec![
            Header::SendCredit {
                port: lane(port),
                count: 1
            },
            Header::Undeliverable {
                handle: old,
                first_seq: 0,
                count: 1,
                reason: Reason::PortClosed
            }
        ]
    );
    h.send(a, live, vec![], b"still fine");
    assert!(
        matches!(h.take(a).as_slice(), [Header::Deliver(_)]),
        "the live capability is untouched"
    );
    h.check_invariants();
    // Settled, the held handle goes back into use.
    assert_eq!(h.core.footprint().orphan_flows, 0);
}

/// Issue 7: a credit for a message sent on a dropped capability goes back
/// to its lane, which a new capability to the same port shares: one window
/// in all, however the handles churn.
#[test]
fn credit_for_a_dropped_capability_goes_back_to_its_lane() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let cap = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.send(a, cap, vec![], b"x");
    h.send(a, cap, vec![], b"y");
    assert_eq!(h.delivered(b).len(), 2);
    h.feed(a, Header::Drop { handle: cap });
    let again = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    assert_ne!(again, cap, "the held handle is not reused");
    let full = h.core.config().window;
    for _ in 2..full {
        h.send(a, again, vec![], b"z");
    }
    assert_eq!(h.delivered(b).len() as u32, full - 2, "the lane's window");
    h.send(a, again, vec![], b"over");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::NoCredit));
    h.feed(b, Header::Credit { port, count: full });
    assert_eq!(
        h.take(a),
        vec![
            Header::SendCredit {
                port: lane(port),
                count: 2
            },
            Header::SendCredit {
                port: lane(port),
                count: full - 2
            }
        ],
        "credit for the dropped flow, then for the live one"
    );
    h.check_invariants();
}

/// Issue 6: a sender that sent and then dropped its capability still learns
/// that its message was not delivered.
#[test]
fn a_sender_that_dropped_its_capability_still_hears_of_undelivered_messages() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let cap = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.send(a, cap, vec![], b"1");
    h.send(a, cap, vec![], b"2");
    h.send(a, cap, vec![], b"3");
    assert_eq!(h.delivered(b).len(), 3);
    h.feed(b, Header::Credit { port, count: 1 });
    assert_eq!(
        h.take(a),
        vec![Header::SendCredit {
            port: lane(port),
            count: 1
        }]
    );
    h.feed(a, Header::Drop { handle: cap });
    // The receiver dies with two messages unread.
    h.core.handle_disconnected(b);
    h.drain();
    assert_eq!(
        h.take(a),
        vec![
            Header::SendCredit {
                port: lane(port),
                count: 2
            },
            Header::Undeliverable {
                handle: cap,
                first_seq: 1,
                count: 2,
                reason: Reason::OwnerGone
            }
        ]
    );
    h.check_invariants();
    assert_eq!(h.core.footprint().orphan_flows, 0, "settled and forgotten");
}

/// Issue 6: a capability that moves when passed on says so when it arrives.
#[test]
fn granted_capabilities_say_whether_they_move() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(a);
    let copyable = h.mint(a, port, Rights::SEND | Rights::GRANT);
    let once = h.mint(a, port, Rights::SEND_ONCE | Rights::GRANT);
    h.feed(
        a,
        Header::Attenuate(junction_road::Attenuate {
            req: 7,
            handle: copyable,
            rights: Rights::SEND | Rights::GRANT,
            expires_at: None,
            max_messages: Some(3),
            revocable: false,
        }),
    );
    let [
        Header::Minted {
            handle: budgeted, ..
        },
    ] = h.take(a)[..]
    else {
        panic!("attenuated")
    };
    let b_home = h.core.conns.get(b.key()).unwrap().home;
    let to_b = h
        .core
        .new_cap(a, port_key(b_home, 0), Rights::SEND, None)
        .unwrap();
    h.send(a, to_b, vec![copyable, once, budgeted], b"three");
    let d = h.delivered(b);
    let moves: Vec<bool> = d[0].caps.iter().map(|g| g.moves).collect();
    assert_eq!(moves, vec![false, true, true]);
    h.check_invariants();
}

/// Found by the simulation: a moving capability attached to a message that
/// is not delivered leaves the sender's table all the same, as its driver
/// counts it gone when it writes the frame.
#[test]
fn a_refused_message_takes_its_moving_attachments_with_it() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let mine = h.open_port(a);
    let once = h.mint(a, mine, Rights::SEND_ONCE | Rights::GRANT);
    let copied = h.mint(a, mine, Rights::SEND | Rights::GRANT);
    let port = h.open_port(b);
    let to_b = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.feed(b, Header::ClosePort { port });
    h.take(b);
    h.send(a, to_b, vec![once, copied], b"to a closed port");
    assert!(matches!(
        h.take(a).as_slice(),
        [Header::SendCredit { .. }, Header::Undeliverable { .. }]
    ));
    h.feed(a, Header::Drop { handle: once });
    assert_eq!(
        error_code(&h.take(a)),
        Some(ErrorCode::UnknownHandle),
        "the send-once attachment is gone"
    );
    h.feed(a, Header::Drop { handle: copied });
    assert!(h.take(a).is_empty(), "a copied attachment stays");
    h.check_invariants();
}

/// Found by the simulation: a send-once capability is used up by its use,
/// even when it is dead on its own and the message goes nowhere.
#[test]
fn a_dead_send_once_capability_is_used_up_by_its_use() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let port = h.open_port(a);
    let once = h.mint(a, port, Rights::SEND_ONCE);
    h.feed(a, Header::Watch { handle: once });
    h.feed(a, Header::ClosePort { port });
    h.take(a);
    h.send(a, once, vec![], b"late");
    assert!(matches!(
        h.take(a).as_slice(),
        [Header::Undeliverable { .. }]
    ));
    h.feed(a, Header::Drop { handle: once });
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnknownHandle));
    h.check_invariants();
}

/// Found by the simulation: answering a call with a `Call` would hand the
/// caller a reply capability it never asked for; it is refused, and the
/// call it answers fails at once.
#[test]
fn a_reply_cannot_be_a_call() {
    let mut h = Harness::new();
    let (client, _) = h.connect();
    let (server, _) = h.connect();
    let port = h.open_port(server);
    let cap = h
        .core
        .new_cap(client, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.call(client, cap, 5, b"question");
    let reply = h.delivered(server)[0].reply.unwrap();
    h.call(server, reply, 9, b"a question back");
    let out = h.take(server);
    assert_eq!(error_code(&out), Some(ErrorCode::UnexpectedFrame));
    assert!(matches!(&out[0], Header::Error(e) if e.tag == 9 && e.message.contains("Send")));
    assert_eq!(
        h.take(client),
        vec![Header::CallFailed {
            tag: 5,
            reason: Reason::ReplyDropped
        }]
    );
    h.check_invariants();
}

/// Found by the simulation: a call with tag 0 is refused as malformed
/// before anything else, so no `CallFailed` ever names tag 0.
#[test]
fn a_call_with_tag_zero_is_malformed_even_on_a_dead_capability() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let cap = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.feed(b, Header::ClosePort { port });
    h.feed(a, Header::Watch { handle: cap });
    h.take(a);
    h.call(a, cap, 0, b"tagless");
    let out = h.take(a);
    assert_eq!(error_code(&out), Some(ErrorCode::BadTag));
    assert!(
        !out.iter()
            .any(|h| matches!(h, Header::CallFailed { tag: 0, .. })),
        "{out:?}"
    );
}

/// Found by the simulation: a connection being forgotten is sent nothing
/// about its own ports' deaths (nobody would read it).
#[test]
fn a_forgotten_connection_is_told_nothing() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(a);
    let to_self = h.mint(a, port, Rights::SEND | Rights::GRANT);
    h.feed(a, Header::Watch { handle: to_self });
    h.send(a, to_self, vec![], b"to myself");
    let to_a = h
        .core
        .new_cap(b, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.feed(b, Header::Watch { handle: to_a });
    h.send(b, to_a, vec![], b"to a");
    h.take(a);
    h.take(b);
    h.core.handle_disconnected(a);
    h.drain();
    assert!(h.take(a).is_empty(), "nothing for the forgotten connection");
    let told = h.take(b);
    assert!(
        told.iter()
            .any(|f| matches!(f, Header::Undeliverable { .. }))
    );
    assert!(told.iter().any(|f| matches!(f, Header::Dead { .. })));
    h.check_invariants();
}

/// Issue 7: a watcher leaves with its capability, however it goes
/// (dropped, moved, used up, its holder gone).
#[test]
fn watchers_leave_with_their_capabilities() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(a);
    for _ in 0..100 {
        let cap = h.mint(a, port, Rights::SEND);
        h.feed(a, Header::Watch { handle: cap });
        h.feed(a, Header::Drop { handle: cap });
    }
    let once = h.mint(a, port, Rights::SEND_ONCE);
    h.feed(a, Header::Watch { handle: once });
    h.send(a, once, vec![], b"used up");
    let theirs = h
        .core
        .new_cap(b, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.feed(b, Header::Watch { handle: theirs });
    h.check_invariants();
    let watching = |h: &mut Harness| {
        h.core
            .listing()
            .ports
            .iter()
            .find(|p| p.address.port == port)
            .map(|p| p.watchers)
    };
    assert_eq!(
        watching(&mut h),
        Some(1),
        "only b's capability still watches"
    );
    h.core.handle_disconnected(b);
    h.drain();
    assert_eq!(watching(&mut h), Some(0));
    h.check_invariants();
}

#[test]
fn a_slow_receiver_stops_its_senders_only() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (slow, _) = h.connect();
    let (fast, _) = h.connect();
    let slow_port = h.open_port(slow);
    let fast_port = h.open_port(fast);
    let to_slow = h.mint(slow, slow_port, Rights::SEND | Rights::GRANT);
    let to_fast = h.mint(fast, fast_port, Rights::SEND | Rights::GRANT);
    // Hand both capabilities to `a` through its home port.
    let a_home = h.core.conns.get(a.key()).unwrap().home;
    let a_cap_slow = h
        .core
        .new_cap(a, port_key(slow_port, 0), Rights::SEND, None)
        .unwrap();
    let a_cap_fast = h
        .core
        .new_cap(a, port_key(fast_port, 0), Rights::SEND, None)
        .unwrap();
    let _ = (to_slow, to_fast, a_home);

    for _ in 0..4 {
        h.send(a, a_cap_slow, vec![], b"x");
    }
    assert_eq!(h.delivered(slow).len(), 4);
    h.send(a, a_cap_slow, vec![], b"x");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::NoCredit));
    assert!(
        h.take(slow).is_empty(),
        "nothing beyond the window is delivered"
    );

    // The fast flow from the same sender goes on.
    for _ in 0..10 {
        h.send(a, a_cap_fast, vec![], b"y");
        assert_eq!(h.delivered(fast).len(), 1);
        h.feed(
            fast,
            Header::Credit {
                port: fast_port,
                count: 1,
            },
        );
    }
    let listing = h.core.listing();
    let slow_info = listing
        .ports
        .iter()
        .find(|p| p.address.port == slow_port)
        .unwrap();
    assert_eq!(slow_info.queued, 4);
    h.check_invariants();
}

#[test]
fn calls_get_replies_and_fail_when_the_reply_capability_is_dropped() {
    let mut h = Harness::new();
    let (client, wc) = h.connect();
    let (server, ws) = h.connect();
    let port = h.open_port(server);
    let cap = h
        .core
        .new_cap(client, port_key(port, 0), Rights::SEND, None)
        .unwrap();

    h.call(client, cap, 7, b"ping");
    let d = h.delivered(server);
    let reply = d[0].reply.expect("a call carries a reply capability");
    assert_eq!(d[0].origin, wc.home);
    h.send(server, reply, vec![], b"pong");
    let r = h.delivered(client);
    assert_eq!(r[0].tag, 7);
    assert_eq!(r[0].port, wc.home.port);
    assert_eq!(r[0].origin, ws.home);
    assert_eq!(h.core.conns.get(client.key()).unwrap().pending_calls, 1);
    h.feed(
        client,
        Header::Credit {
            port: wc.home.port,
            count: 1,
        },
    );
    assert_eq!(h.core.conns.get(client.key()).unwrap().pending_calls, 0);

    // The reply capability is used up.
    h.send(server, reply, vec![], b"again");
    assert_eq!(error_code(&h.take(server)), Some(ErrorCode::UnknownHandle));

    h.call(client, cap, 8, b"ping");
    let d = h.delivered(server);
    h.feed(
        server,
        Header::Drop {
            handle: d[0].reply.unwrap(),
        },
    );
    assert_eq!(
        h.take(client),
        vec![Header::CallFailed {
            tag: 8,
            reason: Reason::ReplyDropped
        }]
    );
    h.check_invariants();
}

#[test]
fn capabilities_travel_only_with_grant() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let (c, wc) = h.connect();
    let (target, _) = h.connect();
    let tport = h.open_port(target);
    let granted = h.mint(target, tport, Rights::SEND | Rights::GRANT);
    let plain = h.mint(target, tport, Rights::SEND);
    let to_a = h
        .core
        .new_cap(
            target,
            port_key(h.core.conns.get(a.key()).unwrap().home, 0),
            Rights::SEND,
            None,
        )
        .unwrap();

    // target → a: both capabilities? The plain one has no grant: refused whole.
    h.send(target, to_a, vec![granted, plain], b"caps");
    let out = h.take(target);
    assert_eq!(error_code(&out), Some(ErrorCode::MissingRight));
    assert!(
        out.contains(&Header::SendCredit {
            port: lane(h.core.conns.get(a.key()).unwrap().home),
            count: 1
        }),
        "{out:?}"
    );
    assert!(h.take(a).is_empty(), "nothing was delivered");

    h.send(target, to_a, vec![granted], b"cap");
    let d = h.delivered(a);
    let at_a = d[0].caps[0];
    assert_eq!(at_a.rights, Rights::SEND | Rights::GRANT);
    assert_eq!(at_a.address.port, tport);

    // a → b → c, then c uses it.
    let b_home = h.core.conns.get(b.key()).unwrap().home;
    let a_to_b = h
        .core
        .new_cap(a, port_key(b_home, 0), Rights::SEND, None)
        .unwrap();
    h.send(a, a_to_b, vec![at_a.handle], b"");
    let at_b = h.delivered(b)[0].caps[0];
    let b_to_c = h
        .core
        .new_cap(b, port_key(wc.home.port, 0), Rights::SEND, None)
        .unwrap();
    h.send(b, b_to_c, vec![at_b.handle], b"");
    let at_c = h.delivered(c)[0].caps[0];
    h.send(c, at_c.handle, vec![], b"hello from c");
    let d = h.delivered(target);
    assert_eq!(d[0].port, tport);
    assert_eq!(d[0].origin, wc.home);
    h.check_invariants();
}

#[test]
fn a_dead_owner_fails_calls_reports_undelivered_and_tells_watchers() {
    let mut h = Harness::new();
    let (client, _) = h.connect();
    let (server, _) = h.connect();
    let port = h.open_port(server);
    let cap = h
        .core
        .new_cap(client, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.feed(client, Header::Watch { handle: cap });
    h.call(client, cap, 1, b"a");
    h.send(client, cap, vec![], b"b");
    h.send(client, cap, vec![], b"c");
    assert_eq!(h.delivered(server).len(), 3);

    h.core.handle_disconnected(server);
    h.drain();
    let out = h.take(client);
    assert!(
        out.contains(&Header::CallFailed {
            tag: 1,
            reason: Reason::OwnerGone
        }),
        "{out:?}"
    );
    assert!(
        out.contains(&Header::Undeliverable {
            handle: cap,
            first_seq: 0,
            count: 3,
            reason: Reason::OwnerGone
        }),
        "{out:?}"
    );
    assert!(out.contains(&Header::Dead {
        handle: cap,
        reason: Reason::OwnerGone
    }));
    assert_eq!(h.core.conns.get(client.key()).unwrap().pending_calls, 0);

    // Later sends learn it at once.
    h.send(client, cap, vec![], b"d");
    assert_eq!(
        refunded(h.take(client)),
        vec![Header::Undeliverable {
            handle: cap,
            first_seq: 3,
            count: 1,
            reason: Reason::OwnerGone
        }]
    );
    h.feed(client, Header::Watch { handle: cap });
    assert_eq!(
        h.take(client),
        vec![Header::Dead {
            handle: cap,
            reason: Reason::OwnerGone
        }]
    );
    h.check_invariants();
}

#[test]
fn names_are_unique_and_die_with_their_port() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let pa = h.open_port(a);
    let ca = h.mint(a, pa, Rights::SEND | Rights::GRANT);
    let name: junction_identity::ServiceName = "org.example.echo".parse().unwrap();
    let (r, _) = h.control(a, ControlRequest::Register { name: name.clone() }, vec![ca]);
    assert_eq!(r, ControlReply::Registered);

    let pb = h.open_port(b);
    let cb = h.mint(b, pb, Rights::SEND | Rights::GRANT);
    let (r, _) = h.control(b, ControlRequest::Register { name: name.clone() }, vec![cb]);
    assert!(
        matches!(
            r,
            ControlReply::Refused {
                code: ErrorCode::NameTaken,
                ..
            }
        ),
        "{r:?}"
    );
    let plain = h.mint(b, pb, Rights::SEND);
    let (r, _) = h.control(
        b,
        ControlRequest::Register {
            name: "other".parse().unwrap(),
        },
        vec![plain],
    );
    assert!(
        matches!(
            r,
            ControlReply::Refused {
                code: ErrorCode::BadRegistration,
                ..
            }
        ),
        "{r:?}"
    );
    let (r, _) = h.control(b, ControlRequest::Unregister { name: name.clone() }, vec![]);
    assert!(
        matches!(
            r,
            ControlReply::Refused {
                code: ErrorCode::NameNotFound,
                ..
            }
        ),
        "{r:?}"
    );

    h.feed(a, Header::ClosePort { port: pa });
    assert_eq!(
        h.take(a),
        vec![Header::PortClosed {
            port: pa,
            reason: Reason::PortClosed
        }]
    );
    let (r, _) = h.control(b, ControlRequest::Lookup { name: name.clone() }, vec![]);
    assert!(
        matches!(
            r,
            ControlReply::Refused {
                code: ErrorCode::NameNotFound,
                ..
            }
        ),
        "{r:?}"
    );
    let (r, _) = h.control(b, ControlRequest::Register { name }, vec![cb]);
    assert_eq!(r, ControlReply::Registered);
    h.check_invariants();
}

#[test]
fn names_are_bounded_per_connection() {
    let mut h = Harness::with(Config {
        max_names: 3,
        dev_namespace: vec!["*".parse().unwrap()],
        ..Config::default()
    });
    let (a, _) = h.connect();
    let port = h.open_port(a);
    let cap = h.mint(a, port, Rights::SEND | Rights::GRANT);
    let register = |h: &mut Harness, conn, name: &str, cap| {
        h.control(
            conn,
            ControlRequest::Register {
                name: name.parse().unwrap(),
            },
            vec![cap],
        )
        .0
    };
    for i in 0..3 {
        assert_eq!(
            register(&mut h, a, &format!("t.n{i}"), cap),
            ControlReply::Registered
        );
    }
    match register(&mut h, a, "t.n3", cap) {
        ControlReply::Refused { code, message } => {
            assert_eq!(code, ErrorCode::BadRegistration);
            assert!(message.contains("unregister one"), "{message}");
        }
        other => panic!("a fourth name was registered: {other:?}"),
    }
    // Room again once a name goes; another connection has its own bound.
    h.control(
        a,
        ControlRequest::Unregister {
            name: "t.n0".parse().unwrap(),
        },
        vec![],
    );
    assert_eq!(register(&mut h, a, "t.n3", cap), ControlReply::Registered);
    let (b, _) = h.connect();
    let pb = h.open_port(b);
    let cb = h.mint(b, pb, Rights::SEND | Rights::GRANT);
    assert_eq!(register(&mut h, b, "t.b", cb), ControlReply::Registered);
    h.check_invariants();
}

#[test]
fn a_listing_always_fits_one_frame_and_says_what_it_left_out() {
    let max_frame = 16 * 1024;
    let mut h = Harness::with(Config {
        max_frame,
        dev_namespace: vec!["*".parse().unwrap()],
        ..Config::default()
    });
    let long = "x".repeat(40);
    let mut registered = 0;
    let mut conns = Vec::new();
    for c in 0..12 {
        let (conn, _) = h.connect();
        conns.push(conn);
        let port = h.open_port(conn);
        let cap = h.mint(conn, port, Rights::SEND | Rights::GRANT);
        for n in 0..64 {
            let name = format!("t.{long}.c{c}.n{n}");
            let (r, _) = h.control(
                conn,
                ControlRequest::Register {
                    name: name.parse().unwrap(),
                },
                vec![cap],
            );
            assert_eq!(r, ControlReply::Registered);
            registered += 1;
        }
    }
    assert_eq!(h.core.footprint().names, registered);
    let listing = h.core.listing();
    let bytes = postcard::to_allocvec(&ControlReply::Listing(listing.clone()))
        .unwrap()
        .len();
    assert!(bytes <= max_frame as usize, "{bytes} bytes");
    assert!(listing.more_ports > 0, "the names do not all fit");
    assert_eq!(
        listing.ports.len() + listing.more_ports as usize,
        h.core.footprint().ports
    );
    assert_eq!(
        listing.connections.len() + listing.more_connections as usize,
        conns.len()
    );
    assert_eq!(listing.more_connections, 0, "connections get their half");
    // Over the control port too, and the connection lives on.
    let (reply, _) = h.control(conns[0], ControlRequest::List, vec![]);
    assert!(matches!(reply, ControlReply::Listing(l) if l.more_ports > 0));
    h.check_invariants();
}

#[test]
fn bad_requests_get_errors_and_the_connection_lives() {
    let mut h = Harness::new();
    let (a, w) = h.connect();
    h.feed(
        a,
        Header::Deliver(Deliver {
            port: 1,
            origin: w.home,
            tag: 0,
            reply: None,
            caps: vec![],
            ack: false,
            identity: None,
        }),
    );
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnexpectedFrame));
    h.send(a, 12345, vec![], b"x");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnknownHandle));
    h.feed(
        a,
        Header::Mint {
            req: 5,
            port: w.home.port,
            rights: Rights::SEND | Rights::SEND_ONCE,
        },
    );
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::BadRights));
    h.feed(
        a,
        Header::Mint {
            req: 5,
            port: 999,
            rights: Rights::SEND,
        },
    );
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnknownPort));
    h.feed(a, Header::ClosePort { port: w.home.port });
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnknownPort));
    h.send(a, 0, vec![], b"not a call");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::BadControlRequest));
    h.feed_payload(
        a,
        Header::Call(Call {
            handle: 0,
            tag: 1,
            caps: vec![],
        }),
        Bytes::from_static(b"\xff\xff"),
    );
    let out = h.take(a);
    assert!(
        matches!(&out[0], Header::Deliver(d) if d.tag == 1),
        "{out:?}"
    );
    h.core
        .handle_frame_error(a, &FrameError::BadHeader { detail: "x".into() });
    h.drain();
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::BadHeader));
    assert!(h.closed.is_empty());
    h.feed(a, Header::Ping { nonce: 3 });
    assert_eq!(h.take(a), vec![Header::Pong { nonce: 3 }]);

    h.core
        .handle_frame_error(a, &FrameError::TooLarge { len: 10, max: 5 });
    h.drain();
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::FrameTooLarge));
    assert_eq!(h.closed, vec![a]);
    h.check_invariants();
}

#[test]
fn pending_calls_are_bounded_for_a_client_that_never_reads() {
    let mut h = Harness::with(Config {
        window: 1000,
        max_pending_calls: 3,
        dev_namespace: vec!["*".parse().unwrap()],
        ..Config::default()
    });
    let (client, _) = h.connect();
    let (server, _) = h.connect();
    let port = h.open_port(server);
    let cap = h
        .core
        .new_cap(client, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    for tag in 1..4 {
        h.call(client, cap, tag, b"q");
    }
    for d in h.delivered(server) {
        h.send(server, d.reply.unwrap(), vec![], b"r");
    }
    h.feed(server, Header::Credit { port, count: 3 });
    h.take(client);
    h.call(client, cap, 4, b"q");
    let out = h.take(client);
    assert_eq!(error_code(&out), Some(ErrorCode::TooManyPendingCalls));
    assert!(
        out.contains(&Header::SendCredit {
            port: lane(port),
            count: 1
        }),
        "the refused call's credit comes back: {out:?}"
    );
    assert!(h.take(server).is_empty(), "the server is not troubled");
    h.check_invariants();
}

#[test]
fn shutdown_says_goodbye_to_everyone() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    h.core.handle_shutdown();
    h.drain();
    assert!(matches!(h.take(a)[0], Header::Goodbye { .. }));
    assert!(matches!(h.take(b)[0], Header::Goodbye { .. }));
    assert_eq!(h.closed.len(), 2);
    assert_eq!(h.core.connections(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Connect,
    Disconnect(usize),
    OpenPort(usize),
    ClosePort(usize, usize),
    Mint(usize, usize, bool),
    Send(usize, usize, Option<usize>, bool),
    Reply(usize),
    Credit(usize, usize, u32),
    Drop(usize, usize),
    Watch(usize, usize),
    Register(usize, usize),
    Lookup(usize),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let i = || 0usize..8;
    prop_oneof![
        Just(Op::Connect),
        i().prop_map(Op::Disconnect),
        i().prop_map(Op::OpenPort),
        (i(), i()).prop_map(|(a, b)| Op::ClosePort(a, b)),
        (i(), i(), any::<bool>()).prop_map(|(a, b, g)| Op::Mint(a, b, g)),
        (i(), i(), proptest::option::of(i()), any::<bool>())
            .prop_map(|(a, b, c, call)| Op::Send(a, b, c, call)),
        i().prop_map(Op::Reply),
        (i(), i(), 0u32..6).prop_map(|(a, b, n)| Op::Credit(a, b, n)),
        (i(), i()).prop_map(|(a, b)| Op::Drop(a, b)),
        (i(), i()).prop_map(|(a, b)| Op::Watch(a, b)),
        (i(), i()).prop_map(|(a, b)| Op::Register(a, b)),
        i().prop_map(Op::Lookup),
    ]
}

/// Picks the `i`th element, wrapping, of a possibly empty list.
fn pick<T: Copy>(v: &[T], i: usize) -> Option<T> {
    (!v.is_empty()).then(|| v[i % v.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn any_sequence_of_operations_keeps_the_books_straight(ops in proptest::collection::vec(arb_op(), 1..80)) {
        let mut h = Harness::new();
        let mut conns: Vec<ConnId> = Vec::new();
        // What each connection has seen: ports it owns, handles it holds, replies it may send.
        let mut ports: HashMap<ConnId, Vec<u16>> = HashMap::new();
        let mut handles: HashMap<ConnId, Vec<u32>> = HashMap::new();
        let mut replies: Vec<(ConnId, u32)> = Vec::new();
        let mut tag = 0u64;
        for op in ops {
            match op {
                Op::Connect => {
                    let (c, w) = h.connect();
                    conns.push(c);
                    ports.insert(c, vec![w.home.port]);
                    handles.insert(c, vec![]);
                }
                Op::Disconnect(i) => if let Some(c) = pick(&conns, i) {
                    h.core.handle_disconnected(c);
                    conns.retain(|&x| x != c);
                }
                Op::OpenPort(i) => if let Some(c) = pick(&conns, i) {
                    h.feed(c, Header::OpenPort { req: 1 });
                }
                Op::ClosePort(i, p) => if let Some(c) = pick(&conns, i)
                    && let Some(p) = pick(&ports[&c], p) { h.feed(c, Header::ClosePort { port: p }); }
                Op::Mint(i, p, grant) => if let Some(c) = pick(&conns, i)
                    && let Some(p) = pick(&ports[&c], p) {
                        let rights = if grant { Rights::SEND | Rights::GRANT } else { Rights::SEND };
                        h.feed(c, Header::Mint { req: 2, port: p, rights });
                    }
                Op::Send(i, k, cap, call) => if let Some(c) = pick(&conns, i)
                    && let Some(handle) = pick(&handles[&c], k) {
                        let caps: Vec<u32> = cap.and_then(|j| pick(&handles[&c], j)).into_iter().collect();
                        if call {
                            tag += 1;
                            h.core.handle_frame(c, Frame::bare(Header::Call(Call { handle, tag, caps })), h.now);
                        } else {
                            h.core.handle_frame(c, Frame::bare(Header::Send(Send { handle, caps })), h.now);
                        }
                    }
                Op::Reply(i) => if let Some((c, r)) = pick(&replies, i) {
                    h.core.handle_frame(c, Frame::bare(Header::Send(Send { handle: r, caps: vec![] })), h.now);
                    replies.retain(|&x| x != (c, r));
                }
                Op::Credit(i, p, n) => if let Some(c) = pick(&conns, i)
                    && let Some(p) = pick(&ports[&c], p) { h.feed(c, Header::Credit { port: p, count: n }); }
                Op::Drop(i, k) => if let Some(c) = pick(&conns, i)
                    && let Some(handle) = pick(&handles[&c], k) {
                        h.feed(c, Header::Drop { handle });
                        handles.get_mut(&c).unwrap().retain(|&x| x != handle);
                    }
                Op::Watch(i, k) => if let Some(c) = pick(&conns, i)
                    && let Some(handle) = pick(&handles[&c], k) { h.feed(c, Header::Watch { handle }); }
                Op::Register(i, k) => if let Some(c) = pick(&conns, i)
                    && let Some(handle) = pick(&handles[&c], k) {
                        let payload = postcard::to_allocvec(&ControlRequest::Register { name: format!("n{}", k % 3).parse().unwrap() }).unwrap();
                        tag += 1;
                        h.core.handle_frame(c, Frame::with_payload(Header::Call(Call { handle: 0, tag, caps: vec![handle] }), Bytes::from(payload)), h.now);
                    }
                Op::Lookup(i) => if let Some(c) = pick(&conns, i) {
                    let payload = postcard::to_allocvec(&ControlRequest::Lookup { name: format!("n{}", i % 3).parse().unwrap() }).unwrap();
                    tag += 1;
                    h.core.handle_frame(c, Frame::with_payload(Header::Call(Call { handle: 0, tag, caps: vec![] }), Bytes::from(payload)), h.now);
                }
            }
            h.drain();
            // Learn what the core handed out.
            for (&c, headers) in h.inbox.iter_mut() {
                for header in headers.drain(..) {
                    match header {
                        Header::PortOpened { address, .. } => ports.entry(c).or_default().push(address.port),
                        Header::Minted { handle, .. } => handles.entry(c).or_default().push(handle),
                        Header::Deliver(d) => {
                            handles.entry(c).or_default().extend(d.caps.iter().map(|g| g.handle));
                            if let Some(r) = d.reply { replies.push((c, r)); }
                        }
                        _ => {}
                    }
                }
            }
            h.payloads.clear();
            h.check_invariants();
        }
    }
}

#[test]
fn credits_count_bytes_and_refusals_keep_sequence_numbers_in_step() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let cap = h
        .core
        .new_cap(a, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    // 16 KiB of payload costs two credits of the window of four.
    static BIG: [u8; 16 * 1024] = [0; 16 * 1024];
    h.feed_payload(
        a,
        Header::Send(Send {
            handle: cap,
            caps: vec![],
        }),
        Bytes::from_static(&BIG),
    );
    assert_eq!(h.delivered(b).len(), 1);
    h.send(a, cap, vec![], b"x");
    h.send(a, cap, vec![], b"y");
    assert_eq!(h.delivered(b).len(), 2);
    // No credit left: refused, but the frame still took sequence number 3.
    h.send(a, cap, vec![], b"z");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::NoCredit));
    // A call with tag 0 is refused (sequence number 4).
    h.call(a, cap, 0, b"q");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::BadTag));
    h.feed(b, Header::Credit { port, count: 3 });
    assert_eq!(
        h.take(a),
        vec![Header::SendCredit {
            port: lane(port),
            count: 4
        }]
    );
    // Too many capabilities in one message.
    h.send(a, cap, vec![0; MAX_CAPS_PER_MESSAGE + 1], b"");
    assert_eq!(error_code(&h.take(a)), Some(ErrorCode::BadCapabilityList));
    h.take(a);
    h.core.handle_disconnected(b);
    h.drain();
    let out = h.take(a);
    assert!(out.is_empty(), "nothing was in flight: {out:?}");
    h.send(a, cap, vec![], b"late");
    assert_eq!(
        h.take(a),
        vec![
            Header::SendCredit {
                port: lane(port),
                count: 1
            },
            Header::Undeliverable {
                handle: cap,
                first_seq: 6,
                count: 1,
                reason: Reason::OwnerGone
            }
        ],
        "the credit spent on a message to a dead port comes back to the lane"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Whatever well-delimited frames peers send, in whatever order, the
    /// core answers without panicking and its books stay straight.
    #[test]
    fn arbitrary_frames_from_peers_never_break_the_core(
        frames in proptest::collection::vec((0usize..3, proptest::collection::vec(any::<u8>(), 0..40)), 1..120)
    ) {
        let mut h = Harness::new();
        let conns: Vec<ConnId> = (0..3).map(|_| h.connect().0).collect();
        for (who, bytes) in frames {
            let conn = conns[who];
            match junction_road::codec::decode_body(Bytes::from(bytes)) {
                Ok(frame) => h.core.handle_frame(conn, frame, h.now),
                Err(e) => h.core.handle_frame_error(conn, &e),
            }
            h.drain();
            h.inbox.clear();
            h.payloads.clear();
            h.check_invariants();
        }
    }
}

mod limits {
    //! Attenuation, budgets, expiry and revocation.
    use super::*;
    use junction_road::Attenuate;

    fn attenuate(
        h: &mut Harness,
        conn: ConnId,
        handle: u32,
        rights: Rights,
        expires_at: Option<u64>,
        max: Option<u32>,
        revocable: bool,
    ) -> Result<u32, ErrorCode> {
        h.feed(
            conn,
            Header::Attenuate(Attenuate {
                req: 9,
                handle,
                rights,
                expires_at,
                max_messages: max,
                revocable,
            }),
        );
        match h.take(conn).as_slice() {
            [Header::Minted { handle, .. }] => Ok(*handle),
            [Header::Error(e)] => Err(e.code),
            other => panic!("{other:?}"),
        }
    }

    fn setup() -> (Harness, ConnId, ConnId, u16, u32) {
        let mut h = Harness::new();
        let (a, _) = h.connect();
        let (owner, _) = h.connect();
        let port = h.open_port(owner);
        let cap = h
            .core
            .new_cap(a, port_key(port, 0), Rights::SEND | Rights::GRANT, None)
            .unwrap();
        (h, a, owner, port, cap)
    }

    #[test]
    fn attenuation_only_narrows() {
        let (mut h, a, _, _, cap) = setup();
        let narrow = attenuate(&mut h, a, cap, Rights::SEND, Some(500), Some(10), false).unwrap();
        assert_eq!(
            attenuate(
                &mut h,
                a,
                narrow,
                Rights::SEND | Rights::GRANT,
                None,
                None,
                false
            ),
            Err(ErrorCode::CannotWiden)
        );
        assert_eq!(
            attenuate(&mut h, a, narrow, Rights::SEND, Some(501), None, false),
            Err(ErrorCode::CannotWiden)
        );
        assert_eq!(
            attenuate(&mut h, a, narrow, Rights::SEND, None, Some(11), false),
            Err(ErrorCode::CannotWiden)
        );
        assert_eq!(
            attenuate(&mut h, a, 0, Rights::SEND, None, None, false),
            Err(ErrorCode::CannotWiden)
        );
        attenuate(&mut h, a, narrow, Rights::SEND, Some(400), Some(3), false).unwrap();
        h.check_invariants();
    }

    #[test]
    fn a_budget_runs_out_and_a_budgeted_capability_moves() {
        let (mut h, a, owner, _, cap) = setup();
        let two = attenuate(
            &mut h,
            a,
            cap,
            Rights::SEND | Rights::GRANT,
            None,
            Some(2),
            false,
        )
        .unwrap();
        h.feed(a, Header::Watch { handle: two });
        h.send(a, two, vec![], b"1");
        h.send(a, two, vec![], b"2");
        assert_eq!(h.delivered(owner).len(), 2);
        assert_eq!(
            h.take(a),
            vec![Header::Dead {
                handle: two,
                reason: Reason::Exhausted
            }]
        );
        h.send(a, two, vec![], b"3");
        assert_eq!(
            refunded(h.take(a)),
            vec![Header::Undeliverable {
                handle: two,
                first_seq: 2,
                count: 1,
                reason: Reason::Exhausted
            }]
        );
        assert!(h.take(owner).is_empty());

        // Passed on, a budgeted capability moves: the sender loses it.
        let one = attenuate(
            &mut h,
            a,
            cap,
            Rights::SEND | Rights::GRANT,
            None,
            Some(1),
            false,
        )
        .unwrap();
        let (b, wb) = h.connect();
        let to_b = h
            .core
            .new_cap(a, port_key(wb.home.port, 0), Rights::SEND, None)
            .unwrap();
        h.send(a, to_b, vec![one], b"take it");
        let got = h.delivered(b)[0].caps[0].handle;
        h.send(a, one, vec![], b"mine?");
        assert_eq!(error_code(&h.take(a)), Some(ErrorCode::UnknownHandle));
        h.send(b, got, vec![], b"spent by b");
        assert_eq!(h.delivered(owner).len(), 1);
        h.check_invariants();
    }

    #[test]
    fn a_budget_is_shared_by_everything_attenuated_from_it() {
        let (mut h, a, owner, _, cap) = setup();
        let one = attenuate(&mut h, a, cap, Rights::SEND, None, Some(1), false).unwrap();
        let mut all = vec![one];
        for _ in 0..200 {
            // Attenuated from the original, or from the last one made.
            let from = all[all.len() / 2];
            all.push(attenuate(&mut h, a, from, Rights::SEND, None, None, false).unwrap());
        }
        // An attenuation cannot make the budget larger, nor fresh.
        assert_eq!(
            attenuate(&mut h, a, all[7], Rights::SEND, None, Some(2), false),
            Err(ErrorCode::CannotWiden)
        );
        let fresh = attenuate(&mut h, a, all[9], Rights::SEND, None, Some(1), false).unwrap();
        all.push(fresh);
        h.feed(a, Header::Watch { handle: all[3] });
        assert!(h.take(a).is_empty(), "nothing spent yet");
        for &handle in &all {
            h.send(a, handle, vec![], b"once");
        }
        assert_eq!(h.delivered(owner).len(), 1, "one budget, one message");
        let told = h.take(a);
        // The watched sibling heard as the budget ran out, at the first
        // send, before any other sibling tried.
        assert_eq!(
            told.iter()
                .filter(|f| matches!(f, Header::Dead { .. }))
                .collect::<Vec<_>>(),
            vec![&Header::Dead {
                handle: all[3],
                reason: Reason::Exhausted
            }]
        );
        assert!(
            matches!(told[0], Header::Dead { handle, .. } if handle == all[3]),
            "{told:?}"
        );
        let undeliverable = told
            .iter()
            .filter(|f| {
                matches!(
                    f,
                    Header::Undeliverable {
                        reason: Reason::Exhausted,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(undeliverable, all.len() - 1);
        // A sibling watched later hears at once.
        h.feed(a, Header::Watch { handle: all[100] });
        assert_eq!(
            h.take(a),
            vec![Header::Dead {
                handle: all[100],
                reason: Reason::Exhausted
            }]
        );
        h.check_invariants();
        // The budget goes with the last capability that draws from it.
        for &handle in &all {
            h.feed(a, Header::Drop { handle });
        }
        h.take(a);
        assert_eq!(h.core.footprint().book_entries, 0);
        h.check_invariants();
    }

    #[test]
    fn a_tighter_budget_spends_from_the_looser_one_too() {
        let (mut h, a, owner, _, cap) = setup();
        let three = attenuate(&mut h, a, cap, Rights::SEND, None, Some(3), false).unwrap();
        let two = attenuate(&mut h, a, three, Rights::SEND, None, Some(2), false).unwrap();
        h.send(a, two, vec![], b"1");
        h.send(a, two, vec![], b"2");
        h.send(a, three, vec![], b"3");
        h.send(a, three, vec![], b"4: over");
        assert_eq!(h.delivered(owner).len(), 3);
        h.check_invariants();
    }

    #[test]
    fn nesting_is_bounded() {
        let (mut h, a, _, _, cap) = setup();
        let mut last = cap;
        for n in 0..8 {
            last = attenuate(
                &mut h,
                a,
                last,
                Rights::SEND | Rights::GRANT,
                None,
                Some(100 - n),
                true,
            )
            .unwrap();
        }
        assert_eq!(
            attenuate(&mut h, a, last, Rights::SEND, None, Some(1), false),
            Err(ErrorCode::CannotWiden)
        );
        assert_eq!(
            attenuate(&mut h, a, last, Rights::SEND, None, None, true),
            Err(ErrorCode::CannotWiden)
        );
        // Sharing what it has is always allowed.
        attenuate(&mut h, a, last, Rights::SEND, None, None, false).unwrap();
        h.check_invariants();
    }

    #[test]
    fn lineages_of_dead_roots_leave_the_books() {
        let (mut h, a, owner, _, cap) = setup();
        let (b, wb) = h.connect();
        let (c, wc) = h.connect();
        let a_to_b = h
            .core
            .new_cap(a, port_key(wb.home.port, 0), Rights::SEND, None)
            .unwrap();
        let b_to_c = h
            .core
            .new_cap(b, port_key(wc.home.port, 0), Rights::SEND, None)
            .unwrap();
        let grant = Rights::SEND | Rights::GRANT;
        let cycle = |h: &mut Harness| {
            // A revocable root, passed on; the root is dropped first, then
            // its copy travels on and is dropped.
            let root = attenuate(h, a, cap, grant, None, None, true).unwrap();
            let inner = attenuate(h, a, root, grant, None, None, true).unwrap();
            h.send(a, a_to_b, vec![root, inner], b"");
            let got = h.delivered(b)[0].caps.clone();
            h.feed(a, Header::Drop { handle: root });
            h.send(b, b_to_c, vec![got[0].handle], b"");
            let at_c = h.delivered(c)[0].caps[0].handle;
            h.feed(c, Header::Drop { handle: at_c });
            h.feed(a, Header::Revoke { handle: inner });
            h.feed(
                b,
                Header::Drop {
                    handle: got[0].handle,
                },
            );
            h.feed(
                b,
                Header::Drop {
                    handle: got[1].handle,
                },
            );
            h.feed(a, Header::Drop { handle: inner });
            // A budgeted revocable root moves when passed on: its lineage
            // ends, since nobody can revoke it any more.
            let moving = attenuate(h, a, cap, grant, None, Some(5), true).unwrap();
            h.send(a, a_to_b, vec![moving], b"");
            let moved = h.delivered(b)[0].caps[0].handle;
            h.send(b, moved, vec![], b"spent");
            h.feed(b, Header::Drop { handle: moved });
            // Messages consumed, so that nothing is left in flight.
            for (conn, home) in [(b, wb.home.port), (c, wc.home.port)] {
                h.feed(
                    conn,
                    Header::Credit {
                        port: home,
                        count: 16,
                    },
                );
            }
            h.feed(owner, Header::Credit { port: 0, count: 0 });
            for conn in [a, b, c, owner] {
                h.take(conn);
            }
            h.check_invariants();
        };
        cycle(&mut h);
        let settled = h.core.footprint();
        for _ in 1..500 {
            cycle(&mut h);
        }
        let after = h.core.footprint();
        assert_eq!(after.capabilities, settled.capabilities);
        assert_eq!(after.book_entries, settled.book_entries, "flat");
        assert_eq!(after.book_entries, 0, "no lineage outlives its root");
    }

    #[test]
    fn expiry_kills_on_time_and_watchers_hear() {
        let (mut h, a, owner, _, cap) = setup();
        h.now.unix = 1000;
        let short = attenuate(&mut h, a, cap, Rights::SEND, Some(1010), None, false).unwrap();
        h.feed(a, Header::Watch { handle: short });
        h.send(a, short, vec![], b"in time");
        assert_eq!(h.delivered(owner).len(), 1);
        // The core asks to be woken when the expiry comes, not before (once
        // the Hello deadlines of the set-up are past).
        h.now.instant += h.core.config().hello_timeout;
        h.core.handle_timeout(h.now);
        assert_eq!(
            h.core.poll_timeout(),
            Some(h.now.instant + std::time::Duration::from_secs(10))
        );
        h.now.unix = 1009;
        h.core.handle_timeout(h.now);
        h.drain();
        assert!(h.take(a).is_empty());
        h.now.unix = 1010;
        h.core.handle_timeout(h.now);
        h.drain();
        assert_eq!(
            h.take(a),
            vec![Header::Dead {
                handle: short,
                reason: Reason::Expired
            }]
        );
        h.send(a, short, vec![], b"late");
        assert_eq!(
            refunded(h.take(a)),
            vec![Header::Undeliverable {
                handle: short,
                first_seq: 1,
                count: 1,
                reason: Reason::Expired
            }]
        );
        // The original lives on.
        h.send(a, cap, vec![], b"fine");
        assert_eq!(h.delivered(owner).len(), 1);
    }

    #[test]
    fn revoking_kills_every_copy_wherever_it_went() {
        let (mut h, a, owner, _, cap) = setup();
        let root = attenuate(
            &mut h,
            a,
            cap,
            Rights::SEND | Rights::GRANT,
            None,
            None,
            true,
        )
        .unwrap();
        let (b, wb) = h.connect();
        let (c, wc) = h.connect();
        let a_to_b = h
            .core
            .new_cap(a, port_key(wb.home.port, 0), Rights::SEND, None)
            .unwrap();
        let b_to_c = h
            .core
            .new_cap(b, port_key(wc.home.port, 0), Rights::SEND, None)
            .unwrap();
        h.send(a, a_to_b, vec![root], b"");
        let at_b = h.delivered(b)[0].caps[0].handle;
        h.send(b, b_to_c, vec![at_b], b"");
        let at_c = h.delivered(c)[0].caps[0].handle;
        h.feed(c, Header::Watch { handle: at_c });
        // b cannot revoke: only the maker of the root can.
        h.feed(b, Header::Revoke { handle: at_b });
        assert_eq!(error_code(&h.take(b)), Some(ErrorCode::NotRevocable));
        h.feed(a, Header::Revoke { handle: root });
        assert_eq!(
            h.take(c),
            vec![Header::Dead {
                handle: at_c,
                reason: Reason::Revoked
            }]
        );
        h.send(b, at_b, vec![], b"after");
        assert_eq!(
            refunded(h.take(b)),
            vec![Header::Undeliverable {
                handle: at_b,
                first_seq: 0,
                count: 1,
                reason: Reason::Revoked
            }]
        );
        assert!(h.take(owner).is_empty());
        // The capability the root came from is untouched.
        h.send(a, cap, vec![], b"still");
        assert_eq!(h.delivered(owner).len(), 1);
        h.check_invariants();
    }
}

mod identities {
    //! Authentication and guarded registration, with real certificates.
    use super::*;
    use junction_identity::{
        CertBody, Certificate, RevocationBody, RevocationList, Role, SecretKey, TrustStore,
        prove_possession,
    };

    const NOW: u64 = 1_800_000_000;

    struct Pki {
        authority: SecretKey,
        trust: TrustStore,
    }

    impl Pki {
        fn new() -> Self {
            let authority = SecretKey::generate().unwrap();
            let cert = Certificate::authority(&authority, 1, 0, u64::MAX).unwrap();
            let mut trust = TrustStore::new();
            trust.add_authority(&cert).unwrap();
            Self { authority, trust }
        }

        fn service(&self, serial: u64, names: &[&str]) -> (SecretKey, Certificate) {
            let key = SecretKey::generate().unwrap();
            let cert = Certificate::issue(
                CertBody {
                    version: 1,
                    serial,
                    subject: key.public(),
                    role: Role::Service {
                        names: names.iter().map(|n| n.parse().unwrap()).collect(),
                    },
                    not_before: NOW - 10,
                    not_after: NOW + 10,
                    issuer: self.authority.public(),
                },
                &self.authority,
            )
            .unwrap();
            (key, cert)
        }
    }

    fn harness(pki: &Pki) -> Harness {
        let mut h = Harness::with(Config {
            trust: pki.trust.clone(),
            ..Config::default()
        });
        h.now.unix = NOW;
        h
    }

    fn connect(h: &mut Harness, nonce: u8) -> (ConnId, Welcome) {
        connect_as(h, nonce, None)
    }

    /// A connection from user `uid`, if known.
    fn connect_as(h: &mut Harness, nonce: u8, uid: Option<u32>) -> (ConnId, Welcome) {
        h.connect_peer(Peer {
            nonce: [nonce; 32],
            uid,
            ..Peer::default()
        })
    }

    fn authenticate(
        h: &mut Harness,
        conn: ConnId,
        chain: Vec<Certificate>,
        proof: junction_identity::Signature,
    ) -> ControlReply {
        h.control(conn, ControlRequest::Authenticate { chain, proof }, vec![])
            .0
    }

    fn register(h: &mut Harness, conn: ConnId, name: &str) -> ControlReply {
        let port = h.open_port(conn);
        let cap = h.mint(conn, port, Rights::SEND | Rights::GRANT);
        h.control(
            conn,
            ControlRequest::Register {
                name: name.parse().unwrap(),
            },
            vec![cap],
        )
        .0
    }

    fn refused(reply: &ControlReply) -> ErrorCode {
        match reply {
            ControlReply::Refused { code, .. } => *code,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Certificates granting `junction.monitor` let anyone monitor, but
    /// only into all places but the last, which the junction's own user
    /// can still take: certified monitors cannot lock the operator out.
    #[test]
    fn certified_monitors_leave_the_last_place_to_the_owner() {
        use junction_road::monitor::{MAX_MONITORS, MonitorFilter};
        const OWNER: u32 = 1000;
        let pki = Pki::new();
        let mut h = Harness::with(Config {
            trust: pki.trust.clone(),
            owner_uid: Some(OWNER),
            ..Config::default()
        });
        h.now.unix = NOW;
        let (key, cert) = pki.service(7, &["junction.monitor"]);
        let monitor = |h: &mut Harness, conn| {
            let port = h.open_port(conn);
            let request = ControlRequest::Monitor {
                port,
                filter: MonitorFilter::default(),
                payloads: false,
            };
            h.control(conn, request, vec![]).0
        };
        let certified = |h: &mut Harness, nonce| {
            let (conn, w) = connect_as(h, nonce, Some(3000 + u32::from(nonce)));
            let proof = prove_possession(&key, &w.nonce, w.junction);
            authenticate(h, conn, vec![cert.clone()], proof);
            conn
        };
        for nonce in 1..MAX_MONITORS as u8 {
            let conn = certified(&mut h, nonce);
            let reply = monitor(&mut h, conn);
            assert!(
                matches!(
                    reply,
                    ControlReply::Monitoring {
                        payloads: false,
                        ..
                    }
                ),
                "monitor {nonce}: {reply:?}"
            );
        }
        let last = certified(&mut h, 50);
        let reply = monitor(&mut h, last);
        let ControlReply::Refused { message, .. } = &reply else {
            panic!("a certified monitor took the last place: {reply:?}")
        };
        assert!(message.contains("7 monitors are attached"), "{message}");
        let (owner, _) = connect_as(&mut h, 60, Some(OWNER));
        let reply = monitor(&mut h, owner);
        assert!(
            matches!(reply, ControlReply::Monitoring { .. }),
            "the owner was locked out: {reply:?}"
        );
    }

    #[test]
    fn an_identity_lapses_on_time_with_its_certificate() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (svc, w) = connect(&mut h, 1);
        // The certificate is valid until NOW + 10.
        let (key, cert) = pki.service(7, &["org.acme.echo"]);
        let proof = prove_possession(&key, &w.nonce, w.junction);
        authenticate(&mut h, svc, vec![cert], proof);
        assert_eq!(
            register(&mut h, svc, "org.acme.echo"),
            ControlReply::Registered
        );
        // Past the Hello deadline, the next timer is the certificate's end.
        h.now.instant += h.core.config().hello_timeout;
        h.core.handle_timeout(h.now);
        assert_eq!(
            h.core.poll_timeout(),
            Some(h.now.instant + std::time::Duration::from_secs(10))
        );
        h.now = h.now.later(std::time::Duration::from_secs(10));
        h.core.handle_timeout(h.now);
        let (client, _) = connect(&mut h, 2);
        let (reply, _) = h.control(
            client,
            ControlRequest::Lookup {
                name: "org.acme.echo".parse().unwrap(),
            },
            vec![],
        );
        assert_eq!(refused(&reply), ErrorCode::NameNotFound);
        h.check_invariants();
    }

    #[test]
    fn a_proven_service_registers_its_names_and_is_seen_by_receivers() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (svc, w) = connect(&mut h, 1);
        let (key, cert) = pki.service(5, &["org.acme.echo"]);
        let proof = prove_possession(&key, &w.nonce, w.junction);
        let reply = authenticate(&mut h, svc, vec![cert.clone()], proof);
        assert!(matches!(&reply, ControlReply::Authenticated(id) if id.key == key.public()));
        assert_eq!(
            register(&mut h, svc, "org.acme.echo"),
            ControlReply::Registered
        );
        assert_eq!(
            refused(&register(&mut h, svc, "org.acme.other")),
            ErrorCode::NameNotGranted
        );

        let (client, _) = connect(&mut h, 2);
        let (reply, caps) = h.control(
            client,
            ControlRequest::Lookup {
                name: "org.acme.echo".parse().unwrap(),
            },
            vec![],
        );
        assert!(
            matches!(&reply, ControlReply::Found { chain: Some(chain), .. } if chain == &vec![cert])
        );
        // The service's reply carries its proven identity; the anonymous client's call does not.
        h.call(client, caps[0].handle, 3, b"hi");
        let d = h.delivered(svc);
        assert_eq!(d[0].identity, None);
        h.send(svc, d[0].reply.unwrap(), vec![], b"hello");
        let r = h.delivered(client);
        let id = r[0].identity.as_ref().expect("the reply says who answered");
        assert_eq!(id.key, key.public());
        assert_eq!(id.names, vec!["org.acme.echo".parse().unwrap()]);
        h.check_invariants();
    }

    #[test]
    fn only_the_verified_chain_is_kept_and_served() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (svc, w) = connect(&mut h, 1);
        let (key, cert) = pki.service(5, &["org.acme.echo"]);
        // Junk after the link the authority signed: never verified.
        let (_, junk) = Pki::new().service(9, &["org.junk.a", "org.junk.b"]);
        let proof = prove_possession(&key, &w.nonce, w.junction);
        let reply = authenticate(&mut h, svc, vec![cert.clone(), junk.clone(), junk], proof);
        assert!(matches!(reply, ControlReply::Authenticated(_)), "{reply:?}");
        assert_eq!(
            register(&mut h, svc, "org.acme.echo"),
            ControlReply::Registered
        );
        let (client, _) = connect(&mut h, 2);
        let (reply, _) = h.control(
            client,
            ControlRequest::Lookup {
                name: "org.acme.echo".parse().unwrap(),
            },
            vec![],
        );
        assert!(
            matches!(&reply, ControlReply::Found { chain: Some(chain), .. } if chain == &vec![cert]),
            "{reply:?}"
        );
        h.check_invariants();
    }

    #[test]
    fn a_verified_chain_too_large_to_serve_is_refused() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (conn, w) = connect(&mut h, 1);
        let middle = SecretKey::generate().unwrap();
        let patterns = (0..400)
            .map(|i| format!("org.acme.{}{i}.*", "p".repeat(40)).parse().unwrap())
            .collect();
        let intermediate = Certificate::issue(
            CertBody {
                version: 1,
                serial: 20,
                subject: middle.public(),
                role: Role::Intermediate { patterns },
                not_before: NOW - 10,
                not_after: NOW + 10,
                issuer: pki.authority.public(),
            },
            &pki.authority,
        )
        .unwrap();
        let key = SecretKey::generate().unwrap();
        let leaf = Certificate::issue(
            CertBody {
                version: 1,
                serial: 21,
                subject: key.public(),
                role: Role::Client,
                not_before: NOW - 10,
                not_after: NOW + 10,
                issuer: middle.public(),
            },
            &middle,
        )
        .unwrap();
        let reply = authenticate(
            &mut h,
            conn,
            vec![leaf, intermediate],
            prove_possession(&key, &w.nonce, w.junction),
        );
        assert_eq!(refused(&reply), ErrorCode::BadCertificate);
        assert!(
            matches!(&reply, ControlReply::Refused { message, .. } if message.contains("16384")),
            "{reply:?}"
        );
    }

    #[test]
    fn a_chain_nobody_trusted_signed_is_refused_before_any_signature() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (conn, w) = connect(&mut h, 1);
        let rogue = Pki::new();
        let (rkey, rcert) = rogue.service(6, &["org.acme.echo"]);
        // A bad proof too: the untrusted issuer is what is reported, since
        // it is found first and costs nothing.
        drop(rkey);
        let other = SecretKey::generate().unwrap();
        let reply = authenticate(
            &mut h,
            conn,
            vec![rcert; 8],
            prove_possession(&other, &w.nonce, w.junction),
        );
        assert_eq!(refused(&reply), ErrorCode::BadCertificate);
        assert!(
            matches!(&reply, ControlReply::Refused { message, .. } if message.contains("not a trusted authority")),
            "{reply:?}"
        );
    }

    #[test]
    fn impostors_are_refused_and_the_owner_keeps_its_name() {
        let pki = Pki::new();
        let mut h = harness(&pki);
        let (owner, w) = connect(&mut h, 1);
        let (key, cert) = pki.service(5, &["org.acme.echo"]);
        let proof = prove_possession(&key, &w.nonce, w.junction);
        authenticate(&mut h, owner, vec![cert.clone()], proof.clone());
        assert_eq!(
            register(&mut h, owner, "org.acme.echo"),
            ControlReply::Registered
        );

        // The right certificate with another key.
        let (thief, tw) = connect(&mut h, 2);
        let other = SecretKey::generate().unwrap();
        assert_eq!(
            refused(&authenticate(
                &mut h,
                thief,
                vec![cert.clone()],
                prove_possession(&other, &tw.nonce, tw.junction)
            )),
            ErrorCode::BadProof
        );
        // One attempt per connection: the next is refused unexamined, even
        // a good one.
        let spent = authenticate(
            &mut h,
            thief,
            vec![cert.clone()],
            prove_possession(&key, &tw.nonce, tw.junction),
        );
        assert_eq!(refused(&spent), ErrorCode::AlreadyAuthenticated);
        assert!(
            matches!(&spent, ControlReply::Refused { message, .. } if message.contains("connect again")),
            "{spent:?}"
        );
        // A proof replayed from another connection.
        let (replayer, _) = connect(&mut h, 6);
        assert_eq!(
            refused(&authenticate(&mut h, replayer, vec![cert.clone()], proof)),
            ErrorCode::BadProof
        );
        // No identity at all.
        assert_eq!(
            refused(&register(&mut h, thief, "org.acme.echo")),
            ErrorCode::NameNotGranted
        );
        // A certificate from an untrusted authority.
        let rogue = Pki::new();
        let (rkey, rcert) = rogue.service(6, &["org.acme.echo"]);
        let (untrusted, uw) = connect(&mut h, 7);
        assert_eq!(
            refused(&authenticate(
                &mut h,
                untrusted,
                vec![rcert],
                prove_possession(&rkey, &uw.nonce, uw.junction)
            )),
            ErrorCode::BadCertificate
        );
        // A second, legitimate holder of the name still finds it taken.
        let (twin, ww) = connect(&mut h, 3);
        let (k2, c2) = pki.service(7, &["org.acme.echo"]);
        authenticate(
            &mut h,
            twin,
            vec![c2],
            prove_possession(&k2, &ww.nonce, ww.junction),
        );
        assert_eq!(
            refused(&register(&mut h, twin, "org.acme.echo")),
            ErrorCode::NameTaken
        );

        // The owner's registration is untouched.
        let (client, _) = connect(&mut h, 4);
        let (reply, _) = h.control(
            client,
            ControlRequest::Lookup {
                name: "org.acme.echo".parse().unwrap(),
            },
            vec![],
        );
        assert!(matches!(reply, ControlReply::Found { chain: Some(_), .. }));

        // Revoking the owner's certificate withdraws its identity and name.
        let list = RevocationList::issue(
            RevocationBody {
                issuer: pki.authority.public(),
                number: 1,
                issued_at: NOW,
                serials: vec![5],
                keys: vec![],
            },
            &pki.authority,
        )
        .unwrap()
        .verify(&pki.trust)
        .unwrap();
        h.take(owner);
        h.core.set_revocations(Some(list), h.now).unwrap();
        h.drain();
        // The owner is told, with the names it lost and why.
        let told = h.take(owner);
        assert!(
            told.iter().any(|f| matches!(
                f,
                Header::IdentityWithdrawn { names, reason }
                    if names.len() == 1 && names[0].as_str() == "org.acme.echo"
                        && reason.contains("revoked")
            )),
            "{told:?}"
        );
        // And the listing shows the name its port lost.
        let listing = h.core.listing();
        assert_eq!(listing.withdrawn.len(), 1, "{listing:?}");
        assert_eq!(listing.withdrawn[0].name, "org.acme.echo");
        let (reply, _) = h.control(
            client,
            ControlRequest::Lookup {
                name: "org.acme.echo".parse().unwrap(),
            },
            vec![],
        );
        assert_eq!(refused(&reply), ErrorCode::NameNotFound);
        let (late, lw) = connect(&mut h, 5);
        assert_eq!(
            refused(&authenticate(
                &mut h,
                late,
                vec![cert],
                prove_possession(&key, &lw.nonce, lw.junction)
            )),
            ErrorCode::CertificateRevoked
        );
        h.check_invariants();
    }
}

#[test]
fn the_owner_hears_when_the_last_sender_is_gone() {
    let mut h = Harness::new();
    let (owner, _) = h.connect();
    let (b, wb) = h.connect();
    let (c, wc) = h.connect();
    let port = h.open_port(owner);
    let mine = h.mint(owner, port, Rights::SEND | Rights::GRANT);
    let to_b = h
        .core
        .new_cap(owner, port_key(wb.home.port, 0), Rights::SEND, None)
        .unwrap();
    h.send(owner, to_b, vec![mine], b"for b");
    let at_b = h.delivered(b)[0].caps[0].handle;
    let b_to_c = h
        .core
        .new_cap(b, port_key(wc.home.port, 0), Rights::SEND, None)
        .unwrap();
    h.send(b, b_to_c, vec![at_b], b"for c");
    let at_c = h.delivered(c)[0].caps[0].handle;
    h.feed(owner, Header::Drop { handle: mine });
    h.feed(owner, Header::WatchSenders { port });
    assert!(h.take(owner).is_empty(), "b and c still hold capabilities");
    h.feed(b, Header::Drop { handle: at_b });
    assert!(h.take(owner).is_empty());
    h.core.handle_disconnected(c);
    h.drain();
    assert_eq!(h.take(owner), vec![Header::NoSenders { port }]);
    let _ = at_c;
    // Asked again with none left: answered at once.
    h.feed(owner, Header::WatchSenders { port });
    assert_eq!(h.take(owner), vec![Header::NoSenders { port }]);
    h.feed(b, Header::WatchSenders { port });
    assert_eq!(error_code(&h.take(b)), Some(ErrorCode::UnknownPort));
    h.check_invariants();
}

/// Issue 7, item 1: however many capabilities a connection mints, looks up
/// or drops for one port, it has one window in flight there, and a receiver
/// that never acknowledges holds no more than that.
#[test]
fn handles_to_one_port_share_one_window() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let port = h.open_port(b);
    let window = h.core.config().window;
    let mut delivered = 0;
    for _ in 0..80 {
        let cap = h
            .core
            .new_cap(a, port_key(port, 0), Rights::SEND, None)
            .unwrap();
        for _ in 0..window {
            h.send(a, cap, vec![], b"x");
        }
        delivered += h.delivered(b).len() as u32;
        h.take(a);
        h.feed(a, Header::Drop { handle: cap });
    }
    assert_eq!(delivered, window, "one window in all, not one per handle");
    assert_eq!(h.core.footprint().in_flight as u32, window);
    assert_eq!(h.core.footprint().lanes, 1);
    h.check_invariants();
    h.feed(
        b,
        Header::Credit {
            port,
            count: window,
        },
    );
    assert_eq!(
        h.take(a),
        vec![Header::SendCredit {
            port: lane(port),
            count: window
        }]
    );
    assert_eq!(h.core.footprint().lanes, 0, "an idle lane is forgotten");
    h.check_invariants();
}

/// Issue 7, item 6: a caller that gives up on a call (a driver's timeout)
/// cancels it: it stops counting as pending at once, the callee's reply
/// capability dies, and a late reply goes nowhere.
#[test]
fn a_cancelled_call_frees_its_caller_and_kills_the_reply_capability() {
    let mut h = Harness::with(Config {
        max_pending_calls: 2,
        ..Harness::config()
    });
    let (client, _) = h.connect();
    let (service, _) = h.connect();
    let port = h.open_port(service);
    let cap = h
        .core
        .new_cap(client, port_key(port, 0), Rights::SEND, None)
        .unwrap();
    h.call(client, cap, 1, b"q1");
    h.call(client, cap, 2, b"q2");
    let held: Vec<u32> = h
        .delivered(service)
        .iter()
        .map(|d| d.reply.unwrap())
        .collect();
    h.call(client, cap, 3, b"q3");
    assert_eq!(
        error_code(&h.take(client)),
        Some(ErrorCode::TooManyPendingCalls)
    );
    h.feed(client, Header::Cancel { tag: 1 });
    assert_eq!(
        h.take(client),
        vec![Header::CallFailed {
            tag: 1,
            reason: Reason::Cancelled
        }]
    );
    h.check_invariants();
    h.call(client, cap, 4, b"q4");
    assert_eq!(h.delivered(service).len(), 1, "room for a new call");
    // The late reply goes nowhere, and the service hears why.
    h.send(service, held[0], vec![], b"late");
    assert!(matches!(
        h.take(service).as_slice(),
        [Header::Undeliverable {
            reason: Reason::Cancelled,
            ..
        }]
    ));
    assert!(h.take(client).is_empty());
    // Cancelling an answered or unknown call does nothing.
    h.send(service, held[1], vec![], b"answer");
    assert_eq!(h.delivered(client).len(), 1);
    h.feed(client, Header::Cancel { tag: 2 });
    h.feed(client, Header::Cancel { tag: 77 });
    assert!(h.take(client).is_empty());
    h.check_invariants();
}

/// Issue 7, item 6: reply capabilities do not fill the callee's handle
/// table, so callers whose replies a service holds cannot make it refuse
/// everyone else.
#[test]
fn held_replies_do_not_fill_the_callee_table() {
    let mut h = Harness::with(Config {
        max_handles: 8,
        max_pending_calls: 64,
        window: 64,
        ..Harness::config()
    });
    let (service, _) = h.connect();
    let port = h.open_port(service);
    let mut callers = Vec::new();
    for _ in 0..3 {
        let (c, _) = h.connect();
        let cap = h
            .core
            .new_cap(c, port_key(port, 0), Rights::SEND, None)
            .unwrap();
        callers.push((c, cap));
    }
    let (attacker, cap) = callers[0];
    for tag in 1..=40 {
        h.call(attacker, cap, tag, b"hold this");
    }
    assert_eq!(h.delivered(service).len(), 40, "more replies than handles");
    h.check_invariants();
    // Others still get through, and the service can still mint.
    for &(c, cap) in &callers[1..] {
        h.call(c, cap, 1, b"me too");
        assert_eq!(h.delivered(service).len(), 1);
    }
    h.mint(service, port, Rights::SEND);
    // A tag still pending is refused as such.
    h.call(attacker, cap, 5, b"again");
    assert_eq!(error_code(&h.take(attacker)), Some(ErrorCode::BadTag));
    h.check_invariants();
}

/// Passes the Highway frames `cores` (junctions `ids`) send each other
/// until none is left, dropping what is for the shell.
fn exchange(cores: [&mut Core; 2], ids: [u16; 2], now: Now) {
    loop {
        let mut quiet = true;
        for i in 0..2 {
            let mut frames = Vec::new();
            while let Some(out) = cores[i].poll_output() {
                match out {
                    Output::Highway { to, frame, payload } => frames.push((to, frame, payload)),
                    Output::Session { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            for (to, frame, payload) in frames {
                quiet = false;
                let j = ids.iter().position(|&id| id == to).expect("a neighbour");
                cores[j].handle_highway_frame(ids[i], frame, payload.to_bytes(), now);
            }
        }
        if quiet {
            return;
        }
    }
}

#[test]
fn a_listing_shows_highways_routes_and_sessions_within_one_frame() {
    let max_frame = 64 * 1024;
    let config = |junction, incarnation| Config {
        junction,
        incarnation,
        max_frame,
        trust_unsigned_routing: true,
        ..Harness::config()
    };
    let mut h1 = Harness::with(config(1, 11));
    let mut h2 = Harness::with(config(2, 22));
    let now = h1.now;
    h1.core.handle_highway_up(2, 3, now);
    h2.core.handle_highway_up(1, 3, now);
    exchange([&mut h1.core, &mut h2.core], [1, 2], now);
    h1.core
        .junction_send(2, 5, Bytes::from_static(b"hello"))
        .unwrap();
    exchange([&mut h1.core, &mut h2.core], [1, 2], now);

    let (conn, _) = h1.connect();
    let (reply, _) = h1.control(conn, ControlRequest::List, vec![]);
    let ControlReply::Listing(listing) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        listing.routes,
        vec![junction_road::control::RouteInfo {
            junction: 2,
            next_hop: 2,
            cost: 3,
            path: vec![2],
            incarnation: 22,
        }]
    );
    assert_eq!(listing.sessions.len(), 1, "{listing:?}");
    let session = &listing.sessions[0];
    assert_eq!(session.junction, 2);
    assert_eq!(session.incarnation, 22);
    assert_eq!(session.lanes_out, 1);
    assert_eq!(session.sealing, junction_road::control::Sealing::Clear);
    assert_eq!(
        (session.refused, session.imports, session.exports),
        (0, 0, 0)
    );
    assert!(listing.highways.is_empty(), "the shell reported none");
    assert_eq!(
        (
            listing.more_routes,
            listing.more_sessions,
            listing.more_highways
        ),
        (0, 0, 0)
    );

    // The shell's report shows as it is; more Highways than fit are cut
    // and counted, and the listing still fits one frame.
    let highway = |junction: u16| junction_road::control::HighwayInfo {
        junction,
        address: Some(format!("{}:4433", "h".repeat(200))),
        state: junction_road::control::HighwayState::Waiting,
        rtt_us: None,
        bytes_out: u64::MAX,
        bytes_in: u64::MAX,
    };
    h1.core.set_highways((2..2000).map(highway).collect());
    let listing = h1.core.listing();
    let bytes = postcard::to_allocvec(&ControlReply::Listing(listing.clone()))
        .unwrap()
        .len();
    assert!(bytes <= max_frame as usize, "{bytes} bytes");
    assert!(!listing.highways.is_empty());
    assert_eq!(listing.highways[0], highway(2));
    assert!(listing.more_highways > 0);
    assert_eq!(
        listing.highways.len() + listing.more_highways as usize,
        1998
    );
    assert_eq!(listing.routes.len(), 1, "routes keep their share");
    assert_eq!(listing.sessions.len(), 1, "sessions keep their share");
    assert_eq!(listing.more_ports, 0, "ports and connections keep the rest");
    h1.check_invariants();
    h2.check_invariants();
}

#[test]
fn routes_past_their_share_of_the_frame_are_cut_and_counted() {
    use junction_road::highway::{HighwayFrame, LinkState, Neighbour};
    let max_frame = 4096;
    let mut h = Harness::with(Config {
        max_frame,
        trust_unsigned_routing: true,
        ..Harness::config()
    });
    let now = h.now;
    h.core.handle_highway_up(2, 1, now);
    // Junction 2 is linked to junction 1 and to 3..=102, each of which
    // describes its link back: 101 routes, more than an eighth of the room.
    let far: Vec<u16> = (3..=102).collect();
    let describe = |origin: u16, neighbours: &[u16]| {
        let neighbours = neighbours
            .iter()
            .map(|&junction| Neighbour { junction, cost: 1 })
            .collect();
        HighwayFrame::LinkState(LinkState {
            origin,
            incarnation: 1,
            seq: 1,
            neighbours,
            names: vec![],
            seal: None,
        })
    };
    let hub: Vec<u16> = std::iter::once(1).chain(far.iter().copied()).collect();
    let mut frames = vec![describe(2, &hub)];
    frames.extend(far.iter().map(|&j| describe(j, &[2])));
    for frame in frames {
        h.core.handle_highway_frame(2, frame, Bytes::new(), now);
    }
    while h.core.poll_output().is_some() {}

    let listing = h.core.listing();
    let bytes = postcard::to_allocvec(&ControlReply::Listing(listing.clone()))
        .unwrap()
        .len();
    assert!(bytes <= max_frame as usize, "{bytes} bytes");
    assert!(listing.more_routes > 0, "{listing:?}");
    assert_eq!(listing.routes.len() + listing.more_routes as usize, 101);
    assert_eq!(listing.routes[0].path, vec![2]);
    assert_eq!(listing.routes[1].junction, 3);
    assert_eq!(listing.routes[1].path, vec![2, 3]);
    assert_eq!(listing.routes[1].cost, 2);
    assert_eq!(listing.ports.len(), 1, "the control port is still listed");
}

/// `Reload` is answered with what the shell left for that connection, and
/// refused when it left nothing (or left it for another connection).
#[test]
fn reload_is_answered_by_the_shell_or_refused() {
    let mut h = Harness::new();
    let (a, _) = h.connect();
    let (b, _) = h.connect();
    let (reply, _) = h.control(a, ControlRequest::Reload, vec![]);
    assert!(
        matches!(&reply, ControlReply::Refused { code: ErrorCode::NotAllowed, message } if message.contains("SIGHUP")),
        "{reply:?}"
    );
    let report = junction_road::control::ReloadReport {
        applied: vec!["allow_uids is now [1]".into()],
        failed: vec![],
    };
    h.core
        .set_reload_answer(b, ControlReply::Reloaded(report.clone()));
    let (reply, _) = h.control(a, ControlRequest::Reload, vec![]);
    assert!(matches!(reply, ControlReply::Refused { .. }), "{reply:?}");
    h.core
        .set_reload_answer(a, ControlReply::Reloaded(report.clone()));
    let (reply, _) = h.control(a, ControlRequest::Reload, vec![]);
    assert_eq!(reply, ControlReply::Reloaded(report));
    h.check_invariants();
}

/// Monitors and traffic counters (see `monitor`).
mod monitoring {
    use junction_road::monitor::{
        MAX_MONITORS, MONITOR_QUEUE, MessageKind, MonitorEvent, MonitorFilter,
    };

    use super::*;

    const OWNER: u32 = 1000;

    /// A connection from user `uid`.
    fn connect_as(h: &mut Harness, uid: Option<u32>) -> ConnId {
        h.connect_peer(Peer {
            road: "test",
            uid,
            ..Peer::default()
        })
        .0
    }

    fn harness() -> Harness {
        Harness::with(Config {
            owner_uid: Some(OWNER),
            ..Harness::config()
        })
    }

    /// A service `svc` with a port named `name`, and a client `a` that
    /// looked it up: (svc, its port, a, a's handle).
    fn service(h: &mut Harness, name: &str) -> (ConnId, u16, ConnId, u32) {
        let svc = connect_as(h, Some(2000));
        let port = h.open_port(svc);
        let cap = h.mint(svc, port, Rights::SEND | Rights::GRANT);
        let name: junction_identity::ServiceName = name.parse().unwrap();
        let (reply, _) = h.control(
            svc,
            ControlRequest::Register { name: name.clone() },
            vec![cap],
        );
        assert_eq!(reply, ControlReply::Registered);
        let a = connect_as(h, Some(3000));
        let (_, granted) = h.control(a, ControlRequest::Lookup { name }, vec![]);
        (svc, port, a, granted[0].handle)
    }

    fn monitor(h: &mut Harness, conn: ConnId, payloads: bool) -> (u16, ControlReply) {
        let port = h.open_port(conn);
        let request = ControlRequest::Monitor {
            port,
            filter: MonitorFilter::default(),
            payloads,
        };
        (port, h.control(conn, request, vec![]).0)
    }

    fn events(h: &mut Harness, conn: ConnId) -> Vec<MonitorEvent> {
        let headers = h.inbox.remove(&conn).unwrap_or_default();
        let payloads = h.payloads.remove(&conn).unwrap_or_default();
        headers
            .iter()
            .zip(payloads)
            .filter_map(|(header, payload)| match header {
                Header::Deliver(d) if d.origin == Address::new(1, 0) => {
                    Some(postcard::from_bytes(&payload).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_monitor_sees_each_message_and_drops_past_its_queue() {
        let mut h = harness();
        let m = connect_as(&mut h, Some(OWNER));
        let (events_port, reply) = monitor(&mut h, m, true);
        assert!(matches!(
            reply,
            ControlReply::Monitoring { payloads: true, .. }
        ));
        let (svc, port, a, handle) = service(&mut h, "svc");
        h.send(a, handle, vec![], b"hi");
        let seen = events(&mut h, m);
        let [event] = seen.as_slice() else {
            panic!("one event: {seen:?}")
        };
        assert_eq!(event.kind, MessageKind::Send);
        assert_eq!(event.target, Address::new(1, port));
        assert_eq!(event.names, ["svc"]);
        assert_eq!(event.uid, Some(3000));
        assert_eq!(event.size, 2);
        assert_eq!(event.payload.as_deref(), Some(&b"hi"[..]));
        h.take(svc);
        h.feed(svc, Header::Credit { port, count: 1 });
        h.take(a);

        // The monitor reads nothing more: past its queue, events drop and
        // the traffic flows as before.
        let extra = 10;
        for _ in 0..MONITOR_QUEUE + extra {
            h.send(a, handle, vec![], b"x");
            assert_eq!(h.delivered(svc).len(), 1, "the service gets every message");
            h.feed(svc, Header::Credit { port, count: 1 });
            h.take(a);
        }
        assert_eq!(events(&mut h, m).len(), MONITOR_QUEUE as usize - 1);
        let report = h.core.traffic();
        assert_eq!(report.monitor_drops, u64::from(extra + 1));
        // It reads again: the next event says how many it lost.
        h.feed(
            m,
            Header::Credit {
                port: events_port,
                count: MONITOR_QUEUE,
            },
        );
        h.send(a, handle, vec![], b"y");
        let seen = events(&mut h, m);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].dropped, u64::from(extra + 1));
        h.check_invariants();

        // A monitor whose port closes leaves.
        h.feed(m, Header::ClosePort { port: events_port });
        h.take(m);
        h.send(a, handle, vec![], b"z");
        assert!(events(&mut h, m).is_empty());
        assert_eq!(h.core.traffic().monitors, 0);
    }

    #[test]
    fn notices_are_shown_too() {
        let mut h = harness();
        let m = connect_as(&mut h, Some(OWNER));
        monitor(&mut h, m, false);
        let (svc, port, a, handle) = service(&mut h, "svc");
        h.feed(svc, Header::ClosePort { port });
        h.take(svc);
        h.send(a, handle, vec![], b"late");
        let seen = events(&mut h, m);
        let says = |what: &str| {
            seen.iter().any(|e| {
                e.kind == MessageKind::Notice
                    && e.origin == Address::new(1, 0)
                    && e.notice.as_deref().is_some_and(|n| n.contains(what))
            })
        };
        assert!(says("port closed"), "{seen:?}");
        assert!(says("undeliverable"), "{seen:?}");
    }

    #[test]
    fn only_the_owner_root_or_a_certificate_may_monitor() {
        let mut h = harness();
        for uid in [Some(OWNER + 1), None] {
            let other = connect_as(&mut h, uid);
            let (_, reply) = monitor(&mut h, other, false);
            let ControlReply::Refused { code, message } = reply else {
                panic!("{uid:?} was let in: {reply:?}")
            };
            assert_eq!(code, ErrorCode::NotAllowed);
            assert!(message.contains("junction.monitor"), "{message}");
        }
        // Root may take every place (certified monitors all but the last:
        // `identities::certified_monitors_leave_the_last_place_to_the_owner`).
        let root = connect_as(&mut h, Some(0));
        for _ in 0..MAX_MONITORS - 1 {
            assert!(matches!(
                monitor(&mut h, root, false).1,
                ControlReply::Monitoring { .. }
            ));
        }
        assert!(matches!(
            monitor(&mut h, root, true).1,
            ControlReply::Monitoring { .. }
        ));
        let (_, reply) = monitor(&mut h, root, false);
        let ControlReply::Refused { message, .. } = reply else {
            panic!("a ninth monitor: {reply:?}")
        };
        assert!(message.contains("8 monitors are attached"), "{message}");
        // Never on a home port: its replies would mix with the events.
        let home = h.core.conns.get(root.key()).unwrap().home;
        let request = ControlRequest::Monitor {
            port: home,
            filter: MonitorFilter::default(),
            payloads: false,
        };
        assert!(matches!(
            h.control(root, request, vec![]).0,
            ControlReply::Refused { .. }
        ));
    }

    #[test]
    fn traffic_is_counted_per_identity_port_and_both_ways() {
        let mut h = harness();
        let (svc, port, a, handle) = service(&mut h, "svc");
        for _ in 0..3 {
            h.send(a, handle, vec![], b"abcd");
            h.feed(svc, Header::Credit { port, count: 1 });
        }
        let report = h.core.traffic();
        assert_eq!(report.total.sent_messages, 3);
        assert_eq!(report.total.received_bytes, 12);
        let row = |label: &str| {
            report
                .identities
                .iter()
                .find(|r| r.identity == label)
                .unwrap()
                .tally
        };
        assert_eq!(row("uid 3000").sent_bytes, 12);
        assert_eq!(row("uid 2000").received_messages, 3);
        assert_eq!(report.ports[0].address, Address::new(1, port));
        assert_eq!(report.ports[0].tally.received_messages, 3);
        // Its connection gone, an identity's counts stay.
        h.core.handle_disconnected(a);
        h.drain();
        let report = h.core.traffic();
        let gone = report
            .identities
            .iter()
            .find(|r| r.identity == "uid 3000")
            .unwrap();
        assert_eq!((gone.connections, gone.tally.sent_messages), (0, 3));
    }
}
