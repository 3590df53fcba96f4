//! HTTP requests on the public port, once the connection has parsed them:
//! health checks, WebSocket upgrades, and a status with a reason for
//! everything else.

use std::sync::atomic::Ordering;

use crate::app::sessions::Handled;
use crate::config::RedisDownPolicy;
use crate::connection::Context;
use crate::hub::index::ConnKey;
use crate::limits::LimitKind;
use crate::shard::Shard;
use crate::util::unix_time_ms;
use kometa_protocol::http::{self, Method, Request};
use kometa_protocol::ws;

impl Shard {
    /// Answers a request; returns true if the connection is now held by
    /// something else (a WebSocket, an SSE stream, a poll, another shard).
    pub(crate) fn route(
        &mut self,
        key: ConnKey,
        generation: u32,
        request: &Request<'_>,
        body: &[u8],
        input: &[u8],
    ) -> bool {
        let keep_alive = request.keep_alive();
        let with_body = request.method != Method::Head;
        match request.path {
            "/sse" | "/poll" | "/cmd" => {
                return matches!(self.session_request(key, generation, request, body, input), Handled::Held);
            }
            _ if self.static_file(key, request) => {}
            "/health" => match request.method {
                Method::Get | Method::Head if self.is_cluster() => self.cluster_health(key, keep_alive, with_body),
                Method::Get | Method::Head => self.respond(key, 200, &[], "ok", keep_alive, with_body),
                _ => self.respond(key, 405, &[("Allow", "GET, HEAD")], "use GET", keep_alive, with_body),
            },
            "/ws" => return self.upgrade(key, request, input, false),
            // `OPTIONS *` (RFC 9110 §9.3.7): what the server allows.
            "*" => self.respond(key, 204, &[("Allow", "GET, HEAD, POST, OPTIONS")], "", keep_alive, false),
            path if self.config.echo_path.as_deref() == Some(path) => return self.upgrade(key, request, input, true),
            _ => {
                if let Some(held) = self.sockjs_request(key, generation, request, body, input) {
                    return held;
                }
                self.respond(key, 404, &[], "not found", keep_alive, with_body);
            }
        }
        false
    }

    /// Cluster mode: whether `cluster.on_redis_down = "refuse"` turns new
    /// connections away now (a Redis is unreachable).
    pub(crate) fn cluster_refuses(&self) -> bool {
        self.config.cluster.enabled()
            && self.config.cluster.on_redis_down == RedisDownPolicy::Refuse
            && self.shared.cluster_degraded.load(Ordering::Acquire)
    }

    /// `/health` of a cluster node: the cluster's state as JSON; 503 while
    /// this node refuses new connections (so a load balancer skips it).
    fn cluster_health(&mut self, key: ConnKey, keep_alive: bool, with_body: bool) {
        let degraded = self.shared.cluster_degraded.load(Ordering::Acquire);
        let cluster = self.shared.cluster_health.lock().map(|h| h.clone()).unwrap_or_default();
        let status = if degraded { "degraded" } else { "ok" };
        let body =
            format!("{{\"status\":\"{status}\",\"cluster\":{}}}", if cluster.is_empty() { "null" } else { &cluster });
        let code = if self.cluster_refuses() { 503 } else { 200 };
        let mut response = Vec::with_capacity(body.len() + 128);
        http::write_response_head(
            &mut response,
            code,
            &[("Content-Type", "application/json")],
            Some(body.len()),
            keep_alive,
        );
        if with_body {
            response.extend_from_slice(body.as_bytes());
        }
        self.send_owned(key, response);
    }

    /// `input`: the request head and what follows (for the connect proxy).
    pub(crate) fn upgrade(&mut self, key: ConnKey, request: &Request<'_>, input: &[u8], echo: bool) -> bool {
        let Some(upgrade) = self.check_upgrade(key, request) else { return false };
        // A token in the URL is checked before the upgrade: a bad one gets
        // 401 with the reason, never an anonymous connection.
        let identity = match request.query_param("token") {
            None => None,
            Some(token) => match self.verifier.verify(&token, unix_time_ms() / 1000) {
                Ok(identity) => Some(identity),
                Err(error) => {
                    self.respond(key, 401, &[], error.message(), false, true);
                    self.end_after_flush(key);
                    return false;
                }
            },
        };
        let Some(generation) = self.complete_upgrade(key, &upgrade, echo) else { return false };
        match identity {
            Some(identity) => self.register_user(key, generation, identity, None, false),
            // No token: the backend may know the user from its cookie.
            None if !echo && self.connect_proxy_enabled() => {
                let headers = self.proxy_headers(&input[..request.head_len.min(input.len())]);
                self.connect_proxy(key, generation, headers);
            }
            None => {}
        }
        true
    }

    /// Takes a handshake token of the connection's address (an upgrade or
    /// a new HTTP session); false, counted, past `limits.handshakes_per_ip_per_s`.
    pub(crate) fn handshake_allowed(&mut self, key: ConnKey) -> bool {
        let Some(peer) = self.conns.get(key as usize).and_then(|conn| conn.peer) else { return true };
        let limiter = &self.shared.limiter;
        if limiter.handshake(peer, limiter.now_ms()) {
            return true;
        }
        self.metrics.limit_refusals.add(LimitKind::HandshakesPerIp);
        false
    }

    /// The checks of a WebSocket upgrade (RFC 6455, origins, a cluster
    /// that turns new connections away, handshakes per address); a refusal
    /// is answered and the connection ends.
    pub(crate) fn check_upgrade(&mut self, key: ConnKey, request: &Request<'_>) -> Option<ws::Upgrade> {
        let upgrade = match ws::check_upgrade(request, &self.config.allowed_origins, self.config.allow_missing_origin) {
            Ok(upgrade) => upgrade,
            Err(refusal) => {
                self.respond(key, refusal.status, refusal.headers, refusal.reason, false, true);
                self.end_after_flush(key);
                return None;
            }
        };
        if self.cluster_refuses() {
            let reason = "the cluster's Redis is unreachable; try another node";
            self.respond(key, 503, &[("Retry-After", "1")], reason, false, true);
            self.end_after_flush(key);
            return None;
        }
        if !self.handshake_allowed(key) {
            let reason = "too many WebSocket handshakes from your address (limits.handshakes_per_ip_per_s)";
            self.respond(key, 429, &[("Retry-After", "1")], reason, false, true);
            self.end_after_flush(key);
            return None;
        }
        Some(upgrade)
    }

    /// Answers 101: the connection speaks WebSocket from now on. Returns its
    /// generation.
    pub(crate) fn complete_upgrade(&mut self, key: ConnKey, upgrade: &ws::Upgrade, echo: bool) -> Option<u32> {
        let mut response = Vec::with_capacity(160);
        ws::write_upgrade_response(&mut response, upgrade);
        self.send_owned(key, response);
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let conn = self.conns.get_mut(key as usize)?;
        conn.state.upgraded(echo, &cx);
        self.metrics.websockets += 1;
        self.metrics.handshakes[0] += 1;
        Some(conn.state.generation())
    }

    /// Sends a plain-text response.
    pub(crate) fn respond(
        &mut self,
        key: ConnKey,
        status: u16,
        headers: &[(&str, &str)],
        message: &str,
        keep_alive: bool,
        with_body: bool,
    ) {
        let mut response = Vec::with_capacity(160 + message.len());
        if with_body {
            http::write_text_response(&mut response, status, headers, message, keep_alive);
        } else {
            http::write_response_head(&mut response, status, headers, Some(message.len() + 1), keep_alive);
        }
        self.send_owned(key, response);
    }
}
