//! Subtask outputs kept whole as files, and the listing that
//! `sparegrid results ID --output DIR` reads.
//!
//! **Capture.** The store keeps at most its output cap (1 MiB) of each
//! attempt's stdout in SQLite. [`capture`] runs in front of the two
//! completion routes (`POST /v1/agents/completions`, pull mode's `POST
//! /v1/subtasks/{job}/{index}/complete`): for every successful report whose
//! stdout is longer than `data.output_file_above`, the stdout as received
//! is published as the verified file `out-<job>-<index>-<epoch>` (the
//! transfer store's own writer: journal, digest, atomic rename) *before*
//! the report reaches the store, so an accepted report's file is durable
//! when the agent gets its answer. Reports the store answers stale or
//! rejected have their file removed again; a repeat of an accepted report
//! finds the file there and writes nothing. Only requests carrying an agent
//! (or admin) token are looked at.
//!
//! **Uploaded.** Stdout over the 1 MiB an agent sends inline is not
//! inline at all: the agent spilled it to a file, uploaded it with tus
//! (granted by `POST /v1/agents/outputs`, [`crate::agents`]) to the same id
//! `out-<job>-<index>-<epoch>`, and the report carries `stdout_data` (id,
//! size, blake3) and no stdout. [`capture`] checks each such report before
//! the store sees it: the id must be the attempt's, the file complete with
//! that size and digest, and the attempt successful; otherwise the report
//! loses `stdout_data` and becomes a failure whose error starts with
//! `stdout_data:` (the subtask is retried). Uploaded files of reports the
//! store answers stale or rejected are removed like captured ones. An
//! output longer than the agent's `controller.max_output_bytes` was cut
//! there (`size` in the listing is the size before any cap); with no
//! `/v1/data` on the controller (or an upload that failed) the agent sends
//! the first 1 MiB inline as before.
//!
//! **Listing.** `GET /v1/data/jobs/{job}/outputs?from=&limit=&partial=1`
//! ([`OutputList`]): the accepted attempt of each done map subtask from
//! index `from`, in index order, then (on the last page) the reduce's;
//! each inline (`stdout_b64`, what the store kept) or as a file with a
//! `down` token for it (`file`). A page holds at most `limit` (100,
//! most 1000) entries and about 8 MiB of inline output; `next` is where
//! the next page starts. Before the job ended it is 409
//! `job_not_finished` unless `partial=1`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sparegrid_proto::grid::{AttemptRef, Completion};
use sparegrid_transfer::Direction;

use super::{DataPlane, OUTPUT_PREFIX, PREFIX};
use crate::agents::{Ack, CompletionsReply};
use crate::api::{Access, ApiError, AppState};
use crate::store::{AttemptRecord, JobId, JobState, Store, StoreError};

/// The batch completion route.
const COMPLETIONS: &str = "/v1/agents/completions";
/// Inline output per listing page (about; one entry always fits).
const PAGE_INLINE_BYTES: usize = 8 << 20;
/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// True for the routes completion reports arrive on.
pub fn is_completion_route(path: &str) -> bool {
    path == COMPLETIONS || (path.starts_with("/v1/subtasks/") && path.ends_with("/complete"))
}

/// The id of the output file of `job`'s subtask `index`, attempt `epoch`.
pub fn output_id(job: &str, index: u64, epoch: u32) -> String {
    format!("{OUTPUT_PREFIX}{job}-{index}-{epoch}")
}

/// See the module header.
pub async fn capture(d: DataPlane, s: &AppState, req: Request, next: Next) -> Response {
    if s.auth.check(Access::Agent, req.headers()).is_err() {
        return next.run(req).await;
    }
    let limit = d.max_agent_body();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|n| n > limit) {
        // Unknown or too long: the route's own reading answers it.
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let mut bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => return ApiError::BodyRead(e.to_string()).into_response(),
    };
    let batch = parts.uri.path() == COMPLETIONS;
    let decoded: Option<Vec<Completion>> = if batch {
        rmp_serde::from_slice(&bytes).ok()
    } else {
        rmp_serde::from_slice::<Completion>(&bytes)
            .ok()
            .map(|c| vec![c])
    };
    let Some(reports) = decoded else {
        // Not a report we can read: the route's own decoding answers it.
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let above = d.config().output_file_above;
    let wanted = reports
        .iter()
        .any(|c| c.stdout_data.is_some() || (c.succeeded() && c.stdout.len() as u64 > above));
    if !wanted {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let dc = d.clone();
    let Ok(Checked {
        reports,
        changed,
        written,
        uploaded,
    }) = tokio::task::spawn_blocking(move || check_all(&dc, reports, above)).await
    else {
        return ApiError::Task("checking output files".into()).into_response();
    };
    if changed {
        let encoded = if batch {
            rmp_serde::to_vec_named(&reports)
        } else {
            rmp_serde::to_vec_named(&reports[0])
        };
        match encoded {
            Ok(b) => {
                parts.headers.insert(header::CONTENT_LENGTH, b.len().into());
                bytes = b.into();
            }
            Err(e) => return ApiError::Task(e.to_string()).into_response(),
        }
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if written.is_empty() && uploaded.is_empty() {
        return resp;
    }
    let refused: Vec<String> = if batch {
        let (rp, rb) = resp.into_parts();
        let body = axum::body::to_bytes(rb, 64 << 20).await.unwrap_or_default();
        let reply: Option<CompletionsReply> = rmp_serde::from_slice(&body).ok();
        let refused = match reply {
            Some(r) => r
                .results
                .iter()
                .filter(|a| matches!(a.result, Ack::Stale | Ack::Rejected))
                .map(|a| output_id(&a.attempt.job, a.attempt.index, a.attempt.epoch))
                .filter(|id| written.contains(id) || uploaded.contains(id))
                .collect(),
            // Not the reply we know (an error): nothing was accepted. An
            // uploaded file stays for the agent's next try.
            None => written.clone(),
        };
        let resp = Response::from_parts(rp, Body::from(body));
        remove_all(&d, refused).await;
        return resp;
    } else if resp.status().is_success() {
        Vec::new()
    } else if resp.status() == axum::http::StatusCode::CONFLICT {
        // Stale: no try at this attempt will be accepted.
        written.into_iter().chain(uploaded).collect()
    } else {
        written
    };
    remove_all(&d, refused).await;
    resp
}

/// [`check_all`]'s outcome.
struct Checked {
    reports: Vec<Completion>,
    /// Some report was rewritten (an upload that does not check out).
    changed: bool,
    /// Ids of the captured files written now.
    written: Vec<String>,
    /// Ids of the uploaded files the reports name (and that check out).
    uploaded: Vec<String>,
}

/// Captures the large inline outputs ([`publish_all`]) and checks each
/// uploaded one ([`check_upload`]): a report whose upload does not check
/// out loses its `stdout_data` and fails with an error that says why.
fn check_all(d: &DataPlane, mut reports: Vec<Completion>, above: u64) -> Checked {
    let mut changed = false;
    let mut uploaded = Vec::new();
    for c in &mut reports {
        let Some(data) = &c.stdout_data else {
            continue;
        };
        match check_upload(d, c) {
            Ok(()) => uploaded.push(data.id.clone()),
            Err(why) => {
                tracing::warn!(id = %data.id, host = %c.host, "a report's output upload is refused: {why}");
                c.error = Some(format!("stdout_data: {why}"));
                c.stdout_data = None;
                changed = true;
            }
        }
    }
    let big: Vec<&Completion> = reports
        .iter()
        .filter(|c| c.stdout_data.is_none() && c.succeeded() && c.stdout.len() as u64 > above)
        .collect();
    let written = publish_all(d, big);
    Checked {
        reports,
        changed,
        written,
        uploaded,
    }
}

/// `Ok` when the report's `stdout_data` is this attempt's output id and
/// the file is complete with the size and digest it names.
fn check_upload(d: &DataPlane, c: &Completion) -> Result<(), String> {
    let Some(data) = &c.stdout_data else {
        return Ok(());
    };
    let AttemptRef { job, index, epoch } = &c.attempt;
    let want = output_id(job, *index, *epoch);
    if data.id != want {
        return Err(format!(
            "id {:?} is not this attempt's output ({want})",
            data.id
        ));
    }
    let file = d.transfer().store().open_complete(&data.id).map_err(|e| {
        format!(
            "{} is not a complete upload on this controller: {e}",
            data.id
        )
    })?;
    if file.size != data.size || file.digest != data.blake3 {
        return Err(format!(
            "{} holds {} bytes with blake3 {}, the report says {} bytes with blake3 {}",
            data.id, file.size, file.digest, data.size, data.blake3
        ));
    }
    if !c.succeeded() {
        return Err("only a successful attempt's output is kept".into());
    }
    Ok(())
}

/// Publishes each report's stdout; the ids written now.
fn publish_all(d: &DataPlane, reports: Vec<&Completion>) -> Vec<String> {
    let mut written = Vec::new();
    for c in reports {
        let AttemptRef { job, index, epoch } = &c.attempt;
        let id = output_id(job, *index, *epoch);
        let source = format!("job {job} subtask {index} attempt {epoch} on {}", c.host);
        match d.publish(&id, source, &c.stdout) {
            Ok(true) => {
                tracing::debug!(id, bytes = c.stdout.len(), "output kept as a file");
                written.push(id);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(id, error = %e, "cannot keep an output as a file"),
        }
    }
    written
}

async fn remove_all(d: &DataPlane, ids: Vec<String>) {
    if ids.is_empty() {
        return;
    }
    let d = d.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for id in ids {
            if let Err(e) = d.remove(&id) {
                tracing::warn!(id, error = %e, "cannot remove the output file of a refused report");
            }
        }
    })
    .await;
}

/// The listing's query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub from: Option<u64>,
    pub limit: Option<usize>,
    /// `1`/`true`: answer before the job ended.
    pub partial: Option<String>,
}

/// `GET /v1/data/jobs/{job}/outputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputList {
    pub job: String,
    pub state: String,
    /// The job is done: every output is there.
    pub complete: bool,
    /// Map subtasks in the job.
    pub map_subtasks: u64,
    pub outputs: Vec<OutputEntry>,
    /// Where the next page starts (`from`); none after the last.
    pub next: Option<u64>,
}

/// One accepted output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEntry {
    pub index: u64,
    /// `map` or `reduce`.
    pub stage: String,
    /// The accepted attempt (epoch).
    pub attempt: u32,
    /// Stdout's size before any cap (the agent's or the store's).
    pub size: u64,
    /// What the store kept, base64 (when there is no file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    /// The whole output as received, as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<OutputFile>,
}

/// An output file and how to fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub id: String,
    /// Path on the controller: `/v1/data/v1/files/<id>` (GET with Range).
    pub url: String,
    /// A `down` token for this file only.
    pub token: String,
    pub size: u64,
    pub blake3: String,
}

async fn store_call<T, F>(s: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = std::sync::Arc::clone(&s.store);
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| ApiError::Task(e.to_string()))?
        .map_err(ApiError::from)
}

/// See the module header.
pub async fn list(s: &AppState, d: &DataPlane, job: &str, q: ListQuery) -> Response {
    match list_inner(s, d, job, q).await {
        Ok(l) => Json(l).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_inner(
    s: &AppState,
    d: &DataPlane,
    job: &str,
    q: ListQuery,
) -> Result<OutputList, ApiError> {
    let id = JobId(job.to_owned());
    let jid = id.clone();
    let rec = store_call(s, move |st| st.get_job(&jid)).await?;
    let ended = matches!(
        rec.state,
        JobState::Done | JobState::Failed | JobState::Cancelled
    );
    let partial = matches!(q.partial.as_deref(), Some("1" | "true" | "yes"));
    if !ended && !partial {
        return Err(ApiError::NotFinished {
            id,
            state: rec.state.as_str().to_owned(),
        });
    }
    let from = q.from.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let jid = id.clone();
    let results = store_call(s, move |st| st.results(&jid, from, limit)).await?;
    let last_page = results.len() < limit;
    let reduce = if last_page {
        let jid = id.clone();
        store_call(s, move |st| st.reduce_result(&jid)).await?
    } else {
        None
    };
    let d = d.clone();
    let job_s = job.to_owned();
    let (outputs, cut_at) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut inline = 0usize;
        let mut cut_at = None;
        let all = results
            .into_iter()
            .map(|a| ("map", a))
            .chain(reduce.map(|a| ("reduce", a)));
        for (stage, a) in all {
            if !out.is_empty() && inline > PAGE_INLINE_BYTES {
                cut_at = Some(a.index);
                break;
            }
            let e = entry(&d, &job_s, stage, a);
            inline += e.stdout_b64.as_ref().map_or(0, String::len);
            out.push(e);
        }
        (out, cut_at)
    })
    .await
    .map_err(|e| ApiError::Task(e.to_string()))?;
    let next = match cut_at {
        Some(i) => Some(i),
        None if !last_page => outputs.last().map(|e| e.index + 1),
        None => None,
    };
    Ok(OutputList {
        job: job.to_owned(),
        state: rec.state.as_str().to_owned(),
        complete: rec.state == JobState::Done,
        map_subtasks: rec.map_subtasks,
        outputs,
        next,
    })
}

/// One listing entry: the file when there is one, else the stored bytes.
fn entry(d: &DataPlane, job: &str, stage: &str, a: AttemptRecord) -> OutputEntry {
    let id = output_id(job, a.index, a.attempt);
    let file = d.transfer().store().open_complete(&id).ok().and_then(|c| {
        let (token, _) = d.sign(&id, Direction::Download).ok()?;
        Some(OutputFile {
            url: format!("{PREFIX}{}/{id}", sparegrid_transfer::FILES),
            id: id.clone(),
            token,
            size: c.size,
            blake3: c.digest,
        })
    });
    OutputEntry {
        index: a.index,
        stage: stage.to_owned(),
        attempt: a.attempt,
        size: a.stdout_size.max(a.stdout.len() as u64),
        stdout_b64: file.is_none().then(|| STANDARD.encode(&a.stdout)),
        file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::grid::OutputData;

    fn plane(dir: &std::path::Path) -> DataPlane {
        DataPlane::open_dir(&super::super::DataConfig::default(), dir, 1 << 20).unwrap()
    }

    fn report(data: Option<OutputData>) -> Completion {
        Completion {
            attempt: AttemptRef {
                job: "j-1".into(),
                index: 3,
                epoch: 2,
            },
            host: "h".into(),
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_size: 5,
            stderr_size: 0,
            duration_ms: 1,
            stdout_data: data,
        }
    }

    #[test]
    fn an_upload_is_accepted_only_complete_with_its_size_and_digest() {
        let t = tempfile::tempdir().unwrap();
        let d = plane(t.path());
        let good = OutputData {
            id: "out-j-1-3-2".into(),
            size: 5,
            blake3: blake3::hash(b"hello").to_hex().to_string(),
        };
        // Not there yet.
        let r = check_all(&d, vec![report(Some(good.clone()))], 1 << 20);
        assert!(r.changed && r.uploaded.is_empty());
        assert!(r.reports[0].stdout_data.is_none());
        let err = r.reports[0].error.clone().unwrap();
        assert!(
            err.starts_with("stdout_data: out-j-1-3-2 is not a complete upload"),
            "{err}"
        );

        d.publish("out-j-1-3-2", "test".into(), b"hello").unwrap();
        let r = check_all(&d, vec![report(Some(good.clone()))], 1 << 20);
        assert!(!r.changed, "{:?}", r.reports[0].error);
        assert_eq!(r.uploaded, vec!["out-j-1-3-2".to_owned()]);
        assert!(r.reports[0].succeeded());

        let mut other = good.clone();
        other.blake3 = blake3::hash(b"other").to_hex().to_string();
        assert!(check_upload(&d, &report(Some(other)))
            .unwrap_err()
            .contains("blake3"));
        let mut short = good.clone();
        short.size = 4;
        assert!(check_upload(&d, &report(Some(short))).is_err());
        let mut elsewhere = good.clone();
        elsewhere.id = "out-j-1-4-2".into();
        assert!(check_upload(&d, &report(Some(elsewhere)))
            .unwrap_err()
            .contains("not this attempt's output"));
        let mut failed = report(Some(good));
        failed.exit_code = Some(1);
        assert!(check_upload(&d, &failed).is_err());
    }
}
