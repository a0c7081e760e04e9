//! The worker's state, shared by its threads behind one mutex, and the one
//! rule for what goes on the wire next ([`State::next_frame`]).
//!
//! Output is not queued as frames: each stream's kept bytes (up to the
//! subtask's `output_cap`) sit in a [`StreamBuf`] with a `sent` offset, and
//! the writer thread cuts [`Output`] chunks from there. So live output and a
//! [`HostMsg::Replay`](sparegrid_proto::guest::HostMsg::Replay) are the same
//! thing (a replay moves `sent` back), memory stays bounded by the cap
//! however slowly the host reads, and the Result goes out only after every
//! kept byte. Control frames (Hello, Heartbeat, Progress, Rejected, busy and
//! unknown-subtask Results) go first, so heartbeats get through a 100 MiB
//! stream.
//!
//! Nothing is sent while detached (before the first Attach, and from an EOF
//! on the channel until the next Attach). An Attach while a subtask is held
//! puts its output on **hold**: the Hello names it and the host answers with
//! a Replay (which releases it from the offsets it already has) or a new
//! RunSubtask (which replaces it).

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sparegrid_proto::guest::{
    encode_frame, GuestMsg, Output, Stream, SubtaskResult, MAX_GUEST_FRAME, OUTPUT_CHUNK,
};

/// The state and the condition variable every thread waits on (writer,
/// subtask supervisor); notified on any change.
#[derive(Default)]
pub struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    /// Locks the state. A thread that panicked while holding it cannot leave
    /// it half-updated in a way that matters more than stopping would.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn notify(&self) {
        self.cv.notify_all();
    }

    pub fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(PoisonError::into_inner)
    }

    pub fn wait_timeout<'a>(&self, g: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        self.cv
            .wait_timeout(g, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

pub struct State {
    /// The host has sent an Attach since the channel last hit EOF.
    pub attached: bool,
    pub heartbeat_ms: u64,
    pub heartbeat_seq: u64,
    control: VecDeque<Vec<u8>>,
    /// The running or last subtask.
    pub current: Option<Sub>,
    next_gen: u64,
    /// Which stream the next Output chunk comes from first (fair interleave).
    turn: usize,
}

impl Default for State {
    fn default() -> State {
        State {
            attached: false,
            heartbeat_ms: 1000,
            heartbeat_seq: 0,
            control: VecDeque::new(),
            current: None,
            next_gen: 1,
            turn: 0,
        }
    }
}

/// A subtask the worker holds.
pub struct Sub {
    pub id: u64,
    /// Distinguishes this run from an earlier one with the same id, for the
    /// threads of a run that a new one replaced.
    pub gen: u64,
    pub label: String,
    pub started: Instant,
    pub cap: u64,
    pub streams: [StreamBuf; 2],
    pub cancel: bool,
    pub exit: Option<ExitStatus>,
    pub result: Option<SubtaskResult>,
    pub result_sent: bool,
    pub hold: bool,
}

impl Sub {
    pub fn finished(&self) -> bool {
        self.result.is_some()
    }

    /// The Result of this run: sizes and truncation from its streams.
    pub fn result(
        &self,
        exit: Option<ExitStatus>,
        error: Option<String>,
        timed_out: bool,
    ) -> SubtaskResult {
        use std::os::unix::process::ExitStatusExt;
        let [out, err] = &self.streams;
        SubtaskResult {
            id: self.id,
            exit_code: exit.and_then(|e| e.code()),
            signal: exit.and_then(|e| e.signal()),
            error,
            duration_ms: self.started.elapsed().as_millis() as u64,
            stdout_size: out.total,
            stderr_size: err.total,
            stdout_truncated: out.truncated(),
            stderr_truncated: err.truncated(),
            timed_out,
        }
    }
}

/// One output stream of a subtask.
#[derive(Debug, Default)]
pub struct StreamBuf {
    /// The first `cap` bytes.
    pub kept: Vec<u8>,
    /// All bytes read.
    pub total: u64,
    /// How far the host has been sent `kept`.
    pub sent: u64,
    /// The pipe reached EOF.
    pub eof: bool,
    /// No more bytes are taken (the reader was given up on).
    pub sealed: bool,
}

impl StreamBuf {
    pub fn append(&mut self, data: &[u8], cap: u64) {
        if self.sealed {
            return;
        }
        self.total += data.len() as u64;
        let room = cap.saturating_sub(self.kept.len() as u64);
        let take = (data.len() as u64).min(room) as usize;
        self.kept.extend_from_slice(&data[..take]);
    }

    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    pub fn done(&self) -> bool {
        self.eof || self.sealed
    }
}

impl State {
    /// Queues a control message (dropped while detached).
    pub fn push(&mut self, msg: &GuestMsg) {
        if !self.attached {
            return;
        }
        match encode_frame(msg, MAX_GUEST_FRAME) {
            Ok(f) => self.control.push_back(f),
            Err(e) => crate::log!("cannot encode a {}: {e}", kind(msg)),
        }
    }

    /// Starts holding a new subtask (replacing the last one) and returns
    /// its generation.
    pub fn begin(&mut self, id: u64, label: String, cap: u64) -> u64 {
        let gen = self.next_gen;
        self.next_gen += 1;
        self.current = Some(Sub {
            id,
            gen,
            label,
            started: Instant::now(),
            cap,
            streams: Default::default(),
            cancel: false,
            exit: None,
            result: None,
            result_sent: false,
            hold: false,
        });
        gen
    }

    /// The current subtask if it is run `gen`.
    pub fn sub(&mut self, gen: u64) -> Option<&mut Sub> {
        self.current.as_mut().filter(|s| s.gen == gen)
    }

    /// The id of the subtask running now.
    pub fn running(&self) -> Option<u64> {
        self.current
            .as_ref()
            .filter(|s| !s.finished())
            .map(|s| s.id)
    }

    /// A new Attach: queue `hello` first, hold the current subtask's output.
    pub fn attach(&mut self, heartbeat_ms: u64, hello: &GuestMsg) {
        self.attached = true;
        self.heartbeat_ms = heartbeat_ms.clamp(10, 3_600_000);
        self.control.clear();
        if let Some(sub) = self.current.as_mut() {
            sub.hold = true;
        }
        self.push(hello);
    }

    /// The channel hit EOF: send nothing until the next Attach.
    pub fn detach(&mut self) {
        self.attached = false;
        self.control.clear();
    }

    /// Re-send subtask `id`'s output from these offsets and its Result.
    /// Returns false when the worker does not hold `id`.
    pub fn replay(&mut self, id: u64, stdout_from: u64, stderr_from: u64) -> bool {
        let Some(sub) = self.current.as_mut().filter(|s| s.id == id) else {
            return false;
        };
        sub.hold = false;
        for (s, from) in sub.streams.iter_mut().zip([stdout_from, stderr_from]) {
            s.sent = from.min(s.kept.len() as u64);
        }
        sub.result_sent = false;
        true
    }

    /// The next frame to write, if any (see the module header for the order).
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        if !self.attached {
            self.control.clear();
            return None;
        }
        if let Some(f) = self.control.pop_front() {
            return Some(f);
        }
        let sub = self.current.as_mut().filter(|s| !s.hold)?;
        for k in 0..2 {
            let i = (self.turn + k) % 2;
            let s = &mut sub.streams[i];
            let from = s.sent as usize;
            if from < s.kept.len() {
                let to = s.kept.len().min(from + OUTPUT_CHUNK);
                let msg = GuestMsg::Output(Output {
                    id: sub.id,
                    stream: if i == 0 {
                        Stream::Stdout
                    } else {
                        Stream::Stderr
                    },
                    offset: s.sent,
                    data: s.kept[from..to].to_vec(),
                });
                s.sent = to as u64;
                self.turn = i + 1;
                match encode_frame(&msg, MAX_GUEST_FRAME) {
                    Ok(f) => return Some(f),
                    Err(e) => {
                        crate::log!("cannot encode an output chunk: {e}");
                        return None;
                    }
                }
            }
        }
        if sub.result_sent {
            return None;
        }
        let res = sub.result.clone()?;
        sub.result_sent = true;
        encode_frame(&GuestMsg::Result(res), MAX_GUEST_FRAME).ok()
    }
}

fn kind(m: &GuestMsg) -> &'static str {
    match m {
        GuestMsg::Hello(_) => "hello",
        GuestMsg::Progress(_) => "progress",
        GuestMsg::Output(_) => "output",
        GuestMsg::Result(_) => "result",
        GuestMsg::Heartbeat { .. } => "heartbeat",
        GuestMsg::Rejected { .. } => "rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::guest::{decode_body, FrameDecoder};

    fn decode(f: &[u8]) -> GuestMsg {
        let mut d = FrameDecoder::new(MAX_GUEST_FRAME);
        d.push(f);
        decode_body(&d.next_frame().unwrap().unwrap()).unwrap()
    }

    fn drain(st: &mut State) -> Vec<GuestMsg> {
        std::iter::from_fn(|| st.next_frame())
            .map(|f| decode(&f))
            .collect()
    }

    fn hb(seq: u64) -> GuestMsg {
        GuestMsg::Heartbeat {
            seq,
            uptime_ms: 1,
            running: None,
        }
    }

    fn finish(st: &mut State, gen: u64) {
        let sub = st.sub(gen).unwrap();
        let r = sub.result(None, Some("x".into()), false);
        sub.result = Some(r);
    }

    #[test]
    fn nothing_goes_out_before_attach() {
        let mut st = State::default();
        st.push(&hb(1));
        let gen = st.begin(1, "l".into(), 10);
        st.sub(gen).unwrap().streams[0].append(b"abc", 10);
        finish(&mut st, gen);
        assert!(drain(&mut st).is_empty());
    }

    #[test]
    fn output_is_capped_chunked_and_precedes_the_result() {
        let mut st = State {
            attached: true,
            ..State::default()
        };
        let cap = (OUTPUT_CHUNK + 10) as u64;
        let gen = st.begin(7, "l".into(), cap);
        let big = vec![b'x'; OUTPUT_CHUNK + 100];
        let sub = st.sub(gen).unwrap();
        sub.streams[0].append(&big, cap);
        sub.streams[1].append(b"err", cap);
        finish(&mut st, gen);
        st.push(&hb(1));
        let msgs = drain(&mut st);
        assert_eq!(msgs[0], hb(1), "control frames first");
        let outs: Vec<&Output> = msgs
            .iter()
            .filter_map(|m| match m {
                GuestMsg::Output(o) => Some(o),
                _ => None,
            })
            .collect();
        assert_eq!(outs.len(), 3);
        let so: Vec<(u64, usize)> = outs
            .iter()
            .filter(|o| o.stream == Stream::Stdout)
            .map(|o| (o.offset, o.data.len()))
            .collect();
        assert_eq!(so, vec![(0, OUTPUT_CHUNK), (OUTPUT_CHUNK as u64, 10)]);
        let GuestMsg::Result(r) = msgs.last().unwrap() else {
            panic!("last is not the result: {msgs:?}")
        };
        assert_eq!(r.stdout_size, (OUTPUT_CHUNK + 100) as u64);
        assert!(r.stdout_truncated && !r.stderr_truncated);
        assert!(drain(&mut st).is_empty(), "the result goes once");
    }

    #[test]
    fn attach_holds_output_until_replay_from_the_hosts_offsets() {
        let mut st = State {
            attached: true,
            ..State::default()
        };
        let gen = st.begin(3, "l".into(), 100);
        st.sub(gen).unwrap().streams[0].append(b"hello world", 100);
        let first = drain(&mut st);
        assert_eq!(first.len(), 1);
        st.detach();
        st.sub(gen).unwrap().streams[0].append(b"!!", 100);
        finish(&mut st, gen);
        assert!(drain(&mut st).is_empty(), "detached");
        st.attach(500, &hb(9));
        assert_eq!(drain(&mut st), vec![hb(9)], "hello only, output held");
        assert!(st.replay(3, 6, 0));
        let msgs = drain(&mut st);
        assert_eq!(
            msgs[0],
            GuestMsg::Output(Output {
                id: 3,
                stream: Stream::Stdout,
                offset: 6,
                data: b"world!!".to_vec()
            })
        );
        assert!(matches!(&msgs[1], GuestMsg::Result(r) if r.id == 3));
        assert!(!st.replay(4, 0, 0));
        // Offsets past the kept bytes are clamped.
        assert!(st.replay(3, 1000, 1000));
        assert_eq!(drain(&mut st).len(), 1);
    }

    #[test]
    fn a_sealed_stream_takes_no_more_bytes() {
        let mut s = StreamBuf::default();
        s.append(b"ab", 1);
        assert_eq!(
            (s.kept.as_slice(), s.total, s.truncated()),
            (&b"a"[..], 2, true)
        );
        s.sealed = true;
        s.append(b"cd", 10);
        assert_eq!(s.total, 2);
    }
}
