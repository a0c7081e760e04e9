//! The work request (`POST /v1/jobs` body) and what the controller tracks
//! for it: jobs, subtasks and attempts. Plain data plus validation; no I/O.
//!
//! - [`JobRequest::validate`] checks a request against the controller's
//!   [`Limits`]; the [`ValidationError`] names the field by its dotted JSON
//!   path (`split.range.chunk`, `command.argv[0]`, `resources.vcpus`) and
//!   carries a stable [`ErrorCode`] for the API's `{code, message, field}`
//!   error body.
//! - [`parse_json`] / [`parse_value`] read a request body. They walk the JSON
//!   tree themselves instead of relying on serde's derive, so that every
//!   unknown field, missing field and wrong type is reported with its exact
//!   path and a message written for people (serde_json reports only
//!   line/column and cannot say which nested field was wrong). The result is
//!   the same [`JobRequest`] the serde derive builds; a test keeps the two in
//!   step. The derive stays for serialising and for TOML job files.
//! - [`Command::to_argv`] is the one place that turns a script into an argv.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
pub use sparegrid_proto::Network;

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
    /// The network its subtasks get: `none` (the default) or `overlay`
    /// (only hosts that hold a slice of the grid overlay run them).
    #[serde(default)]
    pub network: Network,
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

impl Command {
    /// The argv this command runs, before any placeholder is filled.
    ///
    /// An [`Command::Argv`] is returned as is. A [`Command::Script`] becomes
    /// an argv by the interpreter's file name (its last `/`-separated part):
    ///
    /// | interpreter | argv |
    /// |---|---|
    /// | `awk`, `gawk`, `mawk`, `nawk` | `[interpreter, source]` (the program is the first operand) |
    /// | `perl`, `ruby`, `node`, `nodejs` | `[interpreter, "-e", source]` (`-c` would only check the syntax) |
    /// | anything else: `sh`, `bash`, `ash`, `dash`, `python3`, … | `[interpreter, "-c", source]` |
    pub fn to_argv(&self) -> Vec<String> {
        match self {
            Command::Argv(argv) => argv.clone(),
            Command::Script {
                interpreter,
                source,
            } => match script_flag(interpreter) {
                Some(flag) => vec![interpreter.clone(), flag.to_string(), source.clone()],
                None => vec![interpreter.clone(), source.clone()],
            },
        }
    }
}

/// The flag that introduces inline program text for `interpreter`, or `None`
/// when the program text is the first operand (awk). See [`Command::to_argv`].
pub fn script_flag(interpreter: &str) -> Option<&'static str> {
    let name = interpreter.rsplit('/').next().unwrap_or(interpreter);
    match name {
        "awk" | "gawk" | "mawk" | "nawk" => None,
        "perl" | "ruby" | "node" | "nodejs" => Some("-e"),
        _ => Some("-c"),
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Caps a controller config sets on what one request may ask for. The
/// defaults are what a controller without a config accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Subtasks one job may be cut into.
    pub max_subtasks: u64,
    /// Entries in an `items` list.
    pub max_items: u64,
    /// Bytes of a `lines` input, and of an `items` list as fed to stdin
    /// (each item plus its newline).
    pub max_input_bytes: u64,
    /// Elements of a command's argv (a script counts as its interpreter argv).
    pub max_argv_elements: u64,
    /// Bytes of a command's argv after `{start}`/`{end}` are filled, summed
    /// over its elements; a script's source counts in full. Linux refuses a
    /// single argument over 128 KiB (`MAX_ARG_STRLEN`), hence the default.
    pub max_argv_bytes: u64,
    /// Bytes of the job's `name`.
    pub max_name_bytes: u64,
    /// Largest `max_attempts`.
    pub max_attempts: u32,
    /// Largest `resources.vcpus`.
    pub max_vcpus: u32,
    /// Largest `resources.memory_mib`.
    pub max_memory_mib: u64,
    /// Largest `resources.timeout_secs`.
    pub max_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_subtasks: 1_000_000,
            max_items: 1_000_000,
            max_input_bytes: 64 * 1024 * 1024,
            max_argv_elements: 4096,
            max_argv_bytes: 128 * 1024,
            max_name_bytes: 256,
            max_attempts: 100,
            max_vcpus: 64,
            max_memory_mib: 256 * 1024,
            max_timeout_secs: 7 * 24 * 3600,
        }
    }
}

impl Limits {
    /// No caps at all: only the checks without which a request cannot be
    /// split or run (empty argv, `chunk == 0`, `end <= start`, …) remain.
    pub fn unbounded() -> Self {
        Limits {
            max_subtasks: u64::MAX,
            max_items: u64::MAX,
            max_input_bytes: u64::MAX,
            max_argv_elements: u64::MAX,
            max_argv_bytes: u64::MAX,
            max_name_bytes: u64::MAX,
            max_attempts: u32::MAX,
            max_vcpus: u32::MAX,
            max_memory_mib: u64::MAX,
            max_timeout_secs: u64::MAX,
        }
    }
}

/// The stable, machine-readable kind of a [`ValidationError`]: the `code` of
/// the API's error body. All of them are client errors (HTTP 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON at all (syntax error, truncated, empty).
    MalformedJson,
    /// A field the request format does not have.
    UnknownField,
    /// A required field is absent.
    MissingField,
    /// A field holds the wrong kind of JSON value (a string for a number, …).
    InvalidType,
    /// A field has the right type but a value the controller refuses.
    InvalidField,
    /// A field is over one of the controller's [`Limits`].
    TooLarge,
}

impl ErrorCode {
    /// The code as it appears in the API (`"invalid_field"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused: a stable `code`, the `field` it is about as a
/// dotted JSON path (`"body"` when it is about the body as a whole) and a
/// message for people. Serialises as the API's error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub code: ErrorCode,
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            code,
            field: field.into(),
            message: message.into(),
        }
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidField, field, message)
    }

    fn too_large(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, field, message)
    }
}

/// Subtasks a `range` split makes: `ceil((end - start) / chunk)`, computed in
/// 128 bits so no `i64` bounds overflow; 0 when `end <= start` or `chunk == 0`.
pub fn range_subtask_count(start: i64, end: i64, chunk: u64) -> u64 {
    if end <= start || chunk == 0 {
        return 0;
    }
    let len = (end as i128 - start as i128) as u128; // ≤ 2^64 - 1
    len.div_ceil(chunk as u128) as u64
}

/// Lines in `input`: newline-terminated lines plus a final line without one.
pub fn line_count(input: &[u8]) -> u64 {
    let newlines = input.iter().filter(|&&b| b == b'\n').count() as u64;
    match input.last() {
        None => 0,
        Some(b'\n') => newlines,
        Some(_) => newlines + 1,
    }
}

/// The most bytes `{start}`/`{end}` can add to `s` once filled with `i64`s
/// (at most 20 characters each).
fn placeholder_growth(s: &str) -> u64 {
    let n = s.matches("{start}").count() + s.matches("{end}").count();
    n as u64 * 20
}

impl JobRequest {
    /// Checks every field against `limits`. The first problem found, in the
    /// order of the fields in the request, is returned.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        if self.name.len() as u64 > limits.max_name_bytes {
            return Err(ValidationError::too_large(
                "name",
                format!(
                    "the name is {} bytes; the limit is {}",
                    self.name.len(),
                    limits.max_name_bytes
                ),
            ));
        }
        let is_range = matches!(self.split, Split::Range { .. });
        validate_command(&self.command, "command", limits, is_range)?;
        validate_split(&self.split, limits)?;
        validate_resources(&self.resources, limits)?;
        if self.max_attempts == 0 {
            return Err(ValidationError::invalid(
                "max_attempts",
                "must be at least 1 (the first run is an attempt)",
            ));
        }
        if self.max_attempts > limits.max_attempts {
            return Err(ValidationError::too_large(
                "max_attempts",
                format!(
                    "{} attempts asked; the limit is {}",
                    self.max_attempts, limits.max_attempts
                ),
            ));
        }
        if let Some(reduce) = &self.reduce {
            validate_command(reduce, "reduce", limits, false)?;
        }
        Ok(())
    }
}

fn validate_command(
    cmd: &Command,
    prefix: &str,
    limits: &Limits,
    placeholders: bool,
) -> Result<(), ValidationError> {
    match cmd {
        Command::Argv(argv) => {
            let field = format!("{prefix}.argv");
            let Some(program) = argv.first() else {
                return Err(ValidationError::invalid(
                    field,
                    "the argv is empty; it must name at least the program to run",
                ));
            };
            if program.trim().is_empty() {
                return Err(ValidationError::invalid(
                    format!("{field}[0]"),
                    "the program name (argv[0]) is empty",
                ));
            }
            if argv.len() as u64 > limits.max_argv_elements {
                return Err(ValidationError::too_large(
                    field,
                    format!(
                        "the argv has {} elements; the limit is {}",
                        argv.len(),
                        limits.max_argv_elements
                    ),
                ));
            }
            let mut bytes: u64 = 0;
            for (i, arg) in argv.iter().enumerate() {
                if arg.contains('\0') {
                    return Err(ValidationError::invalid(
                        format!("{field}[{i}]"),
                        "contains a NUL byte, which no program argument can carry",
                    ));
                }
                bytes = bytes.saturating_add(arg.len() as u64);
                if placeholders {
                    bytes = bytes.saturating_add(placeholder_growth(arg));
                }
            }
            if bytes > limits.max_argv_bytes {
                return Err(ValidationError::too_large(
                    field,
                    format!(
                        "the argv takes up to {bytes} bytes once placeholders are filled; the limit is {}",
                        limits.max_argv_bytes
                    ),
                ));
            }
        }
        Command::Script {
            interpreter,
            source,
        } => {
            let ifield = format!("{prefix}.script.interpreter");
            let sfield = format!("{prefix}.script.source");
            if interpreter.trim().is_empty() {
                return Err(ValidationError::invalid(
                    ifield,
                    "the interpreter is empty; name one the guest image carries (sh, awk, …)",
                ));
            }
            if interpreter.chars().any(|c| c.is_whitespace() || c == '\0') {
                return Err(ValidationError::invalid(
                    ifield,
                    format!(
                        "{interpreter:?} is not a single program name or path; \
                         use `argv` to pass arguments to an interpreter"
                    ),
                ));
            }
            if source.trim().is_empty() {
                return Err(ValidationError::invalid(
                    sfield,
                    "the script is empty or only whitespace",
                ));
            }
            if source.contains('\0') {
                return Err(ValidationError::invalid(
                    sfield,
                    "contains a NUL byte, which a script passed as an argument cannot carry",
                ));
            }
            let mut bytes = (interpreter.len() + source.len() + 2) as u64;
            if placeholders {
                bytes = bytes
                    .saturating_add(placeholder_growth(interpreter))
                    .saturating_add(placeholder_growth(source));
            }
            if bytes > limits.max_argv_bytes {
                return Err(ValidationError::too_large(
                    sfield,
                    format!(
                        "the script takes up to {bytes} bytes as an argument; the limit is {}",
                        limits.max_argv_bytes
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_split(split: &Split, limits: &Limits) -> Result<(), ValidationError> {
    match split {
        Split::Range { start, end, chunk } => {
            if end <= start {
                return Err(ValidationError::invalid(
                    "split.range.end",
                    format!(
                        "end ({end}) must be greater than start ({start}); the range is [start, end), end exclusive"
                    ),
                ));
            }
            if *chunk == 0 {
                return Err(ValidationError::invalid(
                    "split.range.chunk",
                    "must be at least 1",
                ));
            }
            let count = range_subtask_count(*start, *end, *chunk);
            if count > limits.max_subtasks {
                let len = (*end as i128 - *start as i128) as u128;
                let least = len.div_ceil(limits.max_subtasks.max(1) as u128);
                return Err(ValidationError::too_large(
                    "split.range.chunk",
                    format!(
                        "[{start}, {end}) in chunks of {chunk} makes {count} subtasks; \
                         the limit is {}, so use a chunk of at least {least}",
                        limits.max_subtasks
                    ),
                ));
            }
        }
        Split::Items { items, batch } => {
            if items.is_empty() {
                return Err(ValidationError::invalid(
                    "split.items.items",
                    "the list is empty; there is nothing to run",
                ));
            }
            if *batch == 0 {
                return Err(ValidationError::invalid(
                    "split.items.batch",
                    "must be at least 1",
                ));
            }
            if items.len() as u64 > limits.max_items {
                return Err(ValidationError::too_large(
                    "split.items.items",
                    format!("{} items; the limit is {}", items.len(), limits.max_items),
                ));
            }
            let mut bytes: u64 = 0;
            for (i, item) in items.iter().enumerate() {
                if let Some(c) = item.chars().find(|&c| c == '\n' || c == '\r') {
                    let what = if c == '\n' {
                        "a newline"
                    } else {
                        "a carriage return"
                    };
                    return Err(ValidationError::invalid(
                        format!("split.items.items[{i}]"),
                        format!(
                            "contains {what}; items are fed one per line on stdin, \
                             so an item cannot span lines (use `lines` for multi-line input)"
                        ),
                    ));
                }
                bytes = bytes.saturating_add(item.len() as u64 + 1);
            }
            if bytes > limits.max_input_bytes {
                return Err(ValidationError::too_large(
                    "split.items.items",
                    format!(
                        "the items take {bytes} bytes on stdin; the limit is {}",
                        limits.max_input_bytes
                    ),
                ));
            }
            let count = (items.len() as u64).div_ceil(*batch);
            if count > limits.max_subtasks {
                return Err(ValidationError::too_large(
                    "split.items.batch",
                    format!(
                        "{} items in batches of {batch} makes {count} subtasks; the limit is {}, \
                         so use a batch of at least {}",
                        items.len(),
                        limits.max_subtasks,
                        (items.len() as u64).div_ceil(limits.max_subtasks.max(1))
                    ),
                ));
            }
        }
        Split::Lines { input, block } => {
            if input.is_empty() {
                return Err(ValidationError::invalid(
                    "split.lines.input",
                    "the input is empty; there is nothing to run",
                ));
            }
            if *block == 0 {
                return Err(ValidationError::invalid(
                    "split.lines.block",
                    "must be at least 1",
                ));
            }
            if input.len() as u64 > limits.max_input_bytes {
                return Err(ValidationError::too_large(
                    "split.lines.input",
                    format!(
                        "the input is {} bytes; the limit is {}",
                        input.len(),
                        limits.max_input_bytes
                    ),
                ));
            }
            let lines = line_count(input.as_bytes());
            let count = lines.div_ceil(*block);
            if count > limits.max_subtasks {
                return Err(ValidationError::too_large(
                    "split.lines.block",
                    format!(
                        "{lines} lines in blocks of {block} makes {count} subtasks; the limit is {}, \
                         so use a block of at least {}",
                        limits.max_subtasks,
                        lines.div_ceil(limits.max_subtasks.max(1))
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_resources(r: &Resources, limits: &Limits) -> Result<(), ValidationError> {
    if r.vcpus == 0 {
        return Err(ValidationError::invalid(
            "resources.vcpus",
            "must be at least 1",
        ));
    }
    if r.vcpus > limits.max_vcpus {
        return Err(ValidationError::too_large(
            "resources.vcpus",
            format!("{} vCPUs asked; the limit is {}", r.vcpus, limits.max_vcpus),
        ));
    }
    if r.memory_mib == 0 {
        return Err(ValidationError::invalid(
            "resources.memory_mib",
            "must be at least 1 MiB",
        ));
    }
    if r.memory_mib > limits.max_memory_mib {
        return Err(ValidationError::too_large(
            "resources.memory_mib",
            format!(
                "{} MiB asked; the limit is {} MiB",
                r.memory_mib, limits.max_memory_mib
            ),
        ));
    }
    if r.timeout_secs == 0 {
        return Err(ValidationError::invalid(
            "resources.timeout_secs",
            "must be at least 1 second",
        ));
    }
    if r.timeout_secs > limits.max_timeout_secs {
        return Err(ValidationError::too_large(
            "resources.timeout_secs",
            format!(
                "{} s asked; the limit is {} s",
                r.timeout_secs, limits.max_timeout_secs
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Reads a request body. Syntax errors come back as
/// [`ErrorCode::MalformedJson`] on field `"body"` with serde_json's line and
/// column; everything after that names the field by its path. Does not check
/// [`Limits`]: call [`JobRequest::validate`] next.
///
/// A key given twice in one object is refused (as the serde derive does)
/// rather than silently keeping the last value.
pub fn parse_json(bytes: &[u8]) -> Result<JobRequest, ValidationError> {
    let StrictValue(value) = serde_json::from_slice(bytes).map_err(|e| malformed(bytes, &e))?;
    parse_value(&value)
}

/// A JSON value read with duplicate object keys refused (serde_json's
/// `Value` keeps the last one).
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "the key `{key}` appears twice in one object"
                )));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

fn malformed(bytes: &[u8], e: &serde_json::Error) -> ValidationError {
    use serde_json::error::Category;
    let message = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        "the body is empty; expected a JSON object".to_string()
    } else {
        match e.classify() {
            Category::Eof => format!("the JSON ends early: {e}"),
            Category::Syntax => format!("not valid JSON: {e}"),
            Category::Data | Category::Io => format!("cannot read the JSON: {e}"),
        }
    };
    ValidationError::new(ErrorCode::MalformedJson, "body", message)
}

/// Reads a request from a JSON value (for callers that have one already,
/// such as a TOML job file converted to JSON). See [`parse_json`].
pub fn parse_value(value: &Value) -> Result<JobRequest, ValidationError> {
    let top = object(value, "")?;
    check_keys(
        top,
        "",
        &[
            "name",
            "command",
            "split",
            "resources",
            "max_attempts",
            "priority",
            "mode",
            "reduce",
            "network",
        ],
    )?;
    let name = match top.get("name") {
        Some(v) => string(v, "name")?,
        None => String::new(),
    };
    let command = parse_command(required(top, "command", "")?, "command")?;
    let split = parse_split(required(top, "split", "")?, "split")?;
    let resources = match top.get("resources") {
        Some(v) => parse_resources(v, "resources")?,
        None => Resources::default(),
    };
    let max_attempts = match top.get("max_attempts") {
        Some(v) => unsigned(v, "max_attempts", u32::MAX as u64)? as u32,
        None => default_max_attempts(),
    };
    let priority = match top.get("priority") {
        Some(v) => signed(v, "priority", i32::MIN as i64, i32::MAX as i64)? as i32,
        None => 0,
    };
    let mode = match top.get("mode") {
        Some(v) => match string(v, "mode")?.as_str() {
            "push" => DispatchMode::Push,
            "pull" => DispatchMode::Pull,
            "p2p" => DispatchMode::P2p,
            other => {
                return Err(ValidationError::invalid(
                    "mode",
                    format!(
                    "unknown dispatch mode {other:?}; expected one of \"push\", \"pull\", \"p2p\""
                ),
                ))
            }
        },
        None => DispatchMode::default(),
    };
    let reduce = match top.get("reduce") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_command(v, "reduce")?),
    };
    let network = match top.get("network") {
        Some(v) => match string(v, "network")?.as_str() {
            "none" => Network::None,
            "overlay" => Network::Overlay,
            other => {
                return Err(ValidationError::invalid(
                    "network",
                    format!("unknown network {other:?}; expected \"none\" or \"overlay\""),
                ))
            }
        },
        None => Network::default(),
    };
    Ok(JobRequest {
        name,
        command,
        split,
        resources,
        max_attempts,
        priority,
        mode,
        reduce,
        network,
    })
}

fn parse_command(v: &Value, path: &str) -> Result<Command, ValidationError> {
    let (variant, inner) = one_of(v, path, &["argv", "script"])?;
    let ipath = join(path, variant);
    match variant {
        "argv" => {
            let Value::Array(elems) = inner else {
                return Err(wrong_type(&ipath, "an array of strings", inner));
            };
            let argv = elems
                .iter()
                .enumerate()
                .map(|(i, e)| string(e, &format!("{ipath}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Command::Argv(argv))
        }
        _ => {
            let obj = object(inner, &ipath)?;
            check_keys(obj, &ipath, &["interpreter", "source"])?;
            let interpreter = string(
                required(obj, "interpreter", &ipath)?,
                &join(&ipath, "interpreter"),
            )?;
            let source = string(required(obj, "source", &ipath)?, &join(&ipath, "source"))?;
            Ok(Command::Script {
                interpreter,
                source,
            })
        }
    }
}

fn parse_split(v: &Value, path: &str) -> Result<Split, ValidationError> {
    let (variant, inner) = one_of(v, path, &["range", "items", "lines"])?;
    let p = join(path, variant);
    let obj = object(inner, &p)?;
    match variant {
        "range" => {
            check_keys(obj, &p, &["start", "end", "chunk"])?;
            let f = |k: &str| join(&p, k);
            let start = signed(required(obj, "start", &p)?, &f("start"), i64::MIN, i64::MAX)?;
            let end = signed(required(obj, "end", &p)?, &f("end"), i64::MIN, i64::MAX)?;
            let chunk = unsigned(required(obj, "chunk", &p)?, &f("chunk"), u64::MAX)?;
            Ok(Split::Range { start, end, chunk })
        }
        "items" => {
            check_keys(obj, &p, &["items", "batch"])?;
            let ipath = join(&p, "items");
            let list = required(obj, "items", &p)?;
            let Value::Array(elems) = list else {
                return Err(wrong_type(&ipath, "an array of strings", list));
            };
            let items = elems
                .iter()
                .enumerate()
                .map(|(i, e)| string(e, &format!("{ipath}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let batch = unsigned(required(obj, "batch", &p)?, &join(&p, "batch"), u64::MAX)?;
            Ok(Split::Items { items, batch })
        }
        _ => {
            check_keys(obj, &p, &["input", "block"])?;
            let input = string(required(obj, "input", &p)?, &join(&p, "input"))?;
            let block = unsigned(required(obj, "block", &p)?, &join(&p, "block"), u64::MAX)?;
            Ok(Split::Lines { input, block })
        }
    }
}

fn parse_resources(v: &Value, path: &str) -> Result<Resources, ValidationError> {
    let obj = object(v, path)?;
    check_keys(obj, path, &["vcpus", "memory_mib", "timeout_secs"])?;
    let mut r = Resources::default();
    if let Some(v) = obj.get("vcpus") {
        r.vcpus = unsigned(v, &join(path, "vcpus"), u32::MAX as u64)? as u32;
    }
    if let Some(v) = obj.get("memory_mib") {
        r.memory_mib = unsigned(v, &join(path, "memory_mib"), u64::MAX)?;
    }
    if let Some(v) = obj.get("timeout_secs") {
        r.timeout_secs = unsigned(v, &join(path, "timeout_secs"), u64::MAX)?;
    }
    Ok(r)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// `path` for messages: the top level is the body.
fn shown(path: &str) -> &str {
    if path.is_empty() {
        "body"
    } else {
        path
    }
}

/// How a JSON value is described in messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn wrong_type(path: &str, expected: &str, got: &Value) -> ValidationError {
    ValidationError::new(
        ErrorCode::InvalidType,
        shown(path),
        format!("expected {expected}, got {}", describe(got)),
    )
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong_type(path, "an object", other)),
    }
}

fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_keys(
    obj: &Map<String, Value>,
    path: &str,
    allowed: &[&str],
) -> Result<(), ValidationError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ValidationError::new(
            ErrorCode::UnknownField,
            join(path, k),
            format!(
                "unknown field `{k}` in {}; expected one of {}",
                shown(path),
                list(allowed)
            ),
        )),
        None => Ok(()),
    }
}

fn required<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, ValidationError> {
    obj.get(key).ok_or_else(|| {
        ValidationError::new(
            ErrorCode::MissingField,
            join(path, key),
            format!("missing field `{key}` in {}", shown(path)),
        )
    })
}

/// An object with exactly one key, one of `variants` (serde's externally
/// tagged enum form): `{"range": {...}}`.
fn one_of<'a>(
    v: &'a Value,
    path: &str,
    variants: &[&str],
) -> Result<(&'a str, &'a Value), ValidationError> {
    let obj = match v {
        Value::Object(m) => m,
        other => {
            return Err(wrong_type(
                path,
                &format!("an object with one of {}", list(variants)),
                other,
            ))
        }
    };
    check_keys(obj, path, variants)?;
    let mut keys = obj.iter();
    match (keys.next(), keys.next()) {
        (Some((k, inner)), None) => Ok((k.as_str(), inner)),
        (None, _) => Err(ValidationError::new(
            ErrorCode::MissingField,
            shown(path),
            format!("{} is empty; give one of {}", shown(path), list(variants)),
        )),
        (Some((a, _)), Some((b, _))) => Err(ValidationError::invalid(
            shown(path),
            format!(
                "give only one of {}, not both `{a}` and `{b}`",
                list(variants)
            ),
        )),
    }
}

fn string(v: &Value, path: &str) -> Result<String, ValidationError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(wrong_type(path, "a string", other)),
    }
}

fn unsigned(v: &Value, path: &str, max: u64) -> Result<u64, ValidationError> {
    let Value::Number(n) = v else {
        return Err(wrong_type(path, "a whole number", v));
    };
    if let Some(x) = n.as_u64() {
        if x <= max {
            return Ok(x);
        }
    } else if n.as_i64().is_some() {
        return Err(ValidationError::invalid(
            path,
            format!("must not be negative, got {n}"),
        ));
    } else if n.as_f64().is_some_and(|f| f.fract() != 0.0) {
        return Err(wrong_type(path, "a whole number", v));
    }
    Err(ValidationError::invalid(
        path,
        format!("{n} is out of range; the largest accepted value is {max}"),
    ))
}

fn signed(v: &Value, path: &str, min: i64, max: i64) -> Result<i64, ValidationError> {
    let Value::Number(n) = v else {
        return Err(wrong_type(path, "a whole number", v));
    };
    if let Some(x) = n.as_i64() {
        if (min..=max).contains(&x) {
            return Ok(x);
        }
    } else if n.as_f64().is_some_and(|f| f.fract() != 0.0) {
        return Err(wrong_type(path, "a whole number", v));
    }
    Err(ValidationError::invalid(
        path,
        format!("{n} is out of range; accepted values are {min}..={max}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range_req() -> JobRequest {
        JobRequest {
            name: "sweep".into(),
            command: Command::Argv(vec![
                "sim".into(),
                "--from={start}".into(),
                "--to={end}".into(),
            ]),
            split: Split::Range {
                start: 0,
                end: 100,
                chunk: 10,
            },
            resources: Resources::default(),
            max_attempts: 3,
            priority: 0,
            mode: DispatchMode::Push,
            reduce: None,
            network: Network::None,
        }
    }

    fn check(req: &JobRequest, code: ErrorCode, field: &str) -> ValidationError {
        check_with(req, &Limits::default(), code, field)
    }

    fn check_with(
        req: &JobRequest,
        limits: &Limits,
        code: ErrorCode,
        field: &str,
    ) -> ValidationError {
        let e = req.validate(limits).expect_err("request should be refused");
        assert_eq!((e.code, e.field.as_str()), (code, field), "{e}");
        assert!(!e.message.is_empty());
        e
    }

    fn script(interpreter: &str, source: &str) -> Command {
        Command::Script {
            interpreter: interpreter.into(),
            source: source.into(),
        }
    }

    #[test]
    fn valid_requests_pass() {
        range_req().validate(&Limits::default()).unwrap();
        let mut r = range_req();
        r.command = script("sh", "echo {start}");
        r.reduce = Some(script("awk", "{ s += $1 } END { print s }"));
        r.validate(&Limits::default()).unwrap();
        r.split = Split::Items {
            items: vec!["a".into(), "".into()],
            batch: 5,
        };
        r.validate(&Limits::default()).unwrap();
        r.split = Split::Lines {
            input: "x".into(),
            block: 1,
        };
        r.validate(&Limits::default()).unwrap();
        // Extremes of i64 in one chunk.
        r.split = Split::Range {
            start: i64::MIN,
            end: i64::MAX,
            chunk: u64::MAX,
        };
        r.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn command_errors_name_the_field() {
        let mut r = range_req();
        r.command = Command::Argv(vec![]);
        check(&r, ErrorCode::InvalidField, "command.argv");
        r.command = Command::Argv(vec!["".into(), "x".into()]);
        check(&r, ErrorCode::InvalidField, "command.argv[0]");
        r.command = Command::Argv(vec!["ok".into(), "a\0b".into()]);
        check(&r, ErrorCode::InvalidField, "command.argv[1]");
        r.command = Command::Argv(vec!["x".to_string(); 5000]);
        check(&r, ErrorCode::TooLarge, "command.argv");
        r.command = Command::Argv(vec!["x".into(), "y".repeat(200 * 1024)]);
        check(&r, ErrorCode::TooLarge, "command.argv");
        r.command = script("", "echo");
        check(&r, ErrorCode::InvalidField, "command.script.interpreter");
        r.command = script("busybox sh", "echo");
        check(&r, ErrorCode::InvalidField, "command.script.interpreter");
        r.command = script("sh", "");
        check(&r, ErrorCode::InvalidField, "command.script.source");
        r.command = script("sh", "  \n ");
        check(&r, ErrorCode::InvalidField, "command.script.source");
        r.command = script("sh", &"#".repeat(200 * 1024));
        check(&r, ErrorCode::TooLarge, "command.script.source");
    }

    #[test]
    fn placeholders_count_towards_argv_bytes_for_ranges_only() {
        let limits = Limits {
            max_argv_bytes: 100,
            ..Limits::default()
        };
        let mut r = range_req();
        // 7 placeholders of 7 bytes = 49 bytes, but up to 7 * 27 once filled.
        r.command = Command::Argv(vec!["p".into(), "{start}".repeat(7)]);
        check_with(&r, &limits, ErrorCode::TooLarge, "command.argv");
        r.split = Split::Items {
            items: vec!["a".into()],
            batch: 1,
        };
        r.validate(&limits).unwrap();
    }

    #[test]
    fn reduce_gets_the_same_checks() {
        let mut r = range_req();
        r.reduce = Some(Command::Argv(vec![]));
        check(&r, ErrorCode::InvalidField, "reduce.argv");
        r.reduce = Some(Command::Argv(vec![" ".into()]));
        check(&r, ErrorCode::InvalidField, "reduce.argv[0]");
        r.reduce = Some(script("sh", ""));
        check(&r, ErrorCode::InvalidField, "reduce.script.source");
        r.reduce = Some(script("", "cat"));
        check(&r, ErrorCode::InvalidField, "reduce.script.interpreter");
    }

    #[test]
    fn range_errors() {
        let mut r = range_req();
        for (start, end) in [(5, 5), (5, 4), (i64::MAX, i64::MIN)] {
            r.split = Split::Range {
                start,
                end,
                chunk: 1,
            };
            check(&r, ErrorCode::InvalidField, "split.range.end");
        }
        r.split = Split::Range {
            start: 0,
            end: 10,
            chunk: 0,
        };
        check(&r, ErrorCode::InvalidField, "split.range.chunk");
        r.split = Split::Range {
            start: 0,
            end: 1_000_001,
            chunk: 1,
        };
        let e = check(&r, ErrorCode::TooLarge, "split.range.chunk");
        assert!(e.message.contains("at least 2"), "{e}");
        // The whole i64 line in chunks of 1 would overflow 64-bit math.
        r.split = Split::Range {
            start: i64::MIN,
            end: i64::MAX,
            chunk: 1,
        };
        check(&r, ErrorCode::TooLarge, "split.range.chunk");
        r.split = Split::Range {
            start: 0,
            end: 1_000_000,
            chunk: 1,
        };
        r.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn items_errors() {
        let mut r = range_req();
        r.split = Split::Items {
            items: vec![],
            batch: 1,
        };
        check(&r, ErrorCode::InvalidField, "split.items.items");
        r.split = Split::Items {
            items: vec!["a".into()],
            batch: 0,
        };
        check(&r, ErrorCode::InvalidField, "split.items.batch");
        r.split = Split::Items {
            items: vec!["a".into(), "b\nc".into()],
            batch: 1,
        };
        check(&r, ErrorCode::InvalidField, "split.items.items[1]");
        let small = Limits {
            max_items: 2,
            max_subtasks: 2,
            max_input_bytes: 8,
            ..Limits::default()
        };
        r.split = Split::Items {
            items: vec!["a".into(); 3],
            batch: 3,
        };
        check_with(&r, &small, ErrorCode::TooLarge, "split.items.items");
        r.split = Split::Items {
            items: vec!["a".into(); 2],
            batch: 1,
        };
        r.validate(&small).unwrap();
        r.split = Split::Items {
            items: vec!["abcdefgh".into()],
            batch: 1,
        };
        check_with(&r, &small, ErrorCode::TooLarge, "split.items.items");
        let few = Limits {
            max_subtasks: 2,
            ..Limits::default()
        };
        r.split = Split::Items {
            items: vec!["a".into(); 5],
            batch: 2,
        };
        let e = check_with(&r, &few, ErrorCode::TooLarge, "split.items.batch");
        assert!(e.message.contains("at least 3"), "{e}");
    }

    #[test]
    fn lines_errors() {
        let mut r = range_req();
        r.split = Split::Lines {
            input: String::new(),
            block: 1,
        };
        check(&r, ErrorCode::InvalidField, "split.lines.input");
        r.split = Split::Lines {
            input: "a\n".into(),
            block: 0,
        };
        check(&r, ErrorCode::InvalidField, "split.lines.block");
        let small = Limits {
            max_input_bytes: 5,
            max_subtasks: 2,
            ..Limits::default()
        };
        r.split = Split::Lines {
            input: "abcdef".into(),
            block: 1,
        };
        check_with(&r, &small, ErrorCode::TooLarge, "split.lines.input");
        r.split = Split::Lines {
            input: "a\nb\nc".into(),
            block: 1,
        };
        check_with(&r, &small, ErrorCode::TooLarge, "split.lines.block");
        r.split = Split::Lines {
            input: "a\nb\nc".into(),
            block: 2,
        };
        r.validate(&small).unwrap();
    }

    #[test]
    fn resource_and_attempt_errors() {
        let mut r = range_req();
        r.resources.vcpus = 0;
        check(&r, ErrorCode::InvalidField, "resources.vcpus");
        r.resources.vcpus = 65;
        check(&r, ErrorCode::TooLarge, "resources.vcpus");
        r = range_req();
        r.resources.memory_mib = 0;
        check(&r, ErrorCode::InvalidField, "resources.memory_mib");
        r.resources.memory_mib = u64::MAX;
        check(&r, ErrorCode::TooLarge, "resources.memory_mib");
        r = range_req();
        r.resources.timeout_secs = 0;
        check(&r, ErrorCode::InvalidField, "resources.timeout_secs");
        r.resources.timeout_secs = 365 * 24 * 3600;
        check(&r, ErrorCode::TooLarge, "resources.timeout_secs");
        r = range_req();
        r.max_attempts = 0;
        check(&r, ErrorCode::InvalidField, "max_attempts");
        r.max_attempts = 101;
        check(&r, ErrorCode::TooLarge, "max_attempts");
        r = range_req();
        r.name = "n".repeat(1000);
        check(&r, ErrorCode::TooLarge, "name");
    }

    #[test]
    fn error_serialises_as_the_api_body() {
        let e = ValidationError::new(ErrorCode::TooLarge, "split.range.chunk", "too many");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "too_large", "field": "split.range.chunk", "message": "too many"})
        );
        assert_eq!(e.to_string(), "split.range.chunk: too many");
        assert_eq!(ErrorCode::MalformedJson.as_str(), "malformed_json");
    }

    #[test]
    fn script_argv_rule() {
        let argv = |i: &str| script(i, "S").to_argv();
        assert_eq!(argv("sh"), ["sh", "-c", "S"]);
        assert_eq!(argv("/bin/bash"), ["/bin/bash", "-c", "S"]);
        assert_eq!(argv("dash"), ["dash", "-c", "S"]);
        assert_eq!(argv("ash"), ["ash", "-c", "S"]);
        assert_eq!(argv("awk"), ["awk", "S"]);
        assert_eq!(argv("/usr/bin/gawk"), ["/usr/bin/gawk", "S"]);
        assert_eq!(argv("perl"), ["perl", "-e", "S"]);
        assert_eq!(argv("python3"), ["python3", "-c", "S"]);
        let a = Command::Argv(vec!["x".into(), "y".into()]);
        assert_eq!(a.to_argv(), ["x", "y"]);
    }

    // --- parsing ---------------------------------------------------------

    fn parse_err(body: &str, code: ErrorCode, field: &str) -> ValidationError {
        let e = parse_json(body.as_bytes()).expect_err("body should be refused");
        assert_eq!((e.code, e.field.as_str()), (code, field), "{e}");
        e
    }

    const MINIMAL: &str = r#"{"command": {"argv": ["echo", "{start}"]}, "split": {"range": {"start": 0, "end": 10, "chunk": 3}}}"#;

    #[test]
    fn parses_like_the_serde_derive() {
        let bodies = [
            MINIMAL,
            r#"{"name": "n", "command": {"script": {"interpreter": "sh", "source": "cat"}},
                "split": {"items": {"items": ["a", "b"], "batch": 1}},
                "resources": {"vcpus": 2}, "max_attempts": 5, "priority": -3, "mode": "pull",
                "reduce": {"argv": ["sort"]}}"#,
            r#"{"command": {"argv": ["wc"]}, "split": {"lines": {"input": "a\r\nb\n", "block": 2}},
                "resources": {"vcpus": 1, "memory_mib": 512, "timeout_secs": 5}, "reduce": null, "mode": "p2p",
                "network": "overlay"}"#,
        ];
        for body in bodies {
            let ours = parse_json(body.as_bytes()).unwrap();
            let derived: JobRequest = serde_json::from_str(body).unwrap();
            assert_eq!(ours, derived, "{body}");
            // And a serialised request reads back the same.
            let text = serde_json::to_vec(&ours).unwrap();
            assert_eq!(parse_json(&text).unwrap(), ours);
        }
        let r = parse_json(MINIMAL.as_bytes()).unwrap();
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.resources, Resources::default());
        assert_eq!(r.mode, DispatchMode::Push);
        assert_eq!(r.network, Network::None);
    }

    #[test]
    fn malformed_json() {
        let e = parse_err(r#"{"command": "#, ErrorCode::MalformedJson, "body");
        assert!(e.message.contains("ends early"), "{e}");
        let e = parse_err(r#"{"command" 1}"#, ErrorCode::MalformedJson, "body");
        assert!(e.message.contains("line 1 column"), "{e}");
        let e = parse_err("", ErrorCode::MalformedJson, "body");
        assert!(e.message.contains("empty"), "{e}");
        let e = parse_err(
            r#"{"command": {"argv": ["x"]}, "command": {"argv": ["y"]}}"#,
            ErrorCode::MalformedJson,
            "body",
        );
        assert!(e.message.contains("`command` appears twice"), "{e}");
        assert!(e.message.contains("line 1 column"), "{e}");
        parse_err("[1, 2]", ErrorCode::InvalidType, "body");
        parse_err("null", ErrorCode::InvalidType, "body");
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let e = parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "colour": 1}"#,
            ErrorCode::UnknownField,
            "colour",
        );
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunks": 1}}}"#,
            ErrorCode::UnknownField,
            "split.range.chunks",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"rnage": {}}}"#,
            ErrorCode::UnknownField,
            "split.rnage",
        );
        parse_err(
            r#"{"command": {"script": {"interpreter": "sh", "source": "x", "args": []}}, "split": {"items": {"items": ["a"], "batch": 1}}}"#,
            ErrorCode::UnknownField,
            "command.script.args",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"items": {"items": ["a"], "batch": 1}}, "resources": {"gpus": 1}}"#,
            ErrorCode::UnknownField,
            "resources.gpus",
        );
    }

    #[test]
    fn missing_fields_are_named_with_their_path() {
        let e = parse_err(
            r#"{"split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::MissingField,
            "command",
        );
        assert!(e.message.contains("missing field `command`"), "{e}");
        parse_err(
            r#"{"command": {"argv": ["x"]}}"#,
            ErrorCode::MissingField,
            "split",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1}}}"#,
            ErrorCode::MissingField,
            "split.range.chunk",
        );
        parse_err(
            r#"{"command": {}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::MissingField,
            "command",
        );
        parse_err(
            r#"{"command": {"argv": ["x"], "script": {}}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::InvalidField,
            "command",
        );
    }

    #[test]
    fn wrong_types_are_named_with_their_path() {
        let e = parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": "10", "chunk": 1}}}"#,
            ErrorCode::InvalidType,
            "split.range.end",
        );
        assert_eq!(e.message, r#"expected a whole number, got the string "10""#);
        let e = parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 10, "chunk": -1}}}"#,
            ErrorCode::InvalidField,
            "split.range.chunk",
        );
        assert!(e.message.contains("negative"), "{e}");
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 10, "chunk": 1.5}}}"#,
            ErrorCode::InvalidType,
            "split.range.chunk",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 99999999999999999999, "chunk": 1}}}"#,
            ErrorCode::InvalidField,
            "split.range.end",
        );
        parse_err(
            r#"{"command": {"argv": ["x", 3]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::InvalidType,
            "command.argv[1]",
        );
        parse_err(
            r#"{"command": {"argv": "x"}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::InvalidType,
            "command.argv",
        );
        parse_err(
            r#"{"command": ["x"], "split": {"range": {"start": 0, "end": 1, "chunk": 1}}}"#,
            ErrorCode::InvalidType,
            "command",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"items": {"items": ["a", null], "batch": 1}}}"#,
            ErrorCode::InvalidType,
            "split.items.items[1]",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "resources": {"vcpus": 4294967296}}"#,
            ErrorCode::InvalidField,
            "resources.vcpus",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "mode": "carrier-pigeon"}"#,
            ErrorCode::InvalidField,
            "mode",
        );
        let e = parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "network": "bridge"}"#,
            ErrorCode::InvalidField,
            "network",
        );
        assert!(e.message.contains("overlay"), "{e}");
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "network": 1}"#,
            ErrorCode::InvalidType,
            "network",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "max_attempts": true}"#,
            ErrorCode::InvalidType,
            "max_attempts",
        );
        parse_err(
            r#"{"command": {"argv": ["x"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}, "reduce": {"argv": [1]}}"#,
            ErrorCode::InvalidType,
            "reduce.argv[0]",
        );
    }

    fn command_strategy() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        prop_oneof![
            prop::collection::vec(".{0,8}", 0..4).prop_map(Command::Argv),
            (".{0,8}", ".{0,20}").prop_map(|(interpreter, source)| Command::Script {
                interpreter,
                source
            }),
        ]
    }

    fn request_strategy() -> impl proptest::strategy::Strategy<Value = JobRequest> {
        use proptest::prelude::*;
        let split = prop_oneof![
            (any::<i64>(), any::<i64>(), any::<u64>())
                .prop_map(|(start, end, chunk)| Split::Range { start, end, chunk }),
            (prop::collection::vec(".{0,6}", 0..4), any::<u64>())
                .prop_map(|(items, batch)| Split::Items { items, batch }),
            (".{0,30}", any::<u64>()).prop_map(|(input, block)| Split::Lines { input, block }),
        ];
        let resources =
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(v, m, t)| Resources {
                vcpus: v,
                memory_mib: m,
                timeout_secs: t,
            });
        let mode = prop_oneof![
            Just(DispatchMode::Push),
            Just(DispatchMode::Pull),
            Just(DispatchMode::P2p)
        ];
        (
            ".{0,10}",
            command_strategy(),
            split,
            resources,
            any::<u32>(),
            any::<i32>(),
            mode,
            proptest::option::of(command_strategy()),
            prop_oneof![Just(Network::None), Just(Network::Overlay)],
        )
            .prop_map(
                |(
                    name,
                    command,
                    split,
                    resources,
                    max_attempts,
                    priority,
                    mode,
                    reduce,
                    network,
                )| {
                    JobRequest {
                        name,
                        command,
                        split,
                        resources,
                        max_attempts,
                        priority,
                        mode,
                        reduce,
                        network,
                    }
                },
            )
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(128))]

        /// The hand-written reader and the serde derive agree on every
        /// request the derive can write.
        #[test]
        fn parse_json_reads_what_serde_writes(req in request_strategy()) {
            let body = serde_json::to_vec(&req).unwrap();
            proptest::prop_assert_eq!(parse_json(&body).unwrap(), req);
        }
    }
}
