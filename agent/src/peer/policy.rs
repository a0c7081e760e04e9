//! [`ThiefPolicy`]: when to steal, from whom, how much (pure; the caller
//! passes the clock).
//!
//! - Steal only with free slots and an empty local queue.
//! - Peers in round robin, skipping the ones in backoff: a peer that gave
//!   nothing or failed waits `backoff_base · 2^(n-1)` (capped at
//!   `backoff_max`) after its n-th miss in a row; a peer that gives is
//!   reset.
//! - Ask for `1 + k` (one to run now, up to k spare).
//! - The trade cost is the median of the last `rtt_window` steal round
//!   trips; the thief asks the victim for nothing whose job runs shorter
//!   on average (`min_runtime_ms`), since moving it would cost more than
//!   running it where it is. No round trip measured yet: no minimum.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::trade::Ask;

/// Tuning for [`ThiefPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Spare subtasks asked for on top of the one to run now.
    pub k: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Round trips kept for the median.
    pub rtt_window: usize,
    /// Ask victims for nothing of a job with no measured run time.
    pub need_stats: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            k: 3,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            rtt_window: 9,
            need_stats: false,
        }
    }
}

/// One steal to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StealPlan {
    pub victim: String,
    pub ask: Ask,
}

/// How a steal went, for [`ThiefPolicy::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StealResult {
    /// The victim gave this many (> 0).
    Got(usize),
    /// The victim answered with nothing.
    Nothing,
    /// No usable answer.
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    misses: u32,
    until: Instant,
}

/// The thief's choices; see the module header.
#[derive(Debug, Clone)]
pub struct ThiefPolicy {
    cfg: PolicyConfig,
    peers: Vec<String>,
    next: usize,
    backoff: HashMap<String, Backoff>,
    rtts: VecDeque<Duration>,
}

impl ThiefPolicy {
    pub fn new(cfg: PolicyConfig, peers: Vec<String>) -> ThiefPolicy {
        ThiefPolicy {
            cfg,
            peers,
            next: 0,
            backoff: HashMap::new(),
            rtts: VecDeque::new(),
        }
    }

    /// The known peers, in round-robin order.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    /// Replaces the known peers (config reload, the controller's host
    /// list); backoff is kept for peers still known.
    pub fn set_peers(&mut self, peers: Vec<String>) {
        self.backoff.retain(|p, _| peers.contains(p));
        self.peers = peers;
        if self.next >= self.peers.len() {
            self.next = 0;
        }
    }

    /// The steal to make now, if any: `None` without free slots, with
    /// queued work, or when every peer is in backoff. Advances the round
    /// robin past the peer chosen.
    pub fn plan(&mut self, free_slots: u32, local_queued: u64, now: Instant) -> Option<StealPlan> {
        if free_slots == 0 || local_queued > 0 || self.peers.is_empty() {
            return None;
        }
        let n = self.peers.len();
        for step in 0..n {
            let i = (self.next + step) % n;
            let peer = &self.peers[i];
            if self.backoff.get(peer).is_some_and(|b| b.until > now) {
                continue;
            }
            self.next = (i + 1) % n;
            return Some(StealPlan {
                victim: peer.clone(),
                ask: Ask {
                    want: 1 + self.cfg.k,
                    min_runtime_ms: self.trade_cost().map_or(0, |d| d.as_millis() as u64),
                    need_stats: self.cfg.need_stats,
                },
            });
        }
        None
    }

    /// Records a steal's result and, when it was answered, its round trip.
    pub fn record(
        &mut self,
        victim: &str,
        result: StealResult,
        rtt: Option<Duration>,
        now: Instant,
    ) {
        if let Some(rtt) = rtt {
            self.rtts.push_back(rtt);
            while self.rtts.len() > self.cfg.rtt_window.max(1) {
                self.rtts.pop_front();
            }
        }
        match result {
            StealResult::Got(n) if n > 0 => {
                self.backoff.remove(victim);
            }
            _ => {
                let misses = self.backoff.get(victim).map_or(0, |b| b.misses) + 1;
                let factor = 1u32.checked_shl(misses - 1).unwrap_or(u32::MAX);
                let wait = self
                    .cfg
                    .backoff_base
                    .saturating_mul(factor)
                    .min(self.cfg.backoff_max);
                self.backoff.insert(
                    victim.to_owned(),
                    Backoff {
                        misses,
                        until: now + wait,
                    },
                );
            }
        }
    }

    /// The median of the last round trips (the upper one of an even count).
    pub fn trade_cost(&self) -> Option<Duration> {
        if self.rtts.is_empty() {
            return None;
        }
        let mut v: Vec<Duration> = self.rtts.iter().copied().collect();
        v.sort();
        Some(v[v.len() / 2])
    }

    /// When the earliest peer in backoff may be asked again (`None`: one
    /// may be asked now, or there are no peers).
    pub fn next_ready(&self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for p in &self.peers {
            match self.backoff.get(p) {
                Some(b) if b.until > now => {
                    earliest = Some(earliest.map_or(b.until, |e| e.min(b.until)));
                }
                _ => return None,
            }
        }
        earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            k: 2,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            rtt_window: 3,
            need_stats: true,
        }
    }

    #[test]
    fn steals_only_with_free_slots_and_an_empty_queue() {
        let now = Instant::now();
        let mut p = ThiefPolicy::new(cfg(), peers(2));
        assert_eq!(p.plan(0, 0, now), None);
        assert_eq!(p.plan(2, 1, now), None);
        let plan = p.plan(1, 0, now).unwrap();
        assert_eq!(plan.ask.want, 3);
        assert_eq!(plan.ask.min_runtime_ms, 0);
        assert!(plan.ask.need_stats);
        assert_eq!(ThiefPolicy::new(cfg(), vec![]).plan(1, 0, now), None);
    }

    #[test]
    fn round_robin_skips_peers_in_backoff_until_it_ends() {
        let t0 = Instant::now();
        let mut p = ThiefPolicy::new(cfg(), peers(3));
        let order: Vec<String> = (0..4).map(|_| p.plan(1, 0, t0).unwrap().victim).collect();
        assert_eq!(order, ["p0", "p1", "p2", "p0"]);
        p.record("p1", StealResult::Nothing, None, t0);
        let order: Vec<String> = (0..3).map(|_| p.plan(1, 0, t0).unwrap().victim).collect();
        assert_eq!(order, ["p2", "p0", "p2"]);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(p.plan(1, 0, later).unwrap().victim, "p0");
        assert_eq!(p.plan(1, 0, later).unwrap().victim, "p1");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_on_a_gift() {
        let t0 = Instant::now();
        let mut p = ThiefPolicy::new(cfg(), peers(1));
        let ms = Duration::from_millis;
        let mut waits = Vec::new();
        for _ in 0..4 {
            p.record("p0", StealResult::Failed, None, t0);
            waits.push(p.next_ready(t0).unwrap() - t0);
        }
        assert_eq!(waits, [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(p.plan(1, 0, t0 + ms(349)), None);
        assert!(p.plan(1, 0, t0 + ms(350)).is_some());
        p.record("p0", StealResult::Got(2), None, t0);
        assert_eq!(p.next_ready(t0), None);
        p.record("p0", StealResult::Nothing, None, t0);
        assert_eq!(p.next_ready(t0), Some(t0 + ms(100)));
    }

    #[test]
    fn trade_cost_is_the_median_of_the_last_round_trips() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = ThiefPolicy::new(cfg(), peers(1));
        assert_eq!(p.trade_cost(), None);
        for r in [50, 1, 7, 9] {
            p.record("p0", StealResult::Got(1), Some(ms(r)), t0);
        }
        // Window 3: [1, 7, 9] → 7 (the 50 fell out).
        assert_eq!(p.trade_cost(), Some(ms(7)));
        assert_eq!(p.plan(1, 0, t0).unwrap().ask.min_runtime_ms, 7);
        p.record("p0", StealResult::Failed, Some(ms(100)), t0);
        p.record("p0", StealResult::Failed, Some(ms(100)), t0);
        assert_eq!(p.trade_cost(), Some(ms(100)));
    }

    #[test]
    fn set_peers_keeps_backoff_of_known_peers() {
        let t0 = Instant::now();
        let mut p = ThiefPolicy::new(cfg(), peers(2));
        p.record("p0", StealResult::Nothing, None, t0);
        p.record("p1", StealResult::Nothing, None, t0);
        p.set_peers(vec!["p1".into(), "p9".into()]);
        let got: Vec<String> = (0..2).map(|_| p.plan(1, 0, t0).unwrap().victim).collect();
        assert_eq!(got, ["p9", "p9"]);
    }
}
