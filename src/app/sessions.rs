//! HTTP sessions: Server-Sent Events (`GET /sse`), long-polling
//! (`GET /poll`) and commands over HTTP (`POST /cmd`), plus CORS and the
//! static client files.
//!
//! A session is a slot in the shard's connection slab without a socket
//! (`Phase::Session`): it subscribes, authenticates and receives exactly
//! like a WebSocket connection, but buffers what it sends (numbered) and
//! forwards it to whichever request currently serves it: an SSE stream or
//! a waiting poll. A request for a session on another shard hands its
//! connection to that shard (`Shard::migrate`), so a session's state never
//! leaves its shard.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::connection::http::{Attachment, BufItem, HttpRole, HttpSession, SessionKind};
use crate::connection::outbox::OutItem;
use crate::connection::{Connection, Context, Marks, Phase};
use crate::hub::index::ConnKey;
use crate::limits::ClientRates;
use crate::limits::LimitKind;
use crate::shard::{Conn, Shard};
use crate::util::{random_bytes, unix_time_ms};
use kometa_protocol::http::{self, Method, Request};
use kometa_protocol::json::ObjectWriter;
use kometa_protocol::session_id::{make_session_id, parse_event_id, parse_session_id};
use kometa_protocol::token::Identity;

/// What handling a request did to its connection.
pub(crate) enum Handled {
    /// Answered; the connection goes on (keep-alive) or ends as the request said.
    Answered,
    /// The connection now serves a session (stream or poll) or was handed to
    /// another shard: no keep-alive bookkeeping.
    Held,
}

const SSE_HEAD_RETRY: &[u8] = b"retry: 2000\n\n";

/// Static files served on the public port.
const CLIENT_JS: &str = include_str!("../../client/kometa.js");
const CLIENT_MJS: &str = include_str!("../../client/kometa.mjs");
const CLIENT_DTS: &str = include_str!("../../client/kometa.d.ts");
const DEMO_HTML: &str = include_str!("../../client/demo.html");

/// Where a session id points.
enum Located {
    Here(ConnKey, u32),
    /// On another shard: the connection was handed over.
    Migrated,
    Unknown,
}

impl Shard {
    /// `Access-Control-Allow-Origin` for this request: `*` with no
    /// allow-list, the request's origin when listed, `Err` when not. A
    /// request without `Origin` (same-origin in some browsers, or not a
    /// browser) is served as `allow_missing_origin` says, without the header.
    fn cors_origin(&self, request: &Request<'_>) -> Result<Option<String>, ()> {
        let allowed = &self.config.allowed_origins;
        match request.origin {
            _ if allowed.is_empty() => Ok(Some("*".into())),
            Some(origin) if allowed.iter().any(|o| o == origin) => Ok(Some(origin.into())),
            Some(_) => Err(()),
            None if self.config.allow_missing_origin => Ok(None),
            None => Err(()),
        }
    }

    fn respond_json(&mut self, key: ConnKey, status: u16, cors: Option<&str>, body: &[u8], keep_alive: bool) {
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json"), ("Cache-Control", "no-store")];
        if let Some(origin) = cors {
            headers.push(("Access-Control-Allow-Origin", origin));
            if origin != "*" {
                headers.push(("Vary", "Origin"));
            }
        }
        let mut response = Vec::with_capacity(200 + body.len());
        http::write_response_head(&mut response, status, &headers, Some(body.len()), keep_alive);
        response.extend_from_slice(body);
        self.send_owned(key, response);
    }

    fn respond_json_error(&mut self, key: ConnKey, status: u16, cors: Option<&str>, code: &str, message: &str) {
        let mut body = Vec::new();
        let mut object = ObjectWriter::new(&mut body);
        let mut inner = Vec::new();
        let mut error = ObjectWriter::new(&mut inner);
        error.str("code", code).str("message", message);
        error.finish();
        object.raw("error", &inner);
        object.finish();
        self.respond_json(key, status, cors, &body, false);
        self.end_after_flush(key);
    }

    /// Serves the browser client files and the demo page.
    pub(crate) fn static_file(&mut self, key: ConnKey, request: &Request<'_>) -> bool {
        let (body, content_type) = match request.path {
            "/kometa.js" => (CLIENT_JS, "text/javascript; charset=utf-8"),
            "/kometa.mjs" => (CLIENT_MJS, "text/javascript; charset=utf-8"),
            "/kometa.d.ts" => (CLIENT_DTS, "text/plain; charset=utf-8"),
            "/demo" | "/demo/" => (DEMO_HTML, "text/html; charset=utf-8"),
            _ => return false,
        };
        let keep_alive = request.keep_alive();
        if !matches!(request.method, Method::Get | Method::Head) {
            self.respond(key, 405, &[("Allow", "GET, HEAD")], "use GET", keep_alive, true);
            return true;
        }
        let headers = [
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("Access-Control-Allow-Origin", "*"),
            ("X-Content-Type-Options", "nosniff"),
        ];
        let mut response = Vec::with_capacity(256 + body.len());
        http::write_response_head(&mut response, 200, &headers, Some(body.len()), keep_alive);
        if request.method == Method::Get {
            response.extend_from_slice(body.as_bytes());
        }
        self.send_owned(key, response);
        true
    }

    /// `OPTIONS` on a session path: a CORS preflight.
    fn preflight(&mut self, key: ConnKey, request: &Request<'_>) {
        let keep_alive = request.keep_alive();
        let Ok(origin) = self.cors_origin(request) else {
            self.respond(key, 403, &[], "origin not allowed", false, true);
            self.end_after_flush(key);
            return;
        };
        let origin = origin.unwrap_or_else(|| "*".into());
        let headers = [
            ("Access-Control-Allow-Origin", origin.as_str()),
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", "Content-Type, Last-Event-ID"),
            ("Access-Control-Max-Age", "600"),
            ("Vary", "Origin"),
        ];
        let mut response = Vec::new();
        http::write_response_head(&mut response, 204, &headers, Some(0), keep_alive);
        self.send_owned(key, response);
    }

    /// Routes `/sse`, `/poll` and `/cmd`. `input` is the request and
    /// everything after it (handed over whole if the session is elsewhere).
    pub(crate) fn session_request(
        &mut self,
        key: ConnKey,
        generation: u32,
        request: &Request<'_>,
        body: &[u8],
        input: &[u8],
    ) -> Handled {
        if request.method == Method::Options {
            self.preflight(key, request);
            return Handled::Answered;
        }
        let Ok(cors) = self.cors_origin(request) else {
            self.respond(key, 403, &[], "origin not allowed", false, true);
            self.end_after_flush(key);
            return Handled::Held;
        };
        let cors = cors.as_deref();
        match (request.path, request.method) {
            ("/sse", Method::Get) => self.sse_request(key, generation, request, cors, input),
            ("/poll", Method::Get) => self.poll_request(key, generation, request, cors, input),
            ("/cmd", Method::Post) => self.command_request(key, request, cors, body, input),
            (path, _) => {
                let allow = if path == "/cmd" { "POST, OPTIONS" } else { "GET, OPTIONS" };
                self.respond(key, 405, &[("Allow", allow)], "method not allowed", request.keep_alive(), true);
                Handled::Answered
            }
        }
    }

    /// Finds the session `id` names: here, on another shard (the connection
    /// is handed over, with `input`), or nowhere.
    fn locate_session(&mut self, key: ConnKey, id: &str, input: &[u8]) -> Located {
        let Some((shard, session_key, session_generation)) = parse_session_id(id) else { return Located::Unknown };
        if shard != self.id {
            if shard >= self.shard_count() {
                return Located::Unknown;
            }
            self.hand_over(key, shard, input);
            return Located::Migrated;
        }
        let found = self.conn_mut(session_key, session_generation).is_some_and(|conn| {
            matches!(conn.state.http.as_deref(), Some(HttpRole::Session(session)) if crate::util::constant_time_eq(session.id.as_bytes(), id.as_bytes()))
        });
        if found {
            Located::Here(session_key, session_generation)
        } else {
            Located::Unknown
        }
    }

    /// Hands the request at `key` (and everything after it, `input`) to
    /// `shard`, where the session it asks for lives.
    pub(crate) fn hand_over(&mut self, key: ConnKey, shard: usize, input: &[u8]) {
        let has_output = self.conns.get(key as usize).is_some_and(|c| c.state.has_output());
        if has_output {
            // A pipelined earlier response is still queued here; moving
            // the socket now would reorder it. Rare: ask the client to retry.
            self.respond(key, 503, &[("Retry-After", "1")], "retry", false, true);
            self.end_after_flush(key);
            return;
        }
        self.migrate(key, shard, input);
    }

    /// Creates a session slot; `None` when `limits.http_sessions_max` is reached.
    pub(crate) fn create_session(&mut self, kind: SessionKind) -> Option<(ConnKey, u32)> {
        let open = self.shared.http_sessions.fetch_add(1, Ordering::Relaxed);
        if open >= self.config.limits.http_sessions_max || self.is_draining() {
            self.shared.http_sessions.fetch_sub(1, Ordering::Relaxed);
            if !self.is_draining() {
                self.metrics.limit_refusals.add(LimitKind::HttpSessionsMax);
            }
            return None;
        }
        let generation = self.take_generation();
        let entry = self.conns.vacant_entry();
        let key = entry.key() as ConnKey;
        let id = make_session_id(self.id, key, generation, &random_bytes::<16>());
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let state = Connection::session(generation, HttpSession::new(id, kind), &cx);
        let rates = ClientRates::new(&self.config.limits, self.now_ms);
        entry.insert(Conn { fd: None, rates, peer: None, state, tls: None });
        self.metrics.http_sessions += 1;
        self.metrics.handshakes[match kind {
            SessionKind::Sse => 1,
            SessionKind::LongPoll => 2,
            SessionKind::SockJs => 3,
        }] += 1;
        Some((key, generation))
    }

    /// Starts a new session for a request: token, hello message, the URL's
    /// channels. Errors are answered on `key`.
    fn new_session(
        &mut self,
        key: ConnKey,
        request: &Request<'_>,
        input: &[u8],
        cors: Option<&str>,
        kind: SessionKind,
        reason: Option<&str>,
    ) -> Option<(ConnKey, u32)> {
        let identity: Option<Identity> = match request.query_param("token") {
            None => None,
            Some(token) => match self.verifier.verify(&token, unix_time_ms() / 1000) {
                Ok(identity) => Some(identity),
                Err(error) => {
                    let code = if error.is_expired() { "token_expired" } else { "unauthorized" };
                    self.respond_json_error(key, 401, cors, code, error.message());
                    return None;
                }
            },
        };
        if self.cluster_refuses() {
            self.respond_json_error(
                key,
                503,
                cors,
                "unavailable",
                "the cluster's Redis is unreachable; try another node",
            );
            return None;
        }
        if !self.handshake_allowed(key) {
            let message = "too many new sessions from your address (limits.handshakes_per_ip_per_s)";
            self.respond_json_error(key, 429, cors, "rate_limited", message);
            return None;
        }
        let channels: Vec<String> = http::query_params(request.query, "channel").map(|c| c.into_owned()).collect();
        if channels.len() > self.config.limits.channels_per_connection_max {
            self.metrics.limit_refusals.add(LimitKind::ChannelsPerConnectionMax);
            self.respond_json_error(key, 400, cors, "too_many_channels", "too many channel parameters");
            return None;
        }
        let Some((session, generation)) = self.create_session(kind) else {
            self.respond_json_error(key, 503, cors, "overloaded", "too many sessions (limits.http_sessions_max)");
            return None;
        };
        let id = self.session_id(session).unwrap_or_default();
        let user = identity.as_ref().map(|i| Arc::clone(&i.user));
        self.send_json(session, |out| {
            let mut object = ObjectWriter::new(out);
            object.str("session", &id);
            match &user {
                Some(user) => object.str("user", user),
                None => object.raw("user", b"null"),
            };
            object.bool("resumed", false);
            if let Some(reason) = reason {
                object.str("reason", reason);
            }
            object.finish();
        });
        match identity {
            Some(identity) => self.register_user(session, generation, identity, None, false),
            // No token: the backend may know the user from its cookie. The
            // URL's subscriptions wait for its answer.
            None if self.connect_proxy_enabled() => {
                let headers = self.proxy_headers(&input[..request.head_len.min(input.len())]);
                self.connect_proxy(session, generation, headers);
            }
            None => {}
        }
        for channel in channels {
            let command = serde_json::json!({"op": "subscribe", "channel": channel}).to_string();
            if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                hs.commands.push_back(command.into_bytes().into_boxed_slice());
            }
        }
        self.run_session_commands(session, generation);
        Some((session, generation))
    }

    pub(crate) fn session_role(&mut self, key: ConnKey) -> Option<&mut HttpRole> {
        self.conns.get_mut(key as usize).and_then(|conn| conn.state.http.as_deref_mut())
    }

    fn session_id(&self, key: ConnKey) -> Option<String> {
        match self.conns.get(key as usize).and_then(|conn| conn.state.http.as_deref()) {
            Some(HttpRole::Session(session)) => Some(session.id.to_string()),
            _ => None,
        }
    }

    fn sse_request(
        &mut self,
        key: ConnKey,
        generation: u32,
        request: &Request<'_>,
        cors: Option<&str>,
        input: &[u8],
    ) -> Handled {
        let query_event_id = request.query_param("last_event_id");
        let event_id = request.last_event_id.map(str::to_owned).or(query_event_id.map(|c| c.into_owned()));
        let resume = match (&event_id, request.query_param("session")) {
            (Some(event_id), _) => parse_event_id(event_id).map(|(id, seq)| (id.to_string(), seq)),
            (None, Some(id)) => Some((id.into_owned(), 0)),
            (None, None) => None,
        };
        let mut reason = None;
        if let Some((id, seq)) = resume {
            match self.locate_session(key, &id, input) {
                Located::Migrated => return Handled::Held,
                Located::Here(session, session_generation) => {
                    if self.attach_stream(key, generation, session, session_generation, seq, cors) {
                        return Handled::Held;
                    }
                    // Messages the client missed were dropped: end the old session.
                    self.end_session(session, 1000, "session lost");
                    reason = Some("session_lost");
                }
                Located::Unknown => reason = Some("session_expired"),
            }
        }
        let Some((session, session_generation)) = self.new_session(key, request, input, cors, SessionKind::Sse, reason)
        else {
            return Handled::Held;
        };
        self.attach_stream(key, generation, session, session_generation, 0, cors);
        Handled::Held
    }

    /// Makes `stream` the SSE response of `session`, replaying what came
    /// after `seq`. False (nothing done) if some of it was dropped.
    fn attach_stream(
        &mut self,
        stream: ConnKey,
        stream_generation: u32,
        session: ConnKey,
        session_generation: u32,
        seq: u64,
        cors: Option<&str>,
    ) -> bool {
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return false };
        if hs.buffer.after(seq).is_err() {
            return false;
        }
        // A session may change transport (the client falls back between SSE
        // and long-polling with the same session): it is served as what
        // asks for it now.
        hs.kind = SessionKind::Sse;
        hs.buffer.ack(seq);
        let id = hs.id.to_string();
        let replay: Vec<(u64, Vec<u8>)> = match hs.buffer.after(seq) {
            Ok(tail) => tail.map(|(s, item)| (*s, item.json().to_vec())).collect(),
            Err(_) => Vec::new(),
        };
        let previous = hs.attached.replace(Attachment { key: stream, generation: stream_generation });
        if let Some(previous) = previous {
            self.release_request(previous, false);
        }
        if let Some(conn) = self.conn_mut(session, session_generation) {
            conn.state.session_served();
        }
        let mut headers: Vec<(&str, &str)> = vec![
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache, no-store, no-transform"),
            ("X-Accel-Buffering", "no"),
        ];
        if let Some(origin) = cors {
            headers.push(("Access-Control-Allow-Origin", origin));
        }
        let mut head = Vec::with_capacity(256);
        http::write_response_head(&mut head, 200, &headers, None, true);
        head.extend_from_slice(SSE_HEAD_RETRY);
        for (seq, json) in &replay {
            write_sse_event(&mut head, &id, *seq, json);
        }
        self.send_owned(stream, head);
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        if let Some(conn) = self.conns.get_mut(stream as usize).filter(|c| c.state.generation() == stream_generation) {
            conn.state.serve_stream(HttpRole::Stream { session, generation: session_generation }, &cx);
        }
        true
    }

    fn poll_request(
        &mut self,
        key: ConnKey,
        generation: u32,
        request: &Request<'_>,
        cors: Option<&str>,
        input: &[u8],
    ) -> Handled {
        let keep_alive = request.keep_alive();
        let Some(id) = request.query_param("session") else {
            // A new session: answer at once with its first messages.
            let Some((session, _)) = self.new_session(key, request, input, cors, SessionKind::LongPoll, None) else {
                return Handled::Held;
            };
            self.answer_poll(key, generation, session, 0, true, cors, keep_alive);
            return Handled::Held;
        };
        let cursor = match request.query_param("cursor").map(|c| c.parse::<u64>()) {
            None => 0,
            Some(Ok(cursor)) => cursor,
            Some(Err(_)) => {
                self.respond_json_error(key, 400, cors, "bad_request", "cursor must be a non-negative integer");
                return Handled::Held;
            }
        };
        let Some((session, session_generation)) = self.existing_session(key, &id, input, cors) else {
            return Handled::Held;
        };
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return Handled::Held };
        // Served as long-polling from now on, whatever it was created as.
        hs.kind = SessionKind::LongPoll;
        if hs.buffer.after(cursor).is_err() {
            self.respond_json_error(
                key,
                410,
                cors,
                "session_lost",
                "messages after this cursor were dropped; start a new session",
            );
            self.end_session(session, 1000, "session lost");
            return Handled::Held;
        }
        hs.buffer.ack(cursor);
        if hs.buffer.has_after(cursor) {
            self.answer_poll(key, generation, session, cursor, true, cors, keep_alive);
            return Handled::Held;
        }
        // Nothing yet: wait. A newer poll replaces an older one.
        let previous = hs.attached.replace(Attachment { key, generation });
        if let Some(previous) = previous {
            self.release_request(previous, false);
        }
        if let Some(conn) = self.conn_mut(session, session_generation) {
            conn.state.session_served();
        }
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        if let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) {
            let cors = cors.map(Box::from);
            let role = HttpRole::Poll { session, generation: session_generation, cursor, keep_alive, cors };
            conn.state.serve_poll(role, &cx);
        }
        Handled::Held
    }

    /// Answers a poll on `key` with the messages of `session` after
    /// `cursor` (or none), then the connection reads its next request (or
    /// closes) and the session's grace period starts.
    #[allow(clippy::too_many_arguments)]
    fn answer_poll(
        &mut self,
        key: ConnKey,
        generation: u32,
        session: ConnKey,
        cursor: u64,
        with_messages: bool,
        cors: Option<&str>,
        keep_alive: bool,
    ) {
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return };
        let mut body = Vec::with_capacity(128);
        let mut last = cursor;
        body.extend_from_slice(b"{\"session\":");
        kometa_protocol::json::write_str(&mut body, &hs.id);
        body.extend_from_slice(b",\"messages\":[");
        if with_messages {
            if let Ok(tail) = hs.buffer.after(cursor) {
                for (index, (seq, item)) in tail.enumerate() {
                    if index > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(item.json());
                    last = *seq;
                }
            }
        }
        body.extend_from_slice(b"],\"cursor\":");
        kometa_protocol::json::write_u64(&mut body, last);
        body.push(b'}');
        if let Some(HttpRole::Session(hs)) = self.session_role(session) {
            if hs.attached.is_some_and(|a| a.key == key && a.generation == generation) {
                hs.attached = None;
            }
        }
        self.detached_now(session);
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        if let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) {
            conn.state.poll_answered(&cx);
        }
        self.respond_json(key, 200, cors, &body, keep_alive);
        if keep_alive {
            // Pipelined input waited while this poll was held.
            self.mark_ready(key, generation);
        } else {
            self.end_after_flush(key);
        }
    }

    /// The session has no stream or poll any more: its grace period starts.
    pub(crate) fn detached_now(&mut self, session: ConnKey) {
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        if let Some(conn) = self.conns.get_mut(session as usize) {
            if let Some(HttpRole::Session(hs)) = conn.state.http.as_deref() {
                if hs.attached.is_none() {
                    conn.state.session_unserved(&cx);
                }
            }
        }
    }

    /// Releases the request serving a session: a stream ends; a waiting
    /// poll is answered, with the session's new messages or with none.
    fn release_request(&mut self, attachment: Attachment, with_messages: bool) {
        let Attachment { key, generation } = attachment;
        let Some(conn) = self.conn_mut(key, generation) else { return };
        match conn.state.http.take().map(|role| *role) {
            Some(HttpRole::Stream { .. }) => self.end_after_flush(key),
            Some(HttpRole::Poll { session, cursor, keep_alive, cors, .. }) => {
                self.answer_poll(key, generation, session, cursor, with_messages, cors.as_deref(), keep_alive);
            }
            other => {
                if let Some(conn) = self.conn_mut(key, generation) {
                    conn.state.http = other.map(Box::new);
                }
            }
        }
    }

    /// The session `id` names, here; or `None` once the request has been
    /// handed to the session's shard or answered 410 (no such session).
    fn existing_session(&mut self, key: ConnKey, id: &str, input: &[u8], cors: Option<&str>) -> Option<(ConnKey, u32)> {
        match self.locate_session(key, id, input) {
            Located::Migrated => None,
            Located::Unknown => {
                let message = "no such session (expired or never existed)";
                self.respond_json_error(key, 410, cors, "session_expired", message);
                None
            }
            Located::Here(session, session_generation) => Some((session, session_generation)),
        }
    }

    fn command_request(
        &mut self,
        key: ConnKey,
        request: &Request<'_>,
        cors: Option<&str>,
        body: &[u8],
        input: &[u8],
    ) -> Handled {
        let keep_alive = request.keep_alive();
        let Some(id) = request.query_param("session") else {
            self.respond_json_error(key, 404, cors, "session_expired", "missing ?session=");
            return Handled::Held;
        };
        let Some((session, session_generation)) = self.existing_session(key, &id, input, cors) else {
            return Handled::Held;
        };
        // One command, or an array of them.
        let parsed = match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice::<Vec<&RawValue>>(body),
            _ => serde_json::from_slice::<&RawValue>(body).map(|command| vec![command]),
        };
        let Ok(commands) = parsed else {
            let message = "body must be a JSON command or an array of them";
            self.respond_json_error(key, 400, cors, "bad_request", message);
            return Handled::Held;
        };
        let pending_max = self.config.limits.session_commands_pending_max;
        if commands.len() > pending_max {
            let message = format!("at most {pending_max} commands per request (limits.session_commands_pending_max)");
            self.respond_json_error(key, 413, cors, "too_large", &message);
            return Handled::Held;
        }
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return Handled::Held };
        if hs.commands.len() + commands.len() > pending_max {
            self.metrics.limit_refusals.add(LimitKind::SessionCommandsPendingMax);
            self.respond_json_error(key, 429, cors, "overloaded", "too many commands waiting in this session");
            return Handled::Held;
        }
        for command in &commands {
            hs.commands.push_back(command.get().as_bytes().into());
        }
        let body = format!("{{\"ok\":true,\"queued\":{}}}", commands.len());
        self.respond_json(key, 202, cors, body.as_bytes(), keep_alive);
        self.run_session_commands(session, session_generation);
        Handled::Answered
    }

    /// Runs a session's queued commands in order until one must wait for an owner.
    pub(crate) fn run_session_commands(&mut self, key: ConnKey, generation: u32) {
        loop {
            let Some(conn) = self.conn_mut(key, generation) else { return };
            if conn.state.marks.contains(Marks::AWAITING_REPLY) {
                return;
            }
            let Some(HttpRole::Session(hs)) = conn.state.http.as_deref_mut() else { return };
            let Some(command) = hs.commands.pop_front() else {
                if hs.kind == SessionKind::SockJs {
                    // A WebSocket held back while these piled up reads on.
                    self.sockjs_commands_drained(key);
                }
                return;
            };
            self.client_command(key, generation, &command);
        }
    }

    /// Adds a message to a session and forwards it to the request serving it.
    pub(crate) fn session_push(&mut self, key: ConnKey, item: BufItem) {
        let (messages_max, bytes_max) =
            (self.config.limits.session_buffer_messages_max, self.config.limits.session_buffer_bytes_max);
        let Some(HttpRole::Session(hs)) = self.session_role(key) else { return };
        if hs.kind == SessionKind::SockJs {
            self.sockjs_push(key, item);
            return;
        }
        let seq = hs.buffer.push(item, messages_max, bytes_max);
        let Some(attachment) = hs.attached else { return };
        match hs.kind {
            SessionKind::Sse => {
                let mut event = Vec::new();
                if let Ok(mut tail) = hs.buffer.after(seq - 1) {
                    if let Some((seq, item)) = tail.next() {
                        write_sse_event(&mut event, &hs.id, *seq, item.json());
                    }
                }
                if !event.is_empty() && self.alive(attachment.key, attachment.generation) {
                    self.metrics.messages_out += 1;
                    self.send_item(attachment.key, OutItem::Owned(event.into_boxed_slice()));
                }
            }
            SessionKind::LongPoll => self.release_request(attachment, true),
            SessionKind::SockJs => {}
        }
    }

    /// Ends a session: a final `{"close":…}` message, then the slot goes
    /// (unsubscribing everything) and its stream or poll ends.
    pub(crate) fn end_session(&mut self, key: ConnKey, code: u16, reason: &str) {
        match self.session_role(key) {
            Some(HttpRole::Session(hs)) if hs.kind == SessionKind::SockJs => {
                self.sockjs_end(key, code, reason);
                return;
            }
            Some(HttpRole::Session(_)) => {}
            _ => return,
        }
        self.send_json(key, |out| {
            let mut object = ObjectWriter::new(out);
            let mut inner = Vec::new();
            let mut close = ObjectWriter::new(&mut inner);
            close.u64("code", u64::from(code)).str("reason", reason);
            close.finish();
            object.raw("close", &inner);
            object.finish();
        });
        self.close_conn(key);
    }

    /// Called when a slot with an HTTP role is removed.
    pub(crate) fn release_http_role(&mut self, key: ConnKey, role: HttpRole) {
        match role {
            HttpRole::Session(session) => {
                self.shared.http_sessions.fetch_sub(1, Ordering::Relaxed);
                self.metrics.http_sessions -= 1;
                if let Some(sockjs) = session.sockjs {
                    self.sockjs_session_gone(key, &sockjs, session.attached);
                    return;
                }
                if let Some(attachment) = session.attached {
                    // The session is gone: its stream ends, its poll closes.
                    if let Some(conn) = self.conn_mut(attachment.key, attachment.generation) {
                        let phase = conn.state.phase();
                        conn.state.http = None;
                        match phase {
                            Phase::Stream => self.end_after_flush(attachment.key),
                            Phase::Polling => self.close_conn(attachment.key),
                            _ => {}
                        }
                    }
                }
            }
            HttpRole::Stream { session, .. } | HttpRole::Poll { session, .. } => {
                if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                    if hs.attached.is_some_and(|a| a.key == key) {
                        hs.attached = None;
                        self.detached_now(session);
                    }
                }
            }
            HttpRole::SockJs(request) => self.sockjs_request_gone(key, *request),
        }
    }

    /// Sweep: a poll waited its full time; it is answered with nothing.
    pub(crate) fn poll_timeout(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        let generation = conn.state.generation();
        match conn.state.http.as_deref() {
            Some(HttpRole::Poll { session, .. }) => {
                let session = *session;
                if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                    if hs.attached.is_some_and(|a| a.key == key && a.generation == generation) {
                        hs.attached = None;
                    }
                }
                self.release_request(Attachment { key, generation }, false);
            }
            Some(HttpRole::SockJs(_)) => self.sockjs_poll_timeout(key, generation),
            _ => self.close_conn(key),
        }
    }
}

/// `id: SESSION:SEQ` and one `data:` line (JSON never holds a raw newline).
fn write_sse_event(out: &mut Vec<u8>, session: &str, seq: u64, json: &[u8]) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(session.as_bytes());
    out.push(b':');
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    #[test]
    fn sse_event_format() {
        let mut out = Vec::new();
        super::write_sse_event(&mut out, "s0.1.2.ab", 7, br#"{"a":1}"#);
        assert_eq!(out, b"id: s0.1.2.ab:7\ndata: {\"a\":1}\n\n");
    }

    #[test]
    fn client_names_are_valid() {
        assert!(kometa_protocol::client::check_channel_name("web_demo", 255).is_ok());
    }
}
