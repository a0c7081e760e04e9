//! Job data end to end (docs/transfer.md, "Job data"): the real
//! `sparegrid-controller` process serving `/v1/data`, the real `sparegrid`
//! CLI uploading an input (`sparegrid upload`), a `lines` job that
//! references it (`input = { data = "ID" }`) run by a real agent (process
//! runtime), and `sparegrid results ID --output DIR/` writing each output
//! to its own file, the large ones fetched from the controller with Range.
//! Also: an upload broken off by a proxy that cuts the connection resumes
//! on a rerun of the same command, and bad references and tokens are
//! refused with errors that name the field.
//!
//! `root_` tests need root (the agent's cgroups) and are skipped otherwise.
//! Deadlines are generous bounds on waiting, never timing assertions.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sparegrid_controller::store::{HostState, JobState};
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

/// Lines of the input; blocks of BLOCK lines make the subtasks.
const LINES: usize = 400;
const BLOCK: usize = 150;
/// `data.output_file_above` here: the two full blocks' outputs (150 lines
/// of 12 bytes) are files, the last block's (100 lines) and the reduce's
/// stay inline.
const FILE_ABOVE: u64 = 1500;
/// Subtask 0 also writes this many `y` and a newline: an output of about
/// 900 KB, several of the CLI's 256 KiB download checkpoints.
const PAD: usize = 900_000;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `sparegrid --controller URL <args>` with `token` and the CLI state in
/// `state`; (exit code, stdout, stderr).
fn sparegrid(url: &str, token: &str, state: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(cli_bin())
        .arg("--controller")
        .arg(url)
        .args(args)
        .env("SPAREGRID_TOKEN", token)
        .env("SPAREGRID_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run sparegrid {args:?}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(r: (Option<i32>, String, String), what: &str) -> String {
    assert_eq!(
        r.0,
        Some(0),
        "`sparegrid {what}` failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        r.1,
        r.2
    );
    r.1
}

/// The input: `line-0000` … one per line, the last one without `\n`.
fn input_text(lines: usize) -> String {
    let mut s: String = (0..lines).map(|i| format!("line-{i:04}\n")).collect();
    s.pop();
    s
}

fn write_job(dir: &Path, name: &str, data_id: &str, block: usize) -> PathBuf {
    let text = format!(
        "name = {}\nmax_attempts = 3\n\
         command = {{ argv = [\"/bin/sh\", \"-c\", {}] }}\n\
         reduce = {{ argv = [\"/bin/sh\", \"-c\", \"wc -l\"] }}\n\n\
         [resources]\ntimeout_secs = 60\n\n\
         [split.lines]\ninput = {{ data = {} }}\nblock = {block}\n",
        toml_str(name),
        toml_str(&format!(
            "sed 's/^/x:/'; if [ \"$SPAREGRID_SUBTASK\" = 0 ]; then \
             head -c {PAD} /dev/zero | tr '\\0' y; echo; fi"
        )),
        toml_str(data_id)
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the job file");
    path
}

#[test]
fn root_lines_job_from_an_upload_runs_and_its_outputs_land_in_a_directory() {
    const T: &str = "root_lines_job_from_an_upload_runs_and_its_outputs_land_in_a_directory";
    if skip_unless_root(T) {
        return;
    }
    let mut c = Cluster::start_controller(|conf| {
        conf.sections.set("data", "output_file_above", FILE_ABOVE);
    });
    c.add_agent("data-a", 2, AgentLoad::MemoryOnly);
    c.wait_hosts("data-a to be eligible", secs(60), |v| {
        host(v, "data-a")
            .is_some_and(|h| h.state == HostState::Active && h.eligible && !h.breakdown.is_empty())
            .then_some(())
    });
    let url = c.controller.url();
    let token = c.tokens.submit.clone();
    let state = c.dir().join("cli-state");
    let input = input_text(LINES);
    let file = c.dir().join("input.txt");
    std::fs::write(&file, &input).unwrap();

    // Upload; a second run finds it complete and prints the same id.
    let up: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "upload", file.to_str().unwrap()],
            ),
            "upload",
        )
        .trim(),
    )
    .unwrap();
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(up["size"], input.len() as u64, "{up}");
    assert_eq!(up["sent"], input.len() as u64, "{up}");
    let again = ok(
        sparegrid(&url, &token, &state, &["upload", file.to_str().unwrap()]),
        "upload again",
    );
    assert_eq!(again.trim(), id);

    // The job references it.
    let job = write_job(c.dir(), "data-lines", &id, BLOCK);
    let sub: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "submit", job.to_str().unwrap()],
            ),
            "submit",
        )
        .trim(),
    )
    .unwrap();
    let blocks = LINES.div_ceil(BLOCK);
    assert_eq!(sub["subtasks"], blocks as u64, "{sub}");
    let job_id = sub["id"].as_str().unwrap().to_owned();
    let end = c.wait_job_end(&job_id, secs(180), |_| {});
    assert_eq!(
        end.job.state,
        JobState::Done,
        "{:?}\n{}",
        end.job,
        c.report()
    );

    // Outputs into a directory.
    let out_dir = c.dir().join("out");
    let dir_arg = format!("{}/", out_dir.display());
    let summary: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "results", &job_id, "--output", &dir_arg],
            ),
            "results --output DIR/",
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(summary["complete"], true, "{summary}");

    // What each subtask must have written: its block, each line prefixed.
    let lines: Vec<&str> = input.split_inclusive('\n').collect();
    let mut expected: Vec<(String, String)> = lines
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, block)| {
            let mut out: String = block.iter().map(|l| format!("x:{l}")).collect();
            if i == 0 {
                out.push_str(&"y".repeat(PAD));
                out.push('\n');
            }
            (format!("subtask-{i:05}.out"), out)
        })
        .collect();
    // The maps' outputs together have LINES lines plus the padding's, the
    // last without `\n`, which `wc -l` does not count.
    expected.push(("reduce.out".to_owned(), format!("{LINES}\n")));
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want_names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "files in {}", out_dir.display());
    for (name, want) in &expected {
        let got = std::fs::read_to_string(out_dir.join(name)).unwrap();
        assert_eq!(&got, want, "{name}");
    }
    // The two full blocks came as files (Range downloads), the rest inline.
    let fetched: Vec<(u64, String, bool)> = summary["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["index"].as_u64().unwrap(),
                o["stage"].as_str().unwrap().to_owned(),
                o["fetched"].as_bool().unwrap(),
            )
        })
        .collect();
    let want_fetched: Vec<(u64, String, bool)> = expected
        .iter()
        .enumerate()
        .map(|(i, (name, out))| {
            let stage = if name == "reduce.out" {
                "reduce"
            } else {
                "map"
            };
            (i as u64, stage.to_owned(), out.len() as u64 > FILE_ABOVE)
        })
        .collect();
    assert_eq!(fetched, want_fetched, "{summary}");
    assert!(fetched.iter().filter(|f| f.2).count() >= 2, "{summary}");

    // Run again: the files are there and verified; the same contents.
    ok(
        sparegrid(
            &url,
            &token,
            &state,
            &["results", &job_id, "--output", &dir_arg],
        ),
        "results --output DIR/ again",
    );
    for (name, want) in &expected {
        assert_eq!(
            &std::fs::read_to_string(out_dir.join(name)).unwrap(),
            want,
            "{name}"
        );
    }
    // An interrupted fetch resumes: subtask 0's file fetched again
    // through a proxy that cuts the download after 600 000 bytes, then
    // without the cut.
    let first = out_dir.join("subtask-00000.out");
    std::fs::remove_file(&first).unwrap();
    let proxy = CuttingProxy::start(c.controller.addr, Cut::Downstream, 600_000);
    let purl = format!("http://{}", proxy.addr);
    let cut = sparegrid(
        &purl,
        &token,
        &state,
        &["results", &job_id, "--output", &dir_arg],
    );
    assert_ne!(
        cut.0,
        Some(0),
        "the cut fetch succeeded?\n{}\n{}",
        cut.1,
        cut.2
    );
    assert!(
        cut.2.contains("run the same command again to resume"),
        "{}",
        cut.2
    );
    assert!(!first.exists(), "a partial file is never in place");
    proxy.budget.store(-1, Ordering::SeqCst);
    let again: Value = serde_json::from_str(
        ok(
            sparegrid(
                &purl,
                &token,
                &state,
                &["--json", "results", &job_id, "--output", &dir_arg],
            ),
            "results --output DIR/ (resume)",
        )
        .trim(),
    )
    .unwrap();
    let o0 = &again["outputs"][0];
    let resumed = o0["resumed_at"].as_u64().unwrap();
    assert!(
        resumed > 0 && resumed.is_multiple_of(256 << 10) && resumed < 600_000,
        "resumed at {resumed}: {o0}"
    );
    assert_eq!(std::fs::read_to_string(&first).unwrap(), expected[0].1);

    // The controller kept the uploaded input where `[data] dir` says.
    let kept = c.dir().join("data/files/complete").join(&id);
    assert_eq!(std::fs::read_to_string(kept).unwrap(), input);
}

/// Which way a [`CuttingProxy`] counts bytes against its budget.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Client to server (uploads).
    Upstream,
    /// Server to client (downloads).
    Downstream,
}

/// A TCP proxy that forwards at most `budget` bytes in the `cut`
/// direction over all connections (then cuts the connection that spent
/// it); a negative budget is unlimited. The other direction is copied as
/// is.
struct CuttingProxy {
    addr: SocketAddr,
    budget: Arc<AtomicI64>,
}

/// Copies `from` to `to`, spending `budget` when given; shuts both down.
fn pump(mut from: TcpStream, mut to: TcpStream, budget: Option<Arc<AtomicI64>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let left = budget.as_ref().map_or(-1, |b| b.load(Ordering::SeqCst));
        let n = if left < 0 { n } else { n.min(left as usize) };
        if left >= 0 {
            if let Some(b) = &budget {
                b.fetch_sub(n as i64, Ordering::SeqCst);
            }
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        if left >= 0
            && budget
                .as_ref()
                .is_some_and(|b| b.load(Ordering::SeqCst) <= 0)
        {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl CuttingProxy {
    fn start(server: SocketAddr, cut: Cut, budget: i64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let budget = Arc::new(AtomicI64::new(budget));
        let b = budget.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(server) else {
                    continue;
                };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (up, down) = match cut {
                    Cut::Upstream => (Some(b.clone()), None),
                    Cut::Downstream => (None, Some(b.clone())),
                };
                std::thread::spawn(move || pump(client, upstream, up));
                std::thread::spawn(move || pump(u2, c2, down));
            }
        });
        CuttingProxy { addr, budget }
    }
}

#[test]
fn upload_resumes_after_a_broken_connection() {
    let c = Cluster::start_controller(|conf| {
        conf.sections.set("data", "checkpoint_bytes", 1 << 20);
    });
    let token = c.tokens.submit.clone();
    let state = c.dir().join("cli-state");
    // 12 MiB of lines.
    let lines = 12 * (1 << 20) / 10;
    let input = input_text(lines);
    let size = input.len() as u64;
    let file = c.dir().join("big.txt");
    std::fs::write(&file, &input).unwrap();
    let cut_after: i64 = 5 * (1 << 20) + (1 << 19);
    let proxy = CuttingProxy::start(c.controller.addr, Cut::Upstream, cut_after);
    let url = format!("http://{}", proxy.addr);

    let first = sparegrid(
        &url,
        &token,
        &state,
        &["--json", "upload", file.to_str().unwrap()],
    );
    assert_ne!(
        first.0,
        Some(0),
        "the cut upload succeeded?\n{}\n{}",
        first.1,
        first.2
    );
    assert!(
        first.2.contains("run the same command again to resume"),
        "{}",
        first.2
    );

    // Same command, connection intact: it goes on from a checkpoint.
    proxy.budget.store(-1, Ordering::SeqCst);
    let second: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "upload", file.to_str().unwrap()],
            ),
            "upload (resume)",
        )
        .trim(),
    )
    .unwrap();
    let resumed_at = second["resumed_at"].as_u64().unwrap();
    assert!(
        resumed_at >= 1 << 20 && resumed_at <= cut_after as u64,
        "resumed at {resumed_at}: {second}"
    );
    assert_eq!(resumed_at % (1 << 20), 0, "not a checkpoint: {second}");
    assert_eq!(
        second["sent"].as_u64().unwrap(),
        size - resumed_at,
        "{second}"
    );
    let id = second["id"].as_str().unwrap().to_owned();

    // The controller holds the whole file, verified, and a job can use it.
    let status: Value = reqwest::blocking::Client::new()
        .get(format!("{}/v1/data/{id}", c.controller.url()))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["complete"], true, "{status}");
    assert_eq!(status["size"], size, "{status}");
    let kept = std::fs::read(c.dir().join("data/files/complete").join(&id)).unwrap();
    assert!(
        kept == input.as_bytes(),
        "the kept upload differs from the file"
    );
    let job = write_job(c.dir(), "big", &id, 100_000);
    let sub: Value = serde_json::from_str(
        ok(
            sparegrid(
                &c.controller.url(),
                &token,
                &state,
                &["--json", "submit", job.to_str().unwrap()],
            ),
            "submit",
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(sub["subtasks"], lines.div_ceil(100_000) as u64, "{sub}");
}

/// An HTTP answer: status and JSON body (Null when not JSON).
fn call(rb: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let r = rb.send().expect("request");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn bad_data_references_and_tokens_are_refused() {
    let c = Cluster::start_controller(|_| {});
    let base = c.controller.url();
    let http = reqwest::blocking::Client::new();
    let submit = c.tokens.submit.clone();
    let state = c.dir().join("cli-state");

    // Minting needs the submit (or admin) role.
    let (s, _) = call(http.post(format!("{base}/v1/data")));
    assert_eq!(s, 401);
    let (s, _) = call(
        http.post(format!("{base}/v1/data"))
            .bearer_auth(&c.tokens.agent),
    );
    assert_eq!(s, 403);
    let (s, m) = call(http.post(format!("{base}/v1/data")).bearer_auth(&submit));
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().unwrap().to_owned();
    let up = m["token"].as_str().unwrap().to_owned();
    let (_, other) = call(http.post(format!("{base}/v1/data")).bearer_auth(&submit));
    let other_token = other["token"].as_str().unwrap().to_owned();
    let files = format!("{base}/v1/data/v1/files");

    // An unfinished upload: 5 of 10 bytes.
    let digest = blake3::hash(b"abcd\nefgh\n").to_hex().to_string();
    use base64::Engine;
    let meta = format!(
        "blake3 {}",
        base64::engine::general_purpose::STANDARD.encode(&digest)
    );
    let tus = |rb: reqwest::blocking::RequestBuilder| rb.header("Tus-Resumable", "1.0.0");
    let created = tus(http.post(&files))
        .bearer_auth(&up)
        .header("Upload-Length", "10")
        .header("Upload-Metadata", &meta)
        .send()
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    // A standard tus client follows Location: it carries the prefix.
    assert_eq!(
        created.headers()["location"].to_str().unwrap(),
        format!("/v1/data/v1/files/{id}")
    );
    let patch = |token: Option<&str>| {
        let mut rb = tus(http.patch(format!("{files}/{id}")))
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body(b"abcd\n".to_vec());
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        call(rb)
    };
    // Wrong tokens first: none, forged, another upload's, the API token.
    assert_eq!(patch(None).0, 401);
    assert_eq!(patch(Some("v1.x.up.99999999999.AAAA")).0, 401);
    assert_eq!(patch(Some(&other_token)).0, 403);
    assert_eq!(patch(Some(&submit)).0, 401);
    assert_eq!(patch(Some(&up)).0, 204);
    // Traversal through the data prefix.
    let (s, _) = call(
        http.get(format!("{files}/..%2F..%2Fsigning.key"))
            .bearer_auth(&up),
    );
    assert_eq!(s, 400);

    let refused = |data_id: &str, want: &str| {
        let job = write_job(c.dir(), "bad", data_id, 1);
        let (code, out, err) =
            sparegrid(&base, &submit, &state, &["submit", job.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{data_id}: {out}\n{err}");
        assert!(
            err.contains("field: split.lines.input.data"),
            "{data_id}: {err}"
        );
        assert!(err.contains(want), "{data_id}: want {want:?} in {err}");
    };
    refused("in-0000unknown", "no upload has id");
    refused(&id, "5 of 10 bytes");
    refused("no/such", "not a data id");

    // The same through the API directly: 400 naming the field.
    let body = serde_json::json!({
        "command": {"argv": ["cat"]},
        "split": {"lines": {"input": {"data": id}, "block": 1}},
    });
    let (s, e) = call(
        http.post(format!("{base}/v1/jobs"))
            .bearer_auth(&submit)
            .json(&body),
    );
    assert_eq!(
        (s, e["field"].as_str()),
        (400, Some("split.lines.input.data")),
        "{e}"
    );

    // Finished, it is accepted.
    let (s, _) = call(
        tus(http.patch(format!("{files}/{id}")))
            .bearer_auth(&up)
            .header("Upload-Offset", "5")
            .header("Content-Type", "application/offset+octet-stream")
            .body(b"efgh\n".to_vec()),
    );
    assert_eq!(s, 204);
    let (s, r) = call(
        http.post(format!("{base}/v1/jobs"))
            .bearer_auth(&submit)
            .json(&body),
    );
    assert_eq!((s, r["subtasks"].as_u64()), (201, Some(2)), "{r}");
    // A download token is not an upload token, and vice versa.
    let (s, _) = call(tus(http.head(format!("{files}/{id}"))).bearer_auth(&up));
    assert_eq!(s, 200);
    let (s, _) = call(http.get(format!("{files}/{id}")).bearer_auth(&up));
    assert_eq!(s, 403);
    // Outputs of a job that is not finished: 409, named like results.
    let (s, e) = call(
        http.get(format!(
            "{base}/v1/data/jobs/{}/outputs",
            r["id"].as_str().unwrap()
        ))
        .bearer_auth(&submit),
    );
    assert_eq!(
        (s, e["code"].as_str()),
        (409, Some("job_not_finished")),
        "{e}"
    );
    let (s, e) = call(
        http.get(format!("{base}/v1/data/jobs/j-999/outputs"))
            .bearer_auth(&submit),
    );
    assert_eq!((s, e["code"].as_str()), (404, Some("job_not_found")), "{e}");
}

/// Stdout of the big-output subtask: 8 MiB (or
/// `$SPAREGRID_TEST_BIG_OUTPUT_MIB` MiB, for a figure) of a repeating
/// 251-byte pattern (so a byte out of place shows), far over the 1 MiB an
/// agent sends inline.
fn big() -> usize {
    std::env::var("SPAREGRID_TEST_BIG_OUTPUT_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(8 << 20, |m| m << 20)
}

fn big_output() -> Vec<u8> {
    (0..big()).map(|i| (i % 251) as u8).collect()
}

/// A one-subtask job printing [`big_output`], then sleeping a moment so
/// the spill file can be seen while the subtask still runs.
fn write_big_job(dir: &Path) -> PathBuf {
    let big = big();
    let script = format!(
        "import sys, time\n\
         p = bytes(range(251))\n\
         sys.stdout.buffer.write((p * ({big} // 251 + 1))[:{big}])\n\
         sys.stdout.flush()\n\
         time.sleep(3)\n"
    );
    let text = format!(
        "name = \"big-output\"\nmax_attempts = 1\n\
         command = {{ argv = [\"/usr/bin/python3\", \"-c\", {}] }}\n\n\
         [resources]\ntimeout_secs = 120\n\n\
         [split.range]\nstart = 0\nend = 1\nchunk = 1\n",
        toml_str(&script)
    );
    let path = dir.join("big.toml");
    std::fs::write(&path, text).expect("write the job file");
    path
}

/// The largest `*.out` spill file seen under `dir` while `stop` is unset.
fn watch_spills(
    dir: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut largest = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.path().extension().is_some_and(|x| x == "out") {
                        if let Ok(m) = e.metadata() {
                            largest = largest.max(m.len());
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        largest
    })
}

#[test]
fn root_an_output_over_the_inline_cap_is_uploaded_whole_and_fetched() {
    const T: &str = "root_an_output_over_the_inline_cap_is_uploaded_whole_and_fetched";
    if skip_unless_root(T) {
        return;
    }
    let mut c = Cluster::start_controller(|_| {});
    let a = c.add_agent("data-big", 1, AgentLoad::MemoryOnly);
    c.wait_hosts("data-big to be eligible", secs(60), |v| {
        host(v, "data-big")
            .is_some_and(|h| h.state == HostState::Active && h.eligible && !h.breakdown.is_empty())
            .then_some(())
    });
    let spill_dir = c.agents[a].data_dir().join("outputs");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_spills(spill_dir.clone(), stop.clone());
    let url = c.controller.url();
    let token = c.tokens.submit.clone();
    let state = c.dir().join("cli-state");
    let job = write_big_job(c.dir());
    let t0 = std::time::Instant::now();
    let sub: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "submit", job.to_str().unwrap()],
            ),
            "submit",
        )
        .trim(),
    )
    .unwrap();
    let job_id = sub["id"].as_str().unwrap().to_owned();
    let end = c.wait_job_end(&job_id, secs(180), |_| {});
    // A figure, not an assertion: submit to done, including the upload.
    eprintln!(
        "{} MiB output: submit to done in {:.2?}",
        big() >> 20,
        t0.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    let largest = watcher.join().unwrap();
    assert_eq!(
        end.job.state,
        JobState::Done,
        "{:?}\n{}",
        end.job,
        c.report()
    );
    // The agent held it in a spill file, not in memory, and removed it.
    assert!(
        largest > 1 << 20,
        "no spill file over 1 MiB seen in {} (largest {largest})",
        spill_dir.display()
    );
    let left: Vec<_> = std::fs::read_dir(&spill_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "out"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "spill files left: {left:?}");

    // The listing has it as a file of the whole size.
    let list: Value = reqwest::blocking::Client::new()
        .get(format!("{url}/v1/data/jobs/{job_id}/outputs"))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let want = big_output();
    let digest = blake3::hash(&want).to_hex().to_string();
    let o = &list["outputs"][0];
    assert_eq!(o["size"], want.len() as u64, "{list}");
    assert_eq!(o["file"]["size"], want.len() as u64, "{list}");
    assert_eq!(o["file"]["blake3"], digest.as_str(), "{list}");

    // `sparegrid results --output DIR/` writes exactly those bytes.
    let out_dir = c.dir().join("big-out");
    let dir_arg = format!("{}/", out_dir.display());
    let t1 = std::time::Instant::now();
    let summary: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &token,
                &state,
                &["--json", "results", &job_id, "--output", &dir_arg],
            ),
            "results --output DIR/",
        )
        .trim(),
    )
    .unwrap();
    eprintln!("results --output fetched it in {:.2?}", t1.elapsed());
    assert_eq!(summary["outputs"][0]["fetched"], true, "{summary}");
    let got = std::fs::read(out_dir.join("subtask-00000.out")).unwrap();
    assert_eq!(got.len(), want.len());
    assert_eq!(blake3::hash(&got).to_hex().to_string(), digest);
    let log = c.agents[a].agent.log();
    assert!(log.contains("output uploaded to the controller"), "{log}");
}

/// `POST /v1/agents/outputs` with `req` (MessagePack) and `token`.
fn ask_output(url: &str, token: &str, req: &sparegrid_proto::grid::OutputRequest) -> (u16, Value) {
    call(
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/agents/outputs"))
            .bearer_auth(token)
            .header("content-type", "application/msgpack")
            .body(rmp_serde::to_vec_named(req).unwrap()),
    )
}

#[test]
fn output_upload_requests_with_bad_fields_are_refused_naming_them() {
    use sparegrid_proto::grid::{AttemptRef, OutputRequest};
    let c = Cluster::start_controller(|_| {});
    let url = c.controller.url();
    let agent = c.tokens.agent.clone();
    let good = OutputRequest {
        host: "nobody".into(),
        attempt: AttemptRef {
            job: "j-1".into(),
            index: 0,
            epoch: 1,
        },
        size: 10 << 20,
        blake3: "ab".repeat(32),
    };
    let mut r = good.clone();
    r.size = 0;
    let (status, body) = ask_output(&url, &agent, &r);
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("size")),
        "{body}"
    );
    let mut r = good.clone();
    r.blake3 = "nothex".into();
    let (status, body) = ask_output(&url, &agent, &r);
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("blake3")),
        "{body}"
    );
    // Well-formed, but no such attempt on that host.
    let (status, body) = ask_output(&url, &agent, &good);
    assert_eq!(
        (status, body["code"].as_str(), body["field"].as_str()),
        (409, Some("not_current"), Some("attempt")),
        "{body}"
    );
    // A submit token is not an agent's.
    let (status, _) = ask_output(&url, &c.tokens.submit, &good);
    assert_eq!(status, 403);
}

#[test]
fn root_an_output_is_cut_inline_when_the_controller_serves_no_data() {
    const T: &str = "root_an_output_is_cut_inline_when_the_controller_serves_no_data";
    if skip_unless_root(T) {
        return;
    }
    let mut c = Cluster::start_controller(|conf| {
        conf.sections.set("data", "enabled", false);
    });
    let a = c.add_agent("data-none", 1, AgentLoad::MemoryOnly);
    c.wait_hosts("data-none to be eligible", secs(60), |v| {
        host(v, "data-none")
            .is_some_and(|h| h.state == HostState::Active && h.eligible && !h.breakdown.is_empty())
            .then_some(())
    });
    let url = c.controller.url();
    let state = c.dir().join("cli-state");
    let job = write_big_job(c.dir());
    let sub: Value = serde_json::from_str(
        ok(
            sparegrid(
                &url,
                &c.tokens.submit,
                &state,
                &["--json", "submit", job.to_str().unwrap()],
            ),
            "submit",
        )
        .trim(),
    )
    .unwrap();
    let job_id = sub["id"].as_str().unwrap().to_owned();
    let end = c.wait_job_end(&job_id, secs(180), |_| {});
    assert_eq!(
        end.job.state,
        JobState::Done,
        "{:?}\n{}",
        end.job,
        c.report()
    );
    let log = c.agents[a].agent.log();
    assert!(
        log.contains(&format!(
            "output of {} bytes not uploaded, sending its first 1048576 bytes inline",
            big()
        )) && log.contains("no_data"),
        "{log}"
    );
    let spill_dir = c.agents[a].data_dir().join("outputs");
    let left: Vec<_> = std::fs::read_dir(&spill_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "out"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "spill files left: {left:?}");
}
