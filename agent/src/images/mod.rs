//! The image catalog on the agent: grid VM images named by the sha256 of
//! their `manifest.json` ([`sparegrid_proto::images`]).
//!
//! - [`publish`]: an agent serves the image of its workload on its
//!   transfer endpoint (each file imported into the transfer store under
//!   [`image_file_id`], read-only for peers with a download token) and
//!   lists its digest in its registration.
//! - [`fetch`]: an agent whose workload names an `image_digest` it does not
//!   have asks the controller which hosts serve it
//!   (`GET /v1/agents/images/{digest}`), downloads the manifest from one
//!   (Range, resumable, its blake3 checked by the transfer client), checks
//!   it against the digest, then the kernel and initrd, each against the
//!   manifest's sha256 and size, into a staging directory next to the
//!   image directory, and only then renames it into place: a partial or
//!   corrupt image is never visible. A source that serves a bad file is
//!   skipped for the next one; when none is left the error names the file
//!   and both digests.
//!
//! The controller may serve an image too (`[data] images`): it is listed
//! after the peers, with a path for its transfer endpoint (resolved
//! against `[controller] url`) and download tokens it signed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sparegrid_proto::images::{
    image_file_id, is_image_digest, ImageSource, ImageSources, IMAGE_FILES,
};
use sparegrid_transfer::token::{sign, Direction};
use sparegrid_transfer::TransferState;

use crate::config::{Config, ControllerSection};
use crate::grid::client::ControllerClient;
use crate::workload::{sha256_file, Manifest, Workload, WorkloadError};

/// How long a download token a fetching agent signs is valid.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Why an image could not be published or fetched; names the file, host
/// or digest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] WorkloadError),
    #[error("publishing {}: {message}", path.display())]
    Publish { path: PathBuf, message: String },
    #[error("image {digest}: asking the controller for sources: {message}")]
    Sources { digest: String, message: String },
    #[error("image {digest}: {file} from {host}: {message}")]
    Source {
        digest: String,
        host: String,
        file: String,
        message: String,
    },
    #[error("image {digest}: no source served it whole ({tried} tried); last: {last}")]
    Exhausted {
        digest: String,
        tried: usize,
        last: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The image's digest: the sha256 of its `manifest.json`.
pub fn image_digest(dir: &Path) -> Result<String, ImageError> {
    Ok(sha256_file(&dir.join("manifest.json"))?.1)
}

/// Serves the image in `dir` on this agent's transfer endpoint (files
/// already published are kept). Returns its digest.
pub fn publish(transfer: &TransferState, dir: &Path) -> Result<String, ImageError> {
    let digest = image_digest(dir)?;
    let store = transfer.store();
    for file in IMAGE_FILES {
        let id = image_file_id(&digest, file);
        let path = dir.join(file);
        if store.is_complete(&id).unwrap_or(false) {
            continue;
        }
        let _ = store.remove(&id);
        store.import(&id, &path).map_err(|e| ImageError::Publish {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    tracing::info!(digest = %digest, "serving image {} to peers", dir.display());
    Ok(digest)
}

/// Where to fetch from, and with what.
pub struct FetchSetup<'a> {
    pub controller: &'a ControllerSection,
    /// Signs download tokens (the agent token every agent shares).
    pub token_key: &'a [u8],
    pub checkpoint_bytes: u64,
}

/// Asks the controller which hosts serve image `digest`.
pub fn sources(setup: &FetchSetup<'_>, digest: &str) -> Result<ImageSources, ImageError> {
    let err = |message: String| ImageError::Sources {
        digest: digest.to_owned(),
        message,
    };
    let ctl = ControllerClient::new(setup.controller).map_err(|e| err(e.to_string()))?;
    ctl.get(&format!("/v1/agents/images/{digest}"))
        .map_err(|e| err(e.to_string()))
}

/// Fetches image `digest` into `dest` (which must not exist yet) from the
/// first source that serves it whole (see the module docs).
pub fn fetch(setup: &FetchSetup<'_>, digest: &str, dest: &Path) -> Result<(), ImageError> {
    if !is_image_digest(digest) {
        return Err(ImageError::Sources {
            digest: digest.to_owned(),
            message: "not a sha256 in lowercase hex".to_owned(),
        });
    }
    let list = sources(setup, digest)?;
    let mut last = String::from("no source listed");
    let tried = list.sources.len();
    for src in &list.sources {
        match fetch_from(setup, digest, src, dest) {
            Ok(()) => {
                tracing::info!(digest, from = %src.host, "image fetched into {}", dest.display());
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("{e}");
                last = e.to_string();
            }
        }
    }
    Err(ImageError::Exhausted {
        digest: digest.to_owned(),
        tried,
        last,
    })
}

/// One source: staging next to `dest`, every file checked, then renamed.
fn fetch_from(
    setup: &FetchSetup<'_>,
    digest: &str,
    src: &ImageSource,
    dest: &Path,
) -> Result<(), ImageError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_owned());
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = parent.join(format!(".{name}.fetch-{}", &digest[..16]));
    let result = fetch_files(setup, digest, src, &staging);
    match result {
        Ok(()) => {
            std::fs::rename(&staging, dest).map_err(io(dest))?;
            Ok(())
        }
        Err(e) => {
            // A bad file is thrown away, so the next source starts clean.
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn fetch_files(
    setup: &FetchSetup<'_>,
    digest: &str,
    src: &ImageSource,
    staging: &Path,
) -> Result<(), ImageError> {
    let host = src.host.as_str();
    // A path: the controller's endpoint, under this agent's controller URL.
    let base = if src.transfer_url.starts_with('/') {
        format!(
            "{}{}",
            setup.controller.url.trim_end_matches('/'),
            src.transfer_url
        )
    } else {
        src.transfer_url.clone()
    };
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let bad = |file: &str, message: String| ImageError::Source {
        digest: digest.to_owned(),
        host: host.to_owned(),
        file: file.to_owned(),
        message,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| bad("-", e.to_string()))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| bad("-", e.to_string()))?;
    let mut manifest: Option<Manifest> = None;
    for (i, file) in IMAGE_FILES.iter().copied().enumerate() {
        let id = image_file_id(digest, file);
        let token = match src.download_tokens.get(i) {
            Some(t) => t.clone(),
            None => sign(
                setup.token_key,
                &id,
                Direction::Download,
                SystemTime::now() + TOKEN_TTL,
            )
            .map_err(|e| bad(file, e.to_string()))?,
        };
        let url = format!(
            "{}{}/{id}",
            base.trim_end_matches('/'),
            sparegrid_transfer::FILES
        );
        let path = staging.join(file);
        rt.block_on(sparegrid_transfer::client::download(
            &client,
            &url,
            &token,
            &path,
            setup.checkpoint_bytes,
            Default::default(),
        ))
        .map_err(|e| bad(file, e.to_string()))?;
        let (size, sha) = sha256_file(&path)?;
        match &manifest {
            None => {
                if sha != digest {
                    return Err(bad(file, format!("sha256 {sha} is not the image's digest")));
                }
                let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                manifest = Some(
                    serde_json::from_str(&text)
                        .map_err(|e| bad(file, format!("not a manifest: {e}")))?,
                );
            }
            Some(m) => {
                let want = m
                    .files
                    .get(file)
                    .ok_or_else(|| bad(file, "the manifest does not list it".to_owned()))?;
                if size != want.size || !sha.eq_ignore_ascii_case(&want.sha256) {
                    return Err(bad(
                        file,
                        format!(
                            "{size} bytes with sha256 {sha}; the manifest says {} bytes with sha256 {}",
                            want.size, want.sha256
                        ),
                    ));
                }
            }
        }
    }
    // Only the image's files stay (the download journals go).
    for entry in std::fs::read_dir(staging).map_err(io(staging))? {
        let entry = entry.map_err(io(staging))?;
        let keep = IMAGE_FILES.iter().any(|f| entry.file_name() == *f);
        if !keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// How long an agent whose image is missing keeps asking for a source (a
/// peer that serves it may not have registered yet).
pub const FETCH_WAIT: Duration = Duration::from_secs(60);

/// The image directory of `[vm] workload` (after
/// [`crate::daemon::apply_workload`]: where its kernel is), when one is set
/// and has a manifest.
pub fn workload_image_dir(cfg: &Config) -> Option<PathBuf> {
    if cfg.vm.workload.as_os_str().is_empty() {
        return None;
    }
    let dir = cfg.vm.kernel.parent()?.to_path_buf();
    dir.join("manifest.json").is_file().then_some(dir)
}

/// The digests of the images this agent serves (for its registration):
/// its workload's, with `[transfer] enabled`.
pub fn served(cfg: &Config) -> Vec<String> {
    if !cfg.transfer.enabled {
        return Vec::new();
    }
    workload_image_dir(cfg)
        .and_then(|d| image_digest(&d).ok())
        .into_iter()
        .collect()
}

/// Before the workload is loaded: when it names an `image_digest` and its
/// image directory has no manifest, fetch the image from a peer (asking
/// the controller for sources for up to [`FETCH_WAIT`]).
pub fn fetch_workload_image(cfg: &Config) -> Result<(), crate::daemon::DaemonError> {
    let path = &cfg.vm.workload;
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: path.clone(),
        source,
    })?;
    let w = Workload::parse(&text, path.parent().unwrap_or(Path::new(".")))?;
    let Some(digest) = w.image_digest.as_deref() else {
        return Ok(());
    };
    if w.manifest_path().exists() {
        return Ok(());
    }
    if !cfg.controller.enabled() {
        return Err(ImageError::Sources {
            digest: digest.to_owned(),
            message: format!(
                "{} has no image and there is no controller to ask for one (controller.url)",
                w.image.display()
            ),
        }
        .into());
    }
    tracing::info!(
        digest,
        "workload {}: image {} missing; fetching it from a peer",
        w.name,
        w.image.display()
    );
    let setup = FetchSetup {
        controller: &cfg.controller,
        token_key: cfg.controller.token.as_bytes(),
        checkpoint_bytes: cfg.transfer.checkpoint_bytes,
    };
    let start = std::time::Instant::now();
    loop {
        match fetch(&setup, digest, &w.image) {
            Ok(()) => return Ok(()),
            // No source registered yet: ask again for a while.
            Err(ImageError::Sources { message, .. })
                if message.contains("404") && start.elapsed() < FETCH_WAIT =>
            {
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;
