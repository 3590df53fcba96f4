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
    /// Publish DATA (JSON; a plain string is sent as a JSON string) to CHANNEL as EVENT.
    Publish {
        #[command(flatten)]
        admin: AdminArgs,
        channel: String,
        event: String,
        data: String,
    },
    /// Print server statistics as one JSON object.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load generator: idle, broadcast, churn and connect scenarios.
    Load(kometa::load::LoadArgs),
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
    /// Admin listener: unix:PATH or tcp:ADDR:PORT.
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
}

#[derive(Args)]
struct AdminArgs {
    /// Admin socket of the server: unix:PATH or tcp:ADDR:PORT (default: the server's default, or the config file's).
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOMETA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn connect(args: &AdminArgs) -> Result<AdminClient, String> {
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

/// DATA as JSON: valid JSON is sent as is, anything else as a JSON string.
fn data_as_json(data: &str) -> Vec<u8> {
    if kometa::proto::json::validate(data.as_bytes()).is_ok() {
        data.as_bytes().to_vec()
    } else {
        serde_json::to_vec(data).unwrap_or_default()
    }
}

fn run(cli: Cli) -> Result<(), (u8, String)> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(&args).map_err(|e| (2, format!("config error: {e}")))?;
            kometa::server::serve(config).map_err(|e| (1, e.to_string()))
        }
        Command::Publish { admin, channel, event, data } => {
            let mut client = connect(&admin).map_err(|e| (1, e))?;
            let published = client.publish(&channel, &event, &data_as_json(&data)).map_err(|e| (1, e.to_string()))?;
            println!("{}", serde_json::json!({"offset": published.offset, "subscribers": published.subscribers}));
            Ok(())
        }
        Command::Stats { admin } => {
            let mut client = connect(&admin).map_err(|e| (1, e))?;
            let stats = client.stats().map_err(|e| (1, e.to_string()))?;
            println!("{stats}");
            Ok(())
        }
        Command::Load(args) => kometa::load::run(args).map_err(|e| (1, e)),
        Command::LoadWorker => kometa::load::worker_main().map_err(|e| (1, e)),
    }
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("kometa: {message}");
            ExitCode::from(code)
        }
    }
}
