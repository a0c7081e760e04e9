//! The pool against a fake guest: a `UnixListener` in a tempdir that the
//! session connects to, played by the test with the proto codec. Timeouts
//! are short where a test is about them and long elsewhere; no test asserts
//! how long anything took.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};
use sparegrid_proto::guest::{
    decode_body, encode_frame, Current, FrameDecoder, GuestMsg, Hello, HostMsg, Output, RunSubtask,
    Stream, SubtaskResult, HEADER_LEN, MAGIC, MAX_GUEST_FRAME, MAX_HOST_FRAME, PROTOCOL_VERSION,
};

use super::*;

/// How long a test waits for something that should happen (generous: the
/// machine is shared); running out is a test failure, not a measurement.
const PATIENCE: Duration = Duration::from_secs(20);

fn opts() -> LinkOptions {
    LinkOptions {
        spill: None,
        host: "h1".into(),
        hello_timeout: Duration::from_secs(30),
        heartbeat: Duration::from_millis(50),
        dead_after: Duration::from_secs(30),
        output_cap: 1 << 20,
    }
}

fn attempt(index: u64) -> AttemptRef {
    AttemptRef {
        job: "j-1".into(),
        index,
        epoch: 2,
    }
}

fn assignment(index: u64) -> Assignment {
    Assignment {
        network: sparegrid_proto::Network::None,
        attempt: attempt(index),
        argv: vec!["sh".into(), "-c".into(), "cat; echo done".into()],
        env: BTreeMap::from([("K".into(), "v".into())]),
        stdin: b"in\xff".to_vec(),
        timeout_ms: 60_000,
        vcpus: 1,
        memory_mib: 128,
    }
}

/// Polls `f` until it gives a value, sleeping on the pool's activity.
fn wait_for<T>(pool: &GuestPool, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = pool.activity().seen();
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        pool.activity().wait_since(seen, Duration::from_millis(20));
    }
}

fn wait_ready(pool: &GuestPool, vm: &str) {
    wait_for(pool, "ready", || {
        pool.take_ready().contains(&vm.to_owned()).then_some(())
    });
}

fn wait_failed(pool: &GuestPool, vm: &str) -> GuestFailure {
    wait_for(pool, "a failure", || {
        pool.take_failed()
            .into_iter()
            .find(|(n, _)| n == vm)
            .map(|(_, f)| f)
    })
}

fn wait_ended(pool: &GuestPool) -> VmEnd {
    wait_for(pool, "an end", || pool.take_ended().pop())
}

fn state(pool: &GuestPool, vm: &str) -> Option<VmLinkStatus> {
    pool.snapshot().into_iter().find(|s| s.vm == vm)
}

/// The guest end of the channel.
struct FakeGuest {
    stream: UnixStream,
    dec: FrameDecoder,
}

impl FakeGuest {
    fn accept(l: &UnixListener) -> FakeGuest {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + PATIENCE;
        let stream = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the session never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        FakeGuest {
            stream,
            dec: FrameDecoder::new(MAX_HOST_FRAME),
        }
    }

    /// The next host message that is not a host heartbeat.
    fn recv(&mut self) -> HostMsg {
        self.try_recv().expect("a host message in time")
    }

    /// Like `recv`, `None` when the channel closed or nothing came in time.
    fn try_recv(&mut self) -> Option<HostMsg> {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(body) = self.dec.next_frame().unwrap() {
                match decode_body::<HostMsg>(&body).unwrap() {
                    HostMsg::Heartbeat { .. } => {}
                    m => return Some(m),
                }
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
            }
        }
    }

    /// Next message that is not an Attach (repeats until the Hello lands).
    fn recv_not_attach(&mut self) -> HostMsg {
        loop {
            match self.recv() {
                HostMsg::Attach { .. } => {}
                m => return m,
            }
        }
    }

    /// Reads until EOF (true) or an error; host heartbeats are ignored.
    fn sees_eof(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    fn send(&mut self, m: &GuestMsg) {
        self.raw(&encode_frame(m, MAX_GUEST_FRAME).unwrap());
    }

    /// Sends, ignoring a closed channel.
    fn try_send(&mut self, m: &GuestMsg) {
        let _ = self
            .stream
            .write_all(&encode_frame(m, MAX_GUEST_FRAME).unwrap());
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn hello(session: u64, current: Option<Current>) -> GuestMsg {
        GuestMsg::Hello(Hello {
            session,
            protocol: PROTOCOL_VERSION,
            worker_version: "0.1.0-test".into(),
            capabilities: vec!["replay".into(), "cancel".into()],
            interpreters: vec!["sh".into()],
            vcpus: 1,
            memory_mib: 128,
            current,
        })
    }

    /// Reads the Attach and answers with a Hello; returns the nonce.
    fn handshake(&mut self, current: Option<Current>) -> u64 {
        let HostMsg::Attach { session, .. } = self.recv() else {
            panic!("expected Attach first");
        };
        self.send(&FakeGuest::hello(session, current));
        session
    }

    fn run_subtask(&mut self) -> RunSubtask {
        match self.recv_not_attach() {
            HostMsg::RunSubtask(r) => r,
            m => panic!("expected RunSubtask, got {m:?}"),
        }
    }

    fn output(&mut self, id: u64, stream: Stream, offset: u64, data: &[u8]) {
        self.send(&GuestMsg::Output(Output {
            id,
            stream,
            offset,
            data: data.to_vec(),
        }));
    }

    fn result(&mut self, id: u64, exit: i32, stdout_size: u64, stderr_size: u64) {
        self.send(&GuestMsg::Result(result(
            id,
            exit,
            stdout_size,
            stderr_size,
        )));
    }
}

fn result(id: u64, exit: i32, stdout_size: u64, stderr_size: u64) -> SubtaskResult {
    SubtaskResult {
        id,
        exit_code: Some(exit),
        signal: None,
        error: None,
        duration_ms: 42,
        stdout_size,
        stderr_size,
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
    }
}

fn listener(dir: &Path, vm: &str) -> (UnixListener, PathBuf) {
    let path = dir.join(format!("{vm}.channel.sock"));
    let _ = std::fs::remove_file(&path);
    (UnixListener::bind(&path).unwrap(), path)
}

/// A pool with one VM attached to a fake guest that said Hello.
fn ready_pool(o: LinkOptions) -> (tempfile::TempDir, Arc<GuestPool>, FakeGuest, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(o);
    pool.attach("vm1", path.clone());
    let mut g = FakeGuest::accept(&l);
    g.handshake(None);
    wait_ready(&pool, "vm1");
    (dir, pool, g, path)
}

fn completed(end: VmEnd) -> Completion {
    match end {
        VmEnd::Completed(c) => c,
        e => panic!("expected a completion, got {e:?}"),
    }
}

fn handed_back(end: VmEnd) -> (AttemptRef, String, String) {
    match end {
        VmEnd::HandedBack {
            attempt,
            vm,
            reason,
        } => (attempt, vm, reason),
        e => panic!("expected a hand-back, got {e:?}"),
    }
}

#[test]
fn handshake_and_one_subtask_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(opts());
    pool.attach("vm1", path);
    assert_eq!(state(&pool, "vm1").unwrap().state, LinkState::Connecting);
    assert_eq!(pool.idle(), 0);
    let mut g = FakeGuest::accept(&l);
    let HostMsg::Attach {
        session,
        heartbeat_ms,
    } = g.recv()
    else {
        panic!("expected Attach");
    };
    assert_eq!(heartbeat_ms, 50);
    g.send(&FakeGuest::hello(session, None));
    wait_ready(&pool, "vm1");
    assert!(pool.take_ready().is_empty(), "ready is reported once");
    assert_eq!(pool.idle(), 1);
    let st = state(&pool, "vm1").unwrap();
    assert_eq!(st.state, LinkState::Ready);
    assert_eq!(st.worker_version.as_deref(), Some("0.1.0-test"));

    pool.start(assignment(7)).unwrap();
    assert_eq!(pool.idle(), 0);
    assert_eq!(pool.running(), vec![attempt(7)]);
    let back = pool.start(assignment(8)).unwrap_err();
    assert_eq!(
        back,
        assignment(8),
        "no idle VM: the assignment comes back whole"
    );
    let r = g.run_subtask();
    assert_eq!(r.label, "j-1/7#2");
    assert_eq!(r.argv, assignment(7).argv);
    // The assignment's env plus the subtask's identity, as a process gets.
    let want: BTreeMap<String, String> = [
        ("K", "v"),
        ("SPAREGRID_JOB", "j-1"),
        ("SPAREGRID_INDEX", "7"),
        ("SPAREGRID_EPOCH", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(r.env, want);
    assert_eq!(r.stdin, b"in\xff");
    assert_eq!((r.timeout_ms, r.output_cap), (60_000, 1 << 20));
    let snap = state(&pool, "vm1").unwrap();
    assert_eq!(snap.state, LinkState::Busy);
    assert_eq!(snap.attempt, Some(attempt(7)));

    g.output(r.id, Stream::Stdout, 0, b"hel");
    g.send(&GuestMsg::Progress(sparegrid_proto::guest::Progress {
        id: r.id,
        elapsed_ms: 5,
        stdout_bytes: 3,
        stderr_bytes: 0,
    }));
    g.output(r.id, Stream::Stderr, 0, b"warn\n");
    g.send(&GuestMsg::Heartbeat {
        seq: 1,
        uptime_ms: 1000,
        running: Some(r.id),
    });
    g.output(r.id, Stream::Stdout, 3, b"lo\n");
    // A result for another id is ignored.
    g.result(r.id + 1000, 0, 0, 0);
    g.result(r.id, 3, 6, 5);
    let c = completed(wait_ended(&pool));
    assert_eq!(
        c,
        Completion {
            stdout_data: None,
            attempt: attempt(7),
            host: "h1".into(),
            exit_code: Some(3),
            signal: None,
            error: None,
            stdout: b"hello\n".to_vec(),
            stderr: b"warn\n".to_vec(),
            stdout_size: 6,
            stderr_size: 5,
            duration_ms: 42,
        }
    );
    assert!(pool.take_ended().is_empty());
    assert!(pool.take_failed().is_empty());
    assert_eq!(pool.idle(), 1);
    assert!(pool.running().is_empty());
    assert_eq!(state(&pool, "vm1").unwrap().state, LinkState::Ready);
}

#[test]
fn output_is_capped_full_sizes_kept_and_a_timeout_named() {
    let (_dir, pool, mut g, _) = ready_pool(LinkOptions {
        output_cap: 4,
        ..opts()
    });
    pool.start(assignment(1)).unwrap();
    let r = g.run_subtask();
    assert_eq!(r.output_cap, 4);
    // A guest that sends more than the cap: the pool keeps 4 bytes anyway.
    g.output(r.id, Stream::Stdout, 0, b"0123456789");
    let mut res = result(r.id, 0, 10, 0);
    res.exit_code = None;
    res.signal = Some(9);
    res.timed_out = true;
    res.stdout_truncated = true;
    g.send(&GuestMsg::Result(res));
    let c = completed(wait_ended(&pool));
    assert_eq!(c.stdout, b"0123");
    assert_eq!(c.stdout_size, 10);
    assert_eq!((c.exit_code, c.signal), (None, Some(9)));
    assert_eq!(c.error.as_deref(), Some("timeout after 60000 ms"));
    assert!(!c.succeeded());
}

#[test]
fn a_guest_that_never_says_hello_fails_and_nothing_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(LinkOptions {
        hello_timeout: Duration::from_millis(300),
        ..opts()
    });
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    assert!(matches!(g.recv(), HostMsg::Attach { .. }));
    let f = wait_failed(&pool, "vm1");
    assert_eq!(
        f,
        GuestFailure::NoHello {
            after: Duration::from_millis(300)
        }
    );
    assert_eq!(f.to_string(), "no Hello within 0.3 s");
    assert!(pool.take_ended().is_empty());
    assert!(pool.take_ready().is_empty());
    assert_eq!(state(&pool, "vm1").unwrap().state, LinkState::Failed);
    assert!(g.sees_eof(), "the host closes the channel");
    assert!(pool.take_failed().is_empty(), "reported once");
    pool.reclaimed("vm1");
    assert!(pool.snapshot().is_empty());
    assert!(pool.take_ended().is_empty());
}

#[test]
fn a_socket_that_never_accepts_fails_with_the_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let pool = GuestPool::new(LinkOptions {
        hello_timeout: Duration::from_millis(200),
        ..opts()
    });
    pool.attach("vm1", dir.path().join("missing.sock"));
    match wait_failed(&pool, "vm1") {
        GuestFailure::NoConnection { error, .. } => {
            assert!(error.contains("missing.sock"), "{error}")
        }
        f => panic!("expected NoConnection, got {f:?}"),
    }
}

#[test]
fn a_guest_that_dies_mid_subtask_hands_it_back() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(3)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"partial");
    drop(g);
    let f = wait_failed(&pool, "vm1");
    assert!(matches!(f, GuestFailure::ChannelClosed { .. }), "{f:?}");
    assert!(f.to_string().starts_with("channel closed (guest died?)"));
    let (a, vm, reason) = handed_back(wait_ended(&pool));
    assert_eq!((a, vm.as_str()), (attempt(3), "vm1"));
    assert!(reason.contains("channel closed"), "{reason}");
    assert!(
        pool.take_ended().is_empty(),
        "handed back once, never completed"
    );
    assert!(pool.running().is_empty());
    // The control loop reclaims it: nothing more to hand back.
    pool.reclaimed("vm1");
    assert!(pool.take_ended().is_empty());
}

#[test]
fn a_frame_larger_than_the_maximum_fails_the_vm() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(4)).unwrap();
    g.run_subtask();
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&5_000_000u32.to_be_bytes());
    g.raw(&h);
    let f = wait_failed(&pool, "vm1");
    assert_eq!(
        f,
        GuestFailure::FrameTooLarge {
            size: 5_000_000,
            max: MAX_GUEST_FRAME
        }
    );
    assert_eq!(f.to_string(), "frame of 5000000 bytes exceeds 1048576");
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(4));
}

#[test]
fn garbage_after_the_hello_fails_the_vm() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(5)).unwrap();
    g.run_subtask();
    g.raw(b"Hello from a confused guest\n");
    let f = wait_failed(&pool, "vm1");
    assert!(matches!(f, GuestFailure::Garbage { .. }), "{f:?}");
    assert!(f.to_string().starts_with("garbage on the channel: "), "{f}");
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(5));
    // A well-formed frame whose body is not a guest message is garbage too.
    let (_dir, pool, mut g, _) = ready_pool(opts());
    let mut frame = MAGIC.to_vec();
    frame.extend_from_slice(&3u32.to_be_bytes());
    frame.extend_from_slice(&[0x93, 1, 2]);
    g.raw(&frame);
    assert!(matches!(
        wait_failed(&pool, "vm1"),
        GuestFailure::Garbage { .. }
    ));
    assert!(pool.take_ended().is_empty(), "no subtask, nothing ends");
}

#[test]
fn a_silent_guest_fails_but_not_while_paused() {
    let (_dir, pool, mut g, _) = ready_pool(LinkOptions {
        dead_after: Duration::from_millis(300),
        ..opts()
    });
    pool.start(assignment(6)).unwrap();
    let r = g.run_subtask();
    pool.paused("vm1");
    // Silent for several times dead_after while paused: no failure.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(pool.take_failed().is_empty());
    let snap = state(&pool, "vm1").unwrap();
    assert_eq!(snap.state, LinkState::Paused);
    assert!(snap.paused_ms > 0 && snap.subtask_paused_ms > 0, "{snap:?}");
    assert_eq!(pool.idle(), 0, "a paused VM takes no work");
    pool.resumed("vm1");
    // Heartbeats keep it alive after the resume ...
    for seq in 0..8 {
        g.send(&GuestMsg::Heartbeat {
            seq,
            uptime_ms: seq * 50,
            running: Some(r.id),
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pool.take_failed().is_empty());
    // ... and when they stop, the guest is declared dead.
    let f = wait_failed(&pool, "vm1");
    match &f {
        GuestFailure::Silent { ago } => assert!(*ago > Duration::from_millis(300)),
        f => panic!("expected Silent, got {f:?}"),
    }
    assert!(
        f.to_string().starts_with("guest stopped heartbeating "),
        "{f}"
    );
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(6));
}

#[test]
fn a_silent_guest_that_got_no_cpu_is_starved_not_dead() {
    let (_dir, pool, mut g, _) = ready_pool(LinkOptions {
        dead_after: Duration::from_millis(300),
        ..opts()
    });
    pool.vm_cpu("vm1", 1_000_000_000);
    pool.start(assignment(7)).unwrap();
    let r = g.run_subtask();
    // Silent for several times dead_after, but the VM got only 20 ms of CPU
    // meanwhile (customers hold the host): starved, not dead.
    for i in 1..=12u64 {
        std::thread::sleep(Duration::from_millis(100));
        pool.vm_cpu("vm1", 1_000_000_000 + i * 2_000_000);
    }
    assert!(pool.take_failed().is_empty());
    assert_eq!(state(&pool, "vm1").unwrap().state, LinkState::Busy);
    // A frame restarts the count; then silence while the VM burns CPU is
    // a dead guest (a third of dead_after in CPU is enough).
    g.send(&GuestMsg::Heartbeat {
        seq: 1,
        uptime_ms: 10,
        running: Some(r.id),
    });
    std::thread::sleep(Duration::from_millis(50));
    pool.vm_cpu("vm1", 2_000_000_000);
    let f = wait_failed(&pool, "vm1");
    assert!(matches!(f, GuestFailure::Silent { .. }), "{f:?}");
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(7));
}

#[test]
fn a_guest_silent_ten_times_dead_after_is_dead_even_without_cpu() {
    let (_dir, pool, mut g, _) = ready_pool(LinkOptions {
        dead_after: Duration::from_millis(100),
        ..opts()
    });
    pool.vm_cpu("vm1", 5_000_000_000);
    pool.start(assignment(8)).unwrap();
    let _ = g.run_subtask();
    // No CPU at all (a QEMU stopped from outside): still failed, once the
    // silence passes STARVED_MAX_FACTOR × dead_after.
    let f = wait_failed(&pool, "vm1");
    match f {
        GuestFailure::Silent { ago } => {
            assert!(
                ago > Duration::from_millis(100) * STARVED_MAX_FACTOR,
                "{ago:?}"
            )
        }
        f => panic!("expected Silent, got {f:?}"),
    }
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(8));
}

#[test]
fn reclaimed_mid_subtask_is_handed_back_as_preempted() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(9)).unwrap();
    g.run_subtask();
    pool.reclaimed("vm1");
    let (a, vm, reason) = handed_back(wait_ended(&pool));
    assert_eq!(
        (a, vm.as_str(), reason.as_str()),
        (attempt(9), "vm1", "preempted")
    );
    assert!(g.sees_eof(), "the session ends");
    assert!(pool.take_failed().is_empty(), "a reclaim is not a failure");
    assert!(pool.snapshot().is_empty());
    assert!(pool.running().is_empty());
}

#[test]
fn save_and_restore_replays_the_output_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(opts());
    pool.attach("vm1", path.clone());
    let mut g = FakeGuest::accept(&l);
    g.handshake(None);
    wait_ready(&pool, "vm1");
    pool.start(assignment(10)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"abc");
    g.output(r.id, Stream::Stderr, 0, b"E");
    wait_for(&pool, "output received", || {
        (state(&pool, "vm1")?.output_bytes == 4).then_some(())
    });
    pool.saving("vm1");
    // QEMU goes away: the EOF is expected. A frame cut in half comes first.
    let half = encode_frame(
        &GuestMsg::Output(Output {
            id: r.id,
            stream: Stream::Stdout,
            offset: 3,
            data: b"def".to_vec(),
        }),
        MAX_GUEST_FRAME,
    )
    .unwrap();
    g.raw(&half[..half.len() / 2]);
    drop(g);
    drop(l);
    wait_for(&pool, "saving", || {
        (state(&pool, "vm1")?.state == LinkState::Saving).then_some(())
    });
    assert!(pool.take_failed().is_empty(), "an expected EOF");
    assert!(pool.take_ended().is_empty());
    assert_eq!(pool.running(), vec![attempt(10)]);
    assert_eq!(pool.idle(), 0);

    // Restored: a new QEMU listens on the same path.
    let (l, path2) = listener(dir.path(), "vm1");
    pool.attach("vm1", path2);
    let mut g = FakeGuest::accept(&l);
    let HostMsg::Attach { session, .. } = g.recv() else {
        panic!("expected Attach")
    };
    // The tail of a frame from before the save, then the Hello.
    g.raw(&half[half.len() / 2..]);
    g.send(&FakeGuest::hello(
        session,
        Some(Current {
            id: r.id,
            finished: true,
        }),
    ));
    match g.recv_not_attach() {
        HostMsg::Replay {
            id,
            stdout_from,
            stderr_from,
        } => assert_eq!((id, stdout_from, stderr_from), (r.id, 3, 1)),
        m => panic!("expected Replay, got {m:?}"),
    }
    wait_ready(&pool, "vm1");
    // A guest that replays more than asked: duplicates are dropped.
    g.output(r.id, Stream::Stdout, 0, b"abcdef");
    g.output(r.id, Stream::Stderr, 1, b"\n");
    g.result(r.id, 0, 6, 2);
    let c = completed(wait_ended(&pool));
    assert_eq!(c.stdout, b"abcdef");
    assert_eq!(c.stderr, b"E\n");
    assert_eq!((c.stdout_size, c.stderr_size), (6, 2));
    assert!(c.succeeded());
    assert!(pool.take_failed().is_empty());
    assert_eq!(pool.idle(), 1);
}

#[test]
fn a_restored_guest_that_lost_the_subtask_hands_it_back() {
    let (dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(11)).unwrap();
    g.run_subtask();
    pool.saving("vm1");
    drop(g);
    wait_for(&pool, "saving", || {
        (state(&pool, "vm1")?.state == LinkState::Saving).then_some(())
    });
    let (l, path) = listener(dir.path(), "vm1");
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    g.handshake(None);
    let (a, _, reason) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(11));
    assert!(reason.contains("no longer holds"), "{reason}");
    assert!(pool.take_failed().is_empty());
    wait_for(&pool, "idle", || (pool.idle() == 1).then_some(()));
}

#[test]
fn a_cancelled_subtask_is_not_reported_and_its_vm_is_idle_again() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(12)).unwrap();
    let r = g.run_subtask();
    pool.cancel(&attempt(12));
    assert!(pool.running().is_empty());
    assert_eq!(pool.idle(), 0, "busy until the guest's Result");
    match g.recv_not_attach() {
        HostMsg::Cancel { id } => assert_eq!(id, r.id),
        m => panic!("expected Cancel, got {m:?}"),
    }
    g.output(r.id, Stream::Stdout, 0, b"x");
    let mut res = result(r.id, 0, 1, 0);
    res.exit_code = None;
    res.signal = Some(9);
    res.error = Some("cancelled".into());
    g.send(&GuestMsg::Result(res));
    wait_for(&pool, "idle", || (pool.idle() == 1).then_some(()));
    assert!(
        pool.take_ended().is_empty(),
        "a withdrawn attempt is not reported"
    );
    assert!(pool.take_failed().is_empty());
    // The VM takes the next subtask.
    pool.start(assignment(13)).unwrap();
    let r2 = g.run_subtask();
    assert_ne!(r2.id, r.id);
    g.result(r2.id, 0, 0, 0);
    assert_eq!(completed(wait_ended(&pool)).attempt, attempt(13));
}

#[test]
fn bytes_before_the_hello_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(opts());
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    let HostMsg::Attach { session, .. } = g.recv() else {
        panic!("expected Attach")
    };
    g.raw(b"console noise\r\n\x00\xff");
    g.raw(&MAGIC[..2]);
    g.send(&GuestMsg::Heartbeat {
        seq: 0,
        uptime_ms: 1,
        running: None,
    });
    // A Hello for an older session is not ours.
    g.send(&FakeGuest::hello(session.wrapping_add(1), None));
    assert!(pool.take_ready().is_empty());
    g.send(&FakeGuest::hello(session, None));
    wait_ready(&pool, "vm1");
    assert!(pool.take_failed().is_empty());
    // And the channel is in step afterwards.
    pool.start(assignment(14)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"ok");
    g.result(r.id, 0, 2, 0);
    assert_eq!(completed(wait_ended(&pool)).stdout, b"ok");
}

#[test]
fn a_fake_frame_start_before_the_hello_does_not_swallow_it() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(opts());
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    let HostMsg::Attach { session, .. } = g.recv() else {
        panic!("expected Attach")
    };
    // Output data that happened to contain a frame header announcing a
    // large body: the Hello after it would be read as that body.
    let mut fake = MAGIC.to_vec();
    fake.extend_from_slice(&((MAX_GUEST_FRAME - 1) as u32).to_be_bytes());
    g.raw(&fake);
    g.send(&FakeGuest::hello(session, None));
    // The next Attach (one heartbeat later) skips the pending fake frame;
    // the guest answers it with another Hello.
    assert!(matches!(g.recv(), HostMsg::Attach { .. }));
    g.send(&FakeGuest::hello(session, None));
    wait_ready(&pool, "vm1");
    assert!(pool.take_failed().is_empty());
    assert_eq!(HEADER_LEN, fake.len());
}

#[test]
fn a_gap_in_the_output_is_a_protocol_failure() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(15)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"abc");
    g.output(r.id, Stream::Stdout, 10, b"xyz");
    let f = wait_failed(&pool, "vm1");
    assert!(f.to_string().contains("jumps from byte 3 to 10"), "{f}");
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(15));
}

#[test]
fn a_result_with_missing_output_is_a_protocol_failure() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(16)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"abc");
    g.result(r.id, 0, 5, 0);
    let f = wait_failed(&pool, "vm1");
    assert!(f.to_string().contains("only 3 arrived"), "{f}");
    assert!(matches!(wait_ended(&pool), VmEnd::HandedBack { .. }));
}

#[test]
fn a_protocol_version_mismatch_fails_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (l, path) = listener(dir.path(), "vm1");
    let pool = GuestPool::new(opts());
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    let HostMsg::Attach { session, .. } = g.recv() else {
        panic!("expected Attach")
    };
    let GuestMsg::Hello(mut h) = FakeGuest::hello(session, None) else {
        unreachable!()
    };
    h.protocol = PROTOCOL_VERSION + 1;
    g.send(&GuestMsg::Hello(h));
    assert_eq!(
        wait_failed(&pool, "vm1"),
        GuestFailure::Version {
            guest: PROTOCOL_VERSION + 1,
            host: PROTOCOL_VERSION
        }
    );
    assert!(pool.take_ready().is_empty());
}

#[test]
fn dropping_the_pool_closes_every_channel() {
    let (_dir, pool, mut g, _) = ready_pool(opts());
    drop(pool);
    assert!(g.sees_eof());
}

#[test]
fn live_output_and_a_result_ahead_of_the_replay_wait_for_it() {
    let (dir, pool, mut g, _) = ready_pool(opts());
    pool.start(assignment(17)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, b"abc");
    wait_for(&pool, "output received", || {
        (state(&pool, "vm1")?.output_bytes == 3).then_some(())
    });
    pool.saving("vm1");
    drop(g);
    wait_for(&pool, "saving", || {
        (state(&pool, "vm1")?.state == LinkState::Saving).then_some(())
    });
    let (l, path) = listener(dir.path(), "vm1");
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    g.handshake(Some(Current {
        id: r.id,
        finished: false,
    }));
    assert!(matches!(g.recv_not_attach(), HostMsg::Replay { .. }));
    // The guest's live stream goes on before it serves the replay: bytes
    // 6..9 and the Result arrive while 3..6 are still to be replayed.
    g.output(r.id, Stream::Stdout, 6, b"ghi");
    g.result(r.id, 0, 9, 0);
    g.send(&GuestMsg::Heartbeat {
        seq: 1,
        uptime_ms: 1,
        running: None,
    });
    assert!(pool.take_ended().is_empty());
    g.output(r.id, Stream::Stdout, 3, b"defghi");
    let c = completed(wait_ended(&pool));
    assert_eq!(c.stdout, b"abcdefghi");
    assert!(pool.take_failed().is_empty());
    // The replayed Result that follows is for a subtask no longer running.
    g.result(r.id, 0, 9, 0);
    pool.start(assignment(18)).unwrap();
    let r2 = g.run_subtask();
    g.result(r2.id, 0, 0, 0);
    assert_eq!(completed(wait_ended(&pool)).attempt, attempt(18));
    assert!(pool.take_failed().is_empty());
}

#[test]
fn a_replay_that_never_catches_up_fails_the_vm() {
    let (dir, pool, mut g, _) = ready_pool(LinkOptions {
        dead_after: Duration::from_millis(400),
        ..opts()
    });
    pool.start(assignment(19)).unwrap();
    let r = g.run_subtask();
    pool.saving("vm1");
    drop(g);
    wait_for(&pool, "saving", || {
        (state(&pool, "vm1")?.state == LinkState::Saving).then_some(())
    });
    let (l, path) = listener(dir.path(), "vm1");
    pool.attach("vm1", path);
    let mut g = FakeGuest::accept(&l);
    g.handshake(Some(Current {
        id: r.id,
        finished: true,
    }));
    assert!(matches!(g.recv_not_attach(), HostMsg::Replay { .. }));
    // A Result counting output that never comes; heartbeats go on.
    g.result(r.id, 0, 5, 0);
    let deadline = Instant::now() + PATIENCE;
    let f = loop {
        g.try_send(&GuestMsg::Heartbeat {
            seq: 0,
            uptime_ms: 0,
            running: None,
        });
        if let Some((_, f)) = pool.take_failed().pop() {
            break f;
        }
        assert!(Instant::now() < deadline, "no failure");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(f.to_string().contains("did not come"), "{f}");
    let (a, _, _) = handed_back(wait_ended(&pool));
    assert_eq!(a, attempt(19));
}

/// Host-side figures over a fake guest (no VM): a no-op subtask's round
/// trip and output throughput. Prints, asserts only correctness.
/// `cargo test -p sparegrid-agent --lib guestlink::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: prints figures"]
fn bench_round_trip_and_throughput() {
    const MIB: u64 = 1 << 20;
    let total = 100 * MIB;
    let (_dir, pool, g, _) = ready_pool(LinkOptions {
        output_cap: total,
        ..opts()
    });
    // The guest answers every RunSubtask; argv[0] "stream" sends `total`
    // bytes of stdout first.
    let guest = std::thread::spawn(move || {
        let mut g = g;
        loop {
            let r = match g.try_recv() {
                Some(HostMsg::RunSubtask(r)) => r,
                Some(HostMsg::Attach { .. }) => continue,
                _ => return,
            };
            let mut size = 0;
            if r.argv[0] == "stream" {
                let chunk = vec![b'x'; sparegrid_proto::guest::OUTPUT_CHUNK];
                while size < total {
                    g.output(r.id, Stream::Stdout, size, &chunk);
                    size += chunk.len() as u64;
                }
            }
            g.result(r.id, 0, size, 0);
        }
    });
    let mut rtts = Vec::new();
    for i in 0..300 {
        let mut a = assignment(1000 + i);
        a.argv = vec!["true".into()];
        a.stdin.clear();
        let t = Instant::now();
        pool.start(a).unwrap();
        completed(wait_ended(&pool));
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let p = |q: usize| rtts[rtts.len() * q / 100].as_secs_f64() * 1e3;
    println!(
        "no-op subtask round trip over the host side: p50 {:.3} ms, p99 {:.3} ms ({} runs)",
        p(50),
        p(99),
        rtts.len()
    );
    let mut a = assignment(1);
    a.argv = vec!["stream".into()];
    let t = Instant::now();
    pool.start(a).unwrap();
    let c = completed(wait_ended(&pool));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(c.stdout.len() as u64, total);
    println!(
        "output throughput into the host side: {:.0} MiB/s ({} MiB in {:.2} s)",
        total as f64 / MIB as f64 / secs,
        total / MIB,
        secs
    );
    drop(pool);
    let _ = guest.join();
}

/// The real `sparegrid-guest` worker (`agent/guest`), found next to the
/// test binary (`target/debug/sparegrid-guest`, built by
/// `cargo build -p sparegrid-guest`) or at `$SPAREGRID_GUEST_BIN`.
fn guest_binary() -> Option<PathBuf> {
    let p = match std::env::var_os("SPAREGRID_GUEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()?
            .parent()?
            .parent()?
            .join("sparegrid-guest"),
    };
    p.is_file().then_some(p)
}

/// Kills the worker it started when the test ends.
struct GuestProcess(std::process::Child);

impl Drop for GuestProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Plays QEMU between the pool and the real worker: both connect (the pool
/// to `host.sock`, the worker to `guest.sock`), the relay pipes the bytes.
/// `cut` drops both connections (the worker reconnects, as it does on a
/// unix socket); `accept` pairs the next two.
struct Relay {
    host_l: UnixListener,
    guest_l: UnixListener,
    conns: Vec<UnixStream>,
}

impl Relay {
    fn accept(&mut self) {
        let g = FakeGuest::accept(&self.guest_l).stream;
        let h = FakeGuest::accept(&self.host_l).stream;
        for (from, to) in [(&g, &h), (&h, &g)] {
            let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            from.set_read_timeout(None).unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
        }
        self.conns = vec![g, h];
    }

    fn cut(&mut self) {
        for c in self.conns.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A pool attached to the real worker through a [`Relay`], or `None`
/// (printed) when the worker binary is not built.
fn real_guest(
    o: LinkOptions,
) -> Option<(
    tempfile::TempDir,
    Arc<GuestPool>,
    Relay,
    GuestProcess,
    PathBuf,
)> {
    let Some(bin) = guest_binary() else {
        println!(
            "skipped: the sparegrid-guest binary is not built \
             (cargo build -p sparegrid-guest, or set SPAREGRID_GUEST_BIN)"
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let (host_l, host_path) = listener(dir.path(), "host");
    let (guest_l, guest_path) = listener(dir.path(), "guest");
    let log = std::env::var_os("SPAREGRID_GUEST_LOG").is_some();
    let child = std::process::Command::new(&bin)
        .arg("--port")
        .arg(format!("unix:{}", guest_path.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(if log {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let child = GuestProcess(child);
    let pool = GuestPool::new(o);
    pool.attach("vm1", host_path.clone());
    let mut relay = Relay {
        host_l,
        guest_l,
        conns: Vec::new(),
    };
    relay.accept();
    wait_ready(&pool, "vm1");
    Some((dir, pool, relay, child, host_path))
}

#[test]
fn the_real_guest_worker_runs_subtasks_end_to_end() {
    let Some((_dir, pool, _relay, _child, _)) = real_guest(LinkOptions {
        heartbeat: Duration::from_millis(200),
        dead_after: Duration::from_secs(10),
        ..opts()
    }) else {
        return;
    };
    let st = state(&pool, "vm1").unwrap();
    assert!(st.worker_version.is_some());
    let mut a = assignment(20);
    a.argv = vec![
        "sh".into(),
        "-c".into(),
        "cat; echo \"K=$K\"; echo oops >&2; exit 3".into(),
    ];
    pool.start(a).unwrap();
    let c = completed(wait_ended(&pool));
    assert_eq!(c.attempt, attempt(20));
    assert_eq!(c.host, "h1");
    assert_eq!(c.exit_code, Some(3));
    assert_eq!(c.stdout, b"in\xffK=v\n");
    assert_eq!(c.stderr, b"oops\n");
    assert_eq!((c.stdout_size, c.stderr_size), (7, 5));
    assert_eq!((c.signal, c.error), (None, None));
    // The same VM runs the next one; a missing binary is the subtask's error.
    let mut a = assignment(21);
    a.argv = vec!["/nonexistent/binary".into()];
    pool.start(a).unwrap();
    let c = completed(wait_ended(&pool));
    assert!(!c.succeeded(), "{c:?}");
    assert!(pool.take_failed().is_empty());
    assert_eq!(pool.idle(), 1);
}

#[test]
fn the_real_guest_worker_replays_after_a_save_and_restore() {
    let Some((_dir, pool, mut relay, _child, host_path)) = real_guest(LinkOptions {
        heartbeat: Duration::from_millis(200),
        dead_after: Duration::from_secs(10),
        ..opts()
    }) else {
        return;
    };
    let script =
        "i=0; while [ $i -lt 60 ]; do echo out$i; echo err$i >&2; i=$((i+1)); sleep 0.02; done";
    let mut a = assignment(22);
    a.argv = vec!["sh".into(), "-c".into(), script.into()];
    a.stdin.clear();
    pool.start(a).unwrap();
    wait_for(&pool, "some output", || {
        (state(&pool, "vm1")?.output_bytes > 20).then_some(())
    });
    // Saved mid-subtask: the channel goes away, then the restored VM's
    // channel comes back and the pool attaches again.
    pool.saving("vm1");
    relay.cut();
    wait_for(&pool, "saving", || {
        (state(&pool, "vm1")?.state == LinkState::Saving).then_some(())
    });
    pool.attach("vm1", host_path);
    relay.accept();
    let c = completed(wait_ended(&pool));
    let want = |p: &str| (0..60).map(|i| format!("{p}{i}\n")).collect::<String>();
    assert_eq!(String::from_utf8(c.stdout).unwrap(), want("out"));
    assert_eq!(String::from_utf8(c.stderr).unwrap(), want("err"));
    assert_eq!(c.exit_code, Some(0));
    assert!(pool.take_failed().is_empty());
}

#[test]
fn the_real_guest_worker_honours_cancel() {
    let Some((_dir, pool, _relay, _child, _)) = real_guest(LinkOptions {
        heartbeat: Duration::from_millis(200),
        dead_after: Duration::from_secs(10),
        ..opts()
    }) else {
        return;
    };
    let mut a = assignment(23);
    a.argv = vec!["sleep".into(), "600".into()];
    pool.start(a).unwrap();
    pool.cancel(&attempt(23));
    wait_for(&pool, "idle again", || (pool.idle() == 1).then_some(()));
    assert!(pool.take_ended().is_empty());
    assert!(pool.take_failed().is_empty());
}

#[test]
fn a_long_guest_stdout_spills_whole_and_a_failed_one_leaves_no_file() {
    let spill = tempfile::tempdir().unwrap();
    let (_dir, pool, mut g, _) = ready_pool(LinkOptions {
        output_cap: 1000,
        spill: Some(GuestSpill {
            dir: spill.path().to_owned(),
            max_output_bytes: 1 << 30,
        }),
        ..opts()
    });
    // 128 MiB of VM memory: the guest may keep 16 MiB of each stream.
    assert_eq!(pool.options().guest_cap(128), 16 << 20);
    assert_eq!(opts().guest_cap(128), 1 << 20, "no spill: the inline cap");
    let total: u64 = 3 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
    pool.start(assignment(40)).unwrap();
    let r = g.run_subtask();
    assert_eq!(r.output_cap, 16 << 20);
    for (i, chunk) in data
        .chunks(sparegrid_proto::guest::OUTPUT_CHUNK)
        .enumerate()
    {
        let at = (i * sparegrid_proto::guest::OUTPUT_CHUNK) as u64;
        g.output(r.id, Stream::Stdout, at, chunk);
    }
    g.result(r.id, 0, total, 0);
    let c = completed(wait_ended(&pool));
    assert_eq!((c.stdout.as_slice(), c.stdout_size), (&data[..1000], total));
    let path = crate::subtask::spill_path(spill.path(), &attempt(40)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);

    pool.start(assignment(41)).unwrap();
    let r = g.run_subtask();
    g.output(r.id, Stream::Stdout, 0, &data[..5000]);
    g.result(r.id, 1, 5000, 0);
    let c = completed(wait_ended(&pool));
    assert_eq!((c.exit_code, c.stdout_size), (Some(1), 5000));
    let path = crate::subtask::spill_path(spill.path(), &attempt(41)).unwrap();
    assert!(!path.exists(), "a failed subtask keeps no spill file");
}
