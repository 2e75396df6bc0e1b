//! Several junctions in one simulated world, joined by simulated Highways:
//! the real cores, a fake clock, links cut and healed, every run seeded
//! (`JUNCTION_SIM_SEED` replays one). Issue 8 grows this file with remote
//! capabilities, sessions and end-to-end delivery; it starts with routing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use junction_core::Config;
use junction_road::Frame;
use junction_tests::sim::{Ctx, Latency, Process, Rng, World, seed_from_env};

/// No processes in these worlds yet: junctions only.
struct Nobody;

impl Process for Nobody {
    fn poll_transmit(&mut self) -> Option<Frame> {
        None
    }
    fn handle_frame(&mut self, _frame: Frame, _ctx: &mut Ctx<'_>) {}
    fn handle_road_closed(&mut self, _ctx: &mut Ctx<'_>) {}
}

/// Junctions 1..=n, one node each (node i is junction i + 1).
fn junctions(seed: u64, n: u16) -> World<Nobody> {
    let configs = (1..=n)
        .map(|junction| Config {
            junction,
            incarnation: 1,
            ..Config::default()
        })
        .collect();
    World::with_junctions(seed, configs)
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
    let first = seed_from_env(1_000);
    let runs = if std::env::var(junction_tests::sim::SEED_VAR).is_ok() {
        1
    } else {
        200
    };
    for seed in first..first + runs {
        if let Err(e) = std::panic::catch_unwind(|| one_network(seed)) {
            panic!(
                "seed {seed} failed (replay with JUNCTION_SIM_SEED={seed}): {:?}",
                e.downcast_ref::<String>()
            );
        }
    }
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
