//! `GET /v1/hosts`: every host as users see it — the registry's live view
//! (load, dominant metric, free slots, membership, running count) for hosts
//! registered since the controller started, and the store's last record
//! for the others; for hosts that hold an overlay slice, their place in the
//! overlay and their tunnel's last report ([`HostOverlay`]).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use sparegrid_proto::{Metric, VmState};

use super::AgentError;
use crate::api::AppState;
use crate::overlay::HostOverlay;
use crate::registry::Membership;
use crate::store::HostState;

/// One host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub id: String,
    /// `active` or `lost`.
    pub state: HostState,
    /// Where it stands in the two-set rule (`new`, `in`, `out`); absent for
    /// hosts known only from the store.
    pub membership: Option<Membership>,
    /// True while it can take new work (below `dispatch_below`, in the set,
    /// a free slot).
    pub eligible: bool,
    pub agent_url: Option<String>,
    pub version: Option<String>,
    pub slots: Option<u32>,
    pub free_slots: u32,
    /// Last reported composite load factor, 0..1.
    pub load: Option<f64>,
    /// The metric that drives the load factor.
    pub dominant: Option<Metric>,
    pub breakdown: BTreeMap<Metric, f64>,
    /// Attempts it last reported running.
    pub running: u64,
    pub vms: BTreeMap<VmState, u32>,
    pub suspended_ms: u64,
    /// Milliseconds since its last register or heartbeat (since this
    /// controller started; absent for hosts known only from the store).
    pub last_seen_ms_ago: Option<u64>,
    /// Its last heartbeat, ms since the Unix epoch, as the store has it.
    pub last_heartbeat_ms: Option<i64>,
    /// Its slice of the grid overlay and its tunnel's status; absent when
    /// it holds no slice.
    pub overlay: Option<HostOverlay>,
}

/// `GET /v1/hosts` answer, hosts by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostsView {
    pub hosts: Vec<HostView>,
}

/// The fields of the stored load report (see `load_json` in the module).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StoredLoad {
    load: Option<f64>,
    dominant: Option<Metric>,
    breakdown: BTreeMap<Metric, f64>,
    free_slots: u32,
    running: u64,
    vms: BTreeMap<VmState, u32>,
    suspended_ms: u64,
}

pub(super) async fn list(State(s): State<AppState>) -> Result<Json<HostsView>, AgentError> {
    let plane = &s.agents;
    let stored = plane.blocking(|store| store.list_hosts()).await?;
    let mut hosts: BTreeMap<String, HostView> = BTreeMap::new();
    {
        let book = plane.book();
        let now = plane.now();
        let eligible: std::collections::HashSet<String> = book
            .registry
            .eligible_with(now, |h| book.slots.free(h))
            .into_iter()
            .map(|h| h.host.0)
            .collect();
        for h in book.registry.hosts() {
            let last = h.last.as_ref();
            hosts.insert(
                h.id.0.clone(),
                HostView {
                    id: h.id.0.clone(),
                    state: h.state,
                    membership: Some(h.membership),
                    eligible: eligible.contains(h.id.as_str())
                        && !book.skip.contains(h.id.as_str()),
                    agent_url: h.agent_url.clone(),
                    version: Some(h.version.clone()).filter(|v| !v.is_empty()),
                    slots: Some(h.slots),
                    free_slots: book.slots.free(h),
                    load: h.load(),
                    dominant: last.and_then(|hb| hb.dominant),
                    breakdown: last.map(|hb| hb.breakdown.clone()).unwrap_or_default(),
                    running: h.running().len() as u64,
                    vms: last.map(|hb| hb.vms.clone()).unwrap_or_default(),
                    suspended_ms: last.map_or(0, |hb| hb.suspended_ms),
                    last_seen_ms_ago: Some(
                        u64::try_from(now.saturating_sub(h.last_seen).as_millis())
                            .unwrap_or(u64::MAX),
                    ),
                    last_heartbeat_ms: None,
                    overlay: None,
                },
            );
        }
    }
    for r in stored {
        if let Some(v) = hosts.get_mut(&r.id) {
            v.last_heartbeat_ms = Some(r.last_heartbeat_ms);
            continue;
        }
        let load: StoredLoad = r
            .load
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        hosts.insert(
            r.id.clone(),
            HostView {
                id: r.id,
                state: r.state,
                membership: None,
                eligible: false,
                agent_url: Some(r.address).filter(|a| !a.is_empty()),
                version: None,
                slots: None,
                free_slots: load.free_slots,
                load: load.load,
                dominant: load.dominant,
                breakdown: load.breakdown,
                running: load.running,
                vms: load.vms,
                suspended_ms: load.suspended_ms,
                last_seen_ms_ago: None,
                last_heartbeat_ms: Some(r.last_heartbeat_ms),
                overlay: None,
            },
        );
    }
    {
        let overlay = plane.overlay();
        let now = std::time::Instant::now();
        for (id, v) in hosts.iter_mut() {
            v.overlay = overlay.view(id, now);
        }
    }
    Ok(Json(HostsView {
        hosts: hosts.into_values().collect(),
    }))
}
