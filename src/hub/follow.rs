//! Cluster mode: how a node follows a channel whose offsets Redis assigns.
//! The channel's owner shard on each node keeps the epoch and the last
//! offset it delivered; publications arrive from Redis pub/sub, and a
//! catch-up (a read of the channel's position and history) fills what the
//! node missed. These functions decide, from what arrived, what to deliver
//! and what to tell subscribers they lost. Pure: no I/O, no clock.
//!
//! Invariant: within an epoch, a node delivers offsets in strictly
//! increasing order, each once; every offset it skips is announced as a
//! loss (`Step::Lost`), never skipped silently.

use std::sync::Arc;

use super::history::RecoveryFailure;
use super::publication::Publication;

/// What the node has delivered of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    /// Last offset delivered (or known to be before the node's subscribers).
    pub offset: u64,
}

/// What a catch-up read in Redis.
#[derive(Debug)]
pub struct CaughtUp {
    pub epoch: Arc<str>,
    /// The channel's last offset when read.
    pub top: u64,
    /// Publications after the asked offset, oldest first (may have holes
    /// where history was trimmed or expired).
    pub publications: Vec<Arc<Publication>>,
}

/// One thing to do, in order.
#[derive(Debug, Clone)]
pub enum Step {
    /// Hand this publication to the channel's subscribers.
    Deliver(Arc<Publication>),
    /// Subscribers missed publications up to `offset` that cannot be had:
    /// tell them (`{"channel":…,"recovered":false,…}`).
    Lost { reason: RecoveryFailure, epoch: Arc<str>, offset: u64 },
}

/// What one live publication means for a followed channel.
#[derive(Debug)]
pub enum Arrival {
    /// Already delivered (a repeat): nothing to do.
    Duplicate,
    /// The next one: the steps to take (a new epoch comes with a loss first).
    Steps(Vec<Step>),
    /// Offsets are missing before it: hold it and catch up from history.
    Gap,
}

/// A publication arrived from Redis for a channel the node follows at `position`.
pub fn arrive(position: &mut Position, publication: &Arc<Publication>) -> Arrival {
    if *publication.epoch != *position.epoch {
        // The channel's state in Redis was lost (restart, failover, expiry):
        // offsets restarted. Say so, then follow the new epoch.
        let lost = Step::Lost {
            reason: RecoveryFailure::EpochChanged,
            epoch: Arc::clone(&publication.epoch),
            offset: publication.offset - 1,
        };
        *position = Position { epoch: Arc::clone(&publication.epoch), offset: publication.offset };
        return Arrival::Steps(vec![lost, Step::Deliver(Arc::clone(publication))]);
    }
    if publication.offset <= position.offset {
        return Arrival::Duplicate;
    }
    if publication.offset > position.offset + 1 {
        return Arrival::Gap;
    }
    position.offset = publication.offset;
    Arrival::Steps(vec![Step::Deliver(Arc::clone(publication))])
}

/// Merges a catch-up with the publications held while it was under way.
/// `known` is None the first time a node follows the channel: then it only
/// learns the position (its subscribers start after it). Returns the new
/// position and the steps.
pub fn merge(known: Option<&Position>, caught_up: CaughtUp, held: Vec<Arc<Publication>>) -> (Position, Vec<Step>) {
    let CaughtUp { epoch, top, publications } = caught_up;
    let mut steps = Vec::new();
    let start = match known {
        None => top,
        // Another epoch, or the same one with offsets taken back (Redis
        // restored from an older snapshot, should its run id not tell):
        // what subscribers hold no longer lines up with Redis.
        Some(known) if *known.epoch != *epoch || top < known.offset => {
            steps.push(Step::Lost { reason: RecoveryFailure::EpochChanged, epoch: Arc::clone(&epoch), offset: top });
            top
        }
        Some(known) => known.offset,
    };
    let mut candidates: Vec<Arc<Publication>> =
        publications.into_iter().chain(held).filter(|p| *p.epoch == *epoch && p.offset > start).collect();
    candidates.sort_by_key(|p| p.offset);
    candidates.dedup_by_key(|p| p.offset);
    let mut expected = start + 1;
    for publication in candidates {
        if publication.offset > expected {
            steps.push(Step::Lost {
                reason: RecoveryFailure::HistoryTooShort,
                epoch: Arc::clone(&epoch),
                offset: publication.offset - 1,
            });
        }
        expected = publication.offset + 1;
        steps.push(Step::Deliver(publication));
    }
    if expected <= top {
        steps.push(Step::Lost { reason: RecoveryFailure::HistoryTooShort, epoch: Arc::clone(&epoch), offset: top });
        expected = top + 1;
    }
    (Position { epoch, offset: expected - 1 }, steps)
}

/// What a subscriber resuming from `(since_epoch, since)` gets, from a
/// history read made while the node was at `position` (by the gateway's
/// ordering, `caught_up.top` is then at most `position.offset`). `local`
/// holds what the node delivered after the read (its history ring).
pub fn resume(
    position: &Position,
    since_epoch: &str,
    since: u64,
    caught_up: &CaughtUp,
    local: &[Arc<Publication>],
) -> Result<Vec<Arc<Publication>>, RecoveryFailure> {
    if since_epoch != &*caught_up.epoch || *caught_up.epoch != *position.epoch {
        return Err(RecoveryFailure::EpochChanged);
    }
    if since > caught_up.top.max(position.offset) {
        return Err(RecoveryFailure::OffsetAhead);
    }
    let mut missed: Vec<Arc<Publication>> = caught_up
        .publications
        .iter()
        .chain(local)
        .filter(|p| p.offset > since && p.offset <= position.offset && *p.epoch == *position.epoch)
        .cloned()
        .collect();
    missed.sort_by_key(|p| p.offset);
    missed.dedup_by_key(|p| p.offset);
    let contiguous = missed.iter().enumerate().all(|(i, p)| p.offset == since + 1 + i as u64);
    if !contiguous || missed.len() as u64 != position.offset.saturating_sub(since) {
        return Err(RecoveryFailure::HistoryTooShort);
    }
    Ok(missed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::publication::PushFields;
    use proptest::prelude::*;

    fn publication(epoch: &str, offset: u64) -> Arc<Publication> {
        Arc::new(Publication::encode(
            "c".into(),
            epoch.into(),
            offset,
            PushFields { channel: "c", event: "m", data: b"1", user: None },
        ))
    }

    fn position(epoch: &str, offset: u64) -> Position {
        Position { epoch: epoch.into(), offset }
    }

    fn delivered(steps: &[Step]) -> Vec<u64> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Deliver(p) => Some(p.offset),
                Step::Lost { .. } => None,
            })
            .collect()
    }

    fn losses(steps: &[Step]) -> Vec<(RecoveryFailure, u64)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Lost { reason, offset, .. } => Some((*reason, *offset)),
                Step::Deliver(_) => None,
            })
            .collect()
    }

    #[test]
    fn live_arrivals() {
        let mut at = position("e", 5);
        assert!(matches!(arrive(&mut at, &publication("e", 5)), Arrival::Duplicate));
        assert!(matches!(arrive(&mut at, &publication("e", 7)), Arrival::Gap));
        let Arrival::Steps(steps) = arrive(&mut at, &publication("e", 6)) else { panic!() };
        assert_eq!(delivered(&steps), vec![6]);
        assert_eq!(at, position("e", 6));
        let Arrival::Steps(steps) = arrive(&mut at, &publication("f", 3)) else { panic!() };
        assert_eq!(losses(&steps), vec![(RecoveryFailure::EpochChanged, 2)]);
        assert_eq!(delivered(&steps), vec![3]);
        assert_eq!(at, position("f", 3));
    }

    #[test]
    fn first_catch_up_only_learns_the_position() {
        let caught_up = CaughtUp { epoch: "e".into(), top: 9, publications: vec![] };
        let (at, steps) = merge(None, caught_up, vec![publication("e", 8), publication("e", 9)]);
        assert_eq!(at, position("e", 9));
        assert!(steps.is_empty());
    }

    #[test]
    fn catch_up_fills_holes_or_says_what_was_lost() {
        let known = position("e", 3);
        let caught_up =
            CaughtUp { epoch: "e".into(), top: 7, publications: vec![publication("e", 4), publication("e", 5)] };
        let (at, steps) = merge(Some(&known), caught_up, vec![publication("e", 5), publication("e", 7)]);
        assert_eq!(delivered(&steps), vec![4, 5, 7]);
        assert_eq!(losses(&steps), vec![(RecoveryFailure::HistoryTooShort, 6)]);
        assert_eq!(at, position("e", 7));

        let caught_up = CaughtUp { epoch: "e".into(), top: 7, publications: vec![] };
        let (at, steps) = merge(Some(&known), caught_up, vec![]);
        assert_eq!(losses(&steps), vec![(RecoveryFailure::HistoryTooShort, 7)]);
        assert_eq!(at, position("e", 7));

        let caught_up = CaughtUp { epoch: "f".into(), top: 2, publications: vec![] };
        let (at, steps) = merge(Some(&known), caught_up, vec![publication("e", 4)]);
        assert_eq!(losses(&steps), vec![(RecoveryFailure::EpochChanged, 2)]);
        assert_eq!(at, position("f", 2));

        // Same epoch, offsets taken back (a restore from an older snapshot):
        // the offsets to come are not the ones subscribers have seen.
        let caught_up = CaughtUp { epoch: "e".into(), top: 1, publications: vec![] };
        let (at, steps) = merge(Some(&known), caught_up, vec![]);
        assert_eq!(losses(&steps), vec![(RecoveryFailure::EpochChanged, 1)]);
        assert_eq!(at, position("e", 1));
    }

    #[test]
    fn resume_cases() {
        let at = position("e", 10);
        let read = CaughtUp { epoch: "e".into(), top: 9, publications: (6..=9).map(|o| publication("e", o)).collect() };
        let local = vec![publication("e", 9), publication("e", 10)];
        let offsets = |r: Result<Vec<Arc<Publication>>, RecoveryFailure>| {
            r.map(|v| v.iter().map(|p| p.offset).collect::<Vec<_>>())
        };
        assert_eq!(offsets(resume(&at, "e", 5, &read, &local)), Ok(vec![6, 7, 8, 9, 10]));
        assert_eq!(offsets(resume(&at, "e", 10, &read, &local)), Ok(vec![]));
        assert_eq!(offsets(resume(&at, "e", 4, &read, &local)), Err(RecoveryFailure::HistoryTooShort));
        assert_eq!(offsets(resume(&at, "e", 11, &read, &local)), Err(RecoveryFailure::OffsetAhead));
        assert_eq!(offsets(resume(&at, "x", 5, &read, &local)), Err(RecoveryFailure::EpochChanged));
    }

    proptest! {
        /// Whatever order, repeats and losses publications arrive in, and
        /// whatever history a catch-up finds, a node delivers each offset at
        /// most once, in increasing order, and every offset it never
        /// delivers is covered by a loss it announced.
        #[test]
        fn exactly_once_or_announced(
            arrivals in proptest::collection::vec((1u64..40, proptest::bool::ANY), 1..120),
            history_from in 1u64..40,
        ) {
            let top = 40;
            let mut at = position("e", 0);
            let mut held: Vec<Arc<Publication>> = Vec::new();
            let mut seen: Vec<u64> = Vec::new();
            let mut lost_up_to = 0;
            let record = |steps: Vec<Step>, seen: &mut Vec<u64>, lost_up_to: &mut u64| {
                for step in steps {
                    match step {
                        Step::Deliver(p) => seen.push(p.offset),
                        Step::Lost { offset, .. } => *lost_up_to = (*lost_up_to).max(offset),
                    }
                }
            };
            for (offset, catch_up_now) in arrivals {
                let p = publication("e", offset);
                match arrive(&mut at, &p) {
                    Arrival::Duplicate => {}
                    Arrival::Steps(steps) => record(steps, &mut seen, &mut lost_up_to),
                    Arrival::Gap => held.push(p),
                }
                if catch_up_now && !held.is_empty() {
                    let publications = (history_from.max(at.offset + 1)..=top).map(|o| publication("e", o)).collect();
                    let caught_up = CaughtUp { epoch: "e".into(), top, publications };
                    let (next, steps) = merge(Some(&at), caught_up, std::mem::take(&mut held));
                    at = next;
                    record(steps, &mut seen, &mut lost_up_to);
                }
            }
            prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "{:?}", seen);
            for offset in 1..=at.offset {
                prop_assert!(seen.contains(&offset) || offset <= lost_up_to, "offset {} neither delivered nor announced", offset);
            }
        }
    }
}
