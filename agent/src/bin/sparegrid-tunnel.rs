//! `sparegrid-tunnel`: the agent's WireGuard tunnel endpoint on its own,
//! for tests, benchmarks and hosts that want only the overlay.
//!
//! `run --config FILE [--control SOCK]` brings the endpoint up; SIGHUP (or
//! `reload`) re-reads the file and applies its peer list live; SIGUSR1
//! prints the stats to stdout; SIGTERM/SIGINT stop it. `stats` and
//! `reload` talk to a running endpoint's control socket; `genkey` and
//! `pubkey` work like `wg`'s. The logic is in `sparegrid_agent::tunnel`.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sparegrid_agent::tunnel::control::{self, ControlServer, Controlled, FileTunnel};
use sparegrid_agent::tunnel::{Key, TunnelStats};

#[derive(Parser)]
#[command(
    name = "sparegrid-tunnel",
    about = "sparegrid's WireGuard tunnel endpoint"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the endpoint from a TOML config (see docs/tunnel.md).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Unix socket for `stats` and `reload`.
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Print a running endpoint's stats.
    Stats {
        #[arg(long)]
        control: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a running endpoint re-read its config's peer list.
    Reload {
        #[arg(long)]
        control: PathBuf,
    },
    /// Print a new private key.
    Genkey,
    /// Read a private key on stdin, print its public key.
    Pubkey,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { config, control } => run(config, control),
        Cmd::Stats { control, json } => {
            let answer = control::request(&control, "stats")
                .with_context(|| format!("control socket {}", control.display()))?;
            if json {
                println!("{answer}");
            } else {
                let stats: TunnelStats = serde_json::from_str(&answer)
                    .with_context(|| format!("stats answer {answer:?}"))?;
                print!("{}", control::render(&stats));
            }
            Ok(())
        }
        Cmd::Reload { control } => {
            let answer = control::request(&control, "reload")
                .with_context(|| format!("control socket {}", control.display()))?;
            println!("{answer}");
            if answer.starts_with("error") {
                bail!("reload failed");
            }
            Ok(())
        }
        Cmd::Genkey => {
            println!("{}", Key::generate()?);
            Ok(())
        }
        Cmd::Pubkey => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            let k: Key = s.parse()?;
            println!("{}", k.public());
            Ok(())
        }
    }
}

fn run(config: PathBuf, control: Option<PathBuf>) -> Result<()> {
    let tunnel = Arc::new(FileTunnel::start(&config)?);
    let _server = match &control {
        Some(p) => Some(
            ControlServer::start(p, tunnel.clone())
                .with_context(|| format!("control socket {}", p.display()))?,
        ),
        None => None,
    };
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    let usr1 = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())?;
    // Readiness for scripts: the endpoint is up and the socket listens.
    println!("ready {}", tunnel.tunnel.public_key());
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::Relaxed) {
            if let Err(e) = tunnel.reload() {
                tracing::error!("reload: {e}");
            }
        }
        if usr1.swap(false, Ordering::Relaxed) {
            print!("{}", control::render(&tunnel.stats()));
        }
    }
    tracing::info!("stopping");
    Ok(())
}
