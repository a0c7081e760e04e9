//! The files in `systemd/`: `systemd-analyze verify` accepts the agent's unit
//! without complaints about it, and `agent.toml.example` is exactly
//! `Config::default()` with every key written out, so the example cannot drift
//! from `agent/src/config.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sparegrid_agent::config::Config;

const UNIT: &str = "sparegrid-agent.service";

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn read(name: &str) -> String {
    let path = systemd_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `verify` fails when an Exec*= binary is missing, and the agent is not
/// installed on a build machine: point every missing one at /bin/true.
fn with_existing_binaries(unit: &str) -> String {
    let mut out = String::new();
    for line in unit.lines() {
        let rewritten = line.split_once('=').and_then(|(key, value)| {
            if !key.trim().starts_with("Exec") {
                return None;
            }
            // Exec prefixes: "-" ignore failure, "@" argv0, "+", "!", "!!", ":".
            let value = value.trim_start();
            let prefix_len =
                value.len() - value.trim_start_matches(['-', '@', '+', '!', ':']).len();
            let (prefix, command) = value.split_at(prefix_len);
            let (binary, args) = command.split_once(' ').unwrap_or((command, ""));
            if Path::new(binary).exists() {
                return None;
            }
            Some(format!("{}={prefix}/bin/true {args}", key.trim()))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Runs `systemd-analyze verify` on `unit_text` saved as our unit's name and
/// returns its exit success and the output lines that complain about our unit.
///
/// `verify` also loads the units ours refers to (libvirtd.service,
/// network-online.target …) and reports problems in *those* files, or that
/// they are not installed, when the build host lacks them. Those lines are not
/// about our unit file and are ignored; every line that names our file (it
/// prefixes its own complaints with "<path>:<line>:" or "<unit>:") counts.
fn verify(analyze: &Path, unit: &str, unit_text: &str) -> (bool, String, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(unit);
    std::fs::write(&path, unit_text).expect("write unit");
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "cat")
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_us = text
        .lines()
        .filter(|l| l.contains(unit))
        // A dependency that is not installed here is the host's business.
        .filter(|l| {
            let missing_dep = (l.contains("libvirtd.service")
                || l.contains("network-online.target"))
                && (l.contains("not found") || l.contains("No such file"));
            !missing_dep
        })
        .map(str::to_string)
        .collect();
    (out.status.success(), text, about_us)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = find_in_path("systemd-analyze") else {
        eprintln!("SKIP unit_passes_systemd_analyze_verify: systemd-analyze not installed (make deps installs systemd)");
        return;
    };
    let unit = with_existing_binaries(&read(UNIT));
    let (ok, text, complaints) = verify(&analyze, UNIT, &unit);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains about {UNIT}:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn controller_unit_passes_systemd_analyze_verify() {
    const CONTROLLER: &str = "sparegrid-controller.service";
    let Some(analyze) = find_in_path("systemd-analyze") else {
        eprintln!(
            "SKIP controller_unit_passes_systemd_analyze_verify: systemd-analyze not installed"
        );
        return;
    };
    let unit = with_existing_binaries(&read(CONTROLLER));
    let (ok, text, complaints) = verify(&analyze, CONTROLLER, &unit);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains about {CONTROLLER}:\n{}",
        complaints.join("\n")
    );
}

/// The check above must be able to fail: a bogus directive is reported.
#[test]
fn systemd_analyze_verify_reports_unknown_directives() {
    let Some(analyze) = find_in_path("systemd-analyze") else {
        eprintln!(
            "SKIP systemd_analyze_verify_reports_unknown_directives: systemd-analyze not installed"
        );
        return;
    };
    let unit = with_existing_binaries(&read(UNIT))
        .replace("[Service]\n", "[Service]\nProtectEverythingPlease=yes\n");
    let (_, text, complaints) = verify(&analyze, UNIT, &unit);
    assert!(
        complaints
            .iter()
            .any(|l| l.contains("ProtectEverythingPlease")),
        "an unknown directive went unnoticed:\n{text}"
    );
}

#[test]
fn unit_has_the_promised_settings() {
    let unit = read(UNIT);
    let settings: BTreeSet<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for want in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecStart=/usr/local/bin/sparegrid-agent --config /etc/sparegrid/agent.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=90",
        "Restart=on-failure",
        "RuntimeDirectory=sparegrid",
        "StateDirectory=sparegrid",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/cgroup",
        // The agent writes cgroups: this must never be turned on.
        "ProtectControlGroups=no",
    ] {
        assert!(settings.contains(want), "{UNIT} lacks `{want}`");
    }
}

#[test]
fn example_config_is_the_defaults() {
    let text = read("agent.toml.example");
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("agent.toml.example: {e}"));
    assert_eq!(
        cfg,
        Config::default(),
        "agent.toml.example differs from Config::default()"
    );
}

/// Dotted paths of every leaf of a serialised config ("load.weights.cpu").
fn leaves(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// Dotted paths of every `key = value` line under its `[section]` header.
fn keys_in_toml(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            keys.insert(if section.is_empty() {
                key.trim().to_string()
            } else {
                format!("{section}.{}", key.trim())
            });
        }
    }
    keys
}

#[test]
fn example_config_writes_out_every_key() {
    let defaults = serde_json::to_value(Config::default()).expect("serialise defaults");
    let mut want = BTreeSet::new();
    leaves(&defaults, "", &mut want);
    let have = keys_in_toml(&read("agent.toml.example"));
    let missing: Vec<_> = want.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "agent.toml.example does not document {missing:?}; add them with their defaults"
    );
    assert!(want.len() > 40, "suspiciously few config keys: {want:?}");
}

#[test]
fn controller_example_config_is_the_defaults_and_complete() {
    use sparegrid_controller::config::ControllerConfig;
    let text = read("controller.toml.example");
    let cfg = ControllerConfig::parse(&text, "controller.toml.example")
        .unwrap_or_else(|e| panic!("controller.toml.example: {e}"));
    assert_eq!(
        cfg,
        ControllerConfig::default(),
        "controller.toml.example differs from ControllerConfig::default()"
    );
    // Every key the config has is written out (optional keys such as
    // auth.agent_token and tls.cert are not serialised when unset; the
    // example shows them commented out).
    let mut want = BTreeSet::new();
    leaves(&serde_json::to_value(&cfg).unwrap(), "", &mut want);
    let have = keys_in_toml(&text);
    let missing: Vec<_> = want.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "controller.toml.example lacks {missing:?}"
    );
}
