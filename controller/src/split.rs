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
