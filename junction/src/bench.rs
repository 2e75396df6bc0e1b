//! `junction bench`: the junction measured against a raw socket baseline in
//! the same run, so that the figures are ratios that mean something on any
//! machine.
//!
//! The baseline is two processes moving the same frames over a Unix socket
//! with tokio: a ping-pong for round trips, and a one-way stream with the
//! same write batching the junction uses. The junction figures are the same
//! work between two driver processes through a junction process. Round trips
//! are measured twice: unpinned, and with every process pinned to one CPU,
//! where software cost is not hidden behind cross-CPU wake-ups.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use junction_driver::{Driver, Rights};
use junction_road::transport::unix;
use junction_road::{Frame, Header, Send};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

mod floods;
mod highway;
mod hostile;
mod monitored;
mod raw;

/// `junction bench` options.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// A short run (a tenth of the work), for smoke tests.
    #[arg(long)]
    quick: bool,
    /// Skip the runs pinned to one CPU.
    #[arg(long)]
    no_pin: bool,
    /// Measure round trips only (for profiling).
    #[arg(long, hide = true)]
    rtt_only: bool,
    /// Measure the junction under attack instead (issue 7): a well-behaved
    /// client's round trips and the junction's memory under each flood,
    /// and 10,000 idle drivers connecting. About a minute; with --json
    /// the figures are under the "hostile" key.
    #[arg(long)]
    hostile: bool,
    /// Measure the bus across a Highway instead (issue 9): process →
    /// junction → QUIC → junction → process, against raw quinn with the
    /// same TLS, framing and batching, as ratios; with --json the figures
    /// are under the "highway" key.
    #[arg(long, conflicts_with = "hostile")]
    highway: bool,
    /// With --hostile: run only these floods (repeatable), and skip the
    /// idle connections [default: every flood, then the idle connections].
    #[arg(long, value_enum, requires = "hostile")]
    only: Vec<floods::Flood>,
}

/// A benchmark child's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Role {
    /// Raw socket: send every frame back.
    RawEcho,
    /// Raw socket: a minimal relay; accepts two connections and forwards
    /// frames between them, no decisions.
    RawRelay,
    /// Raw socket: count frames, answer after `count`.
    RawSink,
    /// Driver: register bench.echo and answer calls with their payload.
    Echo,
    /// Driver: register bench.sink, count messages, answer a call with the count.
    Sink,
    /// Driver: prove the identity in JUNCTION_KEY/JUNCTION_CERT, register
    /// bench.idecho, answer calls with their payload.
    IdEcho,
    /// Hostile bench: register bench.victim, echo calls, hold those whose
    /// payload starts with "hold".
    Victim,
    /// Hostile bench: run the attack `--flood` for `--secs` seconds.
    Flood,
    /// Hostile bench: connect `--count` idle drivers on "go" (stdin), hold
    /// them until stdin closes.
    IdleDrivers,
    /// Highway bench: raw quinn, an echo and a sink on a QUIC endpoint with
    /// the TLS identity in `--key`/`--cert`, trusting `--socket` as the
    /// authority's certificate; prints its address, serves until stdin
    /// closes.
    RawQuinn,
}

/// `junction bench-peer` options.
#[derive(Debug, clap::Args)]
pub(crate) struct PeerArgs {
    /// What this process does.
    #[arg(long, value_enum)]
    role: Role,
    /// The socket to connect to.
    #[arg(long)]
    socket: PathBuf,
    /// For raw-sink: how many frames to expect.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// For raw roles: plain tokio socket halves instead of the Road transport.
    #[arg(long)]
    plain: bool,
    /// For flood: which attack.
    #[arg(long, value_enum)]
    flood: Option<floods::Flood>,
    /// For flood: how long to attack, in seconds.
    #[arg(long, default_value_t = 2.5)]
    secs: f64,
    /// For raw-quinn: the endpoint's key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// For raw-quinn: the endpoint's certificate chain.
    #[arg(long)]
    cert: Option<PathBuf>,
}

const SMALL: usize = 64;
const LARGE: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Work {
    round_trips: usize,
    small_messages: u64,
    large_messages: u64,
    /// Throughput runs per side; the best counts.
    tries: u32,
    rtt_only: bool,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Rtt {
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Side {
    rtt: Rtt,
    rtt_pinned: Option<Rtt>,
    /// Raw side only: the same ping-pong over the junction's own Road
    /// transport, which registers sockets more sparingly than plain tokio.
    road_rtt: Option<Rtt>,
    road_rtt_pinned: Option<Rtt>,
    /// Raw side only: through a minimal relay process on the Road
    /// transport, the floor for any broker.
    relay_rtt: Option<Rtt>,
    relay_rtt_pinned: Option<Rtt>,
    small_msgs_per_sec: f64,
    /// CPU time each process spent per 64-byte message.
    small_cpu_ns: Option<CpuPerMessage>,
    /// CPU time each process spent per 1 MiB message.
    large_cpu_ns: Option<CpuPerMessage>,
    /// Junction side only: round trips between two processes that proved
    /// identities (every delivery carries one).
    identity_rtt: Option<Rtt>,
    identity_rtt_pinned: Option<Rtt>,
    /// Junction side only: registering a name with a certificate, p50.
    register_p50_us: Option<f64>,
    /// Junction side only: looking a name up, p50.
    lookup_p50_us: Option<f64>,
    /// Junction side only: proving an identity (chain and proof checked), p50.
    authenticate_p50_us: Option<f64>,
    large_gb_per_sec: f64,
    /// Junction side only: round trips with a `junction monitor` attached.
    monitored_rtt: Option<Rtt>,
    monitored_rtt_pinned: Option<Rtt>,
    /// Junction side only: 64 B one-way, one run without a monitor and one
    /// with, back to back (msgs/s).
    unmonitored_small_msgs_per_sec: Option<f64>,
    monitored_small_msgs_per_sec: Option<f64>,
    /// The junction's CPU time per message in those two runs (ns).
    unmonitored_junction_cpu_ns: Option<f64>,
    monitored_junction_cpu_ns: Option<f64>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct CpuPerMessage {
    sender: f64,
    junction: f64,
    receiver: f64,
}

/// CPU time (user + system) a process has used, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (ticks(11) + ticks(12)) * 10_000_000
}

/// Runs the benchmark and prints the report.
pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let work = if args.quick {
        Work {
            round_trips: 2_000,
            small_messages: 100_000,
            large_messages: 100,
            tries: 1,
            rtt_only: args.rtt_only,
        }
    } else {
        Work {
            round_trips: 20_000,
            small_messages: 1_000_000,
            large_messages: 500,
            tries: 3,
            rtt_only: args.rtt_only,
        }
    };
    let dir = std::env::temp_dir().join(format!("junction-bench-{}", std::process::id()));
    // Private whatever the umask: the sockets go in it, and a directory
    // others may write in is refused.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir)?;
    if args.highway {
        let task_dir = dir.clone();
        let (quick, no_pin, json) = (args.quick, args.no_pin, args.json);
        let result = crate::cmd::block_on(async move {
            tokio::spawn(highway::run(task_dir, quick, no_pin, json)).await?
        });
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    if args.hostile {
        let task_dir = dir.clone();
        let (quick, only) = (args.quick, args.only);
        let result = crate::cmd::block_on(async move {
            tokio::spawn(hostile::run(task_dir, quick, only)).await?
        });
        let _ = std::fs::remove_dir_all(&dir);
        hostile::report(&result?, args.json);
        return Ok(());
    }
    // The measuring loops run in a spawned task, as a driver's hot loop
    // should: on a current-thread runtime, waking the `block_on` future costs
    // an extra zero-timeout poll of the I/O driver on every wake-up.
    let no_pin = args.no_pin;
    let task_dir = dir.clone();
    let result =
        crate::cmd::block_on(
            async move { tokio::spawn(measure_all(task_dir, work, no_pin)).await? },
        );
    let _ = std::fs::remove_dir_all(&dir);
    let (raw, through, rss) = result?;
    report(&raw, &through, rss, args.json);
    Ok(())
}

async fn measure_all(dir: PathBuf, work: Work, no_pin: bool) -> anyhow::Result<(Side, Side, u64)> {
    let mut raw = Side::default();
    let mut through = Side::default();
    let mut rss = 0;
    measure(&dir, &work, &mut raw, &mut through, false, &mut rss).await?;
    if !no_pin {
        pin_to_cpu0()?;
        measure(&dir, &work, &mut raw, &mut through, true, &mut rss).await?;
    }
    Ok((raw, through, rss))
}

/// Says what the bench is doing, on stderr: the figures (and `--json`)
/// go to stdout, and a run takes minutes.
pub(crate) fn progress(what: &str) {
    eprintln!("bench: {what}…");
}

async fn measure(
    dir: &Path,
    work: &Work,
    raw: &mut Side,
    through: &mut Side,
    pinned: bool,
    rss: &mut u64,
) -> anyhow::Result<()> {
    let how = if pinned {
        "pinned to CPU 0"
    } else {
        "unpinned"
    };
    progress(&format!("round trips over a raw socket, {how}"));
    let raw_rtt = raw_round_trips(dir, work.round_trips, true).await?;
    progress(&format!("round trips over the Road transport, {how}"));
    let road_rtt = raw_round_trips(dir, work.round_trips, false).await?;
    progress(&format!("round trips through a minimal relay, {how}"));
    let relay_rtt = relay_round_trips(dir, work.round_trips).await?;
    if pinned {
        raw.road_rtt_pinned = Some(road_rtt);
        raw.relay_rtt_pinned = Some(relay_rtt);
    } else {
        raw.road_rtt = Some(road_rtt);
        raw.relay_rtt = Some(relay_rtt);
    }
    let pki = BenchPki::new(dir)?;
    let jct = JunctionProcess::start(dir, &pki.authority_path).await?;
    let result = async {
        let driver = Driver::connect(&jct.socket).await?;
        let echo_peer = spawn_peer(Role::Echo, &jct.socket, 0, false)?;
        let sink_peer = spawn_peer(Role::Sink, &jct.socket, 0, false)?;
        let echo = lookup(&driver, "bench.echo").await?;
        let sink = lookup(&driver, "bench.sink").await?;
        progress(&format!("round trips through the junction, {how}"));
        let rtt = junction_round_trips(&driver, &echo, work.round_trips).await?;
        progress(&format!("round trips with a monitor attached, {how}"));
        let watcher = monitored::attach(&jct.socket).await?;
        let watched = junction_round_trips(&driver, &echo, work.round_trips).await?;
        drop(watcher);
        if pinned {
            through.monitored_rtt_pinned = Some(watched);
        } else {
            through.monitored_rtt = Some(watched);
        }
        progress(&format!(
            "identities: registration, lookup, identified round trips, {how}"
        ));
        let ids = identity_figures(&jct.socket, &pki, work.round_trips).await?;
        if pinned {
            through.identity_rtt_pinned = Some(ids.rtt);
        } else {
            through.identity_rtt = Some(ids.rtt);
            through.register_p50_us = Some(ids.register_p50_us);
            through.lookup_p50_us = Some(ids.lookup_p50_us);
            through.authenticate_p50_us = Some(ids.authenticate_p50_us);
        }
        drop(ids.peer);
        if pinned {
            raw.rtt_pinned = Some(raw_rtt);
            through.rtt_pinned = Some(rtt);
        } else if work.rtt_only {
            raw.rtt = raw_rtt;
            through.rtt = rtt;
        } else {
            raw.rtt = raw_rtt;
            through.rtt = rtt;
            // Throughput is the best of `tries` runs on each side alike:
            // on a shared machine a run can lose its CPU for a while, and the
            // best run is the one that measured the software, not the noise.
            let pids = [
                std::process::id(),
                jct.child.id().unwrap_or(0),
                sink_peer.id().unwrap_or(0),
            ];
            let stream = Stream {
                dir,
                driver: &driver,
                sink: &sink,
                pids,
                tries: work.tries,
            };
            progress(&format!(
                "{} one-way 64 B messages, raw and through the junction, best of {}",
                work.small_messages, work.tries
            ));
            let (raw_secs, junction_secs, cpu) = stream.best(SMALL, work.small_messages).await?;
            raw.small_msgs_per_sec = work.small_messages as f64 / raw_secs;
            through.small_msgs_per_sec = work.small_messages as f64 / junction_secs;
            through.small_cpu_ns = Some(cpu);
            progress(&format!(
                "{} one-way 1 MiB messages, raw and through the junction, best of {}",
                work.large_messages, work.tries
            ));
            let (raw_secs, junction_secs, cpu) = stream.best(LARGE, work.large_messages).await?;
            let bytes = (LARGE as u64 * work.large_messages) as f64;
            raw.large_gb_per_sec = bytes / 1e9 / raw_secs;
            through.large_gb_per_sec = bytes / 1e9 / junction_secs;
            through.large_cpu_ns = Some(cpu);
            let n = work.small_messages / 4;
            let junction_pid = jct.child.id().unwrap_or(0);
            let before = cpu_ns(junction_pid);
            let plain = junction_stream(&driver, &sink, SMALL, n).await?;
            let between = cpu_ns(junction_pid);
            let watcher = monitored::attach(&jct.socket).await?;
            let start = cpu_ns(junction_pid);
            let watched = junction_stream(&driver, &sink, SMALL, n).await?;
            let after = cpu_ns(junction_pid);
            drop(watcher);
            through.unmonitored_small_msgs_per_sec = Some(n as f64 / plain);
            through.monitored_small_msgs_per_sec = Some(n as f64 / watched);
            through.unmonitored_junction_cpu_ns = Some((between - before) as f64 / n as f64);
            through.monitored_junction_cpu_ns = Some((after - start) as f64 / n as f64);
        }
        *rss = (*rss).max(jct.peak_rss_kib());
        drop(driver);
        for mut p in [echo_peer, sink_peer] {
            let _ = p.kill().await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    jct.stop().await;
    result
}

/// One-way streams, raw and through the junction, for the same work.
struct Stream<'a> {
    dir: &'a Path,
    driver: &'a Driver,
    sink: &'a junction_driver::Capability,
    /// Sender, junction and receiver, for CPU accounting.
    pids: [u32; 3],
    tries: u32,
}

impl Stream<'_> {
    /// Seconds for `count` messages of `size` bytes, raw and through the
    /// junction, each the best of `tries` runs (on a shared machine a run
    /// can lose its CPU for a while; the best run measured the software,
    /// not the noise), and the CPU each process spent per message in the
    /// best junction run.
    async fn best(&self, size: usize, count: u64) -> anyhow::Result<(f64, f64, CpuPerMessage)> {
        let (mut best_raw, mut best_junction) = (f64::MAX, f64::MAX);
        let mut cpu = CpuPerMessage::default();
        for _ in 0..self.tries {
            best_raw = best_raw.min(raw_stream(self.dir, size, count).await?);
            let before = self.pids.map(cpu_ns);
            let secs = junction_stream(self.driver, self.sink, size, count).await?;
            let after = self.pids.map(cpu_ns);
            if secs < best_junction {
                best_junction = secs;
                let per = |i: usize| (after[i] - before[i]) as f64 / count as f64;
                cpu = CpuPerMessage {
                    sender: per(0),
                    junction: per(1),
                    receiver: per(2),
                };
            }
        }
        Ok((best_raw, best_junction, cpu))
    }
}

fn report(raw: &Side, through: &Side, rss_kib: u64, json: bool) {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    if json {
        let value = serde_json::json!({
            "raw": raw,
            "junction": through,
            "ratios": {
                "rtt_p50": ratio(through.rtt.p50_us, raw.rtt.p50_us),
                "rtt_p99": ratio(through.rtt.p99_us, raw.rtt.p99_us),
                "rtt_pinned_p50": through.rtt_pinned.zip(raw.rtt_pinned).map(|(j, r)| ratio(j.p50_us, r.p50_us)),
                "rtt_pinned_p99": through.rtt_pinned.zip(raw.rtt_pinned).map(|(j, r)| ratio(j.p99_us, r.p99_us)),
                "identities_vs_none_pinned_p50": through.identity_rtt_pinned.zip(through.rtt_pinned).map(|(j, r)| ratio(j.p50_us, r.p50_us)),
                "identities_vs_none_p50": through.identity_rtt.map(|j| ratio(j.p50_us, through.rtt.p50_us)),
                "junction_vs_relay_pinned_p50": through.rtt_pinned.zip(raw.relay_rtt_pinned).map(|(j, r)| ratio(j.p50_us, r.p50_us)),
                "road_vs_plain_pinned_p50": raw.road_rtt_pinned.zip(raw.rtt_pinned).map(|(j, r)| ratio(j.p50_us, r.p50_us)),
                "small_msgs_per_sec": ratio(through.small_msgs_per_sec, raw.small_msgs_per_sec),
                "large_gb_per_sec": ratio(through.large_gb_per_sec, raw.large_gb_per_sec),
                "monitor_vs_none_p50": through.monitored_rtt.map(|m| ratio(m.p50_us, through.rtt.p50_us)),
                "monitor_vs_none_pinned_p50": through.monitored_rtt_pinned.zip(through.rtt_pinned).map(|(m, r)| ratio(m.p50_us, r.p50_us)),
                "monitor_vs_none_small_msgs_per_sec": through.monitored_small_msgs_per_sec.zip(through.unmonitored_small_msgs_per_sec).map(|(m, r)| ratio(m, r)),
                "monitor_vs_none_junction_cpu_per_msg": through.monitored_junction_cpu_ns.zip(through.unmonitored_junction_cpu_ns).map(|(m, r)| ratio(m, r)),
            },
            "junction_peak_rss_kib": rss_kib,
        });
        println!("{value}");
        return;
    }
    // Each table has its own heading, naming what its two columns
    // compare, and is printed only when it has rows.
    let table = |title: &str, a: &str, b: &str, rows: &[(&str, f64, f64)]| {
        if rows.is_empty() {
            return;
        }
        println!();
        println!(
            "{title:<40} {a:>12} {b:>12} {:>22}",
            format!("RATIO {b}/{a}")
        );
        for (name, x, y) in rows {
            println!("{name:<40} {x:>12.2} {y:>12.2} {:>21.2}x", ratio(*y, *x));
        }
    };
    let mut rows = vec![
        (
            "call round trip p50 (µs)",
            raw.rtt.p50_us,
            through.rtt.p50_us,
        ),
        (
            "call round trip p99 (µs)",
            raw.rtt.p99_us,
            through.rtt.p99_us,
        ),
    ];
    if let (Some(r), Some(j)) = (raw.rtt_pinned, through.rtt_pinned) {
        rows.push(("pinned round trip p50 (µs)", r.p50_us, j.p50_us));
        rows.push(("pinned round trip p99 (µs)", r.p99_us, j.p99_us));
    }
    if through.small_msgs_per_sec > 0.0 {
        rows.push((
            "64 B one-way (million messages/s)",
            raw.small_msgs_per_sec / 1e6,
            through.small_msgs_per_sec / 1e6,
        ));
        rows.push((
            "1 MiB one-way (GB/s)",
            raw.large_gb_per_sec,
            through.large_gb_per_sec,
        ));
    }
    table("MEASURE", "RAW", "JUNCTION", &rows);
    if let (Some(road), Some(relay), Some(j)) = (
        raw.road_rtt_pinned,
        raw.relay_rtt_pinned,
        through.rtt_pinned,
    ) {
        table(
            "PINNED ROUND TRIP p50 (µs), FOR SCALE",
            "ROAD",
            "THIS",
            &[
                (
                    "a minimal relay process (no decisions)",
                    road.p50_us,
                    relay.p50_us,
                ),
                ("the junction", road.p50_us, j.p50_us),
            ],
        );
        println!(
            "the junction costs {:.2}x a relay that makes no decisions",
            ratio(j.p50_us, relay.p50_us)
        );
    }
    let identified = match (through.rtt_pinned, through.identity_rtt_pinned) {
        (Some(plain), Some(ids)) => {
            Some(("pinned call round trip p50 (µs)", plain.p50_us, ids.p50_us))
        }
        _ => through
            .identity_rtt
            .map(|ids| ("call round trip p50 (µs)", through.rtt.p50_us, ids.p50_us)),
    };
    if let Some(row) = identified {
        table("IDENTITIES", "ANONYMOUS", "IDENTIFIED", &[row]);
    }
    println!();
    if let (Some(r), Some(l), Some(a)) = (
        through.register_p50_us,
        through.lookup_p50_us,
        through.authenticate_p50_us,
    ) {
        println!(
            "registration p50 {r:.1} µs, lookup p50 {l:.1} µs, authentication (chain + proof) p50 {a:.1} µs"
        );
    }
    if let Some(cpu) = through.small_cpu_ns {
        println!(
            "CPU per 64 B message through the junction: sender {:.0} ns, junction {:.0} ns, receiver {:.0} ns",
            cpu.sender, cpu.junction, cpu.receiver
        );
    }
    if let Some(cpu) = through.large_cpu_ns {
        println!(
            "CPU per 1 MiB message through the junction: sender {:.0} µs, junction {:.0} µs, receiver {:.0} µs",
            cpu.sender / 1e3,
            cpu.junction / 1e3,
            cpu.receiver / 1e3
        );
    }
    monitored::report(through);
    println!("junction peak RSS: {:.1} MiB", rss_kib as f64 / 1024.0);
}

fn percentiles(mut samples: Vec<Duration>) -> Rtt {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    Rtt {
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

fn bench_frame(payload: Bytes) -> Frame {
    Frame::with_payload(
        Header::Send(Send {
            handle: 1,
            caps: Vec::new(),
        }),
        payload,
    )
}

type AnyReader =
    junction_road::RoadReader<Box<dyn tokio::io::AsyncRead + Unpin + std::marker::Send>>;
type AnyWriter =
    junction_road::RoadWriter<Box<dyn tokio::io::AsyncWrite + Unpin + std::marker::Send>>;

/// A raw link over a connected socket: plain tokio halves (the baseline
/// the goals are stated against), or the junction's own Road transport.
fn raw_link(stream: tokio::net::UnixStream, plain: bool) -> anyhow::Result<(AnyReader, AnyWriter)> {
    const MAX: u32 = 1 << 24;
    if plain {
        let (r, w) = stream.into_split();
        Ok((
            junction_road::RoadReader::new(Box::new(r), MAX),
            junction_road::RoadWriter::new(Box::new(w)),
        ))
    } else {
        let (r, w) = unix::split(stream, MAX)?;
        Ok((
            junction_road::RoadReader::new(Box::new(r.into_inner()), MAX),
            junction_road::RoadWriter::new(Box::new(w.into_inner())),
        ))
    }
}

/// Round trips through a minimal relay process: the floor for any broker.
async fn relay_round_trips(dir: &Path, n: usize) -> anyhow::Result<Rtt> {
    let socket = dir.join("relay.sock");
    let _ = std::fs::remove_file(&socket);
    let mut relay = spawn_peer(Role::RawRelay, &socket, 0, false)?;
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let (mut reader, mut writer) = raw_link(stream, false)?;
    // The relay accepts in order: this process first, then the echo.
    let mut echo = spawn_peer(Role::RawEcho, &socket, 0, false)?;
    let rtt = ping_pong(&mut reader, &mut writer, n).await;
    drop(writer);
    let _ = echo.kill().await;
    let _ = relay.kill().await;
    let _ = std::fs::remove_file(&socket);
    rtt
}

async fn ping_pong(
    reader: &mut AnyReader,
    writer: &mut AnyWriter,
    n: usize,
) -> anyhow::Result<Rtt> {
    let frame = bench_frame(Bytes::from(vec![7u8; SMALL]));
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        writer.send(&frame).await?;
        reader.read_frame().await?.context("the echo closed")?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    Ok(percentiles(samples))
}

async fn raw_round_trips(dir: &Path, n: usize, plain: bool) -> anyhow::Result<Rtt> {
    let socket = dir.join("raw-echo.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let mut child = spawn_peer(Role::RawEcho, &socket, 0, plain)?;
    let (stream, _) = tokio::time::timeout(TIMEOUT, listener.accept()).await??;
    let (mut reader, mut writer) = raw_link(stream, plain)?;
    let rtt = ping_pong(&mut reader, &mut writer, n).await;
    drop(writer);
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&socket);
    rtt
}

/// Streams `count` frames of `size` bytes one way; returns seconds.
async fn raw_stream(dir: &Path, size: usize, count: u64) -> anyhow::Result<f64> {
    let socket = dir.join("raw-sink.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let mut child = spawn_peer(Role::RawSink, &socket, count, true)?;
    let (stream, _) = tokio::time::timeout(TIMEOUT, listener.accept()).await??;
    let (mut reader, mut writer) = raw_link(stream, true)?;
    let frame = bench_frame(Bytes::from(vec![7u8; size]));
    let start = Instant::now();
    for _ in 0..count {
        writer.queue(&frame).await?;
    }
    writer.flush().await?;
    reader
        .read_frame()
        .await?
        .context("raw sink closed early")?;
    let secs = start.elapsed().as_secs_f64();
    drop(writer);
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&socket);
    Ok(secs)
}

/// An authority with a service certificate for bench.idecho and a client
/// certificate, in the bench's temp dir.
struct BenchPki {
    authority_path: PathBuf,
    echo: (PathBuf, PathBuf),
    client: (
        junction_identity::SecretKey,
        Vec<junction_identity::Certificate>,
    ),
    registrar: (
        junction_identity::SecretKey,
        Vec<junction_identity::Certificate>,
    ),
}

impl BenchPki {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        use junction_identity::Role;
        let authority = junction::authority::LocalAuthority::new()?;
        let authority_path = authority.write_certificate(dir)?;
        let echo = authority.issue_files(
            dir,
            "idecho",
            2,
            Role::Service {
                names: vec!["bench.idecho".parse()?],
            },
        )?;
        Ok(Self {
            authority_path,
            echo,
            client: authority.issue(3, Role::Client)?,
            registrar: authority.issue(
                4,
                Role::Service {
                    names: vec!["bench.registered".parse()?],
                },
            )?,
        })
    }
}

struct IdentityFigures {
    rtt: Rtt,
    register_p50_us: f64,
    lookup_p50_us: f64,
    authenticate_p50_us: f64,
    peer: Child,
}

async fn identity_figures(
    socket: &Path,
    pki: &BenchPki,
    n: usize,
) -> anyhow::Result<IdentityFigures> {
    let peer = Command::new(crate::self_exe()?)
        .args(["bench-peer", "--role", "id-echo", "--socket"])
        .arg(socket)
        .env("JUNCTION_KEY", &pki.echo.0)
        .env("JUNCTION_CERT", &pki.echo.1)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a benchmark process")?;
    let client = Driver::connect(socket).await?;
    client
        .authenticate(&pki.client.0, pki.client.1.clone())
        .await?;
    let echo = lookup(&client, "bench.idecho").await?;
    let rtt = junction_round_trips(&client, &echo, n).await?;

    let rounds = (n / 10).max(100);
    let mut auth = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let d = Driver::connect(socket).await?;
        let start = Instant::now();
        d.authenticate(&pki.registrar.0, pki.registrar.1.clone())
            .await?;
        auth.push(start.elapsed());
    }
    let registrar = Driver::connect(socket).await?;
    registrar
        .authenticate(&pki.registrar.0, pki.registrar.1.clone())
        .await?;
    let port = registrar.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    let mut register = Vec::with_capacity(rounds);
    let mut lookups = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        registrar.register("bench.registered", &cap).await?;
        register.push(start.elapsed());
        let start = Instant::now();
        let found = client.lookup("bench.registered").await?;
        lookups.push(start.elapsed());
        drop(found);
        registrar.unregister("bench.registered").await?;
    }
    Ok(IdentityFigures {
        rtt,
        register_p50_us: percentiles(register).p50_us,
        lookup_p50_us: percentiles(lookups).p50_us,
        authenticate_p50_us: percentiles(auth).p50_us,
        peer,
    })
}

async fn junction_round_trips(
    driver: &Driver,
    echo: &junction_driver::Capability,
    n: usize,
) -> anyhow::Result<Rtt> {
    let payload = Bytes::from(vec![7u8; SMALL]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        driver.call(echo, payload.clone(), TIMEOUT).await?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    Ok(percentiles(samples))
}

async fn junction_stream(
    driver: &Driver,
    sink: &junction_driver::Capability,
    size: usize,
    count: u64,
) -> anyhow::Result<f64> {
    let payload = Bytes::from(vec![7u8; size]);
    let start = Instant::now();
    for _ in 0..count {
        driver.send(sink, payload.clone()).await?;
    }
    let reply = driver.call(sink, Bytes::new(), TIMEOUT).await?;
    let secs = start.elapsed().as_secs_f64();
    let seen: u64 = reply.decode()?;
    if seen < count {
        bail!("the sink saw {seen} of {count} messages");
    }
    Ok(secs)
}

async fn lookup(driver: &Driver, name: &str) -> anyhow::Result<junction_driver::Capability> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match driver.lookup(name).await {
            Ok(cap) => return Ok(cap),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn spawn_peer(role: Role, socket: &Path, count: u64, plain: bool) -> anyhow::Result<Child> {
    let role = clap::ValueEnum::to_possible_value(&role)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    Command::new(crate::self_exe()?)
        .args([
            "bench-peer",
            "--role",
            &role,
            "--count",
            &count.to_string(),
            "--socket",
        ])
        .arg(socket)
        .args(plain.then_some("--plain"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a benchmark process")
}

struct JunctionProcess {
    socket: PathBuf,
    child: Child,
}

impl JunctionProcess {
    async fn start(dir: &Path, authority: &Path) -> anyhow::Result<Self> {
        let socket = dir.join("junction.sock");
        let child = Command::new(crate::self_exe()?)
            .args(["serve", "--dev-namespace", "bench.*", "--authority"])
            .arg(authority)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the junction")?;
        let deadline = Instant::now() + TIMEOUT;
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            if Instant::now() > deadline {
                bail!("the junction did not start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self { socket, child })
    }

    fn peak_rss_kib(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[allow(unsafe_code)]
fn pin_to_cpu0() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("cannot pin to CPU 0: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A benchmark child process.
pub(crate) fn peer(args: PeerArgs) -> anyhow::Result<()> {
    crate::cmd::block_on(async move { tokio::spawn(peer_role(args)).await? })
}

async fn peer_role(args: PeerArgs) -> anyhow::Result<()> {
    {
        match args.role {
            Role::Victim => hostile::victim(&args.socket).await?,
            Role::Flood => {
                let kind = args.flood.context("--role flood needs --flood")?;
                floods::run(kind, &args.socket, args.secs).await?;
            }
            Role::IdleDrivers => {
                hostile::idle_drivers(&args.socket, usize::try_from(args.count)?).await?;
            }
            Role::RawQuinn => {
                let key = args.key.context("--role raw-quinn needs --key")?;
                let cert = args.cert.context("--role raw-quinn needs --cert")?;
                highway::raw_quinn_peer(&key, &cert, &args.socket).await?;
            }
            Role::RawEcho => {
                let stream = tokio::net::UnixStream::connect(&args.socket).await?;
                let (mut reader, mut writer) = raw_link(stream, args.plain)?;
                while let Some(frame) = reader.read_frame().await? {
                    writer.send(&frame).await?;
                }
            }
            Role::RawRelay => {
                let _ = std::fs::remove_file(&args.socket);
                let listener = UnixListener::bind(&args.socket)?;
                let (a, _) = listener.accept().await?;
                let (b, _) = listener.accept().await?;
                let (ra, wa) = unix::split(a, 1 << 24)?;
                let (rb, wb) = unix::split(b, 1 << 24)?;
                let forward =
                    |mut from: junction_road::RoadReader<unix::ReadHalf>,
                     mut to: junction_road::RoadWriter<unix::WriteHalf>| async move {
                        while let Some(frame) = from.read_frame().await? {
                            to.queue(&frame).await?;
                            if !from.has_frame() {
                                to.flush().await?;
                            }
                        }
                        Ok::<_, anyhow::Error>(())
                    };
                let there = tokio::spawn(forward(ra, wb));
                let back = tokio::spawn(forward(rb, wa));
                let _ = tokio::join!(there, back);
            }
            Role::RawSink => {
                let stream = tokio::net::UnixStream::connect(&args.socket).await?;
                let (mut reader, mut writer) = raw_link(stream, args.plain)?;
                let mut seen = 0;
                while seen < args.count {
                    reader
                        .read_frame()
                        .await?
                        .context("the stream ended early")?;
                    seen += 1;
                }
                writer.send(&bench_frame(Bytes::new())).await?;
                while reader.read_frame().await?.is_some() {}
            }
            Role::Echo | Role::Sink | Role::IdEcho => {
                let driver = Driver::connect(&args.socket).await?;
                let name = match args.role {
                    Role::Echo => "bench.echo",
                    Role::IdEcho => {
                        let key = crate::pki::read_key(Path::new(&std::env::var("JUNCTION_KEY")?))?;
                        let chain =
                            crate::pki::read_chain(Path::new(&std::env::var("JUNCTION_CERT")?))?;
                        driver.authenticate(&key, chain).await?;
                        "bench.idecho"
                    }
                    _ => "bench.sink",
                };
                let mut port = driver.open_port().await?;
                let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
                driver.register(name, &cap).await?;
                let mut seen = 0u64;
                loop {
                    let msg = match port.recv().await {
                        Ok(m) => m,
                        Err(_) => return Ok(()),
                    };
                    if args.role != Role::Sink {
                        let payload = msg.payload.clone();
                        msg.reply(payload)?;
                    } else if msg.is_call() {
                        msg.reply(postcard::to_allocvec(&seen)?)?;
                        seen = 0;
                    } else {
                        seen += 1;
                    }
                }
            }
        }
        Ok(())
    }
}
