//! The final report: worker results merged, server figures, JSON and text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::hist::{Latency, Percentiles};
use super::procfs;
use super::publish::PublishOutcome;
use super::ramp;
use super::sys;
use super::track::{merge_last_arrivals, DeliveryCounts};
use super::wire::{Groups, Scenario, WorkerResult};

/// Readings of one server process (`--server-pid`), taken by the parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessReadings {
    pub pid: u32,
    pub rss_before_bytes: u64,
    pub rss_after_ramp_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    /// Proportional set size before and after the ramp (0: not shown).
    pub pss_before_bytes: u64,
    pub pss_after_ramp_bytes: u64,
    pub cpu_before_ns: u64,
    /// When every worker was ready (the settle starts); 0 if never read.
    pub cpu_ramp_done_ns: u64,
    pub cpu_mark_ns: u64,
    pub cpu_end_ns: u64,
}

/// Server readings taken by the parent: one process per `--server-pid` (a
/// node each), read together, and the kernel's slab, which they share.
#[derive(Debug, Clone, Default)]
pub struct ServerReadings {
    pub processes: Vec<ProcessReadings>,
    /// Peak of the processes' summed RSS (not the sum of their peaks).
    pub rss_peak_bytes: u64,
    pub slab_before_bytes: u64,
    pub slab_after_ramp_bytes: u64,
    /// CLOCK_MONOTONIC at the end of the ramp and of the settle (0: not read).
    pub ramp_done_ns: u64,
    pub after_ramp_ns: u64,
}

impl ServerReadings {
    /// Before the ramp; None without `--server-pid`. A process that cannot be
    /// read now is an error: the run would report nothing about it.
    pub fn before(pids: &[u32]) -> Result<Option<ServerReadings>, String> {
        if pids.is_empty() {
            return Ok(None);
        }
        let mut processes = Vec::with_capacity(pids.len());
        for &pid in pids {
            let sample = procfs::sample_process(pid)?;
            processes.push(ProcessReadings {
                pid,
                rss_before_bytes: sample.rss_bytes,
                pss_before_bytes: procfs::pss_bytes(pid).unwrap_or(0),
                cpu_before_ns: sample.cpu_ns,
                ..Default::default()
            });
        }
        Ok(Some(ServerReadings { processes, slab_before_bytes: procfs::slab_bytes()?, ..Default::default() }))
    }

    /// When the ramp is done: the start of the settle, whose CPU time is the
    /// servers' cost of holding idle connections. A process that cannot be
    /// read now is read again after the settle (and fails the run then).
    pub fn ramp_done(&mut self) {
        for process in &mut self.processes {
            if let Ok(sample) = procfs::sample_process(process.pid) {
                process.cpu_ramp_done_ns = sample.cpu_ns;
            }
        }
        self.ramp_done_ns = sys::monotonic_ns();
    }

    /// After the ramp and settle: the baseline of the per-connection figures.
    pub fn after_ramp(&mut self) -> Result<(), String> {
        self.after_ramp_ns = sys::monotonic_ns();
        for process in &mut self.processes {
            let sample = procfs::sample_process(process.pid)?;
            process.rss_after_ramp_bytes = sample.rss_bytes;
            process.pss_after_ramp_bytes = procfs::pss_bytes(process.pid).unwrap_or(0);
            process.rss_peak_bytes = sample.rss_bytes;
            process.cpu_mark_ns = sample.cpu_ns;
        }
        self.rss_peak_bytes = self.processes.iter().map(|p| p.rss_after_ramp_bytes).sum();
        self.slab_after_ramp_bytes = procfs::slab_bytes()?;
        Ok(())
    }

    /// During the measured phase: peaks only; a process that cannot be read
    /// this time is skipped.
    pub fn peak(&mut self) {
        let mut total_bytes = 0;
        for process in &mut self.processes {
            if let Ok(sample) = procfs::sample_process(process.pid) {
                process.rss_peak_bytes = process.rss_peak_bytes.max(sample.rss_bytes);
                total_bytes += sample.rss_bytes;
            }
        }
        self.rss_peak_bytes = self.rss_peak_bytes.max(total_bytes);
    }

    /// At the end. The connect scenario has no ramp/measured split: its
    /// "after the ramp" is the end, measured from the start.
    pub fn end(&mut self, connect: bool) {
        let mut total_bytes = 0;
        for process in &mut self.processes {
            let Ok(sample) = procfs::sample_process(process.pid) else { continue };
            process.rss_end_bytes = sample.rss_bytes;
            process.rss_peak_bytes = process.rss_peak_bytes.max(sample.rss_bytes);
            process.cpu_end_ns = sample.cpu_ns;
            total_bytes += sample.rss_bytes;
            if connect {
                process.rss_after_ramp_bytes = sample.rss_bytes;
                process.cpu_mark_ns = process.cpu_before_ns;
            }
        }
        self.rss_peak_bytes = self.rss_peak_bytes.max(total_bytes);
        if connect {
            self.slab_after_ramp_bytes = self.slab_before_bytes;
        }
    }
}

/// The generator's own memory: the summed RSS of its worker processes (the
/// parent holds no client sockets), read when the servers' is.
#[derive(Debug, Clone, Default)]
pub struct GeneratorReadings {
    pids: Vec<u32>,
    /// After the ramp and settle (for the connect scenario: at the end).
    pub rss_after_ramp_bytes: u64,
    /// The private part of it (RssAnon), at the same moment.
    pub anon_after_ramp_bytes: u64,
    pub rss_peak_bytes: u64,
}

impl GeneratorReadings {
    pub fn new(pids: Vec<u32>) -> GeneratorReadings {
        GeneratorReadings { pids, ..Default::default() }
    }

    /// (RSS, anonymous RSS) summed; a worker that cannot be read (one that
    /// already exited) counts as 0.
    fn total_bytes(&self) -> (u64, u64) {
        let samples = self.pids.iter().filter_map(|&pid| procfs::sample_process(pid).ok());
        samples.fold((0, 0), |(rss, anon), s| (rss + s.rss_bytes, anon + s.anon_bytes))
    }

    pub fn after_ramp(&mut self) {
        (self.rss_after_ramp_bytes, self.anon_after_ramp_bytes) = self.total_bytes();
        self.rss_peak_bytes = self.rss_peak_bytes.max(self.rss_after_ramp_bytes);
    }

    pub fn peak(&mut self) {
        self.rss_peak_bytes = self.rss_peak_bytes.max(self.total_bytes().0);
    }
}

/// One `--url`, resolved, and its share of the connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlUsed {
    pub url: String,
    pub address: std::net::SocketAddr,
}

/// Everything the report is built from.
pub struct Inputs<'a> {
    pub scenario: Scenario,
    pub parameters: serde_json::Value,
    pub requested: u64,
    pub workers: &'a [WorkerResult],
    /// In `--url` order; connection n went to URL n mod len.
    pub urls: &'a [UrlUsed],
    pub publish: Option<&'a PublishOutcome>,
    /// Broadcast with `--groups`: which publications went to which channel.
    pub groups: Groups,
    pub server: Option<ServerReadings>,
    pub generator_memory: GeneratorReadings,
    /// Both ends of each connection live on this host (loopback target).
    pub sockets_per_connection: u64,
    pub generator_cpu_ns: u64,
    pub generator_cpu_run_ns: u64,
    pub wall_ns: u64,
    pub interrupted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub parameters: serde_json::Value,
    pub interrupted: bool,
    pub wall_s: f64,
    pub connections: Connections,
    /// With several `--url`: what each one got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<Target>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publications: Option<Publications>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Deliveries>,
    pub latency_ms: LatencyReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    pub generator: Generator,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub requested: u64,
    /// Connections that became established (upgraded, and subscribed for Kometa).
    pub established: u64,
    pub open_at_end: u64,
    pub handshakes: u64,
    pub connect_errors_total: u64,
    pub connect_errors: BTreeMap<String, u64>,
    pub disconnects_total: u64,
    pub disconnects: BTreeMap<String, u64>,
    pub ramp_s: f64,
    pub connects_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub url: String,
    pub address: String,
    /// Connections assigned to it, round-robin (connect: handshakes).
    pub connections: u64,
    /// Established here on their first connect.
    pub established: u64,
    /// Churn: resumes established here (each resume moves to the next URL).
    pub resumed: u64,
    pub connect_errors: u64,
    pub disconnects: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Publications {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
    pub error: Option<String>,
    pub duration_s: f64,
    pub rate_per_s: f64,
    pub late: u64,
    pub first_offset: Option<u64>,
    pub final_offset: Option<u64>,
    pub subscribers_reported_min: Option<u64>,
    pub subscribers_reported_max: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deliveries {
    pub total: u64,
    pub unique: u64,
    pub expected: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub not_recovered: u64,
    pub unexpected: u64,
    /// `--groups`: pushes of a group channel the subscriber had not joined.
    pub misrouted: u64,
    pub before_reply: u64,
    pub other_messages: u64,
    /// From the first to the last delivery of the run.
    pub per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub handshake: Percentiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Percentiles>,
    /// Per publication: until the last subscriber had it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_subscriber: Option<Percentiles>,
    /// `--groups`: the same for the publications to the broadcast channel
    /// (every subscriber) and to the group channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_subscriber_broadcast: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_subscriber_groups: Option<Percentiles>,
    /// Per publication: until the server acknowledged it to the publisher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_ack: Option<Percentiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    pub churned: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    pub replayed: u64,
}

/// The server's figures; with several `--server-pid`, sums over the processes.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    /// With one `--server-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub rss_before_bytes: u64,
    pub rss_after_ramp_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    /// (RSS after the ramp − before) / established connections.
    pub rss_growth_per_connection_bytes: f64,
    /// Proportional set size, summed over the processes: the executable's
    /// pages, which every node maps, counted once instead of per node.
    pub pss_before_bytes: u64,
    pub pss_after_ramp_bytes: u64,
    pub pss_growth_per_connection_bytes: f64,
    pub slab_before_bytes: u64,
    pub slab_after_ramp_bytes: u64,
    pub slab_growth_per_connection_bytes: f64,
    /// Sockets each connection adds to this kernel: 2 when the server is on loopback (both ends).
    pub sockets_per_connection: u64,
    pub slab_per_socket_bytes: f64,
    pub cpu_s: f64,
    /// From the start of the measured phase to the end.
    pub cpu_run_s: f64,
    /// The settle (`--settle`, after the ramp, before the measured phase):
    /// how long it was, and the CPU the servers spent holding idle connections.
    pub settle_s: f64,
    pub cpu_settle_s: f64,
    /// With several `--server-pid`: each process.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ServerProcess>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerProcess {
    pub pid: u32,
    pub rss_before_bytes: u64,
    pub rss_after_ramp_bytes: u64,
    pub pss_before_bytes: u64,
    pub pss_after_ramp_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    pub cpu_s: f64,
    pub cpu_run_s: f64,
    pub cpu_settle_s: f64,
}

/// CPU time between the end of the ramp and the end of the settle.
fn settle_cpu_ns(p: &ProcessReadings) -> u64 {
    if p.cpu_ramp_done_ns == 0 {
        return 0;
    }
    p.cpu_mark_ns.saturating_sub(p.cpu_ramp_done_ns)
}

impl ServerProcess {
    fn of(p: &ProcessReadings) -> ServerProcess {
        ServerProcess {
            pid: p.pid,
            rss_before_bytes: p.rss_before_bytes,
            rss_after_ramp_bytes: p.rss_after_ramp_bytes,
            pss_before_bytes: p.pss_before_bytes,
            pss_after_ramp_bytes: p.pss_after_ramp_bytes,
            rss_peak_bytes: p.rss_peak_bytes.max(p.rss_after_ramp_bytes).max(p.rss_end_bytes),
            rss_end_bytes: p.rss_end_bytes,
            cpu_s: seconds(p.cpu_end_ns.saturating_sub(p.cpu_before_ns)),
            cpu_run_s: seconds(p.cpu_end_ns.saturating_sub(p.cpu_mark_ns)),
            cpu_settle_s: seconds(settle_cpu_ns(p)),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generator {
    pub workers: usize,
    pub cpu_s: f64,
    pub cpu_run_s: f64,
    /// The busiest worker's CPU time over its wall time in the measured phase (1.0 = one core saturated).
    pub busiest_worker_cpu_share: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_to_generator_cpu_run_ratio: Option<f64>,
    /// Summed RSS of the workers after the ramp, and per established
    /// connection; the anonymous part leaves out the executable's pages,
    /// which every worker maps and counts.
    pub rss_after_ramp_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_per_connection_bytes: f64,
    pub anon_after_ramp_bytes: u64,
    pub anon_per_connection_bytes: f64,
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn per_second(count: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        count as f64 / seconds(ns)
    }
}

fn add_maps(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (kind, count) in from {
        *into.entry(kind.clone()).or_default() += count;
    }
}

/// Span from the earliest start to the latest end over (start, end) pairs; 0-starts are ignored.
fn span_ns(pairs: impl Iterator<Item = (u64, u64)>) -> u64 {
    let (mut first, mut last) = (u64::MAX, 0);
    for (start, end) in pairs.filter(|(start, _)| *start > 0) {
        first = first.min(start);
        last = last.max(end);
    }
    last.saturating_sub(first)
}

pub fn build(inputs: &Inputs<'_>) -> Report {
    let workers = inputs.workers;
    let mut connect_errors = BTreeMap::new();
    let mut disconnects = BTreeMap::new();
    let mut deliveries = DeliveryCounts::default();
    let (mut expected, mut missing) = (0, 0);
    let mut latency = Latency::new();
    let mut handshake = Latency::new();
    let sum = |f: fn(&WorkerResult) -> u64| workers.iter().map(f).sum::<u64>();
    for worker in workers {
        add_maps(&mut connect_errors, &worker.connect_errors);
        add_maps(&mut disconnects, &worker.disconnects);
        deliveries.add(&worker.deliveries);
        expected = worker.expected.saturating_add(expected);
        missing = worker.missing.saturating_add(missing);
        latency.merge_pairs(&worker.latency_us);
        handshake.merge_pairs(&worker.handshake_us);
    }
    let established = sum(|w| w.progress.established);
    let handshakes = sum(|w| w.progress.handshakes);
    let connect = inputs.scenario == Scenario::Connect;
    let ramp_ns = if connect {
        span_ns(workers.iter().map(|w| (w.connect_started_ns, w.connect_done_ns)))
    } else {
        span_ns(workers.iter().map(|w| (w.ramp_started_ns, w.ramp_done_ns)))
    };
    let connections = Connections {
        requested: inputs.requested,
        established,
        open_at_end: sum(|w| w.progress.open),
        handshakes,
        connect_errors_total: connect_errors.values().sum(),
        connect_errors,
        disconnects_total: disconnects.values().sum(),
        disconnects,
        ramp_s: seconds(ramp_ns),
        connects_per_s: per_second(if connect { handshakes } else { established }, ramp_ns),
    };

    let publishing = matches!(inputs.scenario, Scenario::Broadcast | Scenario::Churn);
    let publications = inputs.publish.filter(|_| publishing).map(|p| {
        let duration_ns = p.ended_ns.saturating_sub(p.started_ns);
        Publications {
            sent: p.sent,
            accepted: p.accepted,
            rejected: p.rejected.clone(),
            error: p.error.clone(),
            duration_s: seconds(duration_ns),
            rate_per_s: per_second(p.sent, duration_ns),
            late: p.late,
            first_offset: p.first_offset,
            final_offset: p.final_offset,
            subscribers_reported_min: p.subscribers_min,
            subscribers_reported_max: p.subscribers_max,
        }
    });
    let delivery_span_ns = span_ns(workers.iter().map(|w| (w.first_delivery_ns, w.last_delivery_ns)));
    let deliveries = (publishing || deliveries.total > 0).then(|| Deliveries {
        total: deliveries.total,
        unique: deliveries.unique,
        expected,
        missing,
        duplicates: deliveries.duplicates,
        gaps: deliveries.gaps,
        not_recovered: sum(|w| w.not_recovered),
        unexpected: sum(|w| w.unexpected),
        misrouted: sum(|w| w.misrouted),
        before_reply: sum(|w| w.before_reply),
        other_messages: sum(|w| w.other_messages),
        per_s: per_second(deliveries.total, delivery_span_ns),
    });

    let broadcast = inputs.scenario == Scenario::Broadcast;
    let merged = if broadcast {
        let parts: Vec<Vec<(u64, u64)>> = workers.iter().map(|w| w.last_arrival_ns.clone()).collect();
        merge_last_arrivals(&parts)
    } else {
        BTreeMap::new()
    };
    let last_of = |keep: &dyn Fn(u64) -> bool| {
        let mut last = Latency::new();
        for (_, &latency_ns) in merged.iter().filter(|(&seq, _)| keep(seq)) {
            last.record_ns(latency_ns);
        }
        last.summary()
    };
    let grouped = broadcast && inputs.groups.count > 0;
    let latency_ms = LatencyReport {
        handshake: handshake.summary(),
        delivery: deliveries.as_ref().map(|_| latency.summary()),
        last_subscriber: broadcast.then(|| last_of(&|_| true)),
        last_subscriber_broadcast: grouped.then(|| last_of(&|seq| inputs.groups.of_publication(seq).is_none())),
        last_subscriber_groups: grouped.then(|| last_of(&|seq| inputs.groups.of_publication(seq).is_some())),
        publish_ack: inputs.publish.filter(|_| publishing).map(|p| p.ack),
    };

    let churn = (inputs.scenario == Scenario::Churn).then(|| Churn {
        churned: sum(|w| w.churned),
        recovered: sum(|w| w.recovered),
        not_recovered: sum(|w| w.not_recovered),
        replayed: sum(|w| w.replayed),
    });

    let targets = (inputs.urls.len() > 1).then(|| {
        let assigned = ramp::split(inputs.requested, inputs.urls.len() as u64);
        let counts = |t: usize, f: fn(&super::wire::TargetCounts) -> u64| {
            workers.iter().filter_map(|w| w.targets.get(t)).map(f).sum::<u64>()
        };
        let targets = inputs.urls.iter().zip(assigned).enumerate();
        targets
            .map(|(t, (url, connections))| Target {
                url: url.url.clone(),
                address: url.address.to_string(),
                connections,
                established: counts(t, |c| c.established),
                resumed: counts(t, |c| c.resumed),
                connect_errors: counts(t, |c| c.connect_errors),
                disconnects: counts(t, |c| c.disconnects),
            })
            .collect()
    });

    let per_connection = |delta: f64| if established == 0 { 0.0 } else { delta / established as f64 };
    let server = inputs.server.as_ref().map(|s| {
        let total = |f: fn(&ProcessReadings) -> u64| s.processes.iter().map(f).sum::<u64>();
        let (rss_before, rss_after_ramp, rss_end) =
            (total(|p| p.rss_before_bytes), total(|p| p.rss_after_ramp_bytes), total(|p| p.rss_end_bytes));
        let slab_growth = per_connection(s.slab_after_ramp_bytes as f64 - s.slab_before_bytes as f64);
        Server {
            pid: match s.processes.as_slice() {
                [only] => Some(only.pid),
                _ => None,
            },
            rss_before_bytes: rss_before,
            rss_after_ramp_bytes: rss_after_ramp,
            rss_peak_bytes: s.rss_peak_bytes.max(rss_after_ramp).max(rss_end),
            rss_end_bytes: rss_end,
            rss_growth_per_connection_bytes: per_connection(rss_after_ramp as f64 - rss_before as f64),
            pss_before_bytes: total(|p| p.pss_before_bytes),
            pss_after_ramp_bytes: total(|p| p.pss_after_ramp_bytes),
            pss_growth_per_connection_bytes: per_connection(
                total(|p| p.pss_after_ramp_bytes) as f64 - total(|p| p.pss_before_bytes) as f64,
            ),
            slab_before_bytes: s.slab_before_bytes,
            slab_after_ramp_bytes: s.slab_after_ramp_bytes,
            slab_growth_per_connection_bytes: slab_growth,
            sockets_per_connection: inputs.sockets_per_connection,
            slab_per_socket_bytes: slab_growth / inputs.sockets_per_connection.max(1) as f64,
            cpu_s: seconds(total(|p| p.cpu_end_ns.saturating_sub(p.cpu_before_ns))),
            cpu_run_s: seconds(total(|p| p.cpu_end_ns.saturating_sub(p.cpu_mark_ns))),
            settle_s: if s.ramp_done_ns == 0 { 0.0 } else { seconds(s.after_ramp_ns.saturating_sub(s.ramp_done_ns)) },
            cpu_settle_s: seconds(total(settle_cpu_ns)),
            processes: if s.processes.len() > 1 { s.processes.iter().map(ServerProcess::of).collect() } else { vec![] },
        }
    });

    let busiest = workers
        .iter()
        .filter(|w| w.wall_run_ns > 0)
        .map(|w| w.cpu_run_ns as f64 / w.wall_run_ns as f64)
        .fold(0.0, f64::max);
    let generator = Generator {
        workers: workers.len(),
        cpu_s: seconds(inputs.generator_cpu_ns),
        cpu_run_s: seconds(inputs.generator_cpu_run_ns),
        busiest_worker_cpu_share: busiest,
        server_to_generator_cpu_run_ratio: server
            .as_ref()
            .filter(|_| inputs.generator_cpu_run_ns > 0)
            .map(|s| s.cpu_run_s / seconds(inputs.generator_cpu_run_ns)),
        rss_after_ramp_bytes: inputs.generator_memory.rss_after_ramp_bytes,
        rss_peak_bytes: inputs.generator_memory.rss_peak_bytes,
        rss_per_connection_bytes: per_connection(inputs.generator_memory.rss_after_ramp_bytes as f64),
        anon_after_ramp_bytes: inputs.generator_memory.anon_after_ramp_bytes,
        anon_per_connection_bytes: per_connection(inputs.generator_memory.anon_after_ramp_bytes as f64),
    };

    let mut warnings = Vec::new();
    if inputs.interrupted {
        warnings.push("interrupted: figures cover only part of the run".into());
    }
    if !connect && established < inputs.requested {
        warnings.push(format!("only {established} of {} connections were established", inputs.requested));
    }
    if let Some(d) = &deliveries {
        if d.missing > 0 || d.duplicates > 0 || d.gaps > 0 {
            warnings.push(format!(
                "delivery was not exactly once: {} missing, {} duplicates, {} gaps",
                d.missing, d.duplicates, d.gaps
            ));
        }
        if d.misrouted > 0 {
            warnings.push(format!("{} pushes reached subscribers of another group", d.misrouted));
        }
    }
    if let Some(p) = &publications {
        if let Some(error) = &p.error {
            warnings.push(format!("publishing stopped early: {error}"));
        }
        if !p.rejected.is_empty() {
            warnings.push(format!("the server rejected publications: {:?}", p.rejected));
        }
    }
    if busiest > 0.9 {
        warnings.push(format!(
            "a worker was busy {:.0}% of the measured phase: the generator may be the bottleneck (add --workers, or cores)",
            busiest * 100.0
        ));
    }

    Report {
        scenario: inputs.scenario.name(),
        parameters: inputs.parameters.clone(),
        interrupted: inputs.interrupted,
        wall_s: seconds(inputs.wall_ns),
        connections,
        targets,
        publications,
        deliveries,
        latency_ms,
        churn,
        server,
        generator,
        warnings,
    }
}

fn bytes(value: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", value as f64 / MIB)
}

/// RSS readings: before, after the ramp, peak, at the end.
fn rss([before, after_ramp, peak, end]: [u64; 4]) -> String {
    format!(
        "{} before, {} after the ramp, {} peak, {} at the end",
        bytes(before),
        bytes(after_ramp),
        bytes(peak),
        bytes(end)
    )
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  ({} values)",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
    )
}

fn kinds(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter().map(|(kind, count)| format!("{kind} {count}")).collect::<Vec<_>>().join(", ")
}

impl Report {
    /// The human-readable form printed to stdout.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let c = &self.connections;
        let _ = writeln!(out, "scenario       {}  ({:.1} s wall)", self.scenario, self.wall_s);
        let _ = writeln!(
            out,
            "connections    {}/{} established in {:.2} s ({:.0}/s), {} open at the end",
            c.established, c.requested, c.ramp_s, c.connects_per_s, c.open_at_end
        );
        if self.scenario == "connect" {
            let _ = writeln!(out, "handshakes     {} ({:.0}/s)", c.handshakes, c.connects_per_s);
        }
        let _ = writeln!(out, "connect errors {}", kinds(&c.connect_errors));
        let _ = writeln!(out, "disconnects    {}", kinds(&c.disconnects));
        for t in self.targets.iter().flatten() {
            let resumed = if self.churn.is_some() { format!(", {} resumed here", t.resumed) } else { String::new() };
            let _ = writeln!(
                out,
                "url            {} ({}): {}/{} established, {} connect errors, {} disconnects{resumed}",
                t.url, t.address, t.established, t.connections, t.connect_errors, t.disconnects
            );
        }
        let _ = writeln!(out, "handshake      {}", percentiles(&self.latency_ms.handshake));
        if let Some(p) = &self.publications {
            let _ = writeln!(
                out,
                "publications   {} sent, {} accepted in {:.2} s ({:.1}/s), {} late; rejected: {}",
                p.sent,
                p.accepted,
                p.duration_s,
                p.rate_per_s,
                p.late,
                kinds(&p.rejected)
            );
        }
        if let Some(d) = &self.deliveries {
            let _ = writeln!(
                out,
                "deliveries     {}/{} expected ({:.0}/s); missing {}, duplicates {}, gaps {}, unexpected {}",
                d.total, d.expected, d.per_s, d.missing, d.duplicates, d.gaps, d.unexpected
            );
        }
        if let Some(p) = &self.latency_ms.delivery {
            let _ = writeln!(out, "latency        {}", percentiles(p));
        }
        if let Some(p) = &self.latency_ms.last_subscriber {
            let _ = writeln!(out, "last subscriber {}", percentiles(p));
        }
        if let Some(p) = &self.latency_ms.last_subscriber_broadcast {
            let _ = writeln!(out, "  to everyone  {}", percentiles(p));
        }
        if let Some(p) = &self.latency_ms.last_subscriber_groups {
            let _ = writeln!(out, "  to a group   {}", percentiles(p));
        }
        if let Some(d) = self.deliveries.as_ref().filter(|_| self.latency_ms.last_subscriber_groups.is_some()) {
            let _ =
                writeln!(out, "misrouted      {} (pushes of a group channel to a subscriber of another)", d.misrouted);
        }
        if let Some(p) = &self.latency_ms.publish_ack {
            let _ = writeln!(out, "publish ack    {}", percentiles(p));
        }
        if let Some(churn) = &self.churn {
            let _ = writeln!(
                out,
                "churn          {} disconnects, {} resumed, {} not recovered, {} replayed",
                churn.churned, churn.recovered, churn.not_recovered, churn.replayed
            );
        }
        let summed = |s: &Server| match s.processes.len() {
            0 | 1 => String::new(),
            count => format!(" (sum of {count} processes)"),
        };
        if let Some(s) = self.server.as_ref().filter(|_| self.scenario != "connect") {
            let _ = writeln!(
                out,
                "server RSS     {}: {:.0} B per connection{}",
                rss([s.rss_before_bytes, s.rss_after_ramp_bytes, s.rss_peak_bytes, s.rss_end_bytes]),
                s.rss_growth_per_connection_bytes,
                summed(s)
            );
            if s.processes.len() > 1 && s.pss_before_bytes > 0 {
                let _ = writeln!(
                    out,
                    "server PSS     {} before, {} after the ramp: {:.0} B per connection (shared pages counted once)",
                    bytes(s.pss_before_bytes),
                    bytes(s.pss_after_ramp_bytes),
                    s.pss_growth_per_connection_bytes
                );
            }
            let _ = writeln!(
                out,
                "kernel slab    +{:.0} B per connection ({} sockets each): {:.0} B per socket",
                s.slab_growth_per_connection_bytes, s.sockets_per_connection, s.slab_per_socket_bytes
            );
        }
        let settle = |s: &Server, cpu_s: f64| {
            if s.settle_s > 0.0 {
                format!(", {cpu_s:.2} s in the {:.1} s settle", s.settle_s)
            } else {
                String::new()
            }
        };
        if let Some(s) = &self.server {
            let _ = writeln!(
                out,
                "server CPU     {:.2} s total, {:.2} s in the measured phase{}{}",
                s.cpu_s,
                s.cpu_run_s,
                settle(s, s.cpu_settle_s),
                summed(s)
            );
            for p in &s.processes {
                let rss = if self.scenario == "connect" {
                    String::new()
                } else {
                    let readings = [p.rss_before_bytes, p.rss_after_ramp_bytes, p.rss_peak_bytes, p.rss_end_bytes];
                    format!("RSS {}; ", rss(readings))
                };
                let _ = writeln!(
                    out,
                    "server pid {:<4} {rss}CPU {:.2} s total, {:.2} s in the measured phase{}",
                    p.pid,
                    p.cpu_s,
                    p.cpu_run_s,
                    settle(s, p.cpu_settle_s)
                );
            }
        }
        let g = &self.generator;
        let _ = writeln!(
            out,
            "generator CPU  {:.2} s total, {:.2} s in the measured phase, {} workers, busiest {:.0}%{}",
            g.cpu_s,
            g.cpu_run_s,
            g.workers,
            g.busiest_worker_cpu_share * 100.0,
            g.server_to_generator_cpu_run_ratio.map(|r| format!(", server/generator {r:.2}")).unwrap_or_default()
        );
        if g.rss_after_ramp_bytes > 0 {
            let _ = writeln!(
                out,
                "generator RSS  {} in {} workers after the ramp ({:.0} B per connection; anonymous {}, {:.0} B), {} peak",
                bytes(g.rss_after_ramp_bytes),
                g.workers,
                g.rss_per_connection_bytes,
                bytes(g.anon_after_ramp_bytes),
                g.anon_per_connection_bytes,
                bytes(g.rss_peak_bytes)
            );
        }
        for warning in &self.warnings {
            let _ = writeln!(out, "warning: {warning}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Progress, TargetCounts};

    fn worker(id: u32, established: u64, deliveries: u64, latency_us: u64) -> WorkerResult {
        let mut w = WorkerResult {
            worker: id,
            progress: Progress { established, open: established, handshakes: established, ..Default::default() },
            ramp_started_ns: 1_000_000_000,
            ramp_done_ns: 2_000_000_000 + u64::from(id) * 1_000_000_000,
            deliveries: DeliveryCounts { total: deliveries, unique: deliveries, duplicates: 0, gaps: 0 },
            expected: deliveries,
            first_delivery_ns: 10_000_000_000,
            last_delivery_ns: 12_000_000_000,
            latency_us: vec![(latency_us, deliveries)],
            handshake_us: vec![(100, established)],
            last_arrival_ns: vec![(0, latency_us * 1000), (1, latency_us * 2000)],
            cpu_run_ns: 500_000_000,
            wall_run_ns: 1_000_000_000,
            ..Default::default()
        };
        w.connect_errors.insert("refused".into(), u64::from(id));
        w
    }

    fn inputs<'a>(workers: &'a [WorkerResult], publish: &'a PublishOutcome) -> Inputs<'a> {
        Inputs {
            scenario: Scenario::Broadcast,
            parameters: serde_json::json!({"connections": 300}),
            requested: 300,
            workers,
            publish: Some(publish),
            groups: Groups::default(),
            urls: &[],
            server: Some(ServerReadings {
                processes: vec![ProcessReadings {
                    pid: 7,
                    rss_before_bytes: 10_000_000,
                    rss_after_ramp_bytes: 10_300_000,
                    cpu_before_ns: 0,
                    cpu_mark_ns: 1_000_000_000,
                    cpu_end_ns: 3_000_000_000,
                    ..Default::default()
                }],
                slab_before_bytes: 1_000_000,
                slab_after_ramp_bytes: 3_400_000,
                ..Default::default()
            }),
            generator_memory: GeneratorReadings::default(),
            sockets_per_connection: 2,
            generator_cpu_ns: 2_000_000_000,
            generator_cpu_run_ns: 1_000_000_000,
            wall_ns: 5_000_000_000,
            interrupted: false,
        }
    }

    #[test]
    fn merges_workers_into_one_consistent_report() {
        let workers = vec![worker(0, 150, 1500, 200), worker(1, 150, 1500, 800)];
        let publish = PublishOutcome {
            sent: 10,
            accepted: 10,
            started_ns: 10_000_000_000,
            ended_ns: 11_000_000_000,
            ..Default::default()
        };
        let report = build(&inputs(&workers, &publish));
        assert_eq!(report.connections.established, 300);
        assert_eq!(report.connections.connect_errors.get("refused"), Some(&1));
        // Ramp from the first start (1 s) to the last done (3 s).
        assert!((report.connections.ramp_s - 2.0).abs() < 1e-9);
        assert!((report.connections.connects_per_s - 150.0).abs() < 1e-9);
        let deliveries = report.deliveries.as_ref().unwrap();
        assert_eq!((deliveries.total, deliveries.expected, deliveries.missing), (3000, 3000, 0));
        assert!((deliveries.per_s - 1500.0).abs() < 1e-9);
        let delivery = report.latency_ms.delivery.unwrap();
        assert!((delivery.p50_ms - 0.2).abs() < 0.001 && (delivery.max_ms - 0.8).abs() < 0.001, "{delivery:?}");
        // The last subscriber of each publication is on worker 1.
        let last = report.latency_ms.last_subscriber.unwrap();
        assert_eq!(last.count, 2);
        assert!((last.max_ms - 1.6).abs() < 0.01, "{last:?}");
        let server = report.server.as_ref().unwrap();
        assert!((server.rss_growth_per_connection_bytes - 1000.0).abs() < 1e-9);
        assert!((server.slab_per_socket_bytes - 4000.0).abs() < 1e-9);
        assert!((server.cpu_run_s - 2.0).abs() < 1e-9);
        assert_eq!(report.generator.server_to_generator_cpu_run_ratio, Some(2.0));
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert!(report.text().contains("300/300 established"));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let workers = vec![worker(0, 100, 100, 50)];
        let publish = PublishOutcome::default();
        let mut inputs = inputs(&workers, &publish);
        inputs.requested = 200;
        let json = serde_json::to_value(build(&inputs)).unwrap();
        for pointer in [
            "/scenario",
            "/parameters/connections",
            "/connections/established",
            "/connections/connect_errors",
            "/connections/connects_per_s",
            "/publications/sent",
            "/deliveries/missing",
            "/deliveries/duplicates",
            "/deliveries/per_s",
            "/latency_ms/delivery/p50_ms",
            "/latency_ms/delivery/p999_ms",
            "/latency_ms/last_subscriber/max_ms",
            "/server/rss_growth_per_connection_bytes",
            "/server/slab_per_socket_bytes",
            "/server/cpu_run_s",
            "/generator/cpu_run_s",
        ] {
            assert!(json.pointer(pointer).is_some(), "{pointer} missing in {json}");
        }
        assert_eq!(json["scenario"], "broadcast");
        assert!(json["warnings"][0].as_str().unwrap().contains("only 100 of 200"));
    }

    #[test]
    fn one_url_and_one_pid_report_as_before() {
        let workers = vec![worker(0, 300, 300, 50)];
        let publish = PublishOutcome::default();
        let urls = [UrlUsed { url: "ws://127.0.0.1:1/ws".into(), address: "127.0.0.1:1".parse().unwrap() }];
        let mut inputs = inputs(&workers, &publish);
        inputs.urls = &urls;
        let report = build(&inputs);
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("targets").is_none());
        assert_eq!(json["server"]["pid"], 7);
        assert!(json["server"].get("processes").is_none());
        let text = report.text();
        assert!(!text.contains("url ") && !text.contains("sum of") && !text.contains("server pid"), "{text}");
    }

    #[test]
    fn several_urls_and_pids_are_listed_and_summed() {
        let mut workers = vec![worker(0, 2, 2, 50), worker(1, 3, 3, 50)];
        let counts =
            |established, resumed, disconnects| TargetCounts { established, resumed, disconnects, connect_errors: 0 };
        workers[0].targets = vec![counts(1, 4, 0), counts(1, 0, 2)];
        workers[1].targets = vec![counts(2, 1, 0), counts(0, 3, 0)];
        workers[1].targets[1].connect_errors = 1;
        let publish = PublishOutcome::default();
        let urls = [
            UrlUsed { url: "ws://127.0.0.1:1/ws".into(), address: "127.0.0.1:1".parse().unwrap() },
            UrlUsed { url: "ws://127.0.0.1:2/ws".into(), address: "127.0.0.1:2".parse().unwrap() },
        ];
        let mut inputs = inputs(&workers, &publish);
        inputs.scenario = Scenario::Churn;
        inputs.requested = 5;
        inputs.urls = &urls;
        let server = inputs.server.as_mut().unwrap();
        let mut second = server.processes[0];
        second.pid = 8;
        second.rss_end_bytes = 20_000_000;
        second.cpu_end_ns = 2_000_000_000;
        server.processes.push(second);
        server.rss_peak_bytes = 25_000_000;
        let report = build(&inputs);

        let targets = report.targets.as_ref().unwrap();
        // Five connections round-robin over two URLs: 3 and 2.
        assert_eq!(targets.iter().map(|t| t.connections).collect::<Vec<_>>(), [3, 2]);
        assert_eq!((targets[0].established, targets[0].resumed, targets[0].disconnects), (3, 5, 0));
        assert_eq!((targets[1].established, targets[1].resumed, targets[1].connect_errors), (1, 3, 1));
        assert_eq!(targets[1].address, "127.0.0.1:2");
        let s = report.server.as_ref().unwrap();
        assert_eq!(s.pid, None);
        assert_eq!((s.rss_before_bytes, s.rss_end_bytes), (20_000_000, 20_000_000));
        assert_eq!(s.rss_peak_bytes, 25_000_000);
        assert!((s.cpu_s - 5.0).abs() < 1e-9 && (s.cpu_run_s - 3.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), [7, 8]);
        assert!((s.processes[1].cpu_run_s - 1.0).abs() < 1e-9);
        assert_eq!(s.processes[1].rss_peak_bytes, 20_000_000);
        let text = report.text();
        assert!(text.contains("url            ws://127.0.0.1:2/ws (127.0.0.1:2): 1/2 established"), "{text}");
        assert!(text.contains("3 resumed here") && text.contains("(sum of 2 processes)"), "{text}");
        assert!(text.contains("server pid 8    RSS"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.pointer("/server/pid").is_none() && json.pointer("/server/processes/1/cpu_run_s").is_some());
        assert_eq!(json.pointer("/targets/0/resumed"), Some(&serde_json::json!(5)));
    }

    #[test]
    fn groups_split_the_last_subscriber_and_misrouted_pushes_warn() {
        // Publications 0 and 3 went to everyone, 1 and 2 to a group (two groups).
        let mut workers = vec![worker(0, 10, 10, 50)];
        workers[0].last_arrival_ns = vec![(0, 9_000_000), (1, 1_000_000), (2, 2_000_000), (3, 7_000_000)];
        workers[0].misrouted = 2;
        let publish = PublishOutcome::default();
        let mut inputs = inputs(&workers, &publish);
        inputs.groups = Groups { count: 2 };
        let report = build(&inputs);
        let everyone = report.latency_ms.last_subscriber_broadcast.unwrap();
        let groups = report.latency_ms.last_subscriber_groups.unwrap();
        assert_eq!((everyone.count, groups.count, report.latency_ms.last_subscriber.unwrap().count), (2, 2, 4));
        assert!((everyone.max_ms - 9.0).abs() < 0.01 && (groups.max_ms - 2.0).abs() < 0.01, "{everyone:?} {groups:?}");
        assert_eq!(report.deliveries.as_ref().unwrap().misrouted, 2);
        assert!(report.warnings.iter().any(|w| w.contains("another group")), "{:?}", report.warnings);
        assert!(report.text().contains("  to everyone  p50"));
        // Without groups the split is absent.
        let json = serde_json::to_value(build(&super::tests::inputs(&workers, &publish))).unwrap();
        assert!(json.pointer("/latency_ms/last_subscriber_broadcast").is_none());
    }

    #[test]
    fn settle_cpu_and_generator_memory_are_reported() {
        let workers = vec![worker(0, 150, 0, 50), worker(1, 150, 0, 50)];
        let publish = PublishOutcome::default();
        let mut inputs = inputs(&workers, &publish);
        let server = inputs.server.as_mut().unwrap();
        server.processes[0].cpu_ramp_done_ns = 400_000_000;
        (server.ramp_done_ns, server.after_ramp_ns) = (5_000_000_000, 15_000_000_000);
        inputs.generator_memory.rss_after_ramp_bytes = 60_000_000;
        inputs.generator_memory.anon_after_ramp_bytes = 30_000_000;
        inputs.generator_memory.rss_peak_bytes = 61_000_000;
        let report = build(&inputs);
        let server = report.server.as_ref().unwrap();
        // CPU from the end of the ramp (0.4 s) to the mark (1 s), over a 10 s settle.
        assert!((server.cpu_settle_s - 0.6).abs() < 1e-9 && (server.settle_s - 10.0).abs() < 1e-9, "{server:?}");
        assert!((report.generator.rss_per_connection_bytes - 200_000.0).abs() < 1e-9);
        let text = report.text();
        assert!(text.contains("0.60 s in the 10.0 s settle"), "{text}");
        let line = "generator RSS  57.2 MiB in 2 workers after the ramp (200000 B per connection; anonymous 28.6 MiB, 100000 B)";
        assert!(text.contains(line), "{text}");
        // A ramp that was never marked done (connect) has no settle figure.
        let mut inputs = super::tests::inputs(&workers, &publish);
        inputs.scenario = Scenario::Connect;
        assert_eq!(build(&inputs).server.unwrap().cpu_settle_s, 0.0);
    }

    #[test]
    fn idle_reports_have_no_publication_sections() {
        let workers = vec![worker(0, 10, 0, 0)];
        let publish = PublishOutcome::default();
        let mut inputs = inputs(&workers, &publish);
        inputs.scenario = Scenario::Idle;
        inputs.requested = 10;
        let report = build(&inputs);
        assert!(report.publications.is_none() && report.deliveries.is_none());
        assert!(report.latency_ms.last_subscriber.is_none());
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("publications").is_none());
    }
}
