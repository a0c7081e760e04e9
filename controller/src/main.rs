//! `sparegrid-controller`: thin entry point. Parses arguments, loads the
//! config and serves the API (`api::serve`: jobs, hosts, the agent plane
//! and push dispatch; HTTPS with `[tls]`). A bad config (a field, or TLS
//! files that cannot be used) exits 2 naming it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparegrid_controller::config::ControllerConfig;

#[derive(Parser)]
#[command(
    name = "sparegrid-controller",
    version,
    about = "Splits work into subtasks and dispatches them to agents"
)]
struct Cli {
    /// Config file (TOML). Without it the built-in defaults apply.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the API (the default).
    Run,
    /// Print the effective config as TOML.
    PrintConfig,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPAREGRID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let cfg = match &cli.config {
        Some(path) => ControllerConfig::load(path),
        None => Ok(ControllerConfig::default()),
    };
    let cfg = match cfg.and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sparegrid-controller: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Cmd::PrintConfig) = cli.command {
        return match toml::to_string_pretty(&cfg) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sparegrid-controller: cannot render config: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sparegrid-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(sparegrid_controller::api::serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sparegrid-controller: {e}");
            if e.is_config() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
