//! The admin socket: the backend's way in. Unix socket by default (mode
//! 0600), TCP with a shared key as an option. Never on the public port.

pub mod client;
pub mod gateway;
pub mod query;
pub mod server;
