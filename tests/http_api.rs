//! The HTTP API for backends (`api.listen`) over real sockets: every
//! operation, its errors as on the binary socket, and its limits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{http_at, parse_response, HttpResponse, Server};
use kometa_protocol::token::sign;
use serde_json::{json, Value};

const KEY: &str = "http-api-test-key-0123456789";
const SECRET: &str = "http-api-token-secret-0123456789";

fn config(extra: &str) -> String {
    format!(
        "token_secret = \"{SECRET}\"\n[api]\nlisten = \"127.0.0.1:0\"\nkey = \"{KEY}\"\n\
         [limits]\npublication_data_bytes_max = 1024\nadmin_frame_bytes_max = 4096\n{extra}"
    )
}

fn api_with_key(server: &Server, operation: &str, body: &str, key: &str) -> HttpResponse {
    let authorization = format!("apikey {key}");
    let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/json")];
    http_at(server.listener_port("api"), "POST", &format!("/api/{operation}"), &headers, body.as_bytes())
}

/// A successful call: its JSON.
fn api(server: &Server, operation: &str, body: Value) -> Value {
    let response = api_with_key(server, operation, &body.to_string(), KEY);
    assert_eq!(response.status, 200, "{operation}: {}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("Content-Type").as_deref(), Some("application/json"));
    response.json()
}

/// A failed call: (HTTP status, error object).
fn api_error(server: &Server, operation: &str, body: &str) -> (u16, Value) {
    let response = api_with_key(server, operation, body, KEY);
    (response.status, response.json()["error"].clone())
}

fn user_client(server: &Server, user: &str) -> common::Client {
    let token = sign(SECRET, &json!({"sub": user}));
    server.client_at(&format!("/ws?token={token}"))
}

#[test]
fn every_operation_answers_as_the_binary_socket_does() {
    let server = Server::start(2, &config(""));
    assert_eq!(api(&server, "ping", json!({})), json!({}));

    let mut news = server.client();
    news.subscribe("news");
    news.subscribe("sport");
    let published = api(&server, "publish", json!({"channel": "news", "event": "update", "data": {"a": 1}}));
    assert_eq!(published["offset"], 1);
    assert_eq!(published["subscribers"], 1);
    assert!(published["epoch"].is_string());
    let push = news.recv();
    assert_eq!(
        (push["channel"].clone(), push["event"].clone(), push["data"].clone()),
        (json!("news"), json!("update"), json!({"a": 1}))
    );

    let many = api(&server, "publish_many", json!({"channels": ["news", "sport"], "event": "both", "data": "hi"}));
    let results = many["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    assert_eq!((results[0]["channel"].clone(), results[0]["offset"].clone()), (json!("news"), json!(2)));
    assert_eq!((results[1]["channel"].clone(), results[1]["offset"].clone()), (json!("sport"), json!(1)));
    let mut got: Vec<String> = (0..2).map(|_| news.recv()["channel"].as_str().unwrap().to_owned()).collect();
    got.sort();
    assert_eq!(got, vec!["news", "sport"]);
    // The binary socket has the same operation, with the same document.
    let binary = server.admin().publish_many(&["news"], "again", b"3").expect("PUBLISH_MANY");
    assert_eq!(binary["results"][0]["offset"], 3);
    assert_eq!(news.recv()["data"], 3);

    // Users: a message, their status, presence, disconnect.
    let mut alice = user_client(&server, "alice");
    alice.subscribe("track_room");
    assert_eq!(alice.recv()["event"], "join");
    let sent = api(&server, "send_user", json!({"users": ["alice", "bob"], "event": "notice", "data": {"x": 1}}));
    assert_eq!(sent["results"][0]["user"], "alice");
    assert_eq!(sent["results"][0]["delivered"], 1);
    assert_eq!(sent["results"][1]["delivered"], 0);
    assert_eq!(alice.recv()["event"], "notice");
    let status = api(&server, "user_status", json!({"users": ["alice", "carol"]}));
    assert_eq!(status["results"][0]["status"], "online");
    assert_eq!(status["results"][1]["status"], "unknown");
    let presence = api(&server, "presence", json!({"channel": "track_room"}));
    assert_eq!(presence["members"], json!([{"user": "alice", "connections": 1}]));
    assert_eq!(presence["next"], Value::Null);
    let stats = api(&server, "presence_stats", json!({"channel": "track_room"}));
    assert_eq!((stats["users"].clone(), stats["connections"].clone()), (json!(1), json!(1)));

    // Channels.
    let history = api(&server, "history", json!({"channel": "news", "since": 1}));
    let offsets: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![2, 3]);
    let info = api(&server, "channel_info", json!({"channel": "news"}));
    assert_eq!(
        (info["exists"].clone(), info["offset"].clone(), info["subscribers"].clone()),
        (json!(true), json!(3), json!(1))
    );
    let channels = api(&server, "channels", json!({"prefix": "s"}));
    assert_eq!(channels["channels"], json!([{"channel": "sport", "subscribers": 1}]));
    let all = api(&server, "stats", json!({}));
    assert_eq!(all["connections"], 2);
    assert_eq!(all["shards"].as_array().unwrap().len(), 2);
    // An empty body is `{}` for operations without arguments.
    assert_eq!(api_with_key(&server, "stats", "", KEY).status, 200);
    assert_eq!(api(&server, "stats", json!({"scope": "node"}))["connections"], 2);
    assert_eq!(api_with_key(&server, "stats", r#"{"scope":"galaxy"}"#, KEY).status, 400);

    let disconnected = api(&server, "disconnect", json!({"user": "alice", "code": 4010, "reason": "bye"}));
    assert_eq!(disconnected, json!({"user": "alice", "disconnected": 1}));
    assert_eq!(alice.close_code(), Some(4010));
}

#[test]
fn errors_have_the_binary_codes_and_http_statuses() {
    let server = Server::start(1, &config("channels_max = 1\n"));
    // The key.
    for key in ["wrong-key-0123456789", ""] {
        let response = api_with_key(&server, "stats", "{}", key);
        assert_eq!(response.status, 401);
        assert_eq!(response.json()["error"]["name"], "unauthorized");
        assert_eq!(response.header("WWW-Authenticate").as_deref(), Some("apikey"));
    }
    let port = server.listener_port("api");
    assert_eq!(http_at(port, "POST", "/api/stats", &[], b"{}").status, 401);
    assert_eq!(http_at(port, "POST", "/api/stats", &[("Authorization", &format!("Bearer {KEY}"))], b"").status, 401);

    // Bad bodies: not JSON, a misspelt field, a wrong type, a bad name.
    for body in ["{", r#"{"channel":"news","event":"e","dat":1}"#, r#"{"channel":7,"event":"e","data":1}"#] {
        let (status, error) = api_error(&server, "publish", body);
        assert_eq!((status, error["code"].clone(), error["name"].clone()), (400, json!(3), json!("bad_argument")));
    }
    let (status, error) = api_error(&server, "publish", r#"{"channel":"news","event":"e","dat":1}"#);
    assert_eq!(status, 400);
    assert!(error["message"].as_str().unwrap().contains("dat"), "{error}");
    let (status, error) = api_error(&server, "publish", r#"{"channel":"bad name","event":"e","data":1}"#);
    assert_eq!(status, 400);
    // The binary socket says the same about the same request.
    let binary = server.admin().publish("bad name", "e", b"1").unwrap_err().to_string();
    assert!(binary.contains(error["message"].as_str().unwrap()), "{binary} / {error}");

    // Unknown operation, wrong method.
    let (status, error) = api_error(&server, "publish_everything", "{}");
    assert_eq!((status, error["name"].clone()), (404, json!("unknown_opcode")));
    let get = http_at(port, "GET", "/api/stats", &[("Authorization", &format!("apikey {KEY}"))], b"");
    assert_eq!(get.status, 405);
    assert_eq!(get.header("Allow").as_deref(), Some("POST"));

    // Data over limits.publication_data_bytes_max: too_large, as on the binary socket.
    let data = format!("\"{}\"", "x".repeat(2000));
    let body = format!(r#"{{"channel":"news","event":"e","data":{data}}}"#);
    let (status, error) = api_error(&server, "publish", &body);
    assert_eq!((status, error["name"].clone()), (413, json!("too_large")));
    // A server-wide limit: limit_reached, 429.
    api(&server, "publish", json!({"channel": "one", "event": "e", "data": 1}));
    let (status, error) = api_error(&server, "publish", r#"{"channel":"two","event":"e","data":1}"#);
    assert_eq!((status, error["name"].clone()), (429, json!("limit_reached")));
    // A channel without presence.
    let (status, error) = api_error(&server, "presence", r#"{"channel":"one"}"#);
    assert_eq!((status, error["name"].clone()), (400, json!("bad_argument")));
    // Still serving.
    assert_eq!(api(&server, "ping", json!({})), json!({}));
}

#[test]
fn a_body_over_the_frame_cap_is_refused_before_it_is_read() {
    let server = Server::start(1, &config(""));
    let port = server.listener_port("api");
    // Over limits.admin_frame_bytes_max (4096): 413 from the length alone.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: k\r\nAuthorization: apikey {KEY}\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server answers without waiting for the body; some of it arrives anyway.
    let _ = stream.write_all(&[b' '; 8192]);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = parse_response(&response);
    assert_eq!(response.status, 413, "{}", response.head);
    assert!(String::from_utf8_lossy(&response.body).contains("admin_frame_bytes_max"));

    // Chunked bodies are refused, not guessed at.
    let chunked = http_at(
        port,
        "POST",
        "/api/ping",
        &[("Authorization", &format!("apikey {KEY}")), ("Transfer-Encoding", "chunked")],
        b"",
    );
    assert_eq!(chunked.status, 400);
    assert_eq!(api(&server, "ping", json!({})), json!({}));
}

#[test]
fn keep_alive_expect_continue_and_the_connection_cap() {
    let server = Server::start(1, &config("admin_connections_max = 3\nadmin_unauthenticated_max = 2\n"));
    let port = server.listener_port("api");
    // Two requests on one connection; the second waits for 100 Continue.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let request = |body: &str, expect: bool| {
        let expect = if expect { "Expect: 100-continue\r\n" } else { "" };
        format!(
            "POST /api/channel_info HTTP/1.1\r\nHost: k\r\nAuthorization: apikey {KEY}\r\n{expect}Content-Length: {}\r\n\r\n",
            body.len()
        )
    };
    let body = r#"{"channel":"news"}"#;
    stream.write_all(request(body, false).as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let first = read_response(&mut stream);
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["exists"], false);
    stream.write_all(request(body, true).as_bytes()).unwrap();
    let interim = read_response(&mut stream);
    assert_eq!(interim.status, 100);
    stream.write_all(body.as_bytes()).unwrap();
    let second = read_response(&mut stream);
    assert_eq!(second.status, 200, "{}", second.head);

    // At the cap (3, this one included), another connection gets 503.
    let others: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    common::eventually("the cap to be reached", || (ping_status(port) == Some(503)).then_some(()));
    drop(others);
    drop(stream);
    common::eventually("a slot to free up", || (ping_status(port) == Some(200)).then_some(()));
}

/// The status of a PING, or None when the connection broke first (a
/// refused connection may be reset once closed).
fn ping_status(port: u16) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(common::TIMEOUT)).ok()?;
    let request = format!(
        "POST /api/ping HTTP/1.1\r\nHost: k\r\nAuthorization: apikey {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    response.starts_with(b"HTTP/1.1 ").then(|| parse_response(&response).status)
}

/// One response on a kept-alive connection: the head, then Content-Length bytes.
fn read_response(stream: &mut TcpStream) -> HttpResponse {
    let head = common::read_http_head(stream);
    let mut response = head.clone().into_bytes();
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .map_or(0, |v| v.parse::<usize>().expect("length"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("body");
    response.extend_from_slice(&body);
    parse_response(&response)
}

#[test]
fn the_api_needs_a_key_and_is_off_by_default() {
    let plain = Server::start(1, "");
    assert!(!plain.ready.contains("api="), "{}", plain.ready);

    let dir = common::temp_dir("api-no-key");
    let path = dir.join("kometa.toml");
    std::fs::write(&path, "[api]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("api.key"), "{}", String::from_utf8_lossy(&output.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_reload_changes_the_key_live_and_the_listener_only_on_a_restart() {
    let server = Server::start(1, &config(""));
    let new_key = "http-api-rotated-key-0123456789";
    let rotated = config("").replace(KEY, new_key).replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(server.dir.join("kometa.toml"), rotated).unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    common::eventually("the new key", || (api_with_key(&server, "ping", "{}", new_key).status == 200).then_some(()));
    assert_eq!(api_with_key(&server, "ping", "{}", KEY).status, 401);
    let warning = common::eventually("the restart warning", || {
        server.log.recv_timeout(std::time::Duration::from_millis(100)).ok().filter(|line| line.contains("restart"))
    });
    assert!(warning.contains("api.listen"), "{warning}");
}

/// POST /api/reload: the same reload as SIGHUP, answered; a bad file is a
/// 400 naming the key.
#[test]
fn reload_over_the_http_api() {
    let server = Server::start(1, &config(""));
    let changed = format!("accept_backlog = 10\n{}", config(""));
    std::fs::write(server.dir.join("kometa.toml"), &changed).unwrap();
    assert_eq!(api(&server, "reload", json!({})), json!({"reloaded": true, "restart_needed": ["accept_backlog"]}));
    std::fs::write(
        server.dir.join("kometa.toml"),
        format!("accept_backlog = 10\n{}", config("channels_max = \"lots\"\n")),
    )
    .unwrap();
    let (status, body) = api_error(&server, "reload", "{}");
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("channels_max"), "{body}");
    assert_eq!(api(&server, "ping", json!({})), json!({}), "still serving");
}
