//! The `sparegrid` command-line client of the controller's job API. The
//! binary (`src/bin/sparegrid.rs`) only calls [`run`]; everything else is
//! here so tests drive it in-process with captured output ([`run_with`]).
//!
//! ```text
//! sparegrid [--controller URL] [--token T] [--ca-cert FILE] [--json] <command>
//!   submit FILE [--watch]           job.toml or job.json, checked locally first
//!   status [ID] [--state S] [--limit N]
//!   watch ID [--poll]               progress bar; exit 0 done, 1 failed/cancelled
//!   results ID [--partial] [-o FILE|DIR/]  DIR: one file per output (large ones fetched with Range)
//!   upload FILE                     resumable upload for a `lines` job's input; prints its data id
//!   cancel ID
//!   hosts [--peers]                 --peers: each host's overlay tunnel peers
//! ```
//!
//! `--controller` falls back to `SPAREGRID_CONTROLLER`, then
//! `http://127.0.0.1:7400`; `--token` to `SPAREGRID_TOKEN` (sent as a
//! bearer token on every request; `submit`, `status`, `watch`, `results`
//! and `cancel` need a submit or admin token, `hosts` an admin token, once
//! the controller has tokens); `--ca-cert` to `SPAREGRID_CA_CERT` (a PEM
//! CA to trust for an `https://` controller, besides the public roots).
//! Human output by default, `--json` prints the API's JSON (one document
//! per line).
//!
//! Errors print as `error: <message> (field: <field>, code: <code>)`; a
//! refused token (401 `unauthorized`, 403 `forbidden`) adds what to do. Exit
//! codes: 0 success; 1 a failed or cancelled job (`watch`), an unreachable
//! controller or any other failure; 2 a refused request (HTTP 4xx), a bad
//! job file or bad arguments.

pub mod client;
pub mod data;
pub mod jobfile;
pub mod output;
pub mod watch;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use client::Client;
pub use watch::WatchOptions;

use crate::api::{CancelResponse, ErrorBody, JobDetail, JobList, SubmitResponse};
use crate::job::ValidationError;
use client::{body_text, decode};

/// The controller the CLI talks to when neither `--controller` nor
/// `SPAREGRID_CONTROLLER` names one.
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7400";
/// Environment variable for `--controller`.
pub const ENV_CONTROLLER: &str = "SPAREGRID_CONTROLLER";
/// Environment variable for `--token`.
pub const ENV_TOKEN: &str = "SPAREGRID_TOKEN";
/// Environment variable for `--ca-cert`.
pub const ENV_CA_CERT: &str = "SPAREGRID_CA_CERT";

/// Exit code of success.
pub const EXIT_OK: i32 = 0;
/// Exit code of a failed or cancelled job, or a failure that is not the
/// caller's (unreachable controller, 5xx, I/O).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a refused request (4xx), bad job file or bad arguments.
pub const EXIT_USAGE: i32 = 2;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "sparegrid",
    version,
    about = "Submit jobs to a sparegrid controller and follow them",
    long_about = None
)]
pub struct Cli {
    /// Controller base URL [env: SPAREGRID_CONTROLLER] [default: http://127.0.0.1:7400]
    #[arg(long, global = true, value_name = "URL")]
    pub controller: Option<String>,
    /// Bearer token [env: SPAREGRID_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM file of a CA to trust for an https:// controller [env: SPAREGRID_CA_CERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of tables and text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Submit a job from a .toml or .json file; prints its id and subtask count
    Submit {
        /// The job file (job.toml or job.json)
        file: PathBuf,
        /// Follow the job until it ends, as `watch` does
        #[arg(long)]
        watch: bool,
    },
    /// One job's state and counts, or the list of jobs
    Status {
        /// The job; without it, list jobs newest first
        id: Option<String>,
        /// List only jobs in this state (queued, running, done, failed, cancelled)
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// List at most this many jobs
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Follow a job with a progress bar; exits 0 when done, 1 when failed or cancelled
    Watch {
        id: String,
        /// Poll the job every 500 ms instead of reading its event stream
        #[arg(long)]
        poll: bool,
    },
    /// A finished job's outputs in subtask order (raw bytes; --json: per subtask)
    Results {
        id: String,
        /// Answer before the job has ended, with what is done so far
        #[arg(long)]
        partial: bool,
        /// Which outputs of a job with a reduce step: `reduce` (its
        /// default) or `map` (each subtask's output, in index order)
        #[arg(long, value_name = "STAGE", value_parser = ["map", "reduce"])]
        stage: Option<String>,
        /// Write to this file instead of stdout; an existing directory
        /// (or a path ending in `/`) gets one file per output instead:
        /// subtask-<index>.out and reduce.out, large outputs downloaded
        /// with Range so an interrupted fetch resumes on a rerun
        #[arg(long, short, value_name = "FILE|DIR")]
        output: Option<PathBuf>,
    },
    /// Upload a file for a `lines` job's input (`input = { data = "ID" }`);
    /// prints its data id. Resumable: run it again after a broken
    /// connection and it goes on from the last checkpoint
    Upload {
        /// The file to upload
        file: PathBuf,
    },
    /// Cancel a job: queued subtasks are dropped, running ones stopped
    Cancel { id: String },
    /// The hosts: state, load factor, dominant metric, free slots, running
    /// subtasks, overlay slice and connected tunnel peers
    Hosts {
        /// Also list each host's overlay tunnel peers: endpoint, last
        /// handshake, bytes received and sent
        #[arg(long)]
        peers: bool,
    },
}

/// Everything the CLI can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The API answered with its error body.
    #[error("{}", body.message)]
    Api {
        status: u16,
        url: String,
        body: ErrorBody,
    },
    /// A non-2xx answer without the API's error body.
    #[error("HTTP {status} from {url}: {body}")]
    Status {
        status: u16,
        url: String,
        body: String,
    },
    /// The controller's TLS certificate is not trusted (or not valid).
    #[error("the TLS certificate of {url} is not trusted: {message} (trust its CA with --ca-cert FILE or {ENV_CA_CERT})")]
    Certificate { url: String, message: String },
    /// The controller could not be reached.
    #[error(
        "cannot reach the controller at {url}: {message} (set --controller or {ENV_CONTROLLER})"
    )]
    Connect { url: String, message: String },
    /// The request failed on the way (timeout, reset, …).
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    /// An answer that is not what the API documents.
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
    /// The job file cannot be used (extension, syntax).
    #[error("{}: {message}", path.display())]
    JobFile { path: PathBuf, message: String },
    /// The job file's request is refused by local validation.
    #[error("{}: {}", path.display(), error.message)]
    Invalid {
        path: PathBuf,
        error: ValidationError,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing to stdout failed.
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
    /// The controller has no `GET /v1/hosts` route yet.
    #[error("the controller at {url} does not serve GET /v1/hosts (the host registry route is not deployed on it yet)")]
    HostsNotDeployed { url: String },
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Api { status, .. } | CliError::Status { status, .. }
                if (400..500).contains(status) =>
            {
                EXIT_USAGE
            }
            CliError::Usage(_)
            | CliError::JobFile { .. }
            | CliError::Invalid { .. }
            | CliError::HostsNotDeployed { .. } => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// The `error: …` line.
    pub fn render(&self) -> String {
        match self {
            CliError::Api { body, .. } if body.code == "unauthorized" => format!(
                "error: the controller refused the token: {} (code: unauthorized); \
                 give a token of the right role with --token or {ENV_TOKEN}",
                body.message
            ),
            CliError::Api { body, .. } if body.code == "forbidden" => format!(
                "error: this token may not do that: {} (code: forbidden); \
                 use a token of that role (--token or {ENV_TOKEN})",
                body.message
            ),
            CliError::Api { body, .. } => match &body.field {
                Some(f) => format!("error: {} (field: {f}, code: {})", body.message, body.code),
                None => format!("error: {} (code: {})", body.message, body.code),
            },
            CliError::Invalid { path, error } => format!(
                "error: {}: {} (field: {}, code: {})",
                path.display(),
                error.message,
                error.field,
                error.code
            ),
            other => format!("error: {other}"),
        }
    }
}

/// Where output goes and how it looks.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    /// `--json`.
    pub json: bool,
    /// Draw the progress bar on the terminal's stderr.
    pub progress: bool,
}

/// Options of [`run_with`] that the command line does not set.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Draw `watch`'s progress bar (on the process's stderr).
    pub progress: bool,
    /// `--controller` when not given; `None` reads `SPAREGRID_CONTROLLER`.
    pub controller: Option<String>,
    /// `--token` when not given; `None` reads `SPAREGRID_TOKEN`.
    pub token: Option<String>,
    /// `--ca-cert` when not given; `None` reads `SPAREGRID_CA_CERT`.
    pub ca_cert: Option<PathBuf>,
    pub watch: WatchOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: std::io::stderr().is_terminal(),
            controller: None,
            token: None,
            ca_cert: None,
            watch: WatchOptions::default(),
        }
    }
}

/// Runs the CLI on `args` (with the program name first), writing results to
/// `out` and errors to `err`; returns the exit code. The controller and
/// token fall back to the environment; the progress bar is drawn when
/// stderr is a terminal.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with(args, out, err, RunOptions::default())
}

/// [`run`] with explicit [`RunOptions`] (tests: no progress bar, no
/// environment).
pub fn run_with<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write, opts: RunOptions) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            return if e.use_stderr() {
                let _ = write!(err, "{text}");
                EXIT_USAGE
            } else {
                let _ = write!(out, "{text}");
                EXIT_OK
            };
        }
    };
    let mut io = Io {
        out,
        err,
        json: cli.json,
        progress: opts.progress && !cli.json,
    };
    let code = match execute(&cli, &opts, &mut io) {
        Ok(code) => code,
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_FAILURE,
        Err(e) => {
            let _ = writeln!(io.err, "{}", e.render());
            e.exit_code()
        }
    };
    let _ = io.out.flush();
    code
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The client `cli` and `opts` ask for.
fn client(cli: &Cli, opts: &RunOptions) -> Result<Client, CliError> {
    let base = cli
        .controller
        .clone()
        .or_else(|| opts.controller.clone())
        .or_else(|| env_nonempty(ENV_CONTROLLER))
        .unwrap_or_else(|| DEFAULT_CONTROLLER.to_owned());
    let token = cli
        .token
        .clone()
        .or_else(|| opts.token.clone())
        .or_else(|| env_nonempty(ENV_TOKEN));
    let ca_cert = cli
        .ca_cert
        .clone()
        .or_else(|| opts.ca_cert.clone())
        .or_else(|| env_nonempty(ENV_CA_CERT).map(PathBuf::from));
    Client::with_ca_cert(&base, token, ca_cert.as_deref())
}

/// Percent-encodes `s` for a path segment or query value.
fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(char::from(b));
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn out_line(io: &mut Io<'_>, line: &str) -> Result<(), CliError> {
    writeln!(io.out, "{line}").map_err(CliError::Output)
}

fn execute(cli: &Cli, opts: &RunOptions, io: &mut Io<'_>) -> Result<i32, CliError> {
    let client = client(cli, opts)?;
    match &cli.command {
        Cmd::Submit { file, watch } => {
            let (req, body) = jobfile::load_body(file)?;
            let url = client.url("/v1/jobs");
            let text = body_text(client.post_json("/v1/jobs", body)?, &url)?;
            let resp: SubmitResponse = decode(&text, &url)?;
            if io.json {
                out_line(io, text.trim())?;
            } else {
                let name = if req.name.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", req.name)
                };
                out_line(
                    io,
                    &format!(
                        "submitted job {}{name}: {} subtasks",
                        resp.id, resp.subtasks
                    ),
                )?;
            }
            if *watch {
                io.out.flush().map_err(CliError::Output)?;
                return watch::watch(&client, resp.id.as_str(), opts.watch, io);
            }
            Ok(EXIT_OK)
        }
        Cmd::Status { id: Some(id), .. } => {
            let path = format!("/v1/jobs/{}", enc(id));
            let url = client.url(&path);
            let text = body_text(client.get(&path)?, &url)?;
            if io.json {
                out_line(io, text.trim())?;
            } else {
                let d: JobDetail = decode(&text, &url)?;
                output::job_detail(io.out, &d).map_err(CliError::Output)?;
            }
            Ok(EXIT_OK)
        }
        Cmd::Status {
            id: None,
            state,
            limit,
        } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(format!("state={}", enc(s)));
            }
            if let Some(n) = limit {
                q.push(format!("limit={n}"));
            }
            let path = if q.is_empty() {
                "/v1/jobs".to_owned()
            } else {
                format!("/v1/jobs?{}", q.join("&"))
            };
            let url = client.url(&path);
            let text = body_text(client.get(&path)?, &url)?;
            if io.json {
                out_line(io, text.trim())?;
            } else {
                let list: JobList = decode(&text, &url)?;
                output::job_table(io.out, &list.jobs).map_err(CliError::Output)?;
            }
            Ok(EXIT_OK)
        }
        Cmd::Watch { id, poll } => {
            let mut w = opts.watch;
            w.poll_only |= *poll;
            watch::watch(&client, id, w, io)
        }
        Cmd::Results {
            id,
            partial,
            stage,
            output,
        } => match output {
            Some(dir) if data::is_dir_output(dir) => {
                data::results_dir(&client, id, *partial, dir, io)
            }
            _ => results(&client, id, *partial, stage.as_deref(), output.as_ref(), io),
        },
        Cmd::Upload { file } => data::upload(&client, file, data::state_dir(), io),
        Cmd::Cancel { id } => {
            let path = format!("/v1/jobs/{}", enc(id));
            let url = client.url(&path);
            let text = body_text(client.delete(&path)?, &url)?;
            if io.json {
                out_line(io, text.trim())?;
            } else {
                let c: CancelResponse = decode(&text, &url)?;
                let line = if c.changed {
                    format!(
                        "cancelled job {}: {} queued subtasks dropped, {} running being stopped",
                        c.id, c.dropped_queued, c.stopping
                    )
                } else {
                    format!("job {} is already {}; nothing to cancel", c.id, c.state)
                };
                out_line(io, &line)?;
            }
            Ok(EXIT_OK)
        }
        Cmd::Hosts { peers } => hosts(&client, io, *peers),
    }
}

fn results(
    client: &Client,
    id: &str,
    partial: bool,
    stage: Option<&str>,
    output: Option<&PathBuf>,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let mut q = Vec::new();
    if io.json {
        q.push("format=json".to_owned());
    }
    if partial {
        q.push("partial=1".to_owned());
    }
    if let Some(stage) = stage {
        q.push(format!("stage={stage}"));
    }
    let mut path = format!("/v1/jobs/{}/results", enc(id));
    if !q.is_empty() {
        path = format!("{path}?{}", q.join("&"));
    }
    let url = client.url(&path);
    let mut resp = match client.get_stream(&path) {
        Ok(r) => r,
        // The API's hint names its query parameter; say the flag instead.
        Err(CliError::Api {
            status,
            url,
            mut body,
        }) if body.code == "job_not_finished" => {
            body.message = match body.message.find(" (add ?partial") {
                Some(i) => format!(
                    "{} (use --partial for what is there now)",
                    &body.message[..i]
                ),
                None => format!("{}; use --partial for what is there now", body.message),
            };
            return Err(CliError::Api { status, url, body });
        }
        Err(e) => return Err(e),
    };
    let complete = resp
        .headers()
        .get("sparegrid-results")
        .is_some_and(|v| v.as_bytes() == b"complete");
    let read_err = |e: std::io::Error| CliError::Http {
        url: url.clone(),
        message: format!("reading the results: {e}"),
    };
    // Copying distinguishes read errors (the network) from write errors
    // (the file or stdout) by wrapping the writer.
    let copy = |resp: &mut reqwest::blocking::Response,
                w: &mut dyn Write|
     -> Result<u64, Result<std::io::Error, std::io::Error>> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        loop {
            let k = match std::io::Read::read(resp, &mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Ok(e)),
            };
            w.write_all(&buf[..k]).map_err(Err)?;
            n += k as u64;
        }
    };
    match output {
        Some(file) => {
            let write_err = |source| CliError::Write {
                path: file.clone(),
                source,
            };
            let mut f = std::fs::File::create(file).map_err(write_err)?;
            let n = match copy(&mut resp, &mut f) {
                Ok(n) => n,
                Err(Ok(e)) => return Err(read_err(e)),
                Err(Err(e)) => return Err(write_err(e)),
            };
            f.sync_all().map_err(write_err)?;
            if !io.json {
                out_line(
                    io,
                    &format!(
                        "wrote {n} bytes of job {id}'s {} results to {}",
                        if complete { "complete" } else { "partial" },
                        file.display()
                    ),
                )?;
            }
        }
        None => {
            match copy(&mut resp, io.out) {
                Ok(_) => {}
                Err(Ok(e)) => return Err(read_err(e)),
                Err(Err(e)) => return Err(CliError::Output(e)),
            }
            if io.json {
                out_line(io, "")?;
            } else if !complete {
                let _ = writeln!(
                    io.err,
                    "note: job {id}'s results are partial: not every subtask is done"
                );
            }
        }
    }
    Ok(EXIT_OK)
}

fn hosts(client: &Client, io: &mut Io<'_>, peers: bool) -> Result<i32, CliError> {
    let path = "/v1/hosts";
    let url = client.url(path);
    let resp = match client.get(path) {
        Ok(r) => r,
        Err(CliError::Api {
            status: 404, body, ..
        }) if body.code == "route_not_found" => {
            return Err(CliError::HostsNotDeployed {
                url: client.base().to_owned(),
            })
        }
        Err(CliError::Status { status: 404, .. }) => {
            return Err(CliError::HostsNotDeployed {
                url: client.base().to_owned(),
            })
        }
        Err(e) => return Err(e),
    };
    let text = body_text(resp, &url)?;
    if io.json {
        out_line(io, text.trim())?;
        return Ok(EXIT_OK);
    }
    let v: serde_json::Value = decode(&text, &url)?;
    let list = output::host_list(&v).ok_or_else(|| CliError::Decode {
        url: url.clone(),
        message: "expected a list of hosts or {\"hosts\": [...]}".to_owned(),
    })?;
    output::host_table(io.out, list).map_err(CliError::Output)?;
    if peers {
        output::overlay_peer_table(io.out, list).map_err(CliError::Output)?;
    }
    Ok(EXIT_OK)
}
