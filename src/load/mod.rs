//! The bundled load generator (`kometa load`): idle, broadcast, churn and
//! connect scenarios against Kometa or any WebSocket server.

/// Arguments of `kometa load`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {}

/// Runs a load scenario and prints its report.
pub fn run(_args: LoadArgs) -> Result<(), String> {
    Err("the load generator is not built yet".into())
}

/// Entry point of a worker process started by `kometa load`.
pub fn worker_main() -> Result<(), String> {
    Err("the load generator is not built yet".into())
}
