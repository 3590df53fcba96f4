//! The TLS 1.3 record layer for ChaCha20-Poly1305 (RFC 8446 §5), run with
//! the traffic keys rustls hands over after the handshake (the same
//! secrets kTLS takes). Why not keep rustls' own record layer: it costs
//! about 3 KiB per connection (measured with its unbuffered API), ring's
//! AEAD key alone is 544 bytes because it is sized for AES; this state is
//! 104 bytes. An idle TLS connection stays close to a plain one.
//!
//! Only what a server needs after the handshake is handled: application
//! data both ways, the peer's alerts (close_notify ends the input; any
//! other alert is an error), and no post-handshake handshake messages: a
//! client's KeyUpdate is refused (browsers do not send one; a client that
//! does reconnects). Our own sequence numbers cannot run out (2^64 records).

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

/// Largest plaintext of one record (RFC 8446 §5.1).
pub const RECORD_PLAINTEXT_MAX: usize = 1 << 14;
/// Largest ciphertext of one record: plaintext, content type, padding
/// and tag (RFC 8446 §5.2).
pub const RECORD_CIPHERTEXT_MAX: usize = RECORD_PLAINTEXT_MAX + 256;
/// Record header: type, legacy version, length.
pub const HEADER_BYTES: usize = 5;
const TAG_BYTES: usize = 16;
/// What sealing adds to each record's plaintext: header, content type, tag.
pub const RECORD_OVERHEAD: usize = HEADER_BYTES + 1 + TAG_BYTES;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Keys, IV and sequence number of one direction.
pub struct Direction {
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    pub fn new(key: [u8; 32], iv: [u8; 12], seq: u64) -> Direction {
        Direction { key, iv, seq }
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (byte, seq_byte) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq_byte;
        }
        self.seq += 1;
        Nonce::from(nonce)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.key))
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Keys do not linger in freed memory.
        self.key.iter_mut().for_each(|b| *b = 0);
    }
}

/// Why the input cannot be read on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// A record that is not TLS 1.3 application data, or too long.
    Malformed,
    /// Authentication failed: corrupted or forged.
    BadRecordMac,
    /// The peer sent a fatal alert.
    Alert(u8),
    /// A KeyUpdate or other post-handshake message we do not take.
    Unsupported,
}

impl RecordError {
    pub fn reason(self) -> &'static str {
        match self {
            RecordError::Malformed => "malformed TLS record",
            RecordError::BadRecordMac => "TLS record failed authentication",
            RecordError::Alert(_) => "TLS alert from the peer",
            RecordError::Unsupported => "TLS post-handshake message not supported (KeyUpdate)",
        }
    }
}

/// What `open` made of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Input bytes used (whole records); the rest is a partial record.
    pub consumed: usize,
    /// The peer sent close_notify: no more input will come.
    pub peer_closed: bool,
}

/// A connection's record layer after the handshake.
pub struct Records {
    pub tx: Direction,
    pub rx: Direction,
}

impl Records {
    /// Seals `plaintext` into records of at most `RECORD_PLAINTEXT_MAX`,
    /// appended to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        for chunk in plaintext.chunks(RECORD_PLAINTEXT_MAX) {
            self.seal_record(CONTENT_APPLICATION_DATA, chunk, out);
        }
    }

    /// Appends a close_notify alert.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) {
        self.seal_record(CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY], out);
    }

    fn seal_record(&mut self, content_type: u8, plaintext: &[u8], out: &mut Vec<u8>) {
        debug_assert!(plaintext.len() <= RECORD_PLAINTEXT_MAX);
        let sealed_len = plaintext.len() + 1 + TAG_BYTES;
        let start = out.len();
        out.reserve(HEADER_BYTES + sealed_len);
        out.extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3]);
        out.extend_from_slice(&(sealed_len as u16).to_be_bytes());
        out.extend_from_slice(plaintext);
        out.push(content_type);
        let (header, body) = out[start..].split_at_mut(HEADER_BYTES);
        let nonce = self.tx.next_nonce();
        // Encryption fails only for buffers over ChaCha20's 256 GiB limit.
        let tag = match self.tx.cipher().encrypt_in_place_detached(&nonce, header, body) {
            Ok(tag) => tag,
            Err(_) => unreachable!("a record is far below ChaCha20's length limit"),
        };
        out.extend_from_slice(&tag);
    }

    /// Opens the whole records at the start of `input` (in place) and
    /// appends their application data to `plaintext`.
    pub fn open(&mut self, input: &mut [u8], plaintext: &mut Vec<u8>) -> Result<Opened, RecordError> {
        let mut position = 0;
        while input.len() - position >= HEADER_BYTES {
            let header: [u8; HEADER_BYTES] = match input[position..position + HEADER_BYTES].try_into() {
                Ok(header) => header,
                Err(_) => return Err(RecordError::Malformed),
            };
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != CONTENT_APPLICATION_DATA || !(1 + TAG_BYTES..=RECORD_CIPHERTEXT_MAX).contains(&length) {
                return Err(RecordError::Malformed);
            }
            let end = position + HEADER_BYTES + length;
            if input.len() < end {
                break;
            }
            let body = &mut input[position + HEADER_BYTES..end];
            let (sealed, tag) = body.split_at_mut(length - TAG_BYTES);
            let nonce = self.rx.next_nonce();
            self.rx
                .cipher()
                .decrypt_in_place_detached(&nonce, &header, sealed, Tag::from_slice(tag))
                .map_err(|_| RecordError::BadRecordMac)?;
            position = end;
            // TLSInnerPlaintext: content, content type, zero padding.
            let Some(type_at) = sealed.iter().rposition(|&byte| byte != 0) else {
                return Err(RecordError::Malformed);
            };
            let content = &sealed[..type_at];
            match sealed[type_at] {
                CONTENT_APPLICATION_DATA => plaintext.extend_from_slice(content),
                CONTENT_ALERT if content.get(1) == Some(&ALERT_CLOSE_NOTIFY) => {
                    return Ok(Opened { consumed: position, peer_closed: true });
                }
                CONTENT_ALERT => return Err(RecordError::Alert(content.get(1).copied().unwrap_or(0))),
                CONTENT_HANDSHAKE => return Err(RecordError::Unsupported),
                _ => return Err(RecordError::Malformed),
            }
        }
        Ok(Opened { consumed: position, peer_closed: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Records, Records) {
        let (key_a, iv_a, key_b, iv_b) = ([1; 32], [2; 12], [3; 32], [4; 12]);
        let server = Records { tx: Direction::new(key_a, iv_a, 0), rx: Direction::new(key_b, iv_b, 0) };
        let client = Records { tx: Direction::new(key_b, iv_b, 0), rx: Direction::new(key_a, iv_a, 0) };
        (server, client)
    }

    #[test]
    fn sealed_records_open_in_order_even_when_split() {
        let (mut server, mut client) = pair();
        let mut wire = Vec::new();
        server.seal(b"hello", &mut wire);
        server.seal(&vec![7u8; RECORD_PLAINTEXT_MAX + 10], &mut wire);
        assert_eq!(wire.len(), 5 + 3 * RECORD_OVERHEAD + RECORD_PLAINTEXT_MAX + 10);
        let mut plaintext = Vec::new();
        // A partial record is left for later.
        let split = 30;
        let opened = client.open(&mut wire[..split], &mut plaintext).unwrap();
        assert_eq!(opened, Opened { consumed: 5 + RECORD_OVERHEAD, peer_closed: false });
        assert_eq!(plaintext, b"hello");
        let opened = client.open(&mut wire[opened.consumed..], &mut plaintext).unwrap();
        assert_eq!(opened.consumed, wire.len() - 5 - RECORD_OVERHEAD);
        assert_eq!(plaintext.len(), 5 + RECORD_PLAINTEXT_MAX + 10);
    }

    #[test]
    fn tampering_and_replay_are_refused() {
        let (mut server, mut client) = pair();
        let mut wire = Vec::new();
        server.seal(b"data", &mut wire);
        let mut tampered = wire.clone();
        tampered[7] ^= 1;
        assert_eq!(client.open(&mut tampered, &mut Vec::new()), Err(RecordError::BadRecordMac));
        let (_, mut fresh) = pair();
        let mut replay = wire.clone();
        fresh.open(&mut wire, &mut Vec::new()).unwrap();
        assert_eq!(fresh.open(&mut replay, &mut Vec::new()), Err(RecordError::BadRecordMac), "sequence moved on");
    }

    #[test]
    fn close_notify_ends_input() {
        let (mut server, mut client) = pair();
        let mut wire = Vec::new();
        client.seal(b"last", &mut wire);
        client.seal_close_notify(&mut wire);
        let mut plaintext = Vec::new();
        let opened = server.open(&mut wire, &mut plaintext).unwrap();
        assert!(opened.peer_closed);
        assert_eq!(plaintext, b"last");
    }

    #[test]
    fn oversized_and_foreign_records_are_malformed() {
        let (mut server, _) = pair();
        let mut long = vec![23, 3, 3, 0xff, 0xff];
        assert_eq!(server.open(&mut long, &mut Vec::new()), Err(RecordError::Malformed));
        let mut handshake = vec![22, 3, 3, 0, 40];
        assert_eq!(server.open(&mut handshake, &mut Vec::new()), Err(RecordError::Malformed));
    }
}
