//! The opt-in metrics endpoint: the traffic counters as Prometheus text
//! (`junction serve --metrics 127.0.0.1:9464`, `GET /metrics`).
//!
//! A tiny HTTP/1.1 responder: one request per connection, at most
//! [`MAX_CONNECTIONS`] at once, a request head of at most
//! [`MAX_REQUEST_BYTES`] read within [`REQUEST_TIMEOUT`]. It asks the
//! junction for its counters through the junction's own socket, as any
//! client would (`Traffic` on the control port), so the core knows nothing
//! of HTTP.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use junction_driver::Driver;
use junction_road::monitor::{Tally, TrafficReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// HTTP connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 8;

/// The most bytes of a request head read; a longer one is refused.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the metrics endpoint cannot listen where it was asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The address is not a loopback address and the operator did not
    /// force it.
    #[error(
        "--metrics {0} is not a loopback address: the counters name identities and ports; \
         listen on 127.0.0.1 or ::1, or add --metrics-allow-remote to expose them to the network"
    )]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Binds the metrics endpoint's TCP listener, refusing a non-loopback
/// address unless `allow_remote`. Bound before the runtime starts, so that
/// a taken port stops `serve` at once.
pub fn bind(addr: SocketAddr, allow_remote: bool) -> Result<std::net::TcpListener, MetricsError> {
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(listener)
}

/// `until`, with the metrics endpoint served meanwhile when there is one
/// (`listener`, reading the junction at `socket`).
pub async fn alongside(
    endpoint: Option<(std::net::TcpListener, PathBuf)>,
    until: impl std::future::Future<Output = ()>,
) {
    match endpoint {
        Some((listener, socket)) => tokio::select! {
            () = until => {}
            () = serve(listener, socket) => {}
        },
        None => until.await,
    }
}

/// Serves `GET /metrics` on `listener` forever, reading the counters of
/// the junction at `socket`. Runs on a `LocalSet`.
pub async fn serve(listener: std::net::TcpListener, socket: PathBuf) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the metrics endpoint cannot start: {e}");
            return std::future::pending().await;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let state = Rc::new(State {
        socket,
        driver: RefCell::new(None),
        open: Cell::new(0),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if state.open.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        state.open.set(state.open.get() + 1);
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let _ = answer(&state, stream).await;
            state.open.set(state.open.get() - 1);
        });
    }
}

struct State {
    socket: PathBuf,
    driver: RefCell<Option<Rc<Driver>>>,
    open: Cell<usize>,
}

impl State {
    /// The counters, over a connection kept between requests.
    async fn report(&self) -> Result<TrafficReport, junction_driver::Error> {
        let cached = self.driver.borrow().clone();
        let driver = match cached {
            Some(d) if !d.is_closed() => d,
            _ => {
                let d = Rc::new(Driver::connect(&self.socket).await?);
                *self.driver.borrow_mut() = Some(d.clone());
                d
            }
        };
        driver.traffic().await
    }
}

async fn answer(state: &State, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() >= MAX_REQUEST_BYTES {
                return Err(431u16);
            }
            let n = stream.read(&mut buf).await.map_err(|_| 400u16)?;
            if n == 0 {
                return Err(400u16);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    let (status, body) = match read {
        Err(_) => (408, String::from("request timeout\n")),
        Ok(Err(code)) => (code, String::from("bad request\n")),
        Ok(Ok(())) => route(state, &head).await,
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let content_type = if status == 200 {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn route(state: &State, head: &[u8]) -> (u16, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if path != "/metrics" && !path.starts_with("/metrics?") {
        return (404, "only /metrics is here\n".into());
    }
    if method != "GET" {
        return (405, "only GET\n".into());
    }
    match state.report().await {
        Ok(report) => (200, render(&report)),
        Err(e) => (503, format!("the junction did not answer: {e}\n")),
    }
}

/// A metric's name part, its help, and the figure of a tally it shows.
type Direction = (&'static str, &'static str, fn(&Tally) -> u64);

/// The counters in the Prometheus text exposition format (version 0.0.4).
pub fn render(report: &TrafficReport) -> String {
    let mut out = String::new();
    let j = report.junction.to_string();
    let directions: [Direction; 4] = [
        ("messages_sent", "Messages sent", |t| t.sent_messages),
        ("bytes_sent", "Payload bytes sent", |t| t.sent_bytes),
        ("messages_received", "Messages received", |t| {
            t.received_messages
        }),
        ("bytes_received", "Payload bytes received", |t| {
            t.received_bytes
        }),
    ];
    for (name, help, value) in directions {
        family(&mut out, &format!("junction_{name}_total"), help, "counter");
        sample(
            &mut out,
            &format!("junction_{name}_total"),
            &[("junction", &j)],
            value(&report.total),
        );
        let metric = format!("junction_identity_{name}_total");
        family(
            &mut out,
            &metric,
            &format!("{help}, by identity (key and names, or uid N for anonymous connections)"),
            "counter",
        );
        for row in &report.identities {
            let labels = [
                ("junction", j.as_str()),
                ("identity", row.identity.as_str()),
            ];
            sample(&mut out, &metric, &labels, value(&row.tally));
        }
        if report.other_identities.messages() > 0 {
            let labels = [("junction", j.as_str()), ("identity", "other")];
            sample(&mut out, &metric, &labels, value(&report.other_identities));
        }
        let metric = format!("junction_peer_{name}_total");
        family(
            &mut out,
            &metric,
            &format!("{help}, to or from another junction, end to end"),
            "counter",
        );
        for row in &report.junctions {
            let peer = row.junction.to_string();
            let labels = [("junction", j.as_str()), ("peer", peer.as_str())];
            sample(&mut out, &metric, &labels, value(&row.tally));
        }
        if report.other_junctions.messages() > 0 {
            let labels = [("junction", j.as_str()), ("peer", "other")];
            sample(&mut out, &metric, &labels, value(&report.other_junctions));
        }
    }
    for (name, help, value) in &directions[2..] {
        let metric = format!("junction_port_{name}_total");
        family(
            &mut out,
            &metric,
            &format!("{help}, by open port"),
            "counter",
        );
        for row in &report.ports {
            let port = row.address.to_string();
            let names = row.names.join(",");
            let labels = [
                ("junction", j.as_str()),
                ("port", port.as_str()),
                ("names", names.as_str()),
            ];
            sample(&mut out, &metric, &labels, value(&row.tally));
        }
        if report.other_ports.messages() > 0 {
            let labels = [("junction", j.as_str()), ("port", "other"), ("names", "")];
            sample(&mut out, &metric, &labels, value(&report.other_ports));
        }
    }
    family(
        &mut out,
        "junction_identity_connections",
        "Open connections, by identity",
        "gauge",
    );
    for row in &report.identities {
        let labels = [
            ("junction", j.as_str()),
            ("identity", row.identity.as_str()),
        ];
        sample(
            &mut out,
            "junction_identity_connections",
            &labels,
            u64::from(row.connections),
        );
    }
    family(&mut out, "junction_monitors", "Monitors attached", "gauge");
    sample(
        &mut out,
        "junction_monitors",
        &[("junction", &j)],
        u64::from(report.monitors),
    );
    family(
        &mut out,
        "junction_monitor_events_dropped_total",
        "Monitor events dropped because their monitor did not keep up",
        "counter",
    );
    sample(
        &mut out,
        "junction_monitor_events_dropped_total",
        &[("junction", &j)],
        report.monitor_drops,
    );
    out
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}.");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_road::Address;
    use junction_road::monitor::{IdentityTraffic, PortTraffic};

    #[test]
    fn the_text_format_escapes_and_counts() {
        let mut tally = Tally::default();
        tally.sent(5);
        tally.sent(5);
        let report = TrafficReport {
            junction: 3,
            total: tally,
            identities: vec![IdentityTraffic {
                identity: "uid \"1\"\n".into(),
                connections: 2,
                tally,
            }],
            ports: vec![PortTraffic {
                address: Address::new(3, 4),
                names: vec!["echo".into()],
                tally,
            }],
            ..Default::default()
        };
        let text = render(&report);
        assert!(text.contains("junction_messages_sent_total{junction=\"3\"} 2\n"));
        assert!(text.contains("junction_bytes_sent_total{junction=\"3\"} 10\n"));
        assert!(text.contains(
            "junction_identity_messages_sent_total{junction=\"3\",identity=\"uid \\\"1\\\"\\n\"} 2\n"
        ));
        assert!(text.contains(
            "junction_port_messages_received_total{junction=\"3\",port=\"3.4\",names=\"echo\"} 0\n"
        ));
        assert!(text.contains("# TYPE junction_monitors gauge\n"));
        // Every line is a comment or `name{labels} value`.
        for line in text.lines() {
            assert!(
                line.starts_with("# ") || line.rsplit(' ').next().unwrap().parse::<u64>().is_ok(),
                "{line}"
            );
        }
    }

    #[test]
    fn a_non_loopback_address_needs_forcing() {
        let addr: SocketAddr = "192.0.2.1:9464".parse().unwrap();
        assert!(matches!(
            bind(addr, false),
            Err(MetricsError::NotLoopback(_))
        ));
        assert!(bind("127.0.0.1:0".parse().unwrap(), false).is_ok());
    }
}
