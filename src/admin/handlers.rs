//! Backends that answer client `rpc` calls on their admin connection
//! (`rpc.admin_handlers`), for backends that keep one open rather than
//! serve webhooks.
//!
//! A connection sends HANDLE with method prefixes. The backend thread
//! routes a call whose method one of them matches (at least as long as any
//! webhook route's prefix) to the admin gateway, which picks a handler (the
//! longest matching prefix, round robin among connections with the same
//! one), writes a CALL frame to it and waits for its ANSWER, at most
//! `rpc.timeout_ms`. Calls are pipelined: a handler may answer in any
//! order. A handler with `rpc.handler_calls_max` unanswered calls gets no
//! more (they fail with `unavailable`), and one that goes away fails its
//! unanswered calls with `unavailable`. Calls are never retried: the
//! handler may have acted on one it did not answer.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::mpsc;
use serde_json::value::RawValue;

use crate::admin::gateway::Gateway;
use crate::backend::webhook;
use crate::bus::backend::{BackendFailure, BackendReply, BackendRequest, CallOutcome, CallRoute};
use crate::bus::Message;
use kometa_protocol::admin::{AdminError, ErrorCode, FrameWriter};

/// How often, at most, unanswered calls are checked against their deadline
/// while any handler is registered (a call times out at most this late).
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// The handler connections and the calls they owe answers to.
#[derive(Default)]
pub struct Handlers {
    next_handler_id: u64,
    next_call_id: u32,
    /// Spreads calls over handlers with the same prefix.
    rotation: usize,
    connections: HashMap<u64, HandlerConnection>,
    calls: HashMap<u32, PendingCall>,
    /// Deadlines, earliest first (a reload may change `rpc.timeout_ms`, so
    /// sending order is not deadline order). An entry whose call was
    /// answered, or whose id was reused, no longer matches the call's own
    /// deadline and is skipped.
    deadlines: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Whether the timeout task runs (only while handlers or calls exist).
    sweeping: bool,
}

struct HandlerConnection {
    prefixes: Vec<Box<str>>,
    /// Ids of calls to write; the connection's task takes them and writes
    /// the CALL frames of those still waiting (a call that timed out in
    /// the queue is not sent).
    queued: mpsc::UnboundedSender<u32>,
    /// Calls routed here and not answered, expired or failed (bounded by
    /// `rpc.handler_calls_max`).
    unanswered: usize,
    /// Ids in `queued` not yet taken by the connection (bounded the same
    /// way: a connection stuck in a write gets no more).
    unwritten: usize,
}

struct PendingCall {
    request: BackendRequest,
    handler: u64,
    deadline: Instant,
}

/// A connection's registration as a handler; dropping it (the connection
/// ends) unregisters it and fails its unanswered calls.
pub struct HandlerLink {
    pub id: u64,
    /// Ids of the calls for this connection to write.
    pub queued: mpsc::UnboundedReceiver<u32>,
    gateway: Rc<RefCell<Gateway>>,
}

impl HandlerLink {
    /// The CALL frames of `call_ids` that still wait for this connection.
    pub fn frames(&self, call_ids: &[u32]) -> Vec<u8> {
        let mut gateway = self.gateway.borrow_mut();
        if let Some(connection) = gateway.handlers.connections.get_mut(&self.id) {
            connection.unwritten = connection.unwritten.saturating_sub(call_ids.len());
        }
        let mut frames = Vec::new();
        for call_id in call_ids {
            let Some(call) = gateway.handlers.calls.get(call_id) else { continue };
            if call.handler != self.id {
                continue;
            }
            let mut frame = FrameWriter::call(*call_id);
            frame.bytes32(&webhook::request_body(&call.request));
            frames.extend_from_slice(&frame.finish());
        }
        frames
    }
}

impl Drop for HandlerLink {
    fn drop(&mut self) {
        match self.gateway.try_borrow_mut() {
            Ok(mut gateway) => gateway.remove_handler(self.id),
            Err(_) => {
                // Not expected (no borrow lives across an await); never
                // leave the handler routed: remove it on the next turn.
                let (gateway, id) = (Rc::clone(&self.gateway), self.id);
                glommio::spawn_local(async move { gateway.borrow_mut().remove_handler(id) }).detach();
            }
        }
    }
}

/// HANDLE: registers the connection (or changes its prefixes). An empty
/// list keeps the link but routes nothing to it.
pub fn handle(
    gateway: &Rc<RefCell<Gateway>>,
    link: &mut Option<HandlerLink>,
    prefixes: Vec<Box<str>>,
) -> Result<(), AdminError> {
    let mut state = gateway.borrow_mut();
    let rpc = &state.config.rpc;
    if !rpc.admin_handlers {
        return Err(AdminError::new(
            ErrorCode::Unavailable,
            "handlers on the admin connection are off (rpc.admin_handlers = false)",
        ));
    }
    if prefixes.len() > rpc.handler_prefixes_max {
        let max = rpc.handler_prefixes_max;
        return Err(AdminError::new(
            ErrorCode::BadArgument,
            format!("more than {max} prefixes (rpc.handler_prefixes_max)"),
        ));
    }
    match link {
        Some(link) => state.set_prefixes(link.id, prefixes),
        None => {
            let (sender, queued) = mpsc::unbounded();
            let id = state.add_handler(prefixes, sender);
            *link = Some(HandlerLink { id, queued, gateway: Rc::clone(gateway) });
        }
    }
    if !state.handlers.sweeping {
        state.handlers.sweeping = true;
        glommio::spawn_local(sweep(Rc::clone(gateway))).detach();
    }
    Ok(())
}

/// Fails calls past their deadline, while there are handlers or calls.
async fn sweep(gateway: Rc<RefCell<Gateway>>) {
    loop {
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        let mut state = gateway.borrow_mut();
        state.expire_calls(Instant::now());
        if state.handlers.connections.is_empty() && state.handlers.calls.is_empty() {
            state.handlers.deadlines.clear();
            state.handlers.sweeping = false;
            return;
        }
    }
}

impl Gateway {
    fn add_handler(&mut self, prefixes: Vec<Box<str>>, queued: mpsc::UnboundedSender<u32>) -> u64 {
        let id = self.handlers.next_handler_id;
        self.handlers.next_handler_id += 1;
        self.share_prefixes(&prefixes, true);
        self.handlers.connections.insert(id, HandlerConnection { prefixes, queued, unanswered: 0, unwritten: 0 });
        tracing::info!(handler = id, "an admin connection handles rpc calls");
        id
    }

    fn set_prefixes(&mut self, id: u64, prefixes: Vec<Box<str>>) {
        let Some(old) = self.handlers.connections.get_mut(&id).map(|c| std::mem::take(&mut c.prefixes)) else {
            return;
        };
        self.share_prefixes(&old, false);
        self.share_prefixes(&prefixes, true);
        if let Some(connection) = self.handlers.connections.get_mut(&id) {
            connection.prefixes = prefixes;
        }
    }

    /// The connection is gone: its prefixes stop routing to it, and its
    /// unanswered calls fail.
    pub fn remove_handler(&mut self, id: u64) {
        let Some(connection) = self.handlers.connections.remove(&id) else { return };
        self.share_prefixes(&connection.prefixes, false);
        let owed: Vec<u32> =
            self.handlers.calls.iter().filter(|(_, call)| call.handler == id).map(|(call_id, _)| *call_id).collect();
        for call_id in owed {
            if let Some(call) = self.handlers.calls.remove(&call_id) {
                let why = "the backend handler disconnected before answering";
                self.reply_to_shard(call.request, Err(BackendFailure::Unavailable(why.into())));
            }
        }
        self.bus.flush();
        tracing::info!(handler = id, "an rpc handler connection ended");
    }

    /// Counts prefixes in (or out of) the table the backend thread routes by.
    fn share_prefixes(&self, prefixes: &[Box<str>], add: bool) {
        let Ok(mut table) = self.shared.rpc_handler_prefixes.write() else { return };
        for prefix in prefixes {
            if add {
                *table.entry(prefix.clone()).or_insert(0) += 1;
            } else if let Some(count) = table.get_mut(prefix) {
                *count -= 1;
                if *count == 0 {
                    table.remove(prefix);
                }
            }
        }
    }

    /// A call the backend thread routed here: to a handler, or failed now.
    pub(crate) fn call_handler(&mut self, request: BackendRequest) {
        let crate::bus::backend::BackendCall::Rpc { method, .. } = &request.call else {
            debug_assert!(false, "only rpc calls go to admin handlers");
            return;
        };
        let calls_max = self.config.rpc.handler_calls_max;
        let handlers = &mut self.handlers;
        // The longest matching prefix; round robin among its handlers.
        let mut best: Vec<(usize, u64)> = handlers
            .connections
            .iter()
            .filter_map(|(id, c)| {
                let length = c.prefixes.iter().filter(|p| method.starts_with(&***p)).map(|p| p.len()).max()?;
                Some((length, *id))
            })
            .collect();
        let Some(longest) = best.iter().map(|(length, _)| *length).max() else {
            let why = format!("no backend handler for method `{method}` (it disconnected)");
            return self.reply_to_shard(request, Err(BackendFailure::Unavailable(why)));
        };
        best.retain(|(length, _)| *length == longest);
        best.sort_unstable_by_key(|(_, id)| *id);
        handlers.rotation = handlers.rotation.wrapping_add(1);
        let start = handlers.rotation % best.len();
        // The first in turn that has room.
        let Some(handler_id) = (0..best.len()).map(|i| best[(start + i) % best.len()].1).find(|id| {
            handlers.connections.get(id).is_some_and(|c| c.unanswered < calls_max && c.unwritten < calls_max)
        }) else {
            let why = format!("backend handlers busy ({calls_max} unanswered calls each, rpc.handler_calls_max)");
            return self.reply_to_shard(request, Err(BackendFailure::Unavailable(why)));
        };
        // Ids wrap after 2^32 calls; one still waiting is skipped.
        let mut call_id = handlers.next_call_id;
        while handlers.calls.contains_key(&call_id) {
            call_id = call_id.wrapping_add(1);
        }
        handlers.next_call_id = call_id.wrapping_add(1);
        let Some(connection) = handlers.connections.get_mut(&handler_id) else { return };
        if connection.queued.unbounded_send(call_id).is_err() {
            let why = "the backend handler disconnected before the call";
            return self.reply_to_shard(request, Err(BackendFailure::Unavailable(why.into())));
        }
        connection.unanswered += 1;
        connection.unwritten += 1;
        let deadline = Instant::now() + Duration::from_millis(self.config.rpc.timeout_ms);
        handlers.calls.insert(call_id, PendingCall { request, handler: handler_id, deadline });
        handlers.deadlines.push(Reverse((deadline, call_id)));
    }

    /// ANSWER from handler `handler_id` to call `call_id`.
    pub fn answer_call(&mut self, handler_id: u64, call_id: u32, answer: &[u8]) -> Result<(), AdminError> {
        let owed = self.handlers.calls.get(&call_id).is_some_and(|call| call.handler == handler_id);
        if !owed {
            return Err(AdminError::new(
                ErrorCode::NotFound,
                format!("no call {call_id} waits for this connection's answer (timed out, or answered already)"),
            ));
        }
        let Some(call) = self.handlers.calls.remove(&call_id) else { return Ok(()) };
        if let Some(connection) = self.handlers.connections.get_mut(&handler_id) {
            connection.unanswered = connection.unanswered.saturating_sub(1);
        }
        let response_bytes_max = self.config.rpc.response_bytes_max;
        let outcome = if answer.len() > response_bytes_max {
            Err(BackendFailure::Error {
                code: None,
                message: format!("backend answer over rpc.response_bytes_max ({response_bytes_max} bytes)"),
            })
        } else {
            webhook::parse_answer(answer)
        };
        self.reply_to_shard(call.request, outcome);
        self.bus.flush();
        Ok(())
    }

    /// Fails the calls whose deadline has passed with `timeout`.
    fn expire_calls(&mut self, now: Instant) {
        let mut expired = false;
        while let Some(&Reverse((deadline, call_id))) = self.handlers.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.handlers.deadlines.pop();
            // Answered already, or the id now belongs to a later call.
            if self.handlers.calls.get(&call_id).is_none_or(|call| call.deadline != deadline) {
                continue;
            }
            let Some(call) = self.handlers.calls.remove(&call_id) else { continue };
            if let Some(connection) = self.handlers.connections.get_mut(&call.handler) {
                connection.unanswered = connection.unanswered.saturating_sub(1);
            }
            self.reply_to_shard(call.request, Err(BackendFailure::Timeout));
            expired = true;
        }
        if expired {
            self.bus.flush();
        }
    }

    fn reply_to_shard(&mut self, request: BackendRequest, outcome: Result<Box<RawValue>, BackendFailure>) {
        self.shared.backend_calls.count(&request.call, CallRoute::Handler, CallOutcome::of(&outcome));
        let shard = usize::from(request.conn.shard);
        self.bus.send(shard, Message::BackendReply(Box::new(BackendReply { request, outcome })));
    }
}
