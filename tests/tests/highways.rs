//! Junctions on real Highways: real `junction` binaries, real QUIC on
//! loopback, certificates made with the real `junction keygen` and
//! `junction cert`. A line and a triangle of three junctions; calls and
//! capabilities across two hops; rogue peers refused, each with a clear log
//! line, and a valid junction that forges its way to a port refused frame
//! by frame; numbered messages through a cut link, once and in order.

use std::time::{Duration, Instant};

use junction::relay::UdpRelay;
use junction_driver::{Driver, Rights};
use junction_tests::{Bus, free_port, lookup_eventually, registered_port};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `check` holds, for at most `patience`.
fn eventually(patience: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {patience:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three junctions in a line, 1 - 2 - 3: a process on 1 calls a service on
/// 3 through 2 by name, and the two pass capabilities both ways.
#[test]
fn a_call_and_capabilities_cross_two_highways() {
    let bus = Bus::new();
    let ports = [free_port(), free_port(), free_port()];
    let j1 = bus.start(1, ports[0], &[]);
    let j2 = bus.start(2, ports[1], &[(1, ports[0])]);
    let j3 = bus.start(3, ports[2], &[(2, ports[1])]);
    let rt = runtime();
    rt.block_on(async {
        // A service on junction 3.
        let (server, mut port) = registered_port(&j3.socket, "t.store").await;

        // A client on junction 1 finds it across two Highways.
        let client = Driver::connect(&j1.socket).await.unwrap();
        let store = lookup_eventually(&client, "t.store", Duration::from_secs(20)).await;
        assert_eq!(store.address().junction, 3);

        // It passes a capability to a port of its own along.
        let mut inbox = client.open_port().await.unwrap();
        let mine = inbox.mint(Rights::SEND | Rights::GRANT).await.unwrap();
        client
            .send_with(&store, "here is my inbox", &[&mine])
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(10), port.recv())
            .await
            .expect("the message crossed")
            .unwrap();
        assert_eq!(&msg.payload[..], b"here is my inbox");
        assert_eq!(msg.origin.junction, 1, "stamped with the sender's junction");
        let back = &msg.caps[0];
        assert_eq!(back.address().junction, 1);

        // The service uses it: the answer crosses back.
        server.send(back, "got it").await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("the answer crossed back")
            .unwrap();
        assert_eq!(&answer.payload[..], b"got it");
        assert_eq!(answer.origin.junction, 3);

        // Megabyte messages arrive byte for byte: sealed from 1 (through
        // 2), and in clear over the direct Highway from 2, where the
        // payload goes out in the buffer it was read into.
        let big: bytes::Bytes = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        let near = Driver::connect(&j2.socket).await.unwrap();
        let store_near = lookup_eventually(&near, "t.store", Duration::from_secs(20)).await;
        for (driver, cap, from) in [(&client, &store, 1), (&near, &store_near, 2)] {
            driver.send(cap, big.clone()).await.unwrap();
            let msg = tokio::time::timeout(Duration::from_secs(10), port.recv())
                .await
                .expect("the large message crossed")
                .unwrap();
            assert_eq!(msg.origin.junction, from);
            assert!(msg.payload == big, "the large message from {from} changed");
        }
    });
    // And by the command line: a call across, answered.
    let mut echo = junction_tests::Proc::spawn(
        j3.command(&["echo", "--name", "t.echo"])
            .stdout(std::process::Stdio::null()),
    );
    let mut reply = String::new();
    eventually(
        Duration::from_secs(20),
        "a call across two Highways",
        || {
            let out = j1
                .command(&["call", "t.echo", "hello from 1", "--timeout", "2"])
                .output()
                .unwrap();
            reply = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
        },
    );
    assert!(reply.contains("hello from 1"), "{reply}");
    // Junction 2 calls it too, from next door.
    let out = j2
        .command(&["call", "t.echo", "hello from 2", "--timeout", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Junction 3 seals what goes through 2 to 1, and leaves what goes
    // straight to 2 to their Highway's TLS.
    let out = j3.command(&["ls", "--json"]).output().unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sealing = |junction: u16| {
        listing["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["junction"] == junction)
            .map(|s| s["sealing"].as_str().unwrap().to_owned())
    };
    assert_eq!(sealing(1).as_deref(), Some("sealed"), "{listing}");
    assert_eq!(sealing(2).as_deref(), Some("direct"), "{listing}");
    echo.kill();
    drop((j1, j2, j3));
}

/// Peers that must not join are refused, each with a log line on the
/// junction that refused them saying why, and never linked: a junction
/// certified by another authority, one whose certificate carries another
/// id than it claims, a revoked one, and a self-signed key with no bus
/// chain at all.
#[test]
fn rogue_peers_are_refused_with_reasons() {
    let bus = Bus::new();
    // Junction 3's certificate is revoked before junction 1 starts.
    let (k3, c3) = bus.junction(3);
    let crl = bus.revoke(&c3);
    let port1 = free_port();
    let (k1, c1) = bus.junction(1);
    let j1 = bus.start_as(
        1,
        port1,
        &[],
        &k1,
        &c1,
        &["--revocations", &crl.to_string_lossy()],
    );

    // Certified by another bus's authority (and trusting only that one).
    let other = Bus::new();
    let foreign = other.start(2, free_port(), &[(1, port1)]);
    // A junction of this bus whose certificate says 5, started as 6.
    let (k5, c5) = bus.junction(5);
    let liar = bus.start_as(6, free_port(), &[(1, port1)], &k5, &c5, &[]);
    // Revoked.
    let revoked = bus.start_as(3, free_port(), &[(1, port1)], &k3, &c3, &[]);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = j1.log();
        if log.contains("authority this bus does not trust")
            && log.contains("revoked")
            && log.contains("junction 5")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every rogue was refused with its reason; junction 1 logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A self-signed key, no bus chain: a raw QUIC client that trusts
    // junction 1, so that the refusal is junction 1's.
    let rt = runtime();
    rt.block_on(async {
        let key = junction_identity::SecretKey::generate().unwrap();
        let identity = junction_highway::TlsIdentity::danger_unchecked(&key, None, 9).unwrap();
        let trust = junction::config::load_trust(&bus.pki.path("authority.cert")).unwrap();
        let policy =
            junction_highway::PeerPolicy::new(trust, junction_highway::Revocations::new(None));
        let config = junction_highway::client_config(
            &identity,
            &policy,
            &junction_highway::TransportSettings::default(),
        )
        .unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = format!("127.0.0.1:{port1}").parse().unwrap();
        let connecting = endpoint
            .connect_with(config, addr, &junction_highway::cert::server_name(1))
            .unwrap();
        // Its QUIC connect may well succeed: the refusal shows on first use.
        if let Ok(conn) = connecting.await {
            let refused = tokio::time::timeout(Duration::from_secs(5), async {
                let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(b"junk").await.map_err(|e| e.to_string())?;
                conn.accept_uni()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await;
            assert!(
                !matches!(refused, Ok(Ok(()))),
                "a self-signed peer was served"
            );
        }
    });
    eventually(
        Duration::from_secs(10),
        "the self-signed key refused",
        || j1.log().contains("no bus chain"),
    );
    let log = j1.log();
    if let Some(line) = log.lines().find(|l| l.contains("Highway up")) {
        panic!("a rogue was linked: {line}\n{log}");
    }
    drop((foreign, liar, revoked, j1));
}

/// A triangle of junctions; numbered messages from 1 to a service on 3 go
/// over the direct Highway until it is cut mid-stream: the rest go round
/// through 2, and every message arrives once, in order. Then the link
/// heals.
#[test]
fn a_cut_highway_reroutes_and_loses_or_repeats_nothing() {
    let bus = Bus::new();
    let ports = [free_port(), free_port(), free_port()];
    let relay = UdpRelay::new(([127, 0, 0, 1], ports[2]).into()).unwrap();
    let j1 = bus.start(1, ports[0], &[]);
    let j2 = bus.start(2, ports[1], &[(1, ports[0])]);
    let j3 = bus.start(3, ports[2], &[(2, ports[1])]);
    // Junction 1 reaches 3 directly, through the relay.
    let (k1, c1) = bus.junction(1);
    drop(j1);
    let j1 = bus.start_as(1, ports[0], &[(3, relay.port())], &k1, &c1, &[]);
    let rt = runtime();
    rt.block_on(async {
        let (_server, mut port) = registered_port(&j3.socket, "t.sink").await;
        let client = Driver::connect(&j1.socket).await.unwrap();
        let sink = lookup_eventually(&client, "t.sink", Duration::from_secs(20)).await;
        const COUNT: u32 = 400;
        let sender = async {
            for i in 0..COUNT {
                client.send(&sink, i.to_be_bytes().to_vec()).await.unwrap();
                if i == COUNT / 2 {
                    relay.cut(true);
                }
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let receiver = async {
            let mut got = Vec::new();
            let (mut last, mut longest) = (Instant::now(), Duration::ZERO);
            while got.len() < COUNT as usize {
                let msg = tokio::time::timeout(Duration::from_secs(30), port.recv())
                    .await
                    .expect("the stream stalled")
                    .unwrap();
                got.push(u32::from_be_bytes(msg.payload[..4].try_into().unwrap()));
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            // For the record (a figure, not a test: the machine is shared).
            eprintln!("the longest wait between two messages, across the cut: {longest:?}");
            got
        };
        let ((), got) = tokio::join!(sender, receiver);
        assert_eq!(got, (0..COUNT).collect::<Vec<_>>(), "once and in order");
    });
    relay.cut(false);
    drop((j1, j2, j3));
}

/// Bulk traffic does not hold up a Highway's control stream: while a
/// process streams megabyte messages across as fast as the bus takes them,
/// keep-alives are answered, so the link never goes down (three missed
/// end it), and every message arrives whole and in order.
#[test]
fn bulk_traffic_leaves_the_control_stream_alone() {
    let bus = Bus::new();
    let ports = [free_port(), free_port()];
    let j1 = bus.start(1, ports[0], &[]);
    let j2 = bus.start(2, ports[1], &[(1, ports[0])]);
    let rt = runtime();
    let samples = rt.block_on(async {
        let (_server, mut port) = registered_port(&j2.socket, "t.sink").await;
        let client = Driver::connect(&j1.socket).await.unwrap();
        let sink = lookup_eventually(&client, "t.sink", Duration::from_secs(20)).await;
        const COUNT: u8 = 100;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Junction 1's view of its Highway, every 100 ms while the bulk
        // runs.
        let watcher = std::thread::spawn({
            let done = done.clone();
            let mut ls = j1.command(&["ls", "--json"]);
            move || {
                let mut samples = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = ls.output().unwrap();
                    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let highway = listing["highways"][0].clone();
                    samples.push((highway["state"].clone(), highway["rtt_us"].as_u64()));
                    std::thread::sleep(Duration::from_millis(100));
                }
                samples
            }
        });
        let sender = async {
            for i in 0..COUNT {
                client.send(&sink, vec![i; 1 << 20]).await.unwrap();
            }
        };
        let receiver = async {
            for i in 0..COUNT {
                let msg = tokio::time::timeout(Duration::from_secs(30), port.recv())
                    .await
                    .expect("the bulk stalled")
                    .unwrap();
                assert!(msg.payload.len() == 1 << 20 && msg.payload.iter().all(|&b| b == i));
            }
        };
        tokio::join!(sender, receiver);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert!(!samples.is_empty());
    assert!(
        samples.iter().all(|(state, _)| state == "up"),
        "the Highway left Up under bulk traffic: {samples:?}"
    );
    for j in [&j1, &j2] {
        let log = j.log();
        assert!(!log.contains("Highway down"), "{log}");
    }
    // For the record (a figure, not a test: the machine is shared).
    let rtts: Vec<_> = samples.iter().filter_map(|(_, rtt)| *rtt).collect();
    eprintln!("keep-alive round trips during the bulk, µs: {rtts:?}");
}

/// A junction that restarts within a second of its last start is still a
/// new life to its neighbour: its lookups are answered and its messages
/// taken, none mistaken for the earlier life's (which, numbered from 0 on
/// the same lanes, would be dropped as already delivered).
#[test]
fn a_junction_restarted_at_once_is_a_new_life_to_its_peers() {
    let bus = Bus::new();
    let ports = [free_port(), free_port()];
    let (k1, c1) = bus.junction(1);
    let j2 = bus.start(2, ports[1], &[]);
    let rt = runtime();
    rt.block_on(async {
        let (_server, mut port) = registered_port(&j2.socket, "t.sink").await;
        for life in 0..3u8 {
            let j1 = bus.start_as(1, ports[0], &[(2, ports[1])], &k1, &c1, &[]);
            let client = Driver::connect(&j1.socket).await.unwrap();
            let sink = lookup_eventually(&client, "t.sink", Duration::from_secs(20)).await;
            for i in 0..5u8 {
                client.send(&sink, vec![life, i]).await.unwrap();
            }
            for i in 0..5u8 {
                let msg = tokio::time::timeout(Duration::from_secs(10), port.recv())
                    .await
                    .unwrap_or_else(|_| panic!("life {life}: message {i} never came"))
                    .unwrap();
                assert_eq!(&msg.payload[..], [life, i], "life {life}");
            }
            // Killed and started again at once, as a crash and a restart.
            drop(client);
            drop(j1);
        }
    });
}

/// A junction revoked while its Highway is up: on SIGHUP the junction that
/// reloads the list closes the Highway, saying why, and refuses the
/// redial.
#[test]
fn revoking_a_linked_junction_closes_its_highway() {
    let bus = Bus::new();
    let (_k9, c9) = bus.junction(9);
    let crl = bus.revoke(&c9);
    let port1 = free_port();
    let (k1, c1) = bus.junction(1);
    let j1 = bus.start_as(
        1,
        port1,
        &[],
        &k1,
        &c1,
        &["--revocations", &crl.to_string_lossy()],
    );
    let j3 = bus.start(3, free_port(), &[(1, port1)]);
    let rt = runtime();
    rt.block_on(async {
        let server = Driver::connect(&j3.socket).await.unwrap();
        let port = server.open_port().await.unwrap();
        let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
        server.register("t.soon-revoked", &cap).await.unwrap();
        let client = Driver::connect(&j1.socket).await.unwrap();
        lookup_eventually(&client, "t.soon-revoked", Duration::from_secs(20)).await;
    });
    // The certificate junction 3 runs with (not a new one).
    bus.revoke(&bus.pki.path("j3.cert"));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &j1.process.pid().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = j1.log();
        if log.contains("closing a Highway") && log.contains("revoked") {
            break;
        }
        assert!(Instant::now() < deadline, "the Highway stayed up:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((j1, j3));
}

/// A junction with a valid certificate, run in this test from the real
/// core and the real Highways code, that forges what the bus's junctions
/// send one another: it was never given a capability, yet names ports
/// and exports directly.
struct RogueJunction {
    core: std::cell::RefCell<junction_core::Core>,
    highways: std::cell::RefCell<Option<std::rc::Rc<junction::highway::Highways>>>,
    linked: std::cell::Cell<bool>,
}

impl RogueJunction {
    /// Moves what the core says to the Highways.
    fn pump(&self) {
        let highways = self.highways.borrow().clone();
        while let Some(output) = self.core.borrow_mut().poll_output() {
            if let (junction_core::Output::Highway { to, frame, payload }, Some(h)) =
                (output, highways.as_ref())
            {
                h.send(to, &frame, payload);
            }
        }
    }
}

fn rogue_now() -> junction_core::Now {
    junction_core::Now::new(Instant::now(), junction::unix_now())
}

impl junction::highway::Junction for RogueJunction {
    fn highway_changed(&self, peer: u16, up: bool) {
        if up {
            self.core
                .borrow_mut()
                .handle_highway_up(peer, 1, rogue_now());
            self.linked.set(true);
        } else {
            self.core
                .borrow_mut()
                .handle_highway_down(peer, rogue_now());
        }
        self.pump();
    }

    fn highway_frame(
        &self,
        peer: u16,
        frame: junction_road::highway::HighwayFrame,
        payload: bytes::Bytes,
    ) {
        self.core
            .borrow_mut()
            .handle_highway_frame(peer, frame, payload, rogue_now());
        self.pump();
    }

    fn highway_frames(
        &self,
        peer: u16,
        frames: Vec<(junction_road::highway::HighwayFrame, bytes::Bytes)>,
    ) {
        self.core
            .borrow_mut()
            .handle_highway_frames(peer, frames, rogue_now());
        self.pump();
    }
}

/// A junction whose certificate is valid, linked to the owner of a
/// service, sends to the service's port naming exports it was never
/// granted: every frame is refused with a log line on the owner, the
/// service receives none of them, and the bus goes on working.
#[test]
fn a_valid_junction_never_given_a_capability_reaches_no_port() {
    use junction_road::remote::{self, RemoteFrame, RemotePort, RemoteSend};
    let bus = Bus::new();
    let ports = [free_port(), free_port()];
    let j3 = bus.start(3, ports[1], &[]);
    let j1 = bus.start(1, ports[0], &[(3, ports[1])]);
    let (key2, cert2) = bus.junction(2);
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        // A service on junction 3, reached legitimately from junction 1.
        let (_server, mut port) = registered_port(&j3.socket, "t.vault").await;
        let client = Driver::connect(&j1.socket).await.unwrap();
        let vault = lookup_eventually(&client, "t.vault", Duration::from_secs(20)).await;
        client.send(&vault, "legitimate").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), port.recv())
            .await
            .expect("the legitimate message crossed")
            .unwrap();
        assert_eq!(&first.payload[..], b"legitimate");

        // The rogue: junction 2, certified by the bus's own authority.
        let key = junction_identity::SecretKey::from_pem(&std::fs::read_to_string(&key2).unwrap())
            .unwrap();
        let chain = junction_identity::Certificate::chain_from_pem(
            &std::fs::read_to_string(&cert2).unwrap(),
        )
        .unwrap();
        let identity = junction_highway::TlsIdentity::new(&key, &chain).unwrap();
        let incarnation = junction::unix_now() * 1000;
        let trust = junction::config::load_trust(&bus.pki.path("authority.cert")).unwrap();
        let config = junction_core::Config {
            junction: 2,
            incarnation,
            trust: trust.clone(),
            junction_identity: Some((std::sync::Arc::new(key), chain)),
            ..junction_core::Config::default()
        };
        let rogue = std::rc::Rc::new(RogueJunction {
            core: std::cell::RefCell::new(junction_core::Core::new(config, rogue_now())),
            highways: std::cell::RefCell::new(None),
            linked: std::cell::Cell::new(false),
        });
        let policy =
            junction_highway::PeerPolicy::new(trust, junction_highway::Revocations::new(None));
        let highways = junction::highway::Highways::new(junction::highway::HighwaySetup {
            junction: 2,
            incarnation,
            identity,
            policy,
            listen: None,
            peers: vec![(3, format!("127.0.0.1:{}", ports[1]).parse().unwrap())],
            names: Default::default(),
        })
        .unwrap();
        *rogue.highways.borrow_mut() = Some(highways.clone());
        let as_junction: std::rc::Rc<dyn junction::highway::Junction> = rogue.clone();
        tokio::task::spawn_local(highways.clone().run(as_junction));
        let timers = rogue.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                timers.core.borrow_mut().handle_timeout(rogue_now());
                timers.pump();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !rogue.linked.get() {
            assert!(Instant::now() < deadline, "the rogue never linked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Link states go round, so the rogue knows a route to junction 3.
        tokio::time::sleep(Duration::from_millis(500)).await;

        // It names the service's port with every export and generation
        // it might guess.
        let target = first.port;
        for export in 0..8u32 {
            for generation in 0..2u32 {
                let forged = RemoteFrame::Send(RemoteSend {
                    port: RemotePort {
                        port: target,
                        generation,
                        export: export | (generation << 16),
                    },
                    n: 0,
                    origin: junction_road::Address::new(2, 1),
                    identity: None,
                    call: 0,
                    ack: false,
                    caps: vec![],
                });
                let bytes = remote::to_bytes(&forged, b"stolen");
                rogue
                    .core
                    .borrow_mut()
                    .junction_send(3, remote::data_lane(target), bytes)
                    .expect("the session takes it");
            }
        }
        rogue.pump();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !j3.log().contains("refused a remote frame") {
            assert!(
                Instant::now() < deadline,
                "junction 3 logged no refusal:\n{}",
                j3.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = j3.log();
        let line = log
            .lines()
            .find(|l| l.contains("refused a remote frame"))
            .unwrap();
        assert!(line.contains("junction=2"), "{line}");

        // Nothing forged arrived; the bus goes on working.
        client.send(&vault, "after").await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), port.recv())
            .await
            .expect("the bus still works")
            .unwrap();
        assert_eq!(
            &next.payload[..],
            b"after",
            "nothing from the rogue arrived"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(500), port.recv())
                .await
                .is_err(),
            "nothing from the rogue arrives later either"
        );
        highways.close("the test is over");
    });
    drop((j1, j3));
}

/// Peers may be named by host: the name is resolved at each dial, so a
/// junction starts even when a peer's name does not resolve yet, says so,
/// and keeps trying, while peers whose names resolve link as usual.
#[test]
fn peers_named_by_host_are_resolved_at_each_dial() {
    let bus = Bus::new();
    let ports = [free_port(), free_port()];
    let j1 = bus.start(1, ports[0], &[]);
    let (key, cert) = bus.junction(2);
    let by_name = format!("1@localhost:{}", ports[0]);
    let nowhere = format!("9@nowhere.invalid:{}", ports[1]);
    let j2 = bus.start_as(
        2,
        ports[1],
        &[],
        &key,
        &cert,
        &["--peer", &by_name, "--peer", &nowhere],
    );
    let listing = || {
        let out = j2.command(&["ls", "--json"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let named = format!("\"localhost:{}\"", ports[0]);
    eventually(Duration::from_secs(20), "a Highway to localhost", || {
        let listing = listing();
        listing.contains(&named) && listing.contains("\"up\"")
    });
    eventually(
        Duration::from_secs(20),
        "a log line for the name that does not resolve",
        || j2.log().contains("cannot resolve nowhere.invalid"),
    );
    let log = j2.log();
    assert!(
        log.contains("peer 9@nowhere.invalid") && log.contains("does not resolve now"),
        "{log}"
    );
    drop((j1, j2));
}
