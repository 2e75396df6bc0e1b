//! Child processes attached over stdio Roads: spawning them so that they die
//! with the junction, logging their stderr, and ending them on shutdown.
//!
//! This is the one module that needs system calls the standard library does
//! not wrap (`prctl`, `kill`), hence its `unsafe` blocks.
#![allow(unsafe_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The command string could not be split into words.
    #[error("cannot parse the command {command:?}: check its quotes")]
    BadCommand {
        /// The command as given.
        command: String,
    },
    /// The program could not be started.
    #[error("could not start {command:?}: {source}")]
    Start {
        /// The command as given.
        command: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A running child with a stdio Road.
#[derive(Debug)]
pub struct Child {
    name: String,
    inner: tokio::process::Child,
}

impl Child {
    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.inner.id()
    }
}

/// Starts `command` (shell-quoted words, no shell) with its stdin and
/// stdout as a Road and its stderr logged; returns the child and its pipes.
/// The child gets `JUNCTION_SOCKET` and `JUNCTION_ROAD=stdio` in its
/// environment, and on Linux is killed by the kernel if the junction dies.
pub fn spawn(command: &str, socket: &Path) -> Result<(Child, ChildStdout, ChildStdin), SpawnError> {
    let words = shlex::split(command)
        .filter(|w| !w.is_empty())
        .ok_or_else(|| SpawnError::BadCommand {
            command: command.to_owned(),
        })?;
    let (program, args) = words.split_first().ok_or_else(|| SpawnError::BadCommand {
        command: command.to_owned(),
    })?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("JUNCTION_SOCKET", socket)
        .env("JUNCTION_ROAD", "stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut inner = cmd.spawn().map_err(|source| SpawnError::Start {
        command: command.to_owned(),
        source,
    })?;
    let name = Path::new(program)
        .file_name()
        .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned());
    let (Some(stdout), Some(stdin), Some(stderr)) =
        (inner.stdout.take(), inner.stdin.take(), inner.stderr.take())
    else {
        unreachable!("all three pipes were requested");
    };
    let pid = inner.id();
    let tag = name.clone();
    tokio::task::spawn_local(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(child = %tag, pid = ?pid, "{line}");
        }
    });
    tracing::info!(child = %name, pid = ?pid, "spawned");
    Ok((Child { name, inner }, stdout, stdin))
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl, getppid and _exit
    // are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Ends every child: their Roads are closed already, so well-behaved ones
/// are leaving; each gets SIGTERM, and SIGKILL once `grace` has passed.
pub async fn end_all(children: Vec<Child>, grace: Duration) {
    // Their Roads are closed: most leave on their own within moments.
    let mut children = children;
    let patience = tokio::time::Instant::now() + grace.min(Duration::from_millis(500));
    for child in &mut children {
        let _ = tokio::time::timeout_at(patience, child.inner.wait()).await;
    }
    let deadline = tokio::time::Instant::now() + grace;
    for child in &mut children {
        if matches!(child.inner.try_wait(), Ok(None))
            && let Some(pid) = child.pid()
        {
            terminate(pid);
        }
    }
    for mut child in children {
        match tokio::time::timeout_at(deadline, child.inner.wait()).await {
            Ok(Ok(status)) => tracing::info!(child = %child.name, %status, "child exited"),
            _ => {
                tracing::warn!(child = %child.name, "child did not exit within {grace:?}; killing it");
                let _ = child.inner.kill().await;
            }
        }
    }
}
