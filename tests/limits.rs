//! Limits against abuse, over real sockets: for each, the refusal and its
//! documented code, that other clients are unaffected, and that the STATS
//! counter (`limit_refusals`) moved.
//!
//! Per-address limits: the tests clear `limits.ip_limits_exempt` (loopback
//! is exempt by default) and connect from two loopback addresses,
//! 127.0.0.1 and 127.0.0.2, as two different clients.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{client_frame, read_close_code, read_http_head, Client, Server};
use kometa_admin_client::{AdminAddress, AdminClient, ClientError};
use kometa_protocol::admin::{opcode, ErrorCode};
use kometa_protocol::token::sign;
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789";
const ADMIN_KEY: &str = "0123456789abcdef-admin-key";

fn token(user: &str) -> String {
    let now_s = kometa::util::unix_time_ms() / 1000;
    sign(SECRET, &json!({"sub": user, "iat": now_s, "exp": now_s + 3600}))
}

/// A TCP connection to the server from the loopback address `source`.
fn tcp_from(server: &Server, source: [u8; 4]) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from((source, 0)).into()).expect("bind the source address");
    socket.connect(&SocketAddr::from(([127, 0, 0, 1], server.port)).into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(common::TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// A WebSocket client from `source`.
fn client_from(server: &Server, source: [u8; 4], path: &str) -> Client {
    let stream = tcp_from(server, source);
    let (socket, _) = tungstenite::client::client(server.url(path), stream).expect("websocket handshake");
    Client { socket }
}

/// The raw answer to an upgrade request from `source` (for refusals).
fn upgrade_answer(server: &Server, source: [u8; 4]) -> String {
    let mut stream = tcp_from(server, source);
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("write");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn refusals(stats: &Value, kind: &str) -> u64 {
    stats["limit_refusals"][kind].as_u64().unwrap_or_else(|| panic!("no limit_refusals.{kind} in {stats}"))
}

/// Waits until STATS counts `count` refusals of `kind`.
fn wait_refusals(server: &Server, kind: &str, count: u64) -> Value {
    server.wait_stats(&format!("limit_refusals.{kind} = {count}"), |s| refusals(s, kind) == count)
}

/// The shards' own counts of `kind`, added up (the totals also hold the
/// admin listener's).
fn shard_refusals(stats: &Value, kind: &str) -> u64 {
    stats["shards"].as_array().unwrap().iter().map(|s| s["limit_refusals"][kind].as_u64().unwrap()).sum()
}

fn ping(client: &mut Client, id: u64) -> Value {
    client.request(json!({"op": "ping", "id": id}))
}

/// Publishes `id` as the data, with `id` as the command id; the reply.
fn publish(client: &mut Client, channel: &str, id: u64) -> Value {
    client.request(json!({"op": "publish", "channel": channel, "data": id, "id": id}))
}

#[test]
fn stats_show_every_kind_of_refusal() {
    let server = Server::start(2, "");
    let stats = server.stats();
    let kinds = [
        "connections_per_ip",
        "handshakes_per_ip",
        "connections_per_user",
        "commands_per_connection",
        "publications_per_connection",
        "publications_per_user",
        "request_timeout",
        "message_timeout",
        "json_depth",
        "admin_auth_timeout",
        "admin_auth_failures",
        "admin_unauthenticated",
        "connections_max",
        "http_sessions_max",
        "channels_max",
        "subscribers_max",
        "channels_per_connection_max",
        "session_commands_pending_max",
        "admin_connections_max",
        "publication_data_bytes_max",
        "fanout_backlog_max",
    ];
    for kind in kinds {
        assert_eq!(refusals(&stats, kind), 0, "{kind}");
        for shard in stats["shards"].as_array().unwrap() {
            assert_eq!(shard["limit_refusals"][kind], 0, "{kind} per shard");
        }
    }
    assert_eq!(stats["limit_refusals"].as_object().unwrap().len(), kinds.len());
}

#[test]
fn connections_per_address_are_capped_over_all_shards() {
    let server = Server::start(2, "[limits]\nip_limits_exempt = []\nconnections_per_ip_max = 3\n");
    let mut first: Vec<Client> = (0..3).map(|_| client_from(&server, [127, 0, 0, 1], "/ws")).collect();
    for (n, client) in first.iter_mut().enumerate() {
        assert_eq!(ping(client, n as u64)["ok"], true);
    }
    // The fourth from the same address: 429 at accept, before any request.
    let mut refused = tcp_from(&server, [127, 0, 0, 1]);
    let head = read_http_head(&mut refused);
    assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
    assert!(head.contains("Retry-After:"), "{head}");
    let stats = wait_refusals(&server, "connections_per_ip", 1);
    assert_eq!(shard_refusals(&stats, "connections_per_ip"), 1, "counted by the shard that refused: {stats}");
    // Another address is not affected, and the first three go on.
    let mut other = client_from(&server, [127, 0, 0, 2], "/ws");
    assert_eq!(ping(&mut other, 1)["ok"], true);
    assert_eq!(ping(&mut first[0], 9)["ok"], true);
    // A closed connection makes room again.
    drop(first.pop());
    let mut again = common::eventually("room for one more connection", || {
        let mut stream = tcp_from(&server, [127, 0, 0, 1]);
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let head = read_http_head(&mut stream);
        head.starts_with("HTTP/1.1 200").then_some(stream)
    });
    let _ = again.read_to_end(&mut Vec::new());
    assert!(refusals(&server.stats(), "connections_per_ip") >= 1);
}

#[test]
fn handshakes_per_address_are_rate_limited_across_reconnects() {
    let server =
        Server::start(2, "[limits]\nip_limits_exempt = []\nhandshakes_per_ip_per_s = 2\nhandshakes_per_ip_burst = 2\n");
    // Connect, close, connect: the burst is the address's, not the socket's.
    for n in 0..2 {
        let mut client = client_from(&server, [127, 0, 0, 1], "/ws");
        assert_eq!(ping(&mut client, n)["ok"], true);
    }
    let answer = upgrade_answer(&server, [127, 0, 0, 1]);
    assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
    assert!(answer.contains("Retry-After: 1") && answer.contains("handshakes"), "{answer}");
    wait_refusals(&server, "handshakes_per_ip", 1);
    let mut other = client_from(&server, [127, 0, 0, 2], "/ws");
    assert_eq!(ping(&mut other, 1)["ok"], true);
    // Two a second: the address may try again soon.
    std::thread::sleep(Duration::from_millis(600));
    let mut later = client_from(&server, [127, 0, 0, 1], "/ws");
    assert_eq!(ping(&mut later, 2)["ok"], true);
    // New HTTP sessions spend the same tokens (the bucket is empty again).
    let mut stream = tcp_from(&server, [127, 0, 0, 1]);
    stream.write_all(b"GET /poll HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
    wait_refusals(&server, "handshakes_per_ip", 2);
}

#[test]
fn connections_per_user_are_capped_with_close_4005() {
    let server = Server::start(2, &format!("token_secret = \"{SECRET}\"\n[limits]\nconnections_per_user_max = 2\n"));
    let url = format!("/ws?token={}", token("ann"));
    let mut ann: Vec<Client> = (0..2).map(|_| server.client_at(&url)).collect();
    for (n, client) in ann.iter_mut().enumerate() {
        assert_eq!(ping(client, n as u64)["ok"], true, "registered");
    }
    // A third with the token in the URL: upgraded, then closed with 4005.
    let mut third = server.client_at(&url);
    assert_eq!(third.close_code(), Some(4005));
    // With `connect`: the error reply first, then the close.
    let mut fourth = server.client();
    let reply = fourth.request(json!({"op": "connect", "token": token("ann"), "id": 7}));
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["error"]["code"], "too_many_connections", "{reply}");
    assert_eq!(fourth.close_code(), Some(4005));
    wait_refusals(&server, "connections_per_user", 2);
    // Other users are not affected, nor are ann's two.
    let mut bob = server.client_at(&format!("/ws?token={}", token("bob")));
    assert_eq!(ping(&mut bob, 1)["ok"], true);
    assert_eq!(ping(&mut ann[1], 2)["ok"], true);
    // One closes: room again.
    drop(ann.pop());
    server.wait_stats("ann's connection gone", |s| s["authenticated"] == 2);
    let mut again = server.client_at(&url);
    assert_eq!(ping(&mut again, 3)["ok"], true);
}

#[test]
fn commands_per_connection_are_rate_limited_with_an_error_reply() {
    let server = Server::start(
        2,
        "[limits]\nchannels_per_connection_max = 4\nclient_commands_per_s = 2\nclient_commands_burst = 4\n",
    );
    let mut flood = server.client();
    for id in 0..5 {
        flood.send(json!({"op": "ping", "id": id}));
    }
    let replies: Vec<Value> = (0..5).map(|_| flood.recv()).collect();
    assert!(replies[..4].iter().all(|r| r["ok"] == true), "{replies:?}");
    assert_eq!(replies[4]["id"], 4, "the refusal carries the command's id");
    assert_eq!(replies[4]["error"]["code"], "rate_limited", "{replies:?}");
    assert!(replies[4]["error"]["message"].as_str().unwrap().contains("client_commands_per_s"));
    wait_refusals(&server, "commands_per_connection", 1);
    // The connection stays; another one has its own bucket.
    let mut other = server.client();
    assert_eq!(ping(&mut other, 1)["ok"], true);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ping(&mut flood, 6)["ok"], true, "refilled at 2 a second");
}

#[test]
fn publications_per_connection_are_rate_limited() {
    let server = Server::start(2, "[limits]\nclient_publications_per_s = 1\nclient_publications_burst = 2\n");
    let mut watcher = server.client();
    watcher.subscribe("web_chat");
    let mut chatty = server.client();
    let publish = |client: &mut Client, id: u64| publish(client, "web_chat", id);
    assert_eq!(publish(&mut chatty, 1)["ok"], true);
    assert_eq!(publish(&mut chatty, 2)["ok"], true);
    let refused = publish(&mut chatty, 3);
    assert_eq!((refused["id"].clone(), refused["error"]["code"].clone()), (json!(3), json!("rate_limited")));
    assert!(refused["error"]["message"].as_str().unwrap().contains("client_publications_per_s"));
    wait_refusals(&server, "publications_per_connection", 1);
    let mut other = server.client();
    assert_eq!(publish(&mut other, 4)["ok"], true);
    // The watcher got exactly the accepted ones.
    let data: Vec<Value> = (0..3).map(|_| watcher.recv()["data"].clone()).collect();
    assert_eq!(data, vec![json!(1), json!(2), json!(4)]);
    // Other commands are not publications.
    assert_eq!(ping(&mut chatty, 5)["ok"], true);
}

#[test]
fn publications_per_user_count_every_connection_of_the_user() {
    let server = Server::start(
        2,
        &format!("token_secret = \"{SECRET}\"\n[limits]\nuser_publications_per_s = 1\nuser_publications_burst = 3\n"),
    );
    let url = format!("/ws?token={}", token("cy"));
    let (mut one, mut two) = (server.client_at(&url), server.client_at(&url));
    let publish = |client: &mut Client, id: u64| publish(client, "web_room", id);
    assert_eq!(publish(&mut one, 1)["ok"], true);
    assert_eq!(publish(&mut two, 2)["ok"], true);
    assert_eq!(publish(&mut one, 3)["ok"], true);
    let refused = publish(&mut two, 4);
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("user_publications_per_s"));
    wait_refusals(&server, "publications_per_user", 1);
    let mut dee = server.client_at(&format!("/ws?token={}", token("dee")));
    assert_eq!(publish(&mut dee, 5)["ok"], true, "other users are not affected");
    let mut anonymous = server.client();
    assert_eq!(publish(&mut anonymous, 6)["ok"], true);
}

#[test]
fn a_dribbled_websocket_message_is_cut_off_with_1008() {
    let server = Server::start(2, "[timeouts]\nmessage_timeout_ms = 400\nsweep_interval_ms = 50\n");
    let mut witness = server.client();
    witness.subscribe("witness");
    let mut slow = common::raw_websocket(&server);
    let frame = client_frame(0x81, &[b'x'; 100]);
    let started = Instant::now();
    let mut sent = 0;
    // A byte every 50 ms: each one is activity, the message never completes.
    while sent < frame.len() && slow.write_all(&frame[sent..sent + 1]).is_ok() {
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_millis(1_500) {
            break;
        }
    }
    assert_eq!(read_close_code(&mut slow), Some(1008));
    assert!(sent < 40, "cut off after {sent} bytes, {:?}", started.elapsed());
    wait_refusals(&server, "message_timeout", 1);
    // Complete messages, however far apart, are fine.
    for n in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(ping(&mut witness, n)["ok"], true);
    }
    server.publish("witness", "e", "1");
    assert_eq!(witness.recv()["data"], 1);
    assert_eq!(refusals(&server.stats(), "message_timeout"), 1);
}

#[test]
fn a_dribbled_request_gets_408() {
    let server = Server::start(1, "[timeouts]\nhandshake_timeout_ms = 400\nsweep_interval_ms = 50\n");
    let mut stream = server.tcp();
    stream.write_all(b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n").unwrap();
    for _ in 0..5 {
        if stream.write_all(b"x").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    wait_refusals(&server, "request_timeout", 1);
}

#[test]
fn deep_json_is_refused_from_clients_and_the_admin_socket() {
    let server = Server::start(2, "[limits]\njson_depth_max = 4\n");
    let mut watcher = server.client();
    watcher.subscribe("web_deep");
    let mut client = server.client();
    let deep = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let publish = |client: &mut Client, depth: usize, id: u64| {
        let data: Value = serde_json::from_str(&deep(depth)).unwrap();
        client.request(json!({"op": "publish", "channel": "web_deep", "data": data, "id": id}))
    };
    assert_eq!(publish(&mut client, 4, 1)["ok"], true);
    let refused = publish(&mut client, 5, 2);
    assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("json_depth_max"), "{refused}");
    let error = match server.admin().publish("web_deep", "e", deep(40).as_bytes()) {
        Err(ClientError::Server(error)) => error,
        other => panic!("deep admin data accepted: {:?}", other.map(|p| p.offset)),
    };
    assert_eq!(error.code, ErrorCode::BadArgument);
    assert!(error.message.contains("json_depth_max"), "{}", error.message);
    // A string full of brackets is not nesting.
    server.publish("web_deep", "e", "\"[[[[[[[[[[\"");
    let stats = wait_refusals(&server, "json_depth", 2);
    assert_eq!(shard_refusals(&stats, "json_depth"), 1, "the client's on its shard, the admin's in the totals");
    assert_eq!(watcher.recv()["data"], json!([[[[1]]]]));
    assert_eq!(watcher.recv()["data"], "[[[[[[[[[[");
}

/// A TCP admin listener with a key; `limits` and `timeouts` as given.
fn tcp_admin_server(config: &str) -> (Server, AdminAddress) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let admin = format!("tcp:{address}");
    let server = Server::start_with(1, config, &["--admin", &admin, "--admin-key", ADMIN_KEY]);
    (server, AdminAddress::Tcp(address))
}

fn authorized(address: &AdminAddress) -> AdminClient {
    AdminClient::connect(address, Some(ADMIN_KEY), common::TIMEOUT).expect("admin with the key")
}

fn admin_stats(address: &AdminAddress) -> Value {
    authorized(address).stats().expect("stats")
}

/// The connection's last reply, then the end of the stream.
fn closing_reply(client: &mut AdminClient) -> kometa_protocol::admin::AdminError {
    let reply = client.receive().expect("a last reply");
    let error = reply.result.expect_err("an error");
    assert!(client.receive().is_err(), "the connection is closed after it");
    error
}

#[test]
fn an_admin_connection_that_never_authenticates_is_closed() {
    let (server, address) = tcp_admin_server("[timeouts]\nadmin_auth_timeout_ms = 300\n");
    let started = Instant::now();
    let mut silent = AdminClient::connect(&address, None, common::TIMEOUT).unwrap();
    let error = closing_reply(&mut silent);
    assert_eq!(error.code, ErrorCode::Unauthorized);
    assert!(error.message.contains("admin_auth_timeout_ms"), "{}", error.message);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // A client that keeps sending (never waiting on a read) meets it too.
    let mut busy = AdminClient::connect(&address, None, common::TIMEOUT).unwrap();
    let chatter = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && busy.send(opcode::PING, |_| {}).is_ok() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Instant::now() < deadline
    });
    assert!(chatter.join().unwrap(), "the chatty unauthenticated connection was not closed");
    let stats = admin_stats(&address);
    assert_eq!(refusals(&stats, "admin_auth_timeout"), 2, "{stats}");
    drop(server);
}

#[test]
fn wrong_admin_keys_close_the_connection_at_the_cap() {
    let (_server, address) = tcp_admin_server("[limits]\nadmin_auth_failures_max = 2\n");
    let mut guesser = AdminClient::connect(&address, None, common::TIMEOUT).unwrap();
    guesser
        .send(opcode::AUTH, |w| {
            w.str16("guess-number-one");
        })
        .unwrap();
    let first = guesser.receive().unwrap().result.unwrap_err();
    assert_eq!(first.code, ErrorCode::Unauthorized);
    assert!(first.message.contains("1 of 2"), "{}", first.message);
    guesser
        .send(opcode::AUTH, |w| {
            w.str16("guess-number-two");
        })
        .unwrap();
    assert_eq!(closing_reply(&mut guesser).code, ErrorCode::Unauthorized);
    // The right key on a new connection works, and STATS counted the close.
    let stats = admin_stats(&address);
    assert_eq!(refusals(&stats, "admin_auth_failures"), 1, "{stats}");
}

#[test]
fn unauthenticated_admin_connections_cannot_lock_the_backend_out() {
    let (server, address) = tcp_admin_server(
        "[limits]\nadmin_connections_max = 6\nadmin_unauthenticated_max = 2\n[timeouts]\nadmin_auth_timeout_ms = 30000\n",
    );
    let mut subscriber = server.client();
    subscriber.subscribe("news");
    // Connections that never send AUTH, one after the other.
    let mut idle: Vec<TcpStream> = Vec::new();
    let AdminAddress::Tcp(socket) = &address else { panic!("a TCP admin listener") };
    for _ in 0..3 {
        idle.push(TcpStream::connect(socket).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The oldest was pushed out for the third: an error frame, then the end.
    let mut oldest = idle.remove(0);
    oldest.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let mut pushed_out = Vec::new();
    oldest.read_to_end(&mut pushed_out).unwrap();
    assert!(String::from_utf8_lossy(&pushed_out).contains("admin_unauthenticated_max"), "{pushed_out:?}");
    // The backend gets in (pushing out another idle one) and publishes.
    let mut backend = authorized(&address);
    assert_eq!(backend.publish("news", "e", b"1").unwrap().subscribers, 1);
    assert_eq!(subscriber.recv()["data"], 1);
    let stats = backend.stats().unwrap();
    assert_eq!(refusals(&stats, "admin_unauthenticated"), 2, "{stats}");
    // Authenticated connections do not count against the share.
    let mut more: Vec<AdminClient> = (0..3).map(|_| authorized(&address)).collect();
    for client in &mut more {
        client.ping().unwrap();
    }
    backend.ping().unwrap();
}
