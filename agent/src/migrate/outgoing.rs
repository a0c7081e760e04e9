//! The source's side of a move (see [`super`]): one saved VM at a time, on
//! a thread of its own, so a slow upload never holds up the control loop.
//! Blocking calls throughout; the tus upload runs on a small runtime of
//! its own.
//!
//! Which way the state goes: uploaded to the target when its transfer
//! endpoint answers; else published here for the target to fetch; and when
//! the target cannot fetch it from here either (its answer says
//! `fetch_failed`), or this agent serves no transfer endpoint, relayed:
//! uploaded to the controller's `/v1/data` and fetched by the target from
//! there. The relayed copy is removed (tus termination) once the move is
//! over, whichever way it ended.
//!
//! The offer and the commit go to the target's agent API; when the offer
//! cannot reach it (a transport error: nothing answered), both go through
//! the controller instead (`POST /v1/agents/migrations/forward`). The way
//! is chosen once, at the offer, so a commit whose answer was lost is never
//! sent a second way.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sparegrid_proto::migrate::{
    ForwardRequest, ForwardStep, IncomingVm, MigrationAnswer, MigrationRequest, MigrationTarget,
    RelayRequest, RelaySlot, StateSource,
};
use sparegrid_transfer::client::{file_digests, upload, FileDigests, UploadOptions};
use sparegrid_transfer::token::{sign, Direction};

use super::{state_id, MigrateError, MigrateSetup, TOKEN_TTL};
use crate::daemon::control::Command;
use crate::grid::client::{ClientError, ControllerClient};
use crate::guestlink::HeldSubtask;

/// How many times a broken upload is resumed before the move gives up
/// (it is tried again later, resuming from the same checkpoints).
const UPLOAD_TRIES: u32 = 3;
/// How long the offer and the commit may take (the commit restores the VM).
const PEER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the control loop may take to let go of the VM.
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// One saved VM to move.
#[derive(Debug, Clone)]
pub struct OutgoingVm {
    pub vm: String,
    /// Its saved state ([`crate::runtime::Runtime::saved_state`]).
    pub state_file: PathBuf,
    pub held: HeldSubtask,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// How a move ended, for the control loop.
#[derive(Debug)]
pub enum Outcome {
    /// The VM runs on `target` now.
    Moved { target: String },
    /// Still saved here; try again later.
    Kept(MigrateError),
    /// Let go of here, but the commit failed: the attempt is handed back.
    Lost(MigrateError),
}

/// Starts moving `out` on its own thread; the control loop hears back
/// through `commands` ([`Command::MigrationReady`], then
/// [`Command::MigrationOver`]).
pub fn spawn(
    setup: Arc<MigrateSetup>,
    out: OutgoingVm,
    commands: Sender<Command>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("migrate-{}", out.vm))
        .spawn(move || {
            let mut relayed = None;
            let outcome = run(&setup, &out, &commands, &mut relayed);
            if let Some(copy) = relayed {
                copy.remove();
            }
            // A copy published for the target to fetch is not needed any
            // more (moved, or the next try publishes it again).
            if let Some((t, _)) = &setup.transfer {
                let _ = t.store().remove(&state_id(&out.held.attempt));
            }
            let _ = commands.send(Command::MigrationOver {
                vm: out.vm.clone(),
                attempt: out.held.attempt.clone(),
                outcome,
            });
        })
        .map(|_| ())
}

fn run(
    setup: &MigrateSetup,
    out: &OutgoingVm,
    commands: &Sender<Command>,
    relayed: &mut Option<RelayCopy>,
) -> Outcome {
    let Prepared { host, body, route } = match prepare(setup, out, relayed) {
        Ok(p) => p,
        Err(e) => return Outcome::Kept(e),
    };
    // Let go of the VM here: from now on it is the target's.
    let (tx, rx) = sync_channel(1);
    if commands
        .send(Command::MigrationReady {
            vm: out.vm.clone(),
            reply: tx,
        })
        .is_err()
        || !rx.recv_timeout(HANDOVER_WAIT).unwrap_or(false)
    {
        return Outcome::Kept(MigrateError::Gone);
    }
    match route.send(ForwardStep::Commit, &body) {
        Ok(a) if a.accepted => Outcome::Moved { target: host },
        Ok(a) => Outcome::Lost(MigrateError::Refused {
            host,
            reason: a.reason.unwrap_or_default(),
        }),
        Err(e) => Outcome::Lost(MigrateError::Commit {
            host,
            message: e.to_string(),
        }),
    }
}

/// A target that accepted the offer.
struct Prepared {
    host: String,
    /// The offer's body, sent again as the commit.
    body: IncomingVm,
    /// How the offer reached the target; the commit goes the same way.
    route: PeerRoute,
}

/// How the offer and the commit reach the target.
pub(super) enum PeerRoute {
    /// Its agent API, directly.
    Direct(ControllerClient),
    /// Through the controller (`POST /v1/agents/migrations/forward`).
    Forwarded { ctl: ControllerClient, to: String },
}

impl PeerRoute {
    pub(super) fn send(
        &self,
        step: ForwardStep,
        incoming: &IncomingVm,
    ) -> Result<MigrationAnswer, ClientError> {
        match self {
            PeerRoute::Direct(peer) => peer.post(step.path(), incoming, Some(PEER_TIMEOUT)),
            PeerRoute::Forwarded { ctl, to } => ctl.post(
                "/v1/agents/migrations/forward",
                &ForwardRequest {
                    to: to.clone(),
                    step,
                    incoming: incoming.clone(),
                },
                // The controller waits up to its own limit for the target.
                Some(PEER_TIMEOUT + Duration::from_secs(60)),
            ),
        }
    }
}

/// The first offer: to `peer` (the target's agent API), or, when nothing
/// answers there, through the controller `ctl`. Returns the way that
/// reached the target, for the rest of the move.
pub(super) fn first_offer(
    peer: ControllerClient,
    ctl: ControllerClient,
    host: &str,
    incoming: &IncomingVm,
) -> Result<(PeerRoute, MigrationAnswer), MigrateError> {
    let fail = |e: ClientError| MigrateError::Offer {
        host: host.to_owned(),
        message: e.to_string(),
    };
    let direct = PeerRoute::Direct(peer);
    match direct.send(ForwardStep::Offer, incoming) {
        Ok(a) => Ok((direct, a)),
        Err(ClientError::Http { url, message }) => {
            tracing::info!(to = %host, "{host}'s agent API does not answer ({url}: {message}); offering through the controller");
            let via = PeerRoute::Forwarded {
                ctl,
                to: host.to_owned(),
            };
            let a = via.send(ForwardStep::Offer, incoming).map_err(fail)?;
            Ok((via, a))
        }
        Err(e) => Err(fail(e)),
    }
}

/// A saved state parked on the controller for the target to fetch.
struct RelayCopy {
    /// Its URL on the controller's transfer endpoint.
    url: String,
    /// The upload token, which also terminates it.
    token: String,
}

impl RelayCopy {
    /// Terminates the copy (tus `DELETE`); a failure is only logged (the
    /// controller's data directory keeps it until removed by hand).
    fn remove(&self) {
        let done = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .and_then(|c| {
                c.delete(&self.url)
                    .bearer_auth(&self.token)
                    .header("Tus-Resumable", "1.0.0")
                    .send()
            });
        match done {
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND => {}
            Ok(r) => tracing::warn!(
                "removing the relayed saved state {}: HTTP {}",
                self.url,
                r.status()
            ),
            Err(e) => tracing::warn!("removing the relayed saved state {}: {e}", self.url),
        }
    }
}

/// Target, upload, offer: everything before letting go. A relayed copy
/// is left in `relayed` for the caller to remove.
fn prepare(
    setup: &MigrateSetup,
    out: &OutgoingVm,
    relayed: &mut Option<RelayCopy>,
) -> Result<Prepared, MigrateError> {
    let state_err = |source| MigrateError::State {
        path: out.state_file.clone(),
        source,
    };
    let size = std::fs::metadata(&out.state_file).map_err(state_err)?.len();
    let ctl = ControllerClient::new(&setup.controller).map_err(MigrateError::Target)?;
    let target: MigrationTarget = ctl
        .post(
            "/v1/agents/migrations",
            &MigrationRequest {
                host: setup.host.clone(),
                vm: out.vm.clone(),
                attempt: out.held.attempt.clone(),
                vcpus: out.vcpus,
                memory_mib: out.memory_mib,
                state_bytes: size,
            },
            None,
        )
        .map_err(MigrateError::Target)?;
    let host = target.host.clone();
    tracing::info!(vm = %out.vm, to = %host, "moving saved grid VM {} ({} MiB of state) to {host}", out.vm, size >> 20);
    // One pass: the digest for the offer, and the chunk digests the upload
    // or the publication then uses instead of hashing the state again.
    let digests = file_digests(&out.state_file, setup.checkpoint_bytes)
        .map(Arc::new)
        .map_err(|e| MigrateError::Upload {
            host: host.clone(),
            message: e.to_string(),
        })?;
    let blake3 = digests.blake3.clone();
    let id = state_id(&out.held.attempt);
    let fetch = if reachable(&target.transfer_url) {
        upload_state(
            setup,
            out,
            &host,
            &target.transfer_url,
            &target_token(setup, &id, &host)?,
            &id,
            &digests,
        )?;
        None
    } else {
        match publish_state(setup, out, &host, &id, &digests) {
            Ok(src) => Some(src),
            Err(e) => {
                tracing::info!(vm = %out.vm, to = %host, "{e}; relaying through the controller");
                Some(relay_state(setup, &ctl, out, &host, relayed, &digests)?)
            }
        }
    };
    let mut incoming = IncomingVm {
        from: setup.host.clone(),
        vm: out.vm.clone(),
        vcpus: out.vcpus,
        memory_mib: out.memory_mib,
        state_id: id,
        state_bytes: size,
        state_blake3: blake3,
        attempt: out.held.attempt.clone(),
        guest_subtask: out.held.id,
        timeout_ms: out.held.timeout_ms,
        fetch,
    };
    let (route, mut answer) = first_offer(
        ctl.at(&target.agent_url),
        ctl.at(&setup.controller.url),
        &host,
        &incoming,
    )?;
    if !answer.accepted && answer.fetch_failed && relayed.is_none() {
        tracing::info!(vm = %out.vm, to = %host, "{host} cannot fetch the saved state from here ({}); relaying through the controller",
            answer.reason.as_deref().unwrap_or(""));
        incoming.fetch = Some(relay_state(setup, &ctl, out, &host, relayed, &digests)?);
        answer = route
            .send(ForwardStep::Offer, &incoming)
            .map_err(|e| MigrateError::Offer {
                host: host.clone(),
                message: e.to_string(),
            })?;
    }
    if !answer.accepted {
        return Err(MigrateError::Refused {
            host,
            reason: answer.reason.unwrap_or_default(),
        });
    }
    Ok(Prepared {
        host,
        body: incoming,
        route,
    })
}

/// Whether the target's transfer endpoint answers (`OPTIONS /v1/files`,
/// any status) within 3 s.
fn reachable(transfer_url: &str) -> bool {
    let url = format!(
        "{}{}",
        transfer_url.trim_end_matches('/'),
        sparegrid_transfer::FILES
    );
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .and_then(|c| c.request(reqwest::Method::OPTIONS, &url).send())
        .is_ok()
}

/// The target cannot be reached: publish the state on this agent's own
/// transfer endpoint (once; a retry finds it there) and hand out a
/// download token for it.
fn publish_state(
    setup: &MigrateSetup,
    out: &OutgoingVm,
    host: &str,
    id: &str,
    digests: &FileDigests,
) -> Result<StateSource, MigrateError> {
    let fail = |message: String| MigrateError::Upload {
        host: host.to_owned(),
        message,
    };
    let Some((transfer, url)) = &setup.transfer else {
        return Err(fail(
            "its transfer endpoint does not answer and this agent serves none to fetch from".into(),
        ));
    };
    tracing::info!(vm = %out.vm, to = %host,
        "{host}'s transfer endpoint does not answer; it fetches the saved state from here");
    let store = transfer.store();
    if !store.is_complete(id).unwrap_or(false) {
        // A partial leftover of an earlier try is replaced.
        let _ = store.remove(id);
        store
            .import_with_digest(id, &out.state_file, &digests.blake3)
            .map_err(|e| fail(format!("publishing the saved state here: {e}")))?;
    }
    let token = sign(
        &setup.token_key,
        id,
        Direction::Download,
        SystemTime::now() + TOKEN_TTL,
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(StateSource {
        url: format!("{url}{}/{id}", sparegrid_transfer::FILES),
        token,
    })
}

/// Neither side reaches the other: parks the state on the controller's
/// transfer endpoint (a slot from `POST /v1/agents/migrations/relay`) and
/// returns where the target fetches it (a path on its controller).
fn relay_state(
    setup: &MigrateSetup,
    ctl: &ControllerClient,
    out: &OutgoingVm,
    host: &str,
    relayed: &mut Option<RelayCopy>,
    digests: &Arc<FileDigests>,
) -> Result<StateSource, MigrateError> {
    let size = std::fs::metadata(&out.state_file)
        .map_err(|source| MigrateError::State {
            path: out.state_file.clone(),
            source,
        })?
        .len();
    let slot: RelaySlot = ctl
        .post(
            "/v1/agents/migrations/relay",
            &RelayRequest {
                host: setup.host.clone(),
                attempt: out.held.attempt.clone(),
                state_bytes: size,
            },
            None,
        )
        .map_err(|e| MigrateError::Upload {
            host: host.to_owned(),
            message: format!(
                "neither host reaches the other, and the controller does not relay: {e}"
            ),
        })?;
    let base = format!(
        "{}{}",
        setup.controller.url.trim_end_matches('/'),
        slot.transfer_path
    );
    let path = format!(
        "{}{}/{}",
        slot.transfer_path,
        sparegrid_transfer::FILES,
        slot.id
    );
    *relayed = Some(RelayCopy {
        url: format!("{base}{}/{}", sparegrid_transfer::FILES, slot.id),
        token: slot.upload_token.clone(),
    });
    upload_state(
        setup,
        out,
        "the controller",
        &base,
        &slot.upload_token,
        &slot.id,
        digests,
    )?;
    Ok(StateSource {
        url: path,
        token: slot.download_token,
    })
}

/// An upload token for `id` on the target, signed with the agent token.
fn target_token(setup: &MigrateSetup, id: &str, host: &str) -> Result<String, MigrateError> {
    sign(
        &setup.token_key,
        id,
        Direction::Upload,
        SystemTime::now() + TOKEN_TTL,
    )
    .map_err(|e| MigrateError::Upload {
        host: host.to_owned(),
        message: e.to_string(),
    })
}

/// The tus upload to `base` (a transfer endpoint: the target's, or the
/// controller's for a relay), resumed up to [`UPLOAD_TRIES`] times from
/// the last checkpoint both ends hold.
fn upload_state(
    setup: &MigrateSetup,
    out: &OutgoingVm,
    to: &str,
    base: &str,
    token: &str,
    id: &str,
    digests: &Arc<FileDigests>,
) -> Result<(), MigrateError> {
    let fail = |message: String| MigrateError::Upload {
        host: to.to_owned(),
        message,
    };
    std::fs::create_dir_all(&setup.journal_dir)
        .map_err(|e| fail(format!("creating {}: {e}", setup.journal_dir.display())))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting a runtime: {e}")))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let opts = UploadOptions {
        checkpoint_bytes: setup.checkpoint_bytes,
        digests: Some(digests.clone()),
        ..UploadOptions::default()
    };
    let mut last = String::new();
    for attempt in 1..=UPLOAD_TRIES {
        match rt.block_on(upload(
            &client,
            base,
            token,
            id,
            &out.state_file,
            &setup.journal_dir,
            &opts,
        )) {
            Ok(r) => {
                tracing::info!(vm = %out.vm, to = %to,
                    "saved state uploaded: {} bytes, resumed at {}, sent {}", r.size, r.resumed_at, r.sent);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(vm = %out.vm, to = %to, "upload try {attempt}/{UPLOAD_TRIES} broke off: {e}");
                last = e.to_string();
            }
        }
    }
    Err(fail(last))
}

#[cfg(test)]
#[path = "outgoing_tests.rs"]
mod tests;
