//! A deterministic simulated world for the junction: real cores, real driver
//! state machines, a fake clock and simulated Roads, all driven from one seed.
//!
//! This is the junction's VOPR (TigerBeetle) or simulation test
//! (FoundationDB): every node runs the real [`junction_core::Core`], every
//! simulated process is a [`Process`] attached to a node over a simulated
//! [`Road`], and the world owns time. Nothing reads a clock or a system RNG:
//! the same seed gives the same run, frame for frame, so a failing seed is a
//! bug report that replays.
//!
//! # Shape
//!
//! - **Nodes** (`Vec<Node>`): one [`Core`] each, a junction of its own
//!   ([`World::with_junctions`] makes several), joined by [`Link`]s: the
//!   Highways' control streams, reliable and ordered while they live, with
//!   a seeded latency; a cut drops what is in flight and tells both cores
//!   the Highway is down, a heal tells them it is up.
//! - **Processes**: anything implementing [`Process`] (a driver state
//!   machine and the application on top of it). Each has one [`Road`] to one
//!   node: reliable and ordered, with a seeded latency per frame. A crash
//!   cuts the road: frames already written still reach the core, then the
//!   core gets `handle_disconnected`; nothing reaches the process again.
//! - **Events**: a queue ordered by (time, sequence number), so that ties
//!   break by the order events were scheduled, deterministically.
//! - **Time**: the world owns [`Now`]. Each step advances to the next event,
//!   or to the soonest `core.poll_timeout()`, whichever is first, and calls
//!   `handle_timeout` when a core's deadline is due.
//! - **Checks**: `core.check_invariants()` runs after every step; a broken
//!   invariant stops the run with a [`Failure`] naming the seed and the step.
//! - **Trace**: every frame in and out of every core is recorded
//!   ([`TraceEntry`]); oracles read it, and [`World::digest`] summarises it
//!   so that two runs can be compared.
//!
//! On top of the world, [`workload`] gives each process a real driver
//! [`Machine`](junction_driver::machine::Machine) and a small application
//! doing random operations ([`workload::Op`], [`workload::Plan`],
//! [`workload::run`]), and [`oracle`] checks the delivery contract over the
//! whole trace against a shadow model of its own. `tests/simulation.rs`
//! runs them; its `print_trace` test prints one run for reading.
//!
//! # Use
//!
//! ```
//! use junction_tests::sim::{Process, Ctx, World, seed_from_env};
//! use junction_road::{Frame, Header, Hello, MAGIC, PROTOCOL_VERSION};
//!
//! /// A process that says Hello and then only listens.
//! struct Quiet(Option<Frame>, usize);
//! impl Process for Quiet {
//!     fn poll_transmit(&mut self) -> Option<Frame> { self.0.take() }
//!     fn handle_frame(&mut self, _frame: Frame, _ctx: &mut Ctx<'_>) { self.1 += 1; }
//!     fn handle_road_closed(&mut self, _ctx: &mut Ctx<'_>) {}
//! }
//!
//! let hello = Frame::bare(Header::Hello(Hello {
//!     magic: MAGIC, version: PROTOCOL_VERSION, max_frame: 1 << 20, label: "quiet".into(),
//! }));
//! let mut world = World::new(seed_from_env(7), junction_core::Config::default());
//! let p = world.add_process(0, Quiet(Some(hello), 0));
//! world.run_until_idle(10_000)?;
//! assert_eq!(world.process(p).map(|q| q.1), Some(1)); // the Welcome
//! # Ok::<(), junction_tests::sim::Failure>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use junction_core::{Config, ConnId, Core, Now, Output, Peer};
use junction_road::Frame;
use junction_road::highway::HighwayFrame;

pub mod oracle;
pub mod workload;

/// The environment variable that fixes the seed of a simulation run.
pub const SEED_VAR: &str = "JUNCTION_SIM_SEED";

/// The seed from [`SEED_VAR`] if it is set (decimal or `0x` hex), else
/// `default`. Tests print the seed they used when they fail.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| parse_seed(&s))
        .unwrap_or(default)
}

/// Runs `run` for `runs` seeds from `first` (just the one from [`SEED_VAR`]
/// if it is set), and fails naming the seed that replays a failure.
pub fn for_seeds(first: u64, runs: u64, run: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let (first, runs) = match std::env::var(SEED_VAR).ok().and_then(|s| parse_seed(&s)) {
        Some(seed) => (seed, 1),
        None => (first, runs),
    };
    for seed in first..first + runs {
        if let Err(e) = std::panic::catch_unwind(|| run(seed)) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("seed {seed} failed (replay with {SEED_VAR}={seed}): {why:?}");
        }
    }
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The simulation's only source of randomness: SplitMix64, small, fast and
/// fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift: no modulo bias worth the name here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// An index into a collection of `len` items (0 when it is empty).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A duration between `lo` and `hi` inclusive, in whole microseconds.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let lo_us = lo.as_micros() as u64;
        let hi_us = hi.as_micros().max(lo.as_micros()) as u64;
        Duration::from_micros(lo_us + self.below(hi_us - lo_us + 1))
    }

    /// A new generator for a sub-task, so that its draws do not shift the
    /// parent's sequence.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// A simulated process: a driver state machine and the application on top
/// of it, as the world sees it: frames in, frames out.
pub trait Process {
    /// The next frame the process writes to its Road, if any. The world
    /// drains this after every call into the process.
    fn poll_transmit(&mut self) -> Option<Frame>;
    /// A frame from the junction arrived.
    fn handle_frame(&mut self, frame: Frame, ctx: &mut Ctx<'_>);
    /// The Road ended: the junction closed it.
    fn handle_road_closed(&mut self, ctx: &mut Ctx<'_>);
}

/// What a process may use while it handles an input: the time and the
/// world's randomness.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The current moment.
    pub now: Now,
    /// Time since the world started.
    pub elapsed: Duration,
    /// The world's generator.
    pub rng: &'a mut Rng,
}

/// A process's place in the world.
pub type ProcessId = usize;

/// A node's place in the world.
pub type NodeId = usize;

/// Per-frame latency bounds of a simulated Road or Link.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// The least a frame takes.
    pub min: Duration,
    /// The most a frame takes (before queueing behind earlier frames).
    pub max: Duration,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            min: Duration::from_micros(10),
            max: Duration::from_micros(500),
        }
    }
}

/// A simulated Road: one process attached to one node, reliable and
/// ordered both ways. Each direction remembers when its last frame arrives,
/// so a fast frame never overtakes a slow one.
#[derive(Debug)]
pub struct Road {
    /// The node at the junction's end.
    pub node: NodeId,
    /// The connection id the node's core gave it.
    pub conn: ConnId,
    /// Its latency.
    pub latency: Latency,
    up_last: Duration,
    down_last: Duration,
    /// The process crashed: nothing more goes up after the disconnect.
    cut: bool,
    /// The core closed it: nothing more comes down after the close.
    closed: bool,
}

/// A simulated Highway between two nodes: its control stream, reliable and
/// ordered while it lives. Cutting it drops what is in flight and tells
/// both cores it is down; healing it tells them it is up again, as a new
/// QUIC connection would.
#[derive(Debug, Clone)]
pub struct Link {
    /// The two ends.
    pub ends: (NodeId, NodeId),
    /// What a hop over it costs, for routing.
    pub cost: u32,
    /// Its latency.
    pub latency: Latency,
    /// Whether the link is cut (nothing passes until it heals).
    pub cut: bool,
    /// Whether it drops everything while its ends still count it up: a
    /// cut their liveness checks have not noticed yet.
    pub silent: bool,
    /// Counts its lives: a frame sent in an earlier one is dropped.
    life: u64,
    /// When the last frame each way arrives (towards `ends.0`, `ends.1`),
    /// so none overtakes another.
    last: (Duration, Duration),
}

/// One node: a real core and what the world knows about it.
#[derive(Debug)]
pub struct Node {
    /// The junction's state machine.
    pub core: Core,
    /// Its junction id.
    pub junction: u16,
}

enum Slot<P> {
    Alive(P),
    /// Its last state, kept for oracles; it gets no input any more.
    Crashed(P),
    /// Only while a process moves from alive to crashed.
    Gone,
}

/// Something due at a moment.
#[derive(Debug)]
enum Event {
    /// A frame written by a process reaches its node's core.
    ToCore { pid: ProcessId, frame: Frame },
    /// A crashed process's Road ends at the core.
    Disconnect { pid: ProcessId },
    /// A frame written by a core reaches a process.
    ToProcess { pid: ProcessId, frame: Frame },
    /// The core closed a Road; the process sees it end.
    RoadClosed { pid: ProcessId },
    /// A frame crosses a Highway to node `to`, in the link's life `life`.
    OverLink {
        link: usize,
        life: u64,
        to: NodeId,
        frame: HighwayFrame,
        payload: bytes::Bytes,
    },
}

/// What a trace entry records.
#[derive(Debug, Clone)]
pub enum Traced {
    /// A process attached to a node; the core named the connection `conn`.
    Connected {
        /// The node.
        node: NodeId,
        /// The connection's number ([`ConnId::get`]).
        conn: u64,
        /// The process.
        pid: ProcessId,
    },
    /// A core handled a frame from a connection.
    CoreIn {
        /// The node.
        node: NodeId,
        /// The connection.
        conn: u64,
        /// The frame.
        frame: Frame,
    },
    /// A core wrote a frame to a connection.
    CoreOut {
        /// The node.
        node: NodeId,
        /// The connection.
        conn: u64,
        /// The frame.
        frame: Frame,
    },
    /// A core closed a connection (and forgot it).
    CoreClosed {
        /// The node.
        node: NodeId,
        /// The connection.
        conn: u64,
        /// Why, for the log.
        reason: String,
    },
    /// A core handled the end of a connection's Road.
    Disconnected {
        /// The node.
        node: NodeId,
        /// The connection.
        conn: u64,
    },
    /// A core's timer fired.
    Timeout {
        /// The node.
        node: NodeId,
    },
    /// A process crashed.
    Crashed {
        /// The process.
        pid: ProcessId,
    },
    /// A core handled a frame from a neighbour junction over a Highway.
    HighwayIn {
        /// The node.
        node: NodeId,
        /// The neighbour's junction id.
        from: u16,
        /// The frame.
        frame: HighwayFrame,
    },
    /// A node's end-to-end session with junction `peer` had news.
    Session {
        /// The node.
        node: NodeId,
        /// The other junction.
        peer: u16,
        /// What happened.
        event: junction_core::session::SessionEvent,
    },
    /// Traffic a node sent could not be passed on at junction `at`.
    Unroutable {
        /// The node that sent it.
        node: NodeId,
        /// The junction it was for.
        to: u16,
        /// Where it stopped.
        at: u16,
    },
    /// A Highway went up or down (both ends were told).
    LinkChanged {
        /// The link.
        link: usize,
        /// Whether it is up now.
        up: bool,
    },
}

/// One thing that happened, when.
#[derive(Debug, Clone)]
pub struct TraceEntry {
    /// The world step it happened in.
    pub step: u64,
    /// Time since the world started.
    pub at: Duration,
    /// The wall clock the core saw, in seconds since the Unix epoch.
    pub unix: u64,
    /// What happened.
    pub what: Traced,
}

/// A run stopped: what broke, with the seed that replays it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The world's seed.
    pub seed: u64,
    /// The step it broke at.
    pub step: u64,
    /// What broke.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation failed at step {} (replay with {SEED_VAR}={}): {}",
            self.step, self.seed, self.message
        )
    }
}

impl std::error::Error for Failure {}

/// The Unix time the simulated wall clock starts at: fixed, so runs replay.
const UNIX_EPOCH_START: u64 = 1_800_000_000;

/// The simulated world. See the module documentation.
pub struct World<P> {
    seed: u64,
    rng: Rng,
    start: Now,
    elapsed: Duration,
    step: u64,
    next_seq: u64,
    queue: BTreeMap<(Duration, u64), Event>,
    nodes: Vec<Node>,
    processes: Vec<Slot<P>>,
    roads: Vec<Road>,
    /// Links between nodes, for the multi-junction issue.
    links: Vec<Link>,
    trace: Vec<TraceEntry>,
    /// The latency new Roads get.
    pub road_latency: Latency,
    tamper: Option<Box<Tamper>>,
    forwards: Option<Box<TamperForward>>,
    watch: Option<Box<WatchHighway>>,
}

/// Sees every frame a core sends over a Highway: given the node, the
/// neighbour junction it goes to, the frame and its payload.
pub type WatchHighway = dyn FnMut(NodeId, u16, &HighwayFrame, &bytes::Bytes);

/// A fault injected between a core and its outputs, to check that oracles
/// catch a junction that misbehaves: given the node, the connection and a
/// frame the core wrote, what becomes of it.
pub type Tamper = dyn FnMut(NodeId, u64, &Frame) -> Tampered;

/// A rogue junction on the way, for tests: given the node, and the `from`
/// and `to` of a `Forward` frame its core passes on to another junction
/// (traffic it only carries, not its own), and the payload, what it sends
/// instead.
pub type TamperForward = dyn FnMut(NodeId, u16, u16, &bytes::Bytes) -> Forwarded;

/// What a [`TamperForward`] does to one forwarded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarded {
    /// It goes on unchanged.
    Pass,
    /// These go on instead, in order (none: it is lost; two copies: a
    /// replay; other bytes: an alteration).
    Instead(Vec<bytes::Bytes>),
}

/// What a [`Tamper`] does to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tampered {
    /// The frame passes unchanged.
    Pass,
    /// The frame is lost, as if the core never wrote it.
    Lose,
    /// The frame is written twice.
    Duplicate,
}

impl<P> fmt::Debug for World<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("World")
            .field("seed", &self.seed)
            .field("step", &self.step)
            .field("elapsed", &self.elapsed)
            .field("nodes", &self.nodes.len())
            .field("processes", &self.processes.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl<P: Process> World<P> {
    /// A world with one junction node configured by `config`, whose every
    /// random choice follows from `seed`.
    pub fn new(seed: u64, config: Config) -> Self {
        // The monotonic base is arbitrary; only differences reach the core,
        // and the trace records offsets.
        let start = Now::new(Instant::now(), UNIX_EPOCH_START);
        Self {
            seed,
            rng: Rng::new(seed),
            start,
            elapsed: Duration::ZERO,
            step: 0,
            next_seq: 0,
            queue: BTreeMap::new(),
            nodes: vec![Node {
                junction: config.junction,
                core: Core::new(config, start),
            }],
            processes: Vec::new(),
            roads: Vec::new(),
            links: Vec::new(),
            trace: Vec::new(),
            road_latency: Latency::default(),
            tamper: None,
            forwards: None,
            watch: None,
        }
    }

    /// A world with one junction node per configuration (each with its own
    /// junction id), and no links yet (see [`World::add_link`]).
    pub fn with_junctions(seed: u64, configs: Vec<Config>) -> Self {
        let mut configs = configs.into_iter();
        let first = configs.next().unwrap_or_default();
        let mut world = Self::new(seed, first);
        let start = world.start;
        for config in configs {
            world.nodes.push(Node {
                junction: config.junction,
                core: Core::new(config, start),
            });
        }
        world
    }

    /// A Highway between nodes `a` and `b`, up from now, each hop over it
    /// costing `cost`; its index.
    pub fn add_link(&mut self, a: NodeId, b: NodeId, cost: u32, latency: Latency) -> usize {
        self.links.push(Link {
            ends: (a, b),
            cost,
            latency,
            cut: true,
            silent: false,
            life: 0,
            last: (Duration::ZERO, Duration::ZERO),
        });
        let link = self.links.len() - 1;
        self.heal_link(link);
        link
    }

    /// Makes Highway `link` drop everything from now on without its ends
    /// hearing of it, as a cut does until their liveness checks notice;
    /// [`World::cut_link`] then tells them.
    pub fn silence_link(&mut self, link: usize) {
        if let Some(l) = self.links.get_mut(link) {
            l.silent = true;
        }
    }

    /// Cuts Highway `link`: what is in flight is lost, both ends hear it
    /// is down.
    pub fn cut_link(&mut self, link: usize) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        if l.cut {
            return;
        }
        l.cut = true;
        l.silent = false;
        l.life += 1;
        let (a, b) = l.ends;
        let now = self.now();
        self.step += 1;
        self.record(Traced::LinkChanged { link, up: false });
        let (ja, jb) = (self.nodes[a].junction, self.nodes[b].junction);
        self.nodes[a].core.handle_highway_down(jb, now);
        self.drain_core(a);
        self.nodes[b].core.handle_highway_down(ja, now);
        self.drain_core(b);
    }

    /// Heals Highway `link`: both ends hear it is up, as a new connection.
    pub fn heal_link(&mut self, link: usize) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        if !l.cut {
            return;
        }
        l.cut = false;
        l.life += 1;
        l.last = (self.elapsed, self.elapsed);
        let ((a, b), cost) = (l.ends, l.cost);
        let now = self.now();
        self.step += 1;
        self.record(Traced::LinkChanged { link, up: true });
        let (ja, jb) = (self.nodes[a].junction, self.nodes[b].junction);
        self.nodes[a].core.handle_highway_up(jb, cost, now);
        self.drain_core(a);
        self.nodes[b].core.handle_highway_up(ja, cost, now);
        self.drain_core(b);
    }

    /// Node `node` sends `payload` on `lane` of its session with junction
    /// `to` (see [`Core::junction_send`]); it shows in the trace as
    /// [`Traced::Session`] where it is handed up, and where it is
    /// acknowledged or ended.
    pub fn junction_send(
        &mut self,
        node: NodeId,
        to: u16,
        lane: u32,
        payload: bytes::Bytes,
    ) -> Result<u64, junction_core::session::SendError> {
        let seq = self.nodes[node].core.junction_send(to, lane, payload)?;
        self.drain_core(node);
        Ok(seq)
    }

    /// A node's core, to ask it things (routes, listings) between steps.
    pub fn core_mut(&mut self, node: NodeId) -> &mut Core {
        &mut self.nodes[node].core
    }

    /// Makes every core's output pass through `tamper` before it is traced
    /// and sent: a broken junction, for testing oracles. Never for real
    /// runs.
    pub fn danger_tamper_outputs(&mut self, tamper: Box<Tamper>) {
        self.tamper = Some(tamper);
    }

    /// Makes every `Forward` payload a junction passes on for others go
    /// through `tamper`: a rogue transit junction, for testing end-to-end
    /// protection. Never for real runs.
    pub fn danger_tamper_forwards(&mut self, tamper: Box<TamperForward>) {
        self.forwards = Some(tamper);
    }

    /// Shows every frame any core sends over a Highway to `watch`, as it
    /// leaves the core.
    pub fn watch_highways(&mut self, watch: Box<WatchHighway>) {
        self.watch = Some(watch);
    }

    /// Node `node` sends `frame` and `payload` to its neighbour junction
    /// `to` over their Highway (if up), as a rogue junction would: whatever
    /// its core says.
    pub fn danger_send_highway(
        &mut self,
        node: NodeId,
        to: u16,
        frame: HighwayFrame,
        payload: bytes::Bytes,
    ) {
        self.send_over_link(node, to, frame, payload);
    }

    /// The seed the world runs from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current moment.
    pub fn now(&self) -> Now {
        self.start.later(self.elapsed)
    }

    /// Time since the world started.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The world's generator, for choices made outside processes.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The Highways between nodes.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Everything that happened so far, in order.
    pub fn trace(&self) -> &[TraceEntry] {
        &self.trace
    }

    /// A digest of the trace: equal for two runs exactly when their traces
    /// print the same (FNV-1a over the `Debug` form of every entry).
    pub fn digest(&self) -> u64 {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        for entry in &self.trace {
            use std::fmt::Write;
            let _ = write!(h, "{entry:?}");
        }
        h.0
    }

    /// How many processes were ever added (crashed ones included).
    pub fn process_count(&self) -> usize {
        self.processes.len()
    }

    /// A live process.
    pub fn process(&self, pid: ProcessId) -> Option<&P> {
        match self.processes.get(pid) {
            Some(Slot::Alive(p)) => Some(p),
            _ => None,
        }
    }

    /// A process alive or crashed: for a crashed one, its state when it
    /// crashed (what it recorded, for oracles).
    pub fn remains(&self, pid: ProcessId) -> Option<&P> {
        match self.processes.get(pid) {
            Some(Slot::Alive(p) | Slot::Crashed(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether the process is alive (added and not crashed).
    pub fn is_alive(&self, pid: ProcessId) -> bool {
        self.process(pid).is_some()
    }

    /// The process's Road.
    pub fn road(&self, pid: ProcessId) -> Option<&Road> {
        self.roads.get(pid)
    }

    /// Attaches `process` to `node` over a new Road; the frames it has
    /// queued (its Hello) start on their way.
    pub fn add_process(&mut self, node: NodeId, process: P) -> ProcessId {
        let now = self.now();
        // Attaching is a step of its own, so that oracles can tell what it
        // caused from what the previous step did.
        self.step += 1;
        let conn = self.nodes[node].core.handle_connected(Peer::default(), now);
        let pid = self.processes.len();
        self.processes.push(Slot::Alive(process));
        self.roads.push(Road {
            node,
            conn,
            latency: self.road_latency,
            up_last: self.elapsed,
            down_last: self.elapsed,
            cut: false,
            closed: false,
        });
        self.record(Traced::Connected {
            node,
            conn: conn.get(),
            pid,
        });
        self.drain_core(node);
        self.flush(pid);
        pid
    }

    /// Runs `f` on a live process as its application (a command), then
    /// sends what it queued. `None` if the process is gone.
    pub fn act<R>(
        &mut self,
        pid: ProcessId,
        f: impl FnOnce(&mut P, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let now = self.now();
        let elapsed = self.elapsed;
        let Some(Slot::Alive(p)) = self.processes.get_mut(pid) else {
            return None;
        };
        let mut ctx = Ctx {
            now,
            elapsed,
            rng: &mut self.rng,
        };
        let r = f(p, &mut ctx);
        self.flush(pid);
        Some(r)
    }

    /// Crashes a process: it is gone at once; what it already wrote still
    /// reaches the core, then its Road ends there.
    pub fn crash(&mut self, pid: ProcessId) {
        let Some(Slot::Alive(_)) = self.processes.get(pid) else {
            return;
        };
        let Slot::Alive(p) = std::mem::replace(&mut self.processes[pid], Slot::Gone) else {
            return;
        };
        self.processes[pid] = Slot::Crashed(p);
        self.step += 1;
        self.record(Traced::Crashed { pid });
        let road = &mut self.roads[pid];
        road.cut = true;
        if !road.closed {
            let at = road.up_last.max(self.elapsed);
            road.up_last = at;
            self.schedule(at, Event::Disconnect { pid });
        }
    }

    /// Takes one step: the next event or core timeout. `Ok(false)` when
    /// nothing is left to do (no event queued, no timer set).
    pub fn step(&mut self) -> Result<bool, Failure> {
        let next_event = self.queue.keys().next().map(|&(at, _)| at);
        let next_timer = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                n.core
                    .poll_timeout()
                    .map(|at| (at.saturating_duration_since(self.start.instant), i))
            })
            .min();
        match (next_event, next_timer) {
            (None, None) => return Ok(false),
            // A timer due no later than the next event goes first.
            (Some(e), Some((t, node))) if t <= e => self.fire_timer(t, node),
            (None, Some((t, node))) => self.fire_timer(t, node),
            _ => {
                let Some(((at, _), event)) = self.queue.pop_first() else {
                    return Ok(false);
                };
                self.elapsed = self.elapsed.max(at);
                self.step += 1;
                self.handle(event);
            }
        }
        self.check()?;
        Ok(true)
    }

    /// Steps until nothing is left to do, or `max_steps` were taken (an
    /// error: something livelocked).
    pub fn run_until_idle(&mut self, max_steps: u64) -> Result<(), Failure> {
        for _ in 0..max_steps {
            if !self.step()? {
                return Ok(());
            }
        }
        Err(self.failure(format!("still busy after {max_steps} steps")))
    }

    /// Steps through everything due up to `elapsed` since the start, then
    /// sets the clock there.
    pub fn run_until(&mut self, elapsed: Duration) -> Result<(), Failure> {
        loop {
            let next_event = self.queue.keys().next().map(|&(at, _)| at);
            let next_timer = self
                .nodes
                .iter()
                .filter_map(|n| n.core.poll_timeout())
                .map(|at| at.saturating_duration_since(self.start.instant))
                .min();
            let next = [next_event, next_timer].into_iter().flatten().min();
            match next {
                Some(at) if at <= elapsed => {
                    self.step()?;
                }
                _ => break,
            }
        }
        self.elapsed = self.elapsed.max(elapsed);
        Ok(())
    }

    /// A failure at the current step, naming the seed.
    pub fn failure(&self, message: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            message,
        }
    }

    /// Checks every core's invariants.
    pub fn check(&self) -> Result<(), Failure> {
        for (i, node) in self.nodes.iter().enumerate() {
            node.core
                .check_invariants()
                .map_err(|e| self.failure(format!("node {i}: {e}")))?;
        }
        Ok(())
    }

    fn fire_timer(&mut self, at: Duration, node: NodeId) {
        self.elapsed = self.elapsed.max(at);
        self.step += 1;
        let now = self.now();
        self.record(Traced::Timeout { node });
        self.nodes[node].core.handle_timeout(now);
        self.drain_core(node);
    }

    /// A frame from process `pid` reaches its node's core.
    fn core_in(&mut self, pid: ProcessId, frame: Frame, now: Now) {
        let Road { node, conn, .. } = self.roads[pid];
        if self.roads[pid].closed {
            // The core closed this Road already: the bytes go nowhere.
            return;
        }
        self.record(Traced::CoreIn {
            node,
            conn: conn.get(),
            frame: frame.clone(),
        });
        self.nodes[node].core.handle_frame(conn, frame, now);
        self.drain_core(node);
    }

    fn handle(&mut self, event: Event) {
        let now = self.now();
        match event {
            Event::ToCore { pid, frame } => {
                // As the shell does, frames a Road brings at once are one
                // batch: what they send to other junctions is held until
                // its end, and goes out together.
                let node = self.roads[pid].node;
                self.nodes[node].core.hold_transmits();
                self.core_in(pid, frame, now);
                while let Some(next) = self.queue.first_entry()
                    && next.key().0 <= self.elapsed
                    && matches!(next.get(), Event::ToCore { pid: p, .. } if *p == pid)
                {
                    let Event::ToCore { frame, .. } = next.remove() else {
                        unreachable!("matched above")
                    };
                    self.step += 1;
                    self.core_in(pid, frame, now);
                }
                self.nodes[node].core.release_transmits();
                self.drain_core(node);
            }
            Event::Disconnect { pid } => {
                let Road { node, conn, .. } = self.roads[pid];
                if self.roads[pid].closed {
                    return;
                }
                self.roads[pid].closed = true;
                self.record(Traced::Disconnected {
                    node,
                    conn: conn.get(),
                });
                self.nodes[node].core.handle_disconnected(conn);
                self.drain_core(node);
            }
            Event::ToProcess { pid, frame } => {
                let elapsed = self.elapsed;
                if let Some(Slot::Alive(p)) = self.processes.get_mut(pid) {
                    let mut ctx = Ctx {
                        now,
                        elapsed,
                        rng: &mut self.rng,
                    };
                    p.handle_frame(frame, &mut ctx);
                    self.flush(pid);
                }
            }
            Event::OverLink {
                link,
                life,
                to,
                frame,
                payload,
            } => {
                // Sent in an earlier life of the link: lost with it.
                if self.links[link].cut || self.links[link].life != life {
                    return;
                }
                let (a, b) = self.links[link].ends;
                let from = self.nodes[if to == a { b } else { a }].junction;
                self.record(Traced::HighwayIn {
                    node: to,
                    from,
                    frame: frame.clone(),
                });
                self.nodes[to]
                    .core
                    .handle_highway_frame(from, frame, payload, now);
                self.drain_core(to);
            }
            Event::RoadClosed { pid } => {
                let elapsed = self.elapsed;
                if let Some(Slot::Alive(p)) = self.processes.get_mut(pid) {
                    let mut ctx = Ctx {
                        now,
                        elapsed,
                        rng: &mut self.rng,
                    };
                    p.handle_road_closed(&mut ctx);
                }
            }
        }
    }

    /// Sends what a process queued up its Road.
    fn flush(&mut self, pid: ProcessId) {
        loop {
            let Some(Slot::Alive(p)) = self.processes.get_mut(pid) else {
                return;
            };
            let Some(frame) = p.poll_transmit() else {
                return;
            };
            let road = &self.roads[pid];
            if road.cut || road.closed {
                // Written into a Road the junction already closed: lost, as
                // a write to a closed socket is.
                continue;
            }
            let latency = road.latency;
            let delay = self.rng.between(latency.min, latency.max);
            let road = &mut self.roads[pid];
            let at = (self.elapsed + delay).max(road.up_last);
            road.up_last = at;
            self.schedule(at, Event::ToCore { pid, frame });
        }
    }

    /// Routes what a core produced: frames down their Roads, closes.
    fn drain_core(&mut self, node: NodeId) {
        while let Some(output) = self.nodes[node].core.poll_output() {
            match output {
                Output::Frame { conn, frame } => {
                    let copies = match self.tamper.as_mut().map(|t| t(node, conn.get(), &frame)) {
                        None | Some(Tampered::Pass) => 1,
                        Some(Tampered::Lose) => 0,
                        Some(Tampered::Duplicate) => 2,
                    };
                    for _ in 0..copies {
                        self.route_frame(node, conn, frame.clone());
                    }
                }
                Output::Close { conn, reason } => {
                    self.record(Traced::CoreClosed {
                        node,
                        conn: conn.get(),
                        reason,
                    });
                    let Some(pid) = self.pid_of(node, conn) else {
                        continue;
                    };
                    let road = &mut self.roads[pid];
                    road.closed = true;
                    if road.cut {
                        continue;
                    }
                    let at = road.down_last.max(self.elapsed);
                    road.down_last = at;
                    self.schedule(at, Event::RoadClosed { pid });
                }
                Output::Highway { to, frame, payload } => {
                    // A Highway delivers a frame's pieces as one.
                    let payload = payload.to_bytes();
                    if let Some(watch) = self.watch.as_mut() {
                        watch(node, to, &frame, &payload);
                    }
                    let passing = match &frame {
                        HighwayFrame::Forward { from, to, .. }
                            if *from != self.nodes[node].junction =>
                        {
                            Some((*from, *to))
                        }
                        _ => None,
                    };
                    let tampered = match (passing, self.forwards.as_mut()) {
                        (Some((from, dest)), Some(t)) => t(node, from, dest, &payload),
                        _ => Forwarded::Pass,
                    };
                    match tampered {
                        Forwarded::Pass => self.send_over_link(node, to, frame, payload),
                        Forwarded::Instead(payloads) => {
                            for p in payloads {
                                self.send_over_link(node, to, frame.clone(), p);
                            }
                        }
                    }
                }
                Output::Session { peer, event } => {
                    self.record(Traced::Session { node, peer, event });
                }
                Output::Unroutable { to, at } => {
                    self.record(Traced::Unroutable { node, to, at });
                }
            }
        }
    }

    /// Records a frame a core wrote and sends it down its Road.
    fn route_frame(&mut self, node: NodeId, conn: ConnId, frame: Frame) {
        self.record(Traced::CoreOut {
            node,
            conn: conn.get(),
            frame: frame.clone(),
        });
        let Some(pid) = self.pid_of(node, conn) else {
            return;
        };
        let latency = self.roads[pid].latency;
        let delay = self.rng.between(latency.min, latency.max);
        let road = &mut self.roads[pid];
        if road.cut {
            return;
        }
        let at = (self.elapsed + delay).max(road.down_last);
        road.down_last = at;
        self.schedule(at, Event::ToProcess { pid, frame });
    }

    /// Sends a frame from `node` to its neighbour junction `to` over their
    /// Highway, if one is up; a core speaks only to neighbours it was told
    /// of, so there is one.
    fn send_over_link(
        &mut self,
        node: NodeId,
        to: u16,
        frame: HighwayFrame,
        payload: bytes::Bytes,
    ) {
        let found = self.links.iter().position(|l| {
            let (a, b) = l.ends;
            !l.cut
                && ((a == node && self.nodes[b].junction == to)
                    || (b == node && self.nodes[a].junction == to))
        });
        let Some(link) = found else {
            return;
        };
        let l = &self.links[link];
        if l.silent {
            return;
        }
        let (latency, life) = (l.latency, l.life);
        let target = if l.ends.0 == node { l.ends.1 } else { l.ends.0 };
        let delay = self.rng.between(latency.min, latency.max);
        let l = &mut self.links[link];
        let last = if target == l.ends.0 {
            &mut l.last.0
        } else {
            &mut l.last.1
        };
        let at = (self.elapsed + delay).max(*last);
        *last = at;
        self.schedule(
            at,
            Event::OverLink {
                link,
                life,
                to: target,
                frame,
                payload,
            },
        );
    }

    fn pid_of(&self, node: NodeId, conn: ConnId) -> Option<ProcessId> {
        // Roads are few; a scan keeps the world simple.
        self.roads
            .iter()
            .position(|r| r.node == node && r.conn == conn)
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.insert((at, seq), event);
    }

    fn record(&mut self, what: Traced) {
        let now = self.now();
        self.trace.push(TraceEntry {
            step: self.step,
            at: self.elapsed,
            unix: now.unix,
            what,
        });
    }
}

/// FNV-1a, fed through `fmt::Write` so that entries hash without a string.
struct Fnv(u64);

impl fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}
