//! The connection behind a Driver: its reader and writer tasks, and the
//! ports, capabilities and messages they serve.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use junction_road::control::CONTROL_HANDLE;
use junction_road::frame::credit_cost;
use junction_road::outbox::{self, Outbox, SharedOutbox};
use junction_road::{
    Address, Call, DirectLink, ErrorCode, Frame, Header, Identity, Reason, Rights, RoadReader,
    RoadWriter, Send, Welcome,
};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::Error;

/// The state one connection's handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) welcome: Welcome,
    outbox: Arc<Mutex<Outbox>>,
    state: Mutex<State>,
    next_req: AtomicU32,
    next_tag: AtomicU64,
    closed: watch::Sender<Option<String>>,
    notices: tokio::sync::Mutex<mpsc::UnboundedReceiver<Notice>>,
    notices_tx: mpsc::UnboundedSender<Notice>,
    /// Replies consumed and not yet reported to the Junction.
    home_acks: AtomicU32,
}

type Answer = oneshot::Sender<Result<Header, Error>>;

/// Keys here are ids this driver or its junction chose, so a fast
/// non-keyed hash is safe.
#[derive(Debug, Default)]
struct State {
    requests: FxHashMap<u32, Answer>,
    calls: FxHashMap<u64, oneshot::Sender<Result<Message, Error>>>,
    ports: FxHashMap<u16, mpsc::UnboundedSender<(Message, bool)>>,
    caps: FxHashMap<u32, Weak<CapInner>>,
    pings: FxHashMap<u64, oneshot::Sender<()>>,
    no_senders: FxHashMap<u16, oneshot::Sender<()>>,
    closed: bool,
}

/// Room kept in every frame for its header (with up to 64 capabilities).
const FRAME_ALLOWANCE: usize = 1024;

/// Replies are acknowledged in batches of this many at most, or at once
/// when the Junction asks.
const HOME_ACK_BATCH: u32 = 32;

/// Something the Junction reported outside any request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Notice {
    /// Messages sent on a capability were not delivered.
    Undeliverable {
        /// The capability's handle.
        handle: u32,
        /// The address of the port they were for.
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
            welcome,
            outbox: outbox.clone(),
            state: Mutex::new(State::default()),
            next_req: AtomicU32::new(1),
            next_tag: AtomicU64::new(1),
            closed: watch::channel(None).0,
            notices: tokio::sync::Mutex::new(notices_rx),
            notices_tx,
            home_acks: AtomicU32::new(0),
        });
        tokio::spawn(async move {
            if let Err(e) = outbox::drain(outbox, writer.into_inner()).await {
                tracing::debug!("writing to the junction failed: {e}");
            }
        });
        tokio::spawn(read_loop(reader, Arc::downgrade(&shared)));
        shared
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the connection would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the writer.
    pub(crate) fn write(&self, header: Header, payload: Bytes) -> Result<(), Error> {
        self.write_with(header, payload, false)
    }

    /// Queues a frame and, when the writer is idle, writes it at once from
    /// this task: for calls and replies, where a wake-up costs latency.
    pub(crate) fn write_now(&self, header: Header, payload: Bytes) -> Result<(), Error> {
        self.write_with(header, payload, true)
    }

    fn write_with(&self, header: Header, payload: Bytes, now: bool) -> Result<(), Error> {
        let waker = self
            .outbox
            .with(|o| {
                (!o.is_closed()).then(|| {
                    if now {
                        o.push_quiet(&header, &payload);
                        o.flush_direct()
                    } else {
                        o.push(&header, &payload)
                    }
                })
            })
            .ok_or_else(|| self.closed_error())?;
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
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

    /// A new request id and the receiver of its answer.
    pub(crate) fn request(&self) -> Result<(u32, oneshot::Receiver<Result<Header, Error>>), Error> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.while_open(|state| state.requests.insert(req, tx))?;
        Ok((req, rx))
    }

    /// Records something that waits for the Junction, unless the
    /// connection is gone already (then nothing would ever answer it).
    fn while_open<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, Error> {
        let mut state = self.state();
        if state.closed {
            return Err(self.closed_error());
        }
        Ok(f(&mut state))
    }

    pub(crate) async fn answer(
        &self,
        rx: oneshot::Receiver<Result<Header, Error>>,
    ) -> Result<Header, Error> {
        rx.await.map_err(|_| self.closed_error())?
    }

    pub(crate) fn unexpected(&self, header: Header) -> Error {
        Error::Protocol(format!("unexpected answer {header:?}"))
    }

    /// Refuses a payload that would make a frame over the junction's limit
    /// (the junction would have to close the connection).
    pub(crate) fn check_size(&self, len: usize) -> Result<(), Error> {
        let max = (self.welcome.max_frame as usize).saturating_sub(FRAME_ALLOWANCE);
        if len > max {
            return Err(Error::TooLarge { len, max });
        }
        Ok(())
    }

    /// The handles of `caps`, checked for the grant right.
    pub(crate) fn attachments(&self, caps: &[&Capability]) -> Result<Vec<u32>, Error> {
        caps.iter()
            .map(|c| {
                if c.rights().contains(Rights::GRANT) {
                    Ok(c.handle())
                } else {
                    Err(Error::NotGrantable {
                        handle: c.handle(),
                        rights: c.rights(),
                    })
                }
            })
            .collect()
    }

    pub(crate) async fn call(
        &self,
        handle: u32,
        caps: Vec<u32>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.while_open(|state| state.calls.insert(tag, tx))?;
        self.write_now(Header::Call(Call { handle, tag, caps }), payload)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                self.state().calls.remove(&tag);
                Err(Error::Timeout(timeout))
            }
        }
    }

    fn flush_home_acks(&self) {
        let count = self.home_acks.swap(0, Ordering::Relaxed);
        if count > 0 {
            let port = self.welcome.home.port;
            let _ = self.write(Header::Credit { port, count }, Bytes::new());
        }
    }

    /// Waits until the Junction has handled every frame sent before.
    pub(crate) async fn sync(&self) -> Result<(), Error> {
        let nonce = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.while_open(|state| state.pings.insert(nonce, tx))?;
        self.write(Header::Ping { nonce }, Bytes::new())?;
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
        let (requests, calls, caps) = {
            let mut state = self.state();
            state.closed = true;
            state.ports.clear();
            state.pings.clear();
            state.no_senders.clear();
            (
                std::mem::take(&mut state.requests),
                std::mem::take(&mut state.calls),
                state
                    .caps
                    .values()
                    .filter_map(Weak::upgrade)
                    .collect::<Vec<_>>(),
            )
        };
        for (_, tx) in requests {
            let _ = tx.send(Err(self.closed_error()));
        }
        for (_, tx) in calls {
            let _ = tx.send(Err(self.closed_error()));
        }
        for cap in caps {
            cap.credits.close();
        }
    }

    fn cap(&self, handle: u32) -> Option<Arc<CapInner>> {
        self.state().caps.get(&handle).and_then(Weak::upgrade)
    }

    fn dispatch(self: &Arc<Self>, frame: Frame) {
        match frame.header {
            Header::Deliver(d) => {
                let caps = d
                    .caps
                    .iter()
                    .map(|g| Capability::new(self, g.handle, g.rights, g.address, g.credits))
                    .collect();
                let reply = d.reply.map(|handle| Reply {
                    shared: self.clone(),
                    handle,
                    caller: d.origin,
                    sent: false,
                });
                let msg = Message {
                    payload: frame.payload,
                    origin: d.origin,
                    port: d.port,
                    caps,
                    reply,
                    identity: d.identity,
                };
                if d.tag != 0 && d.port == self.welcome.home.port {
                    let batch = (self.welcome.max_pending_calls / 4).clamp(1, HOME_ACK_BATCH);
                    if self.home_acks.fetch_add(1, Ordering::Relaxed) + 1 >= batch || d.ack {
                        self.flush_home_acks();
                    }
                    let call = self.state().calls.remove(&d.tag);
                    if let Some(tx) = call {
                        let _ = tx.send(Ok(msg));
                    }
                    return;
                }
                let undelivered = match self.state().ports.get(&d.port) {
                    Some(tx) => tx.send((msg, d.ack)).err(),
                    None => Some(mpsc::error::SendError((msg, d.ack))),
                };
                match undelivered {
                    None => {}
                    Some(_) => {
                        // A message for a port being closed, or for the home
                        // port outside a call: consumed and dropped.
                        let _ = self.write(
                            Header::Credit {
                                port: d.port,
                                count: 1,
                            },
                            Bytes::new(),
                        );
                        tracing::debug!(
                            port = d.port,
                            "dropped a message for a port with no receiver"
                        );
                    }
                }
            }
            Header::SendCredit { handle, count } => {
                if let Some(cap) = self.cap(handle) {
                    cap.credits.add_permits(count as usize);
                }
            }
            Header::CallFailed { tag, reason } => {
                let call = self.state().calls.remove(&tag);
                if let Some(tx) = call {
                    let _ = tx.send(Err(Error::CallFailed(reason)));
                }
            }
            Header::Undeliverable {
                handle,
                first_seq,
                count,
                reason,
            } => {
                let cap = self.cap(handle);
                if let Some(cap) = &cap {
                    cap.mark_dead(reason);
                }
                let _ = self.notices_tx.send(Notice::Undeliverable {
                    handle,
                    address: cap.map(|c| c.address),
                    first_seq,
                    count,
                    reason,
                });
            }
            Header::Dead { handle, reason } => {
                if let Some(cap) = self.cap(handle) {
                    cap.mark_dead(reason);
                }
            }
            Header::PortOpened { req, .. } | Header::Minted { req, .. } => {
                let tx = self.state().requests.remove(&req);
                if let Some(tx) = tx {
                    let _ = tx.send(Ok(frame.header));
                }
            }
            Header::PortClosed { port, .. } => {
                self.state().ports.remove(&port);
            }
            Header::Error(e) => {
                let error = Error::Refused {
                    code: e.code,
                    message: e.message.clone(),
                };
                if e.req != 0 {
                    let tx = self.state().requests.remove(&e.req);
                    if let Some(tx) = tx {
                        let _ = tx.send(Err(error));
                    }
                } else if e.tag != 0 {
                    let tx = self.state().calls.remove(&e.tag);
                    if let Some(tx) = tx {
                        let _ = tx.send(Err(error));
                    }
                } else {
                    tracing::warn!(code = ?e.code, "junction reported: {}", e.message);
                    let _ = self.notices_tx.send(Notice::Error {
                        handle: (e.handle != u32::MAX).then_some(e.handle),
                        code: e.code,
                        message: e.message,
                    });
                }
            }
            Header::Ping { nonce } => {
                let _ = self.write(Header::Pong { nonce }, Bytes::new());
            }
            Header::NoSenders { port } => {
                let tx = self.state().no_senders.remove(&port);
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
            Header::Pong { nonce } => {
                let tx = self.state().pings.remove(&nonce);
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
            }
            Header::Goodbye { reason } => self.shut(format!("the junction said goodbye: {reason}")),
            other => tracing::debug!(?other, "ignored an unexpected frame"),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer writes what is queued, then ends the stream: the
        // junction sees this driver leave.
        self.outbox.close();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: RoadReader<R>, shared: Weak<Shared>) {
    let reason = loop {
        match reader.read_frame().await {
            Ok(Some(frame)) => match shared.upgrade() {
                Some(shared) => shared.dispatch(frame),
                None => return,
            },
            Ok(None) => break "the junction closed the connection".to_string(),
            Err(junction_road::RoadError::Frame(e)) if !e.is_fatal() => {
                tracing::warn!("skipped a frame from the junction: {e}");
            }
            Err(e) => break format!("the road to the junction failed: {e}"),
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
    credits: Semaphore,
    seq: AtomicU64,
    dead: watch::Sender<Option<Reason>>,
    watching: AtomicBool,
    used: AtomicBool,
}

impl Capability {
    fn new(
        shared: &Arc<Shared>,
        handle: u32,
        rights: Rights,
        address: Address,
        credits: u32,
    ) -> Self {
        let inner = Arc::new(CapInner {
            shared: shared.clone(),
            handle,
            rights,
            address,
            credits: Semaphore::new(credits as usize),
            seq: AtomicU64::new(0),
            dead: watch::channel(None).0,
            watching: AtomicBool::new(false),
            used: AtomicBool::new(false),
        });
        shared.state().caps.insert(handle, Arc::downgrade(&inner));
        Capability { inner }
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

    /// Send credit units left (see [`junction_road::frame::credit_cost`]).
    pub fn credits(&self) -> usize {
        self.inner.credits.available_permits()
    }

    /// A narrower capability to the same port: fewer rights, an expiry, a
    /// message budget, and, if `revocable`, one that [`Capability::revoke`]
    /// kills along with everything derived from it.
    pub async fn attenuate(&self, limits: Attenuation) -> Result<Capability, Error> {
        let shared = &self.inner.shared;
        let (req, rx) = shared.request()?;
        shared.write(
            Header::Attenuate(junction_road::Attenuate {
                req,
                handle: self.handle(),
                rights: limits.rights,
                expires_at: limits.expires_at,
                max_messages: limits.max_messages,
                revocable: limits.revocable,
            }),
            Bytes::new(),
        )?;
        match shared.answer(rx).await? {
            Header::Minted {
                handle, credits, ..
            } => Ok(Capability::new(
                shared,
                handle,
                limits.rights,
                self.address(),
                credits,
            )),
            other => Err(shared.unexpected(other)),
        }
    }

    /// Revokes this revocable capability (made by [`Capability::attenuate`]
    /// with `revocable`) and every capability derived from it, wherever
    /// they were passed.
    pub async fn revoke(&self) -> Result<(), Error> {
        let shared = &self.inner.shared;
        // Watching makes the junction tell this handle of its own death too.
        if !self.inner.watching.swap(true, Ordering::Relaxed) {
            shared.write(
                Header::Watch {
                    handle: self.handle(),
                },
                Bytes::new(),
            )?;
        }
        shared.write(
            Header::Revoke {
                handle: self.handle(),
            },
            Bytes::new(),
        )?;
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
        *self.inner.dead.borrow()
    }

    /// Resolves when the port behind this capability dies, with the reason.
    pub async fn watch(&self) -> Result<Reason, Error> {
        if !self.inner.watching.swap(true, Ordering::Relaxed) {
            self.inner.shared.write(
                Header::Watch {
                    handle: self.handle(),
                },
                Bytes::new(),
            )?;
        }
        let mut rx = self.inner.dead.subscribe();
        let mut closed = self.inner.shared.closed.subscribe();
        tokio::select! {
            r = rx.wait_for(|d| d.is_some()) => match r {
                Ok(d) => Ok(d.expect("waited for Some")),
                Err(_) => Err(self.inner.shared.closed_error()),
            },
            _ = closed.wait_for(|c| c.is_some()) => Err(self.inner.shared.closed_error()),
        }
    }

    /// Takes the send credits a payload of `len` bytes costs, waiting for
    /// them; returns the message's sequence number.
    pub(crate) async fn spend(&self, len: usize) -> Result<u64, Error> {
        self.inner.shared.check_size(len)?;
        if let Some(reason) = self.dead() {
            return Err(Error::Dead(reason));
        }
        if self.inner.rights.contains(Rights::SEND_ONCE)
            && self.inner.used.swap(true, Ordering::Relaxed)
        {
            return Err(Error::NoReply);
        }
        if self.inner.handle != CONTROL_HANDLE && !self.inner.rights.contains(Rights::SEND_ONCE) {
            match self.inner.credits.acquire_many(credit_cost(len)).await {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    return Err(match self.dead() {
                        Some(reason) => Error::Dead(reason),
                        None => self.inner.shared.closed_error(),
                    });
                }
            }
        }
        Ok(self.inner.seq.fetch_add(1, Ordering::Relaxed))
    }
}

impl CapInner {
    fn mark_dead(&self, reason: Reason) {
        self.dead.send_replace(Some(reason));
        // Senders waiting for credit that will never come give up.
        self.credits.close();
    }
}

impl Drop for CapInner {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        if state
            .caps
            .get(&self.handle)
            .is_some_and(|w| w.strong_count() == 0)
        {
            state.caps.remove(&self.handle);
        }
        drop(state);
        let consumed = self.rights.contains(Rights::SEND_ONCE) && self.used.load(Ordering::Relaxed);
        if self.handle != CONTROL_HANDLE && !consumed {
            let _ = self.shared.write(
                Header::Drop {
                    handle: self.handle,
                },
                Bytes::new(),
            );
        }
    }
}

/// A port: a queue of messages this Driver holds the receive right for.
/// Dropping it closes the port, and every capability to it dies.
#[derive(Debug)]
pub struct Port {
    shared: Arc<Shared>,
    address: Address,
    rx: mpsc::UnboundedReceiver<(Message, bool)>,
    /// Messages consumed and not yet reported.
    unacked: u32,
    /// The credit units they cost.
    unacked_cost: u32,
    closed: AtomicBool,
}

impl Port {
    pub(crate) fn new(shared: &Arc<Shared>, address: Address) -> Port {
        let (tx, rx) = mpsc::unbounded_channel();
        shared.state().ports.insert(address.port, tx);
        Port {
            shared: shared.clone(),
            address,
            rx,
            unacked: 0,
            unacked_cost: 0,
            closed: AtomicBool::new(false),
        }
    }

    /// The port's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Mints a capability to this port with `rights`.
    pub async fn mint(&self, rights: Rights) -> Result<Capability, Error> {
        let (req, rx) = self.shared.request()?;
        self.shared.write(
            Header::Mint {
                req,
                port: self.address.port,
                rights,
            },
            Bytes::new(),
        )?;
        match self.shared.answer(rx).await? {
            Header::Minted {
                handle, credits, ..
            } => Ok(Capability::new(
                &self.shared,
                handle,
                rights,
                self.address,
                credits,
            )),
            other => Err(self.shared.unexpected(other)),
        }
    }

    /// Resolves once no capability to this port is left anywhere (every
    /// holder dropped it or went away); a registered name does not count,
    /// since lookups can make new ones. Mach calls this "no senders".
    pub async fn no_senders(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let port = self.address.port;
        self.shared
            .while_open(|state| state.no_senders.insert(port, tx))?;
        self.shared.write(
            Header::WatchSenders {
                port: self.address.port,
            },
            Bytes::new(),
        )?;
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
        // Report consumption in batches of a quarter window, or at once when
        // the Junction says a sender is running low: senders get credit back
        // before they run dry, at one small frame per batch.
        self.unacked += 1;
        self.unacked_cost = self
            .unacked_cost
            .saturating_add(credit_cost(msg.payload.len()));
        if ack || self.unacked_cost >= (self.shared.welcome.window / 4).max(1) {
            self.flush_acks();
        }
        Ok(msg)
    }

    fn flush_acks(&mut self) {
        let count = std::mem::take(&mut self.unacked);
        self.unacked_cost = 0;
        if count > 0 {
            let _ = self.shared.write(
                Header::Credit {
                    port: self.address.port,
                    count,
                },
                Bytes::new(),
            );
        }
    }

    /// Closes the port: queued messages are reported undeliverable to their
    /// senders, and every capability to it dies with [`Reason::PortClosed`].
    pub fn close(self) {
        drop(self)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            // What was consumed was delivered: report it before closing, so
            // its senders are not told otherwise.
            self.flush_acks();
            // Calls still queued here fail when the junction closes the
            // port; their replies need no Drop of their own.
            self.rx.close();
            while let Ok((mut msg, _)) = self.rx.try_recv() {
                if let Some(reply) = msg.reply.as_mut() {
                    reply.sent = true;
                }
            }
            self.shared.state().ports.remove(&self.address.port);
            let _ = self.shared.write(
                Header::ClosePort {
                    port: self.address.port,
                },
                Bytes::new(),
            );
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
        self.shared.check_size(payload.len())?;
        let caps = self.shared.attachments(caps)?;
        self.sent = true;
        self.shared.write_now(
            Header::Send(Send {
                handle: self.handle,
                caps,
            }),
            payload,
        )
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self.shared.write(
                Header::Drop {
                    handle: self.handle,
                },
                Bytes::new(),
            );
        }
    }
}
