//! A shard: one glommio executor on one core (pinned when `pin_shards`),
//! owning its listener, its connections (a `Slab` of `Connection` state
//! machines and their sockets), its channel index, the channels and users it
//! owns, and its end of the bus. This is the only code that touches sockets.
//!
//! One task per shard runs the event loop (`Shard::tick`): bus messages,
//! socket readiness from the I/O driver (`io`: io_uring multishot poll and
//! accept, or edge-triggered epoll), pending fan-outs and the timer sweep,
//! each with a budget per tick; it sleeps only in the I/O driver.
//! Because that one task is the only one that mutates connections and
//! subscriptions, no locks or `RefCell` juggling across awaits are needed;
//! admin tasks only send bus messages and await replies.
//!
//! The shard is the driver: it reads into its scratch buffer, steps the
//! connection through the bytes, hands requests and messages to `app`, and
//! applies the connection's verdicts (`conn.rs`). `cluster.rs` follows this
//! shard's channels in Redis in cluster mode.

mod cluster;
mod conn;
pub mod io;
mod sweep;
pub mod sys;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::bus::limiter::AddressKey;
use crate::bus::message::ShardStats;
use crate::bus::metrics::{LatencyHistogram, RefusalCounts, ShardMetrics, Transport};
use crate::bus::Endpoint;
use crate::config::Config;
use crate::connection::http::{HttpRole, SessionKind};
use crate::connection::Phase;
use crate::connection::{Connection, Marks};
use crate::hub::channel::OwnedChannels;
use crate::hub::index::{ConnKey, LocalChannelId, LocalIndex};
use crate::hub::publication::Publication;
use crate::hub::user::{OwnedUsers, UserLimits};
use crate::limits::{ClientRates, LimitRefusals};
use crate::tls::TlsSession;
use kometa_protocol::token::Verifier;

/// Bytes read per `recv` into the shard's scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Epoll events collected per tick.
const EVENTS_PER_TICK: usize = 512;
/// Bus messages handled per tick.
const BUS_MESSAGES_PER_TICK: usize = 4096;
/// Connections accepted per tick.
const ACCEPTS_PER_TICK: usize = 256;
/// Bytes read from one connection per tick before others get a turn.
const READ_BYTES_PER_CONN_PER_TICK: usize = 256 * 1024;
/// A tick spends at most this long writing fan-outs, so accepts, pings,
/// admin replies and other channels get their turn between chunks of a big
/// broadcast (invariant 6).
const FANOUT_TICK_BUDGET: Duration = Duration::from_micros(1000);
/// Subscribers visited between checks of the tick budget.
const FANOUT_CHUNK: usize = 256;
/// Consecutive publications of one channel written together (one gathered
/// write per subscriber) when they queue up behind a slow fan-out.
const FANOUT_BATCH_MAX: usize = 16;
/// Connections examined by the timer sweep per tick.
const SWEEP_CONNS_PER_TICK: usize = 8192;
/// Descriptors kept free for listeners, the admin socket and epoll wake-ups.
pub const DESCRIPTORS_RESERVED: usize = 64;

/// Epoll tokens: connection tokens are `generation << 32 | key`; these two
/// use keys no slab ever reaches.
const TOKEN_LISTENER: u64 = u32::MAX as u64;
const TOKEN_WAKEUP: u64 = (u32::MAX - 1) as u64;
const TOKEN_TICKER: u64 = (u32::MAX - 2) as u64;
/// A shard about to sleep returns freed memory to the OS at most this often
/// (see `sys::return_freed_memory`).
const RETURN_MEMORY_INTERVAL: Duration = Duration::from_millis(1000);

pub use crate::bus::Shared;

/// An accepted socket and its session, or (`fd` None) an HTTP session
/// that outlives the requests serving it.
///
/// Beside the socket: the client's rate limits (in the 4 bytes after the
/// descriptor, which would be padding otherwise) and its address key.
pub struct Conn {
    pub fd: Option<OwnedFd>,
    /// `limits.client_commands_per_s` and `client_publications_per_s`.
    pub rates: ClientRates,
    /// The peer's address under the per-address limits (None: exempt, or
    /// no socket); released when the socket closes.
    pub peer: Option<AddressKey>,
    pub state: Connection,
    /// TLS between the socket and the connection (the listener has `tls.*`).
    pub tls: Option<Box<TlsSession>>,
}

impl Conn {
    /// The socket, or -1 for a socket-less HTTP session (any syscall on it
    /// fails with EBADF, so a bug cannot touch another descriptor).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Output waits for the socket: in the outbox, or sealed by TLS.
    pub fn has_output(&self) -> bool {
        self.state.has_output() || self.tls.as_ref().is_some_and(|tls| !tls.held().is_empty())
    }
}

/// Publications of one channel (in offset order) being written to this
/// shard's subscribers of it, possibly over several ticks.
struct PendingFanout {
    publications: Vec<Arc<Publication>>,
    channel: LocalChannelId,
    /// Next subscriber slot to visit.
    next_slot: usize,
    /// What the owners added to this shard's fan-out backlog for these.
    accounted: usize,
}

/// Running counters (see `ShardStats` for their meaning).
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub publications: u64,
    pub slow_consumers_closed: u64,
    pub protocol_errors: u64,
    pub websockets: u64,
    /// Connections with a verified token (gauge).
    pub authenticated: u64,
    /// HTTP sessions on this shard (gauge).
    pub http_sessions: u64,
    /// Publications this shard refused as owner because a subscriber shard
    /// was past `limits.fanout_backlog_max`.
    pub publications_refused: u64,
    /// TLS handshakes completed and failed.
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    /// Peers refused by a limit against abuse, by kind.
    pub limit_refusals: LimitRefusals,
    /// Publications and user messages written or queued to connections.
    pub deliveries: u64,
    /// WebSocket upgrades, SSE sessions, long-poll sessions started
    /// (`bus::metrics::HANDSHAKE_LABELS`).
    pub handshakes: [u64; 4],
    /// Publications refused to this shard's clients, by reason.
    pub refusals: RefusalCounts,
    /// From an owner's acceptance of a publication to its last write on
    /// this shard.
    pub publish_to_write: LatencyHistogram,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Running,
    /// Shutdown began: no accepts, clients told 1001, outboxes draining.
    Draining {
        deadline_ms: u64,
    },
    Finished,
}

/// What a tick leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// More work is ready; yield and tick again.
    Busy,
    /// Nothing to do until an event (the sweep ticker is one).
    Idle,
    /// Shutdown is complete.
    Finished,
}

pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub shared: Arc<Shared>,
    pub(crate) started: Instant,
    /// Milliseconds since the shard started; updated once per tick.
    pub now_ms: u64,
    /// Where readiness comes from: io_uring or epoll (`io.driver`).
    pub(crate) driver: io::Driver,
    /// Wakes the shard every `sweep_interval_ms` for the timer sweep (and to
    /// resume accepting after an EMFILE pause).
    pub(crate) ticker: sys::Ticker,
    pub(crate) listener: Option<OwnedFd>,
    /// After EMFILE, accepting resumes at this time.
    pub(crate) accept_paused_until_ms: Option<u64>,
    pub(crate) conns: Slab<Conn>,
    pub(crate) next_generation: u32,
    pub(crate) index: LocalIndex,
    pub(crate) owned: OwnedChannels,
    /// Users this shard owns (status, inbox, revocations).
    pub(crate) users: OwnedUsers,
    /// This shard's registered connections of each user, for user messages.
    pub(crate) users_local: HashMap<Arc<str>, Vec<ConnKey>>,
    pub(crate) verifier: Verifier,
    pub bus: Endpoint,
    /// Cluster mode: following channels and users in Redis (None on a single node).
    pub(crate) cluster: Option<cluster::ClusterSide>,
    /// The backend thread's bus endpoint (`[rpc]` configured).
    pub(crate) backend: Option<usize>,
    /// Unanswered `rpc` calls per connection: (generation, count).
    pub(crate) rpc_in_flight: HashMap<ConnKey, (u32, u32)>,
    fanouts: VecDeque<PendingFanout>,
    /// Connections to revisit: input left unread at a budget, or a paused
    /// connection whose reply arrived.
    pub(crate) ready: VecDeque<(ConnKey, u32)>,
    /// Reads land here; only a partial frame is copied to the connection.
    pub(crate) scratch: Vec<u8>,
    /// TLS settings for new connections and the `Shared::tls_generation`
    /// they came with (re-read when it moves: a reload).
    pub(crate) tls_config: Option<Arc<rustls::ServerConfig>>,
    pub(crate) tls_generation: u64,
    /// The `Shared::config_generation` of `config`.
    config_generation: u64,
    /// Decrypted input of one read (TLS), before it is fed to the connection.
    pub(crate) tls_plaintext: Vec<u8>,
    /// Records sealed for one write (TLS); what the socket does not take
    /// moves to the session.
    pub(crate) tls_sealed: Vec<u8>,
    pub(crate) events: Vec<io::IoEvent>,
    pub metrics: Metrics,
    /// Shards owning channels and users (the bus also has the admin gateway).
    shard_count: usize,
    lifecycle: Lifecycle,
    pub(crate) next_sweep_ms: u64,
    pub(crate) sweep_cursor: usize,
    pub(crate) next_channel_sweep_ms: u64,
    /// Owned channels whose presence counts wait for their next push.
    pub(crate) presence_counts_due: Vec<Arc<str>>,
    /// When the earliest of them is due (u64::MAX: none).
    pub(crate) presence_counts_next_ms: u64,
    /// SockJS sessions here, by the ids their clients chose.
    pub(crate) sockjs: crate::connection::sockjs::Registry,
}

impl Shard {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        shared: Arc<Shared>,
        listener: OwnedFd,
        bus: Endpoint,
    ) -> std::io::Result<Shard> {
        let (mut driver, fallback) = io::Driver::new(config.io.driver)?;
        if let (Some(reason), 0) = (fallback, id) {
            tracing::warn!("{reason}");
        }
        driver.start_accepting(listener.as_raw_fd(), TOKEN_LISTENER)?;
        driver.watch_readable(bus.wakeup().fd(), TOKEN_WAKEUP)?;
        let ticker = sys::Ticker::new(Duration::from_millis(config.timeouts.sweep_interval_ms))?;
        driver.watch_readable(ticker.fd(), TOKEN_TICKER)?;
        tracing::debug!(shard = id, driver = driver.name(), "I/O driver");
        // After the shards come the admin gateway's endpoint, in cluster
        // mode the cluster gateway's, and with `[rpc]` the backend thread's.
        let gateways = 1 + usize::from(config.cluster.enabled()) + usize::from(config.rpc.enabled());
        let shard_count = bus.shard_count() - gateways;
        let cluster = config.cluster.enabled().then(|| cluster::ClusterSide::new(shard_count + 1));
        let backend = config.rpc.enabled().then(|| bus.shard_count() - 1);
        let channels_max = config.limits.channels_max.div_ceil(shard_count);
        let user_limits = UserLimits {
            inbox_messages_max: config.inbox.messages_max,
            inbox_ttl_ms: config.inbox.ttl_ms,
            inbox_users_max: config.inbox.users_max.div_ceil(shard_count),
            tracked_max: config.users.tracked_max.div_ceil(shard_count),
            last_seen_ttl_ms: config.users.last_seen_ttl_ms,
            connections_max: config.limits.connections_per_user_max,
        };
        let verifier = Verifier::new(config.token_secret.as_deref(), config.token_secret_previous.as_deref());
        let tls_generation = shared.tls_generation.load(Ordering::Acquire);
        let config_generation = shared.config_generation.load(Ordering::Acquire);
        let tls_config = shared.tls.read().map(|tls| tls.clone()).unwrap_or(None);
        Ok(Shard {
            id,
            shared,
            started: Instant::now(),
            now_ms: 0,
            driver,
            ticker,
            listener: Some(listener),
            accept_paused_until_ms: None,
            conns: Slab::new(),
            next_generation: 1,
            index: LocalIndex::default(),
            owned: OwnedChannels::new(shard_count, channels_max),
            users: OwnedUsers::new(shard_count, user_limits),
            users_local: HashMap::new(),
            verifier,
            bus,
            cluster,
            backend,
            rpc_in_flight: HashMap::new(),
            fanouts: VecDeque::new(),
            ready: VecDeque::new(),
            scratch: vec![0; SCRATCH_BYTES],
            tls_config,
            tls_generation,
            config_generation,
            tls_plaintext: Vec::new(),
            tls_sealed: Vec::new(),
            events: Vec::with_capacity(EVENTS_PER_TICK),
            metrics: Metrics::default(),
            shard_count,
            lifecycle: Lifecycle::Running,
            next_sweep_ms: config.timeouts.sweep_interval_ms,
            sweep_cursor: 0,
            next_channel_sweep_ms: 0,
            presence_counts_due: Vec::new(),
            presence_counts_next_ms: u64::MAX,
            sockjs: Default::default(),
            config,
        })
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// A reload replaced the configuration: limits, namespaces, origins and
    /// timeouts apply from the next command, tokens from the next check.
    /// (What needs a restart was kept at its old value by the reload.)
    fn take_reloaded_config(&mut self) {
        self.config_generation = self.shared.config_generation.load(Ordering::Acquire);
        let Ok(config) = self.shared.config.read().map(|config| Arc::clone(&config)) else { return };
        self.verifier = Verifier::new(config.token_secret.as_deref(), config.token_secret_previous.as_deref());
        self.config = config;
    }

    pub fn is_draining(&self) -> bool {
        !matches!(self.lifecycle, Lifecycle::Running)
    }

    fn update_clock(&mut self) {
        self.now_ms = self.started.elapsed().as_millis() as u64;
    }

    /// One round of the event loop; never blocks.
    pub fn tick(&mut self) -> TickOutcome {
        self.update_clock();
        if self.lifecycle == Lifecycle::Finished {
            return TickOutcome::Finished;
        }
        if self.lifecycle == Lifecycle::Running && self.shared.shutting_down.load(Ordering::Acquire) {
            self.begin_shutdown();
        }

        if self.shared.config_generation.load(Ordering::Acquire) != self.config_generation {
            self.take_reloaded_config();
        }
        let mut work = self.receive_bus();
        work += self.poll_events();
        work += self.continue_ready();
        // Other shards start their part of a fan-out now, not after ours.
        self.bus.flush();
        work += self.run_fanouts();
        if self.now_ms >= self.next_sweep_ms {
            work += self.sweep();
        }
        self.push_due_presence_counts();
        if self.cluster.is_some() {
            self.cluster_tick();
        }
        let overflow_left = self.bus.flush();

        if let Lifecycle::Draining { deadline_ms } = self.lifecycle {
            if self.conns.is_empty() || self.now_ms >= deadline_ms {
                self.finish_shutdown();
                return TickOutcome::Finished;
            }
        }
        if self.accept_paused_until_ms.is_some_and(|until| self.now_ms >= until) {
            self.resume_accepting();
        }

        let pending = !self.fanouts.is_empty() || !self.ready.is_empty() || overflow_left || self.bus.has_inbound();
        if work > 0 || pending {
            return TickOutcome::Busy;
        }
        TickOutcome::Idle
    }

    /// `receive` holds the endpoint mutably, while handling a message needs
    /// the whole shard, so messages are drained into a batch first.
    fn receive_bus(&mut self) -> usize {
        let mut batch = Vec::new();
        self.bus.receive(BUS_MESSAGES_PER_TICK, |_, message| batch.push(message));
        let count = batch.len();
        for message in batch {
            self.handle_message(message);
        }
        count
    }

    fn poll_events(&mut self) -> usize {
        let mut events = std::mem::take(&mut self.events);
        if let Err(error) = self.driver.poll(&mut events, EVENTS_PER_TICK) {
            crate::limited!(ERROR, shard = self.id, %error, driver = self.driver.name(), "polling for readiness failed");
        }
        let count = events.len();
        for event in events.drain(..) {
            match event {
                io::IoEvent::Ready { token, flags } => match token {
                    TOKEN_LISTENER => self.accept_connections(),
                    TOKEN_WAKEUP => self.bus.wakeup().drain(),
                    TOKEN_TICKER => self.ticker.drain(),
                    _ => {
                        let key = (token & 0xFFFF_FFFF) as ConnKey;
                        let generation = (token >> 32) as u32;
                        self.connection_event(key, generation, flags);
                    }
                },
                io::IoEvent::Accepted(fd) => self.accepted(fd),
                io::IoEvent::AcceptFailed(error) => self.accept_failed(&error),
                io::IoEvent::WatchEnded { token } => self.rewatch(token),
            }
        }
        self.events = events;
        count
    }

    /// Puts a connection on the ready list for another turn.
    pub(crate) fn mark_ready(&mut self, key: ConnKey, generation: u32) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if conn.state.marks.contains(Marks::QUEUED) {
            return;
        }
        conn.state.marks.insert(Marks::QUEUED);
        self.ready.push_back((key, generation));
    }

    fn continue_ready(&mut self) -> usize {
        let turns = self.ready.len();
        for _ in 0..turns {
            let Some((key, generation)) = self.ready.pop_front() else { break };
            // A stale entry (the connection closed, its slot maybe reused)
            // finds no connection of its generation and does nothing.
            if let Some(conn) = self.conn_mut(key, generation) {
                conn.state.marks.remove(Marks::QUEUED);
            }
            self.resume_connection(key, generation);
        }
        turns
    }

    /// Queues a publication for this shard's subscribers of its channel,
    /// joining the previous one of the same channel when that has not
    /// started. `accounted` is its share of this shard's fan-out backlog.
    pub(crate) fn queue_fanout(&mut self, publication: Arc<Publication>, accounted: usize) {
        let Some(channel) = self.index.lookup(&publication.channel) else {
            self.settle_backlog(accounted);
            return;
        };
        if let Some(last) = self.fanouts.back_mut() {
            if last.channel == channel && last.next_slot == 0 && last.publications.len() < FANOUT_BATCH_MAX {
                last.publications.push(publication);
                last.accounted += accounted;
                return;
            }
        }
        self.fanouts.push_back(PendingFanout { publications: vec![publication], channel, next_slot: 0, accounted });
    }

    /// Deliveries written (or dropped): off this shard's backlog.
    fn settle_backlog(&self, accounted: usize) {
        if accounted > 0 {
            let backlog = &self.shared.fanout_backlog[self.id];
            let _ = backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(accounted)));
        }
    }

    /// Writes pending publications to subscribers for at most
    /// `FANOUT_TICK_BUDGET`; a big channel continues next tick. Each
    /// subscriber gets every publication of a batch in one gathered write.
    fn run_fanouts(&mut self) -> usize {
        if self.fanouts.is_empty() {
            return 0;
        }
        let started = Instant::now();
        let mut delivered = 0;
        let mut targets: Vec<(ConnKey, u64, bool)> = Vec::with_capacity(FANOUT_CHUNK);
        let mut frames: Vec<Arc<Publication>> = Vec::with_capacity(FANOUT_BATCH_MAX);
        while let Some(fanout) = self.fanouts.front_mut() {
            targets.clear();
            let batch = fanout.publications.len();
            let finished = match self.index.get(fanout.channel) {
                // The channel entry may have been dropped and its id reused.
                Some(channel) if channel.name == fanout.publications[0].channel => {
                    let slots = channel.subscribers.capacity();
                    while fanout.next_slot < slots && targets.len() < FANOUT_CHUNK {
                        if let Some(subscriber) = channel.subscribers.get(fanout.next_slot) {
                            targets.push((subscriber.conn, subscriber.after_offset, subscriber.presence_counts));
                        }
                        fanout.next_slot += 1;
                    }
                    fanout.next_slot >= slots
                }
                _ => true,
            };
            let publications = if finished {
                let done = self.fanouts.pop_front();
                self.settle_backlog(done.as_ref().map_or(0, |f| f.accounted));
                done.map(|f| f.publications).unwrap_or_default()
            } else {
                fanout.publications.clone()
            };
            for &(key, after_offset, presence_counts) in &targets {
                frames.clear();
                // Offset 0: an event outside the sequence (presence; counts
                // only where asked for). The rest only if newer than the
                // subscription (exactly once).
                let wanted = |p: &&Arc<Publication>| {
                    (p.offset == 0 && (presence_counts || !p.presence_counts)) || p.offset > after_offset
                };
                frames.extend(publications.iter().filter(wanted).cloned());
                if frames.is_empty() {
                    continue;
                }
                self.deliver_all(key, &frames);
            }
            if finished {
                // This shard's last write of these publications.
                let now = Instant::now();
                for publication in publications.iter().filter(|p| p.offset > 0) {
                    let elapsed_us = now.saturating_duration_since(publication.accepted_at).as_micros();
                    self.metrics.publish_to_write.observe_us(u64::try_from(elapsed_us).unwrap_or(u64::MAX));
                }
            }
            delivered += targets.len() * batch;
            if started.elapsed() >= FANOUT_TICK_BUDGET {
                break;
            }
        }
        delivered
    }

    /// Counters and gauges for `STATS`.
    pub fn stats(&self) -> ShardStats {
        let outbox_bytes = self.conns.iter().map(|(_, conn)| conn.state.output_bytes() as u64).sum();
        ShardStats {
            shard: self.id,
            connections: self.conns.len() as u64,
            websockets: self.metrics.websockets,
            channels_local: self.index.len() as u64,
            channels_owned: self.owned.len() as u64,
            subscriptions: self.index.subscriptions() as u64,
            messages_in: self.metrics.messages_in,
            messages_out: self.metrics.messages_out,
            publications: self.metrics.publications,
            connections_accepted: self.metrics.connections_accepted,
            connections_refused: self.metrics.connections_refused,
            slow_consumers_closed: self.metrics.slow_consumers_closed,
            protocol_errors: self.metrics.protocol_errors,
            bus_overflowed: self.bus.overflowed_total,
            outbox_bytes,
            users_online: self.users.online() as u64,
            users_tracked: self.users.tracked() as u64,
            authenticated: self.metrics.authenticated,
            tls_handshakes: self.metrics.tls_handshakes,
            tls_failures: self.metrics.tls_failures,
            http_sessions: self.metrics.http_sessions,
            publications_refused: self.metrics.publications_refused,
            fanout_backlog: self.shared.fanout_backlog[self.id].load(Ordering::Relaxed) as u64,
            limit_refusals: self.metrics.limit_refusals,
        }
    }

    /// Figures for `/metrics`: the `STATS` counters plus sockets by
    /// transport, queue depths, history and inbox sizes. One pass over the
    /// slab, the owned channels and users (as `STATS` passes over the slab).
    pub fn metrics_snapshot(&self) -> ShardMetrics {
        let mut sockets = [0u64; 4];
        let (mut sessions_sse, mut sessions_long_poll, mut sessions_sockjs) = (0, 0, 0);
        for (_, conn) in &self.conns {
            let transport = match conn.state.phase() {
                Phase::Session => {
                    if let Some(HttpRole::Session(session)) = conn.state.http.as_deref() {
                        match session.kind {
                            SessionKind::Sse => sessions_sse += 1,
                            SessionKind::LongPoll => sessions_long_poll += 1,
                            SessionKind::SockJs => sessions_sockjs += 1,
                        }
                    }
                    continue;
                }
                Phase::WebSocket => Transport::WebSocket,
                Phase::Closing if conn.state.marks.contains(Marks::UPGRADED) => Transport::WebSocket,
                Phase::Stream => Transport::Sse,
                Phase::Polling => Transport::LongPoll,
                Phase::Http | Phase::Closing | Phase::Lingering => Transport::Http,
            };
            sockets[transport as usize] += 1;
        }
        let metrics = &self.metrics;
        ShardMetrics {
            stats: self.stats(),
            sockets,
            sessions_sse,
            sessions_long_poll,
            sessions_sockjs,
            handshakes: metrics.handshakes,
            deliveries: metrics.deliveries,
            refusals: metrics.refusals,
            bus_inbound: self.bus.inbound_len() as u64,
            bus_overflow: self.bus.overflow_len() as u64,
            history_publications: self.owned.iter().map(|c| c.history.len() as u64).sum(),
            inbox_messages: self.users.inbox_messages() as u64,
            inbox_users: self.users.inbox_users() as u64,
            publish_to_write: metrics.publish_to_write,
        }
    }

    fn begin_shutdown(&mut self) {
        tracing::info!(shard = self.id, connections = self.conns.len(), "shutting down");
        self.stop_accepting();
        self.lifecycle = Lifecycle::Draining { deadline_ms: self.now_ms + self.config.timeouts.shutdown_timeout_ms };
        let keys: Vec<(ConnKey, u32)> =
            self.conns.iter().map(|(key, conn)| (key as ConnKey, conn.state.generation())).collect();
        for (key, generation) in keys {
            self.close_for_shutdown(key, generation);
        }
    }

    fn finish_shutdown(&mut self) {
        let keys: Vec<ConnKey> = self.conns.iter().map(|(key, _)| key as ConnKey).collect();
        for key in keys {
            self.close_conn(key);
        }
        self.lifecycle = Lifecycle::Finished;
        tracing::debug!(shard = self.id, "shard finished");
    }

    pub(crate) fn stop_accepting(&mut self) {
        if let Some(listener) = self.listener.take() {
            self.driver.stop_accepting(listener.as_raw_fd(), TOKEN_LISTENER);
        }
    }

    pub(crate) fn pause_accepting(&mut self) {
        if let Some(listener) = &self.listener {
            self.driver.stop_accepting(listener.as_raw_fd(), TOKEN_LISTENER);
            self.accept_paused_until_ms = Some(self.now_ms + 100);
        }
    }

    fn resume_accepting(&mut self) {
        self.accept_paused_until_ms = None;
        if let Some(listener) = &self.listener {
            if let Err(error) = self.driver.start_accepting(listener.as_raw_fd(), TOKEN_LISTENER) {
                crate::limited!(WARN, shard = self.id, %error, "cannot start accepting again; retrying in 100 ms");
                self.accept_paused_until_ms = Some(self.now_ms + 100);
            }
        }
    }

    /// A watch that ended by itself (io_uring) is armed again while its
    /// descriptor is still in use.
    fn rewatch(&mut self, token: u64) {
        let result = match token {
            TOKEN_LISTENER => return,
            TOKEN_WAKEUP => self.driver.watch_readable(self.bus.wakeup().fd(), TOKEN_WAKEUP),
            TOKEN_TICKER => self.driver.watch_readable(self.ticker.fd(), TOKEN_TICKER),
            _ => {
                let (key, generation) = ((token & 0xFFFF_FFFF) as ConnKey, (token >> 32) as u32);
                let Some(fd) = self.conn_mut(key, generation).and_then(|conn| conn.fd.as_ref().map(AsRawFd::as_raw_fd))
                else {
                    return;
                };
                self.driver.watch_socket(fd, token)
            }
        };
        if let Err(error) = result {
            crate::limited!(ERROR, shard = self.id, %error, "cannot watch a descriptor again");
        }
    }
}

/// Runs a shard's event loop until shutdown completes.
/// The shard's executor runs no other task, so when idle the loop blocks
/// its thread in its I/O driver (epoll_wait on an outer set, or an
/// io_uring enter) instead of sleeping in glommio's reactor (a poll request
/// per sleep, a descriptor dup and a task switch: 50-75% more CPU per
/// handshake, measured).
pub async fn run(shard: Rc<RefCell<Shard>>) {
    // The shard's task is the only one on its executor and waits in its
    // own I/O driver, never in glommio's reactor: it does not yield to
    // glommio at all. It used to yield every 250 µs of busy work, and on a
    // heavily overloaded host (load average 30-120, 67 nodes on 2 CPUs,
    // docs/benchmarks.md "One million connections") glommio then parked in
    // io_uring_enter for minutes with the shard's task still runnable,
    // while the shard's own epoll set and ring held accepts, its ticker and
    // bus wake-ups that glommio does not watch.
    let (wakeup_index, shared, sweep_ms) = {
        let shard = shard.borrow();
        (shard.id, Arc::clone(&shard.shared), shard.config.timeouts.sweep_interval_ms)
    };
    let wakeup = &shared.wakeups[wakeup_index];
    let mut last_memory_return = Instant::now();
    loop {
        let outcome = shard.borrow_mut().tick();
        match outcome {
            TickOutcome::Finished => break,
            TickOutcome::Busy => {}
            TickOutcome::Idle => {
                wakeup.prepare_park();
                if shard.borrow().bus.has_inbound() {
                    wakeup.cancel_park();
                    continue;
                }
                if last_memory_return.elapsed() >= RETURN_MEMORY_INTERVAL {
                    sys::return_freed_memory();
                    last_memory_return = Instant::now();
                }
                // The ticker fires every sweep interval, so the timeout is a backstop.
                shard.borrow_mut().driver.wait(i32::try_from(sweep_ms * 2).unwrap_or(i32::MAX));
                wakeup.cancel_park();
            }
        }
    }
}
