//! `junction bench --hostile`: the junction under the attacks of issue 7,
//! each measured against a quiet baseline taken on the same junction in
//! the same run.
//!
//! For each flood: a fresh junction process (`serve`, default limits, its
//! log in a file), a victim echo process (`bench.victim`) and the
//! measuring client in this process. The client's call round trip is
//! measured quiet, then while an attacker child process floods; the
//! junction's VmRSS is sampled every 20 ms on a thread. Then: 10,000 idle
//! `Driver`s, spread over four child processes (each raises its
//! descriptor limit), connected at once; the time until all answered and
//! the junction's memory per connection.
//!
//! Everything is bounded in time and count, and every child process is
//! killed when its handle drops (`kill_on_drop`), on errors too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use junction_driver::{Driver, Rights};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::floods::{Flood, HOLD, VICTIM};
use super::{Rtt, percentiles};

/// How long one call may take before it counts as timed out.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

struct Plan {
    quiet: Duration,
    flood: Duration,
    idle_drivers: usize,
}

/// One flood's figures.
#[derive(Debug, serde::Serialize)]
struct Row {
    flood: Flood,
    label: &'static str,
    quiet: Option<Rtt>,
    flooded: Option<Rtt>,
    p50_ratio: Option<f64>,
    p99_ratio: Option<f64>,
    quiet_mean_us: Option<f64>,
    flooded_mean_us: Option<f64>,
    mean_ratio: Option<f64>,
    quiet_calls: usize,
    flooded_calls: usize,
    /// Calls during the flood that were refused or failed.
    flooded_refused: usize,
    /// Calls during the flood that got no answer within 5 s.
    flooded_timeouts: usize,
    first_error: Option<String>,
    /// For the pending-calls flood: calls after the attacker left.
    after_calls: Option<usize>,
    after_refused: Option<usize>,
    base_rss_mib: f64,
    peak_rss_delta_mib: f64,
    /// When the attacker reported, its connections still open.
    end_rss_delta_mib: Option<f64>,
    /// 300 ms after the attacker exited.
    after_rss_delta_mib: f64,
    junction_survived: bool,
    victim_survived: bool,
    client_survived: bool,
    /// For the floods aimed at `bench.sink`: whether it is still connected.
    receiver_survived: Option<bool>,
    /// Lines the junction logged (at its default level, info) during the run.
    log_lines: usize,
    /// What the attacker reported.
    attacker: Value,
    notes: Vec<String>,
}

/// The idle-connections figures.
#[derive(Debug, serde::Serialize)]
struct Idle {
    drivers: usize,
    processes: usize,
    connected: u64,
    failed: u64,
    first_error: Option<String>,
    /// From "go" until every process reported.
    connect_secs: f64,
    rss_per_connection_kib: f64,
    peak_rss_delta_mib: f64,
    quiet: Option<Rtt>,
    held: Option<Rtt>,
    junction_survived: bool,
    junction_nofile_soft: Option<u64>,
    log_lines: usize,
}

/// Everything `--hostile` measured.
#[derive(Debug, serde::Serialize)]
pub(super) struct Report {
    floods: Vec<Row>,
    idle: Option<Idle>,
    flood_secs: f64,
    quiet_secs: f64,
    cpus: usize,
}

/// Runs every flood, then the idle connections.
pub(super) async fn run(dir: PathBuf, quick: bool, only: Vec<Flood>) -> anyhow::Result<Report> {
    let plan = if quick {
        Plan {
            quiet: Duration::from_millis(400),
            flood: Duration::from_secs(1),
            idle_drivers: 1_000,
        }
    } else {
        Plan {
            quiet: Duration::from_secs(1),
            flood: Duration::from_millis(2_500),
            idle_drivers: 10_000,
        }
    };
    let pki = HostilePki::new(&dir)?;
    let mut floods = Vec::new();
    for (i, kind) in Flood::ALL.into_iter().enumerate() {
        if !only.is_empty() && !only.contains(&kind) {
            continue;
        }
        super::progress(&format!("flood {}", kind.label()));
        let row = match run_flood(&dir, &pki, &plan, kind, i).await {
            Ok(row) => row,
            Err(e) => {
                eprintln!("flood {}: the bench itself failed: {e:#}", kind.label());
                continue;
            }
        };
        floods.push(row);
    }
    let idle = if !only.is_empty() {
        None
    } else {
        super::progress(&format!("{} idle drivers connecting", plan.idle_drivers));
        match idle_connections(&dir, &pki, &plan).await {
            Ok(idle) => Some(idle),
            Err(e) => {
                eprintln!("idle connections: the bench itself failed: {e:#}");
                None
            }
        }
    };
    Ok(Report {
        floods,
        idle,
        flood_secs: plan.flood.as_secs_f64(),
        quiet_secs: plan.quiet.as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Certificates the attackers use.
struct HostilePki {
    authority: PathBuf,
    /// A service certificate for `svc.junk`.
    junk: (PathBuf, PathBuf),
    /// A client certificate the junction trusts.
    client: (PathBuf, PathBuf),
}

impl HostilePki {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        use junction_identity::Role;
        let authority = junction::authority::LocalAuthority::new()?;
        Ok(Self {
            authority: authority.write_certificate(dir)?,
            junk: authority.issue_files(
                dir,
                "junk",
                10,
                Role::Service {
                    names: vec![super::floods::JUNK_NAME.parse()?],
                },
            )?,
            client: authority.issue_files(dir, "client", 11, Role::Client)?,
        })
    }
}

/// A junction process with its log in a file.
struct Jct {
    child: Child,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
}

impl Jct {
    async fn start(dir: &Path, name: &str, authority: &Path) -> anyhow::Result<Jct> {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(crate::self_exe()?);
        cmd.args([
            "serve",
            "--dev-namespace",
            "bench.*",
            "--dev-namespace",
            "dev.*",
        ])
        .arg("--authority")
        .arg(authority)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .context("cannot start the junction")?;
        let pid = child.id().context("the junction exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            if Instant::now() > deadline {
                bail!("the junction did not start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Jct {
            child,
            pid,
            socket,
            log,
        })
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_lines(&self) -> usize {
        std::fs::read(&self.log).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
    }

    fn nofile_soft(&self) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples a process's VmRSS every 20 ms on a thread; keeps the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            // Bounded: at most ten minutes of samples.
            for _ in 0..30_000 {
                peak = peak.max(rss_kib(pid));
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Round trips of the well-behaved client.
#[derive(Debug, Default)]
struct Calls {
    samples: Vec<Duration>,
    refused: usize,
    timeouts: usize,
    first_error: Option<String>,
}

impl Calls {
    fn rtt(&self) -> Option<Rtt> {
        (!self.samples.is_empty()).then(|| percentiles(self.samples.clone()))
    }
    fn total(&self) -> usize {
        self.samples.len() + self.refused
    }
    /// The mean round trip, µs: a p50 hides a few calls stuck for long.
    fn mean_us(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| {
            self.samples.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e6
                / self.samples.len() as f64
        })
    }
}

/// Calls `cap` until `deadline`, or `stop` is set, or `max` calls.
async fn calls(
    driver: &Driver,
    cap: &junction_driver::Capability,
    deadline: Instant,
    stop: Option<&AtomicBool>,
    max: usize,
) -> Calls {
    let payload = Bytes::from(vec![7u8; 64]);
    let mut c = Calls::default();
    while Instant::now() < deadline
        && !stop.is_some_and(|s| s.load(Ordering::Relaxed))
        && c.total() < max
    {
        let start = Instant::now();
        match tokio::time::timeout(
            CALL_TIMEOUT,
            driver.call(cap, payload.clone(), CALL_TIMEOUT),
        )
        .await
        {
            Ok(Ok(_)) => c.samples.push(start.elapsed()),
            Ok(Err(e)) => {
                let timed_out = start.elapsed() >= CALL_TIMEOUT;
                if timed_out {
                    c.timeouts += 1;
                    c.samples.push(start.elapsed());
                } else {
                    c.refused += 1;
                }
                c.first_error.get_or_insert_with(|| e.to_string());
                if driver.is_closed() {
                    break;
                }
                if !timed_out {
                    // Do not spin on instant refusals.
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
            Err(_) => {
                c.timeouts += 1;
                c.samples.push(start.elapsed());
                c.first_error
                    .get_or_insert_with(|| "no answer in 5 s".into());
            }
        }
    }
    c
}

fn peer(role: &str, socket: &Path, dir: &Path, name: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new(crate::self_exe()?);
    cmd.args(["bench-peer", "--role", role, "--socket"])
        .arg(socket)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    Ok(cmd)
}

/// Children are killed when their handle drops; this covers the bench
/// itself being killed: the kernel sends the child SIGKILL when the bench
/// (the thread that started it, the runtime's only one) dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn first_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.chars().take(160).collect())
}

enum Event {
    Started,
    /// The attacker's report, and the junction's RSS (KiB) when it came.
    Done(Value, u64),
}

async fn run_flood(
    dir: &Path,
    pki: &HostilePki,
    plan: &Plan,
    kind: Flood,
    i: usize,
) -> anyhow::Result<Row> {
    let name = format!("flood{i}");
    let mut jct = Jct::start(dir, &name, &pki.authority).await?;
    let mut victim = peer("victim", &jct.socket, dir, &format!("{name}-victim"))?.spawn()?;
    let mut sink = if kind.needs_sink() {
        Some(peer("sink", &jct.socket, dir, &format!("{name}-sink"))?.spawn()?)
    } else {
        None
    };
    let driver = Driver::connect(&jct.socket).await?;
    let cap = super::lookup(&driver, VICTIM).await?;
    if sink.is_some() {
        super::lookup(&driver, "bench.sink").await?;
    }
    // Warm up, then the quiet baseline on this very junction.
    calls(&driver, &cap, Instant::now() + plan.quiet, None, 200).await;
    let quiet = calls(&driver, &cap, Instant::now() + plan.quiet, None, 1_000_000).await;

    let base = jct.rss_kib();
    let sampler = Sampler::start(jct.pid);
    let mut cmd = Command::new(crate::self_exe()?);
    let flood_name = clap::ValueEnum::to_possible_value(&kind)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    cmd.args(["bench-peer", "--role", "flood", "--flood", &flood_name])
        .arg("--secs")
        .arg(plan.flood.as_secs_f64().to_string())
        .arg("--socket")
        .arg(&jct.socket)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(
            dir.join(format!("{name}-attacker.err")),
        )?)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    match kind {
        Flood::JunkChain => {
            cmd.env("JUNCTION_KEY", &pki.junk.0)
                .env("JUNCTION_CERT", &pki.junk.1);
        }
        Flood::BadAuth => {
            cmd.env("JUNCTION_KEY", &pki.client.0)
                .env("JUNCTION_CERT", &pki.client.1);
        }
        _ => {}
    }
    let mut attacker = cmd.spawn().context("cannot start the attacker")?;
    let stdout = attacker.stdout.take().context("stdout is piped")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let done = Arc::new(AtomicBool::new(false));
    let done_flag = done.clone();
    let pid = jct.pid;
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "started" {
                let _ = tx.send(Event::Started);
            } else if let Some(json) = line.strip_prefix("done ") {
                let rss = rss_kib(pid);
                done_flag.store(true, Ordering::Relaxed);
                let value = serde_json::from_str(json).unwrap_or(Value::Null);
                let _ = tx.send(Event::Done(value, rss));
            }
        }
        done_flag.store(true, Ordering::Relaxed);
    });
    let mut notes = Vec::new();
    let started = matches!(
        tokio::time::timeout(Duration::from_secs(30), rx.recv()).await,
        Ok(Some(Event::Started))
    );
    let flooded = if started {
        let deadline = Instant::now() + plan.flood + Duration::from_secs(5);
        calls(&driver, &cap, deadline, Some(&done), usize::MAX).await
    } else {
        notes.push("attacker did not start".into());
        Calls::default()
    };
    let (mut attacker_report, mut end) = (Value::Null, None);
    if let Ok(Some(Event::Done(v, rss))) =
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
    {
        attacker_report = v;
        end = Some(rss);
    }
    // The attacker stops by itself; this is for one that did not.
    if tokio::time::timeout(Duration::from_secs(2), attacker.wait())
        .await
        .is_err()
    {
        notes.push("attacker killed".into());
        let _ = attacker.kill().await;
    }
    reader.abort();
    let peak = sampler.finish();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = jct.rss_kib();

    let (mut after_calls, mut after_refused) = (None, None);
    if kind == Flood::PendingCalls {
        let c = calls(&driver, &cap, Instant::now() + plan.quiet, None, 1_000_000).await;
        after_calls = Some(c.total());
        after_refused = Some(c.refused + c.timeouts);
        notes.push(format!(
            "refused {:.0}% during, {:.0}% after attacker left",
            pct(flooded.refused + flooded.timeouts, flooded.total()),
            pct(c.refused + c.timeouts, c.total())
        ));
    } else if flooded.refused + flooded.timeouts > 0 {
        notes.push(format!(
            "{} refused, {} timed out",
            flooded.refused, flooded.timeouts
        ));
    }
    let junction_survived = jct.alive();
    let victim_survived = matches!(victim.try_wait(), Ok(None));
    let receiver_survived = match sink.as_mut() {
        Some(s) => {
            let alive = matches!(s.try_wait(), Ok(None));
            let listed = tokio::time::timeout(Duration::from_secs(5), driver.lookup("bench.sink"))
                .await
                .is_ok_and(|r| r.is_ok());
            Some(alive && listed)
        }
        None => None,
    };
    match receiver_survived {
        Some(false) => notes.push("receiver cut off".into()),
        Some(true) => notes.push("receiver survived".into()),
        None => {}
    }
    if !junction_survived {
        notes.push("JUNCTION DIED".into());
    }
    if !victim_survived {
        notes.push("victim cut off".into());
    }
    let client_survived = !driver.is_closed();
    if !client_survived {
        notes.push("client cut off".into());
    }
    attacker_notes(kind, &attacker_report, &mut notes);
    if attacker_report.is_null()
        && let Some(err) = first_line(&dir.join(format!("{name}-attacker.err")))
    {
        notes.push(format!("attacker: {err}"));
    }
    let log_lines = jct.log_lines();
    if log_lines > 200 {
        notes.push(format!("{log_lines} log lines"));
    }
    drop(driver);
    let _ = victim.kill().await;
    if let Some(mut s) = sink {
        let _ = s.kill().await;
    }
    jct.stop().await;

    let (q, f) = (quiet.rtt(), flooded.rtt());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    Ok(Row {
        flood: kind,
        label: kind.label(),
        quiet: q,
        flooded: f,
        p50_ratio: ratio(f.map(|r| r.p50_us), q.map(|r| r.p50_us)),
        p99_ratio: ratio(f.map(|r| r.p99_us), q.map(|r| r.p99_us)),
        quiet_mean_us: quiet.mean_us(),
        flooded_mean_us: flooded.mean_us(),
        mean_ratio: ratio(flooded.mean_us(), quiet.mean_us()),
        quiet_calls: quiet.total(),
        flooded_calls: flooded.total(),
        flooded_refused: flooded.refused,
        flooded_timeouts: flooded.timeouts,
        first_error: flooded.first_error,
        after_calls,
        after_refused,
        base_rss_mib: base as f64 / 1024.0,
        peak_rss_delta_mib: peak.saturating_sub(base) as f64 / 1024.0,
        end_rss_delta_mib: end.map(|e| (e as f64 - base as f64) / 1024.0),
        after_rss_delta_mib: (after as f64 - base as f64) / 1024.0,
        junction_survived,
        victim_survived,
        client_survived,
        receiver_survived,
        log_lines,
        attacker: attacker_report,
        notes,
    })
}

fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The attacker's own figures worth a note in the table.
fn attacker_notes(kind: Flood, a: &Value, notes: &mut Vec<String>) {
    let n = |k: &str| a.get(k).and_then(Value::as_u64).unwrap_or(0);
    let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match kind {
        Flood::Hoard => notes.push(format!(
            "{} msgs on {} handles",
            n("messages_sent"),
            n("handles")
        )),
        Flood::FanIn | Flood::BigLookups => {
            notes.push(format!("{} MiB sent", n("bytes_sent") >> 20));
        }
        Flood::StuckHalfClose | Flood::StuckZeroLength => {
            notes.push(format!("{} List calls unread", n("list_calls_written")));
        }
        Flood::WatchLoop | Flood::RevocableLoop => notes.push(format!("{} cycles", n("cycles"))),
        Flood::DevNames => {
            notes.push(format!("{} names", n("registered")));
            notes.push(format!("ls {}", s("ls")));
        }
        Flood::JunkChain => {
            notes.push(format!(
                "auth {}, {} KiB per lookup",
                s("authenticate"),
                n("bytes_per_lookup") >> 10
            ));
        }
        Flood::BadAuth => notes.push(format!(
            "{} attempts, {} reconnects",
            n("attempts"),
            n("reconnects")
        )),
        Flood::Pings => notes.push(format!("{} pings", n("pings_written"))),
        Flood::Spin | Flood::PendingCalls => {}
    }
}

/// 10,000 idle drivers, in four processes.
async fn idle_connections(dir: &Path, pki: &HostilePki, plan: &Plan) -> anyhow::Result<Idle> {
    const PROCESSES: usize = 4;
    let mut jct = Jct::start(dir, "idle", &pki.authority).await?;
    let mut victim = peer("victim", &jct.socket, dir, "idle-victim")?.spawn()?;
    let driver = Driver::connect(&jct.socket).await?;
    let cap = super::lookup(&driver, VICTIM).await?;
    calls(&driver, &cap, Instant::now() + plan.quiet, None, 200).await;
    let quiet = calls(&driver, &cap, Instant::now() + plan.quiet, None, 1_000_000).await;
    let base = jct.rss_kib();
    let sampler = Sampler::start(jct.pid);
    let per = plan.idle_drivers / PROCESSES;
    let mut holders = Vec::new();
    for p in 0..PROCESSES {
        let mut cmd = peer("idle-drivers", &jct.socket, dir, &format!("idle-{p}"))?;
        cmd.arg("--count")
            .arg(per.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("cannot start a driver holder")?;
        let stdin = child.stdin.take().context("stdin is piped")?;
        let lines = BufReader::new(child.stdout.take().context("stdout is piped")?).lines();
        holders.push((child, stdin, lines));
    }
    for (_, _, lines) in &mut holders {
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref l))) if l == "ready") {
            bail!("a driver holder did not start");
        }
    }
    let start = Instant::now();
    for (_, stdin, _) in &mut holders {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let (mut connected, mut failed, mut first_error) = (0, 0, None);
    for (_, _, lines) in &mut holders {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let Ok(Ok(Some(line))) = line else {
            failed += per as u64;
            first_error.get_or_insert_with(|| "a holder gave no report".to_string());
            continue;
        };
        let v: Value = line
            .strip_prefix("connected ")
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or(Value::Null);
        connected += v.get("ok").and_then(Value::as_u64).unwrap_or(0);
        failed += v.get("failed").and_then(Value::as_u64).unwrap_or(0);
        if let Some(e) = v.get("first_error").and_then(Value::as_str) {
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_rss = jct.rss_kib();
    let held = calls(&driver, &cap, Instant::now() + plan.quiet, None, 1_000_000).await;
    let peak = sampler.finish();
    let junction_survived = jct.alive();
    let nofile = jct.nofile_soft();
    let log_lines = jct.log_lines();
    // Closing their stdin ends the holders; kill_on_drop covers the rest.
    for (mut child, stdin, _) in holders {
        drop(stdin);
        if tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    drop(driver);
    let _ = victim.kill().await;
    jct.stop().await;
    Ok(Idle {
        drivers: per * PROCESSES,
        processes: PROCESSES,
        connected,
        failed,
        first_error,
        connect_secs,
        rss_per_connection_kib: if connected > 0 {
            held_rss.saturating_sub(base) as f64 / connected as f64
        } else {
            0.0
        },
        peak_rss_delta_mib: peak.saturating_sub(base) as f64 / 1024.0,
        quiet: quiet.rtt(),
        held: held.rtt(),
        junction_survived,
        junction_nofile_soft: nofile,
        log_lines,
    })
}

/// The victim: an echo registered as `bench.victim` that never answers
/// calls whose payload starts with "hold" (it keeps them, up to a bound).
pub(super) async fn victim(socket: &Path) -> anyhow::Result<()> {
    let driver = Driver::connect(socket).await?;
    let mut port = driver.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    driver.register(VICTIM, &cap).await?;
    let mut held = Vec::new();
    loop {
        let Ok(msg) = port.recv().await else {
            return Ok(());
        };
        if msg.payload.starts_with(HOLD) {
            if held.len() < 100_000 {
                held.push(msg);
            }
        } else if msg.is_call() {
            let payload = msg.payload.clone();
            let _ = msg.reply(payload);
        }
    }
}

/// A holder of idle drivers: raises its descriptor limit, says `ready`,
/// connects `count` drivers when told `go`, reports, and holds them until
/// its stdin closes.
pub(super) async fn idle_drivers(socket: &Path, count: usize) -> anyhow::Result<()> {
    raise_nofile();
    println!("ready");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    if !matches!(stdin.next_line().await, Ok(Some(ref l)) if l == "go") {
        return Ok(());
    }
    let start = Instant::now();
    let give_up = start + Duration::from_secs(20);
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permits = permits.clone();
        let socket = socket.to_owned();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("gave up after 20 s".to_string());
            }
            match tokio::time::timeout(left.min(Duration::from_secs(5)), Driver::connect(&socket))
                .await
            {
                Ok(Ok(d)) => Ok(d),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect + handshake took over 5 s".to_string()),
            }
        }));
    }
    let mut drivers = Vec::with_capacity(count);
    let (mut failed, mut first_error) = (0u64, None);
    for t in tasks {
        match t.await {
            Ok(Ok(d)) => drivers.push(d),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let report = serde_json::json!({
        "ok": drivers.len(),
        "failed": failed,
        "first_error": first_error,
        "secs": start.elapsed().as_secs_f64(),
    });
    println!("connected {report}");
    // Hold them until told to stop (stdin closes), ten minutes at most.
    let _ = tokio::time::timeout(Duration::from_secs(600), async {
        while let Ok(Some(_)) = stdin.next_line().await {}
    })
    .await;
    drop(drivers);
    Ok(())
}

/// Raises this process's descriptor soft limit to its hard limit.
#[allow(unsafe_code)]
fn raise_nofile() {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Prints the table (or the JSON object with its `hostile` key).
pub(super) fn report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "hostile": r }));
        return;
    }
    let us = |v: Option<Rtt>, p99: bool| match v {
        Some(r) if p99 => format!("{:.0}", r.p99_us),
        Some(r) => format!("{:.0}", r.p50_us),
        None => "-".into(),
    };
    let x = |v: Option<f64>| match v {
        None => "-".to_string(),
        Some(v) if v < 10.0 => format!("{v:.2}x"),
        Some(v) if v < 100.0 => format!("{v:.1}x"),
        Some(v) => format!("{v:.0}x"),
    };
    println!(
        "junction bench --hostile: a well-behaved client's call round trip (64 B, µs) to an echo \
         process, quiet ({:.1} s) then under each flood ({:.1} s), on a fresh junction per flood; {} CPUs",
        r.quiet_secs, r.flood_secs, r.cpus
    );
    println!(
        "junction RSS: peak over the flood (sampled every 20 ms), at its end (attacker still \
         connected), and 300 ms after the attacker exited; all minus the RSS before it started"
    );
    // No heading without rows: every flood may have failed (said on stderr).
    if !r.floods.is_empty() {
        println!(
            "{:<34} {:>7} {:>8} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>8} {:>7} {:>7}  notes",
            "flood",
            "quiet",
            "flooded",
            "p50",
            "quiet",
            "flooded",
            "p99",
            "mean",
            "calls",
            "peak RSS",
            "RSS Δ",
            "RSS Δ"
        );
        println!(
            "{:<34} {:>7} {:>8} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>8} {:>7} {:>7}",
            "",
            "p50",
            "p50",
            "ratio",
            "p99",
            "p99",
            "ratio",
            "ratio",
            "flood",
            "Δ MiB",
            "at end",
            "after"
        );
    }
    for row in &r.floods {
        println!(
            "{:<34} {:>7} {:>8} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>8.1} {:>7} {:>7.1}  {}",
            row.label,
            us(row.quiet, false),
            us(row.flooded, false),
            x(row.p50_ratio),
            us(row.quiet, true),
            us(row.flooded, true),
            x(row.p99_ratio),
            x(row.mean_ratio),
            row.flooded_calls,
            row.peak_rss_delta_mib,
            row.end_rss_delta_mib
                .map_or("-".into(), |v| format!("{v:.1}")),
            row.after_rss_delta_mib,
            row.notes.join("; ")
        );
    }
    if let Some(idle) = &r.idle {
        let rtt = |v: Option<Rtt>| v.map_or("-".into(), |r| format!("{:.0}", r.p50_us));
        println!(
            "{} idle drivers ({} processes): {} connected, {} failed in {:.2} s (goal: all, under 2 s); \
             junction RSS {:.1} KiB per connection (goal: at most 8), peak Δ {:.0} MiB; \
             client p50 {} µs quiet, {} µs with them held; junction descriptor soft limit {}{}",
            idle.drivers,
            idle.processes,
            idle.connected,
            idle.failed,
            idle.connect_secs,
            idle.rss_per_connection_kib,
            idle.peak_rss_delta_mib,
            rtt(idle.quiet),
            rtt(idle.held),
            idle.junction_nofile_soft
                .map_or("?".into(), |n| n.to_string()),
            if idle.junction_survived {
                String::new()
            } else {
                "; JUNCTION DIED".into()
            }
        );
        if let Some(e) = &idle.first_error {
            println!("  first failure: {e}");
        }
    }
    println!(
        "goals (issue 7): p50 ratios under 1.5x, memory flat; the bench reports, it does not judge"
    );
}
