//! Cross-shard bus: throughput and wake-up round trip between two cores,
//! comparing the bus Kometa uses (crossbeam bounded queues plus an eventfd
//! wake-up, `kometa::bus`) with glommio's channel mesh. Results and the
//! decision are recorded in docs/bus.md.
//!
//! cargo bench --bench bus

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use kometa::bus::{self, Endpoint, Message};
use kometa::hub::publication::{Publication, PushFields};

/// Messages per measured transfer.
const MESSAGES: u64 = 200_000;
/// Round trips per measured ping-pong.
const ROUND_TRIPS: u64 = 2_000;
const QUEUE_CAPACITY: usize = 8192;

fn publication() -> Arc<Publication> {
    Arc::new(Publication::encode(
        "news".into(),
        "epoch".into(),
        1,
        PushFields { channel: "news", event: "update", data: br#"{"n":1}"#, user: None },
    ))
}

fn pin(cpu: usize) {
    // SAFETY: sets this thread's affinity from a zeroed, then filled, cpu set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Blocks until the endpoint's eventfd is readable, as a parked shard does.
fn park(endpoint: &mut Endpoint) {
    let wakeup = endpoint.wakeup();
    wakeup.prepare_park();
    if endpoint.has_inbound() {
        endpoint.wakeup().cancel_park();
        return;
    }
    let mut poll = libc::pollfd { fd: endpoint.wakeup().fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, 1000) };
    endpoint.wakeup().drain();
}

fn crossbeam_throughput(messages: u64) -> Duration {
    let (mut endpoints, _wakeups) = bus::mesh(2, QUEUE_CAPACITY, 1 << 22).unwrap();
    let mut consumer = endpoints.pop().unwrap();
    let mut producer = endpoints.pop().unwrap();
    let receiver = std::thread::spawn(move || {
        pin(1);
        let mut received = 0;
        while received < messages {
            let handled = consumer.receive(4096, |_, message| drop(message));
            received += handled as u64;
            if handled == 0 {
                park(&mut consumer);
            }
        }
        Instant::now()
    });
    pin(0);
    let publication = publication();
    let started = Instant::now();
    for n in 0..messages {
        producer.send(1, Message::Deliver { publication: Arc::clone(&publication), accounted: 0 });
        if n % 256 == 0 {
            // A shard flushes (and wakes its peers) once per tick.
            producer.flush();
        }
    }
    while producer.flush() {
        std::hint::spin_loop();
    }
    receiver.join().unwrap() - started
}

fn crossbeam_round_trips(round_trips: u64) -> Duration {
    let (mut endpoints, _wakeups) = bus::mesh(2, QUEUE_CAPACITY, 1 << 20).unwrap();
    let mut echo = endpoints.pop().unwrap();
    let mut origin = endpoints.pop().unwrap();
    let echoer = std::thread::spawn(move || {
        pin(1);
        let mut echoed = 0;
        while echoed < round_trips {
            let mut batch = Vec::new();
            echo.receive(16, |_, message| batch.push(message));
            if batch.is_empty() {
                park(&mut echo);
            }
            for message in batch {
                echo.send(0, message);
                echoed += 1;
            }
            echo.flush();
        }
    });
    pin(0);
    let publication = publication();
    let started = Instant::now();
    for _ in 0..round_trips {
        origin.send(1, Message::Deliver { publication: Arc::clone(&publication), accounted: 0 });
        origin.flush();
        loop {
            if origin.receive(1, |_, message| drop(message)) == 1 {
                break;
            }
            park(&mut origin);
        }
    }
    let elapsed = started.elapsed();
    echoer.join().unwrap();
    elapsed
}

fn glommio_throughput(messages: u64) -> Duration {
    let mesh = MeshBuilder::<Message, _>::full(2, QUEUE_CAPACITY);
    let consumer_mesh = mesh.clone();
    let consumer = LocalExecutorBuilder::new(Placement::Fixed(1))
        .spawn(move || async move {
            let (_senders, receivers) = consumer_mesh.join().await.unwrap();
            let peer = if receivers.peer_id() == 0 { 1 } else { 0 };
            for _ in 0..messages {
                receivers.recv_from(peer).await.unwrap();
            }
            Instant::now()
        })
        .unwrap();
    let producer = LocalExecutorBuilder::new(Placement::Fixed(0))
        .spawn(move || async move {
            let (senders, _receivers) = mesh.join().await.unwrap();
            let peer = if senders.peer_id() == 0 { 1 } else { 0 };
            let publication = publication();
            let started = Instant::now();
            for _ in 0..messages {
                senders
                    .send_to(peer, Message::Deliver { publication: Arc::clone(&publication), accounted: 0 })
                    .await
                    .unwrap();
            }
            started
        })
        .unwrap();
    let started = producer.join().unwrap();
    consumer.join().unwrap() - started
}

fn glommio_round_trips(round_trips: u64) -> Duration {
    let mesh = MeshBuilder::<Message, _>::full(2, QUEUE_CAPACITY);
    let echo_mesh = mesh.clone();
    let echo = LocalExecutorBuilder::new(Placement::Fixed(1))
        .spawn(move || async move {
            let (senders, receivers) = echo_mesh.join().await.unwrap();
            let peer = if senders.peer_id() == 0 { 1 } else { 0 };
            for _ in 0..round_trips {
                let message = receivers.recv_from(peer).await.unwrap().unwrap();
                senders.send_to(peer, message).await.unwrap();
            }
        })
        .unwrap();
    let origin = LocalExecutorBuilder::new(Placement::Fixed(0))
        .spawn(move || async move {
            let (senders, receivers) = mesh.join().await.unwrap();
            let peer = if senders.peer_id() == 0 { 1 } else { 0 };
            let publication = publication();
            let started = Instant::now();
            for _ in 0..round_trips {
                senders
                    .send_to(peer, Message::Deliver { publication: Arc::clone(&publication), accounted: 0 })
                    .await
                    .unwrap();
                receivers.recv_from(peer).await.unwrap();
            }
            started.elapsed()
        })
        .unwrap();
    echo.join().unwrap();
    origin.join().unwrap()
}

fn bus(c: &mut Criterion) {
    let mut group = c.benchmark_group("bus_throughput");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(MESSAGES));
    group.bench_function("crossbeam_eventfd", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| crossbeam_throughput(MESSAGES)).sum())
    });
    group.bench_function("glommio_mesh", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| glommio_throughput(MESSAGES)).sum())
    });
    group.finish();

    let mut group = c.benchmark_group("bus_round_trip");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(ROUND_TRIPS));
    group.bench_function("crossbeam_eventfd", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| crossbeam_round_trips(ROUND_TRIPS)).sum())
    });
    group.bench_function("glommio_mesh", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| glommio_round_trips(ROUND_TRIPS)).sum())
    });
    group.finish();
}

criterion_group!(benches, bus);
criterion_main!(benches);
