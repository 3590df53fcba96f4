//! WebSocket (RFC 6455): upgrade validation, frame decoding with message
//! assembly, and server frame encoding.
//!
//! Frame headers are parsed and formatted with tungstenite's `FrameHeader`;
//! everything around them (limits, fragmentation, UTF-8, close codes) is
//! here, because tungstenite's own buffers would cost 128 KiB per
//! connection. The decoder unmasks payloads in place in the caller's buffer
//! and only copies bytes when a message is fragmented.

use std::io::Cursor;

use base64::Engine as _;
use sha1::Digest as _;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::http::{Method, Request};

/// Longest frame header: 2 + 8 (length) + 4 (mask).
pub const HEADER_BYTES_MAX: usize = 14;
/// Longest server frame header (no mask).
pub const SERVER_HEADER_BYTES_MAX: usize = 10;
/// RFC 6455 §5.5: control frames carry at most 125 payload bytes.
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The subprotocol name clients may offer; echoed when offered.
pub const SUBPROTOCOL: &str = "kometa.v1";

/// Close codes the server sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Application codes (4000-4999), documented in docs/client-protocol.md.
    pub const INVALID_TOKEN: u16 = 4001;
    pub const TOKEN_EXPIRED: u16 = 4002;
    pub const DISCONNECTED_BY_SERVER: u16 = 4003;
    pub const PING_TIMEOUT: u16 = 4004;
    /// The user has `limits.connections_per_user_max` connections already.
    pub const TOO_MANY_CONNECTIONS: u16 = 4005;
    pub const SLOW_CONSUMER: u16 = 1008;
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4; the
/// Autobahn suite treats 1012-1014 as not allowed from a peer, and browsers
/// cannot send them either).
pub fn close_code_allowed_from_peer(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

// ---------------------------------------------------------------------------
// Handshake

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(key);
    hasher.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
}

/// A valid key is the base64 encoding of 16 bytes (24 characters).
fn key_is_valid(key: &[u8]) -> bool {
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|decoded| decoded.len() == 16)
}

/// Why an upgrade request was refused: the status, a reason for the body and
/// any headers the status calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRefusal {
    pub status: u16,
    pub reason: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
}

/// What a valid upgrade request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub accept: String,
    /// Our subprotocol, when the client offered it.
    pub protocol: Option<&'static str>,
}

/// Validates an upgrade request (RFC 6455 §4.2.1). `allowed_origins` empty
/// means any origin; otherwise an `Origin` header must match one exactly,
/// and a request without one (not from a browser: browsers always send it
/// on upgrades) passes only with `allow_missing_origin`.
pub fn check_upgrade(
    request: &Request<'_>,
    allowed_origins: &[String],
    allow_missing_origin: bool,
) -> Result<Upgrade, UpgradeRefusal> {
    if request.method != Method::Get {
        return Err(UpgradeRefusal {
            status: 405,
            reason: "WebSocket upgrades must use GET",
            headers: &[("Allow", "GET")],
        });
    }
    if request.minor_version < 1 {
        return Err(UpgradeRefusal { status: 400, reason: "WebSocket requires HTTP/1.1", headers: &[] });
    }
    if !request.upgrade_websocket {
        return Err(UpgradeRefusal {
            status: 426,
            reason: "this endpoint requires a WebSocket upgrade (Upgrade: websocket)",
            headers: &[("Upgrade", "websocket")],
        });
    }
    if !request.connection_upgrade {
        return Err(UpgradeRefusal {
            status: 400,
            reason: "the Connection header must contain the Upgrade token",
            headers: &[],
        });
    }
    if request.ws_version != Some(b"13") {
        return Err(UpgradeRefusal {
            status: 426,
            reason: "unsupported WebSocket version; only 13 is supported",
            headers: &[("Sec-WebSocket-Version", "13")],
        });
    }
    let key = match request.ws_key {
        Some(key) if key_is_valid(key) => key,
        Some(_) => {
            return Err(UpgradeRefusal {
                status: 400,
                reason: "Sec-WebSocket-Key must be 16 bytes in base64",
                headers: &[],
            })
        }
        None => return Err(UpgradeRefusal { status: 400, reason: "missing Sec-WebSocket-Key", headers: &[] }),
    };
    if !allowed_origins.is_empty() {
        let allowed = match request.origin {
            Some(origin) => allowed_origins.iter().any(|o| o == origin),
            None => allow_missing_origin,
        };
        if !allowed {
            let reason = if request.origin.is_some() { "origin not allowed" } else { "an Origin header is required" };
            return Err(UpgradeRefusal { status: 403, reason, headers: &[] });
        }
    }
    let protocol = request
        .ws_protocols
        .and_then(|offers| offers.split(',').map(str::trim).any(|offer| offer == SUBPROTOCOL).then_some(SUBPROTOCOL));
    // Extensions (permessage-deflate) are declined by not echoing them.
    Ok(Upgrade { accept: accept_key(key), protocol })
}

/// Appends the `101 Switching Protocols` response.
pub fn write_upgrade_response(out: &mut Vec<u8>, upgrade: &Upgrade) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(upgrade.accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = upgrade.protocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(protocol.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------
// Masking

/// XORs `payload` with `mask`, as if `payload` started `offset` bytes into the
/// masked data. Works a word at a time; any alignment and length.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut mask = mask;
    mask.rotate_left(offset % 4);
    let mask_word = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let value = u64::from_ne_bytes(word) ^ mask_word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

// ---------------------------------------------------------------------------
// Decoding

/// A violation that ends the connection with `code`; `reason` goes into the
/// close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn new(code: u16, reason: &'static str) -> Self {
        Violation { code, reason }
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest message (sum of its fragments) accepted; larger ones close with 1009.
    pub message_bytes_max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// A fragmented message being assembled. Exists only between the first and
/// the final fragment.
#[derive(Debug)]
pub struct Fragments {
    kind: MessageKind,
    payload: Vec<u8>,
    /// Bytes of `payload` known to be valid UTF-8 (text only). Validation is
    /// incremental so an invalid byte fails fast, not at the final fragment.
    utf8_valid_bytes: usize,
}

/// What one decoded frame means to the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message: UTF-8 validated for text.
    Message(MessageKind, Payload<'a>),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame: the code (None when the frame had no payload) and reason.
    Close(Option<u16>, &'a str),
}

/// A complete message payload: borrowed from the input when it arrived in one
/// frame, owned when it was assembled from fragments.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Assembled(Vec<u8>),
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Borrowed(bytes) => bytes,
            Payload::Assembled(bytes) => bytes,
        }
    }
}

/// One decoded frame: how many input bytes it used, and the event it
/// produced (`None` for a non-final fragment).
#[derive(Debug)]
pub struct Decoded<'a> {
    pub consumed: usize,
    pub event: Option<Event<'a>>,
}

/// Decodes the frame at the start of `input`, unmasking its payload in place.
///
/// `fragments` carries a fragmented message between calls; it is `None`
/// whenever no message is in progress. Returns `Ok(None)` when `input` holds
/// only part of a frame; at that point the frame's declared length has
/// already been checked, so the caller can buffer the rest safely.
pub fn decode_frame<'a>(
    input: &'a mut [u8],
    fragments: &mut Option<Box<Fragments>>,
    limits: DecodeLimits,
) -> Result<Option<Decoded<'a>>, Violation> {
    let mut cursor = Cursor::new(&*input);
    let (header, payload_len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(Violation::new(close::PROTOCOL_ERROR, "reserved opcode")),
    };
    let header_len = cursor.position() as usize;
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(Violation::new(close::PROTOCOL_ERROR, "reserved bits set without a negotiated extension"));
    }
    let Some(mask) = header.mask else {
        return Err(Violation::new(close::PROTOCOL_ERROR, "client frames must be masked"));
    };
    let is_control = matches!(header.opcode, OpCode::Control(_));
    if is_control {
        if payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
            return Err(Violation::new(close::PROTOCOL_ERROR, "control frame payload over 125 bytes"));
        }
        if !header.is_final {
            return Err(Violation::new(close::PROTOCOL_ERROR, "fragmented control frame"));
        }
    } else {
        let already = fragments.as_ref().map_or(0, |f| f.payload.len()) as u64;
        if payload_len.saturating_add(already) > limits.message_bytes_max as u64 {
            return Err(Violation::new(close::MESSAGE_TOO_BIG, "message too big"));
        }
    }
    // Checked above: control ≤ 125, data ≤ message_bytes_max (a usize).
    let payload_len = payload_len as usize;
    let frame_len = header_len + payload_len;
    if input.len() < frame_len {
        return Ok(None);
    }
    let payload = &mut input[header_len..frame_len];
    apply_mask(payload, mask, 0);
    let payload: &'a [u8] = payload;

    let event = match header.opcode {
        OpCode::Control(Control::Ping) => Some(Event::Ping(payload)),
        OpCode::Control(Control::Pong) => Some(Event::Pong(payload)),
        OpCode::Control(Control::Close) => Some(decode_close(payload)?),
        OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
            return Err(Violation::new(close::PROTOCOL_ERROR, "reserved opcode"));
        }
        OpCode::Data(Data::Continue) => {
            let Some(assembling) = fragments.as_mut() else {
                return Err(Violation::new(close::PROTOCOL_ERROR, "continuation frame without a message in progress"));
            };
            assembling.payload.extend_from_slice(payload);
            if assembling.kind == MessageKind::Text {
                check_utf8_incremental(assembling, header.is_final)?;
            }
            if header.is_final {
                let done = fragments.take().map(|f| (f.kind, f.payload));
                done.map(|(kind, payload)| Event::Message(kind, Payload::Assembled(payload)))
            } else {
                None
            }
        }
        OpCode::Data(data) => {
            if fragments.is_some() {
                return Err(Violation::new(
                    close::PROTOCOL_ERROR,
                    "new data frame while a fragmented message is in progress",
                ));
            }
            let kind = if data == Data::Text { MessageKind::Text } else { MessageKind::Binary };
            if header.is_final {
                if kind == MessageKind::Text && std::str::from_utf8(payload).is_err() {
                    return Err(Violation::new(close::INVALID_PAYLOAD, "text message is not valid UTF-8"));
                }
                Some(Event::Message(kind, Payload::Borrowed(payload)))
            } else {
                let mut assembling = Box::new(Fragments { kind, payload: payload.to_vec(), utf8_valid_bytes: 0 });
                if kind == MessageKind::Text {
                    check_utf8_incremental(&mut assembling, false)?;
                }
                *fragments = Some(assembling);
                None
            }
        }
    };
    Ok(Some(Decoded { consumed: frame_len, event }))
}

/// Validates the not-yet-validated tail of a text message being assembled.
/// A sequence cut at the end of a non-final fragment is fine; an invalid
/// byte anywhere, or a cut sequence at the end of the message, is not.
fn check_utf8_incremental(fragments: &mut Fragments, is_final: bool) -> Result<(), Violation> {
    let tail = &fragments.payload[fragments.utf8_valid_bytes..];
    match std::str::from_utf8(tail) {
        Ok(_) => {
            fragments.utf8_valid_bytes = fragments.payload.len();
            Ok(())
        }
        Err(error) if error.error_len().is_none() && !is_final => {
            fragments.utf8_valid_bytes += error.valid_up_to();
            Ok(())
        }
        Err(_) => Err(Violation::new(close::INVALID_PAYLOAD, "text message is not valid UTF-8")),
    }
}

fn decode_close(payload: &[u8]) -> Result<Event<'_>, Violation> {
    match payload.len() {
        0 => Ok(Event::Close(None, "")),
        1 => Err(Violation::new(close::PROTOCOL_ERROR, "close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed_from_peer(code) {
                return Err(Violation::new(close::PROTOCOL_ERROR, "invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| Violation::new(close::INVALID_PAYLOAD, "close reason is not valid UTF-8"))?;
            Ok(Event::Close(Some(code), reason))
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding

pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

fn opcode(code: u8) -> OpCode {
    OpCode::from(code)
}

/// Writes an unmasked, final frame header for `payload_len` bytes into `out`
/// and returns its length (2, 4 or 10).
pub fn encode_header(code: u8, payload_len: usize, out: &mut [u8; SERVER_HEADER_BYTES_MAX]) -> usize {
    let header =
        FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode: opcode(code), mask: None };
    let header_len = header.len(payload_len as u64);
    let mut cursor = Cursor::new(&mut out[..]);
    // A 10-byte buffer always holds an unmasked header.
    let formatted = header.format(payload_len as u64, &mut cursor);
    debug_assert!(formatted.is_ok());
    header_len
}

/// A complete unmasked frame.
pub fn encode_frame(code: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; SERVER_HEADER_BYTES_MAX];
    let header_len = encode_header(code, payload.len(), &mut header);
    let mut frame = Vec::with_capacity(header_len + payload.len());
    frame.extend_from_slice(&header[..header_len]);
    frame.extend_from_slice(payload);
    frame
}

/// A close frame; the reason is cut at a character boundary to fit 123 bytes.
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(OPCODE_CLOSE, &payload)
}

/// A masked frame as a client sends it: `first_byte` carries FIN, RSV and
/// the opcode. For the load generator and tests.
pub fn encode_client_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let len = payload.len();
    let mut frame = Vec::with_capacity(HEADER_BYTES_MAX + len);
    frame.push(first_byte);
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    let start = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[start..], mask, 0);
    frame
}

/// Builds a text frame whose payload is written first and header last, so
/// the frame is one contiguous allocation without a copy: the payload goes
/// after `SERVER_HEADER_BYTES_MAX` bytes of headroom and `finish` writes the
/// header right in front of it.
pub struct FrameBuilder {
    buffer: Vec<u8>,
}

impl FrameBuilder {
    pub fn with_capacity(payload_capacity: usize) -> Self {
        let mut buffer = Vec::with_capacity(SERVER_HEADER_BYTES_MAX + payload_capacity);
        buffer.resize(SERVER_HEADER_BYTES_MAX, 0);
        FrameBuilder { buffer }
    }

    /// The payload so far; append to it.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Returns the buffer and the index where the frame starts.
    pub fn finish(mut self, code: u8) -> (Vec<u8>, usize) {
        let payload_len = self.buffer.len() - SERVER_HEADER_BYTES_MAX;
        let mut header = [0u8; SERVER_HEADER_BYTES_MAX];
        let header_len = encode_header(code, payload_len, &mut header);
        let start = SERVER_HEADER_BYTES_MAX - header_len;
        self.buffer[start..SERVER_HEADER_BYTES_MAX].copy_from_slice(&header[..header_len]);
        (self.buffer, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_head, HeadLimits};

    const LIMITS: DecodeLimits = DecodeLimits { message_bytes_max: 1 << 20 };

    fn client_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        encode_client_frame(first_byte, payload, mask)
    }

    fn decode_all(mut input: Vec<u8>) -> Result<Vec<String>, Violation> {
        let mut fragments = None;
        let mut events = Vec::new();
        let mut position = 0;
        while position < input.len() {
            match decode_frame(&mut input[position..], &mut fragments, LIMITS)? {
                Some(decoded) => {
                    if let Some(event) = decoded.event {
                        events.push(format!("{event:?}"));
                    }
                    position += decoded.consumed;
                }
                None => break,
            }
        }
        Ok(events)
    }

    #[test]
    fn rfc6455_accept_key_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn rfc6455_masked_hello_example() {
        // RFC 6455 §5.7: a single-frame masked text message containing "Hello".
        let mut frame = vec![0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut fragments = None;
        let decoded = decode_frame(&mut frame, &mut fragments, LIMITS).unwrap().unwrap();
        assert_eq!(decoded.consumed, 11);
        assert_eq!(decoded.event, Some(Event::Message(MessageKind::Text, Payload::Borrowed(b"Hello"))));
    }

    #[test]
    fn rfc6455_fragmented_example() {
        // RFC 6455 §5.7: "Hel" + "lo", here masked as clients must.
        let mut input = client_frame(0x01, b"Hel", [1, 2, 3, 4]);
        input.extend(client_frame(0x80, b"lo", [5, 6, 7, 8]));
        assert_eq!(
            decode_all(input).unwrap(),
            vec![format!("{:?}", Event::Message(MessageKind::Text, Payload::Assembled(b"Hello".to_vec())))]
        );
    }

    #[test]
    fn server_frames_match_rfc_examples() {
        // RFC 6455 §5.7: unmasked "Hello", unmasked ping, 256-byte and 64 KiB binary headers.
        assert_eq!(encode_frame(OPCODE_TEXT, b"Hello"), vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(encode_frame(OPCODE_PING, b"Hello")[..2], [0x89, 0x05]);
        assert_eq!(encode_frame(OPCODE_BINARY, &[0; 256])[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(
            encode_frame(OPCODE_BINARY, &[0; 65536])[..10],
            [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
        );
    }

    #[test]
    fn length_boundaries_125_126_65535_65536() {
        for len in [0usize, 1, 123, 124, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut frame = client_frame(0x82, &payload, [0xde, 0xad, 0xbe, 0xef]);
            let mut fragments = None;
            let decoded = decode_frame(&mut frame, &mut fragments, LIMITS).unwrap().unwrap();
            assert_eq!(
                decoded.event,
                Some(Event::Message(MessageKind::Binary, Payload::Borrowed(&payload))),
                "len {len}"
            );
            let (buffer, start) = {
                let mut builder = FrameBuilder::with_capacity(len);
                builder.payload().extend_from_slice(&payload);
                builder.finish(OPCODE_BINARY)
            };
            assert_eq!(&buffer[start..], &encode_frame(OPCODE_BINARY, &payload)[..], "len {len}");
        }
    }

    #[test]
    fn masking_every_alignment_and_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            for align in 0..8 {
                for offset in 0..4 {
                    let original: Vec<u8> = (0..len as u8).collect();
                    let mut storage = vec![0u8; align + len];
                    storage[align..].copy_from_slice(&original);
                    apply_mask(&mut storage[align..], mask, offset);
                    for (i, byte) in storage[align..].iter().enumerate() {
                        assert_eq!(*byte, original[i] ^ mask[(i + offset) % 4]);
                    }
                }
            }
        }
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let frame = client_frame(0x81, b"hello world", [9, 9, 9, 9]);
        for cut in 0..frame.len() {
            let mut partial = frame[..cut].to_vec();
            let mut fragments = None;
            assert!(decode_frame(&mut partial, &mut fragments, LIMITS).unwrap().is_none(), "cut {cut}");
        }
    }

    #[test]
    fn violations_have_rfc_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // Unmasked client frame.
            (vec![0x81, 0x02, b'h', b'i'], 1002),
            // RSV1 set.
            (client_frame(0xC1, b"hi", [1, 1, 1, 1]), 1002),
            // Reserved opcodes 3 and 0xB.
            (client_frame(0x83, b"", [1, 1, 1, 1]), 1002),
            (client_frame(0x8B, b"", [1, 1, 1, 1]), 1002),
            // Fragmented ping.
            (client_frame(0x09, b"", [1, 1, 1, 1]), 1002),
            // Ping over 125 bytes.
            (client_frame(0x89, &[0; 126], [1, 1, 1, 1]), 1002),
            // Continuation without a start.
            (client_frame(0x80, b"x", [1, 1, 1, 1]), 1002),
            // Invalid UTF-8.
            (
                client_frame(
                    0x81,
                    &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80],
                    [1, 2, 3, 4],
                ),
                1007,
            ),
            // Close with 1-byte payload, bad codes, bad reason.
            (client_frame(0x88, &[0x03], [1, 1, 1, 1]), 1002),
            (client_frame(0x88, &1005u16.to_be_bytes(), [1, 1, 1, 1]), 1002),
            (client_frame(0x88, &999u16.to_be_bytes(), [1, 1, 1, 1]), 1002),
            (client_frame(0x88, &[0x03, 0xe8, 0xff], [1, 1, 1, 1]), 1007),
        ];
        for (input, code) in cases {
            let error = decode_all(input.clone()).unwrap_err();
            assert_eq!(error.code, code, "{input:x?}: {}", error.reason);
        }
    }

    #[test]
    fn message_too_big_is_1009_before_payload_arrives() {
        let limits = DecodeLimits { message_bytes_max: 100 };
        // Header declares 1000 bytes; only the header is present.
        let frame = client_frame(0x82, &[0; 1000], [1, 2, 3, 4]);
        let mut header_only = frame[..8].to_vec();
        let error = decode_frame(&mut header_only, &mut None, limits).unwrap_err();
        assert_eq!(error.code, 1009);
        // Fragments summing past the limit.
        let mut first = client_frame(0x02, &[0; 60], [1, 2, 3, 4]);
        let mut fragments = None;
        decode_frame(&mut first, &mut fragments, limits).unwrap().unwrap();
        let mut second = client_frame(0x80, &[0; 60], [1, 2, 3, 4]);
        assert_eq!(decode_frame(&mut second, &mut fragments, limits).unwrap_err().code, 1009);
    }

    #[test]
    fn utf8_fails_fast_in_fragments_and_allows_split_sequences() {
        // "κ" (ce ba) split across fragments is fine.
        let mut input = client_frame(0x01, &[0xce], [1, 2, 3, 4]);
        input.extend(client_frame(0x80, &[0xba], [1, 2, 3, 4]));
        assert_eq!(decode_all(input).unwrap().len(), 1);
        // An invalid byte in the first fragment fails before the final one arrives.
        let mut first = client_frame(0x01, &[b'a', 0xff], [1, 2, 3, 4]);
        assert_eq!(decode_frame(&mut first, &mut None, LIMITS).unwrap_err().code, 1007);
        // A cut sequence at the end of the message fails.
        let mut input = client_frame(0x01, b"a", [1, 2, 3, 4]);
        input.extend(client_frame(0x80, &[0xce], [1, 2, 3, 4]));
        assert_eq!(decode_all(input).unwrap_err().code, 1007);
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let mut input = client_frame(0x01, b"ab", [1, 2, 3, 4]);
        input.extend(client_frame(0x89, b"p", [1, 2, 3, 4]));
        input.extend(client_frame(0x80, b"cd", [1, 2, 3, 4]));
        let events = decode_all(input).unwrap();
        assert_eq!(events.len(), 2);
        assert!(events[0].starts_with("Ping"));
        assert!(events[1].contains("Assembled"));
    }

    #[test]
    fn close_frames_decode() {
        let mut frame = client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e'], [1, 2, 3, 4]);
        let decoded = decode_frame(&mut frame, &mut None, LIMITS).unwrap().unwrap();
        assert_eq!(decoded.event, Some(Event::Close(Some(1000), "bye")));
        let mut empty = client_frame(0x88, &[], [1, 2, 3, 4]);
        let decoded = decode_frame(&mut empty, &mut None, LIMITS).unwrap().unwrap();
        assert_eq!(decoded.event, Some(Event::Close(None, "")));
        let frame = encode_close(1001, &"é".repeat(100));
        assert!(frame.len() <= 2 + 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn close_code_ranges() {
        for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
            assert!(close_code_allowed_from_peer(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!close_code_allowed_from_peer(code), "{code}");
        }
    }

    fn request(head: &str) -> Request<'_> {
        parse_head(head.as_bytes(), HeadLimits { head_bytes_max: 4096, headers_max: 32 }).unwrap().unwrap()
    }

    #[test]
    fn upgrade_validation() {
        let good = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: foo, kometa.v1\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
        let upgrade = check_upgrade(&request(good), &[], true).unwrap();
        assert_eq!(upgrade.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(upgrade.protocol, Some(SUBPROTOCOL));
        let mut out = Vec::new();
        write_upgrade_response(&mut out, &upgrade);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("deflate"));
        assert!(text.contains("Sec-WebSocket-Protocol: kometa.v1\r\n"));

        let refusal = |head: &str| check_upgrade(&request(head), &[], true).unwrap_err().status;
        assert_eq!(refusal("POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"), 405);
        assert_eq!(refusal("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), 426);
        assert_eq!(refusal("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"), 400);
        assert_eq!(refusal("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"), 426);
        assert_eq!(refusal("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n"), 400);
        assert_eq!(
            refusal(
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
            400
        );
        assert_eq!(refusal("GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"), 400);

        let origins = vec!["https://app.example".to_string()];
        let with_origin = good.replace("Host: x\r\n", "Host: x\r\nOrigin: https://evil.example\r\n");
        assert_eq!(check_upgrade(&request(&with_origin), &origins, true).unwrap_err().status, 403);
        let with_origin = good.replace("Host: x\r\n", "Host: x\r\nOrigin: https://app.example\r\n");
        assert!(check_upgrade(&request(&with_origin), &origins, false).is_ok());
        // Without Origin (a native app): as the setting says.
        assert!(check_upgrade(&request(good), &origins, true).is_ok());
        assert_eq!(check_upgrade(&request(good), &origins, false).unwrap_err().status, 403);
    }
}
