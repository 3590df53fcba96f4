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

/// Backend calls answered, by kind, route and outcome, for `/metrics`
/// (`kometa_backend_calls_total`); written by the backend thread and the
/// admin gateway (handlers), read per scrape.
#[derive(Debug, Default)]
pub struct BackendCallCounts {
    counts: [[[std::sync::atomic::AtomicU64; CallOutcome::ALL.len()]; 3]; 4],
    /// Webhook URLs whose circuit breaker is open now.
    pub breakers_open: std::sync::atomic::AtomicU64,
}

/// How a call reached the backend (label `via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallRoute {
    Webhook = 0,
    /// A handler on an admin connection (HANDLE).
    Handler = 1,
    /// No route or handler takes it (failed `unavailable` at once).
    Unrouted = 2,
}

/// How a call ended (label `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok = 0,
    BackendError = 1,
    Timeout = 2,
    Unavailable = 3,
}

impl CallOutcome {
    pub const ALL: [CallOutcome; 4] =
        [CallOutcome::Ok, CallOutcome::BackendError, CallOutcome::Timeout, CallOutcome::Unavailable];

    pub fn of<T>(outcome: &Result<T, BackendFailure>) -> CallOutcome {
        match outcome {
            Ok(_) => CallOutcome::Ok,
            Err(BackendFailure::Error { .. }) => CallOutcome::BackendError,
            Err(BackendFailure::Timeout) => CallOutcome::Timeout,
            Err(BackendFailure::Unavailable(_)) => CallOutcome::Unavailable,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::BackendError => "backend_error",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Unavailable => "unavailable",
        }
    }
}

/// Kinds in the order of the counters (label `kind`).
pub const CALL_KINDS: [&str; 4] = ["rpc", "connect", "subscribe", "publish"];

impl BackendCallCounts {
    pub fn count(&self, call: &BackendCall, route: CallRoute, outcome: CallOutcome) {
        let kind = CALL_KINDS.iter().position(|k| *k == call.kind()).unwrap_or(0);
        self.counts[kind][route as usize][outcome as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (kind, via, outcome, count) for every combination.
    pub fn samples(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let mut samples = Vec::new();
        for (kind_index, kind) in CALL_KINDS.iter().enumerate() {
            for (route_index, via) in ["webhook", "handler", "none"].iter().enumerate() {
                for outcome in CallOutcome::ALL {
                    let count = self.counts[kind_index][route_index][outcome as usize]
                        .load(std::sync::atomic::Ordering::Relaxed);
                    samples.push((*kind, *via, outcome.label(), count));
                }
            }
        }
        samples
    }
}
