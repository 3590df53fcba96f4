//! What the parent and its worker processes say to each other: one JSON
//! config line on the worker's stdin, then command lines; progress and the
//! final result as JSON lines on the worker's stdout.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::track::DeliveryCounts;

/// Longest line either side accepts (a result with a million per-publication
/// maxima is about 20 MB).
pub const LINE_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Idle,
    Broadcast,
    Churn,
    Connect,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
            Scenario::Churn => "churn",
            Scenario::Connect => "connect",
        }
    }
}

/// What the target speaks on its WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Kometa's client protocol: subscribe commands, pushes with offsets, resume.
    Kometa,
    /// No commands: the URL picks the channel and every message is the
    /// published data itself (Nchan, a plain `ws` broadcast server).
    Raw,
}

/// One WebSocket URL the connections are spread over, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub address: SocketAddr,
    /// For the Host header.
    pub authority: String,
    /// Path template (`{channel}`, `{n}`).
    pub path: String,
    /// `wss://`: the host name the certificate must carry.
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

/// What one worker saw on one target.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetCounts {
    /// Connections established here on their first connect (connect scenario: each handshake).
    pub established: u64,
    /// Churn: resumes established here.
    pub resumed: u64,
    pub connect_errors: u64,
    pub disconnects: u64,
}

/// `broadcast --groups G`: besides the broadcast channel, connection `n`
/// joins group channel `n mod G` (`CHANNEL-gJ`), and publications take turns:
/// the broadcast channel, then group 0, 1, …, G−1, then the broadcast channel
/// again. Both the worker (which sequence a push belongs to) and the
/// publisher (where publication `seq` goes) follow it, so a push that reaches
/// a subscriber of another group is caught.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Groups {
    /// 0: no group channels (every publication to the broadcast channel).
    pub count: u32,
}

impl Groups {
    /// The group connection `n` joins.
    pub fn of_connection(self, n: u64) -> Option<u32> {
        (self.count > 0).then(|| (n % u64::from(self.count)) as u32)
    }

    /// Where publication `seq` goes: None for the broadcast channel.
    pub fn of_publication(self, seq: u64) -> Option<u32> {
        match seq % (u64::from(self.count) + 1) {
            0 => None,
            turn => Some((turn - 1) as u32),
        }
    }

    pub fn channel_name(channel: &str, group: u32) -> String {
        format!("{channel}-g{group}")
    }
}

/// Everything one worker needs, sent as the first line on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub scenario: Scenario,
    pub worker: u32,
    pub protocol: Protocol,
    /// The URLs, in `--url` order; never empty.
    pub targets: Vec<Target>,
    /// This worker's connections are numbered from here (for `{n}` and the
    /// choice of source address).
    pub first_index: u64,
    /// Connections to hold (connect scenario: handshakes to perform).
    pub connections: u64,
    /// Handshakes in flight at once (connect scenario: connections at once).
    pub in_flight_max: u64,
    pub source_addresses: Vec<Ipv4Addr>,
    /// This worker's share of the ramp rate; 0 = unpaced.
    pub ramp_rate_per_s: f64,
    /// Ramp time after which connections still pending are given up.
    pub ramp_max_ms: u64,
    pub connect_timeout_ms: u64,
    /// Channel name (or prefix, with a pool of several).
    pub channel: String,
    pub channels_per_connection: u32,
    pub channel_pool: u32,
    /// This worker's share of the churn rate.
    pub churn_rate_per_s: f64,
    /// Most publications the run may send (sizes the per-publication table).
    pub publications_max: u64,
    /// Connect scenario: how long to keep making handshakes.
    pub duration_ms: u64,
    /// Connect scenario: subscribe before closing.
    pub subscribe: bool,
    /// Largest server message accepted.
    pub message_bytes_max: usize,
    pub progress_interval_ms: u64,
    /// Group channels besides the broadcast channel (broadcast scenario).
    #[serde(default)]
    pub groups: Groups,
    /// `wss://` targets: the PEM certificates to trust (`--tls-ca`).
    #[serde(default)]
    pub tls_ca_pem: Option<String>,
}

impl WorkerConfig {
    /// The name of channel `j` of the pool.
    pub fn channel_name(&self, j: u32) -> String {
        if self.channel_pool <= 1 {
            self.channel.clone()
        } else {
            format!("{}-{j}", self.channel)
        }
    }

    /// Pool index of connection `n`'s `k`-th channel: consecutive
    /// connections take consecutive slices of the pool, wrapping around.
    pub fn channel_of(&self, n: u64, k: u32) -> u32 {
        let pool = u64::from(self.channel_pool.max(1));
        ((n * u64::from(self.channels_per_connection) + u64::from(k)) % pool) as u32
    }

    /// Target of connection `n`'s first connect: round-robin over the URLs.
    pub fn target_of(&self, n: u64) -> u32 {
        (n % self.targets.len().max(1) as u64) as u32
    }

    /// Target a subscriber resumes on after leaving `target`: the next URL,
    /// so that with several nodes every resume crosses to another one.
    pub fn next_target(&self, target: u32) -> u32 {
        ((u64::from(target) + 1) % self.targets.len().max(1) as u64) as u32
    }
}

/// Commands from the parent after the config line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// The measured phase starts: note CPU time; churn starts.
    Mark,
    /// Publishing is over. Wait up to `drain_ms` for every subscriber to reach
    /// the last publication, then close everything and report.
    Finish {
        /// Kometa: the last accepted offset. None when nothing was accepted.
        final_offset: Option<u64>,
        /// Publications the server accepted.
        accepted: u64,
        drain_ms: u64,
        /// With groups: the last accepted offset of each group channel
        /// (`final_offset` is then the broadcast channel's).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        group_final_offsets: Vec<Option<u64>>,
    },
    /// Stop now and report.
    Stop,
}

/// Lines from a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Progress(Progress),
    /// Every connection of the ramp is established or has failed.
    Ready(Progress),
    Result(Box<WorkerResult>),
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Connections that ever became established (subscribed, for Kometa).
    pub established: u64,
    /// Established right now.
    pub open: u64,
    pub in_flight: u64,
    pub connect_errors: u64,
    pub disconnects: u64,
    pub deliveries: u64,
    pub handshakes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker: u32,
    pub progress: Progress,
    pub connect_errors: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    /// CLOCK_MONOTONIC when the ramp started and when it was done.
    pub ramp_started_ns: u64,
    pub ramp_done_ns: u64,
    pub deliveries: DeliveryCounts,
    pub expected: u64,
    pub missing: u64,
    /// Resumes the server could not recover (`"recovered":false`).
    pub not_recovered: u64,
    pub recovered: u64,
    /// Pushes replayed after a resume (not in the latency figures).
    pub replayed: u64,
    /// Pushes that carried no sequence, or one past the run's publications.
    pub unexpected: u64,
    /// Groups: pushes of a group channel the subscriber did not join.
    #[serde(default)]
    pub misrouted: u64,
    /// Pushes that came before the subscribe reply.
    pub before_reply: u64,
    /// Messages that were neither pushes nor replies the generator expects.
    pub other_messages: u64,
    pub churned: u64,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
    /// Per-delivery latency, `(µs, count)`.
    pub latency_us: Vec<(u64, u64)>,
    /// Connect start to 101, `(µs, count)`.
    pub handshake_us: Vec<(u64, u64)>,
    /// `(sequence, ns)`: this worker's latest arrival of each publication.
    pub last_arrival_ns: Vec<(u64, u64)>,
    pub cpu_ns: u64,
    /// CPU and wall time from `Mark` to the end of the drain.
    pub cpu_run_ns: u64,
    pub wall_run_ns: u64,
    /// Connect scenario: CLOCK_MONOTONIC of the first start and last handshake.
    pub connect_started_ns: u64,
    pub connect_done_ns: u64,
    /// Per target, in `WorkerConfig::targets` order.
    pub targets: Vec<TargetCounts>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            scenario: Scenario::Idle,
            worker: 0,
            protocol: Protocol::Kometa,
            targets: vec![Target {
                address: "127.0.0.1:1".parse().unwrap(),
                authority: "x".into(),
                path: "/".into(),
                tls_server_name: None,
            }],
            first_index: 0,
            connections: 1,
            in_flight_max: 1,
            source_addresses: vec![],
            ramp_rate_per_s: 0.0,
            ramp_max_ms: 1,
            connect_timeout_ms: 1,
            channel: "load".into(),
            channels_per_connection: 2,
            channel_pool: 2,
            churn_rate_per_s: 0.0,
            publications_max: 0,
            duration_ms: 0,
            subscribe: false,
            message_bytes_max: 1,
            progress_interval_ms: 1,
            groups: Groups::default(),
            tls_ca_pem: None,
        }
    }

    #[test]
    fn channel_layout() {
        let mut config = config();
        // Everyone on the same two channels.
        assert_eq!((config.channel_of(0, 0), config.channel_of(0, 1), config.channel_of(7, 1)), (0, 1, 1));
        assert_eq!(config.channel_name(1), "load-1");
        // Two channels each from a pool of 10: slices 0-1, 2-3, … wrapping.
        config.channel_pool = 10;
        assert_eq!((config.channel_of(1, 0), config.channel_of(5, 1)), (2, 1));
        config.channel_pool = 1;
        config.channels_per_connection = 1;
        assert_eq!(config.channel_name(config.channel_of(3, 0)), "load");
    }

    #[test]
    fn connections_round_robin_over_targets_and_resume_on_the_next() {
        let mut config = config();
        // One URL: everything on it, resumes included.
        assert_eq!((config.target_of(0), config.target_of(7), config.next_target(0)), (0, 0, 0));
        let target = config.targets[0].clone();
        config.targets = vec![target; 3];
        let firsts: Vec<u32> = (0..7).map(|n| config.target_of(n)).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2, 0]);
        // Connection 4 starts on URL 1, resumes on 2, then 0, then 1 again.
        let mut visited = vec![config.target_of(4)];
        for _ in 0..3 {
            visited.push(config.next_target(visited[visited.len() - 1]));
        }
        assert_eq!(visited, [1, 2, 0, 1]);
        assert_eq!(config.target_of(u64::MAX), (u64::MAX % 3) as u32);
    }

    #[test]
    fn groups_take_turns_after_the_broadcast() {
        let none = Groups::default();
        assert_eq!((none.of_connection(5), none.of_publication(0), none.of_publication(7)), (None, None, None));
        let three = Groups { count: 3 };
        let turns: Vec<Option<u32>> = (0..9).map(|seq| three.of_publication(seq)).collect();
        assert_eq!(turns, [None, Some(0), Some(1), Some(2), None, Some(0), Some(1), Some(2), None]);
        assert_eq!(
            (three.of_connection(0), three.of_connection(4), three.of_connection(u64::MAX)),
            (Some(0), Some(1), Some(0))
        );
        assert_eq!(Groups::channel_name("load", 2), "load-g2");
        assert_eq!(
            Groups { count: u32::MAX }.of_publication(u64::MAX),
            Some((u64::MAX % (u64::from(u32::MAX) + 1) - 1) as u32)
        );
    }

    #[test]
    fn commands_round_trip() {
        let finish = Command::Finish { final_offset: Some(9), accepted: 9, drain_ms: 100, group_final_offsets: vec![] };
        let line = serde_json::to_string(&finish).unwrap();
        assert_eq!(line, r#"{"cmd":"finish","final_offset":9,"accepted":9,"drain_ms":100}"#);
        assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), finish);
        let groups =
            Command::Finish { final_offset: None, accepted: 3, drain_ms: 1, group_final_offsets: vec![Some(4), None] };
        let line = serde_json::to_string(&groups).unwrap();
        assert!(line.ends_with(r#""group_final_offsets":[4,null]}"#), "{line}");
        assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), groups);
        assert_eq!(serde_json::from_str::<Command>(r#"{"cmd":"mark"}"#).unwrap(), Command::Mark);
    }
}
