//! The Jii-comet text protocol (one command per SockJS message), as a
//! sans-io codec: what a Jii client sends, and the lines the server sends
//! back. docs/sockjs.md has the mapping onto Kometa's channels.
//!
//! Client to server:
//! - `subscribe CHANNEL`, `unsubscribe CHANNEL`
//! - `channel CHANNEL MESSAGE`: publish MESSAGE (any text, JSON by convention)
//! - `action ROUTE JSON`: a request; JSON carries `requestUid`
//!
//! Server to client:
//! - `channel CHANNEL MESSAGE`: a publication
//! - `action JSON`: the answer to a request, with its `requestUid`

/// A command from a Jii client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Subscribe {
        channel: &'a str,
    },
    Unsubscribe {
        channel: &'a str,
    },
    /// The message is everything after the channel name (may be empty).
    Publish {
        channel: &'a str,
        message: &'a str,
    },
    /// `params` is the JSON after the route (`{}` when absent).
    Action {
        route: &'a str,
        params: &'a str,
    },
}

/// Parses one message; `None` when it is none of the four commands.
pub fn parse(text: &str) -> Option<Command<'_>> {
    let (verb, rest) = text.split_once(' ')?;
    match verb {
        "subscribe" => Some(Command::Subscribe { channel: rest }),
        "unsubscribe" => Some(Command::Unsubscribe { channel: rest }),
        "channel" => {
            let (channel, message) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(Command::Publish { channel, message })
        }
        "action" => {
            let (route, params) = rest.split_once(' ').unwrap_or((rest, ""));
            let params = if params.trim().is_empty() { "{}" } else { params };
            Some(Command::Action { route, params })
        }
        _ => None,
    }
}

/// A published message as publication `data` (which is JSON): the message
/// itself when it is one JSON value, else the message as a JSON string.
pub fn message_to_data(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.trim().is_empty() && crate::json::validate(message.as_bytes()).is_ok() {
        return std::borrow::Cow::Borrowed(message);
    }
    std::borrow::Cow::Owned(serde_json::Value::String(message.to_owned()).to_string())
}

/// `channel CHANNEL MESSAGE` for a publication's `data`: a JSON string
/// becomes its text (what a Jii client published as text comes back as
/// that text), any other JSON stays JSON.
pub fn write_channel(out: &mut Vec<u8>, channel: &str, data: &[u8]) {
    out.extend_from_slice(b"channel ");
    out.extend_from_slice(channel.as_bytes());
    out.push(b' ');
    match serde_json::from_slice::<String>(data) {
        Ok(text) if data.first() == Some(&b'"') => out.extend_from_slice(text.as_bytes()),
        _ => out.extend_from_slice(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("subscribe news"), Some(Command::Subscribe { channel: "news" }));
        assert_eq!(parse("unsubscribe news"), Some(Command::Unsubscribe { channel: "news" }));
        assert_eq!(
            parse("channel web_chat {\"text\":\"a b\"}"),
            Some(Command::Publish { channel: "web_chat", message: "{\"text\":\"a b\"}" })
        );
        assert_eq!(parse("channel web_chat"), Some(Command::Publish { channel: "web_chat", message: "" }));
        assert_eq!(
            parse("action site/ping {\"requestUid\":\"u1\"}"),
            Some(Command::Action { route: "site/ping", params: "{\"requestUid\":\"u1\"}" })
        );
        assert_eq!(parse("action site/ping"), Some(Command::Action { route: "site/ping", params: "{}" }));
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("publish x y"), None);
    }

    #[test]
    fn data_round_trip() {
        assert_eq!(message_to_data("{\"a\":1}"), "{\"a\":1}");
        assert_eq!(message_to_data("hello world"), "\"hello world\"");
        assert_eq!(message_to_data(""), "\"\"");
        assert_eq!(message_to_data("12"), "12");
        let mut out = Vec::new();
        write_channel(&mut out, "web_chat", br#""hello \"world\"""#);
        assert_eq!(out, br#"channel web_chat hello "world""#);
        let mut out = Vec::new();
        write_channel(&mut out, "news", br#"{"a":1}"#);
        assert_eq!(out, br#"channel news {"a":1}"#);
    }
}
