//! What a shard reports for `/metrics` (answer to `Query::Metrics`): its
//! `STATS` counters plus the figures only the exposition shows. Plain
//! numbers, copied once per scrape; nothing here is shared between threads.

use crate::bus::message::{PublishRefusal, ShardStats};

/// Sockets by what they carry (label `transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    /// An SSE response streaming a session's events.
    Sse,
    /// A long-poll request waiting for a session's messages.
    LongPoll,
    /// Reading a request, answering one, or closing.
    Http,
}

impl Transport {
    pub const ALL: [Transport; 4] = [Transport::WebSocket, Transport::Sse, Transport::LongPoll, Transport::Http];

    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::LongPoll => "long_poll",
            Transport::Http => "http",
        }
    }
}

/// Why a publication was refused (label `reason`), as its publisher was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// A bus queue was past its high-water mark.
    Overloaded,
    /// A subscriber shard was past `limits.fanout_backlog_max`.
    FanoutBacklog,
    /// A new channel past `limits.channels_max`.
    ChannelsMax,
    ShuttingDown,
    /// Cluster mode: the channel's Redis was unreachable.
    Unavailable,
    /// Cluster mode: Redis went away with the publication in flight.
    UnknownOutcome,
}

impl RefusalReason {
    pub const COUNT: usize = 6;
    pub const ALL: [RefusalReason; RefusalReason::COUNT] = [
        RefusalReason::Overloaded,
        RefusalReason::FanoutBacklog,
        RefusalReason::ChannelsMax,
        RefusalReason::ShuttingDown,
        RefusalReason::Unavailable,
        RefusalReason::UnknownOutcome,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Overloaded => "overloaded",
            RefusalReason::FanoutBacklog => "fanout_backlog",
            RefusalReason::ChannelsMax => "channels_max",
            RefusalReason::ShuttingDown => "shutting_down",
            RefusalReason::Unavailable => "unavailable",
            RefusalReason::UnknownOutcome => "unknown_outcome",
        }
    }

    /// None for `NoChannel`: the server's own status events, not a refusal
    /// anyone sees.
    pub fn of(refusal: PublishRefusal) -> Option<RefusalReason> {
        Some(match refusal {
            PublishRefusal::Overloaded => RefusalReason::Overloaded,
            PublishRefusal::FanoutBacklog => RefusalReason::FanoutBacklog,
            PublishRefusal::ChannelLimit => RefusalReason::ChannelsMax,
            PublishRefusal::ShuttingDown => RefusalReason::ShuttingDown,
            PublishRefusal::Unavailable => RefusalReason::Unavailable,
            PublishRefusal::OutcomeUnknown => RefusalReason::UnknownOutcome,
            PublishRefusal::NoChannel => return None,
        })
    }
}

/// Refused publications per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts(pub [u64; RefusalReason::COUNT]);

impl RefusalCounts {
    pub fn refused(&mut self, refusal: PublishRefusal) {
        if let Some(reason) = RefusalReason::of(refusal) {
            self.0[reason as usize] += 1;
        }
    }

    pub fn get(&self, reason: RefusalReason) -> u64 {
        self.0[reason as usize]
    }

    pub fn add(&mut self, other: &RefusalCounts) {
        for (total, count) in self.0.iter_mut().zip(other.0) {
            *total += count;
        }
    }
}

/// Upper bounds (microseconds) of the publish-to-last-local-write buckets;
/// a last, unbounded bucket follows. From 100 µs (one shard's write of a
/// small fan-out) to 10 s (a backlog far past any sane latency).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// A fixed-bucket histogram kept by one shard (no locks, no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last counts values above every bound.
    pub buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe_us(&mut self, value_us: u64) {
        let bucket = LATENCY_BOUNDS_US.partition_point(|&bound| bound < value_us);
        self.buckets[bucket] += 1;
        self.sum_us += value_us;
        self.count += 1;
    }
}

/// One shard's figures for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ShardMetrics {
    pub stats: ShardStats,
    /// Open sockets by `Transport` (index = `Transport as usize`).
    pub sockets: [u64; 4],
    /// SSE, long-poll and SockJS sessions (socket-less session slots).
    pub sessions_sse: u64,
    pub sessions_long_poll: u64,
    pub sessions_sockjs: u64,
    /// WebSocket upgrades, SSE, long-poll and SockJS sessions started.
    pub handshakes: [u64; 4],
    /// Publications and user messages written or queued to client connections.
    pub deliveries: u64,
    /// Publications refused to publishers on this shard (its clients).
    pub refusals: RefusalCounts,
    /// Messages waiting in the bus queues to this shard.
    pub bus_inbound: u64,
    /// Messages this shard holds in overflow deques (queues full).
    pub bus_overflow: u64,
    /// Publications held in the histories of channels this shard owns.
    pub history_publications: u64,
    /// Messages waiting in the inboxes of users this shard owns.
    pub inbox_messages: u64,
    /// Users this shard owns with a non-empty inbox.
    pub inbox_users: u64,
    pub publish_to_write: LatencyHistogram,
}

/// Indexes into `ShardMetrics::handshakes`.
pub const HANDSHAKE_LABELS: [&str; 4] = ["websocket", "sse", "long_poll", "sockjs"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut histogram = LatencyHistogram::default();
        histogram.observe_us(0);
        histogram.observe_us(100);
        histogram.observe_us(101);
        histogram.observe_us(20_000_000);
        assert_eq!(histogram.buckets[0], 2);
        assert_eq!(histogram.buckets[1], 1);
        assert_eq!(histogram.buckets[LATENCY_BOUNDS_US.len()], 1);
        assert_eq!(histogram.count, 4);
        assert_eq!(histogram.sum_us, 20_000_201);
    }

    #[test]
    fn labels_follow_the_enums() {
        for (index, reason) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
        }
        for (index, transport) in Transport::ALL.iter().enumerate() {
            assert_eq!(*transport as usize, index);
        }
    }
}
