//! The outbox: frames waiting to be written to one Road, already encoded.
//!
//! Whoever produces frames encodes them straight into the outbox (small
//! payloads are copied in; large ones are queued by reference), and one
//! writer task drains it to the link, taking everything queued in one go.
//! Producing a frame costs an encode and, at most, one wake-up of an idle
//! writer: no channel, no per-frame allocation, and as many frames per write
//! as were ready.
//!
//! The outbox also keeps the books a flow-controlled owner needs: what it
//! counts as queued stays counted until the writer has written it, tasks can
//! wait for the queue to fall below a mark ([`Outbox::poll_below`]), and a
//! writer can be given a progress deadline ([`drain_within`]).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Write};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::codec;
use crate::frame::Header;

/// Payloads at least this large are queued by reference, not copied.
pub const COPY_LIMIT: usize = 16 * 1024;

/// The most one write hands the link before the writer lets the other tasks
/// on its thread run.
const WRITE_TURN: usize = 64 * 1024;

/// Encoded frames waiting for a writer.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Small frames, encoded back to back.
    staging: BytesMut,
    /// Encoded data ahead of `staging`, in order: runs of small frames and
    /// large payloads.
    pending: VecDeque<Bytes>,
    /// Bytes in `staging` and `pending`, and those the writer took and has
    /// not written yet.
    queued: usize,
    waker: Option<Waker>,
    /// Tasks waiting for `queued` to fall below `room_mark`.
    room: Vec<Waker>,
    room_mark: usize,
    closed: bool,
    /// A second handle on the link, for writing without waking the writer.
    direct: Option<Direct>,
    /// The last frame in `staging`, when it is a `Credit`: its port, its
    /// count and where it starts. A `Credit` for the same port that follows
    /// it is added to it instead of queued behind it.
    last_credit: Option<(u16, u32, usize)>,
}

/// A non-blocking handle on a link that [`Outbox::flush_direct`] writes
/// through while the writer task is idle.
#[derive(Debug)]
#[non_exhaustive]
pub enum Direct {
    /// A Unix socket, shared with the link's reader and writer (written with
    /// `MSG_NOSIGNAL`, so a closed peer is an error, not a signal).
    Socket(std::sync::Arc<std::os::unix::net::UnixStream>),
    /// A pipe.
    Pipe(std::fs::File),
}

impl Direct {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Direct::Socket(s) => (&**s).write(buf),
            Direct::Pipe(f) => (&*f).write(buf),
        }
    }
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty outbox that can also write to its link directly, through
    /// `direct`, a non-blocking handle on the same link.
    pub fn with_direct(direct: Direct) -> Self {
        Self {
            direct: Some(direct),
            ..Self::default()
        }
    }

    /// Encodes a frame into the outbox and returns the writer's waker when
    /// the writer was idle: wake it once the outbox is unlocked.
    #[must_use = "wake the returned waker, or the writer sleeps on"]
    pub fn push(&mut self, header: &Header, payload: &Bytes) -> Option<Waker> {
        self.push_quiet(header, payload);
        self.waker.take()
    }

    /// Encodes a frame into the outbox without waking the writer: call
    /// [`Outbox::flush_direct`] when the batch is complete.
    ///
    /// A `Credit` right behind an unwritten `Credit` for the same port is
    /// merged into it: one frame counting both, as the Road's rules allow
    /// (a count covers everything consumed before it). An application that
    /// reads faster than its link writes then sends one `Credit` per write,
    /// not one per message that asked for an ack.
    pub fn push_quiet(&mut self, header: &Header, payload: &Bytes) {
        if self.closed {
            return;
        }
        if let Header::Credit { port, count } = *header {
            let (count, start) = match self.last_credit.take() {
                Some((last, queued, start)) if last == port => match queued.checked_add(count) {
                    Some(sum) => {
                        self.queued -= self.staging.len() - start;
                        self.staging.truncate(start);
                        (sum, start)
                    }
                    None => (count, self.staging.len()),
                },
                _ => (count, self.staging.len()),
            };
            codec::encode_parts(
                &Header::Credit { port, count },
                &Bytes::new(),
                &mut self.staging,
            );
            self.queued += self.staging.len() - start;
            self.last_credit = Some((port, count, start));
            return;
        }
        self.last_credit = None;
        let before = self.staging.len();
        if payload.len() >= COPY_LIMIT {
            codec::encode_header(header, payload.len(), &mut self.staging);
            // Counted before the split, so that the header is too.
            self.queued += self.staging.len() - before + payload.len();
            self.pending.push_back(self.staging.split().freeze());
            self.pending.push_back(payload.clone());
        } else {
            codec::encode_parts(header, payload, &mut self.staging);
            self.queued += self.staging.len() - before;
        }
    }

    /// Ends a batch: while the writer is idle and only small frames are
    /// queued, writes them to the link right here, saving the writer's
    /// wake-up; otherwise (or when the link is full) returns the writer's
    /// waker to hand it the rest.
    #[must_use = "wake the returned waker, or the writer sleeps on"]
    pub fn flush_direct(&mut self) -> Option<Waker> {
        if self.queued == 0 || self.waker.is_none() {
            // Nothing to do, or the writer is awake and will take it.
            return None;
        }
        if self.direct.is_none() || !self.pending.is_empty() {
            return self.waker.take();
        }
        self.last_credit = None;
        while !self.staging.is_empty() {
            let Some(direct) = &self.direct else { break };
            match direct.try_write(&self.staging) {
                Ok(n) if n > 0 => {
                    self.staging.advance(n);
                    self.wrote(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full, closed or failing: the writer finds out and reports.
                _ => return self.waker.take(),
            }
        }
        self.staging.clear();
        None
    }

    /// Bytes queued and not yet written, including those the writer holds.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// For the writer: `n` bytes it took have reached the link. Wakes the
    /// tasks waiting in [`Outbox::poll_below`] once the queue is below their
    /// mark (tokio's wakers only schedule, so waking under a lock is safe).
    pub fn wrote(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
        if self.queued < self.room_mark {
            self.wake_room();
        }
    }

    /// Ready once fewer than `mark` bytes are queued, or the outbox is
    /// closed (nobody will be sent more); otherwise registers the task to
    /// be woken then. All waiters share one mark: the latest given.
    pub fn poll_below(&mut self, cx: &mut Context<'_>, mark: usize) -> Poll<()> {
        if self.queued < mark || self.closed {
            return Poll::Ready(());
        }
        self.room_mark = mark;
        if !self.room.iter().any(|w| w.will_wake(cx.waker())) {
            self.room.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn wake_room(&mut self) {
        for waker in self.room.drain(..) {
            waker.wake();
        }
    }

    /// No more frames: the writer writes what is queued, then shuts the link
    /// down. Returns the writer's waker, as [`Outbox::push`] does; tasks
    /// waiting for room are woken here.
    #[must_use = "wake the returned waker, or the writer sleeps on"]
    pub fn close(&mut self) -> Option<Waker> {
        self.closed = true;
        self.wake_room();
        self.waker.take()
    }

    /// No more frames, and those queued are dropped unwritten: for a link
    /// that is being given up on. Frees the queue's memory (bytes the writer
    /// already took go with the writer) and wakes everyone waiting.
    #[must_use = "wake the returned waker, or the writer sleeps on"]
    pub fn abandon(&mut self) -> Option<Waker> {
        self.last_credit = None;
        self.staging = BytesMut::new();
        self.pending = VecDeque::new();
        self.queued = 0;
        self.close()
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// For the writer: moves everything queued into `batch`, or registers
    /// the writer's waker when nothing is. `Ready(false)` means closed and
    /// drained. The bytes stay counted as queued until the writer reports
    /// them written ([`Outbox::wrote`]).
    pub fn poll_take(&mut self, cx: &mut Context<'_>, batch: &mut VecDeque<Bytes>) -> Poll<bool> {
        self.last_credit = None;
        if !self.staging.is_empty() {
            self.pending.push_back(self.staging.split().freeze());
        }
        if self.pending.is_empty() {
            if self.closed {
                return Poll::Ready(false);
            }
            self.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        batch.append(&mut self.pending);
        Poll::Ready(true)
    }
}

/// Shared access to an outbox: a `RefCell` on one thread, a `Mutex` across
/// threads.
pub trait SharedOutbox {
    /// Runs `f` with the outbox borrowed.
    fn with<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R;

    /// Encodes a frame into the outbox and wakes an idle writer.
    fn push(&self, header: &Header, payload: &Bytes) {
        if let Some(waker) = self.with(|o| o.push(header, payload)) {
            waker.wake();
        }
    }

    /// Ends a batch of [`Outbox::push_quiet`]s (see [`Outbox::flush_direct`]).
    fn flush_direct(&self) {
        if let Some(waker) = self.with(Outbox::flush_direct) {
            waker.wake();
        }
    }

    /// Closes the outbox and wakes the writer to finish.
    fn close(&self) {
        if let Some(waker) = self.with(Outbox::close) {
            waker.wake();
        }
    }

    /// Abandons the outbox (see [`Outbox::abandon`]) and wakes the writer.
    fn abandon(&self) {
        if let Some(waker) = self.with(Outbox::abandon) {
            waker.wake();
        }
    }
}

impl SharedOutbox for std::rc::Rc<std::cell::RefCell<Outbox>> {
    fn with<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        f(&mut self.borrow_mut())
    }
}

impl SharedOutbox for std::sync::Arc<std::sync::Mutex<Outbox>> {
    fn with<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        // The outbox holds only bytes; a panic elsewhere cannot leave it torn.
        f(&mut self.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The writer: drains `outbox` into `io` until the outbox is closed and
/// empty (then shuts the link down) or the link fails.
pub async fn drain<S: SharedOutbox, W: AsyncWrite + Unpin>(outbox: S, io: W) -> io::Result<()> {
    drain_within(outbox, io, None).await
}

/// As [`drain`], with a progress deadline: when the link takes nothing for
/// `limit` while bytes wait (a peer that stopped reading), the writer gives
/// up with [`io::ErrorKind::TimedOut`], dropping what it holds. Idle time
/// with nothing queued does not count.
pub async fn drain_within<S: SharedOutbox, W: AsyncWrite + Unpin>(
    outbox: S,
    mut io: W,
    limit: Option<Duration>,
) -> io::Result<()> {
    let mut batch = VecDeque::new();
    loop {
        let open = std::future::poll_fn(|cx| outbox.with(|o| o.poll_take(cx, &mut batch))).await;
        if !open {
            within(limit, io.flush()).await?;
            return within(limit, io.shutdown()).await;
        }
        while let Some(mut chunk) = batch.pop_front() {
            while !chunk.is_empty() {
                // One write copies at most a turn's worth, and the writer
                // lets the other tasks on the thread run between turns: a
                // peer that reads as fast as this writes never makes it
                // wait, and a 4 MiB payload must not hold the thread.
                let piece = chunk.len().min(WRITE_TURN);
                let n = within(limit, io.write(&chunk[..piece])).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                chunk.advance(n);
                // Counted per write, not per batch: waiters for room hear
                // as soon as there is some.
                outbox.with(|o| o.wrote(n));
                if n == piece && !chunk.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
        }
        within(limit, io.flush()).await?;
    }
}

/// Runs one write step with a deadline, when there is one. Most steps finish
/// at the first poll; only one that has to wait is given a timer.
async fn within<T>(
    limit: Option<Duration>,
    step: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let mut step = std::pin::pin!(step);
    let Some(limit) = limit else {
        return step.await;
    };
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(step.as_mut().poll(cx))).await
    {
        return done;
    }
    match tokio::time::timeout(limit, step).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took nothing for {} ms", limit.as_millis()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, Send};
    use crate::transport::unix;

    #[tokio::test]
    async fn small_and_large_frames_arrive_in_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, wa) = unix::split(a, 1 << 22).unwrap();
        let (mut rb, _wb) = unix::split(b, 1 << 22).unwrap();
        let outbox = std::sync::Arc::new(std::sync::Mutex::new(Outbox::new()));
        let writer = tokio::spawn(drain(outbox.clone(), wa.into_inner()));
        let big = Bytes::from(vec![9u8; 100_000]);
        for i in 0..50u32 {
            let payload = if i % 7 == 0 {
                big.clone()
            } else {
                Bytes::from(i.to_be_bytes().to_vec())
            };
            outbox.push(
                &Header::Send(Send {
                    handle: i,
                    caps: vec![],
                }),
                &payload,
            );
        }
        outbox.close();
        for i in 0..50u32 {
            let f: Frame = rb.read_frame().await.unwrap().unwrap();
            assert!(matches!(f.header, Header::Send(Send { handle, .. }) if handle == i));
            assert_eq!(f.payload.len(), if i % 7 == 0 { 100_000 } else { 4 });
        }
        assert!(
            rb.read_frame().await.unwrap().is_none(),
            "closing shuts the link down"
        );
        writer.await.unwrap().unwrap();
    }

    /// The frames an outbox holds, decoded.
    fn frames_in(outbox: &mut Outbox) -> Vec<Header> {
        let mut batch = VecDeque::new();
        let waker = std::task::Waker::noop();
        let _ = outbox.poll_take(&mut Context::from_waker(waker), &mut batch);
        let mut bytes = BytesMut::new();
        for b in batch {
            bytes.extend_from_slice(&b);
        }
        let queued = outbox.queued();
        assert_eq!(queued, bytes.len(), "every byte counted once");
        outbox.wrote(queued);
        std::iter::from_fn(|| codec::decode(&mut bytes, 1 << 20).unwrap())
            .map(|f| f.header)
            .collect()
    }

    #[test]
    fn a_credit_behind_an_unwritten_credit_for_its_port_is_added_to_it() {
        let mut outbox = Outbox::new();
        let credit = |port, count| Header::Credit { port, count };
        let none = Bytes::new();
        for count in [1, 3, 300] {
            outbox.push_quiet(&credit(2, count), &none);
        }
        assert_eq!(frames_in(&mut outbox), [credit(2, 304)]);
        // Another port, or any other frame, between them keeps them apart.
        outbox.push_quiet(&credit(2, 1), &none);
        outbox.push_quiet(&credit(3, 1), &none);
        outbox.push_quiet(&credit(2, 1), &none);
        outbox.push_quiet(&Header::Ping { nonce: 7 }, &none);
        outbox.push_quiet(&credit(2, 1), &none);
        outbox.push_quiet(&credit(2, u32::MAX), &none);
        assert_eq!(
            frames_in(&mut outbox),
            [
                credit(2, 1),
                credit(3, 1),
                credit(2, 1),
                Header::Ping { nonce: 7 },
                credit(2, 1),
                credit(2, u32::MAX),
            ],
            "a sum past u32 is not merged"
        );
        // What the writer took is not changed after.
        outbox.push_quiet(&credit(2, 1), &none);
        let mut batch = VecDeque::new();
        let _ = outbox.poll_take(
            &mut Context::from_waker(std::task::Waker::noop()),
            &mut batch,
        );
        outbox.push_quiet(&credit(2, 1), &none);
        let taken = batch.iter().map(|b| b.len()).sum::<usize>();
        outbox.wrote(taken);
        assert_eq!(frames_in(&mut outbox), [credit(2, 1)]);
    }

    /// Counts its wake-ups.
    struct Flag(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn bytes_stay_queued_until_written_and_waiters_hear_of_room() {
        let mut outbox = Outbox::new();
        let header = Header::Send(Send {
            handle: 1,
            caps: vec![],
        });
        outbox.push_quiet(&header, &Bytes::from(vec![1u8; 100_000]));
        let full = outbox.queued();
        assert!(full > 100_000);

        let writer = Waker::noop();
        let mut batch = VecDeque::new();
        assert_eq!(
            outbox.poll_take(&mut Context::from_waker(writer), &mut batch),
            Poll::Ready(true)
        );
        assert_eq!(outbox.queued(), full, "taken is not yet written");

        let flag = std::sync::Arc::new(Flag(0.into()));
        let waiter = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waiter);
        assert_eq!(outbox.poll_below(&mut cx, full / 2), Poll::Pending);
        outbox.wrote(full / 4);
        assert_eq!(flag.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        outbox.wrote(full / 2);
        assert_eq!(flag.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(outbox.poll_below(&mut cx, full / 2), Poll::Ready(()));

        // Abandoning frees the queue and releases every waiter.
        outbox.push_quiet(&header, &Bytes::from(vec![1u8; 100_000]));
        assert_eq!(outbox.poll_below(&mut cx, 1), Poll::Pending);
        let _ = outbox.abandon();
        assert_eq!(outbox.queued(), 0);
        assert_eq!(flag.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(outbox.poll_below(&mut cx, 1), Poll::Ready(()));
    }

    #[tokio::test]
    async fn a_writer_whose_peer_never_reads_gives_up_at_its_deadline() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, wa) = unix::split(a, 1 << 22).unwrap();
        let outbox = std::sync::Arc::new(std::sync::Mutex::new(Outbox::new()));
        // Far more than a socket buffer holds; the peer reads none of it.
        for _ in 0..16 {
            outbox.push(
                &Header::Send(Send {
                    handle: 1,
                    caps: vec![],
                }),
                &Bytes::from(vec![0u8; 1 << 20]),
            );
        }
        let limit = Some(std::time::Duration::from_millis(100));
        let err = drain_within(outbox.clone(), wa.into_inner(), limit)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let left = outbox.with(|o| o.queued());
        assert!(
            left > 0 && left < 16 << 20,
            "what was written is counted off: {left} left"
        );
    }
}
