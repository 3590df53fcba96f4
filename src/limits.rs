//! Every limit and timeout, with its default, unit and reason.
//!
//! Each field is a named setting in the config file (`[limits]` and
//! `[timeouts]`); `docs/configuration.md` lists them all. Units are the last
//! part of every name. Nothing that grows with peer input is unbounded.

use serde::Deserialize;

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
    /// Deliveries (publication × subscriber) a shard may have queued before
    /// owners refuse new publications to its channels with `overloaded`.
    /// Bounds fan-out latency under overload instead of letting it grow.
    pub fanout_backlog_max: usize,
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
            http_sessions_max: 100_000,
            session_buffer_messages_max: 1024,
            session_buffer_bytes_max: 1024 * 1024,
            session_commands_pending_max: 64,
            query_items_max: 1000,
            query_reply_bytes_max: 512 * 1024,
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
        }
    }
}
