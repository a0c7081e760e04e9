//! WireGuard keys: the 32-byte [`Key`] in `wg`'s base64 form, the host's
//! private key file (generated on first start, written 0600, refused when
//! anyone but the owner may read it) and public-key derivation.
//!
//! The file holds what `wg genkey` prints (base64 and a newline), so `wg
//! pubkey < file` and this module agree on the public key.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A key that could not be parsed, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a WireGuard key (32 bytes in base64, as `wg genkey` prints): {0}")]
    Format(String),
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A Curve25519 key (private or public), 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A fresh private key from the OS random source.
    pub fn generate() -> Result<Key, KeyError> {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).map_err(|e| KeyError::Format(format!("getrandom: {e}")))?;
        // Clamped as `wg genkey` does (x25519 clamps again on use).
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        Ok(Key(k))
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    pub fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    pub fn as_public(&self) -> PublicKey {
        PublicKey::from(self.0)
    }

    /// The first characters of the base64 form, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

impl FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Key, KeyError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::Format(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError::Format(format!("{} bytes, expected 32", b.len())))?;
        Ok(Key(arr))
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads the private key at `path`, or generates one and writes it there
/// (mode 0600, created exclusively) when the file does not exist. A file
/// that group or others may access is refused: the key would be exposed.
pub fn load_or_generate(path: &Path) -> Result<Key, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::File {
                    path: path.to_path_buf(),
                    message: format!(
                        "mode {mode:04o} lets others read the private key; chmod 600 it"
                    ),
                });
            }
            let text = fs::read_to_string(path).map_err(io)?;
            text.parse().map_err(|e: KeyError| KeyError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io)?;
            }
            let key = Key::generate()?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{key}").map_err(io)?;
            f.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), public_key = %key.public(), "generated tunnel key pair");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_stored_0600_and_reloads_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tunnel.key");
        let k1 = load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_generate(&path).unwrap();
        assert_eq!(k1, k2);
        assert_ne!(k1.public(), k1);
    }

    #[test]
    fn readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, format!("{}\n", Key::generate().unwrap())).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_generate(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let private = Key(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(private.public().0, public);
    }

    #[test]
    fn base64_round_trip_and_bad_input() {
        let k = Key::generate().unwrap();
        assert_eq!(k.to_string().parse::<Key>().unwrap(), k);
        assert!("abc".parse::<Key>().is_err());
        assert!(STANDARD.encode([0u8; 31]).parse::<Key>().is_err());
    }
}
