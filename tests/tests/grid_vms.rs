//! End-to-end tests of grid subtasks running inside grid VMs (issue 4): a
//! real `sparegrid-controller`, `sparegrid-agent`s with the libvirt runtime
//! on a real libvirtd (`qemu:///system`) booting TCG guests from the image
//! `make image` builds (`$SPAREGRID_IMAGE_DIR`), whose `sparegrid-guest`
//! worker runs each pushed subtask, and the `sparegrid` CLI submitting jobs.
//!
//! What each test proves:
//!
//! - the results of a job run in grid VMs equal the same commands run on
//!   this host, every index once, and each ran in one of the agent's guests
//!   (its hostname and its kernel command line, which carries a token
//!   unique to the test);
//! - a VM paused mid-subtask and resumed finishes the subtask with its
//!   output complete, reported once, as the attempt it started as;
//! - a VM reclaimed (destroyed) mid-subtask hands it back: it runs again on
//!   another agent, once, and with `max_attempts = 1` the job still
//!   succeeds, so the hand-back did not use up an attempt;
//! - a VM whose QEMU is killed mid-subtask: the agent stays up, says why,
//!   and the subtask completes elsewhere, once, without a failed attempt;
//! - a guest that writes garbage and never says Hello is reclaimed, the
//!   agent stays up and never offers the controller a slot on it;
//! - a guest whose worker falls silent mid-subtask (SIGSTOPped from inside,
//!   the VM still busy) is reclaimed as `guest_failure` and its subtask
//!   runs once elsewhere;
//! - `reclaim_mode = "save"`: a VM managed-saved mid-subtask is restored
//!   once the host is calm and finishes the subtask there;
//! - `reclaim_mode = "migrate"`: a VM saved mid-subtask on a busy host
//!   moves (its saved state over the transfer endpoint) to an idle agent,
//!   is restored there and finishes the subtask there with its output
//!   complete, counted once under the new attempt the controller fenced.
//!
//! Load: the agent under test counts network only, on its own uplink (a
//! veth pair, [`Uplink`]); customer load is real traffic through it, so
//! nothing else on this busy machine (builds, the TCG guests themselves)
//! moves its load factor. The controller never withdraws a host here
//! (`withdraw_above` 1.0, `withdraw_after` 30 min), so what moves a subtask
//! is the agent's doing.
//!
//! `libvirtd_` tests need root and `SPAREGRID_LIBVIRTD=1` (`make test` sets
//! both) and are skipped otherwise. Deadlines are generous bounds on
//! waiting (TCG boots on a shared 2-core box), never timing assertions.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sparegrid_controller::api::{JobResults, SubtaskResult};
use sparegrid_controller::store::JobState;
use sparegrid_proto::{AgentStatus, Reason, VmState};
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

/// From agent start to a guest's Hello, and other waits that include a
/// TCG boot.
const BOOT: Duration = Duration::from_secs(240);
/// A subtask's whole run inside a TCG guest (the sequence below takes
/// about 20 s unpaused).
const RUN: Duration = Duration::from_secs(300);

/// Lines of the sequence subtask.
const SEQ_LINES: u32 = 150;

/// A subtask that runs for a while and prints a known sequence: `0` to
/// `SEQ_LINES - 1`, one a line, about 0.1 s apart, then `end`.
fn seq_script() -> String {
    format!("i=0; while [ $i -lt {SEQ_LINES} ]; do echo $i; i=$((i+1)); sleep 0.1; done; echo end")
}

fn seq_expected() -> String {
    let mut s: String = (0..SEQ_LINES).map(|i| format!("{i}\n")).collect();
    s.push_str("end\n");
    s
}

/// Writes a job file: `argv`, a range `0..end` in `chunk`s, `max_attempts`.
fn write_job(
    dir: &Path,
    name: &str,
    argv: &[&str],
    end: u64,
    chunk: u64,
    max_attempts: u32,
) -> PathBuf {
    let argv: Vec<String> = argv.iter().map(|a| toml_str(a)).collect();
    let text = format!(
        "name = {}\nmax_attempts = {max_attempts}\n\
         command = {{ argv = [{}] }}\n\n\
         [resources]\ntimeout_secs = 600\n\n\
         [split.range]\nstart = 0\nend = {end}\nchunk = {chunk}\n",
        toml_str(name),
        argv.join(", ")
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).expect("write the job file");
    path
}

/// The VM of `s` that runs subtask `index` of `job`: its name, the
/// attempt's epoch, its state and its guest link state.
fn vm_running(s: &AgentStatus, job: &str, index: u64) -> Option<(String, u32, VmState, String)> {
    let prefix = format!("{job}/{index}#");
    s.vms.iter().find_map(|v| {
        let epoch = v.subtask.as_deref()?.strip_prefix(&prefix)?.parse().ok()?;
        Some((
            v.name.clone(),
            epoch,
            v.state,
            v.guest.clone().unwrap_or_default(),
        ))
    })
}

/// Waits until `host` is registered, eligible and offers `slots` free slots
/// (each one an idle grid VM whose guest said Hello).
fn wait_free_slots(c: &Cluster, host: &str, slots: u32) {
    c.wait_hosts(
        &format!("{host} to offer {slots} free slot(s) (grid VMs ready)"),
        BOOT,
        |v| {
            host_of(v, host)
                .filter(|h| h.eligible && h.free_slots >= slots)
                .map(|_| ())
        },
    );
}

fn host_of<'a>(
    v: &'a sparegrid_controller::agents::HostsView,
    id: &str,
) -> Option<&'a sparegrid_controller::agents::HostView> {
    host(v, id)
}

/// Index of the cluster agent named `host`.
fn idx(c: &Cluster, host: &str) -> usize {
    c.agents
        .iter()
        .position(|a| a.host == host)
        .unwrap_or_else(|| panic!("no agent {host}"))
}

/// Waits until subtask `index` of `job` runs in one of `host`'s grid VMs
/// (status shows it, the VM Running and its guest busy). Returns the VM
/// and the attempt's epoch.
fn wait_subtask_in_vm(c: &mut Cluster, host: &str, job: &str, index: u64) -> (String, u32) {
    let i = idx(c, host);
    c.agents[i].agent.wait_for(
        &format!("subtask {job}/{index} to run in a grid VM of {host}"),
        BOOT,
        |s| {
            vm_running(s, job, index)
                .filter(|(_, _, st, guest)| *st == VmState::Running && guest == "busy")
                .map(|(vm, ep, _, _)| (vm, ep))
        },
    )
}

/// One grid agent `host` with one VM (its config changed by `adjust`) and
/// a one-subtask job `name` running `sh -c script`, submitted once the VM
/// is ready. Returns the job id, and once the subtask runs in a VM, that VM
/// and the attempt's epoch.
#[allow(clippy::too_many_arguments)]
fn one_subtask_in_a_vm(
    c: &mut Cluster,
    boosts: &Boosts,
    host: &str,
    uplink: &Uplink,
    image: &Path,
    name: &str,
    script: &str,
    adjust: impl FnOnce(&mut Conf),
) -> (String, String, u32) {
    add_grid_agent(c, boosts, host, 1, uplink, image, 1, adjust);
    wait_free_slots(c, host, 1);
    let job = write_job(c.dir(), name, &["/bin/sh", "-c", script], 1, 1, 1);
    let id = c.cli().submit(&job).id.to_string();
    let (vm_name, epoch) = wait_subtask_in_vm(c, host, &id, 0);
    (id, vm_name, epoch)
}

/// The single result of a one-subtask job, which must be done.
fn only_result(c: &Cluster, job: &str) -> SubtaskResult {
    let d = c.wait_job_end(job, RUN, |_| {});
    assert_eq!(
        d.job.state,
        JobState::Done,
        "job {job}: {:?} dead {:?}\n{}",
        d.job.counts,
        d.dead_subtasks,
        c.report()
    );
    let r = c.cli().results(job, false);
    assert!(r.complete, "results of {job} not complete: {r:?}");
    assert_eq!(
        r.results.len(),
        1,
        "job {job} has one subtask, results: {r:?}"
    );
    r.results.into_iter().next().expect("one result")
}

/// Asserts the sequence subtask's result is complete and correct.
fn assert_seq_output(r: &SubtaskResult, c: &Cluster) {
    let want = seq_expected();
    assert!(
        r.exit_code == Some(0) && r.stdout == want && r.stdout_size == want.len() as u64,
        "subtask {} (attempt {} on {}): exit {:?}, {} bytes of stdout (size {}), want {} bytes;\n\
         stdout {:?}\nstderr {:?}\n{}",
        r.index,
        r.attempt,
        r.host,
        r.exit_code,
        r.stdout.len(),
        r.stdout_size,
        want.len(),
        r.stdout,
        r.stderr,
        c.report()
    );
}

/// The latest transition of `vm` recorded at or after `after_ms`, to any
/// of `to`.
fn transition_to_any(
    s: &AgentStatus,
    vm: &str,
    to: &[VmState],
    after_ms: u64,
) -> Option<sparegrid_proto::Transition> {
    s.transitions
        .iter()
        .rev()
        .find(|t| t.vm == vm && to.contains(&t.to) && t.at_unix_ms >= after_ms)
        .cloned()
}

/// Skip rules, the machine lock and the image for a test `t`.
fn setup(t: &str) -> Option<(Exclusive, PathBuf)> {
    if skip_unless_libvirtd(t) {
        return None;
    }
    let lock = exclusive(t);
    let image = image_dir(t)?;
    Some((lock, image))
}

/// A cluster whose controller never withdraws a host by itself: a load
/// factor never rises above 1.0 (`withdraw_above`), and no VM stays
/// suspended for `withdraw_after`.
fn cluster() -> Cluster {
    Cluster::start_controller(|c| {
        c.sections.set("registry", "withdraw_above", "1.0").str(
            "registry",
            "withdraw_after",
            "30m",
        );
    })
}

/// The CPU boosts of the grid agents' partitions (see [`PartitionBoost`]).
/// Declare it before the cluster, so the boosts outlive the agents: an
/// agent saves or destroys its VMs when it stops, which needs their QEMU
/// to get CPU.
#[derive(Default)]
struct Boosts(std::cell::RefCell<Vec<PartitionBoost>>);

/// Adds a libvirt agent `host` whose subtasks run in up to `max_vms` grid
/// VMs ([`grid_vm_conf`]), its load the traffic on `uplink`, `adjust`
/// applied last; its partition's CPU boost goes into `boosts`.
#[allow(clippy::too_many_arguments)]
fn add_grid_agent(
    c: &mut Cluster,
    boosts: &Boosts,
    host: &str,
    slots: u32,
    uplink: &Uplink,
    image: &Path,
    max_vms: u32,
    adjust: impl FnOnce(&mut Conf),
) {
    let i = c.add_agent_with(
        host,
        slots,
        AgentLoad::Uplink(uplink.name.clone()),
        |conf| {
            grid_vm_conf(conf, image, max_vms);
            adjust(conf);
        },
    );
    boosts.0.borrow_mut().push(PartitionBoost::start(
        Path::new(CGROUP_ROOT),
        &c.agents[i].partition,
    ));
}

/// Removes the grid VMs of `hosts` on drop (after the cluster has stopped
/// its agents, if declared before it).
fn domain_cleanup(hosts: &[&str]) -> DomainCleanup {
    let mut d = DomainCleanup::new();
    d.prefixes = hosts.iter().map(|h| grid_vm_prefix(h)).collect();
    d.run();
    d
}

// ---------------------------------------------------------------------------

/// The deterministic computation of test 1: for x in [lo, hi), the number
/// of primes and the sum of squares mod 1000003, by trial division.
const AWK_PROGRAM: &str = "BEGIN { n = 0; s = 0; \
    for (x = (lo < 2 ? 2 : lo); x < hi; x++) { p = 1; \
    for (d = 2; d * d <= x; d++) if (x % d == 0) { p = 0; break }; \
    n += p; s = (s + x * x) % 1000003 }; \
    printf \"[%d, %d): %d primes, squares %d\\n\", lo, hi, n, s }";

#[test]
fn libvirtd_job_runs_inside_grid_vms_and_matches_the_host() {
    const T: &str = "libvirtd_job_runs_inside_grid_vms_and_matches_the_host";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvjob");
    let token = unique("sgtest");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    add_grid_agent(&mut c, &boosts, &host, 2, &uplink, &image, 2, |conf| {
        conf.str(
            "vm",
            "cmdline",
            &format!("console=ttyS0 quiet panic=-1 sparegrid.test={token}"),
        );
    });
    wait_free_slots(&c, &host, 2);

    // stdout: the computation; stderr: where it ran.
    let script = format!(
        "awk -v lo={{start}} -v hi={{end}} '{AWK_PROGRAM}'; \
         echo \"hostname=$(hostname)\" >&2; echo \"cmdline=$(cat /proc/cmdline)\" >&2; \
         echo \"boot_id=$(cat /proc/sys/kernel/random/boot_id)\" >&2"
    );
    const END: u64 = 6000;
    const CHUNK: u64 = 1000;
    let job = write_job(
        c.dir(),
        "in-vms",
        &["/bin/sh", "-c", &script],
        END,
        CHUNK,
        1,
    );
    let sub = c.cli().submit(&job);
    assert_eq!(sub.subtasks, END / CHUNK);
    let id = sub.id.to_string();
    let d = c.wait_job_end(&id, RUN, |_| {});
    assert_eq!(
        d.job.state,
        JobState::Done,
        "job {id}: {:?} dead {:?}\n{}",
        d.job.counts,
        d.dead_subtasks,
        c.report()
    );
    let results: JobResults = c.cli().results(&id, false);
    assert!(results.complete, "results not complete: {results:?}");

    let host_name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_ne!(
        host_name.trim(),
        "sparegrid-guest",
        "this host is named like the guest: the hostname check proves nothing"
    );
    let mut seen = BTreeSet::new();
    let mut boots = BTreeSet::new();
    for r in &results.results {
        assert!(seen.insert(r.index), "index {} twice: {results:?}", r.index);
        let (lo, hi) = (r.index * CHUNK, ((r.index + 1) * CHUNK).min(END));
        // The same argv on this host (its own awk, not busybox's).
        let local = script
            .replace("{start}", &lo.to_string())
            .replace("{end}", &hi.to_string());
        let out = Command::new("/bin/sh")
            .args(["-c", &local])
            .stdin(Stdio::null())
            .output()
            .expect("run the subtask's command on the host");
        assert!(out.status.success(), "on the host: {out:?}");
        let want = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            want.starts_with(&format!("[{lo}, {hi}): ")),
            "the host's own run printed {want:?}"
        );
        assert!(
            r.exit_code == Some(0) && r.stdout == want,
            "subtask {} (attempt {} on {}): exit {:?}, stdout {:?}; the host printed {want:?}; \
             stderr {:?}",
            r.index,
            r.attempt,
            r.host,
            r.exit_code,
            r.stdout,
            r.stderr
        );
        assert_eq!(r.host, host, "subtask {} reported by {}", r.index, r.host);
        assert!(
            r.stderr.contains("hostname=sparegrid-guest\n"),
            "subtask {} did not run in a grid VM (hostname): stderr {:?}",
            r.index,
            r.stderr
        );
        assert!(
            r.stderr.contains(&format!("sparegrid.test={token}")),
            "subtask {} did not run in a VM booted by {host} (kernel cmdline lacks \
             sparegrid.test={token}): stderr {:?}",
            r.index,
            r.stderr
        );
        if let Some(b) = r.stderr.lines().find_map(|l| l.strip_prefix("boot_id=")) {
            boots.insert(b.to_string());
        }
    }
    let missing: Vec<u64> = (0..END / CHUNK).filter(|i| !seen.contains(i)).collect();
    assert!(missing.is_empty(), "missing indexes {missing:?}");
    assert!(!boots.is_empty(), "no boot_id in any subtask's stderr");
    eprintln!(
        "{T}: {} subtasks in {} distinct guest boot(s)",
        results.results.len(),
        boots.len()
    );
    // The agent reports its VMs' links: both guests ready and idle now.
    let i = idx(&c, &host);
    c.agents[i].agent.wait_for(
        "both grid VMs idle with their guests ready",
        secs(30),
        |s| {
            let ready = s
                .vms
                .iter()
                .filter(|v| {
                    v.state == VmState::Running
                        && v.guest.as_deref() == Some("ready")
                        && v.subtask.is_none()
                })
                .count();
            (ready == 2).then_some(())
        },
    );
}

#[test]
fn libvirtd_vm_suspended_mid_subtask_resumes_and_output_is_complete() {
    const T: &str = "libvirtd_vm_suspended_mid_subtask_resumes_and_output_is_complete";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvsus");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    let (id, vm_name, epoch) = one_subtask_in_a_vm(
        &mut c,
        &boosts,
        &host,
        &uplink,
        &image,
        "suspend",
        &seq_script(),
        |_| {},
    );
    // Seen running from here, so its whole run lies within `window` below.
    let seen_running = std::time::Instant::now();
    sleep_ms(2000);

    // Customer traffic on the uplink: the VM is paused with its subtask.
    let load = uplink.load(4 * UPLINK_BYTES_PER_SEC);
    let t_load = unix_ms();
    let i = idx(&c, &host);
    let agent = &mut c.agents[i].agent;
    let suspended = agent.wait_for(&format!("{vm_name} to be Suspended"), secs(60), |s| {
        vm_in(s, &vm_name, VmState::Suspended)?;
        transition_after(s, &vm_name, VmState::Suspended, t_load).cloned()
    });
    assert_transition(
        &suspended,
        VmState::Running,
        VmState::Suspended,
        Reason::NetworkPressure,
    );
    assert_eq!(
        domstate(&vm_name).as_deref(),
        Some("paused"),
        "libvirt's view of {vm_name} while Suspended"
    );
    // It holds the subtask while paused, and nothing completes meanwhile.
    agent.hold(
        &format!("{vm_name} stays Suspended holding {id}/0#{epoch}"),
        secs(4),
        |s| match vm_running(s, &id, 0) {
            Some((vm, ep, VmState::Suspended, _)) if vm == vm_name && ep == epoch => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let d = c.cli().status(&id);
    assert_eq!(d.job.counts.done, 0, "done while its VM was paused: {d:?}");

    // Calm: resumed, and the subtask finishes where it started.
    drop(load);
    let t_calm = unix_ms();
    let agent = &mut c.agents[i].agent;
    let resumed = agent.wait_for(&format!("{vm_name} to be resumed"), secs(60), |s| {
        transition_after(s, &vm_name, VmState::Running, t_calm).cloned()
    });
    assert_transition(&resumed, VmState::Suspended, VmState::Running, Reason::Idle);
    let r = only_result(&c, &id);
    let window_ms = seen_running.elapsed().as_millis() as u64;
    assert_seq_output(&r, &c);
    assert_eq!(
        (r.host.as_str(), r.attempt),
        (host.as_str(), epoch),
        "the accepted result is not the attempt that was paused"
    );
    // Its duration is the guest's, whose clock stops while the VM is
    // paused: run time plus the pause fits in the window the run was seen
    // in, give or take half the pause for how late the start and end were
    // seen (a duration that counted the pause would overflow it by the
    // whole pause).
    let paused_ms = resumed.at_unix_ms.saturating_sub(suspended.at_unix_ms);
    let duration_ms = r.duration_ms.expect("a duration in the result");
    eprintln!(
        "{T}: paused {paused_ms} ms; the guest reported {duration_ms} ms; seen within {window_ms} ms"
    );
    assert!(
        duration_ms + paused_ms <= window_ms + paused_ms / 2,
        "the reported duration {duration_ms} ms seems to include the {paused_ms} ms pause: \
         the subtask ran within {window_ms} ms"
    );
}

#[test]
fn libvirtd_vm_reclaimed_mid_subtask_hands_it_back_and_it_runs_elsewhere_once() {
    const T: &str = "libvirtd_vm_reclaimed_mid_subtask_hands_it_back_and_it_runs_elsewhere_once";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let busy = unique("gvrec");
    let other = unique("gvcalm");
    let _domains = domain_cleanup(&[&busy]);
    let boosts = Boosts::default();
    let mut c = cluster();
    add_grid_agent(&mut c, &boosts, &busy, 1, &uplink, &image, 1, |conf| {
        conf.str("policy", "reclaim_after", "3s")
            .str("policy", "reclaim_mode", "destroy");
    });
    wait_free_slots(&c, &busy, 1);
    // max_attempts = 1: a hand-back that counted as a failure kills the job.
    let job = write_job(
        c.dir(),
        "reclaim",
        &["/bin/sh", "-c", &seq_script()],
        1,
        1,
        1,
    );
    let id = c.cli().submit(&job).id.to_string();
    let (vm_name, epoch) = wait_subtask_in_vm(&mut c, &busy, &id, 0);
    // The other host joins only now, so the first attempt went to the VM.
    c.add_agent(&other, 1, AgentLoad::MemoryOnly);
    sleep_ms(1000);

    let load = uplink.load(4 * UPLINK_BYTES_PER_SEC);
    let t_load = unix_ms();
    let i = idx(&c, &busy);
    let reclaimed = c.agents[i].agent.wait_for(
        &format!("{vm_name} to be reclaimed after 3 s suspended"),
        secs(90),
        |s| transition_after(s, &vm_name, VmState::Reclaimed, t_load).cloned(),
    );
    assert_transition(
        &reclaimed,
        VmState::Suspended,
        VmState::Reclaimed,
        Reason::SuspendedTooLong,
    );
    let r = only_result(&c, &id);
    drop(load);
    assert_seq_output(&r, &c);
    assert_eq!(
        r.host, other,
        "the accepted result should come from the other host"
    );
    assert!(
        r.attempt > epoch,
        "accepted attempt {} is not later than the reclaimed attempt {epoch}",
        r.attempt
    );
    // The agent said why, and the controller saw a hand-back (not a failure).
    let busy_log = c.agents[i].agent.log();
    assert!(
        busy_log.contains("handing it back"),
        "{busy} did not log the hand-back:\n{}",
        c.agents[i].agent.log_tail(40)
    );
    let ctl = c.controller.log();
    assert!(
        ctl.lines()
            .any(|l| l.contains("agent handed attempts back") && l.contains(&busy)),
        "no hand-back from {busy} in the controller log:\n{}",
        c.controller.log_tail(40)
    );
    assert!(
        !all_domains().contains(&vm_name),
        "{vm_name} still defined after its reclaim"
    );
}

/// `/run/libvirt/qemu/<vm>.pid`: the VM's QEMU process.
fn qemu_pid(vm: &str) -> u32 {
    let path = format!("/run/libvirt/qemu/{vm}.pid");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn libvirtd_qemu_killed_mid_subtask_agent_stays_up_and_subtask_completes_once() {
    const T: &str = "libvirtd_qemu_killed_mid_subtask_agent_stays_up_and_subtask_completes_once";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvkill");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    let (id, vm_name, epoch) = one_subtask_in_a_vm(
        &mut c,
        &boosts,
        &host,
        &uplink,
        &image,
        "killed",
        &seq_script(),
        |_| {},
    );
    sleep_ms(1500);
    let pid = qemu_pid(&vm_name);
    let t_kill = unix_ms();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 {pid} ({vm_name}'s qemu): {e}"));
    eprintln!("{T}: killed qemu {pid} of {vm_name}");

    // The agent notices, says why, reclaims the VM and stays up.
    let i = idx(&c, &host);
    let gone = c.agents[i].agent.wait_for(
        &format!("{vm_name} to leave after its qemu was killed"),
        secs(60),
        |s| transition_to_any(s, &vm_name, &[VmState::Reclaimed, VmState::Absent], t_kill),
    );
    assert!(
        matches!(gone.reason, Reason::GuestFailure | Reason::Exited),
        "{vm_name} left with reason {} (want guest_failure or exited)",
        gone.reason
    );
    // The subtask completes once, on a fresh VM (the only place left).
    let r = only_result(&c, &id);
    assert_seq_output(&r, &c);
    assert_eq!(r.host, host);
    assert!(
        r.attempt > epoch,
        "accepted attempt {} is not later than the killed attempt {epoch}",
        r.attempt
    );
    let agent = &mut c.agents[i].agent;
    assert!(agent.is_running(), "the agent exited after the qemu kill");
    agent.status().expect("the agent answers /v1/status");
    let log = agent.log();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&vm_name) && (l.contains("guest failed") || l.contains("exited")))
        .collect();
    assert!(
        !why.is_empty(),
        "the agent logged no reason for {vm_name}'s end:\n{}",
        agent.log_tail(40)
    );
    eprintln!("{T}: the agent said:\n{}", why.join("\n"));
}

/// A copy of the image's initrd with a second cpio archive appended that
/// replaces `/bin/sparegrid-guest` with `script` (the kernel unpacks both,
/// the later file wins). Returns the new initrd's path.
fn initrd_with_worker(image: &Path, dir: &Path, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tree = dir.join("overlay");
    fs::create_dir_all(tree.join("bin")).expect("overlay dir");
    let worker = tree.join("bin/sparegrid-guest");
    fs::write(&worker, script).expect("write the fake worker");
    fs::set_permissions(&worker, fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg("printf 'bin\\nbin/sparegrid-guest\\n' | cpio --quiet -o -H newc -R 0:0 | gzip -9n")
        .current_dir(&tree)
        .stderr(Stdio::inherit())
        .output()
        .expect("run cpio | gzip (make deps installs cpio)");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "cpio | gzip: {out:?}"
    );
    let mut initrd = fs::read(image.join("initrd.img")).expect("read the image's initrd");
    initrd.extend_from_slice(&out.stdout);
    let path = dir.join("initrd-bad-worker.img");
    fs::write(&path, initrd).expect("write the initrd");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// A guest worker that writes garbage to the guest port and never says Hello.
const GARBAGE_WORKER: &str = r#"#!/bin/sh
# Test double: garbage on the guest channel, never a Hello.
for d in /sys/class/virtio-ports/*; do
    [ "$(cat "$d/name" 2>/dev/null)" = org.sparegrid.guest.0 ] && dev=/dev/${d##*/}
done
echo "sparegrid-guest: garbage worker on ${dev:-no port}" >/dev/console
while :; do
    [ -n "$dev" ] && printf 'garbage \001\002\303\310 not a frame\n' >"$dev"
    sleep 1
done
"#;

#[test]
fn libvirtd_guest_without_hello_is_reclaimed_and_the_agent_stays_up() {
    const T: &str = "libvirtd_guest_without_hello_is_reclaimed_and_the_agent_stays_up";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvnohello");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    let initrd = initrd_with_worker(&image, &c.shared_dir("image"), GARBAGE_WORKER);
    add_grid_agent(&mut c, &boosts, &host, 1, &uplink, &image, 1, |conf| {
        conf.path("vm", "initrd", &initrd)
            .str("policy", "boot_timeout", "25s");
    });
    let first = format!("{}1", grid_vm_prefix(&host));
    let i = idx(&c, &host);
    let t0 = unix_ms();
    let ended = c.agents[i].agent.wait_for(
        &format!("{first} to be given up on (no Hello)"),
        BOOT,
        |s| transition_to_any(s, &first, &[VmState::Reclaimed], t0),
    );
    assert!(
        matches!(ended.reason, Reason::BootTimeout | Reason::GuestFailure),
        "{first} reclaimed for {} (want boot_timeout or guest_failure)",
        ended.reason
    );
    let agent = &mut c.agents[i].agent;
    let st = agent.status().expect("the agent answers after the reclaim");
    assert!(
        !transitions_of(&st, &first)
            .iter()
            .any(|t| t.to == VmState::Running),
        "{first} was Running although its guest never said Hello:\n{}",
        summary(&st)
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&first) && (l.contains("Hello") || l.contains("boot"))),
        "the agent logged no reason for giving up on {first}:\n{}",
        agent.log_tail(40)
    );
    // The controller was never offered a slot on it.
    let v = c.admin_cli().hosts();
    let h = host_of(&v, &host).expect("host registered");
    assert_eq!(
        h.free_slots,
        0,
        "{host} offers a slot with no guest ready:\n{}",
        hosts_summary(&v)
    );
    let agent = &mut c.agents[i].agent;
    assert!(agent.is_running(), "the agent exited");
    // And it stops cleanly (a VM may be launching again by now).
    let exit = agent.terminate(secs(90));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit} after SIGTERM\n{}",
        agent.log_tail(40)
    );
}

#[test]
fn libvirtd_vm_saved_mid_subtask_is_restored_and_finishes_there() {
    const T: &str = "libvirtd_vm_saved_mid_subtask_is_restored_and_finishes_there";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvsave");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    let (id, vm_name, epoch) = one_subtask_in_a_vm(
        &mut c,
        &boosts,
        &host,
        &uplink,
        &image,
        "save",
        &seq_script(),
        |conf| {
            conf.str("policy", "reclaim_after", "3s")
                .str("policy", "reclaim_mode", "save");
        },
    );
    sleep_ms(2000);

    let load = uplink.load(4 * UPLINK_BYTES_PER_SEC);
    let t_load = unix_ms();
    let i = idx(&c, &host);
    let agent = &mut c.agents[i].agent;
    let saved = agent.wait_for(
        &format!("{vm_name} to be saved after 3 s suspended"),
        secs(120),
        |s| {
            vm_in(s, &vm_name, VmState::Saved)?;
            transition_after(s, &vm_name, VmState::Saved, t_load).cloned()
        },
    );
    assert_eq!(saved.from, VmState::Suspended, "{saved:?}");
    // The state changes when the save starts; libvirt has the image once
    // it is written.
    let start = std::time::Instant::now();
    loop {
        let (ok, info) = virsh(&["dominfo", &vm_name]);
        let saved_image = ok
            && info
                .lines()
                .any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes"));
        if saved_image {
            break;
        }
        assert!(
            start.elapsed() < secs(120),
            "{vm_name} has no managed save image 120 s after it was Saved:\n{info}\n{}",
            agent.report(None)
        );
        sleep_ms(500);
    }
    agent.hold(
        &format!("{vm_name} stays Saved holding {id}/0#{epoch}"),
        secs(3),
        |s| match vm_running(s, &id, 0) {
            Some((vm, ep, VmState::Saved, _)) if vm == vm_name && ep == epoch => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let d = c.cli().status(&id);
    assert_eq!(d.job.counts.done, 0, "done while its VM was saved: {d:?}");

    drop(load);
    let t_calm = unix_ms();
    let agent = &mut c.agents[i].agent;
    let restored = agent.wait_for(&format!("{vm_name} to be restored"), BOOT, |s| {
        vm_in(s, &vm_name, VmState::Running)?;
        transition_after(s, &vm_name, VmState::Running, t_calm).cloned()
    });
    let r = only_result(&c, &id);
    assert_seq_output(&r, &c);
    assert_eq!(
        (r.host.as_str(), r.attempt),
        (host.as_str(), epoch),
        "the subtask should finish in the restored VM as the attempt it started as"
    );
    let st = c.agents[i].agent.status().expect("status");
    let path: Vec<String> = transitions_of(&st, &vm_name)
        .iter()
        .map(|t| format!("{}→{} ({})", t.from, t.to, t.reason))
        .collect();
    eprintln!(
        "{T}: {vm_name}: {}; restored at +{} ms",
        path.join(", "),
        restored.at_unix_ms.saturating_sub(t_calm)
    );
}

/// `[transfer]` on a free loopback port: where saved VM state arrives.
fn transfer_on(conf: &mut Conf) {
    conf.set("transfer", "enabled", "true").str(
        "transfer",
        "listen",
        &format!("127.0.0.1:{}", free_port()),
    );
}

#[test]
fn libvirtd_vm_saved_on_a_busy_host_moves_to_an_idle_one_and_finishes_there() {
    move_a_saved_vm(
        "libvirtd_vm_saved_on_a_busy_host_moves_to_an_idle_one_and_finishes_there",
        StateWay::Upload,
    );
}

/// The same move when the busy host cannot reach the idle one's transfer
/// endpoint (it advertises an address nobody listens on, as behind a
/// firewall): the idle host fetches the state from the busy one instead.
#[test]
fn libvirtd_vm_state_is_fetched_by_a_target_the_source_cannot_reach() {
    move_a_saved_vm(
        "libvirtd_vm_state_is_fetched_by_a_target_the_source_cannot_reach",
        StateWay::Fetch,
    );
}

/// The same move when neither host reaches the other's transfer endpoint
/// (both advertise addresses nobody listens on): the busy host parks the
/// state on the controller, the idle one fetches it from there, and the
/// parked copy is removed afterwards.
#[test]
fn libvirtd_vm_state_is_relayed_through_the_controller_when_neither_host_reaches_the_other() {
    move_a_saved_vm(
        "libvirtd_vm_state_is_relayed_through_the_controller_when_neither_host_reaches_the_other",
        StateWay::Relay,
    );
}

/// Which way a moved VM's saved state should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateWay {
    /// The idle host's endpoint answers: the busy one uploads to it.
    Upload,
    /// Only the busy host's endpoint answers: the idle one fetches.
    Fetch,
    /// Neither answers: through the controller's `/v1/data`.
    Relay,
}

/// An address nobody listens on, advertised as the transfer endpoint (a
/// host behind a firewall).
fn unreachable_transfer(conf: &mut Conf) {
    conf.str(
        "transfer",
        "advertise_url",
        &format!("http://127.0.0.1:{}", free_port()),
    );
}

/// A real controller and two libvirt agents: a subtask in the busy one's
/// VM, then load on its uplink: the VM is suspended, saved, and moves to
/// the idle one (by the way `way` says), where it finishes as the attempt
/// the controller moved there.
fn move_a_saved_vm(t: &str, way: StateWay) {
    let Some((_machine, image)) = setup(t) else {
        return;
    };
    let (uplink_a, uplink_b) = (Uplink::create(), Uplink::create());
    let busy = unique("gvmiga");
    let idle = unique("gvmigb");
    let _domains = domain_cleanup(&[&busy, &idle]);
    let boosts = Boosts::default();
    let mut c = cluster();
    // The busy host first, alone, so the subtask lands there.
    let (id, vm_name, epoch) = one_subtask_in_a_vm(
        &mut c,
        &boosts,
        &busy,
        &uplink_a,
        &image,
        "migrate",
        &seq_script(),
        |conf| {
            conf.str("policy", "reclaim_after", "3s")
                .str("policy", "reclaim_mode", "migrate");
            transfer_on(conf);
            if way == StateWay::Relay {
                unreachable_transfer(conf);
            }
        },
    );
    // The idle host: room for the VM, and no VM of its own meanwhile
    // (launch_after far away), so nothing else can take the subtask.
    add_grid_agent(&mut c, &boosts, &idle, 1, &uplink_b, &image, 2, |conf| {
        conf.str("policy", "launch_after", "1h");
        transfer_on(conf);
        if way != StateWay::Upload {
            unreachable_transfer(conf);
        }
    });
    c.wait_hosts(&format!("{idle} to heartbeat"), BOOT, |v| {
        host_of(v, &idle).filter(|h| h.load.is_some()).map(|_| ())
    });
    sleep_ms(1500);

    let load = uplink_a.load(4 * UPLINK_BYTES_PER_SEC);
    let t_load = unix_ms();
    let a = idx(&c, &busy);
    let left = c.agents[a].agent.wait_for(
        &format!("{vm_name} to be saved and then leave for {idle}"),
        RUN,
        |s| {
            transition_after(s, &vm_name, VmState::Reclaimed, t_load)
                .filter(|t| t.reason == Reason::Migrated)
                .cloned()
        },
    );
    assert_eq!(left.from, VmState::Saved, "{left:?}");
    drop(load);

    // It arrived on the idle host and runs there under its old name.
    let b = idx(&c, &idle);
    c.agents[b]
        .agent
        .wait_for(&format!("{vm_name} to run on {idle}"), BOOT, |s| {
            let ts = transitions_of(s, &vm_name);
            let arrived = ts
                .iter()
                .any(|t| t.to == VmState::Launching && t.reason == Reason::Migrated);
            let started = ts
                .iter()
                .any(|t| t.from == VmState::Launching && t.to == VmState::Running);
            (arrived && started).then_some(())
        });
    let r = only_result(&c, &id);
    assert_seq_output(&r, &c);
    assert_eq!(
        (r.host.as_str(), r.attempt),
        (idle.as_str(), epoch + 1),
        "the subtask should finish on {idle} as the attempt the controller moved there"
    );
    let d = c.cli().status(&id);
    // max_attempts = 1: a failed attempt would have killed the job.
    assert_eq!(
        (d.job.counts.done, d.job.counts.dead),
        (1, 0),
        "counted once: {d:?}"
    );
    // The busy host let go of the VM entirely; the idle host owns it now.
    let a_metrics = c.agents[a].agent.metrics();
    let b_metrics = c.agents[b].agent.metrics();
    assert_eq!(
        metric_value(
            &a_metrics,
            "sparegrid_migrations_total",
            &[("direction", "out"), ("outcome", "moved")]
        ),
        Some(1.0),
        "{a_metrics}"
    );
    assert_eq!(
        metric_value(
            &b_metrics,
            "sparegrid_migrations_total",
            &[("direction", "in"), ("outcome", "restored")]
        ),
        Some(1.0),
        "{b_metrics}"
    );
    // Which way the state went: uploaded to the idle host, served by the
    // busy one, or through the controller.
    let served =
        metric_value(&a_metrics, "sparegrid_transfer_sent_bytes_total", &[]).unwrap_or(0.0);
    let received =
        metric_value(&b_metrics, "sparegrid_transfer_received_bytes_total", &[]).unwrap_or(0.0);
    let ctl_metrics = c.controller.metrics();
    let ctl_in =
        metric_value(&ctl_metrics, "sparegrid_transfer_received_bytes_total", &[]).unwrap_or(0.0);
    let ctl_out =
        metric_value(&ctl_metrics, "sparegrid_transfer_sent_bytes_total", &[]).unwrap_or(0.0);
    let routes = format!(
        "{received} received by {idle}, {served} served by {busy}, \
         {ctl_in} received and {ctl_out} served by the controller"
    );
    match way {
        StateWay::Upload => assert!(
            received > 0.0 && served == 0.0 && ctl_in == 0.0,
            "uploaded: {routes}"
        ),
        StateWay::Fetch => assert!(
            served > 0.0 && received == 0.0 && ctl_in == 0.0,
            "fetched: {routes}"
        ),
        StateWay::Relay => {
            assert!(
                served == 0.0 && received == 0.0 && ctl_in > 0.0 && ctl_out > 0.0,
                "relayed: {routes}"
            );
            // The parked copy is gone once the move is over.
            assert_eq!(
                metric_value(
                    &ctl_metrics,
                    "sparegrid_transfer_requests_total",
                    &[("op", "delete"), ("status", "204")]
                ),
                Some(1.0),
                "the relayed copy should be removed: {ctl_metrics}"
            );
        }
    }
    let st = c.agents[a].agent.status().expect("status");
    assert!(
        vm(&st, &vm_name).is_none(),
        "{busy} still lists {vm_name}: {}",
        summary(&st)
    );
    let xml = virsh(&["dumpxml", &vm_name]).1;
    assert!(
        xml.contains(&format!("owner>{idle}</")),
        "{vm_name} should be owned by {idle} now:\n{xml}"
    );
    eprintln!(
        "{t}: {vm_name} saved and moved from {busy} to {idle} {} ms after the load began; \
         subtask {id}/0 finished there as attempt {}",
        left.at_unix_ms.saturating_sub(t_load),
        r.attempt
    );
    if way == StateWay::Upload {
        // The VM keeps the busy host's name: after a crash, the idle host
        // adopts it by its owner, not by its name.
        c.kill9_agent(&idle);
        let t_restart = unix_ms();
        c.restart_agent(&idle);
        let b = idx(&c, &idle);
        let adopted =
            c.agents[b]
                .agent
                .wait_for(&format!("{idle} to adopt {vm_name}"), BOOT, |s| {
                    transition_after(s, &vm_name, VmState::Running, t_restart)
                        .filter(|t| t.reason == Reason::Adopted)
                        .cloned()
                });
        assert_eq!(adopted.from, VmState::Absent, "{adopted:?}");
        let xml = virsh(&["dumpxml", &vm_name]).1;
        assert!(
            xml.contains(&format!("owner>{idle}</")),
            "{vm_name} should still be owned by {idle}:\n{xml}"
        );
    }
}

/// In a guest (hostname `sparegrid-guest`): a busy loop in the background
/// and SIGSTOP to the worker that started it (`$PPID`), so the VM keeps
/// using CPU while its worker falls silent. Anywhere else: the sequence.
fn silencing_script() -> String {
    format!(
        "if [ \"$(hostname)\" = sparegrid-guest ]; then \
         (while :; do :; done) & kill -STOP $PPID; sleep 3600; fi; {}",
        seq_script()
    )
}

#[test]
fn libvirtd_guest_that_stops_heartbeating_is_reclaimed_and_its_subtask_runs_once() {
    const T: &str = "libvirtd_guest_that_stops_heartbeating_is_reclaimed_and_its_subtask_runs_once";
    let Some((_machine, image)) = setup(T) else {
        return;
    };
    let uplink = Uplink::create();
    let host = unique("gvsilent");
    let other = unique("gvproc");
    let _domains = domain_cleanup(&[&host]);
    let boosts = Boosts::default();
    let mut c = cluster();
    let (id, vm_name, epoch) = one_subtask_in_a_vm(
        &mut c,
        &boosts,
        &host,
        &uplink,
        &image,
        "silent",
        &silencing_script(),
        |_| {},
    );
    // A host-process agent to run it again (in a guest it would silence
    // that guest's worker too, and be handed back again).
    c.add_agent(&other, 1, AgentLoad::MemoryOnly);
    let t0 = unix_ms();
    let i = idx(&c, &host);
    let gone = c.agents[i].agent.wait_for(
        &format!("{vm_name} to be reclaimed once its worker falls silent"),
        secs(120),
        |s| transition_to_any(s, &vm_name, &[VmState::Reclaimed], t0),
    );
    assert_eq!(
        gone.reason,
        Reason::GuestFailure,
        "{vm_name} reclaimed for {}",
        gone.reason
    );
    let r = only_result(&c, &id);
    assert_seq_output(&r, &c);
    assert_eq!(
        r.host, other,
        "the accepted result should come from {other}"
    );
    assert!(
        r.attempt > epoch,
        "accepted attempt {} ≤ {epoch}",
        r.attempt
    );
    let agent = &mut c.agents[i].agent;
    assert!(agent.is_running(), "the agent exited");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&vm_name) && l.contains("stopped heartbeating")),
        "no 'stopped heartbeating' for {vm_name} in the agent log:\n{}",
        agent.log_tail(40)
    );
}
