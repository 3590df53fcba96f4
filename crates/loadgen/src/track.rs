//! Delivery accounting: exactly-once and in-order checks per subscriber,
//! and the time until the last subscriber got each publication.

/// What one delivery meant for its subscriber's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The next expected key.
    InOrder,
    /// A later key: this many keys before it never arrived (yet).
    Gap(u64),
    /// A key at or below one already seen: delivered twice, or out of order.
    Duplicate,
}

/// One subscriber's position in a strictly increasing sequence of keys
/// (Kometa channel offsets, or the publisher's sequence numbers for peers
/// without offsets). Keys must arrive as `next`, `next + 1`, …; the server
/// promises per-channel order, so anything else is a gap or a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// The key the next delivery should carry.
    pub next: u64,
}

impl Sequence {
    /// A sequence whose first expected key is `next`.
    pub fn starting_at(next: u64) -> Sequence {
        Sequence { next }
    }

    pub fn observe(&mut self, key: u64) -> Outcome {
        // Keys come from the peer: saturate rather than overflow on u64::MAX.
        if key == self.next {
            self.next = self.next.saturating_add(1);
            Outcome::InOrder
        } else if key > self.next {
            let skipped = key - self.next;
            self.next = key.saturating_add(1);
            Outcome::Gap(skipped)
        } else {
            Outcome::Duplicate
        }
    }

    /// Keys up to and including `last` that never arrived.
    pub fn missing_through(&self, last: u64) -> u64 {
        last.saturating_add(1).saturating_sub(self.next)
    }
}

/// Counters a worker keeps over all its subscribers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryCounts {
    /// Pushes that carried a key, duplicates included.
    pub total: u64,
    /// Distinct keys delivered (in order or after a gap).
    pub unique: u64,
    pub duplicates: u64,
    /// Keys skipped in the middle of a subscriber's sequence.
    pub gaps: u64,
}

impl DeliveryCounts {
    pub fn count(&mut self, outcome: Outcome) {
        self.total += 1;
        match outcome {
            Outcome::InOrder => self.unique += 1,
            Outcome::Gap(skipped) => {
                self.unique += 1;
                self.gaps = self.gaps.saturating_add(skipped);
            }
            Outcome::Duplicate => self.duplicates += 1,
        }
    }

    pub fn add(&mut self, other: &DeliveryCounts) {
        self.total += other.total;
        self.unique += other.unique;
        self.duplicates += other.duplicates;
        self.gaps = self.gaps.saturating_add(other.gaps);
    }
}

/// The latest arrival of each publication over a worker's subscribers, as
/// latency (arrival minus send time). Indexed by sequence number; the table
/// grows on demand up to `capacity` (the most publications the run may send),
/// so a bogus sequence number from a peer cannot make it grow without bound.
#[derive(Debug, Default)]
pub struct LastArrivals {
    latency_ns: Vec<u64>,
    capacity: usize,
}

impl LastArrivals {
    pub fn new(capacity: usize) -> LastArrivals {
        LastArrivals { latency_ns: Vec::new(), capacity }
    }

    /// Records one delivery; false when `seq` is past the capacity.
    pub fn record(&mut self, seq: u64, latency_ns: u64) -> bool {
        let Ok(index) = usize::try_from(seq) else {
            return false;
        };
        if index >= self.capacity {
            return false;
        }
        if index >= self.latency_ns.len() {
            self.latency_ns.resize(index + 1, 0);
        }
        // Stored as latency + 1 so that 0 means "no delivery".
        let stored = latency_ns.saturating_add(1);
        let slot = &mut self.latency_ns[index];
        *slot = (*slot).max(stored);
        true
    }

    /// (sequence, latency ns) of every publication delivered at least once.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.latency_ns.iter().enumerate().filter(|(_, &v)| v > 0).map(|(seq, &v)| (seq as u64, v - 1))
    }
}

/// Merges workers' per-publication maxima: the last subscriber of a
/// publication is the latest over all workers. Returns latencies by sequence.
pub fn merge_last_arrivals(parts: &[Vec<(u64, u64)>]) -> std::collections::BTreeMap<u64, u64> {
    let mut merged = std::collections::BTreeMap::new();
    for part in parts {
        for &(seq, latency_ns) in part {
            let slot = merged.entry(seq).or_insert(0);
            *slot = latency_ns.max(*slot);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, keys: &[u64]) -> (Sequence, DeliveryCounts) {
        let mut sequence = Sequence::starting_at(start);
        let mut counts = DeliveryCounts::default();
        for &key in keys {
            counts.count(sequence.observe(key));
        }
        (sequence, counts)
    }

    #[test]
    fn in_order_is_exactly_once() {
        let (sequence, counts) = run(1, &[1, 2, 3, 4]);
        assert_eq!(counts, DeliveryCounts { total: 4, unique: 4, duplicates: 0, gaps: 0 });
        assert_eq!(sequence.missing_through(4), 0);
        assert_eq!(sequence.missing_through(6), 2);
    }

    #[test]
    fn gaps_and_duplicates_are_counted() {
        let (sequence, counts) = run(0, &[0, 1, 1, 4, 5, 2, 5, 6]);
        // 2 and 3 skipped before 4; the second 1, the late 2 and the second 5 are duplicates.
        assert_eq!(counts, DeliveryCounts { total: 8, unique: 5, duplicates: 3, gaps: 2 });
        assert_eq!(sequence.next, 7);
    }

    #[test]
    fn a_resume_that_replays_the_seam_twice_is_caught() {
        // Offsets 10..=12 live, disconnect, resume from 12 replays 12 again, then 13.
        let (_, counts) = run(10, &[10, 11, 12, 12, 13]);
        assert_eq!(counts.duplicates, 1);
        assert_eq!(counts.gaps, 0);
        // A resume that loses 13 shows as a gap.
        let (_, counts) = run(10, &[10, 11, 12, 14]);
        assert_eq!(counts.gaps, 1);
    }

    #[test]
    fn absurd_keys_from_a_peer_do_not_overflow() {
        let (sequence, counts) = run(0, &[u64::MAX, u64::MAX]);
        assert_eq!(counts.gaps, u64::MAX);
        assert_eq!(sequence.missing_through(u64::MAX), 0);
        assert_eq!(Sequence::starting_at(0).missing_through(u64::MAX), u64::MAX);
    }

    #[test]
    fn last_arrival_is_the_maximum_and_bounded() {
        let mut last = LastArrivals::new(4);
        assert!(last.record(0, 500));
        assert!(last.record(0, 300));
        assert!(last.record(2, 0));
        assert!(!last.record(4, 1));
        assert!(!last.record(u64::MAX, 1));
        assert_eq!(last.entries().collect::<Vec<_>>(), vec![(0, 500), (2, 0)]);
    }

    #[test]
    fn last_subscriber_merges_across_workers() {
        let merged = merge_last_arrivals(&[vec![(0, 100), (1, 900)], vec![(0, 700), (2, 50)], vec![]]);
        assert_eq!(merged.into_iter().collect::<Vec<_>>(), vec![(0, 700), (1, 900), (2, 50)]);
    }
}
