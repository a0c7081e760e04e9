//! What the guest tells the host about itself in its Hello: interpreters on
//! the subtask PATH, vCPUs, memory; and the monotonic clock it reports
//! uptime with.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// PATH of every subtask (see [`crate::run`]).
pub const SUBTASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Interpreters the host may ask for, in the order the Hello lists them.
pub const KNOWN_INTERPRETERS: &[&str] = &[
    "sh", "bash", "awk", "python3", "perl", "ruby", "node", "lua", "tclsh",
];

/// The [`KNOWN_INTERPRETERS`] that exist as executable files in a directory
/// of `path` (a PATH-style list).
pub fn interpreters(path: &str) -> Vec<String> {
    KNOWN_INTERPRETERS
        .iter()
        .filter(|name| {
            path.split(':')
                .filter(|d| !d.is_empty())
                .any(|d| is_executable(&Path::new(d).join(name)))
        })
        .map(|s| s.to_string())
        .collect()
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// CPUs this process may run on (what `nproc` prints).
pub fn vcpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// `MemTotal` of a /proc/meminfo text, in MiB.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") | None => Some(n / 1024),
            _ => None,
        }
    })
}

/// The machine's memory in MiB (0 if /proc/meminfo cannot be read).
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_total_mib(&s))
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in milliseconds: does not advance while the VM is paused.
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_interpreters_in_path_order_of_the_known_list() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for (dir, name, mode) in [
            (&a, "awk", 0o755),
            (&b, "sh", 0o755),
            (&b, "perl", 0o644), // not executable
        ] {
            let p = dir.join(name);
            std::fs::write(&p, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::create_dir_all(b.join("python3")).unwrap(); // a directory
        let path = format!("{}::{}", a.display(), b.display());
        assert_eq!(interpreters(&path), vec!["sh", "awk"]);
        assert!(interpreters("").is_empty());
    }

    #[test]
    fn parses_memtotal() {
        let s = "MemFree: 1 kB\nMemTotal:        2048000 kB\n";
        assert_eq!(mem_total_mib(s), Some(2000));
        assert_eq!(mem_total_mib("MemTotal: x kB"), None);
        assert_eq!(mem_total_mib("MemTotal: 5 MB"), None);
        assert_eq!(mem_total_mib(""), None);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = uptime_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(uptime_ms() > a);
    }
}
