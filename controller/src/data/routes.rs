//! Everything under `/v1/data`, served by [`layer`] (a middleware in
//! front of the API's router; see the module header of [`super`]):
//!
//! | method | path | who | what |
//! |---|---|---|---|
//! | `POST` | `/v1/data` | submit or admin role | mint an upload: `{id, base, upload_url, token, expires_unix, max_upload_bytes}`; body `{"id": ID}` (optional) mints a new token for an unfinished upload of ours |
//! | `GET` | `/v1/data/{id}` | submit or admin role | `{id, complete, size, offset}` of an upload or output file |
//! | `GET` | `/v1/data/jobs/{job}/outputs?from=&limit=&partial=1` | submit or admin role | the job's outputs, small ones inline (base64), large ones as files with a download token ([`super::outputs`]) |
//! | tus + `GET` | `/v1/data/v1/files`, `/v1/data/v1/files/{id}` | a transfer token for that id and direction | the transfer endpoint's routes (docs/transfer.md), `Location` rewritten under `/v1/data` |
//!
//! The layer also hands completion reports (`POST /v1/agents/completions`,
//! `POST /v1/subtasks/{job}/{index}/complete`) to [`super::outputs::capture`]
//! before their handler runs. Without `[data] enabled`, `/v1/data` answers
//! 404 `data_disabled`.

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::{outputs, DataPlane, PREFIX};
use crate::api::{error_response, Access, ApiError, AppState, ErrorBody};

/// A refused or failed data request: status, stable code, message, field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl Refusal {
    /// 400 `invalid_field` naming `field`.
    pub fn bad(field: &str, message: String) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message,
            field: Some(field.to_owned()),
        }
    }

    /// 409 `conflict`.
    pub fn conflict(message: String) -> Refusal {
        Refusal {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message,
            field: None,
        }
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: String) -> Refusal {
        Refusal {
            status: StatusCode::NOT_FOUND,
            code,
            message,
            field: None,
        }
    }

    /// 500 `internal`.
    pub fn internal(message: String) -> Refusal {
        Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
            field: None,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error_response(
            self.status,
            ErrorBody {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        )
    }
}

/// The middleware: serves `/v1/data*`, captures outputs from completion
/// reports, passes everything else on.
pub async fn layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == PREFIX || path.starts_with("/v1/data/") {
        return serve(s, req).await;
    }
    if req.method() == Method::POST && outputs::is_completion_route(path) {
        if let Some(d) = s.data.clone() {
            return outputs::capture(d, &s, req, next).await;
        }
    }
    next.run(req).await
}

async fn serve(s: AppState, req: Request) -> Response {
    let Some(d) = s.data.clone() else {
        return Refusal::not_found(
            "data_disabled",
            "this controller keeps no job data ([data] enabled = false)".to_owned(),
        )
        .into_response();
    };
    let path = req.uri().path().to_owned();
    let rest = &path[PREFIX.len()..];
    let files = sparegrid_transfer::FILES;
    if rest == files || rest.starts_with(&format!("{files}/")) {
        return transfer(&d, req).await;
    }
    let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let known = matches!(segs.as_slice(), [""] | [_] | ["jobs", _, "outputs"]);
    if !known || segs.iter().skip(1).any(|s| s.is_empty()) {
        return ApiError::RouteNotFound(path.clone()).into_response();
    }
    if let Err(e) = s.auth.check(Access::Submit, req.headers()) {
        return ApiError::from(e).into_response();
    }
    match (method, segs.as_slice()) {
        (Method::POST, [""]) => mint(&d, req).await,
        (Method::GET, [id]) if !id.is_empty() => status(&d, id).await,
        (Method::GET, ["jobs", job, "outputs"]) => {
            let q = Query::<outputs::ListQuery>::try_from_uri(req.uri());
            match q {
                Ok(Query(q)) => outputs::list(&s, &d, job, q).await,
                Err(e) => ApiError::InvalidQuery {
                    param: "query",
                    message: e.body_text(),
                }
                .into_response(),
            }
        }
        (m, _) => ApiError::MethodNotAllowed {
            method: m.to_string(),
            path,
        }
        .into_response(),
    }
}

/// `POST /v1/data` body: optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    id: Option<String>,
}

async fn mint(d: &DataPlane, req: Request) -> Response {
    let bytes = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(e) => return ApiError::BodyRead(e.to_string()).into_response(),
    };
    let m: MintRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        MintRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return Refusal::bad("body", format!("expected {{\"id\": ID}} or nothing: {e}"))
                    .into_response()
            }
        }
    };
    match d.mint(m.id.as_deref()) {
        Ok(minted) => {
            tracing::info!(id = %minted.id, "upload token minted");
            (StatusCode::CREATED, Json(minted)).into_response()
        }
        Err(r) => r.into_response(),
    }
}

/// `GET /v1/data/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStatus {
    pub id: String,
    /// Verified and visible.
    pub complete: bool,
    /// The declared size.
    pub size: u64,
    /// Bytes the controller holds (all of them once complete).
    pub offset: u64,
}

async fn status(d: &DataPlane, id: &str) -> Response {
    let d = d.clone();
    let id = id.to_owned();
    let found = tokio::task::spawn_blocking(move || data_status(&d, &id)).await;
    match found {
        Ok(Ok(s)) => Json(s).into_response(),
        Ok(Err(r)) => r.into_response(),
        Err(e) => Refusal::internal(e.to_string()).into_response(),
    }
}

/// The status of upload or file `id`. Blocking.
pub fn data_status(d: &DataPlane, id: &str) -> Result<DataStatus, Refusal> {
    use sparegrid_transfer::StoreError as E;
    let store = d.transfer().store();
    match store.open_complete(id) {
        Ok(c) => Ok(DataStatus {
            id: id.to_owned(),
            complete: true,
            size: c.size,
            offset: c.size,
        }),
        Err(E::Incomplete { .. }) => {
            let size = store
                .journal_path(id)
                .ok()
                .and_then(|p| sparegrid_transfer::journal::read_header(&p).ok())
                .map_or(0, |h| h.size);
            let offset = store
                .partial_path(id)
                .ok()
                .and_then(|p| std::fs::metadata(p).ok())
                .map_or(0, |m| m.len());
            Ok(DataStatus {
                id: id.to_owned(),
                complete: false,
                size,
                offset,
            })
        }
        Err(E::BadId(_)) => Err(Refusal::bad("id", format!("{id:?} is not a data id"))),
        Err(E::NotFound { .. }) => Err(Refusal::not_found(
            "data_not_found",
            format!("no upload or file has id {id:?}"),
        )),
        Err(e) => Err(Refusal::internal(e.to_string())),
    }
}

/// Hands `req` to the transfer endpoint's router with `/v1/data` taken
/// off its path; a tus `Location` gets it back.
async fn transfer(d: &DataPlane, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    parts.uri = match pq[PREFIX.len()..].parse::<Uri>() {
        Ok(u) => u,
        Err(e) => return Refusal::bad("path", format!("bad path: {e}")).into_response(),
    };
    let router = sparegrid_transfer::router(d.transfer().clone());
    let mut resp = match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .filter(|l| l.starts_with('/'))
        .map(|l| format!("{PREFIX}{l}"));
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    resp.map(Body::new)
}
