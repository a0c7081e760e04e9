//! The real `sparegrid-guest` binary against a test host on a unix socket
//! (`--port unix:<sock>`): the test binds the socket, the worker connects
//! (and reconnects), and the test speaks the proto frames. No root needed.
//! `SPAREGRID_GUEST_LOG=1` shows the worker's log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sparegrid_proto::guest::{
    decode_body, encode_frame, FrameDecoder, GuestMsg, Hello, HostMsg, RunSubtask, SubtaskResult,
    MAGIC, MAX_GUEST_FRAME, MAX_HOST_FRAME, OUTPUT_CHUNK, PROTOCOL_VERSION,
};

/// How long any single step may take before the test fails (generous: the
/// machine is shared and noisy; this is a hang guard, not a speed check).
const STEP: Duration = Duration::from_secs(30);

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Host {
    _dir: tempfile::TempDir,
    listener: UnixListener,
    s: UnixStream,
    dec: FrameDecoder,
    _worker: Worker,
}

fn spawn_worker(sock: &Path) -> Worker {
    let log = std::env::var_os("SPAREGRID_GUEST_LOG").is_some();
    Worker(
        Command::new(env!("CARGO_BIN_EXE_sparegrid-guest"))
            .args(if log { &["--verbose"][..] } else { &[] })
            .arg("--port")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("spawn sparegrid-guest"),
    )
}

fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + STEP;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "the worker never connected");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

impl Host {
    /// A worker connected to a fresh socket (not attached yet).
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("guest.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let worker = spawn_worker(&sock);
        let s = accept(&listener);
        Host {
            _dir: dir,
            listener,
            s,
            dec: FrameDecoder::new(MAX_GUEST_FRAME),
            _worker: worker,
        }
    }

    /// Drops the connection and takes the worker's next one.
    fn reconnect(&mut self) {
        self.s.shutdown(std::net::Shutdown::Both).unwrap();
        self.s = accept(&self.listener);
        self.dec = FrameDecoder::new(MAX_GUEST_FRAME);
    }

    fn send(&mut self, m: &HostMsg) {
        self.raw(&encode_frame(m, MAX_HOST_FRAME).unwrap());
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next message within `wait`, if any. `resync` skips non-frames
    /// (after a reconnect, the tail of an old frame may come first).
    fn try_recv(&mut self, wait: Duration, resync: bool) -> Option<GuestMsg> {
        let end = Instant::now() + wait;
        loop {
            match self.dec.next_frame() {
                Ok(Some(body)) => return Some(decode_body(&body).expect("a GuestMsg")),
                Ok(None) => {}
                Err(e) => {
                    assert!(resync, "bad frame from the worker: {e}");
                    self.dec.resync();
                    continue;
                }
            }
            if Instant::now() >= end {
                return None;
            }
            let mut buf = [0u8; 64 << 10];
            match self.s.read(&mut buf) {
                Ok(0) => panic!("worker closed the connection"),
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn recv(&mut self) -> GuestMsg {
        self.try_recv(STEP, false)
            .expect("no message from the worker in time")
    }

    /// Attach until the Hello with `session` (skipping anything else).
    fn attach_with(&mut self, session: u64, heartbeat_ms: u64) -> Hello {
        self.send(&HostMsg::Attach {
            session,
            heartbeat_ms,
        });
        let end = Instant::now() + STEP;
        while Instant::now() < end {
            if let Some(GuestMsg::Hello(h)) = self.try_recv(Duration::from_millis(200), true) {
                if h.session == session {
                    return h;
                }
            }
        }
        panic!("no Hello for session {session}");
    }

    fn attach(&mut self) -> Hello {
        self.attach_with(42, 1000)
    }

    /// Collects subtask `id`'s output (checking offsets are contiguous from
    /// `have`) until its Result.
    fn collect(&mut self, id: u64, have: [Vec<u8>; 2]) -> ([Vec<u8>; 2], SubtaskResult) {
        let mut out = have;
        loop {
            match self.recv() {
                GuestMsg::Output(o) => {
                    assert_eq!(o.id, id);
                    assert!(o.data.len() <= OUTPUT_CHUNK);
                    let buf = &mut out[o.stream as usize];
                    assert_eq!(
                        o.offset,
                        buf.len() as u64,
                        "gap or overlap in {:?}",
                        o.stream
                    );
                    buf.extend_from_slice(&o.data);
                }
                GuestMsg::Result(r) if r.id == id => return (out, r),
                GuestMsg::Rejected { reason } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    }

    fn run(&mut self, req: RunSubtask) -> (Vec<u8>, Vec<u8>, SubtaskResult) {
        let id = req.id;
        self.send(&HostMsg::RunSubtask(req));
        let ([o, e], r) = self.collect(id, Default::default());
        (o, e, r)
    }
}

fn sub(id: u64, argv: &[&str]) -> RunSubtask {
    RunSubtask {
        id,
        label: format!("job/{id}#1"),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: 0,
        output_cap: 1 << 20,
    }
}

fn sh(id: u64, script: &str) -> RunSubtask {
    sub(id, &["sh", "-c", script])
}

#[test]
fn says_nothing_before_attach_then_hello_with_the_session() {
    let mut h = Host::new();
    assert!(h.try_recv(Duration::from_millis(500), false).is_none());
    // Not even a Rejected for garbage before the first Attach.
    h.raw(b"\x00garbage before attach");
    assert!(h.try_recv(Duration::from_millis(300), false).is_none());
    let hello = h.attach_with(0xdead_beef_cafe, 1000);
    assert_eq!(hello.session, 0xdead_beef_cafe);
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.worker_version, env!("CARGO_PKG_VERSION"));
    for c in ["replay", "cancel", "timeout"] {
        assert!(hello.capabilities.iter().any(|x| x == c), "{hello:?}");
    }
    assert!(hello.interpreters.iter().any(|i| i == "sh"), "{hello:?}");
    assert!(hello.vcpus >= 1 && hello.memory_mib > 0, "{hello:?}");
    assert_eq!(hello.current, None);
}

#[test]
fn heartbeats_at_the_asked_interval_and_progress_while_running() {
    let mut h = Host::new();
    h.attach_with(1, 50);
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        if let GuestMsg::Heartbeat { seq, running, .. } = h.recv() {
            assert_eq!(running, None);
            seqs.push(seq);
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    h.send(&HostMsg::RunSubtask(sh(5, "echo x; sleep 1")));
    let (mut progress, mut running_beat) = (false, false);
    loop {
        match h.recv() {
            GuestMsg::Progress(p) => {
                assert_eq!(p.id, 5);
                progress = true;
            }
            GuestMsg::Heartbeat {
                running: Some(5), ..
            } => running_beat = true,
            GuestMsg::Result(r) => {
                assert_eq!(r.exit_code, Some(0));
                break;
            }
            _ => {}
        }
    }
    assert!(progress && running_beat);
}

#[test]
fn echo_with_stdin_env_and_cwd() {
    let mut h = Host::new();
    h.attach();
    let mut req = sh(1, "cat; echo \"$FOO $HOME $LANG $(pwd)\" >&2");
    req.stdin = (0..=255u8).cycle().take(100_000).collect();
    req.env.insert("FOO".into(), "bar".into());
    let (out, err, r) = h.run(req.clone());
    assert_eq!(out, req.stdin);
    assert_eq!(String::from_utf8_lossy(&err), "bar /tmp C /tmp\n");
    assert_eq!((r.exit_code, r.signal, r.error), (Some(0), None, None));
    assert_eq!((r.stdout_size, r.stderr_size), (100_000, err.len() as u64));
    assert!(!r.stdout_truncated && !r.timed_out);
}

#[test]
fn output_above_the_cap_is_truncated_and_counted() {
    let mut h = Host::new();
    h.attach();
    let mut req = sh(2, "head -c 700000 /dev/zero | tr '\\0' a; echo oops >&2");
    req.output_cap = 600_000; // more than two chunks kept
    let (out, err, r) = h.run(req);
    assert_eq!(out.len(), 600_000);
    assert!(out.iter().all(|&b| b == b'a'));
    assert_eq!(err, b"oops\n");
    assert_eq!(r.stdout_size, 700_000);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    let mut req = sh(3, "echo 0123456789");
    req.output_cap = 4;
    let (out, _, r) = h.run(req);
    assert_eq!((out.as_slice(), r.stdout_size), (&b"0123"[..], 11));
}

#[test]
fn exit_codes_signals_and_spawn_failures() {
    let mut h = Host::new();
    h.attach();
    let (_, _, r) = h.run(sh(1, "exit 3"));
    assert_eq!((r.exit_code, r.signal), (Some(3), None));
    let (_, _, r) = h.run(sh(2, "kill -TERM $$"));
    assert_eq!((r.exit_code, r.signal), (None, Some(15)));
    let (_, _, r) = h.run(sub(3, &["/no/such/binary"]));
    assert!(
        r.error.as_deref().unwrap().contains("cannot start"),
        "{r:?}"
    );
    assert_eq!(r.exit_code, None);
    let (_, _, r) = h.run(sub(4, &[]));
    assert_eq!(r.error.as_deref(), Some("empty argv"));
    // Odd input the OS refuses: a NUL in argv, odd env keys. A Result or a
    // run, never a crash.
    let (_, _, r) = h.run(sub(6, &["sh", "-c", "echo a\0b"]));
    assert!(r.error.is_some(), "{r:?}");
    let mut req = sh(7, "echo ok");
    req.env.insert(String::new(), "x".into());
    req.env.insert("A=B".into(), "y".into());
    req.env.insert("NUL\0".into(), "z".into());
    let (_, _, r) = h.run(req);
    assert!(r.error.is_some() || r.exit_code == Some(0), "{r:?}");
    let (out, _, r) = h.run(sh(5, "echo still here"));
    assert_eq!(
        (out.as_slice(), r.exit_code),
        (&b"still here\n"[..], Some(0))
    );
}

#[test]
fn a_timeout_kills_the_process_group() {
    let mut h = Host::new();
    h.attach();
    let mut req = sh(1, "sleep 60 & echo started; wait");
    req.timeout_ms = 300;
    let (out, _, r) = h.run(req);
    assert_eq!(out, b"started\n");
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.signal, Some(9));
    assert_eq!(r.error.as_deref(), Some("timed out after 300 ms"));
    assert!(r.duration_ms >= 300, "{r:?}");
}

#[test]
fn cancel_kills_and_a_second_subtask_while_busy_is_refused() {
    let mut h = Host::new();
    h.attach();
    h.send(&HostMsg::RunSubtask(sh(1, "echo go; sleep 60")));
    // Wait until it runs (its first output), then try a second one.
    loop {
        if let GuestMsg::Output(o) = h.recv() {
            assert_eq!(o.data, b"go\n");
            break;
        }
    }
    h.send(&HostMsg::RunSubtask(sh(2, "echo no")));
    loop {
        match h.recv() {
            GuestMsg::Result(r) => {
                assert_eq!(r.id, 2);
                assert!(r.error.as_deref().unwrap().starts_with("busy"), "{r:?}");
                break;
            }
            GuestMsg::Output(o) => panic!("output while busy: {o:?}"),
            _ => {}
        }
    }
    // The running one's id again: refused without a Result for that id.
    h.send(&HostMsg::RunSubtask(sh(1, "echo no")));
    loop {
        match h.recv() {
            GuestMsg::Rejected { reason } => {
                assert!(reason.contains("already running"), "{reason}");
                break;
            }
            GuestMsg::Result(r) => panic!("a result while running: {r:?}"),
            _ => {}
        }
    }
    h.send(&HostMsg::Cancel { id: 1 });
    let (_, r) = h.collect(1, [b"go\n".to_vec(), Vec::new()]);
    assert_eq!(r.error.as_deref(), Some("cancelled"));
    assert_eq!(r.signal, Some(9));
    assert!(!r.timed_out);
    // Free again.
    let (out, _, _) = h.run(sh(3, "echo after"));
    assert_eq!(out, b"after\n");
}

#[test]
fn replay_after_the_host_drops_mid_subtask_loses_no_byte() {
    let mut h = Host::new();
    h.attach_with(1, 1000);
    let script =
        "i=0; while [ $i -lt 40 ]; do echo out$i; echo err$i >&2; i=$((i+1)); sleep 0.02; done";
    h.send(&HostMsg::RunSubtask(sh(9, script)));
    let mut have: [Vec<u8>; 2] = Default::default();
    while have[0].len() < 20 {
        if let GuestMsg::Output(o) = h.recv() {
            let buf = &mut have[o.stream as usize];
            assert_eq!(o.offset, buf.len() as u64);
            buf.extend_from_slice(&o.data);
        }
    }
    h.reconnect();
    let hello = h.attach_with(2, 1000);
    let cur = hello.current.expect("the Hello names the held subtask");
    assert_eq!(cur.id, 9);
    h.send(&HostMsg::Replay {
        id: 9,
        stdout_from: have[0].len() as u64,
        stderr_from: have[1].len() as u64,
    });
    let ([out, err], r) = h.collect(9, have);
    let want = |p: &str| (0..40).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(String::from_utf8(out).unwrap(), want("out"));
    assert_eq!(String::from_utf8(err).unwrap(), want("err"));
    assert_eq!(r.exit_code, Some(0));
    // A finished subtask replays whole, with its Result; an unknown id does not.
    h.send(&HostMsg::Replay {
        id: 9,
        stdout_from: 0,
        stderr_from: 0,
    });
    let ([out, _], r2) = h.collect(9, Default::default());
    assert_eq!(String::from_utf8(out).unwrap(), want("out"));
    assert_eq!(r2.stdout_size, r.stdout_size);
    h.send(&HostMsg::Replay {
        id: 77,
        stdout_from: 0,
        stderr_from: 0,
    });
    let (_, r) = h.collect(77, Default::default());
    assert_eq!(r.error.as_deref(), Some("unknown subtask"));
}

#[test]
fn garbage_and_oversized_frames_are_rejected_and_the_worker_goes_on() {
    let mut h = Host::new();
    h.attach();
    let expect_rejected = |h: &mut Host| loop {
        match h.recv() {
            GuestMsg::Rejected { reason } => return reason,
            GuestMsg::Result(r) => panic!("unexpected result {r:?}"),
            _ => {}
        }
    };
    h.raw(b"this is not a frame");
    assert!(expect_rejected(&mut h).contains("where a frame should start"));
    let mut big = MAGIC.to_vec();
    big.extend_from_slice(&(MAX_HOST_FRAME as u32 + 1).to_be_bytes());
    h.raw(&big);
    assert!(expect_rejected(&mut h).contains("larger than the maximum"));
    // A well-formed frame whose body is not a HostMsg.
    let bogus = encode_frame(&GuestMsg::Rejected { reason: "x".into() }, MAX_HOST_FRAME).unwrap();
    h.raw(&bogus);
    assert!(expect_rejected(&mut h).contains("not a valid message"));
    let (out, _, r) = h.run(sh(1, "echo fine"));
    assert_eq!((out.as_slice(), r.exit_code), (&b"fine\n"[..], Some(0)));
    // Still the same session: a new Attach answers with a Hello.
    assert_eq!(h.attach_with(7, 1000).session, 7);
}

#[test]
fn reconnects_after_the_host_goes_away_between_subtasks() {
    let mut h = Host::new();
    h.attach_with(1, 1000);
    let (out, _, _) = h.run(sh(1, "echo one"));
    assert_eq!(out, b"one\n");
    h.reconnect();
    let hello = h.attach_with(2, 1000);
    assert_eq!(
        hello.current.map(|c| (c.id, c.finished)),
        Some((1, true)),
        "the last subtask is still held"
    );
    let (out, _, _) = h.run(sh(2, "echo two"));
    assert_eq!(out, b"two\n");
    // A finished subtask's id may come again (another host): it runs anew.
    let (out, _, _) = h.run(sh(2, "echo three"));
    assert_eq!(out, b"three\n");
}

#[test]
fn waits_for_the_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late.sock");
    let worker = spawn_worker(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(&sock).unwrap();
    let s = accept(&listener);
    let mut h = Host {
        _dir: dir,
        listener,
        s,
        dec: FrameDecoder::new(MAX_GUEST_FRAME),
        _worker: worker,
    };
    assert_eq!(h.attach_with(3, 1000).session, 3);
}
