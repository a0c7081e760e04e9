//! Human output of the `sparegrid` CLI: aligned tables ([`Table`]) and the
//! one-line renderings of jobs, counts, hosts and durations. `--json`
//! output does not come through here; it is the API's JSON as received.

use std::io::{self, Write};

use serde_json::Value;

use crate::api::{JobDetail, JobSummary};
use crate::store::JobCounts;

/// A table with a header row; columns are padded to their widest cell.
/// Columns marked numeric are right-aligned.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named by `headers`; a header starting with `>` (dropped from
    /// the text) is a right-aligned column.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers
                .iter()
                .map(|h| h.trim_start_matches('>').to_owned())
                .collect(),
            numeric: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank, extra cells are dropped).
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes the header and rows, two spaces between columns, no trailing
    /// spaces.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                if self.numeric[i] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `3 done, 2 running, 5 queued, 0 failed, 0 cancelled of 10`.
pub fn counts_line(c: &JobCounts) -> String {
    format!(
        "{} done, {} running, {} queued, {} failed, {} cancelled of {}",
        c.done, c.assigned, c.queued, c.dead, c.cancelled, c.total
    )
}

/// `1.5 s`, `2 min 3 s`, `1 h 2 min`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How long the job has run (or ran): from its start to its end or now.
fn elapsed(job: &JobSummary) -> Option<String> {
    let start = job.started_ms?;
    let end = job.finished_ms.unwrap_or_else(now_ms);
    Some(duration_ms(end - start))
}

/// A dispatch mode as requests spell it.
fn mode_name(mode: crate::job::DispatchMode) -> &'static str {
    use crate::job::DispatchMode;
    match mode {
        DispatchMode::Push => "push",
        DispatchMode::Pull => "pull",
        DispatchMode::P2p => "p2p",
    }
}

/// The `status ID` text.
pub fn job_detail(out: &mut dyn Write, d: &JobDetail) -> io::Result<()> {
    job_detail_at(out, d, now_ms())
}

/// One line about an attempt at a dead subtask: where it ran, how it
/// ended and why (the error, else the last line of its stderr).
fn attempt_line(a: &crate::api::AttemptView) -> String {
    let mut parts = vec![a.state.clone()];
    if let Some(code) = a.exit_code {
        parts.push(format!("exit {code}"));
    }
    if let Some(e) = &a.error {
        parts.push(e.clone());
    }
    if let Some(last) = a.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        parts.push(format!("stderr: {}", last.trim()));
    }
    format!("attempt {} on {}: {}", a.attempt, a.host, parts.join(", "))
}

/// [`job_detail`] with the clock given (lease expiries are shown relative
/// to `now`).
pub fn job_detail_at(out: &mut dyn Write, d: &JobDetail, now: i64) -> io::Result<()> {
    let j = &d.job;
    let name = if j.name.is_empty() {
        String::new()
    } else {
        format!(" ({})", j.name)
    };
    writeln!(out, "job {}{}: {}", j.id, name, j.state)?;
    writeln!(out, "  subtasks: {}", counts_line(&j.counts))?;
    writeln!(
        out,
        "  mode {}, priority {}, max attempts {}, network {}",
        mode_name(d.request.mode),
        j.priority,
        j.max_attempts,
        d.request.network.as_str()
    )?;
    match elapsed(j) {
        Some(e) if j.finished_ms.is_some() => writeln!(out, "  ran for {e}")?,
        Some(e) => writeln!(out, "  running for {e}")?,
        None => writeln!(out, "  waiting for {}", duration_ms(now - j.created_ms))?,
    }
    if !d.leases.is_empty() {
        let total: u64 = d.leases.iter().map(|l| l.leases).sum();
        writeln!(out, "  leases: {total} held")?;
        let mut t = Table::new(&["host", ">leases", "first expires in"]);
        for l in &d.leases {
            t.row(vec![
                l.host.clone(),
                l.leases.to_string(),
                duration_ms(l.earliest_expiry_ms - now),
            ]);
        }
        let mut buf = Vec::new();
        t.write(&mut buf)?;
        for line in String::from_utf8_lossy(&buf).lines() {
            writeln!(out, "    {line}")?;
        }
    }
    if !d.steals.is_empty() {
        let moved: u64 = d.steals.iter().map(|s| s.stolen_in).sum();
        writeln!(out, "  steals: {moved} subtasks moved between peers")?;
        let mut t = Table::new(&["host", ">stolen in", ">given out"]);
        for s in &d.steals {
            t.row(vec![
                s.host.clone(),
                s.stolen_in.to_string(),
                s.given_out.to_string(),
            ]);
        }
        let mut buf = Vec::new();
        t.write(&mut buf)?;
        for line in String::from_utf8_lossy(&buf).lines() {
            writeln!(out, "    {line}")?;
        }
    }
    if !d.dead_subtasks.is_empty() {
        let shown = d.dead_subtasks.len() as u64;
        if j.counts.dead > shown {
            writeln!(
                out,
                "  dead subtasks: {} (the first {shown} shown)",
                j.counts.dead
            )?;
        } else {
            writeln!(out, "  dead subtasks: {}", j.counts.dead.max(shown))?;
        }
        for s in &d.dead_subtasks {
            let what = if s.reduce { " (reduce)" } else { "" };
            writeln!(
                out,
                "    subtask {}{what}: {} attempts",
                s.index,
                s.attempts.len()
            )?;
            if let Some(e) = &s.error {
                writeln!(out, "      {e}")?;
            }
            for a in &s.attempts {
                writeln!(out, "      {}", attempt_line(a))?;
            }
        }
    }
    Ok(())
}

/// The `status` (list) table.
pub fn job_table(out: &mut dyn Write, jobs: &[JobSummary]) -> io::Result<()> {
    if jobs.is_empty() {
        return writeln!(out, "no jobs");
    }
    let mut t = Table::new(&[
        "ID", "NAME", "STATE", ">DONE", ">TOTAL", ">RUNNING", ">FAILED", ">ELAPSED",
    ]);
    for j in jobs {
        t.row(vec![
            j.id.to_string(),
            j.name.clone(),
            j.state.to_string(),
            j.counts.done.to_string(),
            j.counts.total.to_string(),
            j.counts.assigned.to_string(),
            j.counts.dead.to_string(),
            elapsed(j).unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    t.write(out)
}

/// The first of `paths` (dotted, into nested objects) present in `v`.
fn pick<'a>(v: &'a Value, paths: &[&str]) -> Option<&'a Value> {
    paths.iter().find_map(|p| {
        let mut cur = v;
        for key in p.split('.') {
            cur = cur.get(key)?;
        }
        (!cur.is_null()).then_some(cur)
    })
}

fn text(v: Option<&Value>) -> String {
    match v {
        None => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a.len().to_string(),
        Some(other) => other.to_string(),
    }
}

/// The hosts of a `GET /v1/hosts` answer: `{"hosts": [...]}` or a bare list.
pub fn host_list(v: &Value) -> Option<&Vec<Value>> {
    v.get("hosts").unwrap_or(v).as_array()
}

/// The `hosts` table. Fields are looked up by name, at the top of each
/// host or inside its last heartbeat, so the table reads the registry's
/// host view as it stands: `id`/`host`, `state`, `load` (0..1, shown as a
/// percentage), `dominant`, `free_slots`, `running` (a count or a list),
/// `vms` (counts by VM state), `overlay` (its slice and the tunnel peers
/// with a recent handshake of those it reported, `100.96.3.0/24 2/3`).
pub fn host_table(out: &mut dyn Write, hosts: &[Value]) -> io::Result<()> {
    if hosts.is_empty() {
        return writeln!(out, "no hosts registered");
    }
    let mut t = Table::new(&[
        "HOST", "STATE", ">LOAD", "DOMINANT", ">FREE", ">RUNNING", "VMS", "OVERLAY",
    ]);
    for h in hosts {
        let load = pick(h, &["load", "load_factor", "last.load", "heartbeat.load"])
            .and_then(Value::as_f64)
            .map(|l| format!("{:.0}%", l * 100.0))
            .unwrap_or_else(|| "-".to_owned());
        let vms = match pick(h, &["vms", "last.vms", "heartbeat.vms"]) {
            Some(Value::Object(m)) if !m.is_empty() => m
                .iter()
                .map(|(k, v)| format!("{k}={}", text(Some(v))))
                .collect::<Vec<_>>()
                .join(","),
            Some(Value::Object(_)) | None => "-".to_owned(),
            other => text(other),
        };
        let state = match (pick(h, &["state"]), pick(h, &["membership"])) {
            (Some(s), Some(m)) => format!("{}/{}", text(Some(s)), text(Some(m))),
            (s, None) => text(s),
            (None, m) => text(m),
        };
        t.row(vec![
            text(pick(h, &["id", "host", "name"])),
            state,
            load,
            text(pick(
                h,
                &["dominant", "last.dominant", "heartbeat.dominant"],
            )),
            text(pick(
                h,
                &["free_slots", "last.free_slots", "heartbeat.free_slots"],
            )),
            text(pick(h, &["running", "last.running", "heartbeat.running"])),
            vms,
            overlay_cell(h),
        ]);
    }
    t.write(out)
}

/// A tunnel peer of a host's overlay view, as `(host or key, endpoint,
/// seconds since handshake, rx, tx)`.
fn overlay_peers(h: &Value) -> Vec<(String, String, Option<u64>, u64, u64)> {
    let Some(Value::Array(peers)) = pick(h, &["overlay.peers"]) else {
        return Vec::new();
    };
    peers
        .iter()
        .map(|p| {
            let num = |k: &str| p.get(k).and_then(Value::as_u64);
            (
                text(pick(p, &["host", "public_key"])),
                text(pick(p, &["endpoint"])),
                num("last_handshake_secs"),
                num("rx_bytes").unwrap_or(0),
                num("tx_bytes").unwrap_or(0),
            )
        })
        .collect()
}

/// The `OVERLAY` cell: `slice connected/peers` (`-` without a slice; a
/// slice without a tunnel is marked `(no tunnel)`).
fn overlay_cell(h: &Value) -> String {
    let Some(slice) = pick(h, &["overlay.slice"]).and_then(Value::as_str) else {
        return "-".to_owned();
    };
    if !pick(h, &["overlay.listed"])
        .and_then(Value::as_bool)
        .unwrap_or(true)
    {
        return format!("{slice} (unlisted)");
    }
    let peers = overlay_peers(h);
    let recent = peers
        .iter()
        .filter(|p| {
            p.2.is_some_and(|s| s <= crate::overlay::RECENT_HANDSHAKE_SECS)
        })
        .count();
    format!("{slice} {recent}/{}", peers.len())
}

/// Bytes in binary units (`1.5 MiB`).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `hosts --peers`: each host's tunnel peers as it last reported them.
pub fn overlay_peer_table(out: &mut dyn Write, hosts: &[Value]) -> io::Result<()> {
    let mut t = Table::new(&["HOST", "PEER", "ENDPOINT", ">HANDSHAKE", ">RX", ">TX"]);
    let mut rows = 0;
    for h in hosts {
        let host = text(pick(h, &["id", "host", "name"]));
        for (peer, endpoint, handshake, rx, tx) in overlay_peers(h) {
            t.row(vec![
                host.clone(),
                peer,
                endpoint,
                handshake.map_or_else(|| "never".to_owned(), |s| format!("{s} s ago")),
                bytes(rx),
                bytes(tx),
            ]);
            rows += 1;
        }
    }
    writeln!(out)?;
    if rows == 0 {
        return writeln!(out, "no overlay tunnel peers reported");
    }
    t.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut t = Table::new(&["ID", ">N", "NAME"]);
        t.row(vec!["j-1".into(), "5".into(), "a".into()]);
        t.row(vec!["j-10".into(), "12345".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID        N  NAME\nj-1       5  a\nj-10  12345\n"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_ms(1500), "1.5 s");
        assert_eq!(duration_ms(123_000), "2 min 3 s");
        assert_eq!(duration_ms(3_720_000), "1 h 2 min");
        assert_eq!(duration_ms(-5), "0.0 s");
    }

    #[test]
    fn overlay_column_and_peer_table() {
        let hosts = json!({"hosts": [
            {"id": "a", "state": "active", "overlay": {
                "slice": "100.96.1.0/24", "listed": true,
                "peers": [
                    {"host": "b", "public_key": "kb", "endpoint": "192.0.2.2:51820",
                     "last_handshake_secs": 12, "rx_bytes": 1536, "tx_bytes": 10},
                    {"host": null, "public_key": "kc", "endpoint": null,
                     "last_handshake_secs": null, "rx_bytes": 0, "tx_bytes": 0},
                    {"host": "d", "public_key": "kd", "last_handshake_secs": 900,
                     "rx_bytes": 0, "tx_bytes": 0}
                ]}},
            {"id": "b", "state": "active", "overlay": {"slice": "100.96.2.0/24",
             "listed": false, "peers": []}},
            {"id": "c", "state": "active"}
        ]});
        let list = host_list(&hosts).unwrap();
        let mut out = Vec::new();
        host_table(&mut out, list).unwrap();
        let s = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[0].ends_with("OVERLAY"), "{s}");
        // One of three peers had a handshake in the last 180 s.
        assert!(lines[1].ends_with("100.96.1.0/24 1/3"), "{s}");
        assert!(lines[2].ends_with("100.96.2.0/24 (unlisted)"), "{s}");
        assert!(lines[3].ends_with(" -"), "{s}");
        let mut out = Vec::new();
        overlay_peer_table(&mut out, list).unwrap();
        let s = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 5, "blank, header, three peers: {s}");
        assert!(lines[1].starts_with("HOST"), "{s}");
        for w in ["a", "b", "192.0.2.2:51820", "12 s ago", "1.5 KiB", "10 B"] {
            assert!(lines[2].contains(w), "{w}: {s}");
        }
        assert!(lines[3].contains("kc") && lines[3].contains("never"), "{s}");
        let mut out = Vec::new();
        overlay_peer_table(&mut out, &list[1..]).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("no overlay tunnel peers"));
    }

    #[test]
    fn host_table_reads_top_level_and_heartbeat_fields() {
        let hosts = json!({"hosts": [
            {"id": "h1", "state": "active", "membership": "eligible",
             "last": {"load": 0.125, "dominant": "cpu", "free_slots": 3,
                      "running": [{"job": "j-1", "index": 0, "epoch": 1}],
                      "vms": {"running": 1}}},
            {"host": "h2", "state": "lost", "load": 0.9, "free_slots": 0, "running": 0}
        ]});
        let mut out = Vec::new();
        host_table(&mut out, host_list(&hosts).unwrap()).unwrap();
        let s = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3, "{s}");
        assert!(lines[0].starts_with("HOST"), "{s}");
        assert!(lines[1].contains("h1") && lines[1].contains("active/eligible"));
        assert!(lines[1].contains("12%") || lines[1].contains("13%"), "{s}");
        assert!(
            lines[1].contains("cpu") && lines[1].contains("running=1"),
            "{s}"
        );
        assert!(lines[2].contains("h2") && lines[2].contains("90%"), "{s}");
    }
}
