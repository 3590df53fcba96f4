//! The admin listener: runs on shard 0 as glommio tasks. Each connection
//! reads pipelined request frames, dispatches each to the shard that owns
//! its channel (through the bus), and writes the replies in request order.
//! Every request gets a reply; a frame whose length is impossible gets a
//! `bad_frame` error and the connection is closed.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::bus::message::{PublishOk, PublishRefusal, PublishRequest, ReplyTo, ShardStats};
use crate::bus::Message;
use crate::hub::owner_of;
use crate::proto::admin::{opcode, split_frame, AdminError, ErrorCode, FrameWriter, RawFrame, Reader};
use crate::proto::{client, json};
use crate::shard::{sys, AdminWait, Shard};

/// Bytes read from an admin socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Which kind of socket the admin listener is; TCP requires AUTH first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// Accepts admin connections until the shard's executor ends.
pub async fn serve(shard: Rc<RefCell<Shard>>, listener: OwnedFd, transport: Transport) {
    let open = Rc::new(Cell::new(0usize));
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
            let shard = Rc::clone(&shard);
            let open = Rc::clone(&open);
            let raw = fd.into_raw_fd();
            glommio::spawn_local(async move {
                match transport {
                    Transport::Unix => {
                        // SAFETY: `raw` is an accepted, connected socket we own.
                        let stream = unsafe { glommio::net::UnixStream::from_raw_fd(raw) };
                        connection(shard, stream, false).await;
                    }
                    Transport::Tcp => {
                        // SAFETY: as above.
                        let stream = unsafe { glommio::net::TcpStream::from_raw_fd(raw) };
                        let _ = stream.set_nodelay(true);
                        connection(shard, stream, true).await;
                    }
                }
                open.set(open.get() - 1);
            })
            .detach();
        }
    }
}

/// A reply that may still be waiting for another shard.
enum PendingReply {
    Ready(Vec<u8>),
    Publish { request_id: u32, receiver: oneshot::Receiver<Result<PublishOk, PublishRefusal>> },
    Stats { request_id: u32, receiver: oneshot::Receiver<Vec<ShardStats>> },
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
            PendingReply::Stats { request_id, receiver } => match receiver.await {
                Ok(shards) => {
                    let mut writer = FrameWriter::ok(opcode::STATS, request_id);
                    writer.bytes32(&stats_json(&shards));
                    writer.finish()
                }
                Err(_) => FrameWriter::error(opcode::STATS, request_id, &shutting_down()),
            },
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
    }
}

/// The `STATS` document: totals plus each shard's counters.
pub fn stats_json(shards: &[ShardStats]) -> Vec<u8> {
    let sum = |field: fn(&ShardStats) -> u64| shards.iter().map(field).sum::<u64>();
    let document = serde_json::json!({
        "connections": sum(|s| s.connections),
        "websockets": sum(|s| s.websockets),
        "channels": sum(|s| s.channels_owned),
        "subscriptions": sum(|s| s.subscriptions),
        "messages_in": sum(|s| s.messages_in),
        "messages_out": sum(|s| s.messages_out),
        "publications": sum(|s| s.publications),
        "slow_consumers_closed": sum(|s| s.slow_consumers_closed),
        "protocol_errors": sum(|s| s.protocol_errors),
        "shards": shards,
    });
    serde_json::to_vec(&document).unwrap_or_default()
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(shard: Rc<RefCell<Shard>>, mut stream: S, needs_auth: bool) {
    let (frame_bytes_max, in_flight_max) = {
        let shard = shard.borrow();
        (shard.config.limits.admin_frame_bytes_max, shard.config.limits.admin_requests_in_flight_max)
    };
    let mut authorized = !needs_auth;
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
                    pending.push(dispatch(&shard, frame, &mut authorized));
                    consumed += used;
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

        // Replies go out in request order.
        let mut output = Vec::new();
        for reply in pending {
            output.extend_from_slice(&reply.into_bytes().await);
        }
        if !output.is_empty() && stream.write_all(&output).await.is_err() {
            return;
        }
        if broken {
            let _ = stream.close().await;
            return;
        }
        if more_buffered {
            continue;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(count) => input.extend_from_slice(&chunk[..count]),
        }
    }
}

fn ok_empty(op: u8, request_id: u32) -> PendingReply {
    PendingReply::Ready(FrameWriter::ok(op, request_id).finish())
}

fn error_reply(op: u8, request_id: u32, error: &AdminError) -> PendingReply {
    PendingReply::Ready(FrameWriter::error(op, request_id, error))
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn dispatch(shard: &Rc<RefCell<Shard>>, frame: RawFrame<'_>, authorized: &mut bool) -> PendingReply {
    let (op, request_id) = (frame.first, frame.request_id);
    let result = (|| -> Result<PendingReply, AdminError> {
        if frame.second != 0 {
            return Err(AdminError::new(ErrorCode::BadArgument, "flags must be 0 in protocol v1"));
        }
        if op == opcode::AUTH {
            let mut reader = Reader::new(frame.payload);
            let key = reader.str16("key")?;
            reader.finish()?;
            let shard = shard.borrow();
            return match &shard.config.admin_key {
                Some(expected) if !constant_time_eq(expected.as_bytes(), key.as_bytes()) => {
                    Err(AdminError::new(ErrorCode::Unauthorized, "wrong admin key"))
                }
                _ => {
                    *authorized = true;
                    Ok(ok_empty(op, request_id))
                }
            };
        }
        if !*authorized {
            return Err(AdminError::new(ErrorCode::Unauthorized, "send AUTH with the admin key first"));
        }
        match op {
            opcode::PING => {
                Reader::new(frame.payload).finish()?;
                Ok(ok_empty(op, request_id))
            }
            opcode::PUBLISH => publish(shard, request_id, frame.payload),
            opcode::STATS => {
                Reader::new(frame.payload).finish()?;
                Ok(stats(shard, request_id))
            }
            opcode::SEND_USER
            | opcode::PRESENCE
            | opcode::PRESENCE_STATS
            | opcode::USER_STATUS
            | opcode::CHANNEL_INFO
            | opcode::CHANNELS
            | opcode::HISTORY
            | opcode::DISCONNECT => Err(AdminError::new(
                ErrorCode::UnknownOpcode,
                format!("opcode {op:#04x} is not available on this server"),
            )),
            _ => Err(AdminError::new(ErrorCode::UnknownOpcode, format!("unknown opcode {op:#04x}"))),
        }
    })();
    result.unwrap_or_else(|error| error_reply(op, request_id, &error))
}

fn publish(shard: &Rc<RefCell<Shard>>, request_id: u32, payload: &[u8]) -> Result<PendingReply, AdminError> {
    let mut reader = Reader::new(payload);
    let channel = reader.str16("channel")?;
    let event = reader.str16("event")?;
    let data = reader.bytes32("data")?;
    reader.finish()?;
    let mut shard = shard.borrow_mut();
    let limits = &shard.config.limits;
    client::check_channel_name(channel, limits.channel_name_bytes_max)
        .map_err(|why| AdminError::new(ErrorCode::BadArgument, why))?;
    client::check_event_name(event).map_err(|why| AdminError::new(ErrorCode::BadArgument, why))?;
    if data.len() > limits.publication_data_bytes_max {
        return Err(AdminError::new(
            ErrorCode::TooLarge,
            format!(
                "data is {} bytes; limits.publication_data_bytes_max is {}",
                data.len(),
                limits.publication_data_bytes_max
            ),
        ));
    }
    json::validate(data)
        .map_err(|why| AdminError::new(ErrorCode::BadArgument, format!("data is not valid JSON: {why}")))?;
    if shard.is_draining() {
        return Err(shutting_down());
    }
    if shard.bus.overloaded() {
        return Err(refusal_error(PublishRefusal::Overloaded));
    }
    let token = shard.admin_token();
    let (sender, receiver) = oneshot::channel();
    shard.admin_waits.insert(token, AdminWait::Publish(sender));
    let owner = owner_of(channel, shard.shard_count());
    let request = PublishRequest {
        channel: Arc::from(channel),
        event: event.into(),
        data: json::single_line(data).into_owned().into_boxed_slice(),
        user: None,
        reply: ReplyTo::Admin { shard: shard.id as u16, token },
    };
    shard.bus.send(owner, Message::Publish(Box::new(request)));
    // Outside the shard's tick: wake the owner now.
    shard.bus.flush();
    Ok(PendingReply::Publish { request_id, receiver })
}

fn stats(shard: &Rc<RefCell<Shard>>, request_id: u32) -> PendingReply {
    let mut shard = shard.borrow_mut();
    let token = shard.admin_token();
    let (sender, receiver) = oneshot::channel();
    let shard_count = shard.shard_count();
    shard.admin_waits.insert(
        token,
        AdminWait::Stats { remaining: shard_count, collected: Vec::with_capacity(shard_count), reply: sender },
    );
    let origin = shard.id as u16;
    for destination in 0..shard_count {
        shard.bus.send(destination, Message::StatsRequest { token, origin });
    }
    shard.bus.flush();
    PendingReply::Stats { request_id, receiver }
}
