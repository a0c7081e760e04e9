//! End-to-end tests of `sparegrid-agent` with the process runtime: grid
//! "VMs" are busy-loop processes in a per-test cgroup partition, customer
//! load is busy-loop processes outside it. The load factor uses CPU only
//! (every other weight 0) so the tests do not depend on the box's disk,
//! network or memory noise.
//!
//! `root_` tests need root (cgroups) and are skipped otherwise.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use sparegrid_proto::{Reason, VmState};
use sparegrid_tests::*;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const RESUME_AFTER_MS: u64 = 2000;
const RECLAIM_AFTER_MS: u64 = 6000;

/// The process-runtime config of these tests: fast sampling, CPU-only load,
/// one small grid VM at most.
fn process_conf(h: &mut Harness) -> (Conf, String, String) {
    let host = unique("sgt");
    let partition = unique("sparegrid-test");
    h.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
    let mut c = h.base_conf();
    c.str("agent", "host_name", &host)
        .str("sampler", "interval", "100ms")
        .str("load", "combine", "max")
        .str("load", "attack", "0s")
        .str("load", "decay", "300ms");
    c.cpu_only_load();
    c.set("policy", "suspend_above", "0.6")
        .set("policy", "resume_below", "0.3")
        .set("policy", "launch_below", "0.3")
        .str("policy", "launch_after", "1s")
        .str("policy", "resume_after", &format!("{RESUME_AFTER_MS}ms"))
        .str("policy", "reclaim_after", &format!("{RECLAIM_AFTER_MS}ms"))
        .str("policy", "boot_timeout", "10s")
        .set("policy", "memory_reserve_mib", 64)
        .set("policy", "max_grid_vms", 1)
        .set("policy", "memory_budget_mib", 128)
        .set("policy", "vcpu_budget", 1)
        .str("cgroup", "partition", &partition)
        .str("runtime", "kind", "process")
        .set("vm", "vcpus", 1)
        .set("vm", "memory_mib", 64)
        .set(
            "vm",
            "command",
            r#"["/bin/sh", "-c", "while :; do :; done"]"#,
        );
    (c, host, partition)
}

/// Waits for `name` to go Absent → Launching (spare_capacity) → Running
/// (started) and returns the Running status.
fn wait_launched(agent: &mut Agent, name: &str, timeout: Duration) {
    agent.wait_for(&format!("{name} to be Running"), timeout, |s| {
        vm_in(s, name, VmState::Running).map(|_| ())
    });
    let st = agent.status().expect("status");
    let ts = transitions_of(&st, name);
    assert!(
        ts.len() >= 2,
        "expected launch transitions for {name}: {}",
        summary(&st)
    );
    assert_transition(
        ts[0],
        VmState::Absent,
        VmState::Launching,
        Reason::SpareCapacity,
    );
    assert_transition(ts[1], VmState::Launching, VmState::Running, Reason::Started);
    assert!(
        ts[0].load < 0.3,
        "launched at load {} (launch_below 0.3)",
        ts[0].load
    );
}

/// Asserts the grid VM burns no CPU for a second: the agent's view
/// (`cpu_time_ns`) and the kernel's (`/proc/<pid>/stat`).
fn assert_frozen(agent: &mut Agent, name: &str, pids: &[u32]) {
    // Let the ticks that ran before the freeze land in status.
    sleep_ms(300);
    let c0 = agent
        .status()
        .ok()
        .and_then(|s| vm(&s, name).map(|v| v.cpu_time_ns));
    let k0: Vec<_> = pids.iter().map(|p| proc_cpu_ticks(*p)).collect();
    sleep_ms(1000);
    let st = agent.status().expect("status");
    let c1 = vm(&st, name).map(|v| v.cpu_time_ns);
    let k1: Vec<_> = pids.iter().map(|p| proc_cpu_ticks(*p)).collect();
    let (Some(c0), Some(c1)) = (c0, c1) else {
        panic!(
            "{name} vanished while suspended\n{}",
            agent.report(Some(&st))
        );
    };
    assert!(
        c1.saturating_sub(c0) < 20_000_000,
        "suspended {name} still burns CPU: cpu_time_ns {c0} → {c1} in 1 s\n{}",
        agent.report(Some(&st))
    );
    for (pid, (a, b)) in pids.iter().zip(k0.iter().zip(&k1)) {
        let (Some((t0, _)), Some((t1, state))) = (a, b) else {
            panic!("grid process {pid} of {name} died while suspended");
        };
        assert!(
            t1.saturating_sub(*t0) <= 1,
            "grid process {pid} of {name} ran while suspended: {t0} → {t1} ticks (state {state})"
        );
    }
}

/// Asserts the grid VM burns CPU again.
fn assert_thawed(agent: &mut Agent, name: &str) {
    let c0 = vm(&agent.status().expect("status"), name).map_or(0, |v| v.cpu_time_ns);
    agent.wait_for(
        &format!("{name}'s cpu_time_ns to grow after resume"),
        Duration::from_secs(3),
        |s| {
            vm(s, name)
                .filter(|v| v.cpu_time_ns > c0 + 100_000_000)
                .map(|_| ())
        },
    );
}

#[test]
fn root_process_grid_vm_suspends_resumes_and_is_reclaimed() {
    const T: &str = "root_process_grid_vm_suspends_resumes_and_is_reclaimed";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let mut h = Harness::new();
    let (conf, host, partition) = process_conf(&mut h);
    let mut agent = h.start(&conf);
    let name = format!("sg-{host}-1");
    let st = agent.status().expect("status");
    assert_eq!(st.runtime, "process");
    assert_eq!(st.host, host);

    // 1. Spare capacity: the grid VM launches.
    wait_launched(&mut agent, &name, Duration::from_secs(15));
    let pids = child_pids(Path::new(CGROUP_ROOT), &partition, &name);
    assert!(
        !pids.is_empty(),
        "no process in the grid cgroup {partition}/{name}: {:?}",
        partition_children(Path::new(CGROUP_ROOT), &partition)
    );

    // 2. Its own busy loop must not suspend it: the grid's CPU is subtracted.
    let running_since = vm(&agent.status().unwrap(), &name).unwrap().cpu_time_ns;
    let mut grid_seen: f64 = 0.0;
    let st = agent.hold(
        &format!("{name} stays Running while it burns CPU"),
        Duration::from_secs(3),
        |s| {
            if let Some(cpu) = s.load.as_ref().and_then(|l| {
                l.metrics
                    .iter()
                    .find(|m| m.metric == sparegrid_proto::Metric::Cpu)
            }) {
                grid_seen = grid_seen.max(cpu.grid);
            }
            match vm(s, &name) {
                Some(v) if v.state == VmState::Running => Ok(()),
                Some(v) => Err(format!("{name} is {}", v.state)),
                None => Err(format!("{name} is gone")),
            }
        },
    );
    let burned = vm(&st, &name).unwrap().cpu_time_ns - running_since;
    assert!(
        burned > 500_000_000,
        "the grid VM burned only {burned} ns of CPU in 3 s: the test proves nothing\n{}",
        agent.report(Some(&st))
    );
    assert!(
        grid_seen > 0.1,
        "status never showed the grid's CPU share as subtracted (max grid {grid_seen:.3})\n{}",
        agent.report(Some(&st))
    );

    // 3. Customer load on every CPU: suspended at once for cpu_pressure.
    let load = CustomerLoad::all_cpus();
    let t_load = unix_ms();
    let suspended = agent.wait_for(
        &format!("{name} to be Suspended under customer load"),
        Duration::from_secs(5),
        |s| {
            vm_in(s, &name, VmState::Suspended)?;
            last_transition(s, &name, VmState::Suspended).cloned()
        },
    );
    assert_transition(
        &suspended,
        VmState::Running,
        VmState::Suspended,
        Reason::CpuPressure,
    );
    assert!(suspended.at_unix_ms >= t_load);
    assert!(suspended.load > 0.6, "suspended at load {}", suspended.load);
    assert_frozen(&mut agent, &name, &pids);

    // 4. Load off: resumed (idle), but not before resume_after.
    load.stop();
    let t_calm = unix_ms();
    let resumed = agent.wait_for(
        &format!("{name} to be Running again after the load stopped"),
        Duration::from_secs(8),
        |s| {
            vm_in(s, &name, VmState::Running)?;
            transition_after(s, &name, VmState::Running, t_calm).cloned()
        },
    );
    assert_transition(&resumed, VmState::Suspended, VmState::Running, Reason::Idle);
    assert!(
        resumed.at_unix_ms >= t_calm + RESUME_AFTER_MS,
        "resumed {} ms after the load stopped; resume_after is {RESUME_AFTER_MS} ms",
        resumed.at_unix_ms - t_calm
    );
    assert!(resumed.load < 0.3, "resumed at load {}", resumed.load);
    assert_thawed(&mut agent, &name);

    // 5. Load on and held: suspended again, then reclaimed after reclaim_after.
    let load = CustomerLoad::all_cpus();
    let t_load2 = unix_ms();
    expect_suspend_then_reclaim(
        &mut agent,
        &name,
        t_load2,
        Duration::from_secs(5),
        Duration::from_millis(RECLAIM_AFTER_MS + 5000),
        RECLAIM_AFTER_MS,
        2000,
    );
    let st = agent.status().unwrap();
    assert!(
        vm(&st, &name).is_none(),
        "reclaimed VM still listed\n{}",
        summary(&st)
    );
    for pid in &pids {
        assert!(!pid_alive(*pid), "grid process {pid} survived its reclaim");
    }
    agent.wait_for("the reclaimed VM's cgroup to be removed", secs(3), |_| {
        partition_children(Path::new(CGROUP_ROOT), &partition)
            .is_empty()
            .then_some(())
    });
    // Under load nothing relaunches.
    assert!(
        st.vms.is_empty(),
        "a VM launched under load\n{}",
        summary(&st)
    );

    // 6. Every transition is counted by reason.
    let metrics = agent.metrics();
    let n = metric_value(
        &metrics,
        "sparegrid_transitions_total",
        &[("reason", "cpu_pressure")],
    );
    assert!(
        n.is_some_and(|n| n >= 2.0),
        "sparegrid_transitions_total{{reason=\"cpu_pressure\"}} is {n:?}, expected ≥ 2\n{metrics}"
    );
    for reason in ["spare_capacity", "started", "idle", "suspended_too_long"] {
        assert!(
            metric_value(
                &metrics,
                "sparegrid_transitions_total",
                &[("reason", reason)]
            )
            .is_some_and(|n| n >= 1.0),
            "no sparegrid_transitions_total with reason {reason}\n{metrics}"
        );
    }

    // 7. A clean stop, still under load (so nothing relaunches first).
    let exit = agent.terminate(secs(15));
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exit status {exit}\n{}",
        agent.log_tail(20)
    );
    drop(load);
}

#[test]
fn root_drain_and_sigterm() {
    const T: &str = "root_drain_and_sigterm";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let mut h = Harness::new();
    let (conf, host, partition) = process_conf(&mut h);
    let root = Path::new(CGROUP_ROOT);
    let mut agent = h.start(&conf);
    let first = format!("sg-{host}-1");
    wait_launched(&mut agent, &first, secs(15));
    let pids = child_pids(root, &partition, &first);
    assert!(!pids.is_empty(), "no process in {partition}/{first}");

    // Drain: the VM is reclaimed for drain and nothing launches.
    let t_drain = unix_ms();
    assert_eq!(agent.drain(), 202, "POST /v1/drain");
    let reclaimed = agent.wait_for(
        &format!("{first} to be reclaimed by the drain"),
        secs(5),
        |s| {
            if !s.draining || !s.vms.is_empty() {
                return None;
            }
            transition_after(s, &first, VmState::Reclaimed, t_drain).cloned()
        },
    );
    assert_transition(
        &reclaimed,
        VmState::Running,
        VmState::Reclaimed,
        Reason::Drain,
    );
    agent.wait_for("the drained VM's process to exit", secs(3), |_| {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    agent.hold("nothing launches while draining", secs(3), |s| {
        match (s.draining, s.vms.first()) {
            (true, None) => Ok(()),
            (false, _) => Err("draining is false".into()),
            (_, Some(v)) => Err(format!("{} is {} while draining", v.name, v.state)),
        }
    });
    assert!(
        partition_children(root, &partition).is_empty(),
        "child cgroups left after the drain: {:?}",
        partition_children(root, &partition)
    );

    // Undrain: launches again, under a new name.
    let t_undrain = unix_ms();
    assert_eq!(agent.undrain(), 202, "DELETE /v1/drain");
    let second = format!("sg-{host}-2");
    agent.wait_for(
        &format!("{second} to launch after the drain was lifted"),
        secs(15),
        |s| {
            (!s.draining).then_some(())?;
            vm_in(s, &second, VmState::Running).map(|_| ())
        },
    );
    let st = agent.status().unwrap();
    let launch = transition_after(&st, &second, VmState::Launching, t_undrain)
        .expect("a Launching transition after the undrain");
    assert_eq!(launch.reason, Reason::SpareCapacity);
    let pids2 = child_pids(root, &partition, &second);
    assert!(!pids2.is_empty(), "no process in {partition}/{second}");

    // SIGTERM: drains (destroys, with the process runtime) and exits 0.
    let exit = agent.terminate(secs(15));
    let log = agent.log();
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit} after SIGTERM\n{}",
        agent.log_tail(30)
    );
    assert!(
        log.contains("shutting down"),
        "no shutdown line in the log\n{}",
        agent.log_tail(30)
    );
    let tail = agent.log_tail(8);
    assert!(
        tail.contains("stopped"),
        "the log does not end with the agent stopping\n{tail}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&second) && l.contains("reclaimed") && l.contains("shutdown")),
        "no {second} → reclaimed (shutdown) line in the log\n{}",
        agent.log_tail(30)
    );
    for pid in &pids2 {
        assert!(!pid_alive(*pid), "grid process {pid} survived SIGTERM");
    }
    let left = partition_children(root, &partition);
    assert!(
        left.is_empty(),
        "child cgroups left after SIGTERM: {left:?}"
    );
}

/// Runs the agent on `config` text and returns (exit code, stderr + stdout).
fn run_agent_on(h: &Harness, config: &str, args: &[&str]) -> (Option<i32>, String) {
    let path = h.write_raw_config(config);
    let out = std::process::Command::new(agent_bin())
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sparegrid-agent");
    // A config that is wrongly accepted would start a daemon: don't hang.
    let pid = out.id();
    let killer = std::thread::spawn(move || {
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(50));
            if !pid_alive(pid) {
                return false;
            }
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        true
    });
    let out = out.wait_with_output().expect("wait for sparegrid-agent");
    let killed = killer.join().unwrap_or(false);
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    assert!(
        !killed,
        "the agent kept running on config:\n{config}\noutput:\n{text}"
    );
    (out.status.code(), text)
}

#[test]
fn bad_config_fails_with_field_name() {
    // Not a root test, but it starts agents: keep them out of the timing of
    // the root tests that may run in the other test thread.
    let _machine = exclusive("bad_config_fails_with_field_name");
    let h = Harness::new();
    let listen = format!("[agent]\nlisten = \"{}\"\n", h.addr);
    let cases: [(&str, String, &str); 5] = [
        (
            "out-of-range value",
            format!("{listen}[policy]\nsuspend_above = 2.0\n"),
            "policy.suspend_above",
        ),
        (
            "unknown field",
            format!("{listen}[policy]\nsuspend_abvoe = 0.5\n"),
            "suspend_abvoe",
        ),
        (
            "unknown section",
            format!("{listen}[polcy]\nsuspend_above = 0.5\n"),
            "polcy",
        ),
        (
            "bad duration",
            format!("{listen}[policy]\nresume_after = \"soon\"\n"),
            "resume_after",
        ),
        (
            "thresholds out of order",
            format!(
                "{listen}[policy]\nsuspend_above = 0.5\nresume_below = 0.6\nlaunch_below = 0.1\n"
            ),
            "policy.resume_below",
        ),
    ];
    for (what, config, field) in &cases {
        for args in [&["run"][..], &["print-config"][..]] {
            let (code, out) = run_agent_on(&h, config, args);
            assert_eq!(
                code,
                Some(2),
                "{what} ({args:?}): expected exit code 2, got {code:?}\n{out}"
            );
            assert!(
                out.contains(field),
                "{what} ({args:?}): the message does not name {field}:\n{out}"
            );
        }
    }

    // A missing file is a config error too, naming the path.
    let missing = h.dir().join("no-such.toml");
    let out = std::process::Command::new(agent_bin())
        .arg("--config")
        .arg(&missing)
        .arg("print-config")
        .output()
        .expect("run sparegrid-agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "missing config file: {text}");
    assert!(
        text.contains("no-such.toml"),
        "does not name the file: {text}"
    );
}

#[test]
fn print_config_shows_the_effective_config() {
    let _machine = exclusive("print_config_shows_the_effective_config");
    let mut h = Harness::new();
    let (conf, host, _) = process_conf(&mut h);
    let text = conf.render();
    let (code, out) = run_agent_on(&h, &text, &["print-config"]);
    assert_eq!(code, Some(0), "print-config failed:\n{out}");
    // The output is a complete config that parses to the same thing.
    let printed = sparegrid_agent::config::Config::parse(&out)
        .unwrap_or_else(|e| panic!("print-config output does not parse: {e}\n{out}"));
    let original = sparegrid_agent::config::Config::parse(&text).unwrap();
    assert_eq!(printed, original, "print-config changed the config:\n{out}");
    assert_eq!(printed.agent.host_name, host);
}

#[test]
fn root_sighup_reloads_config() {
    const T: &str = "root_sighup_reloads_config";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let cpus = online_cpus();
    let mut h = Harness::new();
    let (mut conf, host, _) = process_conf(&mut h);
    // Wide margins around the ~0.5 customer load below: noise on a shared
    // box must not cross the old threshold before the reload.
    conf.set("policy", "suspend_above", "0.8");
    let mut agent = h.start(&conf);
    let name = format!("sg-{host}-1");
    wait_launched(&mut agent, &name, secs(15));

    // Half the CPUs busy: about 0.5, between the new and the old threshold.
    let half = (cpus / 2).max(1);
    let expected = half as f64 / cpus as f64;
    let behavioural = cpus >= 2 && expected < 0.55 && expected > 0.4;
    let _load = behavioural.then(|| CustomerLoad::start(half));
    if behavioural {
        agent.hold(
            &format!("{name} stays Running at load ~{expected:.2} (suspend_above 0.8)"),
            secs(2),
            |s| match vm(s, &name) {
                Some(v) if v.state == VmState::Running => Ok(()),
                other => Err(format!("{name}: {other:?}")),
            },
        );
    } else {
        eprintln!("{T}: {cpus} CPU(s): checking the reload through the log only");
    }

    // A broken file on SIGHUP: the agent keeps running on the old config.
    let mut broken = conf.clone();
    broken.set("policy", "suspend_above", "7.0");
    h.write_raw_config(&broken.render());
    agent.signal(Signal::SIGHUP);
    agent.wait_log("policy.suspend_above", secs(5));
    assert!(
        !agent.log().contains("config reloaded"),
        "a broken config was reloaded\n{}",
        agent.log_tail(20)
    );
    agent.hold(
        "the agent keeps running its VM on the old config after a broken SIGHUP",
        secs(1),
        |s| match vm(s, &name) {
            Some(v) if v.state == VmState::Running => Ok(()),
            other => Err(format!("{name}: {other:?}")),
        },
    );

    // A valid change: suspend_above 0.8 → 0.35.
    conf.set("policy", "suspend_above", "0.35");
    h.write_config(&conf);
    let t_hup = unix_ms();
    agent.signal(Signal::SIGHUP);
    agent.wait_log("config reloaded", secs(5));
    assert!(agent.is_running(), "the agent exited on SIGHUP");
    if behavioural {
        let t = agent.wait_for(
            &format!("{name} to be suspended under the lower threshold"),
            secs(5),
            |s| transition_after(s, &name, VmState::Suspended, t_hup).cloned(),
        );
        assert_transition(
            &t,
            VmState::Running,
            VmState::Suspended,
            Reason::CpuPressure,
        );
        assert!(
            t.load > 0.35 && t.load <= 0.8,
            "suspended at load {:.3}: expected between the new (0.35) and old (0.8) thresholds",
            t.load
        );
    }
    let exit = agent.terminate(secs(15));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit}\n{}",
        agent.log_tail(20)
    );
}
