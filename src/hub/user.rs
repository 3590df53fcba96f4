//! Owner-side user state: which shards hold the user's connections, when
//! they were last seen, their inbox of messages awaiting acknowledgement,
//! and token revocation. Lives on the user's owner shard.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::publication::Publication;

/// One message waiting in a user's inbox.
#[derive(Debug, Clone)]
pub struct InboxEntry {
    pub seq: u64,
    /// Unix milliseconds, for the TTL.
    pub stored_at_ms: u64,
    pub push: Arc<Publication>,
}

/// Limits for users and inboxes (from `[users]` and `[inbox]`), this shard's share.
#[derive(Debug, Clone, Copy)]
pub struct UserLimits {
    pub inbox_messages_max: usize,
    pub inbox_ttl_ms: u64,
    /// Users with a non-empty inbox.
    pub inbox_users_max: usize,
    /// Users tracked at all; past it, offline users with nothing pending are forgotten.
    pub tracked_max: usize,
    /// Offline users with nothing pending are forgotten after this.
    pub last_seen_ttl_ms: u64,
    /// Connections of one user at once (`limits.connections_per_user_max`;
    /// 0: no limit).
    pub connections_max: usize,
}

#[derive(Debug)]
pub struct UserState {
    connections_by_shard: Box<[u32]>,
    pub connections: u32,
    /// Unix ms when the last connection closed; meaningful while offline.
    pub last_seen_ms: u64,
    /// Next inbox sequence number; strictly increasing for as long as the
    /// state exists.
    next_seq: u64,
    pub inbox: VecDeque<InboxEntry>,
    /// Tokens issued before this (Unix seconds) are refused.
    pub revoked_before_s: u64,
    /// Last connect, disconnect, send or revocation (Unix ms): the state is
    /// forgotten `last_seen_ttl_ms` after it once nothing is pending.
    touched_ms: u64,
}

/// Where a user's inbox numbering starts: the clock in microsecond-sized
/// steps, so numbers keep increasing when the state is recreated (a server
/// restart, an offline user forgotten and seen again). Starting at 1 again
/// would make a client that remembers "acknowledged up to 57" drop and ack
/// the first 57 new messages. Stays below 2^53 (exact in JavaScript) until
/// the year 2255; a user would need more than 1,000 messages a millisecond
/// over its whole life to overtake a later start.
pub fn first_inbox_seq(unix_ms: u64) -> u64 {
    const SEQS_PER_MS: u64 = 1_000;
    unix_ms.saturating_mul(SEQS_PER_MS).max(1)
}

impl UserState {
    fn new(shard_count: usize, first_seq: u64) -> UserState {
        UserState {
            connections_by_shard: vec![0; shard_count].into_boxed_slice(),
            connections: 0,
            last_seen_ms: 0,
            next_seq: first_seq,
            inbox: VecDeque::new(),
            revoked_before_s: 0,
            touched_ms: 0,
        }
    }

    /// Shards with at least one of the user's connections.
    pub fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.connections_by_shard.iter().enumerate().filter(|(_, n)| **n > 0).map(|(shard, _)| shard)
    }

    /// Drops expired inbox messages; true if that emptied the inbox.
    fn expire_inbox(&mut self, now_ms: u64, ttl_ms: u64) -> bool {
        let had = !self.inbox.is_empty();
        while self.inbox.front().is_some_and(|e| now_ms.saturating_sub(e.stored_at_ms) >= ttl_ms) {
            self.inbox.pop_front();
        }
        had && self.inbox.is_empty()
    }

    fn is_forgettable(&self) -> bool {
        self.connections == 0 && self.inbox.is_empty() && self.revoked_before_s == 0
    }
}

/// What a user's status query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Online {
        connections: u32,
    },
    /// Offline since this Unix time (ms).
    Offline {
        last_seen_ms: u64,
    },
    /// Never seen, or forgotten.
    Unknown,
}

/// What `send` did for one user.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    /// Live connections the message goes to.
    pub delivered: u32,
    /// Inbox sequence when stored.
    pub stored: Option<u64>,
    /// The inbox (or the server's inbox user limit) was full: not stored.
    pub inbox_full: bool,
    /// Shards to deliver to.
    pub shards: Vec<usize>,
}

/// Why a connection was refused at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its token was issued before the user's revocation time.
    Revoked,
    /// The user has `connections_max` connections already.
    TooManyConnections,
}

/// Users this shard owns.
#[derive(Debug)]
pub struct OwnedUsers {
    users: HashMap<Arc<str>, UserState>,
    shard_count: usize,
    limits: UserLimits,
    /// Users whose inbox is not empty.
    inbox_users: usize,
    /// The highest inbox sequence handed out here: a user's state created
    /// again (after being forgotten) numbers on above it, even within the
    /// same millisecond.
    highest_seq: u64,
}

impl OwnedUsers {
    pub fn new(shard_count: usize, limits: UserLimits) -> OwnedUsers {
        OwnedUsers { users: HashMap::new(), shard_count, limits, inbox_users: 0, highest_seq: 0 }
    }

    /// Messages waiting in inboxes (a pass over the users: for metrics).
    pub fn inbox_messages(&self) -> usize {
        self.users.values().map(|state| state.inbox.len()).sum()
    }

    pub fn limits(&self) -> UserLimits {
        self.limits
    }

    /// Users with connections here, with their counts (cluster mode
    /// registers them again after a reset).
    pub fn connected(&self) -> impl Iterator<Item = (&Arc<str>, u32)> + '_ {
        self.users.iter().filter(|(_, state)| state.connections > 0).map(|(user, state)| (user, state.connections))
    }

    /// Users with at least one connection.
    pub fn online(&self) -> usize {
        self.users.values().filter(|u| u.connections > 0).count()
    }

    pub fn tracked(&self) -> usize {
        self.users.len()
    }

    fn entry(&mut self, user: &Arc<str>) -> &mut UserState {
        if !self.users.contains_key(&**user) {
            self.make_room();
            let first_seq = first_inbox_seq(crate::util::unix_time_ms()).max(self.highest_seq + 1);
            self.users.insert(Arc::clone(user), UserState::new(self.shard_count, first_seq));
        }
        self.users.get_mut(&**user).expect("inserted above")
    }

    /// Keeps the map within `tracked_max` by forgetting offline users with
    /// nothing pending. Online users are bounded by the connection cap.
    fn make_room(&mut self) {
        if self.users.len() < self.limits.tracked_max {
            return;
        }
        let victim = self.users.iter().find(|(_, state)| state.is_forgettable()).map(|(user, _)| Arc::clone(user));
        if let Some(victim) = victim {
            self.users.remove(&victim);
        }
    }

    /// Registers a connection of `user` on `shard`. Returns whether the user
    /// just came online and the inbox to replay, or why not: the token was
    /// issued before the user's revocation time, or the user has its
    /// maximum of connections.
    pub fn connect(
        &mut self,
        user: &Arc<str>,
        shard: usize,
        issued_at_s: u64,
        now_ms: u64,
    ) -> Result<(bool, Vec<Arc<Publication>>), Refused> {
        let UserLimits { inbox_ttl_ms: ttl_ms, connections_max, .. } = self.limits;
        let state = self.entry(user);
        state.touched_ms = now_ms;
        if issued_at_s < state.revoked_before_s {
            return Err(Refused::Revoked);
        }
        if connections_max > 0 && state.connections as usize >= connections_max {
            return Err(Refused::TooManyConnections);
        }
        state.connections_by_shard[shard] += 1;
        state.connections += 1;
        let came_online = state.connections == 1;
        let emptied = state.expire_inbox(now_ms, ttl_ms);
        let inbox = state.inbox.iter().map(|e| Arc::clone(&e.push)).collect();
        if emptied {
            self.inbox_users -= 1;
        }
        Ok((came_online, inbox))
    }

    /// One connection of `user` on `shard` closed. Returns true when that was
    /// the user's last connection (now offline).
    pub fn disconnect(&mut self, user: &str, shard: usize, now_ms: u64) -> bool {
        let Some(state) = self.users.get_mut(user) else {
            debug_assert!(false, "disconnect of an unknown user");
            return false;
        };
        if state.connections_by_shard[shard] == 0 {
            debug_assert!(false, "disconnect without connect");
            return false;
        }
        state.connections_by_shard[shard] -= 1;
        state.connections -= 1;
        state.touched_ms = now_ms;
        if state.connections == 0 {
            state.last_seen_ms = now_ms;
            return true;
        }
        false
    }

    /// A message for `user`: stored in the inbox unless it is full, and to be
    /// delivered to every live connection. `encode(seq)` builds the push
    /// (with its inbox sequence when stored).
    pub fn send(
        &mut self,
        user: &Arc<str>,
        now_ms: u64,
        encode: impl FnOnce(Option<u64>) -> Arc<Publication>,
    ) -> (SendOutcome, Arc<Publication>) {
        let limits = self.limits;
        let inbox_users_full = self.inbox_users >= limits.inbox_users_max;
        let state = self.entry(user);
        state.touched_ms = now_ms;
        let emptied = state.expire_inbox(now_ms, limits.inbox_ttl_ms);
        let starts_inbox = state.inbox.is_empty();
        let inbox_users_full = inbox_users_full && !emptied;
        let full = limits.inbox_messages_max == 0
            || state.inbox.len() >= limits.inbox_messages_max
            || (starts_inbox && inbox_users_full);
        let seq = (!full).then(|| {
            let seq = state.next_seq;
            state.next_seq += 1;
            seq
        });
        let push = encode(seq);
        if let Some(seq) = seq {
            state.inbox.push_back(InboxEntry { seq, stored_at_ms: now_ms, push: Arc::clone(&push) });
        }
        let outcome = SendOutcome {
            delivered: state.connections,
            stored: seq,
            inbox_full: full && limits.inbox_messages_max > 0,
            shards: state.shards().collect(),
        };
        match (emptied, seq.is_some() && starts_inbox) {
            (true, false) => self.inbox_users -= 1,
            (false, true) => self.inbox_users += 1,
            _ => {}
        }
        self.highest_seq = self.highest_seq.max(seq.unwrap_or(0));
        (outcome, push)
    }

    /// Drops inbox messages up to and including `seq`.
    pub fn ack(&mut self, user: &str, seq: u64) {
        let Some(state) = self.users.get_mut(user) else { return };
        let had = !state.inbox.is_empty();
        while state.inbox.front().is_some_and(|e| e.seq <= seq) {
            state.inbox.pop_front();
        }
        if had && state.inbox.is_empty() {
            self.inbox_users -= 1;
        }
    }

    pub fn status(&self, user: &str) -> Status {
        match self.users.get(user) {
            Some(state) if state.connections > 0 => Status::Online { connections: state.connections },
            Some(state) if state.last_seen_ms > 0 => Status::Offline { last_seen_ms: state.last_seen_ms },
            _ => Status::Unknown,
        }
    }

    /// Refuses tokens issued before `before_s` from now on; returns the
    /// shards holding the user's connections (to close them).
    pub fn revoke(&mut self, user: &Arc<str>, before_s: u64, now_ms: u64) -> (u32, Vec<usize>) {
        let state = self.entry(user);
        state.touched_ms = now_ms;
        state.revoked_before_s = state.revoked_before_s.max(before_s);
        (state.connections, state.shards().collect())
    }

    /// The user's connection count and shards, if known.
    pub fn connections(&self, user: &str) -> (u32, Vec<usize>) {
        self.users.get(user).map_or((0, Vec::new()), |state| (state.connections, state.shards().collect()))
    }

    /// Expires inbox messages and forgets users untouched for
    /// `last_seen_ttl_ms` with no connection and an empty inbox (their
    /// revocation too: by then tokens that old should have expired).
    pub fn sweep(&mut self, now_ms: u64) {
        let limits = self.limits;
        let mut emptied = 0;
        self.users.retain(|_, state| {
            if state.expire_inbox(now_ms, limits.inbox_ttl_ms) {
                emptied += 1;
            }
            let long_gone =
                state.connections == 0 && now_ms.saturating_sub(state.touched_ms) >= limits.last_seen_ttl_ms;
            if long_gone && state.inbox.is_empty() {
                return false;
            }
            true
        });
        self.inbox_users -= emptied;
    }

    /// Users with a non-empty inbox (checked against `inbox_users_max`).
    pub fn inbox_users(&self) -> usize {
        self.inbox_users
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::publication::PushFields;
    use proptest::prelude::*;

    fn limits() -> UserLimits {
        UserLimits {
            inbox_messages_max: 3,
            inbox_ttl_ms: 1_000,
            inbox_users_max: 2,
            tracked_max: 100,
            last_seen_ttl_ms: 10_000,
            connections_max: 0,
        }
    }

    fn push(seq: Option<u64>) -> Arc<Publication> {
        Arc::new(Publication::encode(
            "".into(),
            "".into(),
            seq.unwrap_or(0),
            PushFields { channel: "", event: "m", data: b"1", user: None },
        ))
    }

    #[test]
    fn online_offline_and_last_seen() {
        let mut users = OwnedUsers::new(2, limits());
        let alice: Arc<str> = "alice".into();
        assert_eq!(users.status("alice"), Status::Unknown);
        assert!(users.connect(&alice, 0, 0, 100).unwrap().0);
        assert!(!users.connect(&alice, 1, 0, 100).unwrap().0);
        assert_eq!(users.status("alice"), Status::Online { connections: 2 });
        assert!(!users.disconnect("alice", 0, 200));
        assert!(users.disconnect("alice", 1, 300));
        assert_eq!(users.status("alice"), Status::Offline { last_seen_ms: 300 });
    }

    #[test]
    fn inbox_is_bounded_ordered_acked_and_expires() {
        let mut users = OwnedUsers::new(1, limits());
        let bob: Arc<str> = "bob".into();
        let seqs: Vec<Option<u64>> = (0..4).map(|_| users.send(&bob, 0, push).0.stored).collect();
        let first = seqs[0].expect("stored");
        assert_eq!(seqs, vec![Some(first), Some(first + 1), Some(first + 2), None]);
        let (outcome, _) = users.send(&bob, 0, push);
        assert!(outcome.inbox_full && outcome.stored.is_none());
        users.ack("bob", first + 1);
        let (_, inbox) = users.connect(&bob, 0, 0, 10).unwrap();
        assert_eq!(inbox.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![first + 2]);
        // Expired by the time the next connection registers.
        let (_, inbox) = users.connect(&bob, 0, 0, 2_000).unwrap();
        assert!(inbox.is_empty());
    }

    #[test]
    fn inbox_user_limit_is_reported_as_full() {
        let mut users = OwnedUsers::new(1, limits());
        let stored: Vec<u64> =
            ["a", "b"].iter().map(|user| users.send(&(*user).into(), 0, push).0.stored.unwrap()).collect();
        let (outcome, _) = users.send(&"c".into(), 0, push);
        assert!(outcome.inbox_full);
        users.ack("a", stored[0]);
        assert!(users.send(&"c".into(), 0, push).0.stored.is_some());
    }

    /// A user forgotten and seen again numbers on above everything before,
    /// so a client that remembers its last acknowledged number loses nothing.
    #[test]
    fn inbox_numbers_keep_increasing_when_a_user_is_forgotten() {
        let mut users = OwnedUsers::new(1, UserLimits { tracked_max: 1, ..limits() });
        let dan: Arc<str> = "dan".into();
        let before = users.send(&dan, 0, push).0.stored.unwrap();
        users.ack("dan", before);
        // Another user takes dan's place (tracked_max = 1, dan has nothing pending).
        users.send(&"eve".into(), 0, push);
        assert_eq!(users.status("dan"), Status::Unknown, "dan was forgotten");
        let after = users.send(&dan, 0, push).0.stored.unwrap();
        assert!(after > before, "{after} after {before}");
        assert!(after < 1 << 53, "exact in JavaScript");
    }

    #[test]
    fn revocation_refuses_older_tokens() {
        let mut users = OwnedUsers::new(1, limits());
        let carol: Arc<str> = "carol".into();
        users.connect(&carol, 0, 50, 0).unwrap();
        assert_eq!(users.revoke(&carol, 100, 0), (1, vec![0]));
        users.sweep(5_000);
        assert_eq!(users.connect(&carol, 0, 99, 0).unwrap_err(), Refused::Revoked);
        assert!(users.connect(&carol, 0, 100, 0).is_ok());
    }

    #[test]
    fn connections_per_user_are_capped_over_all_shards() {
        let mut users = OwnedUsers::new(2, UserLimits { connections_max: 2, ..limits() });
        let erin: Arc<str> = "erin".into();
        users.connect(&erin, 0, 0, 0).unwrap();
        users.connect(&erin, 1, 0, 0).unwrap();
        assert_eq!(users.connect(&erin, 0, 0, 0).unwrap_err(), Refused::TooManyConnections);
        assert_eq!(users.status("erin"), Status::Online { connections: 2 }, "the refused one is not counted");
        assert!(users.connect(&"frank".into(), 0, 0, 0).is_ok(), "others are not affected");
        users.disconnect("erin", 1, 0);
        assert!(users.connect(&erin, 1, 0, 0).is_ok(), "room again after a close");
    }

    #[test]
    fn forgotten_after_last_seen_ttl() {
        let mut users = OwnedUsers::new(1, limits());
        let dave: Arc<str> = "dave".into();
        users.connect(&dave, 0, 0, 0).unwrap();
        users.disconnect("dave", 0, 1_000);
        users.sweep(5_000);
        assert_eq!(users.status("dave"), Status::Offline { last_seen_ms: 1_000 });
        users.sweep(11_000);
        assert_eq!(users.status("dave"), Status::Unknown);
    }

    proptest! {
        /// Whatever the interleaving of sends, acks, connects and time, an
        /// inbox never exceeds its bound, replays in increasing sequence, and
        /// never replays an acked or expired message.
        #[test]
        fn inbox_bounds(ops in proptest::collection::vec((0u8..4, 0u64..50), 1..200)) {
            let mut users = OwnedUsers::new(1, limits());
            let user: Arc<str> = "u".into();
            let mut now = 0;
            let mut acked = 0;
            let mut last_stored = 0;
            let mut stored_at: HashMap<u64, u64> = HashMap::new();
            for (op, value) in ops {
                now += value * 10;
                match op {
                    0 => {
                        let (outcome, _) = users.send(&user, now, push);
                        if let Some(seq) = outcome.stored {
                            stored_at.insert(seq, now);
                            last_stored = seq;
                        }
                    }
                    1 => {
                        // An ack covers what was issued; later messages stay.
                        acked = acked.max(value.min(last_stored));
                        users.ack("u", value);
                    }
                    2 => {
                        let (_, inbox) = users.connect(&user, 0, 0, now).unwrap();
                        users.disconnect("u", 0, now);
                        prop_assert!(inbox.len() <= limits().inbox_messages_max);
                        let seqs: Vec<u64> = inbox.iter().map(|p| p.offset).collect();
                        prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
                        for seq in seqs {
                            prop_assert!(seq > acked);
                            prop_assert!(now - stored_at[&seq] < limits().inbox_ttl_ms);
                        }
                    }
                    _ => users.sweep(now),
                }
                prop_assert!(users.inbox_users() <= 1);
            }
        }
    }
}
