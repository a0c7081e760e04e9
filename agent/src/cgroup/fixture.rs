//! Test support (compiled only for tests): fixture cgroup trees in tempdirs
//! with the control files a kernel would create, and helpers for the
//! root-only tests that run against the real `/sys/fs/cgroup`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Partition;

const V2_CPU_STAT: &str = include_str!("testdata/v2-cpu.stat");
const V1_CPU_STAT: &str = include_str!("testdata/v1-cpu.stat");
const PSI: &str = include_str!("testdata/cpu.pressure");
const EVENTS: &str = include_str!("testdata/v2-cgroup.events");

/// A fixture cgroup root in a tempdir, removed on drop.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// (directory name under root, controllers it carries); "unified" is v2.
    mounts: Vec<(String, Vec<&'static str>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum V1Layout {
    /// cpu/, cpuacct/, memory/, freezer/ as separate mounts.
    Separate,
    /// cpu,cpuacct/ with cpu and cpuacct symlinks, memory/, freezer/.
    CoMounted,
    /// cpu,cpuacct/ without symlinks, memory/, freezer/.
    CoMountedNoLinks,
    /// Separate plus a v2 tree at unified/ (systemd's hybrid layout).
    Hybrid,
    /// cpu/, cpuacct/, memory/ only.
    NoFreezer,
    /// cpu/, cpuacct/, memory/ and unified/.
    HybridNoFreezer,
}

impl Fixture {
    fn new(mounts: Vec<(String, Vec<&'static str>)>) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        // Canonical, so paths compare equal to the backend's canonical mounts.
        let root = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
        Fixture {
            _dir: dir,
            root,
            mounts,
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `<root>/<rel>` of a v2 tree with a kernel's control files.
    pub(crate) fn v2_group(&self, rel: &str) -> PathBuf {
        let dir = self.root.join(rel);
        write_v2_files(&dir);
        dir
    }

    /// Creates `<mount>/<rel>` in every hierarchy of a v1 tree with the
    /// control files each controller's kernel code would create.
    pub(crate) fn v1_group(&self, rel: &str) -> PathBuf {
        for (mount, controllers) in &self.mounts {
            let dir = self.root.join(mount).join(rel);
            if mount == "unified" {
                write_v2_files(&dir);
                continue;
            }
            std::fs::create_dir_all(&dir).unwrap();
            let mut files: Vec<(&str, &str)> = vec![("cgroup.procs", ""), ("tasks", "")];
            for c in controllers {
                match *c {
                    "cpu" => files.extend([
                        ("cpu.shares", "1024\n"),
                        ("cpu.idle", "0\n"),
                        ("cpu.stat", V1_CPU_STAT),
                    ]),
                    "cpuacct" => files.push(("cpuacct.usage", "0\n")),
                    "memory" => files.extend([
                        ("memory.limit_in_bytes", "9223372036854771712\n"),
                        ("memory.usage_in_bytes", "1048576\n"),
                        ("memory.use_hierarchy", "1\n"),
                    ]),
                    "freezer" => files.push(("freezer.state", "THAWED\n")),
                    other => panic!("fixture: unknown controller {other}"),
                }
            }
            for (f, content) in files {
                std::fs::write(dir.join(f), content).unwrap();
            }
        }
        self.root.join(&self.mounts[0].0).join(rel)
    }
}

fn write_v2_files(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (f, content) in [
        ("cgroup.controllers", "cpu memory\n"),
        ("cgroup.subtree_control", ""),
        ("cgroup.procs", ""),
        ("cgroup.freeze", "0\n"),
        ("cgroup.events", EVENTS),
        ("cgroup.kill", ""),
        ("cpu.weight", "100\n"),
        ("cpu.idle", "0\n"),
        ("cpu.stat", V2_CPU_STAT),
        ("cpu.pressure", PSI),
        ("memory.max", "max\n"),
        ("memory.current", "123456789\n"),
    ] {
        std::fs::write(dir.join(f), content).unwrap();
    }
}

/// A unified (v2) root: the root's own files, no groups yet.
pub(crate) fn v2_tree() -> Fixture {
    let fx = Fixture::new(Vec::new());
    for (f, content) in [
        ("cgroup.controllers", "cpuset cpu io memory pids\n"),
        ("cgroup.subtree_control", ""),
        ("cgroup.procs", ""),
        ("cpu.stat", V2_CPU_STAT),
        ("cpu.pressure", PSI),
    ] {
        std::fs::write(fx.root.join(f), content).unwrap();
    }
    fx
}

/// A v1 root (a tmpfs with one directory per mount), no groups yet.
pub(crate) fn v1_tree(layout: V1Layout) -> Fixture {
    let m = |n: &str, c: Vec<&'static str>| (n.to_string(), c);
    let separate = || {
        vec![
            m("cpu", vec!["cpu"]),
            m("cpuacct", vec!["cpuacct"]),
            m("memory", vec!["memory"]),
            m("freezer", vec!["freezer"]),
        ]
    };
    let co = || {
        vec![
            m("cpu,cpuacct", vec!["cpu", "cpuacct"]),
            m("memory", vec!["memory"]),
            m("freezer", vec!["freezer"]),
        ]
    };
    let mounts = match layout {
        V1Layout::Separate => separate(),
        V1Layout::CoMounted | V1Layout::CoMountedNoLinks => co(),
        V1Layout::Hybrid => {
            let mut v = separate();
            v.push(m("unified", vec![]));
            v
        }
        V1Layout::NoFreezer => separate().into_iter().take(3).collect(),
        V1Layout::HybridNoFreezer => {
            let mut v: Vec<_> = separate().into_iter().take(3).collect();
            v.push(m("unified", vec![]));
            v
        }
    };
    let fx = Fixture::new(mounts);
    for (name, _) in &fx.mounts {
        let dir = fx.root.join(name);
        std::fs::create_dir(&dir).unwrap();
        if name == "unified" {
            std::fs::write(dir.join("cgroup.controllers"), "hugetlb\n").unwrap();
            std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        }
    }
    // A decoy mount that must not be mistaken for cpu.
    std::fs::create_dir(fx.root.join("cpuset")).unwrap();
    if layout == V1Layout::CoMounted {
        std::os::unix::fs::symlink("cpu,cpuacct", fx.root.join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", fx.root.join("cpuacct")).unwrap();
    }
    fx
}

pub(crate) fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The real unified hierarchy: `/sys/fs/cgroup` on a v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub(crate) fn real_v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// A partition name no other test run uses.
pub(crate) fn unique_name(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("sparegrid-test-{tag}-{}-{nanos}", std::process::id())
}

/// Removes a real partition on drop, even after a failed assertion: thaws
/// and kills whatever is left in its children, removes them, then itself.
pub(crate) struct Cleanup<'a> {
    p: &'a dyn Partition,
}

impl<'a> Cleanup<'a> {
    pub(crate) fn new(p: &'a dyn Partition) -> Cleanup<'a> {
        Cleanup { p }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let children: Vec<String> = std::fs::read_dir(self.p.path())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        for c in &children {
            let _ = self.p.set_frozen(c, false);
            for pid in self.p.pids(c).unwrap_or_default() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.p.pids(c).unwrap_or_default().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = self.p.remove_child(c) {
                eprintln!("cleanup: {e}");
            }
        }
        if let Err(e) = self.p.remove() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub(crate) fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a busy grid child may need to get measurable CPU: the partition
/// has the lowest weight, so on a host busy with other work it runs only in
/// the gaps.
pub(crate) const GROW_TIMEOUT: Duration = Duration::from_secs(60);

/// Real-host scenario shared by the v1 and v2 root tests, on a partition
/// that exists: a busy child joins child group `busy` through `add_pid`; its
/// CPU time grows, stays put while frozen, grows after the thaw; then it is
/// killed and the child group removed.
pub(crate) fn busy_child_freeze_thaw_kill(p: &dyn Partition) {
    p.create_child("busy").unwrap();
    let mut child: Child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.add_pid("busy", pid).unwrap();
        assert_eq!(p.pids("busy").unwrap(), vec![pid]);

        let c0 = p.child_cpu_ns("busy").unwrap();
        assert!(
            wait_for(GROW_TIMEOUT, || p.child_cpu_ns("busy").unwrap()
                > c0 + 20_000_000),
            "busy child got no CPU in {GROW_TIMEOUT:?}"
        );
        // The child first: it keeps running, so the partition read after it
        // (which includes it) must be at least as large.
        let child_ns = p.child_cpu_ns("busy").unwrap();
        assert!(p.usage().unwrap().cpu_ns >= child_ns);

        assert!(
            p.set_frozen("busy", true).unwrap(),
            "this host has a freezer"
        );
        // A starved task may take a while to reach the freezer.
        assert!(
            wait_for(GROW_TIMEOUT, || p.frozen("busy").unwrap() == Some(true)),
            "not frozen in {GROW_TIMEOUT:?}"
        );
        let f0 = p.child_cpu_ns("busy").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let f1 = p.child_cpu_ns("busy").unwrap();
        assert_eq!(f0, f1, "CPU time grew while frozen");

        assert!(p.set_frozen("busy", false).unwrap());
        assert!(
            wait_for(GROW_TIMEOUT, || p.child_cpu_ns("busy").unwrap() > f1),
            "no CPU after the thaw"
        );

        if !p.kill_all("busy").unwrap() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
    }));
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(wait_for(Duration::from_secs(5), || p
        .pids("busy")
        .unwrap()
        .is_empty()));
    p.remove_child("busy").unwrap();
    assert!(!p.path().join("busy").exists());
    p.remove_child("busy").unwrap();
}

/// A real grid partition for a root test: the host's default hierarchy
/// (`/sys/fs/cgroup`, v1 or v2) set up with a 256 MiB ceiling. None (after
/// printing why) when not root or the host has no usable hierarchy.
pub(crate) fn real_partition(test: &str, tag: &str) -> Option<super::GridCgroup> {
    if !is_root() {
        eprintln!("skipping {test}: needs root");
        return None;
    }
    let name = unique_name(tag);
    let cgroup = match super::GridCgroup::detect(
        Path::new("/sys/fs/cgroup"),
        &name,
        crate::config::CgroupVersion::Auto,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            return None;
        }
    };
    cgroup
        .as_partition()
        .setup(&super::PartitionLimits {
            memory_max_bytes: 256 << 20,
        })
        .unwrap();
    Some(cgroup)
}

/// A partition on the real unified hierarchy. On a hybrid host the
/// controllers stay with v1, so setup may be refused; the bare directory is
/// then made by hand (freezer, `cpu.stat` and `cgroup.kill` still work).
pub(crate) fn real_unified_partition(test: &str, tag: &str) -> Option<super::GridCgroup> {
    if !is_root() {
        eprintln!("skipping {test}: needs root");
        return None;
    }
    let Some(root) = real_v2_root() else {
        eprintln!("skipping {test}: no cgroup v2");
        return None;
    };
    let p = super::v2::V2Partition::new(&root, &unique_name(tag));
    if let Err(e) = p.setup(&super::PartitionLimits {
        memory_max_bytes: 256 << 20,
    }) {
        eprintln!("setup refused ({e}); using a bare partition directory");
        std::fs::create_dir_all(p.path()).unwrap();
    }
    Some(super::GridCgroup::V2(p))
}
