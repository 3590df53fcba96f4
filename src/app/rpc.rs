//! What a connection asks the backend: `op: rpc`, and the proxies that let
//! the backend log in a connection without a token (connect), and approve
//! subscriptions and client publications. The calls go to the backend
//! thread (src/backend/); the answers come back here.
//!
//! Proxy calls pause the connection's input (`AWAITING_REPLY`) so its
//! commands stay in order; `rpc` calls do not (answers are matched by id),
//! bounded by `rpc.in_flight_per_connection_max`.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::commands::{refuse, Refusal};
use crate::bus::backend::{BackendCall, BackendFailure, BackendReply, BackendRequest};
use crate::bus::message::ConnRef;
use crate::bus::Message;
use crate::connection::http::{HttpRole, SessionKind};
use crate::connection::{Marks, Phase};
use crate::hub::index::ConnKey;
use crate::shard::Shard;
use crate::util::unix_time_ms;
use kometa_protocol::client::{self, CommandError, ErrorCode, RequestId};
use kometa_protocol::http;
use kometa_protocol::token::Identity;
use kometa_protocol::ws;

/// Longest RPC method name.
const METHOD_BYTES_MAX: usize = 128;
/// Longest header value passed to the connect proxy (a cookie jar).
pub(crate) const PROXY_HEADER_BYTES_MAX: usize = 8 * 1024;

/// The connect proxy's answer.
#[derive(Deserialize)]
struct ConnectAnswer {
    user: UserId,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// A user id as a string or a number (like a token's `sub`).
#[derive(Deserialize)]
#[serde(untagged)]
enum UserId {
    Text(String),
    Number(u64),
}

impl Shard {
    /// `op: rpc`.
    pub(crate) fn rpc_command(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        method: &str,
        data: Option<&RawValue>,
    ) -> Result<(), Refusal> {
        let rpc = &self.config.rpc;
        if self.backend.is_none() || (rpc.routes.is_empty() && !rpc.admin_handlers) {
            return Err(refuse(
                ErrorCode::NotAvailable,
                "RPC is not configured on this server (rpc.routes, rpc.admin_handlers)",
            ));
        }
        if method.is_empty() || method.len() > METHOD_BYTES_MAX || !method.bytes().all(client::name_byte_allowed) {
            return Err(refuse(ErrorCode::BadRequest, "method must be 1-128 letters, digits and _ - . : @ / = #"));
        }
        let data_bytes_max = self.config.rpc.data_bytes_max;
        if data.is_some_and(|data| data.get().len() > data_bytes_max) {
            return Err(refuse(
                ErrorCode::MessageTooLarge,
                format!("data over {data_bytes_max} bytes (rpc.data_bytes_max)"),
            ));
        }
        let in_flight_max = self.config.rpc.in_flight_per_connection_max as u32;
        let entry = self.rpc_in_flight.entry(key).or_insert((generation, 0));
        if entry.0 != generation {
            *entry = (generation, 0);
        }
        if entry.1 >= in_flight_max {
            return Err(refuse(
                ErrorCode::Overloaded,
                format!("{in_flight_max} rpc calls already waiting (rpc.in_flight_per_connection_max)"),
            ));
        }
        entry.1 += 1;
        let call = BackendCall::Rpc { method: method.into(), data: data.map(|d| d.to_owned()) };
        self.send_to_backend(key, generation, id, call);
        Ok(())
    }

    /// Asks the backend to approve a command first; the connection's input
    /// pauses until the answer (`backend_reply` continues the command).
    pub(crate) fn ask_backend_first(
        &mut self,
        key: ConnKey,
        generation: u32,
        id: Option<RequestId>,
        call: BackendCall,
    ) -> Result<(), Refusal> {
        if self.backend.is_none() {
            return Err(refuse(ErrorCode::Unavailable, "the backend proxy is not running"));
        }
        let Some(conn) = self.conn_mut(key, generation) else { return Ok(()) };
        conn.state.marks.insert(Marks::AWAITING_REPLY);
        self.send_to_backend(key, generation, id, call);
        Ok(())
    }

    /// Connect proxy: a connection (or HTTP session) without a token; the
    /// backend names its user from the request's headers.
    pub(crate) fn connect_proxy(&mut self, key: ConnKey, generation: u32, headers: Vec<(Box<str>, Box<str>)>) {
        let call = BackendCall::Connect { headers };
        // Its first command waits for the answer.
        let _ = self.ask_backend_first(key, generation, None, call);
    }

    /// The request headers the connect proxy passes on (`rpc.connect_headers`).
    pub(crate) fn proxy_headers(&self, head: &[u8]) -> Vec<(Box<str>, Box<str>)> {
        http::header_values(head, &self.config.rpc.connect_headers, PROXY_HEADER_BYTES_MAX)
            .into_iter()
            .map(|(name, value)| (name.into_boxed_str(), value.into_boxed_str()))
            .collect()
    }

    /// Whether a connection without a token goes through the connect proxy.
    pub(crate) fn connect_proxy_enabled(&self) -> bool {
        self.backend.is_some() && self.config.rpc.connect_url.is_some()
    }

    fn send_to_backend(&mut self, key: ConnKey, generation: u32, request_id: Option<RequestId>, call: BackendCall) {
        let Some(backend) = self.backend else { return };
        let Some(conn) = self.conn_mut(key, generation) else { return };
        let user = conn.state.user().cloned();
        let claims = conn.state.identity.as_deref().and_then(claims_json);
        let transport = match (conn.state.phase(), conn.state.http.as_deref()) {
            (Phase::Session, Some(HttpRole::Session(session))) if session.kind == SessionKind::LongPoll => "long_poll",
            (Phase::Session, _) => "sse",
            _ => "websocket",
        };
        let conn = ConnRef { shard: self.id as u16, key, generation };
        let request = BackendRequest { conn, request_id, user, claims, transport, call };
        self.bus.send(backend, Message::Backend(Box::new(request)));
    }

    /// The backend answered (or the backend thread gave up on it).
    pub(crate) fn backend_reply(&mut self, reply: BackendReply) {
        let BackendReply { request, outcome } = reply;
        let ConnRef { key, generation, .. } = request.conn;
        let id = request.request_id;
        match request.call {
            BackendCall::Rpc { .. } => {
                if let Some(entry) = self.rpc_in_flight.get_mut(&key) {
                    if entry.0 == generation {
                        entry.1 = entry.1.saturating_sub(1);
                        if entry.1 == 0 {
                            self.rpc_in_flight.remove(&key);
                        }
                    }
                }
                if !self.alive(key, generation) {
                    return;
                }
                match outcome {
                    Ok(result) => self.reply_ok(key, id.as_ref(), |object| {
                        object.raw("result", result.get().as_bytes());
                    }),
                    Err(failure) => self.reply_error(key, &failure_error(id, failure, ErrorCode::BackendError)),
                }
            }
            BackendCall::Connect { .. } => self.connect_answered(key, generation, outcome),
            BackendCall::Subscribe { channel, since, presence_counts } => {
                self.unpause(key, generation);
                let result = match outcome {
                    Ok(_) => self.subscribe(key, generation, id.clone(), &channel, since, presence_counts, true),
                    Err(failure) => Err(refusal(failure)),
                };
                if let Err((code, message)) = result {
                    self.reply_error(key, &CommandError::new(id, code, message));
                }
            }
            BackendCall::Publish { channel, event, data } => {
                self.unpause(key, generation);
                let result = match outcome {
                    // `{"data": …}` replaces what the client sent.
                    Ok(answer) => {
                        let rewritten = rewritten_data(&answer);
                        let data = rewritten.as_deref().unwrap_or(&data);
                        self.client_publish(key, generation, id.clone(), &channel, &event, data.get().as_bytes(), true)
                    }
                    Err(failure) => Err(refusal(failure)),
                };
                if let Err((code, message)) = result {
                    self.reply_error(key, &CommandError::new(id, code, message));
                }
            }
        }
    }

    fn connect_answered(&mut self, key: ConnKey, generation: u32, outcome: Result<Box<RawValue>, BackendFailure>) {
        if !self.alive(key, generation) {
            return;
        }
        let identity = match outcome {
            Ok(answer) => match serde_json::from_str::<ConnectAnswer>(answer.get()) {
                Ok(answer) => {
                    let user = match answer.user {
                        UserId::Text(user) => user,
                        UserId::Number(user) => user.to_string(),
                    };
                    let expired = answer.expires_at.is_some_and(|at| at <= unix_time_ms() / 1000);
                    let info = answer.info.map(|info| info.get().into());
                    let now_s = unix_time_ms() / 1000;
                    match Identity::from_parts(user, answer.expires_at, now_s, answer.channels, info) {
                        Ok(_) if expired => Err((ErrorCode::TokenExpired, "the backend's login has expired".into())),
                        Ok(identity) => Ok(identity),
                        Err(error) => {
                            Err((ErrorCode::BackendError, format!("connect proxy: {}", error.message()).into()))
                        }
                    }
                }
                Err(_) => Err((
                    ErrorCode::BackendError,
                    "connect proxy: the answer needs {\"user\": …} (and optionally expires_at, channels)".into(),
                )),
            },
            Err(failure) => Err(refusal(failure)),
        };
        match identity {
            Ok(identity) => {
                // The client learns who it is; register_user pauses input
                // again until the user's owner answers.
                let user = std::sync::Arc::clone(&identity.user);
                self.send_json(key, |out| {
                    let mut object = kometa_protocol::json::ObjectWriter::new(out);
                    let mut inner = Vec::with_capacity(32 + user.len());
                    let mut connect = kometa_protocol::json::ObjectWriter::new(&mut inner);
                    connect.str("user", &user);
                    connect.finish();
                    object.raw("connect", &inner);
                    object.finish();
                });
                self.unpause(key, generation);
                self.register_user(key, generation, identity, None, false);
            }
            Err((code, message)) => {
                let close = match code {
                    ErrorCode::Unavailable | ErrorCode::Timeout => ws::close::TRY_AGAIN_LATER,
                    ErrorCode::TokenExpired => ws::close::TOKEN_EXPIRED,
                    _ => ws::close::INVALID_TOKEN,
                };
                let message: String = message.into_owned();
                self.reply_error(key, &CommandError::new(None, code, message.clone()));
                self.close_websocket(key, close, &message);
            }
        }
    }
}

/// A proxy call's failure as the client's error: the backend's refusal is
/// `forbidden` (with its code and message), the rest as they are.
fn refusal(failure: BackendFailure) -> Refusal {
    let error = failure_error(None, failure, ErrorCode::Forbidden);
    let message = match error.backend_code {
        Some(code) => format!("{} (backend code {code})", error.message),
        None => error.message.into_owned(),
    };
    (error.code, message.into())
}

fn failure_error(id: Option<RequestId>, failure: BackendFailure, refused: ErrorCode) -> CommandError {
    match failure {
        BackendFailure::Unavailable(why) => CommandError::new(id, ErrorCode::Unavailable, why),
        BackendFailure::Timeout => CommandError::new(id, ErrorCode::Timeout, "the backend did not answer in time"),
        BackendFailure::Error { code, message } => {
            let mut error = CommandError::new(id, refused, message);
            error.backend_code = code;
            error
        }
    }
}

/// `{"data": …}` in a publish proxy's answer.
fn rewritten_data(answer: &RawValue) -> Option<Box<RawValue>> {
    #[derive(Deserialize)]
    struct Rewrite {
        #[serde(default)]
        data: Option<Box<RawValue>>,
    }
    serde_json::from_str::<Rewrite>(answer.get()).ok().and_then(|rewrite| rewrite.data)
}

/// A connection's claims as its backend calls carry them.
fn claims_json(identity: &Identity) -> Option<Box<RawValue>> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: Option<u64>,
        iat: Option<u64>,
        channels: Vec<String>,
        info: Option<&'a RawValue>,
    }
    let channels = identity
        .grants
        .iter()
        .map(|name| name.to_string())
        .chain(identity.grant_prefixes.iter().map(|prefix| format!("{prefix}*")))
        .collect();
    let info = identity.info.as_deref().and_then(|info| serde_json::from_str::<&RawValue>(info).ok());
    let claims = Claims {
        sub: &identity.user,
        exp: identity.expires_at_s,
        iat: (identity.issued_at_s > 0).then_some(identity.issued_at_s),
        channels,
        info,
    };
    serde_json::value::to_raw_value(&claims).ok()
}
