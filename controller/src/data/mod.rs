//! Job data: the transfer endpoint ([`sparegrid_transfer`], tus 1.0 uploads
//! and Range downloads with checkpoint journals) hosted by the controller
//! under `/v1/data`, for the inputs `lines` jobs reference and for subtask
//! outputs kept whole as files (docs/transfer.md, "Job data").
//!
//! - [`config`]: the `[data]` section.
//! - [`DataPlane`]: the open transfer store, its signing key (a random key
//!   kept in `<data.dir>/signing.key`, so tokens survive a restart), id
//!   minting, reading a complete upload as a job's input
//!   ([`DataPlane::read_input`]) and publishing an output file
//!   ([`DataPlane::store_output`]).
//! - [`routes`]: everything under `/v1/data` (the transfer routes at
//!   `/v1/data/v1/files/{id}`, authorized by scoped transfer tokens; token
//!   minting, upload status and job output listings, authorized by the
//!   API's submit or admin role) and [`layer`], the middleware that serves
//!   them and captures large outputs from completion reports.
//! - [`input`]: `split.lines.input = {"data": ID}` resolved at submit.
//! - [`outputs`]: large stdout kept as files; the outputs listing.
//! - [`images`]: the grid VM images of `data.images`, checked and served
//!   to agents (the image catalog).
//!
//! The `/v1/data` routes are served by [`layer`] in front of the API's
//! router rather than as `.route`s of it: the transfer crate's router has
//! its own fallback and token checks, and the API's role middleware and
//! OpenAPI document describe role-authorized JSON routes (they do not
//! list `/v1/data`; docs/transfer.md does).

pub mod config;
pub mod images;
pub mod input;
pub mod outputs;
pub mod routes;

#[cfg(test)]
mod routes_tests;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sparegrid_transfer::journal::Header;
use sparegrid_transfer::{Direction, StoreError, TransferConfig, TransferState};

pub use config::DataConfig;
pub use routes::layer;

use crate::config::ControllerConfig;

/// The URL prefix of everything job data.
pub const PREFIX: &str = "/v1/data";
/// Ids of uploads the controller mints start with this.
pub const INPUT_PREFIX: &str = "in-";
/// Ids of output files start with this.
pub const OUTPUT_PREFIX: &str = "out-";

/// Why the data plane could not start or do something; names the path or id.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Config(#[from] config::DataConfigError),
    #[error("data.dir {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data.dir: {0}")]
    Transfer(#[from] sparegrid_transfer::TransferError),
    #[error("data {id}: {source}")]
    Store {
        id: String,
        #[source]
        source: StoreError,
    },
    #[error("data id {0:?} is not a valid id")]
    BadId(String),
    #[error(transparent)]
    Image(#[from] images::ImageError),
}

struct Inner {
    config: DataConfig,
    transfer: TransferState,
    dir: PathBuf,
    max_agent_body: usize,
    /// Digests of the images served (`data.images`).
    images: Vec<String>,
}

/// The controller's job data: see the module header.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// A freshly minted upload: where to send it and the token for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Minted {
    pub id: String,
    /// The transfer base: tus clients upload to `<controller><base>/v1/files`.
    pub base: String,
    /// `<base>/v1/files/<id>`.
    pub upload_url: String,
    /// An `up` token for this id only.
    pub token: String,
    pub expires_unix: u64,
    pub max_upload_bytes: u64,
    /// The controller's checkpoint size: a client's journal must use the
    /// same, or the last checkpoint both hold cannot be compared.
    pub checkpoint_bytes: u64,
}

impl DataPlane {
    /// Opens the data plane `config` asks for: `None` with `data.enabled`
    /// off; otherwise the directory is resolved against `db_path`'s.
    pub fn open(config: &ControllerConfig) -> Result<Option<DataPlane>, DataError> {
        if !config.data.enabled {
            return Ok(None);
        }
        let dir = config.data.resolve_dir(&config.db_path);
        let max_body = usize::try_from(config.dispatch.max_agent_body_bytes).unwrap_or(usize::MAX);
        DataPlane::open_dir(&config.data, &dir, max_body).map(Some)
    }

    /// Opens (creating) the data plane in `dir`. `max_agent_body` caps the
    /// completion reports [`layer`] reads to capture outputs.
    pub fn open_dir(
        config: &DataConfig,
        dir: &Path,
        max_agent_body: usize,
    ) -> Result<DataPlane, DataError> {
        config.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key = signing_key(&dir.join("signing.key"))?;
        let tc = TransferConfig {
            enabled: true,
            dir: PathBuf::from("files"),
            checkpoint_bytes: config.checkpoint_bytes,
            max_upload_bytes: config.max_upload_bytes,
            upload_expiry: config.upload_expiry,
            ..TransferConfig::default()
        };
        let transfer = TransferState::new(&tc, dir, &key)?;
        let mut plane = DataPlane {
            inner: Arc::new(Inner {
                config: config.clone(),
                transfer,
                dir: dir.to_owned(),
                max_agent_body,
                images: Vec::new(),
            }),
        };
        let digests = images::publish_all(&plane, &config.images)?;
        if let Some(inner) = Arc::get_mut(&mut plane.inner) {
            inner.images = digests;
        }
        Ok(plane)
    }

    /// Whether the controller serves image `digest` (`data.images`).
    pub fn serves_image(&self, digest: &str) -> bool {
        self.inner.images.iter().any(|d| d == digest)
    }

    pub fn config(&self) -> &DataConfig {
        &self.inner.config
    }

    pub fn transfer(&self) -> &TransferState {
        &self.inner.transfer
    }

    /// The directory holding the signing key and `files/`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn max_agent_body(&self) -> usize {
        self.inner.max_agent_body
    }

    /// A token for `id` in `direction`, valid for `data.token_ttl`, and
    /// its expiry (unix seconds).
    pub fn sign(&self, id: &str, direction: Direction) -> Result<(String, u64), DataError> {
        let ttl = self.inner.config.token_ttl;
        let token = self
            .inner
            .transfer
            .sign(id, direction, ttl)
            .map_err(|_| DataError::BadId(id.to_owned()))?;
        Ok((token, unix(SystemTime::now() + ttl)))
    }

    /// A new upload id with its `up` token; or a new token for `id`, an
    /// upload this controller minted that is not complete yet.
    pub fn mint(&self, existing: Option<&str>) -> Result<Minted, routes::Refusal> {
        let id = match existing {
            Some(id) => {
                let minted_here = id.starts_with(INPUT_PREFIX)
                    && sparegrid_transfer::store::validate_id(id).is_ok();
                if !minted_here {
                    return Err(routes::Refusal::bad(
                        "id",
                        format!("{id:?} is not an upload id this controller hands out"),
                    ));
                }
                if matches!(self.transfer().store().is_complete(id), Ok(true)) {
                    return Err(routes::Refusal::conflict(format!(
                        "upload {id} is complete; it needs no token to upload"
                    )));
                }
                id.to_owned()
            }
            None => format!("{INPUT_PREFIX}{}", random_hex(16)),
        };
        let (token, expires_unix) = self
            .sign(&id, Direction::Upload)
            .map_err(|e| routes::Refusal::internal(e.to_string()))?;
        let upload_url = format!("{PREFIX}{}/{id}", sparegrid_transfer::FILES);
        Ok(Minted {
            id,
            base: PREFIX.to_owned(),
            upload_url,
            token,
            expires_unix,
            max_upload_bytes: self.inner.config.max_upload_bytes,
            checkpoint_bytes: self.inner.config.checkpoint_bytes,
        })
    }

    /// Publishes `bytes` as the complete, verified file `id` through the
    /// transfer store's own writer (journal, checkpoints, digest check,
    /// atomic rename). `Ok(false)` when `id` exists already. Blocking.
    pub fn publish(&self, id: &str, source: String, bytes: &[u8]) -> Result<bool, DataError> {
        let store = self.transfer().store();
        let err = |source| DataError::Store {
            id: id.to_owned(),
            source,
        };
        let header = Header {
            id: id.to_owned(),
            source,
            target: "controller".to_owned(),
            size: bytes.len() as u64,
            digest: blake3::hash(bytes).to_hex().to_string(),
            checkpoint_bytes: 0, // the store sets its own
            created_unix: unix(SystemTime::now()),
            expires_unix: 0,
            metadata: String::new(),
        };
        let slot = store.slot(id);
        let _guard = slot.blocking_lock();
        let mut upload = match store.create(header) {
            Ok(u) => u,
            Err(StoreError::Exists { .. }) => return Ok(false),
            Err(e) => return Err(err(e)),
        };
        let written = upload.begin(0, None).and_then(|mut req| {
            upload.write(&mut req, bytes)?;
            upload.finish(req)
        });
        if let Err(e) = written {
            upload.rollback();
            drop(upload);
            let _ = store.remove(id);
            return Err(err(e));
        }
        store.complete(upload).map_err(err)?;
        Ok(true)
    }

    /// Removes transfer `id` (any state). Blocking.
    pub fn remove(&self, id: &str) -> Result<bool, DataError> {
        self.transfer()
            .store()
            .remove(id)
            .map_err(|source| DataError::Store {
                id: id.to_owned(),
                source,
            })
    }
}

/// Seconds since the Unix epoch.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// `n` random bytes from the kernel as lowercase hex. Reads
/// `/dev/urandom` directly: one read, no crate needed for it.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if ok.is_err() {
        // Never reached on Linux; still unique, if guessable.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        return format!("{t:032x}");
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The signing key at `path`: read when it exists, else 32 random bytes
/// written with mode 0600 (create-new, so two starts cannot race to
/// different keys).
fn signing_key(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => return Ok(key),
        Ok(_) => {
            return Err(io(std::io::Error::other(
                "the signing key is shorter than 32 bytes; remove it to make a new one",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let key = random_hex(32).into_bytes();
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(&key).and_then(|()| f.sync_all()).map_err(io)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn plane(dir: &Path) -> DataPlane {
        DataPlane::open_dir(&DataConfig::default(), dir, 1 << 20).unwrap()
    }

    #[test]
    fn the_signing_key_survives_a_restart_and_is_private() {
        let t = tempfile::tempdir().unwrap();
        let a = plane(t.path());
        let minted = a.mint(None).unwrap();
        drop(a);
        let b = plane(t.path());
        let claims = sparegrid_transfer::token::decode(
            &std::fs::read(t.path().join("signing.key")).unwrap(),
            &minted.token,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(claims.id, minted.id);
        assert_eq!(claims.direction, Direction::Upload);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join("signing.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(b.mint(Some(&minted.id)).is_ok());
    }

    #[test]
    fn minted_ids_are_new_and_remints_only_for_our_uploads() {
        let t = tempfile::tempdir().unwrap();
        let p = plane(t.path());
        let (a, b) = (p.mint(None).unwrap(), p.mint(None).unwrap());
        assert_ne!(a.id, b.id);
        assert!(a.id.starts_with(INPUT_PREFIX));
        assert_eq!(a.upload_url, format!("/v1/data/v1/files/{}", a.id));
        assert!(p.mint(Some("out-j-1-0-1")).is_err());
        assert!(p.mint(Some("in-../x")).is_err());
        p.publish(&a.id, "test".into(), b"done\n").unwrap();
        assert!(p.mint(Some(&a.id)).is_err(), "complete: no new token");
    }

    #[test]
    fn publish_makes_a_verified_file_once() {
        let t = tempfile::tempdir().unwrap();
        let p = plane(t.path());
        assert!(p.publish("out-j-1-0-1", "x".into(), b"hello").unwrap());
        assert!(!p.publish("out-j-1-0-1", "x".into(), b"other").unwrap());
        let c = p.transfer().store().open_complete("out-j-1-0-1").unwrap();
        assert_eq!(c.size, 5);
        assert_eq!(c.digest, blake3::hash(b"hello").to_hex().to_string());
        assert!(p.remove("out-j-1-0-1").unwrap());
        assert!(p.transfer().store().open_complete("out-j-1-0-1").is_err());
    }
}
