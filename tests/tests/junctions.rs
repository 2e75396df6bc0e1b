//! Several junctions in one simulated world, joined by simulated Highways:
//! the real cores, a fake clock, links cut and healed, every run seeded
//! (`JUNCTION_SIM_SEED` replays one). Issue 8 grows this file with remote
//! capabilities, sessions and end-to-end delivery; it starts with routing.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use junction_core::session::{Outcome, SessionData, SessionEvent, SessionFrame};
use junction_core::{Config, Output};
use junction_identity::secure::{Ephemeral, HelloTranscript};
use junction_identity::{CertBody, Certificate, Role, SecretKey, TrustStore};
use junction_road::Frame;
use junction_road::highway::{HighwayFrame, Hops, LinkState, Neighbour};
use junction_road::secure::{self as envelope, Envelope, SessionHello};
use junction_tests::sim::{Ctx, Forwarded, Latency, Process, Rng, Traced, World, seed_from_env};

/// No processes in these worlds yet: junctions only.
struct Nobody;

impl Process for Nobody {
    fn poll_transmit(&mut self) -> Option<Frame> {
        None
    }
    fn handle_frame(&mut self, _frame: Frame, _ctx: &mut Ctx<'_>) {}
    fn handle_road_closed(&mut self, _ctx: &mut Ctx<'_>) {}
}

/// A bus's authority, which certifies its junctions' keys.
struct Bus {
    key: SecretKey,
    trust: TrustStore,
}

/// A junction's key and certificate chain.
type JunctionIdentity = (Arc<SecretKey>, Vec<Certificate>);

impl Bus {
    fn new() -> Self {
        let key = SecretKey::generate().unwrap();
        let own = Certificate::authority(&key, 1, 0, u64::MAX).unwrap();
        let mut trust = TrustStore::new();
        trust.add_authority(&own).unwrap();
        Self { key, trust }
    }

    /// A new key, certified for `role`.
    fn certify(&self, role: Role) -> JunctionIdentity {
        let key = SecretKey::generate().unwrap();
        let cert = Certificate::issue(
            CertBody {
                version: 1,
                serial: u64::from_le_bytes(key.public().0[..8].try_into().unwrap()),
                subject: key.public(),
                role,
                not_before: 0,
                not_after: u64::MAX,
                issuer: self.key.public(),
            },
            &self.key,
        )
        .unwrap();
        (Arc::new(key), vec![cert])
    }

    /// Junction `junction` of this bus, sealing its link states with
    /// `identity`.
    fn config(&self, junction: u16, identity: JunctionIdentity) -> Config {
        Config {
            junction,
            incarnation: 1,
            trust: self.trust.clone(),
            junction_identity: Some(identity),
            ..Config::default()
        }
    }
}

/// Junctions 1..=n, one node each (node i is junction i + 1), each with a
/// key its bus's authority certified for its id.
fn junctions(seed: u64, n: u16) -> World<Nobody> {
    junctions_of(&Bus::new(), seed, n).0
}

/// Junctions 1..=n of `bus`, and their keys (index i is junction i + 1).
fn junctions_of(bus: &Bus, seed: u64, n: u16) -> (World<Nobody>, Vec<JunctionIdentity>) {
    let identities: Vec<_> = (1..=n)
        .map(|id| bus.certify(Role::Junction { id }))
        .collect();
    let configs = (1..=n)
        .zip(&identities)
        .map(|(junction, identity)| bus.config(junction, identity.clone()))
        .collect();
    (World::with_junctions(seed, configs), identities)
}

fn wan() -> Latency {
    Latency {
        min: Duration::from_millis(1),
        max: Duration::from_millis(20),
    }
}

/// The path node `from` routes on to junction `to`, if any.
fn path(world: &mut World<Nobody>, from: usize, to: u16) -> Option<Vec<u16>> {
    world.core_mut(from).route(to).map(|r| r.path.clone())
}

#[test]
fn three_junctions_in_a_line_route_over_two_hops() {
    let mut world = junctions(seed_from_env(1), 3);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    assert_eq!(path(&mut world, 2, 1), Some(vec![2, 1]));
    assert_eq!(path(&mut world, 1, 3), Some(vec![3]));
}

#[test]
fn a_triangle_fails_over_when_a_highway_is_cut_and_recovers_when_it_heals() {
    let mut world = junctions(seed_from_env(2), 3);
    let ab = world.add_link(0, 1, 1, wan());
    let bc = world.add_link(1, 2, 1, wan());
    world.add_link(0, 2, 5, wan());
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    world.cut_link(bc);
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![3]), "fails over");
    assert_eq!(path(&mut world, 1, 3), Some(vec![1, 3]));
    world.cut_link(ab);
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 1, 3), None, "junction 2 is cut off");
    assert_eq!(path(&mut world, 0, 2), None);
    world.heal_link(bc);
    world.heal_link(ab);
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]), "recovers");
}

/// The true shortest costs from `from` over the live links.
fn truth(links: &[(usize, usize, u32)], from: usize) -> BTreeMap<usize, u64> {
    let mut dist = BTreeMap::from([(from, 0u64)]);
    let mut heap = BinaryHeap::from([Reverse((0u64, from))]);
    while let Some(Reverse((d, at))) = heap.pop() {
        if dist.get(&at).is_some_and(|&best| best < d) {
            continue;
        }
        for &(a, b, c) in links {
            let next = if a == at {
                b
            } else if b == at {
                a
            } else {
                continue;
            };
            let nd = d + u64::from(c);
            if dist.get(&next).is_none_or(|&best| nd < best) {
                dist.insert(next, nd);
                heap.push(Reverse((nd, next)));
            }
        }
    }
    dist.remove(&from);
    dist
}

/// Random networks of up to 8 junctions over Highways with random latency,
/// cut and healed at random moments, often while link states are still on
/// their way. At every change, every route is a path that repeats no
/// junction; once the world is quiet, every junction routes to exactly the
/// junctions it reaches, at the shortest cost, over live Highways.
#[test]
fn routes_converge_over_random_cuts_and_heals() {
    junction_tests::sim::for_seeds(1_000, 200, one_network);
}

fn one_network(seed: u64) {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let n = 2 + rng.below(7) as u16;
    let mut world = junctions(seed, n);
    let mut links = Vec::new();
    for _ in 0..rng.below(14) + 1 {
        let (a, b) = (rng.index(n as usize), rng.index(n as usize));
        if a != b
            && !links
                .iter()
                .any(|&(x, y, _)| (x, y) == (a, b) || (x, y) == (b, a))
        {
            let cost = 1 + rng.below(9) as u32;
            links.push((a, b, cost));
            world.add_link(a, b, cost, wan());
        }
    }
    let mut queue = VecDeque::new();
    for _ in 0..rng.below(20).min(links.len() as u64 * 20) {
        queue.push_back((rng.index(links.len()), rng.chance(50), rng.below(30)));
    }
    let mut up = vec![true; links.len()];
    while let Some((link, heal, wait_ms)) = queue.pop_front() {
        let elapsed = world.elapsed() + Duration::from_millis(wait_ms);
        world.run_until(elapsed).unwrap();
        if heal {
            world.heal_link(link);
        } else {
            world.cut_link(link);
        }
        up[link] = heal;
        for from in 0..n as usize {
            for to in 1..=n {
                if let Some(p) = path(&mut world, from, to) {
                    let mut seen = std::collections::BTreeSet::from([from as u16 + 1]);
                    assert!(
                        p.iter().all(|j| seen.insert(*j)),
                        "a route repeats a junction: {p:?}"
                    );
                }
            }
        }
    }
    world.run_until_idle(100_000).unwrap();
    let live: Vec<(usize, usize, u32)> = links
        .iter()
        .zip(&up)
        .filter(|(_, up)| **up)
        .map(|(&l, _)| l)
        .collect();
    for from in 0..n as usize {
        let truth = truth(&live, from);
        for to in 0..n as usize {
            if to == from {
                continue;
            }
            let route = world.core_mut(from).route(to as u16 + 1).cloned();
            match (truth.get(&to), route) {
                (None, None) => {}
                (Some(&cost), Some(route)) => {
                    assert_eq!(route.cost, cost, "{from}→{to}: {route:?}");
                    let mut at = from;
                    for &hop in &route.path {
                        let next = hop as usize - 1;
                        assert!(
                            live.iter()
                                .any(|&(a, b, _)| (a, b) == (at, next) || (a, b) == (next, at)),
                            "{from}→{to} uses a dead Highway: {route:?}"
                        );
                        at = next;
                    }
                }
                (truth, route) => panic!("{from}→{to}: reachable at {truth:?}, routed {route:?}"),
            }
        }
    }
}

/// Session news from the trace: (node, peer junction, event).
fn session_events(world: &World<Nobody>) -> Vec<(usize, u16, SessionEvent)> {
    world
        .trace()
        .iter()
        .filter_map(|e| match &e.what {
            Traced::Session { node, peer, event } => Some((*node, *peer, event.clone())),
            _ => None,
        })
        .collect()
}

/// What was handed up where: (node, from junction, lane, seq, payload).
fn delivered(world: &World<Nobody>) -> Vec<(usize, u16, u32, u64, Vec<u8>)> {
    session_events(world)
        .into_iter()
        .filter_map(|(node, peer, event)| match event {
            SessionEvent::Delivered { lane, seq, payload } => {
                Some((node, peer, lane, seq, payload.to_vec()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_crosses_two_hops_and_a_lost_route_ends_it_honestly() {
    let mut world = junctions(seed_from_env(3), 3);
    world.add_link(0, 1, 1, wan());
    let bc = world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"over two hops"))
        .unwrap();
    world.run_until_idle(10_000).unwrap();
    assert_eq!(
        delivered(&world),
        vec![(2, 1, 1, 0, b"over two hops".to_vec())]
    );
    assert!(
        session_events(&world)
            .iter()
            .any(|(node, peer, e)| *node == 0
                && *peer == 3
                && matches!(
                    e,
                    SessionEvent::Acked {
                        lane: 1,
                        upto: 1,
                        ..
                    }
                )),
        "the sender hears it arrived"
    );
    // Junction 2 loses its Highway to 3 before junction 1 hears: the
    // traffic comes back from junction 2 as unroutable, nothing loops, and
    // with no way to junction 3 left the sender is told, not left waiting.
    world.cut_link(bc);
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"lost way"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    let back: Vec<_> = world
        .trace()
        .iter()
        .filter_map(|e| match e.what {
            Traced::Unroutable { node, to, at } => Some((node, to, at)),
            _ => None,
        })
        .collect();
    assert_eq!(back, vec![(0, 3, 2)]);
    assert_eq!(delivered(&world).len(), 1);
    let ended: Vec<_> = session_events(&world)
        .into_iter()
        .filter_map(|(node, _, e)| match e {
            SessionEvent::Ended {
                lane,
                first_seq,
                count,
                outcome,
                ..
            } => Some((node, lane, first_seq, count, outcome)),
            _ => None,
        })
        .collect();
    assert_eq!(ended, vec![(0, 1, 1, 1, Outcome::Unknown)]);
}

#[test]
fn traffic_that_does_not_follow_its_route_is_dropped() {
    let mut world = junctions(seed_from_env(4), 3);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    let now = world.now();
    let forged = [
        // Claims to come from junction 1 by way of itself, but junction 3
        // hands it over.
        (3, 1, Hops::new(&[2, 3]).unwrap()),
        // A route that loops.
        (1, 1, Hops::new(&[2, 1, 2, 3]).unwrap()),
        // A route that does not pass junction 2.
        (1, 1, Hops::new(&[3]).unwrap()),
    ];
    for (neighbour, from, route) in forged {
        let core = world.core_mut(1);
        core.handle_highway_frame(
            neighbour,
            HighwayFrame::Forward { from, to: 3, route },
            Bytes::from_static(b"forged"),
            now,
        );
        assert!(core.poll_output().is_none(), "passed on {route:?}");
    }
}

/// A triangle whose cheap Highway is cut while messages are on it: every
/// message still arrives exactly once and in order per lane, over the other
/// way, and none is given up.
#[test]
fn messages_arrive_once_and_in_order_across_a_failover() {
    for seed in seed_from_env(7_000)..seed_from_env(7_000) + 20 {
        let mut world = junctions(seed, 3);
        world.add_link(0, 1, 1, wan());
        let cheap = world.add_link(1, 2, 1, wan());
        world.add_link(0, 2, 5, wan());
        world.run_until_idle(10_000).unwrap();
        let mut sent = 0u64;
        for i in 0..200u64 {
            let lane = (i % 2) as u32;
            let payload = Bytes::from(format!("{lane}:{i}"));
            if world.junction_send(0, 3, lane, payload).is_ok() {
                sent += 1;
            }
            let next = world.elapsed() + Duration::from_micros(200);
            world.run_until(next).unwrap();
            if i == 100 {
                world.cut_link(cheap);
            }
        }
        world.run_until_idle(1_000_000).unwrap();
        let got = delivered(&world);
        assert_eq!(got.len() as u64, sent, "seed {seed}: once each");
        for lane in 0..2u32 {
            let seqs: Vec<u64> = got.iter().filter(|d| d.2 == lane).map(|d| d.3).collect();
            let expected: Vec<u64> = (0..seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "seed {seed}: lane {lane} in order");
        }
        assert!(
            !session_events(&world)
                .iter()
                .any(|(_, _, e)| matches!(e, SessionEvent::Ended { .. })),
            "seed {seed}: nothing given up"
        );
    }
}

/// Over random networks, every junction's message reaches every junction
/// it can reach exactly once, and one for a junction it cannot reach ends
/// as undelivered: never silence.
#[test]
fn traffic_reaches_every_reachable_junction_once_and_the_rest_is_told() {
    let first = seed_from_env(5_000);
    for seed in first..first + 30 {
        let mut rng = Rng::new(seed);
        let n = 2 + rng.below(7) as u16;
        let mut world = junctions(seed, n);
        let mut links: Vec<(usize, usize, u32)> = Vec::new();
        for _ in 0..rng.below(12) + 1 {
            let (a, b) = (rng.index(n as usize), rng.index(n as usize));
            let (a, b) = (a.min(b), a.max(b));
            if a != b && !links.iter().any(|l| (l.0, l.1) == (a, b)) {
                let cost = 1 + rng.below(9) as u32;
                links.push((a, b, cost));
                world.add_link(a, b, cost, wan());
            }
        }
        world.run_until_idle(100_000).unwrap();
        let mut expected = Vec::new();
        for from in 0..n as usize {
            let reach = truth(&links, from);
            for to in 0..n as usize {
                if to != from {
                    let payload = format!("{from}->{to}");
                    world
                        .junction_send(from, to as u16 + 1, 0, Bytes::from(payload.clone()))
                        .unwrap();
                    expected.push((from, to, reach.contains_key(&to), payload));
                }
            }
        }
        world.run_until_idle(1_000_000).unwrap();
        let got = delivered(&world);
        let events = session_events(&world);
        for (from, to, reachable, payload) in expected {
            let arrived = got
                .iter()
                .filter(|d| d.0 == to && d.1 as usize == from + 1 && d.4 == payload.as_bytes())
                .count();
            if reachable {
                assert_eq!(arrived, 1, "seed {seed}: {payload} arrived {arrived} times");
            } else {
                assert_eq!(arrived, 0, "seed {seed}: {payload} crossed a partition");
                assert!(
                    events.iter().any(|(node, peer, e)| *node == from
                        && *peer as usize == to + 1
                        && matches!(
                            e,
                            SessionEvent::Ended {
                                outcome: Outcome::Undelivered,
                                ..
                            }
                        )),
                    "seed {seed}: {payload} was neither delivered nor reported"
                );
            }
        }
    }
}

/// The delivery contract across junctions, over random networks of up to 8
/// junctions with random traffic between random pairs on random lanes,
/// while Highways are cut and healed: each message is handed up at most
/// once, in order on its lane; at the end each was handed up or its sender
/// told (`Ended`); none told undelivered was handed up.
#[test]
fn the_delivery_contract_holds_across_random_networks_cuts_and_heals() {
    junction_tests::sim::for_seeds(9_000, 40, one_contract_run);
}

/// The same, while every transit junction tampers with what it carries:
/// flips bits, duplicates, drops, and replays frames it saw earlier. Its
/// tampering is caught where the frames arrive: what is handed up was sent,
/// once, in order, and never after an "undelivered".
#[test]
fn the_delivery_contract_holds_when_transit_junctions_tamper() {
    let first = seed_from_env(9_500);
    let runs = if std::env::var(junction_tests::sim::SEED_VAR).is_ok() {
        1
    } else {
        20
    };
    let mut caught_total = (0, 0);
    for seed in first..first + runs {
        let run = std::panic::catch_unwind(|| {
            let mut world = one_contract_world(seed);
            let mut rng = Rng::new(seed ^ 0xbad);
            let mut seen: VecDeque<Bytes> = VecDeque::new();
            world.danger_tamper_forwards(Box::new(move |_, _, _, payload| {
                let roll = rng.below(100);
                let out = match roll {
                    0..5 => {
                        let mut bad = payload.to_vec();
                        let at = rng.index(bad.len());
                        bad[at] ^= 1 << rng.below(8);
                        Forwarded::Instead(vec![Bytes::from(bad)])
                    }
                    5..10 => Forwarded::Instead(vec![payload.clone(), payload.clone()]),
                    10..13 => Forwarded::Instead(vec![]),
                    13..16 if !seen.is_empty() => {
                        let old = seen[rng.index(seen.len())].clone();
                        Forwarded::Instead(vec![payload.clone(), old])
                    }
                    _ => Forwarded::Pass,
                };
                seen.push_back(payload.clone());
                if seen.len() > 32 {
                    seen.pop_front();
                }
                out
            }));
            let mut world = one_contract_check(seed, world);
            caught(&mut world)
        });
        match run {
            Ok((unsealed, replayed)) => {
                caught_total.0 += unsealed;
                caught_total.1 += replayed;
            }
            Err(e) => panic!(
                "seed {seed} failed (replay with JUNCTION_SIM_SEED={seed}): {:?}",
                e.downcast_ref::<String>()
            ),
        }
    }
    assert!(
        caught_total.0 > 0 && caught_total.1 > 0,
        "tampering was caught: {caught_total:?}"
    );
}

fn one_contract_run(seed: u64) {
    one_contract_check(seed, one_contract_world(seed));
}

/// What every junction's channels caught: frames that did not open, and
/// replays.
fn caught(world: &mut World<Nobody>) -> (u64, u64) {
    let n = world.nodes().len();
    let mut total = (0, 0);
    for node in 0..n {
        for peer in 1..=n as u16 {
            if let Some(s) = world.core_mut(node).session_security(peer) {
                total.0 += s.unsealed;
                total.1 += s.replayed;
            }
        }
    }
    total
}

/// A random network of 2 to 8 junctions, routes settled.
fn one_contract_world(seed: u64) -> World<Nobody> {
    let mut rng = Rng::new(seed ^ 0xc0de);
    let n = 2 + rng.below(7) as u16;
    let mut world = junctions(seed, n);
    let mut links = Vec::new();
    for _ in 0..rng.below(14) + 1 {
        let (a, b) = (rng.index(n as usize), rng.index(n as usize));
        let (a, b) = (a.min(b), a.max(b));
        if a != b && !links.contains(&(a, b)) {
            links.push((a, b));
            world.add_link(a, b, 1 + rng.below(9) as u32, wan());
        }
    }
    world.run_until_idle(100_000).unwrap();
    world
}

/// Random traffic, cuts and heals over `world`, then the contract's checks.
fn one_contract_check(seed: u64, mut world: World<Nobody>) -> World<Nobody> {
    // The same draws as `one_contract_world`, so that the links (and each
    // seed's run) are what they were.
    let mut rng = Rng::new(seed ^ 0xc0de);
    let n = 2 + rng.below(7) as u16;
    let mut links = Vec::new();
    for _ in 0..rng.below(14) + 1 {
        let (a, b) = (rng.index(n as usize), rng.index(n as usize));
        let (a, b) = (a.min(b), a.max(b));
        if a != b && !links.contains(&(a, b)) {
            links.push((a, b));
            rng.below(9);
        }
    }
    // (from node, to junction, lane) -> sequence numbers sent.
    let mut sent: BTreeMap<(usize, u16, u32), Vec<u64>> = BTreeMap::new();
    for _ in 0..300 {
        let from = rng.index(n as usize);
        let to = 1 + rng.below(u64::from(n)) as u16;
        if to as usize != from + 1 {
            let lane = rng.below(3) as u32;
            let payload = Bytes::from(format!("{from}>{to}/{lane}"));
            if let Ok(seq) = world.junction_send(from, to, lane, payload) {
                sent.entry((from, to, lane)).or_default().push(seq);
            }
        }
        if !links.is_empty() && rng.chance(5) {
            let link = rng.index(links.len());
            if rng.chance(50) {
                world.cut_link(link);
            } else {
                world.heal_link(link);
            }
        }
        let next = world.elapsed() + Duration::from_millis(rng.below(5));
        world.run_until(next).unwrap();
    }
    world.run_until_idle(10_000_000).unwrap();

    // Handed up at most once, in order per lane.
    let mut handed: BTreeMap<(usize, u16, u32), Vec<u64>> = BTreeMap::new();
    for (node, from, lane, seq, payload) in delivered(&world) {
        assert_eq!(
            payload,
            format!("{}>{}/{lane}", from - 1, node + 1).into_bytes(),
            "handed up what was sent"
        );
        // Keyed as the sender sees it: (its node, the receiver's id, lane).
        handed
            .entry((from as usize - 1, node as u16 + 1, lane))
            .or_default()
            .push(seq);
    }
    let mut ended: BTreeMap<(usize, u16, u32), Vec<(u64, Outcome)>> = BTreeMap::new();
    for (node, peer, event) in session_events(&world) {
        if let SessionEvent::Ended {
            lane,
            first_seq,
            count,
            outcome,
            ..
        } = event
        {
            let list = ended.entry((node, peer, lane)).or_default();
            list.extend((first_seq..first_seq + count).map(|s| (s, outcome)));
        }
    }
    for (key, seqs) in &handed {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key:?}: handed up out of order or twice: {seqs:?}"
        );
    }
    for (key, seqs) in &sent {
        let up = handed.get(key).map_or(&[][..], |v| &v[..]);
        let told = ended.get(key).map_or(&[][..], |v| &v[..]);
        for seq in seqs {
            let was_up = up.contains(seq);
            let outcome = told.iter().find(|(s, _)| s == seq).map(|&(_, o)| o);
            assert!(
                was_up || outcome.is_some(),
                "{key:?} seq {seq}: neither handed up nor told"
            );
            assert!(
                !(was_up && outcome == Some(Outcome::Undelivered)),
                "{key:?} seq {seq}: told undelivered, yet handed up"
            );
        }
    }
    world
}

/// A junction whose certificate says junction 7, calling itself junction 5:
/// its neighbour refuses what it says of itself, so no junction routes to
/// 5 (nor to 7, which it never claimed), and the honest junctions still
/// route among themselves.
#[test]
fn a_junction_that_claims_an_id_its_certificate_does_not_carry_is_refused() {
    let bus = Bus::new();
    let mut configs: Vec<Config> = (1..=3)
        .map(|id| bus.config(id, bus.certify(Role::Junction { id })))
        .collect();
    // The rogue, node 3, next to junction 1.
    configs.push(bus.config(5, bus.certify(Role::Junction { id: 7 })));
    let mut world = World::<Nobody>::with_junctions(seed_from_env(8_000), configs);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.add_link(3, 0, 1, wan());
    world.run_until_idle(10_000).unwrap();
    for node in 0..3 {
        assert_eq!(path(&mut world, node, 5), None, "node {node} routes to 5");
        assert_eq!(path(&mut world, node, 7), None, "node {node} routes to 7");
    }
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    assert_eq!(path(&mut world, 2, 1), Some(vec![2, 1]));
}

/// What a core said to its neighbours after an input.
fn link_states_out(world: &mut World<Nobody>, node: usize) -> Vec<(u16, LinkState)> {
    let mut out = vec![];
    while let Some(o) = world.core_mut(node).poll_output() {
        if let Output::Highway {
            to,
            frame: HighwayFrame::LinkState(ls),
            ..
        } = o
        {
            out.push((to, ls));
        }
    }
    out
}

/// Junction 2, between 1 and 3, tells junction 1 that junction 3 lost its
/// links: signed with its own key and chain, with 3's chain and its own
/// key, with a chain from another bus's authority, or with a client's
/// certificate. Junction 1 takes none of it, passes none on, and still
/// routes to 3 through 2; a replay of 3's own older description changes
/// nothing either.
#[test]
fn link_states_for_another_junction_are_refused_and_routing_holds() {
    let bus = Bus::new();
    let (mut world, ids) = junctions_of(&bus, seed_from_env(8_100), 3);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    let now = world.now();
    let lost = |seq| LinkState {
        origin: 3,
        incarnation: 1,
        seq,
        neighbours: vec![],
        names: vec![],
        seal: None,
    };
    let (two, three) = (&ids[1], &ids[2]);
    let stranger = Bus::new().certify(Role::Junction { id: 3 });
    let client = bus.certify(Role::Client);
    let mut forgeries = vec![lost(1_000)];
    for (key, chain) in [
        (&two.0, &two.1),
        (&two.0, &three.1),
        (&stranger.0, &stranger.1),
        (&client.0, &client.1),
    ] {
        let mut ls = lost(1_000);
        ls.seal(key, chain.clone()).unwrap();
        forgeries.push(ls);
    }
    for forged in forgeries {
        world.core_mut(0).handle_highway_frame(
            2,
            HighwayFrame::LinkState(forged.clone()),
            Bytes::new(),
            now,
        );
        assert_eq!(link_states_out(&mut world, 0), vec![], "{forged:?}");
        assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]), "{forged:?}");
    }
    // Junction 3 gets a second Highway, to 1, and describes itself anew.
    world.add_link(0, 2, 5, wan());
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    let now = world.now();
    // Its first description, replayed: older than what 1 holds, so 1
    // answers with the newer one and changes nothing.
    let mut old = LinkState {
        origin: 3,
        incarnation: 1,
        seq: 1,
        neighbours: vec![Neighbour {
            junction: 2,
            cost: 1,
        }],
        names: vec![],
        seal: None,
    };
    old.seal(&three.0, three.1.clone()).unwrap();
    world
        .core_mut(0)
        .handle_highway_frame(2, HighwayFrame::LinkState(old), Bytes::new(), now);
    let answered = link_states_out(&mut world, 0);
    assert_eq!(answered.len(), 1);
    assert_eq!((answered[0].0, answered[0].1.origin), (2, 3));
    assert!(answered[0].1.seq > 1);
    assert_eq!(path(&mut world, 0, 3), Some(vec![2, 3]));
    // And routing still follows the honest ones.
    world.cut_link(1);
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 3), Some(vec![3]));
}

/// Junctions with no keys route only if they trust unsigned routing; a
/// keyless one among keyed junctions is not heard.
#[test]
fn unsigned_routing_is_taken_only_where_trusted() {
    let unsigned = |junction, trust_unsigned_routing| Config {
        junction,
        incarnation: 1,
        trust_unsigned_routing,
        ..Config::default()
    };
    let mut world = World::<Nobody>::with_junctions(
        seed_from_env(8_200),
        vec![unsigned(1, true), unsigned(2, true), unsigned(3, false)],
    );
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    assert_eq!(path(&mut world, 0, 2), Some(vec![2]));
    assert_eq!(path(&mut world, 2, 2), None, "3 takes no unsigned routes");
    assert_eq!(
        path(&mut world, 0, 3),
        Some(vec![2, 3]),
        "1 and 2 take 3's unsigned description"
    );
}

// End-to-end protection of sessions (issue 8, item 4): junction 2 carries
// the traffic between 1 and 3, and tries everything a transit junction can.

/// Whether `hay` contains `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The envelope of a forwarded payload, if it decodes.
fn envelope_of(payload: &Bytes) -> Option<Envelope> {
    envelope::decode(payload).ok().map(|(e, _)| e)
}

/// Junctions 1, 2, 3 of `bus` in a line, routes settled.
fn line_of(bus: &Bus, seed: u64) -> (World<Nobody>, Vec<JunctionIdentity>) {
    let (mut world, ids) = junctions_of(bus, seed, 3);
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    (world, ids)
}

/// What junction 2 (node 1) passes on from 1 to 3, as it would: a
/// `Forward` along the route 2, 3.
fn pass_on(world: &mut World<Nobody>, payload: Bytes) {
    let route = Hops::new(&[2, 3]).unwrap();
    let frame = HighwayFrame::Forward {
        from: 1,
        to: 3,
        route,
    };
    world.danger_send_highway(1, 3, frame, payload);
}

/// Payloads handed up at node `node` from junction `from`, on lane `lane`.
fn handed_up(world: &World<Nobody>, node: usize, from: u16, lane: u32) -> Vec<(u64, Vec<u8>)> {
    delivered(world)
        .into_iter()
        .filter(|d| d.0 == node && d.1 == from && d.2 == lane)
        .map(|d| (d.3, d.4))
        .collect()
}

#[test]
fn a_session_through_a_transit_junction_is_sealed_end_to_end() {
    let (mut world, _) = line_of(&Bus::new(), seed_from_env(8_300));
    let seen = Rc::new(RefCell::new(Vec::<Bytes>::new()));
    let record = seen.clone();
    world.danger_tamper_forwards(Box::new(move |node, _, _, payload| {
        if node == 1 {
            record.borrow_mut().push(payload.clone());
        }
        Forwarded::Pass
    }));
    let secret = b"a secret only junction 3 may read";
    world
        .junction_send(0, 3, 1, Bytes::from_static(secret))
        .unwrap();
    world
        .junction_send(2, 1, 2, Bytes::from_static(b"and one back"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    assert_eq!(handed_up(&world, 2, 1, 1), vec![(0, secret.to_vec())]);
    assert_eq!(
        handed_up(&world, 0, 3, 2),
        vec![(0, b"and one back".to_vec())]
    );
    let seen = seen.borrow();
    let sealed = seen
        .iter()
        .filter(|p| {
            matches!(
                envelope_of(p),
                Some(Envelope::Sealed { .. } | Envelope::SealedBatch { .. })
            )
        })
        .count();
    let hellos = seen
        .iter()
        .filter(|p| matches!(envelope_of(p), Some(Envelope::Hello(_))))
        .count();
    assert!(sealed >= 4, "data and acknowledgements both ways: {sealed}");
    assert!(hellos >= 2, "a hello and its answer: {hellos}");
    assert_eq!(sealed + hellos, seen.len(), "nothing in clear");
    for p in seen.iter() {
        assert!(!contains(p, secret) && !contains(p, b"and one back"));
    }
    let stats = world.core_mut(2).session_security(1).unwrap();
    assert_eq!(stats.handshakes, 1);
    assert_eq!(stats.unsealed + stats.replayed + stats.hellos_refused, 0);
}

/// Between neighbours the session rides their Highway's TLS in clear, with
/// no seal of its own; once the Highway is cut and the route runs through
/// another junction, the same session is sealed, with keys agreed while it
/// was direct, and every message still arrives once, in order.
#[test]
fn a_session_between_neighbours_is_sealed_only_when_others_carry_it() {
    for seed in seed_from_env(8_350)..seed_from_env(8_350) + 5 {
        let (mut world, _) = junctions_of(&Bus::new(), seed, 3);
        let direct = world.add_link(0, 1, 1, wan());
        world.add_link(1, 2, 1, wan());
        world.add_link(0, 2, 1, wan());
        world.run_until_idle(10_000).unwrap();
        // What junction 1 sends junction 2 of its own, and which way.
        let seen = Rc::new(RefCell::new(Vec::<(u16, Bytes)>::new()));
        let record = seen.clone();
        world.watch_highways(Box::new(move |node, next, frame, payload| {
            if let (0, HighwayFrame::Forward { to: 2, .. }) = (node, frame) {
                record.borrow_mut().push((next, payload.clone()));
            }
        }));
        let mut sent = 0u64;
        for i in 0..100u64 {
            let payload = Bytes::from(format!("message {i}"));
            world.junction_send(0, 2, 1, payload).unwrap();
            sent += 1;
            let next = world.elapsed() + Duration::from_micros(500);
            world.run_until(next).unwrap();
            if i == 50 {
                assert_eq!(
                    world.core_mut(0).listing().sessions[0].sealing,
                    junction_road::control::Sealing::Direct,
                    "seed {seed}"
                );
                world.cut_link(direct);
            }
        }
        world.run_until_idle(1_000_000).unwrap();
        let got = handed_up(&world, 1, 1, 1);
        let expected: Vec<_> = (0..sent)
            .map(|i| (i, format!("message {i}").into_bytes()))
            .collect();
        assert_eq!(got, expected, "seed {seed}: once each, in order");
        let seen = seen.borrow();
        // Not the handshake: its hellos, and the initiator's confirmation
        // (an empty sealed frame: a tag alone).
        let data = |p: &Bytes| match envelope::decode(p) {
            Ok((Envelope::Hello(_), _)) => false,
            Ok((Envelope::Sealed { .. }, body)) => body.len() > 16,
            _ => true,
        };
        let clear =
            |p: &Bytes| matches!(envelope_of(p), Some(Envelope::Plain | Envelope::PlainBatch));
        let straight: Vec<_> = seen
            .iter()
            .filter(|(next, p)| *next == 2 && data(p))
            .collect();
        let around: Vec<_> = seen
            .iter()
            .filter(|(next, p)| *next == 3 && data(p))
            .collect();
        assert!(!straight.is_empty() && !around.is_empty(), "seed {seed}");
        assert!(
            straight.iter().all(|(_, p)| clear(p)),
            "seed {seed}: in clear over the Highway to 2 alone"
        );
        assert!(
            around.iter().all(|(_, p)| !clear(p)),
            "seed {seed}: sealed through 3"
        );
        assert!(
            !around
                .iter()
                .any(|(_, p)| contains(p, b"message 9") || contains(p, b"message 5")),
            "seed {seed}: junction 3 reads nothing"
        );
        assert_eq!(
            world.core_mut(0).listing().sessions[0].sealing,
            junction_road::control::Sealing::Sealed,
            "seed {seed}"
        );
        let stats = world.core_mut(1).session_security(1).unwrap();
        assert_eq!(stats.handshakes, 1, "seed {seed}: keys agreed once");
        assert_eq!(stats.malformed + stats.unsealed + stats.replayed, 0);
    }
}

/// A session whose handshake ran over a link that had silently died (its
/// hellos lost, no keys yet) hears of the new route when the cut is
/// noticed, and sends its hello again at once, not when its doubling
/// interval next comes round: the messages waiting go the other way
/// within a few round trips, under a second.
#[test]
fn a_handshake_lost_on_a_dead_link_starts_again_on_the_new_route() {
    for seed in seed_from_env(8_400)..seed_from_env(8_400) + 5 {
        let (mut world, _) = junctions_of(&Bus::new(), seed, 3);
        let direct = world.add_link(0, 1, 1, wan());
        world.add_link(1, 2, 1, wan());
        world.add_link(0, 2, 1, wan());
        world.run_until_idle(10_000).unwrap();
        // The direct link dies before the first message; nobody knows.
        world.silence_link(direct);
        for i in 0..20u64 {
            let payload = Bytes::from(format!("message {i}"));
            world.junction_send(0, 2, 1, payload).unwrap();
        }
        // As long as three missed keep-alives take on a real Highway.
        let noticed = world.elapsed() + Duration::from_millis(750);
        world.run_until(noticed).unwrap();
        assert!(handed_up(&world, 1, 1, 1).is_empty(), "seed {seed}");
        world.cut_link(direct);
        world
            .run_until(noticed + Duration::from_millis(250))
            .unwrap();
        let expected: Vec<_> = (0..20u64)
            .map(|i| (i, format!("message {i}").into_bytes()))
            .collect();
        assert_eq!(
            handed_up(&world, 1, 1, 1),
            expected,
            "seed {seed}: all of them, through junction 3, soon after the cut"
        );
    }
}

/// Junction 2 flips a bit in the first sealed frames it carries: each is
/// caught and dropped where it arrives, and the session's retransmissions
/// get every message through once, in order, when it stops.
#[test]
fn an_altered_frame_is_caught_and_the_message_still_arrives_once_in_order() {
    for seed in seed_from_env(8_400)..seed_from_env(8_400) + 5 {
        let (mut world, _) = line_of(&Bus::new(), seed);
        let altered = Rc::new(Cell::new(0u64));
        let count = altered.clone();
        world.danger_tamper_forwards(Box::new(move |_, _, _, payload| {
            if count.get() >= 6
                || !matches!(
                    envelope_of(payload),
                    Some(Envelope::Sealed { .. } | Envelope::SealedBatch { .. })
                )
            {
                return Forwarded::Pass;
            }
            count.set(count.get() + 1);
            let mut bad = payload.to_vec();
            let at = bad.len() / 2 + count.get() as usize % 3;
            bad[at] ^= 0x10;
            Forwarded::Instead(vec![Bytes::from(bad)])
        }));
        for i in 0..10u64 {
            world
                .junction_send(0, 3, 1, Bytes::from(format!("message {i}")))
                .unwrap();
            let next = world.elapsed() + Duration::from_millis(3);
            world.run_until(next).unwrap();
        }
        world.run_until_idle(1_000_000).unwrap();
        let got = handed_up(&world, 2, 1, 1);
        let expected: Vec<_> = (0..10u64)
            .map(|i| (i, format!("message {i}").into_bytes()))
            .collect();
        assert_eq!(got, expected, "seed {seed}");
        let caught = world.core_mut(2).session_security(1).unwrap().unsealed
            + world.core_mut(0).session_security(3).unwrap().unsealed;
        assert_eq!(
            caught,
            altered.get(),
            "seed {seed}: every altered frame caught"
        );
        assert_eq!(altered.get(), 6);
        assert!(
            !session_events(&world)
                .iter()
                .any(|(_, _, e)| matches!(e, SessionEvent::Ended { .. })),
            "seed {seed}: nothing given up"
        );
    }
}

/// Junction 2 sends every sealed frame twice, and later replays them all:
/// the replay window drops every copy, and each message is handed up once.
#[test]
fn replayed_frames_are_dropped_and_nothing_is_handed_up_twice() {
    let (mut world, _) = line_of(&Bus::new(), seed_from_env(8_500));
    let kept = Rc::new(RefCell::new(Vec::<Bytes>::new()));
    let keep = kept.clone();
    world.danger_tamper_forwards(Box::new(move |_, from, _, payload| {
        if from != 1
            || !matches!(
                envelope_of(payload),
                Some(Envelope::Sealed { .. } | Envelope::SealedBatch { .. })
            )
        {
            return Forwarded::Pass;
        }
        keep.borrow_mut().push(payload.clone());
        Forwarded::Instead(vec![payload.clone(), payload.clone()])
    }));
    for i in 0..5u64 {
        world
            .junction_send(0, 3, 1, Bytes::from(format!("once {i}")))
            .unwrap();
    }
    world.run_until_idle(1_000_000).unwrap();
    let once: Vec<_> = (0..5u64)
        .map(|i| (i, format!("once {i}").into_bytes()))
        .collect();
    assert_eq!(handed_up(&world, 2, 1, 1), once);
    let copies = kept.borrow().len() as u64;
    let replayed = world.core_mut(2).session_security(1).unwrap().replayed;
    assert_eq!(replayed, copies, "every second copy dropped as a replay");
    // Much later, all of it again.
    for p in kept.borrow().iter() {
        pass_on(&mut world, p.clone());
    }
    world.run_until_idle(1_000_000).unwrap();
    assert_eq!(handed_up(&world, 2, 1, 1), once);
    let replayed = world.core_mut(2).session_security(1).unwrap().replayed;
    assert_eq!(replayed, 2 * copies);
}

/// Junction 2 makes up traffic from junction 1 for junction 3: a sealed
/// frame under keys it does not have, and a session frame in clear.
/// Junction 3 takes neither, and the real session goes on.
#[test]
fn frames_forged_by_a_transit_junction_are_refused() {
    let (mut world, _) = line_of(&Bus::new(), seed_from_env(8_600));
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"real"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    let data = SessionFrame::Data(SessionData {
        from_incarnation: 1,
        to_incarnation: 1,
        lane: 1,
        seq: 1,
        base: 0,
    });
    let mut sealed = BytesMut::new();
    envelope::encode(&Envelope::Sealed { counter: 1_000 }, &mut sealed);
    junction_road::session::encode(&data, b"forged", &mut sealed);
    sealed.extend_from_slice(&[0; 16]);
    pass_on(&mut world, sealed.freeze());
    pass_on(
        &mut world,
        envelope::plain(&data, &Bytes::from_static(b"forged").into()).to_bytes(),
    );
    world.run_until_idle(100_000).unwrap();
    assert_eq!(handed_up(&world, 2, 1, 1), vec![(0, b"real".to_vec())]);
    let stats = world.core_mut(2).session_security(1).unwrap();
    assert_eq!((stats.unsealed, stats.malformed), (1, 1));
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"still real"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    assert_eq!(
        handed_up(&world, 2, 1, 1),
        vec![(0, b"real".to_vec()), (1, b"still real".to_vec())]
    );
}

/// A hello from junction 1 to 3 (1 starts handshakes: the lower id),
/// signed with `key` and carrying `chain`.
fn hello_as_one(key: &SecretKey, chain: &[Certificate]) -> Bytes {
    let ephemeral = Ephemeral::generate().unwrap().public();
    let transcript = HelloTranscript {
        from: 1,
        to: 3,
        incarnation: 1,
        ephemeral,
        echo: None,
    };
    let hello = Envelope::Hello(SessionHello {
        incarnation: 1,
        ephemeral,
        echo: None,
        chain: chain.to_vec(),
        signature: transcript.sign(key),
    });
    let mut buf = BytesMut::new();
    envelope::encode(&hello, &mut buf);
    buf.freeze()
}

/// Junction 2 opens a session with junction 3 in junction 1's name: with
/// its own key and certificate, with its key and 1's certificate, with a
/// certificate for another junction id, and with one from another bus's
/// authority. Junction 3 refuses every hello, makes no keys, and the real
/// session with junction 1 goes on.
#[test]
fn hellos_in_another_junctions_name_are_refused() {
    let bus = Bus::new();
    let (mut world, ids) = line_of(&bus, seed_from_env(8_700));
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"real"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    let (one, two) = (&ids[0], &ids[1]);
    let seven = bus.certify(Role::Junction { id: 7 });
    let stranger = Bus::new().certify(Role::Junction { id: 1 });
    let forged = [
        hello_as_one(&two.0, &two.1),
        hello_as_one(&two.0, &one.1),
        hello_as_one(&seven.0, &seven.1),
        hello_as_one(&stranger.0, &stranger.1),
    ];
    for hello in forged {
        pass_on(&mut world, hello);
    }
    world.run_until_idle(100_000).unwrap();
    let stats = world.core_mut(2).session_security(1).unwrap();
    assert_eq!(stats.hellos_refused, 4);
    assert_eq!(stats.handshakes, 1, "no keys made with a forger");
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"still real"))
        .unwrap();
    world
        .junction_send(2, 1, 1, Bytes::from_static(b"and back"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    assert_eq!(
        handed_up(&world, 2, 1, 1),
        vec![(0, b"real".to_vec()), (1, b"still real".to_vec())]
    );
    assert_eq!(handed_up(&world, 0, 3, 1), vec![(0, b"and back".to_vec())]);
}

/// A junction that restarts (a new incarnation, no keys) gets new keys
/// with its peer, whichever end it is, and traffic goes on.
#[test]
fn a_restarted_junction_gets_new_keys() {
    for restarted in [0usize, 2] {
        let bus = Bus::new();
        let (mut world, ids) = line_of(&bus, seed_from_env(8_800));
        world
            .junction_send(0, 3, 1, Bytes::from_static(b"before"))
            .unwrap();
        world.run_until_idle(100_000).unwrap();
        let junction = restarted as u16 + 1;
        let mut config = bus.config(junction, ids[restarted].clone());
        config.incarnation = 2;
        let now = world.now();
        *world.core_mut(restarted) = junction_core::Core::new(config, now);
        let neighbour = 2;
        world
            .core_mut(restarted)
            .handle_highway_up(neighbour, 1, now);
        world.core_mut(1).handle_highway_down(junction, now);
        world.core_mut(1).handle_highway_up(junction, 1, now);
        while world.core_mut(restarted).poll_output().is_some() {}
        while world.core_mut(1).poll_output().is_some() {}
        // Routing settles again through the normal flood.
        world.cut_link(if restarted == 0 { 0 } else { 1 });
        world.run_until_idle(100_000).unwrap();
        world.heal_link(if restarted == 0 { 0 } else { 1 });
        world.run_until_idle(100_000).unwrap();
        let (from_node, to) = if restarted == 0 { (2, 1) } else { (0, 3) };
        world
            .junction_send(from_node, to, 1, Bytes::from_static(b"after"))
            .unwrap();
        world.run_until_idle(1_000_000).unwrap();
        let at = if restarted == 0 { 0 } else { 2 };
        let from = if restarted == 0 { 3 } else { 1 };
        assert!(
            handed_up(&world, at, from, 1).contains(&(0, b"after".to_vec())),
            "restarted node {restarted}: {:?}",
            delivered(&world)
        );
        let (other, peer) = if restarted == 0 { (2, 1) } else { (0, 3) };
        let stats = world.core_mut(other).session_security(peer).unwrap();
        assert_eq!(stats.handshakes, 2, "restarted node {restarted}: new keys");
    }
}

/// Junctions with no keys, trusting unsigned routing (development), carry
/// sessions in clear: unauthenticated, readable on the way.
#[test]
fn keyless_junctions_carry_sessions_in_clear() {
    let unsigned = |junction| Config {
        junction,
        incarnation: 1,
        trust_unsigned_routing: true,
        ..Config::default()
    };
    let mut world = World::<Nobody>::with_junctions(
        seed_from_env(8_900),
        vec![unsigned(1), unsigned(2), unsigned(3)],
    );
    world.add_link(0, 1, 1, wan());
    world.add_link(1, 2, 1, wan());
    world.run_until_idle(10_000).unwrap();
    let seen = Rc::new(RefCell::new(Vec::<Bytes>::new()));
    let record = seen.clone();
    world.danger_tamper_forwards(Box::new(move |_, _, _, payload| {
        record.borrow_mut().push(payload.clone());
        Forwarded::Pass
    }));
    world
        .junction_send(0, 3, 1, Bytes::from_static(b"in clear"))
        .unwrap();
    world.run_until_idle(100_000).unwrap();
    assert_eq!(handed_up(&world, 2, 1, 1), vec![(0, b"in clear".to_vec())]);
    assert!(seen.borrow().iter().any(|p| contains(p, b"in clear")));
    assert!(
        seen.borrow()
            .iter()
            .all(|p| envelope_of(p) == Some(Envelope::Plain))
    );
}
