//! Transports: how a session speaks to its client. HTTP requests on the
//! public port (routing, health, upgrades), WebSocket frames, and the client
//! protocol commands shared by every transport.
//!
//! These are `impl Shard` blocks: they run inside the shard's event loop
//! and use its connections, index and bus, but parse nothing themselves
//! (that is `proto`) and touch no socket directly (that is `shard::conn`).

mod commands;
mod http;
mod sessions;
mod ws;
