//! The per-connection driver: accept, read into the shard's scratch buffer,
//! hand bytes to the protocol layer, write with a bounded outbox, close.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{sys, Conn, Shard, ACCEPTS_PER_TICK, READ_BYTES_PER_CONN_PER_TICK};
use crate::bus::Message;
use crate::hub::index::ConnKey;
use crate::hub::owner_of;
use crate::hub::publication::Publication;
use crate::session::http::BufItem;
use crate::session::outbox::{Admission, OutItem, Outbox, Wire};
use crate::session::{Flags, Phase, Session, PENDING_SLOT};
use kometa_protocol::ws;

/// A kept remainder with more spare capacity than this is shrunk.
const REMAINDER_SHRINK_BYTES: usize = 64 * 1024;

/// Generations stay below this: the I/O driver keeps the top bits of a
/// token for its own requests (io.rs).
const GENERATION_LIMIT: u32 = 1 << 30;

/// The driver token of a connection: its generation, then its slab key.
pub(crate) fn conn_token(key: ConnKey, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(key)
}

/// Sent, best effort, to a connection refused at the connection cap.
const REFUSED_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 24\r\nRetry-After: 5\r\nConnection: close\r\n\r\nserver connection limit\n";

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
                        tracing::warn!(shard = self.id, %error, "accept failed: out of descriptors or memory; pausing accepts for 100 ms");
                        self.pause_accepting();
                        break;
                    }
                    _ => {
                        tracing::warn!(shard = self.id, %error, "accept failed");
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
        tracing::warn!(shard = self.id, %error, "accept failed; pausing accepts for 100 ms");
        self.pause_accepting();
    }

    fn admit(&mut self, fd: OwnedFd) {
        let open = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.shared.connections_max || self.is_draining() || self.conns.len() >= (u32::MAX - 2) as usize {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            self.metrics.connections_refused += 1;
            let _ = sys::send(fd.as_raw_fd(), REFUSED_RESPONSE);
            // Our FIN goes out right behind the 503, and the request (usually
            // there already) is read away, so the close is not a reset that
            // could destroy the 503; a request arriving later draws a reset
            // only after the client has the FIN. No lingering: we are at the cap.
            let _ = sys::shutdown_write(fd.as_raw_fd());
            sys::discard_unread_input(fd.as_raw_fd());
            return;
        }
        // TCP_NODELAY comes from the listener (Linux copies it to accepted sockets).
        if self.register_socket(fd).is_some() {
            self.metrics.connections_accepted += 1;
        }
    }

    /// The next connection generation (never 0).
    pub(crate) fn take_generation(&mut self) -> u32 {
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) % GENERATION_LIMIT;
        self.next_generation = self.next_generation.max(1);
        generation
    }

    /// Adds a socket to the slab and the epoll set; it starts reading an
    /// HTTP request. On failure the socket is closed and uncounted.
    fn register_socket(&mut self, fd: OwnedFd) -> Option<(ConnKey, u32)> {
        let generation = self.take_generation();
        let entry = self.conns.vacant_entry();
        let key = entry.key() as ConnKey;
        let token = conn_token(key, generation);
        if let Err(error) = self.driver.watch_socket(fd.as_raw_fd(), token) {
            tracing::warn!(shard = self.id, %error, "cannot watch a new socket");
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        entry.insert(Conn { fd: Some(fd), session: Session::new(generation, self.now_ms, &self.config.timeouts) });
        Some((key, generation))
    }

    /// A connection handed over by another shard (it asked for an HTTP
    /// session that lives here): register it and replay what was read.
    pub(crate) fn adopt(&mut self, fd: OwnedFd, mut input: Box<[u8]>) {
        if let Some((key, generation)) = self.register_socket(fd) {
            self.feed(key, generation, &mut input);
        }
    }

    /// Hands this connection and its unread `input` to `shard`: removed from
    /// this shard without closing the socket.
    pub(crate) fn migrate(&mut self, key: ConnKey, shard: usize, input: &[u8]) {
        let Some(mut conn) = self.conns.try_remove(key as usize) else { return };
        let Some(fd) = conn.fd.take() else { return };
        self.driver.unwatch_socket(fd.as_raw_fd(), conn_token(key, conn.session.generation), false);
        self.bus.send(shard, crate::bus::Message::Adopt { fd, input: input.into() });
    }

    /// The connection at `key`, if it is still the one with `generation`.
    pub(crate) fn conn_mut(&mut self, key: ConnKey, generation: u32) -> Option<&mut Conn> {
        self.conns.get_mut(key as usize).filter(|conn| conn.session.generation == generation)
    }

    pub(crate) fn alive(&self, key: ConnKey, generation: u32) -> bool {
        self.conns.get(key as usize).is_some_and(|conn| conn.session.generation == generation)
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
            conn.session.flags.remove(Flags::INPUT_DRAINED);
            if events & (sys::EPOLLRDHUP | sys::EPOLLHUP) != 0 {
                conn.session.flags.insert(Flags::PEER_SHUT_WRITE);
            }
            // Already waiting for its turn to read (its budget ran out): the
            // new data is read then, not now with a fresh budget.
            let waiting_turn =
                conn.session.flags.contains(Flags::QUEUED) && conn.session.flags.contains(Flags::READ_PENDING);
            if !waiting_turn {
                self.read_connection(key, generation);
            }
        }
    }

    /// Another turn for a connection: input left over from a pause, or
    /// unread socket data.
    pub(crate) fn resume_connection(&mut self, key: ConnKey, generation: u32) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if conn.session.flags.contains(Flags::AWAITING_REPLY) {
            return;
        }
        if conn.session.phase == Phase::Session {
            self.run_session_commands(key, generation);
            return;
        }
        let has_remainder = conn.session.rx.as_ref().is_some_and(|rx| !rx.remainder.is_empty());
        if has_remainder {
            self.feed(key, generation, &mut []);
        }
        let read_pending = self.conn_mut(key, generation).is_some_and(|conn| {
            conn.session.flags.contains(Flags::READ_PENDING) && !conn.session.flags.contains(Flags::AWAITING_REPLY)
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
            let Some(conn) = self.conn_mut(key, generation) else { break };
            if conn.session.phase == Phase::Polling && conn.session.flags.contains(Flags::PEER_SHUT_WRITE) {
                // The client gave up on its waiting poll (browsers never
                // half-close a request): free the socket now rather than at
                // the poll timeout. Its session keeps every message until
                // a later poll acknowledges it.
                self.peer_closed(key);
                break;
            }
            if conn.session.flags.contains(Flags::AWAITING_REPLY) || conn.session.phase == Phase::Polling {
                // Paused until the reply (or the poll's answer) goes out.
                conn.session.flags.insert(Flags::READ_PENDING);
                break;
            }
            if overloaded || budget == 0 {
                conn.session.flags.insert(Flags::READ_PENDING);
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
                    conn.session.on_input(now_ms);
                    conn.session.flags.remove(Flags::READ_PENDING);
                    if count < scratch.len() {
                        conn.session.flags.insert(Flags::INPUT_DRAINED);
                    } else {
                        conn.session.flags.remove(Flags::INPUT_DRAINED);
                    }
                    let peer_shut_write = conn.session.flags.contains(Flags::PEER_SHUT_WRITE);
                    budget = budget.saturating_sub(count);
                    self.feed(key, generation, &mut scratch[..count]);
                    // A short read drained the socket; edge-triggered epoll
                    // reports any data that arrives after it. Not so for a
                    // FIN already queued: read on until the end of stream.
                    if count < scratch.len() && !peer_shut_write {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    conn.session.flags.remove(Flags::READ_PENDING);
                    conn.session.flags.insert(Flags::INPUT_DRAINED);
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

    /// The peer closed its side (end of stream). A WebSocket without a close
    /// frame is an abnormal closure; either way the connection ends, but
    /// only once what is already queued for the peer has been written: a
    /// client that half-closes after its request (HTTP/1.0 tools, health
    /// checkers, proxies) still reads the whole response.
    fn peer_closed(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.session.outbox.is_none() {
            self.close_conn(key);
            return;
        }
        if conn.session.flags.contains(Flags::CLOSE_AFTER_FLUSH) {
            // Already ending, with its own deadline.
            return;
        }
        // A poll or stream leaves its session now, so nothing more is
        // written into a connection that only finishes its output.
        if let Some(role) = conn.session.http.take() {
            self.release_http_role(key, *role);
        }
        self.end_after_flush(key);
    }

    /// Hands fresh bytes (after any kept remainder) to the protocol layer
    /// and keeps what it could not use yet.
    pub(crate) fn feed(&mut self, key: ConnKey, generation: u32, fresh: &mut [u8]) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        let mut remainder = conn.session.rx.as_mut().map(|rx| std::mem::take(&mut rx.remainder)).unwrap_or_default();
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
        let cap = self.remainder_cap();
        let Some(conn) = self.conn_mut(key, generation) else { return };
        if remainder.len() > cap {
            // The codecs check declared lengths before asking for more, so
            // this means a bug, not a hostile peer; end only this connection.
            tracing::error!(key, bytes = remainder.len(), "input remainder over its cap");
            self.close_conn(key);
            return;
        }
        if remainder.is_empty() {
            if let Some(rx) = conn.session.rx.as_mut() {
                rx.remainder = Vec::new();
            }
            conn.session.shrink_rx();
        } else {
            // Give back memory a large frame left behind, but not while a
            // frame is still growing (that would copy it on every read).
            if remainder.capacity() > REMAINDER_SHRINK_BYTES && remainder.len() < remainder.capacity() / 4 {
                remainder.shrink_to_fit();
            }
            conn.session.rx.get_or_insert_with(Default::default).remainder = remainder;
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

    /// Runs complete requests or frames from `input`; returns bytes used.
    fn consume(&mut self, key: ConnKey, generation: u32, input: &mut [u8]) -> usize {
        let mut position = 0;
        while position < input.len() {
            let Some(conn) = self.conn_mut(key, generation) else { return input.len() };
            let flags = conn.session.flags;
            if flags.contains(Flags::CLOSE_AFTER_FLUSH) {
                // Ending: nothing more is read from this connection.
                return input.len();
            }
            if flags.contains(Flags::AWAITING_REPLY) {
                break;
            }
            let used = match conn.session.phase {
                Phase::Http => self.http_input(key, generation, &mut input[position..]),
                Phase::WebSocket | Phase::Closing => self.ws_input(key, generation, &mut input[position..]),
                // A waiting poll: keep what follows for after its answer.
                Phase::Polling => break,
                // An SSE stream: the client has nothing more to say on it.
                // Lingering: the rest of a refused request is discarded.
                Phase::Stream | Phase::Session | Phase::Lingering => return input.len(),
            };
            match used {
                Some(used) if used > 0 => position += used,
                _ => break,
            }
        }
        position
    }

    /// Sends `item` now if the socket takes it, else queues it in the outbox;
    /// a connection whose outbox would pass its cap is closed as a slow consumer.
    pub(crate) fn send_item(&mut self, key: ConnKey, item: OutItem) {
        debug_assert!(!item.bytes().is_empty());
        let (bytes_max, messages_max) = (self.config.limits.outbox_bytes_max, self.config.limits.outbox_messages_max);
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.session.phase == Phase::Session {
            // An HTTP session buffers and forwards to its stream or poll.
            let item = match item {
                OutItem::Publication(publication, _) => BufItem::Publication(publication),
                OutItem::Owned(json) => BufItem::Json(json),
            };
            self.session_push(key, item);
            return;
        }
        self.metrics.messages_out += 1;
        if let Some(outbox) = conn.session.outbox.as_mut() {
            if outbox.push(item, bytes_max, messages_max) == Admission::OverLimit {
                self.slow_consumer(key);
            }
            return;
        }
        let fd = conn.raw_fd();
        loop {
            let bytes = item.bytes();
            match sys::send(fd, bytes) {
                Ok(written) if written == bytes.len() => return,
                Ok(written) => {
                    conn.session.outbox = Some(Box::new(Outbox::with_partial(item, written)));
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    conn.session.outbox = Some(Box::new(Outbox::with_partial(item, 0)));
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_conn(key);
                    return;
                }
            }
        }
    }

    pub(crate) fn send_owned(&mut self, key: ConnKey, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.send_item(key, OutItem::Owned(bytes.into_boxed_slice()));
        }
    }

    /// Writes a publication to a subscriber.
    pub(crate) fn deliver(&mut self, key: ConnKey, publication: &Arc<Publication>) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        if !matches!(conn.session.phase, Phase::WebSocket | Phase::Session) {
            return;
        }
        self.send_item(key, OutItem::Publication(Arc::clone(publication), Wire::WebSocket));
    }

    /// Writes several publications to one subscriber: one gathered write
    /// when the socket is idle, the rest queued if it pushes back.
    pub(crate) fn deliver_all(&mut self, key: ConnKey, publications: &[Arc<Publication>]) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        let direct = conn.session.phase == Phase::WebSocket && conn.session.outbox.is_none();
        if publications.len() < 2 || !direct {
            for publication in publications {
                self.deliver(key, publication);
            }
            return;
        }
        let fd = conn.raw_fd();
        self.metrics.messages_out += publications.len() as u64;
        let written = loop {
            match sys::send_vectored(fd, publications.iter().map(|p| p.ws_frame())) {
                Ok(written) => break written,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(_) => {
                    self.close_conn(key);
                    return;
                }
            }
        };
        // Whatever the socket did not take waits in the outbox, in order.
        let mut remaining = written;
        let mut rest = publications.iter();
        for publication in rest.by_ref() {
            let len = publication.ws_frame().len();
            if remaining >= len {
                remaining -= len;
                continue;
            }
            let item = OutItem::Publication(Arc::clone(publication), Wire::WebSocket);
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.session.outbox = Some(Box::new(Outbox::with_partial(item, remaining)));
            }
            break;
        }
        let (bytes_max, messages_max) = (self.config.limits.outbox_bytes_max, self.config.limits.outbox_messages_max);
        for publication in rest {
            let Some(outbox) = self.conns.get_mut(key as usize).and_then(|c| c.session.outbox.as_mut()) else { return };
            let item = OutItem::Publication(Arc::clone(publication), Wire::WebSocket);
            if outbox.push(item, bytes_max, messages_max) == Admission::OverLimit {
                self.slow_consumer(key);
                return;
            }
        }
    }

    /// Writes queued bytes as the socket accepts them.
    pub(crate) fn flush(&mut self, key: ConnKey) {
        loop {
            let Some(conn) = self.conns.get_mut(key as usize) else { return };
            let fd = conn.raw_fd();
            let Some(outbox) = conn.session.outbox.as_mut() else { return };
            match sys::send_vectored(fd, outbox.chunks(sys::IOVECS_MAX)) {
                Ok(written) => {
                    outbox.advance(written);
                    if outbox.is_empty() {
                        conn.session.outbox = None;
                        if conn.session.flags.contains(Flags::CLOSE_AFTER_FLUSH) {
                            self.finish_after_flush(key);
                        }
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_conn(key);
                    return;
                }
            }
        }
    }

    /// Closes the connection once everything queued has been written.
    /// The outbox of an ending connection is empty: close it, or for a
    /// lingering one send our FIN and wait for the peer's.
    fn finish_after_flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.session.phase != Phase::Lingering || conn.fd.is_none() {
            self.close_conn(key);
            return;
        }
        if sys::shutdown_write(conn.raw_fd()).is_err() {
            self.close_conn(key);
        }
    }

    /// Like `end_after_flush` for a response sent before the whole request
    /// was read (the client may still be sending): see `Phase::Lingering`.
    /// Bounded by `close_timeout_ms` like any other ending connection.
    pub(crate) fn end_after_flush_lingering(&mut self, key: ConnKey) {
        let now_ms = self.now_ms;
        let close_timeout_ms = self.config.timeouts.close_timeout_ms;
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        conn.session.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        conn.session.phase = Phase::Lingering;
        conn.session.deadline_ms = now_ms + close_timeout_ms;
        if conn.session.outbox.is_none() {
            self.finish_after_flush(key);
        }
    }

    pub(crate) fn end_after_flush(&mut self, key: ConnKey) {
        let now_ms = self.now_ms;
        let close_timeout_ms = self.config.timeouts.close_timeout_ms;
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.session.outbox.is_none() {
            self.close_conn(key);
            return;
        }
        conn.session.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        conn.session.phase = match conn.session.phase {
            Phase::Http => Phase::Http,
            _ => Phase::Closing,
        };
        conn.session.deadline_ms = now_ms + close_timeout_ms;
    }

    /// Starts the WebSocket closing handshake: sends our close frame and
    /// waits (up to `close_timeout_ms`) for the peer's.
    pub(crate) fn close_websocket(&mut self, key: ConnKey, code: u16, reason: &str) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.session.phase == Phase::Session {
            self.end_session(key, code, reason);
            return;
        }
        if conn.session.flags.contains(Flags::CLOSE_SENT) {
            return;
        }
        conn.session.flags.insert(Flags::CLOSE_SENT);
        conn.session.start_closing(self.now_ms, &self.config.timeouts);
        self.send_owned(key, ws::encode_close(code, reason));
    }

    /// The outbox passed its cap: drop what is queued (finishing a partly
    /// written frame), send 1008, and close once that is out.
    fn slow_consumer(&mut self, key: ConnKey) {
        self.metrics.slow_consumers_closed += 1;
        let now_ms = self.now_ms;
        let close_timeout_ms = self.config.timeouts.close_timeout_ms;
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        tracing::debug!(shard = self.id, key, "closing slow consumer");
        if !matches!(conn.session.phase, Phase::WebSocket | Phase::Closing) {
            // An SSE stream or an HTTP response: no close frame to send; the
            // session (if any) detaches and its client resumes from its buffer.
            self.close_conn(key);
            return;
        }
        let close_frame = OutItem::Owned(
            ws::encode_close(ws::close::SLOW_CONSUMER, "slow consumer: outbox limit reached").into_boxed_slice(),
        );
        if let Some(outbox) = conn.session.outbox.as_mut() {
            outbox.cut_after_front();
            outbox.push_unbounded(close_frame);
        }
        conn.session.flags.insert(Flags::CLOSE_SENT);
        conn.session.flags.insert(Flags::CLOSE_AFTER_FLUSH);
        conn.session.phase = Phase::Closing;
        conn.session.deadline_ms = now_ms + close_timeout_ms;
    }

    /// On shutdown: WebSockets get 1001, anything else is closed.
    pub(crate) fn close_for_shutdown(&mut self, key: ConnKey, generation: u32) {
        let Some(conn) = self.conn_mut(key, generation) else { return };
        match conn.session.phase {
            Phase::WebSocket => {
                self.close_websocket(key, ws::close::GOING_AWAY, "server shutting down");
                self.end_after_flush(key);
            }
            // Ending the session ends its stream or poll too.
            Phase::Session => self.end_session(key, ws::close::GOING_AWAY, "server shutting down"),
            Phase::Closing | Phase::Stream | Phase::Polling | Phase::Lingering => {}
            Phase::Http => self.close_conn(key),
        }
    }

    /// Removes the connection: unsubscribes it everywhere and closes the socket.
    pub(crate) fn close_conn(&mut self, key: ConnKey) {
        let Some(mut conn) = self.conns.try_remove(key as usize) else { return };
        if let Some(fd) = &conn.fd {
            self.driver.unwatch_socket(fd.as_raw_fd(), conn_token(key, conn.session.generation), true);
        }
        if let Some(role) = conn.session.http.take() {
            self.release_http_role(key, *role);
        }
        if conn.fd.is_some() {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        }
        if conn.session.flags.contains(Flags::UPGRADED) {
            self.metrics.websockets -= 1;
        }
        let user = conn.session.user().cloned();
        if conn.session.identity.is_some() {
            self.metrics.authenticated -= 1;
        }
        if let (true, Some(user)) = (conn.session.flags.contains(Flags::REGISTERED), &user) {
            self.unregister_user(key, user);
        }
        for subscription in &conn.session.subscriptions {
            // Pending subscriptions are settled when the owner's reply
            // finds the connection gone.
            if subscription.slot == PENDING_SLOT {
                continue;
            }
            let Some(channel) = self.index.get(subscription.channel) else { continue };
            let name = Arc::clone(&channel.name);
            self.index.remove(subscription.channel, subscription.slot);
            let owner = owner_of(&name, self.shard_count());
            self.bus.send(owner, Message::Unsubscribe { channel: name, shard: self.id as u16, user: user.clone() });
        }
        if conn.fd.is_some() && !conn.session.flags.contains(Flags::INPUT_DRAINED) {
            sys::discard_unread_input(conn.raw_fd());
        }
        // Dropping the descriptor closes it and removes it from the epoll set.
        drop(conn);
    }
}
