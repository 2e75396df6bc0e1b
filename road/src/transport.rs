//! Async frame readers and writers, and the two local transports.
//!
//! [`RoadReader`] and [`RoadWriter`] work over any byte stream. A Road is made
//! from a Unix socket ([`unix`]) or from stdio pipes ([`stdio`] for the child's
//! side, [`child`] for the parent's).

use std::io;
use std::path::Path;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, FrameError};
use crate::frame::Frame;

use crate::outbox::{COPY_LIMIT, Direct};

/// A link that can lend a second, non-blocking handle on itself for
/// [`crate::outbox::Outbox::flush_direct`].
pub trait DirectLink {
    /// A non-blocking duplicate handle, when the link has one.
    fn direct(&self) -> Option<Direct>;
}

fn pipe_direct(fd: std::os::fd::BorrowedFd<'_>) -> Option<Direct> {
    fd.try_clone_to_owned()
        .ok()
        .map(|fd| Direct::Pipe(std::fs::File::from(fd)))
}

impl DirectLink for tokio::process::ChildStdin {
    fn direct(&self) -> Option<Direct> {
        pipe_direct(std::os::fd::AsFd::as_fd(self))
    }
}

/// The write buffer is flushed once it holds this much.
pub const FLUSH_AT: usize = 64 * 1024;

/// How much a reader asks the socket for at most at a time (more only for a
/// frame that needs it).
const READ_CHUNK: usize = 64 * 1024;

/// How much a new reader asks for: an idle connection (most of them, on a
/// busy junction) keeps a small buffer; a busy one grows it to
/// [`READ_CHUNK`] in a few reads.
const FIRST_READ: usize = 512;

/// Bytes of one large frame a reader takes before letting other tasks run.
const LARGE_READ_TURN: usize = 64 * 1024;

/// Why a Road failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoadError {
    /// The peer's bytes were wrong.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The operating system reported an error on the link.
    #[error("road I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct RoadReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: u32,
    /// How much the next read asks for: doubled while reads fill it.
    chunk: usize,
}

impl<R: AsyncRead + Unpin> RoadReader<R> {
    /// A reader that refuses frames longer than `max_frame`.
    pub fn new(io: R, max_frame: u32) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            max_frame,
            chunk: FIRST_READ,
        }
    }

    /// The link; anything buffered and not yet read as frames is lost.
    pub fn into_inner(self) -> R {
        self.io
    }

    /// The same reader over `f(link)`, keeping what is buffered: for
    /// wrapping a link, e.g. to tie something to its life.
    pub fn map_inner<S>(self, f: impl FnOnce(R) -> S) -> RoadReader<S> {
        RoadReader {
            io: f(self.io),
            buf: self.buf,
            max_frame: self.max_frame,
            chunk: self.chunk,
        }
    }

    /// Changes the largest accepted frame (after the handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The next frame, or `None` when the link closed cleanly between frames.
    ///
    /// A [`FrameError::BadHeader`] error leaves the reader usable; any other
    /// error means the link must close.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, RoadError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            if let Some(len) = codec::peek_length(&self.buf, self.max_frame)?
                && len >= crate::pool::POOLED_FRAME
            {
                return self.read_large(len).await.map(Some);
            }
            if self.fill().await? == 0 {
                codec::check_eof(&self.buf, self.max_frame)?;
                return Ok(None);
            }
        }
    }

    /// Reads a large frame into a buffer of its own, taken from a pool:
    /// its payload lives on in other tasks (queued for a writer) while the
    /// next frames arrive, and reusing buffers spares the page faults of
    /// fresh memory for every large message.
    async fn read_large(&mut self, len: usize) -> Result<Frame, RoadError> {
        let mut body = crate::pool::take(len);
        self.buf.advance(codec::LENGTH_BYTES);
        body.extend_from_slice(&self.buf);
        self.buf.clear();
        let mut since_yield = 0;
        while body.len() < len {
            // One read copies at most a turn's worth: a read syscall is a
            // stretch nothing else on the thread can interrupt.
            let want = (len - body.len()).min(LARGE_READ_TURN);
            let n = self.io.read_buf(&mut (&mut body).limit(want)).await?;
            if n == 0 {
                return Err(FrameError::Truncated {
                    have: codec::LENGTH_BYTES + body.len(),
                    need: codec::LENGTH_BYTES + len,
                }
                .into());
            }
            // A socket that always has more ready never makes this wait:
            // let the other tasks on the thread run between chunks, so one
            // peer's large frames do not hold it for milliseconds.
            since_yield += n;
            if since_yield >= LARGE_READ_TURN {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        Ok(codec::decode_body(crate::pool::into_bytes(body))?)
    }

    /// A frame already buffered, without reading.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        codec::decode(&mut self.buf, self.max_frame)
    }

    /// Whether [`RoadReader::read_frame`] would answer without reading:
    /// a whole frame, or a framing error, is buffered.
    pub fn has_frame(&self) -> bool {
        match codec::peek_length(&self.buf, self.max_frame) {
            Ok(Some(len)) => self.buf.len() >= codec::LENGTH_BYTES + len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Reads once from the link into the buffer; returns the bytes read.
    pub async fn fill(&mut self) -> Result<usize, RoadError> {
        // Reserve room for the whole frame being read, so that a large frame
        // arrives into one allocation rather than a chain of doublings.
        let want = match codec::peek_length(&self.buf, self.max_frame)? {
            Some(len) => (codec::LENGTH_BYTES + len).saturating_sub(self.buf.len()),
            None => 0,
        };
        let asked = want.max(self.chunk);
        self.buf.reserve(asked);
        let n = self.io.read_buf(&mut self.buf).await?;
        if n >= self.chunk {
            // The link had at least as much as was asked for: ask for more.
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
        }
        Ok(n)
    }
}

/// Writes frames to a byte stream, batching small ones into one write.
#[derive(Debug)]
pub struct RoadWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> RoadWriter<W> {
    /// A writer over `io`.
    pub fn new(io: W) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(FLUSH_AT),
        }
    }

    /// Adds a frame to the batch; writes out when the batch is full or the
    /// payload is large. Call [`RoadWriter::flush`] when nothing else is
    /// ready to go.
    pub async fn queue(&mut self, frame: &Frame) -> io::Result<()> {
        self.queue_parts(&frame.header, &frame.payload).await
    }

    /// As [`RoadWriter::queue`], from a header and a payload.
    pub async fn queue_parts(
        &mut self,
        header: &crate::frame::Header,
        payload: &Bytes,
    ) -> io::Result<()> {
        if payload.len() >= COPY_LIMIT {
            codec::encode_header(header, payload.len(), &mut self.buf);
            self.flush_buffer().await?;
            self.io.write_all(payload).await?;
        } else {
            codec::encode_parts(header, payload, &mut self.buf);
            if self.buf.len() >= FLUSH_AT {
                self.flush_buffer().await?;
            }
        }
        Ok(())
    }

    /// Writes one frame and flushes it.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.queue(frame).await?;
        self.flush().await
    }

    /// Bytes waiting in the batch.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes out everything batched.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.flush_buffer().await?;
        self.io.flush().await
    }

    async fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// The link, for handing it to [`crate::outbox::drain`] after the
    /// handshake. Anything batched and not flushed is lost.
    pub fn into_inner(self) -> W {
        self.io
    }

    /// A non-blocking second handle on the link (see [`DirectLink`]).
    pub fn direct(&self) -> Option<Direct>
    where
        W: DirectLink,
    {
        self.io.direct()
    }

    /// Flushes and shuts down the write side.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// The Unix socket transport.
///
/// An idle connection holds one descriptor: the reader, the writer and the
/// outbox's direct path share the socket (an `Arc`), and only the reader is
/// registered with the reactor, for readability. A socket registered for
/// both wakes its process every time the peer drains what it wrote; on a busy
/// machine each such wake-up is a context switch that does nothing. So a
/// write that has to wait borrows a second descriptor (epoll takes a
/// descriptor once, so the writer needs its own number for the same socket),
/// registers it for writability, and closes it again once the batch is
/// written. Without a descriptor to spare (the process is at its limit) the
/// writer polls on a short timer instead: slower, but the connection lives.
pub mod unix {
    use super::*;
    use std::future::Future;
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream as StdStream;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, ready};
    use std::time::Duration;
    use tokio::io::unix::AsyncFd;
    use tokio::io::{Interest, ReadBuf};
    use tokio::net::UnixStream;

    /// How often a writer without a spare descriptor tries a full socket
    /// again.
    const RETRY_FULL: Duration = Duration::from_millis(2);

    /// Both halves of a Unix socket Road.
    pub type Halves = (RoadReader<ReadHalf>, RoadWriter<WriteHalf>);

    /// The read side of a socket Road.
    #[derive(Debug)]
    pub struct ReadHalf {
        fd: AsyncFd<Arc<StdStream>>,
    }

    /// The write side of a socket Road.
    #[derive(Debug)]
    pub struct WriteHalf {
        stream: Arc<StdStream>,
        /// A second descriptor on the socket, registered for writability,
        /// while a batch waits for room; closed when the batch is written.
        waiter: Option<AsyncFd<StdStream>>,
        /// The timer a writer without a spare descriptor waits on.
        retry: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    /// Splits a connected socket into a reader and a writer that share its
    /// one descriptor.
    pub fn split(stream: UnixStream, max_frame: u32) -> io::Result<Halves> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        let stream = Arc::new(stream);
        let reader = crate::sys::register(stream.clone(), Interest::READABLE)?;
        Ok((
            RoadReader::new(ReadHalf { fd: reader }, max_frame),
            RoadWriter::new(WriteHalf {
                stream,
                waiter: None,
                retry: None,
            }),
        ))
    }

    /// How far a socket's directory must be this user's own.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum DirRule {
        /// A directory someone chose (`--socket`, `$JUNCTION_SOCKET`,
        /// `$XDG_RUNTIME_DIR`): owned by this user or root, and writable by
        /// nobody else. Others may list it; they cannot put a socket or a
        /// lock file of theirs in it, or rename it away.
        Safe,
        /// The `$TMPDIR` fallback, made in a directory everyone shares: owned
        /// by this user (not root) and closed to everyone else (mode `0700`
        /// or stricter), as the junction creates it.
        Private,
    }

    /// Why a socket's directory cannot be trusted to hold the junction's
    /// socket: whoever else controls it could put their own socket there,
    /// receive what clients send and relay their proofs.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum SocketDirError {
        /// The directory could not be examined.
        #[error("cannot examine the socket directory {}: {source}", dir.display())]
        Inspect {
            /// The directory.
            dir: std::path::PathBuf,
            /// What the OS said.
            source: io::Error,
        },
        /// The directory could not be created.
        #[error("cannot create the socket directory {}: {source}", dir.display())]
        Create {
            /// The directory.
            dir: std::path::PathBuf,
            /// What the OS said.
            source: io::Error,
        },
        /// The directory is a symbolic link.
        #[error(
            "the socket directory {} is a symbolic link: whoever can change the link can move the socket; give the real directory instead, or remove the link",
            dir.display()
        )]
        Symlink {
            /// The directory.
            dir: std::path::PathBuf,
        },
        /// The path is not a directory.
        #[error("the socket directory {} is not a directory", dir.display())]
        NotADirectory {
            /// The path.
            dir: std::path::PathBuf,
        },
        /// Another user owns the directory (or, for the `$TMPDIR` fallback,
        /// anyone but this user).
        #[error(
            "the socket directory {} belongs to user {owner}, not to this user ({me}){}: its owner could replace the socket; use a directory of your own, such as $XDG_RUNTIME_DIR{}",
            dir.display(),
            if *private { "" } else { " or root" },
            if *private { ", or remove this one and let the junction create it" } else { "" }
        )]
        Owner {
            /// The directory.
            dir: std::path::PathBuf,
            /// Its owner's uid.
            owner: u32,
            /// This process's effective uid.
            me: u32,
            /// Whether the directory had to be private ([`DirRule::Private`]).
            private: bool,
        },
        /// Other users may write in the directory.
        #[error(
            "the socket directory {} can be written by other users (mode {mode:04o}), who could put their own socket there first (a sticky bit does not prevent that); run `chmod go-w {}`, or use a directory of your own such as $XDG_RUNTIME_DIR",
            dir.display(),
            dir.display()
        )]
        Writable {
            /// The directory.
            dir: std::path::PathBuf,
            /// Its permission bits.
            mode: u32,
        },
        /// The `$TMPDIR` fallback directory is open to other users.
        #[error(
            "the socket directory {} must be private to this user but has mode {mode:04o}; run `chmod 700 {}`, or remove it and let the junction create it",
            dir.display(),
            dir.display()
        )]
        NotPrivate {
            /// The directory.
            dir: std::path::PathBuf,
            /// Its permission bits.
            mode: u32,
        },
        /// A directory above the socket's belongs to another user, or others
        /// may write in it without the sticky bit: they could rename the
        /// socket's directory and put another in its place.
        #[error(
            "{} (above the socket directory {}) {}: another user could swap the socket directory for their own; put the socket somewhere else, such as $XDG_RUNTIME_DIR",
            ancestor.display(),
            dir.display(),
            problem
        )]
        Ancestor {
            /// The socket directory.
            dir: std::path::PathBuf,
            /// The directory above it that is not safe.
            ancestor: std::path::PathBuf,
            /// What is wrong with it.
            problem: String,
        },
    }

    /// This process's effective user id: the owner of `/proc/self`.
    pub fn effective_uid() -> io::Result<u32> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata("/proc/self")?.uid())
    }

    /// Checks that `dir`, a socket's directory, is this user's own by
    /// `rule`. Used by clients before they connect and by the junction
    /// before it binds, so both trust the same directories.
    ///
    /// The directory itself is examined without following a link
    /// (`lstat`): a symbolic link is refused, since whoever can change it
    /// can move the socket. Every directory above it (after resolving
    /// links) must belong to this user or root, and be writable by others
    /// only with the sticky bit (as `/tmp` is), so nobody can rename the
    /// socket's directory away. The directory holding the socket itself
    /// gets no such allowance: in a shared sticky directory, anyone can
    /// create the socket's name before the junction does.
    pub fn check_socket_dir(dir: &Path, rule: DirRule) -> Result<(), SocketDirError> {
        use std::os::unix::fs::MetadataExt;
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let inspect = |source| SocketDirError::Inspect {
            dir: dir.to_owned(),
            source,
        };
        let me = effective_uid().map_err(inspect)?;
        let meta = std::fs::symlink_metadata(dir).map_err(inspect)?;
        if meta.file_type().is_symlink() {
            return Err(SocketDirError::Symlink {
                dir: dir.to_owned(),
            });
        }
        if !meta.is_dir() {
            return Err(SocketDirError::NotADirectory {
                dir: dir.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        let private = rule == DirRule::Private;
        if meta.uid() != me && (private || meta.uid() != 0) {
            return Err(SocketDirError::Owner {
                dir: dir.to_owned(),
                owner: meta.uid(),
                me,
                private,
            });
        }
        if private && mode & 0o077 != 0 {
            return Err(SocketDirError::NotPrivate {
                dir: dir.to_owned(),
                mode,
            });
        }
        if mode & 0o022 != 0 {
            return Err(SocketDirError::Writable {
                dir: dir.to_owned(),
                mode,
            });
        }
        let real = std::fs::canonicalize(dir).map_err(inspect)?;
        for ancestor in real.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor).map_err(inspect)?;
            let mode = meta.mode() & 0o7777;
            let problem = if meta.uid() != me && meta.uid() != 0 {
                format!("belongs to user {}", meta.uid())
            } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                format!("can be written by other users (mode {mode:04o}) and is not sticky")
            } else {
                continue;
            };
            return Err(SocketDirError::Ancestor {
                dir: dir.to_owned(),
                ancestor: ancestor.to_owned(),
                problem,
            });
        }
        Ok(())
    }

    /// Raises this process's soft limit on open descriptors to its hard
    /// limit (the common soft limit, 1,024, fits few connections); returns
    /// the limit now in force. Call it once at start.
    pub fn raise_fd_limit() -> io::Result<u64> {
        crate::sys::raise_fd_limit()
    }

    /// Makes `dir` (and missing parents) with mode `0700` if it does not
    /// exist, then checks it by `rule`. The mode is given to `mkdir`
    /// itself, never set afterwards, so there is no moment when the new
    /// directory is open; a directory someone else made first fails the
    /// check.
    pub fn create_socket_dir(dir: &Path, rule: DirRule) -> Result<(), SocketDirError> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.as_os_str().is_empty() {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(SocketDirError::Create {
                        dir: dir.to_owned(),
                        source,
                    });
                }
            }
        }
        check_socket_dir(dir, rule)
    }

    /// Connects to a Junction's socket.
    pub async fn connect(path: &Path, max_frame: u32) -> io::Result<Halves> {
        split(UnixStream::connect(path).await?, max_frame)
    }

    impl AsyncRead for ReadHalf {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            loop {
                let mut guard = ready!(self.fd.poll_read_ready(cx))?;
                let want = buf.remaining();
                match guard.try_io(|fd| crate::sys::read(fd.get_ref().as_fd(), buf)) {
                    Ok(Ok(n)) => {
                        // A short read drained the socket: the next read
                        // would only say "would block", so skip it.
                        if n > 0 && n < want {
                            guard.clear_ready();
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    #[cfg(test)]
    impl ReadHalf {
        pub(crate) fn fd(&self) -> &StdStream {
            self.fd.get_ref()
        }
    }

    #[cfg(test)]
    impl WriteHalf {
        pub(crate) fn fd(&self) -> &StdStream {
            &self.stream
        }

        /// Whether a second descriptor is borrowed for the writability wait.
        pub(crate) fn is_waiting(&self) -> bool {
            self.waiter.is_some()
        }
    }

    impl DirectLink for WriteHalf {
        fn direct(&self) -> Option<Direct> {
            Some(Direct::Socket(self.stream.clone()))
        }
    }

    impl Drop for WriteHalf {
        fn drop(&mut self) {
            // As with tokio's halves: dropping the writer ends the stream for
            // the peer, even though the reader keeps the socket open.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    impl WriteHalf {
        /// Waits until the full socket may have room: on the borrowed
        /// descriptor when one can be had, else on a short timer.
        fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.waiter.is_none() {
                // Failing to borrow a descriptor must not cost the
                // connection: fall back to the timer.
                self.waiter = spare(&self.stream)
                    .and_then(|s| crate::sys::register(s, Interest::WRITABLE))
                    .ok();
                #[cfg(test)]
                if self.waiter.is_some() {
                    BORROWS.set(BORROWS.get() + 1);
                }
            }
            if let Some(waiter) = &self.waiter {
                self.retry = None;
                let mut guard = ready!(waiter.poll_write_ready(cx))?;
                guard.clear_ready();
                return Poll::Ready(Ok(()));
            }
            #[cfg(test)]
            if self.retry.is_none() {
                TIMER_WAITS.set(TIMER_WAITS.get() + 1);
            }
            let retry = self
                .retry
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(RETRY_FULL)));
            ready!(retry.as_mut().poll(cx));
            self.retry = None;
            Poll::Ready(Ok(()))
        }
    }

    /// A second descriptor on `stream`, for the writability wait.
    fn spare(stream: &StdStream) -> io::Result<StdStream> {
        #[cfg(test)]
        if NO_SPARE.get() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        stream.try_clone()
    }

    #[cfg(test)]
    thread_local! {
        /// Lets a test act out a process with no descriptor to spare: when
        /// set, borrowing a second descriptor fails with EMFILE.
        pub(crate) static NO_SPARE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// How often a writer borrowed a second descriptor to wait on.
        pub(crate) static BORROWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// How often a writer waited on the timer instead.
        pub(crate) static TIMER_WAITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    impl AsyncWrite for WriteHalf {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            loop {
                match (&*this.stream).write(data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(this.poll_room(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            // The batch is written: give the borrowed descriptor back, so an
            // idle connection holds one. A batch that waits again borrows
            // anew; beside the wait itself, that is a few system calls.
            let this = self.get_mut();
            this.waiter = None;
            this.retry = None;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.stream.shutdown(Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(())),
            }
        }
    }
}

/// The child's side of a stdio Road: its own stdin and stdout.
pub mod stdio {
    use super::*;
    use std::os::fd::AsFd;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::net::unix::pipe;

    /// The read side: stdin.
    #[derive(Debug)]
    pub enum Input {
        /// stdin is a pipe, read without blocking.
        Pipe(pipe::Receiver),
        /// stdin is something else (a file, a terminal), read on a blocking thread.
        Other(tokio::io::Stdin),
    }

    /// The write side: stdout.
    #[derive(Debug)]
    pub enum Output {
        /// stdout is a pipe, written without blocking.
        Pipe(pipe::Sender),
        /// stdout is something else, written on a blocking thread.
        Other(tokio::io::Stdout),
    }

    /// Both halves of the child's stdio Road.
    pub type Halves = (RoadReader<Input>, RoadWriter<Output>);

    /// This process's stdin and stdout as a Road. Must run inside a tokio
    /// runtime. Nothing else in the process may use stdin or stdout after this.
    pub fn open(max_frame: u32) -> io::Result<Halves> {
        let input = match std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .and_then(pipe::Receiver::from_owned_fd)
        {
            Ok(rx) => Input::Pipe(rx),
            Err(_) => Input::Other(tokio::io::stdin()),
        };
        let output = match std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .and_then(pipe::Sender::from_owned_fd)
        {
            Ok(tx) => Output::Pipe(tx),
            Err(_) => Output::Other(tokio::io::stdout()),
        };
        Ok((RoadReader::new(input, max_frame), RoadWriter::new(output)))
    }

    impl DirectLink for Output {
        fn direct(&self) -> Option<Direct> {
            match self {
                Output::Pipe(p) => pipe_direct(p.as_fd()),
                Output::Other(_) => None,
            }
        }
    }

    impl AsyncRead for Input {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Input::Pipe(p) => Pin::new(p).poll_read(cx, buf),
                Input::Other(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Output {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.get_mut() {
                Output::Pipe(p) => Pin::new(p).poll_write(cx, buf),
                Output::Other(s) => Pin::new(s).poll_write(cx, buf),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Output::Pipe(p) => Pin::new(p).poll_flush(cx),
                Output::Other(s) => Pin::new(s).poll_flush(cx),
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Output::Pipe(p) => Pin::new(p).poll_shutdown(cx),
                Output::Other(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }
}

/// The parent's side of a stdio Road: a spawned child's pipes.
pub mod child {
    use super::*;
    use tokio::process::{ChildStdin, ChildStdout};

    /// Both halves of the parent's side of a child's stdio Road.
    pub type Halves = (RoadReader<ChildStdout>, RoadWriter<ChildStdin>);

    /// A Road over a child's stdout (read) and stdin (write).
    pub fn split(stdout: ChildStdout, stdin: ChildStdin, max_frame: u32) -> Halves {
        (RoadReader::new(stdout, max_frame), RoadWriter::new(stdin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Header, Send};

    #[tokio::test]
    async fn frames_cross_a_socket_pair_in_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, mut wa) = unix::split(a, 1 << 22).unwrap();
        let (mut rb, _wb) = unix::split(b, 1 << 22).unwrap();
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let writer = tokio::spawn(async move {
            for i in 0..100u32 {
                let payload = if i % 10 == 0 {
                    big.clone()
                } else {
                    Bytes::from(i.to_be_bytes().to_vec())
                };
                let f = Frame::with_payload(
                    Header::Send(Send {
                        handle: i,
                        caps: vec![],
                    }),
                    payload,
                );
                wa.queue(&f).await.unwrap();
            }
            wa.shutdown().await.unwrap();
        });
        for i in 0..100u32 {
            let f = rb.read_frame().await.unwrap().unwrap();
            let Header::Send(s) = f.header else {
                panic!("wrong frame")
            };
            assert_eq!(s.handle, i);
            if i % 10 == 0 {
                assert_eq!(f.payload.len(), 1 << 20);
            } else {
                assert_eq!(&f.payload[..], &i.to_be_bytes());
            }
        }
        assert!(rb.read_frame().await.unwrap().is_none());
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn half_a_large_frame_then_close_is_truncated() {
        let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(&100_000u32.to_be_bytes()).await.unwrap();
        a.write_all(&[1u8; 10]).await.unwrap();
        drop(a);
        let (mut rb, _wb) = unix::split(b, 1 << 20).unwrap();
        let err = rb.read_frame().await.unwrap_err();
        assert!(
            matches!(
                err,
                RoadError::Frame(FrameError::Truncated {
                    have: 14,
                    need: 100_004
                })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn half_frame_then_close_is_truncated() {
        let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 20, 1, 2, 3]).await.unwrap();
        drop(a);
        let (mut rb, _wb) = unix::split(b, 1024).unwrap();
        let err = rb.read_frame().await.unwrap_err();
        assert!(
            matches!(
                err,
                RoadError::Frame(FrameError::Truncated { have: 7, need: 24 })
            ),
            "{err:?}"
        );
    }
}

#[cfg(test)]
mod ping_pong_tests {
    use super::*;
    use crate::frame::{Header, Send};

    #[tokio::test]
    async fn many_round_trips_over_split_sockets() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut ra, mut wa) = unix::split(a, 1 << 20).unwrap();
        let (mut rb, mut wb) = unix::split(b, 1 << 20).unwrap();
        let echo = tokio::spawn(async move {
            while let Some(f) = rb.read_frame().await.unwrap() {
                wb.send(&f).await.unwrap();
            }
        });
        let f = Frame::with_payload(
            Header::Send(Send {
                handle: 1,
                caps: vec![],
            }),
            Bytes::from_static(&[7; 64]),
        );
        for _ in 0..1000 {
            wa.send(&f).await.unwrap();
            let back = tokio::time::timeout(std::time::Duration::from_secs(5), ra.read_frame())
                .await
                .expect("no lost wake-up")
                .unwrap()
                .unwrap();
            assert_eq!(back, f);
        }
        wa.shutdown().await.unwrap();
        echo.await.unwrap();
    }
}

#[cfg(test)]
mod descriptor_tests {
    use super::*;
    use crate::outbox;
    use std::os::fd::AsRawFd;

    /// Fills `w`'s socket until a write would wait, while nobody reads.
    async fn write_until_full_then_drain(
        wa: &mut RoadWriter<unix::WriteHalf>,
        rb: &mut RoadReader<unix::ReadHalf>,
    ) {
        let payload = Bytes::from(vec![3u8; 256 * 1024]);
        let frame = Frame::with_payload(
            crate::frame::Header::Send(crate::frame::Send {
                handle: 1,
                caps: vec![],
            }),
            payload,
        );
        // Far more than a socket buffer: the writer must wait for the reader.
        let (sent, read) = tokio::join!(
            async {
                for _ in 0..16 {
                    wa.queue(&frame).await.unwrap();
                }
                wa.flush().await.unwrap();
            },
            async {
                for _ in 0..16 {
                    let f = rb.read_frame().await.unwrap().unwrap();
                    assert_eq!(f.payload.len(), 256 * 1024);
                }
            }
        );
        let ((), ()) = (sent, read);
    }

    #[tokio::test]
    async fn reader_writer_and_direct_path_share_one_descriptor() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let (reader, writer) = unix::split(a, 1 << 20).unwrap();
        let Some(outbox::Direct::Socket(direct)) = writer.direct() else {
            panic!("a socket link has a direct path")
        };
        let fd = direct.as_raw_fd();
        assert_eq!(reader.into_inner().fd().as_raw_fd(), fd);
        assert_eq!(writer.into_inner().fd().as_raw_fd(), fd);
    }

    #[tokio::test]
    async fn a_writer_that_waited_gives_its_second_descriptor_back() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, mut wa) = unix::split(a, 1 << 22).unwrap();
        let (mut rb, _wb) = unix::split(b, 1 << 22).unwrap();
        write_until_full_then_drain(&mut wa, &mut rb).await;
        assert!(unix::BORROWS.get() > 0, "the writer had to wait");
        assert!(
            !wa.into_inner().is_waiting(),
            "the borrowed descriptor is closed once the batch is written"
        );
    }

    #[tokio::test]
    async fn a_writer_with_no_descriptor_to_spare_still_delivers() {
        unix::NO_SPARE.set(true);
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, mut wa) = unix::split(a, 1 << 22).unwrap();
        let (mut rb, _wb) = unix::split(b, 1 << 22).unwrap();
        write_until_full_then_drain(&mut wa, &mut rb).await;
        unix::NO_SPARE.set(false);
        assert!(
            unix::TIMER_WAITS.get() > 0,
            "the writer had to wait, and waited on the timer"
        );
        assert!(!wa.into_inner().is_waiting());
    }
}
