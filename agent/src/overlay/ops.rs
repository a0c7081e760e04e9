//! What [`super::HostNet`] does to the host, behind [`NetOps`]: run `ip` and
//! `nft` (with a ruleset on stdin) and write sysctls. [`SystemOps`] does it
//! for real; [`Recorder`] (tests) records the commands and answers from a
//! script, so the generated commands are checked without root.
//!
//! Links go through iproute2's `ip` rather than rtnetlink: it is already a
//! dependency of the host (and of the tunnel's routes), creating a veth
//! with its peer inside a named namespace is one `ip` line, and the
//! commands in the log read like what an operator would type. A grid
//! namespace costs a handful of `ip` runs (a few milliseconds), paid once
//! per overlay subtask.
//!
//! Commands run in the calling thread's network namespace (a spawned
//! process inherits it), which is how tests drive a whole host inside a
//! namespace.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::OverlayError;

/// The host operations [`super::HostNet`] needs.
pub trait NetOps: Send + Sync {
    /// Runs `argv` (with `stdin` fed in, if any) and returns its stdout;
    /// a failure to start or a non-zero exit is [`OverlayError::Command`]
    /// with stderr.
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<String, OverlayError>;

    /// Writes `value` to `/proc/sys/<key>` (`net/ipv4/conf/sgbr0/forwarding`).
    fn sysctl(&self, key: &str, value: &str) -> Result<(), OverlayError>;
}

/// The real host: commands from `PATH`, sysctls under `proc_sys`.
#[derive(Debug, Clone)]
pub struct SystemOps {
    /// `/proc/sys` (injected so tests can point elsewhere).
    pub proc_sys: PathBuf,
}

impl Default for SystemOps {
    fn default() -> Self {
        SystemOps {
            proc_sys: PathBuf::from("/proc/sys"),
        }
    }
}

impl NetOps for SystemOps {
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<String, OverlayError> {
        let failed = |message: String| OverlayError::Command {
            command: argv.join(" "),
            message,
        };
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| failed("empty command".into()))?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot start {prog}: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| failed(format!("writing stdin: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(failed(format!("{}: {}", out.status, err.trim())))
        }
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<(), OverlayError> {
        let path = self.proc_sys.join(key);
        std::fs::write(&path, value).map_err(|source| OverlayError::Sysctl { path, source })
    }
}

/// Test double: records every command (`argv` joined by spaces, with
/// `<<stdin` appended when there was one) and sysctl (`sysctl key=value`);
/// a command whose line starts with a prefix given to
/// [`Recorder::fail_on`] fails, one given to [`Recorder::answer`] returns
/// that text.
#[derive(Debug, Default)]
pub struct Recorder {
    log: Mutex<Vec<String>>,
    stdin: Mutex<Vec<String>>,
    fail: Mutex<Vec<String>>,
    answers: Mutex<Vec<(String, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recorder {
    /// Commands starting with `prefix` fail from now on.
    pub fn fail_on(&self, prefix: &str) {
        lock(&self.fail).push(prefix.to_owned());
    }

    /// Commands starting with `prefix` print `stdout`.
    pub fn answer(&self, prefix: &str, stdout: &str) {
        lock(&self.answers).push((prefix.to_owned(), stdout.to_owned()));
    }

    /// The log so far, emptied.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.log))
    }

    /// The stdin texts given so far (rulesets), emptied.
    pub fn take_stdin(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.stdin))
    }
}

impl NetOps for Recorder {
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<String, OverlayError> {
        let line = argv.join(" ");
        lock(&self.log).push(if stdin.is_some() {
            format!("{line} <<stdin")
        } else {
            line.clone()
        });
        if let Some(s) = stdin {
            lock(&self.stdin).push(s.to_owned());
        }
        if lock(&self.fail)
            .iter()
            .any(|p| line.starts_with(p.as_str()))
        {
            return Err(OverlayError::Command {
                command: line,
                message: "exit status: 1: scripted failure".into(),
            });
        }
        let answers = lock(&self.answers);
        Ok(answers
            .iter()
            .find(|(p, _)| line.starts_with(p.as_str()))
            .map(|(_, a)| a.clone())
            .unwrap_or_default())
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<(), OverlayError> {
        lock(&self.log).push(format!("sysctl {key}={value}"));
        Ok(())
    }
}
