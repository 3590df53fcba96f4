//! Codec costs on the per-message and per-connection paths: WebSocket frame
//! headers (parse and encode), unmasking, the upgrade request and accept
//! key, and client JSON commands. Results are recorded in docs/benchmarks.md.
//!
//! cargo bench --bench proto

use std::hint::black_box;
use std::io::Cursor;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kometa_protocol::client;
use kometa_protocol::http::{parse_head, HeadLimits};
use kometa_protocol::ws::{
    accept_key, apply_mask, check_upgrade, decode_frame, encode_client_frame, encode_header, DecodeLimits,
    FrameBuilder, OPCODE_TEXT, SERVER_HEADER_BYTES_MAX,
};
use tungstenite::protocol::frame::FrameHeader;

/// Payload sizes: tiny, the largest 7-bit length, a typical push, the 16-bit and 64-bit length forms.
const SIZES: [usize; 5] = [16, 125, 1024, 16 * 1024, 70_000];
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// What Chromium sends to open a WebSocket (extensions and protocol offered).
const UPGRADE_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\n\
Host: example.com:8080\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: kometa.v1\r\n\r\n";

fn quick<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(30).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    group
}

fn frame_headers(c: &mut Criterion) {
    let mut group = quick(c, "frame_header_parse");
    for size in SIZES {
        // Header only: tungstenite's FrameHeader on a masked client frame.
        let frame = encode_client_frame(0x82, &vec![b'x'; size], MASK);
        group.bench_with_input(BenchmarkId::new("tungstenite", size), &frame, |b, frame| {
            b.iter(|| FrameHeader::parse(&mut Cursor::new(black_box(&frame[..]))))
        });
    }
    group.finish();

    let mut group = quick(c, "frame_decode");
    let limits = DecodeLimits { message_bytes_max: 1 << 20 };
    for size in SIZES {
        // Header, limit checks and unmasking in place. A binary frame needs no
        // UTF-8 check, so decoding the same buffer again (re-masking it) is valid.
        let mut frame = encode_client_frame(0x82, &vec![b'x'; size], MASK);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let mut fragments = None;
                let decoded = decode_frame(black_box(&mut frame[..]), &mut fragments, limits);
                black_box(decoded.map(|d| d.map(|d| d.consumed)).ok());
            })
        });
    }
    group.finish();

    let mut group = quick(c, "frame_header_encode");
    for size in SIZES {
        group.bench_with_input(BenchmarkId::new("encode_header", size), &size, |b, &size| {
            let mut out = [0u8; SERVER_HEADER_BYTES_MAX];
            b.iter(|| encode_header(OPCODE_TEXT, black_box(size), &mut out))
        });
    }
    for size in SIZES {
        // A whole push: payload appended behind headroom, header written in front.
        let payload = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("frame_builder", size), &payload, |b, payload| {
            b.iter(|| {
                let mut builder = FrameBuilder::with_capacity(payload.len());
                builder.payload().extend_from_slice(payload);
                black_box(builder.finish(OPCODE_TEXT))
            })
        });
    }
    group.finish();
}

fn unmasking(c: &mut Criterion) {
    let mut group = quick(c, "apply_mask");
    for size in [16usize, 125, 1024, 16 * 1024, 64 * 1024] {
        for align in [0usize, 1, 3] {
            let mut buffer = vec![0x5au8; size + 8];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(format!("align{align}"), size), |b| {
                b.iter(|| apply_mask(black_box(&mut buffer[align..align + size]), MASK, 0))
            });
        }
    }
    group.finish();
}

fn handshake(c: &mut Criterion) {
    let mut group = quick(c, "handshake");
    let limits = HeadLimits { head_bytes_max: 8192, headers_max: 64 };
    group.throughput(Throughput::Bytes(UPGRADE_REQUEST.len() as u64));
    group.bench_function("parse_head", |b| b.iter(|| parse_head(black_box(UPGRADE_REQUEST), limits).is_ok()));
    group.bench_function("parse_head_and_check_upgrade", |b| {
        b.iter(|| match parse_head(black_box(UPGRADE_REQUEST), limits) {
            Ok(Some(request)) => check_upgrade(&request, &[], true).is_ok(),
            _ => false,
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("accept_key", |b| b.iter(|| accept_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ=="))));
    group.finish();
}

fn client_json(c: &mut Criterion) {
    let mut group = quick(c, "client_decode");
    let publish = format!(
        r#"{{"op":"publish","channel":"web_chat","event":"message","data":{{"text":"{}","n":1}},"id":3}}"#,
        "x".repeat(100)
    );
    let commands: [(&str, &[u8]); 4] = [
        ("subscribe", br#"{"op":"subscribe","channel":"news","id":1}"#),
        (
            "subscribe_since",
            br#"{"op":"subscribe","channel":"news","id":2,"since":{"epoch":"4b1d6e0c9a7f2e31","offset":18}}"#,
        ),
        ("publish_100B", publish.as_bytes()),
        ("ping", br#"{"op":"ping","id":4}"#),
    ];
    for (name, message) in commands {
        assert!(client::decode(message).is_ok(), "{name}");
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &message, |b, message| {
            b.iter(|| client::decode(black_box(message)).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, frame_headers, unmasking, handshake, client_json);
criterion_main!(benches);
