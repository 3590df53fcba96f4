//! Process start and stop: raise the open-files limit, open the listeners
//! (one SO_REUSEPORT socket per shard, and the admin socket), build the bus,
//! start one pinned executor per shard, and turn SIGTERM/SIGINT into a
//! graceful shutdown.

use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};

use crate::admin::gateway::Gateway;
use crate::admin::http::Listener;
use crate::admin::server::Transport;
use crate::bus;
use crate::bus::Shared;
use crate::config::{AdminAddress, Config};
use crate::shard::{self, Shard, DESCRIPTORS_RESERVED};

/// Memory glommio registers for its own I/O buffers per executor. Kometa's
/// socket I/O does not use them, so a small pool keeps RSS and locked memory low.
const EXECUTOR_IO_MEMORY_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct ServeError(pub String);

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

fn fail(what: impl fmt::Display) -> ServeError {
    ServeError(what.to_string())
}

/// Opts the whole process out of transparent huge pages, existing mappings
/// included (see `Config::transparent_huge_pages`). Best effort: a kernel
/// without THP has nothing to disable.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_THP_DISABLE failed");
    }
}

/// Raises the soft open-files limit to the hard limit; returns (soft, hard).
pub fn raise_open_files_limit() -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes the size of the set we own.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let cpus: Vec<usize> = if ok {
        // SAFETY: CPU_ISSET reads the set we own.
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

fn public_listener(address: SocketAddr, backlog: u32, unsent_bytes_max: usize) -> Result<Socket, ServeError> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM.cloexec(), None)
        .map_err(|e| fail(format!("cannot create a socket for {address}: {e}")))?;
    socket.set_reuse_address(true).map_err(|e| fail(format!("SO_REUSEADDR: {e}")))?;
    socket.set_reuse_port(true).map_err(|e| fail(format!("SO_REUSEPORT: {e}")))?;
    socket.set_nonblocking(true).map_err(|e| fail(format!("O_NONBLOCK: {e}")))?;
    // Pushes are small and latency matters more than packet count; accepted
    // sockets inherit this, which saves a setsockopt per connection.
    socket.set_tcp_nodelay(true).map_err(|e| fail(format!("TCP_NODELAY: {e}")))?;
    // limits.socket_unsent_bytes_max, inherited by accepted sockets too.
    if unsent_bytes_max > 0 {
        let lowat = libc::c_int::try_from(unsent_bytes_max).unwrap_or(libc::c_int::MAX);
        let set = kometa_sys::set_int_option(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, lowat);
        if let Err(error) = set {
            return Err(fail(format!("TCP_NOTSENT_LOWAT (limits.socket_unsent_bytes_max): {error}")));
        }
    }
    socket.bind(&address.into()).map_err(|e| fail(format!("cannot listen on {address}: {e}")))?;
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket.listen(backlog).map_err(|e| fail(format!("cannot listen on {address}: {e}")))?;
    Ok(socket)
}

/// How long the start-up probe of the listen address waits for an answer.
const ADDRESS_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);

/// Refuses to start where another process already serves `listen`, unless
/// it is a member of the same cluster. SO_REUSEPORT would let a second
/// process join the port silently, and each publication would then reach
/// only the subscribers of the process it was sent to. (Two processes
/// starting at the same instant can both pass this probe.)
fn check_listen_address(config: &Config) -> Result<(), ServeError> {
    use std::io::{Read, Write};
    let address = config.listen;
    if address.port() == 0 {
        return Ok(());
    }
    let mut probe = address;
    if probe.ip().is_unspecified() {
        probe.set_ip(match probe {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&probe, ADDRESS_PROBE_TIMEOUT) else {
        return Ok(());
    };
    let _ = stream.set_read_timeout(Some(ADDRESS_PROBE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(ADDRESS_PROBE_TIMEOUT));
    let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: kometa\r\nConnection: close\r\n\r\n");
    let mut response = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    let body = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(&[][..], |at| &response[at + 4..]);
    let theirs = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|health| health["cluster"]["cluster_id"].as_str().map(str::to_owned));
    match (config.cluster_id(), theirs) {
        (Some(ours), Some(theirs)) if ours == theirs => {
            tracing::info!(%address, "another node of this cluster serves this address too: sharing it (SO_REUSEPORT)");
            Ok(())
        }
        (ours, theirs) => {
            let them = match theirs {
                Some(_) => "a Kometa node of another cluster",
                None => "another process (a single Kometa node, or another server)",
            };
            let fix = if ours.is_some() {
                "give it the same cluster.redis and cluster.key_prefix, or another --listen address"
            } else {
                "make both members of one cluster (--redis), or use another --listen address"
            };
            Err(fail(format!(
                "{address} is already served by {them}. Sharing it would split the clients between \
                 processes, and a publication would reach only the subscribers of the process it was \
                 sent to: {fix}"
            )))
        }
    }
}

/// Binds the admin listener. A stale Unix socket file (nobody listening) is
/// replaced; a live one is an error, so two servers never share it.
fn admin_listener(address: &AdminAddress) -> Result<(OwnedFd, Transport), ServeError> {
    match address {
        AdminAddress::Unix(path) => {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(fail(format!("admin socket {} is in use by another server", path.display())));
                }
                std::fs::remove_file(path)
                    .map_err(|e| fail(format!("cannot remove stale admin socket {}: {e}", path.display())))?;
            }
            // Created owner-only from the start: no window with wider permissions.
            // SAFETY: umask only changes the process file-creation mask.
            let previous = unsafe { libc::umask(0o177) };
            let bound = std::os::unix::net::UnixListener::bind(path);
            // SAFETY: restores the previous mask.
            unsafe { libc::umask(previous) };
            let listener = bound.map_err(|e| fail(format!("cannot bind admin socket {}: {e}", path.display())))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail(format!("cannot chmod admin socket {}: {e}", path.display())))?;
            listener.set_nonblocking(true).map_err(|e| fail(format!("admin socket: {e}")))?;
            // SAFETY: we take ownership of the listener's descriptor.
            Ok((unsafe { OwnedFd::from_raw_fd(listener.into_raw_fd()) }, Transport::Unix))
        }
        AdminAddress::Tls { host, port } => {
            let resolved = AdminAddress::resolve_tls(host, *port)
                .map_err(|e| fail(format!("admin: cannot resolve {host}: {e}")))?;
            let Some(socket_address) = resolved.first() else {
                return Err(fail(format!("admin: {host} resolves to no address")));
            };
            let (fd, _) = admin_listener(&AdminAddress::Tcp(*socket_address))?;
            Ok((fd, Transport::Tls))
        }
        AdminAddress::Tcp(socket_address) => {
            let socket = Socket::new(Domain::for_address(*socket_address), Type::STREAM.cloexec(), None)
                .map_err(|e| fail(format!("admin socket: {e}")))?;
            socket.set_reuse_address(true).map_err(|e| fail(format!("admin socket: {e}")))?;
            socket.set_nonblocking(true).map_err(|e| fail(format!("admin socket: {e}")))?;
            socket
                .bind(&(*socket_address).into())
                .map_err(|e| fail(format!("cannot bind admin address {socket_address}: {e}")))?;
            socket.listen(128).map_err(|e| fail(format!("cannot listen on admin address {socket_address}: {e}")))?;
            Ok((socket.into(), Transport::Tcp))
        }
    }
}

/// Binds a TCP listener of the admin gateway's (metrics, HTTP API); returns
/// it with the address it got (for a port 0).
fn http_listener(address: SocketAddr, key: &str) -> Result<(OwnedFd, SocketAddr), ServeError> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM.cloexec(), None)
        .map_err(|e| fail(format!("{key}: cannot create a socket: {e}")))?;
    socket.set_reuse_address(true).map_err(|e| fail(format!("{key}: SO_REUSEADDR: {e}")))?;
    socket.set_nonblocking(true).map_err(|e| fail(format!("{key}: O_NONBLOCK: {e}")))?;
    socket.bind(&address.into()).map_err(|e| fail(format!("{key}: cannot listen on {address}: {e}")))?;
    socket.listen(128).map_err(|e| fail(format!("{key}: cannot listen on {address}: {e}")))?;
    let bound = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| fail(format!("{key}: cannot read the listener's address")))?;
    Ok((socket.into(), bound))
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it
/// starts), so only the signal thread receives them.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on our thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // SIGHUP reloads the configuration (wait_for_signals); blocked like
        // the others so it never takes the default action (exit).
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        set
    }
}

/// Removes the admin socket file when the server exits.
struct SocketFileGuard(Option<PathBuf>);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub use crate::admin::reload::{reload, ConfigSource, Reloaded};

/// Runs the server until SIGTERM/SIGINT and a graceful shutdown; SIGHUP
/// reloads the configuration from `source`.
pub fn serve(config: Config, source: Option<ConfigSource>) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let shard_count = config.shard_count();

    if !config.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
    let (soft, hard) = raise_open_files_limit();
    let descriptors_for_clients = (soft as usize).saturating_sub(DESCRIPTORS_RESERVED * shard_count.max(1));
    let connections_max = config.connections_max.min(descriptors_for_clients.max(1));
    if config.connections_max > descriptors_for_clients {
        tracing::warn!(
            connections_max = config.connections_max,
            open_files_soft = soft,
            open_files_hard = hard,
            effective = connections_max,
            "connections_max exceeds what the open-files limit allows: connections past {connections_max} get 503. \
             Raise LimitNOFILE / nofile (see tuning/) to serve more"
        );
    }

    check_listen_address(&config)?;
    let mut listeners = Vec::with_capacity(shard_count);
    let unsent_bytes_max = config.limits.socket_unsent_bytes_max;
    let first = public_listener(config.listen, config.accept_backlog, unsent_bytes_max)?;
    let bound = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| fail("cannot read the listener's address"))?;
    listeners.push(first);
    for _ in 1..shard_count {
        listeners.push(public_listener(bound, config.accept_backlog, unsent_bytes_max)?);
    }
    let (admin_fd, admin_transport) = admin_listener(&config.admin)?;
    let metrics = config.metrics.listen.map(|address| http_listener(address, "metrics.listen")).transpose()?;
    let api = config.api.listen.map(|address| http_listener(address, "api.listen")).transpose()?;
    let mut edge = String::new();
    for (name, listener) in [("metrics", &metrics), ("api", &api)] {
        if let Some((_, address)) = listener {
            edge.push_str(&format!(" {name}={address}"));
        }
    }
    let _socket_file = SocketFileGuard(match &config.admin {
        AdminAddress::Unix(path) => Some(path.clone()),
        AdminAddress::Tcp(_) | AdminAddress::Tls { .. } => None,
    });

    // One endpoint per shard, then the admin gateway's, then (cluster mode)
    // the cluster gateway's.
    let clustered = config.cluster.enabled();
    let with_backend = config.rpc.enabled();
    let endpoint_count = shard_count + 1 + usize::from(clustered) + usize::from(with_backend);
    let (mut endpoints, wakeups) =
        bus::mesh(endpoint_count, config.limits.bus_queue_capacity, config.limits.bus_overflow_max)
            .map_err(|e| fail(format!("cannot create the bus: {e}")))?;
    let backend_endpoint = if with_backend { endpoints.pop() } else { None };
    let cluster_endpoint = if clustered { endpoints.pop() } else { None };
    let gateway_endpoint = endpoints.pop().ok_or_else(|| fail("the bus has no gateway endpoint"))?;
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert_file), Some(key_file)) => Some(crate::tls::server_config(cert_file, key_file).map_err(fail)?),
        _ => None,
    };
    let shared = Arc::new(Shared {
        connections: AtomicUsize::new(0),
        connections_max,
        fanout_backlog: (0..shard_count).map(|_| AtomicUsize::new(0)).collect(),
        shutting_down: AtomicBool::new(false),
        gateway_stop: AtomicBool::new(false),
        http_sessions: AtomicUsize::new(0),
        sockjs_sessions: AtomicUsize::new(0),
        wakeups: Arc::clone(&wakeups),
        cluster_degraded: AtomicBool::new(clustered),
        cluster_health: std::sync::Mutex::new(String::new()),
        tls: std::sync::RwLock::new(tls),
        tls_generation: std::sync::atomic::AtomicU64::new(0),
        config: std::sync::RwLock::new(Arc::clone(&config)),
        config_generation: std::sync::atomic::AtomicU64::new(0),
        limiter: crate::bus::limiter::Limiter::new(&config.limits),
        admin_refusals: Default::default(),
        rpc_handler_prefixes: Default::default(),
        backend_calls: Default::default(),
    });

    let signals = block_shutdown_signals();
    // After blocking the signals: threads inherit the mask, and a SIGTERM
    // taken by a thread that does not block it would kill the process.
    let _backend = match backend_endpoint {
        Some(endpoint) => {
            Some(crate::backend::start(Arc::clone(&config), Arc::clone(&shared), endpoint, shard_count).map_err(fail)?)
        }
        None => None,
    };
    let cluster = match cluster_endpoint {
        Some(endpoint) => {
            Some(crate::cluster::start(Arc::clone(&config), Arc::clone(&shared), endpoint, shard_count).map_err(fail)?)
        }
        None => None,
    };
    let cpus = allowed_cpus();
    if shard_count > cpus.len() {
        tracing::warn!(shards = shard_count, cpus = cpus.len(), "more shards than CPUs: shards will share cores");
    }

    let mut handles = Vec::with_capacity(shard_count);
    for (id, (listener, endpoint)) in listeners.into_iter().zip(endpoints).enumerate() {
        let config = Arc::clone(&config);
        let shared = Arc::clone(&shared);
        let listener: OwnedFd = listener.into();
        let placement = if config.pin_shards {
            glommio::Placement::Fixed(cpus[id % cpus.len()])
        } else {
            glommio::Placement::Unbound
        };
        let handle = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("kometa-shard-{id}"))
            .io_memory(EXECUTOR_IO_MEMORY_BYTES)
            .spawn(move || async move {
                let on_failure = Arc::clone(&shared);
                let shard = match Shard::new(id, config, shared, listener, endpoint) {
                    Ok(shard) => Rc::new(RefCell::new(shard)),
                    Err(error) => {
                        // Stop every shard now, not when this one is joined:
                        // a half-started server would drop the connections
                        // the kernel queued on this shard's listener.
                        tracing::error!(shard = id, %error, "shard failed to start; stopping");
                        on_failure.shutting_down.store(true, Ordering::Release);
                        on_failure.wakeups.iter().for_each(bus::Wakeup::signal);
                        return Err(format!("shard {id}: {error}"));
                    }
                };
                shard::run(shard).await;
                Ok(())
            })
            .map_err(|e| fail(format!("cannot start shard {id}: {e}")))?;
        handles.push(handle);
    }

    // The admin gateway: its own (mostly idle) thread, not pinned.
    let gateway_config = Arc::clone(&config);
    let gateway_shared = Arc::clone(&shared);
    let gateway_source = source.clone();
    let gateway = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("kometa-admin")
        .io_memory(EXECUTOR_IO_MEMORY_BYTES)
        .spawn(move || async move {
            let mut gateway = Gateway::new(gateway_config, gateway_shared, gateway_endpoint, shard_count);
            gateway.reload_source = gateway_source;
            let gateway = Rc::new(RefCell::new(gateway));
            let accept =
                glommio::spawn_local(crate::admin::server::serve(Rc::clone(&gateway), admin_fd, admin_transport));
            let mut http = Vec::new();
            for (listener, kind) in [(metrics, Listener::Metrics), (api, Listener::Api)] {
                if let Some((fd, _)) = listener {
                    http.push(glommio::spawn_local(crate::admin::http::serve(Rc::clone(&gateway), fd, kind)));
                }
            }
            crate::admin::gateway::run(gateway).await;
            drop(accept);
            drop(http);
        })
        .map_err(|e| fail(format!("cannot start the admin gateway: {e}")))?;

    let node = if clustered { format!(" node={}", config.node_id()) } else { String::new() };
    let tls = if config.tls.enabled() { " tls=on" } else { "" };
    println!("kometa ready listen={bound} admin={} shards={shard_count}{node}{tls}{edge}", config.admin);
    let _ = std::io::stdout().flush();
    tracing::info!(listen = %bound, admin = %config.admin, shards = shard_count, connections_max, "serving");

    let signal_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("kometa-signals".into())
        .spawn(move || wait_for_signals(signals, &signal_shared, source))
        .map_err(|e| fail(format!("cannot start the signal thread: {e}")))?;

    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => failure = Some(message),
            Err(error) => failure = Some(format!("shard executor failed: {error}")),
        }
        // One shard failing stops the others.
        if failure.is_some() {
            shared.shutting_down.store(true, Ordering::Release);
            shared.wakeups.iter().for_each(bus::Wakeup::signal);
        }
    }
    shared.gateway_stop.store(true, Ordering::Release);
    shared.wakeups[shard_count].signal();
    if gateway.join().is_err() {
        tracing::warn!("the admin gateway did not stop cleanly");
    }
    if let Some(cluster) = cluster {
        shared.wakeups[shard_count + 1].signal();
        if cluster.join().is_err() {
            tracing::warn!("the cluster gateway did not stop cleanly");
        }
    }
    match failure {
        Some(message) => Err(fail(message)),
        None => {
            tracing::info!("shutdown complete");
            Ok(())
        }
    }
}

/// A repeated signal within this window is the same request (a signal sent
/// to the process and its group reaches us twice), not an impatient operator.
const REPEATED_SIGNAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// First SIGINT/SIGTERM: graceful shutdown. Another one later: exit at once.
fn wait_for_signals(signals: libc::sigset_t, shared: &Shared, source: Option<ConfigSource>) {
    let mut first: Option<std::time::Instant> = None;
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: sigwait on a set of blocked signals, writing into a local.
        if unsafe { libc::sigwait(&signals, &mut signal) } != 0 {
            continue;
        }
        if signal == libc::SIGHUP {
            match &source {
                None => tracing::warn!("SIGHUP: no configuration source to reload from"),
                Some(source) => match reload(shared, source) {
                    Ok(Reloaded { restart_needed }) if restart_needed.is_empty() => {
                        tracing::info!("SIGHUP: configuration reloaded")
                    }
                    Ok(Reloaded { restart_needed }) => tracing::warn!(
                        restart_needed = %restart_needed.join(", "),
                        "SIGHUP: configuration reloaded; these changes need a restart and keep their old values"
                    ),
                    Err(error) => {
                        // One log line (a TOML error spans several).
                        let error = error.replace('\n', " | ");
                        tracing::error!(%error, "SIGHUP: reload refused; the running configuration stays")
                    }
                },
            }
            continue;
        }
        match first {
            None => {
                first = Some(std::time::Instant::now());
                tracing::info!(signal, "signal received: closing connections (1001) and draining");
                shared.shutting_down.store(true, Ordering::Release);
                shared.wakeups.iter().for_each(bus::Wakeup::signal);
            }
            Some(at) if at.elapsed() < REPEATED_SIGNAL_WINDOW => {}
            Some(_) => {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    }
}
