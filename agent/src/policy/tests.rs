//! Table-driven tests: each case is a script of observations (time, load,
//! dominant metric, MemAvailable) and the transitions each step must give.

use super::*;

const S: u64 = 1000;

fn cfg() -> PolicyConfig {
    PolicyConfig {
        policy: PolicySection {
            suspend_above: 0.75,
            resume_below: 0.5,
            resume_after: Duration::from_secs(10),
            launch_below: 0.4,
            launch_after: Duration::from_secs(5),
            reclaim_after: Duration::from_secs(60),
            reclaim_mode: ReclaimMode::Destroy,
            boot_timeout: Duration::from_secs(30),
            memory_reserve_mib: 1024,
            max_grid_vms: 2,
            memory_budget_mib: 1024,
            vcpu_budget: 2,
        },
        vm_vcpus: 1,
        vm_memory_mib: 512,
        name_prefix: "sg-".into(),
    }
}

/// One scripted step: at `t_ms`, the load and free memory; then the
/// transitions (vm, to, reason) the step must produce, in order.
struct Step {
    t_ms: u64,
    load: f64,
    dominant: Option<Metric>,
    mem_mib: u64,
    expect: &'static [(&'static str, VmState, Reason)],
}

const FREE: u64 = 16 * 1024;

fn step(t_ms: u64, load: f64, expect: &'static [(&'static str, VmState, Reason)]) -> Step {
    Step {
        t_ms,
        load,
        dominant: Some(Metric::Cpu),
        mem_mib: FREE,
        expect,
    }
}

/// Runs a script. Launches succeed at once (the runtime reports started).
fn run(policy: &mut Policy, steps: &[Step]) {
    for (i, s) in steps.iter().enumerate() {
        let now = Duration::from_millis(s.t_ms);
        let obs = Observation {
            now,
            load: s.load,
            peak: s.load,
            dominant: s.dominant,
            mem_available_bytes: s.mem_mib * MIB,
        };
        let got = policy.evaluate(&obs, false);
        let got_triples: Vec<(String, VmState, Reason)> =
            got.iter().map(|d| (d.vm.clone(), d.to, d.reason)).collect();
        let want: Vec<(String, VmState, Reason)> = s
            .expect
            .iter()
            .map(|(v, st, r)| (v.to_string(), *st, *r))
            .collect();
        assert_eq!(
            got_triples, want,
            "step {i} at {} ms, load {}",
            s.t_ms, s.load
        );
        for d in got {
            if d.action == Action::Launch {
                let started = policy.on_started(&d.vm, now).expect("launching VM starts");
                assert_eq!(started.to, VmState::Running);
            }
        }
    }
}

fn launched_one() -> Policy {
    let mut p = Policy::new(cfg());
    run(
        &mut p,
        &[
            step(0, 0.1, &[]),
            step(
                5 * S,
                0.1,
                &[("sg-1", VmState::Launching, Reason::SpareCapacity)],
            ),
        ],
    );
    p
}

#[test]
fn launches_only_after_sustained_spare_capacity() {
    let mut p = Policy::new(cfg());
    run(
        &mut p,
        &[
            step(0, 0.1, &[]),
            step(4 * S, 0.1, &[]),
            // A blip above launch_below restarts the clock.
            step(4500, 0.45, &[]),
            step(5 * S, 0.1, &[]),
            step(9 * S, 0.1, &[]),
            step(
                10 * S,
                0.1,
                &[("sg-1", VmState::Launching, Reason::SpareCapacity)],
            ),
            // The next launch needs another launch_after.
            step(12 * S, 0.1, &[]),
            step(
                15 * S,
                0.1,
                &[("sg-2", VmState::Launching, Reason::SpareCapacity)],
            ),
            // max_grid_vms = 2 and the budgets are full: no third.
            step(30 * S, 0.1, &[]),
            step(60 * S, 0.1, &[]),
        ],
    );
    assert_eq!(p.vms().count(), 2);
    assert!(p.vms().all(|v| v.state == VmState::Running));
}

#[test]
fn spike_suspends_at_once_and_resume_waits_for_calm() {
    let mut p = launched_one();
    run(
        &mut p,
        &[
            step(
                6 * S,
                0.9,
                &[("sg-1", VmState::Suspended, Reason::CpuPressure)],
            ),
            // Still loaded: nothing more to do.
            step(7 * S, 0.95, &[]),
            // Between resume_below and suspend_above: stays suspended, no calm clock.
            step(8 * S, 0.6, &[]),
            step(20 * S, 0.6, &[]),
            step(21 * S, 0.3, &[]),
            step(30 * S, 0.3, &[]),
            step(31 * S, 0.3, &[("sg-1", VmState::Running, Reason::Idle)]),
        ],
    );
}

#[test]
fn flapping_load_never_resumes_early_and_never_launches() {
    let mut p = launched_one();
    let mut steps = vec![step(
        6 * S,
        0.9,
        &[("sg-1", VmState::Suspended, Reason::CpuPressure)],
    )];
    // Load flaps between calm and busy every 4 s for two minutes minus a bit:
    // calm never lasts resume_after (10 s), so the VM stays suspended.
    let mut t = 8 * S;
    while t < 60 * S {
        steps.push(step(t, 0.1, &[]));
        steps.push(step(t + 2 * S, 0.8, &[]));
        t += 4 * S;
    }
    run(&mut p, &steps);
    assert_eq!(p.vm("sg-1").unwrap().state, VmState::Suspended);
    // Suspended for reclaim_after (60 s since t = 6 s): reclaimed.
    run(
        &mut p,
        &[step(
            66 * S,
            0.8,
            &[("sg-1", VmState::Reclaimed, Reason::SuspendedTooLong)],
        )],
    );
    assert_eq!(p.vms().count(), 0);
}

#[test]
fn suspend_reason_follows_the_dominant_metric() {
    for (metric, reason) in [
        (Metric::Cpu, Reason::CpuPressure),
        (Metric::LoadAvg, Reason::CpuPressure),
        (Metric::PsiCpu, Reason::CpuPressure),
        (Metric::Memory, Reason::MemoryPressure),
        (Metric::PsiMemory, Reason::MemoryPressure),
        (Metric::Network, Reason::NetworkPressure),
        (Metric::Disk, Reason::DiskPressure),
        (Metric::PsiIo, Reason::DiskPressure),
        (Metric::Rtt, Reason::Latency),
    ] {
        let mut p = launched_one();
        let d = p.evaluate(
            &Observation {
                now: Duration::from_secs(6),
                load: 0.8,
                peak: 0.8,
                dominant: Some(metric),
                mem_available_bytes: FREE * MIB,
            },
            false,
        );
        assert_eq!(d.len(), 1, "{metric}");
        assert_eq!(
            (d[0].to, d[0].reason, d[0].action),
            (VmState::Suspended, reason, Action::Suspend)
        );
    }
}

#[test]
fn exactly_at_the_threshold_does_not_suspend() {
    let mut p = launched_one();
    run(&mut p, &[step(6 * S, 0.75, &[])]);
}

#[test]
fn memory_emergency_reclaims_suspended_first_then_running() {
    let mut p = Policy::new(cfg());
    run(
        &mut p,
        &[
            step(0, 0.1, &[]),
            step(
                5 * S,
                0.1,
                &[("sg-1", VmState::Launching, Reason::SpareCapacity)],
            ),
            step(
                10 * S,
                0.1,
                &[("sg-2", VmState::Launching, Reason::SpareCapacity)],
            ),
            step(
                11 * S,
                0.9,
                &[
                    ("sg-1", VmState::Suspended, Reason::CpuPressure),
                    ("sg-2", VmState::Suspended, Reason::CpuPressure),
                ],
            ),
            step(30 * S, 0.1, &[]),
            step(
                40 * S,
                0.1,
                &[
                    ("sg-1", VmState::Running, Reason::Idle),
                    ("sg-2", VmState::Running, Reason::Idle),
                ],
            ),
            step(
                41 * S,
                0.9,
                &[
                    ("sg-1", VmState::Suspended, Reason::CpuPressure),
                    ("sg-2", VmState::Suspended, Reason::CpuPressure),
                ],
            ),
        ],
    );
    // 300 MiB short of the reserve: one 512 MiB VM covers it.
    let short = Step {
        t_ms: 42 * S,
        load: 0.9,
        dominant: Some(Metric::Memory),
        mem_mib: 1024 - 300,
        expect: &[("sg-1", VmState::Reclaimed, Reason::MemoryReserve)],
    };
    run(&mut p, &[short]);
    assert_eq!(p.vms().count(), 1);
}

#[test]
fn memory_emergency_reclaims_enough_to_cover_the_deficit() {
    let mut p = Policy::new(cfg());
    run(
        &mut p,
        &[
            step(0, 0.1, &[]),
            step(
                5 * S,
                0.1,
                &[("sg-1", VmState::Launching, Reason::SpareCapacity)],
            ),
            step(
                10 * S,
                0.1,
                &[("sg-2", VmState::Launching, Reason::SpareCapacity)],
            ),
        ],
    );
    // Running VMs, load fine, but MemAvailable 700 MiB under the reserve:
    // both must go (newest first), even though the CPU is idle.
    let s = Step {
        t_ms: 11 * S,
        load: 0.1,
        dominant: Some(Metric::Cpu),
        mem_mib: 1024 - 700,
        expect: &[
            ("sg-2", VmState::Reclaimed, Reason::MemoryReserve),
            ("sg-1", VmState::Reclaimed, Reason::MemoryReserve),
        ],
    };
    run(&mut p, &[s]);
    // And nothing is launched while memory is short.
    run(
        &mut p,
        &[Step {
            t_ms: 30 * S,
            load: 0.1,
            dominant: None,
            mem_mib: 1024 + 100,
            expect: &[],
        }],
    );
}

#[test]
fn launch_respects_the_memory_reserve() {
    let mut p = Policy::new(cfg());
    // 1.3 GiB free: above the reserve, but a 512 MiB VM would cut into it.
    let low = |t_ms| Step {
        t_ms,
        load: 0.1,
        dominant: None,
        mem_mib: 1300,
        expect: &[],
    };
    run(&mut p, &[low(0), low(5 * S), low(20 * S)]);
    assert_eq!(p.vms().count(), 0);
}

#[test]
fn no_launch_while_a_vm_is_suspended() {
    let mut p = launched_one();
    run(
        &mut p,
        &[
            step(
                6 * S,
                0.9,
                &[("sg-1", VmState::Suspended, Reason::CpuPressure)],
            ),
            // Calm (below launch_below) but not yet long enough to resume.
            step(7 * S, 0.1, &[]),
            step(15 * S, 0.1, &[]),
            step(17 * S, 0.1, &[("sg-1", VmState::Running, Reason::Idle)]),
        ],
    );
}

#[test]
fn boot_timeout_reclaims_a_stuck_launch() {
    let mut p = Policy::new(cfg());
    let d = p.evaluate(&obs(0, 0.1), false);
    assert!(d.is_empty());
    let d = p.evaluate(&obs(5 * S, 0.1), false);
    assert_eq!(d[0].action, Action::Launch);
    // Never reported started.
    assert!(p.evaluate(&obs(34 * S, 0.1), false).is_empty());
    let d = p.evaluate(&obs(35 * S, 0.1), false);
    assert_eq!(d[0].reason, Reason::BootTimeout);
    assert_eq!(d[0].action, Action::Destroy);
}

fn obs(t_ms: u64, load: f64) -> Observation {
    Observation {
        now: Duration::from_millis(t_ms),
        load,
        peak: load,
        dominant: Some(Metric::Cpu),
        mem_available_bytes: FREE * MIB,
    }
}

#[test]
fn drain_reclaims_everything_and_stops_launching() {
    let mut p = launched_one();
    p.drain(Reason::Drain);
    let d = p.evaluate(&obs(6 * S, 0.0), true);
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].to, d[0].reason, d[0].action),
        (VmState::Reclaimed, Reason::Drain, Action::Destroy)
    );
    assert!(p.evaluate(&obs(60 * S, 0.0), true).is_empty());
    p.undrain();
    assert!(p.evaluate(&obs(61 * S, 0.0), true).is_empty());
    assert_eq!(
        p.evaluate(&obs(66 * S, 0.0), true)[0].action,
        Action::Launch
    );
}

#[test]
fn shutdown_saves_when_the_runtime_can() {
    let mut p = launched_one();
    p.drain(Reason::Shutdown);
    let d = p.evaluate(&obs(6 * S, 0.0), true);
    assert_eq!((d[0].reason, d[0].action), (Reason::Shutdown, Action::Save));
    let mut p = launched_one();
    p.drain(Reason::Shutdown);
    let d = p.evaluate(&obs(6 * S, 0.0), false);
    assert_eq!(
        (d[0].reason, d[0].action),
        (Reason::Shutdown, Action::Destroy)
    );
}

#[test]
fn adopted_vms_continue_the_numbering_and_obey_the_policy() {
    let mut p = Policy::new(cfg());
    let d = p.adopt(VmSlot {
        name: "sg-7".into(),
        state: VmState::Running,
        since: Duration::ZERO,
        vcpus: 1,
        memory_mib: 512,
    });
    assert_eq!(
        (d.from, d.to, d.reason),
        (VmState::Absent, VmState::Running, Reason::Adopted)
    );
    run(
        &mut p,
        &[
            step(0, 0.9, &[("sg-7", VmState::Suspended, Reason::CpuPressure)]),
            step(S, 0.1, &[]),
            step(11 * S, 0.1, &[("sg-7", VmState::Running, Reason::Idle)]),
            step(
                16 * S,
                0.1,
                &[("sg-8", VmState::Launching, Reason::SpareCapacity)],
            ),
        ],
    );
}

#[test]
fn runtime_events_reclaim() {
    let mut p = launched_one();
    let d = p.on_exited("sg-1", Duration::from_secs(7)).unwrap();
    assert_eq!(
        (d.from, d.to, d.reason),
        (VmState::Running, VmState::Reclaimed, Reason::Exited)
    );
    assert!(p.on_exited("sg-1", Duration::from_secs(7)).is_none());
    let mut p = launched_one();
    let d = p.on_runtime_error("sg-1", Duration::from_secs(7)).unwrap();
    assert_eq!(d.reason, Reason::RuntimeError);
    assert!(p.on_started("nope", Duration::ZERO).is_none());
}

#[test]
fn same_script_same_decisions() {
    // Determinism: two policies fed the same observations decide the same.
    let script: Vec<Observation> = (0..400u64)
        .map(|i| Observation {
            now: Duration::from_millis(i * 250),
            load: ((i * 37 % 100) as f64) / 100.0,
            peak: ((i * 37 % 100) as f64) / 100.0,
            dominant: Some(Metric::ALL[(i % 9) as usize]),
            mem_available_bytes: if i % 50 == 0 { 512 * MIB } else { FREE * MIB },
        })
        .collect();
    let mut a = Policy::new(cfg());
    let mut b = Policy::new(cfg());
    for o in &script {
        let da = a.evaluate(o, false);
        let db = b.evaluate(o, false);
        assert_eq!(da, db);
        for d in da.iter().filter(|d| d.action == Action::Launch) {
            a.on_started(&d.vm, o.now);
            b.on_started(&d.vm, o.now);
        }
    }
}

#[test]
fn confirm_restarts_the_clock_of_the_current_state() {
    let mut p = launched_one();
    run(
        &mut p,
        &[step(
            6 * S,
            0.9,
            &[("sg-1", VmState::Suspended, Reason::CpuPressure)],
        )],
    );
    // The suspend took 2 s to complete: reclaim_after (60 s) counts from then.
    p.confirm("sg-1", Duration::from_secs(8));
    run(&mut p, &[step(66 * S, 0.9, &[])]);
    run(
        &mut p,
        &[step(
            68 * S,
            0.9,
            &[("sg-1", VmState::Reclaimed, Reason::SuspendedTooLong)],
        )],
    );
}

#[test]
fn a_cpu_peak_suspends_but_does_not_break_calm() {
    let mut p = launched_one();
    // Smoothed load is calm, but the CPU's short window saw a step.
    let mut o = obs(6 * S, 0.1);
    o.peak = 0.9;
    o.dominant = Some(Metric::Memory);
    let d = p.evaluate(&o, false);
    assert_eq!(
        (d[0].to, d[0].reason),
        (VmState::Suspended, Reason::CpuPressure)
    );
    // Peaks below suspend_above do not restart the resume clock.
    for t in 7..16 {
        let mut o = obs(t * S, 0.1);
        o.peak = 0.6;
        assert!(p.evaluate(&o, false).is_empty(), "t = {t}");
    }
    let mut o = obs(17 * S, 0.1);
    o.peak = 0.6;
    let d = p.evaluate(&o, false);
    assert_eq!((d[0].to, d[0].reason), (VmState::Running, Reason::Idle));
}

fn save_mode() -> PolicyConfig {
    let mut c = cfg();
    c.policy.reclaim_mode = ReclaimMode::Save;
    c
}

/// One VM launched at 5 s (reported started), suspended at 6 s.
fn suspended_one(c: PolicyConfig) -> Policy {
    let mut p = Policy::new(c);
    assert!(p.evaluate(&obs(0, 0.1), true).is_empty());
    let d = p.evaluate(&obs(5 * S, 0.1), true);
    assert_eq!(d[0].action, Action::Launch);
    p.on_started("sg-1", Duration::from_secs(5)).unwrap();
    let d = p.evaluate(&obs(6 * S, 0.9), true);
    assert_eq!(
        (d[0].to, d[0].action),
        (VmState::Suspended, Action::Suspend)
    );
    p
}

#[test]
fn save_mode_saves_a_vm_suspended_too_long_and_restores_it_when_calm() {
    let mut p = suspended_one(save_mode());
    assert!(p.evaluate(&obs(65 * S, 0.9), true).is_empty());
    let d = p.evaluate(&obs(66 * S, 0.9), true);
    assert_eq!(
        (d[0].from, d[0].to, d[0].reason, d[0].action),
        (
            VmState::Suspended,
            VmState::Saved,
            Reason::SuspendedTooLong,
            Action::Save
        )
    );
    // Saved: kept (with its subtask), holding nothing; no new launch while
    // it waits, even with spare capacity.
    assert_eq!(p.vm("sg-1").unwrap().state, VmState::Saved);
    assert!(p.evaluate(&obs(70 * S, 0.1), true).is_empty());
    assert!(p.evaluate(&obs(79 * S, 0.1), true).is_empty());
    // Calm for resume_after (10 s from 70 s): restored, then Running once
    // its guest answers.
    let d = p.evaluate(&obs(80 * S, 0.1), true);
    assert_eq!(
        (d[0].from, d[0].to, d[0].reason, d[0].action),
        (
            VmState::Saved,
            VmState::Launching,
            Reason::Idle,
            Action::Restore
        )
    );
    assert_eq!(d.len(), 1);
    let started = p.on_started("sg-1", Duration::from_secs(81)).unwrap();
    assert_eq!(started.to, VmState::Running);
}

#[test]
fn save_mode_destroys_when_the_runtime_cannot_save() {
    let mut p = suspended_one(save_mode());
    let d = p.evaluate(&obs(66 * S, 0.9), false);
    assert_eq!(
        (d[0].to, d[0].action),
        (VmState::Reclaimed, Action::Destroy)
    );
    assert!(p.vm("sg-1").is_none());
}

#[test]
fn destroy_mode_reclaims_a_vm_suspended_too_long() {
    let mut p = suspended_one(cfg());
    let d = p.evaluate(&obs(66 * S, 0.9), true);
    assert_eq!(
        (d[0].to, d[0].action),
        (VmState::Reclaimed, Action::Destroy)
    );
}

#[test]
fn a_saved_vm_waits_for_the_memory_it_needs() {
    let mut p = suspended_one(save_mode());
    p.evaluate(&obs(66 * S, 0.9), true);
    // Calm, but MemAvailable is below reserve + the VM's memory: stays saved.
    let mut o = obs(70 * S, 0.1);
    o.mem_available_bytes = (1024 + 256) * MIB;
    assert!(p.evaluate(&o, true).is_empty());
    o.now = Duration::from_secs(90);
    assert!(p.evaluate(&o, true).is_empty());
    assert_eq!(p.vm("sg-1").unwrap().state, VmState::Saved);
    // And a memory emergency does not touch it (it holds no memory).
    o.mem_available_bytes = 100 * MIB;
    assert!(p.evaluate(&o, true).is_empty());
    let d = p.evaluate(&obs(91 * S, 0.1), true);
    assert!(
        d.is_empty(),
        "calm clock restarted after the emergency: {d:?}"
    );
    let d = p.evaluate(&obs(101 * S, 0.1), true);
    assert_eq!(d[0].action, Action::Restore);
}

#[test]
fn drain_destroys_saved_vms_and_shutdown_keeps_them() {
    let mut p = suspended_one(save_mode());
    p.evaluate(&obs(66 * S, 0.9), true);
    p.drain(Reason::Shutdown);
    assert!(p.evaluate(&obs(67 * S, 0.9), true).is_empty());
    let mut p = suspended_one(save_mode());
    p.evaluate(&obs(66 * S, 0.9), true);
    p.drain(Reason::Drain);
    let d = p.evaluate(&obs(67 * S, 0.9), true);
    assert_eq!(
        (d[0].from, d[0].to, d[0].action),
        (VmState::Saved, VmState::Reclaimed, Action::Destroy)
    );
}

#[test]
fn a_guest_failure_reclaims_the_vm() {
    let mut p = launched_one();
    let d = p.on_guest_failure("sg-1", Duration::from_secs(7)).unwrap();
    assert_eq!(
        (d.from, d.to, d.reason, d.action),
        (
            VmState::Running,
            VmState::Reclaimed,
            Reason::GuestFailure,
            Action::Destroy
        )
    );
    assert!(p.on_guest_failure("sg-1", Duration::from_secs(7)).is_none());
    // A launching VM whose guest never answered goes the same way.
    let mut p = Policy::new(cfg());
    p.evaluate(&obs(0, 0.1), false);
    p.evaluate(&obs(5 * S, 0.1), false);
    let d = p.on_guest_failure("sg-1", Duration::from_secs(6)).unwrap();
    assert_eq!(d.from, VmState::Launching);
}

fn migrate_mode() -> PolicyConfig {
    let mut c = cfg();
    c.policy.reclaim_mode = ReclaimMode::Migrate;
    c
}

#[test]
fn migrate_mode_saves_and_a_vm_in_flight_is_not_restored_here() {
    let mut p = suspended_one(migrate_mode());
    let d = p.evaluate(&obs(66 * S, 0.9), true);
    assert_eq!((d[0].to, d[0].action), (VmState::Saved, Action::Save));
    assert_eq!(p.saved_not_migrating(), vec!["sg-1".to_string()]);
    p.set_migrating("sg-1", true);
    assert!(p.saved_not_migrating().is_empty());
    // Calm long enough to restore, but its move is in flight: nothing.
    assert!(p.evaluate(&obs(70 * S, 0.1), true).is_empty());
    assert!(p.evaluate(&obs(85 * S, 0.1), true).is_empty());
    // The move failed: it stays saved here and is restored when calm.
    p.set_migrating("sg-1", false);
    let d = p.evaluate(&obs(86 * S, 0.1), true);
    assert_eq!(
        (d[0].from, d[0].to, d[0].action),
        (VmState::Saved, VmState::Launching, Action::Restore)
    );
}

#[test]
fn a_migrated_vm_leaves_and_launching_resumes() {
    let mut p = suspended_one(migrate_mode());
    p.evaluate(&obs(66 * S, 0.9), true);
    p.set_migrating("sg-1", true);
    // Only a saved VM can leave.
    assert!(p.migrated_out("sg-2", Duration::from_secs(67)).is_none());
    let d = p.migrated_out("sg-1", Duration::from_secs(67)).unwrap();
    assert_eq!(
        (d.from, d.to, d.reason, d.action),
        (
            VmState::Saved,
            VmState::Reclaimed,
            Reason::Migrated,
            Action::Record
        )
    );
    assert!(p.vm("sg-1").is_none());
    // Nothing saved any more: spare capacity launches again.
    assert!(p.evaluate(&obs(70 * S, 0.1), true).is_empty());
    let d = p.evaluate(&obs(75 * S, 0.1), true);
    assert_eq!(d[0].action, Action::Launch);
}

#[test]
fn an_incoming_vm_is_taken_only_by_an_idle_host_with_room() {
    let mut p = Policy::new(migrate_mode());
    let refused = |p: &Policy| p.check_incoming("sg-a-3", 1, 512).unwrap_err();
    assert!(refused(&p).contains("no load sample"));
    p.evaluate(&obs(0, 0.9), true);
    assert!(refused(&p).contains("launch_below"), "{}", refused(&p));
    p.evaluate(&obs(S, 0.1), true);
    assert_eq!(p.check_incoming("sg-a-3", 1, 512), Ok(()));
    // Too big for the budgets (1024 MiB, 2 vCPUs).
    assert!(p
        .check_incoming("sg-a-3", 3, 512)
        .unwrap_err()
        .contains("budget"));
    assert!(p
        .check_incoming("sg-a-3", 1, 2048)
        .unwrap_err()
        .contains("budget"));

    let d = p.arrive("sg-a-3", 1, 512, Duration::from_secs(2));
    assert_eq!(
        (d.from, d.to, d.reason),
        (VmState::Absent, VmState::Launching, Reason::Migrated)
    );
    // Launching: no second arrival, and not the same name twice.
    assert!(refused(&p).contains("already here"));
    assert!(p
        .check_incoming("sg-a-4", 1, 512)
        .unwrap_err()
        .contains("launching"));
    let started = p.on_started("sg-a-3", Duration::from_secs(3)).unwrap();
    assert_eq!(started.to, VmState::Running);
    assert_eq!(p.check_incoming("sg-a-4", 1, 512), Ok(()));
    p.drain(Reason::Drain);
    assert!(p
        .check_incoming("sg-a-4", 1, 512)
        .unwrap_err()
        .contains("draining"));
}
