//! SSE and long-polling with plain HTTP clients: sessions, resume,
//! commands over POST, timeouts, bad session ids, oversized requests, CORS.
//! Many requests open fresh connections, so they land on either shard and
//! exercise the hand-over of a connection to its session's shard.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{http, Server, SseStream};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789";

fn session_of(hello: &Value) -> String {
    assert_eq!(hello["resumed"], false, "{hello}");
    hello["session"].as_str().expect("hello names the session").to_string()
}

fn seq_of(id: &str) -> u64 {
    id.rsplit_once(':').and_then(|(_, seq)| seq.parse().ok()).expect("id is SESSION:SEQ")
}

/// Polls until `count` messages arrived (each poll on a fresh connection).
fn poll_messages(server: &Server, session: &str, cursor: &mut u64, count: usize) -> Vec<Value> {
    let mut messages = Vec::new();
    while messages.len() < count {
        let response = http(server, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"");
        assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
        let batch = response.json();
        assert_eq!(batch["session"], session);
        *cursor = batch["cursor"].as_u64().unwrap();
        messages.extend(batch["messages"].as_array().unwrap().iter().cloned());
    }
    messages
}

#[test]
fn sse_streams_with_resume_ids_heartbeats_and_no_buffering_headers() {
    let server = Server::start(2, "[timeouts]\nsse_heartbeat_ms = 200\nsweep_interval_ms = 50\n");
    let mut stream = SseStream::open(&server, "/sse?channel=news&channel=sport", &[]);
    assert!(stream.head.starts_with("HTTP/1.1 200"), "{}", stream.head);
    for header in
        ["Content-Type: text/event-stream", "Cache-Control: no-cache, no-store, no-transform", "X-Accel-Buffering: no"]
    {
        assert!(stream.head.contains(header), "missing {header}: {}", stream.head);
    }
    let (id, hello) = stream.next_data();
    let session = session_of(&hello);
    assert_eq!(id, format!("{session}:1"));
    let replies: Vec<Value> = (0..2).map(|_| stream.next_data().1).collect();
    let mut subscribed: Vec<&str> = replies.iter().map(|r| r["channel"].as_str().unwrap()).collect();
    subscribed.sort();
    assert_eq!(subscribed, vec!["news", "sport"]);
    server.publish("news", "update", r#"{"n":1}"#);
    let (id, push) = stream.next_data();
    assert_eq!(push, json!({"channel": "news", "event": "update", "offset": 1, "data": {"n": 1}}));
    assert_eq!(seq_of(&id), 4);
    // An idle stream gets comment lines.
    stream.set_timeout(Duration::from_secs(3));
    let event = stream.next().unwrap();
    assert!(event.comment, "{event:?}");
}

#[test]
fn sse_resumes_with_last_event_id_without_gaps_or_duplicates() {
    let server = Server::start(2, "");
    let mut stream = SseStream::open(&server, "/sse?channel=feed", &[]);
    let session = session_of(&stream.next_data().1);
    stream.next_data(); // the subscribe reply
    for n in 1..=3 {
        server.publish("feed", "e", &n.to_string());
    }
    let mut last_id = String::new();
    for offset in 1..=3 {
        let (id, push) = stream.next_data();
        assert_eq!(push["offset"], offset);
        last_id = id;
    }
    drop(stream);
    // Published while the client is away.
    for n in 4..=6 {
        server.publish("feed", "e", &n.to_string());
    }
    // EventSource reconnects to the same URL with Last-Event-ID.
    let mut resumed = SseStream::open(&server, "/sse?channel=feed", &[("Last-Event-ID", &last_id)]);
    assert!(resumed.head.starts_with("HTTP/1.1 200"));
    for offset in 4..=6 {
        let (id, push) = resumed.next_data();
        assert_eq!(push["offset"], offset, "exactly the missed publications, in order");
        assert!(id.starts_with(&session), "same session");
    }
    server.publish("feed", "e", "7");
    assert_eq!(resumed.next_data().1["offset"], 7);

    // A session id the server does not know: a new session says so.
    let mut fresh = SseStream::open(
        &server,
        "/sse?channel=feed",
        &[("Last-Event-ID", "s0.1.1.00000000000000000000000000000000:5")],
    );
    let hello = fresh.next_data().1;
    assert_eq!((hello["resumed"].clone(), hello["reason"].clone()), (json!(false), json!("session_expired")));
}

#[test]
fn sessions_expire_after_their_grace_period() {
    let server = Server::start(2, "[timeouts]\nsession_grace_ms = 300\nsweep_interval_ms = 50\n");
    let created = http(&server, "GET", "/poll?channel=news", &[], b"").json();
    let session = created["session"].as_str().unwrap().to_string();
    server.wait_stats("session exists", |s| s["shards"].as_array().unwrap().iter().any(|x| x["http_sessions"] == 1));
    std::thread::sleep(Duration::from_millis(700));
    let response = http(&server, "GET", &format!("/poll?session={session}&cursor=1"), &[], b"");
    assert_eq!(response.status, 410);
    assert_eq!(response.json()["error"]["code"], "session_expired");
    // Its subscription went with it.
    assert_eq!(server.publish("news", "e", "1").subscribers, 0);
}

#[test]
fn long_poll_waits_batches_and_resends_until_acknowledged() {
    let server = Server::start(2, "[timeouts]\npoll_timeout_ms = 400\n");
    let created = http(&server, "GET", "/poll?channel=news", &[], b"");
    assert_eq!(created.status, 200);
    assert!(created.header("Cache-Control").unwrap().contains("no-store"));
    let created = created.json();
    let session = session_of(&created["messages"][0]);
    let mut cursor = created["cursor"].as_u64().unwrap();
    let reply = poll_messages(&server, &session, &mut cursor, 1);
    assert_eq!(reply[0]["channel"], "news");

    // A poll with nothing new waits, then answers empty.
    let started = std::time::Instant::now();
    let empty = http(&server, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"").json();
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["cursor"], cursor);
    assert!(started.elapsed() >= Duration::from_millis(350));

    // A waiting poll answers as soon as a publication arrives.
    let waiting = {
        let port = server.port;
        let admin = server.admin.clone();
        let session = session.clone();
        std::thread::spawn(move || {
            let view = Server::view(port, admin);
            http(&view, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"").json()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    server.publish("news", "e", "1");
    let batch = waiting.join().unwrap();
    assert_eq!(batch["messages"][0]["offset"], 1);

    // Several at once come as one batch; an old cursor gets them again.
    for n in 2..=4 {
        server.publish("news", "e", &n.to_string());
    }
    // Poll with the same cursor (acknowledging nothing new) until all three
    // reached the session, then once more: the same three come back.
    let start = batch["cursor"].as_u64().unwrap();
    let poll_from_start = || http(&server, "GET", &format!("/poll?session={session}&cursor={start}"), &[], b"").json();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let first = loop {
        let polled = poll_from_start();
        if polled["messages"].as_array().unwrap().len() == 3 || std::time::Instant::now() > deadline {
            break polled;
        }
    };
    assert_eq!(first["messages"].as_array().unwrap().len(), 3);
    assert_eq!(poll_from_start(), first, "nothing is lost before the client acknowledges it");
}

#[test]
fn commands_over_post_and_errors_for_bad_sessions_and_bodies() {
    let server = Server::start(2, "[limits]\nhttp_body_bytes_max = 4096\nsession_commands_pending_max = 8\n");
    let created = http(&server, "GET", "/poll", &[], b"").json();
    let session = session_of(&created["messages"][0]);
    let mut cursor = created["cursor"].as_u64().unwrap();

    let response = http(&server, "POST", &format!("/cmd?session={session}"), &[("Content-Type", "application/json")], br#"[{"op":"subscribe","channel":"web_chat","id":1},{"op":"publish","channel":"web_chat","event":"msg","data":"hi","id":2}]"#);
    assert_eq!(response.status, 202);
    assert_eq!(response.json(), json!({"ok": true, "queued": 2}));
    let messages = poll_messages(&server, &session, &mut cursor, 3);
    assert_eq!(messages[0]["id"], 1);
    let (reply, push): (Vec<&Value>, Vec<&Value>) = messages[1..].iter().partition(|m| m.get("id").is_some());
    assert_eq!(reply[0], &json!({"id": 2, "ok": true, "offset": 1}));
    assert_eq!(push[0]["data"], "hi");

    let bad = |target: String, body: &[u8]| http(&server, "POST", &target, &[], body);
    let response = bad(format!("/cmd?session={session}"), b"{not json");
    assert_eq!(response.status, 400);
    let response = bad(format!("/cmd?session={session}"), &[b' '; 5000]);
    assert_eq!(response.status, 413);
    let many: Vec<Value> = (0..9).map(|n| json!({"op": "ping", "id": n})).collect();
    let response = bad(format!("/cmd?session={session}"), serde_json::to_string(&many).unwrap().as_bytes());
    assert_eq!(response.status, 413, "a batch larger than the limit can never be queued");
    let response = bad("/cmd?session=s0.1.1.00000000000000000000000000000000".into(), b"{}");
    assert_eq!(response.status, 410);
    assert_eq!(response.json()["error"]["code"], "session_expired");
    let response = bad("/cmd?session=garbage".into(), b"{}");
    assert_eq!(response.status, 410);
    let response = bad("/cmd".into(), b"{}");
    assert_eq!(response.status, 404);
    let response = http(&server, "GET", "/cmd", &[], b"");
    assert_eq!(response.status, 405);
    let response = http(&server, "GET", &format!("/poll?session={session}&cursor=abc"), &[], b"");
    assert_eq!(response.status, 400);
    // Oversized request heads are refused like any other.
    let response = http(&server, "GET", &format!("/sse?channel={}", "x".repeat(10_000)), &[], b"");
    assert_eq!(response.status, 431);

    // disconnect ends the session at once.
    let response = bad(format!("/cmd?session={session}"), br#"{"op":"disconnect"}"#);
    assert_eq!(response.status, 202);
    let response = http(&server, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"");
    let body = response.json();
    assert!(
        response.status == 410 || body["messages"].as_array().unwrap().iter().any(|m| m.get("close").is_some()),
        "{body}"
    );
}

#[test]
fn one_publication_reaches_websocket_sse_and_long_poll_subscribers() {
    let server = Server::start(2, "");
    let mut websocket = server.client();
    websocket.subscribe("mixed");
    let mut sse = SseStream::open(&server, "/sse?channel=mixed", &[]);
    sse.next_data();
    sse.next_data();
    let created = http(&server, "GET", "/poll?channel=mixed", &[], b"").json();
    let session = created["session"].as_str().unwrap().to_string();
    let mut cursor = created["cursor"].as_u64().unwrap();
    poll_messages(&server, &session, &mut cursor, 1);

    let published = server.publish("mixed", "e", r#"{"to":"everyone"}"#);
    assert_eq!(published.subscribers, 3);
    let expected = json!({"channel": "mixed", "event": "e", "offset": 1, "data": {"to": "everyone"}});
    assert_eq!(websocket.recv(), expected);
    assert_eq!(sse.next_data().1, expected);
    assert_eq!(poll_messages(&server, &session, &mut cursor, 1)[0], expected);
}

#[test]
fn tokens_users_and_the_inbox_work_over_http_sessions() {
    let server = Server::start(2, &format!("token_secret = \"{SECRET}\"\n"));
    let forged = kometa_protocol::token::sign("wrong-secret-wrong", &json!({"sub": "x"}));
    let response = http(&server, "GET", &format!("/sse?token={forged}"), &[], b"");
    assert_eq!(response.status, 401);
    assert_eq!(response.json()["error"]["code"], "unauthorized");

    let token = kometa_protocol::token::sign(SECRET, &json!({"sub": "olga"}));
    let mut stream = SseStream::open(&server, &format!("/sse?token={token}&channel=private_x"), &[]);
    let hello = stream.next_data().1;
    assert_eq!(hello["user"], "olga");
    // Private channel without a grant: the subscribe is refused on the stream.
    assert_eq!(stream.next_data().1["error"]["code"], "forbidden");
    let reply = server.admin().send_user(&["olga"], "note", b"1").unwrap();
    assert_eq!(reply["results"][0]["delivered"], 1);
    let seq = reply["results"][0]["inbox"].clone();
    assert_eq!(stream.next_data().1, json!({"inbox": seq, "event": "note", "data": 1}));
}

#[test]
fn a_session_whose_buffer_overflowed_is_reported_lost() {
    let server = Server::start(2, "[limits]\nsession_buffer_messages_max = 4\n");
    let created = http(&server, "GET", "/poll?channel=busy", &[], b"").json();
    let session = created["session"].as_str().unwrap().to_string();
    let mut cursor = created["cursor"].as_u64().unwrap();
    poll_messages(&server, &session, &mut cursor, 1);
    for n in 0..10 {
        server.publish("busy", "e", &n.to_string());
    }
    // Deliveries reach the session asynchronously; polling with the same
    // cursor acknowledges nothing more, so the loss shows up once they land.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let response = loop {
        let response = http(&server, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"");
        if response.status != 200 || std::time::Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(response.status, 410);
    assert_eq!(response.json()["error"]["code"], "session_lost");
}

#[test]
fn cors_headers_and_preflight() {
    let open = Server::start(2, "");
    let response = http(&open, "GET", "/poll", &[("Origin", "https://app.example")], b"");
    assert_eq!(response.header("Access-Control-Allow-Origin").as_deref(), Some("*"));
    let response = http(
        &open,
        "OPTIONS",
        "/cmd",
        &[("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")],
        b"",
    );
    assert_eq!(response.status, 204);
    assert!(response.header("Access-Control-Allow-Methods").unwrap().contains("POST"));
    assert!(response.header("Access-Control-Allow-Headers").unwrap().contains("Content-Type"));

    let strict = Server::start(2, "allowed_origins = [\"https://app.example\"]\n");
    let response = http(&strict, "GET", "/poll", &[("Origin", "https://app.example")], b"");
    assert_eq!(response.header("Access-Control-Allow-Origin").as_deref(), Some("https://app.example"));
    let response = http(&strict, "GET", "/poll", &[("Origin", "https://evil.example")], b"");
    assert_eq!(response.status, 403);
}

#[test]
fn the_client_library_and_demo_are_served() {
    let server = Server::start(1, "");
    let js = http(&server, "GET", "/kometa.js", &[], b"");
    assert_eq!(js.status, 200);
    assert!(js.header("Content-Type").unwrap().starts_with("text/javascript"));
    assert!(!js.body.is_empty());
    let demo = http(&server, "GET", "/demo", &[], b"");
    assert_eq!(demo.status, 200);
    assert!(demo.header("Content-Type").unwrap().starts_with("text/html"));
    assert_eq!(http(&server, "GET", "/kometa.d.ts", &[], b"").status, 200);
    assert_eq!(http(&server, "GET", "/kometa.mjs", &[], b"").status, 200);
    assert_eq!(http(&server, "POST", "/kometa.js", &[], b"").status, 405);
}

#[test]
fn many_sessions_across_shards_keep_their_subscriptions() {
    // Fresh connections land on either shard; requests for a session on the
    // other one are handed over. Every session must still get its message.
    let server = Server::start(2, "");
    // At least 12, and more until both shards have some (the kernel's hash
    // may put a dozen on one; bounded).
    const SESSIONS_MAX: usize = 64;
    let mut sessions: Vec<(String, u64)> = Vec::new();
    let shard_of = |session: &str| session.split('.').next().unwrap().to_string();
    while sessions.len() < 12 || sessions.iter().all(|(s, _)| shard_of(s) == shard_of(&sessions[0].0)) {
        assert!(sessions.len() < SESSIONS_MAX, "sessions never reached both shards: {sessions:?}");
        let created = http(&server, "GET", "/poll?channel=spread", &[], b"").json();
        sessions.push((created["session"].as_str().unwrap().to_string(), created["cursor"].as_u64().unwrap()));
    }
    let mut cursors = Vec::new();
    for (session, cursor) in &sessions {
        let mut cursor = *cursor;
        poll_messages(&server, session, &mut cursor, 1);
        cursors.push(cursor);
    }
    assert_eq!(server.publish("spread", "e", "1").subscribers, sessions.len() as u64);
    for ((session, _), cursor) in sessions.iter().zip(cursors.iter_mut()) {
        for _ in 0..3 {
            // Several polls per session: each on a fresh connection.
            let messages = poll_messages(&server, session, cursor, 1);
            assert_eq!(messages[0]["offset"], 1);
            *cursor -= 1;
        }
    }
}

/// A client that abandons its waiting poll frees the server's socket at once
/// (not at the poll timeout), and its session loses nothing: a later poll
/// gets what was published meanwhile.
#[test]
fn an_abandoned_poll_frees_its_socket_and_the_session_keeps_its_messages() {
    let server = Server::start(1, "[timeouts]\npoll_timeout_ms = 60000\n");
    let created = http(&server, "GET", "/poll?channel=news", &[], b"").json();
    let session = session_of(&created["messages"][0]);
    let mut cursor = created["cursor"].as_u64().unwrap();
    poll_messages(&server, &session, &mut cursor, 1);
    // Whether the server still has its end of the connection from
    // `client_port` open: a row of /proc/net/tcp with a socket inode (0 once
    // the server has closed it, or before it accepted it).
    let server_holds = |client_port: u16| {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let port = |address: &str| address.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 9
                && port(fields[1]) == Some(server.port)
                && port(fields[2]) == Some(client_port)
                && fields[9] != "0"
        })
    };

    let mut waiting = server.tcp();
    let client_port = waiting.local_addr().unwrap().port();
    let request = format!("GET /poll?session={session}&cursor={cursor} HTTP/1.1\r\nHost: x\r\n\r\n");
    waiting.write_all(request.as_bytes()).unwrap();
    // It is waiting (not answered), so the test is about a waiting poll.
    waiting.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let waited = std::io::Read::read(&mut waiting, &mut [0u8; 64]);
    assert!(
        matches!(&waited, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the poll should be waiting: {waited:?}"
    );
    assert!(server_holds(client_port), "the server holds the waiting poll's socket");
    drop(waiting);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server_holds(client_port) {
        assert!(std::time::Instant::now() < deadline, "the abandoned poll still holds its socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    server.publish("news", "e", r#""after""#);
    let messages = poll_messages(&server, &session, &mut cursor, 1);
    assert_eq!(messages[0]["data"], "after");
}

/// The browser client falls back from SSE to long-polling with the same
/// session: a poll on a session created by SSE gets ordinary poll answers
/// (and a stream on a poll session gets ordinary events).
#[test]
fn a_session_can_switch_between_sse_and_long_polling() {
    let server = Server::start(1, "");
    let mut stream = SseStream::open(&server, "/sse?channel=news", &[]);
    let session = session_of(&stream.next_data().1);
    let (id, _subscribed) = stream.next_data();
    let mut cursor = seq_of(&id);
    drop(stream);

    // A waiting poll on the SSE session, answered by a publication.
    let waiting = {
        let (port, admin, session) = (server.port, server.admin.clone(), session.clone());
        std::thread::spawn(move || {
            let view = Server::view(port, admin);
            http(&view, "GET", &format!("/poll?session={session}&cursor={cursor}"), &[], b"")
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    server.publish("news", "e", "1");
    let answer = waiting.join().unwrap();
    assert_eq!(answer.status, 200);
    let batch = answer.json();
    assert_eq!(batch["messages"][0]["data"], 1, "{batch}");
    cursor = batch["cursor"].as_u64().unwrap();

    // And back to SSE: the stream resumes after the cursor.
    let mut stream = SseStream::open(&server, &format!("/sse?last_event_id={session}:{cursor}"), &[]);
    server.publish("news", "e", "2");
    let (_, push) = std::iter::repeat_with(|| stream.next_data()).find(|(_, m)| m.get("offset").is_some()).unwrap();
    assert_eq!(push["data"], 2);
}
