//! Sizing a run from its connection count, so that `-n 1000000` works
//! without hand-picked `--workers` and `--source-addresses`:
//!
//! - **workers**: no worker holds more sockets than its open-files limit
//!   allows (the hard limit, which a worker raises its soft limit to, less
//!   what it needs besides sockets), nor more than 15,000 (one epoll loop,
//!   one core at most);
//! - **source addresses**: on loopback every address of 127.0.0.0/8 is local,
//!   and each (source address, server address) pair has its own ephemeral
//!   port range. Enough sources are chosen that no pair needs more than 40 %
//!   of the range: connect() looks for a free port among the even ports of
//!   the range first and only then among the odd ones, so once a pair holds
//!   half the range every further connect walks all of its even ports first
//!   (measured here: 100,000 connections over 4 sources, 25,000 per pair,
//!   ramped at 2,200/s with 75 s of generator CPU, against 19,600/s and 6 s
//!   over 8 sources). Ports of connections closed in an earlier run to the
//!   same server address sit in TIME_WAIT for 60 s and count too.
//!
//! Everything here is arithmetic on plain numbers; the host's limits are read
//! once by [`HostLimits::read`].

use std::net::{Ipv4Addr, SocketAddr};

/// Connections one worker holds at most.
pub const CONNECTIONS_PER_WORKER_MAX: u64 = 15_000;
/// Descriptors a worker needs besides its sockets (stdio, epoll, slack); it
/// refuses to start with fewer spare than this.
pub const WORKER_SPARE_FDS: u64 = 64;
/// Share of a pair's port range a plan may use, in percent (see above).
const PORT_RANGE_USABLE_PERCENT: u64 = 40;
/// The kernel's default `ip_local_port_range` (32768-60999), when it cannot be read.
const DEFAULT_EPHEMERAL_PORTS: u64 = 28_232;
/// Automatic source addresses start here (127.0.0.1 is the kernel's own choice).
const FIRST_AUTO_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Most source addresses chosen automatically (a million connections to one
/// address need 40 at the default port range).
const AUTO_SOURCES_MAX: u64 = 4096;

/// What this host allows one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// RLIMIT_NOFILE hard limit of this process (workers inherit it).
    pub open_files_hard: u64,
    /// Ports in `net.ipv4.ip_local_port_range`.
    pub ephemeral_ports: u64,
}

impl HostLimits {
    pub fn read() -> HostLimits {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `limit` is a valid rlimit to write into.
        let open_files_hard =
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_max } else { 1024 };
        let ephemeral_ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| port_range_size(&text))
            .unwrap_or(DEFAULT_EPHEMERAL_PORTS);
        HostLimits { open_files_hard, ephemeral_ports }
    }

    /// Connections one worker may hold: 15,000, or less where the limit is lower.
    pub fn connections_per_worker(&self) -> u64 {
        CONNECTIONS_PER_WORKER_MAX.min(self.open_files_hard.saturating_sub(WORKER_SPARE_FDS))
    }

    /// Ports one (source, server address) pair may use in a plan.
    pub fn usable_ports(&self) -> u64 {
        self.ephemeral_ports * PORT_RANGE_USABLE_PERCENT / 100
    }
}

/// Ports in an `ip_local_port_range` value (`"32768\t60999"`).
fn port_range_size(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (low, high) = (fields.next()?.ok()?, fields.next()?.ok()?);
    (high >= low).then(|| high - low + 1)
}

/// Workers for `slots` sockets held at once (connections; for the connect
/// scenario, handshakes in flight).
pub fn workers_for(slots: u64, limits: &HostLimits) -> Result<u64, String> {
    let per_worker = limits.connections_per_worker();
    if per_worker == 0 {
        return Err(format!(
            "the open-files limit ({}) leaves no room for client sockets; raise `ulimit -Hn`",
            limits.open_files_hard
        ));
    }
    Ok(slots.div_ceil(per_worker).max(1))
}

/// The most connections any one (source address, server address) pair gets
/// when connection `i` of `connections` goes to `targets[i % targets.len()]`
/// from source `i % sources` (as the workers assign them). Addresses given
/// twice share their ports. The assignment repeats every lcm(sources,
/// targets) connections, so one period is counted, not every connection.
pub fn busiest_pair(connections: u64, sources: u64, targets: &[SocketAddr]) -> u64 {
    let (sources, target_count) = (sources.max(1), targets.len().max(1) as u64);
    let period = sources / gcd(sources, target_count) * target_count;
    let (full_periods, rest) = (connections / period, connections % period);
    let mut pairs: std::collections::HashMap<(u64, SocketAddr), u64> = std::collections::HashMap::new();
    for i in 0..period.min(connections) {
        let Some(&target) = targets.get((i % target_count) as usize) else { break };
        let count = full_periods + u64::from(i < rest);
        *pairs.entry((i % sources, target)).or_default() += count;
    }
    pairs.into_values().max().unwrap_or(0)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Source addresses to add when none were given: None when the kernel's own
/// choice (one source, 127.0.0.1 on loopback) has ports enough, or when a
/// target is not a loopback IPv4 address (only there is every address of
/// 127.0.0.0/8 ours to bind). Otherwise the fewest from 127.0.0.2 on with
/// which no pair needs more than the usable ports.
pub fn auto_source_addresses(
    connections: u64,
    targets: &[SocketAddr],
    limits: &HostLimits,
) -> Result<Option<Vec<Ipv4Addr>>, String> {
    let usable = limits.usable_ports().max(1);
    if busiest_pair(connections, 1, targets) <= usable {
        return Ok(None);
    }
    if !targets.iter().all(|t| matches!(t, SocketAddr::V4(v4) if v4.ip().is_loopback())) {
        return Ok(None);
    }
    // At least the busiest address's load over the usable ports; more when
    // sources and targets share a factor and some pairs go unused.
    let mut sources = busiest_pair(connections, 1, targets).div_ceil(usable).max(2);
    while busiest_pair(connections, sources, targets) > usable {
        sources += 1;
        if sources > AUTO_SOURCES_MAX {
            return Err(format!(
                "{connections} connections would need more than {AUTO_SOURCES_MAX} source addresses; \
                 widen net.ipv4.ip_local_port_range or give --source-addresses"
            ));
        }
    }
    let first = u32::from(FIRST_AUTO_SOURCE);
    Ok(Some((0..sources as u32).map(|i| Ipv4Addr::from(first + i)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: HostLimits = HostLimits { open_files_hard: 20_000, ephemeral_ports: 28_232 };

    fn addresses(ports: &[u16]) -> Vec<SocketAddr> {
        ports.iter().map(|&p| SocketAddr::from(([127, 0, 0, 1], p))).collect()
    }

    #[test]
    fn port_range_is_read_from_the_sysctl_text() {
        assert_eq!(port_range_size("32768\t60999\n"), Some(28_232));
        assert_eq!(port_range_size("1024 65535"), Some(64_512));
        assert_eq!(port_range_size("60999 32768"), None);
        assert_eq!(port_range_size(""), None);
    }

    #[test]
    fn workers_hold_at_most_15000_and_stay_under_the_open_files_limit() {
        assert_eq!(workers_for(1, &HERE).unwrap(), 1);
        assert_eq!(workers_for(15_000, &HERE).unwrap(), 1);
        assert_eq!(workers_for(15_001, &HERE).unwrap(), 2);
        // A million here: 67 workers of at most 15,000 sockets.
        assert_eq!(workers_for(1_000_000, &HERE).unwrap(), 67);
        // Where the hard limit is 1024, a worker takes 960.
        let small = HostLimits { open_files_hard: 1024, ..HERE };
        assert_eq!(small.connections_per_worker(), 960);
        assert_eq!(workers_for(100_000, &small).unwrap(), 105);
        let none = HostLimits { open_files_hard: 50, ..HERE };
        assert!(workers_for(10, &none).is_err());
    }

    #[test]
    fn the_kernel_choice_is_kept_while_one_source_has_ports_enough() {
        let one = addresses(&[8080]);
        assert_eq!(auto_source_addresses(11_000, &one, &HERE).unwrap(), None);
        // Three server ports hold 30,000 from one source: each pair gets 10,000.
        assert_eq!(auto_source_addresses(30_000, &addresses(&[1, 2, 3]), &HERE).unwrap(), None);
        // Not loopback: the generator cannot invent local addresses.
        let remote = [SocketAddr::from(([10, 0, 0, 5], 8080))];
        assert_eq!(auto_source_addresses(1_000_000, &remote, &HERE).unwrap(), None);
    }

    #[test]
    fn a_million_to_one_address_gets_enough_sources() {
        let one = addresses(&[8080]);
        let sources = auto_source_addresses(1_000_000, &one, &HERE).unwrap().unwrap();
        // 40 % of 28,232 = 11,292 ports per pair: 89 sources of at most 11,236.
        assert_eq!(sources.len(), 89);
        assert_eq!(sources[0], Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(sources[88], Ipv4Addr::new(127, 0, 0, 90));
        assert!(busiest_pair(1_000_000, 89, &one) <= HERE.usable_ports());
        assert!(busiest_pair(1_000_000, 88, &one) > HERE.usable_ports());
        // With the tuning kit's range (1024-65535): 25,804 per pair, 39 sources.
        let wide = HostLimits { ephemeral_ports: 64_512, ..HERE };
        assert_eq!(auto_source_addresses(1_000_000, &one, &wide).unwrap().unwrap().len(), 39);
    }

    #[test]
    fn pairs_are_counted_as_the_workers_assign_them() {
        // Two targets, four sources: even connections go to target 0 and only
        // ever use sources 0 and 2, so each used pair gets a quarter.
        let two = addresses(&[1, 2]);
        assert_eq!(busiest_pair(100, 4, &two), 25);
        assert_eq!(busiest_pair(100, 3, &two), 17);
        assert_eq!(busiest_pair(101, 1, &addresses(&[1])), 101);
        // The same address twice shares its ports.
        assert_eq!(busiest_pair(100, 1, &addresses(&[7, 7])), 100);
        assert_eq!(busiest_pair(0, 5, &two), 0);
        // Sources are added until no pair is over, even when the factor is shared.
        let sources = auto_source_addresses(200_000, &two, &HERE).unwrap().unwrap();
        assert!(busiest_pair(200_000, sources.len() as u64, &two) <= HERE.usable_ports());
        // 100,000 per address over 11,292: 9 sources, odd, so no pair goes unused.
        assert_eq!(sources.len(), 9);
        assert_eq!(auto_source_addresses(210_000, &two, &HERE).unwrap().unwrap().len(), 11);
    }
}
