//! Test harness: runs the real `kometa` binary on 127.0.0.1:0 with a
//! private admin socket, and gives tests real clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kometa_admin_client::AdminAddress;
use kometa_admin_client::AdminClient;
use serde_json::Value;
use tungstenite::{Message, WebSocket};

pub const TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh private directory for one server.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kometa-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub admin: AdminAddress,
    pub dir: PathBuf,
    /// Lines the server wrote to stderr (its log), collected in the background.
    pub log: mpsc::Receiver<String>,
    /// The ready line the server printed on stdout.
    pub ready: String,
}

impl Server {
    /// Starts a server with `--shards shards` and extra TOML config.
    pub fn start(shards: usize, config: &str) -> Server {
        Server::start_with(shards, config, &[])
    }

    pub fn start_with(shards: usize, config: &str, extra_args: &[&str]) -> Server {
        let dir = temp_dir("server");
        let config_path = dir.join("kometa.toml");
        std::fs::write(&config_path, config).expect("write config");
        let admin_path = dir.join("admin.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kometa"));
        command.arg("serve").arg("--config").arg(&config_path);
        // Tests that share one address between processes pass --listen themselves.
        if !extra_args.contains(&"--listen") {
            command.arg("--listen").arg("127.0.0.1:0");
        }
        // Tests that choose their own admin listener pass --admin themselves.
        if !extra_args.contains(&"--admin") {
            command.arg("--admin").arg(format!("unix:{}", admin_path.display()));
        }
        let mut child = command
            .arg("--shards")
            .arg(shards.to_string())
            .args(extra_args)
            .env("KOMETA_LOG", std::env::var("KOMETA_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("KOMETA_CONFIG")
            .env_remove("KOMETA_ADMIN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kometa");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (log_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("KOMETA_TEST_ECHO_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
                if log_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = ready_tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = ready_rx.recv_timeout(TIMEOUT).expect("server did not print its ready line");
        let listen = line.split_whitespace().find_map(|w| w.strip_prefix("listen=")).expect("listen= in ready line");
        let port = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        Server { child: Some(child), port, admin: AdminAddress::Unix(admin_path), dir, log, ready: line }
    }

    /// A handle to a server started elsewhere (for worker threads); it
    /// neither stops the server nor removes its files when dropped.
    pub fn view(port: u16, admin: AdminAddress) -> Server {
        Server { child: None, port, admin, dir: PathBuf::new(), log: mpsc::channel().1, ready: String::new() }
    }

    /// The port of an optional listener named in the ready line
    /// (`metrics=ADDR:PORT`, `api=ADDR:PORT`).
    pub fn listener_port(&self, name: &str) -> u16 {
        let prefix = format!("{name}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in the ready line: {}", self.ready))
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.admin, None, TIMEOUT).expect("admin connect")
    }

    /// A WebSocket client on /ws.
    pub fn client(&self) -> Client {
        self.client_at("/ws")
    }

    pub fn client_at(&self, path: &str) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("tcp connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        match tungstenite::client::client(self.url(path), stream) {
            Ok((socket, _)) => Client { socket },
            Err(error) => {
                // A refused handshake is rare and load-dependent: say what the server logged.
                std::thread::sleep(Duration::from_millis(200));
                let log: Vec<String> = self.log.try_iter().collect();
                panic!("websocket handshake: {error:?}; server log:\n{}", log.join("\n"))
            }
        }
    }

    pub fn tcp(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("tcp connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream
    }

    pub fn stats(&self) -> Value {
        self.admin().stats().expect("stats")
    }

    pub fn publish(&self, channel: &str, event: &str, data: &str) -> kometa_admin_client::Published {
        self.admin().publish(channel, event, data.as_bytes()).expect("publish")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for the server to exit (after a signal sent elsewhere).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `check(stats)` holds (stats are gathered asynchronously).
    pub fn wait_stats(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let stats = self.stats();
            if check(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {stats}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A WebSocket client speaking the client protocol.
pub struct Client {
    pub socket: WebSocket<TcpStream>,
}

impl Client {
    pub fn send(&mut self, value: Value) {
        self.socket.send(Message::Text(value.to_string().into())).expect("send");
    }

    /// The next JSON message (pings are answered by tungstenite).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.socket.read().expect("read") {
                Message::Text(text) => return serde_json::from_str(&text).expect("server sent JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Sends a command and returns its reply (the next message).
    pub fn request(&mut self, value: Value) -> Value {
        self.send(value);
        self.recv()
    }

    pub fn subscribe(&mut self, channel: &str) -> Value {
        let reply = self.request(serde_json::json!({"op": "subscribe", "channel": channel, "id": 1}));
        assert_eq!(reply["ok"], true, "subscribe {channel}: {reply}");
        reply
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.socket.get_mut().set_read_timeout(Some(timeout)).expect("timeout");
    }

    /// The close frame's code, reading past any data messages.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.socket.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Performs a WebSocket handshake over a raw socket, for tests that send
/// malformed frames. Returns the stream positioned after the 101 response.
pub fn raw_websocket(server: &Server) -> TcpStream {
    let mut stream = server.tcp();
    stream
        .write_all(format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.port
        ).as_bytes())
        .expect("write handshake");
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A WebSocket subscribed to `channel` that never reads: a raw socket with
/// a small receive buffer, so its outbox fills fast (slow-consumer tests).
pub fn slow_subscriber(server: &Server, channel: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], server.port)).into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    assert!(read_http_head(&mut stream).starts_with("HTTP/1.1 101"));
    let subscribe = serde_json::json!({"op": "subscribe", "channel": channel, "id": 1}).to_string();
    stream.write_all(&client_frame(0x81, subscribe.as_bytes())).unwrap();
    let (_, reply) = read_server_frame(&mut stream).unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("\"ok\":true"));
    stream
}

/// Reads up to the end of an HTTP response head, byte by byte.
pub fn read_http_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends a raw request and returns the whole response (until the server closes).
pub fn http_exchange(server: &Server, request: &[u8]) -> String {
    let mut stream = server.tcp();
    stream.write_all(request).expect("write request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// A masked client frame.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    kometa_protocol::ws::encode_client_frame(first_byte, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// One server frame: (opcode, payload). None at end of stream.
pub fn read_server_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    assert_eq!(head[1] & 0x80, 0, "server frames must not be masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((head[0] & 0x0f, payload))
}

/// Reads frames until a close frame; returns its code (None: stream ended without one).
pub fn read_close_code(stream: &mut TcpStream) -> Option<u16> {
    while let Some((opcode, payload)) = read_server_frame(stream) {
        if opcode == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
    None
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
        })
    }
}

/// One request on a fresh connection (`Connection: close`), whole response.
pub fn http(server: &Server, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    http_at(server.port, method, target, headers, body)
}

/// `http` to another listener of the server (metrics, HTTP API).
pub fn http_at(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("tcp connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write request");
    stream.write_all(body).expect("write body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    parse_response(&response)
}

/// Splits a whole response into status, head and body.
pub fn parse_response(response: &[u8]) -> HttpResponse {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    HttpResponse { status, head, body: response[split + 4..].to_vec() }
}

/// An open SSE stream: the response head, then events as they come.
pub struct SseStream {
    pub head: String,
    reader: BufReader<TcpStream>,
}

/// One SSE event (comments are returned as events with `comment` set).
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Option<Value>,
    pub comment: bool,
}

impl SseStream {
    pub fn open(server: &Server, target: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut stream = server.tcp();
        let mut request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).expect("write request");
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).expect("read head") == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        SseStream { head, reader }
    }

    /// The next event or comment; `None` at end of stream.
    pub fn next(&mut self) -> Option<SseEvent> {
        let mut event = SseEvent { id: None, data: None, comment: false };
        let mut seen = false;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return seen.then_some(event),
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if seen {
                    return Some(event);
                }
                continue;
            }
            seen = true;
            if line.starts_with(':') {
                event.comment = true;
            } else if let Some(id) = line.strip_prefix("id: ") {
                event.id = Some(id.to_string());
            } else if let Some(data) = line.strip_prefix("data: ") {
                event.data = Some(serde_json::from_str(data).expect("SSE data is JSON"));
            }
        }
    }

    /// The next event with data (skipping comments and `retry`).
    pub fn next_data(&mut self) -> (String, Value) {
        loop {
            let event = self.next().expect("stream ended");
            if let (Some(id), Some(data)) = (event.id, event.data) {
                return (id, data);
            }
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.reader.get_ref().set_read_timeout(Some(timeout)).expect("timeout");
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A private redis-server on a free port. Tests that need Redis fail (never
/// skip) when it cannot start: `scripts/install-test-deps.sh` installs it.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts (or restarts, after `kill`) on `port`, with no persistence.
    pub fn start_on(port: u16) -> RedisServer {
        let dir = temp_dir("redis");
        let child = RedisServer::spawn(port, &dir);
        let server = RedisServer { child: Some(child), port, dir };
        server.wait_ready();
        server
    }

    /// Restarts on the same port and directory: a snapshot taken with SAVE
    /// is loaded, as after a crash of a Redis with RDB persistence.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(RedisServer::spawn(self.port, &self.dir));
        self.wait_ready();
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); run scripts/install-test-deps.sh"))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if self.command(&["PING"]).is_some_and(|reply| reply.contains("PONG")) {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command in RESP; the raw reply text (None when unreachable).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = vec![0u8; 65536];
        let n = stream.read(&mut reply).ok()?;
        Some(String::from_utf8_lossy(&reply[..n]).into_owned())
    }

    /// SIGKILL: Redis goes away without a word, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `[cluster]` section for a test node: quick heartbeats and timeouts.
pub fn cluster_config(redis: &[&RedisServer], node_id: &str) -> String {
    let urls: Vec<String> = redis.iter().map(|r| format!("\"{}\"", r.url())).collect();
    format!(
        "[cluster]\nredis = [{}]\nnode_id = \"{node_id}\"\nheartbeat_interval_ms = 200\nnode_timeout_ms = 1000\n\
         request_timeout_ms = 2000\nconnect_timeout_ms = 1000\nreconnect_backoff_max_ms = 300\n",
        urls.join(", ")
    )
}

/// Waits until `check()` holds, polling.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---- /metrics, parsed by the Prometheus project's Python parsers ----

const INSTALL_HINT: &str = "run scripts/install-test-deps.sh (it installs prometheus_client into .venv)";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    let venv = repo().join(".venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Scrapes `/metrics` (`metrics.listen`) and parses it with the Python parser for the format
/// the server chose (OpenMetrics when asked for, else Prometheus text).
pub fn scrape_metrics(server: &Server, openmetrics: bool) -> Value {
    let accept = if openmetrics { "application/openmetrics-text; version=1.0.0" } else { "text/plain" };
    let response = http_at(server.listener_port("metrics"), "GET", "/metrics", &[("Accept", accept)], b"");
    assert_eq!(response.status, 200, "{}", response.head);
    let content_type = response.header("Content-Type").unwrap_or_default();
    let expected = if openmetrics { "application/openmetrics-text" } else { "text/plain; version=0.0.4" };
    assert!(content_type.starts_with(expected), "{content_type}");
    let mut child = Command::new(python())
        .arg(repo().join("tests/parse_metrics.py"))
        .arg(if openmetrics { "openmetrics" } else { "prometheus" })
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} ({e}); {INSTALL_HINT}", python().display()));
    child.stdin.take().expect("stdin").write_all(&response.body).expect("write the scrape");
    let output = child.wait_with_output().expect("parser");
    assert!(
        output.status.success(),
        "the Prometheus parser refused the scrape ({INSTALL_HINT} if prometheus_client is missing):\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&response.body)
    );
    serde_json::from_slice(&output.stdout).expect("parser output")
}

/// The sum of the samples called `sample` whose labels include `labels`.
pub fn metric_value(metrics: &Value, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let mut found = false;
    let mut sum = 0.0;
    for family in metrics.as_object().expect("families").values() {
        for entry in family["samples"].as_array().expect("samples") {
            if entry[0] != sample {
                continue;
            }
            if labels.iter().all(|(name, expected)| entry[1][*name] == *expected) {
                found = true;
                sum += entry[2].as_f64().expect("a number");
            }
        }
    }
    assert!(found, "no sample {sample} with {labels:?}");
    sum
}

/// A test CA and a certificate it signed for `localhost` and `127.0.0.1`,
/// as PEM files in `dir`.
pub struct Pki {
    pub ca_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub fn pki(dir: &std::path::Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Its own name: a leaf whose issuer reads like its subject looks self-signed to OpenSSL.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Kometa test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    // A name and an address: admin listeners are reached by address.
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let leaf_params = rcgen::CertificateParams::new(names).expect("leaf params");
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).expect("leaf");
    std::fs::create_dir_all(dir).expect("pki dir");
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    // The chain as servers ship it: leaf, then the CA.
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem())).expect("write cert");
    std::fs::write(&key_file, leaf_key.serialize_pem()).expect("write key");
    Pki { ca_pem: ca.pem(), cert_file, key_file }
}
