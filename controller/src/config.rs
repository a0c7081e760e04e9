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
//!
//! [registry]                     # the two-set rule (see crate::registry)
//! dispatch_below = 0.5
//! withdraw_above = 0.8
//! withdraw_after = "1m"
//! host_timeout = "15s"
//! heartbeat_interval = "2s"
//!
//! [dispatch]                     # push dispatch to agents (see crate::agents)
//! agent_token = "…"              # unset: agent routes are open (tests, demos)
//! batch_size = 64                # most assignments in one POST to an agent
//! interval = "100ms"             # dispatch round when nothing wakes it sooner
//! push_timeout = "5s"            # a POST to an agent that takes longer failed
//! max_agent_body_bytes = 33554432
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::Limits;
use crate::registry::RegistryConfig;

/// Default `listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default `db_path`.
pub const DEFAULT_DB_PATH: &str = "/var/lib/sparegrid/controller.db";
/// Default `max_body_bytes`: the default `job_limits.max_input_bytes`
/// (64 MiB) plus 1 MiB for the rest of the request and JSON escaping.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 65 * 1024 * 1024;
/// Default `events_poll`.
pub const DEFAULT_EVENTS_POLL: Duration = Duration::from_millis(250);

/// Default `dispatch.batch_size`.
pub const DEFAULT_BATCH_SIZE: u32 = 64;
/// Default `dispatch.interval`.
pub const DEFAULT_DISPATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Default `dispatch.push_timeout`.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `dispatch.max_agent_body_bytes`: room for a batch of completion
/// reports with their captured output.
pub const DEFAULT_MAX_AGENT_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// The `[dispatch]` section: how the controller pushes work to agents and
/// how agents authenticate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// The bearer token of the agent role: agents send it to the controller
    /// and the controller sends it to agents. Unset: agent routes are open.
    pub agent_token: Option<String>,
    /// Most assignments pushed to one agent in one POST.
    pub batch_size: u32,
    /// How often a dispatch round runs when no job, heartbeat or completion
    /// wakes it sooner.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A POST to an agent that has not answered in this time failed; its
    /// assignments go back to the queue.
    #[serde(with = "humantime_serde")]
    pub push_timeout: Duration,
    /// Largest MessagePack body accepted on the agent routes (413 above).
    pub max_agent_body_bytes: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            agent_token: None,
            batch_size: DEFAULT_BATCH_SIZE,
            interval: DEFAULT_DISPATCH_INTERVAL,
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            max_agent_body_bytes: DEFAULT_MAX_AGENT_BODY_BYTES,
        }
    }
}

impl std::fmt::Debug for DispatchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchConfig")
            .field("agent_token", &self.agent_token.as_ref().map(|_| "<set>"))
            .field("batch_size", &self.batch_size)
            .field("interval", &self.interval)
            .field("push_timeout", &self.push_timeout)
            .field("max_agent_body_bytes", &self.max_agent_body_bytes)
            .finish()
    }
}

/// The whole controller config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The host registry's thresholds and timers.
    pub registry: RegistryConfig,
    /// Push dispatch and agent authentication.
    pub dispatch: DispatchConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            db_path: PathBuf::from(DEFAULT_DB_PATH),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            events_poll: DEFAULT_EVENTS_POLL,
            job_limits: Limits::default(),
            registry: RegistryConfig::default(),
            dispatch: DispatchConfig::default(),
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
        self.registry
            .validate()
            .map_err(|e| invalid(e.field, e.message))?;
        let d = &self.dispatch;
        if let Some(t) = &d.agent_token {
            if t.len() < 8 || t.chars().any(|c| !c.is_ascii_graphic()) {
                return Err(invalid(
                    "dispatch.agent_token",
                    "must be at least 8 printable ASCII characters without spaces",
                ));
            }
        }
        if d.batch_size == 0 || d.batch_size > 10_000 {
            return Err(invalid(
                "dispatch.batch_size",
                format!("must be 1..=10000, got {}", d.batch_size),
            ));
        }
        if d.interval < Duration::from_millis(1) || d.interval > Duration::from_secs(60) {
            return Err(invalid(
                "dispatch.interval",
                format!("{:?} is outside 1ms..=60s", d.interval),
            ));
        }
        if d.push_timeout < Duration::from_millis(10) || d.push_timeout > Duration::from_secs(600) {
            return Err(invalid(
                "dispatch.push_timeout",
                format!("{:?} is outside 10ms..=10m", d.push_timeout),
            ));
        }
        if d.max_agent_body_bytes < 1024 || usize::try_from(d.max_agent_body_bytes).is_err() {
            return Err(invalid(
                "dispatch.max_agent_body_bytes",
                format!(
                    "{} bytes: use at least 1024 and what fits this machine",
                    d.max_agent_body_bytes
                ),
            ));
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
        assert_eq!(
            bad(&|c| c.registry.withdraw_above = 2.0),
            "registry.withdraw_above"
        );
        assert_eq!(
            bad(&|c| c.dispatch.agent_token = Some("short".into())),
            "dispatch.agent_token"
        );
        assert_eq!(bad(&|c| c.dispatch.batch_size = 0), "dispatch.batch_size");
    }

    #[test]
    fn reads_registry_and_dispatch() {
        let c = ControllerConfig::parse(
            r#"
            [registry]
            withdraw_above = 0.9
            heartbeat_interval = "500ms"
            [dispatch]
            agent_token = "s3cret-token"
            batch_size = 8
            interval = "50ms"
            "#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.registry.withdraw_above, 0.9);
        assert_eq!(c.registry.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.dispatch.agent_token.as_deref(), Some("s3cret-token"));
        assert_eq!(c.dispatch.batch_size, 8);
        assert_eq!(c.dispatch.interval, Duration::from_millis(50));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token stays out of Debug"
        );
        let e = ControllerConfig::parse(
            "[dispatch]
batch = 1",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = ControllerConfig::load("/nonexistent/sparegrid.toml").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sparegrid.toml"), "{e}");
    }
}
