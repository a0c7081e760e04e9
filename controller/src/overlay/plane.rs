//! The overlay's hooks in the agent plane: what `POST /v1/agents/register`
//! and `POST /v1/agents/heartbeat` do for the overlay, what a lost host
//! changes, the periodic release of lost hosts' slices, and loading the
//! slices from the store when the controller starts. Store calls run on
//! the blocking pool; the [`Overlay`] mutex is never held across one.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use sparegrid_proto::grid::Register;
use sparegrid_proto::overlay::{OverlayLease, OverlayPeers, TunnelReport};

use super::{tunnel, HostReport, Member, Overlay};
use crate::agents::{AgentError, AgentPlane};
use crate::store::{HostState, SliceLease, StoreError};

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A registration: with a tunnel (and the overlay on) the host gets its
/// slice, and the lease for [`Registered::overlay`]; without one it keeps
/// any slice it has but leaves the peer list. Call before the registry
/// records the host: an error refuses the whole registration.
///
/// [`Registered::overlay`]: sparegrid_proto::grid::Registered::overlay
pub(crate) async fn register(
    plane: &AgentPlane,
    reg: &Register,
    remote: Option<SocketAddr>,
) -> Result<Option<OverlayLease>, AgentError> {
    let Some(pool) = plane.overlay().pool().copied() else {
        if reg.tunnel.is_some() {
            tracing::debug!(host = %reg.host, "tunnel registered, but no overlay is configured");
        }
        return Ok(None);
    };
    let host = reg.host.clone();
    let Some(t) = &reg.tunnel else {
        // Always asked of the store (not only when the member we know has
        // a key): a slice restored a moment later must not keep its key.
        let h = host.clone();
        plane.blocking(move |s| s.detach_slice(Some(&h))).await?;
        let mut o = plane.overlay();
        if let Some(m) = o.peers.member(&host).cloned() {
            if m.public_key.is_some() {
                tracing::info!(host = %host, "host registered without its tunnel; out of the peer list");
            }
            o.peers.upsert(
                &host,
                Member {
                    public_key: None,
                    endpoint: None,
                    active: true,
                    ..m
                },
            );
        }
        return Ok(None);
    };
    let ep = tunnel::check(t, remote).map_err(|e| AgentError::Tunnel {
        host: host.clone(),
        field: e.field,
        message: e.message,
    })?;
    let (h, key, endpoint) = (host.clone(), ep.public_key.clone(), ep.endpoint.clone());
    let leased = plane
        .blocking(move |s| {
            let pick = |used: &[String]| {
                pool.first_free(used.iter().map(String::as_str))
                    .map(|n| n.to_string())
            };
            let mut out = s.lease_slice(&h, &key, endpoint.as_deref(), &pick)?;
            if let SliceLease::Leased { record, .. } = &out {
                if pool.index_of_str(&record.slice).is_none() {
                    // Held from an earlier overlay.cidr: a new one.
                    s.drop_slices(std::slice::from_ref(&h))?;
                    out = s.lease_slice(&h, &key, endpoint.as_deref(), &pick)?;
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| match e {
            AgentError::Store(StoreError::PublicKeyInUse { host, other }) => {
                AgentError::PublicKeyInUse { host, other }
            }
            other => other,
        })?;
    let record = match leased {
        SliceLease::Leased { record, new } => {
            if new {
                tracing::info!(host = %host, slice = %record.slice, "overlay slice leased");
            }
            record
        }
        SliceLease::Exhausted => {
            let mut o = plane.overlay();
            o.exhausted += 1;
            tracing::warn!(
                host = %host,
                capacity = pool.capacity(),
                "overlay pool exhausted: the host registers without a slice (overlay.cidr \
                 or overlay.slice_prefix too small, or lost hosts still hold theirs until \
                 overlay.release_after)"
            );
            return Ok(None);
        }
    };
    let Ok(slice) = record.slice.parse::<Ipv4Net>() else {
        return Err(AgentError::Store(StoreError::Corrupt {
            op: "lease_slice",
            about: format!("host {host}"),
            detail: format!("slice {:?} is not a CIDR", record.slice),
        }));
    };
    plane.overlay().peers.upsert(
        &host,
        Member {
            slice: record.slice,
            public_key: record.public_key,
            endpoint: record.endpoint,
            active: true,
        },
    );
    Ok(Some(pool.lease(&slice)))
}

/// A heartbeat's tunnel report: kept for status and metrics; the answer is
/// the peer list when the agent's version is not the current one.
pub(crate) fn heartbeat(
    plane: &AgentPlane,
    host: &str,
    report: Option<TunnelReport>,
) -> Option<OverlayPeers> {
    let report = report?;
    let mut o = plane.overlay();
    let reply = o.peers.peers_for(host, report.peers_version);
    o.reports.insert(
        host.to_owned(),
        HostReport {
            report,
            at: Instant::now(),
        },
    );
    reply
}

/// The registry marked `host` lost: it leaves the peer list (its slice
/// stays reserved until released).
pub(crate) fn host_lost(plane: &AgentPlane, host: &str) {
    plane.overlay().peers.set_active(host, false);
}

/// Releases the slices of hosts lost for `overlay.release_after` (at most
/// every [`Overlay::sweep_every`]); called from each dispatch round.
pub(crate) async fn sweep(plane: &AgentPlane) {
    let now = plane.now();
    let grace = {
        let mut o = plane.overlay();
        if !o.enabled()
            || o.last_sweep
                .is_some_and(|t| now.saturating_sub(t) < o.sweep_every())
        {
            return;
        }
        o.last_sweep = Some(now);
        o.release_after()
    };
    let before = wall_ms().saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
    match plane.blocking(move |s| s.release_slices(before)).await {
        Ok(gone) => {
            let mut o = plane.overlay();
            for r in gone {
                o.peers.remove(&r.host);
                o.reports.remove(&r.host);
            }
        }
        Err(e) => tracing::warn!("releasing overlay slices: {e}"),
    }
}

/// At start: the store's slices become members (active when their host
/// is), slices outside the configured pool are dropped, and with the
/// overlay off every key is cleared so no overlay job is dispatched.
pub(crate) async fn restore(plane: &AgentPlane) {
    let pool = plane.overlay().pool().copied();
    let Some(pool) = pool else {
        if let Err(e) = plane.blocking(|s| s.detach_slice(None)).await {
            tracing::warn!("clearing tunnel keys with the overlay off: {e}");
        }
        return;
    };
    let loaded = plane
        .blocking(move |s| {
            let slices = s.slices()?;
            let (keep, stale): (Vec<_>, Vec<_>) = slices
                .into_iter()
                .partition(|r| pool.index_of_str(&r.slice).is_some());
            if !stale.is_empty() {
                let hosts: Vec<String> = stale.iter().map(|r| r.host.clone()).collect();
                s.drop_slices(&hosts)?;
                tracing::warn!(
                    hosts = ?hosts,
                    cidr = %pool.cidr(),
                    "dropped overlay slices outside overlay.cidr / slice_prefix"
                );
            }
            let hosts = s.list_hosts()?;
            Ok((keep, hosts))
        })
        .await;
    let (keep, hosts) = match loaded {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("loading overlay slices from the store: {e}");
            return;
        }
    };
    let mut o = plane.overlay();
    let n = keep.len();
    for r in keep {
        if o.peers.member(&r.host).is_some() {
            // Registered since the controller started: that is fresher.
            continue;
        }
        let active = hosts
            .iter()
            .any(|h| h.id == r.host && h.state == HostState::Active);
        o.peers.upsert(
            &r.host,
            Member {
                slice: r.slice,
                public_key: r.public_key,
                endpoint: r.endpoint,
                active,
            },
        );
    }
    if n > 0 {
        tracing::info!(
            slices = n,
            version = o.peers.version(),
            "overlay slices restored"
        );
    }
}

/// The overlay is on and can serve `network = "overlay"` jobs.
pub(crate) fn enabled(o: &Overlay) -> bool {
    o.pool().is_some_and(|p| p.capacity() > 0)
}
