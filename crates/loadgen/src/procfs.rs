//! Server-side figures read from `/proc`: the server's resident memory and
//! CPU time, and the kernel's slab memory (where socket structures live).

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSample {
    pub rss_bytes: u64,
    /// The private part of the RSS (`RssAnon:`): without the pages of the
    /// executable, which processes of one binary share; 0 where not shown.
    pub anon_bytes: u64,
    /// User plus system CPU time.
    pub cpu_ns: u64,
}

/// Reads `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample_process(pid: u32) -> Result<ProcessSample, String> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| format!("/proc/{pid}/{file}: {e}"))
    };
    let status = read("status")?;
    let rss_bytes = kb_field(&status, "VmRSS:")
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS (is it a zombie?)"))?
        .saturating_mul(1024);
    let anon_bytes = kb_field(&status, "RssAnon:").unwrap_or(0).saturating_mul(1024);
    let ticks = cpu_ticks(&read("stat")?).ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    Ok(ProcessSample { rss_bytes, anon_bytes, cpu_ns: ticks.saturating_mul(1_000_000_000) / clock_ticks_per_s() })
}

/// The process's proportional set size (`Pss:` of `/proc/PID/smaps_rollup`):
/// its private pages plus its share of pages it shares, such as the
/// executable's with other processes of the same binary. Summed over
/// several nodes it counts each shared page once, where summed RSS counts
/// it in every process. None where the kernel does not show it.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kb_field(&rollup, "Pss:").map(|kb| kb.saturating_mul(1024))
}

/// `Slab:` from `/proc/meminfo`, in bytes: kernel objects, socket structures among them.
pub fn slab_bytes() -> Result<u64, String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    kb_field(&meminfo, "Slab:").map(|kb| kb * 1024).ok_or_else(|| "/proc/meminfo has no Slab line".into())
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// The number in a `Key:   123 kB` line.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// utime + stime (fields 14 and 15) from `/proc/PID/stat`. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_meminfo_and_stat() {
        let status = "Name:\tkometa\nVmPeak:\t  200 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(kb_field(status, "VmRSS:"), Some(12345));
        assert_eq!(kb_field(status, "VmSwap:"), None);
        let meminfo = "MemTotal:       24000000 kB\nSlab:             456789 kB\nSReclaimable:     1 kB\n";
        assert_eq!(kb_field(meminfo, "Slab:"), Some(456_789));
        let stat = "4242 (kometa (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let sample = sample_process(std::process::id()).unwrap();
        assert!(sample.rss_bytes > 0);
        assert!(slab_bytes().unwrap() > 0);
        assert!(sample_process(u32::MAX).is_err());
    }
}
