//! The worker: the read loop on the channel (connect, decode, dispatch),
//! the writer thread (the only one that writes), and the heartbeat thread.
//!
//! The read loop decodes [`HostMsg`] frames with a
//! [`FrameDecoder`] capped at [`MAX_HOST_FRAME`]. Garbage, an oversized
//! header or a body that is not a HostMsg is answered with
//! [`GuestMsg::Rejected`] (when attached) and skipped by resyncing to the
//! next frame start; nothing the host sends makes the worker exit.
//!
//! EOF on a virtio-serial device means no host is connected right now: the
//! worker detaches (sends nothing), polls every [`DEVICE_EOF_POLL`] and
//! starts a fresh decoder. EOF on a unix socket ends the connection: the
//! worker detaches and reconnects every [`RECONNECT`].
//!
//! Messages: Attach → Hello (and heartbeats from then on); RunSubtask →
//! [`crate::run::start`] (replacing the last finished subtask, whatever its
//! id), or a `busy` Result while another one runs (a Rejected if it has the
//! running one's id, whose Result still follows); Cancel → kill; Replay →
//! [`State::replay`](crate::state::State::replay) or an `unknown subtask`
//! Result.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use sparegrid_proto::guest::{
    decode_body, FrameDecoder, GuestMsg, Hello, HostMsg, Progress, RunSubtask, SubtaskResult,
    MAX_HOST_FRAME, PROTOCOL_VERSION,
};

use crate::port::{Conn, PortSpec};
use crate::state::Shared;
use crate::sysinfo;

/// Poll interval while a virtio-serial port reads EOF (no host connected).
pub const DEVICE_EOF_POLL: Duration = Duration::from_millis(50);
/// Retry interval for opening the port or connecting the socket.
pub const RECONNECT: Duration = Duration::from_millis(100);

/// What the Hello's `capabilities` lists.
pub const CAPABILITIES: &[&str] = &["replay", "cancel", "timeout"];

/// The worker's version (the crate's), as in the Hello and the image manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct Worker {
    port: PortSpec,
    shared: Arc<Shared>,
    conn: Arc<Mutex<Option<Arc<Conn>>>>,
}

impl Worker {
    pub fn new(port: PortSpec) -> Worker {
        Worker {
            port,
            shared: Arc::new(Shared::default()),
            conn: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs forever.
    pub fn run(self) -> ! {
        self.spawn_writer();
        self.spawn_heartbeat();
        crate::log!("version {VERSION}, port {}", self.port);
        let mut waiting_logged = false;
        loop {
            let conn = match self.port.open() {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    if !waiting_logged {
                        crate::log!("{e}; retrying every {RECONNECT:?}");
                        waiting_logged = true;
                    }
                    thread::sleep(RECONNECT);
                    continue;
                }
            };
            waiting_logged = false;
            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
            self.serve(&conn);
            self.detach();
            conn.shutdown();
            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
            thread::sleep(RECONNECT);
        }
    }

    /// Reads one connection until it ends (socket EOF or a read error).
    fn serve(&self, conn: &Conn) {
        let mut dec = FrameDecoder::new(MAX_HOST_FRAME);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match conn.read(&mut buf) {
                Ok(0) if self.port.is_socket() => return,
                Ok(0) => {
                    // virtio-serial: no host on the other side right now.
                    if self.shared.lock().attached {
                        crate::log!("host disconnected");
                        self.detach();
                    }
                    if dec.buffered() > 0 {
                        dec = FrameDecoder::new(MAX_HOST_FRAME);
                    }
                    thread::sleep(DEVICE_EOF_POLL);
                }
                Ok(n) => {
                    dec.push(&buf[..n]);
                    self.drain(&mut dec);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::log!("read error on the channel: {e}");
                    return;
                }
            }
        }
    }

    fn detach(&self) {
        self.shared.lock().detach();
        self.shared.notify();
    }

    fn drain(&self, dec: &mut FrameDecoder) {
        loop {
            match dec.next_frame() {
                Ok(None) => return,
                Ok(Some(body)) => match decode_body::<HostMsg>(&body) {
                    Ok(msg) => self.dispatch(msg),
                    Err(e) => self.reject(format!("{e}")),
                },
                Err(e) => {
                    let skipped = dec.resync();
                    self.reject(format!("{e}; skipped {skipped} bytes"));
                }
            }
        }
    }

    fn reject(&self, mut reason: String) {
        reason.truncate(512);
        crate::log!("rejected host bytes: {reason}");
        self.shared.lock().push(&GuestMsg::Rejected { reason });
        self.shared.notify();
    }

    fn dispatch(&self, msg: HostMsg) {
        match msg {
            HostMsg::Attach {
                session,
                heartbeat_ms,
            } => {
                let mut st = self.shared.lock();
                let current = st
                    .current
                    .as_ref()
                    .map(|s| sparegrid_proto::guest::Current {
                        id: s.id,
                        finished: s.finished(),
                    });
                let hello = GuestMsg::Hello(hello(session, current));
                st.attach(heartbeat_ms, &hello);
                crate::log!("attached (session {session:#x}, heartbeat {heartbeat_ms} ms)");
            }
            HostMsg::RunSubtask(req) => self.run_subtask(req),
            HostMsg::Cancel { id } => {
                let mut st = self.shared.lock();
                match st.current.as_mut() {
                    Some(sub) if sub.id == id && !sub.finished() => {
                        crate::vlog!("subtask {id}: cancel");
                        sub.cancel = true;
                    }
                    _ => crate::vlog!("cancel of subtask {id}, which is not running: ignored"),
                }
            }
            HostMsg::Replay {
                id,
                stdout_from,
                stderr_from,
            } => {
                let mut st = self.shared.lock();
                if !st.replay(id, stdout_from, stderr_from) {
                    st.push(&GuestMsg::Result(error_result(id, "unknown subtask")));
                }
            }
            HostMsg::Heartbeat { .. } => {}
        }
        self.shared.notify();
    }

    fn run_subtask(&self, req: RunSubtask) {
        {
            let mut st = self.shared.lock();
            if let Some(sub) = st.current.as_ref().filter(|s| !s.finished()) {
                if sub.id == req.id {
                    // A Result for this id would be taken for the running one's.
                    let reason = format!("subtask {} is already running", req.id);
                    crate::log!("{reason}");
                    st.push(&GuestMsg::Rejected { reason });
                    return;
                }
                let msg = format!("busy: subtask {} is running", sub.id);
                st.push(&GuestMsg::Result(error_result(req.id, &msg)));
                return;
            }
        }
        crate::run::start(&self.shared, req);
    }

    fn spawn_writer(&self) {
        let shared = self.shared.clone();
        let conn = self.conn.clone();
        spawn("writer", move || loop {
            let frame = {
                let mut st = shared.lock();
                loop {
                    if let Some(f) = st.next_frame() {
                        break f;
                    }
                    st = shared.wait(st);
                }
            };
            let c = conn.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(c) = c {
                // A failed write means the host went away: the read loop sees
                // that too, and a Replay after the next Attach fills the gap.
                let _ = c.write_all(&frame);
            }
        });
    }

    fn spawn_heartbeat(&self) {
        let shared = self.shared.clone();
        spawn("heartbeat", move || loop {
            let ms = shared.lock().heartbeat_ms;
            thread::sleep(Duration::from_millis(ms));
            let mut st = shared.lock();
            if !st.attached {
                continue;
            }
            st.heartbeat_seq += 1;
            let running = st.running();
            let progress = st
                .current
                .as_ref()
                .filter(|s| !s.finished())
                .map(|s| Progress {
                    id: s.id,
                    elapsed_ms: s.started.elapsed().as_millis() as u64,
                    stdout_bytes: s.streams[0].total,
                    stderr_bytes: s.streams[1].total,
                });
            let seq = st.heartbeat_seq;
            st.push(&GuestMsg::Heartbeat {
                seq,
                uptime_ms: sysinfo::uptime_ms(),
                running,
            });
            if let Some(p) = progress {
                st.push(&GuestMsg::Progress(p));
            }
            drop(st);
            shared.notify();
        });
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    thread::Builder::new()
        .name(format!("sg-{name}"))
        .spawn(f)
        .unwrap_or_else(|e| {
            // Without these threads the worker is useless; init restarts it.
            crate::log!("cannot start the {name} thread: {e}");
            std::process::exit(1)
        });
}

/// The Hello for `session`.
pub fn hello(session: u64, current: Option<sparegrid_proto::guest::Current>) -> Hello {
    Hello {
        session,
        protocol: PROTOCOL_VERSION,
        worker_version: VERSION.to_string(),
        capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        interpreters: sysinfo::interpreters(sysinfo::SUBTASK_PATH),
        vcpus: sysinfo::vcpus(),
        memory_mib: sysinfo::memory_mib(),
        current,
    }
}

/// A Result for a subtask that did not run.
pub fn error_result(id: u64, error: &str) -> SubtaskResult {
    SubtaskResult {
        id,
        exit_code: None,
        signal: None,
        error: Some(error.to_string()),
        duration_ms: 0,
        stdout_size: 0,
        stderr_size: 0,
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
    }
}
