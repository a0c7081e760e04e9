//! The checkpoint digests and the whole file's blake3, as one tree.
//!
//! A checkpoint chunk's digest is not the blake3 of the chunk on its own
//! but its *chaining value* at its place in the file: the interior node
//! that blake3 itself computes for those bytes at that offset
//! (`blake3::hazmat`). The whole file's ordinary blake3 (the digest a
//! client declares, the ETag) is then the merge of the chunks' chaining
//! values ([`Chunks::whole`]), so no end of a transfer reads the file a
//! second time to verify it: each byte is hashed once, on its way to disk.
//!
//! This needs chunks that are whole subtrees of the blake3 tree: a
//! `checkpoint_bytes` that is a power of two of at least 1 KiB
//! ([`check_chunk_len`]), every chunk starting at a multiple of it (only
//! the last one may be short). A chaining value binds the bytes and their
//! offset, so it is as strong a per-chunk check as a hash of the chunk.
//!
//! Written here, on the crate's hazmat API, because no crate offers a
//! resumable per-chunk blake3 tree (bao encodes whole files with its own
//! outboard format).

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use blake3::{Hash, Hasher, CHUNK_LEN};

/// Why a chunk length cannot build the tree.
pub fn check_chunk_len(cp: u64) -> Result<(), String> {
    if cp < CHUNK_LEN as u64 || !cp.is_power_of_two() {
        return Err(format!(
            "must be a power of two of at least {CHUNK_LEN} bytes, got {cp}"
        ));
    }
    Ok(())
}

/// A hasher for the chunk that starts at `start` (a multiple of the chunk
/// length).
pub fn chunk_hasher(start: u64) -> Hasher {
    let mut h = Hasher::new();
    if start > 0 {
        h.set_input_offset(start);
    }
    h
}

/// After a chunk ended at `at`: `h` starts the next chunk there. An `at`
/// that is no boundary is the end of the file (nothing follows), and `h`
/// is left as it is.
pub fn next_chunk(h: &mut Hasher, at: u64) {
    if at.is_multiple_of(CHUNK_LEN as u64) {
        *h = chunk_hasher(at);
    }
}

/// Feeds bytes `[start, end)` of `file` to `h`, through one buffer of at
/// most 1 MiB.
pub fn update_from_file(
    h: &mut Hasher,
    file: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (1 << 20).min(end.saturating_sub(start)) as usize];
    let mut pos = start;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(())
}

/// The chaining value of bytes `[start, end)` of `file`, one chunk.
pub fn chunk_of_file(file: &std::fs::File, start: u64, end: u64) -> std::io::Result<ChainingValue> {
    let mut h = chunk_hasher(start);
    update_from_file(&mut h, file, start, end)?;
    Ok(h.finalize_non_root())
}

/// The journaled digest of the chunk `h` hashed (its chaining value, hex).
pub fn chunk_digest(h: &Hasher) -> String {
    to_hex(&h.finalize_non_root())
}

/// The journaled digest of `bytes` as the chunk that starts at `start`.
pub fn digest_of(start: u64, bytes: &[u8]) -> String {
    let mut h = chunk_hasher(start);
    h.update(bytes);
    chunk_digest(&h)
}

/// A chaining value as the journal writes it (lowercase hex).
pub fn to_hex(cv: &ChainingValue) -> String {
    Hash::from_bytes(*cv).to_hex().to_string()
}

/// A journaled chunk digest back as a chaining value.
pub fn from_hex(s: &str) -> Option<ChainingValue> {
    Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

/// The chunks of one file so far, in order: their chaining values, and the
/// first chunk's plain blake3 (the whole digest when the file is that one
/// chunk; a root cannot be rebuilt from a chaining value).
#[derive(Clone, Debug, Default)]
pub struct Chunks {
    cvs: Vec<ChainingValue>,
    first_root: Option<Hash>,
}

impl Chunks {
    /// Adds the next chunk, hashed by `h` (from [`chunk_hasher`]); returns
    /// its chaining value.
    pub fn push(&mut self, h: &Hasher) -> ChainingValue {
        let cv = h.finalize_non_root();
        if self.cvs.is_empty() {
            self.first_root = Some(h.finalize());
        }
        self.cvs.push(cv);
        cv
    }

    /// Adds the next chunk by its chaining value alone (from a journal);
    /// a file of one chunk then has no whole digest ([`Chunks::whole`]).
    pub fn push_cv(&mut self, cv: ChainingValue) {
        if self.cvs.is_empty() {
            self.first_root = None;
        }
        self.cvs.push(cv);
    }

    pub fn len(&self) -> usize {
        self.cvs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cvs.is_empty()
    }

    /// Keeps the first `n` chunks (a cut back to a checkpoint).
    pub fn truncate(&mut self, n: usize) {
        self.cvs.truncate(n);
        if n == 0 {
            self.first_root = None;
        }
    }

    /// The whole file's blake3, for a file of `size` bytes in chunks of
    /// `cp` whose every chunk was pushed. None when chunks are missing, or
    /// when the only chunk came from [`Chunks::push_cv`].
    pub fn whole(&self, size: u64, cp: u64) -> Option<Hash> {
        let want = size.div_ceil(cp) as usize;
        if self.cvs.len() != want {
            return None;
        }
        match want {
            0 => Some(blake3::hash(b"")),
            1 => self.first_root,
            _ => {
                let (l, r, left_len) = split(&self.cvs, size, cp);
                Some(merge_subtrees_root(
                    &subtree(l, left_len, cp),
                    &subtree(r, size - left_len, cp),
                    Mode::Hash,
                ))
            }
        }
    }
}

/// blake3's split of `len` bytes (more than one chunk) into its left and
/// right subtrees, in chunks of `cp`.
fn split(cvs: &[ChainingValue], len: u64, cp: u64) -> (&[ChainingValue], &[ChainingValue], u64) {
    let left_len = blake3::hazmat::left_subtree_len(len);
    let (l, r) = cvs.split_at((left_len / cp) as usize);
    (l, r, left_len)
}

/// The chaining value of a subtree of `len` bytes made of `cvs`.
fn subtree(cvs: &[ChainingValue], len: u64, cp: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r, left_len) = split(cvs, len, cp);
    merge_subtrees_non_root(
        &subtree(l, left_len, cp),
        &subtree(r, len - left_len, cp),
        Mode::Hash,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn whole_by_chunks(d: &[u8], cp: u64) -> Option<Hash> {
        let mut c = Chunks::default();
        for (i, part) in d.chunks(cp as usize).enumerate() {
            let mut h = chunk_hasher(i as u64 * cp);
            h.update(part);
            c.push(&h);
        }
        c.whole(d.len() as u64, cp)
    }

    #[test]
    fn the_merged_chunks_are_the_plain_blake3_of_the_file() {
        // Sizes around every split: one chunk, exact powers, one byte more
        // or less, odd counts of chunks.
        for cp in [1024u64, 4096, 64 * 1024] {
            for chunks in [0u64, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17] {
                for delta in [-1i64, 0, 1, 100] {
                    let n = (chunks * cp) as i64 + delta;
                    if n < 0 {
                        continue;
                    }
                    let d = data(n as usize);
                    assert_eq!(
                        whole_by_chunks(&d, cp),
                        Some(blake3::hash(&d)),
                        "cp {cp}, {n} bytes"
                    );
                }
            }
        }
    }

    #[test]
    fn a_changed_byte_or_a_moved_chunk_changes_the_digests() {
        let cp = 4096;
        let d = data(5 * cp as usize + 10);
        let mut e = d.clone();
        e[3 * cp as usize + 5] ^= 1;
        assert_ne!(whole_by_chunks(&d, cp), whole_by_chunks(&e, cp));
        // The same bytes at another offset have another chaining value.
        let chunk = &d[..cp as usize];
        let at = |start: u64| {
            let mut h = chunk_hasher(start);
            h.update(chunk);
            h.finalize_non_root()
        };
        assert_ne!(at(0), at(cp));
    }

    #[test]
    fn missing_chunks_or_a_journaled_only_chunk_give_no_whole() {
        let cp = 1024;
        let d = data(3000);
        let mut c = Chunks::default();
        let mut h = chunk_hasher(0);
        h.update(&d[..1024]);
        c.push(&h);
        assert_eq!(c.whole(3000, cp), None);
        let mut one = Chunks::default();
        one.push_cv(c.cvs[0]);
        assert_eq!(one.whole(1024, cp), None);
        // Truncating and pushing again rebuilds the same whole.
        let mut full = Chunks::default();
        for (i, part) in d.chunks(1024).enumerate() {
            let mut h = chunk_hasher(i as u64 * cp);
            h.update(part);
            full.push(&h);
        }
        let want = full.whole(3000, cp);
        full.truncate(1);
        for (i, part) in d.chunks(1024).enumerate().skip(1) {
            let mut h = chunk_hasher(i as u64 * cp);
            h.update(part);
            full.push(&h);
        }
        assert_eq!(full.whole(3000, cp), want);
        assert_eq!(want, Some(blake3::hash(&d)));
    }

    #[test]
    fn chunk_lengths_must_be_powers_of_two_from_one_kib() {
        assert!(check_chunk_len(1024).is_ok());
        assert!(check_chunk_len(8 << 20).is_ok());
        for bad in [0, 1, 1000, 1536, 3 << 20] {
            assert!(check_chunk_len(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_chunk_read_from_a_file_matches_the_streamed_one() {
        use std::io::Write;
        let d = data(10_000);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&d).unwrap();
        let mut h = chunk_hasher(4096);
        h.update(&d[4096..8192]);
        assert_eq!(
            chunk_of_file(&f, 4096, 8192).unwrap(),
            h.finalize_non_root()
        );
        assert_eq!(
            from_hex(&to_hex(&h.finalize_non_root())),
            Some(h.finalize_non_root())
        );
    }
}
