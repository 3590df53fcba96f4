//! The application: what requests and messages mean. Routes on the public
//! port (health, upgrades, static files), the client protocol's commands,
//! HTTP sessions (SSE, long-poll, commands over HTTP), SockJS and the
//! Jii-comet protocol over it, channel ownership
//! (offsets, history, presence, fan-out to shards), users, queries for the
//! admin socket.
//!
//! These are `impl Shard` blocks: they run inside the shard's event loop
//! and use its slab, index and bus. They parse nothing themselves (the
//! connection and `kometa-protocol` do) and touch no socket: output goes
//! through the connection (`Shard::send_item` and friends in `shard::conn`).

mod commands;
mod http;
mod jii;
mod owner;
mod queries;
mod rpc;
mod sessions;
mod sockjs;
mod users;
