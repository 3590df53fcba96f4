//! Kometa's wire formats as sans-io codecs: bytes in, values out (and values
//! in, bytes out).
//!
//! Nothing in this crate touches a socket, a clock, a thread or an executor,
//! and no function allocates in proportion to a length read from the peer
//! before that length has been checked against a limit. `Ok(None)` always
//! means "need more bytes", never an error. The server, the load generator
//! and the fuzz targets build on it; it depends on none of them.
//!
//! | module         | format                                                       |
//! |----------------|--------------------------------------------------------------|
//! | [`http`]       | HTTP/1.1 request heads and responses                          |
//! | [`ws`]         | WebSocket upgrade, frames, close codes, UTF-8 (RFC 6455)       |
//! | [`client`]     | the client protocol's JSON commands and replies               |
//! | [`json`]       | validation and re-emission of publication data                |
//! | [`sockjs`]     | SockJS URLs, frames, transport wrapping, client payloads      |
//! | [`jii`]        | the Jii-comet text protocol carried over SockJS               |
//! | [`admin`]      | the admin socket's binary frames, requests and replies        |
//! | [`token`]      | HS256 connection tokens (JWT)                                 |
//! | [`session_id`] | HTTP session ids and SSE event ids                            |

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod http;
pub mod jii;
pub mod json;
pub mod session_id;
pub mod sockjs;
pub mod token;
pub mod ws;

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}
