//! Where transfers live on disk, and the synchronous writer behind an
//! upload. Under the endpoint's directory:
//!
//! - `journal/<id>`: the checkpoint journal ([`super::journal`]);
//! - `partial/<id>`: an upload's bytes so far, never served;
//! - `complete/<id>`: a verified file, moved there by an atomic rename
//!   only after its whole blake3 digest matched the one declared at
//!   creation. Existence in `complete/` means verified.
//!
//! Paths never come from the client: ids are checked against a strict
//! charset ([`validate_id`]) and joined to these three directories; every
//! open uses `O_NOFOLLOW` and checks for a regular file, so a symlink
//! planted in the data directory is refused ([`StoreError::Symlink`]), not
//! followed.
//!
//! [`Upload`] is one partial upload's live state: the data file, its
//! journal, the running blake3 of the current chunk and the chaining values
//! of the chunks before it (the whole digest is merged from them,
//! [`super::tree`]),
//! and the state at the last durable point (what the journal holds). Data
//! is written with `pwrite`; at each `checkpoint_bytes` boundary the file
//! is fdatasynced and the chunk's digest journaled, inline by
//! [`Upload::write`], or by a helper thread while the stream goes on with
//! [`Upload::write_stream`] (the PATCH path), which drains that helper
//! before it returns. Any failure in the
//! middle of a request (broken connection, checksum mismatch, full disk,
//! too many bytes) cuts the file back to the last durable point with
//! [`Upload::rollback`], so nothing half-written is ever kept.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sha1::Digest as _;

use super::journal::{Header, Journal, JournalError};
use super::tree;

/// Longest transfer id.
pub const MAX_ID_LEN: usize = 128;

/// An id outside the charset `[A-Za-z0-9_-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transfer id {id:?}: use 1 to 128 of A-Z a-z 0-9 _ -")]
pub struct IdError {
    pub id: String,
}

/// Checks a transfer id: ASCII letters, digits, `_` and `-`, 1 to 128 of
/// them. No dot, slash, percent or anything else a path could be made of.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdError {
            id: id.chars().take(MAX_ID_LEN + 8).collect(),
        })
    }
}

/// Why a store operation failed; each names the id or path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{} is a symlink or not a regular file; refusing it", path.display())]
    Symlink { path: PathBuf },
    #[error("transfer `{id}` not found")]
    NotFound { id: String },
    #[error("transfer `{id}` is not complete")]
    Incomplete { id: String },
    #[error("upload `{id}` expired")]
    Gone { id: String },
    #[error("transfer `{id}` already exists")]
    Exists { id: String },
    #[error("upload `{id}` is at offset {actual}, the request says {requested}")]
    OffsetMismatch {
        id: String,
        actual: u64,
        requested: u64,
    },
    #[error("upload `{id}`: {message}")]
    TooLarge { id: String, message: String },
    #[error("no space left writing {}", path.display())]
    DiskFull { path: PathBuf },
    #[error("upload `{id}`: the {algorithm} checksum of the request body does not match Upload-Checksum; nothing was appended")]
    ChecksumMismatch { id: String, algorithm: &'static str },
    #[error("upload `{id}`: the whole file's blake3 is {actual}, the declared digest is {expected}; the upload was removed")]
    DigestMismatch {
        id: String,
        expected: String,
        actual: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A checkpoint length the digest tree cannot use ([`tree`]).
    #[error("checkpoint_bytes {message}")]
    ChunkLen { message: String },
}

impl StoreError {
    /// Whether the error is a refused path (a planted symlink).
    pub fn is_traversal(&self) -> bool {
        match self {
            StoreError::Symlink { .. } | StoreError::BadId(_) => true,
            StoreError::Journal(JournalError::Io { source, .. }) => {
                source.raw_os_error() == Some(libc::ELOOP)
            }
            _ => false,
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::DiskFull {
            path: path.to_owned(),
        },
        Some(libc::ELOOP) => StoreError::Symlink {
            path: path.to_owned(),
        },
        _ => StoreError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Unix seconds of `t`.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Opens `path` without following a symlink and checks it is a regular file.
fn open_regular(path: &Path, write: bool) -> Result<File, StoreError> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(StoreError::Symlink {
            path: path.to_owned(),
        });
    }
    Ok(f)
}

/// Checkpoints that may wait for [`Upload::write_stream`]'s sync thread.
const SYNC_QUEUE: usize = 2;

/// Writeback is started every this many bytes written.
pub(crate) const WRITEBACK_BYTES: u64 = 1024 * 1024;

/// Starts writeback of `[start, start + len)` of `file` without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk writes while
/// more data arrives and a checkpoint's fdatasync only waits for the tail.
/// Hand-written with libc: nix 0.29 has no wrapper. Best effort: errors are
/// ignored (the checkpoint's fdatasync reports real ones).
pub(crate) fn start_writeback(file: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a syscall on a descriptor `file` keeps open; no memory passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), start, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A digest of a request body named in `Upload-Checksum`.
#[derive(Clone)]
pub enum BodyHasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl BodyHasher {
    /// The hasher for a tus algorithm name (`sha1`, `sha256`, `blake3`).
    pub fn for_algorithm(name: &str) -> Option<BodyHasher> {
        match name {
            "sha1" => Some(BodyHasher::Sha1(sha1::Sha1::new())),
            "sha256" => Some(BodyHasher::Sha256(sha2::Sha256::new())),
            "blake3" => Some(BodyHasher::Blake3(Box::default())),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            BodyHasher::Sha1(_) => "sha1",
            BodyHasher::Sha256(_) => "sha256",
            BodyHasher::Blake3(_) => "blake3",
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            BodyHasher::Sha1(h) => h.update(data),
            BodyHasher::Sha256(h) => h.update(data),
            BodyHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> Vec<u8> {
        match self {
            BodyHasher::Sha1(h) => h.finalize().to_vec(),
            BodyHasher::Sha256(h) => h.finalize().to_vec(),
            BodyHasher::Blake3(h) => h.finalize().as_bytes().to_vec(),
        }
    }
}

/// The `Upload-Checksum` of one request: the algorithm's hasher and the
/// expected digest.
pub struct BodyChecksum {
    pub hasher: BodyHasher,
    pub expected: Vec<u8>,
}

/// The upload's position and hash state at one point.
#[derive(Clone)]
struct Snapshot {
    offset: u64,
    /// The current chunk's hasher ([`tree::chunk_hasher`]).
    chunk: blake3::Hasher,
    /// How many of [`Upload::chunks`] are in (the rest were cut off).
    chunks: usize,
}

impl Snapshot {
    fn start() -> Snapshot {
        Snapshot {
            offset: 0,
            chunk: tree::chunk_hasher(0),
            chunks: 0,
        }
    }

    /// Ends the current chunk at `offset`: its chaining value goes into
    /// `chunks` and a new chunk starts here. Returns the journaled digest.
    fn end_chunk(&mut self, chunks: &mut tree::Chunks) -> String {
        chunks.truncate(self.chunks);
        let cv = chunks.push(&self.chunk);
        self.chunks = chunks.len();
        tree::next_chunk(&mut self.chunk, self.offset);
        tree::to_hex(&cv)
    }
}

/// One request's progress through [`Upload::write`].
pub struct Request {
    start: u64,
    checksum: Option<BodyChecksum>,
    /// Checkpoints reached during a checksummed request, journaled only
    /// once the checksum matched.
    pending: Vec<(u64, String)>,
}

/// A partial upload's live state (see the module header).
pub struct Upload {
    id: String,
    data_path: PathBuf,
    file: File,
    journal: Journal,
    /// The chaining values of the chunks written so far ([`super::tree`]).
    chunks: tree::Chunks,
    now: Snapshot,
    durable: Snapshot,
    /// The store's count of bytes received and then cut off.
    tally: Arc<Tally>,
    /// Writeback has been started up to here ([`start_writeback`]).
    kicked: u64,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("id", &self.id)
            .field("offset", &self.now.offset)
            .field("durable", &self.durable.offset)
            .finish()
    }
}

impl Upload {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn offset(&self) -> u64 {
        self.now.offset
    }

    pub fn header(&self) -> &Header {
        &self.journal.state().header
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The last journaled checkpoint (end offset, chunk chaining value).
    pub fn last_checkpoint(&self) -> Option<(u64, &str)> {
        self.journal
            .state()
            .checkpoints
            .last()
            .map(|c| (c.end, c.blake3.as_str()))
    }

    pub fn is_full(&self) -> bool {
        self.now.offset == self.header().size
    }

    /// Starts a request that appends at `offset` (409 unless it is the
    /// current offset).
    pub fn begin(
        &mut self,
        offset: u64,
        checksum: Option<BodyChecksum>,
    ) -> Result<Request, StoreError> {
        if offset != self.now.offset {
            return Err(StoreError::OffsetMismatch {
                id: self.id.clone(),
                actual: self.now.offset,
                requested: offset,
            });
        }
        Ok(Request {
            start: offset,
            checksum,
            pending: Vec::new(),
        })
    }

    /// Appends `data`: past the declared length is [`StoreError::TooLarge`].
    /// On any error the caller must [`Upload::rollback`].
    pub fn write(&mut self, req: &mut Request, mut data: &[u8]) -> Result<(), StoreError> {
        let size = self.header().size;
        if self.now.offset + data.len() as u64 > size {
            return Err(StoreError::TooLarge {
                id: self.id.clone(),
                message: format!("more than the declared Upload-Length of {size} bytes"),
            });
        }
        if let Some(c) = &mut req.checksum {
            c.hasher.update(data);
        }
        let cp = self.header().checkpoint_bytes;
        while !data.is_empty() {
            let to_boundary = cp - self.now.offset % cp;
            let n = (to_boundary as usize).min(data.len());
            let (part, rest) = data.split_at(n);
            self.file
                .write_all_at(part, self.now.offset)
                .map_err(|e| io_err(&self.data_path, e))?;
            self.now.chunk.update(part);
            self.now.offset += n as u64;
            self.tally.written.fetch_add(n as u64, Ordering::Relaxed);
            data = rest;
            if self.now.offset - self.kicked >= WRITEBACK_BYTES {
                start_writeback(&self.file, self.kicked, self.now.offset - self.kicked);
                self.kicked = self.now.offset;
            }
            if self.now.offset.is_multiple_of(cp) || self.now.offset == size {
                self.reach_checkpoint(req)?;
            }
        }
        Ok(())
    }

    /// Appends every frame `next` yields, like repeated [`Upload::write`],
    /// but with checkpoints made durable off the writing thread: at each
    /// boundary the chunk's digest goes to a helper thread that fdatasyncs
    /// the file and journals the checkpoints that sync covered (several
    /// with one journal fsync when the disk lags), while this thread keeps
    /// writing. A checkpoint is journaled only after an fdatasync that
    /// started after its last byte was written, so the journal never claims
    /// bytes that are not durable. At most [`SYNC_QUEUE`] checkpoints wait
    /// for the helper (then the writer waits: the disk sets the pace).
    /// Before this returns the helper is drained, so every checkpoint
    /// reached is durable and journaled (or its sync failed and that error
    /// is returned): a [`Upload::rollback`] after a broken body still loses
    /// less than one checkpoint. A request with `Upload-Checksum` journals
    /// its checkpoints only once the checksum matched: it takes the plain
    /// path. On any error the caller must [`Upload::rollback`].
    pub fn write_stream<B: AsRef<[u8]>>(
        &mut self,
        req: &mut Request,
        mut next: impl FnMut() -> Option<B>,
    ) -> Result<(), StoreError> {
        if req.checksum.is_some() {
            while let Some(b) = next() {
                self.write(req, b.as_ref())?;
            }
            return Ok(());
        }
        let size = self.header().size;
        let cp = self.header().checkpoint_bytes;
        let Upload {
            id,
            data_path,
            file,
            journal,
            chunks,
            now,
            durable,
            tally,
            kicked,
        } = self;
        let (id, data_path, file): (&str, &Path, &File) = (id, data_path, file);
        // Checkpoints reached and not known to be journaled yet, oldest
        // first (the newest journaled one is kept as the durable point).
        let mut reached: std::collections::VecDeque<Snapshot> = Default::default();
        let synced_to = AtomicU64::new(durable.offset);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, String)>(SYNC_QUEUE);
        let (written, synced) = std::thread::scope(|s| {
            let synced_to = &synced_to;
            let syncer = s.spawn(move || -> Result<(), StoreError> {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let end = batch.last().map_or(0, |c| c.0);
                    file.sync_data().map_err(|e| io_err(data_path, e))?;
                    journal.checkpoint_many(batch)?;
                    synced_to.store(end, Ordering::Release);
                }
                Ok(())
            });
            let written = (|| -> Result<(), StoreError> {
                while let Some(b) = next() {
                    let mut data = b.as_ref();
                    if now.offset + data.len() as u64 > size {
                        return Err(StoreError::TooLarge {
                            id: id.to_owned(),
                            message: format!(
                                "more than the declared Upload-Length of {size} bytes"
                            ),
                        });
                    }
                    while !data.is_empty() {
                        let to_boundary = cp - now.offset % cp;
                        let n = (to_boundary as usize).min(data.len());
                        let (part, rest) = data.split_at(n);
                        file.write_all_at(part, now.offset)
                            .map_err(|e| io_err(data_path, e))?;
                        now.chunk.update(part);
                        now.offset += n as u64;
                        tally.written.fetch_add(n as u64, Ordering::Relaxed);
                        data = rest;
                        if now.offset - *kicked >= WRITEBACK_BYTES {
                            start_writeback(file, *kicked, now.offset - *kicked);
                            *kicked = now.offset;
                        }
                        if now.offset.is_multiple_of(cp) || now.offset == size {
                            let digest = now.end_chunk(chunks);
                            let done = synced_to.load(Ordering::Acquire);
                            while reached.len() > 1 && reached[1].offset <= done {
                                reached.pop_front();
                            }
                            reached.push_back(now.clone());
                            if tx.send((now.offset, digest)).is_err() {
                                // The helper failed; its error follows.
                                return Ok(());
                            }
                        }
                    }
                }
                Ok(())
            })();
            drop(tx);
            let synced = syncer.join().unwrap_or_else(|_| {
                Err(StoreError::Io {
                    path: data_path.to_owned(),
                    source: std::io::Error::other("the sync thread panicked"),
                })
            });
            (written, synced)
        });
        let done = synced_to.load(Ordering::Acquire);
        if let Some(s) = reached.iter().rev().find(|s| s.offset <= done) {
            if s.offset > durable.offset {
                *durable = s.clone();
            }
        }
        written.and(synced)
    }

    fn reach_checkpoint(&mut self, req: &mut Request) -> Result<(), StoreError> {
        let digest = self.now.end_chunk(&mut self.chunks);
        if req.checksum.is_some() {
            req.pending.push((self.now.offset, digest));
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.data_path, e))?;
        self.journal.checkpoint(self.now.offset, digest)?;
        self.durable = self.now.clone();
        Ok(())
    }

    /// Ends a request whose body arrived whole: checks its checksum, syncs,
    /// journals. On [`StoreError::ChecksumMismatch`] the request's bytes
    /// are already cut off again.
    pub fn finish(&mut self, req: Request) -> Result<(), StoreError> {
        if let Some(c) = req.checksum {
            let name = c.hasher.name();
            if c.hasher.finalize() != c.expected {
                self.rollback();
                debug_assert_eq!(self.now.offset, req.start);
                return Err(StoreError::ChecksumMismatch {
                    id: self.id.clone(),
                    algorithm: name,
                });
            }
        }
        if self.now.offset == self.durable.offset {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.data_path, e))?;
        for (end, digest) in req.pending {
            self.journal.checkpoint(end, digest)?;
        }
        self.journal.commit(self.now.offset)?;
        self.durable = self.now.clone();
        Ok(())
    }

    /// Cuts the file back to the last durable point (broken connection,
    /// full disk, too many bytes, bad checksum).
    /// Always truncates: a failed `pwrite` (ENOSPC) may have written part
    /// of its buffer without the offset moving.
    pub fn rollback(&mut self) {
        if let Err(e) = self.file.set_len(self.durable.offset) {
            tracing::warn!(id = %self.id, error = %e, "cannot truncate a partial upload");
        }
        self.kicked = self.kicked.min(self.durable.offset);
        if self.now.offset != self.durable.offset {
            self.tally
                .discarded
                .fetch_add(self.now.offset - self.durable.offset, Ordering::Relaxed);
            self.now = self.durable.clone();
        }
        self.chunks.truncate(self.durable.chunks);
    }

    /// The whole file's blake3, lowercase hex, merged from the chunks'
    /// chaining values (no second pass over the file); None before the
    /// upload is full.
    fn whole_digest(&self) -> Option<String> {
        let h = self.header();
        let mut chunks = self.chunks.clone();
        chunks.truncate(self.now.chunks);
        chunks
            .whole(h.size, h.checkpoint_bytes)
            .map(|d| d.to_hex().to_string())
    }
}

/// The endpoint's directories and the per-id locks of live uploads.
pub struct Store {
    root: PathBuf,
    checkpoint_bytes: u64,
    slots: Mutex<HashMap<String, Slot>>,
    tally: Arc<Tally>,
}

/// What the store's uploads did since it was opened (for metrics).
#[derive(Debug, Default)]
struct Tally {
    written: AtomicU64,
    discarded: AtomicU64,
    published: AtomicU64,
}

/// One upload's lock; `None` inside means "not loaded from disk".
pub type Slot = Arc<tokio::sync::Mutex<Option<Box<Upload>>>>;

/// A complete file, opened for reading.
#[derive(Debug)]
pub struct Complete {
    pub file: File,
    pub size: u64,
    /// blake3 of the whole file, hex.
    pub digest: String,
}

impl Store {
    /// Opens (creating) the directory tree under `root`; refuses symlinked
    /// subdirectories.
    pub fn open(root: &Path, checkpoint_bytes: u64) -> Result<Store, StoreError> {
        tree::check_chunk_len(checkpoint_bytes)
            .map_err(|message| StoreError::ChunkLen { message })?;
        for sub in ["", "journal", "partial", "complete"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
            let meta = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            if !meta.is_dir() {
                return Err(StoreError::Symlink { path: p });
            }
        }
        Ok(Store {
            root: root.to_owned(),
            checkpoint_bytes,
            slots: Mutex::new(HashMap::new()),
            tally: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Upload bytes received and then cut off again (broken connections,
    /// failed checksums, full disk) since the store was opened: the
    /// server's side of "bytes sent twice".
    pub fn discarded_bytes(&self) -> u64 {
        self.tally.discarded.load(Ordering::Relaxed)
    }

    /// Upload bytes written since the store was opened (including those
    /// later discarded).
    pub fn written_bytes(&self) -> u64 {
        self.tally.written.load(Ordering::Relaxed)
    }

    /// Uploads verified and published since the store was opened.
    pub fn published(&self) -> u64 {
        self.tally.published.load(Ordering::Relaxed)
    }

    fn path(&self, dir: &str, id: &str) -> Result<PathBuf, StoreError> {
        validate_id(id)?;
        Ok(self.root.join(dir).join(id))
    }

    pub fn journal_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.path("journal", id)
    }

    pub fn partial_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.path("partial", id)
    }

    pub fn complete_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.path("complete", id)
    }

    /// The lock of upload `id` (shared by every request for it).
    pub fn slot(&self, id: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(id.to_owned()).or_default().clone()
    }

    fn forget(&self, id: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(id);
    }

    /// Whether `id` exists as a regular file in `dir` (a symlink there is
    /// an error).
    fn exists(&self, path: &Path) -> Result<bool, StoreError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => Ok(true),
            Ok(_) => Err(StoreError::Symlink {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path, e)),
        }
    }

    /// Whether `id` is a complete, verified file.
    pub fn is_complete(&self, id: &str) -> Result<bool, StoreError> {
        self.exists(&self.complete_path(id)?)
    }

    /// Creates upload `header.id` (journal first, then the empty data file).
    pub fn create(&self, mut header: Header) -> Result<Upload, StoreError> {
        let id = header.id.clone();
        let jp = self.journal_path(&id)?;
        let dp = self.partial_path(&id)?;
        let cp = self.complete_path(&id)?;
        if self.exists(&jp)? || self.exists(&dp)? || self.exists(&cp)? {
            return Err(StoreError::Exists { id });
        }
        header.checkpoint_bytes = self.checkpoint_bytes;
        let journal = Journal::create(&jp, header)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&dp)
            .map_err(|e| io_err(&dp, e))?;
        let start = Snapshot::start();
        Ok(Upload {
            id,
            data_path: dp,
            file,
            journal,
            chunks: tree::Chunks::default(),
            now: start.clone(),
            durable: start,
            tally: self.tally.clone(),
            kicked: 0,
        })
    }

    /// Loads a partial upload from disk after a restart: the data file is
    /// cut to the journal's durable offset and re-read to rebuild the
    /// hashes; a chunk whose digest no longer matches its checkpoint (a
    /// disk that lost data) cuts the upload back to the checkpoint before.
    pub fn load(&self, id: &str) -> Result<Upload, StoreError> {
        let jp = self.journal_path(id)?;
        let dp = self.partial_path(id)?;
        if !self.exists(&jp)? {
            return Err(StoreError::NotFound { id: id.to_owned() });
        }
        if self.exists(&self.complete_path(id)?)? {
            return Err(StoreError::Exists { id: id.to_owned() });
        }
        let mut journal = Journal::open(&jp)?;
        if !self.exists(&dp)? {
            // Crashed between journal and data file creation.
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dp)
                .map_err(|e| io_err(&dp, e))?;
        }
        let file = open_regular(&dp, true)?;
        let len = file.metadata().map_err(|e| io_err(&dp, e))?.len();
        let state = journal.state().clone();
        let cp = state.header.checkpoint_bytes;
        // A journal of another version can carry a length the tree cannot
        // use: refuse to load it rather than hash it wrongly.
        tree::check_chunk_len(cp).map_err(|message| StoreError::ChunkLen {
            message: format!("of upload `{id}`: {message}"),
        })?;
        let mut target = state.durable().min(len);
        // Re-read and re-hash [0, target), checking each checkpoint.
        let mut snap = Snapshot::start();
        let mut chunks = tree::Chunks::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut checkpoints = state.checkpoints.iter().peekable();
        while snap.offset < target {
            let boundary = (snap.offset / cp + 1) * cp;
            let n = (target.min(boundary) - snap.offset).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], snap.offset)
                .map_err(|e| io_err(&dp, e))?;
            snap.chunk.update(&buf[..n]);
            snap.offset += n as u64;
            match checkpoints.peek() {
                Some(c) if c.end == snap.offset => {
                    let got = snap.end_chunk(&mut chunks);
                    if got != c.blake3 {
                        tracing::warn!(
                            id,
                            chunk = c.index,
                            "partial upload chunk no longer matches its checkpoint; cutting back"
                        );
                        target = (snap.offset - 1) / cp * cp;
                        return self.load_cut(id, journal, file, dp, target);
                    }
                    checkpoints.next();
                }
                // A whole chunk the journal has no checkpoint for (a
                // journal written by hand or by another version): its
                // hasher must not run past the chunk, so go back to the
                // chunk's start.
                _ if snap.offset == boundary => {
                    tracing::warn!(
                        id,
                        offset = snap.offset,
                        "partial upload has no checkpoint at a chunk boundary; cutting back"
                    );
                    return self.load_cut(id, journal, file, dp, boundary - cp);
                }
                _ => {}
            }
        }
        if len != target {
            file.set_len(target).map_err(|e| io_err(&dp, e))?;
        }
        if target < state.durable() {
            journal.rollback(target)?;
        }
        Ok(Upload {
            id: id.to_owned(),
            data_path: dp,
            file,
            journal,
            chunks,
            now: snap.clone(),
            durable: snap,
            tally: self.tally.clone(),
            kicked: target,
        })
    }

    /// `load` after a bad chunk: start again from `target` (a checkpoint
    /// boundary) by re-reading up to it.
    fn load_cut(
        &self,
        id: &str,
        mut journal: Journal,
        file: File,
        dp: PathBuf,
        target: u64,
    ) -> Result<Upload, StoreError> {
        file.set_len(target).map_err(|e| io_err(&dp, e))?;
        journal.rollback(target)?;
        drop(file);
        drop(journal);
        self.load(id)
    }

    /// Verifies a full upload's whole digest and makes it visible with an
    /// atomic rename into `complete/`. On a mismatch the upload is removed
    /// and never visible.
    pub fn complete(&self, mut upload: Upload) -> Result<(), StoreError> {
        let expected = upload.header().digest.clone();
        let id = upload.id.clone();
        let actual = upload
            .whole_digest()
            .ok_or_else(|| StoreError::Incomplete { id: id.clone() })?;
        if actual != expected {
            drop(upload);
            self.remove(&id)?;
            return Err(StoreError::DigestMismatch {
                id,
                expected,
                actual,
            });
        }
        upload
            .file
            .sync_all()
            .map_err(|e| io_err(&upload.data_path, e))?;
        let to = self.complete_path(&id)?;
        std::fs::rename(&upload.data_path, &to).map_err(|e| io_err(&to, e))?;
        let dir = self.root.join("complete");
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&dir, e))?;
        upload.journal.complete()?;
        self.forget(&id);
        self.tally.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes local file `src` as complete transfer `id`, for a peer to
    /// download (the source side when the target cannot be reached and
    /// fetches instead). It goes through the upload path (checkpoints, the
    /// whole digest checked before the rename), so it is served exactly
    /// like an uploaded file; an id already present is
    /// [`StoreError::Exists`]. Streams through one buffer.
    pub fn import(&self, id: &str, src: &Path) -> Result<(), StoreError> {
        let mut file = File::open(src).map_err(|e| io_err(src, e))?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(&mut file)
            .map_err(|e| io_err(src, e))?;
        self.import_with_digest(id, src, &hasher.finalize().to_hex())
    }

    /// [`Store::import`] of a file whose blake3 the caller already has
    /// (hex): one pass fewer. A wrong digest is
    /// [`StoreError::DigestMismatch`] and nothing is published.
    pub fn import_with_digest(&self, id: &str, src: &Path, blake3: &str) -> Result<(), StoreError> {
        use std::io::Read;
        let size = std::fs::metadata(src).map_err(|e| io_err(src, e))?.len();
        let mut upload = self.create(Header {
            id: id.to_owned(),
            source: src.display().to_string(),
            target: "local".to_owned(),
            size,
            digest: blake3.to_owned(),
            checkpoint_bytes: self.checkpoint_bytes,
            created_unix: unix(SystemTime::now()),
            expires_unix: 0,
            metadata: String::new(),
        })?;
        let mut file = File::open(src).map_err(|e| io_err(src, e))?;
        let mut req = upload.begin(0, None)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    upload.rollback();
                    return Err(io_err(src, e));
                }
            };
            if let Err(e) = upload.write(&mut req, &buf[..n]) {
                upload.rollback();
                return Err(e);
            }
        }
        upload.finish(req)?;
        self.complete(upload)
    }

    /// Removes transfer `id` (partial or complete) and its journal.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut any = false;
        for p in [
            self.partial_path(id)?,
            self.complete_path(id)?,
            self.journal_path(id)?,
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => any = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, e)),
            }
        }
        self.forget(id);
        Ok(any)
    }

    /// Opens complete file `id` for reading with its size and digest.
    pub fn open_complete(&self, id: &str) -> Result<Complete, StoreError> {
        let path = self.complete_path(id)?;
        if !self.exists(&path)? {
            if self.exists(&self.journal_path(id)?)? {
                return Err(StoreError::Incomplete { id: id.to_owned() });
            }
            return Err(StoreError::NotFound { id: id.to_owned() });
        }
        let file = open_regular(&path, false)?;
        let size = file.metadata().map_err(|e| io_err(&path, e))?.len();
        let h = &super::journal::read_header(&self.journal_path(id)?)?;
        if h.size != size {
            return Err(StoreError::Io {
                path,
                source: std::io::Error::other(format!(
                    "size {size} differs from the journal's {}",
                    h.size
                )),
            });
        }
        Ok(Complete {
            file,
            size,
            digest: h.digest.clone(),
        })
    }

    /// Ids of incomplete uploads whose expiry is before `now`.
    pub fn expired(&self, now: SystemTime) -> Vec<String> {
        let now = unix(now);
        let Ok(dir) = std::fs::read_dir(self.root.join("journal")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let Some(id) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_id(&id).is_err() || matches!(self.is_complete(&id), Ok(true)) {
                continue;
            }
            if let Ok(h) = super::journal::read_header(&e.path()) {
                let exp = h.expires_unix;
                if exp != 0 && exp <= now {
                    out.push(id);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CP: u64 = 64 * 1024;

    fn header(id: &str, data: &[u8]) -> Header {
        Header {
            id: id.into(),
            source: "client".into(),
            target: "here".into(),
            size: data.len() as u64,
            digest: blake3::hash(data).to_hex().to_string(),
            checkpoint_bytes: 0,
            created_unix: 0,
            expires_unix: 0,
            metadata: String::new(),
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn ids() {
        for ok in ["a", "A-b_9", &"x".repeat(128)] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a.b",
            "%2e",
            "a b",
            "/etc",
            "a\0",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_in_pieces_checkpoint_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let d = data(3 * CP as usize + 1000);
        let mut up = store.create(header("f1", &d)).unwrap();
        // Two requests: one ending mid-chunk, one to the end.
        let mut r = up.begin(0, None).unwrap();
        for piece in d[..100_000].chunks(7000) {
            up.write(&mut r, piece).unwrap();
        }
        up.finish(r).unwrap();
        assert_eq!(up.journal().state().checkpoints.len(), 1);
        assert_eq!(up.journal().state().durable(), 100_000);
        assert!(matches!(
            up.begin(5, None),
            Err(StoreError::OffsetMismatch {
                actual: 100_000,
                ..
            })
        ));
        let mut r = up.begin(100_000, None).unwrap();
        up.write(&mut r, &d[100_000..]).unwrap();
        up.finish(r).unwrap();
        assert!(up.is_full());
        let cps = &up.journal().state().checkpoints;
        assert_eq!(cps.len(), 4);
        assert_eq!(
            cps[1].blake3,
            crate::tree::digest_of(CP, &d[CP as usize..2 * CP as usize])
        );
        assert!(!store.is_complete("f1").unwrap());
        assert!(matches!(
            store.open_complete("f1"),
            Err(StoreError::Incomplete { .. })
        ));
        store.complete(up).unwrap();
        let c = store.open_complete("f1").unwrap();
        assert_eq!(c.size, d.len() as u64);
        assert_eq!(
            std::fs::read(store.complete_path("f1").unwrap()).unwrap(),
            d
        );
        assert!(!store.partial_path("f1").unwrap().exists());
    }

    #[test]
    fn streamed_checkpoints_are_journaled_and_a_break_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let d = data(5 * CP as usize + 1000);
        let mut up = store.create(header("s1", &d)).unwrap();
        // A body that breaks off 3.5 checkpoints in, in odd-sized frames:
        // every checkpoint reached is journaled (synced by the helper
        // thread) before write_stream returns, so the rollback keeps 3.
        let cut = 3 * CP as usize + CP as usize / 2;
        let mut r = up.begin(0, None).unwrap();
        let mut frames = d[..cut].chunks(7001);
        up.write_stream(&mut r, || frames.next()).unwrap();
        assert_eq!(up.offset(), cut as u64);
        let cps = up.journal().state().checkpoints.clone();
        assert_eq!(
            cps.iter().map(|c| c.end).collect::<Vec<_>>(),
            vec![CP, 2 * CP, 3 * CP]
        );
        for (i, c) in cps.iter().enumerate() {
            let chunk = &d[i * CP as usize..(i + 1) * CP as usize];
            assert_eq!(c.blake3, crate::tree::digest_of(i as u64 * CP, chunk));
        }
        up.rollback();
        assert_eq!(up.offset(), 3 * CP);
        assert_eq!(store.discarded_bytes(), (cut as u64) - 3 * CP);
        // Past the declared length: TooLarge, and the checkpoints reached
        // before it still count.
        let mut r = up.begin(3 * CP, None).unwrap();
        let mut over = d[3 * CP as usize..].to_vec();
        over.extend_from_slice(b"extra");
        let mut frames = over.chunks(CP as usize + 3);
        let e = up.write_stream(&mut r, || frames.next()).unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        up.rollback();
        assert_eq!(up.offset(), 5 * CP);
        assert_eq!(up.journal().state().durable(), 5 * CP);
        // The rest, then the whole digest verifies.
        let mut r = up.begin(5 * CP, None).unwrap();
        let mut frames = d[5 * CP as usize..].chunks(300);
        up.write_stream(&mut r, || frames.next()).unwrap();
        up.finish(r).unwrap();
        assert!(up.is_full());
        store.complete(up).unwrap();
        assert_eq!(
            std::fs::read(store.complete_path("s1").unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn too_many_bytes_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let d = data(2 * CP as usize);
        let mut up = store.create(header("f2", &d)).unwrap();
        let mut r = up.begin(0, None).unwrap();
        up.write(&mut r, &d[..CP as usize + 10]).unwrap();
        // The connection breaks here: back to the checkpoint.
        up.rollback();
        assert_eq!(up.offset(), CP);
        assert_eq!(store.discarded_bytes(), 10);
        let len = std::fs::metadata(store.partial_path("f2").unwrap())
            .unwrap()
            .len();
        assert_eq!(len, CP);
        let mut r = up.begin(CP, None).unwrap();
        let e = up.write(&mut r, &data(CP as usize + 1)).unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        up.rollback();
        let mut r = up.begin(CP, None).unwrap();
        up.write(&mut r, &d[CP as usize..]).unwrap();
        up.finish(r).unwrap();
        store.complete(up).unwrap();
        assert_eq!(
            std::fs::read(store.complete_path("f2").unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn checksum_mismatch_appends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let d = data(3 * CP as usize);
        let mut up = store.create(header("f3", &d)).unwrap();
        let piece = &d[..2 * CP as usize + 5];
        let mut bad = piece.to_vec();
        bad[CP as usize + 3] ^= 1;
        let mut h = BodyHasher::for_algorithm("sha1").unwrap();
        h.update(piece);
        let good_sum = h.finalize();
        let mut r = up
            .begin(
                0,
                Some(BodyChecksum {
                    hasher: BodyHasher::for_algorithm("sha1").unwrap(),
                    expected: good_sum.clone(),
                }),
            )
            .unwrap();
        up.write(&mut r, &bad).unwrap();
        let e = up.finish(r).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::ChecksumMismatch {
                    algorithm: "sha1",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(up.offset(), 0);
        assert!(up.journal().state().checkpoints.is_empty());
        // Re-sent intact: accepted, checkpoints journaled after the check.
        let mut r = up
            .begin(
                0,
                Some(BodyChecksum {
                    hasher: BodyHasher::for_algorithm("sha1").unwrap(),
                    expected: good_sum,
                }),
            )
            .unwrap();
        up.write(&mut r, piece).unwrap();
        up.finish(r).unwrap();
        assert_eq!(up.journal().state().checkpoints.len(), 2);
        assert_eq!(up.offset(), piece.len() as u64);
    }

    #[test]
    fn digest_mismatch_removes_and_hides() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let d = data(1000);
        let mut h = header("f4", &d);
        h.digest = blake3::hash(b"something else").to_hex().to_string();
        let mut up = store.create(h).unwrap();
        let mut r = up.begin(0, None).unwrap();
        up.write(&mut r, &d).unwrap();
        up.finish(r).unwrap();
        let e = store.complete(up).unwrap_err();
        assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
        assert!(!store.is_complete("f4").unwrap());
        assert!(matches!(
            store.open_complete("f4"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(store.load("f4"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn reload_after_restart_rebuilds_hashes_and_cuts_bad_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(4 * CP as usize);
        {
            let store = Store::open(dir.path(), CP).unwrap();
            let mut up = store.create(header("f5", &d)).unwrap();
            let mut r = up.begin(0, None).unwrap();
            up.write(&mut r, &d[..3 * CP as usize + 77]).unwrap();
            up.finish(r).unwrap();
            // Bytes beyond the durable point (a crash mid-request).
            let mut r = up.begin(up.offset(), None).unwrap();
            up.write(&mut r, &d[3 * CP as usize + 77..3 * CP as usize + 99])
                .unwrap();
        }
        let store = Store::open(dir.path(), CP).unwrap();
        let up = store.load("f5").unwrap();
        assert_eq!(up.offset(), 3 * CP + 77);
        drop(up);
        // Corrupt the second chunk on disk: reload cuts back to CP.
        let p = store.partial_path("f5").unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff, 0xfe], CP + 10).unwrap();
        drop(f);
        let mut up = store.load("f5").unwrap();
        assert_eq!(up.offset(), CP);
        assert_eq!(up.journal().state().checkpoints.len(), 1);
        let mut r = up.begin(CP, None).unwrap();
        up.write(&mut r, &d[CP as usize..]).unwrap();
        up.finish(r).unwrap();
        store.complete(up).unwrap();
        assert_eq!(
            std::fs::read(store.complete_path("f5").unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn a_journal_without_a_checkpoint_at_a_boundary_is_cut_back_not_trusted() {
        // A journal that commits past chunk boundaries it has no
        // checkpoint for (not one this store writes): reload goes back to
        // the last chunk it can check, and the upload still completes.
        let dir = tempfile::tempdir().unwrap();
        let d = data(3 * CP as usize);
        let store = Store::open(dir.path(), CP).unwrap();
        let mut up = store.create(header("f6", &d)).unwrap();
        let mut r = up.begin(0, None).unwrap();
        up.write(&mut r, &d[..CP as usize]).unwrap();
        up.finish(r).unwrap();
        drop(up);
        let p = store.partial_path("f6").unwrap();
        std::fs::write(&p, &d[..2 * CP as usize + 5]).unwrap();
        let mut j = Journal::open(&store.journal_path("f6").unwrap()).unwrap();
        j.commit(2 * CP + 5).unwrap();
        drop(j);
        let mut up = store.load("f6").unwrap();
        assert_eq!(up.offset(), CP);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), CP);
        let mut r = up.begin(CP, None).unwrap();
        up.write(&mut r, &d[CP as usize..]).unwrap();
        up.finish(r).unwrap();
        store.complete(up).unwrap();
        assert_eq!(
            std::fs::read(store.complete_path("f6").unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn planted_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        std::os::unix::fs::symlink(&outside, store.complete_path("s1").unwrap()).unwrap();
        let e = store.open_complete("s1").unwrap_err();
        assert!(e.is_traversal(), "{e}");
        std::os::unix::fs::symlink(&outside, store.partial_path("s2").unwrap()).unwrap();
        let e = store.create(header("s2", b"x")).unwrap_err();
        assert!(e.is_traversal(), "{e}");
        // A symlinked subdirectory is refused at open.
        let d2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), d2.path().join("complete")).unwrap();
        assert!(matches!(
            Store::open(d2.path(), CP),
            Err(StoreError::Symlink { .. })
        ));
    }

    #[test]
    fn expiry_lists_only_expired_incomplete_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CP).unwrap();
        let mut h = header("old", b"abc");
        h.expires_unix = 100;
        store.create(h).unwrap();
        let mut h = header("new", b"abc");
        h.expires_unix = unix(SystemTime::now()) + 1000;
        store.create(h).unwrap();
        assert_eq!(store.expired(SystemTime::now()), vec!["old".to_owned()]);
        assert!(store.remove("old").unwrap());
        assert!(store.expired(SystemTime::now()).is_empty());
    }
}
