//! Kometa: a Comet push server. Browsers hold one WebSocket (or SSE, or
//! long-poll) connection; the backend publishes through a binary admin
//! socket; every subscriber gets the message at once, in order, exactly once.
//!
//! # Layout
//!
//! The workspace (folders under `crates/`) holds what stands alone:
//!
//! | crate                 | does                                                       |
//! |-----------------------|------------------------------------------------------------|
//! | `kometa-protocol`     | sans-io codecs: HTTP heads, WebSocket frames, client JSON, admin frames, tokens |
//! | `kometa-admin-client` | the blocking admin client (CLI, load generator, backends)  |
//! | `kometa-sys`          | checked wrappers over the socket, epoll and timer calls    |
//! | `kometa-loadgen`      | `kometa load` and the floor server                         |
//!
//! This crate is the server:
//!
//! | module      | does                                                                 |
//! |-------------|----------------------------------------------------------------------|
//! | [`session`] | per-connection state machine, timers from an injected clock, bounded outbox |
//! | [`hub`]     | channels, offsets, history, presence, the shard-local subscriber index |
//! | [`bus`]     | cross-shard bounded queues with eventfd wake-ups; message types     |
//! | [`shard`]   | the event loop per core: accept, read, write, fan-out, sweep         |
//! | [`transport`] | HTTP routing and the WebSocket adapter over the shard             |
//! | [`admin`]   | the admin listener, on its own thread                                |
//! | [`cluster`] | cluster mode: the Redis gateway thread, scripts, key layout          |
//! | [`config`], [`limits`] | every setting with its default; validation names the key  |
//! | [`server`]  | process start: limits, listeners, executors, signals                 |
//!
//! Data flows: a socket's bytes land in its shard's scratch buffer,
//! `kometa-protocol` turns them into commands, the command goes over the
//! `bus` to the channel's owner shard, which assigns an offset (or, in a
//! cluster, asks Redis for one), encodes the push once and sends an `Arc`
//! of it to every shard with subscribers; each shard writes the same bytes
//! to its local subscribers. docs/architecture.md has the whole picture.

pub mod admin;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod limits;
pub mod server;
pub mod session;
pub mod shard;
pub mod transport;
pub mod util;
