//! The image catalog's wire types: grid VM images named by the sha256 of
//! their `manifest.json`, which agents publish on their transfer endpoints
//! and list in their [`Register`](crate::grid::Register) (`images`), and the
//! controller's answer to "who has this image?"
//! (`GET /v1/agents/images/{digest}`, agent token, MessagePack): the
//! peers that serve it, then the controller when it serves it too.

use serde::{Deserialize, Serialize};

/// The files of an image, in the order they are fetched (the manifest
/// first: it names the others' digests).
pub const IMAGE_FILES: [&str; 3] = ["manifest.json", "vmlinuz", "initrd.img"];

/// The transfer id under which a host serves `file` of image `digest`.
pub fn image_file_id(digest: &str, file: &str) -> String {
    let short: String = digest.chars().take(32).collect();
    let f = match file {
        "manifest.json" => "manifest",
        "vmlinuz" => "vmlinuz",
        _ => "initrd",
    };
    format!("img-{short}-{f}")
}

/// Whether `d` is a sha256 in lowercase hex.
pub fn is_image_digest(d: &str) -> bool {
    d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hosts that hold an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSources {
    pub digest: String,
    /// Live hosts holding it, least loaded first.
    pub sources: Vec<ImageSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSource {
    /// The host, or [`CONTROLLER_SOURCE`].
    pub host: String,
    /// Its transfer endpoint (`http://addr:port`), or for the controller a
    /// path (`/v1/data`) the agent resolves against its controller URL.
    pub transfer_url: String,
    /// Download tokens for the files, in [`IMAGE_FILES`] order, when the
    /// source's key is not the agent token (the controller signs its own);
    /// empty: the fetching agent signs them with the agent token.
    #[serde(default)]
    pub download_tokens: Vec<String>,
}

/// [`ImageSource::host`] of the controller serving an image itself
/// (`[data] images`), listed after the peers.
pub const CONTROLLER_SOURCE: &str = "controller";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_per_image_and_file_and_digests_are_checked() {
        let d = "ab".repeat(32);
        assert!(is_image_digest(&d));
        assert!(!is_image_digest(&d.to_uppercase()));
        assert!(!is_image_digest("abc"));
        assert_eq!(
            image_file_id(&d, "vmlinuz"),
            format!("img-{}-vmlinuz", &d[..32])
        );
        let ids: std::collections::BTreeSet<String> =
            IMAGE_FILES.iter().map(|f| image_file_id(&d, f)).collect();
        assert_eq!(ids.len(), 3);
    }
}
