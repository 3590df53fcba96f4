//! Limits the whole process keeps, whichever shard a peer lands on:
//! connections and handshakes per client address, publications per user.
//!
//! Shards touch it on accept, close, upgrade and client publication only,
//! never per message, through 64 independently locked stripes (an address
//! or user always hashes to the same one), so two shards rarely meet on a
//! lock and never hold one for more than a map lookup. Entries exist only
//! while they matter: an address while it has connections or an unrefilled
//! handshake bucket, a user while its publication bucket is not full; the
//! shards' sweeps drop the idle ones (`prune`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::hub::owner_of;
use crate::limits::{Bucket, IpNetwork, Limits, Rate};

/// Independently locked parts of the tables.
const STRIPES: usize = 64;

/// A client address as the limits see it: an IPv4 address, or the /64 an
/// IPv6 address is in (one subscriber's network: a host gets a whole /64).
/// In 8 bytes, never zero (so an `Option` of it is 8 bytes too, kept with
/// every socket): IPv4 is `0xFFFF_FFFF << 32 | address` and the IPv6 /64
/// `::/64` is `0xFF00 << 48`, both inside ff00::/8 (multicast), which is
/// never a TCP peer's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(NonZeroU64);

/// The key of `::/64`.
const IPV6_ZERO_NETWORK: NonZeroU64 = NonZeroU64::new(0xFF00 << 48).expect("not zero");

impl AddressKey {
    pub fn of(address: IpAddr) -> AddressKey {
        let bits = match address {
            IpAddr::V4(v4) => 0xFFFF_FFFF_0000_0000 | u64::from(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A dual-stack listener sees IPv4 clients like this.
                Some(v4) => return AddressKey::of(IpAddr::V4(v4)),
                None => (u128::from(v6) >> 64) as u64,
            },
        };
        AddressKey(NonZeroU64::new(bits).unwrap_or(IPV6_ZERO_NETWORK))
    }

    fn stripe(self) -> usize {
        (self.0.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - STRIPES.trailing_zeros())) as usize
    }
}

#[derive(Debug)]
struct AddressState {
    connections: u32,
    handshakes: Bucket,
}

#[derive(Debug, Default)]
struct Stripe {
    addresses: HashMap<AddressKey, AddressState>,
    users: HashMap<Arc<str>, Bucket>,
}

/// The process-wide limit tables (one, in `bus::Shared`).
#[derive(Debug)]
pub struct Limiter {
    /// Times are milliseconds since this, the same for every shard.
    epoch: Instant,
    stripes: Box<[Mutex<Stripe>]>,
    exempt: Vec<IpNetwork>,
    connections_per_address_max: usize,
    handshakes: Rate,
    user_publications: Rate,
}

impl Limiter {
    /// From validated limits (an exempt network that does not parse is skipped).
    pub fn new(limits: &Limits) -> Limiter {
        Limiter {
            epoch: Instant::now(),
            stripes: (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect(),
            exempt: limits.ip_limits_exempt.iter().filter_map(|n| IpNetwork::parse(n).ok()).collect(),
            connections_per_address_max: limits.connections_per_ip_max,
            handshakes: limits.handshakes_per_ip(),
            user_publications: limits.user_publications(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stripe(&self, index: usize) -> MutexGuard<'_, Stripe> {
        // A panic elsewhere while holding the lock leaves counts that are
        // still counts: keep going.
        self.stripes[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether any per-address limit is on (else a peer's address is not
    /// even looked up).
    pub fn limits_addresses(&self) -> bool {
        self.connections_per_address_max > 0 || self.handshakes.per_s > 0
    }

    /// The key the per-address limits use for `address`; None when it is
    /// exempt (`limits.ip_limits_exempt`) or no per-address limit is on.
    pub fn key(&self, address: IpAddr) -> Option<AddressKey> {
        let exempt = self.exempt.iter().any(|network| network.contains(address));
        (self.limits_addresses() && !exempt).then(|| AddressKey::of(address))
    }

    /// Counts a new connection from `key`; false (nothing counted) when the
    /// address already has `limits.connections_per_ip_max`.
    pub fn open(&self, key: AddressKey, now_ms: u64) -> bool {
        let mut stripe = self.stripe(key.stripe());
        let handshakes = self.handshakes;
        let state = stripe
            .addresses
            .entry(key)
            .or_insert_with(|| AddressState { connections: 0, handshakes: Bucket::full(handshakes, now_ms) });
        let max = self.connections_per_address_max;
        if max > 0 && state.connections as usize >= max {
            return false;
        }
        state.connections += 1;
        true
    }

    /// A connection from `key` closed (or moved on without being opened).
    pub fn close(&self, key: AddressKey, now_ms: u64) {
        let mut stripe = self.stripe(key.stripe());
        let Some(state) = stripe.addresses.get_mut(&key) else {
            debug_assert!(false, "closing a connection that was never opened");
            return;
        };
        state.connections = state.connections.saturating_sub(1);
        if state.connections == 0 && state.handshakes.is_full(self.handshakes, now_ms) {
            stripe.addresses.remove(&key);
        }
    }

    /// Takes a handshake token of `key` (an address with an open connection);
    /// false when it has used up `limits.handshakes_per_ip_burst`.
    pub fn handshake(&self, key: AddressKey, now_ms: u64) -> bool {
        let mut stripe = self.stripe(key.stripe());
        let handshakes = self.handshakes;
        match stripe.addresses.get_mut(&key) {
            Some(state) => state.handshakes.take(handshakes, now_ms),
            None => {
                debug_assert!(false, "a handshake from an address without connections");
                true
            }
        }
    }

    /// Takes a publication token of `user`; false past
    /// `limits.user_publications_per_s`.
    pub fn user_publication(&self, user: &Arc<str>, now_ms: u64) -> bool {
        let rate = self.user_publications;
        if rate.per_s == 0 {
            return true;
        }
        let mut stripe = self.stripe(owner_of(user, STRIPES));
        if let Some(bucket) = stripe.users.get_mut(&**user) {
            return bucket.take(rate, now_ms);
        }
        let mut bucket = Bucket::full(rate, now_ms);
        let taken = bucket.take(rate, now_ms);
        stripe.users.insert(Arc::clone(user), bucket);
        taken
    }

    /// Drops entries that hold nothing any more (no connections, full
    /// buckets) from stripes `part`, `part + parts`, ...: each shard's sweep
    /// prunes its own share.
    pub fn prune(&self, part: usize, parts: usize, now_ms: u64) {
        let (handshakes, publications) = (self.handshakes, self.user_publications);
        for index in (part..STRIPES).step_by(parts.max(1)) {
            let mut stripe = self.stripe(index);
            stripe.addresses.retain(|_, state| state.connections > 0 || !state.handshakes.is_full(handshakes, now_ms));
            stripe.users.retain(|_, bucket| !bucket.is_full(publications, now_ms));
        }
    }

    /// Addresses and users with an entry (for tests: the tables stay bounded).
    pub fn entries(&self) -> (usize, usize) {
        (0..STRIPES)
            .map(|index| self.stripe(index))
            .fold((0, 0), |(addresses, users), stripe| (addresses + stripe.addresses.len(), users + stripe.users.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(edit: impl FnOnce(&mut Limits)) -> Limiter {
        let mut limits = Limits { connections_per_ip_max: 2, handshakes_per_ip_per_s: 10, ..Limits::default() };
        limits.handshakes_per_ip_burst = 2;
        limits.user_publications_per_s = 1;
        limits.user_publications_burst = 2;
        edit(&mut limits);
        Limiter::new(&limits)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(AddressKey::of(ip("2001:db8:1:2::1")), AddressKey::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(AddressKey::of(ip("2001:db8:1:2::1")), AddressKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(AddressKey::of(ip("::ffff:10.0.0.1")), AddressKey::of(ip("10.0.0.1")));
        assert_ne!(AddressKey::of(ip("10.0.0.1")), AddressKey::of(ip("10.0.0.2")));
        assert_ne!(AddressKey::of(ip("::1")), AddressKey::of(ip("0.0.0.1")));
        assert_ne!(AddressKey::of(ip("::1")), AddressKey::of(ip("0.0.0.0")));
        assert_eq!(AddressKey::of(ip("::1")), AddressKey::of(ip("::2")));
        assert_eq!(std::mem::size_of::<Option<AddressKey>>(), 8);
    }

    #[test]
    fn connections_per_address_are_capped_and_entries_go_at_zero() {
        let limiter = limiter(|_| {});
        assert_eq!(limiter.key(ip("127.0.0.1")), None, "loopback is exempt by default");
        let a = limiter.key(ip("10.0.0.1")).unwrap();
        let b = limiter.key(ip("10.0.0.2")).unwrap();
        assert!(limiter.open(a, 0) && limiter.open(a, 0));
        assert!(!limiter.open(a, 0), "the third from one address");
        assert!(limiter.open(b, 0), "other addresses are not affected");
        limiter.close(a, 0);
        assert!(limiter.open(a, 0), "room again after a close");
        for key in [a, a, b] {
            limiter.close(key, 0);
        }
        assert_eq!(limiter.entries(), (0, 0), "nothing kept for addresses without connections");
    }

    #[test]
    fn handshakes_per_address_keep_their_bucket_across_reconnects() {
        let limiter = limiter(|_| {});
        let a = limiter.key(ip("2001:db8::1")).unwrap();
        for _ in 0..2 {
            assert!(limiter.open(a, 0));
            assert!(limiter.handshake(a, 0));
            limiter.close(a, 0);
        }
        assert_eq!(limiter.entries().0, 1, "an unrefilled bucket outlives the connections");
        assert!(limiter.open(a, 0));
        assert!(!limiter.handshake(a, 0), "a reconnecting client does not get a fresh burst");
        assert!(limiter.handshake(a, 100), "10 per second");
        limiter.close(a, 100);
        limiter.prune(0, 1, 150);
        assert_eq!(limiter.entries().0, 1);
        limiter.prune(0, 1, 300);
        assert_eq!(limiter.entries().0, 0, "pruned once refilled");
    }

    #[test]
    fn user_publications_are_shared_by_the_user_and_pruned_when_idle() {
        let limiter = limiter(|_| {});
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        assert!(limiter.user_publication(&alice, 0) && limiter.user_publication(&alice, 0));
        assert!(!limiter.user_publication(&alice, 0));
        assert!(limiter.user_publication(&bob, 0));
        assert!(limiter.user_publication(&alice, 1_000));
        limiter.prune(0, 1, 1_000);
        assert_eq!(limiter.entries().1, 1, "bob's bucket is full again: forgotten; alice's is not");
        limiter.prune(0, 1, 5_000);
        assert_eq!(limiter.entries().1, 0);
    }

    #[test]
    fn no_limit_means_no_entries() {
        let limiter = limiter(|limits| {
            limits.connections_per_ip_max = 0;
            limits.handshakes_per_ip_per_s = 0;
            limits.user_publications_per_s = 0;
        });
        assert_eq!(limiter.key(ip("10.0.0.1")), None);
        assert!((0..10).all(|_| limiter.user_publication(&"u".into(), 0)));
        assert_eq!(limiter.entries(), (0, 0));
    }
}
