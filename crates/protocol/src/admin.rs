//! Admin protocol v1: length-prefixed binary frames between a backend and
//! the server. Byte layouts are in `docs/admin-protocol.md`.
//!
//! ```text
//! request: length:u32 | opcode:u8 | flags:u8 | request_id:u32 | payload
//! reply:   length:u32 | status:u8 | opcode:u8 | request_id:u32 | payload
//! ```
//! All integers are big-endian; `length` counts the bytes after itself.
//! Strings are `u16 length + UTF-8`, blobs `u32 length + bytes`.

use std::fmt;

/// Bytes of a frame after the length field, before the payload.
pub const FRAME_HEAD_BYTES: usize = 6;
/// The length field itself.
pub const LENGTH_BYTES: usize = 4;

pub mod opcode {
    pub const AUTH: u8 = 0x01;
    pub const PUBLISH: u8 = 0x02;
    pub const STATS: u8 = 0x03;
    pub const SEND_USER: u8 = 0x04;
    pub const PRESENCE: u8 = 0x05;
    pub const PRESENCE_STATS: u8 = 0x06;
    pub const USER_STATUS: u8 = 0x07;
    pub const CHANNEL_INFO: u8 = 0x08;
    pub const CHANNELS: u8 = 0x09;
    pub const HISTORY: u8 = 0x0A;
    pub const DISCONNECT: u8 = 0x0B;
    pub const PING: u8 = 0x0C;
    pub const PUBLISH_MANY: u8 = 0x0D;
    pub const RELOAD: u8 = 0x0E;
    /// Registers the connection as the handler of client `rpc` methods by
    /// prefix; the server then sends it CALL frames.
    pub const HANDLE: u8 = 0x0F;
    /// The handler's answer to one CALL.
    pub const ANSWER: u8 = 0x10;
}

/// STATS's optional `scope:u8`: absent or CLUSTER, every node's figures in
/// cluster mode; NODE, only this node's (a per-node health probe that asks
/// nothing of Redis or the other nodes).
pub mod stats_scope {
    pub const CLUSTER: u8 = 0;
    pub const NODE: u8 = 1;
}

pub const STATUS_OK: u8 = 0;
pub const STATUS_ERROR: u8 = 1;
/// Not a reply: a call from the server to a handler connection (opcode
/// HANDLE; the request id is the call's id, answered with ANSWER).
pub const STATUS_CALL: u8 = 2;

/// Admin error codes, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be delimited (length below 6 or over
    /// `admin_frame_bytes_max`); the reply has opcode 0 and request id 0, and
    /// the server closes the connection after it.
    BadFrame = 1,
    UnknownOpcode = 2,
    /// A payload field is missing, malformed, or out of range.
    BadArgument = 3,
    /// The TCP admin listener needs AUTH with the right key first.
    Unauthorized = 4,
    /// The server is shedding load (a bus queue is over its high-water mark); retry.
    Overloaded = 5,
    /// Data over `publication_data_bytes_max` (a frame over
    /// `admin_frame_bytes_max` cannot be delimited: that is `BadFrame`).
    TooLarge = 6,
    NotFound = 7,
    /// A user's inbox is full; the message was not stored for that user.
    InboxFull = 8,
    ShuttingDown = 9,
    Internal = 10,
    /// A server-wide limit was reached (for example `channels_max`).
    LimitReached = 11,
    /// Cluster mode: the Redis this request needs is unreachable. Nothing was
    /// done (a publication was not accepted); retry.
    Unavailable = 12,
    /// Cluster mode: Redis went away with the request in flight: it may or
    /// may not have been carried out (a publication retried may then be
    /// published twice).
    UnknownOutcome = 13,
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::UnknownOpcode,
            3 => ErrorCode::BadArgument,
            4 => ErrorCode::Unauthorized,
            5 => ErrorCode::Overloaded,
            6 => ErrorCode::TooLarge,
            7 => ErrorCode::NotFound,
            8 => ErrorCode::InboxFull,
            9 => ErrorCode::ShuttingDown,
            10 => ErrorCode::Internal,
            11 => ErrorCode::LimitReached,
            12 => ErrorCode::Unavailable,
            13 => ErrorCode::UnknownOutcome,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOpcode => "unknown_opcode",
            ErrorCode::BadArgument => "bad_argument",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InboxFull => "inbox_full",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownOutcome => "unknown_outcome",
        }
    }
}

/// An error reply: code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub code: ErrorCode,
    pub message: String,
}

impl AdminError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AdminError { code, message: message.into() }
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for AdminError {}

/// A frame whose boundaries are known; the payload is not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Request: opcode. Reply: status.
    pub first: u8,
    /// Request: flags. Reply: opcode.
    pub second: u8,
    pub request_id: u32,
    pub payload: &'a [u8],
}

/// Framing is broken: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError(pub String);

/// Splits one frame off the front of `input`. Returns the frame and the
/// bytes it used, `Ok(None)` if more bytes are needed, or a framing error
/// when the length field is impossible (shorter than a head, longer than
/// `frame_bytes_max`).
pub fn split_frame(input: &[u8], frame_bytes_max: usize) -> Result<Option<(RawFrame<'_>, usize)>, FramingError> {
    if input.len() < LENGTH_BYTES {
        return Ok(None);
    }
    let length = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
    if length < FRAME_HEAD_BYTES {
        return Err(FramingError(format!("frame length {length} is shorter than the {FRAME_HEAD_BYTES}-byte head")));
    }
    if length > frame_bytes_max {
        return Err(FramingError(format!("frame length {length} exceeds admin_frame_bytes_max {frame_bytes_max}")));
    }
    let total = LENGTH_BYTES + length;
    if input.len() < total {
        return Ok(None);
    }
    let body = &input[LENGTH_BYTES..total];
    let frame = RawFrame {
        first: body[0],
        second: body[1],
        request_id: u32::from_be_bytes([body[2], body[3], body[4], body[5]]),
        payload: &body[FRAME_HEAD_BYTES..],
    };
    Ok(Some((frame, total)))
}

/// Reads payload fields in order; every read checks bounds.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], AdminError> {
        if self.bytes.len() < count {
            return Err(AdminError::new(ErrorCode::BadArgument, format!("payload ends inside {what}")));
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, AdminError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, AdminError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, AdminError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, AdminError> {
        let b = self.take(8, what)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        Ok(u64::from_be_bytes(word))
    }

    /// A `u16`-length-prefixed UTF-8 string.
    pub fn str16(&mut self, what: &str) -> Result<&'a str, AdminError> {
        let length = self.u16(what)? as usize;
        let bytes = self.take(length, what)?;
        std::str::from_utf8(bytes)
            .map_err(|_| AdminError::new(ErrorCode::BadArgument, format!("{what} is not valid UTF-8")))
    }

    /// A `u32`-length-prefixed blob.
    pub fn bytes32(&mut self, what: &str) -> Result<&'a [u8], AdminError> {
        let length = self.u32(what)? as usize;
        self.take(length, what)
    }

    /// Nothing left to read (for optional trailing fields).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Fails if bytes are left over: a client and server disagreeing on a
    /// layout is better caught than silently ignored.
    pub fn finish(self) -> Result<(), AdminError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(AdminError::new(
                ErrorCode::BadArgument,
                format!("{} unexpected trailing payload bytes", self.bytes.len()),
            ))
        }
    }
}

/// Builds a frame: reserves the length, lets the caller append the payload,
/// then patches the length.
pub struct FrameWriter {
    buffer: Vec<u8>,
}

impl FrameWriter {
    pub fn new(first: u8, second: u8, request_id: u32) -> Self {
        let mut buffer = Vec::with_capacity(64);
        buffer.extend_from_slice(&[0; LENGTH_BYTES]);
        buffer.push(first);
        buffer.push(second);
        buffer.extend_from_slice(&request_id.to_be_bytes());
        FrameWriter { buffer }
    }

    pub fn request(opcode: u8, request_id: u32) -> Self {
        FrameWriter::new(opcode, 0, request_id)
    }

    pub fn ok(opcode: u8, request_id: u32) -> Self {
        FrameWriter::new(STATUS_OK, opcode, request_id)
    }

    /// A CALL frame to a handler connection; its payload follows.
    pub fn call(call_id: u32) -> Self {
        FrameWriter::new(STATUS_CALL, opcode::HANDLE, call_id)
    }

    pub fn error(opcode: u8, request_id: u32, error: &AdminError) -> Vec<u8> {
        let mut writer = FrameWriter::new(STATUS_ERROR, opcode, request_id);
        writer.u16(error.code as u16);
        writer.str16(&error.message);
        writer.finish()
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.buffer.push(value);
        self
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.buffer.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.buffer.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.buffer.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Writes a string, cut at a character boundary to fit `u16::MAX` bytes.
    pub fn str16(&mut self, value: &str) -> &mut Self {
        let mut cut = value.len().min(u16::MAX as usize);
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        self.u16(cut as u16);
        self.buffer.extend_from_slice(&value.as_bytes()[..cut]);
        self
    }

    pub fn bytes32(&mut self, value: &[u8]) -> &mut Self {
        debug_assert!(value.len() <= u32::MAX as usize);
        self.u32(value.len() as u32);
        self.buffer.extend_from_slice(value);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let length = (self.buffer.len() - LENGTH_BYTES) as u32;
        self.buffer[..LENGTH_BYTES].copy_from_slice(&length.to_be_bytes());
        self.buffer
    }
}

/// Decodes the payload of an error reply.
pub fn decode_error(payload: &[u8]) -> AdminError {
    let mut reader = Reader::new(payload);
    let code = reader.u16("error code").ok().and_then(ErrorCode::from_u16).unwrap_or(ErrorCode::Internal);
    let message = reader.str16("error message").unwrap_or("(unreadable error message)").to_string();
    AdminError { code, message }
}

/// What a `PUBLISH` reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub subscribers: u64,
    pub epoch: String,
}

/// Decodes a PUBLISH OK payload.
pub fn decode_published(payload: &[u8]) -> Result<Published, AdminError> {
    let mut reader = Reader::new(payload);
    let offset = reader.u64("offset")?;
    let subscribers = reader.u64("subscribers")?;
    let epoch = reader.str16("epoch")?.to_string();
    reader.finish()?;
    Ok(Published { offset, subscribers, epoch })
}

/// Decodes an OK payload that is one `bytes32` JSON document.
pub fn json_payload(payload: &[u8]) -> Result<serde_json::Value, AdminError> {
    let mut reader = Reader::new(payload);
    let document = reader.bytes32("document")?;
    reader.finish()?;
    serde_json::from_slice(document)
        .map_err(|e| AdminError::new(ErrorCode::BadArgument, format!("reply is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frame_round_trip() {
        let mut writer = FrameWriter::request(opcode::PUBLISH, 7);
        writer.str16("news").str16("update").bytes32(b"{\"a\":1}");
        let frame = writer.finish();
        // Hex of the documented example in docs/admin-protocol.md.
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0000001f02000000000700046e6577730006757064617465000000077b2261223a317d");
        let (raw, used) = split_frame(&frame, 1024).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!((raw.first, raw.second, raw.request_id), (opcode::PUBLISH, 0, 7));
        let mut reader = Reader::new(raw.payload);
        assert_eq!(reader.str16("channel").unwrap(), "news");
        assert_eq!(reader.str16("event").unwrap(), "update");
        assert_eq!(reader.bytes32("data").unwrap(), b"{\"a\":1}");
        reader.finish().unwrap();
    }

    #[test]
    fn documented_reply_examples() {
        // docs/admin-protocol.md, "Worked example".
        let mut writer = FrameWriter::ok(opcode::PUBLISH, 7);
        writer.u64(1).u64(3).str16("9f86d081884c7d65");
        let hex: String = writer.finish().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0000002800020000000700000000000000010000000000000003001039663836643038313838346337643635");
        let error = FrameWriter::error(opcode::PUBLISH, 8, &AdminError::new(ErrorCode::Overloaded, "busy"));
        let hex: String = error.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0000000e0102000000080005000462757379");
    }

    #[test]
    fn partial_and_broken_framing() {
        let frame = FrameWriter::request(opcode::STATS, 1).finish();
        for cut in 0..frame.len() {
            assert!(split_frame(&frame[..cut], 1024).unwrap().is_none());
        }
        assert!(split_frame(&[0, 0, 0, 2, 1, 1], 1024).is_err());
        assert!(split_frame(&[0, 0, 0x10, 0], 1024).is_err());
    }

    #[test]
    fn reader_rejects_truncated_and_trailing() {
        let mut reader = Reader::new(&[0, 5, b'a']);
        assert_eq!(reader.str16("channel").unwrap_err().code, ErrorCode::BadArgument);
        let reader = Reader::new(&[1]);
        assert_eq!(reader.finish().unwrap_err().code, ErrorCode::BadArgument);
        let mut reader = Reader::new(&[0, 2, 0xff, 0xfe]);
        assert_eq!(reader.str16("channel").unwrap_err().code, ErrorCode::BadArgument);
    }

    #[test]
    fn error_reply_round_trip() {
        let frame = FrameWriter::error(opcode::PUBLISH, 3, &AdminError::new(ErrorCode::Overloaded, "busy"));
        let (raw, _) = split_frame(&frame, 1024).unwrap().unwrap();
        assert_eq!((raw.first, raw.second, raw.request_id), (STATUS_ERROR, opcode::PUBLISH, 3));
        assert_eq!(decode_error(raw.payload), AdminError::new(ErrorCode::Overloaded, "busy"));
    }
}
