//! Channel presence: which users are subscribed, with how many connections,
//! plus a count of anonymous connections. Kept by the channel's owner, for
//! namespaces with `presence = true`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// Members of one channel. A `BTreeMap` so listings page by user id with a
/// stable cursor even while members come and go.
#[derive(Debug, Default)]
pub struct Presence {
    members: BTreeMap<Arc<str>, u32>,
    anonymous_connections: u64,
    connections: u64,
}

/// One page of members: (user, connections) pairs and the next cursor.
pub type MembersPage = (Vec<(Arc<str>, u32)>, Option<Arc<str>>);

/// Counts for `presence_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceStats {
    pub users: u64,
    pub connections: u64,
    pub anonymous_connections: u64,
}

impl Presence {
    /// Records one more connection of `user` (None = anonymous). Returns true
    /// when this is the user's first connection here (a join event).
    pub fn join(&mut self, user: Option<&Arc<str>>) -> bool {
        self.connections += 1;
        match user {
            None => {
                self.anonymous_connections += 1;
                false
            }
            Some(user) => {
                let count = self.members.entry(Arc::clone(user)).or_insert(0);
                *count += 1;
                *count == 1
            }
        }
    }

    /// Records one connection of `user` leaving. Returns true when it was
    /// the user's last connection here (a leave event).
    pub fn leave(&mut self, user: Option<&Arc<str>>) -> bool {
        match user {
            None => {
                debug_assert!(self.anonymous_connections > 0);
                if self.anonymous_connections == 0 {
                    return false;
                }
                self.anonymous_connections -= 1;
                self.connections -= 1;
                false
            }
            Some(user) => match self.members.get_mut(&**user) {
                Some(count) => {
                    self.connections -= 1;
                    *count -= 1;
                    if *count == 0 {
                        self.members.remove(&**user);
                        true
                    } else {
                        false
                    }
                }
                None => {
                    debug_assert!(false, "leave without join");
                    false
                }
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.connections == 0
    }

    pub fn stats(&self) -> PresenceStats {
        PresenceStats {
            users: self.members.len() as u64,
            connections: self.connections,
            anonymous_connections: self.anonymous_connections,
        }
    }

    /// Up to `limit` members after `cursor` (exclusive), in user-id order,
    /// and the cursor for the next page (None when this was the last page).
    pub fn page(&self, cursor: Option<&str>, limit: usize) -> MembersPage {
        let lower = match cursor {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let mut items: Vec<(Arc<str>, u32)> = self
            .members
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit + 1)
            .map(|(user, count)| (Arc::clone(user), *count))
            .collect();
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(user, _)| Arc::clone(user))
        } else {
            None
        };
        (items, next)
    }
}

/// Pushes of a channel's presence counts to the subscriptions that asked
/// for them (`"presence_counts": true`): after a change, at once if the
/// last push is an interval old, else one push when the interval is over
/// (carrying the counts of then), so a busy channel costs one push per
/// interval however often members come and go.
#[derive(Debug, Default)]
pub struct CountsPush {
    /// Subscriptions that asked for the counts.
    pub watchers: u32,
    last_push_ms: Option<u64>,
    /// A push waits for the interval to end.
    scheduled: bool,
}

/// What to do about the counts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountsNow {
    Push,
    /// Nothing yet: call `due` once `due_at_ms` has come.
    Scheduled,
    Nothing,
}

impl CountsPush {
    /// The counts changed at `now_ms`.
    pub fn changed(&mut self, now_ms: u64, interval_ms: u64) -> CountsNow {
        if self.watchers == 0 || self.scheduled {
            return CountsNow::Nothing;
        }
        if self.last_push_ms.is_none_or(|last| now_ms >= last + interval_ms) {
            self.last_push_ms = Some(now_ms);
            return CountsNow::Push;
        }
        self.scheduled = true;
        CountsNow::Scheduled
    }

    /// When a scheduled push is due (None: none is scheduled).
    pub fn due_at_ms(&self, interval_ms: u64) -> Option<u64> {
        self.scheduled.then(|| self.last_push_ms.map_or(0, |last| last + interval_ms))
    }

    /// A scheduled push whose time has come: `Push` (or `Nothing` when
    /// nobody watches any more), or still `Scheduled`.
    pub fn due(&mut self, now_ms: u64, interval_ms: u64) -> CountsNow {
        match self.due_at_ms(interval_ms) {
            None => CountsNow::Nothing,
            Some(due_ms) if now_ms < due_ms => CountsNow::Scheduled,
            Some(_) => {
                self.scheduled = false;
                if self.watchers == 0 {
                    return CountsNow::Nothing;
                }
                self.last_push_ms = Some(now_ms);
                CountsNow::Push
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn join_and_leave_events_only_on_first_and_last() {
        let mut presence = Presence::default();
        let alice: Arc<str> = "alice".into();
        assert!(presence.join(Some(&alice)));
        assert!(!presence.join(Some(&alice)));
        assert!(!presence.join(None));
        assert_eq!(presence.stats(), PresenceStats { users: 1, connections: 3, anonymous_connections: 1 });
        assert!(!presence.leave(Some(&alice)));
        assert!(presence.leave(Some(&alice)));
        assert!(!presence.leave(None));
        assert!(presence.is_empty());
    }

    #[test]
    fn pages_walk_all_members_once() {
        let mut presence = Presence::default();
        for i in 0..25 {
            presence.join(Some(&format!("u{i:02}").into()));
        }
        let mut seen = Vec::new();
        let mut cursor: Option<Arc<str>> = None;
        loop {
            let (items, next) = presence.page(cursor.as_deref(), 10);
            seen.extend(items.into_iter().map(|(u, _)| u.to_string()));
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn counts_are_pushed_at_most_once_per_interval() {
        let mut counts = CountsPush::default();
        assert_eq!(counts.changed(0, 1_000), CountsNow::Nothing, "nobody watches");
        counts.watchers = 1;
        assert_eq!(counts.changed(0, 1_000), CountsNow::Push);
        assert_eq!(counts.changed(100, 1_000), CountsNow::Scheduled);
        assert_eq!(counts.changed(200, 1_000), CountsNow::Nothing, "already scheduled");
        assert_eq!(counts.due_at_ms(1_000), Some(1_000));
        assert_eq!(counts.due(999, 1_000), CountsNow::Scheduled);
        assert_eq!(counts.due(1_050, 1_000), CountsNow::Push);
        assert_eq!(counts.due(1_060, 1_000), CountsNow::Nothing, "done");
        assert_eq!(counts.changed(1_500, 1_000), CountsNow::Scheduled);
        counts.watchers = 0;
        assert_eq!(counts.due(2_050, 1_000), CountsNow::Nothing, "the last watcher left");
        counts.watchers = 1;
        assert_eq!(counts.changed(9_000, 1_000), CountsNow::Push, "quiet for an interval: at once");
    }

    proptest! {
        /// Counts always equal a straightforward model after any sequence of
        /// joins and leaves of existing connections.
        #[test]
        fn counts_match_model(ops in proptest::collection::vec((0u8..6, any::<bool>()), 1..300)) {
            let mut presence = Presence::default();
            let mut model: HashMap<Option<u8>, u32> = HashMap::new();
            for (user, join) in ops {
                let key = if user == 0 { None } else { Some(user) };
                let name: Option<Arc<str>> = key.map(|u| format!("u{u}").into());
                if join {
                    let first = presence.join(name.as_ref());
                    let count = model.entry(key).or_insert(0);
                    *count += 1;
                    prop_assert_eq!(first, key.is_some() && *count == 1);
                } else if model.get(&key).copied().unwrap_or(0) > 0 {
                    let last = presence.leave(name.as_ref());
                    let count = model.get_mut(&key).unwrap();
                    *count -= 1;
                    prop_assert_eq!(last, key.is_some() && *count == 0);
                }
                let stats = presence.stats();
                let users = model.iter().filter(|(k, c)| k.is_some() && **c > 0).count() as u64;
                let connections: u64 = model.values().map(|c| u64::from(*c)).sum();
                prop_assert_eq!(stats.users, users);
                prop_assert_eq!(stats.connections, connections);
                prop_assert_eq!(stats.anonymous_connections, u64::from(model.get(&None).copied().unwrap_or(0)));
            }
        }
    }
}
