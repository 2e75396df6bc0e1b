//! The tokio shell around the core: sockets, child processes, signals.
//!
//! The shell runs on one thread (a current-thread runtime with a `LocalSet`).
//! The core is owned by that thread; each connection's reader task decodes
//! frames and hands them to the core directly, then drains the core's output
//! into per-connection writer tasks, which batch frames into few writes. No
//! lock and no cross-thread wake-up sits on the message path.
//!
//! What waits in a connection's outbox is bounded by pausing readers, never
//! by cutting off a peer that reads: above the high-water mark (`max_unread`)
//! a connection's own reader waits, and so does the reader of whoever just
//! sent it a metered message, until it has read down to half. Only a writer
//! that makes no progress for `write_timeout` ends its connection. Readers
//! take turns of at most 64 frames or 256 KiB.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use junction_road::control::{ControlReply, ControlRequest, ReloadReport};
use junction_road::outbox::{self, Outbox, SharedOutbox};
use junction_road::transport::{child as child_road, unix as unix_road};
use junction_road::{DirectLink, Header, RoadError, RoadReader, RoadWriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::admit::{self, UidCounts};
use crate::children::{self, Child};
use crate::core::{self, ConnId, Core, Now, Output, Peer};
use crate::ratelog::RateLimitedWarn;

/// How the junction daemon is set up.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The Unix socket to listen on.
    pub socket: PathBuf,
    /// The core's identity and limits.
    pub core: core::Config,
    /// Commands to spawn with a stdio Road, as shell-quoted strings.
    pub spawn: Vec<String>,
    /// How long children get between the terminate signal and the kill.
    pub grace: Duration,
    /// The revocation list to reload on SIGHUP.
    pub revocations_path: Option<PathBuf>,
    /// User ids that may connect over the socket; empty means any.
    pub allow_uids: Vec<u32>,
    /// Connections the junction serves at once; more are turned away. The
    /// last [`admit::RESERVED_SLOTS`] are kept for the junction's own user
    /// and root.
    pub max_connections: usize,
    /// Connections one user may hold at once (the junction's own user and
    /// root may go over it by the reserved slots).
    pub max_connections_per_uid: usize,
    /// Bytes queued for a connection above which the junction stops taking
    /// new requests from it and pauses those who send to it (at least two
    /// maximum frames). They go on once it has read half.
    pub max_unread: usize,
    /// How long a connection's writer may make no progress while bytes wait
    /// for it before the connection is cut off and what it holds is freed.
    pub write_timeout: Duration,
    /// Highways to other junctions, if any are configured.
    pub highways: Option<Highways>,
    /// Socket mode and group, group admission, readiness and reloads.
    pub service: crate::service::Service,
    /// Where the traffic counters are served as Prometheus text, and
    /// whether off loopback; bound once at start by `junction serve`.
    pub metrics: Option<(std::net::SocketAddr, bool)>,
}

/// Where this junction's Highways go.
#[derive(Debug, Clone, Default)]
pub struct Highways {
    /// The UDP address to accept Highways on, if any.
    pub listen: Option<std::net::SocketAddr>,
    /// The junctions to dial and keep a Highway to.
    pub peers: Vec<crate::config::PeerAddr>,
}

/// Why the junction could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Another junction holds the socket.
    #[error("another junction is already running on {}; stop it first, or give this one another socket with --socket", path.display())]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's directory or the socket itself could not be set up.
    #[error("could not listen on {}: {source}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A `--spawn` command could not be started.
    #[error(transparent)]
    Spawn(#[from] children::SpawnError),
    /// The Highways could not be set up.
    #[error("{0}")]
    Highways(String),
    /// What systemd handed over (socket activation) cannot be used.
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
}

/// Cheap handle for controlling a running junction from inside its thread.
struct Shell {
    core: RefCell<Core>,
    /// Who may connect (reloadable): uids, and groups.
    allow_uids: RefCell<Vec<u32>>,
    allow_gids: RefCell<Vec<u32>>,
    /// Connection limits (reloadable).
    limits: Cell<admit::Limits>,
    /// The configuration in force, what a reload compares with.
    config: RefCell<ServeConfig>,
    /// Connections held per user.
    uids: UidCounts,
    refusals: Refusals,
    /// Bytes queued for a connection above which its reader, and the readers
    /// of those who send to it, wait.
    high_water: usize,
    /// Bytes queued below which the waiting readers go on.
    low_water: usize,
    /// How long a writer may make no progress with bytes waiting.
    write_timeout: Duration,
    /// A heap trim is scheduled ([`Shell::give_back_memory`]).
    trim_pending: Cell<bool>,
    conns: RefCell<Vec<Option<ConnSlot>>>,
    /// Connections with frames pushed since the last flush.
    dirty: RefCell<Vec<ConnId>>,
    max_frame: u32,
    /// Wakes the main loop when the core's next deadline moved earlier.
    timer: tokio::sync::Notify,
    /// The deadline the main loop sleeps until.
    armed: Cell<Option<Instant>>,
    /// Highways to other junctions, when configured.
    highways: RefCell<Option<Rc<crate::highway::Highways>>>,
}

impl crate::highway::Junction for Shell {
    fn highway_changed(&self, peer: u16, up: bool) {
        {
            let mut core = self.core.borrow_mut();
            if up {
                core.handle_highway_up(peer, 1, now());
            } else {
                core.handle_highway_down(peer, now());
            }
        }
        self.pump();
        self.flush();
    }

    fn highway_frames(
        &self,
        peer: u16,
        frames: Vec<(junction_road::highway::HighwayFrame, bytes::Bytes)>,
    ) {
        self.core
            .borrow_mut()
            .handle_highway_frames(peer, frames, now());
        self.pump();
        self.flush();
    }

    fn highway_frame(
        &self,
        peer: u16,
        frame: junction_road::highway::HighwayFrame,
        payload: bytes::Bytes,
    ) {
        self.core
            .borrow_mut()
            .handle_highway_frame(peer, frame, payload, now());
        self.pump();
        self.flush();
    }
}

/// The warnings a peer can trigger once per connection, each logged at most
/// once a second with a count.
struct Refusals {
    full: RateLimitedWarn,
    per_uid: RateLimitedWarn,
    allow_uids: RateLimitedWarn,
    reload: RateLimitedWarn,
    descriptors: RateLimitedWarn,
    setup: RateLimitedWarn,
    bad_frame: RateLimitedWarn,
}

impl Refusals {
    fn new() -> Self {
        Self {
            full: RateLimitedWarn::new("turned away a connection: connection limit"),
            per_uid: RateLimitedWarn::new("turned away a connection: per-user connection limit"),
            allow_uids: RateLimitedWarn::new(
                "turned away a connection: user not in allow_uids, group not in allow_gids",
            ),
            reload: RateLimitedWarn::new("refused a reload over the control port"),
            descriptors: RateLimitedWarn::new("turned away a connection: out of file descriptors"),
            setup: RateLimitedWarn::new("could not set up an accepted connection"),
            bad_frame: RateLimitedWarn::new("bad frame"),
        }
    }
}

struct ConnSlot {
    id: ConnId,
    /// The peer's uid (SO_PEERCRED), for requests only some users may make.
    uid: Option<u32>,
    outbox: Rc<RefCell<Outbox>>,
    dirty: bool,
    reader: Option<tokio::task::AbortHandle>,
    writer: Option<tokio::task::AbortHandle>,
}

/// Owns the socket path and its lock; removes both when dropped.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    lock_path: PathBuf,
    lock: File,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Removed while still held: a second junction that opened this file
        // before the removal and locks it once we let go finds the name gone
        // (or another file under it) and tries again (`take_lock`), so the
        // removal cannot let two junctions in.
        let _ = std::fs::remove_file(&self.lock_path);
        let _ = self.lock.unlock();
    }
}

/// Claims `path` for this junction: makes its directory if missing (mode
/// `0700`), checks the directory as every client does, takes the lock next
/// to the socket (refusing if another junction holds it), and puts a
/// listening socket there whose mode is already `0600`.
///
/// The directory must be writable by nobody else
/// ([`junction_driver::check_socket_path`]), so the lock file, made `0600`
/// in it, is out of other users' reach.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), ServeError> {
    bind_with(path, 0o600, None)
}

/// The listening socket for `config`: the one systemd passed (socket
/// activation; systemd owns its file, so there is no guard, and
/// `config.socket` becomes its path, which children are told), or one
/// bound at `config.socket` with the configured mode and group.
pub fn listen(config: &mut ServeConfig) -> Result<(UnixListener, Option<SocketGuard>), ServeError> {
    let activated = config
        .service
        .activated_listener
        .as_ref()
        .and_then(|a| a.listener());
    if let Some(listener) = activated {
        let listener = UnixListener::from_std(listener).map_err(|source| ServeError::Listen {
            path: config.socket.clone(),
            source,
        })?;
        if let Some(at) = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        {
            config.socket = at;
        }
        config.service.activated = true;
        tracing::info!(socket = %config.socket.display(), "listening on the socket systemd passed (socket activation)");
        return Ok((listener, None));
    }
    let (listener, guard) = bind_with(
        &config.socket,
        config.service.socket_mode.unwrap_or(0o600),
        config.service.socket_group,
    )?;
    Ok((listener, Some(guard)))
}

/// As [`bind`], with the socket's `mode` and `group` (its owner keeps
/// read and write); both are set before the socket is reachable. The
/// directory stays closed to others when the junction makes it: a socket
/// shared with a group belongs in a directory they can enter and nobody
/// else can write (root's `0755`, as a .socket unit makes).
pub fn bind_with(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketGuard), ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    let refused = |e: unix_road::SocketDirError| {
        listen_err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))
    };
    let dir = junction_driver::socket_dir(path);
    unix_road::create_socket_dir(dir, junction_driver::socket_dir_rule(path)).map_err(refused)?;
    let Some(name) = path.file_name() else {
        return Err(listen_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket path has no file name",
        )));
    };
    let mut lock_name = name.to_owned();
    lock_name.push(".lock");
    let lock_path = dir.join(lock_name);
    let lock =
        take_lock(&lock_path)
            .map_err(listen_err)?
            .ok_or_else(|| ServeError::AlreadyRunning {
                path: path.to_owned(),
            })?;
    // We hold the lock, so a socket file here is left over from a junction
    // that died without cleaning up.
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::AlreadyRunning {
                path: path.to_owned(),
            });
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket left by a junction that died");
    }
    // A socket is born with mode 0777 minus the umask, and `bind` also
    // listens; a `chmod` afterwards leaves a moment when anyone may
    // connect. So bind in a directory only we can enter, set the mode
    // there, and only then rename the socket into place: it is never
    // reachable with another mode. (Setting the umask instead would change
    // it for the whole process, threads and children included.) The
    // staging name is fixed: only the lock holder uses it, and a leftover
    // from a crash is cleared.
    let mut staging_name = std::ffi::OsString::from(".");
    staging_name.push(name);
    staging_name.push(".bind");
    let staging = dir.join(staging_name);
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging).map_err(listen_err)?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(listen_err)?;
    }
    let staged = staging.join(name);
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give the socket group {gid} ({e}); the junction's user must be in that group, or give another --socket-group"
                    ),
                )
            })?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let listener = bound.map_err(listen_err)?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            lock_path,
            lock,
        },
    ))
}

/// Opens and locks the lock file at `path`: `None` when another junction
/// holds it. The file is made `0600`, never through a symbolic link, and
/// must be ours; a lock file replaced or removed by the junction that held
/// it while we waited is opened again, so the lock we keep is on the file
/// that the name refers to.
fn take_lock(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    for _ in 0..8 {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "the lock file {} is a symbolic link, which is never followed; remove it",
                        path.display()
                    ),
                ),
                _ => e,
            })?;
        let meta = file.metadata()?;
        let me = unix_road::effective_uid()?;
        if !meta.is_file() || meta.uid() != me {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the lock file {} is not a file of this user's (owner {}); remove it",
                    path.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        match std::fs::symlink_metadata(path) {
            Ok(now) if now.dev() == meta.dev() && now.ino() == meta.ino() => return Ok(Some(file)),
            _ => continue,
        }
    }
    Err(std::io::Error::other(format!(
        "the lock file {} keeps being replaced; is another junction starting and stopping on this socket?",
        path.display()
    )))
}

/// Runs a junction until `shutdown` resolves; then says goodbye to every
/// driver, ends the children and removes the socket.
///
/// Must be called inside a `LocalSet` on a current-thread runtime.
pub async fn serve(
    config: ServeConfig,
    listener: UnixListener,
    guard: Option<SocketGuard>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    // Two frames, so that one can be written while the next waits.
    let high_water = config.max_unread.max(2 * config.core.max_frame as usize);
    let shell = Rc::new(Shell {
        max_frame: config.core.max_frame,
        core: RefCell::new(Core::new(
            core::Config {
                // Its own user may monitor (see docs/security.md).
                owner_uid: config.core.owner_uid.or_else(admit::own_uid),
                ..config.core.clone()
            },
            now(),
        )),
        allow_uids: RefCell::new(config.allow_uids.clone()),
        allow_gids: RefCell::new(config.service.allow_gids.clone()),
        limits: Cell::new(admit::Limits {
            max_connections: config.max_connections,
            max_per_uid: config.max_connections_per_uid,
            own_uid: admit::own_uid().unwrap_or(0),
        }),
        config: RefCell::new(config.clone()),
        uids: UidCounts::default(),
        refusals: Refusals::new(),
        high_water,
        low_water: high_water / 2,
        write_timeout: config.write_timeout,
        trim_pending: Cell::new(false),
        conns: RefCell::new(Vec::new()),
        dirty: RefCell::new(Vec::new()),
        timer: tokio::sync::Notify::new(),
        armed: Cell::new(None),
        highways: RefCell::new(None),
    });
    if let (Some(settings), Some((key, chain))) = (&config.highways, &config.core.junction_identity)
    {
        let setup = crate::highway::setup(
            config.core.junction,
            config.core.incarnation,
            key,
            chain,
            config.core.trust.clone(),
            config.core.revocations.clone(),
            settings,
        )
        .map_err(|e| ServeError::Highways(format!("{e:#}")))?;
        let highways = crate::highway::Highways::new(setup)
            .map_err(|e| ServeError::Highways(format!("{e:#}")))?;
        if let Some(addr) = highways.local_addr()
            && settings.listen.is_some()
        {
            tracing::info!(%addr, "accepting Highways");
        }
        *shell.highways.borrow_mut() = Some(highways.clone());
        let junction: Rc<dyn crate::highway::Junction> = shell.clone();
        tokio::task::spawn_local(highways.run(junction));
    }
    check_fd_limit(config.max_connections);
    // Kept open to be given up when accept finds no descriptor left, so the
    // waiting client can be accepted and told why (see `shed`).
    let mut reserve = File::open("/dev/null").ok();
    let mut writers: Vec<JoinHandle<()>> = Vec::new();
    let mut kids: Vec<Child> = Vec::new();
    for command in &config.spawn {
        let (child, stdout, stdin) = children::spawn(command, &config.socket)?;
        let peer = Peer {
            nonce: fresh_nonce(),
            road: "stdio",
            pid: child.pid(),
            ..Peer::default()
        };
        let (reader, writer) = child_road::split(stdout, stdin, shell.max_frame);
        writers.push(shell.attach(peer, reader, writer));
        kids.push(child);
    }
    tracing::info!(
        socket = %config.socket.display(),
        junction = config.core.junction,
        children = kids.len(),
        "junction ready"
    );
    crate::service::notify_ready(&config.service, &config.socket);

    tokio::pin!(shutdown);
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        // Sleep until the core's next deadline; input that sets an earlier
        // one wakes this loop to sleep again, shorter.
        let deadline = shell.core.borrow().poll_timeout();
        shell.armed.set(deadline);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = timer => {
                shell.core.borrow_mut().handle_timeout(now());
                shell.pump();
                shell.flush();
            }
            () = shell.timer.notified() => {}
            Some(()) = async { match hangups.as_mut() { Some(h) => h.recv().await, None => None } } => {
                shell.reload("SIGHUP");
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    writers.retain(|w| !w.is_finished());
                    writers.extend(shell.accept(stream));
                }
                Err(e) if out_of_descriptors(&e) => {
                    shell.shed(&listener, &mut reserve).await;
                }
                Err(e) => {
                    // Whatever it is, wait rather than spin on it.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down: telling drivers, ending children");
    crate::service::notify_stopping();
    if let Some(highways) = shell.highways.borrow().as_ref() {
        highways.close("the junction is shutting down");
    }
    drop(listener);
    drop(guard);
    shell.core.borrow_mut().handle_shutdown();
    shell.pump();
    shell.flush();
    // Give writers a moment to deliver the goodbyes.
    let flush = futures_join(writers);
    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    children::end_all(kids, config.grace).await;
    Ok(())
}

/// Whether accept failed for want of a file descriptor (the process's, or
/// the system's).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Raises the descriptor limit as far as allowed and says so when it is
/// still too low for `max_connections` (one descriptor each, and some for
/// the junction itself).
fn check_fd_limit(max_connections: usize) {
    match unix_road::raise_fd_limit() {
        Ok(limit) if limit < max_connections as u64 + 64 => tracing::warn!(
            "this process may open {limit} file descriptors, fewer than max_connections \
             ({max_connections}) needs: past about {} connections, clients are turned away \
             as out of file descriptors; raise the hard limit (ulimit -Hn, LimitNOFILE=) or \
             lower --max-connections",
            limit.saturating_sub(64)
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
}

/// Who a peer is, for logs.
#[derive(Clone, Copy)]
struct Who {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.uid {
            Some(uid) => write!(f, "uid {uid}")?,
            None => write!(f, "unknown uid")?,
        }
        match self.pid {
            Some(pid) => write!(f, ", pid {pid}"),
            None => Ok(()),
        }
    }
}

/// A connection's read side, holding its place in its user's count.
struct Counted<R> {
    inner: R,
    _ticket: Option<admit::Ticket>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

impl Shell {
    /// Serves an accepted client, or tells it why not and hangs up.
    fn accept(self: &Rc<Self>, stream: UnixStream) -> Option<JoinHandle<()>> {
        let cred = stream.peer_cred().ok();
        let uid = cred.map(|c| c.uid());
        let pid = cred.and_then(|c| c.pid());
        let who = Who { uid, pid };
        let gid = cred.map(|c| c.gid());
        if !self.admits(uid, gid, &stream) {
            self.refusals.allow_uids.warn(format_args!(
                "{who}, gid {}",
                gid.map_or("unknown".to_string(), |g| g.to_string())
            ));
            refuse_stream(
                stream,
                format!(
                    "user {} (group {}) may not use this junction (allow_uids, allow_gids)",
                    uid.map_or("unknown".to_string(), |u| u.to_string()),
                    gid.map_or("unknown".to_string(), |g| g.to_string()),
                ),
            );
            return None;
        }
        let total = self.core.borrow().connections();
        let held = uid.map_or(0, |u| self.uids.held(u));
        if let Err(refusal) = self.limits.get().admit(total, uid, held) {
            let log = match refusal {
                admit::Refusal::Full { .. } => &self.refusals.full,
                admit::Refusal::PerUid { .. } => &self.refusals.per_uid,
            };
            log.warn(format_args!("{who}: {refusal}"));
            refuse_stream(stream, refusal.to_string());
            return None;
        }
        let peer = Peer {
            nonce: fresh_nonce(),
            road: "unix",
            pid: pid.and_then(|p| u32::try_from(p).ok()),
            uid,
            gid: cred.map(|c| c.gid()),
        };
        match unix_road::split(stream, self.max_frame) {
            Ok((reader, writer)) => {
                // The user's count holds while the connection is read from:
                // every way a connection ends, ends its reader.
                let ticket = uid.map(|u| self.uids.ticket(u));
                let reader = reader.map_inner(|inner| Counted {
                    inner,
                    _ticket: ticket,
                });
                Some(self.attach(peer, reader, writer))
            }
            Err(e) => {
                self.refusals.setup.warn(format_args!("{who}: {e}"));
                None
            }
        }
    }

    /// Accept found no descriptor for the next client: gives up the reserve
    /// descriptor for a moment to accept the client, tells it why, hangs
    /// up, and takes the reserve again (the libev/nginx way). Without it the
    /// client would wait unanswered, and the listener would wake in a loop.
    async fn shed(&self, listener: &UnixListener, reserve: &mut Option<File>) {
        drop(reserve.take());
        let pending =
            std::future::poll_fn(|cx| std::task::Poll::Ready(listener.poll_accept(cx))).await;
        let told = match pending {
            std::task::Poll::Ready(Ok((stream, _))) => {
                let cred = stream.peer_cred().ok();
                let who = Who {
                    uid: cred.map(|c| c.uid()),
                    pid: cred.and_then(|c| c.pid()),
                };
                self.refusals.descriptors.warn(who);
                refuse_stream(
                    stream,
                    "the junction is out of file descriptors; try again later, or ask its operator to raise its descriptor limit (ulimit -n) or lower --max-connections".into(),
                );
                true
            }
            _ => false,
        };
        *reserve = File::open("/dev/null").ok();
        if !told {
            // No descriptor even with the reserve given up (or none to give
            // up): wait for connections to close, don't spin.
            self.refusals
                .descriptors
                .warn("no descriptor to answer the client with");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers a new connection and starts its reader and writer tasks.
    /// Returns the writer task, which ends once its last frame is written.
    fn attach<R, W>(
        self: &Rc<Self>,
        peer: Peer,
        reader: RoadReader<R>,
        writer: RoadWriter<W>,
    ) -> JoinHandle<()>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + DirectLink + Unpin + 'static,
    {
        tracing::debug!(road = peer.road, pid = ?peer.pid, uid = ?peer.uid, "connection");
        let peer_uid = peer.uid;
        let id = self.core.borrow_mut().handle_connected(peer, now());
        let outbox = Rc::new(RefCell::new(match writer.direct() {
            Some(direct) => Outbox::with_direct(direct),
            None => Outbox::new(),
        }));
        {
            let mut conns = self.conns.borrow_mut();
            let slot = id.slot();
            if conns.len() <= slot {
                conns.resize_with(slot + 1, || None);
            }
            conns[slot] = Some(ConnSlot {
                id,
                uid: peer_uid,
                outbox: outbox.clone(),
                dirty: false,
                reader: None,
                writer: None,
            });
        }
        let shell = self.clone();
        let writer_task = tokio::task::spawn_local(async move {
            let io = writer.into_inner();
            if let Err(e) = outbox::drain_within(outbox, io, Some(shell.write_timeout)).await {
                shell.writer_failed(id, &e);
            }
        });
        let reader_task = tokio::task::spawn_local(read_loop(self.clone(), id, reader));
        if let Some(Some(slot)) = self.conns.borrow_mut().get_mut(id.slot())
            && slot.id == id
        {
            slot.reader = Some(reader_task.abort_handle());
            slot.writer = Some(writer_task.abort_handle());
        }
        writer_task
    }

    /// Whether a peer with `uid` and primary `gid` may connect: anyone when
    /// both allow lists are empty, else `allow_uids` must name its uid or
    /// `allow_gids` one of its groups, primary or supplementary (asked of
    /// the kernel only when needed).
    fn admits(&self, uid: Option<u32>, gid: Option<u32>, stream: &UnixStream) -> bool {
        let uids = self.allow_uids.borrow();
        let gids = self.allow_gids.borrow();
        if (uids.is_empty() && gids.is_empty())
            || uid.is_some_and(|u| uids.contains(&u))
            || gid.is_some_and(|g| gids.contains(&g))
        {
            return true;
        }
        !gids.is_empty()
            && crate::service::peer_groups(stream)
                .is_ok_and(|groups| groups.iter().any(|g| gids.contains(g)))
    }

    /// Reloads the configuration file and the revocation list (SIGHUP, or
    /// the control port's `Reload`), applying what can change while
    /// connections are open; says in the log what changed and what needs
    /// a restart, and returns the same for `junction reload`.
    fn reload(&self, why: &str) -> ReloadReport {
        crate::service::notify_reloading();
        let mut report = ReloadReport::default();
        let old = self.config.borrow().clone();
        let new = match &old.service.reload {
            Some(reload) => match reload() {
                Ok(mut new) => {
                    // The socket systemd passed stays, whatever the file says.
                    if old.service.activated {
                        new.socket = old.socket.clone();
                    }
                    Some(new)
                }
                Err(e) => {
                    report.failed.push(format!(
                        "the configuration did not load, keeping the one in force: {e}"
                    ));
                    None
                }
            },
            None => None,
        };
        if let Some(new) = &new {
            self.apply(&old, new, &mut report);
        }
        let mut revocations_path = new
            .as_ref()
            .map_or(&old.revocations_path, |n| &n.revocations_path);
        if revocations_path.is_none() && old.revocations_path.is_some() {
            // Revocations only move forward: taking the file out of the
            // configuration un-revokes nothing while the junction runs.
            report.failed.push(
                "revocations was removed from the configuration; the list in force stays until a restart".into(),
            );
            revocations_path = &old.revocations_path;
        }
        self.reload_revocations(revocations_path.as_deref(), &old, &mut report);
        if let Some(new) = &new {
            let mut config = self.config.borrow_mut();
            config.revocations_path = revocations_path.clone();
            config.allow_uids = new.allow_uids.clone();
            config.service.allow_gids = new.service.allow_gids.clone();
            config.max_connections = new.max_connections;
            config.max_connections_per_uid = new.max_connections_per_uid;
        }
        for line in &report.applied {
            tracing::info!("{why}: {line}");
        }
        for line in &report.failed {
            tracing::error!("{why}: {line}");
        }
        if report.applied.is_empty() && report.failed.is_empty() {
            tracing::info!("{why}: reloaded; nothing changed");
        }
        self.pump();
        self.flush();
        crate::service::notify_reloaded();
        report
    }

    /// Applies what may change live (who may connect, connection limits);
    /// for every other setting that changed, says that it needs a restart.
    fn apply(&self, old: &ServeConfig, new: &ServeConfig, report: &mut ReloadReport) {
        if old.allow_uids != new.allow_uids {
            *self.allow_uids.borrow_mut() = new.allow_uids.clone();
            report.applied.push(format!(
                "allow_uids is now {:?} (for new connections; open ones stay)",
                new.allow_uids
            ));
        }
        if old.service.allow_gids != new.service.allow_gids {
            *self.allow_gids.borrow_mut() = new.service.allow_gids.clone();
            report.applied.push(format!(
                "allow_gids is now {:?} (for new connections; open ones stay)",
                new.service.allow_gids
            ));
        }
        if (old.max_connections, old.max_connections_per_uid)
            != (new.max_connections, new.max_connections_per_uid)
        {
            let mut limits = self.limits.get();
            limits.max_connections = new.max_connections;
            limits.max_per_uid = new.max_connections_per_uid;
            self.limits.set(limits);
            report.applied.push(format!(
                "max_connections is now {}, max_connections_per_uid {} (open connections over them stay)",
                new.max_connections, new.max_connections_per_uid
            ));
        }
        for (field, was, is) in restart_only(old)
            .into_iter()
            .zip(restart_only(new))
            .filter(|((_, a), (_, b))| a != b)
            .map(|((field, a), (_, b))| (field, a, b))
        {
            report.failed.push(format!(
                "{field} changed ({was} -> {is}) but applies only at start: restart the junction to use it"
            ));
        }
    }

    /// Loads the revocation list at `path` (if any) and puts it in force
    /// for connections and Highways.
    fn reload_revocations(
        &self,
        path: Option<&Path>,
        config: &ServeConfig,
        report: &mut ReloadReport,
    ) {
        let Some(path) = path else {
            return;
        };
        match crate::config::load_revocations(path, &config.core.trust) {
            Ok(list) => {
                let revoked = list.body.serials.len() + list.body.keys.len();
                let for_highways = list.clone();
                let mut core = self.core.borrow_mut();
                match core.set_revocations(Some(list), now()) {
                    Ok(()) => {
                        // New Highways are admitted under it too.
                        if let Some(highways) = self.highways.borrow().as_ref() {
                            highways.revocations().replace(Some(for_highways));
                            highways.recheck();
                        }
                        report.applied.push(format!(
                            "revocation list {} reloaded ({revoked} revoked)",
                            path.display()
                        ));
                    }
                    Err(e) => report
                        .failed
                        .push(format!("keeping the old revocation list: {e}")),
                }
            }
            Err(e) => report
                .failed
                .push(format!("keeping the old revocation list: {e}")),
        }
    }

    /// Carries out a `Reload` control request from `conn`, or refuses it,
    /// and leaves the answer for the core, which is about to handle it.
    /// Only the junction's own user and root may reload: they could send
    /// SIGHUP anyway.
    fn reload_for(&self, conn: ConnId) {
        let uid = match self.conns.borrow().get(conn.slot()) {
            Some(Some(slot)) if slot.id == conn => slot.uid,
            _ => return,
        };
        let own = self.limits.get().own_uid;
        let reply = if uid.is_some_and(|u| u == own || u == 0) {
            ControlReply::Reloaded(self.reload(&format!("reload asked by {conn}")))
        } else {
            let user = uid.map_or("a peer with no uid (a spawned child)".into(), |u| {
                format!("user {u}")
            });
            self.refusals
                .reload
                .warn(format_args!("{conn}: {user} is not the junction's user"));
            ControlReply::Refused {
                code: junction_road::ErrorCode::NotAllowed,
                message: format!(
                    "{user} may not reload this junction: only its own user ({own}) and root may; ask its operator to run `junction reload` or `systemctl reload`"
                ),
            }
        };
        self.core.borrow_mut().set_reload_answer(conn, reply);
    }

    /// Tells the core how the Highways stand (addresses, states, round
    /// trips, bytes), for the listing it is about to make.
    fn report_highways(&self) {
        let Some(highways) = self.highways.borrow().clone() else {
            return;
        };
        let infos = highways.info();
        self.core.borrow_mut().set_highways(infos);
    }

    /// Carries out everything the core asked for. Frames are queued; the
    /// end of the batch ([`Shell::flush`]) sends them.
    fn pump(&self) {
        self.pump_noting(None);
    }

    /// As [`Shell::pump`]; adds to `congested` each connection that was just
    /// given a metered message (a `Send` or a `Call`, not a reply nor a
    /// control frame) while over its high-water mark, so that the reader
    /// whose frame produced it can wait for it.
    fn pump_noting(&self, mut congested: Option<&mut Vec<ConnId>>) {
        let mut core = self.core.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        let mut dirty = self.dirty.borrow_mut();
        while let Some(output) = core.poll_output() {
            match output {
                Output::Frame { conn, frame } => {
                    if let Some(Some(slot)) = conns.get_mut(conn.slot())
                        && slot.id == conn
                    {
                        let mut outbox = slot.outbox.borrow_mut();
                        outbox.push_quiet(&frame.header, &frame.payload);
                        // Replies never pause their sender: a service must
                        // not stall for everyone because one caller does not
                        // read (the caller is bounded by its pending calls).
                        // Nor do monitor events (from the control port):
                        // a slow monitor loses its own events instead.
                        let metered = matches!(&frame.header, Header::Deliver(d) if d.tag == 0 && d.origin.port != 0);
                        if metered
                            && outbox.queued() > self.high_water
                            && let Some(congested) = congested.as_deref_mut()
                            && !congested.contains(&conn)
                        {
                            congested.push(conn);
                        }
                        drop(outbox);
                        if !slot.dirty {
                            slot.dirty = true;
                            dirty.push(conn);
                        }
                    }
                }
                Output::Close { conn, reason } => {
                    if let Some(entry) = conns.get_mut(conn.slot())
                        && entry.as_ref().is_some_and(|s| s.id == conn)
                    {
                        tracing::info!(%conn, "closing connection: {reason}");
                        // The writer writes what is queued, then shuts down;
                        // its deadline bounds how long that may take.
                        if let Some(slot) = entry.take() {
                            slot.outbox.close();
                            if let Some(reader) = slot.reader {
                                reader.abort();
                            }
                        }
                    }
                }
                Output::Highway { to, frame, payload } => {
                    if let Some(highways) = self.highways.borrow().as_ref() {
                        highways.send(to, &frame, payload);
                    }
                }
                Output::Session { .. } | Output::Unroutable { .. } => {}
            }
        }
    }

    /// A connection whose writer made no progress for `write_timeout` while
    /// bytes waited is not reading its Road: it is cut off, what is queued
    /// for it is dropped, and its ports die as if it had left. Nobody else
    /// is: senders to a connection that reads are paused, never cut off.
    fn cut_off(&self, conn: ConnId) {
        let slot = match self.conns.borrow_mut().get_mut(conn.slot()) {
            Some(entry) if entry.as_ref().is_some_and(|s| s.id == conn) => entry.take(),
            _ => None,
        };
        let Some(slot) = slot else { return };
        for task in [slot.reader, slot.writer].into_iter().flatten() {
            task.abort();
        }
        // Frees the queue and wakes the readers paused on it.
        slot.outbox.abandon();
        self.core.borrow_mut().handle_disconnected(conn);
        self.pump();
        self.flush();
    }

    /// The writer of `conn` gave up: the link failed, or the peer took
    /// nothing for `write_timeout`. A connection still open is cut off; a
    /// closed one's last frames are dropped with the writer.
    fn writer_failed(self: &Rc<Self>, conn: ConnId, e: &std::io::Error) {
        let open = self.is_open(conn);
        let kind = e.kind();
        match (kind, open) {
            (std::io::ErrorKind::TimedOut, true) => tracing::warn!(
                %conn,
                "cutting off a connection that does not read what is sent to it: {e}"
            ),
            (std::io::ErrorKind::TimedOut, false) => tracing::warn!(
                %conn,
                "dropping the last frames of a closed connection that does not read them: {e}"
            ),
            _ => tracing::debug!(%conn, "writing failed: {e}"),
        }
        if open {
            self.cut_off(conn);
        }
        if kind == std::io::ErrorKind::TimedOut {
            self.give_back_memory();
        }
    }

    /// Asks the allocator, soon and once for a burst of calls, to give freed
    /// memory back to the system. glibc returns only the top of its heap by
    /// itself, so the queue of a peer that was given up would otherwise stay
    /// resident wherever other allocations sit above it.
    fn give_back_memory(self: &Rc<Self>) {
        if self.trim_pending.replace(true) {
            return;
        }
        let shell = self.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            shell.trim_pending.set(false);
            trim_heap();
        });
    }

    /// Ends a batch: what the core held for other junctions goes out, and
    /// every link with queued frames writes them, directly if
    /// its writer is idle; the main loop hears if the core needs waking
    /// sooner than it planned.
    fn flush(&self) {
        if self.core.borrow_mut().release_transmits() {
            self.pump();
        }
        self.flush_roads();
    }

    /// [`Shell::flush`], but what the batch sends to other junctions stays
    /// held, to go with more: Roads are written and the timer armed.
    fn flush_roads(&self) {
        let next = self.core.borrow().poll_timeout();
        let sooner = match (next, self.armed.get()) {
            (Some(next), Some(armed)) => next < armed,
            (next, None) => next.is_some(),
            (None, Some(_)) => false,
        };
        if sooner {
            self.armed.set(next);
            self.timer.notify_one();
        }
        let mut conns = self.conns.borrow_mut();
        for conn in self.dirty.borrow_mut().drain(..) {
            if let Some(Some(slot)) = conns.get_mut(conn.slot())
                && slot.id == conn
            {
                slot.dirty = false;
                slot.outbox.flush_direct();
            }
        }
    }

    fn is_open(&self, conn: ConnId) -> bool {
        matches!(self.conns.borrow().get(conn.slot()), Some(Some(s)) if s.id == conn)
    }

    /// The outbox of `conn` when it is over its high-water mark.
    fn congested(&self, conn: ConnId) -> Option<Rc<RefCell<Outbox>>> {
        match self.conns.borrow().get(conn.slot()) {
            Some(Some(s)) if s.id == conn && s.outbox.borrow().queued() > self.high_water => {
                Some(s.outbox.clone())
            }
            _ => None,
        }
    }

    /// Waits until `conn` has read down to its low-water mark, or is gone.
    async fn room_in(&self, conn: ConnId) {
        let Some(outbox) = self.congested(conn) else {
            return;
        };
        let low = self.low_water;
        std::future::poll_fn(|cx| outbox.borrow_mut().poll_below(cx, low)).await;
    }

    fn disconnected(&self, conn: ConnId) {
        self.core.borrow_mut().handle_disconnected(conn);
        if let Some(entry) = self.conns.borrow_mut().get_mut(conn.slot())
            && entry.as_ref().is_some_and(|s| s.id == conn)
            && let Some(slot) = entry.take()
        {
            slot.outbox.close();
        }
        self.pump();
        self.flush();
    }
}

/// `ControlRequest::List`, postcard-encoded: the single byte `03`
/// (docs/protocol.md 8.4).
const LIST_REQUEST: &[u8] = &[3];

/// Whether `frame` asks the control port for a listing: a `Call` on the
/// control handle whose payload is `List`. Two comparisons, so the
/// Highways are read only for the listings that show them.
/// Whether `frame` asks the control port to reload: a `Call` on handle 0
/// whose payload is the encoded `ControlRequest::Reload` (one byte; the
/// comparison is all a frame pays).
fn is_reload_request(frame: &junction_road::Frame) -> bool {
    static RELOAD: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        postcard::to_allocvec(&ControlRequest::Reload).expect("a unit variant encodes")
    });
    matches!(&frame.header, Header::Call(c) if c.handle == junction_road::control::CONTROL_HANDLE)
        && frame.payload.as_ref() == RELOAD.as_slice()
}

/// The settings a reload cannot change, by name, as text to compare and
/// show: sockets, identities, limits told to drivers at the handshake,
/// children and Highways are set up once.
fn restart_only(config: &ServeConfig) -> Vec<(&'static str, String)> {
    let core = &config.core;
    let patterns: Vec<String> = core.dev_namespace.iter().map(|p| p.to_string()).collect();
    vec![
        ("socket", config.socket.display().to_string()),
        ("junction_id", core.junction.to_string()),
        ("max_frame", core.max_frame.to_string()),
        ("window", core.window.to_string()),
        ("max_handles", core.max_handles.to_string()),
        ("max_ports", core.max_ports.to_string()),
        ("max_pending_calls", core.max_pending_calls.to_string()),
        ("max_names", core.max_names.to_string()),
        (
            "hello_timeout_ms",
            core.hello_timeout.as_millis().to_string(),
        ),
        ("dev_namespace", format!("{patterns:?}")),
        ("authority", format!("{:?}", core.trust)),
        (
            "junction_cert",
            format!("{:?}", core.junction_identity.as_ref().map(|(_, c)| c)),
        ),
        ("spawn", format!("{:?}", config.spawn)),
        ("grace_ms", config.grace.as_millis().to_string()),
        ("max_unread", config.max_unread.to_string()),
        (
            "write_timeout_ms",
            config.write_timeout.as_millis().to_string(),
        ),
        ("quic_listen/peers", format!("{:?}", config.highways)),
        (
            "socket_mode",
            format!("{:04o}", config.service.socket_mode.unwrap_or(0o600)),
        ),
        ("socket_group", format!("{:?}", config.service.socket_group)),
        (
            "metrics",
            match config.metrics {
                None => "off".into(),
                Some((addr, false)) => addr.to_string(),
                Some((addr, true)) => format!("{addr}, remote allowed"),
            },
        ),
    ]
}

fn is_list_request(frame: &junction_road::Frame) -> bool {
    matches!(&frame.header, Header::Call(c) if c.handle == junction_road::control::CONTROL_HANDLE)
        && frame.payload.as_ref() == LIST_REQUEST
}

/// Frames one reader handles in a turn before it lets the other tasks run,
/// so that a connection that floods the junction gets its turn, not the
/// whole thread.
const TURN_FRAMES: usize = 16;
/// Payload bytes one reader handles in a turn, as [`TURN_FRAMES`].
const TURN_BYTES: usize = 64 * 1024;
/// Frames whose traffic to other junctions one reader holds back, across
/// turns, to send together (or [`TURN_BYTES`] of payload): each send to a
/// Highway costs quinn a write, packets and a wake-up, and at one send per
/// turn of 16 small messages that cost was about a quarter of the sending
/// junction's work.
const HOLD_FRAMES: usize = 128;

async fn read_loop<R: AsyncRead + Unpin>(
    shell: Rc<Shell>,
    conn: ConnId,
    mut reader: RoadReader<R>,
) {
    // The core closes a connection whose Hello is not through in time.
    let mut new_batch = true;
    let mut at = now();
    // Receivers over their high-water mark that the last frame gave a
    // metered message to.
    let mut congested = Vec::new();
    let (mut frames, mut bytes) = (0, 0);
    let (mut held_frames, mut held_bytes) = (0, 0);
    loop {
        // A connection reads what it asked for before it may ask for more:
        // its own outbox over the mark pauses it (and only its reader).
        if shell.congested(conn).is_some() {
            shell.flush();
            shell.room_in(conn).await;
            new_batch = true;
        }
        match reader.read_frame().await {
            Ok(Some(frame)) => {
                // One clock reading per read batch, not per frame.
                if new_batch {
                    at = now();
                }
                frames += 1;
                bytes += frame.payload.len();
                held_frames += 1;
                held_bytes += frame.payload.len();
                if is_list_request(&frame) {
                    shell.report_highways();
                } else if is_reload_request(&frame) {
                    shell.reload_for(conn);
                }
                {
                    let mut core = shell.core.borrow_mut();
                    // What the batch sends to other junctions goes out
                    // together at its end (`flush`).
                    core.hold_transmits();
                    core.handle_frame(conn, frame, at);
                }
                shell.pump_noting(Some(&mut congested));
                // The batch ends when no whole frame is left buffered.
                new_batch = !reader.has_frame();
                let turn_over = frames >= TURN_FRAMES || bytes >= TURN_BYTES;
                let send_on = held_frames >= HOLD_FRAMES || held_bytes >= TURN_BYTES;
                if new_batch || send_on || !congested.is_empty() {
                    shell.flush();
                    (held_frames, held_bytes) = (0, 0);
                } else if turn_over {
                    // Local receivers get what this turn brought; traffic to
                    // other junctions waits for more of the batch.
                    shell.flush_roads();
                }
                // The sender slows down, the receiver is never cut off: wait
                // until each receiver this frame went to over its mark has
                // read down to low water, or is gone.
                for receiver in congested.drain(..) {
                    if receiver != conn {
                        shell.room_in(receiver).await;
                        new_batch = true;
                    }
                }
                if turn_over {
                    frames = 0;
                    bytes = 0;
                    new_batch = true;
                    tokio::task::yield_now().await;
                }
            }
            Ok(None) => {
                tracing::debug!(%conn, "connection closed by the driver");
                shell.disconnected(conn);
                return;
            }
            Err(RoadError::Frame(e)) => {
                shell.refusals.bad_frame.warn(format_args!("{conn}: {e}"));
                shell.core.borrow_mut().handle_frame_error(conn, &e);
                shell.pump();
                shell.flush();
                if e.is_fatal() {
                    return;
                }
            }
            Err(RoadError::Io(e)) => {
                tracing::debug!(%conn, "road failed: {e}");
                shell.disconnected(conn);
                return;
            }
            Err(e) => {
                tracing::debug!(%conn, "road failed: {e}");
                shell.disconnected(conn);
                return;
            }
        }
        if !shell.is_open(conn) {
            return;
        }
    }
}

/// Releases the allocator's free pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only releases memory that is already free; it has
    // no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// The moment, by both clocks, for the core.
fn now() -> Now {
    Now::new(Instant::now(), crate::unix_now())
}

/// Random bytes for a connection's proofs of possession.
fn fresh_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    // Without randomness from the OS no proof could be trusted: stop.
    getrandom::fill(&mut nonce).expect("the operating system provides randomness");
    nonce
}

/// Tells a refused peer why, then hangs up (without waiting on it).
fn refuse_stream(stream: UnixStream, message: String) {
    let frame =
        junction_road::Frame::bare(junction_road::Header::Error(junction_road::ErrorFrame {
            req: 0,
            handle: u32::MAX,
            tag: 0,
            code: junction_road::ErrorCode::NotAllowed,
            message,
        }));
    let mut bytes = bytes::BytesMut::new();
    junction_road::codec::encode(&frame, &mut bytes);
    let _ = stream.try_write(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_list_call_on_the_control_handle_is_a_list_request() {
        use junction_road::control::{CONTROL_HANDLE, ControlRequest};
        use junction_road::{Call, Frame};
        let list = postcard::to_allocvec(&ControlRequest::List).unwrap();
        assert_eq!(list, LIST_REQUEST);
        let call = |handle, payload: &[u8]| {
            Frame::with_payload(
                Header::Call(Call {
                    handle,
                    tag: 1,
                    caps: vec![],
                }),
                bytes::Bytes::copy_from_slice(payload),
            )
        };
        assert!(is_list_request(&call(CONTROL_HANDLE, &list)));
        assert!(!is_list_request(&call(CONTROL_HANDLE, &[2, 1, b'x'])));
        assert!(!is_list_request(&call(7, &list)));
    }
}
