//! `junction`: the Junction daemon and the command-line tools around it.

mod bench;
mod cmd;
mod demo;
mod monitor;
mod pki;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Junction: a capability-based message bus.
#[derive(Debug, Parser)]
#[command(name = "junction", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the junction daemon.
    Serve(Box<cmd::ServeArgs>),
    /// Start a private junction, spawn services, and show the bus at work.
    Demo,
    /// List the junction's ports and connections.
    Ls {
        #[command(flatten)]
        socket: cmd::SocketArg,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Call a registered service and print its reply.
    Call {
        #[command(flatten)]
        socket: cmd::SocketArg,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
        /// The service name.
        name: String,
        /// The request payload (text); `-` reads it from stdin.
        payload: String,
        /// How long to wait for the reply, in seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Send a one-way message to a registered service.
    Send {
        #[command(flatten)]
        socket: cmd::SocketArg,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
        /// The service name.
        name: String,
        /// The payload (text); `-` reads it from stdin.
        payload: String,
    },
    /// Register a name and print every message sent to it.
    Listen {
        #[command(flatten)]
        socket: cmd::SocketArg,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
        /// The name to register.
        name: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// What to answer calls with (text); by default, the request itself.
        #[arg(long)]
        reply: Option<String>,
    },
    /// Watch every message the junction sees, live (like dbus-monitor).
    Monitor(monitor::MonitorArgs),
    /// Traffic per identity, port and junction, refreshed every second.
    Top(monitor::TopArgs),
    /// Measure the junction against a raw socket baseline.
    Bench(bench::BenchArgs),
    /// Make a new ed25519 key (PKCS#8 PEM, readable by openssl) and print its public half.
    Keygen {
        /// Where to write it (must not exist).
        out: PathBuf,
    },
    /// Issue, inspect and revoke certificates.
    #[command(subcommand)]
    Cert(pki::CertCommand),
    /// An echo service: answers every call with its payload (used by demo and tests).
    #[command(hide = true)]
    Echo {
        /// The name to register.
        #[arg(long, default_value = "echo")]
        name: String,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
    },
    /// The demo's second process (used by demo).
    #[command(hide = true)]
    DemoPeer {
        #[command(flatten)]
        identity: cmd::IdentityArgs,
    },
    /// A process of the benchmark (used by bench).
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    // One descriptor per connection: the common soft limit (1,024) would cap
    // the daemon, and the benchmark's thousands of drivers, far below what
    // the hard limit allows. `serve` checks the result against its limits.
    let _ = junction_road::transport::unix::raise_fd_limit();
    let result = match cli.command {
        Command::Serve(args) => cmd::serve(*args),
        Command::Demo => demo::run(),
        Command::Ls { socket, json } => cmd::block_on(cmd::ls(socket.path(), json)),
        Command::Call {
            socket,
            identity,
            name,
            payload,
            timeout,
        } => cmd::block_on(cmd::call(
            socket.path(),
            identity,
            name,
            payload,
            Duration::from_secs_f64(timeout.max(0.001)),
        )),
        Command::Send {
            socket,
            identity,
            name,
            payload,
        } => cmd::block_on(cmd::send(socket.path(), identity, name, payload)),
        Command::Listen {
            socket,
            identity,
            name,
            count,
            reply,
        } => cmd::block_on(cmd::listen(socket.path(), identity, name, count, reply)),
        Command::Monitor(args) => cmd::block_on(monitor::monitor(args)),
        Command::Top(args) => cmd::block_on(monitor::top(args)),
        Command::Bench(args) => bench::run(args),
        Command::Keygen { out } => pki::keygen(&out),
        Command::Cert(command) => pki::cert(command),
        Command::Echo { name, identity } => cmd::block_on(cmd::echo(name, identity)),
        Command::DemoPeer { identity } => cmd::block_on(demo::peer(identity)),
        Command::BenchPeer(args) => bench::peer(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("junction: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(command: &Command) {
    let default = match command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The path of this very program, to spawn copies of it.
fn self_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("cannot find the junction program itself: {e}"))
}
