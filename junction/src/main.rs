//! `junction`: the Junction daemon and the command-line tools around it.

mod bench;
mod cmd;
mod demo;
mod monitor;
mod ops;
mod pki;
mod when;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

/// Junction: a message bus for the programs on a machine, and across machines.
///
/// Services register names; other programs look a name up and send to it,
/// or call it and wait for the reply. A name is proven with a certificate
/// from your bus's authority, so no program can pose as another. Start a
/// junction with `junction serve`, then use the other commands against it.
#[derive(Debug, Parser)]
#[command(name = "junction", version, about, long_about, after_help = TOP_EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const TOP_EXAMPLES: &str = "\
EXAMPLES:
  junction demo                                  # a private bus at work, end to end
  junction serve --dev-namespace 'dev.*' &       # a junction for development
  junction listen dev.greeter --reply hello &    # answer calls to dev.greeter
  junction call dev.greeter 'hi there'           # -> hello
  junction ls                                    # what the junction holds

Each command has its own help: junction help COMMAND.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a junction: the daemon every other command talks to.
    #[command(after_help = "\
EXAMPLES:
  junction serve --dev-namespace 'dev.*'
  junction serve --authority authority.cert --revocations revoked.crl \\
      --spawn 'junction echo --name org.acme.echo --key echo.key --cert echo.cert'
  junction serve --config /etc/junction/junction.toml

`junction reload` (or SIGHUP) reloads the revocation list and the
configuration; SIGINT or SIGTERM stop the junction.")]
    Serve(Box<cmd::ServeArgs>),
    /// Wait until a junction answers on its socket (after `junction serve &`).
    ///
    /// With --name, also until those names are registered (after starting
    /// their services in the background).
    #[command(after_help = "\
EXAMPLES:
  junction serve --dev-namespace 'dev.*' &
  junction wait --timeout 10s
  junction listen dev.greeter --reply hello &
  junction wait --name dev.greeter")]
    Wait {
        #[command(flatten)]
        socket: cmd::SocketArg,
        /// Also wait until this name is registered (repeatable) [default:
        /// none: the socket answering is enough].
        #[arg(long)]
        name: Vec<String>,
        /// How long to wait, e.g. 10s or 500ms.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Make the junction reload its revocation list and configuration file.
    ///
    /// Only the junction's own user and root may. It does what SIGHUP does,
    /// on the one junction at --socket, and prints what changed; it fails
    /// when something could not be applied (a file that does not load, a
    /// setting that needs a restart).
    #[command(after_help = "\
EXAMPLES:
  junction reload
  junction reload --socket /run/junction/junction.sock")]
    Reload {
        #[command(flatten)]
        socket: cmd::SocketArg,
    },
    /// Check configuration files.
    #[command(
        subcommand,
        after_help = "\
EXAMPLES:
  junction config check /etc/junction/junction.toml"
    )]
    Config(ops::ConfigCommand),
    /// Start a private junction, spawn services, and show the bus at work.
    #[command(after_help = "EXAMPLES:\n  junction demo")]
    Demo,
    /// List the junction's ports, connections and links to other junctions.
    ///
    /// UNCONSUMED counts the messages delivered to a port's owner that it
    /// has not yet reported consumed: what it still has to read, plus
    /// what it read since its last report (a driver reports in batches).
    /// A name its port lost, because the identity that registered it was
    /// withdrawn (certificate revoked or expired), is shown as
    /// `NAME (withdrawn: WHY)`.
    #[command(after_help = "\
EXAMPLES:
  junction ls
  junction ls --json | jq '.ports[] | select(.names != [])'
  junction ls --socket /run/junction/junction.sock")]
    Ls {
        #[command(flatten)]
        socket: cmd::SocketArg,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Call a registered service and print its reply.
    ///
    /// A text reply is printed as text, anything else as hex; --raw
    /// writes the reply's bytes exactly as they came, for pipes.
    #[command(after_help = "\
EXAMPLES:
  junction call dev.greeter 'hi there'
  junction call org.acme.echo hi --key alice.key --cert alice.cert --timeout 500ms
  cat request.bin | junction call org.acme.store - --raw > reply.bin")]
    Call {
        #[command(flatten)]
        socket: cmd::SocketArg,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
        /// The service name.
        name: String,
        /// The request payload (text); `-` reads it from stdin.
        payload: String,
        /// How long to wait for the reply: 10s, 500ms, 2m, or plain seconds.
        #[arg(long, default_value = "10s", value_parser = when::duration)]
        timeout: Duration,
        /// Write the reply's bytes to stdout as they are (no newline, no
        /// hex), so that they can be piped.
        #[arg(long)]
        raw: bool,
    },
    /// Send a one-way message to a registered service.
    #[command(after_help = "\
EXAMPLES:
  junction send dev.greeter 'one-way'
  date | junction send org.acme.log - --key app.key --cert app.cert")]
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
    ///
    /// Messages go to stdout, one line each; what happens to the listener
    /// goes to stderr. If the junction withdraws the listener's identity
    /// (its certificate was revoked and the junction reloaded its list, or
    /// the certificate expired), the name is gone: the listener says so on
    /// stderr and exits with status 1, so that a supervisor notices.
    #[command(after_help = "\
EXAMPLES:
  junction listen dev.greeter --reply hello
  junction listen org.acme.greeter --key greeter.key --cert greeter.cert --count 1")]
    Listen {
        #[command(flatten)]
        socket: cmd::SocketArg,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
        /// The name to register.
        name: String,
        /// Exit after this many messages [default: never].
        #[arg(long)]
        count: Option<u64>,
        /// What to answer calls with (text) [default: the request itself].
        #[arg(long)]
        reply: Option<String>,
    },
    /// Watch every message the junction sees, live (like dbus-monitor).
    ///
    /// Only the junction's own user, root, or an identity granted
    /// junction.monitor may watch; payloads need the junction's user, root,
    /// or junction.monitor.payload.
    #[command(after_help = "\
EXAMPLES:
  junction monitor
  junction monitor --name org.acme.echo --json
  junction monitor --junction 2 --payload
  junction monitor --from uid:1000 --port 1.7")]
    Monitor(monitor::MonitorArgs),
    /// Traffic per identity, port and junction, refreshed every second.
    #[command(after_help = "\
EXAMPLES:
  junction top
  junction top --once --json")]
    Top(monitor::TopArgs),
    /// Measure the junction against a raw socket baseline.
    #[command(after_help = "\
EXAMPLES:
  junction bench --quick
  junction bench --json > bench.json
  junction bench --hostile --only hoard --only pings")]
    Bench(bench::BenchArgs),
    /// Make a new ed25519 key (PKCS#8 PEM, readable by openssl) and print its public half.
    #[command(after_help = "\
EXAMPLES:
  junction keygen authority.key
  junction keygen echo.key --force      # replace an existing key")]
    Keygen {
        /// Where to write it (mode 0600).
        out: PathBuf,
        /// Replace the file if it exists (the old key is lost).
        #[arg(long)]
        force: bool,
    },
    /// Issue, inspect and revoke certificates.
    #[command(
        subcommand,
        after_help = "\
EXAMPLES:
  junction cert issue --role authority --key authority.key -o authority.cert
  junction cert inspect authority.cert
  junction cert revoke --authority-key authority.key --cert stolen.cert -o revoked.crl

Each has its own help: junction cert help issue."
    )]
    Cert(pki::CertCommand),
    /// A service that answers every call with its payload.
    ///
    /// Used by the demo and the README; spawned by `junction serve --spawn`
    /// it attaches over its stdin and stdout, otherwise over the socket.
    #[command(after_help = "\
EXAMPLES:
  junction echo --name dev.echo
  junction serve --spawn 'junction echo --name org.acme.echo --key echo.key --cert echo.cert'")]
    Echo {
        /// The name to register.
        #[arg(long, default_value = "echo")]
        name: String,
        #[command(flatten)]
        identity: cmd::IdentityArgs,
    },
    /// Print a shell completion script.
    #[command(after_help = "\
EXAMPLES:
  junction completions bash > ~/.local/share/bash-completion/completions/junction
  junction completions zsh > ~/.zfunc/_junction
  junction completions fish > ~/.config/fish/completions/junction.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one per command to a directory.
    #[command(after_help = "\
EXAMPLES:
  junction man | man -l -
  junction man --out-dir /usr/local/share/man/man1")]
    Man {
        /// Write junction.1 and a page for every subcommand
        /// (junction-serve.1, ...) here [default: print junction.1 to stdout].
        #[arg(long)]
        out_dir: Option<PathBuf>,
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
        Command::Wait {
            socket,
            name,
            timeout,
        } => cmd::block_on(ops::wait(socket.path(), name, timeout)),
        Command::Reload { socket } => cmd::block_on(ops::reload(socket.path())),
        Command::Config(command) => ops::config(command),
        Command::Demo => demo::run(),
        Command::Ls { socket, json } => cmd::block_on(cmd::ls(socket.path(), json)),
        Command::Call {
            socket,
            identity,
            name,
            payload,
            timeout,
            raw,
        } => cmd::block_on(cmd::call(
            socket.path(),
            identity,
            name,
            payload,
            timeout.max(Duration::from_millis(1)),
            raw,
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
        Command::Keygen { out, force } => pki::keygen(&out, force),
        Command::Cert(command) => pki::cert(command),
        Command::Echo { name, identity } => cmd::block_on(cmd::echo(name, identity)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "junction",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out_dir } => man(out_dir),
        Command::DemoPeer { identity } => cmd::block_on(demo::peer(identity)),
        Command::BenchPeer(args) => bench::peer(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("junction: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: many errors
/// already include their cause's words in their own (`cannot read X:
/// {source}`), and printing the cause again doubled every OS error.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `junction man`: the manual from the same definitions as `--help`.
fn man(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let command = Cli::command();
    match out_dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .map_err(|e| anyhow::anyhow!("cannot write the manual page to stdout: {e}")),
        Some(dir) => {
            clap_mangen::generate_to(command, &dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the manual pages to {}: {e}; give a directory that exists and \
                     that you may write in",
                    dir.display()
                )
            })?;
            eprintln!("wrote the manual pages to {}", dir.display());
            Ok(())
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

#[cfg(test)]
mod tests {
    use super::{Cli, report};
    use clap::CommandFactory;

    /// A cause whose words the message already holds is not said again;
    /// one it does not hold is.
    #[test]
    fn errors_are_reported_with_each_cause_once() {
        let os = std::io::Error::from(std::io::ErrorKind::NotFound);
        let wrapped = anyhow::Error::new(junction::config::ConfigError::Read {
            path: "x.toml".into(),
            source: os,
        });
        let text = report(&wrapped);
        assert_eq!(text.matches("entity not found").count(), 1, "{text}");
        let chained = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(report(&chained), "outer: inner cause");
    }

    /// Every visible command has examples, and every option that may be
    /// left out says its default (clap's, or `[default: ...]` in its help).
    #[test]
    fn help_shows_defaults_and_examples() {
        fn walk(cmd: &clap::Command, path: &str, problems: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let examples = cmd
                .get_after_help()
                .or(cmd.get_after_long_help())
                .is_some_and(|h| h.to_string().contains("EXAMPLES"));
            if !examples && cmd.get_name() != "help" {
                problems.push(format!("{path}: no EXAMPLES"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional()
                    || arg.is_required_set()
                    || arg.is_hide_set()
                    || matches!(id, "help" | "version")
                    || matches!(
                        arg.get_action(),
                        clap::ArgAction::SetTrue | clap::ArgAction::Count
                    )
                {
                    continue;
                }
                let help = arg
                    .get_long_help()
                    .or(arg.get_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if arg.get_default_values().is_empty() && !help.contains("[default:") {
                    problems.push(format!("{path} --{id}: no default shown"));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub, &path, problems);
            }
        }
        let mut problems = Vec::new();
        walk(&Cli::command(), "", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        Cli::command().debug_assert();
    }

    /// The words of one example command line, as a shell splits them: up
    /// to a comment, a pipe or a redirection, without a trailing `&`, with
    /// single quotes taken off.
    fn example_words(line: &str) -> Vec<String> {
        let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    any = true;
                }
                c if quoted => word.push(c),
                '#' | '|' | '>' => break,
                c if c.is_whitespace() => {
                    if any || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    any = false;
                }
                c => word.push(c),
            }
        }
        if any || !word.is_empty() {
            words.push(word);
        }
        if words.last().is_some_and(|w| w == "&") {
            words.pop();
        }
        words
    }

    /// Every example in `--help` is a command line the parser takes, so
    /// none can name an option or a value that is not there.
    #[test]
    fn every_example_in_help_parses() {
        fn walk(cmd: &clap::Command, lines: &mut Vec<String>) {
            for help in [cmd.get_after_help(), cmd.get_after_long_help()]
                .into_iter()
                .flatten()
            {
                let text = help.to_string().replace("\\\n", " ");
                lines.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| l.starts_with("junction "))
                        .map(String::from),
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, lines);
            }
        }
        let mut lines = Vec::new();
        walk(&Cli::command(), &mut lines);
        assert!(lines.len() > 30, "examples found: {lines:?}");
        let refused: Vec<String> = lines
            .iter()
            .filter_map(|line| {
                let words = example_words(line);
                <Cli as clap::Parser>::try_parse_from(&words)
                    .err()
                    .map(|e| format!("{line}\n  {}", e.to_string().lines().next().unwrap_or("")))
            })
            .collect();
        assert!(refused.is_empty(), "{}", refused.join("\n"));
    }
}
