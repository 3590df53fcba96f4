//! Pacing: how many connection attempts (or churn events) are due at a given
//! moment, so a worker ramps at its share of the requested rate without a
//! timer per connection, and never has more than a bounded number of
//! handshakes in flight.

/// Events due `elapsed_ns` after the start at `rate_per_s`, at most `total`.
/// A rate of 0 or less (or not finite) means "no pacing": everything is due.
pub fn due(total: u64, rate_per_s: f64, elapsed_ns: u64) -> u64 {
    if !(rate_per_s.is_finite() && rate_per_s > 0.0) {
        return total;
    }
    // The first event is due at once, then one every 1/rate seconds.
    let due = (rate_per_s * elapsed_ns as f64 / 1e9).floor() + 1.0;
    if due >= total as f64 {
        total
    } else {
        due as u64
    }
}

/// A ramp of `total` connection attempts.
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    pub total: u64,
    pub rate_per_s: f64,
    /// Attempts allowed in flight (connecting, handshaking, subscribing) at once.
    pub in_flight_max: u64,
    /// Attempts started per call at most, so one loop turn stays short.
    pub burst_max: u64,
}

impl Ramp {
    /// How many attempts to start now, given how many have been started and
    /// how many are still in flight.
    pub fn to_start(&self, elapsed_ns: u64, started: u64, in_flight: u64) -> u64 {
        let paced = due(self.total, self.rate_per_s, elapsed_ns).saturating_sub(started);
        let room = self.in_flight_max.saturating_sub(in_flight);
        paced.min(room).min(self.burst_max)
    }

    /// Nanoseconds after the start at which the next attempt is due (for the
    /// poll timeout); None when everything is due already or done.
    pub fn next_due_ns(&self, started: u64) -> Option<u64> {
        if started >= self.total || !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0) {
            return None;
        }
        Some((started as f64 * 1e9 / self.rate_per_s).ceil() as u64)
    }
}

/// Splits `total` into `parts` shares that differ by at most one, larger first.
pub fn split(total: u64, parts: u64) -> Vec<u64> {
    let parts = parts.max(1);
    (0..parts).map(|i| total / parts + u64::from(i < total % parts)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn paced_ramp_is_linear_and_capped() {
        assert_eq!(due(100, 1000.0, 0), 1);
        assert_eq!(due(100, 1000.0, 10 * MS), 11);
        assert_eq!(due(100, 1000.0, 99 * MS), 100);
        assert_eq!(due(100, 1000.0, 10_000 * MS), 100);
        assert_eq!(due(0, 1000.0, 10 * MS), 0);
        assert_eq!(due(100, 0.0, 0), 100);
        assert_eq!(due(100, f64::INFINITY, 0), 100);
        assert_eq!(due(100, f64::NAN, 0), 100);
    }

    #[test]
    fn in_flight_and_burst_limits_hold() {
        let ramp = Ramp { total: 10_000, rate_per_s: 0.0, in_flight_max: 500, burst_max: 256 };
        assert_eq!(ramp.to_start(0, 0, 0), 256);
        assert_eq!(ramp.to_start(0, 256, 256), 244);
        assert_eq!(ramp.to_start(0, 500, 500), 0);
        assert_eq!(ramp.to_start(0, 9_990, 0), 10);
        assert_eq!(ramp.to_start(0, 10_000, 0), 0);
        let paced = Ramp { total: 10_000, rate_per_s: 2000.0, in_flight_max: 500, burst_max: 256 };
        // 50 ms in: 101 due, 40 started.
        assert_eq!(paced.to_start(50 * MS, 40, 3), 61);
    }

    #[test]
    fn next_due_time() {
        let ramp = Ramp { total: 10, rate_per_s: 100.0, in_flight_max: 10, burst_max: 10 };
        assert_eq!(ramp.next_due_ns(1), Some(10 * MS));
        assert_eq!(ramp.next_due_ns(10), None);
        let unpaced = Ramp { rate_per_s: 0.0, ..ramp };
        assert_eq!(unpaced.next_due_ns(0), None);
        // Starting exactly what is due at each due time reaches the total.
        let mut started = 0;
        while let Some(at) = ramp.next_due_ns(started) {
            started += ramp.to_start(at, started, 0);
        }
        assert_eq!(started, 10);
    }

    #[test]
    fn shares_add_up() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split(7, 0), vec![7]);
        assert_eq!(split(15_001, 2).iter().sum::<u64>(), 15_001);
    }
}
