//! Client protocol commands on the connection's shard: validation, limits,
//! and the request to the channel's owner. Replies that need the owner
//! come back through the bus (`owner.rs`); until then the connection's
//! input is paused, so its commands run strictly in order.

use std::borrow::Cow;
use std::sync::Arc;

use crate::bus::message::{ConnRef, PublishRequest, ReplyTo, SubscribeRequest};
use crate::bus::Message;
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::proto::client::{self, Command, CommandError, ErrorCode, Position, RequestId};
use crate::proto::json;
use crate::proto::ws::{FrameBuilder, OPCODE_TEXT};
use crate::session::{Flags, Subscription, PENDING_SLOT};
use crate::shard::Shard;

/// A command refused on this shard: the code and the reason.
type Refusal = (ErrorCode, Cow<'static, str>);

fn refuse(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Refusal {
    (code, message.into())
}

impl Shard {
    pub(crate) fn client_command(&mut self, key: ConnKey, generation: u32, message: &[u8]) {
        let request = match client::decode(message) {
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
            Command::Subscribe { channel, since } => self.subscribe(key, generation, id.clone(), &channel, since),
            Command::Unsubscribe { channel } => self.unsubscribe(key, generation, id.as_ref(), &channel),
            Command::Publish { channel, event, data } => {
                self.client_publish(key, generation, id.clone(), &channel, &event, data.get().as_bytes())
            }
            Command::Connect { .. }
            | Command::Presence { .. }
            | Command::PresenceStats { .. }
            | Command::History { .. }
            | Command::Ack { .. } => Err(refuse(ErrorCode::NotAvailable, "not available on this server")),
        };
        if let Err((code, message)) = outcome {
            self.reply_error(key, &CommandError::new(id, code, message));
        }
    }

    fn check_channel(&self, channel: &str) -> Result<(), Refusal> {
        client::check_channel_name(channel, self.config.limits.channel_name_bytes_max)
            .map_err(|why| refuse(ErrorCode::BadChannel, why))
    }

    fn subscribe(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        channel: &str,
        since: Option<Position>,
    ) -> Result<(), Refusal> {
        self.check_channel(channel)?;
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        let Some(conn) = self.conn_mut(key, generation) else {
            return Ok(());
        };
        let user = conn.session.user.clone();
        if user.is_none() && (!namespace.anonymous || namespace.private) {
            return Err(refuse(ErrorCode::Unauthorized, "this channel needs a user token"));
        }
        if conn.session.subscriptions.len() >= config.limits.channels_per_connection_max {
            return Err(refuse(
                ErrorCode::TooManyChannels,
                format!("at most {} channels per connection", config.limits.channels_per_connection_max),
            ));
        }
        if let Some(local) = self.index.lookup(channel) {
            let conn = self.conns.get(key as usize).map(|c| &c.session.subscriptions);
            if conn.is_some_and(|subscriptions| subscriptions.iter().any(|s| s.channel == local)) {
                return Err(refuse(ErrorCode::AlreadySubscribed, "already subscribed"));
            }
        }
        if self.bus.overloaded() {
            return Err(refuse(ErrorCode::Overloaded, "server busy, retry"));
        }
        let (local, name) = self.index.intern(channel);
        self.index.add_pending(local);
        let Some(conn) = self.conn_mut(key, generation) else {
            return Ok(());
        };
        conn.session.subscriptions.push(Subscription { channel: local, slot: PENDING_SLOT });
        conn.session.flags.insert(Flags::AWAITING_REPLY);
        let owner = owner_of(channel, self.shard_count());
        let request = SubscribeRequest {
            channel: name,
            conn: ConnRef { shard: self.id as u16, key, generation },
            user,
            since,
            request_id: id,
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
        self.check_channel(channel)?;
        let not_subscribed = || refuse(ErrorCode::NotSubscribed, "not subscribed");
        let local = self.index.lookup(channel).ok_or_else(not_subscribed)?;
        let Some(conn) = self.conn_mut(key, generation) else {
            return Ok(());
        };
        let position = conn
            .session
            .subscriptions
            .iter()
            .position(|s| s.channel == local && s.slot != PENDING_SLOT)
            .ok_or_else(not_subscribed)?;
        let subscription = conn.session.subscriptions.swap_remove(position);
        let user = conn.session.user.clone();
        let name = self.index.get(local).map(|c| Arc::clone(&c.name));
        self.index.remove(local, subscription.slot);
        if let Some(name) = name {
            let owner = owner_of(&name, self.shard_count());
            self.bus.send(owner, Message::Unsubscribe { channel: name, shard: self.id as u16, user });
        }
        self.reply_ok(key, id, |_| {});
        Ok(())
    }

    fn client_publish(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        channel: &str,
        event: &str,
        data: &[u8],
    ) -> Result<(), Refusal> {
        self.check_channel(channel)?;
        client::check_event_name(event).map_err(|why| refuse(ErrorCode::BadRequest, why))?;
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        if !namespace.client_publish {
            return Err(refuse(ErrorCode::Forbidden, "clients may not publish to this channel"));
        }
        if data.len() > config.limits.publication_data_bytes_max {
            return Err(refuse(
                ErrorCode::MessageTooLarge,
                format!("data over {} bytes", config.limits.publication_data_bytes_max),
            ));
        }
        if self.bus.overloaded() {
            return Err(refuse(ErrorCode::Overloaded, "server busy, retry"));
        }
        let Some(conn) = self.conn_mut(key, generation) else {
            return Ok(());
        };
        let user = conn.session.user.clone();
        if user.is_none() && !namespace.anonymous {
            return Err(refuse(ErrorCode::Unauthorized, "this channel needs a user token"));
        }
        conn.session.flags.insert(Flags::AWAITING_REPLY);
        let request = PublishRequest {
            channel: channel.into(),
            event: event.into(),
            data: json::single_line(data).into_owned().into_boxed_slice(),
            user,
            reply: ReplyTo::Client { conn: ConnRef { shard: self.id as u16, key, generation }, request_id: id },
        };
        let owner = owner_of(channel, self.shard_count());
        self.bus.send(owner, Message::Publish(Box::new(request)));
        Ok(())
    }

    /// A reply came back: the connection's next commands may run.
    pub(crate) fn unpause(&mut self, key: ConnKey, generation: u32) {
        if let Some(conn) = self.conn_mut(key, generation) {
            conn.session.flags.remove(Flags::AWAITING_REPLY);
            self.mark_ready(key, generation);
        }
    }

    /// Sends one JSON text message to a client.
    pub(crate) fn send_json(&mut self, key: ConnKey, build: impl FnOnce(&mut Vec<u8>)) {
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
