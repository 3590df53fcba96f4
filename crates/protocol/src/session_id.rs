//! HTTP session ids (`s{shard}.{key}.{generation}.{secret}`: where the
//! session lives, and 128 random bits that make it unguessable) and SSE
//! event ids (`SESSION:SEQ`).

/// Parses a session id into its routing parts: shard, slab key, generation.
pub fn parse_session_id(id: &str) -> Option<(usize, u32, u32)> {
    let rest = id.strip_prefix('s')?;
    let mut parts = rest.split('.');
    let shard = parts.next()?.parse().ok()?;
    let key = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let secret = parts.next()?;
    if parts.next().is_some() || secret.len() != 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((shard, key, generation))
}

/// Builds a session id.
pub fn make_session_id(shard: usize, key: u32, generation: u32, secret: &[u8; 16]) -> Box<str> {
    format!("s{shard}.{key}.{generation}.{}", crate::hex(secret)).into_boxed_str()
}

/// Splits `SESSION:SEQ` (an SSE event id) into the session id and sequence.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let (session, seq) = id.rsplit_once(':')?;
    Some((session, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let id = make_session_id(1, 42, 7, &[0xab; 16]);
        assert_eq!(parse_session_id(&id), Some((1, 42, 7)));
        assert_eq!(parse_session_id("s1.42.7.short"), None);
        assert_eq!(parse_session_id("x1.42.7.abababababababababababababababab"), None);
        assert_eq!(parse_session_id("s1.42.7.abababababababababababababababab.9"), None);
        assert_eq!(parse_event_id(&format!("{id}:12")), Some((&*id, 12)));
        assert_eq!(parse_event_id("nope"), None);
    }
}
