//! End-to-end tests of `sparegrid-agent` with the libvirt runtime on a real
//! libvirtd (`qemu:///system`) and a real TCG guest booted from the image
//! that `workloads/build-image.sh` builds (`$SPAREGRID_IMAGE_DIR`, else
//! `workloads/out/default`). The guest burns its vCPU
//! (`sparegrid.burn=1`), customer load is busy-loop processes on the host.
//!
//! `libvirtd_` tests need root and `SPAREGRID_LIBVIRTD=1`; they are skipped
//! otherwise, and when the image is missing.

use std::path::Path;
use std::time::{Duration, Instant};

use sparegrid_proto::{Reason, VmState};
use sparegrid_tests::*;

const RESUME_AFTER_MS: u64 = 3000;
const RECLAIM_AFTER_MS: u64 = 10_000;
/// TCG boots slowly, especially on a loaded 2-core box.
const BOOT: Duration = Duration::from_secs(120);

struct Setup {
    conf: Conf,
    host: String,
    /// `sg-<host>-`
    prefix: String,
}

fn libvirt_conf(h: &mut Harness, image: &Path) -> Setup {
    let host = unique("sgt");
    let partition = unique("sparegrid-test");
    h.cleanup_partition_on_drop(Path::new("/sys/fs/cgroup"), &partition);
    let mut c = h.base_conf();
    c.str("agent", "host_name", &host)
        .str("sampler", "interval", "250ms")
        .str("load", "combine", "max")
        .str("load", "attack", "0s")
        .str("load", "decay", "500ms");
    c.cpu_only_load();
    c.set("policy", "suspend_above", "0.6")
        .set("policy", "resume_below", "0.3")
        .set("policy", "launch_below", "0.3")
        .str("policy", "launch_after", "1s")
        .str("policy", "resume_after", &format!("{RESUME_AFTER_MS}ms"))
        .str("policy", "reclaim_after", &format!("{RECLAIM_AFTER_MS}ms"))
        .str("policy", "boot_timeout", "120s")
        .set("policy", "memory_reserve_mib", 64)
        .set("policy", "max_grid_vms", 1)
        .set("policy", "memory_budget_mib", 512)
        .set("policy", "vcpu_budget", 1)
        .str("cgroup", "partition", &partition)
        .str("runtime", "kind", "libvirt")
        .str("runtime", "libvirt_uri", LIBVIRT_URI)
        .str("runtime", "domain_type", "qemu")
        .set("vm", "vcpus", 1)
        .set("vm", "memory_mib", 256)
        .path("vm", "kernel", &image.join("vmlinuz"))
        .path("vm", "initrd", &image.join("initrd.img"))
        .str(
            "vm",
            "cmdline",
            "console=ttyS0 quiet panic=-1 sparegrid.burn=1",
        );
    Setup {
        conf: c,
        prefix: format!("sg-{host}-"),
        host,
    }
}

fn wait_launched(agent: &mut Agent, name: &str) {
    agent.wait_for(&format!("{name} to be Running"), BOOT, |s| {
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
}

/// Polls `virsh domstate` until it says `want`.
fn wait_domstate(agent: &Agent, name: &str, want: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let got = domstate(name);
        if got.as_deref() == Some(want) {
            return;
        }
        if start.elapsed() >= timeout {
            panic!(
                "virsh domstate {name}: expected {want:?}, got {got:?} after {timeout:?}\n{}",
                agent.report(None)
            );
        }
        // Not faster: every virsh run is CPU the agent counts as customer load.
        sleep_ms(250);
    }
}

/// Waits for the guest's `sparegrid-guest: ready` console line while the VM
/// stays Running. Returns false (after saying so) when the agent keeps no
/// console log this harness can find. Runs `virsh` only every few seconds:
/// its CPU counts as customer load.
fn wait_guest_ready(agent: &mut Agent, run_dir: &Path, name: &str) -> bool {
    const READY: &str = "sparegrid-guest: ready";
    let start = Instant::now();
    let mut files = console_candidates(run_dir, name, true);
    let mut last_xml = Instant::now();
    loop {
        if let Some(f) = file_containing(&files, READY) {
            eprintln!(
                "{name}: guest ready after {:?} ({})",
                start.elapsed(),
                f.display()
            );
            return true;
        }
        let st = agent.status().expect("status");
        match vm(&st, name) {
            Some(v) if v.state == VmState::Running => {}
            other => panic!(
                "{name} left Running while the guest booted: {other:?}\n{}",
                agent.report(Some(&st))
            ),
        }
        if start.elapsed() >= BOOT {
            match files.first() {
                Some(f) => panic!(
                    "no `{READY}` on {name}'s console within {BOOT:?}; console file {}:\n{}",
                    f.display(),
                    std::fs::read_to_string(f).unwrap_or_default()
                ),
                None => {
                    eprintln!(
                        "{name}: no console log under {} or in the domain XML; \
                         not checking the guest's ready line",
                        run_dir.display()
                    );
                    return false;
                }
            }
        }
        sleep_ms(250);
        let xml = last_xml.elapsed() >= secs(5);
        if xml {
            last_xml = Instant::now();
        }
        files.extend(console_candidates(run_dir, name, xml));
        files.sort();
        files.dedup();
    }
}

#[test]
fn libvirtd_real_vm_paused_under_load_resumed_then_reclaimed() {
    const T: &str = "libvirtd_real_vm_paused_under_load_resumed_then_reclaimed";
    if skip_unless_libvirtd(T) {
        return;
    }
    let _machine = exclusive(T);
    let Some(image) = image_dir(T) else { return };
    let mut h = Harness::new();
    let s = libvirt_conf(&mut h, &image);
    let mut cleanup = DomainCleanup::new();
    cleanup.prefixes.push(s.prefix.clone());
    let run_dir = h.dir().join("run");
    let mut agent = h.start(&s.conf);
    let name = format!("{}1", s.prefix);
    let st = agent.status().unwrap();
    assert_eq!(st.runtime, "libvirt");
    assert_eq!(st.host, s.host);

    // 1. Launching → Running; the domain runs.
    wait_launched(&mut agent, &name);
    wait_domstate(&agent, &name, "running", secs(10));
    wait_guest_ready(&mut agent, &run_dir, &name);

    // 2. The guest burns its vCPU; that must not suspend it.
    let c0 = vm(&agent.status().unwrap(), &name).unwrap().cpu_time_ns;
    let mut grid_seen: f64 = 0.0;
    let st = agent.hold(
        &format!("{name} stays Running while the guest burns its vCPU"),
        secs(3),
        |s| {
            if let Some(l) = &s.load {
                for m in &l.metrics {
                    if m.metric == sparegrid_proto::Metric::Cpu {
                        grid_seen = grid_seen.max(m.grid);
                    }
                }
            }
            match vm(s, &name) {
                Some(v) if v.state == VmState::Running => Ok(()),
                other => Err(format!("{name}: {other:?}")),
            }
        },
    );
    let burned = vm(&st, &name).unwrap().cpu_time_ns.saturating_sub(c0);
    assert!(
        burned > 500_000_000,
        "the guest used only {burned} ns of CPU in 3 s: is it burning?\n{}",
        agent.report(Some(&st))
    );
    assert!(
        grid_seen > 0.1,
        "status never showed the guest's CPU as the grid's share (max {grid_seen:.3})\n{}",
        agent.report(Some(&st))
    );

    // 3. Customer load: paused for cpu_pressure.
    let load = CustomerLoad::all_cpus();
    let t_load = unix_ms();
    let suspended = agent.wait_for(&format!("{name} to be Suspended"), secs(15), |s| {
        vm_in(s, &name, VmState::Suspended)?;
        transition_after(s, &name, VmState::Suspended, t_load).cloned()
    });
    assert_transition(
        &suspended,
        VmState::Running,
        VmState::Suspended,
        Reason::CpuPressure,
    );
    wait_domstate(&agent, &name, "paused", secs(10));
    sleep_ms(600);
    let c0 = vm(&agent.status().unwrap(), &name).map(|v| v.cpu_time_ns);
    sleep_ms(1500);
    let st = agent.status().unwrap();
    let c1 = vm(&st, &name).map(|v| v.cpu_time_ns);
    let (Some(c0), Some(c1)) = (c0, c1) else {
        panic!("{name} vanished while paused\n{}", agent.report(Some(&st)));
    };
    assert!(
        c1.saturating_sub(c0) < 100_000_000,
        "paused guest still used CPU: {c0} → {c1} ns in 1.5 s\n{}",
        agent.report(Some(&st))
    );

    // 4. Load off: resumed (idle) after resume_after, domain running again.
    load.stop();
    let t_calm = unix_ms();
    let resumed = agent.wait_for(&format!("{name} to be resumed"), secs(30), |s| {
        vm_in(s, &name, VmState::Running)?;
        transition_after(s, &name, VmState::Running, t_calm).cloned()
    });
    assert_transition(&resumed, VmState::Suspended, VmState::Running, Reason::Idle);
    assert!(
        resumed.at_unix_ms >= t_calm + RESUME_AFTER_MS,
        "resumed {} ms after the load stopped; resume_after is {RESUME_AFTER_MS} ms",
        resumed.at_unix_ms - t_calm
    );
    wait_domstate(&agent, &name, "running", secs(10));

    // 5. Load on and held: paused, then reclaimed; the domain is gone.
    let load = CustomerLoad::all_cpus();
    let t_load2 = unix_ms();
    expect_suspend_then_reclaim(
        &mut agent,
        &name,
        t_load2,
        secs(15),
        Duration::from_millis(RECLAIM_AFTER_MS + 20_000),
        RECLAIM_AFTER_MS,
        5000,
    );
    let start = Instant::now();
    while all_domains().contains(&name) {
        assert!(
            start.elapsed() < secs(20),
            "{name} is still defined 20 s after its reclaim: {:?}\n{}",
            domstate(&name),
            agent.report(None)
        );
        sleep_ms(200);
    }

    // 6. SIGTERM (still under load, so nothing relaunches): exit 0.
    let exit = agent.terminate(secs(60));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit}\n{}",
        agent.log_tail(30)
    );
    drop(load);
}

#[test]
fn libvirtd_restart_adopts_its_own_vm_and_ignores_others() {
    const T: &str = "libvirtd_restart_adopts_its_own_vm_and_ignores_others";
    if skip_unless_libvirtd(T) {
        return;
    }
    let _machine = exclusive(T);
    let Some(image) = image_dir(T) else { return };
    let mut h = Harness::new();
    let s = libvirt_conf(&mut h, &image);
    // A domain that is not sparegrid's, and one that only looks like it (our
    // name prefix, no sparegrid metadata): both must be left alone.
    let foreign = format!("foreign-{}", std::process::id());
    let impostor = format!("{}99", s.prefix);
    let mut cleanup = DomainCleanup::new();
    cleanup.prefixes.push(s.prefix.clone());
    cleanup.names.push(foreign.clone());
    remove_domain(&foreign);
    define_foreign_domain(h.dir(), &foreign);
    define_foreign_domain(h.dir(), &impostor);

    let mut first = h.start(&s.conf);
    let name = format!("{}1", s.prefix);
    wait_launched(&mut first, &name);
    wait_domstate(&first, &name, "running", secs(10));

    // The agent dies without draining: the domain keeps running.
    first.kill();
    sleep_ms(500);
    assert_eq!(domstate(&name).as_deref(), Some("running"), "after SIGKILL");

    // A new agent on the same config adopts it.
    let mut second = h.start_on_current_config();
    let adopted = second.wait_for(&format!("{name} to be adopted"), secs(30), |s| {
        vm_in(s, &name, VmState::Running)?;
        last_transition(s, &name, VmState::Running).cloned()
    });
    assert_transition(&adopted, VmState::Absent, VmState::Running, Reason::Adopted);
    second.hold(
        &format!("{name} is the only grid VM and stays Running"),
        secs(3),
        |st| {
            let names: Vec<&str> = st.vms.iter().map(|v| v.name.as_str()).collect();
            if names != [name.as_str()] {
                return Err(format!("grid VMs {names:?}"));
            }
            if st
                .transitions
                .iter()
                .any(|t| t.vm == impostor || t.vm == foreign)
            {
                return Err("a foreign domain shows up in the transitions".into());
            }
            match vm(st, &name) {
                Some(v) if v.state == VmState::Running => Ok(()),
                other => Err(format!("{name}: {other:?}")),
            }
        },
    );
    assert_eq!(domstate(&name).as_deref(), Some("running"));
    for d in [&foreign, &impostor] {
        assert_eq!(
            domstate(d).as_deref(),
            Some("shut off"),
            "the agent touched {d}\n{}",
            second.report(None)
        );
    }

    // SIGTERM: exit 0, the VM is saved (not destroyed), the others untouched.
    let exit = second.terminate(secs(90));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit}\n{}",
        second.log_tail(30)
    );
    let (ok, info) = virsh(&["dominfo", &name]);
    assert!(
        ok,
        "{name} is gone after SIGTERM; expected a managed save\n{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes")),
        "{name} has no managed save after SIGTERM:\n{info}\n{}",
        second.log_tail(30)
    );
    for d in [&foreign, &impostor] {
        assert_eq!(
            domstate(d).as_deref(),
            Some("shut off"),
            "{d} after SIGTERM"
        );
    }
    remove_domain(&impostor);
    remove_domain(&foreign);
}

/// `virsh domiflist <name>`'s text (empty when virsh fails).
fn domiflist(name: &str) -> String {
    std::process::Command::new("virsh")
        .args(["-c", LIBVIRT_URI, "domiflist", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A Linux bridge in this network namespace, deleted on drop.
struct TestBridge(String);

impl TestBridge {
    fn create(name: &str) -> TestBridge {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", name])
            .output();
        for args in [
            vec!["link", "add", name, "type", "bridge"],
            vec!["link", "set", name, "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&args)
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        TestBridge(name.to_owned())
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

/// The overlay NIC hot-plug the runner uses for `network = "overlay"`
/// subtasks on grid VMs (`overlay::LibvirtNics`), against the real
/// libvirtd and a booted grid VM of a real agent: plugging puts a virtio
/// NIC with the guest address's MAC on the bridge, unplugging takes it
/// away again (the guest acknowledges the ACPI unplug). The filtering and
/// the guest's own set-up are covered by overlay_filter.rs.
#[test]
fn libvirtd_overlay_nic_is_hot_plugged_and_unplugged_on_a_grid_vm() {
    const T: &str = "libvirtd_overlay_nic_is_hot_plugged_and_unplugged_on_a_grid_vm";
    if skip_unless_libvirtd(T) {
        return;
    }
    let _machine = exclusive(T);
    let Some(image) = image_dir(T) else { return };
    let mut h = Harness::new();
    let mut s = libvirt_conf(&mut h, &image);
    // A quiet guest: no vCPU burner.
    s.conf.str("vm", "cmdline", "console=ttyS0 quiet panic=-1");
    let mut cleanup = DomainCleanup::new();
    cleanup.prefixes.push(s.prefix.clone());
    let run_dir = h.dir().join("run");
    let mut agent = h.start(&s.conf);
    let name = format!("{}1", s.prefix);
    wait_launched(&mut agent, &name);
    wait_domstate(&agent, &name, "running", secs(10));
    wait_guest_ready(&mut agent, &run_dir, &name);

    let bridge = TestBridge::create(&format!("sgtbr{}", std::process::id() % 100_000));
    // The host side of the overlay without touching this host's network:
    // the commands are recorded, the bridge above is the real one.
    let net = sparegrid_agent::overlay::HostNet::with_ops(
        &sparegrid_agent::overlay::OverlaySection {
            bridge: bridge.0.clone(),
            ..Default::default()
        },
        std::sync::Arc::new(sparegrid_agent::overlay::Recorder::default()),
    )
    .expect("host net");
    net.apply_lease(&sparegrid_proto::overlay::OverlayLease {
        cidr: "100.96.0.0/16".into(),
        slice: "100.96.9.0/24".into(),
        address: "100.96.9.1/24".into(),
    })
    .expect("lease");
    let nic = net.attach_vm().expect("a guest address");
    let mac = nic.mac();
    let plug = sparegrid_agent::overlay::LibvirtNics::new(LIBVIRT_URI);
    use sparegrid_agent::overlay::NicPlug as _;

    assert!(
        !domiflist(&name).contains(&mac),
        "the grid VM has no NIC before the plug"
    );
    plug.plug(&name, &nic)
        .unwrap_or_else(|e| panic!("plug: {e}\n{}", agent.report(None)));
    let list = domiflist(&name);
    assert!(
        list.contains(&mac) && list.contains(&bridge.0) && list.contains("virtio"),
        "after the plug, domiflist shows a virtio NIC {mac} on {}:\n{list}",
        bridge.0
    );
    // The VM's persistent definition never gets the NIC (live only).
    let inactive = std::process::Command::new("virsh")
        .args(["-c", LIBVIRT_URI, "dumpxml", "--inactive", &name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !inactive.contains(&mac),
        "the NIC must not be in the persistent definition:\n{inactive}"
    );

    plug.unplug(&name, &nic)
        .unwrap_or_else(|e| panic!("unplug: {e}\n{}", agent.report(None)));
    // The guest acknowledges the ACPI unplug asynchronously.
    let start = Instant::now();
    loop {
        let list = domiflist(&name);
        if !list.contains(&mac) {
            break;
        }
        assert!(
            start.elapsed() < secs(60),
            "the NIC {mac} is still on {name} 60 s after the unplug:\n{list}"
        );
        sleep_ms(500);
    }
    // Unplugging from a VM that is gone is not an error.
    plug.unplug(&format!("{}404", s.prefix), &nic)
        .expect("unplug from a missing VM");
    drop(nic);
    assert_eq!(net.status().guests, 0, "the address went back");
    drop(agent);
}
