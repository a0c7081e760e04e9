//! The registry's thresholds and timers: the `[registry]` section of the
//! controller config, its defaults and `validate()`.
//!
//! Durations are humantime strings ("2s", "250ms", "1m"). Unknown fields are
//! refused by serde; [`RegistryConfig::validate`] checks what serde cannot and
//! names the bad field by its config path (`registry.withdraw_above`), so the
//! section must be embedded under the key `registry`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A `[registry]` value that cannot work. `field` is the config path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct InvalidConfig {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidConfig {
    InvalidConfig {
        field,
        message: message.into(),
    }
}

/// Thresholds of the two-set rule and the heartbeat timers.
///
/// A host joins the set of hosts that may hold work when its load factor is
/// below `dispatch_below`, and leaves it when its load rises above
/// `withdraw_above` or a grid VM stays suspended longer than
/// `withdraw_after`. The gap between the two thresholds is the hysteresis
/// band: a host inside it keeps its work but gets no new work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// New work goes only to hosts whose load factor is below this.
    pub dispatch_below: f64,
    /// A host whose load factor rises above this has its subtasks withdrawn.
    pub withdraw_above: f64,
    /// A host whose grid VMs stay suspended longer than this has its
    /// subtasks withdrawn. `0s` withdraws on any suspension.
    #[serde(with = "humantime_serde")]
    pub withdraw_after: Duration,
    /// A host with no heartbeat for this long is lost; its subtasks go back
    /// to the queue.
    #[serde(with = "humantime_serde")]
    pub host_timeout: Duration,
    /// How often agents heartbeat (told to them when they register).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            dispatch_below: 0.5,
            withdraw_above: 0.8,
            withdraw_after: Duration::from_secs(60),
            host_timeout: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(2),
        }
    }
}

/// Shortest heartbeat interval accepted: agents and the controller would
/// spend their time on heartbeats below this.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest heartbeat interval accepted: load changes would go unseen.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

impl RegistryConfig {
    /// Checks every field that serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let d = self.dispatch_below;
        if !d.is_finite() || d <= 0.0 || d > 1.0 {
            return Err(invalid(
                "registry.dispatch_below",
                format!("must be above 0 and at most 1, got {d}"),
            ));
        }
        let w = self.withdraw_above;
        if !w.is_finite() || !(0.0..=1.0).contains(&w) {
            return Err(invalid(
                "registry.withdraw_above",
                format!("must be between 0 and 1, got {w}"),
            ));
        }
        if w < d {
            return Err(invalid(
                "registry.withdraw_above",
                format!("must be at least registry.dispatch_below ({d}), got {w}"),
            ));
        }
        let hb = self.heartbeat_interval;
        if !(MIN_HEARTBEAT_INTERVAL..=MAX_HEARTBEAT_INTERVAL).contains(&hb) {
            return Err(invalid(
                "registry.heartbeat_interval",
                format!(
                    "must be between {MIN_HEARTBEAT_INTERVAL:?} and {MAX_HEARTBEAT_INTERVAL:?}, got {hb:?}"
                ),
            ));
        }
        if self.host_timeout < hb * 2 {
            return Err(invalid(
                "registry.host_timeout",
                format!(
                    "must be at least twice registry.heartbeat_interval ({hb:?}) so one late \
                     heartbeat does not lose a host, got {:?}",
                    self.host_timeout
                ),
            ));
        }
        Ok(())
    }

    /// The heartbeat interval in milliseconds, as [`Registered`] carries it.
    ///
    /// [`Registered`]: sparegrid_proto::grid::Registered
    pub fn heartbeat_ms(&self) -> u64 {
        u64::try_from(self.heartbeat_interval.as_millis()).unwrap_or(u64::MAX)
    }
}
