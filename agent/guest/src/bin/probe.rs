//! `sparegrid-guest-probe`: a minimal host side of the guest channel, for
//! checking a real VM by hand or from `workloads/boot-check.sh`.
//!
//! Connects to the channel's unix socket, sends Attach (every second) until
//! the Hello with its session arrives (skipping anything else, as the host
//! does), and prints `hello <json>`. With `-- ARGV…` it then runs ARGV as
//! one subtask (or `--repeat N` in a row), copies its output to
//! stdout/stderr (unless `--quiet`) and prints `result <json>`; with
//! `--repeat` or `--quiet` it prints round-trip percentiles and output
//! throughput too (figures for a real VM, e.g. `--repeat 200 -- true`, or
//! `--quiet --cap 104857600 -- head -c 100M /dev/zero`).
//! Exit status 0 when the Hello came (and every subtask exited 0).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sparegrid_proto::guest::{
    decode_body, encode_frame, FrameDecoder, GuestMsg, HostMsg, RunSubtask, Stream,
    MAX_GUEST_FRAME, MAX_HOST_FRAME,
};

const USAGE: &str = "usage: sparegrid-guest-probe SOCKET [--timeout SECONDS] [--cap BYTES] \
     [--repeat N] [--quiet] [--env K=V]... [-- ARGV...]\n\
     Attaches to a guest worker over its channel socket, prints `hello <json>`;\n\
     with ARGV runs it (N times, output kept up to BYTES per stream, default 1 MiB)\n\
     and prints its output (unless --quiet) and `result <json>`; with --repeat or\n\
     --quiet also the round-trip p50/p90 and the output throughput on stderr.\n\
     --env adds a variable to the subtask's environment (e.g. the overlay's\n\
     SPAREGRID_OVERLAY_ADDRESS, to try the guest's NIC set-up).";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sparegrid-guest-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<ExitCode, String> {
    let mut sock = None;
    let mut timeout = Duration::from_secs(30);
    let mut argv = Vec::new();
    let mut cap: u64 = 1 << 20;
    let mut repeat: usize = 1;
    let mut quiet = false;
    let mut env = BTreeMap::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--" => argv = it.by_ref().collect(),
            "--quiet" => quiet = true,
            "--env" => {
                let v = it.next().ok_or("--env needs K=V")?;
                let (k, val) = v
                    .split_once('=')
                    .ok_or(format!("--env: `{v}` is not K=V"))?;
                env.insert(k.to_owned(), val.to_owned());
            }
            "--cap" => {
                let v = it.next().ok_or("--cap needs a value")?;
                cap = v
                    .parse()
                    .map_err(|_| format!("--cap: `{v}` is not a byte count"))?;
            }
            "--repeat" => {
                let v = it.next().ok_or("--repeat needs a value")?;
                repeat = v
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or(format!("--repeat: `{v}` is not a count >= 1"))?;
            }
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs a value")?;
                let s: f64 = v
                    .parse()
                    .map_err(|_| format!("--timeout: `{v}` is not a number"))?;
                timeout = Duration::try_from_secs_f64(s).map_err(|e| format!("--timeout: {e}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            s if sock.is_none() && !s.starts_with('-') => sock = Some(a),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    let sock = sock.ok_or(format!("no SOCKET given\n{USAGE}"))?;
    let deadline = Instant::now() + timeout;
    let mut s = connect(&sock, deadline)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let session = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id()) << 32;
    let mut dec = FrameDecoder::new(MAX_GUEST_FRAME);
    let mut last_attach: Option<Instant> = None;
    let hello = loop {
        if last_attach.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            send(
                &mut s,
                &HostMsg::Attach {
                    session,
                    heartbeat_ms: 1000,
                },
            )?;
            last_attach = Some(Instant::now());
        }
        if let Some(GuestMsg::Hello(h)) = recv(&mut s, &mut dec, deadline, true)? {
            if h.session == session {
                break h;
            }
        }
    };
    println!(
        "hello {}",
        serde_json::to_string(&hello).map_err(|e| e.to_string())?
    );
    if argv.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // Ids are unique per VM: another probe may have run one before.
    let mut ok = true;
    let mut round_trips = Vec::with_capacity(repeat);
    let mut received = 0u64;
    let t0 = Instant::now();
    for n in 0..repeat as u64 {
        let id = session.max(1).wrapping_add(n);
        let start = Instant::now();
        send(
            &mut s,
            &HostMsg::RunSubtask(RunSubtask {
                id,
                label: "probe".into(),
                argv: argv.clone(),
                env: env.clone(),
                stdin: Vec::new(),
                timeout_ms: timeout.as_millis() as u64,
                output_cap: cap,
            }),
        )?;
        let r = loop {
            match recv(&mut s, &mut dec, deadline, false)? {
                Some(GuestMsg::Output(o)) if o.id == id => {
                    received += o.data.len() as u64;
                    if !quiet {
                        let _ = match o.stream {
                            Stream::Stdout => std::io::stdout().write_all(&o.data),
                            Stream::Stderr => std::io::stderr().write_all(&o.data),
                        };
                    }
                }
                Some(GuestMsg::Result(r)) if r.id == id => break r,
                Some(GuestMsg::Rejected { reason }) => {
                    return Err(format!("guest rejected: {reason}"))
                }
                _ => {}
            }
        };
        round_trips.push(start.elapsed());
        let _ = std::io::stdout().flush();
        println!(
            "result {}",
            serde_json::to_string(&r).map_err(|e| e.to_string())?
        );
        ok &= r.exit_code == Some(0) && r.error.is_none();
    }
    let total = t0.elapsed();
    if repeat > 1 || quiet {
        round_trips.sort();
        let pct = |p: usize| round_trips[(round_trips.len() - 1) * p / 100].as_secs_f64() * 1e3;
        eprintln!(
            "probe: {repeat} run(s), round trip p50 {:.2} ms, p90 {:.2} ms; {received} output bytes in {:.2} s ({:.1} MiB/s)",
            pct(50),
            pct(90),
            total.as_secs_f64(),
            received as f64 / (1 << 20) as f64 / total.as_secs_f64().max(1e-9)
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn connect(path: &str, deadline: Instant) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(format!("connect {path}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn send(s: &mut UnixStream, msg: &HostMsg) -> Result<(), String> {
    let f = encode_frame(msg, MAX_HOST_FRAME).map_err(|e| e.to_string())?;
    s.write_all(&f).map_err(|e| format!("write: {e}"))
}

/// The next message, `None` after a read timeout (so the caller can resend).
/// With `resync`, bytes that are not frames are skipped (before the Hello).
fn recv(
    s: &mut UnixStream,
    dec: &mut FrameDecoder,
    deadline: Instant,
    resync: bool,
) -> Result<Option<GuestMsg>, String> {
    loop {
        match dec.next_frame() {
            Ok(Some(body)) => match decode_body::<GuestMsg>(&body) {
                Ok(m) => return Ok(Some(m)),
                Err(e) if !resync => return Err(e.to_string()),
                Err(_) => continue,
            },
            Ok(None) => {}
            Err(e) if !resync => return Err(e.to_string()),
            Err(_) => {
                dec.resync();
                continue;
            }
        }
        if Instant::now() >= deadline {
            return Err("timed out".into());
        }
        let mut buf = [0u8; 64 << 10];
        match s.read(&mut buf) {
            Ok(0) => return Err("the channel closed".into()),
            Ok(n) => dec.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
