//! The local bus across real processes: a `junction serve` daemon, driver
//! processes, and raw clients that misbehave.

use std::time::{Duration, Instant};

use bytes::Bytes;
use junction_driver::{Driver, Error, Notice, Reason, Rights};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest};
use junction_road::{Call, ErrorCode, Frame, Header, Send};
use junction_tests::{RawClient, TestJunction, TestPki};

const PEER: &str = env!("CARGO_BIN_EXE_junction-test-peer");
const T: Duration = Duration::from_secs(10);

fn peer() -> &'static std::path::Path {
    std::path::Path::new(PEER)
}

async fn lookup_eventually(driver: &Driver, name: &str) -> junction_driver::Capability {
    junction_tests::lookup_eventually(driver, name, T).await
}

#[tokio::test]
async fn echo_call_across_processes() {
    let j = TestJunction::start(&[]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let reply = me.call(&echo, "ping", T).await.unwrap();
    assert_eq!(&reply.payload[..], b"ping");
    assert_ne!(
        reply.origin,
        me.home(),
        "the origin is the echo's port, stamped by the junction"
    );

    // The command-line client works against the same junction.
    let out = j
        .command(&["call", "t.echo", "from the cli"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from the cli");
    let out = j.command(&["ls"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("t.echo"), "{text}");
    assert!(text.contains("junction echo"), "{text}");
}

#[tokio::test]
async fn a_capability_travels_a_to_b_to_c_and_c_uses_it() {
    let j = TestJunction::start(&[]);
    let _svc = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.svc"]));
    let _a = j.spawn_ready(peer(), &["holder", "t.a"]);
    let _b = j.spawn_ready(peer(), &["holder", "t.b"]);
    let _c = j.spawn_ready(peer(), &["holder", "t.c"]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let svc = lookup_eventually(&me, "t.svc").await;
    let a = me.lookup("t.a").await.unwrap();
    let b = me.lookup("t.b").await.unwrap();
    let c = me.lookup("t.c").await.unwrap();

    let r = me.call_with(&a, "take this", &[&svc], T).await.unwrap();
    assert_eq!(&r.payload[..], b"kept");
    let r = me.call(&a, "forward:t.b", T).await.unwrap();
    assert_eq!(&r.payload[..], b"forwarded");
    let r = me.call(&b, "forward:t.c", T).await.unwrap();
    assert_eq!(&r.payload[..], b"forwarded");
    let r = me
        .call(&c, "use:hello via three processes", T)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&r.payload);
    assert_eq!(
        text,
        format!("hello via three processes via {}", svc.address())
    );
}

#[tokio::test]
async fn a_capability_without_grant_is_refused() {
    let j = TestJunction::start(&[]);
    let _b = j.spawn_ready(peer(), &["holder", "t.b"]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let b = me.lookup("t.b").await.unwrap();
    let port = me.open_port().await.unwrap();
    let private = port.mint(Rights::SEND).await.unwrap();
    // The driver refuses before anything is sent...
    let err = me.send_with(&b, "x", &[&private]).await.unwrap_err();
    assert!(matches!(err, Error::NotGrantable { .. }), "{err}");

    // ...and the junction refuses a client that skips the driver.
    let (mut raw, _) = RawClient::hello(&j.socket);
    let (_, found) = raw.control(&ControlRequest::Lookup {
        name: "t.b".parse().unwrap(),
    });
    let to_b = found[0].handle;
    raw.send(Header::OpenPort { req: 1 });
    let opened = raw.recv_until(|h| matches!(h, Header::PortOpened { .. }));
    let Header::PortOpened { address, .. } = opened.header else {
        unreachable!()
    };
    raw.send(Header::Mint {
        req: 2,
        port: address.port,
        rights: Rights::SEND,
    });
    let minted = raw.recv_until(|h| matches!(h, Header::Minted { .. }));
    let Header::Minted {
        handle: no_grant, ..
    } = minted.header
    else {
        unreachable!()
    };
    raw.send(Header::Send(Send {
        handle: to_b,
        caps: vec![no_grant],
    }));
    let err = raw.recv_until(|h| matches!(h, Header::Error(_)));
    let Header::Error(e) = err.header else {
        unreachable!()
    };
    assert_eq!(e.code, ErrorCode::MissingRight);
    assert!(e.message.contains("without grant"), "{}", e.message);

    // B got nothing: its next message is the one we send now.
    let r = me.call(&b, "still fine", T).await.unwrap();
    assert_eq!(&r.payload[..], b"kept");
}

#[tokio::test]
async fn sigkill_produces_dead_port_notices_and_fails_pending_calls() {
    let j = TestJunction::start(&[]);
    let mut silent = j.spawn_ready(peer(), &["silent", "t.silent"]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let cap = me.lookup("t.silent").await.unwrap();
    let watch = {
        let cap = cap.clone();
        tokio::spawn(async move { cap.watch().await })
    };
    let pending = {
        let me = me.clone();
        let cap = cap.clone();
        tokio::spawn(async move { me.call(&cap, "never answered", T).await })
    };
    me.send(&cap, "one-way").await.unwrap();
    me.sync().await.unwrap();
    // Let the silent peer take the messages in, then kill it hard.
    tokio::time::sleep(Duration::from_millis(100)).await;
    silent.kill();

    let call = tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert!(
        matches!(call, Err(Error::CallFailed(Reason::OwnerGone))),
        "{call:?}"
    );
    let reason = tokio::time::timeout(T, watch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reason, Reason::OwnerGone);
    let err = me.send(&cap, "too late").await.unwrap_err();
    assert!(matches!(err, Error::Dead(Reason::OwnerGone)), "{err}");
}

#[tokio::test]
async fn messages_to_a_killed_process_are_reported_undelivered() {
    let j = TestJunction::start(&[]);
    let mut slow = j.spawn_ready(peer(), &["slow", "t.slow"]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let cap = me.lookup("t.slow").await.unwrap();
    for i in 0..5u8 {
        assert_eq!(me.send(&cap, vec![i]).await.unwrap(), u64::from(i));
    }
    me.sync().await.unwrap();
    slow.kill();
    let notice = tokio::time::timeout(T, me.next_notice())
        .await
        .unwrap()
        .unwrap();
    match notice {
        Notice::Undeliverable {
            first_seq,
            count,
            reason,
            ..
        } => {
            assert_eq!((first_seq, count, reason), (0, 5, Reason::OwnerGone));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_oversize_and_half_frames_get_errors_while_others_carry_on() {
    let j = TestJunction::start(&[]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;

    // Garbage instead of a handshake: an error, then the link closes.
    let mut garbage = RawClient::connect(&j.socket);
    garbage.write_raw(b"\x00\x00\x00\x05GET /");
    let f = garbage.recv().expect("an error frame comes first");
    assert!(
        matches!(&f.header, Header::Error(e) if e.code == ErrorCode::HandshakeRequired || e.code == ErrorCode::BadHeader),
        "{:?}",
        f.header
    );

    // An HTTP request: its first four bytes read as a huge length.
    let mut http = RawClient::connect(&j.socket);
    http.write_raw(b"GET / HTTP/1.1\r\n\r\n");
    let f = http.recv().expect("an error frame comes first");
    assert!(
        matches!(&f.header, Header::Error(e) if e.code == ErrorCode::FrameTooLarge),
        "{:?}",
        f.header
    );
    assert!(http.recv().is_none(), "the connection is closed");

    // An oversize length after a good handshake.
    let (mut big, _) = RawClient::hello(&j.socket);
    big.write_raw(&u32::MAX.to_be_bytes());
    let f = big.recv_until(|h| matches!(h, Header::Error(_)));
    let Header::Error(e) = f.header else {
        unreachable!()
    };
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert!(e.message.contains("larger than the limit"), "{}", e.message);
    assert!(big.recv().is_none());

    // A well-framed but undecodable header: an error, and the link lives.
    let (mut bad, _) = RawClient::hello(&j.socket);
    bad.write_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let f = bad.recv_until(|h| matches!(h, Header::Error(_)));
    assert!(matches!(f.header, Header::Error(e) if e.code == ErrorCode::BadHeader));
    bad.send(Header::Ping { nonce: 9 });
    let f = bad.recv_until(|h| matches!(h, Header::Pong { .. }));
    assert_eq!(f.header, Header::Pong { nonce: 9 });

    // Half a frame, then the client vanishes.
    let (mut half, _) = RawClient::hello(&j.socket);
    half.write_raw(&[0, 0, 0, 100, 1, 2, 3]);
    drop(half);

    // Everyone else is still served.
    for i in 0..10 {
        let r = me.call(&echo, format!("still here {i}"), T).await.unwrap();
        assert_eq!(r.payload, Bytes::from(format!("still here {i}")));
    }
    let listing = me.listing().await.unwrap();
    assert!(
        listing.connections.iter().any(|c| c.label == "raw"),
        "the bad-header client is alive"
    );
}

#[tokio::test]
async fn a_slow_receiver_makes_its_sender_wait_with_junction_memory_bounded() {
    let j = TestJunction::start(&[]);
    let _slow = j.spawn_ready(peer(), &["slow", "t.slow"]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let slow = me.lookup("t.slow").await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let before = j.rss_kib();

    // 1 MiB messages: the window lets a bounded number through, then the
    // sender waits. The loop is bounded by count.
    let payload = Bytes::from(vec![0x5a; 1 << 20]);
    let cost = junction_road::frame::credit_cost(payload.len()) as usize;
    let mut sent = 0u32;
    while slow.credits() >= cost && sent < 200 {
        me.send(&slow, payload.clone()).await.unwrap();
        sent += 1;
    }
    eprintln!("{sent} MiB went out before the sender had to wait");
    // Credit comes back only when the receiver consumes, which it never does.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), me.send(&slow, payload.clone()))
            .await
            .is_err(),
        "the sender was not made to wait ({sent} MiB went out)"
    );
    assert!(
        (4..64).contains(&sent),
        "{sent} messages went through before the wait"
    );

    // An unrelated flow from the same sender is not stalled.
    let r = me.call(&echo, "unrelated", T).await.unwrap();
    assert_eq!(&r.payload[..], b"unrelated");

    let listing = me.listing().await.unwrap();
    let queued: u32 = listing
        .ports
        .iter()
        .filter(|p| p.names.iter().any(|n| n == "t.slow"))
        .map(|p| p.queued)
        .sum();
    assert_eq!(
        queued, sent,
        "every message sent is accounted for, none dropped"
    );
    let grown_mib = j.rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 128, "the junction grew by {grown_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_drivers_at_once_are_all_served() {
    let j = TestJunction::start(&[]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let first = Driver::connect(&j.socket).await.unwrap();
    lookup_eventually(&first, "t.echo").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let socket = j.socket.clone();
        tasks.push(tokio::spawn(async move {
            let d = Driver::connect(&socket).await?;
            let echo = d.lookup("t.echo").await?;
            let r = d.call(&echo, format!("driver {i}"), T).await?;
            assert_eq!(r.payload, Bytes::from(format!("driver {i}")));
            Ok::<_, Error>(d)
        }));
    }
    let mut drivers = Vec::new();
    for t in tasks {
        drivers.push(t.await.unwrap().unwrap());
    }
    let listing = first.listing().await.unwrap();
    assert!(
        listing.connections.len() >= 201,
        "{} connections",
        listing.connections.len()
    );
}

#[tokio::test]
async fn control_port_refusals_are_clear() {
    let j = TestJunction::start(&[]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let err = me.lookup("nobody.home").await.unwrap_err();
    assert!(
        matches!(&err, Error::Refused { code: ErrorCode::NameNotFound, message } if message.contains("nobody.home")),
        "{err}"
    );
    let err = me.lookup("Not A Name").await.unwrap_err();
    assert!(matches!(err, Error::Name(_)), "{err}");

    let port = me.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    me.register("t.mine", &cap).await.unwrap();
    let other = Driver::connect(&j.socket).await.unwrap();
    let p2 = other.open_port().await.unwrap();
    let c2 = p2.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    let err = other.register("t.mine", &c2).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: ErrorCode::NameTaken,
                ..
            }
        ),
        "{err}"
    );

    // A raw client sending a control request that does not decode.
    let (mut raw, _) = RawClient::hello(&j.socket);
    raw.send_frame(&Frame::with_payload(
        Header::Call(Call {
            handle: CONTROL_HANDLE,
            tag: 5,
            caps: vec![],
        }),
        Bytes::from_static(&[0xee, 0xee]),
    ));
    let f = raw.recv_until(|h| matches!(h, Header::Deliver(_)));
    let reply: ControlReply = postcard::from_bytes(&f.payload).unwrap();
    assert!(
        matches!(
            reply,
            ControlReply::Refused {
                code: ErrorCode::BadControlRequest,
                ..
            }
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_harms_nobody_else() {
    // Past 512 KiB queued the junction stops reading it; once its writer
    // has made no progress for half a second, it is cut off.
    let j = TestJunction::start(&[
        "--max-frame",
        "65536",
        "--max-unread",
        "524288",
        "--write-timeout-ms",
        "500",
    ]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let before = j.rss_kib();

    // Pings, never reading a Pong. Bounded: at most 400,000 frames.
    let (mut raw, _) = RawClient::hello(&j.socket);
    let mut batch = bytes::BytesMut::new();
    for nonce in 0..1000u64 {
        junction_road::codec::encode(&Frame::bare(Header::Ping { nonce }), &mut batch);
    }
    let mut cut_off = false;
    for _ in 0..400 {
        if raw.try_write_raw(&batch).is_err() {
            cut_off = true;
            break;
        }
    }
    let deadline = Instant::now() + T;
    while !cut_off && !j.log().contains("cutting off") {
        assert!(
            Instant::now() < deadline,
            "the flooding client was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(j.log().contains("does not read"), "{}", j.log());
    let r = me.call(&echo, "still served", T).await.unwrap();
    assert_eq!(&r.payload[..], b"still served");
    let grown_mib = j.rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "the junction grew by {grown_mib} MiB");
}

#[tokio::test]
async fn a_payload_over_the_limit_is_refused_before_it_leaves() {
    let j = TestJunction::start(&["--max-frame", "65536"]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let err = me.call(&echo, vec![0u8; 70_000], T).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { len: 70_000, .. }), "{err}");
    assert!(err.to_string().contains("send it in parts"), "{err}");
    // The credit it would have cost is still there, and the connection lives.
    let r = me.call(&echo, vec![1u8; 60_000], T).await.unwrap();
    assert_eq!(r.payload.len(), 60_000);
}

/// The blocking facade, from a plain thread with no runtime of its own.
#[test]
fn a_blocking_program_serves_and_calls() {
    use junction_driver::blocking;
    let j = TestJunction::start(&[]);
    let service = blocking::Driver::connect(&j.socket).unwrap();
    let mut port = service.open_port().unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).unwrap();
    service.register("t.blocking", &cap).unwrap();
    let server = std::thread::spawn(move || {
        let msg = port.recv().unwrap();
        let answer = format!("got {}", String::from_utf8_lossy(&msg.payload));
        msg.reply(answer).unwrap();
        assert!(
            port.recv_timeout(Duration::from_millis(50))
                .unwrap()
                .is_none()
        );
    });
    let client = blocking::Driver::connect(&j.socket).unwrap();
    let service_cap = client.lookup("t.blocking").unwrap();
    let reply = client.call(&service_cap, "plain", T).unwrap();
    assert_eq!(&reply.payload[..], b"got plain");
    server.join().unwrap();
}

#[tokio::test]
async fn a_port_owner_hears_when_its_last_holder_is_gone() {
    let j = TestJunction::start(&[]);
    let mut holder = j.spawn_ready(std::path::Path::new(PEER), &["holder", "t.holder"]);
    let me = Driver::connect(&j.socket).await.unwrap();
    let holder_cap = me.lookup("t.holder").await.unwrap();
    let port = me.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    me.call_with(&holder_cap, "keep this", &[&cap], T)
        .await
        .unwrap();
    drop(cap);
    me.sync().await.unwrap();
    let notice = tokio::spawn(async move { port.no_senders().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!notice.is_finished(), "the holder process still holds one");
    holder.kill();
    tokio::time::timeout(T, notice)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A peer that dribbles its Hello byte by byte holds its slot no longer than
/// one that sends nothing: the deadline covers the whole first frame.
#[test]
fn a_hello_that_never_completes_is_refused_at_the_deadline() {
    let dir = junction_tests::TempDir::new();
    let config = dir.path().join("junction.toml");
    std::fs::write(&config, "hello_timeout_ms = 400\n").unwrap();
    let j = TestJunction::start(&["--config", config.to_str().unwrap()]);

    let mut hello = bytes::BytesMut::new();
    junction_road::codec::encode(&Frame::bare(junction_tests::hello("dribbler")), &mut hello);
    let mut dribbler = RawClient::connect(&j.socket);
    // The length and a few bytes more, one at a time, each well inside the
    // deadline; then nothing (bytes written after the junction hung up
    // would make the kernel reset the connection, losing its answer).
    for byte in &hello[..6] {
        dribbler.write_raw(&[*byte]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = dribbler.recv().expect("the junction says why it hangs up");
    let Header::Error(e) = f.header else {
        panic!("expected an Error, got {:?}", f.header)
    };
    assert_eq!(e.code, ErrorCode::HandshakeRequired);
    assert!(e.message.contains("Hello"), "{}", e.message);
    assert!(dribbler.recv().is_none(), "the connection is closed");

    // A prompt client is served, before and after any deadline.
    let (mut prompt, _) = RawClient::hello(&j.socket);
    std::thread::sleep(Duration::from_millis(600));
    prompt.send(Header::Ping { nonce: 5 });
    let f = prompt.recv_until(|h| matches!(h, Header::Pong { .. }));
    assert_eq!(f.header, Header::Pong { nonce: 5 });
}

/// Dropping a port while the driver's reader is handing it messages (a
/// multi-thread runtime) credits only what the application read: every
/// other message is reported to its sender, none is lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_port_mid_delivery_credits_only_what_was_read() {
    const SENT: u32 = 300;
    const READ: u32 = 100;
    let j = TestJunction::start(&[]);
    for round in 0..10 {
        let receiver = Driver::connect(&j.socket).await.unwrap();
        let sender = Driver::connect(&j.socket).await.unwrap();
        let mut port = receiver.open_port().await.unwrap();
        let minted = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
        let name = format!("t.race{round}");
        receiver.register(&name, &minted).await.unwrap();
        drop(minted);
        let cap = sender.lookup(&name).await.unwrap();

        let sending = {
            let sender = sender.clone();
            let cap = cap.clone();
            tokio::spawn(async move {
                for i in 0..SENT {
                    sender.send(&cap, i.to_be_bytes().to_vec()).await.unwrap();
                }
            })
        };
        for _ in 0..READ {
            tokio::time::timeout(T, port.recv()).await.unwrap().unwrap();
        }
        // Messages are still arriving: the reader races this drop.
        drop(port);
        sending.await.unwrap();
        receiver.sync().await.unwrap();
        sender.sync().await.unwrap();

        let mut reported = 0;
        while let Ok(Some(notice)) =
            tokio::time::timeout(Duration::from_millis(200), sender.next_notice()).await
        {
            if let Notice::Undeliverable { handle, count, .. } = notice {
                assert_eq!(handle, cap.handle());
                reported += count;
            }
        }
        assert_eq!(
            reported,
            SENT - READ,
            "round {round}: every unread message is reported to its sender"
        );
    }
}

/// The sequence number `send` returns names the caller's own message even
/// when several tasks send on one capability at once: the receiver gets
/// messages in the Junction's sequence order, so the n-th one received must
/// be the one whose send returned n.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_on_one_capability_get_their_own_sequence_numbers() {
    const TASKS: u32 = 4;
    const EACH: u32 = 500;
    let j = TestJunction::start(&[]);
    let receiver = Driver::connect(&j.socket).await.unwrap();
    let sender = Driver::connect(&j.socket).await.unwrap();
    let mut port = receiver.open_port().await.unwrap();
    let minted = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    receiver.register("t.seqs", &minted).await.unwrap();
    let cap = sender.lookup("t.seqs").await.unwrap();

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let sender = sender.clone();
            let cap = cap.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for i in 0..EACH {
                    let id = t << 16 | i;
                    let seq = sender.send(&cap, id.to_be_bytes().to_vec()).await.unwrap();
                    sent.push((seq, id));
                }
                sent
            })
        })
        .collect();
    let mut received = Vec::new();
    for _ in 0..TASKS * EACH {
        let msg = tokio::time::timeout(T, port.recv()).await.unwrap().unwrap();
        received.push(u32::from_be_bytes(msg.payload[..].try_into().unwrap()));
    }
    let mut by_seq = vec![u32::MAX; (TASKS * EACH) as usize];
    for task in tasks {
        for (seq, id) in task.await.unwrap() {
            by_seq[seq as usize] = id;
        }
    }
    assert_eq!(received, by_seq);
}

/// Issue 7 (books that only grow): a mint, watch, drop loop leaves nothing
/// behind. Each watcher leaves with its capability, so the port's watchers
/// stay bounded by the capabilities alive.
#[test]
fn watchers_leave_with_their_capabilities() {
    let j = TestJunction::start(&[]);
    let (mut raw, _) = RawClient::hello(&j.socket);
    raw.send(Header::OpenPort { req: 1 });
    let f = raw.recv_until(|h| matches!(h, Header::PortOpened { .. }));
    let Header::PortOpened { address, .. } = f.header else {
        unreachable!()
    };
    for req in 2..2002 {
        raw.send(Header::Mint {
            req,
            port: address.port,
            rights: Rights::SEND,
        });
        let f = raw.recv_until(|h| matches!(h, Header::Minted { req: r, .. } if *r == req));
        let Header::Minted { handle, .. } = f.header else {
            unreachable!()
        };
        raw.send(Header::Watch { handle });
        // The first capability is kept, watching; the others go.
        if req > 2 {
            raw.send(Header::Drop { handle });
        }
    }
    let port = raw.port_info(address);
    assert_eq!(port.senders, 1, "one capability is left");
    assert_eq!(port.watchers, 1, "only the live capability still watches");
}

/// Issue 7, item 1: a connection that mints and looks up handle after
/// handle, sends on each until refused, and reads its socket but never
/// acknowledges, holds one window in flight at the port, not one per handle.
#[test]
fn credit_windows_do_not_multiply_with_handles() {
    let j = TestJunction::start(&["--dev-namespace", "dev.*"]);
    let (mut raw, welcome) = RawClient::hello(&j.socket);
    let (address, first) = raw.serve("dev.hoarder");
    let window = welcome.window;
    let mut handles = vec![first];
    for req in 3..43 {
        raw.send(Header::Mint {
            req,
            port: address.port,
            rights: Rights::SEND,
        });
        let f = raw.recv_until(|h| matches!(h, Header::Minted { req: r, .. } if *r == req));
        let Header::Minted { handle, .. } = f.header else {
            unreachable!()
        };
        handles.push(handle);
        let (_, caps) = raw.control(&ControlRequest::Lookup {
            name: "dev.hoarder".parse().unwrap(),
        });
        handles.extend(caps.iter().map(|g| g.handle));
    }
    assert_eq!(handles.len(), 81);
    // A full window on every handle, without waiting for any credit.
    for &handle in &handles {
        for _ in 0..window {
            raw.send(Header::Send(junction_road::Send {
                handle,
                caps: vec![],
            }));
        }
        // Dropping a handle with messages in flight must not free its
        // share either.
        raw.send(Header::Drop { handle });
    }
    let port = raw.port_info(address);
    assert_eq!(
        port.queued, window,
        "one window in flight however many handles sent"
    );
}

/// Issue 7, item 6: a service that holds its replies pins nobody. Callers
/// whose calls it holds do not fill its handle table, so others' calls
/// still reach it; and a caller that times out cancels, so its calls stop
/// counting against it.
#[tokio::test]
async fn a_service_that_holds_its_replies_pins_nobody() {
    let j = TestJunction::start(&["--dev-namespace", "dev.*"]);
    let (mut service, _) = RawClient::hello(&j.socket);
    let (address, _) = service.serve("dev.slow");

    // Four callers each make as many calls as they may; none is answered.
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let (mut raw, welcome) = RawClient::hello(&j.socket);
        let (_, caps) = raw.control(&ControlRequest::Lookup {
            name: "dev.slow".parse().unwrap(),
        });
        let mut batch = bytes::BytesMut::new();
        for tag in 1..=u64::from(welcome.max_pending_calls) {
            let call = Frame::bare(Header::Call(Call {
                handle: caps[0].handle,
                tag,
                caps: vec![],
            }));
            junction_road::codec::encode(&call, &mut batch);
        }
        raw.write_raw(&batch);
        attackers.push(raw);
    }
    // The service still has room for its own capabilities...
    service.send(Header::Mint {
        req: 3,
        port: address.port,
        rights: Rights::SEND,
    });
    let f = service.recv_until(|h| matches!(h, Header::Minted { req: 3, .. } | Header::Error(_)));
    assert!(
        matches!(f.header, Header::Minted { .. }),
        "the service's table is full: {f:?}"
    );
    // ...and a well-behaved caller is held like everyone, not refused.
    let me = Driver::connect(&j.socket).await.unwrap();
    let slow = me.lookup("dev.slow").await.unwrap();
    for _ in 0..3 {
        match me.call(&slow, "hello?", Duration::from_millis(200)).await {
            Err(Error::Timeout(_)) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    // Its timeouts cancelled its calls: none counts as pending.
    let deadline = Instant::now() + T;
    loop {
        let listing = me.listing().await.unwrap();
        let mine = listing
            .connections
            .iter()
            .find(|c| c.home == me.home())
            .expect("listed");
        if mine.pending_calls == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled calls still pending: {}",
            mine.pending_calls
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(attackers);
}

/// `junction ls` on a junction linked to another by a Highway (QUIC on
/// loopback) shows the HIGHWAY, ROUTE and SESSION tables, and `--json`
/// their arrays; a lone junction shows none of the three.
#[tokio::test]
async fn ls_shows_highways_routes_and_sessions() {
    let lone = TestJunction::start(&[]);
    let out = lone.command(&["ls"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for table in ["HIGHWAY", "ROUTE", "SESSION"] {
        assert!(!text.contains(table), "{text}");
    }

    let pki = TestPki::new();
    for id in ["1", "2"] {
        let name = format!("junction-{id}");
        pki.issue(
            &name,
            &name,
            "authority",
            &["--role", "junction", "--junction-id", id],
        );
    }
    let path = |file: &str| pki.path(file).to_str().unwrap().to_string();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let (authority, key2, cert2) = (
        path("authority.cert"),
        path("junction-2.key"),
        path("junction-2.cert"),
    );
    let j2 = TestJunction::start(&[
        "--junction-id",
        "2",
        "--authority",
        &authority,
        "--junction-key",
        &key2,
        "--junction-cert",
        &cert2,
        "--quic-listen",
        &listen,
    ]);
    let (key1, cert1, peer) = (
        path("junction-1.key"),
        path("junction-1.cert"),
        format!("2@{listen}"),
    );
    let j1 = TestJunction::start(&[
        "--junction-id",
        "1",
        "--authority",
        &authority,
        "--junction-key",
        &key1,
        "--junction-cert",
        &cert1,
        "--peer",
        &peer,
    ]);
    let _echo = junction_tests::Proc::spawn(&mut j2.command(&["echo", "--name", "t.echo"]));
    // A call from junction 1 to the echo on junction 2 makes a session.
    let me = Driver::connect(&j1.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let reply = me.call(&echo, "ping", T).await.unwrap();
    assert_eq!(&reply.payload[..], b"ping");

    let out = j1.command(&["ls"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = |table: &str| -> Vec<String> {
        let mut lines = text.lines().skip_while(|l| !l.starts_with(table));
        assert!(lines.next().is_some(), "no {table} table: {text}");
        let row = lines.next().unwrap_or_default();
        row.split_whitespace().map(str::to_string).collect()
    };
    let highway = row("HIGHWAY ");
    assert_eq!(highway[..2], ["j2", "up"], "{text}");
    assert_eq!(highway.last().unwrap(), &listen, "{text}");
    let route = row("ROUTE ");
    assert_eq!(route[..3], ["j2", "j2", "1"], "{text}");
    let session = row("SESSION ");
    assert_eq!(session[..2], ["j2", "direct"], "neighbours: {text}");
    assert_eq!(session[6], "1", "one import: {text}");

    let out = j1.command(&["ls", "--json"]).output().unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    for want in [
        r#""highways":[{"#,
        r#""state":"up""#,
        r#""path":[2]"#,
        r#""sealing":"direct""#,
    ] {
        assert!(json.contains(want), "{want} in {json}");
    }
}
