//! The host registry: which agents exist, what they last reported, and the
//! two-set rule that decides which hosts may hold work.
//!
//! [`Registry`] does no I/O and reads no clock: every call takes the time as
//! a [`Duration`] since an arbitrary origin and returns what the caller must
//! do (requeue, tell an agent to stop, dispatch). The store stays the
//! authority on subtasks and attempts; the registry tracks host membership
//! only. The same calls at the same times always give the same answers, so
//! table-driven tests drive it through load spikes and missed heartbeats.
//!
//! # The two-set rule
//!
//! The registry keeps the set of hosts that may hold work. [`Registry::tick`]
//! computes the new set and compares it with the previous one:
//!
//! - a host **stays** while it is not lost, its load factor is at most
//!   `withdraw_above` and no grid VM has been suspended longer than
//!   `withdraw_after`;
//! - a host that was in the set and no longer qualifies **leaves** it:
//!   [`RegistryEvent::Withdraw`] with the attempts it last reported — once;
//! - a host that stops heartbeating for `host_timeout` becomes
//!   [`HostState::Lost`] and leaves with [`RegistryEvent::HostLost`];
//! - a host outside the set **enters** it only when its load factor is below
//!   `dispatch_below` again (hysteresis): [`RegistryEvent::Eligible`].
//!
//! A host between `dispatch_below` and `withdraw_above` that is in the set
//! keeps its work but gets none from [`Registry::eligible`]; one that is out
//! stays out. A load that wobbles inside that band never flaps.
//!
//! A host seen for the first time (for example after a controller restart,
//! when agents register again with subtasks still running) counts as having
//! been in the set: its first evaluation keeps it (with `Eligible` when it
//! is below `dispatch_below`, silently in the band) or withdraws what it
//! reports running, so no subtask is stranded on an overloaded host. A lost host that registers again starts outside the set.
//!
//! # How the controller drives it
//!
//! - `POST /v1/agents/register` → [`Registry::register`]; the reply is the
//!   [`Registered`] it returns.
//! - `POST /v1/agents/heartbeat` → [`Registry::heartbeat`] with a predicate
//!   saying which of the host's reported attempts are still current in the
//!   store (for instance membership in `Store::assigned_to(host)`); the
//!   [`HeartbeatOutcome`] becomes the [`HeartbeatReply`]. An unknown or lost
//!   host gets an error that tells it to register again.
//! - Every heartbeat interval or so (and after heartbeats, for a prompt
//!   reaction) → [`Registry::tick`]; for `Withdraw` and `HostLost` the caller
//!   requeues the host's subtasks in the store (`Store::requeue_host` or
//!   `Store::mark_lost`, which also catch assignments the host had not
//!   reported yet); for `Eligible` it wakes the dispatcher.
//! - The dispatcher fills [`Registry::eligible`] hosts' free slots and calls
//!   [`Registry::note_assigned`] so the next round does not overfill a host
//!   before its next heartbeat.

mod config;
#[cfg(test)]
mod tests;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sparegrid_proto::grid::{AttemptRef, Heartbeat, HeartbeatReply, Register, Registered};
use sparegrid_proto::images::ImageSource;
use sparegrid_proto::migrate::MigrationTarget;
use sparegrid_proto::VmState;

pub use crate::store::HostState;
pub use config::{InvalidConfig, RegistryConfig, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL};

/// Longest host name accepted (a DNS name's limit).
pub const MAX_HOST_LEN: usize = 253;

/// A host's id: the name its agent registers with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub String);

impl HostId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for HostId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for HostId {
    fn from(s: &str) -> Self {
        HostId(s.to_owned())
    }
}

impl From<String> for HostId {
    fn from(s: String) -> Self {
        HostId(s)
    }
}

/// Errors of the registry; each names the host it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("host {0:?} is not registered; register first (POST /v1/agents/register)")]
    UnknownHost(String),
    #[error(
        "host {0:?} was marked lost after missing heartbeats and its subtasks were requeued; \
         register again (POST /v1/agents/register)"
    )]
    HostLost(String),
    #[error("register from host {host:?}: `{field}` {message}")]
    BadRegister {
        host: String,
        field: &'static str,
        message: String,
    },
    #[error("heartbeat from host {host:?}: `{field}` {message}")]
    BadHeartbeat {
        host: String,
        field: &'static str,
        message: String,
    },
}

impl RegistryError {
    /// True when the agent should register (again) and retry: the answer to
    /// a heartbeat from a host the registry does not know or has lost.
    pub fn must_register(&self) -> bool {
        matches!(
            self,
            RegistryError::UnknownHost(_) | RegistryError::HostLost(_)
        )
    }
}

/// Where a host stands with respect to the set of hosts that may hold work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// First registered since the controller started and not evaluated yet.
    /// Treated as in the set: it may hold work from before a restart.
    New,
    /// In the set: may hold work; gets new work while below `dispatch_below`.
    In,
    /// Out of the set (withdrawn or lost): holds no work, gets none, and
    /// re-enters only below `dispatch_below`.
    Out,
}

/// Why a host left the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    /// Its load factor rose above `withdraw_above`.
    LoadAbove,
    /// A grid VM stayed suspended longer than `withdraw_after`.
    SuspendedTooLong,
    /// Its heartbeats stopped for `host_timeout`.
    Lost,
}

impl WithdrawReason {
    /// A short reason for logs and the store's attempt records.
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawReason::LoadAbove => "host load above withdraw threshold",
            WithdrawReason::SuspendedTooLong => "grid VM suspended too long",
            WithdrawReason::Lost => "host lost",
        }
    }
}

impl fmt::Display for WithdrawReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of the set of hosts that may hold work, from [`Registry::tick`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum RegistryEvent {
    /// The host left the set: stop `attempts` (what it last reported
    /// running) and dispatch them elsewhere. Emitted once per departure.
    Withdraw {
        host: HostId,
        attempts: Vec<AttemptRef>,
        reason: WithdrawReason,
    },
    /// The host stopped heartbeating and is now [`HostState::Lost`]; it left
    /// the set (if it was in) with `attempts`, what it last reported running.
    /// Emitted once per loss; it is the whole departure, there is no
    /// separate `Withdraw`.
    HostLost {
        host: HostId,
        attempts: Vec<AttemptRef>,
    },
    /// The host entered the set below `dispatch_below` (or was seen for the
    /// first time below it): wake the dispatcher, it may have free slots.
    Eligible { host: HostId },
}

impl RegistryEvent {
    pub fn host(&self) -> &HostId {
        match self {
            RegistryEvent::Withdraw { host, .. }
            | RegistryEvent::HostLost { host, .. }
            | RegistryEvent::Eligible { host } => host,
        }
    }

    /// Why the host's attempts must go, for `Withdraw` and `HostLost`.
    pub fn withdraw_reason(&self) -> Option<WithdrawReason> {
        match self {
            RegistryEvent::Withdraw { reason, .. } => Some(*reason),
            RegistryEvent::HostLost { .. } => Some(WithdrawReason::Lost),
            RegistryEvent::Eligible { .. } => None,
        }
    }
}

/// What [`Registry::heartbeat`] decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatOutcome {
    /// Attempts the host reported running that it must stop, in the order
    /// it reported them.
    pub withdraw: Vec<AttemptRef>,
}

impl HeartbeatOutcome {
    /// The agent's reply.
    pub fn into_reply(self) -> HeartbeatReply {
        HeartbeatReply {
            overlay_peers: None,
            withdraw: self.withdraw,
            lost: Vec::new(),
            peers: Vec::new(),
        }
    }
}

/// A host that can take new work now, from [`Registry::eligible`].
#[derive(Debug, Clone, PartialEq)]
pub struct EligibleHost {
    pub host: HostId,
    pub agent_url: Option<String>,
    pub load: f64,
    /// Free slots as last reported, less what was assigned since.
    pub free_slots: u32,
}

/// One host as the registry knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub id: HostId,
    pub version: String,
    pub agent_url: Option<String>,
    /// Subtasks the agent can run at once.
    pub slots: u32,
    /// Takes part in peer-to-peer jobs (serves `/v1/peer/*` at `agent_url`).
    pub p2p: bool,
    /// Its transfer endpoint, if it serves one.
    pub transfer_url: Option<String>,
    /// Takes saved grid VMs from other hosts (`reclaim_mode = "migrate"`).
    pub migrate_in: bool,
    /// Grid VM images it serves, by manifest sha256.
    pub images: Vec<String>,
    pub state: HostState,
    pub membership: Membership,
    /// When it (last) registered.
    pub registered_at: Duration,
    /// Its last register or heartbeat; the host timeout counts from here.
    pub last_seen: Duration,
    /// Its last heartbeat since it (re-)registered, if any.
    pub last: Option<Heartbeat>,
    /// Slots handed out since the last heartbeat ([`Registry::note_assigned`]).
    pub assigned_since: u32,
}

impl Host {
    /// Last reported load factor.
    pub fn load(&self) -> Option<f64> {
        self.last.as_ref().map(|hb| hb.load)
    }

    /// Free slots as last reported (capped at `slots`), less what was
    /// assigned since. 0 before the first heartbeat.
    pub fn free_slots(&self) -> u32 {
        self.last.as_ref().map_or(0, |hb| {
            hb.free_slots
                .min(self.slots)
                .saturating_sub(self.assigned_since)
        })
    }

    /// Attempts it last reported running.
    pub fn running(&self) -> &[AttemptRef] {
        self.last.as_ref().map_or(&[], |hb| &hb.running)
    }

    /// In the set of hosts that may hold work (a new host counts as in).
    pub fn may_hold_work(&self) -> bool {
        self.state == HostState::Active && self.membership != Membership::Out
    }
}

/// The hosts and the two-set rule. See the module docs.
#[derive(Debug, Clone)]
pub struct Registry {
    config: RegistryConfig,
    hosts: BTreeMap<HostId, Host>,
}

impl Registry {
    /// An empty registry. `config` should have passed
    /// [`RegistryConfig::validate`].
    pub fn new(config: RegistryConfig) -> Registry {
        Registry {
            config,
            hosts: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Registers a host, or refreshes one that registers again (an agent
    /// restart): it keeps its id, takes the new version, address and slots,
    /// forgets its last heartbeat (the next one reports afresh) and is no
    /// longer lost. A lost host comes back outside the set and re-enters it
    /// below `dispatch_below`; a live host keeps its place in the set.
    pub fn register(&mut self, reg: Register, now: Duration) -> Result<Registered, RegistryError> {
        check_register(&reg)?;
        let Register {
            host,
            version,
            agent_url,
            slots,
            p2p,
            tunnel: _,
            transfer_url,
            migrate_in,
            images,
        } = reg;
        match self.hosts.get_mut(host.as_str()) {
            Some(h) => {
                if h.state == HostState::Lost {
                    tracing::info!(host = %h.id, "lost host registered again");
                    h.state = HostState::Active;
                    h.membership = Membership::Out;
                } else {
                    tracing::info!(host = %h.id, "host registered again");
                }
                h.version = version;
                h.agent_url = agent_url;
                h.slots = slots;
                h.p2p = p2p;
                h.transfer_url = transfer_url;
                h.migrate_in = migrate_in;
                h.images = images;
                h.registered_at = now;
                h.last_seen = now;
                h.last = None;
                h.assigned_since = 0;
            }
            None => {
                let id = HostId(host.clone());
                tracing::info!(host = %id, slots, "host registered");
                self.hosts.insert(
                    id.clone(),
                    Host {
                        id,
                        version,
                        agent_url,
                        slots,
                        p2p,
                        transfer_url,
                        migrate_in,
                        images,
                        state: HostState::Active,
                        membership: Membership::New,
                        registered_at: now,
                        last_seen: now,
                        last: None,
                        assigned_since: 0,
                    },
                );
            }
        }
        Ok(Registered {
            overlay: None,
            host,
            heartbeat_ms: self.config.heartbeat_ms(),
        })
    }

    /// Records a heartbeat and says which reported attempts the host must
    /// stop.
    ///
    /// `is_current(attempt)` is the caller's word from the store: true when
    /// the attempt is still the current attempt of a subtask assigned to
    /// this host. Every reported attempt for which it is false is withdrawn
    /// (it was requeued, superseded or cancelled). When the host is outside
    /// the set, every reported attempt is withdrawn whatever `is_current`
    /// says, so an agent stops even if the requeue has not reached the store.
    ///
    /// Membership does not change here; [`Registry::tick`] applies the
    /// two-set rule to the recorded report.
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat,
        now: Duration,
        mut is_current: impl FnMut(&AttemptRef) -> bool,
    ) -> Result<HeartbeatOutcome, RegistryError> {
        let h = self
            .hosts
            .get_mut(hb.host.as_str())
            .ok_or_else(|| RegistryError::UnknownHost(hb.host.clone()))?;
        if h.state == HostState::Lost {
            return Err(RegistryError::HostLost(hb.host));
        }
        if !hb.load.is_finite() || hb.load < 0.0 {
            return Err(RegistryError::BadHeartbeat {
                host: hb.host,
                field: "load",
                message: format!("must be a number of at least 0, got {}", hb.load),
            });
        }
        let out = h.membership == Membership::Out;
        let withdraw = hb
            .running
            .iter()
            .filter(|a| out || !is_current(a))
            .cloned()
            .collect();
        h.last_seen = now;
        h.assigned_since = 0;
        h.last = Some(hb);
        Ok(HeartbeatOutcome { withdraw })
    }

    /// Applies the two-set rule at `now` and returns what changed, in host
    /// id order. See the module docs.
    pub fn tick(&mut self, now: Duration) -> Vec<RegistryEvent> {
        let cfg = &self.config;
        let mut events = Vec::new();
        for h in self.hosts.values_mut() {
            if h.state == HostState::Lost {
                continue;
            }
            let silent = now.saturating_sub(h.last_seen);
            if silent >= cfg.host_timeout {
                tracing::info!(host = %h.id, silent = ?silent, "host lost: no heartbeat");
                h.state = HostState::Lost;
                h.membership = Membership::Out;
                h.assigned_since = 0;
                events.push(RegistryEvent::HostLost {
                    host: h.id.clone(),
                    attempts: h.running().to_vec(),
                });
                continue;
            }
            let Some(hb) = &h.last else { continue };
            let suspended_too_long = Duration::from_millis(hb.suspended_ms) > cfg.withdraw_after;
            let stay = if hb.load > cfg.withdraw_above {
                Err(WithdrawReason::LoadAbove)
            } else if suspended_too_long {
                Err(WithdrawReason::SuspendedTooLong)
            } else {
                Ok(())
            };
            let enter = hb.load < cfg.dispatch_below && !suspended_too_long;
            match (h.membership, stay) {
                (Membership::New | Membership::In, Err(reason)) => {
                    tracing::info!(
                        host = %h.id,
                        load = hb.load,
                        suspended_ms = hb.suspended_ms,
                        running = hb.running.len(),
                        %reason,
                        "host withdrawn"
                    );
                    h.membership = Membership::Out;
                    events.push(RegistryEvent::Withdraw {
                        host: h.id.clone(),
                        attempts: hb.running.clone(),
                        reason,
                    });
                }
                (Membership::New | Membership::Out, Ok(())) if enter => {
                    tracing::info!(host = %h.id, load = hb.load, "host eligible");
                    h.membership = Membership::In;
                    events.push(RegistryEvent::Eligible { host: h.id.clone() });
                }
                (Membership::New, Ok(())) => {
                    // Fit to keep what it may run, too loaded for new work:
                    // it stays in the set (hysteresis band), no event.
                    h.membership = Membership::In;
                }
                (Membership::In, Ok(())) | (Membership::Out, _) => {}
            }
        }
        events
    }

    /// Hosts that can take new work at `now`: active, in the set, heard from
    /// within `host_timeout`, load below `dispatch_below` and a free slot.
    /// Least loaded first, then most free slots, then by id.
    pub fn eligible(&self, now: Duration) -> Vec<EligibleHost> {
        self.eligible_with(now, Host::free_slots)
    }

    /// [`Registry::eligible`] with the caller's count of each host's free
    /// slots (the agent plane credits slots as completions arrive, between
    /// heartbeats).
    pub fn eligible_with(
        &self,
        now: Duration,
        free_slots: impl Fn(&Host) -> u32,
    ) -> Vec<EligibleHost> {
        let cfg = &self.config;
        let mut out: Vec<EligibleHost> = self
            .hosts
            .values()
            .filter(|h| {
                h.state == HostState::Active
                    && h.membership == Membership::In
                    && now.saturating_sub(h.last_seen) < cfg.host_timeout
            })
            .filter_map(|h| {
                let load = h.load()?;
                let free_slots = free_slots(h);
                (load < cfg.dispatch_below && free_slots > 0).then(|| EligibleHost {
                    host: h.id.clone(),
                    agent_url: h.agent_url.clone(),
                    load,
                    free_slots,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            a.load
                .total_cmp(&b.load)
                .then(b.free_slots.cmp(&a.free_slots))
                .then_with(|| a.host.cmp(&b.host))
        });
        out
    }

    /// Where a saved grid VM from `from` should go (`reclaim_mode =
    /// "migrate"`): a host other than `from` that takes migrations, has
    /// both URLs, is active and not withdrawn, was heard from within
    /// `host_timeout`, reports a load below `dispatch_below` and no grid VM
    /// suspended or saved (a host that is busy itself is no idle host).
    /// The least loaded wins, then the id. Free slots do not matter: a
    /// grid VM host may have no VM (so no free slot) exactly when idle.
    pub fn migration_target(&self, from: &str, now: Duration) -> Option<MigrationTarget> {
        let cfg = &self.config;
        self.hosts
            .values()
            .filter(|h| {
                h.id.as_str() != from
                    && h.migrate_in
                    && h.state == HostState::Active
                    && h.membership != Membership::Out
                    && now.saturating_sub(h.last_seen) < cfg.host_timeout
            })
            .filter_map(|h| {
                let hb = h.last.as_ref()?;
                let busy = [VmState::Suspended, VmState::Saved]
                    .iter()
                    .any(|s| hb.vms.get(s).copied().unwrap_or(0) > 0);
                if busy || hb.load >= cfg.dispatch_below {
                    return None;
                }
                Some((
                    hb.load,
                    MigrationTarget {
                        host: h.id.0.clone(),
                        agent_url: h.agent_url.clone()?,
                        transfer_url: h.transfer_url.clone()?,
                    },
                ))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.host.cmp(&b.1.host)))
            .map(|(_, t)| t)
    }

    /// Live hosts that serve image `digest` on a transfer endpoint, least
    /// loaded first (a host without a heartbeat yet last), then by id.
    pub fn image_sources(&self, digest: &str, now: Duration) -> Vec<ImageSource> {
        let mut v: Vec<(f64, ImageSource)> = self
            .hosts
            .values()
            .filter(|h| {
                h.state == HostState::Active
                    && now.saturating_sub(h.last_seen) < self.config.host_timeout
                    && h.images.iter().any(|d| d == digest)
            })
            .filter_map(|h| {
                Some((
                    h.load().unwrap_or(f64::MAX),
                    ImageSource {
                        host: h.id.0.clone(),
                        transfer_url: h.transfer_url.clone()?,
                        download_tokens: Vec::new(),
                    },
                ))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.host.cmp(&b.1.host)));
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Notes that `n` subtasks were just assigned to `host`, so its free
    /// slots shrink until its next heartbeat reports afresh. Unknown hosts
    /// are ignored.
    pub fn note_assigned(&mut self, host: &str, n: u32) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.assigned_since = h.assigned_since.saturating_add(n);
        }
    }

    pub fn host(&self, id: &str) -> Option<&Host> {
        self.hosts.get(id)
    }

    /// Every host, by id.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// Checks a registration's own fields (`host`, `agent_url`), as
/// [`Registry::register`] does first; callers with more to check (the
/// overlay's tunnel) call it before they act on the registration.
pub fn check_register(reg: &Register) -> Result<(), RegistryError> {
    let bad = |field, message: String| RegistryError::BadRegister {
        host: reg.host.clone(),
        field,
        message,
    };
    let host = &reg.host;
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(bad(
            "host",
            format!("must be 1 to {MAX_HOST_LEN} characters, got {}", host.len()),
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
    {
        return Err(bad(
            "host",
            format!("may hold only ASCII letters, digits and . - _ :, found {c:?}"),
        ));
    }
    if let Some(url) = &reg.agent_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(
                "agent_url",
                format!("must start with http:// or https://, got {url:?}"),
            ));
        }
    }
    Ok(())
}
