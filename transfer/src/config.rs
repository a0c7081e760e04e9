//! The `[transfer]` config section: where the endpoint listens, where its
//! files live (a subfolder of the agent's data directory), checkpoint size,
//! upload limits and expiry, optional TLS. `validate()` names the bad field
//! as `transfer.<field>`.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;

/// A field of `[transfer]` that is out of range; `field` is its full name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ConfigFieldError {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigFieldError {
    ConfigFieldError {
        field: format!("transfer.{field}"),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    /// Whether the agent runs the endpoint at all.
    pub enabled: bool,
    /// The endpoint's own listen address (not the status API's).
    pub listen: SocketAddr,
    /// Where partial files, journals and completed files live: relative to
    /// the agent's `data_dir`, or absolute.
    pub dir: PathBuf,
    /// A checkpoint (fsync + journal line with the chunk's blake3 chaining
    /// value, [`crate::tree`]; a power of two) every
    /// this many bytes; a broken transfer resends at most this much.
    pub checkpoint_bytes: u64,
    /// The largest `Upload-Length` accepted (413 above it).
    pub max_upload_bytes: u64,
    /// An upload not completed this long after its creation expires and is
    /// removed.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
    /// A request body that sends nothing for this long is treated as a
    /// broken connection (the upload goes back to its last checkpoint).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The URL other hosts reach this endpoint at (`http(s)://host:port`),
    /// when `listen` is not it (NAT, a proxy); empty: derived from
    /// `listen`.
    pub advertise_url: String,
    /// PEM certificate chain for TLS; with `tls_key`, or neither (plain HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            enabled: false,
            listen: "127.0.0.1:7412".parse().expect("static address"),
            dir: PathBuf::from("transfer"),
            checkpoint_bytes: 8 * MIB,
            max_upload_bytes: 64 * 1024 * MIB,
            upload_expiry: Duration::from_secs(24 * 3600),
            idle_timeout: Duration::from_secs(60),
            advertise_url: String::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl TransferConfig {
    /// Checks what serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigFieldError> {
        if self.dir.as_os_str().is_empty() {
            return Err(invalid("dir", "must not be empty"));
        }
        if self
            .dir
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(invalid(
                "dir",
                format!("must not contain `.` or `..`, got {:?}", self.dir),
            ));
        }
        if !(64 * 1024..=1024 * MIB).contains(&self.checkpoint_bytes) {
            return Err(invalid(
                "checkpoint_bytes",
                format!(
                    "must be between 64 KiB and 1 GiB, got {}",
                    self.checkpoint_bytes
                ),
            ));
        }
        // Chunks must be whole subtrees of the blake3 tree (super::tree).
        crate::tree::check_chunk_len(self.checkpoint_bytes)
            .map_err(|m| invalid("checkpoint_bytes", m))?;
        if self.max_upload_bytes == 0 {
            return Err(invalid("max_upload_bytes", "must be above 0"));
        }
        if self.upload_expiry < Duration::from_secs(1) {
            return Err(invalid(
                "upload_expiry",
                format!("must be at least 1s, got {:?}", self.upload_expiry),
            ));
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "idle_timeout",
                format!("must be at least 100ms, got {:?}", self.idle_timeout),
            ));
        }
        let u = &self.advertise_url;
        if !(u.is_empty() || u.starts_with("http://") || u.starts_with("https://")) {
            return Err(invalid(
                "advertise_url",
                format!("must start with http:// or https://, got {u:?}"),
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("tls_key", "is required with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "is required with tls_key")),
            _ => {}
        }
        for (field, p) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(invalid(
                        field,
                        format!("must be an absolute path, got {p:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The endpoint's directory: `dir` under `agent_data_dir` unless `dir`
    /// is absolute.
    pub fn resolve_dir(&self, agent_data_dir: &Path) -> PathBuf {
        agent_data_dir.join(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(toml_text: &str) -> String {
        let c: TransferConfig = toml::from_str(toml_text).unwrap();
        c.validate().unwrap_err().field
    }

    #[test]
    fn defaults_validate_and_parse_empty() {
        let c: TransferConfig = toml::from_str("").unwrap();
        assert_eq!(c, TransferConfig::default());
        c.validate().unwrap();
        assert_eq!(c.checkpoint_bytes, 8 * MIB);
        assert_eq!(
            c.resolve_dir(Path::new("/var/lib/sparegrid")),
            PathBuf::from("/var/lib/sparegrid/transfer")
        );
        let abs = TransferConfig {
            dir: "/srv/t".into(),
            ..TransferConfig::default()
        };
        assert_eq!(abs.resolve_dir(Path::new("/x")), PathBuf::from("/srv/t"));
    }

    #[test]
    fn parses_every_field() {
        let c: TransferConfig = toml::from_str(
            "enabled = true\nlisten = \"0.0.0.0:9000\"\ndir = \"xfer\"\ncheckpoint_bytes = 1048576\n\
             max_upload_bytes = 10\nupload_expiry = \"1h\"\nidle_timeout = \"5s\"\n\
             tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.enabled);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.upload_expiry, Duration::from_secs(3600));
        assert_eq!(c.tls_key.as_deref(), Some(Path::new("/k.pem")));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = toml::from_str::<TransferConfig>("checkpoint_byte = 5\n").unwrap_err();
        assert!(e.to_string().contains("checkpoint_byte"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of("dir = \"\"\n"), "transfer.dir");
        assert_eq!(field_of("dir = \"../etc\"\n"), "transfer.dir");
        assert_eq!(
            field_of("checkpoint_bytes = 100\n"),
            "transfer.checkpoint_bytes"
        );
        // In range but not a power of two: the digest tree cannot use it.
        assert_eq!(
            field_of("checkpoint_bytes = 100000\n"),
            "transfer.checkpoint_bytes"
        );
        assert_eq!(
            field_of("max_upload_bytes = 0\n"),
            "transfer.max_upload_bytes"
        );
        assert_eq!(
            field_of("upload_expiry = \"10ms\"\n"),
            "transfer.upload_expiry"
        );
        assert_eq!(
            field_of("idle_timeout = \"1ms\"\n"),
            "transfer.idle_timeout"
        );
        assert_eq!(field_of("tls_cert = \"/c.pem\"\n"), "transfer.tls_key");
        assert_eq!(field_of("tls_key = \"/k.pem\"\n"), "transfer.tls_cert");
        assert_eq!(
            field_of("tls_cert = \"c.pem\"\ntls_key = \"/k.pem\"\n"),
            "transfer.tls_cert"
        );
    }
}
