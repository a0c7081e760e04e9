//! Reading a job file for `sparegrid submit`: `*.toml` is converted to a
//! JSON value, `*.json` is read as JSON, and either is checked locally with
//! [`job::parse_value`] and [`JobRequest::validate`] against
//! [`Limits::default`], so a bad field is named before any request is made.
//! [`load_body`] also accepts a `lines` input given by reference to an
//! upload (`input = { data = "ID" }`) and gives the body to send.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::CliError;
use crate::job::{self, JobRequest, Limits};

/// The format of a job file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// `.toml` or `.json` (any case); anything else is refused.
    pub fn of(path: &Path) -> Result<Format, CliError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("toml") => Ok(Format::Toml),
            Some("json") => Ok(Format::Json),
            _ => Err(CliError::JobFile {
                path: path.to_owned(),
                message: "a job file must end in .toml or .json".to_owned(),
            }),
        }
    }
}

/// Reads, parses and validates the job file at `path`.
pub fn load(path: &Path) -> Result<JobRequest, CliError> {
    let format = Format::of(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, format, &text)
}

/// Reads the job file at `path` like [`load`] and gives the body to send
/// too. A `lines` input given by reference (`input = { data = "ID" }`, see
/// [`crate::data::input`]) is checked for its form here, and the rest of
/// the request as if the input were inline; the controller reads the
/// upload. The returned request then holds an empty input.
pub fn load_body(path: &Path) -> Result<(JobRequest, Vec<u8>), CliError> {
    let format = Format::of(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_body(path, format, &text)
}

/// [`load_body`] on `text`.
pub fn parse_body(
    path: &Path,
    format: Format,
    text: &str,
) -> Result<(JobRequest, Vec<u8>), CliError> {
    match parse(path, format, text) {
        Ok(req) => {
            let body = encode(path, &req)?;
            Ok((req, body))
        }
        Err(CliError::Invalid { error, .. }) if error.field == "split.lines.input" => {
            let invalid = |error| CliError::Invalid {
                path: PathBuf::from(path),
                error,
            };
            let mut value = to_json(path, format, text)?;
            if crate::data::input::reference(&value)
                .map_err(invalid)?
                .is_none()
            {
                return Err(invalid(error));
            }
            let body = encode(path, &value)?;
            // Check the rest with a stand-in input.
            if let Some(slot) = value.pointer_mut("/split/lines/input") {
                *slot = Value::String("-\n".to_owned());
            }
            let mut req = job::parse_value(&value).map_err(invalid)?;
            req.validate(&Limits::default()).map_err(invalid)?;
            if let job::Split::Lines { input, .. } = &mut req.split {
                input.clear();
            }
            Ok((req, body))
        }
        Err(e) => Err(e),
    }
}

/// `value` as the JSON body.
fn encode<T: serde::Serialize>(path: &Path, value: &T) -> Result<Vec<u8>, CliError> {
    serde_json::to_vec(value).map_err(|e| CliError::JobFile {
        path: path.to_owned(),
        message: format!("cannot encode as JSON: {e}"),
    })
}

/// The job file's text as a JSON value.
fn to_json(path: &Path, format: Format, text: &str) -> Result<Value, CliError> {
    let file_err = |message: String| CliError::JobFile {
        path: PathBuf::from(path),
        message,
    };
    match format {
        Format::Toml => {
            let value: toml::Value = toml::from_str(text)
                .map_err(|e| file_err(format!("not valid TOML: {}", e.to_string().trim_end())))?;
            serde_json::to_value(value)
                .map_err(|e| file_err(format!("cannot convert TOML to JSON: {e}")))
        }
        Format::Json => {
            serde_json::from_str(text).map_err(|e| file_err(format!("not valid JSON: {e}")))
        }
    }
}

/// Parses and validates `text` as a job in `format`; `path` names it in
/// errors.
pub fn parse(path: &Path, format: Format, text: &str) -> Result<JobRequest, CliError> {
    let file_err = |message: String| CliError::JobFile {
        path: PathBuf::from(path),
        message,
    };
    let invalid = |error| CliError::Invalid {
        path: PathBuf::from(path),
        error,
    };
    let req = match format {
        Format::Toml => {
            let value: toml::Value = toml::from_str(text)
                .map_err(|e| file_err(format!("not valid TOML: {}", e.to_string().trim_end())))?;
            let json: Value = serde_json::to_value(value)
                .map_err(|e| file_err(format!("cannot convert TOML to JSON: {e}")))?;
            job::parse_value(&json).map_err(invalid)?
        }
        // `parse_json` also refuses duplicate keys, as the controller does.
        Format::Json => job::parse_json(text.as_bytes()).map_err(invalid)?,
    };
    req.validate(&Limits::default()).map_err(invalid)?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Command, ErrorCode, Split};

    const TOML_JOB: &str = r#"
name = "sweep"
command = { argv = ["echo", "{start}", "{end}"] }
max_attempts = 2

[split.range]
start = 0
end = 100
chunk = 10
"#;

    #[test]
    fn toml_jobs_read_like_json_jobs() {
        let t = parse(Path::new("j.toml"), Format::Toml, TOML_JOB).unwrap();
        assert_eq!(t.name, "sweep");
        assert_eq!(t.max_attempts, 2);
        assert_eq!(
            t.command,
            Command::Argv(vec!["echo".into(), "{start}".into(), "{end}".into()])
        );
        assert_eq!(
            t.split,
            Split::Range {
                start: 0,
                end: 100,
                chunk: 10
            }
        );
        let json = serde_json::to_string(&t).unwrap();
        let j = parse(Path::new("j.json"), Format::Json, &json).unwrap();
        assert_eq!(t, j);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let bad = TOML_JOB.replace("chunk = 10", "chunk = 0");
        match parse(Path::new("j.toml"), Format::Toml, &bad) {
            Err(CliError::Invalid { path, error }) => {
                assert_eq!(path, Path::new("j.toml"));
                assert_eq!(error.field, "split.range.chunk");
                assert_eq!(error.code, ErrorCode::InvalidField);
            }
            other => panic!("{other:?}"),
        }
        let bad = format!("{TOML_JOB}\ncolour = \"red\"\n");
        // A key after a table header belongs to the table.
        match parse(Path::new("j.toml"), Format::Toml, &bad) {
            Err(CliError::Invalid { error, .. }) => {
                assert_eq!(error.field, "split.range.colour");
                assert_eq!(error.code, ErrorCode::UnknownField);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(Path::new("j.toml"), Format::Toml, "name = "),
            Err(CliError::JobFile { .. })
        ));
        match parse(Path::new("j.json"), Format::Json, "{\"a\":1,\"a\":2}") {
            Err(CliError::Invalid { error, .. }) => assert_eq!(error.field, "body"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Format::of(Path::new("job.yaml")),
            Err(CliError::JobFile { .. })
        ));
        assert_eq!(Format::of(Path::new("JOB.JSON")).unwrap(), Format::Json);
    }

    #[test]
    fn network_is_read_and_an_unknown_one_is_named() {
        let t = parse(Path::new("j.toml"), Format::Toml, TOML_JOB).unwrap();
        assert_eq!(t.network, crate::job::Network::None);
        let overlay = format!("network = \"overlay\"\n{TOML_JOB}");
        let t = parse(Path::new("j.toml"), Format::Toml, &overlay).unwrap();
        assert_eq!(t.network, crate::job::Network::Overlay);
        let bad = format!("network = \"bridge\"\n{TOML_JOB}");
        match parse(Path::new("j.toml"), Format::Toml, &bad) {
            Err(CliError::Invalid { error, .. }) => {
                assert_eq!(error.field, "network");
                assert_eq!(error.code, ErrorCode::InvalidField);
            }
            other => panic!("{other:?}"),
        }
    }

    const DATA_JOB: &str = r#"
name = "by-ref"
command = { argv = ["wc", "-l"] }

[split.lines]
input = { data = "in-0123abcd" }
block = 10
"#;

    #[test]
    fn a_data_reference_is_sent_as_written_and_the_rest_checked() {
        let (req, body) = parse_body(Path::new("j.toml"), Format::Toml, DATA_JOB).unwrap();
        assert_eq!(req.name, "by-ref");
        let sent: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent["split"]["lines"]["input"]["data"], "in-0123abcd");
        assert_eq!(sent["split"]["lines"]["block"], 10);
        // Inline input is sent as the parsed request, as before.
        let (req, body) = parse_body(Path::new("j.toml"), Format::Toml, TOML_JOB).unwrap();
        assert_eq!(serde_json::from_slice::<JobRequest>(&body).unwrap(), req);
        // The rest of a job with a reference is still checked …
        let bad = DATA_JOB.replace("block = 10", "block = 0");
        match parse_body(Path::new("j.toml"), Format::Toml, &bad) {
            Err(CliError::Invalid { error, .. }) => assert_eq!(error.field, "split.lines.block"),
            other => panic!("{other:?}"),
        }
        // … and so is the reference's form.
        for (input, field) in [
            ("{ data = 7 }", "split.lines.input.data"),
            ("{ file = \"x\" }", "split.lines.input.file"),
            ("7", "split.lines.input"),
        ] {
            let bad = DATA_JOB.replace("{ data = \"in-0123abcd\" }", input);
            match parse_body(Path::new("j.toml"), Format::Toml, &bad) {
                Err(CliError::Invalid { error, .. }) => assert_eq!(error.field, field, "{input}"),
                other => panic!("{input}: {other:?}"),
            }
        }
    }
}
