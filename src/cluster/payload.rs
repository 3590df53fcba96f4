//! What travels over Redis pub/sub between nodes. The Lua scripts build
//! these messages (`scripts.rs`); this module reads them. Fields are
//! separated by `\n`: every field but the last is a name, an epoch or a
//! number (none can contain a newline), and the last one (JSON data, or a
//! close reason) is taken whole.
//!
//! | first field | topic | rest |
//! |---|---|---|
//! | `p` | channel | epoch, offset, event, user (empty: none), data |
//! | `e` | channel | event, data (join/leave: outside the offsets) |
//! | `u` | node | user, inbox seq (empty: not stored), event, data |
//! | `x` | node | user, close code, reason |

/// One decoded pub/sub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push<'a> {
    Publication { epoch: &'a str, offset: u64, event: &'a str, user: Option<&'a str>, data: &'a [u8] },
    ChannelEvent { event: &'a str, data: &'a [u8] },
    UserMessage { user: &'a str, seq: Option<u64>, event: &'a str, data: &'a [u8] },
    CloseUser { user: &'a str, code: u16, reason: &'a str },
}

/// Why a message could not be read (a bug, or another program on our prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPush(pub &'static str);

/// Splits off `count` newline-terminated text fields; the rest is the last field.
fn fields<const N: usize>(bytes: &[u8]) -> Result<([&str; N], &[u8]), BadPush> {
    let mut out = [""; N];
    let mut rest = bytes;
    for slot in out.iter_mut() {
        let end = rest.iter().position(|&b| b == b'\n').ok_or(BadPush("too few fields"))?;
        *slot = std::str::from_utf8(&rest[..end]).map_err(|_| BadPush("a field is not UTF-8"))?;
        rest = &rest[end + 1..];
    }
    Ok((out, rest))
}

fn number(text: &str) -> Result<u64, BadPush> {
    text.parse().map_err(|_| BadPush("a number field is not a number"))
}

impl<'a> Push<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Push<'a>, BadPush> {
        let ([kind], rest) = fields::<1>(bytes)?;
        match kind {
            "p" => {
                let ([epoch, offset, event, user], data) = fields::<4>(rest)?;
                let offset = number(offset)?;
                if offset == 0 || epoch.is_empty() {
                    return Err(BadPush("a publication needs an epoch and an offset"));
                }
                let user = (!user.is_empty()).then_some(user);
                Ok(Push::Publication { epoch, offset, event, user, data })
            }
            "e" => {
                let ([event], data) = fields::<1>(rest)?;
                Ok(Push::ChannelEvent { event, data })
            }
            "u" => {
                let ([user, seq, event], data) = fields::<3>(rest)?;
                let seq = if seq.is_empty() { None } else { Some(number(seq)?) };
                Ok(Push::UserMessage { user, seq, event, data })
            }
            "x" => {
                let ([user, code], reason) = fields::<2>(rest)?;
                let code = u16::try_from(number(code)?).map_err(|_| BadPush("close code out of range"))?;
                let reason = std::str::from_utf8(reason).map_err(|_| BadPush("reason is not UTF-8"))?;
                Ok(Push::CloseUser { user, code, reason })
            }
            _ => Err(BadPush("unknown message kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back() {
        assert_eq!(
            Push::parse(b"p\nabc\n17\nupdate\n\n{\"a\":\"x\\ny\"}").unwrap(),
            Push::Publication { epoch: "abc", offset: 17, event: "update", user: None, data: b"{\"a\":\"x\\ny\"}" }
        );
        assert_eq!(
            Push::parse(b"p\nabc\n1\nmsg\n42\n\"hi\"").unwrap(),
            Push::Publication { epoch: "abc", offset: 1, event: "msg", user: Some("42"), data: b"\"hi\"" }
        );
        assert_eq!(
            Push::parse(b"e\njoin\n{\"user\":\"7\"}").unwrap(),
            Push::ChannelEvent { event: "join", data: b"{\"user\":\"7\"}" }
        );
        assert_eq!(
            Push::parse(b"u\n42\n1700000000000001\nnotice\n1").unwrap(),
            Push::UserMessage { user: "42", seq: Some(1_700_000_000_000_001), event: "notice", data: b"1" }
        );
        assert_eq!(
            Push::parse(b"u\n42\n\nnotice\n1").unwrap(),
            Push::UserMessage { user: "42", seq: None, event: "notice", data: b"1" }
        );
        assert_eq!(
            Push::parse(b"x\n42\n4003\nbye\nnow").unwrap(),
            Push::CloseUser { user: "42", code: 4003, reason: "bye\nnow" }
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in
            [&b""[..], b"p", b"p\nabc\nx\ne\n\n1", b"p\n\n1\ne\n\n1", b"p\nabc\n0\ne\n\n1", b"z\n1", b"x\nu\n70000\nr"]
        {
            assert!(Push::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
