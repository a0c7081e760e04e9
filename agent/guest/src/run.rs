//! Running one subtask: spawn its argv in a process group of its own, feed
//! stdin, collect stdout and stderr into the [`State`](crate::state::State),
//! enforce the timeout and cancels, and leave a Result for the writer.
//!
//! Threads per run (std threads; the guest runs one subtask at a time):
//! stdin feeder, stdout and stderr readers, a waiter (`wait(2)`), and the
//! supervisor, which sleeps on the shared condition variable until the
//! process exits, a cancel arrives or the deadline passes (`Instant` is
//! CLOCK_MONOTONIC, which stands still while the VM is paused). A kill is
//! `SIGKILL` to the whole group. When the main process has exited the rest
//! of its group is killed too, so a background child holding the pipes open
//! cannot keep the subtask from ending; a reader still open after
//! [`READER_GRACE`] (a process that left the group) is given up on.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sparegrid_proto::guest::RunSubtask;

use crate::state::Shared;
use crate::sysinfo::SUBTASK_PATH;

/// How long the output pipes may stay open after the process group is gone.
pub const READER_GRACE: Duration = Duration::from_secs(2);

/// Working directory of every subtask.
pub const WORKDIR: &str = "/tmp";

/// The program to start for `prog`: `prog` itself when it names a path
/// (has a `/`), else the first executable `prog` in `path`, else `prog`
/// (spawning then fails with "not found").
///
/// Resolved here rather than by std: std spawns with `posix_spawn` (a
/// vfork-like clone, no copy of the worker's page tables) only when it need
/// not search a PATH that the child's environment changes and need not set
/// a working directory; otherwise it forks, and a fork under TCG costs
/// about 20 ms — most of a no-op subtask's round trip.
pub fn resolve_program(prog: &str, path: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if prog.contains('/') || prog.is_empty() {
        return PathBuf::from(prog);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(prog))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(prog))
}

/// The environment every subtask starts from (the message's env is added).
pub fn base_env() -> [(&'static str, &'static str); 4] {
    [
        ("PATH", SUBTASK_PATH),
        ("HOME", "/tmp"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C"),
    ]
}

/// Starts `req` (the caller checked that nothing runs). Never fails: a run
/// that cannot start ends at once with a Result carrying the error.
pub fn start(shared: &Arc<Shared>, req: RunSubtask) {
    let RunSubtask {
        id,
        label,
        argv,
        env,
        stdin,
        timeout_ms,
        output_cap,
    } = req;
    let gen = {
        let mut st = shared.lock();
        st.begin(id, label.clone(), output_cap)
    };
    crate::vlog!("subtask {id} ({label}) starts: {argv:?}");
    let Some((prog, args)) = argv.split_first() else {
        return fail(shared, gen, "empty argv".into());
    };
    // network = overlay: the VM's NIC is configured first (see `net`).
    match crate::net::NetRequest::from_env(&env) {
        Ok(None) => {}
        Ok(Some(req)) => {
            let class_net = Path::new(crate::net::CLASS_NET);
            match crate::net::configure(&req, class_net, crate::net::NIC_WAIT) {
                Ok(nic) => crate::vlog!("subtask {id}: overlay address {} on {nic}", req.address),
                Err(e) => return fail(shared, gen, format!("overlay network: {e}")),
            }
        }
        Err(e) => return fail(shared, gen, format!("overlay network: {e}")),
    }
    let path = env.get("PATH").map(String::as_str).unwrap_or(SUBTASK_PATH);
    let mut cmd = Command::new(resolve_program(prog, path));
    cmd.arg0(prog)
        .args(args)
        .env_clear()
        .envs(base_env())
        .envs(&env)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The worker runs in WORKDIR (set at its start), so the child starts
    // there too; setting it per command would make std fork (see
    // `resolve_program`).
    if std::env::current_dir().map_or(true, |d| d != Path::new(WORKDIR)) {
        cmd.current_dir(WORKDIR);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(shared, gen, format!("cannot start {prog:?}: {e}")),
    };
    let pid = child.id() as libc::pid_t;
    let (Some(mut sin), Some(out), Some(err)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        kill_group(pid);
        let _ = child.wait();
        return fail(shared, gen, "no pipes to the process".into());
    };
    spawn_thread("stdin", move || {
        // EPIPE when the process does not read it all: fine.
        let _ = sin.write_all(&stdin);
    });
    for (i, pipe) in [
        Box::new(out) as Box<dyn Read + Send>,
        Box::new(err) as Box<dyn Read + Send>,
    ]
    .into_iter()
    .enumerate()
    {
        let sh = shared.clone();
        spawn_thread("output", move || read_stream(&sh, gen, i, pipe));
    }
    let sh = shared.clone();
    spawn_thread("wait", move || {
        let status = child.wait();
        let mut st = sh.lock();
        if let Some(sub) = st.sub(gen) {
            // wait() fails only if the child was already reaped: treat as
            // an exit without status.
            sub.exit = Some(status.unwrap_or_else(|_| {
                use std::os::unix::process::ExitStatusExt;
                std::process::ExitStatus::from_raw(0xff00)
            }));
        }
        sh.notify();
    });
    let sh = shared.clone();
    spawn_thread("supervise", move || {
        supervise(&sh, gen, id, pid, timeout_ms)
    });
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new()
        .name(format!("sg-{name}"))
        .stack_size(128 << 10)
        .spawn(f)
    {
        crate::log!("cannot start a {name} thread: {e}");
    }
}

/// Ends run `gen` at once with `error`.
fn fail(shared: &Shared, gen: u64, error: String) {
    crate::vlog!("subtask failed to start: {error}");
    let mut st = shared.lock();
    if let Some(sub) = st.sub(gen) {
        for s in &mut sub.streams {
            s.eof = true;
        }
        let r = sub.result(None, Some(error), false);
        sub.result = Some(r);
    }
    shared.notify();
}

fn read_stream(shared: &Shared, gen: u64, i: usize, mut pipe: Box<dyn Read + Send>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut st = shared.lock();
        let Some(sub) = st.sub(gen) else { return };
        let cap = sub.cap;
        let s = &mut sub.streams[i];
        if n == 0 {
            s.eof = true;
            shared.notify();
            return;
        }
        s.append(&buf[..n], cap);
        let sealed = s.sealed;
        drop(st);
        shared.notify();
        if sealed {
            return;
        }
    }
}

fn kill_group(pid: libc::pid_t) {
    // SAFETY: plain syscall; ESRCH (group already gone) is fine.
    unsafe {
        libc::killpg(pid, libc::SIGKILL);
    }
}

fn supervise(shared: &Shared, gen: u64, id: u64, pid: libc::pid_t, timeout_ms: u64) {
    let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
    let mut why: Option<String> = None;
    let mut timed_out = false;
    let mut st = shared.lock();
    let exit = loop {
        let Some(sub) = st.sub(gen) else { return };
        if let Some(e) = sub.exit {
            break e;
        }
        let now = Instant::now();
        if why.is_none() {
            if sub.cancel {
                kill_group(pid);
                why = Some("cancelled".into());
            } else if deadline.is_some_and(|d| now >= d) {
                kill_group(pid);
                timed_out = true;
                why = Some(format!("timed out after {timeout_ms} ms"));
            }
        }
        st = match (why.is_none(), deadline) {
            (true, Some(d)) if d > now => shared.wait_timeout(st, d - now),
            (true, Some(_)) => st,
            _ => shared.wait(st),
        };
    };
    // The main process is gone; so must be the rest of its group.
    kill_group(pid);
    let grace = Instant::now() + READER_GRACE;
    loop {
        let Some(sub) = st.sub(gen) else { return };
        if sub.streams.iter().all(|s| s.done()) {
            break;
        }
        let now = Instant::now();
        if now >= grace {
            crate::log!(
                "subtask {id}: output still open {READER_GRACE:?} after exit; giving up on it"
            );
            for s in &mut sub.streams {
                s.sealed = true;
            }
            break;
        }
        st = shared.wait_timeout(st, grace - now);
    }
    let Some(sub) = st.sub(gen) else { return };
    let r = sub.result(Some(exit), why, timed_out);
    crate::vlog!(
        "subtask {id} ended: exit {:?} signal {:?} {}in {} ms",
        r.exit_code,
        r.signal,
        r.error
            .as_deref()
            .map(|e| format!("({e}) "))
            .unwrap_or_default(),
        r.duration_ms
    );
    sub.result = Some(r);
    drop(st);
    shared.notify();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_through_the_subtasks_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("data");
        std::fs::write(&plain, "not a program").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/nonexistent::{}", dir.path().display());
        assert_eq!(resolve_program("tool", &path), exe);
        // Not executable, or not there: left as is (spawn reports it).
        assert_eq!(resolve_program("data", &path), PathBuf::from("data"));
        assert_eq!(resolve_program("nope", &path), PathBuf::from("nope"));
        // A path is used as given.
        assert_eq!(resolve_program("./tool", &path), PathBuf::from("./tool"));
        assert_eq!(resolve_program("", &path), PathBuf::from(""));
    }
}
