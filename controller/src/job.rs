//! The work request (`POST /v1/jobs` body) and what the controller tracks
//! for it: jobs, subtasks and attempts. Plain data plus validation; no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What runs for each subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// An argv; `{start}`/`{end}` placeholders are filled for `range` jobs.
    Argv(Vec<String>),
    /// A script run by an interpreter the guest image carries (`sh`, `awk`, …).
    Script { interpreter: String, source: String },
}

/// How a request is cut into subtasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Split {
    /// Numbers `start..end` (end exclusive) in chunks of `chunk`; each
    /// subtask gets `SPAREGRID_START`/`SPAREGRID_END` in env and in
    /// `{start}`/`{end}` placeholders.
    Range { start: i64, end: i64, chunk: u64 },
    /// A list of items, `batch` per subtask, one per line on stdin.
    Items { items: Vec<String>, batch: u64 },
    /// An input cut into blocks of `block` lines on line boundaries, fed to stdin.
    Lines { input: String, block: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DispatchMode {
    #[default]
    Push,
    Pull,
    P2p,
}

/// Resources each subtask needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub timeout_secs: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: 1,
            memory_mib: 256,
            timeout_secs: 600,
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}

/// A researcher's work request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// A human name for listings.
    #[serde(default)]
    pub name: String,
    pub command: Command,
    pub split: Split,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub mode: DispatchMode,
    /// Run on the concatenated outputs in subtask order; without it the
    /// outputs are concatenated.
    #[serde(default)]
    pub reduce: Option<Command>,
}

/// One unit of work cut from a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskSpec {
    /// Position in the job, from 0; results are concatenated in this order.
    pub index: u64,
    /// The argv to run (placeholders filled; a script becomes
    /// `[interpreter, "-c", source]` or the interpreter's equivalent).
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Vec<u8>,
}
