//! Routing proven in a simulated network: real routers, links cut and
//! healed, link states delivered in rounds (one round = one hop's latency).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use junction_identity::{CertBody, Role};
use proptest::prelude::*;

use super::*;

/// The Unix time the tests' certificates are checked at.
const NOW: u64 = 1_700_000_000;

/// A test authority, which certifies junctions.
pub(crate) struct Authority {
    key: SecretKey,
    pub(crate) trust: TrustStore,
}

impl Authority {
    pub(crate) fn new() -> Self {
        let key = SecretKey::generate().unwrap();
        let own = Certificate::authority(&key, 1, 0, u64::MAX).unwrap();
        let mut trust = TrustStore::new();
        trust.add_authority(&own).unwrap();
        Self { key, trust }
    }

    /// A new key, and a chain of one certificate for it in `role`.
    pub(crate) fn certify(&self, role: Role) -> (Arc<SecretKey>, Vec<Certificate>) {
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

    /// A router for junction `me`, sealing with a certificate for its id.
    pub(crate) fn router(&self, me: u16, incarnation: u64, max_junctions: usize) -> Router {
        let mut r = Router::new(me, incarnation, max_junctions);
        let (key, chain) = self.certify(Role::Junction { id: me });
        r.sign_with(key, chain);
        r
    }

    /// What this authority's junctions check link states against.
    pub(crate) fn checks(&self) -> Checks<'_> {
        Checks {
            trust: &self.trust,
            revocations: None,
            trust_unsigned: false,
            now: NOW,
        }
    }
}

/// Routers joined by links, link states moving one hop per round.
struct Net {
    authority: Authority,
    routers: BTreeMap<u16, Router>,
    /// Live links and their costs, each pair once (lower id first).
    links: BTreeMap<(u16, u16), u32>,
    /// Link states on their way: to, from, what.
    wire: VecDeque<(u16, u16, LinkState)>,
}

fn pair(a: u16, b: u16) -> (u16, u16) {
    (a.min(b), a.max(b))
}

impl Net {
    fn new(ids: impl IntoIterator<Item = u16>) -> Self {
        let authority = Authority::new();
        let routers = ids
            .into_iter()
            .map(|id| (id, authority.router(id, 1, 64)))
            .collect();
        Self {
            authority,
            routers,
            links: BTreeMap::new(),
            wire: VecDeque::new(),
        }
    }

    fn heal(&mut self, a: u16, b: u16, cost: u32) {
        if a == b || self.links.contains_key(&pair(a, b)) {
            return;
        }
        self.links.insert(pair(a, b), cost);
        self.routers.get_mut(&a).unwrap().link_up(b, cost);
        self.routers.get_mut(&b).unwrap().link_up(a, cost);
    }

    fn cut(&mut self, a: u16, b: u16) {
        if self.links.remove(&pair(a, b)).is_some() {
            self.routers.get_mut(&a).unwrap().link_down(b);
            self.routers.get_mut(&b).unwrap().link_down(a);
        }
    }

    /// One round: what is on the wire arrives (if its link still lives),
    /// and what that makes the routers say goes on the wire. Whether
    /// anything moved.
    fn round(&mut self) -> bool {
        for (&from, r) in self.routers.iter_mut() {
            while let Some((to, ls)) = r.poll_transmit() {
                self.wire.push_back((to, from, ls));
            }
        }
        let arriving: Vec<_> = self.wire.drain(..).collect();
        let moved = !arriving.is_empty();
        let checks = self.authority.checks();
        for (to, from, ls) in arriving {
            if self.links.contains_key(&pair(to, from)) {
                self.routers
                    .get_mut(&to)
                    .unwrap()
                    .handle_link_state(from, ls, &checks)
                    .unwrap();
            }
        }
        moved
    }

    /// Runs rounds until nothing moves; how many moved.
    fn settle(&mut self) -> usize {
        let mut rounds = 0;
        while self.round() {
            rounds += 1;
            assert!(rounds < 1000, "routing never settled");
        }
        rounds
    }

    /// Shortest costs from `from` over the live links: the truth.
    fn truth(&self, from: u16) -> BTreeMap<u16, u64> {
        let mut dist = BTreeMap::from([(from, 0u64)]);
        let mut heap = BinaryHeap::from([Reverse((0u64, from))]);
        while let Some(Reverse((d, at))) = heap.pop() {
            if dist.get(&at).is_some_and(|&best| best < d) {
                continue;
            }
            for (&(a, b), &c) in &self.links {
                let next = match (a == at, b == at) {
                    (true, _) => b,
                    (_, true) => a,
                    _ => continue,
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

    /// The most hops between two junctions that reach each other.
    fn diameter(&self) -> usize {
        let mut worst = 0;
        for &from in self.routers.keys() {
            let mut hops = BTreeMap::from([(from, 0usize)]);
            let mut queue = VecDeque::from([from]);
            while let Some(at) = queue.pop_front() {
                for &(a, b) in self.links.keys() {
                    let next = match (a == at, b == at) {
                        (true, _) => b,
                        (_, true) => a,
                        _ => continue,
                    };
                    if !hops.contains_key(&next) {
                        hops.insert(next, hops[&at] + 1);
                        queue.push_back(next);
                    }
                }
            }
            worst = worst.max(hops.values().copied().max().unwrap_or(0));
        }
        worst
    }

    /// Every route any router holds is a path that repeats no junction and
    /// starts at a neighbour it has a link to.
    fn routes_are_paths(&mut self) {
        let ids: Vec<u16> = self.routers.keys().copied().collect();
        for &from in &ids {
            for &to in &ids {
                let r = self.routers.get_mut(&from).unwrap();
                let Some(route) = r.route(to).cloned() else {
                    continue;
                };
                assert_eq!(route.path.last(), Some(&to));
                assert!(!route.path.contains(&from), "{from}→{to}: {route:?}");
                assert_eq!(first_repeat(&route.path), None, "{from}→{to}: {route:?}");
                assert!(r.links.contains_key(&route.path[0]));
            }
        }
    }

    /// Once settled: each router has a route to exactly the junctions it
    /// reaches, at the true shortest cost, along live links.
    fn routes_are_right(&mut self) {
        let ids: Vec<u16> = self.routers.keys().copied().collect();
        for &from in &ids {
            let truth = self.truth(from);
            for &to in &ids {
                if to == from {
                    continue;
                }
                let route = self.routers.get_mut(&from).unwrap().route(to).cloned();
                match (truth.get(&to), route) {
                    (None, None) => {}
                    (Some(&cost), Some(route)) => {
                        assert_eq!(route.cost, cost, "{from}→{to}: {route:?}");
                        let mut at = from;
                        for &hop in &route.path {
                            assert!(
                                self.links.contains_key(&pair(at, hop)),
                                "{from}→{to} uses a dead link {at}-{hop}: {route:?}"
                            );
                            at = hop;
                        }
                    }
                    (truth, route) => {
                        panic!("{from}→{to}: reachable at {truth:?}, but routed {route:?}")
                    }
                }
            }
        }
    }
}

#[test]
fn a_line_routes_over_two_hops() {
    let mut net = Net::new([1, 2, 3]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.settle();
    let r = net.routers.get_mut(&1).unwrap().route(3).cloned().unwrap();
    assert_eq!(r.path, vec![2, 3]);
    assert_eq!(r.cost, 2);
    net.routes_are_right();
    // Transit: 2 passes it on to 3, 3 keeps it.
    assert_eq!(net.routers[&2].next_hop(&r.path), Ok(Some(3)));
    assert_eq!(net.routers[&3].next_hop(&r.path), Ok(None));
}

#[test]
fn a_triangle_fails_over_and_recovers() {
    let mut net = Net::new([1, 2, 3]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.heal(1, 3, 5);
    net.settle();
    assert_eq!(
        net.routers.get_mut(&1).unwrap().route(3).unwrap().path,
        vec![2, 3]
    );
    net.cut(2, 3);
    // Until it hears, 2 says the route is broken rather than looping it.
    assert_eq!(
        net.routers[&2].next_hop(&[2, 3]),
        Err(RouteBroken::LinkDown { next: 3 })
    );
    net.settle();
    assert_eq!(
        net.routers.get_mut(&1).unwrap().route(3).unwrap().path,
        vec![3]
    );
    assert_eq!(
        net.routers.get_mut(&2).unwrap().route(3).unwrap().path,
        vec![1, 3]
    );
    net.heal(2, 3, 1);
    net.settle();
    assert_eq!(
        net.routers.get_mut(&1).unwrap().route(3).unwrap().path,
        vec![2, 3]
    );
    net.routes_are_right();
}

#[test]
fn a_restarted_junction_replaces_what_it_said_before() {
    let mut net = Net::new([1, 2]);
    net.heal(1, 2, 1);
    net.settle();
    // 2 restarts: a new incarnation, with its counter back at the start.
    net.cut(1, 2);
    net.routers.insert(2, net.authority.router(2, 2, 64));
    net.routers.get_mut(&1).unwrap().link_up(2, 1);
    net.routers.get_mut(&2).unwrap().link_up(1, 1);
    net.links.insert((1, 2), 1);
    net.settle();
    net.routes_are_right();
    // A junction that hears its own old description says a newer one.
    let mut stale = net.routers[&1].db[&1].clone();
    stale.seq = 1_000;
    let (key, chain) = net.routers[&1].signer.clone().unwrap();
    stale.seal(&key, chain).unwrap();
    let checks = net.authority.checks();
    net.routers
        .get_mut(&1)
        .unwrap()
        .handle_link_state(2, stale, &checks)
        .unwrap();
    net.settle();
    net.routes_are_right();
}

#[test]
fn bad_link_states_are_refused_with_reasons() {
    let mut r = Router::new(1, 1, 2);
    let ls = |origin, neighbours: &[(u16, u32)]| LinkState {
        origin,
        incarnation: 1,
        seq: 1,
        neighbours: neighbours
            .iter()
            .map(|&(junction, cost)| Neighbour { junction, cost })
            .collect(),
        names: Vec::new(),
        seal: None,
    };
    // What is checked here comes before seals: unsealed ones are taken.
    let trust = TrustStore::new();
    let checks = Checks {
        trust: &trust,
        revocations: None,
        trust_unsigned: true,
        now: NOW,
    };
    let mut r = Tested(&mut r, &checks);
    assert_eq!(
        r.handle_link_state(2, ls(2, &[])),
        Err(RoutingError::NotNeighbour { from: 2 })
    );
    r.link_up(2, 1);
    assert_eq!(
        r.handle_link_state(2, ls(0, &[])),
        Err(RoutingError::ReservedId { id: 0 })
    );
    assert_eq!(
        r.handle_link_state(2, ls(2, &[(u16::MAX, 1)])),
        Err(RoutingError::ReservedId { id: u16::MAX })
    );
    assert!(matches!(
        r.handle_link_state(2, ls(2, &[(3, 1), (3, 1)])),
        Err(RoutingError::BadNeighbours { .. })
    ));
    assert!(matches!(
        r.handle_link_state(2, ls(2, &[(2, 1)])),
        Err(RoutingError::BadNeighbours { .. })
    ));
    assert!(matches!(
        r.handle_link_state(2, ls(2, &[(3, 0)])),
        Err(RoutingError::BadNeighbours { .. })
    ));
    let many: Vec<(u16, u32)> = (3..3 + MAX_NEIGHBOURS as u16 + 1).map(|j| (j, 1)).collect();
    assert!(matches!(
        r.handle_link_state(2, ls(2, &many)),
        Err(RoutingError::TooManyNeighbours { .. })
    ));
    r.handle_link_state(2, ls(2, &[(1, 1)])).unwrap();
    assert_eq!(
        r.handle_link_state(2, ls(3, &[])),
        Err(RoutingError::Full { limit: 2 }),
        "the database is bounded"
    );
    assert_eq!(r.known(), 2);
    // Routes that loop, or skip this junction, are refused.
    assert_eq!(
        r.next_hop(&[2, 1, 2]),
        Err(RouteBroken::Loops { junction: 2 })
    );
    assert_eq!(r.next_hop(&[2, 3]), Err(RouteBroken::NotOnRoute));
}

/// A router and what it checks seals against, for terse tests.
struct Tested<'a, 'b>(&'a mut Router, &'a Checks<'b>);

impl Tested<'_, '_> {
    fn handle_link_state(&mut self, from: u16, ls: LinkState) -> Result<(), RoutingError> {
        self.0.handle_link_state(from, ls, self.1)
    }
    fn link_up(&mut self, neighbour: u16, cost: u32) {
        self.0.link_up(neighbour, cost)
    }
    fn known(&self) -> usize {
        self.0.known()
    }
    fn next_hop(&self, path: &[u16]) -> Result<Option<u16>, RouteBroken> {
        self.0.next_hop(path)
    }
}

/// One change to the network.
#[derive(Debug, Clone)]
enum Change {
    Cut(u16, u16),
    Heal(u16, u16, u32),
}

/// A network to start from: how many junctions, which links at what cost,
/// then changes, each followed by a number of rounds.
type Scenario = (u16, Vec<(u16, u16, u32)>, Vec<(Change, usize)>);

fn network() -> impl Strategy<Value = Scenario> {
    (2u16..=8).prop_flat_map(|n| {
        let id = 1..=n;
        let link = (id.clone(), id.clone(), 1u32..10);
        let change = prop_oneof![
            (id.clone(), id.clone()).prop_map(|(a, b)| Change::Cut(a, b)),
            (id.clone(), id.clone(), 1u32..10).prop_map(|(a, b, c)| Change::Heal(a, b, c)),
        ];
        (
            Just(n),
            prop::collection::vec(link, 0..16),
            prop::collection::vec((change, 0usize..3), 0..24),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Over random networks of up to 8 junctions, with random cuts and heals
    /// while link states are still on their way: every route at every round
    /// is a loop-free path; once the last change has flooded through (in at
    /// most diameter + 1 rounds), every junction routes to exactly those it
    /// reaches, at the shortest cost, over live links.
    #[test]
    fn routes_converge_without_loops((n, links, changes) in network()) {
        let mut net = Net::new(1..=n);
        for (a, b, c) in links {
            net.heal(a, b, c);
        }
        for (change, rounds) in changes {
            match change {
                Change::Cut(a, b) => net.cut(a, b),
                Change::Heal(a, b, c) => net.heal(a, b, c),
            }
            for _ in 0..rounds {
                net.round();
                net.routes_are_paths();
            }
        }
        let rounds = net.settle();
        net.routes_are_paths();
        net.routes_are_right();
        let diameter = net.diameter();
        prop_assert!(
            rounds <= diameter + 2,
            "settled in {} rounds, diameter {}", rounds, diameter
        );
    }
}

/// A link state from `origin` listing `neighbours` at cost 1, in its first
/// life at count `seq`, unsealed.
fn describing(origin: u16, seq: u64, neighbours: &[u16]) -> LinkState {
    LinkState {
        origin,
        incarnation: 1,
        seq,
        neighbours: neighbours
            .iter()
            .map(|&junction| Neighbour { junction, cost: 1 })
            .collect(),
        names: Vec::new(),
        seal: None,
    }
}

#[test]
fn only_a_junction_certified_for_the_origin_describes_its_links() {
    let ca = Authority::new();
    let checks = ca.checks();
    let mut r = ca.router(1, 1, 64);
    r.link_up(2, 1);
    let sealed = |origin, seq, by: &(Arc<SecretKey>, Vec<Certificate>)| {
        let mut ls = describing(origin, seq, &[1]);
        ls.seal(&by.0, by.1.clone()).unwrap();
        ls
    };
    let two = ca.certify(Role::Junction { id: 2 });
    let three = ca.certify(Role::Junction { id: 3 });
    let seven = ca.certify(Role::Junction { id: 7 });

    // Unsealed, where seals are required.
    assert_eq!(
        r.handle_link_state(2, describing(2, 1, &[1]), &checks),
        Err(RoutingError::Unsigned { origin: 2 })
    );
    // Certified as junction 7, claiming to be junction 5.
    assert_eq!(
        r.handle_link_state(2, sealed(5, 1, &seven), &checks),
        Err(RoutingError::WrongJunction {
            origin: 5,
            certified: 7
        })
    );
    // Junction 3 describing junction 2: with its own chain, or with 2's
    // chain and its own key.
    assert_eq!(
        r.handle_link_state(2, sealed(2, 1, &three), &checks),
        Err(RoutingError::WrongJunction {
            origin: 2,
            certified: 3
        })
    );
    let mut forged = sealed(2, 1, &three);
    forged.seal.as_mut().unwrap().chain = two.1.clone();
    assert_eq!(
        r.handle_link_state(2, forged, &checks),
        Err(RoutingError::BadSignature { origin: 2 })
    );
    // Junction 2's own, altered on the way.
    let mut altered = sealed(2, 1, &two);
    altered.neighbours[0].cost = 9;
    assert_eq!(
        r.handle_link_state(2, altered, &checks),
        Err(RoutingError::BadSignature { origin: 2 })
    );
    // Another bus's authority, and certificates that are not a junction's.
    let stranger = Authority::new().certify(Role::Junction { id: 2 });
    assert!(matches!(
        r.handle_link_state(2, sealed(2, 1, &stranger), &checks),
        Err(RoutingError::Certificate {
            origin: 2,
            source: IdentityError::Untrusted { .. }
        })
    ));
    for role in [Role::Client, Role::Authority] {
        assert_eq!(
            r.handle_link_state(2, sealed(2, 1, &ca.certify(role.clone())), &checks),
            Err(RoutingError::NotAJunction {
                origin: 2,
                role: role.to_string()
            })
        );
    }
    assert_eq!(r.known(), 1, "nothing refused was taken");
    assert_eq!(r.poll_transmit().map(|(to, _)| to), Some(2));
    assert_eq!(r.poll_transmit(), None, "nor passed on");

    // The real one is taken, and routes use it.
    r.handle_link_state(2, sealed(2, 2, &two), &checks).unwrap();
    assert_eq!(r.route(2).map(|r| r.path.clone()), Some(vec![2]));
}

#[test]
fn a_replayed_older_link_state_changes_nothing_and_costs_no_check() {
    let ca = Authority::new();
    let checks = ca.checks();
    let mut r = ca.router(1, 1, 64);
    r.link_up(2, 1);
    r.link_up(3, 1);
    while r.poll_transmit().is_some() {}
    let two = ca.certify(Role::Junction { id: 2 });
    let mut old = describing(2, 1, &[1, 3]);
    old.seal(&two.0, two.1.clone()).unwrap();
    let mut new = describing(2, 2, &[1]);
    new.seal(&two.0, two.1.clone()).unwrap();
    r.handle_link_state(2, new.clone(), &checks).unwrap();
    while r.poll_transmit().is_some() {}
    let before = r.route(3).cloned();

    // Replayed by neighbour 3: the newer copy goes back to it, and nothing
    // else moves. With a broken signature too: older ones are not checked.
    let mut broken = old.clone();
    broken.seal.as_mut().unwrap().signature.0[0] ^= 1;
    for replay in [old, broken, new.clone()] {
        r.handle_link_state(3, replay, &checks).unwrap();
    }
    assert_eq!(r.db[&2], new);
    assert_eq!(r.route(3).cloned(), before);
    assert_eq!(r.poll_transmit(), Some((3, new.clone())));
    assert_eq!(r.poll_transmit(), Some((3, new)));
    assert_eq!(r.poll_transmit(), None, "the equal one is dropped");
    assert!(r.refused.is_empty(), "no check failed: none was made");
}

#[test]
fn revoked_junctions_are_refused_and_refusals_are_bounded_per_neighbour() {
    let ca = Authority::new();
    let two = ca.certify(Role::Junction { id: 2 });
    let list = RevocationList::issue(
        junction_identity::RevocationBody {
            issuer: ca.key.public(),
            number: 1,
            issued_at: NOW,
            serials: vec![two.1[0].body.serial],
            keys: vec![],
        },
        &ca.key,
    )
    .unwrap()
    .verify(&ca.trust)
    .unwrap();
    let mut checks = ca.checks();
    checks.revocations = Some(&list);
    let mut r = ca.router(1, 1, 64);
    r.link_up(2, 1);
    let mut ls = describing(2, 1, &[1]);
    ls.seal(&two.0, two.1.clone()).unwrap();
    assert_eq!(
        r.handle_link_state(2, ls, &checks),
        Err(RoutingError::Revoked {
            origin: 2,
            serial: two.1[0].body.serial
        })
    );

    // A neighbour flooding forgeries: each costs a check, up to the budget;
    // past it, even a good one is dropped unchecked until the next second.
    let checks = ca.checks();
    let three = ca.certify(Role::Junction { id: 3 });
    // The revoked one was the first refusal this second.
    for seq in 2..MAX_REFUSED_PER_SECOND as u64 {
        let mut ls = describing(2, seq, &[1]);
        ls.seal(&three.0, three.1.clone()).unwrap();
        assert!(matches!(
            r.handle_link_state(2, ls, &checks),
            Err(RoutingError::WrongJunction { .. })
        ));
    }
    let two = ca.certify(Role::Junction { id: 2 });
    let mut good = describing(2, 100, &[1]);
    good.seal(&two.0, two.1.clone()).unwrap();
    let mut forged = good.clone();
    forged.seal.as_mut().unwrap().signature.0[0] ^= 1;
    assert_eq!(
        r.handle_link_state(2, forged, &checks),
        Err(RoutingError::BadSignature { origin: 2 })
    );
    assert_eq!(
        r.handle_link_state(2, good.clone(), &checks),
        Err(RoutingError::TooManyRefused { from: 2 })
    );
    let later = Checks {
        now: NOW + 1,
        ..checks
    };
    r.handle_link_state(2, good, &later).unwrap();
    assert_eq!(r.known(), 2);
}

/// What checking a seal costs, and what a seal weighs (the figures in
/// docs/protocol.md 14.1): `cargo test -p junction-core --release
/// seal_costs -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement"]
fn seal_costs() {
    let ca = Authority::new();
    let checks = ca.checks();
    let two = ca.certify(Role::Junction { id: 2 });
    let mut ls = describing(2, 1, &[1, 3]);
    ls.seal(&two.0, two.1.clone()).unwrap();
    let seal = postcard::to_allocvec(&ls.seal).unwrap().len();
    let cert = postcard::to_allocvec(&two.1[0]).unwrap().len();
    let n = 2_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        verify_seal(&ls, &checks).unwrap();
    }
    let each = start.elapsed() / n;
    println!("certificate {cert} B, seal {seal} B, check {each:?}");
}

/// A junction whose own key or certificate would make every other junction
/// refuse its routes is told so at start, in words.
#[test]
fn a_misconfigured_identity_is_named() {
    let ca = Authority::new();
    let config = |junction, identity| crate::Config {
        junction,
        junction_identity: Some(identity),
        ..crate::Config::default()
    };
    let (key, chain) = ca.certify(Role::Junction { id: 5 });
    assert_eq!(
        config(5, (key.clone(), chain.clone())).identity_problem(),
        None
    );
    let wrong_id = config(7, (key.clone(), chain.clone())).identity_problem();
    assert!(wrong_id.is_some_and(|p| p.contains("junction 7")));
    let (other, _) = ca.certify(Role::Junction { id: 5 });
    let wrong_key = config(5, (other, chain)).identity_problem();
    assert!(wrong_key.is_some_and(|p| p.contains("key")));
    let no_chain = config(5, (key, Vec::new())).identity_problem();
    assert!(no_chain.is_some_and(|p| p.contains("no certificate")));
    assert_eq!(crate::Config::default().identity_problem(), None);
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

impl Net {
    /// Junction `at` announces `names`.
    fn announce(&mut self, at: u16, names: &[&str]) {
        let names = names.iter().map(|s| name(s));
        self.routers
            .get_mut(&at)
            .unwrap()
            .announce_names(names)
            .unwrap();
    }

    /// Who each junction, in id order, finds owns `name`.
    fn owners_of(&mut self, of: &str) -> Vec<Option<u16>> {
        let of = name(of);
        self.routers.values_mut().map(|r| r.owner_of(&of)).collect()
    }

    /// Every router's name index is exactly what its database announces,
    /// its own description apart.
    fn indexes_match_databases(&self) {
        for (&id, r) in &self.routers {
            let mut owners: BTreeMap<ServiceName, BTreeSet<u16>> = BTreeMap::new();
            for ls in r.db.values().filter(|ls| ls.origin != id) {
                for n in &ls.names {
                    owners.entry(n.clone()).or_default().insert(ls.origin);
                }
            }
            assert_eq!(r.owners, owners, "junction {id}'s index");
        }
    }
}

#[test]
fn names_propagate_over_a_line_and_a_triangle() {
    let mut net = Net::new([1, 2, 3]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.settle();
    net.announce(3, &["org.acme.echo", "echo"]);
    net.settle();
    assert_eq!(net.owners_of("org.acme.echo"), [Some(3); 3]);
    assert_eq!(net.owners_of("echo"), [Some(3); 3]);
    assert_eq!(net.owners_of("org.acme"), [None; 3], "names, not prefixes");
    assert_eq!(
        net.routers[&1].db[&3].names,
        [name("echo"), name("org.acme.echo")]
    );

    // A triangle: 1 and 3 both announce "shared". 2 is one hop from each
    // and takes the lower id; each of them takes itself.
    net.heal(1, 3, 5);
    net.announce(1, &["shared"]);
    net.announce(3, &["org.acme.echo", "shared"]);
    net.settle();
    assert_eq!(net.owners_of("shared"), [Some(1), Some(1), Some(3)]);
    assert_eq!(net.owners_of("org.acme.echo"), [Some(3); 3]);
    assert_eq!(net.owners_of("echo"), [None; 3], "withdrawn by 3");
    // The cheaper route wins over the lower id: with 1-2 dearer, 2 asks 3.
    net.cut(1, 2);
    net.heal(1, 2, 9);
    net.settle();
    assert_eq!(net.owners_of("shared"), [Some(1), Some(3), Some(3)]);
    net.indexes_match_databases();
}

#[test]
fn a_burst_of_name_changes_makes_one_description() {
    let mut r = Router::new(1, 1, 8);
    r.link_up(2, 1);
    while r.poll_transmit().is_some() {}
    let seq = r.db[&1].seq;
    assert_eq!(r.announce_names([name("a")]), Ok(true));
    assert_eq!(
        r.announce_names([name("b"), name("a"), name("b")]),
        Ok(true)
    );
    assert_eq!(
        r.announce_names([name("a"), name("b")]),
        Ok(false),
        "no change"
    );
    assert_eq!(r.announced(), [name("a"), name("b")]);
    assert_eq!(r.owner_of(&name("b")), Some(1), "its own, at once");
    let (to, ls) = r.poll_transmit().unwrap();
    assert_eq!(
        (to, ls.seq, ls.names.clone()),
        (2, seq + 1, r.announced().to_vec())
    );
    assert_eq!(r.poll_transmit(), None, "one description for the burst");
    // Announced and withdrawn between two polls: back where it was, but
    // described once more (it changed, then changed back).
    r.announce_names([name("c")]).unwrap();
    r.announce_names([name("a"), name("b")]).unwrap();
    assert_eq!(r.poll_transmit().map(|(_, ls)| ls.seq), Some(seq + 2));
    assert_eq!(r.poll_transmit(), None);
    // A link change before the poll carries the names too, and the poll
    // adds nothing.
    r.announce_names([]).unwrap();
    r.link_down(2);
    r.link_up(3, 1);
    let sent: Vec<_> = std::iter::from_fn(|| r.poll_transmit()).collect();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].1.names.is_empty());
}

#[test]
fn a_withdrawn_name_disappears_everywhere() {
    let mut net = Net::new([1, 2, 3, 4]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.heal(3, 4, 1);
    net.heal(4, 1, 1);
    net.announce(2, &["org.acme.echo", "org.acme.db"]);
    net.settle();
    assert_eq!(net.owners_of("org.acme.db"), [Some(2); 4]);
    net.announce(2, &["org.acme.echo"]);
    net.settle();
    assert_eq!(net.owners_of("org.acme.db"), [None; 4]);
    assert_eq!(net.owners_of("org.acme.echo"), [Some(2); 4]);
    net.announce(2, &[]);
    net.settle();
    assert_eq!(net.owners_of("org.acme.echo"), [None; 4]);
    net.indexes_match_databases();
    assert!(net.routers.values().all(|r| r.owners.is_empty()));
}

#[test]
fn a_junction_out_of_reach_owns_nothing() {
    let mut net = Net::new([1, 2, 3]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.announce(3, &["echo"]);
    net.announce(1, &["shared"]);
    net.announce(3, &["echo", "shared"]);
    net.settle();
    assert_eq!(net.owners_of("echo"), [Some(3); 3]);
    assert_eq!(net.owners_of("shared"), [Some(1), Some(1), Some(3)]);
    // 3 is cut off: 1 and 2 still hold its link state, with its names,
    // but have no route to it.
    net.cut(2, 3);
    net.settle();
    assert_eq!(net.routers[&1].db[&3].names, [name("echo"), name("shared")]);
    assert_eq!(net.owners_of("echo"), [None, None, Some(3)]);
    assert_eq!(net.owners_of("shared"), [Some(1), Some(1), Some(3)]);
    // 1 is cut off too: 2 is alone, and finds no owner.
    net.cut(1, 2);
    net.settle();
    assert_eq!(net.owners_of("shared"), [Some(1), None, Some(3)]);
    // Healed the other way round, 2 reaches 3 first.
    net.heal(2, 3, 1);
    net.settle();
    assert_eq!(net.owners_of("echo"), [None, Some(3), Some(3)]);
    assert_eq!(net.owners_of("shared"), [Some(1), Some(3), Some(3)]);
}

#[test]
fn announced_names_are_bounded_and_in_order() {
    let mut r = Router::new(1, 1, 8);
    let trust = TrustStore::new();
    let checks = Checks {
        trust: &trust,
        revocations: None,
        trust_unsigned: true,
        now: NOW,
    };
    r.link_up(2, 1);
    let announcing = |names: Vec<ServiceName>| LinkState {
        names,
        ..describing(2, 1, &[1])
    };
    let numbered = |n: usize| {
        (0..n)
            .map(|i| name(&format!("n{i:04}")))
            .collect::<Vec<_>>()
    };
    let over = numbered(MAX_ANNOUNCED_NAMES + 1);
    assert_eq!(
        r.handle_link_state(2, announcing(over.clone()), &checks),
        Err(RoutingError::TooManyNames {
            origin: 2,
            count: MAX_ANNOUNCED_NAMES + 1,
            bytes: 5 * (MAX_ANNOUNCED_NAMES + 1)
        })
    );
    let err = r
        .handle_link_state(2, announcing(over.clone()), &checks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1025 names") && err.contains("at most 1024"),
        "{err}"
    );
    // Fewer names, but too many bytes.
    let long = |i: usize| name(&format!("{}.{i:063}", "a".repeat(63)));
    let heavy: Vec<_> = (0..MAX_ANNOUNCED_NAME_BYTES / 127 + 1).map(long).collect();
    assert!(matches!(
        r.handle_link_state(2, announcing(heavy), &checks),
        Err(RoutingError::TooManyNames { origin: 2, .. })
    ));
    for names in [vec![name("b"), name("a")], vec![name("a"), name("a")]] {
        assert_eq!(
            r.handle_link_state(2, announcing(names.clone()), &checks),
            Err(RoutingError::BadNames {
                origin: 2,
                name: names[1].clone()
            })
        );
    }
    assert_eq!(r.known(), 1, "nothing refused was taken");
    assert!(r.owners.is_empty());
    // At the bound, taken.
    let full = numbered(MAX_ANNOUNCED_NAMES);
    r.handle_link_state(2, announcing(full.clone()), &checks)
        .unwrap();
    assert_eq!(r.owner_of(&full[MAX_ANNOUNCED_NAMES - 1]), Some(2));
    // And this junction announces no more than it takes: the names before
    // stay.
    r.announce_names([name("mine")]).unwrap();
    assert!(matches!(
        r.announce_names(over),
        Err(RoutingError::TooManyNames {
            origin: 1,
            count: 1025,
            ..
        })
    ));
    assert_eq!(r.announced(), [name("mine")]);
}

#[test]
fn a_forged_change_of_names_breaks_the_seal() {
    let ca = Authority::new();
    let checks = ca.checks();
    let mut r = ca.router(1, 1, 64);
    r.link_up(2, 1);
    let two = ca.certify(Role::Junction { id: 2 });
    let mut ls = LinkState {
        names: vec![name("org.acme.db"), name("org.acme.echo")],
        ..describing(2, 1, &[1])
    };
    ls.seal(&two.0, two.1.clone()).unwrap();
    let mut added = ls.clone();
    added.names.push(name("org.acme.pay"));
    let mut removed = ls.clone();
    removed.names.remove(0);
    let mut renamed = ls.clone();
    renamed.names[1] = name("org.acme.evil");
    for forged in [added, removed, renamed] {
        assert_eq!(
            r.handle_link_state(2, forged, &checks),
            Err(RoutingError::BadSignature { origin: 2 })
        );
    }
    assert_eq!(r.owner_of(&name("org.acme.echo")), None);
    r.handle_link_state(2, ls, &checks).unwrap();
    assert_eq!(r.owner_of(&name("org.acme.echo")), Some(2));
    assert_eq!(r.owner_of(&name("org.acme.pay")), None);
}

/// One change to the network or to what a junction announces.
#[derive(Debug, Clone)]
enum Event {
    Link(Change),
    /// Junction, name: announced if it was not, withdrawn if it was.
    Toggle(u16, usize),
}

/// The names the property test announces.
const NAMES: [&str; 4] = ["echo", "org.acme.db", "org.acme.echo", "shared"];

fn announcing() -> impl Strategy<Value = (Scenario, Vec<(Event, usize)>)> {
    network().prop_flat_map(|(n, links, _)| {
        let id = 1..=n;
        let event = prop_oneof![
            1 => (id.clone(), id.clone()).prop_map(|(a, b)| Event::Link(Change::Cut(a, b))),
            1 => (id.clone(), id.clone(), 1u32..10)
                .prop_map(|(a, b, c)| Event::Link(Change::Heal(a, b, c))),
            2 => (id.clone(), 0..NAMES.len()).prop_map(|(j, i)| Event::Toggle(j, i)),
        ];
        (
            Just((n, links, Vec::new())),
            prop::collection::vec((event, 0usize..3), 0..32),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Over random networks of up to 8 junctions, with random cuts, heals,
    /// announcements and withdrawals while link states are on their way:
    /// once settled, every junction finds as the owner of every name the
    /// junction it reaches that announces it, cheapest then lowest id (or
    /// itself), and its name index is exactly what its database announces.
    #[test]
    fn owners_converge_to_the_truth(((n, links, _), events) in announcing()) {
        let mut net = Net::new(1..=n);
        let mut truth: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
        for (a, b, c) in links {
            net.heal(a, b, c);
        }
        for (event, rounds) in events {
            match event {
                Event::Link(Change::Cut(a, b)) => net.cut(a, b),
                Event::Link(Change::Heal(a, b, c)) => net.heal(a, b, c),
                Event::Toggle(j, i) => {
                    let names = truth.entry(j).or_default();
                    if !names.remove(&i) {
                        names.insert(i);
                    }
                    let names: Vec<&str> = names.iter().map(|&i| NAMES[i]).collect();
                    net.announce(j, &names);
                }
            }
            for _ in 0..rounds {
                net.round();
            }
        }
        net.settle();
        net.indexes_match_databases();
        for (i, of) in NAMES.iter().enumerate() {
            let found = net.owners_of(of);
            for (k, &from) in net.routers.keys().enumerate() {
                let mut reach = net.truth(from);
                reach.insert(from, 0);
                let owner = reach
                    .iter()
                    .filter(|(j, _)| truth.get(j).is_some_and(|names| names.contains(&i)))
                    .map(|(&j, &cost)| (cost, j))
                    .min()
                    .map(|(_, j)| j);
                prop_assert_eq!(found[k], owner, "{} from junction {}", of, from);
            }
        }
    }
}

#[test]
fn a_restarted_junction_announces_afresh() {
    let mut net = Net::new([1, 2, 3]);
    net.heal(1, 2, 1);
    net.heal(2, 3, 1);
    net.announce(3, &["echo", "old"]);
    net.settle();
    assert_eq!(net.owners_of("old"), [Some(3); 3]);
    // 3 restarts with other names: its new life's first description
    // replaces the old one's names everywhere.
    net.cut(2, 3);
    net.routers.insert(3, net.authority.router(3, 2, 64));
    net.announce(3, &["echo", "new"]);
    net.heal(2, 3, 1);
    net.settle();
    assert_eq!(net.owners_of("old"), [None; 3]);
    assert_eq!(net.owners_of("new"), [Some(3); 3]);
    assert_eq!(net.owners_of("echo"), [Some(3); 3]);
    net.indexes_match_databases();
}
