//! Capped capture of one output stream of a subtask: a thread drains the
//! pipe to its end (so the command never blocks on a full pipe), keeps the
//! first `cap` bytes and counts every byte it read. The owner holds the
//! [`Reader`]; the [`Drain`] runs on the subtask's I/O thread (stdout) or a
//! thread of its own (stderr).

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    total: u64,
    done: bool,
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
}

/// A connected [`Reader`] and [`Drain`] keeping the first `cap` bytes.
pub(super) fn pair(cap: usize) -> (Reader, Drain) {
    let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
    (
        Reader {
            shared: Arc::clone(&shared),
        },
        Drain { shared, cap },
    )
}

impl Drain {
    /// Reads `src` to its end (or a read error), then marks the stream ended.
    pub(super) fn run<R: Read>(self, mut src: R) {
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
        }
        // Drop marks the end.
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let mut st = self.shared.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.done = true;
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader whose drain runs on a thread of its own.
    fn spawn<R: Read + Send + 'static>(src: R, cap: usize) -> Reader {
        let (r, d) = pair(cap);
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
        let (r, d) = pair(10);
        drop(d);
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(
            c,
            Captured {
                bytes: Vec::new(),
                size: 0,
                complete: true
            }
        );
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
