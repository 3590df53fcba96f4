//! HTTP/1.1 details on the public port, over real sockets: `Expect:
//! 100-continue`, `Host`, request-target forms, `Transfer-Encoding`, and
//! malformed request lines (RFC 9110, RFC 9112).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{http_exchange, read_http_head, Server};

fn status(response: &str) -> &str {
    response.split_whitespace().nth(1).unwrap_or("")
}

/// A session id from a new long-poll session.
fn new_session(server: &Server) -> String {
    let response = common::http(server, "GET", "/poll", &[], b"");
    assert_eq!(response.status, 200);
    response.json()["session"].as_str().expect("session id").to_owned()
}

#[test]
fn expect_100_continue_gets_continue_before_the_body() {
    let server = Server::start(1, "");
    let session = new_session(&server);
    let body = br#"{"op":"ping","id":1}"#;
    let mut stream = server.tcp();
    let head = format!(
        "POST /cmd?session={session} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // As curl does: wait for 100 Continue before sending the body.
    assert_eq!(read_http_head(&mut stream), "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 202 "), "{rest}");

    // A body that would be refused: the final status at once, no 100.
    let response = http_exchange(
        &server,
        b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert_eq!(status(&response), "413", "{response}");
    assert!(!response.contains("100 Continue"));
    // An expectation we cannot meet.
    let response = http_exchange(
        &server,
        b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nExpect: 200-maybe\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(status(&response), "417", "{response}");
}

#[test]
fn host_is_required_once_and_valid_in_http_1_1() {
    let server = Server::start(1, "");
    for (request, expected) in [
        (&b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"[..], "400"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n", "200"),
        (b"GET /health HTTP/1.1\r\nHost: example.com:80\r\nConnection: close\r\n\r\n", "200"),
        // HTTP/1.0 has no Host requirement.
        (b"GET /health HTTP/1.0\r\n\r\n", "200"),
    ] {
        let response = http_exchange(&server, request);
        assert_eq!(status(&response), expected, "{:?} got {response:?}", String::from_utf8_lossy(request));
        if expected == "400" {
            assert!(response.to_ascii_lowercase().contains("host"), "the reason names Host: {response}");
        }
    }
}

#[test]
fn absolute_form_targets_are_served() {
    let server = Server::start(1, "");
    let request =
        format!("GET http://127.0.0.1:{}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", server.port);
    let response = http_exchange(&server, request.as_bytes());
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    // A WebSocket upgrade through a proxy that sends the absolute form.
    let mut stream = server.tcp();
    stream
        .write_all(
            format!(
                "GET http://127.0.0.1:{}/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                server.port
            )
            .as_bytes(),
        )
        .unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // OPTIONS * asks the server itself.
    let response = http_exchange(&server, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 204 ") && response.contains("Allow: "), "{response}");
}

#[test]
fn transfer_encoding_gets_400_and_the_connection_closes() {
    let server = Server::start(1, "");
    for request in [
        &b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"[..],
        // Conflicting framing (a request smuggling shape).
        b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST /cmd?session=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n",
    ] {
        let mut stream = server.tcp();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A pipelined second request must not be read as part of the first.
        stream.write_all(request).unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
        assert!(response.contains("Content-Length"), "the reason says what to send: {response}");
        assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "closed after the 400: {response}");
    }
}

#[test]
fn malformed_request_lines_get_400_and_unknown_versions_505() {
    let server = Server::start(1, "");
    for (request, expected) in [
        (&b"GET /health FOO/1.1\r\nHost: x\r\n\r\n"[..], "400"),
        (b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n", "400"),
        (b"GET health HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        (b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n", "505"),
    ] {
        let response = http_exchange(&server, request);
        assert_eq!(status(&response), expected, "{:?} got {response:?}", String::from_utf8_lossy(request));
    }
    assert!(server.stats()["protocol_errors"].as_u64().unwrap() >= 5);
}
