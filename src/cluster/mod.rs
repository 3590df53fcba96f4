//! Cluster mode: several Kometa nodes share fan-out, history, presence and
//! users through Redis (docs/cluster.md). Without `cluster.redis` none of
//! this runs and no thread is started.
//!
//! # Layout
//!
//! | module      | does                                                          |
//! |-------------|---------------------------------------------------------------|
//! | [`gateway`] | the node's door to Redis: one thread, one bus endpoint         |
//! | [`link`]    | one ordered RESP3 connection per Redis (commands and pub/sub)  |
//! | [`scripts`] | the Lua scripts that make each operation atomic in Redis       |
//! | [`keys`]    | key layout, and which Redis holds a name (jump hash)           |
//! | [`payload`] | the messages nodes exchange over pub/sub                       |
//!
//! The shards' side (following channels, users, resets) is
//! `shard/cluster.rs`; the sequencing it relies on is `hub::follow`.

pub mod gateway;
pub mod keys;
pub mod link;
pub mod payload;
pub mod scripts;

use std::sync::Arc;
use std::time::Duration;

use crate::bus::Endpoint;
use crate::bus::Shared;
use crate::config::Config;

/// Starts the cluster gateway's thread and waits (at most `connect_timeout_ms`
/// plus a second) until it has tried every Redis once, so a node that
/// starts with Redis up serves cluster-wide from its first connection.
pub fn start(
    config: Arc<Config>,
    shared: Arc<Shared>,
    bus: Endpoint,
    shard_count: usize,
) -> Result<std::thread::JoinHandle<()>, String> {
    let gateway = gateway::ClusterGateway::new(Arc::clone(&config), shared, bus, shard_count)?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("kometa-cluster".into())
        .spawn(move || gateway::run(gateway, started_tx))
        .map_err(|e| format!("cannot start the cluster gateway: {e}"))?;
    let wait = Duration::from_millis(config.cluster.connect_timeout_ms) + Duration::from_secs(1);
    if started_rx.recv_timeout(wait).is_err() {
        tracing::warn!("Redis not reached yet; serving while the cluster gateway keeps trying");
    }
    Ok(handle)
}
