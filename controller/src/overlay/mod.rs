//! The controller's side of the grid overlay (issue 7): the address pool
//! that hands each host with a WireGuard tunnel a slice of `overlay.cidr`,
//! the peer list every agent's tunnel is configured from, and the tunnel
//! status agents report.
//!
//! - [`config`]: the `[overlay]` section (`cidr`, `slice_prefix`,
//!   `release_after`); an empty `cidr` turns the overlay off.
//! - [`pool`]: slice arithmetic over the CIDR (slice 0 is kept unused).
//!   Which host holds which slice is in the store (`overlay_slices`,
//!   `Store::lease_slice`), so a host keeps its slice across agent and
//!   controller restarts.
//! - [`tunnel`]: checks what a registration publishes (`tunnel.public_key`,
//!   `tunnel.endpoint`; the endpoint defaults to the registration's source
//!   address with `tunnel.listen_port`).
//! - [`peers`]: the members and the versioned peer list.
//! - [`plane`]: what the agent routes and the dispatcher call (register,
//!   heartbeat, host lost, the release sweep, restore at start).
//! - [`view`]: the overlay part of `GET /v1/hosts`.
//! - [`metrics`]: the overlay's Prometheus gauges and counters.
//!
//! [`Overlay`] is the in-memory state, shared by the agent plane (behind
//! its own mutex, never held with the plane's book) and the metrics
//! collector.
//!
//! Which jobs may run where: a job with `network = "overlay"` is claimed
//! only by a host whose slice has a key (it registered a tunnel); the
//! store decides this inside the claim's transaction, for push, pull and
//! p2p seeds alike. A job is refused at submit when the overlay is off.

pub mod config;
pub mod metrics;
pub mod peers;
pub(crate) mod plane;
pub mod pool;
pub mod tunnel;
pub mod view;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sparegrid_proto::overlay::TunnelReport;

pub use config::{InvalidOverlay, OverlayConfig};
pub use peers::{Member, PeerBook};
pub use pool::Pool;
pub use view::HostOverlay;

/// A peer whose last handshake is at most this old counts as connected
/// (WireGuard rekeys every 120 s of traffic and drops a session after
/// 180 s without one).
pub const RECENT_HANDSHAKE_SECS: u64 = 180;

/// A host's last tunnel report and when it came.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub report: TunnelReport,
    pub at: Instant,
}

/// The overlay's in-memory state. See the module docs.
#[derive(Debug)]
pub struct Overlay {
    pool: Option<Pool>,
    release_after: Duration,
    pub(crate) peers: PeerBook,
    pub(crate) reports: BTreeMap<String, HostReport>,
    /// Registrations that found the pool full.
    pub(crate) exhausted: u64,
    /// When the release sweep last ran (plane time).
    pub(crate) last_sweep: Option<Duration>,
}

impl Overlay {
    /// The state for `config` (validated); a bad or empty `cidr` is off.
    pub fn new(config: &OverlayConfig) -> Overlay {
        let pool = match config.network() {
            Ok(net) => net.and_then(|n| Pool::new(n, config.slice_prefix)),
            Err(e) => {
                tracing::error!("{e}; the overlay is off");
                None
            }
        };
        Overlay {
            pool,
            release_after: config.release_after,
            peers: PeerBook::new(),
            reports: BTreeMap::new(),
            exhausted: 0,
            last_sweep: None,
        }
    }

    /// The pool, when the overlay is on.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    pub fn enabled(&self) -> bool {
        self.pool.is_some()
    }

    pub fn release_after(&self) -> Duration {
        self.release_after
    }

    /// How often the release sweep runs: a tenth of the grace, between
    /// 100 ms and a minute.
    pub fn sweep_every(&self) -> Duration {
        (self.release_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    pub fn peers(&self) -> &PeerBook {
        &self.peers
    }

    /// The host that owns `public_key`, when it is a member.
    pub fn host_of_key(&self, public_key: &str) -> Option<&str> {
        self.peers
            .members()
            .find(|(_, m)| m.public_key.as_deref() == Some(public_key))
            .map(|(h, _)| h.as_str())
    }
}
