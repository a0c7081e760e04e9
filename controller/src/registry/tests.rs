//! Table-driven tests of the registry: each case is a script of registers,
//! heartbeats (time, load, suspended time, running attempts) and ticks, and
//! the events each tick must give.

use std::collections::BTreeMap;

use sparegrid_proto::Metric;

use super::*;

const S: u64 = 1000;

fn cfg() -> RegistryConfig {
    RegistryConfig::default()
}

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn att(job: &str, index: u64) -> AttemptRef {
    AttemptRef {
        job: job.into(),
        index,
        epoch: 1,
    }
}

fn reg(host: &str, slots: u32) -> Register {
    Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: host.into(),
        version: "0.1.0".into(),
        agent_url: Some(format!("http://{host}:7410")),
        slots,
    }
}

fn hb(
    host: &str,
    load: f64,
    free_slots: u32,
    running: &[AttemptRef],
    suspended_ms: u64,
) -> Heartbeat {
    Heartbeat {
        tunnel: None,
        steals: Vec::new(),
        host: host.into(),
        load,
        dominant: Some(Metric::Cpu),
        breakdown: BTreeMap::from([(Metric::Cpu, load)]),
        free_slots,
        running: running.to_vec(),
        vms: BTreeMap::new(),
        suspended_ms,
        renew: Vec::new(),
    }
}

/// What a scripted step does.
enum Op {
    Register {
        host: &'static str,
        slots: u32,
    },
    /// Heartbeat with load, free slots, running attempts (job "j", these
    /// indices) and suspended time in ms.
    Beat {
        host: &'static str,
        load: f64,
        free: u32,
        running: &'static [u64],
        suspended_ms: u64,
    },
    /// Tick; the events it must give.
    Tick(&'static [Ev]),
}

/// An expected event, with attempts as indices of job "j".
#[derive(Debug)]
enum Ev {
    Withdraw(&'static str, &'static [u64], WithdrawReason),
    Lost(&'static str, &'static [u64]),
    Eligible(&'static str),
}

impl Ev {
    fn to_event(&self) -> RegistryEvent {
        let atts = |idx: &[u64]| idx.iter().map(|&i| att("j", i)).collect();
        match self {
            Ev::Withdraw(h, a, r) => RegistryEvent::Withdraw {
                host: HostId::from(*h),
                attempts: atts(a),
                reason: *r,
            },
            Ev::Lost(h, a) => RegistryEvent::HostLost {
                host: HostId::from(*h),
                attempts: atts(a),
            },
            Ev::Eligible(h) => RegistryEvent::Eligible {
                host: HostId::from(*h),
            },
        }
    }
}

fn register(host: &'static str, slots: u32) -> Op {
    Op::Register { host, slots }
}

fn beat(host: &'static str, load: f64, running: &'static [u64]) -> Op {
    Op::Beat {
        host,
        load,
        free: 4 - running.len() as u32,
        running,
        suspended_ms: 0,
    }
}

fn beat_suspended(host: &'static str, load: f64, running: &'static [u64], suspended_ms: u64) -> Op {
    Op::Beat {
        host,
        load,
        free: 4 - running.len() as u32,
        running,
        suspended_ms,
    }
}

/// Runs a script of (time in ms, op) on `reg`; panics with the step number
/// when a tick's events differ. Every heartbeat treats every attempt as
/// current in the store.
fn run(r: &mut Registry, steps: &[(u64, Op)]) {
    for (i, (t, op)) in steps.iter().enumerate() {
        let now = at(*t);
        match op {
            Op::Register { host, slots } => {
                r.register(reg(host, *slots), now)
                    .unwrap_or_else(|e| panic!("step {i}: register: {e}"));
            }
            Op::Beat {
                host,
                load,
                free,
                running,
                suspended_ms,
            } => {
                let running: Vec<_> = running.iter().map(|&i| att("j", i)).collect();
                r.heartbeat(hb(host, *load, *free, &running, *suspended_ms), now, |_| {
                    true
                })
                .unwrap_or_else(|e| panic!("step {i}: heartbeat: {e}"));
            }
            Op::Tick(expect) => {
                let got = r.tick(now);
                let want: Vec<_> = expect.iter().map(Ev::to_event).collect();
                assert_eq!(got, want, "step {i} (t={t}ms)");
            }
        }
    }
}

struct Case {
    name: &'static str,
    steps: Vec<(u64, Op)>,
}

use Op::Tick;
use WithdrawReason::*;

#[test]
fn two_set_rule_scripts() {
    let cases = vec![
        Case {
            name: "host crossing withdraw_above mid-job is withdrawn exactly once",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat("a", 0.3, &[0, 1])),
                (2 * S, Tick(&[])),
                (4 * S, beat("a", 0.85, &[0, 1])),
                (4 * S, Tick(&[Ev::Withdraw("a", &[0, 1], LoadAbove)])),
                (5 * S, Tick(&[])),
                (6 * S, beat("a", 0.95, &[0, 1])),
                (6 * S, Tick(&[])),
                (8 * S, beat("a", 0.9, &[])),
                (8 * S, Tick(&[])),
            ],
        },
        Case {
            name: "load wobbling between the thresholds never flaps",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.2, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat("a", 0.55, &[0])),
                (2 * S, Tick(&[])),
                (4 * S, beat("a", 0.79, &[0])),
                (4 * S, Tick(&[])),
                (6 * S, beat("a", 0.8, &[0])),
                (6 * S, Tick(&[])),
                (8 * S, beat("a", 0.6, &[0])),
                (8 * S, Tick(&[])),
            ],
        },
        Case {
            name: "withdrawn host re-enters only below dispatch_below",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat("a", 0.9, &[3])),
                (2 * S, Tick(&[Ev::Withdraw("a", &[3], LoadAbove)])),
                (4 * S, beat("a", 0.7, &[])),
                (4 * S, Tick(&[])),
                (6 * S, beat("a", 0.5, &[])),
                (6 * S, Tick(&[])),
                (8 * S, beat("a", 0.49, &[])),
                (8 * S, Tick(&[Ev::Eligible("a")])),
                (10 * S, beat("a", 0.7, &[])),
                (10 * S, Tick(&[])),
            ],
        },
        Case {
            name: "grid VM suspended longer than withdraw_after withdraws",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat_suspended("a", 0.3, &[0, 1], 30 * S)),
                (2 * S, Tick(&[])),
                (4 * S, beat_suspended("a", 0.3, &[0, 1], 60 * S)),
                (4 * S, Tick(&[])),
                (6 * S, beat_suspended("a", 0.3, &[0, 1], 60 * S + 1)),
                (6 * S, Tick(&[Ev::Withdraw("a", &[0, 1], SuspendedTooLong)])),
                (8 * S, beat_suspended("a", 0.1, &[0, 1], 62 * S)),
                (8 * S, Tick(&[])),
                // The agent reclaimed the VM: nothing suspended, load low.
                (10 * S, beat("a", 0.1, &[])),
                (10 * S, Tick(&[Ev::Eligible("a")])),
            ],
        },
        Case {
            name: "load reason wins over suspension when both hold",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat_suspended("a", 0.9, &[5], 90 * S)),
                (2 * S, Tick(&[Ev::Withdraw("a", &[5], LoadAbove)])),
            ],
        },
        Case {
            name: "missed heartbeats: lost with its attempts, once",
            steps: vec![
                (0, register("a", 4)),
                (0, register("b", 4)),
                (0, beat("a", 0.1, &[])),
                (0, beat("b", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a"), Ev::Eligible("b")])),
                (2 * S, beat("a", 0.2, &[0, 2])),
                (2 * S, beat("b", 0.2, &[1])),
                (16 * S, beat("b", 0.2, &[1])),
                (16 * S + 999, Tick(&[])),
                (17 * S, Tick(&[Ev::Lost("a", &[0, 2])])),
                (30 * S, beat("b", 0.2, &[1])),
                (40 * S, Tick(&[])),
            ],
        },
        Case {
            name: "withdrawn host that then goes silent is still reported lost",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, beat("a", 0.9, &[7])),
                (2 * S, Tick(&[Ev::Withdraw("a", &[7], LoadAbove)])),
                (17 * S, Tick(&[Ev::Lost("a", &[7])])),
                (30 * S, Tick(&[])),
            ],
        },
        Case {
            name: "registered host that never heartbeats is lost",
            steps: vec![
                (0, register("a", 4)),
                (14 * S, Tick(&[])),
                (15 * S, Tick(&[Ev::Lost("a", &[])])),
            ],
        },
        Case {
            name: "re-register after lost: back outside the set until below dispatch_below",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (S, beat("a", 0.1, &[4])),
                (20 * S, Tick(&[Ev::Lost("a", &[4])])),
                (21 * S, register("a", 2)),
                (21 * S, beat("a", 0.6, &[])),
                (21 * S, Tick(&[])),
                (23 * S, beat("a", 0.3, &[])),
                (23 * S, Tick(&[Ev::Eligible("a")])),
            ],
        },
        Case {
            name: "first sight after a controller restart: overloaded host gives its work back",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.95, &[0, 1])),
                (0, Tick(&[Ev::Withdraw("a", &[0, 1], LoadAbove)])),
                (2 * S, beat("a", 0.4, &[])),
                (2 * S, Tick(&[Ev::Eligible("a")])),
            ],
        },
        Case {
            name: "first sight in the hysteresis band: keeps its work, no event",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.6, &[0])),
                (0, Tick(&[])),
                (2 * S, beat("a", 0.85, &[0])),
                (2 * S, Tick(&[Ev::Withdraw("a", &[0], LoadAbove)])),
            ],
        },
        Case {
            name: "live host registering again keeps its place in the set",
            steps: vec![
                (0, register("a", 4)),
                (0, beat("a", 0.1, &[])),
                (0, Tick(&[Ev::Eligible("a")])),
                (2 * S, register("a", 8)),
                (2 * S, Tick(&[])),
                (3 * S, beat("a", 0.7, &[])),
                (3 * S, Tick(&[])),
            ],
        },
    ];
    for case in cases {
        let mut r = Registry::new(cfg());
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut r, &case.steps)));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("case {:?}: {msg}", case.name);
        }
    }
}

#[test]
fn withdraw_is_exactly_once_across_many_ticks_and_heartbeats() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    let running = [att("j", 0), att("j", 1)];
    let mut withdraws = 0;
    for step in 0..200u64 {
        let now = at(step * 500);
        // Load climbs from 0.1 past withdraw_above and stays high with noise.
        let load = if step < 20 {
            0.1
        } else {
            0.81 + (step % 7) as f64 * 0.02
        };
        if step % 4 == 0 {
            r.heartbeat(hb("a", load, 2, &running, 0), now, |_| true)
                .unwrap();
        }
        for ev in r.tick(now) {
            if let RegistryEvent::Withdraw { attempts, .. } = ev {
                assert_eq!(attempts, running);
                withdraws += 1;
            }
        }
    }
    assert_eq!(withdraws, 1);
}

#[test]
fn host_in_band_keeps_work_but_gets_none() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    r.heartbeat(hb("a", 0.2, 4, &[], 0), at(0), |_| true)
        .unwrap();
    assert_eq!(
        r.tick(at(0)),
        vec![RegistryEvent::Eligible { host: "a".into() }]
    );
    assert_eq!(r.eligible(at(0)).len(), 1);

    let out = r
        .heartbeat(hb("a", 0.7, 3, &[att("j", 0)], 0), at(2 * S), |_| true)
        .unwrap();
    assert!(out.withdraw.is_empty(), "{out:?}");
    assert!(r.tick(at(2 * S)).is_empty());
    assert!(
        r.eligible(at(2 * S)).is_empty(),
        "a host in the band gets no new work"
    );
    assert!(r.host("a").unwrap().may_hold_work());
}

#[test]
fn heartbeat_withdraws_attempts_the_store_no_longer_counts() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    let running = [att("j", 0), att("j", 1), att("k", 0)];
    let current = [att("j", 1)];
    let out = r
        .heartbeat(hb("a", 0.1, 1, &running, 0), at(0), |a| current.contains(a))
        .unwrap();
    assert_eq!(out.withdraw, vec![att("j", 0), att("k", 0)]);
    assert_eq!(
        out.clone().into_reply(),
        HeartbeatReply {
            overlay_peers: None,
            peers: Vec::new(),
            withdraw: out.withdraw,
            lost: Vec::new(),
        }
    );
}

#[test]
fn heartbeat_from_a_withdrawn_host_stops_everything_it_runs() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    r.heartbeat(hb("a", 0.9, 2, &[att("j", 0)], 0), at(0), |_| true)
        .unwrap();
    assert_eq!(r.tick(at(0)).len(), 1);
    // The store has not caught up yet and still calls both current.
    let out = r
        .heartbeat(
            hb("a", 0.9, 2, &[att("j", 0), att("j", 1)], 0),
            at(2 * S),
            |_| true,
        )
        .unwrap();
    assert_eq!(out.withdraw, vec![att("j", 0), att("j", 1)]);
}

#[test]
fn unknown_and_lost_hosts_are_told_to_register() {
    let mut r = Registry::new(cfg());
    let err = r
        .heartbeat(hb("ghost", 0.1, 1, &[], 0), at(0), |_| true)
        .unwrap_err();
    assert_eq!(err, RegistryError::UnknownHost("ghost".into()));
    assert!(err.must_register());
    assert!(err.to_string().contains("register"), "{err}");

    r.register(reg("a", 4), at(0)).unwrap();
    assert_eq!(
        r.tick(at(20 * S)),
        vec![RegistryEvent::HostLost {
            host: "a".into(),
            attempts: vec![]
        }]
    );
    assert_eq!(r.host("a").unwrap().state, HostState::Lost);
    let err = r
        .heartbeat(hb("a", 0.1, 1, &[], 0), at(21 * S), |_| true)
        .unwrap_err();
    assert_eq!(err, RegistryError::HostLost("a".into()));
    assert!(err.must_register());

    let registered = r.register(reg("a", 4), at(22 * S)).unwrap();
    assert_eq!(registered.host, "a");
    assert_eq!(r.host("a").unwrap().state, HostState::Active);
    assert_eq!(r.len(), 1, "re-registering keeps the one id");
    // Attempts requeued while it was lost are stale now: the store says so.
    let out = r
        .heartbeat(hb("a", 0.1, 3, &[att("j", 9)], 0), at(22 * S), |_| false)
        .unwrap();
    assert_eq!(out.withdraw, vec![att("j", 9)]);
}

#[test]
fn register_replies_with_heartbeat_interval_and_checks_fields() {
    let mut r = Registry::new(RegistryConfig {
        heartbeat_interval: Duration::from_millis(1500),
        ..cfg()
    });
    let ok = r.register(reg("host-1.example", 4), at(0)).unwrap();
    assert_eq!(
        ok,
        Registered {
            overlay: None,
            host: "host-1.example".into(),
            heartbeat_ms: 1500
        }
    );
    let field_of = |reg: Register| match Registry::new(cfg()).register(reg, at(0)) {
        Err(RegistryError::BadRegister { field, .. }) => field,
        other => panic!("expected BadRegister, got {other:?}"),
    };
    assert_eq!(
        field_of(Register {
            host: String::new(),
            ..reg("x", 1)
        }),
        "host"
    );
    assert_eq!(
        field_of(Register {
            host: "a b".into(),
            ..reg("x", 1)
        }),
        "host"
    );
    assert_eq!(
        field_of(Register {
            host: "x".repeat(254),
            ..reg("x", 1)
        }),
        "host"
    );
    assert_eq!(
        field_of(Register {
            agent_url: Some("ftp://x".into()),
            ..reg("x", 1)
        }),
        "agent_url"
    );
}

#[test]
fn bad_load_is_refused_and_changes_nothing() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    for load in [f64::NAN, f64::INFINITY, -0.1] {
        match r.heartbeat(hb("a", load, 1, &[], 0), at(S), |_| true) {
            Err(RegistryError::BadHeartbeat { field: "load", .. }) => {}
            other => panic!("load {load}: expected BadHeartbeat, got {other:?}"),
        }
    }
    assert!(r.host("a").unwrap().last.is_none());
    assert_eq!(r.host("a").unwrap().last_seen, at(0));
}

#[test]
fn eligible_orders_by_load_then_free_slots_then_id() {
    let mut r = Registry::new(cfg());
    // (host, load, free slots)
    let table: &[(&str, f64, u32)] = &[
        ("e", 0.3, 2),
        ("d", 0.1, 1),
        ("c", 0.1, 3),
        ("b", 0.3, 2),
        ("a", 0.49, 8),
        ("full", 0.0, 0),
        ("busy", 0.5, 4),
        ("band", 0.7, 4),
    ];
    for &(h, load, free) in table {
        r.register(reg(h, 8), at(0)).unwrap();
        r.heartbeat(hb(h, load, free, &[], 0), at(0), |_| true)
            .unwrap();
    }
    r.tick(at(0));
    let got: Vec<_> = r
        .eligible(at(S))
        .into_iter()
        .map(|e| (e.host.0, e.free_slots))
        .collect();
    let want: Vec<_> = [("c", 3), ("d", 1), ("b", 2), ("e", 2), ("a", 8)]
        .iter()
        .map(|&(h, f)| (h.to_string(), f))
        .collect();
    assert_eq!(got, want);
    let c = &r.eligible(at(S))[0];
    assert_eq!(c.agent_url.as_deref(), Some("http://c:7410"));
    assert_eq!(c.load, 0.1);
}

#[test]
fn eligible_excludes_new_silent_and_lost_hosts() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    r.heartbeat(hb("a", 0.1, 4, &[], 0), at(0), |_| true)
        .unwrap();
    assert!(r.eligible(at(0)).is_empty(), "not in the set before a tick");
    r.tick(at(0));
    assert_eq!(r.eligible(at(14 * S)).len(), 1);
    assert!(
        r.eligible(at(15 * S)).is_empty(),
        "silent for host_timeout: not picked even before the tick marks it lost"
    );
    r.tick(at(15 * S));
    assert!(r.eligible(at(15 * S)).is_empty());
}

#[test]
fn free_slots_shrink_with_assignments_until_the_next_heartbeat() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(0)).unwrap();
    // Free slots are capped at the registered slots.
    r.heartbeat(hb("a", 0.1, 9, &[], 0), at(0), |_| true)
        .unwrap();
    r.tick(at(0));
    assert_eq!(r.eligible(at(0))[0].free_slots, 4);
    r.note_assigned("a", 3);
    assert_eq!(r.eligible(at(0))[0].free_slots, 1);
    r.note_assigned("a", 5);
    assert!(r.eligible(at(0)).is_empty());
    r.note_assigned("nobody", 1);
    r.heartbeat(hb("a", 0.1, 2, &[], 0), at(S), |_| true)
        .unwrap();
    assert_eq!(r.eligible(at(S))[0].free_slots, 2);
}

#[test]
fn time_going_backwards_does_not_lose_hosts() {
    let mut r = Registry::new(cfg());
    r.register(reg("a", 4), at(10 * S)).unwrap();
    r.heartbeat(hb("a", 0.1, 4, &[], 0), at(10 * S), |_| true)
        .unwrap();
    assert_eq!(
        r.tick(at(5 * S)),
        vec![RegistryEvent::Eligible { host: "a".into() }]
    );
    assert_eq!(r.eligible(at(5 * S)).len(), 1);
}

#[test]
fn events_serialise_with_a_tag() {
    let ev = RegistryEvent::Withdraw {
        host: "a".into(),
        attempts: vec![att("j", 0)],
        reason: SuspendedTooLong,
    };
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(v["event"], "withdraw");
    assert_eq!(v["host"], "a");
    assert_eq!(v["reason"], "suspended_too_long");
    assert_eq!(ev.withdraw_reason(), Some(SuspendedTooLong));
    let lost = RegistryEvent::HostLost {
        host: "b".into(),
        attempts: vec![],
    };
    assert_eq!(lost.withdraw_reason(), Some(Lost));
    assert_eq!(lost.host().as_str(), "b");
}

mod config {
    use super::*;

    fn field_of(c: RegistryConfig) -> &'static str {
        c.validate().unwrap_err().field
    }

    #[test]
    fn defaults_are_valid() {
        let c = RegistryConfig::default();
        c.validate().unwrap();
        assert_eq!(c.dispatch_below, 0.5);
        assert_eq!(c.withdraw_above, 0.8);
        assert_eq!(c.withdraw_after, Duration::from_secs(60));
        assert_eq!(c.host_timeout, Duration::from_secs(15));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.heartbeat_ms(), 2000);
    }

    #[test]
    fn parses_humantime_and_fills_defaults() {
        let c: RegistryConfig =
            serde_json::from_str(r#"{"withdraw_after": "90s", "heartbeat_interval": "500ms"}"#)
                .unwrap();
        assert_eq!(c.withdraw_after, Duration::from_secs(90));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.dispatch_below, 0.5);
        c.validate().unwrap();
        // Round trip.
        let back: RegistryConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = serde_json::from_str::<RegistryConfig>(r#"{"withdraw_abov": 0.9}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("withdraw_abov"), "{err}");
        let err = serde_json::from_str::<RegistryConfig>(r#"{"host_timeout": "soon"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon") || err.contains("unit"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let d = RegistryConfig::default;
        let table: Vec<(RegistryConfig, &str)> = vec![
            (
                RegistryConfig {
                    dispatch_below: 0.0,
                    ..d()
                },
                "registry.dispatch_below",
            ),
            (
                RegistryConfig {
                    dispatch_below: f64::NAN,
                    ..d()
                },
                "registry.dispatch_below",
            ),
            (
                RegistryConfig {
                    dispatch_below: 1.2,
                    withdraw_above: 1.0,
                    ..d()
                },
                "registry.dispatch_below",
            ),
            (
                RegistryConfig {
                    withdraw_above: 1.5,
                    ..d()
                },
                "registry.withdraw_above",
            ),
            (
                RegistryConfig {
                    withdraw_above: 0.4,
                    ..d()
                },
                "registry.withdraw_above",
            ),
            (
                RegistryConfig {
                    withdraw_above: f64::INFINITY,
                    ..d()
                },
                "registry.withdraw_above",
            ),
            (
                RegistryConfig {
                    heartbeat_interval: Duration::ZERO,
                    ..d()
                },
                "registry.heartbeat_interval",
            ),
            (
                RegistryConfig {
                    heartbeat_interval: Duration::from_secs(61),
                    host_timeout: Duration::from_secs(600),
                    ..d()
                },
                "registry.heartbeat_interval",
            ),
            (
                RegistryConfig {
                    host_timeout: Duration::from_secs(3),
                    ..d()
                },
                "registry.host_timeout",
            ),
        ];
        for (c, field) in table {
            assert_eq!(field_of(c.clone()), field, "{c:?}");
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg}");
        }
        // Equal thresholds are allowed (no hysteresis band, but consistent).
        RegistryConfig {
            dispatch_below: 0.6,
            withdraw_above: 0.6,
            ..d()
        }
        .validate()
        .unwrap();
        // withdraw_after 0 means any suspension withdraws; allowed.
        RegistryConfig {
            withdraw_after: Duration::ZERO,
            ..d()
        }
        .validate()
        .unwrap();
    }
}

/// A host that takes migrations and serves `images`.
fn reg_moving(host: &str, images: &[&str]) -> Register {
    Register {
        migrate_in: true,
        transfer_url: Some(format!("http://{host}:7412")),
        images: images.iter().map(|s| s.to_string()).collect(),
        ..reg(host, 1)
    }
}

#[test]
fn a_migration_goes_to_the_least_loaded_idle_host_that_takes_them() {
    let mut r = Registry::new(cfg());
    let always = |_: &AttemptRef| true;
    r.register(reg_moving("src", &[]), at(0)).unwrap();
    r.register(reg_moving("busy", &[]), at(0)).unwrap();
    r.register(reg_moving("idle", &[]), at(0)).unwrap();
    r.register(reg_moving("calm", &[]), at(0)).unwrap();
    r.register(reg("old", 1), at(0)).unwrap();
    // Before any heartbeat nobody's load is known: no target.
    assert_eq!(r.migration_target("src", at(S)), None);
    r.heartbeat(hb("src", 0.0, 0, &[], 0), at(S), always)
        .unwrap();
    r.heartbeat(hb("busy", 0.9, 1, &[], 0), at(S), always)
        .unwrap();
    r.heartbeat(hb("idle", 0.05, 0, &[], 0), at(S), always)
        .unwrap();
    r.heartbeat(hb("calm", 0.1, 1, &[], 0), at(S), always)
        .unwrap();
    r.heartbeat(hb("old", 0.0, 1, &[], 0), at(S), always)
        .unwrap();
    // Not itself (least loaded), not the busy one, not one without
    // migrate_in; free slots do not matter.
    let t = r.migration_target("src", at(S)).unwrap();
    assert_eq!(
        (
            t.host.as_str(),
            t.agent_url.as_str(),
            t.transfer_url.as_str()
        ),
        ("idle", "http://idle:7410", "http://idle:7412")
    );
    // A host with a saved VM is busy itself.
    let mut saved = hb("idle", 0.05, 0, &[], 0);
    saved.vms.insert(VmState::Saved, 1);
    r.heartbeat(saved, at(2 * S), always).unwrap();
    assert_eq!(r.migration_target("src", at(2 * S)).unwrap().host, "calm");
    // Silent past host_timeout: no target at all.
    assert_eq!(r.migration_target("src", at(1000 * S)), None);
}

#[test]
fn image_sources_are_live_hosts_serving_the_digest_least_loaded_first() {
    let mut r = Registry::new(cfg());
    let always = |_: &AttemptRef| true;
    let d = "ab".repeat(32);
    r.register(reg_moving("a", &[&d]), at(0)).unwrap();
    r.register(reg_moving("b", &[&d]), at(0)).unwrap();
    r.register(reg_moving("c", &["cd".repeat(32).as_str()]), at(0))
        .unwrap();
    r.heartbeat(hb("a", 0.5, 1, &[], 0), at(S), always).unwrap();
    r.heartbeat(hb("b", 0.1, 1, &[], 0), at(S), always).unwrap();
    let hosts: Vec<String> = r
        .image_sources(&d, at(S))
        .into_iter()
        .map(|s| s.host)
        .collect();
    assert_eq!(hosts, vec!["b", "a"]);
    assert!(r.image_sources(&"ef".repeat(32), at(S)).is_empty());
    assert!(
        r.image_sources(&d, at(1000 * S)).is_empty(),
        "lost hosts serve nothing"
    );
}
