//! The agent config's `[peers]` section: whether this agent takes part in
//! peer-to-peer jobs, the peers it knows besides the controller's list,
//! and the thief's tuning. Validated with the rest of
//! [`crate::config::Config`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `[peers]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersSection {
    /// Take part in peer-to-peer jobs: serve the peer routes on
    /// `agent.listen`, take seeds from the controller and steal from
    /// peers. Only with `controller.dispatch = "push"` (peers and the
    /// controller must reach this agent).
    pub enabled: bool,
    /// Peers known from config (`{ id = "host-b", url = "http://…" }`),
    /// besides the ones the controller lists in its heartbeat replies. `id`
    /// is the peer's host name.
    pub peers: Vec<StaticPeer>,
    /// Spare subtasks asked for in a steal, on top of the one to run now
    /// (the victim gives at most half its queue). 7 measured better than 3
    /// in the p2p balance benchmark (fewer trades, same tail).
    pub spare: u32,
    /// Longest a peer request may take; a steal not answered by then is
    /// aborted (the victim takes the subtasks back).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A trade this agent gave subtasks in that is not committed after
    /// this long is settled by asking the thief for its outcome.
    #[serde(with = "humantime_serde")]
    pub resolve_after: Duration,
    /// Backoff for a peer that gave nothing or failed: `backoff_base`
    /// doubling up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Directory of the durable peer queue (`peer-queue.sqlite`); empty:
    /// `agent.data_dir`.
    pub queue_dir: PathBuf,
}

/// One `[[peers.peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    pub id: String,
    pub url: String,
}

impl Default for PeersSection {
    fn default() -> Self {
        PeersSection {
            enabled: true,
            peers: Vec::new(),
            spare: 7,
            request_timeout: Duration::from_secs(5),
            resolve_after: Duration::from_secs(10),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            queue_dir: PathBuf::new(),
        }
    }
}

fn invalid(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl PeersSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.spare > 1000 {
            return Err(invalid(
                "peers.spare".into(),
                format!("{} is over 1000", self.spare),
            ));
        }
        if self.request_timeout < Duration::from_millis(50)
            || self.request_timeout > Duration::from_secs(300)
        {
            return Err(invalid(
                "peers.request_timeout".into(),
                format!("{:?} is outside 50ms..=5m", self.request_timeout),
            ));
        }
        if self.resolve_after < self.request_timeout {
            return Err(invalid(
                "peers.resolve_after".into(),
                format!(
                    "{:?} is below peers.request_timeout ({:?}): a thief's request could still be in flight",
                    self.resolve_after, self.request_timeout
                ),
            ));
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(invalid(
                "peers.backoff_max".into(),
                "backoff_base must be above 0 and backoff_max at least backoff_base",
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.id.is_empty() || p.id.len() > 253 || p.id.chars().any(char::is_whitespace) {
                return Err(invalid(
                    format!("peers.peers[{i}].id"),
                    format!("must be the peer's host name, got {:?}", p.id),
                ));
            }
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                return Err(invalid(
                    format!("peers.peers[{i}].url"),
                    format!("must start with http:// or https://, got {:?}", p.url),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(s: &PeersSection) -> String {
        match s.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_errors_name_the_field() {
        PeersSection::default().validate().unwrap();
        let mut s = PeersSection {
            spare: 5000,
            ..PeersSection::default()
        };
        assert_eq!(field(&s), "peers.spare");
        s.spare = 7;
        s.resolve_after = Duration::from_secs(1);
        assert_eq!(field(&s), "peers.resolve_after");
        s.resolve_after = Duration::from_secs(10);
        s.peers.push(StaticPeer {
            id: "b".into(),
            url: "b:7000".into(),
        });
        assert_eq!(field(&s), "peers.peers[0].url");
        s.peers[0].url = "http://b:7000".into();
        s.validate().unwrap();
        s.peers[0].id = "has space".into();
        assert_eq!(field(&s), "peers.peers[0].id");
    }

    #[test]
    fn toml_unknown_keys_are_refused() {
        let e = toml::from_str::<PeersSection>("spares = 2").unwrap_err();
        assert!(e.to_string().contains("spares"), "{e}");
        let s: PeersSection = toml::from_str(
            "spare = 1\nrequest_timeout = \"2s\"\n[[peers]]\nid = \"b\"\nurl = \"http://b:1\"\n",
        )
        .unwrap();
        assert_eq!(s.spare, 1);
        assert_eq!(s.peers.len(), 1);
    }
}
