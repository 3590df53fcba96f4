//! A shard's local channel index: for each channel with subscribers on this
//! shard, which of its connections receive it.
//!
//! Subscribers live in a per-channel `Slab`, so a connection removes itself
//! in O(1) using the slot it was given; a fan-out walks the slab.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

/// Index of a connection in its shard's connection slab.
pub type ConnKey = u32;
/// Index of a channel in the local index.
pub type LocalChannelId = u32;

/// One subscriber of a local channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscriber {
    pub conn: ConnKey,
    /// The channel offset the subscription started after (from the owner's
    /// reply). Publications at or below it are never delivered to this
    /// subscriber: it either had them replayed or subscribed after them.
    /// This keeps delivery exactly-once even when a fan-out is spread over
    /// several ticks and the subscriber joined halfway.
    pub after_offset: u64,
    /// The subscription asked for pushes of the channel's presence counts.
    pub presence_counts: bool,
}

/// A channel as seen by one shard.
#[derive(Debug)]
pub struct LocalChannel {
    pub name: Arc<str>,
    pub subscribers: Slab<Subscriber>,
    /// Subscriptions sent to the owner and not answered yet. The entry stays
    /// while any are pending.
    pub pending: u32,
}

impl LocalChannel {
    fn is_unused(&self) -> bool {
        self.subscribers.is_empty() && self.pending == 0
    }
}

#[derive(Debug, Default)]
pub struct LocalIndex {
    ids: HashMap<Arc<str>, LocalChannelId>,
    channels: Slab<LocalChannel>,
    /// Total subscribers over all local channels (for stats).
    subscriptions: usize,
}

impl LocalIndex {
    pub fn lookup(&self, name: &str) -> Option<LocalChannelId> {
        self.ids.get(name).copied()
    }

    pub fn get(&self, id: LocalChannelId) -> Option<&LocalChannel> {
        self.channels.get(id as usize)
    }

    /// The channel's id, creating the entry. Callers must then add a pending
    /// subscription or a subscriber, or the entry is never removed.
    pub fn intern(&mut self, name: &str) -> (LocalChannelId, Arc<str>) {
        if let Some(&id) = self.ids.get(name) {
            return (id, Arc::clone(&self.channels[id as usize].name));
        }
        let name: Arc<str> = name.into();
        let id = self.channels.insert(LocalChannel { name: Arc::clone(&name), subscribers: Slab::new(), pending: 0 });
        let id = LocalChannelId::try_from(id).expect("more than 4 billion local channels");
        self.ids.insert(Arc::clone(&name), id);
        (id, name)
    }

    pub fn add_pending(&mut self, id: LocalChannelId) {
        self.channels[id as usize].pending += 1;
    }

    /// Resolves a pending subscription: the connection becomes a subscriber
    /// (`Some(after_offset)`) or the subscription failed (`None`). Returns
    /// the subscriber slot.
    pub fn resolve_pending(&mut self, id: LocalChannelId, subscriber: Option<Subscriber>) -> Option<u32> {
        let channel = self.channels.get_mut(id as usize)?;
        debug_assert!(channel.pending > 0);
        channel.pending = channel.pending.saturating_sub(1);
        let slot = subscriber.map(|s| {
            self.subscriptions += 1;
            let subscribers = &mut channel.subscribers;
            if subscribers.len() == subscribers.capacity() {
                // Grow by a quarter (at least 4 slots), not by doubling: a
                // node holds many mid-sized channels (a million connections
                // over 67 nodes put ~150 of each group channel on each), and
                // doubling leaves up to half of every one unused.
                subscribers.reserve_exact((subscribers.capacity() / 4).max(4));
            }
            subscribers.insert(s) as u32
        });
        self.remove_if_unused(id);
        slot
    }

    /// Removes a subscriber by its slot; None if it was not there.
    pub fn remove(&mut self, id: LocalChannelId, slot: u32) -> Option<Subscriber> {
        let channel = self.channels.get_mut(id as usize)?;
        let subscriber = channel.subscribers.try_remove(slot as usize)?;
        self.subscriptions -= 1;
        self.remove_if_unused(id);
        Some(subscriber)
    }

    fn remove_if_unused(&mut self, id: LocalChannelId) {
        if self.channels.get(id as usize).is_some_and(LocalChannel::is_unused) {
            let channel = self.channels.remove(id as usize);
            self.ids.remove(&channel.name);
        }
    }

    /// Number of channels with local subscribers or pending subscriptions.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_live_while_used() {
        let mut index = LocalIndex::default();
        let (id, _) = index.intern("news");
        index.add_pending(id);
        index.add_pending(id);
        let slot =
            index.resolve_pending(id, Some(Subscriber { conn: 1, after_offset: 0, presence_counts: true })).unwrap();
        assert_eq!(index.resolve_pending(id, None), None);
        assert_eq!(index.lookup("news"), Some(id));
        assert!(index.remove(id, slot).is_some_and(|s| s.presence_counts));
        assert!(index.remove(id, slot).is_none());
        assert_eq!(index.lookup("news"), None);
        assert!(index.is_empty());
    }

    proptest! {
        /// Subscribe/unsubscribe sequences leave exactly the model's
        /// subscribers, and no channel entry outlives its last subscriber.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u8..4, 0u32..8, any::<bool>()), 1..300)) {
            let mut index = LocalIndex::default();
            let mut model: std::collections::HashMap<(u8, u32), (LocalChannelId, u32)> = Default::default();
            for (channel, conn, subscribe) in ops {
                let name = format!("c{channel}");
                if subscribe && !model.contains_key(&(channel, conn)) {
                    let (id, _) = index.intern(&name);
                    index.add_pending(id);
                    let slot = index.resolve_pending(id, Some(Subscriber { conn, after_offset: 0, presence_counts: false })).unwrap();
                    model.insert((channel, conn), (id, slot));
                } else if !subscribe {
                    if let Some((id, slot)) = model.remove(&(channel, conn)) {
                        prop_assert!(index.remove(id, slot).is_some());
                    }
                }
                prop_assert_eq!(index.subscriptions(), model.len());
                for c in 0..4u8 {
                    let expected: std::collections::BTreeSet<u32> = model.keys().filter(|(ch, _)| *ch == c).map(|(_, conn)| *conn).collect();
                    match index.lookup(&format!("c{c}")) {
                        Some(id) => {
                            let actual: std::collections::BTreeSet<u32> = index.get(id).unwrap().subscribers.iter().map(|(_, s)| s.conn).collect();
                            prop_assert_eq!(actual, expected);
                        }
                        None => prop_assert!(expected.is_empty()),
                    }
                }
            }
        }
    }
}
