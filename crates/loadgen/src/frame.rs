//! Server-to-client WebSocket frames (RFC 6455 §5.2), as the load generator
//! reads them: unmasked, any size up to a limit, fragments allowed.

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// One complete frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerFrame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
    /// Bytes of input the frame used (header and payload).
    pub consumed: usize,
}

/// A frame no server may send; the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Server frames must not be masked (§5.1).
    Masked,
    /// RSV bits without an extension, or a reserved opcode.
    Reserved,
    /// Longer than the generator's limit.
    TooLarge,
}

impl FrameError {
    pub fn kind(self) -> &'static str {
        match self {
            FrameError::Masked => "masked_server_frame",
            FrameError::Reserved => "reserved_bits_or_opcode",
            FrameError::TooLarge => "frame_too_large",
        }
    }
}

/// Parses the frame at the start of `input`. `Ok(None)`: more bytes needed;
/// the declared length was already checked against `payload_bytes_max`, so
/// the caller may buffer the rest.
pub fn parse(input: &[u8], payload_bytes_max: usize) -> Result<Option<ServerFrame<'_>>, FrameError> {
    let (Some(&first), Some(&second)) = (input.first(), input.get(1)) else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = first & 0x0F;
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(FrameError::Reserved);
    }
    if second & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (length, header_bytes) = match second & 0x7F {
        126 => match input.get(2..4) {
            Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(bytes) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                (u64::from_be_bytes(word), 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    if length > payload_bytes_max as u64 {
        return Err(FrameError::TooLarge);
    }
    // Checked above: length fits in usize.
    let end = header_bytes + length as usize;
    match input.get(header_bytes..end) {
        Some(payload) => Ok(Some(ServerFrame { fin: first & 0x80 != 0, opcode, payload, consumed: end })),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kometa_protocol::ws::{encode_close, encode_frame};

    #[test]
    fn parses_server_frames_of_every_length_class() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode_frame(OPCODE_TEXT, &payload);
            let parsed = parse(&frame, 1 << 20).unwrap().unwrap();
            assert_eq!(parsed.payload, &payload[..], "len {len}");
            assert_eq!(parsed.consumed, frame.len());
            assert!(parsed.fin);
            assert_eq!(parsed.opcode, OPCODE_TEXT);
            // Every cut of the frame needs more bytes.
            for cut in [0, 1, frame.len() / 2, frame.len() - 1] {
                if cut < frame.len() {
                    assert_eq!(parse(&frame[..cut], 1 << 20).unwrap(), None, "len {len} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn close_and_fragments() {
        let close = encode_close(1001, "bye");
        let parsed = parse(&close, 125).unwrap().unwrap();
        assert_eq!(parsed.opcode, OPCODE_CLOSE);
        assert_eq!(&parsed.payload[..2], &1001u16.to_be_bytes());
        let first = [0x01, 0x02, b'a', b'b'];
        let parsed = parse(&first, 125).unwrap().unwrap();
        assert!(!parsed.fin);
        assert_eq!(parsed.opcode, OPCODE_TEXT);
    }

    #[test]
    fn refuses_what_servers_must_not_send() {
        assert_eq!(parse(&[0x81, 0x82, 1, 2, 3, 4, 0, 0], 125), Err(FrameError::Masked));
        assert_eq!(parse(&[0xC1, 0x00], 125), Err(FrameError::Reserved));
        assert_eq!(parse(&[0x83, 0x00], 125), Err(FrameError::Reserved));
        // The length is checked before the payload arrives.
        assert_eq!(parse(&[0x82, 0x7E, 0x10, 0x00], 1000), Err(FrameError::TooLarge));
        assert_eq!(
            parse(&[0x82, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 1000),
            Err(FrameError::TooLarge)
        );
    }
}
