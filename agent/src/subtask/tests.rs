//! Tests of the subtask executor: without a cgroup (any user), and `root_`
//! ones on a unique partition of the real `/sys/fs/cgroup`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sparegrid_proto::grid::{Assignment, AttemptRef};

use super::*;
use crate::cgroup::fixture::{self, wait_for, GROW_TIMEOUT};
use crate::cgroup::{GridCgroup, Partition};

fn attempt(job: &str, index: u64) -> AttemptRef {
    AttemptRef {
        job: job.into(),
        index,
        epoch: 1,
    }
}

fn assignment(argv: &[&str]) -> Assignment {
    Assignment {
        network: sparegrid_proto::Network::None,
        attempt: attempt("job-1", 0),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: 60_000,
        vcpus: 1,
        memory_mib: 64,
    }
}

fn sh(script: &str) -> Assignment {
    assignment(&["/bin/sh", "-c", script])
}

fn plain() -> Executor {
    Executor::new(None, "host-a", Limits::default())
}

fn run(a: &Assignment) -> Completion {
    plain().start(a).expect("start").wait()
}

/// State letter of /proc/<pid>/stat (R, S, T, Z, …); '?' when gone.
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|s| s.trim_start().chars().next())
        .unwrap_or('?')
}

fn gone(pid: u32) -> bool {
    matches!(proc_state(pid), '?' | 'Z')
}

#[test]
fn stdin_is_echoed_to_stdout() {
    let mut a = assignment(&["cat"]);
    a.stdin = b"hello\nworld\n".to_vec();
    let c = run(&a);
    assert!(c.succeeded(), "{c:?}");
    assert_eq!(c.stdout, b"hello\nworld\n");
    assert_eq!(c.stdout_size, 12);
    assert_eq!((c.stderr.len(), c.stderr_size), (0, 0));
    assert_eq!(c.attempt, a.attempt);
    assert_eq!(c.host, "host-a");
    assert!(c.duration_ms < 10_000);
}

#[test]
fn a_large_stdin_that_is_not_read_does_not_hang() {
    let mut a = sh("echo ignored");
    a.stdin = vec![b'x'; 4 << 20];
    let c = run(&a);
    assert!(c.succeeded(), "{c:?}");
    assert_eq!(c.stdout, b"ignored\n");
}

#[test]
fn exit_code_is_reported() {
    let c = run(&sh("echo oops >&2; exit 3"));
    assert_eq!(c.exit_code, Some(3));
    assert_eq!((c.signal, c.error.as_deref()), (None, None));
    assert_eq!(c.stderr, b"oops\n");
    assert!(!c.succeeded());
}

#[test]
fn death_by_signal_is_reported() {
    let c = run(&sh("kill -TERM $$; sleep 5"));
    assert_eq!(c.signal, Some(libc::SIGTERM));
    assert_eq!((c.exit_code, c.error.as_deref()), (None, None));
    assert!(!c.succeeded());
}

#[test]
fn timeout_kills_the_process_group() {
    let mut a = sh("sleep 30 & sleep 30");
    a.timeout_ms = 200;
    let t0 = Instant::now();
    let mut rs = plain().start(&a).unwrap();
    let c = rs.wait();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(c.error.as_deref(), Some("timeout after 200 ms"));
    assert_eq!(c.signal, Some(libc::SIGKILL));
    assert_eq!(c.exit_code, None);
    assert!(c.duration_ms >= 200, "{}", c.duration_ms);
    // The same completion again.
    assert_eq!(rs.try_wait(), Some(c));
}

#[test]
fn output_is_capped_and_the_full_size_counted() {
    let c = run(&sh(
        "head -c 3145728 /dev/zero; head -c 2097152 /dev/zero >&2",
    ));
    assert!(c.succeeded(), "{:?}", c.error);
    assert_eq!(c.stdout.len(), 1 << 20);
    assert_eq!(c.stdout_size, 3 << 20);
    assert_eq!(c.stderr.len(), 1 << 20);
    assert_eq!(c.stderr_size, 2 << 20);

    let ex = Executor::new(
        None,
        "h",
        Limits {
            output_cap_bytes: 4,
            ..Limits::default()
        },
    );
    let c = ex.start(&sh("printf 123456789")).unwrap().wait();
    assert_eq!((c.stdout.as_slice(), c.stdout_size), (&b"1234"[..], 9));
}

#[test]
fn env_is_clean_with_the_assignment_on_top() {
    let mut a =
        sh("echo \"$START-$END $SPAREGRID_JOB $SPAREGRID_INDEX $SPAREGRID_EPOCH $HOME\"; pwd; env");
    a.attempt = attempt("job-7", 42);
    a.env = [("START", "10"), ("END", "20"), ("HOME", "/var/tmp")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let c = run(&a);
    assert!(c.succeeded(), "{c:?}");
    let out = String::from_utf8(c.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("10-20 job-7 42 1 /var/tmp"));
    assert_eq!(lines.next(), Some("/tmp"));
    let mut names: Vec<&str> = lines.filter_map(|l| l.split('=').next()).collect();
    names.sort();
    // Only these (the shell adds PWD and perhaps SHLVL, `_`).
    for n in names {
        assert!(
            [
                "PATH",
                "HOME",
                "TMPDIR",
                "LANG",
                "SPAREGRID_JOB",
                "SPAREGRID_INDEX",
                "SPAREGRID_EPOCH",
                "START",
                "END",
                "PWD",
                "SHLVL",
                "_",
            ]
            .contains(&n),
            "leaked variable {n}"
        );
    }
}

#[test]
fn bad_input_is_a_completion_with_an_error() {
    let cases: Vec<(Assignment, &str)> = vec![
        (
            assignment(&["/nonexistent/program", "x"]),
            "/nonexistent/program",
        ),
        (
            assignment(&["no-such-program-sparegrid"]),
            "no-such-program-sparegrid",
        ),
        (assignment(&[]), "empty argv"),
        (assignment(&[""]), "empty program name"),
        (assignment(&["echo", "a\0b"]), "argv[1] contains a NUL"),
        (
            {
                let mut a = assignment(&["true"]);
                a.env.insert("A=B".into(), "x".into());
                a
            },
            "invalid environment variable name",
        ),
        (
            {
                let mut a = assignment(&["true"]);
                a.env.insert("A".into(), "x\0".into());
                a
            },
            "contains a NUL",
        ),
    ];
    for (a, want) in cases {
        let mut rs = plain().start(&a).expect("bad input is not an Err");
        assert!(rs.pid().is_none());
        let c = rs.wait();
        let err = c.error.clone().unwrap_or_default();
        assert!(err.starts_with("spawn failed"), "{err}");
        assert!(err.contains(want), "{err} should mention {want}");
        assert_eq!((c.exit_code, c.signal), (None, None));
        assert!(!c.succeeded());
        // Suspend, resume and cancel are harmless.
        rs.suspend().unwrap();
        rs.resume().unwrap();
        rs.cancel("late");
        assert_eq!(rs.try_wait(), Some(c));
    }
}

#[test]
fn cancel_kills_and_reports_the_reason() {
    let mut rs = plain().start(&sh("sleep 30")).unwrap();
    let pid = rs.pid().unwrap();
    assert_eq!(rs.try_wait(), None);
    rs.cancel("withdrawn: host left the eligible set");
    let c = rs.wait();
    assert_eq!(
        c.error.as_deref(),
        Some("withdrawn: host left the eligible set")
    );
    assert_eq!(c.signal, Some(libc::SIGKILL));
    assert!(gone(pid));
    // A cancel after the end changes nothing.
    rs.cancel("again");
    assert_eq!(rs.wait(), c);
}

#[test]
fn suspend_without_cgroup_stops_the_group_and_pauses_the_timeout() {
    let mut a = assignment(&["sleep", "30"]);
    a.timeout_ms = 300;
    let mut rs = plain().start(&a).unwrap();
    let pid = rs.pid().unwrap();
    rs.suspend().unwrap();
    rs.suspend().unwrap();
    assert!(rs.is_suspended());
    assert!(wait_for(Duration::from_secs(10), || proc_state(pid) == 'T'));
    // Suspended longer than the timeout: it does not fire.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rs.try_wait(), None);
    rs.resume().unwrap();
    assert!(!rs.is_suspended());
    assert!(wait_for(Duration::from_secs(10), || proc_state(pid) != 'T'));
    let c = rs.wait();
    assert_eq!(c.error.as_deref(), Some("timeout after 300 ms"));
    assert!(c.duration_ms >= 800, "{}", c.duration_ms);
}

#[test]
fn cancel_while_suspended_kills() {
    let mut rs = plain().start(&sh("sleep 30")).unwrap();
    rs.suspend().unwrap();
    rs.cancel("reclaimed");
    let c = rs.wait_timeout(Duration::from_secs(10)).expect("ended");
    assert_eq!(c.error.as_deref(), Some("reclaimed"));
}

#[test]
fn what_the_command_leaves_behind_is_killed_with_it() {
    // The background sleep holds stdout open: without the kill, the
    // completion would wait for it.
    let t0 = Instant::now();
    let c = run(&sh("sleep 30 & echo $!"));
    assert!(c.succeeded(), "{c:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let bg: u32 = String::from_utf8(c.stdout).unwrap().trim().parse().unwrap();
    assert!(wait_for(Duration::from_secs(5), || gone(bg)));
}

#[test]
fn dropping_a_running_subtask_kills_it() {
    let rs = plain().start(&sh("sleep 30")).unwrap();
    let pid = rs.pid().unwrap();
    drop(rs);
    assert!(gone(pid));
}

#[test]
fn cgroup_names_are_safe_and_distinct() {
    let name = |job: &str| cgroup_name(&attempt(job, 3));
    assert_eq!(name("job-1.a_b"), "st-job-1.a_b-3-1");
    let slash = name("a/b");
    let under = name("a_b");
    assert!(
        slash.starts_with("st-a_b-") && slash.ends_with("-3-1"),
        "{slash}"
    );
    assert_ne!(slash, under);
    for job in ["", "..", "../../etc", "x\0y", "é", &"j".repeat(1000)] {
        let n = name(job);
        crate::cgroup::check_child_name(&n).unwrap_or_else(|e| panic!("{job:?}: {e}"));
        assert!(n.len() <= 200, "{}", n.len());
        assert!(n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
    }
    assert_ne!(name(&"j".repeat(1000)), name(&"j".repeat(999)));
}

#[test]
fn agent_side_errors_name_the_subtask_and_become_completions() {
    let ex = plain();
    let a = sh("true");
    let err = SubtaskError::Busy {
        subtask: label(&a.attempt),
        group: "/sys/fs/cgroup/cpu/grid/st-job-1-0-1".into(),
        pids: vec![42],
    };
    let msg = err.to_string();
    assert!(msg.contains("job-1/0#1") && msg.contains("[42]"), "{msg}");
    let c = ex.error_completion(&a, &err);
    assert_eq!(c.error.as_deref(), Some(msg.as_str()));
    assert_eq!(c.host, "host-a");
    assert!(!c.succeeded());
}

/// The partition's child group directory of a subtask.
fn group_dir(part: &dyn Partition, name: &str) -> std::path::PathBuf {
    part.path().join(name)
}

/// Real partition scenario: a busy subtask runs in its child cgroup, its
/// CPU time grows, stops growing while suspended, grows after resume; cancel
/// kills the whole group (also a descendant that left the process group)
/// and removes the cgroup. A short subtask cleans up after itself too.
fn real_cycle(cgroup: GridCgroup) {
    let cgroup = Arc::new(cgroup);
    let _cleanup = fixture::Cleanup::new(cgroup.as_partition());
    let part = cgroup.as_partition();
    let ex = Executor::new(Some(Arc::clone(&cgroup)), "host-r", Limits::default());

    let mut a = sh("cat; setsid sleep 60 & while :; do :; done");
    a.attempt = attempt("root/job", 5);
    a.stdin = b"in the group\n".to_vec();
    let mut rs = ex.start(&a).unwrap();
    let pid = rs.pid().unwrap();
    let name = rs.cgroup_name().unwrap().to_string();
    assert_eq!(name, cgroup_name(&a.attempt));
    assert!(part.pids(&name).unwrap().contains(&pid));
    // The setsid'd sleep is in the cgroup too.
    assert!(wait_for(Duration::from_secs(10), || part
        .pids(&name)
        .unwrap()
        .len()
        >= 2));

    let c0 = rs.cpu_time_ns().unwrap();
    assert!(
        wait_for(GROW_TIMEOUT, || rs.cpu_time_ns().unwrap() > c0 + 20_000_000),
        "no CPU time in {GROW_TIMEOUT:?}"
    );

    rs.suspend().unwrap();
    assert!(rs.is_suspended());
    if part.frozen(&name).unwrap().is_some() {
        // A starved task may take a while to reach the freezer.
        assert!(wait_for(GROW_TIMEOUT, || part.frozen(&name).unwrap() == Some(true)));
    }
    let s0 = rs.cpu_time_ns().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        s0,
        rs.cpu_time_ns().unwrap(),
        "CPU time grew while suspended"
    );
    assert_eq!(rs.try_wait(), None);

    rs.resume().unwrap();
    assert!(
        wait_for(GROW_TIMEOUT, || rs.cpu_time_ns().unwrap() > s0),
        "no CPU time after resume"
    );

    // Cancel while suspended: everything in the group dies.
    rs.suspend().unwrap();
    rs.cancel("withdrawn");
    let c = rs.wait_timeout(Duration::from_secs(30)).expect("ended");
    assert_eq!(c.error.as_deref(), Some("withdrawn"));
    assert_eq!(c.signal, Some(libc::SIGKILL));
    assert_eq!(c.stdout, b"in the group\n");
    assert!(gone(pid));
    assert!(!group_dir(part, &name).exists(), "child cgroup left behind");
    assert!(rs.cgroup_name().is_none());

    // A short one: exit code, and the group is gone afterwards.
    let mut a = sh("cat /proc/self/cgroup; exit 4");
    a.attempt = attempt("root-job", 6);
    let mut rs = ex.start(&a).unwrap();
    let name = rs.cgroup_name().unwrap().to_string();
    let c = rs.wait();
    assert_eq!(c.exit_code, Some(4), "{c:?}");
    let own = String::from_utf8_lossy(&c.stdout);
    assert!(own.contains(&format!("{}/{name}", part.name())), "{own}");
    assert!(!group_dir(part, &name).exists());

    // A missing binary leaves no group either.
    let mut a = assignment(&["/nonexistent/x"]);
    a.attempt = attempt("root-job", 7);
    let c = ex.start(&a).unwrap().wait();
    assert!(c.error.unwrap().contains("spawn failed"));
    assert!(!group_dir(part, &cgroup_name(&a.attempt)).exists());

    // A duplicate of a running attempt is refused, the first one untouched.
    let mut a = sh("sleep 30");
    a.attempt = attempt("root-job", 8);
    let mut first = ex.start(&a).unwrap();
    match ex.start(&a) {
        Err(e @ SubtaskError::Busy { .. }) => assert!(e.to_string().contains("root-job/8#1")),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("duplicate attempt started"),
    }
    assert_eq!(first.try_wait(), None);
    drop(first);
    assert!(!group_dir(part, &cgroup_name(&a.attempt)).exists());
}

#[test]
fn root_subtask_executor_on_real_host() {
    if let Some(cgroup) = fixture::real_partition("root_subtask_executor_on_real_host", "subtask") {
        real_cycle(cgroup);
    }
}

/// The same on the real unified hierarchy (on a hybrid host the controllers
/// stay with v1, so the partition directory may have to be made by hand):
/// the v2 freezer and `cgroup.kill` paths.
#[test]
fn root_subtask_executor_on_real_unified_tree() {
    if let Some(cgroup) =
        fixture::real_unified_partition("root_subtask_executor_on_real_unified_tree", "subtask-v2")
    {
        real_cycle(cgroup);
    }
}

#[test]
fn activity_is_bumped_once_the_command_has_exited() {
    let ex = plain();
    let act = Arc::clone(ex.activity());
    for a in [sh("exit 3"), assignment(&["/nonexistent/program"])] {
        let seen = act.seen();
        let mut rs = ex.start(&a).unwrap();
        let now = act.wait_since(seen, Duration::from_secs(30));
        assert_ne!(now, seen, "no activity for {:?}", a.argv);
        // The bump comes after the exit: the completion is there at once.
        let c = rs.try_wait().expect("ended when the activity was bumped");
        assert!(!c.succeeded(), "{c:?}");
    }
}

#[test]
fn activity_wait_returns_the_unchanged_counter_on_timeout_and_wakes_on_notify() {
    let act = Arc::new(Activity::default());
    let seen = act.seen();
    assert_eq!(act.wait_since(seen, Duration::from_millis(20)), seen);
    let other = Arc::clone(&act);
    let t = std::thread::spawn(move || other.wait_since(seen, Duration::from_secs(60)));
    act.notify();
    assert_eq!(t.join().unwrap(), seen + 1);
}

#[test]
fn many_subtasks_started_back_to_back_all_complete_with_their_output() {
    let ex = plain();
    let mut running: Vec<RunningSubtask> = (0..32)
        .map(|i| {
            let mut a = sh("echo $SPAREGRID_INDEX; echo err >&2");
            a.attempt = attempt("burst", i);
            ex.start(&a).unwrap()
        })
        .collect();
    for (i, rs) in running.iter_mut().enumerate() {
        let c = rs.wait();
        assert!(c.succeeded(), "{c:?}");
        assert_eq!(c.stdout, format!("{i}\n").into_bytes());
        assert_eq!(c.stderr, b"err\n");
    }
}

#[test]
fn stdout_over_the_cap_spills_whole_and_a_failed_attempt_leaves_no_spill() {
    let t = tempfile::tempdir().unwrap();
    let ex = Executor::new(
        None,
        "h",
        Limits {
            output_cap_bytes: 1000,
            spill_dir: Some(t.path().to_owned()),
            max_output_bytes: 1 << 20,
        },
    );
    // 3 MiB of 'y' lines; the file keeps the first 1 MiB.
    let a = sh("yes | head -c 3145728");
    let c = ex.start(&a).unwrap().wait();
    assert!(c.succeeded(), "{c:?}");
    assert_eq!((c.stdout.len(), c.stdout_size), (1000, 3 << 20));
    let path = spill_path(t.path(), &a.attempt).unwrap();
    let kept = std::fs::read(&path).unwrap();
    assert_eq!(kept.len(), 1 << 20);
    assert_eq!(&kept[..1000], c.stdout.as_slice());
    assert!(kept.chunks(2).all(|p| p == b"y\n"));

    // Short: no file. Failed: its file is removed.
    let mut small = sh("printf 12345");
    small.attempt.index = 2;
    let c = ex.start(&small).unwrap().wait();
    assert_eq!(c.stdout, b"12345");
    assert!(!spill_path(t.path(), &small.attempt).unwrap().exists());
    let mut failed = sh("yes | head -c 100000; exit 3");
    failed.attempt.index = 3;
    let c = ex.start(&failed).unwrap().wait();
    assert_eq!((c.exit_code, c.stdout_size), (Some(3), 100_000));
    assert!(!spill_path(t.path(), &failed.attempt).unwrap().exists());
}
