//! Kometa: a Comet push server. Browsers hold one WebSocket (or SSE, or
//! long-poll) connection; the backend publishes through a binary admin
//! socket; every subscriber gets the message at once, in order, exactly once.
//!
//! # Layout
//!
//! | module      | does                                                                 |
//! |-------------|----------------------------------------------------------------------|
//! | [`proto`]   | sans-io codecs: HTTP heads, WebSocket frames, client JSON, admin frames |
//! | [`session`] | per-connection state machine, timers from an injected clock, bounded outbox |
//! | [`hub`]     | channels, offsets, history, presence, the shard-local subscriber index |
//! | [`bus`]     | cross-shard bounded queues with eventfd wake-ups; message types     |
//! | [`shard`]   | the event loop per core: accept, read, write, fan-out, sweep         |
//! | [`transport`] | HTTP routing and the WebSocket adapter over the shard             |
//! | [`admin`]   | admin listener (on its own thread) and a blocking client             |
//! | [`cluster`] | cluster mode: the Redis gateway thread, scripts, key layout          |
//! | [`config`], [`limits`] | every setting with its default; validation names the key  |
//! | [`server`]  | process start: limits, listeners, executors, signals                 |
//! | [`load`]    | the bundled load generator (`kometa load`)                           |
//!
//! Data flows: a socket's bytes land in its shard's scratch buffer,
//! `proto` turns them into commands, the command goes over the `bus` to the
//! channel's owner shard, which assigns an offset, encodes the push once and
//! sends an `Arc` of it to every shard with subscribers; each shard writes
//! the same bytes to its local subscribers.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod limits;
pub mod load;
pub mod proto;
pub mod server;
pub mod session;
pub mod shard;
pub mod transport;
pub mod util;
