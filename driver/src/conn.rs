//! The tokio shell around the protocol [`Machine`]: a reader task that feeds
//! it frames, a writer task that drains the frames it queues, and the
//! handles (ports, capabilities, replies) whose methods are its commands.
//!
//! Every decision lives in the machine. The shell keeps it behind one mutex
//! together with what waits on it (request and call answers, credit and
//! death signals), so a command and the frames it queues, or a frame and the
//! waiters it wakes, are one step; frames leave the machine for the outbox
//! in order under that same lock. The reader owns the ports' queues and
//! fills them once the lock is released.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use junction_road::control::CONTROL_HANDLE;
use junction_road::frame::{MAX_CAPS_PER_MESSAGE, credit_cost};
use junction_road::outbox::{self, Outbox, SharedOutbox};
use junction_road::{
    Address, DirectLink, ErrorCode, Frame, Granted, Identity, Reason, Rights, RoadReader,
    RoadWriter, Welcome,
};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::Error;
use crate::machine::{CommandError, Event, Machine};

/// The state one connection's handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) welcome: Welcome,
    outbox: Arc<Mutex<Outbox>>,
    inner: Mutex<Inner>,
    closed: watch::Sender<Option<String>>,
    notices: tokio::sync::Mutex<mpsc::UnboundedReceiver<Notice>>,
    notices_tx: mpsc::UnboundedSender<Notice>,
}

/// The machine and everything waiting on it, under one lock. Nothing whose
/// drop takes this lock (a [`Capability`], a [`Port`], a [`Message`]) may be
/// dropped while it is held: such values are set aside and dropped after.
///
/// Keys are ids this driver or its junction chose, so a fast non-keyed hash
/// is safe.
#[derive(Debug)]
struct Inner {
    machine: Machine,
    requests: FxHashMap<u32, oneshot::Sender<Result<Answer, Error>>>,
    calls: FxHashMap<u64, oneshot::Sender<Result<Message, Error>>>,
    caps: FxHashMap<u32, Arc<Signals>>,
    /// Credit waiters by lane: every capability to one port shares one.
    lanes: FxHashMap<Address, Arc<LaneSignal>>,
    pings: FxHashMap<u64, oneshot::Sender<()>>,
    no_senders: FxHashMap<u16, oneshot::Sender<()>>,
}

/// The answer to a request, built by the reader when it arrives.
#[derive(Debug)]
pub(crate) enum Answer {
    Port(Port),
    Cap(Capability),
}

/// What a capability's waiters listen to. Kept apart from [`CapInner`]
/// because dropping it takes no lock.
#[derive(Debug)]
struct Signals {
    /// The lane it spends the credit of.
    lane: Arc<LaneSignal>,
    dead: watch::Sender<Option<Reason>>,
}

/// What senders waiting for credit on one lane listen to.
#[derive(Debug, Default)]
struct LaneSignal {
    /// Woken when send credit comes back to the lane, a capability on it
    /// dies, or the connection closes.
    credit: Notify,
    /// Senders waiting on `credit`: credit that comes back while none
    /// waits (the common case) wakes nobody and costs no lock.
    waiting: AtomicUsize,
}

/// What [`Shared::transmit`] leaves to do once the lock is released.
#[derive(Debug)]
enum Queued {
    Nothing,
    /// Wake the idle writer.
    Wake(std::task::Waker),
    /// Write the batch from this task (calls and replies).
    Direct,
}

/// One sender counted in [`Signals::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Values the reader could not hand over, dropped once the lock is free.
#[derive(Debug)]
#[expect(dead_code, reason = "held only to be dropped outside the lock")]
enum Leftover {
    Answer(Result<Answer, Error>),
    Message(Result<Message, Error>),
}

/// What only the reader task touches: the sending halves of the ports'
/// queues, and what it hands them once the lock is released.
#[derive(Debug, Default)]
struct Reader {
    ports: FxHashMap<u16, mpsc::UnboundedSender<(Message, bool)>>,
    /// Reused from one batch to the next: no allocation per message.
    handoffs: Vec<Handoff>,
}

/// One step of the reader after the lock, in the order the machine gave.
#[derive(Debug)]
enum Handoff {
    Deliver(u16, Message, bool),
    /// The port is closed: its queue ends.
    Unhook(u16),
    /// A call's end.
    Call(
        oneshot::Sender<Result<Message, Error>>,
        Result<Message, Error>,
    ),
    /// A request's answer.
    Answer(
        oneshot::Sender<Result<Answer, Error>>,
        Result<Answer, Error>,
    ),
    /// A pong or a no-senders notice.
    Signal(oneshot::Sender<()>),
    /// Credit came back for a capability someone waits on.
    Credit(Arc<LaneSignal>),
}

/// Something the Junction reported outside any request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Notice {
    /// Messages sent on a capability were not delivered. Also reported for
    /// a capability dropped since.
    Undeliverable {
        /// The capability's handle.
        handle: u32,
        /// The address of the port they were for, when still known.
        address: Option<Address>,
        /// Sequence number of the first (as [`crate::Driver::send`] returned it).
        first_seq: u64,
        /// How many consecutive messages.
        count: u32,
        /// Why.
        reason: Reason,
    },
    /// The Junction refused a frame that answered no request.
    Error {
        /// The handle concerned, if any.
        handle: Option<u32>,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// This connection's proven identity was taken away: its certificate
    /// was revoked (the junction reloaded its revocation list) or expired.
    /// The names it had registered are gone with it; the connection and
    /// its ports live on, anonymous. A service should stop, or get a new
    /// certificate and connect again.
    IdentityWithdrawn {
        /// The names lost with it.
        names: Vec<junction_identity::ServiceName>,
        /// Why, for people.
        reason: String,
    },
}

impl Shared {
    pub(crate) fn start<R, W>(
        reader: RoadReader<R>,
        writer: RoadWriter<W>,
        welcome: Welcome,
    ) -> Arc<Shared>
    where
        R: AsyncRead + Unpin + std::marker::Send + 'static,
        W: AsyncWrite + DirectLink + Unpin + std::marker::Send + 'static,
    {
        let outbox = Arc::new(Mutex::new(match writer.direct() {
            Some(direct) => Outbox::with_direct(direct),
            None => Outbox::new(),
        }));
        let (notices_tx, notices_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                machine: Machine::from_welcome(welcome.clone()),
                requests: FxHashMap::default(),
                calls: FxHashMap::default(),
                caps: FxHashMap::default(),
                lanes: FxHashMap::default(),
                pings: FxHashMap::default(),
                no_senders: FxHashMap::default(),
            }),
            welcome,
            outbox: outbox.clone(),
            closed: watch::channel(None).0,
            notices: tokio::sync::Mutex::new(notices_rx),
            notices_tx,
        });
        tokio::spawn(async move {
            if let Err(e) = outbox::drain(outbox, writer.into_inner()).await {
                tracing::debug!("writing to the junction failed: {e}");
            }
        });
        tokio::spawn(read_loop(reader, Arc::downgrade(&shared)));
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the connection would.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the lock, then moves the frames it queued to the
    /// writer, in order.
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        self.with_then(false, f)
    }

    /// As [`Shared::with`], and when the writer is idle writes the frames
    /// at once from this task: for calls and replies, where a wake-up
    /// costs latency.
    fn with_now<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        self.with_then(true, f)
    }

    fn with_then<R>(&self, now: bool, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.lock();
        let r = f(&mut inner);
        let queued = self.transmit(&mut inner.machine, now);
        drop(inner);
        // Written or woken out of the lock: a thread woken by the write (on
        // a CPU shared with this one, maybe) must not find it held.
        match queued {
            Queued::Nothing => {}
            Queued::Wake(waker) => waker.wake(),
            Queued::Direct => self.outbox.flush_direct(),
        }
        r
    }

    /// Moves queued frames into the outbox; called with the lock held, so
    /// frames reach the writer in the order the machine queued them.
    /// Returns what to do once the lock is released: wake the writer, or
    /// (`now`) write from this task.
    #[must_use]
    fn transmit(&self, machine: &mut Machine, now: bool) -> Queued {
        let Some(first) = machine.poll_transmit() else {
            return Queued::Nothing;
        };
        self.outbox.with(|o| {
            if o.is_closed() {
                while machine.poll_transmit().is_some() {}
                return Queued::Nothing;
            }
            let mut queued = Queued::Nothing;
            let mut frame = Some(first);
            while let Some(f) = frame {
                if now {
                    o.push_quiet(&f.header, &f.payload);
                    queued = Queued::Direct;
                } else if let Some(w) = o.push(&f.header, &f.payload) {
                    queued = Queued::Wake(w);
                }
                frame = machine.poll_transmit();
            }
            queued
        })
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            reason: self
                .closed
                .borrow()
                .clone()
                .unwrap_or_else(|| "the road to the junction is down".into()),
        }
    }

    /// The error a refused command means for the application.
    fn refused(&self, e: CommandError) -> Error {
        // Refused locally as the junction would refuse it: the same code.
        let code = match e {
            CommandError::Closed { .. } => return self.closed_error(),
            CommandError::Dead { reason, .. } => return Error::Dead(reason),
            CommandError::Moved { handle } => return Error::Moved { handle },
            CommandError::NotGrantable { handle, rights } => {
                return Error::NotGrantable { handle, rights };
            }
            CommandError::TooLarge { len, max } => return Error::TooLarge { len, max },
            CommandError::UnknownHandle { .. } => ErrorCode::UnknownHandle,
            CommandError::UnknownPort { .. } => ErrorCode::UnknownPort,
            CommandError::BadCapabilityList { .. } => ErrorCode::BadCapabilityList,
            CommandError::TooManyPendingCalls { .. } => ErrorCode::TooManyPendingCalls,
            other => return Error::Protocol(other.to_string()),
        };
        Error::Refused {
            code,
            message: e.to_string(),
        }
    }

    /// Issues a request and returns the receiver of its answer, registered
    /// in the same step, so the answer cannot come first.
    pub(crate) fn request(
        &self,
        f: impl FnOnce(&mut Machine) -> Result<u32, CommandError>,
    ) -> Result<oneshot::Receiver<Result<Answer, Error>>, Error> {
        let (tx, rx) = oneshot::channel();
        self.with(|inner| {
            let req = f(&mut inner.machine)?;
            inner.requests.insert(req, tx);
            Ok(rx)
        })
        .map_err(|e| self.refused(e))
    }

    pub(crate) async fn answer(
        &self,
        rx: oneshot::Receiver<Result<Answer, Error>>,
    ) -> Result<Answer, Error> {
        rx.await.map_err(|_| self.closed_error())?
    }

    /// Runs a message command, waiting for send credit while it fails for
    /// the lack of it. `signals` are those of the capability sent on.
    async fn spend<R>(
        &self,
        signals: Option<&Signals>,
        now: bool,
        mut f: impl FnMut(&mut Inner) -> Result<R, CommandError>,
    ) -> Result<R, Error> {
        match self.with_then(now, &mut f) {
            Err(CommandError::NoCredit { .. }) => {}
            other => return other.map_err(|e| self.refused(e)),
        }
        let Some(signals) = signals else {
            return Err(Error::Protocol(
                "an unmetered handle ran out of credit".into(),
            ));
        };
        // Counted before trying under the lock, so the reader, which adds
        // credit under that lock, sees us waiting.
        let _waiting = Waiting::new(&signals.lane.waiting);
        loop {
            // Registered before trying, so credit that comes in between
            // still wakes us.
            let notified = signals.lane.credit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.with_then(now, &mut f) {
                Err(CommandError::NoCredit { .. }) => notified.await,
                other => return other.map_err(|e| self.refused(e)),
            }
        }
    }

    /// Sends on `cap`, waiting for credit; returns the sequence number.
    pub(crate) async fn send(
        &self,
        cap: &Capability,
        caps: &[&Capability],
        payload: Bytes,
    ) -> Result<u64, Error> {
        let (attached, n) = handles(caps)?;
        let handle = cap.handle();
        let mut payload = payload;
        self.spend(Some(&cap.inner.signals), false, |inner| {
            inner.machine.try_send(handle, &attached[..n], &mut payload)
        })
        .await
    }

    /// Calls on `handle`, waiting for credit, then for the answer.
    pub(crate) async fn call(
        &self,
        cap: Option<&Capability>,
        caps: &[&Capability],
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let (attached, n) = handles(caps)?;
        let handle = cap.map_or(CONTROL_HANDLE, Capability::handle);
        let mut payload = payload;
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let tag = self
            .spend(cap.map(|c| &*c.inner.signals), true, |inner| {
                let tag = inner
                    .machine
                    .try_call(handle, &attached[..n], &mut payload)?;
                if let Some(tx) = tx.take() {
                    inner.calls.insert(tag, tx);
                }
                Ok(tag)
            })
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                let waiter = self.with(|inner| {
                    inner.machine.abandon_call(tag);
                    inner.calls.remove(&tag)
                });
                drop(waiter);
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// Waits until the Junction has handled every frame sent before.
    pub(crate) async fn sync(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.with(|inner| {
            let nonce = inner.machine.ping()?;
            inner.pings.insert(nonce, tx);
            Ok(())
        })
        .map_err(|e| self.refused(e))?;
        rx.await.map_err(|_| self.closed_error())
    }

    pub(crate) async fn next_notice(&self) -> Option<Notice> {
        let mut rx = self.notices.lock().await;
        if let Ok(n) = rx.try_recv() {
            return Some(n);
        }
        let mut closed = self.closed.subscribe();
        tokio::select! {
            n = rx.recv() => n,
            _ = closed.wait_for(|c| c.is_some()) => rx.try_recv().ok(),
        }
    }

    pub(crate) async fn closed(&self) -> Error {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| c.is_some()).await;
        self.closed_error()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Everything waiting on the connection learns it is gone.
    fn shut(&self, reason: String) {
        self.outbox.close();
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(reason.clone());
                true
            } else {
                false
            }
        });
        let (requests, calls, signals) = {
            let mut inner = self.lock();
            inner.machine.handle_road_closed(reason);
            while inner.machine.poll_event().is_some() {}
            while inner.machine.poll_transmit().is_some() {}
            inner.pings.clear();
            inner.no_senders.clear();
            (
                std::mem::take(&mut inner.requests),
                std::mem::take(&mut inner.calls),
                inner.caps.values().cloned().collect::<Vec<_>>(),
            )
        };
        for (_, tx) in requests {
            let _ = tx.send(Err(self.closed_error()));
        }
        for (_, tx) in calls {
            let _ = tx.send(Err(self.closed_error()));
        }
        for s in signals {
            s.lane.credit.notify_waiters();
        }
    }

    /// Feeds frames to the machine and hands what they produced to the
    /// waiters, in one step under the lock: a burst of frames read at once
    /// costs one lock, not one each. Messages for ports are queued after
    /// the lock is released, so a receiver woken by one does not find it
    /// held; that cannot make an unread message count as read, since only
    /// the machine credits, and only what the application read.
    fn dispatch(self: &Arc<Self>, frames: &mut Vec<Frame>, reader: &mut Reader) {
        let mut leftovers = Vec::new();
        let mut closed = None;
        let queued = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            for frame in frames.drain(..) {
                inner.machine.handle_frame(frame);
                while let Some(event) = inner.machine.poll_event() {
                    if let Event::Closed { reason } = event {
                        closed = Some(reason);
                    } else {
                        self.route(inner, event, reader, &mut leftovers);
                    }
                }
            }
            self.transmit(&mut inner.machine, false)
        };
        if let Queued::Wake(waker) = queued {
            waker.wake();
        }
        // Wake-ups happen out of the lock, so that a woken task (on a CPU
        // shared with this one, maybe) does not find it held.
        for handoff in reader.handoffs.drain(..) {
            match handoff {
                Handoff::Deliver(port, msg, ack) => {
                    let unqueued = match reader.ports.get(&port) {
                        Some(tx) => tx.send((msg, ack)).err().map(|e| e.0.0),
                        None => Some(msg),
                    };
                    // Its port was dropped meanwhile: the junction fails
                    // the call and removes the reply capability itself.
                    if let Some(mut msg) = unqueued {
                        if let Some(reply) = msg.reply.as_mut() {
                            reply.sent = true;
                        }
                        leftovers.push(Leftover::Message(Ok(msg)));
                    }
                }
                Handoff::Unhook(port) => {
                    reader.ports.remove(&port);
                }
                Handoff::Call(tx, result) => {
                    if let Err(v) = tx.send(result) {
                        leftovers.push(Leftover::Message(v));
                    }
                }
                Handoff::Answer(tx, result) => {
                    if let Err(v) = tx.send(result) {
                        leftovers.push(Leftover::Answer(v));
                    }
                }
                Handoff::Signal(tx) => {
                    let _ = tx.send(());
                }
                Handoff::Credit(lane) => lane.credit.notify_waiters(),
            }
        }
        // Out of the lock: these may give capabilities back.
        drop(leftovers);
        if let Some(reason) = closed {
            self.shut(reason);
            reader.ports.clear();
        }
    }

    fn route(
        self: &Arc<Self>,
        inner: &mut Inner,
        event: Event,
        reader: &mut Reader,
        leftovers: &mut Vec<Leftover>,
    ) {
        match event {
            Event::Delivered { deliver, payload } => {
                let ack = deliver.ack;
                let port = deliver.port;
                let msg = self.message(inner, deliver, payload);
                reader.handoffs.push(Handoff::Deliver(port, msg, ack));
            }
            Event::Replied {
                tag,
                deliver,
                payload,
            } => {
                let msg = self.message(inner, deliver, payload);
                match inner.calls.remove(&tag) {
                    Some(tx) => reader.handoffs.push(Handoff::Call(tx, Ok(msg))),
                    None => leftovers.push(Leftover::Message(Ok(msg))),
                }
            }
            Event::CallFailed { tag, reason } => {
                if let Some(tx) = inner.calls.remove(&tag) {
                    let end = Err(Error::CallFailed(reason));
                    reader.handoffs.push(Handoff::Call(tx, end));
                }
            }
            Event::CallRefused { tag, code, message } => {
                if let Some(tx) = inner.calls.remove(&tag) {
                    let end = Err(Error::Refused { code, message });
                    reader.handoffs.push(Handoff::Call(tx, end));
                }
            }
            Event::PortOpened { req, address } => {
                let (port, tx) = Port::new(self, inner, address);
                reader.ports.insert(address.port, tx);
                answer(inner, req, Answer::Port(port), reader, leftovers);
            }
            Event::Minted {
                req,
                handle,
                rights,
                address,
                moves,
            } => {
                let cap = Capability::new(self, inner, handle, rights, address, moves);
                answer(inner, req, Answer::Cap(cap), reader, leftovers);
            }
            Event::Refused { req, code, message } => {
                if let Some(tx) = inner.requests.remove(&req) {
                    let refusal = Err(Error::Refused { code, message });
                    reader.handoffs.push(Handoff::Answer(tx, refusal));
                }
            }
            Event::SendCredit { port, .. } => {
                if let Some(lane) = inner.lanes.get(&port)
                    && lane.waiting.load(Ordering::Relaxed) > 0
                {
                    reader.handoffs.push(Handoff::Credit(lane.clone()));
                }
            }
            Event::Dead { handle, reason } => {
                if let Some(s) = inner.caps.get(&handle) {
                    s.dead.send_replace(Some(reason));
                    // Senders waiting for credit that will never come give up.
                    s.lane.credit.notify_waiters();
                }
            }
            Event::Undeliverable {
                handle,
                address,
                first_seq,
                count,
                reason,
            } => {
                let _ = self.notices_tx.send(Notice::Undeliverable {
                    handle,
                    address,
                    first_seq,
                    count,
                    reason,
                });
            }
            Event::NoSenders { port } => {
                if let Some(tx) = inner.no_senders.remove(&port) {
                    reader.handoffs.push(Handoff::Signal(tx));
                }
            }
            Event::PortClosed { port, .. } => {
                // The port's queue ends; `Port::recv` then reports it closed.
                reader.handoffs.push(Handoff::Unhook(port));
            }
            Event::Pong { nonce } => {
                if let Some(tx) = inner.pings.remove(&nonce) {
                    reader.handoffs.push(Handoff::Signal(tx));
                }
            }
            Event::Notice {
                handle,
                code,
                message,
            } => {
                tracing::warn!(?code, "junction reported: {message}");
                let _ = self.notices_tx.send(Notice::Error {
                    handle,
                    code,
                    message,
                });
            }
            Event::IdentityWithdrawn { names, reason } => {
                tracing::info!(
                    ?names,
                    "the junction withdrew this connection's identity: {reason}"
                );
                let _ = self
                    .notices_tx
                    .send(Notice::IdentityWithdrawn { names, reason });
            }
            other => tracing::debug!(?other, "ignored a driver event"),
        }
    }

    /// A delivered message, its capabilities and reply now owned by the
    /// application.
    fn message(
        self: &Arc<Self>,
        inner: &mut Inner,
        d: junction_road::Deliver,
        payload: Bytes,
    ) -> Message {
        let caps = d
            .caps
            .iter()
            .map(|g: &Granted| {
                Capability::new(
                    self,
                    inner,
                    g.handle,
                    g.rights,
                    g.address,
                    g.moves || g.rights.contains(Rights::SEND_ONCE),
                )
            })
            .collect();
        let reply = d.reply.map(|handle| Reply {
            shared: self.clone(),
            handle,
            caller: d.origin,
            sent: false,
        });
        Message {
            payload,
            origin: d.origin,
            port: d.port,
            caps,
            reply,
            identity: d.identity,
        }
    }
}

fn answer(
    inner: &mut Inner,
    req: u32,
    answer: Answer,
    reader: &mut Reader,
    leftovers: &mut Vec<Leftover>,
) {
    match inner.requests.remove(&req) {
        Some(tx) => reader.handoffs.push(Handoff::Answer(tx, Ok(answer))),
        None => leftovers.push(Leftover::Answer(Ok(answer))),
    }
}

/// The handles of `caps`, on the stack: no allocation per message.
fn handles(caps: &[&Capability]) -> Result<([u32; MAX_CAPS_PER_MESSAGE], usize), Error> {
    let mut out = [0u32; MAX_CAPS_PER_MESSAGE];
    if caps.len() > MAX_CAPS_PER_MESSAGE {
        return Err(Error::Refused {
            code: ErrorCode::BadCapabilityList,
            message: format!(
                "a message carries at most {MAX_CAPS_PER_MESSAGE} capabilities; this one had {}",
                caps.len()
            ),
        });
    }
    for (slot, cap) in out.iter_mut().zip(caps) {
        *slot = cap.handle();
    }
    Ok((out, caps.len()))
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer writes what is queued, then ends the stream: the
        // junction sees this driver leave.
        self.outbox.close();
    }
}

/// The most frames the reader hands the machine under one lock. Small
/// enough that a receiving task gets its first messages soon (64 measured
/// about 10% fewer 64-byte messages a second in `junction bench`).
const READ_BATCH: usize = 16;

async fn read_loop<R: AsyncRead + Unpin>(mut reader: RoadReader<R>, shared: Weak<Shared>) {
    let mut batch = Vec::with_capacity(READ_BATCH);
    let mut state = Reader::default();
    let reason = 'read: loop {
        match reader.read_frame().await {
            Ok(Some(frame)) => batch.push(frame),
            Ok(None) => break "the junction closed the connection".to_string(),
            Err(junction_road::RoadError::Frame(e)) if !e.is_fatal() => {
                tracing::warn!("skipped a frame from the junction: {e}");
                continue;
            }
            Err(e) => break format!("the road to the junction failed: {e}"),
        }
        // Whatever else arrived with it is handled in the same step.
        let mut failed = None;
        while batch.len() < READ_BATCH {
            match reader.try_frame() {
                Ok(Some(frame)) => batch.push(frame),
                Ok(None) => break,
                Err(e) if !e.is_fatal() => {
                    tracing::warn!("skipped a frame from the junction: {e}");
                }
                Err(e) => {
                    failed = Some(format!("the road to the junction failed: {e}"));
                    break;
                }
            }
        }
        match shared.upgrade() {
            Some(shared) => shared.dispatch(&mut batch, &mut state),
            None => return,
        }
        if let Some(reason) = failed {
            break 'read reason;
        }
    };
    if let Some(shared) = shared.upgrade() {
        shared.shut(reason);
    }
}

/// The right to send to a port. Clones share one handle; dropping the last
/// gives the handle back to the Junction.
#[derive(Clone, Debug)]
pub struct Capability {
    inner: Arc<CapInner>,
}

#[derive(Debug)]
struct CapInner {
    shared: Arc<Shared>,
    handle: u32,
    rights: Rights,
    address: Address,
    moves: bool,
    signals: Arc<Signals>,
}

impl Capability {
    fn new(
        shared: &Arc<Shared>,
        inner: &mut Inner,
        handle: u32,
        rights: Rights,
        address: Address,
        moves: bool,
    ) -> Self {
        let lane = inner.lanes.entry(address).or_default().clone();
        let signals = Arc::new(Signals {
            lane,
            dead: watch::channel(None).0,
        });
        inner.caps.insert(handle, signals.clone());
        Capability {
            inner: Arc::new(CapInner {
                shared: shared.clone(),
                handle,
                rights,
                address,
                moves,
                signals,
            }),
        }
    }

    /// Its handle in this connection's table (meaningless anywhere else).
    pub fn handle(&self) -> u32 {
        self.inner.handle
    }

    /// Its rights.
    pub fn rights(&self) -> Rights {
        self.inner.rights
    }

    /// The address of the port it reaches, for diagnostics.
    pub fn address(&self) -> Address {
        self.inner.address
    }

    /// Whether it moves when passed on (send-once, or a message budget):
    /// once attached to a message (or, for send-once, used) this Driver no
    /// longer holds it, and using it again fails with [`Error::Moved`].
    pub fn moves(&self) -> bool {
        self.inner.moves
    }

    /// Send credit units left (see [`junction_road::frame::credit_cost`]).
    pub fn credits(&self) -> usize {
        let handle = self.handle();
        self.inner.shared.with(|inner| {
            inner
                .machine
                .capability(handle)
                .map_or(0, |c| c.credits as usize)
        })
    }

    /// A narrower capability to the same port: fewer rights, an expiry, a
    /// message budget, and, if `revocable`, one that [`Capability::revoke`]
    /// kills along with everything derived from it. One with a message
    /// budget moves when passed on (see [`Capability::moves`]).
    pub async fn attenuate(&self, limits: Attenuation) -> Result<Capability, Error> {
        let shared = &self.inner.shared;
        let handle = self.handle();
        let rx = shared.request(|m| {
            m.attenuate(
                handle,
                limits.rights,
                limits.expires_at,
                limits.max_messages,
                limits.revocable,
            )
        })?;
        match shared.answer(rx).await? {
            Answer::Cap(cap) => Ok(cap),
            Answer::Port(_) => Err(Error::Protocol("a port answered an attenuation".into())),
        }
    }

    /// Revokes this revocable capability (made by [`Capability::attenuate`]
    /// with `revocable`) and every capability derived from it, wherever
    /// they were passed.
    pub async fn revoke(&self) -> Result<(), Error> {
        let shared = &self.inner.shared;
        let handle = self.handle();
        // The machine watches the handle first, so the junction tells it
        // of its own death too.
        shared
            .with(|inner| inner.machine.revoke(handle))
            .map_err(|e| shared.refused(e))?;
        // A round trip: when it returns, the junction has acted (or sent
        // its refusal, which arrives first).
        shared.sync().await?;
        match self.dead() {
            Some(Reason::Revoked) => Ok(()),
            _ => Err(Error::Refused {
                code: ErrorCode::NotRevocable,
                message: format!(
                    "handle {} is not a revocable capability this connection made",
                    self.handle()
                ),
            }),
        }
    }

    /// Why the port behind it died, if the Driver has learnt that it did.
    pub fn dead(&self) -> Option<Reason> {
        *self.inner.signals.dead.borrow()
    }

    /// Resolves when the port behind this capability dies, with the reason.
    pub async fn watch(&self) -> Result<Reason, Error> {
        let shared = &self.inner.shared;
        let handle = self.handle();
        shared
            .with(|inner| inner.machine.watch(handle))
            .map_err(|e| shared.refused(e))?;
        let mut rx = self.inner.signals.dead.subscribe();
        let mut closed = shared.closed.subscribe();
        tokio::select! {
            r = rx.wait_for(|d| d.is_some()) => match r {
                Ok(d) => (*d).ok_or_else(|| shared.closed_error()),
                Err(_) => Err(shared.closed_error()),
            },
            _ = closed.wait_for(|c| c.is_some()) => Err(shared.closed_error()),
        }
    }
}

impl Drop for CapInner {
    fn drop(&mut self) {
        let handle = self.handle;
        let signals = &self.signals;
        self.shared.with(|inner| {
            if inner
                .caps
                .get(&handle)
                .is_some_and(|s| Arc::ptr_eq(s, signals))
            {
                inner.caps.remove(&handle);
            }
            // The map's and this capability's: the last on its lane.
            if Arc::strong_count(&signals.lane) <= 2 {
                inner.lanes.remove(&self.address);
            }
            inner.machine.drop_capability(handle);
        });
    }
}

/// A port: a queue of messages this Driver holds the receive right for.
/// Dropping it closes the port, and every capability to it dies.
#[derive(Debug)]
pub struct Port {
    shared: Arc<Shared>,
    address: Address,
    rx: mpsc::UnboundedReceiver<(Message, bool)>,
    /// Reads not yet told to the machine, and their credit cost: told once
    /// they reach its ack batch (when a Credit is due), on an ack flag, or
    /// when the port closes. One lock per batch, not per message.
    reads: u32,
    reads_cost: u32,
    ack_batch: u32,
}

impl Port {
    /// Made by the reader when the Junction opened it; the reader keeps
    /// the sending half of its queue.
    fn new(
        shared: &Arc<Shared>,
        inner: &mut Inner,
        address: Address,
    ) -> (Port, mpsc::UnboundedSender<(Message, bool)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let port = Port {
            shared: shared.clone(),
            address,
            rx,
            reads: 0,
            reads_cost: 0,
            ack_batch: inner.machine.ack_batch(),
        };
        (port, tx)
    }

    /// The port's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Mints a capability to this port with `rights`.
    pub async fn mint(&self, rights: Rights) -> Result<Capability, Error> {
        let port = self.address.port;
        let rx = self.shared.request(|m| m.mint(port, rights))?;
        match self.shared.answer(rx).await? {
            Answer::Cap(cap) => Ok(cap),
            Answer::Port(_) => Err(Error::Protocol("a port answered a mint".into())),
        }
    }

    /// Resolves once no capability to this port is left anywhere (every
    /// holder dropped it or went away); a registered name does not count,
    /// since lookups can make new ones. Mach calls this "no senders".
    pub async fn no_senders(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let port = self.address.port;
        self.shared
            .with(|inner| {
                inner.machine.watch_senders(port)?;
                inner.no_senders.insert(port, tx);
                Ok(())
            })
            .map_err(|e| self.shared.refused(e))?;
        rx.await.map_err(|_| self.shared.closed_error())
    }

    /// The next message. Consuming messages is what gives their senders
    /// credit to send more.
    pub async fn recv(&mut self) -> Result<Message, Error> {
        let (msg, ack) = match self.rx.recv().await {
            Some(entry) => entry,
            None if self.shared.is_closed() => return Err(self.shared.closed_error()),
            None => return Err(Error::Dead(Reason::PortClosed)),
        };
        // Consumed: the machine acknowledges in batches, or at once on ack.
        self.reads += 1;
        self.reads_cost = self
            .reads_cost
            .saturating_add(credit_cost(msg.payload.len()));
        if ack || self.reads_cost >= self.ack_batch {
            let (port, count, cost) = self.take_reads();
            self.shared
                .with(|inner| inner.machine.consumed(port, count, cost, ack));
        }
        Ok(msg)
    }

    fn take_reads(&mut self) -> (u16, u32, u32) {
        let count = std::mem::take(&mut self.reads);
        let cost = std::mem::take(&mut self.reads_cost);
        (self.address.port, count, cost)
    }

    /// Closes the port: queued messages are reported undeliverable to their
    /// senders, and every capability to it dies with [`Reason::PortClosed`].
    pub fn close(self) {
        drop(self)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let (port, count, cost) = self.take_reads();
        // One step: Credit for exactly what was read, then ClosePort. From
        // then on the machine credits nothing more for this port.
        self.shared.with(|inner| {
            inner.machine.consumed(port, count, cost, false);
            inner.machine.close_port(port);
        });
        // Messages still queued, or queued by the reader from now on, were
        // not consumed: the junction reports them undeliverable and fails
        // their calls, removing their reply capabilities itself.
        self.rx.close();
        while let Ok((mut msg, _)) = self.rx.try_recv() {
            if let Some(reply) = msg.reply.as_mut() {
                reply.sent = true;
            }
        }
    }
}

/// A delivered message.
#[derive(Debug)]
#[non_exhaustive]
pub struct Message {
    /// The payload, exactly as sent.
    pub payload: Bytes,
    /// The sender's home port, stamped by the Junction.
    pub origin: Address,
    /// The number of the port it arrived on.
    pub port: u16,
    /// Capabilities that came with it, now held by this Driver.
    pub caps: Vec<Capability>,
    /// For a call: the right to answer it, once.
    pub reply: Option<Reply>,
    /// The sender's proven identity (its key and the names its certificate
    /// grants), stamped by the Junction; `None` when it proved none.
    pub identity: Option<Arc<Identity>>,
}

impl Message {
    /// Whether the sender waits for a reply.
    pub fn is_call(&self) -> bool {
        self.reply.is_some()
    }

    /// Decodes the payload with postcard.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        postcard::from_bytes(&self.payload).map_err(Error::Decode)
    }

    /// Answers a call. Dropping a call's message without replying fails the
    /// caller's call with [`Reason::ReplyDropped`].
    pub fn reply(mut self, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.reply.take().ok_or(Error::NoReply)?.send(payload)
    }

    /// Answers a call with capabilities attached (each needs `grant`).
    pub fn reply_with(
        mut self,
        payload: impl Into<Bytes>,
        caps: &[&Capability],
    ) -> Result<(), Error> {
        self.reply
            .take()
            .ok_or(Error::NoReply)?
            .send_with(payload, caps)
    }

    /// Answers a call with a postcard-encoded value.
    pub fn reply_typed<T: serde::Serialize>(self, value: &T) -> Result<(), Error> {
        let bytes = postcard::to_allocvec(value).map_err(Error::Encode)?;
        self.reply(bytes)
    }
}

/// Limits for [`Capability::attenuate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attenuation {
    /// Rights to keep (a subset of the original's).
    pub rights: Rights,
    /// Seconds since the Unix epoch after which it is dead.
    pub expires_at: Option<u64>,
    /// How many messages it may send.
    pub max_messages: Option<u32>,
    /// Whether it can be revoked with [`Capability::revoke`].
    pub revocable: bool,
}

impl Attenuation {
    /// Keep `rights`, no other limit.
    pub fn rights(rights: Rights) -> Self {
        Self {
            rights,
            expires_at: None,
            max_messages: None,
            revocable: false,
        }
    }

    /// Dead after `duration` from now. Expiries are whole seconds: this
    /// rounds up, so the capability lives at least `duration`.
    pub fn expiring_in(mut self, duration: Duration) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let at = now + duration;
        self.expires_at = Some(at.as_secs() + u64::from(at.subsec_nanos() > 0));
        self
    }

    /// At most `n` messages.
    pub fn max_messages(mut self, n: u32) -> Self {
        self.max_messages = Some(n);
        self
    }

    /// Revocable by its maker.
    pub fn revocable(mut self) -> Self {
        self.revocable = true;
        self
    }
}

/// The right to answer one call: a send-once capability to the caller.
/// Replies never wait for credit. Dropping it unused fails the call with
/// [`Reason::ReplyDropped`].
#[derive(Debug)]
pub struct Reply {
    shared: Arc<Shared>,
    handle: u32,
    caller: Address,
    sent: bool,
}

impl Reply {
    /// Its handle in this connection's table.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// The caller's home port.
    pub fn caller(&self) -> Address {
        self.caller
    }

    /// Sends the answer.
    pub fn send(self, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.send_with(payload, &[])
    }

    /// Sends the answer with capabilities attached (each needs `grant`).
    pub fn send_with(
        mut self,
        payload: impl Into<Bytes>,
        caps: &[&Capability],
    ) -> Result<(), Error> {
        let payload = payload.into();
        let (attached, n) = handles(caps)?;
        let handle = self.handle;
        self.shared
            .with_now(|inner| inner.machine.reply(handle, &attached[..n], payload))
            .map_err(|e| self.shared.refused(e))?;
        self.sent = true;
        Ok(())
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            let handle = self.handle;
            self.shared.with(|inner| inner.machine.drop_reply(handle));
        }
    }
}
