//! Capped capture of one output stream of a subtask: a thread drains the
//! pipe to its end (so the command never blocks on a full pipe), keeps the
//! first `cap` bytes in memory and counts every byte it read. The owner
//! holds the [`Reader`]; the [`Drain`] runs on the subtask's I/O thread
//! (stdout) or a thread of its own (stderr).
//!
//! **Spill** (stdout, with a [`Spill`]): once the stream is longer than
//! `cap`, everything from its first byte up to `Spill::max` bytes is also
//! written to `Spill::path` (created fresh), so an output far larger than
//! what a completion carries inline reaches the controller whole
//! (uploaded, see [`crate::grid`]) without being held in memory. Bytes
//! past `max` are counted, not kept. A spill file that cannot be written
//! is removed and the stream is captured as without one (logged).

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    total: u64,
    done: bool,
    /// The spill file, complete, once the drain ended with one.
    spilled: Option<PathBuf>,
}

/// Where a long stream goes: see the module header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spill {
    pub path: PathBuf,
    /// Most bytes written to it.
    pub max: u64,
}

/// What a reader thread collected.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Captured {
    /// The first `cap` bytes.
    pub bytes: Vec<u8>,
    /// Every byte read, before capping.
    pub size: u64,
    /// False when the pipe was still open at the end of the grace period (a
    /// process that escaped the subtask's process group and cgroup holds it).
    pub complete: bool,
    /// The spill file holding the stream's first `min(size, Spill::max)`
    /// bytes, when it was longer than `cap` (and the stream ended).
    pub spilled: Option<PathBuf>,
}

/// The owner's end of one stream's capture: [`Reader::finish`] collects it.
pub(super) struct Reader {
    shared: Arc<(Mutex<State>, Condvar)>,
}

/// The reading end: [`Drain::run`] reads a source to its end into the
/// shared buffer. Dropped without running (the command never started, or
/// no thread could be made for it), it marks the stream ended and empty.
pub(super) struct Drain {
    shared: Arc<(Mutex<State>, Condvar)>,
    cap: usize,
    spill: Option<Spill>,
    /// The open spill file and the bytes written to it.
    file: Option<(File, u64)>,
}

/// A connected [`Reader`] and [`Drain`] keeping the first `cap` bytes (and
/// spilling past them to `spill`, when given).
pub(super) fn pair(cap: usize, spill: Option<Spill>) -> (Reader, Drain) {
    let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
    (
        Reader {
            shared: Arc::clone(&shared),
        },
        Drain {
            shared,
            cap,
            spill,
            file: None,
        },
    )
}

impl Drain {
    /// Reads `src` to its end (or a read error), then marks the stream ended.
    pub(super) fn run<R: Read>(mut self, mut src: R) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A read error ends the stream like EOF; nothing else to report.
                Err(_) => break,
            };
            let mut st = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
            let room = self.cap.saturating_sub(st.buf.len()).min(n);
            st.buf.extend_from_slice(&chunk[..room]);
            st.total += n as u64;
            let over = st.total > self.cap as u64;
            if over && self.file.is_none() && self.spill.is_some() {
                // The first `cap` bytes are in `buf`; the rest of this
                // chunk follows them in the file.
                let head = st.buf.clone();
                drop(st);
                self.open_spill(&head);
                self.write_spill(&chunk[room..n]);
            } else {
                drop(st);
                if self.file.is_some() {
                    self.write_spill(&chunk[..n]);
                }
            }
        }
        // Drop marks the end.
    }

    fn open_spill(&mut self, head: &[u8]) {
        let Some(spill) = &self.spill else { return };
        match File::create(&spill.path) {
            Ok(f) => {
                self.file = Some((f, 0));
                self.write_spill(head);
            }
            Err(e) => {
                tracing::warn!(path = %spill.path.display(), error = %e,
                    "cannot spill a long output to a file; it is cut at the inline cap");
                self.spill = None;
            }
        }
    }

    /// Appends to the spill file up to `Spill::max`; a write error drops it.
    fn write_spill(&mut self, data: &[u8]) {
        let (Some(spill), Some((f, written))) = (&self.spill, &mut self.file) else {
            return;
        };
        let room = spill.max.saturating_sub(*written);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 {
            return;
        }
        match f.write_all(&data[..take]) {
            Ok(()) => *written += take as u64,
            Err(e) => {
                tracing::warn!(path = %spill.path.display(), error = %e,
                    "cannot write a long output's spill file; it is cut at the inline cap");
                let _ = std::fs::remove_file(&spill.path);
                self.file = None;
                self.spill = None;
            }
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let spilled = match (self.file.take(), &self.spill) {
            (Some((f, _)), Some(spill)) => match f.sync_data() {
                Ok(()) => Some(spill.path.clone()),
                Err(e) => {
                    tracing::warn!(path = %spill.path.display(), error = %e,
                        "cannot write a long output's spill file; it is cut at the inline cap");
                    let _ = std::fs::remove_file(&spill.path);
                    None
                }
            },
            _ => None,
        };
        let mut st = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.done = true;
        st.spilled = spilled;
        self.shared.1.notify_all();
    }
}

impl Reader {
    /// Waits up to `grace` for the end of the stream, then takes what was
    /// read. A reader still blocked is left to finish on its own.
    pub(super) fn finish(self, grace: Duration) -> Captured {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + grace;
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !st.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = cv
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Captured {
            bytes: std::mem::take(&mut st.buf),
            size: st.total,
            complete: st.done,
            spilled: st.spilled.take(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader whose drain runs on a thread of its own.
    fn spawn<R: Read + Send + 'static>(src: R, cap: usize) -> Reader {
        let (r, d) = pair(cap, None);
        std::thread::spawn(move || d.run(src));
        r
    }

    #[test]
    fn keeps_the_first_cap_bytes_and_counts_all() {
        let data = vec![7u8; 200_000];
        let r = spawn(std::io::Cursor::new(data), 1000);
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(c.bytes.len(), 1000);
        assert_eq!(c.size, 200_000);
        assert!(c.complete);
    }

    #[test]
    fn a_drain_dropped_unrun_ends_the_stream_empty() {
        let (r, d) = pair(10, None);
        drop(d);
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(
            c,
            Captured {
                bytes: Vec::new(),
                size: 0,
                complete: true,
                spilled: None,
            }
        );
    }

    #[test]
    fn a_long_stream_spills_whole_up_to_max_and_keeps_cap_in_memory() {
        let t = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let path = t.path().join("out");
        let (r, d) = pair(
            1000,
            Some(Spill {
                path: path.clone(),
                max: 1 << 20,
            }),
        );
        let src = data.clone();
        std::thread::spawn(move || d.run(std::io::Cursor::new(src)));
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(c.bytes, &data[..1000]);
        assert_eq!(c.size, data.len() as u64);
        assert_eq!(c.spilled.as_deref(), Some(path.as_path()));
        assert_eq!(std::fs::read(&path).unwrap(), data);

        // Over max: the file holds the first max bytes, all are counted.
        let (r, d) = pair(
            10,
            Some(Spill {
                path: path.clone(),
                max: 5000,
            }),
        );
        let src = data.clone();
        std::thread::spawn(move || d.run(std::io::Cursor::new(src)));
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(c.size, data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), &data[..5000]);
    }

    #[test]
    fn a_short_stream_makes_no_spill_file_and_an_unwritable_one_is_dropped() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("out");
        let (r, d) = pair(
            100,
            Some(Spill {
                path: path.clone(),
                max: 1000,
            }),
        );
        std::thread::spawn(move || d.run(std::io::Cursor::new(vec![1u8; 100])));
        let c = r.finish(Duration::from_secs(10));
        assert_eq!((c.bytes.len(), c.spilled), (100, None));
        assert!(!path.exists());
        let bad = t.path().join("no-such-dir").join("out");
        let (r, d) = pair(
            10,
            Some(Spill {
                path: bad,
                max: 1000,
            }),
        );
        std::thread::spawn(move || d.run(std::io::Cursor::new(vec![1u8; 100])));
        let c = r.finish(Duration::from_secs(10));
        assert_eq!((c.bytes.len(), c.size, c.spilled), (10, 100, None));
    }

    #[test]
    fn an_open_pipe_is_left_after_the_grace_period() {
        let (rd, wr) = std::io::pipe().unwrap();
        let r = spawn(rd, 10);
        let c = r.finish(Duration::from_millis(50));
        assert!(!c.complete);
        drop(wr);
    }
}
