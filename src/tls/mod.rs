//! TLS on the public listener (`tls.cert_file`, `tls.key_file`): wss:// and
//! https:// for SSE and long-polling. Sans-io like the connection: bytes in,
//! plaintext and bytes to send out; the shard moves them.
//!
//! The handshake runs on rustls' unbuffered API, with buffers the shard
//! owns. After it, a TLS 1.3 ChaCha20-Poly1305 connection drops rustls'
//! state (about 3 KiB) for the 104-byte record layer in `record` (the
//! server prefers that suite; every current browser offers it). Other
//! suites and TLS 1.2 keep rustls for the traffic too.
//!
//! A session holds no buffer while idle: a partial record and ciphertext
//! the socket has not taken yet exist only while there are some.

pub mod record;

use std::sync::Arc;

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, ServerConfig};

use record::{Direction, Opened, RecordError, Records, RECORD_CIPHERTEXT_MAX, RECORD_OVERHEAD, RECORD_PLAINTEXT_MAX};

/// The most ciphertext kept for a handshake message that spans records
/// (a client hello with many extensions); past it the handshake fails.
const HANDSHAKE_INPUT_MAX_BYTES: usize = 64 * 1024;
/// Plaintext sealed per write: what a socket takes at once in the common
/// case, so little ciphertext is left held when it pushes back.
pub const SEAL_BUDGET_BYTES: usize = 64 * 1024;
/// The first byte of a TLS handshake record.
const CONTENT_HANDSHAKE: u8 = 22;

/// Builds the server's TLS settings from PEM files: the certificate chain
/// (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert_file: &str, key_file: &str) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("tls.cert_file: cannot read {cert_file}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file: {cert_file}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("tls.cert_file: {cert_file} holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("tls.key_file: {key_file}: {e}"))?;
    // ring, not aws-lc-rs: no C/CMake toolchain to build; its deprecation
    // is about post-quantum key exchange, which ring lacks.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // ChaCha20-Poly1305 first, and our order wins: its keys are what lets
    // an idle connection drop rustls' state (see `record`). AES-GCM stays
    // for clients without it.
    provider.cipher_suites.sort_by_key(|suite| match suite.suite() {
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 0,
        CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    // Key exchange: X25519 first. rustls' ring provider lists P-384 first,
    // and ring does P-384 with generic bignum code: a handshake with it
    // cost ~650 µs of server CPU here against ~100 µs with X25519
    // (perf: `bn_mul_mont_nohw` under `start_and_complete`). Browsers
    // offer X25519 first; this order is for clients that leave it to us.
    provider.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.key_file: {key_file} does not match the certificate or is unusable: {e}"))?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = true;
    // No resumption tickets: they would cost a ticket encryption per
    // handshake and state to rotate keys; clients reconnect with a full
    // handshake (measured in docs/benchmarks.md).
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Why a TLS session ends.
#[derive(Debug)]
pub enum TlsError {
    /// The first bytes are not a TLS handshake: a plain HTTP request on the
    /// TLS port, answered with a plain 400 by the shard.
    NotTls,
    /// The handshake or a record failed (bad client, wrong version, ...).
    Protocol(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::NotTls => f.write_str("not a TLS handshake"),
            TlsError::Protocol(why) => f.write_str(why),
        }
    }
}

impl From<rustls::Error> for TlsError {
    fn from(error: rustls::Error) -> Self {
        TlsError::Protocol(error.to_string())
    }
}

impl From<RecordError> for TlsError {
    fn from(error: RecordError) -> Self {
        TlsError::Protocol(error.reason().to_owned())
    }
}

/// What `receive` found besides plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake finished during this call.
    pub handshake_done: bool,
    /// The peer sent close_notify: no more input.
    pub peer_closed: bool,
}

enum State {
    Handshake(Box<UnbufferedServerConnection>),
    /// TLS 1.3 ChaCha20-Poly1305 after the handshake: our own record layer.
    Compact(Records),
    /// Any other suite: rustls keeps the record layer.
    Rustls(Box<UnbufferedServerConnection>),
    Failed,
}

/// One connection's TLS.
pub struct TlsSession {
    state: State,
    /// Ciphertext of a record (or handshake message) not complete yet.
    rx_partial: Vec<u8>,
    /// Sealed ciphertext the socket has not taken yet; `tx_held_written`
    /// bytes of it are out.
    tx_held: Vec<u8>,
    tx_held_written: usize,
    /// Nothing received yet (a plain HTTP request is recognised by its first byte).
    fresh: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Handshake(_) => "handshake",
            State::Compact(_) => "compact",
            State::Rustls(_) => "rustls",
            State::Failed => "failed",
        };
        // Never the keys.
        f.debug_struct("TlsSession").field("state", &state).field("held", &self.held().len()).finish()
    }
}

impl TlsSession {
    pub fn new(config: &Arc<ServerConfig>) -> Result<TlsSession, TlsError> {
        let connection = UnbufferedServerConnection::new(Arc::clone(config))?;
        Ok(TlsSession {
            state: State::Handshake(Box::new(connection)),
            rx_partial: Vec::new(),
            tx_held: Vec::new(),
            tx_held_written: 0,
            fresh: true,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshake(_))
    }

    /// Whether the connection uses the compact record layer (for tests and stats).
    pub fn is_compact(&self) -> bool {
        matches!(self.state, State::Compact(_))
    }

    /// Decrypts `fresh` ciphertext (after any kept partial record) and
    /// appends the application data to `plaintext`. Handshake messages for
    /// the peer are added to the held output (`held`).
    pub fn receive(&mut self, fresh: &mut [u8], plaintext: &mut Vec<u8>) -> Result<Received, TlsError> {
        if self.fresh && !fresh.is_empty() {
            self.fresh = false;
            if fresh[0] != CONTENT_HANDSHAKE {
                self.state = State::Failed;
                return Err(TlsError::NotTls);
            }
        }
        let mut received = Received::default();
        if self.rx_partial.is_empty() {
            let consumed = self.process(fresh, plaintext, &mut received)?;
            self.keep_partial(&fresh[consumed..])?;
        } else {
            let mut input = std::mem::take(&mut self.rx_partial);
            input.extend_from_slice(fresh);
            let consumed = self.process(&mut input, plaintext, &mut received)?;
            input.drain(..consumed);
            self.rx_partial = input;
            self.keep_partial(&[])?;
        }
        Ok(received)
    }

    fn keep_partial(&mut self, rest: &[u8]) -> Result<(), TlsError> {
        self.rx_partial.extend_from_slice(rest);
        let cap = if self.is_handshaking() { HANDSHAKE_INPUT_MAX_BYTES } else { RECORD_CIPHERTEXT_MAX + 5 };
        if self.rx_partial.len() > cap {
            self.state = State::Failed;
            return Err(TlsError::Protocol(format!("TLS input over {cap} bytes without a whole record")));
        }
        if self.rx_partial.is_empty() {
            self.rx_partial = Vec::new();
        }
        Ok(())
    }

    /// Runs the whole records at the start of `input`; returns the bytes used.
    fn process(
        &mut self,
        input: &mut [u8],
        plaintext: &mut Vec<u8>,
        received: &mut Received,
    ) -> Result<usize, TlsError> {
        let mut start = 0;
        loop {
            match &mut self.state {
                State::Failed => return Err(TlsError::Protocol("TLS session already failed".into())),
                State::Compact(records) => {
                    let Opened { consumed, peer_closed } = records.open(&mut input[start..], plaintext)?;
                    received.peer_closed |= peer_closed;
                    return Ok(start + consumed);
                }
                State::Handshake(connection) | State::Rustls(connection) => {
                    let step = drive(connection, &mut input[start..], plaintext, &mut self.tx_held, received);
                    let (used, outcome) = match step {
                        Ok(step) => step,
                        Err(error) => {
                            self.state = State::Failed;
                            return Err(error);
                        }
                    };
                    start += used;
                    match outcome {
                        Drive::NeedInput => return Ok(start),
                        Drive::HandshakeDone => {
                            received.handshake_done = true;
                            self.finish_handshake()?;
                        }
                    }
                }
            }
        }
    }

    /// The handshake is complete: keep rustls for the traffic, or move to
    /// the compact record layer.
    fn finish_handshake(&mut self) -> Result<(), TlsError> {
        let State::Handshake(connection) = std::mem::replace(&mut self.state, State::Failed) else {
            return Ok(());
        };
        let compact = connection.protocol_version() == Some(ProtocolVersion::TLSv1_3)
            && connection.negotiated_cipher_suite().map(|s| s.suite())
                == Some(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        if !compact {
            self.state = State::Rustls(connection);
            return Ok(());
        }
        // The kernel-TLS hand-over: the secrets are ours; the rest of the
        // state (for tickets and key updates, which we do not do) is dropped.
        let (secrets, _kernel_state) = connection.dangerous_into_kernel_connection()?;
        let direction = |(seq, secrets): (u64, ConnectionTrafficSecrets)| match secrets {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                Ok(Direction::new(key_bytes(&key)?, iv_bytes(&iv)?, seq))
            }
            _ => Err(TlsError::Protocol("unexpected traffic secrets".into())),
        };
        self.state = State::Compact(Records { tx: direction(secrets.tx)?, rx: direction(secrets.rx)? });
        Ok(())
    }

    /// Seals plaintext from `chunks` (at most `budget` bytes) into
    /// `sealed`; returns the plaintext bytes taken.
    pub fn seal<'a>(
        &mut self,
        chunks: impl Iterator<Item = &'a [u8]>,
        budget: usize,
        sealed: &mut Vec<u8>,
    ) -> Result<usize, TlsError> {
        let mut taken = 0;
        for chunk in chunks {
            if taken >= budget {
                break;
            }
            let chunk = &chunk[..chunk.len().min(budget - taken)];
            match &mut self.state {
                State::Compact(records) => records.seal(chunk, sealed),
                State::Rustls(connection) => seal_rustls(connection, chunk, sealed)?,
                State::Handshake(_) | State::Failed => {
                    return Err(TlsError::Protocol("application data before the TLS handshake finished".into()));
                }
            }
            taken += chunk.len();
        }
        Ok(taken)
    }

    /// Ciphertext waiting for the socket.
    pub fn held(&self) -> &[u8] {
        &self.tx_held[self.tx_held_written..]
    }

    /// `written` bytes of the held ciphertext went out.
    pub fn advance_held(&mut self, written: usize) {
        self.tx_held_written += written;
        debug_assert!(self.tx_held_written <= self.tx_held.len());
        if self.tx_held_written >= self.tx_held.len() {
            // Nothing held: no buffer either (invariant 1).
            self.tx_held = Vec::new();
            self.tx_held_written = 0;
        }
    }

    /// Keeps ciphertext the socket did not take.
    pub fn hold(&mut self, rest: &[u8]) {
        if !rest.is_empty() {
            self.tx_held.extend_from_slice(rest);
        }
    }

    /// Holds a close_notify alert for the peer (best effort, compact and
    /// rustls sessions alike).
    pub fn close_notify(&mut self) {
        match &mut self.state {
            State::Compact(records) => {
                let mut alert = Vec::with_capacity(RECORD_OVERHEAD + 2);
                records.seal_close_notify(&mut alert);
                self.tx_held.extend_from_slice(&alert);
            }
            State::Rustls(connection) => {
                let mut alert = vec![0; 64];
                if let Ok(ConnectionState::WriteTraffic(mut traffic)) = connection.process_tls_records(&mut []).state {
                    if let Ok(len) = traffic.queue_close_notify(&mut alert) {
                        self.tx_held.extend_from_slice(&alert[..len]);
                    }
                }
            }
            State::Handshake(_) | State::Failed => {}
        }
    }
}

/// Where driving rustls stopped.
enum Drive {
    /// Every whole record is used; more input is needed.
    NeedInput,
    /// The handshake just completed (the rest of the input is traffic).
    HandshakeDone,
}

/// Runs rustls over `input`: handshake messages out into `held`,
/// application data into `plaintext`. Returns the bytes used and why it stopped.
fn drive(
    connection: &mut UnbufferedServerConnection,
    input: &mut [u8],
    plaintext: &mut Vec<u8>,
    held: &mut Vec<u8>,
    received: &mut Received,
) -> Result<(usize, Drive), TlsError> {
    let was_handshaking = connection.is_handshaking();
    let mut start = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = connection.process_tls_records(&mut input[start..]);
        let stop = match state? {
            ConnectionState::EncodeTlsData(mut encode) => {
                let len = held.len();
                held.resize(len + 4096, 0);
                loop {
                    match encode.encode(&mut held[len..]) {
                        Ok(written) => {
                            held.truncate(len + written);
                            break;
                        }
                        Err(rustls::unbuffered::EncodeError::InsufficientSize(size)) => {
                            held.resize(len + size.required_size, 0);
                        }
                        Err(error) => {
                            held.truncate(len);
                            return Err(TlsError::Protocol(error.to_string()));
                        }
                    }
                }
                false
            }
            // What was encoded is in `held`; the shard sends it after this call.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                false
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                false
            }
            ConnectionState::PeerClosed => {
                received.peer_closed = true;
                false
            }
            // Waiting for input: mid-handshake, or idle (a TLS 1.3 server
            // may write after its own Finished, before the client's arrives).
            ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) | ConnectionState::Closed => true,
            other => return Err(TlsError::Protocol(format!("unexpected TLS state {other:?}"))),
        };
        start += discard;
        if stop {
            let drive =
                if was_handshaking && !connection.is_handshaking() { Drive::HandshakeDone } else { Drive::NeedInput };
            return Ok((start, drive));
        }
    }
}

fn seal_rustls(
    connection: &mut UnbufferedServerConnection,
    chunk: &[u8],
    sealed: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let records = chunk.len() / RECORD_PLAINTEXT_MAX + 1;
    let len = sealed.len();
    sealed.resize(len + chunk.len() + records * (RECORD_OVERHEAD + 64), 0);
    let status = connection.process_tls_records(&mut []);
    let result = match status.state? {
        ConnectionState::WriteTraffic(mut traffic) => {
            traffic.encrypt(chunk, &mut sealed[len..]).map_err(|e| TlsError::Protocol(e.to_string()))
        }
        other => Err(TlsError::Protocol(format!("TLS not ready to write: {other:?}"))),
    };
    match result {
        Ok(written) => {
            sealed.truncate(len + written);
            Ok(())
        }
        Err(error) => {
            sealed.truncate(len);
            Err(error)
        }
    }
}

fn key_bytes(key: &AeadKey) -> Result<[u8; 32], TlsError> {
    key.as_ref().try_into().map_err(|_| TlsError::Protocol("ChaCha20 key is not 32 bytes".into()))
}

fn iv_bytes(iv: &Iv) -> Result<[u8; 12], TlsError> {
    iv.as_ref().try_into().map_err(|_| TlsError::Protocol("TLS IV is not 12 bytes".into()))
}

#[cfg(test)]
mod tests;
