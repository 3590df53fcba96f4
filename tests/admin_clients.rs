//! The admin clients in other languages (client/python, client/php) against
//! a real server: each runs a scenario script (client/*/tests/scenario.*)
//! that calls every operation and prints its results as JSON, checked here
//! together with what WebSocket clients received.
//!
//! PHP comes from `scripts/install-test-deps.sh` (through
//! `scripts/install-php.sh`); a missing interpreter fails the test.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Client, Server};
use kometa_protocol::admin::opcode;
use kometa_protocol::token::sign;
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789";
const ADMIN_KEY: &str = "admin-clients-test-key-0123456789";
/// The scripts time out on their own after 10 s of silence per request.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const INSTALL_HINT: &str = "run scripts/install-test-deps.sh (it installs php-cli through scripts/install-php.sh)";

#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Php,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Php => "php",
        }
    }

    /// The project's virtualenv Python when there is one, else python3; php.
    fn interpreter(self) -> PathBuf {
        match self {
            Lang::Python => {
                let venv = repo().join(".venv/bin/python");
                if venv.is_file() {
                    venv
                } else {
                    PathBuf::from("python3")
                }
            }
            Lang::Php => PathBuf::from("php"),
        }
    }

    fn script(self) -> PathBuf {
        match self {
            Lang::Python => repo().join("client/python/tests/scenario.py"),
            Lang::Php => repo().join("client/php/tests/scenario.php"),
        }
    }

    /// Fails (never skips) when the interpreter is missing.
    fn require(self) {
        let interpreter = self.interpreter();
        let probe = match self {
            Lang::Python => Command::new(&interpreter).arg("-c").arg("import sys; print(sys.version)").output(),
            Lang::Php => Command::new(&interpreter).arg("-r").arg("echo PHP_VERSION;").output(),
        };
        match probe {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!(
                "`{}` does not run ({}): {}; {INSTALL_HINT}",
                interpreter.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => panic!("`{}` is not installed ({error}): {INSTALL_HINT}", interpreter.display()),
        }
    }

    /// Runs the scenario script with `args`; returns the JSON it printed.
    fn run(self, args: &[&str]) -> Value {
        self.run_with_env(args, &[])
    }

    fn run_with_env(self, args: &[&str], env: &[(&str, &Path)]) -> Value {
        self.require();
        let child = Command::new(self.interpreter())
            .arg(self.script())
            .args(args)
            .envs(env.iter().copied())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("KOMETA_ADMIN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", self.interpreter().display()));
        let pid = child.id();
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait_with_output());
        });
        let output = match done.recv_timeout(SCRIPT_TIMEOUT) {
            Ok(output) => output.expect("wait for the script"),
            Err(_) => {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("{} scenario {args:?} did not finish in {SCRIPT_TIMEOUT:?}", self.name());
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{} scenario {args:?} failed ({}):\n{stderr}\n{stdout}",
            self.name(),
            output.status
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{} scenario printed no JSON ({e}):\n{stdout}\n{stderr}", self.name()))
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn token(user: &str) -> String {
    let now = kometa::util::unix_time_ms() / 1000;
    sign(SECRET, &json!({"sub": user, "iat": now, "exp": now + 3600}))
}

fn offsets(results: &Value) -> Vec<u64> {
    results
        .as_array()
        .expect("a list of results")
        .iter()
        .map(|r| r["offset"].as_u64().unwrap_or_else(|| panic!("not a publication: {r}")))
        .collect()
}

fn assert_error(result: &Value, code: u64, name: &str) {
    assert_eq!(result["error"]["code"], code, "{result}");
    assert_eq!(result["error"]["name"], name, "{result}");
    assert!(result["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{result}");
}

/// Every operation over the Unix socket, with a subscriber on `news` and
/// user `alice` on the presence channel `track_room`.
fn full_scenario(lang: Lang) {
    lang.require();
    let server = Server::start(2, &format!("token_secret = \"{SECRET}\"\n"));
    let mut subscriber = server.client();
    subscriber.subscribe("news");
    let mut alice = server.client_at(&format!("/ws?token={}", token("alice")));
    alice.subscribe("track_room");
    assert_eq!(alice.recv(), json!({"channel": "track_room", "event": "join", "data": {"user": "alice"}}));
    server.wait_stats("two connections", |s| s["connections"] == 2);

    let out = lang.run(&["unix", &server.admin.to_string()]);
    let who = lang.name();

    assert_eq!(out["ping"], true);
    let epoch = out["publish"]["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    assert_eq!((out["publish"]["offset"].clone(), out["publish"]["subscribers"].clone()), (json!(1), json!(1)));
    let greeting = json!({
        "channel": "news", "event": "greeting", "offset": 1,
        "data": {"from": who, "text": "h\u{e9}llo \"quoted\"\nline", "n": [1, 2.5, null, true]},
    });
    assert_eq!(subscriber.recv(), greeting, "the subscriber gets the publication");
    assert_eq!(out["raw"], json!({"offset": 2, "subscribers": 1, "epoch": epoch}));
    assert_eq!(subscriber.recv(), json!({"channel": "news", "event": "raw", "offset": 2, "data": {"raw": true}}));

    assert_eq!(out["stats"]["connections"], 2, "{}", out["stats"]);
    assert_eq!(out["stats"]["shards"].as_array().map(Vec::len), Some(2), "{}", out["stats"]);
    assert!(out["stats"]["publications"].as_u64() >= Some(2), "{}", out["stats"]);
    assert_eq!(out["stats_node"]["connections"], 2, "{}", out["stats_node"]);

    let seq_of = |n: usize| out["send_user"]["results"][n]["inbox"].as_u64().expect("a sequence");
    assert_eq!(
        out["send_user"],
        json!({"results": [
            {"user": "alice", "delivered": 1, "stored": true, "inbox_full": false, "inbox": seq_of(0)},
            {"user": "nobody", "delivered": 0, "stored": true, "inbox_full": false, "inbox": seq_of(1)},
        ]})
    );
    assert_eq!(alice.recv(), json!({"inbox": seq_of(0), "event": "notice", "data": {"text": "hi"}}));

    assert_eq!(
        out["presence"],
        json!({"channel": "track_room", "members": [{"user": "alice", "connections": 1}], "anonymous": 0, "next": null})
    );
    assert_eq!(out["presence_page"]["members"], json!([{"user": "alice", "connections": 1}]));
    assert_eq!(out["presence_stats"], json!({"channel": "track_room", "users": 1, "connections": 1, "anonymous": 0}));
    assert_eq!(
        out["user_status"],
        json!({"results": [
            {"user": "alice", "status": "online", "connections": 1},
            {"user": "nobody", "status": "unknown"},
        ]})
    );

    let info = &out["channel_info"];
    assert_eq!(
        (info["channel"].clone(), info["exists"].clone(), info["subscribers"].clone()),
        (json!("news"), json!(true), json!(1)),
        "{info}"
    );
    assert_eq!(
        (info["offset"].clone(), info["history"].clone(), info["epoch"].clone()),
        (json!(2), json!(2), json!(epoch))
    );
    assert_eq!(out["channel_info_missing"], json!({"channel": "nowhere", "exists": false, "subscribers": 0}));

    let channels = out["channels"]["channels"].as_array().expect("channels");
    let names: Vec<&str> = channels.iter().map(|c| c["channel"].as_str().unwrap()).collect();
    assert!(names.contains(&"news") && names.contains(&"track_room"), "{}", out["channels"]);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "channels by name: {names:?}");
    assert!(channels.contains(&json!({"channel": "news", "subscribers": 1})), "{}", out["channels"]);
    assert_eq!(out["channels"]["next"], Value::Null);
    let page = &out["channels_page"];
    assert_eq!(page["channels"][0]["channel"], names[0], "{page}");
    assert_eq!(page["next"], names[0], "{page}");
    assert_eq!(out["channels_next"]["channels"][0]["channel"], names[1], "{}", out["channels_next"]);

    let history = &out["history"];
    assert_eq!((history["channel"].clone(), history["offset"].clone()), (json!("news"), json!(2)));
    assert_eq!(history["epoch"], epoch.as_str());
    assert_eq!(history["publications"].as_array().map(Vec::len), Some(2), "{history}");
    assert_eq!(history["publications"][0], greeting, "history holds what subscribers got");
    assert_eq!(out["history_since"]["publications"].as_array().map(Vec::len), Some(1));
    assert_eq!(out["history_since"]["publications"][0]["offset"], 2);

    let batch = offsets(&out["batch"]);
    assert_eq!(batch.len(), 100);
    assert!(batch.windows(2).all(|w| w[1] == w[0] + 1), "pipelined offsets strictly increase by 1: {batch:?}");
    assert_eq!(batch[0], 1);
    let epochs: Vec<&Value> = out["batch"].as_array().unwrap().iter().map(|r| &r["epoch"]).collect();
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "one epoch: {epochs:?}");

    let mixed = out["mixed"].as_array().expect("mixed results");
    assert_eq!(mixed.len(), 4, "{mixed:?}");
    assert_eq!(mixed[0]["offset"], 101, "{mixed:?}");
    assert_error(&mixed[1], 3, "bad_argument");
    assert_eq!(mixed[2], true);
    assert_error(&mixed[3], 3, "bad_argument");

    assert_error(&out["error"], 3, "bad_argument");
    assert!(out["error"]["error"]["message"].as_str().unwrap().contains("channel"), "{}", out["error"]);
    assert_eq!(out["after_error"], true, "the connection survives an error reply");
    assert_error(&out["too_large"], 6, "too_large");
    assert_error(&out["bad_frame"], 1, "bad_frame");
    assert_eq!(out["after_bad_frame"], true, "the client reconnects after bad_frame");

    assert_eq!(out["disconnect"], json!({"user": "alice", "disconnected": 1}));
    let many = &out["publish_many"]["results"];
    assert_eq!((many[0]["channel"].as_str(), many[0]["offset"].as_u64()), (Some("many_a"), Some(1)), "{many}");
    assert_eq!((many[1]["channel"].as_str(), many[1]["offset"].as_u64()), (Some("many_b"), Some(1)), "{many}");
    // The configuration file did not change: nothing needs a restart.
    assert_eq!(out["reload"], json!({"reloaded": true, "restart_needed": []}));
    assert_eq!(alice.close_code(), Some(4000));
    // Nothing else reached the subscriber: the failed publications were not sent.
    assert_eq!(subscriber.request(json!({"op": "ping", "id": 9})), json!({"id": 9, "ok": true}));
}

/// A TCP admin listener: AUTH with the right key first.
fn tcp_with_key(lang: Lang) {
    lang.require();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let admin = format!("tcp:{address}");
    let server = Server::start_with(2, "", &["--admin", &admin, "--admin-key", ADMIN_KEY]);
    let mut subscriber: Client = server.client();
    subscriber.subscribe("news");

    let out = lang.run(&["tcp", &admin, ADMIN_KEY]);
    assert_error(&out["wrong_key"], 4, "unauthorized");
    assert_error(&out["no_key"], 4, "unauthorized");
    assert_eq!((out["publish"]["offset"].clone(), out["publish"]["subscribers"].clone()), (json!(1), json!(1)));
    assert_eq!(
        subscriber.recv(),
        json!({"channel": "news", "event": "tcp", "offset": 1, "data": {"via": "tcp", "from": lang.name()}})
    );
    assert_eq!(offsets(&out["batch"]), (1..=10).collect::<Vec<u64>>());
}

/// The TCP scenario over TLS (`admin = "tls:127.0.0.1:PORT"`), the test
/// CA given in KOMETA_ADMIN_CA.
fn tls_with_key(lang: Lang) {
    lang.require();
    let dir = common::temp_dir("admin-pki");
    let common::Pki { ca_pem, cert_file, key_file } = common::pki(&dir);
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = format!("tls:127.0.0.1:{port}");
    let tls_args = ["--tls-cert-file", cert_file.to_str().unwrap(), "--tls-key-file", key_file.to_str().unwrap()];
    let _server = Server::start_with(2, "", &[&["--admin", &admin, "--admin-key", ADMIN_KEY][..], &tls_args].concat());

    let out = lang.run_with_env(&["tcp", &admin, ADMIN_KEY], &[("KOMETA_ADMIN_CA", &ca_file)]);
    assert_error(&out["wrong_key"], 4, "unauthorized");
    assert_error(&out["no_key"], 4, "unauthorized");
    assert_eq!(out["publish"]["offset"], 1, "{out}");
    assert_eq!(offsets(&out["batch"]), (1..=10).collect::<Vec<u64>>());
    // The publication reached the channel: its history has it.
    let address = kometa_admin_client::AdminAddress::parse(&admin).expect("tls: address");
    let mut rust_client =
        kometa_admin_client::AdminClient::connect_with_ca(&address, Some(ADMIN_KEY), common::TIMEOUT, Some(&ca_file))
            .expect("the Rust client over TLS");
    let history = rust_client.history("news", 0, 10).expect("history");
    assert_eq!(history["publications"][0]["data"], json!({"via": "tcp", "from": lang.name()}), "{history}");
}

#[test]
fn python_client_over_tls_checks_the_certificate_and_needs_the_key() {
    tls_with_key(Lang::Python);
}

#[test]
fn php_client_over_tls_checks_the_certificate_and_needs_the_key() {
    tls_with_key(Lang::Php);
}

/// Reads one request frame: (opcode, request id).
fn read_request(stream: &mut UnixStream) -> (u8, u32) {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).expect("request length");
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut body).expect("request body");
    assert_eq!(body[1], 0, "flags are 0");
    (body[0], u32::from_be_bytes([body[2], body[3], body[4], body[5]]))
}

fn ok_reply(op: u8, request_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = ((6 + payload.len()) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, op]);
    frame.extend_from_slice(&request_id.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn wait_for_close(stream: &mut UnixStream) {
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// A fake admin server that misbehaves on purpose, one step per request
/// of the "framing" scenario.
fn fake_server(listener: UnixListener) {
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    // A STATS reply written one byte at a time.
    let (op, id) = read_request(&mut stream);
    assert_eq!(op, opcode::STATS);
    let document = br#"{"short":"reads","n":[1,2]}"#;
    let mut payload = (document.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(document);
    for byte in ok_reply(op, id, &payload) {
        stream.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Three pipelined PINGs, answered in two uneven pieces.
    let replies: Vec<u8> = (0..3)
        .flat_map(|_| {
            let (op, id) = read_request(&mut stream);
            assert_eq!(op, opcode::PING);
            ok_reply(op, id, b"")
        })
        .collect();
    stream.write_all(&replies[..15]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    stream.write_all(&replies[15..]).unwrap();
    // A reply to someone else's request: the client must drop the connection.
    let (op, id) = read_request(&mut stream);
    stream.write_all(&ok_reply(op, id.wrapping_add(1), b"")).unwrap();
    wait_for_close(&mut stream);
    // A reply announcing 2 GiB: refused from its length field alone.
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let (op, id) = read_request(&mut stream);
    let mut head = 0x8000_0000u32.to_be_bytes().to_vec();
    head.extend_from_slice(&[0, op]);
    head.extend_from_slice(&id.to_be_bytes());
    stream.write_all(&head).unwrap();
    wait_for_close(&mut stream);
}

/// Short reads, pipelined replies split anywhere, request ids checked,
/// oversized replies refused.
fn framing(lang: Lang) {
    lang.require();
    let dir = common::temp_dir("fake-admin");
    let path = dir.join("admin.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = std::thread::spawn(move || fake_server(listener));
    let out = lang.run(&["framing", &format!("unix:{}", path.display())]);
    server.join().expect("fake server");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out["short_reads"], json!({"short": "reads", "n": [1, 2]}));
    assert_eq!(out["pipelined"], json!([true, true, true]));
    let wrong_id = out["wrong_id"].as_str().unwrap_or_else(|| panic!("wrong request id accepted: {out}"));
    assert!(wrong_id.contains("while waiting for"), "{wrong_id}");
    let too_big = out["too_big"].as_str().unwrap_or_else(|| panic!("2 GiB reply accepted: {out}"));
    assert!(too_big.contains("limit"), "{too_big}");
}

#[test]
fn python_client_runs_every_operation() {
    full_scenario(Lang::Python);
}

#[test]
fn python_client_over_tcp_needs_the_key() {
    tcp_with_key(Lang::Python);
}

#[test]
fn php_client_runs_every_operation() {
    full_scenario(Lang::Php);
}

#[test]
fn php_client_over_tcp_needs_the_key() {
    tcp_with_key(Lang::Php);
}

#[test]
fn python_client_frames_replies_correctly() {
    framing(Lang::Python);
}

#[test]
fn php_client_frames_replies_correctly() {
    framing(Lang::Php);
}
