//! One client connection as a state machine that never touches a socket.
//!
//! A [`Connection`] takes bytes in (`step`), time in (`Context::now_ms`,
//! passed by the driver, never read here) and gives effects out: bytes to
//! send and a FIN through the [`Io`] it is handed, events for the
//! application ([`Step`]: a request, a message), and a [`Verdict`] when the
//! driver must remove it. Its phase (HTTP head, WebSocket, closing, SSE
//! stream, waiting poll, socket-less HTTP session, lingering) is private:
//! the application moves it only through named transitions (`upgraded`,
//! `serve_stream`, `serve_poll`, ...).
//!
//! What stays outside: subscriptions, users and HTTP session routing
//! (application state the shard keeps in the same slab entry, the public
//! fields), and the socket itself (the shard's driver). Tests drive a
//! connection in memory with a fake clock and a fake socket (see `tests`).
//!
//! A connection at rest holds only this struct: no buffers (invariant 1).

pub mod http;
pub mod outbox;
pub mod sockjs;

use smallvec::SmallVec;
use std::sync::Arc;

use crate::hub::index::LocalChannelId;
use crate::hub::publication::Publication;
use crate::limits::{LimitKind, Limits, Timeouts};
use kometa_protocol::http::{self as http_codec, HeadLimits, Request};
use kometa_protocol::token::Identity;
use kometa_protocol::ws::{self, DecodeLimits, Event, Fragments, MessageKind, Payload};
use outbox::{Admission, OutItem, Outbox, Wire};

/// The most slices one gathered write takes (the driver's iovec array).
pub const IOVECS_MAX: usize = kometa_sys::IOVECS_MAX;

/// A kept input remainder with more spare capacity than this is shrunk.
const REMAINDER_SHRINK_BYTES: usize = 64 * 1024;
/// A ping with an empty payload.
const PING_FRAME: [u8; 2] = [0x80 | ws::OPCODE_PING, 0];
/// The interim response to `Expect: 100-continue`.
const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// An SSE comment: keeps proxies from timing out an idle stream.
pub const SSE_HEARTBEAT: &[u8] = b": ping\n\n";

/// The socket failed (reset, broken pipe): the connection can only be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

/// Something a connection did that the driver counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// The peer broke HTTP or WebSocket rules and is being closed.
    ProtocolError,
    /// The outbox passed its cap and the connection is being closed.
    SlowConsumer,
    /// A limit against abuse refused the peer (here: a deadline).
    Limit(LimitKind),
}

/// What a connection needs from its socket and its driver.
pub trait Io {
    /// A non-blocking gathered write of `chunks` in order (at most
    /// `IOVECS_MAX` are looked at): the bytes the socket took, 0 when full.
    fn send_vectored<'a>(&mut self, chunks: impl Iterator<Item = &'a [u8]> + Clone) -> Result<usize, Broken>;

    fn send(&mut self, bytes: &[u8]) -> Result<usize, Broken> {
        self.send_vectored(std::iter::once(bytes))
    }

    /// Sends our FIN (the read side stays open).
    fn shutdown_write(&mut self) -> Result<(), Broken>;

    /// Output the transport took but the socket has not (TLS records
    /// sealed ahead of the socket). The connection counts it as its own:
    /// it does not end before it is out.
    fn holds_output(&self) -> bool {
        false
    }

    /// Writes what the transport holds; `Ok(true)` once nothing is held.
    fn flush_held(&mut self) -> Result<bool, Broken> {
        Ok(true)
    }

    /// Tells the driver's counters.
    fn count(&mut self, what: Count);
}

/// The time and settings a connection decides with.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The driver's coarse clock (milliseconds, monotonic).
    pub now_ms: u64,
    pub limits: &'a Limits,
    pub timeouts: &'a Timeouts,
}

/// What the driver must do with a connection after a call.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove it now: the socket failed, or it finished ending.
    Close,
}

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
    /// The socket of a long-poll request waiting for a session's messages
    /// (or of a SockJS poll or stream: the application writes its body).
    Polling,
    /// An HTTP error answered before the whole request was read: once the
    /// response is flushed our write side is shut and input is discarded
    /// until the peer's FIN (or the close deadline). Closing at once would
    /// make the kernel answer the rest of the request with a reset, which
    /// can destroy the response before the client reads it.
    Lingering,
}

/// The connection's own protocol flags (private: only its transitions set them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flags(u8);

impl Flags {
    /// The echo endpoint (conformance tests): messages are echoed back.
    const ECHO: Flags = Flags(1);
    /// Close the socket once the outbox is empty.
    const CLOSE_AFTER_FLUSH: Flags = Flags(1 << 1);
    /// We sent a WebSocket close frame.
    const CLOSE_SENT: Flags = Flags(1 << 2);
    /// `100 Continue` went out for the request whose body is being read.
    const CONTINUE_SENT: Flags = Flags(1 << 3);
    /// `deadline` does not apply: a session while a stream or poll serves it.
    const NO_DEADLINE: Flags = Flags(1 << 4);

    fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    fn remove(&mut self, other: Flags) {
        self.0 &= !other.0;
    }
}

/// Bookkeeping bits the driver and the application keep on a connection
/// (free: they fill padding next to `generation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks(u16);

impl Marks {
    /// A command is waiting for its owner's reply: input is not processed
    /// (and the socket not read) until it arrives, so commands are handled
    /// in order and a fast client is held back by TCP.
    pub const AWAITING_REPLY: Marks = Marks(1);
    /// The socket may have unread input (edge-triggered readiness was seen
    /// while input was paused, or a read stopped at its budget).
    pub const READ_PENDING: Marks = Marks(1 << 1);
    /// The connection completed a WebSocket upgrade (for the gauge).
    pub const UPGRADED: Marks = Marks(1 << 2);
    /// The user's owner counts this connection (so closing it must tell the owner).
    pub const REGISTERED: Marks = Marks(1 << 3);
    /// The last read found the socket empty: closing it needs no draining
    /// read first (unread input would make close() send a reset).
    pub const INPUT_DRAINED: Marks = Marks(1 << 4);
    /// The peer sent its FIN (epoll reported RDHUP). Reads go on to the end
    /// of stream: with edge-triggered epoll a short read no longer means a
    /// later edge will come, because the FIN may already sit behind the data.
    pub const PEER_SHUT_WRITE: Marks = Marks(1 << 5);
    /// The connection has an entry in the shard's ready queue: at most one,
    /// so a peer that keeps its socket full cannot collect several read
    /// budgets per tick (one per edge) at the expense of the others.
    pub const QUEUED: Marks = Marks(1 << 6);

    pub fn contains(self, other: Marks) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Marks) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: Marks) {
        self.0 &= !other.0;
    }
}

/// A time on the shard's clock in milliseconds, kept modulo 2^32: 4 bytes
/// instead of 8 in every connection (three of them: 12 B of each idle
/// connection). Differences are right while the two times are less than
/// 2^31 ms (24.8 days) apart. Every timeout is at most an hour (config
/// validation), the sweep visits each connection every `sweep_interval_ms`,
/// and each stamp is read only while it is kept fresh: the deadline is set
/// anew whenever it starts to matter, a WebSocket silent for
/// `ping_interval_ms + pong_timeout_ms` is closed, the ping stamp is kept no
/// older than the last input, an SSE stream's heartbeat refreshes its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(u32);

impl Stamp {
    fn at(now_ms: u64) -> Stamp {
        Stamp(now_ms as u32)
    }

    fn after(now_ms: u64, delay_ms: u64) -> Stamp {
        debug_assert!(delay_ms < 1 << 31);
        Stamp(now_ms.wrapping_add(delay_ms) as u32)
    }

    /// Milliseconds from this stamp to `now_ms` (negative: in the future).
    fn until_now_ms(self, now_ms: u64) -> i64 {
        i64::from((now_ms as u32).wrapping_sub(self.0) as i32)
    }

    /// Milliseconds since this stamp (0 if it is in the future).
    fn elapsed_ms(self, now_ms: u64) -> u64 {
        self.until_now_ms(now_ms).max(0) as u64
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
struct RxState {
    remainder: Vec<u8>,
    fragments: Option<Box<Fragments>>,
}

impl RxState {
    fn is_empty(&self) -> bool {
        self.remainder.is_empty() && self.fragments.is_none()
    }
}

/// One step of input: what the connection made of the bytes at the start
/// of the input it was given.
#[derive(Debug)]
pub enum Step<'a> {
    /// Nothing more can be used now: the rest is incomplete, or input is
    /// paused (a reply or a poll's answer is awaited). Keep it.
    Wait,
    /// This many bytes were handled inside the connection (control frames,
    /// errors answered, input discarded while ending).
    Used(usize),
    /// A complete HTTP request for the application. `input` is the request
    /// and everything after it (a request handed to another shard takes it
    /// all). Once answered, unless the connection is now held (upgraded,
    /// streaming, polling, handed over), call `request_answered`.
    Request { used: usize, request: Request<'a>, body: &'a [u8], input: &'a [u8] },
    /// A complete text message from the WebSocket client.
    Message { used: usize, payload: Payload<'a> },
    /// Remove the connection now.
    Close,
}

/// What the timer decided that needs the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Nothing, or handled inside (pings, heartbeats, 408, close frames).
    Nothing,
    /// Remove the connection now (dead peer, deadline passed, session expired).
    Close,
    /// A long-poll waited its full time: answer it with no messages.
    PollTimeout,
}

/// One connection's state: the protocol machine (private) and the
/// application's records about it (public).
#[derive(Debug)]
pub struct Connection {
    phase: Phase,
    flags: Flags,
    pub marks: Marks,
    /// Distinguishes this connection from earlier ones that used the same
    /// slab slot, so late replies for a closed connection are dropped.
    generation: u32,
    /// Last time bytes arrived (liveness).
    last_input: Stamp,
    /// Last ping (WebSocket) or heartbeat (SSE) sent.
    last_ping: Stamp,
    /// Http: the head (and body) must be complete by then. WebSocket: a
    /// message begun must be complete by then (`message_timeout_ms` from
    /// its first byte; meaningful while input is kept). Ending: give up
    /// then. Polling: answer then. Session: expire then (never while
    /// served: `Flags::NO_DEADLINE`).
    deadline: Stamp,
    rx: Option<Box<RxState>>,
    outbox: Option<Box<Outbox>>,
    /// Who the token said the client is; boxed, as most connections in a
    /// broadcast are anonymous or share few users.
    pub identity: Option<Box<Identity>>,
    /// Two inline: most connections hold one or two, and then need no
    /// allocation (the list is 24 B either way).
    pub subscriptions: SmallVec<[Subscription; 2]>,
    /// For HTTP sessions and the sockets serving them.
    pub http: Option<Box<http::HttpRole>>,
}

impl Connection {
    /// A freshly accepted socket, reading its first request head.
    pub fn new(generation: u32, cx: &Context<'_>) -> Connection {
        Connection {
            phase: Phase::Http,
            flags: Flags::default(),
            marks: Marks::default(),
            generation,
            last_input: Stamp::at(cx.now_ms),
            last_ping: Stamp::at(cx.now_ms),
            deadline: Stamp::after(cx.now_ms, cx.timeouts.handshake_timeout_ms),
            rx: None,
            outbox: None,
            identity: None,
            subscriptions: SmallVec::new(),
            http: None,
        }
    }

    /// An HTTP session: a slot without a socket, expiring after
    /// `session_grace_ms` unless a request comes to serve it.
    pub fn session(generation: u32, role: http::HttpSession, cx: &Context<'_>) -> Connection {
        let mut connection = Connection::new(generation, cx);
        connection.phase = Phase::Session;
        connection.set_deadline(cx.now_ms, cx.timeouts.session_grace_ms);
        connection.http = Some(Box::new(http::HttpRole::Session(role)));
        connection
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The authenticated user id.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.identity.as_ref().map(|identity| &identity.user)
    }

    /// Ending: waiting for its output to drain before it goes.
    pub fn is_ending(&self) -> bool {
        self.flags.contains(Flags::CLOSE_AFTER_FLUSH)
    }

    /// Output waits for the socket.
    pub fn has_output(&self) -> bool {
        self.outbox.is_some()
    }

    /// Bytes waiting for the socket.
    pub fn output_bytes(&self) -> usize {
        self.outbox.as_ref().map_or(0, |outbox| outbox.pending_bytes())
    }

    /// Messages waiting for the socket (the shard counts them in its backlog).
    pub fn output_messages(&self) -> usize {
        self.outbox.as_ref().map_or(0, |outbox| outbox.len())
    }

    /// Input waits for more bytes or for a pause to end.
    pub fn has_input_remainder(&self) -> bool {
        self.rx.as_ref().is_some_and(|rx| !rx.remainder.is_empty())
    }

    /// Sets the deadline `delay_ms` from now (and ends a served session's
    /// exemption).
    fn set_deadline(&mut self, now_ms: u64, delay_ms: u64) {
        self.deadline = Stamp::after(now_ms, delay_ms);
        self.flags.remove(Flags::NO_DEADLINE);
    }

    fn deadline_passed(&self, now_ms: u64) -> bool {
        !self.flags.contains(Flags::NO_DEADLINE) && self.deadline.until_now_ms(now_ms) >= 0
    }

    /// A connection at rest: nothing buffered in either direction.
    pub fn is_at_rest(&self) -> bool {
        self.rx.is_none() && self.outbox.is_none()
    }

    // -- Application transitions ------------------------------------------

    /// The WebSocket upgrade was answered: frames from now on.
    pub fn upgraded(&mut self, echo: bool, cx: &Context<'_>) {
        debug_assert_eq!(self.phase, Phase::Http);
        self.phase = Phase::WebSocket;
        self.last_input = Stamp::at(cx.now_ms);
        self.last_ping = Stamp::at(cx.now_ms);
        // Frames sent right behind the upgrade request started with it.
        self.set_deadline(cx.now_ms, cx.timeouts.message_timeout_ms);
        self.marks.insert(Marks::UPGRADED);
        if echo {
            self.flags.insert(Flags::ECHO);
        }
    }

    /// This socket now streams an HTTP session's events (its response head is sent).
    pub fn serve_stream(&mut self, role: http::HttpRole, cx: &Context<'_>) {
        self.phase = Phase::Stream;
        self.last_ping = Stamp::at(cx.now_ms);
        self.http = Some(Box::new(role));
    }

    /// This socket's poll waits (up to `poll_timeout_ms`) for a session's messages.
    pub fn serve_poll(&mut self, role: http::HttpRole, cx: &Context<'_>) {
        self.phase = Phase::Polling;
        self.set_deadline(cx.now_ms, cx.timeouts.poll_timeout_ms);
        self.http = Some(Box::new(role));
    }

    /// The poll was answered (its response is queued): the socket reads its
    /// next request.
    pub fn poll_answered(&mut self, cx: &Context<'_>) {
        self.http = None;
        self.phase = Phase::Http;
        self.set_deadline(cx.now_ms, cx.timeouts.handshake_timeout_ms);
    }

    /// A session got a stream or poll: it does not expire while served.
    pub fn session_served(&mut self) {
        debug_assert_eq!(self.phase, Phase::Session);
        self.flags.insert(Flags::NO_DEADLINE);
    }

    /// A session lost its stream or poll: its grace period starts.
    pub fn session_unserved(&mut self, cx: &Context<'_>) {
        debug_assert_eq!(self.phase, Phase::Session);
        self.set_deadline(cx.now_ms, cx.timeouts.session_grace_ms);
    }

    /// The application answered a request and the connection was not taken
    /// over: it reads the next request (keep-alive) or ends.
    pub fn request_answered(&mut self, keep_alive: bool, io: &impl Io, cx: &Context<'_>) -> Verdict {
        if self.phase != Phase::Http || self.is_ending() {
            // Already ending (a refused upgrade): its close deadline stands.
            return Verdict::Keep;
        }
        if keep_alive {
            self.set_deadline(cx.now_ms, cx.timeouts.handshake_timeout_ms);
            Verdict::Keep
        } else {
            self.end_after_flush(io, cx)
        }
    }

    // -- Input ------------------------------------------------------------

    /// Bytes arrived (liveness). On a WebSocket with nothing kept, they
    /// begin a message: it must be whole within `message_timeout_ms`.
    pub fn on_input(&mut self, cx: &Context<'_>) {
        self.last_input = Stamp::at(cx.now_ms);
        if self.phase == Phase::WebSocket && self.rx.is_none() {
            self.set_deadline(cx.now_ms, cx.timeouts.message_timeout_ms);
        }
    }

    /// Takes the input kept from earlier reads (empty when none): the driver
    /// appends fresh bytes to it and steps through it.
    pub fn take_remainder(&mut self) -> Vec<u8> {
        self.rx.as_mut().map(|rx| std::mem::take(&mut rx.remainder)).unwrap_or_default()
    }

    /// Keeps input the connection could not use yet. Past `cap_bytes` the
    /// connection ends: the codecs check declared lengths before asking for
    /// more, so that means a bug, not a hostile peer.
    pub fn keep_remainder(&mut self, mut remainder: Vec<u8>, cap_bytes: usize) -> Verdict {
        if remainder.len() > cap_bytes {
            crate::limited!(ERROR, bytes = remainder.len(), cap_bytes, "input remainder over its cap");
            return Verdict::Close;
        }
        if remainder.is_empty() {
            if let Some(rx) = self.rx.as_mut() {
                rx.remainder = Vec::new();
            }
            self.shrink_rx();
            return Verdict::Keep;
        }
        // Give back memory a large frame left behind, but not while a
        // frame is still growing (that would copy it on every read).
        if remainder.capacity() > REMAINDER_SHRINK_BYTES && remainder.len() < remainder.capacity() / 4 {
            remainder.shrink_to_fit();
        }
        self.rx.get_or_insert_with(Default::default).remainder = remainder;
        Verdict::Keep
    }

    /// Uses the request or frame at the start of `input`.
    pub fn step<'a>(&mut self, input: &'a mut [u8], io: &mut impl Io, cx: &Context<'_>) -> Step<'a> {
        if input.is_empty() {
            return Step::Wait;
        }
        if self.is_ending() {
            // Ending: nothing more is read from this connection.
            return Step::Used(input.len());
        }
        if self.marks.contains(Marks::AWAITING_REPLY) {
            return Step::Wait;
        }
        match self.phase {
            Phase::Http => self.http_step(input, io, cx),
            Phase::WebSocket | Phase::Closing => self.websocket_step(input, io, cx),
            // A waiting poll: keep what follows for after its answer.
            Phase::Polling => Step::Wait,
            // An SSE stream: the client has nothing more to say on it.
            // Lingering: the rest of a refused request is discarded.
            Phase::Stream | Phase::Session | Phase::Lingering => Step::Used(input.len()),
        }
    }

    fn http_step<'a>(&mut self, input: &'a mut [u8], io: &mut impl Io, cx: &Context<'_>) -> Step<'a> {
        let input: &'a [u8] = input;
        let limits =
            HeadLimits { head_bytes_max: cx.limits.http_head_bytes_max, headers_max: cx.limits.http_headers_max };
        let refuse = |this: &mut Self, io: &mut _, status, reason| match this.refuse_request(status, reason, io, cx) {
            Verdict::Keep => Step::Used(input.len()),
            Verdict::Close => Step::Close,
        };
        let request = match http_codec::parse_head(input, limits) {
            Ok(None) => return Step::Wait,
            Ok(Some(request)) => request,
            Err(error) => return refuse(self, io, error.status(), error.reason()),
        };
        if request.transfer_encoding {
            // No chunked bodies (or anything else but Content-Length): the
            // body's end is unknown, so the connection cannot go on either.
            return refuse(self, io, 400, "Transfer-Encoding is not supported in requests; send Content-Length");
        }
        let body_bytes = request.content_length.unwrap_or(0);
        if body_bytes > cx.limits.http_body_bytes_max as u64 {
            return refuse(self, io, 413, "request body too large");
        }
        // Within http_body_bytes_max, so it fits in usize.
        let used = request.head_len + body_bytes as usize;
        if input.len() < used {
            // RFC 9110 §10.1.1: a client that expects it waits for this
            // before sending the body (refusals went out above instead).
            if request.expect == http_codec::Expect::Continue && !self.flags.contains(Flags::CONTINUE_SENT) {
                self.flags.insert(Flags::CONTINUE_SENT);
                if self.send_owned(CONTINUE_RESPONSE.to_vec(), io, cx) == Verdict::Close {
                    return Step::Close;
                }
            }
            return Step::Wait;
        }
        self.flags.remove(Flags::CONTINUE_SENT);
        let body = &input[request.head_len..used];
        Step::Request { used, request, body, input }
    }

    /// Answers a request we will not read to its end, then lingers.
    fn refuse_request(&mut self, status: u16, reason: &str, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        io.count(Count::ProtocolError);
        let mut response = Vec::with_capacity(160 + reason.len());
        http_codec::write_text_response(&mut response, status, &[], reason, false);
        if self.send(OutItem::Owned(response.into_boxed_slice()), io, cx) == Verdict::Close {
            return Verdict::Close;
        }
        self.linger(io, cx)
    }

    fn websocket_step<'a>(&mut self, input: &'a mut [u8], io: &mut impl Io, cx: &Context<'_>) -> Step<'a> {
        let limits = DecodeLimits { message_bytes_max: cx.limits.client_message_bytes_max };
        let closing = self.phase == Phase::Closing;
        let total = input.len();
        let mut fragments = self.rx.as_mut().and_then(|rx| rx.fragments.take());
        let decoded = ws::decode_frame(input, &mut fragments, limits);
        if let Some(fragments) = fragments {
            self.rx.get_or_insert_with(Default::default).fragments = Some(fragments);
        }
        let decoded = match decoded {
            Ok(None) => return Step::Wait,
            Ok(Some(decoded)) => decoded,
            Err(violation) => {
                // Fail the connection (RFC 6455 §7.1.7): our close frame (if
                // not sent yet), then our FIN, and what follows is not decoded
                // any more (it would be read as frames: more violations, and
                // a reset that could destroy the close frame). Input is read
                // away until the peer's FIN, bounded by close_timeout_ms.
                if !closing {
                    io.count(Count::ProtocolError);
                    crate::limited!(
                        DEBUG,
                        code = violation.code,
                        reason = violation.reason,
                        "websocket protocol violation"
                    );
                    if self.close_websocket(violation.code, violation.reason, io, cx) == Verdict::Close {
                        return Step::Close;
                    }
                }
                return match self.linger(io, cx) {
                    Verdict::Keep => Step::Used(total),
                    Verdict::Close => Step::Close,
                };
            }
        };
        let used = decoded.consumed;
        let Some(event) = decoded.event else { return Step::Used(used) };
        if !closing && self.rx.as_ref().is_none_or(|rx| rx.fragments.is_none()) {
            // A message (or a control frame between messages) is whole: what
            // follows in this input began now.
            self.set_deadline(cx.now_ms, cx.timeouts.message_timeout_ms);
        }
        let verdict = match event {
            Event::Ping(payload) if !closing => self.send_owned(ws::encode_frame(ws::OPCODE_PONG, payload), io, cx),
            // Any input already counts as liveness.
            Event::Ping(_) | Event::Pong(_) => Verdict::Keep,
            Event::Close(code, _reason) => self.peer_close_frame(code, io, cx),
            Event::Message(..) if closing => Verdict::Keep,
            Event::Message(kind, payload) if self.flags.contains(Flags::ECHO) => {
                let opcode = if kind == MessageKind::Text { ws::OPCODE_TEXT } else { ws::OPCODE_BINARY };
                self.send_owned(ws::encode_frame(opcode, &payload), io, cx)
            }
            Event::Message(MessageKind::Text, payload) => return Step::Message { used, payload },
            Event::Message(MessageKind::Binary, _) => {
                io.count(Count::ProtocolError);
                self.close_websocket(
                    ws::close::UNSUPPORTED_DATA,
                    "binary messages are not supported; send JSON text",
                    io,
                    cx,
                )
            }
        };
        match verdict {
            Verdict::Keep => Step::Used(used),
            Verdict::Close => Step::Close,
        }
    }

    /// The peer's close frame: it answers ours, or we echo its code (RFC
    /// 6455 §5.5.1) and, being the server, close the TCP connection first
    /// (§7.1.1) once the echo is out.
    fn peer_close_frame(&mut self, code: Option<u16>, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        if !self.flags.contains(Flags::CLOSE_SENT) {
            let reply = match code {
                Some(code) => ws::encode_close(code, ""),
                None => ws::encode_frame(ws::OPCODE_CLOSE, &[]),
            };
            self.flags.insert(Flags::CLOSE_SENT);
            self.phase = Phase::Closing;
            if self.send_owned(reply, io, cx) == Verdict::Close {
                return Verdict::Close;
            }
        }
        self.end_after_flush(io, cx)
    }

    // -- Output -----------------------------------------------------------

    /// Sends `item` now if the socket takes it, else queues it in the
    /// outbox; an outbox that would pass its cap makes this a slow consumer.
    pub fn send(&mut self, item: OutItem, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        debug_assert!(!item.bytes().is_empty());
        debug_assert_ne!(self.phase, Phase::Session, "a session slot has no socket");
        if let Some(outbox) = self.outbox.as_mut() {
            if outbox.push(item, cx.limits.outbox_bytes_max, cx.limits.outbox_messages_max) == Admission::OverLimit {
                return self.slow_consumer(io, cx);
            }
            return Verdict::Keep;
        }
        match io.send(item.bytes()) {
            Ok(written) if written == item.bytes().len() => Verdict::Keep,
            Ok(written) => {
                self.outbox = Some(Box::new(Outbox::with_partial(item, written)));
                Verdict::Keep
            }
            Err(Broken) => Verdict::Close,
        }
    }

    pub fn send_owned(&mut self, bytes: Vec<u8>, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        if bytes.is_empty() {
            return Verdict::Keep;
        }
        self.send(OutItem::Owned(bytes.into_boxed_slice()), io, cx)
    }

    /// Writes publications to a WebSocket subscriber: one gathered write
    /// when the socket is idle, the rest queued (in order) if it pushes back.
    pub fn send_publications(
        &mut self,
        publications: &[Arc<Publication>],
        io: &mut impl Io,
        cx: &Context<'_>,
    ) -> Verdict {
        if publications.len() < 2 || self.outbox.is_some() {
            for publication in publications {
                let item = OutItem::Publication(Arc::clone(publication), Wire::WebSocket);
                if self.send(item, io, cx) == Verdict::Close {
                    return Verdict::Close;
                }
            }
            return Verdict::Keep;
        }
        let Ok(written) = io.send_vectored(publications.iter().map(|p| p.ws_frame())) else { return Verdict::Close };
        // Whatever the socket did not take waits in the outbox, in order.
        let mut remaining = written;
        let mut rest = publications.iter();
        for publication in rest.by_ref() {
            let len = publication.ws_frame().len();
            if remaining >= len {
                remaining -= len;
                continue;
            }
            let item = OutItem::Publication(Arc::clone(publication), Wire::WebSocket);
            self.outbox = Some(Box::new(Outbox::with_partial(item, remaining)));
            break;
        }
        for publication in rest {
            let item = OutItem::Publication(Arc::clone(publication), Wire::WebSocket);
            if self.send(item, io, cx) == Verdict::Close {
                return Verdict::Close;
            }
            if self.is_ending() {
                // Cut as a slow consumer: nothing more goes in.
                break;
            }
        }
        Verdict::Keep
    }

    /// Writes queued bytes as the socket accepts them (the socket became
    /// writable). Once an ending connection's outbox is empty it goes: closed
    /// now, or for a lingering one our FIN and then wait for the peer's.
    pub fn flush(&mut self, io: &mut impl Io) -> Verdict {
        match io.flush_held() {
            Err(Broken) => return Verdict::Close,
            Ok(false) => return Verdict::Keep,
            Ok(true) => {}
        }
        while let Some(outbox) = self.outbox.as_mut() {
            let Ok(written) = io.send_vectored(outbox.chunks(IOVECS_MAX)) else { return Verdict::Close };
            if written == 0 {
                return Verdict::Keep;
            }
            outbox.advance(written);
            if outbox.is_empty() {
                self.outbox = None;
            }
        }
        if self.is_ending() && !io.holds_output() {
            return self.finish_after_flush(io);
        }
        Verdict::Keep
    }

    /// Nothing of ours waits for the socket, here or in the transport.
    fn output_done(&self, io: &impl Io) -> bool {
        self.outbox.is_none() && !io.holds_output()
    }

    fn finish_after_flush(&mut self, io: &mut impl Io) -> Verdict {
        debug_assert!(self.output_done(io));
        if self.phase != Phase::Lingering {
            return Verdict::Close;
        }
        match io.shutdown_write() {
            Ok(()) => Verdict::Keep,
            Err(Broken) => Verdict::Close,
        }
    }

    /// The outbox passed its cap: a WebSocket drops what is queued
    /// (finishing a partly written frame), sends 1008 and closes once that
    /// is out; anything else (an SSE stream, an HTTP response) has no close
    /// frame to send and goes now (a session's client resumes from its buffer).
    fn slow_consumer(&mut self, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        io.count(Count::SlowConsumer);
        crate::limited!(DEBUG, "closing slow consumer");
        if !matches!(self.phase, Phase::WebSocket | Phase::Closing) {
            return Verdict::Close;
        }
        let close_frame =
            ws::encode_close(ws::close::SLOW_CONSUMER, "slow consumer: outbox limit reached").into_boxed_slice();
        if let Some(outbox) = self.outbox.as_mut() {
            outbox.cut_after_front();
            outbox.push_unbounded(OutItem::Owned(close_frame));
        }
        self.flags.insert(Flags::CLOSE_SENT);
        self.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        self.phase = Phase::Closing;
        self.set_deadline(cx.now_ms, cx.timeouts.close_timeout_ms);
        Verdict::Keep
    }

    // -- Ending -----------------------------------------------------------

    /// Starts the WebSocket closing handshake: sends our close frame and
    /// waits (up to `close_timeout_ms`) for the peer's.
    pub fn close_websocket(&mut self, code: u16, reason: &str, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        debug_assert_ne!(self.phase, Phase::Session, "sessions end through the application");
        if self.flags.contains(Flags::CLOSE_SENT) {
            return Verdict::Keep;
        }
        self.flags.insert(Flags::CLOSE_SENT);
        self.phase = Phase::Closing;
        self.set_deadline(cx.now_ms, cx.timeouts.close_timeout_ms);
        self.send_owned(ws::encode_close(code, reason), io, cx)
    }

    /// Ends the connection once everything queued has been written (within
    /// `close_timeout_ms`); now if nothing is queued.
    pub fn end_after_flush(&mut self, io: &impl Io, cx: &Context<'_>) -> Verdict {
        if self.output_done(io) {
            return Verdict::Close;
        }
        self.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        if self.phase != Phase::Http {
            self.phase = Phase::Closing;
        }
        self.set_deadline(cx.now_ms, cx.timeouts.close_timeout_ms);
        Verdict::Keep
    }

    /// Like `end_after_flush` for a response sent before the whole request
    /// was read (the client may still be sending): see `Phase::Lingering`.
    pub fn linger(&mut self, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        self.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        self.phase = Phase::Lingering;
        self.set_deadline(cx.now_ms, cx.timeouts.close_timeout_ms);
        if self.output_done(io) {
            return self.finish_after_flush(io);
        }
        Verdict::Keep
    }

    /// Server shutdown: a WebSocket gets 1001 and ends once that is out;
    /// a connection between requests goes now; the rest finish what they do.
    pub fn shutdown(&mut self, io: &mut impl Io, cx: &Context<'_>) -> Verdict {
        match self.phase {
            Phase::WebSocket => {
                if self.close_websocket(ws::close::GOING_AWAY, "server shutting down", io, cx) == Verdict::Close {
                    return Verdict::Close;
                }
                self.end_after_flush(io, cx)
            }
            Phase::Http => Verdict::Close,
            Phase::Closing | Phase::Stream | Phase::Polling | Phase::Lingering | Phase::Session => Verdict::Keep,
        }
    }

    // -- Time -------------------------------------------------------------

    /// What the timer sweep does with this connection now: pings and their
    /// timeout, SSE heartbeats, the HTTP request deadline (408), the
    /// WebSocket message deadline (1008), close and poll deadlines, and
    /// session expiry.
    pub fn on_timer(&mut self, io: &mut impl Io, cx: &Context<'_>) -> Timer {
        let now_ms = cx.now_ms;
        let timeouts = cx.timeouts;
        let closed = |verdict: Verdict| if verdict == Verdict::Close { Timer::Close } else { Timer::Nothing };
        if self.is_ending() || matches!(self.phase, Phase::Closing | Phase::Lingering) {
            // Ending: only its deadline matters.
            return if self.deadline_passed(now_ms) { Timer::Close } else { Timer::Nothing };
        }
        match self.phase {
            Phase::Http if !self.deadline_passed(now_ms) => Timer::Nothing,
            Phase::Http if self.rx.is_some() => {
                // Part of a request arrived: say why we hang up. The client
                // may still be sending, so linger (see `Phase::Lingering`).
                io.count(Count::Limit(LimitKind::RequestTimeout));
                let mut response = Vec::with_capacity(160);
                http_codec::write_text_response(&mut response, 408, &[], "request head not received in time", false);
                if self.send_owned(response, io, cx) == Verdict::Close {
                    return Timer::Close;
                }
                closed(self.linger(io, cx))
            }
            // An idle keep-alive connection: close quietly.
            Phase::Http => Timer::Close,
            Phase::Session if self.deadline_passed(now_ms) => Timer::Close,
            Phase::Polling if self.deadline_passed(now_ms) => Timer::PollTimeout,
            Phase::Session | Phase::Polling => Timer::Nothing,
            Phase::Stream if self.last_ping.elapsed_ms(now_ms) >= timeouts.sse_heartbeat_ms => {
                self.last_ping = Stamp::at(now_ms);
                closed(self.send(OutItem::Owned(SSE_HEARTBEAT.into()), io, cx))
            }
            Phase::Stream => Timer::Nothing,
            // (Not while paused for a reply: complete frames may wait then.)
            Phase::WebSocket
                if self.rx.is_some() && self.deadline_passed(now_ms) && !self.marks.contains(Marks::AWAITING_REPLY) =>
            {
                // A message begun and not finished in time (a client
                // dribbling it byte by byte, each byte keeping it "alive").
                io.count(Count::Limit(LimitKind::MessageTimeout));
                tracing::debug!("closing a websocket whose message did not arrive in time");
                closed(self.close_websocket(
                    ws::close::POLICY_VIOLATION,
                    "message not completed in time (timeouts.message_timeout_ms)",
                    io,
                    cx,
                ))
            }
            Phase::WebSocket => {
                let silent_ms = self.last_input.elapsed_ms(now_ms);
                if silent_ms >= timeouts.ping_interval_ms + timeouts.pong_timeout_ms {
                    return closed(self.close_websocket(ws::close::PING_TIMEOUT, "no pong", io, cx));
                }
                // A ping older than the last input says nothing more: keep
                // the stamp no older than the input. A client that talks
                // more often than the ping interval is never pinged, and its
                // ping stamp would otherwise age past 2^31 ms and read as
                // the future (`Stamp`).
                let ping_age_ms = self.last_ping.until_now_ms(now_ms);
                if ping_age_ms < 0 || ping_age_ms as u64 > silent_ms {
                    self.last_ping = self.last_input;
                }
                let since_activity_ms = self.last_ping.elapsed_ms(now_ms);
                if since_activity_ms >= timeouts.ping_interval_ms {
                    self.last_ping = Stamp::at(now_ms);
                    return closed(self.send(OutItem::Owned(PING_FRAME.into()), io, cx));
                }
                Timer::Nothing
            }
            Phase::Closing | Phase::Lingering => Timer::Nothing,
        }
    }

    /// Drops the receive state once it holds nothing (invariant 1).
    fn shrink_rx(&mut self) {
        if self.rx.as_ref().is_some_and(|rx| rx.is_empty()) {
            self.rx = None;
        }
    }
}

#[cfg(test)]
mod tests;
