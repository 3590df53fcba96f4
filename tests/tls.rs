//! TLS on the public listener, over real sockets: wss:// and https:// with
//! a rustls client, OpenSSL (Python) against the compact record layer, and
//! plain HTTP on the TLS port.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Server, TIMEOUT};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tungstenite::Message;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

use common::{pki, Pki};

fn tls_server(shards: usize) -> (Server, Pki) {
    let dir = common::temp_dir("pki");
    let pki = pki(&dir);
    let server = Server::start_with(
        shards,
        "",
        &[
            "--tls-cert-file",
            pki.cert_file.to_str().unwrap(),
            "--tls-key-file",
            pki.key_file.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    (server, pki)
}

fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA pem")).expect("root");
    }
    Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

use rustls::pki_types::pem::PemObject;

fn tls_connect(server: &Server, pki: &Pki) -> TlsStream {
    let tcp = server.tcp();
    tcp.set_nodelay(true).expect("nodelay");
    let connection = rustls::ClientConnection::new(client_config(pki), ServerName::try_from("localhost").unwrap())
        .expect("client connection");
    rustls::StreamOwned::new(connection, tcp)
}

fn wss(server: &Server, pki: &Pki) -> tungstenite::WebSocket<TlsStream> {
    let stream = tls_connect(server, pki);
    let url = format!("wss://localhost:{}/ws", server.port);
    let (socket, _) = tungstenite::client::client(url, stream).expect("websocket handshake over TLS");
    socket
}

fn recv_json(socket: &mut tungstenite::WebSocket<TlsStream>) -> Value {
    loop {
        match socket.read().expect("read") {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn wss_subscribe_and_receive_small_and_large_publications() {
    let (server, pki) = tls_server(2);
    let mut socket = wss(&server, &pki);
    socket.send(Message::Text(json!({"op": "subscribe", "channel": "news", "id": 1}).to_string().into())).unwrap();
    let reply = recv_json(&mut socket);
    assert_eq!(reply["ok"], true, "{reply}");
    server.publish("news", "e", "\"hello\"");
    let push = recv_json(&mut socket);
    assert_eq!(push["data"], "hello", "{push}");
    // Larger than one TLS record (16 KiB) and than one socket write.
    let big = "x".repeat(200_000);
    server.publish("news", "e", &format!("\"{big}\""));
    let push = recv_json(&mut socket);
    assert_eq!(push["data"].as_str().map(str::len), Some(big.len()));
    // Many in a row: records back to back in one read.
    for n in 0..200 {
        server.publish("news", "e", &n.to_string());
    }
    for n in 0..200 {
        assert_eq!(recv_json(&mut socket)["data"], n);
    }
    let stats = server.stats();
    assert!(stats["tls_handshakes"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn a_clean_websocket_close_over_tls() {
    let (server, pki) = tls_server(1);
    let mut socket = wss(&server, &pki);
    socket.close(None).expect("close");
    loop {
        match socket.read() {
            Ok(Message::Close(_)) | Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(error) => panic!("unclean close: {error}"),
        }
    }
}

#[test]
fn https_sse_and_health() {
    let (server, pki) = tls_server(2);
    let mut stream = tls_connect(&server, &pki);
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let mut stream = tls_connect(&server, &pki);
    stream.write_all(b"GET /sse?channel=ticks HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut published = false;
    while !seen.contains("\"tick\"") {
        assert!(std::time::Instant::now() < deadline, "no SSE event over TLS: {seen}");
        let n = stream.read(&mut buffer).expect("read SSE");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        // Publish once the URL's subscription is confirmed.
        if !published && seen.contains("\"ok\":true") {
            server.publish("ticks", "e", "\"tick\"");
            published = true;
        }
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"));
}

#[test]
fn plain_http_on_the_tls_port_gets_a_plain_400() {
    let (server, _pki) = tls_server(1);
    let response = common::http_exchange(&server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("TLS port"), "{response}");
    let stats = server.wait_stats("tls failure counted", |s| s["tls_failures"].as_u64() >= Some(1));
    assert_eq!(stats["tls_handshakes"], 0);
}

#[test]
fn a_broken_handshake_does_not_disturb_others() {
    let (server, pki) = tls_server(1);
    let mut socket = wss(&server, &pki);
    socket.send(Message::Text(json!({"op": "subscribe", "channel": "c", "id": 1}).to_string().into())).unwrap();
    assert_eq!(recv_json(&mut socket)["ok"], true);
    // A client hello cut short, then garbage.
    let mut bad = server.tcp();
    bad.write_all(&[22, 3, 1, 0, 50, 1, 0, 0, 46, 3, 3]).unwrap();
    bad.write_all(&[0xff; 64]).unwrap();
    let mut sink = Vec::new();
    let _ = bad.read_to_end(&mut sink);
    server.publish("c", "e", "1");
    assert_eq!(recv_json(&mut socket)["data"], 1);
    // Both handshakes are counted in /metrics.
    let metrics = common::scrape_metrics(&server, true);
    assert_eq!(common::metric_value(&metrics, "kometa_tls_handshakes_total", &[("outcome", "completed")]), 1.0);
    assert_eq!(common::metric_value(&metrics, "kometa_tls_handshakes_total", &[("outcome", "failed")]), 1.0);
}

/// OpenSSL (Python's ssl module with the `websockets` client) against the
/// server's own record layer: the interoperability that matters for browsers.
#[test]
fn an_openssl_client_talks_to_the_compact_record_layer() {
    let (server, pki) = tls_server(2);
    let ca_file = server.dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(Path::new(python).exists(), "{python} missing: run scripts/install-test-deps.sh");
    let script = r#"
import asyncio, json, ssl, sys
from websockets.asyncio.client import connect
async def main(port, ca):
    context = ssl.create_default_context(cafile=ca)
    async with connect(f"wss://localhost:{port}/ws", ssl=context) as ws:
        await ws.send(json.dumps({"op": "subscribe", "channel": "o", "id": 1}))
        reply = json.loads(await ws.recv())
        assert reply.get("ok") is True, reply
        print("subscribed", flush=True)
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        print("cipher", ws.transport.get_extra_info("ssl_object").cipher()[0], flush=True)
        print("data", len(got["data"]), flush=True)
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"#;
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(server.port.to_string())
        .arg(&ca_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "subscribed");
    let big = "y".repeat(70_000);
    server.publish("o", "e", &format!("\"{big}\""));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "python client failed: {rest}");
    assert!(rest.contains("CHACHA20"), "the server should prefer ChaCha20-Poly1305: {rest}");
    assert!(rest.contains(&format!("data {}", big.len())), "{rest}");
}

#[test]
fn sighup_swaps_the_certificate_and_keeps_existing_connections() {
    let (server, first) = tls_server(2);
    let mut old = wss(&server, &first);
    old.send(Message::Text(json!({"op": "subscribe", "channel": "k", "id": 1}).to_string().into())).unwrap();
    assert_eq!(recv_json(&mut old)["ok"], true);

    // A renewed certificate from another CA, written over the same files.
    let renewed_dir = common::temp_dir("pki-renewed");
    let renewed = pki(&renewed_dir);
    std::fs::copy(&renewed.cert_file, &first.cert_file).unwrap();
    std::fs::copy(&renewed.key_file, &first.key_file).unwrap();
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);

    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let stream = tls_connect(&server, &renewed);
        let url = format!("wss://localhost:{}/ws", server.port);
        if tungstenite::client::client(url, stream).is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new connections never got the renewed certificate");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Clients that only trust the old CA are now refused...
    let stream = tls_connect(&server, &first);
    assert!(tungstenite::client::client(format!("wss://localhost:{}/ws", server.port), stream).is_err());
    // ...and the connection made before the swap still works.
    server.publish("k", "e", "7");
    assert_eq!(recv_json(&mut old)["data"], 7);
}

/// `kometa load` over wss:// (what the TLS figures in docs/benchmarks.md
/// are measured with): every subscriber completes a full handshake, gets
/// every publication once, and a wrong CA is a counted TLS error.
#[test]
fn the_load_generator_speaks_wss() {
    let (server, server_pki) = tls_server(2);
    let ca_file = server.dir.join("ca.pem");
    std::fs::write(&ca_file, &server_pki.ca_pem).expect("write CA");
    let admin = server.admin.to_string();
    let url = format!("wss://localhost:{}/ws", server.port);
    let run = |ca: &Path, extra: &[&str]| -> Value {
        let json_file = server.dir.join("load.json");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
            .args(["load", "broadcast", "--connections", "100", "--workers", "2", "--rate", "20"])
            .args(["--duration", "1s", "--settle", "200ms", "--url", &url, "--admin", &admin])
            .arg("--tls-ca")
            .arg(ca)
            .arg("--json")
            .arg(&json_file)
            .args(extra)
            .output()
            .expect("run kometa load");
        let text = std::fs::read(&json_file).unwrap_or_else(|e| {
            panic!(
                "no report ({e}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        serde_json::from_slice(&text).expect("report is JSON")
    };
    let report = run(&ca_file, &[]);
    let at = |report: &Value, pointer: &str| report.pointer(pointer).and_then(Value::as_u64);
    assert_eq!(at(&report, "/connections/established"), Some(100), "{report:#}");
    let accepted = at(&report, "/publications/accepted").expect("accepted");
    assert!(accepted >= 10, "{report:#}");
    assert_eq!(at(&report, "/deliveries/total"), Some(accepted * 100), "{report:#}");
    assert_eq!(at(&report, "/deliveries/missing"), Some(0), "{report:#}");
    assert_eq!(at(&report, "/deliveries/duplicates"), Some(0), "{report:#}");
    assert!(server.stats()["tls_handshakes"].as_u64().unwrap_or(0) >= 100);

    // A CA that did not sign the server's certificate: no connection.
    let other = pki(&common::temp_dir("other-pki"));
    let other_ca = server.dir.join("other-ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).expect("write CA");
    let refused = run(&other_ca, &["--connect-timeout", "2s"]);
    assert_eq!(at(&refused, "/connections/established"), Some(0), "{refused:#}");
    assert_eq!(at(&refused, "/connections/connect_errors/tls_certificate"), Some(100), "{refused:#}");
}

const ADMIN_KEY: &str = "0123456789abcdef-admin-key";

/// A server whose admin listener speaks TLS (`--admin tls:127.0.0.1:PORT`)
/// with the public listener's certificate.
fn tls_admin_server() -> (Server, Pki, kometa_admin_client::AdminAddress, PathBuf) {
    let dir = common::temp_dir("pki");
    let pki = pki(&dir);
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).expect("write CA");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin = format!("tls:127.0.0.1:{port}");
    let server = Server::start_with(
        1,
        "",
        &[
            "--tls-cert-file",
            pki.cert_file.to_str().unwrap(),
            "--tls-key-file",
            pki.key_file.to_str().unwrap(),
            "--admin",
            &admin,
            "--admin-key",
            ADMIN_KEY,
        ],
    );
    let address = kometa_admin_client::AdminAddress::parse(&admin).expect("tls: address");
    (server, pki, address, ca_file)
}

#[test]
fn the_admin_listener_speaks_tls_and_still_wants_the_key() {
    use kometa_admin_client::{AdminClient, ClientError};
    let (server, server_pki, address, ca_file) = tls_admin_server();
    let mut subscriber = wss(&server, &server_pki);
    subscriber.send(Message::text(r#"{"op":"subscribe","channel":"news","id":1}"#)).unwrap();
    assert_eq!(recv_json(&mut subscriber)["ok"], true);

    let mut admin = AdminClient::connect_with_ca(&address, Some(ADMIN_KEY), TIMEOUT, Some(&ca_file))
        .expect("admin over TLS with the key");
    // Large enough for several TLS records each way.
    let big = format!("\"{}\"", "x".repeat(100_000));
    let published = admin.publish("news", "e", big.as_bytes()).expect("publish over TLS");
    assert_eq!(published.subscribers, 1);
    let push = recv_json(&mut subscriber);
    assert_eq!(push["data"].as_str().map(str::len), Some(100_000));
    let stats = admin.stats().expect("stats over TLS");
    assert_eq!(stats["connections"], 1, "{stats}");

    // TLS does not replace the key.
    let mut keyless = AdminClient::connect_with_ca(&address, None, TIMEOUT, Some(&ca_file)).expect("connect");
    match keyless.ping() {
        Err(ClientError::Server(error)) => assert!(error.message.contains("AUTH"), "{error}"),
        other => panic!("a request without AUTH: {other:?}"),
    }

    // A client that trusts another CA refuses the server, and says so.
    let other_dir = common::temp_dir("other-pki");
    let other = pki(&other_dir);
    let other_ca = other_dir.join("ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).unwrap();
    let refused = AdminClient::connect_with_ca(&address, Some(ADMIN_KEY), TIMEOUT, Some(&other_ca))
        .err()
        .expect("an unknown issuer is refused");
    assert!(refused.to_string().contains("TLS handshake"), "{refused}");

    // Plain TCP to the TLS port gets no service (and does not hang).
    let tcp = match &address {
        kometa_admin_client::AdminAddress::Tls { port, .. } => {
            kometa_admin_client::AdminAddress::Tcp(format!("127.0.0.1:{port}").parse().unwrap())
        }
        other => panic!("{other}"),
    };
    assert!(AdminClient::connect(&tcp, Some(ADMIN_KEY), TIMEOUT).is_err(), "plain TCP served on the TLS port");

    // The CLI with the CA in KOMETA_ADMIN_CA.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["stats", "--admin", &address.to_string(), "--admin-key", ADMIN_KEY])
        .env("KOMETA_ADMIN_CA", &ca_file)
        .output()
        .expect("kometa stats");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stats: Value = serde_json::from_slice(&output.stdout).expect("STATS JSON");
    assert_eq!(stats["connections"], 1, "{stats}");
    // The server kept serving through all of it.
    assert!(admin.ping().is_ok());
}

#[test]
fn a_tls_admin_address_needs_a_certificate() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kometa"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "tls:127.0.0.1:1", "--admin-key", ADMIN_KEY])
        .output()
        .expect("kometa serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`admin`") && stderr.contains("tls.cert_file"), "{stderr}");
}
