//! `bench-controller` (`make bench-controller`): the controller's figures.
//!
//! 1. Dispatch throughput: a 100,000-subtask `range` job, from the POST of
//!    its request until every subtask has been pushed to an agent. The
//!    controller is the real one in process (`api::serve_on`: the axum
//!    router on a loopback listener, the SQLite store on disk in a temporary
//!    directory, the real push dispatcher). The agents are fakes: small
//!    axum servers on loopback that register and heartbeat through the real
//!    `/v1/agents/*` routes (MessagePack), accept every `AssignBatch` and
//!    never report a completion, with more free slots than the job has
//!    subtasks. The clock stops when the fakes have received every subtask.
//! 2. Memory: the release `sparegrid-controller` binary as a child process
//!    with a 1,000,000-subtask `range` job queued (no agents): its peak
//!    (VmHWM) and current (VmRSS) resident set from `/proc/<pid>/status`.
//! 3. Pull versus push: a 5,000-subtask job of no-op subtasks (`true`)
//!    through 4 real agents (the agent library's grid client and runner in
//!    this process, subtasks as host processes without a cgroup, 4 slots
//!    each) on loopback, once pushed (`dispatch = "push"`, a push job) and
//!    once pulled (`dispatch = "pull"`, a pull job: long-poll leases, one
//!    completion request per subtask); each from the submit until the job
//!    is done, against a fresh controller (in process, SQLite on disk).
//!    Three alternating rounds; the figure is pull's median rate as a share
//!    of push's (target ≥ 0.8).
//! 4. Recovery after kill -9: 4 real `sparegrid-agent` processes (process
//!    runtime, own cgroup partitions, 4 slots each; root) against the
//!    controller in process with short timers (`lease_ttl` 1 s, heartbeat
//!    250 ms, `host_timeout` 2 s); a job of 8 `sleep 30` subtasks, so the
//!    survivors have free slots; once all are held, the agent holding the
//!    most is killed with SIGKILL, and for each subtask it held the time
//!    from the kill until the controller handed it to another host (the
//!    new attempt's start in the store). Three rounds each of a pull job
//!    (target: max ≤ `lease_ttl` + one heartbeat) and a push job (for
//!    comparison: recovered after `host_timeout`). Needs the release agent
//!    binary beside this one (`cargo build --release -p sparegrid-agent`);
//!    skipped when not root.
//!
//! 5. P2p balance: a p2p job of 10,000 subtasks seeded onto 1 of 4 real
//!    agents (the agent library's grid client, runner and peer node in
//!    this process, 1 slot each, p2p queues in a temporary directory,
//!    `dispatch.p2p_seed_hosts = 1`); the other three get work only by
//!    stealing. Each subtask is this binary run as `--subtask-sleep I`,
//!    which sleeps 5 + (I·7919 mod 46) ms (5 to 50 ms, a fixed spread).
//!    The makespan (submit until the job is done) as a ratio of the ideal,
//!    total work / 4 (target ≤ 1.15), total work being the run times the
//!    agents measured (each includes starting the process, several ms on
//!    a busy machine; the ratio to the planned sleeps alone is printed
//!    too), the steals per subtask, and how many subtasks each agent ran
//!    (from the agents' queues).
//!
//! Prints each figure with its target and "met" or "MISSED"; asserts
//! nothing about time (machines are noisy). Options: `--quick` (10× smaller
//! jobs), `--agents N` (agents, default 4), `--batch-size N`
//! (`dispatch.batch_size`; default: the controller's default), `--only
//! dispatch|memory|pull|recovery|p2p` (one figure).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use sparegrid_controller::api::{self, AppState};
use sparegrid_controller::config::ControllerConfig;
use sparegrid_controller::store::{SqliteStore, Store, StoreOptions};
use sparegrid_proto::grid::{AssignBatch, AttemptRef, Heartbeat, Register};

const DISPATCH_TARGET: f64 = 20_000.0;
const MEMORY_TARGET_MIB: f64 = 300.0;
const MSGPACK: &str = "application/msgpack";

struct Args {
    quick: bool,
    agents: usize,
    batch_size: Option<u32>,
    /// Only this figure (`dispatch`, `memory`, `pull` or `recovery`).
    only: Option<String>,
}

impl Args {
    fn runs(&self, figure: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == figure)
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        agents: 4,
        batch_size: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: not a number: {v:?}"))
        };
        match a.as_str() {
            "--quick" => args.quick = true,
            "--agents" => args.agents = number("--agents")?.max(1) as usize,
            "--batch-size" => args.batch_size = Some(number("--batch-size")? as u32),
            "--only" => {
                let v = it.next().context("--only needs a value")?;
                ensure!(
                    ["dispatch", "memory", "pull", "recovery", "p2p"].contains(&v.as_str()),
                    "--only: dispatch, memory, pull, recovery or p2p, not {v:?}"
                );
                args.only = Some(v);
            }
            "-h" | "--help" => {
                println!(
                    "bench-controller [--quick] [--agents N] [--batch-size N] [--only dispatch|memory|pull|recovery|p2p]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> Result<()> {
    // Figure 5's subtask: this binary, run by the agents.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--subtask-sleep") {
        let i: u64 = argv
            .get(2)
            .context("--subtask-sleep needs an index")?
            .parse()?;
        std::thread::sleep(Duration::from_millis(p2p_sleep_ms(i)));
        return Ok(());
    }
    let args = parse_args()?;
    let scale = if args.quick { 10 } else { 1 };
    println!(
        "bench-controller{}",
        if args.quick { " (--quick)" } else { "" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.runs("dispatch") {
        rt.block_on(dispatch_throughput(100_000 / scale, &args))?;
    }
    if args.runs("memory") {
        memory(1_000_000 / scale)?;
    }
    if args.runs("pull") {
        pull_vs_push(&rt, 5_000 / scale, &args)?;
    }
    if args.runs("recovery") {
        recovery(&rt)?;
    }
    if args.runs("p2p") {
        p2p_balance(&rt, 10_000 / scale)?;
    }
    drop(rt);
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Dispatch throughput
// ---------------------------------------------------------------------------

/// What one fake agent has been pushed.
#[derive(Default)]
struct Received {
    attempts: Mutex<Vec<AttemptRef>>,
    batches: AtomicU64,
}

#[derive(Clone)]
struct FakeAgent {
    received: Arc<Received>,
    /// Subtasks pushed to all fakes together.
    total: Arc<AtomicU64>,
}

async fn take_batch(State(a): State<FakeAgent>, body: Bytes) -> StatusCode {
    match rmp_serde::from_slice::<AssignBatch>(&body) {
        Ok(batch) => {
            let n = batch.assignments.len() as u64;
            a.received
                .attempts
                .lock()
                .unwrap()
                .extend(batch.assignments.into_iter().map(|x| x.attempt));
            a.received.batches.fetch_add(1, Ordering::Relaxed);
            a.total.fetch_add(n, Ordering::Relaxed);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// Starts a fake agent on loopback; returns its URL.
async fn start_fake(agent: FakeAgent) -> Result<String> {
    let app = Router::new()
        .route("/v1/subtasks", post(take_batch))
        .route("/v1/subtasks/stop", post(|| async { StatusCode::OK }))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .with_state(agent);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

async fn post_msgpack<T: serde::Serialize>(
    client: &reqwest::Client,
    url: &str,
    body: &T,
) -> Result<()> {
    let body = rmp_serde::to_vec_named(body)?;
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, MSGPACK)
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    ensure!(
        status.is_success(),
        "POST {url}: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

fn heartbeat_of(host: &str, slots: u32, running: Vec<AttemptRef>) -> Heartbeat {
    Heartbeat {
        tunnel: None,
        steals: Vec::new(),
        host: host.to_owned(),
        load: 0.0,
        dominant: None,
        breakdown: BTreeMap::new(),
        free_slots: slots.saturating_sub(running.len() as u32),
        running,
        vms: BTreeMap::new(),
        suspended_ms: 0,
        renew: Vec::new(),
    }
}

async fn dispatch_throughput(n: u64, args: &Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = ControllerConfig {
        db_path: dir.path().join("controller.db"),
        ..ControllerConfig::default()
    };
    if let Some(b) = args.batch_size {
        config.dispatch.batch_size = b;
    }
    config.validate()?;
    let store = SqliteStore::open_with(
        &config.db_path,
        StoreOptions {
            max_reduce_input: config.job_limits.max_input_bytes,
            ..StoreOptions::default()
        },
    )?;
    let store: Arc<dyn Store> = Arc::new(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = AppState::new(Arc::clone(&store), &config);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve_on(listener, state, async {
        let _ = stop_rx.await;
    }));

    // Fake agents, each with more slots than the job has subtasks.
    let slots = u32::try_from(n).unwrap_or(u32::MAX);
    let total = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut fakes = Vec::new();
    for i in 0..args.agents {
        let fake = FakeAgent {
            received: Arc::new(Received::default()),
            total: Arc::clone(&total),
        };
        let url = start_fake(fake.clone()).await?;
        let host = format!("fake-{i}");
        let reg = Register {
            images: Vec::new(),
            migrate_in: false,
            transfer_url: None,
            tunnel: None,
            p2p: false,
            host: host.clone(),
            version: "bench".into(),
            agent_url: Some(url),
            slots,
        };
        post_msgpack(&client, &format!("{base}/v1/agents/register"), &reg).await?;
        let hb = heartbeat_of(&host, slots, Vec::new());
        post_msgpack(&client, &format!("{base}/v1/agents/heartbeat"), &hb).await?;
        fakes.push((host, fake));
    }
    // Heartbeats go on (at the interval the controller asks for, with what
    // each fake was pushed, as a real agent reports it) so that no host is
    // lost however long the run takes.
    let every = config.registry.heartbeat_interval;
    let beating = {
        let (client, base, fakes) = (client.clone(), base.clone(), fakes.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for (host, fake) in &fakes {
                    let running = fake.received.attempts.lock().unwrap().clone();
                    let hb = heartbeat_of(host, slots, running);
                    let url = format!("{base}/v1/agents/heartbeat");
                    if let Err(e) = post_msgpack(&client, &url, &hb).await {
                        eprintln!("heartbeat of {host}: {e:#}");
                    }
                }
            }
        })
    };

    let job = serde_json::json!({
        "name": "bench-dispatch",
        "command": {"argv": ["true", "{start}"]},
        "split": {"range": {"start": 0, "end": n, "chunk": 1}},
    });
    let started = Instant::now();
    let resp = client
        .post(format!("{base}/v1/jobs"))
        .json(&job)
        .send()
        .await?;
    ensure!(
        resp.status() == StatusCode::CREATED,
        "submit: {}",
        resp.status()
    );
    let submitted = started.elapsed();
    let deadline = Duration::from_secs(300);
    while total.load(Ordering::Relaxed) < n && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let pushed = total.load(Ordering::Relaxed);
    beating.abort();

    // Every subtask exactly once, as the store sees it too.
    let mut seen = std::collections::HashSet::new();
    let mut batches = 0;
    for (_, f) in &fakes {
        batches += f.received.batches.load(Ordering::Relaxed);
        for a in f.received.attempts.lock().unwrap().iter() {
            seen.insert(a.index);
        }
    }
    let job: serde_json::Value = client
        .get(format!("{base}/v1/jobs/j-1"))
        .send()
        .await?
        .json()
        .await?;
    let _ = stop_tx.send(());
    let _ = server.await;

    let rate = pushed as f64 / elapsed.as_secs_f64();
    println!(
        "\n1. dispatch: {n}-subtask range job, {} fake agents × {slots} slots on loopback, \
         SQLite on disk, dispatch.batch_size {}, dispatch.interval {:?}",
        args.agents, config.dispatch.batch_size, config.dispatch.interval
    );
    println!(
        "   POST /v1/jobs answered (job and {n} subtasks stored): {:.3} s ({:.0} subtasks/s)",
        submitted.as_secs_f64(),
        n as f64 / submitted.as_secs_f64()
    );
    println!(
        "   pushed {pushed} subtasks ({} distinct) in {batches} batches (mean {:.0}); \
         store: {} assigned",
        seen.len(),
        pushed as f64 / batches.max(1) as f64,
        job["counts"]["assigned"]
    );
    if pushed < n {
        println!(
            "   gave up after {:.0} s with {pushed} of {n} pushed",
            elapsed.as_secs_f64()
        );
    }
    println!(
        "   submission → every subtask pushed: {:.3} s = {rate:.0} subtasks/s   target ≥ {DISPATCH_TARGET:.0}/s   {}",
        elapsed.as_secs_f64(),
        verdict(pushed >= n && rate >= DISPATCH_TARGET)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Memory
// ---------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The release controller next to this binary.
fn controller_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me
        .parent()
        .context("this binary has no directory")?
        .join("sparegrid-controller");
    ensure!(
        bin.exists(),
        "{} is missing; build it: cargo build --release -p sparegrid-controller",
        bin.display()
    );
    Ok(bin)
}

/// The child controller; SIGTERM and reaped when dropped.
struct ChildController(Child);

impl Drop for ChildController {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn start_controller(dir: &Path) -> Result<(ChildController, String)> {
    let addr = free_port()?;
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ndb_path = \"{}\"\n",
            dir.join("controller.db").display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let child = Process::new(controller_binary()?)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("SPAREGRID_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting sparegrid-controller")?;
    let child = ChildController(child);
    let base = format!("http://{addr}");
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/v1/jobs")).send() {
            if r.status().is_success() {
                return Ok((child, base));
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the controller did not answer within 30 s; see {}",
            dir.join("controller.log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn memory(n: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (child, base) = start_controller(dir.path())?;
    let pid = child.0.id();
    let (idle_rss, _) = rss_kib(pid)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let job = serde_json::json!({
        "name": "bench-memory",
        "command": {"argv": ["true", "{start}"]},
        "split": {"range": {"start": 0, "end": n, "chunk": 1}},
    });
    let started = Instant::now();
    let resp = client.post(format!("{base}/v1/jobs")).json(&job).send()?;
    ensure!(resp.status().as_u16() == 201, "submit: {}", resp.status());
    let submitted = started.elapsed();
    let (after_submit, _) = rss_kib(pid)?;
    // What users and Prometheus do with a big job queued.
    let v: serde_json::Value = client.get(format!("{base}/v1/jobs/j-1")).send()?.json()?;
    ensure!(
        v["counts"]["queued"] == n,
        "the job is not fully queued: {}",
        v["counts"]
    );
    client
        .get(format!("{base}/v1/jobs"))
        .send()?
        .error_for_status()?;
    client
        .get(format!("{base}/metrics"))
        .send()?
        .error_for_status()?;
    std::thread::sleep(Duration::from_millis(500));
    let (rss, hwm) = rss_kib(pid)?;
    let db_bytes: u64 = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("controller.db"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    drop(child);

    println!(
        "\n2. memory: the release sparegrid-controller (pid {pid}) with a {n}-subtask range job queued, no agents"
    );
    println!(
        "   POST /v1/jobs answered in {:.3} s ({:.0} subtasks/s); store files {:.1} MiB",
        submitted.as_secs_f64(),
        n as f64 / submitted.as_secs_f64(),
        db_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "   RSS idle before the job {:.1} MiB, right after the submit {:.1} MiB",
        mib(idle_rss),
        mib(after_submit)
    );
    println!(
        "   peak RSS (VmHWM) {:.1} MiB   target ≤ {MEMORY_TARGET_MIB:.0} MiB   {}",
        mib(hwm),
        verdict(mib(hwm) <= MEMORY_TARGET_MIB)
    );
    println!(
        "   current RSS (VmRSS, after GET job, list, /metrics) {:.1} MiB   target ≤ {MEMORY_TARGET_MIB:.0} MiB   {}",
        mib(rss),
        verdict(mib(rss) <= MEMORY_TARGET_MIB)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Pull versus push
// ---------------------------------------------------------------------------

const PULL_RATIO_TARGET: f64 = 0.8;
const PULL_SLOTS: u32 = 4;
const PULL_ROUNDS: usize = 3;

/// A calm host's status: the agents lease and are pushed to only with a
/// load sample below the dispatch threshold.
fn calm_status(host: &str) -> sparegrid_proto::AgentStatus {
    use sparegrid_proto::{AgentStatus, LoadBreakdown, Metric, MetricReading};
    AgentStatus {
        grid_net: None,
        tunnel: None,
        version: "bench".into(),
        host: host.into(),
        runtime: "process".into(),
        draining: false,
        load: Some(LoadBreakdown {
            instant: 0.05,
            smoothed: 0.05,
            peak: 0.05,
            dominant: Some(Metric::Cpu),
            combine: "max".into(),
            metrics: vec![MetricReading {
                metric: Metric::Cpu,
                raw: 0.05,
                grid: 0.0,
                normalised: 0.05,
                weight: 1.0,
                available: true,
            }],
            mem_available_bytes: 1 << 30,
        }),
        vms: Vec::new(),
        transitions: Vec::new(),
    }
}

/// One run: a fresh controller, `agents` real agents in `mode`, an
/// `n`-subtask job of `true`; the time from the submit until it is done.
fn one_mode(rt: &tokio::runtime::Runtime, mode: &str, n: u64, agents: usize) -> Result<Duration> {
    use sparegrid_agent::config::{AgentDispatch, Config};

    let mut run = InProcess::start(rt, |_| {})?;
    for i in 0..agents {
        let mut cfg = Config::default();
        cfg.controller.slots = PULL_SLOTS;
        // Push and pull jobs only (no p2p queue in the default data_dir).
        cfg.peers.enabled = false;
        if mode != "push" {
            cfg.controller.dispatch = AgentDispatch::Pull;
        }
        run.add_agent(rt, &format!("{mode}-{i}"), cfg, mode == "push")?;
    }
    run.wait_registered()?;
    let job = serde_json::json!({
        "name": format!("bench-{mode}"),
        "command": {"argv": ["true", "{start}"]},
        "split": {"range": {"start": 0, "end": n, "chunk": 1}},
        "mode": mode,
    });
    let (id, elapsed) = run.run_job(mode, &job, n, Duration::from_secs(600), false)?;
    // Exactly once: one attempt per subtask (spot checks across the job).
    for i in (0..n).step_by((n as usize / 50).max(1)) {
        let attempts = run.store.attempts(&id, i)?;
        ensure!(
            attempts.len() == 1,
            "{mode}: subtask {i} ran {} times",
            attempts.len()
        );
    }
    drop(run.stop(rt));
    Ok(elapsed)
}

/// The controller in this process (the real router and dispatcher on a
/// loopback listener, SQLite on disk in a temporary directory), with real
/// agents in this process too (the agent library's grid client and
/// runner, subtasks as processes without a cgroup): figures 3 and 5; the
/// recovery figure (4) uses the controller alone, its agents being
/// processes.
struct InProcess {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    base: String,
    plane: sparegrid_controller::agents::AgentPlane,
    grids: Vec<sparegrid_agent::grid::Grid>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), api::ApiError>>,
}

impl InProcess {
    fn start(
        rt: &tokio::runtime::Runtime,
        adjust: impl FnOnce(&mut ControllerConfig),
    ) -> Result<InProcess> {
        let dir = tempfile::tempdir()?;
        let mut config = ControllerConfig {
            db_path: dir.path().join("controller.db"),
            ..ControllerConfig::default()
        };
        adjust(&mut config);
        config.validate()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(
            &config.db_path,
            StoreOptions::default(),
        )?);
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let base = format!("http://{}", listener.local_addr()?);
        let state = AppState::new(Arc::clone(&store), &config);
        let plane = state.agents.clone();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(api::serve_on(listener, state, async {
            let _ = stop_rx.await;
        }));
        Ok(InProcess {
            dir,
            store,
            base,
            plane,
            grids: Vec::new(),
            stop,
            server,
        })
    }

    /// Starts agent `host` on `cfg` (its controller URL filled in). With
    /// `serve`, its routes (push, peer) listen on loopback at the URL it
    /// advertises.
    fn add_agent(
        &mut self,
        rt: &tokio::runtime::Runtime,
        host: &str,
        mut cfg: sparegrid_agent::config::Config,
        serve: bool,
    ) -> Result<()> {
        use sparegrid_agent::daemon::status::Shared;
        use sparegrid_agent::grid::Grid;
        use sparegrid_agent::subtask::{Executor, Limits};
        cfg.controller.url = self.base.clone();
        let listener = if serve {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            cfg.controller.advertise_url = format!("http://{}", l.local_addr()?);
            Some(l)
        } else {
            None
        };
        cfg.validate()?;
        let shared = Arc::new(Shared::new(calm_status(host)));
        let grid = Grid::start(
            &cfg,
            host,
            Executor::new(None, host, Limits::default()),
            shared,
        )?;
        if let Some(l) = listener {
            l.set_nonblocking(true)?;
            let app = grid.routes();
            rt.spawn(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                    let _ = axum::serve(l, app).await;
                }
            });
        }
        self.grids.push(grid);
        Ok(())
    }

    /// Waits until every agent registered (and a little more, so that
    /// they have heartbeaten) before a clock starts.
    fn wait_registered(&self) -> Result<()> {
        let started = Instant::now();
        while self.store.list_hosts()?.len() < self.grids.len() {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the agents did not register"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Submits `job` and waits until it is done with all `n` subtasks
    /// (`progress`: print the count every 10 s); returns its id and the
    /// time from the submit.
    fn run_job(
        &self,
        what: &str,
        job: &serde_json::Value,
        n: u64,
        deadline: Duration,
        progress: bool,
    ) -> Result<(sparegrid_controller::store::JobId, Duration)> {
        let client = reqwest::blocking::Client::new();
        let started = Instant::now();
        let resp = client
            .post(format!("{}/v1/jobs", self.base))
            .json(job)
            .send()?;
        ensure!(resp.status().as_u16() == 201, "submit: {}", resp.status());
        let id: serde_json::Value = resp.json()?;
        let id =
            sparegrid_controller::store::JobId(id["id"].as_str().context("no job id")?.to_owned());
        let mut last_print = Instant::now();
        loop {
            let rec = self.store.get_job(&id)?;
            if rec.state.is_terminal() {
                ensure!(
                    rec.counts.done == n,
                    "{what}: the job ended {} with {:?}",
                    rec.state,
                    rec.counts
                );
                return Ok((id, started.elapsed()));
            }
            ensure!(
                started.elapsed() < deadline,
                "{what}: not done after {deadline:?}: {:?}",
                rec.counts
            );
            if progress && last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                eprintln!(
                    "   … {:.0} s: {} of {n} done",
                    started.elapsed().as_secs_f64(),
                    rec.counts.done
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the agents, then the controller; returns the temporary
    /// directory (removed when dropped).
    fn stop(self, rt: &tokio::runtime::Runtime) -> tempfile::TempDir {
        for g in self.grids {
            g.stop();
        }
        let _ = self.stop.send(());
        let _ = rt.block_on(self.server);
        self.dir
    }
}

/// Median of a few durations.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pull_vs_push(rt: &tokio::runtime::Runtime, n: u64, args: &Args) -> Result<()> {
    // Alternating rounds, so that a neighbour's load hits both modes alike.
    let (mut push, mut pull) = (Vec::new(), Vec::new());
    for _ in 0..PULL_ROUNDS {
        push.push(one_mode(rt, "push", n, args.agents)?);
        pull.push(one_mode(rt, "pull", n, args.agents)?);
    }
    let secs = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (push_all, pull_all) = (secs(&push), secs(&pull));
    let (push, pull) = (median(push), median(pull));
    let (push_rate, pull_rate) = (n as f64 / push.as_secs_f64(), n as f64 / pull.as_secs_f64());
    let ratio = pull_rate / push_rate;
    println!(
        "\n3. pull versus push: a {n}-subtask job of `true` through {} real agents × {PULL_SLOTS} slots \
         on loopback (grid client and runner in process, subtasks as processes), fresh controller \
         each run, {PULL_ROUNDS} alternating rounds, medians",
        args.agents
    );
    println!(
        "   push: {:.3} s = {push_rate:.0} subtasks/s ({push_all} s)   pull: {:.3} s = {pull_rate:.0} subtasks/s ({pull_all} s)",
        push.as_secs_f64(),
        pull.as_secs_f64()
    );
    println!(
        "   pull / push = {ratio:.2}   target ≥ {PULL_RATIO_TARGET}   {}",
        verdict(ratio >= PULL_RATIO_TARGET)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Recovery after kill -9
// ---------------------------------------------------------------------------

const RECOVERY_AGENTS: usize = 4;
const RECOVERY_SLOTS: u32 = 4;
/// Subtasks per job: two agents' worth, so the other agents have free slots
/// and a revived subtask waits for nothing but the recovery itself.
const RECOVERY_SUBTASKS: u64 = 8;
const RECOVERY_ROUNDS: usize = 3;
const RECOVERY_LEASE_TTL: Duration = Duration::from_secs(1);
const RECOVERY_HEARTBEAT: Duration = Duration::from_millis(250);
const RECOVERY_HOST_TIMEOUT: Duration = Duration::from_secs(2);
const RECOVERY_DISPATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Milliseconds since the Unix epoch (the store's attempt clock).
fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One round: a fresh controller in process, [`RECOVERY_AGENTS`] real agent
/// processes in `mode`, a job of [`RECOVERY_SUBTASKS`] long subtasks; once
/// every subtask is held, the agent holding the most is killed with
/// SIGKILL. Returns, for each subtask it held, the time from the kill until
/// its next attempt was leased (pull) or pushed (push) to another host
/// (the attempt's `started_ms` in the store, which is when the controller
/// handed it out).
fn recovery_round(rt: &tokio::runtime::Runtime, mode: &str) -> Result<Vec<Duration>> {
    use sparegrid_tests::controller::CGROUP_ROOT;
    use sparegrid_tests::{unique, Conf, Harness};

    // The controller in process; the agents are processes (below).
    let controller = InProcess::start(rt, |config| {
        config.dispatch.lease_ttl = RECOVERY_LEASE_TTL;
        config.dispatch.lease_wait_max = Duration::from_secs(2);
        config.dispatch.interval = RECOVERY_DISPATCH_INTERVAL;
        config.registry.heartbeat_interval = RECOVERY_HEARTBEAT;
        config.registry.host_timeout = RECOVERY_HOST_TIMEOUT;
    })?;
    let (store, base) = (Arc::clone(&controller.store), controller.base.clone());

    // Real agent processes (process runtime, own cgroup partition, load
    // signal off: RTT only, which nothing here moves). Drop order: the
    // agents (SIGTERM) before their harnesses (partitions).
    let mut harnesses: Vec<Harness> = Vec::new();
    let mut agents: Vec<(String, sparegrid_tests::Agent)> = Vec::new();
    for i in 0..RECOVERY_AGENTS {
        let mut h = Harness::new();
        let partition = unique("sgbench-recovery");
        h.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
        let host = format!("{mode}-{i}-{}", std::process::id());
        let mut c: Conf = h.base_conf();
        c.str("agent", "host_name", &host)
            .str("runtime", "kind", "process")
            .str("cgroup", "partition", &partition)
            .set("policy", "max_grid_vms", 0)
            .str("controller", "url", &base)
            .set("controller", "slots", RECOVERY_SLOTS)
            .str("controller", "dispatch", mode);
        for m in sparegrid_proto::Metric::ALL {
            let w = if m == sparegrid_proto::Metric::Rtt {
                "1.0"
            } else {
                "0.0"
            };
            c.set("load.weights", m.as_str(), w);
        }
        let agent = h.start(&c);
        harnesses.push(h);
        agents.push((host, agent));
    }
    let result = (|| -> Result<Vec<Duration>> {
        let started = Instant::now();
        while store.list_hosts()?.len() < RECOVERY_AGENTS {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the agents did not register"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A load sample each (leases and pushes wait for one).
        std::thread::sleep(Duration::from_millis(1000));

        let client = reqwest::blocking::Client::new();
        let job = serde_json::json!({
            "name": format!("recovery-{mode}"),
            "command": {"argv": ["sleep", "30"]},
            "split": {"range": {"start": 0, "end": RECOVERY_SUBTASKS, "chunk": 1}},
            "mode": mode,
        });
        let resp = client.post(format!("{base}/v1/jobs")).json(&job).send()?;
        ensure!(resp.status().as_u16() == 201, "submit: {}", resp.status());
        let id: serde_json::Value = resp.json()?;
        let id =
            sparegrid_controller::store::JobId(id["id"].as_str().context("no job id")?.to_owned());

        // Every subtask held by some host.
        let held = |store: &Arc<dyn Store>| -> Result<BTreeMap<String, Vec<u64>>> {
            let mut by_host: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for i in 0..RECOVERY_SUBTASKS {
                if let Some(a) = store
                    .attempts(&id, i)?
                    .into_iter()
                    .find(|a| a.state == sparegrid_controller::store::AttemptState::Running)
                {
                    by_host.entry(a.host).or_default().push(i);
                }
            }
            Ok(by_host)
        };
        let started = Instant::now();
        let by_host = loop {
            let h = held(&store)?;
            if h.values().map(Vec::len).sum::<usize>() as u64 == RECOVERY_SUBTASKS {
                break h;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{mode}: not every subtask was handed out: {h:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the agents start them (and a pulling one renew once).
        std::thread::sleep(RECOVERY_HEARTBEAT * 2);
        let (victim, indexes) = by_host
            .iter()
            .max_by_key(|(_, v)| v.len())
            .map(|(h, v)| (h.clone(), v.clone()))
            .context("nobody holds anything")?;
        let agent = &mut agents
            .iter_mut()
            .find(|(h, _)| *h == victim)
            .context("the victim is not one of ours")?
            .1;
        let killed_ms = now_unix_ms();
        agent.kill();

        // Each of its subtasks handed to another host.
        let mut out = Vec::new();
        let started = Instant::now();
        for i in &indexes {
            let again = loop {
                if let Some(a) = store
                    .attempts(&id, *i)?
                    .into_iter()
                    .find(|a| a.host != victim)
                {
                    break a;
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "{mode}: subtask {i} of {victim} was not handed to another host"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            out.push(Duration::from_millis(
                (again.started_ms - killed_ms).max(0) as u64
            ));
        }
        // Cancelled, so the survivors stop their `sleep 30`s at once.
        if let Err(e) = client.delete(format!("{base}/v1/jobs/{}", id.0)).send() {
            eprintln!("bench-controller: cancel {}: {e}", id.0);
        }
        Ok(out)
    })();
    drop(agents);
    drop(harnesses);
    drop(controller.stop(rt));
    result
}

/// Median and max of a sample, in ms.
fn median_max_ms(v: &[Duration]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(*v.last().expect("a sample")))
}

fn recovery(rt: &tokio::runtime::Runtime) -> Result<()> {
    if !sparegrid_tests::is_root() {
        println!("\n4. recovery after kill -9: skipped (needs root: the agents create cgroup partitions)");
        return Ok(());
    }
    // The agent binary beside this one (`make bench-controller` builds only
    // the controller and the bench): skip with the build command, not panic.
    let beside = std::env::current_exe()?.with_file_name("sparegrid-agent");
    if std::env::var_os("SPAREGRID_AGENT_BIN").is_none() && !beside.is_file() {
        println!(
            "\n4. recovery after kill -9: skipped (no {}; run `cargo build --release -p \
             sparegrid-agent` or set SPAREGRID_AGENT_BIN)",
            beside.display()
        );
        return Ok(());
    }
    println!(
        "\n(recovery: agent binary {})",
        sparegrid_tests::agent_bin().display()
    );
    let (mut pull, mut push) = (Vec::new(), Vec::new());
    for _ in 0..RECOVERY_ROUNDS {
        pull.extend(recovery_round(rt, "pull")?);
        push.extend(recovery_round(rt, "push")?);
    }
    let ms = |d: Duration| d.as_millis();
    let pull_bound = RECOVERY_LEASE_TTL + RECOVERY_HEARTBEAT;
    let push_bound = RECOVERY_HOST_TIMEOUT + RECOVERY_HEARTBEAT;
    println!(
        "\n4. recovery after kill -9: {RECOVERY_AGENTS} real agent processes × {RECOVERY_SLOTS} slots, \
         a job of {RECOVERY_SUBTASKS} `sleep 30` subtasks, the agent holding the most killed with SIGKILL; \
         time from the kill until each of its subtasks is handed to another host \
         (the new attempt's start in the store); {RECOVERY_ROUNDS} rounds per mode; \
         lease_ttl {} ms, heartbeat {} ms, host_timeout {} ms, dispatch interval {} ms",
        ms(RECOVERY_LEASE_TTL),
        ms(RECOVERY_HEARTBEAT),
        ms(RECOVERY_HOST_TIMEOUT),
        ms(RECOVERY_DISPATCH_INTERVAL)
    );
    let (pull_med, pull_max) = median_max_ms(&pull);
    let (push_med, push_max) = median_max_ms(&push);
    println!(
        "   pull ({} subtasks): median {pull_med:.0} ms, max {pull_max:.0} ms   \
         target ≤ lease_ttl + heartbeat = {} ms   {}",
        pull.len(),
        ms(pull_bound),
        verdict(pull_max <= pull_bound.as_secs_f64() * 1000.0)
    );
    println!(
        "   push ({} subtasks, for comparison): median {push_med:.0} ms, max {push_max:.0} ms   \
         (bound host_timeout + heartbeat = {} ms: {})",
        push.len(),
        ms(push_bound),
        if push_max <= push_bound.as_secs_f64() * 1000.0 {
            "within"
        } else {
            "over"
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. P2p balance
// ---------------------------------------------------------------------------

const P2P_AGENTS: usize = 4;
const P2P_RATIO_TARGET: f64 = 1.15;

/// Subtask `i`'s run time: 5 to 50 ms, spread by a fixed hash.
fn p2p_sleep_ms(i: u64) -> u64 {
    5 + (i.wrapping_mul(7919) % 46)
}

fn p2p_balance(rt: &tokio::runtime::Runtime, n: u64) -> Result<()> {
    use sparegrid_agent::config::Config;

    let mut run = InProcess::start(rt, |c| c.dispatch.p2p_seed_hosts = 1)?;
    for i in 0..P2P_AGENTS {
        let host = format!("p2p-{i}");
        let mut cfg = Config::default();
        cfg.controller.slots = 1;
        cfg.agent.data_dir = run.dir.path().join(&host);
        run.add_agent(rt, &host, cfg, true)?;
    }
    run.wait_registered()?;
    let exe = std::env::current_exe()?.display().to_string();
    let job = serde_json::json!({
        "name": "bench-p2p",
        "command": {"argv": [exe, "--subtask-sleep", "{start}"]},
        "split": {"range": {"start": 0, "end": n, "chunk": 1}},
        "mode": "p2p",
        "resources": {"timeout_secs": 60},
    });
    let (id, makespan) = run.run_job("p2p", &job, n, Duration::from_secs(1800), true)?;
    // Let the last heartbeats carry the final steal counts.
    std::thread::sleep(Duration::from_millis(2500));
    let steals = run.plane.steals_of(&id.0);
    let store = Arc::clone(&run.store);

    let planned_ms: u64 = (0..n).map(p2p_sleep_ms).sum();
    let mut measured_ms = 0u64;
    let mut from = 0;
    loop {
        let page = store.results(&id, from, 1000)?;
        let Some(last) = page.last() else { break };
        from = last.index + 1;
        measured_ms += page.iter().map(|a| a.duration_ms.unwrap_or(0)).sum::<u64>();
    }
    let dir = run.stop(rt);
    // Who ran what: the agents' own queues (the controller records the
    // seed host on each attempt).
    let mut per_host: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..P2P_AGENTS {
        let host = format!("p2p-{i}");
        let q = sparegrid_agent::peer::PeerQueue::open(&dir.path().join(&host), &host)?;
        let done = q
            .rows()?
            .iter()
            .filter(|r| r.state == sparegrid_agent::peer::queue::SubtaskState::Done)
            .count() as u64;
        per_host.insert(host, done);
    }

    let ideal = planned_ms as f64 / 1000.0 / P2P_AGENTS as f64;
    let ideal_measured = measured_ms as f64 / 1000.0 / P2P_AGENTS as f64;
    // Total work as the agents measured it (each run includes starting
    // its process); the planned sleeps alone leave that cost out.
    let ratio = makespan.as_secs_f64() / ideal_measured;
    let stolen: u64 = steals.iter().map(|s| s.stolen_in).sum();
    println!(
        "\n5. p2p balance: a {n}-subtask p2p job (5–50 ms each) seeded onto 1 of {P2P_AGENTS} real \
         agents × 1 slot (grid client, runner and peer node in process, subtasks as processes)"
    );
    println!(
        "   makespan {:.2} s; ideal = total work / {P2P_AGENTS} = {ideal_measured:.2} s (work as the agents \
         measured it, process start included; the planned sleeps alone: {ideal:.2} s)",
        makespan.as_secs_f64()
    );
    println!(
        "   makespan / ideal = {ratio:.3}   target ≤ {P2P_RATIO_TARGET}   {}   (vs the planned sleeps: {:.3})",
        verdict(ratio <= P2P_RATIO_TARGET),
        makespan.as_secs_f64() / ideal
    );
    println!(
        "   steals: {stolen} subtasks moved = {:.3} per subtask; by host (in, out): {}",
        stolen as f64 / n as f64,
        steals
            .iter()
            .map(|s| format!("{} ({}, {})", s.host, s.stolen_in, s.given_out))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "   subtasks run per host: {}",
        per_host
            .iter()
            .map(|(h, n)| format!("{h} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
