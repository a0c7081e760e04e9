//! Property tests ("fuzzing" with proptest, small enough for CI) of the
//! guest channel's frame decoder ([`FrameDecoder`]):
//!
//! - arbitrary byte streams, fed in arbitrary chunkings, never panic it, and
//!   once drained it never holds more than one header plus `max` bytes;
//! - any sequence of valid frames, split anywhere, decodes to the same
//!   messages;
//! - a header announcing more than `max` is refused before its body arrives;
//! - [`FrameDecoder::resync`] always drops at least one byte of a non-empty
//!   buffer, and finds a valid frame behind garbage.
//!
//! Case counts are kept at a few hundred so the file runs in seconds.

use proptest::collection::vec;
use proptest::prelude::*;
use sparegrid_proto::guest::{
    decode_body, encode_frame, FrameDecoder, FrameError, GuestMsg, Output, Progress, Stream,
    SubtaskResult, HEADER_LEN, MAGIC, MAX_GUEST_FRAME,
};

/// Feeds `chunks` of `bytes` and drains after each one, resyncing after each
/// error; returns the decoded bodies. Checks the buffering and progress
/// properties on the way.
fn feed_and_drain(d: &mut FrameDecoder, bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let mut pos = 0;
    let mut cut_iter = cuts.iter().cycle();
    while pos < bytes.len() {
        let step = cut_iter.next().copied().unwrap_or(1).max(1);
        let end = (pos + step).min(bytes.len());
        d.push(&bytes[pos..end]);
        pos = end;
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= d.max(), "body larger than max");
                    bodies.push(body);
                }
                Ok(None) => break,
                Err(_) => {
                    let before = d.buffered();
                    let dropped = d.resync();
                    assert!(before == 0 || dropped >= 1, "resync made no progress");
                    assert_eq!(d.buffered(), before - dropped);
                }
            }
        }
        assert!(
            d.buffered() <= HEADER_LEN + d.max(),
            "buffered {} > header + max {}",
            d.buffered(),
            d.max()
        );
    }
    bodies
}

/// A byte stream that is more interesting than uniform noise: random bytes
/// mixed with magic numbers, plausible headers and complete frames.
fn noisy_stream() -> impl Strategy<Value = Vec<u8>> {
    let segment = prop_oneof![
        vec(any::<u8>(), 0..64),
        Just(MAGIC.to_vec()),
        (any::<u32>()).prop_map(|n| {
            let mut h = MAGIC.to_vec();
            h.extend_from_slice(&(n % 512).to_be_bytes());
            h
        }),
        any::<u32>().prop_map(|n| {
            let mut h = MAGIC.to_vec();
            h.extend_from_slice(&n.to_be_bytes());
            h
        }),
        guest_msg().prop_map(|m| encode_frame(&m, MAX_GUEST_FRAME).expect("small message encodes")),
    ];
    vec(segment, 0..24).prop_map(|s| s.concat())
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    let stream = prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)];
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(seq, uptime_ms, running)| GuestMsg::Heartbeat {
                seq,
                uptime_ms,
                running
            }),
        (any::<u64>(), stream, any::<u64>(), vec(any::<u8>(), 0..300)).prop_map(
            |(id, stream, offset, data)| GuestMsg::Output(Output {
                id,
                stream,
                offset,
                data
            })
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(id, elapsed_ms, stdout_bytes, stderr_bytes)| GuestMsg::Progress(Progress {
                id,
                elapsed_ms,
                stdout_bytes,
                stderr_bytes
            })
        ),
        ".{0,40}".prop_map(|reason| GuestMsg::Rejected { reason }),
        (
            any::<u64>(),
            proptest::option::of(any::<i32>()),
            proptest::option::of(1..64i32),
            proptest::option::of(".{0,20}"),
            any::<(u64, u64, u64, bool, bool, bool)>()
        )
            .prop_map(|(id, exit_code, signal, error, (d, so, se, t1, t2, t3))| {
                GuestMsg::Result(SubtaskResult {
                    id,
                    exit_code,
                    signal,
                    error,
                    duration_ms: d,
                    stdout_size: so,
                    stderr_size: se,
                    stdout_truncated: t1,
                    stderr_truncated: t2,
                    timed_out: t3,
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_bytes_in_arbitrary_chunks_never_panic_or_overbuffer(
        bytes in noisy_stream(),
        cuts in vec(1usize..200, 1..16),
        max in 0usize..600,
    ) {
        let mut d = FrameDecoder::new(max);
        for body in feed_and_drain(&mut d, &bytes, &cuts) {
            // Decoding a body must not panic either (errors are fine).
            let _ = decode_body::<GuestMsg>(&body);
        }
    }

    #[test]
    fn uniform_noise_never_panics(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(1usize..64, 1..8),
    ) {
        let mut d = FrameDecoder::new(MAX_GUEST_FRAME);
        for body in feed_and_drain(&mut d, &bytes, &cuts) {
            let _ = decode_body::<GuestMsg>(&body);
        }
    }

    #[test]
    fn valid_frames_split_anywhere_decode_to_the_same_messages(
        msgs in vec(guest_msg(), 0..12),
        cuts in vec(1usize..97, 1..12),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m, MAX_GUEST_FRAME).expect("encodes"));
        }
        let mut d = FrameDecoder::new(MAX_GUEST_FRAME);
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cut_iter = cuts.iter().cycle();
        while pos < bytes.len() {
            let end = (pos + *cut_iter.next().expect("cuts is not empty")).min(bytes.len());
            d.push(&bytes[pos..end]);
            pos = end;
            while let Some(body) = d.next_frame().expect("valid frames never error") {
                got.push(decode_body::<GuestMsg>(&body).expect("valid body"));
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn an_oversized_header_errors_before_its_body(
        max in 0usize..100_000,
        extra in 1u64..(u32::MAX as u64),
        body_part in vec(any::<u8>(), 0..64),
        split in 0usize..HEADER_LEN,
    ) {
        let size = (max as u64 + extra).min(u32::MAX as u64) as u32;
        prop_assume!(size as usize > max);
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&size.to_be_bytes());
        let mut d = FrameDecoder::new(max);
        // Header in two pieces: before the whole header is there the
        // decoder waits; once it is, it errors, with only part of a body.
        d.push(&h[..split]);
        prop_assert!(matches!(d.next_frame(), Ok(None)));
        d.push(&h[split..]);
        d.push(&body_part);
        match d.next_frame() {
            Err(FrameError::TooLarge { size: s, max: m }) => {
                prop_assert_eq!(s, size as usize);
                prop_assert_eq!(m, max);
            }
            other => prop_assert!(false, "expected TooLarge, got {:?}", other),
        }
        prop_assert!(d.buffered() <= HEADER_LEN + body_part.len());
    }

    #[test]
    fn resync_finds_a_frame_behind_garbage(
        garbage in vec(any::<u8>().prop_filter("no frame start", |b| *b != MAGIC[0]), 1..200),
        msg in guest_msg(),
        cuts in vec(1usize..50, 1..6),
    ) {
        let mut bytes = garbage.clone();
        bytes.extend(encode_frame(&msg, MAX_GUEST_FRAME).expect("encodes"));
        let mut d = FrameDecoder::new(MAX_GUEST_FRAME);
        let bodies = feed_and_drain(&mut d, &bytes, &cuts);
        prop_assert_eq!(bodies.len(), 1);
        prop_assert_eq!(decode_body::<GuestMsg>(&bodies[0]).expect("valid body"), msg);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn resync_always_makes_progress(bytes in vec(any::<u8>(), 1..300)) {
        let mut d = FrameDecoder::new(64);
        d.push(&bytes);
        // Whatever the buffer holds, repeated resyncs empty it in at most
        // as many steps as it has bytes.
        let mut steps = 0;
        while d.buffered() > 0 {
            let before = d.buffered();
            let dropped = d.resync();
            prop_assert!(dropped >= 1);
            prop_assert_eq!(d.buffered(), before - dropped);
            steps += 1;
            prop_assert!(steps <= bytes.len());
        }
        prop_assert_eq!(d.resync(), 0);
    }
}
