//! Messages between shards. Large variants are boxed so a queue slot stays
//! small (every slot of every bounded queue is `size_of::<Message>()`).

use std::sync::Arc;

use serde::Serialize;

use super::cluster::{FromCluster, ToCluster};
use crate::bus::query::{Answer, Query};
use crate::hub::history::RecoveryFailure;
use crate::hub::publication::Publication;
use crate::hub::user::Refused;
use crate::limits::LimitRefusals;
use kometa_protocol::client::{CommandError, Position, RequestId};

/// Names one connection anywhere in the process. The generation tells a
/// live connection from an earlier one that used the same slab slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: u16,
    pub key: u32,
    pub generation: u32,
}

/// Where a reply goes.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    /// An admin request waiting on `shard` under `token`.
    Admin { shard: u16, token: u64 },
    /// A client command; `request_id` is echoed in the reply.
    Client { conn: ConnRef, request_id: Option<RequestId> },
    /// Nobody waits (the server's own publications, such as status events).
    Nobody,
}

impl ReplyTo {
    pub fn shard(&self) -> Option<usize> {
        match self {
            ReplyTo::Admin { shard, .. } => Some(usize::from(*shard)),
            ReplyTo::Client { conn, .. } => Some(usize::from(conn.shard)),
            ReplyTo::Nobody => None,
        }
    }
}

/// A connection asks a channel's owner to subscribe it.
#[derive(Debug)]
pub struct SubscribeRequest {
    pub channel: Arc<str>,
    pub conn: ConnRef,
    pub user: Option<Arc<str>>,
    /// Resume position, when the client had one.
    pub since: Option<Position>,
    pub request_id: Option<RequestId>,
    /// The subscription asks for pushes of the presence counts.
    pub presence_counts: bool,
}

/// The owner accepted a subscription.
#[derive(Debug)]
pub struct SubscribeOk {
    pub epoch: Arc<str>,
    /// The channel's last offset when the subscription took effect: the
    /// subscriber gets every publication after it, and none at or before it
    /// except the replayed ones.
    pub offset: u64,
    /// With `since`: the missed publications in order, or why not.
    pub recovery: Option<Result<Vec<Arc<Publication>>, RecoveryFailure>>,
}

#[derive(Debug)]
pub struct SubscribeReply {
    pub conn: ConnRef,
    pub channel: Arc<str>,
    /// Echoed from the request, so a connection that closed meanwhile can
    /// still be unsubscribed (and leave presence) correctly.
    pub user: Option<Arc<str>>,
    pub request_id: Option<RequestId>,
    /// Echoed from the request (for the subscriber entry, or the undo).
    pub presence_counts: bool,
    pub result: Result<SubscribeOk, CommandError>,
}

/// Publish to a channel (from the admin socket or a client).
#[derive(Debug)]
pub struct PublishRequest {
    pub channel: Arc<str>,
    pub event: Box<str>,
    /// Validated JSON.
    pub data: Box<[u8]>,
    /// Set for client publications: stamped on the push.
    pub user: Option<Arc<str>>,
    pub reply: ReplyTo,
    /// Publish only if the channel already exists (status events must not
    /// create a channel per user).
    pub only_if_exists: bool,
}

#[derive(Debug, Clone)]
pub struct PublishOk {
    pub offset: u64,
    /// Subscribers the publication was sent to.
    pub subscribers: u64,
    pub epoch: Arc<str>,
}

/// Why an owner refused a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefusal {
    /// A bus queue from the owner is past its high-water mark.
    Overloaded,
    /// A shard with subscribers is past `limits.fanout_backlog_max`. The
    /// publisher is told `overloaded`, like above; kept apart for metrics.
    FanoutBacklog,
    /// `channels_max` reached and the channel does not exist.
    ChannelLimit,
    ShuttingDown,
    /// `only_if_exists` and the channel does not exist.
    NoChannel,
    /// Cluster mode: the channel's Redis is unreachable; nothing was published.
    Unavailable,
    /// Cluster mode: Redis went away with the publication in flight: it may
    /// or may not have been published (a retry may publish it twice).
    OutcomeUnknown,
}

/// A connection with a verified token registers with its user's owner.
#[derive(Debug)]
pub struct UserConnectRequest {
    pub user: Arc<str>,
    pub conn: ConnRef,
    /// The token's `iat`, checked against the user's revocation time.
    pub issued_at_s: u64,
    /// Set when this came from a `connect` command (the reply answers it).
    pub request_id: Option<RequestId>,
    pub via_command: bool,
}

#[derive(Debug)]
pub struct UserConnectReply {
    pub conn: ConnRef,
    pub user: Arc<str>,
    pub request_id: Option<RequestId>,
    pub via_command: bool,
    /// The inbox to replay, or why the connection was refused.
    pub result: Result<Vec<Arc<Publication>>, Refused>,
}

/// An admin or client query for an owner (or for every shard).
#[derive(Debug)]
pub struct QueryRequest {
    pub reply: ReplyTo,
    pub query: Query,
}

#[derive(Debug)]
pub struct QueryAnswer {
    pub reply: ReplyTo,
    pub answer: Answer,
}

/// One shard's counters, gathered for `STATS`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardStats {
    pub shard: usize,
    /// Open sockets on the public port (any phase).
    pub connections: u64,
    /// Open WebSocket connections.
    pub websockets: u64,
    /// Channels with subscribers on this shard.
    pub channels_local: u64,
    /// Channels this shard owns (epoch, offsets, history).
    pub channels_owned: u64,
    pub subscriptions: u64,
    /// Client messages received.
    pub messages_in: u64,
    /// Frames written to clients (pushes, replies, control).
    pub messages_out: u64,
    /// Publications this shard assigned offsets to, as owner.
    pub publications: u64,
    pub connections_accepted: u64,
    /// Connections refused because `connections_max` was reached.
    pub connections_refused: u64,
    /// Closed with 1008 because their outbox passed its cap.
    pub slow_consumers_closed: u64,
    /// Closed for a protocol violation (1002, 1007, 1009, bad HTTP).
    pub protocol_errors: u64,
    /// Messages that waited in a bus overflow deque.
    pub bus_overflowed: u64,
    /// Bytes sitting in outboxes right now.
    pub outbox_bytes: u64,
    /// Users this shard owns that have a connection.
    pub users_online: u64,
    /// HTTP sessions (SSE, long-poll) on this shard.
    pub http_sessions: u64,
    /// Publications refused (`overloaded`) because a shard's fan-out backlog was too long.
    pub publications_refused: u64,
    /// Deliveries queued on this shard, not yet written.
    /// (Plus messages waiting in outboxes: see `limits.fanout_backlog_max`.)
    pub fanout_backlog: u64,
    /// Users this shard owns and tracks (online, last seen, inbox).
    pub users_tracked: u64,
    /// Connections with a verified user token.
    pub authenticated: u64,
    /// TLS handshakes completed, and failed (bad client, plain HTTP on the TLS port).
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    /// Peers refused by a limit against abuse, by kind (`LimitKind::name`).
    pub limit_refusals: LimitRefusals,
}

/// Everything that crosses between shards.
#[derive(Debug)]
pub enum Message {
    // To a channel's owner.
    Subscribe(Box<SubscribeRequest>),
    /// One subscriber on `shard` left `channel` (`presence_counts`: one
    /// that had asked for presence counts).
    Unsubscribe {
        channel: Arc<str>,
        shard: u16,
        user: Option<Arc<str>>,
        presence_counts: bool,
    },
    Publish(Box<PublishRequest>),

    // From an owner.
    /// Fan-out of one publication to a shard with subscribers. `accounted`
    /// is what the owner added to that shard's `fanout_backlog` for it (its
    /// subscriber count there); the shard takes it off once written.
    Deliver {
        publication: Arc<Publication>,
        accounted: u32,
    },
    SubscribeReply(Box<SubscribeReply>),
    PublishReply(Box<(ReplyTo, Result<PublishOk, PublishRefusal>)>),

    // Users, to the user's owner.
    UserConnect(Box<UserConnectRequest>),
    /// One connection of `user` on `shard` closed.
    UserDisconnect {
        user: Arc<str>,
        shard: u16,
    },
    /// Acknowledges inbox messages up to and including `seq`.
    UserAck {
        user: Arc<str>,
        seq: u64,
    },

    // From a user's owner.
    UserConnectReply(Box<UserConnectReply>),
    /// A message for every local connection of `user`.
    UserDeliver {
        user: Arc<str>,
        push: Arc<Publication>,
    },
    /// Close every local connection of `user` (admin DISCONNECT).
    CloseUser {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },

    // Queries from the admin socket and clients, and their answers.
    Query(Box<QueryRequest>),
    Answer(Box<QueryAnswer>),

    /// A connection handed to the shard that owns the HTTP session it asks
    /// for, with the bytes already read from it (its request onward).
    Adopt {
        fd: std::os::fd::OwnedFd,
        /// Its address under the per-address limits (still counted).
        peer: Option<crate::bus::limiter::AddressKey>,
        input: Box<[u8]>,
        /// The connection's TLS session (keys, partial records), if any.
        tls: Option<Box<crate::tls::TlsSession>>,
    },

    // Cluster mode: to and from the cluster gateway.
    ToCluster(Box<ToCluster>),
    FromCluster(Box<FromCluster>),
    /// A shard asks the backend thread (RPC, proxies).
    Backend(Box<super::backend::BackendRequest>),
    /// The backend thread answers a shard.
    BackendReply(Box<super::backend::BackendReply>),
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_stays_small() {
        // Every queue slot costs this much; keep large payloads boxed.
        assert!(std::mem::size_of::<super::Message>() <= 40, "{}", std::mem::size_of::<super::Message>());
    }
}
