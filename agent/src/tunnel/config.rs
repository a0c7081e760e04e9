//! The tunnel endpoint's configuration: the TOML schema (one table that the
//! agent can embed as `[tunnel]` and `sparegrid-tunnel` reads as a file),
//! its defaults and `validate()`, which names the bad field.
//!
//! ```toml
//! private_key_file = "/var/lib/sparegrid/tunnel.key"  # generated if missing
//! listen_port = 51820
//! interface = "sgtun0"
//! address = "100.96.1.1/16"  # this host's overlay address; the prefix is
//!                            # routed into the TUN device
//! mtu = 1420
//! offload = true             # TUN GSO/GRO (virtio-net header)
//!
//! [[peer]]
//! public_key = "base64…"
//! endpoint = "192.0.2.7:51820"   # optional: learnt from its handshake
//! allowed_ips = ["100.96.2.0/24"]
//! persistent_keepalive = 25      # optional, seconds
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::keys::Key;

/// A tunnel config that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read tunnel config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tunnel config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tunnel config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The endpoint: its key, UDP port, TUN device and peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// The host's private key (`wg genkey` format); generated with mode
    /// 0600 when the file does not exist.
    pub private_key_file: PathBuf,
    /// UDP port for WireGuard (0 picks a free one).
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// The TUN device's name.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// This host's overlay address with the prefix routed into the TUN
    /// device (for example the whole grid pool).
    pub address: IpNet,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// GSO/GRO on the TUN device (several packets per read and write).
    #[serde(default = "default_true")]
    pub offload: bool,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

/// One peer: who it is, where it is, which overlay addresses are its.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub public_key: Key,
    /// Its UDP endpoint; without one we answer its handshakes but cannot
    /// start one.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The overlay prefixes routed to it and accepted from it.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle (NAT mappings); off if absent.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

fn default_port() -> u16 {
    51820
}
fn default_interface() -> String {
    "sgtun0".into()
}
fn default_mtu() -> u16 {
    1420
}
fn default_true() -> bool {
    true
}

impl TunnelConfig {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<TunnelConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<TunnelConfig, ConfigError> {
        let c: TunnelConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.interface;
        // IFNAMSIZ is 16 with the terminating NUL.
        if name.is_empty()
            || name.len() > 15
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "interface",
                format!("{name:?} must be 1-15 characters of [A-Za-z0-9._-]"),
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(invalid(
                "mtu",
                format!("{} is outside 576..=9000", self.mtu),
            ));
        }
        if !self.address.addr().is_ipv4() {
            return Err(invalid(
                "address",
                "only an IPv4 overlay address is supported",
            ));
        }
        validate_peers(&self.peers)
    }
}

/// The checks on a peer list, also applied to live updates.
pub fn validate_peers(peers: &[PeerConfig]) -> Result<(), ConfigError> {
    let mut keys = BTreeMap::new();
    let mut nets = BTreeMap::new();
    for (i, p) in peers.iter().enumerate() {
        if let Some(j) = keys.insert(p.public_key, i) {
            return Err(invalid(
                format!("peer[{i}].public_key"),
                format!("{} is also peer[{j}]'s key", p.public_key),
            ));
        }
        if let Some(e) = p.endpoint {
            if e.port() == 0 || e.ip().is_unspecified() {
                return Err(invalid(
                    format!("peer[{i}].endpoint"),
                    format!("{e} is not a reachable address"),
                ));
            }
        }
        if p.persistent_keepalive == Some(0) {
            return Err(invalid(
                format!("peer[{i}].persistent_keepalive"),
                "leave it out to turn keepalives off (0 is not a period)",
            ));
        }
        for net in &p.allowed_ips {
            if net.trunc() != *net {
                return Err(invalid(
                    format!("peer[{i}].allowed_ips"),
                    format!("{net} has host bits set (did you mean {}?)", net.trunc()),
                ));
            }
            if let Some(j) = nets.insert(*net, i) {
                return Err(invalid(
                    format!("peer[{i}].allowed_ips"),
                    format!("{net} is also in peer[{j}]'s allowed_ips"),
                ));
            }
        }
    }
    Ok(())
}

/// `[tunnel]` in the agent's config: the endpoint's own settings. Its
/// overlay address and its peers come from the controller (the lease in
/// `Registered.overlay`, the list in `HeartbeatReply.overlay_peers`), so
/// they are not here; [`AgentTunnelSection::tunnel_config`] builds the
/// [`TunnelConfig`] once the lease is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentTunnelSection {
    /// Run the endpoint (needs `controller.url`: the controller leases the
    /// address and lists the peers).
    pub enabled: bool,
    /// The host's private key (`wg genkey` format), generated with mode
    /// 0600 on first start; empty: `<agent.data_dir>/tunnel.key`.
    pub private_key_file: PathBuf,
    /// UDP port for WireGuard; published to the controller when the agent
    /// registers, so it must be fixed (not 0).
    pub listen_port: u16,
    /// The TUN device's name.
    pub interface: String,
    pub mtu: u16,
    /// GSO/GRO on the TUN device.
    pub offload: bool,
    /// `ip:port` other hosts reach this endpoint at (behind NAT or port
    /// forwarding); empty: the controller uses the address the agent
    /// registers from, with `listen_port`.
    pub public_endpoint: String,
    /// Keepalive sent to every peer when idle (keeps NAT mappings open and
    /// lets a cut underlay be noticed); whole seconds, "0s" turns it off.
    #[serde(with = "humantime_serde")]
    pub persistent_keepalive: std::time::Duration,
}

impl Default for AgentTunnelSection {
    fn default() -> Self {
        AgentTunnelSection {
            enabled: false,
            private_key_file: PathBuf::new(),
            listen_port: default_port(),
            interface: default_interface(),
            mtu: default_mtu(),
            offload: true,
            public_endpoint: String::new(),
            persistent_keepalive: std::time::Duration::from_secs(25),
        }
    }
}

impl AgentTunnelSection {
    /// The key file: `private_key_file`, or `tunnel.key` in `data_dir`.
    pub fn key_file(&self, data_dir: &Path) -> PathBuf {
        if self.private_key_file.as_os_str().is_empty() {
            data_dir.join("tunnel.key")
        } else {
            self.private_key_file.clone()
        }
    }

    /// `public_endpoint` parsed (validated: `None` when empty).
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.public_endpoint.trim().parse().ok()
    }

    /// `persistent_keepalive` in seconds for each peer (`None`: off).
    pub fn keepalive_secs(&self) -> Option<u16> {
        let s = self.persistent_keepalive.as_secs();
        (s > 0).then(|| s.min(u16::MAX as u64) as u16)
    }

    /// Checks every field; field names are `tunnel.<key>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.private_key_file.as_os_str().is_empty() && !self.private_key_file.is_absolute() {
            return Err(invalid(
                "tunnel.private_key_file",
                format!("must be an absolute path, got {:?}", self.private_key_file),
            ));
        }
        if self.listen_port == 0 {
            return Err(invalid(
                "tunnel.listen_port",
                "must be a fixed port (the controller publishes it to the other hosts)",
            ));
        }
        if !self.public_endpoint.trim().is_empty() {
            match self.public_endpoint.trim().parse::<SocketAddr>() {
                Ok(a) if a.is_ipv4() && a.port() != 0 && !a.ip().is_unspecified() => {}
                _ => {
                    return Err(invalid(
                        "tunnel.public_endpoint",
                        format!(
                            "must be an IPv4 ip:port other hosts can reach (e.g. 203.0.113.7:51820), got {:?}",
                            self.public_endpoint
                        ),
                    ))
                }
            }
        }
        let k = self.persistent_keepalive;
        if k.subsec_nanos() != 0 || k.as_secs() > u16::MAX as u64 {
            return Err(invalid(
                "tunnel.persistent_keepalive",
                format!("must be whole seconds up to 65535s (0s: off), got {k:?}"),
            ));
        }
        // The rest as the endpoint checks it (any address will do here).
        self.tunnel_config(Path::new("/"), "100.96.0.1/16".parse().expect("static"))
            .validate()
            .map_err(|e| match e {
                ConfigError::Invalid { field, message } => ConfigError::Invalid {
                    field: format!("tunnel.{field}"),
                    message,
                },
                other => other,
            })
    }

    /// The endpoint's config with `address` (the host's overlay address
    /// with the prefix routed into the device) and no peers yet.
    pub fn tunnel_config(&self, data_dir: &Path, address: IpNet) -> TunnelConfig {
        TunnelConfig {
            private_key_file: self.key_file(data_dir),
            listen_port: self.listen_port,
            interface: self.interface.clone(),
            address,
            mtu: self.mtu,
            offload: self.offload,
            peers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        Key::generate().unwrap().public().to_string()
    }

    fn base() -> String {
        "private_key_file = \"/tmp/k\"\naddress = \"100.96.1.1/16\"\n".to_string()
    }

    #[test]
    fn defaults_and_a_peer_parse() {
        let k = key();
        let c = TunnelConfig::parse(&format!(
            "{}[[peer]]\npublic_key = \"{k}\"\nendpoint = \"10.0.0.2:51820\"\nallowed_ips = [\"100.96.2.0/24\"]\n",
            base()
        ))
        .unwrap();
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.mtu, 1420);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key.to_string(), k);
        assert_eq!(c.peers[0].allowed_ips[0].to_string(), "100.96.2.0/24");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (format!("{}mtu = 10\n", base()), "mtu"),
            (format!("{}interface = \"a/b\"\n", base()), "interface"),
            (
                format!("{}[[peer]]\npublic_key = \"nope\"\n", base()),
                "public_key",
            ),
            (
                format!(
                    "{}[[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"100.96.2.1/24\"]\n",
                    base(),
                    key()
                ),
                "peer[0].allowed_ips",
            ),
            (
                format!(
                    "{b}[[peer]]\npublic_key = \"{k1}\"\nallowed_ips = [\"100.96.2.0/24\"]\n\
                     [[peer]]\npublic_key = \"{k2}\"\nallowed_ips = [\"100.96.2.0/24\"]\n",
                    b = base(),
                    k1 = key(),
                    k2 = key()
                ),
                "peer[1].allowed_ips",
            ),
            (format!("{}bogus = 1\n", base()), "bogus"),
        ];
        for (text, field) in cases {
            let err = TunnelConfig::parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn duplicate_peer_key_is_refused() {
        let k = key();
        let text = format!(
            "{}[[peer]]\npublic_key = \"{k}\"\n[[peer]]\npublic_key = \"{k}\"\n",
            base()
        );
        let err = TunnelConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("peer[1].public_key"), "{err}");
    }

    #[test]
    fn agent_section_defaults_and_errors_name_the_field() {
        let d = AgentTunnelSection::default();
        d.validate().unwrap();
        assert_eq!(d.keepalive_secs(), Some(25));
        assert_eq!(
            d.key_file(Path::new("/var/lib/sg")),
            Path::new("/var/lib/sg/tunnel.key")
        );
        assert_eq!(d.public_endpoint(), None);
        let cases: [(&str, AgentTunnelSection); 6] = [
            (
                "tunnel.listen_port",
                AgentTunnelSection {
                    listen_port: 0,
                    ..d.clone()
                },
            ),
            (
                "tunnel.mtu",
                AgentTunnelSection {
                    mtu: 100,
                    ..d.clone()
                },
            ),
            (
                "tunnel.interface",
                AgentTunnelSection {
                    interface: "a b".into(),
                    ..d.clone()
                },
            ),
            (
                "tunnel.public_endpoint",
                AgentTunnelSection {
                    public_endpoint: "nope".into(),
                    ..d.clone()
                },
            ),
            (
                "tunnel.private_key_file",
                AgentTunnelSection {
                    private_key_file: "rel/k".into(),
                    ..d.clone()
                },
            ),
            (
                "tunnel.persistent_keepalive",
                AgentTunnelSection {
                    persistent_keepalive: std::time::Duration::from_millis(1500),
                    ..d.clone()
                },
            ),
        ];
        for (field, s) in cases {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        let s = AgentTunnelSection {
            public_endpoint: "203.0.113.7:51820".into(),
            persistent_keepalive: std::time::Duration::ZERO,
            ..d
        };
        s.validate().unwrap();
        assert_eq!(s.keepalive_secs(), None);
        assert_eq!(
            s.public_endpoint(),
            Some("203.0.113.7:51820".parse().unwrap())
        );
    }
}
