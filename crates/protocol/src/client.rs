//! Client protocol v1: JSON commands from browsers and the JSON the server
//! sends back (replies, errors). Documented in `docs/client-protocol.md`.
//!
//! Commands are decoded borrowing from the (already unmasked) message bytes;
//! `data` stays a raw JSON slice so a publication is re-emitted verbatim.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::json::ObjectWriter;

/// Longest accepted request id (a JSON string or integer), in bytes of JSON.
pub const REQUEST_ID_BYTES_MAX: usize = 66;
/// Longest accepted event name.
pub const EVENT_NAME_BYTES_MAX: usize = 64;

/// Every error code a client can receive, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not an object, a field of the wrong type, or a missing field.
    BadRequest,
    /// `op` is not one this server knows.
    UnknownOp,
    /// The channel's namespace does not allow this (publish, presence, history,
    /// private channel without a grant).
    Forbidden,
    /// Channel or event name empty, too long, or with characters outside the allowed set.
    BadChannel,
    /// `channels_per_connection_max` reached.
    TooManyChannels,
    AlreadySubscribed,
    NotSubscribed,
    /// Publication data over `publication_data_bytes_max`.
    MessageTooLarge,
    /// The server is shedding load; retry later.
    Overloaded,
    /// A token is needed, or the token was invalid.
    Unauthorized,
    TokenExpired,
    /// The channel's namespace has reached `subscribers_max`.
    ChannelFull,
    /// Too many channels exist on the server (`channels_max`).
    TooManyChannelsOnServer,
    /// Something that should not happen; the server logs it.
    Internal,
    /// The command is not available on this transport or in this state.
    NotAvailable,
    /// Cluster mode: the Redis this command needs is unreachable; retry later.
    Unavailable,
    /// Cluster mode: Redis went away with the publication in flight: it may
    /// or may not have been published.
    UnknownOutcome,
    /// RPC: the backend did not answer within `rpc.timeout_ms`.
    Timeout,
    /// RPC: the backend answered with an error (its code and message are
    /// passed on), or with something that is not an answer.
    BackendError,
    /// Too many commands or publications in a short time; retry later.
    RateLimited,
    /// The user has its maximum of connections (then close 4005).
    TooManyConnections,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::ChannelFull => "channel_full",
            ErrorCode::TooManyChannelsOnServer => "server_channel_limit",
            ErrorCode::Internal => "internal",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownOutcome => "unknown_outcome",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BackendError => "backend_error",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
        }
    }
}

/// A command that could not be carried out, with the id to echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    /// `backend_error`: the backend's own error code, passed on.
    pub backend_code: Option<i64>,
}

impl CommandError {
    pub fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        CommandError { id, code, message: message.into(), backend_code: None }
    }
}

/// A request id as the client wrote it (a JSON integer or string), kept as
/// JSON text so it is echoed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Box<str>);

impl RequestId {
    /// Accepts a JSON integer (non-negative) or string no longer than
    /// `REQUEST_ID_BYTES_MAX` bytes of JSON.
    pub fn from_json(raw: &RawValue) -> Option<RequestId> {
        let text = raw.get();
        if text.len() > REQUEST_ID_BYTES_MAX {
            return None;
        }
        let valid = match text.as_bytes().first() {
            // A real string: RawValue does not reject lone surrogate escapes,
            // which strict JSON parsers refuse in the echoed reply.
            Some(b'"') => serde_json::from_str::<String>(text).is_ok(),
            Some(b'0'..=b'9') => text.bytes().all(|b| b.is_ascii_digit()),
            _ => false,
        };
        valid.then(|| RequestId(text.into()))
    }

    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// A resume position: the channel's epoch and the last offset the client saw.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// A decoded client command.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        since: Option<Position>,
        /// Push the channel's presence counts when they change (throttled).
        presence_counts: bool,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        event: Cow<'a, str>,
        data: &'a RawValue,
    },
    Ping,
    /// Authenticate a connection opened without `?token=`.
    Connect {
        token: Cow<'a, str>,
    },
    /// One page of members, after `cursor` (the previous page's `next`).
    Presence {
        channel: Cow<'a, str>,
        cursor: Option<Cow<'a, str>>,
        limit: Option<u32>,
    },
    PresenceStats {
        channel: Cow<'a, str>,
    },
    History {
        channel: Cow<'a, str>,
        since: Option<Position>,
        limit: Option<u32>,
    },
    /// Acknowledge inbox messages up to and including `inbox`.
    Ack {
        inbox: u64,
    },
    /// End the connection or HTTP session now.
    Disconnect,
    /// Ask the backend: `method` routes it, `data` (any JSON, optional)
    /// goes along; the backend's answer is the reply.
    Rpc {
        method: Cow<'a, str>,
        data: Option<&'a RawValue>,
    },
}

/// A command with its optional id.
#[derive(Debug)]
pub struct Request<'a> {
    pub id: Option<RequestId>,
    pub command: Command<'a>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    since: Option<Position>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    inbox: Option<u64>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    cursor: Option<Cow<'a, str>>,
    #[serde(default)]
    presence_counts: Option<bool>,
}

/// Decodes one command from a text message.
pub fn decode(message: &[u8]) -> Result<Request<'_>, CommandError> {
    // serde would also take a JSON array as the struct's fields in order.
    if message.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(CommandError::new(None, ErrorCode::BadRequest, "a command must be a JSON object"));
    }
    let wire: Wire<'_> = serde_json::from_slice(message).map_err(|error| {
        CommandError::new(
            recover_id(message),
            ErrorCode::BadRequest,
            format!("invalid command: {}", short_error(&error)),
        )
    })?;
    let id = match wire.id {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(RequestId::from_json(raw).ok_or_else(|| {
            CommandError::new(None, ErrorCode::BadRequest, "id must be a non-negative integer or a short string")
        })?),
    };
    let missing =
        |field: &'static str| CommandError::new(id.clone(), ErrorCode::BadRequest, format!("missing field `{field}`"));
    let op = wire.op.as_deref().ok_or_else(|| missing("op"))?;
    let command = match op {
        "subscribe" => Command::Subscribe {
            channel: wire.channel.ok_or_else(|| missing("channel"))?,
            since: wire.since,
            presence_counts: wire.presence_counts.unwrap_or(false),
        },
        "unsubscribe" => Command::Unsubscribe { channel: wire.channel.ok_or_else(|| missing("channel"))? },
        "publish" => Command::Publish {
            channel: wire.channel.ok_or_else(|| missing("channel"))?,
            event: wire.event.unwrap_or(Cow::Borrowed("message")),
            data: wire.data.ok_or_else(|| missing("data"))?,
        },
        "ping" => Command::Ping,
        "connect" => Command::Connect { token: wire.token.ok_or_else(|| missing("token"))? },
        "presence" => Command::Presence {
            channel: wire.channel.ok_or_else(|| missing("channel"))?,
            cursor: wire.cursor,
            limit: wire.limit,
        },
        "presence_stats" => Command::PresenceStats { channel: wire.channel.ok_or_else(|| missing("channel"))? },
        "history" => Command::History {
            channel: wire.channel.ok_or_else(|| missing("channel"))?,
            since: wire.since,
            limit: wire.limit,
        },
        "ack" => Command::Ack { inbox: wire.inbox.ok_or_else(|| missing("inbox"))? },
        "disconnect" => Command::Disconnect,
        "rpc" => Command::Rpc { method: wire.method.ok_or_else(|| missing("method"))?, data: wire.data },
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(CommandError::new(id, ErrorCode::UnknownOp, format!("unknown op `{shown}`")));
        }
    };
    Ok(Request { id, command })
}

/// The id of a command that failed to decode (say, a field of the wrong
/// type), so the client can still match the error to its request.
fn recover_id(message: &[u8]) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
    }
    let id_only: IdOnly<'_> = serde_json::from_slice(message).ok()?;
    id_only.id.and_then(RequestId::from_json)
}

/// serde_json's message without the input echoed back at length.
fn short_error(error: &serde_json::Error) -> String {
    let mut text = error.to_string();
    text.truncate(120);
    text
}

/// Characters allowed in channel and event names: letters, digits and
/// `_ - . : @ / = #`. They never need JSON or URL escaping.
pub fn name_byte_allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=' | b'#')
}

/// Checks a channel name against the charset and `channel_name_bytes_max`.
pub fn check_channel_name(name: &str, channel_name_bytes_max: usize) -> Result<(), &'static str> {
    check_name(
        name,
        channel_name_bytes_max,
        [
            "channel name is empty",
            "channel name too long",
            "channel name may contain only letters, digits and _ - . : @ / = #",
        ],
    )
}

/// Checks an event name (same charset as channels, at most 64 bytes).
pub fn check_event_name(name: &str) -> Result<(), &'static str> {
    check_name(
        name,
        EVENT_NAME_BYTES_MAX,
        [
            "event name is empty",
            "event name too long",
            "event name may contain only letters, digits and _ - . : @ / = #",
        ],
    )
}

/// `reasons`: empty, too long, bad character.
fn check_name(name: &str, bytes_max: usize, reasons: [&'static str; 3]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err(reasons[0])
    } else if name.len() > bytes_max {
        Err(reasons[1])
    } else if !name.bytes().all(name_byte_allowed) {
        Err(reasons[2])
    } else {
        Ok(())
    }
}

/// Appends a success reply `{"id":…,"ok":true,…}`; `fields` adds the rest.
pub fn write_ok(out: &mut Vec<u8>, id: Option<&RequestId>, fields: impl FnOnce(&mut ObjectWriter<'_>)) {
    let mut object = ObjectWriter::new(out);
    if let Some(id) = id {
        object.raw("id", id.as_json().as_bytes());
    }
    object.bool("ok", true);
    fields(&mut object);
    object.finish();
}

/// Appends an error reply `{"id":…,"error":{"code":…,"message":…}}`.
pub fn write_error(out: &mut Vec<u8>, error: &CommandError) {
    let mut object = ObjectWriter::new(out);
    if let Some(id) = &error.id {
        object.raw("id", id.as_json().as_bytes());
    }
    let mut inner = Vec::with_capacity(64 + error.message.len());
    let mut error_object = ObjectWriter::new(&mut inner);
    error_object.str("code", error.code.as_str()).str("message", &error.message);
    if let Some(code) = error.backend_code {
        error_object.i64("backend_code", code);
    }
    error_object.finish();
    object.raw("error", &inner);
    object.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_op() {
        let request = decode(br#"{"op":"subscribe","channel":"news","id":1}"#).unwrap();
        assert_eq!(request.id.as_ref().map(RequestId::as_json), Some("1"));
        assert!(matches!(
            request.command,
            Command::Subscribe { ref channel, since: None, presence_counts: false } if channel == "news"
        ));
        let request = decode(br#"{"op":"subscribe","channel":"t","presence_counts":true}"#).unwrap();
        assert!(matches!(request.command, Command::Subscribe { presence_counts: true, .. }));
        let request = decode(br#"{"op":"presence","channel":"t","cursor":"u7","limit":2}"#).unwrap();
        assert!(matches!(
            request.command,
            Command::Presence { cursor: Some(ref cursor), limit: Some(2), .. } if cursor == "u7"
        ));

        let request = decode(br#"{"op":"subscribe","channel":"n","since":{"epoch":"ab","offset":7}}"#).unwrap();
        assert!(matches!(request.command, Command::Subscribe { since: Some(Position { offset: 7, .. }), .. }));

        let request =
            decode(br#"{"op":"publish","channel":"web_chat","event":"msg","data":{"t":"hi"},"id":"x-1"}"#).unwrap();
        assert_eq!(request.id.as_ref().map(RequestId::as_json), Some("\"x-1\""));
        match request.command {
            Command::Publish { channel, event, data } => {
                assert_eq!(channel, "web_chat");
                assert_eq!(event, "msg");
                assert_eq!(data.get(), r#"{"t":"hi"}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode(br#"{"op":"ping"}"#).unwrap().command, Command::Ping));
        assert!(matches!(decode(br#"{"op":"ack","inbox":5}"#).unwrap().command, Command::Ack { inbox: 5 }));
        assert!(matches!(
            decode(br#"{"op":"unsubscribe","channel":"a"}"#).unwrap().command,
            Command::Unsubscribe { .. }
        ));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let request = decode(br#"{"op":"subscribe","channel":"n\u0065ws"}"#).unwrap();
        assert!(matches!(request.command, Command::Subscribe { ref channel, .. } if channel == "news"));
    }

    #[test]
    fn errors_carry_codes_and_ids() {
        assert_eq!(decode(b"not json").unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(b"[1,2]").unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(br#"["subscribe",1,"news"]"#).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(br#"{"op":"ping","id":"\ud800"}"#).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(br#"{"channel":"x"}"#).unwrap_err().code, ErrorCode::BadRequest);
        let error = decode(br#"{"op":"dance","id":9}"#).unwrap_err();
        assert_eq!(error.code, ErrorCode::UnknownOp);
        assert_eq!(error.id.as_ref().map(RequestId::as_json), Some("9"));
        let error = decode(br#"{"op":"subscribe","id":3}"#).unwrap_err();
        assert_eq!(
            (error.code, error.id.map(|id| id.as_json().to_string())),
            (ErrorCode::BadRequest, Some("3".into()))
        );
        assert_eq!(decode(br#"{"op":"ping","id":-1}"#).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(br#"{"op":"ping","id":{"a":1}}"#).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(decode(br#"{"op":"subscribe","channel":5}"#).unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn name_rules() {
        assert!(check_channel_name("news", 16).is_ok());
        assert!(check_channel_name("user_status_42", 16).is_ok());
        assert!(check_channel_name("", 16).is_err());
        assert!(check_channel_name("a b", 16).is_err());
        assert!(check_channel_name("a\"b", 16).is_err());
        assert!(check_channel_name(&"a".repeat(17), 16).is_err());
        assert!(check_event_name("update").is_ok());
        assert!(check_event_name("ü").is_err());
    }

    #[test]
    fn reply_encoding() {
        let mut out = Vec::new();
        let id = RequestId::from_json(&serde_json::from_str::<Box<RawValue>>("7").unwrap()).unwrap();
        write_ok(&mut out, Some(&id), |o| {
            o.u64("offset", 3);
        });
        assert_eq!(out, br#"{"id":7,"ok":true,"offset":3}"#);
        out.clear();
        write_error(&mut out, &CommandError::new(Some(id), ErrorCode::Forbidden, "no \"publish\" here"));
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["id"], 7);
        assert_eq!(value["error"]["code"], "forbidden");
        assert_eq!(value["error"]["message"], "no \"publish\" here");
    }
}
