//! The message path: a `Send` or `Call` is *admitted* on the sending side
//! (rights, credit, budget, expiry, the attachments' right to travel) into
//! an [`Envelope`], a value that says everything about the message and could
//! be written to a wire; the envelope is then *delivered* to its target.
//! Credits and undeliverable notices come back along the flow the message
//! was recorded against.

use std::collections::HashMap;

use bytes::Bytes;
use junction_road::frame::MAX_CAPS_PER_MESSAGE;
use junction_road::frame::credit_cost;
use junction_road::{Address, Deliver, Frame, Granted, Header, Reason, Rights};

use junction_road::control::CONTROL_HANDLE;

use crate::caps::{CallAt, Cap, CapRef, FlowId, ReplyRoute, Target};
use crate::ports::{CONTROL_PORT, InFlight};
use crate::slab::Key;
use crate::{ConnId, Core, NO_HANDLE, Output, Refusal};

/// A message admitted onto the path: checked and charged on the sending
/// side, not yet delivered.
#[derive(Debug)]
pub(crate) struct Envelope {
    /// The sending connection.
    pub(crate) from: ConnId,
    /// Its home port: what the receiver sees as the origin.
    pub(crate) origin: Address,
    /// The handle it was sent on, in the sender's table.
    pub(crate) via: u32,
    /// The metered flow it is recorded against; `None` for replies and
    /// control requests, which credit does not hold back.
    pub(crate) flow: Option<CapRef>,
    pub(crate) target: Target,
    pub(crate) rights: Rights,
    pub(crate) seq: u64,
    pub(crate) cost: u32,
    /// The tag, for a call.
    pub(crate) call: Option<u64>,
    /// Where it goes as a reply, when sent on a reply capability.
    pub(crate) reply_to: Option<ReplyRoute>,
    /// Capabilities to pass on, as handles in the sender's table; they move
    /// or copy when the envelope is delivered.
    pub(crate) caps: Vec<u32>,
    pub(crate) payload: Bytes,
    /// The flow is below half its window: the receiver should report soon.
    pub(crate) low_credit: bool,
}

/// Why a message was not admitted.
enum NotAdmitted {
    /// The capability is dead on its own; the message took sequence number
    /// `seq`. `refund` is the credit the driver spent, as for `Refused`.
    Dead {
        reason: Reason,
        seq: u64,
        refund: Option<(u16, u32)>,
    },
    /// Refused; `refund` is the lane (by port number) and the credit the
    /// driver spent on it and the core did not take, to give back.
    Refused {
        refusal: Refusal,
        refund: Option<(u16, u32)>,
    },
}

/// Flows whose capability left its table with messages still in flight:
/// how many are left. The holder still hears what becomes of them, and the
/// handle is not reused until the last is settled.
#[derive(Debug, Default)]
pub(crate) struct Orphans {
    in_flight: HashMap<FlowId, u32>,
}

impl Orphans {
    pub(crate) fn adopt(&mut self, flow: FlowId, in_flight: u32) {
        self.in_flight.insert(flow, in_flight);
    }

    pub(crate) fn get(&self, flow: FlowId) -> Option<u32> {
        self.in_flight.get(&flow).copied()
    }

    /// `count` of the flow's messages are settled; whether it was an
    /// orphan, and whether that was its last.
    fn settle(&mut self, flow: FlowId, count: u32) -> Option<bool> {
        let left = self.in_flight.get_mut(&flow)?;
        *left = left.saturating_sub(count);
        if *left == 0 {
            self.in_flight.remove(&flow);
            return Some(true);
        }
        Some(false)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FlowId, &u32)> {
        self.in_flight.iter()
    }
}

impl Core {
    /// `Send` and `Call`.
    #[inline]
    pub(crate) fn send(
        &mut self,
        conn: ConnId,
        handle: u32,
        call: Option<u64>,
        caps: Vec<u32>,
        payload: Bytes,
    ) {
        // A send-once capability is used up by being used, and a moving
        // attachment leaves with its message, whatever becomes of either:
        // the driver counts them gone as it writes the frame, and the two
        // must agree without waiting to hear.
        match self.admit(conn, handle, call, caps.len(), payload) {
            Ok(mut envelope) => {
                envelope.caps = caps;
                self.deliver(envelope);
                if let Some(port) = self.used_once.take() {
                    self.sender_gone(port);
                }
            }
            Err(NotAdmitted::Dead {
                reason,
                seq,
                refund,
            }) => {
                self.refund(conn, refund);
                // A capability dead on its own: the port may live, but not
                // for this holder.
                self.cap_died(conn, handle, reason, |_| true);
                self.use_up_send_once(conn, handle, reason);
                self.release_moving(conn, &caps);
                self.refuse_message(conn, handle, seq, call, reason);
            }
            Err(NotAdmitted::Refused { refusal, refund }) => {
                // A refused reply's call fails now rather than at the
                // caller's timeout.
                self.use_up_send_once(conn, handle, Reason::ReplyDropped);
                self.release_moving(conn, &caps);
                self.refund(conn, refund);
                self.refuse_call(conn, 0, handle, call.unwrap_or(0), refusal);
            }
        }
    }

    /// Gives back the credit a driver spent on a message the core did not
    /// take it for.
    fn refund(&mut self, conn: ConnId, refund: Option<(u16, u32)>) {
        if let Some((port, count)) = refund {
            let port = self.lane_address(port);
            self.frame(conn, Header::SendCredit { port, count });
        }
    }

    /// A send-once capability named by a message that was not admitted is
    /// used up all the same; a reply capability's call fails with `reason`.
    fn use_up_send_once(&mut self, conn: ConnId, handle: u32, reason: Reason) {
        if self
            .cap(conn, handle)
            .is_some_and(|cap| cap.rights.contains(Rights::SEND_ONCE))
        {
            self.remove_cap(conn, handle, reason);
        }
    }

    /// A message that was not delivered takes its moving attachments with
    /// it: they leave the sender's table, and a reply capability among them
    /// fails its call.
    pub(crate) fn release_moving(&mut self, conn: ConnId, caps: &[u32]) {
        for (i, &handle) in caps.iter().enumerate() {
            if !caps[..i].contains(&handle)
                && handle != CONTROL_HANDLE
                && self.cap(conn, handle).is_some_and(Cap::moves)
            {
                self.remove_cap(conn, handle, Reason::ReplyDropped);
            }
        }
    }

    /// The sending side's checks, and the charge: sequence number, credit,
    /// budget. A send-once capability is used up here, whatever becomes of
    /// the message.
    #[inline(always)]
    fn admit(
        &mut self,
        conn: ConnId,
        handle: u32,
        call: Option<u64>,
        attachments: usize,
        payload: Bytes,
    ) -> Result<Envelope, NotAdmitted> {
        let cost = credit_cost(payload.len());
        let window = self.config.window;
        let max_pending = self.config.max_pending_calls;
        let now = self.now.unix;
        let origin = self.home_address(conn);
        let Some(c) = self.conns.get_mut(conn.key()) else {
            let refusal = Refusal::UnknownHandle { handle };
            return Err(NotAdmitted::Refused {
                refusal,
                refund: None,
            });
        };
        let pending_full = call.is_some() && c.pending_calls >= max_pending;
        let tag_in_use = call.is_some_and(|tag| c.calls.contains_key(&tag));
        let Some(cap) = c.caps.get_mut(handle) else {
            let refusal = Refusal::UnknownHandle { handle };
            return Err(NotAdmitted::Refused {
                refusal,
                refund: None,
            });
        };
        // Every frame naming a held handle takes a sequence number, refused
        // or not, so both ends count alike.
        let seq = cap.seq;
        cap.seq += 1;
        // Replies are never held back (the caller's pending-call limit
        // bounds them), nor are control requests.
        let metered = cap.metered();
        let lane = cap.port_number();
        let refused = |refusal, refund: bool| NotAdmitted::Refused {
            refusal,
            refund: refund.then_some((lane, cost)),
        };
        // A malformed call is refused as such before anything else, so no
        // notice ever names tag 0.
        if call == Some(0) {
            return Err(refused(Refusal::BadTag, metered));
        }
        if let (true, Some(tag)) = (tag_in_use, call) {
            return Err(refused(Refusal::TagInUse { tag }, metered));
        }
        let expired = cap.expires_at.is_some_and(|at| now >= at);
        // A shared budget may have run out on another capability.
        let spent = self.books.exhausted(&cap.budgets);
        if let Some(reason) = cap
            .dead
            .or(expired.then_some(Reason::Expired))
            .or(spent.then_some(Reason::Exhausted))
        {
            return Err(NotAdmitted::Dead {
                reason,
                seq,
                refund: metered.then_some((lane, cost)),
            });
        }
        // A reply answers a call; were it a call itself, the caller's
        // driver would get a reply capability nobody asked for.
        if call.is_some() && cap.reply_to.is_some() {
            return Err(refused(Refusal::CallOnReply { handle }, false));
        }
        if attachments > MAX_CAPS_PER_MESSAGE {
            let count = attachments;
            return Err(refused(Refusal::TooManyAttachments { count }, metered));
        }
        if pending_full {
            let limit = max_pending;
            return Err(refused(Refusal::TooManyPendingCalls { limit }, metered));
        }
        let mut low_credit = false;
        if metered {
            match c.lanes.spend(lane, cost) {
                Ok(left) => low_credit = left < window / 2,
                Err(_) => return Err(refused(Refusal::NoCredit { handle, cost }, false)),
            }
            cap.in_flight += 1;
        }
        // Counted as sent once admitted; control requests are not traffic.
        let Target::Local(to) = cap.target;
        if to.index != u32::from(CONTROL_PORT) {
            c.traffic.sent(payload.len());
        }
        // One message from each budget it draws from, shared with every
        // capability attenuated from the same one.
        let exhausted = !cap.budgets.is_empty() && self.books.spend(&cap.budgets);
        let envelope = Envelope {
            from: conn,
            origin,
            via: handle,
            flow: metered.then_some(CapRef {
                conn,
                handle,
                flow: cap.flow,
            }),
            target: cap.target,
            rights: cap.rights,
            seq,
            cost,
            call,
            reply_to: cap.reply_to,
            caps: Vec::new(),
            payload,
            low_credit,
        };
        if exhausted {
            // The last unit is spent whatever becomes of this message.
            self.budget_spent(conn, handle);
        }

        if envelope.rights.contains(Rights::SEND_ONCE)
            && let Some(cap) = self.take_cap(conn, handle)
        {
            // Counted gone once the message is on its way (see `send`), so
            // that a port's last sender's message is not overtaken by the
            // no-senders notice, and a stand-in port outlives its use.
            self.used_once = Some(cap.port());
        }
        Ok(envelope)
    }

    /// Hands an admitted message to its target.
    #[inline(always)]
    fn deliver(&mut self, envelope: Envelope) {
        match envelope.target {
            Target::Local(port) => self.deliver_local(envelope, port),
        }
    }

    #[inline(always)]
    fn deliver_local(&mut self, envelope: Envelope, port: Key) {
        let Envelope {
            from,
            origin,
            via,
            flow,
            rights,
            seq,
            cost,
            call,
            reply_to,
            caps,
            payload,
            low_credit,
            ..
        } = envelope;
        if port.index == u32::from(CONTROL_PORT) {
            match call {
                Some(tag) => self.control_call(from, tag, &caps, &payload),
                None => self.refuse(from, 0, via, Refusal::ControlSend),
            }
            // The control port keeps no capability: moving ones shown to it
            // are gone all the same, as the driver counts them.
            self.release_moving(from, &caps);
            return;
        }
        let Some(owner) = self.ports.get(port).and_then(|p| p.owner) else {
            if self.ports.get(port).is_some_and(|p| p.proxy.is_some()) {
                // A stand-in: the port is on another junction.
                let envelope = Envelope {
                    from,
                    origin,
                    via,
                    flow,
                    target: Target::Local(port),
                    rights,
                    seq,
                    cost,
                    call,
                    reply_to,
                    caps,
                    payload,
                    low_credit,
                };
                return self.deliver_remote(envelope, port);
            }
            let reason = self.ports.death_reason(port);
            if let Some(at) = flow {
                self.settle(at, 1, cost, port.index as u16);
            }
            self.release_moving(from, &caps);
            self.refuse_message(from, via, seq, call, reason);
            return;
        };
        if let Err(refusal) = self.check_transfer(from, owner, via, &caps, call) {
            match flow {
                Some(at) => {
                    self.settle(at, 1, cost, port.index as u16);
                }
                None if rights.contains(Rights::SEND_ONCE) => {
                    // The reply capability was used up by a refused reply:
                    // the call fails.
                    if let Some(route) = reply_to {
                        self.call_failed(route, Reason::ReplyDropped);
                    }
                }
                None => {}
            }
            self.release_moving(from, &caps);
            self.refuse_call(from, 0, via, call.unwrap_or(0), refusal);
            return;
        }
        let granted = self.transfer(from, owner, &caps);

        let reply = match call {
            Some(tag) => {
                let caller_home = self
                    .conns
                    .get(from.key())
                    .and_then(|c| self.ports.key(c.home));
                let route = ReplyRoute::Local { caller: from, tag };
                let reply_handle = caller_home
                    .and_then(|home| self.new_cap(owner, home, Rights::SEND_ONCE, Some(route)));
                if let Some(handle) = reply_handle {
                    self.track_call(route, owner, handle, true);
                }
                reply_handle
            }
            None => None,
        };
        let (tag, is_reply) = match reply_to {
            Some(ReplyRoute::Local { caller, tag }) => {
                // Answered: nothing left to cancel.
                if let Some(c) = self.conns.get_mut(caller.key()) {
                    c.calls.remove(&tag);
                }
                (tag, true)
            }
            // Reply capabilities for remote callers reach a stand-in port,
            // never a local one.
            Some(ReplyRoute::Remote { .. }) | None => (0, false),
        };
        // Ask for a prompt report when the sender would soon stall: for a
        // send, its credit; for a reply, its caller's pending calls.
        let ack = low_credit
            || (is_reply
                && self
                    .conns
                    .get(owner.key())
                    .is_some_and(|c| c.pending_calls >= self.config.max_pending_calls / 2));
        if let Some(p) = self.ports.get_mut(port) {
            p.in_flight.push_back(InFlight {
                flow,
                cost,
                seq,
                reply,
                is_reply,
                junction: 0,
                export: 0,
                n: 0,
            });
        }
        let identity = self
            .conns
            .get(from.key())
            .and_then(|c| c.identity.as_ref().map(|(id, _)| id.clone()));
        let deliver = Deliver {
            port: port.index as u16,
            origin,
            tag,
            reply,
            caps: granted,
            ack,
            identity,
        };
        self.out.push_back(Output::Frame {
            conn: owner,
            frame: Frame::with_payload(Header::Deliver(deliver), payload),
        });
    }

    /// A message to a dead port: the sender is told, and a call fails.
    pub(crate) fn refuse_message(
        &mut self,
        conn: ConnId,
        handle: u32,
        seq: u64,
        call: Option<u64>,
        reason: Reason,
    ) {
        if let Some(tag) = call {
            self.frame(conn, Header::CallFailed { tag, reason });
        }
        self.frame(
            conn,
            Header::Undeliverable {
                handle,
                first_seq: seq,
                count: 1,
                reason,
            },
        );
    }

    /// `count` messages of flow `at` to port number `port`, costing `units`
    /// credit units, are settled: consumed, refused or undeliverable. The
    /// credit goes back to the sender's lane to the port whatever became of
    /// them. Whether the holder should still hear about them (its
    /// capability is held, or it dropped it since).
    pub(crate) fn settle(&mut self, at: CapRef, count: u32, units: u32, port: u16) -> bool {
        let window = self.config.window;
        let Some(c) = self.conns.get_mut(at.conn.key()) else {
            // Its connection left; an orphan flow ends with it.
            self.orphans.settle(at.flow, count);
            return false;
        };
        if c.lanes.give_back(port, units, window) {
            let port = self
                .remote
                .lane_address(&self.ports, self.config.junction, port);
            self.out.push_back(Output::Frame {
                conn: at.conn,
                frame: Frame::bare(Header::SendCredit { port, count: units }),
            });
        }
        if let Some(cap) = c.caps.get_ref_mut(at) {
            cap.in_flight = cap.in_flight.saturating_sub(count);
            return true;
        }
        let Some(last) = self.orphans.settle(at.flow, count) else {
            return false;
        };
        if last {
            c.caps.release(at.handle);
        }
        true
    }

    /// Checks that every capability in `caps` may travel from `from` to `to`.
    fn check_transfer(
        &self,
        from: ConnId,
        to: ConnId,
        sending_on: u32,
        caps: &[u32],
        call: Option<u64>,
    ) -> Result<(), Refusal> {
        // A call's reply capability needs no room under the receiver's
        // handle limit, only a slot (see `CapTable`).
        if call.is_some() && !self.conns.get(to.key()).is_some_and(|c| c.caps.has_slot()) {
            return Err(Refusal::ReceiverFull);
        }
        if caps.is_empty() {
            return Ok(());
        }
        let Some(c) = self.conns.get(from.key()) else {
            return Err(Refusal::UnknownHandle { handle: sending_on });
        };
        for (i, &handle) in caps.iter().enumerate() {
            if caps[..i].contains(&handle) || handle == sending_on {
                return Err(Refusal::RepeatedAttachment { handle });
            }
            let Some(cap) = c.caps.get(handle) else {
                return Err(Refusal::UnknownAttachment { handle });
            };
            if !cap.rights.contains(Rights::GRANT) {
                let rights = cap.rights;
                return Err(Refusal::NotGrantable { handle, rights });
            }
        }
        if !self.has_room(to, caps.len()) {
            return Err(Refusal::ReceiverFull);
        }
        Ok(())
    }

    /// A call's reply capability is now `handle` in `holder`'s table: a
    /// `new` call counts as pending; a moved one's caller learns where it
    /// went, unless it cancelled the call already.
    pub(crate) fn track_call(&mut self, route: ReplyRoute, holder: ConnId, handle: u32, new: bool) {
        let Some(flow) = self.cap(holder, handle).map(|cap| cap.flow) else {
            return;
        };
        let at = CapRef {
            conn: holder,
            handle,
            flow,
        };
        let (caller, tag) = match route {
            ReplyRoute::Local { caller, tag } => (caller, tag),
            ReplyRoute::Remote { junction, call } => {
                self.remote.reply_is_at(junction, call, at);
                return;
            }
        };
        let Some(c) = self.conns.get_mut(caller.key()) else {
            return;
        };
        if new {
            c.calls.insert(tag, CallAt::Local(at));
            c.pending_calls += 1;
        } else if let Some(entry) = c.calls.get_mut(&tag) {
            *entry = CallAt::Local(at);
        }
    }

    pub(crate) fn has_room(&self, conn: ConnId, n: usize) -> bool {
        self.conns
            .get(conn.key())
            .is_some_and(|c| c.caps.has_room(n))
    }

    /// Moves send-once and budgeted capabilities and copies the others from
    /// `from` to `to`.
    fn transfer(&mut self, from: ConnId, to: ConnId, caps: &[u32]) -> Vec<Granted> {
        let mut granted = Vec::with_capacity(caps.len());
        for &h in caps {
            let flow = self.new_flow();
            let Some(cap) = self.cap(from, h) else {
                continue;
            };
            let moves = cap.moves();
            let rights = cap.rights;
            let credits = self.initial_credits(rights);
            // The copy is made before a moved original leaves, so the port
            // never looks sender-less in between.
            let copy = cap.copy(flow);
            let port = copy.port();
            let route = copy.reply_to;
            let inserted = self.insert_cap(to, copy);
            if let (Some(route), Some(handle)) = (route, inserted) {
                // A reply capability passed on still answers its call, and
                // cancelling the call must find it where it went.
                self.track_call(route, to, handle, false);
            }
            if moves && let Some(original) = self.take_cap(from, h) {
                self.sender_gone(original.port());
            }
            let Some(handle) = inserted else {
                continue;
            };
            granted.push(Granted {
                handle,
                rights,
                credits,
                address: self.lane_address(port.index as u16),
                moves,
            });
        }
        granted
    }

    /// The owner of `port` consumed `count` messages: credits go back to
    /// the flows they came on.
    pub(crate) fn credit(&mut self, conn: ConnId, port: u16, count: u32) {
        let Some(key) = self.owned_port(conn, port) else {
            self.refuse(conn, 0, NO_HANDLE, Refusal::UnknownPort { port });
            return;
        };
        let number = key.index as u16;
        let mut returns = std::mem::take(&mut self.credit_scratch);
        let mut settled = Vec::new();
        let mut replies = 0u32;
        if let Some(p) = self.ports.get_mut(key) {
            let n = (count as usize).min(p.in_flight.len());
            for entry in p.in_flight.drain(..n) {
                if entry.is_reply {
                    replies += 1;
                }
                if entry.junction != 0 {
                    settled.push((entry.junction, entry.export, entry.n, entry.cost));
                }
                if let Some(at) = entry.flow {
                    match returns.last_mut() {
                        Some((last, units, messages)) if *last == at => {
                            *units += entry.cost;
                            *messages += 1;
                        }
                        _ => returns.push((at, entry.cost, 1)),
                    }
                }
            }
        }
        if replies > 0
            && let Some(c) = self.conns.get_mut(conn.key())
        {
            c.pending_calls = c.pending_calls.saturating_sub(replies);
        }
        for &(at, units, messages) in &returns {
            self.settle(at, messages, units, number);
        }
        returns.clear();
        self.credit_scratch = returns;
        if !settled.is_empty() {
            self.remote_settled(key, &settled);
        }
    }
}
