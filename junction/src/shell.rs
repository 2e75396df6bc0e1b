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

use junction_road::outbox::{self, Outbox, SharedOutbox};
use junction_road::transport::{child as child_road, unix as unix_road};
use junction_road::{DirectLink, Header, RoadError, RoadReader, RoadWriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::children::{self, Child};
use crate::core::{self, ConnId, Core, Now, Output, Peer};

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
    /// Connections the junction serves at once; more are turned away.
    pub max_connections: usize,
    /// Bytes queued for a connection above which the junction stops taking
    /// new requests from it and pauses those who send to it (at least two
    /// maximum frames). They go on once it has read half.
    pub max_unread: usize,
    /// How long a connection's writer may make no progress while bytes wait
    /// for it before the connection is cut off and what it holds is freed.
    pub write_timeout: Duration,
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
}

/// Cheap handle for controlling a running junction from inside its thread.
struct Shell {
    core: RefCell<Core>,
    allow_uids: Vec<u32>,
    max_connections: usize,
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
}

struct ConnSlot {
    id: ConnId,
    outbox: Rc<RefCell<Outbox>>,
    dirty: bool,
    reader: Option<tokio::task::AbortHandle>,
    writer: Option<tokio::task::AbortHandle>,
}

/// Owns the socket path and its lock; removes the socket when dropped.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    _lock: File,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Claims `path` for this junction: takes the lock next to it (refusing if
/// another junction holds it), replaces a stale socket, binds and restricts
/// the socket to its owner.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        unix_road::check_owner(dir).map_err(listen_err)?;
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(listen_err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(ServeError::AlreadyRunning {
                path: path.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(listen_err(e)),
    }
    // We hold the lock, so a socket file here is left over from a junction
    // that died without cleaning up.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::AlreadyRunning {
                path: path.to_owned(),
            });
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket left by a junction that died");
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            _lock: lock,
        },
    ))
}

/// Runs a junction until `shutdown` resolves; then says goodbye to every
/// driver, ends the children and removes the socket.
///
/// Must be called inside a `LocalSet` on a current-thread runtime.
pub async fn serve(
    config: ServeConfig,
    listener: UnixListener,
    guard: SocketGuard,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    // Two frames, so that one can be written while the next waits.
    let high_water = config.max_unread.max(2 * config.core.max_frame as usize);
    let shell = Rc::new(Shell {
        max_frame: config.core.max_frame,
        core: RefCell::new(Core::new(config.core.clone(), now())),
        allow_uids: config.allow_uids.clone(),
        max_connections: config.max_connections,
        high_water,
        low_water: high_water / 2,
        write_timeout: config.write_timeout,
        trim_pending: Cell::new(false),
        conns: RefCell::new(Vec::new()),
        dirty: RefCell::new(Vec::new()),
        timer: tokio::sync::Notify::new(),
        armed: Cell::new(None),
    });
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
                shell.reload_revocations(&config);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    writers.retain(|w| !w.is_finished());
                    writers.extend(shell.accept(stream));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait, don't spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down: telling drivers, ending children");
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

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

impl Shell {
    fn accept(self: &Rc<Self>, stream: UnixStream) -> Option<JoinHandle<()>> {
        let cred = stream.peer_cred().ok();
        if self.core.borrow().connections() >= self.max_connections {
            tracing::warn!(
                pid = ?cred.and_then(|c| c.pid()),
                "turned a connection away: {} connections is the limit",
                self.max_connections
            );
            refuse_stream(
                stream,
                "this junction serves as many connections as it may; try again later".into(),
            );
            return None;
        }
        if !self.allow_uids.is_empty() {
            let uid = cred.map(|c| c.uid());
            if !uid.is_some_and(|u| self.allow_uids.contains(&u)) {
                let pid = cred.and_then(|c| c.pid());
                tracing::warn!(
                    ?uid,
                    ?pid,
                    "refused a connection from a user not in allow_uids"
                );
                refuse_stream(
                    stream,
                    format!(
                        "user {} may not use this junction (allow_uids)",
                        uid.map_or("unknown".to_string(), |u| u.to_string())
                    ),
                );
                return None;
            }
        }
        let peer = Peer {
            nonce: fresh_nonce(),
            road: "unix",
            pid: cred
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok()),
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
        };
        match unix_road::split(stream, self.max_frame) {
            Ok((reader, writer)) => Some(self.attach(peer, reader, writer)),
            Err(e) => {
                tracing::warn!("cannot set up an accepted connection: {e}");
                None
            }
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

    fn reload_revocations(&self, config: &ServeConfig) {
        let Some(path) = &config.revocations_path else {
            tracing::info!("SIGHUP: no revocation list configured, nothing to reload");
            return;
        };
        match crate::config::load_revocations(path, &config.core.trust) {
            Ok(list) => {
                let revoked = list.body.serials.len() + list.body.keys.len();
                let mut core = self.core.borrow_mut();
                match core.set_revocations(Some(list), now()) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), revoked, "SIGHUP: revocation list reloaded")
                    }
                    Err(e) => tracing::error!("SIGHUP: keeping the old revocation list: {e}"),
                }
            }
            Err(e) => tracing::error!("SIGHUP: keeping the old revocation list: {e}"),
        }
        self.pump();
        self.flush();
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
                        let metered = matches!(&frame.header, Header::Deliver(d) if d.tag == 0);
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

    /// Ends a batch: every link with queued frames writes them, directly if
    /// its writer is idle; the main loop hears if the core needs waking
    /// sooner than it planned.
    fn flush(&self) {
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

/// Frames one reader handles in a turn before it lets the other tasks run,
/// so that a connection that floods the junction gets its turn, not the
/// whole thread.
const TURN_FRAMES: usize = 64;
/// Payload bytes one reader handles in a turn, as [`TURN_FRAMES`].
const TURN_BYTES: usize = 256 * 1024;

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
                shell.core.borrow_mut().handle_frame(conn, frame, at);
                shell.pump_noting(Some(&mut congested));
                // The batch ends when no whole frame is left buffered.
                new_batch = !reader.has_frame();
                let turn_over = frames >= TURN_FRAMES || bytes >= TURN_BYTES;
                if new_batch || turn_over || !congested.is_empty() {
                    shell.flush();
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
                tracing::warn!(%conn, "bad frame: {e}");
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
