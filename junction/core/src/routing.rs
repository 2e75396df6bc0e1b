//! Routing between junctions: link state, flooded; routes chosen by the
//! junction a message starts from.
//!
//! Each junction describes its live Highways in a [`LinkState`] and floods it:
//! every junction keeps the newest description from each origin (the
//! link-state database), passes on what is new to it, and answers a
//! neighbour that sent an older one with its newer copy. A new neighbour gets
//! the whole database at once.
//!
//! Routes are shortest paths over the links that *both* ends describe (a link
//! one end has given up is not used), found by Dijkstra, ties going to the
//! lower junction id so that every junction with the same database picks the
//! same path. A message carries its whole route, chosen by its first
//! junction: a transit junction forwards it to the next junction on it, or
//! reports the route broken. So no message ever loops, even while databases
//! disagree during a change: a route is a path, and one that repeats a
//! junction is refused ([`Router::next_hop`]).
//!
//! A change floods to every junction of its part of the network in as many
//! rounds as that part's diameter (in hops), and routes are right as soon as
//! the flood is through: convergence in rounds proportional to the diameter,
//! measured by the simulation in the tests below.
//!
//! A link state is taken only if its origin sealed it ([`Checks`]): signed
//! with the key of a junction certificate, from a trusted authority, for
//! the origin's id. So a junction describes its own links and no other's,
//! and cannot claim an id its certificate does not carry. A seal is checked
//! once, when its link state is newer than what the database holds; a
//! duplicate or an older one costs no signature check. Refusals cost
//! checks, so each neighbour may cause at most [`MAX_REFUSED_PER_SECOND`]
//! of them a second: past that, its link states are dropped unchecked
//! until the next second.
//!
//! A link state also announces the service names registered on its origin
//! ([`Router::announce_names`]), so that any junction can find a name's
//! owner ([`Router::owner_of`]) and then ask it: the owner's answer, with
//! the service's certificate chain, is what proves the name, not the
//! announcement. A change of names is not flooded at once but marks this
//! junction's description due; it goes out at the next
//! [`Router::poll_transmit`], so a burst of registrations between two polls
//! costs one link state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use junction_identity::{
    Certificate, IdentityError, JunctionCertError, PublicKey, Purpose, RevocationList, SecretKey,
    ServiceName, TrustStore, Verified,
};
use junction_road::highway::{
    LinkState, MAX_ANNOUNCED_NAME_BYTES, MAX_ANNOUNCED_NAMES, MAX_NEIGHBOURS, Neighbour,
};

/// The most link states one neighbour may have refused for their seal in
/// one second; more are dropped without a check until the next second.
/// Honest neighbours pass on only link states they checked themselves, so
/// they reach it only if the junctions' trust stores or clocks disagree.
pub const MAX_REFUSED_PER_SECOND: u32 = 16;

/// What link states' seals are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Checks<'a> {
    /// The authorities whose junction certificates are believed.
    pub trust: &'a TrustStore,
    /// Certificates and keys no longer believed.
    pub revocations: Option<&'a Verified<RevocationList>>,
    /// Whether link states with no seal are taken: for a bus whose
    /// junctions have no keys (development, simulation). A seal that is
    /// there is checked all the same.
    pub trust_unsigned: bool,
    /// Seconds since the Unix epoch: certificates must be valid then, and
    /// the refusal budget counts in these seconds.
    pub now: u64,
}

/// Junction ids no junction may have: 0 ("this junction") and 0xFFFF.
fn reserved(id: u16) -> bool {
    id == 0 || id == u16::MAX
}

/// Why a [`LinkState`] was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// It came from a junction that is not a live neighbour.
    #[error(
        "junction {from} is not a neighbour over a live Highway; link state comes only from neighbours"
    )]
    NotNeighbour {
        /// Who sent it.
        from: u16,
    },
    /// Its origin, or a neighbour it lists, is a reserved id.
    #[error("junction id {id} is reserved (0 and 65535 name no junction)")]
    ReservedId {
        /// The id.
        id: u16,
    },
    /// It lists its neighbours out of order, twice, itself, or at no cost.
    #[error("the link state of junction {origin} lists its neighbours wrongly: {why}")]
    BadNeighbours {
        /// Its origin.
        origin: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// It lists more neighbours than a junction may have.
    #[error(
        "the link state of junction {origin} lists {count} neighbours; at most {MAX_NEIGHBOURS} are taken"
    )]
    TooManyNeighbours {
        /// Its origin.
        origin: u16,
        /// How many it listed.
        count: usize,
    },
    /// It announces more names, or more bytes of names, than a junction
    /// may ([`MAX_ANNOUNCED_NAMES`], [`MAX_ANNOUNCED_NAME_BYTES`]).
    #[error(
        "the link state of junction {origin} announces {count} names, {bytes} bytes in all; at most {MAX_ANNOUNCED_NAMES} names and {MAX_ANNOUNCED_NAME_BYTES} bytes are taken"
    )]
    TooManyNames {
        /// Its origin.
        origin: u16,
        /// How many names it announced.
        count: usize,
        /// Their lengths, summed.
        bytes: usize,
    },
    /// It announces names out of order, or one twice.
    #[error(
        "the link state of junction {origin} announces {name} out of order or twice; names go each once, in increasing byte order"
    )]
    BadNames {
        /// Its origin.
        origin: u16,
        /// The first name out of place.
        name: ServiceName,
    },
    /// It has no seal, and this junction takes only sealed link states.
    #[error(
        "the link state of junction {origin} is not signed, and this junction does not trust unsigned routing"
    )]
    Unsigned {
        /// Its origin.
        origin: u16,
    },
    /// The certificate chain of its seal does not hold: untrusted
    /// authority, broken, expired or not yet valid.
    #[error(
        "the certificate chain sealing the link state of junction {origin} is refused: {source}"
    )]
    Certificate {
        /// Its origin.
        origin: u16,
        /// What is wrong with the chain.
        source: IdentityError,
    },
    /// A certificate of its seal's chain was revoked.
    #[error("the link state of junction {origin} is sealed with revoked certificate {serial:#x}")]
    Revoked {
        /// Its origin.
        origin: u16,
        /// The revoked certificate's serial.
        serial: u64,
    },
    /// Its seal's certificate is a junction's, but for another id: a
    /// junction describing another's links, or claiming an id it was not
    /// given.
    #[error(
        "the link state of junction {origin} is sealed by junction {certified}'s certificate; a junction describes only itself"
    )]
    WrongJunction {
        /// Its origin.
        origin: u16,
        /// The id the certificate carries.
        certified: u16,
    },
    /// Its seal's certificate is not a junction's.
    #[error(
        "the link state of junction {origin} is sealed by a {role} certificate; only junction certificates describe links"
    )]
    NotAJunction {
        /// Its origin.
        origin: u16,
        /// The certificate's role.
        role: String,
    },
    /// Its signature is not the certified key's over its content: altered
    /// on the way, or signed by another key.
    #[error("the signature on the link state of junction {origin} does not verify")]
    BadSignature {
        /// Its origin.
        origin: u16,
    },
    /// The neighbour had too many link states refused for their seal this
    /// second; this one was dropped unchecked.
    #[error(
        "junction {from} sent more than {MAX_REFUSED_PER_SECOND} refused link states this second; the rest of the second's are dropped unchecked"
    )]
    TooManyRefused {
        /// The neighbour.
        from: u16,
    },
    /// The database holds as many junctions as it may.
    #[error(
        "this junction knows {limit} junctions already, the most it keeps; the bus is larger than it was configured for"
    )]
    Full {
        /// The limit.
        limit: usize,
    },
}

/// A route to a junction: its cost and the junctions it goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The sum of the links' costs.
    pub cost: u64,
    /// The junctions after this one, the destination last.
    pub path: Vec<u16>,
}

/// One junction's routing state, sans-IO: fed link events and neighbours'
/// link states, polled for link states to send.
#[derive(Debug)]
pub struct Router {
    me: u16,
    /// Live Highways: neighbour and cost.
    links: BTreeMap<u16, u32>,
    /// The newest link state from every junction heard of, this one's own
    /// included.
    db: BTreeMap<u16, LinkState>,
    max_junctions: usize,
    out: VecDeque<(u16, LinkState)>,
    /// Routes by destination, computed from `db` when asked after a change.
    routes: BTreeMap<u16, Route>,
    dirty: bool,
    /// The key and chain this junction seals its own link states with.
    signer: Option<(Arc<SecretKey>, Vec<Certificate>)>,
    /// Per neighbour: the second it last had a link state refused for its
    /// seal, and how many it had refused in that second.
    refused: BTreeMap<u16, (u64, u32)>,
    /// The names this junction announces, sorted, each once: what its next
    /// description carries.
    names: Vec<ServiceName>,
    /// Whether the names changed since this junction last described itself.
    describe_due: bool,
    /// For each name other junctions announce, the junctions whose link
    /// state in `db` announces it: kept as link states enter the database,
    /// so that finding an owner is no scan of it.
    owners: BTreeMap<ServiceName, BTreeSet<u16>>,
}

impl Router {
    /// Routing for junction `me` in its `incarnation` (greater than any of
    /// its earlier lives'), keeping at most `max_junctions` descriptions.
    pub fn new(me: u16, incarnation: u64, max_junctions: usize) -> Self {
        let own = LinkState {
            origin: me,
            incarnation,
            seq: 0,
            neighbours: Vec::new(),
            names: Vec::new(),
            seal: None,
        };
        Self {
            me,
            links: BTreeMap::new(),
            db: BTreeMap::from([(me, own)]),
            max_junctions: max_junctions.max(1),
            out: VecDeque::new(),
            routes: BTreeMap::new(),
            dirty: true,
            signer: None,
            refused: BTreeMap::new(),
            names: Vec::new(),
            describe_due: false,
            owners: BTreeMap::new(),
        }
    }

    /// Seals this junction's link states from now on with its junction
    /// `key`, certified by `chain` (leaf first, a junction certificate for
    /// this junction's id).
    pub fn sign_with(&mut self, key: Arc<SecretKey>, chain: Vec<Certificate>) {
        self.signer = Some((key, chain));
    }

    /// A Highway to `neighbour` is up, each hop over it costing `cost`: the
    /// neighbour gets the whole database, everyone this junction's new
    /// description.
    pub fn link_up(&mut self, neighbour: u16, cost: u32) {
        if reserved(neighbour) || neighbour == self.me {
            return;
        }
        self.links.insert(neighbour, cost.max(1));
        for ls in self.db.values() {
            if ls.origin != self.me {
                self.out.push_back((neighbour, ls.clone()));
            }
        }
        self.describe();
    }

    /// The Highway to `neighbour` is down.
    pub fn link_down(&mut self, neighbour: u16) {
        if self.links.remove(&neighbour).is_some() {
            self.refused.remove(&neighbour);
            self.describe();
        }
    }

    /// A neighbour sent a link state. Its seal is checked against `checks`
    /// if, and only if, it is newer than what the database holds.
    pub fn handle_link_state(
        &mut self,
        from: u16,
        ls: LinkState,
        checks: &Checks<'_>,
    ) -> Result<(), RoutingError> {
        if !self.links.contains_key(&from) {
            return Err(RoutingError::NotNeighbour { from });
        }
        check(&ls)?;
        if ls.origin == self.me {
            // An old description of this junction, from an earlier life or
            // still on its way: a newer one goes out, which replaces it
            // everywhere. Sealed by this junction, or forged: a forgery
            // must not push its counter around.
            if ls.newer_than(&self.db[&self.me]) {
                self.check_seal(from, &ls, checks)?;
                let seq = ls.seq;
                if let Some(own) = self.db.get_mut(&self.me) {
                    own.incarnation = ls.incarnation;
                    own.seq = seq;
                }
                self.describe();
            }
            return Ok(());
        }
        match self.db.get(&ls.origin) {
            Some(known) if ls.newer_than(known) => {}
            Some(known) if known.newer_than(&ls) => {
                // The neighbour is behind: bring it up to date.
                self.out.push_back((from, known.clone()));
                return Ok(());
            }
            Some(_) => return Ok(()),
            None if self.db.len() >= self.max_junctions => {
                let limit = self.max_junctions;
                return Err(RoutingError::Full { limit });
            }
            None => {}
        }
        self.check_seal(from, &ls, checks)?;
        for &n in self.links.keys() {
            if n != from {
                self.out.push_back((n, ls.clone()));
            }
        }
        let origin = ls.origin;
        let old = self.db.insert(origin, ls).map(|old| old.names);
        let new = &self.db[&origin].names;
        reindex(
            &mut self.owners,
            origin,
            old.as_deref().unwrap_or_default(),
            new,
        );
        self.dirty = true;
        Ok(())
    }

    /// This junction announces `names` (all the names registered on it, in
    /// any order, repeats ignored) from now on, in place of those it
    /// announced before. Whether they differ from those: if so, a new
    /// description of this junction goes out at the next
    /// [`Router::poll_transmit`], however many times they change before.
    /// More than [`MAX_ANNOUNCED_NAMES`] names, or
    /// [`MAX_ANNOUNCED_NAME_BYTES`] of them, are refused
    /// ([`RoutingError::TooManyNames`]), and the names announced before
    /// stay.
    pub fn announce_names(
        &mut self,
        names: impl IntoIterator<Item = ServiceName>,
    ) -> Result<bool, RoutingError> {
        let names: Vec<ServiceName> = names
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let bytes = name_bytes(&names);
        if names.len() > MAX_ANNOUNCED_NAMES || bytes > MAX_ANNOUNCED_NAME_BYTES {
            return Err(RoutingError::TooManyNames {
                origin: self.me,
                count: names.len(),
                bytes,
            });
        }
        if names == self.names {
            return Ok(false);
        }
        self.names = names;
        self.describe_due = true;
        Ok(true)
    }

    /// The names this junction announces.
    pub fn announced(&self) -> &[ServiceName] {
        &self.names
    }

    /// The junction to ask for service `name`: this one if it announces
    /// it, else, of the junctions it has a route to whose link state
    /// announces it, the one with the cheapest route, the lowest id among
    /// equals. `None` if no junction it reaches announces it.
    ///
    /// Nearest first, because the answer and every message after it
    /// travel that route; the lowest id among equals, so that the choice
    /// depends on the database alone, as routes do. An announcement is
    /// the origin's word, sealed, and proves nothing about the name: the
    /// owner's answer carries the service's certificate chain, and that is
    /// what the junction asking checks.
    pub fn owner_of(&mut self, name: &ServiceName) -> Option<u16> {
        if self.names.binary_search(name).is_ok() {
            return Some(self.me);
        }
        if !self.owners.contains_key(name) {
            return None;
        }
        if self.dirty {
            self.compute();
        }
        self.owners
            .get(name)?
            .iter()
            .filter_map(|&origin| Some((self.routes.get(&origin)?.cost, origin)))
            .min()
            .map(|(_, origin)| origin)
    }

    /// Checks the seal of a link state from neighbour `from`, within the
    /// neighbour's budget of refusals.
    fn check_seal(
        &mut self,
        from: u16,
        ls: &LinkState,
        checks: &Checks<'_>,
    ) -> Result<(), RoutingError> {
        let (second, count) = self.refused.get(&from).copied().unwrap_or_default();
        let count = if second == checks.now { count } else { 0 };
        if count >= MAX_REFUSED_PER_SECOND {
            return Err(RoutingError::TooManyRefused { from });
        }
        let checked = verify_seal(ls, checks);
        if checked.is_err() {
            self.refused.insert(from, (checks.now, count + 1));
        }
        checked
    }

    /// The next link state to send, and the neighbour to send it to. A
    /// change of names since the last poll makes a new description of this
    /// junction first.
    pub fn poll_transmit(&mut self) -> Option<(u16, LinkState)> {
        if self.describe_due {
            self.describe();
        }
        self.out.pop_front()
    }

    /// The route to junction `to`, if it is reachable.
    pub fn route(&mut self, to: u16) -> Option<&Route> {
        if self.dirty {
            self.compute();
        }
        self.routes.get(&to)
    }

    /// Every route, by destination: one per junction it reaches (at most
    /// `max_junctions`, this one not included), with the incarnation the
    /// destination last described itself in.
    pub fn routes(&mut self) -> impl ExactSizeIterator<Item = (u16, &Route, u64)> {
        if self.dirty {
            self.compute();
        }
        let db = &self.db;
        self.routes.iter().map(move |(&to, route)| {
            let incarnation = db.get(&to).map_or(0, |ls| ls.incarnation);
            (to, route, incarnation)
        })
    }

    /// For a message on `path` (the junctions after its first, destination
    /// last) that reached this junction: the live neighbour to pass it to,
    /// `Ok(None)` if it is for this junction, or why not.
    pub fn next_hop(&self, path: &[u16]) -> Result<Option<u16>, RouteBroken> {
        if let Some(repeat) = first_repeat(path) {
            return Err(RouteBroken::Loops { junction: repeat });
        }
        let Some(here) = path.iter().position(|&j| j == self.me) else {
            return Err(RouteBroken::NotOnRoute);
        };
        match path.get(here + 1) {
            None => Ok(None),
            Some(&next) if self.links.contains_key(&next) => Ok(Some(next)),
            Some(&next) => Err(RouteBroken::LinkDown { next }),
        }
    }

    /// This junction's incarnation, as its descriptions carry it.
    pub fn incarnation(&self) -> u64 {
        self.db[&self.me].incarnation
    }

    /// The incarnation junction `junction` last described itself in.
    pub fn incarnation_of(&self, junction: u16) -> Option<u64> {
        self.db.get(&junction).map(|ls| ls.incarnation)
    }

    /// Junction `junction`'s key, as the certificate chain of the link
    /// state it last described itself in certifies it (checked when that
    /// link state was taken); `None` for a junction heard of only unsealed,
    /// or not at all. This junction's own comes from its signer.
    pub fn junction_key(&self, junction: u16) -> Option<PublicKey> {
        if junction == self.me {
            return self.signer.as_ref().map(|(key, _)| key.public());
        }
        let seal = self.db.get(&junction)?.seal.as_ref()?;
        Some(seal.chain.first()?.body.subject)
    }

    /// How many junctions' descriptions it holds, its own included.
    pub fn known(&self) -> usize {
        self.db.len()
    }

    /// This junction's own description, new after every link change, and
    /// at the first poll after a change of names.
    fn describe(&mut self) {
        self.describe_due = false;
        let neighbours = self
            .links
            .iter()
            .map(|(&junction, &cost)| Neighbour { junction, cost })
            .collect();
        let own = self
            .db
            .get_mut(&self.me)
            .expect("its own description is kept");
        // Saturating: a counter at its end stays there rather than wrap
        // (2^64 descriptions is not a life a junction lives).
        own.seq = own.seq.saturating_add(1);
        own.neighbours = neighbours;
        own.names.clone_from(&self.names);
        own.seal = None;
        if let Some((key, chain)) = &self.signer
            && let Err(e) = own.seal(key, chain.clone())
        {
            // Encoding a link state does not fail; were it to, the
            // description goes unsealed and others refuse it.
            tracing::error!("could not seal this junction's link state: {e}");
        }
        let own = own.clone();
        for &n in self.links.keys() {
            self.out.push_back((n, own.clone()));
        }
        self.dirty = true;
    }

    /// Dijkstra over the links both ends describe.
    fn compute(&mut self) {
        self.dirty = false;
        self.routes.clear();
        let cost_of = |from: u16, to: u16| -> Option<u32> {
            let there = self.db.get(&to)?;
            there
                .neighbours
                .binary_search_by_key(&from, |n| n.junction)
                .ok()?;
            let here = self.db.get(&from)?;
            let i = here
                .neighbours
                .binary_search_by_key(&to, |n| n.junction)
                .ok()?;
            Some(here.neighbours[i].cost)
        };
        // Best known (cost, predecessor) per junction; settled ones are final.
        let mut best: BTreeMap<u16, (u64, u16)> = BTreeMap::new();
        let mut settled: BTreeMap<u16, u64> = BTreeMap::new();
        let mut heap = BinaryHeap::new();
        heap.push(Reverse((0u64, self.me, self.me)));
        while let Some(Reverse((cost, at, via))) = heap.pop() {
            if settled.contains_key(&at) {
                continue;
            }
            settled.insert(at, cost);
            if at != self.me {
                best.insert(at, (cost, via));
            }
            let Some(ls) = self.db.get(&at) else { continue };
            for n in &ls.neighbours {
                if settled.contains_key(&n.junction) {
                    continue;
                }
                if let Some(c) = cost_of(at, n.junction) {
                    heap.push(Reverse((cost + u64::from(c), n.junction, at)));
                }
            }
        }
        for (&to, &(cost, _)) in &best {
            let mut path = vec![to];
            let mut at = to;
            while let Some(&(_, via)) = best.get(&at) {
                if via == self.me {
                    break;
                }
                path.push(via);
                at = via;
            }
            path.reverse();
            self.routes.insert(to, Route { cost, path });
        }
    }
}

/// Why a message cannot go on along its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteBroken {
    /// The route names a junction twice.
    #[error("the route passes junction {junction} twice")]
    Loops {
        /// The junction.
        junction: u16,
    },
    /// This junction is not on the route.
    #[error("this junction is not on the message's route")]
    NotOnRoute,
    /// The Highway to the next junction is down.
    #[error("the Highway to junction {next}, the next on the route, is down")]
    LinkDown {
        /// The next junction.
        next: u16,
    },
}

/// The first junction a path names twice. Paths are short (at most
/// `MAX_HOPS`), and this runs for every message passed on: a scan, with no
/// allocation.
fn first_repeat(path: &[u16]) -> Option<u16> {
    path.iter()
        .enumerate()
        .find(|&(i, j)| path[..i].contains(j))
        .map(|(_, &j)| j)
}

/// Whether a link state's seal proves that its origin made it.
fn verify_seal(ls: &LinkState, checks: &Checks<'_>) -> Result<(), RoutingError> {
    let origin = ls.origin;
    let Some(seal) = &ls.seal else {
        return if checks.trust_unsigned {
            Ok(())
        } else {
            Err(RoutingError::Unsigned { origin })
        };
    };
    let key = certified_junction(&seal.chain, origin, checks).map_err(|e| match e {
        ChainRefused::Certificate(source) => RoutingError::Certificate { origin, source },
        ChainRefused::Revoked { serial } => RoutingError::Revoked { origin, serial },
        ChainRefused::WrongJunction { certified } => {
            RoutingError::WrongJunction { origin, certified }
        }
        ChainRefused::NotAJunction { role } => RoutingError::NotAJunction { origin, role },
    })?;
    let bytes = ls
        .signed_bytes()
        .map_err(|source| RoutingError::Certificate { origin, source })?;
    key.verify(Purpose::LinkState, &bytes, &seal.signature)
        .map_err(|_| RoutingError::BadSignature { origin })
}

/// Moves `origin` from the owners of the names it announced (`old`) to
/// those of the names it announces (`new`), both sorted and each once:
/// one pass over both, touching only the names that changed.
fn reindex(
    owners: &mut BTreeMap<ServiceName, BTreeSet<u16>>,
    origin: u16,
    old: &[ServiceName],
    new: &[ServiceName],
) {
    let (mut i, mut j) = (0, 0);
    loop {
        // Whether the next change is a name announced (else one withdrawn).
        let announced = match (old.get(i), new.get(j)) {
            (None, None) => break,
            (Some(was), Some(is)) if was == is => {
                i += 1;
                j += 1;
                continue;
            }
            (Some(was), Some(is)) => was > is,
            (None, Some(_)) => true,
            (Some(_), None) => false,
        };
        if announced {
            owners.entry(new[j].clone()).or_default().insert(origin);
            j += 1;
        } else {
            if let Some(set) = owners.get_mut(&old[i]) {
                set.remove(&origin);
                if set.is_empty() {
                    owners.remove(&old[i]);
                }
            }
            i += 1;
        }
    }
}

/// The bytes of `names`, their lengths summed.
fn name_bytes(names: &[ServiceName]) -> usize {
    names.iter().map(|n| n.as_str().len()).sum()
}

/// Why a certificate chain does not certify a junction's key for its id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainRefused {
    /// The chain does not hold: untrusted authority, broken, expired or not
    /// yet valid.
    #[error("its certificate chain is refused: {0}")]
    Certificate(IdentityError),
    /// A certificate of the chain was revoked.
    #[error("its certificate {serial:#x} is revoked")]
    Revoked {
        /// The revoked certificate's serial.
        serial: u64,
    },
    /// The leaf is a junction certificate for another id.
    #[error("its certificate is junction {certified}'s")]
    WrongJunction {
        /// The id the certificate carries.
        certified: u16,
    },
    /// The leaf is not a junction certificate.
    #[error("its certificate is a {role} certificate, not a junction's")]
    NotAJunction {
        /// The certificate's role.
        role: String,
    },
}

/// The key `chain` (leaf first) certifies for junction `id`, if it is
/// trusted, unrevoked and a junction certificate for that id: the one check
/// of junction identities ([`junction_identity::certify_junction`]), for
/// link-state seals, session hellos and Highways alike.
pub(crate) fn certified_junction(
    chain: &[Certificate],
    id: u16,
    checks: &Checks<'_>,
) -> Result<PublicKey, ChainRefused> {
    junction_identity::certify_junction(
        chain,
        Some(id),
        checks.trust,
        checks.revocations,
        checks.now,
    )
    .map(|(_, key)| key)
    .map_err(|e| match e {
        JunctionCertError::Revoked { serial } => ChainRefused::Revoked { serial },
        JunctionCertError::WrongJunction { certified, .. } => {
            ChainRefused::WrongJunction { certified }
        }
        JunctionCertError::NotAJunction { role } => ChainRefused::NotAJunction { role },
        JunctionCertError::Certificate(source) => ChainRefused::Certificate(source),
        // Future refusals read as chain refusals.
        other => ChainRefused::Certificate(IdentityError::CertificateFormat(other.to_string())),
    })
}

/// A link state's own consistency.
fn check(ls: &LinkState) -> Result<(), RoutingError> {
    let origin = ls.origin;
    if reserved(origin) {
        return Err(RoutingError::ReservedId { id: origin });
    }
    if ls.neighbours.len() > MAX_NEIGHBOURS {
        let count = ls.neighbours.len();
        return Err(RoutingError::TooManyNeighbours { origin, count });
    }
    let bad = |why| Err(RoutingError::BadNeighbours { origin, why });
    for (i, n) in ls.neighbours.iter().enumerate() {
        if reserved(n.junction) {
            return Err(RoutingError::ReservedId { id: n.junction });
        }
        if n.junction == origin {
            return bad("it lists itself");
        }
        if n.cost == 0 {
            return bad("a link costs nothing");
        }
        if i > 0 && ls.neighbours[i - 1].junction >= n.junction {
            return bad("not in increasing order, or one twice");
        }
    }
    let bytes = name_bytes(&ls.names);
    if ls.names.len() > MAX_ANNOUNCED_NAMES || bytes > MAX_ANNOUNCED_NAME_BYTES {
        let count = ls.names.len();
        return Err(RoutingError::TooManyNames {
            origin,
            count,
            bytes,
        });
    }
    if let Some(pair) = ls.names.windows(2).find(|pair| pair[0] >= pair[1]) {
        let name = pair[1].clone();
        return Err(RoutingError::BadNames { origin, name });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
