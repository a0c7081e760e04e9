//! Multi-process harness for the controller: a real `sparegrid-controller`
//! process, real `sparegrid-agent` processes joined to it (process runtime,
//! each with its own cgroup partition, port and scratch directory), and the
//! real `sparegrid` CLI binary as the user's client.
//!
//! What it owns:
//!
//! - finding the controller and CLI binaries ([`controller_bin`],
//!   [`cli_bin`]), like [`crate::agent_bin`];
//! - the controller's config file ([`ControllerConf`]), checked with the
//!   controller's own parser before the controller sees it;
//! - the running controller ([`Controller`]): log captured to a file,
//!   readiness, `kill -9` and a restart on the same database, `Drop` that
//!   SIGTERMs (SIGKILL after a timeout) and prints the log tail when the test
//!   panicked;
//! - the CLI ([`Cli`]): runs `sparegrid --controller URL …` with a token and
//!   returns exit code, stdout and stderr; `--json` answers parsed into the
//!   controller's own API types;
//! - a [`Cluster`]: one controller and N agents with per-agent load weights
//!   ([`AgentLoad`]), subtask start markers ([`Cluster::markers`]) that tell
//!   which host started which attempt, and [`Cluster::report`] (hosts view,
//!   controller and agent log tails) for failure messages;
//! - a dedicated uplink for one agent ([`Uplink`], a veth pair) and real
//!   customer traffic on it ([`UplinkLoad`]): a load that singles out one
//!   agent on a machine whose CPU the others share with every build.
//!
//! Tokens: the cluster uses one token per role (`[auth] agent_token`,
//! `submit_tokens`, `admin_tokens`): agents the agent token, the CLI the
//! submit token, `hosts` and the harness's own requests the admin token.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use sparegrid_controller::agents::{HostView, HostsView};
use sparegrid_controller::api::{JobDetail, JobResults, SubmitResponse};

use crate::{free_port, toml_str, unique, Agent, Conf, Harness};

/// The cgroup root the cluster's agents use.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

// ---------------------------------------------------------------------------
// Binaries

/// A workspace binary: `$<env>` if set, else `<name>` in the cargo target
/// directory this test executable was built into.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    for c in [dir.parent().map(|d| d.join(name)), Some(dir.join(name))]
        .into_iter()
        .flatten()
    {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "{name} binary not found next to {} (looked in {}/..); run `cargo build \
         -p sparegrid-controller` first (the Makefile builds the workspace before \
         testing) or set {env}",
        exe.display(),
        dir.display()
    );
}

/// `$SPAREGRID_CONTROLLER_BIN`, else `sparegrid-controller` beside the agent.
pub fn controller_bin() -> PathBuf {
    workspace_bin("sparegrid-controller", "SPAREGRID_CONTROLLER_BIN")
}

/// `$SPAREGRID_CLI_BIN`, else `sparegrid` beside the agent.
pub fn cli_bin() -> PathBuf {
    workspace_bin("sparegrid", "SPAREGRID_CLI_BIN")
}

// ---------------------------------------------------------------------------
// Controller config

/// The bearer tokens of a cluster, one per role.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub agent: String,
    pub submit: String,
    pub admin: String,
}

impl Tokens {
    /// Fresh, distinct tokens.
    pub fn new() -> Tokens {
        Tokens {
            agent: unique("agent-token"),
            submit: unique("submit-token"),
            admin: unique("admin-token"),
        }
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::new()
    }
}

/// `registry.dispatch_below` of [`ControllerConf::cluster`].
pub const DISPATCH_BELOW: f64 = 0.5;
/// `registry.withdraw_above` of [`ControllerConf::cluster`].
pub const WITHDRAW_ABOVE: f64 = 0.8;

/// A controller config: top-level keys plus sections (values are TOML
/// literals, as in [`Conf`]).
#[derive(Debug, Clone, Default)]
pub struct ControllerConf {
    top: BTreeMap<String, String>,
    pub sections: Conf,
}

impl ControllerConf {
    /// Listen on `addr`, store in `db`, fast registry timers for tests, and
    /// the role tokens.
    pub fn cluster(addr: SocketAddr, db: &Path, tokens: &Tokens) -> ControllerConf {
        let mut c = ControllerConf::default();
        c.top("listen", toml_str(&addr.to_string()))
            .top("db_path", toml_str(&db.display().to_string()))
            .top("events_poll", toml_str("100ms"));
        c.sections
            .set("registry", "dispatch_below", DISPATCH_BELOW)
            .set("registry", "withdraw_above", WITHDRAW_ABOVE)
            .str("registry", "withdraw_after", "30s")
            .str("registry", "host_timeout", "10s")
            .str("registry", "heartbeat_interval", "300ms")
            .str("dispatch", "interval", "100ms")
            .str("auth", "agent_token", &tokens.agent)
            .set(
                "auth",
                "submit_tokens",
                format!("[{}]", toml_str(&tokens.submit)),
            )
            .set(
                "auth",
                "admin_tokens",
                format!("[{}]", toml_str(&tokens.admin)),
            );
        c
    }

    /// Sets a top-level key (a TOML literal).
    pub fn top(&mut self, key: &str, value: impl ToString) -> &mut ControllerConf {
        self.top.insert(key.to_string(), value.to_string());
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.top {
            let _ = writeln!(out, "{k} = {v}");
        }
        out.push('\n');
        out.push_str(&self.sections.render());
        out
    }

    /// Writes the config to `path`, checked with the controller's parser.
    pub fn write(&self, path: &Path) {
        let text = self.render();
        let parsed = sparegrid_controller::config::ControllerConfig::parse(&text, path)
            .and_then(|c| c.validate().map(|()| c));
        if let Err(e) = parsed {
            panic!("test bug: the controller config is invalid: {e}\n{text}");
        }
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

// ---------------------------------------------------------------------------
// The controller process

/// A running `sparegrid-controller`. Dropping it SIGTERMs it (SIGKILL after
/// 10 s); when the test is panicking it prints the log tail.
pub struct Controller {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    dir: PathBuf,
    /// Log files, one per start, oldest first.
    pub logs: Vec<PathBuf>,
    admin_token: String,
    http: reqwest::blocking::Client,
}

impl Controller {
    /// Starts the controller on `config_path` (already written) and waits
    /// until it answers `GET /v1/hosts`; logs go to `dir/controller-N.log`.
    pub fn start(
        dir: &Path,
        config_path: &Path,
        addr: SocketAddr,
        admin_token: &str,
    ) -> Controller {
        let mut c = Controller {
            child: None,
            addr,
            config_path: config_path.to_path_buf(),
            dir: dir.to_path_buf(),
            logs: Vec::new(),
            admin_token: admin_token.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        };
        c.spawn();
        c
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spawn(&mut self) {
        let log = self
            .dir
            .join(format!("controller-{}.log", self.logs.len() + 1));
        let out = fs::File::create(&log).expect("create the controller log");
        let err = out.try_clone().expect("dup the log file");
        let bin = controller_bin();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env("SPAREGRID_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.logs.push(log);
        self.child = Some(child);
        if let Err(e) = self.wait_ready(Duration::from_secs(30)) {
            panic!(
                "the controller did not come up: {e:#}\n--- controller log ---\n{}",
                self.log_tail(60)
            );
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                bail!("the controller exited during start-up with {st}");
            }
            match self.get_json::<HostsView>("/v1/hosts") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("no answer after {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `GET <path>` with the admin token, parsed as `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token)
            .send()
            .with_context(|| format!("GET {path}"))?;
        let code = resp.status();
        let body = resp.text().with_context(|| format!("GET {path}: body"))?;
        if !code.is_success() {
            bail!("GET {path}: HTTP {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
    }

    /// `GET /metrics` with the admin token (Prometheus text).
    pub fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.url()))
            .bearer_auth(&self.admin_token)
            .send()
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        resp.text().expect("GET /metrics body")
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// `kill -9` and reap: no drain, no clean close of the store.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the controller again on the same config (and so the same
    /// database and address); a new log file.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running controller");
        self.spawn();
    }

    /// SIGTERM and wait; returns the exit status (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                eprintln!("harness: the controller ignored SIGTERM for {timeout:?}; killing it");
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every start's log, concatenated.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            if i > 0 {
                let _ = writeln!(out, "----- controller restarted ({}) -----", p.display());
            }
            out.push_str(&String::from_utf8_lossy(&fs::read(p).unwrap_or_default()));
        }
        out
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "===== controller log (tail) =====\n{}\n===== end of controller log =====",
                self.log_tail(80)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// The CLI

/// What one `sparegrid` run printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics (with both streams) unless the exit code was 0.
    pub fn ok(self, what: &str) -> CliOutput {
        assert_eq!(
            self.code,
            Some(0),
            "`sparegrid {what}` failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// The `sparegrid` binary pointed at one controller with one token.
#[derive(Debug, Clone)]
pub struct Cli {
    pub url: String,
    pub token: String,
}

impl Cli {
    /// Runs `sparegrid --controller URL --token T <args>`; stdin is empty.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let out = Command::new(cli_bin())
            .arg("--controller")
            .arg(&self.url)
            .args(args)
            .env("SPAREGRID_TOKEN", &self.token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run sparegrid {args:?}: {e}"));
        CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `sparegrid --json <args>`, which must succeed, and parses stdout.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all).ok(&args.join(" "));
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`sparegrid --json {}` printed something that is not the expected JSON: {e}\n{}",
                args.join(" "),
                out.stdout
            )
        })
    }

    /// `sparegrid submit FILE --json` → the new job's id and subtask count.
    pub fn submit(&self, file: &Path) -> SubmitResponse {
        self.json(&["submit", &file.display().to_string()])
    }

    /// `sparegrid status ID --json`.
    pub fn status(&self, id: &str) -> JobDetail {
        self.json(&["status", id])
    }

    /// `sparegrid results ID --json` (with `--partial` when asked).
    pub fn results(&self, id: &str, partial: bool) -> JobResults {
        if partial {
            self.json(&["results", id, "--partial"])
        } else {
            self.json(&["results", id])
        }
    }

    /// `sparegrid hosts --json`.
    pub fn hosts(&self) -> HostsView {
        self.json(&["hosts"])
    }
}

/// The host named `id` in a hosts view.
pub fn host<'a>(v: &'a HostsView, id: &str) -> Option<&'a HostView> {
    v.hosts.iter().find(|h| h.id == id)
}

/// One line per host: id, state, membership, eligible, load, free slots,
/// running.
pub fn hosts_summary(v: &HostsView) -> String {
    let mut out = String::new();
    for h in &v.hosts {
        let _ = writeln!(
            out,
            "  {} {:?}/{:?} eligible={} load={:?} dominant={:?} free={} running={} suspended_ms={}",
            h.id,
            h.state,
            h.membership,
            h.eligible,
            h.load.map(|l| (l * 1000.0).round() / 1000.0),
            h.dominant,
            h.free_slots,
            h.running,
            h.suspended_ms
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Cluster: a controller and its agents

/// What an agent's load factor is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentLoad {
    /// CPU only ([`Conf::cpu_only_load`]): customer CPU load raises it, and
    /// so does every build and test on the machine.
    CpuOnly,
    /// Memory only: blind to CPU, so another test's (or another agent's)
    /// CPU load does not move it. MemAvailable changes slowly, so it stays
    /// low on a machine with memory to spare.
    MemoryOnly,
    /// Network only, counted on this one interface (an [`Uplink`]) against
    /// [`UPLINK_BYTES_PER_SEC`]: only traffic sent through that link moves
    /// it, whatever else the machine does.
    Uplink(String),
}

/// The `sampler.link_bytes_per_sec` of an [`AgentLoad::Uplink`] agent.
pub const UPLINK_BYTES_PER_SEC: u64 = 1_000_000;

/// One agent of a cluster: its host name, cgroup partition and process.
pub struct ClusterAgent {
    pub host: String,
    pub partition: String,
    pub agent: Agent,
    // Dropped after `agent` (field order): removes the partition once the
    // agent has stopped.
    harness: Harness,
}

impl ClusterAgent {
    /// The agent's `agent.data_dir`.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.harness.dir().join("data")
    }
}

impl ClusterAgent {
    pub fn harness(&self) -> &Harness {
        &self.harness
    }
}

/// A controller and its agents, all real processes, in one scratch
/// directory (kept when the test fails).
pub struct Cluster {
    // Field order is drop order: agents stop before the controller.
    pub agents: Vec<ClusterAgent>,
    pub controller: Controller,
    pub tokens: Tokens,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Cluster {
    /// Starts the controller with `conf` adjustments applied to
    /// [`ControllerConf::cluster`].
    pub fn start_controller(adjust: impl FnOnce(&mut ControllerConf)) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sparegrid-cluster-")
            .tempdir()
            .expect("create a temporary directory");
        let path = dir.path().to_path_buf();
        let tokens = Tokens::new();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut conf = ControllerConf::cluster(addr, &path.join("controller.db"), &tokens);
        adjust(&mut conf);
        let config = path.join("controller.toml");
        conf.write(&config);
        let controller = Controller::start(&path, &config, addr, &tokens.admin);
        Cluster {
            agents: Vec::new(),
            controller,
            tokens,
            dir: Some(dir),
            path,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A directory inside the scratch directory, world-writable so subtasks
    /// can leave markers in it.
    pub fn shared_dir(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path.join(name);
        fs::create_dir_all(&p).expect("create a shared directory");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).expect("chmod");
        p
    }

    /// The CLI with the submit token.
    pub fn cli(&self) -> Cli {
        Cli {
            url: self.controller.url(),
            token: self.tokens.submit.clone(),
        }
    }

    /// The CLI with the admin token (`hosts`).
    pub fn admin_cli(&self) -> Cli {
        Cli {
            url: self.controller.url(),
            token: self.tokens.admin.clone(),
        }
    }

    /// The config of a process-runtime agent that runs only pushed subtasks
    /// (no grid VMs of its own), `slots` at a time, with the given load.
    pub fn agent_conf(
        &self,
        h: &Harness,
        host: &str,
        partition: &str,
        slots: u32,
        load: &AgentLoad,
    ) -> Conf {
        let mut c = h.base_conf();
        c.str("agent", "host_name", host)
            .str("sampler", "interval", "100ms")
            .str("load", "combine", "max")
            .str("load", "attack", "0s")
            .str("load", "decay", "500ms");
        let only = |c: &mut Conf, metric: sparegrid_proto::Metric| {
            for m in sparegrid_proto::Metric::ALL {
                c.set(
                    "load.weights",
                    m.as_str(),
                    if m == metric { "1.0" } else { "0.0" },
                );
            }
        };
        match load {
            AgentLoad::CpuOnly => only(&mut c, sparegrid_proto::Metric::Cpu),
            AgentLoad::MemoryOnly => only(&mut c, sparegrid_proto::Metric::Memory),
            AgentLoad::Uplink(interface) => {
                only(&mut c, sparegrid_proto::Metric::Network);
                c.set(
                    "sampler",
                    "interfaces",
                    format!("[{}]", toml_str(interface)),
                )
                .set("sampler", "link_bytes_per_sec", UPLINK_BYTES_PER_SEC);
            }
        }
        c.set("policy", "suspend_above", "0.75")
            .set("policy", "resume_below", "0.5")
            .set("policy", "launch_below", "0.4")
            .set("policy", "max_grid_vms", 0)
            .set("policy", "memory_reserve_mib", 64)
            .str("cgroup", "partition", partition)
            .str("runtime", "kind", "process")
            .str("controller", "url", &self.controller.url())
            .str("controller", "token", &self.tokens.agent)
            .set("controller", "slots", slots);
        c
    }

    /// Starts an agent named `host` (its partition is removed when the
    /// cluster is dropped) and returns its index in [`Cluster::agents`].
    pub fn add_agent(&mut self, host: &str, slots: u32, load: AgentLoad) -> usize {
        self.add_agent_with(host, slots, load, |_| {})
    }

    /// [`Cluster::add_agent`] with `adjust` applied to the
    /// [`Cluster::agent_conf`] first (for example [`grid_vm_conf`], which
    /// makes it a libvirt agent whose subtasks run inside grid VMs).
    pub fn add_agent_with(
        &mut self,
        host: &str,
        slots: u32,
        load: AgentLoad,
        adjust: impl FnOnce(&mut Conf),
    ) -> usize {
        let mut h = Harness::new();
        let partition = unique("sparegrid-cluster");
        h.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
        let mut conf = self.agent_conf(&h, host, &partition, slots, &load);
        adjust(&mut conf);
        let agent = h.start(&conf);
        self.agents.push(ClusterAgent {
            host: host.to_string(),
            partition,
            agent,
            harness: h,
        });
        self.agents.len() - 1
    }

    /// Kills `host`'s agent with SIGKILL (no shutdown, no hand-back) and
    /// reaps it.
    pub fn kill9_agent(&mut self, host: &str) {
        let a = self.agent_mut(host);
        a.agent.signal(nix::sys::signal::Signal::SIGKILL);
        a.agent
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("agent {host} after SIGKILL: {e:#}"));
    }

    /// Starts `host`'s agent again on the same config and data directory.
    pub fn restart_agent(&mut self, host: &str) {
        let a = self.agent_mut(host);
        a.agent = a.harness.start_on_current_config();
    }

    fn agent_mut(&mut self, host: &str) -> &mut ClusterAgent {
        self.agents
            .iter_mut()
            .find(|a| a.host == host)
            .unwrap_or_else(|| panic!("no agent {host} in the cluster"))
    }

    /// The agent running as `host`.
    pub fn agent(&self, host: &str) -> &ClusterAgent {
        self.agents
            .iter()
            .find(|a| a.host == host)
            .unwrap_or_else(|| panic!("no agent {host} in the cluster"))
    }

    /// Polls `sparegrid hosts --json` until `pred` holds; panics with
    /// [`Cluster::report`] after `timeout`.
    pub fn wait_hosts<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&HostsView) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            let v = self.admin_cli().hosts();
            if let Some(t) = pred(&v) {
                return t;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `sparegrid status ID --json` until the job's state is final;
    /// `each` sees every answer (and may panic). Returns the last detail.
    pub fn wait_job_end(
        &self,
        id: &str,
        timeout: Duration,
        mut each: impl FnMut(&JobDetail),
    ) -> JobDetail {
        use sparegrid_controller::store::JobState;
        let start = Instant::now();
        loop {
            let d = self.cli().status(id);
            each(&d);
            if matches!(
                d.job.state,
                JobState::Done | JobState::Failed | JobState::Cancelled
            ) {
                return d;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for job {id} to end; last: {:?}\n{}",
                    d.job.counts,
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Subtask start markers under `dir` (see [`marker_script`]): for each
    /// `(index, epoch)` started, the host whose partition the attempt ran
    /// in (None if no known partition appears in its cgroup file).
    pub fn markers(&self, dir: &Path) -> BTreeMap<(u64, u32), Option<String>> {
        let mut out = BTreeMap::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".start") else {
                continue;
            };
            let Some((i, ep)) = stem.split_once('.') else {
                continue;
            };
            let (Ok(i), Ok(ep)) = (i.parse::<u64>(), ep.parse::<u32>()) else {
                continue;
            };
            let cgroups = fs::read_to_string(e.path()).unwrap_or_default();
            let host = self
                .agents
                .iter()
                .find(|a| cgroups.contains(&format!("/{}/", a.partition)))
                .map(|a| a.host.clone());
            out.insert((i, ep), host);
        }
        out
    }

    /// The hosts view, the controller's log tail and each agent's log tail.
    pub fn report(&self) -> String {
        let hosts = match self.controller.get_json::<HostsView>("/v1/hosts") {
            Ok(v) => hosts_summary(&v),
            Err(e) => format!("  (GET /v1/hosts failed: {e:#})\n"),
        };
        let mut out = format!(
            "--- hosts ---\n{hosts}--- busiest host processes now (noise?) ---\n{}\n\
             --- controller log tail ---\n{}\n",
            crate::busiest_processes(Duration::from_millis(300), 6),
            self.controller.log_tail(40)
        );
        for a in &self.agents {
            let _ = writeln!(
                out,
                "--- agent {} log tail ({}) ---\n{}",
                a.host,
                a.agent.log_path.display(),
                a.agent.log_tail(25)
            );
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "cluster: test failed; scratch directory kept at {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// Turns an [`Cluster::agent_conf`] into a libvirt agent whose pushed
/// subtasks run inside its grid VMs (up to `max_vms`, one TCG vCPU and
/// 256 MiB each, booted from the guest image in `image`): the
/// `qemu:///system` URI, `launch_after` 1 s, `resume_after` 2 s, a
/// generous `boot_timeout` (TCG on a busy 2-core box), `reclaim_after`
/// 10 min (tests that reclaim set it lower). The domains are named
/// `sg-<host>-<n>`: see [`grid_vm_prefix`].
pub fn grid_vm_conf(c: &mut Conf, image: &Path, max_vms: u32) {
    c.str("runtime", "kind", "libvirt")
        .str("runtime", "libvirt_uri", crate::LIBVIRT_URI)
        .str("runtime", "domain_type", "qemu")
        .set("vm", "vcpus", 1)
        .set("vm", "memory_mib", 256)
        .path("vm", "kernel", &image.join("vmlinuz"))
        .path("vm", "initrd", &image.join("initrd.img"))
        .str("vm", "cmdline", "console=ttyS0 quiet panic=-1")
        .set("policy", "max_grid_vms", max_vms)
        .set("policy", "vcpu_budget", max_vms)
        .set("policy", "memory_budget_mib", 256 * u64::from(max_vms) + 64)
        .str("policy", "launch_after", "1s")
        .str("policy", "resume_after", "2s")
        .str("policy", "reclaim_after", "10m")
        .str("policy", "boot_timeout", "120s");
}

/// The name prefix of `host`'s grid VMs (`sg-<host>-`).
pub fn grid_vm_prefix(host: &str) -> String {
    format!("sg-{host}-")
}

/// A `sh` script for a range subtask: records its start in
/// `<markers>/<index>.<epoch>.start` (the file holds `/proc/self/cgroup`,
/// which names the agent's partition), sleeps `sleep_s` seconds, then prints
/// `range <start> <end>`.
pub fn marker_script(markers: &Path, sleep_s: &str) -> String {
    format!(
        "cat /proc/self/cgroup > '{}'/\"$SPAREGRID_INDEX.$SPAREGRID_EPOCH.start\"; \
         sleep {sleep_s}; echo \"range $SPAREGRID_START $SPAREGRID_END\"",
        markers.display()
    )
}

/// Checks that `results` has every index `0..n` exactly once, each with
/// exit code 0 and stdout `range <s> <e>\n` for the chunk's bounds
/// (`start + i*chunk`, capped at `end`). Returns a description of every
/// problem (empty when all is well).
pub fn range_coverage_problems(
    results: &JobResults,
    start: i64,
    end: i64,
    chunk: u64,
) -> Vec<String> {
    let n = ((end - start) as u64).div_ceil(chunk);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for r in &results.results {
        if !seen.insert(r.index) {
            problems.push(format!("index {} appears more than once", r.index));
        }
        if r.index >= n {
            problems.push(format!(
                "index {} is beyond the last subtask {}",
                r.index,
                n - 1
            ));
            continue;
        }
        let s = start + (r.index * chunk) as i64;
        let e = (s + chunk as i64).min(end);
        let want = format!("range {s} {e}\n");
        if r.stdout != want || r.exit_code != Some(0) {
            problems.push(format!(
                "index {} (attempt {} on {}): exit {:?}, stdout {:?}, want {:?}; stderr {:?}",
                r.index, r.attempt, r.host, r.exit_code, r.stdout, want, r.stderr
            ));
        }
    }
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains(i)).collect();
    if !missing.is_empty() {
        problems.push(format!("missing indexes: {missing:?}"));
    }
    problems
}

// ---------------------------------------------------------------------------
// A dedicated uplink and customer traffic on it

/// A veth pair that stands in for one host's uplink: `name` carries an
/// address in a private /30 and a permanent neighbour entry for the other
/// address with a MAC that nobody has, so datagrams sent to
/// [`Uplink::target`] leave through `name` (counted in its tx bytes in
/// `/proc/net/dev`) and the peer drops them on arrival (not addressed to
/// it; nothing is forwarded). No other traffic of the machine crosses it.
/// Deleted on drop.
pub struct Uplink {
    pub name: String,
    pub target: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Uplink {
    /// Creates the pair (needs root). Names are `sgu<n>a`/`sgu<n>b` with a
    /// number unique to this process and call.
    pub fn create() -> Uplink {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 100_000) * 10 + n % 10;
        let (name, peer) = (format!("sgu{id}a"), format!("sgu{id}b"));
        // A /30 of 10.213.0.0/16 from the id: .1 is ours, .2 the target.
        let net = (id % 16_384) * 4;
        let base = [10u8, 213, (net >> 8) as u8, (net & 0xff) as u8];
        let local = std::net::Ipv4Addr::new(base[0], base[1], base[2], base[3] + 1);
        let target = std::net::Ipv4Addr::new(base[0], base[1], base[2], base[3] + 2);
        let up = Uplink {
            name: name.clone(),
            target,
        };
        let setup = || -> Result<()> {
            ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer])?;
            for i in [&name, &peer] {
                // No IPv6 autoconfiguration chatter on the link (best effort).
                let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{i}/disable_ipv6"), "1");
            }
            ip(&["addr", "add", &format!("{local}/30"), "dev", &name])?;
            ip(&["link", "set", &peer, "up"])?;
            ip(&["link", "set", &name, "up"])?;
            ip(&[
                "neigh",
                "replace",
                &target.to_string(),
                "lladdr",
                "02:00:00:5e:10:01",
                "dev",
                &name,
                "nud",
                "permanent",
            ])
        };
        if let Err(e) = setup() {
            panic!("cannot set up the test uplink {name}: {e:#}");
        }
        up
    }

    /// Sends UDP datagrams through the link at about `bytes_per_sec` until
    /// the returned load is dropped.
    pub fn load(&self, bytes_per_sec: u64) -> UplinkLoad {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let target = SocketAddr::from((self.target, 9));
        let thread = std::thread::spawn(move || {
            const DATAGRAM: usize = 16_000;
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket");
            let buf = vec![0x5au8; DATAGRAM];
            let start = Instant::now();
            let mut sent: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                // Paced: as many bytes as the rate allows by now.
                let due = (start.elapsed().as_secs_f64() * bytes_per_sec as f64) as u64;
                if sent < due {
                    if let Err(e) = sock.send_to(&buf, target) {
                        eprintln!("uplink load: send to {target}: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    sent += DATAGRAM as u64;
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        UplinkLoad {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("harness: removing the test uplink: {e:#}");
        }
    }
}

/// Customer traffic on an [`Uplink`]; stops on drop.
pub struct UplinkLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for UplinkLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
