//! The guest end of the channel: where it is and how to open it.
//!
//! Three kinds of [`PortSpec`]:
//! - **auto** (the default inside a VM): scan `<sysfs>/class/virtio-ports/*/name`
//!   for [`PORT_NAME`](sparegrid_proto::guest::PORT_NAME) and open
//!   `<dev>/<vportNpM>` read+write. The roots are injected for tests.
//! - **device**: open a given character device.
//! - **unix**: connect to a unix socket (host-side tests play the host there).
//!
//! A virtio-serial port behaves unlike a socket: `read` returns 0 while no
//! host process holds the socket on the host side, and `write` blocks until
//! one does. The worker's read loop ([`crate::worker`]) treats that EOF as
//! "host gone for now" and polls; on a unix socket EOF means the connection
//! is over and it reconnects.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Where the worker's channel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// Find the port named `name` under `sysfs_root`, open it under `dev_root`.
    Auto {
        sysfs_root: PathBuf,
        dev_root: PathBuf,
        name: String,
    },
    /// A character device opened read+write.
    Device(PathBuf),
    /// A unix socket to connect to.
    Unix(PathBuf),
}

impl PortSpec {
    /// Parses `--port`: `unix:/path` or a device path.
    pub fn parse(s: &str) -> Result<PortSpec, PortError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(PortError::BadSpec(s.to_string()));
            }
            return Ok(PortSpec::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(PortSpec::Device(PathBuf::from(s)));
        }
        Err(PortError::BadSpec(s.to_string()))
    }

    /// Whether EOF ends the connection (socket) or only means "no host
    /// right now" (virtio-serial device).
    pub fn is_socket(&self) -> bool {
        matches!(self, PortSpec::Unix(_))
    }

    /// Opens the channel once; callers retry on error.
    pub fn open(&self) -> Result<Conn, PortError> {
        match self {
            PortSpec::Auto {
                sysfs_root,
                dev_root,
                name,
            } => {
                let dev = find_port(sysfs_root, name)?;
                open_device(&dev_root.join(dev))
            }
            PortSpec::Device(p) => open_device(p),
            PortSpec::Unix(p) => {
                UnixStream::connect(p)
                    .map(Conn::Unix)
                    .map_err(|source| PortError::Connect {
                        path: p.clone(),
                        source,
                    })
            }
        }
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSpec::Auto {
                sysfs_root, name, ..
            } => write!(
                f,
                "virtio port {name} (under {})",
                sysfs_root.join("class/virtio-ports").display()
            ),
            PortSpec::Device(p) => write!(f, "{}", p.display()),
            PortSpec::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("--port: `{0}` is neither unix:/path nor a /dev path")]
    BadSpec(String),
    #[error("no virtio port named {name} in {dir}")]
    NotFound { name: String, dir: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
}

/// The device name (`vportNpM`) of the virtio port called `name`.
pub fn find_port(sysfs_root: &Path, name: &str) -> Result<String, PortError> {
    let dir = sysfs_root.join("class/virtio-ports");
    let not_found = || PortError::NotFound {
        name: name.to_string(),
        dir: dir.clone(),
    };
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|_| not_found())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("name"))
                .map(|n| n.trim_end() == name)
                .unwrap_or(false)
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    // Deterministic if (wrongly) two ports carry the name.
    found.sort();
    found.into_iter().next().ok_or_else(not_found)
}

fn open_device(path: &Path) -> Result<Conn, PortError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(Conn::Device)
        .map_err(|source| PortError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// An open channel. Shared by the read loop and the writer thread (`&File`
/// and `&UnixStream` read and write without `&mut`).
#[derive(Debug)]
pub enum Conn {
    Device(File),
    Unix(UnixStream),
}

impl Conn {
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Device(f) => (&*f).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }

    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Device(f) => (&*f).write_all(buf),
            Conn::Unix(s) => (&*s).write_all(buf),
        }
    }

    /// Unblocks a writer stuck on a dead socket (no-op for a device).
    pub fn shutdown(&self) {
        if let Conn::Unix(s) = self {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(root: &Path, dev: &str, name: &str) {
        let d = root.join("class/virtio-ports").join(dev);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
    }

    #[test]
    fn finds_the_port_by_name_among_others() {
        let t = tempfile::tempdir().unwrap();
        port(t.path(), "vport0p0", "org.qemu.guest_agent.0");
        port(t.path(), "vport1p2", "org.sparegrid.guest.0");
        // A port without a name file (unnamed console port).
        std::fs::create_dir_all(t.path().join("class/virtio-ports/vport1p0")).unwrap();
        assert_eq!(
            find_port(t.path(), "org.sparegrid.guest.0").unwrap(),
            "vport1p2"
        );
        assert!(matches!(
            find_port(t.path(), "org.other.0"),
            Err(PortError::NotFound { .. })
        ));
    }

    #[test]
    fn no_virtio_ports_directory_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        let e = find_port(t.path(), "x").unwrap_err();
        assert!(e.to_string().contains("class/virtio-ports"), "{e}");
    }

    #[test]
    fn auto_opens_the_device_under_the_dev_root() {
        let t = tempfile::tempdir().unwrap();
        port(t.path(), "vport3p1", "org.sparegrid.guest.0");
        let dev = t.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vport3p1"), b"").unwrap();
        let spec = PortSpec::Auto {
            sysfs_root: t.path().to_path_buf(),
            dev_root: dev.clone(),
            name: "org.sparegrid.guest.0".into(),
        };
        let conn = spec.open().unwrap();
        conn.write_all(b"hi").unwrap();
        assert_eq!(std::fs::read(dev.join("vport3p1")).unwrap(), b"hi");
        assert!(!spec.is_socket());
    }

    #[test]
    fn parses_port_specs() {
        assert_eq!(
            PortSpec::parse("unix:/run/x.sock").unwrap(),
            PortSpec::Unix("/run/x.sock".into())
        );
        assert_eq!(
            PortSpec::parse("/dev/vport1p1").unwrap(),
            PortSpec::Device("/dev/vport1p1".into())
        );
        assert!(PortSpec::parse("unix:").is_err());
        assert!(PortSpec::parse("tcp:1.2.3.4").is_err());
    }
}
