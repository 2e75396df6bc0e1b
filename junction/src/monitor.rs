//! `junction monitor` (every message the junction sees, live) and
//! `junction top` (the traffic counters, refreshed), and the traffic
//! section of `junction ls`.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use junction_driver::{Address, Driver};
use junction_road::monitor::{MonitorEvent, MonitorFilter, Tally, TrafficReport};

use crate::cmd::{IdentityArgs, SocketArg, escape, show};

/// `junction monitor`.
#[derive(Debug, clap::Args)]
pub(crate) struct MonitorArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Only messages to or from this service name (repeatable) [default:
    /// any].
    #[arg(long)]
    name: Vec<String>,
    /// Only messages from this sender: a key prefix (4+ hex digits), a
    /// certified name, uid:N, or anonymous (repeatable) [default: anyone].
    #[arg(long = "from", visible_alias = "identity")]
    from: Vec<String>,
    /// Only messages from or to this port, J.P (repeatable) [default: any].
    #[arg(long)]
    port: Vec<Address>,
    /// Only messages from or to this junction id (repeatable) [default:
    /// any].
    #[arg(long)]
    junction: Vec<u16>,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Show payloads too (the first 4 KiB); only for the junction's own
    /// user, root, or an identity granted junction.monitor.payload.
    #[arg(long)]
    payload: bool,
    /// Exit after this many events [default: run until Ctrl-C].
    #[arg(long)]
    count: Option<u64>,
}

/// How long `junction monitor` keeps lines for a pipe or file before it
/// writes them, when no more events come.
const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// `junction monitor`: attaches a monitor and prints its events.
pub(crate) async fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    let driver = Driver::connect(&args.socket.path()).await?;
    args.identity.apply(&driver).await?;
    let mut port = driver.open_port().await?;
    let filter = MonitorFilter {
        names: args.name.clone(),
        identities: args.from.clone(),
        ports: args.port.clone(),
        junctions: args.junction.clone(),
    };
    driver
        .monitor(&port, filter, args.payload)
        .await
        .context("the junction refused to be monitored")?;
    eprintln!(
        "monitoring junction {} (Ctrl-C to stop)",
        driver.junction_id()
    );
    let mut seen = 0u64;
    let mut dropped = 0u64;
    // To a terminal, every line at once; to a pipe or file, in batches,
    // flushed once no event came for a moment.
    let stdout = std::io::stdout();
    let terminal = std::io::IsTerminal::is_terminal(&stdout);
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut unflushed = false;
    let flush = tokio::time::sleep(Duration::ZERO);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(flush, ctrl_c);
    while args.count.is_none_or(|c| seen < c) {
        let msg = tokio::select! {
            msg = port.recv() => msg?,
            () = &mut flush, if unflushed => {
                out.flush()?;
                unflushed = false;
                continue;
            }
            _ = &mut ctrl_c => break,
        };
        let Ok(event) = msg.decode::<MonitorEvent>() else {
            continue;
        };
        seen += 1;
        if event.dropped > dropped && !args.json {
            writeln!(
                out,
                "-- {} events dropped: this monitor did not keep up ({} in all)",
                event.dropped - dropped,
                event.dropped
            )?;
        }
        dropped = event.dropped;
        if args.json {
            writeln!(out, "{}", event_json(&event))?;
        } else {
            writeln!(out, "{}", event_line(&event))?;
        }
        if terminal {
            out.flush()?;
        } else if !unflushed {
            unflushed = true;
            flush
                .as_mut()
                .reset(tokio::time::Instant::now() + FLUSH_AFTER);
        }
    }
    out.flush()?;
    if dropped > 0 {
        eprintln!("{dropped} events dropped in all: this monitor did not keep up");
    }
    Ok(())
}

/// `HH:MM:SS.mmm` (UTC) of a time in Unix milliseconds.
fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 1000;
    let s = (unix_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, (s / 60) % 60, s % 60)
}

/// Who sent an event, for people.
fn sender(event: &MonitorEvent) -> String {
    match (&event.identity, event.uid) {
        (Some(id), _) if id.names.is_empty() => format!("key {}", &id.key.to_hex()[..16]),
        (Some(id), _) => format!(
            "{} key {}",
            escape(
                &id.names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            &id.key.to_hex()[..16]
        ),
        (None, Some(uid)) if !event.origin_names.is_empty() => {
            format!("{} uid {uid}", escape(&event.origin_names.join(",")))
        }
        (None, Some(uid)) => format!("uid {uid}"),
        (None, None) if event.origin.port == 0 => "junction".into(),
        (None, None) => "anonymous".into(),
    }
}

/// One event as a line: time, kind, origin (who), target (names), size,
/// capabilities, and the notice or payload.
pub(crate) fn event_line(event: &MonitorEvent) -> String {
    let names = if event.names.is_empty() {
        String::new()
    } else {
        format!(" {}", escape(&event.names.join(",")))
    };
    let caps = if event.caps.is_empty() {
        String::new()
    } else {
        let caps: Vec<String> = event
            .caps
            .iter()
            .map(|c| format!("{}({})", c.address, c.rights))
            .collect();
        format!(" caps=[{}]", caps.join(", "))
    };
    let mut line = format!(
        "{} {:<6} {} ({}) -> {}{} {} B{caps}",
        clock(event.unix_ms),
        event.kind,
        event.origin,
        sender(event),
        event.target,
        names,
        event.size
    );
    if let Some(notice) = &event.notice {
        line.push_str(&format!(": {}", escape(notice)));
    }
    if let Some(payload) = &event.payload {
        line.push_str(&format!(": {}", escape(&show(payload))));
        if payload.len() < event.size as usize {
            line.push_str(" (cut)");
        }
    }
    line
}

/// One event as a JSON object.
pub(crate) fn event_json(event: &MonitorEvent) -> serde_json::Value {
    let identity = event.identity.as_ref().map(|id| {
        serde_json::json!({
            "key": id.key.to_hex(),
            "names": id.names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        })
    });
    let caps: Vec<serde_json::Value> = event
        .caps
        .iter()
        .map(|c| serde_json::json!({"address": c.address.to_string(), "rights": c.rights.to_string()}))
        .collect();
    let mut v = serde_json::json!({
        "unix_ms": event.unix_ms,
        "kind": event.kind.as_str(),
        "origin": event.origin.to_string(),
        "identity": identity,
        "uid": event.uid,
        "target": event.target.to_string(),
        "names": event.names,
        "origin_names": event.origin_names,
        "size": event.size,
        "caps": caps,
        "notice": event.notice,
        "dropped": event.dropped,
    });
    if let Some(payload) = &event.payload {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        v["payload_hex"] = hex.into();
        v["payload_text"] = std::str::from_utf8(payload).ok().into();
        v["payload_truncated"] = (payload.len() < event.size as usize).into();
    }
    v
}

/// `junction top`.
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print the counters once, without redrawing, and exit.
    #[arg(long)]
    once: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Rows of each table shown at most.
    #[arg(long, default_value_t = 20)]
    rows: usize,
    /// With --once: print the counters as JSON.
    #[arg(long, requires = "once")]
    json: bool,
}

/// `junction top`: the traffic counters, redrawn every `interval` until
/// Ctrl-C, with rates since the last redraw.
pub(crate) async fn top(args: TopArgs) -> anyhow::Result<()> {
    let socket = args.socket.path();
    let driver = Driver::connect(&socket).await?;
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut last: Option<(TrafficReport, std::time::Instant)> = None;
    loop {
        let report = driver.traffic().await?;
        let now = std::time::Instant::now();
        let rates = last
            .as_ref()
            .map(|(prev, at)| Rates::between(prev, &report, now - *at));
        let text = traffic_tables(&report, rates.as_ref(), args.rows);
        if args.once && args.json {
            println!("{}", traffic_json(&report));
            return Ok(());
        }
        if args.once {
            print!("{text}");
            return Ok(());
        }
        // Home, clear, draw: plain ANSI.
        print!(
            "\x1b[H\x1b[2Jjunction {} at {}  (every {:.1} s, Ctrl-C to stop)\n\n{text}",
            report.junction,
            escape(&socket.to_string_lossy()),
            interval.as_secs_f64()
        );
        std::io::stdout().flush()?;
        last = Some((report, now));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => {
                println!();
                return Ok(());
            }
        }
    }
}

/// Messages per second since the last redraw, by row.
pub(crate) struct Rates {
    identities: HashMap<String, f64>,
    ports: HashMap<Address, f64>,
    junctions: HashMap<u16, f64>,
}

impl Rates {
    fn between(prev: &TrafficReport, now: &TrafficReport, elapsed: Duration) -> Rates {
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = |a: Option<&Tally>, b: &Tally| {
            b.messages().saturating_sub(a.map_or(0, Tally::messages)) as f64 / secs
        };
        Rates {
            identities: now
                .identities
                .iter()
                .map(|r| {
                    let before = prev.identities.iter().find(|p| p.identity == r.identity);
                    (r.identity.clone(), rate(before.map(|p| &p.tally), &r.tally))
                })
                .collect(),
            ports: now
                .ports
                .iter()
                .map(|r| {
                    let before = prev.ports.iter().find(|p| p.address == r.address);
                    (r.address, rate(before.map(|p| &p.tally), &r.tally))
                })
                .collect(),
            junctions: now
                .junctions
                .iter()
                .map(|r| {
                    let before = prev.junctions.iter().find(|p| p.junction == r.junction);
                    (r.junction, rate(before.map(|p| &p.tally), &r.tally))
                })
                .collect(),
        }
    }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.0 MiB`.
fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.1} GiB", n as f64 / (1 << 30) as f64),
    }
}

fn tally_cells(t: &Tally) -> String {
    format!(
        "{:>9} {:>10} {:>9} {:>10}",
        t.sent_messages,
        bytes(t.sent_bytes),
        t.received_messages,
        bytes(t.received_bytes)
    )
}

fn rate_cell(rate: Option<f64>) -> String {
    rate.map_or("-".into(), |r| format!("{r:.0}"))
}

/// The traffic tables of `junction top` and `junction ls`: by identity,
/// by port, by other junction, each at most `rows` long.
pub(crate) fn traffic_tables(report: &TrafficReport, rates: Option<&Rates>, rows: usize) -> String {
    let mut s = String::new();
    let columns = format!(
        "{:>9} {:>10} {:>9} {:>10} {:>7}",
        "SENT", "BYTES OUT", "RECEIVED", "BYTES IN", "MSG/S"
    );
    s.push_str(&format!("{:<40} {}\n", "IDENTITY", columns));
    for r in report.identities.iter().take(rows) {
        let rate = rates.and_then(|x| x.identities.get(&r.identity).copied());
        let who = format!("{} ({} conn)", escape(&r.identity), r.connections);
        s.push_str(&format!(
            "{:<40} {} {:>7}\n",
            who,
            tally_cells(&r.tally),
            rate_cell(rate)
        ));
    }
    let mut other = report.other_identities;
    for r in report.identities.iter().skip(rows) {
        other.add(&r.tally);
    }
    if other.messages() > 0 {
        s.push_str(&format!("{:<40} {}\n", "(others)", tally_cells(&other)));
    }
    s.push_str(&format!("{:<40} {}\n", "(all)", tally_cells(&report.total)));
    if !report.ports.is_empty() {
        s.push_str(&format!(
            "\n{:<40} {:>9} {:>10} {:>7}\n",
            "PORT", "RECEIVED", "BYTES IN", "MSG/S"
        ));
        for r in report.ports.iter().take(rows) {
            let rate = rates.and_then(|x| x.ports.get(&r.address).copied());
            let port = format!("{} {}", r.address, escape(&r.names.join(",")));
            s.push_str(&format!(
                "{:<40} {:>9} {:>10} {:>7}\n",
                port.trim_end(),
                r.tally.received_messages,
                bytes(r.tally.received_bytes),
                rate_cell(rate)
            ));
        }
        if report.ports.len() > rows || report.other_ports.messages() > 0 {
            s.push_str(&format!(
                "… and more ports ({} messages)\n",
                report.other_ports.received_messages
                    + report
                        .ports
                        .iter()
                        .skip(rows)
                        .map(|p| p.tally.received_messages)
                        .sum::<u64>()
            ));
        }
    }
    if !report.junctions.is_empty() {
        s.push_str(&format!("\n{:<40} {}\n", "JUNCTION", columns));
        for r in report.junctions.iter().take(rows) {
            let rate = rates.and_then(|x| x.junctions.get(&r.junction).copied());
            s.push_str(&format!(
                "{:<40} {} {:>7}\n",
                r.junction,
                tally_cells(&r.tally),
                rate_cell(rate)
            ));
        }
    }
    if report.monitors > 0 || report.monitor_drops > 0 {
        s.push_str(&format!(
            "\n{} monitors attached; {} monitor events dropped\n",
            report.monitors, report.monitor_drops
        ));
    }
    s
}

/// The traffic counters as JSON, for `junction ls --json` and `top`.
pub(crate) fn traffic_json(report: &TrafficReport) -> serde_json::Value {
    let tally = |t: &Tally| {
        serde_json::json!({
            "sent_messages": t.sent_messages,
            "sent_bytes": t.sent_bytes,
            "received_messages": t.received_messages,
            "received_bytes": t.received_bytes,
        })
    };
    serde_json::json!({
        "junction": report.junction,
        "total": tally(&report.total),
        "identities": report.identities.iter().map(|r| serde_json::json!({
            "identity": r.identity, "connections": r.connections, "tally": tally(&r.tally),
        })).collect::<Vec<_>>(),
        "other_identities": tally(&report.other_identities),
        "ports": report.ports.iter().map(|r| serde_json::json!({
            "address": r.address.to_string(), "names": r.names, "tally": tally(&r.tally),
        })).collect::<Vec<_>>(),
        "other_ports": tally(&report.other_ports),
        "junctions": report.junctions.iter().map(|r| serde_json::json!({
            "junction": r.junction, "tally": tally(&r.tally),
        })).collect::<Vec<_>>(),
        "other_junctions": tally(&report.other_junctions),
        "monitors": report.monitors,
        "monitor_drops": report.monitor_drops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_road::Rights;
    use junction_road::monitor::{CapSeen, IdentityTraffic, MessageKind};

    fn event() -> MonitorEvent {
        MonitorEvent {
            unix_ms: 3_600_000 + 61_005,
            kind: MessageKind::Call,
            origin: Address::new(1, 5),
            identity: None,
            uid: Some(1000),
            target: Address::new(1, 3),
            names: vec!["echo".into()],
            origin_names: vec![],
            size: 5,
            caps: vec![CapSeen {
                address: Address::new(1, 6),
                rights: Rights::SEND,
            }],
            notice: None,
            dropped: 0,
            payload: Some(b"hel".to_vec()),
        }
    }

    #[test]
    fn an_event_reads_as_one_line() {
        assert_eq!(
            event_line(&event()),
            "01:01:01.005 call   1.5 (uid 1000) -> 1.3 echo 5 B caps=[1.6(send)]: hel (cut)"
        );
        let v = event_json(&event());
        assert_eq!(v["kind"], "call");
        assert_eq!(v["payload_text"], "hel");
        assert_eq!(v["payload_truncated"], true);
    }

    #[test]
    fn tables_are_bounded() {
        let mut t = Tally::default();
        t.sent(1);
        let report = TrafficReport {
            junction: 1,
            total: t,
            identities: (0..30)
                .map(|i| IdentityTraffic {
                    identity: format!("uid {i}"),
                    connections: 1,
                    tally: t,
                })
                .collect(),
            ..Default::default()
        };
        let text = traffic_tables(&report, None, 5);
        assert_eq!(text.lines().filter(|l| l.starts_with("uid ")).count(), 5);
        assert!(text.contains("(others)"));
    }
}
