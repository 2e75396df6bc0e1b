//! The attackers of `junction bench --hostile`, each run in a child process
//! (`junction bench-peer --role flood --flood KIND`). Each one sets up,
//! prints `started`, attacks for `secs` seconds (and never more than its
//! count bound), prints `done {json}` with what it did, and exits.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use junction_driver::Driver;
use junction_road::control::{ControlReply, ControlRequest};
use junction_road::{Attenuate, Call, Header, Rights, Send};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::raw::{Raw, control_call, push};

/// Which attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub(crate) enum Flood {
    /// Control: a process that only burns CPU, no junction traffic. Shows
    /// what sharing the machine alone does to round trips.
    Spin,
    /// 1. Mints and lookups of a name it owns, a window sent on each new
    ///    handle, the handle dropped; reads its socket, never sends Credit.
    Hoard,
    /// 2. 100 drivers sending 16 KiB messages to one reading receiver.
    FanIn,
    /// 3. One driver, 80 lookups of one receiver, ~4 MiB messages on each.
    BigLookups,
    /// 4a. 20 raw connections fill their outbox with List calls, never
    ///     read, then half-close.
    StuckHalfClose,
    /// 4b. The same, then a zero-length frame instead of the half-close.
    StuckZeroLength,
    /// 5a. Mint, watch, drop, in a loop.
    WatchLoop,
    /// 5b. Revocable attenuate, drop, in a loop (dead lineages).
    RevocableLoop,
    /// 5c. Register names in the development namespace, as many as it can.
    DevNames,
    /// 5d. A service authenticated with junk certificates after its
    ///     chain's trusted link; a client looks its name up in a loop.
    JunkChain,
    /// 6. Five connections call the victim with "hold" (it never answers
    ///    those) up to their pending-call limit, then leave.
    PendingCalls,
    /// 7. Authenticate with a valid chain and a wrong proof, in a loop.
    BadAuth,
    /// 8. Ping as fast as one connection can write.
    Pings,
}

impl Flood {
    /// Every flood, in the order the report shows them.
    pub(super) const ALL: [Flood; 13] = [
        Flood::Spin,
        Flood::Hoard,
        Flood::FanIn,
        Flood::BigLookups,
        Flood::StuckHalfClose,
        Flood::StuckZeroLength,
        Flood::WatchLoop,
        Flood::RevocableLoop,
        Flood::DevNames,
        Flood::JunkChain,
        Flood::PendingCalls,
        Flood::BadAuth,
        Flood::Pings,
    ];

    /// Its row label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Flood::Spin => "0 control: CPU burner, no traffic",
            Flood::Hoard => "1 credit hoarding",
            Flood::FanIn => "2 fan-in 100x16 KiB",
            Flood::BigLookups => "3 80 lookups x 4 MiB",
            Flood::StuckHalfClose => "4a stuck writers, half-close",
            Flood::StuckZeroLength => "4b stuck writers, zero frame",
            Flood::WatchLoop => "5a mint/watch/drop loop",
            Flood::RevocableLoop => "5b revocable attenuate/drop",
            Flood::DevNames => "5c dev-namespace names",
            Flood::JunkChain => "5d junk-chain lookups",
            Flood::PendingCalls => "6 pending calls held",
            Flood::BadAuth => "7 failing Authenticate",
            Flood::Pings => "8 Ping flood",
        }
    }

    /// Whether the flood needs the reading sink (`bench.sink`).
    pub(super) fn needs_sink(self) -> bool {
        matches!(self, Flood::FanIn | Flood::BigLookups)
    }
}

/// The name the victim echo registers.
pub(super) const VICTIM: &str = "bench.victim";
/// The name the junk-chain service registers (certificate-guarded).
pub(super) const JUNK_NAME: &str = "svc.junk";
/// Payloads starting with this are held by the victim, never answered.
pub(super) const HOLD: &[u8] = b"hold";

/// Runs one attacker (the child process's body).
pub(super) async fn run(kind: Flood, socket: &Path, secs: f64) -> anyhow::Result<()> {
    let secs = Duration::from_secs_f64(secs);
    let mut held = Vec::new();
    let summary = match kind {
        Flood::Spin => spin(secs),
        Flood::Hoard => hoard(socket, secs).await?,
        Flood::FanIn => fan_in(socket, secs).await?,
        Flood::BigLookups => big_lookups(socket, secs).await?,
        Flood::StuckHalfClose => stuck(socket, secs, false, &mut held).await?,
        Flood::StuckZeroLength => stuck(socket, secs, true, &mut held).await?,
        Flood::WatchLoop => watch_loop(socket, secs).await?,
        Flood::RevocableLoop => revocable_loop(socket, secs).await?,
        Flood::DevNames => dev_names(socket, secs).await?,
        Flood::JunkChain => junk_chain(socket, secs).await?,
        Flood::PendingCalls => pending_calls(socket, secs).await?,
        Flood::BadAuth => bad_auth(socket, secs).await?,
        Flood::Pings => ping_flood(socket, secs).await?,
    };
    println!("done {summary}");
    std::io::stdout().flush()?;
    if !held.is_empty() {
        // Stuck connections stay a moment after the report, so that the
        // junction's memory is read while they are still there.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
    }
    Ok(())
}

/// Tells the parent the attack begins; returns when it must end.
fn started(secs: Duration) -> Instant {
    println!("started");
    let _ = std::io::stdout().flush();
    Instant::now() + secs
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn spin(secs: Duration) -> Value {
    let deadline = started(secs);
    let mut n = 0u64;
    while Instant::now() < deadline {
        for _ in 0..10_000 {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    json!({ "spun": true })
}

/// Credit hoarding (1).
async fn hoard(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    const MAX_HANDLES: u64 = 200_000;
    let mut c = Raw::connect(socket, "hoarder").await?;
    let port = c.open_port().await?;
    let reg = c.mint(port, Rights::SEND | Rights::GRANT).await?;
    let (reply, _) = c
        .control(
            &ControlRequest::Register {
                name: "dev.hoard".parse()?,
            },
            vec![reg],
        )
        .await?;
    anyhow::ensure!(
        matches!(reply, ControlReply::Registered),
        "cannot register dev.hoard: {reply:?}"
    );
    let home = c.welcome.home.port;
    let Raw {
        mut reader,
        mut write,
        ..
    } = c;
    // The reader reads everything (deliveries to itself included), never
    // sends Credit, and hands the writer the handles it is given.
    // (handle, credits, whether it came in a reply to the home port)
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u32, u32, bool)>();
    let read_task = tokio::spawn(async move {
        let mut delivered = 0u64;
        while let Ok(Some(frame)) = reader.recv().await {
            match frame.header {
                Header::Minted {
                    handle, credits, ..
                } => {
                    let _ = tx.send((handle, credits, false));
                }
                Header::Deliver(d) if d.tag != 0 => {
                    if let Some(g) = d.caps.first() {
                        let _ = tx.send((g.handle, g.credits, true));
                    } else {
                        // A refused lookup: keep the writer going.
                        let _ = tx.send((u32::MAX, 0, true));
                    }
                }
                Header::Deliver(_) => delivered += 1,
                Header::Error(_) => {
                    let _ = tx.send((u32::MAX, 0, false));
                }
                _ => {}
            }
        }
        (delivered, reader.bytes)
    });
    let deadline = started(secs);
    let payload = Bytes::from(vec![5u8; 64]);
    let (mut handles, mut sent, mut refused) = (0u64, 0u64, 0u64);
    let mut out = BytesMut::new();
    let mut tag = 1_000u64;
    let name: junction_identity::ServiceName = "dev.hoard".parse()?;
    // Eight requests for fresh handles in flight at all times: a Mint or a
    // Lookup, by turns.
    let mut asked = 0u64;
    let mut ask = |out: &mut BytesMut| {
        if asked.is_multiple_of(2) {
            push(
                out,
                &Header::Mint {
                    req: 7,
                    port,
                    rights: Rights::SEND,
                },
                &Bytes::new(),
            );
        } else {
            tag += 1;
            control_call(
                out,
                tag,
                &ControlRequest::Lookup { name: name.clone() },
                vec![],
            );
        }
        asked += 1;
    };
    out.clear();
    for _ in 0..8 {
        ask(&mut out);
    }
    let mut ok = tokio::time::timeout(left(deadline), write.write_all(&out))
        .await
        .is_ok_and(|r| r.is_ok());
    while ok && Instant::now() < deadline && handles < MAX_HANDLES {
        let Ok(Some((handle, credits, reply))) =
            tokio::time::timeout(left(deadline), rx.recv()).await
        else {
            break;
        };
        out.clear();
        if reply {
            // The lookup's reply is acknowledged (its call no longer
            // pending); the deliveries to its own port never are.
            push(
                &mut out,
                &Header::Credit {
                    port: home,
                    count: 1,
                },
                &Bytes::new(),
            );
        }
        if handle == u32::MAX {
            refused += 1;
        } else {
            handles += 1;
            let send = Header::Send(Send {
                handle,
                caps: Vec::new(),
            });
            for _ in 0..credits {
                push(&mut out, &send, &payload);
            }
            push(&mut out, &Header::Drop { handle }, &Bytes::new());
            sent += u64::from(credits);
        }
        ask(&mut out);
        ok = tokio::time::timeout(left(deadline), write.write_all(&out))
            .await
            .is_ok_and(|r| r.is_ok());
    }
    drop(write);
    read_task.abort();
    Ok(json!({ "handles": handles, "messages_sent": sent, "refused": refused }))
}

/// Many drivers (or one driver with many handles) sending to `bench.sink`
/// until the deadline, each task on its own capability.
async fn send_to_sink(
    drivers: Vec<Driver>,
    caps: Vec<(usize, junction_driver::Capability)>,
    size: usize,
    secs: Duration,
) -> Value {
    let deadline = started(secs);
    let payload = Bytes::from(vec![3u8; size]);
    let mut tasks = Vec::new();
    for (i, cap) in caps {
        let driver = drivers[i].clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut err) = (0u64, None);
            while Instant::now() < deadline {
                match tokio::time::timeout(left(deadline), driver.send(&cap, payload.clone())).await
                {
                    Ok(Ok(_)) => sent += 1,
                    Ok(Err(e)) => {
                        err = Some(e.to_string());
                        break;
                    }
                    Err(_) => break,
                }
            }
            (sent, err)
        }));
    }
    let (mut sent, mut errors, mut first_error) = (0u64, 0u64, None);
    for t in tasks {
        if let Ok((n, e)) = t.await {
            sent += n;
            if let Some(e) = e {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    json!({ "messages_sent": sent, "bytes_sent": sent * size as u64, "senders_failed": errors, "first_error": first_error })
}

/// Fan-in (2).
async fn fan_in(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    let mut drivers = Vec::new();
    let mut caps = Vec::new();
    for i in 0..100 {
        let d = Driver::connect(socket).await?;
        caps.push((i, super::lookup(&d, "bench.sink").await?));
        drivers.push(d);
    }
    Ok(send_to_sink(drivers, caps, 16 * 1024, secs).await)
}

/// One client, 80 lookups, ~4 MiB messages (3).
async fn big_lookups(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    let d = Driver::connect(socket).await?;
    let size = d.max_frame() as usize - 4096;
    let mut caps = Vec::new();
    for _ in 0..80 {
        caps.push((0, super::lookup(&d, "bench.sink").await?));
    }
    Ok(send_to_sink(vec![d], caps, size, secs).await)
}

/// Stuck writers (4): fill the outbox with List answers, never read, then
/// half-close or send a zero-length frame, and hold the socket.
async fn stuck(
    socket: &Path,
    secs: Duration,
    zero: bool,
    held: &mut Vec<Raw>,
) -> anyhow::Result<Value> {
    const CONNS: usize = 20;
    const MAX_CALLS: u64 = 50_000;
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(Raw::connect(socket, "stuck").await?);
    }
    let deadline = started(secs);
    // Fill for at most 60% of the time, then hold until the deadline.
    let fill_until = Instant::now() + secs.mul_f64(0.6);
    let mut tasks = Vec::new();
    for mut c in conns {
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            let mut out = BytesMut::new();
            while Instant::now() < fill_until && calls < MAX_CALLS {
                out.clear();
                for _ in 0..256 {
                    let tag = c.tag();
                    control_call(&mut out, tag, &ControlRequest::List, vec![]);
                }
                // The junction stops reading a connection whose answers
                // are not read: a write that waits means the outbox is full.
                match tokio::time::timeout(Duration::from_millis(300), c.write.write_all(&out))
                    .await
                {
                    Ok(Ok(())) => calls += 256,
                    _ => break,
                }
            }
            let how = if zero {
                tokio::time::timeout(Duration::from_millis(300), c.write.write_all(&[0u8; 4]))
                    .await
                    .is_ok_and(|r| r.is_ok())
            } else {
                tokio::time::timeout(Duration::from_millis(300), c.write.shutdown())
                    .await
                    .is_ok_and(|r| r.is_ok())
            };
            tokio::time::sleep(left(deadline)).await;
            (calls, how, c)
        }));
    }
    let (mut calls, mut ended) = (0u64, 0u64);
    for t in tasks {
        if let Ok((n, ok, c)) = t.await {
            calls += n;
            ended += u64::from(ok);
            held.push(c);
        }
    }
    Ok(json!({ "list_calls_written": calls, "ended_ok": ended, "zero_length": zero }))
}

/// Writes `out` and reads until `want` frames `pick` accepts came, or the
/// deadline; returns what `pick` made of them. Replies to the home port are
/// acknowledged.
async fn batch<T>(
    c: &mut Raw,
    out: &BytesMut,
    want: usize,
    deadline: Instant,
    mut pick: impl FnMut(&junction_road::Frame) -> Option<T>,
) -> Option<Vec<T>> {
    let home = c.welcome.home.port;
    let mut replies = 0u32;
    let got = tokio::time::timeout(left(deadline), async {
        c.write.write_all(out).await.ok()?;
        let mut got = Vec::with_capacity(want);
        while got.len() < want {
            let frame = c.reader.recv().await.ok()??;
            if matches!(&frame.header, Header::Deliver(d) if d.port == home) {
                replies += 1;
            }
            if let Some(v) = pick(&frame) {
                got.push(v);
            }
        }
        Some(got)
    })
    .await;
    // The replies are consumed, as a driver would say (an unacknowledged
    // reply keeps its call counted as pending).
    if replies > 0 {
        let _ = tokio::time::timeout(left(deadline), c.credit_home(replies)).await;
    }
    got.ok().flatten()
}

/// 5a. Mint, watch, drop.
async fn watch_loop(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    const MAX: u64 = 2_000_000;
    let mut c = Raw::connect(socket, "watcher").await?;
    let port = c.open_port().await?;
    let deadline = started(secs);
    let (mut cycles, mut out) = (0u64, BytesMut::new());
    while Instant::now() < deadline && cycles < MAX {
        out.clear();
        for _ in 0..64 {
            push(
                &mut out,
                &Header::Mint {
                    req: 9,
                    port,
                    rights: Rights::SEND,
                },
                &Bytes::new(),
            );
        }
        let Some(handles) = batch(&mut c, &out, 64, deadline, |f| match f.header {
            Header::Minted { handle, .. } => Some(Some(handle)),
            Header::Error(_) => Some(None),
            _ => None,
        })
        .await
        else {
            break;
        };
        out.clear();
        for h in handles.into_iter().flatten() {
            push(&mut out, &Header::Watch { handle: h }, &Bytes::new());
            push(&mut out, &Header::Drop { handle: h }, &Bytes::new());
            cycles += 1;
        }
        if tokio::time::timeout(left(deadline), c.write.write_all(&out))
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(json!({ "cycles": cycles }))
}

/// 5b. Revocable attenuate, drop.
async fn revocable_loop(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    const MAX: u64 = 2_000_000;
    let mut c = Raw::connect(socket, "lineages").await?;
    let port = c.open_port().await?;
    let root = c.mint(port, Rights::SEND).await?;
    let deadline = started(secs);
    let (mut cycles, mut refused, mut out) = (0u64, 0u64, BytesMut::new());
    while Instant::now() < deadline && cycles < MAX {
        out.clear();
        for _ in 0..64 {
            push(
                &mut out,
                &Header::Attenuate(Attenuate {
                    req: 11,
                    handle: root,
                    rights: Rights::SEND,
                    expires_at: None,
                    max_messages: None,
                    revocable: true,
                }),
                &Bytes::new(),
            );
        }
        let Some(handles) = batch(&mut c, &out, 64, deadline, |f| match f.header {
            Header::Minted { handle, .. } => Some(Some(handle)),
            Header::Error(_) => Some(None),
            _ => None,
        })
        .await
        else {
            break;
        };
        out.clear();
        for h in handles {
            match h {
                Some(h) => {
                    push(&mut out, &Header::Drop { handle: h }, &Bytes::new());
                    cycles += 1;
                }
                None => refused += 1,
            }
        }
        if tokio::time::timeout(left(deadline), c.write.write_all(&out))
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(json!({ "cycles": cycles, "refused": refused }))
}

/// 5c. Development-namespace names, then a `List` (what `junction ls` does).
async fn dev_names(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    const MAX: u64 = 300_000;
    let mut c = Raw::connect(socket, "names").await?;
    let port = c.open_port().await?;
    let cap = c.mint(port, Rights::SEND | Rights::GRANT).await?;
    let deadline = started(secs);
    let (mut registered, mut refused, mut out) = (0u64, 0u64, BytesMut::new());
    let mut first_refusal = None;
    let mut i = 0u64;
    while Instant::now() < deadline && i < MAX {
        out.clear();
        let first_tag = c.tag();
        for k in 0..256u64 {
            let tag = if k == 0 { first_tag } else { c.tag() };
            let name = format!("dev.flood.name-{i:07}").parse()?;
            i += 1;
            control_call(&mut out, tag, &ControlRequest::Register { name }, vec![cap]);
        }
        let Some(replies) = batch(&mut c, &out, 256, deadline, |f| match &f.header {
            Header::Deliver(d) if d.tag >= first_tag => {
                postcard::from_bytes::<ControlReply>(&f.payload).ok()
            }
            Header::Error(e) if e.tag >= first_tag => Some(ControlReply::Refused {
                code: e.code,
                message: e.message.clone(),
            }),
            _ => None,
        })
        .await
        else {
            break;
        };
        for r in replies {
            match r {
                ControlReply::Registered => registered += 1,
                other => {
                    refused += 1;
                    first_refusal.get_or_insert_with(|| format!("{other:?}"));
                }
            }
        }
    }
    // What `junction ls` would see now, as any client.
    let start = Instant::now();
    let ls = Driver::connect(socket).await;
    let ls = match ls {
        Ok(d) => match tokio::time::timeout(Duration::from_secs(5), d.listing()).await {
            Ok(Ok(l)) => format!(
                "ok: {} ports, {} names, in {:.0} ms",
                l.ports.len(),
                l.ports.iter().map(|p| p.names.len()).sum::<usize>(),
                start.elapsed().as_secs_f64() * 1e3
            ),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => "no answer in 5 s".into(),
        },
        Err(e) => format!("cannot connect: {e}"),
    };
    Ok(
        json!({ "registered": registered, "refused": refused, "first_refusal": first_refusal, "ls": ls }),
    )
}

/// 5d. Junk certificates after the trusted link, served on every lookup.
async fn junk_chain(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    use junction_identity::{CertBody, Certificate, Role, SecretKey};
    let key = crate::pki::read_key(Path::new(&std::env::var("JUNCTION_KEY")?))?;
    let mut chain = crate::pki::read_chain(Path::new(&std::env::var("JUNCTION_CERT")?))?;
    // The leaf is signed by the trusted authority: the check stops there,
    // and what follows is never looked at. Fill the chain to its length
    // limit with certificates carrying thousands of names.
    chain.truncate(1);
    let junk_key = SecretKey::generate()?;
    let names: Vec<_> = (0..5_000)
        .map(|i| format!("junk.padding-padding-padding-padding-padding.n{i:06}").parse())
        .collect::<Result<_, _>>()?;
    let now = junction::unix_now();
    while chain.len() < junction_identity::cert::MAX_CHAIN {
        chain.push(Certificate::issue(
            CertBody {
                version: 1,
                serial: chain.len() as u64,
                subject: junk_key.public(),
                role: Role::Service {
                    names: names.clone(),
                },
                not_before: now - 60,
                not_after: now + 3600,
                issuer: junk_key.public(),
            },
            &junk_key,
        )?);
    }
    let chain_bytes = postcard::to_allocvec(&chain)?.len();
    let mut service = Raw::connect(socket, "junk-service").await?;
    let proof =
        junction_identity::prove_possession(&key, &service.welcome.nonce, service.welcome.junction);
    let auth = service
        .control(&ControlRequest::Authenticate { chain, proof }, vec![])
        .await;
    let auth = match auth {
        Ok((ControlReply::Authenticated(_), _)) => "accepted".to_string(),
        Ok((other, _)) => format!("refused: {other:?}"),
        Err(e) => format!("failed: {e}"),
    };
    let port = service.open_port().await?;
    let cap = service.mint(port, Rights::SEND | Rights::GRANT).await?;
    let registered = service
        .control(
            &ControlRequest::Register {
                name: JUNK_NAME.parse()?,
            },
            vec![cap],
        )
        .await
        .map(|(r, _)| format!("{r:?}"))
        .unwrap_or_else(|e| e.to_string());
    let mut looker = Raw::connect(socket, "junk-looker").await?;
    let deadline = started(secs);
    let (mut lookups, mut found, mut out) = (0u64, 0u64, BytesMut::new());
    let bytes_before = looker.reader.bytes;
    while Instant::now() < deadline && lookups < 100_000 {
        out.clear();
        let first_tag = looker.tag();
        for k in 0..4 {
            let tag = if k == 0 { first_tag } else { looker.tag() };
            control_call(
                &mut out,
                tag,
                &ControlRequest::Lookup {
                    name: JUNK_NAME.parse()?,
                },
                vec![],
            );
        }
        let Some(replies) = batch(&mut looker, &out, 4, deadline, |f| match &f.header {
            Header::Deliver(d) if d.tag >= first_tag => Some(d.caps.first().map(|g| g.handle)),
            Header::Error(e) if e.tag >= first_tag => Some(None),
            _ => None,
        })
        .await
        else {
            break;
        };
        lookups += 4;
        out.clear();
        for h in replies.into_iter().flatten() {
            found += 1;
            push(&mut out, &Header::Drop { handle: h }, &Bytes::new());
        }
        if !out.is_empty() && looker.write.write_all(&out).await.is_err() {
            break;
        }
    }
    let served = looker.reader.bytes - bytes_before;
    drop(service);
    Ok(json!({
        "chain_bytes": chain_bytes,
        "authenticate": auth,
        "register": registered,
        "lookups": lookups,
        "found": found,
        "bytes_per_lookup": served.checked_div(lookups).unwrap_or(0),
    }))
}

/// Calls the victim holds, up to each connection's pending limit (6).
async fn pending_calls(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    const CONNS: usize = 5;
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut c = Raw::connect(socket, "holder").await?;
        let handle = c.lookup(VICTIM).await?;
        conns.push((c, handle));
    }
    let deadline = started(secs);
    let mut tasks = Vec::new();
    for (c, handle) in conns {
        let calls = c.welcome.max_pending_calls as u64 + 64;
        tasks.push(tokio::spawn(async move {
            let Raw {
                mut reader,
                mut write,
                ..
            } = c;
            let payload = Bytes::from_static(HOLD);
            // Reads everything, counts refusals.
            let read = tokio::spawn(async move {
                let (mut failed, mut errors) = (0u64, 0u64);
                while let Ok(Some(f)) = reader.recv().await {
                    match f.header {
                        Header::CallFailed { .. } => failed += 1,
                        Header::Error(_) => errors += 1,
                        _ => {}
                    }
                }
                (failed, errors)
            });
            let mut out = BytesMut::new();
            let mut sent = 0u64;
            for tag in 1..=calls {
                out.clear();
                push(
                    &mut out,
                    &Header::Call(Call {
                        handle,
                        tag,
                        caps: Vec::new(),
                    }),
                    &payload,
                );
                match tokio::time::timeout(left(deadline), write.write_all(&out)).await {
                    Ok(Ok(())) => sent += 1,
                    _ => break,
                }
                if tag % 64 == 0 {
                    // Let credit come back, as a driver would wait for it.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            tokio::time::sleep(left(deadline)).await;
            drop(write);
            read.abort();
            sent
        }));
    }
    let mut sent = 0u64;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    Ok(json!({ "held_calls_sent": sent, "connections": CONNS }))
}

/// Failing authentication (7): Authenticate with a chain the junction
/// trusts and a proof over the wrong nonce, pipelined: up to 256 attempts
/// in flight, the replies read and acknowledged as a driver would. A
/// connection the junction closes is replaced.
async fn bad_auth(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const IN_FLIGHT: u64 = 256;
    let key = crate::pki::read_key(Path::new(&std::env::var("JUNCTION_KEY")?))?;
    let chain = crate::pki::read_chain(Path::new(&std::env::var("JUNCTION_CERT")?))?;
    let mut c = Raw::connect(socket, "bad-auth").await?;
    let deadline = started(secs);
    let (mut attempts, mut answered_total, mut reconnects) = (0u64, 0u64, 0u64);
    let mut first_answer: Option<String> = None;
    while Instant::now() < deadline && attempts < 1_000_000 {
        // A proof over the wrong nonce: the chain verifies, the proof not.
        let proof = junction_identity::prove_possession(&key, &[0u8; 32], c.welcome.junction);
        let payload = Bytes::from(postcard::to_allocvec(&ControlRequest::Authenticate {
            chain: chain.clone(),
            proof,
        })?);
        let home = c.welcome.home.port;
        let Raw {
            mut reader,
            mut write,
            ..
        } = c;
        let answered = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        let first = Arc::new(std::sync::OnceLock::new());
        let (count, notify, first_seen) = (answered.clone(), wake.clone(), first.clone());
        let read = tokio::spawn(async move {
            while let Ok(Some(f)) = reader.recv().await {
                match &f.header {
                    Header::Deliver(d) if d.port == home => {
                        if first_seen.get().is_none()
                            && let Ok(r) = postcard::from_bytes::<ControlReply>(&f.payload)
                        {
                            let _ = first_seen.set(format!("{r:?}"));
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                        notify.notify_one();
                    }
                    Header::Error(e) => {
                        let _ = first_seen.set(format!("error: {}", e.message));
                        count.fetch_add(1, Ordering::Relaxed);
                        notify.notify_one();
                    }
                    _ => {}
                }
            }
            notify.notify_one();
        });
        let (mut sent, mut credited, mut out, mut tag) = (0u64, 0u64, BytesMut::new(), 1u64);
        let mut closed = false;
        while Instant::now() < deadline && !closed {
            let a = answered.load(Ordering::Relaxed);
            out.clear();
            if a > credited {
                let count = u32::try_from(a - credited).unwrap_or(u32::MAX);
                push(
                    &mut out,
                    &Header::Credit { port: home, count },
                    &Bytes::new(),
                );
                credited = a;
            }
            if sent - a < IN_FLIGHT {
                for _ in 0..16 {
                    push(
                        &mut out,
                        &Header::Call(Call {
                            handle: junction_road::control::CONTROL_HANDLE,
                            tag,
                            caps: Vec::new(),
                        }),
                        &payload,
                    );
                    tag += 1;
                }
                sent += 16;
            }
            if !out.is_empty() {
                match tokio::time::timeout(left(deadline), write.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => closed = true,
                    Err(_) => break,
                }
            }
            if sent - answered.load(Ordering::Relaxed) >= IN_FLIGHT {
                let _ = tokio::time::timeout(Duration::from_millis(10), wake.notified()).await;
            }
            closed |= read.is_finished();
        }
        attempts += sent;
        answered_total += answered.load(Ordering::Relaxed);
        drop(write);
        read.abort();
        if let Some(f) = first.get() {
            first_answer.get_or_insert_with(|| f.clone());
        }
        if Instant::now() >= deadline {
            break;
        }
        // Cut off: come back on a new connection.
        match Raw::connect(socket, "bad-auth").await {
            Ok(n) => {
                c = n;
                reconnects += 1;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                match Raw::connect(socket, "bad-auth").await {
                    Ok(n) => c = n,
                    Err(_) => break,
                }
            }
        }
    }
    Ok(
        json!({ "attempts": attempts, "answered": answered_total, "reconnects": reconnects, "first_answer": first_answer }),
    )
}

/// A frame flood (8): Pings from one connection, as fast as it can write; reads the Pongs.
async fn ping_flood(socket: &Path, secs: Duration) -> anyhow::Result<Value> {
    let c = Raw::connect(socket, "pinger").await?;
    let Raw {
        reader, mut write, ..
    } = c;
    let read = tokio::spawn(reader.drain());
    let mut out = BytesMut::new();
    for nonce in 0..4096 {
        push(&mut out, &Header::Ping { nonce }, &Bytes::new());
    }
    let deadline = started(secs);
    let mut pings = 0u64;
    while Instant::now() < deadline && pings < 500_000_000 {
        match tokio::time::timeout(left(deadline), write.write_all(&out)).await {
            Ok(Ok(())) => pings += 4096,
            _ => break,
        }
    }
    drop(write);
    let read_bytes = tokio::time::timeout(Duration::from_millis(500), read)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    Ok(json!({ "pings_written": pings, "bytes_read_back": read_bytes }))
}
