//! The guest channel: messages between the agent (host) and the
//! `sparegrid-guest` worker inside a grid VM, and their framing.
//!
//! The channel is a virtio-serial port (`org.sparegrid.guest.0`), a unix
//! socket on the host. Each message is one **frame**:
//!
//! ```text
//! MAGIC (4 bytes: C1 'S' 'G' 01) | length (u32, big endian) | MessagePack body
//! ```
//!
//! The body is a [`HostMsg`] or a [`GuestMsg`] encoded with
//! `rmp_serde::to_vec_named` (maps with field names, so either side can add
//! an optional field later). `0xC1` is the one byte MessagePack never uses,
//! which makes a frame start easy to tell from stray bytes.
//!
//! **Limits.** A frame body larger than the reader's maximum is an error
//! before any of it is buffered: [`MAX_HOST_FRAME`] for what the guest reads
//! (a subtask's stdin rides in [`RunSubtask`], up to 64 MiB for a reduce),
//! [`MAX_GUEST_FRAME`] for what the host reads (output comes in chunks of at
//! most [`OUTPUT_CHUNK`] bytes).
//!
//! **Attaching.** The host speaks first. Every time it connects to the
//! socket (at boot, after a restore from a managed save) it sends
//! [`HostMsg::Attach`] with a fresh `session` nonce, repeated every second
//! until it gets a [`GuestMsg::Hello`] carrying the same nonce. Until then it
//! reads in **resync** mode ([`FrameDecoder::resync`]): bytes before a frame
//! start, and frames that are not that Hello, are skipped — the tail of a
//! frame the guest was writing when the previous connection went away may
//! come first. After the Hello every byte must be a well-formed frame; garbage
//! is a protocol error and the host reclaims the VM.
//!
//! **Running.** One subtask at a time: [`HostMsg::RunSubtask`] →
//! [`GuestMsg::Output`] chunks (each stream capped at `output_cap` bytes; the
//! full sizes are counted) and [`GuestMsg::Progress`] → [`GuestMsg::Result`].
//! The guest sends [`GuestMsg::Heartbeat`] every `heartbeat_ms` (from
//! [`HostMsg::Attach`]) whether or not it runs anything; a host that hears
//! nothing for a few heartbeats while the VM is not paused declares it dead.
//!
//! **Replay.** The guest keeps the kept (capped) output and the result of
//! its current or last subtask. After a reconnect the Hello names it
//! ([`Hello::current`]); the host answers [`HostMsg::Replay`] with the
//! offsets it already holds, and the guest re-sends output from there and
//! the result if it has one. So a VM saved to disk mid-subtask and restored
//! later finishes that subtask without losing a byte.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = [0xC1, b'S', b'G', 0x01];

/// Bytes before a frame's body: magic and length.
pub const HEADER_LEN: usize = 8;

/// Largest frame body the guest accepts (host → guest): 64 MiB of stdin plus
/// room for argv and env.
pub const MAX_HOST_FRAME: usize = 80 << 20;

/// Largest frame body the host accepts (guest → host).
pub const MAX_GUEST_FRAME: usize = 1 << 20;

/// Largest `data` of one [`GuestMsg::Output`].
pub const OUTPUT_CHUNK: usize = 256 << 10;

/// The virtio-serial port name the guest looks for in /sys/class/virtio-ports.
pub const PORT_NAME: &str = "org.sparegrid.guest.0";

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// "I am (re)connected": answer with a Hello carrying `session`.
    Attach {
        session: u64,
        /// How often the guest sends a Heartbeat.
        heartbeat_ms: u64,
    },
    RunSubtask(RunSubtask),
    /// Kill the subtask `id` (its process group); the guest still sends its Result.
    Cancel {
        id: u64,
    },
    /// Re-send subtask `id`'s kept output from these offsets, then its Result
    /// if it has finished.
    Replay {
        id: u64,
        stdout_from: u64,
        stderr_from: u64,
    },
    /// The host is alive (the guest does not need to answer).
    Heartbeat {
        seq: u64,
    },
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    Hello(Hello),
    Progress(Progress),
    Output(Output),
    Result(SubtaskResult),
    Heartbeat {
        seq: u64,
        /// Guest uptime (CLOCK_MONOTONIC; does not advance while the VM is paused).
        uptime_ms: u64,
        /// The subtask running now, if any.
        running: Option<u64>,
    },
    /// The guest could not make sense of a host frame (it skips it and goes on).
    Rejected {
        reason: String,
    },
}

/// The guest's answer to [`HostMsg::Attach`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub session: u64,
    pub protocol: u32,
    /// `sparegrid-guest`'s crate version.
    pub worker_version: String,
    /// What the worker supports, e.g. `"replay"`, `"cancel"`.
    pub capabilities: Vec<String>,
    /// Interpreters found in the image (`sh`, `awk`, `python3`, …).
    pub interpreters: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The current or last subtask the guest still holds, if any.
    pub current: Option<Current>,
}

/// A subtask the guest holds (see [`Hello::current`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Current {
    pub id: u64,
    /// Whether it has finished (its Result is kept).
    pub finished: bool,
}

/// Run one subtask. The guest runs one at a time; a second RunSubtask while
/// one runs gets a Result with `error` set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSubtask {
    /// Chosen by the host, unique per VM.
    pub id: u64,
    /// `job/index#epoch`, for the guest's log.
    pub label: String,
    /// The command; a script arrives as its interpreter's argv.
    pub argv: Vec<String>,
    /// Added to the guest's base environment.
    pub env: BTreeMap<String, String>,
    #[serde(with = "bytes_as_bin")]
    pub stdin: Vec<u8>,
    /// Killed after this long (guest monotonic time, so a paused VM does not
    /// use it up); 0 = no limit.
    pub timeout_ms: u64,
    /// Bytes of stdout and of stderr (each) sent and kept; the rest is counted.
    pub output_cap: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A chunk of a subtask's output; `offset` is where `data` starts in its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub id: u64,
    pub stream: Stream,
    pub offset: u64,
    #[serde(with = "bytes_as_bin")]
    pub data: Vec<u8>,
}

/// Sent every heartbeat while a subtask runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub id: u64,
    pub elapsed_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// How a subtask ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtaskResult {
    pub id: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why it could not run or finish (timeout, spawn failure, cancelled).
    pub error: Option<String>,
    /// Guest monotonic time from start to end (excludes time paused).
    pub duration_ms: u64,
    /// Full sizes, before capping.
    pub stdout_size: u64,
    pub stderr_size: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
}

/// Byte vectors as MessagePack `bin`, not an array of integers.
mod bytes_as_bin {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(serde_bytes_buf::ByteBuf::deserialize(d)?.0)
    }

    /// Accepts `bin`, `str` or an array of integers (what other encoders may send).
    mod serde_bytes_buf {
        use serde::de::{self, SeqAccess, Visitor};
        use serde::{Deserialize, Deserializer};
        use std::fmt;

        pub struct ByteBuf(pub Vec<u8>);

        impl<'de> Deserialize<'de> for ByteBuf {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteBuf, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = ByteBuf;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                        Ok(ByteBuf(v.to_vec()))
                    }
                    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                        Ok(ByteBuf(v))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteBuf, E> {
                        Ok(ByteBuf(v.as_bytes().to_vec()))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<ByteBuf, A::Error> {
                        let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 16));
                        while let Some(b) = a.next_element::<u8>()? {
                            out.push(b);
                        }
                        Ok(ByteBuf(out))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }
}

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is larger than the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("bytes {found:02x?} where a frame should start (expected {MAGIC:02x?})")]
    BadMagic { found: [u8; 4] },
    #[error("frame body is not a valid message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// One message as a complete frame (header + body). Fails when the body is
/// larger than `max`.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let size = out.len() - HEADER_LEN;
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    out[4..8].copy_from_slice(&(size as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame body.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Splits a byte stream into frame bodies. Feed it whatever a read returned
/// ([`FrameDecoder::push`]), then take frames ([`FrameDecoder::next_frame`])
/// until it says it needs more. It never buffers more than one header plus
/// `max` bytes: a header announcing more than `max` is an error at once.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of unread bytes in `buf`.
    pos: usize,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            pos: 0,
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (64 << 10) && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's body, `Ok(None)` when more bytes are
    /// needed. After an error the stream is out of step: call
    /// [`FrameDecoder::resync`] or give up on it.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            // Check the magic early, so garbage is caught without waiting.
            if avail.iter().zip(MAGIC.iter()).any(|(a, m)| a != m) {
                return Err(self.bad_magic());
            }
            return Ok(None);
        }
        if avail[..4] != MAGIC {
            return Err(self.bad_magic());
        }
        let size = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        if size > self.max {
            return Err(FrameError::TooLarge {
                size,
                max: self.max,
            });
        }
        if avail.len() < HEADER_LEN + size {
            return Ok(None);
        }
        let body = avail[HEADER_LEN..HEADER_LEN + size].to_vec();
        self.pos += HEADER_LEN + size;
        Ok(Some(body))
    }

    fn bad_magic(&self) -> FrameError {
        let mut found = [0u8; 4];
        for (f, b) in found.iter_mut().zip(&self.buf[self.pos..]) {
            *f = *b;
        }
        FrameError::BadMagic { found }
    }

    /// Skips to the next possible frame start after the current position
    /// (the next `MAGIC`, or the last bytes that could begin one). Returns
    /// how many bytes it dropped.
    pub fn resync(&mut self) -> usize {
        let start = self.pos;
        let avail = &self.buf[self.pos..];
        let skip = (1..avail.len())
            .find(|&i| {
                let rest = &avail[i..];
                let n = rest.len().min(4);
                rest[..n] == MAGIC[..n]
            })
            .unwrap_or(avail.len());
        self.pos += skip;
        self.pos - start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: u64) -> HostMsg {
        HostMsg::RunSubtask(RunSubtask {
            id,
            label: "j/1#1".into(),
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: BTreeMap::from([("A".into(), "b".into())]),
            stdin: vec![0, 1, 2, 255],
            timeout_ms: 1000,
            output_cap: 1 << 20,
        })
    }

    #[test]
    fn frames_round_trip_across_split_reads() {
        let msgs = vec![
            run(1),
            HostMsg::Attach {
                session: 7,
                heartbeat_ms: 1000,
            },
            HostMsg::Cancel { id: 1 },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m, MAX_HOST_FRAME).unwrap());
        }
        // Stdin travels as msgpack bin (0xc4), not an array of integers.
        assert!(bytes.windows(2).any(|w| w == [0xc4, 4]));
        let mut d = FrameDecoder::new(MAX_HOST_FRAME);
        let mut got = Vec::new();
        for b in bytes.chunks(3) {
            d.push(b);
            while let Some(body) = d.next_frame().unwrap() {
                got.push(decode_body::<HostMsg>(&body).unwrap());
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_body_arrives() {
        let mut d = FrameDecoder::new(100);
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&101u32.to_be_bytes());
        d.push(&h);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                size: 101,
                max: 100
            })
        ));
        let big = GuestMsg::Rejected {
            reason: "x".repeat(200),
        };
        assert!(matches!(
            encode_frame(&big, 100),
            Err(FrameError::TooLarge { max: 100, .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_and_resync_finds_the_next_frame() {
        let mut d = FrameDecoder::new(MAX_GUEST_FRAME);
        d.push(b"xx");
        assert!(matches!(d.next_frame(), Err(FrameError::BadMagic { .. })));
        let hb = GuestMsg::Heartbeat {
            seq: 3,
            uptime_ms: 10,
            running: None,
        };
        // A frame start split across the garbage boundary.
        let frame = encode_frame(&hb, MAX_GUEST_FRAME).unwrap();
        d.push(&[0xC1, b'S', b'q']);
        d.push(&frame);
        let mut skipped = 0;
        let body = loop {
            match d.next_frame() {
                Ok(Some(b)) => break b,
                Ok(None) => panic!("frame not found"),
                Err(_) => skipped += d.resync(),
            }
        };
        assert_eq!(skipped, 5);
        assert_eq!(decode_body::<GuestMsg>(&body).unwrap(), hb);
    }

    #[test]
    fn a_valid_frame_of_the_wrong_message_is_a_decode_error() {
        let frame = encode_frame(&run(1), MAX_HOST_FRAME).unwrap();
        let mut d = FrameDecoder::new(MAX_HOST_FRAME);
        d.push(&frame);
        let body = d.next_frame().unwrap().unwrap();
        assert!(matches!(
            decode_body::<GuestMsg>(&body),
            Err(FrameError::Decode(_))
        ));
    }
}
