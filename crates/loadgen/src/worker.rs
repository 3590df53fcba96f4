//! One worker process: a single-threaded, level-triggered epoll loop over its
//! share of the client sockets. No thread or timer per connection: the ramp,
//! churn and timeouts are driven from the loop, reads land in one scratch
//! buffer, and only a partial frame is kept per connection.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use base64::Engine as _;
use socket2::{Domain, Socket, Type};

use super::frame::{self, ServerFrame};
use super::hist::Latency;
use super::ramp::{self, Ramp};
use super::scan;
use super::sys::{self, Epoll, HANGUP, READABLE, WRITABLE};
use super::track::{DeliveryCounts, LastArrivals, Sequence};
use super::wire::{
    Command, Groups, Progress, Protocol, Scenario, TargetCounts, WorkerConfig, WorkerMessage, WorkerResult,
};
use kometa_protocol::ws::{accept_key, encode_client_frame};

/// Token of the stdin pipe in the epoll set (connection tokens are
/// `generation << 32 | slot`, and slots stay far below 2^32 - 1).
const STDIN_TOKEN: u64 = u64::MAX;
const EVENTS_MAX: usize = 1024;
/// One read per readiness event lands here.
const SCRATCH_BYTES: usize = 128 * 1024;
/// An HTTP response head longer than this is refused.
const HANDSHAKE_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Unwritten bytes one connection may queue (handshake, subscribes, pongs).
const TX_BYTES_MAX: usize = 256 * 1024;
/// How long a closing connection waits for the server's close frame or EOF.
const CLOSE_TIMEOUT_MS: u64 = 2_000;
/// Wait before a churned or dropped subscriber retries a failed reconnect.
const RECONNECT_BACKOFF_MS: u64 = 100;
/// Connections (or churn events) started per loop turn at most.
const BURST_MAX: u64 = 256;
const SWEEP_INTERVAL_MS: u64 = 50;
const DRAIN_CHECK_INTERVAL_MS: u64 = 10;
/// Clients one millisecond of interval covers: sweeps and drain checks walk
/// every client, so a worker of 15,000 does them every 300 and 100 ms, not
/// every 50 and 10 (67 workers walking 1,000,000 clients 100 times a second
/// were a visible share of two cores while the servers needed them).
const SWEEP_CLIENTS_PER_MS: usize = 50;
const DRAIN_CHECK_CLIENTS_PER_MS: usize = 150;
/// Commands are short; a longer line is a broken parent.
const COMMAND_LINE_BYTES_MAX: usize = 1 << 20;
const MS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Connecting,
    Handshaking,
    Subscribing,
    Open,
    /// We sent a close frame; waiting for the server's or for EOF.
    Closing,
    /// Churned or dropped; reconnects when its turn in the queue comes.
    Waiting,
    Done,
}

impl State {
    fn in_flight(self) -> bool {
        matches!(self, State::Connecting | State::Handshaking | State::Subscribing)
    }
}

/// One logical client: its socket (while connected) and the subscriber
/// state that outlives reconnects.
struct Client {
    /// Connection number over the whole run, for `{n}` and the source address.
    index: u64,
    /// Position in the worker's client table (the low half of its epoll token).
    slot: u32,
    /// Index of the URL its current (or next) socket goes to.
    target: u32,
    socket: Option<Socket>,
    /// Bumped for every socket, so a stale epoll event is recognised.
    generation: u32,
    state: State,
    since_ns: u64,
    connect_started_ns: u64,
    retry_at_ns: u64,
    /// Bytes of a partial frame or response head.
    rx: Vec<u8>,
    /// Bytes the socket did not take yet.
    tx: Vec<u8>,
    /// A fragmented message being assembled, and its opcode.
    fragments: Vec<u8>,
    fragment_opcode: Option<u8>,
    replies_pending: u32,
    writable_armed: bool,
    /// Order check of the tracked channel (the first one); None until subscribed.
    sequence: Option<Sequence>,
    /// Order check of its group channel (`--groups`); None until subscribed.
    group_sequence: Option<Sequence>,
    epoch: Option<Box<str>>,
    /// After a resume, offsets up to here are replays.
    replay_through: u64,
    /// The next subscribe resumes from `epoch` and the last offset seen.
    resume: bool,
    reconnect_after_close: bool,
    established: bool,
    key: String,
    /// `wss://`: the TLS session over the socket (`tx`/`rx` then hold
    /// ciphertext and plaintext respectively).
    tls: Option<Box<rustls::ClientConnection>>,
}

impl Client {
    fn new(index: u64, slot: u32, target: u32) -> Client {
        Client {
            index,
            slot,
            target,
            socket: None,
            generation: 0,
            state: State::NotStarted,
            since_ns: 0,
            connect_started_ns: 0,
            retry_at_ns: 0,
            rx: Vec::new(),
            tx: Vec::new(),
            fragments: Vec::new(),
            fragment_opcode: None,
            replies_pending: 0,
            writable_armed: false,
            sequence: None,
            group_sequence: None,
            epoch: None,
            replay_through: 0,
            resume: false,
            reconnect_after_close: false,
            established: false,
            key: String::new(),
            tls: None,
        }
    }
}

/// Why a connection ends. `kind` None is a clean end we asked for.
#[derive(Debug)]
struct End {
    kind: Option<String>,
}

impl End {
    fn error(kind: impl Into<String>) -> End {
        End { kind: Some(kind.into()) }
    }
    fn clean() -> End {
        End { kind: None }
    }
}

#[derive(Debug, Default)]
struct Stats {
    progress: Progress,
    connect_errors: BTreeMap<String, u64>,
    disconnects: BTreeMap<String, u64>,
    deliveries: DeliveryCounts,
    not_recovered: u64,
    recovered: u64,
    replayed: u64,
    unexpected: u64,
    misrouted: u64,
    before_reply: u64,
    other_messages: u64,
    churned: u64,
    first_delivery_ns: u64,
    last_delivery_ns: u64,
    connect_started_ns: u64,
    connect_done_ns: u64,
    /// Per target, in config order.
    targets: Vec<TargetCounts>,
}

impl Stats {
    /// The counts of `client`'s current target (targets come from
    /// `target_of`/`next_target`, always below the non-empty config's count).
    fn target(&mut self, client: &Client) -> &mut TargetCounts {
        &mut self.targets[client.target as usize]
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Ramping,
    Ready,
    /// After `Mark`: the measured phase (publishing, churn, hold).
    Running,
    Draining {
        deadline_ns: u64,
        last: LastPublished,
    },
    Finished {
        last: LastPublished,
    },
}

/// What the publisher got accepted, as the parent said in `Finish`.
#[derive(Debug, Clone, PartialEq, Default)]
struct LastPublished {
    /// Kometa: the broadcast channel's last accepted offset.
    final_offset: Option<u64>,
    accepted: u64,
    /// Groups: each group channel's last accepted offset.
    group_final_offsets: Vec<Option<u64>>,
}

impl LastPublished {
    fn of_group(&self, group: Option<u32>) -> Option<u64> {
        self.group_final_offsets.get(group? as usize).copied().flatten()
    }
}

/// Everything but the clients, so a client and the context can be borrowed together.
struct Ctx {
    config: WorkerConfig,
    epoll: Epoll,
    channel_names: Vec<String>,
    /// `--groups`: the group channels' names.
    group_names: Vec<String>,
    stats: Stats,
    latency: Latency,
    handshake: Latency,
    last_arrivals: LastArrivals,
    /// Broadcast: keep the per-publication latest arrival.
    track_last: bool,
    /// Clients in `State::Closing` (a sweep is needed while there are any).
    closing: u64,
    rng: u64,
    /// `wss://` targets: one client config for every connection.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Ctx {
    fn mask(&mut self) -> [u8; 4] {
        // xorshift64: masks only need to be unpredictable to intermediaries, not secret.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_ne_bytes()
    }

    fn set_state(&mut self, client: &mut Client, state: State, now_ns: u64) {
        let progress = &mut self.stats.progress;
        if client.state.in_flight() {
            progress.in_flight = progress.in_flight.saturating_sub(1);
        }
        if client.state == State::Open {
            progress.open = progress.open.saturating_sub(1);
        }
        if client.state == State::Closing {
            self.closing = self.closing.saturating_sub(1);
        }
        if state.in_flight() {
            progress.in_flight += 1;
        }
        if state == State::Open {
            progress.open += 1;
        }
        if state == State::Closing {
            self.closing += 1;
        }
        client.state = state;
        client.since_ns = now_ns;
    }

    fn kometa(&self) -> bool {
        self.config.protocol == Protocol::Kometa
    }
}

/// Reads command lines from the parent on stdin.
struct LineReader {
    buffer: Vec<u8>,
    eof: bool,
}

impl LineReader {
    /// Reads what is available (all of it when blocking until a line).
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let count = unsafe { libc::read(libc::STDIN_FILENO, chunk.as_mut_ptr().cast(), chunk.len()) };
            if count < 0 {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(error),
                };
            }
            if count == 0 {
                self.eof = true;
                return Ok(());
            }
            self.buffer.extend_from_slice(&chunk[..count as usize]);
            if self.buffer.len() > super::wire::LINE_BYTES_MAX {
                return Err(io::Error::other("command line too long"));
            }
            if chunk[..count as usize].contains(&b'\n') {
                return Ok(());
            }
        }
    }

    fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.buffer.iter().position(|&b| b == b'\n')?;
        let line = self.buffer[..end].to_vec();
        self.buffer.drain(..=end);
        Some(line)
    }
}

fn emit(message: &WorkerMessage) -> Result<(), String> {
    let mut stdout = io::stdout().lock();
    serde_json::to_writer(&mut stdout, message).map_err(|e| format!("writing to the parent: {e}"))?;
    stdout.write_all(b"\n").and_then(|()| stdout.flush()).map_err(|e| format!("writing to the parent: {e}"))
}

/// Entry point of `kometa load-worker`.
pub fn main() -> Result<(), String> {
    sys::install_stop_handler();
    sys::disable_transparent_huge_pages();
    sys::raise_open_files_limit();
    let mut commands = LineReader { buffer: Vec::new(), eof: false };
    let line = loop {
        if let Some(line) = commands.next_line() {
            break line;
        }
        if commands.eof {
            return Err("load-worker: no config on stdin (it is started by `kometa load`)".into());
        }
        commands.fill().map_err(|e| format!("load-worker: reading stdin: {e}"))?;
    };
    let config: WorkerConfig =
        serde_json::from_slice(&line).map_err(|e| format!("load-worker: bad config line: {e}"))?;
    if config.targets.is_empty() {
        return Err("load-worker: the config has no target URL".into());
    }
    let slots = if config.scenario == Scenario::Connect { config.in_flight_max } else { config.connections };
    let limit = sys::open_files_limit();
    if slots + 64 > limit {
        return Err(format!(
            "load-worker {}: {slots} connections need more than the open-files limit of {limit}; use more --workers",
            config.worker
        ));
    }
    sys::set_nonblocking(libc::STDIN_FILENO).map_err(|e| format!("load-worker: stdin: {e}"))?;
    let mut worker = Worker::new(config, commands)?;
    worker.run()
}

struct Worker {
    clients: Vec<Client>,
    ctx: Ctx,
    scratch: Vec<u8>,
    commands: LineReader,
    phase: Phase,
    ramp: Ramp,
    ramp_started_ns: u64,
    ramp_done_ns: u64,
    /// Ramp: clients started so far (in slot order).
    started: u64,
    /// Subscribers to reconnect, in order.
    reconnects: VecDeque<usize>,
    /// Connect scenario: free slots and attempts made.
    free_slots: Vec<usize>,
    attempts: u64,
    churn_started_ns: u64,
    churn_cursor: usize,
    /// When the measured phase began: CLOCK_MONOTONIC and this process's CPU time.
    mark: Option<(u64, u64)>,
    next_progress_ns: u64,
    next_sweep_ns: u64,
    next_drain_check_ns: u64,
}

impl Worker {
    fn new(config: WorkerConfig, commands: LineReader) -> Result<Worker, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        epoll.add(libc::STDIN_FILENO, READABLE, STDIN_TOKEN).map_err(|e| format!("epoll stdin: {e}"))?;
        let slots = if config.scenario == Scenario::Connect { config.in_flight_max } else { config.connections };
        let clients: Vec<Client> = (0..slots)
            .map(|i| Client::new(config.first_index + i, i as u32, config.target_of(config.first_index + i)))
            .collect();
        let channel_names = (0..config.channel_pool.max(1)).map(|j| config.channel_name(j)).collect();
        let group_names = (0..config.groups.count).map(|g| Groups::channel_name(&config.channel, g)).collect();
        let ramp = Ramp {
            total: config.connections,
            rate_per_s: config.ramp_rate_per_s,
            in_flight_max: config.in_flight_max.max(1),
            burst_max: BURST_MAX,
        };
        let capacity = usize::try_from(config.publications_max).unwrap_or(usize::MAX);
        let track_last = config.scenario == Scenario::Broadcast;
        let now = sys::monotonic_ns();
        let config_is_connect = config.scenario == Scenario::Connect;
        let free_slots = if config.scenario == Scenario::Connect { (0..clients.len()).rev().collect() } else { vec![] };
        let tls = match &config.tls_ca_pem {
            Some(pem) => Some(tls_client_config(pem)?),
            None => None,
        };
        Ok(Worker {
            clients,
            ctx: Ctx {
                epoll,
                channel_names,
                group_names,
                stats: Stats { targets: vec![TargetCounts::default(); config.targets.len()], ..Stats::default() },
                latency: Latency::new(),
                handshake: Latency::new(),
                last_arrivals: LastArrivals::new(if track_last { capacity } else { 0 }),
                track_last,
                closing: 0,
                rng: now | 1,
                tls,
                config,
            },
            scratch: vec![0; SCRATCH_BYTES],
            commands,
            phase: Phase::Ramping,
            ramp,
            ramp_started_ns: now,
            ramp_done_ns: 0,
            started: 0,
            reconnects: VecDeque::new(),
            free_slots,
            attempts: 0,
            churn_started_ns: 0,
            churn_cursor: 0,
            // The connect scenario is measured from its start.
            mark: (config_is_connect).then(|| (now, sys::cpu_ns(false))),
            next_progress_ns: now,
            next_sweep_ns: now,
            next_drain_check_ns: now,
        })
    }

    fn run(&mut self) -> Result<(), String> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        loop {
            let now = sys::monotonic_ns();
            if sys::stop_requested() || self.commands.eof {
                self.phase = Phase::Finished { last: LastPublished::default() };
            }
            self.drive(now)?;
            if let Phase::Finished { last } = &self.phase {
                let last = last.clone();
                return self.finish(&last);
            }
            let count = self.ctx.epoll.wait(&mut events, self.poll_timeout_ms()).map_err(|e| format!("epoll: {e}"))?;
            for event in &events[..count] {
                let (flags, token) = (event.events, event.u64);
                if token == STDIN_TOKEN {
                    self.read_commands()?;
                } else {
                    self.on_event(token, flags);
                }
            }
        }
    }

    fn poll_timeout_ms(&self) -> i32 {
        match self.phase {
            Phase::Ramping => 5,
            Phase::Running if self.ctx.config.churn_rate_per_s > 0.0 => 5,
            Phase::Draining { .. } => self.interval_ms(DRAIN_CHECK_INTERVAL_MS, DRAIN_CHECK_CLIENTS_PER_MS) as i32,
            _ if !self.reconnects.is_empty() => 5,
            _ => self.interval_ms(SWEEP_INTERVAL_MS, SWEEP_CLIENTS_PER_MS) as i32,
        }
    }

    /// An interval for work that walks every client: `base_ms`, longer for
    /// many clients.
    fn interval_ms(&self, base_ms: u64, clients_per_ms: usize) -> u64 {
        base_ms.max((self.clients.len() / clients_per_ms) as u64)
    }

    fn read_commands(&mut self) -> Result<(), String> {
        self.commands.fill().map_err(|e| format!("reading commands: {e}"))?;
        if self.commands.buffer.len() > COMMAND_LINE_BYTES_MAX {
            return Err("command line from the parent too long".into());
        }
        while let Some(line) = self.commands.next_line() {
            let command: Command =
                serde_json::from_slice(&line).map_err(|e| format!("bad command from the parent: {e}"))?;
            let now = sys::monotonic_ns();
            match command {
                Command::Mark => {
                    self.mark = Some((now, sys::cpu_ns(false)));
                    self.churn_started_ns = now;
                    if matches!(self.phase, Phase::Ramping | Phase::Ready) {
                        self.phase = Phase::Running;
                    }
                }
                Command::Finish { final_offset, accepted, drain_ms, group_final_offsets } => {
                    self.mark.get_or_insert_with(|| (now, sys::cpu_ns(false)));
                    let deadline_ns = now.saturating_add(drain_ms.saturating_mul(MS));
                    let last = LastPublished { final_offset, accepted, group_final_offsets };
                    self.phase = Phase::Draining { deadline_ns, last };
                }
                Command::Stop => self.phase = Phase::Finished { last: LastPublished::default() },
            }
        }
        Ok(())
    }

    /// Everything time-driven: ramp, churn, reconnects, timeouts, progress.
    fn drive(&mut self, now: u64) -> Result<(), String> {
        match self.phase {
            Phase::Ramping if self.ctx.config.scenario == Scenario::Connect => self.drive_connect(now),
            Phase::Ramping => self.drive_ramp(now)?,
            Phase::Running if self.ctx.config.churn_rate_per_s > 0.0 => self.drive_churn(now),
            Phase::Draining { deadline_ns, ref last } if now >= self.next_drain_check_ns => {
                self.next_drain_check_ns =
                    now + self.interval_ms(DRAIN_CHECK_INTERVAL_MS, DRAIN_CHECK_CLIENTS_PER_MS) * MS;
                if now >= deadline_ns || self.caught_up(last) {
                    self.phase = Phase::Finished { last: last.clone() };
                }
            }
            _ => {}
        }
        self.drive_reconnects(now);
        if now >= self.next_sweep_ns {
            self.next_sweep_ns = now + self.interval_ms(SWEEP_INTERVAL_MS, SWEEP_CLIENTS_PER_MS) * MS;
            self.sweep_timeouts(now);
        }
        if now >= self.next_progress_ns {
            self.next_progress_ns = now + self.ctx.config.progress_interval_ms.max(10) * MS;
            emit(&WorkerMessage::Progress(self.ctx.stats.progress))?;
        }
        Ok(())
    }

    fn drive_ramp(&mut self, now: u64) -> Result<(), String> {
        let elapsed = now.saturating_sub(self.ramp_started_ns);
        let count = self.ramp.to_start(elapsed, self.started, self.ctx.stats.progress.in_flight);
        for _ in 0..count {
            let slot = self.started as usize;
            self.started += 1;
            self.start(slot, now);
        }
        let all_started = self.started >= self.clients.len() as u64;
        let over_time = elapsed >= self.ctx.config.ramp_max_ms.saturating_mul(MS);
        if over_time && !(all_started && self.ctx.stats.progress.in_flight == 0) {
            // Give up on what is still pending: the run goes on with what it has.
            for slot in 0..self.clients.len() {
                let state = self.clients[slot].state;
                if state.in_flight() {
                    self.end_client(slot, End::error("ramp_timeout"), now);
                } else if state == State::NotStarted {
                    *self.ctx.stats.connect_errors.entry("not_started".into()).or_default() += 1;
                    self.ctx.stats.target(&self.clients[slot]).connect_errors += 1;
                    self.clients[slot].state = State::Done;
                }
            }
            self.started = self.clients.len() as u64;
        }
        if self.started >= self.clients.len() as u64 && self.ctx.stats.progress.in_flight == 0 {
            self.ramp_done_ns = now;
            self.phase = Phase::Ready;
            emit(&WorkerMessage::Ready(self.ctx.stats.progress))?;
        }
        Ok(())
    }

    /// Connect scenario: keep `in_flight_max` handshakes going until the
    /// count or the duration is reached, then finish on our own.
    fn drive_connect(&mut self, now: u64) {
        let config = &self.ctx.config;
        let elapsed = now.saturating_sub(self.ramp_started_ns);
        let over_time = elapsed >= config.duration_ms.saturating_mul(MS);
        if !over_time {
            let paced = ramp::due(config.connections, config.ramp_rate_per_s, elapsed).saturating_sub(self.attempts);
            for _ in 0..paced.min(BURST_MAX) {
                let Some(slot) = self.free_slots.pop() else { break };
                let index = self.ctx.config.first_index + self.attempts;
                self.attempts += 1;
                let target = self.ctx.config.target_of(index);
                let client = &mut self.clients[slot];
                client.index = index;
                client.target = target;
                client.established = false;
                self.start(slot, now);
            }
        }
        let busy = self.free_slots.len() < self.clients.len();
        if !busy && (over_time || self.attempts >= self.ctx.config.connections) {
            self.ramp_done_ns = now;
            self.phase = Phase::Finished { last: LastPublished::default() };
        }
    }

    fn drive_churn(&mut self, now: u64) {
        let due = ramp::due(u64::MAX, self.ctx.config.churn_rate_per_s, now.saturating_sub(self.churn_started_ns));
        let mut to_churn = due.saturating_sub(self.ctx.stats.churned).min(BURST_MAX);
        let mut scanned = 0;
        while to_churn > 0 && scanned < self.clients.len() {
            let slot = self.churn_cursor % self.clients.len();
            self.churn_cursor = self.churn_cursor.wrapping_add(1);
            scanned += 1;
            if self.clients[slot].state != State::Open {
                continue;
            }
            to_churn -= 1;
            self.ctx.stats.churned += 1;
            let client = &mut self.clients[slot];
            client.reconnect_after_close = true;
            if let Err(end) = start_close(client, &mut self.ctx, now) {
                self.end_client(slot, end, now);
            }
        }
        // Nobody open to churn: do not build up a backlog.
        if to_churn > 0 {
            self.ctx.stats.churned += to_churn;
        }
    }

    fn drive_reconnects(&mut self, now: u64) {
        let in_flight_max = self.ramp.in_flight_max;
        while let Some(&slot) = self.reconnects.front() {
            if self.ctx.stats.progress.in_flight >= in_flight_max || self.clients[slot].retry_at_ns > now {
                break;
            }
            self.reconnects.pop_front();
            if self.clients[slot].state == State::Waiting && !matches!(self.phase, Phase::Finished { .. }) {
                self.start(slot, now);
            }
        }
    }

    fn sweep_timeouts(&mut self, now: u64) {
        let busy = self.ctx.stats.progress.in_flight > 0 || self.ctx.closing > 0;
        if !busy {
            return;
        }
        let connect_timeout_ns = self.ctx.config.connect_timeout_ms.saturating_mul(MS);
        for slot in 0..self.clients.len() {
            let client = &self.clients[slot];
            let age = now.saturating_sub(client.since_ns);
            let kind = match client.state {
                State::Connecting if age > connect_timeout_ns => "timeout",
                State::Handshaking if age > connect_timeout_ns => "handshake_timeout",
                State::Subscribing if age > connect_timeout_ns => "subscribe_timeout",
                State::Closing if age > CLOSE_TIMEOUT_MS * MS => "close_timeout",
                _ => continue,
            };
            self.end_client(slot, End::error(kind), now);
        }
    }

    /// Every subscriber has the last publication, or can no longer get it.
    fn caught_up(&self, last: &LastPublished) -> bool {
        let kometa = self.ctx.kometa();
        let groups = self.ctx.config.groups;
        let reached = |sequence: Option<Sequence>, final_offset: Option<u64>| {
            sequence.is_none_or(|s| final_offset.is_none_or(|last| s.next > last))
        };
        self.clients.iter().all(|client| match client.sequence {
            None => true,
            Some(_) if client.state == State::Done => true,
            Some(sequence) if kometa => {
                reached(Some(sequence), last.final_offset)
                    && reached(client.group_sequence, last.of_group(groups.of_connection(client.index)))
            }
            Some(sequence) => sequence.next >= last.accepted,
        })
    }

    fn start(&mut self, slot: usize, now: u64) {
        let client = &mut self.clients[slot];
        match open_socket(client, &mut self.ctx, now) {
            Ok(()) => {
                if self.ctx.stats.connect_started_ns == 0 {
                    self.ctx.stats.connect_started_ns = now;
                }
            }
            Err(kind) => {
                // Counted as a connect error; it never reached Connecting.
                self.ctx.set_state(client, State::Connecting, now);
                self.end_client(slot, End::error(kind), now);
            }
        }
    }

    fn on_event(&mut self, token: u64, flags: u32) {
        let slot = (token & 0xFFFF_FFFF) as usize;
        let generation = (token >> 32) as u32;
        let now = sys::monotonic_ns();
        let Some(client) = self.clients.get_mut(slot) else { return };
        if client.generation != generation || client.socket.is_none() {
            return;
        }
        let mut result = Ok(());
        if flags & (WRITABLE | HANGUP) != 0 {
            result = on_writable(client, &mut self.ctx, now);
        }
        if result.is_ok() && flags & (READABLE | HANGUP) != 0 && client.socket.is_some() {
            result = on_readable(client, &mut self.ctx, &mut self.scratch, now);
        }
        if let Err(end) = result {
            self.end_client(slot, end, now);
        }
    }

    /// Closes a client's socket, counts why, and decides what comes next.
    fn end_client(&mut self, slot: usize, end: End, now: u64) {
        let connect_scenario = self.ctx.config.scenario == Scenario::Connect;
        let churn = self.ctx.config.scenario == Scenario::Churn;
        let finished = matches!(self.phase, Phase::Finished { .. });
        let client = &mut self.clients[slot];
        let was = client.state;
        if let Some(kind) = end.kind {
            let stats = &mut self.ctx.stats;
            let errors = if was.in_flight() {
                stats.progress.connect_errors += 1;
                stats.target(client).connect_errors += 1;
                &mut stats.connect_errors
            } else {
                stats.progress.disconnects += 1;
                stats.target(client).disconnects += 1;
                &mut stats.disconnects
            };
            *errors.entry(kind).or_default() += 1;
        }
        client.socket = None;
        client.tls = None;
        client.rx = Vec::new();
        client.tx = Vec::new();
        client.fragments = Vec::new();
        client.fragment_opcode = None;
        client.replies_pending = 0;
        client.writable_armed = false;
        let reconnect = churn && client.sequence.is_some() && !finished && was != State::Done;
        if connect_scenario {
            self.ctx.set_state(client, State::Done, now);
            self.free_slots.push(slot);
        } else if reconnect {
            // A churned subscriber (or one the server dropped) resumes where it
            // was, on the next URL: with several nodes, resume crosses nodes.
            client.resume = true;
            client.target = self.ctx.config.next_target(client.target);
            client.reconnect_after_close = false;
            client.retry_at_ns = if was == State::Closing { now } else { now + RECONNECT_BACKOFF_MS * MS };
            self.ctx.set_state(client, State::Waiting, now);
            self.reconnects.push_back(slot);
        } else {
            self.ctx.set_state(client, State::Done, now);
        }
    }

    fn finish(&mut self, last: &LastPublished) -> Result<(), String> {
        let now = sys::monotonic_ns();
        let kometa = self.ctx.kometa();
        let groups = self.ctx.config.groups;
        let stats = &self.ctx.stats;
        let subscribers = self.clients.iter().filter(|c| c.sequence.is_some()).count() as u64;
        let (expected, missing) = if kometa {
            // Offsets say exactly what each subscriber should have had, on
            // the broadcast channel and on its group channel.
            let tail =
                |sequence: Option<Sequence>, final_offset: Option<u64>| Some(sequence?.missing_through(final_offset?));
            let tails = self
                .clients
                .iter()
                .flat_map(|c| {
                    let group = last.of_group(groups.of_connection(c.index));
                    [tail(c.sequence, last.final_offset), tail(c.group_sequence, group)]
                })
                .flatten()
                .fold(0u64, u64::saturating_add);
            let missing = stats.deliveries.gaps.saturating_add(tails);
            (stats.deliveries.unique.saturating_add(missing), missing)
        } else {
            let accepted = last.accepted;
            let expected = accepted.saturating_mul(subscribers);
            (expected, expected.saturating_sub(stats.deliveries.unique))
        };
        let open_at_end = stats.progress.open;
        let cpu_ns = sys::cpu_ns(false);
        let stats = &self.ctx.stats;
        let mut progress = stats.progress;
        progress.open = open_at_end;
        let result = WorkerResult {
            worker: self.ctx.config.worker,
            progress,
            connect_errors: stats.connect_errors.clone(),
            disconnects: stats.disconnects.clone(),
            ramp_started_ns: self.ramp_started_ns,
            ramp_done_ns: if self.ramp_done_ns == 0 { now } else { self.ramp_done_ns },
            deliveries: stats.deliveries,
            expected,
            missing,
            not_recovered: stats.not_recovered,
            recovered: stats.recovered,
            replayed: stats.replayed,
            unexpected: stats.unexpected,
            misrouted: stats.misrouted,
            before_reply: stats.before_reply,
            other_messages: stats.other_messages,
            churned: stats.churned,
            first_delivery_ns: stats.first_delivery_ns,
            last_delivery_ns: stats.last_delivery_ns,
            latency_us: self.ctx.latency.to_pairs(),
            handshake_us: self.ctx.handshake.to_pairs(),
            last_arrival_ns: self.ctx.last_arrivals.entries().collect(),
            cpu_ns,
            cpu_run_ns: self.mark.map_or(0, |(_, cpu)| cpu_ns.saturating_sub(cpu)),
            wall_run_ns: self.mark.map_or(0, |(at, _)| now.saturating_sub(at)),
            connect_started_ns: stats.connect_started_ns,
            connect_done_ns: stats.connect_done_ns,
            targets: stats.targets.clone(),
        };
        // Report first: closing 15,000 sockets (a million over all workers,
        // each a FIN both servers and generator must handle) takes a while
        // on a loaded host, and the parent waits for the reports, not this.
        emit(&WorkerMessage::Result(Box::new(result)))?;
        for client in &mut self.clients {
            client.socket = None;
        }
        Ok(())
    }
}

/// Creates the socket, binds it to its source address and starts connecting.
fn open_socket(client: &mut Client, ctx: &mut Ctx, now: u64) -> Result<(), String> {
    let config = &ctx.config;
    let kind = |e: io::Error| sys::error_kind(&e);
    let address = config.targets[client.target as usize].address;
    let socket = Socket::new(Domain::for_address(address), Type::STREAM.nonblocking(), None).map_err(kind)?;
    if !config.source_addresses.is_empty() && address.is_ipv4() {
        let source = config.source_addresses[(client.index % config.source_addresses.len() as u64) as usize];
        bind_no_port(&socket, source).map_err(kind)?;
    }
    socket.set_tcp_nodelay(true).map_err(kind)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(kind(error)),
    }
    client.generation = client.generation.wrapping_add(1);
    ctx.epoll.add(socket.as_raw_fd(), READABLE | WRITABLE, client.token()).map_err(kind)?;
    client.writable_armed = true;
    client.socket = Some(socket);
    client.connect_started_ns = now;
    ctx.set_state(client, State::Connecting, now);
    Ok(())
}

/// Binds to `source` with IP_BIND_ADDRESS_NO_PORT: the port is chosen at
/// connect time from the whole 4-tuple, so each source address gives a full
/// ephemeral port range per server address.
fn bind_no_port(socket: &Socket, source: Ipv4Addr) -> io::Result<()> {
    kometa_sys::set_int_option(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())
}

/// Sends `bytes` of the protocol: through TLS where the target is `wss://`.
fn send(client: &mut Client, ctx: &mut Ctx, bytes: &[u8]) -> Result<(), End> {
    if let Some(tls) = client.tls.as_mut() {
        // Before the handshake completes rustls keeps the plaintext and
        // sends it after; bounded like `tx` by TX_BYTES_MAX.
        if tls.writer().write_all(bytes).is_err() {
            return Err(End::error("tls_send"));
        }
        return flush_tls(client, ctx);
    }
    send_raw(client, ctx, bytes)
}

/// Moves what rustls has to send (records, alerts) into the socket.
fn flush_tls(client: &mut Client, ctx: &mut Ctx) -> Result<(), End> {
    let Some(tls) = client.tls.as_mut() else { return Ok(()) };
    if !tls.wants_write() {
        return Ok(());
    }
    let mut records = Vec::new();
    while tls.wants_write() {
        if tls.write_tls(&mut records).is_err() {
            return Err(End::error("tls_send"));
        }
    }
    send_raw(client, ctx, &records)
}

/// The client config of `wss://` targets: trusts the PEM certificates of
/// `--tls-ca` only; no session resumption (every connection is a full
/// handshake, the figure a server's TLS capacity is judged by); ALPN
/// http/1.1 as browsers offer it for WebSocket.
fn tls_client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("--tls-ca: {e}"))?;
        roots.add(cert).map_err(|e| format!("--tls-ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err("--tls-ca: no certificate in the file".into());
    }
    // ring, as the server: no C/CMake toolchain to build (its deprecation is
    // about post-quantum key exchange, which ring lacks).
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // What browsers offer first (X25519, then P-256), not the provider's
    // default order, which starts with P-384: its key share would pick
    // P-384, expensive in ring, on servers that follow the client's order.
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519, rustls::crypto::ring::kx_group::SECP256R1];
    let provider = Arc::new(provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Queues `bytes` for the socket, writing what it takes now.
fn send_raw(client: &mut Client, ctx: &mut Ctx, bytes: &[u8]) -> Result<(), End> {
    let Some(socket) = client.socket.as_ref() else { return Ok(()) };
    if client.tx.is_empty() && client.state != State::Connecting {
        match (&*socket).write(bytes) {
            Ok(written) => client.tx.extend_from_slice(&bytes[written..]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => client.tx.extend_from_slice(bytes),
            Err(error) => return Err(End::error(sys::error_kind(&error))),
        }
    } else {
        client.tx.extend_from_slice(bytes);
    }
    if client.tx.len() > TX_BYTES_MAX {
        return Err(End::error("send_queue_full"));
    }
    if !client.tx.is_empty() && !client.writable_armed {
        ctx.epoll
            .modify(socket.as_raw_fd(), READABLE | WRITABLE, client.token())
            .map_err(|e| End::error(sys::error_kind(&e)))?;
        client.writable_armed = true;
    }
    Ok(())
}

impl Client {
    fn token(&self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }
}

fn send_frame(client: &mut Client, ctx: &mut Ctx, first_byte: u8, payload: &[u8]) -> Result<(), End> {
    let mask = ctx.mask();
    let frame = encode_client_frame(first_byte, payload, mask);
    send(client, ctx, &frame)
}

fn start_close(client: &mut Client, ctx: &mut Ctx, now: u64) -> Result<(), End> {
    send_frame(client, ctx, 0x88, &1000u16.to_be_bytes())?;
    ctx.set_state(client, State::Closing, now);
    Ok(())
}

fn on_writable(client: &mut Client, ctx: &mut Ctx, now: u64) -> Result<(), End> {
    let Some(socket) = client.socket.as_ref() else { return Ok(()) };
    if client.state == State::Connecting {
        match socket.take_error() {
            Ok(None) => {}
            Ok(Some(error)) | Err(error) => return Err(End::error(sys::error_kind(&error))),
        }
        // Connected (a refused connect reports an error above).
        if socket.peer_addr().is_err() {
            return Ok(());
        }
        ctx.set_state(client, State::Handshaking, now);
        if let (Some(config), Some(name)) =
            (ctx.tls.as_ref(), ctx.config.targets[client.target as usize].tls_server_name.as_ref())
        {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| End::error("tls_name"))?;
            let connection =
                rustls::ClientConnection::new(Arc::clone(config), name).map_err(|_| End::error("tls_config"))?;
            client.tls = Some(Box::new(connection));
        }
        let request = handshake_request(client, ctx);
        send(client, ctx, request.as_bytes())?;
    } else if !client.tx.is_empty() {
        match (&*socket).write(&client.tx) {
            // Emptied: let the buffer go (a million idle clients would
            // otherwise each keep their handshake request's capacity).
            Ok(written) if written == client.tx.len() => client.tx = Vec::new(),
            Ok(written) => {
                client.tx.drain(..written);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(End::error(sys::error_kind(&error))),
        }
    }
    if client.tx.is_empty() && client.writable_armed {
        if let Some(socket) = client.socket.as_ref() {
            ctx.epoll
                .modify(socket.as_raw_fd(), READABLE, client.token())
                .map_err(|e| End::error(sys::error_kind(&e)))?;
        }
        client.writable_armed = false;
    }
    Ok(())
}

fn handshake_request(client: &mut Client, ctx: &mut Ctx) -> String {
    let mut key_bytes = [0u8; 16];
    key_bytes[..4].copy_from_slice(&ctx.mask());
    key_bytes[4..12].copy_from_slice(&client.index.to_le_bytes());
    key_bytes[12..].copy_from_slice(&client.generation.to_le_bytes());
    client.key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let config = &ctx.config;
    let target = &config.targets[client.target as usize];
    let channel = &ctx.channel_names[config.channel_of(client.index, 0) as usize % ctx.channel_names.len()];
    let path = super::target::expand(&target.path, channel, client.index);
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: kometa-load\r\n\r\n",
        target.authority, client.key
    )
}

fn on_readable(client: &mut Client, ctx: &mut Ctx, scratch: &mut [u8], now: u64) -> Result<(), End> {
    let Some(socket) = client.socket.as_ref() else { return Ok(()) };
    // TLS: ciphertext lands in the first half, plaintext in the second.
    let (scratch, plain) = scratch.split_at_mut(if client.tls.is_some() { SCRATCH_BYTES / 2 } else { scratch.len() });
    if client.state == State::Connecting {
        if let Ok(Some(error)) | Err(error) = socket.take_error() {
            return Err(End::error(sys::error_kind(&error)));
        }
        return Ok(());
    }
    let count = match (&*socket).read(scratch) {
        Ok(0) => {
            return Err(match client.state {
                State::Closing => End::clean(),
                State::Handshaking => End::error("closed_during_handshake"),
                _ => End::error("eof"),
            })
        }
        Ok(count) => count,
        Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return Ok(()),
        Err(error) => {
            return Err(if client.state == State::Closing { End::clean() } else { End::error(sys::error_kind(&error)) })
        }
    };
    let now = now.max(sys::monotonic_ns());
    if client.tls.is_none() {
        return deliver(client, ctx, &scratch[..count], now);
    }
    let mut ciphertext = &scratch[..count];
    loop {
        // The client may have ended while handling the last plaintext.
        let Some(tls) = client.tls.as_mut() else { return Ok(()) };
        let mut consumed = 0;
        if !ciphertext.is_empty() {
            consumed = tls.read_tls(&mut ciphertext).map_err(|_| End::error("tls_receive"))?;
            if let Err(error) = tls.process_new_packets() {
                // Say why to the server (an alert), then end.
                let _ = flush_tls(client, ctx);
                return Err(End::error(tls_error_kind(&error)));
            }
        }
        let produced = match tls.reader().read(plain) {
            Ok(produced) => produced,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(End::error("tls_eof")),
        };
        if produced > 0 {
            deliver(client, ctx, &plain[..produced], now)?;
        } else if ciphertext.is_empty() || consumed == 0 {
            break;
        }
    }
    // Handshake messages, key updates and alerts rustls has to send.
    flush_tls(client, ctx)
}

/// A few kinds of TLS failure, for the error counts.
fn tls_error_kind(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(_) => "tls_certificate",
        rustls::Error::AlertReceived(_) => "tls_alert",
        rustls::Error::NoApplicationProtocol => "tls_alpn",
        _ => "tls",
    }
}

/// Handles protocol bytes (plaintext) read from a client's connection,
/// keeping a partial frame or head for the next read.
fn deliver(client: &mut Client, ctx: &mut Ctx, input: &[u8], now: u64) -> Result<(), End> {
    let mut rx = std::mem::take(&mut client.rx);
    let result = if rx.is_empty() {
        process(client, ctx, input, now).map(|used| {
            if used < input.len() {
                rx.extend_from_slice(&input[used..]);
            }
        })
    } else {
        rx.extend_from_slice(input);
        process(client, ctx, &rx, now).map(|used| {
            rx.drain(..used);
        })
    };
    result?;
    if !rx.is_empty() && client.socket.is_some() {
        client.rx = rx;
    }
    Ok(())
}

/// Handles the response head (while handshaking) and every complete frame
/// in `input`; returns the bytes used.
fn process(client: &mut Client, ctx: &mut Ctx, input: &[u8], now: u64) -> Result<usize, End> {
    let mut used = 0;
    if client.state == State::Handshaking {
        let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
            if input.len() > HANDSHAKE_HEAD_BYTES_MAX {
                return Err(End::error("handshake_too_large"));
            }
            return Ok(0);
        };
        on_handshake(client, ctx, &input[..end], now)?;
        used = end;
    }
    while used < input.len() && client.socket.is_some() {
        match frame::parse(&input[used..], ctx.config.message_bytes_max) {
            Ok(Some(frame)) => {
                used += frame.consumed;
                on_frame(client, ctx, frame, now)?;
            }
            Ok(None) => break,
            Err(error) => return Err(End::error(error.kind())),
        }
    }
    Ok(used)
}

fn on_handshake(client: &mut Client, ctx: &mut Ctx, head: &[u8], now: u64) -> Result<(), End> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(End::error("handshake_malformed")),
    }
    let code = response.code.unwrap_or(0);
    if code != 101 {
        return Err(End::error(format!("handshake_status_{code}")));
    }
    let accept = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"));
    if accept.map(|h| h.value) != Some(accept_key(client.key.as_bytes()).as_bytes()) {
        return Err(End::error("handshake_bad_accept"));
    }
    // Checked: an idle client keeps no per-connection strings it no longer needs.
    client.key = String::new();
    ctx.handshake.record_ns(now.saturating_sub(client.connect_started_ns));
    ctx.stats.progress.handshakes += 1;
    let subscribe = ctx.kometa() && (ctx.config.scenario != Scenario::Connect || ctx.config.subscribe);
    if subscribe && ctx.config.channels_per_connection > 0 {
        send_subscribes(client, ctx)?;
        ctx.set_state(client, State::Subscribing, now);
        Ok(())
    } else {
        if !ctx.kometa() && client.sequence.is_none() {
            client.sequence = Some(Sequence::starting_at(0));
        }
        on_established(client, ctx, now)
    }
}

fn send_subscribes(client: &mut Client, ctx: &mut Ctx) -> Result<(), End> {
    let count = ctx.config.channels_per_connection;
    for k in 0..count {
        let pool_index = ctx.config.channel_of(client.index, k) as usize % ctx.channel_names.len();
        let channel = serde_json::to_string(&ctx.channel_names[pool_index]).unwrap_or_default();
        let id = k + 1;
        let command = match (&client.epoch, client.sequence) {
            (Some(epoch), Some(sequence)) if k == 0 && client.resume => {
                let epoch = serde_json::to_string(&**epoch).unwrap_or_default();
                let offset = sequence.next.saturating_sub(1);
                format!(
                    r#"{{"op":"subscribe","channel":{channel},"id":{id},"since":{{"epoch":{epoch},"offset":{offset}}}}}"#
                )
            }
            _ => format!(r#"{{"op":"subscribe","channel":{channel},"id":{id}}}"#),
        };
        send_frame(client, ctx, 0x81, command.as_bytes())?;
    }
    client.replies_pending = count;
    // Its reply (id count + 1) starts the group sequence.
    let group_command = group_channel(client, ctx).map(|name| {
        let channel = serde_json::to_string(name).unwrap_or_default();
        format!(r#"{{"op":"subscribe","channel":{channel},"id":{}}}"#, count + 1)
    });
    if let Some(command) = group_command {
        send_frame(client, ctx, 0x81, command.as_bytes())?;
        client.replies_pending += 1;
    }
    Ok(())
}

/// The name of the group channel a client joins (`--groups`), if any.
fn group_channel<'a>(client: &Client, ctx: &'a Ctx) -> Option<&'a String> {
    ctx.group_names.get(ctx.config.groups.of_connection(client.index)? as usize)
}

fn on_established(client: &mut Client, ctx: &mut Ctx, now: u64) -> Result<(), End> {
    if !client.established {
        client.established = true;
        ctx.stats.progress.established += 1;
        ctx.stats.target(client).established += 1;
    } else if client.resume {
        ctx.stats.target(client).resumed += 1;
    }
    if ctx.config.scenario == Scenario::Connect {
        ctx.stats.connect_done_ns = now;
        return start_close(client, ctx, now);
    }
    ctx.set_state(client, State::Open, now);
    Ok(())
}

fn on_frame(client: &mut Client, ctx: &mut Ctx, frame: ServerFrame<'_>, now: u64) -> Result<(), End> {
    match frame.opcode {
        frame::OPCODE_PING => send_frame(client, ctx, 0x8A, frame.payload),
        frame::OPCODE_PONG => Ok(()),
        frame::OPCODE_CLOSE => {
            if client.state == State::Closing {
                return Err(End::clean());
            }
            let code = match frame.payload {
                [high, low, ..] => u16::from_be_bytes([*high, *low]).to_string(),
                _ => "none".into(),
            };
            // Echo the close (best effort) before dropping the socket.
            let _ = send_frame(client, ctx, 0x88, frame.payload.get(..2).unwrap_or(&[]));
            Err(End::error(format!("closed_by_server_{code}")))
        }
        opcode => {
            if opcode == frame::OPCODE_CONTINUATION {
                if client.fragment_opcode.is_none() {
                    return Err(End::error("unexpected_continuation"));
                }
            } else if client.fragment_opcode.is_some() {
                return Err(End::error("interleaved_message"));
            }
            if frame.fin && client.fragment_opcode.is_none() {
                return on_message(client, ctx, frame.payload, now);
            }
            if client.fragments.len() + frame.payload.len() > ctx.config.message_bytes_max {
                return Err(End::error("message_too_large"));
            }
            client.fragments.extend_from_slice(frame.payload);
            if opcode != frame::OPCODE_CONTINUATION {
                client.fragment_opcode = Some(opcode);
            }
            if frame.fin {
                let message = std::mem::take(&mut client.fragments);
                client.fragment_opcode = None;
                on_message(client, ctx, &message, now)?;
            }
            Ok(())
        }
    }
}

fn on_message(client: &mut Client, ctx: &mut Ctx, message: &[u8], now: u64) -> Result<(), End> {
    if !ctx.kometa() || scan::first_key(message) == Some(b"channel") {
        on_push(client, ctx, message, now);
        return Ok(());
    }
    on_reply(client, ctx, message, now)
}

/// A Kometa reply (rare: one per subscribe), parsed exactly.
fn on_reply(client: &mut Client, ctx: &mut Ctx, message: &[u8], now: u64) -> Result<(), End> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(message) else {
        ctx.stats.other_messages += 1;
        return Ok(());
    };
    if value.get("id").is_none() && value.get("channel").is_some() {
        // A push whose keys come in another order.
        on_push(client, ctx, message, now);
        return Ok(());
    }
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    if client.state != State::Subscribing || client.replies_pending == 0 || id.is_none() {
        ctx.stats.other_messages += 1;
        return Ok(());
    }
    if let Some(error) = value.get("error") {
        let code = error.get("code").and_then(serde_json::Value::as_str).unwrap_or("unknown");
        return Err(End::error(format!("subscribe_{code}")));
    }
    if value.get("ok") != Some(&serde_json::Value::Bool(true)) {
        return Err(End::error("subscribe_bad_reply"));
    }
    if id == Some(1) {
        let offset = value.get("offset").and_then(serde_json::Value::as_u64).unwrap_or(0);
        let epoch = value.get("epoch").and_then(serde_json::Value::as_str).map(Box::<str>::from);
        match (client.resume, value.get("recovered").and_then(serde_json::Value::as_bool)) {
            (true, Some(false)) => {
                // Told plainly: start over from the current offset; not a gap.
                ctx.stats.not_recovered += 1;
                client.sequence = Some(Sequence::starting_at(offset.saturating_add(1)));
                client.replay_through = 0;
            }
            (true, _) => {
                ctx.stats.recovered += 1;
                client.replay_through = offset;
            }
            (false, _) => client.sequence = Some(Sequence::starting_at(offset.saturating_add(1))),
        }
        client.epoch = epoch;
    } else if id == Some(u64::from(ctx.config.channels_per_connection) + 1) && ctx.config.groups.count > 0 {
        let offset = value.get("offset").and_then(serde_json::Value::as_u64).unwrap_or(0);
        client.group_sequence = Some(Sequence::starting_at(offset.saturating_add(1)));
    }
    client.replies_pending -= 1;
    if client.replies_pending == 0 {
        return on_established(client, ctx, now);
    }
    Ok(())
}

/// The hot path: one push, read with the hand-written scanner.
fn on_push(client: &mut Client, ctx: &mut Ctx, message: &[u8], now: u64) {
    let kometa = ctx.kometa();
    let fields = scan::scan_push(message, kometa);
    let stats = &mut ctx.stats;
    let (Some(sent_ns), Some(seq)) = (fields.sent_ns, fields.seq) else {
        stats.other_messages += 1;
        return;
    };
    let key = if kometa {
        let Some(offset) = fields.offset else {
            stats.unexpected += 1;
            return;
        };
        offset
    } else {
        seq
    };
    // With groups the publisher's sequence number says which channel a push
    // belongs to; without, every push is the tracked channel's.
    let groups = ctx.config.groups;
    let sequence = match groups.of_publication(seq) {
        Some(group) if kometa && groups.count > 0 => {
            if groups.of_connection(client.index) != Some(group) {
                stats.misrouted += 1;
                return;
            }
            client.group_sequence.as_mut()
        }
        _ => client.sequence.as_mut(),
    };
    let Some(sequence) = sequence else {
        stats.before_reply += 1;
        return;
    };
    stats.deliveries.count(sequence.observe(key));
    stats.progress.deliveries += 1;
    if stats.first_delivery_ns == 0 {
        stats.first_delivery_ns = now;
    }
    stats.last_delivery_ns = now;
    if kometa && key <= client.replay_through {
        stats.replayed += 1;
        return;
    }
    let latency_ns = now.saturating_sub(sent_ns);
    ctx.latency.record_ns(latency_ns);
    if ctx.track_last && !ctx.last_arrivals.record(seq, latency_ns) {
        ctx.stats.unexpected += 1;
    }
}
