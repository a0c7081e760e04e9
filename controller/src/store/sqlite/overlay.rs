//! The overlay's slices in SQLite (`overlay_slices`, `schema_v4.sql`):
//! the transactions behind [`Store::lease_slice`] and its siblings, and
//! the claim's eligibility rule for overlay jobs ([`host_has_tunnel`]).
//!
//! [`Store::lease_slice`]: crate::store::Store::lease_slice

use rusqlite::{params, OptionalExtension, Row, Transaction};

use super::now_ms;
use crate::job::Network;
use crate::store::{Result, SliceLease, SliceRecord, StoreError};

/// `jobs.network` codes, as in `schema_v4.sql`.
pub(super) fn network_code(n: Network) -> i64 {
    match n {
        Network::None => 0,
        Network::Overlay => 1,
    }
}

pub(super) fn network_of(code: i64) -> Network {
    if code == 1 {
        Network::Overlay
    } else {
        Network::None
    }
}

const COLUMNS: &str = "host, slice, public_key, endpoint, allocated_ms, updated_ms";

fn record(r: &Row<'_>) -> rusqlite::Result<SliceRecord> {
    Ok(SliceRecord {
        host: r.get(0)?,
        slice: r.get(1)?,
        public_key: r.get(2)?,
        endpoint: r.get(3)?,
        allocated_ms: r.get(4)?,
        updated_ms: r.get(5)?,
    })
}

/// True when `host` holds a slice and registered a tunnel: it may take
/// overlay jobs.
pub(super) fn host_has_tunnel(tx: &Transaction<'_>, host: &str) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM overlay_slices WHERE host = ?1 AND public_key IS NOT NULL")?
        .query_row([host], |_| Ok(()))
        .optional()?
        .is_some())
}

pub(super) fn lease(
    tx: &Transaction<'_>,
    host: &str,
    public_key: &str,
    endpoint: Option<&str>,
    pick: &dyn Fn(&[String]) -> Option<String>,
) -> Result<SliceLease> {
    let now = now_ms();
    // The key's other holder, if any, and whether it is lost.
    let holder: Option<(String, Option<String>)> = tx
        .prepare_cached(
            "SELECT o.host, h.state FROM overlay_slices o LEFT JOIN hosts h ON h.id = o.host \
             WHERE o.public_key = ?1 AND o.host <> ?2",
        )?
        .query_row(params![public_key, host], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((other, state)) = holder {
        if state.as_deref() != Some("lost") {
            return Err(StoreError::PublicKeyInUse {
                host: host.to_owned(),
                other,
            });
        }
        tracing::info!(host, from = %other, "tunnel key moved from a lost host");
        tx.prepare_cached(
            "UPDATE overlay_slices SET public_key = NULL, endpoint = NULL, updated_ms = ?2 \
             WHERE host = ?1",
        )?
        .execute(params![other, now])?;
    }
    let existing: Option<SliceRecord> = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM overlay_slices WHERE host = ?1"
        ))?
        .query_row([host], record)
        .optional()?;
    if let Some(mut rec) = existing {
        tx.prepare_cached(
            "UPDATE overlay_slices SET public_key = ?2, endpoint = ?3, updated_ms = ?4 \
             WHERE host = ?1",
        )?
        .execute(params![host, public_key, endpoint, now])?;
        rec.public_key = Some(public_key.to_owned());
        rec.endpoint = endpoint.map(str::to_owned);
        rec.updated_ms = now;
        return Ok(SliceLease::Leased {
            record: rec,
            new: false,
        });
    }
    let used: Vec<String> = tx
        .prepare_cached("SELECT slice FROM overlay_slices")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let Some(slice) = pick(&used) else {
        return Ok(SliceLease::Exhausted);
    };
    tx.prepare_cached(
        "INSERT INTO overlay_slices (host, slice, public_key, endpoint, allocated_ms, updated_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    )?
    .execute(params![host, slice, public_key, endpoint, now])?;
    tracing::info!(host, slice = %slice, "overlay slice allocated");
    Ok(SliceLease::Leased {
        record: SliceRecord {
            host: host.to_owned(),
            slice,
            public_key: Some(public_key.to_owned()),
            endpoint: endpoint.map(str::to_owned),
            allocated_ms: now,
            updated_ms: now,
        },
        new: true,
    })
}

pub(super) fn detach(tx: &Transaction<'_>, host: Option<&str>) -> Result<()> {
    let now = now_ms();
    match host {
        Some(h) => tx
            .prepare_cached(
                "UPDATE overlay_slices SET public_key = NULL, endpoint = NULL, updated_ms = ?2 \
                 WHERE host = ?1 AND public_key IS NOT NULL",
            )?
            .execute(params![h, now])?,
        None => tx
            .prepare_cached(
                "UPDATE overlay_slices SET public_key = NULL, endpoint = NULL, updated_ms = ?1 \
                 WHERE public_key IS NOT NULL",
            )?
            .execute([now])?,
    };
    Ok(())
}

pub(super) fn all(conn: &rusqlite::Connection) -> Result<Vec<SliceRecord>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM overlay_slices ORDER BY host"
        ))?
        .query_map([], record)?
        .collect::<rusqlite::Result<_>>()?)
}

pub(super) fn release(tx: &Transaction<'_>, before_ms: i64) -> Result<Vec<SliceRecord>> {
    let gone: Vec<SliceRecord> = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM overlay_slices WHERE host IN \
             (SELECT id FROM hosts WHERE state = 'lost' AND last_heartbeat_ms < ?1) \
             ORDER BY host"
        ))?
        .query_map([before_ms], record)?
        .collect::<rusqlite::Result<_>>()?;
    let mut delete = tx.prepare_cached("DELETE FROM overlay_slices WHERE host = ?1")?;
    for r in &gone {
        delete.execute([&r.host])?;
        tracing::info!(host = %r.host, slice = %r.slice, "overlay slice released (host lost)");
    }
    Ok(gone)
}

pub(super) fn drop_hosts(tx: &Transaction<'_>, hosts: &[String]) -> Result<usize> {
    let mut delete = tx.prepare_cached("DELETE FROM overlay_slices WHERE host = ?1")?;
    let mut n = 0;
    for h in hosts {
        n += delete.execute([h])?;
    }
    Ok(n)
}
