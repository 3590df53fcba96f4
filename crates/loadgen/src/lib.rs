//! The bundled load generator (`kometa load`): idle, broadcast, churn and
//! connect scenarios against Kometa or any WebSocket server.
//!
//! # Layout
//!
//! | module      | does                                                              |
//! |-------------|-------------------------------------------------------------------|
//! | this file   | the command line and the parent: plan, workers, phases, report    |
//! | [`worker`]  | one worker process: a single-threaded epoll loop over its sockets  |
//! | [`publish`] | the publisher (admin socket or HTTP POST), paced or as fast as taken |
//! | [`report`]  | worker results merged, server figures, JSON and text               |
//! | [`wire`]    | the JSON lines between the parent and its workers                 |
//! | [`scale`]   | workers and source addresses chosen from the connection count |
//! | [`scan`], [`frame`], [`track`], [`hist`], [`ramp`], [`target`], [`procfs`], [`sys`] | small parts, each unit-tested |
//!
//! The parent never touches a client socket. It starts W copies of its own
//! executable (`kometa load-worker`), gives each a share of the connections
//! and a config line on stdin, and reads progress and results as JSON lines
//! from their stdout. Spreading sockets over processes beats the per-process
//! open-files limit; spreading them over source addresses (127.0.0.N, bound
//! with IP_BIND_ADDRESS_NO_PORT) beats the ephemeral port range; both are
//! chosen from the connection count unless given ([`scale`]). Several
//! `--url`s (nodes of a cluster) share the connections round-robin, and a
//! churned subscriber resumes on the next URL, so resume crosses nodes; the
//! publisher may go through any node's admin socket, since exactly-once is
//! judged by the offsets the publications got.
//!
//! Timeline: ramp (workers connect and subscribe) → settle → server memory
//! read → `mark` → measured phase (hold, publish, churn) → `finish` (drain
//! until every subscriber has the last publication, bounded) → results.

pub mod frame;
pub mod hist;
pub mod procfs;
pub mod publish;
pub mod ramp;
pub mod report;
pub mod scale;
pub mod scan;
pub mod sys;
pub mod target;
pub mod track;
pub mod wire;
pub mod worker;

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Subcommand};

use kometa_admin_client::{default_admin_address, AdminAddress};
use publish::{AdminPublisher, HttpPublisher, PublishOutcome, PublishPlan, Publisher};
use report::{GeneratorReadings, ServerReadings, UrlUsed};
use scale::HostLimits;
use target::{parse_duration_ms, Rate, Url};
use wire::{
    Command, Groups, Progress, Protocol, Scenario, Target, WorkerConfig, WorkerMessage, WorkerResult, LINE_BYTES_MAX,
};

/// Connections opened per second when --ramp-rate is not given.
const DEFAULT_RAMP_RATE_PER_S: f64 = 2000.0;
/// Most workers one run starts.
const WORKERS_MAX: u32 = 1024;
/// Most connections one run asks for.
const CONNECTIONS_MAX: u64 = 100_000_000;
/// Most group channels (`--groups`): every worker keeps their names.
const GROUPS_MAX: u32 = 100_000;
/// Messages from workers waiting for the parent.
const EVENT_QUEUE_MAX: usize = 4096;
/// Most `--server-pid`s one run reads (one per node).
const SERVER_PIDS_MAX: usize = 256;
/// Extra time past a worker's own deadline before the parent gives up on it.
const WORKER_GRACE_MS: u64 = 15_000;
const MS: u64 = 1_000_000;

/// Arguments of `kometa load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    #[command(subcommand)]
    // Boxed: the scenario's arguments would make this the one large variant of the CLI's command enum.
    pub scenario: Box<ScenarioArgs>,
}

#[derive(Subcommand, Debug)]
pub enum ScenarioArgs {
    /// Open N connections at a ramp rate, subscribe each to K channels, hold
    /// them; reports server memory per connection with --server-pid.
    Idle {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        channels: ChannelArgs,
    },
    /// N subscribers of one channel; publish at a rate (or `max`) with an
    /// embedded send time; per-delivery and last-subscriber latency, exactly-once check.
    Broadcast {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        publish: PublishArgs,
        /// Also subscribe connection n to group channel CHANNEL-gJ (J = n mod GROUPS), and
        /// publish in turns: CHANNEL, then each group channel, then CHANNEL again.
        /// Exactly-once is checked on every channel; a push of another group counts as misrouted.
        #[arg(long, default_value_t = 0)]
        groups: u32,
    },
    /// Like broadcast, while subscribers disconnect and resume from their last
    /// offset at a rate; counts gaps, duplicates and failed recoveries.
    Churn {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        publish: PublishArgs,
        /// Disconnect-and-resume events per second over all subscribers.
        #[arg(long, default_value_t = 100.0)]
        churn_rate: f64,
    },
    /// Handshakes per second: connect, upgrade (optionally subscribe), close;
    /// --connections in total, --in-flight at once, for at most --duration.
    Connect {
        #[command(flatten)]
        common: CommonArgs,
        /// Subscribe to --channel before closing (Kometa protocol).
        #[arg(long)]
        subscribe: bool,
        /// Channel to subscribe to.
        #[arg(long, default_value = "load")]
        channel: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    // The `{n}` placeholder is described without its braces: clap turns that token into a line break.
    /// WebSocket URL; placeholders in the path: {channel}, and n in braces for the connection number.
    /// Repeat it or give a comma-separated list to spread connections over several nodes: connection n
    /// goes to URL n mod count, and a churned subscriber resumes on the URL after the one it left.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: Vec<String>,
    /// kometa: subscribe commands and offsets; raw: the URL picks the channel
    /// and every message is the published data.
    #[arg(long, value_enum, default_value_t = Protocol::Kometa)]
    pub protocol: Protocol,
    /// Connections to hold (connect scenario: handshakes to make).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: u64,
    /// Worker processes [default: one per 15,000 connections, fewer connections each where the
    /// open-files hard limit is below 15,064].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Client source addresses: a count (N: 127.0.0.2 onwards), a range
    /// (127.0.0.2-127.0.0.20) or a comma-separated list [default: the kernel's choice, or on
    /// loopback as many from 127.0.0.2 on as keep every (source, server) pair within 90 % of
    /// net.ipv4.ip_local_port_range].
    #[arg(long)]
    pub source_addresses: Option<String>,
    /// New connections per second over all workers; 0 = as fast as --in-flight allows
    /// [default: 2000, connect: 0].
    #[arg(long)]
    pub ramp_rate: Option<f64>,
    /// Give up on connections not established after this long.
    #[arg(long = "ramp-max", default_value = "120s", value_parser = parse_duration_ms)]
    pub ramp_max_ms: u64,
    /// Per-connection limit for connect, upgrade and subscribe, each.
    #[arg(long = "connect-timeout", default_value = "10s", value_parser = parse_duration_ms)]
    pub connect_timeout_ms: u64,
    /// Handshakes in flight at once over all workers.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: u64,
    /// Length of the measured phase: hold (idle), publishing (broadcast, churn), or the cap (connect).
    #[arg(long = "duration", default_value = "10s", value_parser = parse_duration_ms)]
    pub duration_ms: u64,
    /// Wait after the ramp before reading the server's memory.
    #[arg(long = "settle", default_value = "1s", value_parser = parse_duration_ms)]
    pub settle_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The server's pid, for RSS, CPU and kernel slab figures from /proc. Repeat it (or give a
    /// comma-separated list) for several nodes: figures are summed and also given per pid.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Print progress even when stderr is not a terminal (one line a second).
    #[arg(long)]
    pub progress: bool,
    /// Exit with an error unless every connection was established and every
    /// publication delivered exactly once.
    #[arg(long)]
    pub check: bool,
    /// Largest server message accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub message_bytes_max: usize,
    /// PEM certificates to trust for wss:// URLs (a test CA). Sessions are
    /// never resumed: every connection makes a full TLS handshake.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ChannelArgs {
    /// Channel name; with a pool of several, the prefix of NAME-0, NAME-1, …
    #[arg(long, default_value = "load")]
    pub channel: String,
    /// Channels each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub channels: u32,
    /// Distinct channels over all connections [default: --channels, everyone on the same ones].
    #[arg(long)]
    pub channel_pool: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// The channel every subscriber joins and the publisher publishes to.
    #[arg(long, default_value = "load")]
    pub channel: String,
    /// Kometa admin socket: unix:PATH or tcp:ADDR:PORT [default: the server's default].
    #[arg(long)]
    pub admin: Option<String>,
    /// Key for a TCP admin socket.
    #[arg(long, env = "KOMETA_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Publish by HTTP POST instead (peers): http://HOST:PORT/PATH, {channel} substituted.
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Publications per second, or `max` (as fast as the server takes them, --window in flight).
    #[arg(long, default_value = "10")]
    pub rate: Rate,
    /// Size of each publication's JSON data.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Publish requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Event name of the publications (Kometa).
    #[arg(long, default_value = "load")]
    pub event: String,
    /// After publishing, wait at most this long for the last deliveries.
    #[arg(long = "drain", default_value = "5s", value_parser = parse_duration_ms)]
    pub drain_ms: u64,
    /// Most publications one run sends (bounds the per-publication table in `max` mode).
    #[arg(long, default_value_t = 1_000_000)]
    pub publications_max: u64,
    /// Send only the first publication for this long, then the rest at --rate for --duration:
    /// the first reaches every subscriber alone (with --groups: the one to everyone).
    #[arg(long = "pause-after-first", default_value = "0s", value_parser = parse_duration_ms)]
    pub pause_after_first_ms: u64,
}

/// What the parent works from, checked before anything starts.
#[derive(Debug)]
struct Plan {
    scenario: Scenario,
    common: CommonArgs,
    publish: Option<PublishArgs>,
    groups: Groups,
    configs: Vec<WorkerConfig>,
    /// In `--url` order.
    urls: Vec<UrlUsed>,
    publications_max: u64,
    sockets_per_connection: u64,
    parameters: serde_json::Value,
}

fn plan(args: LoadArgs) -> Result<Plan, String> {
    let mut groups = Groups::default();
    let (scenario, common, channels, publish, churn_rate_per_s, subscribe) = match *args.scenario {
        ScenarioArgs::Idle { common, channels } => (Scenario::Idle, common, channels, None, 0.0, true),
        ScenarioArgs::Broadcast { common, publish, groups: count } => {
            groups.count = count;
            let channels = ChannelArgs { channel: publish.channel.clone(), channels: 1, channel_pool: Some(1) };
            (Scenario::Broadcast, common, channels, Some(publish), 0.0, true)
        }
        ScenarioArgs::Churn { common, publish, churn_rate } => {
            let channels = ChannelArgs { channel: publish.channel.clone(), channels: 1, channel_pool: Some(1) };
            (Scenario::Churn, common, channels, Some(publish), churn_rate, true)
        }
        ScenarioArgs::Connect { common, subscribe, channel } => {
            let channels = ChannelArgs { channel, channels: 1, channel_pool: Some(1) };
            (Scenario::Connect, common, channels, None, 0.0, subscribe)
        }
    };
    if common.connections == 0 || common.connections > CONNECTIONS_MAX {
        return Err(format!("--connections must be 1..={CONNECTIONS_MAX}"));
    }
    let ramp_rate =
        common.ramp_rate.unwrap_or(if scenario == Scenario::Connect { 0.0 } else { DEFAULT_RAMP_RATE_PER_S });
    if !(ramp_rate.is_finite() && ramp_rate >= 0.0) {
        return Err("--ramp-rate must be 0 (unpaced) or a positive number".into());
    }
    if !(churn_rate_per_s.is_finite() && churn_rate_per_s >= 0.0) {
        return Err("--churn-rate must be 0 or a positive number".into());
    }
    if common.in_flight == 0 {
        return Err("--in-flight must be at least 1".into());
    }
    let urls = target::parse_urls(&common.url)?;
    let mut targets = Vec::with_capacity(urls.len());
    for url in &urls {
        let tls_server_name = url.tls.then(|| url.host.clone());
        targets.push(Target {
            address: url.resolve()?,
            authority: url.authority.clone(),
            path: url.path.clone(),
            tls_server_name,
        });
    }
    let tls_ca_pem = match &common.tls_ca {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| format!("--tls-ca {}: {e}", path.display()))?),
        None if urls.iter().any(|url| url.tls) => {
            return Err("wss:// URLs need --tls-ca FILE (the PEM certificates to trust)".into())
        }
        None => None,
    };
    if common.server_pid.len() > SERVER_PIDS_MAX {
        return Err(format!("--server-pid: at most {SERVER_PIDS_MAX}"));
    }
    if common.server_pid.iter().enumerate().any(|(i, pid)| common.server_pid[..i].contains(pid)) {
        return Err("--server-pid: a pid given twice would be counted twice".into());
    }
    let channel_pool = channels.channel_pool.unwrap_or(channels.channels).max(1);
    if channels.channels > 1024 || channel_pool > 10_000_000 {
        return Err("--channels is at most 1024 and --channel-pool at most 10,000,000".into());
    }
    if common.protocol == Protocol::Raw {
        if channels.channels > 1 {
            return Err("--protocol raw subscribes through the URL: one channel per connection".into());
        }
        if scenario == Scenario::Churn {
            return Err("churn needs resume, which only --protocol kometa has".into());
        }
        if scenario == Scenario::Broadcast && publish.as_ref().is_some_and(|p| p.publish_url.is_none()) {
            return Err("--protocol raw needs --publish-url to publish".into());
        }
    }
    if groups.count > GROUPS_MAX {
        return Err(format!("--groups is at most {GROUPS_MAX}"));
    }
    if groups.count > 0
        && (common.protocol == Protocol::Raw || publish.as_ref().is_some_and(|p| p.publish_url.is_some()))
    {
        return Err(
            "--groups needs Kometa's protocol and admin socket (one URL cannot publish to several channels)".into()
        );
    }
    if let Some(publish) = &publish {
        if publish.window == 0 || publish.window > 65_536 {
            return Err("--window must be 1..=65536".into());
        }
        if publish.payload_bytes > 16 << 20 {
            return Err("--payload-bytes is at most 16 MiB".into());
        }
    }
    let publications_max = match publish.as_ref().map(|p| p.rate) {
        Some(Rate::PerSecond(rate)) => {
            let planned = (rate * common.duration_ms as f64 / 1000.0).ceil() as u64 + 1;
            planned.min(publish.as_ref().map_or(u64::MAX, |p| p.publications_max))
        }
        Some(Rate::Max) => publish.as_ref().map_or(0, |p| p.publications_max),
        None => 0,
    };
    let limits = HostLimits::read();
    let slots = if scenario == Scenario::Connect { common.in_flight } else { common.connections };
    let open_at_once = slots;
    let addresses: Vec<std::net::SocketAddr> = targets.iter().map(|t| t.address).collect();
    let (source_addresses, sources_chosen) = match &common.source_addresses {
        Some(text) => (target::parse_source_addresses(text)?, false),
        None => match scale::auto_source_addresses(open_at_once, &addresses, &limits)? {
            Some(chosen) => (chosen, true),
            None => (Vec::new(), false),
        },
    };
    let (workers, workers_chosen) = match common.workers {
        Some(0) => return Err("--workers must be at least 1".into()),
        Some(n) => (u64::from(n), false),
        None => (scale::workers_for(slots, &limits)?, true),
    };
    if workers > u64::from(WORKERS_MAX) {
        return Err(format!("at most {WORKERS_MAX} workers"));
    }
    let workers = workers as u32;
    let shares = ramp::split(common.connections, u64::from(workers));
    let in_flight_shares = ramp::split(common.in_flight, u64::from(workers));
    let mut configs = Vec::new();
    let mut first_index = 0;
    for (w, (&connections, &in_flight)) in shares.iter().zip(&in_flight_shares).enumerate() {
        if connections == 0 {
            continue;
        }
        let share = connections as f64 / common.connections as f64;
        configs.push(WorkerConfig {
            scenario,
            worker: w as u32,
            protocol: common.protocol,
            targets: targets.clone(),
            first_index,
            connections,
            in_flight_max: in_flight.max(1),
            source_addresses: source_addresses.clone(),
            ramp_rate_per_s: ramp_rate * share,
            ramp_max_ms: common.ramp_max_ms,
            connect_timeout_ms: common.connect_timeout_ms,
            channel: channels.channel.clone(),
            channels_per_connection: channels.channels,
            channel_pool,
            churn_rate_per_s: churn_rate_per_s * share,
            publications_max,
            duration_ms: common.duration_ms,
            subscribe,
            message_bytes_max: common.message_bytes_max,
            progress_interval_ms: 250,
            groups,
            tls_ca_pem: tls_ca_pem.clone(),
        });
        first_index += connections;
    }
    // Ports run out per (source, server address): the busiest loopback pair counts.
    let loopback: Vec<std::net::SocketAddr> = addresses.iter().copied().filter(|a| a.ip().is_loopback()).collect();
    let per_pair = if loopback.len() == addresses.len() {
        scale::busiest_pair(open_at_once, source_addresses.len() as u64, &addresses)
    } else {
        0
    };
    if per_pair > limits.ephemeral_ports {
        eprintln!(
            "kometa load: warning: up to {per_pair} connections per (source address, server address) is more than \
             the {} ephemeral ports; use --source-addresses",
            limits.ephemeral_ports
        );
    }
    if (sources_chosen || workers_chosen) && open_at_once > scale::CONNECTIONS_PER_WORKER_MAX {
        let sources = match (source_addresses.first(), source_addresses.last()) {
            (Some(first), Some(last)) if sources_chosen => {
                format!("{} source addresses ({first}-{last})", source_addresses.len())
            }
            _ if source_addresses.is_empty() => "the kernel's source address".to_string(),
            _ => format!("{} source addresses", source_addresses.len()),
        };
        eprintln!(
            "kometa load: {open_at_once} connections: {workers} workers of at most {} (open-files limit {}), {sources}, \
             {} ephemeral ports each",
            limits.connections_per_worker(),
            limits.open_files_hard,
            limits.ephemeral_ports
        );
    }
    let urls: Vec<UrlUsed> = urls
        .iter()
        .zip(&targets)
        .map(|(url, target)| UrlUsed { url: url.text.clone(), address: target.address })
        .collect();
    // One URL (one pid) keeps the scalar fields of single-node runs; several become lists.
    let one_or_list = |values: Vec<serde_json::Value>| match <[_; 1]>::try_from(values) {
        Ok([one]) => one,
        Err(values) if values.is_empty() => serde_json::Value::Null,
        Err(values) => serde_json::Value::Array(values),
    };
    let parameters = serde_json::json!({
        "url": one_or_list(urls.iter().map(|u| u.url.clone().into()).collect()),
        "protocol": common.protocol,
        "address": one_or_list(urls.iter().map(|u| u.address.to_string().into()).collect()),
        "connections": common.connections,
        "workers": configs.len(),
        "source_addresses": source_addresses.len(),
        "ramp_rate_per_s": ramp_rate,
        "ramp_max_ms": common.ramp_max_ms,
        "in_flight": common.in_flight,
        "duration_ms": common.duration_ms,
        "channel": channels.channel,
        "channels_per_connection": channels.channels,
        "channel_pool": channel_pool,
        "groups": groups.count,
        "rate": publish.as_ref().map(|p| p.rate.to_string()),
        "payload_bytes": publish.as_ref().map(|p| p.payload_bytes),
        "window": publish.as_ref().map(|p| p.window),
        "pause_after_first_ms": publish.as_ref().map(|p| p.pause_after_first_ms),
        "publish_url": publish.as_ref().and_then(|p| p.publish_url.clone()),
        "churn_rate_per_s": churn_rate_per_s,
        "subscribe": subscribe,
        "server_pid": one_or_list(common.server_pid.iter().map(|&pid| pid.into()).collect()),
    });
    Ok(Plan {
        scenario,
        publish,
        groups,
        configs,
        publications_max,
        // Both ends in this kernel only when every node is local.
        sockets_per_connection: if targets.iter().all(|t| t.address.ip().is_loopback()) { 2 } else { 1 },
        urls,
        parameters,
        common,
    })
}

/// Runs a load scenario and prints its report.
pub fn run(args: LoadArgs) -> Result<(), String> {
    let plan = plan(args)?;
    sys::install_stop_handler();
    let mut publisher = connect_publisher(&plan)?;
    let started_ns = sys::monotonic_ns();
    let cpu_self_start_ns = sys::cpu_ns(false);
    let mut server = ServerReadings::before(&plan.common.server_pid)?;

    let mut fleet = Fleet::spawn(&plan.configs)?;
    let mut generator = GeneratorReadings::new(fleet.children.iter().map(Child::id).collect());
    let mut display = Display::new(&plan);
    let mut interrupted = false;
    let connect = plan.scenario == Scenario::Connect;

    // Ramp: wait until every worker is ready (or, for connect, done).
    let ramp_deadline_ns = started_ns
        + if connect { plan.common.duration_ms } else { plan.common.ramp_max_ms }.saturating_mul(MS)
        + WORKER_GRACE_MS * MS;
    loop {
        if sys::stop_requested() {
            interrupted = true;
            break;
        }
        fleet.pump(&mut display, Duration::from_millis(50))?;
        let done = if connect { fleet.all_results() } else { fleet.all_ready() };
        if done {
            break;
        }
        if sys::monotonic_ns() > ramp_deadline_ns {
            return Err("workers did not finish the ramp in time".into());
        }
    }

    let mut outcome = None;
    let mut mark_cpu_self_ns = sys::cpu_ns(false);
    if !connect && !interrupted {
        display.phase = "settle";
        if let Some(readings) = server.as_mut() {
            readings.ramp_done();
        }
        let settle_end_ns = sys::monotonic_ns() + plan.common.settle_ms * MS;
        while sys::monotonic_ns() < settle_end_ns && !sys::stop_requested() {
            fleet.pump(&mut display, Duration::from_millis(50))?;
        }
        if let Some(readings) = server.as_mut() {
            readings.after_ramp()?;
        }
        generator.after_ramp();
        mark_cpu_self_ns = sys::cpu_ns(false);
        fleet.command(&Command::Mark);
        display.phase = "run";
        outcome = measured_phase(&plan, publisher.take(), &mut fleet, &mut display, server.as_mut(), &mut generator)?;
        interrupted |= sys::stop_requested();
        let (final_offset, accepted, group_final_offsets) = outcome
            .as_ref()
            .map_or((None, 0, Vec::new()), |o| (o.final_offset, o.accepted, o.group_final_offsets.clone()));
        let drain_ms = plan.publish.as_ref().map_or(0, |p| p.drain_ms);
        fleet.command(&if interrupted {
            Command::Stop
        } else {
            Command::Finish { final_offset, accepted, drain_ms, group_final_offsets }
        });
        display.phase = "drain";
        let mut deadline_ns = sys::monotonic_ns() + (drain_ms + WORKER_GRACE_MS) * MS;
        let mut told_to_stop = false;
        while !fleet.all_results() {
            if sys::stop_requested() && !interrupted {
                interrupted = true;
                fleet.command(&Command::Stop);
            }
            fleet.pump(&mut display, Duration::from_millis(50))?;
            if sys::monotonic_ns() > deadline_ns {
                if told_to_stop {
                    // Report what the others measured rather than nothing.
                    break;
                }
                // Late (a starved host): stop now, one more grace period.
                fleet.command(&Command::Stop);
                told_to_stop = true;
                interrupted = true;
                deadline_ns = sys::monotonic_ns() + WORKER_GRACE_MS * MS;
            }
        }
    } else if interrupted {
        fleet.command(&Command::Stop);
        let deadline_ns = sys::monotonic_ns() + WORKER_GRACE_MS * MS;
        while !fleet.all_results() && sys::monotonic_ns() < deadline_ns {
            fleet.pump(&mut display, Duration::from_millis(50))?;
        }
    }
    display.clear();

    if let Some(readings) = server.as_mut() {
        readings.end(connect);
    }
    if connect {
        generator.after_ramp();
    }
    let workers_started = plan.configs.len();
    let results = fleet.finish();
    let cpu_self_ns = sys::cpu_ns(false);
    let generator_cpu_ns = cpu_self_ns.saturating_sub(cpu_self_start_ns) + sys::cpu_ns(true);
    let workers_run_ns: u64 = results.iter().map(|r| r.cpu_run_ns).sum();
    let generator_cpu_run_ns =
        if connect { generator_cpu_ns } else { workers_run_ns + cpu_self_ns.saturating_sub(mark_cpu_self_ns) };
    let mut report = report::build(&report::Inputs {
        scenario: plan.scenario,
        parameters: plan.parameters.clone(),
        requested: plan.common.connections,
        workers: &results,
        urls: &plan.urls,
        publish: outcome.as_ref(),
        groups: plan.groups,
        server,
        generator_memory: generator,
        sockets_per_connection: plan.sockets_per_connection,
        generator_cpu_ns,
        generator_cpu_run_ns,
        wall_ns: sys::monotonic_ns().saturating_sub(started_ns),
        interrupted,
    });
    if results.len() < workers_started {
        report.warnings.push(format!(
            "{} of {workers_started} workers did not report in time: their connections and deliveries are missing here",
            workers_started - results.len()
        ));
    }
    print!("{}", report.text());
    if let Some(path) = &plan.common.json {
        let json = serde_json::to_vec_pretty(&report).map_err(|e| format!("report JSON: {e}"))?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if plan.common.check {
        check(&report)?;
    }
    Ok(())
}

/// `--check`: the run is a failure unless it was complete and exactly once.
fn check(report: &report::Report) -> Result<(), String> {
    let c = &report.connections;
    if report.scenario != "connect" && c.established < c.requested {
        return Err(format!("check failed: {} of {} connections established", c.established, c.requested));
    }
    if let Some(d) = &report.deliveries {
        if d.missing > 0 || d.duplicates > 0 || d.gaps > 0 || d.total != d.expected || d.misrouted > 0 {
            return Err(format!(
                "check failed: {} of {} deliveries, {} missing, {} duplicates, {} gaps, {} misrouted",
                d.total, d.expected, d.missing, d.duplicates, d.gaps, d.misrouted
            ));
        }
    }
    if report.interrupted {
        return Err("check failed: interrupted".into());
    }
    Ok(())
}

fn connect_publisher(plan: &Plan) -> Result<Option<Box<dyn Publisher + Send>>, String> {
    let Some(publish) = &plan.publish else { return Ok(None) };
    if let Some(url) = &publish.publish_url {
        let url = Url::parse(url, "http", 80)?;
        let path = target::expand(&url.path, &publish.channel, 0);
        return Ok(Some(Box::new(HttpPublisher::new(url.resolve()?, &url.authority, &path))));
    }
    let address = match &publish.admin {
        Some(text) => AdminAddress::parse(text).map_err(|e| format!("--admin: {e}"))?,
        None => default_admin_address(),
    };
    let key = publish.admin_key.as_deref();
    let publisher = AdminPublisher::connect(&address, key, &publish.channel, plan.groups, &publish.event)
        .map_err(|e| format!("admin socket {address}: {e}"))?;
    Ok(Some(Box::new(publisher)))
}

/// The measured phase: hold (idle), or publish on a thread while the parent
/// keeps reading worker progress.
fn measured_phase(
    plan: &Plan,
    publisher: Option<Box<dyn Publisher + Send>>,
    fleet: &mut Fleet,
    display: &mut Display,
    mut server: Option<&mut ServerReadings>,
    generator: &mut GeneratorReadings,
) -> Result<Option<PublishOutcome>, String> {
    let end_ns = sys::monotonic_ns() + plan.common.duration_ms * MS;
    let mut next_sample_ns = 0;
    let mut sample_server = |server: &mut Option<&mut ServerReadings>| {
        let now = sys::monotonic_ns();
        if now < next_sample_ns {
            return;
        }
        next_sample_ns = now + 1000 * MS;
        if let Some(readings) = server.as_deref_mut() {
            readings.peak();
        }
        generator.peak();
    };
    let (Some(mut publisher), Some(publish)) = (publisher, plan.publish.as_ref()) else {
        while sys::monotonic_ns() < end_ns && !sys::stop_requested() {
            fleet.pump(display, Duration::from_millis(50))?;
            sample_server(&mut server);
        }
        return Ok(None);
    };
    let publish_plan = PublishPlan {
        rate: publish.rate,
        duration_ms: plan.common.duration_ms,
        publications_max: plan.publications_max,
        window: publish.window,
        payload_bytes: publish.payload_bytes,
        groups: plan.groups,
        pause_after_first_ms: publish.pause_after_first_ms,
    };
    let thread = std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || publish::publish(&mut *publisher, &publish_plan, &sys::stop_requested))
        .map_err(|e| format!("publisher thread: {e}"))?;
    while !thread.is_finished() {
        fleet.pump(display, Duration::from_millis(50))?;
        sample_server(&mut server);
    }
    let outcome = thread.join().map_err(|_| "the publisher thread panicked".to_string())?;
    Ok(Some(outcome))
}

enum Event {
    Message(usize, WorkerMessage),
    /// A worker's stdout closed (it exited), or sent something unreadable.
    Gone(usize, String),
}

/// The worker processes and what they have said.
struct Fleet {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    events: mpsc::Receiver<Event>,
    progress: Vec<Progress>,
    ready: Vec<bool>,
    results: Vec<Option<WorkerResult>>,
}

impl Fleet {
    fn spawn(configs: &[WorkerConfig]) -> Result<Fleet, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
        let (sender, events) = mpsc::sync_channel(EVENT_QUEUE_MAX);
        let mut fleet = Fleet {
            children: Vec::new(),
            stdins: Vec::new(),
            events,
            progress: vec![Progress::default(); configs.len()],
            ready: vec![false; configs.len()],
            results: (0..configs.len()).map(|_| None).collect(),
        };
        for (id, config) in configs.iter().enumerate() {
            let mut child = Process::new(&exe)
                .arg("load-worker")
                .env("KOMETA_LOG", std::env::var("KOMETA_LOG").unwrap_or_else(|_| "warn".into()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("starting worker {id}: {e}"))?;
            let mut stdin = child.stdin.take();
            let stdout = child.stdout.take();
            fleet.children.push(child);
            let line = serde_json::to_string(config).map_err(|e| format!("worker config: {e}"))?;
            if let Some(stdin) = stdin.as_mut() {
                stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| stdin.write_all(b"\n"))
                    .map_err(|e| format!("worker {id} did not take its config: {e}"))?;
            }
            fleet.stdins.push(stdin);
            let sender = sender.clone();
            let Some(stdout) = stdout else { return Err(format!("worker {id}: no stdout")) };
            std::thread::Builder::new()
                .name(format!("worker-{id}-reader"))
                .spawn(move || read_worker(id, stdout, sender))
                .map_err(|e| format!("reader thread: {e}"))?;
        }
        Ok(fleet)
    }

    fn command(&mut self, command: &Command) {
        let Ok(line) = serde_json::to_string(command) else { return };
        for stdin in self.stdins.iter_mut().flatten() {
            // A worker that already exited has reported (or will be noticed as gone).
            let _ = stdin.write_all(line.as_bytes()).and_then(|()| stdin.write_all(b"\n"));
        }
    }

    /// Handles worker messages for up to `wait`; refreshes the progress line.
    fn pump(&mut self, display: &mut Display, wait: Duration) -> Result<(), String> {
        let mut next = self.events.recv_timeout(wait).ok();
        while let Some(event) = next {
            match event {
                Event::Message(id, WorkerMessage::Progress(progress)) => self.progress[id] = progress,
                Event::Message(id, WorkerMessage::Ready(progress)) => {
                    self.progress[id] = progress;
                    self.ready[id] = true;
                }
                Event::Message(id, WorkerMessage::Result(result)) => {
                    self.progress[id] = result.progress;
                    self.ready[id] = true;
                    self.results[id] = Some(*result);
                }
                Event::Gone(id, why) => {
                    if self.results[id].is_none() {
                        let status = self.children[id].wait().map(|s| s.to_string()).unwrap_or_default();
                        return Err(format!("worker {id} ended without a result ({why}; {status})"));
                    }
                }
            }
            next = self.events.try_recv().ok();
        }
        display.show(&self.progress);
        Ok(())
    }

    fn all_ready(&self) -> bool {
        self.ready.iter().all(|&r| r)
    }

    fn all_results(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    /// Waits for the workers to exit (so their CPU time is counted) and returns their results.
    fn finish(mut self) -> Vec<WorkerResult> {
        // Closing stdin ends a worker; one that has not reported is also
        // signalled, and killed if it is still there after the grace period.
        self.stdins.clear();
        for (child, result) in self.children.iter().zip(&self.results) {
            if result.is_none() {
                // SAFETY: signalling our own child process by its pid.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline_ns = sys::monotonic_ns() + WORKER_GRACE_MS * MS;
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && sys::monotonic_ns() < deadline_ns {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.children.clear();
        std::mem::take(&mut self.results).into_iter().flatten().collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Only reached with children left on an error path: stop them.
        for child in &mut self.children {
            // SAFETY: signalling our own child process by its pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

fn read_worker(id: usize, stdout: std::process::ChildStdout, sender: mpsc::SyncSender<Event>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut line) {
            Ok(0) => {
                let _ = sender.send(Event::Gone(id, "exited".into()));
                return;
            }
            Ok(_) => {}
            Err(error) => {
                let _ = sender.send(Event::Gone(id, format!("reading its output: {error}")));
                return;
            }
        }
        let event = match serde_json::from_slice::<WorkerMessage>(&line) {
            Ok(message) => Event::Message(id, message),
            Err(error) => Event::Gone(id, format!("unreadable message: {error}")),
        };
        if sender.send(event).is_err() {
            return;
        }
    }
}

/// The progress line on stderr.
struct Display {
    enabled: bool,
    tty: bool,
    phase: &'static str,
    target: u64,
    started_ns: u64,
    interval_ns: u64,
    last_ns: u64,
    last: Progress,
    shown: bool,
}

impl Display {
    fn new(plan: &Plan) -> Display {
        let tty = sys::stderr_is_tty();
        let now = sys::monotonic_ns();
        Display {
            enabled: tty || plan.common.progress,
            tty,
            phase: "ramp",
            target: plan.common.connections,
            started_ns: now,
            interval_ns: if tty { 250 * MS } else { 1000 * MS },
            last_ns: now,
            last: Progress::default(),
            shown: false,
        }
    }

    fn show(&mut self, progress: &[Progress]) {
        let now = sys::monotonic_ns();
        if !self.enabled || now < self.last_ns + self.interval_ns {
            return;
        }
        let mut total = Progress::default();
        for p in progress {
            total.established += p.established;
            total.open += p.open;
            total.in_flight += p.in_flight;
            total.connect_errors += p.connect_errors;
            total.disconnects += p.disconnects;
            total.deliveries += p.deliveries;
            total.handshakes += p.handshakes;
        }
        let seconds = (now - self.last_ns) as f64 / 1e9;
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
        let line = format!(
            "[{}] conns {}/{} open {} ({:.0}/s)  in flight {}  deliveries {:.0}/s  errors {}  {:.1}s",
            self.phase,
            total.established,
            self.target,
            total.open,
            rate(total.handshakes, self.last.handshakes),
            total.in_flight,
            rate(total.deliveries, self.last.deliveries),
            total.connect_errors + total.disconnects,
            (now - self.started_ns) as f64 / 1e9,
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.shown = true;
        self.last = total;
        self.last_ns = now;
    }

    fn clear(&mut self) {
        if self.tty && self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

/// Entry point of a worker process started by `kometa load`.
pub fn worker_main() -> Result<(), String> {
    worker::main()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn plan_of(args: &[&str]) -> Result<Plan, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        plan(cli.load)
    }

    #[test]
    fn workers_split_connections_rates_and_indices() {
        let plan = plan_of(&[
            "broadcast",
            "--connections",
            "30001",
            "--ramp-rate",
            "3000",
            "--source-addresses",
            "127.0.0.2-127.0.0.4",
            "--rate",
            "10",
            "--duration",
            "5s",
        ])
        .unwrap();
        assert_eq!(plan.configs.len(), 3);
        assert_eq!(plan.configs.iter().map(|c| c.connections).sum::<u64>(), 30_001);
        assert_eq!(plan.configs[1].first_index, plan.configs[0].connections);
        let rate: f64 = plan.configs.iter().map(|c| c.ramp_rate_per_s).sum();
        assert!((rate - 3000.0).abs() < 1e-6);
        assert_eq!(plan.configs[0].source_addresses.len(), 3);
        // 10/s for 5 s, plus the one due at once.
        assert_eq!(plan.publications_max, 51);
        assert_eq!(plan.sockets_per_connection, 2);
        assert!(plan.configs[0].subscribe);
    }

    #[test]
    fn raw_protocol_rules() {
        assert!(plan_of(&["broadcast", "--protocol", "raw"]).unwrap_err().contains("--publish-url"));
        assert!(plan_of(&["churn", "--protocol", "raw"]).unwrap_err().contains("resume"));
        assert!(plan_of(&["idle", "--protocol", "raw", "--channels", "2"]).is_err());
        let plan = plan_of(&[
            "broadcast",
            "--protocol",
            "raw",
            "--url",
            "ws://127.0.0.1:9000/sub/{channel}",
            "--publish-url",
            "http://127.0.0.1:9000/pub/{channel}",
        ])
        .unwrap();
        assert_eq!(plan.configs[0].targets[0].path, "/sub/{channel}");
    }

    #[test]
    fn several_urls_go_to_every_worker_in_order() {
        let plan = plan_of(&[
            "churn",
            "-n",
            "7",
            "--workers",
            "2",
            "--url",
            "ws://127.0.0.1:8001/ws,ws://127.0.0.1:8002/a",
            "--url",
            "ws://127.0.0.1:8003/b/{n}",
            "--server-pid",
            "11,12",
            "--server-pid",
            "13",
        ])
        .unwrap();
        let ports: Vec<u16> = plan.urls.iter().map(|u| u.address.port()).collect();
        assert_eq!(ports, [8001, 8002, 8003]);
        for config in &plan.configs {
            assert_eq!(config.targets.iter().map(|t| t.address.port()).collect::<Vec<_>>(), ports);
            assert_eq!(config.targets[2].path, "/b/{n}");
        }
        // The second worker's first connection (n = 4) starts on the second URL.
        assert_eq!(plan.configs[1].first_index, 4);
        assert_eq!(plan.configs[1].target_of(plan.configs[1].first_index), 1);
        assert_eq!(plan.parameters["url"][2], "ws://127.0.0.1:8003/b/{n}");
        assert_eq!(plan.parameters["address"][0], "127.0.0.1:8001");
        assert_eq!(plan.parameters["server_pid"], serde_json::json!([11, 12, 13]));
        assert_eq!(plan.common.server_pid, [11, 12, 13]);
        assert_eq!(plan.sockets_per_connection, 2);
        assert!(plan_of(&["idle", "--server-pid", "5", "--server-pid", "5"]).unwrap_err().contains("twice"));
        assert!(plan_of(&["idle", "--url", "ws://127.0.0.1/ws,"]).is_err());
    }

    #[test]
    fn one_url_keeps_the_single_node_parameters() {
        let plan = plan_of(&["idle", "--url", "ws://127.0.0.1:8001/ws", "--server-pid", "9"]).unwrap();
        assert_eq!(plan.parameters["url"], "ws://127.0.0.1:8001/ws");
        assert_eq!(plan.parameters["address"], "127.0.0.1:8001");
        assert_eq!(plan.parameters["server_pid"], 9);
        assert_eq!(plan.configs[0].targets.len(), 1);
        let plan = plan_of(&["idle"]).unwrap();
        assert_eq!(plan.parameters["url"], "ws://127.0.0.1:8080/ws");
        assert!(plan.parameters["server_pid"].is_null());
    }

    #[test]
    fn a_million_is_planned_without_hand_picked_workers_or_sources() {
        let limits = HostLimits::read();
        let plan = plan_of(&["idle", "-n", "1000000", "--url", "ws://127.0.0.1:8080/ws"]).unwrap();
        // No worker past 15,000 connections or its open-files limit.
        assert!(plan.configs.iter().all(|c| c.connections <= limits.connections_per_worker()));
        assert_eq!(plan.configs.len() as u64, scale::workers_for(1_000_000, &limits).unwrap());
        assert_eq!(plan.configs.iter().map(|c| c.connections).sum::<u64>(), 1_000_000);
        // Enough sources that no (source, server) pair needs more than the usable ports.
        let sources = plan.configs[0].source_addresses.len() as u64;
        assert!(sources >= 2, "{sources}");
        let address = [plan.configs[0].targets[0].address];
        assert!(scale::busiest_pair(1_000_000, sources, &address) <= limits.usable_ports());
        assert_eq!(plan.parameters["source_addresses"], sources);
        // Given ones are kept, and small runs keep the kernel's choice.
        let plan = plan_of(&["idle", "-n", "1000000", "--source-addresses", "127.0.0.2-127.0.0.200"]).unwrap();
        assert_eq!(plan.configs[0].source_addresses.len(), 199);
        let plan = plan_of(&["idle", "-n", "10000"]).unwrap();
        assert!(plan.configs[0].source_addresses.is_empty() || limits.usable_ports() < 10_000);
        assert_eq!(plan.configs.len() as u64, scale::workers_for(10_000, &limits).unwrap());
        // A remote server: no loopback addresses to invent.
        let plan = plan_of(&["idle", "-n", "100000", "--url", "ws://10.1.2.3:80/ws"]).unwrap();
        assert!(plan.configs[0].source_addresses.is_empty());
    }

    #[test]
    fn groups_are_for_kometa_broadcasts_through_the_admin_socket() {
        let plan = plan_of(&["broadcast", "-n", "10", "--groups", "3", "--channel", "all"]).unwrap();
        assert_eq!(plan.groups, Groups { count: 3 });
        assert!(plan
            .configs
            .iter()
            .all(|c| c.groups.count == 3 && c.channel == "all" && c.channels_per_connection == 1));
        assert_eq!(plan.parameters["groups"], 3);
        assert_eq!(plan_of(&["broadcast"]).unwrap().groups, Groups::default());
        assert!(plan_of(&["churn", "--groups", "3"]).is_err());
        assert!(plan_of(&["broadcast", "--groups", "3", "--publish-url", "http://127.0.0.1:1/pub"]).is_err());
        assert!(plan_of(&["broadcast", "--groups", "1000001"]).is_err());
    }

    #[test]
    fn connect_scenario_sizes_workers_by_in_flight() {
        let plan = plan_of(&["connect", "-n", "100000", "--in-flight", "200"]).unwrap();
        assert_eq!(plan.configs.len(), 1);
        assert_eq!(plan.configs[0].in_flight_max, 200);
        assert!(!plan.configs[0].subscribe);
        assert!(plan_of(&["idle", "-n", "0"]).is_err());
        assert!(plan_of(&["idle", "--url", "wss://x/ws"]).is_err());
        assert_eq!(plan_of(&["idle", "--churn-rate", "5"]).err().map(|e| e.contains("unexpected")), Some(true));
        let plan = plan_of(&["churn", "--churn-rate", "5", "--workers", "2"]).unwrap();
        assert!((plan.configs.iter().map(|c| c.churn_rate_per_s).sum::<f64>() - 5.0).abs() < 1e-9);
    }
}
