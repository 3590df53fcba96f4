//! SockJS endpoints (docs/sockjs.md): `sockjs.prefix` carries the client
//! protocol's JSON commands inside SockJS messages, `sockjs.jii_prefix` the
//! Jii-comet text protocol (`app::jii`), and with `sockjs.test_services`
//! the conformance suite's `/echo`, `/close`, `/disabled_websocket_echo`
//! and `/cookie_needed_echo`.
//!
//! A SockJS session is an HTTP session slot (`SessionKind::SockJs`): it
//! subscribes, authenticates and buffers like any Kometa session, and its
//! messages wait in the session buffer until a request takes them. The
//! request receiving its frames is attached to it, like an SSE stream:
//! - a poll (xhr, jsonp) waits in the connection's `Polling` phase and is
//!   answered with the frames waiting, or a heartbeat;
//! - a stream (xhr_streaming, eventsource, htmlfile) waits in the same
//!   phase while frames are written to it, and ends after
//!   `sockjs.response_limit_bytes` (the client opens the next);
//! - a WebSocket stays in its WebSocket phase; its messages go to the
//!   session and the session's frames come back as text messages.
//!
//! HTTP sessions are found by the id the client chose, on the shard that
//! id hashes to (a request arriving elsewhere is handed over whole, like a
//! Kometa session's). A WebSocket session lives and dies with its socket.
//! A closed session is remembered for `timeouts.session_grace_ms`: every
//! request for it gets the close frame. When the receiving request of a
//! session breaks off, the session is closed (1002, as the protocol says).

use std::sync::atomic::Ordering;

use crate::connection::http::{Attachment, BufItem, HttpRole, SessionKind};
use crate::connection::sockjs::{Closed, Framing, Lookup, Service, SockJsRequest, SockJsSession};
use crate::connection::{Context, Marks};
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::shard::Shard;
use crate::util::{random_u64, unix_time_ms};
use kometa_protocol::http::{self, Method, Request};
use kometa_protocol::sockjs::{self as codec, close, Route, Transport};
use kometa_protocol::ws;

/// A SockJS service at a prefix, with its options.
#[derive(Debug, Clone, Copy)]
struct Endpoint {
    service: Service,
    websocket: bool,
    cookie_needed: bool,
}

/// Why a new session was not opened.
struct Refused(&'static str);

/// A session just opened, and the close it must get right after its open
/// frame (a bad token, the `close` test service).
struct Opened {
    key: ConnKey,
    generation: u32,
    close_after: Option<(u16, String)>,
}

/// The close code a WebSocket close frame may carry for a SockJS close
/// code (2010 and the like are SockJS-only).
fn websocket_close_code(code: u16) -> u16 {
    match code {
        1000..=1003 | 1007..=1011 | 3000..=4999 => code,
        _ => ws::close::NORMAL,
    }
}

impl Shard {
    /// Serves a request below a SockJS prefix; `None` when the path is
    /// under none. `Some(true)` when the connection is now held (a poll,
    /// a stream, a WebSocket, another shard).
    pub(crate) fn sockjs_request(
        &mut self,
        key: ConnKey,
        generation: u32,
        request: &Request<'_>,
        body: &[u8],
        input: &[u8],
    ) -> Option<bool> {
        let (endpoint, rest) = self.sockjs_endpoint(request.path)?;
        Some(self.sockjs_dispatch(key, generation, endpoint, rest, request, body, input))
    }

    /// The service whose prefix `path` starts with, and the rest of the path.
    fn sockjs_endpoint<'p>(&self, path: &'p str) -> Option<(Endpoint, &'p str)> {
        let config = &self.config.sockjs;
        let below = |prefix: &str| path.strip_prefix(prefix).filter(|rest| rest.is_empty() || rest.starts_with('/'));
        let kometa =
            Endpoint { service: Service::Kometa, websocket: config.websocket, cookie_needed: config.cookie_needed };
        if config.enabled {
            if let Some(rest) = below(&config.prefix) {
                return Some((kometa, rest));
            }
        }
        if config.jii_enabled {
            if let Some(rest) = below(&config.jii_prefix) {
                return Some((Endpoint { service: Service::Jii, ..kometa }, rest));
            }
        }
        if !config.test_services {
            return None;
        }
        let echo = Endpoint { service: Service::Echo, websocket: true, cookie_needed: false };
        let tests = [
            ("/echo", echo),
            ("/close", Endpoint { service: Service::Close, ..echo }),
            ("/disabled_websocket_echo", Endpoint { websocket: false, ..echo }),
            ("/cookie_needed_echo", Endpoint { cookie_needed: true, ..echo }),
        ];
        tests.into_iter().find_map(|(prefix, endpoint)| below(prefix).map(|rest| (endpoint, rest)))
    }

    #[allow(clippy::too_many_arguments)]
    fn sockjs_dispatch(
        &mut self,
        key: ConnKey,
        generation: u32,
        endpoint: Endpoint,
        rest: &str,
        request: &Request<'_>,
        body: &[u8],
        input: &[u8],
    ) -> bool {
        let Ok(origin) = self.sockjs_origin(request) else {
            self.respond(key, 403, &[], "origin not allowed", false, true);
            self.end_after_flush(key);
            return false;
        };
        let text = Some("text/plain; charset=UTF-8");
        match codec::route(rest) {
            Route::Greeting => match request.method {
                Method::Get | Method::Head => {
                    self.sockjs_plain(key, request, 200, text, &[], codec::GREETING.as_bytes())
                }
                _ => self.sockjs_plain(key, request, 405, None, &[("Allow", "GET, HEAD")], b""),
            },
            Route::Info => match request.method {
                Method::Options => self.sockjs_preflight(key, request, input, origin, "OPTIONS, GET"),
                Method::Get => self.sockjs_info(key, request, endpoint, origin),
                _ => self.sockjs_plain(key, request, 405, None, &[("Allow", "OPTIONS, GET")], b""),
            },
            Route::Iframe => match request.method {
                Method::Get | Method::Head => self.sockjs_iframe(key, request, input),
                _ => self.sockjs_plain(key, request, 405, None, &[("Allow", "GET, HEAD")], b""),
            },
            Route::RawWebSocket => return self.sockjs_websocket(key, endpoint, Framing::Raw, request, input),
            Route::Session { transport: Transport::WebSocket, .. } => {
                return self.sockjs_websocket(key, endpoint, Framing::SockJs, request, input);
            }
            Route::Session { session, transport } => {
                return self
                    .sockjs_session_request(key, generation, endpoint, session, transport, request, body, input);
            }
            Route::NotFound => self.sockjs_plain(key, request, 404, text, &[], b"not found"),
        }
        false
    }

    /// CORS: the request's origin is echoed (with credentials, which
    /// sockjs-client sends), `*` without one; with `allowed_origins` set,
    /// other origins are refused.
    fn sockjs_origin<'r>(&self, request: &Request<'r>) -> Result<Option<&'r str>, ()> {
        let allowed = &self.config.allowed_origins;
        match request.origin {
            Some(origin) if !allowed.is_empty() && !allowed.iter().any(|o| o == origin) => Err(()),
            origin => Ok(origin),
        }
    }

    /// A complete response with a body (none for HEAD).
    fn sockjs_plain(
        &mut self,
        key: ConnKey,
        request: &Request<'_>,
        status: u16,
        content_type: Option<&str>,
        extra: &[(&str, &str)],
        body: &[u8],
    ) {
        let keep_alive = request.keep_alive();
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 2);
        if let Some(content_type) = content_type {
            headers.push(("Content-Type", content_type));
        }
        headers.extend_from_slice(extra);
        if keep_alive && request.minor_version == 0 {
            headers.push(("Connection", "keep-alive"));
        }
        let length = (!matches!(status, 204 | 304)).then_some(body.len());
        let mut response = Vec::with_capacity(256 + body.len());
        http::write_response_head(&mut response, status, &headers, length, keep_alive);
        if request.method != Method::Head {
            response.extend_from_slice(body);
        }
        self.send_owned(key, response);
    }

    fn sockjs_preflight(
        &mut self,
        key: ConnKey,
        request: &Request<'_>,
        input: &[u8],
        origin: Option<&str>,
        methods: &str,
    ) {
        let expires = codec::http_date(unix_time_ms() / 1000 + codec::CACHE_MAX_AGE_S);
        let max_age = codec::CACHE_MAX_AGE_S.to_string();
        let cache = format!("public, max-age={max_age}");
        let mut headers = vec![
            ("Cache-Control", cache.as_str()),
            ("Expires", expires.as_str()),
            ("Access-Control-Max-Age", max_age.as_str()),
            ("Access-Control-Allow-Methods", methods),
        ];
        push_cors(&mut headers, origin);
        // The browser asks which request headers it may send; they are echoed.
        let asked =
            request_head(request, input).and_then(|head| codec::header_value(head, "Access-Control-Request-Headers"));
        if let Some(asked) = asked.filter(|value| !value.is_empty()) {
            headers.push(("Access-Control-Allow-Headers", asked));
        }
        self.sockjs_plain(key, request, 204, None, &headers, b"");
    }

    fn sockjs_info(&mut self, key: ConnKey, request: &Request<'_>, endpoint: Endpoint, origin: Option<&str>) {
        let body = format!(
            "{{\"websocket\":{},\"cookie_needed\":{},\"origins\":[\"*:*\"],\"entropy\":{}}}",
            endpoint.websocket,
            endpoint.cookie_needed,
            random_u64() as u32
        );
        let mut headers = vec![("Cache-Control", codec::NO_CACHE)];
        push_cors(&mut headers, origin);
        self.sockjs_plain(key, request, 200, Some("application/json; charset=UTF-8"), &headers, body.as_bytes());
    }

    /// The iframe page, cacheable for a year, with an ETag (304 when the
    /// client has it).
    fn sockjs_iframe(&mut self, key: ConnKey, request: &Request<'_>, input: &[u8]) {
        let page = codec::iframe_page(&self.config.sockjs.client_url);
        let etag = codec::etag(page.as_bytes());
        let if_none_match = request_head(request, input).and_then(|head| codec::header_value(head, "If-None-Match"));
        if if_none_match.is_some_and(|value| codec::etag_matches(value, &etag)) {
            self.sockjs_plain(key, request, 304, None, &[("ETag", etag.as_str())], b"");
            return;
        }
        let expires = codec::http_date(unix_time_ms() / 1000 + codec::CACHE_MAX_AGE_S);
        let cache = format!("public, max-age={}", codec::CACHE_MAX_AGE_S);
        let headers = [("Cache-Control", cache.as_str()), ("Expires", expires.as_str()), ("ETag", etag.as_str())];
        self.sockjs_plain(key, request, 200, Some("text/html; charset=UTF-8"), &headers, page.as_bytes());
    }

    // -- Session requests (HTTP transports) ---------------------------------

    #[allow(clippy::too_many_arguments)]
    fn sockjs_session_request(
        &mut self,
        key: ConnKey,
        generation: u32,
        endpoint: Endpoint,
        sid: &str,
        transport: Transport,
        request: &Request<'_>,
        body: &[u8],
        input: &[u8],
    ) -> bool {
        let text = Some("text/plain; charset=UTF-8");
        let post = transport.method_is_post();
        match request.method {
            Method::Options if post => {
                let origin = self.sockjs_origin(request).ok().flatten();
                self.sockjs_preflight(key, request, input, origin, "OPTIONS, POST");
                return false;
            }
            Method::Post if post => {}
            Method::Get if !post => {}
            _ => {
                let allow = if post { "OPTIONS, POST" } else { "GET" };
                self.sockjs_plain(key, request, 405, None, &[("Allow", allow)], b"");
                return false;
            }
        }
        let callback = if transport.needs_callback() {
            match request.query_param("c") {
                None => {
                    self.sockjs_plain(key, request, 500, text, &[], b"\"callback\" parameter required");
                    return false;
                }
                Some(callback) if !codec::callback_is_valid(&callback) => {
                    self.sockjs_plain(key, request, 500, text, &[], b"invalid \"callback\" parameter");
                    return false;
                }
                Some(callback) => callback.into_owned().into_boxed_str(),
            }
        } else {
            Box::from("")
        };
        // Every request of a session goes to the shard its id hashes to.
        let shard = owner_of(sid, self.shard_count());
        if shard != self.id {
            self.hand_over(key, shard, input);
            return true;
        }
        let set_cookie = endpoint.cookie_needed.then(|| {
            let cookie = request_head(request, input).and_then(|head| codec::header_value(head, "Cookie"));
            let value = cookie.and_then(codec::jsessionid).unwrap_or("dummy");
            format!("JSESSIONID={value}; path=/").into_boxed_str()
        });
        let meta = SockJsRequest {
            session: 0,
            generation: 0,
            transport,
            framing: Framing::SockJs,
            callback,
            sent_bytes: 0,
            chunked: request.minor_version >= 1,
            keep_alive: request.keep_alive(),
            http10: request.minor_version == 0,
            origin: self.sockjs_origin(request).ok().flatten().map(Box::from),
            set_cookie,
        };
        if transport.is_send() {
            self.sockjs_send(key, endpoint, sid, &meta, request, body);
            return false;
        }
        match self.sockjs.lookup(endpoint.service, sid, self.now_ms) {
            Lookup::Closed(closed) => {
                let mut frame = Vec::new();
                codec::write_close(&mut frame, closed.code, &closed.reason);
                self.sockjs_reply_once(key, &meta, &frame)
            }
            Lookup::Live(session, session_generation) => {
                let taken = matches!(self.session_role(session), Some(HttpRole::Session(hs)) if hs.attached.is_some());
                if taken {
                    let mut frame = Vec::new();
                    codec::write_close(&mut frame, close::ANOTHER_CONNECTION.0, close::ANOTHER_CONNECTION.1);
                    return self.sockjs_reply_once(key, &meta, &frame);
                }
                self.sockjs_attach(key, generation, session, session_generation, meta, false)
            }
            Lookup::Unknown => match self.sockjs_open_session(endpoint.service, sid, request) {
                Err(Refused(why)) => {
                    self.sockjs_plain(key, request, 503, text, &[("Retry-After", "1")], why.as_bytes());
                    false
                }
                Ok(opened) => {
                    let held = self.sockjs_attach(key, generation, opened.key, opened.generation, meta, true);
                    if let Some((code, reason)) = opened.close_after {
                        self.sockjs_end(opened.key, code, &reason);
                    }
                    held
                }
            },
        }
    }

    /// xhr_send and jsonp_send: messages for an open session.
    fn sockjs_send(
        &mut self,
        key: ConnKey,
        endpoint: Endpoint,
        sid: &str,
        meta: &SockJsRequest,
        request: &Request<'_>,
        body: &[u8],
    ) {
        let text = Some("text/plain; charset=UTF-8");
        let Lookup::Live(session, session_generation) = self.sockjs.lookup(endpoint.service, sid, self.now_ms) else {
            self.sockjs_plain(key, request, 404, text, &[], b"no such session");
            return;
        };
        // jsonp_send posts a form (`d=…`), or the payload itself.
        let form = meta.transport == Transport::JsonpSend
            && request.content_type.is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        let field;
        let payload: &[u8] = if form {
            field = std::str::from_utf8(body).ok().and_then(|form| http::query_param(form, "d"));
            field.as_deref().unwrap_or("").as_bytes()
        } else {
            body
        };
        let messages = match codec::decode_messages(payload, self.config.sockjs.pending_messages_max) {
            Ok(messages) => messages,
            Err(error) => {
                self.sockjs_plain(key, request, 500, text, &[], error.reason().as_bytes());
                return;
            }
        };
        if self.sockjs_incoming(session, session_generation, messages, None).is_err() {
            let reason = b"too many messages waiting in this session (sockjs.pending_messages_max)";
            self.sockjs_plain(key, request, 429, text, &[("Retry-After", "1")], reason);
            return;
        }
        let mut headers = vec![("Cache-Control", codec::NO_CACHE)];
        push_cors(&mut headers, meta.origin.as_deref());
        if let Some(cookie) = meta.set_cookie.as_deref() {
            headers.push(("Set-Cookie", cookie));
        }
        match meta.transport {
            Transport::XhrSend => self.sockjs_plain(key, request, 204, text, &headers, b""),
            _ => self.sockjs_plain(key, request, 200, text, &headers, b"ok"),
        }
    }

    /// Opens a session: a slot (bounded by `sockjs.sessions_max` and
    /// `limits.http_sessions_max`), findable by `sid` when it has one.
    fn sockjs_open_session(&mut self, service: Service, sid: &str, request: &Request<'_>) -> Result<Opened, Refused> {
        if self.cluster_refuses() {
            return Err(Refused("the cluster's Redis is unreachable; try another node"));
        }
        let open = self.shared.sockjs_sessions.fetch_add(1, Ordering::Relaxed);
        if open >= self.config.sockjs.sessions_max {
            self.shared.sockjs_sessions.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused("too many SockJS sessions (sockjs.sessions_max)"));
        }
        let Some((key, generation)) = self.create_session(SessionKind::SockJs) else {
            self.shared.sockjs_sessions.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused("too many sessions (limits.http_sessions_max)"));
        };
        let now_ms = self.now_ms;
        if let Some(HttpRole::Session(hs)) = self.session_role(key) {
            // Never a Kometa session id: /sse, /poll and /cmd cannot reach it.
            hs.id = "sockjs".into();
            hs.sockjs = Some(Box::new(SockJsSession::new(service, sid, now_ms)));
        }
        self.sockjs.insert(service, sid, key, generation);
        let mut close_after = None;
        match service {
            Service::Close => close_after = Some((close::GO_AWAY.0, close::GO_AWAY.1.to_owned())),
            Service::Echo => {}
            // A token in the URL (sockjs-client keeps the query string on
            // every request): a bad one closes the session after its open frame.
            Service::Kometa | Service::Jii => {
                if let Some(token) = request.query_param("token") {
                    match self.verifier.verify(&token, unix_time_ms() / 1000) {
                        Ok(identity) => self.register_user(key, generation, identity, None, false),
                        Err(error) => {
                            let code =
                                if error.is_expired() { ws::close::TOKEN_EXPIRED } else { ws::close::INVALID_TOKEN };
                            close_after = Some((code, error.message().to_owned()));
                        }
                    }
                }
            }
        }
        Ok(Opened { key, generation, close_after })
    }

    /// Makes `key` the request receiving `session`'s frames. A poll gets
    /// the open frame (new session) or what waits at once, else waits; a
    /// stream gets its head and prelude and stays.
    fn sockjs_attach(
        &mut self,
        key: ConnKey,
        generation: u32,
        session: ConnKey,
        session_generation: u32,
        mut meta: SockJsRequest,
        open: bool,
    ) -> bool {
        meta.session = session;
        meta.generation = session_generation;
        let transport = meta.transport;
        if transport.is_polling() && open {
            return self.sockjs_reply_once(key, &meta, codec::OPEN_FRAME);
        }
        if transport.is_streaming() {
            let mut head = Vec::with_capacity(2400);
            write_session_head(&mut head, 200, &meta, None);
            let mut piece = Vec::with_capacity(2100);
            codec::write_prelude(&mut piece, transport, &meta.callback);
            append_body(&mut head, &piece, meta.chunked);
            if open {
                piece.clear();
                codec::write_wrapped(&mut piece, transport, &meta.callback, codec::OPEN_FRAME);
                meta.sent_bytes += piece.len();
                append_body(&mut head, &piece, meta.chunked);
            }
            self.send_owned(key, head);
        }
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
            return true;
        };
        conn.state.serve_poll(HttpRole::SockJs(Box::new(meta)), &cx);
        let now_ms = self.now_ms;
        if let Some(HttpRole::Session(hs)) = self.session_role(session) {
            hs.attached = Some(Attachment { key, generation });
            if let Some(sockjs) = hs.sockjs.as_mut().filter(|_| open) {
                sockjs.last_write_ms = now_ms;
            }
        }
        if let Some(conn) = self.conn_mut(session, session_generation) {
            conn.state.session_served();
        }
        self.sockjs_flush(session);
        true
    }

    /// Answers a request with one frame and ends its response: a poll's
    /// answer, or a whole stream (head, prelude, frame, end).
    fn sockjs_reply_once(&mut self, key: ConnKey, meta: &SockJsRequest, frame: &[u8]) -> bool {
        let mut body = Vec::with_capacity(64 + frame.len());
        codec::write_wrapped(&mut body, meta.transport, &meta.callback, frame);
        let mut response = Vec::with_capacity(512 + body.len());
        if meta.transport.is_streaming() {
            write_session_head(&mut response, 200, meta, None);
            let mut prelude = Vec::with_capacity(2100);
            codec::write_prelude(&mut prelude, meta.transport, &meta.callback);
            append_body(&mut response, &prelude, meta.chunked);
            append_body(&mut response, &body, meta.chunked);
            if meta.chunked {
                response.extend_from_slice(codec::LAST_CHUNK);
            }
            self.send_owned(key, response);
            if !(meta.chunked && meta.keep_alive) {
                // The body ends with the connection.
                self.end_after_flush(key);
                return true;
            }
            return false;
        }
        write_session_head(&mut response, 200, meta, Some(body.len()));
        response.extend_from_slice(&body);
        self.send_owned(key, response);
        false
    }

    // -- WebSocket transports ---------------------------------------------

    /// `/SERVER/SESSION/websocket` (SockJS frames) and `/websocket` (raw).
    fn sockjs_websocket(
        &mut self,
        key: ConnKey,
        endpoint: Endpoint,
        framing: Framing,
        request: &Request<'_>,
        input: &[u8],
    ) -> bool {
        let text = Some("text/plain; charset=UTF-8");
        if !endpoint.websocket {
            self.sockjs_plain(key, request, 404, text, &[], b"the websocket transport is off");
            return false;
        }
        if request.method != Method::Get {
            self.sockjs_plain(key, request, 405, None, &[("Allow", "GET")], b"");
            return false;
        }
        if !request.upgrade_websocket {
            self.sockjs_plain(key, request, 400, text, &[], b"Can \"Upgrade\" only to \"WebSocket\".");
            return false;
        }
        if !request.connection_upgrade {
            self.sockjs_plain(key, request, 400, text, &[], b"\"Connection\" must be \"Upgrade\".");
            return false;
        }
        // Without SockJS frames, Kometa's service is its plain WebSocket
        // (`/ws`) and the echo service the echo endpoint.
        match (framing, endpoint.service) {
            (Framing::Raw, Service::Kometa) => return self.upgrade(key, request, input, false),
            (Framing::Raw, Service::Echo) => return self.upgrade(key, request, input, true),
            _ => {}
        }
        let Some(upgrade) = self.check_upgrade(key, request) else { return false };
        let opened = match self.sockjs_open_session(endpoint.service, "", request) {
            Ok(opened) => opened,
            Err(Refused(why)) => {
                self.respond(key, 503, &[("Retry-After", "1")], why, false, true);
                self.end_after_flush(key);
                return false;
            }
        };
        let Some(generation) = self.complete_upgrade(key, &upgrade, false) else {
            self.close_conn(opened.key);
            return false;
        };
        let meta = SockJsRequest {
            session: opened.key,
            generation: opened.generation,
            transport: Transport::WebSocket,
            framing,
            callback: Box::from(""),
            sent_bytes: 0,
            chunked: false,
            keep_alive: false,
            http10: false,
            origin: None,
            set_cookie: None,
        };
        if let Some(conn) = self.conn_mut(key, generation) {
            conn.state.http = Some(Box::new(HttpRole::SockJs(Box::new(meta))));
        }
        if let Some(HttpRole::Session(hs)) = self.session_role(opened.key) {
            hs.attached = Some(Attachment { key, generation });
        }
        if let Some(conn) = self.conn_mut(opened.key, opened.generation) {
            conn.state.session_served();
        }
        if framing == Framing::SockJs {
            self.send_owned(key, ws::encode_frame(ws::OPCODE_TEXT, codec::OPEN_FRAME));
        }
        if let Some((code, reason)) = opened.close_after {
            self.sockjs_end(opened.key, code, &reason);
        }
        true
    }

    /// A text message on a WebSocket. False when the socket is no SockJS
    /// one (the caller treats it as a client command).
    pub(crate) fn sockjs_socket_message(&mut self, key: ConnKey, generation: u32, payload: &[u8]) -> bool {
        let Some(conn) = self.conn_mut(key, generation) else { return false };
        let Some(HttpRole::SockJs(request)) = conn.state.http.as_deref() else { return false };
        let (session, session_generation, framing) = (request.session, request.generation, request.framing);
        let messages = match framing {
            Framing::Raw => vec![payload.to_vec()],
            // Empty messages and empty arrays are allowed, and ignored.
            Framing::SockJs if payload.is_empty() => return true,
            Framing::SockJs => match codec::decode_messages(payload, self.config.sockjs.pending_messages_max) {
                Ok(messages) => messages,
                Err(codec::PayloadError::TooMany) => {
                    let reason = "too many messages in one payload (sockjs.pending_messages_max)";
                    self.sockjs_end(session, ws::close::MESSAGE_TOO_BIG, reason);
                    return true;
                }
                Err(_) => {
                    self.sockjs_end(session, close::BROKEN_FRAMING.0, close::BROKEN_FRAMING.1);
                    return true;
                }
            },
        };
        if !messages.is_empty() {
            let _ = self.sockjs_incoming(session, session_generation, messages, Some(Attachment { key, generation }));
        }
        true
    }

    // -- Messages in ------------------------------------------------------

    /// Messages from the client of `session`. From an HTTP send, all or
    /// none are taken (`Err` when they would pass the pending limits);
    /// from a WebSocket (`socket`) they are taken, and the socket is read
    /// no further until the session has handled them.
    fn sockjs_incoming(
        &mut self,
        session: ConnKey,
        session_generation: u32,
        messages: Vec<Vec<u8>>,
        socket: Option<Attachment>,
    ) -> Result<(), ()> {
        let (messages_max, bytes_max) =
            (self.config.sockjs.pending_messages_max, self.config.sockjs_pending_bytes_max());
        let Some(conn) = self.conn_mut(session, session_generation) else { return Ok(()) };
        let Some(HttpRole::Session(hs)) = conn.state.http.as_deref_mut() else { return Ok(()) };
        let Some(service) = hs.sockjs.as_ref().map(|sockjs| sockjs.service) else { return Ok(()) };
        match service {
            Service::Close => return Ok(()),
            Service::Echo => {
                // Buffered together, written as one frame.
                for message in messages {
                    if !self.sockjs_buffer(session, BufItem::Json(message.into_boxed_slice()), false) {
                        return Ok(());
                    }
                }
                self.sockjs_flush(session);
                return Ok(());
            }
            Service::Kometa | Service::Jii => {}
        }
        let waiting_bytes: usize = hs.commands.iter().map(|command| command.len()).sum();
        let incoming_bytes: usize = messages.iter().map(Vec::len).sum();
        let over = hs.commands.len() + messages.len() > messages_max || waiting_bytes + incoming_bytes > bytes_max;
        if over && socket.is_none() {
            return Err(());
        }
        for message in messages {
            let command = match service {
                Service::Jii => match crate::app::jii::command(&message) {
                    Ok(command) => command,
                    Err(line) => {
                        if self.sockjs_buffer(session, BufItem::Json(line.into_boxed_slice()), false) {
                            self.sockjs_flush(session);
                        }
                        continue;
                    }
                },
                _ => message,
            };
            if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                hs.commands.push_back(command.into_boxed_slice());
            }
        }
        if let (true, Some(socket)) = (over, socket) {
            if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                if let Some(sockjs) = hs.sockjs.as_mut() {
                    sockjs.reader_paused = true;
                }
            }
            if let Some(conn) = self.conn_mut(socket.key, socket.generation) {
                conn.state.marks.insert(Marks::AWAITING_REPLY);
            }
        }
        self.run_session_commands(session, session_generation);
        Ok(())
    }

    /// The session handled every waiting message: a WebSocket held back
    /// reads on.
    pub(crate) fn sockjs_commands_drained(&mut self, session: ConnKey) {
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return };
        let Some(sockjs) = hs.sockjs.as_mut().filter(|sockjs| sockjs.reader_paused) else { return };
        sockjs.reader_paused = false;
        if let Some(socket) = hs.attached {
            self.unpause(socket.key, socket.generation);
        }
    }

    // -- Frames out -------------------------------------------------------

    /// A message for the session's client (from `session_push`): buffered,
    /// then written to the request attached, if any. Jii sessions get the
    /// message as Jii text, or not at all.
    pub(crate) fn sockjs_push(&mut self, session: ConnKey, item: BufItem) {
        if self.sockjs_buffer(session, item, true) {
            self.sockjs_flush(session);
        }
    }

    /// Adds a message to the session's buffer (`translate`: a Jii session
    /// gets it as Jii text); false when that ended the session (or there
    /// is none).
    fn sockjs_buffer(&mut self, session: ConnKey, item: BufItem, translate: bool) -> bool {
        let (messages_max, bytes_max) =
            (self.config.limits.session_buffer_messages_max, self.config.limits.session_buffer_bytes_max);
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return false };
        let Some(sockjs) = hs.sockjs.as_ref() else { return false };
        let item = match sockjs.service {
            Service::Jii if translate => match crate::app::jii::outgoing(&item) {
                Some(text) => BufItem::Json(text.into_boxed_slice()),
                None => return true,
            },
            _ => item,
        };
        let written = sockjs.written_seq;
        hs.buffer.push(item, messages_max, bytes_max);
        if hs.buffer.after(written).is_err() {
            // Messages the client never got were dropped from the full
            // buffer: the session cannot go on as if nothing happened.
            let reason = "slow consumer: session buffer limit reached";
            self.sockjs_end(session, ws::close::SLOW_CONSUMER, reason);
            return false;
        }
        true
    }

    /// Writes every message waiting in `session` to the request attached:
    /// one `a[…]` frame (one text message each on a raw WebSocket).
    fn sockjs_flush(&mut self, session: ConnKey) {
        let now_ms = self.now_ms;
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return };
        let Some(attached) = hs.attached else { return };
        let written = hs.sockjs.as_ref().map_or(0, |sockjs| sockjs.written_seq);
        if !hs.buffer.has_after(written) {
            return;
        }
        let Some(framing) = self.sockjs_framing(attached) else { return };
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return };
        let Ok(tail) = hs.buffer.after(written) else { return };
        let frames: Vec<Vec<u8>> = match framing {
            Framing::SockJs => {
                let mut frame = Vec::with_capacity(256);
                codec::write_messages(&mut frame, tail.map(|(_, item)| item.json()));
                vec![frame]
            }
            Framing::Raw => tail.map(|(_, item)| item.json().to_vec()).collect(),
        };
        let last = hs.buffer.last_seq();
        hs.buffer.ack(last);
        if let Some(sockjs) = hs.sockjs.as_mut() {
            sockjs.written_seq = last;
            sockjs.last_write_ms = now_ms;
        }
        for frame in frames {
            self.metrics.messages_out += 1;
            self.sockjs_write(attached, &frame);
        }
    }

    fn sockjs_framing(&self, request: Attachment) -> Option<Framing> {
        let conn = self.conns.get(request.key as usize).filter(|c| c.state.generation() == request.generation)?;
        match conn.state.http.as_deref() {
            Some(HttpRole::SockJs(request)) => Some(request.framing),
            _ => None,
        }
    }

    /// Writes one frame to the request attached to a session: a WebSocket
    /// message, a stream's next piece (ending the stream past its byte
    /// limit), or a poll's answer.
    fn sockjs_write(&mut self, request: Attachment, frame: &[u8]) {
        let limit_bytes = self.config.sockjs.response_limit_bytes;
        let Some(conn) = self.conn_mut(request.key, request.generation) else { return };
        let Some(HttpRole::SockJs(meta)) = conn.state.http.as_deref_mut() else { return };
        match meta.transport {
            Transport::WebSocket => self.send_owned(request.key, ws::encode_frame(ws::OPCODE_TEXT, frame)),
            transport if transport.is_streaming() => {
                let mut piece = Vec::with_capacity(frame.len() + 32);
                codec::write_wrapped(&mut piece, transport, &meta.callback, frame);
                meta.sent_bytes += piece.len();
                let full = meta.sent_bytes >= limit_bytes;
                let mut bytes = Vec::with_capacity(piece.len() + 16);
                append_body(&mut bytes, &piece, meta.chunked);
                self.send_owned(request.key, bytes);
                if full {
                    self.sockjs_finish(request, None);
                }
            }
            _ => self.sockjs_finish(request, Some(frame)),
        }
    }

    /// Ends the response of an HTTP request serving a session: a poll is
    /// answered with `frame`, a stream gets `frame` (if any) and its end.
    /// The request leaves the session (whose grace period starts) and the
    /// connection reads its next request, or closes.
    fn sockjs_finish(&mut self, request: Attachment, frame: Option<&[u8]>) {
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let (key, generation) = (request.key, request.generation);
        let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
            return;
        };
        let Some(HttpRole::SockJs(meta)) = conn.state.http.take().map(|role| *role) else { return };
        conn.state.poll_answered(&cx);
        let mut response = Vec::with_capacity(256);
        let ends_with_connection = if meta.transport.is_streaming() {
            let mut piece = Vec::new();
            if let Some(frame) = frame {
                codec::write_wrapped(&mut piece, meta.transport, &meta.callback, frame);
            }
            append_body(&mut response, &piece, meta.chunked);
            if meta.chunked {
                response.extend_from_slice(codec::LAST_CHUNK);
            }
            !meta.chunked
        } else {
            let mut body = Vec::with_capacity(64);
            codec::write_wrapped(&mut body, meta.transport, &meta.callback, frame.unwrap_or(codec::HEARTBEAT_FRAME));
            write_session_head(&mut response, 200, &meta, Some(body.len()));
            response.extend_from_slice(&body);
            false
        };
        self.send_owned(request.key, response);
        if meta.keep_alive && !ends_with_connection {
            // Input that came while the request was held.
            self.mark_ready(request.key, request.generation);
        } else {
            self.end_after_flush(request.key);
        }
        if let Some(HttpRole::Session(hs)) = self.session_role(meta.session) {
            if hs.attached == Some(request) {
                hs.attached = None;
                self.detached_now(meta.session);
            }
        }
    }

    // -- Time -------------------------------------------------------------

    /// A poll or stream waited `timeouts.poll_timeout_ms`: a poll is
    /// answered with a heartbeat; a stream waits on (its heartbeats come
    /// from `sockjs_sweep`).
    pub(crate) fn sockjs_poll_timeout(&mut self, key: ConnKey, generation: u32) {
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
            return;
        };
        let streaming =
            matches!(conn.state.http.as_deref(), Some(HttpRole::SockJs(meta)) if meta.transport.is_streaming());
        if !streaming {
            self.sockjs_finish(Attachment { key, generation }, Some(codec::HEARTBEAT_FRAME));
            return;
        }
        if let Some(role) = conn.state.http.take() {
            conn.state.serve_poll(*role, &cx);
        }
    }

    /// Once per sweep: a heartbeat to every session attached and silent
    /// for `sockjs.heartbeat_interval_ms`; closed ids whose time is up
    /// are forgotten.
    pub(crate) fn sockjs_sweep(&mut self) {
        let now_ms = self.now_ms;
        self.sockjs.expire(now_ms);
        let interval_ms = self.config.sockjs.heartbeat_interval_ms;
        let due: Vec<(ConnKey, Attachment)> = self
            .sockjs
            .live
            .iter()
            .filter_map(|(&session, &generation)| {
                let conn = self.conns.get(session as usize).filter(|c| c.state.generation() == generation)?;
                let Some(HttpRole::Session(hs)) = conn.state.http.as_deref() else { return None };
                let sockjs = hs.sockjs.as_ref()?;
                (now_ms.saturating_sub(sockjs.last_write_ms) >= interval_ms).then_some((session, hs.attached?))
            })
            .collect();
        for (session, request) in due {
            if let Some(HttpRole::Session(hs)) = self.session_role(session) {
                if let Some(sockjs) = hs.sockjs.as_mut() {
                    sockjs.last_write_ms = now_ms;
                }
            }
            if self.sockjs_framing(request) == Some(Framing::SockJs) {
                self.sockjs_write(request, codec::HEARTBEAT_FRAME);
            }
        }
    }

    // -- Ending -----------------------------------------------------------

    /// Closes a session: the close frame goes to the request attached (a
    /// WebSocket then closes), the id answers with it for
    /// `timeouts.session_grace_ms`, and the slot goes (unsubscribing all).
    pub(crate) fn sockjs_end(&mut self, session: ConnKey, code: u16, reason: &str) {
        let Some(HttpRole::Session(hs)) = self.session_role(session) else { return };
        let Some(sockjs) = hs.sockjs.as_ref() else { return };
        let (service, sid) = (sockjs.service, sockjs.sid.clone());
        let attached = hs.attached.take();
        let mut frame = Vec::with_capacity(32 + reason.len());
        codec::write_close(&mut frame, code, reason);
        if let Some(request) = attached {
            match self.sockjs_framing(request) {
                Some(framing) if self.sockjs_is_websocket(request) => {
                    if let Some(conn) = self.conn_mut(request.key, request.generation) {
                        conn.state.http = None;
                    }
                    if framing == Framing::SockJs {
                        self.send_owned(request.key, ws::encode_frame(ws::OPCODE_TEXT, &frame));
                    }
                    self.close_websocket(request.key, websocket_close_code(code), reason);
                }
                Some(_) => self.sockjs_finish(request, Some(&frame)),
                None => {}
            }
        }
        let closed =
            Closed { code, reason: reason.into(), until_ms: self.now_ms + self.config.timeouts.session_grace_ms };
        let remembered_max = self.config.sockjs.sessions_max;
        self.sockjs.close(service, &sid, closed, remembered_max);
        self.close_conn(session);
    }

    fn sockjs_is_websocket(&self, request: Attachment) -> bool {
        self.conns.get(request.key as usize).is_some_and(|conn| {
            matches!(conn.state.http.as_deref(), Some(HttpRole::SockJs(meta)) if meta.transport == Transport::WebSocket)
        })
    }

    /// A request serving a session went (its socket closed, or it broke):
    /// a WebSocket session ends with its socket; an HTTP session whose
    /// receiving request broke off is closed (1002).
    pub(crate) fn sockjs_request_gone(&mut self, key: ConnKey, request: SockJsRequest) {
        let Some(conn) = self.conn_mut(request.session, request.generation) else { return };
        let Some(HttpRole::Session(hs)) = conn.state.http.as_deref_mut() else { return };
        if hs.attached.is_none_or(|attached| attached.key != key) {
            return;
        }
        hs.attached = None;
        if request.transport == Transport::WebSocket {
            self.close_conn(request.session);
        } else {
            self.sockjs_end(request.session, close::INTERRUPTED.0, close::INTERRUPTED.1);
        }
    }

    /// A SockJS session's slot is gone (closed, expired, shut down).
    pub(crate) fn sockjs_session_gone(&mut self, key: ConnKey, sockjs: &SockJsSession, attached: Option<Attachment>) {
        self.shared.sockjs_sessions.fetch_sub(1, Ordering::Relaxed);
        self.sockjs.remove(sockjs.service, &sockjs.sid, key);
        if let Some(request) = attached {
            // Not closed through `sockjs_end`: its request ends without a frame.
            if let Some(conn) = self.conn_mut(request.key, request.generation) {
                conn.state.http = None;
            }
            self.close_conn(request.key);
        }
    }
}

/// `Access-Control-Allow-Origin` (the origin with credentials, or `*`).
fn push_cors<'a>(headers: &mut Vec<(&'a str, &'a str)>, origin: Option<&'a str>) {
    match origin {
        Some(origin) => {
            headers.push(("Access-Control-Allow-Origin", origin));
            headers.push(("Access-Control-Allow-Credentials", "true"));
            headers.push(("Vary", "Origin"));
        }
        None => headers.push(("Access-Control-Allow-Origin", "*")),
    }
}

/// The head of a session response: content type, no caching, CORS, the
/// cookie; a stream (`length` None) is chunked on HTTP/1.1 and ends with
/// the connection on HTTP/1.0.
fn write_session_head(out: &mut Vec<u8>, status: u16, meta: &SockJsRequest, length: Option<usize>) {
    let mut headers = vec![("Content-Type", meta.transport.content_type()), ("Cache-Control", codec::NO_CACHE)];
    push_cors(&mut headers, meta.origin.as_deref());
    if let Some(cookie) = meta.set_cookie.as_deref() {
        headers.push(("Set-Cookie", cookie));
    }
    let streaming = length.is_none();
    if streaming {
        headers.push(("X-Accel-Buffering", "no"));
        if meta.chunked {
            headers.push(("Transfer-Encoding", "chunked"));
        }
    }
    let keep_alive = meta.keep_alive && (!streaming || meta.chunked);
    if keep_alive && meta.http10 {
        headers.push(("Connection", "keep-alive"));
    }
    http::write_response_head(out, status, &headers, length, keep_alive);
}

/// Appends body bytes, as one chunk when the body is chunked.
fn append_body(out: &mut Vec<u8>, bytes: &[u8], chunked: bool) {
    if chunked {
        codec::write_chunk(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
}

/// The request's head bytes: `input` starts with them (the connection
/// hands over the request and what follows it).
fn request_head<'i>(request: &Request<'_>, input: &'i [u8]) -> Option<&'i [u8]> {
    input.get(..request.head_len)
}
