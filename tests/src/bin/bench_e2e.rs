//! `bench-e2e` (`make bench-e2e`): end-to-end throughput of no-op subtasks,
//! sparegrid against dask.distributed on the same machine in the same run.
//!
//! - **sparegrid**: one `sparegrid-controller` (SQLite store in a scratch
//!   directory) and `--agents` `sparegrid-agent` processes on loopback, each
//!   with the process runtime, its own cgroup partition and port, and
//!   `--slots` slots. A range job of `--subtasks` subtasks whose command is
//!   `true` is submitted over HTTP; the figure is subtasks / (time from the
//!   POST to the job read back as `done`), polled every [`POLL`].
//! - **dask** (`tests/bench/dask_noop.py`, run with `--python`): a
//!   `LocalCluster` of `--agents` worker processes with `--slots` threads
//!   each, the same number of tasks, each running
//!   `subprocess.run(["true"], capture_output=True)`: the same process per
//!   task, its output captured like an agent captures it. A pure-Python no-op
//!   task is reported as a second, separate reference.
//!
//! Each sparegrid round also prints the CPU the controller, the agents and
//! the subtasks' commands used per subtask (`/proc/<pid>/stat`), and an
//! in-process profile of the agent's executor (`--profile`) runs first.
//! The controller runs with auth on (an agent token, and an admin token the
//! benchmark submits with).
//!
//! Both sides get a warm-up (`--warmup` tasks, untimed) before each timed
//! run. `--rounds` alternates the sides and reports the median of each; the
//! ratio is sparegrid / dask (subprocess) against the target of ≥ 2×.
//!
//! The agents' load signal is off: only the RTT metric is weighted and no
//! RTT target is set, so the load factor stays 0. The controller, the four
//! agents and dask share one machine, and each agent would otherwise count
//! its neighbours' work as customer load and stop taking subtasks; this
//! benchmark measures the dispatch path, not the policy. No grid VMs are
//! launched (`policy.max_grid_vms = 0`).
//!
//! Needs root (cgroup partitions) and the release binaries next to this one.
//! Everything it starts (controller, agents, the dask process group) is
//! stopped and the partitions removed when it ends, on errors and on
//! SIGINT/SIGTERM too. Prints figures; asserts nothing about time.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sparegrid_controller::config::ControllerConfig;
use sparegrid_tests::{free_port, is_root, unique, Agent, Conf, Harness};

/// How often the job's state is read while it runs.
const POLL: Duration = Duration::from_millis(20);
/// The agents' cgroup root.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The target: sparegrid at least this many times dask's rate.
const TARGET_RATIO: f64 = 2.0;
/// Agent token shared by the controller and the agents.
const AGENT_TOKEN: &str = "bench-e2e-agent-token";
/// The token this benchmark submits and reads jobs with (admin role).
const ADMIN_TOKEN: &str = "bench-e2e-admin-token";

#[derive(Parser, Debug)]
#[command(
    name = "bench-e2e",
    about = "No-op subtask throughput: sparegrid (controller + agents, process runtime) vs dask.distributed"
)]
struct Args {
    /// Subtasks (and dask tasks) per timed run.
    #[arg(long, default_value_t = 3000)]
    subtasks: u64,
    /// Untimed subtasks (and dask tasks) before each timed run.
    #[arg(long, default_value_t = 300)]
    warmup: u64,
    /// Agents (and dask worker processes).
    #[arg(long, default_value_t = 4)]
    agents: u32,
    /// Slots per agent (and threads per dask worker).
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Timed runs of each side, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Python with dask and distributed installed (`make bench-e2e` makes a venv).
    #[arg(long, default_value = "/var/tmp/sparegrid-bench-venv/bin/python")]
    python: PathBuf,
    /// Skip the dask side (sparegrid's figure only).
    #[arg(long)]
    no_dask: bool,
    /// Subtasks of the in-process executor profile (0: skip it).
    #[arg(long, default_value_t = 500)]
    profile: u32,
    /// Run only the executor profile.
    #[arg(long)]
    profile_only: bool,
    /// 1000 subtasks, 100 warm-up, 1 round, at most 200 profiled.
    #[arg(long)]
    quick: bool,
    /// Keep the controller's scratch directory (its log and database).
    #[arg(long)]
    keep: bool,
}

/// Set by SIGINT/SIGTERM: every wait loop checks it and returns an error,
/// so the guards below clean up.
fn interrupted(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A child in its own process group: SIGTERM to the group on drop, SIGKILL
/// after `grace`.
struct GroupChild {
    what: &'static str,
    child: Child,
    grace: Duration,
}

impl GroupChild {
    fn spawn(what: &'static str, cmd: &mut Command, grace: Duration) -> Result<GroupChild> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {what} ({cmd:?})"))?;
        Ok(GroupChild { what, child, grace })
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Exited already? (Reaps it then.)
    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("wait for {}", self.what))
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        let pgid = self.pgid();
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(pgid, Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Whatever is left of the group (dask's worker processes) too.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The controller process with its scratch directory.
struct Controller {
    proc_: GroupChild,
    url: String,
    log: PathBuf,
    http: reqwest::blocking::Client,
}

fn sibling_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let p = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?
        .join(name);
    if !p.is_file() {
        bail!(
            "{} not found; build it (`cargo build --release -p sparegrid-controller -p sparegrid-agent`) \
             or set {env}",
            p.display()
        );
    }
    Ok(p)
}

impl Controller {
    fn start(dir: &Path, stop: &AtomicBool) -> Result<Controller> {
        let bin = sibling_bin("sparegrid-controller", "SPAREGRID_CONTROLLER_BIN")?;
        let port = free_port();
        let mut cfg = ControllerConfig {
            listen: ([127, 0, 0, 1], port).into(),
            db_path: dir.join("controller.db"),
            ..ControllerConfig::default()
        };
        cfg.auth.agent_token = Some(AGENT_TOKEN.to_string());
        cfg.auth.admin_tokens = vec![ADMIN_TOKEN.to_string()];
        cfg.validate()
            .context("the benchmark's controller config")?;
        let conf = dir.join("controller.toml");
        fs::write(
            &conf,
            toml::to_string(&cfg).context("render controller config")?,
        )?;
        let log = dir.join("controller.log");
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        let proc_ = GroupChild::spawn(
            "sparegrid-controller",
            Command::new(&bin)
                .arg("--config")
                .arg(&conf)
                .arg("run")
                .env("SPAREGRID_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
            Duration::from_secs(10),
        )?;
        let mut c = Controller {
            proc_,
            url: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            interrupted(stop)?;
            if let Some(st) = c.proc_.exited()? {
                bail!("the controller exited with {st}\n{}", c.log_tail(40));
            }
            if c.get("/v1/hosts").is_ok() {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                bail!("the controller did not answer in 20 s\n{}", c.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- controller log ({}) ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .with_context(|| format!("GET {path}"))?;
        let code = resp.status();
        let body = resp.text().unwrap_or_default();
        if !code.is_success() {
            bail!("GET {path}: HTTP {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// Submits a range job of `n` `true` subtasks; returns its id.
    fn submit(&self, name: &str, n: u64) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({
                "name": name,
                "command": {"argv": ["true"]},
                "split": {"range": {"start": 0, "end": n, "chunk": 1}},
                "resources": {"timeout_secs": 60},
                "max_attempts": 1,
            }))
            .send()
            .context("POST /v1/jobs")?;
        let code = resp.status();
        let body = resp.text().unwrap_or_default();
        if !code.is_success() {
            bail!("POST /v1/jobs: HTTP {code}: {body}");
        }
        let v: Value = serde_json::from_str(&body).context("POST /v1/jobs answer")?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST /v1/jobs answer has no id: {body}"))
    }

    /// Waits until `n` hosts are eligible.
    fn wait_hosts(&mut self, n: usize, stop: &AtomicBool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            interrupted(stop)?;
            let v = self.get("/v1/hosts")?;
            let eligible = v["hosts"]
                .as_array()
                .map_or(0, |h| h.iter().filter(|h| h["eligible"] == true).count());
            if eligible >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("only {eligible} of {n} hosts eligible after 30 s: {v}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One finished run of one side.
#[derive(Debug, Clone, Copy)]
struct Run {
    tasks: u64,
    seconds: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.tasks as f64 / self.seconds
    }
}

/// The sparegrid side: a controller and its agents.
struct Grid {
    // Drop order: agents (SIGTERM, wait) before their harnesses (partitions)
    // and the controller after both.
    agents: Vec<Agent>,
    harnesses: Vec<Harness>,
    controller: Controller,
    _dir: Option<tempfile::TempDir>,
}

impl Grid {
    fn start(args: &Args, stop: &AtomicBool) -> Result<Grid> {
        let dir = tempfile::Builder::new()
            .prefix("sparegrid-bench-e2e-")
            .tempdir()?;
        let (guard, path) = if args.keep {
            let path = dir.keep();
            println!("controller scratch directory (kept): {}", path.display());
            (None, path)
        } else {
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        };
        let controller = Controller::start(&path, stop)?;
        let mut grid = Grid {
            agents: Vec::new(),
            harnesses: Vec::new(),
            controller,
            _dir: guard,
        };
        for i in 0..args.agents {
            interrupted(stop)?;
            let mut h = Harness::new();
            let partition = unique("sgbench-e2e");
            h.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
            let c = agent_conf(&h, &grid.controller.url, i, &partition, args.slots);
            grid.harnesses.push(h);
            let h = grid.harnesses.last_mut().expect("just pushed");
            grid.agents.push(h.start(&c));
        }
        grid.controller
            .wait_hosts(args.agents as usize, stop)
            .map_err(|e| anyhow!("{e:#}\n{}", grid.controller.log_tail(30)))?;
        Ok(grid)
    }

    /// CPU seconds so far: the controller; the agents; the agents' reaped
    /// children (the subtasks' commands).
    fn cpu(&self) -> (f64, f64, f64) {
        let ctl = proc_cpu(self.controller.proc_.child.id()).0;
        let (mut agents, mut cmds) = (0.0, 0.0);
        for a in &self.agents {
            let (own, children) = proc_cpu(a.pid());
            agents += own;
            cmds += children;
        }
        (ctl, agents, cmds)
    }

    /// Submits a job of `n` and waits until it is done; prints progress
    /// every second when `label` is given.
    fn run(&self, n: u64, label: Option<&str>, stop: &AtomicBool) -> Result<Run> {
        let t0 = Instant::now();
        let id = self.controller.submit(label.unwrap_or("warm-up"), n)?;
        let mut last_print = Instant::now();
        loop {
            interrupted(stop)?;
            let v = self.controller.get(&format!("/v1/jobs/{id}"))?;
            let state = v["state"].as_str().unwrap_or("?").to_string();
            let counts = &v["counts"];
            let done = counts["done"].as_u64().unwrap_or(0);
            match state.as_str() {
                "done" => {
                    let seconds = t0.elapsed().as_secs_f64();
                    if done != n {
                        bail!("job {id} is done with {done} of {n} subtasks done: {v}");
                    }
                    return Ok(Run { tasks: n, seconds });
                }
                "failed" | "cancelled" => bail!(
                    "job {id} ended {state}: {counts}\n{}\n{}",
                    self.controller.log_tail(20),
                    self.agents
                        .first()
                        .map(|a| a.log_tail(20))
                        .unwrap_or_default()
                ),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("job {id} not done after 600 s: {v}");
            }
            if let Some(label) = label {
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!(
                        "  sparegrid {label}: {done}/{n} done, {} assigned ({:.0}/s)",
                        counts["assigned"],
                        done as f64 / t0.elapsed().as_secs_f64()
                    );
                }
            }
            std::thread::sleep(POLL);
        }
    }
}

/// One agent's config: process runtime, its own partition, load signal off
/// (see the module docs), no grid VMs, joined to the controller.
fn agent_conf(h: &Harness, controller: &str, i: u32, partition: &str, slots: u32) -> Conf {
    let mut c = h.base_conf();
    c.str(
        "agent",
        "host_name",
        &format!("bench-{i}-{}", std::process::id()),
    )
    .str("runtime", "kind", "process")
    .str("cgroup", "partition", partition)
    .set("policy", "max_grid_vms", 0)
    .str("controller", "url", controller)
    .str("controller", "token", AGENT_TOKEN)
    .set("controller", "slots", slots);
    for m in sparegrid_proto::Metric::ALL {
        let w = if m == sparegrid_proto::Metric::Rtt {
            "1.0"
        } else {
            "0.0"
        };
        c.set("load.weights", m.as_str(), w);
    }
    c
}

/// Runs `tests/bench/dask_noop.py`; returns the subprocess and pure-Python
/// runs.
fn run_dask(args: &Args, n: u64, warmup: u64, stop: &AtomicBool) -> Result<(Run, Option<Run>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/dask_noop.py");
    let mut cmd = Command::new(&args.python);
    cmd.arg(&script)
        .arg("--workers")
        .arg(args.agents.to_string())
        .arg("--threads")
        .arg(args.slots.to_string())
        .arg("--tasks")
        .arg(n.to_string())
        .arg("--warmup")
        .arg(warmup.to_string())
        .arg("--modes")
        .arg("subprocess,python")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut py = GroupChild::spawn("dask (python)", &mut cmd, Duration::from_secs(10))?;
    let mut stdout = py.child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = loop {
        interrupted(stop)?;
        if let Some(st) = py.exited()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    if !status.success() {
        bail!(
            "{} {} failed with {status}; stdout:\n{out}",
            args.python.display(),
            script.display()
        );
    }
    let mut sub = None;
    let mut pure = None;
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("dask line {line}"))?;
        let run = Run {
            tasks: v["tasks"].as_u64().unwrap_or(0),
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        };
        match v["mode"].as_str() {
            Some("subprocess") => sub = Some(run),
            Some("python") => pure = Some(run),
            _ => {}
        }
    }
    let sub = sub.ok_or_else(|| anyhow!("dask printed no subprocess figure:\n{out}"))?;
    Ok((sub, pure))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// CPU seconds of `pid` itself and of its reaped children (utime + stime,
/// cutime + cstime of /proc/<pid>/stat).
fn proc_cpu(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    // rest starts at field 3 (state); utime is field 14 … cstime 17.
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    match f.as_slice() {
        [u, s, cu, cs] => ((u + s) as f64 / hz, (cu + cs) as f64 / hz),
        _ => (0.0, 0.0),
    }
}

/// User + system CPU seconds of this process (all threads) and of its
/// reaped children.
fn cpu_seconds() -> (f64, f64) {
    let get = |who| {
        // SAFETY: getrusage fills the zeroed struct; it has no other preconditions.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

/// The agent-side cost of one `true` subtask, in process: the executor
/// starts it and waits for it, `n` times one after another, with a child
/// cgroup per subtask in a real partition and without any cgroup. Prints
/// wall time and CPU (the executor's own and the command's) per subtask.
fn executor_profile(n: u32, stop: &AtomicBool) -> Result<()> {
    use sparegrid_agent::cgroup::{GridCgroup, PartitionLimits};
    use sparegrid_agent::config::CgroupVersion;
    use sparegrid_agent::subtask::{Executor, Limits};
    use sparegrid_proto::grid::{Assignment, AttemptRef};

    /// Removes the partition on drop, whatever happened.
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Err(e) = sparegrid_tests::remove_partition(Path::new(CGROUP_ROOT), &self.0) {
                eprintln!("bench-e2e: removing partition {}: {e:#}", self.0);
            }
        }
    }
    let partition = unique("sgbench-exec");
    let _cleanup = Cleanup(partition.clone());
    let cg = GridCgroup::detect(Path::new(CGROUP_ROOT), &partition, CgroupVersion::Auto)?;
    cg.as_partition()
        .setup(&PartitionLimits {
            memory_max_bytes: 0,
        })
        .context("set up the profile partition")?;
    let cg = Arc::new(cg);
    for (label, ex) in [
        (
            "per-subtask cgroup",
            Executor::new(Some(Arc::clone(&cg)), "profile", Limits::default()),
        ),
        (
            "no cgroup",
            Executor::new(None, "profile", Limits::default()),
        ),
    ] {
        let assignment = |index: u64| Assignment {
            network: sparegrid_proto::Network::None,
            attempt: AttemptRef {
                job: "profile".into(),
                index,
                epoch: 1,
            },
            argv: vec!["true".into()],
            env: Default::default(),
            stdin: Vec::new(),
            timeout_ms: 60_000,
            vcpus: 1,
            memory_mib: 64,
        };
        // Warm-up.
        for i in 0..20 {
            ex.start(&assignment(i))?.wait();
        }
        let (s0, c0) = cpu_seconds();
        let t0 = Instant::now();
        for i in 0..u64::from(n) {
            interrupted(stop)?;
            // try_wait every 100 µs: `wait()` backs off to 20 ms naps,
            // which would be most of what this measures.
            let mut r = ex.start(&assignment(1000 + i))?;
            let c = loop {
                if let Some(c) = r.try_wait() {
                    break c;
                }
                std::thread::sleep(Duration::from_micros(100));
            };
            if c.exit_code != Some(0) {
                bail!("executor profile: `true` ended {c:?}");
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let (s1, c1) = cpu_seconds();
        let per = |x: f64| x / f64::from(n) * 1e6;
        println!(
            "executor ({label}), {n} `true` one after another: {:.0} µs wall, {:.0} µs executor CPU, \
             {:.0} µs child CPU (cgroup join before exec, then `true`) per subtask",
            per(wall),
            per(s1 - s0),
            per(c1 - c0)
        );
    }
    Ok(())
}

/// Load average and the busiest other processes, to judge the noise.
fn machine_note() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "load average {} ({} CPUs); busiest processes over 1 s:\n{}",
        load.join(" "),
        sparegrid_tests::online_cpus(),
        sparegrid_tests::busiest_processes(Duration::from_secs(1), 3)
    )
}

fn bench(args: &Args, stop: &AtomicBool) -> Result<()> {
    println!(
        "bench-e2e: {} no-op subtasks ({} warm-up), {} agents x {} slots vs dask {} workers x {} threads, {} round(s)",
        args.subtasks, args.warmup, args.agents, args.slots, args.agents, args.slots, args.rounds
    );
    println!("before: {}", machine_note());
    if args.profile > 0 {
        executor_profile(args.profile, stop)?;
    }
    if args.profile_only {
        return Ok(());
    }
    let grid = Grid::start(args, stop)?;
    println!(
        "sparegrid: controller {} and {} agents up",
        grid.controller.url,
        grid.agents.len()
    );
    let mut ours = Vec::new();
    let mut dask_sub = Vec::new();
    let mut dask_py = Vec::new();
    for round in 1..=args.rounds {
        if args.warmup > 0 {
            grid.run(args.warmup, None, stop)?;
        }
        let label = format!("round {round}");
        let cpu0 = grid.cpu();
        let r = grid.run(args.subtasks, Some(&label), stop)?;
        let cpu1 = grid.cpu();
        let per = |a: f64, b: f64| (b - a) / r.tasks as f64 * 1e6;
        println!(
            "sparegrid {label}: {} subtasks in {:.2} s = {:.0} subtasks/s; CPU per subtask: \
             controller {:.0} µs, agents {:.0} µs, commands {:.0} µs",
            r.tasks,
            r.seconds,
            r.rate(),
            per(cpu0.0, cpu1.0),
            per(cpu0.1, cpu1.1),
            per(cpu0.2, cpu1.2)
        );
        ours.push(r.rate());
        if !args.no_dask {
            let (sub, pure) = run_dask(args, args.subtasks, args.warmup, stop)?;
            println!(
                "dask {label}: subprocess {:.0} tasks/s ({:.2} s){}",
                sub.rate(),
                sub.seconds,
                pure.map_or(String::new(), |p| format!(
                    ", pure-Python no-op {:.0} tasks/s ({:.2} s)",
                    p.rate(),
                    p.seconds
                ))
            );
            dask_sub.push(sub.rate());
            if let Some(p) = pure {
                dask_py.push(p.rate());
            }
        }
    }
    println!("after: {}", machine_note());
    let ours_m = median(ours.clone());
    println!(
        "end-to-end: sparegrid {ours_m:.0} subtasks/s (median of {:?}; {} agents x {} slots, process runtime, `true`)",
        ours.iter().map(|r| r.round()).collect::<Vec<_>>(),
        args.agents,
        args.slots
    );
    if args.no_dask {
        println!("dask: skipped (--no-dask)");
        return Ok(());
    }
    let sub_m = median(dask_sub.clone());
    let ratio = ours_m / sub_m;
    println!(
        "end-to-end: dask.distributed {sub_m:.0} tasks/s (median of {:?}; {} workers x {} threads, subprocess.run([\"true\"]))",
        dask_sub.iter().map(|r| r.round()).collect::<Vec<_>>(),
        args.agents,
        args.slots
    );
    if !dask_py.is_empty() {
        println!(
            "reference: dask.distributed pure-Python no-op {:.0} tasks/s (median of {:?}; no process spawned)",
            median(dask_py.clone()),
            dask_py.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
    println!(
        "end-to-end ratio sparegrid / dask (same command) = {ratio:.2}x (target ≥ {TARGET_RATIO:.0}x): {}",
        if ratio >= TARGET_RATIO { "met" } else { "MISSED" }
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.subtasks = 1000;
        args.warmup = 100;
        args.rounds = 1;
        args.profile = args.profile.min(200);
    }
    if args.subtasks == 0 || args.agents == 0 || args.slots == 0 || args.rounds == 0 {
        bail!("--subtasks, --agents, --slots and --rounds must be at least 1");
    }
    if !is_root() {
        bail!("bench-e2e needs root (the agents create cgroup partitions)");
    }
    if !args.no_dask && !args.python.is_file() {
        bail!(
            "--python {}: no such file; `make bench-e2e` creates the venv with dask, or pass --no-dask",
            args.python.display()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("install signal handler")?;
    }
    bench(&args, &stop)
}
