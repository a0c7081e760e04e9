//! Free-slot accounting between heartbeats: the dispatcher debits a host's
//! slots when it pushes to it and credits them when its completions (or a
//! stop, a withdrawal, a release) arrive, so a host gets its next subtask
//! as soon as it reports one done instead of at its next heartbeat.
//!
//! The heartbeat is the source of truth. Per host, [`SlotBook`] keeps:
//!
//! - `base`: the heartbeat's `free_slots` (capped at the registered slots);
//! - `reported`: the attempts that heartbeat listed as queued or running,
//!   less those released since (each release credits one slot);
//! - `pending`: attempts pushed and not yet seen in a heartbeat (each debits
//!   one slot).
//!
//! Free slots = `min(base + credited, slots) − |pending|`. A heartbeat
//! resets `base` and `reported`, and drops from `pending` what it lists
//! (now counted in `base`). What it does not list stays pending: it was
//! pushed after the agent built the heartbeat, or it already finished and
//! its completion is on the way (the agent's client thread sends a
//! heartbeat and completions one after the other, so a completion for an
//! attempt a heartbeat listed always arrives after that heartbeat). So
//! nothing is counted twice, and the only error is conservative: a slot
//! freed at the agent before the completion arrives is credited late. A
//! pending attempt that never shows up (the agent lost it) is dropped after
//! `expire` (the registry's `host_timeout`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sparegrid_proto::grid::{AttemptRef, Heartbeat};

use crate::registry::Host;

/// One host's slot bookkeeping since its last heartbeat.
#[derive(Debug, Default)]
struct HostSlots {
    /// The last heartbeat's free slots (capped at the host's slots).
    base: u32,
    /// Attempts the last heartbeat listed, not released since.
    reported: HashSet<AttemptRef>,
    /// Releases of `reported` attempts since the last heartbeat.
    credited: u32,
    /// Pushed and not yet listed by a heartbeat, with when they were pushed.
    pending: HashMap<AttemptRef, Duration>,
}

/// Every host's free-slot bookkeeping. See the module docs.
#[derive(Debug)]
pub(crate) struct SlotBook {
    hosts: HashMap<String, HostSlots>,
    expire: Duration,
}

impl SlotBook {
    /// `expire`: how long a pushed attempt that no heartbeat lists and no
    /// completion reports keeps its slot.
    pub(crate) fn new(expire: Duration) -> SlotBook {
        SlotBook {
            hosts: HashMap::new(),
            expire,
        }
    }

    /// Free slots of `h` now; 0 before its first heartbeat.
    pub(crate) fn free(&self, h: &Host) -> u32 {
        if h.last.is_none() {
            return 0;
        }
        let Some(s) = self.hosts.get(h.id.as_str()) else {
            return h.last.as_ref().map_or(0, |hb| hb.free_slots.min(h.slots));
        };
        let pending = u32::try_from(s.pending.len()).unwrap_or(u32::MAX);
        s.base
            .saturating_add(s.credited)
            .min(h.slots)
            .saturating_sub(pending)
    }

    /// A heartbeat from a host with `slots` slots arrived at `now`: it is
    /// the new truth.
    pub(crate) fn heartbeat(&mut self, hb: &Heartbeat, slots: u32, now: Duration) {
        let expire = self.expire;
        let s = self.hosts.entry(hb.host.clone()).or_default();
        s.base = hb.free_slots.min(slots);
        s.credited = 0;
        s.reported = hb.running.iter().cloned().collect();
        s.pending
            .retain(|a, at| !s.reported.contains(a) && now.saturating_sub(*at) < expire);
    }

    /// `attempts` were just pushed to `host` (debit).
    pub(crate) fn pushed(
        &mut self,
        host: &str,
        attempts: impl IntoIterator<Item = AttemptRef>,
        now: Duration,
    ) {
        let s = self.hosts.entry(host.to_owned()).or_default();
        for a in attempts {
            s.pending.insert(a, now);
        }
    }

    /// `attempt` no longer holds a slot on `host` (it completed, was
    /// stopped, withdrawn, released or its push failed). Returns true when
    /// that freed a slot the book counted as taken.
    pub(crate) fn release(&mut self, host: &str, attempt: &AttemptRef) -> bool {
        let Some(s) = self.hosts.get_mut(host) else {
            return false;
        };
        if s.pending.remove(attempt).is_some() {
            return true;
        }
        if s.reported.remove(attempt) {
            s.credited = s.credited.saturating_add(1);
            return true;
        }
        false
    }

    /// Forgets `host` (it registered again, or was lost).
    pub(crate) fn forget(&mut self, host: &str) {
        self.hosts.remove(host);
    }

    /// Attempts pushed to `host` and not yet seen in a heartbeat.
    #[cfg(test)]
    pub(crate) fn pending(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, |s| s.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sparegrid_proto::grid::Register;

    use super::*;
    use crate::registry::{Registry, RegistryConfig};

    fn a(i: u64) -> AttemptRef {
        AttemptRef {
            job: "j-1".into(),
            index: i,
            epoch: 1,
        }
    }

    fn hb(free: u32, running: &[u64]) -> Heartbeat {
        Heartbeat {
            tunnel: None,
            steals: Vec::new(),
            host: "h".into(),
            load: 0.1,
            dominant: None,
            breakdown: BTreeMap::new(),
            free_slots: free,
            running: running.iter().map(|i| a(*i)).collect(),
            vms: BTreeMap::new(),
            suspended_ms: 0,
            renew: Vec::new(),
        }
    }

    /// A registry with host `h` of `slots` slots that heartbeat `beat`, and
    /// the book told the same.
    fn setup(slots: u32, beat: &Heartbeat) -> (Registry, SlotBook) {
        let mut r = Registry::new(RegistryConfig::default());
        r.register(
            Register {
                images: Vec::new(),
                migrate_in: false,
                transfer_url: None,
                tunnel: None,
                p2p: false,
                host: "h".into(),
                version: "t".into(),
                agent_url: None,
                slots,
            },
            Duration::ZERO,
        )
        .unwrap();
        r.heartbeat(beat.clone(), Duration::ZERO, |_| true).unwrap();
        let mut b = SlotBook::new(Duration::from_secs(15));
        b.heartbeat(beat, slots, Duration::ZERO);
        (r, b)
    }

    fn free(r: &Registry, b: &SlotBook) -> u32 {
        b.free(r.host("h").unwrap())
    }

    #[test]
    fn push_debits_and_completion_credits_without_a_heartbeat() {
        let (r, mut b) = setup(1, &hb(1, &[]));
        assert_eq!(free(&r, &b), 1);
        b.pushed("h", [a(0)], Duration::ZERO);
        assert_eq!(free(&r, &b), 0);
        assert!(b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 1);
        // A repeated completion credits nothing more.
        assert!(!b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 1);
    }

    #[test]
    fn completions_of_reported_attempts_credit_once_and_a_heartbeat_resets() {
        let (mut r, mut b) = setup(3, &hb(1, &[0, 1]));
        assert_eq!(free(&r, &b), 1);
        b.pushed("h", [a(2)], Duration::ZERO);
        assert_eq!(free(&r, &b), 0);
        assert!(b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 1);
        // The next heartbeat lists 1 and 2 (0 was done): 0 free, nothing
        // counted twice.
        let beat = hb(1, &[1, 2]);
        r.heartbeat(beat.clone(), Duration::ZERO, |_| true).unwrap();
        b.heartbeat(&beat, 3, Duration::ZERO);
        assert_eq!(b.pending("h"), 0);
        assert_eq!(free(&r, &b), 1);
        // A late completion of 0 (already out of the heartbeat) credits nothing.
        assert!(!b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 1);
        assert!(b.release("h", &a(2)));
        assert_eq!(free(&r, &b), 2);
        // Never more than the slots.
        assert!(b.release("h", &a(1)));
        assert!(!b.release("h", &a(7)));
        assert_eq!(free(&r, &b), 3);
    }

    #[test]
    fn a_push_the_heartbeat_missed_stays_debited_until_it_expires() {
        let (mut r, mut b) = setup(2, &hb(2, &[]));
        b.pushed("h", [a(0), a(1)], Duration::ZERO);
        // The heartbeat was built before the push arrived.
        let beat = hb(2, &[]);
        r.heartbeat(beat.clone(), Duration::from_secs(1), |_| true)
            .unwrap();
        b.heartbeat(&beat, 2, Duration::from_secs(1));
        assert_eq!(free(&r, &b), 0);
        // One finished before the next heartbeat was built; its completion
        // arrives after it.
        let beat = hb(1, &[1]);
        b.heartbeat(&beat, 2, Duration::from_secs(2));
        r.heartbeat(beat, Duration::from_secs(2), |_| true).unwrap();
        assert_eq!(b.pending("h"), 1);
        assert_eq!(free(&r, &b), 0);
        assert!(b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 1);
        // A push nobody ever reports is dropped after `expire`.
        b.pushed("h", [a(5)], Duration::from_secs(3));
        let beat = hb(1, &[1]);
        b.heartbeat(&beat, 2, Duration::from_secs(10));
        assert_eq!(free(&r, &b), 0);
        b.heartbeat(&beat, 2, Duration::from_secs(18));
        assert_eq!(b.pending("h"), 0);
        assert_eq!(free(&r, &b), 1);
    }

    #[test]
    fn no_slots_before_the_first_heartbeat_and_forget_resets() {
        let mut r = Registry::new(RegistryConfig::default());
        r.register(
            Register {
                images: Vec::new(),
                migrate_in: false,
                transfer_url: None,
                tunnel: None,
                p2p: false,
                host: "h".into(),
                version: "t".into(),
                agent_url: None,
                slots: 4,
            },
            Duration::ZERO,
        )
        .unwrap();
        let mut b = SlotBook::new(Duration::from_secs(15));
        assert_eq!(free(&r, &b), 0);
        let beat = hb(4, &[]);
        r.heartbeat(beat.clone(), Duration::ZERO, |_| true).unwrap();
        assert_eq!(free(&r, &b), 4, "a heartbeat the book has not seen");
        b.heartbeat(&beat, 4, Duration::ZERO);
        b.pushed("h", [a(0)], Duration::ZERO);
        assert_eq!(free(&r, &b), 3);
        b.forget("h");
        assert!(!b.release("h", &a(0)));
        assert_eq!(free(&r, &b), 4);
    }
}
