//! `sparegrid-controller`: thin entry point. Parses arguments, loads the
//! config and serves the job API (`api::serve`). Agent registration and push
//! dispatch are being built (issue 3).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sparegrid_controller::config::ControllerConfig;

#[derive(Parser)]
#[command(
    name = "sparegrid-controller",
    version,
    about = "Splits work into subtasks and dispatches them to agents"
)]
struct Cli {
    /// Config file (TOML). Without it the built-in defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
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
            ExitCode::FAILURE
        }
    }
}
