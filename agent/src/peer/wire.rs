//! Peer-to-peer HTTP bodies (MessagePack with field names, like the
//! controller's agent plane in `sparegrid_proto::grid`): [`Steal`] →
//! [`Given`], [`Commit`] → [`Committed`], [`OutcomeQuery`] →
//! [`OutcomeReply`]. They live here until the peer plane settles; the
//! subtask unit is the controller's [`Assignment`].
//!
//! Requests are decoded with [`decode_request`]: first into a generic
//! value, then field by field, so a malformed body is refused with an error
//! naming the field (`Steal.want: invalid type: string "x", expected u32`)
//! rather than only rmp-serde's position-free message. Hand-written (a
//! small table per message) because the agent has no serde_path_to_error.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sparegrid_proto::grid::{Assignment, AttemptRef};

/// The most subtasks one steal may ask for.
pub const MAX_WANT: u32 = 4096;
/// The longest trade or agent id accepted.
pub const MAX_ID_LEN: usize = 256;

/// `POST /v1/peer/steal` (thief → victim): give me up to `want` queued
/// subtasks in trade `trade`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Steal {
    /// The thief's trade id (`<thief>#<n>`), recorded `pending` before this
    /// request was sent.
    pub trade: String,
    pub thief: String,
    /// One to run now plus up to k spare (`1 + k`).
    pub want: u32,
    /// The thief's trade cost: give nothing whose job runs shorter on average.
    pub min_runtime_ms: u64,
    /// Give nothing of a job without a finished run here (no mean known).
    #[serde(default)]
    pub need_stats: bool,
}

/// The victim's answer to [`Steal`]: the subtasks it moved to `given(trade)`
/// (possibly none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Given {
    pub trade: String,
    pub victim: String,
    pub subtasks: Vec<Assignment>,
}

/// `POST /v1/peer/commit` (thief → victim): the thief received these
/// attempts of `trade`; the victim marks them gone and takes back any other
/// subtask of the trade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub trade: String,
    pub thief: String,
    pub attempts: Vec<AttemptRef>,
}

/// The victim's answer to [`Commit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    pub trade: String,
    pub moved: u32,
    pub returned: u32,
}

/// `POST /v1/peer/outcome` (victim → thief): what became of `trade`?
/// `thief` is who the victim believes it asks; another agent answers
/// [`OutcomeState::NotThief`] instead of "unknown".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeQuery {
    pub trade: String,
    pub thief: String,
}

/// A thief's trade as the victim learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    /// The steal request may still be in flight: ask later.
    Pending,
    /// Received: [`OutcomeReply::attempts`] are the thief's now.
    Received,
    /// The thief gave the trade up; it will never receive it.
    Aborted,
    /// The thief has no record of the trade (it lost its queue).
    Unknown,
    /// The agent asked is not the trade's thief (a wrong address).
    NotThief,
}

/// The thief's answer to [`OutcomeQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeReply {
    pub trade: String,
    pub state: OutcomeState,
    /// Received: the attempts the thief holds.
    #[serde(default)]
    pub attempts: Vec<AttemptRef>,
}

/// A request body that could not be used; `field` names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WireError {
    /// `Message.field` (`Commit.attempts[2]`), or the message alone.
    pub field: String,
    pub message: String,
}

/// A request message [`decode_request`] can check field by field.
pub trait Request: DeserializeOwned {
    const NAME: &'static str;
    /// Each field with whether it is required and a check of its value.
    fn fields() -> &'static [Field];
    /// Checks beyond types (non-empty ids, ranges).
    fn validate(&self) -> Result<(), WireError>;
}

/// One field of a [`Request`]: name, required, value check.
pub type Field = (
    &'static str,
    bool,
    fn(&serde_json::Value) -> Result<(), String>,
);

fn probe<T: DeserializeOwned>(v: &serde_json::Value) -> Result<(), String> {
    serde_json::from_value::<T>(v.clone())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn probe_attempts(v: &serde_json::Value) -> Result<(), String> {
    let serde_json::Value::Array(items) = v else {
        return Err("expected an array of attempts".to_owned());
    };
    for (i, item) in items.iter().enumerate() {
        serde_json::from_value::<AttemptRef>(item.clone()).map_err(|e| format!("[{i}]: {e}"))?;
    }
    Ok(())
}

/// Decodes a MessagePack request body as a `T`, naming the field at fault.
pub fn decode_request<T: Request>(bytes: &[u8]) -> Result<T, WireError> {
    let whole = |message: String| WireError {
        field: T::NAME.to_owned(),
        message,
    };
    let value: serde_json::Value =
        rmp_serde::from_slice(bytes).map_err(|e| whole(format!("not a MessagePack map: {e}")))?;
    let serde_json::Value::Object(map) = &value else {
        return Err(whole("expected a map of fields".to_owned()));
    };
    for (name, required, check) in T::fields() {
        match map.get(*name) {
            None if *required => {
                return Err(WireError {
                    field: format!("{}.{name}", T::NAME),
                    message: "missing".to_owned(),
                })
            }
            None => {}
            Some(v) => check(v).map_err(|message| WireError {
                field: format!("{}.{name}", T::NAME),
                message,
            })?,
        }
    }
    let msg: T = serde_json::from_value(value).map_err(|e| whole(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

fn id(msg: &str, field: &str, v: &str) -> Result<(), WireError> {
    let bad = |message: &str| WireError {
        field: format!("{msg}.{field}"),
        message: message.to_owned(),
    };
    if v.is_empty() {
        return Err(bad("must not be empty"));
    }
    if v.len() > MAX_ID_LEN {
        return Err(bad(&format!("longer than {MAX_ID_LEN} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(bad("contains control characters"));
    }
    Ok(())
}

impl Request for Steal {
    const NAME: &'static str = "Steal";
    fn fields() -> &'static [Field] {
        &[
            ("trade", true, probe::<String>),
            ("thief", true, probe::<String>),
            ("want", true, probe::<u32>),
            ("min_runtime_ms", true, probe::<u64>),
            ("need_stats", false, probe::<bool>),
        ]
    }
    fn validate(&self) -> Result<(), WireError> {
        id("Steal", "trade", &self.trade)?;
        id("Steal", "thief", &self.thief)?;
        if self.want == 0 || self.want > MAX_WANT {
            return Err(WireError {
                field: "Steal.want".to_owned(),
                message: format!("must be 1..={MAX_WANT}, got {}", self.want),
            });
        }
        Ok(())
    }
}

impl Request for Commit {
    const NAME: &'static str = "Commit";
    fn fields() -> &'static [Field] {
        &[
            ("trade", true, probe::<String>),
            ("thief", true, probe::<String>),
            ("attempts", true, probe_attempts),
        ]
    }
    fn validate(&self) -> Result<(), WireError> {
        id("Commit", "trade", &self.trade)?;
        id("Commit", "thief", &self.thief)
    }
}

impl Request for OutcomeQuery {
    const NAME: &'static str = "OutcomeQuery";
    fn fields() -> &'static [Field] {
        &[
            ("trade", true, probe::<String>),
            ("thief", true, probe::<String>),
        ]
    }
    fn validate(&self) -> Result<(), WireError> {
        id("OutcomeQuery", "trade", &self.trade)?;
        id("OutcomeQuery", "thief", &self.thief)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<T: Serialize>(v: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    #[test]
    fn a_good_steal_round_trips() {
        let s = Steal {
            trade: "a#1".into(),
            thief: "a".into(),
            want: 3,
            min_runtime_ms: 12,
            need_stats: true,
        };
        assert_eq!(decode_request::<Steal>(&enc(&s)).unwrap(), s);
    }

    #[test]
    fn need_stats_defaults_to_false() {
        let body =
            enc(&serde_json::json!({"trade": "a#1", "thief": "a", "want": 1, "min_runtime_ms": 0}));
        assert!(!decode_request::<Steal>(&body).unwrap().need_stats);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"thief": "a", "want": 1, "min_runtime_ms": 0}),
                "Steal.trade",
            ),
            (
                serde_json::json!({"trade": "a#1", "thief": "a", "want": "x", "min_runtime_ms": 0}),
                "Steal.want",
            ),
            (
                serde_json::json!({"trade": "a#1", "thief": "a", "want": 0, "min_runtime_ms": 0}),
                "Steal.want",
            ),
            (
                serde_json::json!({"trade": "a#1", "thief": "a", "want": 1, "min_runtime_ms": -4}),
                "Steal.min_runtime_ms",
            ),
            (
                serde_json::json!({"trade": "", "thief": "a", "want": 1, "min_runtime_ms": 0}),
                "Steal.trade",
            ),
            (
                serde_json::json!({"trade": "a#1", "thief": "a", "want": 1, "min_runtime_ms": 0, "need_stats": 3}),
                "Steal.need_stats",
            ),
        ];
        for (body, field) in cases {
            let e = decode_request::<Steal>(&enc(&body)).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let e = decode_request::<Commit>(&enc(&serde_json::json!({
            "trade": "a#1", "thief": "a",
            "attempts": [{"job": "j", "index": 1, "epoch": 1}, {"job": "j", "index": 2}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "Commit.attempts");
        assert!(
            e.message.contains("[1]") && e.message.contains("epoch"),
            "{e}"
        );
        let e = decode_request::<OutcomeQuery>(b"\xc1garbage").unwrap_err();
        assert_eq!(e.field, "OutcomeQuery");
        let e = decode_request::<OutcomeQuery>(&enc(&vec![1, 2])).unwrap_err();
        assert_eq!(e.field, "OutcomeQuery");
    }

    #[test]
    fn outcome_replies_round_trip_through_msgpack() {
        let r = OutcomeReply {
            trade: "b#7".into(),
            state: OutcomeState::Received,
            attempts: vec![AttemptRef {
                job: "j".into(),
                index: 4,
                epoch: 1,
            }],
        };
        let back: OutcomeReply = rmp_serde::from_slice(&enc(&r)).unwrap();
        assert_eq!(back, r);
    }
}
