//! Grid VM images the controller serves (`[data] images`): each directory
//! is checked against its own `manifest.json` (every listed file's size
//! and sha256) and published on the `/v1/data` transfer endpoint under
//! [`image_file_id`], as agents publish theirs, so
//! `GET /v1/agents/images/{digest}` can list the controller as a source
//! (with download tokens it signs, since agents cannot sign for its key).
//! The image's digest is the sha256 of its `manifest.json`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sparegrid_proto::images::{image_file_id, IMAGE_FILES};

use sparegrid_transfer::store::StoreError;

use super::DataPlane;

/// Why an image directory cannot be served; names the entry and the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("data.images[{index}] {}: {source}", path.display())]
    Read {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data.images[{index}] {}: {message}", path.display())]
    Invalid {
        index: usize,
        path: PathBuf,
        message: String,
    },
    #[error("data.images[{index}]: publishing {id}: {source}")]
    Publish {
        index: usize,
        id: String,
        #[source]
        source: StoreError,
    },
}

/// The parts of `manifest.json` checked here.
#[derive(Deserialize)]
struct Manifest {
    files: BTreeMap<String, ManifestFile>,
}

#[derive(Deserialize)]
struct ManifestFile {
    sha256: String,
    size: u64,
}

/// Size and sha256 (lowercase hex) of `path`, streamed.
fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, format!("{:x}", h.finalize())))
}

/// Checks the image in `dir` (entry `index` of `data.images`) against its
/// manifest; returns its digest.
pub fn check(index: usize, dir: &Path) -> Result<String, ImageError> {
    let read = |path: PathBuf| {
        move |source| ImageError::Read {
            index,
            path,
            source,
        }
    };
    let invalid = |path: &Path, message: String| ImageError::Invalid {
        index,
        path: path.to_owned(),
        message,
    };
    let mpath = dir.join("manifest.json");
    let text = std::fs::read(&mpath).map_err(read(mpath.clone()))?;
    let digest = format!("{:x}", Sha256::digest(&text));
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| invalid(&mpath, format!("not an image manifest: {e}")))?;
    for file in &IMAGE_FILES[1..] {
        let path = dir.join(file);
        let want = manifest
            .files
            .get(*file)
            .ok_or_else(|| invalid(&mpath, format!("files.{file} is missing")))?;
        let (size, sha) = sha256_file(&path).map_err(read(path.clone()))?;
        if size != want.size || !sha.eq_ignore_ascii_case(&want.sha256) {
            return Err(invalid(
                &path,
                format!(
                    "{size} bytes with sha256 {sha}; the manifest says {} bytes with sha256 {}",
                    want.size, want.sha256
                ),
            ));
        }
    }
    Ok(digest)
}

/// Checks and publishes every `data.images` directory (files published
/// before are kept); returns their digests. Blocking.
pub fn publish_all(d: &DataPlane, dirs: &[PathBuf]) -> Result<Vec<String>, ImageError> {
    let mut digests = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        let digest = check(index, dir)?;
        let store = d.transfer().store();
        for file in IMAGE_FILES {
            let id = image_file_id(&digest, file);
            let path = dir.join(file);
            if store.is_complete(&id).unwrap_or(false) {
                continue;
            }
            let _ = store.remove(&id);
            store
                .import(&id, &path)
                .map_err(|source| ImageError::Publish {
                    index,
                    id: id.clone(),
                    source,
                })?;
        }
        tracing::info!(%digest, "serving image {} to agents", dir.display());
        digests.push(digest);
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image in `dir` whose manifest lists `listed` as the kernel.
    fn image(dir: &Path, kernel: &[u8], listed: &[u8]) -> String {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), kernel).unwrap();
        std::fs::write(dir.join("initrd.img"), b"initrd").unwrap();
        let sha = |b: &[u8]| format!("{:x}", Sha256::digest(b));
        let m = format!(
            "{{\"version\":1,\"files\":{{\"vmlinuz\":{{\"sha256\":\"{}\",\"size\":{}}},\
             \"initrd.img\":{{\"sha256\":\"{}\",\"size\":6}}}}}}",
            sha(listed),
            listed.len(),
            sha(b"initrd")
        );
        std::fs::write(dir.join("manifest.json"), &m).unwrap();
        sha(m.as_bytes())
    }

    #[test]
    fn an_image_is_checked_against_its_manifest_and_named_by_its_digest() {
        let t = tempfile::tempdir().unwrap();
        let digest = image(t.path(), b"kernel", b"kernel");
        assert_eq!(check(0, t.path()).unwrap(), digest);
        image(t.path(), b"kernel", b"other!");
        let e = check(2, t.path()).unwrap_err().to_string();
        assert!(e.contains("data.images[2]") && e.contains("vmlinuz"), "{e}");
        std::fs::remove_file(t.path().join("initrd.img")).unwrap();
        image(t.path(), b"kernel", b"kernel");
        std::fs::remove_file(t.path().join("initrd.img")).unwrap();
        let e = check(0, t.path()).unwrap_err().to_string();
        assert!(e.contains("initrd.img"), "{e}");
        std::fs::write(t.path().join("manifest.json"), b"{}").unwrap();
        let e = check(0, t.path()).unwrap_err().to_string();
        assert!(e.contains("manifest.json"), "{e}");
    }

    #[test]
    fn served_images_are_published_under_their_file_ids() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("img");
        let digest = image(&img, b"kernel", b"kernel");
        let config = super::super::DataConfig {
            images: vec![img.clone()],
            ..Default::default()
        };
        let d = DataPlane::open_dir(&config, &t.path().join("data"), 1 << 20).unwrap();
        assert!(d.serves_image(&digest));
        assert!(!d.serves_image(&"0".repeat(64)));
        for f in IMAGE_FILES {
            let id = image_file_id(&digest, f);
            let p = d.transfer().store().complete_path(&id).unwrap();
            assert_eq!(
                std::fs::read(p).unwrap(),
                std::fs::read(img.join(f)).unwrap()
            );
        }
        // Opening again keeps them (no second copy, no error).
        DataPlane::open_dir(&config, &t.path().join("data"), 1 << 20).unwrap();
    }
}
