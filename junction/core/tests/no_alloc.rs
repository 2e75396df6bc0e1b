//! The steady forwarding path allocates nothing per message: a counting
//! allocator watches the core route sends and credits, and the outbox encode
//! and hand over frames, after a warm-up.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use junction_core::{Config, ConnId, Core, Now, Output, Peer};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest};
use junction_road::outbox::Outbox;
use junction_road::{Call, Frame, Header, Hello, MAGIC, PROTOCOL_VERSION, Rights, Send};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

#[test]
fn forwarding_allocates_nothing_per_message() {
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

    let payload = Bytes::from_static(&[7; 64]);
    let mut outbox = Outbox::new();
    let mut batch = std::collections::VecDeque::new();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut round = |core: &mut Core, outbox: &mut Outbox| {
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
        core.feed(
            receiver,
            Frame::bare(Header::Credit {
                port: address.port,
                count: 8,
            }),
        );
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
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10_000 {
        round(&mut core, &mut outbox);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    // 80,000 messages and 10,000 credit reports went through.
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 80,000 forwarded messages"
    );
}
