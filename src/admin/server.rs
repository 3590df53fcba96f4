//! The admin listener: runs on the admin gateway's thread as glommio tasks. Each connection
//! reads pipelined request frames, dispatches each to the shard that owns
//! its channel (through the bus), and writes the replies in request order.
//! Every request gets a reply; a frame whose length is impossible gets a
//! `bad_frame` error and the connection is closed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::admin::gateway::Gateway;
use crate::admin::handlers::{self, HandlerLink};
use crate::admin::ops::{self, bad_argument, Operation, Outcome};
use crate::admin::sys;
use crate::limits::LimitKind;
use kometa_protocol::admin::{opcode, split_frame, stats_scope, AdminError, ErrorCode, FrameWriter, RawFrame, Reader};

/// Bytes read from an admin socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Which kind of socket the admin listener is; TCP and TLS require AUTH first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
    /// TCP with TLS (`admin = "tls:ADDR:PORT"`, the certificate of `[tls]`).
    Tls,
}

/// TCP admin connections that have not authenticated yet, oldest first:
/// at most `limits.admin_unauthenticated_max`. A newcomer past it pushes
/// the oldest out (its `Sender` fires), so connections that never send
/// AUTH (or send wrong keys slowly) cannot keep a backend from connecting:
/// to lock it out they would have to outrun its AUTH round trip.
#[derive(Default)]
struct Unauthenticated {
    next_id: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// An unauthenticated TCP admin connection's place in `Unauthenticated`.
struct AuthGate {
    id: u64,
    registry: Rc<RefCell<Unauthenticated>>,
    /// Fires (or is dropped) when a newcomer pushes this connection out.
    pushed_out: oneshot::Receiver<()>,
    /// AUTH must have succeeded by then (`timeouts.admin_auth_timeout_ms`).
    deadline: Instant,
}

impl AuthGate {
    /// Leaves the registry (authenticated, or gone).
    fn leave(&self) {
        self.registry.borrow_mut().waiting.retain(|(id, _)| *id != self.id);
    }
}

/// Where a connection's AUTH stands, and whether it handles `rpc` calls.
struct AuthState {
    authorized: bool,
    /// Wrong keys so far (closed at `limits.admin_auth_failures_max`).
    failures: u32,
    /// Set by HANDLE: CALL frames for this connection arrive through it.
    handler: Option<HandlerLink>,
}

/// Accepts admin connections until the shard's executor ends.
pub async fn serve(shard: Rc<RefCell<Gateway>>, listener: OwnedFd, transport: Transport) {
    let open = Rc::new(Cell::new(0usize));
    let unauthenticated = Rc::new(RefCell::new(Unauthenticated::default()));
    sys::accept_each(listener.as_raw_fd(), "admin", |fd| {
        let (max, draining) = {
            let shard = shard.borrow();
            (shard.config.limits.admin_connections_max, shard.is_draining())
        };
        if open.get() >= max || draining {
            if !draining {
                shard.borrow().shared.admin_refusals.add(LimitKind::AdminConnectionsMax);
            }
            crate::limited!(WARN, max, "admin connection refused: admin_connections_max reached or shutting down");
            // A TLS client could not read a plain frame: it just sees the close.
            if transport != Transport::Tls {
                let error = AdminError::new(ErrorCode::LimitReached, "too many admin connections");
                let _ = sys::send(fd.as_raw_fd(), &FrameWriter::error(0, 0, &error));
            }
            return;
        }
        open.set(open.get() + 1);
        let gate = (transport != Transport::Unix).then(|| admit_unauthenticated(&shard, &unauthenticated));
        let shard = Rc::clone(&shard);
        let open = Rc::clone(&open);
        let raw = fd.into_raw_fd();
        glommio::spawn_local(async move {
            match transport {
                Transport::Unix => {
                    // SAFETY: `raw` is an accepted, connected socket we own.
                    let stream = unsafe { glommio::net::UnixStream::from_raw_fd(raw) };
                    connection(shard, stream, None).await;
                }
                Transport::Tcp => {
                    // SAFETY: as above.
                    let stream = unsafe { glommio::net::TcpStream::from_raw_fd(raw) };
                    let _ = stream.set_nodelay(true);
                    connection(shard, stream, gate).await;
                }
                Transport::Tls => {
                    // SAFETY: as above.
                    let stream = unsafe { glommio::net::TcpStream::from_raw_fd(raw) };
                    let _ = stream.set_nodelay(true);
                    // The certificate in use now (a reload replaces it for new connections).
                    let config = shard.borrow().shared.tls.read().ok().and_then(|tls| tls.clone());
                    let tls = config.map(rustls::ServerConnection::new);
                    match tls {
                        Some(Ok(tls)) => {
                            connection(shard, crate::admin::tls_stream::TlsStream::new(stream, tls), gate).await
                        }
                        _ => {
                            crate::limited!(WARN, "admin TLS connection dropped: no usable TLS configuration");
                            if let Some(gate) = gate {
                                gate.leave();
                            }
                        }
                    }
                }
            }
            open.set(open.get() - 1);
        })
        .detach();
    })
    .await;
}

/// Registers a new TCP connection as unauthenticated, pushing out the
/// oldest one when `limits.admin_unauthenticated_max` are waiting already.
fn admit_unauthenticated(shard: &Rc<RefCell<Gateway>>, registry: &Rc<RefCell<Unauthenticated>>) -> AuthGate {
    let (max, timeout, shared) = {
        let shard = shard.borrow();
        let config = &shard.config;
        let timeout = Duration::from_millis(config.timeouts.admin_auth_timeout_ms);
        (config.limits.admin_unauthenticated_max, timeout, Arc::clone(&shard.shared))
    };
    let mut unauthenticated = registry.borrow_mut();
    while unauthenticated.waiting.len() >= max {
        let Some((_, push_out)) = unauthenticated.waiting.pop_front() else { break };
        shared.admin_refusals.add(LimitKind::AdminUnauthenticated);
        let _ = push_out.send(());
    }
    let id = unauthenticated.next_id;
    unauthenticated.next_id += 1;
    let (sender, pushed_out) = oneshot::channel();
    unauthenticated.waiting.push_back((id, sender));
    AuthGate { id, registry: Rc::clone(registry), pushed_out, deadline: Instant::now() + timeout }
}

/// A reply that may still be waiting for other shards.
enum PendingReply {
    Ready(Vec<u8>),
    Operation { op: u8, request_id: u32, pending: ops::Pending },
}

impl PendingReply {
    async fn into_bytes(self) -> Vec<u8> {
        match self {
            PendingReply::Ready(bytes) => bytes,
            PendingReply::Operation { op, request_id, pending } => match pending.outcome().await {
                Ok(Outcome::Empty) => FrameWriter::ok(op, request_id).finish(),
                Ok(Outcome::Published(ok)) => {
                    let mut writer = FrameWriter::ok(op, request_id);
                    writer.u64(ok.offset).u64(ok.subscribers).str16(&ok.epoch);
                    writer.finish()
                }
                Ok(Outcome::Document(document)) => {
                    let mut writer = FrameWriter::ok(op, request_id);
                    writer.bytes32(&serde_json::to_vec(&document).unwrap_or_default());
                    writer.finish()
                }
                Err(error) => FrameWriter::error(op, request_id, &error),
            },
        }
    }
}

/// Writes `bytes`; false if the write failed or the backend did not take
/// them within `timeout` (the connection is then dropped).
pub(crate) async fn write_within<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], timeout: Duration) -> bool {
    // The flush matters for TLS: the last record may still be in rustls.
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await.map_err(glommio::GlommioError::from)
    };
    match glommio::timer::timeout(timeout, write).await {
        Ok(()) => true,
        Err(error) => {
            crate::limited!(DEBUG, %error, "admin connection dropped: its replies could not be written");
            false
        }
    }
}

/// Closes the stream, giving up after `timeout`: over TLS a close writes
/// close_notify after any queued records, and a peer that stopped reading
/// would otherwise hold the task (and its connection slot) for good.
async fn close_within<S: AsyncWrite + Unpin>(stream: &mut S, timeout: Duration) {
    let close = async { stream.close().await.map_err(glommio::GlommioError::from) };
    let _ = glommio::timer::timeout(timeout, close).await;
}

/// Replies gathered before a write: many small replies share one write,
/// and a connection holds at most this plus one reply.
const OUTPUT_FLUSH_BYTES: usize = 64 * 1024;

/// Serves one admin connection; `gate` is its place among unauthenticated
/// TCP connections (None: a Unix socket, which needs no AUTH).
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<RefCell<Gateway>>,
    mut stream: S,
    mut gate: Option<AuthGate>,
) {
    serve_frames(&shard, &mut stream, &mut gate).await;
    if let Some(gate) = gate {
        gate.leave();
    }
}

async fn serve_frames<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<RefCell<Gateway>>,
    stream: &mut S,
    gate: &mut Option<AuthGate>,
) {
    let (frame_bytes_max, in_flight_max, write_timeout, failures_max, shared) = {
        let shard = shard.borrow();
        let config = &shard.config;
        let write_timeout = Duration::from_millis(config.timeouts.admin_write_timeout_ms);
        let limits = &config.limits;
        let shared = Arc::clone(&shard.shared);
        (
            limits.admin_frame_bytes_max,
            limits.admin_requests_in_flight_max,
            write_timeout,
            limits.admin_auth_failures_max,
            shared,
        )
    };
    let mut auth = AuthState { authorized: gate.is_none(), failures: 0, handler: None };
    let mut input: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        // Dispatch every complete frame (up to the in-flight limit).
        let mut pending = Vec::new();
        let mut consumed = 0;
        let mut broken = false;
        while pending.len() < in_flight_max {
            match split_frame(&input[consumed..], frame_bytes_max) {
                Ok(None) => break,
                Ok(Some((frame, used))) => {
                    pending.push(dispatch(shard, frame, &mut auth));
                    consumed += used;
                    if auth.authorized {
                        if let Some(gate) = gate.take() {
                            gate.leave();
                        }
                    } else if auth.failures >= failures_max {
                        // Guessing keys: the replies so far, then the close.
                        shared.admin_refusals.add(LimitKind::AdminAuthFailures);
                        crate::limited!(
                            DEBUG,
                            failures = auth.failures,
                            "admin connection closed after failed AUTH attempts"
                        );
                        broken = true;
                        break;
                    }
                }
                Err(error) => {
                    crate::limited!(DEBUG, reason = %error.0, "admin framing error; closing connection");
                    let reply = AdminError::new(ErrorCode::BadFrame, error.0);
                    pending.push(PendingReply::Ready(FrameWriter::error(0, 0, &reply)));
                    broken = true;
                    break;
                }
            }
        }
        input.drain(..consumed);
        let more_buffered = pending.len() >= in_flight_max;

        // Replies go out in request order, gathered into few writes but
        // never more than OUTPUT_FLUSH_BYTES held at once (a batch of large
        // HISTORY replies would otherwise sit in memory together).
        let mut output = Vec::new();
        for reply in pending {
            output.extend_from_slice(&reply.into_bytes().await);
            if output.len() >= OUTPUT_FLUSH_BYTES {
                if !write_within(stream, &output, write_timeout).await {
                    return;
                }
                output.clear();
                output.shrink_to(OUTPUT_FLUSH_BYTES);
            }
        }
        if !output.is_empty() && !write_within(stream, &output, write_timeout).await {
            return;
        }
        if broken {
            close_within(stream, write_timeout).await;
            return;
        }
        if more_buffered {
            continue;
        }
        let read = match (gate.as_mut(), auth.handler.as_mut()) {
            (None, None) => stream.read(&mut chunk).await,
            (None, Some(link)) => match read_or_calls(stream, &mut chunk, link).await {
                Ok(read) => read,
                Err(call_ids) => {
                    // Calls for this handler (those still waiting: one that
                    // timed out meanwhile is not sent), then back to reading.
                    let calls = link.frames(&call_ids);
                    if !calls.is_empty() && !write_within(stream, &calls, write_timeout).await {
                        return;
                    }
                    continue;
                }
            },
            (Some(gate), _) => match read_before_auth(stream, &mut chunk, gate).await {
                Ok(read) => read,
                Err(ended) => {
                    let message = match ended {
                        AuthEnded::Deadline => {
                            shared.admin_refusals.add(LimitKind::AdminAuthTimeout);
                            "no AUTH within timeouts.admin_auth_timeout_ms"
                        }
                        // Counted by the newcomer that pushed it out.
                        AuthEnded::PushedOut => {
                            "too many unauthenticated admin connections (limits.admin_unauthenticated_max)"
                        }
                    };
                    let error = AdminError::new(ErrorCode::Unauthorized, message);
                    let _ = write_within(stream, &FrameWriter::error(0, 0, &error), write_timeout).await;
                    close_within(stream, write_timeout).await;
                    return;
                }
            },
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(count) => input.extend_from_slice(&chunk[..count]),
        }
    }
}

/// Calls gathered for one write to a handler connection.
const CALLS_PER_WRITE_MAX: usize = 256;

/// A handler connection's read, or the ids of the calls waiting for it
/// (`Err`, up to CALLS_PER_WRITE_MAX), whichever comes first; calls first,
/// so a handler that keeps sending requests still gets them. A read that
/// loses the race has taken no bytes (glommio reads on readiness).
async fn read_or_calls<S: AsyncRead + Unpin>(
    stream: &mut S,
    chunk: &mut [u8],
    link: &mut HandlerLink,
) -> Result<std::io::Result<usize>, Vec<u32>> {
    use futures_lite::StreamExt;
    let queued = &mut link.queued;
    let read = async { Ok(stream.read(chunk).await) };
    let calls = async {
        let Some(first) = queued.next().await else {
            // The gateway dropped this handler: only reads remain.
            return futures_lite::future::pending().await;
        };
        let mut call_ids = vec![first];
        while call_ids.len() < CALLS_PER_WRITE_MAX {
            match queued.try_recv() {
                Ok(call_id) => call_ids.push(call_id),
                Err(_) => break,
            }
        }
        Err(call_ids)
    };
    futures_lite::future::or(calls, read).await
}

/// Why an unauthenticated connection stops being served.
enum AuthEnded {
    /// `timeouts.admin_auth_timeout_ms` passed without a successful AUTH.
    Deadline,
    /// A newcomer took its place (`limits.admin_unauthenticated_max`).
    PushedOut,
}

/// A read by a connection that has not authenticated yet: it ends at the
/// AUTH deadline or when pushed out, whichever comes first. Checked before
/// reading too, so a client that keeps sending (never waiting on a read)
/// meets the deadline all the same.
async fn read_before_auth<S: AsyncRead + Unpin>(
    stream: &mut S,
    chunk: &mut [u8],
    gate: &mut AuthGate,
) -> Result<std::io::Result<usize>, AuthEnded> {
    let remaining = gate.deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(AuthEnded::Deadline);
    }
    let read = async { Ok(stream.read(chunk).await) };
    let pushed_out = async {
        let _ = (&mut gate.pushed_out).await;
        Err(AuthEnded::PushedOut)
    };
    let deadline = async {
        glommio::timer::sleep(remaining).await;
        Err(AuthEnded::Deadline)
    };
    futures_lite::future::or(read, futures_lite::future::or(pushed_out, deadline)).await
}

fn ok_empty(op: u8, request_id: u32) -> PendingReply {
    PendingReply::Ready(FrameWriter::ok(op, request_id).finish())
}

fn error_reply(op: u8, request_id: u32, error: &AdminError) -> PendingReply {
    PendingReply::Ready(FrameWriter::error(op, request_id, error))
}

fn dispatch(shard: &Rc<RefCell<Gateway>>, frame: RawFrame<'_>, auth: &mut AuthState) -> PendingReply {
    let (op, request_id) = (frame.first, frame.request_id);
    let result = (|| -> Result<PendingReply, AdminError> {
        if frame.second != 0 {
            return Err(bad_argument("flags must be 0 in protocol v1"));
        }
        if op == opcode::AUTH {
            let mut reader = Reader::new(frame.payload);
            let key = reader.str16("key")?;
            reader.finish()?;
            let shard = shard.borrow();
            return match &shard.config.admin_key {
                Some(expected) if !crate::util::constant_time_eq(expected.as_bytes(), key.as_bytes()) => {
                    auth.failures += 1;
                    let max = shard.config.limits.admin_auth_failures_max;
                    let message = format!("wrong admin key ({} of {max} attempts)", auth.failures);
                    Err(AdminError::new(ErrorCode::Unauthorized, message))
                }
                _ => {
                    auth.authorized = true;
                    Ok(ok_empty(op, request_id))
                }
            };
        }
        if !auth.authorized {
            return Err(AdminError::new(ErrorCode::Unauthorized, "send AUTH with the admin key first"));
        }
        if op == opcode::ANSWER {
            let mut reader = Reader::new(frame.payload);
            let call_id = reader.u32("call")?;
            let answer = reader.bytes32("answer")?;
            reader.finish()?;
            let Some(link) = &auth.handler else {
                return Err(bad_argument("ANSWER from a connection that sent no HANDLE"));
            };
            shard.borrow_mut().answer_call(link.id, call_id, answer)?;
            return Ok(ok_empty(op, request_id));
        }
        if shard.borrow().is_draining() {
            return Err(ops::shutting_down());
        }
        if op == opcode::HANDLE {
            let mut reader = Reader::new(frame.payload);
            let count = usize::from(reader.u16("prefix count")?);
            let mut prefixes = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                prefixes.push(ops::method_prefix(reader.str16("prefix")?)?);
            }
            reader.finish()?;
            handlers::handle(shard, &mut auth.handler, prefixes)?;
            return Ok(ok_empty(op, request_id));
        }
        let operation = decode(shard, op, Reader::new(frame.payload))?;
        Ok(PendingReply::Operation { op, request_id, pending: ops::start(shard, operation) })
    })();
    result.unwrap_or_else(|error| error_reply(op, request_id, &error))
}

/// An operation from its binary payload (layouts: docs/admin-protocol.md).
fn decode(gateway: &Rc<RefCell<Gateway>>, op: u8, mut reader: Reader<'_>) -> Result<Operation, AdminError> {
    let operation = match op {
        opcode::PING => {
            reader.finish()?;
            Operation::Ping
        }
        opcode::RELOAD => {
            reader.finish()?;
            Operation::Reload
        }
        opcode::PUBLISH => {
            let channel = reader.str16("channel")?;
            let event = reader.str16("event")?;
            let data = reader.bytes32("data")?;
            reader.finish()?;
            let channel = ops::channel(gateway, channel)?;
            Operation::Publish { channel, event: ops::event(event)?, data: ops::data(gateway, data)? }
        }
        opcode::PUBLISH_MANY => {
            let count = usize::from(reader.u16("channel count")?);
            let mut channels = Vec::with_capacity(count.min(1024));
            for _ in 0..count {
                channels.push(reader.str16("channel")?);
            }
            let event = reader.str16("event")?;
            let data = reader.bytes32("data")?;
            reader.finish()?;
            let channels = ops::channels(gateway, &channels)?;
            Operation::PublishMany { channels, event: ops::event(event)?, data: ops::data(gateway, data)? }
        }
        opcode::STATS => {
            let node_only = if reader.is_empty() {
                false
            } else {
                match reader.u8("scope")? {
                    stats_scope::CLUSTER => false,
                    stats_scope::NODE => true,
                    other => return Err(ops::bad_argument(format!("scope {other}: 0 (the cluster) or 1 (this node)"))),
                }
            };
            reader.finish()?;
            Operation::Stats { node_only }
        }
        opcode::SEND_USER => {
            let users = read_users(&mut reader)?;
            let event = reader.str16("event")?;
            let data = reader.bytes32("data")?;
            reader.finish()?;
            let users = ops::users(gateway, &users)?;
            Operation::SendUser { users, event: ops::event(event)?, data: ops::data(gateway, data)? }
        }
        opcode::USER_STATUS => {
            let users = read_users(&mut reader)?;
            reader.finish()?;
            Operation::UserStatus { users: ops::users(gateway, &users)? }
        }
        opcode::PRESENCE => {
            let channel = reader.str16("channel")?;
            let cursor = reader.str16("cursor")?;
            let limit = reader.u32("limit")?;
            reader.finish()?;
            let channel = ops::channel(gateway, channel)?;
            Operation::Presence { channel, cursor: ops::cursor(cursor), limit: ops::limit(gateway, limit) }
        }
        opcode::PRESENCE_STATS => {
            let channel = reader.str16("channel")?;
            reader.finish()?;
            Operation::PresenceStats { channel: ops::channel(gateway, channel)? }
        }
        opcode::CHANNEL_INFO => {
            let channel = reader.str16("channel")?;
            reader.finish()?;
            Operation::ChannelInfo { channel: ops::channel(gateway, channel)? }
        }
        opcode::CHANNELS => {
            let prefix = reader.str16("prefix")?;
            let cursor = reader.str16("cursor")?;
            let limit = reader.u32("limit")?;
            reader.finish()?;
            Operation::Channels {
                prefix: ops::prefix(prefix)?,
                cursor: ops::cursor(cursor),
                limit: ops::limit(gateway, limit),
            }
        }
        opcode::HISTORY => {
            let channel = reader.str16("channel")?;
            let since_offset = reader.u64("since")?;
            let limit = reader.u32("limit")?;
            reader.finish()?;
            let channel = ops::channel(gateway, channel)?;
            Operation::History { channel, since_offset, limit: ops::limit(gateway, limit) }
        }
        opcode::DISCONNECT => {
            let user = reader.str16("user")?;
            let code = reader.u16("code")?;
            let reason = reader.str16("reason")?;
            let revoke_before_s = reader.u64("revoke_before")?;
            reader.finish()?;
            Operation::Disconnect {
                user: ops::user(user)?,
                code: ops::disconnect_code(code)?,
                reason: ops::disconnect_reason(reason),
                revoke_before_s,
            }
        }
        _ => return Err(AdminError::new(ErrorCode::UnknownOpcode, format!("unknown opcode {op:#04x}"))),
    };
    Ok(operation)
}

/// `count:u16` then that many `str16` user ids (checked by `ops::users`).
fn read_users<'a>(reader: &mut Reader<'a>) -> Result<Vec<&'a str>, AdminError> {
    let count = usize::from(reader.u16("user count")?);
    let mut users = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        users.push(reader.str16("user id")?);
    }
    Ok(users)
}
