//! The cross-shard bus: a full mesh of bounded lock-free queues, one per
//! ordered pair of shards, plus an eventfd per shard to wake it when parked.
//!
//! Only `Send` data crosses: commands for an owner, replies, and
//! reference-counted publications. Per (sender, receiver) pair the queue is
//! FIFO, which the resume logic relies on: an owner's subscribe reply to a
//! shard always arrives before any publication it assigned later.
//!
//! When a queue is full, messages wait in the sender's per-destination
//! overflow deque (order kept). Past half of `bus_overflow_max` the sender
//! reports itself overloaded: it refuses new publications and stops reading
//! client sockets until the backlog drains. Nothing is ever dropped.

pub mod backend;
pub mod cluster;
pub mod limiter;
pub mod message;
pub mod metrics;
pub mod query;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

pub use message::Message;

/// State shared by every thread of the process: counters the shards
/// update, flags the signal thread and gateways set, wake-ups.
pub struct Shared {
    /// Open public connections over all shards.
    pub connections: AtomicUsize,
    /// Effective cap: `connections_max`, lowered to what the open-files
    /// limit allows.
    pub connections_max: usize,
    /// Per shard: deliveries queued but not yet written. Owners refuse new
    /// publications for a shard past `limits.fanout_backlog_max`.
    pub fanout_backlog: Box<[AtomicUsize]>,
    /// Set once by the signal handler thread.
    pub shutting_down: AtomicBool,
    /// Set when every shard has finished: the admin gateway stops.
    pub gateway_stop: AtomicBool,
    /// HTTP sessions over all shards (bounded by `limits.http_sessions_max`).
    pub http_sessions: AtomicUsize,
    /// SockJS sessions over all shards (bounded by `sockjs.sessions_max`).
    pub sockjs_sessions: AtomicUsize,
    /// One per shard, to wake them (shutdown, bus).
    pub wakeups: Arc<[Wakeup]>,
    /// Cluster mode: true while any Redis is unreachable (for
    /// `cluster.on_redis_down = "refuse"` and /health).
    pub cluster_degraded: AtomicBool,
    /// Cluster mode: the cluster part of /health (JSON), kept by the gateway.
    pub cluster_health: std::sync::Mutex<String>,
    /// TLS settings for new connections (`tls.*`); replaced on reload.
    pub tls: std::sync::RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Bumped when `tls` is replaced, so shards re-read it only then.
    pub tls_generation: std::sync::atomic::AtomicU64,
    /// The live configuration; replaced by a reload (SIGHUP, admin RELOAD).
    pub config: std::sync::RwLock<Arc<crate::config::Config>>,
    /// Bumped when `config` is replaced: shards and the admin gateway take
    /// the new one at their next turn.
    pub config_generation: std::sync::atomic::AtomicU64,
    /// Connections and handshakes per client address, publications per
    /// user: limits kept for the whole process.
    pub limiter: limiter::Limiter,
    /// Refusals by the admin gateway's limits (AUTH), for STATS.
    pub admin_refusals: crate::limits::SharedRefusals,
    /// `rpc` method prefixes that admin connections handle (HANDLE), each
    /// with the number of connections handling it. Written by the admin
    /// gateway, read by the backend thread to route a call.
    pub rpc_handler_prefixes: std::sync::RwLock<std::collections::HashMap<Box<str>, usize>>,
    /// Backend calls answered, by kind, route and outcome (`/metrics`).
    pub backend_calls: backend::BackendCallCounts,
}

/// Wakes one shard's event loop through an eventfd in its epoll set.
#[derive(Debug)]
pub struct Wakeup {
    eventfd: OwnedFd,
    /// Set by the shard just before it sleeps; a sender that sees it set
    /// clears it and writes the eventfd. Only the first sender pays the syscall.
    parked: AtomicBool,
}

impl Wakeup {
    pub fn new() -> std::io::Result<Wakeup> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wakeup { eventfd, parked: AtomicBool::new(false) })
    }

    pub fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Wakes the shard if it is parked. Call after publishing to its queue.
    pub fn wake(&self) {
        // Pairs with the fence in `prepare_park`: either the shard sees our
        // message when it re-checks its queues, or we see `parked`.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.signal();
        }
    }

    /// Wakes the shard whether or not it is parked (shutdown).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter
        // saturated) means a wake-up is already pending, which is what we want.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Announces that the shard is about to sleep. The caller must re-check
    /// its queues afterwards and call `cancel_park` if any has work.
    pub fn prepare_park(&self) {
        self.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub fn cancel_park(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Resets the eventfd counter after a wake-up.
    pub fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN when already drained.
        unsafe { libc::read(self.fd(), (&mut value as *mut u64).cast(), 8) };
        self.parked.store(false, Ordering::Relaxed);
    }
}

/// One shard's end of the mesh.
pub struct Endpoint {
    shard: usize,
    /// `senders[d]`: queue to shard d (None for ourselves).
    senders: Vec<Option<Sender<Message>>>,
    /// `receivers[s]`: queue from shard s (None for ourselves).
    receivers: Vec<Option<Receiver<Message>>>,
    wakeups: Arc<[Wakeup]>,
    /// Messages to ourselves, handled in the same loop as remote ones.
    local: VecDeque<Message>,
    /// Per destination: messages waiting because its queue was full.
    overflow: Vec<VecDeque<Message>>,
    overflow_max: usize,
    /// Round-robin start for receiving, so no sender starves the others.
    next_source: usize,
    /// Destinations sent to since the last `flush`, still to be woken.
    unwoken: Vec<bool>,
    /// Total messages that ever went through overflow (stats).
    pub overflowed_total: u64,
}

/// Builds the mesh: one endpoint per shard, to be moved onto its thread.
pub fn mesh(
    shard_count: usize,
    queue_capacity: usize,
    overflow_max: usize,
) -> std::io::Result<(Vec<Endpoint>, Arc<[Wakeup]>)> {
    let wakeups: Arc<[Wakeup]> = (0..shard_count).map(|_| Wakeup::new()).collect::<std::io::Result<Vec<_>>>()?.into();
    let mut senders: Vec<Vec<Option<Sender<Message>>>> =
        (0..shard_count).map(|_| (0..shard_count).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Message>>>> =
        (0..shard_count).map(|_| (0..shard_count).map(|_| None).collect()).collect();
    for source in 0..shard_count {
        for destination in 0..shard_count {
            if source != destination {
                let (tx, rx) = crossbeam_channel::bounded(queue_capacity);
                senders[source][destination] = Some(tx);
                receivers[destination][source] = Some(rx);
            }
        }
    }
    let endpoints = senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(shard, (senders, receivers))| Endpoint {
            shard,
            senders,
            receivers,
            wakeups: Arc::clone(&wakeups),
            local: VecDeque::new(),
            overflow: (0..shard_count).map(|_| VecDeque::new()).collect(),
            overflow_max,
            next_source: 0,
            unwoken: vec![false; shard_count],
            overflowed_total: 0,
        })
        .collect();
    Ok((endpoints, wakeups))
}

impl Endpoint {
    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    pub fn wakeup(&self) -> &Wakeup {
        &self.wakeups[self.shard]
    }

    /// Sends `message` to shard `destination` (possibly ourselves). Never
    /// blocks and never drops: a full queue spills into the overflow deque.
    /// A remote destination is woken by the next `flush`.
    pub fn send(&mut self, destination: usize, message: Message) {
        if destination == self.shard {
            self.local.push_back(message);
            // An admin task may send while the shard's loop is parked.
            self.wakeups[self.shard].wake();
            return;
        }
        if !self.overflow[destination].is_empty() {
            self.overflow[destination].push_back(message);
            return;
        }
        let Some(sender) = &self.senders[destination] else {
            debug_assert!(false, "no queue to shard {destination}");
            return;
        };
        match sender.try_send(message) {
            Ok(()) => self.unwoken[destination] = true,
            Err(TrySendError::Full(message)) => {
                self.overflowed_total += 1;
                self.overflow[destination].push_back(message);
            }
            // The receiving shard has exited (shutdown): nothing to deliver to.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Moves overflowed messages into their queues as room frees up, then
    /// wakes every shard that was sent something since the last flush (one
    /// wake-up per destination per tick, not per message). Returns true
    /// while any overflow remains.
    pub fn flush(&mut self) -> bool {
        let mut remaining = false;
        for destination in 0..self.overflow.len() {
            let Some(sender) = &self.senders[destination] else { continue };
            while let Some(message) = self.overflow[destination].pop_front() {
                match sender.try_send(message) {
                    Ok(()) => self.unwoken[destination] = true,
                    Err(TrySendError::Full(message)) => {
                        self.overflow[destination].push_front(message);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        self.overflow[destination].clear();
                        break;
                    }
                }
            }
            if std::mem::take(&mut self.unwoken[destination]) {
                self.wakeups[destination].wake();
            }
            remaining |= !self.overflow[destination].is_empty();
        }
        remaining
    }

    /// True when any destination's overflow is past half of `bus_overflow_max`:
    /// the shard must shed load (refuse publications, pause client reads).
    pub fn overloaded(&self) -> bool {
        let high_water = self.overflow_max / 2;
        self.overflow.iter().any(|queue| queue.len() > high_water)
    }

    /// Messages waiting in overflow, over all destinations.
    pub fn overflow_len(&self) -> usize {
        self.overflow.iter().map(VecDeque::len).sum()
    }

    /// Takes up to `budget` inbound messages: our own first, then each
    /// sender's queue in turn.
    pub fn receive(&mut self, budget: usize, mut handle: impl FnMut(&mut Self, Message)) -> usize {
        let mut handled = 0;
        while handled < budget {
            let Some(message) = self.local.pop_front() else { break };
            handle(self, message);
            handled += 1;
        }
        let sources = self.receivers.len();
        let mut idle_sources = 0;
        while handled < budget && idle_sources < sources {
            let source = self.next_source;
            self.next_source = (self.next_source + 1) % sources;
            let received = match &self.receivers[source] {
                Some(receiver) => receiver.try_recv(),
                None => Err(TryRecvError::Empty),
            };
            match received {
                Ok(message) => {
                    idle_sources = 0;
                    handle(self, message);
                    handled += 1;
                }
                Err(_) => idle_sources += 1,
            }
        }
        handled
    }

    /// Messages waiting to be received (our own and every sender's queue).
    pub fn inbound_len(&self) -> usize {
        self.local.len() + self.receivers.iter().flatten().map(Receiver::len).sum::<usize>()
    }

    /// Whether anything is waiting to be received.
    pub fn has_inbound(&self) -> bool {
        !self.local.is_empty() || self.receivers.iter().flatten().any(|receiver| !receiver.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_request(token: u64) -> Message {
        Message::UserAck { user: "u".into(), seq: token }
    }

    fn token_of(message: &Message) -> u64 {
        match message {
            Message::UserAck { seq, .. } => *seq,
            _ => panic!("unexpected message"),
        }
    }

    #[test]
    fn fifo_per_pair_through_overflow() {
        let (mut endpoints, _wakeups) = mesh(2, 16, 1_000).unwrap();
        let mut receiver = endpoints.pop().unwrap();
        let mut sender = endpoints.pop().unwrap();
        for token in 0..100 {
            sender.send(1, stats_request(token));
        }
        assert!(sender.overflow_len() > 0);
        let mut seen = Vec::new();
        while seen.len() < 100 {
            sender.flush();
            receiver.receive(7, |_, message| seen.push(token_of(&message)));
        }
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(!sender.flush());
    }

    #[test]
    fn local_messages_come_first() {
        let (mut endpoints, _wakeups) = mesh(1, 16, 100).unwrap();
        let endpoint = &mut endpoints[0];
        endpoint.send(0, stats_request(1));
        assert!(endpoint.has_inbound());
        let mut seen = Vec::new();
        endpoint.receive(10, |_, message| seen.push(token_of(&message)));
        assert_eq!(seen, vec![1]);
        assert!(!endpoint.has_inbound());
    }

    #[test]
    fn overload_threshold_is_half_the_overflow_limit() {
        let (mut endpoints, _wakeups) = mesh(2, 16, 40).unwrap();
        let sender = &mut endpoints[0];
        for token in 0..36 {
            sender.send(1, stats_request(token));
        }
        assert!(!sender.overloaded());
        sender.send(1, stats_request(99));
        assert!(sender.overloaded());
    }

    #[test]
    fn wakeup_only_signals_parked_shards() {
        let wakeup = Wakeup::new().unwrap();
        let read_counter = |w: &Wakeup| {
            let mut value: u64 = 0;
            // SAFETY: reading 8 bytes into a u64 from our eventfd.
            let n = unsafe { libc::read(w.fd(), (&mut value as *mut u64).cast(), 8) };
            if n == 8 {
                value
            } else {
                0
            }
        };
        wakeup.wake();
        assert_eq!(read_counter(&wakeup), 0);
        wakeup.prepare_park();
        wakeup.wake();
        wakeup.wake();
        assert_eq!(read_counter(&wakeup), 1);
    }
}
