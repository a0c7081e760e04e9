//! One VM's session thread: connects to the channel socket, handshakes
//! (Attach / Hello with the session nonce, resyncing over stray bytes),
//! reads frames and applies them to the pool's state, and runs the
//! watchdogs (Hello, heartbeat, stuck subtask). Writes go through the
//! session's writer thread. The thread ends when its session is no longer
//! the VM's current one (reclaimed, re-attached, pool dropped), on EOF, or
//! after a failure.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sparegrid_proto::grid::Completion;
use sparegrid_proto::guest::{
    decode_body, encode_frame, FrameDecoder, FrameError, GuestMsg, Hello, HostMsg, Output, Stream,
    SubtaskResult, MAX_GUEST_FRAME, MAX_HOST_FRAME, PROTOCOL_VERSION,
};

use super::{secs, GuestFailure, Inner, Job, Shared, Vm, VmEnd, CANCEL_GRACE, TIMEOUT_GRACE};
use crate::subtask::label;

/// How often the session wakes to run its timers: a quarter of the
/// shortest interval it watches, between 5 and 100 ms.
fn tick(opts: &super::LinkOptions) -> Duration {
    opts.heartbeat
        .min(opts.dead_after)
        .min(opts.hello_timeout)
        .checked_div(4)
        .unwrap_or_default()
        .clamp(Duration::from_millis(5), Duration::from_millis(100))
}

/// The VM's entry while `gen` is its current session.
fn current<'a>(st: &'a mut Inner, vm: &str, gen: u64) -> Option<&'a mut Vm> {
    if st.closed {
        return None;
    }
    st.vms
        .get_mut(vm)
        .filter(|v| v.failed.is_none() && v.session.as_ref().is_some_and(|s| s.gen == gen))
}

pub(super) fn run(shared: Arc<Shared>, vm: String, gen: u64, nonce: u64, socket: PathBuf) {
    let Some(stream) = connect(&shared, &vm, gen, &socket) else {
        return;
    };
    let Some(mut s) = Session::start(shared, vm, gen, nonce, stream) else {
        return;
    };
    s.run();
}

/// Connects, retrying every tick until the socket accepts or the Hello
/// deadline (not counting paused time) passes.
fn connect(shared: &Shared, vm: &str, gen: u64, socket: &PathBuf) -> Option<UnixStream> {
    let opts = &shared.opts;
    let mut last_error = String::from("not tried");
    loop {
        {
            let now = Instant::now();
            let mut st = shared.lock();
            let v = current(&mut st, vm, gen)?;
            if v.paused_since.is_none()
                && now.saturating_duration_since(v.watch_from) > opts.hello_timeout
            {
                let failed = st.fail(
                    vm,
                    gen,
                    GuestFailure::NoConnection {
                        after: opts.hello_timeout,
                        error: format!("{}: {last_error}", socket.display()),
                    },
                );
                drop(st);
                if failed {
                    shared.activity.notify();
                }
                return None;
            }
        }
        match UnixStream::connect(socket) {
            Ok(s) => return Some(s),
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(tick(opts));
    }
}

struct Session {
    shared: Arc<Shared>,
    vm: String,
    gen: u64,
    nonce: u64,
    stream: UnixStream,
    tx: Sender<Vec<u8>>,
    dec: FrameDecoder,
    said_hello: bool,
    last_attach: Instant,
    last_heartbeat: Instant,
    heartbeat_seq: u64,
}

/// Whether the session goes on.
type Go = bool;

impl Session {
    /// Registers the connection with the pool and starts the writer.
    fn start(
        shared: Arc<Shared>,
        vm: String,
        gen: u64,
        nonce: u64,
        stream: UnixStream,
    ) -> Option<Session> {
        let agent_fail = |shared: &Shared, what: &str, e: std::io::Error| {
            let failed = shared.lock().fail(
                &vm,
                gen,
                GuestFailure::Agent {
                    detail: format!("{what}: {e}"),
                },
            );
            if failed {
                shared.activity.notify();
            }
        };
        let (writer, control) = match (stream.try_clone(), stream.try_clone()) {
            (Ok(w), Ok(c)) => (w, c),
            (Err(e), _) | (_, Err(e)) => {
                agent_fail(&shared, "cannot clone the channel socket", e);
                return None;
            }
        };
        if let Err(e) = stream.set_read_timeout(Some(tick(&shared.opts))) {
            agent_fail(&shared, "cannot set a read timeout on the channel", e);
            return None;
        }
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let wname = vm.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("guest-w-{vm}"))
            .spawn(move || write_frames(&wname, writer, rx));
        if let Err(e) = spawned {
            agent_fail(&shared, "cannot start the writer thread", e);
            return None;
        }
        {
            let mut st = shared.lock();
            let Some(v) = current(&mut st, &vm, gen) else {
                let _ = control.shutdown(std::net::Shutdown::Both);
                return None;
            };
            if let Some(slot) = v.session.as_mut() {
                slot.tx = Some(tx.clone());
                slot.stream = Some(control);
            }
        }
        let now = Instant::now();
        let s = Session {
            shared,
            vm,
            gen,
            nonce,
            stream,
            tx,
            dec: FrameDecoder::new(MAX_GUEST_FRAME),
            said_hello: false,
            last_attach: now,
            last_heartbeat: now,
            heartbeat_seq: 0,
        };
        s.send_attach();
        Some(s)
    }

    fn send_attach(&self) {
        let heartbeat_ms =
            u64::try_from(self.shared.opts.heartbeat.as_millis()).unwrap_or(u64::MAX);
        self.send(&HostMsg::Attach {
            session: self.nonce,
            heartbeat_ms,
        });
    }

    fn send(&self, msg: &HostMsg) {
        match encode_frame(msg, MAX_HOST_FRAME) {
            Ok(f) => {
                let _ = self.tx.send(f);
            }
            Err(e) => tracing::warn!(vm = %self.vm, "cannot encode a frame for the guest: {e}"),
        }
    }

    fn run(&mut self) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if !self.tick() {
                return;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return self.closed(None),
                Ok(n) => {
                    self.dec.push(&buf[..n]);
                    if !self.drain() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return self.closed(Some(e.to_string())),
            }
        }
    }

    /// Gives up on the VM (if this session is still current).
    fn fail(&self, st: &mut Inner, failure: GuestFailure) -> Go {
        if st.fail(&self.vm, self.gen, failure) {
            self.shared.activity.notify();
        }
        false
    }

    /// Timers: Attach repeats and the Hello deadline before the Hello; the
    /// heartbeat watchdog, stuck subtasks and the host heartbeat after it.
    fn tick(&mut self) -> Go {
        let opts = &self.shared.opts;
        let now = Instant::now();
        let mut st = self.shared.lock();
        let Some(v) = current(&mut st, &self.vm, self.gen) else {
            return false;
        };
        if v.paused_since.is_some() || v.saving {
            return true;
        }
        if !self.said_hello {
            if now.saturating_duration_since(v.watch_from) > opts.hello_timeout {
                let after = opts.hello_timeout;
                return self.fail(&mut st, GuestFailure::NoHello { after });
            }
            if now.saturating_duration_since(self.last_attach) >= opts.heartbeat {
                drop(st);
                self.last_attach = now;
                self.send_attach();
                // A frame start in the tail of an old frame may announce a
                // body that never comes and would swallow the Hello: skip
                // past anything still pending from before this Attach.
                if self.dec.buffered() > 0 {
                    self.dec.resync();
                    return self.drain();
                }
            }
            return true;
        }
        let since = v.last_frame.map_or(v.watch_from, |f| f.max(v.watch_from));
        let quiet = now.saturating_duration_since(since);
        if quiet > opts.dead_after {
            let had_cpu = match v.cpu_since_mark() {
                Some(used) => used >= opts.dead_after.mul_f64(super::STARVED_CPU_FRACTION),
                None => true,
            };
            // However starved, silence this long is a dead guest (a QEMU
            // stopped from outside gets no CPU either).
            let too_long = quiet > opts.dead_after * super::STARVED_MAX_FACTOR;
            if had_cpu || too_long {
                return self.fail(&mut st, GuestFailure::Silent { ago: quiet });
            }
        }
        if let Some(job) = &v.job {
            let waited = job
                .pending
                .as_ref()
                .map(|(_, at, paused)| v.running_since(*at, *paused, now))
                .filter(|w| *w > opts.dead_after);
            let stuck = match job.cancelled {
                _ if waited.is_some() => Some(format!(
                    "the result of subtask {} waited {} for replayed output that did not come",
                    label(&job.attempt),
                    secs(waited.unwrap_or_default())
                )),
                Some((at, paused)) => {
                    let ago = v.running_since(at, paused, now);
                    (ago > CANCEL_GRACE).then(|| {
                        format!(
                            "subtask {} was cancelled {} ago and has not ended",
                            label(&job.attempt),
                            secs(ago)
                        )
                    })
                }
                None if job.timeout_ms > 0 => {
                    let ran = v.running_since(job.started, job.paused_at_start, now);
                    let limit = Duration::from_millis(job.timeout_ms);
                    (ran > limit + TIMEOUT_GRACE).then(|| {
                        format!(
                            "subtask {} still runs {} after its timeout of {}",
                            label(&job.attempt),
                            secs(ran - limit),
                            secs(limit)
                        )
                    })
                }
                None => None,
            };
            if let Some(detail) = stuck {
                return self.fail(&mut st, GuestFailure::Protocol { detail });
            }
        }
        drop(st);
        if now.saturating_duration_since(self.last_heartbeat) >= opts.heartbeat {
            self.last_heartbeat = now;
            self.heartbeat_seq += 1;
            self.send(&HostMsg::Heartbeat {
                seq: self.heartbeat_seq,
            });
        }
        true
    }

    /// Takes every complete frame out of the decoder.
    fn drain(&mut self) -> Go {
        loop {
            if !self.said_hello {
                // Resync mode: skip everything but our Hello.
                match self.dec.next_frame() {
                    Ok(Some(body)) => match decode_body::<GuestMsg>(&body) {
                        Ok(GuestMsg::Hello(h)) if h.session == self.nonce => {
                            self.said_hello = true;
                            if !self.on_hello(h) {
                                return false;
                            }
                        }
                        Ok(other) => {
                            tracing::debug!(vm = %self.vm, "skipping {other:?} before the Hello")
                        }
                        Err(e) => {
                            tracing::debug!(vm = %self.vm, "skipping a frame before the Hello: {e}")
                        }
                    },
                    Ok(None) => return true,
                    Err(e) => {
                        let n = self.dec.resync();
                        tracing::debug!(vm = %self.vm, "skipping {n} bytes before the Hello ({e})");
                    }
                }
                continue;
            }
            let failure = match self.dec.next_frame() {
                Ok(None) => return true,
                Ok(Some(body)) => match decode_body::<GuestMsg>(&body) {
                    Ok(msg) => {
                        if !self.on_msg(msg) {
                            return false;
                        }
                        continue;
                    }
                    Err(e) => GuestFailure::Garbage {
                        detail: e.to_string(),
                    },
                },
                Err(FrameError::TooLarge { size, max }) => {
                    GuestFailure::FrameTooLarge { size, max }
                }
                Err(e) => GuestFailure::Garbage {
                    detail: e.to_string(),
                },
            };
            let mut st = self.shared.lock();
            return self.fail(&mut st, failure);
        }
    }

    /// Our Hello: the guest is ready. Replays the subtask the VM holds.
    fn on_hello(&mut self, h: Hello) -> Go {
        let now = Instant::now();
        let mut st = self.shared.lock();
        let Some(v) = current(&mut st, &self.vm, self.gen) else {
            return false;
        };
        v.last_frame = Some(now);
        v.mark_cpu();
        if h.protocol != PROTOCOL_VERSION {
            let failure = GuestFailure::Version {
                guest: h.protocol,
                host: PROTOCOL_VERSION,
            };
            return self.fail(&mut st, failure);
        }
        v.worker_version = Some(h.worker_version.clone());
        let mut lost = None;
        if let Some(job) = &mut v.job {
            match &h.current {
                Some(c) if c.id == job.id => {
                    tracing::info!(vm = %self.vm, subtask = %label(&job.attempt),
                        "guest still holds the subtask (finished: {}); replaying from {}/{} bytes",
                        c.finished, job.stdout.received(), job.stderr.received());
                    job.replaying = true;
                    let (id, cancel) = (job.id, job.cancelled.is_some() && !c.finished);
                    let replay = HostMsg::Replay {
                        id,
                        stdout_from: job.stdout.received(),
                        stderr_from: job.stderr.received(),
                    };
                    v.send(&replay);
                    if cancel {
                        v.send(&HostMsg::Cancel { id });
                    }
                }
                _ => lost = v.job.take(),
            }
        }
        tracing::info!(vm = %self.vm, "guest worker {} ready (protocol {}, interpreters {:?})",
            h.worker_version, h.protocol, h.interpreters);
        v.hello = Some(h);
        if let Some(job) = lost.filter(|j| j.cancelled.is_none()) {
            tracing::warn!(vm = %self.vm, subtask = %label(&job.attempt),
                "the guest no longer holds its subtask; handing it back");
            st.ended.push(VmEnd::HandedBack {
                attempt: job.attempt,
                vm: self.vm.clone(),
                reason: "the guest no longer holds the subtask (it restarted?)".to_owned(),
            });
        }
        st.ready.push(self.vm.clone());
        drop(st);
        self.shared.activity.notify();
        true
    }

    fn on_msg(&mut self, msg: GuestMsg) -> Go {
        let now = Instant::now();
        let mut st = self.shared.lock();
        let Some(v) = current(&mut st, &self.vm, self.gen) else {
            return false;
        };
        v.last_frame = Some(now);
        v.mark_cpu();
        match msg {
            GuestMsg::Hello(_) => {
                tracing::debug!(vm = %self.vm, "another Hello (answer to a repeated Attach); ignored");
                true
            }
            GuestMsg::Heartbeat { .. } | GuestMsg::Progress(_) => true,
            GuestMsg::Rejected { reason } => {
                let detail = format!("the guest rejected a host frame: {reason}");
                self.fail(&mut st, GuestFailure::Protocol { detail })
            }
            GuestMsg::Output(o) => self.on_output(&mut st, o),
            GuestMsg::Result(r) => self.on_result(&mut st, r),
        }
    }

    fn on_output(&self, st: &mut Inner, o: Output) -> Go {
        let Some(v) = current(st, &self.vm, self.gen) else {
            return false;
        };
        let Some(job) = v.job.as_mut().filter(|j| j.id == o.id) else {
            tracing::debug!(vm = %self.vm, id = o.id, "output of a subtask not running here; ignored");
            return true;
        };
        let asm = match o.stream {
            Stream::Stdout => &mut job.stdout,
            Stream::Stderr => &mut job.stderr,
        };
        match asm.add(o.offset, &o.data) {
            Ok(()) => {}
            Err(gap) if job.replaying => {
                tracing::debug!(vm = %self.vm, "live output at {} before the replay from {} caught up; dropped",
                    gap.got, gap.expected);
            }
            Err(gap) => {
                let detail = format!(
                    "{:?} of subtask {} jumps from byte {} to {}",
                    o.stream,
                    label(&job.attempt),
                    gap.expected,
                    gap.got
                );
                return self.fail(st, GuestFailure::Protocol { detail });
            }
        }
        // A Result that waited for the replay may be complete now.
        if job
            .pending
            .as_ref()
            .is_some_and(|(r, _, _)| missing(job, r, job.guest_cap).is_none())
        {
            if let Some((r, _, _)) = job.pending.take() {
                return self.on_result(st, r);
            }
        }
        true
    }

    fn on_result(&self, st: &mut Inner, r: SubtaskResult) -> Go {
        let now = Instant::now();
        let Some(v) = current(st, &self.vm, self.gen) else {
            return false;
        };
        let paused = v.paused_now(now);
        let Some(job) = v.job.as_mut().filter(|j| j.id == r.id) else {
            tracing::debug!(vm = %self.vm, id = r.id, "result of a subtask not running here; ignored");
            return true;
        };
        if job.cancelled.is_some() {
            tracing::debug!(vm = %self.vm, subtask = %label(&job.attempt),
                "cancelled subtask ended; the VM is free");
            v.job = None;
            self.shared.activity.notify();
            return true;
        }
        // Every byte up to the cap must have arrived before the Result.
        if let Some(detail) = missing(job, &r, job.guest_cap) {
            if job.replaying {
                tracing::debug!(vm = %self.vm, "result before the replay caught up: {detail}; waiting");
                if job.pending.is_none() {
                    job.pending = Some((r, now, paused));
                }
                return true;
            }
            return self.fail(st, GuestFailure::Protocol { detail });
        }
        let Some(job) = v.job.take() else {
            return true;
        };
        let error = match (r.error, r.timed_out) {
            (Some(e), _) => Some(e),
            (None, true) => Some(format!("timeout after {} ms", job.timeout_ms)),
            (None, false) => None,
        };
        let ok = error.is_none() && r.exit_code == Some(0) && r.signal.is_none();
        // The spill file stays for the upload only when the subtask succeeded.
        let (stdout, _spilled) = job.stdout.finish(ok);
        let stderr = job.stderr.into_bytes();
        let c = Completion {
            stdout_data: None,
            attempt: job.attempt,
            host: self.shared.opts.host.clone(),
            exit_code: r.exit_code,
            signal: r.signal,
            error,
            stdout_size: r.stdout_size.max(stdout.len() as u64),
            stderr_size: r.stderr_size.max(stderr.len() as u64),
            stdout,
            stderr,
            duration_ms: r.duration_ms,
        };
        tracing::debug!(vm = %self.vm, subtask = %label(&c.attempt),
            "subtask ended in the guest (exit {:?}, signal {:?}, error {:?})",
            c.exit_code, c.signal, c.error);
        st.ended.push(VmEnd::Completed(c));
        self.shared.activity.notify();
        true
    }

    /// EOF or a read error: expected while saving, a failure otherwise.
    fn closed(&self, error: Option<String>) {
        let mut st = self.shared.lock();
        let Some(v) = current(&mut st, &self.vm, self.gen) else {
            return;
        };
        if v.saving {
            tracing::debug!(vm = %self.vm, "channel closed while saving, as expected");
            if let Some(s) = v.session.take() {
                s.close();
            }
            v.hello = None;
            return;
        }
        self.fail(&mut st, GuestFailure::ChannelClosed { error });
    }
}

/// What output `r` counts (up to the cap) that has not arrived, if any.
fn missing(job: &Job, r: &SubtaskResult, cap: u64) -> Option<String> {
    [
        ("stdout", job.stdout.received(), r.stdout_size),
        ("stderr", job.stderr.received(), r.stderr_size),
    ]
    .into_iter()
    .find(|&(_, got, size)| got < size.min(cap))
    .map(|(name, got, size)| {
        format!(
            "result of subtask {} counts {size} bytes of {name} but only {got} arrived",
            label(&job.attempt)
        )
    })
}

/// The writer thread: writes queued frames until the session drops its
/// senders or a write fails (the reader then sees the connection end).
fn write_frames(vm: &str, mut w: UnixStream, rx: mpsc::Receiver<Vec<u8>>) {
    for frame in rx {
        if let Err(e) = w.write_all(&frame) {
            tracing::debug!(vm, "writing to the guest channel failed: {e}");
            return;
        }
    }
}
