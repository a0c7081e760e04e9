//! The tus 1.0 upload routes: core (`HEAD`, `PATCH`), `OPTIONS`, and the
//! creation, creation-with-upload, checksum, termination and expiration
//! extensions (https://tus.io/protocols/resumable-upload).
//!
//! The upload's id comes from its token (a `POST` creates the id the token
//! names), never from the client's choice of path. Creation requires the
//! whole file's blake3 in `Upload-Metadata` (key `blake3`, hex), checked
//! before the file becomes visible. Bodies stream to a blocking writer
//! thread through a small bounded channel, so memory stays flat whatever
//! the size; each request runs in its own task, so a dropped connection
//! still ends with the upload cut back to its last durable point and the
//! per-upload lock released.

// Handlers return ready HTTP answers as their error; boxing them would
// only move the allocation.
#![allow(clippy::result_large_err)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;

use super::journal::Header;
use super::store::{BodyChecksum, BodyHasher, Slot, StoreError, Upload};
use super::{authorize, check_id, error, store_error, Direction, TransferState, FILES};

pub const TUS_VERSION: &str = "1.0.0";
pub const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
pub const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
pub const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
pub const UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
pub const UPLOAD_CHECKSUM: HeaderName = HeaderName::from_static("upload-checksum");
pub const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
pub const UPLOAD_DEFER_LENGTH: HeaderName = HeaderName::from_static("upload-defer-length");
/// The last checkpoint the server holds, `<end offset> <blake3 hex>`, on
/// `HEAD`: a resuming client checks it against its own journal.
pub const CHECKPOINT: HeaderName = HeaderName::from_static("sparegrid-checkpoint");
pub const EXTENSIONS: &str = "creation,creation-with-upload,checksum,termination,expiration";
pub const CHECKSUM_ALGORITHMS: &str = "sha1,sha256,blake3";
pub const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// tus checksum extension: "460 Checksum Mismatch".
pub const CHECKSUM_MISMATCH: StatusCode = match StatusCode::from_u16(460) {
    Ok(s) => s,
    Err(_) => panic!("460 is a valid status"),
};

fn hv(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).expect("numbers and dates are header-safe")
}

/// Adds `Tus-Resumable` (every tus response but OPTIONS' own extras).
fn tus(mut r: Response) -> Response {
    r.headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    r
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message.into())
}

/// 412 unless the request speaks tus 1.0.0.
fn check_version(headers: &HeaderMap) -> Result<(), Response> {
    match headers.get(TUS_RESUMABLE).map(|v| v.to_str()) {
        Some(Ok(TUS_VERSION)) => Ok(()),
        other => {
            let got = match other {
                Some(Ok(v)) => v.to_owned(),
                _ => "none".to_owned(),
            };
            let mut r = error(
                StatusCode::PRECONDITION_FAILED,
                "tus_version",
                format!("Tus-Resumable {got:?} is not supported; this server speaks {TUS_VERSION}"),
            );
            r.headers_mut()
                .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
            Err(r)
        }
    }
}

fn header_u64(headers: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, Response> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| bad(format!("{name}: not a non-negative integer"))),
    }
}

/// Parses `Upload-Metadata`: comma-separated `key base64value` pairs
/// (value optional).
pub fn parse_metadata(v: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = pair.split(' ').filter(|s| !s.is_empty());
        let key = it.next().unwrap_or_default();
        if key.is_empty() || !key.is_ascii() {
            return Err(format!("Upload-Metadata: bad key in {pair:?}"));
        }
        let value = match it.next() {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|e| format!("Upload-Metadata: {key}: not base64: {e}"))?,
            None => Vec::new(),
        };
        if it.next().is_some() {
            return Err(format!("Upload-Metadata: {key}: more than one value"));
        }
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

/// Parses `Upload-Checksum: <algorithm> <base64 digest>`.
fn parse_checksum(headers: &HeaderMap) -> Result<Option<BodyChecksum>, Response> {
    let Some(v) = headers.get(UPLOAD_CHECKSUM) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| bad("Upload-Checksum: not ASCII"))?;
    let (algo, b64) = v
        .trim()
        .split_once(' ')
        .ok_or_else(|| bad("Upload-Checksum: expected `<algorithm> <base64 digest>`"))?;
    let hasher = BodyHasher::for_algorithm(algo).ok_or_else(|| {
        bad(format!(
            "Upload-Checksum: algorithm {algo:?} is not supported (use one of {CHECKSUM_ALGORITHMS})"
        ))
    })?;
    let expected = STANDARD
        .decode(b64.trim())
        .map_err(|e| bad(format!("Upload-Checksum: digest is not base64: {e}")))?;
    Ok(Some(BodyChecksum { hasher, expected }))
}

fn is_offset_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == OFFSET_OCTET_STREAM)
}

fn expires_value(unix: u64) -> HeaderValue {
    hv(httpdate::fmt_http_date(
        UNIX_EPOCH + Duration::from_secs(unix),
    ))
}

fn location(id: &str) -> String {
    format!("{FILES}/{id}")
}

/// `OPTIONS`: version, extensions, limits. Needs a valid token (any scope).
pub async fn options(State(s): State<TransferState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers, None, None) {
        return r;
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    h.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static(CHECKSUM_ALGORITHMS),
    );
    h.insert("tus-max-size", hv(s.config().max_upload_bytes));
    r
}

/// Loads the upload into its slot unless there; a completed one answers
/// `Ok(None)`; an expired one is removed (410).
async fn load(
    s: &TransferState,
    id: &str,
    guard: &mut Option<Box<Upload>>,
) -> Result<Option<()>, StoreError> {
    if guard.is_none() {
        let st = s.clone();
        let idc = id.to_owned();
        let loaded = tokio::task::spawn_blocking(move || {
            if st.store().is_complete(&idc)? {
                return Ok(None);
            }
            st.store().load(&idc).map(Some)
        })
        .await
        .map_err(|e| StoreError::Io {
            path: s.store().root().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })??;
        match loaded {
            None => return Ok(None),
            Some(u) => *guard = Some(Box::new(u)),
        }
    }
    let up = guard.as_ref().expect("loaded above");
    let exp = up.header().expires_unix;
    if exp != 0 && exp <= super::store::unix(SystemTime::now()) {
        guard.take();
        s.store().remove(id)?;
        tracing::info!(id, "expired upload removed");
        return Err(StoreError::Gone { id: id.to_owned() });
    }
    Ok(Some(()))
}

/// The size of a complete transfer from its journal.
fn complete_size(s: &TransferState, id: &str) -> Result<u64, StoreError> {
    Ok(s.store().open_complete(id)?.size)
}

/// `POST /v1/files`: creates the upload the token names (creation), with
/// an optional first body (creation-with-upload).
pub async fn create(State(s): State<TransferState>, headers: HeaderMap, body: Body) -> Response {
    tus(create_inner(s, headers, body).await.unwrap_or_else(|r| r))
}

async fn create_inner(
    s: TransferState,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    check_version(&headers)?;
    let claims = authorize(&s, &headers, None, Some(Direction::Upload))?;
    let id = claims.id;
    if headers.contains_key(UPLOAD_DEFER_LENGTH) {
        return Err(bad(
            "Upload-Defer-Length is not supported: send Upload-Length",
        ));
    }
    let size =
        header_u64(&headers, &UPLOAD_LENGTH)?.ok_or_else(|| bad("Upload-Length is required"))?;
    let max = s.config().max_upload_bytes;
    if size > max {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("Upload-Length {size} is above max_upload_bytes {max}"),
        ));
    }
    let raw_meta = headers
        .get(UPLOAD_METADATA)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| bad("Upload-Metadata: not ASCII"))?
        .unwrap_or_default();
    let meta = parse_metadata(&raw_meta).map_err(bad)?;
    let digest = meta
        .iter()
        .find(|(k, _)| k == "blake3")
        .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
        .ok_or_else(|| {
            bad("Upload-Metadata: key `blake3` (the whole file's blake3, hex) is required")
        })?;
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("Upload-Metadata: `blake3` must be 64 hex digits"));
    }
    let source = meta
        .iter()
        .find(|(k, _)| k == "source")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| "tus client".to_owned());
    let now = super::store::unix(SystemTime::now());
    let expires = now + s.config().upload_expiry.as_secs();
    let header = Header {
        id: id.clone(),
        source,
        target: s
            .store()
            .partial_path(&id)
            .map_err(store_error)?
            .display()
            .to_string(),
        size,
        digest,
        checkpoint_bytes: 0, // the store's
        created_unix: now,
        expires_unix: expires,
        metadata: raw_meta,
    };
    let with_upload = is_offset_stream(&headers);
    let checksum = if with_upload {
        parse_checksum(&headers)?
    } else {
        None
    };
    let slot = s.store().slot(&id);
    let st = s.clone();
    // Own task: see `patch`.
    let task = tokio::spawn(async move {
        let mut guard = slot.lock_owned().await;
        let st2 = st.clone();
        let up = tokio::task::spawn_blocking(move || st2.store().create(header))
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?
            .map_err(store_error)?;
        tracing::info!(id = up.id(), size = up.header().size, "upload created");
        let mut r = StatusCode::CREATED.into_response();
        r.headers_mut()
            .insert(header::LOCATION, hv(location(up.id())));
        r.headers_mut()
            .insert(UPLOAD_EXPIRES, expires_value(expires));
        if up.header().size == 0 {
            // Nothing will ever be PATCHed: verify and publish now.
            settle(&st, Box::new(up), Ok(()), &mut guard)
                .await
                .map_err(store_error)?;
            r.headers_mut().insert(UPLOAD_OFFSET, hv(0));
            return Ok(r);
        }
        if !with_upload {
            *guard = Some(Box::new(up));
            return Ok(r);
        }
        let (up, result) = write_body(&st, Box::new(up), 0, checksum, body).await;
        let offset = up.offset();
        let result = settle(&st, up, result, &mut guard).await;
        match result {
            Ok(()) => {
                r.headers_mut().insert(UPLOAD_OFFSET, hv(offset));
                Ok(r)
            }
            Err(e) => Err(store_error(e)),
        }
    });
    task.await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?
}

/// `HEAD /v1/files/{id}` with `Tus-Resumable`: the upload's offset.
pub async fn head(
    State(s): State<TransferState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    tus(head_inner(s, id, headers).await.unwrap_or_else(|r| r))
}

async fn head_inner(
    s: TransferState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, Response> {
    check_id(&id)?;
    check_version(&headers)?;
    authorize(&s, &headers, Some(&id), Some(Direction::Upload))?;
    let slot = s.store().slot(&id);
    let mut guard = slot.lock().await;
    let mut r = StatusCode::OK.into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match load(&s, &id, &mut guard).await.map_err(store_error)? {
        None => {
            let size = complete_size(&s, &id).map_err(store_error)?;
            h.insert(UPLOAD_OFFSET, hv(size));
            h.insert(UPLOAD_LENGTH, hv(size));
        }
        Some(()) => {
            let up = guard.as_ref().expect("loaded");
            h.insert(UPLOAD_OFFSET, hv(up.offset()));
            h.insert(UPLOAD_LENGTH, hv(up.header().size));
            h.insert(UPLOAD_EXPIRES, expires_value(up.header().expires_unix));
            if !up.header().metadata.is_empty() {
                if let Ok(v) = HeaderValue::from_str(&up.header().metadata) {
                    h.insert(UPLOAD_METADATA, v);
                }
            }
            if let Some((end, digest)) = up.last_checkpoint() {
                h.insert(CHECKPOINT, hv(format!("{end} {digest}")));
            }
        }
    }
    Ok(r)
}

/// `PATCH /v1/files/{id}`: appends the body at `Upload-Offset`.
pub async fn patch(
    State(s): State<TransferState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    tus(patch_inner(s, id, headers, body)
        .await
        .unwrap_or_else(|r| r))
}

async fn patch_inner(
    s: TransferState,
    id: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    check_id(&id)?;
    check_version(&headers)?;
    authorize(&s, &headers, Some(&id), Some(Direction::Upload))?;
    if !is_offset_stream(&headers) {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!("PATCH needs Content-Type: {OFFSET_OCTET_STREAM}"),
        ));
    }
    let offset =
        header_u64(&headers, &UPLOAD_OFFSET)?.ok_or_else(|| bad("Upload-Offset is required"))?;
    let checksum = parse_checksum(&headers)?;
    let content_length = header_u64(&headers, &header::CONTENT_LENGTH)?;
    let slot: Slot = s.store().slot(&id);
    // The request runs in its own task: when the client's connection
    // drops, hyper drops this handler's future, but the task still cuts
    // the upload back to its last durable point before releasing the lock.
    let task = tokio::spawn(async move {
        let mut guard = slot.lock_owned().await;
        if load(&s, &id, &mut guard)
            .await
            .map_err(store_error)?
            .is_none()
        {
            // Complete: only an empty PATCH at the end is harmless.
            let size = complete_size(&s, &id).map_err(store_error)?;
            if offset == size && content_length.unwrap_or(0) == 0 {
                let mut r = StatusCode::NO_CONTENT.into_response();
                r.headers_mut().insert(UPLOAD_OFFSET, hv(size));
                return Ok(r);
            }
            return Err(store_error(StoreError::OffsetMismatch {
                id,
                actual: size,
                requested: offset,
            }));
        }
        let up = guard.take().expect("loaded");
        if offset != up.offset() {
            let actual = up.offset();
            *guard = Some(up);
            return Err(store_error(StoreError::OffsetMismatch {
                id,
                actual,
                requested: offset,
            }));
        }
        if let Some(n) = content_length {
            let size = up.header().size;
            if offset.saturating_add(n) > size {
                *guard = Some(up);
                return Err(store_error(StoreError::TooLarge {
                    id,
                    message: format!(
                        "{n} bytes at offset {offset} pass the declared Upload-Length of {size}"
                    ),
                }));
            }
        }
        let expires = up.header().expires_unix;
        let (up, result) = write_body(&s, up, offset, checksum, body).await;
        let new_offset = up.offset();
        let full = up.is_full();
        settle(&s, up, result, &mut guard)
            .await
            .map_err(store_error)?;
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert(UPLOAD_OFFSET, hv(new_offset));
        if !full {
            r.headers_mut()
                .insert(UPLOAD_EXPIRES, expires_value(expires));
        }
        Ok(r)
    });
    task.await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?
}

/// After a body: a full upload is verified and moved into place (and
/// leaves its slot); otherwise the upload goes back into its slot.
async fn settle(
    s: &TransferState,
    up: Box<Upload>,
    result: Result<(), StoreError>,
    guard: &mut Option<Box<Upload>>,
) -> Result<(), StoreError> {
    if let Err(e) = result {
        *guard = Some(up);
        return Err(e);
    }
    if !up.is_full() {
        *guard = Some(up);
        return Ok(());
    }
    let st = s.clone();
    let id = up.id().to_owned();
    let done = tokio::task::spawn_blocking(move || st.store().complete(*up))
        .await
        .map_err(|e| StoreError::Io {
            path: s.store().root().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    match &done {
        Ok(()) => tracing::info!(id, "upload complete and verified"),
        Err(e) => tracing::warn!(id, error = %e, "upload failed verification"),
    }
    done
}

/// A body that broke off (connection lost, idle) — the upload goes back to
/// its last durable point; the client resumes with `HEAD`.
fn broken(id: &str, why: String) -> StoreError {
    StoreError::Io {
        path: std::path::PathBuf::from(id),
        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why),
    }
}

/// Most body bytes read and dropped after a failed write, so that the
/// client, still sending, gets to read the error instead of a reset.
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;
/// Longest such drain.
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(b)) = stream.next().await {
            left = left.saturating_sub(b.len() as u64);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Frames in flight between the body and the writer thread.
const WRITE_QUEUE: usize = 8;

/// Streams `body` into `up` at `offset` on a blocking writer thread; on
/// any failure the upload is cut back to its last durable point.
async fn write_body(
    s: &TransferState,
    mut up: Box<Upload>,
    offset: u64,
    checksum: Option<BodyChecksum>,
    body: Body,
) -> (Box<Upload>, Result<(), StoreError>) {
    let mut req = match up.begin(offset, checksum) {
        Ok(r) => r,
        Err(e) => return (up, Err(e)),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || {
        if let Err(e) = up.write_stream(&mut req, || rx.blocking_recv()) {
            up.rollback();
            return (up, Err(e));
        }
        (up, Ok(req))
    });
    let idle = s.config().idle_timeout;
    let mut stream = body.into_data_stream();
    let mut broke: Option<String> = None;
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                broke = Some(format!("no body bytes for {idle:?}"));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                broke = Some(format!("request body: {e}"));
                break;
            }
            Ok(Some(Ok(bytes))) => {
                if tx.send(bytes).await.is_err() {
                    // The writer failed (413, 507); its error follows.
                    drain(&mut stream).await;
                    break;
                }
            }
        }
    }
    drop(tx);
    drop(stream);
    let (mut up, req) = match writer.await {
        Ok(r) => r,
        Err(e) => panic!("transfer writer thread panicked: {e}"),
    };
    let req = match req {
        Err(e) => return (up, Err(e)),
        Ok(req) => req,
    };
    let id = up.id().to_owned();
    if let Some(why) = broke {
        let durable = up.journal().state().durable();
        tracing::info!(
            id,
            offset = up.offset(),
            durable,
            "upload body broke off: {why}; back to the last durable point"
        );
        up.rollback();
        return (up, Err(broken(&id, why)));
    }
    match tokio::task::spawn_blocking(move || {
        let r = up.finish(req);
        (up, r)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => panic!("transfer writer thread panicked: {e}"),
    }
}

/// `DELETE /v1/files/{id}` (termination): removes the upload, partial or
/// complete, with its journal.
pub async fn delete(
    State(s): State<TransferState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    tus(delete_inner(s, id, headers).await.unwrap_or_else(|r| r))
}

async fn delete_inner(
    s: TransferState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, Response> {
    check_id(&id)?;
    check_version(&headers)?;
    authorize(&s, &headers, Some(&id), Some(Direction::Upload))?;
    let slot = s.store().slot(&id);
    let mut guard = slot.lock().await;
    guard.take();
    if s.store().remove(&id).map_err(store_error)? {
        tracing::info!(id, "transfer terminated");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(store_error(StoreError::NotFound { id }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata() {
        let m = parse_metadata("filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential")
            .unwrap();
        assert_eq!(
            m[0],
            ("filename".into(), b"world_domination_plan.pdf".to_vec())
        );
        assert_eq!(m[1], ("is_confidential".into(), vec![]));
        assert!(parse_metadata("k !!!").is_err());
        assert!(parse_metadata("k YQ== YQ==").is_err());
        assert!(parse_metadata("").unwrap().is_empty());
    }

    #[test]
    fn version_check() {
        let mut h = HeaderMap::new();
        assert_eq!(
            check_version(&h).unwrap_err().status(),
            StatusCode::PRECONDITION_FAILED
        );
        h.insert(TUS_RESUMABLE, HeaderValue::from_static("0.2.2"));
        let r = check_version(&h).unwrap_err();
        assert_eq!(r.headers()["tus-version"], "1.0.0");
        h.insert(TUS_RESUMABLE, HeaderValue::from_static("1.0.0"));
        assert!(check_version(&h).is_ok());
    }

    #[test]
    fn checksum_header() {
        let mut h = HeaderMap::new();
        assert!(parse_checksum(&h).unwrap().is_none());
        h.insert(UPLOAD_CHECKSUM, HeaderValue::from_static("md5 AAAA"));
        assert_eq!(
            parse_checksum(&h).err().unwrap().status(),
            StatusCode::BAD_REQUEST
        );
        h.insert(
            UPLOAD_CHECKSUM,
            HeaderValue::from_static("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0="),
        );
        let c = parse_checksum(&h).unwrap().unwrap();
        assert_eq!(c.hasher.name(), "sha1");
        assert_eq!(c.expected.len(), 20);
    }
}
