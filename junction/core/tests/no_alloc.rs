//! The steady forwarding path allocates nothing per message: a counting
//! allocator watches the core route sends and credits, and the outbox encode
//! and hand over frames, after a warm-up.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use junction_core::{Config, ConnId, Core, Now, Output, Peer};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest};
use junction_road::highway::{HighwayFrame, Hops};
use junction_road::outbox::Outbox;
use junction_road::{Call, Frame, Header, Hello, MAGIC, PROTOCOL_VERSION, Rights, Send};

struct Counting;

thread_local! {
    /// Allocations made by this thread: the test harness's own (printing
    /// another test's result meanwhile) are not the core's.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests count allocations process-wide: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn drain(core: &mut Core) -> Vec<(ConnId, Frame)> {
    let mut out = Vec::new();
    while let Some(o) = core.poll_output() {
        if let Output::Frame { conn, frame } = o {
            out.push((conn, frame));
        }
    }
    out
}

/// One fixed moment: time plays no part here.
fn now() -> Now {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    Now::new(*START.get_or_init(std::time::Instant::now), 1_000)
}

/// Hands the core a frame at [`now`].
trait Feed {
    fn feed(&mut self, conn: ConnId, frame: Frame);
}

impl Feed for Core {
    fn feed(&mut self, conn: ConnId, frame: Frame) {
        self.handle_frame(conn, frame, now());
    }
}

fn connect(core: &mut Core) -> ConnId {
    let conn = core.handle_connected(Peer::default(), now());
    core.feed(
        conn,
        Frame::bare(Header::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            max_frame: 1 << 20,
            label: "alloc".into(),
        })),
    );
    drain(core);
    conn
}

fn control(core: &mut Core, conn: ConnId, request: ControlRequest, caps: Vec<u32>) -> Vec<u32> {
    let payload = Bytes::from(postcard::to_allocvec(&request).unwrap());
    core.feed(
        conn,
        Frame::with_payload(
            Header::Call(Call {
                handle: CONTROL_HANDLE,
                tag: 1,
                caps,
            }),
            payload,
        ),
    );
    let out = drain(core);
    let Header::Deliver(d) = &out[0].1.header else {
        panic!("{out:?}")
    };
    let reply: ControlReply = postcard::from_bytes(&out[0].1.payload).unwrap();
    assert!(!matches!(reply, ControlReply::Refused { .. }), "{reply:?}");
    core.feed(
        conn,
        Frame::bare(Header::Credit {
            port: d.port,
            count: 1,
        }),
    );
    drain(core);
    d.caps.iter().map(|g| g.handle).collect()
}

/// A core with a sender holding a capability to a receiver's registered
/// port: the sender, the receiver, the capability and the port number.
fn local_pair() -> (Core, ConnId, ConnId, u32, u16) {
    let mut core = Core::new(
        Config {
            dev_namespace: vec!["alloc.*".parse().unwrap()],
            ..Config::default()
        },
        now(),
    );
    let sender = connect(&mut core);
    let receiver = connect(&mut core);
    core.feed(receiver, Frame::bare(Header::OpenPort { req: 1 }));
    let Header::PortOpened { address, .. } = drain(&mut core).remove(0).1.header else {
        panic!()
    };
    core.feed(
        receiver,
        Frame::bare(Header::Mint {
            req: 2,
            port: address.port,
            rights: Rights::SEND | Rights::GRANT,
        }),
    );
    let Header::Minted { handle, .. } = drain(&mut core).remove(0).1.header else {
        panic!()
    };
    control(
        &mut core,
        receiver,
        ControlRequest::Register {
            name: "alloc.test".parse().unwrap(),
        },
        vec![handle],
    );
    let cap = control(
        &mut core,
        sender,
        ControlRequest::Lookup {
            name: "alloc.test".parse().unwrap(),
        },
        vec![],
    )[0];
    (core, sender, receiver, cap, address.port)
}

/// A transit junction (2) between junctions 1 and 3.
fn transit() -> Core {
    let mut core = Core::new(
        Config {
            junction: 2,
            ..Config::default()
        },
        now(),
    );
    core.handle_highway_up(1, 1, now());
    core.handle_highway_up(3, 1, now());
    while core.poll_output().is_some() {}
    core
}

/// Junction 1's traffic for junction 3, as it reaches junction 2.
fn pass(core: &mut Core, payload: &Bytes) {
    core.handle_highway_frame(
        1,
        HighwayFrame::Forward {
            from: 1,
            to: 3,
            route: Hops::new(&[2, 3]).expect("a short route"),
        },
        payload.clone(),
        now(),
    );
}

/// Eight sends from the sender, and the receiver's credit for them.
fn eight_local(
    core: &mut Core,
    sender: ConnId,
    receiver: ConnId,
    cap: u32,
    port: u16,
    payload: &Bytes,
) {
    for _ in 0..8 {
        core.feed(
            sender,
            Frame::with_payload(
                Header::Send(Send {
                    handle: cap,
                    caps: Vec::new(),
                }),
                payload.clone(),
            ),
        );
    }
    core.feed(receiver, Frame::bare(Header::Credit { port, count: 8 }));
}

#[test]
fn forwarding_allocates_nothing_per_message() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut core, sender, receiver, cap, port) = local_pair();
    let payload = Bytes::from_static(&[7; 64]);
    let mut outbox = Outbox::new();
    let mut batch = std::collections::VecDeque::new();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut round = |core: &mut Core, outbox: &mut Outbox| {
        eight_local(core, sender, receiver, cap, port, &payload);
        while let Some(out) = core.poll_output() {
            if let Output::Frame { frame, .. } = out {
                outbox.push_quiet(&frame.header, &frame.payload);
            }
        }
        let _ = outbox.poll_take(&mut cx, &mut batch);
        batch.clear();
    };
    for _ in 0..1000 {
        round(&mut core, &mut outbox);
    }
    let before = allocations();
    for _ in 0..10_000 {
        round(&mut core, &mut outbox);
    }
    let allocations = allocations() - before;
    // 80,000 messages and 10,000 credit reports went through.
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 80,000 forwarded messages"
    );
}

/// A transit junction passes traffic between two others on without
/// allocating: the route travels in the frame, the payload by reference.
#[test]
fn passing_traffic_on_allocates_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut core = transit();
    let payload = Bytes::from_static(&[7; 64]);
    let round = |core: &mut Core| {
        for _ in 0..8 {
            pass(core, &payload);
        }
        let mut passed = 0;
        while let Some(out) = core.poll_output() {
            assert!(matches!(out, Output::Highway { to: 3, .. }), "{out:?}");
            passed += 1;
        }
        assert_eq!(passed, 8);
    };
    for _ in 0..1000 {
        round(&mut core);
    }
    let before = allocations();
    for _ in 0..10_000 {
        round(&mut core);
    }
    let allocations = allocations() - before;
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 80,000 messages passed on"
    );
}

/// Issue 8's speed goal: a hop (a transit junction passing traffic on) costs
/// the core no more than twice what forwarding a message between two local
/// connections does. A measurement, not an assertion: run it by hand.
#[test]
#[ignore = "a measurement: cargo test --release -p junction-core --test no_alloc -- --ignored --nocapture"]
fn a_hop_costs_what_local_forwarding_costs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const ROUNDS: usize = 200_000;
    let payload = Bytes::from_static(&[7; 64]);
    let (mut core, sender, receiver, cap, port) = local_pair();
    let mut transit = transit();
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            eight_local(&mut core, sender, receiver, cap, port, &payload);
            while core.poll_output().is_some() {}
        }
        let local = started.elapsed().as_nanos() as f64 / (ROUNDS * 8) as f64;
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            for _ in 0..8 {
                pass(&mut transit, &payload);
            }
            while transit.poll_output().is_some() {}
        }
        let hop = started.elapsed().as_nanos() as f64 / (ROUNDS * 8) as f64;
        best = (best.0.min(local), best.1.min(hop));
    }
    println!(
        "local forwarding {:.0} ns/message (send, deliver, credit back); a hop {:.0} ns/message; hop / local = {:.2}",
        best.0,
        best.1,
        best.1 / best.0
    );
}
