//! Server configuration: embedded defaults, overridden by a TOML file,
//! overridden by `KOMETA_*` environment variables and command-line flags.
//!
//! `validate` rejects nonsense before any socket opens; every error names the
//! key it is about. Unknown keys are errors too (a typo in a limit must not
//! silently fall back to the default).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Deserializer};

pub use kometa_admin_client::{default_admin_address, AdminAddress};

use crate::limits::{IpNetwork, Limits, Timeouts, BURST_MAX};
pub use crate::log::{LogConfig, LogFormat};
use kometa_protocol::client::name_byte_allowed;
use kometa_protocol::http::HEADERS_HARD_MAX;

/// Most shards (executors) one process runs.
pub const SHARDS_MAX: usize = 256;

/// Rules for channels whose names start with `prefix` (longest prefix wins).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Channel-name prefix; "" is the catch-all default namespace.
    pub prefix: String,
    /// Clients may publish; the server stamps the sender's user id.
    #[serde(default)]
    pub client_publish: bool,
    /// Keep presence (members with connection counts); clients may query it.
    #[serde(default)]
    pub presence: bool,
    /// Push join/leave events to subscribers (requires `presence`).
    #[serde(default)]
    pub join_leave: bool,
    /// Publications kept for history and resume (0 disables both).
    #[serde(default = "default_history_size")]
    pub history_size: usize,
    /// How long a publication stays in history.
    #[serde(default = "default_history_ttl_ms")]
    pub history_ttl_ms: u64,
    /// Only users whose token grants the channel (or, for channels ending in
    /// `#USER` / `:USER`, that user) may subscribe.
    #[serde(default)]
    pub private: bool,
    /// Connections without a user token may subscribe.
    #[serde(default = "default_true")]
    pub anonymous: bool,
    /// Clients may ask for history.
    #[serde(default = "default_true")]
    pub client_history: bool,
    /// Most subscribers a channel of this namespace may have.
    #[serde(default = "default_subscribers_max")]
    pub subscribers_max: usize,
    /// Ask the backend (`rpc.subscribe_url`) before a client subscribes.
    #[serde(default)]
    pub proxy_subscribe: bool,
    /// Ask the backend (`rpc.publish_url`) before a client publishes; it
    /// may refuse or rewrite the data.
    #[serde(default)]
    pub proxy_publish: bool,
}

fn default_history_size() -> usize {
    100
}
fn default_history_ttl_ms() -> u64 {
    300_000
}
fn default_true() -> bool {
    true
}
fn default_subscribers_max() -> usize {
    10_000_000
}

impl Namespace {
    /// The catch-all namespace: short history, nothing else.
    pub fn catch_all() -> Namespace {
        Namespace {
            prefix: String::new(),
            client_publish: false,
            presence: false,
            join_leave: false,
            history_size: default_history_size(),
            history_ttl_ms: default_history_ttl_ms(),
            private: false,
            anonymous: true,
            client_history: true,
            subscribers_max: default_subscribers_max(),
            proxy_subscribe: false,
            proxy_publish: false,
        }
    }

    /// Conventions users of earlier Comet servers know.
    pub fn defaults() -> Vec<Namespace> {
        vec![
            Namespace { prefix: "web_".into(), client_publish: true, ..Namespace::catch_all() },
            Namespace { prefix: "track_".into(), presence: true, join_leave: true, ..Namespace::catch_all() },
            Namespace { prefix: "private_".into(), private: true, anonymous: false, ..Namespace::catch_all() },
            Namespace { prefix: "user_status_".into(), ..Namespace::catch_all() },
            Namespace::catch_all(),
        ]
    }
}

/// Per-user inbox for messages sent to users (`SEND_USER`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    /// Messages kept per user until acknowledged. When full, SEND_USER reports it.
    pub messages_max: usize,
    /// How long an unacknowledged message is kept.
    pub ttl_ms: u64,
    /// Users with a non-empty inbox the whole server keeps.
    pub users_max: usize,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig { messages_max: 100, ttl_ms: 24 * 3600 * 1000, users_max: 1_000_000 }
    }
}

/// Users: online status, last seen, revocations.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UsersConfig {
    /// Users tracked at once (online, last seen, inbox, revocation); past
    /// it, offline users with nothing pending are forgotten first.
    pub tracked_max: usize,
    /// An offline user with nothing pending is forgotten after this; its
    /// status becomes `unknown`.
    pub last_seen_ttl_ms: u64,
    /// Publish `online` / `offline` events to the channel `user_status_<id>`
    /// (only while that channel exists: has subscribers or history).
    pub status_events: bool,
}

impl Default for UsersConfig {
    fn default() -> Self {
        UsersConfig { tracked_max: 2_000_000, last_seen_ttl_ms: 7 * 24 * 3600 * 1000, status_events: true }
    }
}

/// `[sockjs]`: SockJS endpoints for the stock `sockjs-client` library
/// (docs/sockjs.md). Each SockJS session is a Kometa session: the client
/// protocol's JSON commands travel inside SockJS messages at `prefix`, the
/// Jii-comet text protocol at `jii_prefix`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SockJsConfig {
    /// Serve SockJS at `prefix` (on by default, like SSE and long-polling:
    /// nothing is spent until a client uses it).
    pub enabled: bool,
    /// Path of the SockJS service (the URL given to `new SockJS(…)`).
    pub prefix: String,
    /// Serve the Jii-comet text protocol over SockJS at `jii_prefix`.
    pub jii_enabled: bool,
    pub jii_prefix: String,
    /// Offer the websocket transport (`/info` says so); when off, the
    /// websocket URLs answer 404 and clients use the HTTP transports.
    pub websocket: bool,
    /// For load balancers that keep sessions sticky by cookie: `/info` says
    /// `cookie_needed` and session responses set `JSESSIONID`.
    pub cookie_needed: bool,
    /// A heartbeat frame (`h`) goes to every SockJS session this often; a
    /// waiting poll is answered with one.
    pub heartbeat_interval_ms: u64,
    /// A streaming response (xhr_streaming, eventsource, htmlfile) ends
    /// once it has carried this many bytes, so the browser can free what
    /// it holds; the client opens the next one (SockJS default: 128 KiB).
    pub response_limit_bytes: usize,
    /// Where `/iframe.html` loads sockjs-client from (an absolute URL or a
    /// path starting with `/`).
    pub client_url: String,
    /// SockJS sessions over all shards (they also count in
    /// `limits.http_sessions_max`); more are answered 503.
    pub sessions_max: usize,
    /// Messages a session has received and not yet handled. An HTTP send
    /// that would pass it gets 429; a WebSocket is read no further until
    /// the session catches up.
    pub pending_messages_max: usize,
    /// Bytes of those messages; never below one request body or client
    /// message (`sockjs_pending_bytes_max`), so raising those limits does
    /// not need this one raised too.
    pub pending_bytes_max: usize,
    /// The services the SockJS conformance suite expects at `/echo`,
    /// `/close`, `/disabled_websocket_echo` and `/cookie_needed_echo`.
    /// For tests only.
    pub test_services: bool,
}

impl Default for SockJsConfig {
    fn default() -> Self {
        SockJsConfig {
            enabled: true,
            prefix: "/sockjs".into(),
            jii_enabled: true,
            jii_prefix: "/comet".into(),
            websocket: true,
            cookie_needed: false,
            heartbeat_interval_ms: 25_000,
            response_limit_bytes: 128 * 1024,
            client_url: "https://cdn.jsdelivr.net/npm/sockjs-client@1/dist/sockjs.min.js".into(),
            sessions_max: 100_000,
            pending_messages_max: 1024,
            pending_bytes_max: 256 * 1024,
            test_services: false,
        }
    }
}

/// Which driver, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// io_uring where the kernel allows it, else epoll (said once in the log).
    Auto,
    IoUring,
    Epoll,
}

/// `[io]`: how shards learn that sockets are ready.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IoConfig {
    /// `auto` (io_uring where the kernel allows it, else epoll, said once in
    /// the log), `io_uring` or `epoll`. See docs/architecture.md.
    pub driver: DriverKind,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig { driver: DriverKind::Auto }
    }
}

/// One RPC route: methods starting with `prefix` go to `url`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpcRoute {
    pub prefix: String,
    pub url: String,
}

/// `[rpc]`: clients asking the backend (`op: rpc`), and the proxies that
/// let the backend approve connects, subscriptions and publications.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Webhook routes by method prefix; the longest matching prefix wins.
    pub routes: Vec<RpcRoute>,
    /// Connect proxy: a connection without a token is logged in by the
    /// backend, which sees the request's headers (`connect_headers`).
    pub connect_url: Option<String>,
    /// Subscribe proxy for namespaces with `proxy_subscribe`.
    pub subscribe_url: Option<String>,
    /// Publish proxy for namespaces with `proxy_publish`.
    pub publish_url: Option<String>,
    /// Request headers the connect proxy passes on (lower case).
    pub connect_headers: Vec<String>,
    /// Sent to the backend as `X-Kometa-Key`, so it can tell Kometa's calls apart.
    pub backend_key: Option<String>,
    /// A call not answered in this time fails with `timeout`.
    pub timeout_ms: u64,
    /// Calls in flight at once (worker threads).
    pub concurrency_max: usize,
    /// Calls waiting for a worker; past it new calls fail with `unavailable`.
    pub queue_max: usize,
    /// Unanswered `rpc` commands one connection may have.
    pub in_flight_per_connection_max: usize,
    /// Consecutive failures (timeouts, refused connections, 5xx) that open
    /// a URL's circuit breaker: calls then fail at once with `unavailable`.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before one trial call.
    pub breaker_open_ms: u64,
    /// Largest `data` of one `rpc` command.
    pub data_bytes_max: usize,
    /// Largest answer body a backend may send.
    pub response_bytes_max: usize,
    /// Backends may register on the admin socket as handlers of `rpc`
    /// methods (HANDLE): calls then go to them rather than to a webhook.
    pub admin_handlers: bool,
    /// Method prefixes one handler connection may register.
    pub handler_prefixes_max: usize,
    /// Unanswered calls one handler connection may have; past it, calls
    /// routed to it fail at once with `unavailable`.
    pub handler_calls_max: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            routes: Vec::new(),
            connect_url: None,
            subscribe_url: None,
            publish_url: None,
            connect_headers: ["cookie", "authorization", "user-agent", "origin", "x-forwarded-for", "x-real-ip"]
                .into_iter()
                .map(String::from)
                .collect(),
            backend_key: None,
            timeout_ms: 5_000,
            concurrency_max: 16,
            queue_max: 1_024,
            in_flight_per_connection_max: 8,
            breaker_failures: 5,
            breaker_open_ms: 5_000,
            data_bytes_max: 65_536,
            response_bytes_max: 1 << 20,
            admin_handlers: false,
            handler_prefixes_max: 64,
            handler_calls_max: 1_024,
        }
    }
}

impl RpcConfig {
    /// Whether anything calls the backend (then the backend thread runs).
    pub fn enabled(&self) -> bool {
        !self.routes.is_empty()
            || self.connect_url.is_some()
            || self.subscribe_url.is_some()
            || self.publish_url.is_some()
            || self.admin_handlers
    }

    /// The webhook URL for an RPC method: the longest matching prefix.
    pub fn route(&self, method: &str) -> Option<&str> {
        self.routes
            .iter()
            .filter(|route| method.starts_with(&route.prefix))
            .max_by_key(|route| route.prefix.len())
            .map(|route| route.url.as_str())
    }
}

/// `[tls]`: TLS on the public listener. With both files set the listener
/// speaks only TLS (wss://, https://); plain requests get a plain 400.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<String>,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// What a cluster node does while a Redis it needs is unreachable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisDownPolicy {
    /// Keep accepting connections; what needs Redis (publishing, history,
    /// presence, new channels) answers `unavailable` until it is back.
    #[default]
    Serve,
    /// Answer new WebSocket, SSE and long-poll requests with 503 until every
    /// Redis is reachable again (existing connections stay open), so a load
    /// balancer sends clients to healthy nodes.
    Refuse,
}

/// `[cluster]`: several nodes sharing channels, history, presence and users
/// through Redis. Without `redis` the node runs alone, with no Redis at all.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Redis URLs (`redis://[:PASSWORD@]HOST:PORT[/DB]`); a single string or
    /// a list. Several instances share the channels and users between them
    /// by a jump consistent hash of the name, so one Redis is not the ceiling.
    /// Every node of a cluster must list the same URLs in the same order.
    #[serde(deserialize_with = "one_or_many")]
    pub redis: Vec<String>,
    /// This node's name in the cluster (letters, digits, `_ - .`, at most 64
    /// bytes); generated at start when not set.
    pub node_id: Option<String>,
    /// `node_id` was generated, not configured (not a setting).
    #[serde(skip)]
    pub node_id_generated: bool,
    /// Prefix of every Redis key and pub/sub channel, so several clusters can
    /// share one Redis.
    pub key_prefix: String,
    /// How often a node tells Redis it is alive, and looks for dead nodes.
    pub heartbeat_interval_ms: u64,
    /// A node silent for this long is dead: the others remove its presence
    /// and connections and emit its users' leave and offline events.
    pub node_timeout_ms: u64,
    /// A Redis that has not answered a request for this long is treated as
    /// unreachable: the connection is dropped and made again.
    pub request_timeout_ms: u64,
    /// Limit for opening a connection to Redis (TCP, HELLO, script loading).
    pub connect_timeout_ms: u64,
    /// Reconnect attempts back off from 100 ms, doubling, up to this.
    pub reconnect_backoff_max_ms: u64,
    /// Requests waiting for one Redis's replies; past it, publications are
    /// refused with `overloaded` and other requests with `unavailable`.
    pub requests_in_flight_max: usize,
    /// What to do while a Redis is unreachable.
    pub on_redis_down: RedisDownPolicy,
    /// A channel's epoch and offset counter live this long in Redis after
    /// its last publication; after that its next publication starts a new
    /// epoch (clients are told they cannot resume).
    pub channel_meta_ttl_ms: u64,
    /// Publications of one channel held while the node catches up with it
    /// from history; past it they are dropped and read back from history.
    pub catch_up_buffer_max: usize,
    /// How often a node writes its subscriber counts per channel to Redis
    /// (for publish replies, CHANNELS and CHANNEL_INFO).
    pub subscriber_counts_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: Vec::new(),
            node_id: None,
            node_id_generated: false,
            key_prefix: "kometa".into(),
            heartbeat_interval_ms: 1_000,
            node_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 2_000,
            reconnect_backoff_max_ms: 5_000,
            requests_in_flight_max: 100_000,
            on_redis_down: RedisDownPolicy::Serve,
            channel_meta_ttl_ms: 7 * 24 * 3600 * 1000,
            catch_up_buffer_max: 10_000,
            subscriber_counts_interval_ms: 200,
        }
    }
}

impl ClusterConfig {
    /// Whether this node is a cluster member (has Redis).
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => vec![text],
        OneOrMany::Many(list) => list,
    })
}

/// Characters allowed in a node id (it becomes part of Redis key names).
pub fn node_id_byte_allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.')
}

/// Channel that carries a user's online/offline events.
pub fn user_status_channel(user: &str) -> String {
    format!("user_status_{user}")
}

/// `[metrics]`: Prometheus exposition on its own listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ADDR:PORT` serving `GET /metrics`; off when unset. Never the public
    /// port: counters tell an attacker what works.
    pub listen: Option<SocketAddr>,
}

/// `[api]`: the HTTP API for backends (`POST /api/<operation>`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `ADDR:PORT` of the HTTP API; off when unset.
    pub listen: Option<SocketAddr>,
    /// Required with `listen` (at least 16 bytes): requests carry
    /// `Authorization: apikey KEY`.
    pub key: Option<String>,
}

/// Everything the server reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public listener: WebSocket, SSE, long-poll, health.
    pub listen: SocketAddr,
    /// Admin listener for the backend.
    pub admin: AdminAddress,
    /// Shared key required on a TCP admin listener (at least 16 bytes).
    pub admin_key: Option<String>,
    /// Executors, one per core; 0 means one per available core.
    pub shards: usize,
    /// Listen backlog of each shard's listener.
    pub accept_backlog: u32,
    /// Connections the whole process accepts; more are answered 503.
    pub connections_max: usize,
    /// `Origin` values allowed to open WebSockets; empty allows any.
    pub allowed_origins: Vec<String>,
    /// With `allowed_origins` set: whether requests without an `Origin`
    /// header (native apps, servers; browsers always send one on upgrades
    /// and cross-origin requests) are served. On by default: the allow-list
    /// guards against other sites' pages, and a client that sends no Origin
    /// is not a browser page (it could send any Origin it liked).
    pub allow_missing_origin: bool,
    /// If set, a WebSocket echo endpoint at this path, for protocol
    /// conformance suites (Autobahn). Off by default.
    pub echo_path: Option<String>,
    /// HS256 secret for connection tokens (or `KOMETA_TOKEN_SECRET`).
    pub token_secret: Option<String>,
    /// The previous secret, still accepted during a rotation.
    pub token_secret_previous: Option<String>,
    /// Let the kernel back the heap with 2 MiB transparent huge pages.
    /// Off by default: mimalloc marks its arena MADV_HUGEPAGE, and
    /// khugepaged then refills the pages freed after a connection burst,
    /// so idle connections cost 20-40% more memory (docs/benchmarks.md).
    pub transparent_huge_pages: bool,
    /// Pin each shard's thread to one CPU. Off by default: measured on a
    /// host where anything else is busy (the load generator, Redis, other
    /// Kometa nodes sharing the host), pinned shards queue behind it on
    /// their CPU instead of moving: handshakes/s fell from ~29,000 to
    /// 12,000-22,000 (docs/benchmarks.md). On a host that runs nothing
    /// else, pinning saves the odd migration.
    pub pin_shards: bool,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Channel-prefix rules; replaces the built-in list when given. A
    /// catch-all (`prefix = ""`) is added when missing.
    pub namespaces: Vec<Namespace>,
    pub inbox: InboxConfig,
    pub users: UsersConfig,
    pub cluster: ClusterConfig,
    pub io: IoConfig,
    pub tls: TlsConfig,
    pub rpc: RpcConfig,
    pub metrics: MetricsConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub sockjs: SockJsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: default_admin_address(),
            admin_key: None,
            shards: 0,
            accept_backlog: 4096,
            connections_max: 1_000_000,
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            echo_path: None,
            token_secret: None,
            token_secret_previous: None,
            transparent_huge_pages: false,
            pin_shards: false,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            namespaces: Namespace::defaults(),
            inbox: InboxConfig::default(),
            users: UsersConfig::default(),
            cluster: ClusterConfig::default(),
            io: IoConfig::default(),
            tls: TlsConfig::default(),
            rpc: RpcConfig::default(),
            metrics: MetricsConfig::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            sockjs: SockJsConfig::default(),
        }
    }
}

impl Config {
    /// The bytes of messages a SockJS session may hold unhandled: the
    /// setting, but never less than one request body or client message.
    pub fn sockjs_pending_bytes_max(&self) -> usize {
        self.sockjs.pending_bytes_max.max(self.limits.http_body_bytes_max).max(self.limits.client_message_bytes_max)
    }

    /// The keys of `next` that differ from `self` but only take effect on
    /// a restart (listeners, shards, the bus, cluster, per-shard sizing).
    /// A reload keeps `self`'s values for them (`keep_restart_only`).
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |key, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("listen", self.listen != next.listen);
        check("admin", self.admin != next.admin);
        check("admin_key", self.admin_key != next.admin_key);
        check("shards", self.shards != next.shards);
        check("accept_backlog", self.accept_backlog != next.accept_backlog);
        check("connections_max", self.connections_max != next.connections_max);
        check("transparent_huge_pages", self.transparent_huge_pages != next.transparent_huge_pages);
        check("pin_shards", self.pin_shards != next.pin_shards);
        check("io", self.io != next.io);
        // A node id generated at start differs on every load: compare
        // the cluster settings as written.
        let mut next_cluster = next.cluster.clone();
        if self.cluster.node_id_generated {
            next_cluster.node_id = self.cluster.node_id.clone();
            next_cluster.node_id_generated = true;
        }
        check("cluster", self.cluster != next_cluster);
        check("inbox", self.inbox != next.inbox);
        check("users", self.users != next.users);
        check("limits.bus_queue_capacity", self.limits.bus_queue_capacity != next.limits.bus_queue_capacity);
        check("limits.bus_overflow_max", self.limits.bus_overflow_max != next.limits.bus_overflow_max);
        check("limits.channels_max", self.limits.channels_max != next.limits.channels_max);
        check(
            "limits.socket_unsent_bytes_max",
            self.limits.socket_unsent_bytes_max != next.limits.socket_unsent_bytes_max,
        );
        // The process-wide limiter (bus::limiter) is built at start.
        let (l, n) = (&self.limits, &next.limits);
        check("limits.ip_limits_exempt", l.ip_limits_exempt != n.ip_limits_exempt);
        check("limits.connections_per_ip_max", l.connections_per_ip_max != n.connections_per_ip_max);
        check(
            "limits.handshakes_per_ip_per_s",
            (l.handshakes_per_ip_per_s, l.handshakes_per_ip_burst)
                != (n.handshakes_per_ip_per_s, n.handshakes_per_ip_burst),
        );
        check(
            "limits.user_publications_per_s",
            (l.user_publications_per_s, l.user_publications_burst)
                != (n.user_publications_per_s, n.user_publications_burst),
        );
        check("timeouts.sweep_interval_ms", self.timeouts.sweep_interval_ms != next.timeouts.sweep_interval_ms);
        check("metrics.listen", self.metrics.listen != next.metrics.listen);
        check("api.listen", self.api.listen != next.api.listen);
        check("log.format", self.log.format != next.log.format);
        // The backend thread is started (or not) with the server.
        check("rpc.admin_handlers", self.rpc.admin_handlers != next.rpc.admin_handlers);
        changed
    }

    /// `next` with the restart-only settings of `self` (see above).
    pub fn keep_restart_only(&self, mut next: Config) -> Config {
        next.listen = self.listen;
        next.admin = self.admin.clone();
        next.admin_key = self.admin_key.clone();
        next.shards = self.shards;
        next.accept_backlog = self.accept_backlog;
        next.connections_max = self.connections_max;
        next.transparent_huge_pages = self.transparent_huge_pages;
        next.pin_shards = self.pin_shards;
        next.io = self.io.clone();
        next.cluster = self.cluster.clone();
        next.inbox = self.inbox.clone();
        next.users = self.users.clone();
        next.limits.bus_queue_capacity = self.limits.bus_queue_capacity;
        next.limits.bus_overflow_max = self.limits.bus_overflow_max;
        next.limits.channels_max = self.limits.channels_max;
        next.limits.socket_unsent_bytes_max = self.limits.socket_unsent_bytes_max;
        next.limits.ip_limits_exempt = self.limits.ip_limits_exempt.clone();
        next.limits.connections_per_ip_max = self.limits.connections_per_ip_max;
        next.limits.handshakes_per_ip_per_s = self.limits.handshakes_per_ip_per_s;
        next.limits.handshakes_per_ip_burst = self.limits.handshakes_per_ip_burst;
        next.limits.user_publications_per_s = self.limits.user_publications_per_s;
        next.limits.user_publications_burst = self.limits.user_publications_burst;
        next.timeouts.sweep_interval_ms = self.timeouts.sweep_interval_ms;
        next.metrics.listen = self.metrics.listen;
        next.api.listen = self.api.listen;
        next.log.format = self.log.format;
        next.rpc.admin_handlers = self.rpc.admin_handlers;
        next
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn error(key: &str, problem: impl fmt::Display) -> ConfigError {
    ConfigError(format!("config key `{key}`: {problem}"))
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(key: &str, value: T, min: T, max: T) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(error(key, format!("{value} is out of range ({min}..={max})")));
    }
    Ok(())
}

impl Config {
    /// Parses a TOML document. Unknown keys and wrong types are errors that
    /// name the key (toml reports the line and column).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(format!("config file: {e}")))
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Shards to run: `shards`, or the available cores when 0.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        }
    }

    /// Rejects values that would make the server misbehave.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        check_range("shards", self.shards, 0, SHARDS_MAX)?;
        check_range("accept_backlog", self.accept_backlog, 1, 1 << 20)?;
        check_range("connections_max", self.connections_max, 1, 100_000_000)?;
        if let AdminAddress::Tcp(_) | AdminAddress::Tls { .. } = self.admin {
            match &self.admin_key {
                None => return Err(error("admin_key", "required when `admin` is a tcp: or tls: address")),
                Some(key) if key.len() < 16 => return Err(error("admin_key", "must be at least 16 bytes")),
                Some(_) => {}
            }
        }
        for origin in &self.allowed_origins {
            if origin.is_empty() || origin.ends_with('/') {
                return Err(error(
                    "allowed_origins",
                    format!("`{origin}` must look like https://host[:port] (no trailing slash)"),
                ));
            }
        }
        self.validate_rpc()?;
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => return Err(error("tls.key_file", "required with tls.cert_file")),
            (None, Some(_)) => return Err(error("tls.cert_file", "required with tls.key_file")),
            _ => {}
        }
        if matches!(self.admin, AdminAddress::Tls { .. }) && self.tls.cert_file.is_none() {
            return Err(error("admin", "a tls: admin address needs tls.cert_file and tls.key_file"));
        }
        if let Some(path) = &self.echo_path {
            if !path.starts_with('/') {
                return Err(error("echo_path", "must start with /"));
            }
        }
        for (key, secret) in
            [("token_secret", &self.token_secret), ("token_secret_previous", &self.token_secret_previous)]
        {
            if secret.as_ref().is_some_and(|s| s.len() < 16) {
                return Err(error(key, "must be at least 16 bytes"));
            }
        }

        let l = &self.limits;
        check_range("limits.http_head_bytes_max", l.http_head_bytes_max, 256, 1 << 20)?;
        check_range("limits.http_headers_max", l.http_headers_max, 4, HEADERS_HARD_MAX)?;
        check_range("limits.http_body_bytes_max", l.http_body_bytes_max, 256, 64 << 20)?;
        check_range("limits.client_message_bytes_max", l.client_message_bytes_max, 128, 64 << 20)?;
        check_range("limits.publication_data_bytes_max", l.publication_data_bytes_max, 16, 16 << 20)?;
        check_range("limits.channels_per_connection_max", l.channels_per_connection_max, 1, 65_536)?;
        check_range("limits.channel_name_bytes_max", l.channel_name_bytes_max, 1, 1024)?;
        check_range("limits.outbox_messages_max", l.outbox_messages_max, 1, 1 << 20)?;
        check_range("limits.outbox_bytes_max", l.outbox_bytes_max, 1024, 1 << 30)?;
        check_range("limits.channels_max", l.channels_max, 1, 100_000_000)?;
        check_range("limits.admin_connections_max", l.admin_connections_max, 1, 65_536)?;
        check_range("limits.admin_requests_in_flight_max", l.admin_requests_in_flight_max, 1, 1 << 20)?;
        check_range("limits.bus_queue_capacity", l.bus_queue_capacity, 16, 1 << 22)?;
        check_range("limits.bus_overflow_max", l.bus_overflow_max, 16, 1 << 24)?;
        check_range("limits.admin_frame_bytes_max", l.admin_frame_bytes_max, 1024, 1 << 30)?;
        // A publication must fit in one admin frame and in one outbox.
        let publication_frame_max = l.publication_data_bytes_max + 2 * 1024;
        if l.admin_frame_bytes_max < publication_frame_max {
            return Err(error(
                "limits.admin_frame_bytes_max",
                format!("must be at least limits.publication_data_bytes_max + 2048 = {publication_frame_max}"),
            ));
        }
        if l.outbox_bytes_max < publication_frame_max {
            return Err(error(
                "limits.outbox_bytes_max",
                format!("must be at least limits.publication_data_bytes_max + 2048 = {publication_frame_max}"),
            ));
        }

        let t = &self.timeouts;
        check_range("timeouts.handshake_timeout_ms", t.handshake_timeout_ms, 100, 3_600_000)?;
        check_range("timeouts.ping_interval_ms", t.ping_interval_ms, 100, 3_600_000)?;
        check_range("timeouts.pong_timeout_ms", t.pong_timeout_ms, 100, 3_600_000)?;
        check_range("timeouts.close_timeout_ms", t.close_timeout_ms, 10, 600_000)?;
        check_range("timeouts.shutdown_timeout_ms", t.shutdown_timeout_ms, 0, 600_000)?;
        check_range("timeouts.sweep_interval_ms", t.sweep_interval_ms, 10, 60_000)?;
        check_range("timeouts.session_grace_ms", t.session_grace_ms, 100, 3_600_000)?;
        check_range("timeouts.poll_timeout_ms", t.poll_timeout_ms, 100, 600_000)?;
        check_range("timeouts.sse_heartbeat_ms", t.sse_heartbeat_ms, 100, 600_000)?;
        check_range("timeouts.admin_write_timeout_ms", t.admin_write_timeout_ms, 100, 3_600_000)?;
        check_range("limits.fanout_backlog_max", self.limits.fanout_backlog_max, 1024, 1 << 32)?;
        if self.limits.socket_unsent_bytes_max != 0 {
            check_range("limits.socket_unsent_bytes_max", self.limits.socket_unsent_bytes_max, 1024, 1 << 30)?;
        }
        check_range("limits.http_sessions_max", self.limits.http_sessions_max, 1, 100_000_000)?;
        check_range("limits.session_buffer_messages_max", self.limits.session_buffer_messages_max, 1, 1 << 20)?;
        check_range("limits.session_buffer_bytes_max", self.limits.session_buffer_bytes_max, 1024, 1 << 30)?;
        check_range("limits.session_commands_pending_max", self.limits.session_commands_pending_max, 1, 65_536)?;

        check_range("inbox.messages_max", self.inbox.messages_max, 0, 100_000)?;
        check_range("inbox.ttl_ms", self.inbox.ttl_ms, 1000, 30 * 24 * 3600 * 1000)?;
        check_range("inbox.users_max", self.inbox.users_max, 1, 100_000_000)?;
        check_range("users.tracked_max", self.users.tracked_max, 1, 1_000_000_000)?;
        check_range("users.last_seen_ttl_ms", self.users.last_seen_ttl_ms, 1000, 365 * 24 * 3600 * 1000)?;
        check_range("limits.query_items_max", self.limits.query_items_max, 1, 100_000)?;
        check_range("limits.query_reply_bytes_max", self.limits.query_reply_bytes_max, 1024, 64 << 20)?;
        self.validate_abuse_limits()?;

        self.validate_cluster()?;
        self.validate_edge()?;
        self.validate_sockjs()?;

        let mut seen = std::collections::HashSet::new();
        for (index, namespace) in self.namespaces.iter().enumerate() {
            let key = |field: &str| format!("namespaces[{index}].{field}");
            if !namespace.prefix.bytes().all(name_byte_allowed) {
                return Err(error(&key("prefix"), "may contain only letters, digits and _ - . : @ / = #"));
            }
            if !seen.insert(namespace.prefix.as_str()) {
                return Err(error(&key("prefix"), format!("`{}` appears twice", namespace.prefix)));
            }
            check_range(&key("history_size"), namespace.history_size, 0, 100_000)?;
            check_range(&key("history_ttl_ms"), namespace.history_ttl_ms, 0, 30 * 24 * 3600 * 1000)?;
            check_range(&key("subscribers_max"), namespace.subscribers_max, 1, 100_000_000)?;
            if namespace.join_leave && !namespace.presence {
                return Err(error(&key("join_leave"), "requires presence = true"));
            }
            if namespace.history_size > 0 && namespace.history_ttl_ms == 0 {
                return Err(error(&key("history_ttl_ms"), "must be > 0 when history_size > 0"));
            }
        }
        if !self.namespaces.iter().any(|n| n.prefix.is_empty()) {
            self.namespaces.push(Namespace::catch_all());
        }
        Ok(())
    }

    fn validate_rpc(&self) -> Result<(), ConfigError> {
        let rpc = &self.rpc;
        check_range("rpc.timeout_ms", rpc.timeout_ms, 10, 600_000)?;
        check_range("rpc.concurrency_max", rpc.concurrency_max, 1, 1_024)?;
        check_range("rpc.queue_max", rpc.queue_max, 1, 1 << 20)?;
        check_range("rpc.in_flight_per_connection_max", rpc.in_flight_per_connection_max, 1, 1_024)?;
        check_range("rpc.breaker_failures", rpc.breaker_failures, 1, 1_000)?;
        check_range("rpc.breaker_open_ms", rpc.breaker_open_ms, 10, 3_600_000)?;
        check_range("rpc.data_bytes_max", rpc.data_bytes_max, 16, 16 << 20)?;
        check_range("rpc.response_bytes_max", rpc.response_bytes_max, 16, 64 << 20)?;
        check_range("rpc.handler_prefixes_max", rpc.handler_prefixes_max, 1, 4_096)?;
        check_range("rpc.handler_calls_max", rpc.handler_calls_max, 1, 1 << 20)?;
        let check_url = |key: &str, url: &str| {
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(())
            } else {
                Err(error(key, format!("`{url}` must be an http:// or https:// URL")))
            }
        };
        for route in &rpc.routes {
            check_url("rpc.routes.url", &route.url)?;
        }
        for (key, url) in [
            ("rpc.connect_url", &rpc.connect_url),
            ("rpc.subscribe_url", &rpc.subscribe_url),
            ("rpc.publish_url", &rpc.publish_url),
        ] {
            if let Some(url) = url {
                check_url(key, url)?;
            }
        }
        for namespace in &self.namespaces {
            if namespace.proxy_subscribe && rpc.subscribe_url.is_none() {
                return Err(error("namespaces.proxy_subscribe", "needs rpc.subscribe_url"));
            }
            if namespace.proxy_publish && rpc.publish_url.is_none() {
                return Err(error("namespaces.proxy_publish", "needs rpc.publish_url"));
            }
        }
        if rpc.connect_headers.iter().any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase())) {
            return Err(error("rpc.connect_headers", "header names must be non-empty and lower case"));
        }
        Ok(())
    }

    fn validate_sockjs(&self) -> Result<(), ConfigError> {
        let s = &self.sockjs;
        let mut prefixes = Vec::new();
        for (key, enabled, prefix) in
            [("sockjs.prefix", s.enabled, &s.prefix), ("sockjs.jii_prefix", s.jii_enabled, &s.jii_prefix)]
        {
            let path_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~');
            if !prefix.starts_with('/') || prefix.ends_with('/') || !prefix.bytes().all(path_byte) {
                return Err(error(key, format!("`{prefix}` must be a path like /sockjs (no trailing slash)")));
            }
            let taken = ["/ws", "/sse", "/poll", "/cmd", "/health", "/demo", "/echo", "/close"];
            let test_paths = ["/disabled_websocket_echo", "/cookie_needed_echo"];
            if taken.iter().chain(&test_paths).any(|path| prefix == path || prefix.starts_with(&format!("{path}/"))) {
                return Err(error(key, format!("`{prefix}` is a path the server already serves")));
            }
            if enabled {
                prefixes.push((key, prefix));
            }
        }
        if let [(_, a), (key, b)] = prefixes[..] {
            if a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/")) {
                return Err(error(key, "must differ from sockjs.prefix (neither may contain the other)"));
            }
        }
        let url = &s.client_url;
        if !(url.starts_with('/') || url.starts_with("http://") || url.starts_with("https://"))
            || url.bytes().any(|b| b <= b' ' || matches!(b, b'"' | b'<' | b'>' | b'\\' | 0x7f))
        {
            return Err(error(
                "sockjs.client_url",
                "must be an http(s) URL or a path starting with / (no quotes, <, > or spaces)",
            ));
        }
        check_range("sockjs.heartbeat_interval_ms", s.heartbeat_interval_ms, 100, 3_600_000)?;
        check_range("sockjs.response_limit_bytes", s.response_limit_bytes, 1024, 1 << 30)?;
        check_range("sockjs.sessions_max", s.sessions_max, 1, 100_000_000)?;
        check_range("sockjs.pending_messages_max", s.pending_messages_max, 1, 1 << 20)?;
        check_range("sockjs.pending_bytes_max", s.pending_bytes_max, 1024, 1 << 30)?;
        Ok(())
    }

    /// The limits against abuse (`docs/configuration.md`, "Limits against abuse").
    fn validate_abuse_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        check_range("limits.connections_per_ip_max", l.connections_per_ip_max, 0, 100_000_000)?;
        for (index, network) in l.ip_limits_exempt.iter().enumerate() {
            IpNetwork::parse(network).map_err(|why| error(&format!("limits.ip_limits_exempt[{index}]"), why))?;
        }
        check_range("limits.connections_per_user_max", l.connections_per_user_max, 0, 100_000_000)?;
        for (key, rate) in [
            ("limits.handshakes_per_ip", l.handshakes_per_ip()),
            ("limits.client_commands", l.client_commands()),
            ("limits.client_publications", l.client_publications()),
            ("limits.user_publications", l.user_publications()),
        ] {
            check_range(&format!("{key}_per_s"), rate.per_s, 0, BURST_MAX)?;
            let burst_min = u32::from(rate.per_s > 0);
            check_range(&format!("{key}_burst"), rate.burst, burst_min, BURST_MAX)?;
        }
        if l.client_commands_per_s > 0 && (l.client_commands_burst as usize) < l.channels_per_connection_max {
            return Err(error(
                "limits.client_commands_burst",
                format!(
                    "must be at least limits.channels_per_connection_max ({}), so a client can subscribe to all its channels at once",
                    l.channels_per_connection_max
                ),
            ));
        }
        // Pushes wrap data two levels deeper, and parsers such as Ruby's
        // (100) and serde_json's (128) stop not far above.
        check_range("limits.json_depth_max", l.json_depth_max, 1, 100)?;
        check_range("limits.admin_auth_failures_max", l.admin_auth_failures_max, 1, 1_000)?;
        check_range("limits.admin_unauthenticated_max", l.admin_unauthenticated_max, 1, 65_536)?;
        if l.admin_unauthenticated_max >= l.admin_connections_max {
            return Err(error(
                "limits.admin_unauthenticated_max",
                format!("must be below limits.admin_connections_max ({})", l.admin_connections_max),
            ));
        }
        let t = &self.timeouts;
        check_range("timeouts.message_timeout_ms", t.message_timeout_ms, 100, 3_600_000)?;
        check_range("timeouts.admin_auth_timeout_ms", t.admin_auth_timeout_ms, 100, 600_000)?;
        check_range("timeouts.presence_counts_interval_ms", t.presence_counts_interval_ms, 10, 600_000)?;
        Ok(())
    }

    fn validate_cluster(&mut self) -> Result<(), ConfigError> {
        let c = &mut self.cluster;
        for (index, url) in c.redis.iter().enumerate() {
            let key = format!("cluster.redis[{index}]");
            if !url.starts_with("redis://") {
                return Err(error(&key, format!("`{url}` must be a redis://HOST:PORT URL (TLS is not supported)")));
            }
            redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| error(&key, format!("`{url}` is not a Redis URL: {e}")))?;
        }
        let unique: std::collections::HashSet<&String> = c.redis.iter().collect();
        if unique.len() != c.redis.len() {
            return Err(error("cluster.redis", "lists the same URL twice"));
        }
        check_range("cluster.redis (count)", c.redis.len(), 0, 64)?;
        match &c.node_id {
            Some(id) if id.is_empty() || id.len() > 64 || !id.bytes().all(node_id_byte_allowed) => {
                return Err(error("cluster.node_id", "must be 1-64 bytes of letters, digits and _ - ."));
            }
            Some(_) => {}
            None => {
                c.node_id = Some(format!("{:012x}", crate::util::random_u64() >> 16));
                c.node_id_generated = true;
            }
        }
        if c.key_prefix.is_empty() || c.key_prefix.len() > 64 || !c.key_prefix.bytes().all(node_id_byte_allowed) {
            return Err(error("cluster.key_prefix", "must be 1-64 bytes of letters, digits and _ - ."));
        }
        check_range("cluster.heartbeat_interval_ms", c.heartbeat_interval_ms, 50, 60_000)?;
        check_range("cluster.node_timeout_ms", c.node_timeout_ms, 200, 3_600_000)?;
        if c.node_timeout_ms < 2 * c.heartbeat_interval_ms {
            return Err(error("cluster.node_timeout_ms", "must be at least twice cluster.heartbeat_interval_ms"));
        }
        check_range("cluster.request_timeout_ms", c.request_timeout_ms, 100, 600_000)?;
        check_range("cluster.connect_timeout_ms", c.connect_timeout_ms, 100, 600_000)?;
        check_range("cluster.reconnect_backoff_max_ms", c.reconnect_backoff_max_ms, 100, 600_000)?;
        check_range("cluster.requests_in_flight_max", c.requests_in_flight_max, 16, 10_000_000)?;
        check_range("cluster.channel_meta_ttl_ms", c.channel_meta_ttl_ms, 60_000, 365 * 24 * 3600 * 1000)?;
        check_range("cluster.catch_up_buffer_max", c.catch_up_buffer_max, 16, 10_000_000)?;
        check_range("cluster.subscriber_counts_interval_ms", c.subscriber_counts_interval_ms, 10, 60_000)?;
        Ok(())
    }

    /// `[metrics]`, `[api]` and `[log]`.
    fn validate_edge(&self) -> Result<(), ConfigError> {
        match (&self.api.listen, &self.api.key) {
            (Some(_), None) => return Err(error("api.key", "required when api.listen is set")),
            (_, Some(key)) if key.len() < 16 => return Err(error("api.key", "must be at least 16 bytes")),
            _ => {}
        }
        for (key, address) in [("metrics.listen", self.metrics.listen), ("api.listen", self.api.listen)] {
            if address.is_some_and(|a| a == self.listen && a.port() != 0) {
                return Err(error(key, "must differ from `listen` (the public port)"));
            }
        }
        if let (Some(metrics), Some(api)) = (self.metrics.listen, self.api.listen) {
            if metrics == api && api.port() != 0 {
                return Err(error("api.listen", "must differ from metrics.listen"));
            }
        }
        check_range("log.warnings_per_second_max", self.log.warnings_per_second_max, 1, 100_000)?;
        Ok(())
    }

    /// Names the cluster this node belongs to: processes with the same Redis
    /// list and key prefix are one cluster (and may share a listen address).
    /// None on a single node.
    pub fn cluster_id(&self) -> Option<String> {
        use sha2::Digest;
        if !self.cluster.enabled() {
            return None;
        }
        let mut hash = sha2::Sha256::new();
        hash.update(self.cluster.key_prefix.as_bytes());
        for url in &self.cluster.redis {
            hash.update([0u8]);
            hash.update(url.as_bytes());
        }
        Some(crate::util::hex(&hash.finalize()[..8]))
    }

    /// The cluster node id (set by `validate`; empty when not a cluster member).
    pub fn node_id(&self) -> &str {
        self.cluster.node_id.as_deref().unwrap_or("")
    }

    /// The namespace that governs `channel`: the longest matching prefix.
    pub fn namespace_for(&self, channel: &str) -> &Namespace {
        namespace_for(&self.namespaces, channel)
    }
}

/// Longest-prefix match; the catch-all guarantees a match after `validate`.
pub fn namespace_for<'a>(namespaces: &'a [Namespace], channel: &str) -> &'a Namespace {
    namespaces.iter().filter(|n| channel.starts_with(n.prefix.as_str())).max_by_key(|n| n.prefix.len()).unwrap_or_else(
        || {
            // validate() always adds a catch-all; reaching here is a bug.
            debug_assert!(false, "no catch-all namespace");
            &namespaces[0]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let mut config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.namespace_for("web_chat").prefix, "web_");
        assert!(config.namespace_for("web_chat").client_publish);
        assert_eq!(config.namespace_for("news").prefix, "");
        assert!(!config.namespace_for("news").client_publish);
        assert!(config.namespace_for("track_room").join_leave);
    }

    #[test]
    fn toml_overrides_and_unknown_keys() {
        let config =
            Config::from_toml("listen = \"0.0.0.0:9000\"\nshards = 2\n[limits]\noutbox_bytes_max = 2000000\n").unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.shards, 2);
        assert_eq!(config.limits.outbox_bytes_max, 2_000_000);
        assert_eq!(config.limits.http_headers_max, Limits::default().http_headers_max);

        let error = Config::from_toml("[limits]\noutbox_byte_max = 1\n").unwrap_err();
        assert!(error.0.contains("outbox_byte_max"), "{error}");
        let error = Config::from_toml("shards = \"two\"\n").unwrap_err();
        assert!(error.0.contains("shards"), "{error}");
        let error = Config::from_toml("admin = \"http://x\"\n").unwrap_err();
        assert!(error.0.contains("unix:"), "{error}");
    }

    #[test]
    fn validate_names_the_key() {
        let mut config = Config::default();
        config.limits.outbox_bytes_max = 10;
        assert!(config.validate().unwrap_err().0.contains("limits.outbox_bytes_max"));

        let mut config = Config { admin: AdminAddress::Tcp("127.0.0.1:1".parse().unwrap()), ..Config::default() };
        assert!(config.validate().unwrap_err().0.contains("admin_key"));

        let mut config = Config::default();
        config.limits.publication_data_bytes_max = 4 << 20;
        assert!(config.validate().unwrap_err().0.contains("admin_frame_bytes_max"));

        let mut config = Config::default();
        config.namespaces.push(Namespace { prefix: "web_".into(), ..Namespace::catch_all() });
        assert!(config.validate().unwrap_err().0.contains("namespaces[5].prefix"));

        // TCP_NOTSENT_LOWAT: 0 leaves the kernel's default; a tiny value would
        // wake the shard for every few hundred bytes.
        let mut config = Config::default();
        config.limits.socket_unsent_bytes_max = 0;
        assert!(config.validate().is_ok());
        config.limits.socket_unsent_bytes_max = 100;
        assert!(config.validate().unwrap_err().0.contains("limits.socket_unsent_bytes_max"));
    }

    #[test]
    fn abuse_limits_name_their_keys() {
        let refused = |edit: fn(&mut Config)| {
            let mut config = Config::default();
            edit(&mut config);
            config.validate().unwrap_err().0
        };
        assert!(
            refused(|c| c.limits.ip_limits_exempt.push("10.0.0.0/40".into())).contains("limits.ip_limits_exempt[2]")
        );
        assert!(refused(|c| c.limits.client_commands_burst = 0).contains("limits.client_commands_burst"));
        assert!(refused(|c| c.limits.client_commands_burst = 10).contains("channels_per_connection_max"));
        assert!(refused(|c| c.limits.user_publications_per_s = 2_000_000).contains("limits.user_publications_per_s"));
        assert!(refused(|c| c.limits.json_depth_max = 0).contains("limits.json_depth_max"));
        assert!(refused(|c| c.limits.admin_unauthenticated_max = 256).contains("limits.admin_unauthenticated_max"));
        assert!(refused(|c| c.timeouts.message_timeout_ms = 1).contains("timeouts.message_timeout_ms"));
        // 0 turns a rate or a count off.
        let mut config = Config::default();
        config.limits.client_commands_per_s = 0;
        config.limits.client_commands_burst = 0;
        config.limits.connections_per_ip_max = 0;
        config.validate().unwrap();
    }

    #[test]
    fn sockjs_settings_name_their_key() {
        let mut config = Config::from_toml("[sockjs]\nprefix = \"/rt\"\nheartbeat_interval_ms = 1000\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.sockjs.prefix, "/rt");
        assert!(config.sockjs.enabled && config.sockjs.jii_enabled);
        for (toml, key) in [
            ("prefix = \"sockjs\"", "sockjs.prefix"),
            ("prefix = \"/sockjs/\"", "sockjs.prefix"),
            ("prefix = \"/ws\"", "sockjs.prefix"),
            ("jii_prefix = \"/sockjs\"", "sockjs.jii_prefix"),
            ("jii_prefix = \"/sockjs/comet\"", "sockjs.jii_prefix"),
            ("client_url = \"javascript:x\"", "sockjs.client_url"),
            ("client_url = \"/a\\\"b\"", "sockjs.client_url"),
            ("response_limit_bytes = 10", "sockjs.response_limit_bytes"),
            ("pending_bytes_max = 512", "sockjs.pending_bytes_max"),
        ] {
            let mut config = Config::from_toml(&format!("[sockjs]\n{toml}\n")).unwrap();
            let error = config.validate().unwrap_err();
            assert!(error.0.contains(key), "{toml}: {error}");
        }
        // A disabled Jii service may share nothing, so its prefix is not compared.
        let mut config = Config::from_toml("[sockjs]\njii_enabled = false\njii_prefix = \"/sockjs\"\n").unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn edge_sections() {
        let mut config = Config::from_toml(
            "[metrics]\nlisten = \"127.0.0.1:9100\"\n[api]\nlisten = \"127.0.0.1:9101\"\nkey = \"0123456789abcdef\"\n\
             [log]\nformat = \"json\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.metrics.listen.map(|a| a.port()), Some(9100));

        let mut config = Config::from_toml("[api]\nlisten = \"127.0.0.1:9101\"\n").unwrap();
        assert!(config.validate().unwrap_err().0.contains("api.key"));
        let mut config = Config::from_toml("[api]\nlisten = \"127.0.0.1:9101\"\nkey = \"short\"\n").unwrap();
        assert!(config.validate().unwrap_err().0.contains("api.key"));
        let error = Config::from_toml("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(error.0.contains("format"), "{error}");
        let mut config = Config::from_toml("[log]\nwarnings_per_second_max = 0\n").unwrap();
        assert!(config.validate().unwrap_err().0.contains("log.warnings_per_second_max"));
    }

    #[test]
    fn custom_namespaces_get_a_catch_all() {
        let mut config = Config::from_toml("[[namespaces]]\nprefix = \"chat_\"\nclient_publish = true\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.namespaces.len(), 2);
        assert!(config.namespace_for("chat_1").client_publish);
        assert!(!config.namespace_for("web_1").client_publish);
    }

    #[test]
    fn admin_address_parsing() {
        assert_eq!(AdminAddress::parse("unix:/tmp/a.sock").unwrap(), AdminAddress::Unix("/tmp/a.sock".into()));
        assert_eq!(AdminAddress::parse("tcp:127.0.0.1:9").unwrap(), AdminAddress::Tcp("127.0.0.1:9".parse().unwrap()));
        assert!(AdminAddress::parse("tcp:nope").is_err());
        assert!(AdminAddress::parse("unix:").is_err());
    }
}
