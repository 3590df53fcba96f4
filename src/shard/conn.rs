//! The per-connection driver: accept, read into the shard's scratch buffer,
//! hand bytes to the protocol layer, write with a bounded outbox, close.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::os::fd::RawFd;

use super::{sys, Conn, Metrics, Shard, ACCEPTS_PER_TICK, READ_BYTES_PER_CONN_PER_TICK};
use crate::bus::limiter::AddressKey;
use crate::bus::Message;
use crate::connection::http::BufItem;
use crate::connection::outbox::{OutItem, Wire};
use crate::connection::{
    Broken, Connection, Context, Count, Io, Marks, Phase, Step, Verdict, IOVECS_MAX, PENDING_SLOT,
};
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::hub::publication::Publication;
use crate::limits::{ClientRates, LimitKind};
use crate::tls::{TlsError, TlsSession, SEAL_BUDGET_BYTES};
use kometa_protocol::ws;

/// Generations stay below this: the I/O driver keeps the top bits of a
/// token for its own requests (io.rs).
const GENERATION_LIMIT: u32 = 1 << 30;

/// The driver token of a connection: its generation, then its slab key.
pub(crate) fn conn_token(key: ConnKey, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(key)
}

/// Sent, unencrypted, to a plain HTTP request on the TLS port.
const PLAIN_HTTP_ON_TLS_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 64\r\nConnection: close\r\n\r\nplain HTTP request sent to the TLS port; use https:// or wss://\n";

/// Sent, best effort, to a connection refused at the connection cap.
const REFUSED_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 24\r\nRetry-After: 5\r\nConnection: close\r\n\r\nserver connection limit\n";
/// Sent, best effort, to a connection refused at `limits.connections_per_ip_max`.
const ADDRESS_REFUSED_RESPONSE: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 39\r\nRetry-After: 5\r\nConnection: close\r\n\r\ntoo many connections from your address\n";

impl Shard {
    pub(crate) fn accept_connections(&mut self) {
        let Some(listener) = &self.listener else { return };
        let listener_fd = listener.as_raw_fd();
        for _ in 0..ACCEPTS_PER_TICK {
            match sys::accept(listener_fd) {
                Ok(fd) => self.admit(fd),
                Err(error) => match error.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        crate::limited!(WARN, shard = self.id, %error, "accept failed: out of descriptors or memory; pausing accepts for 100 ms");
                        self.pause_accepting();
                        break;
                    }
                    _ => {
                        crate::limited!(WARN, shard = self.id, %error, "accept failed");
                        break;
                    }
                },
            }
        }
    }

    /// A socket the driver accepted (io_uring's multishot accept).
    pub(crate) fn accepted(&mut self, fd: OwnedFd) {
        if self.listener.is_none() {
            // Stopped accepting (shutdown) while this one was on its way.
            return;
        }
        self.admit(fd);
    }

    /// Accepting stopped on an error (out of descriptors or memory): pause,
    /// then start again.
    pub(crate) fn accept_failed(&mut self, error: &io::Error) {
        crate::limited!(WARN, shard = self.id, %error, "accept failed; pausing accepts for 100 ms");
        self.pause_accepting();
    }

    fn admit(&mut self, fd: OwnedFd) {
        let open = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.shared.connections_max || self.is_draining() || self.conns.len() >= (u32::MAX - 2) as usize {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            self.metrics.connections_refused += 1;
            if open > self.shared.connections_max {
                self.metrics.limit_refusals.add(crate::limits::LimitKind::ConnectionsMax);
            }
            refuse_at_accept(&fd, REFUSED_RESPONSE);
            return;
        }
        let limiter = &self.shared.limiter;
        // One getpeername per accepted socket, only when a per-address limit is on.
        let peer = if limiter.limits_addresses() {
            sys::peer_address(fd.as_raw_fd()).ok().and_then(|address| limiter.key(address))
        } else {
            None
        };
        if let Some(peer) = peer {
            if !limiter.open(peer, limiter.now_ms()) {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                self.metrics.limit_refusals.add(LimitKind::ConnectionsPerIp);
                refuse_at_accept(&fd, ADDRESS_REFUSED_RESPONSE);
                return;
            }
        }
        let tls = match self.new_tls_session() {
            Ok(tls) => tls,
            Err(error) => {
                crate::limited!(WARN, shard = self.id, %error, "cannot start a TLS session");
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                if let Some(peer) = peer {
                    self.shared.limiter.close(peer, self.shared.limiter.now_ms());
                }
                return;
            }
        };
        // TCP_NODELAY comes from the listener (Linux copies it to accepted sockets).
        if let Some((key, _)) = self.register_socket(fd, peer) {
            self.metrics.connections_accepted += 1;
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.tls = tls;
            }
        }
    }

    /// The next connection generation (never 0).
    pub(crate) fn take_generation(&mut self) -> u32 {
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) % GENERATION_LIMIT;
        self.next_generation = self.next_generation.max(1);
        generation
    }

    /// Adds a socket (counted in `connections`, and under `peer` in the
    /// limiter) to the slab and the epoll set; it starts reading an HTTP
    /// request. On failure the socket is closed and uncounted.
    fn register_socket(&mut self, fd: OwnedFd, peer: Option<AddressKey>) -> Option<(ConnKey, u32)> {
        let generation = self.take_generation();
        let entry = self.conns.vacant_entry();
        let key = entry.key() as ConnKey;
        let token = conn_token(key, generation);
        if let Err(error) = self.driver.watch_socket(fd.as_raw_fd(), token) {
            crate::limited!(WARN, shard = self.id, %error, "cannot watch a new socket");
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            if let Some(peer) = peer {
                self.shared.limiter.close(peer, self.shared.limiter.now_ms());
            }
            return None;
        }
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let rates = ClientRates::new(&self.config.limits, self.now_ms);
        entry.insert(Conn { fd: Some(fd), rates, peer, state: Connection::new(generation, &cx), tls: None });
        Some((key, generation))
    }

    /// A TLS session for a new connection, when the listener has TLS.
    fn new_tls_session(&mut self) -> Result<Option<Box<TlsSession>>, TlsError> {
        let generation = self.shared.tls_generation.load(Ordering::Acquire);
        if generation != self.tls_generation {
            // Reloaded: new connections get the new certificate.
            self.tls_config = self.shared.tls.read().map(|tls| tls.clone()).unwrap_or(None);
            self.tls_generation = generation;
        }
        match &self.tls_config {
            None => Ok(None),
            Some(config) => TlsSession::new(config).map(|session| Some(Box::new(session))),
        }
    }

    /// A connection handed over by another shard (it asked for an HTTP
    /// session that lives here): register it and replay what was read.
    pub(crate) fn adopt(
        &mut self,
        fd: OwnedFd,
        peer: Option<AddressKey>,
        mut input: Box<[u8]>,
        tls: Option<Box<TlsSession>>,
    ) {
        if let Some((key, generation)) = self.register_socket(fd, peer) {
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.tls = tls;
            }
            self.feed(key, generation, &mut input);
        }
    }

    /// Hands this connection and its unread `input` to `shard`: removed from
    /// this shard without closing the socket (it stays counted, and goes on
    /// being counted by the shard that adopts it).
    pub(crate) fn migrate(&mut self, key: ConnKey, shard: usize, input: &[u8]) {
        let Some(mut conn) = self.conns.try_remove(key as usize) else { return };
        let Some(fd) = conn.fd.take() else { return };
        self.driver.unwatch_socket(fd.as_raw_fd(), conn_token(key, conn.state.generation()), false);
        let tls = conn.tls.take();
        self.bus.send(shard, crate::bus::Message::Adopt { fd, peer: conn.peer, input: input.into(), tls });
    }

    /// The connection at `key`, if it is still the one with `generation`.
    pub(crate) fn conn_mut(&mut self, key: ConnKey, generation: u32) -> Option<&mut Conn> {
        self.conns.get_mut(key as usize).filter(|conn| conn.state.generation() == generation)
    }

    pub(crate) fn alive(&self, key: ConnKey, generation: u32) -> bool {
        self.conns.get(key as usize).is_some_and(|conn| conn.state.generation() == generation)
    }

    pub(crate) fn connection_event(&mut self, key: ConnKey, generation: u32, events: u32) {
        if !self.alive(key, generation) {
            return;
        }
        if events & sys::EPOLLOUT != 0 {
            self.flush(key);
        }
        if events & (sys::EPOLLIN | sys::EPOLLRDHUP | sys::EPOLLHUP | sys::EPOLLERR) != 0 {
            let Some(conn) = self.conn_mut(key, generation) else { return };
            conn.state.marks.remove(Marks::INPUT_DRAINED);
            if events & (sys::EPOLLRDHUP | sys::EPOLLHUP) != 0 {
                conn.state.marks.insert(Marks::PEER_SHUT_WRITE);
            }
            // Already waiting for its turn to read (its budget ran out): the
            // new data is read then, not now with a fresh budget.
            let waiting_turn =
                conn.state.marks.contains(Marks::QUEUED) && conn.state.marks.contains(Marks::READ_PENDING);
            if !waiting_turn {
                self.read_connection(key, generation);
            }
        }
    }

    /// Another turn for a connection: input left over from a pause, or
    /// unread socket data.
    pub(crate) fn resume_connection(&mut self, key: ConnKey, generation: u32) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if conn.state.marks.contains(Marks::AWAITING_REPLY) {
            return;
        }
        if conn.state.phase() == Phase::Session {
            self.run_session_commands(key, generation);
            return;
        }
        if conn.state.has_input_remainder() {
            self.feed(key, generation, &mut []);
        }
        let read_pending = self.conn_mut(key, generation).is_some_and(|conn| {
            conn.state.marks.contains(Marks::READ_PENDING) && !conn.state.marks.contains(Marks::AWAITING_REPLY)
        });
        if read_pending {
            self.read_connection(key, generation);
        }
    }

    /// Reads until the socket is drained, the per-tick budget is spent, or
    /// input must pause (awaiting a reply, or the bus is overloaded).
    fn read_connection(&mut self, key: ConnKey, generation: u32) {
        let mut budget = READ_BYTES_PER_CONN_PER_TICK;
        let mut scratch = std::mem::take(&mut self.scratch);
        let overloaded = self.bus.overloaded();
        loop {
            let now_ms = self.now_ms;
            // (Not `conn_mut`: the settings are borrowed beside the connection.)
            let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
                break;
            };
            let state = &mut conn.state;
            if state.phase() == Phase::Polling && state.marks.contains(Marks::PEER_SHUT_WRITE) {
                // The client gave up on its waiting poll (browsers never
                // half-close a request): free the socket now rather than at
                // the poll timeout. Its session keeps every message until
                // a later poll acknowledges it.
                self.peer_closed(key);
                break;
            }
            if state.marks.contains(Marks::AWAITING_REPLY) || state.phase() == Phase::Polling {
                // Paused until the reply (or the poll's answer) goes out.
                state.marks.insert(Marks::READ_PENDING);
                break;
            }
            if overloaded || budget == 0 {
                state.marks.insert(Marks::READ_PENDING);
                self.mark_ready(key, generation);
                break;
            }
            let fd = conn.raw_fd();
            match sys::recv(fd, &mut scratch) {
                Ok(0) => {
                    self.peer_closed(key);
                    break;
                }
                Ok(count) => {
                    let state = &mut conn.state;
                    let cx = Context { now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
                    state.on_input(&cx);
                    state.marks.remove(Marks::READ_PENDING);
                    if count < scratch.len() {
                        state.marks.insert(Marks::INPUT_DRAINED);
                    } else {
                        state.marks.remove(Marks::INPUT_DRAINED);
                    }
                    let peer_shut_write = state.marks.contains(Marks::PEER_SHUT_WRITE);
                    budget = budget.saturating_sub(count);
                    if conn.tls.is_some() {
                        self.tls_input(key, generation, &mut scratch[..count]);
                    } else {
                        self.feed(key, generation, &mut scratch[..count]);
                    }
                    // A short read drained the socket; edge-triggered epoll
                    // reports any data that arrives after it. Not so for a
                    // FIN already queued: read on until the end of stream.
                    if count < scratch.len() && !peer_shut_write {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    conn.state.marks.remove(Marks::READ_PENDING);
                    conn.state.marks.insert(Marks::INPUT_DRAINED);
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_conn(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Ciphertext arrived on a TLS connection: decrypt it, send what the
    /// handshake has for the peer, and feed the plaintext.
    fn tls_input(&mut self, key: ConnKey, generation: u32, ciphertext: &mut [u8]) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        let Some(mut tls) = conn.tls.take() else { return };
        let mut plaintext = std::mem::take(&mut self.tls_plaintext);
        plaintext.clear();
        let result = tls.receive(ciphertext, &mut plaintext);
        if let Some(conn) = self.conn_mut(key, generation) {
            conn.tls = Some(tls);
        }
        match result {
            Err(TlsError::NotTls) => {
                self.metrics.tls_failures += 1;
                if let Some(conn) = self.conn_mut(key, generation) {
                    // Unencrypted, as the client speaks.
                    let _ = sys::send(conn.raw_fd(), PLAIN_HTTP_ON_TLS_RESPONSE);
                    let _ = sys::shutdown_write(conn.raw_fd());
                }
                self.close_conn(key);
            }
            Err(TlsError::Protocol(why)) => {
                self.metrics.tls_failures += 1;
                tracing::debug!(shard = self.id, key, %why, "TLS failed");
                // An alert rustls queued goes out best effort.
                self.flush(key);
                self.close_conn(key);
            }
            Ok(received) => {
                if received.handshake_done {
                    self.metrics.tls_handshakes += 1;
                }
                // What the handshake has for the peer.
                self.flush(key);
                if !plaintext.is_empty() {
                    self.feed(key, generation, &mut plaintext);
                }
                if received.peer_closed {
                    self.peer_closed(key);
                }
            }
        }
        if plaintext.capacity() > super::SCRATCH_BYTES * 2 {
            plaintext = Vec::new();
        }
        self.tls_plaintext = plaintext;
    }

    /// The peer closed its side (end of stream). A WebSocket without a close
    /// frame is an abnormal closure; either way the connection ends, but
    /// only once what is already queued for the peer has been written: a
    /// client that half-closes after its request (HTTP/1.0 tools, health
    /// checkers, proxies) still reads the whole response.
    fn peer_closed(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if !conn.has_output() {
            self.close_conn(key);
            return;
        }
        if conn.state.is_ending() {
            // Already ending, with its own deadline.
            return;
        }
        // A poll or stream leaves its session now, so nothing more is
        // written into a connection that only finishes its output.
        if let Some(role) = conn.state.http.take() {
            self.release_http_role(key, *role);
        }
        self.end_after_flush(key);
    }

    /// Hands fresh bytes (after any kept remainder) to the connection and
    /// keeps what it could not use yet.
    pub(crate) fn feed(&mut self, key: ConnKey, generation: u32, fresh: &mut [u8]) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        let mut remainder = conn.state.take_remainder();
        if remainder.is_empty() {
            // The common case: parse straight from the scratch buffer.
            let consumed = self.consume(key, generation, fresh);
            if consumed < fresh.len() {
                remainder.extend_from_slice(&fresh[consumed..]);
            }
        } else {
            remainder.extend_from_slice(fresh);
            let consumed = self.consume(key, generation, &mut remainder);
            remainder.drain(..consumed);
        }
        let cap_bytes = self.remainder_cap();
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if conn.state.keep_remainder(remainder, cap_bytes) == Verdict::Close {
            self.close_conn(key);
        }
    }

    /// The most input a connection may hold back: a partial head plus body,
    /// or a partial frame, plus one read's worth kept during a pause.
    fn remainder_cap(&self) -> usize {
        let limits = &self.config.limits;
        let http = limits.http_head_bytes_max + limits.http_body_bytes_max;
        let websocket = limits.client_message_bytes_max + ws::HEADER_BYTES_MAX;
        http.max(websocket) + super::SCRATCH_BYTES
    }

    /// Steps the connection through `input`, handing its requests and
    /// messages to the application; returns the bytes used.
    fn consume(&mut self, key: ConnKey, generation: u32, input: &mut [u8]) -> usize {
        let mut position = 0;
        while position < input.len() {
            let rest = &mut input[position..];
            let step = {
                let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
                    return input.len();
                };
                let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
                let queued_before = conn.state.output_messages();
                let mut io =
                    SocketIo::new(conn.raw_fd(), conn.tls.as_deref_mut(), &mut self.tls_sealed, &mut self.metrics);
                let step = conn.state.step(rest, &mut io, &cx);
                let queued_after = conn.state.output_messages();
                (step, queued_before, queued_after)
            };
            let (step, queued_before, queued_after) = step;
            self.outbox_moved(queued_before, queued_after);
            match step {
                Step::Wait => break,
                Step::Used(used) => position += used,
                Step::Close => {
                    self.close_conn(key);
                    return input.len();
                }
                Step::Message { used, payload } => {
                    self.metrics.messages_in += 1;
                    // A SockJS WebSocket carries frames for its session.
                    if !self.sockjs_socket_message(key, generation, &payload) {
                        self.client_command(key, generation, &payload);
                    }
                    position += used;
                }
                Step::Request { used, request, body, input: whole } => {
                    let keep_alive = request.keep_alive();
                    let held = self.route(key, generation, &request, body, whole);
                    if !held {
                        self.drive(key, generation, |conn, io, cx| conn.request_answered(keep_alive, io, cx));
                    }
                    position += used;
                }
            }
        }
        position
    }

    /// Runs `action` on a connection with its socket and the shard's clock
    /// and settings; removes the connection if the verdict says so. False
    /// when the connection is gone (before or after).
    pub(crate) fn drive(
        &mut self,
        key: ConnKey,
        generation: u32,
        action: impl FnOnce(&mut Connection, &mut SocketIo<'_>, &Context<'_>) -> Verdict,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(key as usize).filter(|c| c.state.generation() == generation) else {
            return false;
        };
        let cx = Context { now_ms: self.now_ms, limits: &self.config.limits, timeouts: &self.config.timeouts };
        let queued_before = conn.state.output_messages();
        let mut io = SocketIo::new(conn.raw_fd(), conn.tls.as_deref_mut(), &mut self.tls_sealed, &mut self.metrics);
        let verdict = action(&mut conn.state, &mut io, &cx);
        let queued_after = conn.state.output_messages();
        self.outbox_moved(queued_before, queued_after);
        match verdict {
            Verdict::Keep => true,
            Verdict::Close => {
                self.close_conn(key);
                false
            }
        }
    }

    /// A connection's outbox went from `before` to `after` messages: the
    /// shard's backlog (what owners look at before accepting more
    /// publications for it) counts messages waiting in outboxes beside the
    /// deliveries not yet written, so a shard whose clients fall behind
    /// sheds new publications instead of queueing until slow consumers are
    /// cut off.
    pub(crate) fn outbox_moved(&mut self, before: usize, after: usize) {
        if before == after {
            return;
        }
        let backlog = &self.shared.fanout_backlog[self.id];
        if after > before {
            backlog.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let gone = before - after;
            let _ = backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(gone)));
        }
    }

    /// `drive` for the connection at `key`, whatever its generation.
    fn drive_key(
        &mut self,
        key: ConnKey,
        action: impl FnOnce(&mut Connection, &mut SocketIo<'_>, &Context<'_>) -> Verdict,
    ) -> bool {
        let Some(generation) = self.conns.get(key as usize).map(|c| c.state.generation()) else { return false };
        self.drive(key, generation, action)
    }

    /// Sends `item` to a connection (an HTTP session buffers it for its
    /// stream or poll instead).
    pub(crate) fn send_item(&mut self, key: ConnKey, item: OutItem) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        if conn.state.phase() == Phase::Session {
            let item = match item {
                OutItem::Publication(publication, _) => BufItem::Publication(publication),
                OutItem::Owned(json) => BufItem::Json(json),
            };
            self.session_push(key, item);
            return;
        }
        self.metrics.messages_out += 1;
        self.drive_key(key, |conn, io, cx| conn.send(item, io, cx));
    }

    pub(crate) fn send_owned(&mut self, key: ConnKey, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.send_item(key, OutItem::Owned(bytes.into_boxed_slice()));
        }
    }

    /// Writes a publication to a subscriber.
    pub(crate) fn deliver(&mut self, key: ConnKey, publication: &Arc<Publication>) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        if !matches!(conn.state.phase(), Phase::WebSocket | Phase::Session) {
            return;
        }
        self.metrics.deliveries += 1;
        self.send_item(key, OutItem::Publication(Arc::clone(publication), Wire::WebSocket));
    }

    /// Writes several publications to one subscriber: one gathered write
    /// when the socket is idle, the rest queued if it pushes back.
    pub(crate) fn deliver_all(&mut self, key: ConnKey, publications: &[Arc<Publication>]) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        match conn.state.phase() {
            Phase::WebSocket => {
                self.metrics.messages_out += publications.len() as u64;
                self.metrics.deliveries += publications.len() as u64;
                self.drive_key(key, |conn, io, cx| conn.send_publications(publications, io, cx));
            }
            Phase::Session => {
                for publication in publications {
                    self.deliver(key, publication);
                }
            }
            _ => {}
        }
    }

    /// Writes queued bytes as the socket accepts them.
    pub(crate) fn flush(&mut self, key: ConnKey) {
        self.drive_key(key, |conn, io, _| conn.flush(io));
    }

    /// Ends the connection once what is queued has been written.
    pub(crate) fn end_after_flush(&mut self, key: ConnKey) {
        self.drive_key(key, |conn, io, cx| conn.end_after_flush(io, cx));
    }

    /// Starts the WebSocket closing handshake (an HTTP session ends instead).
    pub(crate) fn close_websocket(&mut self, key: ConnKey, code: u16, reason: &str) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        if conn.state.phase() == Phase::Session {
            self.end_session(key, code, reason);
            return;
        }
        self.drive_key(key, |conn, io, cx| conn.close_websocket(code, reason, io, cx));
    }

    /// On shutdown: WebSockets get 1001, sessions end, idle HTTP closes.
    pub(crate) fn close_for_shutdown(&mut self, key: ConnKey, generation: u32) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if conn.state.phase() == Phase::Session {
            // Ending the session ends its stream or poll too.
            self.end_session(key, ws::close::GOING_AWAY, "server shutting down");
            return;
        }
        self.drive(key, generation, |conn, io, cx| conn.shutdown(io, cx));
    }

    /// Removes the connection: unsubscribes it everywhere and closes the socket.
    pub(crate) fn close_conn(&mut self, key: ConnKey) {
        let Some(mut conn) = self.conns.try_remove(key as usize) else { return };
        // What it still had queued leaves the backlog with it.
        self.outbox_moved(conn.state.output_messages(), 0);
        if let (Some(tls), Some(fd)) = (conn.tls.as_mut(), conn.fd.as_ref()) {
            // A clean TLS close, best effort: close_notify before our FIN.
            if tls.held().is_empty() && !tls.is_handshaking() {
                tls.close_notify();
                let _ = sys::send(fd.as_raw_fd(), tls.held());
            }
        }
        if let Some(fd) = &conn.fd {
            self.driver.unwatch_socket(fd.as_raw_fd(), conn_token(key, conn.state.generation()), true);
        }
        if let Some(role) = conn.state.http.take() {
            self.release_http_role(key, *role);
        }
        if conn.fd.is_some() {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            if let Some(peer) = conn.peer {
                self.shared.limiter.close(peer, self.shared.limiter.now_ms());
            }
        }
        if conn.state.marks.contains(Marks::UPGRADED) {
            self.metrics.websockets -= 1;
        }
        let user = conn.state.user().cloned();
        if conn.state.identity.is_some() {
            self.metrics.authenticated -= 1;
        }
        if let (true, Some(user)) = (conn.state.marks.contains(Marks::REGISTERED), &user) {
            self.unregister_user(key, user);
        }
        for subscription in &conn.state.subscriptions {
            // Pending subscriptions are settled when the owner's reply
            // finds the connection gone.
            if subscription.slot == PENDING_SLOT {
                continue;
            }
            let Some(channel) = self.index.get(subscription.channel) else { continue };
            let name = Arc::clone(&channel.name);
            let Some(subscriber) = self.index.remove(subscription.channel, subscription.slot) else { continue };
            let owner = owner_of(&name, self.shard_count());
            let presence_counts = subscriber.presence_counts;
            let message =
                Message::Unsubscribe { channel: name, shard: self.id as u16, user: user.clone(), presence_counts };
            self.bus.send(owner, message);
        }
        if conn.fd.is_some() && !conn.state.marks.contains(Marks::INPUT_DRAINED) {
            sys::discard_unread_input(conn.raw_fd());
        }
        // Dropping the descriptor closes it and removes it from the epoll set.
        drop(conn);
    }
}

/// Answers a socket refused at accept, best effort: our FIN goes out right
/// behind the response, and the request (usually there already) is read
/// away, so the close is not a reset that could destroy the response; a
/// request arriving later draws a reset only after the client has the FIN.
/// No lingering: a refused peer gets no more of our time.
fn refuse_at_accept(fd: &OwnedFd, response: &[u8]) {
    let _ = sys::send(fd.as_raw_fd(), response);
    let _ = sys::shutdown_write(fd.as_raw_fd());
    sys::discard_unread_input(fd.as_raw_fd());
}

/// A connection's socket as its state machine sees it (through TLS when
/// the listener has it), and the shard's counters it reports to.
pub(crate) struct SocketIo<'a> {
    /// -1 for a socket-less HTTP session: any syscall fails with EBADF.
    fd: RawFd,
    tls: Option<&'a mut TlsSession>,
    /// The shard's buffer for records sealed in one write.
    sealed: &'a mut Vec<u8>,
    metrics: &'a mut Metrics,
}

impl<'a> SocketIo<'a> {
    pub(crate) fn new(
        fd: RawFd,
        tls: Option<&'a mut TlsSession>,
        sealed: &'a mut Vec<u8>,
        metrics: &'a mut Metrics,
    ) -> Self {
        SocketIo { fd, tls, sealed, metrics }
    }
}

/// Non-blocking gathered send: the bytes the socket took, 0 when full.
fn send_chunks<'a>(fd: RawFd, chunks: impl Iterator<Item = &'a [u8]> + Clone) -> Result<usize, Broken> {
    loop {
        match sys::send_vectored(fd, chunks.clone()) {
            Ok(written) => return Ok(written),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Broken),
        }
    }
}

/// `chunks` without their first `skip` bytes.
fn skip_bytes<'a>(chunks: impl Iterator<Item = &'a [u8]>, mut skip: usize) -> impl Iterator<Item = &'a [u8]> {
    chunks.filter_map(move |chunk| {
        if skip >= chunk.len() {
            skip -= chunk.len();
            return None;
        }
        let rest = &chunk[skip..];
        skip = 0;
        Some(rest)
    })
}

impl Io for SocketIo<'_> {
    fn send_vectored<'a>(&mut self, chunks: impl Iterator<Item = &'a [u8]> + Clone) -> Result<usize, Broken> {
        let fd = self.fd;
        let Some(tls) = self.tls.as_deref_mut() else { return send_chunks(fd, chunks) };
        // Records already sealed go first; while they wait, nothing new is
        // sealed (so at most one write's worth is ever held).
        if !tls.held().is_empty() {
            let written = send_chunks(fd, std::iter::once(tls.held()))?;
            tls.advance_held(written);
            if !tls.held().is_empty() {
                return Ok(0);
            }
        }
        // Seal a budget at a time while the socket takes it all: the
        // connection reads "fewer bytes than offered" as "the socket is
        // full" and waits for it to become writable.
        let mut taken = 0;
        loop {
            self.sealed.clear();
            let rest = skip_bytes(chunks.clone().take(IOVECS_MAX), taken);
            let sealed_now = tls.seal(rest, SEAL_BUDGET_BYTES, self.sealed).map_err(|_| Broken)?;
            if sealed_now == 0 {
                break;
            }
            taken += sealed_now;
            let written = send_chunks(fd, std::iter::once(&self.sealed[..]))?;
            if written < self.sealed.len() {
                tls.hold(&self.sealed[written..]);
                break;
            }
        }
        if self.sealed.capacity() > 4 * SEAL_BUDGET_BYTES {
            *self.sealed = Vec::new();
        }
        Ok(taken)
    }

    fn shutdown_write(&mut self) -> Result<(), Broken> {
        sys::shutdown_write(self.fd).map_err(|_| Broken)
    }

    fn holds_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| !tls.held().is_empty())
    }

    fn flush_held(&mut self) -> Result<bool, Broken> {
        let fd = self.fd;
        let Some(tls) = self.tls.as_deref_mut() else { return Ok(true) };
        if tls.held().is_empty() {
            return Ok(true);
        }
        let written = send_chunks(fd, std::iter::once(tls.held()))?;
        tls.advance_held(written);
        Ok(tls.held().is_empty())
    }

    fn count(&mut self, what: Count) {
        match what {
            Count::ProtocolError => self.metrics.protocol_errors += 1,
            Count::SlowConsumer => self.metrics.slow_consumers_closed += 1,
            Count::Limit(kind) => self.metrics.limit_refusals.add(kind),
        }
    }
}
