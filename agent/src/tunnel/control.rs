//! A line-based control channel on a unix socket, for the standalone
//! `sparegrid-tunnel` binary (the agent daemon has its HTTP API instead).
//!
//! One request per connection, one line: `stats` answers the endpoint's
//! [`TunnelStats`] as JSON; `reload` re-reads the config file and applies
//! its peer list live, answering `ok <added> <removed> <updated>` or
//! `error: <message>`. The socket is created 0600 (stats show keys and
//! endpoints; reload changes who may connect).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::endpoint::TunnelStats;

/// What the control channel can ask of its owner.
pub trait Controlled: Send + Sync + 'static {
    fn stats(&self) -> TunnelStats;
    /// Re-reads the peer list; a summary line or an error message.
    fn reload(&self) -> Result<String, String>;
}

/// The listening control socket; removed on drop.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(path: &Path, target: Arc<dyn Controlled>) -> std::io::Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tunnel-control".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => serve(conn, &*target),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => tracing::warn!(error = %e, "control accept"),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(conn: UnixStream, target: &dyn Controlled) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match line.trim() {
        "stats" => serde_json::to_string(&target.stats()).unwrap_or_else(|e| format!("error: {e}")),
        "reload" => match target.reload() {
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("error: {e}"),
        },
        other => format!("error: unknown command {other:?} (stats, reload)"),
    };
    let mut w = &conn;
    let _ = w.write_all(answer.as_bytes());
    let _ = w.write_all(b"\n");
}

/// Sends one command and returns the answer line.
pub fn request(path: &Path, command: &str) -> std::io::Result<String> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

/// A tunnel run from a config file: `reload` re-reads the file and applies
/// its peer list (the other fields need a restart, and a change to them is
/// reported as such).
pub struct FileTunnel {
    pub tunnel: super::Tunnel,
    pub path: PathBuf,
    pub loaded: std::sync::Mutex<super::TunnelConfig>,
}

impl FileTunnel {
    pub fn start(path: &Path) -> Result<FileTunnel, super::EndpointError> {
        let cfg = super::TunnelConfig::load(path)?;
        let tunnel = super::Tunnel::from_config(&cfg)?;
        Ok(FileTunnel {
            tunnel,
            path: path.to_path_buf(),
            loaded: std::sync::Mutex::new(cfg),
        })
    }
}

impl Controlled for FileTunnel {
    fn stats(&self) -> TunnelStats {
        self.tunnel.stats()
    }

    fn reload(&self) -> Result<String, String> {
        let cfg = super::TunnelConfig::load(&self.path).map_err(|e| e.to_string())?;
        let change = self
            .tunnel
            .update_peers(&cfg.peers)
            .map_err(|e| e.to_string())?;
        let mut loaded = self.loaded.lock().expect("config lock");
        let mut needs_restart = Vec::new();
        if cfg.listen_port != loaded.listen_port {
            needs_restart.push("listen_port");
        }
        if cfg.interface != loaded.interface || cfg.address != loaded.address {
            needs_restart.push("interface/address");
        }
        if cfg.mtu != loaded.mtu || cfg.offload != loaded.offload {
            needs_restart.push("mtu/offload");
        }
        if cfg.private_key_file != loaded.private_key_file {
            needs_restart.push("private_key_file");
        }
        *loaded = cfg;
        let mut line = format!(
            "added={} removed={} updated={}",
            change.added.len(),
            change.removed.len(),
            change.updated.len()
        );
        if !needs_restart.is_empty() {
            line.push_str(&format!(
                " (restart to apply: {})",
                needs_restart.join(", ")
            ));
        }
        tracing::info!("{line}");
        Ok(line)
    }
}

/// The stats as a `wg show`-like text.
pub fn render(stats: &TunnelStats) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "public key: {}", stats.public_key);
    let _ = writeln!(s, "listening port: {}", stats.listen_port);
    let _ = writeln!(
        s,
        "rejected handshakes: {}  unknown index: {}  no route: {}  bad source: {}  invalid: {}",
        stats.rejected_handshakes,
        stats.unknown_index_packets,
        stats.no_route_packets,
        stats.bad_source_packets,
        stats.invalid_packets
    );
    for p in &stats.peers {
        let _ = writeln!(s, "\npeer: {}", p.public_key);
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "  endpoint: {e}");
        }
        let nets: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(s, "  allowed ips: {}", nets.join(", "));
        let _ = writeln!(
            s,
            "  latest handshake: {}",
            super::peers::ago(p.seconds_since_handshake)
        );
        let _ = writeln!(
            s,
            "  transfer: {} B received, {} B sent",
            p.rx_bytes, p.tx_bytes
        );
        let _ = writeln!(
            s,
            "  handshakes sent: {} initiations, {} responses",
            p.handshake_initiations_sent, p.handshake_responses_sent
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::keys::Key;
    use std::sync::atomic::AtomicU32;

    struct Fake {
        reloads: AtomicU32,
        key: Key,
    }

    impl Controlled for Fake {
        fn stats(&self) -> TunnelStats {
            TunnelStats {
                public_key: self.key,
                listen_port: 51820,
                peers: Vec::new(),
                rejected_handshakes: 3,
                unknown_index_packets: 0,
                no_route_packets: 0,
                bad_source_packets: 0,
                invalid_packets: 0,
            }
        }
        fn reload(&self) -> Result<String, String> {
            match self.reloads.fetch_add(1, Ordering::Relaxed) {
                0 => Ok("added=1 removed=0 updated=0".into()),
                _ => Err("tunnel config field `peer[0].public_key`: bad".into()),
            }
        }
    }

    #[test]
    fn stats_and_reload_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let fake = Arc::new(Fake {
            reloads: AtomicU32::new(0),
            key: Key::generate().unwrap().public(),
        });
        let server = ControlServer::start(&path, fake.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let stats: TunnelStats = serde_json::from_str(&request(&path, "stats").unwrap()).unwrap();
        assert_eq!(stats.public_key, fake.key);
        assert_eq!(stats.rejected_handshakes, 3);
        assert_eq!(
            request(&path, "reload").unwrap(),
            "ok added=1 removed=0 updated=0"
        );
        let err = request(&path, "reload").unwrap();
        assert!(
            err.starts_with("error: ") && err.contains("peer[0]"),
            "{err}"
        );
        assert!(request(&path, "bogus").unwrap().contains("unknown command"));
        assert!(render(&stats).contains("rejected handshakes: 3"));
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }
}
