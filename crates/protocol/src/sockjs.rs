//! SockJS (protocol 0.3.x) as a sans-io codec: the URL scheme under a
//! service prefix, the frames the server sends (`o`, `h`, `a[…]`,
//! `c[code,"reason"]`), how each HTTP transport wraps them, and the
//! decoding of what clients send (a JSON array of strings, or one string).
//!
//! Messages are byte strings in WTF-8: UTF-8 that may also hold lone
//! surrogates (U+D800–U+DFFF encoded like any other code point). Browsers
//! send JavaScript strings, which may contain lone surrogates as `\uD800`
//! escapes; an echo must give them back, so they are kept, and escaped
//! again on the way out. Everything the server sends escapes the
//! characters browsers or proxies mangle (control characters, zero-width
//! and line/paragraph separators, specials, surrogates) as `\uXXXX`.

use std::fmt::Write as _;

/// Longest session id accepted in a URL (sockjs-client sends 8 characters).
pub const SESSION_ID_BYTES_MAX: usize = 128;
/// Longest JSONP/htmlfile callback name.
pub const CALLBACK_BYTES_MAX: usize = 64;
/// The greeting at the service's base URL.
pub const GREETING: &str = "Welcome to SockJS!\n";
/// Response headers that forbid caching a session response (GET transports
/// especially, and POSTs: iOS 6 cached them).
pub const NO_CACHE: &str = "no-store, no-cache, no-transform, must-revalidate, max-age=0";
/// How long preflights and the iframe page may be cached: one year.
pub const CACHE_MAX_AGE_S: u64 = 31_536_000;

/// The open frame, sent once when a session starts.
pub const OPEN_FRAME: &[u8] = b"o";
/// The heartbeat frame.
pub const HEARTBEAT_FRAME: &[u8] = b"h";

/// Close codes and reasons the protocol fixes.
pub mod close {
    /// A second receiving request while one is attached (that request only).
    pub const ANOTHER_CONNECTION: (u16, &str) = (2010, "Another connection still open");
    /// The receiving request of a session broke off: the session is over.
    pub const INTERRUPTED: (u16, &str) = (1002, "Connection interrupted");
    /// A WebSocket client sent something that is not a JSON string or array of strings.
    pub const BROKEN_FRAMING: (u16, &str) = (1002, "Broken framing.");
    /// The conformance suite's `close` service.
    pub const GO_AWAY: (u16, &str) = (3000, "Go away!");
}

/// A SockJS transport, named by the last segment of a session URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Xhr,
    XhrSend,
    XhrStreaming,
    EventSource,
    HtmlFile,
    Jsonp,
    JsonpSend,
}

impl Transport {
    pub fn from_name(name: &str) -> Option<Transport> {
        Some(match name {
            "websocket" => Transport::WebSocket,
            "xhr" => Transport::Xhr,
            "xhr_send" => Transport::XhrSend,
            "xhr_streaming" => Transport::XhrStreaming,
            "eventsource" => Transport::EventSource,
            "htmlfile" => Transport::HtmlFile,
            "jsonp" => Transport::Jsonp,
            "jsonp_send" => Transport::JsonpSend,
            _ => return None,
        })
    }

    /// Streaming transports keep their response open for many frames.
    pub fn is_streaming(self) -> bool {
        matches!(self, Transport::XhrStreaming | Transport::EventSource | Transport::HtmlFile)
    }

    /// Polling transports answer one request with the frames waiting (or one heartbeat).
    pub fn is_polling(self) -> bool {
        matches!(self, Transport::Xhr | Transport::Jsonp)
    }

    /// The two transports that carry messages from the client.
    pub fn is_send(self) -> bool {
        matches!(self, Transport::XhrSend | Transport::JsonpSend)
    }

    /// The callback parameter names a JavaScript function (jsonp, htmlfile).
    pub fn needs_callback(self) -> bool {
        matches!(self, Transport::HtmlFile | Transport::Jsonp)
    }

    /// The HTTP method a transport must use (websocket: GET with an upgrade).
    pub fn method_is_post(self) -> bool {
        matches!(self, Transport::Xhr | Transport::XhrSend | Transport::XhrStreaming | Transport::JsonpSend)
    }

    /// `Content-Type` of the transport's response body.
    pub fn content_type(self) -> &'static str {
        match self {
            Transport::Xhr | Transport::XhrStreaming | Transport::Jsonp => "application/javascript; charset=UTF-8",
            Transport::EventSource => "text/event-stream",
            Transport::HtmlFile => "text/html; charset=UTF-8",
            Transport::XhrSend | Transport::JsonpSend | Transport::WebSocket => "text/plain; charset=UTF-8",
        }
    }
}

/// What a path below a service prefix asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `` or `/`: the greeting.
    Greeting,
    /// `/info`: capabilities and entropy.
    Info,
    /// `/iframe.html` and its versioned names (`/iframe-1.6.1.html`).
    Iframe,
    /// `/websocket`: a plain WebSocket without SockJS framing.
    RawWebSocket,
    /// `/SERVER/SESSION/TRANSPORT`. The server id is for load balancers and
    /// ignored; the session id is the client's.
    Session {
        session: &'a str,
        transport: Transport,
    },
    NotFound,
}

/// Routes `rest`, the path after the service prefix (not percent-decoded).
pub fn route(rest: &str) -> Route<'_> {
    match rest {
        "" | "/" => return Route::Greeting,
        "/info" => return Route::Info,
        "/websocket" => return Route::RawWebSocket,
        _ => {}
    }
    if let Some(version) = rest.strip_prefix("/iframe").and_then(|r| r.strip_suffix(".html")) {
        let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_');
        if version.bytes().all(allowed) {
            return Route::Iframe;
        }
        return Route::NotFound;
    }
    let mut parts = rest.strip_prefix('/').unwrap_or("\0").split('/');
    let (Some(server), Some(session), Some(transport), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::NotFound;
    };
    // Empty segments and dots are refused (`/./.`), as are oversized ids.
    let segment_ok = |s: &str| !s.is_empty() && !s.contains('.') && s.len() <= SESSION_ID_BYTES_MAX;
    match Transport::from_name(transport) {
        Some(transport) if segment_ok(server) && segment_ok(session) => Route::Session { session, transport },
        _ => Route::NotFound,
    }
}

/// A JSONP or htmlfile callback must be a plain name: `[a-zA-Z0-9_.-]+`.
pub fn callback_is_valid(callback: &str) -> bool {
    !callback.is_empty()
        && callback.len() <= CALLBACK_BYTES_MAX
        && callback.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

// -- What clients send ------------------------------------------------------

/// Why a client payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    /// Nothing (or only whitespace) was sent.
    Empty,
    /// Not a JSON string or array of strings.
    Broken,
    /// More messages than the caller allows in one payload.
    TooMany,
}

impl PayloadError {
    /// The text the protocol gives with the 500 answer.
    pub fn reason(self) -> &'static str {
        match self {
            PayloadError::Empty => "Payload expected.",
            PayloadError::Broken => "Broken JSON encoding.",
            PayloadError::TooMany => "Too many messages in one payload.",
        }
    }
}

/// Decodes a payload: a JSON array of strings (xhr_send, jsonp_send,
/// websocket) or a single JSON string (websocket). Each message comes back
/// as WTF-8 bytes. At most `messages_max` messages.
pub fn decode_messages(payload: &[u8], messages_max: usize) -> Result<Vec<Vec<u8>>, PayloadError> {
    let mut cursor = Cursor { bytes: payload, at: 0 };
    cursor.skip_whitespace();
    if cursor.at == payload.len() {
        return Err(PayloadError::Empty);
    }
    if std::str::from_utf8(payload).is_err() {
        return Err(PayloadError::Broken);
    }
    let mut messages = Vec::new();
    match cursor.peek() {
        Some(b'"') => {
            let mut message = Vec::new();
            cursor.string(&mut message)?;
            messages.push(message);
        }
        Some(b'[') => {
            cursor.at += 1;
            cursor.skip_whitespace();
            if cursor.peek() == Some(b']') {
                cursor.at += 1;
            } else {
                loop {
                    if messages.len() >= messages_max {
                        return Err(PayloadError::TooMany);
                    }
                    let mut message = Vec::new();
                    cursor.string(&mut message)?;
                    messages.push(message);
                    cursor.skip_whitespace();
                    match cursor.next() {
                        Some(b',') => cursor.skip_whitespace(),
                        Some(b']') => break,
                        _ => return Err(PayloadError::Broken),
                    }
                }
            }
        }
        _ => return Err(PayloadError::Broken),
    }
    cursor.skip_whitespace();
    if cursor.at != payload.len() {
        return Err(PayloadError::Broken);
    }
    Ok(messages)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn hex4(&mut self) -> Result<u32, PayloadError> {
        let digits = self.bytes.get(self.at..self.at + 4).ok_or(PayloadError::Broken)?;
        let text = std::str::from_utf8(digits).map_err(|_| PayloadError::Broken)?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PayloadError::Broken);
        }
        self.at += 4;
        u32::from_str_radix(text, 16).map_err(|_| PayloadError::Broken)
    }

    /// One JSON string, appended to `out` as WTF-8 (the input is UTF-8).
    fn string(&mut self, out: &mut Vec<u8>) -> Result<(), PayloadError> {
        if self.next() != Some(b'"') {
            return Err(PayloadError::Broken);
        }
        loop {
            match self.next().ok_or(PayloadError::Broken)? {
                b'"' => return Ok(()),
                b'\\' => {
                    let unit = match self.next().ok_or(PayloadError::Broken)? {
                        b'"' => u32::from(b'"'),
                        b'\\' => u32::from(b'\\'),
                        b'/' => u32::from(b'/'),
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => u32::from(b'\n'),
                        b'r' => u32::from(b'\r'),
                        b't' => u32::from(b'\t'),
                        b'u' => self.hex4()?,
                        _ => return Err(PayloadError::Broken),
                    };
                    let mut code_point = unit;
                    // A high surrogate followed by an escaped low one is one
                    // character; alone, either is kept as it is.
                    if (0xD800..0xDC00).contains(&unit) && self.bytes[self.at..].starts_with(b"\\u") {
                        let save = self.at;
                        self.at += 2;
                        match self.hex4() {
                            Ok(low) if (0xDC00..0xE000).contains(&low) => {
                                code_point = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            }
                            _ => self.at = save,
                        }
                    }
                    push_code_point(out, code_point);
                }
                // JSON strings escape control characters.
                byte if byte < 0x20 => return Err(PayloadError::Broken),
                byte => out.push(byte),
            }
        }
    }
}

/// Appends `code_point` in (generalized) UTF-8; surrogates get their
/// three-byte form (WTF-8).
fn push_code_point(out: &mut Vec<u8>, code_point: u32) {
    match code_point {
        0..=0x7F => out.push(code_point as u8),
        0x80..=0x7FF => out.extend_from_slice(&[0xC0 | (code_point >> 6) as u8, 0x80 | (code_point & 0x3F) as u8]),
        0x800..=0xFFFF => out.extend_from_slice(&[
            0xE0 | (code_point >> 12) as u8,
            0x80 | ((code_point >> 6) & 0x3F) as u8,
            0x80 | (code_point & 0x3F) as u8,
        ]),
        _ => out.extend_from_slice(&[
            0xF0 | (code_point >> 18) as u8,
            0x80 | ((code_point >> 12) & 0x3F) as u8,
            0x80 | ((code_point >> 6) & 0x3F) as u8,
            0x80 | (code_point & 0x3F) as u8,
        ]),
    }
}

// -- What the server sends --------------------------------------------------

/// How much a string is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// JSON, plus the characters SockJS clients need escaped.
    Json,
    /// Also `<`, `>` and `&`: the string sits in an HTML `<script>` (htmlfile).
    Html,
}

/// Whether the server escapes this character as `\uXXXX`: controls,
/// zero-width and directional marks, line and paragraph separators,
/// invisible operators, specials, and surrogates.
fn escaped_by_server(code_point: u32) -> bool {
    matches!(code_point, 0..=0x1F | 0x200C..=0x200F | 0x2028..=0x202F | 0x2060..=0x206F | 0xD800..=0xDFFF | 0xFFF0..=0xFFFF)
}

/// Appends `message` (WTF-8; invalid sequences become U+FFFD) as a quoted
/// JSON string.
pub fn write_string(out: &mut Vec<u8>, message: &[u8], escape: Escape) {
    out.reserve(message.len() + 2);
    out.push(b'"');
    let mut at = 0;
    while at < message.len() {
        let byte = message[at];
        if byte < 0x80 {
            match byte {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'<' | b'>' | b'&' if escape == Escape::Html => push_escape(out, u32::from(byte)),
                _ if byte < 0x20 => push_escape(out, u32::from(byte)),
                _ => out.push(byte),
            }
            at += 1;
            continue;
        }
        let (code_point, len) = decode_wtf8(&message[at..]);
        // A stray byte decodes as U+FFFD, which is escaped: never copied raw.
        if escaped_by_server(code_point) {
            push_escape(out, code_point);
        } else {
            out.extend_from_slice(&message[at..at + len]);
        }
        at += len;
    }
    out.push(b'"');
}

fn push_escape(out: &mut Vec<u8>, unit: u32) {
    let _ = write!(Wrap(out), "\\u{unit:04x}");
}

/// The code point at the start of `bytes` (generalized UTF-8) and its
/// length; (U+FFFD, 1) for a byte that starts no valid sequence.
fn decode_wtf8(bytes: &[u8]) -> (u32, usize) {
    let lead = bytes[0];
    let (len, initial) = match lead {
        0xC2..=0xDF => (2, u32::from(lead & 0x1F)),
        0xE0..=0xEF => (3, u32::from(lead & 0x0F)),
        0xF0..=0xF4 => (4, u32::from(lead & 0x07)),
        _ => return (0xFFFD, 1),
    };
    let Some(rest) = bytes.get(1..len) else { return (0xFFFD, 1) };
    let mut code_point = initial;
    for &continuation in rest {
        if continuation & 0xC0 != 0x80 {
            return (0xFFFD, 1);
        }
        code_point = (code_point << 6) | u32::from(continuation & 0x3F);
    }
    let overlong = match len {
        3 => code_point < 0x800,
        4 => !(0x10000..=0x10FFFF).contains(&code_point),
        _ => false,
    };
    if overlong {
        return (0xFFFD, 1);
    }
    (code_point, len)
}

/// `a[…]`: the messages as JSON strings.
pub fn write_messages<'m>(out: &mut Vec<u8>, messages: impl IntoIterator<Item = &'m [u8]>) {
    out.extend_from_slice(b"a[");
    for (index, message) in messages.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_string(out, message, Escape::Json);
    }
    out.push(b']');
}

/// `c[code,"reason"]`.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let _ = write!(Wrap(out), "c[{code},");
    write_string(out, reason.as_bytes(), Escape::Json);
    out.push(b']');
}

/// What a streaming transport sends before its first frame: 2 KiB of `h`
/// for xhr_streaming (browsers buffer the start of a response), a blank
/// line for eventsource, the page that calls back into the parent for
/// htmlfile (padded past 1 KiB for the same reason).
pub fn write_prelude(out: &mut Vec<u8>, transport: Transport, callback: &str) {
    match transport {
        Transport::XhrStreaming => {
            out.resize(out.len() + 2048, b'h');
            out.push(b'\n');
        }
        Transport::EventSource => out.extend_from_slice(b"\r\n"),
        Transport::HtmlFile => {
            let start = out.len();
            out.extend_from_slice(HTMLFILE_HEAD.as_bytes());
            out.extend_from_slice(callback.as_bytes());
            out.extend_from_slice(HTMLFILE_TAIL.as_bytes());
            let padding = 1024usize.saturating_sub(out.len() - start);
            out.resize(out.len() + padding, b' ');
            out.extend_from_slice(b"\r\n\r\n");
        }
        _ => {}
    }
}

const HTMLFILE_HEAD: &str = "<!doctype html>\n<html><head>\n  \
<meta http-equiv=\"X-UA-Compatible\" content=\"IE=edge\" />\n  \
<meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\" />\n\
</head><body><h2>Don't panic!</h2>\n  <script>\n    document.domain = document.domain;\n    var c = parent.";
const HTMLFILE_TAIL: &str = ";\n    c.start();\n    function p(d) {c.message(d);};\n    \
window.onload = function() {c.stop();};\n  </script>\n";

/// Appends one frame as `transport` carries it over HTTP: a line (xhr,
/// xhr_streaming), an event (eventsource), a script calling `p` (htmlfile)
/// or a call of the callback (jsonp). WebSocket frames are not wrapped.
pub fn write_wrapped(out: &mut Vec<u8>, transport: Transport, callback: &str, frame: &[u8]) {
    match transport {
        Transport::Xhr | Transport::XhrStreaming => {
            out.extend_from_slice(frame);
            out.push(b'\n');
        }
        Transport::EventSource => {
            // Frames never hold a raw CR or LF: strings escape them.
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(frame);
            out.extend_from_slice(b"\r\n\r\n");
        }
        Transport::HtmlFile => {
            out.extend_from_slice(b"<script>\np(");
            write_string(out, frame, Escape::Html);
            out.extend_from_slice(b");\n</script>\r\n");
        }
        Transport::Jsonp => {
            // `/**/` before the name defeats content sniffing of the
            // response as a Flash file (Rosetta Flash).
            out.extend_from_slice(b"/**/");
            out.extend_from_slice(callback.as_bytes());
            out.push(b'(');
            write_string(out, frame, Escape::Json);
            out.extend_from_slice(b");\r\n");
        }
        Transport::WebSocket | Transport::XhrSend | Transport::JsonpSend => out.extend_from_slice(frame),
    }
}

/// Appends `bytes` as one HTTP/1.1 chunk (nothing for empty input: an
/// empty chunk would end the body).
pub fn write_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let _ = write!(Wrap(out), "{:x}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

// -- Static pages -----------------------------------------------------------

/// The iframe page: loads sockjs-client from `client_url` and bootstraps
/// the cross-domain transports. `client_url` must not contain `"`, `<` or
/// `>` (the configuration refuses them).
pub fn iframe_page(client_url: &str) -> String {
    debug_assert!(!client_url.contains(['"', '<', '>']));
    format!(
        "<!DOCTYPE html>\n<html>\n<head>\n  <meta http-equiv=\"X-UA-Compatible\" content=\"IE=edge\" />\n  \
<meta http-equiv=\"Content-Type\" content=\"text/html; charset=UTF-8\" />\n  <script src=\"{client_url}\"></script>\n  \
<script>\n    document.domain = document.domain;\n    SockJS.bootstrap_iframe();\n  </script>\n</head>\n<body>\n  \
<h2>Don't panic!</h2>\n  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>\n</body>\n</html>"
    )
}

/// A strong ETag for a static body: a quoted hash of it.
pub fn etag(body: &[u8]) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(body);
    format!("\"{}\"", crate::hex(&digest[..10]))
}

/// Whether an `If-None-Match` value names `etag` (or is `*`).
pub fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate == etag || candidate.strip_prefix("W/") == Some(etag))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for `unix_s`.
pub fn http_date(unix_s: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = unix_s / 86_400;
    let seconds = unix_s % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Year, month (1-12) and day of the month of a day count since 1970-01-01
/// (the proleptic Gregorian calendar, in 400-year eras).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// -- Request heads ----------------------------------------------------------

/// The value of the first header called `name` in a complete request head
/// (already validated by the HTTP parser), trimmed.
pub fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The `JSESSIONID` value in a `Cookie` header, when it is a plain token
/// (safe to echo in `Set-Cookie`).
pub fn jsessionid(cookie: &str) -> Option<&str> {
    cookie.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let value = value.trim();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$%&'*+^`|#/:?@".contains(&b);
        (name.trim() == "JSESSIONID" && !value.is_empty() && value.len() <= 256 && value.bytes().all(token))
            .then_some(value)
    })
}

/// `fmt::Write` over a byte vector.
struct Wrap<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Wrap<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes() {
        assert_eq!(route(""), Route::Greeting);
        assert_eq!(route("/"), Route::Greeting);
        assert_eq!(route("/info"), Route::Info);
        assert_eq!(route("/websocket"), Route::RawWebSocket);
        for iframe in ["/iframe.html", "/iframe-a.html", "/iframe-.html", "/iframe-0.1.2abc-dirty.2144.html"] {
            assert_eq!(route(iframe), Route::Iframe, "{iframe}");
        }
        for bad in ["/iframe.htm", "/iframe", "/IFRAME.HTML", "/iframe.HTML", "/iframe.xml", "/iframe-/.html"] {
            assert_eq!(route(bad), Route::NotFound, "{bad}");
        }
        assert_eq!(route("/000/abc/xhr"), Route::Session { session: "abc", transport: Transport::Xhr });
        assert_eq!(
            route("/a/abcdefg_i-j%20/xhr_streaming"),
            Route::Session { session: "abcdefg_i-j%20", transport: Transport::XhrStreaming }
        );
        for bad in ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "//xhr", "/a./a/xhr", "/a/a./xhr", "/./././xhr"] {
            assert_eq!(route(bad), Route::NotFound, "{bad}");
        }
        assert_eq!(route("/a/b/unknown"), Route::NotFound);
        assert_eq!(route("/a/b/xhr/extra"), Route::NotFound);
        let long = format!("/a/{}/xhr", "x".repeat(SESSION_ID_BYTES_MAX + 1));
        assert_eq!(route(&long), Route::NotFound);
    }

    #[test]
    fn callbacks() {
        assert!(callback_is_valid("callback"));
        assert!(callback_is_valid("a.b_c-1"));
        for bad in ["", " ", "*", "abc(", "a b", "<script>"] {
            assert!(!callback_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn decodes_payloads() {
        assert_eq!(decode_messages(b"[\"a\"]", 10), Ok(vec![b"a".to_vec()]));
        assert_eq!(decode_messages(b" [ \"a\" , \"b\" ] ", 10), Ok(vec![b"a".to_vec(), b"b".to_vec()]));
        assert_eq!(decode_messages(b"[]", 10), Ok(vec![]));
        assert_eq!(decode_messages(b"\"x\"", 10), Ok(vec![b"x".to_vec()]));
        assert_eq!(decode_messages(b"[\"\"]", 10), Ok(vec![Vec::new()]));
        assert_eq!(decode_messages(b"", 10), Err(PayloadError::Empty));
        assert_eq!(decode_messages(b"  ", 10), Err(PayloadError::Empty));
        for broken in [&b"[\"x"[..], b"[\"a\",]", b"[1]", b"{}", b"[\"a\"] x", b"[\"\x01\"]", b"[\"\\q\"]", b"\xff"] {
            assert_eq!(decode_messages(broken, 10), Err(PayloadError::Broken), "{broken:?}");
        }
        assert_eq!(decode_messages(b"[\"a\",\"b\",\"c\"]", 2), Err(PayloadError::TooMany));
        // Escapes, a surrogate pair, and a lone surrogate kept as WTF-8.
        let decoded = decode_messages(br#"["\"\\\/\n\u0041\ud83d\ude00\ud800"]"#, 10).unwrap();
        assert_eq!(decoded[0], b"\"\\/\nA\xF0\x9F\x98\x80\xED\xA0\x80");
    }

    #[test]
    fn escapes_what_clients_mangle() {
        let mut out = Vec::new();
        write_string(&mut out, "a\"\\\n\u{200c}\u{2028}\u{fff0}\u{ffff}é😀".as_bytes(), Escape::Json);
        assert_eq!(out, "\"a\\\"\\\\\\u000a\\u200c\\u2028\\ufff0\\uffffé😀\"".as_bytes());
        // A lone surrogate (WTF-8) goes out as its escape; stray bytes as U+FFFD.
        let mut out = Vec::new();
        write_string(&mut out, b"\xED\xA0\x80\xFF", Escape::Json);
        assert_eq!(out, b"\"\\ud800\\ufffd\"");
        let mut out = Vec::new();
        write_string(&mut out, b"</script>&", Escape::Html);
        assert_eq!(out, b"\"\\u003c/script\\u003e\\u0026\"");
    }

    #[test]
    fn frames_and_wrapping() {
        let mut frame = Vec::new();
        write_messages(&mut frame, [&b"x"[..], b"y\"z"]);
        assert_eq!(frame, br#"a["x","y\"z"]"#);
        let mut close = Vec::new();
        write_close(&mut close, 3000, "Go away!");
        assert_eq!(close, br#"c[3000,"Go away!"]"#);

        let wrap = |transport| {
            let mut out = Vec::new();
            write_wrapped(&mut out, transport, "cb", br#"a["x"]"#);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(wrap(Transport::Xhr), "a[\"x\"]\n");
        assert_eq!(wrap(Transport::EventSource), "data: a[\"x\"]\r\n\r\n");
        assert_eq!(wrap(Transport::HtmlFile), "<script>\np(\"a[\\\"x\\\"]\");\n</script>\r\n");
        assert_eq!(wrap(Transport::Jsonp), "/**/cb(\"a[\\\"x\\\"]\");\r\n");

        let mut prelude = Vec::new();
        write_prelude(&mut prelude, Transport::HtmlFile, "callback");
        let text = String::from_utf8(prelude).unwrap();
        assert!(text.len() > 1024);
        assert!(text.trim().ends_with("</script>"));
        assert!(text.contains("var c = parent.callback;"));
        let mut prelude = Vec::new();
        write_prelude(&mut prelude, Transport::XhrStreaming, "");
        assert_eq!(prelude.len(), 2049);

        let mut chunked = Vec::new();
        write_chunk(&mut chunked, b"o\n");
        write_chunk(&mut chunked, b"");
        assert_eq!(chunked, b"2\r\no\n\r\n");
    }

    #[test]
    fn static_pages() {
        let page = iframe_page("/sockjs.js");
        assert!(page.contains("<script src=\"/sockjs.js\"></script>"));
        let tag = etag(page.as_bytes());
        assert!(tag.starts_with('"') && tag.ends_with('"'));
        assert!(etag_matches(&tag, &tag));
        assert!(etag_matches(&format!("\"x\", W/{tag}"), &tag));
        assert!(!etag_matches("\"x\"", &tag));
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
    }

    #[test]
    fn head_values_and_cookies() {
        let head = b"POST /x HTTP/1.1\r\nHost: a\r\ncookie: a=1; JSESSIONID=abc\r\nIf-None-Match:  \"e\" \r\n\r\n";
        assert_eq!(header_value(head, "Cookie"), Some("a=1; JSESSIONID=abc"));
        assert_eq!(header_value(head, "if-none-match"), Some("\"e\""));
        assert_eq!(header_value(head, "Origin"), None);
        assert_eq!(jsessionid("a=1; JSESSIONID=abc"), Some("abc"));
        assert_eq!(jsessionid("JSESSIONID=a\"b"), None);
        assert_eq!(jsessionid("x=1"), None);
    }

    proptest! {
        /// Whatever a client sends never panics the decoder.
        #[test]
        fn decoder_total(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_messages(&bytes, 16);
        }

        /// Any string the server escapes decodes back to itself, and the
        /// escaped form holds no raw character the protocol escapes.
        #[test]
        fn escape_round_trip(text in "\\PC*", units in proptest::collection::vec(0u32..0x11_0000, 0..16)) {
            let mut message = text.into_bytes();
            for unit in units {
                push_code_point(&mut message, unit);
            }
            let mut payload = b"[".to_vec();
            write_string(&mut payload, &message, Escape::Json);
            payload.push(b']');
            let escaped = std::str::from_utf8(&payload).unwrap();
            prop_assert!(!escaped.chars().any(|c| escaped_by_server(u32::from(c))));
            let decoded = decode_messages(&payload, 1).unwrap();
            // A lone high surrogate right before a lone low one comes back
            // as the character they form; anything else exactly.
            let pairs_up = message.windows(6).any(|w| {
                w[0] == 0xED && (0xA0..0xB0).contains(&w[1]) && w[3] == 0xED && (0xB0..0xC0).contains(&w[4])
            });
            if !pairs_up {
                prop_assert_eq!(&decoded[0], &message);
            }
        }
    }
}
