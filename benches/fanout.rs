//! The shard-local side of a publication: the channel index (subscribe,
//! unsubscribe, lookup) and the fan-out of one publication to 10,000
//! subscribers in memory, without sockets. Results are recorded in
//! docs/benchmarks.md.
//!
//! `fanout/outbox`: what a shard does for each subscriber whose socket
//! pushes back: walk the channel's subscribers and queue a reference-counted
//! `OutItem::Publication` in that connection's bounded `Outbox` (one `Arc`
//! increment and a queue push; the frame bytes are shared, never copied).
//! `fanout/copy`: walk the same subscribers and copy the shared frame bytes
//! into a per-connection buffer, the user-space part of writing it to each
//! socket. Neither includes the system call, which dominates a real fan-out
//! (see the broadcast figures in docs/benchmarks.md).
//!
//! cargo bench --bench fanout

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kometa::connection::outbox::{Admission, OutItem, Outbox, Wire};
use kometa::hub::index::{LocalIndex, Subscriber};
use kometa::hub::publication::{Publication, PushFields};

const SUBSCRIBERS: u32 = 10_000;
const OUTBOX_BYTES_MAX: usize = 1 << 20;
const OUTBOX_MESSAGES_MAX: usize = 4096;

fn publication(data_bytes: usize) -> Arc<Publication> {
    let data = format!(r#"{{"p":"{}"}}"#, "x".repeat(data_bytes.saturating_sub(8)));
    Arc::new(Publication::encode(
        "news".into(),
        "epoch".into(),
        1,
        PushFields { channel: "news", event: "update", data: data.as_bytes(), user: None },
    ))
}

/// A channel with `count` subscribers, connections 0..count.
fn index_with(count: u32) -> (LocalIndex, u32) {
    let mut index = LocalIndex::default();
    let (id, _) = index.intern("news");
    for conn in 0..count {
        index.add_pending(id);
        index.resolve_pending(id, Some(Subscriber { conn, after_offset: 0, presence_counts: false }));
    }
    (index, id)
}

fn channel_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("channel_index");
    group.sample_size(30).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    // Subscribe then unsubscribe one connection on a channel that already has
    // 10k subscribers (the entry stays; no allocation of a new channel).
    group.bench_function("subscribe_unsubscribe_existing_channel", |b| {
        let (mut index, _) = index_with(SUBSCRIBERS);
        b.iter(|| {
            let (id, _) = index.intern(black_box("news"));
            index.add_pending(id);
            let slot =
                index.resolve_pending(id, Some(Subscriber { conn: 99_999, after_offset: 0, presence_counts: false }));
            if let Some(slot) = slot {
                index.remove(id, slot);
            }
        })
    });
    // First subscriber of a new channel and its removal: the name is interned and dropped.
    group.bench_function("subscribe_unsubscribe_new_channel", |b| {
        let mut index = LocalIndex::default();
        b.iter(|| {
            let (id, _) = index.intern(black_box("some-channel-name:42"));
            index.add_pending(id);
            if let Some(slot) =
                index.resolve_pending(id, Some(Subscriber { conn: 1, after_offset: 0, presence_counts: false }))
            {
                index.remove(id, slot);
            }
        })
    });
    // Lookup among 100k channels, hit and miss.
    let mut many = LocalIndex::default();
    for n in 0..100_000 {
        let (id, _) = many.intern(&format!("channel-{n}"));
        many.add_pending(id);
    }
    group.bench_function("lookup_hit_100k_channels", |b| b.iter(|| many.lookup(black_box("channel-54321"))));
    group.bench_function("lookup_miss_100k_channels", |b| b.iter(|| many.lookup(black_box("channel-x"))));
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(u64::from(SUBSCRIBERS)));
    let (index, id) = index_with(SUBSCRIBERS);
    for data_bytes in [100usize, 1024] {
        let publication = publication(data_bytes);
        let mut outboxes: Vec<Outbox> = (0..SUBSCRIBERS).map(|_| Outbox::default()).collect();
        group.bench_function(BenchmarkId::new("outbox", data_bytes), |b| {
            b.iter(|| {
                let Some(channel) = index.get(id) else { return };
                for (_, subscriber) in &channel.subscribers {
                    let item = OutItem::Publication(Arc::clone(&publication), Wire::WebSocket);
                    let outbox = &mut outboxes[subscriber.conn as usize];
                    let admitted = outbox.push(item, OUTBOX_BYTES_MAX, OUTBOX_MESSAGES_MAX);
                    debug_assert_eq!(admitted, Admission::Queued);
                }
                // As if every socket then took its bytes: drops the references.
                for outbox in &mut outboxes {
                    let pending = outbox.pending_bytes();
                    outbox.advance(pending);
                }
            })
        });
        let mut sinks: Vec<Vec<u8>> = (0..SUBSCRIBERS).map(|_| Vec::with_capacity(2048)).collect();
        group.bench_function(BenchmarkId::new("copy", data_bytes), |b| {
            b.iter(|| {
                let Some(channel) = index.get(id) else { return };
                let frame = publication.ws_frame();
                for (_, subscriber) in &channel.subscribers {
                    let sink = &mut sinks[subscriber.conn as usize];
                    sink.clear();
                    sink.extend_from_slice(frame);
                }
                black_box(&sinks);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, channel_index, fanout);
criterion_main!(benches);
