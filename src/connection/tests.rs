//! A connection driven in memory: a fake socket that takes as many bytes
//! as a test allows, and a clock that moves only when a test moves it.
//! No runtime, no sleeps: timeouts are exact.

use super::*;
use crate::connection::http::{HttpSession, SessionKind};
use crate::hub::publication::{Publication, PushFields};
use crate::limits::LimitKind;

/// A socket whose send buffer takes `room` more bytes.
#[derive(Default)]
struct FakeSocket {
    sent: Vec<u8>,
    room: usize,
    shut_write: bool,
    broken: bool,
    counts: Vec<Count>,
    /// Bytes a transport (TLS) took but the socket has not yet.
    held: usize,
}

impl Io for FakeSocket {
    fn send_vectored<'a>(&mut self, chunks: impl Iterator<Item = &'a [u8]> + Clone) -> Result<usize, Broken> {
        if self.broken {
            return Err(Broken);
        }
        let mut written = 0;
        for chunk in chunks.take(IOVECS_MAX) {
            let take = chunk.len().min(self.room);
            self.sent.extend_from_slice(&chunk[..take]);
            self.room -= take;
            written += take;
            if take < chunk.len() {
                break;
            }
        }
        Ok(written)
    }

    fn shutdown_write(&mut self) -> Result<(), Broken> {
        assert!(!self.shut_write, "FIN sent twice");
        self.shut_write = true;
        Ok(())
    }

    fn count(&mut self, what: Count) {
        self.counts.push(what);
    }

    fn holds_output(&self) -> bool {
        self.held > 0
    }

    fn flush_held(&mut self) -> Result<bool, Broken> {
        let out = self.held.min(self.room);
        self.held -= out;
        self.room -= out;
        Ok(self.held == 0)
    }
}

/// What a step handed to the application, owned.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Request(String),
    Message(Vec<u8>),
    Close,
}

struct Harness {
    limits: Limits,
    timeouts: Timeouts,
    now_ms: u64,
    conn: Connection,
    socket: FakeSocket,
}

fn timeouts() -> Timeouts {
    Timeouts {
        handshake_timeout_ms: 1_000,
        ping_interval_ms: 10_000,
        pong_timeout_ms: 5_000,
        close_timeout_ms: 2_000,
        shutdown_timeout_ms: 1_000,
        sweep_interval_ms: 100,
        session_grace_ms: 3_000,
        poll_timeout_ms: 1_000,
        sse_heartbeat_ms: 500,
        admin_write_timeout_ms: 1_000,
        message_timeout_ms: 3_000,
        admin_auth_timeout_ms: 1_000,
        presence_counts_interval_ms: 1_000,
    }
}

impl Harness {
    fn new() -> Harness {
        let limits = Limits { outbox_bytes_max: 1_000, outbox_messages_max: 8, ..Limits::default() };
        let timeouts = timeouts();
        let cx = Context { now_ms: 0, limits: &limits, timeouts: &timeouts };
        let conn = Connection::new(1, &cx);
        Harness { limits, timeouts, now_ms: 0, conn, socket: FakeSocket { room: usize::MAX, ..Default::default() } }
    }

    /// An open WebSocket (the upgrade response itself is not written).
    fn websocket() -> Harness {
        let mut harness = Harness::new();
        harness.with(|conn, _, cx| {
            conn.upgraded(false, cx);
        });
        harness
    }

    fn with<R>(&mut self, action: impl FnOnce(&mut Connection, &mut FakeSocket, &Context<'_>) -> R) -> R {
        let cx = Context { now_ms: self.now_ms, limits: &self.limits, timeouts: &self.timeouts };
        action(&mut self.conn, &mut self.socket, &cx)
    }

    /// Feeds bytes the way the shard does: after the kept remainder, step
    /// by step; a request is answered 200 and kept alive.
    fn feed(&mut self, fresh: &[u8]) -> Vec<Seen> {
        let cx = Context { now_ms: self.now_ms, limits: &self.limits, timeouts: &self.timeouts };
        self.conn.on_input(&cx);
        let mut input = self.conn.take_remainder();
        input.extend_from_slice(fresh);
        let mut seen = Vec::new();
        let mut position = 0;
        while position < input.len() {
            let cx = Context { now_ms: self.now_ms, limits: &self.limits, timeouts: &self.timeouts };
            match self.conn.step(&mut input[position..], &mut self.socket, &cx) {
                Step::Wait => break,
                Step::Used(used) => position += used,
                Step::Close => {
                    seen.push(Seen::Close);
                    return seen;
                }
                Step::Message { used, payload } => {
                    seen.push(Seen::Message(payload.to_vec()));
                    position += used;
                }
                Step::Request { used, request, .. } => {
                    seen.push(Seen::Request(request.path.to_owned()));
                    let keep_alive = request.keep_alive();
                    let mut response = Vec::new();
                    http_codec::write_text_response(&mut response, 200, &[], "ok", keep_alive);
                    assert_eq!(self.conn.send_owned(response, &mut self.socket, &cx), Verdict::Keep);
                    if self.conn.request_answered(keep_alive, &self.socket, &cx) == Verdict::Close {
                        seen.push(Seen::Close);
                        return seen;
                    }
                    position += used;
                }
            }
        }
        input.drain(..position);
        assert_eq!(self.conn.keep_remainder(input, 1 << 20), Verdict::Keep);
        seen
    }

    fn timer_at(&mut self, now_ms: u64) -> Timer {
        self.now_ms = now_ms;
        self.with(|conn, socket, cx| conn.on_timer(socket, cx))
    }

    fn take_sent(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.socket.sent)
    }
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    ws::encode_client_frame(0x80 | opcode, payload, [1, 2, 3, 4])
}

/// Server frames (unmasked) as (opcode, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let opcode = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
            len => (len as usize, 2),
        };
        frames.push((opcode, bytes[header..header + len].to_vec()));
        bytes = &bytes[header + len..];
    }
    frames
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response).lines().next().unwrap_or_default().to_owned()
}

fn publication(data: &str) -> Arc<Publication> {
    let json = format!("\"{data}\"");
    let fields = PushFields { channel: "news", event: "message", data: json.as_bytes(), user: None };
    Arc::new(Publication::encode("news".into(), "e".into(), 1, fields))
}

// -- HTTP head phase ------------------------------------------------------

#[test]
fn requests_arrive_whole_even_when_split_and_pipelined() {
    let mut h = Harness::new();
    assert_eq!(h.feed(b"GET /a HTTP/1.1\r\nHost: x\r"), vec![]);
    assert_eq!(
        h.feed(b"\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab"),
        vec![Seen::Request("/a".into()), Seen::Request("/b".into())]
    );
    assert!(!h.conn.is_at_rest(), "the partial body is kept");
    assert_eq!(h.feed(b"cd"), vec![Seen::Request("/c".into())]);
    assert!(h.conn.is_at_rest(), "nothing kept once all is used");
}

#[test]
fn http_1_0_without_keep_alive_ends_after_the_response() {
    let mut h = Harness::new();
    h.socket.room = 10;
    assert_eq!(h.feed(b"GET / HTTP/1.0\r\n\r\n"), vec![Seen::Request("/".into())]);
    assert!(h.conn.is_ending());
    h.socket.room = usize::MAX;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Close, "closed once flushed");
    assert!(status_line(&h.socket.sent).starts_with("HTTP/1.1 200"));
}

#[test]
fn malformed_heads_are_answered_and_the_connection_lingers() {
    for (input, status) in [
        (&b"BLAH\r\n\r\n"[..], "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"GET / HTTQ/1.1\r\nHost: x\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: tea\r\nContent-Length: 3\r\n\r\n", "417"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", "413"),
        (b"GET / HTTP/2.0\r\n\r\n", "505"),
    ] {
        let mut h = Harness::new();
        assert_eq!(h.feed(input), vec![], "{status}");
        assert!(status_line(&h.socket.sent).contains(status), "{:?}", status_line(&h.socket.sent));
        assert_eq!(h.conn.phase(), Phase::Lingering);
        assert!(h.socket.shut_write, "our FIN follows the response at once");
        assert_eq!(h.socket.counts, vec![Count::ProtocolError]);
        // The rest of the request is read away, never parsed.
        let sent = h.socket.sent.len();
        assert_eq!(h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), vec![]);
        assert_eq!(h.socket.sent.len(), sent);
        assert_eq!(h.timer_at(1_999), Timer::Nothing);
        assert_eq!(h.timer_at(2_000), Timer::Close, "bounded by close_timeout_ms");
    }
}

#[test]
fn a_slow_head_gets_408_and_an_idle_keep_alive_closes_quietly() {
    let mut h = Harness::new();
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(h.timer_at(999), Timer::Nothing);
    assert_eq!(h.timer_at(1_000), Timer::Nothing, "answered, then lingering");
    assert!(status_line(&h.socket.sent).contains("408"));
    assert_eq!(h.conn.phase(), Phase::Lingering);
    assert_eq!(h.timer_at(3_000), Timer::Close);

    let mut idle = Harness::new();
    assert_eq!(idle.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").len(), 1);
    idle.take_sent();
    // Keep-alive restarts the head deadline from the answer.
    idle.now_ms = 500;
    idle.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    idle.take_sent();
    assert_eq!(idle.timer_at(1_499), Timer::Nothing);
    assert_eq!(idle.timer_at(1_500), Timer::Close);
    assert!(idle.socket.sent.is_empty(), "no 408 without a partial request");
}

#[test]
fn a_dribbled_body_gets_408_at_the_request_deadline() {
    let mut h = Harness::new();
    h.feed(b"POST /cmd HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    // A byte every 100 ms: activity all the time, the request never whole.
    for now_ms in (100..1_000).step_by(100) {
        h.now_ms = now_ms;
        assert_eq!(h.feed(b"x"), vec![]);
        assert_eq!(h.timer_at(now_ms), Timer::Nothing);
    }
    assert_eq!(h.timer_at(1_000), Timer::Nothing, "answered, then lingering");
    assert!(status_line(&h.socket.sent).contains("408"), "{:?}", status_line(&h.socket.sent));
    assert_eq!(h.socket.counts, vec![Count::Limit(LimitKind::RequestTimeout)]);
}

#[test]
fn expect_100_continue_is_answered_once_before_the_body() {
    let mut h = Harness::new();
    let head = b"POST /cmd HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
    assert_eq!(h.feed(head), vec![]);
    assert_eq!(h.take_sent(), b"HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(h.feed(b"ab"), vec![]);
    assert!(h.socket.sent.is_empty(), "once per request");
    assert_eq!(h.feed(b"cd"), vec![Seen::Request("/cmd".into())]);
    assert!(status_line(&h.take_sent()).contains("200"));
    // The next request asks again and gets its own.
    h.feed(head);
    assert_eq!(h.take_sent(), b"HTTP/1.1 100 Continue\r\n\r\n");

    // The body came along with the head: nothing to wait for.
    let mut eager = Harness::new();
    let whole = [&head[..], b"abcd"].concat();
    assert_eq!(eager.feed(&whole), vec![Seen::Request("/cmd".into())]);
    assert!(!String::from_utf8_lossy(&eager.socket.sent).contains("100 Continue"));

    // A body that will be refused is refused instead, before it is sent.
    let mut big = Harness::new();
    big.feed(b"POST /cmd HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999999\r\n\r\n");
    let sent = String::from_utf8_lossy(&big.socket.sent).into_owned();
    assert!(sent.starts_with("HTTP/1.1 413"), "{sent}");
    assert!(!sent.contains("100 Continue"));
}

// -- WebSocket ------------------------------------------------------------

#[test]
fn a_dribbled_message_is_cut_off_at_the_message_deadline() {
    let mut h = Harness::websocket();
    let frame = client_frame(ws::OPCODE_TEXT, &[b'x'; 200]);
    // One byte every 500 ms: each keeps the connection "alive" (no ping
    // timeout), but the message must be whole 3 s after its first byte.
    let mut now_ms = 1_000;
    for byte in frame.iter().take(6) {
        h.now_ms = now_ms;
        assert_eq!(h.feed(&[*byte]), vec![]);
        assert_eq!(h.timer_at(now_ms), Timer::Nothing, "at {now_ms} ms");
        assert!(h.socket.sent.is_empty());
        now_ms += 500;
    }
    assert_eq!(h.timer_at(3_999), Timer::Nothing);
    assert_eq!(h.timer_at(4_000), Timer::Nothing, "a close frame, then the closing handshake");
    let frames = server_frames(&h.take_sent());
    assert_eq!((frames[0].0, close_code(&frames[0].1)), (ws::OPCODE_CLOSE, ws::close::POLICY_VIOLATION));
    assert_eq!(h.socket.counts, vec![Count::Limit(LimitKind::MessageTimeout)]);
    assert_eq!(h.conn.phase(), Phase::Closing);
    assert_eq!(h.timer_at(6_000), Timer::Close, "bounded by close_timeout_ms");
}

#[test]
fn messages_in_a_steady_stream_each_get_their_own_deadline() {
    // Every read ends inside a frame (a slow link, back-to-back messages):
    // input is never empty, yet each message arrives well in time.
    let mut h = Harness::websocket();
    let stream: Vec<u8> = (0..40).flat_map(|_| client_frame(ws::OPCODE_TEXT, &[b'y'; 100])).collect();
    let mut messages = 0;
    for (step, chunk) in stream.chunks(70).enumerate() {
        h.now_ms = 1_000 + step as u64 * 400;
        messages += h.feed(chunk).len();
        assert_eq!(h.timer_at(h.now_ms), Timer::Nothing, "step {step}");
    }
    assert_eq!(messages, 40);
    assert!(h.socket.sent.is_empty(), "no close");
    assert!(h.socket.counts.is_empty());
}

#[test]
fn a_fragmented_message_counts_from_its_first_fragment() {
    let mut h = Harness::websocket();
    h.now_ms = 100;
    assert_eq!(h.feed(&ws::encode_client_frame(ws::OPCODE_TEXT, b"ab", [1, 1, 1, 1])), vec![]);
    // Control frames in between are whole, but the message is not.
    for now_ms in [1_000, 2_000, 3_000] {
        h.now_ms = now_ms;
        h.feed(&client_frame(ws::OPCODE_PING, b""));
        assert_eq!(h.timer_at(now_ms), Timer::Nothing);
    }
    h.take_sent();
    assert_eq!(h.timer_at(3_100), Timer::Nothing);
    let frames = server_frames(&h.take_sent());
    assert_eq!(close_code(&frames[0].1), ws::close::POLICY_VIOLATION);
}

#[test]
fn input_held_while_paused_for_a_reply_is_not_timed_out() {
    let mut h = Harness::websocket();
    h.conn.marks.insert(Marks::AWAITING_REPLY);
    let frame = client_frame(ws::OPCODE_TEXT, b"{\"op\":\"ping\"}");
    assert_eq!(h.feed(&frame), vec![], "kept: the connection waits for a reply");
    assert_eq!(h.timer_at(9_000), Timer::Nothing);
    assert!(h.socket.sent.is_empty(), "no close");
    assert!(h.socket.counts.is_empty());
    h.conn.marks.remove(Marks::AWAITING_REPLY);
    h.now_ms = 10_000;
    assert_eq!(h.feed(b""), vec![Seen::Message(b"{\"op\":\"ping\"}".to_vec())]);
}

#[test]
fn text_messages_reach_the_application_whole() {
    let mut h = Harness::websocket();
    let frame = client_frame(ws::OPCODE_TEXT, b"{\"op\":\"ping\"}");
    let (first, second) = frame.split_at(5);
    assert_eq!(h.feed(first), vec![]);
    assert_eq!(h.feed(second), vec![Seen::Message(b"{\"op\":\"ping\"}".to_vec())]);
    // Fragments are assembled.
    let mut fragments = ws::encode_client_frame(ws::OPCODE_TEXT, b"ab", [9, 9, 9, 9]);
    fragments.extend(ws::encode_client_frame(0x80, b"cd", [7, 7, 7, 7]));
    assert_eq!(h.feed(&fragments), vec![Seen::Message(b"abcd".to_vec())]);
    assert!(h.conn.is_at_rest());
}

#[test]
fn pings_are_answered_with_pongs_but_not_while_closing() {
    let mut h = Harness::websocket();
    h.feed(&client_frame(ws::OPCODE_PING, b"hi"));
    assert_eq!(server_frames(&h.take_sent()), vec![(ws::OPCODE_PONG, b"hi".to_vec())]);
    let _ = h.with(|conn, socket, cx| conn.close_websocket(1000, "bye", socket, cx));
    h.take_sent();
    h.feed(&client_frame(ws::OPCODE_PING, b"hi"));
    assert!(h.socket.sent.is_empty());
}

#[test]
fn an_idle_websocket_is_pinged_then_closed_without_a_pong() {
    let mut h = Harness::websocket();
    assert_eq!(h.timer_at(9_999), Timer::Nothing);
    assert!(h.socket.sent.is_empty());
    assert_eq!(h.timer_at(10_000), Timer::Nothing);
    assert_eq!(server_frames(&h.take_sent()), vec![(ws::OPCODE_PING, vec![])]);
    assert_eq!(h.timer_at(12_000), Timer::Nothing, "no second ping right away");
    assert!(h.socket.sent.is_empty());
    assert_eq!(h.timer_at(15_000), Timer::Nothing);
    let frames = server_frames(&h.take_sent());
    assert_eq!(frames.len(), 1);
    assert_eq!((frames[0].0, close_code(&frames[0].1)), (ws::OPCODE_CLOSE, ws::close::PING_TIMEOUT));
    // The peer never answers the close either.
    assert_eq!(h.timer_at(16_999), Timer::Nothing);
    assert_eq!(h.timer_at(17_000), Timer::Close);
}

#[test]
fn a_pong_keeps_the_websocket_alive_and_active_clients_are_not_pinged() {
    let mut h = Harness::websocket();
    assert_eq!(h.timer_at(10_000), Timer::Nothing);
    h.take_sent();
    h.now_ms = 10_050;
    h.feed(&client_frame(ws::OPCODE_PONG, b""));
    assert_eq!(h.timer_at(15_000), Timer::Nothing);
    assert!(h.socket.sent.is_empty(), "neither a close nor a second ping");
    assert_eq!(h.timer_at(20_050), Timer::Nothing);
    assert_eq!(server_frames(&h.take_sent()), vec![(ws::OPCODE_PING, vec![])]);

    let mut busy = Harness::websocket();
    for now_ms in (1_000..60_000).step_by(1_000) {
        busy.now_ms = now_ms;
        busy.feed(&client_frame(ws::OPCODE_TEXT, b"{}"));
        assert_eq!(busy.timer_at(now_ms), Timer::Nothing);
    }
    assert!(busy.socket.sent.is_empty());
}

#[test]
fn the_peer_closes_we_echo_its_code_and_close_first() {
    let mut h = Harness::websocket();
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"done");
    assert_eq!(h.feed(&client_frame(ws::OPCODE_CLOSE, &payload)), vec![Seen::Close]);
    let frames = server_frames(&h.take_sent());
    assert_eq!((frames[0].0, close_code(&frames[0].1)), (ws::OPCODE_CLOSE, 4321));
}

#[test]
fn we_close_and_the_peer_answers() {
    let mut h = Harness::websocket();
    assert_eq!(h.with(|conn, socket, cx| conn.close_websocket(4003, "bye", socket, cx)), Verdict::Keep);
    assert_eq!(h.conn.phase(), Phase::Closing);
    let frames = server_frames(&h.take_sent());
    assert_eq!((frames[0].0, close_code(&frames[0].1)), (ws::OPCODE_CLOSE, 4003));
    // Messages after our close are dropped, not handed up.
    assert_eq!(h.feed(&client_frame(ws::OPCODE_TEXT, b"late")), vec![]);
    assert_eq!(h.feed(&client_frame(ws::OPCODE_CLOSE, &4003u16.to_be_bytes())), vec![Seen::Close]);
    assert!(h.socket.sent.is_empty(), "no second close frame");
}

#[test]
fn protocol_violations_close_with_their_code_then_linger() {
    // An unmasked client frame (RFC 6455 §5.1).
    let mut h = Harness::websocket();
    assert_eq!(h.feed(&[0x81, 0x02, b'h', b'i']), vec![]);
    let frames = server_frames(&h.take_sent());
    assert_eq!(close_code(&frames[0].1), ws::close::PROTOCOL_ERROR);
    assert_eq!(h.conn.phase(), Phase::Lingering);
    assert!(h.socket.shut_write);
    assert_eq!(h.socket.counts, vec![Count::ProtocolError]);
    assert_eq!(h.feed(&client_frame(ws::OPCODE_TEXT, b"ignored")), vec![]);

    // A message over client_message_bytes_max.
    let mut h = Harness::websocket();
    h.limits.client_message_bytes_max = 8;
    h.feed(&client_frame(ws::OPCODE_TEXT, b"0123456789"));
    assert_eq!(close_code(&server_frames(&h.take_sent())[0].1), ws::close::MESSAGE_TOO_BIG);

    // Binary messages: refused with 1003, the connection closes normally.
    let mut h = Harness::websocket();
    assert_eq!(h.feed(&client_frame(ws::OPCODE_BINARY, b"\x00")), vec![]);
    assert_eq!(close_code(&server_frames(&h.take_sent())[0].1), ws::close::UNSUPPORTED_DATA);
    assert_eq!(h.conn.phase(), Phase::Closing);
}

#[test]
fn the_echo_endpoint_echoes() {
    let mut h = Harness::new();
    h.with(|conn, _, cx| {
        conn.upgraded(true, cx);
    });
    assert_eq!(h.feed(&client_frame(ws::OPCODE_TEXT, b"same")), vec![]);
    assert_eq!(server_frames(&h.take_sent()), vec![(ws::OPCODE_TEXT, b"same".to_vec())]);
}

// -- Output and backpressure ----------------------------------------------

#[test]
fn output_waits_in_order_while_the_socket_is_full() {
    let mut h = Harness::websocket();
    h.socket.room = 3;
    let (a, b) = (publication("a"), publication("b"));
    assert_eq!(h.with(|conn, socket, cx| conn.send_publications(&[a.clone(), b.clone()], socket, cx)), Verdict::Keep);
    assert!(h.conn.has_output());
    assert_eq!(h.socket.sent.len(), 3);
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Keep, "still full");
    h.socket.room = usize::MAX;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Keep);
    assert!(h.conn.is_at_rest(), "the outbox goes once empty");
    let expected: Vec<u8> = [a.ws_frame(), b.ws_frame()].concat();
    assert_eq!(h.take_sent(), expected);
}

#[test]
fn a_slow_consumer_gets_1008_after_its_partial_frame() {
    let mut h = Harness::websocket();
    let first = publication("first");
    h.socket.room = 4;
    assert_eq!(
        h.with(|conn, socket, cx| conn.send(OutItem::Publication(first.clone(), Wire::WebSocket), socket, cx)),
        Verdict::Keep
    );
    // Fill the outbox past outbox_messages_max (8).
    for n in 0..8 {
        let item = OutItem::Publication(publication(&n.to_string()), Wire::WebSocket);
        assert_eq!(h.with(|conn, socket, cx| conn.send(item, socket, cx)), Verdict::Keep);
    }
    assert_eq!(h.socket.counts, vec![Count::SlowConsumer]);
    assert!(h.conn.is_ending());
    h.socket.room = usize::MAX;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Close);
    // The partly written frame is finished, the queue dropped, then 1008.
    let frames = server_frames(&h.socket.sent);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0].1, first.ws_frame()[2..].to_vec());
    assert_eq!(close_code(&frames[1].1), ws::close::SLOW_CONSUMER);
}

#[test]
fn a_slow_consumer_that_never_reads_is_dropped_at_the_close_deadline() {
    let mut h = Harness::websocket();
    h.socket.room = 0;
    h.now_ms = 100;
    for n in 0..9 {
        let item = OutItem::Publication(publication(&n.to_string()), Wire::WebSocket);
        let _ = h.with(|conn, socket, cx| conn.send(item, socket, cx));
    }
    assert!(h.conn.is_ending());
    assert_eq!(h.timer_at(2_099), Timer::Nothing);
    assert_eq!(h.timer_at(2_100), Timer::Close);
}

#[test]
fn output_a_transport_holds_delays_the_end_until_it_is_out() {
    let mut h = Harness::websocket();
    // TLS sealed a close frame's records but the socket took none of them.
    h.socket.held = 30;
    h.socket.room = 0;
    assert_eq!(h.with(|conn, socket, cx| conn.end_after_flush(socket, cx)), Verdict::Keep);
    assert!(h.conn.is_ending());
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Keep, "still held");
    h.socket.room = 10;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Keep, "partly out");
    h.socket.room = usize::MAX;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Close, "all out: now it ends");
}

#[test]
fn a_broken_socket_closes_at_once() {
    let mut h = Harness::websocket();
    h.socket.broken = true;
    assert_eq!(h.with(|conn, socket, cx| conn.send_owned(b"x".to_vec(), socket, cx)), Verdict::Close);
}

#[test]
fn timers_hold_when_the_32_bit_clock_wraps() {
    // Connections keep their times modulo 2^32 ms: a shard up for 49.7
    // days wraps, and nothing may look silent, due or expired because of it.
    let start_ms = (1u64 << 32) - 4_000;
    let mut h = Harness::new();
    h.now_ms = start_ms;
    h.with(|conn, _, cx| conn.upgraded(false, cx));
    assert_eq!(h.timer_at(start_ms + 9_999), Timer::Nothing);
    assert!(h.socket.sent.is_empty(), "the wrap is not silence");
    assert_eq!(h.timer_at(start_ms + 10_000), Timer::Nothing);
    assert_eq!(server_frames(&h.take_sent()), vec![(ws::OPCODE_PING, vec![])]);
    assert_eq!(h.timer_at(start_ms + 15_000), Timer::Nothing);
    let frames = server_frames(&h.take_sent());
    assert_eq!((frames[0].0, close_code(&frames[0].1)), (ws::OPCODE_CLOSE, ws::close::PING_TIMEOUT));
    assert_eq!(h.timer_at(start_ms + 16_999), Timer::Nothing);
    assert_eq!(h.timer_at(start_ms + 17_000), Timer::Close);

    // A client that always talks before the ping interval is never pinged;
    // 2^31 ms later its ping stamp must not read as the future: once it goes
    // quiet, it gets a ping, not a "no pong" close.
    let mut chatty = Harness::websocket();
    let mut now_ms = 0;
    while now_ms < (1u64 << 31) + 60_000 {
        now_ms += 60_000;
        chatty.now_ms = now_ms - 5_000;
        chatty.feed(&client_frame(ws::OPCODE_TEXT, b"{}"));
        assert_eq!(chatty.timer_at(now_ms), Timer::Nothing);
    }
    assert!(chatty.socket.sent.is_empty(), "a chatty client is not pinged");
    assert_eq!(chatty.timer_at(now_ms + 5_000), Timer::Nothing);
    assert_eq!(server_frames(&chatty.take_sent()), vec![(ws::OPCODE_PING, vec![])], "quiet: pinged");

    // A served session never expires, however long it is served.
    let mut h = session_harness();
    h.conn.session_served();
    let later_ms = (1u64 << 33) + (1 << 31) + 7;
    assert_eq!(h.timer_at(1 << 32), Timer::Nothing);
    assert_eq!(h.timer_at(later_ms), Timer::Nothing);
    h.with(|conn, _, cx| conn.session_unserved(cx));
    assert_eq!(h.timer_at(later_ms + 2_999), Timer::Nothing);
    assert_eq!(h.timer_at(later_ms + 3_000), Timer::Close);
}

// -- HTTP sessions --------------------------------------------------------

fn session_harness() -> Harness {
    let mut h = Harness::new();
    let cx = Context { now_ms: 0, limits: &h.limits, timeouts: &h.timeouts };
    h.conn = Connection::session(2, HttpSession::new("s0.1.2.x".into(), SessionKind::Sse), &cx);
    h
}

#[test]
fn a_session_expires_after_its_grace_unless_served() {
    let mut h = session_harness();
    assert_eq!(h.timer_at(2_999), Timer::Nothing);
    assert_eq!(h.timer_at(3_000), Timer::Close);

    let mut h = session_harness();
    h.conn.session_served();
    assert_eq!(h.timer_at(1_000_000), Timer::Nothing, "served: no expiry");
    h.with(|conn, _, cx| {
        conn.session_unserved(cx);
    });
    assert_eq!(h.timer_at(1_002_999), Timer::Nothing, "the grace restarts from the detach");
    assert_eq!(h.timer_at(1_003_000), Timer::Close);
}

#[test]
fn a_poll_times_out_and_then_reads_its_next_request() {
    let mut h = Harness::new();
    h.now_ms = 200;
    h.with(|conn, _, cx| {
        conn.serve_poll(http::HttpRole::Stream { session: 0, generation: 0 }, cx);
    });
    // Pipelined input waits while the poll is held.
    assert_eq!(h.feed(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"), vec![]);
    assert_eq!(h.timer_at(1_199), Timer::Nothing);
    assert_eq!(h.timer_at(1_200), Timer::PollTimeout);
    h.with(|conn, _, cx| {
        conn.poll_answered(cx);
    });
    assert_eq!(h.conn.phase(), Phase::Http);
    assert_eq!(h.feed(b""), vec![Seen::Request("/next".into())]);
}

#[test]
fn an_sse_stream_sends_heartbeats() {
    let mut h = Harness::new();
    h.with(|conn, _, cx| {
        conn.serve_stream(http::HttpRole::Stream { session: 0, generation: 0 }, cx);
    });
    assert_eq!(h.timer_at(499), Timer::Nothing);
    assert_eq!(h.timer_at(500), Timer::Nothing);
    assert_eq!(h.take_sent(), SSE_HEARTBEAT);
    assert_eq!(h.timer_at(700), Timer::Nothing);
    assert!(h.socket.sent.is_empty());
    // What the client sends on a stream is discarded.
    assert_eq!(h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), vec![]);
}

#[test]
fn shutdown_says_going_away() {
    let mut h = Harness::websocket();
    h.socket.room = 0;
    assert_eq!(h.with(|conn, socket, cx| conn.shutdown(socket, cx)), Verdict::Keep);
    h.socket.room = usize::MAX;
    assert_eq!(h.with(|conn, socket, _| conn.flush(socket)), Verdict::Close);
    assert_eq!(close_code(&server_frames(&h.socket.sent)[0].1), ws::close::GOING_AWAY);
    let mut idle = Harness::new();
    assert_eq!(idle.with(|conn, socket, cx| conn.shutdown(socket, cx)), Verdict::Close);
}

#[test]
fn a_connection_stays_small() {
    // Invariant 1: a connection at rest is this struct plus a slab slot
    // (three 4-byte clock stamps, up to two subscriptions inline).
    assert!(std::mem::size_of::<Connection>() <= 80, "{}", std::mem::size_of::<Connection>());
    // With the socket, the client's rates, its address key and the pointer
    // to a TLS session (shard::Conn).
    assert!(std::mem::size_of::<crate::shard::Conn>() <= 112, "{}", std::mem::size_of::<crate::shard::Conn>());
}
