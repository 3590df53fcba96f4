//! Messages between the shards and the cluster gateway (the Redis side of a
//! cluster node). Shards stay the owners of their channels and users on this
//! node; in cluster mode an owner asks the gateway for what only Redis knows
//! (offsets, history, cluster-wide presence and users) and the gateway hands
//! it what other nodes published.
//!
//! Ordering: the gateway reads each Redis connection in order and forwards
//! replies and pub/sub pushes in that order, so an owner that gets a reply
//! computed at some point of Redis's history has already got every
//! publication of that channel made before that point (see docs/cluster.md).

use std::sync::Arc;

use super::message::{PublishRequest, QueryRequest, UserConnectRequest};
use crate::hub::publication::Publication;

/// A change of one node-local count kept in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountChange {
    /// Add this (negative to remove); Redis clamps at 0.
    Delta(i32),
    /// Set to this (re-registration after a reset).
    Set(u32),
}

/// A channel position and the publications after a given offset.
#[derive(Debug)]
pub struct ChannelPosition {
    pub epoch: Arc<str>,
    /// The channel's last offset in Redis when it was read.
    pub top: u64,
    /// Publications after the asked offset (same epoch only), oldest first;
    /// may stop short of `top` where history was trimmed or expired.
    pub publications: Vec<Arc<Publication>>,
}

/// Why the gateway could not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterFailure {
    /// The Redis of this channel or user is unreachable: the request was
    /// not sent.
    Unavailable,
    /// The request was sent, and Redis went away (or stopped answering)
    /// before its reply: it may or may not have been carried out.
    InFlight,
    /// Redis answered with an error (out of memory, a script error).
    Refused,
    /// Too many requests are waiting for that Redis.
    Overloaded,
}

/// Why a user's connection was refused at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserRefusal {
    /// The token was issued before the user's revocation time.
    Revoked,
    Failed(ClusterFailure),
}

/// To the cluster gateway.
#[derive(Debug)]
pub enum ToCluster {
    /// Assign an offset in Redis, store in history, publish to every node.
    /// The reply goes straight to `request.reply`.
    Publish { request: PublishRequest, history_size: u32, history_ttl_ms: u64 },
    /// Make sure this node receives the channel's publications, then read
    /// its position and, with `after`, the publications after it. Answered
    /// with `FromCluster::CaughtUp` to `owner`, carrying `token`.
    CatchUp { channel: Arc<str>, owner: u16, token: u64, after: Option<(Arc<str>, u64)>, limit: u32 },
    /// The node has no subscribers of the channel left: stop receiving it.
    Release { channel: Arc<str> },
    /// This node's presence in a channel changed (`user` None: anonymous).
    Presence { channel: Arc<str>, user: Option<Arc<str>>, change: CountChange, join_leave: bool },
    /// This node's subscriber counts per channel (0: none left).
    SubscriberCounts(Vec<(Arc<str>, u32)>),
    /// Register a connection of a user (revocation check, online status,
    /// inbox); answered with `FromCluster::UserConnected` to `owner`.
    UserConnect { request: UserConnectRequest, owner: u16 },
    /// This node's connection count of a user changed (disconnects, and
    /// re-registration after a reset).
    UserCount { user: Arc<str>, change: CountChange },
    /// Acknowledge a user's inbox up to and including `seq`.
    UserAck { user: Arc<str>, seq: u64 },
    /// A query answered from Redis; the answer goes straight to its `reply`.
    Query(QueryRequest),
    /// A shard has re-registered everything after `FromCluster::Reset`.
    ResyncDone { shard: u16, incarnation: u64 },
}

/// From the cluster gateway to a shard.
#[derive(Debug)]
pub enum FromCluster {
    /// A publication of a channel this shard owns, as Redis published it.
    Publication(Arc<Publication>),
    /// A join/leave event of a channel this shard owns (offset 0).
    ChannelEvent(Arc<Publication>),
    /// The answer to `ToCluster::CatchUp`.
    CaughtUp { channel: Arc<str>, token: u64, result: Result<ChannelPosition, ClusterFailure> },
    /// The answer to `ToCluster::UserConnect`: the inbox to replay.
    /// `reregister`: a reset came between the request and its answer, so
    /// the connection was counted under the previous incarnation; the shard
    /// counts it again (after its own re-registration, in bus order).
    UserConnected { request: UserConnectRequest, result: Result<Vec<Arc<Publication>>, UserRefusal>, reregister: bool },
    /// A message for a user this shard owns: deliver to its connections on this node.
    UserMessage { user: Arc<str>, push: Arc<Publication> },
    /// Close a user's connections on this node (admin DISCONNECT on any node).
    CloseUser { user: Arc<str>, code: u16, reason: Arc<str> },
    /// Redis lost this node's registrations (a reconnect, a Redis restart, or
    /// the node was taken for dead): re-register channels, presence and
    /// users, catch up every channel, then answer `ResyncDone`.
    Reset { incarnation: u64 },
}
