//! Deterministic simulations of the junction: the real core and real driver
//! state machines in one simulated world (`junction_tests::sim`), random
//! operations from many processes, crashes and time passing, then the
//! delivery contract checked end to end by the oracle.
//!
//! Every run is fixed by its seed. A failure prints the seed; run again
//! with `JUNCTION_SIM_SEED=<seed>` to replay exactly that run (and only it).

use std::time::{Duration, Instant};

use junction_road::{Frame, Header};
use junction_tests::sim::oracle::Summary;
use junction_tests::sim::workload::{self, Op, Plan};
use junction_tests::sim::{Latency, SEED_VAR, Tamper, Tampered, seed_from_env};

/// Runs the plan `name` for each seed (or only the one in
/// `JUNCTION_SIM_SEED`), panicking with the replay instructions on the
/// first failure.
fn run_seeds(name: &str, seeds: std::ops::Range<u64>) {
    let plan = &plan(name);
    let started = Instant::now();
    let seeds: Vec<u64> = match std::env::var(SEED_VAR) {
        Ok(_) => vec![seed_from_env(0)],
        Err(_) => seeds.collect(),
    };
    let (mut ops, mut steps, mut crashes) = (0, 0, 0);
    let mut summary = Summary::default();
    for &seed in &seeds {
        match workload::run(seed, plan) {
            Ok(r) => {
                ops += r.ops;
                steps += r.steps;
                crashes += r.crashes;
                summary.add(&r.summary);
            }
            Err(e) => panic!(
                "{name}: {e}\n(print its trace with JUNCTION_SIM_PLAN={name:?} \
                 {SEED_VAR}={seed} cargo test -p junction-tests --test simulation \
                 print_trace -- --ignored --nocapture)"
            ),
        }
    }
    eprintln!(
        "{name}: {} seeds, {ops} operations, {crashes} crashes, {steps} world steps in {:?}; {summary:?}",
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn one_seed_replays_the_same_run() {
    let seed = seed_from_env(42);
    for name in PLANS {
        let plan = Plan {
            ops: 150,
            ..plan(name)
        };
        let (wa, a) = workload::run_world(seed, &plan, |_| {}).unwrap();
        let (wb, b) = workload::run_world(seed, &plan, |_| {}).unwrap();
        assert_eq!(
            a.digest, b.digest,
            "{name}: seed {seed} gave two different traces"
        );
        assert_eq!(wa.trace().len(), wb.trace().len());
        for (x, y) in wa.trace().iter().zip(wb.trace()) {
            assert_eq!(format!("{x:?}"), format!("{y:?}"), "{name}: seed {seed}");
        }
        let (_, c) = workload::run_world(seed.wrapping_add(1), &plan, |_| {}).unwrap();
        assert_ne!(a.digest, c.digest, "{name}: two seeds gave the same trace");
    }
}

/// The plans the simulations run, by name.
fn plan(name: &str) -> Plan {
    match name {
        "random operations" => Plan::tight(6, 400),
        "crashes" => Plan {
            crash_percent: 8,
            mute_percent: 20,
            ..Plan::tight(8, 300)
        },
        "expiries" => Plan {
            long_pause_percent: 20,
            ..Plan::tight(5, 300)
        },
        "slow roads" => Plan {
            latency: Latency {
                min: Duration::from_micros(1),
                max: Duration::from_millis(30),
            },
            ..Plan::tight(6, 400)
        },
        "hostile drivers" => Plan {
            rogue_percent: 40,
            ..Plan::tight(6, 500)
        },
        "default limits" => {
            let mut plan = Plan::tight(4, 600);
            plan.config = junction_core::Config {
                dev_namespace: plan.config.dev_namespace.clone(),
                ..junction_core::Config::default()
            };
            plan
        }
        "cramped limits" => {
            let mut plan = Plan::tight(5, 400);
            plan.config.max_handles = 10;
            plan.config.max_pending_calls = 2;
            plan.config.max_ports = 3;
            plan
        }
        // Soak only: long histories, many processes.
        "long history" => Plan {
            crash_percent: 3,
            rogue_percent: 20,
            mute_percent: 10,
            long_pause_percent: 5,
            ..Plan::tight(12, 3000)
        },
        other => panic!("no plan named {other:?}"),
    }
}

/// Every plan's name.
const PLANS: [&str; 8] = [
    "random operations",
    "crashes",
    "expiries",
    "slow roads",
    "hostile drivers",
    "default limits",
    "cramped limits",
    "long history",
];

#[test]
fn delivery_contract_holds_under_random_operations() {
    run_seeds("random operations", 0..80);
}

#[test]
fn delivery_contract_holds_when_processes_crash() {
    run_seeds("crashes", 1000..1060);
}

#[test]
fn delivery_contract_holds_as_capabilities_expire() {
    run_seeds("expiries", 2000..2060);
}

#[test]
fn delivery_contract_holds_over_slow_uneven_roads() {
    run_seeds("slow roads", 3000..3060);
}

#[test]
fn delivery_contract_holds_beside_hostile_drivers() {
    run_seeds("hostile drivers", 5000..5040);
}

#[test]
fn delivery_contract_holds_within_cramped_limits() {
    run_seeds("cramped limits", 6000..6040);
}

#[test]
fn delivery_contract_holds_with_default_limits() {
    run_seeds("default limits", 4000..4040);
}

/// Runs a plan with a broken junction (`tamper` between the core and its
/// Roads) and returns what the oracle said.
fn oracle_verdict(seed: u64, tamper: Box<Tamper>) -> Result<(), String> {
    let plan = Plan::tight(6, 400);
    let (world, _) = workload::run_world(seed, &plan, |w| w.danger_tamper_outputs(tamper))
        .map_err(|e| e.to_string())?;
    workload::check(&world, &plan)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Every `n`th frame that `pick` selects gets `what`.
fn every_nth(n: u32, what: Tampered, pick: fn(&Header) -> bool) -> Box<Tamper> {
    let mut seen = 0;
    Box::new(move |_, _, frame: &Frame| {
        if !pick(&frame.header) {
            return Tampered::Pass;
        }
        seen += 1;
        if seen % n == 0 { what } else { Tampered::Pass }
    })
}

#[test]
fn the_audit_catches_a_junction_that_keeps_credit() {
    let plan = Plan::tight(6, 400);
    let tamper = every_nth(1, Tampered::Lose, |h| {
        matches!(h, Header::SendCredit { .. })
    });
    let (mut world, _) =
        workload::run_world(4, &plan, |w| w.danger_tamper_outputs(tamper)).unwrap();
    let err = workload::audit(&mut world).expect_err("credit that never came back went unnoticed");
    assert!(err.to_string().contains("credits left"), "{err}");
}

#[test]
fn the_oracle_catches_a_junction_that_loses_notices() {
    let verdict = oracle_verdict(
        1,
        every_nth(3, Tampered::Lose, |h| {
            matches!(h, Header::Undeliverable { .. })
        }),
    );
    let err = verdict.expect_err("lost Undeliverable notices went unnoticed");
    assert!(
        err.contains("not told") || err.contains("neither delivered nor reported"),
        "{err}"
    );
}

#[test]
fn the_oracle_catches_a_junction_that_delivers_twice() {
    let verdict = oracle_verdict(
        2,
        every_nth(
            7,
            Tampered::Duplicate,
            |h| matches!(h, Header::Deliver(d) if d.origin.port != 0 && d.tag == 0),
        ),
    );
    let err = verdict.expect_err("duplicate deliveries went unnoticed");
    assert!(err.contains("delivered twice"), "{err}");
}

#[test]
fn the_oracle_catches_a_junction_that_loses_calls() {
    let verdict = oracle_verdict(
        3,
        every_nth(5, Tampered::Lose, |h| {
            matches!(h, Header::CallFailed { .. })
        }),
    );
    let err = verdict.expect_err("lost CallFailed notices went unnoticed");
    assert!(
        err.contains("never ended") || err.contains("ended 0 times"),
        "{err}"
    );
}

/// A long soak over many seeds and every plan, for hunting bugs by hand:
/// `JUNCTION_SIM_SOAK=<seeds> cargo test --release -p junction-tests
/// --test simulation soak -- --ignored --nocapture`.
#[test]
#[ignore = "a long soak, run by hand"]
fn soak() {
    let seeds: u64 = std::env::var("JUNCTION_SIM_SOAK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let base = 1_000_000;
    let mut failures = Vec::new();
    for (i, name) in PLANS.iter().enumerate() {
        let plan = plan(name);
        let start = base * (i as u64 + 1);
        for seed in start..start + seeds {
            if let Err(e) = workload::run(seed, &plan) {
                eprintln!("{name}: {e}");
                failures.push(seed);
                break;
            }
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

// Regression tests: each short script pins a bug the simulation found (the
// seeds that found them were not recorded), and runs once with the oracle
// and the handle audit as strict as for random plans.

/// Runs a script on `processes` processes with the tight configuration,
/// then settles, audits and checks it; panics with what broke.
fn regression(processes: usize, script: &[(usize, Op)]) {
    let plan = Plan::tight(processes, 0);
    if let Err(e) = workload::run_script(1, &plan, script) {
        panic!("{e}");
    }
}

/// Found by the random plans (the driver machine then thought it copied
/// such a capability and offered it after passing it on; the junction
/// answered UnknownHandle). Now attenuating a budgeted capability without
/// naming a budget gives one that inherits the budget and moves, and the
/// driver machine knows it.
#[test]
fn attenuating_a_budgeted_capability_without_a_budget_gives_one_that_moves() {
    let attenuate = |cap, budget| Op::Attenuate {
        cap,
        grant: true,
        expires_in: None,
        budget,
        revocable: false,
    };
    regression(
        1,
        &[
            // held: [0] its port's capability, [1] budget 3, [2] inherits it.
            (0, attenuate(0, Some(3))),
            (0, attenuate(1, None)),
            // Pass [2] on to its own port: it moves away.
            (
                0,
                Op::Send {
                    cap: 0,
                    attach: vec![2],
                    len: 18,
                },
            ),
            // Only [0] and [1] are left to send on.
            (
                0,
                Op::Send {
                    cap: 2,
                    attach: vec![],
                    len: 18,
                },
            ),
        ],
    );
}

/// Found by the handle audit under the random plans (a moving capability
/// attached to a message the junction refused stayed in the sender's
/// table while its driver counted it gone: a handle nobody could drop).
/// Now a refused or undeliverable `Send`/`Call` takes the moving
/// capabilities it attaches out of the sender's table all the same
/// (protocol 6.1).
#[test]
fn a_refused_message_takes_its_moving_attachments_with_it() {
    regression(
        2,
        &[
            // p0 held: [0] its port's capability, [1] send-once+grant to it.
            (0, Op::Mint { port: 0, rights: 3 }),
            // p0 held: [2] a capability to p1's port, which p1 then closes.
            (0, Op::Lookup { pid: 1, port: 0 }),
            (1, Op::ClosePort { port: 0 }),
            (
                0,
                Op::Send {
                    cap: 2,
                    attach: vec![1],
                    len: 18,
                },
            ),
        ],
    );
}

/// Found by the handle audit under the random plans (a send-once
/// capability dead on its own, because its port died while an earlier
/// holder watched it, was refused without being consumed, while its new
/// holder's driver counted it used). Now a send-once capability is used up
/// by its use even when dead on its own (protocol 6.1 step 4).
#[test]
fn a_dead_send_once_capability_is_used_up_by_its_use() {
    regression(
        2,
        &[
            // p0: a second port (ports [1]), held [1] its registered capability.
            (0, Op::OpenPort),
            // held [2]: send-once+grant to that port, watched.
            (0, Op::Mint { port: 1, rights: 3 }),
            (0, Op::Watch { cap: 2 }),
            // held [3]: a capability to p1's port.
            (0, Op::Lookup { pid: 1, port: 0 }),
            (0, Op::ClosePort { port: 1 }),
            // Pass the dead send-once capability to p1 (its held [1]), who
            // reads the message and uses it.
            (
                0,
                Op::Send {
                    cap: 3,
                    attach: vec![2],
                    len: 18,
                },
            ),
            (1, Op::Read { n: 1, answer: 0 }),
            (
                1,
                Op::Send {
                    cap: 1,
                    attach: vec![],
                    len: 18,
                },
            ),
        ],
    );
}

/// Prints the trace of one run, for reading a failure:
/// `JUNCTION_SIM_PLAN=crashes JUNCTION_SIM_SEED=1017 [JUNCTION_SIM_CONN=3]
/// cargo test -p junction-tests --test simulation print_trace -- --ignored
/// --nocapture` (only the frames of connection 3, if given).
#[test]
#[ignore = "a tool, run by hand"]
fn print_trace() {
    use junction_tests::sim::Traced;
    let name = std::env::var("JUNCTION_SIM_PLAN").unwrap_or_else(|_| PLANS[0].into());
    let conn: Option<u64> = std::env::var("JUNCTION_SIM_CONN")
        .ok()
        .and_then(|c| c.parse().ok());
    let plan = plan(&name);
    let (world, _) = match workload::run_world(seed_from_env(0), &plan, |_| {}) {
        Ok(w) => w,
        Err(e) => panic!("{e}"),
    };
    for e in world.trace() {
        let shown = match &e.what {
            Traced::CoreIn { conn: c, .. }
            | Traced::CoreOut { conn: c, .. }
            | Traced::CoreClosed { conn: c, .. }
            | Traced::Disconnected { conn: c, .. } => conn.is_none_or(|want| want == *c),
            _ => true,
        };
        if shown {
            eprintln!("{:>6} {:>12?} {:?}", e.step, e.at, e.what);
        }
    }
}

/// Found by the hostile drivers plan (the junction delivered a `Call` on
/// a reply capability as the reply, carrying a reply capability the
/// caller's driver never surfaced: a handle leaked in an honest caller, and
/// a call that never ended). Now such a call is refused with
/// `UnexpectedFrame`, the reply capability is used up, and the call it
/// answers fails with `ReplyDropped` (protocol 6.1 step 5).
#[test]
fn a_reply_that_is_a_call_is_refused() {
    regression(
        2,
        &[
            // p0 held [1]: a capability to p1's port; it calls p1.
            (0, Op::Lookup { pid: 1, port: 0 }),
            (
                0,
                Op::Call {
                    cap: 1,
                    attach: vec![],
                },
            ),
            (1, Op::Read { n: 1, answer: 0 }),
            (1, Op::ReplyWithCall { owed: 0 }),
        ],
    );
}

/// Finds the shortest run of a failing plan and seed: the fewest random
/// operations (a prefix of the same run) that still fail, and prints what
/// they were: `JUNCTION_SIM_PLAN=crashes JUNCTION_SIM_SEED=1017 cargo test
/// -p junction-tests --test simulation shrink -- --ignored --nocapture`.
#[test]
#[ignore = "a tool, run by hand"]
fn shrink() {
    let name = std::env::var("JUNCTION_SIM_PLAN").unwrap_or_else(|_| PLANS[0].into());
    let seed = seed_from_env(0);
    let full = plan(&name);
    let fails = |ops: usize| {
        workload::run(
            seed,
            &Plan {
                ops,
                ..full.clone()
            },
        )
        .is_err()
    };
    if !fails(full.ops) {
        eprintln!("{name} with seed {seed} passes");
        return;
    }
    // The smallest failing prefix, by bisection (failures need not be
    // monotonic in the prefix, so this finds a short one, not always the
    // shortest).
    let (mut good, mut bad) = (0, full.ops);
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if fails(mid) { bad = mid } else { good = mid }
    }
    let short = Plan {
        ops: bad,
        ..full.clone()
    };
    let (_, report) = workload::run_world(seed, &short, |_| {}).unwrap();
    eprintln!("{name}, seed {seed}: fails after {bad} operations:");
    for step in &report.script {
        eprintln!("  {step:?}");
    }
    eprintln!("{}", workload::run(seed, &short).unwrap_err());
}
