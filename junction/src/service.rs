//! Running the junction as a service: the listening socket systemd hands
//! over (socket activation), telling whoever started the junction that it
//! accepts (systemd's `sd_notify`, or `--ready-fd`), the socket's mode and
//! group, and reloads.
//!
//! Readiness is told once the socket accepts and the `--spawn` children are
//! started, never earlier: a client started on "ready" finds the junction
//! answering.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use sd_notify::NotifyState;

use crate::shell::ServeConfig;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// How the junction runs as a service, beside its limits.
#[derive(Clone, Default)]
pub struct Service {
    /// Group ids whose members (primary or supplementary group, as of
    /// their connect) may connect, beside `allow_uids`.
    pub allow_gids: Vec<u32>,
    /// The socket's mode when the junction makes it [default: `0o600`].
    pub socket_mode: Option<u32>,
    /// The group the junction gives its socket, when it makes it.
    pub socket_group: Option<u32>,
    /// Where to write `READY` once the socket accepts.
    pub ready_fd: Option<ReadyFd>,
    /// Reads the configuration again, for a reload; `None` when there is
    /// nothing to read again (the demo).
    pub reload: Option<Reloader>,
    /// The listening socket came from systemd (socket activation).
    pub activated: bool,
    /// The socket systemd passed, taken over at start
    /// ([`Activated::take`]) and used when the junction starts listening.
    pub activated_listener: Option<Activated>,
}

/// The listening socket systemd passed as descriptor 3, taken over as the
/// very first thing, before the runtime or anything else could be given
/// that number should it not be open.
#[derive(Clone, Debug)]
pub struct Activated(Arc<Mutex<Option<std::os::unix::net::UnixListener>>>);

impl Activated {
    /// Takes over the socket systemd passed, if it passed one
    /// ([`activated_listener`]).
    pub fn take() -> Result<Option<Self>, ServiceError> {
        Ok(activated_listener()?.map(|l| Self(Arc::new(Mutex::new(Some(l))))))
    }

    /// The listener, once.
    pub fn listener(&self) -> Option<std::os::unix::net::UnixListener> {
        self.0.lock().ok().and_then(|mut l| l.take())
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("allow_gids", &self.allow_gids)
            .field("socket_mode", &self.socket_mode.map(|m| format!("{m:04o}")))
            .field("socket_group", &self.socket_group)
            .field("ready_fd", &self.ready_fd)
            .field("reload", &self.reload.is_some())
            .field("activated", &self.activated)
            .finish()
    }
}

/// Builds the configuration again from the command line and the file, as at
/// start; what it returns is compared with what is in force.
pub type Reloader = Arc<dyn Fn() -> Result<ServeConfig, String> + Send + Sync>;

/// Why the junction cannot use what it was handed to run as a service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// `LISTEN_FDS`/`LISTEN_PID` could not be read, or the descriptors not set up.
    #[error(
        "socket activation: cannot take the sockets systemd passed (LISTEN_FDS/LISTEN_PID): {0}; check the .socket unit"
    )]
    Activation(std::io::Error),
    /// More than one socket was passed.
    #[error(
        "socket activation: systemd passed {0} sockets, the junction listens on one; give its .socket unit a single ListenStream="
    )]
    TooManySockets(usize),
    /// The passed descriptor is not a listening Unix stream socket.
    #[error(
        "socket activation: descriptor 3 is not a listening Unix stream socket ({0}); the .socket unit needs ListenStream=/path/to/junction.sock"
    )]
    NotAUnixListener(String),
    /// `--ready-fd` names no open descriptor.
    #[error(
        "--ready-fd {fd}: no such open file descriptor ({source}); open it for the junction, e.g. `junction serve --ready-fd 3 3>ready.pipe`"
    )]
    ReadyFd {
        /// The descriptor number given.
        fd: RawFd,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A descriptor to write `READY\n` to once, then close: taken over when the
/// junction starts, so that no later file can reuse its number, and closed
/// on exec, so that children do not hold it open.
#[derive(Clone, Debug)]
pub struct ReadyFd(Arc<Mutex<Option<File>>>);

impl ReadyFd {
    /// Takes over descriptor `fd`, which the junction's parent opened.
    pub fn take(fd: RawFd) -> Result<Self, ServiceError> {
        let err = |source| ServiceError::ReadyFd { fd, source };
        if fd < 0 {
            return Err(err(std::io::Error::from_raw_os_error(libc::EBADF)));
        }
        set_cloexec(fd).map_err(err)?;
        // SAFETY: `fd` is open (set_cloexec checked it) and nothing in this
        // process owns it: it was inherited, and is taken once, at start,
        // before anything else opens files.
        #[allow(unsafe_code)]
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self(Arc::new(Mutex::new(Some(file)))))
    }

    /// Writes `READY\n` and closes the descriptor (the reader sees the line,
    /// then end of file). A reader that went away is logged, not fatal.
    fn tell(&self) {
        let taken = self.0.lock().map(|mut f| f.take());
        if let Ok(Some(mut file)) = taken
            && let Err(e) = file.write_all(b"READY\n")
        {
            tracing::warn!("cannot write READY to --ready-fd: {e}");
        }
    }
}

/// Marks `fd` close-on-exec; fails if it is not open.
fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number has no memory-safety
    // preconditions; a closed one gives EBADF.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let set = unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    if set < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The listening socket systemd passed (socket activation): `None` when
/// `LISTEN_PID` is not this process or `LISTEN_FDS` is unset. Exactly one
/// descriptor, a listening Unix stream socket, is accepted.
pub fn activated_listener() -> Result<Option<std::os::unix::net::UnixListener>, ServiceError> {
    let fds = sd_notify::listen_fds().map_err(ServiceError::Activation)?;
    match fds.len() {
        0 => return Ok(None),
        1 => {}
        n => return Err(ServiceError::TooManySockets(n)),
    }
    // SAFETY: systemd passed descriptor 3 to this process (LISTEN_PID is
    // ours, `listen_fds` checked it is open and made it close-on-exec), and
    // it is taken over once, here, before anything else could own it.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let socket = socket2::Socket::from(fd);
    let not = |why: String| ServiceError::NotAUnixListener(why);
    let domain = socket.domain().map_err(|e| not(e.to_string()))?;
    if domain != socket2::Domain::UNIX {
        return Err(not(format!("its domain is {domain:?}")));
    }
    let kind = socket.r#type().map_err(|e| not(e.to_string()))?;
    if kind != socket2::Type::STREAM {
        return Err(not(format!("its type is {kind:?}")));
    }
    if !socket.is_listener().map_err(|e| not(e.to_string()))? {
        return Err(not("it is not listening".into()));
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| not(e.to_string()))?;
    Ok(Some(std::os::unix::net::UnixListener::from(OwnedFd::from(
        socket,
    ))))
}

/// Tells systemd (when it started the junction with `NOTIFY_SOCKET`) and the
/// `--ready-fd` reader that the junction accepts connections.
pub fn notify_ready(service: &Service, socket: &std::path::Path) {
    let status = format!("accepting on {}", socket.display());
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    if let Some(fd) = &service.ready_fd {
        fd.tell();
    }
}

/// Tells systemd a reload has begun (with the monotonic time systemd 253
/// and later require); [`notify_reloaded`] ends it.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Tells systemd a reload is over and the junction accepts again.
pub fn notify_reloaded() {
    notify(&[NotifyState::Ready]);
}

/// Tells systemd the junction is shutting down.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Sends `states` to `$NOTIFY_SOCKET`, if set; a failure is logged, as the
/// junction serves the same without it.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

/// The supplementary groups of the process at the other end of a Unix
/// stream socket, as of its `connect()` (`SO_PEERGROUPS`, Linux 4.13 and
/// later): the kernel's record, unlike `/proc/PID/status`, which may
/// describe another process by the time it is read.
pub fn peer_groups(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<Vec<u32>> {
    // Most processes are in few groups; the kernel says how many when
    // the buffer is short (ERANGE), up to NGROUPS_MAX (65,536).
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: the buffer is `len` bytes of gid_t, which the kernel
        // fills, and it writes the size it used (or needs) into `len`.
        #[allow(unsafe_code)]
        let got = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if got == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() || count > 65_536 {
            return Err(error);
        }
        groups.resize(count, 0);
    }
}

/// Parses a socket mode given in octal (`0660`, `660` or `0o660`): at most
/// `0o777`, and the owner must keep read and write.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim().trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("socket mode {text:?} is not an octal mode such as 0660"))?;
    if mode > 0o777 {
        return Err(format!(
            "socket mode {text:?} is above 0777; setuid, setgid and sticky bits mean nothing on a socket"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "socket mode {text:?} takes read or write away from the junction's own user, who must keep 06xx"
        ));
    }
    Ok(mode)
}

/// Resolves a group given by name or number to its id.
pub fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.trim().parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text.trim()) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!(
            "socket group {text:?}: no such group; create it (groupadd {text}) or give a numeric gid"
        )),
        Err(e) => Err(format!("socket group {text:?}: cannot look it up: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_in_octal_and_keep_the_owner() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o666"), Ok(0o666));
        assert!(parse_mode("0688").unwrap_err().contains("octal"));
        assert!(parse_mode("04660").unwrap_err().contains("0777"));
        assert!(parse_mode("0060").unwrap_err().contains("06xx"));
    }

    #[test]
    fn groups_resolve_by_number_and_name() {
        assert_eq!(parse_group("1234"), Ok(1234));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(
            parse_group("no-such-group-here")
                .unwrap_err()
                .contains("no such group")
        );
    }
}
