//! The `[data]` config section: where the controller keeps job data (the
//! uploads that `lines` jobs reference, and subtask outputs kept whole as
//! files), how large an upload may be, when an output becomes a file, and
//! which grid VM images the controller serves to agents (the image
//! catalog).
//! [`DataConfig::validate`] names the bad field as `data.<field>`.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// 1 MiB.
const MIB: u64 = 1024 * 1024;

/// Default `data.dir`, relative to the directory of `db_path`.
pub const DEFAULT_DIR: &str = "data";
/// Default `data.max_upload_bytes`.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1024 * MIB;
/// Default `data.output_file_above`: a quarter of the agents' and the
/// store's 1 MiB output cap.
pub const DEFAULT_OUTPUT_FILE_ABOVE: u64 = 256 * 1024;

/// A bad `[data]` field: `field` is its full name (`data.dir`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct DataConfigError {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> DataConfigError {
    DataConfigError {
        field: format!("data.{field}"),
        message: message.into(),
    }
}

/// `[data]`: job data over the transfer protocol (docs/transfer.md, "Job
/// data").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Serve `/v1/data` (uploads, output files). Off: jobs may only carry
    /// their input inline and outputs stay in the store.
    pub enabled: bool,
    /// Where uploads and output files live: relative to the directory of
    /// `db_path`, or absolute.
    pub dir: PathBuf,
    /// Largest upload (`Upload-Length`; 413 above).
    pub max_upload_bytes: u64,
    /// A checkpoint every this many bytes (64 KiB..1 GiB).
    pub checkpoint_bytes: u64,
    /// An upload not finished this long after its creation is removed.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
    /// How long the transfer tokens the controller hands out are valid.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// A successful subtask's stdout longer than this is also kept whole
    /// as a file, which `sparegrid results --output` fetches with Range.
    pub output_file_above: u64,
    /// Image directories (`manifest.json`, `vmlinuz`, `initrd.img`; absolute
    /// paths) the controller serves to agents that lack them, checked
    /// against their manifests at start (docs/transfer.md, "Image
    /// catalog").
    pub images: Vec<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            enabled: true,
            dir: PathBuf::from(DEFAULT_DIR),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            checkpoint_bytes: 8 * MIB,
            upload_expiry: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(24 * 3600),
            output_file_above: DEFAULT_OUTPUT_FILE_ABOVE,
            images: Vec::new(),
        }
    }
}

impl DataConfig {
    /// Checks what serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), DataConfigError> {
        if self.dir.as_os_str().is_empty() {
            return Err(invalid("dir", "is empty; name a directory"));
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
        if self.max_upload_bytes == 0 {
            return Err(invalid(
                "max_upload_bytes",
                "is 0, so every upload would be refused",
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
        // Chunks must be whole subtrees of the blake3 tree.
        sparegrid_transfer::tree::check_chunk_len(self.checkpoint_bytes)
            .map_err(|m| invalid("checkpoint_bytes", m))?;
        if self.upload_expiry < Duration::from_secs(1) {
            return Err(invalid(
                "upload_expiry",
                format!("must be at least 1s, got {:?}", self.upload_expiry),
            ));
        }
        if self.token_ttl < Duration::from_secs(10)
            || self.token_ttl > Duration::from_secs(30 * 86400)
        {
            return Err(invalid(
                "token_ttl",
                format!("{:?} is outside 10s..=30d", self.token_ttl),
            ));
        }
        if self.output_file_above == 0 {
            return Err(invalid(
                "output_file_above",
                "is 0; use at least 1 (every non-empty output a file)",
            ));
        }
        for (i, dir) in self.images.iter().enumerate() {
            if !dir.is_absolute() {
                return Err(invalid(
                    &format!("images[{i}]"),
                    format!("must be an absolute path, got {dir:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The directory, resolved against the directory of `db_path`.
    pub fn resolve_dir(&self, db_path: &Path) -> PathBuf {
        if self.dir.is_absolute() {
            return self.dir.clone();
        }
        let base = db_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        base.join(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_resolve_beside_the_database() {
        let c = DataConfig::default();
        c.validate().unwrap();
        assert_eq!(
            c.resolve_dir(Path::new("/var/lib/sparegrid/controller.db")),
            Path::new("/var/lib/sparegrid/data")
        );
        let abs = DataConfig {
            dir: "/srv/data".into(),
            ..c
        };
        assert_eq!(abs.resolve_dir(Path::new("x.db")), Path::new("/srv/data"));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(DataConfig, &str)> = vec![
            (
                DataConfig {
                    dir: "".into(),
                    ..Default::default()
                },
                "data.dir",
            ),
            (
                DataConfig {
                    dir: "a/../b".into(),
                    ..Default::default()
                },
                "data.dir",
            ),
            (
                DataConfig {
                    max_upload_bytes: 0,
                    ..Default::default()
                },
                "data.max_upload_bytes",
            ),
            (
                DataConfig {
                    checkpoint_bytes: 1000,
                    ..Default::default()
                },
                "data.checkpoint_bytes",
            ),
            (
                DataConfig {
                    checkpoint_bytes: 100_000,
                    ..Default::default()
                },
                "data.checkpoint_bytes",
            ),
            (
                DataConfig {
                    upload_expiry: Duration::ZERO,
                    ..Default::default()
                },
                "data.upload_expiry",
            ),
            (
                DataConfig {
                    token_ttl: Duration::from_secs(1),
                    ..Default::default()
                },
                "data.token_ttl",
            ),
            (
                DataConfig {
                    output_file_above: 0,
                    ..Default::default()
                },
                "data.output_file_above",
            ),
            (
                DataConfig {
                    images: vec!["/srv/img".into(), "rel/img".into()],
                    ..Default::default()
                },
                "data.images[1]",
            ),
        ];
        for (c, field) in cases {
            assert_eq!(c.validate().unwrap_err().field, field, "{c:?}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<DataConfig>("dirr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("dirr"), "{e}");
        let c: DataConfig = toml::from_str("enabled = false\ntoken_ttl = \"1h\"").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
    }
}
