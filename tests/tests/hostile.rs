//! Hostile and heavy peers against a real `junction serve` over real
//! sockets: many senders bursting at one receiver, connections that stop
//! reading and half-close, a connection that floods. Each test asserts
//! outcomes (nobody innocent cut off, everything delivered, memory given
//! back), never durations; every load loop is bounded.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use junction_driver::{Driver, Rights};
use junction_road::control::ControlRequest;
use junction_road::{Call, Frame, Header, codec};
use junction_tests::{RawClient, TestJunction};

/// How long a call may take on a machine shared with other builds.
const T: Duration = Duration::from_secs(60);
/// How long an outcome may take to show before the test gives up.
const PATIENCE: Duration = Duration::from_secs(60);

async fn lookup_eventually(driver: &Driver, name: &str) -> junction_driver::Capability {
    junction_tests::lookup_eventually(driver, name, PATIENCE).await
}

/// A message that says who sent it and its place in that sender's order.
fn numbered(sender: usize, seq: u32, len: usize) -> Bytes {
    let mut payload = vec![0x5a; len];
    payload[..8].copy_from_slice(&(sender as u64).to_be_bytes());
    payload[8..12].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(payload)
}

fn number_of(payload: &[u8]) -> (usize, u32) {
    let sender = u64::from_be_bytes(payload[..8].try_into().unwrap());
    let seq = u32::from_be_bytes(payload[8..12].try_into().unwrap());
    (sender as usize, seq)
}

/// Registers `t.sink`, then reads `total` messages as fast as it can,
/// checking each sender's order; returns the driver once all arrived.
/// The port and its capability go back with the driver: dropping the port
/// would give up the name.
async fn sink(
    j: &TestJunction,
    senders: usize,
    total: usize,
) -> tokio::task::JoinHandle<(Driver, junction_driver::Port, junction_driver::Capability)> {
    let driver = Driver::connect(&j.socket).await.unwrap();
    let mut port = driver.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    driver.register("t.sink", &cap).await.unwrap();
    tokio::spawn(async move {
        let mut next = vec![0u32; senders];
        for n in 0..total {
            let msg = match port.recv().await {
                Ok(msg) => msg,
                Err(e) => panic!("the receiver lost its port after {n} of {total} messages: {e}"),
            };
            let (sender, seq) = number_of(&msg.payload);
            assert_eq!(seq, next[sender], "sender {sender}'s messages out of order");
            next[sender] += 1;
        }
        (driver, port, cap)
    })
}

/// After a burst: the receiver was not cut off and still holds its name.
async fn assert_receiver_kept(j: &TestJunction, receiver: &Driver) {
    assert!(!receiver.is_closed(), "the receiver was cut off");
    receiver
        .lookup("t.sink")
        .await
        .expect("t.sink is still registered");
    assert!(
        !j.log().contains("cutting off"),
        "someone was cut off: {}",
        j.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_bursting_at_a_reader_slow_down_and_never_cut_it_off() {
    const SENDERS: usize = 100;
    const EACH: u32 = 100;
    const LEN: usize = 16 * 1024;
    // A 32 MiB high-water mark: 100 senders × 100 × 16 KiB (160 MiB) is
    // five times more than the receiver may have queued.
    let j = TestJunction::start(&["--max-unread", "33554432"]);
    let receiver = sink(&j, SENDERS, SENDERS * EACH as usize).await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let socket = j.socket.clone();
        senders.push(tokio::spawn(async move {
            let d = Driver::connect(&socket).await.unwrap();
            let to = lookup_eventually(&d, "t.sink").await;
            for seq in 0..EACH {
                d.send(&to, numbered(i, seq, LEN)).await.unwrap();
            }
            d
        }));
    }
    let mut keep = Vec::new();
    for s in senders {
        keep.push(s.await.expect("a sender failed"));
    }
    let (receiver, _port, _cap) = receiver
        .await
        .expect("the receiver got everything, in order");
    assert_receiver_kept(&j, &receiver).await;
    let hwm_mib = j.hwm_kib() / 1024;
    eprintln!("junction VmHWM {hwm_mib} MiB");
    assert!(hwm_mib < 160, "the junction reached {hwm_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_with_eighty_lookups_and_4_mb_messages_never_cuts_off_a_reader() {
    const LOOKUPS: usize = 80;
    const ROUNDS: u32 = 2;
    const LEN: usize = 4 * 1024 * 1024 - 4096;
    let j = TestJunction::start(&["--max-unread", "33554432"]);
    let receiver = sink(&j, 1, LOOKUPS * ROUNDS as usize).await;
    let me = Driver::connect(&j.socket).await.unwrap();
    let mut caps = Vec::new();
    for _ in 0..LOOKUPS {
        caps.push(lookup_eventually(&me, "t.sink").await);
    }
    let mut seq = 0;
    for _ in 0..ROUNDS {
        for cap in &caps {
            me.send(cap, numbered(0, seq, LEN)).await.unwrap();
            seq += 1;
        }
    }
    let (receiver, _port, _cap) = receiver
        .await
        .expect("the receiver got everything, in order");
    assert_receiver_kept(&j, &receiver).await;
    let hwm_mib = j.hwm_kib() / 1024;
    eprintln!("junction VmHWM {hwm_mib} MiB");
    assert!(hwm_mib < 400, "the junction reached {hwm_mib} MiB");
}

/// Asks `t.echo` for `calls` replies of `len` bytes each, reading none.
fn ask_for_replies_and_read_none(raw: &mut RawClient, echo: u32, calls: u64, len: usize) {
    let payload = Bytes::from(vec![0xabu8; len]);
    for tag in 1..=calls {
        let mut out = BytesMut::new();
        codec::encode(
            &Frame::with_payload(
                Header::Call(Call {
                    handle: echo,
                    tag: 1000 + tag,
                    caps: vec![],
                }),
                payload.clone(),
            ),
            &mut out,
        );
        // The junction may pause this connection while the echo service
        // catches up; a write that stays blocked ends the asking.
        if raw.try_write_raw(&out).is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn stuck_and_half_closed_writers_are_given_up_and_their_memory_freed() {
    const CONNS: usize = 20;
    const CALLS: u64 = 12;
    const LEN: usize = 1 << 20;
    // The echo service is sent 240 MiB of calls: on a loaded machine it may
    // not read for a moment, and it must not be taken for a stuck peer.
    let j = TestJunction::start(&["--max-unread", "67108864", "--write-timeout-ms", "3000"]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;
    let before = j.rss_kib();

    // Each asks for 12 MiB of replies, below the mark, and reads none.
    let mut raws = Vec::new();
    for _ in 0..CONNS {
        let (mut raw, _) = RawClient::hello(&j.socket);
        let (_, found) = raw.control(&ControlRequest::Lookup {
            name: "t.echo".parse().unwrap(),
        });
        ask_for_replies_and_read_none(&mut raw, found[0].handle, CALLS, LEN);
        raws.push(raw);
    }
    // Wait (bounded) until a third of the replies sit in the junction for
    // them, or (on a slow machine) the deadline has begun to give them up.
    let offered = (CONNS as u64 * CALLS * LEN as u64) >> 10;
    let deadline = Instant::now() + PATIENCE;
    while j.rss_kib().saturating_sub(before) < offered / 3 && !j.log().contains("does not read") {
        assert!(
            Instant::now() < deadline,
            "the replies never piled up: {} MiB grown\n{}",
            j.rss_kib().saturating_sub(before) >> 10,
            j.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Half of them half-close, the other half send a zero-length frame;
    // none reads a byte.
    for (i, raw) in raws.iter_mut().enumerate() {
        if i % 2 == 0 {
            raw.socket().shutdown(Shutdown::Write).unwrap();
        } else {
            let _ = raw.try_write_raw(&[0, 0, 0, 0]);
        }
    }
    // The most the junction held: what the stuck writers piled up.
    let piled_mib = j.hwm_kib().saturating_sub(before) >> 10;
    // Most of it comes back (the read-buffer pool and the allocator keep
    // some); a writer that is never given up would hold its share for good.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let grown_mib = j.rss_kib().saturating_sub(before) >> 10;
        if grown_mib < piled_mib / 3 + 16 {
            eprintln!(
                "{piled_mib} MiB piled up for stuck writers; {grown_mib} MiB left; {} given up",
                j.log().matches("does not read").count()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the junction still holds {grown_mib} MiB for stuck writers (of {piled_mib} MiB)\n{}",
            j.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A well-behaved pair is served as before.
    let r = me.call(&echo, "still served", T).await.unwrap();
    assert_eq!(&r.payload[..], b"still served");
    drop(raws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_connection_gets_its_turn_and_not_the_whole_junction() {
    let j = TestJunction::start(&[]);
    let _echo = junction_tests::Proc::spawn(&mut j.command(&["echo", "--name", "t.echo"]));
    let me = Driver::connect(&j.socket).await.unwrap();
    let echo = lookup_eventually(&me, "t.echo").await;

    // A client that sends Pings as fast as it can (2,000,000 of them) and
    // reads its Pongs, so nothing but its share of the thread holds it back.
    let (raw, _) = RawClient::hello(&j.socket);
    let mut writer = raw.socket().try_clone().unwrap();
    let mut reader = raw.socket().try_clone().unwrap();
    reader.set_read_timeout(None).unwrap();
    let flood = std::thread::spawn(move || {
        let mut batch = BytesMut::new();
        for nonce in 0..4000u64 {
            codec::encode(&Frame::bare(Header::Ping { nonce }), &mut batch);
        }
        for _ in 0..500 {
            if writer.write_all(&batch).is_err() {
                return false;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
        true
    });
    let drain = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut chunk), Ok(n) if n > 0) {}
    });

    // Meanwhile, a well-behaved pair's calls complete.
    let mut during = 0;
    for i in 0..50 {
        let text = format!("call {i}");
        let r = me.call(&echo, text.clone(), T).await.unwrap();
        assert_eq!(r.payload, Bytes::from(text));
        if !flood.is_finished() {
            during += 1;
        }
    }
    eprintln!("{during} of 50 calls completed while the flood ran");
    // An order of events, not a duration: with turns, the pair's calls go
    // through between the flooder's turns long before its 2,000,000 Pings
    // are done (the junction without turns served 6 of 50 meanwhile).
    assert!(
        during >= 25,
        "only {during} of 50 calls completed while the flood ran"
    );
    assert!(flood.join().unwrap(), "the flooder was cut off");
    drain.join().unwrap();
    drop(raw);
}
