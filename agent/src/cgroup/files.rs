//! Control-file plumbing shared by the v1 and v2 backends: read and write
//! (never create) cgroup files with the path in every error, parse the
//! formats the kernel uses (single values, flat-keyed `cpu.stat`, PSI, pid
//! lists), create and remove groups, bounded polling, and the CPU-rate
//! estimate behind `GridUsage::runnable`.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::CgroupError;

/// How long set_frozen waits for the kernel to report a group frozen or
/// thawed. A freeze can stay pending longer: the kernel stops each task the
/// next time it is scheduled, and grid tasks starved by the customers' load
/// may not be for seconds. Those tasks run no user code before they stop,
/// so a pending freeze counts as done (with a warning) rather than an error.
pub(crate) const FREEZE_WAIT: Duration = Duration::from_secs(2);
/// How long remove_child retries a group the kernel still reports busy
/// (tasks that were killed but have not left it yet).
pub(crate) const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// Reads a file that may be missing (an absent controller or kernel
/// feature); PSI files of a cgroup with pressure switched off fail with
/// EOPNOTSUPP, which counts as missing too.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Writes a value to an existing control file in one write(2). Never creates
/// the file: a missing control file is an error naming it.
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let werr = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(werr)?;
    f.write_all(value.as_bytes()).map_err(werr)
}

pub(crate) fn parse_u64(path: &Path, content: &str) -> Result<u64, CgroupError> {
    content.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        content: content.to_string(),
    })
}

pub(crate) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64(path, &read(path)?)
}

/// The value of `key` in a flat-keyed file such as `cpu.stat`.
pub(crate) fn flat_keyed(path: &Path, content: &str, key: &str) -> Result<u64, CgroupError> {
    content
        .lines()
        .find_map(|line| {
            let mut it = line.split_whitespace();
            (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok()))
        })
        .flatten()
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_path_buf(),
            content: content.to_string(),
        })
}

/// `total=` of the `some` line of a PSI file, microseconds.
pub(crate) fn psi_some_total(path: &Path, content: &str) -> Result<u64, CgroupError> {
    content
        .lines()
        .find(|l| l.starts_with("some "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|t| t.strip_prefix("total="))
                .and_then(|v| v.parse().ok())
        })
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_path_buf(),
            content: content.to_string(),
        })
}

/// The pids listed in `cgroup.procs`/`tasks`; 0 (never a real member) is skipped.
pub(crate) fn parse_pids(path: &Path, content: &str) -> Result<Vec<u32>, CgroupError> {
    let mut pids = Vec::new();
    for line in content.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let pid: u32 = line.parse().map_err(|_| CgroupError::Parse {
            path: path.to_path_buf(),
            content: content.to_string(),
        })?;
        if pid != 0 {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The value of `key` in a space-separated "key value" file such as
/// `cgroup.events`; None when the key is absent.
pub(crate) fn keyed_word<'a>(content: &'a str, key: &str) -> Option<&'a str> {
    content.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()).flatten()
    })
}

/// Creates a group directory and its missing parents; an existing one is fine.
pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|e| io_err(path, e))
}

/// Removes a group directory. Already gone is fine; EBUSY (killed tasks that
/// have not left yet) is retried for a bounded time.
pub(crate) fn rmdir(path: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_err(path, e)),
        }
    }
}

/// Calls `check` until it returns `Some`, or gives up after `timeout` and
/// returns `None`. Polls every 2 ms at first, backing off to 50 ms.
pub(crate) fn poll_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, CgroupError>,
) -> Result<Option<T>, CgroupError> {
    let deadline = Instant::now() + timeout;
    let mut step = Duration::from_millis(2);
    loop {
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(step);
        step = (step * 2).min(Duration::from_millis(50));
    }
}

/// Tracks the partition's cumulative CPU time between `usage()` calls and
/// turns it into "CPUs kept busy", the estimate for `GridUsage::runnable`.
#[derive(Debug, Default)]
pub(crate) struct CpuRate {
    last: Mutex<Option<RateState>>,
}

#[derive(Debug, Clone, Copy)]
struct RateState {
    at: Instant,
    cpu_ns: u64,
    rate: f64,
}

/// Windows shorter than this reuse the previous figure (a second caller such
/// as a status request must not shrink the sampler's window to nothing).
const MIN_RATE_WINDOW: Duration = Duration::from_millis(100);

impl CpuRate {
    pub(crate) fn update(&self, cpu_ns: u64) -> f64 {
        self.update_at(cpu_ns, Instant::now())
    }

    pub(crate) fn update_at(&self, cpu_ns: u64, now: Instant) -> f64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.as_mut() {
            None => {
                *last = Some(RateState {
                    at: now,
                    cpu_ns,
                    rate: 0.0,
                });
                0.0
            }
            Some(s) => {
                let dt = now.saturating_duration_since(s.at);
                if dt < MIN_RATE_WINDOW {
                    return s.rate;
                }
                // A counter that went backwards (partition recreated) counts as idle.
                let busy = cpu_ns.saturating_sub(s.cpu_ns);
                s.rate = busy as f64 / dt.as_nanos() as f64;
                s.at = now;
                s.cpu_ns = cpu_ns;
                s.rate
            }
        }
    }
}

/// The outcome of waiting for a freeze or thaw. A freeze still pending after
/// [`FREEZE_WAIT`] counts as done (tasks not yet scheduled stop before they
/// run user code again); a thaw that did not finish is an error.
pub(crate) fn freeze_outcome(
    done: Option<()>,
    frozen: bool,
    path: &Path,
    thawed_name: &str,
) -> Result<bool, CgroupError> {
    if done.is_some() {
        return Ok(true);
    }
    if frozen {
        tracing::warn!(
            path = %path.display(),
            "freeze still pending after {FREEZE_WAIT:?}: tasks not scheduled yet stop before they run again"
        );
        return Ok(true);
    }
    Err(CgroupError::Timeout {
        path: path.to_path_buf(),
        message: format!("not {thawed_name} after {FREEZE_WAIT:?}"),
    })
}

/// Writes `data` to `path` from a forked child before exec: only
/// async-signal-safe calls (open, write, close), no allocation.
pub(crate) fn write_in_child(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and `data` is a valid buffer of its length.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is open and owned here.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(err);
    }
    Ok(())
}

/// Joins a child group in every hierarchy from a forked child before exec,
/// by writing "0" (the writer itself) to each `cgroup.procs` file
/// (`Partition::procs_files`), so none of its work runs outside the group.
pub(crate) fn join_in_child(procs_files: &[std::ffi::CString]) -> std::io::Result<()> {
    for f in procs_files {
        write_in_child(f, b"0")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_CPU_STAT: &str = include_str!("testdata/v2-cpu.stat");
    const V1_CPU_STAT: &str = include_str!("testdata/v1-cpu.stat");
    const PSI: &str = include_str!("testdata/cpu.pressure");
    const EVENTS: &str = include_str!("testdata/v2-cgroup.events");

    #[test]
    fn parses_kernel_samples() {
        let p = Path::new("/x/cpu.stat");
        assert_eq!(
            flat_keyed(p, V2_CPU_STAT, "usage_usec").unwrap(),
            404_046_593
        );
        assert_eq!(flat_keyed(p, V2_CPU_STAT, "nice_usec").unwrap(), 0);
        let err = flat_keyed(p, V1_CPU_STAT, "usage_usec").unwrap_err();
        assert!(err.to_string().contains("/x/cpu.stat"), "{err}");
        assert_eq!(psi_some_total(p, PSI).unwrap(), 11_179_951);
        assert!(psi_some_total(p, "full avg10=0.00 total=5\n").is_err());
        assert_eq!(keyed_word(EVENTS, "frozen"), Some("0"));
        assert_eq!(keyed_word(EVENTS, "populated"), Some("1"));
        assert_eq!(keyed_word("populated 0\n", "frozen"), None);
        assert_eq!(parse_u64(p, "404174355578\n").unwrap(), 404_174_355_578);
        assert!(parse_u64(p, "max\n").is_err());
    }

    #[test]
    fn pid_lists_skip_zero_and_reject_junk() {
        let p = Path::new("/x/cgroup.procs");
        assert_eq!(parse_pids(p, "12\n0\n34\n\n").unwrap(), vec![12, 34]);
        assert_eq!(parse_pids(p, "").unwrap(), Vec::<u32>::new());
        let err = parse_pids(p, "12\nabc\n").unwrap_err();
        assert!(err.to_string().contains("/x/cgroup.procs"), "{err}");
    }

    #[test]
    fn write_never_creates_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cpu.weight");
        let err = write(&missing, "1").unwrap_err();
        assert!(err.is_not_found());
        let msg = err.to_string();
        assert!(msg.contains("cpu.weight") && msg.contains("\"1\""), "{msg}");
        assert!(!missing.exists());
        std::fs::write(&missing, "100\n").unwrap();
        write(&missing, "1").unwrap();
        assert_eq!(std::fs::read_to_string(&missing).unwrap(), "1");
        assert_eq!(read_opt(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn rmdir_tolerates_gone_and_reports_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("g");
        mkdir(&g).unwrap();
        mkdir(&g).unwrap();
        std::fs::write(g.join("f"), "").unwrap();
        let err = rmdir(&g).unwrap_err();
        assert!(err.to_string().contains(&g.display().to_string()), "{err}");
        std::fs::remove_file(g.join("f")).unwrap();
        rmdir(&g).unwrap();
        rmdir(&g).unwrap();
    }

    #[test]
    fn cpu_rate_is_cpus_kept_busy() {
        let r = CpuRate::default();
        let t0 = Instant::now();
        assert_eq!(r.update_at(1_000_000_000, t0), 0.0);
        // 1.5 CPU-seconds over one wall second.
        let rate = r.update_at(2_500_000_000, t0 + Duration::from_secs(1));
        assert!((rate - 1.5).abs() < 1e-9, "{rate}");
        // A short window keeps the last figure and the baseline.
        let again = r.update_at(9_000_000_000, t0 + Duration::from_millis(1010));
        assert_eq!(again, rate);
        // Idle half second.
        let idle = r.update_at(2_500_000_000, t0 + Duration::from_millis(1500));
        assert_eq!(idle, 0.0);
        // A counter reset is idle, not a huge negative or positive rate.
        let reset = r.update_at(0, t0 + Duration::from_secs(2));
        assert_eq!(reset, 0.0);
    }

    #[test]
    fn poll_until_gives_up() {
        let mut n = 0;
        let got = poll_until(Duration::from_millis(30), || {
            n += 1;
            Ok(None::<()>)
        })
        .unwrap();
        assert!(got.is_none());
        assert!(n >= 2);
        let got = poll_until(Duration::from_secs(1), || Ok(Some(7))).unwrap();
        assert_eq!(got, Some(7));
    }
}
