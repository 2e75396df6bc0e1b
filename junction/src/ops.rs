//! Operating a junction: `serve`'s service options (`--ready-fd`, socket
//! mode and group, `--allow-gid`), `junction wait`, `junction reload` and
//! `junction config check`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use junction::config::FileConfig;
use junction::service::{Activated, ReadyFd, Service, parse_group, parse_mode};
use junction_driver::Driver;

/// `junction serve`'s options for running as a service.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServiceArgs {
    /// Write "READY" and a newline to this file descriptor, then close it,
    /// once the socket accepts connections (for scripts; under systemd,
    /// Type=notify needs nothing) [default: none].
    #[arg(long, value_name = "FD")]
    ready_fd: Option<i32>,
    /// The socket's mode, in octal; 0660 lets the socket's group connect
    /// [default: 0600]. Under socket activation the .socket unit sets it.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// The socket's group, by name or gid [default: the junction's own].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// A group id allowed to connect (repeatable): the peer's primary or a
    /// supplementary group, as of its connect; with --allow-uid, either
    /// list lets a peer in
    /// [default: anyone who can open the socket].
    #[arg(long, value_name = "GID")]
    allow_gid: Vec<u32>,
}

impl ServiceArgs {
    /// Takes over the `--ready-fd` descriptor, if one was given.
    pub(crate) fn ready_fd(&self) -> anyhow::Result<Option<ReadyFd>> {
        Ok(self.ready_fd.map(ReadyFd::take).transpose()?)
    }

    /// Takes over the socket systemd passed, if any.
    pub(crate) fn activated(&self) -> anyhow::Result<Option<Activated>> {
        Ok(Activated::take()?)
    }

    /// The service settings from these flags over `file`'s.
    pub(crate) fn service(&self, file: &FileConfig) -> anyhow::Result<Service> {
        let socket_mode = match self.socket_mode.as_ref().or(file.socket_mode.as_ref()) {
            Some(mode) => Some(parse_mode(mode).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let socket_group = match self.socket_group.as_ref().or(file.socket_group.as_ref()) {
            Some(group) => Some(parse_group(group).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let mut allow_gids = file.allow_gids.clone();
        allow_gids.extend(&self.allow_gid);
        Ok(Service {
            allow_gids,
            socket_mode,
            socket_group,
            ready_fd: None,
            reload: None,
            activated: false,
            activated_listener: None,
        })
    }
}

/// How often `junction wait` tries the socket again.
const WAIT_RETRY: Duration = Duration::from_millis(50);

/// `junction wait`: returns once a junction answers on `socket` (a driver
/// connects and finishes the handshake) and every name in `names` is
/// registered, or fails after `timeout`.
pub(crate) async fn wait(
    socket: PathBuf,
    names: Vec<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let within = humantime::format_duration(timeout);
    let driver = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match Driver::connect_within(&socket, left.max(WAIT_RETRY)).await {
            Ok(driver) => break driver,
            Err(e) => e,
        };
        if Instant::now() + WAIT_RETRY >= deadline {
            bail!("no junction answered within {within}: {error}");
        }
        tokio::time::sleep(WAIT_RETRY).await;
    };
    for name in &names {
        loop {
            let error = match driver.lookup(name).await {
                Ok(_) => break,
                Err(e) => e,
            };
            if Instant::now() + WAIT_RETRY >= deadline {
                bail!("{name} was not registered within {within}: {error}");
            }
            tokio::time::sleep(WAIT_RETRY).await;
        }
    }
    Ok(())
}

/// `junction reload`: asks the junction on `socket` to reload its
/// revocation list and configuration, and prints what it did. Fails when
/// anything could not be applied.
pub(crate) async fn reload(socket: PathBuf) -> anyhow::Result<()> {
    let driver = Driver::connect(&socket).await?;
    let report = driver
        .reload()
        .await
        .with_context(|| format!("the junction on {} did not reload", socket.display()))?;
    for line in &report.applied {
        println!("{line}");
    }
    if report.applied.is_empty() && report.failed.is_empty() {
        println!("reloaded; nothing changed");
    }
    if !report.failed.is_empty() {
        bail!(
            "the reload left some things as they were (see the junction's log too):\n  {}",
            report.failed.join("\n  ")
        );
    }
    Ok(())
}

/// `junction config`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a configuration file without starting a junction (as
    /// `nats-server -t`): it parses, every value is in range, and every file
    /// it names exists and parses. Prints "FILE: ok", or every problem.
    #[command(after_help = "\
EXAMPLES:
  junction config check /etc/junction/junction.toml
  junction config check deploy/junction.toml")]
    Check {
        /// The configuration file.
        file: PathBuf,
    },
}

/// Runs a `junction config` subcommand.
pub(crate) fn config(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { file } => config_check(&file),
    }
}

fn config_check(file: &Path) -> anyhow::Result<()> {
    let problems = junction::config::check_file(file);
    if problems.is_empty() {
        println!("{}: ok", file.display());
        return Ok(());
    }
    for problem in &problems {
        println!("{}: {problem}", file.display());
    }
    bail!(
        "{} has {} problem{}; fix {} and check again",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        if problems.len() == 1 { "it" } else { "them" },
    )
}
