//! HTTP/1.1 for the admin gateway's two optional listeners: `/metrics`
//! (`metrics.listen`) and the HTTP API (`api.listen`). One request at a
//! time per connection (keep-alive; pipelined requests wait their turn),
//! each bounded like the public port's: the head by `limits.http_head_bytes_max`
//! and `http_headers_max`, the body by `limits.admin_frame_bytes_max` (the
//! admin socket's frame cap), head and body within
//! `timeouts.handshake_timeout_ms`, each write within
//! `timeouts.admin_write_timeout_ms`; at most `limits.admin_connections_max`
//! connections per listener.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::admin::gateway::Gateway;
use crate::admin::server::write_within;
use crate::admin::sys;
use crate::limits::LimitKind;
use kometa_protocol::http::{self, Expect, HeadLimits, Method};

/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Which listener: what its requests mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Metrics,
    Api,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Metrics => "metrics",
            Listener::Api => "api",
        }
    }
}

/// A request, read whole.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Accept` header.
    pub accept: Option<String>,
    pub body: Vec<u8>,
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response { status, content_type, headers: Vec::new(), body }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 160);
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", self.content_type), ("Cache-Control", "no-store")];
        headers.extend(self.headers.iter().map(|(name, value)| (*name, value.as_str())));
        http::write_response_head(&mut out, self.status, &headers, Some(self.body.len()), keep_alive);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Accepts connections on `listener` until the gateway's executor ends.
pub async fn serve(gateway: Rc<RefCell<Gateway>>, listener: OwnedFd, kind: Listener) {
    let open = Rc::new(Cell::new(0usize));
    sys::accept_each(listener.as_raw_fd(), kind.name(), |fd| {
        let max = gateway.borrow().config.limits.admin_connections_max;
        if open.get() >= max {
            gateway.borrow().shared.admin_refusals.add(LimitKind::AdminConnectionsMax);
            crate::limited!(
                WARN,
                max,
                listener = kind.name(),
                "connection refused: limits.admin_connections_max reached"
            );
            let response = Response::new(503, "text/plain; charset=utf-8", b"too many connections\n".to_vec());
            let _ = sys::send(fd.as_raw_fd(), &response.to_bytes(false));
            // FIN right behind the 503, and what the request sent so far
            // read away, so the close is not a reset that destroys it.
            let _ = sys::shutdown_write(fd.as_raw_fd());
            sys::discard_unread_input(fd.as_raw_fd());
            return;
        }
        open.set(open.get() + 1);
        let gateway = Rc::clone(&gateway);
        let open = Rc::clone(&open);
        let raw = fd.into_raw_fd();
        glommio::spawn_local(async move {
            // SAFETY: `raw` is an accepted, connected socket we own.
            let stream = unsafe { glommio::net::TcpStream::from_raw_fd(raw) };
            let _ = stream.set_nodelay(true);
            connection(&gateway, stream, kind).await;
            open.set(open.get() - 1);
        })
        .detach();
    })
    .await;
}

/// What reading a request gave.
enum Read {
    Request {
        request: Request,
        keep_alive: bool,
        used: usize,
    },
    /// Answer this, then close.
    Refuse(Response),
    /// The peer closed or went quiet between requests: just close.
    Gone,
}

async fn connection(gateway: &Rc<RefCell<Gateway>>, mut stream: glommio::net::TcpStream, kind: Listener) {
    let write_timeout = Duration::from_millis(gateway.borrow().config.timeouts.admin_write_timeout_ms);
    let mut input = Vec::new();
    loop {
        let (request, keep_alive, used) = match read_request(gateway, &mut stream, &mut input).await {
            Read::Request { request, keep_alive, used } => (request, keep_alive, used),
            Read::Refuse(response) => {
                if write_within(&mut stream, &response.to_bytes(false), write_timeout).await {
                    linger(gateway, &mut stream).await;
                }
                return;
            }
            Read::Gone => return,
        };
        input.drain(..used);
        let response = match kind {
            Listener::Metrics => crate::admin::metrics::respond(gateway, &request).await,
            Listener::Api => crate::admin::api::respond(gateway, &request).await,
        };
        if !write_within(&mut stream, &response.to_bytes(keep_alive), write_timeout).await || !keep_alive {
            let _ = stream.close().await;
            return;
        }
    }
}

/// After an error answered before the request was read whole: our FIN
/// goes out, and the rest of the request is read and dropped until the
/// peer's FIN (at most `timeouts.close_timeout_ms`), so that closing with
/// unread input does not send a reset that destroys the response.
async fn linger(gateway: &Rc<RefCell<Gateway>>, stream: &mut glommio::net::TcpStream) {
    let close_timeout = Duration::from_millis(gateway.borrow().config.timeouts.close_timeout_ms);
    if stream.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = Instant::now() + close_timeout;
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    while let Some(count) = read_some(stream, &mut chunk, deadline).await {
        if count == 0 {
            break;
        }
    }
}

fn text(status: u16, message: &str) -> Response {
    Response::new(status, "text/plain; charset=utf-8", format!("{message}\n").into_bytes())
}

/// Reads one request (head and body) into `input`, within
/// `timeouts.handshake_timeout_ms`.
async fn read_request(
    gateway: &Rc<RefCell<Gateway>>,
    stream: &mut glommio::net::TcpStream,
    input: &mut Vec<u8>,
) -> Read {
    let (head_limits, body_bytes_max, deadline) = {
        let config = &gateway.borrow().config;
        let limits = HeadLimits {
            head_bytes_max: config.limits.http_head_bytes_max,
            headers_max: config.limits.http_headers_max,
        };
        let deadline = Instant::now() + Duration::from_millis(config.timeouts.handshake_timeout_ms);
        (limits, config.limits.admin_frame_bytes_max, deadline)
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    // The head.
    let (mut request, keep_alive, head_len, body_len) = loop {
        match http::parse_head(input, head_limits) {
            Ok(Some(head)) => {
                if head.transfer_encoding {
                    return Read::Refuse(text(400, "chunked request bodies are not supported: send Content-Length"));
                }
                let body_len = head.content_length.unwrap_or(0);
                if body_len > body_bytes_max as u64 {
                    let message = format!("the body is over {body_bytes_max} bytes (limits.admin_frame_bytes_max)");
                    return Read::Refuse(text(413, &message));
                }
                let head_bytes = &input[..head.head_len];
                let request = Request {
                    method: head.method,
                    path: head.path.to_owned(),
                    authorization: head.authorization.map(str::to_owned),
                    accept: header(head_bytes, "accept").map(str::to_owned),
                    body: Vec::new(),
                };
                let expects_continue = head.expect == Expect::Continue;
                let (keep_alive, head_len) = (head.keep_alive(), head.head_len);
                let body_len = body_len as usize;
                // curl asks before a body over 1 KiB and waits a second for this.
                if expects_continue && input.len() < head_len + body_len {
                    let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                break (request, keep_alive, head_len, body_len);
            }
            Ok(None) => {}
            Err(error) => return Read::Refuse(text(error.status(), error.reason())),
        }
        match read_some(stream, &mut chunk, deadline).await {
            Some(0) | None if input.is_empty() => return Read::Gone,
            Some(0) => return Read::Gone,
            None => return Read::Refuse(text(408, "request not completed in time")),
            Some(count) => input.extend_from_slice(&chunk[..count]),
        }
    };
    // The body.
    while input.len() < head_len + body_len {
        match read_some(stream, &mut chunk, deadline).await {
            Some(0) => return Read::Gone,
            None => return Read::Refuse(text(408, "request body not completed in time")),
            Some(count) => input.extend_from_slice(&chunk[..count]),
        }
    }
    request.body = input[head_len..head_len + body_len].to_vec();
    Read::Request { request, keep_alive, used: head_len + body_len }
}

/// One read before `deadline`: Some(bytes) (0 at end of stream or on an
/// error), None when the deadline passed.
async fn read_some(stream: &mut glommio::net::TcpStream, chunk: &mut [u8], deadline: Instant) -> Option<usize> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let read = async { stream.read(chunk).await.map_err(glommio::GlommioError::from) };
    match glommio::timer::timeout(remaining, read).await {
        Ok(count) => Some(count),
        Err(glommio::GlommioError::TimedOut(_)) => None,
        Err(_) => Some(0),
    }
}

/// The value of header `name` (lower case) in a complete, parsed head.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::header;

    #[test]
    fn headers_by_name() {
        let head = b"POST /api/x HTTP/1.1\r\nHost: a\r\nEXPECT:  100-continue \r\nAccept: text/plain\r\n\r\n";
        assert_eq!(header(head, "EXPECT"), Some("100-continue"));
        assert_eq!(header(head, "accept"), Some("text/plain"));
        assert_eq!(header(head, "authorization"), None);
    }
}
