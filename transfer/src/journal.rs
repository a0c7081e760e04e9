//! The checkpoint journal of one transfer, kept by both ends: an
//! append-only file of JSON lines, fsynced after every append. The first
//! line is the [`Header`] (id, source, target, size, whole-file blake3
//! digest, checkpoint size, creation and expiry); then a
//! `checkpoint` line every `checkpoint_bytes` with that chunk's blake3
//! chaining value ([`super::tree`]), a
//! `committed` line when a request ended cleanly between checkpoints, and
//! `complete` once the whole file verified.
//!
//! An entry is only appended once the data it describes is on disk
//! (fdatasync first), so after a crash or a broken connection the journal's
//! [`JournalState::durable`] offset is data both the file and the journal
//! hold; the data file is cut back to it. A torn last line (a crash during
//! the append) is ignored and cut off when the journal is reopened.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A journal that could not be written or read; names the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
}

/// What a transfer is; the first line of its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub id: String,
    /// Where the bytes come from (a URL or a local path, as the writer of
    /// the journal sees it).
    pub source: String,
    /// Where they go.
    pub target: String,
    pub size: u64,
    /// blake3 of the whole file, lowercase hex.
    pub digest: String,
    pub checkpoint_bytes: u64,
    pub created_unix: u64,
    /// 0: never.
    pub expires_unix: u64,
    /// The tus `Upload-Metadata` header as the client sent it.
    #[serde(default)]
    pub metadata: String,
}

/// One verified chunk: bytes `[end - len, end)`; `blake3` in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub index: u64,
    pub end: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    Header(Header),
    Checkpoint(Checkpoint),
    Committed {
        offset: u64,
    },
    /// Data past `offset` was lost (found at reload): later checkpoints
    /// no longer hold.
    Rollback {
        offset: u64,
    },
    Complete,
}

/// Everything the journal says, replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalState {
    pub header: Header,
    pub checkpoints: Vec<Checkpoint>,
    /// The last `committed` offset (0 when none).
    pub committed: u64,
    pub complete: bool,
}

impl JournalState {
    fn cut(&mut self, offset: u64) {
        self.checkpoints.retain(|c| c.end <= offset);
        self.committed = offset;
    }

    /// The offset up to which data is known to be on disk.
    pub fn durable(&self) -> u64 {
        let cp = self.checkpoints.last().map_or(0, |c| c.end);
        cp.max(self.committed)
    }

    /// The last checkpoint at or before `offset`.
    pub fn checkpoint_at_or_before(&self, offset: u64) -> Option<&Checkpoint> {
        self.checkpoints.iter().rev().find(|c| c.end <= offset)
    }
}

/// An open journal, appended to as the transfer goes.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    state: JournalState,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    /// Creates a new journal (fails if one exists) with its header.
    pub fn create(path: &Path, header: Header) -> Result<Journal, JournalError> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        let mut j = Journal {
            path: path.to_owned(),
            file,
            state: JournalState {
                header: header.clone(),
                checkpoints: Vec::new(),
                committed: 0,
                complete: false,
            },
        };
        j.append(&Entry::Header(header))?;
        Ok(j)
    }

    /// Opens and replays an existing journal.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        let corrupt = |message: String| JournalError::Corrupt {
            path: path.to_owned(),
            message,
        };
        let mut reader = BufReader::new(&file);
        let mut state: Option<JournalState> = None;
        let mut good_len = 0u64;
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io(path))?;
            if n == 0 {
                break;
            }
            if !line.ends_with('\n') {
                break; // torn append
            }
            let entry: Entry = match serde_json::from_str(line.trim_end()) {
                Ok(e) => e,
                Err(e) => return Err(corrupt(format!("line after byte {good_len}: {e}"))),
            };
            match (&mut state, entry) {
                (None, Entry::Header(h)) => {
                    state = Some(JournalState {
                        header: h,
                        checkpoints: Vec::new(),
                        committed: 0,
                        complete: false,
                    })
                }
                (None, _) => return Err(corrupt("does not start with a header".into())),
                (Some(_), Entry::Header(_)) => return Err(corrupt("a second header".into())),
                (Some(s), Entry::Checkpoint(c)) => s.checkpoints.push(c),
                (Some(s), Entry::Committed { offset }) => s.committed = offset,
                (Some(s), Entry::Rollback { offset }) => s.cut(offset),
                (Some(s), Entry::Complete) => s.complete = true,
            }
            good_len += n as u64;
        }
        let state = state.ok_or_else(|| corrupt("empty".into()))?;
        if file.metadata().map_err(io(path))?.len() != good_len {
            file.set_len(good_len).map_err(io(path))?;
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            state,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }

    fn append(&mut self, e: &Entry) -> Result<(), JournalError> {
        let mut line = serde_json::to_string(e).expect("journal entries serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Records a checkpoint; the caller has already synced the data.
    pub fn checkpoint(&mut self, end: u64, blake3: String) -> Result<(), JournalError> {
        let c = Checkpoint {
            index: self.state.checkpoints.len() as u64,
            end,
            blake3,
        };
        self.append(&Entry::Checkpoint(c.clone()))?;
        self.state.checkpoints.push(c);
        Ok(())
    }

    /// Records several checkpoints with one fsync (the caller has synced
    /// the data or, on the sending side, had them acknowledged).
    pub fn checkpoint_many(&mut self, list: Vec<(u64, String)>) -> Result<(), JournalError> {
        if list.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        let mut added = Vec::new();
        for (end, blake3) in list {
            let c = Checkpoint {
                index: (self.state.checkpoints.len() + added.len()) as u64,
                end,
                blake3,
            };
            text.push_str(
                &serde_json::to_string(&Entry::Checkpoint(c.clone())).expect("serializes"),
            );
            text.push('\n');
            added.push(c);
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.state.checkpoints.extend(added);
        Ok(())
    }

    /// Records that data up to `offset` is on disk (between checkpoints).
    pub fn commit(&mut self, offset: u64) -> Result<(), JournalError> {
        if offset == self.state.durable() {
            return Ok(());
        }
        self.append(&Entry::Committed { offset })?;
        self.state.committed = offset;
        Ok(())
    }

    /// Records that data past `offset` is gone: later checkpoints are
    /// dropped and `offset` becomes the durable point.
    pub fn rollback(&mut self, offset: u64) -> Result<(), JournalError> {
        self.append(&Entry::Rollback { offset })?;
        self.state.cut(offset);
        Ok(())
    }

    /// Records that the whole file verified.
    pub fn complete(&mut self) -> Result<(), JournalError> {
        self.append(&Entry::Complete)?;
        self.state.complete = true;
        Ok(())
    }
}

/// Reads only the header of the journal at `path`, without writing to it
/// (a journal being appended to is never cut by a reader).
pub fn read_header(path: &Path) -> Result<Header, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    let mut line = String::new();
    BufReader::new(file)
        .read_line(&mut line)
        .map_err(io(path))?;
    match serde_json::from_str::<Entry>(line.trim_end()) {
        Ok(Entry::Header(h)) => Ok(h),
        Ok(_) => Err(JournalError::Corrupt {
            path: path.to_owned(),
            message: "does not start with a header".into(),
        }),
        Err(e) => Err(JournalError::Corrupt {
            path: path.to_owned(),
            message: format!("header: {e}"),
        }),
    }
}

/// Whether two ends agree on a checkpoint: the one at `end` exists in
/// both and has the same digest.
pub fn agree(a: &JournalState, b_end: u64, b_digest: &str) -> bool {
    a.checkpoints
        .iter()
        .any(|c| c.end == b_end && c.blake3 == b_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            id: "t1".into(),
            source: "/src".into(),
            target: "http://x/files/t1".into(),
            size: 100,
            digest: "ab".repeat(32),
            checkpoint_bytes: 10,
            created_unix: 1,
            expires_unix: 2,
            metadata: String::new(),
        }
    }

    #[test]
    fn replays_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t1.journal");
        let mut j = Journal::create(&p, header()).unwrap();
        j.checkpoint(10, "c0".into()).unwrap();
        j.checkpoint(20, "c1".into()).unwrap();
        j.commit(25).unwrap();
        assert_eq!(j.state().durable(), 25);
        j.checkpoint_many(vec![(30, "c2".into()), (40, "c3".into())])
            .unwrap();
        j.commit(25).unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        let s = j.state();
        assert_eq!(s.header, header());
        assert_eq!(s.checkpoints.len(), 4);
        assert_eq!(s.checkpoints[3].index, 3);
        assert_eq!(s.checkpoints[3].end, 40);
        assert_eq!(s.durable(), 40);
        assert_eq!(s.checkpoint_at_or_before(19).unwrap().end, 10);
        assert!(!s.complete);

        assert!(agree(s, 20, "c1"));
        assert!(!agree(s, 20, "c0"));
        assert!(!agree(s, 30, "c1"));
        let mut j = j;
        j.rollback(12).unwrap();
        assert_eq!(j.state().checkpoints.len(), 1);
        assert_eq!(j.state().durable(), 12);
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.state().durable(), 12);
        assert!(Journal::create(&p, header()).is_err(), "create_new");
        assert_eq!(read_header(&p).unwrap(), header());
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t1.journal");
        let mut j = Journal::create(&p, header()).unwrap();
        j.checkpoint(10, "c0".into()).unwrap();
        drop(j);
        let good = std::fs::metadata(&p).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"kind\":\"checkpoint\",\"ind").unwrap();
        drop(f);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(j.state().durable(), 10);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good);
        j.complete().unwrap();
        assert!(Journal::open(&p).unwrap().state().complete);
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.journal");
        std::fs::write(&p, "{\"kind\":\"complete\"}\n").unwrap();
        let e = Journal::open(&p).unwrap_err();
        assert!(e.to_string().contains("bad.journal"), "{e}");
        std::fs::write(&p, "not json\n").unwrap();
        assert!(Journal::open(&p).is_err());
        std::fs::write(&p, "").unwrap();
        assert!(Journal::open(&p).is_err());
    }

    #[test]
    fn symlinked_journals_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        Journal::create(&real, header()).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(Journal::open(&link).is_err());
    }
}
