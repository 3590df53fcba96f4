//! Hostile and broken input: each gets its documented status, close code or
//! error reply, and the server keeps serving everyone else.

mod common;

use std::io::{Read, Write};

use common::{client_frame, http_exchange, raw_websocket, read_close_code, Server};
use kometa_protocol::admin::{opcode, ErrorCode, FrameWriter};
use serde_json::json;

/// A subscriber that must keep receiving while the battery runs.
fn assert_still_serving(server: &Server, witness: &mut common::Client, offset: u64) {
    server.publish("witness", "alive", "true");
    let push = witness.recv();
    assert_eq!(push["offset"], offset, "the server stopped serving others: {push}");
    let mut fresh = server.client();
    fresh.subscribe("witness-2");
}

#[test]
fn bad_http_requests_get_statuses_with_reasons() {
    let server = Server::start(2, "[limits]\nhttp_head_bytes_max = 1024\nhttp_headers_max = 8\n");
    let mut witness = server.client();
    witness.subscribe("witness");

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(), "400"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec(), "400"),
        ([b"GET / HTTP/1.1\r\nHost: x\r\nX: ".to_vec(), vec![b'a'; 2000], b"\r\n\r\n".to_vec()].concat(), "431"),
        (
            (0..10).fold(b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), |mut head, i| {
                head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
                head
            })
            .into_iter()
            .chain(b"\r\n".iter().copied())
            .collect(),
            "431",
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), "505"),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), "404"),
        (b"POST /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), "405"),
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n".to_vec(), "405"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "426"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
            "426",
        ),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(), "400"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n".to_vec(),
            "400",
        ),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(), "400"),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), "400"),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n".to_vec(), "413"),
    ];
    for (request, status) in cases {
        let response = http_exchange(&server, &request);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "request {:?} got {response:?}",
            String::from_utf8_lossy(&request[..request.len().min(60)])
        );
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(!body.trim().is_empty(), "status {status} without a reason");
    }
    assert_still_serving(&server, &mut witness, 1);
    let stats = server.stats();
    assert!(stats["protocol_errors"].as_u64().unwrap() >= 5);
}

#[test]
fn keep_alive_and_pipelined_requests() {
    let server = Server::start(1, "");
    let mut stream = server.tcp();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 3, "{response}");
    assert_eq!(response.matches("\r\n\r\nok\n").count(), 2, "HEAD has no body: {response}");
    // HTTP/1.0 without keep-alive closes after one response.
    let response = http_exchange(&server, b"GET /health HTTP/1.0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200"));
    // A request split over several writes is assembled.
    let mut stream = server.tcp();
    for part in [&b"GET /hea"[..], b"lth HTTP/1.1\r\nHo", b"st: x\r\nConnection: close\r\n\r\n"] {
        stream.write_all(part).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// A request refused before its body is read (413) still gets its response
/// when the client goes on sending the body: the server shuts its write side
/// and discards input instead of closing, which would answer the late body
/// with a reset that destroys the response in the client's buffer.
#[test]
fn a_refused_request_body_does_not_reset_the_response() {
    let server = Server::start(1, "[limits]\nhttp_body_bytes_max = 1024\n[timeouts]\nclose_timeout_ms = 60000\n");
    // The body sent at once (more than a close-time drain would read), and
    // sent only after the server has answered.
    for (body_bytes, pause_ms) in [(1 << 20, 0), (1 << 20, 0), (65_536, 100)] {
        let mut stream = server.tcp();
        let head = format!("POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nContent-Length: {body_bytes}\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        stream.write_all(&vec![b'x'; body_bytes]).expect("the server still reads the body it refused");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("the response arrives whole, with no reset");
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
        assert!(response.contains("Connection: close"), "{response}");
    }
    // The lingering connections end once the clients close, well before
    // the close deadline (which is long here so the check can fail).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server.stats()["connections"] != 0 {
        assert!(std::time::Instant::now() < deadline, "lingering connections were not closed: {}", server.stats());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A client that half-closes after its request (HTTP/1.0 tools, health
/// checkers, some proxies) still gets the whole response, even when the
/// response is larger than the socket takes at once.
#[test]
fn a_half_closed_client_gets_the_whole_response() {
    let server = Server::start(1, "");
    // A small receive window and segment size keep most of the 70 KB
    // client library queued in the server's outbox when the FIN arrives.
    let mut stream = small_window_connection(server.port);
    stream.write_all(b"GET /kometa.js HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read the response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let declared: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|value| value.trim().parse().ok())
        .expect("Content-Length");
    assert!(declared > 60_000, "the test needs a large response: {head}");
    assert_eq!(response.len() - split, declared, "body cut short after the client's FIN");
}

/// A loopback connection with a 4 KiB receive buffer and 536-byte segments.
fn small_window_connection(port: u16) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor created here and handed to
    // TcpStream, which owns and closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let set = |level, name, value: libc::c_int| {
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), size);
        };
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, 4096);
        set(libc::IPPROTO_TCP, libc::TCP_MAXSEG, 536);
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be() },
            sin_zero: [0; 8],
        };
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let connected = libc::connect(fd, (&address as *const libc::sockaddr_in).cast(), size);
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// A protocol violation fails the connection: the client gets the close
/// code and then a clean end of stream, even while it goes on sending (what
/// follows the violation is not decoded as frames, and no reset destroys
/// the close frame).
#[test]
fn a_violation_ends_with_the_close_code_and_a_clean_end_of_stream() {
    let server = Server::start(1, "");
    let mut stream = raw_websocket(&server);
    // A masked text frame declaring 1 MiB (over client_message_bytes_max),
    // then its payload.
    const PAYLOAD_BYTES: u64 = 1 << 20;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&PAYLOAD_BYTES.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&frame).unwrap();
    stream.write_all(&vec![b'x'; PAYLOAD_BYTES as usize]).expect("the server reads the rest away");
    assert_eq!(read_close_code(&mut stream), Some(1009));
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("a clean end of stream, no reset");
    assert!(rest.is_empty(), "nothing after the close frame: {} bytes", rest.len());
}

#[test]
fn websocket_violations_close_with_rfc_codes() {
    let server = Server::start(2, "[limits]\nclient_message_bytes_max = 1024\n");
    let mut witness = server.client();
    witness.subscribe("witness");

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (vec![0x81, 0x02, b'h', b'i'], 1002, "unmasked frame"),
        (client_frame(0x81, &[0x7b, 0xff, 0xfe, 0x7d]), 1007, "invalid UTF-8"),
        (client_frame(0x81, &vec![b' '; 2000]), 1009, "message over client_message_bytes_max"),
        (
            [client_frame(0x01, &[b' '; 600]), client_frame(0x80, &[b' '; 600])].concat(),
            1009,
            "fragments over client_message_bytes_max",
        ),
        (client_frame(0x09, b"frag-ping"), 1002, "fragmented control frame"),
        (client_frame(0x89, &[0; 126]), 1002, "control frame over 125 bytes"),
        (client_frame(0x83, b""), 1002, "reserved opcode"),
        (client_frame(0xC1, b"{}"), 1002, "RSV1 without extension"),
        (client_frame(0x80, b"x"), 1002, "continuation without a start"),
        ([client_frame(0x01, b"{"), client_frame(0x81, b"}")].concat(), 1002, "new message inside a fragmented one"),
        (client_frame(0x82, b"\x00\x01"), 1003, "binary message"),
        (client_frame(0x88, &[0x03]), 1002, "close with 1-byte payload"),
        (client_frame(0x88, &1005u16.to_be_bytes()), 1002, "close with a reserved code"),
    ];
    for (bytes, code, what) in cases {
        let mut stream = raw_websocket(&server);
        stream.write_all(&bytes).unwrap();
        assert_eq!(read_close_code(&mut stream), Some(code), "{what}");
    }
    assert_still_serving(&server, &mut witness, 1);
}

#[test]
fn close_handshake_echoes_the_code_and_ping_gets_pong() {
    let server = Server::start(1, "");
    let mut stream = raw_websocket(&server);
    stream.write_all(&client_frame(0x89, b"are you there")).unwrap();
    let (opcode, payload) = common::read_server_frame(&mut stream).unwrap();
    assert_eq!((opcode, payload.as_slice()), (0xA, &b"are you there"[..]));
    stream.write_all(&client_frame(0x88, &[0x0b, 0xb8, b'b', b'y', b'e'])).unwrap();
    let (opcode, payload) = common::read_server_frame(&mut stream).unwrap();
    assert_eq!(opcode, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 3000);
    // The server then closes the TCP connection.
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap_or(0), 0);
}

#[test]
fn bad_commands_get_error_replies_and_the_connection_stays() {
    let server = Server::start(
        2,
        "[limits]\nchannels_per_connection_max = 3\nchannel_name_bytes_max = 16\npublication_data_bytes_max = 64\n",
    );
    let mut client = server.client();
    let checks = vec![
        (json!("not an object"), "bad_request"),
        (json!({"channel": "x"}), "bad_request"),
        (json!({"op": "teleport", "id": 1}), "unknown_op"),
        (json!({"op": "subscribe", "id": 2}), "bad_request"),
        (json!({"op": "subscribe", "channel": "has space", "id": 3}), "bad_channel"),
        (json!({"op": "subscribe", "channel": "x".repeat(17), "id": 4}), "bad_channel"),
        (json!({"op": "subscribe", "channel": "", "id": 5}), "bad_channel"),
        (json!({"op": "subscribe", "channel": 7, "id": 6}), "bad_request"),
        (json!({"op": "ping", "id": {"nested": true}}), "bad_request"),
        (json!({"op": "publish", "channel": "web_x", "event": "bad event", "data": 1, "id": 7}), "bad_request"),
        (json!({"op": "publish", "channel": "web_x", "data": "y".repeat(100), "id": 8}), "message_too_large"),
        (json!({"op": "publish", "channel": "web_x", "id": 9}), "bad_request"),
    ];
    for (command, code) in checks {
        let reply = client.request(command.clone());
        assert_eq!(reply["error"]["code"], code, "{command} -> {reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(id) = command.get("id").filter(|id| id.is_u64()) {
            assert_eq!(&reply["id"], id);
        }
    }
    client.socket.send(tungstenite::Message::Text("{\"op\":".into())).unwrap();
    assert_eq!(client.recv()["error"]["code"], "bad_request");
    for channel in ["a", "b", "c"] {
        client.subscribe(channel);
    }
    let reply = client.request(json!({"op": "subscribe", "channel": "d", "id": 10}));
    assert_eq!(reply["error"]["code"], "too_many_channels");
    assert_eq!(client.request(json!({"op": "ping", "id": 11})), json!({"id": 11, "ok": true}));
}

#[test]
fn malformed_admin_frames_get_errors_and_broken_framing_closes() {
    let server = Server::start(2, "");
    let mut witness = server.client();
    witness.subscribe("witness");

    let mut admin = server.admin();
    let expect_error = |admin: &mut kometa_admin_client::AdminClient, code: ErrorCode| {
        let reply = admin.receive().unwrap();
        let error = reply.result.unwrap_err();
        assert_eq!(error.code, code, "{error}");
        assert!(!error.message.is_empty());
    };
    admin.send(0x7f, |_| {}).unwrap();
    expect_error(&mut admin, ErrorCode::UnknownOpcode);
    // Truncated payload: a channel length with no channel.
    admin
        .send(opcode::PUBLISH, |w| {
            w.u16(10);
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    // Trailing bytes (after STATS's optional scope), and a scope that is not one.
    admin
        .send(opcode::STATS, |w| {
            w.u8(1).u8(0);
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    admin
        .send(opcode::STATS, |w| {
            w.u8(7);
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    // Non-zero flags.
    admin.send_raw(&FrameWriter::new(opcode::PING, 3, 99).finish()).unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    // Invalid JSON data, bad channel name, bad event name.
    admin
        .send(opcode::PUBLISH, |w| {
            w.str16("news").str16("e").bytes32(b"{oops");
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    admin
        .send(opcode::PUBLISH, |w| {
            w.str16("bad channel").str16("e").bytes32(b"1");
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    admin
        .send(opcode::PUBLISH, |w| {
            w.str16("news").str16("").bytes32(b"1");
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::BadArgument);
    // Data over the limit.
    let big = format!("\"{}\"", "x".repeat(300 * 1024));
    admin
        .send(opcode::PUBLISH, |w| {
            w.str16("news").str16("e").bytes32(big.as_bytes());
        })
        .unwrap();
    expect_error(&mut admin, ErrorCode::TooLarge);
    // The connection still works after all of that.
    admin.ping().unwrap();

    // Impossible lengths break framing: one error reply, then the connection closes.
    for bytes in [vec![0, 0, 0, 2, 1, 0], vec![0x7f, 0xff, 0xff, 0xff]] {
        let mut broken = server.admin();
        broken.send_raw(&bytes).unwrap();
        expect_error(&mut broken, ErrorCode::BadFrame);
        assert!(broken.receive().is_err(), "connection must be closed after a framing error");
    }
    assert_still_serving(&server, &mut witness, 1);
}
