//! The built `sparegrid` binary as a process: `--help` lists every command,
//! and an unreachable controller is named with exit code 1.

use std::process::Command;

fn sparegrid() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sparegrid"));
    c.env_remove("SPAREGRID_CONTROLLER")
        .env_remove("SPAREGRID_TOKEN");
    c
}

#[test]
fn help_lists_every_command() {
    let out = sparegrid().arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for word in [
        "submit",
        "status",
        "watch",
        "results",
        "cancel",
        "hosts",
        "--controller",
        "--token",
        "--json",
        "SPAREGRID_CONTROLLER",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}

#[test]
fn unreachable_controller_exits_1_naming_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = sparegrid()
        .env("SPAREGRID_CONTROLLER", &url)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with(&format!("error: cannot reach the controller at {url}")),
        "{err}"
    );
}

#[test]
fn bad_arguments_exit_2() {
    let out = sparegrid().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
