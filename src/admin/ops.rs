//! The backend's operations, shared by the binary admin socket
//! (`server.rs`) and the HTTP API (`api.rs`): each front end decodes its
//! wire format into an `Operation` through the checks here, `start` sends it
//! to the owner shards over the bus, and `Pending::outcome` gives the
//! result, which each front end encodes its own way. Errors are the admin
//! protocol's (`AdminError`) on both.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use futures_channel::oneshot;
use serde_json::{json, Value};

use crate::admin::gateway::{AdminWait, Gateway};
use crate::bus::message::{PublishOk, PublishRefusal, PublishRequest, QueryRequest, ReplyTo};
use crate::bus::query::{first_failure, merge_channels, merge_rows, merge_stats, stats_document, Answer, Query};
use crate::bus::Message;
use crate::hub::owner_of;
use crate::limits::{LimitKind, LimitRefusals};
use kometa_protocol::admin::{AdminError, ErrorCode};
use kometa_protocol::{client, json, ws};

/// One request of the backend, checked.
#[derive(Debug)]
pub enum Operation {
    Ping,
    Publish {
        channel: Arc<str>,
        event: Arc<str>,
        data: Arc<[u8]>,
    },
    /// The same publication to several channels (one offset in each).
    PublishMany {
        channels: Vec<Arc<str>>,
        event: Arc<str>,
        data: Arc<[u8]>,
    },
    /// `node_only`: this node's figures, not the cluster's.
    Stats {
        node_only: bool,
    },
    SendUser {
        users: Vec<Arc<str>>,
        event: Arc<str>,
        data: Arc<[u8]>,
    },
    UserStatus {
        users: Vec<Arc<str>>,
    },
    Presence {
        channel: Arc<str>,
        cursor: Option<Box<str>>,
        limit: usize,
    },
    PresenceStats {
        channel: Arc<str>,
    },
    ChannelInfo {
        channel: Arc<str>,
    },
    Channels {
        prefix: Arc<str>,
        cursor: Option<Box<str>>,
        limit: usize,
    },
    History {
        channel: Arc<str>,
        since_offset: u64,
        limit: usize,
    },
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
        revoke_before_s: u64,
    },
    /// Re-read the configuration, as SIGHUP does.
    Reload,
}

/// What an operation produced.
#[derive(Debug)]
pub enum Outcome {
    /// PING.
    Empty,
    /// PUBLISH: the binary reply has its own layout.
    Published(PublishOk),
    /// Every other operation: the JSON document.
    Document(Value),
}

/// An owner's answer to a publication.
type PublishReceiver = oneshot::Receiver<Result<PublishOk, PublishRefusal>>;

/// A result that may still be waiting for shards.
pub enum Pending {
    Ready(Result<Outcome, AdminError>),
    Publish(PublishReceiver),
    /// Per channel: waiting for its owner, or refused at once.
    PublishMany(Vec<(Arc<str>, Result<PublishReceiver, AdminError>)>),
    Gather {
        receiver: oneshot::Receiver<Vec<Answer>>,
        finish: Finish,
    },
}

/// How the answers of a gather become the document.
pub enum Finish {
    /// `node`: this node's id in cluster mode.
    /// `node_only`: no other node's figures were asked for.
    /// `admin_refusals`: the gateway's own limit refusals when the request came.
    Stats {
        node: Option<String>,
        node_only: bool,
        admin_refusals: LimitRefusals,
    },
    /// `{"results":[…]}` in request order.
    Rows,
    /// The one owner's object.
    Single,
    Channels {
        limit: usize,
    },
}

impl Pending {
    pub async fn outcome(self) -> Result<Outcome, AdminError> {
        match self {
            Pending::Ready(result) => result,
            Pending::Publish(receiver) => match receiver.await {
                Ok(Ok(ok)) => Ok(Outcome::Published(ok)),
                Ok(Err(refusal)) => Err(refusal_error(refusal)),
                Err(_) => Err(shutting_down()),
            },
            Pending::PublishMany(parts) => {
                let mut results = Vec::with_capacity(parts.len());
                for (channel, part) in parts {
                    let result = match part {
                        Ok(receiver) => match receiver.await {
                            Ok(Ok(ok)) => Ok(ok),
                            Ok(Err(refusal)) => Err(refusal_error(refusal)),
                            Err(_) => Err(shutting_down()),
                        },
                        Err(error) => Err(error),
                    };
                    results.push(match result {
                        Ok(ok) => published_json(Some(&channel), &ok),
                        Err(error) => json!({"channel": &*channel, "error": error_json(&error)}),
                    });
                }
                Ok(Outcome::Document(json!({ "results": results })))
            }
            Pending::Gather { receiver, finish } => {
                let Ok(answers) = receiver.await else { return Err(shutting_down()) };
                if let Some(failure) = first_failure(&answers) {
                    return Err(failure.admin_error());
                }
                finish_gather(answers, finish).map(Outcome::Document)
            }
        }
    }
}

fn finish_gather(answers: Vec<Answer>, finish: Finish) -> Result<Value, AdminError> {
    Ok(match finish {
        Finish::Stats { node, node_only, admin_refusals } => {
            let others = answers.iter().find_map(|answer| match answer {
                Answer::Object(fields) => fields.get("nodes").and_then(|n| n.as_array()).cloned(),
                _ => None,
            });
            let local = stats_document(&merge_stats(answers), &admin_refusals);
            match node {
                Some(node) if node_only => {
                    let mut local = local;
                    local["node"] = node.into();
                    local
                }
                Some(node) => cluster_stats(local, &node, others.unwrap_or_default()),
                None => local,
            }
        }
        Finish::Rows => json!({ "results": merge_rows(answers) }),
        Finish::Single => match answers.into_iter().next() {
            Some(Answer::Object(fields)) => Value::Object(fields),
            _ => return Err(AdminError::new(ErrorCode::Internal, "no answer")),
        },
        Finish::Channels { limit } => {
            let (channels, next) = merge_channels(answers, limit);
            let channels: Vec<Value> = channels
                .iter()
                .map(|(name, subscribers)| json!({"channel": &**name, "subscribers": subscribers}))
                .collect();
            json!({"channels": channels, "next": next.as_deref()})
        }
    })
}

/// `{"offset":…,"subscribers":…,"epoch":…}`, with the channel when given.
pub fn published_json(channel: Option<&str>, ok: &PublishOk) -> Value {
    let mut document = json!({"offset": ok.offset, "subscribers": ok.subscribers, "epoch": &*ok.epoch});
    if let Some(channel) = channel {
        document["channel"] = channel.into();
    }
    document
}

/// `{"code":5,"name":"overloaded","message":"…"}`.
pub fn error_json(error: &AdminError) -> Value {
    json!({"code": error.code as u16, "name": error.code.as_str(), "message": &error.message})
}

pub fn shutting_down() -> AdminError {
    AdminError::new(ErrorCode::ShuttingDown, "server is shutting down")
}

pub fn refusal_error(refusal: PublishRefusal) -> AdminError {
    match refusal {
        PublishRefusal::Overloaded | PublishRefusal::FanoutBacklog => {
            AdminError::new(ErrorCode::Overloaded, "server busy (bus backlog); retry")
        }
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
fn cluster_stats(local: Value, node: &str, others: Vec<Value>) -> Value {
    let mut this = local;
    this["node"] = node.into();
    let mut document = json!({ "node": node, "shards": this["shards"].clone() });
    let nodes: Vec<Value> = std::iter::once(this).chain(others).collect();
    for key in NODE_TOTALS {
        document[key] = nodes.iter().filter_map(|n| n[key].as_u64()).sum::<u64>().into();
    }
    document["nodes"] = nodes.into();
    document
}

// ---- argument checks (both front ends) ------------------------------------

pub fn bad_argument(message: impl Into<String>) -> AdminError {
    AdminError::new(ErrorCode::BadArgument, message)
}

pub fn user(user: &str) -> Result<Arc<str>, AdminError> {
    if user.is_empty()
        || user.len() > kometa_protocol::token::USER_ID_BYTES_MAX
        || !user.bytes().all(client::name_byte_allowed)
    {
        return Err(bad_argument(format!(
            "user id `{user}` must be 1-128 bytes of letters, digits and _ - . : @ / = #"
        )));
    }
    Ok(user.into())
}

/// 1 to `limits.query_items_max` user ids.
pub fn users(gateway: &Rc<RefCell<Gateway>>, ids: &[&str]) -> Result<Vec<Arc<str>>, AdminError> {
    let max = gateway.borrow().config.limits.query_items_max;
    if ids.is_empty() || ids.len() > max {
        return Err(bad_argument(format!("user count must be 1..={max} (limits.query_items_max)")));
    }
    ids.iter().map(|id| user(id)).collect()
}

pub fn event(event: &str) -> Result<Arc<str>, AdminError> {
    client::check_event_name(event).map_err(bad_argument)?;
    Ok(event.into())
}

pub fn channel(gateway: &Rc<RefCell<Gateway>>, channel: &str) -> Result<Arc<str>, AdminError> {
    let limit = gateway.borrow().config.limits.channel_name_bytes_max;
    client::check_channel_name(channel, limit).map_err(bad_argument)?;
    Ok(channel.into())
}

/// 1 to `limits.query_items_max` channel names.
pub fn channels(gateway: &Rc<RefCell<Gateway>>, names: &[&str]) -> Result<Vec<Arc<str>>, AdminError> {
    let max = gateway.borrow().config.limits.query_items_max;
    if names.is_empty() || names.len() > max {
        return Err(bad_argument(format!("channel count must be 1..={max} (limits.query_items_max)")));
    }
    names.iter().map(|name| channel(gateway, name)).collect()
}

pub fn prefix(prefix: &str) -> Result<Arc<str>, AdminError> {
    if !prefix.bytes().all(client::name_byte_allowed) {
        return Err(bad_argument("prefix may contain only letters, digits and _ - . : @ / = #"));
    }
    Ok(prefix.into())
}

/// HANDLE: a prefix of client `rpc` method names ("" matches every method).
pub fn method_prefix(prefix: &str) -> Result<Box<str>, AdminError> {
    if prefix.len() > 128 || !prefix.bytes().all(client::name_byte_allowed) {
        return Err(bad_argument("a method prefix is at most 128 letters, digits and _ - . : @ / = #"));
    }
    Ok(prefix.into())
}

/// "" starts at the beginning.
pub fn cursor(cursor: &str) -> Option<Box<str>> {
    (!cursor.is_empty()).then(|| cursor.into())
}

/// 0 means the maximum; larger values are capped to it.
pub fn limit(gateway: &Rc<RefCell<Gateway>>, limit: u32) -> usize {
    let max = gateway.borrow().config.limits.query_items_max;
    let limit = limit as usize;
    if limit == 0 {
        max
    } else {
        limit.min(max)
    }
}

/// Size, JSON validity and nesting depth; the data with raw newlines
/// flattened.
pub fn data(gateway: &Rc<RefCell<Gateway>>, data: &[u8]) -> Result<Arc<[u8]>, AdminError> {
    let (limit, depth_max) = {
        let limits = &gateway.borrow().config.limits;
        (limits.publication_data_bytes_max, limits.json_depth_max)
    };
    if data.len() > limit {
        gateway.borrow().shared.admin_refusals.add(LimitKind::PublicationDataBytesMax);
        return Err(AdminError::new(
            ErrorCode::TooLarge,
            format!("data is {} bytes; limits.publication_data_bytes_max is {limit}", data.len()),
        ));
    }
    json::validate(data).map_err(|why| bad_argument(format!("data is not valid JSON: {why}")))?;
    if json::nested_deeper_than(data, depth_max) {
        gateway.borrow().shared.admin_refusals.add(LimitKind::JsonDepth);
        return Err(bad_argument(format!("data nests deeper than {depth_max} levels (limits.json_depth_max)")));
    }
    Ok(json::single_line(data).into_owned().into())
}

/// 0 means 4003; 1000, 1001, 1008 and 3000-4999 are allowed.
pub fn disconnect_code(code: u16) -> Result<u16, AdminError> {
    match code {
        0 => Ok(ws::close::DISCONNECTED_BY_SERVER),
        1000 | 1001 | 1008 | 3000..=4999 => Ok(code),
        _ => Err(bad_argument("code must be 0 (default 4003), 1000, 1001, 1008 or 3000-4999")),
    }
}

pub fn disconnect_reason(reason: &str) -> Arc<str> {
    if reason.is_empty() {
        "disconnected by the server".into()
    } else {
        reason.into()
    }
}

/// RELOAD: what SIGHUP does, answered to the backend. The file is read
/// on the admin thread (a rare operation; shards are not involved).
fn reload(gateway: &Rc<RefCell<Gateway>>) -> Result<Outcome, AdminError> {
    let (shared, source) = {
        let gateway = gateway.borrow();
        (Arc::clone(&gateway.shared), gateway.reload_source.clone())
    };
    let Some(source) = source else {
        return Err(AdminError::new(ErrorCode::NotFound, "the server has no configuration source to reload from"));
    };
    match crate::admin::reload::reload(&shared, &source) {
        Ok(reloaded) => {
            tracing::info!(restart_needed = %reloaded.restart_needed.join(", "), "RELOAD: configuration reloaded");
            Ok(Outcome::Document(serde_json::json!({
                "reloaded": true,
                "restart_needed": reloaded.restart_needed,
            })))
        }
        Err(error) => {
            let error = error.replace('\n', " | ");
            tracing::error!(%error, "RELOAD: refused; the running configuration stays");
            Err(AdminError::new(
                ErrorCode::BadArgument,
                format!("reload refused, the running configuration stays: {error}"),
            ))
        }
    }
}

// ---- dispatch ---------------------------------------------------------------

/// Sends `operation` to the shards that own what it names.
pub fn start(gateway: &Rc<RefCell<Gateway>>, operation: Operation) -> Pending {
    if gateway.borrow().is_draining() {
        return Pending::Ready(Err(shutting_down()));
    }
    let count = gateway.borrow().shard_count();
    match operation {
        Operation::Ping => Pending::Ready(Ok(Outcome::Empty)),
        Operation::Reload => Pending::Ready(reload(gateway)),
        Operation::Publish { channel, event, data } => match publish(gateway, channel, &event, &data) {
            Ok(receiver) => Pending::Publish(receiver),
            Err(error) => Pending::Ready(Err(error)),
        },
        Operation::PublishMany { channels, event, data } => Pending::PublishMany(
            channels
                .into_iter()
                .map(|channel| {
                    let part = publish(gateway, Arc::clone(&channel), &event, &data);
                    (channel, part)
                })
                .collect(),
        ),
        Operation::Stats { node_only } => {
            let (cluster, node, admin_refusals) = {
                let gateway = gateway.borrow();
                (gateway.cluster, gateway.config.cluster.node_id.clone(), gateway.shared.admin_refusals.snapshot())
            };
            let mut queries: Vec<(usize, Query)> = (0..count).map(|s| (s, Query::Stats)).collect();
            // Cluster mode: the other nodes' STATS too (from Redis), unless
            // only this node's were asked for.
            queries.extend(cluster.filter(|_| !node_only).map(|cluster| (cluster, Query::NodeStats)));
            gather(gateway, queries, Finish::Stats { node: cluster.and(node), node_only, admin_refusals })
        }
        Operation::SendUser { users, event, data } => {
            let queries = by_owner(count, users, |items| Query::SendUser {
                items,
                event: Arc::clone(&event),
                data: Arc::clone(&data),
            });
            gather(gateway, queries, Finish::Rows)
        }
        Operation::UserStatus { users } => {
            let queries = by_owner(count, users, |items| Query::UserStatus { items });
            gather(gateway, queries, Finish::Rows)
        }
        Operation::Presence { channel, cursor, limit } => {
            to_owner(gateway, count, Arc::clone(&channel), Query::Presence { channel, cursor, limit })
        }
        Operation::PresenceStats { channel } => {
            to_owner(gateway, count, Arc::clone(&channel), Query::PresenceStats { channel })
        }
        Operation::ChannelInfo { channel } => {
            to_owner(gateway, count, Arc::clone(&channel), Query::ChannelInfo { channel })
        }
        Operation::Channels { prefix, cursor, limit } => {
            // Cluster mode: Redis knows every node's channels.
            let destinations: Vec<usize> = match gateway.borrow().cluster {
                Some(cluster) => vec![cluster],
                None => (0..count).collect(),
            };
            let queries = destinations
                .into_iter()
                .map(|s| (s, Query::Channels { prefix: Arc::clone(&prefix), cursor: cursor.clone(), limit }))
                .collect();
            gather(gateway, queries, Finish::Channels { limit })
        }
        Operation::History { channel, since_offset, limit } => {
            let query = Query::History { channel: Arc::clone(&channel), since_epoch: None, since_offset, limit };
            to_owner(gateway, count, channel, query)
        }
        Operation::Disconnect { user, code, reason, revoke_before_s } => {
            let owner = owner_of(&user, count);
            let query = Query::Disconnect { user, code, reason, revoke_before_s };
            gather(gateway, vec![(owner, query)], Finish::Single)
        }
    }
}

/// Groups users by owner shard, keeping each user's index in the request.
fn by_owner(count: usize, users: Vec<Arc<str>>, make: impl Fn(Vec<(u32, Arc<str>)>) -> Query) -> Vec<(usize, Query)> {
    let mut groups: Vec<Vec<(u32, Arc<str>)>> = vec![Vec::new(); count];
    for (index, user) in users.into_iter().enumerate() {
        groups[owner_of(&user, count)].push((index as u32, user));
    }
    groups.into_iter().enumerate().filter(|(_, items)| !items.is_empty()).map(|(s, items)| (s, make(items))).collect()
}

fn to_owner(gateway: &Rc<RefCell<Gateway>>, count: usize, channel: Arc<str>, query: Query) -> Pending {
    let owner = owner_of(&channel, count);
    gather(gateway, vec![(owner, query)], Finish::Single)
}

/// Sends each query to its shard; the answers come back together.
pub fn gather(gateway: &Rc<RefCell<Gateway>>, queries: Vec<(usize, Query)>, finish: Finish) -> Pending {
    Pending::Gather { receiver: send_queries(gateway, queries), finish }
}

/// Sends each query to its shard; the receiver gets every answer.
pub fn send_queries(gateway: &Rc<RefCell<Gateway>>, queries: Vec<(usize, Query)>) -> oneshot::Receiver<Vec<Answer>> {
    let mut gateway = gateway.borrow_mut();
    let token = gateway.admin_token();
    let (sender, receiver) = oneshot::channel();
    gateway
        .admin_waits
        .insert(token, AdminWait::Gather { remaining: queries.len(), answers: Vec::new(), reply: sender });
    let origin = gateway.id as u16;
    for (destination, query) in queries {
        let request = QueryRequest { reply: ReplyTo::Admin { shard: origin, token }, query };
        gateway.bus.send(destination, Message::Query(Box::new(request)));
    }
    // Outside the shard's tick: wake the destinations now.
    gateway.bus.flush();
    receiver
}

fn publish(
    gateway: &Rc<RefCell<Gateway>>,
    channel: Arc<str>,
    event: &str,
    data: &[u8],
) -> Result<PublishReceiver, AdminError> {
    let mut gateway = gateway.borrow_mut();
    if gateway.bus.overloaded() {
        gateway.refusals.refused(PublishRefusal::Overloaded);
        return Err(refusal_error(PublishRefusal::Overloaded));
    }
    let token = gateway.admin_token();
    let (sender, receiver) = oneshot::channel();
    gateway.admin_waits.insert(token, AdminWait::Publish(sender));
    let owner = owner_of(&channel, gateway.shard_count());
    let request = PublishRequest {
        channel,
        event: event.into(),
        data: Box::from(data),
        user: None,
        reply: ReplyTo::Admin { shard: gateway.id as u16, token },
        only_if_exists: false,
    };
    gateway.bus.send(owner, Message::Publish(Box::new(request)));
    // Outside the shard's tick: wake the owner now.
    gateway.bus.flush();
    Ok(receiver)
}
