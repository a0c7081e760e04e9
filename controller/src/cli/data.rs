//! `sparegrid upload FILE` and `sparegrid results ID --output DIR`: the
//! CLI's side of job data (`/v1/data`, [`crate::data`]).
//!
//! **Upload.** `POST /v1/data` mints an upload id and a token scoped to
//! it; the file goes up with the transfer crate's journaled tus client
//! ([`sparegrid_transfer::client::upload`]), which resumes from the last
//! checkpoint both ends hold. What a rerun needs is kept in the CLI's
//! state directory (`SPAREGRID_STATE_DIR`, else `$XDG_STATE_HOME/sparegrid`,
//! else `~/.local/state/sparegrid`), under `uploads/`: per controller and
//! file (canonical path), the id, the token and the file's size and
//! modification time, next to the client's journal `<id>.up`. So running
//! the same `sparegrid upload FILE` again after a broken connection resumes
//! the same upload (a new token is minted for it when the old one is
//! about to expire); once it is complete, a rerun prints the id again
//! without sending anything; a changed file starts a new upload. The id is
//! printed on stdout (`--json`: `{id, size, resumed_at, sent}`); an
//! indicatif bar shows the bytes on a terminal's stderr.
//!
//! **Results into a directory.** `--output DIR` (an existing directory, or
//! a path ending in `/`) pages through `GET /v1/data/jobs/{id}/outputs`
//! and writes each accepted output to its own file: `subtask-<index>.out`
//! (index zero-padded to at least 5 digits) and `reduce.out`. Inline
//! outputs are written whole (through `<name>.part` and a rename); output
//! files are downloaded with [`sparegrid_transfer::client::download`]
//! (Range + If-Range, a checkpoint journal `<name>.journal`, a checkpoint
//! every 256 KiB, removed once the file verified against its blake3), so a
//! fetch that broke off
//! resumes where it stopped when the command is run again, and files
//! already there with the right digest are not fetched again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::client::{body_text, decode, error_chain};
use super::{enc, out_line, CliError, Client, Io, EXIT_OK};
use crate::data::outputs::{OutputEntry, OutputList};
use crate::data::routes::DataStatus;
use crate::data::Minted;

/// Environment variable naming the CLI's state directory.
pub const ENV_STATE_DIR: &str = "SPAREGRID_STATE_DIR";
/// Checkpoint size of download journals: output files are at most 1 MiB
/// today (the agents' cap), so a smaller checkpoint than the endpoint's
/// 8 MiB is what lets a broken fetch resume inside a file at all; an
/// fdatasync per 256 KiB costs little at these sizes.
const DOWNLOAD_CHECKPOINT: u64 = 256 << 10;
/// A token closer than this to its expiry is replaced before use.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The CLI's state directory (see the module header).
pub fn state_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = nonempty(ENV_STATE_DIR) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = nonempty("XDG_STATE_HOME") {
        return Some(PathBuf::from(d).join("sparegrid"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".local/state/sparegrid"))
}

/// What a rerun of `upload` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UploadState {
    controller: String,
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    id: String,
    token: String,
    expires_unix: u64,
    /// The controller's checkpoint size (the client journal's).
    checkpoint_bytes: u64,
    complete: bool,
}

/// `upload`'s answer with `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResult {
    pub id: String,
    pub size: u64,
    /// Where this run started sending (0: from the start).
    pub resumed_at: u64,
    /// Bytes this run sent.
    pub sent: u64,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Write {
        path: path.to_owned(),
        source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Read {
        path: path.to_owned(),
        source,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A one-thread tokio runtime for the transfer client (which is async).
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start an async runtime: {e}")))
}

/// Writes `value` as JSON to `path` atomically.
fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), CliError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| CliError::Usage(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// `POST /v1/data` (with `existing`: a new token for that upload).
fn mint(client: &Client, existing: Option<&str>) -> Result<Minted, CliError> {
    let body = match existing {
        Some(id) => serde_json::to_vec(&serde_json::json!({ "id": id })),
        None => Ok(b"{}".to_vec()),
    }
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let url = client.url(crate::data::PREFIX);
    let text = body_text(client.post_json(crate::data::PREFIX, body)?, &url)?;
    decode(&text, &url)
}

/// `sparegrid upload FILE`.
pub fn upload(
    client: &Client,
    file: &Path,
    state_dir: Option<PathBuf>,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    let meta = std::fs::metadata(file).map_err(read_err(file))?;
    if !meta.is_file() {
        return Err(CliError::Usage(format!(
            "{} is not a regular file",
            file.display()
        )));
    }
    let path = std::fs::canonicalize(file).map_err(read_err(file))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let dir = state_dir
        .ok_or_else(|| {
            CliError::Usage(format!(
                "no state directory for resumable uploads: set {ENV_STATE_DIR} or HOME"
            ))
        })?
        .join("uploads");
    std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    let key = blake3::hash(format!("{}\n{}", client.base(), path.display()).as_bytes());
    let state_path = dir.join(format!("{}.json", &key.to_hex()[..32]));
    let old: Option<UploadState> = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &UploadState| s.size == meta.len() && s.mtime_ns == mtime_ns);
    let mut state = match old {
        Some(s) if s.complete => {
            let _ = writeln!(
                io.err,
                "{} is already uploaded as {} (unchanged since)",
                file.display(),
                s.id
            );
            return print_upload(
                io,
                &UploadResult {
                    id: s.id,
                    size: s.size,
                    resumed_at: s.size,
                    sent: 0,
                },
            );
        }
        Some(mut s) => {
            if s.expires_unix <= now_unix() + TOKEN_MARGIN.as_secs() {
                let m = mint(client, Some(&s.id))?;
                s.token = m.token;
                s.expires_unix = m.expires_unix;
                save_json(&state_path, &s)?;
            }
            s
        }
        None => {
            let m = mint(client, None)?;
            if meta.len() > m.max_upload_bytes {
                return Err(CliError::Usage(format!(
                    "{} is {} bytes; this controller takes uploads of at most {} (data.max_upload_bytes)",
                    file.display(),
                    meta.len(),
                    m.max_upload_bytes
                )));
            }
            let s = UploadState {
                controller: client.base().to_owned(),
                path: path.clone(),
                size: meta.len(),
                mtime_ns,
                id: m.id,
                token: m.token,
                expires_unix: m.expires_unix,
                checkpoint_bytes: m.checkpoint_bytes,
                complete: false,
            };
            save_json(&state_path, &s)?;
            s
        }
    };
    // Where the controller is, for the bar.
    let status_path = format!("{}/{}", crate::data::PREFIX, enc(&state.id));
    let start = match client.get(&status_path) {
        Ok(r) => decode::<DataStatus>(&body_text(r, &client.url(&status_path))?, &status_path)
            .map_or(0, |s| s.offset),
        Err(_) => 0,
    };
    let bar = io.progress.then(|| {
        let bar = ProgressBar::with_draw_target(Some(state.size), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("uploading {}", state.id));
        bar.set_position(start);
        bar
    });
    let http = client.async_http()?;
    let base = client.url(crate::data::PREFIX);
    let sent = Arc::new(AtomicU64::new(0));
    let opts = sparegrid_transfer::client::UploadOptions {
        checkpoint_bytes: state.checkpoint_bytes,
        sent: sent.clone(),
        digests: None,
    };
    let rt = runtime()?;
    let report = rt.block_on(async {
        let ticker = bar.clone().map(|bar| {
            let sent = sent.clone();
            tokio::spawn(async move {
                loop {
                    bar.set_position(start + sent.load(Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let r = sparegrid_transfer::client::upload(
            &http,
            &base,
            &state.token,
            &state.id,
            &path,
            &dir,
            &opts,
        )
        .await;
        if let Some(t) = ticker {
            t.abort();
        }
        r
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let journal = dir.join(format!("{}.up", state.id));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let url = format!("{base}/v1/files/{}", state.id);
            let again = match e {
                // The two ends disagree about the data: start over.
                sparegrid_transfer::client::ClientError::Protocol { .. }
                | sparegrid_transfer::client::ClientError::Status {
                    status: 404 | 409 | 410 | 460,
                    ..
                } => {
                    let _ = std::fs::remove_file(&state_path);
                    let _ = std::fs::remove_file(&journal);
                    "run the same command again to start a new upload"
                }
                _ => "run the same command again to resume",
            };
            return Err(CliError::Http {
                url,
                message: format!("{}; {again}", error_chain(&e)),
            });
        }
    };
    state.complete = true;
    save_json(&state_path, &state)?;
    let _ = std::fs::remove_file(&journal);
    if report.resumed_at > 0 {
        let _ = writeln!(
            io.err,
            "resumed {} at byte {} of {}",
            file.display(),
            report.resumed_at,
            report.size
        );
    }
    print_upload(
        io,
        &UploadResult {
            id: state.id,
            size: report.size,
            resumed_at: report.resumed_at,
            sent: report.sent,
        },
    )
}

fn print_upload(io: &mut Io<'_>, r: &UploadResult) -> Result<i32, CliError> {
    if io.json {
        let text = serde_json::to_string(r).map_err(|e| CliError::Usage(e.to_string()))?;
        out_line(io, &text)?;
    } else {
        out_line(io, &r.id)?;
    }
    Ok(EXIT_OK)
}

/// True when `--output PATH` means a directory: it is one, or it ends in `/`.
pub fn is_dir_output(path: &Path) -> bool {
    path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/')
}

/// One file `results --output DIR` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenOutput {
    pub index: u64,
    pub stage: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// Fetched as a file (Range download) rather than inline.
    pub fetched: bool,
    /// Where this run's download of it started (0: from the start, or
    /// not downloaded); above 0 it resumed an interrupted fetch.
    pub resumed_at: u64,
    /// The output was cut before it reached the controller (`size` is
    /// what the subtask wrote).
    pub cut: bool,
    pub size: u64,
}

/// The name of an entry's file in DIR.
pub fn output_name(e: &OutputEntry, width: usize) -> String {
    if e.stage == "reduce" {
        "reduce.out".to_owned()
    } else {
        format!("subtask-{:0width$}.out", e.index)
    }
}

/// `sparegrid results ID --output DIR`.
pub fn results_dir(
    client: &Client,
    id: &str,
    partial: bool,
    dir: &Path,
    io: &mut Io<'_>,
) -> Result<i32, CliError> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let http = client.async_http()?;
    let rt = runtime()?;
    let mut from = 0u64;
    let mut written = Vec::new();
    let (state, complete) = loop {
        let mut path = format!(
            "{}/jobs/{}/outputs?from={from}",
            crate::data::PREFIX,
            enc(id)
        );
        if partial {
            path.push_str("&partial=1");
        }
        let url = client.url(&path);
        let resp = match client.get(&path) {
            Ok(r) => r,
            Err(CliError::Api {
                status,
                url,
                mut body,
            }) if body.code == "job_not_finished" => {
                if let Some(i) = body.message.find(" (add ?partial") {
                    body.message = format!(
                        "{} (use --partial for what is there now)",
                        &body.message[..i]
                    );
                }
                return Err(CliError::Api { status, url, body });
            }
            Err(e) => return Err(e),
        };
        let list: OutputList = decode(&body_text(resp, &url)?, &url)?;
        let width = list.map_subtasks.to_string().len().max(5);
        for e in &list.outputs {
            written.push(write_one(client, &http, &rt, dir, e, width)?);
        }
        match list.next {
            Some(n) if n > from => from = n,
            _ => break (list.state, list.complete),
        }
    };
    for w in written.iter().filter(|w| w.cut) {
        let _ = writeln!(
            io.err,
            "note: {} holds {} of the {} bytes the subtask wrote (cut before it reached the controller)",
            w.path.display(),
            w.bytes,
            w.size
        );
    }
    if io.json {
        let v = serde_json::json!({
            "job": id, "state": state, "complete": complete,
            "dir": dir, "outputs": written,
        });
        out_line(io, &v.to_string())?;
    } else {
        let bytes: u64 = written.iter().map(|w| w.bytes).sum();
        let fetched = written.iter().filter(|w| w.fetched).count();
        out_line(
            io,
            &format!(
                "wrote {} outputs of job {id} ({bytes} bytes, {fetched} fetched as files) to {}",
                written.len(),
                dir.display()
            ),
        )?;
        if !complete {
            let _ = writeln!(
                io.err,
                "note: job {id} is {state}; these are the outputs of its done subtasks only"
            );
        }
    }
    Ok(EXIT_OK)
}

fn write_one(
    client: &Client,
    http: &reqwest::Client,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    e: &OutputEntry,
    width: usize,
) -> Result<WrittenOutput, CliError> {
    let dest = dir.join(output_name(e, width));
    let (bytes, fetched, resumed_at) = match (&e.file, &e.stdout_b64) {
        (Some(f), _) => {
            let done = std::fs::metadata(&dest).is_ok_and(|m| m.len() == f.size)
                && sparegrid_transfer::client::hash_file(&dest).is_ok_and(|d| d == f.blake3);
            let mut resumed_at = 0;
            if !done {
                let url = client.url(&f.url);
                let report = rt
                    .block_on(sparegrid_transfer::client::download(
                        http,
                        &url,
                        &f.token,
                        &dest,
                        DOWNLOAD_CHECKPOINT,
                        Arc::new(AtomicU64::new(0)),
                    ))
                    .map_err(|err| CliError::Http {
                        url: url.clone(),
                        message: format!(
                            "{}; run the same command again to resume",
                            error_chain(&err)
                        ),
                    })?;
                resumed_at = report.resumed_at;
                let mut journal = dest.clone().into_os_string();
                journal.push(".journal");
                let _ = std::fs::remove_file(journal);
            }
            (f.size, true, resumed_at)
        }
        (None, Some(b64)) => {
            let data = STANDARD.decode(b64).map_err(|err| CliError::Decode {
                url: client.url(crate::data::PREFIX),
                message: format!("output {} is not base64: {err}", e.index),
            })?;
            let tmp = dest.with_extension("out.part");
            let mut f = std::fs::File::create(&tmp).map_err(write_err(&tmp))?;
            f.write_all(&data)
                .and_then(|()| f.sync_all())
                .map_err(write_err(&tmp))?;
            std::fs::rename(&tmp, &dest).map_err(write_err(&dest))?;
            (data.len() as u64, false, 0)
        }
        (None, None) => (0, false, 0),
    };
    Ok(WrittenOutput {
        index: e.index,
        stage: e.stage.clone(),
        path: dest,
        bytes,
        fetched,
        resumed_at,
        cut: bytes < e.size,
        size: e.size,
    })
}
