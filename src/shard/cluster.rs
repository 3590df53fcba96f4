//! Cluster mode, owner side: a shard stays the owner of its channels and
//! users on this node, but Redis (through the cluster gateway) assigns
//! offsets, keeps history and holds cluster-wide presence and users.
//!
//! Per channel with local subscribers, the owner *follows* it: a catch-up
//! (the node subscribes to the channel's pub/sub, then reads its position)
//! gives the starting point; then publications arrive from Redis in order
//! and go to local subscribers with the same fan-out as on a single node.
//! What arrives out of order, or after a Redis outage, is settled by
//! `hub::follow`: filled from history, or announced to subscribers as lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Shard;
use crate::bus::cluster::{ChannelPosition, ClusterFailure, CountChange, FromCluster, ToCluster, UserRefusal};
use crate::bus::message::{
    PublishRefusal, PublishRequest, QueryRequest, ReplyTo, SubscribeOk, SubscribeReply, SubscribeRequest,
    UserConnectReply, UserConnectRequest,
};
use crate::bus::query::Query;
use crate::bus::Message;
use crate::hub::follow::{self, Arrival, CaughtUp, Position, Step};
use crate::hub::history::RecoveryFailure;
use crate::hub::publication::Publication;
use crate::hub::user::Refused;
use crate::util::unix_time_ms;
use kometa_protocol::client::{CommandError, ErrorCode};

/// Followed channels' counts are reported again at least this often.
const META_REFRESH_MAX_MS: u64 = 3_600_000;

/// A shard's cluster state.
#[derive(Debug)]
pub struct ClusterSide {
    /// The cluster gateway's bus index.
    pub gateway: usize,
    /// Channels this shard owns and follows in Redis.
    followers: HashMap<Arc<str>, Follower>,
    /// Tags catch-ups, so an answer is matched to its request.
    next_token: u64,
    /// Channels whose subscriber count changed since the last report.
    dirty_counts: HashSet<Arc<str>>,
    /// When subscriber counts go to Redis next.
    next_counts_ms: u64,
    /// Followed channels whose catch-up failed (Redis unreachable), retried
    /// at each counts tick.
    retry: HashSet<Arc<str>>,
    /// When every followed channel's count is reported again (which keeps
    /// its meta alive in Redis).
    next_meta_refresh_ms: u64,
}

impl ClusterSide {
    pub fn new(gateway: usize) -> ClusterSide {
        ClusterSide {
            gateway,
            followers: HashMap::new(),
            next_token: 1,
            dirty_counts: HashSet::new(),
            next_counts_ms: 0,
            retry: HashSet::new(),
            next_meta_refresh_ms: META_REFRESH_MAX_MS,
        }
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }
}

/// How far this node is with one channel.
#[derive(Debug, Default)]
struct Follower {
    /// False until the first catch-up has answered: no position yet.
    synced: bool,
    /// Token of the catch-up in flight (0: none).
    catching_up: u64,
    /// Publications that arrived during a catch-up (at most
    /// `cluster.catch_up_buffer_max`; past it they are read back from history).
    held: Vec<Arc<Publication>>,
    /// Subscriptions waiting for a catch-up to finish.
    waiting: Vec<SubscribeRequest>,
    /// Resuming subscriptions waiting for a history read, by token.
    resuming: HashMap<u64, SubscribeRequest>,
}

impl Follower {
    fn is_busy(&self) -> bool {
        self.catching_up != 0 || !self.waiting.is_empty() || !self.resuming.is_empty()
    }
}

fn failure_error(request_id: Option<kometa_protocol::client::RequestId>, failure: ClusterFailure) -> CommandError {
    match failure {
        ClusterFailure::Unavailable | ClusterFailure::InFlight | ClusterFailure::Refused => {
            CommandError::new(request_id, ErrorCode::Unavailable, "the cluster's Redis is unreachable; retry")
        }
        ClusterFailure::Overloaded => CommandError::new(request_id, ErrorCode::Overloaded, "server busy, retry"),
    }
}

impl Shard {
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    fn send_to_gateway(&mut self, message: ToCluster) {
        if let Some(gateway) = self.cluster.as_ref().map(|c| c.gateway) {
            self.bus.send(gateway, Message::ToCluster(Box::new(message)));
        }
    }

    fn follower(&mut self, channel: &str) -> Option<&mut Follower> {
        self.cluster.as_mut()?.followers.get_mut(channel)
    }

    pub(crate) fn handle_from_cluster(&mut self, message: FromCluster) {
        match message {
            FromCluster::Publication(publication) => self.remote_publication(publication),
            FromCluster::ChannelEvent(event) => {
                if let Some(state) = self.owned.get(&event.channel) {
                    let targets = state.subscriber_targets();
                    self.send_deliveries(&event, &targets);
                }
            }
            FromCluster::CaughtUp { channel, token, result } => self.caught_up(&channel, token, result),
            FromCluster::UserConnected { request, result, reregister } => {
                self.cluster_user_connected(request, result, reregister)
            }
            FromCluster::UserMessage { user, push } => {
                for shard in self.users.connections(&user).1 {
                    self.bus.send(shard, Message::UserDeliver { user: Arc::clone(&user), push: Arc::clone(&push) });
                }
            }
            FromCluster::CloseUser { user, code, reason } => {
                for shard in self.users.connections(&user).1 {
                    let message = Message::CloseUser { user: Arc::clone(&user), code, reason: Arc::clone(&reason) };
                    self.bus.send(shard, message);
                }
            }
            FromCluster::Reset { incarnation } => self.cluster_reset(incarnation),
        }
    }

    // ---- subscriptions ---------------------------------------------------

    /// Answered at once when this node follows the channel and can serve a
    /// resume from its own history ring; else after a catch-up or a
    /// history read in Redis.
    pub(crate) fn cluster_subscribe(&mut self, request: SubscribeRequest) {
        if self.owned.get_or_create(&request.channel, self.now_ms).is_err() {
            let error = CommandError::new(
                request.request_id.clone(),
                ErrorCode::TooManyChannelsOnServer,
                "the server's channel limit is reached",
            );
            return self.refuse_subscription(request, error);
        }
        let channel = Arc::clone(&request.channel);
        let Some(cluster) = self.cluster.as_mut() else { return };
        let follower = cluster.followers.entry(Arc::clone(&channel)).or_default();
        if !follower.synced || follower.catching_up != 0 {
            follower.waiting.push(request);
            if follower.catching_up == 0 {
                self.start_catch_up(&channel, None);
            }
            return;
        }
        self.subscribe_followed(request);
    }

    /// Reads the channel's position (and, with `after`, what followed it)
    /// from Redis; the answer is `FromCluster::CaughtUp`.
    fn start_catch_up(&mut self, channel: &Arc<str>, after: Option<(Arc<str>, u64)>) {
        let limit = self.config.namespace_for(channel).history_size.max(1) as u32;
        let owner = self.id as u16;
        let Some(cluster) = self.cluster.as_mut() else { return };
        let token = cluster.token();
        let Some(follower) = cluster.followers.get_mut(channel) else { return };
        follower.catching_up = token;
        self.send_to_gateway(ToCluster::CatchUp { channel: Arc::clone(channel), owner, token, after, limit });
    }

    /// The node is up to date with the channel: answer now, or read
    /// history in Redis for a resume the ring cannot serve.
    fn subscribe_followed(&mut self, request: SubscribeRequest) {
        let Some(state) = self.owned.get(&request.channel) else {
            let error = CommandError::new(request.request_id.clone(), ErrorCode::Internal, "channel state lost");
            return self.refuse_subscription(request, error);
        };
        let recovery = match &request.since {
            None => None,
            Some(since) => match state.recover(&since.epoch, since.offset) {
                // The client saw offsets this node has not delivered yet, or
                // missed more than the ring holds: ask Redis.
                Err(RecoveryFailure::OffsetAhead | RecoveryFailure::HistoryTooShort) => {
                    let after = Some((Arc::from(since.epoch.as_str()), since.offset));
                    let channel = Arc::clone(&request.channel);
                    let limit = self.config.namespace_for(&channel).history_size.max(1) as u32;
                    let owner = self.id as u16;
                    let Some(cluster) = self.cluster.as_mut() else { return };
                    let token = cluster.token();
                    if let Some(follower) = cluster.followers.get_mut(&channel) {
                        follower.resuming.insert(token, request);
                    }
                    return self.send_to_gateway(ToCluster::CatchUp { channel, owner, token, after, limit });
                }
                other => Some(other),
            },
        };
        self.accept_subscription(request, recovery);
    }

    fn accept_subscription(
        &mut self,
        request: SubscribeRequest,
        recovery: Option<Result<Vec<Arc<Publication>>, RecoveryFailure>>,
    ) {
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(&request.channel);
        let now_ms = self.now_ms;
        let shard = usize::from(request.conn.shard);
        let Some(state) = self.owned.get_mut(&request.channel) else {
            let error = CommandError::new(request.request_id.clone(), ErrorCode::Internal, "channel state lost");
            return self.refuse_subscription(request, error);
        };
        if state.subscribers >= namespace.subscribers_max as u64 {
            let error = CommandError::new(
                request.request_id.clone(),
                ErrorCode::ChannelFull,
                "channel has its maximum of subscribers on this node",
            );
            return self.refuse_subscription(request, error);
        }
        state.add_subscriber(shard, now_ms);
        if namespace.presence {
            state.presence.join(request.user.as_ref());
        }
        let ok = SubscribeOk { epoch: Arc::clone(&state.epoch), offset: state.last_offset, recovery };
        let SubscribeRequest { channel, conn, user, request_id, presence_counts, .. } = request;
        if namespace.presence {
            let change = CountChange::Delta(1);
            let message = ToCluster::Presence {
                channel: Arc::clone(&channel),
                user: user.clone(),
                change,
                join_leave: namespace.join_leave,
            };
            self.send_to_gateway(message);
        }
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.dirty_counts.insert(Arc::clone(&channel));
        }
        let reply = SubscribeReply { conn, channel, user, request_id, presence_counts, result: Ok(ok) };
        self.bus.send(shard, Message::SubscribeReply(Box::new(reply)));
    }

    fn refuse_subscription(&mut self, request: SubscribeRequest, error: CommandError) {
        let shard = usize::from(request.conn.shard);
        let SubscribeRequest { channel, conn, user, presence_counts, request_id: _, .. } = request;
        let reply =
            SubscribeReply { conn, channel, user, request_id: error.id.clone(), presence_counts, result: Err(error) };
        self.bus.send(shard, Message::SubscribeReply(Box::new(reply)));
    }

    pub(crate) fn cluster_unsubscribe(&mut self, channel: &str, shard: usize, user: Option<Arc<str>>) {
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        let now_ms = self.now_ms;
        let Some(state) = self.owned.get_mut(channel) else { return };
        state.remove_subscriber(shard, now_ms);
        let name = Arc::clone(&state.name);
        if namespace.presence {
            state.presence.leave(user.as_ref());
            let change = CountChange::Delta(-1);
            let message =
                ToCluster::Presence { channel: Arc::clone(&name), user, change, join_leave: namespace.join_leave };
            self.send_to_gateway(message);
        }
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.dirty_counts.insert(name);
        }
    }

    // ---- publications ----------------------------------------------------

    /// Admission here (the shard's own load), then Redis assigns the offset;
    /// the gateway answers the publisher.
    pub(crate) fn cluster_publish(&mut self, request: PublishRequest) {
        let sheddable = !matches!(request.reply, ReplyTo::Nobody);
        let backlog_max = self.config.limits.fanout_backlog_max;
        let refusal = if self.is_draining() {
            Some(PublishRefusal::ShuttingDown)
        } else if sheddable && self.bus.overloaded() {
            Some(PublishRefusal::Overloaded)
        } else if sheddable
            && self.owned.get(&request.channel).is_some_and(|state| {
                state.subscriber_shards().any(|s| self.shared.fanout_backlog[s].load(Ordering::Relaxed) > backlog_max)
            })
        {
            self.metrics.publications_refused += 1;
            self.metrics.limit_refusals.add(crate::limits::LimitKind::FanoutBacklogMax);
            Some(PublishRefusal::FanoutBacklog)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if let Some(destination) = request.reply.shard() {
                self.bus.send(destination, Message::PublishReply(Box::new((request.reply, Err(refusal)))));
            }
            return;
        }
        let namespace = self.config.namespace_for(&request.channel);
        let (history_size, history_ttl_ms) = (namespace.history_size as u32, namespace.history_ttl_ms);
        self.send_to_gateway(ToCluster::Publish { request, history_size, history_ttl_ms });
    }

    fn remote_publication(&mut self, publication: Arc<Publication>) {
        let buffer_max = self.config.cluster.catch_up_buffer_max;
        let Some(follower) = self.follower(&publication.channel) else { return };
        if !follower.synced || follower.catching_up != 0 {
            // Past the bound it is dropped here and read back from history
            // by the catch-up under way (or announced as lost).
            if follower.held.len() < buffer_max {
                follower.held.push(publication);
            }
            return;
        }
        let Some(state) = self.owned.get(&publication.channel) else { return };
        let mut position = Position { epoch: Arc::clone(&state.epoch), offset: state.last_offset };
        match follow::arrive(&mut position, &publication) {
            Arrival::Duplicate => {}
            Arrival::Steps(steps) => self.apply_steps(&publication.channel, steps),
            Arrival::Gap => {
                let channel = Arc::clone(&publication.channel);
                if let Some(follower) = self.follower(&channel) {
                    follower.held.push(publication);
                }
                self.start_catch_up(&channel, Some((position.epoch, position.offset)));
            }
        }
    }

    /// Delivers in order what `hub::follow` decided, and tells subscribers
    /// about losses.
    fn apply_steps(&mut self, channel: &Arc<str>, steps: Vec<Step>) {
        let config = Arc::clone(&self.config);
        let namespace = config.namespace_for(channel);
        let now_ms = self.now_ms;
        for step in steps {
            let Some(state) = self.owned.get_mut(channel) else { return };
            let publication = match step {
                Step::Deliver(publication) => {
                    state.accept_remote(&publication, namespace, now_ms);
                    self.metrics.publications += 1;
                    publication
                }
                Step::Lost { reason, epoch, offset } => {
                    tracing::debug!(shard = self.id, %channel, reason = reason.reason(), offset, "publications lost");
                    state.history.clear();
                    state.epoch = Arc::clone(&epoch);
                    state.last_offset = offset;
                    Arc::new(Publication::loss_notice(Arc::clone(channel), &epoch, offset, reason.reason()))
                }
            };
            let targets = state.subscriber_targets();
            self.send_deliveries(&publication, &targets);
        }
    }

    fn caught_up(&mut self, channel: &Arc<str>, token: u64, result: Result<ChannelPosition, ClusterFailure>) {
        let Some(follower) = self.follower(channel) else { return };
        if let Some(request) = follower.resuming.remove(&token) {
            return self.resumed(request, result);
        }
        if token != follower.catching_up {
            return;
        }
        follower.catching_up = 0;
        let held = std::mem::take(&mut follower.held);
        let waiting = std::mem::take(&mut follower.waiting);
        let was_synced = follower.synced;
        match result {
            Ok(read) => {
                follower.synced = true;
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.retry.remove(channel);
                }
                let Some(state) = self.owned.get_mut(channel) else { return };
                let known = was_synced.then(|| Position { epoch: Arc::clone(&state.epoch), offset: state.last_offset });
                let caught_up = CaughtUp { epoch: read.epoch, top: read.top, publications: read.publications };
                let (position, steps) = follow::merge(known.as_ref(), caught_up, held);
                if was_synced {
                    self.apply_steps(channel, steps);
                }
                if let Some(state) = self.owned.get_mut(channel) {
                    if !was_synced || *state.epoch != *position.epoch {
                        state.history.clear();
                    }
                    state.epoch = position.epoch;
                    state.last_offset = position.offset;
                }
                for request in waiting {
                    self.subscribe_followed(request);
                }
            }
            Err(failure) => {
                for request in waiting {
                    let error = failure_error(request.request_id.clone(), failure);
                    self.refuse_subscription(request, error);
                }
                // Retried while subscribers remain; what was held is read
                // back from history then.
                if was_synced {
                    if let Some(cluster) = self.cluster.as_mut() {
                        cluster.retry.insert(Arc::clone(channel));
                    }
                }
            }
        }
    }

    /// A history read for a resuming subscriber came back.
    fn resumed(&mut self, request: SubscribeRequest, result: Result<ChannelPosition, ClusterFailure>) {
        let read = match result {
            Ok(read) => read,
            Err(failure) => {
                let error = failure_error(request.request_id.clone(), failure);
                return self.refuse_subscription(request, error);
            }
        };
        // A catch-up started meanwhile: this node may be behind the read;
        // answer once it is done.
        if let Some(follower) = self.follower(&request.channel) {
            if follower.catching_up != 0 {
                follower.waiting.push(request);
                return;
            }
        }
        let (Some(state), Some(since)) = (self.owned.get(&request.channel), request.since.as_ref()) else { return };
        let here = Position { epoch: Arc::clone(&state.epoch), offset: state.last_offset };
        let local = state.history.after(read.top, usize::MAX);
        let caught_up = CaughtUp { epoch: read.epoch, top: read.top, publications: read.publications };
        let recovery = follow::resume(&here, &since.epoch, since.offset, &caught_up, &local);
        self.accept_subscription(request, Some(recovery));
    }

    // ---- users -----------------------------------------------------------

    pub(crate) fn cluster_user_connect(&mut self, request: UserConnectRequest) {
        // `limits.connections_per_user_max` holds per node: this shard
        // counts the user's connections on this node (Redis, the cluster's).
        let max = self.config.limits.connections_per_user_max;
        if max > 0 && self.users.connections(&request.user).0 as usize >= max {
            let shard = usize::from(request.conn.shard);
            let UserConnectRequest { user, conn, request_id, via_command, .. } = request;
            let reply =
                UserConnectReply { conn, user, request_id, via_command, result: Err(Refused::TooManyConnections) };
            self.bus.send(shard, Message::UserConnectReply(Box::new(reply)));
            return;
        }
        let owner = self.id as u16;
        self.send_to_gateway(ToCluster::UserConnect { request, owner });
    }

    fn cluster_user_connected(
        &mut self,
        request: UserConnectRequest,
        result: Result<Vec<Arc<Publication>>, UserRefusal>,
        reregister: bool,
    ) {
        let shard = usize::from(request.conn.shard);
        let mut result = match result {
            Ok(inbox) => Ok(inbox),
            Err(UserRefusal::Revoked) => Err(Refused::Revoked),
            // Redis is unreachable: serve the connection (its token checked
            // out here) without an inbox replay; the count reaches Redis now
            // if it can, else at the re-registration after the outage.
            Err(UserRefusal::Failed(_)) => {
                self.send_to_gateway(ToCluster::UserCount {
                    user: Arc::clone(&request.user),
                    change: CountChange::Delta(1),
                });
                Ok(Vec::new())
            }
        };
        if result.is_ok() {
            // Local routing (revocation lives in Redis), and the per-node
            // cap: checked before asking Redis, but connections that were
            // in flight together may pass that check together.
            if self.users.connect(&request.user, shard, u64::MAX, unix_time_ms()).is_err() {
                if !reregister {
                    // Redis counted this one (or was just told to): take it back.
                    let user = Arc::clone(&request.user);
                    self.send_to_gateway(ToCluster::UserCount { user, change: CountChange::Delta(-1) });
                }
                result = Err(Refused::TooManyConnections);
            } else if reregister {
                // Counted under the incarnation before a reset, after this
                // shard had registered its users afresh: count it again.
                let user = Arc::clone(&request.user);
                self.send_to_gateway(ToCluster::UserCount { user, change: CountChange::Delta(1) });
            }
        }
        let UserConnectRequest { user, conn, request_id, via_command, .. } = request;
        let reply = UserConnectReply { conn, user, request_id, via_command, result };
        self.bus.send(shard, Message::UserConnectReply(Box::new(reply)));
    }

    pub(crate) fn cluster_user_disconnect(&mut self, user: &str, shard: usize) {
        self.users.disconnect(user, shard, unix_time_ms());
        self.send_to_gateway(ToCluster::UserCount { user: user.into(), change: CountChange::Delta(-1) });
    }

    pub(crate) fn cluster_user_ack(&mut self, user: Arc<str>, seq: u64) {
        self.send_to_gateway(ToCluster::UserAck { user, seq });
    }

    // ---- queries ---------------------------------------------------------

    /// Queries about cluster-wide state go to Redis; the answer goes
    /// straight back to whoever asked. Stats stay local.
    pub(crate) fn cluster_query(&mut self, request: QueryRequest) {
        match &request.query {
            Query::Stats | Query::Metrics => {
                let answer = self.answer_query(request.query, &request.reply);
                self.send_answer(request.reply, answer);
            }
            Query::Presence { channel, .. } | Query::PresenceStats { channel } => {
                if let Some(refusal) = self.presence_refusal(channel) {
                    return self.send_answer(request.reply, refusal);
                }
                self.send_to_gateway(ToCluster::Query(request));
            }
            _ => self.send_to_gateway(ToCluster::Query(request)),
        }
    }

    // ---- upkeep ----------------------------------------------------------

    /// Redis may have lost what this node registered: register presence,
    /// users and subscriber counts again, catch up every channel, and say
    /// when done (the gateway then removes the node's previous incarnation).
    fn cluster_reset(&mut self, incarnation: u64) {
        let config = Arc::clone(&self.config);
        let channels: Vec<Arc<str>> =
            self.cluster.as_ref().map(|c| c.followers.keys().cloned().collect()).unwrap_or_default();
        for channel in channels {
            let Some(follower) = self.follower(&channel) else { continue };
            if follower.catching_up == 0 && (follower.synced || !follower.waiting.is_empty()) {
                let after = follower
                    .synced
                    .then(|| self.owned.get(&channel).map(|s| (Arc::clone(&s.epoch), s.last_offset)))
                    .flatten();
                self.start_catch_up(&channel, after);
            }
            let namespace = config.namespace_for(&channel);
            let Some(state) = self.owned.get(&channel) else { continue };
            let mut messages = Vec::new();
            if namespace.presence {
                let (members, _) = state.presence.page(None, usize::MAX);
                let anonymous = state.presence.stats().anonymous_connections;
                for (user, count) in members {
                    messages.push((Some(user), count));
                }
                if anonymous > 0 {
                    messages.push((None, u32::try_from(anonymous).unwrap_or(u32::MAX)));
                }
            }
            for (user, count) in messages {
                let change = CountChange::Set(count);
                self.send_to_gateway(ToCluster::Presence {
                    channel: Arc::clone(&channel),
                    user,
                    change,
                    join_leave: false,
                });
            }
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.dirty_counts.insert(channel);
            }
        }
        let users: Vec<(Arc<str>, u32)> = self.users.connected().map(|(user, n)| (Arc::clone(user), n)).collect();
        for (user, count) in users {
            self.send_to_gateway(ToCluster::UserCount { user, change: CountChange::Set(count) });
        }
        self.flush_subscriber_counts();
        self.send_to_gateway(ToCluster::ResyncDone { shard: self.id as u16, incarnation });
    }

    /// Called every tick in cluster mode: subscriber counts to Redis, and
    /// catch-ups that failed retried, every `subscriber_counts_interval_ms`.
    pub(crate) fn cluster_tick(&mut self) {
        let interval_ms = self.config.cluster.subscriber_counts_interval_ms;
        let meta_refresh_ms = (self.config.cluster.channel_meta_ttl_ms / 4).clamp(1_000, META_REFRESH_MAX_MS);
        let now_ms = self.now_ms;
        let Some(cluster) = self.cluster.as_mut() else { return };
        if now_ms < cluster.next_counts_ms {
            return;
        }
        cluster.next_counts_ms = now_ms + interval_ms;
        // Every followed channel's meta lives on in Redis while followed,
        // however quiet: counts are reported again well within its TTL.
        if now_ms >= cluster.next_meta_refresh_ms {
            cluster.next_meta_refresh_ms = now_ms + meta_refresh_ms;
            let followed: Vec<Arc<str>> = cluster.followers.keys().cloned().collect();
            cluster.dirty_counts.extend(followed);
        }
        // While a Redis is down, failed catch-ups wait: the reset after it
        // comes back catches every channel up anyway.
        if self.shared.cluster_degraded.load(Ordering::Acquire) {
            self.flush_subscriber_counts();
            return;
        }
        let Some(cluster) = self.cluster.as_mut() else { return };
        let retry: Vec<Arc<str>> = cluster.retry.drain().collect();
        for channel in retry {
            let after = self.owned.get(&channel).map(|s| (Arc::clone(&s.epoch), s.last_offset));
            if self.follower(&channel).is_some_and(|f| f.catching_up == 0) {
                self.start_catch_up(&channel, after);
            }
        }
        self.flush_subscriber_counts();
    }

    fn flush_subscriber_counts(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else { return };
        if cluster.dirty_counts.is_empty() {
            return;
        }
        let counts: Vec<(Arc<str>, u32)> = cluster
            .dirty_counts
            .drain()
            .map(|channel| {
                let count = self.owned.get(&channel).map_or(0, |s| u32::try_from(s.subscribers).unwrap_or(u32::MAX));
                (channel, count)
            })
            .collect();
        self.send_to_gateway(ToCluster::SubscriberCounts(counts));
    }

    /// Drops followed channels with no subscribers and no presence left
    /// (their history lives in Redis); the node stops receiving them.
    pub(crate) fn cluster_sweep_channels(&mut self) {
        let Some(cluster) = self.cluster.as_ref() else { return };
        let idle: Vec<Arc<str>> = cluster
            .followers
            .iter()
            .filter(|(channel, follower)| {
                !follower.is_busy()
                    && self.owned.get(channel).is_none_or(|s| s.subscribers == 0 && s.presence.is_empty())
            })
            .map(|(channel, _)| Arc::clone(channel))
            .collect();
        for channel in idle {
            self.owned.remove(&channel);
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.followers.remove(&channel);
                cluster.retry.remove(&channel);
                cluster.dirty_counts.insert(Arc::clone(&channel));
            }
            self.send_to_gateway(ToCluster::Release { channel });
        }
        // Channels created for a refused subscription and never followed.
        let config = Arc::clone(&self.config);
        let now_ms = self.now_ms;
        let followers = self.cluster.as_ref().map(|c| &c.followers);
        let orphans: Vec<Arc<str>> = self
            .owned
            .iter()
            .filter(|s| followers.is_none_or(|f| !f.contains_key(&s.name)) && s.subscribers == 0)
            .map(|s| Arc::clone(&s.name))
            .collect();
        for channel in orphans {
            self.owned.remove(&channel);
        }
        for state in self.owned.iter_mut() {
            let namespace = config.namespace_for(&state.name);
            state.history.expire(now_ms, namespace.history_ttl_ms);
        }
    }
}
