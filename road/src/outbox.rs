//! The outbox: frames waiting to be written to one Road, already encoded.
//!
//! Whoever produces frames encodes them straight into the outbox (small
//! payloads are copied in; large ones are queued by reference), and one
//! writer task drains it to the link, taking everything queued in one go.
//! Producing a frame costs an encode and, at most, one wake-up of an idle
//! writer: no channel, no per-frame allocation, and as many frames per write
//! as were ready.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::codec;
use crate::frame::Header;

/// Payloads at least this large are queued by reference, not copied.
pub const COPY_LIMIT: usize = 16 * 1024;

/// Encoded frames waiting for a writer.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Small frames, encoded back to back.
    staging: BytesMut,
    /// Encoded data ahead of `staging`, in order: runs of small frames and
    /// large payloads.
    pending: VecDeque<Bytes>,
    /// Bytes in `staging` and `pending`.
    queued: usize,
    waker: Option<Waker>,
    closed: bool,
    /// A second handle on the link, for writing without waking the writer.
    direct: Option<Direct>,
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
    pub fn push_quiet(&mut self, header: &Header, payload: &Bytes) {
        if self.closed {
            return;
        }
        let before = self.staging.len();
        if payload.len() >= COPY_LIMIT {
            codec::encode_header(header, payload.len(), &mut self.staging);
            self.pending.push_back(self.staging.split().freeze());
            self.pending.push_back(payload.clone());
            self.queued += payload.len();
        } else {
            codec::encode_parts(header, payload, &mut self.staging);
        }
        self.queued += self.staging.len().saturating_sub(before);
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
        let Some(direct) = &self.direct else {
            return self.waker.take();
        };
        if !self.pending.is_empty() {
            return self.waker.take();
        }
        while !self.staging.is_empty() {
            match direct.try_write(&self.staging) {
                Ok(n) if n > 0 => self.staging.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full, closed or failing: the writer finds out and reports.
                _ => return self.waker.take(),
            }
        }
        self.staging.clear();
        self.queued = 0;
        None
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// No more frames: the writer writes what is queued, then shuts the link
    /// down. Returns the writer's waker, as [`Outbox::push`] does.
    #[must_use = "wake the returned waker, or the writer sleeps on"]
    pub fn close(&mut self) -> Option<Waker> {
        self.closed = true;
        self.waker.take()
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// For the writer: moves everything queued into `batch`, or registers
    /// the writer's waker when nothing is. `Ready(false)` means closed and
    /// drained.
    pub fn poll_take(&mut self, cx: &mut Context<'_>, batch: &mut VecDeque<Bytes>) -> Poll<bool> {
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
        self.queued = 0;
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
pub async fn drain<S: SharedOutbox, W: AsyncWrite + Unpin>(outbox: S, mut io: W) -> io::Result<()> {
    let mut batch = VecDeque::new();
    loop {
        let open = std::future::poll_fn(|cx| outbox.with(|o| o.poll_take(cx, &mut batch))).await;
        if !open {
            io.flush().await?;
            return io.shutdown().await;
        }
        while let Some(chunk) = batch.pop_front() {
            io.write_all(&chunk).await?;
        }
        io.flush().await?;
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
}
