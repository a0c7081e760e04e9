//! `reclaim_mode = "migrate"`: a grid VM suspended too long on a busy host
//! is saved (libvirt managed save, as with `"save"`), then moved with its
//! subtask to an idle host the controller picks, restored there, and its
//! subtask finishes there, counted once. The flow and its wire types are in
//! [`sparegrid_proto::migrate`].
//!
//! - [`outgoing`]: the source's side, one move at a time on its own thread
//!   started by the control loop: ask the controller for a target, upload
//!   the saved state to the target's transfer endpoint (tus, resumable,
//!   whole blake3 verified before the file is visible), offer, hand over,
//!   commit.
//! - **Direction by reachability.** The source first probes the target's
//!   transfer endpoint (`OPTIONS`, 3 s). Reachable: it uploads. Not (the
//!   target is behind a firewall or NAT): it publishes the state on its own
//!   endpoint ([`sparegrid_transfer::store::Store::import`]) and the offer
//!   carries a URL and download token; the target downloads it with the
//!   journaled Range client (resumable) before it checks it. Relaying
//!   through the controller when neither reaches the other is not built.
//! - [`incoming`]: the target's routes (`POST /v1/migrations/offer` and
//!   `/commit` on the agent's API, agent token), which check the upload and
//!   ask the control loop to check capacity and restore.
//!
//! **Who holds the VM when.** Until the target accepted the offer the
//! source keeps the VM saved; any failure before that (no target, a broken
//! upload, a refusal) leaves it saved here, restored here when calm as with
//! `"save"`, and the move is tried again after [`RETRY_AFTER`]. Once the
//! target accepted, the source lets go (libvirt undefines the domain with
//! its saved state: the target restores under the same name and UUID, which
//! one libvirtd would refuse while the source's definition exists) and
//! commits. The target moves the attempt at the controller first (new
//! epoch: a late report from the source is stale), then restores; if the
//! restore fails it hands the attempt back (requeued, not a failure), and
//! if the commit never arrives the source hands back the old attempt. Work
//! is lost only in those last cases, never counted twice.
//!
//! **Limits.** Only attempts the controller handed out (not peer-to-peer
//! ones) and without an overlay NIC move; others stay saved here. The
//! target must have the same guest image (kernel and initrd at its own
//! `[vm]` paths): the guest's memory is restored, not rebooted.

pub mod incoming;
pub mod outgoing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sparegrid_transfer::TransferState;

use crate::config::{Config, ControllerSection, ReclaimMode, RuntimeKind};

/// How long a source waits before trying to move a VM again after a move
/// failed (no target, a broken upload, a refusal).
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// How often a target removes saved states no move came back for
/// ([`incoming::sweep_stale_states`], older than `transfer.upload_expiry`).
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// How long an upload token for the saved state is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Why a move failed; names the stage and the host or file.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("asking the controller for a target: {0}")]
    Target(crate::grid::client::ClientError),
    #[error("reading the saved state {}: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("uploading the saved state to {host}: {message}")]
    Upload { host: String, message: String },
    #[error("offering the VM to {host}: {message}")]
    Offer { host: String, message: String },
    #[error("{host} refused the VM: {reason}")]
    Refused { host: String, reason: String },
    #[error("the VM is no longer saved here (drained or reclaimed meanwhile)")]
    Gone,
    #[error("committing the move to {host}: {message}")]
    Commit { host: String, message: String },
}

/// What both sides need from the config.
#[derive(Clone)]
pub struct MigrateSetup {
    pub host: String,
    pub controller: ControllerSection,
    /// Signs and checks transfer tokens: the agent token, which every
    /// agent of a controller shares.
    pub token_key: Vec<u8>,
    /// Client journals of uploads (`<data_dir>/migrate`).
    pub journal_dir: PathBuf,
    pub checkpoint_bytes: u64,
    /// This agent's transfer endpoint and its URL, when it serves one: a
    /// source the target cannot reach publishes the state there.
    pub transfer: Option<(TransferState, String)>,
}

impl MigrateSetup {
    pub fn of(cfg: &Config, host: &str, transfer: Option<TransferState>) -> MigrateSetup {
        MigrateSetup {
            host: host.to_owned(),
            controller: cfg.controller.clone(),
            token_key: cfg.controller.token.as_bytes().to_vec(),
            journal_dir: cfg.agent.data_dir.join("migrate"),
            checkpoint_bytes: cfg.transfer.checkpoint_bytes,
            transfer: transfer.map(|t| (t, transfer_url(cfg, host))),
        }
    }
}

/// Whether this agent moves its saved VMs away.
pub fn sends(cfg: &Config) -> bool {
    cfg.policy.reclaim_mode == ReclaimMode::Migrate
}

/// Whether this agent takes saved VMs from other hosts: grid VMs (libvirt),
/// a transfer endpoint to receive the state, and a controller to fence the
/// attempt.
pub fn accepts(cfg: &Config) -> bool {
    cfg.runtime.kind == RuntimeKind::Libvirt && cfg.transfer.enabled && cfg.controller.enabled()
}

/// The URL other hosts reach the transfer endpoint at:
/// `transfer.advertise_url`, else `transfer.listen` with `host` in place of
/// an unspecified address; `https` with TLS.
pub fn transfer_url(cfg: &Config, host: &str) -> String {
    if !cfg.transfer.advertise_url.is_empty() {
        return cfg.transfer.advertise_url.trim_end_matches('/').to_owned();
    }
    let l: SocketAddr = cfg.transfer.listen;
    let scheme = if cfg.transfer.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    if l.ip().is_unspecified() {
        format!("{scheme}://{host}:{}", l.port())
    } else {
        format!("{scheme}://{l}")
    }
}

pub use sparegrid_proto::migrate::state_id;

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::grid::AttemptRef;

    #[test]
    fn state_ids_are_valid_transfer_ids_per_attempt() {
        let a = AttemptRef {
            job: "j-12".into(),
            index: 3,
            epoch: 2,
        };
        assert_eq!(state_id(&a), "vmstate-j-12-3-2");
        sparegrid_transfer::store::validate_id(&state_id(&a)).unwrap();
        let odd = AttemptRef {
            job: "../x y".into(),
            index: 0,
            epoch: 1,
        };
        assert_eq!(state_id(&odd), "vmstate-___x_y-0-1");
        sparegrid_transfer::store::validate_id(&state_id(&odd)).unwrap();
        let long = AttemptRef {
            job: "j".repeat(500),
            index: u64::MAX,
            epoch: u32::MAX,
        };
        sparegrid_transfer::store::validate_id(&state_id(&long)).unwrap();
    }

    #[test]
    fn only_libvirt_agents_with_transfer_and_controller_accept() {
        let mut cfg = Config::default();
        cfg.controller.url = "http://127.0.0.1:1".into();
        cfg.transfer.enabled = true;
        assert!(accepts(&cfg));
        cfg.runtime.kind = RuntimeKind::Process;
        assert!(!accepts(&cfg));
        cfg.runtime.kind = RuntimeKind::Libvirt;
        cfg.transfer.enabled = false;
        assert!(!accepts(&cfg));
    }

    #[test]
    fn the_transfer_url_names_the_host_for_an_unspecified_address() {
        let mut cfg = Config::default();
        cfg.transfer.listen = "0.0.0.0:7100".parse().unwrap();
        assert_eq!(transfer_url(&cfg, "h1"), "http://h1:7100");
        cfg.transfer.listen = "10.0.0.2:7100".parse().unwrap();
        assert_eq!(transfer_url(&cfg, "h1"), "http://10.0.0.2:7100");
    }
}
