//! Calls to the backend (RPC and the proxies) and their answers, between
//! the shards and the backend thread (src/backend/).

use std::sync::Arc;

use serde_json::value::RawValue;

use super::message::ConnRef;
use kometa_protocol::client::{Position, RequestId};

/// What a connection asks the backend.
#[derive(Debug)]
pub enum BackendCall {
    /// `op: rpc`: routed by `method` (`rpc.routes`).
    Rpc { method: Box<str>, data: Option<Box<RawValue>> },
    /// Connect proxy: a connection without a token; the backend sees its
    /// request headers (`rpc.connect_headers`) and names the user.
    Connect { headers: Vec<(Box<str>, Box<str>)> },
    /// Subscribe proxy: may the client subscribe? (`since` is kept for the
    /// subscription that follows an approval.)
    Subscribe { channel: Box<str>, since: Option<Position>, presence_counts: bool },
    /// Publish proxy: may the client publish this (and with what data)?
    Publish { channel: Box<str>, event: Box<str>, data: Box<RawValue> },
}

impl BackendCall {
    /// The `kind` the backend sees.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendCall::Rpc { .. } => "rpc",
            BackendCall::Connect { .. } => "connect",
            BackendCall::Subscribe { .. } => "subscribe",
            BackendCall::Publish { .. } => "publish",
        }
    }

    /// Whether sending it twice is harmless: only those are retried
    /// (once, when the first attempt never reached the backend).
    pub fn idempotent(&self) -> bool {
        matches!(self, BackendCall::Connect { .. } | BackendCall::Subscribe { .. })
    }
}

/// A call with who made it.
#[derive(Debug)]
pub struct BackendRequest {
    pub conn: ConnRef,
    /// The client's command id (the answer is its reply).
    pub request_id: Option<RequestId>,
    /// The caller's user, if it has one.
    pub user: Option<Arc<str>>,
    /// What the connection's token (or connect proxy answer) said, as the
    /// backend sees it: `{"sub","exp","iat","channels","info"}`; None
    /// without one.
    pub claims: Option<Box<RawValue>>,
    /// `websocket`, `sse` or `long_poll`.
    pub transport: &'static str,
    pub call: BackendCall,
}

/// Why a call got no answer from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendFailure {
    /// No route, breaker open, queue full, backend unreachable.
    Unavailable(String),
    /// No answer within `rpc.timeout_ms`.
    Timeout,
    /// The backend answered with an error (`{"error":{"code","message"}}`),
    /// a non-2xx status, or something that is not an answer.
    Error { code: Option<i64>, message: String },
}

/// The backend's answer, with the request it answers (the shard continues
/// an approved subscribe or publish from it).
#[derive(Debug)]
pub struct BackendReply {
    pub request: BackendRequest,
    /// The answer's `result` (JSON; `null` when absent).
    pub outcome: Result<Box<RawValue>, BackendFailure>,
}
