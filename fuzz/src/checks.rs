//! The parser harnesses shared by the cargo-fuzz targets (`fuzz/fuzz_targets`)
//! and the CI property tests (`tests/parsers_never_panic.rs`, which includes
//! this file with `#[path]`). Each function takes one input in the target's
//! format, runs the parser the way the server runs it, and panics when the
//! parser panics or an invariant does not hold.
//!
//! Only `kometa` and its own dependencies are used here, so the file builds
//! both inside the fuzz crate and as a module of an integration test.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use kometa_protocol::admin::{decode_error, split_frame, FrameWriter, Reader, FRAME_HEAD_BYTES, LENGTH_BYTES};
use kometa_protocol::admin::{decode_published, json_payload};
use kometa_protocol::client::{
    check_channel_name, check_event_name, decode, name_byte_allowed, write_error, write_ok, Command, RequestId,
    REQUEST_ID_BYTES_MAX,
};
use kometa_protocol::http::{parse_head, percent_decode, query_param, query_params, HeadLimits, HEADERS_HARD_MAX};
use kometa_protocol::json::{nested_deeper_than, single_line, validate};
use kometa_protocol::session_id::{make_session_id, parse_event_id, parse_session_id};
use kometa_protocol::token::{Verifier, GRANTS_MAX, USER_ID_BYTES_MAX};
use kometa_protocol::ws::{
    check_upgrade, close_code_allowed_from_peer, decode_frame, encode_client_frame, write_upgrade_response,
    DecodeLimits, Event, Fragments, MessageKind, Payload, CONTROL_PAYLOAD_BYTES_MAX, HEADER_BYTES_MAX,
};

// ---------------------------------------------------------------------------
// http_head

/// `proto::http::parse_head` and what the server does with a parsed head
/// (`query_param`, `percent_decode`, `keep_alive`, `ws::check_upgrade`).
///
/// Input: byte 0 picks the limits, the rest is what a client sent.
///
/// Invariants: a complete head lies inside the input and the limits;
/// re-parsing exactly `head_len` bytes gives the same head, and a shorter
/// prefix is never a complete head (the server re-parses a growing buffer);
/// "incomplete" is only answered below the size limit; refusals map to
/// 400/417/431/505; decoded query values are never longer than their source.
pub fn http_head(data: &[u8]) {
    let Some((&selector, buf)) = data.split_first() else { return };
    let limits = HeadLimits {
        head_bytes_max: [256, 1024, 8 * 1024, 64 * 1024][usize::from(selector & 3)],
        headers_max: [4, 8, 64, HEADERS_HARD_MAX][usize::from((selector >> 2) & 3)],
    };
    match parse_head(buf, limits) {
        Ok(Some(request)) => {
            assert!(request.head_len <= buf.len(), "head_len past the input");
            assert!(request.head_len <= limits.head_bytes_max, "head_len past the limit");
            assert!(request.path.starts_with('/') || request.path == "*");
            assert!(request.minor_version <= 1);
            let again = parse_head(&buf[..request.head_len], limits)
                .expect("the head alone does not parse")
                .expect("the head alone is incomplete");
            assert_eq!((again.head_len, again.path, again.query), (request.head_len, request.path, request.query));
            if request.head_len > 1 {
                let cut = usize::from(selector) % request.head_len;
                if let Ok(Some(early)) = parse_head(&buf[..cut], limits) {
                    panic!("a {cut}-byte prefix parsed as a {}-byte head", early.head_len);
                }
            }
            let _ = request.keep_alive();
            for name in ["token", "session", "channel", "since", "cursor", ""] {
                if let Some(value) = request.query_param(name) {
                    assert!(value.len() <= request.query.len());
                }
            }
            for value in query_params(request.query, "channel") {
                assert!(value.len() <= request.query.len());
            }
            let origins = ["https://app.example".to_string()];
            for allowed in [&[][..], &origins[..]] {
                if let Ok(upgrade) = check_upgrade(&request, allowed, selector & 0x10 != 0) {
                    assert_eq!(upgrade.accept.len(), 28);
                    let mut out = Vec::new();
                    write_upgrade_response(&mut out, &upgrade);
                    assert!(out.ends_with(b"\r\n\r\n"));
                }
            }
        }
        Ok(None) => assert!(buf.len() < limits.head_bytes_max, "incomplete head at or past the limit"),
        Err(error) => {
            assert!(matches!(error.status(), 400 | 417 | 431 | 505), "status {}", error.status());
            assert!(!error.reason().is_empty());
        }
    }

    let text = String::from_utf8_lossy(buf);
    if let Some(decoded) = percent_decode(&text) {
        assert!(decoded.len() <= text.len());
        if !text.contains(['%', '+']) {
            assert_eq!(decoded, text);
        }
    }
    if let Some((name, query)) = text.split_once('|') {
        if let Some(value) = query_param(query, name) {
            assert!(value.len() <= query.len());
        }
    }
}

// ---------------------------------------------------------------------------
// ws_frames

/// An event, owned, so runs over differently chunked streams can be compared.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// Kind, payload, whether it was assembled from fragments.
    Message(MessageKind, Vec<u8>, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

#[derive(Debug, PartialEq, Eq)]
pub struct WsOutcome {
    pub events: Vec<WsEvent>,
    /// The violation that ended the connection, if any.
    pub violation: Option<(u16, &'static str)>,
    /// A fragmented message was still in progress at the end.
    pub in_progress: bool,
}

/// Feeds `stream` to `decode_frame` in chunks of `chunk_sizes()` bytes the
/// way a connection does: undecoded bytes stay buffered and `Fragments`
/// carries a fragmented message across calls. Checks every result.
pub fn ws_run(stream: &[u8], chunk_sizes: &mut dyn FnMut() -> usize, limits: DecodeLimits) -> WsOutcome {
    let longest_frame = HEADER_BYTES_MAX + limits.message_bytes_max.max(CONTROL_PAYLOAD_BYTES_MAX);
    let mut pending: Vec<u8> = Vec::new();
    let mut fragments: Option<Box<Fragments>> = None;
    let mut events = Vec::new();
    let mut position = 0;
    while position < stream.len() {
        let take = chunk_sizes().clamp(1, stream.len() - position);
        pending.extend_from_slice(&stream[position..position + take]);
        position += take;
        loop {
            let buffered = pending.len();
            let consumed = match decode_frame(&mut pending, &mut fragments, limits) {
                Ok(Some(decoded)) => {
                    assert!(decoded.consumed > 0, "consumed nothing");
                    assert!(decoded.consumed <= buffered, "consumed {} of {buffered} bytes", decoded.consumed);
                    if let Some(event) = decoded.event {
                        let event = ws_check_event(event, limits);
                        if let WsEvent::Message(_, _, true) = event {
                            assert!(fragments.is_none(), "an assembled message left its fragments behind");
                        }
                        events.push(event);
                    }
                    decoded.consumed
                }
                Ok(None) => {
                    assert!(buffered < longest_frame, "asks for more bytes with {buffered} buffered");
                    break;
                }
                Err(violation) => {
                    assert!(matches!(violation.code, 1002 | 1007 | 1009), "close code {}", violation.code);
                    assert!(violation.reason.len() <= CONTROL_PAYLOAD_BYTES_MAX - 2);
                    return WsOutcome {
                        events,
                        violation: Some((violation.code, violation.reason)),
                        in_progress: fragments.is_some(),
                    };
                }
            };
            pending.drain(..consumed);
        }
    }
    WsOutcome { events, violation: None, in_progress: fragments.is_some() }
}

fn ws_check_event(event: Event<'_>, limits: DecodeLimits) -> WsEvent {
    match event {
        Event::Message(kind, payload) => {
            assert!(payload.len() <= limits.message_bytes_max, "a message of {} bytes", payload.len());
            if kind == MessageKind::Text {
                assert!(std::str::from_utf8(&payload).is_ok(), "a text message is not UTF-8");
            }
            let assembled = matches!(payload, Payload::Assembled(_));
            WsEvent::Message(kind, payload.to_vec(), assembled)
        }
        Event::Ping(payload) => {
            assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
            WsEvent::Ping(payload.to_vec())
        }
        Event::Pong(payload) => {
            assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
            WsEvent::Pong(payload.to_vec())
        }
        Event::Close(code, reason) => {
            match code {
                Some(code) => assert!(close_code_allowed_from_peer(code), "close code {code} accepted"),
                None => assert!(reason.is_empty()),
            }
            assert!(reason.len() <= CONTROL_PAYLOAD_BYTES_MAX - 2);
            WsEvent::Close(code, reason.to_string())
        }
    }
}

/// Structured input: `first_byte, length, payload…` descriptors, each
/// encoded as a masked client frame. Lengths 0xF0.. stand for 126.. (the
/// 16-bit length encoding).
pub fn ws_encode_descriptors(mut input: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    while let [first_byte, length, rest @ ..] = input {
        let length = match *length {
            l @ 0..=0xEF => usize::from(l),
            l => 126 + usize::from(l - 0xF0) * 40,
        };
        let take = length.min(rest.len());
        let mask = [*first_byte, take as u8, 0x5a, 0xa5];
        stream.extend(encode_client_frame(*first_byte, &rest[..take], mask));
        input = &rest[take..];
    }
    stream
}

/// `proto::ws::decode_frame` over a chunked stream.
///
/// Input: byte 0 = mode (bit 0: structured descriptors, else raw bytes) and
/// message limit (bits 1-2: 16, 64, 200 or 1024 bytes), byte 1 = seed for
/// the chunk sizes, the rest = the stream or the descriptors.
///
/// Invariants: see `ws_run` and `ws_check_event`; in addition the events and
/// the outcome are the same whether the stream arrives whole, in random
/// chunks, or a byte at a time.
pub fn ws_frames(data: &[u8]) {
    let [mode, seed, body @ ..] = data else { return };
    let limits = DecodeLimits { message_bytes_max: [16, 64, 200, 1024][usize::from((mode >> 1) & 3)] };
    let stream = if mode & 1 == 1 { ws_encode_descriptors(body) } else { body.to_vec() };

    let whole = ws_run(&stream, &mut || usize::MAX, limits);

    let mut state = u32::from(*seed) | 0x100;
    let max_chunk = 1 + usize::from(*seed % 24);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        1 + state as usize % max_chunk
    };
    let chunked = ws_run(&stream, &mut next, limits);
    assert_eq!(whole, chunked, "chunking changed the outcome");

    if stream.len() <= 2048 {
        let bytewise = ws_run(&stream, &mut || 1, limits);
        assert_eq!(whole, bytewise, "byte-at-a-time changed the outcome");
    }
}

// ---------------------------------------------------------------------------
// client_command

fn client_check_id(id: &RequestId, message: &[u8]) {
    let json = id.as_json();
    assert!(json.len() <= REQUEST_ID_BYTES_MAX, "an id of {} bytes", json.len());
    // Echoed verbatim: the id is a slice of the message itself.
    assert!(message.windows(json.len()).any(|w| w == json.as_bytes()), "the id {json} is not from the message");
    assert!(validate(json.as_bytes()).is_ok(), "the id {json} is not one JSON value");
    // Strict JSON: lone surrogate escapes (which RawValue lets through) are refused.
    let echoed: Value = serde_json::from_str(json).unwrap_or_else(|error| panic!("the id {json} is not JSON: {error}"));
    assert!(echoed.is_string() || echoed.is_number(), "id {json}");
    // The id is the message's own `id` field (serde refuses a duplicate
    // `id` key, so there is only one).
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(message) {
        assert_eq!(object.get("id"), Some(&echoed), "the echoed id differs from the one sent");
    }
}

/// Parses a reply: always one strict JSON object.
fn client_check_reply(out: &[u8]) -> Value {
    let value: Value = serde_json::from_slice(out)
        .unwrap_or_else(|error| panic!("the reply is not JSON: {error}: {}", String::from_utf8_lossy(out)));
    assert!(value.is_object(), "the reply is not an object");
    value
}

fn client_check_name(name: &str) {
    let _ = check_channel_name(name, 255);
    let _ = check_channel_name(name, 0);
    let _ = check_event_name(name);
}

/// `proto::client::decode`: one client JSON command.
///
/// Invariants: an id is short and echoes as the JSON the client sent;
/// `publish` data is one valid JSON value; replies built from the result
/// (ok or error) are valid JSON objects; the name checks take any name.
pub fn client_command(data: &[u8]) {
    match decode(data) {
        Ok(request) => {
            if let Some(id) = &request.id {
                client_check_id(id, data);
            }
            match &request.command {
                Command::Subscribe { channel, .. }
                | Command::Unsubscribe { channel }
                | Command::Presence { channel, .. }
                | Command::PresenceStats { channel }
                | Command::History { channel, .. } => client_check_name(channel),
                Command::Publish { channel, event, data: payload } => {
                    client_check_name(channel);
                    client_check_name(event);
                    assert!(validate(payload.get().as_bytes()).is_ok(), "publish data is not one JSON value");
                }
                Command::Connect { token } => assert!(token.len() <= data.len()),
                Command::Rpc { method, data: payload } => {
                    client_check_name(method);
                    if let Some(payload) = payload {
                        assert!(validate(payload.get().as_bytes()).is_ok(), "rpc data is not one JSON value");
                    }
                }
                Command::Ping | Command::Ack { .. } | Command::Disconnect => {}
            }
            let mut out = Vec::new();
            write_ok(&mut out, request.id.as_ref(), |o| {
                o.u64("offset", 1);
            });
            client_check_reply(&out);
        }
        Err(error) => {
            if let Some(id) = &error.id {
                client_check_id(id, data);
            }
            let mut out = Vec::new();
            write_error(&mut out, &error);
            let reply = client_check_reply(&out);
            assert_eq!(reply["error"]["code"], error.code.as_str());
        }
    }
}

// ---------------------------------------------------------------------------
// admin_frames

/// Reads fields from `payload` as `program` says (3 bits a field); checks
/// every read takes what its type says and `finish` agrees with the count.
fn admin_read_fields(payload: &[u8], mut program: u64) {
    let mut reader = Reader::new(payload);
    let mut used = 0usize;
    for _ in 0..21 {
        let op = program & 7;
        program >>= 3;
        let step = match op {
            0 => reader.u8("u8").map(|_| 1),
            1 => reader.u16("u16").map(|_| 2),
            2 => reader.u32("u32").map(|_| 4),
            3 => reader.u64("u64").map(|_| 8),
            4 | 5 => reader.str16("str16").map(|s| 2 + s.len()),
            6 => reader.bytes32("bytes32").map(|b| 4 + b.len()),
            _ => break,
        };
        match step {
            Ok(step) => {
                used += step;
                assert!(used <= payload.len(), "read {used} of {} bytes", payload.len());
            }
            Err(error) => {
                assert!(!error.message.is_empty());
                return;
            }
        }
    }
    let finished = reader.finish();
    assert_eq!(finished.is_ok(), used == payload.len(), "finish after {used} of {} bytes", payload.len());
}

/// `proto::admin::split_frame` in a loop over a stream, `Reader` over each
/// payload, and the admin client's reply decoders.
///
/// Input: byte 0 picks `admin_frame_bytes_max`, the rest is the stream; the
/// fields read from a payload follow the frame's own head bytes.
///
/// Invariants: a frame uses at least its 10-byte head, at most the input
/// and the limit; the payload is the frame minus its head; only a length
/// within the limit is ever "incomplete"; `FrameWriter` rebuilds the frame
/// byte for byte; reads take exactly their size.
pub fn admin_frames(data: &[u8]) {
    let Some((&selector, mut input)) = data.split_first() else { return };
    let frame_bytes_max = [6, 16, 64, 1024, 1 << 20][usize::from(selector % 5)];
    loop {
        match split_frame(input, frame_bytes_max) {
            Ok(Some((frame, used))) => {
                assert!(used >= LENGTH_BYTES + FRAME_HEAD_BYTES && used <= input.len(), "used {used}");
                assert!(used - LENGTH_BYTES <= frame_bytes_max);
                assert_eq!(frame.payload, &input[LENGTH_BYTES + FRAME_HEAD_BYTES..used]);

                let mut writer = FrameWriter::new(frame.first, frame.second, frame.request_id);
                for &byte in frame.payload {
                    writer.u8(byte);
                }
                assert_eq!(writer.finish(), &input[..used], "FrameWriter does not rebuild the frame");

                let program = u64::from(frame.first) << 40 | u64::from(frame.request_id) << 8 | u64::from(frame.second);
                admin_read_fields(frame.payload, program);
                admin_read_fields(frame.payload, program.reverse_bits());

                assert!(!decode_error(frame.payload).code.as_str().is_empty());
                let _ = decode_published(frame.payload);
                let _ = json_payload(frame.payload);
                input = &input[used..];
            }
            Ok(None) => {
                if input.len() >= LENGTH_BYTES {
                    let length = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
                    assert!(length <= frame_bytes_max && input.len() < LENGTH_BYTES + length);
                }
                return;
            }
            Err(error) => {
                assert!(!error.0.is_empty());
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// json_data

/// `proto::json::validate` (publication data) and `single_line` (SSE).
///
/// Invariants: `single_line` keeps the length and leaves no CR or LF, and
/// changes nothing without them; valid input stays valid after it, and
/// reads as the same `Value` wherever serde_json can build one; what
/// serde_json reads as one `Value` passes `validate`; for such a value,
/// `nested_deeper_than` measures exactly the value's nesting depth.
pub fn json_data(data: &[u8]) {
    let valid = validate(data);
    let flat = single_line(data);
    assert_eq!(flat.len(), data.len());
    assert!(!flat.iter().any(|&b| b == b'\n' || b == b'\r'), "single_line left a line break");
    if !data.contains(&b'\n') && !data.contains(&b'\r') {
        assert_eq!(&*flat, data);
    }
    match valid {
        Ok(()) => {
            assert!(validate(&flat).is_ok(), "single_line made valid JSON invalid");
            match (serde_json::from_slice::<Value>(data), serde_json::from_slice::<Value>(&flat)) {
                (Ok(before), Ok(after)) => {
                    assert_eq!(before, after, "single_line changed the value");
                    let depth = value_depth(&before);
                    assert!(!nested_deeper_than(data, depth), "depth {depth} measured deeper");
                    assert!(depth == 0 || nested_deeper_than(data, depth - 1), "depth {depth} measured shallower");
                }
                (Err(_), Err(_)) => {}
                (before, after) => panic!("Value parse differs: {before:?} vs {after:?}"),
            }
        }
        Err(message) => {
            assert!(message.len() <= 120);
            assert!(serde_json::from_slice::<Value>(data).is_err(), "validate refused a value serde_json reads");
        }
    }
}

/// Nesting depth of a parsed value (serde_json caps parsing at 128 levels).
fn value_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// token

pub const TOKEN_SECRET: &str = "fuzz-secret-0123456789";
pub const TOKEN_PREVIOUS: &str = "fuzz-previous-secret";

/// HS256-signs arbitrary header and claims bytes.
pub fn token_sign(secret: &str, header: &[u8], claims: &[u8]) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed = format!("{}.{}", engine.encode(header), engine.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", engine.encode(mac.finalize().into_bytes()))
}

/// `auth::Verifier::verify` with a fixed current and previous secret.
///
/// Input: byte 0 = mode and clock; the rest = the token (raw mode), or the
/// claims JSON that this function signs itself (bit 0 set; bit 1: header
/// bytes come first, up to a NUL; bit 7: sign with the previous secret) so
/// the claim checks behind the signature are reached.
///
/// Invariants: an identity has a valid subject, is not expired at the
/// clock it was verified at, has at most 256 grants and grants its own
/// names; verification is deterministic; another secret refuses the token.
pub fn token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let now_s: u64 = [0, 1_000, 1_700_000_000, 4_102_444_800, u64::MAX][usize::from((mode >> 2) & 0x1f) % 5];
    let token = if mode & 1 == 1 {
        let (header, claims) = if mode & 2 == 2 {
            let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            (&rest[..split], rest.get(split + 1..).unwrap_or(&[]))
        } else {
            (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest)
        };
        token_sign(if mode & 0x80 == 0 { TOKEN_SECRET } else { TOKEN_PREVIOUS }, header, claims)
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };

    let verifier = Verifier::new(Some(TOKEN_SECRET), Some(TOKEN_PREVIOUS));
    let result = verifier.verify(&token, now_s);
    assert_eq!(result, verifier.verify(&token, now_s), "verify is not deterministic");
    match &result {
        Ok(identity) => {
            assert!(!identity.user.is_empty() && identity.user.len() <= USER_ID_BYTES_MAX);
            assert!(identity.user.bytes().all(name_byte_allowed), "subject {:?}", identity.user);
            assert!(identity.expires_at_s.is_none_or(|exp| now_s < exp), "an expired token was accepted");
            assert!(identity.grants.len() + identity.grant_prefixes.len() <= GRANTS_MAX);
            for grant in identity.grants.iter() {
                assert!(identity.grants(grant));
            }
            let other = Verifier::new(Some("some-other-secret-entirely"), None);
            assert!(other.verify(&token, now_s).is_err(), "verified under a secret it was not signed with");
        }
        Err(error) => assert!(!error.message().is_empty()),
    }
    let _ = Verifier::new(None, None).verify(&token, now_s);
}

// ---------------------------------------------------------------------------
// session_ids

/// `session_id::parse_session_id` (`s{shard}.{key}.{generation}.{secret}`)
/// and `parse_event_id` (`SESSION:SEQ` from `Last-Event-ID`).
///
/// Invariants: an accepted session id has the documented shape and its
/// parts round-trip through `make_session_id`; an event id splits at its
/// last colon and round-trips through its own format.
pub fn session_ids(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some((shard, key, generation)) = parse_session_id(&text) {
        assert!(text.starts_with('s'));
        let secret_hex = text.rsplit('.').next().unwrap_or_default();
        assert_eq!(secret_hex.len(), 32);
        assert!(secret_hex.bytes().all(|b| b.is_ascii_hexdigit()));
        let mut secret = [0u8; 16];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&secret_hex[2 * i..2 * i + 2], 16).expect("hex digit");
        }
        let rebuilt = make_session_id(shard, key, generation, &secret);
        assert_eq!(parse_session_id(&rebuilt), Some((shard, key, generation)));
    }
    if let Some((session, seq)) = parse_event_id(&text) {
        assert_eq!(&text[..session.len()], session);
        assert_eq!(text.as_bytes()[session.len()], b':');
        assert!(!text[session.len() + 1..].contains(':'));
        let again = format!("{session}:{seq}");
        assert_eq!(parse_event_id(&again), Some((session, seq)));
    }
}

// ---------------------------------------------------------------------------
// sockjs

/// SockJS client payloads (`sockjs::decode_messages`), SockJS URLs
/// (`sockjs::route`), the Jii-comet parser, and the frames the server
/// writes back (`write_messages`, `write_wrapped`).
///
/// Input: what a client sent (a payload, a path, a Jii line).
///
/// Invariants: nothing panics; at most the allowed number of messages
/// decode; the server's own frame of decoded messages decodes again to as
/// many messages, and a second round trip changes nothing (the first may
/// pair an unpaired high surrogate with the low one after it); the escaped
/// frame holds no raw control character, and inside htmlfile's script no
/// `<` at all.
pub fn sockjs(data: &[u8]) {
    use kometa_protocol::sockjs::{decode_messages, route, write_messages, write_wrapped, Transport};
    const MESSAGES_MAX: usize = 64;
    let text = String::from_utf8_lossy(data);
    let _ = route(&text);
    let _ = kometa_protocol::jii::parse(&text);
    let Ok(messages) = decode_messages(data, MESSAGES_MAX) else { return };
    assert!(messages.len() <= MESSAGES_MAX);
    let frame_of = |messages: &[Vec<u8>]| {
        let mut frame = Vec::new();
        write_messages(&mut frame, messages.iter().map(Vec::as_slice));
        frame
    };
    let frame = frame_of(&messages);
    assert!(!frame.iter().any(|&b| b < 0x20), "raw control character in {frame:?}");
    let again = decode_messages(&frame[1..], MESSAGES_MAX).expect("the server's own frame decodes");
    assert_eq!(again.len(), messages.len());
    let twice = decode_messages(&frame_of(&again)[1..], MESSAGES_MAX).expect("decodes");
    assert_eq!(twice, again);
    let mut script = Vec::new();
    write_wrapped(&mut script, Transport::HtmlFile, "", &frame);
    let inside = &script[b"<script>\np(".len()..script.len() - b");\n</script>\r\n".len()];
    assert!(!inside.contains(&b'<'), "htmlfile must escape <");
}
