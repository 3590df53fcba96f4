//! One webhook call: the request as JSON in a POST, the answer as
//! `{"result": …}` or `{"error": {"code": N, "message": "…"}}`.

use std::io::ErrorKind;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bus::backend::{BackendCall, BackendFailure, BackendRequest};
use crate::config::RpcConfig;

/// A call's result, and whether it counts against the URL's breaker (the
/// backend was unreachable, slow, or failed with a 5xx).
pub struct Outcome {
    pub result: Result<Box<RawValue>, BackendFailure>,
    pub backend_failed: bool,
}

/// Makes webhook calls; shared by the worker threads (one connection pool).
pub struct Caller {
    agent: ureq::Agent,
    backend_key: Option<String>,
    response_bytes_max: u64,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

impl Caller {
    pub fn new(rpc: &RpcConfig) -> Caller {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(rpc.timeout_ms)))
            // Statuses are answers too (a 403 with an error body is a refusal).
            .http_status_as_error(false)
            .max_idle_connections(rpc.concurrency_max)
            .max_idle_connections_per_host(rpc.concurrency_max)
            .build()
            .into();
        Caller { agent, backend_key: rpc.backend_key.clone(), response_bytes_max: rpc.response_bytes_max as u64 }
    }

    pub fn call(&self, url: &str, request: &BackendRequest) -> Outcome {
        let body = request_body(request);
        let mut attempt = self.post(url, &body);
        // Retried only when it cannot have reached the backend, and only
        // for calls that are harmless twice.
        if request.call.idempotent() && matches!(&attempt, Err(error) if never_sent(error)) {
            attempt = self.post(url, &body);
        }
        match attempt {
            Ok((status, answer)) => interpret(status, &answer),
            Err(error) => {
                let result = match error {
                    ureq::Error::Timeout(_) => Err(BackendFailure::Timeout),
                    error if never_sent(&error) => {
                        Err(BackendFailure::Unavailable(format!("backend unreachable: {error}")))
                    }
                    ureq::Error::BodyExceedsLimit(_) => Err(BackendFailure::Error {
                        code: None,
                        message: format!(
                            "backend answer over rpc.response_bytes_max ({} bytes)",
                            self.response_bytes_max
                        ),
                    }),
                    error => Err(BackendFailure::Unavailable(format!("backend call failed: {error}"))),
                };
                let backend_failed = !matches!(result, Err(BackendFailure::Error { .. }));
                Outcome { result, backend_failed }
            }
        }
    }

    fn post(&self, url: &str, body: &[u8]) -> Result<(u16, Vec<u8>), ureq::Error> {
        let mut post = self.agent.post(url).header("Content-Type", "application/json");
        if let Some(key) = &self.backend_key {
            post = post.header("X-Kometa-Key", key);
        }
        let mut response = post.send(body)?;
        let status = response.status().as_u16();
        let answer = response.body_mut().with_config().limit(self.response_bytes_max).read_to_vec()?;
        Ok((status, answer))
    }
}

/// Errors that mean the request never reached the backend.
fn never_sent(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Io(io) => matches!(io.kind(), ErrorKind::ConnectionRefused | ErrorKind::AddrNotAvailable),
        _ => false,
    }
}

/// What the backend's status and body mean.
fn interpret(status: u16, body: &[u8]) -> Outcome {
    let parsed: Option<Answer> = serde_json::from_slice(body).ok();
    match parsed {
        Some(Answer { error: Some(error), .. }) => Outcome {
            result: Err(BackendFailure::Error {
                code: error.code,
                message: error.message.unwrap_or_else(|| "refused by the backend".into()),
            }),
            backend_failed: status >= 500,
        },
        Some(Answer { result, error: None }) if (200..300).contains(&status) => {
            let null = || RawValue::from_string("null".into()).ok();
            match result.or_else(null) {
                Some(result) => Outcome { result: Ok(result), backend_failed: false },
                None => Outcome {
                    result: Err(BackendFailure::Error { code: None, message: "unreadable backend answer".into() }),
                    backend_failed: false,
                },
            }
        }
        _ => Outcome {
            result: Err(BackendFailure::Error {
                code: Some(i64::from(status)),
                message: format!("backend answered HTTP {status} without a JSON result"),
            }),
            backend_failed: status >= 500,
        },
    }
}

/// An answer that came without HTTP (a handler on the admin connection):
/// read like a 200 response's body.
pub(crate) fn parse_answer(body: &[u8]) -> Result<Box<RawValue>, BackendFailure> {
    interpret(200, body).result
}

/// The JSON the backend receives.
pub(crate) fn request_body(request: &BackendRequest) -> Vec<u8> {
    let conn = request.conn;
    let mut body = serde_json::json!({
        "kind": request.call.kind(),
        "client": format!("s{}.{}.{}", conn.shard, conn.key, conn.generation),
        "user": request.user.as_deref(),
        "claims": request.claims.as_deref().map(raw_json),
        "transport": request.transport,
    });
    let fields = match &request.call {
        BackendCall::Rpc { method, data } => {
            serde_json::json!({"method": method, "data": data.as_deref().map(raw_json)})
        }
        BackendCall::Connect { headers } => {
            let headers: serde_json::Map<String, serde_json::Value> =
                headers.iter().map(|(name, value)| (name.to_string(), value.to_string().into())).collect();
            serde_json::json!({"headers": headers})
        }
        BackendCall::Subscribe { channel, .. } => serde_json::json!({"channel": channel}),
        BackendCall::Publish { channel, event, data } => {
            serde_json::json!({"channel": channel, "event": event, "data": raw_json(data)})
        }
    };
    if let (Some(body), serde_json::Value::Object(fields)) = (body.as_object_mut(), fields) {
        body.extend(fields);
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

fn raw_json(raw: &RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(outcome: Outcome) -> (BackendFailure, bool) {
        let backend_failed = outcome.backend_failed;
        (outcome.result.expect_err("a failure"), backend_failed)
    }

    #[test]
    fn answers_are_read_by_status_and_body() {
        let ok = interpret(200, br#"{"result":{"n":1}}"#);
        assert_eq!(ok.result.map(|r| r.get().to_owned()), Ok(r#"{"n":1}"#.to_owned()));
        let empty = interpret(204, b"{}");
        assert_eq!(empty.result.map(|r| r.get().to_owned()), Ok("null".to_owned()));
        let refused = failure(interpret(200, br#"{"error":{"code":403,"message":"no"}}"#));
        assert_eq!(refused, (BackendFailure::Error { code: Some(403), message: "no".into() }, false));
        let crashed = failure(interpret(500, b"<html>oops</html>"));
        assert!(matches!(crashed, (BackendFailure::Error { code: Some(500), .. }, true)));
        let not_found = failure(interpret(404, b"not here"));
        assert!(matches!(not_found, (BackendFailure::Error { code: Some(404), .. }, false)));
    }
}
