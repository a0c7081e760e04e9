//! Checking what an agent publishes about its tunnel endpoint
//! ([`TunnelInfo`] in a registration): the WireGuard public key (base64
//! of 32 bytes, kept in canonical form so that one key has one spelling)
//! and the endpoint other hosts send to: `tunnel.endpoint` when the agent
//! gives one, else the address its registration came from with
//! `tunnel.listen_port`. Errors name the field (`tunnel.public_key`, …).

use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sparegrid_proto::overlay::TunnelInfo;

/// A refused tunnel field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct BadTunnel {
    pub field: &'static str,
    pub message: String,
}

/// A checked [`TunnelInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Canonical base64 of the 32-byte key.
    pub public_key: String,
    /// `ip:port`, when known.
    pub endpoint: Option<String>,
}

/// Checks `t`; `remote` is where the registration came from, if known.
pub fn check(t: &TunnelInfo, remote: Option<SocketAddr>) -> Result<Endpoint, BadTunnel> {
    let bad = |field, message: String| BadTunnel { field, message };
    let key = STANDARD
        .decode(t.public_key.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            bad(
                "tunnel.public_key",
                format!(
                    "must be the base64 of a 32-byte WireGuard key (what `wg pubkey` prints), \
                     got {:?}",
                    truncate(&t.public_key)
                ),
            )
        })?;
    let endpoint = match &t.endpoint {
        Some(text) => {
            let addr: SocketAddr = text.trim().parse().map_err(|_| {
                bad(
                    "tunnel.endpoint",
                    format!(
                        "must be ip:port (\"203.0.113.7:51820\", \"[2001:db8::7]:51820\"), got {:?}",
                        truncate(text)
                    ),
                )
            })?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(bad(
                    "tunnel.endpoint",
                    format!("{addr} cannot be sent to; give the address peers reach"),
                ));
            }
            Some(canonical(addr).to_string())
        }
        None => {
            if t.listen_port == 0 {
                return Err(bad(
                    "tunnel.listen_port",
                    "is 0 and no tunnel.endpoint is given, so peers could not reach it".into(),
                ));
            }
            remote.map(|r| SocketAddr::new(canonical(r).ip(), t.listen_port).to_string())
        }
    };
    Ok(Endpoint {
        public_key: STANDARD.encode(key),
        endpoint,
    })
}

/// An IPv4-mapped IPv6 address (a dual-stack listener) as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => SocketAddr::new(v6.to_canonical(), addr.port()),
        IpAddr::V4(_) => addr,
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real key pair's public half (`wg genkey | wg pubkey`).
    pub(crate) const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn info(key: &str, port: u16, endpoint: Option<&str>) -> TunnelInfo {
        TunnelInfo {
            public_key: key.into(),
            listen_port: port,
            endpoint: endpoint.map(Into::into),
        }
    }

    #[test]
    fn endpoint_given_or_from_the_request() {
        let remote: SocketAddr = "192.0.2.9:40000".parse().unwrap();
        let e = check(&info(KEY, 51820, Some("203.0.113.7:51000")), Some(remote)).unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("203.0.113.7:51000"));
        assert_eq!(e.public_key, KEY);
        let e = check(&info(KEY, 51820, None), Some(remote)).unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("192.0.2.9:51820"));
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:40000".parse().unwrap();
        let e = check(&info(KEY, 51821, None), Some(mapped)).unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("192.0.2.9:51821"));
        let e = check(&info(KEY, 51820, None), None).unwrap();
        assert_eq!(e.endpoint, None, "unknown: learnt from its handshakes");
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |t: TunnelInfo| check(&t, None).unwrap_err().field;
        assert_eq!(field(info("nope", 1, None)), "tunnel.public_key");
        // Valid base64, wrong length (16 bytes).
        assert_eq!(
            field(info("AAAAAAAAAAAAAAAAAAAAAA==", 1, None)),
            "tunnel.public_key"
        );
        assert_eq!(field(info(KEY, 1, Some("host:51820"))), "tunnel.endpoint");
        assert_eq!(field(info(KEY, 1, Some("1.2.3.4"))), "tunnel.endpoint");
        assert_eq!(field(info(KEY, 1, Some("1.2.3.4:0"))), "tunnel.endpoint");
        assert_eq!(
            field(info(KEY, 1, Some("0.0.0.0:51820"))),
            "tunnel.endpoint"
        );
        assert_eq!(field(info(KEY, 0, None)), "tunnel.listen_port");
        // Port 0 is fine when the endpoint is given.
        check(&info(KEY, 0, Some("1.2.3.4:51820")), None).unwrap();
    }
}
