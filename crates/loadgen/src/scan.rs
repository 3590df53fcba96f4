//! A small hand-written scanner for the fields the load generator reads from
//! every push: the send timestamp `"t":`, the sequence number `"s":` and, for
//! Kometa pushes, the channel `"offset":`.
//!
//! Running serde_json over every one of hundreds of thousands of pushes a
//! second would make the generator, not the server, the saturated side. The
//! generator writes the publication data itself (`{"t":…,"s":…,"p":"…"}`, the
//! padding last so scans stop early), and Kometa channel and event names
//! cannot contain quotes, so a key's quoted form can only match the key.

/// What a push says about itself. Any field may be missing (a push the
/// generator did not publish, or a peer's own message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushFields {
    /// CLOCK_MONOTONIC nanoseconds when the publisher sent it.
    pub sent_ns: Option<u64>,
    /// The publisher's sequence number, from 0.
    pub seq: Option<u64>,
    /// The channel offset the server assigned (Kometa pushes).
    pub offset: Option<u64>,
}

/// Finds `needle` in `haystack`; starts at each `"` only, which is every
/// needle's first byte here.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while from + needle.len() <= haystack.len() {
        let at = from + haystack[from..].iter().position(|&b| b == first)?;
        if haystack.get(at..at + needle.len()) == Some(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The unsigned integer right after `key` (a quoted key with its colon,
/// like `"t":`), skipping JSON whitespace. None when absent, not a number,
/// or over u64.
pub fn u64_after(haystack: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(haystack, key)? + key.len();
    let rest = &haystack[start..];
    let digits_from = rest.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))?;
    let mut value: u64 = 0;
    let mut digits = 0;
    for &byte in &rest[digits_from..] {
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

/// Reads the fields of one push. `with_offset` is false for peers whose
/// pushes are the bare publication data.
pub fn scan_push(message: &[u8], with_offset: bool) -> PushFields {
    PushFields {
        offset: if with_offset { u64_after(message, b"\"offset\":") } else { None },
        sent_ns: u64_after(message, b"\"t\":"),
        seq: u64_after(message, b"\"s\":"),
    }
}

/// The first key of a JSON object (`{"channel":…` gives `channel`), to tell
/// a Kometa push from a reply without parsing it. Keys with escapes are not
/// recognised (None), which sends the message down the slow, exact path.
pub fn first_key(message: &[u8]) -> Option<&[u8]> {
    let start = message.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))?;
    let rest = message[start..].strip_prefix(b"{")?;
    let quote = rest.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))?;
    let rest = rest[quote..].strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    (rest[end] == b'"').then(|| &rest[..end])
}

/// The publication data the generator sends: `{"t":NS,"s":SEQ,"p":"xxx…"}`,
/// padded with `p` to `payload_bytes` when that is longer than the rest.
pub fn write_publication(out: &mut Vec<u8>, sent_ns: u64, seq: u64, payload_bytes: usize) {
    use std::io::Write as _;
    out.clear();
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{{\"t\":{sent_ns},\"s\":{seq}");
    let closing = b",\"p\":\"\"}".len();
    if payload_bytes > out.len() + closing {
        let padding = payload_bytes - out.len() - closing;
        out.extend_from_slice(b",\"p\":\"");
        out.resize(out.len() + padding, b'x');
        out.extend_from_slice(b"\"}");
    } else {
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kometa_push_fields() {
        let push = br#"{"channel":"news","event":"update","offset":18,"data":{"t":123456789,"s":7,"p":"xx"}}"#;
        assert_eq!(scan_push(push, true), PushFields { sent_ns: Some(123_456_789), seq: Some(7), offset: Some(18) });
        assert_eq!(first_key(push), Some(&b"channel"[..]));
    }

    #[test]
    fn raw_push_fields_and_whitespace() {
        let push = b"{ \"t\" :1}";
        // The key must be written exactly `"t":` (as the generator writes it).
        assert_eq!(scan_push(push, false).sent_ns, None);
        let push = b"{\"t\": 42,\n\"s\":\t0}";
        assert_eq!(scan_push(push, false), PushFields { sent_ns: Some(42), seq: Some(0), offset: None });
    }

    #[test]
    fn keys_are_not_confused_with_longer_keys_or_values() {
        // `"offset":` ends in `t":` and `"ts":` contains `s":`; neither is `"t":` or `"s":`.
        let push = br#"{"offset":5,"ts":9,"data":{"x":"s","s":3}}"#;
        let fields = scan_push(push, true);
        assert_eq!(fields.offset, Some(5));
        assert_eq!(fields.sent_ns, None);
        assert_eq!(fields.seq, Some(3));
        // A channel named `t` is written `"channel":"t",`: no colon after the quote.
        assert_eq!(u64_after(br#"{"channel":"t","offset":1}"#, b"\"t\":"), None);
    }

    #[test]
    fn bad_numbers_are_none() {
        assert_eq!(u64_after(br#"{"t":"12"}"#, b"\"t\":"), None);
        assert_eq!(u64_after(br#"{"t":-1}"#, b"\"t\":"), None);
        assert_eq!(u64_after(br#"{"t":}"#, b"\"t\":"), None);
        assert_eq!(u64_after(br#"{"t":99999999999999999999999}"#, b"\"t\":"), None);
        assert_eq!(u64_after(br#"{"t":18446744073709551615}"#, b"\"t\":"), Some(u64::MAX));
        assert_eq!(u64_after(b"\"t\":", b"\"t\":"), None);
        assert_eq!(u64_after(b"", b"\"t\":"), None);
    }

    #[test]
    fn first_key_of_replies_and_junk() {
        assert_eq!(first_key(br#" {"id":1,"ok":true}"#), Some(&b"id"[..]));
        assert_eq!(first_key(br#"{"error":{}}"#), Some(&b"error"[..]));
        assert_eq!(first_key(br#"{"ch\"x":1}"#), None);
        assert_eq!(first_key(b"[1,2]"), None);
        assert_eq!(first_key(b"{"), None);
        assert_eq!(first_key(b""), None);
    }

    #[test]
    fn publications_are_padded_json_the_scanner_reads_back() {
        let mut out = Vec::new();
        for payload_bytes in [0usize, 10, 30, 31, 32, 100, 4096] {
            write_publication(&mut out, 1_700_000_000_123, 42, payload_bytes);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(value["t"], 1_700_000_000_123u64);
            assert_eq!(value["s"], 42);
            if payload_bytes > 32 {
                assert_eq!(out.len(), payload_bytes, "{}", String::from_utf8_lossy(&out));
            }
            assert_eq!(
                scan_push(&out, false),
                PushFields { sent_ns: Some(1_700_000_000_123), seq: Some(42), offset: None }
            );
        }
    }
}
