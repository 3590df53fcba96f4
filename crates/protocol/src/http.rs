//! HTTP/1.1 request heads (parsed by httparse, bounded) and response heads.
//!
//! The public port speaks just enough HTTP for WebSocket upgrades, health
//! checks, the SSE/long-poll transports and a few static files. A head that
//! is too large, has too many headers, or is malformed gets a status and a
//! short reason; nothing here ever panics on peer input.

use std::borrow::Cow;
use std::io::Write;

/// The most header slots ever parsed; `http_headers_max` is validated against it.
pub const HEADERS_HARD_MAX: usize = 128;

/// Limits applied to every request head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Bytes from the request line to the blank line, inclusive.
    pub head_bytes_max: usize,
    /// Number of header fields.
    pub headers_max: usize,
}

/// Why a head was refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// The head did not end within `head_bytes_max`.
    TooLarge,
    /// More than `headers_max` header fields.
    TooManyHeaders,
    /// Unparseable request line or header; the text names the problem.
    Malformed(&'static str),
    /// HTTP/2 preface or an HTTP version we do not speak.
    VersionNotSupported,
    /// An `Expect` value other than `100-continue` (RFC 9110 §10.1.1).
    ExpectationFailed,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) => 400,
            HeadError::VersionNotSupported => 505,
            HeadError::ExpectationFailed => 417,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            HeadError::TooLarge => "request head too large",
            HeadError::TooManyHeaders => "too many header fields",
            HeadError::Malformed(why) => why,
            HeadError::VersionNotSupported => "only HTTP/1.0 and HTTP/1.1 are supported",
            HeadError::ExpectationFailed => "the only expectation supported is 100-continue",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Options,
    Other,
}

/// What the client expects before it sends its body (`Expect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Nothing,
    /// `Expect: 100-continue`: the client waits for `100 Continue` (or a
    /// final status) before sending the body.
    Continue,
}

/// The parts of a request head the server acts on. Borrowed from the input.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: Method,
    /// Path without the query string, as sent (not percent-decoded). An
    /// absolute-form target (`http://host/ws`) is reduced to its path; the
    /// asterisk-form of `OPTIONS *` is the path `*`.
    pub path: &'a str,
    /// Query string without the `?`, empty when absent.
    pub query: &'a str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Length of the head in bytes, including the final blank line.
    pub head_len: usize,
    pub connection_close: bool,
    pub connection_keep_alive: bool,
    pub connection_upgrade: bool,
    /// `Upgrade: websocket` was present (case-insensitive token).
    pub upgrade_websocket: bool,
    /// Any `Upgrade` header was present.
    pub upgrade_present: bool,
    pub ws_key: Option<&'a [u8]>,
    pub ws_version: Option<&'a [u8]>,
    /// Raw `Sec-WebSocket-Protocol` value (comma-separated offers).
    pub ws_protocols: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub content_length: Option<u64>,
    /// A `Transfer-Encoding` header was present (request bodies must come
    /// with `Content-Length`; the server refuses these with 400).
    pub transfer_encoding: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (ignored for HTTP/1.0,
    /// RFC 9110 §10.1.1).
    pub expect: Expect,
    pub last_event_id: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

impl Request<'_> {
    /// Whether the connection stays open after the response (RFC 9112 §9.3).
    pub fn keep_alive(&self) -> bool {
        if self.connection_close {
            return false;
        }
        self.minor_version >= 1 || self.connection_keep_alive
    }

    /// Percent-decoded value of the first query parameter called `name`.
    pub fn query_param(&self, name: &str) -> Option<Cow<'_, str>> {
        query_param(self.query, name)
    }
}

/// The values of the headers named in `names` (lower case) in a complete
/// request head, for a backend that wants to see them (the connect proxy).
/// A repeated header's values are joined (`; ` for cookies, else `, `);
/// values are cut at `value_bytes_max` and non-UTF-8 ones are skipped.
pub fn header_values(head: &[u8], names: &[String], value_bytes_max: usize) -> Vec<(String, String)> {
    let mut slots = [httparse::EMPTY_HEADER; HEADERS_HARD_MAX];
    let mut parsed = httparse::Request::new(&mut slots);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return Vec::new();
    }
    let mut found: Vec<(String, String)> = Vec::new();
    for header in parsed.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        if !names.contains(&name) {
            continue;
        }
        let Ok(value) = std::str::from_utf8(header.value) else { continue };
        match found.iter_mut().find(|(known, _)| *known == name) {
            Some((_, joined)) => {
                joined.push_str(if name == "cookie" { "; " } else { ", " });
                joined.push_str(value);
            }
            None => found.push((name, value.to_owned())),
        }
    }
    for (_, value) in &mut found {
        if value.len() > value_bytes_max {
            let mut cut = value_bytes_max;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
        }
    }
    found
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` when the head is not complete yet and still within
/// limits; the caller keeps the bytes and calls again with more.
pub fn parse_head<'a>(buf: &'a [u8], limits: HeadLimits) -> Result<Option<Request<'a>>, HeadError> {
    debug_assert!(limits.headers_max <= HEADERS_HARD_MAX);
    if buf.starts_with(b"PRI * HTTP/2") {
        return Err(HeadError::VersionNotSupported);
    }
    let mut slots = [httparse::EMPTY_HEADER; HEADERS_HARD_MAX];
    let slots = &mut slots[..limits.headers_max.min(HEADERS_HARD_MAX)];
    let mut parsed = httparse::Request::new(slots);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.head_bytes_max {
                return Err(HeadError::TooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(httparse::Error::Token) => return Err(HeadError::Malformed("invalid token in request head")),
        Err(httparse::Error::HeaderName) => return Err(HeadError::Malformed("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(HeadError::Malformed("invalid header value")),
        Err(httparse::Error::NewLine) => return Err(HeadError::Malformed("invalid line ending")),
        Err(httparse::Error::Status) => return Err(HeadError::Malformed("invalid request line")),
    };
    if head_len > limits.head_bytes_max {
        return Err(HeadError::TooLarge);
    }
    let method = match parsed.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        Some("OPTIONS") => Method::Options,
        Some(_) => Method::Other,
        None => return Err(HeadError::Malformed("missing method")),
    };
    let target = parsed.path.ok_or(HeadError::Malformed("missing request target"))?;
    let minor_version = parsed.version.ok_or(HeadError::VersionNotSupported)?;
    let (path, query) = request_target(target, method)?;

    let mut request = Request {
        method,
        path,
        query,
        minor_version,
        head_len,
        connection_close: false,
        connection_keep_alive: false,
        connection_upgrade: false,
        upgrade_websocket: false,
        upgrade_present: false,
        ws_key: None,
        ws_version: None,
        ws_protocols: None,
        origin: None,
        content_length: None,
        transfer_encoding: false,
        expect: Expect::Nothing,
        last_event_id: None,
        authorization: None,
        content_type: None,
    };
    let mut hosts = 0;
    for header in parsed.headers.iter() {
        let name = header.name;
        let value = header.value;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if hosts > 1 {
                return Err(HeadError::Malformed("more than one Host header"));
            }
            if !host_is_valid(trim(value)) {
                return Err(HeadError::Malformed("invalid Host header"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    request.connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    request.connection_keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    request.connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            request.upgrade_present = true;
            if tokens(value).any(|t| t.eq_ignore_ascii_case(b"websocket")) {
                request.upgrade_websocket = true;
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if request.ws_key.is_some() {
                return Err(HeadError::Malformed("duplicate Sec-WebSocket-Key"));
            }
            request.ws_key = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            request.ws_version = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            request.ws_protocols = std::str::from_utf8(value).ok();
        } else if name.eq_ignore_ascii_case("origin") {
            request.origin = std::str::from_utf8(trim(value)).ok();
        } else if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if request.content_length.is_some_and(|previous| previous != length) {
                return Err(HeadError::Malformed("conflicting Content-Length headers"));
            }
            request.content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            request.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("expect") {
            // HTTP/1.0 clients cannot mean it (RFC 9110 §10.1.1): ignored.
            if minor_version >= 1 {
                if !trim(value).eq_ignore_ascii_case(b"100-continue") {
                    return Err(HeadError::ExpectationFailed);
                }
                request.expect = Expect::Continue;
            }
        } else if name.eq_ignore_ascii_case("last-event-id") {
            request.last_event_id = std::str::from_utf8(trim(value)).ok();
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization = std::str::from_utf8(trim(value)).ok();
        } else if name.eq_ignore_ascii_case("content-type") {
            request.content_type = std::str::from_utf8(trim(value)).ok();
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused with 400.
    if minor_version >= 1 && hosts == 0 {
        return Err(HeadError::Malformed("missing Host header (required by HTTP/1.1)"));
    }
    Ok(Some(request))
}

/// A request line httparse refused for its version: `HTTP/d.d` we do not
/// speak is 505; anything else there (a 1.x version httparse would take
/// means the line around it is broken) is a malformed request line, 400.
fn version_error(buf: &[u8]) -> HeadError {
    let line_end = buf.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(buf.len());
    let line = &buf[..line_end];
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit()
                && minor.is_ascii_digit()
                && !(*major == b'1' && matches!(minor, b'0' | b'1')) =>
        {
            HeadError::VersionNotSupported
        }
        _ => HeadError::Malformed("invalid request line"),
    }
}

/// Path and query of a request target (RFC 9112 §3.2): origin-form
/// (`/ws?x`), absolute-form (`http://host/ws?x`, which proxies send; the
/// authority is not used), or the asterisk-form of `OPTIONS *`.
fn request_target(target: &str, method: Method) -> Result<(&str, &str), HeadError> {
    if target == "*" {
        return match method {
            Method::Options => Ok(("*", "")),
            _ => Err(HeadError::Malformed("the target * is only for OPTIONS")),
        };
    }
    let origin_form = match scheme_length(target) {
        Some(scheme) => {
            let after_scheme = &target[scheme..];
            let authority_end = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
            if authority_end == 0 {
                return Err(HeadError::Malformed("absolute request target without a host"));
            }
            &after_scheme[authority_end..]
        }
        None => target,
    };
    let origin_form = origin_form.split_once('#').map_or(origin_form, |(before, _)| before);
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    if path.is_empty() {
        // `http://host` or `http://host?x`: the path is `/`.
        return Ok(("/", query));
    }
    if !path.starts_with('/') {
        return Err(HeadError::Malformed("request target must be an absolute path or an absolute URL"));
    }
    Ok((path, query))
}

/// The length of `http://` or `https://` (any case) at the start of `target`.
fn scheme_length(target: &str) -> Option<usize> {
    ["http://", "https://"].into_iter().find_map(|scheme| {
        let prefix = target.get(..scheme.len())?;
        prefix.eq_ignore_ascii_case(scheme).then_some(scheme.len())
    })
}

/// A `Host` value (RFC 9110 §7.2): `uri-host [ ":" port ]`, where the host
/// is an IP literal in brackets, an IPv4 address or a registered name
/// (RFC 3986 §3.2.2). Empty is valid (an authority without a host).
fn host_is_valid(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else { return false };
        let inside = &literal[..end];
        let ok = !inside.is_empty() && inside.iter().all(|&b| b == b':' || unreserved_or_sub_delim(b));
        (ok, &literal[end + 1..])
    } else {
        let colon = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        (reg_name_is_valid(&value[..colon]), &value[colon..])
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    host_ok && port_ok
}

fn reg_name_is_valid(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' if name.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && name.get(i + 2).is_some_and(u8::is_ascii_hexdigit) =>
            {
                i += 3;
            }
            byte if unreserved_or_sub_delim(byte) => i += 1,
            _ => return false,
        }
    }
    true
}

/// RFC 3986 `unreserved` and `sub-delims`.
fn unreserved_or_sub_delim(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
        )
}

fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let value = trim(value);
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed("invalid Content-Length"));
    }
    // At most 18 ASCII digits: always fits in u64.
    Ok(value.iter().fold(0u64, |acc, digit| acc * 10 + u64::from(digit - b'0')))
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &value[start..end]
}

/// Percent-decoded value of the first parameter `name` in an
/// `application/x-www-form-urlencoded` query string. Invalid escapes are kept
/// literally; invalid UTF-8 yields `None` for that parameter.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).as_deref() == Some(name) {
            return percent_decode(value);
        }
    }
    None
}

/// Every value of the parameter `name`, decoded.
pub fn query_params<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> + 'a {
    query.split('&').filter_map(move |pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).as_deref() == Some(name) {
            percent_decode(value)
        } else {
            None
        }
    })
}

/// Decodes `%XX` escapes and `+` (as space).
pub fn percent_decode(input: &str) -> Option<Cow<'_, str>> {
    if !input.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(input));
    }
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Standard reason phrase for the statuses this server sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends a response head. `content_length: None` omits the header (used for
/// streaming responses that end with the connection).
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    content_length: Option<usize>,
    keep_alive: bool,
) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in headers {
        debug_assert!(!value.contains(['\r', '\n']), "header injection");
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if let Some(length) = content_length {
        let _ = write!(out, "Content-Length: {length}\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete plain-text response: `status` with `message` as the body.
pub fn write_text_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &[(&str, &str)],
    message: &str,
    keep_alive: bool,
) {
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra_headers.len() + 2);
    headers.push(("Content-Type", "text/plain; charset=utf-8"));
    headers.push(("Cache-Control", "no-store"));
    headers.extend_from_slice(extra_headers);
    let body_len = message.len() + 1;
    write_response_head(out, status, &headers, Some(body_len), keep_alive);
    out.extend_from_slice(message.as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_joins_repeats_and_cuts_long_values() {
        let head = b"GET /ws HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCOOKIE: b=2\r\nUser-Agent: long-agent\r\n\r\n";
        let names = vec!["cookie".to_owned(), "user-agent".to_owned(), "authorization".to_owned()];
        let values = header_values(head, &names, 4);
        assert_eq!(values, vec![("cookie".into(), "a=1;".into()), ("user-agent".into(), "long".into())]);
        let values = header_values(head, &names, 100);
        assert_eq!(values[0], ("cookie".into(), "a=1; b=2".into()));
    }

    const LIMITS: HeadLimits = HeadLimits { head_bytes_max: 1024, headers_max: 8 };

    #[test]
    fn parses_upgrade_request() {
        let head = b"GET /ws?token=a%20b&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://a.example\r\n\r\nEXTRA";
        let request = parse_head(head, LIMITS).unwrap().unwrap();
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/ws");
        assert_eq!(request.query_param("token").as_deref(), Some("a b"));
        assert_eq!(request.query_param("x").as_deref(), Some("1"));
        assert_eq!(request.query_param("missing"), None);
        assert!(request.upgrade_websocket && request.connection_upgrade);
        assert_eq!(request.ws_key, Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(request.ws_version, Some(&b"13"[..]));
        assert_eq!(request.origin, Some("http://a.example"));
        assert_eq!(&head[request.head_len..], b"EXTRA");
        assert!(request.keep_alive());
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", LIMITS).unwrap().is_none());
        assert!(parse_head(b"GE", LIMITS).unwrap().is_none());
    }

    #[test]
    fn oversized_head_is_431() {
        let mut head = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 2000));
        assert_eq!(parse_head(&head, LIMITS).unwrap_err(), HeadError::TooLarge);
        assert_eq!(HeadError::TooLarge.status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..9 {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&head, LIMITS).unwrap_err(), HeadError::TooManyHeaders);
    }

    #[test]
    fn garbage_is_400() {
        let error = parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", LIMITS).unwrap_err();
        assert_eq!(error.status(), 400);
        let error = parse_head(b"GET /\x7f HTTP/1.1\r\n\r\n", LIMITS).unwrap_err();
        assert_eq!(error.status(), 400);
    }

    #[test]
    fn http2_preface_is_505() {
        let error = parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", LIMITS).unwrap_err();
        assert_eq!(error.status(), 505);
    }

    #[test]
    fn conflicting_content_length_is_400() {
        let head = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(parse_head(head, LIMITS).unwrap_err().status(), 400);
        let head = b"POST /x HTTP/1.1\r\nContent-Length: -3\r\n\r\n";
        assert_eq!(parse_head(head, LIMITS).unwrap_err().status(), 400);
        let head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(parse_head(head, LIMITS).unwrap().unwrap().content_length, Some(12));
    }

    #[test]
    fn keep_alive_rules() {
        let r10 = parse_head(b"GET / HTTP/1.0\r\n\r\n", LIMITS).unwrap().unwrap();
        assert!(!r10.keep_alive());
        let r10ka = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", LIMITS).unwrap().unwrap();
        assert!(r10ka.keep_alive());
        let r11c = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", LIMITS).unwrap().unwrap();
        assert!(!r11c.keep_alive());
    }

    fn status_of(head: &[u8]) -> u16 {
        parse_head(head, LIMITS).unwrap_err().status()
    }

    #[test]
    fn host_is_required_once_and_well_formed_in_http_1_1() {
        assert_eq!(status_of(b"GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        for bad in ["a b", "a/b", "a:b:c", "a:12345678", "[::1", "[]", "a@b", "a%zz", "\u{e9}t\u{e9}"] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(status_of(head.as_bytes()), 400, "Host: {bad}");
        }
        for good in
            ["", "x", "example.com:8080", "127.0.0.1", "[::1]:80", "[v1.fe80::a+en1]", "a%2Db", "xn--d1acufc.xn--p1ai:"]
        {
            let head = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(parse_head(head.as_bytes(), LIMITS).unwrap().is_some(), "Host: {good}");
        }
        // HTTP/1.0 clients may leave it out.
        assert!(parse_head(b"GET / HTTP/1.0\r\n\r\n", LIMITS).unwrap().is_some());
    }

    #[test]
    fn absolute_and_asterisk_targets() {
        let request =
            parse_head(b"GET http://h.example:80/ws?token=t HTTP/1.1\r\nHost: h\r\n\r\n", LIMITS).unwrap().unwrap();
        assert_eq!((request.path, request.query), ("/ws", "token=t"));
        let request = parse_head(b"GET HTTPS://h HTTP/1.1\r\nHost: h\r\n\r\n", LIMITS).unwrap().unwrap();
        assert_eq!((request.path, request.query), ("/", ""));
        let request = parse_head(b"GET http://h?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", LIMITS).unwrap().unwrap();
        assert_eq!((request.path, request.query), ("/", "x=1"));
        let request = parse_head(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", LIMITS).unwrap().unwrap();
        assert_eq!(request.path, "*");
        assert_eq!(status_of(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET http:///ws HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET ws HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET ftp://h/ws HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    }

    #[test]
    fn malformed_request_lines_are_400_and_other_versions_505() {
        assert_eq!(status_of(b"GET / FOO/1.1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/3.0\r\nHost: h\r\n\r\n"), 505);
        assert_eq!(status_of(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n"), 505);
    }

    #[test]
    fn expectations() {
        let request =
            parse_head(b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n", LIMITS)
                .unwrap()
                .unwrap();
        assert_eq!(request.expect, Expect::Continue);
        assert_eq!(status_of(b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: coffee\r\n\r\n"), 417);
        let old = parse_head(b"POST /c HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", LIMITS).unwrap().unwrap();
        assert_eq!(old.expect, Expect::Nothing, "HTTP/1.0 expectations are ignored");
        let request =
            parse_head(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", LIMITS).unwrap().unwrap();
        assert!(request.transfer_encoding);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(percent_decode("%ff"), None);
        let all: Vec<_> = query_params("c=a&c=b&d=x", "c").collect();
        assert_eq!(all, vec!["a", "b"]);
    }

    #[test]
    fn response_head_format() {
        let mut out = Vec::new();
        write_text_response(&mut out, 404, &[], "no such path", true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 13\r\n"));
        assert!(text.ends_with("\r\n\r\nno such path\n"));
    }
}
