//! SockJS and Jii-comet over real sockets: the SockJS conformance tests
//! (tests/sockjs/test_protocol.py) against real servers, the client
//! protocol inside SockJS messages on every transport kind, the Jii-comet
//! text protocol at /comet, and the limits, with sessions on several shards.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::{http, Server};
use kometa_protocol::token::sign;
use serde_json::{json, Value};
use tungstenite::Message;

const SECRET: &str = "test-secret-0123456789";

fn config(extra: &str) -> String {
    format!("token_secret = \"{SECRET}\"\n{extra}")
}

fn token(user: &str) -> String {
    let now_s = kometa::util::unix_time_ms() / 1000;
    sign(SECRET, &json!({"sub": user, "iat": now_s, "exp": now_s + 3600}))
}

/// A SockJS frame as a client sees it.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Open,
    Heartbeat,
    Messages(Vec<String>),
    Close(u16, String),
}

fn frame(text: &str) -> Frame {
    match text.as_bytes().first() {
        Some(b'o') if text == "o" => Frame::Open,
        Some(b'h') if text == "h" => Frame::Heartbeat,
        Some(b'a') => Frame::Messages(serde_json::from_str(&text[1..]).unwrap_or_else(|e| panic!("{e}: {text}"))),
        Some(b'c') => {
            let (code, reason): (u16, String) = serde_json::from_str(&text[1..]).expect("c[code,reason]");
            Frame::Close(code, reason)
        }
        _ => panic!("not a SockJS frame: {text:?}"),
    }
}

fn session_url(prefix: &str, sid: &str) -> String {
    format!("{prefix}/000/{sid}")
}

/// One xhr poll: its frames.
fn xhr(server: &Server, url: &str) -> Vec<Frame> {
    let response = http(server, "POST", &format!("{url}/xhr"), &[], b"");
    assert_eq!(response.status, 200, "{url}/xhr: {}", String::from_utf8_lossy(&response.body));
    String::from_utf8(response.body).expect("UTF-8").lines().map(frame).collect()
}

/// Polls until messages come (a heartbeat, at most one, is skipped).
fn xhr_messages(server: &Server, url: &str) -> Vec<String> {
    for _ in 0..2 {
        for frame in xhr(server, url) {
            match frame {
                Frame::Messages(messages) => return messages,
                Frame::Heartbeat => {}
                other => panic!("{url}: expected messages, got {other:?}"),
            }
        }
    }
    panic!("{url}: no messages came");
}

fn xhr_send(server: &Server, url: &str, messages: &[&str]) -> u16 {
    let body = serde_json::to_vec(messages).expect("JSON");
    http(server, "POST", &format!("{url}/xhr_send"), &[], &body).status
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A client of the SockJS websocket transport.
struct SockJsSocket {
    client: common::Client,
    queued: VecDeque<String>,
}

impl SockJsSocket {
    fn open(server: &Server, path: &str) -> SockJsSocket {
        let mut socket = SockJsSocket { client: server.client_at(path), queued: VecDeque::new() };
        assert_eq!(socket.frame(), Frame::Open);
        socket
    }

    fn frame(&mut self) -> Frame {
        loop {
            match self.client.socket.read().expect("read") {
                Message::Text(text) => return frame(&text),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn send(&mut self, messages: &[&str]) {
        let text = serde_json::to_string(messages).expect("JSON");
        self.client.socket.send(Message::Text(text.into())).expect("send");
    }

    /// The next message (from `a[…]` frames; heartbeats skipped).
    fn message(&mut self) -> String {
        loop {
            if let Some(message) = self.queued.pop_front() {
                return message;
            }
            match self.frame() {
                Frame::Messages(messages) => self.queued.extend(messages),
                Frame::Heartbeat => {}
                other => panic!("expected messages, got {other:?}"),
            }
        }
    }

    fn json(&mut self) -> Value {
        json(&self.message())
    }

    /// A client protocol command and its reply.
    fn request(&mut self, command: Value) -> Value {
        self.send(&[&command.to_string()]);
        self.json()
    }
}

/// A streaming response read chunk by chunk (one frame per chunk).
struct ChunkStream {
    reader: BufReader<TcpStream>,
}

impl ChunkStream {
    fn open(server: &Server, method: &str, path: &str) -> ChunkStream {
        let mut stream = server.tcp();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("write");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
        ChunkStream { reader }
    }

    /// The next chunk as text; None at the end of the body.
    fn chunk(&mut self) -> Option<String> {
        let mut size = String::new();
        self.reader.read_line(&mut size).expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
        let mut data = vec![0; size + 2];
        std::io::Read::read_exact(&mut self.reader, &mut data).expect("chunk");
        if size == 0 {
            return None;
        }
        data.truncate(size);
        Some(String::from_utf8(data).expect("UTF-8"))
    }
}

// -- The conformance tests -----------------------------------------------

#[test]
fn sockjs_protocol_conformance() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/install-test-deps.sh", python.display());
    // The services the tests expect, with the 4 KiB response limit they
    // assume; a second server beats every 300 ms for the heartbeat tests.
    let server = Server::start(
        2,
        "[sockjs]\ntest_services = true\nresponse_limit_bytes = 4096\n[timeouts]\nsession_grace_ms = 5000\n",
    );
    let beating = Server::start(
        2,
        "[sockjs]\ntest_services = true\nheartbeat_interval_ms = 300\n[timeouts]\nsweep_interval_ms = 100\n",
    );
    let output = Command::new(&python)
        .arg(root.join("tests/sockjs/test_protocol.py"))
        .arg("-v")
        .env("SOCKJS_URL", format!("http://127.0.0.1:{}", server.port))
        .env("SOCKJS_HEARTBEAT_URL", format!("http://127.0.0.1:{}", beating.port))
        .output()
        .expect("run the SockJS conformance tests");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SockJS conformance tests failed:\n{report}");
    assert!(!report.contains("skipped"), "no conformance test may be skipped:\n{report}");
    let ran = report.lines().find(|line| line.starts_with("Ran ")).unwrap_or("");
    eprintln!("sockjs conformance: {ran}");
}

// -- The client protocol inside SockJS messages ------------------------------

#[test]
fn client_protocol_over_the_websocket_transport() {
    let server = Server::start(2, &config(""));
    let mut alice = SockJsSocket::open(&server, &format!("/sockjs/000/a1/websocket?token={}", token("alice")));
    let mut anonymous = SockJsSocket::open(&server, "/sockjs/123/b2/websocket");
    let reply = alice.request(json!({"op": "subscribe", "channel": "news", "id": 1}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(anonymous.request(json!({"op": "subscribe", "channel": "web_chat", "id": "s"}))["ok"], true);
    assert_eq!(alice.request(json!({"op": "subscribe", "channel": "web_chat", "id": 2}))["ok"], true);

    // A backend publication, as the client protocol's push.
    server.publish("news", "update", r#"{"title":"a \"quoted\" \u2028 title"}"#);
    let push = alice.json();
    assert_eq!(push["channel"], "news");
    assert_eq!(push["offset"], 1);
    assert_eq!(push["data"]["title"], "a \"quoted\" \u{2028} title");

    // A client publication carries the sender's user id.
    let published = alice.request(json!({"op": "publish", "channel": "web_chat", "data": {"text": "hi"}, "id": 3}));
    assert_eq!(published["ok"], true, "{published}");
    let push = alice.json();
    assert_eq!((push["channel"].as_str(), push["user"].as_str()), (Some("web_chat"), Some("alice")));
    let push = anonymous.json();
    assert_eq!(push["data"]["text"], "hi");
    let refused = anonymous.request(json!({"op": "publish", "channel": "news", "data": 1, "id": 4}));
    assert_eq!(refused["error"]["code"], "forbidden");

    // Several commands in one frame run in order.
    anonymous.send(&[r#"{"op":"ping","id":10}"#, r#"{"op":"ping","id":11}"#, "not json"]);
    assert_eq!(anonymous.json()["id"], 10);
    assert_eq!(anonymous.json()["id"], 11);
    assert_eq!(anonymous.json()["error"]["code"], "bad_request");

    // Resume from channel history.
    let resumed = anonymous.request(json!({"op": "subscribe", "channel": "news", "id": 5,
        "since": {"epoch": reply["epoch"], "offset": 0}}));
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(anonymous.json()["offset"], 1);

    // `disconnect` ends the session with a close frame, then the socket.
    anonymous.send(&[r#"{"op":"disconnect","id":6}"#]);
    assert_eq!(anonymous.json()["ok"], true);
    assert_eq!(anonymous.frame(), Frame::Close(1000, "disconnected by the client".into()));
    server.wait_stats("sessions gone", |stats| stats["http_sessions"].as_u64() == Some(1));
    drop(alice);
    server.wait_stats("sessions gone", |stats| stats["http_sessions"].as_u64() == Some(0));
}

#[test]
fn client_protocol_over_xhr_polling_on_every_shard() {
    // Sessions live on the shard their id hashes to: with 4 shards most
    // requests arrive on another one and are handed over.
    let server = Server::start(4, &config(""));
    let urls: Vec<String> = (0..12).map(|n| session_url("/sockjs", &format!("poll{n}"))).collect();
    for url in &urls {
        assert_eq!(xhr(&server, url), vec![Frame::Open]);
        assert_eq!(xhr_send(&server, url, &[r#"{"op":"subscribe","channel":"news","id":1}"#]), 204);
        let reply = json(&xhr_messages(&server, url)[0]);
        assert_eq!(reply["ok"], true, "{reply}");
    }
    let published = server.publish("news", "update", "{\"n\":1}");
    assert_eq!(published.subscribers, urls.len() as u64);
    for url in &urls {
        let push = json(&xhr_messages(&server, url)[0]);
        assert_eq!(push["data"]["n"], 1, "{url}: {push}");
    }
    // Any polling transport serves the session: jsonp too.
    server.publish("news", "update", "{\"n\":2}");
    let jsonp = http(&server, "GET", &format!("{}/jsonp?c=cb", urls[0]), &[], b"");
    let body = String::from_utf8_lossy(&jsonp.body);
    assert!(body.starts_with("/**/cb(\"a[") && body.contains(r#"\\\"n\\\":2"#), "{body}");
}

#[test]
fn pushes_reach_streaming_transports() {
    let server = Server::start(2, &config(""));
    for (n, (method, transport, open)) in [
        ("POST", "xhr_streaming", "o\n"),
        ("GET", "eventsource", "data: o\r\n\r\n"),
        ("GET", "htmlfile?c=cb", "<script>\np(\"o\");\n</script>\r\n"),
    ]
    .into_iter()
    .enumerate()
    {
        let url = session_url("/sockjs", &format!("stream{n}"));
        let mut stream = ChunkStream::open(&server, method, &format!("{url}/{transport}"));
        stream.chunk().expect("prelude");
        assert_eq!(stream.chunk().as_deref(), Some(open));
        assert_eq!(xhr_send(&server, &url, &[r#"{"op":"subscribe","channel":"live","id":1}"#]), 204);
        assert!(stream.chunk().expect("reply").contains("ok"));
        server.publish("live", "tick", "{\"v\":42}");
        let piece = stream.chunk().expect("push");
        assert!(piece.contains("tick") && piece.contains("42"), "{transport}: {piece}");
        assert_eq!(xhr_send(&server, &url, &[r#"{"op":"disconnect"}"#]), 204);
        assert!(stream.chunk().expect("reply").contains("ok"));
        assert!(stream.chunk().expect("close").contains("disconnected by the client"));
        assert_eq!(stream.chunk(), None, "{transport}: the stream ends with the session");
    }
}

#[test]
fn a_bad_token_opens_then_closes_the_session() {
    let server = Server::start(1, &config(""));
    let url = "/sockjs/000/badtoken";
    let response = http(&server, "POST", &format!("{url}/xhr?token=forged"), &[], b"");
    assert_eq!(String::from_utf8_lossy(&response.body), "o\n");
    let response = http(&server, "POST", &format!("{url}/xhr?token=forged"), &[], b"");
    let frames: Vec<Frame> = String::from_utf8_lossy(&response.body).lines().map(frame).collect();
    assert!(matches!(&frames[..], [Frame::Close(4001, _)]), "{frames:?}");

    let mut socket = SockJsSocket::open(&server, "/sockjs/000/ws/websocket?token=forged");
    assert!(matches!(socket.frame(), Frame::Close(4001, _)));
    assert_eq!(socket.client.close_code(), Some(4001));
}

// -- Jii-comet ---------------------------------------------------------------

/// A Jii-comet client on the websocket transport.
fn jii(server: &Server, sid: &str) -> SockJsSocket {
    SockJsSocket::open(server, &format!("/comet/000/{sid}/websocket"))
}

/// Commands run in order, and `unsubscribe` of a channel never subscribed
/// answers an error: once it comes, everything sent before has run.
fn jii_sync(client: &mut SockJsSocket) {
    client.send(&["unsubscribe sync-marker"]);
    let line = client.message();
    assert!(line.starts_with("error ") && line.contains("not_subscribed"), "{line}");
}

#[test]
fn jii_comet_over_sockjs() {
    let server = Server::start(2, &config(""));
    let mut first = jii(&server, "j1");
    let mut second = jii(&server, "j2");
    let mut kometa = server.client();
    kometa.subscribe("web_chat");
    first.send(&["subscribe news", "subscribe web_chat"]);
    jii_sync(&mut first);
    second.send(&["subscribe web_chat"]);
    jii_sync(&mut second);

    // A backend publication.
    server.publish("news", "update", r#"{"x":1}"#);
    assert_eq!(first.message(), r#"channel news {"x":1}"#);

    // A client publication reaches Jii clients as it was sent, and the
    // client protocol as JSON.
    second.send(&["channel web_chat hello world"]);
    assert_eq!(first.message(), "channel web_chat hello world");
    assert_eq!(second.message(), "channel web_chat hello world");
    let push = kometa.recv();
    assert_eq!((push["channel"].as_str(), push["data"].as_str()), (Some("web_chat"), Some("hello world")));
    second.send(&[r#"channel web_chat {"text":"json"}"#]);
    assert_eq!(first.message(), r#"channel web_chat {"text":"json"}"#);
    assert_eq!(kometa.recv()["data"]["text"], "json");

    // Client publish follows the namespace's rules.
    first.send(&["channel news not allowed"]);
    let refused = first.message();
    assert!(refused.starts_with("error "), "{refused}");
    let refused = json(&refused[6..]);
    assert_eq!((refused["code"].as_str(), refused["command"].as_str()), (Some("forbidden"), Some("channel")));

    // An action is answered with its requestUid.
    first.send(&[r#"action site/echo {"q":1,"requestUid":"r-17"}"#]);
    let answer = first.message();
    assert!(answer.starts_with("action "), "{answer}");
    let answer = json(&answer[7..]);
    assert_eq!(answer["requestUid"], "r-17");
    assert_eq!(answer["error"], "rpc_unavailable");

    // Unsubscribed channels stop.
    // (The subscriber count a publication reports follows an unsubscribe
    // through the bus, so it may still count it: what matters is delivery.)
    first.send(&["unsubscribe news"]);
    jii_sync(&mut first);
    server.publish("news", "update", "2");
    server.publish("web_chat", "update", r#""after""#);
    assert_eq!(first.message(), "channel web_chat after");
    assert_eq!(kometa.recv()["data"], "after");
    first.send(&["hello"]);
    assert!(first.message().contains("unknown_command"));
}

#[test]
fn jii_comet_over_xhr_polling_and_a_raw_websocket() {
    let server = Server::start(2, &config(""));
    let url = session_url("/comet", "jx");
    assert_eq!(xhr(&server, &url), vec![Frame::Open]);
    assert_eq!(xhr_send(&server, &url, &["subscribe web_room", "unsubscribe sync-marker"]), 204);
    assert!(xhr_messages(&server, &url)[0].contains("not_subscribed"));
    server.publish("web_room", "message", r#""plain text""#);
    assert_eq!(xhr_messages(&server, &url), vec!["channel web_room plain text".to_string()]);
    assert_eq!(xhr_send(&server, &url, &[r#"action a/b {"requestUid":7}"#]), 204);
    let answer = &xhr_messages(&server, &url)[0];
    assert!(answer.starts_with(r#"action {"requestUid":"7","error":"rpc_unavailable""#), "{answer}");

    // `/comet/websocket`: one Jii line per WebSocket message, no SockJS frames.
    let mut raw = server.client_at("/comet/websocket");
    let line = |raw: &mut common::Client| loop {
        match raw.socket.read().expect("read") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    for text in ["subscribe web_room", "unsubscribe sync-marker"] {
        raw.socket.send(Message::Text(text.into())).expect("send");
    }
    assert!(line(&mut raw).contains("not_subscribed"));
    server.publish("web_room", "message", r#"{"n":1}"#);
    assert_eq!(line(&mut raw), r#"channel web_room {"n":1}"#);
}

// -- Limits ------------------------------------------------------------------

#[test]
fn sessions_are_bounded() {
    let server = Server::start(1, "[sockjs]\nsessions_max = 2\n");
    assert_eq!(xhr(&server, "/sockjs/0/one"), vec![Frame::Open]);
    assert_eq!(xhr(&server, "/sockjs/0/two"), vec![Frame::Open]);
    let refused = http(&server, "POST", "/sockjs/0/three/xhr", &[], b"");
    assert_eq!(refused.status, 503);
    assert!(String::from_utf8_lossy(&refused.body).contains("sockjs.sessions_max"));
    // Existing sessions go on.
    assert_eq!(xhr_send(&server, "/sockjs/0/one", &[r#"{"op":"ping","id":1}"#]), 204);
    assert_eq!(json(&xhr_messages(&server, "/sockjs/0/one")[0])["ok"], true);
}

#[test]
fn waiting_messages_are_bounded() {
    let server = Server::start(1, "[sockjs]\npending_messages_max = 2\n");
    let url = "/sockjs/0/pending";
    assert_eq!(xhr(&server, url), vec![Frame::Open]);
    // Two sends in one write: the first's subscribe waits for its channel
    // owner's reply while the second arrives, so 1 + 2 messages would wait.
    let body = br#"["{\"op\":\"subscribe\",\"channel\":\"a\",\"id\":1}","{\"op\":\"ping\",\"id\":2}"]"#;
    let send = |body: &[u8]| {
        let mut request =
            format!("POST {url}/xhr_send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        request.extend_from_slice(body);
        request
    };
    let mut stream = server.tcp();
    let mut both = send(body);
    both.extend_from_slice(&send(br#"["{\"op\":\"ping\",\"id\":3}","{\"op\":\"ping\",\"id\":4}"]"#));
    stream.write_all(&both).expect("write");
    let mut reader = BufReader::new(stream);
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read") > 0, "connection closed");
        if let Some(status) = line.strip_prefix("HTTP/1.1 ") {
            statuses.push(status[..3].to_string());
        }
    }
    assert_eq!(statuses, ["204", "429"]);
    // What was taken runs; nothing of it is lost.
    let mut replies = Vec::new();
    while replies.len() < 2 {
        replies.extend(xhr_messages(&server, url).iter().map(|m| json(m)["id"].clone()));
    }
    assert_eq!(replies, [json!(1), json!(2)]);
    // More messages in one payload than may wait is refused outright.
    let response = http(&server, "POST", &format!("{url}/xhr_send"), &[], br#"["a","b","c"]"#);
    assert_eq!(response.status, 500);
}

#[test]
fn a_websocket_that_sends_faster_than_its_session_runs_loses_nothing() {
    let server = Server::start(2, "[sockjs]\npending_messages_max = 2\n");
    let mut socket = SockJsSocket::open(&server, "/sockjs/0/fast/websocket");
    for n in 0..50 {
        let channel = format!("{{\"op\":\"subscribe\",\"channel\":\"c{n}\",\"id\":{n}}}");
        socket.send(&[&channel, &format!("{{\"op\":\"ping\",\"id\":\"p{n}\"}}")]);
    }
    for n in 0..50 {
        let reply = socket.json();
        assert_eq!((reply["id"].clone(), reply["ok"].clone()), (json!(n), json!(true)), "{reply}");
        assert_eq!(socket.json()["id"], format!("p{n}"));
    }
}

#[test]
fn a_session_whose_buffer_overflows_is_closed() {
    let server = Server::start(1, "[limits]\nsession_buffer_messages_max = 4\n");
    let url = "/sockjs/0/slow";
    assert_eq!(xhr(&server, url), vec![Frame::Open]);
    assert_eq!(xhr_send(&server, url, &[r#"{"op":"subscribe","channel":"flood","id":1}"#]), 204);
    assert_eq!(json(&xhr_messages(&server, url)[0])["ok"], true);
    // Nobody polls while ten publications come.
    for n in 0..10 {
        server.publish("flood", "tick", &n.to_string());
    }
    let frames = xhr(&server, url);
    assert!(matches!(&frames[..], [Frame::Close(1008, _)]), "{frames:?}");
    assert_eq!(server.publish("flood", "tick", "0").subscribers, 0);
}

#[test]
fn sockjs_can_be_turned_off() {
    let server = Server::start(1, "[sockjs]\nenabled = false\njii_enabled = false\n");
    for path in ["/sockjs/info", "/comet/info", "/echo/info"] {
        assert_eq!(http(&server, "GET", path, &[], b"").status, 404, "{path}");
    }
    let server = Server::start(1, "[sockjs]\nprefix = \"/rt\"\nwebsocket = false\ncookie_needed = true\n");
    let info = json(&String::from_utf8_lossy(&http(&server, "GET", "/rt/info", &[], b"").body));
    assert_eq!((info["websocket"].as_bool(), info["cookie_needed"].as_bool()), (Some(false), Some(true)));
    let open = http(&server, "POST", "/rt/1/2/xhr", &[("Cookie", "JSESSIONID=lb7")], b"");
    assert_eq!(open.header("set-cookie").as_deref(), Some("JSESSIONID=lb7; path=/"));
    assert_eq!(http(&server, "GET", "/sockjs/info", &[], b"").status, 404);
}

/// A Jii action reaches the backend through `[rpc]` and its result comes
/// back with the requestUid.
#[test]
fn jii_actions_are_answered_by_the_backend() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port();
    let seen = std::thread::spawn(move || {
        let (mut stream, _) = backend.accept().unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        // Until the JSON body is in (its last field closes the object).
        while !String::from_utf8_lossy(&request).trim_end().ends_with('}') {
            let n = std::io::Read::read(&mut stream, &mut buffer).unwrap();
            request.extend_from_slice(&buffer[..n]);
        }
        let body = r#"{"result":{"name":"Ann"}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut stream, response.as_bytes()).unwrap();
        String::from_utf8_lossy(&request).into_owned()
    });
    let rpc = format!("[rpc]\n[[rpc.routes]]\nprefix = \"site/\"\nurl = \"http://127.0.0.1:{port}/rpc\"\n");
    let server = Server::start(2, &config(&rpc));
    let mut client = jii(&server, "a1");
    client.send(&[r#"action site/profile {"id":5,"requestUid":"u-9"}"#]);
    let answer = client.message();
    assert!(answer.starts_with("action "), "{answer}");
    let answer = json(&answer[7..]);
    assert_eq!(answer, json!({"name": "Ann", "requestUid": "u-9"}));
    let request = seen.join().unwrap();
    assert!(request.contains(r#""method":"site/profile""#) && request.contains(r#""id":5"#), "{request}");
}
