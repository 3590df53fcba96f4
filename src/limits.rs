//! Every limit and timeout, with its default, unit and reason.
//!
//! Each field is a named setting in the config file (`[limits]` and
//! `[timeouts]`); `docs/configuration.md` lists them all. Units are the last
//! part of every name. Nothing that grows with peer input is unbounded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// Sizes and counts. Defaults suit a push server for browsers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest HTTP request head (request line + headers). Browsers send
    /// 1-2 KiB; 8 KiB leaves room for long cookies and tokens. Larger → 431.
    pub http_head_bytes_max: usize,
    /// Most header fields in one request. More → 431.
    pub http_headers_max: usize,
    /// Largest HTTP request body (commands over POST for SSE/long-poll). Larger → 413.
    pub http_body_bytes_max: usize,
    /// Largest WebSocket message a client may send (all fragments together).
    /// Client commands are small; larger → close 1009.
    pub client_message_bytes_max: usize,
    /// Largest publication `data` (JSON bytes), from the admin socket or a client.
    pub publication_data_bytes_max: usize,
    /// Channels one connection may be subscribed to at once (Centrifugo: 128).
    pub channels_per_connection_max: usize,
    /// Longest channel name in bytes.
    pub channel_name_bytes_max: usize,
    /// Bytes queued for one connection while its socket pushes back. Past it,
    /// the connection is closed with 1008 "slow consumer" (Centrifugo: 1 MiB).
    pub outbox_bytes_max: usize,
    /// Messages queued for one connection while its socket pushes back.
    pub outbox_messages_max: usize,
    /// Channels that may exist at once on the whole server (each holds an
    /// epoch, offset and history). Past it, publishing to or subscribing to a
    /// new channel is refused.
    pub channels_max: usize,
    /// Largest admin frame (after the length field).
    pub admin_frame_bytes_max: usize,
    /// Admin connections open at once; more are closed at accept.
    pub admin_connections_max: usize,
    /// Admin requests of one connection waiting for their replies; reading
    /// pauses past it (pipelining backpressure).
    pub admin_requests_in_flight_max: usize,
    /// Messages one cross-shard queue holds (one queue per ordered pair of shards).
    pub bus_queue_capacity: usize,
    /// Messages a shard keeps for one destination when that queue is full.
    /// Past half of it the shard refuses new publications with `overloaded`
    /// and stops reading client sockets until it drains.
    pub bus_overflow_max: usize,
    /// Most items one query takes or returns: users in SEND_USER and
    /// USER_STATUS, members in a presence page, channels in a listing,
    /// publications in a history page.
    pub query_items_max: usize,
    /// Deliveries (publication × subscriber) a shard may have queued, plus
    /// messages waiting in its connections' outboxes, before owners refuse
    /// new publications to its channels with `overloaded`. Bounds fan-out
    /// latency and memory under overload instead of letting them grow.
    pub fanout_backlog_max: usize,
    /// Bytes the kernel may hold unsent for one client socket
    /// (TCP_NOTSENT_LOWAT, set on the listener and inherited). Past it
    /// writes take nothing more and output waits in the connection's
    /// outbox, where `fanout_backlog_max` and the slow-consumer limits see
    /// it; without it the kernel queued up to its autotuned buffer (MiBs a
    /// socket) where nothing counted it, and a publication waited seconds
    /// behind a slow reader while new ones were still accepted. 0: the
    /// kernel's default (unbounded). Restart-only.
    pub socket_unsent_bytes_max: usize,
    /// HTTP sessions (SSE, long-poll) that may exist at once; more get 503.
    pub http_sessions_max: usize,
    /// Messages an HTTP session keeps for its client (unacknowledged, or
    /// recent for an SSE replay).
    pub session_buffer_messages_max: usize,
    /// Bytes an HTTP session keeps for its client.
    pub session_buffer_bytes_max: usize,
    /// Commands from `POST /cmd` waiting to run in one session; more get 429.
    pub session_commands_pending_max: usize,
    /// A history page stops once its publications reach this many bytes, or
    /// half of `outbox_bytes_max` if that is smaller (a `next` position says
    /// where to continue).
    pub query_reply_bytes_max: usize,

    // Against abuse: every refusal below is counted in `limit_refusals`.
    /// Open connections from one address (IPv6: one /64) over the whole
    /// process; more are answered 429 at accept. 0: no limit.
    pub connections_per_ip_max: usize,
    /// Networks (CIDR) exempt from the per-address limits: loopback by
    /// default, so a reverse proxy or load generator on the same host is
    /// not throttled. Add a proxy's address here.
    pub ip_limits_exempt: Vec<String>,
    /// WebSocket upgrades and new SSE/long-poll sessions per second from
    /// one address (token bucket); more are answered 429. 0: no limit.
    pub handshakes_per_ip_per_s: u32,
    /// Handshakes one address may make at once before the rate applies.
    pub handshakes_per_ip_burst: u32,
    /// Connections (and HTTP sessions) of one user at once; more are closed
    /// with 4005 right after the upgrade. 0: no limit.
    pub connections_per_user_max: usize,
    /// Client commands per second on one connection or HTTP session (token
    /// bucket); past it a command gets the error `rate_limited`. 0: no limit.
    pub client_commands_per_s: u32,
    /// Commands a connection may send at once before the rate applies; at
    /// least `channels_per_connection_max`, so a client can subscribe to
    /// all its channels on connect.
    pub client_commands_burst: u32,
    /// Client publications per second on one connection; past it `publish`
    /// gets `rate_limited`. 0: no limit.
    pub client_publications_per_s: u32,
    pub client_publications_burst: u32,
    /// Client publications per second of one user over all its connections
    /// on this node. 0: no limit.
    pub user_publications_per_s: u32,
    pub user_publications_burst: u32,
    /// Deepest nesting of arrays and objects in publication data (client or
    /// admin): recursive JSON parsers on the receiving side break on deep
    /// data. Deeper is refused (`bad_request` / `bad_argument`).
    pub json_depth_max: usize,
    /// Wrong keys one admin connection may send with AUTH; it is closed at
    /// this many.
    pub admin_auth_failures_max: u32,
    /// TCP admin connections that have not authenticated yet, at once. A
    /// newcomer past it pushes out the oldest unauthenticated one, so
    /// connections that never AUTH cannot lock a backend out.
    pub admin_unauthenticated_max: usize,
}

impl Limits {
    pub fn handshakes_per_ip(&self) -> Rate {
        Rate { per_s: self.handshakes_per_ip_per_s, burst: self.handshakes_per_ip_burst }
    }

    pub fn client_commands(&self) -> Rate {
        Rate { per_s: self.client_commands_per_s, burst: self.client_commands_burst }
    }

    pub fn client_publications(&self) -> Rate {
        Rate { per_s: self.client_publications_per_s, burst: self.client_publications_burst }
    }

    pub fn user_publications(&self) -> Rate {
        Rate { per_s: self.user_publications_per_s, burst: self.user_publications_burst }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            http_head_bytes_max: 8 * 1024,
            http_headers_max: 64,
            http_body_bytes_max: 64 * 1024,
            client_message_bytes_max: 64 * 1024,
            publication_data_bytes_max: 256 * 1024,
            channels_per_connection_max: 128,
            channel_name_bytes_max: 255,
            outbox_bytes_max: 1024 * 1024,
            outbox_messages_max: 4096,
            channels_max: 1_000_000,
            admin_frame_bytes_max: 1024 * 1024,
            admin_connections_max: 256,
            admin_requests_in_flight_max: 1024,
            bus_queue_capacity: 8192,
            bus_overflow_max: 65_536,
            fanout_backlog_max: 262_144,
            socket_unsent_bytes_max: 16 * 1024,
            http_sessions_max: 100_000,
            session_buffer_messages_max: 1024,
            session_buffer_bytes_max: 1024 * 1024,
            session_commands_pending_max: 64,
            query_items_max: 1000,
            query_reply_bytes_max: 512 * 1024,
            connections_per_ip_max: 1000,
            ip_limits_exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
            handshakes_per_ip_per_s: 20,
            handshakes_per_ip_burst: 100,
            connections_per_user_max: 100,
            client_commands_per_s: 50,
            client_commands_burst: 200,
            client_publications_per_s: 10,
            client_publications_burst: 50,
            user_publications_per_s: 20,
            user_publications_burst: 100,
            json_depth_max: 32,
            admin_auth_failures_max: 3,
            admin_unauthenticated_max: 8,
        }
    }
}

/// Durations, in milliseconds.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A connection must finish its HTTP request head (and a keep-alive
    /// connection send its next one) within this time.
    pub handshake_timeout_ms: u64,
    /// The server pings every WebSocket connection this often. Below common
    /// proxy idle timeouts (60 s) so idle connections survive them.
    pub ping_interval_ms: u64,
    /// A connection that sends nothing (not even a pong) for
    /// `ping_interval_ms + pong_timeout_ms` is closed with 4004.
    pub pong_timeout_ms: u64,
    /// After the server sends a close frame, the peer has this long to answer
    /// before the socket is closed anyway.
    pub close_timeout_ms: u64,
    /// On SIGTERM/SIGINT, outboxes get this long to flush before exit.
    pub shutdown_timeout_ms: u64,
    /// How often each shard sweeps its connections for the timeouts above.
    pub sweep_interval_ms: u64,
    /// An HTTP session outlives its last stream or poll by this much.
    pub session_grace_ms: u64,
    /// A long-poll waits this long for messages before answering empty.
    pub poll_timeout_ms: u64,
    /// An SSE stream gets a comment line this often, so proxies keep it open.
    pub sse_heartbeat_ms: u64,
    /// An admin connection whose backend does not take its replies for this
    /// long is closed (it would hold one of `admin_connections_max` and the
    /// replies in memory forever).
    pub admin_write_timeout_ms: u64,
    /// A WebSocket message (all its frames) must arrive whole within this
    /// time from its first byte; a client dribbling one is closed with 1008.
    pub message_timeout_ms: u64,
    /// A TCP admin connection must authenticate within this time, or it is
    /// closed.
    pub admin_auth_timeout_ms: u64,
    /// A channel's presence counts are pushed (to subscriptions that ask for
    /// them) at most this often.
    pub presence_counts_interval_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            pong_timeout_ms: 10_000,
            close_timeout_ms: 3_000,
            shutdown_timeout_ms: 5_000,
            sweep_interval_ms: 1_000,
            session_grace_ms: 30_000,
            poll_timeout_ms: 25_000,
            sse_heartbeat_ms: 15_000,
            admin_write_timeout_ms: 30_000,
            message_timeout_ms: 10_000,
            admin_auth_timeout_ms: 5_000,
            presence_counts_interval_ms: 1_000,
        }
    }
}

/// A rate for a token bucket: `per_s` tokens a second, at most `burst` saved
/// up. `per_s` 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_s: u32,
    pub burst: u32,
}

/// The most a bucket may save up (`burst` is validated against it), so
/// thousandths of tokens fit in a `u32`.
pub const BURST_MAX: u32 = 1_000_000;

/// A token bucket in 8 bytes, small enough for every connection: tokens in
/// thousandths (refilled exactly, nothing lost to rounding) and the time of
/// the last refill. Times are a caller's millisecond clock cut to 32 bits: a
/// bucket untouched for 49.7 days refills less than it should, once, which
/// at worst refuses a few requests until it refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    milli_tokens: u32,
    stamp_ms: u32,
}

impl Bucket {
    /// A bucket holding its whole burst.
    pub fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket { milli_tokens: rate.burst.min(BURST_MAX) * 1000, stamp_ms: now_ms as u32 }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> bool {
        let elapsed_ms = elapsed_ms(self.stamp_ms, now_ms);
        self.stamp_ms = now_ms as u32;
        take_milli_token(&mut self.milli_tokens, rate, elapsed_ms)
    }

    /// Holds its whole burst again: an idle bucket that can be forgotten.
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let milli_tokens = refill(self.milli_tokens, rate, elapsed_ms(self.stamp_ms, now_ms));
        rate.per_s == 0 || milli_tokens >= u64::from(rate.burst.min(BURST_MAX)) * 1000
    }
}

/// Milliseconds from a 32-bit stamp to `now_ms` (see `Bucket` on the wrap).
fn elapsed_ms(stamp_ms: u32, now_ms: u64) -> u64 {
    u64::from((now_ms as u32).wrapping_sub(stamp_ms))
}

/// Thousandths of tokens after `elapsed_ms` at `rate`, capped at the burst.
fn refill(milli_tokens: u32, rate: Rate, elapsed_ms: u64) -> u64 {
    let cap = u64::from(rate.burst.min(BURST_MAX)) * 1000;
    (u64::from(milli_tokens) + elapsed_ms * u64::from(rate.per_s)).min(cap)
}

/// Refills, then takes one token if there is one (always, at no limit).
fn take_milli_token(milli_tokens: &mut u32, rate: Rate, elapsed_ms: u64) -> bool {
    if rate.per_s == 0 {
        return true;
    }
    let tokens = refill(*milli_tokens, rate, elapsed_ms);
    let taken = tokens >= 1000;
    // At most BURST_MAX * 1000: fits in u32.
    *milli_tokens = (if taken { tokens - 1000 } else { tokens }) as u32;
    taken
}

/// A client's two buckets (`limits.client_commands_per_s` and
/// `limits.client_publications_per_s`) in 12 bytes, kept with every
/// connection and HTTP session: one clock stamp serves both, and since
/// tokens are counted in thousandths a refill loses nothing to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRates {
    commands: u32,
    publications: u32,
    stamp_ms: u32,
}

impl ClientRates {
    /// Both buckets full.
    pub fn new(limits: &Limits, now_ms: u64) -> ClientRates {
        let full = |rate: Rate| rate.burst.min(BURST_MAX) * 1000;
        ClientRates {
            commands: full(limits.client_commands()),
            publications: full(limits.client_publications()),
            stamp_ms: now_ms as u32,
        }
    }

    /// Refills both to `now_ms`.
    fn refill_to(&mut self, limits: &Limits, now_ms: u64) {
        let elapsed_ms = elapsed_ms(self.stamp_ms, now_ms);
        self.stamp_ms = now_ms as u32;
        // Capped at the burst, at most BURST_MAX * 1000: fits in u32.
        self.commands = refill(self.commands, limits.client_commands(), elapsed_ms) as u32;
        self.publications = refill(self.publications, limits.client_publications(), elapsed_ms) as u32;
    }

    /// Takes a command token; false past `limits.client_commands_per_s`.
    pub fn take_command(&mut self, limits: &Limits, now_ms: u64) -> bool {
        self.refill_to(limits, now_ms);
        take_milli_token(&mut self.commands, limits.client_commands(), 0)
    }

    /// Takes a publication token; false past `limits.client_publications_per_s`.
    pub fn take_publication(&mut self, limits: &Limits, now_ms: u64) -> bool {
        self.refill_to(limits, now_ms);
        take_milli_token(&mut self.publications, limits.client_publications(), 0)
    }
}

/// Every limit that refuses a peer, by kind, for `limit_refusals` in STATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `limits.connections_per_ip_max`: 429 at accept.
    ConnectionsPerIp,
    /// `limits.handshakes_per_ip_per_s`: 429 to an upgrade or new session.
    HandshakesPerIp,
    /// `limits.connections_per_user_max`: close 4005 / session end.
    ConnectionsPerUser,
    /// `limits.client_commands_per_s`: error `rate_limited`.
    CommandsPerConnection,
    /// `limits.client_publications_per_s`: error `rate_limited`.
    PublicationsPerConnection,
    /// `limits.user_publications_per_s`: error `rate_limited`.
    PublicationsPerUser,
    /// `timeouts.handshake_timeout_ms` with a request half read: 408.
    RequestTimeout,
    /// `timeouts.message_timeout_ms`: close 1008.
    MessageTimeout,
    /// `limits.json_depth_max` (client or admin data).
    JsonDepth,
    /// `timeouts.admin_auth_timeout_ms`: the admin connection is closed.
    AdminAuthTimeout,
    /// `limits.admin_auth_failures_max`: the admin connection is closed.
    AdminAuthFailures,
    /// `limits.admin_unauthenticated_max`: the oldest unauthenticated
    /// admin connection is closed for a newcomer.
    AdminUnauthenticated,
    /// `connections_max`: 503 at accept.
    ConnectionsMax,
    /// `limits.http_sessions_max`: a new SSE/long-poll session refused (503).
    HttpSessionsMax,
    /// `limits.channels_max`: a subscription or publication needing a new channel.
    ChannelsMax,
    /// A namespace's `subscribers_max`: a subscription refused.
    SubscribersMax,
    /// `limits.channels_per_connection_max`: a subscription refused.
    ChannelsPerConnectionMax,
    /// `limits.session_commands_pending_max`: a `POST /cmd` answered 429.
    SessionCommandsPendingMax,
    /// `limits.admin_connections_max`: an admin, HTTP API or metrics
    /// connection refused (each listener counts its own).
    AdminConnectionsMax,
    /// `limits.publication_data_bytes_max`: admin or HTTP API data refused (`too_large`).
    PublicationDataBytesMax,
    /// `limits.fanout_backlog_max`: a publication refused (`overloaded`).
    FanoutBacklogMax,
}

impl LimitKind {
    pub const ALL: [LimitKind; 21] = [
        LimitKind::ConnectionsPerIp,
        LimitKind::HandshakesPerIp,
        LimitKind::ConnectionsPerUser,
        LimitKind::CommandsPerConnection,
        LimitKind::PublicationsPerConnection,
        LimitKind::PublicationsPerUser,
        LimitKind::RequestTimeout,
        LimitKind::MessageTimeout,
        LimitKind::JsonDepth,
        LimitKind::AdminAuthTimeout,
        LimitKind::AdminAuthFailures,
        LimitKind::AdminUnauthenticated,
        LimitKind::ConnectionsMax,
        LimitKind::HttpSessionsMax,
        LimitKind::ChannelsMax,
        LimitKind::SubscribersMax,
        LimitKind::ChannelsPerConnectionMax,
        LimitKind::SessionCommandsPendingMax,
        LimitKind::AdminConnectionsMax,
        LimitKind::PublicationDataBytesMax,
        LimitKind::FanoutBacklogMax,
    ];

    /// The key in `limit_refusals` (stable: exporters use it as a label).
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::ConnectionsPerIp => "connections_per_ip",
            LimitKind::HandshakesPerIp => "handshakes_per_ip",
            LimitKind::ConnectionsPerUser => "connections_per_user",
            LimitKind::CommandsPerConnection => "commands_per_connection",
            LimitKind::PublicationsPerConnection => "publications_per_connection",
            LimitKind::PublicationsPerUser => "publications_per_user",
            LimitKind::RequestTimeout => "request_timeout",
            LimitKind::MessageTimeout => "message_timeout",
            LimitKind::JsonDepth => "json_depth",
            LimitKind::AdminAuthTimeout => "admin_auth_timeout",
            LimitKind::AdminAuthFailures => "admin_auth_failures",
            LimitKind::AdminUnauthenticated => "admin_unauthenticated",
            LimitKind::ConnectionsMax => "connections_max",
            LimitKind::HttpSessionsMax => "http_sessions_max",
            LimitKind::ChannelsMax => "channels_max",
            LimitKind::SubscribersMax => "subscribers_max",
            LimitKind::ChannelsPerConnectionMax => "channels_per_connection_max",
            LimitKind::SessionCommandsPendingMax => "session_commands_pending_max",
            LimitKind::AdminConnectionsMax => "admin_connections_max",
            LimitKind::PublicationDataBytesMax => "publication_data_bytes_max",
            LimitKind::FanoutBacklogMax => "fanout_backlog_max",
        }
    }
}

/// Refusals counted by kind; serialised as `{"connections_per_ip": n, ...}`
/// with every kind present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitRefusals([u64; LimitKind::ALL.len()]);

impl LimitRefusals {
    pub fn add(&mut self, kind: LimitKind) {
        self.0[kind as usize] += 1;
    }

    pub fn get(&self, kind: LimitKind) -> u64 {
        self.0[kind as usize]
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &LimitRefusals) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Serialize for LimitRefusals {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(LimitKind::ALL.len()))?;
        for kind in LimitKind::ALL {
            map.serialize_entry(kind.name(), &self.get(kind))?;
        }
        map.end()
    }
}

/// `LimitRefusals` that several threads count into (the admin gateway's).
#[derive(Debug, Default)]
pub struct SharedRefusals([AtomicU64; LimitKind::ALL.len()]);

impl SharedRefusals {
    pub fn add(&self, kind: LimitKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LimitRefusals {
        LimitRefusals(std::array::from_fn(|index| self.0[index].load(Ordering::Relaxed)))
    }
}

/// A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare
/// address is a /32 or /128), for `limits.ip_limits_exempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNetwork {
    /// IPv4 as IPv4-mapped IPv6, so one comparison serves both.
    bits: u128,
    prefix_len: u32,
}

impl IpNetwork {
    pub fn parse(text: &str) -> Result<IpNetwork, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| format!("`{text}` is not an IP address or network"))?;
        let (bits, width, offset) = match address {
            IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 32, 96),
            IpAddr::V6(v6) => (u128::from(v6), 128, 0),
        };
        let prefix_len = match prefix {
            None => width,
            Some(prefix) => match prefix.parse::<u32>() {
                Ok(length) if length <= width => length,
                _ => return Err(format!("`{text}`: the prefix length must be 0..={width}")),
            },
        };
        Ok(IpNetwork { bits, prefix_len: prefix_len + offset })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let bits = match address {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(u128::from(v6), |v4| u128::from(v4.to_ipv6_mapped())),
        };
        let mask = u128::MAX.checked_shl(128 - self.prefix_len).unwrap_or(0);
        bits & mask == self.bits & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let loopback = IpNetwork::parse("127.0.0.0/8").unwrap();
        assert!(loopback.contains("127.1.2.3".parse().unwrap()));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()), "IPv4-mapped");
        assert!(!loopback.contains("128.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("::1".parse().unwrap()));
        let one = IpNetwork::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all = IpNetwork::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(IpNetwork::parse("2001:db8::/32").unwrap().contains("2001:db8:1::7".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "host", "10.0.0.0/x", ""] {
            assert!(IpNetwork::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate { per_s: 10, burst: 3 };
        let mut bucket = Bucket::full(rate, 1_000);
        assert!((0..3).all(|_| bucket.take(rate, 1_000)), "the burst at once");
        assert!(!bucket.take(rate, 1_000));
        assert!(!bucket.take(rate, 1_099), "a token takes 100 ms");
        assert!(bucket.take(rate, 1_100));
        assert!(!bucket.take(rate, 1_100));
        // Refused attempts do not lose the partial refill.
        assert!(!bucket.take(rate, 1_150));
        assert!(bucket.take(rate, 1_200));
        assert!(!bucket.is_full(rate, 1_200));
        assert!(bucket.is_full(rate, 1_500));
        // Idle time saves up no more than the burst.
        assert!((0..3).all(|_| bucket.take(rate, 60_000)));
        assert!(!bucket.take(rate, 60_000));
    }

    #[test]
    fn fractional_rates_and_clock_wrap() {
        let rate = Rate { per_s: 3, burst: 1 };
        let mut bucket = Bucket::full(rate, 0);
        assert!(bucket.take(rate, 0));
        assert!(!bucket.take(rate, 333));
        assert!(bucket.take(rate, 334), "1/3 s per token, in thousandths");
        // Across the 32-bit wrap of the millisecond clock.
        let start = u64::from(u32::MAX) - 10;
        let mut bucket = Bucket::full(rate, start);
        assert!(bucket.take(rate, start));
        assert!(!bucket.take(rate, start + 20));
        assert!(bucket.take(rate, start + 334));
        // No limit at all.
        let unlimited = Rate { per_s: 0, burst: 0 };
        let mut bucket = Bucket::full(unlimited, 0);
        assert!((0..10_000).all(|_| bucket.take(unlimited, 0)));
    }

    #[test]
    fn client_rates_share_a_clock_and_lose_nothing() {
        let limits = Limits {
            client_commands_per_s: 3,
            client_commands_burst: 2,
            client_publications_per_s: 1,
            client_publications_burst: 1,
            ..Limits::default()
        };
        let mut rates = ClientRates::new(&limits, 0);
        assert!(rates.take_command(&limits, 0) && rates.take_command(&limits, 0));
        assert!(!rates.take_command(&limits, 0));
        assert!(rates.take_publication(&limits, 0));
        assert!(!rates.take_publication(&limits, 0), "separate buckets");
        // Refills of one bucket at many small steps (each also refilling
        // the other) add up exactly: 334 ms for a third of a second.
        for now_ms in (10..=330).step_by(10) {
            assert!(!rates.take_command(&limits, now_ms), "{now_ms}");
        }
        assert!(!rates.take_command(&limits, 333));
        assert!(rates.take_command(&limits, 334));
        assert!(!rates.take_publication(&limits, 999));
        assert!(rates.take_publication(&limits, 1_000));
        assert_eq!(std::mem::size_of::<ClientRates>(), 12);
    }

    #[test]
    fn refusals_serialise_every_kind_by_name() {
        let mut refusals = LimitRefusals::default();
        refusals.add(LimitKind::JsonDepth);
        refusals.add(LimitKind::JsonDepth);
        let shared = SharedRefusals::default();
        shared.add(LimitKind::AdminAuthFailures);
        refusals.merge(&shared.snapshot());
        let json = serde_json::to_value(refusals).unwrap();
        assert_eq!(json["json_depth"], 2);
        assert_eq!(json["admin_auth_failures"], 1);
        assert_eq!(json["connections_per_ip"], 0);
        assert_eq!(json.as_object().unwrap().len(), LimitKind::ALL.len());
        assert_eq!(refusals.total(), 3);
    }
}

#[cfg(test)]
mod kind_tests {
    use super::LimitKind;

    #[test]
    fn every_limit_kind_is_listed_once_in_order() {
        for (index, kind) in LimitKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index, "{kind:?}");
        }
        let names: std::collections::HashSet<&str> = LimitKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), LimitKind::ALL.len());
    }
}
