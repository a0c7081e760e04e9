//! The agent config's `[overlay]` section: the grid bridge's name, the MTU
//! of grid NICs, and the CIDRs grid VMs may reach besides the overlay
//! (`allow`). Validated with the rest of [`crate::config::Config`]; errors
//! name the field (`overlay.allow[1]`).

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// `[overlay]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlaySection {
    /// The host bridge grid VMs and grid namespaces join; it carries the
    /// host's address in its slice (the grid's gateway).
    pub bridge: String,
    /// MTU of grid NICs (veths, VM NICs). The tunnel's default MTU (1420),
    /// so traffic to other slices fits through it unfragmented.
    pub mtu: u32,
    /// IPv4 CIDRs grid VMs may reach besides the overlay (e.g. a package
    /// mirror), masqueraded behind the host's address. Empty (the
    /// default): the overlay only. Never opens the host itself.
    pub allow: Vec<String>,
}

impl Default for OverlaySection {
    fn default() -> Self {
        OverlaySection {
            bridge: "sgbr0".into(),
            mtu: 1420,
            allow: Vec::new(),
        }
    }
}

fn invalid(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Whether `name` is a usable interface name: 1..=15 bytes of ASCII
/// letters, digits, `-`, `_`, `.` (stricter than the kernel, which also
/// refuses `/`, `:` and white space, so names pass through `ip` and nft
/// strings unquoted).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl OverlaySection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_ifname(&self.bridge) {
            return Err(invalid(
                "overlay.bridge".into(),
                format!(
                    "must be 1 to {MAX_IFNAME} ASCII letters, digits, '-', '_' or '.', got {:?}",
                    self.bridge
                ),
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(invalid(
                "overlay.mtu".into(),
                format!("must be between 576 and 9000, got {}", self.mtu),
            ));
        }
        self.allowed()?;
        Ok(())
    }

    /// `allow` parsed. A CIDR with host bits set (`10.0.0.1/24`) is refused:
    /// it is most likely a typo for an address or for the network.
    pub fn allowed(&self) -> Result<Vec<Ipv4Net>, ConfigError> {
        self.allow
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("overlay.allow[{i}]");
                let net: Ipv4Net = s.trim().parse().map_err(|_| {
                    invalid(
                        field.clone(),
                        format!("must be an IPv4 CIDR such as \"192.0.2.0/24\", got {s:?}"),
                    )
                })?;
                if net.trunc() != net {
                    return Err(invalid(
                        field,
                        format!("{s} has host bits set; did you mean {}?", net.trunc()),
                    ));
                }
                Ok(net)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = OverlaySection::default();
        s.validate().unwrap();
        assert_eq!(s.bridge, "sgbr0");
        assert!(s.allowed().unwrap().is_empty());
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut s = OverlaySection {
            bridge: "a-bridge-name-too-long".into(),
            ..Default::default()
        };
        assert_eq!(field(s.validate().unwrap_err()), "overlay.bridge");
        s.bridge = "br 0".into();
        assert_eq!(field(s.validate().unwrap_err()), "overlay.bridge");
        s.bridge = "sgbr0".into();
        s.mtu = 100;
        assert_eq!(field(s.validate().unwrap_err()), "overlay.mtu");
        s.mtu = 1420;
        s.allow = vec!["10.0.0.0/8".into(), "mirror.example".into()];
        assert_eq!(field(s.validate().unwrap_err()), "overlay.allow[1]");
        s.allow = vec!["10.0.0.1/8".into()];
        let e = s.validate().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        s.allow = vec!["10.0.0.0/8".into(), "192.0.2.7/32".into()];
        s.validate().unwrap();
        assert_eq!(s.allowed().unwrap().len(), 2);
    }
}
