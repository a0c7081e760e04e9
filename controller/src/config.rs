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
//! batch_size = 1000              # most assignments in one POST to an agent
//! interval = "100ms"             # dispatch round when nothing wakes it sooner
//! push_timeout = "5s"            # a POST to an agent that takes longer failed
//! max_agent_body_bytes = 33554432
//! lease_ttl = "30s"              # pull mode: a lease not renewed in this time expires
//! lease_wait_max = "20s"         # pull mode: longest a lease request waits for work
//! p2p_seed_hosts = 2             # p2p mode: agents a job's subtasks are seeded to
//!
//! [auth]                         # bearer tokens by role (see crate::api::auth)
//! agent_token = "…"              # agents → /v1/agents/*; sent to agents on push
//! submit_tokens = ["…"]          # users → /v1/jobs*
//! admin_tokens = ["…"]           # operators → everything, /v1/hosts, /metrics
//!
//! [tls]                          # HTTPS with rustls; both or neither
//! cert = "/etc/sparegrid/tls/cert.pem"
//! key = "/etc/sparegrid/tls/key.pem"
//!
//! [overlay]                      # the grid overlay (see crate::overlay)
//! cidr = "100.96.0.0/16"         # empty (the default): no overlay
//! slice_prefix = 24              # each host's slice
//! release_after = "24h"          # a lost host's slice is freed after this
//!
//! [data]                         # job data: uploads, output files (see crate::data)
//! enabled = true
//! dir = "data"                   # relative to db_path's directory, or absolute
//! max_upload_bytes = 1073741824
//! output_file_above = 262144     # longer stdout is also kept whole as a file
//! ```
//!
//! With no token at all the API is open: allowed only on a loopback
//! `listen` address (tests, demos); any token closes every route but
//! `/openapi.json` to requests without a token of a role the route allows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::job::Limits;
use crate::overlay::OverlayConfig;
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

/// Default `dispatch.batch_size`. A dispatch round gives each eligible
/// host at most this many subtasks, and rounds come every
/// `dispatch.interval` (or sooner when woken), so with hosts that have many
/// free slots dispatch is capped near hosts × batch_size / interval:
/// `bench-controller` (4 hosts, 100 ms) measured 2.7k subtasks/s at 64 and
/// 33k/s at 1000. A batch of 1000 `range` subtasks is about 150 KiB of
/// MessagePack; agents accept 64 MiB.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
/// Default `dispatch.interval`.
pub const DEFAULT_DISPATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Default `dispatch.push_timeout`.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `dispatch.max_agent_body_bytes`: room for a batch of completion
/// reports with their captured output.
pub const DEFAULT_MAX_AGENT_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// Default `dispatch.lease_ttl`: fifteen default heartbeats, so a pulling
/// agent that renews with its heartbeat misses many before it loses work.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default `dispatch.p2p_seed_hosts`: a few, so one host's loss or load
/// does not hold the whole job until peers steal.
pub const DEFAULT_P2P_SEED_HOSTS: u32 = 2;
/// Default `dispatch.lease_wait_max`: below common proxies' idle timeouts.
pub const DEFAULT_LEASE_WAIT_MAX: Duration = Duration::from_secs(20);

/// The `[dispatch]` section: how the controller pushes work to agents, and
/// how pulling agents lease it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
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
    /// Pull mode: a lease that is not renewed within this time expires and
    /// its subtask goes back to the queue.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Pull mode: the longest a `POST /v1/leases` waits for work before it
    /// answers with an empty grant (the agent's `wait_ms` is capped to it).
    #[serde(with = "humantime_serde")]
    pub lease_wait_max: Duration,
    /// Peer-to-peer mode: how many agents (the eligible p2p agents with the
    /// most free slots) each dispatch round seeds queued p2p subtasks to;
    /// the agents spread them further by work stealing.
    pub p2p_seed_hosts: u32,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            batch_size: DEFAULT_BATCH_SIZE,
            interval: DEFAULT_DISPATCH_INTERVAL,
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            max_agent_body_bytes: DEFAULT_MAX_AGENT_BODY_BYTES,
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_wait_max: DEFAULT_LEASE_WAIT_MAX,
            p2p_seed_hosts: DEFAULT_P2P_SEED_HOSTS,
        }
    }
}

/// The `[auth]` section: bearer tokens by role. The roles and what each
/// may call are in [`crate::api::auth`]. No token at all: the API is open
/// (only on a loopback `listen`). Tokens stay out of `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The agent role's token: agents send it on `/v1/agents/*` and the
    /// controller sends it to agents when it pushes work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<String>,
    /// Tokens of the submit role: the job routes (`/v1/jobs*`).
    pub submit_tokens: Vec<String>,
    /// Tokens of the admin role: every route.
    pub admin_tokens: Vec<String>,
}

impl AuthConfig {
    /// True when no token of any role is configured: the API is open.
    pub fn is_open(&self) -> bool {
        self.agent_token.is_none() && self.submit_tokens.is_empty() && self.admin_tokens.is_empty()
    }

    /// Every configured token with its field name (`auth.submit_tokens[1]`).
    pub fn named_tokens(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        if let Some(t) = &self.agent_token {
            out.push(("auth.agent_token".to_owned(), t.as_str()));
        }
        for (list, name) in [
            (&self.submit_tokens, "auth.submit_tokens"),
            (&self.admin_tokens, "auth.admin_tokens"),
        ] {
            for (i, t) in list.iter().enumerate() {
                out.push((format!("{name}[{i}]"), t.as_str()));
            }
        }
        out
    }

    /// Checks each token's form, that no token is listed twice (within or
    /// across roles), and that a closed API has someone who can use the
    /// job routes. `listen` decides whether an open API is allowed.
    fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        if self.is_open() {
            if !listen.ip().is_loopback() {
                return Err(invalid(
                    "auth",
                    format!(
                        "no tokens are configured, so the API would be open to anyone who \
                         reaches {listen}; set auth.submit_tokens, auth.admin_tokens and \
                         auth.agent_token, or listen on a loopback address"
                    ),
                ));
            }
            return Ok(());
        }
        let named = self.named_tokens();
        for (i, (field, token)) in named.iter().enumerate() {
            if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| !c.is_ascii_graphic()) {
                return Err(invalid(
                    field,
                    format!(
                        "must be at least {MIN_TOKEN_LEN} printable ASCII characters without \
                         spaces (for example `openssl rand -hex 32`)"
                    ),
                ));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, t)| t == token) {
                return Err(invalid(
                    field,
                    format!(
                        "is the same token as {other}; every token must be distinct so that \
                         it names one role"
                    ),
                ));
            }
        }
        if self.submit_tokens.is_empty() && self.admin_tokens.is_empty() {
            return Err(invalid(
                "auth.submit_tokens",
                "auth.agent_token closes the API, but there are no submit_tokens or \
                 admin_tokens, so no one could submit or read jobs; add one",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("agent_token", &self.agent_token.as_ref().map(|_| "<set>"))
            .field("submit_tokens", &self.submit_tokens.len())
            .field("admin_tokens", &self.admin_tokens.len())
            .finish()
    }
}

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 8;

/// The `[tls]` section: serve HTTPS with rustls from PEM files. Both or
/// neither; neither serves plain HTTP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    /// The cert and key paths when TLS is on.
    pub fn paths(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(invalid(field, "is empty; name a PEM file"));
            }
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(invalid(
                "tls.key",
                "tls.cert is set but tls.key is not; set both (TLS) or neither (plain HTTP)",
            )),
            (None, Some(_)) => Err(invalid(
                "tls.cert",
                "tls.key is set but tls.cert is not; set both (TLS) or neither (plain HTTP)",
            )),
            _ => Ok(()),
        }
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
    /// Push dispatch to agents.
    pub dispatch: DispatchConfig,
    /// Bearer tokens by role.
    pub auth: AuthConfig,
    /// HTTPS.
    pub tls: TlsConfig,
    /// The grid overlay's address pool.
    pub overlay: OverlayConfig,
    /// Job data: uploads and output files (see crate::data).
    pub data: DataConfig,
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
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            overlay: OverlayConfig::default(),
            data: DataConfig::default(),
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
        self.data
            .validate()
            .map_err(|e| invalid(&e.field, e.message))?;
        let d = &self.dispatch;
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
        if d.lease_ttl < Duration::from_millis(100) || d.lease_ttl > Duration::from_secs(3600) {
            return Err(invalid(
                "dispatch.lease_ttl",
                format!("{:?} is outside 100ms..=1h", d.lease_ttl),
            ));
        }
        if d.lease_wait_max > Duration::from_secs(300) {
            return Err(invalid(
                "dispatch.lease_wait_max",
                format!("{:?} is over 5m", d.lease_wait_max),
            ));
        }
        if d.p2p_seed_hosts == 0 || d.p2p_seed_hosts > 1000 {
            return Err(invalid(
                "dispatch.p2p_seed_hosts",
                format!("{} is outside 1..=1000", d.p2p_seed_hosts),
            ));
        }
        self.auth.validate(self.listen)?;
        self.tls.validate()?;
        self.overlay
            .validate()
            .map_err(|e| invalid(e.field, e.message))?;
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
            [auth]
            admin_tokens = ["admin-s3cret"]
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
        assert_eq!(
            bad(&|c| c.dispatch.lease_ttl = Duration::from_millis(5)),
            "dispatch.lease_ttl"
        );
        assert_eq!(
            bad(&|c| c.dispatch.lease_wait_max = Duration::from_secs(3600)),
            "dispatch.lease_wait_max"
        );
        assert_eq!(
            bad(&|c| c.dispatch.p2p_seed_hosts = 0),
            "dispatch.p2p_seed_hosts"
        );
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
            batch_size = 8
            interval = "50ms"
            "#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.registry.withdraw_above, 0.9);
        assert_eq!(c.registry.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.dispatch.batch_size, 8);
        assert_eq!(c.dispatch.interval, Duration::from_millis(50));
        let e = ControllerConfig::parse(
            "[dispatch]
batch = 1",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
    }

    fn closed() -> ControllerConfig {
        ControllerConfig {
            auth: AuthConfig {
                agent_token: Some("agent-s3cret".into()),
                submit_tokens: vec!["submit-s3cret-1".into(), "submit-s3cret-2".into()],
                admin_tokens: vec!["admin-s3cret".into()],
            },
            ..ControllerConfig::default()
        }
    }

    #[test]
    fn reads_auth_and_tls() {
        let c = ControllerConfig::parse(
            r#"
            listen = "0.0.0.0:7400"
            [auth]
            agent_token = "agent-s3cret"
            submit_tokens = ["submit-s3cret-1", "submit-s3cret-2"]
            admin_tokens = ["admin-s3cret"]
            [tls]
            cert = "/etc/sparegrid/tls/cert.pem"
            key = "/etc/sparegrid/tls/key.pem"
            "#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.auth, closed().auth);
        assert!(!c.auth.is_open());
        assert_eq!(
            c.tls.paths(),
            Some((
                Path::new("/etc/sparegrid/tls/cert.pem"),
                Path::new("/etc/sparegrid/tls/key.pem")
            ))
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "tokens stay out of Debug: {c:?}"
        );
        let e = ControllerConfig::parse("[auth]\nagent = \"x\"", "t.toml").unwrap_err();
        assert!(e.to_string().contains("agent"), "{e}");
        let e = ControllerConfig::parse("[dispatch]\nagent_token = \"agent-s3cret\"", "t.toml")
            .unwrap_err();
        assert!(
            e.to_string().contains("agent_token"),
            "moved to [auth]: {e}"
        );
    }

    #[test]
    fn auth_validation_names_the_field() {
        let bad = |f: &dyn Fn(&mut ControllerConfig)| {
            let mut c = closed();
            f(&mut c);
            let e = c.validate().unwrap_err();
            let text = e.to_string();
            (field_of(e), text)
        };
        closed().validate().unwrap();
        let (f, m) = bad(&|c| c.auth.agent_token = Some("short".into()));
        assert_eq!(f, "auth.agent_token", "{m}");
        let (f, m) = bad(&|c| c.auth.submit_tokens[1] = "has a space".into());
        assert_eq!(f, "auth.submit_tokens[1]", "{m}");
        // The same token in two roles: the later field is named, the
        // earlier one is in the message.
        let (f, m) = bad(&|c| c.auth.admin_tokens[0] = "submit-s3cret-2".into());
        assert_eq!(f, "auth.admin_tokens[0]");
        assert!(m.contains("auth.submit_tokens[1]"), "{m}");
        let (f, m) = bad(&|c| c.auth.agent_token = Some("admin-s3cret".into()));
        assert_eq!(f, "auth.admin_tokens[0]");
        assert!(m.contains("auth.agent_token"), "{m}");
        let (f, _) = bad(&|c| c.auth.submit_tokens.push("submit-s3cret-1".into()));
        assert_eq!(f, "auth.submit_tokens[2]");
        // Only an agent token: no one could use the job routes.
        let (f, _) = bad(&|c| {
            c.auth.submit_tokens.clear();
            c.auth.admin_tokens.clear();
        });
        assert_eq!(f, "auth.submit_tokens");
        // Admin tokens alone are enough.
        let mut c = closed();
        c.auth.submit_tokens.clear();
        c.auth.agent_token = None;
        c.validate().unwrap();
    }

    #[test]
    fn an_open_api_must_listen_on_loopback() {
        let mut c = ControllerConfig::default();
        assert!(c.auth.is_open());
        c.validate().unwrap();
        c.listen = "[::1]:7400".parse().unwrap();
        c.validate().unwrap();
        for addr in ["0.0.0.0:7400", "192.0.2.1:7400", "[::]:7400"] {
            c.listen = addr.parse().unwrap();
            let e = c.validate().unwrap_err();
            assert!(
                e.to_string().contains(addr.rsplit_once(':').unwrap().0),
                "{e}"
            );
            assert_eq!(field_of(e), "auth", "{addr}");
        }
        let mut c = closed();
        c.listen = "0.0.0.0:7400".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn tls_needs_both_paths() {
        let bad = |cert: Option<&str>, key: Option<&str>| {
            let c = ControllerConfig {
                tls: TlsConfig {
                    cert: cert.map(PathBuf::from),
                    key: key.map(PathBuf::from),
                },
                ..ControllerConfig::default()
            };
            c.validate().err().map(field_of)
        };
        assert_eq!(bad(None, None), None);
        assert_eq!(bad(Some("/c.pem"), Some("/k.pem")), None);
        assert_eq!(bad(Some("/c.pem"), None).as_deref(), Some("tls.key"));
        assert_eq!(bad(None, Some("/k.pem")).as_deref(), Some("tls.cert"));
        assert_eq!(bad(Some(""), Some("/k.pem")).as_deref(), Some("tls.cert"));
    }

    #[test]
    fn reads_and_checks_the_overlay() {
        let c = ControllerConfig::parse("", "t.toml").unwrap();
        assert!(!c.overlay.enabled());
        let c = ControllerConfig::parse(
            "[overlay]\ncidr = \"100.96.0.0/16\"\nslice_prefix = 20\nrelease_after = \"2h\"",
            "t.toml",
        )
        .unwrap();
        assert!(c.overlay.enabled());
        assert_eq!(c.overlay.slice_prefix, 20);
        assert_eq!(c.overlay.release_after, Duration::from_secs(7200));
        let bad = |text: &str| {
            let e = ControllerConfig::parse(text, "t.toml").unwrap_err();
            let text = e.to_string();
            (field_of(e), text)
        };
        let (f, m) = bad("[overlay]\ncidr = \"100.96.0.0\"");
        assert_eq!(f, "overlay.cidr", "{m}");
        assert!(m.contains("overlay.cidr"), "{m}");
        let (f, _) = bad("[overlay]\ncidr = \"100.96.0.0/16\"\nslice_prefix = 16");
        assert_eq!(f, "overlay.slice_prefix");
        let (f, _) = bad("[overlay]\ncidr = \"100.96.0.0/24\"\nslice_prefix = 31");
        assert_eq!(f, "overlay.slice_prefix");
        let (f, _) = bad("[overlay]\nrelease_after = \"1ms\"");
        assert_eq!(f, "overlay.release_after");
        let e = ControllerConfig::parse("[overlay]\nprefix = 24", "t.toml").unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = ControllerConfig::load("/nonexistent/sparegrid.toml").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sparegrid.toml"), "{e}");
    }
}
