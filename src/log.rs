//! Logging: the subscriber (`[log]`: text or JSON lines on stderr, colour
//! only on a terminal) and a per-call-site rate limit for warnings that a
//! peer can cause, so a flood of bad clients cannot flood the log.
//!
//! `limited!(WARN, ...)` takes `tracing::warn!`'s arguments. Each call site
//! has its own budget of `log.warnings_per_second_max` lines per second;
//! what is over it is counted, and the count comes out as one line
//! "suppressed K similar" (naming the call site) at the next allowed line
//! of that site or, at the latest, at the next `report_suppressed` (every
//! shard sweep calls it).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Option<LogFormat> {
        match text {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Lines per second one call site of a peer-caused warning may write;
    /// the rest are counted and summarised.
    pub warnings_per_second_max: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, warnings_per_second_max: 10 }
    }
}

/// The process-wide budget per call site (set once at start).
static PER_SECOND_MAX: AtomicU32 = AtomicU32::new(10);

/// A reload's new `log.warnings_per_second_max`.
pub fn set_warnings_per_second_max(per_second_max: u32) {
    PER_SECOND_MAX.store(per_second_max, Ordering::Relaxed);
}

/// Installs the subscriber: level filter from `KOMETA_LOG` (default `info`),
/// lines on stderr in `config.format`, ANSI colour only when stderr is a
/// terminal (a file or a pipe gets plain text).
pub fn init(config: &LogConfig) {
    set_warnings_per_second_max(config.warnings_per_second_max);
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOMETA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // `try_init`: a second call (tests, or a subcommand after `serve`) keeps the first.
    let _ = match config.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Seconds since the first call: the limiter's clock (monotonic).
fn now_s() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// One call site's budget: `count` lines so far in the second `window_s`,
/// `suppressed` lines dropped and not yet reported.
#[derive(Debug)]
pub struct Limiter {
    /// `module:line` of the call site, for the summary line.
    site: &'static str,
    window_s: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU64,
    /// Whether this limiter is in `SUPPRESSING` (reported by the sweep).
    listed: AtomicBool,
}

/// What the call site should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the line; first write "suppressed K similar" when K > 0.
    Write { suppressed: u64 },
    /// Over budget: counted, not written.
    Suppress,
}

/// Limiters that have suppressed something, so a sweep can report counts
/// even when their call site goes quiet.
static SUPPRESSING: Mutex<Vec<&'static Limiter>> = Mutex::new(Vec::new());

impl Limiter {
    pub const fn new(site: &'static str) -> Limiter {
        Limiter {
            site,
            window_s: AtomicU64::new(u64::MAX),
            count: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        }
    }

    pub fn site(&self) -> &'static str {
        self.site
    }

    pub fn check(&'static self) -> Verdict {
        self.check_at(now_s(), PER_SECOND_MAX.load(Ordering::Relaxed))
    }

    /// The decision at second `now_s` with a budget of `per_second_max`.
    /// Racing threads may let a line or two more through at a window's
    /// start; never unboundedly many.
    pub fn check_at(&'static self, now_s: u64, per_second_max: u32) -> Verdict {
        let window = self.window_s.load(Ordering::Relaxed);
        if window != now_s
            && self.window_s.compare_exchange(window, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < per_second_max {
            return Verdict::Write { suppressed: self.suppressed.swap(0, Ordering::Relaxed) };
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        if !self.listed.swap(true, Ordering::Relaxed) {
            if let Ok(mut list) = SUPPRESSING.lock() {
                list.push(self);
            }
        }
        Verdict::Suppress
    }

    /// Takes the count of suppressed lines not yet reported.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

/// Writes "suppressed K similar" for every call site that dropped lines
/// since its last report. Cheap when nothing was suppressed.
pub fn report_suppressed() {
    let Ok(list) = SUPPRESSING.lock() else { return };
    for limiter in list.iter() {
        let suppressed = limiter.take_suppressed();
        if suppressed > 0 {
            tracing::warn!(site = limiter.site(), suppressed, "suppressed {suppressed} similar");
        }
    }
}

/// A rate-limited `tracing` event: `limited!(WARN, field = value, "message")`
/// (level: `WARN`, `ERROR`, `INFO` or `DEBUG`). See the module docs.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::log::Limiter = $crate::log::Limiter::new(concat!(module_path!(), ":", line!()));
        if tracing::enabled!(tracing::Level::$level) {
            match LIMITER.check() {
                $crate::log::Verdict::Write { suppressed } => {
                    if suppressed > 0 {
                        tracing::event!(tracing::Level::$level, site = LIMITER.site(), suppressed, "suppressed {suppressed} similar");
                    }
                    tracing::event!(tracing::Level::$level, $($arg)+);
                }
                $crate::log::Verdict::Suppress => {}
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_budget_per_second_then_a_count() {
        static LIMITER: Limiter = Limiter::new("test:1");
        let written = (0..1000).filter(|_| LIMITER.check_at(5, 10) != Verdict::Suppress).count();
        assert_eq!(written, 10);
        // The next second: the first line carries the count of the last.
        assert_eq!(LIMITER.check_at(6, 10), Verdict::Write { suppressed: 990 });
        assert_eq!(LIMITER.check_at(6, 10), Verdict::Write { suppressed: 0 });
    }

    #[test]
    fn a_quiet_site_is_reported_by_the_sweep() {
        static LIMITER: Limiter = Limiter::new("test:2");
        for _ in 0..5 {
            LIMITER.check_at(7, 2);
        }
        assert!(SUPPRESSING.lock().unwrap().iter().any(|l| std::ptr::eq(*l, &LIMITER)));
        assert_eq!(LIMITER.take_suppressed(), 3);
        assert_eq!(LIMITER.take_suppressed(), 0);
    }

    #[test]
    fn formats_parse() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("xml"), None);
    }
}
