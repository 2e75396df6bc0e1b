//! Tests of the link rules, one by one, then a simulation of several
//! junctions joined by a fake network under a fake clock.

use super::*;

mod sim;

fn addr(id: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1], 4000 + id))
}

fn hello(junction: u16, incarnation: u64) -> Hello {
    Hello {
        version: VERSION,
        junction,
        incarnation,
    }
}

/// One `Links` under a fake clock.
struct Harness {
    links: Links,
    now: Instant,
}

impl Harness {
    /// Junction 5, incarnation 100, with `peers` configured.
    fn new(peers: &[u16]) -> Self {
        let mut config = LinkConfig::new(5, 100);
        config.peers = peers.iter().map(|&p| (p, addr(p))).collect();
        config.seed = 7;
        let now = Instant::now();
        Self {
            links: Links::new(config, now).unwrap(),
            now,
        }
    }

    fn drain(&mut self) -> Vec<LinkOutput> {
        std::iter::from_fn(|| self.links.poll_output()).collect()
    }

    fn advance(&mut self, by: Duration) -> Vec<LinkOutput> {
        self.now += by;
        self.links.handle_timeout(self.now);
        self.drain()
    }

    /// Runs the timers until `until` from now, answering nothing.
    fn run(&mut self, until: Duration) -> Vec<(Duration, LinkOutput)> {
        let start = self.now;
        let end = start + until;
        let mut out = Vec::new();
        while let Some(at) = self.links.poll_timeout().filter(|&at| at <= end) {
            self.now = at.max(self.now);
            self.links.handle_timeout(self.now);
            for o in self.drain() {
                out.push((self.now - start, o));
            }
        }
        self.now = end;
        out
    }

    /// An accepted connection from `peer`, certified and hello'd: admitted.
    fn accept(&mut self, conn: u64, peer: u16, incarnation: u64) -> Vec<LinkOutput> {
        let (conn, now) = (ConnId(conn), self.now);
        self.links.handle_accepted(conn, now);
        self.links.handle_certificate(conn, peer, now);
        self.links.handle_hello(conn, hello(peer, incarnation), now);
        self.drain()
    }

    /// A connection this junction dialed to `peer`, certified and hello'd.
    fn dialed(&mut self, conn: u64, peer: u16, incarnation: u64) -> Vec<LinkOutput> {
        let (conn, now) = (ConnId(conn), self.now);
        self.links.handle_dialed(conn, peer, now);
        self.links.handle_certificate(conn, peer, now);
        self.links.handle_hello(conn, hello(peer, incarnation), now);
        self.drain()
    }
}

fn ups_and_downs(out: &[LinkOutput]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            LinkOutput::Up { peer, conn, .. } => Some(format!("up {peer} {}", conn.0)),
            LinkOutput::Down { peer } => Some(format!("down {peer}")),
            LinkOutput::Close { conn, reason } => Some(format!("close {}: {reason}", conn.0)),
            _ => None,
        })
        .collect()
}

fn closes(out: &[LinkOutput]) -> Vec<CloseReason> {
    out.iter()
        .filter_map(|o| match o {
            LinkOutput::Close { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_configuration_with_reserved_or_repeated_ids_is_refused() {
    let now = Instant::now();
    let with = |own: u16, peers: &[u16]| {
        let mut config = LinkConfig::new(own, 1);
        config.peers = peers.iter().map(|&p| (p, addr(p))).collect();
        Links::new(config, now).map(|_| ())
    };
    assert_eq!(with(0, &[]), Err(ConfigError::ReservedId(0)));
    assert_eq!(with(65535, &[]), Err(ConfigError::ReservedId(65535)));
    assert_eq!(with(1, &[0]), Err(ConfigError::ReservedPeer(0)));
    assert_eq!(with(1, &[1]), Err(ConfigError::PeerIsSelf(1)));
    assert_eq!(with(1, &[2, 2]), Err(ConfigError::DuplicatePeer(2)));
    assert_eq!(with(1, &[2, 3]), Ok(()));
}

#[test]
fn configured_peers_are_dialed_and_up_after_hello_and_certificate() {
    let mut h = Harness::new(&[2, 9]);
    assert_eq!(h.links.poll_timeout(), Some(h.now), "dials at once");
    let out = h.advance(Duration::ZERO);
    assert_eq!(
        out,
        [
            LinkOutput::Dial {
                peer: 2,
                addr: addr(2)
            },
            LinkOutput::Dial {
                peer: 9,
                addr: addr(9)
            }
        ]
    );
    let now = h.now;
    h.links.handle_dialed(ConnId(1), 2, now);
    assert_eq!(
        h.drain(),
        [
            LinkOutput::Send {
                conn: ConnId(1),
                frame: ControlFrame::Hello(hello(5, 100))
            },
            LinkOutput::Send {
                conn: ConnId(1),
                frame: ControlFrame::KeepAlive { nonce: 0 }
            }
        ],
        "our Hello first, then a keep-alive"
    );
    assert_eq!(h.links.peer(ConnId(1)), None);
    // Hello before the certificate: admitted when both are in.
    h.links.handle_hello(ConnId(1), hello(2, 40), now);
    assert_eq!(h.drain(), []);
    assert_eq!(h.links.handle_traffic(ConnId(1), now), None, "not admitted");
    h.links.handle_certificate(ConnId(1), 2, now);
    assert_eq!(
        h.drain(),
        [LinkOutput::Up {
            peer: 2,
            conn: ConnId(1),
            incarnation: 40,
            rtt: None
        }]
    );
    assert_eq!(h.links.peer(ConnId(1)), Some(2));
    assert_eq!(h.links.conn(2), Some(ConnId(1)));
    assert_eq!(h.links.handle_traffic(ConnId(1), now), Some(2));
    // Certificate first works as well.
    assert_eq!(
        ups_and_downs(&h.dialed(3, 9, 1)),
        ["up 9 3"],
        "either order"
    );
}

#[test]
fn each_bad_hello_closes_its_connection_with_its_reason() {
    let mut h = Harness::new(&[]);
    let mut refused = |conn: u64, certified: u16, hello: Hello| {
        let (c, now) = (ConnId(conn), h.now);
        h.links.handle_accepted(c, now);
        h.links.handle_certificate(c, certified, now);
        h.links.handle_hello(c, hello, now);
        let out = h.drain();
        assert_eq!(h.links.peer(c), None);
        assert!(!out.iter().any(|o| matches!(o, LinkOutput::Up { .. })));
        closes(&out)
    };
    let wrong = Hello {
        version: 2,
        ..hello(2, 1)
    };
    assert_eq!(refused(1, 2, wrong), [CloseReason::WrongVersion { got: 2 }]);
    assert_eq!(refused(2, 0, hello(0, 1)), [CloseReason::ReservedId(0)]);
    assert_eq!(
        refused(3, 65535, hello(65535, 1)),
        [CloseReason::ReservedId(65535)]
    );
    assert_eq!(refused(4, 5, hello(5, 1)), [CloseReason::OwnId(5)]);
    assert_eq!(
        refused(5, 3, hello(2, 1)),
        [CloseReason::CertificateMismatch {
            claimed: 2,
            certified: 3
        }]
    );
    let text = CloseReason::CertificateMismatch {
        claimed: 2,
        certified: 3,
    }
    .to_string();
    assert_eq!(
        text,
        "the Hello claims junction 2 but the certificate is junction 3's"
    );

    // Dialed 2, and 3 answered (with a valid certificate of 3's).
    let now = h.now;
    h.links.handle_dialed(ConnId(6), 2, now);
    h.links.handle_certificate(ConnId(6), 3, now);
    h.links.handle_hello(ConnId(6), hello(3, 1), now);
    assert_eq!(
        closes(&h.drain()),
        [CloseReason::UnexpectedPeer {
            dialed: 2,
            answered: 3
        }]
    );

    // An incarnation older than one seen.
    assert_eq!(ups_and_downs(&h.accept(7, 2, 50)), ["up 2 7"]);
    assert_eq!(
        closes(&h.accept(8, 2, 49)),
        [CloseReason::StaleIncarnation {
            junction: 2,
            got: 49,
            known: 50
        }]
    );
    assert_eq!(h.links.conn(2), Some(ConnId(7)), "the live one stays");

    // A second Hello on one connection.
    h.links.handle_hello(ConnId(7), hello(2, 50), now);
    assert_eq!(
        ups_and_downs(&h.drain()),
        ["close 7: a second Hello on one connection", "down 2"]
    );

    // Anything before the Hello.
    for (conn, frame) in [
        (9, ControlFrame::KeepAlive { nonce: 1 }),
        (10, ControlFrame::KeepAliveAck { nonce: 0 }),
    ] {
        h.links.handle_accepted(ConnId(conn), now);
        h.drain();
        assert_eq!(h.links.handle_control(ConnId(conn), frame, now), None);
        assert_eq!(closes(&h.drain()), [CloseReason::HelloFirst]);
    }
}

#[test]
fn a_new_incarnation_on_a_new_connection_replaces_the_old() {
    let mut h = Harness::new(&[2]);
    h.advance(Duration::ZERO);
    assert_eq!(ups_and_downs(&h.dialed(1, 2, 10)), ["up 2 1"]);
    // Junction 2 restarted and dialed us before we noticed.
    assert_eq!(
        ups_and_downs(&h.accept(2, 2, 11)),
        [
            "close 1: replaced by a newer connection from junction 2 (incarnation 11)",
            "down 2",
            "up 2 2"
        ]
    );
    assert_eq!(h.links.conn(2), Some(ConnId(2)));
    // The old connection's close, reported later, changes nothing.
    let now = h.now;
    h.links.handle_closed(ConnId(1), now);
    assert_eq!(h.drain(), []);
    assert_eq!(h.links.conn(2), Some(ConnId(2)));
    // Nothing was redialled: the peer is up.
    assert!(
        !h.run(Duration::from_secs(1))
            .iter()
            .any(|(_, o)| matches!(o, LinkOutput::Dial { .. }))
    );
    // A replacement is no failure: the backoff did not grow.
    let now = h.now;
    h.links.handle_traffic(ConnId(2), now);
    h.links.handle_closed(ConnId(2), now);
    assert_eq!(ups_and_downs(&h.drain()), ["down 2"]);
    assert!(h.next_dial() <= Duration::from_millis(100));
}

#[test]
fn the_same_dialer_again_replaces_its_older_connection() {
    let mut h = Harness::new(&[]);
    assert_eq!(ups_and_downs(&h.accept(1, 2, 10)), ["up 2 1"]);
    // Junction 2 gave up on connection 1 and dialed again.
    assert_eq!(
        ups_and_downs(&h.accept(2, 2, 10)),
        [
            "close 1: replaced by a newer connection from junction 2 (incarnation 10)",
            "down 2",
            "up 2 2"
        ]
    );
}

/// Both sides dial at once: whatever order the events come in, each side
/// keeps the connection dialed by the lower id.
#[test]
fn when_both_dial_the_lower_ids_connection_is_kept() {
    // We are 5. Against 2 (lower), 2's connection (accepted) is kept;
    // against 9 (higher), ours (dialed) is.
    for (peer, kept_dialer) in [(2u16, 2u16), (9, 5)] {
        for ours_first in [false, true] {
            let mut h = Harness::new(&[peer]);
            h.advance(Duration::ZERO);
            let (ours, theirs) = (1, 2);
            let mut out = Vec::new();
            if ours_first {
                out.extend(h.dialed(ours, peer, 1));
                out.extend(h.accept(theirs, peer, 1));
            } else {
                out.extend(h.accept(theirs, peer, 1));
                out.extend(h.dialed(ours, peer, 1));
            }
            let kept = if kept_dialer == peer { theirs } else { ours };
            assert_eq!(
                h.links.conn(peer),
                Some(ConnId(kept)),
                "{peer} {ours_first}"
            );
            let closed: Vec<_> = out
                .iter()
                .filter_map(|o| match o {
                    LinkOutput::Close { conn, reason } => Some((conn.0, reason.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(
                closed,
                [(
                    if kept == ours { theirs } else { ours },
                    CloseReason::BothDialed { kept_dialer }
                )]
            );
            let ups = out
                .iter()
                .filter(|o| matches!(o, LinkOutput::Up { .. }))
                .count();
            let downs = out
                .iter()
                .filter(|o| matches!(o, LinkOutput::Down { .. }))
                .count();
            assert_eq!(ups, downs + 1, "up, or up down up: {out:?}");
        }
    }
}

#[test]
fn keepalives_go_out_each_interval_and_silence_closes_the_link() {
    let mut h = Harness::new(&[]);
    h.accept(1, 2, 1);
    let out = h.run(Duration::from_millis(3500));
    let keepalives: Vec<Duration> = out
        .iter()
        .filter(|(_, o)| {
            matches!(
                o,
                LinkOutput::Send {
                    frame: ControlFrame::KeepAlive { .. },
                    ..
                }
            )
        })
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(
        keepalives,
        [Duration::from_secs(1), Duration::from_secs(2)],
        "then closed at 3 s"
    );
    let last: Vec<(Duration, String)> = out
        .iter()
        .filter(|(_, o)| !matches!(o, LinkOutput::Send { .. }))
        .map(|(at, o)| (*at, ups_and_downs(std::slice::from_ref(o)).join("")))
        .collect();
    let three = Duration::from_secs(3);
    assert_eq!(
        last,
        [
            (three, "close 1: nothing heard for 3s".to_string()),
            (three, "down 2".to_string())
        ]
    );
}

#[test]
fn any_traffic_keeps_a_link_alive() {
    let mut h = Harness::new(&[]);
    h.accept(1, 2, 1);
    for _ in 0..10 {
        h.run(Duration::from_secs(2));
        let now = h.now;
        assert_eq!(h.links.handle_traffic(ConnId(1), now), Some(2));
    }
    assert_eq!(h.links.conn(2), Some(ConnId(1)));
}

#[test]
fn the_round_trip_is_smoothed_from_keepalive_acks() {
    let mut h = Harness::new(&[]);
    let start = h.now;
    h.accept(1, 2, 1);
    // The first keep-alive (nonce 0) went out with the Hello.
    h.now = start + Duration::from_millis(80);
    let now = h.now;
    h.links.handle_keepalive_ack(ConnId(1), 0, now);
    assert_eq!(h.links.rtt(2), Some(Duration::from_millis(80)));
    // The next, at 1 s, answered 160 ms later: 7/8 × 80 + 1/8 × 160.
    h.run(Duration::from_millis(920));
    h.now += Duration::from_millis(160);
    let now = h.now;
    h.links.handle_keepalive_ack(ConnId(1), 1, now);
    assert_eq!(h.links.rtt(2), Some(Duration::from_millis(90)));
    // An unknown nonce, or one answered twice, changes nothing.
    h.links.handle_keepalive_ack(ConnId(1), 1, now);
    h.links.handle_keepalive_ack(ConnId(1), 77, now);
    assert_eq!(h.links.rtt(2), Some(Duration::from_millis(90)));
    let info: Vec<PeerInfo> = h.links.peers().collect();
    assert!(matches!(
        info[..],
        [PeerInfo {
            junction: 2,
            addr: None,
            state: PeerState::Up {
                rtt: Some(_),
                incarnation: 1,
                ..
            }
        }]
    ));
}

#[test]
fn keepalives_are_answered_at_most_four_times_an_interval() {
    let mut h = Harness::new(&[]);
    h.accept(1, 2, 1);
    let now = h.now;
    for nonce in 0..100 {
        h.links.handle_keepalive(ConnId(1), nonce, now);
    }
    let acks = h.drain();
    assert_eq!(acks.len(), 4);
    assert_eq!(
        acks[3],
        LinkOutput::Send {
            conn: ConnId(1),
            frame: ControlFrame::KeepAliveAck { nonce: 3 }
        }
    );
    h.now += Duration::from_secs(1);
    let now = h.now;
    h.links.handle_keepalive(ConnId(1), 100, now);
    assert_eq!(h.drain().len(), 1, "a new interval");
}

#[test]
fn a_connection_that_never_says_hello_is_closed_and_few_may_wait() {
    let mut h = Harness::new(&[]);
    let now = h.now;
    for conn in 0..64 {
        h.links.handle_accepted(ConnId(conn), now);
    }
    h.drain();
    h.links.handle_accepted(ConnId(64), now);
    assert_eq!(closes(&h.drain()), [CloseReason::TooManyPending(64)]);
    // Dialing out is not limited by them.
    h.links.handle_dialed(ConnId(65), 3, now);
    assert!(closes(&h.drain()).is_empty());
    let out = h.run(Duration::from_secs(5));
    assert_eq!(
        closes(&out.into_iter().map(|(_, o)| o).collect::<Vec<_>>()).len(),
        65
    );
    assert!(
        h.run(Duration::from_secs(1)).is_empty(),
        "nothing is left to do"
    );
    h.links.handle_accepted(ConnId(66), now);
    assert!(closes(&h.drain()).is_empty(), "room again");
}

/// The delays between dials of a peer that cannot be reached.
fn dial_times(out: &[(Duration, LinkOutput)]) -> Vec<Duration> {
    out.iter()
        .filter(|(_, o)| matches!(o, LinkOutput::Dial { .. }))
        .map(|(at, _)| *at)
        .collect()
}

impl Harness {
    /// Steps the timers until the next dial; returns how long that took.
    fn next_dial(&mut self) -> Duration {
        let start = self.now;
        loop {
            let at = self.links.poll_timeout().expect("a dial is due");
            self.now = at.max(self.now);
            self.links.handle_timeout(self.now);
            if dial_times(
                &self
                    .drain()
                    .into_iter()
                    .map(|o| (Duration::ZERO, o))
                    .collect::<Vec<_>>(),
            )
            .len()
                == 1
            {
                return self.now - start;
            }
        }
    }

    /// Keeps the link to `peer` alive with traffic for `time`.
    fn chatter(&mut self, conn: u64, time: Duration) {
        let end = self.now + time;
        while self.now < end {
            self.run(Duration::from_millis(500));
            let now = self.now;
            self.links.handle_traffic(ConnId(conn), now);
        }
        self.drain();
    }
}

#[test]
fn redials_back_off_from_100_ms_to_10_s_with_jitter() {
    let mut h = Harness::new(&[2]);
    let mut delays = Vec::new();
    for _ in 0..12 {
        delays.push(h.next_dial());
        let now = h.now;
        h.links.handle_dial_failed(2, now);
    }
    assert_eq!(delays[0], Duration::ZERO, "the first dial is at once");
    let mut base = Duration::from_millis(100);
    for d in &delays[1..] {
        assert!(*d <= base && *d >= base * 3 / 4, "{d:?} against {base:?}");
        base = (base * 2).min(Duration::from_secs(10));
    }
    assert!(
        delays[1..]
            .windows(2)
            .all(|w| w[0] < w[1] || w[1] >= Duration::from_millis(7500)),
        "{delays:?}"
    );
    // A dial the shell never reports counts as failed after 10 s.
    h.next_dial();
    let waited = h.next_dial();
    assert!(waited >= Duration::from_millis(17_500), "{waited:?}");
}

#[test]
fn the_backoff_starts_again_after_a_link_stays_up() {
    let mut h = Harness::new(&[2]);
    // Fail four times: the backoff grows to 1.6 s.
    for _ in 0..5 {
        h.next_dial();
        let now = h.now;
        h.links.handle_dial_failed(2, now);
    }
    h.next_dial();
    let cut_after = |h: &mut Harness, conn: u64, up_for: Duration| {
        assert_eq!(
            ups_and_downs(&h.dialed(conn, 2, 1)),
            [format!("up 2 {conn}")]
        );
        h.chatter(conn, up_for);
        let now = h.now;
        h.links.handle_closed(ConnId(conn), now);
        assert_eq!(ups_and_downs(&h.drain()), ["down 2"]);
        h.next_dial()
    };
    // Up for a second only: the next redial still waits 1.2 to 1.6 s.
    let short = cut_after(&mut h, 1, Duration::from_secs(1));
    assert!(short >= Duration::from_millis(1200), "{short:?}");
    // Up for 10 s: it starts again from 100 ms.
    let long = cut_after(&mut h, 2, Duration::from_secs(10));
    assert!(long <= Duration::from_millis(100), "{long:?}");
}

#[test]
fn a_peer_not_configured_is_up_while_it_lasts_and_never_redialled() {
    let mut h = Harness::new(&[]);
    assert_eq!(h.links.poll_timeout(), None, "nothing to do");
    assert_eq!(ups_and_downs(&h.accept(1, 7, 1)), ["up 7 1"]);
    let now = h.now;
    h.links.handle_control(
        ConnId(1),
        ControlFrame::Goodbye {
            reason: "bye".into(),
        },
        now,
    );
    assert_eq!(ups_and_downs(&h.drain()), ["down 7"]);
    assert!(h.run(Duration::from_secs(60)).is_empty());
    assert_eq!(h.links.peers().count(), 0);
    // Its last incarnation is remembered.
    assert_eq!(
        closes(&h.accept(2, 7, 0)),
        [CloseReason::StaleIncarnation {
            junction: 7,
            got: 0,
            known: 1
        }]
    );
}

#[test]
fn link_states_are_passed_up_only_from_admitted_connections() {
    let mut h = Harness::new(&[]);
    let ls = LinkState {
        origin: 2,
        incarnation: 1,
        seq: 1,
        neighbours: vec![],
        names: vec![],
        seal: None,
    };
    let now = h.now;
    h.links.handle_accepted(ConnId(1), now);
    h.links.handle_hello(ConnId(1), hello(2, 1), now);
    assert_eq!(
        h.links
            .handle_control(ConnId(1), ControlFrame::LinkState(ls.clone()), now),
        None,
        "no certificate yet"
    );
    h.links.handle_certificate(ConnId(1), 2, now);
    assert_eq!(
        h.links
            .handle_control(ConnId(1), ControlFrame::LinkState(ls.clone()), now),
        Some((2, ls))
    );
}

#[test]
fn a_stopping_junction_closes_everything_and_dials_no_more() {
    let mut h = Harness::new(&[2, 3]);
    h.advance(Duration::ZERO);
    h.dialed(1, 2, 1);
    h.accept(2, 9, 1);
    let now = h.now;
    h.links.handle_accepted(ConnId(3), now);
    h.drain();
    h.links.close_all(now);
    let mut out = ups_and_downs(&h.drain());
    out.sort();
    assert_eq!(
        out,
        [
            "close 1: the junction is stopping",
            "close 2: the junction is stopping",
            "close 3: the junction is stopping",
            "down 2",
            "down 9"
        ]
    );
    assert_eq!(h.links.poll_timeout(), None);
    assert_eq!(h.links.peers().count(), 0);
}

#[test]
fn peers_can_be_added_and_removed_while_running() {
    let mut h = Harness::new(&[]);
    let now = h.now;
    assert_eq!(
        h.links.add_peer(0, addr(0), now),
        Err(ConfigError::ReservedPeer(0))
    );
    assert_eq!(
        h.links.add_peer(5, addr(5), now),
        Err(ConfigError::PeerIsSelf(5))
    );
    h.links.add_peer(2, addr(2), now).unwrap();
    assert_eq!(
        h.advance(Duration::ZERO),
        [LinkOutput::Dial {
            peer: 2,
            addr: addr(2)
        }]
    );
    h.links.add_peer(2, addr(2), now).unwrap();
    assert_eq!(h.advance(Duration::ZERO), [], "a dial is under way");
    h.dialed(1, 2, 1);
    // Removed while up: it stays up, and is not redialled when it goes.
    h.links.remove_peer(2);
    assert_eq!(h.links.conn(2), Some(ConnId(1)));
    let now = h.now;
    h.links.handle_closed(ConnId(1), now);
    assert_eq!(ups_and_downs(&h.drain()), ["down 2"]);
    assert!(h.run(Duration::from_secs(30)).is_empty());
    // Removed while down: no more dials.
    let now = h.now;
    h.links.add_peer(3, addr(3), now).unwrap();
    h.next_dial();
    let now = h.now;
    h.links.handle_dial_failed(3, now);
    h.links.remove_peer(3);
    assert!(h.run(Duration::from_secs(30)).is_empty());
    assert_eq!(h.links.peers().count(), 0);
}

mod ops {
    //! Arbitrary sequences of events, well-formed or not, in any order:
    //! nothing panics, Up and Down alternate per peer, a peer is up on one
    //! connection, and few connections wait for a Hello.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Dialed(u64, u16),
        DialFailed(u16),
        Accepted(u64),
        Certificate(u64, u16),
        Hello(u64, u16, u64, bool),
        KeepAlive(u64, u64),
        Ack(u64, u64),
        Traffic(u64),
        Closed(u64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let conn = 0u64..6;
        let peer = prop_oneof![Just(0u16), Just(2), Just(3), Just(5), Just(65535)];
        prop_oneof![
            (conn.clone(), peer.clone()).prop_map(|(c, p)| Op::Dialed(c, p)),
            peer.clone().prop_map(Op::DialFailed),
            conn.clone().prop_map(Op::Accepted),
            (conn.clone(), peer.clone()).prop_map(|(c, p)| Op::Certificate(c, p)),
            (conn.clone(), peer, 0u64..3, any::<bool>())
                .prop_map(|(c, p, i, v)| Op::Hello(c, p, i, v)),
            (conn.clone(), 0u64..4).prop_map(|(c, n)| Op::KeepAlive(c, n)),
            (conn.clone(), 0u64..4).prop_map(|(c, n)| Op::Ack(c, n)),
            conn.clone().prop_map(Op::Traffic),
            conn.prop_map(Op::Closed),
            (0u64..4000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn any_sequence_of_events_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..80)) {
            let mut h = Harness::new(&[2, 3]);
            let mut config = LinkConfig::new(5, 100);
            config.peers = vec![(2, addr(2)), (3, addr(3))];
            config.max_pending = 2;
            h.links = Links::new(config, h.now).unwrap();
            let mut up: BTreeMap<u16, ConnId> = BTreeMap::new();
            for op in ops {
                let now = h.now;
                match op {
                    Op::Dialed(c, p) => h.links.handle_dialed(ConnId(c), p, now),
                    Op::DialFailed(p) => h.links.handle_dial_failed(p, now),
                    Op::Accepted(c) => h.links.handle_accepted(ConnId(c), now),
                    Op::Certificate(c, p) => h.links.handle_certificate(ConnId(c), p, now),
                    Op::Hello(c, p, i, v) => {
                        let hello = Hello { version: if v { VERSION } else { 9 }, junction: p, incarnation: i };
                        h.links.handle_hello(ConnId(c), hello, now)
                    }
                    Op::KeepAlive(c, n) => h.links.handle_keepalive(ConnId(c), n, now),
                    Op::Ack(c, n) => h.links.handle_keepalive_ack(ConnId(c), n, now),
                    Op::Traffic(c) => { let _ = h.links.handle_traffic(ConnId(c), now); }
                    Op::Closed(c) => h.links.handle_closed(ConnId(c), now),
                    Op::Advance(ms) => {
                        h.now += Duration::from_millis(ms);
                        let now = h.now;
                        h.links.handle_timeout(now);
                    }
                }
                let mut closed = Vec::new();
                for out in h.drain() {
                    match out {
                        LinkOutput::Up { peer, conn, .. } => {
                            prop_assert!(up.insert(peer, conn).is_none(), "up twice");
                            prop_assert!(![0, 5, 65535].contains(&peer));
                        }
                        LinkOutput::Down { peer } => {
                            prop_assert!(up.remove(&peer).is_some(), "down while not up");
                        }
                        LinkOutput::Close { conn, .. } => closed.push(conn),
                        _ => {}
                    }
                }
                prop_assert!(!up.values().any(|c| closed.contains(c)), "closed but up");
                for (&peer, &conn) in &up {
                    prop_assert_eq!(h.links.conn(peer), Some(conn));
                    prop_assert_eq!(h.links.peer(conn), Some(peer));
                }
                let pending = h.links.conns.values().filter(|c| !c.admitted && c.dialed.is_none()).count();
                prop_assert!(pending <= 2);
                if let Some(at) = h.links.poll_timeout() {
                    prop_assert!(at + Duration::from_secs(11) >= h.now, "a deadline long past is not left behind");
                }
            }
        }
    }
}
