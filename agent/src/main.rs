//! `sparegrid-agent`: thin entry point. Parses arguments, loads the config
//! and hands over to the library (`daemon::run` or `check::run_check`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sparegrid_agent::config::Config;

#[derive(Parser)]
#[command(
    name = "sparegrid-agent",
    version,
    about = "Runs grid VMs on the capacity customers leave idle"
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
    /// Run the agent (the default).
    Run,
    /// Report what this host supports: libvirt, KVM or TCG, cgroups, PSI.
    Check,
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
        Some(path) => Config::load(path),
        None => Config::parse(""),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sparegrid-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => match sparegrid_agent::daemon::run(cfg, cli.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sparegrid-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check => {
            let report = sparegrid_agent::check::run_check(&cfg);
            print!("{report}");
            if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::PrintConfig => match toml::to_string_pretty(&cfg) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sparegrid-agent: cannot render config: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
