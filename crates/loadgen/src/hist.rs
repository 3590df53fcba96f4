//! Latency histograms (hdrhistogram, microsecond resolution), shipped from
//! workers to the parent as `(value, count)` lists and merged there.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest latency kept exactly; longer ones are recorded as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Three significant digits: 0.1 % error on any percentile.
const SIGNIFICANT_DIGITS: u8 = 3;

pub struct Latency {
    histogram: Histogram<u64>,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latency({} values)", self.histogram.len())
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        // Fixed, valid bounds: creation cannot fail.
        let histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
            .expect("static histogram bounds are valid");
        Latency { histogram }
    }

    /// Records a latency given in nanoseconds (rounded up to whole microseconds).
    pub fn record_ns(&mut self, latency_ns: u64) {
        self.histogram.saturating_record(latency_ns.div_ceil(1000).min(LATENCY_US_MAX));
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// `(value in µs, count)` for every recorded value, to send to the parent.
    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.histogram.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
    }

    /// Adds values sent by a worker.
    pub fn merge_pairs(&mut self, pairs: &[(u64, u64)]) {
        for &(value_us, count) in pairs {
            self.histogram.saturating_record_n(value_us.min(LATENCY_US_MAX), count);
        }
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        let at = |q: f64| if self.histogram.is_empty() { 0.0 } else { ms(self.histogram.value_at_quantile(q)) };
        Percentiles {
            count: self.histogram.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: if self.histogram.is_empty() { 0.0 } else { ms(self.histogram.max()) },
            mean_ms: if self.histogram.is_empty() { 0.0 } else { self.histogram.mean() / 1000.0 },
        }
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_pairs_equals_recording_everything_in_one() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        let mut all = Latency::new();
        for i in 0..10_000u64 {
            let ns = (i * 7919) % 50_000_000 + 1;
            if i % 3 == 0 {
                a.record_ns(ns);
            } else {
                b.record_ns(ns);
            }
            all.record_ns(ns);
        }
        let mut merged = Latency::new();
        merged.merge_pairs(&a.to_pairs());
        merged.merge_pairs(&b.to_pairs());
        assert_eq!(merged.count(), 10_000);
        assert_eq!(merged.summary(), all.summary());
    }

    #[test]
    fn percentiles_are_ordered_and_in_milliseconds() {
        let mut latency = Latency::new();
        for us in 1..=1000u64 {
            latency.record_ns(us * 1000);
        }
        let p = latency.summary();
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.max_ms - 1.0).abs() < 0.01, "{p:?}");
        assert!(p.p50_ms <= p.p90_ms && p.p90_ms <= p.p99_ms && p.p99_ms <= p.p999_ms && p.p999_ms <= p.max_ms);
    }

    #[test]
    fn extremes_saturate_instead_of_failing() {
        let mut latency = Latency::new();
        latency.record_ns(0);
        latency.record_ns(u64::MAX);
        latency.merge_pairs(&[(u64::MAX, 1)]);
        assert_eq!(latency.count(), 3);
        assert_eq!(Latency::new().summary(), Percentiles::default());
    }
}
