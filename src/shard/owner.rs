//! Bus messages: the owner's side (subscribe, unsubscribe, publish) and the
//! replies that come back to a connection's shard or an admin request.

use std::sync::Arc;

use super::{AdminWait, Shard};
use crate::bus::message::{
    PublishOk, PublishRefusal, PublishRequest, ReplyTo, ShardStats, SubscribeOk, SubscribeReply, SubscribeRequest,
};
use crate::bus::Message;
use crate::hub::index::Subscriber;
use crate::hub::owner_of;
use crate::hub::publication::PushFields;
use crate::proto::client::{CommandError, ErrorCode};
use crate::session::PENDING_SLOT;

impl Shard {
    pub(crate) fn handle_message(&mut self, message: Message) {
        match message {
            Message::Subscribe(request) => self.owner_subscribe(*request),
            Message::Unsubscribe { channel, shard, user } => self.owner_unsubscribe(&channel, usize::from(shard), user),
            Message::Publish(request) => self.owner_publish(*request),
            Message::Deliver(publication) => self.queue_fanout(publication),
            Message::SubscribeReply(reply) => self.subscribe_reply(*reply),
            Message::PublishReply(reply) => {
                let (reply_to, result) = *reply;
                self.publish_reply(reply_to, result);
            }
            Message::StatsRequest { token, origin } => {
                let stats = Box::new(self.stats());
                self.bus.send(usize::from(origin), Message::StatsReply { token, stats });
            }
            Message::StatsReply { token, stats } => self.stats_reply(token, *stats),
        }
    }

    fn owner_subscribe(&mut self, request: SubscribeRequest) {
        debug_assert_eq!(owner_of(&request.channel, self.shard_count()), self.id);
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(&request.channel);
        let now_ms = self.now_ms;
        let shard = usize::from(request.conn.shard);
        let result = match self.owned.get_or_create(&request.channel, now_ms) {
            Err(_) => Err(CommandError::new(
                request.request_id.clone(),
                ErrorCode::TooManyChannelsOnServer,
                "the server's channel limit is reached",
            )),
            Ok(channel) if channel.subscribers >= namespace.subscribers_max as u64 => Err(CommandError::new(
                request.request_id.clone(),
                ErrorCode::ChannelFull,
                "channel has its maximum of subscribers",
            )),
            Ok(channel) => {
                channel.add_subscriber(shard, now_ms);
                if namespace.presence {
                    channel.presence.join(request.user.as_ref());
                }
                let recovery = request.since.as_ref().map(|position| channel.recover(&position.epoch, position.offset));
                Ok(SubscribeOk { epoch: Arc::clone(&channel.epoch), offset: channel.last_offset, recovery })
            }
        };
        let reply = SubscribeReply {
            conn: request.conn,
            channel: request.channel,
            user: request.user,
            request_id: request.request_id,
            result,
        };
        self.bus.send(shard, Message::SubscribeReply(Box::new(reply)));
    }

    fn owner_unsubscribe(&mut self, channel: &str, shard: usize, user: Option<Arc<str>>) {
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        let now_ms = self.now_ms;
        if let Some(channel) = self.owned.get_mut(channel) {
            channel.remove_subscriber(shard, now_ms);
            if namespace.presence {
                channel.presence.leave(user.as_ref());
            }
        }
    }

    fn owner_publish(&mut self, request: PublishRequest) {
        let PublishRequest { channel, event, data, user, reply } = request;
        let result = if self.is_draining() {
            Err(PublishRefusal::ShuttingDown)
        } else if self.bus.overloaded() {
            Err(PublishRefusal::Overloaded)
        } else {
            let config = Arc::clone(&self.config);
            let namespace = config.namespace_for(&channel);
            let now_ms = self.now_ms;
            match self.owned.get_or_create(&channel, now_ms) {
                Err(_) => Err(PublishRefusal::ChannelLimit),
                Ok(state) => {
                    let fields = PushFields { channel: &channel, event: &event, data: &data, user: user.as_deref() };
                    let publication = state.publish(fields, namespace, now_ms);
                    let ok = PublishOk {
                        offset: publication.offset,
                        subscribers: state.subscribers,
                        epoch: Arc::clone(&state.epoch),
                    };
                    let shards: Vec<usize> = state.subscriber_shards().collect();
                    for shard in shards {
                        self.bus.send(shard, Message::Deliver(Arc::clone(&publication)));
                    }
                    self.metrics.publications += 1;
                    Ok(ok)
                }
            }
        };
        let destination = reply.shard();
        self.bus.send(destination, Message::PublishReply(Box::new((reply, result))));
    }

    fn subscribe_reply(&mut self, reply: SubscribeReply) {
        let SubscribeReply { conn: conn_ref, channel, user, request_id, result } = reply;
        let (key, generation) = (conn_ref.key, conn_ref.generation);
        let local = self.index.lookup(&channel);
        debug_assert!(local.is_some(), "pending subscription without a local channel entry");
        if !self.alive(key, generation) {
            // Closed while waiting: settle the pending entry and undo the
            // owner's count.
            if let Some(local) = local {
                self.index.resolve_pending(local, None);
            }
            if result.is_ok() {
                let owner = owner_of(&channel, self.shard_count());
                self.bus.send(owner, Message::Unsubscribe { channel, shard: self.id as u16, user });
            }
            return;
        }
        let Some(local) = local else { return };
        match result {
            Ok(ok) => {
                let slot = self.index.resolve_pending(local, Some(Subscriber { conn: key, after_offset: ok.offset }));
                if let (Some(slot), Some(conn)) = (slot, self.conn_mut(key, generation)) {
                    if let Some(subscription) =
                        conn.session.subscriptions.iter_mut().find(|s| s.channel == local && s.slot == PENDING_SLOT)
                    {
                        subscription.slot = slot;
                    }
                }
                let missed = match &ok.recovery {
                    Some(Ok(missed)) => missed.as_slice(),
                    _ => &[],
                };
                self.reply_ok(key, request_id.as_ref(), |object| {
                    object.str("epoch", &ok.epoch).u64("offset", ok.offset);
                    match &ok.recovery {
                        Some(Ok(_)) => {
                            object.bool("recovered", true);
                        }
                        Some(Err(failure)) => {
                            object.bool("recovered", false).str("reason", failure.reason());
                        }
                        None => {}
                    }
                });
                for publication in missed {
                    self.deliver(key, publication);
                }
            }
            Err(error) => {
                self.index.resolve_pending(local, None);
                if let Some(conn) = self.conn_mut(key, generation) {
                    if let Some(position) =
                        conn.session.subscriptions.iter().position(|s| s.channel == local && s.slot == PENDING_SLOT)
                    {
                        conn.session.subscriptions.swap_remove(position);
                    }
                }
                self.reply_error(key, &error);
            }
        }
        self.unpause(key, generation);
    }

    fn publish_reply(&mut self, reply_to: ReplyTo, result: Result<PublishOk, PublishRefusal>) {
        match reply_to {
            ReplyTo::Admin { token, .. } => {
                if let Some(AdminWait::Publish(sender)) = self.admin_waits.remove(&token) {
                    let _ = sender.send(result);
                }
            }
            ReplyTo::Client { conn, request_id } => {
                let (key, generation) = (conn.key, conn.generation);
                if !self.alive(key, generation) {
                    return;
                }
                match result {
                    Ok(ok) => self.reply_ok(key, request_id.as_ref(), |object| {
                        object.u64("offset", ok.offset);
                    }),
                    Err(refusal) => {
                        let (code, message) = match refusal {
                            PublishRefusal::Overloaded => (ErrorCode::Overloaded, "server busy, retry"),
                            PublishRefusal::ChannelLimit => {
                                (ErrorCode::TooManyChannelsOnServer, "the server's channel limit is reached")
                            }
                            PublishRefusal::ShuttingDown => (ErrorCode::Overloaded, "server shutting down"),
                        };
                        self.reply_error(key, &CommandError::new(request_id, code, message));
                    }
                }
                self.unpause(key, generation);
            }
        }
    }

    fn stats_reply(&mut self, token: u64, stats: ShardStats) {
        let Some(AdminWait::Stats { remaining, collected, .. }) = self.admin_waits.get_mut(&token) else {
            return;
        };
        collected.push(stats);
        *remaining -= 1;
        if *remaining == 0 {
            if let Some(AdminWait::Stats { mut collected, reply, .. }) = self.admin_waits.remove(&token) {
                collected.sort_by_key(|s| s.shard);
                let _ = reply.send(collected);
            }
        }
    }
}
