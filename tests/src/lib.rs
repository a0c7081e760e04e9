//! End-to-end test harness: runs the real `sparegrid-agent` binary against
//! the real kernel (cgroups, procfs) and, for the `libvirtd_` tests, a real
//! libvirtd with QEMU.
//!
//! What it owns:
//!
//! - finding the agent binary ([`agent_bin`]);
//! - a per-test scratch directory with a free loopback port ([`Harness`]),
//!   kept (and its path printed) when the test fails;
//! - config files built from sections ([`Conf`]), checked with the agent's
//!   own parser before the agent sees them;
//! - the running agent ([`Agent`]): its log captured to a file, `status()`
//!   over HTTP, [`Agent::wait_for`] that polls status every 50 ms and fails
//!   with the last status and the log tail, signals, and a `Drop` that
//!   SIGTERMs (SIGKILL after a timeout) and prints the log when the test
//!   panicked;
//! - customer load outside the grid partition ([`CustomerLoad`]);
//! - cgroup partition inspection and clean-up, libvirt (`virsh`) helpers;
//! - the skip rules: `root_` tests need root, `libvirtd_` tests also need
//!   `SPAREGRID_LIBVIRTD=1`.
//!
//! Helpers that a test calls to make progress panic with a full explanation
//! instead of returning errors: a failing end-to-end test is only useful if
//! it says what the agent saw and logged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sparegrid_proto::{AgentStatus, GridVmStatus, Reason, Transition, VmState};

pub mod controller;

/// How often [`Agent::wait_for`] polls status.
pub const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Environment and skip rules

/// The agent binary: `$SPAREGRID_AGENT_BIN`, else `sparegrid-agent` in the
/// cargo target directory this test executable was built into
/// (`target/debug/deps/<test>` → `target/debug/sparegrid-agent`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SPAREGRID_AGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SPAREGRID_AGENT_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    let candidates = [
        dir.parent().map(|d| d.join("sparegrid-agent")),
        Some(dir.join("sparegrid-agent")),
    ];
    for c in candidates.into_iter().flatten() {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "sparegrid-agent binary not found next to {} (looked in {}/..); \
         run `cargo build -p sparegrid-agent` first (the Makefile builds the \
         workspace before testing) or set SPAREGRID_AGENT_BIN",
        exe.display(),
        dir.display()
    );
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True (after printing why) when a `root_` test must be skipped.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP {test}: needs root (cgroups); run as root or via `make test`");
    true
}

/// True (after printing why) when a `libvirtd_` test must be skipped.
pub fn skip_unless_libvirtd(test: &str) -> bool {
    if skip_unless_root(test) {
        return true;
    }
    if std::env::var("SPAREGRID_LIBVIRTD").as_deref() != Ok("1") {
        eprintln!(
            "SKIP {test}: needs a real libvirtd with QEMU; set SPAREGRID_LIBVIRTD=1 \
             (`make test` does when libvirtd runs)"
        );
        return true;
    }
    false
}

/// Holds the machine for one end-to-end test. Tests that run grid VMs or
/// customer load cannot share the host: one test's grid VM is the other
/// agent's customer load. `cargo test` runs tests of one binary in threads
/// (the Makefile uses two), nextest runs them in processes, so this is an
/// `flock` on a file in the temporary directory, which serialises both.
pub struct Exclusive {
    _file: fs::File,
}

/// Takes the machine-wide test lock (waits for the test holding it).
pub fn exclusive(test: &str) -> Exclusive {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("sparegrid-e2e.lock");
    // flock works on a read-only descriptor too: another user's lock file
    // (root's, from an earlier run) is opened read-only.
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .or_else(|_| fs::File::open(&path))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let fd = file.as_raw_fd();
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("{test}: waiting for another end-to-end test to finish");
        loop {
            // SAFETY: as above; blocks until the other holder closes its file.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::Interrupted,
                "flock {}: {err}",
                path.display()
            );
        }
    }
    Exclusive { _file: file }
}

/// Number of online CPUs (what /proc/stat's busy fraction is measured against).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A name unique to this test process and call: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Milliseconds since the Unix epoch (what transitions' `at_unix_ms` uses).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------
// Config files

/// A TOML config built section by section. Values are TOML literals
/// (`"\"1s\""`, `"0.6"`); use [`Conf::str`] for strings.
#[derive(Debug, Clone, Default)]
pub struct Conf {
    sections: BTreeMap<String, BTreeMap<String, String>>,
}

/// A TOML string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Conf {
    pub fn new() -> Conf {
        Conf::default()
    }

    /// Sets `key = value` (a TOML literal) in `[section]`.
    pub fn set(&mut self, section: &str, key: &str, value: impl ToString) -> &mut Conf {
        self.sections
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Only the CPU metric counts (weight 1, every other metric 0), so a
    /// test's outcome does not depend on the machine's disk, memory or
    /// 1-minute load average.
    pub fn cpu_only_load(&mut self) -> &mut Conf {
        for m in sparegrid_proto::Metric::ALL {
            let w = if m == sparegrid_proto::Metric::Cpu {
                "1.0"
            } else {
                "0.0"
            };
            self.set("load.weights", m.as_str(), w);
        }
        self
    }

    /// Sets a string value.
    pub fn str(&mut self, section: &str, key: &str, value: &str) -> &mut Conf {
        self.set(section, key, toml_str(value))
    }

    /// Sets a path value.
    pub fn path(&mut self, section: &str, key: &str, value: &Path) -> &mut Conf {
        self.str(section, key, &value.display().to_string())
    }

    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections.get(section)?.get(key).map(String::as_str)
    }

    /// A string value, unquoted.
    pub fn get_str(&self, section: &str, key: &str) -> Option<String> {
        let v = self.get(section, key)?;
        Some(v.trim_matches('"').to_string())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            let _ = writeln!(out, "[{section}]");
            for (k, v) in keys {
                let _ = writeln!(out, "{k} = {v}");
            }
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Harness: scratch directory, port, agent start-up

/// One test's scratch directory and loopback port. Kept on disk when the
/// test panics, so the agent logs can be read afterwards.
pub struct Harness {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub addr: SocketAddr,
    starts: u32,
    /// Grid partitions to remove (with anything left inside) on drop.
    partitions: Vec<(PathBuf, String)>,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("sparegrid-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        // libvirt's QEMU may run as another user (or root without
        // CAP_DAC_OVERRIDE): let it traverse the directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
        let path = dir.path().to_path_buf();
        Harness {
            dir: Some(dir),
            path,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            starts: 0,
            partitions: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A path inside the scratch directory, created as a directory (0755).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).expect("create a scratch subdirectory");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    /// The config file every agent of this harness reads.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("agent.toml")
    }

    /// The `[agent]` basics: listen on this harness's port, run and data
    /// directories in the scratch directory.
    pub fn base_conf(&self) -> Conf {
        let mut c = Conf::new();
        c.str("agent", "listen", &self.addr.to_string());
        c.path("agent", "run_dir", &self.subdir("run"));
        c.path("agent", "data_dir", &self.subdir("data"));
        c
    }

    /// Removes `partition` (killing what is left inside) when the harness is
    /// dropped, whatever the agent did.
    pub fn cleanup_partition_on_drop(&mut self, cgroup_root: &Path, partition: &str) {
        self.partitions
            .push((cgroup_root.to_path_buf(), partition.to_string()));
    }

    /// Writes the config (checked with the agent's own parser first).
    pub fn write_config(&self, conf: &Conf) -> PathBuf {
        let text = conf.render();
        if let Err(e) = sparegrid_agent::config::Config::parse(&text) {
            panic!("test bug: the test config is invalid: {e}\n{text}");
        }
        self.write_raw_config(&text)
    }

    /// Writes config text as it is (for broken configs).
    pub fn write_raw_config(&self, text: &str) -> PathBuf {
        let path = self.config_path();
        // Write and rename, so a SIGHUP never reads half a file.
        let tmp = self.path.join(".agent.toml.tmp");
        fs::write(&tmp, text).expect("write config");
        fs::rename(&tmp, &path).expect("rename config");
        path
    }

    /// Writes the config and starts an agent on it; returns once
    /// `/v1/status` answers.
    pub fn start(&mut self, conf: &Conf) -> Agent {
        self.write_config(conf);
        self.start_on_current_config()
    }

    /// Starts an agent on the config file as it is now.
    pub fn start_on_current_config(&mut self) -> Agent {
        self.starts += 1;
        let log = self.path.join(format!("agent-{}.log", self.starts));
        let mut agent = Agent::spawn(&self.config_path(), &log, self.addr)
            .unwrap_or_else(|e| panic!("cannot start the agent: {e:#}"));
        if let Err(e) = agent.wait_ready(Duration::from_secs(20)) {
            let tail = agent.log_tail(60);
            panic!("the agent did not come up: {e:#}\n--- agent log ---\n{tail}");
        }
        agent
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for (root, partition) in &self.partitions {
            if let Err(e) = remove_partition(root, partition) {
                eprintln!("harness: cleaning up cgroup partition {partition}: {e:#}");
            }
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "harness: test failed; scratch directory kept at {}",
                    kept.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The agent process

/// `cmd` (the agent binary, or a wrapper that execs it) with
/// `--config <config> run`, info logs without colour, no systemd
/// variables inherited, stdout and stderr going to `log` (created).
pub fn agent_command(mut cmd: Command, config: &Path, log: &Path) -> Result<Command> {
    let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("SPAREGRID_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Ok(cmd)
}

/// `sparegrid-agent` run with `nsenter --net` in the network namespace
/// `/run/netns/<ns>` (nsenter execs the agent, so the child is the agent),
/// for the multi-host netns tests. Dropping it SIGTERMs it (SIGKILL after
/// 15 s) and prints its log tail when the test panicked.
pub struct NsAgentProcess {
    pub host: String,
    child: Child,
    log: PathBuf,
}

impl NsAgentProcess {
    /// Starts the agent `host` in `ns` with `config`, logging to `log`.
    /// Panics when it cannot be spawned (a test set-up failure).
    pub fn spawn(host: &str, ns: &str, config: &Path, log: &Path) -> NsAgentProcess {
        let mut nsenter = Command::new("nsenter");
        nsenter
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(agent_bin());
        let child = agent_command(nsenter, config, log)
            .and_then(|mut c| Ok(c.spawn()?))
            .unwrap_or_else(|e| panic!("spawn the agent {host} in {ns}: {e}"));
        NsAgentProcess {
            host: host.to_owned(),
            child,
            log: log.to_path_buf(),
        }
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Panics with the log tail when the agent has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "agent {} exited with {st}\n{}",
                self.host,
                self.log_tail(40)
            );
        }
    }
}

impl Drop for NsAgentProcess {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("agent {} ignored SIGTERM; killing it", self.host);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "===== agent {} log tail ({}) =====\n{}\n===== end =====",
                self.host,
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}

/// A running `sparegrid-agent`. Dropping it SIGTERMs it and waits (SIGKILL
/// after 30 s); when the test is panicking it also prints the agent's log.
pub struct Agent {
    child: Option<Child>,
    pid: u32,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    client: reqwest::blocking::Client,
    exit: Option<ExitStatus>,
}

impl Agent {
    /// Spawns `sparegrid-agent --config <config> run` with stdout and stderr
    /// going to `log`.
    pub fn spawn(config: &Path, log: &Path, addr: SocketAddr) -> Result<Agent> {
        let bin = agent_bin();
        let child = agent_command(Command::new(&bin), config, log)?
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Agent {
            pid: child.id(),
            child: Some(child),
            addr,
            log_path: log.to_path_buf(),
            config_path: config.to_path_buf(),
            client,
            exit: None,
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `/v1/status` answers; fails at once if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit()? {
                bail!("the agent exited during start-up with {st}");
            }
            match self.status() {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("no status after {timeout:?}")))
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<AgentStatus> {
        let resp = self
            .client
            .get(self.url("/v1/status"))
            .send()
            .context("GET /v1/status")?;
        let code = resp.status();
        if !code.is_success() {
            bail!(
                "GET /v1/status: HTTP {code}: {}",
                resp.text().unwrap_or_default()
            );
        }
        resp.json::<AgentStatus>()
            .context("GET /v1/status: body is not AgentStatus JSON")
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> String {
        let resp = self
            .client
            .get(self.url("/metrics"))
            .send()
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        resp.text().expect("GET /metrics body")
    }

    fn drain_request(&self, method: reqwest::Method) -> u16 {
        let resp = self
            .client
            .request(method.clone(), self.url("/v1/drain"))
            .send()
            .unwrap_or_else(|e| panic!("{method} /v1/drain: {e}"));
        resp.status().as_u16()
    }

    /// `POST /v1/drain`; returns the HTTP status code.
    pub fn drain(&self) -> u16 {
        self.drain_request(reqwest::Method::POST)
    }

    /// `DELETE /v1/drain`; returns the HTTP status code.
    pub fn undrain(&self) -> u16 {
        self.drain_request(reqwest::Method::DELETE)
    }

    /// Polls status every 50 ms until `pred` returns `Some`. Panics on
    /// timeout or when the agent exits, with the last status and log tail.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&AgentStatus) -> Option<T>,
    ) -> T {
        match self.try_wait_for(what, timeout, pred) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Agent::wait_for`] returning the error instead of panicking.
    pub fn try_wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&AgentStatus) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut last: Option<AgentStatus> = None;
        let mut last_err: Option<anyhow::Error> = None;
        loop {
            if let Some(st) = self.try_exit()? {
                return Err(anyhow!(
                    "while waiting for {what}: the agent exited with {st}\n{}",
                    self.report(last.as_ref())
                ));
            }
            match self.status() {
                Ok(st) => {
                    if let Some(v) = pred(&st) {
                        return Ok(v);
                    }
                    last = Some(st);
                }
                Err(e) => last_err = Some(e),
            }
            if start.elapsed() >= timeout {
                let err = last_err
                    .map(|e| format!("\nlast status error: {e:#}"))
                    .unwrap_or_default();
                return Err(anyhow!(
                    "timed out after {timeout:?} waiting for {what}{err}\n{}",
                    self.report(last.as_ref())
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Checks for `duration` (polling every 50 ms) that `check` holds;
    /// panics with the status and log when it does not.
    pub fn hold(
        &mut self,
        what: &str,
        duration: Duration,
        mut check: impl FnMut(&AgentStatus) -> Result<(), String>,
    ) -> AgentStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.try_exit() {
                panic!(
                    "while checking that {what}: the agent exited with {st}\n{}",
                    self.report(None)
                );
            }
            let st = self
                .status()
                .unwrap_or_else(|e| panic!("while checking that {what}: {e:#}"));
            if let Err(why) = check(&st) {
                panic!(
                    "expected {what} for {duration:?}, but after {:?}: {why}\n{}",
                    start.elapsed(),
                    self.report(Some(&st))
                );
            }
            if start.elapsed() >= duration {
                return st;
            }
            std::thread::sleep(POLL);
        }
    }

    /// The status summary and log tail that failure messages carry.
    pub fn report(&self, status: Option<&AgentStatus>) -> String {
        let status = status
            .cloned()
            .or_else(|| self.status().ok())
            .map_or_else(|| "(no status)".to_string(), |s| summary(&s));
        format!(
            "--- last status ---\n{status}\n--- busiest host processes now (noise?) ---\n{}\n\
             --- agent log tail ({}) ---\n{}",
            busiest_processes(Duration::from_millis(500), 6),
            self.log_path.display(),
            self.log_tail(40)
        )
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until the log contains `needle`; panics on timeout.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?} in the agent log\n{}",
                    self.report(None)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn signal(&self, sig: Signal) {
        if self.exit.is_none() {
            kill(Pid::from_raw(self.pid as i32), sig)
                .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid));
        }
    }

    /// The exit status if the agent has exited (reaps it).
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(st) = self.exit {
            return Ok(Some(st));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let st = child.try_wait().context("waitpid on the agent")?;
        if st.is_some() {
            self.exit = st;
        }
        Ok(st)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Waits for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_exit()? {
                return Ok(st);
            }
            if start.elapsed() >= timeout {
                bail!("the agent did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for the exit; panics if it takes longer than `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(timeout) {
            Ok(st) => st,
            Err(e) => {
                let report = self.report(None);
                let _ = self.kill();
                panic!("after SIGTERM: {e:#}\n{report}");
            }
        }
    }

    /// SIGKILL (no drain) and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                self.exit = child.wait().ok();
            }
        }
        self.exit
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(30)).is_err() {
                eprintln!(
                    "harness: agent {} ignored SIGTERM for 30 s; killing it",
                    self.pid
                );
                let _ = self.kill();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "===== agent log ({}) =====\n{}\n===== end of agent log =====",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Reading status

/// A readable digest of a status: VMs, load, last transitions.
pub fn summary(s: &AgentStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "host {} runtime {} draining {}",
        s.host, s.runtime, s.draining
    );
    match &s.load {
        Some(l) => {
            let _ = write!(
                out,
                "load smoothed {:.3} instant {:.3} dominant {:?};",
                l.smoothed, l.instant, l.dominant
            );
            for m in l.metrics.iter().filter(|m| m.weight > 0.0) {
                let _ = write!(
                    out,
                    " {}: raw {:.3} grid {:.3} norm {:.3}{}",
                    m.metric,
                    m.raw,
                    m.grid,
                    m.normalised,
                    if m.available { "" } else { " (unavailable)" }
                );
            }
            let _ = writeln!(out, "; MemAvailable {} MiB", l.mem_available_bytes >> 20);
        }
        None => out.push_str("load: none yet\n"),
    }
    if s.vms.is_empty() {
        out.push_str("vms: none\n");
    }
    for v in &s.vms {
        let _ = writeln!(
            out,
            "vm {} {} for {} ms, cpu {:.3} s",
            v.name,
            v.state,
            v.in_state_ms,
            v.cpu_time_ns as f64 / 1e9
        );
    }
    let n = s.transitions.len();
    let _ = writeln!(out, "transitions ({n}, last 12):");
    for t in &s.transitions[n.saturating_sub(12)..] {
        let _ = writeln!(
            out,
            "  {} {} {} → {} ({}) load {:.3}",
            t.at_unix_ms, t.vm, t.from, t.to, t.reason, t.load
        );
    }
    out
}

pub fn vm<'a>(s: &'a AgentStatus, name: &str) -> Option<&'a GridVmStatus> {
    s.vms.iter().find(|v| v.name == name)
}

/// The VM named `name` when it is in `state`.
pub fn vm_in<'a>(s: &'a AgentStatus, name: &str, state: VmState) -> Option<&'a GridVmStatus> {
    vm(s, name).filter(|v| v.state == state)
}

/// The latest transition of `vm` into `to`.
pub fn last_transition<'a>(s: &'a AgentStatus, vm: &str, to: VmState) -> Option<&'a Transition> {
    s.transitions
        .iter()
        .rev()
        .find(|t| t.vm == vm && t.to == to)
}

/// The latest transition of `vm` into `to` recorded after `after_ms`.
pub fn transition_after<'a>(
    s: &'a AgentStatus,
    vm: &str,
    to: VmState,
    after_ms: u64,
) -> Option<&'a Transition> {
    s.transitions
        .iter()
        .rev()
        .find(|t| t.vm == vm && t.to == to && t.at_unix_ms >= after_ms)
}

/// Every transition of `vm`, oldest first.
pub fn transitions_of<'a>(s: &'a AgentStatus, vm: &str) -> Vec<&'a Transition> {
    s.transitions.iter().filter(|t| t.vm == vm).collect()
}

/// Story step shared by the end-to-end tests: with customer load already
/// applied at `since_ms`, `vm` must be suspended for cpu_pressure within
/// `suspend_within`, then reclaimed (suspended_too_long) within
/// `reclaim_within` of the load, after `reclaim_after_ms` suspended, give or
/// take `-100 ms .. +slack_ms`.
pub fn expect_suspend_then_reclaim(
    agent: &mut Agent,
    vm: &str,
    since_ms: u64,
    suspend_within: Duration,
    reclaim_within: Duration,
    reclaim_after_ms: u64,
    slack_ms: u64,
) {
    let suspended = agent.wait_for(
        &format!("{vm} to be Suspended again"),
        suspend_within,
        |s| transition_after(s, vm, VmState::Suspended, since_ms).cloned(),
    );
    assert_transition(
        &suspended,
        VmState::Running,
        VmState::Suspended,
        Reason::CpuPressure,
    );
    let reclaimed = agent.wait_for(
        &format!("{vm} to be Reclaimed after {reclaim_after_ms} ms suspended"),
        reclaim_within,
        |s| transition_after(s, vm, VmState::Reclaimed, since_ms).cloned(),
    );
    assert_transition(
        &reclaimed,
        VmState::Suspended,
        VmState::Reclaimed,
        Reason::SuspendedTooLong,
    );
    let held = reclaimed.at_unix_ms - suspended.at_unix_ms;
    assert!(
        (reclaim_after_ms - 100..reclaim_after_ms + slack_ms).contains(&held),
        "reclaimed after {held} ms suspended; reclaim_after is {reclaim_after_ms} ms"
    );
}

/// Asserts a transition's from, to and reason.
pub fn assert_transition(t: &Transition, from: VmState, to: VmState, reason: Reason) {
    assert!(
        t.from == from && t.to == to && t.reason == reason,
        "expected {} {from} → {to} ({reason}), got {} → {} ({})",
        t.vm,
        t.from,
        t.to,
        t.reason
    );
}

/// The value of the Prometheus sample whose line starts with `name{` and
/// carries every label in `labels` (`key="value"`), summed over the lines
/// that match; with no `labels`, an unlabelled `name value` line counts
/// too. None if absent.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("{name}{{");
    let bare = format!("{name} ");
    text.lines()
        .filter(|l| l.starts_with(&prefix) || (labels.is_empty() && l.starts_with(&bare)))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

// ---------------------------------------------------------------------------
// Customer load

/// `n` CPU-bound processes (`sh -c 'while :; do :; done'`) in the test's own
/// cgroups, outside the grid partition. Killed on drop.
pub struct CustomerLoad {
    children: Vec<Child>,
}

impl CustomerLoad {
    pub fn start(n: usize) -> CustomerLoad {
        let children = (0..n)
            .map(|_| {
                Command::new("/bin/sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn a busy loop")
            })
            .collect();
        CustomerLoad { children }
    }

    /// One busy process per online CPU.
    pub fn all_cpus() -> CustomerLoad {
        CustomerLoad::start(online_cpus())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Kills the processes now (same as dropping).
    pub fn stop(self) {}
}

impl Drop for CustomerLoad {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Processes and cgroups

/// utime + stime of a process in clock ticks, and its state letter.
pub fn proc_cpu_ticks(pid: u32) -> Option<(u64, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime, state))
}

fn all_proc_ticks() -> BTreeMap<u32, u64> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_cpu_ticks(pid)?.0)))
        .collect()
}

/// The `n` processes that used the most CPU over `window`, one per line
/// (`%CPU pid command`): tells a noisy box from an agent bug when a
/// load-dependent test fails.
pub fn busiest_processes(window: Duration, n: usize) -> String {
    let a = all_proc_ticks();
    std::thread::sleep(window);
    let b = all_proc_ticks();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut busy: Vec<(f64, u32)> = b
        .iter()
        .filter_map(|(pid, t1)| {
            let d = t1.saturating_sub(*a.get(pid)?);
            (d > 0).then(|| (d as f64 / hz / window.as_secs_f64() * 100.0, *pid))
        })
        .collect();
    busy.sort_by(|x, y| y.0.total_cmp(&x.0));
    let lines: Vec<String> = busy
        .into_iter()
        .take(n)
        .map(|(pct, pid)| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let cmd: String = cmd.trim().chars().take(100).collect();
            format!("{pct:5.1}% {pid} {cmd}")
        })
        .collect();
    if lines.is_empty() {
        "(none)".into()
    } else {
        lines.join("\n")
    }
}

/// True while `/proc/<pid>` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_cpu_ticks(pid), Some((_, s)) if s != 'Z')
}

/// Where the partition lives: `<root>/<partition>` on a unified (v2) root,
/// `<root>/<hierarchy>/<partition>` for every v1 hierarchy (and the hybrid
/// `unified/`) that has it.
///
/// libvirt names its resource partitions `<name>.partition` on disk, so both
/// `<partition>` and `<partition>.partition` are looked for.
pub fn partition_dirs(cgroup_root: &Path, partition: &str) -> Vec<PathBuf> {
    let names = [partition.to_string(), format!("{partition}.partition")];
    let hierarchies: Vec<PathBuf> = if cgroup_root.join("cgroup.controllers").exists() {
        vec![cgroup_root.to_path_buf()]
    } else {
        let Ok(entries) = fs::read_dir(cgroup_root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            // Skip symlinks (cpu,cpuacct → cpu) so a hierarchy counts once.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    let mut dirs: Vec<PathBuf> = hierarchies
        .iter()
        .flat_map(|h| names.iter().map(move |n| h.join(n)))
        .filter(|d| d.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Child cgroups (grid VMs/processes) of the partition in every hierarchy.
pub fn partition_children(cgroup_root: &Path, partition: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in partition_dirs(cgroup_root, partition) {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
    }
    out.sort();
    out
}

fn read_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for f in ["cgroup.procs", "tasks"] {
        if let Ok(s) = fs::read_to_string(dir.join(f)) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Pids in the child cgroup `child` of the partition, from any hierarchy.
pub fn child_pids(cgroup_root: &Path, partition: &str, child: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = partition_dirs(cgroup_root, partition)
        .iter()
        .flat_map(|d| read_pids(&d.join(child)))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Test only: keeps a grid partition at a normal CPU weight (`cpu.shares`
/// 1024 / `cpu.weight` 100, `cpu.idle` 0), rewritten every 250 ms, until
/// dropped. The agent gives its partition the lowest weight and marks it
/// idle, so on a 2-core box where other builds keep both cores busy a TCG
/// guest inside may not even boot within minutes (seen: 90 s without a
/// console line). Tests about what happens *inside* grid VMs use this so
/// their outcome does not depend on the neighbours; the agent's CPU
/// priority itself is tested and benchmarked elsewhere (`agent_libvirt`,
/// `bench-agent`).
pub struct PartitionBoost {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PartitionBoost {
    pub fn start(cgroup_root: &Path, partition: &str) -> PartitionBoost {
        use std::sync::atomic::AtomicBool;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (root, partition) = (cgroup_root.to_path_buf(), partition.to_string());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for d in partition_dirs(&root, &partition) {
                    for (file, value) in [
                        ("cpu.shares", "1024"),
                        ("cpu.weight", "100"),
                        ("cpu.idle", "0"),
                    ] {
                        let f = d.join(file);
                        if f.exists() {
                            let _ = fs::write(&f, value);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        PartitionBoost {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PartitionBoost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Thaws, kills and removes everything under `dir`, children first.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    // Frozen tasks cannot die: thaw first.
    let _ = fs::write(dir.join("freezer.state"), "THAWED");
    let _ = fs::write(dir.join("cgroup.freeze"), "0");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in read_pids(dir) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow!("rmdir {}: {e}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Removes a test's grid partition from every hierarchy, killing anything
/// left inside (frozen processes are thawed first).
pub fn remove_partition(cgroup_root: &Path, partition: &str) -> Result<()> {
    for d in partition_dirs(cgroup_root, partition) {
        remove_cgroup_tree(&d)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// libvirt

pub const LIBVIRT_URI: &str = "qemu:///system";

/// Runs `virsh -c qemu:///system <args>`; returns (success, stdout + stderr).
pub fn try_virsh(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(LIBVIRT_URI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run virsh")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// [`try_virsh`], panicking when virsh cannot run at all.
pub fn virsh(args: &[&str]) -> (bool, String) {
    try_virsh(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `virsh domstate <name>` ("running", "paused", "shut off"), None when the
/// domain does not exist.
pub fn domstate(name: &str) -> Option<String> {
    let (ok, out) = virsh(&["domstate", name]);
    ok.then(|| out.lines().next().unwrap_or("").trim().to_string())
}

/// Every domain libvirt knows (`virsh list --all --name`).
pub fn all_domains() -> Vec<String> {
    let (ok, out) = virsh(&["list", "--all", "--name"]);
    assert!(ok, "virsh list --all failed: {out}");
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Destroys and undefines a domain (with its managed save image); ignores
/// a domain that does not exist.
/// Never panics (it runs in `Drop`).
pub fn remove_domain(name: &str) {
    let _ = try_virsh(&["destroy", name]);
    let _ = try_virsh(&["managedsave-remove", name]);
    let Ok((ok, out)) = try_virsh(&["undefine", name, "--managed-save"]) else {
        return;
    };
    let exists = matches!(try_virsh(&["domstate", name]), Ok((true, _)));
    if !ok && exists {
        if let Ok((false, out2)) = try_virsh(&["undefine", name]) {
            eprintln!("harness: cannot undefine {name}: {out} / {out2}");
        }
    }
}

/// Removes, on drop, every domain whose name starts with one of the
/// prefixes or equals one of the names.
pub struct DomainCleanup {
    pub prefixes: Vec<String>,
    pub names: Vec<String>,
}

impl DomainCleanup {
    pub fn new() -> DomainCleanup {
        DomainCleanup {
            prefixes: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Never panics (it runs in `Drop`).
    pub fn run(&self) {
        let Ok((true, out)) = try_virsh(&["list", "--all", "--name"]) else {
            return;
        };
        for d in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let d = d.to_string();
            if self.names.contains(&d) || self.prefixes.iter().any(|p| d.starts_with(p)) {
                remove_domain(&d);
            }
        }
    }
}

impl Default for DomainCleanup {
    fn default() -> Self {
        DomainCleanup::new()
    }
}

impl Drop for DomainCleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Defines (never starts) a minimal domain without sparegrid metadata.
pub fn define_foreign_domain(dir: &Path, name: &str) {
    let xml = format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>32</memory>\n  \
         <vcpu>1</vcpu>\n  <os><type arch='x86_64'>hvm</type></os>\n  \
         <description>not a sparegrid VM: the agent must leave it alone</description>\n\
         </domain>\n"
    );
    let path = dir.join(format!("{name}.xml"));
    fs::write(&path, xml).expect("write domain XML");
    let (ok, out) = virsh(&["define", &path.display().to_string()]);
    assert!(ok, "virsh define {name} failed: {out}");
}

/// Where `domain`'s console may be logged: files under `dir` (recursively)
/// named after the domain or ending in `.log`, plus (when `xml` is true,
/// one `virsh dumpxml`) every `file='…'`/`path='…'` in the domain XML.
///
/// Polling loops should call this with `xml` only now and then: every
/// `virsh` run is CPU the agent counts as customer load.
pub fn console_candidates(dir: &Path, domain: &str, xml: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    collect_files(dir, &mut files);
    files.retain(|f| {
        let n = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        n.contains(domain) || n.ends_with(".log")
    });
    if xml {
        if let Ok((true, xml)) = try_virsh(&["dumpxml", domain]) {
            for attr in ["file='", "path='", "file=\"", "path=\""] {
                let quote = attr.chars().last().unwrap_or('\'');
                let mut rest = xml.as_str();
                while let Some(i) = rest.find(attr) {
                    rest = &rest[i + attr.len()..];
                    if let Some(end) = rest.find(quote) {
                        files.push(PathBuf::from(&rest[..end]));
                    }
                }
            }
        }
    }
    files.retain(|f| f.is_file());
    files.sort();
    files.dedup();
    files
}

/// The first of `files` whose content contains `needle`.
pub fn file_containing(files: &[PathBuf], needle: &str) -> Option<PathBuf> {
    files
        .iter()
        .find(|f| {
            fs::read(f)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
        })
        .cloned()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                collect_files(&e.path(), out);
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
}

/// The guest image directory: `$SPAREGRID_IMAGE_DIR`, else the agent's
/// default (`/var/lib/sparegrid/images/default`, where `make image` puts
/// it), else the workspace's `workloads/out/default`. None (after printing
/// why) when none has both `vmlinuz` and `initrd.img`; a panic when
/// `$SPAREGRID_IMAGE_DIR` names an incomplete directory.
pub fn image_dir(test: &str) -> Option<PathBuf> {
    let complete = |d: &Path| {
        ["vmlinuz", "initrd.img"]
            .iter()
            .all(|f| d.join(f).is_file())
    };
    let candidates: Vec<PathBuf> = match std::env::var_os("SPAREGRID_IMAGE_DIR") {
        Some(d) => vec![PathBuf::from(d)],
        None => {
            let default = sparegrid_agent::config::VmTemplate::default();
            let mut c: Vec<PathBuf> = default
                .kernel
                .parent()
                .map(Path::to_path_buf)
                .into_iter()
                .collect();
            c.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/out/default"));
            c
        }
    };
    if let Some(d) = candidates.iter().find(|d| complete(d)) {
        return Some(d.canonicalize().unwrap_or_else(|_| d.clone()));
    }
    // Asked for explicitly (as `make test` does): a missing image is a failure.
    assert!(
        std::env::var_os("SPAREGRID_IMAGE_DIR").is_none(),
        "{test}: SPAREGRID_IMAGE_DIR={:?} lacks vmlinuz or initrd.img; run `make image`",
        candidates
    );
    eprintln!(
        "SKIP {test}: no guest image (vmlinuz + initrd.img) in {:?}; run `make image` \
         or set SPAREGRID_IMAGE_DIR",
        candidates
    );
    None
}

// ---------------------------------------------------------------------------
// Small helpers

/// Sleeps while asserting nothing: for readability in tests.
pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Duration shorthand.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_renders_sections_and_quotes_strings() {
        let mut c = Conf::new();
        c.str("agent", "listen", "127.0.0.1:1")
            .set("policy", "suspend_above", 0.6)
            .str("policy", "resume_after", "2s")
            .set("load.weights", "cpu", "1.0");
        let text = c.render();
        assert!(
            text.contains("[agent]\nlisten = \"127.0.0.1:1\"\n"),
            "{text}"
        );
        assert!(text.contains("[load.weights]\ncpu = 1.0\n"), "{text}");
        assert!(text.contains("resume_after = \"2s\""), "{text}");
        assert_eq!(c.get_str("policy", "resume_after").as_deref(), Some("2s"));
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn metric_value_matches_labels() {
        let text = "# TYPE x counter\n\
            sparegrid_transitions_total{from=\"running\",to=\"suspended\",reason=\"cpu_pressure\"} 2\n\
            sparegrid_transitions_total{from=\"launching\",to=\"running\",reason=\"started\"} 1\n";
        assert_eq!(
            metric_value(
                text,
                "sparegrid_transitions_total",
                &[("reason", "cpu_pressure")]
            ),
            Some(2.0)
        );
        assert_eq!(
            metric_value(text, "sparegrid_transitions_total", &[]),
            Some(3.0)
        );
        assert_eq!(
            metric_value(text, "sparegrid_transitions_total", &[("reason", "drain")]),
            None
        );
    }

    #[test]
    fn proc_stat_of_self_parses() {
        let (ticks, state) = proc_cpu_ticks(std::process::id()).expect("own /proc stat");
        assert!(state == 'R' || state == 'S', "{state}");
        let _ = ticks;
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique("x"), unique("x"));
    }
}
