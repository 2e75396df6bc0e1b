//! `junction bench --highway`: the bus across a Highway, against raw quinn
//! with the same TLS, the same framing (the Highway wire) and the same
//! write batching, in one run, as ratios.
//!
//! - **Raw quinn**: an echo and a sink in a second process, a client in
//!   the bench's: a 64-byte
//!   round trip on one bidirectional stream, 64-byte one-way frames batched
//!   into writes of up to 64 KiB on one unidirectional stream, and 1 MiB
//!   frames.
//! - **The bus**: process → junction 1 → Highway → junction 2 → process:
//!   two `junction serve` processes on loopback, an echo and a sink driver
//!   on junction 2, the bench's driver on junction 1.
//!
//! - **Reroute**: three junctions in a triangle, a steady stream from 1 to
//!   3 over their direct Highway, which a relay cuts: the longest wait at 3
//!   between two messages, each checked once and in order.
//!
//! Round trips are measured unpinned and with every process pinned to one
//! CPU (judge them pinned); throughput is measured unpinned, the best of
//! three runs on each side, raw and bus in turn (as `junction bench` does),
//! so that a while of lost CPU on a shared machine does not decide a ratio.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use junction::relay::UdpRelay;
use junction_driver::Driver;
use junction_driver::Rights;
use junction_highway::wire::{Decoder, Encoder};
use junction_highway::{PeerPolicy, Revocations, TlsIdentity, TransportSettings};
use junction_identity::Role;
use junction_road::control::HighwayState;
use junction_road::highway::{HighwayFrame, Hops};
use tokio::process::{Child, Command};

use super::{LARGE, Rtt, SMALL, TIMEOUT, lookup, percentiles, pin_to_cpu0, spawn_peer};

/// What one side measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Figures {
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    rtt_pinned_p50_us: Option<f64>,
    rtt_pinned_p99_us: Option<f64>,
    /// The bus only: a call to the same echo from a process on its own
    /// junction (no Highway), pinned: the two local legs every call across
    /// a Highway also makes.
    #[serde(skip_serializing_if = "Option::is_none")]
    local_rtt_pinned_p50_us: Option<f64>,
    small_msgs_per_sec: f64,
    large_gb_per_sec: f64,
    /// CPU per 64-byte message, in nanoseconds, by process (the bus only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_per_small_ns: Option<CpuAcross>,
    /// CPU per 1 MiB message, in nanoseconds, by process (the bus only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_per_large_ns: Option<CpuAcross>,
    /// Raw quinn only: CPU per pinned call round trip, in nanoseconds, of
    /// the client and of the echo's process: what one QUIC endpoint costs,
    /// beside what each junction costs.
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoints_cpu_per_pinned_call_ns: Option<CpuOfEndpoints>,
    /// Raw quinn only: CPU per 64-byte message, in nanoseconds, of the
    /// sender and of the sink's process, in the best run: what the two
    /// processes of raw quinn's path spend, beside the bus's four.
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoints_cpu_per_small_ns: Option<CpuOfEndpoints>,
    /// The bus only: the longest wait between two of a steady stream of
    /// messages, in milliseconds, when the direct Highway they take is cut
    /// and another way is up (three junctions in a triangle).
    #[serde(skip_serializing_if = "Option::is_none")]
    reroute_ms: Option<f64>,
    /// CPU per pinned call round trip, in nanoseconds, by process (the bus
    /// only; the receiver is the echo): where the pinned time goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_per_pinned_call_ns: Option<CpuAcross>,
}

/// CPU time per message of each process on the bus's path, in
/// nanoseconds.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct CpuAcross {
    sender: f64,
    junction_1: f64,
    junction_2: f64,
    receiver: f64,
}

impl CpuAcross {
    /// CPU time per unit of work from the CPU times of the four processes
    /// (sender, junction 1, junction 2, receiver) before and after it.
    fn between(before: [u64; 4], after: [u64; 4], units: f64) -> Self {
        let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / units;
        Self {
            sender: per(0),
            junction_1: per(1),
            junction_2: per(2),
            receiver: per(3),
        }
    }
}

/// CPU time per call of raw quinn's two processes, in nanoseconds.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct CpuOfEndpoints {
    client: f64,
    server: f64,
}

impl CpuOfEndpoints {
    /// CPU time per unit of work from the CPU times of the two processes
    /// (client, server) before and after it.
    fn between(before: [u64; 2], after: [u64; 2], units: f64) -> Self {
        let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / units;
        Self {
            client: per(0),
            server: per(1),
        }
    }
}

/// The work of one run.
struct Work {
    round_trips: usize,
    small: u64,
    large: u64,
    /// Runs of each one-way stream, raw and bus alike; the best counts.
    tries: u32,
}

/// Runs the Highway benchmark and prints its report.
pub(crate) async fn run(dir: PathBuf, quick: bool, no_pin: bool, json: bool) -> anyhow::Result<()> {
    let work = if quick {
        Work {
            round_trips: 1_000,
            small: 50_000,
            large: 50,
            tries: 1,
        }
    } else {
        Work {
            round_trips: 10_000,
            small: 500_000,
            large: 300,
            tries: 3,
        }
    };
    let authority = junction::authority::LocalAuthority::new()?;
    let authority_path = authority.write_certificate(&dir)?;
    let mut raw = Figures::default();
    let mut bus = Figures::default();
    measure(
        &dir,
        &authority,
        &authority_path,
        &work,
        &mut raw,
        &mut bus,
        false,
    )
    .await?;
    super::progress("three junctions in a triangle: a stream, its direct Highway cut");
    bus.reroute_ms = Some(reroute(&dir, &authority, &authority_path).await?);
    if !no_pin {
        pin_to_cpu0()?;
        measure(
            &dir,
            &authority,
            &authority_path,
            &work,
            &mut raw,
            &mut bus,
            true,
        )
        .await?;
    }
    report(&raw, &bus, json);
    Ok(())
}

async fn measure(
    dir: &Path,
    authority: &junction::authority::LocalAuthority,
    authority_path: &Path,
    work: &Work,
    raw: &mut Figures,
    bus: &mut Figures,
    pinned: bool,
) -> anyhow::Result<()> {
    // Raw quinn, with the junctions' own TLS identities: the echo and the
    // sink in a process of their own, as the far junction would be.
    let (k1, c1) = authority.issue(11, Role::Junction { id: 1 })?;
    let (k2, c2) = authority.issue_files(dir, "raw2", 12, Role::Junction { id: 2 })?;
    let trust = junction::config::load_trust(authority_path)?;
    let policy = PeerPolicy::new(trust, Revocations::new(None));
    let transport = TransportSettings::default();
    let client =
        junction_highway::client_config(&TlsIdentity::new(&k1, &c1)?, &policy, &transport)?;
    let (mut server, addr) = spawn_raw_quinn(&k2, &c2, authority_path).await?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint
        .connect_with(client, addr, &junction_highway::cert::server_name(2))?
        .await
        .context("raw quinn: connect")?;
    let how = if pinned {
        "pinned to CPU 0"
    } else {
        "unpinned"
    };
    super::progress(&format!(
        "raw quinn: round trips, then one-way streams, {how}"
    ));
    let processes = [std::process::id(), server.id().unwrap_or(0)];
    let before = processes.map(super::cpu_ns);
    let rtt = raw_round_trips(&conn, work.round_trips).await?;
    let after = processes.map(super::cpu_ns);
    set_rtt(raw, &rtt, pinned);
    if pinned {
        // Warm-up calls included, as they ran.
        let calls = (work.round_trips + work.round_trips / 10) as f64;
        raw.endpoints_cpu_per_pinned_call_ns = Some(CpuOfEndpoints::between(before, after, calls));
    }

    // The bus: two junctions, a Highway between them. Raw quinn stays up
    // beside it, idle, so that the one-way streams can alternate.
    super::progress(&format!(
        "two junctions and a Highway: round trips, then one-way streams, {how}"
    ));
    let (p1, p2) = (free_udp_port()?, free_udp_port()?);
    let j1 = start_junction(dir, authority, authority_path, 1, p1, &[]).await?;
    let j2 = start_junction(dir, authority, authority_path, 2, p2, &[(1, p1)]).await?;
    let result = async {
        let echo = spawn_peer(super::Role::Echo, &j2.1, 0, false)?;
        let sink = spawn_peer(super::Role::Sink, &j2.1, 0, false)?;
        let driver = Driver::connect(&j1.1).await?;
        let echo_cap = lookup(&driver, "bench.echo").await?;
        let sink_cap = lookup(&driver, "bench.sink").await?;
        let pids = |far: &Child| {
            [
                std::process::id(),
                j1.0.id().unwrap_or(0),
                j2.0.id().unwrap_or(0),
                far.id().unwrap_or(0),
            ]
        };
        let before = pids(&echo).map(super::cpu_ns);
        let rtt = super::junction_round_trips(&driver, &echo_cap, work.round_trips).await?;
        let after = pids(&echo).map(super::cpu_ns);
        set_rtt(bus, &rtt, pinned);
        if pinned {
            // Warm-up calls included, as they ran.
            let calls = (work.round_trips + work.round_trips / 10) as f64;
            bus.cpu_per_pinned_call_ns = Some(CpuAcross::between(before, after, calls));
            let near = Driver::connect(&j2.1).await?;
            let echo_near = lookup(&near, "bench.echo").await?;
            let local = super::junction_round_trips(&near, &echo_near, work.round_trips).await?;
            bus.local_rtt_pinned_p50_us = Some(local.p50_us);
        } else {
            // Throughput is the best of `tries` runs on each side alike,
            // raw and bus in turn, as in the local bench: on a shared
            // machine a run can lose its CPU for a while, and the best run
            // is the one that measured the software, not the noise.
            super::progress(&format!(
                "one-way 64 B and 1 MiB messages, raw quinn and the bus in turn, best of {}",
                work.tries
            ));
            let streams = Streams {
                conn: &conn,
                driver: &driver,
                sink: &sink_cap,
                pids: pids(&sink),
                raw_pids: processes,
                tries: work.tries,
            };
            let (raw_secs, bus_secs, cpu, raw_cpu) = streams.best(SMALL, work.small).await?;
            raw.small_msgs_per_sec = work.small as f64 / raw_secs;
            bus.small_msgs_per_sec = work.small as f64 / bus_secs;
            bus.cpu_per_small_ns = Some(cpu);
            raw.endpoints_cpu_per_small_ns = Some(raw_cpu);
            let (raw_secs, bus_secs, cpu, _) = streams.best(LARGE, work.large).await?;
            let bytes = (LARGE as u64 * work.large) as f64;
            raw.large_gb_per_sec = bytes / 1e9 / raw_secs;
            bus.large_gb_per_sec = bytes / 1e9 / bus_secs;
            bus.cpu_per_large_ns = Some(cpu);
        }
        drop(driver);
        for mut p in [echo, sink] {
            let _ = p.kill().await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    for (mut child, _) in [j1, j2] {
        let _ = child.kill().await;
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    let _ = server.kill().await;
    result
}

/// One-way streams, raw quinn and across the bus, for the same work.
struct Streams<'a> {
    conn: &'a quinn::Connection,
    driver: &'a Driver,
    sink: &'a junction_driver::Capability,
    /// Sender, junction 1, junction 2 and receiver, for CPU accounting.
    pids: [u32; 4],
    /// Raw quinn's sender and sink, likewise.
    raw_pids: [u32; 2],
    tries: u32,
}

impl Streams<'_> {
    /// Seconds for `count` messages of `size` bytes, raw and across the
    /// bus, each the best of `tries` runs taken in turn, and the CPU each
    /// process spent per message in the best bus run and the best raw one.
    async fn best(
        &self,
        size: usize,
        count: u64,
    ) -> anyhow::Result<(f64, f64, CpuAcross, CpuOfEndpoints)> {
        let (mut best_raw, mut best_bus) = (f64::MAX, f64::MAX);
        let (mut cpu, mut raw_cpu) = (CpuAcross::default(), CpuOfEndpoints::default());
        for _ in 0..self.tries {
            let before = self.raw_pids.map(super::cpu_ns);
            let secs = raw_stream(self.conn, size, count).await?;
            let after = self.raw_pids.map(super::cpu_ns);
            if secs < best_raw {
                best_raw = secs;
                raw_cpu = CpuOfEndpoints::between(before, after, count as f64);
            }
            let before = self.pids.map(super::cpu_ns);
            let secs = super::junction_stream(self.driver, self.sink, size, count).await?;
            let after = self.pids.map(super::cpu_ns);
            if secs < best_bus {
                best_bus = secs;
                cpu = CpuAcross::between(before, after, count as f64);
            }
        }
        Ok((best_raw, best_bus, cpu, raw_cpu))
    }
}

/// Traffic again after a cut: three junctions in a triangle, junction 1
/// reaching 3 directly through a relay, and a steady stream of numbered
/// messages (one a millisecond) from 1 to a port on 3; a quarter of the way
/// in the relay cuts the direct Highway. The longest wait at 3 between two
/// messages, in milliseconds; each must arrive once and in order.
async fn reroute(
    dir: &Path,
    authority: &junction::authority::LocalAuthority,
    authority_path: &Path,
) -> anyhow::Result<f64> {
    const COUNT: u32 = 2_000;
    let (p1, p2, p3) = (free_udp_port()?, free_udp_port()?, free_udp_port()?);
    let relay = UdpRelay::new(SocketAddr::from(([127, 0, 0, 1], p1)))?;
    let j1 = start_junction(dir, authority, authority_path, 1, p1, &[]).await?;
    let j2 = start_junction(dir, authority, authority_path, 2, p2, &[(1, p1)]).await?;
    let j3 = start_junction(
        dir,
        authority,
        authority_path,
        3,
        p3,
        &[(2, p2), (1, relay.port())],
    )
    .await?;
    let result = async {
        let far = Driver::connect(&j3.1).await?;
        let mut port = far.open_port().await?;
        let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
        far.register("bench.reroute", &cap).await?;
        let near = Driver::connect(&j1.1).await?;
        // Both Highways of junction 1 up, and its way to 3 the direct one.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let listing = near.listing().await?;
            let up = listing
                .highways
                .iter()
                .filter(|h| h.state == HighwayState::Up)
                .count();
            let direct = listing
                .routes
                .iter()
                .any(|r| r.junction == 3 && r.path == [3]);
            if up == 2 && direct {
                break;
            }
            if Instant::now() > deadline {
                bail!("the triangle of junctions did not come up");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sink = lookup(&near, "bench.reroute").await?;
        let sender = async {
            for i in 0..COUNT {
                near.send(&sink, i.to_be_bytes().to_vec()).await?;
                if i == COUNT / 4 {
                    relay.cut(true);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, anyhow::Error>(())
        };
        let receiver = async {
            let (mut last, mut longest) = (None::<Instant>, Duration::ZERO);
            for i in 0..COUNT {
                let msg = tokio::time::timeout(TIMEOUT, port.recv())
                    .await
                    .context("the stream stalled after the cut")?
                    .context("the port closed")?;
                let n = msg
                    .payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes);
                if n != Some(i) {
                    bail!("message {n:?} arrived where {i} was due");
                }
                let now = Instant::now();
                if let Some(last) = last {
                    longest = longest.max(now - last);
                }
                last = Some(now);
            }
            Ok(longest)
        };
        let ((), longest) = tokio::try_join!(sender, receiver)?;
        Ok::<_, anyhow::Error>(longest.as_secs_f64() * 1e3)
    }
    .await;
    for (mut child, _) in [j1, j2, j3] {
        let _ = child.kill().await;
    }
    result
}

fn set_rtt(figures: &mut Figures, rtt: &Rtt, pinned: bool) {
    if pinned {
        figures.rtt_pinned_p50_us = Some(rtt.p50_us);
        figures.rtt_pinned_p99_us = Some(rtt.p99_us);
    } else {
        figures.rtt_p50_us = rtt.p50_us;
        figures.rtt_p99_us = rtt.p99_us;
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A `junction serve` with a Highway identity, listening on `port`, and
/// dialling `peers` (id, port); its socket.
async fn start_junction(
    dir: &Path,
    authority: &junction::authority::LocalAuthority,
    authority_path: &Path,
    id: u16,
    port: u16,
    peers: &[(u16, u16)],
) -> anyhow::Result<(Child, PathBuf)> {
    let name = format!("hw{id}");
    let (key, cert) =
        authority.issue_files(dir, &name, 100 + u64::from(id), Role::Junction { id })?;
    let socket = dir.join(format!("{name}.sock"));
    let mut command = Command::new(crate::self_exe()?);
    command
        .args(["serve", "--dev-namespace", "bench.*", "--junction-id"])
        .arg(id.to_string())
        .arg("--authority")
        .arg(authority_path)
        .arg("--junction-key")
        .arg(&key)
        .arg("--junction-cert")
        .arg(&cert)
        .arg("--quic-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (peer, port) in peers {
        command
            .arg("--peer")
            .arg(format!("{peer}@127.0.0.1:{port}"));
    }
    let child = command.spawn().context("cannot start a junction")?;
    let deadline = Instant::now() + TIMEOUT;
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        if Instant::now() > deadline {
            bail!("junction {id} did not start");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((child, socket))
}

/// A frame of the Highway wire carrying `payload`, as a junction forwards
/// one.
fn frame(payload: &[u8], buf: &mut BytesMut) {
    let header = HighwayFrame::Forward {
        from: 1,
        to: 2,
        route: Hops::new(&[2]).unwrap_or_else(|| unreachable!("one hop")),
    };
    let _ = Encoder::default().data(&header, payload, buf);
}

async fn raw_round_trips(conn: &quinn::Connection, n: usize) -> anyhow::Result<Rtt> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut out = BytesMut::new();
    frame(&[7u8; SMALL], &mut out);
    let out = out.freeze();
    let mut decoder = Decoder::default();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        send.write_all(&out).await?;
        loop {
            if decoder.next_data()?.is_some() {
                break;
            }
            let chunk = recv
                .read_chunk(64 * 1024, true)
                .await?
                .context("raw quinn: the echo ended")?;
            decoder.feed(&chunk.bytes);
        }
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    Ok(percentiles(samples))
}

/// Sends `count` frames of `size` bytes one way, batched, and waits for
/// the sink's count; seconds taken.
async fn raw_stream(conn: &quinn::Connection, size: usize, count: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut send = conn.open_uni().await?;
    let payload = vec![7u8; size];
    let mut batch = BytesMut::new();
    for _ in 0..count {
        frame(&payload, &mut batch);
        if batch.len() >= 64 * 1024 {
            send.write_all(&batch).await?;
            batch.clear();
        }
    }
    send.write_all(&batch).await?;
    send.finish()?;
    let mut answer = conn.accept_uni().await?;
    let seen = answer.read_to_end(16).await?;
    let seen = u64::from_be_bytes(seen.try_into().unwrap_or([0; 8]));
    if seen < count {
        bail!("raw quinn: the sink saw {seen} of {count} frames");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Starts the raw quinn echo and sink in a process of their own (`bench-peer
/// --role raw-quinn`); the process, and the address it listens on.
async fn spawn_raw_quinn(
    key: &Path,
    cert: &Path,
    authority: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = Command::new(crate::self_exe()?)
        .args(["bench-peer", "--role", "raw-quinn", "--socket"])
        .arg(authority)
        .arg("--key")
        .arg(key)
        .arg("--cert")
        .arg(cert)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the raw quinn process")?;
    let stdout = child.stdout.take().context("raw quinn: no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        TIMEOUT,
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("raw quinn: the server did not start")??;
    let addr = line
        .trim()
        .parse()
        .with_context(|| format!("raw quinn: the server said {line:?}, not its address"))?;
    Ok((child, addr))
}

/// The raw quinn process: an echo and a sink on a QUIC endpoint with the
/// identity in `key` and `cert`, trusting the authority certificate in
/// `authority`. Prints its address, then serves until stdin closes.
pub(crate) async fn raw_quinn_peer(
    key: &Path,
    cert: &Path,
    authority: &Path,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let key = crate::pki::read_key(key)?;
    let chain = crate::pki::read_chain(cert)?;
    let policy = PeerPolicy::new(
        junction::config::load_trust(authority)?,
        Revocations::new(None),
    );
    let config = junction_highway::server_config(
        &TlsIdentity::new(&key, &chain)?,
        &policy,
        &TransportSettings::default(),
    )?;
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
    println!("{}", endpoint.local_addr()?);
    let serve = async {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(serve_conn(conn));
        }
    };
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let until_closed = async { while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    tokio::select! {
        () = serve => {}
        () = until_closed => {}
    }
    Ok(())
}

async fn serve_conn(conn: quinn::Connection) {
    let echo_conn = conn.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = echo_conn.accept_bi().await {
            tokio::spawn(async move {
                let mut decoder = Decoder::default();
                while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                    decoder.feed(&chunk.bytes);
                    let mut out = BytesMut::new();
                    while let Ok(Some(f)) = decoder.next_data() {
                        let _ = Encoder::default().data(&f.header, &f.payload, &mut out);
                    }
                    if !out.is_empty() && send.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    while let Ok(mut recv) = conn.accept_uni().await {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut decoder = Decoder::default();
            let mut seen = 0u64;
            while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
                decoder.feed(&chunk.bytes);
                while let Ok(Some(_)) = decoder.next_data() {
                    seen += 1;
                }
            }
            if let Ok(mut send) = conn.open_uni().await {
                let _ = send.write_all(&seen.to_be_bytes()).await;
                let _ = send.finish();
            }
        });
    }
}

fn report(raw: &Figures, bus: &Figures, json: bool) {
    if json {
        let value = serde_json::json!({ "highway": { "raw_quinn": raw, "bus": bus } });
        println!("{value}");
        return;
    }
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
    println!(
        "{:<40} {:>12} {:>12} {:>8}",
        "measure (across one Highway)", "raw quinn", "bus", "ratio"
    );
    let row = |what: &str, a: f64, b: f64| {
        println!("{what:<40} {a:>12.2} {b:>12.2} {:>7.2}x", ratio(a, b));
    };
    row("call round trip p50 (µs)", raw.rtt_p50_us, bus.rtt_p50_us);
    row("call round trip p99 (µs)", raw.rtt_p99_us, bus.rtt_p99_us);
    if let (Some(a), Some(b)) = (raw.rtt_pinned_p50_us, bus.rtt_pinned_p50_us) {
        row("pinned round trip p50 (µs)", a, b);
    }
    if let (Some(a), Some(b)) = (raw.rtt_pinned_p99_us, bus.rtt_pinned_p99_us) {
        row("pinned round trip p99 (µs)", a, b);
    }
    if let (Some(a), Some(b), Some(local)) = (
        raw.rtt_pinned_p50_us,
        bus.rtt_pinned_p50_us,
        bus.local_rtt_pinned_p50_us,
    ) {
        // A call across a Highway also makes the two local legs of a call
        // on one junction; their sum with raw quinn is its floor here.
        row("pinned p50: raw quinn + local call (µs)", a + local, b);
    }
    row(
        "64 B one-way (M msg/s)",
        raw.small_msgs_per_sec / 1e6,
        bus.small_msgs_per_sec / 1e6,
    );
    row(
        "1 MiB one-way (GB/s)",
        raw.large_gb_per_sec,
        bus.large_gb_per_sec,
    );
    if let Some(ms) = bus.reroute_ms {
        println!(
            "traffic again after a cut (the longest wait between two messages, another way up): {ms:.0} ms"
        );
    }
    if let Some(cpu) = raw.endpoints_cpu_per_small_ns {
        println!(
            "CPU per 64 B message, raw quinn: sender {:.0} ns, sink {:.0} ns",
            cpu.client, cpu.server
        );
    }
    if let Some(cpu) = bus.cpu_per_small_ns {
        println!(
            "CPU per 64 B message across the Highway: sender {:.0} ns, junction 1 {:.0} ns, junction 2 {:.0} ns, receiver {:.0} ns",
            cpu.sender, cpu.junction_1, cpu.junction_2, cpu.receiver
        );
    }
    if let Some(cpu) = bus.cpu_per_large_ns {
        println!(
            "CPU per 1 MiB message across the Highway: sender {:.0} µs, junction 1 {:.0} µs, junction 2 {:.0} µs, receiver {:.0} µs",
            cpu.sender / 1e3,
            cpu.junction_1 / 1e3,
            cpu.junction_2 / 1e3,
            cpu.receiver / 1e3
        );
    }
    if let Some(cpu) = raw.endpoints_cpu_per_pinned_call_ns {
        println!(
            "CPU per pinned call, raw quinn: client {:.1} µs, echo {:.1} µs",
            cpu.client / 1e3,
            cpu.server / 1e3
        );
    }
    if let Some(cpu) = bus.cpu_per_pinned_call_ns {
        println!(
            "CPU per pinned call across the Highway: caller {:.1} µs, junction 1 {:.1} µs, junction 2 {:.1} µs, echo {:.1} µs",
            cpu.sender / 1e3,
            cpu.junction_1 / 1e3,
            cpu.junction_2 / 1e3,
            cpu.receiver / 1e3
        );
    }
}
