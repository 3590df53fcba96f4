//! Sans-io codecs: bytes in, values out (and values in, bytes out).
//!
//! Nothing in this module touches a socket, a clock or the executor, and no
//! function allocates in proportion to a length read from the peer before that
//! length has been checked against a configured limit. `Ok(None)` always means
//! "need more bytes", never an error.

pub mod admin;
pub mod client;
pub mod http;
pub mod json;
pub mod ws;
