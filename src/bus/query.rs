//! Queries for owner shards (from the admin socket, and from clients for
//! presence and history), their answers, and how answers from several
//! shards merge into one reply.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::bus::message::ShardStats;
use crate::bus::metrics::ShardMetrics;
use crate::limits::LimitRefusals;
use kometa_protocol::admin;
use kometa_protocol::client;

/// Most items one query returns or takes (members, channels, users,
/// publications): a request asking for more gets this many.
pub const QUERY_ITEMS_MAX: usize = 1000;

#[derive(Debug)]
pub enum Query {
    /// Every shard's counters.
    Stats,
    /// Every shard's counters and figures for `/metrics` (this node only).
    Metrics,
    /// Cluster mode: the other nodes' last published STATS (answered by the
    /// cluster gateway as `{"nodes":[…]}`).
    NodeStats,
    /// A message for users owned by the receiving shard; each item carries
    /// its index in the admin request so replies keep the request's order.
    SendUser {
        items: Vec<(u32, Arc<str>)>,
        event: Arc<str>,
        data: Arc<[u8]>,
    },
    UserStatus {
        items: Vec<(u32, Arc<str>)>,
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
    /// Channels owned by the receiving shard whose names start with
    /// `prefix` and sort after `cursor`.
    Channels {
        prefix: Arc<str>,
        cursor: Option<Box<str>>,
        limit: usize,
    },
    /// Publications after `since_offset` (when `since_epoch` matches or is
    /// absent), oldest first.
    History {
        channel: Arc<str>,
        since_epoch: Option<Box<str>>,
        since_offset: u64,
        limit: usize,
    },
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
        revoke_before_s: u64,
    },
}

#[derive(Debug)]
pub enum Answer {
    Stats(Box<ShardStats>),
    Metrics(Box<ShardMetrics>),
    /// Fields of the reply object.
    Object(Map<String, Value>),
    /// Per-item results, tagged with the item's index in the request.
    Rows(Vec<(u32, Value)>),
    /// Channel names and subscriber counts, sorted by name.
    Channels(Vec<(Arc<str>, u64)>),
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    NotFound,
    Forbidden,
    BadArgument,
    /// Cluster mode: the Redis that holds the answer is unreachable.
    Unavailable,
    /// Cluster mode: too many requests wait for that Redis.
    Overloaded,
}

/// A query that could not be answered, with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    /// An answer saying the query failed.
    pub fn answer(kind: FailureKind, message: impl Into<String>) -> Answer {
        Answer::Failed(Failure { kind, message: message.into() })
    }

    pub fn client_code(&self) -> client::ErrorCode {
        match self.kind {
            FailureKind::NotFound | FailureKind::BadArgument => client::ErrorCode::BadRequest,
            FailureKind::Forbidden => client::ErrorCode::Forbidden,
            FailureKind::Unavailable => client::ErrorCode::Unavailable,
            FailureKind::Overloaded => client::ErrorCode::Overloaded,
        }
    }

    pub fn admin_error(&self) -> admin::AdminError {
        let code = match self.kind {
            FailureKind::NotFound => admin::ErrorCode::NotFound,
            FailureKind::Forbidden | FailureKind::BadArgument => admin::ErrorCode::BadArgument,
            FailureKind::Unavailable => admin::ErrorCode::Unavailable,
            FailureKind::Overloaded => admin::ErrorCode::Overloaded,
        };
        admin::AdminError::new(code, self.message.clone())
    }
}

/// The first failure among `answers`, if any.
pub fn first_failure(answers: &[Answer]) -> Option<&Failure> {
    answers.iter().find_map(|answer| match answer {
        Answer::Failed(failure) => Some(failure),
        _ => None,
    })
}

/// Rows from every shard, back in request order.
pub fn merge_rows(answers: Vec<Answer>) -> Vec<Value> {
    let mut rows: Vec<(u32, Value)> = answers
        .into_iter()
        .flat_map(|answer| match answer {
            Answer::Rows(rows) => rows,
            _ => Vec::new(),
        })
        .collect();
    rows.sort_by_key(|(index, _)| *index);
    rows.into_iter().map(|(_, row)| row).collect()
}

/// Channels with subscriber counts, and the cursor of the next page.
pub type ChannelPage = (Vec<(Arc<str>, u64)>, Option<Arc<str>>);

/// One page of channels from every shard's sorted page, and the cursor for
/// the next page (the last name, when more remain).
pub fn merge_channels(answers: Vec<Answer>, limit: usize) -> ChannelPage {
    let mut channels: Vec<(Arc<str>, u64)> = answers
        .into_iter()
        .flat_map(|answer| match answer {
            Answer::Channels(channels) => channels,
            _ => Vec::new(),
        })
        .collect();
    channels.sort_by(|a, b| a.0.cmp(&b.0));
    let next = if channels.len() > limit {
        channels.truncate(limit);
        channels.last().map(|(name, _)| Arc::clone(name))
    } else {
        None
    };
    (channels, next)
}

/// Every shard's stats, ordered by shard.
pub fn merge_stats(answers: Vec<Answer>) -> Vec<ShardStats> {
    by_shard(
        answers,
        |answer| match answer {
            Answer::Stats(stats) => Some(*stats),
            _ => None,
        },
        |stats| stats.shard,
    )
}

/// Every shard's figures for `/metrics`, ordered by shard.
pub fn merge_metrics(answers: Vec<Answer>) -> Vec<ShardMetrics> {
    by_shard(
        answers,
        |answer| match answer {
            Answer::Metrics(metrics) => Some(*metrics),
            _ => None,
        },
        |metrics| metrics.stats.shard,
    )
}

fn by_shard<T>(answers: Vec<Answer>, pick: impl Fn(Answer) -> Option<T>, shard: impl Fn(&T) -> usize) -> Vec<T> {
    let mut items: Vec<T> = answers.into_iter().filter_map(pick).collect();
    items.sort_by_key(shard);
    items
}

/// The `STATS` document of this process. `limit_refusals` sums the shards'
/// and `admin` (the admin gateway's own, AUTH on the admin listener).
pub fn stats_document(shards: &[ShardStats], admin: &LimitRefusals) -> serde_json::Value {
    let sum = |field: fn(&ShardStats) -> u64| shards.iter().map(field).sum::<u64>();
    let mut limit_refusals = *admin;
    for shard in shards {
        limit_refusals.merge(&shard.limit_refusals);
    }
    serde_json::json!({
        "connections": sum(|s| s.connections),
        "websockets": sum(|s| s.websockets),
        "users": sum(|s| s.users_online),
        "authenticated": sum(|s| s.authenticated),
        "http_sessions": sum(|s| s.http_sessions),
        "channels": sum(|s| s.channels_owned),
        "subscriptions": sum(|s| s.subscriptions),
        "messages_in": sum(|s| s.messages_in),
        "messages_out": sum(|s| s.messages_out),
        "publications": sum(|s| s.publications),
        "slow_consumers_closed": sum(|s| s.slow_consumers_closed),
        "protocol_errors": sum(|s| s.protocol_errors),
        "publications_refused": sum(|s| s.publications_refused),
        "tls_handshakes": sum(|s| s.tls_handshakes),
        "tls_failures": sum(|s| s.tls_failures),
        "limit_refusals": limit_refusals,
        "shards": shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_come_back_in_request_order() {
        let answers = vec![
            Answer::Rows(vec![(2, json!("c")), (0, json!("a"))]),
            Answer::Rows(vec![(1, json!("b"))]),
            Answer::Rows(vec![]),
        ];
        assert_eq!(merge_rows(answers), vec![json!("a"), json!("b"), json!("c")]);
    }

    #[test]
    fn channel_pages_merge_sorted_with_a_cursor() {
        let page = |names: &[&str]| Answer::Channels(names.iter().map(|n| (Arc::from(*n), 1)).collect());
        let (channels, next) = merge_channels(vec![page(&["b", "d", "f"]), page(&["a", "c", "e"])], 4);
        let names: Vec<&str> = channels.iter().map(|(n, _)| &**n).collect();
        assert_eq!(names, vec!["a", "b", "c", "d"]);
        assert_eq!(next.as_deref(), Some("d"));
        let (channels, next) = merge_channels(vec![page(&["a"])], 4);
        assert_eq!(channels.len(), 1);
        assert_eq!(next, None);
    }
}
