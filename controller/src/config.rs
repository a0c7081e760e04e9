//! The controller's configuration: a TOML file read into
//! [`ControllerConfig`]. Unknown keys are refused, every key has a default
//! that runs, and [`ControllerConfig::validate`] names the bad field by its
//! TOML path (`job_limits.max_subtasks`, `max_body_bytes`, …).
//!
//! ```toml
//! listen = "127.0.0.1:7400"
//! db_path = "/var/lib/sparegrid/controller.db"
//! max_body_bytes = 68157440      # 64 MiB of input plus 1 MiB for the rest
//! events_poll = "250ms"          # how often an SSE stream looks at its job
//!
//! [job_limits]                   # caps on what one request may ask for
//! max_subtasks = 1000000
//! max_input_bytes = 67108864
//! ```
//!
//! The host registry's settings (`[registry]`) are defined by the registry
//! module and will join this struct there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::Limits;

/// Default `listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default `db_path`.
pub const DEFAULT_DB_PATH: &str = "/var/lib/sparegrid/controller.db";
/// Default `max_body_bytes`: the default `job_limits.max_input_bytes`
/// (64 MiB) plus 1 MiB for the rest of the request and JSON escaping.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 65 * 1024 * 1024;
/// Default `events_poll`.
pub const DEFAULT_EVENTS_POLL: Duration = Duration::from_millis(250);

/// The whole controller config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Address and port the HTTP API listens on.
    pub listen: SocketAddr,
    /// The SQLite store's file (created with its WAL files beside it).
    pub db_path: PathBuf,
    /// Largest request body accepted; larger ones get a 413.
    pub max_body_bytes: u64,
    /// How often a `GET /v1/jobs/{id}/events` stream polls its job.
    #[serde(with = "humantime_serde")]
    pub events_poll: Duration,
    /// Caps on what one job request may ask for.
    pub job_limits: Limits,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            db_path: PathBuf::from(DEFAULT_DB_PATH),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            events_poll: DEFAULT_EVENTS_POLL,
            job_limits: Limits::default(),
        }
    }
}

/// Why a config could not be used; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl ControllerConfig {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<ControllerConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: impl AsRef<Path>) -> Result<ControllerConfig, ConfigError> {
        let config: ControllerConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse {
                path: origin.as_ref().to_owned(),
                source: Box::new(source),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.db_path.as_os_str().is_empty() {
            return Err(invalid("db_path", "is empty; name the SQLite file"));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "max_body_bytes",
                format!(
                    "{} bytes cannot hold even a small job request; use at least 1024",
                    self.max_body_bytes
                ),
            ));
        }
        if usize::try_from(self.max_body_bytes).is_err() {
            return Err(invalid(
                "max_body_bytes",
                "does not fit this machine's address space",
            ));
        }
        if self.events_poll < Duration::from_millis(10)
            || self.events_poll > Duration::from_secs(60)
        {
            return Err(invalid(
                "events_poll",
                format!("{:?} is outside 10ms..=60s", self.events_poll),
            ));
        }
        let l = &self.job_limits;
        let at_least_one: [(&str, u64); 10] = [
            ("job_limits.max_subtasks", l.max_subtasks),
            ("job_limits.max_items", l.max_items),
            ("job_limits.max_input_bytes", l.max_input_bytes),
            ("job_limits.max_argv_elements", l.max_argv_elements),
            ("job_limits.max_argv_bytes", l.max_argv_bytes),
            ("job_limits.max_name_bytes", l.max_name_bytes),
            ("job_limits.max_attempts", l.max_attempts.into()),
            ("job_limits.max_vcpus", l.max_vcpus.into()),
            ("job_limits.max_memory_mib", l.max_memory_mib),
            ("job_limits.max_timeout_secs", l.max_timeout_secs),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(invalid(field, "is 0, so every job would be refused"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    #[test]
    fn empty_file_gives_defaults_that_validate() {
        let c = ControllerConfig::parse("", "t.toml").unwrap();
        assert_eq!(c, ControllerConfig::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(c.events_poll, Duration::from_millis(250));
        assert!(c.max_body_bytes > c.job_limits.max_input_bytes);
    }

    #[test]
    fn reads_every_field() {
        let c = ControllerConfig::parse(
            r#"
            listen = "0.0.0.0:9000"
            db_path = "/tmp/x.db"
            max_body_bytes = 4096
            events_poll = "1s"
            [job_limits]
            max_subtasks = 10
            "#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.db_path, PathBuf::from("/tmp/x.db"));
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.events_poll, Duration::from_secs(1));
        assert_eq!(c.job_limits.max_subtasks, 10);
        assert_eq!(c.job_limits.max_items, Limits::default().max_items);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = ControllerConfig::parse("listne = \"x\"", "t.toml").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
        let e = ControllerConfig::parse("[job_limits]\nmax_subtask = 1", "t.toml").unwrap_err();
        assert!(e.to_string().contains("max_subtask"), "{e}");
        let e = ControllerConfig::parse("listen = \"nope\"", "t.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |f: &dyn Fn(&mut ControllerConfig)| {
            let mut c = ControllerConfig::default();
            f(&mut c);
            field_of(c.validate().unwrap_err())
        };
        assert_eq!(bad(&|c| c.db_path = PathBuf::new()), "db_path");
        assert_eq!(bad(&|c| c.max_body_bytes = 10), "max_body_bytes");
        assert_eq!(
            bad(&|c| c.events_poll = Duration::from_millis(1)),
            "events_poll"
        );
        assert_eq!(
            bad(&|c| c.job_limits.max_subtasks = 0),
            "job_limits.max_subtasks"
        );
        assert_eq!(bad(&|c| c.job_limits.max_vcpus = 0), "job_limits.max_vcpus");
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = ControllerConfig::load("/nonexistent/sparegrid.toml").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sparegrid.toml"), "{e}");
    }
}
