//! The tunnel as the agent daemon runs it: the host key (loaded or
//! generated when the daemon starts, so the public key goes into the
//! registration), the endpoint brought up when the controller leases the
//! host a slice of the overlay, and the controller's peer list applied
//! live. The grid client thread drives it ([`crate::grid`]): it registers
//! with [`TunnelService::info`], hands over the lease from
//! `Registered.overlay` ([`TunnelService::apply_lease`]) and every
//! `HeartbeatReply.overlay_peers` ([`TunnelService::apply_peers`]), and
//! reports [`TunnelService::report`] in each heartbeat. Status and metrics
//! read [`TunnelService::status`].
//!
//! **Addressing.** The TUN device gets the host's overlay address (the
//! lease's `address`) with the *overlay's* prefix length, e.g.
//! `100.96.3.1/16` for the lease `{cidr 100.96.0.0/16, address
//! 100.96.3.1/24}`: the kernel then routes the whole overlay into the
//! device (one prefix route, nothing to add per peer), and the host's own
//! slice, once the grid bridge holds the same address with the slice's
//! prefix (`100.96.3.1/24`, see [`crate::overlay`] when present), takes
//! the more specific route to the bridge. Peers' allowed IPs outside the
//! overlay get a route of their own (the endpoint does that).
//!
//! A lease that changes (a re-registration with another slice) restarts
//! the endpoint on the new address (same key and port); the peer list
//! received last is applied again. The listen port must be fixed, because
//! the controller publishes it before the endpoint is up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use ipnet::{IpNet, Ipv4Net};
use sparegrid_proto::overlay::{
    OverlayLease, OverlayPeers, TunnelInfo, TunnelPeerStatus, TunnelReport,
};
use sparegrid_proto::status::TunnelStatus;

use super::config::{AgentTunnelSection, PeerConfig};
use super::endpoint::{EndpointError, Tunnel, TunnelStats};
use super::keys::{self, Key, KeyError};
use super::peers::PeerChange;

/// What the controller sent that the agent cannot use, or an endpoint
/// that would not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A field of `Registered.overlay` or `HeartbeatReply.overlay_peers`.
    #[error("controller's `{field}`: {message}")]
    Controller { field: String, message: String },
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ServiceError {
    ServiceError::Controller {
        field: field.into(),
        message: message.into(),
    }
}

/// A lease, parsed.
#[derive(Debug, Clone, PartialEq)]
struct Lease {
    wire: OverlayLease,
    /// The TUN device's address: the host address, the overlay's prefix.
    device: IpNet,
}

impl Lease {
    fn parse(l: &OverlayLease) -> Result<Lease, ServiceError> {
        let cidr: Ipv4Net = l.cidr.trim().parse().map_err(|_| {
            bad(
                "overlay.cidr",
                format!("{:?} is not an IPv4 network", l.cidr),
            )
        })?;
        let slice: Ipv4Net = l.slice.trim().parse().map_err(|_| {
            bad(
                "overlay.slice",
                format!("{:?} is not an IPv4 network", l.slice),
            )
        })?;
        let address: Ipv4Net = l.address.trim().parse().map_err(|_| {
            bad(
                "overlay.address",
                format!("{:?} is not an IPv4 address/prefix", l.address),
            )
        })?;
        if !cidr.contains(&slice) {
            return Err(bad(
                "overlay.slice",
                format!("{slice} is not inside the overlay {cidr}"),
            ));
        }
        if !slice.contains(&address.addr()) {
            return Err(bad(
                "overlay.address",
                format!("{} is not inside the slice {slice}", address.addr()),
            ));
        }
        let device = Ipv4Net::new(address.addr(), cidr.prefix_len())
            .map_err(|e| bad("overlay.cidr", e.to_string()))?;
        Ok(Lease {
            wire: l.clone(),
            device: IpNet::V4(device),
        })
    }
}

struct State {
    tunnel: Option<Tunnel>,
    lease: Option<Lease>,
    /// The last peer list received (applied to the next endpoint too).
    peers: Option<OverlayPeers>,
    /// The version applied to the running endpoint (0: none); what the
    /// heartbeat echoes.
    applied: u64,
    /// Host names of the peers, by public key.
    hosts: BTreeMap<Key, String>,
    error: Option<String>,
}

/// The daemon's tunnel: see the module docs. All methods are blocking but
/// short (the TUN device, `ip route`); call them from a std thread.
pub struct TunnelService {
    section: AgentTunnelSection,
    data_dir: PathBuf,
    key: Key,
    state: Mutex<State>,
}

impl TunnelService {
    /// Loads the host key (`tunnel.private_key_file`, generated 0600 when
    /// missing). Nothing runs until a lease arrives.
    pub fn new(
        section: &AgentTunnelSection,
        data_dir: &Path,
    ) -> Result<TunnelService, ServiceError> {
        let key = keys::load_or_generate(&section.key_file(data_dir))?;
        tracing::info!(public_key = %key.public(), port = section.listen_port, "tunnel key loaded; the endpoint starts once the controller leases an overlay slice");
        Ok(TunnelService {
            section: section.clone(),
            data_dir: data_dir.to_path_buf(),
            key,
            state: Mutex::new(State {
                tunnel: None,
                lease: None,
                peers: None,
                applied: 0,
                hosts: BTreeMap::new(),
                error: None,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn public_key(&self) -> Key {
        self.key.public()
    }

    /// What `Register.tunnel` publishes.
    pub fn info(&self) -> TunnelInfo {
        TunnelInfo {
            public_key: self.public_key().to_string(),
            listen_port: self.section.listen_port,
            endpoint: self.section.public_endpoint().map(|a| a.to_string()),
        }
    }

    /// Brings the endpoint up on `lease` (a no-op when it runs on that
    /// lease already; a restart on the new address when the lease changed),
    /// and applies the peer list received last. Returns whether the
    /// endpoint was (re)started.
    pub fn apply_lease(&self, lease: &OverlayLease) -> Result<bool, ServiceError> {
        let mut st = self.state();
        let parsed = match Lease::parse(lease) {
            Ok(p) => p,
            Err(e) => {
                st.error = Some(e.to_string());
                return Err(e);
            }
        };
        if st.tunnel.is_some() && st.lease.as_ref() == Some(&parsed) {
            return Ok(false);
        }
        // The old endpoint first: it holds the device name and the port.
        if let Some(old) = st.tunnel.take() {
            tracing::info!(
                from = ?st.lease.as_ref().map(|l| &l.wire.slice),
                to = %parsed.wire.slice,
                "overlay lease changed; restarting the tunnel on the new address"
            );
            old.shutdown();
        }
        st.applied = 0;
        st.lease = Some(parsed.clone());
        let cfg = self.section.tunnel_config(&self.data_dir, parsed.device);
        let tunnel = match Tunnel::from_config(&cfg) {
            Ok(t) => t,
            Err(e) => {
                st.error = Some(format!("starting the tunnel: {e}"));
                return Err(e.into());
            }
        };
        tracing::info!(
            interface = %self.section.interface,
            address = %parsed.device,
            slice = %parsed.wire.slice,
            "tunnel up on the overlay lease"
        );
        st.tunnel = Some(tunnel);
        st.error = None;
        if let Some(peers) = st.peers.clone() {
            if let Err(e) = self.apply_locked(&mut st, &peers) {
                st.error = Some(e.to_string());
                tracing::warn!("re-applying the overlay peer list: {e}");
            }
        }
        Ok(true)
    }

    /// Whether the endpoint runs.
    pub fn is_up(&self) -> bool {
        self.state().tunnel.is_some()
    }

    /// Applies the controller's peer list live (sessions of staying peers
    /// are kept). Before the endpoint is up the list is kept for it. An
    /// invalid list changes nothing and names the bad field.
    pub fn apply_peers(&self, peers: &OverlayPeers) -> Result<Option<PeerChange>, ServiceError> {
        let mut st = self.state();
        st.peers = Some(peers.clone());
        if st.tunnel.is_none() {
            return Ok(None);
        }
        match self.apply_locked(&mut st, peers) {
            Ok(c) => {
                st.error = None;
                Ok(Some(c))
            }
            Err(e) => {
                st.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn apply_locked(
        &self,
        st: &mut State,
        list: &OverlayPeers,
    ) -> Result<PeerChange, ServiceError> {
        let (configs, hosts) = self.peer_configs(list)?;
        let tunnel = st.tunnel.as_ref().expect("checked by the callers");
        let change = tunnel.update_peers(&configs)?;
        st.applied = list.version;
        st.hosts = hosts;
        tracing::info!(
            version = list.version,
            peers = configs.len(),
            ?change,
            "overlay peer list applied"
        );
        Ok(change)
    }

    /// The endpoint's peers for `list` (the keepalive from the config),
    /// and their host names by key.
    fn peer_configs(
        &self,
        list: &OverlayPeers,
    ) -> Result<(Vec<PeerConfig>, BTreeMap<Key, String>), ServiceError> {
        let me = self.public_key();
        let mut out = Vec::with_capacity(list.peers.len());
        let mut hosts = BTreeMap::new();
        for (i, p) in list.peers.iter().enumerate() {
            let field = |f: &str| format!("overlay_peers.peers[{i}].{f}");
            let key: Key = p
                .public_key
                .trim()
                .parse()
                .map_err(|e: KeyError| bad(field("public_key"), e.to_string()))?;
            if key == me {
                // The controller never lists the agent itself; if it did,
                // a route to our own slice through the tunnel is wrong.
                tracing::warn!(host = %p.host, "the overlay peer list holds this host's own key; skipped");
                continue;
            }
            let endpoint = match p.endpoint.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(e) => Some(
                    e.parse::<SocketAddr>()
                        .map_err(|_| bad(field("endpoint"), format!("{e:?} is not ip:port")))?,
                ),
            };
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|n| {
                    n.trim()
                        .parse::<IpNet>()
                        .map_err(|_| bad(field("allowed_ips"), format!("{n:?} is not a network")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            hosts.insert(key, p.host.clone());
            out.push(PeerConfig {
                public_key: key,
                endpoint,
                allowed_ips,
                persistent_keepalive: self.section.keepalive_secs(),
            });
        }
        Ok((out, hosts))
    }

    /// The endpoint's figures, when it runs.
    pub fn stats(&self) -> Option<TunnelStats> {
        self.state().tunnel.as_ref().map(Tunnel::stats)
    }

    /// Makes the next heartbeat report version 0, so the controller sends
    /// the whole list again (after a re-registration: the controller may
    /// have restarted and numbered its lists anew). The running peers stay.
    pub fn forget_version(&self) {
        self.state().applied = 0;
    }

    /// What the heartbeat carries (`Heartbeat.tunnel`).
    pub fn report(&self) -> TunnelReport {
        let st = self.state();
        let stats = st.tunnel.as_ref().map(Tunnel::stats);
        TunnelReport {
            peers_version: st.applied,
            peers: peer_statuses(stats.as_ref(), &st.hosts),
            rejected_handshakes: stats.as_ref().map_or(0, |s| s.rejected_handshakes),
        }
    }

    /// What `GET /v1/status` shows.
    pub fn status(&self) -> TunnelStatus {
        let st = self.state();
        let stats = st.tunnel.as_ref().map(Tunnel::stats);
        let s = stats.as_ref();
        TunnelStatus {
            public_key: self.public_key().to_string(),
            listen_port: s.map_or(self.section.listen_port, |s| s.listen_port),
            interface: self.section.interface.clone(),
            up: st.tunnel.is_some(),
            address: st
                .tunnel
                .as_ref()
                .and(st.lease.as_ref())
                .map(|l| l.device.to_string()),
            lease: st.lease.as_ref().map(|l| l.wire.clone()),
            peers_version: st.applied,
            peers: peer_statuses(s, &st.hosts),
            rejected_handshakes: s.map_or(0, |s| s.rejected_handshakes),
            unknown_index_packets: s.map_or(0, |s| s.unknown_index_packets),
            no_route_packets: s.map_or(0, |s| s.no_route_packets),
            bad_source_packets: s.map_or(0, |s| s.bad_source_packets),
            invalid_packets: s.map_or(0, |s| s.invalid_packets),
            error: st.error.clone(),
        }
    }

    /// Stops the endpoint (threads joined, the TUN device and its routes
    /// gone with it). Idempotent.
    pub fn shutdown(&self) {
        let tunnel = self.state().tunnel.take();
        if let Some(t) = tunnel {
            t.shutdown();
            tracing::info!("tunnel stopped");
        }
    }
}

impl std::fmt::Debug for TunnelService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelService")
            .field("public_key", &self.public_key().to_string())
            .finish_non_exhaustive()
    }
}

impl Drop for TunnelService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn peer_statuses(
    stats: Option<&TunnelStats>,
    hosts: &BTreeMap<Key, String>,
) -> Vec<TunnelPeerStatus> {
    let Some(stats) = stats else {
        return Vec::new();
    };
    stats
        .peers
        .iter()
        .map(|p| TunnelPeerStatus {
            host: hosts.get(&p.public_key).cloned(),
            public_key: p.public_key.to_string(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            last_handshake_secs: p.seconds_since_handshake.map(|s| s.max(0.0) as u64),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::overlay::OverlayPeer;

    fn lease(cidr: &str, slice: &str, address: &str) -> OverlayLease {
        OverlayLease {
            cidr: cidr.into(),
            slice: slice.into(),
            address: address.into(),
        }
    }

    #[test]
    fn lease_gives_the_device_the_overlay_prefix() {
        let l = Lease::parse(&lease("100.96.0.0/16", "100.96.3.0/24", "100.96.3.1/24")).unwrap();
        assert_eq!(l.device.to_string(), "100.96.3.1/16");
    }

    #[test]
    fn bad_leases_name_the_field() {
        for (l, field) in [
            (
                lease("nope", "100.96.3.0/24", "100.96.3.1/24"),
                "overlay.cidr",
            ),
            (
                lease("100.96.0.0/16", "100.97.3.0/24", "100.97.3.1/24"),
                "overlay.slice",
            ),
            (
                lease("100.96.0.0/16", "100.96.3.0/24", "100.96.4.1/24"),
                "overlay.address",
            ),
            (
                lease("100.96.0.0/16", "100.96.3.0/24", "fd00::1/64"),
                "overlay.address",
            ),
        ] {
            let err = Lease::parse(&l).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
    }

    fn service(dir: &Path) -> TunnelService {
        let section = AgentTunnelSection {
            enabled: true,
            ..AgentTunnelSection::default()
        };
        TunnelService::new(&section, dir).unwrap()
    }

    #[test]
    fn key_is_generated_under_the_data_dir_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path());
        let info = s.info();
        assert_eq!(info.listen_port, 51820);
        assert_eq!(info.endpoint, None);
        assert_eq!(info.public_key, s.public_key().to_string());
        // The same key on the next start.
        assert_eq!(service(dir.path()).public_key(), s.public_key());
        assert!(dir.path().join("tunnel.key").is_file());
    }

    #[test]
    fn peer_list_converts_with_keepalive_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path());
        let other = Key::generate().unwrap().public();
        let peer = |endpoint: Option<&str>, allowed: &str| OverlayPeer {
            host: "h2".into(),
            public_key: other.to_string(),
            endpoint: endpoint.map(Into::into),
            allowed_ips: vec![allowed.into()],
        };
        let list = OverlayPeers {
            version: 4,
            peers: vec![
                peer(Some("10.0.0.2:51820"), "100.96.2.0/24"),
                // Our own key is skipped, not refused.
                OverlayPeer {
                    public_key: s.public_key().to_string(),
                    ..peer(None, "100.96.3.0/24")
                },
            ],
        };
        let (configs, hosts) = s.peer_configs(&list).unwrap();
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].persistent_keepalive, Some(25));
        assert_eq!(configs[0].endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(hosts.get(&other).map(String::as_str), Some("h2"));
        for (p, field) in [
            (
                peer(Some("nope"), "100.96.2.0/24"),
                "overlay_peers.peers[0].endpoint",
            ),
            (peer(None, "100.96.2"), "overlay_peers.peers[0].allowed_ips"),
            (
                OverlayPeer {
                    public_key: "x".into(),
                    ..peer(None, "100.96.2.0/24")
                },
                "overlay_peers.peers[0].public_key",
            ),
        ] {
            let list = OverlayPeers {
                version: 1,
                peers: vec![p],
            };
            let err = s.peer_configs(&list).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
    }

    #[test]
    fn peers_before_the_lease_are_kept_and_not_reported_as_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path());
        let list = OverlayPeers {
            version: 9,
            peers: Vec::new(),
        };
        assert!(s.apply_peers(&list).unwrap().is_none());
        let r = s.report();
        assert_eq!(
            r.peers_version, 0,
            "nothing runs yet, so nothing is applied"
        );
        assert!(r.peers.is_empty());
        let st = s.status();
        assert!(!st.up);
        assert_eq!(st.listen_port, 51820);
        assert_eq!(st.public_key, s.public_key().to_string());
    }

    /// Root only: in a private network namespace (this thread's, inherited
    /// by the tunnel's threads and its `ip` commands), a real TUN device
    /// comes up on the lease, the same lease again changes nothing, a
    /// changed slice restarts it on the new address with the peer list
    /// kept, and shutdown removes the device.
    #[test]
    fn root_lease_brings_the_device_up_and_a_new_slice_moves_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: needs root and /dev/net/tun");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace only.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let ip = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .expect("ip");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            ip(&["link", "set", "lo", "up"]);
            let dir = tempfile::tempdir().unwrap();
            let s = service(dir.path());
            let other = Key::generate().unwrap().public();
            let list = OverlayPeers {
                version: 7,
                peers: vec![OverlayPeer {
                    host: "h2".into(),
                    public_key: other.to_string(),
                    endpoint: Some("192.0.2.2:51820".into()),
                    // Outside the overlay: the endpoint routes it itself.
                    allowed_ips: vec!["100.96.2.0/24".into(), "10.99.0.0/16".into()],
                }],
            };
            // Peers first (kept until the lease), then the lease.
            assert!(s.apply_peers(&list).unwrap().is_none());
            let a = lease("100.96.0.0/16", "100.96.3.0/24", "100.96.3.1/24");
            assert!(s.apply_lease(&a).unwrap());
            let st = s.status();
            assert!(st.up, "{st:?}");
            assert_eq!(st.address.as_deref(), Some("100.96.3.1/16"));
            assert_eq!(st.peers_version, 7, "the kept list is applied");
            assert_eq!(st.peers[0].host.as_deref(), Some("h2"));
            assert!(ip(&["-o", "addr", "show", "dev", "sgtun0"]).contains("100.96.3.1/16"));
            let routes = ip(&["route", "show", "dev", "sgtun0"]);
            assert!(routes.contains("100.96.0.0/16"), "{routes}");
            assert!(routes.contains("10.99.0.0/16"), "{routes}");
            assert!(!s.apply_lease(&a).unwrap(), "the same lease is a no-op");
            assert_eq!(s.report().peers_version, 7);
            s.forget_version();
            assert_eq!(s.report().peers_version, 0);
            // A re-registration with another slice.
            let b = lease("100.96.0.0/16", "100.96.5.0/24", "100.96.5.1/24");
            assert!(s.apply_lease(&b).unwrap());
            let st = s.status();
            assert_eq!(st.address.as_deref(), Some("100.96.5.1/16"));
            assert_eq!(st.peers_version, 7, "re-applied on the new device");
            let addrs = ip(&["-o", "addr", "show", "dev", "sgtun0"]);
            assert!(
                addrs.contains("100.96.5.1/16") && !addrs.contains("100.96.3.1"),
                "{addrs}"
            );
            s.shutdown();
            assert!(!s.status().up);
            assert!(
                ip(&["-o", "link", "show", "dev", "sgtun0"]).is_empty(),
                "the device is gone"
            );
        })
        .join()
        .expect("test thread");
    }
}
