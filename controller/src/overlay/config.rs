//! The `[overlay]` section of the controller config: the grid overlay's
//! CIDR, the size of each host's slice, and how long a lost host keeps its
//! slice. An empty `cidr` (the default) turns the overlay off.

use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Default `overlay.slice_prefix`: a /24 per host (253 grid VM addresses).
pub const DEFAULT_SLICE_PREFIX: u8 = 24;
/// Default `overlay.release_after`.
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest slice prefix: a slice needs its network address, the host's
/// address, at least one grid VM address and its broadcast address.
pub const MAX_SLICE_PREFIX: u8 = 30;

/// `[overlay]`: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayConfig {
    /// The whole overlay, an IPv4 network (`"100.96.0.0/16"`); empty: no
    /// overlay (tunnels are ignored, overlay jobs are refused).
    pub cidr: String,
    /// The prefix length of each host's slice; longer than the CIDR's.
    pub slice_prefix: u8,
    /// A lost host's slice is released once its last heartbeat is this
    /// old, and may then go to another host.
    #[serde(with = "humantime_serde")]
    pub release_after: Duration,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            cidr: String::new(),
            slice_prefix: DEFAULT_SLICE_PREFIX,
            release_after: DEFAULT_RELEASE_AFTER,
        }
    }
}

/// A refused `[overlay]` value: the field (`overlay.cidr`, …) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct InvalidOverlay {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidOverlay {
    InvalidOverlay {
        field,
        message: message.into(),
    }
}

impl OverlayConfig {
    /// True when `cidr` is set.
    pub fn enabled(&self) -> bool {
        !self.cidr.trim().is_empty()
    }

    /// The parsed CIDR when the overlay is on; checks every field.
    pub fn network(&self) -> Result<Option<Ipv4Net>, InvalidOverlay> {
        if !self.enabled() {
            return Ok(None);
        }
        let text = self.cidr.trim();
        let net: Ipv4Net = text.parse().map_err(|_| {
            let why = if text.contains(':') {
                "is not an IPv4 network; the overlay is IPv4 only (the tunnel is)"
            } else {
                "is not an IPv4 network in CIDR form, like \"100.96.0.0/16\""
            };
            invalid("overlay.cidr", format!("{text:?} {why}"))
        })?;
        if net.addr() != net.network() {
            return Err(invalid(
                "overlay.cidr",
                format!(
                    "{text:?} has host bits set; did you mean \"{}\"?",
                    net.trunc()
                ),
            ));
        }
        if self.slice_prefix <= net.prefix_len() {
            return Err(invalid(
                "overlay.slice_prefix",
                format!(
                    "/{} is not longer than the CIDR's /{}; each host's slice must be a \
                     part of overlay.cidr, and the overlay needs at least two",
                    self.slice_prefix,
                    net.prefix_len()
                ),
            ));
        }
        if self.slice_prefix > MAX_SLICE_PREFIX {
            return Err(invalid(
                "overlay.slice_prefix",
                format!(
                    "/{} leaves no address for grid VMs; use at most /{MAX_SLICE_PREFIX}",
                    self.slice_prefix
                ),
            ));
        }
        Ok(Some(net))
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidOverlay> {
        if self.release_after < Duration::from_secs(1) {
            return Err(invalid(
                "overlay.release_after",
                format!("{:?} is under 1s", self.release_after),
            ));
        }
        if self.release_after > Duration::from_secs(366 * 24 * 3600) {
            return Err(invalid(
                "overlay.release_after",
                format!("{:?} is over a year", self.release_after),
            ));
        }
        self.network().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(c: OverlayConfig) -> &'static str {
        c.validate().expect_err("should be refused").field
    }

    fn with(cidr: &str, prefix: u8) -> OverlayConfig {
        OverlayConfig {
            cidr: cidr.into(),
            slice_prefix: prefix,
            ..OverlayConfig::default()
        }
    }

    #[test]
    fn off_by_default_and_on_with_a_cidr() {
        let c = OverlayConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.network().unwrap(), None);
        c.validate().unwrap();
        let c = with("100.96.0.0/16", 24);
        assert_eq!(c.network().unwrap(), Some("100.96.0.0/16".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(with("nonsense", 24)), "overlay.cidr");
        assert_eq!(field(with("100.96.0.0", 24)), "overlay.cidr");
        let e = with("fd00::/64", 80).validate().unwrap_err();
        assert_eq!(e.field, "overlay.cidr");
        assert!(e.message.contains("IPv4"), "{e}");
        let e = with("100.96.1.0/16", 24).validate().unwrap_err();
        assert_eq!(e.field, "overlay.cidr");
        assert!(e.message.contains("100.96.0.0/16"), "{e}");
        assert_eq!(field(with("100.96.0.0/16", 16)), "overlay.slice_prefix");
        assert_eq!(field(with("100.96.0.0/16", 12)), "overlay.slice_prefix");
        assert_eq!(field(with("100.96.0.0/16", 31)), "overlay.slice_prefix");
        with("100.96.0.0/16", 30).validate().unwrap();
        with("100.96.0.0/16", 17).validate().unwrap();
        let c = OverlayConfig {
            release_after: Duration::from_millis(10),
            ..with("100.96.0.0/16", 24)
        };
        assert_eq!(field(c), "overlay.release_after");
    }
}
