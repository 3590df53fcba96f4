//! Client protocol additions over real sockets: presence pages, pushed
//! presence counts, revoked tokens on `connect`, and requests without an
//! `Origin` under an allow-list.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Client, Server};
use kometa_protocol::token::sign;
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789";

fn now_s() -> u64 {
    kometa::util::unix_time_ms() / 1000
}

fn token(user: &str) -> String {
    sign(SECRET, &json!({"sub": user, "iat": now_s(), "exp": now_s() + 3600}))
}

fn user_client(server: &Server, user: &str) -> Client {
    let mut client = server.client_at(&format!("/ws?token={}", token(user)));
    assert_eq!(client.request(json!({"op": "ping", "id": 0}))["ok"], true, "registered");
    client
}

#[test]
fn client_presence_pages_like_the_admin_one() {
    let server = Server::start(2, &format!("token_secret = \"{SECRET}\"\n"));
    let mut members: Vec<Client> = (0..5).map(|n| user_client(&server, &format!("u{n}"))).collect();
    for member in &mut members {
        member.subscribe("track_room");
    }
    let mut asker = server.client();
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    for page in 0.. {
        assert!(page < 5, "paging does not end");
        let mut request = json!({"op": "presence", "channel": "track_room", "limit": 2, "id": page});
        if !cursor.is_null() {
            request["cursor"] = cursor.clone();
        }
        let reply = asker.request(request);
        assert_eq!(reply["ok"], true, "{reply}");
        let listed = reply["members"].as_array().unwrap();
        assert!(listed.len() <= 2, "{reply}");
        seen.extend(listed.iter().map(|m| m["user"].as_str().unwrap().to_owned()));
        cursor = reply["next"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen, vec!["u0", "u1", "u2", "u3", "u4"]);
    // No limit: everything at once (up to limits.query_items_max).
    let reply = asker.request(json!({"op": "presence", "channel": "track_room", "id": 9}));
    assert_eq!(reply["members"].as_array().unwrap().len(), 5);
    assert_eq!(reply["next"], Value::Null);
}

/// The next `presence_counts` push, skipping other pushes (join/leave).
fn next_counts(client: &mut Client) -> Value {
    loop {
        let message = client.recv();
        if message["event"] == "presence_counts" {
            assert_eq!(message.get("offset"), None, "not a publication: {message}");
            return message["data"].clone();
        }
    }
}

#[test]
fn presence_counts_are_pushed_when_they_change_throttled_and_only_when_asked() {
    let server = Server::start(
        2,
        &format!(
            "token_secret = \"{SECRET}\"\n[timeouts]\npresence_counts_interval_ms = 300\nsweep_interval_ms = 50\n"
        ),
    );
    let mut watcher = server.client();
    let reply = watcher.request(json!({"op": "subscribe", "channel": "track_lobby", "presence_counts": true, "id": 1}));
    assert_eq!(reply["ok"], true, "{reply}");
    // Its own arrival changed the counts: the first push follows the reply.
    assert_eq!(next_counts(&mut watcher), json!({"users": 0, "connections": 1, "anonymous": 1}));
    let mut plain = server.client();
    plain.subscribe("track_lobby");

    // A burst of arrivals: one push now or at the end of the interval,
    // carrying the counts of then, not one per arrival.
    let burst = std::time::Instant::now();
    let mut users: Vec<Client> = (0..6).map(|n| user_client(&server, &format!("p{n}"))).collect();
    for user in &mut users {
        user.subscribe("track_lobby");
    }
    let burst_ms = burst.elapsed().as_millis() as usize;
    let mut pushes = Vec::new();
    watcher.set_timeout(Duration::from_millis(1_500));
    while let Ok(tungstenite::Message::Text(text)) = watcher.socket.read() {
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["event"] == "presence_counts" {
            pushes.push(message["data"].clone());
        }
    }
    let last = pushes.last().expect("counts pushed");
    assert_eq!(last, &json!({"users": 6, "connections": 8, "anonymous": 2}), "{pushes:?}");
    // At most one per 300 ms interval the arrivals spanned, plus the last.
    assert!(pushes.len() <= burst_ms / 300 + 2, "{} pushes in {burst_ms} ms: {pushes:?}", pushes.len());

    // The subscriber that did not ask got join events, but no counts.
    plain.send(json!({"op": "ping", "id": 5}));
    loop {
        let message = plain.recv();
        assert_ne!(message["event"], "presence_counts", "not asked for: {message}");
        if message["id"] == 5 {
            break;
        }
    }
    // Leaving changes them too.
    drop(users.pop());
    watcher.set_timeout(common::TIMEOUT);
    assert_eq!(next_counts(&mut watcher), json!({"users": 5, "connections": 7, "anonymous": 2}));
    // Only where presence is kept.
    let mut other = server.client();
    let reply = other.request(json!({"op": "subscribe", "channel": "news", "presence_counts": true, "id": 6}));
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
}

#[test]
fn a_revoked_token_on_connect_gets_an_error_reply_then_4001() {
    let server = Server::start(2, &format!("token_secret = \"{SECRET}\"\n"));
    let old_token = sign(SECRET, &json!({"sub": "rex", "iat": now_s() - 100}));
    server.admin().disconnect("rex", 0, "banned", now_s() - 50).unwrap();
    let mut client = server.client();
    let reply = client.request(json!({"op": "connect", "token": old_token, "id": 3}));
    assert_eq!(reply["id"], 3);
    assert_eq!(reply["error"]["code"], "unauthorized", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("revoked"), "{reply}");
    assert_eq!(client.close_code(), Some(4001));
    // A token issued after the revocation works.
    let mut fresh = server.client();
    let reply = fresh.request(json!({"op": "connect", "token": token("rex"), "id": 4}));
    assert_eq!(reply, json!({"id": 4, "ok": true, "user": "rex"}));
}

/// Status of an upgrade request with the given extra headers.
fn upgrade_status(server: &Server, headers: &str) -> String {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    let mut stream = server.tcp();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let head = common::read_http_head(&mut stream);
    head.split_whitespace().nth(1).unwrap_or("").to_owned()
}

/// Status of a new long-poll session request.
fn poll_status(server: &Server, headers: &str) -> String {
    let mut stream = server.tcp();
    let request = format!("GET /poll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1).unwrap_or("").to_owned()
}

#[test]
fn requests_without_origin_follow_allow_missing_origin() {
    let allowed = "allowed_origins = [\"https://app.example\"]\n";
    let lenient = Server::start(1, allowed);
    assert_eq!(upgrade_status(&lenient, ""), "101", "native apps send no Origin: allowed by default");
    assert_eq!(poll_status(&lenient, ""), "200");
    assert_eq!(upgrade_status(&lenient, "Origin: https://evil.example\r\n"), "403");

    let strict = Server::start(1, &format!("{allowed}allow_missing_origin = false\n"));
    assert_eq!(upgrade_status(&strict, ""), "403");
    assert_eq!(poll_status(&strict, ""), "403");
    assert_eq!(upgrade_status(&strict, "Origin: https://app.example\r\n"), "101");
    assert_eq!(poll_status(&strict, "Origin: https://app.example\r\n"), "200");
}
