//! SockJS state kept in the slab (docs/sockjs.md): what a SockJS session
//! adds to an HTTP session, what a request serving one carries until it is
//! answered, and the shard's index of sessions by the id the client chose.
//!
//! A SockJS session is an HTTP session slot (`HttpRole::Session` with
//! `SessionKind::SockJs`): it subscribes, authenticates and buffers like
//! any Kometa session. The request that receives its frames (a poll, a
//! streaming response, or a WebSocket) is a connection with
//! `HttpRole::SockJs`, attached to it.

use std::collections::{HashMap, VecDeque};

use crate::hub::index::ConnKey;
use kometa_protocol::sockjs::Transport;

/// What a SockJS endpoint does with messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The client protocol's JSON commands and replies (`sockjs.prefix`).
    Kometa,
    /// The Jii-comet text protocol (`sockjs.jii_prefix`).
    Jii,
    /// Conformance suite: messages come back as they were sent.
    Echo,
    /// Conformance suite: every session is closed with 3000 "Go away!" once open.
    Close,
}

/// How frames travel over a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// SockJS frames (`o`, `h`, `a[…]`, `c[…]`) in text messages.
    SockJs,
    /// `/websocket`: one message per text message, no SockJS frames.
    Raw,
}

/// What a SockJS session adds to an HTTP session.
#[derive(Debug)]
pub struct SockJsSession {
    pub service: Service,
    /// The session id from the URL; empty for a WebSocket session (which
    /// lives and dies with its socket, and is not looked up by id).
    pub sid: Box<str>,
    /// When a frame last went to the client (heartbeats fill silences).
    pub last_write_ms: u64,
    /// The last buffered message written to the client: everything after
    /// it waits for the next request (a message dropped from a full buffer
    /// before that ends the session).
    pub written_seq: u64,
    /// The WebSocket's input is paused until the session's waiting
    /// messages (`HttpSession::commands`) are handled.
    pub reader_paused: bool,
}

impl SockJsSession {
    pub fn new(service: Service, sid: &str, now_ms: u64) -> SockJsSession {
        SockJsSession { service, sid: sid.into(), last_write_ms: now_ms, written_seq: 0, reader_paused: false }
    }
}

/// A request serving a SockJS session: a poll or stream waiting for frames,
/// or a WebSocket.
#[derive(Debug)]
pub struct SockJsRequest {
    pub session: ConnKey,
    pub generation: u32,
    pub transport: Transport,
    pub framing: Framing,
    /// The jsonp/htmlfile callback name (validated).
    pub callback: Box<str>,
    /// Bytes of frames written to a streaming response (`sockjs.response_limit_bytes`).
    pub sent_bytes: usize,
    /// The response body is chunked (HTTP/1.1); else it ends with the connection.
    pub chunked: bool,
    pub keep_alive: bool,
    /// HTTP/1.0: a kept-alive connection says so in the response.
    pub http10: bool,
    /// The request's `Origin`, echoed for CORS (`*` when absent).
    pub origin: Option<Box<str>>,
    /// `Set-Cookie` value (`JSESSIONID=…; path=/`) when cookies are needed.
    pub set_cookie: Option<Box<str>>,
}

/// A closed session remembered for its id: any request for it gets the
/// close frame until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: Box<str>,
    pub until_ms: u64,
}

/// Where an id points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Live(ConnKey, u32),
    Closed(Closed),
    Unknown,
}

/// The shard's SockJS sessions: HTTP ones by (service, id), closed ones
/// remembered for a while, and every live session for the heartbeat sweep.
#[derive(Debug, Default)]
pub struct Registry {
    by_id: HashMap<(Service, Box<str>), (ConnKey, u32)>,
    closed: HashMap<(Service, Box<str>), Closed>,
    /// Closed ids in the order they expire (each lives the same time).
    closed_order: VecDeque<(u64, Service, Box<str>)>,
    /// Every SockJS session slot here (HTTP and WebSocket), for heartbeats.
    pub live: HashMap<ConnKey, u32>,
}

impl Registry {
    pub fn lookup(&self, service: Service, sid: &str, now_ms: u64) -> Lookup {
        let key = (service, Box::<str>::from(sid));
        if let Some(&(conn, generation)) = self.by_id.get(&key) {
            return Lookup::Live(conn, generation);
        }
        match self.closed.get(&key) {
            Some(closed) if closed.until_ms > now_ms => Lookup::Closed(closed.clone()),
            _ => Lookup::Unknown,
        }
    }

    /// A new session; an id (HTTP transports) makes it findable.
    pub fn insert(&mut self, service: Service, sid: &str, conn: ConnKey, generation: u32) {
        if !sid.is_empty() {
            self.closed.remove(&(service, Box::<str>::from(sid)));
            self.by_id.insert((service, sid.into()), (conn, generation));
        }
        self.live.insert(conn, generation);
    }

    /// The session slot `conn` went; its id is free unless it was closed
    /// (then `close` remembered it).
    pub fn remove(&mut self, service: Service, sid: &str, conn: ConnKey) {
        self.live.remove(&conn);
        let key = (service, Box::<str>::from(sid));
        if self.by_id.get(&key).is_some_and(|(live, _)| *live == conn) {
            self.by_id.remove(&key);
        }
    }

    /// Remembers that the session `sid` closed, keeping at most
    /// `remembered_max` closed ids (the oldest are forgotten first).
    pub fn close(&mut self, service: Service, sid: &str, closed: Closed, remembered_max: usize) {
        if sid.is_empty() {
            return;
        }
        self.by_id.remove(&(service, Box::<str>::from(sid)));
        self.closed_order.push_back((closed.until_ms, service, sid.into()));
        self.closed.insert((service, sid.into()), closed);
        while self.closed_order.len() > remembered_max {
            self.forget_oldest();
        }
    }

    /// Forgets closed ids whose time is up.
    pub fn expire(&mut self, now_ms: u64) {
        while self.closed_order.front().is_some_and(|(until_ms, ..)| *until_ms <= now_ms) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((until_ms, service, sid)) = self.closed_order.pop_front() {
            let key = (service, sid);
            // A newer close of the same id lives on.
            if self.closed.get(&key).is_some_and(|closed| closed.until_ms == until_ms) {
                self.closed.remove(&key);
            }
        }
    }

    pub fn closed_len(&self) -> usize {
        self.closed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(until_ms: u64) -> Closed {
        Closed { code: 3000, reason: "Go away!".into(), until_ms }
    }

    #[test]
    fn ids_live_then_closed_then_forgotten() {
        let mut registry = Registry::default();
        registry.insert(Service::Kometa, "abc", 7, 1);
        assert_eq!(registry.lookup(Service::Kometa, "abc", 0), Lookup::Live(7, 1));
        assert_eq!(registry.lookup(Service::Jii, "abc", 0), Lookup::Unknown, "ids are per service");
        registry.close(Service::Kometa, "abc", closed(100), 10);
        registry.remove(Service::Kometa, "abc", 7);
        assert_eq!(registry.lookup(Service::Kometa, "abc", 50), Lookup::Closed(closed(100)));
        assert_eq!(registry.lookup(Service::Kometa, "abc", 100), Lookup::Unknown);
        assert!(registry.live.is_empty());
        registry.expire(100);
        assert_eq!(registry.closed_len(), 0);
    }

    #[test]
    fn a_reused_id_outlives_its_old_close() {
        let mut registry = Registry::default();
        registry.insert(Service::Echo, "a", 1, 1);
        registry.close(Service::Echo, "a", closed(100), 10);
        registry.remove(Service::Echo, "a", 1);
        registry.insert(Service::Echo, "a", 2, 2);
        registry.close(Service::Echo, "a", closed(300), 10);
        registry.remove(Service::Echo, "a", 2);
        registry.expire(150);
        assert_eq!(registry.lookup(Service::Echo, "a", 150), Lookup::Closed(closed(300)));
        // Removing another slot leaves a session with the same id alone.
        registry.insert(Service::Echo, "b", 3, 5);
        registry.remove(Service::Echo, "b", 4);
        assert_eq!(registry.lookup(Service::Echo, "b", 0), Lookup::Live(3, 5));
    }

    #[test]
    fn closed_ids_are_bounded() {
        let mut registry = Registry::default();
        for n in 0..10u64 {
            registry.close(Service::Kometa, &n.to_string(), closed(1000 + n), 4);
        }
        assert_eq!(registry.closed_len(), 4);
        assert_eq!(registry.lookup(Service::Kometa, "9", 0), Lookup::Closed(closed(1009)));
        assert_eq!(registry.lookup(Service::Kometa, "0", 0), Lookup::Unknown);
    }
}
