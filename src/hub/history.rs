//! A channel's recent publications: a ring bounded by count and age, used
//! for `history` queries and for gapless resume.

use std::collections::VecDeque;
use std::sync::Arc;

use super::publication::Publication;

/// Why a resume position cannot be served from history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// The channel's epoch changed (history was lost, e.g. a restart).
    EpochChanged,
    /// Publications after the position have already left the history.
    HistoryTooShort,
    /// The position is past the channel's last offset.
    OffsetAhead,
}

impl RecoveryFailure {
    pub fn reason(self) -> &'static str {
        match self {
            RecoveryFailure::EpochChanged => "epoch_changed",
            RecoveryFailure::HistoryTooShort => "history_too_short",
            RecoveryFailure::OffsetAhead => "offset_ahead",
        }
    }
}

#[derive(Debug)]
struct Entry {
    stored_at_ms: u64,
    publication: Arc<Publication>,
}

/// Publications in offset order, oldest first. Offsets are contiguous: every
/// publication of the channel goes through `push`.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Entry>,
}

impl History {
    /// Appends a publication, dropping the oldest past `size_max` and those
    /// older than `ttl_ms`.
    pub fn push(&mut self, publication: Arc<Publication>, now_ms: u64, size_max: usize, ttl_ms: u64) {
        debug_assert!(self.entries.back().is_none_or(|last| last.publication.offset + 1 == publication.offset));
        if size_max == 0 {
            self.entries.clear();
            return;
        }
        while self.entries.len() >= size_max {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry { stored_at_ms: now_ms, publication });
        self.expire(now_ms, ttl_ms);
    }

    /// Drops publications older than `ttl_ms`.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64) {
        while self.entries.front().is_some_and(|e| now_ms.saturating_sub(e.stored_at_ms) >= ttl_ms) {
            self.entries.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn first_offset(&self) -> Option<u64> {
        self.entries.front().map(|e| e.publication.offset)
    }

    pub fn last_offset(&self) -> Option<u64> {
        self.entries.back().map(|e| e.publication.offset)
    }

    /// Forgets everything (cluster mode: publications were lost, so the
    /// ring would no longer hold contiguous offsets).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Up to `limit` publications with offsets greater than `after`, oldest first.
    pub fn after(&self, after: u64, limit: usize) -> Vec<Arc<Publication>> {
        let skip = match self.first_offset() {
            Some(first) if after >= first => (after - first + 1) as usize,
            _ => 0,
        };
        self.entries.iter().skip(skip).take(limit).map(|e| Arc::clone(&e.publication)).collect()
    }

    /// Every publication after `since`, given the channel's `last_offset`,
    /// or why that is impossible.
    pub fn recover(&self, since: u64, last_offset: u64) -> Result<Vec<Arc<Publication>>, RecoveryFailure> {
        if since > last_offset {
            return Err(RecoveryFailure::OffsetAhead);
        }
        if since == last_offset {
            return Ok(Vec::new());
        }
        match self.first_offset() {
            Some(first) if first <= since + 1 => {
                let missed = self.after(since, usize::MAX);
                debug_assert_eq!(missed.len() as u64, last_offset - since);
                Ok(missed)
            }
            _ => Err(RecoveryFailure::HistoryTooShort),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::publication::PushFields;
    use proptest::prelude::*;

    fn publication(offset: u64) -> Arc<Publication> {
        Arc::new(Publication::encode(
            "c".into(),
            "e".into(),
            offset,
            PushFields { channel: "c", event: "m", data: b"1", user: None },
        ))
    }

    #[test]
    fn recovery_cases() {
        let mut history = History::default();
        for offset in 1..=10 {
            history.push(publication(offset), offset * 10, 5, 1_000);
        }
        assert_eq!(history.first_offset(), Some(6));
        let offsets = |v: Vec<Arc<Publication>>| v.iter().map(|p| p.offset).collect::<Vec<_>>();
        assert_eq!(offsets(history.recover(5, 10).unwrap()), vec![6, 7, 8, 9, 10]);
        assert_eq!(offsets(history.recover(8, 10).unwrap()), vec![9, 10]);
        assert_eq!(history.recover(10, 10).unwrap().len(), 0);
        assert_eq!(history.recover(4, 10).unwrap_err(), RecoveryFailure::HistoryTooShort);
        assert_eq!(history.recover(11, 10).unwrap_err(), RecoveryFailure::OffsetAhead);
        history.expire(10_000, 1_000);
        assert!(history.is_empty());
        assert_eq!(history.recover(9, 10).unwrap_err(), RecoveryFailure::HistoryTooShort);
        assert_eq!(history.recover(10, 10).unwrap().len(), 0);
    }

    #[test]
    fn zero_size_keeps_nothing() {
        let mut history = History::default();
        history.push(publication(1), 0, 0, 1_000);
        assert!(history.is_empty());
    }

    proptest! {
        /// Whatever the sizes, TTLs and timing, the ring stays within its
        /// bounds, keeps contiguous offsets ending at the last one, and
        /// recovery returns exactly the missed offsets or fails.
        #[test]
        fn ring_invariants(size_max in 0usize..20, ttl_ms in 1u64..100, steps in proptest::collection::vec(0u64..30, 1..200), since_back in 0u64..40) {
            let mut history = History::default();
            let mut now = 0;
            let mut last = 0;
            for step in steps {
                now += step;
                last += 1;
                history.push(publication(last), now, size_max, ttl_ms);
                prop_assert!(history.len() <= size_max);
                let offsets: Vec<u64> = history.after(0, usize::MAX).iter().map(|p| p.offset).collect();
                for pair in offsets.windows(2) {
                    prop_assert_eq!(pair[0] + 1, pair[1]);
                }
                if let Some(&end) = offsets.last() {
                    prop_assert_eq!(end, last);
                }
            }
            let since = last.saturating_sub(since_back);
            match history.recover(since, last) {
                Ok(missed) => {
                    let offsets: Vec<u64> = missed.iter().map(|p| p.offset).collect();
                    let expected: Vec<u64> = (since + 1..=last).collect();
                    prop_assert_eq!(offsets, expected);
                }
                Err(failure) => {
                    prop_assert_eq!(failure, RecoveryFailure::HistoryTooShort);
                    prop_assert!(history.first_offset().is_none_or(|first| first > since + 1));
                }
            }
        }
    }
}
