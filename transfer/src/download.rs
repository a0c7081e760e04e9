//! Downloads: `GET /v1/files/{id}` of a complete, verified file with
//! `Range` (one range; 206 with `Content-Range`, 416 when unsatisfiable),
//! `If-Range` against a strong `ETag` derived from the file's blake3, and
//! `Accept-Ranges: bytes`, so `curl -C -` and other resuming clients work.
//! Partial uploads are never served (404).
//!
//! The body is fed by a blocking thread through a bounded channel of
//! [`READ_QUEUE`] pieces: read-only mappings of the file ([`MAP_CHUNK`]
//! each, unmapped once the socket took them), so the socket copies from the
//! page cache directly and memory per download is fixed whatever the file
//! size. ([`read_into`], plain reads into pooled buffers, feeds the
//! client's upload body: a source file there may change under it.)

// Handlers return ready HTTP answers as their error; boxing them would
// only move the allocation.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::store::Complete;
use super::{authorize, check_id, error, store_error, Direction, TransferState};

/// Bytes per read from the file.
pub const READ_CHUNK: usize = 1024 * 1024;
/// Reads in flight per download (so at most 4 MiB buffered per download).
pub const READ_QUEUE: usize = 4;

/// The strong ETag of a file with blake3 `digest` (hex).
pub fn etag(digest: &str) -> String {
    format!("\"b3-{digest}\"")
}

/// A `Range` header's outcome for a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable single byte range: serve the whole file (200).
    Whole,
    /// Bytes `start..=end` (206).
    Part { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// Parses one `bytes=` range (`a-b`, `a-`, `-n`). Several ranges or another
/// unit fall back to the whole file, which RFC 9110 allows.
pub fn parse_range(v: &str, size: u64) -> RangeSpec {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeSpec::Whole;
    };
    if spec.contains(',') {
        return RangeSpec::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeSpec::Whole,
        (true, false) => match num(b) {
            None => RangeSpec::Whole,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return RangeSpec::Whole;
            };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            let Some(end) = end else {
                return RangeSpec::Whole;
            };
            if end < start {
                return RangeSpec::Whole;
            }
            if start >= size {
                return RangeSpec::Unsatisfiable;
            }
            RangeSpec::Part {
                start,
                end: end.min(size - 1),
            }
        }
    }
}

/// Whether `If-Range` (absent, or equal to our strong ETag) lets `Range`
/// apply. A date or a weak/other tag means "send the whole file".
fn if_range_allows(headers: &HeaderMap, tag: &str) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|s| s.trim() == tag),
    }
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(s): State<TransferState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(s, id, headers, true).await.unwrap_or_else(|r| r)
}

/// `HEAD /v1/files/{id}` without `Tus-Resumable`: the GET's headers.
pub async fn head(
    State(s): State<TransferState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(s, id, headers, false).await.unwrap_or_else(|r| r)
}

async fn serve(
    s: TransferState,
    id: String,
    headers: HeaderMap,
    with_body: bool,
) -> Result<Response, Response> {
    check_id(&id)?;
    authorize(&s, &headers, Some(&id), Some(Direction::Download))?;
    let st = s.clone();
    let idc = id.clone();
    let c: Complete = tokio::task::spawn_blocking(move || st.store().open_complete(&idc))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?
        .map_err(store_error)?;
    let tag = etag(&c.digest);
    let size = c.size;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) if if_range_allows(&headers, &tag) => parse_range(v, size),
        _ => RangeSpec::Whole,
    };
    let (status, start, end) = match range {
        RangeSpec::Whole => (StatusCode::OK, 0, size),
        RangeSpec::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        RangeSpec::Unsatisfiable => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range",
                format!("the range is outside the file's {size} bytes"),
            );
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Err(r);
        }
    };
    let body = if with_body && end > start {
        stream(c.file, start, end, s.clone())
    } else {
        Body::empty()
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, HeaderValue::from_str(&tag).expect("hex"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)).expect("ascii"),
        );
    }
    Ok(r)
}

/// Bytes `start..end` of `file` as a body fed by a blocking reader thread;
/// each piece is counted as sent when the connection takes it.
fn stream(file: std::fs::File, start: u64, end: u64, state: TransferState) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(READ_QUEUE);
    tokio::task::spawn_blocking(move || map_into(file, start, end, &tx));
    let s = futures_util::stream::unfold((rx, state), |(mut rx, state)| async move {
        let item = rx.recv().await?;
        if let Ok(b) = &item {
            state.inner.counters.add_sent(b.len() as u64);
        }
        Some((item, (rx, state)))
    });
    Body::from_stream(s)
}

/// Hands `start..end` of `file` to `tx` as [`MAP_CHUNK`] pieces that are
/// read-only shared mappings of the file (`mmap`, pages populated on this
/// blocking thread), until the end, an error (sent on) or the receiver
/// going away. The socket copies straight from the page cache, one copy
/// per byte instead of two (read into a buffer, then send), which is what
/// keeps a download near nginx's `sendfile` (hyper cannot `sendfile`).
/// Each piece is unmapped once the connection has taken it, so the
/// mapped (resident) part of a download stays at most [`READ_QUEUE`] + 1
/// pieces. Only complete files are served: the store never writes or
/// truncates a file in `complete/` (it is published by a rename and
/// removed by unlink, which leaves a mapping valid), so a mapped page
/// cannot vanish under the connection.
fn map_into(
    file: std::fs::File,
    start: u64,
    end: u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(MAP_CHUNK as u64) as usize;
        let r = match Mapped::new(&file, pos, n) {
            Ok(m) => Ok(Bytes::from_owner(m)),
            // A file system that cannot map (ENODEV): plain reads.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return read_into(file, pos, end, tx);
            }
            Err(e) => Err(e),
        };
        let failed = r.is_err();
        if tx.blocking_send(r).is_err() || failed {
            return; // client gone, or the map failed (already sent)
        }
        pos += n as u64;
    }
}

/// Bytes per mapped piece of a download.
pub const MAP_CHUNK: usize = 2 * 1024 * 1024;

/// A read-only `MAP_SHARED | MAP_POPULATE` mapping of `len` bytes of a
/// file from `offset` (any offset: the mapping starts at the page before
/// and `skip` hides the difference). Hand-written on libc (already a
/// dependency) rather than memmap2: one call, one drop, and the
/// populate flag.
struct Mapped {
    ptr: *mut libc::c_void,
    /// Mapped length, `skip` included.
    len: usize,
    skip: usize,
}

// SAFETY: the mapping is read-only, owned by this value alone and only
// read through `&self`; nothing in it is tied to a thread.
unsafe impl Send for Mapped {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn new(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no memory arguments.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as u64,
            _ => 4096,
        };
        let skip = (offset % page) as usize;
        let aligned = libc::off_t::try_from(offset - skip as u64)
            .map_err(|_| std::io::Error::other(format!("offset {offset} too large to map")))?;
        let len = len + skip;
        // SAFETY: a fresh read-only mapping at an address the kernel picks,
        // of a descriptor that stays open for the call; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                aligned,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len, skip })
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is mapped readable until drop; the
        // file is not truncated under it (see `map_into`).
        unsafe {
            std::slice::from_raw_parts((self.ptr as *const u8).add(self.skip), self.len - self.skip)
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no slice of it
        // outlives `self` (Bytes drops its owner last).
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Reads `start..end` of `file` in [`READ_CHUNK`] pieces into `tx` until
/// the end, a read error (sent on) or the receiver going away. Sequential
/// reads into uninitialised capacity (`read_to_end` on a `take`: no
/// zero-filling), and buffers come back to a small pool once the socket
/// has taken them, so their pages are not faulted in again for every MiB.
pub(crate) fn read_into(
    mut file: std::fs::File,
    start: u64,
    end: u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    use std::io::{Read, Seek, SeekFrom};
    if let Err(e) = file.seek(SeekFrom::Start(start)) {
        let _ = tx.blocking_send(Err(e));
        return;
    }
    let pool: Pool = Arc::default();
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(READ_CHUNK as u64);
        let mut buf = pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
        buf.clear();
        let r = match (&mut file).take(n).read_to_end(&mut buf) {
            Ok(got) if got as u64 == n => Ok(Bytes::from_owner(Pooled {
                buf,
                pool: pool.clone(),
            })),
            Ok(got) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file ended {got} bytes into a {n}-byte read at {pos}"),
            )),
            Err(e) => Err(e),
        };
        let failed = r.is_err();
        if tx.blocking_send(r).is_err() || failed {
            return; // client gone, or the read failed (already sent)
        }
        pos += n;
    }
}

type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// A read buffer that goes back to its pool when the body is done with it.
struct Pooled {
    buf: Vec<u8>,
    pool: Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < READ_QUEUE + 2 {
                p.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part { start: 0, end: 9 });
        assert_eq!(parse_range("bytes=90-", 100), Part { start: 90, end: 99 });
        assert_eq!(
            parse_range("bytes=90-1000", 100),
            Part { start: 90, end: 99 }
        );
        assert_eq!(parse_range("bytes=-10", 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range("bytes=-1000", 100), Part { start: 0, end: 99 });
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Whole);
        assert_eq!(parse_range("bytes=x-", 100), Whole);
    }

    #[test]
    fn mapped_pieces_carry_the_exact_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..2 * MAP_CHUNK + 12_345)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        // An unaligned start, several pieces, an unaligned end.
        for (start, end) in [(4097, data.len() - 3), (0, data.len()), (10, 11)] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(READ_QUEUE);
            let file = std::fs::File::open(&path).unwrap();
            let reader = std::thread::spawn(move || map_into(file, start as u64, end as u64, &tx));
            let mut got = Vec::new();
            while let Some(piece) = rx.blocking_recv() {
                let piece = piece.unwrap();
                assert!(piece.len() <= MAP_CHUNK);
                got.extend_from_slice(&piece);
            }
            reader.join().unwrap();
            assert_eq!(got, &data[start..end], "range {start}..{end}");
        }
    }

    #[test]
    fn if_range() {
        let tag = etag("ab");
        let mut h = HeaderMap::new();
        assert!(if_range_allows(&h, &tag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"b3-ab\""));
        assert!(if_range_allows(&h, &tag));
        h.insert(header::IF_RANGE, HeaderValue::from_static("W/\"b3-ab\""));
        assert!(!if_range_allows(&h, &tag));
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("Sun, 22 Nov 2026 07:00:00 GMT"),
        );
        assert!(!if_range_allows(&h, &tag));
    }
}
