//! Per-connection state: phase (HTTP head, WebSocket open, closing),
//! subscriptions, liveness timers, partial input and the outbox.
//!
//! Nothing here awaits or touches a socket; time comes in as `now_ms` from
//! the shard's coarse clock, so every timer decision is tested with a fake
//! clock. A connection at rest holds only this struct: no buffers.

pub mod http;
pub mod outbox;

use std::sync::Arc;

use crate::hub::index::LocalChannelId;
use crate::limits::Timeouts;
use kometa_protocol::token::Identity;
use kometa_protocol::ws::Fragments;
use outbox::Outbox;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading an HTTP request head (first request or keep-alive).
    Http,
    /// WebSocket open: frames in, frames out.
    WebSocket,
    /// We sent a close frame (or an HTTP response that ends the connection)
    /// and wait for the peer's close or for the outbox to drain.
    Closing,
    /// An HTTP session (SSE or long-poll): a slot without a socket.
    Session,
    /// The socket streaming an HTTP session's events (SSE response body).
    Stream,
    /// The socket of a long-poll request waiting for a session's messages.
    Polling,
    /// An HTTP error answered before the whole request was read: once the
    /// response is flushed our write side is shut and input is discarded
    /// until the peer's FIN (or the close deadline). Closing at once would
    /// make the kernel answer the rest of the request with a reset, which
    /// can destroy the response before the client reads it.
    Lingering,
}

/// Bit flags kept in two bytes (free: they fill padding before `generation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    /// A command is waiting for its owner's reply: input is not processed
    /// (and the socket not read) until it arrives, so commands are handled
    /// in order and a fast client is held back by TCP.
    pub const AWAITING_REPLY: Flags = Flags(1);
    /// The echo endpoint (conformance tests): messages are echoed back.
    pub const ECHO: Flags = Flags(1 << 1);
    /// Close the socket once the outbox is empty.
    pub const CLOSE_AFTER_FLUSH: Flags = Flags(1 << 2);
    /// We sent a WebSocket close frame.
    pub const CLOSE_SENT: Flags = Flags(1 << 3);
    /// The socket may have unread input (edge-triggered readiness was seen
    /// while input was paused, or a read stopped at its budget).
    pub const READ_PENDING: Flags = Flags(1 << 4);
    /// The connection completed a WebSocket upgrade (for the gauge).
    pub const UPGRADED: Flags = Flags(1 << 5);
    /// The user's owner counts this connection (so closing it must tell the owner).
    pub const REGISTERED: Flags = Flags(1 << 6);
    /// The last read found the socket empty: closing it needs no draining
    /// read first (unread input would make close() send a reset).
    pub const INPUT_DRAINED: Flags = Flags(1 << 7);
    /// The peer sent its FIN (epoll reported RDHUP). Reads go on to the end
    /// of stream: with edge-triggered epoll a short read no longer means a
    /// later edge will come, because the FIN may already sit behind the data.
    pub const PEER_SHUT_WRITE: Flags = Flags(1 << 8);
    /// The connection has an entry in the shard's ready queue: at most one,
    /// so a peer that keeps its socket full cannot collect several read
    /// budgets per tick (one per edge) at the expense of the others.
    pub const QUEUED: Flags = Flags(1 << 9);

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: Flags) {
        self.0 &= !other.0;
    }
}

/// A subscription as the connection records it: which local channel, and
/// its slot among that channel's subscribers (`PENDING_SLOT` until the owner
/// confirms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub channel: LocalChannelId,
    pub slot: u32,
}

/// Slot value of a subscription the owner has not confirmed yet.
pub const PENDING_SLOT: u32 = u32::MAX;

/// Bytes received but not yet usable: a partial HTTP head or WebSocket
/// frame, and a fragmented message being assembled.
#[derive(Debug, Default)]
pub struct RxState {
    pub remainder: Vec<u8>,
    pub fragments: Option<Box<Fragments>>,
}

impl RxState {
    pub fn is_empty(&self) -> bool {
        self.remainder.is_empty() && self.fragments.is_none()
    }
}

/// What the shard's sweep must do for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerAction {
    Nothing,
    /// Send a WebSocket ping.
    SendPing,
    /// Close the WebSocket with this code and reason.
    Close(u16, &'static str),
    /// The HTTP head did not arrive in time: answer 408 and close.
    HttpTimeout,
    /// Write an SSE comment so proxies keep the stream open.
    Heartbeat,
    /// A long-poll waited its full time: answer with no messages.
    PollTimeout,
    /// An HTTP session outlived its grace period without a client: end it.
    SessionExpired,
    /// Give up on the connection without further ceremony.
    Drop,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    pub phase: Phase,
    pub flags: Flags,
    /// Distinguishes this connection from earlier ones that used the same
    /// slab slot, so late replies for a closed connection are dropped.
    pub generation: u32,
    /// Last time bytes arrived (liveness).
    pub last_input_ms: u64,
    /// Last ping sent.
    pub last_ping_ms: u64,
    /// Http: the head must be complete by then. Closing: give up then.
    pub deadline_ms: u64,
    /// Who the token said the client is; boxed, as most connections in a
    /// broadcast are anonymous or share few users.
    pub identity: Option<Box<Identity>>,
    pub subscriptions: Vec<Subscription>,
    pub rx: Option<Box<RxState>>,
    pub outbox: Option<Box<Outbox>>,
    /// For HTTP sessions and the sockets serving them.
    pub http: Option<Box<http::HttpRole>>,
}

impl Session {
    pub fn new(generation: u32, now_ms: u64, timeouts: &Timeouts) -> Session {
        Session {
            phase: Phase::Http,
            flags: Flags::default(),
            generation,
            last_input_ms: now_ms,
            last_ping_ms: now_ms,
            deadline_ms: now_ms + timeouts.handshake_timeout_ms,
            identity: None,
            subscriptions: Vec::new(),
            rx: None,
            outbox: None,
            http: None,
        }
    }

    /// The authenticated user id.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.identity.as_ref().map(|identity| &identity.user)
    }

    /// The HTTP exchange finished and the connection stays open for another request.
    pub fn keep_alive(&mut self, now_ms: u64, timeouts: &Timeouts) {
        debug_assert_eq!(self.phase, Phase::Http);
        self.deadline_ms = now_ms + timeouts.handshake_timeout_ms;
    }

    /// The WebSocket upgrade succeeded.
    pub fn open(&mut self, now_ms: u64) {
        self.phase = Phase::WebSocket;
        self.last_input_ms = now_ms;
        self.last_ping_ms = now_ms;
    }

    /// We are ending the connection; the peer gets `close_timeout_ms` to answer.
    pub fn start_closing(&mut self, now_ms: u64, timeouts: &Timeouts) {
        self.phase = Phase::Closing;
        self.deadline_ms = now_ms + timeouts.close_timeout_ms;
    }

    pub fn on_input(&mut self, now_ms: u64) {
        self.last_input_ms = now_ms;
    }

    /// Decides what the sweep does with this connection at `now_ms`.
    pub fn on_timer(&mut self, now_ms: u64, timeouts: &Timeouts) -> TimerAction {
        if self.flags.contains(Flags::CLOSE_AFTER_FLUSH) {
            // Ending: only the flush deadline matters.
            return if now_ms >= self.deadline_ms { TimerAction::Drop } else { TimerAction::Nothing };
        }
        match self.phase {
            Phase::Http if now_ms >= self.deadline_ms => TimerAction::HttpTimeout,
            Phase::Http => TimerAction::Nothing,
            Phase::Closing | Phase::Lingering if now_ms >= self.deadline_ms => TimerAction::Drop,
            Phase::Closing | Phase::Lingering => TimerAction::Nothing,
            Phase::Session if now_ms >= self.deadline_ms => TimerAction::SessionExpired,
            Phase::Session => TimerAction::Nothing,
            Phase::Polling if now_ms >= self.deadline_ms => TimerAction::PollTimeout,
            Phase::Polling => TimerAction::Nothing,
            Phase::Stream => {
                if now_ms.saturating_sub(self.last_ping_ms) >= timeouts.sse_heartbeat_ms {
                    self.last_ping_ms = now_ms;
                    TimerAction::Heartbeat
                } else {
                    TimerAction::Nothing
                }
            }
            Phase::WebSocket => {
                let silent_ms = now_ms.saturating_sub(self.last_input_ms);
                if silent_ms >= timeouts.ping_interval_ms + timeouts.pong_timeout_ms {
                    return TimerAction::Close(kometa_protocol::ws::close::PING_TIMEOUT, "no pong");
                }
                let since_activity_ms = now_ms.saturating_sub(self.last_input_ms.max(self.last_ping_ms));
                if since_activity_ms >= timeouts.ping_interval_ms {
                    self.last_ping_ms = now_ms;
                    return TimerAction::SendPing;
                }
                TimerAction::Nothing
            }
        }
    }

    /// Drops the receive state once it holds nothing (invariant 1).
    pub fn shrink_rx(&mut self) {
        if self.rx.as_ref().is_some_and(|rx| rx.is_empty()) {
            self.rx = None;
        }
    }

    /// Drops the outbox once it holds nothing (invariant 1).
    pub fn shrink_outbox(&mut self) {
        if self.outbox.as_ref().is_some_and(|o| o.is_empty()) {
            self.outbox = None;
        }
    }

    /// A connection at rest: nothing buffered in either direction.
    pub fn is_at_rest(&self) -> bool {
        self.rx.is_none() && self.outbox.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            handshake_timeout_ms: 1_000,
            ping_interval_ms: 10_000,
            pong_timeout_ms: 5_000,
            close_timeout_ms: 2_000,
            shutdown_timeout_ms: 1_000,
            sweep_interval_ms: 100,
            session_grace_ms: 3_000,
            poll_timeout_ms: 1_000,
            sse_heartbeat_ms: 500,
            admin_write_timeout_ms: 1_000,
        }
    }

    #[test]
    fn http_head_deadline() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        assert_eq!(session.on_timer(999, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(1_000, &t), TimerAction::HttpTimeout);
        session.keep_alive(1_000, &t);
        assert_eq!(session.on_timer(1_500, &t), TimerAction::Nothing);
    }

    #[test]
    fn idle_websocket_is_pinged_then_closed_without_pong() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.open(0);
        assert_eq!(session.on_timer(9_999, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(10_000, &t), TimerAction::SendPing);
        // No second ping right after the first.
        assert_eq!(session.on_timer(12_000, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(15_000, &t), TimerAction::Close(4004, "no pong"));
    }

    #[test]
    fn pong_keeps_the_connection_alive() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.open(0);
        assert_eq!(session.on_timer(10_000, &t), TimerAction::SendPing);
        session.on_input(10_050);
        assert_eq!(session.on_timer(15_000, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(20_050, &t), TimerAction::SendPing);
    }

    #[test]
    fn active_clients_are_not_pinged() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.open(0);
        for now in (1_000..60_000).step_by(1_000) {
            session.on_input(now);
            assert_eq!(session.on_timer(now, &t), TimerAction::Nothing);
        }
    }

    #[test]
    fn ending_connections_only_wait_for_their_flush_deadline() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        session.deadline_ms = 500;
        assert_eq!(session.on_timer(499, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(500, &t), TimerAction::Drop);
    }

    #[test]
    fn closing_gives_up_after_close_timeout() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.open(0);
        session.start_closing(100, &t);
        assert_eq!(session.on_timer(2_099, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(2_100, &t), TimerAction::Drop);
    }

    #[test]
    fn http_session_timers() {
        let t = timeouts();
        let mut session = Session::new(0, 0, &t);
        session.phase = Phase::Session;
        session.deadline_ms = 3_000;
        assert_eq!(session.on_timer(2_999, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(3_000, &t), TimerAction::SessionExpired);
        session.phase = Phase::Polling;
        session.deadline_ms = 1_000;
        assert_eq!(session.on_timer(1_000, &t), TimerAction::PollTimeout);
        session.phase = Phase::Stream;
        session.last_ping_ms = 0;
        assert_eq!(session.on_timer(499, &t), TimerAction::Nothing);
        assert_eq!(session.on_timer(500, &t), TimerAction::Heartbeat);
        assert_eq!(session.on_timer(700, &t), TimerAction::Nothing);
    }

    #[test]
    fn session_stays_small() {
        // Invariant 1: a connection at rest is this struct plus a slab slot.
        assert!(std::mem::size_of::<Session>() <= 112, "{}", std::mem::size_of::<Session>());
    }
}
