//! Reassembles one output stream of a subtask from the guest's
//! [`Output`](sparegrid_proto::guest::Output) chunks: chunks carry their
//! offset, so a replay after a reconnect may repeat bytes (ignored) but must
//! never skip any (a gap is a protocol error). At most `cap` bytes are kept
//! in memory, whatever the guest sends.
//!
//! **Spill** ([`Assembly::with_spill`], stdout): once the stream is longer
//! than `cap`, everything from its first byte up to the spill's `max` is
//! also written to the spill file, so a large output reaches the
//! controller whole (uploaded by [`crate::grid::outputs`]) without being
//! held in memory. A spill file that cannot be written is removed and the
//! stream is kept as without one (logged).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

/// A chunk that starts after the end of what arrived so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Where the next chunk had to start (bytes received so far).
    pub expected: u64,
    /// Where it started.
    pub got: u64,
}

/// One stream's bytes as they arrive.
#[derive(Debug)]
pub struct Assembly {
    kept: Vec<u8>,
    /// End of the contiguous bytes received (kept or not).
    next: u64,
    cap: u64,
    /// Where bytes past `cap` go, and most bytes written there.
    spill: Option<(PathBuf, u64)>,
    /// The open spill file and the bytes written to it.
    file: Option<(File, u64)>,
}

impl Assembly {
    pub fn new(cap: u64) -> Assembly {
        Assembly {
            kept: Vec::new(),
            next: 0,
            cap,
            spill: None,
            file: None,
        }
    }

    /// An assembly that spills to `path` (up to `max` bytes) once the
    /// stream is longer than `cap`; see the module header.
    pub fn with_spill(cap: u64, path: Option<PathBuf>, max: u64) -> Assembly {
        Assembly {
            kept: Vec::new(),
            next: 0,
            cap,
            spill: path.map(|p| (p, max)),
            file: None,
        }
    }

    /// Bytes received so far: where a replay must start.
    pub fn received(&self) -> u64 {
        self.next
    }

    /// Adds a chunk at `offset`. Bytes before [`Assembly::received`] are
    /// duplicates and skipped; a chunk starting after it is a [`Gap`].
    pub fn add(&mut self, offset: u64, data: &[u8]) -> Result<(), Gap> {
        if offset > self.next {
            return Err(Gap {
                expected: self.next,
                got: offset,
            });
        }
        let end = offset.saturating_add(data.len() as u64);
        if end <= self.next {
            return Ok(());
        }
        // `offset <= next < end`, so the skip is within `data`.
        let fresh = &data[(self.next - offset) as usize..];
        let room = self.cap.saturating_sub(self.kept.len() as u64);
        let take = fresh.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.kept.extend_from_slice(&fresh[..take]);
        self.next = end;
        if self.next > self.cap && self.spill.is_some() {
            if self.file.is_none() {
                self.open_spill();
                self.write_spill(&fresh[take..]);
            } else {
                self.write_spill(fresh);
            }
        }
        Ok(())
    }

    /// Creates the spill file with the kept bytes (the stream's first `cap`).
    fn open_spill(&mut self) {
        let Some((path, _)) = &self.spill else { return };
        match File::create(path) {
            Ok(f) => {
                self.file = Some((f, 0));
                let head = std::mem::take(&mut self.kept);
                self.write_spill(&head);
                self.kept = head;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot spill a long guest output to a file; it is cut at the inline cap");
                self.spill = None;
            }
        }
    }

    fn write_spill(&mut self, data: &[u8]) {
        let (Some((path, max)), Some((f, written))) = (&self.spill, &mut self.file) else {
            return;
        };
        let room = max.saturating_sub(*written);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 {
            return;
        }
        match f.write_all(&data[..take]) {
            Ok(()) => *written += take as u64,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot write a long guest output's spill file; it is cut at the inline cap");
                let _ = std::fs::remove_file(path);
                self.file = None;
                self.spill = None;
            }
        }
    }

    /// The kept bytes, and the spill file when the stream spilled (synced;
    /// removed instead when `keep_spill` is false or it cannot be synced).
    pub fn finish(mut self, keep_spill: bool) -> (Vec<u8>, Option<PathBuf>) {
        let spilled = match (self.file.take(), self.spill.take()) {
            (Some((f, _)), Some((path, _))) => {
                if keep_spill && f.sync_data().is_ok() {
                    Some(path)
                } else {
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
            _ => None,
        };
        (std::mem::take(&mut self.kept), spilled)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.finish(false).0
    }
}

impl Drop for Assembly {
    /// A stream dropped unfinished (the subtask was handed back or
    /// cancelled) leaves no spill file.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            if let Some((path, _)) = &self.spill {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_order_with_duplicates_and_overlaps_assemble_once() {
        let mut a = Assembly::new(100);
        a.add(0, b"hello ").unwrap();
        a.add(0, b"hello ").unwrap(); // a replayed duplicate
        a.add(3, b"lo wor").unwrap(); // overlaps: only "wor" is new
        a.add(9, b"ld").unwrap();
        assert_eq!(a.received(), 11);
        assert_eq!(a.into_bytes(), b"hello world");
    }

    #[test]
    fn a_gap_is_an_error_and_keeps_what_arrived() {
        let mut a = Assembly::new(100);
        a.add(0, b"abc").unwrap();
        assert_eq!(
            a.add(5, b"x"),
            Err(Gap {
                expected: 3,
                got: 5
            })
        );
        assert_eq!(a.received(), 3);
    }

    #[test]
    fn keeps_at_most_cap_bytes_but_counts_all() {
        let mut a = Assembly::new(4);
        a.add(0, b"abc").unwrap();
        a.add(3, b"defgh").unwrap();
        assert_eq!(a.received(), 8);
        assert_eq!(a.into_bytes(), b"abcd");
        let mut a = Assembly::new(0);
        a.add(0, b"abc").unwrap();
        assert_eq!(a.into_bytes(), b"");
    }

    #[test]
    fn a_long_stream_spills_whole_with_replays_and_up_to_max() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("s.out");
        let mut a = Assembly::with_spill(4, Some(path.clone()), 1000);
        a.add(0, b"abc").unwrap();
        assert!(!path.exists(), "not over the cap yet");
        a.add(3, b"defgh").unwrap();
        a.add(0, b"abcdefghij").unwrap(); // a replay: only "ij" is new
        let (kept, spilled) = a.finish(true);
        assert_eq!(kept, b"abcd");
        assert_eq!(spilled.as_deref(), Some(path.as_path()));
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdefghij");

        let mut a = Assembly::with_spill(2, Some(path.clone()), 5);
        a.add(0, b"0123456789").unwrap();
        assert_eq!(a.received(), 10);
        let (_, spilled) = a.finish(true);
        assert_eq!(std::fs::read(spilled.unwrap()).unwrap(), b"01234");

        // Not kept (a failed subtask), or dropped unfinished: no file.
        let mut a = Assembly::with_spill(2, Some(path.clone()), 5);
        a.add(0, b"0123").unwrap();
        assert_eq!(a.finish(false).1, None);
        assert!(!path.exists());
        let mut a = Assembly::with_spill(2, Some(path.clone()), 5);
        a.add(0, b"0123").unwrap();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn an_offset_near_u64_max_does_not_overflow() {
        let mut a = Assembly::new(4);
        assert!(a.add(u64::MAX, b"ab").is_err());
        a.add(0, b"").unwrap();
        assert_eq!(a.received(), 0);
    }
}
