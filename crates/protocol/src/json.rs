//! Tiny JSON writers for the hot paths (pushes and replies).
//!
//! Server frames are built by appending to a `Vec<u8>`; building a
//! `serde_json::Value` per message would allocate a tree only to flatten it.
//! Strings always go through serde_json's escaper, so a hostile channel or
//! user name can never break out of its quotes.

use std::io::Write;

/// Checks that `data` is exactly one JSON value (surrounding whitespace allowed).
pub fn validate(data: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(data).map(|_| ()).map_err(|e| {
        let mut text = e.to_string();
        text.truncate(120);
        text
    })
}

/// Whether `data` nests arrays and objects deeper than `depth_max` (`1` and
/// `"s"` have depth 0, `[1]` and `{}` depth 1, `{"a":[1]}` depth 2). A
/// byte scan that never recurses, so any depth is measured safely; strings
/// are skipped (brackets inside them do not count). Meant for data that is
/// valid JSON or about to be validated.
pub fn nested_deeper_than(data: &[u8], depth_max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in data {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > depth_max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Replaces raw CR and LF with spaces. In valid JSON they can only be
/// insignificant whitespace (strings must escape them), so the value is
/// unchanged, and an SSE `data:` line can carry it without splitting.
pub fn single_line(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !data.iter().any(|&b| b == b'\n' || b == b'\r') {
        return std::borrow::Cow::Borrowed(data);
    }
    std::borrow::Cow::Owned(data.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect())
}

/// Appends `value` as a quoted, escaped JSON string.
pub fn write_str(out: &mut Vec<u8>, value: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Appends an unsigned integer.
pub fn write_u64(out: &mut Vec<u8>, value: u64) {
    let _ = write!(out, "{value}");
}

/// Appends `"key":` (the key is a trusted literal, so it is not escaped).
pub fn write_key(out: &mut Vec<u8>, key: &str) {
    debug_assert!(!key.contains(['"', '\\']));
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Writes a JSON object from a closure that appends `"key":value` pairs,
/// inserting commas itself.
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, first: true }
    }

    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_key(self.out, key);
        self.out
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        let out = self.key(key);
        write_str(out, value);
        self
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        let out = self.key(key);
        write_u64(out, value);
        self
    }

    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        let out = self.key(key);
        if value < 0 {
            out.push(b'-');
        }
        write_u64(out, value.unsigned_abs());
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// Appends an already-encoded JSON value verbatim (validated by the caller).
    pub fn raw(&mut self, key: &str, json: &[u8]) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(json);
        self
    }

    pub fn finish(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_single_line() {
        assert!(validate(b" {\"a\": [1, 2]}\n").is_ok());
        assert!(validate(b"\"plain\"").is_ok());
        assert!(validate(b"{\"a\":").is_err());
        assert!(validate(b"1 2").is_err());
        assert!(validate(b"").is_err());
        let pretty = b"{\n  \"a\": \"x\\ny\"\r\n}";
        let flat = single_line(pretty);
        assert!(!flat.contains(&b'\n'));
        let before: serde_json::Value = serde_json::from_slice(pretty).unwrap();
        let after: serde_json::Value = serde_json::from_slice(&flat).unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn nesting_depth() {
        assert!(!nested_deeper_than(b"1", 0));
        assert!(!nested_deeper_than(b"\"[[[{\"", 0), "brackets inside strings do not count");
        assert!(!nested_deeper_than(br#"{"a":"\"[","b":[1]}"#, 2));
        assert!(nested_deeper_than(br#"{"a":"\"[","b":[1]}"#, 1));
        assert!(!nested_deeper_than(b"[[],[],{}]", 2));
        assert!(nested_deeper_than(b"[[],[[]]]", 2));
        let deep = "[".repeat(100_000);
        assert!(nested_deeper_than(deep.as_bytes(), 32));
        let exact = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(!nested_deeper_than(exact.as_bytes(), 32));
        assert!(nested_deeper_than(exact.as_bytes(), 31));
    }

    #[test]
    fn object_writer_escapes_and_separates() {
        let mut out = Vec::new();
        let mut w = ObjectWriter::new(&mut out);
        w.str("channel", "a\"b\\c\n").u64("offset", 7).bool("ok", true).raw("data", b"[1,2]");
        w.finish();
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["channel"], "a\"b\\c\n");
        assert_eq!(parsed["offset"], 7);
        assert_eq!(parsed["ok"], true);
        assert_eq!(parsed["data"], serde_json::json!([1, 2]));
    }
}
