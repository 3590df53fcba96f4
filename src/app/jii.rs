//! The Jii-comet text protocol over SockJS (`sockjs.jii_prefix`,
//! docs/sockjs.md): each Jii message becomes a client protocol command that
//! the session runs like any other (same namespaces, client-publish rules,
//! tokens and limits), and what the session sends back becomes Jii lines.
//!
//! | Jii                      | client protocol                                         |
//! |--------------------------|---------------------------------------------------------|
//! | `subscribe CH`           | `{"op":"subscribe","channel":CH}`                       |
//! | `unsubscribe CH`         | `{"op":"unsubscribe","channel":CH}`                     |
//! | `channel CH MESSAGE`     | `{"op":"publish","channel":CH,"event":"message","data":…}` |
//! | `action ROUTE JSON`      | `{"op":"rpc","method":ROUTE,"data":JSON}`, answered `action {…,"requestUid":…}` |
//! | ← `channel CH MESSAGE`   | ← a publication of CH                                   |
//!
//! `action` goes out as the client protocol's `rpc` command (docs/rpc.md):
//! the backend's `result` object comes back with the `requestUid` added.
//! Without `rpc.routes` or `rpc.admin_handlers` the answer is
//! `action {"requestUid":…,"error":"rpc_unavailable",…}`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::connection::http::BufItem;
use kometa_protocol::jii::{self, Command};
use kometa_protocol::json::ObjectWriter;

/// Request ids of the commands Jii messages become, so their replies can
/// be told apart; an action's id carries its `requestUid`.
const ID_SUBSCRIBE: &str = "subscribe";
const ID_UNSUBSCRIBE: &str = "unsubscribe";
const ID_CHANNEL: &str = "channel";
const ACTION_ID_PREFIX: &str = "action:";
/// Longest `requestUid` that fits in a request id (64 characters) after the prefix.
const REQUEST_UID_CHARS_MAX: usize = 64 - ACTION_ID_PREFIX.len();

/// A Jii message as a client protocol command, or (`Err`) the line that
/// answers it at once.
pub(crate) fn command(message: &[u8]) -> Result<Vec<u8>, Vec<u8>> {
    let Ok(text) = std::str::from_utf8(message) else {
        return Err(error_line("bad_request", "messages must be UTF-8 text", None));
    };
    let Some(command) = jii::parse(text) else {
        let message = "expected `subscribe CH`, `unsubscribe CH`, `channel CH MESSAGE` or `action ROUTE JSON`";
        return Err(error_line("unknown_command", message, None));
    };
    let mut out = Vec::with_capacity(64 + text.len());
    let mut object = ObjectWriter::new(&mut out);
    match command {
        Command::Subscribe { channel } => {
            object.str("op", "subscribe").str("channel", channel).str("id", ID_SUBSCRIBE);
        }
        Command::Unsubscribe { channel } => {
            object.str("op", "unsubscribe").str("channel", channel).str("id", ID_UNSUBSCRIBE);
        }
        Command::Publish { channel, message } => {
            let data = jii::message_to_data(message);
            object.str("op", "publish").str("channel", channel).str("event", "message");
            object.raw("data", data.as_bytes()).str("id", ID_CHANNEL);
        }
        Command::Action { route, params } => {
            let uid = match serde_json::from_str::<Map<String, Value>>(params) {
                Ok(params) => match params.get("requestUid") {
                    Some(Value::String(uid)) => uid.clone(),
                    Some(Value::Number(uid)) => uid.to_string(),
                    _ => return Err(error_line("bad_request", "action parameters need a requestUid", Some("action"))),
                },
                Err(_) => {
                    return Err(error_line("bad_request", "action parameters must be a JSON object", Some("action")));
                }
            };
            if uid.chars().count() > REQUEST_UID_CHARS_MAX {
                return Err(action_line(&uid, "bad_request", "requestUid is longer than 57 characters"));
            }
            object.str("op", "rpc").str("method", route).raw("data", params.as_bytes());
            object.str("id", &format!("{ACTION_ID_PREFIX}{uid}"));
        }
    }
    object.finish();
    Ok(out)
}

/// What a Jii client gets for a message of its session, if anything:
/// publications as `channel CH MESSAGE`, action answers as `action {…}`,
/// refusals as `error {…}`. Command acknowledgements, presence events,
/// user messages and recovery notices have no Jii form.
pub(crate) fn outgoing(item: &BufItem) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Push<'a> {
        #[serde(borrow)]
        channel: Option<Cow<'a, str>>,
        offset: Option<u64>,
        #[serde(borrow)]
        data: Option<&'a RawValue>,
        #[serde(borrow)]
        event: Option<Cow<'a, str>>,
    }
    let json = match item {
        BufItem::Publication(publication) if publication.channel.is_empty() || publication.offset == 0 => return None,
        BufItem::Publication(publication) => publication.json(),
        BufItem::Json(json) => json,
    };
    let push: Push<'_> = serde_json::from_slice(json).ok()?;
    if let (Some(channel), Some(_), Some(data), Some(_)) = (&push.channel, push.offset, push.data, &push.event) {
        let mut out = Vec::with_capacity(16 + channel.len() + data.get().len());
        jii::write_channel(&mut out, channel, data.get().as_bytes());
        return Some(out);
    }
    reply(serde_json::from_slice(json).ok()?)
}

/// A reply to a command a Jii message became.
fn reply(reply: Map<String, Value>) -> Option<Vec<u8>> {
    let id = reply.get("id").and_then(Value::as_str);
    let error = reply.get("error").map(|error| {
        let field = |name| error.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
        (field("code"), field("message"))
    });
    if let Some(uid) = id.and_then(|id| id.strip_prefix(ACTION_ID_PREFIX)) {
        return Some(match error {
            // RPC is not configured here (`rpc.routes`, `rpc.admin_handlers`): no backend can answer.
            Some((code, _)) if code == "unknown_op" || code == "not_available" => {
                action_line(uid, "rpc_unavailable", "this server does not forward actions to a backend")
            }
            Some((code, message)) => action_line(uid, &code, &message),
            None => {
                // The backend's `result` object, with the requestUid, as Jii
                // backends answer; any other value under `data`.
                let mut answer = match reply.get("result") {
                    Some(Value::Object(data)) => data.clone(),
                    Some(data) => Map::from_iter([("data".to_owned(), data.clone())]),
                    None => Map::new(),
                };
                answer.insert("requestUid".into(), Value::String(uid.into()));
                let mut line = b"action ".to_vec();
                line.extend_from_slice(Value::Object(answer).to_string().as_bytes());
                line
            }
        });
    }
    let (code, message) = error?;
    let command = id.filter(|id| [ID_SUBSCRIBE, ID_UNSUBSCRIBE, ID_CHANNEL].contains(id));
    Some(error_line(&code, &message, command))
}

/// `action {"requestUid":…,"error":CODE,"message":…}`.
fn action_line(uid: &str, code: &str, message: &str) -> Vec<u8> {
    let mut line = b"action ".to_vec();
    let mut object = ObjectWriter::new(&mut line);
    object.str("requestUid", uid).str("error", code).str("message", message);
    object.finish();
    line
}

/// `error {"code":…,"message":…[,"command":…]}`: Jii clients pass lines
/// they do not know to the application's `message` handlers.
fn error_line(code: &str, message: &str, command: Option<&str>) -> Vec<u8> {
    let mut line = b"error ".to_vec();
    let mut object = ObjectWriter::new(&mut line);
    object.str("code", code).str("message", message);
    if let Some(command) = command {
        object.str("command", command);
    }
    object.finish();
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::publication::{Publication, PushFields};
    use std::sync::Arc;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn commands() {
        let subscribe: Value = serde_json::from_slice(&command(b"subscribe news").unwrap()).unwrap();
        assert_eq!(subscribe, serde_json::json!({"op": "subscribe", "channel": "news", "id": "subscribe"}));
        let publish: Value = serde_json::from_slice(&command(b"channel web_chat hello there").unwrap()).unwrap();
        assert_eq!(publish["data"], "hello there");
        assert_eq!(publish["event"], "message");
        let action: Value =
            serde_json::from_slice(&command(br#"action site/x {"a":1,"requestUid":"u7"}"#).unwrap()).unwrap();
        assert_eq!(action["op"], "rpc");
        assert_eq!(action["method"], "site/x");
        assert_eq!(action["data"]["a"], 1);
        assert_eq!(action["id"], "action:u7");
        assert!(text(command(b"action site/x {}").unwrap_err()).starts_with("error {\"code\":\"bad_request\""));
        assert!(text(command(b"action site/x nope").unwrap_err()).starts_with("error "));
        let long = format!("action x {{\"requestUid\":\"{}\"}}", "u".repeat(58));
        assert!(text(command(long.as_bytes()).unwrap_err()).starts_with("action {\"requestUid\":\"uuu"));
        assert!(text(command(b"hello").unwrap_err()).contains("unknown_command"));
        assert!(command(b"\xff").is_err());
    }

    #[test]
    fn replies_and_pushes() {
        let json = |text: &str| BufItem::Json(text.as_bytes().into());
        assert_eq!(outgoing(&json(r#"{"id":"subscribe","ok":true,"channel":"a","epoch":"e","offset":0}"#)), None);
        let refused = outgoing(&json(r#"{"id":"channel","error":{"code":"forbidden","message":"no"}}"#)).unwrap();
        assert_eq!(text(refused), r#"error {"code":"forbidden","message":"no","command":"channel"}"#);
        let unknown = outgoing(&json(r#"{"id":"action:u1","error":{"code":"unknown_op","message":"x"}}"#)).unwrap();
        assert!(text(unknown).starts_with(r#"action {"requestUid":"u1","error":"rpc_unavailable""#));
        let answered = outgoing(&json(r#"{"id":"action:u2","ok":true,"result":{"n":5}}"#)).unwrap();
        let answered: Value = serde_json::from_slice(&answered[7..]).unwrap();
        assert_eq!(answered, serde_json::json!({"n": 5, "requestUid": "u2"}));
        assert_eq!(outgoing(&json(r#"{"inbox":3,"event":"e","data":1}"#)), None);

        let publication = Publication::encode(
            "web_chat".into(),
            "e".into(),
            4,
            PushFields { channel: "web_chat", event: "message", data: br#""hi""#, user: Some("42") },
        );
        let line = outgoing(&BufItem::Publication(Arc::new(publication))).unwrap();
        assert_eq!(text(line), "channel web_chat hi");
        let join = Publication::channel_event("track_x".into(), "join", br#"{"user":"1"}"#);
        assert_eq!(outgoing(&BufItem::Publication(Arc::new(join))), None);
    }
}
