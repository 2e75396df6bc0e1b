//! Capabilities across junctions, in the deterministic simulation: real
//! cores and real driver state machines on several junctions joined by
//! simulated Highways, a fake clock, every run seeded (`JUNCTION_SIM_SEED`
//! replays one). A service registers on one junction; a client on another,
//! one or two hops away, finds it by name, calls it, passes capabilities
//! both ways, and hears of revocation, expiry, death and no-senders as a
//! local client would.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use junction_core::Config;
use junction_driver::machine::{Event, Machine};
use std::sync::Arc;

use junction_identity::{
    CapabilityToken, CertBody, Certificate, Role, SecretKey, TokenBody, TrustStore,
    prove_possession,
};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest};
use junction_road::highway::HighwayFrame;
use junction_road::remote::{self, RemoteFrame, RemotePort, RemoteSend};
use junction_road::secure::{self, Envelope};
use junction_road::session::{self, SessionFrame};
use junction_road::{Address, ErrorCode, Frame, Reason, Rights};
use junction_tests::sim::{Ctx, Latency, Process, Rng, World, seed_from_env};

/// A process: the real driver state machine, and what it heard.
struct Proc {
    machine: Machine,
    events: Vec<Event>,
}

impl Proc {
    fn new(label: &str) -> Self {
        Self {
            machine: Machine::new(label.into(), junction_road::DEFAULT_MAX_FRAME),
            events: Vec::new(),
        }
    }
}

impl Process for Proc {
    fn poll_transmit(&mut self) -> Option<Frame> {
        self.machine.poll_transmit()
    }
    fn handle_frame(&mut self, frame: Frame, _ctx: &mut Ctx<'_>) {
        self.machine.handle_frame(frame);
        while let Some(event) = self.machine.poll_event() {
            self.events.push(event);
        }
    }
    fn handle_road_closed(&mut self, _ctx: &mut Ctx<'_>) {
        self.machine.handle_road_closed("closed".into());
    }
}

fn wan() -> Latency {
    Latency {
        min: Duration::from_millis(1),
        max: Duration::from_millis(10),
    }
}

/// Junctions 1..=n (node i is junction i + 1) of a development bus:
/// unsigned routing, names under `dev.` without certificates.
fn bus(seed: u64, n: u16) -> World<Proc> {
    let configs = (1..=n)
        .map(|junction| Config {
            junction,
            incarnation: 1,
            trust_unsigned_routing: true,
            dev_namespace: vec!["dev.*".parse().unwrap()],
            ..Config::default()
        })
        .collect();
    World::with_junctions(seed, configs)
}

/// Three junctions in a line: 1 - 2 - 3.
fn line(seed: u64) -> World<Proc> {
    let mut world = bus(seed, 3);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world
}

/// Runs the world for five simulated seconds: long enough for anything in
/// flight to arrive, short of expiries and of the sessions' deadlines.
fn run(world: &mut World<Proc>) {
    let until = world.elapsed() + Duration::from_secs(5);
    world.run_until(until).unwrap();
}

/// A service on junction 3 registered as `name`, and a client on junction
/// 1 that looked it up: ((server pid, its port), (client pid, its handle)).
fn served(world: &mut World<Proc>, name: &str) -> ((usize, u16), (usize, u32)) {
    let server = service(world, 2, name);
    let client = attach(world, 0, "client");
    let (handle, _) = lookup(world, client, name).unwrap();
    (server, (client, handle))
}

/// The events `pid` heard since last asked.
fn take(world: &mut World<Proc>, pid: usize) -> Vec<Event> {
    world
        .act(pid, |p, _| std::mem::take(&mut p.events))
        .unwrap_or_default()
}

/// A process on `node`, welcomed.
fn attach(world: &mut World<Proc>, node: usize, label: &str) -> usize {
    let pid = world.add_process(node, Proc::new(label));
    run(world);
    let events = take(world, pid);
    assert!(
        matches!(events.first(), Some(Event::Welcomed(_))),
        "{events:?}"
    );
    pid
}

/// Opens a port on `pid`; its number.
fn open_port(world: &mut World<Proc>, pid: usize) -> u16 {
    world.act(pid, |p, _| p.machine.open_port().unwrap());
    run(world);
    match take(world, pid).as_slice() {
        [Event::PortOpened { address, .. }] => address.port,
        other => panic!("{other:?}"),
    }
}

/// Mints a capability to `port` of `pid`; its handle.
fn mint(world: &mut World<Proc>, pid: usize, port: u16, rights: Rights) -> u32 {
    world.act(pid, |p, _| p.machine.mint(port, rights).unwrap());
    run(world);
    match take(world, pid).as_slice() {
        [Event::Minted { handle, .. }] => *handle,
        other => panic!("{other:?}"),
    }
}

/// A control call from `pid`; the reply and the capabilities it carried.
fn control(
    world: &mut World<Proc>,
    pid: usize,
    request: &ControlRequest,
    caps: &[u32],
) -> (ControlReply, Vec<junction_road::Granted>) {
    let payload = Bytes::from(postcard::to_allocvec(request).unwrap());
    world.act(pid, |p, _| {
        p.machine.call(CONTROL_HANDLE, caps, payload).unwrap()
    });
    run(world);
    let events = take(world, pid);
    let replied = events.iter().find_map(|e| match e {
        Event::Replied {
            deliver, payload, ..
        } => Some((
            postcard::from_bytes::<ControlReply>(payload).unwrap(),
            deliver.caps.clone(),
        )),
        _ => None,
    });
    replied.unwrap_or_else(|| panic!("no reply to {request:?}: {events:?}"))
}

/// A service on `node` registered as `name`: its pid and port.
fn service(world: &mut World<Proc>, node: usize, name: &str) -> (usize, u16) {
    let pid = attach(world, node, name);
    let port = open_port(world, pid);
    let handle = mint(world, pid, port, Rights::SEND | Rights::GRANT);
    let register = ControlRequest::Register {
        name: name.parse().unwrap(),
    };
    let (reply, _) = control(world, pid, &register, &[handle]);
    assert_eq!(reply, ControlReply::Registered);
    // Routing announces the name to the other junctions.
    run(world);
    (pid, port)
}

/// Looks `name` up from `pid`: the handle and the address it reaches.
fn lookup(world: &mut World<Proc>, pid: usize, name: &str) -> Result<(u32, Address), String> {
    let request = ControlRequest::Lookup {
        name: name.parse().unwrap(),
    };
    match control(world, pid, &request, &[]) {
        (ControlReply::Found { address, .. }, caps) => {
            assert_eq!(caps.len(), 1);
            assert_eq!(caps[0].address, address);
            Ok((caps[0].handle, address))
        }
        (ControlReply::Refused { message, .. }, _) => Err(message),
        other => panic!("{other:?}"),
    }
}

/// The messages `pid` received, read at once: (header, payload).
fn deliveries(events: &[Event]) -> Vec<(junction_road::Deliver, Bytes)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Delivered { deliver, payload } => Some((deliver.clone(), payload.clone())),
            _ => None,
        })
        .collect()
}

/// `pid` reads everything delivered to `port`.
fn read_all(
    world: &mut World<Proc>,
    pid: usize,
    port: u16,
    delivered: &[(junction_road::Deliver, Bytes)],
) {
    world.act(pid, |p, _| {
        for (d, payload) in delivered {
            if d.port == port {
                p.machine.read(port, payload.len(), false);
            }
        }
    });
}

#[test]
fn a_call_crosses_two_junctions_and_its_reply_comes_back() {
    let mut world = line(seed_from_env(81));
    run(&mut world);
    let (server, port) = service(&mut world, 2, "dev.echo");
    let client = attach(&mut world, 0, "client");
    let (handle, address) = lookup(&mut world, client, "dev.echo").unwrap();
    assert_eq!(
        address,
        Address::new(3, port),
        "the real address, on junction 3"
    );

    let tag = world
        .act(client, |p, _| {
            p.machine
                .call(handle, &[], Bytes::from_static(b"ping"))
                .unwrap()
        })
        .unwrap();
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    assert_eq!(got.len(), 1);
    let (deliver, payload) = &got[0];
    assert_eq!(&payload[..], b"ping");
    assert_eq!(deliver.origin.junction, 1, "the caller's junction, stamped");
    let reply = deliver.reply.expect("a call carries a reply capability");
    world.act(server, |p, _| {
        p.machine.read(port, 4, false);
        p.machine
            .reply(reply, &[], Bytes::from_static(b"pong"))
            .unwrap();
    });
    run(&mut world);
    let events = take(&mut world, client);
    let replied = events.iter().find_map(|e| match e {
        Event::Replied {
            tag: t, payload, ..
        } if *t == tag => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(replied.as_deref(), Some(&b"pong"[..]), "{events:?}");
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

#[test]
fn a_name_nobody_registered_is_not_found_anywhere() {
    let mut world = line(seed_from_env(82));
    run(&mut world);
    let client = attach(&mut world, 0, "client");
    let e = lookup(&mut world, client, "dev.nobody").unwrap_err();
    assert!(e.contains("dev.nobody"), "{e}");
}

#[test]
fn capabilities_pass_both_ways_between_junctions() {
    let mut world = line(seed_from_env(83));
    run(&mut world);
    let ((server, sport), (client, to_server)) = served(&mut world, "dev.store");
    // The client passes a capability to a port of its own.
    let cport = open_port(&mut world, client);
    let mine = mint(&mut world, client, cport, Rights::SEND | Rights::GRANT);
    world.act(client, |p, _| {
        p.machine
            .send(to_server, &[mine], Bytes::from_static(b"here"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    assert_eq!(got.len(), 1);
    let granted = got[0].0.caps[0];
    assert_eq!(granted.address, Address::new(1, cport));
    read_all(&mut world, server, sport, &got);
    // The server uses it: the message reaches the client's port, from the
    // server's home on junction 3.
    world.act(server, |p, _| {
        p.machine
            .send(granted.handle, &[], Bytes::from_static(b"back"))
            .unwrap()
    });
    run(&mut world);
    let back = deliveries(&take(&mut world, client));
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(&back[0].1[..], b"back");
    assert_eq!(back[0].0.port, cport);
    assert_eq!(back[0].0.origin.junction, 3);

    // The client passes two capabilities to its port; the server sends
    // on one carrying the other: it comes home, and the client holds a
    // capability to its own port again, which works here.
    let second = mint(&mut world, client, cport, Rights::SEND | Rights::GRANT);
    world.act(client, |p, _| {
        p.machine
            .send(to_server, &[second], Bytes::from_static(b"another"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    let other = got[0].0.caps[0];
    read_all(&mut world, server, sport, &got);
    world.act(server, |p, _| {
        p.machine
            .send(
                granted.handle,
                &[other.handle],
                Bytes::from_static(b"yours"),
            )
            .unwrap()
    });
    run(&mut world);
    let back = deliveries(&take(&mut world, client));
    assert_eq!(back.len(), 1);
    let home = back[0].0.caps[0];
    assert_eq!(home.address, Address::new(1, cport), "home again");
    read_all(&mut world, client, cport, &back);
    world.act(client, |p, _| {
        p.machine
            .send(home.handle, &[], Bytes::from_static(b"local"))
            .unwrap()
    });
    run(&mut world);
    let local = deliveries(&take(&mut world, client));
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].0.origin.junction, 1);
    read_all(&mut world, client, cport, &local);

    // A capability to a port on junction 3 cannot go on to junction 2:
    // refused with a reason, and nothing else changes.
    let (_, _) = service(&mut world, 1, "dev.middle");
    let (to_middle, _) = lookup(&mut world, client, "dev.middle").unwrap();
    world.act(client, |p, _| {
        p.machine
            .send(to_middle, &[to_server], Bytes::from_static(b"third"))
            .unwrap()
    });
    run(&mut world);
    let events = take(&mut world, client);
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Notice { code: ErrorCode::MissingRight, message, .. }
                if message.contains("junction 3"))),
        "{events:?}"
    );
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

#[test]
fn a_service_death_reaches_callers_on_other_junctions() {
    let mut world = line(seed_from_env(84));
    run(&mut world);
    let ((server, port), (client, handle)) = served(&mut world, "dev.mortal");
    world.act(client, |p, _| p.machine.watch(handle).unwrap());
    // A call in flight when the port closes fails.
    let tag = world
        .act(client, |p, _| {
            p.machine
                .call(handle, &[], Bytes::from_static(b"?"))
                .unwrap()
        })
        .unwrap();
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 1);
    world.act(server, |p, _| p.machine.close_port(port));
    run(&mut world);
    let events = take(&mut world, client);
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Dead { handle: h, reason: Reason::PortClosed } if *h == handle)
        ),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::CallFailed { tag: t, .. } if *t == tag)),
        "{events:?}"
    );
    // Sending on it now is refused at once, with the reason.
    world.act(client, |p, _| {
        let _ = p.machine.send(handle, &[], Bytes::from_static(b"late"));
    });
    run(&mut world);
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

#[test]
fn no_senders_waits_for_every_junction_to_release() {
    let mut world = line(seed_from_env(85));
    run(&mut world);
    let (server, port) = service(&mut world, 2, "dev.lonely");
    // The registration holds a sender itself; unregister so that only
    // remote holders count.
    let client = attach(&mut world, 0, "client");
    let (handle, _) = lookup(&mut world, client, "dev.lonely").unwrap();
    watch_remote_senders(&mut world, server, port, "dev.lonely");
    run(&mut world);
    assert!(
        !take(&mut world, server)
            .iter()
            .any(|e| matches!(e, Event::NoSenders { .. })),
        "junction 1 still holds a capability"
    );
    world.act(client, |p, _| p.machine.drop_capability(handle));
    run(&mut world);
    let events = take(&mut world, server);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::NoSenders { port: p } if *p == port)),
        "{events:?}"
    );
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// `server` gives up its own hold on `port` (its name and its handles) and
/// watches for the moment no capability to it is left anywhere.
fn watch_remote_senders(world: &mut World<Proc>, server: usize, port: u16, name: &str) {
    let unregister = ControlRequest::Unregister {
        name: name.parse().unwrap(),
    };
    let (reply, _) = control(world, server, &unregister, &[]);
    assert_eq!(reply, ControlReply::Unregistered);
    world.act(server, |p, _| {
        for h in p.machine_handles() {
            p.machine.drop_capability(h);
        }
        p.machine.watch_senders(port).unwrap()
    });
}

impl Proc {
    /// Handles the application holds, but the control capability.
    fn machine_handles(&self) -> Vec<u32> {
        (1..64)
            .flat_map(|slot| (0..4).map(move |generation| (generation << 16) | slot))
            .filter(|&h| self.machine.capability(h).is_some())
            .collect()
    }
}

/// Attenuates `handle` of `pid`; the new handle.
fn attenuate(
    world: &mut World<Proc>,
    pid: usize,
    handle: u32,
    expires_at: Option<u64>,
    max_messages: Option<u32>,
    revocable: bool,
) -> u32 {
    world.act(pid, |p, _| {
        p.machine
            .attenuate(
                handle,
                Rights::SEND | Rights::GRANT,
                expires_at,
                max_messages,
                revocable,
            )
            .unwrap()
    });
    run(world);
    match take(world, pid).as_slice() {
        [Event::Minted { handle, .. }] => *handle,
        other => panic!("{other:?}"),
    }
}

/// Whether `events` say `handle` died of `reason`.
fn died(events: &[Event], handle: u32, reason: Reason) -> bool {
    events.iter().any(|e| {
        matches!(e, Event::Dead { handle: h, reason: r } if *h == handle && *r == reason)
            || matches!(e, Event::Undeliverable { handle: h, reason: r, .. } if *h == handle && *r == reason)
    })
}

/// Capabilities that junction 1 grants junction 3 keep every limit they
/// were granted with: junction 1 checks each use, so revoking, expiring
/// or spending a capability on junction 1 ends it on junction 3, and
/// nothing gets through after.
#[test]
fn revocation_expiry_and_budgets_reach_across_junctions() {
    let mut world = line(seed_from_env(86));
    run(&mut world);
    let (server, sport) = service(&mut world, 2, "dev.front");
    let owner = attach(&mut world, 0, "owner");
    let (front, _) = lookup(&mut world, owner, "dev.front").unwrap();
    let oport = open_port(&mut world, owner);
    let cap = mint(&mut world, owner, oport, Rights::SEND | Rights::GRANT);
    let revocable = attenuate(&mut world, owner, cap, None, None, true);
    let soon = world.now().unix + 3600;
    let expiring = attenuate(&mut world, owner, cap, Some(soon), None, false);
    let budgeted = attenuate(&mut world, owner, cap, None, Some(2), false);
    world.act(owner, |p, _| {
        p.machine
            .send(
                front,
                &[revocable, expiring, budgeted],
                Bytes::from_static(b"three"),
            )
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    let [r, e, b] = got[0].0.caps[..] else {
        panic!("{got:?}");
    };
    read_all(&mut world, server, sport, &got);
    world.act(server, |p, _| {
        for g in [r, e, b] {
            p.machine.watch(g.handle).unwrap();
            p.machine
                .send(g.handle, &[], Bytes::from_static(b"works"))
                .unwrap();
        }
    });
    run(&mut world);
    let arrived = deliveries(&take(&mut world, owner));
    assert_eq!(
        arrived.len(),
        3,
        "each works before: {:?}",
        take(&mut world, server)
    );
    read_all(&mut world, owner, oport, &arrived);

    // Revoked on junction 1: dead on junction 3.
    world.act(owner, |p, _| p.machine.revoke(revocable).unwrap());
    run(&mut world);
    let events = take(&mut world, server);
    assert!(died(&events, r.handle, Reason::Revoked), "{events:?}");
    world.act(server, |p, _| {
        let _ = p.machine.send(r.handle, &[], Bytes::from_static(b"late"));
    });
    run(&mut world);
    assert!(deliveries(&take(&mut world, owner)).is_empty());

    // The budget of 2: one more message, then it is spent.
    world.act(server, |p, _| {
        let _ = p.machine.send(b.handle, &[], Bytes::from_static(b"last"));
    });
    run(&mut world);
    let events = take(&mut world, server);
    assert!(died(&events, b.handle, Reason::Exhausted), "{events:?}");
    let arrived = deliveries(&take(&mut world, owner));
    assert_eq!(arrived.len(), 1, "the last of the budget arrives");
    read_all(&mut world, owner, oport, &arrived);
    world.act(server, |p, _| {
        let _ = p.machine.send(b.handle, &[], Bytes::from_static(b"over"));
    });
    run(&mut world);
    assert!(deliveries(&take(&mut world, owner)).is_empty());

    // Expired after its hour, junction 1's clock deciding.
    let later = world.elapsed() + Duration::from_secs(3601);
    world.run_until(later).unwrap();
    run(&mut world);
    let events = take(&mut world, server);
    assert!(died(&events, e.handle, Reason::Expired), "{events:?}");
    world.act(server, |p, _| {
        let _ = p.machine.send(e.handle, &[], Bytes::from_static(b"stale"));
    });
    run(&mut world);
    assert!(deliveries(&take(&mut world, owner)).is_empty());
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// A junction that was never granted a port reaches nothing, whatever it
/// names: a forged export, a real export granted to another junction, or a
/// capability "coming home" that it never held.
#[test]
fn a_junction_never_given_a_capability_reaches_no_port() {
    let mut world = line(seed_from_env(87));
    run(&mut world);
    let ((server, port), (client, handle)) = served(&mut world, "dev.vault");
    // The client's grant is export e on junction 3; junction 2 (transit,
    // never granted anything) names it, and other exports, directly.
    world.act(client, |p, _| {
        p.machine
            .send(handle, &[], Bytes::from_static(b"ok"))
            .unwrap()
    });
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 1);
    let refused = world.core_mut(2).remote_refusals();
    for export in 0..8u32 {
        for generation in 0..2 {
            let forged = RemoteFrame::Send(RemoteSend {
                port: RemotePort {
                    port,
                    generation,
                    export: (export & 0xFF) | (generation << 16),
                },
                n: 0,
                origin: Address::new(2, 1),
                identity: None,
                call: 0,
                ack: false,
                caps: vec![],
            });
            let bytes = remote::to_bytes(&forged, b"stolen");
            world
                .junction_send(1, 3, remote::data_lane(port), bytes)
                .unwrap();
        }
    }
    run(&mut world);
    assert!(
        deliveries(&take(&mut world, server)).is_empty(),
        "nothing from junction 2 arrives"
    );
    // Those naming the live port are refused; the others name a port
    // generation that never lived, and are answered that it is dead.
    assert_eq!(
        world.core_mut(2).remote_refusals(),
        refused + 8,
        "each refused"
    );
    let _ = ErrorCode::MissingRight;
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// A slow receiver on junction 3 holds back its sender on junction 1 by
/// credit, end to end, and nothing else: the same sender's flow to another
/// port on junction 3 goes on, and credit comes back as the slow receiver
/// reads.
#[test]
fn a_slow_receiver_slows_its_remote_sender_and_nothing_else() {
    let mut world = line(seed_from_env(88));
    run(&mut world);
    let (slow, slow_port) = service(&mut world, 2, "dev.slow");
    let (fast, fast_port) = service(&mut world, 2, "dev.fast");
    let client = attach(&mut world, 0, "client");
    let (to_slow, _) = lookup(&mut world, client, "dev.slow").unwrap();
    let (to_fast, _) = lookup(&mut world, client, "dev.fast").unwrap();
    // Send until the driver has no credit left for the slow port.
    let mut sent = 0u32;
    loop {
        let r = world
            .act(client, |p, _| {
                p.machine.send(to_slow, &[], Bytes::from_static(b"m"))
            })
            .unwrap();
        match r {
            Ok(_) => sent += 1,
            Err(e) => {
                assert!(e.to_string().contains("credit"), "{e}");
                break;
            }
        }
        assert!(sent <= 100_000, "credit never ran out");
        if sent.is_multiple_of(256) {
            run(&mut world);
        }
    }
    run(&mut world);
    let held = deliveries(&take(&mut world, slow));
    assert_eq!(held.len() as u32, sent, "everything sent arrives, unread");
    // The other flow is not held up.
    world.act(client, |p, _| {
        p.machine
            .send(to_fast, &[], Bytes::from_static(b"f"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, fast));
    assert_eq!(got.len(), 1);
    read_all(&mut world, fast, fast_port, &got);
    // The slow receiver reads: credit comes back across the junctions.
    read_all(&mut world, slow, slow_port, &held);
    run(&mut world);
    let events = take(&mut world, client);
    assert!(
        events.iter().any(|e| matches!(e, Event::SendCredit { .. })),
        "{events:?}"
    );
    world.act(client, |p, _| {
        p.machine
            .send(to_slow, &[], Bytes::from_static(b"again"))
            .unwrap()
    });
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, slow)).len(), 1);
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// Numbered messages from junction 1 to a service on junction 3 while the
/// Highway they travel is cut: the session resends them over the other
/// way, and every one arrives once, in order.
#[test]
fn a_cut_link_mid_stream_loses_and_repeats_nothing() {
    let mut world = bus(seed_from_env(89), 3);
    world.add_link(0, 1, 1, wan());
    let bc = world.add_link(1, 2, 1, wan());
    world.add_link(0, 2, 5, wan());
    run(&mut world);
    let ((server, port), (client, to_server)) = served(&mut world, "dev.sink");
    let mut received = Vec::new();
    for i in 0u32..600 {
        world.act(client, |p, _| {
            p.machine
                .send(to_server, &[], Bytes::from(i.to_be_bytes().to_vec()))
                .unwrap()
        });
        if i == 300 {
            world.cut_link(bc);
        }
        if i.is_multiple_of(50) {
            let until = world.elapsed() + Duration::from_millis(3);
            world.run_until(until).unwrap();
            let got = deliveries(&take(&mut world, server));
            read_all(&mut world, server, port, &got);
            received.extend(got);
        }
    }
    for _ in 0..4 {
        run(&mut world);
        let got = deliveries(&take(&mut world, server));
        read_all(&mut world, server, port, &got);
        received.extend(got);
    }
    let numbers: Vec<u32> = received
        .iter()
        .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect();
    assert_eq!(numbers, (0..600).collect::<Vec<_>>());
    let events = take(&mut world, client);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Undeliverable { .. })),
        "{events:?}"
    );
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// Junction 3 cut off from the bus: a call in flight to it fails, once
/// the session's deadline passes, with a reason that says its fate is
/// unknown; junction 3 keeps what it exported to junction 1 through the
/// partition (the lease), so its no-senders notice does not fire early.
#[test]
fn a_partition_fails_calls_as_unknown_and_keeps_exports_for_the_lease() {
    let mut world = line(seed_from_env(90));
    let bc = 1;
    run(&mut world);
    let ((server, port), (client, handle)) = served(&mut world, "dev.far");
    watch_remote_senders(&mut world, server, port, "dev.far");
    world.cut_link(bc);
    run(&mut world);
    let tag = world
        .act(client, |p, _| {
            p.machine
                .call(handle, &[], Bytes::from_static(b"?"))
                .unwrap()
        })
        .unwrap();
    let until = world.elapsed() + Duration::from_secs(40);
    world.run_until(until).unwrap();
    let events = take(&mut world, client);
    assert!(
        events.iter().any(|e| matches!(e,
            Event::CallFailed { tag: t, reason: Reason::JunctionUnreachable } if *t == tag)),
        "{events:?}"
    );
    assert!(
        !take(&mut world, server)
            .iter()
            .any(|e| matches!(e, Event::NoSenders { .. })),
        "junction 1's capability still counts during the partition"
    );
    // Past the lease, junction 1's grant is released.
    let until = world.elapsed() + Duration::from_secs(700);
    world.run_until(until).unwrap();
    let events = take(&mut world, server);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::NoSenders { port: p } if *p == port)),
        "{events:?}"
    );
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// A bus whose authority certifies services: junctions 1..=3 in a line,
/// each trusting it, junction 2 run by an operator who lets anyone
/// register any `org.` name without a certificate.
fn signed_line(seed: u64) -> (World<Proc>, SecretKey) {
    let authority = SecretKey::generate().unwrap();
    let own = Certificate::authority(&authority, 1, 0, u64::MAX).unwrap();
    let mut trust = TrustStore::new();
    trust.add_authority(&own).unwrap();
    let configs = (1..=3)
        .map(|junction| Config {
            junction,
            incarnation: 1,
            trust: trust.clone(),
            trust_unsigned_routing: true,
            dev_namespace: if junction == 2 {
                vec!["org.*".parse().unwrap()]
            } else {
                vec![]
            },
            ..Config::default()
        })
        .collect();
    let mut world = World::with_junctions(seed, configs);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    (world, authority)
}

/// A service's key and chain for `names`, from `authority`.
fn service_identity(authority: &SecretKey, names: &[&str]) -> (SecretKey, Vec<Certificate>) {
    let key = SecretKey::generate().unwrap();
    let cert = Certificate::issue(
        CertBody {
            version: 1,
            serial: 77,
            subject: key.public(),
            role: Role::Service {
                names: names.iter().map(|n| n.parse().unwrap()).collect(),
            },
            not_before: 0,
            not_after: u64::MAX,
            issuer: authority.public(),
        },
        authority,
    )
    .unwrap();
    (key, vec![cert])
}

/// A name proven on junction 3 is found from junction 1 with its chain,
/// which junction 1 checks: it grants the name, and the service proved
/// its key to junction 3. A junction that lets anyone register the name
/// without a certificate (junction 2, nearer) cannot serve it to others.
#[test]
fn a_lookup_across_junctions_checks_the_chain_and_the_proof() {
    let (mut world, authority) = signed_line(seed_from_env(91));
    run(&mut world);
    let (key, chain) = service_identity(&authority, &["org.acme.echo"]);
    let server = attach(&mut world, 2, "echo");
    let proof = prove_possession(&key, &[0; 32], 3);
    let (reply, _) = control(
        &mut world,
        server,
        &ControlRequest::Authenticate {
            chain: chain.clone(),
            proof,
        },
        &[],
    );
    assert!(matches!(reply, ControlReply::Authenticated(_)), "{reply:?}");
    let port = open_port(&mut world, server);
    let handle = mint(&mut world, server, port, Rights::SEND | Rights::GRANT);
    let (reply, _) = control(
        &mut world,
        server,
        &ControlRequest::Register {
            name: "org.acme.echo".parse().unwrap(),
        },
        &[handle],
    );
    assert_eq!(reply, ControlReply::Registered);
    run(&mut world);
    let client = attach(&mut world, 0, "client");
    let request = ControlRequest::Lookup {
        name: "org.acme.echo".parse().unwrap(),
    };
    match control(&mut world, client, &request, &[]) {
        (
            ControlReply::Found {
                address,
                chain: got,
            },
            caps,
        ) => {
            assert_eq!(address, Address::new(3, port));
            assert_eq!(got, Some(chain));
            assert_eq!(caps.len(), 1);
        }
        other => panic!("{other:?}"),
    }

    // An impostor registers the same name on junction 2, which allows it
    // without a certificate; junction 1 now asks junction 2 (nearer) and
    // refuses its answer.
    let impostor = attach(&mut world, 1, "impostor");
    let iport = open_port(&mut world, impostor);
    let ihandle = mint(&mut world, impostor, iport, Rights::SEND | Rights::GRANT);
    let (reply, _) = control(
        &mut world,
        impostor,
        &ControlRequest::Register {
            name: "org.acme.echo".parse().unwrap(),
        },
        &[ihandle],
    );
    assert_eq!(reply, ControlReply::Registered);
    run(&mut world);
    match control(&mut world, client, &request, &[]) {
        (ControlReply::Refused { code, message }, caps) => {
            assert_eq!(code, ErrorCode::NameNotFound);
            assert!(message.contains("junction 2"), "{message}");
            assert!(caps.is_empty());
        }
        other => panic!("the impostor was believed: {other:?}"),
    }
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// What one client sent on one capability: the numbers, in order, and
/// which of them its junction reported undeliverable, and why.
#[derive(Default)]
struct Flow {
    sent: Vec<u32>,
    /// Sequence number of each sent message, as the driver numbered it.
    seqs: Vec<u64>,
    told: Vec<(u64, u32, Reason)>,
}

/// Random buses of 2 to 8 junctions, services on some, clients on others
/// finding them by name and sending numbered messages, while Highways are
/// cut and healed at random. Once healed and quiet: every message arrived
/// at most once, in order per capability, and every one that did not
/// arrive was reported to its sender; a report that says a message was not
/// consumed is never wrong; and when every client has dropped what it
/// held, no junction keeps anything of it.
#[test]
fn capabilities_keep_the_delivery_contract_over_random_buses() {
    junction_tests::sim::for_seeds(2_000, 24, random_bus);
}

fn random_bus(seed: u64) {
    let mut rng = junction_tests::sim::Rng::new(seed ^ 0xCAFE);
    let n = 2 + rng.below(7) as usize;
    let mut world = bus(seed, n as u16);
    let mut links = Vec::new();
    // A spanning tree, so that everyone starts connected, and a few more.
    for node in 1..n {
        let other = rng.index(node);
        links.push(world.add_link(node, other, 1 + rng.below(3) as u32, wan()));
    }
    for _ in 0..rng.below(n as u64) {
        let (a, b) = (rng.index(n), rng.index(n));
        if a != b {
            links.push(world.add_link(a, b, 1 + rng.below(3) as u32, wan()));
        }
    }
    run(&mut world);
    let services: Vec<(usize, u16, String)> = (0..1 + rng.below(3))
        .map(|i| {
            let name = format!("dev.s{i}");
            let (pid, port) = service(&mut world, rng.index(n), &name);
            (pid, port, name)
        })
        .collect();
    let clients: Vec<usize> = (0..1 + rng.below(4))
        .map(|i| attach(&mut world, rng.index(n), &format!("c{i}")))
        .collect();
    // Each client's capability: its handle and flow record, by client.
    let mut held: Vec<Option<(u32, usize)>> = vec![None; clients.len()];
    let mut flows: Vec<(usize, u32, Flow)> = Vec::new();
    let mut received: Vec<Vec<(u16, u32)>> = vec![Vec::new(); services.len()];
    let mut counter = 0u32;
    let mut cut = Vec::new();
    for round in 0..120 {
        let c = rng.index(clients.len());
        let pid = clients[c];
        if held[c].is_none() {
            let s = rng.index(services.len());
            if let Ok((handle, _)) = lookup(&mut world, pid, &services[s].2) {
                flows.push((c, handle, Flow::default()));
                held[c] = Some((handle, flows.len() - 1));
            }
        }
        if let Some((handle, f)) = held[c] {
            for _ in 0..1 + rng.below(8) {
                counter += 1;
                let mut payload = (c as u16).to_be_bytes().to_vec();
                payload.extend(counter.to_be_bytes());
                let sent = world
                    .act(pid, |p, _| {
                        p.machine.send(handle, &[], Bytes::from(payload))
                    })
                    .unwrap();
                match sent {
                    Ok(seq) => {
                        flows[f].2.sent.push(counter);
                        flows[f].2.seqs.push(seq);
                    }
                    Err(_) => break,
                }
            }
        }
        if rng.chance(15) && !links.is_empty() {
            let l = links[rng.index(links.len())];
            if cut.contains(&l) {
                world.heal_link(l);
                cut.retain(|&x| x != l);
            } else {
                world.cut_link(l);
                cut.push(l);
            }
        }
        let until = world.elapsed() + Duration::from_millis(1 + rng.below(400));
        world.run_until(until).unwrap();
        if round % 7 == 0 {
            // Now and then a long partition outlasts the sessions' deadline.
            let until = world.elapsed() + Duration::from_secs(rng.below(45));
            world.run_until(until).unwrap();
        }
        drain(&mut world, &services, &mut received, false);
        record_reports(&mut world, &clients, &mut held, &mut flows);
    }
    for l in cut {
        world.heal_link(l);
    }
    for round in 0..20 {
        if round == 10 {
            // A last message on every capability still held, read and
            // reported at once, so that every earlier read is reported
            // too (a driver reports reads in batches).
            for (c, &pid) in clients.iter().enumerate() {
                let Some((handle, f)) = held[c] else {
                    continue;
                };
                counter += 1;
                let mut payload = (c as u16).to_be_bytes().to_vec();
                payload.extend(counter.to_be_bytes());
                let sent = world
                    .act(pid, |p, _| {
                        p.machine.send(handle, &[], Bytes::from(payload))
                    })
                    .unwrap();
                if let Ok(seq) = sent {
                    flows[f].2.sent.push(counter);
                    flows[f].2.seqs.push(seq);
                }
            }
        }
        run(&mut world);
        drain(&mut world, &services, &mut received, true);
        record_reports(&mut world, &clients, &mut held, &mut flows);
    }

    // The contract.
    let mut arrived: std::collections::BTreeMap<u32, usize> = Default::default();
    for list in &received {
        for &(_, number) in list {
            *arrived.entry(number).or_default() += 1;
        }
    }
    for (number, times) in &arrived {
        assert_eq!(*times, 1, "message {number} arrived {times} times");
    }
    for (c, _, flow) in &flows {
        let got: Vec<u32> = received
            .iter()
            .flatten()
            .filter(|&&(client, number)| usize::from(client) == *c && flow.sent.contains(&number))
            .map(|&(_, number)| number)
            .collect();
        // Within one service's stream order holds; a flow goes to one.
        for list in &received {
            let in_this: Vec<u32> = list
                .iter()
                .filter(|&&(client, number)| {
                    usize::from(client) == *c && flow.sent.contains(&number)
                })
                .map(|&(_, number)| number)
                .collect();
            assert!(
                in_this.windows(2).all(|w| w[0] < w[1]),
                "client {c}'s flow arrived out of order: {in_this:?}"
            );
        }
        for (i, &number) in flow.sent.iter().enumerate() {
            let seq = flow.seqs[i];
            let report = flow
                .told
                .iter()
                .find(|&&(first, count, _)| seq >= first && seq < first + u64::from(count));
            match (arrived.contains_key(&number), report) {
                (true, None) | (false, Some(_)) => {}
                (true, Some(&(_, _, reason))) => assert_eq!(
                    reason,
                    Reason::JunctionUnreachable,
                    "message {number} arrived but was reported {reason:?}"
                ),
                (false, None) => panic!("message {number} of client {c} vanished untold"),
            }
        }
        let _ = got;
    }

    // Everyone lets go.
    for &pid in &clients {
        world.act(pid, |p, _| {
            for h in p.machine_handles() {
                p.machine.drop_capability(h);
            }
        });
    }
    for _ in 0..4 {
        run(&mut world);
        drain(&mut world, &services, &mut received, true);
    }
    // The services stop (reporting what they read): nothing of any of
    // this stays on any junction.
    for &(pid, port, _) in &services {
        world.act(pid, |p, _| p.machine.close_port(port));
    }
    for _ in 0..4 {
        run(&mut world);
    }
    for node in 0..n {
        world.core_mut(node).check_invariants().unwrap();
    }
    for node in 0..n {
        let remote = world.core_mut(node).footprint().remote;
        assert_eq!(remote, 0, "junction {} keeps remote entries", node + 1);
    }
}

/// Services read everything delivered to them, and note it.
/// With `flush`, they report what they read at once rather than in
/// batches, so that senders hear of every consumption.
fn drain(
    world: &mut World<Proc>,
    services: &[(usize, u16, String)],
    received: &mut [Vec<(u16, u32)>],
    flush: bool,
) {
    for (i, &(pid, port, _)) in services.iter().enumerate() {
        let got = deliveries(&take(world, pid));
        for (_, payload) in &got {
            let client = u16::from_be_bytes(payload[..2].try_into().unwrap());
            let number = u32::from_be_bytes(payload[2..6].try_into().unwrap());
            received[i].push((client, number));
        }
        world.act(pid, |p, _| {
            for (_, payload) in &got {
                p.machine.read(port, payload.len(), flush);
            }
        });
    }
}

/// Clients note what their junction reported undeliverable, and drop a
/// capability that died (to look the name up again).
fn record_reports(
    world: &mut World<Proc>,
    clients: &[usize],
    held: &mut [Option<(u32, usize)>],
    flows: &mut [(usize, u32, Flow)],
) {
    for (c, &pid) in clients.iter().enumerate() {
        for event in take(world, pid) {
            match event {
                Event::Undeliverable {
                    handle,
                    first_seq,
                    count,
                    reason,
                    ..
                } => {
                    // The newest flow of this client on that handle.
                    if let Some((_, _, flow)) = flows
                        .iter_mut()
                        .rev()
                        .find(|(client, h, _)| *client == c && *h == handle)
                    {
                        flow.told.push((first_seq, count, reason));
                    }
                }
                Event::Dead { handle, .. } if held[c].is_some_and(|(h, _)| h == handle) => {
                    world.act(pid, |p, _| p.machine.drop_capability(handle));
                    held[c] = None;
                }
                _ => {}
            }
        }
    }
}

/// Junction 3 restarts (a new incarnation): junction 1 ends what it shared
/// with the earlier life: the capability dies, the message in flight is
/// reported not consumed, the call fails, each with `JunctionRestarted`.
#[test]
fn a_restarted_junction_ends_what_others_held_of_it() {
    let mut world = line(seed_from_env(92));
    run(&mut world);
    let ((server, _), (client, handle)) = served(&mut world, "dev.phoenix");
    world.act(client, |p, _| {
        p.machine.watch(handle).unwrap();
        p.machine
            .send(handle, &[], Bytes::from_static(b"unread"))
            .unwrap()
    });
    let tag = world
        .act(client, |p, _| {
            p.machine
                .call(handle, &[], Bytes::from_static(b"?"))
                .unwrap()
        })
        .unwrap();
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 2);
    // Junction 3 dies with its service and comes back as a new life.
    world.crash(server);
    world.cut_link(1);
    let mut config = world.core_mut(2).config().clone();
    config.incarnation += 1;
    let now = world.now();
    *world.core_mut(2) = junction_core::Core::new(config, now);
    world.heal_link(1);
    run(&mut world);
    let events = take(&mut world, client);
    assert!(
        died(&events, handle, Reason::JunctionRestarted),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Undeliverable { handle: h, reason: Reason::JunctionRestarted, .. } if *h == handle)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            Event::CallFailed { tag: t, reason: Reason::JunctionRestarted } if *t == tag)),
        "{events:?}"
    );
    // The name is gone with it.
    assert!(lookup(&mut world, client, "dev.phoenix").is_err());
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// Junctions 1..=3 in a line, each with a key its bus's authority
/// certified for its id (so they seal their routes and sign tokens), and
/// the development namespace `dev.`; and the keys, by junction id - 1.
fn keyed_line(seed: u64) -> (World<Proc>, Vec<Arc<SecretKey>>) {
    let authority = SecretKey::generate().unwrap();
    let own = Certificate::authority(&authority, 1, 0, u64::MAX).unwrap();
    let mut trust = TrustStore::new();
    trust.add_authority(&own).unwrap();
    let mut keys = Vec::new();
    let configs = (1..=3u16)
        .map(|junction| {
            let key = SecretKey::generate().unwrap();
            let cert = Certificate::issue(
                CertBody {
                    version: 1,
                    serial: u64::from(junction),
                    subject: key.public(),
                    role: Role::Junction { id: junction },
                    not_before: 0,
                    not_after: u64::MAX,
                    issuer: authority.public(),
                },
                &authority,
            )
            .unwrap();
            let key = Arc::new(key);
            keys.push(key.clone());
            Config {
                junction,
                incarnation: 1,
                trust: trust.clone(),
                junction_identity: Some((key, vec![cert])),
                dev_namespace: vec!["dev.*".parse().unwrap()],
                ..Config::default()
            }
        })
        .collect();
    let mut world = World::with_junctions(seed, configs);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    (world, keys)
}

/// Junction 1 holds a capability to a port on junction 3 and passes it to
/// a service on junction 2: it travels as junction 3's token, delegated
/// by junction 1, which junction 2 opens with junction 3. The service on
/// junction 2 then reaches junction 3's port in its own name, and keeps
/// it after junction 1 has let go; when junction 3's service revokes what
/// it granted, the capability dies on junction 2 too.
#[test]
fn a_capability_passes_on_to_a_third_junction_as_a_delegated_token() {
    let (mut world, _keys) = keyed_line(seed_from_env(93));
    run(&mut world);
    let (c_pid, c_port) = service(&mut world, 2, "dev.c");
    let (b_pid, b_port) = service(&mut world, 1, "dev.b");
    let client = attach(&mut world, 0, "client");
    let (to_c, _) = lookup(&mut world, client, "dev.c").unwrap();
    let (to_b, _) = lookup(&mut world, client, "dev.b").unwrap();

    // Junction 3's service hands the client a revocable capability to a
    // port of its own.
    let inbox = open_port(&mut world, client);
    let to_inbox = mint(&mut world, client, inbox, Rights::SEND | Rights::GRANT);
    world.act(client, |p, _| {
        p.machine
            .send(to_c, &[to_inbox], Bytes::from_static(b"inbox"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, c_pid));
    let back = got[0].0.caps[0];
    read_all(&mut world, c_pid, c_port, &got);
    let granted_port = open_port(&mut world, c_pid);
    let root = mint(
        &mut world,
        c_pid,
        granted_port,
        Rights::SEND | Rights::GRANT,
    );
    let revocable = attenuate(&mut world, c_pid, root, None, None, true);
    world.act(c_pid, |p, _| {
        p.machine
            .send(back.handle, &[revocable], Bytes::from_static(b"for you"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, client));
    let from_c = got[0].0.caps[0];
    assert_eq!(from_c.address, Address::new(3, granted_port));
    read_all(&mut world, client, inbox, &got);

    // The client passes it on to junction 2's service.
    world.act(client, |p, _| {
        p.machine
            .send(to_b, &[from_c.handle], Bytes::from_static(b"use this"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, b_pid));
    assert_eq!(got.len(), 1);
    let passed = got[0].0.caps[0];
    assert_eq!(passed.address, Address::new(3, granted_port));
    read_all(&mut world, b_pid, b_port, &got);
    world.act(b_pid, |p, _| {
        p.machine.watch(passed.handle).unwrap();
        p.machine
            .send(passed.handle, &[], Bytes::from_static(b"from b"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, c_pid));
    assert_eq!(got.len(), 1, "junction 2 reaches junction 3's port");
    assert_eq!(got[0].0.origin.junction, 2, "in its own name");
    read_all(&mut world, c_pid, granted_port, &got);

    // The client lets go of everything; junction 2 keeps its own export.
    world.act(client, |p, _| {
        for h in p.machine_handles() {
            p.machine.drop_capability(h);
        }
    });
    let until = world.elapsed() + Duration::from_secs(90);
    world.run_until(until).unwrap();
    world.act(b_pid, |p, _| {
        p.machine
            .send(passed.handle, &[], Bytes::from_static(b"still"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, c_pid));
    assert_eq!(
        got.len(),
        1,
        "junction 2's capability outlives junction 1's"
    );
    read_all(&mut world, c_pid, granted_port, &got);

    // Junction 3's service revokes what it granted: dead on junction 2.
    world.act(c_pid, |p, _| p.machine.revoke(revocable).unwrap());
    run(&mut world);
    let events = take(&mut world, b_pid);
    assert!(died(&events, passed.handle, Reason::Revoked), "{events:?}");
    world.act(b_pid, |p, _| {
        let _ = p
            .machine
            .send(passed.handle, &[], Bytes::from_static(b"after"));
    });
    run(&mut world);
    assert!(deliveries(&take(&mut world, c_pid)).is_empty());
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// A token is good only for the junction it was delegated to: another
/// junction presenting it (one that saw it, say) gets nothing.
#[test]
fn a_token_presented_by_another_junction_opens_nothing() {
    let (mut world, keys) = keyed_line(seed_from_env(94));
    run(&mut world);
    let (_c_pid, c_port) = service(&mut world, 2, "dev.c");
    let client = attach(&mut world, 0, "client");
    let (_to_c, _) = lookup(&mut world, client, "dev.c").unwrap();
    // Junction 3's token for junction 1, delegated by junction 1 to 2;
    // junction 1 presents it itself.
    let token = CapabilityToken::issue(
        TokenBody {
            owner: 3,
            port: c_port,
            generation: 0,
            export: 0,
            rights: (Rights::SEND | Rights::GRANT).bits(),
            holder: 1,
            expires_at: u64::MAX,
            serial: 1,
            budget: None,
        },
        &keys[2],
    )
    .delegate(&keys[0], 2, Rights::SEND.bits(), u64::MAX)
    .unwrap();
    let refused = world.core_mut(2).remote_refusals();
    let open = RemoteFrame::Open {
        open: 7,
        token: token.clone(),
    };
    world
        .junction_send(
            0,
            3,
            remote::control_lane(c_port),
            remote::to_bytes(&open, b""),
        )
        .unwrap();
    run(&mut world);
    assert_eq!(world.core_mut(2).remote_refusals(), refused + 1, "refused");
    // The junction it was delegated to opens it (and, not having asked,
    // gives the grant back at once).
    let open = RemoteFrame::Open { open: 8, token };
    world
        .junction_send(
            1,
            3,
            remote::control_lane(c_port),
            remote::to_bytes(&open, b""),
        )
        .unwrap();
    run(&mut world);
    assert_eq!(world.core_mut(2).remote_refusals(), refused + 1, "taken");
    for node in 0..3 {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// Random buses where a service on one junction grants clients on others
/// revocable and expiring capabilities to its port, and revokes them at
/// random moments while the clients keep sending and Highways are cut and
/// healed: once the service's junction has taken the revocation, or the
/// expiry has come by its clock, not one more message on that capability
/// is delivered, wherever it was sent from.
#[test]
fn no_capability_works_after_revocation_or_expiry_over_random_buses() {
    junction_tests::sim::for_seeds(3_000, 16, revoking_bus);
}

fn revoking_bus(seed: u64) {
    let mut rng = junction_tests::sim::Rng::new(seed ^ 0xDEAD);
    let n = 2 + rng.below(5) as usize;
    let mut world = bus(seed, n as u16);
    let mut links = Vec::new();
    for node in 1..n {
        let other = rng.index(node);
        links.push(world.add_link(node, other, 1, wan()));
    }
    run(&mut world);
    let owner_node = rng.index(n);
    let (owner, port) = service(&mut world, owner_node, "dev.owner");
    let root = mint(&mut world, owner, port, Rights::SEND | Rights::GRANT);
    // Each client registers a port of its own; the owner finds it and
    // sends it a revocable and an expiring capability to its port.
    struct Client {
        pid: usize,
        /// (handle, kind): 0 revocable, 1 expiring.
        caps: Vec<(u32, u8)>,
    }
    let mut clients = Vec::new();
    // (client, kind) -> (owner's handle to revoke, expiry)
    let mut granted: Vec<(usize, u8, u32, Option<u64>)> = Vec::new();
    for i in 0..1 + rng.below(3) as usize {
        let node = rng.index(n);
        let name = format!("dev.client{i}");
        let (pid, inbox) = service(&mut world, node, &name);
        let (to_client, _) = lookup(&mut world, owner, &name).unwrap();
        let revocable = attenuate(&mut world, owner, root, None, None, true);
        let at = world.now().unix + 5 + rng.below(60);
        let expiring = attenuate(&mut world, owner, root, Some(at), None, false);
        world.act(owner, |p, _| {
            p.machine
                .send(
                    to_client,
                    &[revocable, expiring],
                    Bytes::from_static(b"caps"),
                )
                .unwrap()
        });
        run(&mut world);
        let got = deliveries(&take(&mut world, pid));
        let caps = vec![(got[0].0.caps[0].handle, 0), (got[0].0.caps[1].handle, 1)];
        read_all(&mut world, pid, inbox, &got);
        granted.push((i, 0, revocable, None));
        granted.push((i, 1, expiring, Some(at)));
        clients.push(Client { pid, caps });
    }
    let start = world.trace().len();
    let mut revoked_at: Vec<Option<usize>> = vec![None; clients.len()];
    let mut cut = Vec::new();
    for round in 0..150u32 {
        for (i, c) in clients.iter().enumerate() {
            for &(handle, kind) in &c.caps {
                let mut payload = vec![i as u8, kind];
                payload.extend(round.to_be_bytes());
                world.act(c.pid, |p, _| {
                    let _ = p.machine.send(handle, &[], Bytes::from(payload));
                });
            }
        }
        if rng.chance(4) {
            let i = rng.index(clients.len());
            if revoked_at[i].is_none() {
                let &(_, _, handle, _) = granted.iter().find(|g| g.0 == i && g.1 == 0).unwrap();
                world.act(owner, |p, _| p.machine.revoke(handle).unwrap());
                revoked_at[i] = Some(i);
            }
        }
        if rng.chance(10) && !links.is_empty() {
            let l = links[rng.index(links.len())];
            if cut.contains(&l) {
                world.heal_link(l);
                cut.retain(|&x| x != l);
            } else {
                world.cut_link(l);
                cut.push(l);
            }
        }
        let until = world.elapsed() + Duration::from_millis(50 + rng.below(900));
        world.run_until(until).unwrap();
        let got = deliveries(&take(&mut world, owner));
        read_all(&mut world, owner, port, &got);
        for c in &clients {
            let _ = take(&mut world, c.pid);
        }
    }
    // The owner's junction's record: when it took each revocation, and
    // every message it delivered after.
    let trace = &world.trace()[start..];
    let mut revoked: Vec<Option<usize>> = vec![None; clients.len()];
    let mut delivered = 0;
    for (index, entry) in trace.iter().enumerate() {
        match &entry.what {
            junction_tests::sim::Traced::CoreIn { node, frame, .. } if *node == owner_node => {
                if let junction_road::Header::Revoke { handle } = frame.header
                    && let Some(g) = granted.iter().find(|g| g.2 == handle)
                {
                    revoked[g.0].get_or_insert(index);
                }
            }
            junction_tests::sim::Traced::CoreOut { node, frame, .. } if *node == owner_node => {
                let junction_road::Header::Deliver(d) = &frame.header else {
                    continue;
                };
                if d.port != port || frame.payload.len() != 6 {
                    continue;
                }
                delivered += 1;
                let (client, kind) = (usize::from(frame.payload[0]), frame.payload[1]);
                if kind == 0 {
                    assert!(
                        revoked[client].is_none_or(|at| index < at),
                        "a message on client {client}'s revoked capability was delivered after the revocation"
                    );
                } else {
                    let expiry = granted
                        .iter()
                        .find(|g| g.0 == client && g.1 == 1)
                        .and_then(|g| g.3)
                        .unwrap();
                    assert!(
                        entry.unix < expiry,
                        "a message on client {client}'s expired capability was delivered at {} (expiry {expiry})",
                        entry.unix
                    );
                }
            }
            _ => {}
        }
    }
    assert!(delivered > 0, "the capabilities worked before");
    for node in 0..n {
        world.core_mut(node).check_invariants().unwrap();
    }
}

/// A remote frame that hostile junction `me` makes up, and the lane it
/// sends it on: every kind of frame, looking up `name`, naming the port
/// `port` or a few others,
/// with generations, exports, message numbers, calls and requests drawn
/// from small ranges (so that they hit what the other junctions really
/// hold) or anywhere, on the right lane or a wrong one.
fn hostile_frame(rng: &mut Rng, me: u16, port: u16, name: &str) -> (u32, Bytes) {
    fn small_or_any(rng: &mut Rng, small: u64) -> u64 {
        if rng.chance(80) {
            rng.below(small)
        } else {
            rng.next_u64()
        }
    }
    let remote_port = |rng: &mut Rng| {
        let generation = rng.below(3) as u32;
        RemotePort {
            port: if rng.chance(70) {
                port
            } else {
                rng.below(8) as u16
            },
            generation,
            export: if rng.chance(80) {
                rng.below(8) as u32 | ((rng.below(2) as u32) << 16)
            } else {
                rng.next_u64() as u32
            },
        }
    };
    let rights = |rng: &mut Rng| -> Rights { postcard::from_bytes(&[rng.below(8) as u8]).unwrap() };
    let reason = |rng: &mut Rng| {
        [
            Reason::PortClosed,
            Reason::OwnerGone,
            Reason::Revoked,
            Reason::Expired,
            Reason::ReplyDropped,
            Reason::Shutdown,
            Reason::Exhausted,
            Reason::Cancelled,
            Reason::JunctionRestarted,
            Reason::JunctionUnreachable,
        ][rng.index(10)]
    };
    let caps = |rng: &mut Rng| -> Vec<remote::Carried> {
        (0..rng.below(3))
            .map(|_| {
                let port = remote_port(rng);
                let rights = rights(rng);
                if rng.chance(50) {
                    remote::Carried::Grant {
                        port,
                        rights,
                        token: None,
                    }
                } else {
                    remote::Carried::Home { port, rights }
                }
            })
            .collect()
    };
    let call = |rng: &mut Rng| small_or_any(rng, 6);
    let target = remote_port(rng);
    let frame = match rng.below(13) {
        0 => RemoteFrame::Lookup {
            req: rng.below(4) as u32,
            name: name.parse().unwrap(),
        },
        1 => RemoteFrame::Found {
            req: rng.below(4) as u32,
            port: target,
            rights: rights(rng),
            chain: None,
            proof: None,
            token: None,
        },
        2 => RemoteFrame::NotFound {
            req: rng.below(4) as u32,
            message: "made up".into(),
        },
        3 => RemoteFrame::Send(RemoteSend {
            port: target,
            n: small_or_any(rng, 8),
            origin: Address::new(
                if rng.chance(70) {
                    me
                } else {
                    rng.below(4) as u16
                },
                rng.below(4) as u16,
            ),
            identity: None,
            call: if rng.chance(50) { 0 } else { call(rng) },
            ack: rng.chance(50),
            caps: caps(rng),
        }),
        4 => RemoteFrame::Settled {
            port: target,
            first: small_or_any(rng, 8),
            count: small_or_any(rng, 8) as u32,
        },
        5 => RemoteFrame::Refused {
            port: target,
            n: small_or_any(rng, 8),
            call: call(rng),
            code: ErrorCode::MissingRight,
            message: "made up".into(),
        },
        6 => RemoteFrame::Dead {
            port: target,
            reason: reason(rng),
        },
        7 => RemoteFrame::Release {
            port: target,
            grants: small_or_any(rng, 4) as u32,
        },
        8 => RemoteFrame::Reply {
            call: call(rng),
            caps: caps(rng),
        },
        9 => RemoteFrame::CallFailed {
            call: call(rng),
            reason: reason(rng),
        },
        10 => RemoteFrame::Cancel { call: call(rng) },
        11 => RemoteFrame::Opened {
            open: rng.below(4) as u32,
            port: target,
        },
        _ => RemoteFrame::OpenRefused {
            open: rng.below(4) as u32,
            reason: reason(rng),
            message: "made up".into(),
        },
    };
    let right = match &frame {
        RemoteFrame::Send(send) => remote::data_lane(send.port.port),
        RemoteFrame::Found { port, .. }
        | RemoteFrame::Settled { port, .. }
        | RemoteFrame::Refused { port, .. }
        | RemoteFrame::Dead { port, .. }
        | RemoteFrame::Release { port, .. }
        | RemoteFrame::Opened { port, .. } => remote::control_lane(port.port),
        _ => remote::CALL_LANE,
    };
    let lane = match rng.below(10) {
        0 => remote::data_lane(rng.below(64) as u16),
        1 => remote::control_lane(rng.below(64) as u16),
        2 => rng.next_u64() as u32,
        _ => right,
    };
    let payload: &[u8] = if frame.has_payload() { b"forged" } else { b"" };
    (lane, remote::to_bytes(&frame, payload))
}

/// Node `attacker` sends made-up remote frames to the junctions in
/// `targets`, naming `port` and looking up `name`, a few at a time with the
/// world running between.
fn attack(
    world: &mut World<Proc>,
    seed: u64,
    attacker: usize,
    targets: &[u16],
    (port, name): (u16, &str),
) {
    let mut rng = Rng::new(seed ^ 0x5eed_0bad);
    let me = world.nodes()[attacker].junction;
    for round in 0..8 {
        for _ in 0..12 {
            let (lane, bytes) = hostile_frame(&mut rng, me, port, name);
            let to = targets[rng.index(targets.len())];
            // A full lane window refuses more: the attacker just waits.
            let _ = world.junction_send(attacker, to, lane, bytes);
        }
        let until = world.elapsed() + Duration::from_millis(50 + 25 * round);
        world.run_until(until).unwrap();
    }
    run(world);
}

/// Junction 2, which links junctions 1 and 3 and was given nothing, turns
/// hostile: it sends both of them made-up remote frames of every kind
/// while a call between them is under way. Nothing it says reaches a
/// process, each frame is refused or ignored, no junction breaks its
/// invariants (the world checks them after every step), and the call it
/// tried to meddle with completes, as does a new one.
#[test]
fn a_hostile_junction_between_two_others_reaches_nothing_and_breaks_nothing() {
    let refused = std::sync::atomic::AtomicU64::new(0);
    junction_tests::sim::for_seeds(8_800, 12, |seed| {
        refused.fetch_add(
            hostile_bystander(seed),
            std::sync::atomic::Ordering::Relaxed,
        );
    });
    if std::env::var(junction_tests::sim::SEED_VAR).is_err() {
        assert!(refused.into_inner() > 0, "the junctions refused forgeries");
    }
}

/// One run; how many remote frames the honest junctions refused.
fn hostile_bystander(seed: u64) -> u64 {
    let mut world = line(seed);
    run(&mut world);
    let ((server, port), (client, handle)) = served(&mut world, "dev.vault");
    world.act(client, |p, _| {
        p.machine
            .call(handle, &[], Bytes::from_static(b"before"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    assert_eq!(got.len(), 1);
    let reply = got[0].0.reply.expect("a call carries a reply capability");
    let refused_before: u64 = (0..3).map(|n| world.core_mut(n).remote_refusals()).sum();

    // Not the service's name: a lookup of it would give junction 2 a
    // capability, as it would any junction that asks.
    attack(&mut world, seed, 1, &[1, 3], (port, "dev.nothing"));

    let refused: u64 = (0..3).map(|n| world.core_mut(n).remote_refusals()).sum();
    assert_eq!(
        take(&mut world, server),
        vec![],
        "nothing reached the server"
    );
    assert_eq!(
        take(&mut world, client),
        vec![],
        "nothing reached the client"
    );

    // The call under way and a new one both complete.
    world.act(server, |p, _| {
        p.machine.read(port, 6, false);
        p.machine
            .reply(reply, &[], Bytes::from_static(b"after"))
            .unwrap();
    });
    run(&mut world);
    let replied = take(&mut world, client).into_iter().find_map(|e| match e {
        Event::Replied { payload, .. } => Some(payload),
        _ => None,
    });
    assert_eq!(replied.as_deref(), Some(&b"after"[..]));
    world.act(client, |p, _| {
        p.machine
            .send(handle, &[], Bytes::from_static(b"again"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, server));
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].1[..], b"again");
    refused - refused_before
}

/// Junctions 1 and 3, a holder and an owner with a call under way between
/// them, both turn hostile and send each other made-up remote frames.
/// Each can hurt only what it was given; neither core breaks, and junction
/// 1 still reaches a service on junction 2, which stayed honest.
#[test]
fn junctions_that_turn_on_each_other_break_neither_core() {
    junction_tests::sim::for_seeds(8_900, 12, hostile_ends);
}

fn hostile_ends(seed: u64) {
    let mut world = line(seed);
    run(&mut world);
    let (server, port) = service(&mut world, 2, "dev.vault");
    let (other, other_port) = service(&mut world, 1, "dev.other");
    let client = attach(&mut world, 0, "client");
    let (handle, _) = lookup(&mut world, client, "dev.vault").unwrap();
    let own = open_port(&mut world, client);
    let passed = mint(&mut world, client, own, Rights::SEND | Rights::GRANT);
    let tag = world
        .act(client, |p, _| {
            p.machine
                .call(handle, &[passed], Bytes::from_static(b"before"))
                .unwrap()
        })
        .unwrap();
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 1);

    let mut rng = Rng::new(seed);
    for _ in 0..2 {
        let attacker = if rng.chance(50) { 0 } else { 2 };
        let target = if attacker == 0 { 3 } else { 1 };
        attack(
            &mut world,
            rng.next_u64(),
            attacker,
            &[target],
            (port, "dev.vault"),
        );
    }
    // Junction 3 was given the call's reply and a capability to `own`, and
    // it owns the port `handle` reaches: it may answer the call, send to
    // `own`, and refuse or end what was sent on `handle` (junction 1's own
    // forgeries confuse its books for that port). It reaches nothing else.
    for event in take(&mut world, client) {
        match event {
            Event::Delivered { deliver, .. } => assert_eq!(deliver.port, own),
            Event::Notice { handle: h, .. } => assert_eq!(h, Some(handle)),
            Event::Replied { tag: t, .. } | Event::CallFailed { tag: t, .. } => assert_eq!(t, tag),
            Event::SendCredit { .. } | Event::Dead { .. } | Event::Undeliverable { .. } => {}
            other => panic!("junction 3 made up {other:?}"),
        }
    }

    let (handle, _) = lookup(&mut world, client, "dev.other").unwrap();
    world.act(client, |p, _| {
        p.machine
            .send(handle, &[], Bytes::from_static(b"still here"))
            .unwrap()
    });
    run(&mut world);
    let got = deliveries(&take(&mut world, other));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.port, other_port);
}

/// What [`watch_settled`] records for a `Dead`.
const DEAD: (u64, u32) = (u64::MAX, 0);

/// The `Settled` frames node `node` sends in its sessions in clear, as
/// (first, count), and its `Dead` frames, in the order they leave.
fn watch_settled(world: &mut World<Proc>, node: usize) -> Rc<RefCell<Vec<(u64, u32)>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let out = seen.clone();
    world.watch_highways(Box::new(move |from, _, frame, payload| {
        if from != node || !matches!(frame, HighwayFrame::Forward { .. }) {
            return;
        }
        let Ok((envelope, body)) = secure::decode(payload) else {
            return;
        };
        let frames: Vec<Bytes> = match envelope {
            Envelope::Plain => vec![body],
            Envelope::PlainBatch => secure::batch_frames(&body).flatten().collect(),
            _ => return,
        };
        for frame in frames {
            if let Ok((SessionFrame::Data(_), payload)) = session::decode(&frame) {
                match remote::decode(&payload) {
                    Ok((RemoteFrame::Settled { first, count, .. }, _)) => {
                        out.borrow_mut().push((first, count));
                    }
                    Ok((RemoteFrame::Dead { .. }, _)) => out.borrow_mut().push(DEAD),
                    _ => {}
                }
            }
        }
    }));
    seen
}

/// Reports of consumption that reach the owner's junction together (one
/// batch, as the shell reads them) go back to the holder's junction as one
/// `Settled` per run of messages, not one each; the sender's credit comes
/// back all the same.
#[test]
fn reports_that_arrive_together_are_settled_together() {
    let mut world = line(seed_from_env(96));
    run(&mut world);
    // Frames written together reach the junction together.
    let at_once = Duration::from_micros(50);
    world.road_latency = Latency {
        min: at_once,
        max: at_once,
    };
    let ((server, port), (client, handle)) = served(&mut world, "dev.sink");
    world.act(client, |p, _| {
        for i in 0..8u8 {
            p.machine.send(handle, &[], Bytes::from(vec![i])).unwrap();
        }
    });
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 8);
    take(&mut world, client);
    let settled = watch_settled(&mut world, 2);

    // Each read asks for an ack, so each makes a `Credit`.
    world.act(server, |p, _| {
        for _ in 0..8 {
            p.machine.read(port, 1, true);
        }
    });
    run(&mut world);
    assert_eq!(*settled.borrow(), [(0, 8)], "one Settled for eight reports");
    let credit = take(&mut world, client)
        .into_iter()
        .filter_map(|e| match e {
            Event::SendCredit { credits, .. } => Some(credits),
            _ => None,
        })
        .last();
    assert_eq!(
        credit,
        Some(world.core_mut(0).config().window),
        "the sender has its whole window back"
    );

    // A report alone is settled alone, as before.
    world.act(client, |p, _| {
        p.machine
            .send(handle, &[], Bytes::from_static(b"9"))
            .unwrap();
    });
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 1);
    world.act(server, |p, _| p.machine.read(port, 1, true));
    run(&mut world);
    assert_eq!(*settled.borrow(), [(0, 8), (8, 1)]);

    // Reports, then the port's end, in one batch: the settlement still
    // goes first, so the holder knows those two were consumed.
    world.act(client, |p, _| {
        for i in 0..3u8 {
            p.machine.send(handle, &[], Bytes::from(vec![i])).unwrap();
        }
    });
    run(&mut world);
    assert_eq!(deliveries(&take(&mut world, server)).len(), 3);
    world.act(server, |p, _| {
        p.machine.read(port, 1, true);
        p.machine.read(port, 1, true);
        p.machine.close_port(port);
    });
    run(&mut world);
    assert_eq!(*settled.borrow(), [(0, 8), (8, 1), (9, 2), DEAD]);
    let lost: u32 = take(&mut world, client)
        .iter()
        .map(|e| match e {
            Event::Undeliverable { count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(lost, 1, "only the unread message is reported undelivered");
}
