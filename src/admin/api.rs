//! The HTTP API for backends (`api.listen`): `POST /api/<operation>` with
//! `Authorization: apikey KEY` and a JSON body, answered with the same JSON
//! documents as the binary admin socket, and its errors as
//! `{"error":{"code":…,"name":…,"message":…}}` with an HTTP status. The
//! operations themselves are `ops`, shared with the binary socket.
//! docs/http-api.md has every operation with curl examples.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::admin::gateway::Gateway;
use crate::admin::http::{Request, Response};
use crate::admin::ops::{self, bad_argument, Operation, Outcome};
use kometa_protocol::admin::{AdminError, ErrorCode};
use kometa_protocol::http::Method;

const JSON: &str = "application/json";

/// The HTTP status for an admin error code.
pub fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadArgument => 400,
        ErrorCode::Unauthorized => 401,
        ErrorCode::UnknownOpcode | ErrorCode::NotFound => 404,
        ErrorCode::InboxFull => 409,
        ErrorCode::TooLarge => 413,
        ErrorCode::LimitReached => 429,
        ErrorCode::Internal => 500,
        ErrorCode::UnknownOutcome => 502,
        ErrorCode::Overloaded | ErrorCode::ShuttingDown | ErrorCode::Unavailable => 503,
    }
}

fn error_response(error: &AdminError) -> Response {
    let body = json!({ "error": ops::error_json(error) });
    let response = Response::new(status_of(error.code), JSON, body.to_string().into_bytes());
    match error.code {
        ErrorCode::Unauthorized => response.with_header("WWW-Authenticate", "apikey"),
        ErrorCode::Overloaded | ErrorCode::ShuttingDown | ErrorCode::Unavailable => {
            response.with_header("Retry-After", "1")
        }
        _ => response,
    }
}

/// Answers one request on the API listener.
pub async fn respond(gateway: &Rc<RefCell<Gateway>>, request: &Request) -> Response {
    if let Err(error) = authorize(gateway, request.authorization.as_deref()) {
        return error_response(&error);
    }
    if request.method != Method::Post {
        let mut response = error_response(&bad_argument("use POST"));
        response.status = 405;
        return response.with_header("Allow", "POST");
    }
    let result = async {
        let Some(name) = request.path.strip_prefix("/api/") else {
            return Err(AdminError::new(ErrorCode::UnknownOpcode, "operations are at /api/<operation>"));
        };
        let operation = decode(gateway, name, &request.body)?;
        ops::start(gateway, operation).outcome().await
    }
    .await;
    match result {
        Ok(Outcome::Empty) => Response::new(200, JSON, b"{}".to_vec()),
        Ok(Outcome::Published(ok)) => Response::new(200, JSON, ops::published_json(None, &ok).to_string().into_bytes()),
        Ok(Outcome::Document(document)) => Response::new(200, JSON, serde_json::to_vec(&document).unwrap_or_default()),
        Err(error) => error_response(&error),
    }
}

/// `Authorization: apikey KEY`, compared in constant time (as SHA-256
/// digests, so the key's length does not show either).
fn authorize(gateway: &Rc<RefCell<Gateway>>, authorization: Option<&str>) -> Result<(), AdminError> {
    let gateway = gateway.borrow();
    let Some(expected) = gateway.config.api.key.as_deref() else {
        // validate() refuses api.listen without a key; never serve without one.
        return Err(AdminError::new(ErrorCode::Unauthorized, "api.key is not set"));
    };
    let given = authorization.and_then(|value| {
        let (scheme, key) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("apikey").then(|| key.trim())
    });
    let Some(given) = given else {
        return Err(AdminError::new(ErrorCode::Unauthorized, "send Authorization: apikey KEY"));
    };
    let (expected, given) = (Sha256::digest(expected.as_bytes()), Sha256::digest(given.as_bytes()));
    if !crate::util::constant_time_eq(&expected, &given) {
        return Err(AdminError::new(ErrorCode::Unauthorized, "wrong API key"));
    }
    Ok(())
}

/// The body as `T`; an empty body is `{}`.
fn body<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, AdminError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|error| bad_argument(format!("body: {error}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// `{}` or `{"scope":"node"}` (this node's figures only, in cluster mode).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsBody {
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishManyBody<'a> {
    #[serde(borrow)]
    channels: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendUserBody<'a> {
    #[serde(borrow)]
    users: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersBody<'a> {
    #[serde(borrow)]
    users: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(default, borrow)]
    cursor: Cow<'a, str>,
    #[serde(default)]
    limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsBody<'a> {
    #[serde(default, borrow)]
    prefix: Cow<'a, str>,
    #[serde(default, borrow)]
    cursor: Cow<'a, str>,
    #[serde(default)]
    limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(default)]
    code: u16,
    #[serde(default, borrow)]
    reason: Cow<'a, str>,
    #[serde(default)]
    revoke_before: u64,
}

fn strs<'a>(items: &'a [Cow<'a, str>]) -> Vec<&'a str> {
    items.iter().map(|item| &**item).collect()
}

/// The operation named `name` from its JSON body (the same checks as the
/// binary socket's).
fn decode(gateway: &Rc<RefCell<Gateway>>, name: &str, bytes: &[u8]) -> Result<Operation, AdminError> {
    let g = gateway;
    Ok(match name {
        "ping" => {
            body::<Empty>(bytes)?;
            Operation::Ping
        }
        "stats" => {
            let b: StatsBody = body(bytes)?;
            let node_only = match b.scope.as_deref() {
                None | Some("cluster") => false,
                Some("node") => true,
                Some(other) => {
                    return Err(ops::bad_argument(format!("scope `{other}`: \"cluster\" (default) or \"node\"")))
                }
            };
            Operation::Stats { node_only }
        }
        "reload" => {
            body::<Empty>(bytes)?;
            Operation::Reload
        }
        "publish" => {
            let b: PublishBody = body(bytes)?;
            let channel = ops::channel(g, &b.channel)?;
            Operation::Publish { channel, event: ops::event(&b.event)?, data: ops::data(g, b.data.get().as_bytes())? }
        }
        "publish_many" => {
            let b: PublishManyBody = body(bytes)?;
            let channels = ops::channels(g, &strs(&b.channels))?;
            let (event, data) = (ops::event(&b.event)?, ops::data(g, b.data.get().as_bytes())?);
            Operation::PublishMany { channels, event, data }
        }
        "send_user" => {
            let b: SendUserBody = body(bytes)?;
            let users = ops::users(g, &strs(&b.users))?;
            Operation::SendUser { users, event: ops::event(&b.event)?, data: ops::data(g, b.data.get().as_bytes())? }
        }
        "user_status" => {
            let b: UsersBody = body(bytes)?;
            Operation::UserStatus { users: ops::users(g, &strs(&b.users))? }
        }
        "presence" => {
            let b: PresenceBody = body(bytes)?;
            let channel = ops::channel(g, &b.channel)?;
            Operation::Presence { channel, cursor: ops::cursor(&b.cursor), limit: ops::limit(g, b.limit) }
        }
        "presence_stats" => {
            Operation::PresenceStats { channel: ops::channel(g, &body::<ChannelBody>(bytes)?.channel)? }
        }
        "channel_info" => Operation::ChannelInfo { channel: ops::channel(g, &body::<ChannelBody>(bytes)?.channel)? },
        "channels" => {
            let b: ChannelsBody = body(bytes)?;
            Operation::Channels {
                prefix: ops::prefix(&b.prefix)?,
                cursor: ops::cursor(&b.cursor),
                limit: ops::limit(g, b.limit),
            }
        }
        "history" => {
            let b: HistoryBody = body(bytes)?;
            let channel = ops::channel(g, &b.channel)?;
            Operation::History { channel, since_offset: b.since, limit: ops::limit(g, b.limit) }
        }
        "disconnect" => {
            let b: DisconnectBody = body(bytes)?;
            Operation::Disconnect {
                user: ops::user(&b.user)?,
                code: ops::disconnect_code(b.code)?,
                reason: ops::disconnect_reason(&b.reason),
                revoke_before_s: b.revoke_before,
            }
        }
        _ => return Err(AdminError::new(ErrorCode::UnknownOpcode, format!("unknown operation `{name}`"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_a_status() {
        for value in 1..=13 {
            let code = ErrorCode::from_u16(value).unwrap();
            let status = status_of(code);
            assert!((400..600).contains(&status), "{code:?}");
        }
        assert_eq!(status_of(ErrorCode::TooLarge), 413);
        assert_eq!(status_of(ErrorCode::Unauthorized), 401);
    }

    #[test]
    fn bodies_name_unknown_fields_and_accept_empty() {
        assert!(body::<Empty>(b"").is_ok());
        assert!(body::<Empty>(b"  \n").is_ok());
        let error = body::<ChannelBody>(br#"{"channel":"a","chanel":"b"}"#).err().unwrap();
        assert!(error.message.contains("chanel"), "{}", error.message);
        let b: PublishBody = body(br#"{"channel":"n\u0065ws","event":"e","data":{"a": [1, 2]}}"#).unwrap();
        assert_eq!(b.channel, "news");
        assert_eq!(b.data.get(), r#"{"a": [1, 2]}"#);
    }
}
