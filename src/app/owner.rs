//! Bus messages about channels: the owner's side (subscribe, unsubscribe,
//! publish, presence events) and the replies that come back to a
//! connection's shard or an admin request.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::message::{
    PublishOk, PublishRefusal, PublishRequest, QueryAnswer, ReplyTo, SubscribeOk, SubscribeReply, SubscribeRequest,
};
use crate::bus::Message;
use crate::config::Namespace;
use crate::connection::PENDING_SLOT;
use crate::hub::index::Subscriber;
use crate::hub::owner_of;
use crate::hub::presence::CountsNow;
use crate::hub::publication::{Publication, PushFields};
use crate::limits::LimitKind;
use crate::shard::Shard;
use kometa_protocol::client::{CommandError, ErrorCode};

impl Shard {
    pub(crate) fn handle_message(&mut self, message: Message) {
        if self.is_cluster() {
            // The owner's cluster-mode side (shard/cluster.rs).
            match message {
                Message::Subscribe(request) => return self.cluster_subscribe(*request),
                Message::Unsubscribe { channel, shard, user, .. } => {
                    return self.cluster_unsubscribe(&channel, usize::from(shard), user)
                }
                Message::Publish(request) => return self.cluster_publish(*request),
                Message::UserConnect(request) => return self.cluster_user_connect(*request),
                Message::UserDisconnect { user, shard } => {
                    return self.cluster_user_disconnect(&user, usize::from(shard))
                }
                Message::UserAck { user, seq } => return self.cluster_user_ack(user, seq),
                Message::Query(request) => return self.cluster_query(*request),
                Message::FromCluster(message) => return self.handle_from_cluster(*message),
                other => return self.handle_local_message(other),
            }
        }
        self.handle_local_message(message)
    }

    fn handle_local_message(&mut self, message: Message) {
        match message {
            Message::Subscribe(request) => self.owner_subscribe(*request),
            Message::Unsubscribe { channel, shard, user, presence_counts } => {
                self.owner_unsubscribe(&channel, usize::from(shard), user, presence_counts)
            }
            Message::Publish(request) => self.owner_publish(*request),
            Message::Deliver { publication, accounted } => self.queue_fanout(publication, accounted as usize),
            Message::SubscribeReply(reply) => self.subscribe_reply(*reply),
            Message::PublishReply(reply) => {
                let (reply_to, result) = *reply;
                self.publish_reply(reply_to, result);
            }
            Message::UserConnect(request) => self.owner_user_connect(*request),
            Message::UserDisconnect { user, shard } => self.owner_user_disconnect(&user, usize::from(shard)),
            Message::UserAck { user, seq } => self.users.ack(&user, seq),
            Message::UserConnectReply(reply) => self.user_connect_reply(*reply),
            Message::UserDeliver { user, push } => self.user_deliver(&user, &push),
            Message::CloseUser { user, code, reason } => self.close_user(&user, code, &reason),
            Message::Query(request) => {
                let request = *request;
                let answer = self.answer_query(request.query, &request.reply);
                self.send_answer(request.reply, answer);
            }
            Message::Answer(answer) => self.receive_answer(*answer),
            Message::Adopt { fd, peer, input, tls } => self.adopt(fd, peer, input, tls),
            Message::BackendReply(reply) => self.backend_reply(*reply),
            Message::Backend(_) => tracing::warn!(shard = self.id, "a backend call reached a shard"),
            Message::ToCluster(_) | Message::FromCluster(_) => {
                debug_assert!(false, "cluster message on a shard without a cluster");
            }
        }
    }

    /// Sends a join/leave event to the channel's subscribers (outside the
    /// channel's offsets and history).
    fn presence_event(&mut self, channel: &Arc<str>, event: &str, user: &str) {
        let data = serde_json::json!({ "user": user }).to_string();
        let publication = Arc::new(Publication::channel_event(Arc::clone(channel), event, data.as_bytes()));
        let Some(state) = self.owned.get(channel) else { return };
        let targets = state.subscriber_targets();
        self.send_deliveries(&publication, &targets);
    }

    fn owner_subscribe(&mut self, request: SubscribeRequest) {
        debug_assert_eq!(owner_of(&request.channel, self.shard_count()), self.id);
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(&request.channel);
        let now_ms = self.now_ms;
        let shard = usize::from(request.conn.shard);
        let mut joined = false;
        let result = match self.owned.get_or_create(&request.channel, now_ms) {
            Err(_) => {
                self.metrics.limit_refusals.add(LimitKind::ChannelsMax);
                Err(CommandError::new(
                    request.request_id.clone(),
                    ErrorCode::TooManyChannelsOnServer,
                    "the server's channel limit is reached",
                ))
            }
            Ok(channel) if channel.subscribers >= namespace.subscribers_max as u64 => {
                self.metrics.limit_refusals.add(LimitKind::SubscribersMax);
                Err(CommandError::new(
                    request.request_id.clone(),
                    ErrorCode::ChannelFull,
                    "channel has its maximum of subscribers",
                ))
            }
            Ok(channel) => {
                channel.add_subscriber(shard, now_ms);
                if namespace.presence {
                    joined = channel.presence.join(request.user.as_ref());
                }
                if request.presence_counts {
                    channel.counts_push.watchers += 1;
                }
                let recovery = request.since.as_ref().map(|position| channel.recover(&position.epoch, position.offset));
                Ok(SubscribeOk { epoch: Arc::clone(&channel.epoch), offset: channel.last_offset, recovery })
            }
        };
        let accepted = result.is_ok();
        let channel = Arc::clone(&request.channel);
        let user = request.user.clone();
        let reply = SubscribeReply {
            conn: request.conn,
            channel: request.channel,
            user: request.user,
            request_id: request.request_id,
            presence_counts: request.presence_counts,
            result,
        };
        self.bus.send(shard, Message::SubscribeReply(Box::new(reply)));
        if joined && namespace.join_leave {
            if let Some(user) = user {
                self.presence_event(&channel, "join", &user);
            }
        }
        if accepted && namespace.presence {
            // After the reply on the same queue: a new watcher hears the counts too.
            self.presence_counts_changed(&channel);
        }
    }

    fn owner_unsubscribe(&mut self, channel_name: &str, shard: usize, user: Option<Arc<str>>, presence_counts: bool) {
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel_name);
        let now_ms = self.now_ms;
        let Some(channel) = self.owned.get_mut(channel_name) else { return };
        channel.remove_subscriber(shard, now_ms);
        if presence_counts {
            channel.counts_push.watchers = channel.counts_push.watchers.saturating_sub(1);
        }
        let left = namespace.presence && channel.presence.leave(user.as_ref());
        let name = Arc::clone(&channel.name);
        if left && namespace.join_leave {
            if let Some(user) = user {
                self.presence_event(&name, "leave", &user);
            }
        }
        if namespace.presence {
            self.presence_counts_changed(&name);
        }
    }

    /// A channel's presence changed: its counts go to the subscriptions
    /// that asked for them, at once or when `presence_counts_interval_ms`
    /// since the last push is over (`push_due_presence_counts`).
    fn presence_counts_changed(&mut self, name: &Arc<str>) {
        let interval_ms = self.config.timeouts.presence_counts_interval_ms;
        let now_ms = self.now_ms;
        let Some(channel) = self.owned.get_mut(name) else { return };
        match channel.counts_push.changed(now_ms, interval_ms) {
            CountsNow::Push => self.push_presence_counts(name),
            CountsNow::Scheduled => {
                let due_ms = channel.counts_push.due_at_ms(interval_ms).unwrap_or(now_ms);
                self.presence_counts_due.push(Arc::clone(name));
                self.presence_counts_next_ms = self.presence_counts_next_ms.min(due_ms);
            }
            CountsNow::Nothing => {}
        }
    }

    /// Pushes the scheduled presence counts whose time has come (each tick
    /// once the earliest is due).
    pub(crate) fn push_due_presence_counts(&mut self) {
        if self.now_ms < self.presence_counts_next_ms {
            return;
        }
        let interval_ms = self.config.timeouts.presence_counts_interval_ms;
        let now_ms = self.now_ms;
        let mut next_ms = u64::MAX;
        for name in std::mem::take(&mut self.presence_counts_due) {
            let Some(channel) = self.owned.get_mut(&name) else { continue };
            match channel.counts_push.due(now_ms, interval_ms) {
                CountsNow::Push => self.push_presence_counts(&name),
                CountsNow::Scheduled => {
                    next_ms = next_ms.min(channel.counts_push.due_at_ms(interval_ms).unwrap_or(now_ms));
                    self.presence_counts_due.push(name);
                }
                CountsNow::Nothing => {}
            }
        }
        self.presence_counts_next_ms = next_ms;
    }

    fn push_presence_counts(&mut self, name: &Arc<str>) {
        let Some(channel) = self.owned.get(name) else { return };
        let stats = channel.presence.stats();
        let publication = Arc::new(Publication::presence_counts(
            Arc::clone(name),
            stats.users,
            stats.connections,
            stats.anonymous_connections,
        ));
        let targets = channel.subscriber_targets();
        self.send_deliveries(&publication, &targets);
    }

    fn owner_publish(&mut self, request: PublishRequest) {
        let PublishRequest { channel, event, data, user, reply, only_if_exists } = request;
        // The server's own events (user status) have no publisher to retry
        // them, and a lost "offline" would show a user online forever; they
        // are bounded by connection churn, so they skip load shedding.
        let sheddable = !matches!(reply, ReplyTo::Nobody);
        let result = if self.is_draining() {
            Err(PublishRefusal::ShuttingDown)
        } else if sheddable && self.bus.overloaded() {
            Err(PublishRefusal::Overloaded)
        } else if only_if_exists && self.owned.get(&channel).is_none() {
            Err(PublishRefusal::NoChannel)
        } else {
            let config = Arc::clone(&self.config);
            let namespace: &Namespace = config.namespace_for(&channel);
            let now_ms = self.now_ms;
            let backlog_max = config.limits.fanout_backlog_max;
            let backlogs = &self.shared.fanout_backlog;
            match self.owned.get_or_create(&channel, now_ms) {
                Err(_) => {
                    self.metrics.limit_refusals.add(LimitKind::ChannelsMax);
                    Err(PublishRefusal::ChannelLimit)
                }
                // A shard with subscribers is this far behind: shed load at
                // the publisher rather than let latency grow without bound.
                Ok(state)
                    if sheddable
                        && state.subscriber_shards().any(|s| backlogs[s].load(Ordering::Relaxed) > backlog_max) =>
                {
                    self.metrics.publications_refused += 1;
                    self.metrics.limit_refusals.add(LimitKind::FanoutBacklogMax);
                    Err(PublishRefusal::FanoutBacklog)
                }
                Ok(state) => {
                    let fields = PushFields { channel: &channel, event: &event, data: &data, user: user.as_deref() };
                    let publication = state.publish(fields, namespace, now_ms);
                    let ok = PublishOk {
                        offset: publication.offset,
                        subscribers: state.subscribers,
                        epoch: Arc::clone(&state.epoch),
                    };
                    let targets = state.subscriber_targets();
                    self.send_deliveries(&publication, &targets);
                    self.metrics.publications += 1;
                    Ok(ok)
                }
            }
        };
        if let Some(destination) = reply.shard() {
            self.bus.send(destination, Message::PublishReply(Box::new((reply, result))));
        }
    }

    fn subscribe_reply(&mut self, reply: SubscribeReply) {
        let SubscribeReply { conn: conn_ref, channel, user, request_id, presence_counts, result } = reply;
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
                self.bus.send(owner, Message::Unsubscribe { channel, shard: self.id as u16, user, presence_counts });
            }
            return;
        }
        let Some(local) = local else { return };
        match result {
            Ok(ok) => {
                let subscriber = Subscriber { conn: key, after_offset: ok.offset, presence_counts };
                let slot = self.index.resolve_pending(local, Some(subscriber));
                if let (Some(slot), Some(conn)) = (slot, self.conn_mut(key, generation)) {
                    if let Some(subscription) =
                        conn.state.subscriptions.iter_mut().find(|s| s.channel == local && s.slot == PENDING_SLOT)
                    {
                        subscription.slot = slot;
                    }
                }
                let missed = match &ok.recovery {
                    Some(Ok(missed)) => missed.as_slice(),
                    _ => &[],
                };
                self.reply_ok(key, request_id.as_ref(), |object| {
                    object.str("channel", &channel).str("epoch", &ok.epoch).u64("offset", ok.offset);
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
                        conn.state.subscriptions.iter().position(|s| s.channel == local && s.slot == PENDING_SLOT)
                    {
                        conn.state.subscriptions.swap_remove(position);
                    }
                }
                self.reply_error(key, &error);
            }
        }
        self.unpause(key, generation);
    }

    fn publish_reply(&mut self, reply_to: ReplyTo, result: Result<PublishOk, PublishRefusal>) {
        match reply_to {
            // Admin replies go to the admin gateway's endpoint, never to a shard.
            ReplyTo::Admin { .. } => debug_assert!(false, "a shard got an admin reply"),
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
                        self.metrics.refusals.refused(refusal);
                        let (code, message) = match refusal {
                            PublishRefusal::Overloaded | PublishRefusal::FanoutBacklog => {
                                (ErrorCode::Overloaded, "server busy, retry")
                            }
                            PublishRefusal::ChannelLimit => {
                                (ErrorCode::TooManyChannelsOnServer, "the server's channel limit is reached")
                            }
                            PublishRefusal::ShuttingDown => (ErrorCode::Overloaded, "server shutting down"),
                            PublishRefusal::NoChannel => (ErrorCode::Internal, "channel does not exist"),
                            PublishRefusal::Unavailable => {
                                (ErrorCode::Unavailable, "the cluster's Redis is unreachable; retry")
                            }
                            PublishRefusal::OutcomeUnknown => (
                                ErrorCode::UnknownOutcome,
                                "Redis went away with the publication in flight: it may or may not have been published",
                            ),
                        };
                        self.reply_error(key, &CommandError::new(request_id, code, message));
                    }
                }
                self.unpause(key, generation);
            }
            ReplyTo::Nobody => {}
        }
    }

    /// Sends a publication to each shard with subscribers, adding their
    /// count there to that shard's fan-out backlog until it is written.
    pub(crate) fn send_deliveries(&mut self, publication: &Arc<Publication>, targets: &[(usize, u32)]) {
        for &(shard, subscribers) in targets {
            self.shared.fanout_backlog[shard].fetch_add(subscribers as usize, Ordering::Relaxed);
            let message = Message::Deliver { publication: Arc::clone(publication), accounted: subscribers };
            self.bus.send(shard, message);
        }
    }

    pub(crate) fn send_answer(&mut self, reply: ReplyTo, answer: crate::bus::query::Answer) {
        if let Some(destination) = reply.shard() {
            self.bus.send(destination, Message::Answer(Box::new(QueryAnswer { reply, answer })));
        }
    }
}
