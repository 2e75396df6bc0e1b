//! The everyday subcommands: serve, ls, call, send, listen, and the echo
//! service.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use junction::config::{FileConfig, check_junction_id};
use junction::core;
use junction::shell::{self, ServeConfig};
use junction_driver::{Driver, Rights};

/// Where to find the junction.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SocketArg {
    /// The junction's socket [default: $JUNCTION_SOCKET, else
    /// $XDG_RUNTIME_DIR/junction.sock, else a temp dir].
    #[arg(long, short = 's')]
    socket: Option<PathBuf>,
}

/// Bytes queued for a connection above which the junction pauses it and
/// those who send to it: room for a few of the largest frames, and for a
/// window of small ones, without letting one receiver hold much of the
/// machine's memory.
const DEFAULT_MAX_UNREAD: usize = 16 << 20;

impl SocketArg {
    pub(crate) fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(junction_driver::socket_path)
    }
}

/// Who a command is, on the bus: a key and its certificate chain.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct IdentityArgs {
    /// This program's key (PKCS#8 PEM) [default: none: anonymous].
    #[arg(long, env = "JUNCTION_KEY")]
    key: Option<PathBuf>,
    /// This program's certificate chain (PEM, leaf first), from `junction
    /// cert issue` [default: none: anonymous].
    #[arg(long, env = "JUNCTION_CERT")]
    cert: Option<PathBuf>,
}

impl IdentityArgs {
    /// Proves the identity on `driver`, when one was given.
    pub(crate) async fn apply(&self, driver: &Driver) -> anyhow::Result<()> {
        match (&self.key, &self.cert) {
            (Some(key_path), Some(cert_path)) => {
                let key = crate::pki::read_key(key_path)?;
                let chain = crate::pki::read_chain(cert_path)?;
                driver.authenticate(&key, chain).await.map_err(|e| {
                    let hint = match refusal_code(&e) {
                        Some(code) => match code {
                            junction_driver::ErrorCode::BadCertificate => {
                                "; check that it was issued under the authority this junction \
                                 trusts (its --authority) and is valid now (junction cert inspect)"
                            }
                            junction_driver::ErrorCode::CertificateRevoked => {
                                "; the authority revoked it: get a new certificate"
                            }
                            junction_driver::ErrorCode::BadProof => {
                                "; --key must be the key the certificate was issued for"
                            }
                            _ => "",
                        },
                        None => "",
                    };
                    anyhow::anyhow!(
                        "cannot prove the identity in {} (key {}): {e}{hint}",
                        cert_path.display(),
                        key_path.display()
                    )
                })?;
                Ok(())
            }
            (None, None) => Ok(()),
            _ => {
                bail!("give both --key and --cert (or JUNCTION_KEY and JUNCTION_CERT), or neither")
            }
        }
    }
}

/// `junction serve`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// A TOML config file; the flags here override it [default: none].
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// This junction's id, 1 to 65534 [default: 1].
    #[arg(long)]
    junction_id: Option<u16>,
    /// Spawn this command with a stdio Road (repeatable), e.g. --spawn
    /// 'my-svc --flag' [default: none].
    #[arg(long)]
    spawn: Vec<String>,
    /// Credit units per sender and port: how much one connection may have
    /// delivered to a port and not yet consumed [default: 1024].
    #[arg(long)]
    window: Option<u32>,
    /// The largest frame accepted, in bytes [default: 4194304].
    #[arg(long)]
    max_frame: Option<u32>,
    /// The bus authority's certificate: services prove their names against
    /// it [default: none: only --dev-namespace names can be registered].
    #[arg(long)]
    authority: Option<PathBuf>,
    /// The authority's revocation list, from `junction cert revoke`
    /// (reloaded on SIGHUP) [default: none].
    #[arg(long)]
    revocations: Option<PathBuf>,
    /// Names that need no certificate, for development only, e.g. 'dev.*'
    /// (repeatable) [default: none].
    #[arg(long)]
    dev_namespace: Vec<String>,
    /// A user id allowed to connect (repeatable) [default: anyone who can
    /// open the socket].
    #[arg(long)]
    allow_uid: Vec<u32>,
    /// Bytes queued for a connection above which the junction stops taking
    /// requests from it and pauses those who send to it [default: 16 MiB].
    #[arg(long)]
    max_unread: Option<usize>,
    /// Connections served at once; the last is kept for the junction's own
    /// user and root [default: 16384].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections one user may hold at once; the junction's own user and
    /// root may take one more [default: three quarters of --max-connections].
    #[arg(long)]
    max_connections_per_uid: Option<usize>,
    /// Milliseconds a new connection has to deliver its whole Hello frame
    /// [default: 10000].
    #[arg(long)]
    hello_timeout_ms: Option<u64>,
    /// Milliseconds a connection may read nothing while bytes wait for it,
    /// before it is cut off [default: 30000].
    #[arg(long)]
    write_timeout_ms: Option<u64>,
    /// Accept Highways (QUIC) from other junctions on this UDP address,
    /// e.g. 0.0.0.0:4433 [default: accept none].
    #[arg(long)]
    quic_listen: Option<std::net::SocketAddr>,
    /// Keep a Highway to this junction, as ID@HOST:PORT (repeatable), e.g.
    /// --peer 2@198.51.100.2:4433 [default: none].
    #[arg(long)]
    peer: Vec<String>,
    /// This junction's key (PKCS#8 PEM, from `junction keygen`): its
    /// identity on Highways; it also seals its routes and sessions
    /// [default: none].
    #[arg(long)]
    junction_key: Option<PathBuf>,
    /// This junction's certificate chain (PEM, leaf first), from
    /// `junction cert issue --role junction --junction-id ID` [default: none].
    #[arg(long)]
    junction_cert: Option<PathBuf>,
    #[command(flatten)]
    service: crate::ops::ServiceArgs,
    /// Serve the traffic counters as Prometheus text (GET /metrics) on this
    /// loopback address, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Let --metrics listen on an address other than loopback: the
    /// counters name identities and ports [default: refused].
    #[arg(long)]
    metrics_allow_remote: bool,
}

/// Runs a current-thread runtime for a subcommand.
pub(crate) fn block_on<T, F: std::future::Future<Output = anyhow::Result<T>>>(
    future: F,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// `junction serve`: runs until SIGINT or SIGTERM; SIGHUP and `junction
/// reload` build the configuration again from the same arguments.
pub(crate) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Inherited descriptors first, before anything opens files of its own.
    let activated = args.service.activated()?;
    let ready_fd = args.service.ready_fd()?;
    let mut config = serve_config(args.clone())?;
    config.service.ready_fd = ready_fd;
    config.service.activated_listener = activated;
    config.service.reload = Some(std::sync::Arc::new(move || {
        serve_config(args.clone()).map_err(|e| format!("{e:#}"))
    }));
    // Bound once, here: a reload does not move the metrics endpoint (it
    // says so, as for every setting that applies only at start).
    let metrics = match config.metrics {
        Some((addr, allow_remote)) => Some((
            junction::metrics::bind(addr, allow_remote)?,
            config.socket.clone(),
        )),
        None => None,
    };
    run_junction(
        config,
        junction::metrics::alongside(metrics, shutdown_signal()),
    )
}

/// The configuration `args` and the file they name give.
fn serve_config(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let socket = args
        .socket
        .socket
        .clone()
        .or(file.socket.clone())
        .unwrap_or_else(junction_driver::socket_path);
    let defaults = core::Config::default();
    let junction = check_junction_id(args.junction_id.or(file.junction_id).unwrap_or(1))?;
    let max_frame = args
        .max_frame
        .or(file.max_frame)
        .unwrap_or(defaults.max_frame);
    if max_frame < junction_road::MIN_MAX_FRAME {
        bail!(
            "--max-frame {max_frame} is below the minimum of {} bytes",
            junction_road::MIN_MAX_FRAME
        );
    }
    let window = args.window.or(file.window).unwrap_or(defaults.window);
    if window == 0 {
        bail!("--window 0 would let nobody send; use at least 1");
    }
    if args.hello_timeout_ms == Some(0) {
        bail!("--hello-timeout-ms 0 would close every connection before its Hello; use at least 1");
    }
    let mut spawn = file.spawn.clone();
    spawn.extend(args.spawn);
    let authority = args.authority.or(file.authority.clone());
    let trust = match &authority {
        Some(path) => junction::config::load_trust(path)?,
        None => junction_identity::TrustStore::new(),
    };
    let revocations_path = args.revocations.or(file.revocations.clone());
    let revocations = match &revocations_path {
        Some(path) => Some(junction::config::load_revocations(path, &trust)?),
        None => None,
    };
    let mut dev = file.dev_namespace.clone();
    dev.extend(args.dev_namespace);
    let dev_namespace = junction::config::parse_patterns(&dev)?;
    if authority.is_none() && dev_namespace.is_empty() {
        tracing::warn!(
            "no authority configured (--authority): no name can be registered; \
             give one, or a development namespace (--dev-namespace 'dev.*')"
        );
    }
    for pattern in &dev_namespace {
        tracing::warn!("DEVELOPMENT NAMESPACE ON: names matching {pattern} need no certificate");
    }
    let mut allow_uids = file.allow_uids.clone();
    allow_uids.extend(args.allow_uid);
    let max_connections = args.max_connections.or(file.max_connections);
    let max_connections_per_uid = args
        .max_connections_per_uid
        .or(file.max_connections_per_uid);
    junction::config::check_connection_limits(max_connections, max_connections_per_uid)?;
    let max_connections = max_connections.unwrap_or(junction::admit::DEFAULT_MAX_CONNECTIONS);
    let junction_key = args.junction_key.or(file.junction_key.clone());
    let junction_cert = args.junction_cert.or(file.junction_cert.clone());
    let junction_identity = match (&junction_key, &junction_cert) {
        (Some(key), Some(cert)) => {
            let key = crate::pki::read_key(key)?;
            let chain = crate::pki::read_chain(cert)?;
            Some((std::sync::Arc::new(key), chain))
        }
        (None, None) => None,
        _ => bail!("give both --junction-key and --junction-cert, or neither"),
    };
    let quic_listen = args.quic_listen.or(file.quic_listen);
    let mut peer_texts = file.peers.clone();
    peer_texts.extend(args.peer);
    let peers = peer_texts
        .iter()
        .map(|p| p.parse::<junction::config::PeerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = peers.iter().find(|p| p.junction == junction) {
        bail!("--peer {p} names this junction itself (junction {junction})");
    }
    let highways = (quic_listen.is_some() || !peers.is_empty()).then_some(shell::Highways {
        listen: quic_listen,
        peers,
    });
    if highways.is_some() && junction_identity.is_none() {
        bail!(
            "Highways need this junction's identity: give --junction-key and --junction-cert \
             (a junction certificate for id {junction} from the bus authority)"
        );
    }
    if highways.is_some() && authority.is_none() {
        bail!("Highways need the bus authority (--authority), to check the junctions they reach");
    }
    let max_connections_per_uid = max_connections_per_uid
        .unwrap_or_else(|| junction::admit::default_per_uid(max_connections));
    let service = args.service.service(&file)?;
    let metrics = args.metrics.or(file.metrics).map(|addr| {
        let allow_remote = args.metrics_allow_remote || file.metrics_allow_remote;
        (addr, allow_remote)
    });
    let config = ServeConfig {
        socket,
        core: core::Config {
            junction,
            max_frame,
            window,
            max_handles: file.max_handles.unwrap_or(defaults.max_handles),
            max_ports: file.max_ports.unwrap_or(defaults.max_ports),
            max_pending_calls: file.max_pending_calls.unwrap_or(defaults.max_pending_calls),
            max_names: file.max_names.unwrap_or(defaults.max_names),
            trust,
            revocations,
            dev_namespace,
            hello_timeout: args
                .hello_timeout_ms
                .or(file.hello_timeout_ms)
                .map_or(defaults.hello_timeout, Duration::from_millis),
            // The start time: each life outranks the ones before.
            incarnation: junction::new_incarnation(),
            junction_identity,
            ..defaults
        },
        highways,
        spawn,
        revocations_path,
        allow_uids,
        max_connections,
        max_connections_per_uid,
        max_unread: args
            .max_unread
            .or(file.max_unread)
            .unwrap_or(DEFAULT_MAX_UNREAD),
        write_timeout: Duration::from_millis(
            args.write_timeout_ms
                .or(file.write_timeout_ms)
                .unwrap_or(30_000)
                .max(1),
        ),
        grace: Duration::from_millis(file.grace_ms.unwrap_or(3000)),
        service,
        metrics,
    };
    Ok(config)
}

/// Binds the socket and runs a junction on this thread until `shutdown`.
pub(crate) fn run_junction(
    mut config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (listener, guard) = shell::listen(&mut config)?;
        shell::serve(config, listener, guard, shutdown).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Driver> {
    Ok(Driver::connect(socket).await?)
}

fn read_payload(payload: String) -> anyhow::Result<Bytes> {
    if payload == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the payload from stdin")?;
        Ok(Bytes::from(buf))
    } else {
        Ok(Bytes::from(payload.into_bytes()))
    }
}

/// A payload for people: text when it is text, else hex.
pub(crate) fn show(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => s.to_string(),
        _ => {
            let hex: String = payload
                .iter()
                .take(64)
                .map(|b| format!("{b:02x}"))
                .collect();
            let more = if payload.len() > 64 { "…" } else { "" };
            format!("0x{hex}{more} ({} bytes)", payload.len())
        }
    }
}

/// `junction ls`.
pub(crate) async fn ls(socket: PathBuf, json: bool) -> anyhow::Result<()> {
    let driver = connect(&socket).await?;
    let listing = driver.listing().await?;
    let traffic = driver.traffic().await.ok();
    if json {
        let mut v = listing_json(&listing);
        if let Some(report) = &traffic {
            v["traffic"] = crate::monitor::traffic_json(report);
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "junction {} at {}",
        listing.junction,
        escape(&socket.to_string_lossy())
    );
    println!();
    // UNCONSUMED, not QUEUED: the junction delivers at once, and counts
    // what the owner has not yet reported consumed (see `junction ls
    // --help`); it does not see the owner's own queue.
    println!(
        "{:<10} {:<8} {:>10} {:>8}  NAMES",
        "PORT", "OWNER", "UNCONSUMED", "SENDERS"
    );
    for p in &listing.ports {
        let owner = p
            .owner
            .map_or_else(|| "junction".to_string(), |o| format!("c{o}"));
        let mut names: Vec<String> = p.names.iter().map(|n| escape(n)).collect();
        names.extend(
            listing
                .withdrawn
                .iter()
                .filter(|w| w.port == p.address)
                .map(|w| format!("{} (withdrawn: {})", escape(&w.name), escape(&w.reason))),
        );
        let mut names = names.join(",");
        if p.home {
            names = if names.is_empty() {
                "(home)".into()
            } else {
                format!("(home) {names}")
            };
        }
        if p.address.port == 0 {
            names = "(control)".into();
        }
        println!(
            "{:<10} {:<8} {:>10} {:>8}  {}",
            p.address.to_string(),
            owner,
            p.queued,
            p.senders,
            names
        );
    }
    if listing.more_ports > 0 {
        println!(
            "… and {} more ports (the listing is cut to fit one frame)",
            listing.more_ports
        );
    }
    println!();
    // A label is whatever the peer wrote in its Hello; only the identity
    // was proven. So the label is quoted and marked as a claim, after the
    // identity, and never in the identity's place.
    println!(
        "{:<8} {:<6} {:>8} {:>6} {:<8} {:>5} {:>7} {:>7}  PROVEN IDENTITY; CLAIMED LABEL",
        "CONN", "ROAD", "PID", "UID", "HOME", "PORTS", "HANDLES", "CALLS"
    );
    for c in &listing.connections {
        let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<8} {:<6} {:>8} {:>6} {:<8} {:>5} {:>7} {:>7}  {}",
            format!("c{}", c.id),
            c.road,
            opt(c.pid),
            opt(c.uid),
            c.home.to_string(),
            c.ports,
            c.handles,
            c.pending_calls,
            who(c.identity.as_deref(), &c.label)
        );
    }
    if listing.more_connections > 0 {
        println!(
            "… and {} more connections (the listing is cut to fit one frame)",
            listing.more_connections
        );
    }
    print!("{}", junctions_tables(&listing));
    if let Some(report) = &traffic {
        println!();
        print!("{}", crate::monitor::traffic_tables(report, None, 20));
    }
    Ok(())
}

/// The HIGHWAYS, ROUTES and SESSIONS tables of `junction ls`, each only
/// when it has rows (or rows left out), each after a blank line.
fn junctions_tables(listing: &junction_road::control::Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let more = |out: &mut String, n: u32, what: &str| {
        if n > 0 {
            let _ = writeln!(
                out,
                "… and {n} more {what} (the listing is cut to fit one frame)"
            );
        }
    };
    if !listing.highways.is_empty() || listing.more_highways > 0 {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:>10} {:>12} {:>12}  ADDRESS",
            "HIGHWAY", "STATE", "RTT", "BYTES OUT", "BYTES IN"
        );
        for h in &listing.highways {
            let rtt = h
                .rtt_us
                .map_or("-".to_string(), |us| format!("{:.1}ms", us as f64 / 1000.0));
            let address = h.address.as_deref().map_or("-".to_string(), escape);
            let _ = writeln!(
                out,
                "{:<8} {:<10} {:>10} {:>12} {:>12}  {}",
                format!("j{}", h.junction),
                h.state.as_str(),
                rtt,
                h.bytes_out,
                h.bytes_in,
                address
            );
        }
        more(&mut out, listing.more_highways, "highways");
    }
    if !listing.routes.is_empty() || listing.more_routes > 0 {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:<8} {:>8} {:>23}  PATH",
            "ROUTE", "NEXT", "COST", "STARTED (INCARNATION)"
        );
        for r in &listing.routes {
            let path: Vec<String> = r.path.iter().map(|j| format!("j{j}")).collect();
            let _ = writeln!(
                out,
                "{:<8} {:<8} {:>8} {:>23}  {}",
                format!("j{}", r.junction),
                format!("j{}", r.next_hop),
                r.cost,
                started(r.incarnation),
                path.join(" > ")
            );
        }
        more(&mut out, listing.more_routes, "routes");
    }
    if !listing.sessions.is_empty() || listing.more_sessions > 0 {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8} {:<7} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>23}",
            "SESSION",
            "SEALING",
            "LANES OUT",
            "LANES IN",
            "UNACKED",
            "REFUSED",
            "IMPORTS",
            "EXPORTS",
            "STARTED (INCARNATION)"
        );
        for s in &listing.sessions {
            let _ = writeln!(
                out,
                "{:<8} {:<7} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7} {:>23}",
                format!("j{}", s.junction),
                s.sealing.as_str(),
                s.lanes_out,
                s.lanes_in,
                s.unacked,
                s.refused,
                s.imports,
                s.exports,
                started(s.incarnation)
            );
        }
        more(&mut out, listing.more_sessions, "sessions");
    }
    out
}

/// A junction's incarnation (its start time, in Unix milliseconds) as a
/// date; `-` for 0, an incarnation not heard yet.
fn started(incarnation: u64) -> String {
    if incarnation == 0 {
        "-".to_string()
    } else {
        junction_identity::when::utc(incarnation / 1000)
    }
}

/// The last column of a connection in `junction ls`: the proven identity,
/// if any, then the label as a quoted claim, both escaped.
fn who(identity: Option<&str>, label: &str) -> String {
    let claim = format!("claims \"{}\"", escape(label));
    match identity {
        Some(id) => format!("{}; {claim}", escape(id)),
        None => format!("anonymous; {claim}"),
    }
}

/// `text` safe to print on a terminal: control characters, the Unicode
/// bidirectional controls (which can reorder what follows them, so a label
/// could seem to say something else), line and paragraph separators, and
/// the backslash and double quote (so a quoted claim cannot seem to end
/// early) are written as escapes such as `\u{202e}`.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{061c}'
                        | '\u{200e}'
                        | '\u{200f}'
                        | '\u{2028}'
                        | '\u{2029}'
                        | '\u{202a}'..='\u{202e}'
                        | '\u{2066}'..='\u{2069}'
                ) =>
            {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

fn listing_json(listing: &junction_road::control::Listing) -> serde_json::Value {
    serde_json::json!({
        "junction": listing.junction,
        "ports": listing.ports.iter().map(|p| serde_json::json!({
            "address": p.address.to_string(),
            "owner": p.owner,
            // "queued" is the old name of the same count, kept for scripts.
            "unconsumed": p.queued,
            "queued": p.queued,
            "senders": p.senders,
            "watchers": p.watchers,
            "names": p.names,
            "withdrawn_names": listing.withdrawn.iter().filter(|w| w.port == p.address).map(|w| serde_json::json!({
                "name": w.name,
                "reason": w.reason,
            })).collect::<Vec<_>>(),
            "home": p.home,
        })).collect::<Vec<_>>(),
        "connections": listing.connections.iter().map(|c| serde_json::json!({
            "id": c.id,
            "label": c.label,
            "road": c.road,
            "pid": c.pid,
            "uid": c.uid,
            "home": c.home.to_string(),
            "ports": c.ports,
            "handles": c.handles,
            "pending_calls": c.pending_calls,
            "identity": c.identity,
        })).collect::<Vec<_>>(),
        "more_ports": listing.more_ports,
        "more_connections": listing.more_connections,
        "highways": listing.highways.iter().map(|h| serde_json::json!({
            "junction": h.junction,
            "address": h.address,
            "state": h.state.as_str(),
            "rtt_us": h.rtt_us,
            "bytes_out": h.bytes_out,
            "bytes_in": h.bytes_in,
        })).collect::<Vec<_>>(),
        "routes": listing.routes.iter().map(|r| serde_json::json!({
            "junction": r.junction,
            "next_hop": r.next_hop,
            "cost": r.cost,
            "path": r.path,
            "incarnation": r.incarnation,
        })).collect::<Vec<_>>(),
        "sessions": listing.sessions.iter().map(|s| serde_json::json!({
            "junction": s.junction,
            "incarnation": s.incarnation,
            "lanes_out": s.lanes_out,
            "lanes_in": s.lanes_in,
            "unacked": s.unacked,
            "sealing": s.sealing.as_str(),
            "handshakes": s.handshakes,
            "refused": s.refused,
            "imports": s.imports,
            "exports": s.exports,
        })).collect::<Vec<_>>(),
        "more_highways": listing.more_highways,
        "more_routes": listing.more_routes,
        "more_sessions": listing.more_sessions,
        "more_withdrawn": listing.more_withdrawn,
    })
}

/// The code of a refusal, to say what to do about it.
fn refusal_code(e: &junction_driver::Error) -> Option<junction_driver::ErrorCode> {
    match e {
        junction_driver::Error::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

/// Connects, proves `identity` if given, and looks `name` up.
async fn lookup_as(
    socket: &Path,
    identity: &IdentityArgs,
    name: &str,
) -> anyhow::Result<(Driver, junction_driver::Capability)> {
    let driver = connect(socket).await?;
    identity.apply(&driver).await?;
    let cap = driver.lookup(name).await.map_err(|e| {
        let hint = match refusal_code(&e) {
            Some(junction_driver::ErrorCode::NameNotFound) => {
                "; is the service running? `junction ls` shows the names registered"
            }
            _ => "",
        };
        anyhow::anyhow!("cannot look up {name}: {e}{hint}")
    })?;
    Ok((driver, cap))
}

/// `junction call`.
pub(crate) async fn call(
    socket: PathBuf,
    identity: IdentityArgs,
    name: String,
    payload: String,
    timeout: Duration,
    raw: bool,
) -> anyhow::Result<()> {
    let payload = read_payload(payload)?;
    let (driver, cap) = lookup_as(&socket, &identity, &name).await?;
    let reply = driver.call(&cap, payload, timeout).await.map_err(|e| {
        let hint = if matches!(e, junction_driver::Error::Timeout(_)) {
            "; give it longer with --timeout (e.g. --timeout 30s)"
        } else {
            ""
        };
        anyhow::anyhow!("calling {name} failed: {e}{hint}")
    })?;
    if raw {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(&reply.payload)
            .and_then(|()| out.flush())
            .context("cannot write the reply to stdout")?;
    } else {
        println!("{}", show(&reply.payload));
    }
    Ok(())
}

/// `junction send`.
pub(crate) async fn send(
    socket: PathBuf,
    identity: IdentityArgs,
    name: String,
    payload: String,
) -> anyhow::Result<()> {
    let payload = read_payload(payload)?;
    let (driver, cap) = lookup_as(&socket, &identity, &name).await?;
    driver.send(&cap, payload).await?;
    driver.sync().await?;
    Ok(())
}

/// `junction listen`.
pub(crate) async fn listen(
    socket: PathBuf,
    identity: IdentityArgs,
    name: String,
    count: Option<u64>,
    reply: Option<String>,
) -> anyhow::Result<()> {
    let driver = connect(&socket).await?;
    identity.apply(&driver).await?;
    let mut port = driver.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    driver.register(&name, &cap).await.map_err(|e| {
        let hint = match refusal_code(&e) {
            Some(junction_driver::ErrorCode::NameNotGranted) => format!(
                "; give --key and --cert of a service certificate that grants {name} \
                     (junction cert issue --role service --name {name}), or use a name in the \
                     junction's development namespace (serve --dev-namespace)"
            ),
            Some(junction_driver::ErrorCode::NameTaken) => {
                "; pick another name, or stop the program that holds it (junction ls)".to_string()
            }
            _ => String::new(),
        };
        anyhow::anyhow!("cannot register {name}: {e}{hint}")
    })?;
    eprintln!("listening as {name} on port {}", port.address());
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let msg = tokio::select! {
            msg = port.recv() => msg?,
            lost = identity_withdrawn(&driver) => {
                // Exit rather than go on: nobody can look the name up any
                // more, and a supervisor should see the listener stop.
                bail!(
                    "the junction withdrew this listener's identity: {}; {name} is no longer \
                     registered (get a new certificate and listen again)",
                    lost
                );
            }
        };
        seen += 1;
        let kind = if msg.is_call() { "call" } else { "message" };
        let caps: Vec<String> = msg
            .caps
            .iter()
            .map(|c| format!("{}({})", c.address(), c.rights()))
            .collect();
        let caps = if caps.is_empty() {
            String::new()
        } else {
            format!(" caps=[{}]", caps.join(", "))
        };
        let who = match &msg.identity {
            Some(id) if id.names.is_empty() => format!(" (key {})", &id.key.to_hex()[..16]),
            Some(id) => format!(
                " ({}, key {})",
                id.names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                &id.key.to_hex()[..16]
            ),
            None => String::new(),
        };
        println!(
            "{kind} from {}{who}{caps}: {}",
            msg.origin,
            show(&msg.payload)
        );
        if msg.is_call() {
            let answer = match &reply {
                Some(text) => Bytes::from(text.clone().into_bytes()),
                None => msg.payload.clone(),
            };
            msg.reply(answer)?;
        }
    }
    driver.sync().await?;
    Ok(())
}

/// Waits for the junction to withdraw `driver`'s identity; says why.
/// Other notices are not the listener's business (they concern messages it
/// sent, and it sends none but replies).
async fn identity_withdrawn(driver: &Driver) -> String {
    loop {
        match driver.next_notice().await {
            Some(junction_driver::Notice::IdentityWithdrawn { reason, .. }) => return reason,
            Some(_) => {}
            // The connection is over; `recv` will say so.
            None => std::future::pending::<()>().await,
        }
    }
}

/// The echo service: registers `name` and answers every call with its
/// payload. Attaches over stdio when spawned by a junction.
pub(crate) async fn echo(name: String, identity: IdentityArgs) -> anyhow::Result<()> {
    let driver = attach().await?;
    identity.apply(&driver).await?;
    let mut port = driver.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    driver.register(&name, &cap).await?;
    loop {
        let msg = match port.recv().await {
            Ok(msg) => msg,
            // The junction went away: a spawned child's cue to exit.
            Err(junction_driver::Error::Closed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if msg.is_call() {
            let payload = msg.payload.clone();
            let _ = msg.reply(payload);
        }
    }
}

/// Attaches over stdio when spawned by a junction, else over the socket.
pub(crate) async fn attach() -> anyhow::Result<Driver> {
    if std::env::var("JUNCTION_ROAD").as_deref() == Ok("stdio") {
        Ok(Driver::from_stdio().await?)
    } else {
        Ok(Driver::connect_default().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::{escape, junctions_tables, listing_json, who};
    use junction_road::control::{
        HighwayInfo, HighwayState, Listing, RouteInfo, Sealing, SessionInfo,
    };

    #[test]
    fn labels_are_claims_and_are_escaped() {
        // A right-to-left override would make the rest read backwards.
        let label = "evil\u{202e}gnp.exe\u{2066}\u{200f}\u{061c}\u{1b}[31m\n\"x\\";
        let shown = who(None, label);
        assert_eq!(
            shown,
            r#"anonymous; claims "evil\u{202e}gnp.exe\u{2066}\u{200f}\u{61c}\u{1b}[31m\u{a}\"x\\""#
        );
        assert!(!shown.chars().any(|c| c.is_control() || c > '\u{7f}'));
        // A proven identity comes first; the label still only claims.
        assert_eq!(
            who(Some("org.acme.echo (key 0011)"), "org.acme.bank"),
            r#"org.acme.echo (key 0011); claims "org.acme.bank""#
        );
        // Ordinary text, accents included, is left alone.
        assert_eq!(escape("junction échо"), "junction échо");
    }

    fn listing() -> Listing {
        Listing {
            junction: 1,
            ports: vec![],
            connections: vec![],
            more_ports: 0,
            more_connections: 0,
            highways: vec![],
            routes: vec![],
            sessions: vec![],
            more_highways: 0,
            more_routes: 0,
            more_sessions: 0,
            withdrawn: vec![],
            more_withdrawn: 0,
        }
    }

    #[test]
    fn junctions_tables_show_only_what_there_is_escaped() {
        assert_eq!(
            junctions_tables(&listing()),
            "",
            "no tables for a lone junction"
        );
        let mut l = listing();
        l.highways.push(HighwayInfo {
            junction: 2,
            address: Some("bus-b\u{202e}:4433".into()),
            state: HighwayState::Up,
            rtt_us: Some(1_500),
            bytes_out: 10,
            bytes_in: 20,
        });
        l.routes.push(RouteInfo {
            junction: 3,
            next_hop: 2,
            cost: 2,
            path: vec![2, 3],
            incarnation: 7_000,
        });
        l.sessions.push(SessionInfo {
            junction: 3,
            incarnation: 7_000,
            lanes_out: 1,
            lanes_in: 2,
            unacked: 3,
            sealing: Sealing::Sealed,
            handshakes: 1,
            refused: 4,
            imports: 5,
            exports: 6,
        });
        l.more_routes = 9;
        let text = junctions_tables(&l);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("HIGHWAY "), "{text}");
        assert!(lines[2].starts_with("j2 "), "{text}");
        assert!(lines[2].contains(" up "), "{text}");
        assert!(lines[2].contains("1.5ms"), "{text}");
        assert!(lines[2].ends_with(r"bus-b\u{202e}:4433"), "{text}");
        assert!(text.contains("j2 > j3"), "{text}");
        assert!(text.contains("1970-01-01 00:00:07 UTC"), "{text}");
        assert!(text.contains("… and 9 more routes"), "{text}");
        assert!(lines.iter().any(|l| l.starts_with("SESSION ")), "{text}");
        assert!(text.contains(" sealed "), "{text}");
        assert!(!text.contains('\u{202e}'), "{text}");
        let json = listing_json(&l);
        assert_eq!(json["highways"][0]["state"], "up");
        assert_eq!(json["routes"][0]["path"], serde_json::json!([2, 3]));
        assert_eq!(json["sessions"][0]["sealing"], "sealed");
        assert_eq!(json["more_routes"], 9);
    }
}
