//! The `kometa` command: `serve` runs the server; the other subcommands talk
//! to a running server through its admin socket and print JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use kometa::admin::client::AdminClient;
use kometa::config::{default_admin_address, AdminAddress, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kometa", version, about = "Comet push server: WebSocket, SSE and long-poll fan-out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults; no config file or Redis needed).
    Serve(ServeArgs),
    /// Publish DATA (JSON, or any text with --string) to CHANNEL as EVENT.
    Publish {
        #[command(flatten)]
        admin: AdminArgs,
        channel: String,
        event: String,
        data: String,
        /// Send DATA as a JSON string (without it, DATA must be valid JSON).
        #[arg(long)]
        string: bool,
    },
    /// Print server statistics as one JSON object.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
        /// In cluster mode, this node's figures only (no Redis round trip,
        /// nothing asked of the other nodes): a per-node health probe.
        #[arg(long)]
        node: bool,
    },
    /// Make the server re-read its configuration file (as SIGHUP does); prints
    /// the keys that need a restart, or the key the new file got wrong.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send DATA (JSON, or any text with --string) to users (comma-separated ids): every live connection gets it; it waits in their inboxes until acknowledged.
    SendUser {
        #[command(flatten)]
        admin: AdminArgs,
        /// USER_ID[,USER_ID...]
        users: String,
        event: String,
        data: String,
        /// Send DATA as a JSON string (without it, DATA must be valid JSON).
        #[arg(long)]
        string: bool,
    },
    /// Members of a channel (user ids with connection counts), or counts with --stats.
    Presence {
        #[command(flatten)]
        admin: AdminArgs,
        channel: String,
        /// Only the counts (users, connections, anonymous).
        #[arg(long)]
        stats: bool,
        /// Continue after this user id (the previous page's "next").
        #[arg(long, default_value = "")]
        cursor: String,
        /// Members per page (0: the server's maximum).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Whether users are online, or when they were last seen.
    UserStatus {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// A channel's recent publications.
    History {
        #[command(flatten)]
        admin: AdminArgs,
        channel: String,
        /// Only publications after this offset (0: all retained).
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many (0: the server's maximum).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Channels that exist, with subscriber counts, optionally by name prefix.
    Channels {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value = "")]
        cursor: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// One channel: subscribers, epoch, offset, history length.
    ChannelInfo {
        #[command(flatten)]
        admin: AdminArgs,
        channel: String,
    },
    /// Close every connection of a user, optionally refusing tokens issued before a time.
    Disconnect {
        #[command(flatten)]
        admin: AdminArgs,
        user: String,
        /// Close code (default 4003).
        #[arg(long, default_value_t = 0)]
        code: u16,
        #[arg(long, default_value = "")]
        reason: String,
        /// Refuse tokens issued before this Unix time, or `now`.
        #[arg(long)]
        revoke_before: Option<String>,
    },
    /// Mint a connection token (HS256 JWT), as a backend would.
    Token {
        /// The token secret (or KOMETA_TOKEN_SECRET).
        #[arg(long, env = "KOMETA_TOKEN_SECRET", hide_env_values = true)]
        secret: String,
        /// The user id.
        #[arg(long)]
        sub: String,
        /// Lifetime in seconds (0: no expiry).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Grant a private channel (a name, or a prefix ending in *); repeatable.
        #[arg(long = "channel")]
        channels: Vec<String>,
    },
    /// Load generator: idle, broadcast, churn and connect scenarios.
    Load(kometa_loadgen::LoadArgs),
    /// Internal: one load-generator worker process, started by `kometa load`.
    #[command(hide = true)]
    LoadWorker,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; flags and KOMETA_* variables override it.
    #[arg(long, env = "KOMETA_CONFIG")]
    config: Option<PathBuf>,
    /// Public listener, ADDR:PORT.
    #[arg(long, env = "KOMETA_LISTEN")]
    listen: Option<String>,
    /// Admin listener: unix:PATH, tcp:ADDR:PORT, or tls:HOST:PORT (TCP with the [tls] certificate).
    #[arg(long, env = "KOMETA_ADMIN")]
    admin: Option<String>,
    /// Key for a TCP admin listener.
    #[arg(long, env = "KOMETA_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Executors (one per core); default: the number of cores.
    #[arg(long, env = "KOMETA_SHARDS")]
    shards: Option<usize>,
    /// HS256 secret for connection tokens.
    #[arg(long, env = "KOMETA_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Join a cluster through Redis: redis://HOST:PORT, or several,
    /// comma-separated (channels and users are spread over them).
    #[arg(long, env = "KOMETA_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// This node's name in the cluster (default: generated).
    #[arg(long, env = "KOMETA_NODE_ID")]
    node_id: Option<String>,
    /// I/O driver: auto, io_uring or epoll.
    #[arg(long, env = "KOMETA_IO_DRIVER")]
    io_driver: Option<String>,
    /// TLS certificate chain (PEM) for the public listener.
    #[arg(long, env = "KOMETA_TLS_CERT_FILE")]
    tls_cert_file: Option<String>,
    /// TLS private key (PEM) for the public listener.
    #[arg(long, env = "KOMETA_TLS_KEY_FILE")]
    tls_key_file: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, env = "KOMETA_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Serve the HTTP API for backends on ADDR:PORT (needs --api-key).
    #[arg(long, env = "KOMETA_API_LISTEN")]
    api_listen: Option<String>,
    /// Key for the HTTP API (`Authorization: apikey KEY`).
    #[arg(long, env = "KOMETA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Log lines as `text` or `json`.
    #[arg(long, env = "KOMETA_LOG_FORMAT")]
    log_format: Option<String>,
}

#[derive(Args)]
struct AdminArgs {
    /// Admin socket of the server: unix:PATH, tcp:ADDR:PORT or tls:HOST:PORT (default: the server's default, or the config file's). tls: checks the certificate against the PEM file in KOMETA_ADMIN_CA, else the public web roots.
    #[arg(long, env = "KOMETA_ADMIN")]
    admin: Option<String>,
    /// Key for a TCP admin listener.
    #[arg(long, env = "KOMETA_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Read the admin address and key from this config file.
    #[arg(long, env = "KOMETA_CONFIG")]
    config: Option<PathBuf>,
    /// Seconds to wait for the server.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// Defaults, then the file, then flags and environment variables.
fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(listen) = &args.listen {
        config.listen = listen.parse().map_err(|_| format!("--listen / KOMETA_LISTEN: `{listen}` is not ADDR:PORT"))?;
    }
    if let Some(admin) = &args.admin {
        config.admin = AdminAddress::parse(admin).map_err(|e| format!("--admin / KOMETA_ADMIN: {e}"))?;
    }
    if let Some(key) = &args.admin_key {
        config.admin_key = Some(key.clone());
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    if let Some(secret) = &args.token_secret {
        config.token_secret = Some(secret.clone());
    }
    if let Some(redis) = &args.redis {
        config.cluster.redis = redis.split(',').map(|url| url.trim().to_owned()).filter(|u| !u.is_empty()).collect();
    }
    if let Some(node_id) = &args.node_id {
        config.cluster.node_id = Some(node_id.clone());
    }
    if let Some(driver) = &args.io_driver {
        config.io.driver = match driver.as_str() {
            "auto" => kometa::shard::io::DriverKind::Auto,
            "io_uring" => kometa::shard::io::DriverKind::IoUring,
            "epoll" => kometa::shard::io::DriverKind::Epoll,
            other => return Err(format!("--io-driver / KOMETA_IO_DRIVER: `{other}` is not auto, io_uring or epoll")),
        };
    }
    if let Some(file) = &args.tls_cert_file {
        config.tls.cert_file = Some(file.clone());
    }
    if let Some(file) = &args.tls_key_file {
        config.tls.key_file = Some(file.clone());
    }
    for (value, target, what) in [
        (&args.metrics_listen, &mut config.metrics.listen, "--metrics-listen / KOMETA_METRICS_LISTEN"),
        (&args.api_listen, &mut config.api.listen, "--api-listen / KOMETA_API_LISTEN"),
    ] {
        if let Some(text) = value {
            *target = Some(text.parse().map_err(|_| format!("{what}: `{text}` is not ADDR:PORT"))?);
        }
    }
    if let Some(key) = &args.api_key {
        config.api.key = Some(key.clone());
    }
    if let Some(format) = &args.log_format {
        config.log.format = kometa::config::LogFormat::parse(format)
            .ok_or_else(|| format!("--log-format / KOMETA_LOG_FORMAT: `{format}` is not text or json"))?;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn connect(args: &AdminArgs) -> Result<AdminClient, (u8, String)> {
    connect_admin(args).map_err(|e| (1, e))
}

fn connect_admin(args: &AdminArgs) -> Result<AdminClient, String> {
    let file = match &args.config {
        Some(path) => Some(Config::from_file(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let address = match &args.admin {
        Some(text) => AdminAddress::parse(text).map_err(|e| format!("--admin: {e}"))?,
        None => file.as_ref().map_or_else(default_admin_address, |c| c.admin.clone()),
    };
    let key = args.admin_key.clone().or_else(|| file.and_then(|c| c.admin_key));
    AdminClient::connect(&address, key.as_deref(), Duration::from_secs(args.timeout)).map_err(|e| e.to_string())
}

/// DATA as JSON: as given (it must be valid JSON), or with `--string` as a
/// JSON string. Guessing would turn a typo in JSON (`{"a":1`) into a string
/// the subscribers did not expect.
fn data_as_json(data: &str, string: bool) -> Result<Vec<u8>, (u8, String)> {
    if string {
        return Ok(serde_json::to_vec(data).unwrap_or_default());
    }
    match kometa_protocol::json::validate(data.as_bytes()) {
        Ok(()) => Ok(data.as_bytes().to_vec()),
        Err(why) => Err((2, format!("DATA is not valid JSON ({why}); pass --string to send it as a JSON string"))),
    }
}

/// Prints an admin reply document as one JSON line.
fn print_json(result: Result<serde_json::Value, kometa::admin::client::ClientError>) -> Result<(), (u8, String)> {
    let document = result.map_err(|e| (1, e.to_string()))?;
    println!("{document}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), (u8, String)> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(&args).map_err(|e| (2, format!("config error: {e}")))?;
            kometa::log::init(&config.log);
            // A reload reads the same file and flags again.
            let source: kometa::server::ConfigSource = std::sync::Arc::new(move || load_config(&args));
            kometa::server::serve(config, Some(source)).map_err(|e| (1, e.to_string()))
        }
        Command::Publish { admin, channel, event, data, string } => {
            let data = data_as_json(&data, string)?;
            let mut client = connect(&admin)?;
            let published = client.publish(&channel, &event, &data).map_err(|e| (1, e.to_string()))?;
            println!("{}", serde_json::json!({"offset": published.offset, "subscribers": published.subscribers}));
            Ok(())
        }
        Command::Stats { admin, node } => {
            let mut client = connect(&admin)?;
            print_json(if node { client.stats_node() } else { client.stats() })
        }
        Command::Reload { admin } => print_json(connect(&admin)?.reload()),
        Command::SendUser { admin, users, event, data, string } => {
            let data = data_as_json(&data, string)?;
            let users: Vec<&str> = users.split(',').filter(|u| !u.is_empty()).collect();
            print_json(connect(&admin)?.send_user(&users, &event, &data))
        }
        Command::Presence { admin, channel, stats, cursor, limit } => {
            let mut client = connect(&admin)?;
            if stats {
                print_json(client.presence_stats(&channel))
            } else {
                print_json(client.presence(&channel, &cursor, limit))
            }
        }
        Command::UserStatus { admin, users } => {
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            print_json(connect(&admin)?.user_status(&users))
        }
        Command::History { admin, channel, since, limit } => {
            print_json(connect(&admin)?.history(&channel, since, limit))
        }
        Command::Channels { admin, prefix, cursor, limit } => {
            print_json(connect(&admin)?.channels(&prefix, &cursor, limit))
        }
        Command::ChannelInfo { admin, channel } => print_json(connect(&admin)?.channel_info(&channel)),
        Command::Disconnect { admin, user, code, reason, revoke_before } => {
            let revoke_before_s = match revoke_before.as_deref() {
                None => 0,
                Some("now") => kometa::util::unix_time_ms() / 1000,
                Some(text) => {
                    text.parse().map_err(|_| (2, format!("--revoke-before: `{text}` is not a Unix time or `now`")))?
                }
            };
            print_json(connect(&admin)?.disconnect(&user, code, &reason, revoke_before_s))
        }
        Command::Token { secret, sub, ttl, channels } => {
            let now = kometa::util::unix_time_ms() / 1000;
            let mut claims = serde_json::json!({"sub": sub, "iat": now});
            if ttl > 0 {
                claims["exp"] = (now + ttl).into();
            }
            if !channels.is_empty() {
                claims["channels"] = channels.into();
            }
            println!("{}", kometa_protocol::token::sign(&secret, &claims));
            Ok(())
        }
        Command::Load(args) => kometa_loadgen::run(args).map_err(|e| (1, e)),
        Command::LoadWorker => kometa_loadgen::worker_main().map_err(|e| (1, e)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` sets up logging once its config (`[log]`) is read.
    if !matches!(cli.command, Command::Serve(_)) {
        kometa::log::init(&kometa::config::LogConfig::default());
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("kometa: {message}");
            ExitCode::from(code)
        }
    }
}
