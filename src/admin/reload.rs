//! Reloading the configuration (SIGHUP and the admin RELOAD operation):
//! re-read the file and flags the server started with, validate, and make
//! the result live without dropping a connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus;
use crate::bus::Shared;
use crate::config::Config;

/// Where a reload reads the configuration from: the file and flags the
/// server started with, validated.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed keys that keep their old value until a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Re-reads the configuration and makes it live: limits, namespaces,
/// token secrets, allowed origins, timeouts, TLS certificates. A file
/// that fails validation, or a certificate that cannot be loaded, is
/// refused (the error names the key) and the running configuration stays.
pub fn reload(shared: &Shared, source: &ConfigSource) -> Result<Reloaded, String> {
    let next = source()?;
    let current = shared.config.read().map(|config| Arc::clone(&config)).map_err(|_| "config lock poisoned")?;
    let mut restart_needed = current.restart_only_changes(&next);
    let mut next = current.keep_restart_only(next);
    let tls = match (&next.tls.cert_file, &next.tls.key_file) {
        _ if current.tls.enabled() != next.tls.enabled() => {
            // Turning TLS on or off changes what the listener speaks.
            restart_needed.push("tls");
            next.tls = current.tls.clone();
            None
        }
        (Some(cert_file), Some(key_file)) => Some(crate::tls::server_config(cert_file, key_file)?),
        _ => None,
    };
    if let Some(tls) = tls {
        // Re-read even when the paths are the same: that is how a renewed
        // certificate comes in. Existing connections keep their session.
        if let Ok(mut slot) = shared.tls.write() {
            *slot = Some(tls);
        }
        shared.tls_generation.fetch_add(1, Ordering::AcqRel);
    }
    crate::log::set_warnings_per_second_max(next.log.warnings_per_second_max);
    if let Ok(mut slot) = shared.config.write() {
        *slot = Arc::new(next);
    }
    shared.config_generation.fetch_add(1, Ordering::AcqRel);
    shared.wakeups.iter().for_each(bus::Wakeup::signal);
    Ok(Reloaded { restart_needed })
}
