//! A rustls client against the server session, in memory: the compact
//! record layer must interoperate with a real TLS stack.

use std::io::{Read, Write};

use super::*;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

struct Pki {
    config: Arc<ServerConfig>,
    roots: rustls::RootCertStore,
    _dir: std::path::PathBuf,
}

fn pki() -> Pki {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("kometa-tls-unit-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).expect("write cert");
    std::fs::write(&key_file, certified.key_pair.serialize_pem()).expect("write key");
    let config = server_config(cert_file.to_str().unwrap(), key_file.to_str().unwrap()).expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("root");
    Pki { config, roots, _dir: dir }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[allow(deprecated)] // ring: see server_config
fn client(pki: &Pki, aes_only: bool, tls12: bool) -> ClientConnection {
    let mut provider = rustls::crypto::ring::default_provider();
    if aes_only {
        provider.cipher_suites.retain(|s| !format!("{:?}", s.suite()).contains("CHACHA"));
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Moves bytes both ways until neither side has anything to say, feeding
/// the server `chunk` bytes at a time. Returns the plaintext the server got.
fn pump(client: &mut ClientConnection, server: &mut TlsSession, chunk: usize) -> (Vec<u8>, Received) {
    let mut plaintext = Vec::new();
    let mut received = Received::default();
    for _ in 0..50 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        for piece in wire.chunks_mut(chunk.max(1)) {
            let got = server.receive(piece, &mut plaintext).unwrap();
            received.handshake_done |= got.handshake_done;
            received.peer_closed |= got.peer_closed;
        }
        let held = server.held().to_vec();
        server.advance_held(held.len());
        let mut reader = &held[..];
        while !reader.is_empty() {
            client.read_tls(&mut reader).unwrap();
        }
        client.process_new_packets().unwrap();
        if wire.is_empty() && held.is_empty() {
            break;
        }
    }
    (plaintext, received)
}

fn server_to_client(server: &mut TlsSession, client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::new();
    let taken = server.seal([data].into_iter(), usize::MAX, &mut sealed).unwrap();
    assert_eq!(taken, data.len());
    let mut reader = &sealed[..];
    let mut out = vec![0; data.len() + 16];
    let mut got = Vec::new();
    while !reader.is_empty() {
        client.read_tls(&mut reader).unwrap();
        client.process_new_packets().unwrap();
        while let Ok(n) = client.reader().read(&mut out) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&out[..n]);
        }
    }
    got
}

fn roundtrip(aes_only: bool, tls12: bool, chunk: usize) -> TlsSession {
    let pki = pki();
    let mut client = client(&pki, aes_only, tls12);
    let mut server = TlsSession::new(&pki.config).unwrap();
    // The request rides with the client's Finished.
    client.writer().write_all(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
    let (plaintext, received) = pump(&mut client, &mut server, chunk);
    assert!(received.handshake_done);
    assert!(!client.is_handshaking());
    assert_eq!(plaintext, b"GET /ws HTTP/1.1\r\n\r\n");
    // Both ways, including messages over one record.
    let big = vec![b'x'; 40_000];
    assert_eq!(server_to_client(&mut server, &mut client, b"hello"), b"hello");
    assert_eq!(server_to_client(&mut server, &mut client, &big), big);
    client.writer().write_all(&big).unwrap();
    let (plaintext, _) = pump(&mut client, &mut server, chunk);
    assert_eq!(plaintext, big);
    // close_notify from the client ends the input.
    client.send_close_notify();
    let (_, received) = pump(&mut client, &mut server, chunk);
    assert!(received.peer_closed);
    server
}

#[test]
fn tls13_chacha_moves_to_the_compact_record_layer() {
    let server = roundtrip(false, false, usize::MAX);
    assert!(server.is_compact());
}

#[test]
fn input_split_into_single_bytes_still_works() {
    let server = roundtrip(false, false, 1);
    assert!(server.is_compact());
}

#[test]
fn aes_only_and_tls12_clients_keep_rustls() {
    assert!(!roundtrip(true, false, usize::MAX).is_compact());
    assert!(!roundtrip(false, true, 7).is_compact());
}

#[test]
fn our_close_notify_reaches_the_client() {
    let pki = pki();
    let mut client = client(&pki, false, false);
    let mut server = TlsSession::new(&pki.config).unwrap();
    pump(&mut client, &mut server, usize::MAX);
    server.close_notify();
    let held = server.held().to_vec();
    let mut reader = &held[..];
    client.read_tls(&mut reader).unwrap();
    let state = client.process_new_packets().unwrap();
    assert!(state.peer_has_closed());
}

#[test]
fn plain_http_on_the_tls_port_is_recognised() {
    let pki = pki();
    let mut server = TlsSession::new(&pki.config).unwrap();
    let mut request = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    assert!(matches!(server.receive(&mut request, &mut Vec::new()), Err(TlsError::NotTls)));
}

#[test]
fn garbage_after_the_handshake_fails_the_session() {
    let pki = pki();
    let mut client = client(&pki, false, false);
    let mut server = TlsSession::new(&pki.config).unwrap();
    pump(&mut client, &mut server, usize::MAX);
    let mut forged = vec![23, 3, 3, 0, 20];
    forged.extend_from_slice(&[0; 20]);
    assert!(server.receive(&mut forged, &mut Vec::new()).is_err());
}

#[test]
fn idle_sessions_hold_no_buffers() {
    let pki = pki();
    let mut client = client(&pki, false, false);
    let mut server = TlsSession::new(&pki.config).unwrap();
    pump(&mut client, &mut server, usize::MAX);
    assert!(server.held().is_empty());
    assert_eq!(server.rx_partial.capacity(), 0);
    assert_eq!(server.tx_held.capacity(), 0);
}
