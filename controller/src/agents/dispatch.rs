//! Push dispatch: the task that applies the registry's two-set rule to the
//! store and hands queued subtasks to eligible hosts.
//!
//! [`spawn_dispatcher`] first restores the hosts the store knows (they must
//! register again before they get work, and are lost after `host_timeout`
//! if they do not), then runs a round every `dispatch.interval` and
//! whenever [`AgentPlane::wake`] is called (a job was created, a heartbeat
//! or completion arrived). A round:
//!
//! 1. runs [`Registry::tick`](crate::registry::Registry::tick) and applies
//!    its events ([`apply_events`]): `Withdraw` → `Store::requeue_host`,
//!    `HostLost` → `Store::mark_lost`; the requeued attempts are remembered
//!    for the host's next heartbeat reply;
//! 2. for each eligible host (least loaded first), claims up to its free
//!    slots (at most `dispatch.batch_size`; counted between heartbeats by
//!    the plane's slot book, so a completion frees its slot at once) with
//!    `Store::claim`, and POSTs
//!    them as one [`AssignBatch`] (MessagePack, agent token) to
//!    `<agent_url>/v1/subtasks` on its own task. When the POST fails, the
//!    claimed attempts go back to the queue (`Store::withdraw`) and the host
//!    gets nothing more until its next heartbeat.
//!
//! Each round first seeds peer-to-peer jobs ([`seed`]): queued p2p
//! subtasks go to a few p2p agents (`POST <agent_url>/v1/peer/seed`),
//! which trade them among themselves; the controller then only waits for
//! their completions, from whichever agent ran them.
//!
//! Each round also withdraws expired pull leases (`Store::expire_leases`)
//! and wakes waiting lease requests when that revived subtasks. The push
//! dispatcher only claims push jobs; pull jobs are only leased
//! ([`super::leases`]).
//!
//! A host that left the set between the eligibility check and the claim
//! gets its claimed attempts withdrawn at once, so no subtask is pushed to
//! a withdrawn host.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::header;
#[cfg(doc)]
use sparegrid_proto::grid::StopBatch;
use sparegrid_proto::grid::{
    AssignBatch, Assignment as WireAssignment, AttemptRef, PeerList, Register,
};
use tokio::task::JoinHandle;

use super::msgpack::{encode, MSGPACK};
use super::{AgentError, AgentPlane};
use crate::job::Resources;
use crate::registry::{Membership, RegistryEvent};
use crate::store::{Assignment, HostState, JobId, StoreError, SubtaskRef};

/// Jobs whose resources are remembered between rounds; the cache is
/// cleared when it grows past this.
const RESOURCE_CACHE: usize = 1024;

/// Starts the dispatcher on the current tokio runtime. It runs until the
/// handle is aborted or the runtime stops.
pub fn spawn_dispatcher(plane: AgentPlane) -> JoinHandle<()> {
    tokio::spawn(async move {
        restore(&plane).await;
        crate::overlay::plane::restore(&plane).await;
        let mut every = tokio::time::interval(plane.inner.config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = plane.inner.wake.notified() => {}
            }
            round(&plane).await;
        }
    })
}

/// Puts the store's active hosts into the registry with no slots, so that
/// a host that never comes back after a restart is marked lost (and its
/// subtasks requeued) after `host_timeout`. Its heartbeats are answered
/// with `must_register` until it registers again.
async fn restore(plane: &AgentPlane) {
    let hosts = match plane.blocking(|store| store.list_hosts()).await {
        Ok(hosts) => hosts,
        Err(e) => {
            tracing::error!("restoring hosts from the store: {e}");
            return;
        }
    };
    let now = plane.now();
    let mut book = plane.book();
    let mut restored = 0usize;
    for h in hosts {
        if h.state != HostState::Active || book.registry.host(&h.id).is_some() {
            continue;
        }
        let agent_url = (h.address.starts_with("http://") || h.address.starts_with("https://"))
            .then(|| h.address.clone());
        let reg = Register {
            images: Vec::new(),
            migrate_in: false,
            transfer_url: None,
            tunnel: None,
            host: h.id.clone(),
            version: String::new(),
            agent_url,
            slots: 0,
            p2p: false,
        };
        match book.registry.register(reg, now) {
            Ok(_) => {
                book.restored.insert(h.id);
                restored += 1;
            }
            Err(e) => tracing::warn!(host = %h.id, "not restoring a stored host: {e}"),
        }
    }
    if restored > 0 {
        tracing::info!(
            hosts = restored,
            "restored hosts from the store; waiting for them to register"
        );
    }
}

/// One dispatch round; see the module docs.
pub(crate) async fn round(plane: &AgentPlane) {
    let events = {
        let mut book = plane.book();
        let now = plane.now();
        let mut events = std::mem::take(&mut book.retry);
        events.extend(book.registry.tick(now));
        events
    };
    apply_events(plane, events).await;
    super::leases::expire(plane).await;
    crate::overlay::plane::sweep(plane).await;
    let hosts = {
        let book = plane.book();
        let now = plane.now();
        book.registry
            .eligible_with(now, |h| book.slots.free(h))
            .into_iter()
            .filter(|h| !book.skip.contains(h.host.as_str()))
            .collect::<Vec<_>>()
    };
    seed(plane).await;
    let batch = plane.inner.config.batch_size;
    for h in hosts {
        let Some(url) = h.agent_url.clone() else {
            // No address to push to: a pulling agent leases instead.
            continue;
        };
        let n = h.free_slots.min(batch) as usize;
        let host = h.host.as_str().to_owned();
        let claimed = match claim(plane, &host, n, Claim::Push).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host = %host, "claiming subtasks: {e}");
                continue;
            }
        };
        if claimed.is_empty() {
            // The queue is empty for every host.
            break;
        }
        let fit = {
            let mut book = plane.book();
            let now = plane.now();
            book.slots
                .pushed(&host, claimed.iter().map(attempt_of_assignment), now);
            let fit =
                book.registry.host(&host).is_some_and(|x| {
                    x.state == HostState::Active && x.membership == Membership::In
                }) && !book.skip.contains(&host);
            fit
        };
        if !fit {
            give_back(plane, &host, &claimed, "host left the eligible set").await;
            continue;
        }
        let batch = match build_batch(plane, claimed.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(host = %host, "building a batch: {e}");
                give_back(plane, &host, &claimed, "could not encode the batch").await;
                continue;
            }
        };
        let plane = plane.clone();
        tokio::spawn(async move {
            if let Err(e) = push(&plane, &url, batch).await {
                tracing::warn!(host = %host, url = %url, subtasks = claimed.len(), "push failed: {e}");
                plane.book().skip.insert(host.clone());
                give_back(&plane, &host, &claimed, "push to agent failed").await;
                plane.wake();
            }
        });
    }
}

/// Which of a job's subtasks a claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Push jobs' (`Store::claim`).
    Push,
    /// Peer-to-peer jobs' seeds (`Store::claim_seeds`).
    Seeds,
}

/// Seeds queued peer-to-peer subtasks: up to `dispatch.batch_size` to each
/// of the `dispatch.p2p_seed_hosts` eligible p2p agents (below
/// `dispatch_below`, free slots or not) with the most free slots, as an [`AssignBatch`] to `<agent_url>/v1/peer/seed`. Free slots
/// only rank the hosts: a seed waits in the agent's durable queue, where
/// idle peers steal it. A failed POST gives the seeds back to the queue
/// and skips the host until its next heartbeat.
async fn seed(plane: &AgentPlane) {
    match plane.blocking(|store| store.p2p_active()).await {
        Ok(active) => {
            let started = {
                let mut book = plane.book();
                let started = active && !book.p2p_active;
                book.p2p_active = active;
                started
            };
            if started {
                push_peer_lists(plane);
            }
        }
        Err(e) => tracing::warn!("checking for p2p jobs: {e}"),
    }
    if !plane.book().p2p_active {
        return;
    }
    let mut seeds: Vec<(String, String, u32)> = {
        let book = plane.book();
        let now = plane.now();
        // The eligible hosts with no free slot too: seeds queue at the agent.
        book.registry
            .eligible_with(now, |_| 1)
            .into_iter()
            .filter(|h| !book.skip.contains(h.host.as_str()))
            .filter_map(|h| {
                let x = book.registry.host(h.host.as_str())?;
                let url = h.agent_url.clone().filter(|_| x.p2p)?;
                Some((h.host.as_str().to_owned(), url, book.slots.free(x)))
            })
            .collect()
    };
    seeds.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    seeds.truncate(plane.inner.config.p2p_seed_hosts as usize);
    let batch = plane.inner.config.batch_size as usize;
    for (host, url, _) in seeds {
        let claimed = match claim(plane, &host, batch, Claim::Seeds).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host = %host, "claiming p2p seeds: {e}");
                continue;
            }
        };
        if claimed.is_empty() {
            break;
        }
        let body = match build_batch(plane, claimed.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(host = %host, "building a seed batch: {e}");
                give_back(plane, &host, &claimed, "could not encode the seeds").await;
                continue;
            }
        };
        let plane = plane.clone();
        tokio::spawn(async move {
            match post_to_agent(&plane, &url, "/v1/peer/seed", body).await {
                Ok(()) => {
                    tracing::debug!(host = %host, seeds = claimed.len(), "p2p subtasks seeded");
                    // More may be queued: seed again without waiting a round.
                    plane.wake();
                }
                Err(e) => {
                    tracing::warn!(host = %host, url = %url, seeds = claimed.len(), "seeding failed: {e}");
                    plane.book().skip.insert(host.clone());
                    give_back(&plane, &host, &claimed, "seeding the agent failed").await;
                    plane.wake();
                }
            }
        });
    }
}

/// A p2p job just started: tells every p2p agent its peers now
/// (`POST <agent_url>/v1/peer/peers`), so idle ones start stealing without
/// waiting for their next heartbeat reply (which carries the list too). A
/// failed push is only logged: the heartbeat reply is the fallback.
fn push_peer_lists(plane: &AgentPlane) {
    let lists: Vec<(String, String, Vec<u8>)> = {
        let book = plane.book();
        book.registry
            .hosts()
            .filter(|h| h.p2p && h.state == HostState::Active)
            .filter_map(|h| {
                let url = h.agent_url.clone()?;
                let body = encode(&PeerList {
                    peers: book.peers_of(h.id.as_str()),
                })
                .ok()?;
                Some((h.id.as_str().to_owned(), url, body))
            })
            .collect()
    };
    for (host, url, body) in lists {
        let plane = plane.clone();
        tokio::spawn(async move {
            if let Err(e) = post_to_agent(&plane, &url, "/v1/peer/peers", body).await {
                tracing::debug!(host = %host, "pushing the peer list: {e}");
            }
        });
    }
}

/// Claims up to `n` subtasks for `host` and fills in the resources of jobs
/// not seen before.
async fn claim(
    plane: &AgentPlane,
    host: &str,
    n: usize,
    kind: Claim,
) -> Result<Vec<Assignment>, AgentError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let known: BTreeSet<JobId> = plane.book().resources.keys().cloned().collect();
    let host = host.to_owned();
    let (claimed, fetched) = plane
        .blocking(move |store| {
            let claimed = match kind {
                Claim::Push => store.claim(&host, n)?,
                Claim::Seeds => store.claim_seeds(&host, n)?,
            };
            let mut fetched = BTreeMap::new();
            for a in &claimed {
                if !known.contains(&a.job) && !fetched.contains_key(&a.job) {
                    let req = store.job_request(&a.job)?;
                    fetched.insert(a.job.clone(), req.resources);
                }
            }
            Ok::<_, StoreError>((claimed, fetched))
        })
        .await?;
    if !fetched.is_empty() {
        let mut book = plane.book();
        if book.resources.len() + fetched.len() > RESOURCE_CACHE {
            book.resources.clear();
        }
        book.resources.extend(fetched);
    }
    Ok(claimed)
}

/// The wire batch for `claimed`.
fn build_batch(plane: &AgentPlane, claimed: Vec<Assignment>) -> Result<Vec<u8>, AgentError> {
    let book = plane.book();
    let assignments = claimed
        .into_iter()
        .map(|a| {
            let r = book.resources.get(&a.job).cloned().unwrap_or_default();
            to_wire(a, &r)
        })
        .collect();
    drop(book);
    encode(&AssignBatch { assignments })
}

/// A store assignment as the agent receives it.
pub fn to_wire(a: Assignment, r: &Resources) -> WireAssignment {
    WireAssignment {
        network: a.network,
        attempt: AttemptRef {
            job: a.job.0,
            index: a.index,
            epoch: a.epoch,
        },
        argv: a.spec.argv,
        env: a.spec.env,
        stdin: a.spec.stdin,
        timeout_ms: r.timeout_secs.saturating_mul(1000),
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
    }
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("POST {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("POST {url}: the agent answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

/// POSTs an encoded [`AssignBatch`] to `<agent_url>/v1/subtasks`.
async fn push(plane: &AgentPlane, agent_url: &str, body: Vec<u8>) -> Result<(), PushError> {
    post_to_agent(plane, agent_url, "/v1/subtasks", body).await
}

/// POSTs an encoded [`StopBatch`] to `<agent_url>/v1/subtasks/stop`.
pub(crate) async fn push_stop(
    plane: &AgentPlane,
    agent_url: &str,
    body: Vec<u8>,
) -> Result<(), PushError> {
    post_to_agent(plane, agent_url, "/v1/subtasks/stop", body).await
}

/// POSTs a MessagePack `body` to `<agent_url><path>` with the agent token.
async fn post_to_agent(
    plane: &AgentPlane,
    agent_url: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(), PushError> {
    let url = format!("{}{path}", agent_url.trim_end_matches('/'));
    let mut req = plane
        .inner
        .client
        .post(&url)
        .header(header::CONTENT_TYPE, MSGPACK)
        .body(body);
    if let Some(token) = &plane.inner.agent_token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|source| PushError::Http {
        url: url.clone(),
        source,
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let mut body = resp.text().await.unwrap_or_default();
    body.truncate(512);
    Err(PushError::Status {
        url,
        status: status.as_u16(),
        body,
    })
}

/// Puts claimed attempts back in the queue (those still current).
async fn give_back(plane: &AgentPlane, host: &str, claimed: &[Assignment], reason: &'static str) {
    {
        let mut book = plane.book();
        for a in claimed {
            book.slots.release(host, &attempt_of_assignment(a));
        }
    }
    let refs: Vec<(JobId, u64, u32)> = claimed
        .iter()
        .map(|a| (a.job.clone(), a.index, a.epoch))
        .collect();
    let result = plane
        .blocking(move |store| {
            let mut n = 0usize;
            for (job, index, epoch) in &refs {
                if store.withdraw(job, *index, *epoch, reason)? {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await;
    match result {
        Ok(n) => tracing::info!(host, requeued = n, reason, "assignments given back"),
        Err(e) => tracing::error!(host, reason, "giving assignments back: {e}"),
    }
}

fn attempt_of_assignment(a: &Assignment) -> AttemptRef {
    AttemptRef {
        job: a.job.0.clone(),
        index: a.index,
        epoch: a.epoch,
    }
}

pub(crate) fn attempt_of(r: SubtaskRef) -> AttemptRef {
    AttemptRef {
        job: r.job.0,
        index: r.index,
        epoch: r.epoch,
    }
}

/// Applies registry events to the store: requeues the subtasks of hosts
/// that left the set and remembers them for the host's next heartbeat
/// reply. An event whose store call fails is kept and retried next round.
pub(crate) async fn apply_events(plane: &AgentPlane, events: Vec<RegistryEvent>) {
    for event in events {
        let host = event.host().as_str().to_owned();
        let (reported, result) = match &event {
            RegistryEvent::Eligible { .. } => continue,
            RegistryEvent::Withdraw {
                attempts, reason, ..
            } => {
                let h = host.clone();
                let reason = reason.as_str();
                (
                    attempts.clone(),
                    plane.blocking(move |s| s.requeue_host(&h, reason)).await,
                )
            }
            RegistryEvent::HostLost { attempts, .. } => {
                plane.book().slots.forget(&host);
                crate::overlay::plane::host_lost(plane, &host);
                let h = host.clone();
                let result = plane
                    .blocking(move |s| match s.mark_lost(&h) {
                        Err(StoreError::HostNotFound(_)) => Ok(Vec::new()),
                        other => other,
                    })
                    .await;
                (attempts.clone(), result)
            }
        };
        match result {
            Ok(requeued) => {
                if !requeued.is_empty() {
                    tracing::info!(host = %host, requeued = requeued.len(), "subtasks requeued");
                    plane.wake_leases();
                }
                let mut book = plane.book();
                let stop = book.stop.entry(host).or_default();
                let mut seen: BTreeSet<(String, u64, u32)> = stop
                    .iter()
                    .map(|a| (a.job.clone(), a.index, a.epoch))
                    .collect();
                for a in reported
                    .into_iter()
                    .chain(requeued.into_iter().map(attempt_of))
                {
                    if seen.insert((a.job.clone(), a.index, a.epoch)) {
                        stop.push(a);
                    }
                }
            }
            Err(e) => {
                tracing::error!(host = %host, "applying {event:?} to the store: {e}; retrying next round");
                plane.book().retry.push(event);
            }
        }
    }
}
