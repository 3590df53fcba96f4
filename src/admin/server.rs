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

use crate::admin::gateway::{AdminWait, Gateway};
use crate::admin::sys;
use crate::bus::message::{PublishOk, PublishRefusal, PublishRequest, QueryRequest, ReplyTo, ShardStats};
use crate::bus::query::{first_failure, merge_channels, merge_rows, merge_stats, stats_document, Answer, Query};
use crate::bus::Message;
use crate::hub::owner_of;
use crate::limits::LimitKind;
use kometa_protocol::admin::{opcode, split_frame, AdminError, ErrorCode, FrameWriter, RawFrame, Reader};
use kometa_protocol::{client, json, ws};

/// Bytes read from an admin socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Which kind of socket the admin listener is; TCP requires AUTH first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
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

/// Where a connection's AUTH stands.
struct AuthState {
    authorized: bool,
    /// Wrong keys so far (closed at `limits.admin_auth_failures_max`).
    failures: u32,
}

/// Accepts admin connections until the shard's executor ends.
pub async fn serve(shard: Rc<RefCell<Gateway>>, listener: OwnedFd, transport: Transport) {
    let open = Rc::new(Cell::new(0usize));
    let unauthenticated = Rc::new(RefCell::new(Unauthenticated::default()));
    let listener_fd = listener.as_raw_fd();
    loop {
        sys::readable(listener_fd).await;
        loop {
            let accepted = sys::accept(listener_fd);
            let fd = match accepted {
                Ok(fd) => fd,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed; retrying in 100 ms");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    break;
                }
            };
            let (max, draining) = {
                let shard = shard.borrow();
                (shard.config.limits.admin_connections_max, shard.is_draining())
            };
            if open.get() >= max || draining {
                tracing::warn!(max, "admin connection refused: admin_connections_max reached or shutting down");
                let error = AdminError::new(ErrorCode::LimitReached, "too many admin connections");
                let _ = sys::send(fd.as_raw_fd(), &FrameWriter::error(0, 0, &error));
                continue;
            }
            open.set(open.get() + 1);
            let gate = (transport == Transport::Tcp).then(|| admit_unauthenticated(&shard, &unauthenticated));
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
                }
                open.set(open.get() - 1);
            })
            .detach();
        }
    }
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
    Publish { request_id: u32, receiver: oneshot::Receiver<Result<PublishOk, PublishRefusal>> },
    Gather { op: u8, request_id: u32, receiver: oneshot::Receiver<Vec<Answer>>, finish: Finish },
}

/// How the answers of a gather become the reply document.
enum Finish {
    /// `node`: this node's id in cluster mode; `admin_refusals`: the
    /// gateway's own limit refusals when the request came.
    Stats {
        node: Option<String>,
        admin_refusals: crate::limits::LimitRefusals,
    },
    /// `{"results":[…]}` in request order.
    Rows,
    /// The one owner's object.
    Single,
    Channels {
        limit: usize,
    },
}

impl PendingReply {
    async fn into_bytes(self) -> Vec<u8> {
        match self {
            PendingReply::Ready(bytes) => bytes,
            PendingReply::Publish { request_id, receiver } => match receiver.await {
                Ok(Ok(ok)) => {
                    let mut writer = FrameWriter::ok(opcode::PUBLISH, request_id);
                    writer.u64(ok.offset).u64(ok.subscribers).str16(&ok.epoch);
                    writer.finish()
                }
                Ok(Err(refusal)) => FrameWriter::error(opcode::PUBLISH, request_id, &refusal_error(refusal)),
                Err(_) => FrameWriter::error(opcode::PUBLISH, request_id, &shutting_down()),
            },
            PendingReply::Gather { op, request_id, receiver, finish } => {
                let Ok(answers) = receiver.await else { return FrameWriter::error(op, request_id, &shutting_down()) };
                if let Some(failure) = first_failure(&answers) {
                    return FrameWriter::error(op, request_id, &failure.admin_error());
                }
                let document = match finish {
                    Finish::Stats { node, admin_refusals } => {
                        let others = answers.iter().find_map(|answer| match answer {
                            Answer::Object(fields) => fields.get("nodes").and_then(|n| n.as_array()).cloned(),
                            _ => None,
                        });
                        let local = stats_document(&merge_stats(answers), &admin_refusals);
                        let document = match node {
                            Some(node) => cluster_stats(local, &node, others.unwrap_or_default()),
                            None => local,
                        };
                        serde_json::to_vec(&document).unwrap_or_default()
                    }
                    Finish::Rows => {
                        serde_json::to_vec(&serde_json::json!({ "results": merge_rows(answers) })).unwrap_or_default()
                    }
                    Finish::Single => match answers.into_iter().next() {
                        Some(Answer::Object(fields)) => serde_json::to_vec(&fields).unwrap_or_default(),
                        _ => {
                            return FrameWriter::error(
                                op,
                                request_id,
                                &AdminError::new(ErrorCode::Internal, "no answer"),
                            )
                        }
                    },
                    Finish::Channels { limit } => {
                        let (channels, next) = merge_channels(answers, limit);
                        let channels: Vec<serde_json::Value> = channels
                            .iter()
                            .map(|(name, subscribers)| serde_json::json!({"channel": &**name, "subscribers": subscribers}))
                            .collect();
                        serde_json::to_vec(&serde_json::json!({"channels": channels, "next": next.as_deref()}))
                            .unwrap_or_default()
                    }
                };
                let mut writer = FrameWriter::ok(op, request_id);
                writer.bytes32(&document);
                writer.finish()
            }
        }
    }
}

fn shutting_down() -> AdminError {
    AdminError::new(ErrorCode::ShuttingDown, "server is shutting down")
}

fn refusal_error(refusal: PublishRefusal) -> AdminError {
    match refusal {
        PublishRefusal::Overloaded => AdminError::new(ErrorCode::Overloaded, "server busy (bus backlog); retry"),
        PublishRefusal::ChannelLimit => AdminError::new(ErrorCode::LimitReached, "limits.channels_max reached"),
        PublishRefusal::ShuttingDown => shutting_down(),
        PublishRefusal::NoChannel => AdminError::new(ErrorCode::NotFound, "channel does not exist"),
        PublishRefusal::Unavailable => {
            AdminError::new(ErrorCode::Unavailable, "the channel's Redis is unreachable; nothing was published")
        }
        PublishRefusal::OutcomeUnknown => AdminError::new(
            ErrorCode::UnknownOutcome,
            "Redis went away with the publication in flight: it may or may not have been published",
        ),
    }
}

/// The `STATS` document: totals plus each shard's counters.
pub fn stats_json(shards: &[ShardStats]) -> Vec<u8> {
    serde_json::to_vec(&stats_document(shards, &Default::default())).unwrap_or_default()
}

/// Totals summed over nodes in a cluster's STATS.
const NODE_TOTALS: [&str; 13] = [
    "connections",
    "websockets",
    "users",
    "authenticated",
    "http_sessions",
    "channels",
    "subscriptions",
    "messages_in",
    "messages_out",
    "publications",
    "slow_consumers_closed",
    "protocol_errors",
    "publications_refused",
];

/// Cluster mode: totals over this node (fresh) and the others (as they
/// last published them, at most `cluster.heartbeat_interval_ms` old), with
/// every node's document under `nodes`.
fn cluster_stats(local: serde_json::Value, node: &str, others: Vec<serde_json::Value>) -> serde_json::Value {
    let mut this = local;
    this["node"] = node.into();
    let mut document = serde_json::json!({ "node": node, "shards": this["shards"].clone() });
    let nodes: Vec<serde_json::Value> = std::iter::once(this).chain(others).collect();
    for key in NODE_TOTALS {
        document[key] = nodes.iter().filter_map(|n| n[key].as_u64()).sum::<u64>().into();
    }
    document["nodes"] = nodes.into();
    document
}

/// Writes `bytes`; false if the write failed or the backend did not take
/// them within `timeout` (the connection is then dropped).
async fn write_within<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], timeout: Duration) -> bool {
    let write = async { stream.write_all(bytes).await.map_err(glommio::GlommioError::from) };
    match glommio::timer::timeout(timeout, write).await {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "admin connection dropped: its replies could not be written");
            false
        }
    }
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
    let mut auth = AuthState { authorized: gate.is_none(), failures: 0 };
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
                        tracing::debug!(failures = auth.failures, "admin connection closed after failed AUTH attempts");
                        broken = true;
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(reason = %error.0, "admin framing error; closing connection");
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
            let _ = stream.close().await;
            return;
        }
        if more_buffered {
            continue;
        }
        let read = match gate {
            None => stream.read(&mut chunk).await,
            Some(gate) => match read_before_auth(stream, &mut chunk, gate).await {
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
                    let _ = stream.close().await;
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

fn bad_argument(message: impl Into<String>) -> AdminError {
    AdminError::new(ErrorCode::BadArgument, message)
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
        if shard.borrow().is_draining() {
            return Err(shutting_down());
        }
        let mut reader = Reader::new(frame.payload);
        let pending = match op {
            opcode::PING => {
                reader.finish()?;
                return Ok(ok_empty(op, request_id));
            }
            opcode::PUBLISH => return publish(shard, request_id, reader),
            opcode::STATS => {
                reader.finish()?;
                let (count, cluster, node, admin_refusals) = {
                    let shard = shard.borrow();
                    let admin_refusals = shard.shared.admin_refusals.snapshot();
                    (shard.shard_count(), shard.cluster, shard.config.cluster.node_id.clone(), admin_refusals)
                };
                let mut queries: Vec<(usize, Query)> = (0..count).map(|s| (s, Query::Stats)).collect();
                // Cluster mode: the other nodes' STATS too.
                queries.extend(cluster.map(|gateway| (gateway, Query::NodeStats)));
                let node = cluster.and(node);
                gather(shard, op, request_id, queries, Finish::Stats { node, admin_refusals })
            }
            opcode::SEND_USER => {
                let users = read_users(&mut reader, shard)?;
                let event = reader.str16("event")?;
                let data = reader.bytes32("data")?;
                reader.finish()?;
                check_event(event)?;
                let data = check_data(shard, data)?;
                let event: Arc<str> = event.into();
                let queries = by_owner(shard, users, |items| Query::SendUser {
                    items,
                    event: Arc::clone(&event),
                    data: Arc::clone(&data),
                });
                gather(shard, op, request_id, queries, Finish::Rows)
            }
            opcode::USER_STATUS => {
                let users = read_users(&mut reader, shard)?;
                reader.finish()?;
                let queries = by_owner(shard, users, |items| Query::UserStatus { items });
                gather(shard, op, request_id, queries, Finish::Rows)
            }
            opcode::PRESENCE => {
                let channel = read_channel(&mut reader, shard)?;
                let cursor = reader.str16("cursor")?;
                let limit = read_limit(&mut reader, shard)?;
                reader.finish()?;
                let cursor = (!cursor.is_empty()).then(|| cursor.into());
                to_owner(shard, op, request_id, Arc::clone(&channel), Query::Presence { channel, cursor, limit })
            }
            opcode::PRESENCE_STATS => {
                let channel = read_channel(&mut reader, shard)?;
                reader.finish()?;
                to_owner(shard, op, request_id, Arc::clone(&channel), Query::PresenceStats { channel })
            }
            opcode::CHANNEL_INFO => {
                let channel = read_channel(&mut reader, shard)?;
                reader.finish()?;
                to_owner(shard, op, request_id, Arc::clone(&channel), Query::ChannelInfo { channel })
            }
            opcode::CHANNELS => {
                let prefix = reader.str16("prefix")?;
                let cursor = reader.str16("cursor")?;
                let limit = read_limit(&mut reader, shard)?;
                reader.finish()?;
                if !prefix.bytes().all(client::name_byte_allowed) {
                    return Err(bad_argument("prefix may contain only letters, digits and _ - . : @ / = #"));
                }
                let prefix: Arc<str> = prefix.into();
                let (count, cluster) = {
                    let shard = shard.borrow();
                    (shard.shard_count(), shard.cluster)
                };
                // Cluster mode: Redis knows every node's channels.
                let destinations: Vec<usize> = match cluster {
                    Some(gateway) => vec![gateway],
                    None => (0..count).collect(),
                };
                let queries = destinations
                    .into_iter()
                    .map(|s| {
                        let cursor = (!cursor.is_empty()).then(|| cursor.into());
                        (s, Query::Channels { prefix: Arc::clone(&prefix), cursor, limit })
                    })
                    .collect();
                gather(shard, op, request_id, queries, Finish::Channels { limit })
            }
            opcode::HISTORY => {
                let channel = read_channel(&mut reader, shard)?;
                let since_offset = reader.u64("since")?;
                let limit = read_limit(&mut reader, shard)?;
                reader.finish()?;
                let query = Query::History { channel: Arc::clone(&channel), since_epoch: None, since_offset, limit };
                to_owner(shard, op, request_id, channel, query)
            }
            opcode::DISCONNECT => {
                let user = reader.str16("user")?;
                let code = reader.u16("code")?;
                let reason = reader.str16("reason")?;
                let revoke_before_s = reader.u64("revoke_before")?;
                reader.finish()?;
                check_user(user)?;
                let code = match code {
                    0 => ws::close::DISCONNECTED_BY_SERVER,
                    1000 | 1001 | 1008 | 3000..=4999 => code,
                    _ => return Err(bad_argument("code must be 0 (default 4003), 1000, 1001, 1008 or 3000-4999")),
                };
                let reason = if reason.is_empty() { "disconnected by the server" } else { reason };
                let query = Query::Disconnect { user: user.into(), code, reason: reason.into(), revoke_before_s };
                let owner = owner_of(user, shard.borrow().shard_count());
                gather(shard, op, request_id, vec![(owner, query)], Finish::Single)
            }
            _ => return Err(AdminError::new(ErrorCode::UnknownOpcode, format!("unknown opcode {op:#04x}"))),
        };
        Ok(pending)
    })();
    result.unwrap_or_else(|error| error_reply(op, request_id, &error))
}

fn check_user(user: &str) -> Result<(), AdminError> {
    if user.is_empty()
        || user.len() > kometa_protocol::token::USER_ID_BYTES_MAX
        || !user.bytes().all(client::name_byte_allowed)
    {
        return Err(bad_argument(format!(
            "user id `{user}` must be 1-128 bytes of letters, digits and _ - . : @ / = #"
        )));
    }
    Ok(())
}

fn check_event(event: &str) -> Result<(), AdminError> {
    client::check_event_name(event).map_err(bad_argument)
}

/// Checks size, JSON validity and nesting depth; returns the data with raw
/// newlines flattened.
fn check_data(shard: &Rc<RefCell<Gateway>>, data: &[u8]) -> Result<Arc<[u8]>, AdminError> {
    let (limit, depth_max) = {
        let limits = &shard.borrow().config.limits;
        (limits.publication_data_bytes_max, limits.json_depth_max)
    };
    if data.len() > limit {
        return Err(AdminError::new(
            ErrorCode::TooLarge,
            format!("data is {} bytes; limits.publication_data_bytes_max is {limit}", data.len()),
        ));
    }
    json::validate(data).map_err(|why| bad_argument(format!("data is not valid JSON: {why}")))?;
    if json::nested_deeper_than(data, depth_max) {
        shard.borrow().shared.admin_refusals.add(LimitKind::JsonDepth);
        return Err(bad_argument(format!("data nests deeper than {depth_max} levels (limits.json_depth_max)")));
    }
    Ok(json::single_line(data).into_owned().into())
}

fn read_channel(reader: &mut Reader<'_>, shard: &Rc<RefCell<Gateway>>) -> Result<Arc<str>, AdminError> {
    let channel = reader.str16("channel")?;
    let limit = shard.borrow().config.limits.channel_name_bytes_max;
    client::check_channel_name(channel, limit).map_err(bad_argument)?;
    Ok(channel.into())
}

/// A `u32` limit: 0 means the maximum, larger values are capped to it.
fn read_limit(reader: &mut Reader<'_>, shard: &Rc<RefCell<Gateway>>) -> Result<usize, AdminError> {
    let limit = reader.u32("limit")? as usize;
    let max = shard.borrow().config.limits.query_items_max;
    Ok(if limit == 0 { max } else { limit.min(max) })
}

/// `count:u16` then that many `str16` user ids.
fn read_users(reader: &mut Reader<'_>, shard: &Rc<RefCell<Gateway>>) -> Result<Vec<Arc<str>>, AdminError> {
    let count = usize::from(reader.u16("user count")?);
    let max = shard.borrow().config.limits.query_items_max;
    if count == 0 || count > max {
        return Err(bad_argument(format!("user count must be 1..={max} (limits.query_items_max)")));
    }
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        let user = reader.str16("user id")?;
        check_user(user)?;
        users.push(Arc::from(user));
    }
    Ok(users)
}

/// Groups users by owner shard, keeping each user's index in the request.
fn by_owner(
    shard: &Rc<RefCell<Gateway>>,
    users: Vec<Arc<str>>,
    make: impl Fn(Vec<(u32, Arc<str>)>) -> Query,
) -> Vec<(usize, Query)> {
    let count = shard.borrow().shard_count();
    let mut groups: Vec<Vec<(u32, Arc<str>)>> = vec![Vec::new(); count];
    for (index, user) in users.into_iter().enumerate() {
        groups[owner_of(&user, count)].push((index as u32, user));
    }
    groups.into_iter().enumerate().filter(|(_, items)| !items.is_empty()).map(|(s, items)| (s, make(items))).collect()
}

fn to_owner(shard: &Rc<RefCell<Gateway>>, op: u8, request_id: u32, channel: Arc<str>, query: Query) -> PendingReply {
    let owner = owner_of(&channel, shard.borrow().shard_count());
    gather(shard, op, request_id, vec![(owner, query)], Finish::Single)
}

/// Sends each query to its shard and waits for all their answers.
fn gather(
    shard: &Rc<RefCell<Gateway>>,
    op: u8,
    request_id: u32,
    queries: Vec<(usize, Query)>,
    finish: Finish,
) -> PendingReply {
    let mut shard = shard.borrow_mut();
    let token = shard.admin_token();
    let (sender, receiver) = oneshot::channel();
    shard.admin_waits.insert(token, AdminWait::Gather { remaining: queries.len(), answers: Vec::new(), reply: sender });
    let origin = shard.id as u16;
    for (destination, query) in queries {
        let request = QueryRequest { reply: ReplyTo::Admin { shard: origin, token }, query };
        shard.bus.send(destination, Message::Query(Box::new(request)));
    }
    // Outside the shard's tick: wake the destinations now.
    shard.bus.flush();
    PendingReply::Gather { op, request_id, receiver, finish }
}

fn publish(shard: &Rc<RefCell<Gateway>>, request_id: u32, mut reader: Reader<'_>) -> Result<PendingReply, AdminError> {
    let channel = read_channel(&mut reader, shard)?;
    let event = reader.str16("event")?;
    let data = reader.bytes32("data")?;
    reader.finish()?;
    check_event(event)?;
    let data = check_data(shard, data)?;
    let mut shard = shard.borrow_mut();
    if shard.bus.overloaded() {
        return Err(refusal_error(PublishRefusal::Overloaded));
    }
    let token = shard.admin_token();
    let (sender, receiver) = oneshot::channel();
    shard.admin_waits.insert(token, AdminWait::Publish(sender));
    let owner = owner_of(&channel, shard.shard_count());
    let request = PublishRequest {
        channel,
        event: event.into(),
        data: Box::from(&*data),
        user: None,
        reply: ReplyTo::Admin { shard: shard.id as u16, token },
        only_if_exists: false,
    };
    shard.bus.send(owner, Message::Publish(Box::new(request)));
    // Outside the shard's tick: wake the owner now.
    shard.bus.flush();
    Ok(PendingReply::Publish { request_id, receiver })
}
