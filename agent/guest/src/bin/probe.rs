//! `sparegrid-guest-probe`: a minimal host side of the guest channel, for
//! checking a real VM by hand or from `workloads/boot-check.sh`.
//!
//! Connects to the channel's unix socket, sends Attach (every second) until
//! the Hello with its session arrives (skipping anything else, as the host
//! does), and prints `hello <json>`. With `-- ARGV…` it then runs ARGV as
//! one subtask, copies its output to stdout/stderr and prints `result <json>`.
//! Exit status 0 when the Hello came (and the subtask exited 0).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sparegrid_proto::guest::{
    decode_body, encode_frame, FrameDecoder, GuestMsg, HostMsg, RunSubtask, Stream,
    MAX_GUEST_FRAME, MAX_HOST_FRAME,
};

const USAGE: &str = "usage: sparegrid-guest-probe SOCKET [--timeout SECONDS] [-- ARGV...]\n\
     Attaches to a guest worker over its channel socket, prints `hello <json>`;\n\
     with ARGV runs it once and prints its output and `result <json>`.";

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
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--" => argv = it.by_ref().collect(),
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
    let id = session.max(1);
    send(
        &mut s,
        &HostMsg::RunSubtask(RunSubtask {
            id,
            label: "probe".into(),
            argv,
            env: BTreeMap::new(),
            stdin: Vec::new(),
            timeout_ms: timeout.as_millis() as u64,
            output_cap: 1 << 20,
        }),
    )?;
    loop {
        match recv(&mut s, &mut dec, deadline, false)? {
            Some(GuestMsg::Output(o)) if o.id == id => {
                let _ = match o.stream {
                    Stream::Stdout => std::io::stdout().write_all(&o.data),
                    Stream::Stderr => std::io::stderr().write_all(&o.data),
                };
            }
            Some(GuestMsg::Result(r)) if r.id == id => {
                let _ = std::io::stdout().flush();
                println!(
                    "result {}",
                    serde_json::to_string(&r).map_err(|e| e.to_string())?
                );
                let ok = r.exit_code == Some(0) && r.error.is_none();
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            Some(GuestMsg::Rejected { reason }) => return Err(format!("guest rejected: {reason}")),
            _ => {}
        }
    }
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
