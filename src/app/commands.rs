//! Client protocol commands on the connection's shard: validation, access
//! rules, limits, and the request to the channel's (or user's) owner.
//! Replies that need an owner come back through the bus; until then the
//! connection's input is paused, so its commands run strictly in order.

use std::borrow::Cow;
use std::sync::Arc;

use crate::bus::backend::BackendCall;
use crate::bus::message::{ConnRef, PublishRequest, QueryRequest, ReplyTo, SubscribeRequest};
use crate::bus::query::Query;
use crate::bus::Message;
use crate::config::Namespace;
use crate::connection::http::BufItem;
use crate::connection::{Marks, Phase, Subscription, PENDING_SLOT};
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::limits::LimitKind;
use crate::shard::Shard;
use crate::util::unix_time_ms;
use kometa_protocol::client::{self, Command, CommandError, ErrorCode, Position, RequestId};
use kometa_protocol::json;
use kometa_protocol::ws::{self, FrameBuilder, OPCODE_TEXT};

/// A command refused on this shard: the code and the reason.
pub(crate) type Refusal = (ErrorCode, Cow<'static, str>);

pub(crate) fn refuse(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Refusal {
    (code, message.into())
}

/// Publications a client `history` returns when it names no limit.
const CLIENT_HISTORY_DEFAULT_LIMIT: usize = 100;

impl Shard {
    pub(crate) fn client_command(&mut self, key: ConnKey, generation: u32, message: &[u8]) {
        let decoded = client::decode(message);
        // Every command spends a token (garbage too: a flood of it costs
        // replies); the refusal is an error reply, the connection stays.
        let now_ms = self.now_ms;
        let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
            return;
        };
        if !conn.rates.take_command(&self.config.limits, now_ms) {
            self.metrics.limit_refusals.add(LimitKind::CommandsPerConnection);
            let id = decoded.ok().and_then(|request| request.id);
            let per_s = self.config.limits.client_commands_per_s;
            let message = format!("more than {per_s} commands a second (limits.client_commands_per_s)");
            self.reply_error(key, &CommandError::new(id, ErrorCode::RateLimited, message));
            return;
        }
        let request = match decoded {
            Ok(request) => request,
            Err(error) => {
                self.reply_error(key, &error);
                return;
            }
        };
        let id = request.id;
        let outcome = match request.command {
            Command::Ping => {
                self.reply_ok(key, id.as_ref(), |_| {});
                Ok(())
            }
            Command::Subscribe { channel, since, presence_counts } => {
                self.subscribe(key, generation, id.clone(), &channel, since, presence_counts, false)
            }
            Command::Unsubscribe { channel } => self.unsubscribe(key, generation, id.as_ref(), &channel),
            Command::Publish { channel, event, data } => {
                self.client_publish(key, generation, id.clone(), &channel, &event, data.get().as_bytes(), false)
            }
            Command::Rpc { method, data } => self.rpc_command(key, generation, id.clone(), &method, data),
            Command::Connect { token } => self.connect_command(key, generation, id.clone(), &token),
            Command::Ack { inbox } => self.ack(key, generation, id.as_ref(), inbox),
            Command::Presence { channel, cursor, limit } => {
                let cursor = cursor.filter(|cursor| !cursor.is_empty()).map(|cursor| cursor.into());
                self.channel_query(key, generation, id.clone(), &channel, QueryKind::Presence { cursor, limit })
            }
            Command::PresenceStats { channel } => {
                self.channel_query(key, generation, id.clone(), &channel, QueryKind::PresenceStats)
            }
            Command::History { channel, since, limit } => {
                self.channel_query(key, generation, id.clone(), &channel, QueryKind::History { since, limit })
            }
            Command::Disconnect => {
                self.reply_ok(key, id.as_ref(), |_| {});
                self.close_websocket(key, ws::close::NORMAL, "disconnected by the client");
                Ok(())
            }
        };
        if let Err((code, message)) = outcome {
            self.reply_error(key, &CommandError::new(id, code, message));
        }
    }

    /// Name rules and the namespace's access rules (anonymous, private grants).
    fn channel_access(&self, key: ConnKey, channel: &str) -> Result<Arc<crate::config::Config>, Refusal> {
        client::check_channel_name(channel, self.config.limits.channel_name_bytes_max)
            .map_err(|why| refuse(ErrorCode::BadChannel, why))?;
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        let identity = self.conns.get(key as usize).and_then(|conn| conn.state.identity.as_deref());
        match identity {
            None if namespace.private || !namespace.anonymous => {
                return Err(refuse(ErrorCode::Unauthorized, "this channel needs a user token"));
            }
            Some(identity) if namespace.private && !identity.grants(channel) => {
                return Err(refuse(ErrorCode::Forbidden, "your token does not grant this private channel"));
            }
            _ => {}
        }
        Ok(config)
    }

    /// `approved`: the backend's subscribe proxy said yes already.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        channel: &str,
        since: Option<Position>,
        presence_counts: bool,
        approved: bool,
    ) -> Result<(), Refusal> {
        let config = self.channel_access(key, channel)?;
        if presence_counts {
            if !config.namespace_for(channel).presence {
                return Err(refuse(ErrorCode::Forbidden, "presence is not kept for this channel"));
            }
            if self.is_cluster() {
                return Err(refuse(ErrorCode::NotAvailable, "presence_counts is not available in cluster mode"));
            }
        }
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        let user = conn.state.user().cloned();
        if conn.state.subscriptions.len() >= config.limits.channels_per_connection_max {
            self.metrics.limit_refusals.add(crate::limits::LimitKind::ChannelsPerConnectionMax);
            return Err(refuse(
                ErrorCode::TooManyChannels,
                format!("at most {} channels per connection", config.limits.channels_per_connection_max),
            ));
        }
        if let Some(local) = self.index.lookup(channel) {
            let subscriptions = self.conns.get(key as usize).map(|c| &c.state.subscriptions);
            if subscriptions.is_some_and(|subscriptions| subscriptions.iter().any(|s| s.channel == local)) {
                return Err(refuse(ErrorCode::AlreadySubscribed, "already subscribed"));
            }
        }
        if self.bus.overloaded() {
            return Err(refuse(ErrorCode::Overloaded, "server busy, retry"));
        }
        if config.namespace_for(channel).proxy_subscribe && !approved {
            let call = BackendCall::Subscribe { channel: channel.into(), since, presence_counts };
            return self.ask_backend_first(key, generation, id, call);
        }
        let (local, name) = self.index.intern(channel);
        self.index.add_pending(local);
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        let subscriptions = &mut conn.state.subscriptions;
        if subscriptions.len() == subscriptions.capacity() && subscriptions.capacity() < 4 {
            // Most connections hold one to three subscriptions: two live
            // inline in the connection; past them, grow one slot (8 bytes)
            // at a time up to four, not straight to four.
            subscriptions.reserve_exact(1);
        }
        subscriptions.push(Subscription { channel: local, slot: PENDING_SLOT });
        conn.state.marks.insert(Marks::AWAITING_REPLY);
        let owner = owner_of(channel, self.shard_count());
        let request = SubscribeRequest {
            channel: name,
            conn: ConnRef { shard: self.id as u16, key, generation },
            user,
            since,
            request_id: id,
            presence_counts,
        };
        self.bus.send(owner, Message::Subscribe(Box::new(request)));
        Ok(())
    }

    fn unsubscribe(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<&RequestId>,
        channel: &str,
    ) -> Result<(), Refusal> {
        client::check_channel_name(channel, self.config.limits.channel_name_bytes_max)
            .map_err(|why| refuse(ErrorCode::BadChannel, why))?;
        let not_subscribed = || refuse(ErrorCode::NotSubscribed, "not subscribed");
        let local = self.index.lookup(channel).ok_or_else(not_subscribed)?;
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        let position = conn
            .state
            .subscriptions
            .iter()
            .position(|s| s.channel == local && s.slot != PENDING_SLOT)
            .ok_or_else(not_subscribed)?;
        let subscription = conn.state.subscriptions.swap_remove(position);
        let user = conn.state.user().cloned();
        let name = self.index.get(local).map(|c| Arc::clone(&c.name));
        let removed = self.index.remove(local, subscription.slot);
        if let (Some(name), Some(subscriber)) = (name, removed) {
            let owner = owner_of(&name, self.shard_count());
            let presence_counts = subscriber.presence_counts;
            self.bus.send(owner, Message::Unsubscribe { channel: name, shard: self.id as u16, user, presence_counts });
        }
        self.reply_ok(key, id, |_| {});
        Ok(())
    }

    /// `approved`: the backend's publish proxy said yes (and `data` is
    /// what it answered, if it rewrote it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn client_publish(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        channel: &str,
        event: &str,
        data: &[u8],
        approved: bool,
    ) -> Result<(), Refusal> {
        let config = self.channel_access(key, channel)?;
        client::check_event_name(event).map_err(|why| refuse(ErrorCode::BadRequest, why))?;
        let namespace: &Namespace = config.namespace_for(channel);
        if !namespace.client_publish {
            return Err(refuse(ErrorCode::Forbidden, "clients may not publish to this channel"));
        }
        if data.len() > config.limits.publication_data_bytes_max {
            return Err(refuse(
                ErrorCode::MessageTooLarge,
                format!("data over {} bytes", config.limits.publication_data_bytes_max),
            ));
        }
        let depth_max = config.limits.json_depth_max;
        if json::nested_deeper_than(data, depth_max) {
            self.metrics.limit_refusals.add(LimitKind::JsonDepth);
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("data nests deeper than {depth_max} levels (limits.json_depth_max)"),
            ));
        }
        if self.bus.overloaded() {
            return Err(refuse(ErrorCode::Overloaded, "server busy, retry"));
        }
        let now_ms = self.now_ms;
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        let user = conn.state.user().cloned();
        // Rates are charged once: not again when the publish proxy approves.
        if !approved {
            if !conn.rates.take_publication(&config.limits, now_ms) {
                self.metrics.limit_refusals.add(LimitKind::PublicationsPerConnection);
                let per_s = config.limits.client_publications_per_s;
                let message = format!("more than {per_s} publications a second (limits.client_publications_per_s)");
                return Err(refuse(ErrorCode::RateLimited, message));
            }
            if let Some(user) = &user {
                let limiter = &self.shared.limiter;
                if !limiter.user_publication(user, limiter.now_ms()) {
                    self.metrics.limit_refusals.add(LimitKind::PublicationsPerUser);
                    let per_s = config.limits.user_publications_per_s;
                    let message =
                        format!("this user publishes more than {per_s} a second (limits.user_publications_per_s)");
                    return Err(refuse(ErrorCode::RateLimited, message));
                }
            }
        }
        if namespace.proxy_publish && !approved {
            let data = serde_json::value::RawValue::from_string(String::from_utf8_lossy(data).into_owned())
                .map_err(|_| refuse(ErrorCode::BadRequest, "data is not JSON"))?;
            let call = BackendCall::Publish { channel: channel.into(), event: event.into(), data };
            return self.ask_backend_first(key, generation, id, call);
        }
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        conn.state.marks.insert(Marks::AWAITING_REPLY);
        let request = PublishRequest {
            channel: channel.into(),
            event: event.into(),
            data: json::single_line(data).into_owned().into_boxed_slice(),
            user,
            reply: ReplyTo::Client { conn: ConnRef { shard: self.id as u16, key, generation }, request_id: id },
            only_if_exists: false,
        };
        let owner = owner_of(channel, self.shard_count());
        self.bus.send(owner, Message::Publish(Box::new(request)));
        Ok(())
    }

    /// `connect`: authenticate a connection opened without `?token=`, or
    /// refresh the token of an authenticated one (same user).
    fn connect_command(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        token: &str,
    ) -> Result<(), Refusal> {
        let identity = match self.verifier.verify(token, unix_time_ms() / 1000) {
            Ok(identity) => identity,
            Err(error) => {
                // Never treated as anonymous: the client hears why, then the
                // connection closes with a 4000-range code.
                let (code, close) = if error.is_expired() {
                    (ErrorCode::TokenExpired, ws::close::TOKEN_EXPIRED)
                } else {
                    (ErrorCode::Unauthorized, ws::close::INVALID_TOKEN)
                };
                self.reply_error(key, &CommandError::new(id, code, error.message()));
                self.close_websocket(key, close, error.message());
                return Ok(());
            }
        };
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        match conn.state.identity.as_mut() {
            Some(current) if current.user == identity.user => {
                // A refreshed token: new expiry and grants, same registration.
                **current = identity;
                let user = Arc::clone(&current.user);
                self.reply_ok(key, id.as_ref(), |object| {
                    object.str("user", &user);
                });
                Ok(())
            }
            Some(_) => Err(refuse(ErrorCode::Forbidden, "this connection is authenticated as another user")),
            // Its subscriptions joined presence anonymously; counting their
            // leave against a user would corrupt presence (the owner has no
            // join to match). Authenticate first.
            None if !conn.state.subscriptions.is_empty() => Err(refuse(
                ErrorCode::BadRequest,
                "connect before subscribing (or pass ?token=): this connection already subscribed anonymously",
            )),
            None => {
                self.register_user(key, generation, identity, id, true);
                Ok(())
            }
        }
    }

    fn ack(&mut self, key: ConnKey, generation: u32, id: Option<&RequestId>, seq: u64) -> Result<(), Refusal> {
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        let Some(user) = conn.state.user().cloned() else {
            return Err(refuse(ErrorCode::Unauthorized, "only authenticated connections have an inbox"));
        };
        let owner = owner_of(&user, self.shard_count());
        self.bus.send(owner, Message::UserAck { user, seq });
        self.reply_ok(key, id, |_| {});
        Ok(())
    }

    /// Presence and history: access rules here, the answer from the owner.
    fn channel_query(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        channel: &str,
        kind: QueryKind,
    ) -> Result<(), Refusal> {
        let config = self.channel_access(key, channel)?;
        let namespace = config.namespace_for(channel);
        let channel: Arc<str> = channel.into();
        let items_max = config.limits.query_items_max;
        let query = match kind {
            QueryKind::Presence { .. } | QueryKind::PresenceStats if !namespace.presence => {
                return Err(refuse(ErrorCode::Forbidden, "presence is not kept for this channel"));
            }
            QueryKind::Presence { cursor, limit } => Query::Presence {
                channel: Arc::clone(&channel),
                cursor,
                // As on the admin socket: 0 or none is the maximum.
                limit: limit.filter(|&limit| limit > 0).map_or(items_max, |limit| (limit as usize).min(items_max)),
            },
            QueryKind::PresenceStats => Query::PresenceStats { channel: Arc::clone(&channel) },
            QueryKind::History { .. } if !namespace.client_history => {
                return Err(refuse(ErrorCode::Forbidden, "clients may not read this channel's history"));
            }
            QueryKind::History { since, limit } => Query::History {
                channel: Arc::clone(&channel),
                since_epoch: since.as_ref().map(|p| p.epoch.clone().into_boxed_str()),
                since_offset: since.map_or(0, |p| p.offset),
                limit: limit.map_or(CLIENT_HISTORY_DEFAULT_LIMIT, |l| l as usize).clamp(1, items_max),
            },
        };
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        conn.state.marks.insert(Marks::AWAITING_REPLY);
        let reply = ReplyTo::Client { conn: ConnRef { shard: self.id as u16, key, generation }, request_id: id };
        let owner = owner_of(&channel, self.shard_count());
        self.bus.send(owner, Message::Query(Box::new(QueryRequest { reply, query })));
        Ok(())
    }

    /// A reply came back: the connection's next commands may run.
    pub(crate) fn unpause(&mut self, key: ConnKey, generation: u32) {
        if let Some(conn) = self.conn_mut(key, generation) {
            conn.state.marks.remove(Marks::AWAITING_REPLY);
            self.mark_ready(key, generation);
        }
    }

    /// Sends one JSON text message to a client.
    pub(crate) fn send_json(&mut self, key: ConnKey, build: impl FnOnce(&mut Vec<u8>)) {
        if self.conns.get(key as usize).is_some_and(|conn| conn.state.phase() == Phase::Session) {
            let mut json = Vec::with_capacity(96);
            build(&mut json);
            self.session_push(key, BufItem::Json(json.into_boxed_slice()));
            return;
        }
        let mut builder = FrameBuilder::with_capacity(96);
        build(builder.payload());
        let (mut buffer, start) = builder.finish(OPCODE_TEXT);
        buffer.drain(..start);
        self.send_owned(key, buffer);
    }

    pub(crate) fn reply_ok(
        &mut self,
        key: ConnKey,
        id: Option<&RequestId>,
        fields: impl FnOnce(&mut json::ObjectWriter<'_>),
    ) {
        self.send_json(key, |out| client::write_ok(out, id, fields));
    }

    pub(crate) fn reply_error(&mut self, key: ConnKey, error: &CommandError) {
        self.send_json(key, |out| client::write_error(out, error));
    }
}

/// Which channel query a client asked for.
enum QueryKind {
    Presence { cursor: Option<Box<str>>, limit: Option<u32> },
    PresenceStats,
    History { since: Option<Position>, limit: Option<u32> },
}
