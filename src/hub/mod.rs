//! Plain data structures for channels, presence, users and history: no I/O,
//! no clocks (time is passed in), unit- and property-tested.
//!
//! Owner-side state (`channel`, `presence`, `history`) lives on the shard
//! that owns a channel; `index` is each shard's view of its own subscribers.

pub mod channel;
pub mod follow;
pub mod history;
pub mod index;
pub mod presence;
pub mod publication;
pub mod user;

/// The shard that owns `name` (a channel or a user id): a stable hash
/// (FNV-1a, so every process and version agrees) modulo the shard count.
pub fn owner_of(name: &str, shard_count: usize) -> usize {
    debug_assert!(shard_count > 0);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shard_count as u64) as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn owner_is_stable_and_spread() {
        assert_eq!(super::owner_of("news", 1), 0);
        assert_eq!(super::owner_of("news", 7), super::owner_of("news", 7));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[super::owner_of(&format!("channel-{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
