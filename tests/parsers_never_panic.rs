//! Robustness of every parser that reads peer bytes: arbitrary input and
//! structured-but-mutated input (valid frames with bit flips, valid heads
//! cut short, admin frames with wrong length fields, JSON-ish commands)
//! never panic and keep the invariants the cargo-fuzz targets check.
//!
//! The checks themselves are `fuzz/src/checks.rs`, shared with the fuzz
//! targets (run those with `scripts/fuzz.sh`); this file generates inputs in
//! each target's format and adds properties about well-formed input. Case
//! counts keep the whole file to a few seconds in a debug build. Inputs a
//! fuzzer found go at the end as plain regression tests.

#[allow(dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};

use kometa_protocol::admin::{split_frame, FrameWriter};
use kometa_protocol::client::{decode, Command};
use kometa_protocol::http::{parse_head, HeadLimits};
use kometa_protocol::json::{single_line, validate};
use kometa_protocol::session_id::{make_session_id, parse_event_id, parse_session_id};
use kometa_protocol::token::{sign, Verifier};
use kometa_protocol::ws::{encode_client_frame, DecodeLimits, MessageKind};

fn config(cases: u32) -> ProptestConfig {
    // No regression files: a failure found here becomes a named test below.
    ProptestConfig { cases, max_shrink_iters: 2_000, failure_persistence: None, ..ProptestConfig::default() }
}

/// Flips `bit` of the byte at `index % len` for each pair.
fn flip_bits(bytes: &mut [u8], flips: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    for &(index, bit) in flips {
        bytes[index % len] ^= 1 << (bit % 8);
    }
}

/// Overwrites the byte at `index % len` for each pair.
fn replace_bytes(bytes: &mut [u8], replacements: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    for &(index, byte) in replacements {
        bytes[index % len] = byte;
    }
}

fn with_prefix(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let mut input = prefix.to_vec();
    input.extend_from_slice(body);
    input
}

// ---------------------------------------------------------------------------
// HTTP heads

fn header_strategy() -> impl Strategy<Value = String> {
    let value = "[ -~]{0,24}";
    prop_oneof![
        Just("Host: h".to_string()),
        Just("Upgrade: websocket".to_string()),
        Just("Connection: keep-alive, Upgrade".to_string()),
        Just("Connection: close".to_string()),
        Just("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_string()),
        Just("Sec-WebSocket-Version: 13".to_string()),
        Just("Sec-WebSocket-Protocol: foo, kometa.v1".to_string()),
        Just("Origin: https://app.example".to_string()),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Expect: 100-continue".to_string()),
        "[0-9]{0,20}".prop_map(|n| format!("Content-Length: {n}")),
        value.prop_map(|v| format!("Last-Event-ID: {v}")),
        value.prop_map(|v| format!("Authorization: Bearer {v}")),
        value.prop_map(|v| format!("Sec-WebSocket-Key: {v}")),
        ("[A-Za-z-]{1,16}", value).prop_map(|(n, v)| format!("{n}: {v}")),
    ]
}

fn head_strategy() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["GET", "POST", "HEAD", "OPTIONS", "PUT"]),
        // Origin-form, or absolute-form as proxies send it.
        "(http://h\\.example(:[0-9]{1,5})?)?/[a-z0-9/_.-]{0,16}",
        "(\\?[a-z]{1,6}=[a-zA-Z0-9%+._-]{0,12}(&[a-z]{1,6}=[a-zA-Z0-9%+._-]{0,12}){0,3})?",
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        vec(header_strategy(), 0..10),
    )
        .prop_map(|(method, path, query, version, headers)| {
            // HTTP/1.1 needs one Host; the generated headers may add a second.
            let mut head = format!("{method} {path}{query} {version}\r\nHost: h\r\n");
            for header in headers {
                head.push_str(&header);
                head.push_str("\r\n");
            }
            head.push_str("\r\n");
            head
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn http_head_arbitrary_bytes(selector in any::<u8>(), body in vec(any::<u8>(), 0..600)) {
        checks::http_head(&with_prefix(&[selector], &body));
    }

    /// A well-formed head parses whole; every strict prefix asks for more.
    #[test]
    fn http_head_valid_and_truncated(head in head_strategy(), cut in any::<prop::sample::Index>()) {
        let limits = HeadLimits { head_bytes_max: 8 * 1024, headers_max: 64 };
        match parse_head(head.as_bytes(), limits) {
            Ok(Some(request)) => prop_assert_eq!(request.head_len, head.len()),
            Ok(None) => prop_assert!(false, "complete head reported incomplete: {:?}", head),
            // Generated values may be refused (say, a 20-digit Content-Length).
            Err(_) => {}
        }
        let cut = cut.index(head.len());
        prop_assert!(parse_head(&head.as_bytes()[..cut], limits).map(|r| r.is_none()).unwrap_or(true));
        // 0x0a: 8 KiB, 64 headers, as above.
        checks::http_head(&with_prefix(&[0x0a], &head.as_bytes()[..cut]));
    }

    #[test]
    fn http_head_mutated(
        selector in any::<u8>(),
        head in head_strategy(),
        replacements in vec((any::<usize>(), any::<u8>()), 1..6),
        tail in vec(any::<u8>(), 0..32),
    ) {
        let mut bytes = head.into_bytes();
        replace_bytes(&mut bytes, &replacements);
        bytes.extend_from_slice(&tail);
        checks::http_head(&with_prefix(&[selector], &bytes));
    }
}

// ---------------------------------------------------------------------------
// WebSocket frames

#[derive(Debug, Clone)]
struct FrameSpec {
    first_byte: u8,
    payload: Vec<u8>,
    mask: [u8; 4],
}

fn frame_strategy() -> impl Strategy<Value = FrameSpec> {
    let first_byte = prop_oneof![
        // FIN + text/binary/continuation/close/ping/pong, and non-final data.
        prop::sample::select(vec![0x81u8, 0x82, 0x80, 0x88, 0x89, 0x8A, 0x01, 0x02, 0x00]),
        any::<u8>(),
    ];
    let payload =
        prop_oneof![vec(any::<u8>(), 0..40), "\\PC{0,20}".prop_map(String::into_bytes), vec(any::<u8>(), 120..300)];
    (first_byte, payload, any::<[u8; 4]>()).prop_map(|(first_byte, payload, mask)| FrameSpec {
        first_byte,
        payload,
        mask,
    })
}

fn frames_to_stream(frames: &[FrameSpec]) -> Vec<u8> {
    frames.iter().flat_map(|f| encode_client_frame(f.first_byte, &f.payload, f.mask)).collect()
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn ws_arbitrary_bytes(mode in any::<u8>(), seed in any::<u8>(), body in vec(any::<u8>(), 0..512)) {
        checks::ws_frames(&with_prefix(&[mode, seed], &body));
    }

    #[test]
    fn ws_valid_frames_with_bit_flips(
        limit in 0u8..4,
        seed in any::<u8>(),
        frames in vec(frame_strategy(), 1..8),
        flips in vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let mut stream = frames_to_stream(&frames);
        flip_bits(&mut stream, &flips);
        // Mode bit 0 clear: the stream is decoded as raw bytes.
        checks::ws_frames(&with_prefix(&[limit << 1, seed], &stream));
    }

    #[test]
    fn ws_structured_descriptors(limit in 0u8..4, seed in any::<u8>(), body in vec(any::<u8>(), 0..400)) {
        checks::ws_frames(&with_prefix(&[limit << 1 | 1, seed], &body));
    }

    /// A text message split into fragments at arbitrary byte offsets (inside
    /// characters too), with pings between them, arrives whole, whatever the
    /// chunking.
    #[test]
    fn ws_fragmented_text_reassembles(
        text in "\\PC{0,40}",
        cuts in vec(any::<prop::sample::Index>(), 0..5),
        pings in vec(any::<bool>(), 5),
        seed in any::<u8>(),
    ) {
        let bytes = text.as_bytes();
        let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        offsets.push(0);
        offsets.push(bytes.len());
        offsets.sort_unstable();
        offsets.dedup();
        let pieces: Vec<&[u8]> = offsets.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
        let pieces = if pieces.is_empty() { vec![&b""[..]] } else { pieces };
        let mut stream = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let opcode = if i == 0 { 0x01 } else { 0x00 };
            let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
            stream.extend(encode_client_frame(fin | opcode, piece, [i as u8, 0x11, 0x22, 0x33]));
            if pings[i % pings.len()] && fin == 0 {
                stream.extend(encode_client_frame(0x89, b"p", [9, 8, 7, 6]));
            }
        }
        let limits = DecodeLimits { message_bytes_max: 1024 };
        let mut state = u32::from(seed) + 1;
        let mut next = move || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (state >> 16) as usize % 9
        };
        let outcome = checks::ws_run(&stream, &mut next, limits);
        prop_assert_eq!(outcome.violation, None);
        prop_assert!(!outcome.in_progress);
        let messages: Vec<&checks::WsEvent> =
            outcome.events.iter().filter(|e| matches!(e, checks::WsEvent::Message(..))).collect();
        prop_assert_eq!(messages.len(), 1);
        let checks::WsEvent::Message(kind, payload, _) = messages[0] else { unreachable!() };
        prop_assert_eq!(*kind, MessageKind::Text);
        prop_assert_eq!(payload.as_slice(), bytes);
        // And the same input through the shared checks (mode 0x06: raw, 1024 bytes).
        checks::ws_frames(&with_prefix(&[0x06, seed], &stream));
    }
}

// ---------------------------------------------------------------------------
// Client commands

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-z]{0,6}", inner), 0..4).prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn command_strategy() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        prop::sample::select(vec![
            "subscribe",
            "unsubscribe",
            "publish",
            "ping",
            "connect",
            "presence",
            "presence_stats",
            "history",
            "ack",
            "disconnect",
        ])
        .prop_map(Value::from),
        json_value(),
    ];
    let id = prop_oneof![any::<u32>().prop_map(Value::from), "[a-z0-9-]{0,80}".prop_map(Value::from), json_value()];
    let field_names = prop::sample::subsequence(
        vec!["id", "channel", "event", "data", "since", "limit", "inbox", "token", "extra"],
        0..=9,
    );
    (op, id, field_names, vec(json_value(), 9), "[a-z0-9_:.#-]{0,20}", any::<u64>(), any::<bool>()).prop_map(
        |(op, id, names, values, channel, number, typed)| {
            let mut object = serde_json::Map::new();
            object.insert("op".into(), op);
            for (name, value) in names.into_iter().zip(values) {
                // Half the time, fields of the type the command wants.
                let value = match (typed, name) {
                    (true, "id") => id.clone(),
                    (true, "channel" | "event" | "token") => Value::from(channel.as_str()),
                    (true, "since") => json!({"epoch": channel, "offset": number}),
                    (true, "limit") => Value::from(number % 1000),
                    (true, "inbox") => Value::from(number),
                    _ => value,
                };
                object.insert(name.into(), value);
            }
            Value::Object(object)
        },
    )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn client_arbitrary_bytes(body in vec(any::<u8>(), 0..256)) {
        checks::client_command(&body);
    }

    #[test]
    fn client_jsonish_commands(command in command_strategy()) {
        checks::client_command(command.to_string().as_bytes());
    }

    #[test]
    fn client_mutated_commands(
        command in command_strategy(),
        replacements in vec((any::<usize>(), prop::sample::select(b"{}[]\",:\\0 n-e".to_vec())), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = command.to_string().into_bytes();
        replace_bytes(&mut bytes, &replacements);
        checks::client_command(&bytes);
        let cut = cut.index(bytes.len() + 1);
        checks::client_command(&bytes[..cut]);
    }

    /// A well-formed subscribe decodes to the channel and id it carried.
    #[test]
    fn client_subscribe_round_trip(channel in "\\PC{0,30}", id in any::<u64>()) {
        let message = json!({"op": "subscribe", "channel": channel, "id": id}).to_string();
        let request = decode(message.as_bytes()).expect("a valid subscribe");
        let expected_id = id.to_string();
        prop_assert_eq!(request.id.as_ref().map(|i| i.as_json()), Some(expected_id.as_str()));
        match request.command {
            Command::Subscribe { channel: decoded, since: None, presence_counts: false } => prop_assert_eq!(decoded, channel),
            other => prop_assert!(false, "decoded as {:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------
// Admin frames

#[derive(Debug, Clone)]
enum Field {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Str(String),
    Blob(Vec<u8>),
}

fn admin_frame_strategy() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        any::<u8>().prop_map(Field::U8),
        any::<u16>().prop_map(Field::U16),
        any::<u32>().prop_map(Field::U32),
        any::<u64>().prop_map(Field::U64),
        "\\PC{0,16}".prop_map(Field::Str),
        vec(any::<u8>(), 0..24).prop_map(Field::Blob),
    ];
    (any::<u8>(), any::<u8>(), any::<u32>(), vec(field, 0..6)).prop_map(|(first, second, id, fields)| {
        let mut writer = FrameWriter::new(first, second, id);
        for field in fields {
            match field {
                Field::U8(v) => writer.u8(v),
                Field::U16(v) => writer.u16(v),
                Field::U32(v) => writer.u32(v),
                Field::U64(v) => writer.u64(v),
                Field::Str(v) => writer.str16(&v),
                Field::Blob(v) => writer.bytes32(&v),
            };
        }
        writer.finish()
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn admin_arbitrary_bytes(selector in any::<u8>(), body in vec(any::<u8>(), 0..512)) {
        checks::admin_frames(&with_prefix(&[selector], &body));
    }

    /// Frames written back to back split into exactly those frames.
    #[test]
    fn admin_valid_stream_splits_exactly(frames in vec(admin_frame_strategy(), 1..6)) {
        let stream: Vec<u8> = frames.concat();
        let mut rest = &stream[..];
        for frame in &frames {
            let (_, used) = split_frame(rest, 1 << 20).unwrap().expect("a whole frame");
            prop_assert_eq!(&rest[..used], frame.as_slice());
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
        // Selector 4: admin_frame_bytes_max of 1 MiB, as above.
        checks::admin_frames(&with_prefix(&[4], &stream));
    }

    /// Valid frames with one length field replaced by a nearby or random value.
    #[test]
    fn admin_mutated_length_fields(
        selector in any::<u8>(),
        frames in vec(admin_frame_strategy(), 1..5),
        which in any::<prop::sample::Index>(),
        new_length in prop_oneof![any::<u32>(), 0u32..16, (-8i64..8).prop_map(|d| d as u32)],
        relative in any::<bool>(),
        flips in vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let which = which.index(frames.len());
        let mut stream = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let mut frame = frame.clone();
            if i == which {
                let old = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
                let length = if relative { old.wrapping_add(new_length) } else { new_length };
                frame[..4].copy_from_slice(&length.to_be_bytes());
            }
            stream.extend(frame);
        }
        flip_bits(&mut stream, &flips);
        checks::admin_frames(&with_prefix(&[selector], &stream));
    }
}

// ---------------------------------------------------------------------------
// Publication data (JSON)

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn json_arbitrary_bytes(body in vec(any::<u8>(), 0..256)) {
        checks::json_data(&body);
    }

    /// Pretty-printed JSON with CRLF line ends is valid, and flattens to the same value.
    #[test]
    fn json_pretty_values_flatten(value in json_value(), crlf in any::<bool>()) {
        let mut pretty = serde_json::to_string_pretty(&value).unwrap();
        if crlf {
            pretty = pretty.replace('\n', "\r\n");
        }
        prop_assert!(validate(pretty.as_bytes()).is_ok());
        // Compared with the pretty text read back, not `value`: serde_json's
        // default float parsing does not round-trip every f64 exactly.
        let before: Value = serde_json::from_str(&pretty).unwrap();
        let flat = single_line(pretty.as_bytes());
        prop_assert_eq!(serde_json::from_slice::<Value>(&flat).unwrap(), before);
        checks::json_data(pretty.as_bytes());
    }

    #[test]
    fn json_mutated(
        value in json_value(),
        replacements in vec((any::<usize>(), prop::sample::select(b"\r\n\"\\{}[],:0e-".to_vec())), 1..4),
    ) {
        let mut bytes = serde_json::to_vec_pretty(&value).unwrap();
        replace_bytes(&mut bytes, &replacements);
        checks::json_data(&bytes);
    }
}

// ---------------------------------------------------------------------------
// Tokens

fn claims_strategy() -> impl Strategy<Value = Value> {
    let sub = prop_oneof![
        "[a-zA-Z0-9_.:@/=#-]{1,20}".prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        json_value(),
    ];
    let time = prop_oneof![
        Just(Value::Null),
        (0u64..5_000_000_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_value(),
    ];
    let channels = prop_oneof![vec("[a-z_*]{0,10}", 0..4).prop_map(Value::from), json_value()];
    (sub, time.clone(), time.clone(), time, channels, vec(any::<bool>(), 5)).prop_map(
        |(sub, exp, nbf, iat, channels, present)| {
            let mut object = serde_json::Map::new();
            for (present, (name, value)) in present.into_iter().zip([
                ("sub", sub),
                ("exp", exp),
                ("nbf", nbf),
                ("iat", iat),
                ("channels", channels),
            ]) {
                if present {
                    object.insert(name.into(), value);
                }
            }
            Value::Object(object)
        },
    )
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn token_arbitrary_text(mode in any::<u8>(), body in vec(any::<u8>(), 0..200)) {
        // Bit 0 set: the body is claims that the check signs itself.
        checks::token(&with_prefix(&[mode], &body));
    }

    #[test]
    fn token_signed_claims_with_flips(
        claims in claims_strategy(),
        clock in 0u8..5,
        flips in vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let mut token = sign(checks::TOKEN_SECRET, &claims).into_bytes();
        flip_bits(&mut token, &flips);
        checks::token(&with_prefix(&[clock << 2], &token));
        // The same claims signed by the check itself, with either secret.
        let claims = claims.to_string();
        checks::token(&with_prefix(&[clock << 2 | 1], claims.as_bytes()));
        checks::token(&with_prefix(&[clock << 2 | 0x81], claims.as_bytes()));
    }

    /// Unmodified tokens with a valid subject and no time claims verify.
    #[test]
    fn token_valid_subjects_verify(sub in "[a-zA-Z0-9_.:@/=#-]{1,128}", grants in vec("[a-z_]{1,8}\\*?", 0..4)) {
        let token = sign(checks::TOKEN_SECRET, &json!({"sub": sub, "channels": grants}));
        let identity = Verifier::new(Some(checks::TOKEN_SECRET), None).verify(&token, 1_700_000_000).unwrap();
        prop_assert_eq!(&*identity.user, sub.as_str());
        for grant in &grants {
            prop_assert!(identity.grants(grant.trim_end_matches('*')));
        }
    }
}

// ---------------------------------------------------------------------------
// Session and event ids

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn session_ids_arbitrary(body in vec(any::<u8>(), 0..80)) {
        checks::session_ids(&body);
    }

    #[test]
    fn session_ids_round_trip_and_mutated(
        shard in any::<usize>(),
        key in any::<u32>(),
        generation in any::<u32>(),
        secret in any::<[u8; 16]>(),
        seq in any::<u64>(),
        replacements in vec((any::<usize>(), prop::sample::select(b".:s0aZ+-".to_vec())), 0..3),
    ) {
        let id = make_session_id(shard, key, generation, &secret);
        prop_assert_eq!(parse_session_id(&id), Some((shard, key, generation)));
        let event_id = format!("{id}:{seq}");
        prop_assert_eq!(parse_event_id(&event_id), Some((&*id, seq)));
        let mut bytes = event_id.into_bytes();
        replace_bytes(&mut bytes, &replacements);
        checks::session_ids(&bytes);
    }
}

// ---------------------------------------------------------------------------
// SockJS payloads and URLs, Jii-comet lines

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn sockjs_arbitrary(body in vec(any::<u8>(), 0..200)) {
        checks::sockjs(&body);
    }

    /// Arrays of strings with escapes (surrogates, controls, markup), then mutated.
    #[test]
    fn sockjs_payloads_mutated(
        units in vec(vec(prop_oneof![0u32..0x80, 0xD7F0u32..0xE010, 0x2020u32..0x2070, 0xFFF0u32..0x1_0000], 0..12), 0..5),
        replacements in vec((any::<usize>(), prop::sample::select(b"[]\\\"u,<".to_vec())), 0..3),
    ) {
        let strings: Vec<String> = units
            .iter()
            .map(|string| string.iter().map(|unit| format!("\\u{unit:04x}")).collect::<String>())
            .collect();
        let mut bytes = format!("[\"{}\"]", strings.join("\",\"")).into_bytes();
        let decoded = kometa_protocol::sockjs::decode_messages(&bytes, 64).map(|messages| messages.len());
        prop_assert_eq!(decoded, Ok(strings.len().max(1)));
        checks::sockjs(&bytes);
        replace_bytes(&mut bytes, &replacements);
        checks::sockjs(&bytes);
    }
}

// ---------------------------------------------------------------------------
// Regression inputs found by the fuzz targets (scripts/fuzz.sh), minimised
// with `cargo fuzz tmin`, with what the target reported.

/// client_command, minimised: `["\ud800"]`. Found by the fuzzer: the array
/// was decoded positionally, its first element taken as the request id, and
/// the unpaired surrogate escape passed serde_json's `RawValue`, so the id
/// was echoed as `{"id":"\ud800",…}`, which strict parsers refuse. Commands
/// must now be objects and string ids real strings.
#[test]
fn regression_client_command_lone_surrogate_id() {
    checks::client_command(br#"["\ud800"]"#);
    checks::client_command(br#"{"op":"ping","id":"\ud800"}"#);
    checks::client_command(br#"{"op":"subscribe","id":"\udc00x","channel":5}"#);
}

/// Every reply to such input parses as strict JSON.
#[test]
fn request_ids_with_lone_surrogates_echo_as_strict_json() {
    use kometa_protocol::client::{write_error, write_ok};
    for message in [&br#"["\ud800"]"#[..], br#"{"op":"ping","id":"\ud800"}"#, br#"{"op":"ping","id":"\udfff"}"#] {
        let mut out = Vec::new();
        match decode(message) {
            Ok(request) => write_ok(&mut out, request.id.as_ref(), |_| {}),
            Err(error) => write_error(&mut out, &error),
        }
        assert!(
            serde_json::from_slice::<Value>(&out).is_ok(),
            "reply to {} is not strict JSON: {}",
            String::from_utf8_lossy(message),
            String::from_utf8_lossy(&out)
        );
    }
}

/// The fuzz seeds' shapes, run once each so a broken harness shows up here
/// and not only under cargo-fuzz.
#[test]
fn seed_shapes_pass_the_checks() {
    checks::http_head(b"\x0aGET /ws?token=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    checks::ws_frames(&with_prefix(b"\x06\x05", &encode_client_frame(0x81, b"Hello", [0x37, 0xfa, 0x21, 0x3d])));
    checks::client_command(br#"{"op":"publish","channel":"c","data":{"a":[1,2]},"id":"x"}"#);
    checks::admin_frames(&with_prefix(b"\x03", &FrameWriter::request(0x03, 1).finish()));
    checks::json_data(b"{\r\n\"a\": 1e400}\n");
    checks::token(b"\x09{\"sub\":\"alice\",\"exp\":4102444800}");
    checks::session_ids(b"s1.42.7.abababababababababababababababab:12");
}
