//! Capped capture of one output stream of a subtask: a reader thread drains
//! the pipe to its end (so the command never blocks on a full pipe), keeps
//! the first `cap` bytes and counts every byte it read.

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

/// One stream's reader thread.
pub(super) struct Reader {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Reader {
    /// Starts a thread named `name` that reads `src` to its end.
    pub(super) fn spawn<R: Read + Send + 'static>(
        name: String,
        mut src: R,
        cap: usize,
    ) -> std::io::Result<Reader> {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new().name(name).spawn(move || {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match src.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // A read error ends the stream like EOF; nothing else to report.
                    Err(_) => break,
                };
                let mut st = theirs.0.lock().unwrap_or_else(PoisonError::into_inner);
                let room = cap.saturating_sub(st.buf.len()).min(n);
                st.buf.extend_from_slice(&chunk[..room]);
                st.total += n as u64;
            }
            let mut st = theirs.0.lock().unwrap_or_else(PoisonError::into_inner);
            st.done = true;
            theirs.1.notify_all();
        })?;
        Ok(Reader { shared })
    }

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

    #[test]
    fn keeps_the_first_cap_bytes_and_counts_all() {
        let data = vec![7u8; 200_000];
        let r = Reader::spawn("t".into(), std::io::Cursor::new(data), 1000).unwrap();
        let c = r.finish(Duration::from_secs(10));
        assert_eq!(c.bytes.len(), 1000);
        assert_eq!(c.size, 200_000);
        assert!(c.complete);
    }

    #[test]
    fn an_open_pipe_is_left_after_the_grace_period() {
        let (rd, wr) = std::io::pipe().unwrap();
        let r = Reader::spawn("t".into(), rd, 10).unwrap();
        let c = r.finish(Duration::from_millis(50));
        assert!(!c.complete);
        drop(wr);
    }
}
