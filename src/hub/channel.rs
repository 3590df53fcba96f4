//! Owner-side channel state: epoch, offsets, history, which shards have
//! subscribers, presence. Lives only on the channel's owner shard.

use std::collections::HashMap;
use std::sync::Arc;

use super::history::{History, RecoveryFailure};
use super::presence::{CountsPush, Presence};
use super::publication::{Publication, PushFields};
use crate::config::Namespace;

/// One channel, as its owner knows it.
#[derive(Debug)]
pub struct OwnedChannel {
    pub name: Arc<str>,
    /// Random per incarnation of the channel: a new epoch means offsets
    /// restarted and history was lost, so old positions cannot be resumed.
    pub epoch: Arc<str>,
    /// Offset of the newest publication (0 before the first).
    pub last_offset: u64,
    /// Subscribers per shard; fan-out goes to shards with a non-zero count.
    pub subscribers_by_shard: Box<[u32]>,
    pub subscribers: u64,
    pub history: History,
    /// Members, when the namespace keeps presence.
    pub presence: Presence,
    /// Pushes of the presence counts to subscriptions that asked for them.
    pub counts_push: CountsPush,
    /// Last publish or subscription change; idle channels are dropped by the sweep.
    pub last_active_ms: u64,
}

impl OwnedChannel {
    fn new(name: Arc<str>, shard_count: usize, now_ms: u64) -> Self {
        OwnedChannel {
            name,
            epoch: new_epoch(),
            last_offset: 0,
            subscribers_by_shard: vec![0; shard_count].into_boxed_slice(),
            subscribers: 0,
            history: History::default(),
            presence: Presence::default(),
            counts_push: CountsPush::default(),
            last_active_ms: now_ms,
        }
    }

    /// (shard, subscribers there) for every shard with subscribers: where a fan-out goes.
    pub fn subscriber_targets(&self) -> Vec<(usize, u32)> {
        self.subscriber_shards().map(|s| (s, self.subscribers_by_shard[s])).collect()
    }

    /// Shards that currently hold at least one subscriber.
    pub fn subscriber_shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.subscribers_by_shard.iter().enumerate().filter(|(_, count)| **count > 0).map(|(shard, _)| shard)
    }

    /// Assigns the next offset, encodes the push once and keeps it in history.
    pub fn publish(&mut self, fields: PushFields<'_>, namespace: &Namespace, now_ms: u64) -> Arc<Publication> {
        self.last_offset += 1;
        let publication =
            Arc::new(Publication::encode(Arc::clone(&self.name), Arc::clone(&self.epoch), self.last_offset, fields));
        self.history.push(Arc::clone(&publication), now_ms, namespace.history_size, namespace.history_ttl_ms);
        self.last_active_ms = now_ms;
        publication
    }

    pub fn add_subscriber(&mut self, shard: usize, now_ms: u64) {
        self.subscribers_by_shard[shard] += 1;
        self.subscribers += 1;
        self.last_active_ms = now_ms;
    }

    pub fn remove_subscriber(&mut self, shard: usize, now_ms: u64) {
        debug_assert!(self.subscribers_by_shard[shard] > 0, "unsubscribe without subscribe");
        if self.subscribers_by_shard[shard] > 0 {
            self.subscribers_by_shard[shard] -= 1;
            self.subscribers -= 1;
        }
        self.last_active_ms = now_ms;
    }

    /// Publications after `(epoch, offset)`, or why they cannot be had.
    pub fn recover(&self, epoch: &str, offset: u64) -> Result<Vec<Arc<Publication>>, RecoveryFailure> {
        if epoch != &*self.epoch {
            return Err(RecoveryFailure::EpochChanged);
        }
        self.history.recover(offset, self.last_offset)
    }

    /// Cluster mode: takes a publication Redis numbered, keeping the ring
    /// contiguous (a hole, announced as a loss, empties it first).
    pub fn accept_remote(&mut self, publication: &Arc<Publication>, namespace: &Namespace, now_ms: u64) {
        let follows = self.history.last_offset().is_none_or(|last| last + 1 == publication.offset)
            && self.history.first_offset().is_none_or(|_| *self.epoch == *publication.epoch);
        if !follows {
            self.history.clear();
        }
        self.epoch = Arc::clone(&publication.epoch);
        self.last_offset = publication.offset;
        self.history.push(Arc::clone(publication), now_ms, namespace.history_size, namespace.history_ttl_ms);
        self.last_active_ms = now_ms;
    }

    /// Nothing references this channel any more: no subscribers, no history, no presence.
    pub fn is_idle(&self) -> bool {
        self.subscribers == 0 && self.history.is_empty() && self.presence.is_empty()
    }
}

/// A fresh random epoch: 16 hex digits.
pub fn new_epoch() -> Arc<str> {
    format!("{:016x}", crate::util::random_u64()).into()
}

/// Every channel this shard owns.
#[derive(Debug)]
pub struct OwnedChannels {
    channels: HashMap<Arc<str>, OwnedChannel>,
    shard_count: usize,
    /// This shard's share of `limits.channels_max`.
    channels_max: usize,
}

/// `channels_max` is reached; the channel does not exist and cannot be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimitReached;

impl OwnedChannels {
    pub fn new(shard_count: usize, channels_max: usize) -> Self {
        OwnedChannels { channels: HashMap::new(), shard_count, channels_max }
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&OwnedChannel> {
        self.channels.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut OwnedChannel> {
        self.channels.get_mut(name)
    }

    /// The channel, created with a new epoch if it does not exist.
    pub fn get_or_create(&mut self, name: &Arc<str>, now_ms: u64) -> Result<&mut OwnedChannel, ChannelLimitReached> {
        if !self.channels.contains_key(&**name) {
            if self.channels.len() >= self.channels_max {
                return Err(ChannelLimitReached);
            }
            self.channels.insert(Arc::clone(name), OwnedChannel::new(Arc::clone(name), self.shard_count, now_ms));
        }
        // Inserted just above when missing.
        self.channels.get_mut(&**name).ok_or(ChannelLimitReached)
    }

    /// Expires history and drops channels nobody uses. `namespace_of` gives
    /// each channel's rules. Returns how many channels were dropped.
    pub fn sweep<'a>(&mut self, now_ms: u64, namespace_of: impl Fn(&str) -> &'a Namespace) -> usize {
        let before = self.channels.len();
        self.channels.retain(|name, channel| {
            let namespace = namespace_of(name);
            channel.history.expire(now_ms, namespace.history_ttl_ms);
            !channel.is_idle()
        });
        before - self.channels.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &OwnedChannel> {
        self.channels.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut OwnedChannel> {
        self.channels.values_mut()
    }

    pub fn remove(&mut self, name: &str) -> Option<OwnedChannel> {
        self.channels.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> PushFields<'static> {
        PushFields { channel: "c", event: "m", data: b"{}", user: None }
    }

    #[test]
    fn offsets_strictly_increase_and_epoch_changes_after_idle_drop() {
        let namespace = Namespace::catch_all();
        let mut channels = OwnedChannels::new(2, 10);
        let name: Arc<str> = "c".into();
        let channel = channels.get_or_create(&name, 0).unwrap();
        let epoch = Arc::clone(&channel.epoch);
        let offsets: Vec<u64> = (0..5).map(|_| channel.publish(fields(), &namespace, 0).offset).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        assert_eq!(channel.recover(&epoch, 3).unwrap().len(), 2);
        assert_eq!(channel.recover("other", 3).unwrap_err(), RecoveryFailure::EpochChanged);

        // Still has history: kept.
        assert_eq!(channels.sweep(1_000, |_| &namespace), 0);
        // History expired, no subscribers: dropped; a new incarnation gets a new epoch.
        assert_eq!(channels.sweep(namespace.history_ttl_ms + 1, |_| &namespace), 1);
        let channel = channels.get_or_create(&name, 0).unwrap();
        assert_ne!(channel.epoch, epoch);
        assert_eq!(channel.last_offset, 0);
    }

    #[test]
    fn subscriber_counts_pick_fanout_shards() {
        let mut channels = OwnedChannels::new(3, 10);
        let channel = channels.get_or_create(&"c".into(), 0).unwrap();
        channel.add_subscriber(2, 0);
        channel.add_subscriber(2, 0);
        channel.add_subscriber(0, 0);
        assert_eq!(channel.subscriber_shards().collect::<Vec<_>>(), vec![0, 2]);
        channel.remove_subscriber(0, 0);
        assert_eq!(channel.subscriber_shards().collect::<Vec<_>>(), vec![2]);
        assert_eq!(channel.subscribers, 2);
    }

    #[test]
    fn channel_limit() {
        let mut channels = OwnedChannels::new(1, 1);
        channels.get_or_create(&"a".into(), 0).unwrap();
        assert_eq!(channels.get_or_create(&"b".into(), 0).unwrap_err(), ChannelLimitReached);
        assert!(channels.get_or_create(&"a".into(), 0).is_ok());
    }
}
