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
//! | `kometa-protocol`     | sans-io codecs: HTTP heads, WebSocket frames, client JSON, admin frames, tokens, SockJS, Jii-comet |
//! | `kometa-admin-client` | the blocking admin client (CLI, load generator, backends)  |
//! | `kometa-sys`          | checked wrappers over the socket, epoll and timer calls    |
//! | `kometa-loadgen`      | `kometa load` and the floor server                         |
//!
//! This crate is the server, in layers (a module imports only those
//! above it in this table):
//!
//! | module         | does                                                              |
//! |----------------|-------------------------------------------------------------------|
//! | [`util`], [`limits`], [`log`] | clocks, ids; every limit with its default; log setup and rate limits |
//! | [`tls`]        | sans-io TLS sessions: rustls handshake, then a compact TLS 1.3 record layer |
//! | [`config`]     | every setting with its default; validation names the key          |
//! | [`hub`]        | channels, offsets, history, presence, users, the subscriber index |
//! | [`bus`]        | cross-shard bounded queues with eventfd wake-ups; message and query types; process-wide limit tables |
//! | [`connection`] | one connection as a sans-io state machine: HTTP head, WebSocket, SSE, long-poll, closing; timers from a passed clock; bounded outbox |
//! | [`shard`]      | the driver per core: I/O driver (io_uring or epoll), slab, reads, writes, fan-out, sweep |
//! | [`app`]        | what requests and messages mean: routes, client commands, HTTP sessions, SockJS and Jii-comet, channel owners, users, queries |
//! | [`admin`]      | the admin listener, `/metrics` and the HTTP API, on their own thread; the operations they share |
//! | [`cluster`]    | cluster mode: the Redis gateway thread, scripts, key layout       |
//! | [`backend`]    | RPC and proxies (`[rpc]`): the backend thread, webhook workers, timeouts, circuit breakers |
//! | [`server`]     | process start: limits, listeners, executors, signals              |
//!
//! `app` is `impl Shard` blocks: the shard calls into it for each request
//! and message, and it writes only through the connection.
//!
//! Data flows: a socket's bytes land in its shard's scratch buffer, the
//! connection turns them into requests and messages (with
//! `kometa-protocol`), `app` turns those into commands, a command goes over
//! the `bus` to the channel's owner shard, which assigns an offset (or, in a
//! cluster, asks Redis for one), encodes the push once and sends an `Arc`
//! of it to every shard with subscribers; each shard writes the same bytes
//! to its local subscribers. docs/architecture.md has the whole picture.

pub mod admin;
pub mod app;
pub mod backend;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod hub;
pub mod limits;
pub mod log;
pub mod server;
pub mod shard;
pub mod tls;

pub mod util;
