//! Cutting a [`JobRequest`] into subtasks.
//!
//! A job can have a million subtasks, so nothing here needs them all in
//! memory at once. A [`Plan`] is made once per job and is small: O(1) for
//! `range` and `items`, one byte offset per block for `lines`. From it,
//! [`Plan::part`] gives a subtask's [`Part`] (a couple of integers, cheap
//! enough to queue or store for every subtask), and [`Plan::subtask`] /
//! [`materialise`] build the full [`SubtaskSpec`] (argv, env, stdin) only
//! when the subtask is dispatched. [`split`] materialises everything, for
//! small jobs and tests.
//!
//! What each subtask gets:
//!
//! - every split: env `SPAREGRID_SUBTASK` (its index, from 0) and
//!   `SPAREGRID_SUBTASK_COUNT` (the job's number of subtasks);
//! - `range`: `[start, end)` cut into chunks of `chunk` (the last one may be
//!   shorter); env `SPAREGRID_START`/`SPAREGRID_END` (end exclusive), and
//!   every `{start}`/`{end}` in every argv element, a script's source
//!   included, replaced by those numbers (there is no escape for a literal
//!   `{start}`); stdin empty;
//! - `items`: `batch` items per subtask (the last batch may be smaller), each
//!   followed by `\n` on stdin; placeholders are left alone;
//! - `lines`: the input cut after every `block`-th `\n`; a final line without
//!   a newline stays as it is, `\r\n` is kept byte for byte, so the
//!   subtasks' stdin concatenated is the input exactly.
//!
//! - the reduce subtask ([`reduce_subtask`], index = the number of map
//!   subtasks): the reduce command's argv (no placeholders filled), env
//!   `SPAREGRID_REDUCE=1` and `SPAREGRID_SUBTASK_COUNT` (the number of map
//!   subtasks), stdin the map outputs concatenated in index order.
//!
//! A [`Part`] is two integers ([`Part::bounds`]); a store keeps those per
//! subtask and gets the part back with [`Part::from_bounds`], which refuses
//! bounds that do not lie inside the request.
//!
//! Scripts become an argv by [`Command::to_argv`]. A split never makes an
//! empty or overlapping subtask: the checks of [`JobRequest::validate`]
//! (non-empty input, `chunk`/`batch`/`block` ≥ 1, `end > start`) guarantee
//! it, and [`Plan::new`] runs them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::{
    line_count, range_subtask_count, Command, JobRequest, Limits, Split, SubtaskSpec,
    ValidationError,
};

/// Env var holding the subtask's index in its job.
pub const ENV_SUBTASK: &str = "SPAREGRID_SUBTASK";
/// Env var holding the job's number of subtasks.
pub const ENV_SUBTASK_COUNT: &str = "SPAREGRID_SUBTASK_COUNT";
/// Env var holding a `range` subtask's first number.
pub const ENV_START: &str = "SPAREGRID_START";
/// Env var holding a `range` subtask's end (exclusive).
pub const ENV_END: &str = "SPAREGRID_END";
/// Env var set to `1` for a job's reduce subtask.
pub const ENV_REDUCE: &str = "SPAREGRID_REDUCE";

/// Which slice of the request one subtask covers. Small and `Copy`, so a
/// controller can keep or store one per queued subtask and build the argv,
/// env and stdin only at dispatch time ([`materialise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Numbers `[start, end)`.
    Range { start: i64, end: i64 },
    /// Items `items[first..end]`.
    Items { first: u64, end: u64 },
    /// Bytes `input[offset..end]` of a `lines` input (whole lines).
    Lines { offset: u64, end: u64 },
}

impl Part {
    /// The part as two integers, `(lo, hi)`: the numbers `[start, end)`,
    /// the items `[first, end)` or the bytes `[offset, end)`. Item and byte
    /// offsets index data held in memory, so they fit an `i64`.
    pub fn bounds(self) -> (i64, i64) {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match self {
            Part::Range { start, end } => (start, end),
            Part::Items { first, end } => (int(first), int(end)),
            Part::Lines { offset, end } => (int(offset), int(end)),
        }
    }

    /// The part of `req`'s split with bounds `(lo, hi)` (as
    /// [`Part::bounds`] gave them); `None` unless `lo < hi` and both lie
    /// inside the request (the range, the items, the input), so
    /// [`materialise`] cannot fail on what this returns.
    pub fn from_bounds(req: &JobRequest, lo: i64, hi: i64) -> Option<Part> {
        if lo >= hi {
            return None;
        }
        match &req.split {
            &Split::Range { start, end, .. } => {
                (start <= lo && hi <= end).then_some(Part::Range { start: lo, end: hi })
            }
            Split::Items { items, .. } => {
                let (first, end) = (u64::try_from(lo).ok()?, u64::try_from(hi).ok()?);
                (end <= items.len() as u64).then_some(Part::Items { first, end })
            }
            Split::Lines { input, .. } => {
                let (offset, end) = (u64::try_from(lo).ok()?, u64::try_from(hi).ok()?);
                (end <= input.len() as u64).then_some(Part::Lines { offset, end })
            }
        }
    }
}

/// How a request is cut: everything needed to find any subtask by index
/// without cutting the others. See the module docs for the memory it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    count: u64,
    shape: Shape,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Range {
        start: i64,
        end: i64,
        chunk: u64,
    },
    Items {
        len: u64,
        batch: u64,
    },
    /// Byte offset where each block starts, plus the input's length at the
    /// end: block `i` is `bounds[i]..bounds[i + 1]`.
    Lines {
        bounds: Vec<u64>,
    },
}

impl Plan {
    /// Plans `req`. Runs [`JobRequest::validate`] without caps
    /// ([`Limits::unbounded`]), so a request that cannot be split (or run)
    /// is refused; the controller's own caps are the caller's to check first.
    pub fn new(req: &JobRequest) -> Result<Plan, ValidationError> {
        req.validate(&Limits::unbounded())?;
        Ok(Self::unchecked(req))
    }

    /// Plans a request without validating it. An invalid split plans zero
    /// subtasks rather than empty ones.
    fn unchecked(req: &JobRequest) -> Plan {
        match &req.split {
            &Split::Range { start, end, chunk } => Plan {
                count: range_subtask_count(start, end, chunk),
                shape: Shape::Range { start, end, chunk },
            },
            Split::Items { items, batch } => {
                let len = items.len() as u64;
                Plan {
                    count: if *batch == 0 { 0 } else { len.div_ceil(*batch) },
                    shape: Shape::Items { len, batch: *batch },
                }
            }
            Split::Lines { input, block } => {
                let bounds = line_block_bounds(input.as_bytes(), *block);
                Plan {
                    count: bounds.len().saturating_sub(1) as u64,
                    shape: Shape::Lines { bounds },
                }
            }
        }
    }

    /// Number of subtasks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The slice subtask `index` covers; `None` past the end.
    pub fn part(&self, index: u64) -> Option<Part> {
        if index >= self.count {
            return None;
        }
        Some(match &self.shape {
            &Shape::Range { start, end, chunk } => {
                let lo = start as i128 + index as i128 * chunk as i128;
                let hi = (lo + chunk as i128).min(end as i128);
                // Both lie in [start, end], so they fit an i64.
                Part::Range {
                    start: lo as i64,
                    end: hi as i64,
                }
            }
            &Shape::Items { len, batch } => {
                let first = index * batch; // < len, no overflow
                Part::Items {
                    first,
                    end: first.saturating_add(batch).min(len),
                }
            }
            Shape::Lines { bounds } => Part::Lines {
                offset: bounds[index as usize],
                end: bounds[index as usize + 1],
            },
        })
    }

    /// Every subtask's index and part, in order, computed as it goes.
    pub fn parts(&self) -> impl Iterator<Item = (u64, Part)> + '_ {
        (0..self.count).filter_map(move |i| self.part(i).map(|p| (i, p)))
    }

    /// Subtask `index` in full; `None` past the end. `req` must be the
    /// request this plan was made from.
    pub fn subtask(&self, req: &JobRequest, index: u64) -> Option<SubtaskSpec> {
        self.part(index)
            .map(|part| materialise(req, index, self.count, part))
    }

    /// Every subtask in full, in order, each built only when it is reached.
    pub fn subtasks<'a>(&'a self, req: &'a JobRequest) -> impl Iterator<Item = SubtaskSpec> + 'a {
        self.parts()
            .map(move |(i, part)| materialise(req, i, self.count, part))
    }
}

/// Byte offsets where each block of `block` lines starts, then `input.len()`.
/// Empty when there is nothing to cut (empty input or `block == 0`).
fn line_block_bounds(input: &[u8], block: u64) -> Vec<u64> {
    if input.is_empty() || block == 0 {
        return Vec::new();
    }
    let mut bounds = vec![0u64];
    let mut in_block = 0u64;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' {
            in_block += 1;
            if in_block == block && i + 1 < input.len() {
                bounds.push(i as u64 + 1);
                in_block = 0;
            }
        }
    }
    bounds.push(input.len() as u64);
    bounds
}

/// Builds subtask `index` (of `count`) covering `part` of `req`: argv with
/// placeholders filled for `range`, env, stdin. See the module docs.
///
/// # Panics
///
/// If `part` does not fit `req`'s split (a part of another kind, or bounds
/// outside the items or input); parts from a [`Plan`] of `req` always fit.
pub fn materialise(req: &JobRequest, index: u64, count: u64, part: Part) -> SubtaskSpec {
    let mut env = BTreeMap::new();
    env.insert(ENV_SUBTASK.to_string(), index.to_string());
    env.insert(ENV_SUBTASK_COUNT.to_string(), count.to_string());
    let (argv, stdin) = match (part, &req.split) {
        (Part::Range { start, end }, Split::Range { .. }) => {
            let (s, e) = (start.to_string(), end.to_string());
            let argv = req
                .command
                .to_argv()
                .into_iter()
                .map(|a| fill(a, &s, &e))
                .collect();
            env.insert(ENV_START.to_string(), s);
            env.insert(ENV_END.to_string(), e);
            (argv, Vec::new())
        }
        (Part::Items { first, end }, Split::Items { items, .. }) => {
            let batch = &items[first as usize..end as usize];
            let mut stdin = Vec::with_capacity(batch.iter().map(|s| s.len() + 1).sum());
            for item in batch {
                stdin.extend_from_slice(item.as_bytes());
                stdin.push(b'\n');
            }
            (req.command.to_argv(), stdin)
        }
        (Part::Lines { offset, end }, Split::Lines { input, .. }) => (
            req.command.to_argv(),
            input.as_bytes()[offset as usize..end as usize].to_vec(),
        ),
        (part, split) => panic!(
            "split part {part:?} does not belong to a {} split",
            split_kind(split)
        ),
    };
    SubtaskSpec {
        index,
        argv,
        env,
        stdin,
    }
}

fn split_kind(split: &Split) -> &'static str {
    match split {
        Split::Range { .. } => "range",
        Split::Items { .. } => "items",
        Split::Lines { .. } => "lines",
    }
}

/// Replaces `{start}` and `{end}` in `arg`; no copy when there are none.
fn fill(arg: String, start: &str, end: &str) -> String {
    if !arg.contains('{') {
        return arg;
    }
    arg.replace("{start}", start).replace("{end}", end)
}

/// Plans `req` (see [`Plan::new`]).
pub fn plan(req: &JobRequest) -> Result<Plan, ValidationError> {
    Plan::new(req)
}

/// Every subtask of `req`, built at once. Fine for small jobs; for large
/// ones use a [`Plan`]. Validates as [`Plan::new`] does (no caps): check the
/// controller's [`Limits`] first, or a huge range will take huge memory.
pub fn split(req: &JobRequest) -> Result<Vec<SubtaskSpec>, ValidationError> {
    let plan = Plan::new(req)?;
    Ok(plan.subtasks(req).collect())
}

/// Number of subtasks `req` is cut into, without allocating. Expects a valid
/// request; an unsplittable split (`chunk == 0`, `end <= start`, empty input)
/// counts 0. A `lines` input is scanned once.
pub fn subtask_count(req: &JobRequest) -> u64 {
    match &req.split {
        &Split::Range { start, end, chunk } => range_subtask_count(start, end, chunk),
        Split::Items { items, batch } => {
            if *batch == 0 {
                0
            } else {
                (items.len() as u64).div_ceil(*batch)
            }
        }
        Split::Lines { input, block } => {
            if *block == 0 {
                0
            } else {
                line_count(input.as_bytes()).div_ceil(*block)
            }
        }
    }
}

/// Subtask `index` of `req` alone; `None` past the end. O(1) for `range` and
/// `items`; a `lines` input is scanned up to the block, so to walk many
/// blocks use a [`Plan`]. Expects a valid request, like [`subtask_count`].
pub fn subtask_at(req: &JobRequest, index: u64) -> Option<SubtaskSpec> {
    let count = subtask_count(req);
    if index >= count {
        return None;
    }
    let part = match &req.split {
        Split::Lines { input, block } => {
            let bytes = input.as_bytes();
            let skip = index.checked_mul(*block)?; // lines before the block
            let offset = nth_line_start(bytes, skip)?;
            let end = nth_line_start(&bytes[offset..], *block).map_or(bytes.len(), |n| offset + n);
            Part::Lines {
                offset: offset as u64,
                end: end as u64,
            }
        }
        _ => Plan::unchecked(req).part(index)?,
    };
    Some(materialise(req, index, count, part))
}

/// Byte offset where line `n` (from 0) starts; `None` when `bytes` has no
/// line `n`.
fn nth_line_start(bytes: &[u8], n: u64) -> Option<usize> {
    if n == 0 {
        return (!bytes.is_empty()).then_some(0);
    }
    let mut seen = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return (i + 1 < bytes.len()).then_some(i + 1);
            }
        }
    }
    None
}

/// The argv of a request's reduce step, if it has one (no placeholders are
/// filled: reduce runs once, on the concatenated outputs).
pub fn reduce_argv(req: &JobRequest) -> Option<Vec<String>> {
    req.reduce.as_ref().map(Command::to_argv)
}

/// The reduce subtask of a job whose request has a `reduce` command and
/// `map_count` map subtasks: index `map_count`, the reduce argv, env
/// [`ENV_REDUCE`] and [`ENV_SUBTASK_COUNT`], and `stdin` (the map outputs
/// concatenated in index order). `None` when the request has no reduce.
pub fn reduce_subtask(req: &JobRequest, map_count: u64, stdin: Vec<u8>) -> Option<SubtaskSpec> {
    let argv = reduce_argv(req)?;
    let mut env = BTreeMap::new();
    env.insert(ENV_REDUCE.to_string(), "1".to_string());
    env.insert(ENV_SUBTASK.to_string(), map_count.to_string());
    env.insert(ENV_SUBTASK_COUNT.to_string(), map_count.to_string());
    Some(SubtaskSpec {
        index: map_count,
        argv,
        env,
        stdin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{DispatchMode, Resources};
    use proptest::prelude::*;

    fn req(command: Command, split: Split) -> JobRequest {
        JobRequest {
            name: String::new(),
            command,
            split,
            resources: Resources::default(),
            max_attempts: 3,
            priority: 0,
            mode: DispatchMode::Push,
            reduce: None,
            network: crate::job::Network::None,
        }
    }

    fn argv(args: &[&str]) -> Command {
        Command::Argv(args.iter().map(|s| s.to_string()).collect())
    }

    fn range(start: i64, end: i64, chunk: u64) -> JobRequest {
        req(
            argv(&[
                "sim",
                "--from={start}",
                "--to={end}",
                "{start}-{end}-{start}",
            ]),
            Split::Range { start, end, chunk },
        )
    }

    fn lines(input: &str, block: u64) -> JobRequest {
        req(
            argv(&["wc", "-l"]),
            Split::Lines {
                input: input.into(),
                block,
            },
        )
    }

    fn stdin_text(subtasks: &[SubtaskSpec]) -> Vec<String> {
        subtasks
            .iter()
            .map(|s| String::from_utf8(s.stdin.clone()).unwrap())
            .collect()
    }

    #[test]
    fn range_fills_env_and_placeholders() {
        let r = range(-5, 6, 4);
        let subs = split(&r).unwrap();
        assert_eq!(subs.len(), 3);
        let bounds: Vec<_> = subs
            .iter()
            .map(|s| (s.env[ENV_START].clone(), s.env[ENV_END].clone()))
            .collect();
        assert_eq!(
            bounds,
            [("-5", "-1"), ("-1", "3"), ("3", "6")].map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(subs[1].argv, ["sim", "--from=-1", "--to=3", "-1-3--1"]);
        assert_eq!(subs[2].env[ENV_SUBTASK], "2");
        assert_eq!(subs[2].env[ENV_SUBTASK_COUNT], "3");
        assert!(subs.iter().all(|s| s.stdin.is_empty()));
        assert_eq!(subs.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn range_placeholders_reach_script_source() {
        let r = req(
            Command::Script {
                interpreter: "sh".into(),
                source: "seq {start} $(({end} - 1))".into(),
            },
            Split::Range {
                start: 10,
                end: 20,
                chunk: 10,
            },
        );
        let s = subtask_at(&r, 0).unwrap();
        assert_eq!(s.argv, ["sh", "-c", "seq 10 $((20 - 1))"]);
        let r = req(
            Command::Script {
                interpreter: "awk".into(),
                source: "BEGIN { print {start} }".into(),
            },
            Split::Range {
                start: 1,
                end: 2,
                chunk: 1,
            },
        );
        assert_eq!(split(&r).unwrap()[0].argv, ["awk", "BEGIN { print 1 }"]);
    }

    #[test]
    fn range_at_the_ends_of_i64() {
        let r = range(i64::MIN, i64::MAX, u64::MAX / 2);
        let subs = split(&r).unwrap();
        assert_eq!(subs.len(), 3);
        assert_eq!(subs[0].env[ENV_START], i64::MIN.to_string());
        assert_eq!(subs[2].env[ENV_END], i64::MAX.to_string());
        assert_eq!(subtask_count(&range(i64::MIN, i64::MAX, 1)), u64::MAX);
        assert_eq!(subtask_count(&range(i64::MIN, i64::MAX, u64::MAX)), 1);
    }

    #[test]
    fn items_go_one_per_line_in_batches() {
        let r = req(
            argv(&["convert"]),
            Split::Items {
                items: ["a.png", "b.png", "c d.png", "", "e.png"]
                    .map(String::from)
                    .to_vec(),
                batch: 2,
            },
        );
        let subs = split(&r).unwrap();
        assert_eq!(
            stdin_text(&subs),
            ["a.png\nb.png\n", "c d.png\n\n", "e.png\n"]
        );
        assert!(subs.iter().all(|s| s.argv == ["convert"]));
        assert!(!subs[0].env.contains_key(ENV_START));
    }

    #[test]
    fn placeholders_stay_literal_outside_ranges() {
        let r = req(
            argv(&["echo", "{start}"]),
            Split::Items {
                items: vec!["x".into()],
                batch: 1,
            },
        );
        assert_eq!(split(&r).unwrap()[0].argv, ["echo", "{start}"]);
    }

    #[test]
    fn lines_cut_on_line_boundaries() {
        let subs = split(&lines("a\r\nb\nc\nd", 2)).unwrap();
        assert_eq!(stdin_text(&subs), ["a\r\nb\n", "c\nd"]);
        let subs = split(&lines("a\nb\n", 2)).unwrap();
        assert_eq!(stdin_text(&subs), ["a\nb\n"]);
        let subs = split(&lines("a\n\n\n", 1)).unwrap();
        assert_eq!(stdin_text(&subs), ["a\n", "\n", "\n"]);
        let subs = split(&lines("no newline", 5)).unwrap();
        assert_eq!(stdin_text(&subs), ["no newline"]);
        assert_eq!(subs[0].argv, ["wc", "-l"]);
    }

    #[test]
    fn unsplittable_requests_are_refused() {
        assert_eq!(split(&range(3, 3, 1)).unwrap_err().field, "split.range.end");
        assert_eq!(
            split(&range(0, 3, 0)).unwrap_err().field,
            "split.range.chunk"
        );
        assert_eq!(split(&lines("", 1)).unwrap_err().field, "split.lines.input");
        assert_eq!(
            split(&lines("a", 0)).unwrap_err().field,
            "split.lines.block"
        );
        let r = req(
            argv(&[]),
            Split::Range {
                start: 0,
                end: 1,
                chunk: 1,
            },
        );
        assert_eq!(split(&r).unwrap_err().field, "command.argv");
        // Without validation, nothing is invented either.
        assert_eq!(subtask_count(&range(3, 3, 1)), 0);
        assert_eq!(subtask_count(&range(0, 3, 0)), 0);
        assert_eq!(subtask_count(&lines("", 1)), 0);
        assert_eq!(subtask_at(&lines("", 1), 0), None);
        assert_eq!(subtask_at(&range(0, 3, 0), 0), None);
    }

    #[test]
    fn past_the_end_is_none() {
        let r = range(0, 10, 5);
        let plan = Plan::new(&r).unwrap();
        assert_eq!(plan.part(2), None);
        assert_eq!(plan.subtask(&r, 2), None);
        assert_eq!(subtask_at(&r, 2), None);
        assert_eq!(subtask_at(&lines("a\nb", 1), 2), None);
        assert!(subtask_at(&lines("a\nb", 1), 1).is_some());
    }

    #[test]
    fn a_million_subtask_range_is_planned_without_building_them() {
        let r = range(0, 1_000_000, 1);
        r.validate(&Limits::default()).unwrap();
        let plan = Plan::new(&r).unwrap();
        assert_eq!(plan.count(), 1_000_000);
        assert_eq!(std::mem::size_of::<Part>(), 24);
        let mut n = 0u64;
        for (i, part) in plan.parts() {
            assert_eq!(
                part,
                Part::Range {
                    start: i as i64,
                    end: i as i64 + 1
                }
            );
            n += 1;
        }
        assert_eq!(n, 1_000_000);
        let last = plan.subtask(&r, 999_999).unwrap();
        assert_eq!(last.argv[1], "--from=999999");
    }

    #[test]
    fn parts_serialise_compactly() {
        let p = Part::Lines { offset: 4, end: 9 };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(text, r#"{"lines":{"offset":4,"end":9}}"#);
        assert_eq!(serde_json::from_str::<Part>(&text).unwrap(), p);
    }

    #[test]
    fn reduce_argv_uses_the_script_rule() {
        let mut r = range(0, 1, 1);
        assert_eq!(reduce_argv(&r), None);
        r.reduce = Some(Command::Script {
            interpreter: "awk".into(),
            source: "{s+=$1} END {print s}".into(),
        });
        assert_eq!(reduce_argv(&r).unwrap(), ["awk", "{s+=$1} END {print s}"]);
    }

    #[test]
    fn reduce_subtask_follows_the_maps() {
        let mut r = range(0, 10, 5);
        assert_eq!(reduce_subtask(&r, 2, b"x".to_vec()), None);
        r.reduce = Some(argv(&["sort", "{start}"]));
        let s = reduce_subtask(&r, 2, b"a\nb\n".to_vec()).unwrap();
        assert_eq!(s.index, 2);
        assert_eq!(s.argv, ["sort", "{start}"], "no placeholders in a reduce");
        assert_eq!(s.env[ENV_REDUCE], "1");
        assert_eq!(s.env[ENV_SUBTASK_COUNT], "2");
        assert!(!s.env.contains_key(ENV_START));
        assert_eq!(s.stdin, b"a\nb\n");
    }

    #[test]
    fn bounds_round_trip_and_foreign_bounds_are_refused() {
        let reqs = [
            range(-7, 20, 4),
            lines("a\nbb\nccc\n", 1),
            req(
                argv(&["x"]),
                Split::Items {
                    items: vec!["p".into(), "q".into(), "r".into()],
                    batch: 2,
                },
            ),
        ];
        for r in &reqs {
            let plan = Plan::new(r).unwrap();
            for (i, part) in plan.parts() {
                let (lo, hi) = part.bounds();
                assert_eq!(Part::from_bounds(r, lo, hi), Some(part), "{i}");
            }
        }
        // Outside the range, the items or the input; empty; reversed.
        assert_eq!(Part::from_bounds(&reqs[0], -8, 0), None);
        assert_eq!(Part::from_bounds(&reqs[0], 0, 21), None);
        assert_eq!(Part::from_bounds(&reqs[0], 3, 3), None);
        assert_eq!(Part::from_bounds(&reqs[1], 0, 11), None);
        assert_eq!(Part::from_bounds(&reqs[1], -1, 2), None);
        assert_eq!(Part::from_bounds(&reqs[2], 2, 4), None);
        assert_eq!(Part::from_bounds(&reqs[2], 2, 1), None);
        assert_eq!(
            Part::from_bounds(&reqs[2], 2, 3),
            Some(Part::Items { first: 2, end: 3 })
        );
    }

    #[test]
    #[should_panic(expected = "does not belong")]
    fn a_foreign_part_is_a_bug() {
        materialise(&range(0, 1, 1), 0, 1, Part::Items { first: 0, end: 1 });
    }

    fn range_strategy() -> impl Strategy<Value = (i64, i64, u64)> {
        prop_oneof![
            // Small ranges around zero, chunks from 1 to beyond the length.
            (-1000i64..1000, 1i64..400, 1u64..500).prop_map(|(s, len, c)| (s, s + len, c)),
            // Anywhere in i64, with chunks big enough to keep counts small.
            (any::<i64>(), any::<i64>(), 1u64 << 56..=u64::MAX).prop_filter_map(
                "non-empty",
                |(a, b, c)| (a != b).then(|| (a.min(b), a.max(b), c))
            ),
            // Hugging the ends of i64.
            (0i64..300, 1u64..100).prop_map(|(len, c)| (i64::MIN, i64::MIN + len + 1, c)),
            (0i64..300, 1u64..100).prop_map(|(len, c)| (i64::MAX - len - 1, i64::MAX, c)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn range_subtasks_cover_the_range_exactly_once((start, end, chunk) in range_strategy()) {
            let r = range(start, end, chunk);
            let plan = Plan::new(&r).unwrap();
            let subs: Vec<_> = plan.subtasks(&r).collect();
            prop_assert_eq!(subs.len() as u64, subtask_count(&r));
            prop_assert_eq!(subs.len() as u64, plan.count());
            let mut next = start as i128;
            for (i, s) in subs.iter().enumerate() {
                prop_assert_eq!(s.index, i as u64);
                let lo: i128 = s.env[ENV_START].parse().unwrap();
                let hi: i128 = s.env[ENV_END].parse().unwrap();
                prop_assert_eq!(lo, next, "gap or overlap before subtask {}", i);
                prop_assert!(hi > lo, "empty subtask {}", i);
                prop_assert!(hi - lo <= chunk as i128);
                if i + 1 < subs.len() {
                    prop_assert_eq!(hi - lo, chunk as i128, "only the last chunk may be short");
                }
                prop_assert_eq!(&s.argv[1], &format!("--from={lo}"));
                prop_assert_eq!(&s.argv[2], &format!("--to={hi}"));
                prop_assert_eq!(s.env[ENV_SUBTASK].parse::<usize>().unwrap(), i);
                next = hi;
            }
            prop_assert_eq!(next, end as i128);
            for i in [0, subs.len() as u64 / 2, subs.len() as u64 - 1] {
                prop_assert_eq!(subtask_at(&r, i), Some(subs[i as usize].clone()));
            }
            prop_assert_eq!(subtask_at(&r, subs.len() as u64), None);
        }

        #[test]
        fn items_appear_exactly_once_in_order(
            items in prop::collection::vec("[a-z é\t]{0,6}", 1..60),
            batch in 1u64..25,
        ) {
            let r = req(argv(&["x"]), Split::Items { items: items.clone(), batch });
            let subs = split(&r).unwrap();
            prop_assert_eq!(subs.len() as u64, subtask_count(&r));
            let mut all = Vec::new();
            for (i, s) in subs.iter().enumerate() {
                let text = String::from_utf8(s.stdin.clone()).unwrap();
                prop_assert!(text.ends_with('\n'));
                let batch_items: Vec<&str> = text.strip_suffix('\n').unwrap().split('\n').collect();
                prop_assert!(!batch_items.is_empty() && batch_items.len() as u64 <= batch);
                if i + 1 < subs.len() {
                    prop_assert_eq!(batch_items.len() as u64, batch);
                }
                prop_assert_eq!(subtask_at(&r, i as u64), Some(s.clone()));
                all.extend(batch_items.into_iter().map(String::from));
            }
            prop_assert_eq!(all, items);
        }

        #[test]
        fn lines_concatenate_back_to_the_input(
            pieces in prop::collection::vec(prop_oneof!["a", "bc", "é", "\n", "\r\n", "\r"], 1..120),
            block in 1u64..12,
        ) {
            let input: String = pieces.concat();
            let r = lines(&input, block);
            let plan = Plan::new(&r).unwrap();
            let subs: Vec<_> = plan.subtasks(&r).collect();
            prop_assert_eq!(subs.len() as u64, subtask_count(&r));
            let mut joined = Vec::new();
            for (i, s) in subs.iter().enumerate() {
                let n = line_count(&s.stdin);
                prop_assert!(n >= 1, "empty block {}", i);
                prop_assert!(n <= block);
                if i + 1 < subs.len() {
                    prop_assert_eq!(n, block, "only the last block may be short");
                    prop_assert_eq!(s.stdin.last(), Some(&b'\n'), "cut inside a line");
                }
                prop_assert_eq!(subtask_at(&r, i as u64), Some(s.clone()));
                joined.extend_from_slice(&s.stdin);
            }
            prop_assert_eq!(joined, input.as_bytes().to_vec());
            prop_assert_eq!(subtask_at(&r, subs.len() as u64), None);
        }
    }
}
