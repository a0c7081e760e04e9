//! In-process tests of the CLI: the real controller router
//! ([`crate::api::serve_on`]) over an in-memory SQLite store on
//! 127.0.0.1:0, served by a tokio runtime on a background thread, driven
//! through [`run_with`] with captured output. Jobs are finished through the
//! store directly (register a host, claim, complete).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::api::{serve_on, serve_tls_on, AppState};
use crate::config::{AuthConfig, ControllerConfig};
use crate::store::{JobId, Outcome, SqliteStore, Store};

/// A controller on a background runtime; stops when dropped.
struct Server {
    url: String,
    store: Arc<SqliteStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `router` (built on the runtime thread) on 127.0.0.1:0.
fn serve_router(make: impl FnOnce() -> axum::Router + Send + 'static) -> (String, Server0) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, make())
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    (format!("http://{addr}"), Server0(Some(stop_tx)))
}

/// Stops a [`serve_router`] server when dropped.
struct Server0(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Server0 {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

fn start() -> Server {
    start_with(
        ControllerConfig {
            events_poll: Duration::from_millis(20),
            ..ControllerConfig::default()
        },
        None,
    )
}

/// A controller with `config`, over HTTPS (`https://127.0.0.1:…`) with
/// `tls`.
fn start_with(config: ControllerConfig, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = AppState::new(store.clone() as Arc<dyn Store>, &config);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let stop = async {
                let _ = stop_rx.await;
            };
            match tls {
                Some(tls) => serve_tls_on(listener, tls, state, stop).await,
                None => serve_on(listener, state, stop).await,
            }
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Server {
        url: format!("{scheme}://{addr}"),
        store,
        stop: Some(stop_tx),
    }
}

struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.out.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.out))
    }
}

fn opts() -> RunOptions {
    RunOptions {
        progress: false,
        controller: None,
        token: None,
        ca_cert: None,
        watch: WatchOptions {
            poll_only: false,
            poll_interval: Duration::from_millis(20),
        },
    }
}

fn cli_at(url: &str, args: &[&str]) -> Run {
    let mut argv = vec!["sparegrid", "--controller", url];
    argv.extend_from_slice(args);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(argv, &mut out, &mut err, opts());
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

impl Server {
    fn cli(&self, args: &[&str]) -> Run {
        cli_at(&self.url, args)
    }

    /// Claims every queued subtask for host `h1` and completes each with
    /// its index and a newline on stdout.
    fn finish_all(&self) {
        self.store.upsert_host("h1", "127.0.0.1:1").unwrap();
        for a in self.store.claim("h1", 10_000).unwrap() {
            self.complete(&a.job, a.index, a.epoch);
        }
    }

    fn complete(&self, job: &JobId, index: u64, epoch: u32) {
        let out = format!("{index}\n").into_bytes();
        let outcome = Outcome {
            exit_code: Some(0),
            stdout_size: out.len() as u64,
            stdout: out,
            duration_ms: 1,
            ..Outcome::default()
        };
        self.store.complete(job, index, epoch, &outcome).unwrap();
    }
}

const TOML_JOB: &str = r#"
name = "sweep"
command = { argv = ["echo", "{start}", "{end}"] }

[split.range]
start = 0
end = 100
chunk = 10
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn items_json(n: usize) -> String {
    let items: Vec<String> = (0..n).map(|i| format!("item{i}")).collect();
    serde_json::json!({
        "name": "batch",
        "command": {"argv": ["cat"]},
        "split": {"items": {"items": items, "batch": 1}}
    })
    .to_string()
}

#[test]
fn submit_toml_and_json_then_status_and_list() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let toml = write(dir.path(), "job.toml", TOML_JOB);
    let json = write(dir.path(), "job.json", &items_json(3));

    let r = s.cli(&["submit", &toml]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert_eq!(r.out, "submitted job j-1 (sweep): 10 subtasks\n");

    let r = s.cli(&["--json", "submit", &json]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json(), serde_json::json!({"id": "j-2", "subtasks": 3}));

    let r = s.cli(&["status", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.starts_with("job j-1 (sweep): queued\n"), "{}", r.out);
    assert!(r.out.contains("  mode push, priority "), "{}", r.out);
    assert!(
        r.out
            .contains("0 done, 0 running, 10 queued, 0 failed, 0 cancelled of 10"),
        "{}",
        r.out
    );

    let r = s.cli(&["status", "j-2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let v = r.json();
    assert_eq!(v["id"], "j-2");
    assert_eq!(v["counts"]["total"], 3);
    assert_eq!(v["request"]["split"]["items"]["batch"], 1);

    let r = s.cli(&["status"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.out);
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE"));
    assert!(lines[1].starts_with("j-2 ") && lines[1].contains("batch"));
    assert!(lines[2].starts_with("j-1 ") && lines[2].contains("sweep"));
    // Columns line up: every row's STATE starts where the header's does.
    let col = lines[0].find("STATE").unwrap();
    assert!(
        lines[1..].iter().all(|l| &l[col..col + 6] == "queued"),
        "{}",
        r.out
    );

    let r = s.cli(&["--json", "status", "--limit", "1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json()["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn a_bad_job_file_names_the_field_and_sends_nothing() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        &TOML_JOB.replace("chunk = 10", "chunk = 0"),
    );
    let r = s.cli(&["submit", &bad]);
    assert_eq!(r.code, 2);
    assert!(r.out.is_empty(), "{}", r.out);
    assert!(r.err.starts_with("error: "), "{}", r.err);
    assert!(r.err.contains("bad.toml"), "{}", r.err);
    assert!(
        r.err
            .trim_end()
            .ends_with("(field: split.range.chunk, code: invalid_field)"),
        "{}",
        r.err
    );

    let bad = write(
        dir.path(),
        "bad.json",
        r#"{"command": {"argv": ["x"]}, "split": {"items": {"items": ["a"], "batch": 1}}, "colour": 1}"#,
    );
    let r = s.cli(&["submit", &bad]);
    assert_eq!(r.code, 2);
    assert!(
        r.err.contains("(field: colour, code: unknown_field)"),
        "{}",
        r.err
    );

    let r = s.cli(&["submit", &write(dir.path(), "job.yaml", "x")]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains(".toml or .json"), "{}", r.err);

    let r = s.cli(&["submit", &dir.path().join("absent.toml").to_string_lossy()]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("absent.toml"), "{}", r.err);

    assert_eq!(
        s.cli(&["--json", "status"]).json()["jobs"],
        serde_json::json!([])
    );
}

#[test]
fn api_errors_show_message_field_and_code() {
    let s = start();
    let r = s.cli(&["status", "j-404"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.err, "error: job j-404 not found (code: job_not_found)\n");

    // Local validation passes (the CLI's default limits); a controller
    // with a tighter limit refuses the job and names the field.
    let dir = tempfile::tempdir().unwrap();
    let strict = start_with(
        ControllerConfig {
            job_limits: crate::job::Limits {
                max_subtasks: 5,
                ..crate::job::Limits::default()
            },
            ..ControllerConfig::default()
        },
        None,
    );
    let job = write(dir.path(), "ten.toml", TOML_JOB);
    let r = strict.cli(&["submit", &job]);
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.err.starts_with("error: "), "{}", r.err);
    assert!(
        r.err
            .trim_end()
            .ends_with("(field: split.range.chunk, code: too_large)"),
        "{}",
        r.err
    );
    // A p2p job is taken, and its status names the mode.
    let p2p = write(
        dir.path(),
        "p2p.toml",
        &format!("mode = \"p2p\"\n{TOML_JOB}"),
    );
    let r = s.cli(&["submit", &p2p]);
    assert_eq!(r.code, 0, "{}", r.err);
    let r = s.cli(&["status", "j-1"]);
    assert!(r.out.contains("  mode p2p, priority "), "{}", r.out);
    // A pull job is taken, and its status names the mode.
    let pull = write(
        dir.path(),
        "pull.toml",
        &format!("mode = \"pull\"\n{TOML_JOB}"),
    );
    let r = s.cli(&["submit", &pull]);
    assert_eq!(r.code, 0, "{}", r.err);
    let r = s.cli(&["status", "j-2"]);
    assert!(r.out.contains("  mode pull, priority "), "{}", r.out);
    assert!(r.out.contains(", network none\n"), "{}", r.out);
    // An overlay job, on a controller without an overlay: refused, naming
    // the field.
    let overlay = write(
        dir.path(),
        "overlay.toml",
        &format!("network = \"overlay\"\n{TOML_JOB}"),
    );
    let r = s.cli(&["submit", &overlay]);
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    assert!(
        r.err.contains("(field: network, code: invalid_field)"),
        "{}",
        r.err
    );

    let r = s.cli(&["status", "--state", "sleeping"]);
    assert_eq!(r.code, 2);
    assert!(
        r.err.contains("(field: state, code: invalid_query)"),
        "{}",
        r.err
    );
}

#[test]
fn unreachable_controller_names_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let r = cli_at(&url, &["status"]);
    assert_eq!(r.code, 1);
    assert!(
        r.err
            .starts_with(&format!("error: cannot reach the controller at {url}")),
        "{}",
        r.err
    );
    let r = cli_at("localhost:7400", &["status"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("not an http://"), "{}", r.err);
}

#[test]
fn cancel_then_watch_exits_1() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let toml = write(dir.path(), "job.toml", TOML_JOB);
    assert_eq!(s.cli(&["submit", &toml]).code, 0);

    let r = s.cli(&["cancel", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        r.out,
        "cancelled job j-1: 10 queued subtasks dropped, 0 running being stopped\n"
    );
    let r = s.cli(&["cancel", "j-1"]);
    assert_eq!(r.out, "job j-1 is already cancelled; nothing to cancel\n");
    let r = s.cli(&["--json", "cancel", "j-1"]);
    assert_eq!(r.json()["changed"], false);

    let r = s.cli(&["watch", "j-1"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.out.starts_with("job j-1 cancelled: "), "{}", r.out);
    let r = s.cli(&["watch", "--poll", "j-1"]);
    assert_eq!(r.code, 1, "{}", r.err);

    let r = s.cli(&["cancel", "j-9"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("job_not_found"), "{}", r.err);
    let r = s.cli(&["watch", "j-9"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("job_not_found"), "{}", r.err);
}

#[test]
fn results_of_a_finished_job() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let json = write(dir.path(), "job.json", &items_json(3));
    assert_eq!(s.cli(&["submit", &json]).code, 0);

    // Not finished: 409 unless --partial.
    let r = s.cli(&["results", "j-1"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("code: job_not_finished"), "{}", r.err);
    assert!(r.err.contains("use --partial"), "{}", r.err);
    let r = s.cli(&["results", "j-1", "--partial"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "");
    assert!(r.err.contains("partial"), "{}", r.err);

    s.finish_all();

    let r = s.cli(&["results", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "0\n1\n2\n");
    assert_eq!(r.err, "");

    let r = s.cli(&["--json", "results", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let v = r.json();
    assert_eq!(v["complete"], true);
    assert_eq!(v["state"], "done");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[2]["stdout"], "2\n");
    assert_eq!(results[2]["host"], "h1");

    let file = dir.path().join("out.txt");
    let r = s.cli(&["results", "j-1", "-o", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "0\n1\n2\n");
    assert!(r.out.contains("wrote 6 bytes"), "{}", r.out);

    let r = s.cli(&["status", "j-1"]);
    assert!(r.out.starts_with("job j-1 (batch): done\n"), "{}", r.out);
    assert!(r.out.contains("ran for"), "{}", r.out);

    for args in [&["watch", "j-1"][..], &["watch", "j-1", "--poll"]] {
        let r = s.cli(args);
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(
            r.out.starts_with(
                "job j-1 done: 3 done, 0 running, 0 queued, 0 failed, 0 cancelled of 3"
            ),
            "{}",
            r.out
        );
    }
}

/// Completes the job's subtasks one by one while `watch` runs.
fn finish_slowly(s: &Server, n: usize) -> std::thread::JoinHandle<()> {
    let store = Arc::clone(&s.store);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        store.upsert_host("h1", "127.0.0.1:1").unwrap();
        let claimed = store.claim("h1", n).unwrap();
        for a in claimed {
            std::thread::sleep(Duration::from_millis(40));
            let outcome = Outcome {
                exit_code: Some(0),
                ..Outcome::default()
            };
            store.complete(&a.job, a.index, a.epoch, &outcome).unwrap();
        }
    })
}

#[test]
fn submit_watch_follows_the_job_to_done() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let json = write(dir.path(), "job.json", &items_json(4));
    let worker = finish_slowly(&s, 4);
    let r = s.cli(&["--json", "submit", "--watch", &json]);
    worker.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.err);
    let lines: Vec<Value> = r
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["id"], "j-1");
    assert_eq!(lines[0]["subtasks"], 4);
    let last = lines.last().unwrap();
    assert_eq!(last["state"], "done");
    assert_eq!(last["counts"]["done"], 4);
    // Progress came in steps, not only the end.
    assert!(lines.len() >= 4, "{}", r.out);
    assert!(lines[1..]
        .windows(2)
        .all(|w| w[0]["counts"]["done"].as_u64() <= w[1]["counts"]["done"].as_u64()));
}

#[test]
fn watch_by_polling_follows_the_job_to_done() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let json = write(dir.path(), "job.json", &items_json(3));
    assert_eq!(s.cli(&["submit", &json]).code, 0);
    let worker = finish_slowly(&s, 3);
    let r = s.cli(&["watch", "--poll", "j-1"]);
    worker.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.starts_with("job j-1 done: 3 done"), "{}", r.out);
}

#[test]
fn watch_falls_back_to_polling_when_events_are_not_served() {
    // A controller whose events route is missing (404 route_not_found) but
    // that answers GET /v1/jobs/{id}: the real router for everything else.
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let json = write(dir.path(), "job.json", &items_json(2));
    assert_eq!(s.cli(&["submit", &json]).code, 0);
    s.finish_all();
    let real = s.url.clone();
    let (url, _server) = serve_router(move || {
        axum::Router::new()
            .route(
                "/v1/jobs/{id}",
                axum::routing::get(
                    move |axum::extract::Path(id): axum::extract::Path<String>| {
                        let real = real.clone();
                        async move {
                            let body = tokio::task::spawn_blocking(move || {
                                reqwest::blocking::get(format!("{real}/v1/jobs/{id}"))
                                    .unwrap()
                                    .text()
                                    .unwrap()
                            })
                            .await
                            .unwrap();
                            ([("content-type", "application/json")], body)
                        }
                    },
                ),
            )
            .fallback(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    axum::Json(
                        serde_json::json!({"code": "route_not_found", "message": "no route"}),
                    ),
                )
            })
    });
    let r = cli_at(&url, &["watch", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("polling instead"), "{}", r.err);
    assert!(r.out.starts_with("job j-1 done: 2 done"), "{}", r.out);
}

#[test]
fn hosts_on_a_controller_without_the_route_says_so() {
    let (url, _server) = serve_router(|| {
        axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"code": "route_not_found", "message": "no route for /v1/hosts"})),
            )
        })
    });
    let r = cli_at(&url, &["hosts"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.err,
        format!(
            "error: the controller at {url} does not serve GET /v1/hosts (the host registry route is not deployed on it yet)\n"
        )
    );
}

#[test]
fn hosts_on_the_real_controller() {
    let s = start();
    let r = s.cli(&["hosts"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "no hosts registered\n");

    // A host the store knows (no heartbeat since this controller started).
    s.store.upsert_host("hv-7", "127.0.0.1:1").unwrap();
    let r = s.cli(&["hosts"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.out);
    assert!(lines[0].starts_with("HOST"), "{}", r.out);
    assert!(
        lines[1].starts_with("hv-7 ") && lines[1].contains("active"),
        "{}",
        r.out
    );

    let r = s.cli(&["--json", "hosts"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json()["hosts"][0]["id"], "hv-7");
}

#[test]
fn hosts_table_and_json_from_a_hosts_route() {
    let body = serde_json::json!({"hosts": [
        {"id": "hv-1", "state": "active", "load": 0.42, "dominant": "cpu",
         "free_slots": 2, "running": [{"job": "j-1", "index": 0, "epoch": 1}]}
    ]});
    let served = body.clone();
    let (url, _server) = serve_router(move || {
        axum::Router::new().route(
            "/v1/hosts",
            axum::routing::get(move || {
                let b = served.clone();
                async move { axum::Json(b) }
            }),
        )
    });
    let r = cli_at(&url, &["hosts"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.out);
    for word in ["hv-1", "active", "42%", "cpu", "2", "1"] {
        assert!(lines[1].contains(word), "{word}: {}", r.out);
    }
    let r = cli_at(&url, &["--json", "hosts"]);
    assert_eq!(r.json(), body);
}

#[test]
fn help_and_usage_errors() {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with(["sparegrid", "--help"], &mut out, &mut err, opts()),
        0
    );
    let help = String::from_utf8(out).unwrap();
    for cmd in [
        "submit", "status", "watch", "results", "cancel", "hosts", "--json",
    ] {
        assert!(help.contains(cmd), "{cmd}: {help}");
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        run_with(["sparegrid", "frobnicate"], &mut out, &mut err, opts()),
        2
    );
    assert!(!err.is_empty());
}

const SUBMIT: &str = "submit-token-cli";
const ADMIN: &str = "admin-token-cli";
const AGENT: &str = "agent-token-cli";

fn closed_config() -> ControllerConfig {
    ControllerConfig {
        events_poll: Duration::from_millis(20),
        auth: AuthConfig {
            agent_token: Some(AGENT.into()),
            submit_tokens: vec![SUBMIT.into()],
            admin_tokens: vec![ADMIN.into()],
        },
        ..ControllerConfig::default()
    }
}

/// Every command sends `--token`: against a controller with tokens each one
/// works with a submit token (`hosts` with an admin token), and without a
/// token or with the wrong role it prints what to do and exits 2.
#[test]
fn every_command_sends_the_token_and_refusals_are_clear() {
    let s = start_with(closed_config(), None);
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "job.json", &items_json(3));

    let r = s.cli(&["submit", job.as_str()]);
    assert_eq!(r.code, EXIT_USAGE, "{}", r.err);
    assert!(r.err.contains("code: unauthorized"), "{}", r.err);
    assert!(
        r.err.contains("--token") && r.err.contains(ENV_TOKEN),
        "{}",
        r.err
    );
    let r = s.cli(&["--token", "not-a-known-token", "status"]);
    assert_eq!(r.code, EXIT_USAGE, "{}", r.err);
    assert!(r.err.contains("refused the token"), "{}", r.err);

    let t = ["--token", SUBMIT];
    let with = |args: &[&str]| {
        let mut a = t.to_vec();
        a.extend_from_slice(args);
        s.cli(&a)
    };
    let r = with(&["--json", "submit", job.as_str()]);
    assert_eq!(r.code, EXIT_OK, "{}", r.err);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    s.finish_all();
    for args in [
        vec!["status"],
        vec!["status", id.as_str()],
        vec!["watch", id.as_str()],
        vec!["watch", "--poll", id.as_str()],
        vec!["results", id.as_str()],
        vec!["cancel", id.as_str()],
    ] {
        let r = with(&args);
        assert_eq!(r.code, EXIT_OK, "{args:?}: {}", r.err);
    }
    // `hosts` is the admin's.
    let r = with(&["hosts"]);
    assert_eq!(r.code, EXIT_USAGE, "{}", r.err);
    assert!(r.err.contains("code: forbidden"), "{}", r.err);
    assert!(r.err.contains("submit role"), "{}", r.err);
    let r = s.cli(&["--token", ADMIN, "hosts"]);
    assert_eq!(r.code, EXIT_OK, "{}", r.err);
    // The agent token is not a user's.
    let r = s.cli(&["--token", AGENT, "status", id.as_str()]);
    assert_eq!(r.code, EXIT_USAGE, "{}", r.err);
    assert!(r.err.contains("code: forbidden"), "{}", r.err);
}

/// An https:// controller with a self-signed certificate: refused with a
/// hint until `--ca-cert` (or `SPAREGRID_CA_CERT` via [`RunOptions`])
/// trusts it.
#[test]
fn https_controllers_need_their_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::api::tls::tests::self_signed(dir.path());
    let tls = crate::api::tls::server_config(&cert, &key).unwrap();
    let s = start_with(closed_config(), Some(tls));
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let job = write(dir.path(), "job.json", &items_json(2));

    let r = s.cli(&["--token", SUBMIT, "status"]);
    assert_eq!(r.code, EXIT_FAILURE, "{}", r.err);
    assert!(r.err.contains("not trusted"), "{}", r.err);
    assert!(r.err.contains("--ca-cert"), "{}", r.err);

    let ca = cert.to_str().unwrap();
    let r = s.cli(&[
        "--ca-cert",
        ca,
        "--token",
        SUBMIT,
        "--json",
        "submit",
        job.as_str(),
    ]);
    assert_eq!(r.code, EXIT_OK, "{}", r.err);
    assert_eq!(r.json()["subtasks"], 2);
    // The same through the RunOptions default (what SPAREGRID_CA_CERT sets).
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut o = opts();
    o.ca_cert = Some(cert.clone());
    o.token = Some(SUBMIT.into());
    let code = run_with(
        ["sparegrid", "--controller", &s.url, "status"],
        &mut out,
        &mut err,
        o,
    );
    assert_eq!(code, EXIT_OK, "{}", String::from_utf8_lossy(&err));
    assert!(String::from_utf8_lossy(&out).contains("queued"));

    // A CA file that is not PEM, or is missing, is named.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let r = s.cli(&["--ca-cert", junk.to_str().unwrap(), "status"]);
    assert_eq!(r.code, EXIT_USAGE, "{}", r.err);
    assert!(r.err.contains("junk.pem"), "{}", r.err);
    let r = s.cli(&["--ca-cert", "/nonexistent/ca.pem", "status"]);
    assert_ne!(r.code, EXIT_OK, "{}", r.err);
    assert!(r.err.contains("/nonexistent/ca.pem"), "{}", r.err);
}

#[test]
fn results_of_a_reduce_job_by_stage() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let mut job: serde_json::Value = serde_json::from_str(&items_json(3)).unwrap();
    job["reduce"] = serde_json::json!({"argv": ["tac"]});
    let json = write(dir.path(), "job.json", &job.to_string());
    assert_eq!(s.cli(&["submit", &json]).code, 0);
    // The maps, then the reduce subtask (index 3) the last map enqueued.
    s.finish_all();
    s.finish_all();

    let r = s.cli(&["results", "j-1"]);
    assert_eq!((r.code, r.out.as_str()), (0, "3\n"), "{}", r.err);
    let r = s.cli(&["results", "j-1", "--stage", "reduce"]);
    assert_eq!((r.code, r.out.as_str()), (0, "3\n"), "{}", r.err);
    let r = s.cli(&["results", "j-1", "--stage", "map"]);
    assert_eq!((r.code, r.out.as_str()), (0, "0\n1\n2\n"), "{}", r.err);
    let r = s.cli(&["--json", "results", "j-1", "--stage", "map"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.json()["results"].as_array().unwrap().len(), 3);

    let r = s.cli(&["results", "j-1", "--stage", "everything"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--stage"), "{}", r.err);

    // A job without a reduce step has no reduce stage.
    let plain = write(dir.path(), "plain.json", &items_json(1));
    assert_eq!(s.cli(&["submit", &plain]).code, 0);
    s.finish_all();
    let r = s.cli(&["results", "j-2", "--stage", "reduce"]);
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.err.contains("no reduce step"), "{}", r.err);
}

/// `status ID` of a pull job shows the leases held by host and the dead
/// subtasks with every attempt's error; `--json` carries both.
#[test]
fn status_shows_leases_by_host_and_dead_subtasks_with_their_errors() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let pull = write(
        dir.path(),
        "pull.toml",
        &format!("mode = \"pull\"\nmax_attempts = 2\n{TOML_JOB}"),
    );
    let r = s.cli(&["submit", &pull]);
    assert_eq!(r.code, 0, "{}", r.err);
    let job = JobId::from("j-1");
    let ttl = Duration::from_secs(600);
    let now = crate::agents::leases::wall_ms();
    for h in ["h1", "h2"] {
        s.store.upsert_host(h, "").unwrap();
    }
    // Subtask 0 fails twice (on h1, then h2): dead.
    for (round, host) in [(1u32, "h1"), (2, "h2")] {
        let a = s.store.claim_leases(host, 1, ttl, now).unwrap();
        assert_eq!((a[0].index, a[0].epoch), (0, round));
        let outcome = Outcome {
            exit_code: Some(3),
            error: Some(format!("bad input on {host}")),
            stderr: format!("trace\nboom {round}\n").into_bytes(),
            stderr_size: 13,
            ..Outcome::default()
        };
        s.store.complete(&job, 0, round, &outcome).unwrap();
    }
    // Then h1 holds 3 leases, h2 one.
    assert_eq!(s.store.claim_leases("h1", 3, ttl, now).unwrap().len(), 3);
    assert_eq!(s.store.claim_leases("h2", 1, ttl, now).unwrap().len(), 1);

    let r = s.cli(&["status", "j-1"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let out = &r.out;
    assert!(out.contains("  mode pull, priority "), "{out}");
    assert!(out.contains("  leases: 4 held"), "{out}");
    let row = |host: &str, n: u64| {
        out.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.first() == Some(&host) && cells.get(1) == Some(&n.to_string().as_str())
        })
    };
    assert!(row("h1", 3) && row("h2", 1), "{out}");
    assert!(out.contains("  dead subtasks: 1\n"), "{out}");
    assert!(out.contains("    subtask 0: 2 attempts"), "{out}");
    assert!(
        out.contains("      attempt 1 on h1: failed, exit 3, bad input on h1, stderr: boom 1"),
        "{out}"
    );
    assert!(
        out.contains("      attempt 2 on h2: failed, exit 3, bad input on h2, stderr: boom 2"),
        "{out}"
    );

    let v = s.cli(&["status", "j-1", "--json"]).json();
    assert_eq!(v["request"]["mode"], "pull", "{v}");
    let leases = v["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 2, "{v}");
    assert_eq!(
        (leases[0]["host"].as_str(), leases[0]["leases"].as_u64()),
        (Some("h1"), Some(3))
    );
    assert_eq!(
        (leases[1]["host"].as_str(), leases[1]["leases"].as_u64()),
        (Some("h2"), Some(1))
    );
    let expiry = leases[0]["earliest_expiry_ms"].as_i64().unwrap();
    assert_eq!(expiry, now + ttl.as_millis() as i64);
    let dead = v["dead_subtasks"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{v}");
    let attempts = dead[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1]["error"], "bad input on h2");
    assert_eq!(attempts[1]["stderr"], "trace\nboom 2\n");
    assert_eq!(attempts[1]["state"], "failed");

    // A push job shows neither.
    let r = s.cli(&["submit", &write(dir.path(), "push.toml", TOML_JOB)]);
    assert_eq!(r.code, 0, "{}", r.err);
    let v = s.cli(&["status", "j-2", "--json"]).json();
    assert_eq!(
        (v["leases"].clone(), v["dead_subtasks"].clone()),
        (Value::Array(vec![]), Value::Array(vec![]))
    );
    let r = s.cli(&["status", "j-2"]);
    assert!(
        !r.out.contains("leases") && !r.out.contains("dead"),
        "{}",
        r.out
    );
}
