//! Wire types of `reclaim_mode = "migrate"`: moving a saved grid VM with
//! its subtask from a busy host (the source) to an idle one (the target).
//!
//! 1. The source asks the controller for a target
//!    (`POST /v1/agents/migrations`, [`MigrationRequest`] →
//!    [`MigrationTarget`]).
//! 2. It uploads the VM's saved state to the target's transfer endpoint
//!    (tus, resumable, verified by its whole blake3 before it is visible);
//!    when it cannot reach that endpoint (the target is behind a firewall
//!    or NAT), it publishes the state on its own endpoint instead and the
//!    target downloads it ([`IncomingVm::fetch`]). When the target cannot
//!    reach the source either (it answers the offer with
//!    [`MigrationAnswer::fetch_failed`]), the source parks the state on the
//!    controller's transfer endpoint (`POST /v1/agents/migrations/relay`,
//!    [`RelayRequest`] → [`RelaySlot`]) and offers it again with a fetch
//!    from there: a relay through the controller.
//!
//! The offer and the commit go to the target's agent API; when the source
//! cannot reach it, it hands them to the controller
//! (`POST /v1/agents/migrations/forward`, [`ForwardRequest`] →
//! [`MigrationAnswer`]), which posts them there itself (the controller
//! reaches agents' APIs as it does to push work).
//! 3. It offers the VM to the target (`POST <agent>/v1/migrations/offer`,
//!    [`IncomingVm`] → [`MigrationAnswer`]): the target checks its load,
//!    budgets and the uploaded state without committing to anything.
//! 4. It lets go of the VM (undefines it with its saved state; its runner
//!    forgets the attempt without reporting it).
//! 5. It commits (`POST <agent>/v1/migrations/commit`, [`IncomingVm`] →
//!    [`MigrationAnswer`]): the target moves the attempt to itself at the
//!    controller (`POST /v1/agents/migrations/adopt`, [`AdoptAttempt`] →
//!    [`AdoptedAttempt`]), which fences it with a new epoch, restores the VM
//!    and runs the subtask on to its end. A completion from the source under
//!    the old epoch is stale: the subtask is counted once.
//!
//! Every body is MessagePack; every route needs the agent token.

use serde::{Deserialize, Serialize};

use crate::grid::AttemptRef;

/// `POST /v1/agents/migrations`: the source asks where to move a saved VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// The source host.
    pub host: String,
    pub vm: String,
    /// The attempt the VM holds (must be the source's current one).
    pub attempt: AttemptRef,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size of the saved state to move.
    pub state_bytes: u64,
}

/// The controller's choice: an idle, live host that takes migrations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationTarget {
    pub host: String,
    /// Where its migration routes are (`http://addr:port`).
    pub agent_url: String,
    /// Where its transfer endpoint is (`http://addr:port`).
    pub transfer_url: String,
}

/// The source's offer and commit to the target (the same body for both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingVm {
    /// The source host.
    pub from: String,
    /// The VM's name (libvirt keeps a saved domain's name on restore).
    pub vm: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The transfer id of the uploaded saved state on the target.
    pub state_id: String,
    /// Its size and whole blake3 (hex), checked against the upload.
    pub state_bytes: u64,
    pub state_blake3: String,
    /// The attempt the VM holds, under the source's epoch.
    pub attempt: AttemptRef,
    /// The guest's id for the subtask (its Hello names it after the restore).
    pub guest_subtask: u64,
    /// The subtask's timeout, ms (the guest enforces it on its own clock).
    pub timeout_ms: u64,
    /// Set when the source could not reach the target's transfer endpoint:
    /// the target downloads the state from the source instead (Range,
    /// resumable). Absent: it was uploaded as `state_id`.
    #[serde(default)]
    pub fetch: Option<StateSource>,
}

/// Where the target downloads the saved state from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateSource {
    /// The file's URL on the source's transfer endpoint (`…/v1/files/<id>`),
    /// or, relayed, a path on the controller (`/v1/data/v1/files/<id>`),
    /// which the target resolves against its own controller URL.
    pub url: String,
    /// A download token for it.
    pub token: String,
}

/// The target's answer to an offer or a commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationAnswer {
    pub accepted: bool,
    /// Why not, when refused.
    #[serde(default)]
    pub reason: Option<String>,
    /// On a commit: the attempt under its new epoch.
    #[serde(default)]
    pub attempt: Option<AttemptRef>,
    /// Refused because the state could not be fetched from
    /// [`IncomingVm::fetch`]: the source may relay it through the
    /// controller and offer again.
    #[serde(default)]
    pub fetch_failed: bool,
}

/// `POST /v1/agents/migrations/relay`: neither host reaches the other's
/// transfer endpoint; the source asks to park the saved state on the
/// controller's (`[data]`, `/v1/data`) for the target to fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRequest {
    /// The source host, which must hold the attempt.
    pub host: String,
    pub attempt: AttemptRef,
    /// The state's size ([`RelaySlot`] is refused over the controller's
    /// `data.max_upload_bytes`).
    pub state_bytes: u64,
}

/// Where and how to park the state: transfer id [`state_id`] of the
/// attempt, on the controller's transfer endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelaySlot {
    /// The transfer id.
    pub id: String,
    /// The controller's transfer endpoint, a path relative to its URL
    /// (`/v1/data`; files under `<path>/v1/files/<id>`).
    pub transfer_path: String,
    /// Upload (and termination) token for `id`.
    pub upload_token: String,
    /// Download token for `id`, handed to the target in the offer.
    pub download_token: String,
}

/// `POST /v1/agents/migrations/adopt`: the target takes the attempt over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptAttempt {
    /// The target host (the one asking).
    pub host: String,
    /// The source host, which must hold the attempt now.
    pub from: String,
    pub attempt: AttemptRef,
}

/// The attempt under its new epoch, assigned to the target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptedAttempt {
    pub attempt: AttemptRef,
}

/// Which of the target's routes a forwarded request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardStep {
    /// `/v1/migrations/offer`.
    Offer,
    /// `/v1/migrations/commit`.
    Commit,
}

impl ForwardStep {
    /// The target's route.
    pub fn path(self) -> &'static str {
        match self {
            ForwardStep::Offer => "/v1/migrations/offer",
            ForwardStep::Commit => "/v1/migrations/commit",
        }
    }
}

/// `POST /v1/agents/migrations/forward`: the source cannot reach the
/// target's agent API; the controller posts `incoming` there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// The target host (its `agent_url` is the controller's to look up).
    pub to: String,
    pub step: ForwardStep,
    /// The offer or commit; `incoming.from` is the source, which must
    /// hold `incoming.attempt`.
    pub incoming: IncomingVm,
}

/// The transfer id of an attempt's saved state, the same on every host and
/// the controller and for every try at moving it (so a retry resumes a
/// broken upload): `vmstate-<job>-<index>-<epoch>`, the job cut to 80
/// characters with those outside `A-Z a-z 0-9 - _` replaced by `_`.
pub fn state_id(a: &AttemptRef) -> String {
    let job: String = a
        .job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    format!("vmstate-{job}-{}-{}", a.index, a.epoch)
}
