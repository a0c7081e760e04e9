//! The other end of the transfer routes: a streaming tus uploader and a
//! Range downloader, each keeping its own checkpoint journal
//! ([`super::journal`]) so a transfer that broke off resumes from the last
//! checkpoint both ends hold.
//!
//! - [`upload`]: `HEAD` the upload (creating it with `POST` when absent),
//!   check the server's last checkpoint (`Sparegrid-Checkpoint`) against
//!   the source file, then `PATCH` the rest as one streamed body. Bytes the
//!   server acknowledged are journaled with their chunk digests.
//! - [`download`]: resume a `<dest>.part` from its journal's durable offset
//!   with `Range` + `If-Range` (the ETag); fsync and journal a checkpoint
//!   every `checkpoint_bytes`; verify the whole blake3 (from the strong
//!   ETag) before an atomic rename to `dest`.
//!
//! Both stream through fixed buffers; neither holds a whole file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;

use super::journal::{Header, Journal, JournalError};
use super::store::unix;
use super::tree;
use super::tus::{CHECKPOINT, OFFSET_OCTET_STREAM, TUS_VERSION};

/// Why a client transfer failed; names the URL or file.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{}: blake3 {actual} does not match {expected}", path.display())]
    Digest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_owned(),
        source,
    }
}

fn http(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Http {
        url: url.to_owned(),
        source,
    }
}

async fn status_error(url: &str, r: reqwest::Response) -> ClientError {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    ClientError::Status {
        url: url.to_owned(),
        status,
        body,
    }
}

/// The blake3 of bytes `[start, end)` of `file`, hex.
pub fn hash_range(file: &File, start: u64, end: u64) -> std::io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    tree::update_from_file(&mut h, file, start, end)?;
    Ok(h.finalize())
}

/// In one pass over `[0, size)` of `file`: the whole blake3 (hex) and the
/// chaining value of every `cp` chunk by end offset, as the journals record
/// them ([`super::tree`]).
fn digest_chunks(
    file: &File,
    size: u64,
    cp: u64,
) -> std::io::Result<(String, HashMap<u64, String>)> {
    let mut chunks = tree::Chunks::default();
    let mut by_end = HashMap::new();
    let mut start = 0;
    while start < size {
        let end = (start + cp).min(size);
        let mut h = tree::chunk_hasher(start);
        tree::update_from_file(&mut h, file, start, end)?;
        by_end.insert(end, tree::to_hex(&chunks.push(&h)));
        start = end;
    }
    let whole = chunks
        .whole(size, cp)
        .ok_or_else(|| std::io::Error::other("the chunks do not cover the file"))?;
    Ok((whole.to_hex().to_string(), by_end))
}

/// A file's whole blake3 and its chunk digests for one checkpoint length,
/// from one pass ([`file_digests`]): computed once by a caller that needs
/// the digest anyway (to announce it) and handed to [`upload`] through
/// [`UploadOptions::digests`], so the file is not hashed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigests {
    /// The whole file's blake3, hex.
    pub blake3: String,
    pub size: u64,
    pub checkpoint_bytes: u64,
    /// Chunk chaining values (hex) by end offset.
    chunks: HashMap<u64, String>,
}

/// [`FileDigests`] of `path` for chunks of `checkpoint_bytes` (a power of
/// two, [`tree::check_chunk_len`]).
pub fn file_digests(path: &Path, checkpoint_bytes: u64) -> Result<FileDigests, ClientError> {
    tree::check_chunk_len(checkpoint_bytes).map_err(|m| ClientError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("checkpoint_bytes {m}"),
        ),
    })?;
    let f = File::open(path).map_err(io(path))?;
    let size = f.metadata().map_err(io(path))?.len();
    let (blake3, chunks) = digest_chunks(&f, size, checkpoint_bytes).map_err(io(path))?;
    Ok(FileDigests {
        blake3,
        size,
        checkpoint_bytes,
        chunks,
    })
}

/// The blake3 of a whole file, hex.
pub fn hash_file(path: &Path) -> Result<String, ClientError> {
    let f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    Ok(hash_range(&f, 0, len)
        .map_err(io(path))?
        .to_hex()
        .to_string())
}

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    pub size: u64,
    /// Where this call started sending (the server's offset).
    pub resumed_at: u64,
    /// Body bytes this call handed to the connection.
    pub sent: u64,
}

/// How to upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Checkpoint size of the client's journal.
    pub checkpoint_bytes: u64,
    /// Counts body bytes handed to the connection (across calls, for the
    /// benchmark's resend figure and tests that break a transfer midway).
    pub sent: Arc<AtomicU64>,
    /// The file's digests when the caller has them already; used when they
    /// match the file's size and `checkpoint_bytes`, ignored otherwise.
    pub digests: Option<Arc<FileDigests>>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            checkpoint_bytes: super::config::TransferConfig::default().checkpoint_bytes,
            sent: Arc::default(),
            digests: None,
        }
    }
}

/// Uploads `path` as transfer `id` to `base` (`http://host:port`) with an
/// upload `token`, resuming where the server is. The client journal lives
/// at `journal_dir/<id>.up`.
pub async fn upload(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    path: &Path,
    journal_dir: &Path,
    opts: &UploadOptions,
) -> Result<UploadReport, ClientError> {
    let url = format!("{base}{}/{id}", super::FILES);
    let jpath = journal_dir.join(format!("{id}.up"));
    tree::check_chunk_len(opts.checkpoint_bytes).map_err(|m| ClientError::Protocol {
        url: url.clone(),
        message: format!("checkpoint_bytes {m}"),
    })?;
    let file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    // Chunk digests from the pass that computes the whole digest (the
    // caller's, or ours below): the stream then sends without hashing.
    let given = opts
        .digests
        .as_deref()
        .filter(|d| d.size == size && d.checkpoint_bytes == opts.checkpoint_bytes);
    let mut known = given.map(|d| d.chunks.clone()).unwrap_or_default();
    let mut journal = match Journal::open(&jpath) {
        Ok(j)
            if j.state().header.size == size
                && j.state().header.checkpoint_bytes == opts.checkpoint_bytes =>
        {
            j
        }
        _ => {
            let _ = std::fs::remove_file(&jpath);
            let digest = match given {
                Some(d) => d.blake3.clone(),
                None => {
                    let f = file.try_clone().map_err(io(path))?;
                    let cp = opts.checkpoint_bytes;
                    let (digest, chunks) =
                        tokio::task::spawn_blocking(move || digest_chunks(&f, size, cp))
                            .await
                            .map_err(|e| io(path)(std::io::Error::other(e)))?
                            .map_err(io(path))?;
                    known = chunks;
                    digest
                }
            };
            Journal::create(
                &jpath,
                Header {
                    id: id.to_owned(),
                    source: path.display().to_string(),
                    target: url.clone(),
                    size,
                    digest,
                    checkpoint_bytes: opts.checkpoint_bytes,
                    created_unix: unix(SystemTime::now()),
                    expires_unix: 0,
                    metadata: String::new(),
                },
            )?
        }
    };
    let digest = journal.state().header.digest.clone();
    // Where is the server?
    let r = client
        .head(&url)
        .bearer_auth(token)
        .header("Tus-Resumable", TUS_VERSION)
        .send()
        .await
        .map_err(http(&url))?;
    let offset = match r.status().as_u16() {
        200 => {
            let offset = header_u64(&r, "upload-offset").ok_or_else(|| ClientError::Protocol {
                url: url.clone(),
                message: "HEAD without Upload-Offset".into(),
            })?;
            // The last checkpoint both hold: the server's must match our file.
            if let Some((end, d)) = r
                .headers()
                .get(CHECKPOINT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
            {
                let end: u64 = end.parse().unwrap_or(0);
                let cp = journal.state().header.checkpoint_bytes;
                let start = if end == 0 {
                    0
                } else {
                    (end - 1) / cp.max(1) * cp
                };
                let f = file.try_clone().map_err(io(path))?;
                let ours = match known.get(&end) {
                    Some(d) => d.clone(),
                    None => tokio::task::spawn_blocking(move || {
                        tree::chunk_of_file(&f, start, end).map(|cv| tree::to_hex(&cv))
                    })
                    .await
                    .map_err(|e| io(path)(std::io::Error::other(e)))?
                    .map_err(io(path))?,
                };
                if ours != d {
                    return Err(ClientError::Protocol {
                        url,
                        message: format!(
                            "the server's checkpoint at {end} ({d}) is not our file's chunk; delete the upload and start again"
                        ),
                    });
                }
            }
            offset
        }
        404 => {
            let meta = format!(
                "blake3 {},source {}",
                STANDARD.encode(&digest),
                STANDARD.encode(path.display().to_string())
            );
            let create = format!("{base}{}", super::FILES);
            let r = client
                .post(&create)
                .bearer_auth(token)
                .header("Tus-Resumable", TUS_VERSION)
                .header("Upload-Length", size)
                .header("Upload-Metadata", meta)
                .send()
                .await
                .map_err(http(&create))?;
            if r.status().as_u16() != 201 {
                return Err(status_error(&create, r).await);
            }
            0
        }
        _ => return Err(status_error(&url, r).await),
    };
    // Journal what the server acknowledged (chunk digests of our file).
    record_acked(&mut journal, &file, offset, &known).map_err(|e| match e {
        ClientError::Io { source, .. } => io(path)(source),
        e => e,
    })?;
    if offset >= size {
        if !journal.state().complete {
            journal.complete()?;
        }
        return Ok(UploadReport {
            size,
            resumed_at: offset,
            sent: 0,
        });
    }
    let counter = opts.sent.clone();
    let before = counter.load(Ordering::Relaxed);
    // Hash on the way only when the chunks are not known already (a
    // resumed upload).
    let hash_cp = if known.is_empty() {
        journal.state().header.checkpoint_bytes
    } else {
        0
    };
    let digests = Arc::new(Mutex::new(known));
    let body = reqwest::Body::wrap_stream(read_stream(
        file.try_clone().map_err(io(path))?,
        (offset, size),
        hash_cp,
        counter.clone(),
        digests.clone(),
    ));
    let r = client
        .patch(&url)
        .bearer_auth(token)
        .header("Tus-Resumable", TUS_VERSION)
        .header("Upload-Offset", offset)
        .header("Content-Type", OFFSET_OCTET_STREAM)
        .header("Content-Length", size - offset)
        .body(body)
        .send()
        .await
        .map_err(http(&url))?;
    if r.status().as_u16() != 204 {
        return Err(status_error(&url, r).await);
    }
    let acked = header_u64(&r, "upload-offset").unwrap_or(0);
    let known = digests.lock().map(|m| m.clone()).unwrap_or_default();
    record_acked(&mut journal, &file, acked, &known)?;
    if acked == size {
        journal.complete()?;
    }
    Ok(UploadReport {
        size,
        resumed_at: offset,
        sent: counter.load(Ordering::Relaxed) - before,
    })
}

/// Appends checkpoints of `file` up to `acked` that the journal lacks,
/// with one fsync; digests hashed while sending (`known`) are used, the
/// others read back from the file.
fn record_acked(
    journal: &mut Journal,
    file: &File,
    acked: u64,
    known: &HashMap<u64, String>,
) -> Result<(), ClientError> {
    let h = journal.state().header.clone();
    let cp = h.checkpoint_bytes.max(1);
    let mut start = journal.state().checkpoints.last().map_or(0, |c| c.end);
    if start > acked {
        // The server went back (it lost data): so do we.
        journal.rollback(acked / cp * cp)?;
        start = acked / cp * cp;
    }
    let mut new = Vec::new();
    while start < acked {
        let end = ((start / cp + 1) * cp).min(h.size);
        if end > acked {
            break;
        }
        let d = match known.get(&end) {
            Some(d) => d.clone(),
            None => tree::chunk_of_file(file, start, end)
                .map(|cv| tree::to_hex(&cv))
                .map_err(|source| ClientError::Io {
                    path: PathBuf::from(&h.source),
                    source,
                })?,
        };
        new.push((end, d));
        start = end;
    }
    journal.checkpoint_many(new)?;
    journal.commit(acked)?;
    Ok(())
}

fn header_u64(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Bytes `[start, end)` of `file` as a stream read by a blocking thread;
/// `counter` counts what the connection took. When `cp` is not 0 and
/// `start` is on a checkpoint boundary, each chunk's chaining value is
/// computed on the way and put in `digests` (by end offset), so
/// acknowledging needs no second read.
fn read_stream(
    file: File,
    (start, end): (u64, u64),
    cp: u64,
    counter: Arc<AtomicU64>,
    digests: Arc<Mutex<HashMap<u64, String>>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, rx) =
        tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(super::download::READ_QUEUE);
    tokio::task::spawn_blocking(move || super::download::read_into(file, start, end, &tx));
    let hashing = cp > 0 && start % cp == 0;
    let state = (
        rx,
        tree::chunk_hasher(if hashing { start } else { 0 }),
        start,
    );
    futures_util::stream::unfold(state, move |(mut rx, mut hasher, mut pos)| {
        let counter = counter.clone();
        let digests = digests.clone();
        async move {
            let item = rx.recv().await?;
            if let Ok(b) = &item {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
                let mut data: &[u8] = b;
                while hashing && !data.is_empty() {
                    let n = ((cp - pos % cp) as usize).min(data.len());
                    hasher.update(&data[..n]);
                    pos += n as u64;
                    data = &data[n..];
                    if pos % cp == 0 || pos == end {
                        let d = tree::chunk_digest(&hasher);
                        tree::next_chunk(&mut hasher, pos);
                        if let Ok(mut m) = digests.lock() {
                            m.insert(pos, d);
                        }
                    }
                }
            }
            Some((item, (rx, hasher, pos)))
        }
    })
}

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    pub size: u64,
    /// Where this call resumed (0: from the start).
    pub resumed_at: u64,
    /// Body bytes this call received.
    pub received: u64,
}

/// Downloads `url` (`…/v1/files/<id>`) with a download `token` to `dest`,
/// resuming `<dest>.part` from its journal `<dest>.journal`.
/// `received` counts body bytes as they arrive.
pub async fn download(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    dest: &Path,
    checkpoint_bytes: u64,
    received: Arc<AtomicU64>,
) -> Result<DownloadReport, ClientError> {
    let part = with_suffix(dest, ".part");
    let jpath = with_suffix(dest, ".journal");
    tree::check_chunk_len(checkpoint_bytes).map_err(|m| ClientError::Protocol {
        url: url.to_owned(),
        message: format!("checkpoint_bytes {m}"),
    })?;
    let mut journal = Journal::open(&jpath)
        .ok()
        .filter(|j| j.state().header.checkpoint_bytes == checkpoint_bytes);
    let resume_at = journal.as_ref().map_or(0, |j| j.state().durable());
    let mut req = client.get(url).bearer_auth(token);
    if let (Some(j), true) = (&journal, resume_at > 0) {
        req = req
            .header("Range", format!("bytes={resume_at}-"))
            .header("If-Range", super::download::etag(&j.state().header.digest));
    }
    let r = req.send().await.map_err(http(url))?;
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("\"b3-"))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Protocol {
            url: url.to_owned(),
            message: "no blake3 ETag".into(),
        })?;
    let start = match status {
        206 => resume_at,
        200 => {
            // From scratch (first time, or the file changed).
            journal = None;
            let _ = std::fs::remove_file(&jpath);
            0
        }
        _ => return Err(status_error(url, r).await),
    };
    let size = match status {
        206 => journal.as_ref().map_or(0, |j| j.state().header.size),
        _ => r.content_length().ok_or_else(|| ClientError::Protocol {
            url: url.to_owned(),
            message: "no Content-Length".into(),
        })?,
    };
    let mut journal = match journal {
        Some(j) => j,
        None => Journal::create(
            &jpath,
            Header {
                id: url.rsplit('/').next().unwrap_or_default().to_owned(),
                source: url.to_owned(),
                target: dest.display().to_string(),
                size,
                digest: etag,
                checkpoint_bytes,
                created_unix: unix(SystemTime::now()),
                expires_unix: 0,
                metadata: String::new(),
            },
        )?,
    };
    let cp = journal.state().header.checkpoint_bytes;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(io(&part))?;
    file.set_len(start).map_err(io(&part))?;
    // The chunks before `start` by their journaled chaining values; the
    // hash of a partial last chunk is rebuilt (resume mid-chunk).
    let chunk_start = start / cp * cp;
    let mut chunks = tree::Chunks::default();
    for c in &journal.state().checkpoints {
        if c.end > chunk_start {
            break;
        }
        // A digest that is not hex leaves the chunks short, and the whole
        // is then read back below. (A plain blake3 from an older journal
        // is hex too: it is taken as a chaining value, the merged digest
        // does not match, and the part file and journal are removed.)
        match tree::from_hex(&c.blake3) {
            Some(cv) => chunks.push_cv(cv),
            None => break,
        }
    }
    let mut chunk = tree::chunk_hasher(chunk_start);
    if start > chunk_start {
        let mut buf = vec![0u8; (start - chunk_start) as usize];
        file.read_exact_at(&mut buf, chunk_start)
            .map_err(io(&part))?;
        chunk.update(&buf);
    }
    let mut pos = start;
    let mut stream = r.bytes_stream();
    let mut result = Ok(());
    let mut kicked = start;
    while let Some(b) = stream.next().await {
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                result = Err(http(url)(e));
                break;
            }
        };
        received.fetch_add(b.len() as u64, Ordering::Relaxed);
        let mut data: &[u8] = &b;
        while !data.is_empty() {
            let n = ((cp - pos % cp) as usize).min(data.len());
            file.write_all_at(&data[..n], pos).map_err(io(&part))?;
            chunk.update(&data[..n]);
            pos += n as u64;
            data = &data[n..];
            // The disk starts writing now, so the checkpoint's fdatasync
            // only waits for the tail (as the endpoint's writer does).
            if pos - kicked >= super::store::WRITEBACK_BYTES {
                super::store::start_writeback(&file, kicked, pos - kicked);
                kicked = pos;
            }
            if pos.is_multiple_of(cp) || pos == size {
                file.sync_data().map_err(io(&part))?;
                let cv = chunks.push(&chunk);
                journal.checkpoint(pos, tree::to_hex(&cv))?;
                tree::next_chunk(&mut chunk, pos);
            }
        }
    }
    result?;
    if pos != size {
        return Err(ClientError::Protocol {
            url: url.to_owned(),
            message: format!("the body ended at {pos} of {size} bytes"),
        });
    }
    let expected = journal.state().header.digest.clone();
    // Merged from the chunks hashed on the way; read back only when they
    // do not cover the file (a one-chunk file finished by an earlier call,
    // or a journaled digest that is not hex).
    let actual = match chunks.whole(size, cp) {
        Some(h) => h.to_hex().to_string(),
        None => {
            let f = file.try_clone().map_err(io(&part))?;
            tokio::task::spawn_blocking(move || hash_range(&f, 0, size))
                .await
                .map_err(|e| io(&part)(std::io::Error::other(e)))?
                .map_err(io(&part))?
                .to_hex()
                .to_string()
        }
    };
    if actual != expected {
        // Nothing of a bad file is kept: the next try starts over.
        drop(journal);
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&jpath);
        return Err(ClientError::Digest {
            path: part,
            expected,
            actual,
        });
    }
    file.sync_all().map_err(io(&part))?;
    std::fs::rename(&part, dest).map_err(io(dest))?;
    journal.complete()?;
    Ok(DownloadReport {
        size,
        resumed_at: start,
        received: pos - start,
    })
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
