//! Client-to-backend calls (`op: rpc`) and the proxies (connect, subscribe,
//! publish) against a real backend process: a small HTTP server in the test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Server, TIMEOUT};
use kometa_protocol::token::sign;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;

/// What the test backend answers: status and body, after a delay.
type Behaviour = dyn Fn(&Value) -> (u16, Value, Duration) + Send + Sync;

/// A backend: keep-alive HTTP/1.1, one thread per connection, records
/// every request body.
struct Backend {
    port: u16,
    seen: Arc<Mutex<Vec<Value>>>,
    behaviour: Arc<Mutex<Arc<Behaviour>>>,
}

impl Backend {
    fn start(behaviour: impl Fn(&Value) -> (u16, Value, Duration) + Send + Sync + 'static) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("backend bind");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour: Arc<Mutex<Arc<Behaviour>>> = Arc::new(Mutex::new(Arc::new(behaviour)));
        let (seen_accept, behaviour_accept) = (Arc::clone(&seen), Arc::clone(&behaviour));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (seen, behaviour) = (Arc::clone(&seen_accept), Arc::clone(&behaviour_accept));
                std::thread::spawn(move || serve_backend_connection(stream, &seen, &behaviour));
            }
        });
        Backend { port, seen, behaviour }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/kometa", self.port)
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }

    fn behave(&self, behaviour: impl Fn(&Value) -> (u16, Value, Duration) + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Arc::new(behaviour);
    }
}

fn serve_backend_connection(stream: TcpStream, seen: &Mutex<Vec<Value>>, behaviour: &Mutex<Arc<Behaviour>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().push(request.clone());
        let behaviour = Arc::clone(&behaviour.lock().unwrap());
        let (status, answer, delay) = behaviour(&request);
        std::thread::sleep(delay);
        let answer = answer.to_string();
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn ok(result: Value) -> (u16, Value, Duration) {
    (200, json!({"result": result}), Duration::ZERO)
}

fn rpc_config(url: &str, extra: &str) -> String {
    format!("[rpc]\ntimeout_ms = 500\nbreaker_open_ms = 300\nbreaker_failures = 2\n{extra}\n[[rpc.routes]]\nprefix = \"\"\nurl = \"{url}\"\n")
}

fn rpc(client: &mut Client, id: u64, method: &str, data: Value) -> Value {
    client.request(json!({"op": "rpc", "method": method, "data": data, "id": id}))
}

#[test]
fn answers_reach_the_caller_on_every_shard() {
    let backend = Backend::start(|request| ok(json!({"echo": request["data"], "method": request["method"]})));
    let server = Server::start(4, &rpc_config(&backend.url(), ""));
    // Enough clients that every shard has some.
    let mut clients: Vec<Client> = (0..12).map(|_| server.client()).collect();
    for (n, client) in clients.iter_mut().enumerate() {
        client.send(json!({"op": "rpc", "method": "math.add", "data": {"n": n}, "id": n}));
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let reply = client.recv();
        assert_eq!(reply["id"], n, "{reply}");
        assert_eq!(reply["result"]["echo"]["n"], n, "{reply}");
        assert_eq!(reply["result"]["method"], "math.add");
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 12);
    assert!(seen.iter().all(|r| r["kind"] == "rpc" && r["transport"] == "websocket" && r["user"].is_null()));
    assert!(seen.iter().all(|r| r["client"].as_str().is_some_and(|c| c.starts_with('s'))), "{seen:?}");
}

#[test]
fn backend_errors_timeouts_and_missing_routes() {
    let backend = Backend::start(|request| match request["method"].as_str() {
        Some("app.refuse") => (200, json!({"error": {"code": 42, "message": "nope"}}), Duration::ZERO),
        Some("app.slow") => (200, json!({"result": 1}), Duration::from_millis(1500)),
        Some("app.crash") => (500, json!("oops"), Duration::ZERO),
        _ => ok(json!(null)),
    });
    let config = format!(
        "[rpc]\ntimeout_ms = 500\nbreaker_failures = 100\n[[rpc.routes]]\nprefix = \"app.\"\nurl = \"{}\"\n",
        backend.url()
    );
    let server = Server::start(2, &config);
    let mut client = server.client();
    let reply = rpc(&mut client, 1, "app.refuse", json!({}));
    assert_eq!(reply["error"]["code"], "backend_error", "{reply}");
    assert_eq!(reply["error"]["backend_code"], 42);
    assert_eq!(reply["error"]["message"], "nope");
    let started = Instant::now();
    let reply = rpc(&mut client, 2, "app.slow", json!({}));
    assert_eq!(reply["error"]["code"], "timeout", "{reply}");
    assert!(started.elapsed() < Duration::from_millis(1400), "bounded by rpc.timeout_ms");
    let reply = rpc(&mut client, 3, "app.crash", json!({}));
    assert_eq!(reply["error"]["code"], "backend_error", "{reply}");
    assert_eq!(reply["error"]["backend_code"], 500);
    let reply = rpc(&mut client, 4, "other.thing", json!({}));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    // The connection is fine after all of that.
    assert_eq!(client.request(json!({"op": "ping", "id": 5}))["ok"], true);
}

#[test]
fn a_failing_backend_opens_the_breaker_and_a_healed_one_closes_it() {
    let backend = Backend::start(|_| (503, json!("down"), Duration::ZERO));
    let metrics = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(1, &format!("{metrics}{}", rpc_config(&backend.url(), "")));
    let mut client = server.client();
    for id in 0..2 {
        assert_eq!(rpc(&mut client, id, "m", json!(null))["error"]["code"], "backend_error");
    }
    // Open: failing at once, without reaching the backend.
    let reply = rpc(&mut client, 10, "m", json!(null));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("circuit breaker"));
    assert_eq!(backend.seen().len(), 2);
    let calls = |metrics: &Value, outcome: &str| {
        common::metric_value(
            metrics,
            "kometa_backend_calls_total",
            &[("kind", "rpc"), ("via", "webhook"), ("outcome", outcome)],
        )
    };
    let scraped = common::scrape_metrics(&server, false);
    assert_eq!(common::metric_value(&scraped, "kometa_backend_breakers_open", &[]), 1.0);
    assert_eq!((calls(&scraped, "backend_error"), calls(&scraped, "unavailable")), (2.0, 1.0));
    backend.behave(|_| ok(json!("fine")));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(rpc(&mut client, 11, "m", json!(null))["result"], "fine", "the trial call closes it");
    assert_eq!(rpc(&mut client, 12, "m", json!(null))["result"], "fine");
    let scraped = common::scrape_metrics(&server, true);
    assert_eq!(common::metric_value(&scraped, "kometa_backend_breakers_open", &[]), 0.0);
    assert_eq!(calls(&scraped, "ok"), 2.0);
}

#[test]
fn an_unreachable_backend_is_unavailable_not_a_hang() {
    let port = common::free_port();
    let server = Server::start(1, &rpc_config(&format!("http://127.0.0.1:{port}/x"), ""));
    let mut client = server.client();
    let reply = rpc(&mut client, 1, "m", json!(null));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
}

#[test]
fn a_slow_backend_gets_a_bounded_queue_and_others_keep_going() {
    let backend = Backend::start(|_| (200, json!({"result": "late"}), Duration::from_millis(300)));
    let extra = "concurrency_max = 1\nqueue_max = 2\nin_flight_per_connection_max = 3\ntimeout_ms = 5000";
    let config = format!("[rpc]\n{extra}\n[[rpc.routes]]\nprefix = \"\"\nurl = \"{}\"\n", backend.url());
    let server = Server::start(2, &config);
    let mut clients: Vec<Client> = (0..3).map(|_| server.client()).collect();
    // The first client's calls, in a known order: one with the only
    // worker (seen by the backend), then two filling the queue.
    clients[0].send(json!({"op": "rpc", "method": "m", "id": 0}));
    let deadline = Instant::now() + TIMEOUT;
    while backend.seen().is_empty() {
        assert!(Instant::now() < deadline, "the backend never got the first call");
        std::thread::sleep(Duration::from_millis(5));
    }
    for n in 1..3 {
        clients[0].send(json!({"op": "rpc", "method": "m", "id": n}));
    }
    // A fourth call on that connection is over its own cap.
    let over = rpc(&mut clients[0], 99, "m", json!(null));
    assert_eq!(over["error"]["code"], "overloaded", "{over}");
    // The others find the queue full.
    for (c, client) in clients.iter_mut().enumerate().skip(1) {
        for n in 0..3 {
            client.send(json!({"op": "rpc", "method": "m", "id": c * 10 + n}));
        }
    }
    // Meanwhile the server answers everything else at once.
    let mut other = server.client();
    let started = Instant::now();
    assert_eq!(other.request(json!({"op": "ping", "id": 1}))["ok"], true);
    assert!(started.elapsed() < Duration::from_millis(250));
    let mut answered = 0;
    let mut unavailable = 0;
    for client in &mut clients {
        for _ in 0..3 {
            let reply = client.recv();
            if reply["result"] == "late" {
                answered += 1;
            } else {
                assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
                unavailable += 1;
            }
        }
    }
    assert_eq!(answered + unavailable, 9);
    assert!(answered >= 3, "the first client's three calls were taken");
    assert!(unavailable >= 3, "one worker and two queue slots take at most 3 calls at a time: {answered} answered");
}

fn client_with_cookie(server: &Server, cookie: &str) -> Client {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut request = server.url("/ws").into_client_request().unwrap();
    request.headers_mut().insert("Cookie", cookie.parse().unwrap());
    let (socket, _) = tungstenite::client::client(request, stream).expect("handshake");
    Client { socket }
}

#[test]
fn the_connect_proxy_logs_users_in_from_their_cookie() {
    let backend = Backend::start(|request| {
        if request["kind"] == "rpc" {
            return ok(request["claims"].clone());
        }
        let cookie = request["headers"]["cookie"].as_str().unwrap_or("");
        if cookie.contains("sess=good") {
            ok(json!({"user": "alice", "channels": ["private_alice_room"], "info": {"plan": "pro"}}))
        } else {
            (200, json!({"error": {"code": 401, "message": "not logged in"}}), Duration::ZERO)
        }
    });
    let config = format!(
        "[rpc]\nconnect_url = \"{url}\"\n[[rpc.routes]]\nprefix = \"\"\nurl = \"{url}\"\n",
        url = backend.url()
    );
    let server = Server::start(2, &config);
    let mut alice = client_with_cookie(&server, "theme=dark; sess=good");
    assert_eq!(alice.recv()["connect"]["user"], "alice");
    // What the backend said at connect comes back with later calls.
    let claims = rpc(&mut alice, 9, "whoami", json!(null))["result"].clone();
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["info"], json!({"plan": "pro"}), "{claims}");
    assert_eq!(claims["channels"], json!(["private_alice_room"]), "{claims}");
    // The grant from the backend opens a private channel.
    alice.subscribe("private_alice_room");
    server.publish("private_alice_room", "e", "\"hi\"");
    assert_eq!(alice.recv()["data"], "hi");
    let seen = backend.seen();
    assert_eq!(seen[0]["kind"], "connect");
    assert_eq!(seen[0]["headers"]["cookie"], "theme=dark; sess=good");

    let mut stranger = client_with_cookie(&server, "sess=bad");
    let refusal = stranger.recv();
    assert_eq!(refusal["error"]["code"], "forbidden", "{refusal}");
    assert_eq!(stranger.close_code(), Some(4001));
}

#[test]
fn subscribe_and_publish_proxies_approve_refuse_and_rewrite() {
    let backend = Backend::start(|request| match (request["kind"].as_str(), request["channel"].as_str()) {
        (Some("subscribe"), Some("gated_no")) => {
            (200, json!({"error": {"code": 403, "message": "members only"}}), Duration::ZERO)
        }
        (Some("publish"), _) => {
            let text = request["data"].as_str().unwrap_or("").to_uppercase();
            ok(json!({"data": text}))
        }
        _ => ok(json!({})),
    });
    let config = format!(
        "[rpc]\nsubscribe_url = \"{url}\"\npublish_url = \"{url}\"\n\n\
         [[namespaces]]\nprefix = \"gated_\"\nproxy_subscribe = true\n\n\
         [[namespaces]]\nprefix = \"chat_\"\nclient_publish = true\nproxy_publish = true\n",
        url = backend.url()
    );
    let server = Server::start(2, &config);
    let mut client = server.client();
    let refused = client.request(json!({"op": "subscribe", "channel": "gated_no", "id": 1}));
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("members only"));
    assert_eq!(client.request(json!({"op": "subscribe", "channel": "gated_yes", "id": 2}))["ok"], true);

    let mut reader = server.client();
    reader.subscribe("chat_room");
    let published = client.request(json!({"op": "publish", "channel": "chat_room", "data": "hello", "id": 3}));
    assert_eq!(published["ok"], true, "{published}");
    assert_eq!(reader.recv()["data"], "HELLO", "the backend rewrote it");
}

#[test]
fn the_connect_proxy_works_for_sse_sessions_too() {
    let backend = Backend::start(|request| {
        let cookie = request["headers"]["cookie"].as_str().unwrap_or("");
        assert_eq!(request["transport"], "sse");
        if cookie == "sess=good" {
            ok(json!({"user": 7}))
        } else {
            (200, json!({"error": {"code": 401, "message": "who?"}}), Duration::ZERO)
        }
    });
    let config = format!("[rpc]\nconnect_url = \"{}\"\n", backend.url());
    let server = Server::start(2, &config);
    let mut stream = common::SseStream::open(&server, "/sse?channel=news", &[("Cookie", "sess=good")]);
    let (_, hello) = stream.next_data();
    assert!(hello["session"].is_string(), "{hello}");
    let (_, connect) = stream.next_data();
    assert_eq!(connect["connect"]["user"], "7", "{connect}");
    // The URL's subscription waited for the login, then went through.
    let (_, subscribed) = stream.next_data();
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    server.publish("news", "e", "1");
    assert_eq!(stream.next_data().1["data"], 1);
}

/// A backend that answers `rpc` calls on its admin connection (HANDLE /
/// CALL / ANSWER), speaking the binary protocol by hand as a backend in
/// another language would (docs/admin-protocol.md).
struct AdminHandler {
    stream: std::os::unix::net::UnixStream,
    next_request_id: u32,
    /// Replies read while waiting for calls (and the reverse).
    replies: std::collections::VecDeque<(u8, u8, u32, Vec<u8>)>,
    calls: std::collections::VecDeque<(u32, Value)>,
}

impl AdminHandler {
    fn connect(server: &Server) -> AdminHandler {
        let kometa_admin_client::AdminAddress::Unix(path) = &server.admin else { panic!("a unix admin socket") };
        let stream = std::os::unix::net::UnixStream::connect(path).expect("admin connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        AdminHandler { stream, next_request_id: 1, replies: Default::default(), calls: Default::default() }
    }

    fn send(&mut self, opcode: u8, payload: &[u8]) -> u32 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let mut frame = ((payload.len() + 6) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[opcode, 0]);
        frame.extend_from_slice(&request_id.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).expect("admin write");
        request_id
    }

    /// Reads one frame into `replies` or `calls`.
    fn read_frame(&mut self) {
        let mut length = [0u8; 4];
        self.stream.read_exact(&mut length).expect("admin read");
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        self.stream.read_exact(&mut frame).expect("admin read");
        let (status, opcode) = (frame[0], frame[1]);
        let id = u32::from_be_bytes(frame[2..6].try_into().unwrap());
        let payload = frame[6..].to_vec();
        if status == 2 {
            assert_eq!(opcode, 0x0F, "a CALL frame carries opcode HANDLE");
            let document_bytes = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
            assert_eq!(payload.len(), 4 + document_bytes);
            self.calls.push_back((id, serde_json::from_slice(&payload[4..]).expect("CALL JSON")));
        } else {
            self.replies.push_back((status, opcode, id, payload));
        }
    }

    /// The reply to `request_id`: Ok(payload) or Err(error message).
    fn reply(&mut self, request_id: u32) -> Result<Vec<u8>, String> {
        loop {
            if let Some(index) = self.replies.iter().position(|r| r.2 == request_id) {
                let (status, _, _, payload) = self.replies.remove(index).unwrap();
                return match status {
                    0 => Ok(payload),
                    _ => Err(String::from_utf8_lossy(&payload[4..]).into_owned()),
                };
            }
            self.read_frame();
        }
    }

    fn handle(&mut self, prefixes: &[&str]) -> Result<Vec<u8>, String> {
        let mut payload = (prefixes.len() as u16).to_be_bytes().to_vec();
        for prefix in prefixes {
            payload.extend_from_slice(&(prefix.len() as u16).to_be_bytes());
            payload.extend_from_slice(prefix.as_bytes());
        }
        let id = self.send(0x0F, &payload);
        self.reply(id)
    }

    fn next_call(&mut self) -> (u32, Value) {
        loop {
            if let Some(call) = self.calls.pop_front() {
                return call;
            }
            self.read_frame();
        }
    }

    /// Sends ANSWER without waiting for its reply (pipelined).
    fn answer(&mut self, call_id: u32, answer: &Value) -> u32 {
        let body = serde_json::to_vec(answer).unwrap();
        let mut payload = call_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&(body.len() as u32).to_be_bytes());
        payload.extend_from_slice(&body);
        self.send(0x10, &payload)
    }
}

#[test]
fn a_handler_on_the_admin_connection_answers_calls_from_every_shard_in_any_order() {
    let server = Server::start(4, "[rpc]\nadmin_handlers = true\ntimeout_ms = 5000\n");
    let mut handler = AdminHandler::connect(&server);
    handler.handle(&["math."]).expect("HANDLE accepted");
    let mut clients: Vec<Client> = (0..12).map(|_| server.client()).collect();
    for (n, client) in clients.iter_mut().enumerate() {
        client.send(json!({"op": "rpc", "method": "math.square", "data": {"n": n}, "id": n}));
    }
    // Every call arrives before any is answered (pipelined), then the
    // answers go back in reverse order.
    let calls: Vec<(u32, Value)> = (0..12).map(|_| handler.next_call()).collect();
    for (_, call) in &calls {
        assert_eq!(call["kind"], "rpc", "{call}");
        assert_eq!(call["method"], "math.square");
        assert_eq!(call["transport"], "websocket");
        assert!(call["client"].as_str().is_some_and(|c| c.starts_with('s')), "{call}");
    }
    let answer_ids: Vec<u32> = calls
        .iter()
        .rev()
        .map(|(call_id, call)| {
            let n = call["data"]["n"].as_u64().unwrap();
            handler.answer(*call_id, &json!({"result": {"square": n * n}}))
        })
        .collect();
    for id in answer_ids {
        handler.reply(id).expect("ANSWER accepted");
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let reply = client.recv();
        assert_eq!(reply["id"], n, "{reply}");
        assert_eq!(reply["result"]["square"], n * n, "{reply}");
    }
    // A method no handler registered: unavailable, not a hang.
    let reply = rpc(&mut clients[0], 100, "chat.send", json!({}));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    // An answer to a call nobody is waiting for is an error reply.
    let id = handler.answer(999_999, &json!({"result": 1}));
    let error = handler.reply(id).expect_err("unknown call");
    assert!(error.contains("no call 999999"), "{error}");
}

#[test]
fn handler_errors_timeouts_and_disconnects_reach_the_client_plainly() {
    let server =
        Server::start(2, "[metrics]\nlisten = \"127.0.0.1:0\"\n[rpc]\nadmin_handlers = true\ntimeout_ms = 400\n");
    let mut handler = AdminHandler::connect(&server);
    handler.handle(&[""]).expect("HANDLE accepted");
    let mut client = server.client();

    client.send(json!({"op": "rpc", "method": "app.refuse", "id": 1}));
    let (call_id, _) = handler.next_call();
    handler.answer(call_id, &json!({"error": {"code": 42, "message": "nope"}}));
    let reply = client.recv();
    assert_eq!(reply["error"]["code"], "backend_error", "{reply}");
    assert_eq!(reply["error"]["backend_code"], 42);
    assert_eq!(reply["error"]["message"], "nope");

    // Not answered in rpc.timeout_ms: timeout; the late answer is refused.
    let started = Instant::now();
    client.send(json!({"op": "rpc", "method": "app.slow", "id": 2}));
    let (late_call, _) = handler.next_call();
    let reply = client.recv();
    assert_eq!(reply["error"]["code"], "timeout", "{reply}");
    assert!(started.elapsed() < Duration::from_millis(2000), "bounded by rpc.timeout_ms");
    let id = handler.answer(late_call, &json!({"result": 1}));
    assert!(handler.reply(id).is_err(), "an answer after the timeout is refused");

    // The handler goes away with a call unanswered: unavailable at once.
    client.send(json!({"op": "rpc", "method": "app.pending", "id": 3}));
    handler.next_call();
    let started = Instant::now();
    drop(handler);
    let reply = client.recv();
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    assert!(started.elapsed() < Duration::from_millis(300), "not left to time out");
    // And with no handler left, calls are unavailable, not lost.
    let reply = rpc(&mut client, 4, "app.after", json!({}));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");

    // A second handler takes over.
    let mut handler = AdminHandler::connect(&server);
    handler.handle(&["app."]).expect("HANDLE accepted");
    client.send(json!({"op": "rpc", "method": "app.again", "id": 5}));
    let (call_id, call) = handler.next_call();
    assert_eq!(call["method"], "app.again");
    handler.answer(call_id, &json!({"result": "back"}));
    assert_eq!(client.recv()["result"], "back");
    let scraped = common::scrape_metrics(&server, false);
    let calls = |outcome: &str| {
        common::metric_value(
            &scraped,
            "kometa_backend_calls_total",
            &[("kind", "rpc"), ("via", "handler"), ("outcome", outcome)],
        )
    };
    assert_eq!((calls("ok"), calls("backend_error"), calls("timeout")), (1.0, 1.0, 1.0));
    assert!(calls("unavailable") >= 1.0, "the call the disconnected handler owed");
}

#[test]
fn handlers_share_calls_and_a_longer_webhook_route_wins() {
    let backend = Backend::start(|_| ok(json!("from the webhook")));
    let config = format!(
        "[rpc]\nadmin_handlers = true\ntimeout_ms = 2000\n[[rpc.routes]]\nprefix = \"chat.history.\"\nurl = \"{}\"\n",
        backend.url()
    );
    let server = Server::start(2, &config);
    let mut first = AdminHandler::connect(&server);
    let mut second = AdminHandler::connect(&server);
    first.handle(&["chat."]).expect("HANDLE");
    second.handle(&["chat."]).expect("HANDLE");
    let mut client = server.client();
    // Round robin: of 6 calls, each handler gets 3.
    for id in 0..6 {
        client.send(json!({"op": "rpc", "method": "chat.send", "id": id}));
    }
    // Each must get 3: a handler that got fewer waits for a call here and
    // the read fails after TIMEOUT.
    let mut per_handler = [0, 0];
    for (index, handler) in [&mut first, &mut second].into_iter().enumerate() {
        for _ in 0..3 {
            let (call_id, _) = handler.next_call();
            handler.answer(call_id, &json!({"result": index}));
            per_handler[index] += 1;
        }
    }
    assert_eq!(per_handler, [3, 3], "calls spread over both handlers");
    let mut replies: Vec<u64> = (0..6).map(|_| client.recv()["id"].as_u64().unwrap()).collect();
    replies.sort_unstable();
    assert_eq!(replies, (0..6).collect::<Vec<_>>());
    // The webhook's prefix is longer: it wins for its methods.
    let reply = rpc(&mut client, 10, "chat.history.get", json!({}));
    assert_eq!(reply["result"], "from the webhook", "{reply}");
    assert_eq!(backend.seen().len(), 1);
}

#[test]
fn handle_is_refused_unless_admin_handlers_is_on() {
    let server = Server::start(1, "");
    let mut handler = AdminHandler::connect(&server);
    let error = handler.handle(&["app."]).expect_err("refused");
    assert!(error.contains("rpc.admin_handlers"), "{error}");
    let too_many: Vec<String> = (0..65).map(|n| format!("p{n}.")).collect();
    let server = Server::start(1, "[rpc]\nadmin_handlers = true\n");
    let mut handler = AdminHandler::connect(&server);
    let error = handler.handle(&too_many.iter().map(String::as_str).collect::<Vec<_>>()).expect_err("too many");
    assert!(error.contains("rpc.handler_prefixes_max"), "{error}");
    let error = handler.handle(&["bad prefix"]).expect_err("bad name");
    assert!(error.contains("method prefix"), "{error}");
}

/// A backend's handler loop in a bundled client (Python `serve_rpc`, PHP
/// `serveRpc`), run as its own process the way a backend worker would:
/// `command` gets the admin socket's path as its last argument.
fn a_client_serves_rpc_calls(mut command: std::process::Command, not_json_error: &str) {
    let server = Server::start(2, "[rpc]\nadmin_handlers = true\ntimeout_ms = 5000\n");
    let kometa_admin_client::AdminAddress::Unix(admin_path) = &server.admin else { panic!("a unix admin socket") };
    let mut child = command
        .arg(admin_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("ready"), "the handler registered");
    let mut client = server.client();
    let reply = rpc(&mut client, 1, "math.add", json!([1, 2, 3]));
    assert_eq!(reply["result"], json!({"sum": 6, "user": null}), "{reply}");
    let reply = rpc(&mut client, 2, "math.fail", json!([]));
    assert_eq!(reply["error"]["code"], "backend_error", "{reply}");
    assert_eq!(reply["error"]["backend_code"], 7);
    assert_eq!(reply["error"]["message"], "cannot");
    // A result that is not JSON: error 500, and the loop goes on.
    let reply = rpc(&mut client, 3, "math.bad", json!([]));
    assert_eq!(reply["error"]["code"], "backend_error", "{reply}");
    assert_eq!(reply["error"]["backend_code"], 500);
    assert!(reply["error"]["message"].as_str().is_some_and(|m| m.starts_with(not_json_error)), "{reply}");
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("answered 3"));
    assert!(child.wait().expect("the handler exits").success());
    // Its connection closed: the method has no handler any more.
    let reply = rpc(&mut client, 4, "math.add", json!([1]));
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
}

#[test]
fn the_python_client_serves_rpc_calls_on_its_admin_connection() {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = repo.join(".venv/bin/python");
    let python = if venv.is_file() { venv } else { std::path::PathBuf::from("python3") };
    let script = r#"
import sys
sys.path.insert(0, sys.argv[1])
from kometa_admin import KometaAdmin, RpcError

def handle(call):
    if call["method"] == "math.fail":
        raise RpcError(7, "cannot")
    if call["method"] == "math.bad":
        return {1, 2}  # a set is not JSON
    return {"sum": sum(call["data"]), "user": call["user"]}

admin = KometaAdmin("unix:" + sys.argv[2])
answered = admin.serve_rpc(["math."], handle, max_calls=3, ready=lambda: print("ready", flush=True))
print("answered", answered, flush=True)
"#;
    let mut command = std::process::Command::new(python);
    command.arg("-c").arg(script).arg(repo.join("client/python"));
    a_client_serves_rpc_calls(command, "TypeError");
}

#[test]
fn the_php_client_serves_rpc_calls_on_its_admin_connection() {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = r#"<?php
require $argv[1];
$admin = new KometaAdmin('unix:' . $argv[2]);
$answered = $admin->serveRpc(['math.'], function (array $call) {
    if ($call['method'] === 'math.fail') {
        throw new KometaRpcError('cannot', 7);
    }
    if ($call['method'] === 'math.bad') {
        return INF; // not JSON
    }
    return ['sum' => array_sum($call['data']), 'user' => $call['user']];
}, 3, function () {
    echo "ready\n";
});
echo "answered $answered\n";
"#;
    let dir = common::temp_dir("php-handler");
    let file = dir.join("handler.php");
    std::fs::write(&file, script).expect("write the PHP handler");
    let mut command = std::process::Command::new("php");
    command.arg(&file).arg(repo.join("client/php/KometaAdmin.php"));
    a_client_serves_rpc_calls(command, "JsonException");
}

#[test]
fn calls_carry_the_connections_token_claims() {
    const SECRET: &str = "rpc-test-secret-0123456789";
    // The backend answers with the claims it was given.
    let backend = Backend::start(|request| ok(request["claims"].clone()));
    let config = format!("token_secret = \"{SECRET}\"\n{}", rpc_config(&backend.url(), ""));
    let server = Server::start(2, &config);
    let now = kometa::util::unix_time_ms() / 1000;
    let info = json!({"name": "Alice", "roles": ["admin"]});
    let token = sign(
        SECRET,
        &json!({"sub": "alice", "iat": now, "exp": now + 3600, "channels": ["private_a", "team_*"], "info": info}),
    );
    let mut alice = server.client_at(&format!("/ws?token={token}"));
    let claims = rpc(&mut alice, 1, "whoami", json!(null))["result"].clone();
    assert_eq!(
        claims,
        json!({"sub": "alice", "exp": now + 3600, "iat": now, "channels": ["private_a", "team_*"], "info": info})
    );
    let mut anonymous = server.client();
    assert_eq!(rpc(&mut anonymous, 1, "whoami", json!(null))["result"], Value::Null);
    assert_eq!(backend.seen()[0]["user"], "alice");
}
