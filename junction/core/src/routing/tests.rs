//! Routing proven in a simulated network: real routers, links cut and
//! healed, link states delivered in rounds (one round = one hop's latency).

use std::collections::{BTreeMap, VecDeque};

use junction_identity::CertBody;
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
