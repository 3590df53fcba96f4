//! The cluster gateway: the node's one door to Redis, on its own thread and
//! bus endpoint (like the admin gateway), so shards never wait on Redis.
//!
//! It turns shard requests into scripts on the right Redis instance (a
//! jump hash of the channel or user name), keeps each instance's
//! connection, subscriptions and heartbeat, forwards pub/sub pushes to the
//! owning shards, and reaps nodes that died. Replies and pushes of one
//! connection are handled strictly in the order they arrive (see link.rs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use redis::{PushKind, Value};
use serde_json::{json, Map};

use super::keys::{instance_of, node_of_member, Keys};
use super::link::{self, EventSink, Link, LinkEvent, Target};
use super::payload::Push;
use super::scripts::{Script, SCRIPTS};
use crate::bus::cluster::{ChannelPosition, ClusterFailure, CountChange, FromCluster, ToCluster, UserRefusal};
use crate::bus::message::{PublishOk, PublishRefusal, PublishRequest, QueryAnswer, QueryRequest, ReplyTo, ShardStats};
use crate::bus::query::{Answer, Failure, FailureKind, Query, QUERY_ITEMS_MAX};
use crate::bus::Shared;
use crate::bus::{Endpoint, Message, Wakeup};
use crate::config::{user_status_channel, Config};
use crate::hub::owner_of;
use crate::hub::publication::{Publication, PushFields};
use crate::util::unix_time_ms;

/// Link events handled per loop turn before the bus gets its turn.
const EVENTS_PER_TURN: usize = 4096;
/// Bus messages handled per loop turn.
const BUS_MESSAGES_PER_TURN: usize = 4096;
/// A node reaps this many channels and users of a dead node per script run,
/// so no single run holds Redis long.
const REAP_BATCH: u32 = 256;
/// How long the reap lock on a dead node lasts (a reaper that dies midway
/// leaves the rest to another node after this).
const REAP_LOCK_MS: u64 = 60_000;
/// Dead nodes one heartbeat reply lists.
const DEAD_LISTED_MAX: u32 = 16;
/// First reconnect delay; doubles up to `cluster.reconnect_backoff_max_ms`.
const RECONNECT_FIRST_MS: u64 = 100;
/// Most subscriber counts written per HSET.
const COUNTS_PER_COMMAND: usize = 512;
/// After shutdown begins, the gateway waits this long for its goodbye
/// (removal from the node list) to be written.
const GOODBYE_WAIT: Duration = Duration::from_millis(500);
/// Resets asked for by refused registrations are at least this far apart.
const RESET_INTERVAL: Duration = Duration::from_secs(10);
/// Link events (Redis replies and pushes) queued for the gateway: past it
/// the reader threads wait, and TCP holds Redis back. The queue writes
/// every slot when it is made: 65,536 slots of 88 B were 5.6 MiB of every
/// node's resident memory. The gateway takes up to `EVENTS_PER_TURN` per
/// turn and turns again at once while any were taken.
const LINK_EVENTS_MAX: usize = 4_096;

/// What to do with a reply, in the order the commands were sent.
enum Then {
    Ignore,
    Publish {
        reply: ReplyTo,
    },
    CatchUp {
        channel: Arc<str>,
        owner: u16,
        token: u64,
    },
    /// `incarnation`: when it was sent; if a reset came before the reply,
    /// the count went to the old incarnation and must be registered again.
    UserConnect {
        request: crate::bus::message::UserConnectRequest,
        owner: u16,
        incarnation: u64,
    },
    /// A change of the node's connection count of a user; `events` is
    /// false for re-registration (no online/offline then).
    UserCount {
        user: Arc<str>,
        events: bool,
    },
    /// A change of registered state (presence, subscriber counts) whose
    /// loss would leave counts wrong: a refusal makes the node register
    /// everything again.
    Registration,
    /// For `member`: replies for an earlier incarnation are ignored.
    Heartbeat {
        member: String,
    },
    /// A (S)SUBSCRIBE or (S)UNSUBSCRIBE: confirmed by a push, or refused
    /// with an error reply (ACL channel permissions).
    SubscribeAck,
    ReapLock {
        member: String,
        lock: String,
    },
    Reap {
        member: String,
        lock: String,
    },
    Answer {
        reply: ReplyTo,
        kind: AnswerKind,
    },
    /// One part of a query spread over users or instances.
    Part {
        gather: u64,
        index: u32,
        kind: PartKind,
    },
}

enum AnswerKind {
    Presence { channel: Arc<str>, limit: usize },
    PresenceStats { channel: Arc<str> },
    ChannelInfo { channel: Arc<str> },
    History { channel: Arc<str>, limit: usize },
    Disconnect { user: Arc<str> },
}

#[derive(Clone, Copy)]
enum PartKind {
    SendUser,
    UserStatus,
    Channels,
    NodeStats,
}

struct Waiting {
    sent_at: Instant,
    then: Then,
}

/// What a gathered query answers with.
#[derive(Clone, Copy)]
enum GatherKind {
    /// Per-user rows, in request order (SEND_USER, USER_STATUS).
    Rows,
    /// A page of channels of this size (merged over instances).
    Channels { limit: usize },
    /// Other nodes' STATS.
    Nodes,
}

/// One query waiting for several replies.
struct Gather {
    reply: ReplyTo,
    kind: GatherKind,
    remaining: usize,
    rows: Vec<(u32, serde_json::Value)>,
    channels: Vec<(Arc<str>, u64)>,
    nodes: Vec<serde_json::Value>,
    failure: Option<Failure>,
}

/// One Redis instance and our connection to it.
struct Instance {
    target: Target,
    /// Tells this connection's events from an earlier one's.
    generation: u64,
    link: Option<Link>,
    connecting: bool,
    pending: VecDeque<Waiting>,
    /// Channel topics this connection is subscribed to.
    topics: HashSet<Arc<str>>,
    /// The node topic this connection is subscribed to.
    node_topic: Option<String>,
    /// Topics of earlier incarnations, unsubscribed once a reset is done.
    retired_topics: Vec<String>,
    /// The current member has been registered here (first heartbeat done).
    registered: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
    /// Dead members being reaped here.
    reaping: HashSet<String>,
}

impl Instance {
    fn is_up(&self) -> bool {
        self.link.is_some()
    }
}

pub struct ClusterGateway {
    config: Arc<Config>,
    shared: Arc<Shared>,
    bus: Endpoint,
    /// This gateway's bus index.
    id: usize,
    shard_count: usize,
    keys: Keys,
    node_id: String,
    incarnation: u64,
    /// Epoch candidates (a channel gets one when Redis has none for it):
    /// a per-process random seed mixed with a counter, so there is no
    /// system call per publication.
    epoch_seed: u64,
    epochs_made: u64,
    /// `node_id.incarnation`: the name under which this node's state lives in Redis.
    member: String,
    instances: Vec<Instance>,
    events: Receiver<LinkEvent>,
    sink: EventSink,
    /// Previous incarnations to reap once every shard has re-registered.
    retired: Vec<String>,
    /// Shards that have not yet answered the current reset.
    resync_waiting: usize,
    gathers: HashMap<u64, Gather>,
    next_gather: u64,
    /// This node's STATS document, as last gathered from the shards.
    stats_json: String,
    /// Shard stats being gathered (token, answers).
    stats_gathering: Option<(u64, Vec<ShardStats>)>,
    next_stats: Instant,
    next_heartbeat: Instant,
    /// Set once the first connection attempt to every instance has ended.
    pub first_attempts_done: bool,
    /// A refused registration asked for a reset; done at `next_reset_allowed`.
    reset_wanted: bool,
    next_reset_allowed: Instant,
    /// Shutting down: no more heartbeats (a heartbeat after the goodbye
    /// would register the node again).
    stopping: bool,
    /// This node is behind with its fan-out (a shard's backlog past
    /// `limits.fanout_backlog_max`, until it falls under half): said in
    /// Redis, so publications to its channels are refused on every node,
    /// as a single node refuses them.
    busy: bool,
}

fn failure_answer(failure: ClusterFailure) -> Answer {
    match failure {
        ClusterFailure::Unavailable => Failure::answer(FailureKind::Unavailable, "the cluster's Redis is unreachable"),
        ClusterFailure::InFlight => Failure::answer(
            FailureKind::Unavailable,
            "Redis went away before answering: the request may or may not have been carried out",
        ),
        ClusterFailure::Refused => Failure::answer(FailureKind::Unavailable, "Redis refused the request (see the log)"),
        ClusterFailure::Overloaded => Failure::answer(FailureKind::Overloaded, "too many requests wait for Redis"),
    }
}

// ---- reading replies ----------------------------------------------------

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        Value::Double(x) => Some(*x as i64),
        _ => None,
    }
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<&str> {
    bytes(value).and_then(|b| std::str::from_utf8(b).ok())
}

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// A stream entry's id (`N-0`) and its fields by name.
fn stream_entry(entry: &Value) -> Option<(u64, HashMap<&str, &[u8]>)> {
    let parts = items(entry);
    let id = text(parts.first()?)?;
    let number = id.strip_suffix("-0")?.parse().ok()?;
    let mut fields = HashMap::new();
    match parts.get(1)? {
        Value::Map(pairs) => {
            for (key, value) in pairs {
                fields.insert(text(key)?, bytes(value)?);
            }
        }
        other => {
            for pair in items(other).chunks(2) {
                if let [key, value] = pair {
                    fields.insert(text(key)?, bytes(value)?);
                }
            }
        }
    }
    Some((number, fields))
}

fn field_text<'a>(fields: &HashMap<&str, &'a [u8]>, name: &str) -> &'a str {
    fields.get(name).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("")
}

fn field_number(fields: &HashMap<&str, &[u8]>, name: &str) -> u64 {
    field_text(fields, name).parse().unwrap_or(0)
}

/// History entries as publications, as a single node's history ring would
/// hold them: the last `history_size` offsets up to `top` (Redis trims
/// approximately), none older than the history TTL (Redis keeps entries by
/// count only).
fn history_publications(
    channel: &Arc<str>,
    epoch: &Arc<str>,
    entries: &[Value],
    namespace: &crate::config::Namespace,
    top: u64,
    now_ms: u64,
) -> Vec<Arc<Publication>> {
    let oldest_kept = top.saturating_sub(namespace.history_size as u64);
    entries
        .iter()
        .filter_map(stream_entry)
        .filter(|(offset, fields)| {
            *offset > oldest_kept && now_ms.saturating_sub(field_number(fields, "t")) < namespace.history_ttl_ms
        })
        .map(|(offset, fields)| {
            let user = field_text(&fields, "u");
            let push = PushFields {
                channel,
                event: field_text(&fields, "e"),
                data: fields.get("d").copied().unwrap_or(b"null"),
                user: (!user.is_empty()).then_some(user),
            };
            Arc::new(Publication::encode(Arc::clone(channel), Arc::clone(epoch), offset, push))
        })
        .collect()
}

fn evalsha(script: &Script, keys: &[&str]) -> redis::Cmd {
    let mut command = redis::cmd("EVALSHA");
    command.arg(&script.sha).arg(keys.len());
    for key in keys {
        command.arg(*key);
    }
    command
}

impl ClusterGateway {
    pub fn new(
        config: Arc<Config>,
        shared: Arc<Shared>,
        bus: Endpoint,
        shard_count: usize,
    ) -> Result<ClusterGateway, String> {
        let id = bus.shard();
        let targets: Vec<Target> =
            config.cluster.redis.iter().map(|url| Target::parse(url)).collect::<Result<_, _>>()?;
        let (sender, events) = crossbeam_channel::bounded(LINK_EVENTS_MAX);
        let wakeup = Arc::new(Wakeup::new().map_err(|e| format!("cannot create an eventfd: {e}"))?);
        let node_id = config.node_id().to_owned();
        let now = Instant::now();
        let instances = targets
            .into_iter()
            .map(|target| Instance {
                target,
                generation: 0,
                link: None,
                connecting: false,
                pending: VecDeque::new(),
                topics: HashSet::new(),
                node_topic: None,
                retired_topics: Vec::new(),
                registered: false,
                retry_at: Some(now),
                backoff: Duration::from_millis(RECONNECT_FIRST_MS),
                last_error: None,
                reaping: HashSet::new(),
            })
            .collect();
        let incarnation = crate::util::random_u64() >> 40;
        Ok(ClusterGateway {
            keys: Keys::new(&config.cluster.key_prefix),
            member: format!("{node_id}.{incarnation:x}"),
            node_id,
            incarnation,
            epoch_seed: crate::util::random_u64(),
            epochs_made: 0,
            config,
            shared,
            bus,
            id,
            shard_count,
            instances,
            events,
            sink: EventSink { sender, wakeup },
            retired: Vec::new(),
            resync_waiting: 0,
            gathers: HashMap::new(),
            next_gather: 1,
            stats_json: String::new(),
            stats_gathering: None,
            next_stats: now,
            next_heartbeat: now,
            first_attempts_done: false,
            reset_wanted: false,
            next_reset_allowed: now,
            stopping: false,
            busy: false,
        })
    }

    /// A fresh epoch, used only if the channel has none in Redis yet.
    fn epoch_candidate(&mut self) -> String {
        self.epochs_made += 1;
        format!("{:016x}", crate::util::splitmix64(self.epoch_seed ^ self.epochs_made))
    }

    /// The run id of the Redis serving `instance` ("" while down: scripts
    /// are not sent then).
    fn run_id(&self, instance: usize) -> &str {
        self.instances[instance].link.as_ref().map_or("", |link| link.run_id.as_str())
    }

    fn publish_command(&self, instance: usize) -> &'static str {
        if self.instances[instance].link.as_ref().is_some_and(|l| l.sharded_pubsub) {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    fn subscribe_command(&self, instance: usize, subscribe: bool) -> &'static str {
        let sharded = self.instances[instance].link.as_ref().is_some_and(|l| l.sharded_pubsub);
        match (sharded, subscribe) {
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
        }
    }

    /// Queues a command whose reply is handled by `then`. Refused when the
    /// instance is down, or (for work that can be refused) too busy.
    fn submit(&mut self, instance: usize, command: &redis::Cmd, then: Then) -> Result<(), ClusterFailure> {
        let in_flight_max = self.config.cluster.requests_in_flight_max;
        let refusable = matches!(then, Then::Publish { .. } | Then::Answer { .. } | Then::Part { .. });
        let entry = &mut self.instances[instance];
        let Some(link) = entry.link.as_mut() else { return Err(ClusterFailure::Unavailable) };
        if refusable && entry.pending.len() >= in_flight_max {
            return Err(ClusterFailure::Overloaded);
        }
        link.queue(command);
        entry.pending.push_back(Waiting { sent_at: Instant::now(), then });
        Ok(())
    }

    /// Subscribes to (or unsubscribes from) a topic; RESP3 confirms with a push.
    fn submit_subscription(&mut self, instance: usize, topic: &str, subscribe: bool) {
        let mut command = redis::cmd(self.subscribe_command(instance, subscribe));
        command.arg(topic);
        let _ = self.submit(instance, &command, Then::SubscribeAck);
    }

    fn send(&mut self, destination: usize, message: Message) {
        self.bus.send(destination, message);
    }

    fn answer(&mut self, reply: ReplyTo, answer: Answer) {
        if let Some(destination) = reply.shard() {
            self.send(destination, Message::Answer(Box::new(QueryAnswer { reply, answer })));
        }
    }

    fn publish_reply(&mut self, reply: ReplyTo, result: Result<PublishOk, PublishRefusal>) {
        if let Some(destination) = reply.shard() {
            self.send(destination, Message::PublishReply(Box::new((reply, result))));
        }
    }

    fn send_to_shard(&mut self, shard: usize, message: FromCluster) {
        self.send(shard, Message::FromCluster(Box::new(message)));
    }

    // ---- requests from the shards ------------------------------------------

    fn handle_bus(&mut self, message: Message) {
        match message {
            Message::ToCluster(request) => self.request(*request),
            // From the admin gateway: CHANNELS and the other nodes' STATS.
            Message::Query(request) => self.query(*request),
            // Our own gathering of shard stats, for the copy in Redis.
            Message::Answer(answer) => {
                let QueryAnswer { reply, answer } = *answer;
                let ReplyTo::Admin { token, .. } = reply else { return };
                let Some((expected, answers)) = self.stats_gathering.as_mut() else { return };
                if *expected != token {
                    return;
                }
                if let Answer::Stats(stats) = answer {
                    answers.push(*stats);
                }
                if answers.len() == self.shard_count {
                    if let Some((_, answers)) = self.stats_gathering.take() {
                        self.stats_json = self.node_document(&answers).to_string();
                    }
                }
            }
            other => debug_assert!(false, "the cluster gateway got {other:?}"),
        }
    }

    fn request(&mut self, request: ToCluster) {
        match request {
            ToCluster::Publish { request, history_size, history_ttl_ms } => {
                self.publish(request, history_size, history_ttl_ms)
            }
            ToCluster::CatchUp { channel, owner, token, after, limit } => {
                self.catch_up(channel, owner, token, after, limit)
            }
            ToCluster::Release { channel } => {
                let instance = self.instance_of(&channel);
                if self.instances[instance].topics.remove(&channel) {
                    let topic = self.keys.channel_topic(&channel);
                    self.submit_subscription(instance, &topic, false);
                }
            }
            ToCluster::Presence { channel, user, change, join_leave } => {
                self.presence(&channel, user.as_deref(), change, join_leave)
            }
            ToCluster::SubscriberCounts(counts) => self.subscriber_counts(counts),
            ToCluster::UserConnect { request, owner } => self.user_connect(request, owner),
            ToCluster::UserCount { user, change } => self.user_count(user, change),
            ToCluster::UserAck { user, seq } => {
                let instance = self.instance_of(&user);
                let mut command = evalsha(&SCRIPTS.user_ack, &[&self.keys.user_inbox(&user), &self.keys.inbox_users()]);
                command.arg(seq).arg(&*user);
                let _ = self.submit(instance, &command, Then::Ignore);
            }
            ToCluster::Query(request) => self.query(request),
            ToCluster::ResyncDone { incarnation, .. } => {
                if incarnation == self.incarnation && self.resync_waiting > 0 {
                    self.resync_waiting -= 1;
                    if self.resync_waiting == 0 {
                        for instance in 0..self.instances.len() {
                            for topic in std::mem::take(&mut self.instances[instance].retired_topics) {
                                self.submit_subscription(instance, &topic, false);
                            }
                        }
                        let retired = std::mem::take(&mut self.retired);
                        for member in retired {
                            for instance in 0..self.instances.len() {
                                self.start_reap(instance, member.clone());
                            }
                        }
                    }
                }
            }
        }
    }

    fn instance_of(&self, name: &str) -> usize {
        instance_of(name, self.instances.len())
    }

    fn publish(&mut self, request: PublishRequest, history_size: u32, history_ttl_ms: u64) {
        let PublishRequest { channel, event, data, user, reply, only_if_exists } = request;
        let instance = self.instance_of(&channel);
        let now_ms = unix_time_ms();
        let sheddable = !matches!(reply, ReplyTo::Nobody);
        let epoch = self.epoch_candidate();
        let keys = [&*self.keys.meta(&channel), &*self.keys.history(&channel), &*self.keys.busy()];
        let mut command = evalsha(&SCRIPTS.publish, &keys);
        command
            .arg(self.keys.channel_topic(&channel))
            .arg(self.publish_command(instance))
            .arg(&*event)
            .arg(&*data)
            .arg(user.as_deref().unwrap_or(""))
            .arg(history_size)
            .arg(history_ttl_ms.max(1))
            .arg(self.config.cluster.channel_meta_ttl_ms)
            .arg(if only_if_exists { "1" } else { "0" })
            .arg(now_ms)
            .arg(epoch)
            .arg(if sheddable { "1" } else { "0" })
            .arg(self.run_id(instance));
        let reply_copy = reply.clone();
        if let Err(failure) = self.submit(instance, &command, Then::Publish { reply }) {
            let refusal = match failure {
                ClusterFailure::Unavailable | ClusterFailure::Refused => PublishRefusal::Unavailable,
                ClusterFailure::InFlight => PublishRefusal::OutcomeUnknown,
                ClusterFailure::Overloaded => PublishRefusal::Overloaded,
            };
            self.publish_reply(reply_copy, Err(refusal));
        }
    }

    /// A status event (`online`/`offline`) on `user_status_<user>`, if that channel exists.
    fn status_event(&mut self, user: &str, event: &str, last_seen_s: Option<u64>) {
        if !self.config.users.status_events {
            return;
        }
        let mut data = json!({ "user": user });
        if let Some(last_seen_s) = last_seen_s {
            data["last_seen"] = last_seen_s.into();
        }
        let channel: Arc<str> = user_status_channel(user).into();
        let namespace = self.config.namespace_for(&channel);
        let (history_size, history_ttl_ms) = (namespace.history_size as u32, namespace.history_ttl_ms);
        let request = PublishRequest {
            channel,
            event: event.into(),
            data: data.to_string().into_bytes().into_boxed_slice(),
            user: None,
            reply: ReplyTo::Nobody,
            only_if_exists: true,
        };
        self.publish(request, history_size, history_ttl_ms);
    }

    fn catch_up(&mut self, channel: Arc<str>, owner: u16, token: u64, after: Option<(Arc<str>, u64)>, limit: u32) {
        let instance = self.instance_of(&channel);
        if self.instances[instance].is_up() && !self.instances[instance].topics.contains(&channel) {
            let topic = self.keys.channel_topic(&channel);
            self.submit_subscription(instance, &topic, true);
            self.instances[instance].topics.insert(Arc::clone(&channel));
        }
        let (after_offset, known_epoch) = match &after {
            Some((epoch, offset)) => (i64::try_from(*offset).unwrap_or(i64::MAX), epoch.to_string()),
            None => (-1, String::new()),
        };
        let epoch = self.epoch_candidate();
        let keys = [&*self.keys.meta(&channel), &*self.keys.history(&channel)];
        let mut command = evalsha(&SCRIPTS.catch_up, &keys);
        command
            .arg(epoch)
            .arg(self.config.cluster.channel_meta_ttl_ms)
            .arg(after_offset)
            .arg(known_epoch)
            .arg(limit.clamp(1, QUERY_ITEMS_MAX as u32 * 100))
            .arg(self.run_id(instance));
        let then = Then::CatchUp { channel: Arc::clone(&channel), owner, token };
        if let Err(failure) = self.submit(instance, &command, then) {
            self.send_to_shard(usize::from(owner), FromCluster::CaughtUp { channel, token, result: Err(failure) });
        }
    }

    fn presence(&mut self, channel: &str, user: Option<&str>, change: CountChange, join_leave: bool) {
        let instance = self.instance_of(channel);
        let node_presence = format!("{}{}", self.keys.presence_node_prefix(channel), self.member);
        let keys = [
            &*self.keys.presence_users(channel),
            &*self.keys.presence_list(channel),
            &*self.keys.presence_anonymous(channel),
            &*self.keys.presence_connections(channel),
            &*node_presence,
            &*self.keys.node_presence_channels(&self.member),
        ];
        let mut command = evalsha(&SCRIPTS.presence, &keys);
        let (mode, value) = match change {
            CountChange::Delta(delta) => ("d", i64::from(delta)),
            CountChange::Set(value) => ("s", i64::from(value)),
        };
        command
            .arg(user.unwrap_or(""))
            .arg(mode)
            .arg(value)
            .arg(channel)
            .arg(if join_leave { "1" } else { "0" })
            .arg(self.publish_command(instance))
            .arg(self.keys.channel_topic(channel));
        // Down: dropped; a reset registers presence again.
        let _ = self.submit(instance, &command, Then::Registration);
    }

    /// This node's subscriber counts go to its own hash and to each
    /// channel's meta hash, per instance, in bounded batches.
    fn subscriber_counts(&mut self, counts: Vec<(Arc<str>, u32)>) {
        let mut by_instance: Vec<Vec<(Arc<str>, u32)>> = vec![Vec::new(); self.instances.len()];
        for (channel, count) in counts {
            by_instance[self.instance_of(&channel)].push((channel, count));
        }
        let key = self.keys.node_subscribers(&self.member);
        let meta_prefix = format!("{}:m:", self.config.cluster.key_prefix);
        for (instance, changes) in by_instance.into_iter().enumerate() {
            for chunk in changes.chunks(COUNTS_PER_COMMAND) {
                let mut command = evalsha(&SCRIPTS.subscriber_counts, &[&key]);
                command.arg(&self.member).arg(&meta_prefix).arg(self.config.cluster.channel_meta_ttl_ms);
                for (channel, count) in chunk {
                    command.arg(&**channel).arg(*count);
                }
                let _ = self.submit(instance, &command, Then::Registration);
            }
        }
    }

    fn user_connect(&mut self, request: crate::bus::message::UserConnectRequest, owner: u16) {
        let instance = self.instance_of(&request.user);
        let user = Arc::clone(&request.user);
        let keys = [
            &*self.keys.user(&user),
            &*self.keys.user_nodes(&user),
            &*self.keys.user_inbox(&user),
            &*self.keys.node_users(&self.member),
            &*self.keys.inbox_users(),
        ];
        let mut command = evalsha(&SCRIPTS.user_connect, &keys);
        command
            .arg(&self.member)
            .arg(request.issued_at_s)
            .arg(unix_time_ms())
            .arg(self.config.inbox.ttl_ms)
            .arg(&*user);
        if !self.instances[instance].is_up() {
            let result = Err(UserRefusal::Failed(ClusterFailure::Unavailable));
            let message = FromCluster::UserConnected { request, result, reregister: false };
            return self.send_to_shard(usize::from(owner), message);
        }
        let incarnation = self.incarnation;
        let _ = self.submit(instance, &command, Then::UserConnect { request, owner, incarnation });
    }

    fn user_count(&mut self, user: Arc<str>, change: CountChange) {
        let instance = self.instance_of(&user);
        let keys = [&*self.keys.user(&user), &*self.keys.user_nodes(&user), &*self.keys.node_users(&self.member)];
        let mut command = evalsha(&SCRIPTS.user_count, &keys);
        let (mode, value, events) = match change {
            CountChange::Delta(delta) => ("d", i64::from(delta), true),
            CountChange::Set(value) => ("s", i64::from(value), false),
        };
        command
            .arg(&self.member)
            .arg(mode)
            .arg(value)
            .arg(unix_time_ms())
            .arg(self.config.users.last_seen_ttl_ms)
            .arg(&*user);
        let _ = self.submit(instance, &command, Then::UserCount { user, events });
    }

    fn query(&mut self, request: QueryRequest) {
        let QueryRequest { reply, query } = request;
        let (instance, command, kind) = match query {
            Query::Presence { channel, cursor, limit } => {
                let keys = [
                    &*self.keys.presence_users(&channel),
                    &*self.keys.presence_list(&channel),
                    &*self.keys.presence_anonymous(&channel),
                ];
                let mut command = evalsha(&SCRIPTS.presence_page, &keys);
                command.arg(cursor.as_deref().unwrap_or("")).arg(limit);
                (self.instance_of(&channel), command, AnswerKind::Presence { channel, limit })
            }
            Query::PresenceStats { channel } => {
                let keys = [
                    &*self.keys.presence_users(&channel),
                    &*self.keys.presence_anonymous(&channel),
                    &*self.keys.presence_connections(&channel),
                ];
                let command = evalsha(&SCRIPTS.presence_stats, &keys);
                (self.instance_of(&channel), command, AnswerKind::PresenceStats { channel })
            }
            Query::ChannelInfo { channel } => {
                let keys =
                    [&*self.keys.meta(&channel), &*self.keys.history(&channel), &*self.keys.presence_users(&channel)];
                let mut command = evalsha(&SCRIPTS.channel_info, &keys);
                let instance = self.instance_of(&channel);
                command.arg(self.config.namespace_for(&channel).history_size).arg(self.run_id(instance));
                (self.instance_of(&channel), command, AnswerKind::ChannelInfo { channel })
            }
            Query::History { channel, since_epoch, since_offset, limit } => {
                let instance = self.instance_of(&channel);
                let keys = [&*self.keys.meta(&channel), &*self.keys.history(&channel)];
                let mut command = evalsha(&SCRIPTS.history, &keys);
                command
                    .arg(i64::try_from(since_offset).unwrap_or(i64::MAX))
                    .arg(limit)
                    .arg(since_epoch.as_deref().unwrap_or(""))
                    .arg(self.config.namespace_for(&channel).history_size)
                    .arg(self.run_id(instance));
                (self.instance_of(&channel), command, AnswerKind::History { channel, limit })
            }
            Query::Disconnect { user, code, reason, revoke_before_s } => {
                let keys = [&*self.keys.user(&user), &*self.keys.user_nodes(&user), &*self.keys.nodes()];
                let mut command = evalsha(&SCRIPTS.disconnect, &keys);
                command
                    .arg(&*user)
                    .arg(revoke_before_s)
                    .arg(code)
                    .arg(&*reason)
                    .arg(self.keys.node_topic_prefix())
                    .arg(self.publish_command(self.instance_of(&user)))
                    .arg(self.config.users.last_seen_ttl_ms);
                (self.instance_of(&user), command, AnswerKind::Disconnect { user })
            }
            Query::SendUser { items, event, data } => return self.send_users(reply, items, &event, &data),
            Query::UserStatus { items } => return self.user_statuses(reply, items),
            Query::Channels { prefix, cursor, limit } => {
                return self.channels(reply, &prefix, cursor.as_deref(), limit)
            }
            Query::NodeStats => return self.node_stats(reply),
            Query::Stats | Query::Metrics => {
                return self.answer(reply, Failure::answer(FailureKind::BadArgument, "stats are per shard"));
            }
        };
        let reply_copy = reply.clone();
        if let Err(failure) = self.submit(instance, &command, Then::Answer { reply, kind }) {
            self.answer(reply_copy, failure_answer(failure));
        }
    }

    fn start_gather(&mut self, reply: ReplyTo, parts: usize, kind: GatherKind) -> u64 {
        let id = self.next_gather;
        self.next_gather += 1;
        let gather = Gather {
            reply,
            kind,
            remaining: parts,
            rows: Vec::new(),
            channels: Vec::new(),
            nodes: Vec::new(),
            failure: None,
        };
        self.gathers.insert(id, gather);
        id
    }

    /// Starts a row per user (request order), filled in by the replies.
    fn start_rows(&mut self, reply: ReplyTo, items: &[(u32, Arc<str>)]) -> u64 {
        let gather = self.start_gather(reply, items.len(), GatherKind::Rows);
        if let Some(entry) = self.gathers.get_mut(&gather) {
            entry.rows = items.iter().map(|(index, user)| (*index, json!({ "user": &**user }))).collect();
        }
        gather
    }

    fn send_users(&mut self, reply: ReplyTo, items: Vec<(u32, Arc<str>)>, event: &str, data: &[u8]) {
        let gather = self.start_rows(reply, &items);
        let now_ms = unix_time_ms();
        let config = Arc::clone(&self.config);
        let inbox = &config.inbox;
        for (index, user) in items {
            let instance = self.instance_of(&user);
            let keys = [
                &*self.keys.user(&user),
                &*self.keys.user_nodes(&user),
                &*self.keys.user_inbox(&user),
                &*self.keys.inbox_users(),
                &*self.keys.nodes(),
            ];
            let mut command = evalsha(&SCRIPTS.user_send, &keys);
            command
                .arg(&*user)
                .arg(event)
                .arg(data)
                .arg(now_ms)
                .arg(inbox.messages_max)
                .arg(inbox.ttl_ms)
                .arg(inbox.users_max.div_ceil(self.instances.len()))
                .arg(crate::hub::user::first_inbox_seq(now_ms))
                .arg(self.keys.node_topic_prefix())
                .arg(self.publish_command(instance))
                .arg(self.config.users.last_seen_ttl_ms);
            let then = Then::Part { gather, index, kind: PartKind::SendUser };
            if let Err(failure) = self.submit(instance, &command, then) {
                self.part_failed(gather, index, failure);
            }
        }
    }

    fn user_statuses(&mut self, reply: ReplyTo, items: Vec<(u32, Arc<str>)>) {
        let gather = self.start_rows(reply, &items);
        for (index, user) in items {
            let instance = self.instance_of(&user);
            let mut command = redis::cmd("HMGET");
            command.arg(self.keys.user(&user)).arg("c").arg("seen");
            let then = Then::Part { gather, index, kind: PartKind::UserStatus };
            if let Err(failure) = self.submit(instance, &command, then) {
                self.part_failed(gather, index, failure);
            }
        }
    }

    fn channels(&mut self, reply: ReplyTo, prefix: &str, cursor: Option<&str>, limit: usize) {
        let gather = self.start_gather(reply, self.instances.len(), GatherKind::Channels { limit });
        for instance in 0..self.instances.len() {
            let mut command = evalsha(&SCRIPTS.channels, &[&self.keys.nodes()]);
            command.arg(self.keys.node_subscribers_prefix()).arg(prefix).arg(cursor.unwrap_or("")).arg(limit);
            let then = Then::Part { gather, index: instance as u32, kind: PartKind::Channels };
            if let Err(failure) = self.submit(instance, &command, then) {
                self.part_failed(gather, instance as u32, failure);
            }
        }
    }

    fn node_stats(&mut self, reply: ReplyTo) {
        let gather = self.start_gather(reply, 1, GatherKind::Nodes);
        let mut command = evalsha(&SCRIPTS.node_stats, &[&self.keys.nodes()]);
        command.arg(format!("{}:st:", self.config.cluster.key_prefix));
        if let Err(failure) = self.submit(0, &command, Then::Part { gather, index: 0, kind: PartKind::NodeStats }) {
            self.part_failed(gather, 0, failure);
        }
    }

    /// One part of a gathered query failed. Per-user rows say so in the row
    /// (the other users' messages went out); other queries fail whole.
    fn part_failed(&mut self, gather: u64, index: u32, failure: ClusterFailure) {
        let Answer::Failed(failure) = failure_answer(failure) else { return };
        self.part_done(gather, |g| match g.kind {
            GatherKind::Rows => {
                if let Some((_, row)) = g.rows.iter_mut().find(|(i, _)| *i == index) {
                    row["error"] = json!({"code": failure.client_code().as_str(), "message": failure.message});
                }
            }
            GatherKind::Channels { .. } | GatherKind::Nodes => {
                g.failure.get_or_insert(failure);
            }
        });
    }

    fn part_done(&mut self, gather: u64, update: impl FnOnce(&mut Gather)) {
        let Some(entry) = self.gathers.get_mut(&gather) else { return };
        update(entry);
        entry.remaining = entry.remaining.saturating_sub(1);
        if entry.remaining > 0 {
            return;
        }
        let Some(done) = self.gathers.remove(&gather) else { return };
        let answer = match (done.failure, done.kind) {
            // STATS still answers with this node's figures.
            (Some(failure), GatherKind::Nodes) => Answer::Object(Map::from_iter([
                ("nodes".to_owned(), serde_json::Value::Array(Vec::new())),
                ("error".to_owned(), failure.message.into()),
            ])),
            (Some(failure), _) => Answer::Failed(failure),
            (None, GatherKind::Rows) => Answer::Rows(done.rows),
            (None, GatherKind::Channels { limit }) => {
                let mut channels = done.channels;
                channels.sort_by(|a, b| a.0.cmp(&b.0));
                channels.truncate(limit + 1);
                Answer::Channels(channels)
            }
            (None, GatherKind::Nodes) => {
                Answer::Object(Map::from_iter([("nodes".to_owned(), serde_json::Value::Array(done.nodes))]))
            }
        };
        self.answer(done.reply, answer);
    }

    // ---- replies and pushes ------------------------------------------------

    fn on_value(&mut self, instance: usize, value: Value) {
        let value = match value {
            Value::Push { kind, data } => {
                let confirmation = matches!(
                    kind,
                    PushKind::Subscribe | PushKind::SSubscribe | PushKind::Unsubscribe | PushKind::SUnsubscribe
                );
                if !confirmation {
                    return self.on_push(instance, kind, data);
                }
                // The answer to a (S)SUBSCRIBE or (S)UNSUBSCRIBE, in its turn.
                Value::Push { kind, data }
            }
            other => other,
        };
        let Some(waiting) = self.instances[instance].pending.pop_front() else {
            tracing::error!(redis = %self.instances[instance].target.display(), ?value, "a reply nobody asked for; reconnecting");
            return self.drop_link(instance, "unexpected reply".into());
        };
        // A subscription is answered by a push, or refused by an error.
        let subscription_answer = matches!(value, Value::Push { .. } | Value::ServerError(_));
        let confirmation = matches!(value, Value::Push { .. });
        let expected = if matches!(waiting.then, Then::SubscribeAck) { subscription_answer } else { !confirmation };
        if !expected {
            // Replies and requests no longer line up: nothing after this can be trusted.
            tracing::error!(redis = %self.instances[instance].target.display(), ?value, "reply out of step with requests; reconnecting");
            self.fail(waiting.then, ClusterFailure::InFlight);
            return self.drop_link(instance, "reply out of step".into());
        }
        if let Value::ServerError(error) = &value {
            if error.code() == "NOSCRIPT" {
                // Scripts were flushed: a new connection loads them again.
                self.fail(waiting.then, ClusterFailure::Unavailable);
                return self.drop_link(instance, "scripts were flushed (NOSCRIPT)".into());
            }
            if matches!(waiting.then, Then::SubscribeAck) {
                return self.complete(instance, waiting.then, &value);
            }
            tracing::warn!(redis = %self.instances[instance].target.display(), error = ?error, "Redis refused a cluster command");
            return self.fail(waiting.then, ClusterFailure::Refused);
        }
        if matches!(waiting.then, Then::SubscribeAck) {
            return;
        }
        self.complete(instance, waiting.then, &value);
    }

    fn on_push(&mut self, _instance: usize, kind: PushKind, data: Vec<Value>) {
        if !matches!(kind, PushKind::Message | PushKind::SMessage) {
            return;
        }
        let (Some(topic), Some(payload)) = (data.first().and_then(text), data.get(1).and_then(bytes)) else { return };
        let push = match Push::parse(payload) {
            Ok(push) => push,
            Err(error) => {
                tracing::warn!(topic, reason = error.0, "unreadable cluster message");
                return;
            }
        };
        match push {
            Push::Publication { epoch, offset, event, user, data } => {
                let Some(channel) = self.keys.channel_of_topic(topic) else { return };
                let name: Arc<str> = channel.into();
                let fields = PushFields { channel, event, data, user };
                let publication = Arc::new(Publication::encode(Arc::clone(&name), epoch.into(), offset, fields));
                let owner = owner_of(&name, self.shard_count);
                self.send_to_shard(owner, FromCluster::Publication(publication));
            }
            Push::ChannelEvent { event, data } => {
                let Some(channel) = self.keys.channel_of_topic(topic) else { return };
                let name: Arc<str> = channel.into();
                let publication = Arc::new(Publication::channel_event(Arc::clone(&name), event, data));
                let owner = owner_of(&name, self.shard_count);
                self.send_to_shard(owner, FromCluster::ChannelEvent(publication));
            }
            Push::UserMessage { user, seq, event, data } => {
                let push = Arc::new(Publication::user_message(seq, event, data));
                let owner = owner_of(user, self.shard_count);
                self.send_to_shard(owner, FromCluster::UserMessage { user: user.into(), push });
            }
            Push::CloseUser { user, code, reason } => {
                let owner = owner_of(user, self.shard_count);
                self.send_to_shard(owner, FromCluster::CloseUser { user: user.into(), code, reason: reason.into() });
            }
        }
    }

    /// A request that will get no reply from Redis: answer it with `failure`.
    fn fail(&mut self, then: Then, failure: ClusterFailure) {
        match then {
            Then::Publish { reply } => {
                let refusal = match failure {
                    ClusterFailure::Unavailable | ClusterFailure::Refused => PublishRefusal::Unavailable,
                    ClusterFailure::Overloaded => PublishRefusal::Overloaded,
                    ClusterFailure::InFlight => PublishRefusal::OutcomeUnknown,
                };
                self.publish_reply(reply, Err(refusal));
            }
            Then::CatchUp { channel, owner, token } => {
                self.send_to_shard(usize::from(owner), FromCluster::CaughtUp { channel, token, result: Err(failure) });
            }
            Then::UserConnect { request, owner, .. } => {
                let result = Err(UserRefusal::Failed(failure));
                let message = FromCluster::UserConnected { request, result, reregister: false };
                self.send_to_shard(usize::from(owner), message);
            }
            Then::Answer { reply, .. } => self.answer(reply, failure_answer(failure)),
            Then::Part { gather, index, .. } => self.part_failed(gather, index, failure),
            Then::Ignore | Then::UserCount { .. } | Then::Heartbeat { .. } | Then::SubscribeAck => {}
            // Refused while Redis is reachable (an error reply): register
            // everything again rather than leave counts wrong.
            Then::Registration if failure == ClusterFailure::Refused => self.reset_soon(),
            Then::Registration => {}
            Then::ReapLock { member, .. } | Then::Reap { member, .. } => {
                for instance in &mut self.instances {
                    instance.reaping.remove(&member);
                }
            }
        }
    }

    fn complete(&mut self, instance: usize, then: Then, value: &Value) {
        let now_ms = unix_time_ms();
        match then {
            Then::Ignore => {}
            Then::Publish { reply } => {
                let parts = items(value);
                let result = match parts.first().and_then(int) {
                    Some(0) => Err(PublishRefusal::NoChannel),
                    Some(2) => Err(PublishRefusal::Overloaded),
                    Some(1) => {
                        let epoch: Arc<str> = parts.get(1).and_then(text).unwrap_or("").into();
                        let offset = parts.get(2).and_then(int).unwrap_or(0) as u64;
                        let subscribers = parts.get(3).and_then(int).unwrap_or(0) as u64;
                        Ok(PublishOk { offset, subscribers, epoch })
                    }
                    _ => Err(PublishRefusal::Unavailable),
                };
                self.publish_reply(reply, result);
            }
            Then::CatchUp { channel, owner, token } => {
                let parts = items(value);
                let epoch: Arc<str> = parts.first().and_then(text).unwrap_or("").into();
                let top = parts.get(1).and_then(int).unwrap_or(0) as u64;
                let namespace = self.config.namespace_for(&channel);
                let entries = parts.get(2).map(items).unwrap_or(&[]);
                let publications = history_publications(&channel, &epoch, entries, namespace, top, now_ms);
                let result = Ok(ChannelPosition { epoch, top, publications });
                self.send_to_shard(usize::from(owner), FromCluster::CaughtUp { channel, token, result });
            }
            Then::UserConnect { request, owner, incarnation } => {
                let parts = items(value);
                let result = match parts.first().and_then(int) {
                    Some(1) => {
                        if parts.get(1).and_then(int) == Some(1) {
                            self.status_event(&request.user, "online", None);
                        }
                        let entries = parts.get(2).map(items).unwrap_or(&[]);
                        let inbox = entries
                            .iter()
                            .filter_map(stream_entry)
                            .map(|(seq, fields)| {
                                let data = fields.get("d").copied().unwrap_or(b"null");
                                Arc::new(Publication::user_message(Some(seq), field_text(&fields, "e"), data))
                            })
                            .collect();
                        Ok(inbox)
                    }
                    _ => Err(UserRefusal::Revoked),
                };
                // A reset came in between: the count went to the previous
                // incarnation, and the shard registers it again.
                let reregister = incarnation != self.incarnation;
                self.send_to_shard(usize::from(owner), FromCluster::UserConnected { request, result, reregister });
            }
            Then::UserCount { user, events } => {
                let parts = items(value);
                match parts.first().and_then(int) {
                    Some(-1) if events => {
                        let last_seen_ms = parts.get(1).and_then(int).unwrap_or(now_ms as i64) as u64;
                        self.status_event(&user, "offline", Some(last_seen_ms / 1000));
                    }
                    Some(1) if events => self.status_event(&user, "online", None),
                    _ => {}
                }
            }
            Then::SubscribeAck => {
                // A refused subscription: the cluster cannot work without them.
                tracing::error!(
                    redis = %self.instances[instance].target.display(),
                    reply = ?value,
                    "Redis refused SUBSCRIBE (ACL channel permissions? the user needs &* or &PREFIX:*)"
                );
                self.drop_link(instance, "SUBSCRIBE refused".into());
            }
            Then::Registration => {}
            // Replies for an earlier incarnation say nothing about this one.
            Then::Heartbeat { member } if member != self.member => {}
            Then::Heartbeat { .. } => {
                self.instances[instance].backoff = Duration::from_millis(RECONNECT_FIRST_MS);
                let parts = items(value);
                let added = parts.first().and_then(int) == Some(1);
                let was_registered = self.instances[instance].registered;
                self.instances[instance].registered = true;
                if added && was_registered {
                    tracing::warn!(
                        redis = %self.instances[instance].target.display(),
                        member = %self.member,
                        "this node was missing from Redis's node list (Redis lost data, or others took it for dead): registering again"
                    );
                    self.reset();
                    return;
                }
                let dead: Vec<String> =
                    parts.get(1).map(items).unwrap_or(&[]).iter().filter_map(text).map(str::to_owned).collect();
                for member in dead {
                    if member != self.member {
                        self.start_reap(instance, member);
                    }
                }
            }
            Then::ReapLock { member, lock } => {
                if matches!(value, Value::Okay) || text(value) == Some("OK") {
                    self.reap_batch(instance, member, lock);
                } else {
                    self.instances[instance].reaping.remove(&member);
                }
            }
            Then::Reap { member, lock } => {
                let parts = items(value);
                if parts.first().and_then(int) != Some(1) {
                    self.instances[instance].reaping.remove(&member);
                    return;
                }
                let done = parts.get(1).and_then(int) == Some(1);
                let left: Vec<&str> = parts.get(2).map(items).unwrap_or(&[]).iter().filter_map(text).collect();
                let left: Vec<(String, String)> = left
                    .chunks(2)
                    .filter_map(|pair| Some((pair.first()?.to_string(), pair.get(1)?.to_string())))
                    .collect();
                let offline: Vec<String> =
                    parts.get(3).map(items).unwrap_or(&[]).iter().filter_map(text).map(str::to_owned).collect();
                if !left.is_empty() || !offline.is_empty() {
                    tracing::info!(member = %member, node = node_of_member(&member), left = left.len(), offline = offline.len(), "reaped a dead node");
                }
                for (channel, user) in left {
                    if self.config.namespace_for(&channel).join_leave {
                        let mut command = redis::cmd(self.publish_command(instance));
                        command
                            .arg(self.keys.channel_topic(&channel))
                            .arg(format!("e\nleave\n{{\"user\":\"{user}\"}}"));
                        let _ = self.submit(instance, &command, Then::Ignore);
                    }
                }
                for user in offline {
                    self.status_event(&user, "offline", Some(now_ms / 1000));
                }
                if done {
                    self.instances[instance].reaping.remove(&member);
                } else {
                    self.reap_batch(instance, member, lock);
                }
            }
            Then::Answer { reply, kind } => {
                let answer = self.answer_from(kind, value, now_ms);
                self.answer(reply, answer);
            }
            Then::Part { gather, index, kind } => self.part_from(gather, index, kind, value),
        }
    }

    fn answer_from(&self, kind: AnswerKind, value: &Value, now_ms: u64) -> Answer {
        let parts = items(value);
        let object = |value: serde_json::Value| match value {
            serde_json::Value::Object(map) => Answer::Object(map),
            _ => Answer::Object(Map::new()),
        };
        match kind {
            AnswerKind::Presence { channel, limit } => {
                let users: Vec<&str> = parts.first().map(items).unwrap_or(&[]).iter().filter_map(text).collect();
                let counts = parts.get(1).map(items).unwrap_or(&[]);
                let anonymous = parts.get(2).and_then(int).unwrap_or(0);
                let mut members: Vec<serde_json::Value> = users
                    .iter()
                    .zip(counts.iter().map(|c| int(c).unwrap_or(0)).chain(std::iter::repeat(0)))
                    .map(|(user, connections)| json!({"user": user, "connections": connections}))
                    .collect();
                let next = if members.len() > limit {
                    members.truncate(limit);
                    users.get(limit - 1).map(|u| u.to_string())
                } else {
                    None
                };
                object(json!({"channel": &*channel, "members": members, "anonymous": anonymous, "next": next}))
            }
            AnswerKind::PresenceStats { channel } => object(json!({
                "channel": &*channel,
                "users": parts.first().and_then(int).unwrap_or(0),
                "connections": parts.get(1).and_then(int).unwrap_or(0),
                "anonymous": parts.get(2).and_then(int).unwrap_or(0),
            })),
            AnswerKind::ChannelInfo { channel } => {
                let epoch = parts.first().and_then(text);
                let subscribers = parts.get(4).and_then(int).unwrap_or(0);
                if epoch.is_none() && subscribers == 0 {
                    return object(json!({"channel": &*channel, "exists": false, "subscribers": 0}));
                }
                object(json!({
                    "channel": &*channel,
                    "exists": true,
                    "subscribers": subscribers,
                    "epoch": epoch,
                    "offset": parts.get(1).and_then(int).unwrap_or(0),
                    "history": parts.get(2).and_then(int).unwrap_or(0),
                    "presence_users": parts.get(3).and_then(int).unwrap_or(0),
                }))
            }
            AnswerKind::History { channel, limit } => {
                let Some(epoch) = parts.first().and_then(text) else {
                    return object(
                        json!({"channel": &*channel, "epoch": null, "offset": 0, "publications": [], "next": null}),
                    );
                };
                let epoch: Arc<str> = epoch.into();
                let top = parts.get(1).and_then(int).unwrap_or(0) as u64;
                let changed = parts.get(3).and_then(int) == Some(1);
                let namespace = self.config.namespace_for(&channel);
                let entries = parts.get(2).map(items).unwrap_or(&[]);
                let found = history_publications(&channel, &epoch, entries, namespace, top, now_ms);
                let limits = &self.config.limits;
                let budget = limits.query_reply_bytes_max.min(limits.outbox_bytes_max / 2);
                let (mut used, mut publications, mut last) = (0, Vec::new(), None);
                for publication in found.iter().take(limit) {
                    used += publication.json().len();
                    if used > budget && !publications.is_empty() {
                        break;
                    }
                    publications
                        .push(serde_json::from_slice::<serde_json::Value>(publication.json()).unwrap_or_default());
                    last = Some(publication.offset);
                }
                let next = last.filter(|&offset| offset < top);
                let mut answer = json!({"channel": &*channel, "epoch": &*epoch, "offset": top, "publications": publications, "next": next});
                if changed {
                    answer["epoch_changed"] = true.into();
                }
                object(answer)
            }
            AnswerKind::Disconnect { user } => object(json!({"user": &*user, "disconnected": int(value).unwrap_or(0)})),
        }
    }

    fn part_from(&mut self, gather: u64, index: u32, kind: PartKind, value: &Value) {
        let parts = items(value);
        match kind {
            PartKind::SendUser => {
                let connections = parts.first().and_then(int).unwrap_or(0);
                let seq = parts.get(1).and_then(text).and_then(|s| s.parse::<u64>().ok());
                let full = parts.get(2).and_then(int) == Some(1);
                self.part_done(gather, |g| {
                    let Some((_, row)) = g.rows.iter_mut().find(|(i, _)| *i == index) else { return };
                    row["delivered"] = connections.into();
                    row["stored"] = seq.is_some().into();
                    row["inbox_full"] = (full && seq.is_none()).into();
                    if let Some(seq) = seq {
                        row["inbox"] = seq.into();
                    }
                });
            }
            PartKind::UserStatus => {
                let connections = parts.first().and_then(int).unwrap_or(0);
                let seen = parts.get(1).and_then(int);
                self.part_done(gather, |g| {
                    let Some((_, row)) = g.rows.iter_mut().find(|(i, _)| *i == index) else { return };
                    if connections > 0 {
                        row["status"] = "online".into();
                        row["connections"] = connections.into();
                    } else if let Some(seen) = seen {
                        row["status"] = "offline".into();
                        row["last_seen"] = (seen / 1000).into();
                    } else {
                        row["status"] = "unknown".into();
                    }
                });
            }
            PartKind::Channels => {
                let found: Vec<(Arc<str>, u64)> = parts
                    .chunks(2)
                    .filter_map(|pair| Some((text(pair.first()?)?.into(), int(pair.get(1)?)? as u64)))
                    .collect();
                self.part_done(gather, |g| {
                    for (name, count) in found {
                        match g.channels.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, total)) => *total += count,
                            None => g.channels.push((name, count)),
                        }
                    }
                });
            }
            PartKind::NodeStats => {
                let node_id = self.node_id.clone();
                let nodes: Vec<serde_json::Value> = parts
                    .chunks(2)
                    .filter_map(|pair| {
                        let other = text(pair.first()?)?;
                        // This node's own figures are the fresh ones; its
                        // earlier incarnations are not other nodes.
                        if node_of_member(other) == node_id {
                            return None;
                        }
                        let mut document: serde_json::Value = serde_json::from_slice(bytes(pair.get(1)?)?).ok()?;
                        document["member"] = other.into();
                        Some(document)
                    })
                    .collect();
                self.part_done(gather, |g| g.nodes = nodes);
            }
        }
    }
}

// ---- connections, heartbeats, reaping, resets -------------------------------

impl ClusterGateway {
    fn client_name(&self) -> String {
        format!("kometa-{}", self.node_id)
    }

    /// Starts connection attempts that are due.
    fn connect_due(&mut self, now: Instant) {
        for index in 0..self.instances.len() {
            let instance = &mut self.instances[index];
            if instance.link.is_some() || instance.connecting || instance.retry_at.is_none_or(|at| now < at) {
                continue;
            }
            instance.connecting = true;
            instance.retry_at = None;
            instance.generation += 1;
            let timeout = Duration::from_millis(self.config.cluster.connect_timeout_ms);
            let generation = instance.generation;
            let target = instance.target.clone();
            if let Err(error) = link::spawn(index, generation, target, timeout, self.client_name(), self.sink.clone()) {
                self.on_event(LinkEvent::ConnectFailed { instance: index, generation, error });
            }
        }
    }

    fn on_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Value { instance, generation, value } => {
                if self.instances[instance].generation == generation && self.instances[instance].is_up() {
                    self.on_value(instance, value);
                }
                return;
            }
            LinkEvent::Connected { instance, generation, link } => {
                if self.instances[instance].generation != generation {
                    return;
                }
                let entry = &mut self.instances[instance];
                entry.connecting = false;
                entry.link = Some(link);
                // The backoff starts over only once the connection proved
                // itself (its first heartbeat came back), so one that fails
                // at once (refused subscriptions) is not retried at full speed.
                entry.last_error = None;
                entry.registered = false;
                entry.topics.clear();
                entry.node_topic = None;
                entry.retired_topics.clear();
                self.note_first_attempt();
                // Redis may have lost what this node registered (or never had
                // it): every connection starts a new incarnation.
                self.reset();
            }
            LinkEvent::ConnectFailed { instance, generation, error } => {
                if self.instances[instance].generation != generation {
                    return;
                }
                self.instances[instance].connecting = false;
                self.note_first_attempt();
                self.link_down(instance, error);
            }
            LinkEvent::Closed { instance, generation, error } => {
                if self.instances[instance].generation != generation {
                    return;
                }
                self.link_down(instance, error);
            }
        }
        self.publish_health();
    }

    fn note_first_attempt(&mut self) {
        if !self.first_attempts_done
            && self
                .instances
                .iter()
                .all(|i| !i.connecting && (i.is_up() || i.last_error.is_some() || i.retry_at.is_some()))
        {
            self.first_attempts_done = true;
        }
    }

    /// Ends a connection on purpose; its reader reports `Closed`.
    fn drop_link(&mut self, instance: usize, reason: String) {
        if let Some(link) = &self.instances[instance].link {
            link.close();
        }
        self.link_down(instance, reason);
    }

    /// The connection is gone: everything waiting on it fails, a reconnect
    /// is scheduled with backoff.
    fn link_down(&mut self, instance: usize, error: String) {
        let entry = &mut self.instances[instance];
        let was_up = entry.link.take().is_some();
        entry.generation += 1;
        entry.connecting = false;
        entry.topics.clear();
        entry.node_topic = None;
        entry.retired_topics.clear();
        entry.registered = false;
        entry.reaping.clear();
        let backoff_max = Duration::from_millis(self.config.cluster.reconnect_backoff_max_ms);
        entry.retry_at = Some(Instant::now() + entry.backoff);
        entry.backoff = (entry.backoff * 2).min(backoff_max);
        if was_up || entry.last_error.as_deref() != Some(error.as_str()) {
            tracing::warn!(redis = %entry.target.display(), %error, "Redis unreachable; reconnecting with backoff");
        }
        entry.last_error = Some(error);
        let pending = std::mem::take(&mut entry.pending);
        for waiting in pending {
            self.fail(waiting.then, ClusterFailure::InFlight);
        }
    }

    /// A reset asked for by a refused registration, at most once per
    /// `RESET_INTERVAL` (a Redis out of memory would refuse the next ones too).
    fn reset_soon(&mut self) {
        self.reset_wanted = true;
    }

    /// A new incarnation: subscribe its node topic everywhere, tell every
    /// shard to register again, and retire the old one (reaped once every
    /// shard is done).
    fn reset(&mut self) {
        let old = std::mem::take(&mut self.member);
        self.incarnation += 1;
        self.member = format!("{}.{:x}", self.node_id, self.incarnation);
        self.retired.push(old);
        for instance in 0..self.instances.len() {
            if !self.instances[instance].is_up() {
                continue;
            }
            // The old topic stays subscribed until every shard has
            // registered under the new one: messages for users still listed
            // under the old incarnation keep arriving meanwhile.
            if let Some(old_topic) = self.instances[instance].node_topic.take() {
                self.instances[instance].retired_topics.push(old_topic);
            }
            let topic = self.keys.node_topic(&self.member);
            self.submit_subscription(instance, &topic, true);
            self.instances[instance].node_topic = Some(topic);
            self.instances[instance].registered = false;
            self.heartbeat(instance);
        }
        self.resync_waiting = self.shard_count;
        for shard in 0..self.shard_count {
            self.send_to_shard(shard, FromCluster::Reset { incarnation: self.incarnation });
        }
    }

    fn heartbeat(&mut self, instance: usize) {
        let stats = if instance == 0 { self.stats_json.clone() } else { String::new() };
        let keys =
            [&*self.keys.nodes(), &*self.keys.node_subscribers(&self.member), &*self.keys.node_stats(&self.member)];
        let mut command = evalsha(&SCRIPTS.heartbeat, &keys);
        command.arg(&self.member).arg(self.config.cluster.node_timeout_ms).arg(stats).arg(DEAD_LISTED_MAX);
        let member = self.member.clone();
        let _ = self.submit(instance, &command, Then::Heartbeat { member });
    }

    fn start_reap(&mut self, instance: usize, member: String) {
        if !self.instances[instance].is_up() || !self.instances[instance].reaping.insert(member.clone()) {
            return;
        }
        let lock = format!("{}.{:x}", self.member, crate::util::random_u64());
        let mut command = redis::cmd("SET");
        command.arg(self.keys.reap_lock(&member)).arg(&lock).arg("NX").arg("PX").arg(REAP_LOCK_MS);
        if self.submit(instance, &command, Then::ReapLock { member: member.clone(), lock }).is_err() {
            self.instances[instance].reaping.remove(&member);
        }
    }

    fn reap_batch(&mut self, instance: usize, member: String, lock: String) {
        let keys = [
            &*self.keys.nodes(),
            &*self.keys.node_presence_channels(&member),
            &*self.keys.node_users(&member),
            &*self.keys.node_subscribers(&member),
            &*self.keys.reap_lock(&member),
        ];
        let mut command = evalsha(&SCRIPTS.reap, &keys);
        command
            .arg(&member)
            .arg(REAP_BATCH)
            .arg(format!("{}:", self.config.cluster.key_prefix))
            .arg(unix_time_ms())
            .arg(self.config.users.last_seen_ttl_ms)
            .arg(&lock);
        if self.submit(instance, &command, Then::Reap { member: member.clone(), lock }).is_err() {
            self.instances[instance].reaping.remove(&member);
        }
    }

    /// Timers: heartbeats, stats for other nodes, connection attempts, and
    /// Redis that stopped answering.
    fn timers(&mut self, now: Instant) {
        self.connect_due(now);
        if self.reset_wanted && now >= self.next_reset_allowed {
            self.reset_wanted = false;
            self.next_reset_allowed = now + RESET_INTERVAL;
            tracing::warn!("Redis refused a registration: registering everything again");
            self.reset();
        }
        if now >= self.next_heartbeat && !self.stopping {
            self.next_heartbeat = now + Duration::from_millis(self.config.cluster.heartbeat_interval_ms);
            for instance in 0..self.instances.len() {
                if self.instances[instance].is_up() {
                    self.heartbeat(instance);
                }
            }
            if self.busy {
                self.write_busy();
            }
        }
        if now >= self.next_stats {
            // With each heartbeat, so other nodes read figures at most two
            // heartbeats old (each ask walks a shard's connections once).
            self.next_stats = now + Duration::from_millis(self.config.cluster.heartbeat_interval_ms);
            let token = crate::util::random_u64();
            self.stats_gathering = Some((token, Vec::new()));
            for shard in 0..self.shard_count {
                let request =
                    QueryRequest { reply: ReplyTo::Admin { shard: self.id as u16, token }, query: Query::Stats };
                self.send(shard, Message::Query(Box::new(request)));
            }
        }
        let timeout = Duration::from_millis(self.config.cluster.request_timeout_ms);
        for instance in 0..self.instances.len() {
            let stale =
                self.instances[instance].pending.front().is_some_and(|w| now.duration_since(w.sent_at) >= timeout);
            if stale {
                self.drop_link(
                    instance,
                    format!("no reply within cluster.request_timeout_ms ({} ms)", timeout.as_millis()),
                );
            }
        }
    }

    fn update_busy(&mut self) {
        let max = self.config.limits.fanout_backlog_max;
        let backlog = self.shared.fanout_backlog.iter().map(|b| b.load(Ordering::Relaxed)).max().unwrap_or(0);
        // Shards not taking what the gateway forwards count as behind too.
        let busy = self.bus.overloaded() || if self.busy { backlog > max / 2 } else { backlog > max };
        if busy != self.busy {
            self.busy = busy;
            tracing::debug!(busy, backlog, "fan-out load changed");
            self.write_busy();
        }
    }

    /// Says in every Redis whether this node is behind (refreshed with each
    /// heartbeat while it is; it lapses by itself if the node dies).
    fn write_busy(&mut self) {
        let timeout_ms = if self.busy { self.config.cluster.node_timeout_ms } else { 0 };
        for instance in 0..self.instances.len() {
            let mut command = evalsha(&SCRIPTS.busy, &[&self.keys.busy()]);
            command.arg(&self.member).arg(timeout_ms);
            let _ = self.submit(instance, &command, Then::Ignore);
        }
    }

    /// The node's own STATS document (as the admin STATS of a single node,
    /// plus its id), kept in Redis for the other nodes.
    fn node_document(&self, shards: &[ShardStats]) -> serde_json::Value {
        let mut document = crate::bus::query::stats_document(shards, &self.shared.admin_refusals.snapshot());
        document["node"] = self.node_id.clone().into();
        document
    }

    /// Publishes the cluster's state for /health and the refuse policy.
    fn publish_health(&self) {
        let down = self.instances.iter().any(|i| !i.is_up());
        self.shared.cluster_degraded.store(down, Ordering::Release);
        let redis: Vec<serde_json::Value> = self
            .instances
            .iter()
            .map(|i| {
                let mut entry = json!({"url": i.target.display(), "up": i.is_up()});
                if let (false, Some(error)) = (i.is_up(), &i.last_error) {
                    entry["error"] = error.clone().into();
                }
                entry
            })
            .collect();
        let state = if !down {
            "ok"
        } else if self.instances.iter().any(Instance::is_up) {
            "degraded"
        } else {
            "down"
        };
        let document = json!({
            "node": &self.node_id,
            "member": &self.member,
            "cluster_id": self.config.cluster_id(),
            "state": state,
            "redis": redis,
        });
        if let Ok(mut health) = self.shared.cluster_health.lock() {
            *health = document.to_string();
        }
    }

    /// Writes what each link can take; true while any has bytes left.
    fn flush_links(&mut self) -> bool {
        let mut broken = Vec::new();
        let mut left = false;
        for (index, instance) in self.instances.iter_mut().enumerate() {
            if let Some(link) = instance.link.as_mut() {
                if !link.flush() {
                    broken.push(index);
                } else if link.unwritten() > 0 {
                    left = true;
                }
            }
        }
        for index in broken {
            self.drop_link(index, "write to Redis failed".into());
        }
        left
    }

    /// One turn: link events, bus messages, timers, writes. Returns how much was done.
    fn turn(&mut self) -> usize {
        let mut done = 0;
        while done < EVENTS_PER_TURN {
            match self.events.try_recv() {
                Ok(event) => {
                    self.on_event(event);
                    done += 1;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut batch = Vec::new();
        self.bus.receive(BUS_MESSAGES_PER_TURN, |_, message| batch.push(message));
        done += batch.len();
        for message in batch {
            self.handle_bus(message);
        }
        self.timers(Instant::now());
        self.update_busy();
        self.flush_links();
        self.bus.flush();
        done
    }

    /// How long the loop may sleep: until the next timer, shorter while
    /// requests wait (their timeout is checked each turn).
    fn sleep_ms(&self, now: Instant) -> i32 {
        let mut until = self.next_heartbeat.min(self.next_stats);
        for instance in &self.instances {
            if let Some(at) = instance.retry_at {
                until = until.min(at);
            }
            if !instance.pending.is_empty() {
                until = until.min(now + Duration::from_millis(100));
            }
        }
        i32::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(i32::MAX).max(1)
    }

    /// Says goodbye: takes in what the shards said while closing their
    /// connections (presence, users), then leaves the node list and reaps
    /// its own registrations, so the others need not wait for the timeout.
    fn goodbye(&mut self) {
        self.stopping = true;
        let deadline = Instant::now() + GOODBYE_WAIT;
        while (self.bus.has_inbound() || !self.events.is_empty()) && Instant::now() < deadline {
            self.turn();
        }
        for instance in 0..self.instances.len() {
            let mut command = redis::cmd("ZREM");
            command.arg(self.keys.nodes()).arg(&self.member);
            let _ = self.submit(instance, &command, Then::Ignore);
            let member = self.member.clone();
            self.start_reap(instance, member);
        }
        let deadline = Instant::now() + GOODBYE_WAIT;
        while Instant::now() < deadline && self.instances.iter().any(|i| i.is_up() && !i.pending.is_empty()) {
            self.turn();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs the cluster gateway on the calling thread until the server stops.
pub fn run(mut gateway: ClusterGateway, started: std::sync::mpsc::Sender<()>) {
    let shared = Arc::clone(&gateway.shared);
    let bus_wakeup_fd = shared.wakeups[gateway.id].fd();
    let events_wakeup = Arc::clone(&gateway.sink.wakeup);
    let mut started = Some(started);
    gateway.publish_health();
    loop {
        let done = gateway.turn();
        if gateway.first_attempts_done {
            if let Some(started) = started.take() {
                let _ = started.send(());
            }
        }
        if shared.gateway_stop.load(Ordering::Acquire) {
            gateway.goodbye();
            break;
        }
        if done > 0 {
            continue;
        }
        let bus_wakeup = &shared.wakeups[gateway.id];
        bus_wakeup.prepare_park();
        events_wakeup.prepare_park();
        if gateway.bus.has_inbound() || !gateway.events.is_empty() || shared.gateway_stop.load(Ordering::Acquire) {
            bus_wakeup.cancel_park();
            events_wakeup.cancel_park();
            continue;
        }
        let mut fds = vec![
            libc::pollfd { fd: bus_wakeup_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: events_wakeup.fd(), events: libc::POLLIN, revents: 0 },
        ];
        for instance in &gateway.instances {
            if let Some(link) = instance.link.as_ref().filter(|l| l.unwritten() > 0) {
                fds.push(libc::pollfd { fd: link.fd(), events: libc::POLLOUT, revents: 0 });
            }
        }
        let timeout_ms = gateway.sleep_ms(Instant::now());
        // SAFETY: polls descriptors we own, through a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        bus_wakeup.drain();
        events_wakeup.drain();
    }
    for instance in &gateway.instances {
        if let Some(link) = &instance.link {
            link.close();
        }
    }
}
