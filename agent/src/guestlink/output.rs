//! Reassembles one output stream of a subtask from the guest's
//! [`Output`](sparegrid_proto::guest::Output) chunks: chunks carry their
//! offset, so a replay after a reconnect may repeat bytes (ignored) but must
//! never skip any (a gap is a protocol error). At most `cap` bytes are kept,
//! whatever the guest sends.

/// A chunk that starts after the end of what arrived so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Where the next chunk had to start (bytes received so far).
    pub expected: u64,
    /// Where it started.
    pub got: u64,
}

/// One stream's bytes as they arrive.
#[derive(Debug)]
pub struct Assembly {
    kept: Vec<u8>,
    /// End of the contiguous bytes received (kept or not).
    next: u64,
    cap: u64,
}

impl Assembly {
    pub fn new(cap: u64) -> Assembly {
        Assembly {
            kept: Vec::new(),
            next: 0,
            cap,
        }
    }

    /// Bytes received so far: where a replay must start.
    pub fn received(&self) -> u64 {
        self.next
    }

    /// Adds a chunk at `offset`. Bytes before [`Assembly::received`] are
    /// duplicates and skipped; a chunk starting after it is a [`Gap`].
    pub fn add(&mut self, offset: u64, data: &[u8]) -> Result<(), Gap> {
        if offset > self.next {
            return Err(Gap {
                expected: self.next,
                got: offset,
            });
        }
        let end = offset.saturating_add(data.len() as u64);
        if end <= self.next {
            return Ok(());
        }
        // `offset <= next < end`, so the skip is within `data`.
        let fresh = &data[(self.next - offset) as usize..];
        let room = self.cap.saturating_sub(self.kept.len() as u64);
        let take = fresh.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.kept.extend_from_slice(&fresh[..take]);
        self.next = end;
        Ok(())
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_order_with_duplicates_and_overlaps_assemble_once() {
        let mut a = Assembly::new(100);
        a.add(0, b"hello ").unwrap();
        a.add(0, b"hello ").unwrap(); // a replayed duplicate
        a.add(3, b"lo wor").unwrap(); // overlaps: only "wor" is new
        a.add(9, b"ld").unwrap();
        assert_eq!(a.received(), 11);
        assert_eq!(a.into_bytes(), b"hello world");
    }

    #[test]
    fn a_gap_is_an_error_and_keeps_what_arrived() {
        let mut a = Assembly::new(100);
        a.add(0, b"abc").unwrap();
        assert_eq!(
            a.add(5, b"x"),
            Err(Gap {
                expected: 3,
                got: 5
            })
        );
        assert_eq!(a.received(), 3);
    }

    #[test]
    fn keeps_at_most_cap_bytes_but_counts_all() {
        let mut a = Assembly::new(4);
        a.add(0, b"abc").unwrap();
        a.add(3, b"defgh").unwrap();
        assert_eq!(a.received(), 8);
        assert_eq!(a.into_bytes(), b"abcd");
        let mut a = Assembly::new(0);
        a.add(0, b"abc").unwrap();
        assert_eq!(a.into_bytes(), b"");
    }

    #[test]
    fn an_offset_near_u64_max_does_not_overflow() {
        let mut a = Assembly::new(4);
        assert!(a.add(u64::MAX, b"ab").is_err());
        a.add(0, b"").unwrap();
        assert_eq!(a.received(), 0);
    }
}
