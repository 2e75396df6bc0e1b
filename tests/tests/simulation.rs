//! Deterministic simulations of the junction: the real core and real driver
//! state machines in one simulated world (`junction_tests::sim`), random
//! operations from many processes, crashes and time passing, then the
//! delivery contract checked end to end by the oracle.
//!
//! Every run is fixed by its seed. A failure prints the seed; run again
//! with `JUNCTION_SIM_SEED=<seed>` to replay exactly that run (and only it).

use std::time::Instant;

use junction_tests::sim::workload::{self, Plan};
use junction_tests::sim::{SEED_VAR, seed_from_env};

/// Runs `plan` for each seed (or only the one in `JUNCTION_SIM_SEED`),
/// panicking with the replay instructions on the first failure.
fn run_seeds(name: &str, seeds: std::ops::Range<u64>, plan: &Plan) {
    let started = Instant::now();
    let seeds: Vec<u64> = match std::env::var(SEED_VAR) {
        Ok(_) => vec![seed_from_env(0)],
        Err(_) => seeds.collect(),
    };
    let (mut ops, mut steps, mut messages, mut calls, mut listings) = (0, 0, 0, 0, 0);
    for &seed in &seeds {
        match workload::run(seed, plan) {
            Ok(r) => {
                ops += r.ops;
                steps += r.steps;
                messages += r.summary.messages;
                calls += r.summary.calls;
                listings += r.summary.listings;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    eprintln!(
        "{name}: {} seeds, {ops} operations, {messages} messages, {calls} calls, \
         {listings} listings, {steps} world steps in {:?}",
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn one_seed_replays_the_same_run() {
    let plan = Plan::tight(5, 300);
    let seed = seed_from_env(42);
    let (_, a) = workload::run_world(seed, &plan).unwrap();
    let (_, b) = workload::run_world(seed, &plan).unwrap();
    assert_eq!(a.digest, b.digest, "seed {seed} gave two different traces");
    assert_eq!(a.steps, b.steps);
    let (_, c) = workload::run_world(seed.wrapping_add(1), &plan).unwrap();
    assert_ne!(a.digest, c.digest, "two seeds gave the same trace");
}

#[test]
fn delivery_contract_holds_under_random_operations() {
    run_seeds("random operations", 0..40, &Plan::tight(6, 400));
}
