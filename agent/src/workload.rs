//! Workload files: what a grid VM boots and carries. One TOML file per
//! workload in `workloads/` (see `workloads/default.toml` and
//! `workloads/README.md` for adding one):
//!
//! ```toml
//! name = "default"
//! image = "/var/lib/sparegrid/images/default"   # vmlinuz, initrd.img, manifest.json
//! vcpus = 1
//! memory_mib = 256
//! cmdline = "console=ttyS0 quiet panic=-1"
//! interpreters = ["sh", "awk"]
//! ```
//!
//! [`Workload::load`] parses the file (unknown keys are errors), validates
//! each field (errors name it, e.g. `workload.vcpus: must be at least 1`),
//! and checks the image against its `manifest.json` (written by
//! `workloads/build-image.sh`): the kernel and initrd exist with the sizes
//! and sha256 digests the manifest gives, and, when the manifest lists the
//! image's interpreters, every interpreter the workload promises is among
//! them. A relative `image` is relative to the workload file's directory.
//!
//! Hashing reads the whole kernel and initrd (~15 MiB): load a workload at
//! startup or on reload, not per VM.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A validated workload whose image matched its manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Short name: `[a-z0-9_-]`, used in VM names and logs.
    pub name: String,
    /// Directory holding `vmlinuz`, `initrd.img` and `manifest.json`.
    pub image: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Kernel command line of the grid VM.
    pub cmdline: String,
    /// Interpreters subtasks may use (`sh`, `awk`, `python3`, …).
    pub interpreters: Vec<String>,
    /// The image's identity: the sha256 of its `manifest.json`. When set,
    /// the image must match it, and an agent without the image fetches it
    /// from a peer that serves it ([`crate::images`]).
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The image's manifest (filled by [`Workload::load`]).
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

/// The parts of `manifest.json` the agent reads (other keys are ignored, so
/// the image format can grow).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Manifest {
    /// Image format version.
    pub version: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub kernel_version: String,
    /// The `sparegrid-guest` version in the image, if it carries the worker.
    #[serde(default)]
    pub guest_version: Option<String>,
    /// Interpreters found in the image, if the manifest lists them.
    #[serde(default)]
    pub interpreters: Option<Vec<String>>,
    pub files: BTreeMap<String, ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ManifestFile {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("workload.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("image manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("image file {path}: {message}")]
    Image { path: PathBuf, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> WorkloadError {
    WorkloadError::Invalid {
        field,
        message: message.into(),
    }
}

impl Workload {
    /// Reads, validates and checks the workload at `path` and its image.
    pub fn load(path: &Path) -> Result<Workload, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut w = Workload::parse(&text, base).map_err(|e| match e {
            WorkloadError::Parse { message, .. } => WorkloadError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        w.manifest = Some(w.check_image()?);
        Ok(w)
    }

    /// Parses and validates a workload's text; a relative `image` is taken
    /// relative to `base`. Does not look at the image.
    pub fn parse(text: &str, base: &Path) -> Result<Workload, WorkloadError> {
        let mut w: Workload = toml::from_str(text).map_err(|e| WorkloadError::Parse {
            path: PathBuf::from("<workload>"),
            message: e.to_string(),
        })?;
        if w.image.is_relative() && !w.image.as_os_str().is_empty() {
            w.image = base.join(&w.image);
        }
        w.validate()?;
        Ok(w)
    }

    pub fn validate(&self) -> Result<(), WorkloadError> {
        if self.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if let Some(c) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(invalid(
                "name",
                format!("{:?} has {c:?}; use a-z, 0-9, - and _", self.name),
            ));
        }
        if self.image.as_os_str().is_empty() {
            return Err(invalid("image", "must name the image directory"));
        }
        if self.vcpus == 0 {
            return Err(invalid("vcpus", "must be at least 1"));
        }
        if self.vcpus > 256 {
            return Err(invalid(
                "vcpus",
                format!("must be at most 256, got {}", self.vcpus),
            ));
        }
        if self.memory_mib < 32 {
            return Err(invalid(
                "memory_mib",
                format!("must be at least 32, got {}", self.memory_mib),
            ));
        }
        if self.cmdline.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "cmdline",
                "must be one line without control characters",
            ));
        }
        if let Some(d) = &self.image_digest {
            if !sparegrid_proto::images::is_image_digest(d) {
                return Err(invalid(
                    "image_digest",
                    format!("{d:?} is not a sha256 in lowercase hex"),
                ));
            }
        }
        if self.interpreters.is_empty() {
            return Err(invalid(
                "interpreters",
                "must list at least one (e.g. \"sh\")",
            ));
        }
        for (i, name) in self.interpreters.iter().enumerate() {
            if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
                return Err(invalid(
                    "interpreters",
                    format!("{name:?} is not a command name"),
                ));
            }
            if self.interpreters[..i].contains(name) {
                return Err(invalid("interpreters", format!("{name:?} is listed twice")));
            }
        }
        Ok(())
    }

    pub fn kernel(&self) -> PathBuf {
        self.image.join("vmlinuz")
    }

    pub fn initrd(&self) -> PathBuf {
        self.image.join("initrd.img")
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.image.join("manifest.json")
    }

    /// Reads the image's manifest and checks the kernel and initrd against
    /// it, and the workload's interpreters against the image's.
    pub fn check_image(&self) -> Result<Manifest, WorkloadError> {
        let path = self.manifest_path();
        let bad = |message: String| WorkloadError::Manifest {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| WorkloadError::Read {
            path: path.clone(),
            source,
        })?;
        if let Some(want) = &self.image_digest {
            let got = format!("{:x}", Sha256::digest(text.as_bytes()));
            if &got != want {
                return Err(bad(format!(
                    "sha256 {got} is not the workload's image_digest {want}"
                )));
            }
        }
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for file in ["vmlinuz", "initrd.img"] {
            let want = m
                .files
                .get(file)
                .ok_or_else(|| bad(format!("files.{file} is missing")))?;
            let p = self.image.join(file);
            let (size, digest) = sha256_file(&p)?;
            if size != want.size {
                return Err(WorkloadError::Image {
                    path: p,
                    message: format!("{size} bytes, the manifest says {}", want.size),
                });
            }
            if !digest.eq_ignore_ascii_case(&want.sha256) {
                return Err(WorkloadError::Image {
                    path: p,
                    message: format!("sha256 {digest}, the manifest says {}", want.sha256),
                });
            }
        }
        if let Some(have) = &m.interpreters {
            if let Some(missing) = self.interpreters.iter().find(|i| !have.contains(i)) {
                return Err(invalid(
                    "interpreters",
                    format!(
                        "{missing:?} is not in the image {} (it has {})",
                        self.image.display(),
                        have.join(", ")
                    ),
                ));
            }
        }
        Ok(m)
    }
}

/// Size and lowercase hex sha256 of a file.
pub fn sha256_file(p: &Path) -> Result<(u64, String), WorkloadError> {
    let err = |source| WorkloadError::Read {
        path: p.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(p).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, format!("{:x}", h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = r#"
name = "default"
image = "img"
vcpus = 1
memory_mib = 256
cmdline = "console=ttyS0 quiet panic=-1"
interpreters = ["sh", "awk"]
"#;

    fn hex(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    /// A workload file next to an image directory `img` with a manifest
    /// matching the files (`interpreters` in the manifest when given).
    fn fixture(workload: &str, interpreters: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("img");
        std::fs::create_dir_all(&img).unwrap();
        let (k, i) = (b"kernel bytes".as_slice(), b"initrd bytes!".as_slice());
        std::fs::write(img.join("vmlinuz"), k).unwrap();
        std::fs::write(img.join("initrd.img"), i).unwrap();
        let interp = interpreters
            .map(|s| format!("\"interpreters\": {s},"))
            .unwrap_or_default();
        let manifest = format!(
            r#"{{"version": 1, "name": "img", "kernel_version": "6.1", "guest_version": "0.1.0",
               "future_key": true, {interp}
               "files": {{"vmlinuz": {{"sha256": "{}", "size": {}}},
                          "initrd.img": {{"sha256": "{}", "size": {}}}}}}}"#,
            hex(k),
            k.len(),
            hex(i),
            i.len()
        );
        std::fs::write(img.join("manifest.json"), manifest).unwrap();
        let p = t.path().join("w.toml");
        std::fs::write(&p, workload).unwrap();
        (t, p)
    }

    #[test]
    fn loads_a_workload_and_checks_its_image() {
        let (t, p) = fixture(DEFAULT, Some(r#"["sh", "awk"]"#));
        let w = Workload::load(&p).unwrap();
        assert_eq!(w.name, "default");
        assert_eq!(w.image, t.path().join("img"));
        assert_eq!(w.kernel(), t.path().join("img/vmlinuz"));
        assert_eq!((w.vcpus, w.memory_mib), (1, 256));
        assert_eq!(w.interpreters, vec!["sh", "awk"]);
        let m = w.manifest.unwrap();
        assert_eq!(m.guest_version.as_deref(), Some("0.1.0"));
        assert_eq!(m.files["initrd.img"].size, 13);
    }

    #[test]
    fn the_repository_default_workload_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/default.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let w = Workload::parse(&text, p.parent().unwrap()).unwrap();
        assert_eq!(w.name, "default");
        assert_eq!(w.interpreters, vec!["sh", "awk"]);
        assert_eq!(w.image, Path::new("/var/lib/sparegrid/images/default"));
    }

    /// The image `make image` built (make test sets SPAREGRID_IMAGE_DIR):
    /// the loader and build-image.sh agree on the manifest.
    #[test]
    fn the_built_image_loads_when_there_is_one() {
        let Some(dir) = std::env::var_os("SPAREGRID_IMAGE_DIR") else {
            eprintln!("SPAREGRID_IMAGE_DIR not set: skipped");
            return;
        };
        let t = tempfile::tempdir().unwrap();
        let text = DEFAULT.replace("\"img\"", &format!("{:?}", Path::new(&dir)));
        let p = t.path().join("default.toml");
        std::fs::write(&p, text).unwrap();
        let w = Workload::load(&p).unwrap();
        let m = w.manifest.unwrap();
        assert!(
            m.guest_version.is_some(),
            "the image carries no worker: {m:?}"
        );
        let have = m.interpreters.unwrap_or_default();
        for i in ["sh", "awk"] {
            assert!(have.iter().any(|h| h == i), "{i} missing from {have:?}");
        }
    }

    fn field_error(text: &str) -> String {
        Workload::parse(text, Path::new("/"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                "vcpus = 1",
                "vcpus = 0",
                "workload.vcpus: must be at least 1",
            ),
            (
                "memory_mib = 256",
                "memory_mib = 8",
                "workload.memory_mib: must be at least 32",
            ),
            (
                "name = \"default\"",
                "name = \"\"",
                "workload.name: must not be empty",
            ),
            (
                "name = \"default\"",
                "name = \"Big Name\"",
                "workload.name:",
            ),
            ("image = \"img\"", "image = \"\"", "workload.image:"),
            (
                "interpreters = [\"sh\", \"awk\"]",
                "interpreters = []",
                "workload.interpreters: must list",
            ),
            (
                "interpreters = [\"sh\", \"awk\"]",
                "interpreters = [\"sh\", \"sh\"]",
                "listed twice",
            ),
            (
                "interpreters = [\"sh\", \"awk\"]",
                "interpreters = [\"/bin/sh\"]",
                "not a command name",
            ),
            (
                "cmdline = \"console=ttyS0 quiet panic=-1\"",
                "cmdline = \"a\\nb\"",
                "workload.cmdline:",
            ),
        ];
        for (from, to, want) in cases {
            let text = DEFAULT.replace(from, to);
            assert_ne!(text, DEFAULT, "fixture did not change for {to}");
            let e = field_error(&text);
            assert!(e.contains(want), "{to}: got {e}");
        }
    }

    #[test]
    fn unknown_keys_and_missing_fields_are_errors() {
        let e = field_error(&format!("{DEFAULT}\nvcpu = 2\n"));
        assert!(e.contains("unknown field `vcpu`"), "{e}");
        let e = field_error(&DEFAULT.replace("vcpus = 1\n", ""));
        assert!(e.contains("missing field `vcpus`"), "{e}");
    }

    #[test]
    fn the_agent_takes_its_vm_template_from_the_vm_workload_key() {
        let (t, p) = fixture(
            &DEFAULT
                .replace("vcpus = 1", "vcpus = 2")
                .replace("memory_mib = 256", "memory_mib = 384"),
            None,
        );
        let mut cfg = crate::config::Config::default();
        crate::daemon::apply_workload(&mut cfg).unwrap();
        assert_eq!(
            cfg.vm,
            crate::config::Config::default().vm,
            "no workload: unchanged"
        );
        cfg.vm.workload = p.clone();
        crate::daemon::apply_workload(&mut cfg).unwrap();
        assert_eq!(cfg.vm.kernel, t.path().join("img/vmlinuz"));
        assert_eq!(cfg.vm.initrd, t.path().join("img/initrd.img"));
        assert_eq!((cfg.vm.vcpus, cfg.vm.memory_mib), (2, 384));
        assert_eq!(cfg.vm.cmdline, "console=ttyS0 quiet panic=-1");
        // A tampered image stops the start, naming the file.
        std::fs::write(t.path().join("img/initrd.img"), b"other bytes!!").unwrap();
        let e = crate::daemon::apply_workload(&mut cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("initrd.img"), "{e}");
    }

    #[test]
    fn a_changed_image_file_does_not_match_the_manifest() {
        let (t, p) = fixture(DEFAULT, None);
        std::fs::write(t.path().join("img/initrd.img"), b"initrd bytes?").unwrap();
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(e.contains("initrd.img") && e.contains("sha256"), "{e}");
        std::fs::write(t.path().join("img/vmlinuz"), b"short").unwrap();
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(e.contains("vmlinuz") && e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn an_image_digest_must_be_a_sha256_and_match_the_manifest() {
        let (t, p) = fixture(DEFAULT, None);
        let manifest = std::fs::read(t.path().join("img/manifest.json")).unwrap();
        let good = format!("{DEFAULT}image_digest = \"{}\"\n", hex(&manifest));
        std::fs::write(&p, &good).unwrap();
        let w = Workload::load(&p).unwrap();
        assert_eq!(w.image_digest.as_deref(), Some(hex(&manifest).as_str()));
        let other = format!("{DEFAULT}image_digest = \"{}\"\n", "0".repeat(64));
        std::fs::write(&p, &other).unwrap();
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("image_digest") && e.contains("manifest.json"),
            "{e}"
        );
        assert!(
            field_error(&format!("{DEFAULT}image_digest = \"ABC\"\n"))
                .contains("workload.image_digest"),
            "not a sha256"
        );
    }

    #[test]
    fn a_missing_or_broken_manifest_is_an_error() {
        let (t, p) = fixture(DEFAULT, None);
        std::fs::write(t.path().join("img/manifest.json"), b"{\"version\": 1}").unwrap();
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("files"), "{e}");
        std::fs::remove_file(t.path().join("img/manifest.json")).unwrap();
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("manifest.json"),
            "{e}"
        );
    }

    #[test]
    fn interpreters_must_be_in_the_image_when_the_manifest_lists_them() {
        let text = DEFAULT.replace("[\"sh\", \"awk\"]", "[\"sh\", \"python3\"]");
        let (_t, p) = fixture(&text, Some(r#"["sh", "awk"]"#));
        let e = Workload::load(&p).unwrap_err().to_string();
        assert!(e.starts_with("workload.interpreters: \"python3\""), "{e}");
        // Without the list in the manifest, the workload is believed.
        let (_t, p) = fixture(&text, None);
        assert!(Workload::load(&p).is_ok());
    }
}
