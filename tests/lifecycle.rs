//! Connection lifecycle: backpressure, liveness, shutdown, limits, config.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{raw_websocket, read_close_code, read_server_frame, Server};
use kometa_admin_client::AdminAddress;
use kometa_admin_client::AdminClient;
use kometa_protocol::admin::{opcode, ErrorCode};
use serde_json::json;

#[test]
fn a_subscriber_that_never_reads_is_closed_at_its_cap_while_others_get_everything() {
    // The outbox cap leaves the fast subscriber (read here, in a debug
    // build) room to lag behind a publisher in a tight loop: the kernel
    // holds at most limits.socket_unsent_bytes_max unsent for it, so its
    // slack is the outbox. 4 MiB is still far below the 12 MB published.
    let server = Server::start(
        2,
        "[limits]\npublication_data_bytes_max = 16384\noutbox_bytes_max = 4194304\nadmin_frame_bytes_max = 65536\n",
    );
    // The slow one: a raw socket with a small receive buffer that never reads.
    let slow = common::slow_subscriber(&server, "firehose");
    let mut fast = server.client();
    fast.subscribe("firehose");

    // 8 KiB publications until far more than kernel buffers plus the outbox cap.
    let payload = format!("\"{}\"", "x".repeat(8 * 1024));
    let total = 1500u64;
    let mut admin = server.admin();
    let publisher = std::thread::spawn(move || {
        for _ in 0..total {
            admin.publish("firehose", "blob", payload.as_bytes()).unwrap();
        }
    });
    for expected in 1..=total {
        let push = fast.recv();
        assert_eq!(push["offset"], expected, "the fast subscriber must get every publication in order");
    }
    publisher.join().unwrap();
    let stats = server.wait_stats("slow consumer closed", |s| s["slow_consumers_closed"] == 1);
    assert_eq!(stats["slow_consumers_closed"], 1);

    // When it finally reads, it finds whole frames in order (what the kernel
    // buffered before the cut), then a 1008 close with a reason.
    let mut slow = slow;
    let mut last_offset = 0;
    let close = loop {
        let Some((opcode, payload)) = read_server_frame(&mut slow) else {
            break None;
        };
        if opcode == 0x8 {
            break Some((
                u16::from_be_bytes([payload[0], payload[1]]),
                String::from_utf8_lossy(&payload[2..]).into_owned(),
            ));
        }
        let push: serde_json::Value = serde_json::from_slice(&payload).expect("whole JSON frames");
        let offset = push["offset"].as_u64().unwrap();
        assert!(offset > last_offset, "in order");
        last_offset = offset;
    };
    let (code, reason) = close.expect("a close frame after the buffered data");
    assert_eq!(code, 1008);
    assert!(reason.contains("slow consumer"), "{reason}");
    assert!(last_offset < total, "the slow consumer cannot have received everything");
    // Then it is gone, and the fast subscriber stays.
    server.wait_stats("slow consumer gone", |s| s["websockets"] == 1);
}

#[test]
fn sigterm_sends_1001_to_every_client_and_exits_zero() {
    let mut server = Server::start(2, "");
    let mut clients: Vec<common::Client> = (0..20).map(|_| server.client()).collect();
    for client in &mut clients {
        client.subscribe("news");
    }
    let status = {
        let handle = std::thread::spawn({
            let pid = server.pid();
            move || {
                std::thread::sleep(Duration::from_millis(100));
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        });
        let codes: Vec<Option<u16>> = clients.iter_mut().map(|c| c.close_code()).collect();
        handle.join().unwrap();
        assert!(codes.iter().all(|code| *code == Some(1001)), "{codes:?}");
        server.wait_exit()
    };
    assert_eq!(status.code(), Some(0));
    // The admin socket file is removed on exit.
    if let AdminAddress::Unix(path) = &server.admin {
        assert!(!path.exists());
    }
}

#[test]
fn silent_connections_are_pinged_then_closed_and_answering_ones_stay() {
    let server =
        Server::start(2, "[timeouts]\nping_interval_ms = 200\npong_timeout_ms = 300\nsweep_interval_ms = 50\n");
    let mut answering = server.client();
    answering.subscribe("x");
    let mut silent = raw_websocket(&server);
    // For 1.2 s the answering client keeps reading (tungstenite answers each
    // ping on its next read); the silent one reads nothing.
    answering.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        if let Ok(tungstenite::Message::Close(frame)) = answering.socket.read() {
            panic!("answering client closed: {frame:?}");
        }
    }
    // The silent one saw a ping, did not answer, and was closed with 4004.
    let (opcode, _) = read_server_frame(&mut silent).unwrap();
    assert_eq!(opcode, 0x9, "expected a ping");
    assert_eq!(read_close_code(&mut silent), Some(4004));
    // The answering one is still subscribed.
    answering.set_timeout(common::TIMEOUT);
    server.publish("x", "still-here", "1");
    assert_eq!(answering.recv()["event"], "still-here");
}

#[test]
fn connections_that_never_finish_their_handshake_are_closed() {
    let server = Server::start(1, "[timeouts]\nhandshake_timeout_ms = 200\nsweep_interval_ms = 50\n");
    let mut idle = server.tcp();
    let mut partial = server.tcp();
    partial.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut buffer = Vec::new();
    idle.read_to_end(&mut buffer).unwrap();
    assert!(buffer.is_empty(), "an idle connection is closed quietly");
    let mut response = String::new();
    partial.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
}

#[test]
fn connections_past_the_cap_get_503() {
    let server = Server::start(1, "connections_max = 3\n");
    let _held: Vec<common::Client> = (0..3).map(|_| server.client()).collect();
    // Each refused client gets the whole 503 and a clean end of stream (its
    // request is read away first, so the close is a FIN, not a reset).
    const ATTEMPTS: u64 = 20;
    for _ in 0..ATTEMPTS {
        let mut stream = server.tcp();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write request");
        std::thread::sleep(Duration::from_millis(2));
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("the 503 arrives without a reset");
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }
    assert_eq!(server.stats()["shards"][0]["connections_refused"], ATTEMPTS);
}

#[test]
fn tcp_admin_requires_the_key() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let key = "0123456789abcdef-secret";
    let server = Server::start_with(2, "", &["--admin", &format!("tcp:{address}"), "--admin-key", key]);
    let admin_address = AdminAddress::Tcp(address);

    let mut anonymous = AdminClient::connect(&admin_address, None, common::TIMEOUT).unwrap();
    anonymous.send(opcode::STATS, |_| {}).unwrap();
    assert_eq!(anonymous.receive().unwrap().result.unwrap_err().code, ErrorCode::Unauthorized);

    match AdminClient::connect(&admin_address, Some("wrong-key-wrong-key"), common::TIMEOUT) {
        Err(kometa_admin_client::ClientError::Server(error)) => {
            assert_eq!(error.code, ErrorCode::Unauthorized)
        }
        other => panic!("wrong key accepted: {:?}", other.map(|_| ())),
    }
    let mut authorized = AdminClient::connect(&admin_address, Some(key), common::TIMEOUT).unwrap();
    let mut subscriber = server.client();
    subscriber.subscribe("news");
    assert_eq!(authorized.publish("news", "e", b"1").unwrap().subscribers, 1);
    assert_eq!(subscriber.recv()["offset"], 1);
}

fn serve_output(args: &[&str], config: Option<&str>) -> std::process::Output {
    let dir = common::temp_dir("config");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"));
    command.arg("serve").args(args).env_remove("KOMETA_CONFIG").env_remove("KOMETA_LISTEN");
    if let Some(config) = config {
        let path = dir.join("bad.toml");
        std::fs::write(&path, config).unwrap();
        command.arg("--config").arg(path);
    }
    if !args.contains(&"--admin") {
        command.arg("--admin").arg(format!("unix:{}", dir.join("a.sock").display()));
    }
    let output = command.output().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    output
}

#[test]
fn config_errors_name_the_key_and_exit_before_listening() {
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (vec![], Some("[limits]\noutbox_byte_max = 5\n"), "outbox_byte_max"),
        (vec![], Some("[limits]\noutbox_bytes_max = 5\n"), "limits.outbox_bytes_max"),
        (vec![], Some("shards = \"many\"\n"), "shards"),
        (vec![], Some("[timeouts]\nping_interval_ms = 0\n"), "timeouts.ping_interval_ms"),
        (vec![], Some("[[namespaces]]\nprefix = \"a b\"\n"), "namespaces[0].prefix"),
        (vec![], Some("listen = 5\n"), "listen"),
        (vec!["--listen", "nowhere"], None, "--listen"),
        (vec!["--shards", "100000"], None, "shards"),
        (vec!["--admin", "tcp:127.0.0.1:1"], None, "admin_key"),
    ];
    for (args, config, key) in cases {
        let output = serve_output(&args, config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?} {config:?}: {stderr}");
        assert!(stderr.contains(key), "{args:?} {config:?}: error does not name `{key}`: {stderr}");
        assert!(output.stdout.is_empty(), "no ready line for a bad config");
    }
    // A missing file is named too.
    let output = serve_output(&["--config", "/nonexistent/kometa.toml"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/kometa.toml"));
}

#[test]
fn echo_endpoint_only_when_configured() {
    let plain = Server::start(1, "");
    let response = common::http_exchange(&plain, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 404"));
    let echo = Server::start(1, "echo_path = \"/echo\"\n");
    let mut client = echo.client_at("/echo");
    client.send(json!({"any": "thing"}));
    assert_eq!(client.recv(), json!({"any": "thing"}));
}

/// Transparent huge pages are off unless configured (khugepaged would refill
/// the memory idle connections gave back); the kernel reports the flag.
#[test]
fn transparent_huge_pages_are_off_unless_configured() {
    let thp_enabled = |server: &Server| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
        status.lines().find_map(|line| line.strip_prefix("THP_enabled:").map(|value| value.trim().to_string()))
    };
    let default = Server::start(1, "");
    let Some(flag) = thp_enabled(&default) else {
        eprintln!("kernel does not report THP_enabled; nothing to check");
        return;
    };
    assert_eq!(flag, "0", "THP is disabled by default");
    // Opted in, the server keeps what it inherited (the flag passes through
    // fork and exec), which is this test's own setting.
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let inherited =
        own.lines().find_map(|line| line.strip_prefix("THP_enabled:").map(|value| value.trim().to_string()));
    let opted_in = Server::start(1, "transparent_huge_pages = true\n");
    assert_eq!(thp_enabled(&opted_in), inherited, "transparent_huge_pages = true leaves THP as inherited");
}

/// A backend that sends requests and never reads the replies is dropped
/// after `timeouts.admin_write_timeout_ms` instead of holding its admin slot
/// (and its replies) forever.
#[test]
fn an_admin_connection_that_never_reads_is_closed_at_its_write_timeout() {
    let server = Server::start(1, "[timeouts]\nadmin_write_timeout_ms = 300\n");
    let AdminAddress::Unix(path) = &server.admin else { panic!("the test server's admin socket is a Unix socket") };
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("admin connect");
    // 4,000 STATS requests (~50 KB): their replies (~700 B each) far exceed
    // the socket buffers, and nobody reads them for a while.
    let requests: Vec<u8> =
        (0..4000u32).flat_map(|id| kometa_protocol::admin::FrameWriter::request(opcode::STATS, id).finish()).collect();
    stream.write_all(&requests).expect("write requests");
    std::thread::sleep(Duration::from_millis(1500));
    // The server gave up: what it wrote can be read, then the stream ends.
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(error) => panic!("the server kept serving a backend that did not read: {error}"),
        }
    }
    // And it still serves everyone else.
    assert!(server.stats()["connections"].as_u64().is_some());
}
