//! Unit tests of the agent's image catalog against a real transfer
//! endpoint (the `sparegrid-transfer` router on a loopback port, in its own
//! thread): a whole image is fetched and renamed into place; a kernel that
//! does not match the manifest, or a manifest that does not match the
//! digest, is rejected with nothing visible; a digest that is not a sha256
//! (traversal attempts) is refused before any request.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};
use sparegrid_transfer::config::TransferConfig;
use sparegrid_transfer::TransferState;

use super::*;

const KEY: &[u8] = b"image-catalog-unit-test-key";

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// Writes an image into `dir` whose manifest lists `kernel_in_manifest`
/// while the file on disk is `kernel_on_disk`; returns the image digest.
fn write_image(dir: &Path, kernel_on_disk: &[u8], kernel_in_manifest: &[u8]) -> String {
    fs::create_dir_all(dir).unwrap();
    let initrd: Vec<u8> = (0..50_000u32).map(|i| ((i * 7) >> 3) as u8).collect();
    fs::write(dir.join("vmlinuz"), kernel_on_disk).unwrap();
    fs::write(dir.join("initrd.img"), &initrd).unwrap();
    let manifest = format!(
        "{{\"version\":1,\"name\":\"unit\",\"interpreters\":[\"sh\"],\"files\":{{\
         \"vmlinuz\":{{\"sha256\":\"{}\",\"size\":{}}},\
         \"initrd.img\":{{\"sha256\":\"{}\",\"size\":{}}}}}}}\n",
        sha(kernel_in_manifest),
        kernel_in_manifest.len(),
        sha(&initrd),
        initrd.len()
    );
    fs::write(dir.join("manifest.json"), &manifest).unwrap();
    sha(manifest.as_bytes())
}

fn kernel(seed: u32) -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// A real transfer endpoint serving the image in `image` (published with
/// [`publish`]); returns its base URL and the digest. The server thread
/// lives as long as the test process.
fn serve(data: &Path, image: &Path) -> (String, String) {
    serve_with_key(data, image, KEY)
}

/// [`serve`] with tokens checked against `key`.
fn serve_with_key(data: &Path, image: &Path, key: &[u8]) -> (String, String) {
    let config = TransferConfig {
        enabled: true,
        checkpoint_bytes: 64 * 1024,
        ..TransferConfig::default()
    };
    let state = TransferState::new(&config, data, key).unwrap();
    let digest = publish(&state, image).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            let _ = sparegrid_transfer::serve_on(listener, state, std::future::pending()).await;
        });
    });
    let port = rx.recv().unwrap();
    (format!("http://127.0.0.1:{port}"), digest)
}

fn setup(controller: &ControllerSection) -> FetchSetup<'_> {
    FetchSetup {
        controller,
        token_key: KEY,
        checkpoint_bytes: 64 * 1024,
    }
}

/// A peer source at `base` (the fetching agent signs the tokens).
fn peer(host: &str, base: &str) -> ImageSource {
    ImageSource {
        host: host.into(),
        transfer_url: base.into(),
        download_tokens: Vec::new(),
    }
}

/// Entries of `parent` other than `keep` (staging leftovers).
fn leftovers(parent: &Path, keep: &str) -> Vec<String> {
    fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != keep)
        .collect()
}

#[test]
fn a_whole_image_is_fetched_checked_and_renamed_into_place() {
    let t = tempfile::tempdir().unwrap();
    let k = kernel(1);
    write_image(&t.path().join("src"), &k, &k);
    let (base, digest) = serve(&t.path().join("data"), &t.path().join("src"));
    let cache = t.path().join("cache");
    let dest = cache.join("img");
    let ctl = ControllerSection::default();
    fetch_from(&setup(&ctl), &digest, &peer("peer-a", &base), &dest).unwrap();
    for f in IMAGE_FILES {
        assert_eq!(
            fs::read(dest.join(f)).unwrap(),
            fs::read(t.path().join("src").join(f)).unwrap(),
            "{f} differs from the source"
        );
    }
    // Only the image's files: no journals, no staging directory.
    let mut names = leftovers(&dest, "");
    names.sort();
    assert_eq!(names, ["initrd.img", "manifest.json", "vmlinuz"]);
    assert!(leftovers(&cache, "img").is_empty());
    assert_eq!(image_digest(&dest).unwrap(), digest);
}

#[test]
fn a_kernel_that_does_not_match_the_manifest_is_rejected_and_nothing_is_visible() {
    let t = tempfile::tempdir().unwrap();
    // The source's kernel is not the one its manifest names.
    write_image(&t.path().join("src"), &kernel(2), &kernel(3));
    let (base, digest) = serve(&t.path().join("data"), &t.path().join("src"));
    let cache = t.path().join("cache");
    let dest = cache.join("img");
    let ctl = ControllerSection::default();
    let err = fetch_from(&setup(&ctl), &digest, &peer("peer-a", &base), &dest).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, ImageError::Source { file, host, .. } if file == "vmlinuz" && host == "peer-a"),
        "{msg}"
    );
    assert!(
        msg.contains(&sha(&kernel(3))),
        "names the manifest's sha256: {msg}"
    );
    assert!(!dest.exists(), "a corrupt image became visible");
    assert!(leftovers(&cache, "img").is_empty(), "staging left behind");
}

#[test]
fn a_manifest_that_is_not_the_digest_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let k = kernel(4);
    write_image(&t.path().join("src"), &k, &k);
    let (base, served) = serve(&t.path().join("data"), &t.path().join("src"));
    // Ask for the served ids under another digest: the transfer ids use
    // the first 32 hex digits, so keep those and change the rest.
    let other = format!("{}{}", &served[..32], "0".repeat(32));
    assert_ne!(other, served);
    let dest = t.path().join("cache").join("img");
    let ctl = ControllerSection::default();
    let err = fetch_from(&setup(&ctl), &other, &peer("peer-a", &base), &dest).unwrap_err();
    assert!(
        err.to_string().contains("is not the image's digest"),
        "{err}"
    );
    assert!(!dest.exists());
}

#[test]
fn digests_that_are_not_a_sha256_are_refused_before_any_request() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("img");
    // No controller is configured: a request would fail differently.
    let ctl = ControllerSection::default();
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "%2e%2e%2fetc",
        &"A".repeat(64),
        &format!("{}/..", "a".repeat(61)),
        "",
    ] {
        let err = fetch(&setup(&ctl), bad, &dest).unwrap_err();
        assert!(err.to_string().contains("not a sha256"), "{bad:?}: {err}");
    }
    assert!(!dest.exists());
    assert!(leftovers(t.path(), "").is_empty());
}

#[test]
fn the_controller_is_reached_by_a_path_under_its_url_with_the_tokens_it_signed() {
    let t = tempfile::tempdir().unwrap();
    let k = kernel(4);
    write_image(&t.path().join("src"), &k, &k);
    // The "controller": its own key, which the agent does not have.
    const CTL_KEY: &[u8] = b"the-controllers-own-data-signing-key";
    let (base, digest) = serve_with_key(&t.path().join("data"), &t.path().join("src"), CTL_KEY);
    let ctl = ControllerSection {
        url: base,
        ..ControllerSection::default()
    };
    let tokens: Vec<String> = IMAGE_FILES
        .iter()
        .map(|f| {
            sign(
                CTL_KEY,
                &image_file_id(&digest, f),
                Direction::Download,
                SystemTime::now() + TOKEN_TTL,
            )
            .unwrap()
        })
        .collect();
    // The endpoint is at the root of this "controller" URL.
    let root = ImageSource {
        host: sparegrid_proto::images::CONTROLLER_SOURCE.into(),
        transfer_url: "/".into(),
        download_tokens: Vec::new(),
    };
    // Without its tokens the agent's own fail (another key).
    let dest = t.path().join("cache/img");
    let err = fetch_from(&setup(&ctl), &digest, &root, &dest).unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");
    assert!(!dest.exists());
    // With them, from the path under the controller URL.
    let with = ImageSource {
        download_tokens: tokens,
        ..root
    };
    fetch_from(&setup(&ctl), &digest, &with, &dest).unwrap();
    assert_eq!(image_digest(&dest).unwrap(), digest);
    assert_eq!(fs::read(dest.join("vmlinuz")).unwrap(), k);
}
