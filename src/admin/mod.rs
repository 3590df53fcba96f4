//! The admin socket: the backend's way in. Unix socket by default (mode
//! 0600), TCP with a shared key as an option. Never on the public port.

pub mod api;
pub mod gateway;
pub mod handlers;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod reload;
pub mod server;
pub mod sys;
pub mod tls_stream;

/// The blocking admin client lives in its own crate (the CLI, the load
/// generator and backends in Rust use it); re-exported for the CLI.
pub use kometa_admin_client as client;
