//! The target's routes over HTTP with a real transfer store: auth, bad
//! fields named, the uploaded state checked (incomplete, size, digest)
//! before the control loop is asked, and its answer passed on.

use std::sync::mpsc;
use std::time::SystemTime;

use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::migrate::{IncomingVm, MigrationAnswer};
use sparegrid_transfer::client::{hash_file, upload, UploadOptions};
use sparegrid_transfer::token::{sign, Direction};
use sparegrid_transfer::{TransferConfig, TransferState};

use super::*;
use crate::config::ControllerSection;
use crate::daemon::control::Command;

const TOKEN: &str = "agent-token";

struct Target {
    url: String,
    transfer_url: String,
    _dir: tempfile::TempDir,
    journal: tempfile::TempDir,
    /// What the fake control loop was asked: (vm, check only).
    asked: mpsc::Receiver<(String, bool)>,
}

/// A target agent's migration routes, its transfer endpoint, and a fake
/// control loop that accepts a VM unless it is called `busy`.
fn target() -> Target {
    target_with_controller("http://127.0.0.1:9")
}

/// [`target`] whose controller is at `controller_url`.
fn target_with_controller(controller_url: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let config = TransferConfig {
        enabled: true,
        ..TransferConfig::default()
    };
    let transfer = TransferState::new(&config, dir.path(), TOKEN.as_bytes()).unwrap();
    let setup = Arc::new(MigrateSetup {
        host: "b".into(),
        controller: ControllerSection {
            url: controller_url.into(),
            token: TOKEN.into(),
            ..ControllerSection::default()
        },
        token_key: TOKEN.as_bytes().to_vec(),
        journal_dir: dir.path().join("migrate"),
        checkpoint_bytes: config.checkpoint_bytes,
        transfer: None,
    });
    let (tx, rx) = mpsc::channel::<Command>();
    let (asked_tx, asked) = mpsc::channel();
    std::thread::spawn(move || {
        for cmd in rx {
            if let Command::MigrateIn {
                incoming,
                attempt,
                reply,
                ..
            } = cmd
            {
                let _ = asked_tx.send((incoming.vm.clone(), attempt.is_none()));
                let verdict = if incoming.vm == "busy" {
                    Err("a grid VM here is suspended".to_owned())
                } else {
                    Ok(())
                };
                let _ = reply.send(verdict);
            }
        }
    });
    let url = crate::grid::tests::serve_on(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        routes(setup, transfer.clone(), tx),
    );
    let transfer_url = crate::grid::tests::serve_on(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        sparegrid_transfer::router(transfer),
    );
    Target {
        url,
        transfer_url,
        _dir: dir,
        journal: tempfile::tempdir().unwrap(),
        asked,
    }
}

/// Uploads `data` as transfer `id` to the target; returns its blake3.
fn put_state(t: &Target, id: &str, data: &[u8]) -> String {
    let src = t.journal.path().join(format!("{id}.src"));
    std::fs::write(&src, data).unwrap();
    let token = sign(
        TOKEN.as_bytes(),
        id,
        Direction::Upload,
        SystemTime::now() + std::time::Duration::from_secs(60),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(upload(
        &reqwest::Client::new(),
        &t.transfer_url,
        &token,
        id,
        &src,
        t.journal.path(),
        &UploadOptions::default(),
    ))
    .unwrap();
    hash_file(&src).unwrap()
}

fn incoming(vm: &str, id: &str, size: u64, blake3: &str) -> IncomingVm {
    IncomingVm {
        from: "a".into(),
        vm: vm.into(),
        vcpus: 1,
        memory_mib: 256,
        state_id: id.into(),
        state_bytes: size,
        state_blake3: blake3.into(),
        attempt: AttemptRef {
            job: "j-1".into(),
            index: 0,
            epoch: 1,
        },
        guest_subtask: 7,
        timeout_ms: 60_000,
        fetch: None,
    }
}

/// POSTs `body` to `path` with `token`; returns the status and the body.
fn post(t: &Target, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{}{path}", t.url))
        .header("content-type", "application/msgpack")
        .body(body);
    if let Some(tok) = token {
        req = req.bearer_auth(tok);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().unwrap().to_vec())
}

fn offer(t: &Target, vm: &IncomingVm) -> (u16, Vec<u8>) {
    post(
        t,
        "/v1/migrations/offer",
        Some(TOKEN),
        rmp_serde::to_vec_named(vm).unwrap(),
    )
}

fn answer_of(body: &[u8]) -> MigrationAnswer {
    rmp_serde::from_slice(body).unwrap()
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[test]
fn an_offer_with_a_verified_state_is_put_to_the_control_loop() {
    let t = target();
    let data = vec![7u8; 300_000];
    let digest = put_state(&t, "vmstate-j-1-0-1", &data);
    let (status, body) = offer(&t, &incoming("sg-a-1", "vmstate-j-1-0-1", 300_000, &digest));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        answer_of(&body),
        MigrationAnswer {
            accepted: true,
            reason: None,
            attempt: None,
            fetch_failed: false,
        }
    );
    assert_eq!(t.asked.try_recv().unwrap(), ("sg-a-1".to_string(), true));
}

#[test]
fn a_refusal_from_the_control_loop_is_passed_on_and_the_state_removed() {
    let t = target();
    let digest = put_state(&t, "vmstate-j-1-0-2", b"state");
    let vm = incoming("busy", "vmstate-j-1-0-2", 5, &digest);
    let (status, body) = offer(&t, &vm);
    assert_eq!(status, 200);
    let a = answer_of(&body);
    assert!(!a.accepted);
    assert_eq!(a.reason.as_deref(), Some("a grid VM here is suspended"));
    // The upload went with the refusal: a second offer finds nothing.
    let (_, body) = offer(&t, &vm);
    let a = answer_of(&body);
    assert!(
        a.reason
            .as_deref()
            .unwrap_or("")
            .contains("not (fully) uploaded"),
        "{a:?}"
    );
}

#[test]
fn the_state_must_be_complete_with_the_announced_size_and_digest() {
    let t = target();
    let missing = incoming("sg-a-1", "vmstate-nothing", 10, &"0".repeat(64));
    let a = answer_of(&offer(&t, &missing).1);
    assert!(!a.accepted && a.reason.unwrap().contains("not (fully) uploaded"));

    let digest = put_state(&t, "vmstate-size", b"0123456789");
    let a = answer_of(&offer(&t, &incoming("sg-a-1", "vmstate-size", 11, &digest)).1);
    assert!(
        !a.accepted && a.reason.unwrap().contains("10 bytes"),
        "size"
    );

    put_state(&t, "vmstate-digest", b"0123456789");
    let a = answer_of(
        &offer(
            &t,
            &incoming("sg-a-1", "vmstate-digest", 10, &"a".repeat(64)),
        )
        .1,
    );
    assert!(
        !a.accepted && a.reason.unwrap().contains("blake3"),
        "digest"
    );
    // None of them reached the control loop.
    assert!(t.asked.try_recv().is_err());
}

#[test]
fn bad_bodies_and_tokens_get_clear_errors_naming_the_field() {
    let t = target();
    let good = incoming("sg-a-1", "vmstate-x", 10, &"0".repeat(64));
    let bytes = rmp_serde::to_vec_named(&good).unwrap();
    for path in ["/v1/migrations/offer", "/v1/migrations/commit"] {
        assert_eq!(post(&t, path, None, bytes.clone()).0, 401, "{path}");
        assert_eq!(
            post(&t, path, Some("wrong"), bytes.clone()).0,
            401,
            "{path}"
        );
        let (status, body) = post(&t, path, Some(TOKEN), b"\xc1".to_vec());
        assert_eq!(status, 400, "{path}");
        assert_eq!(json_of(&body)["code"], "malformed_msgpack");
    }
    let cases: Vec<(&str, IncomingVm)> = vec![
        (
            "vm",
            IncomingVm {
                vm: "../etc".into(),
                ..good.clone()
            },
        ),
        (
            "vm",
            IncomingVm {
                vm: String::new(),
                ..good.clone()
            },
        ),
        (
            "vcpus",
            IncomingVm {
                vcpus: 0,
                ..good.clone()
            },
        ),
        (
            "memory_mib",
            IncomingVm {
                memory_mib: 1,
                ..good.clone()
            },
        ),
        (
            "state_id",
            IncomingVm {
                state_id: "../x".into(),
                ..good.clone()
            },
        ),
        (
            "state_blake3",
            IncomingVm {
                state_blake3: "zz".into(),
                ..good.clone()
            },
        ),
        (
            "from",
            IncomingVm {
                from: "b".into(),
                ..good.clone()
            },
        ),
    ];
    for (field, vm) in cases {
        let (status, body) = offer(&t, &vm);
        assert_eq!(status, 400, "{field}: {}", String::from_utf8_lossy(&body));
        let j = json_of(&body);
        assert_eq!(j["field"], field, "{j}");
        assert_eq!(j["code"], "invalid_field");
    }
    assert!(t.asked.try_recv().is_err());
}

#[test]
fn a_commit_whose_controller_cannot_be_reached_restores_nothing() {
    let t = target();
    let digest = put_state(&t, "vmstate-j-1-0-3", b"state");
    let vm = incoming("sg-a-1", "vmstate-j-1-0-3", 5, &digest);
    let (status, body) = post(
        &t,
        "/v1/migrations/commit",
        Some(TOKEN),
        rmp_serde::to_vec_named(&vm).unwrap(),
    );
    assert_eq!(status, 200);
    let a = answer_of(&body);
    assert!(!a.accepted);
    assert!(
        a.reason.unwrap().contains("did not move the attempt"),
        "the controller moves the attempt before anything is restored"
    );
    assert!(t.asked.try_recv().is_err(), "no restore without the move");
}

#[test]
fn a_state_the_source_could_not_upload_is_fetched_from_it_and_checked() {
    let t = target();
    // The source's own endpoint, with the state published on it.
    let src_dir = tempfile::tempdir().unwrap();
    let source = TransferState::new(
        &TransferConfig {
            enabled: true,
            ..TransferConfig::default()
        },
        src_dir.path(),
        TOKEN.as_bytes(),
    )
    .unwrap();
    let file = src_dir.path().join("vm.save");
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    source.store().import("vmstate-j-1-0-9", &file).unwrap();
    let source_url = crate::grid::tests::serve_on(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        sparegrid_transfer::router(source),
    );
    let token = sign(
        TOKEN.as_bytes(),
        "vmstate-j-1-0-9",
        Direction::Download,
        SystemTime::now() + std::time::Duration::from_secs(60),
    )
    .unwrap();
    let digest = hash_file(&file).unwrap();
    let mut vm = incoming("sg-a-1", "vmstate-j-1-0-9", data.len() as u64, &digest);
    vm.fetch = Some(sparegrid_proto::migrate::StateSource {
        url: format!("{source_url}/v1/files/vmstate-j-1-0-9"),
        token,
    });
    let (status, body) = offer(&t, &vm);
    assert_eq!(status, 200);
    assert!(answer_of(&body).accepted, "{:?}", answer_of(&body));
    assert_eq!(t.asked.try_recv().unwrap(), ("sg-a-1".to_string(), true));

    // A wrong token: the fetch fails and the offer is refused, saying so.
    let mut bad = vm.clone();
    bad.state_id = "vmstate-j-1-0-8".into();
    bad.fetch.as_mut().unwrap().token = "v1.x.download.0.sig".into();
    let a = answer_of(&offer(&t, &bad).1);
    assert!(a.fetch_failed, "the source may relay: {a:?}");
    assert!(!a.accepted && a.reason.unwrap().contains("fetching"));
    // A source nobody listens on: the same.
    bad.fetch.as_mut().unwrap().url = format!("http://127.0.0.1:{}/v1/files/x", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let a = answer_of(&offer(&t, &bad).1);
    assert!(!a.accepted && a.fetch_failed, "{a:?}");
    // A refusal for another reason is not a failed fetch.
    let busy = incoming("busy", "vmstate-j-1-0-9", data.len() as u64, &digest);
    let busy = IncomingVm {
        fetch: vm.fetch.clone(),
        ..busy
    };
    let a = answer_of(&offer(&t, &busy).1);
    assert!(!a.accepted && !a.fetch_failed, "{a:?}");
    // A fetch URL that is not http(s) is a bad field.
    bad.fetch.as_mut().unwrap().url = "file:///etc/passwd".into();
    let (status, body) = offer(&t, &bad);
    assert_eq!(status, 400);
    assert_eq!(json_of(&body)["field"], "fetch.url");
    // Nor is a protocol-relative one.
    bad.fetch.as_mut().unwrap().url = "//elsewhere/v1/files/x".into();
    assert_eq!(offer(&t, &bad).0, 400);

    // Relayed: a path, fetched from this target's controller (here the
    // same endpoint stands in for the controller's `/v1/data`).
    let relayed = target_with_controller(&source_url);
    let mut via = vm.clone();
    via.fetch.as_mut().unwrap().url = "/v1/files/vmstate-j-1-0-9".into();
    let (status, body) = offer(&relayed, &via);
    assert_eq!(status, 200);
    assert!(answer_of(&body).accepted, "{:?}", answer_of(&body));
}

#[test]
fn stale_saved_states_are_swept_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let transfer = TransferState::new(
        &TransferConfig {
            enabled: true,
            ..TransferConfig::default()
        },
        dir.path(),
        TOKEN.as_bytes(),
    )
    .unwrap();
    let src = dir.path().join("x.bin");
    std::fs::write(&src, b"state").unwrap();
    for id in ["vmstate-old", "vmstate-new", "img-old-vmlinuz"] {
        transfer.store().import(id, &src).unwrap();
    }
    let age = |id: &str| {
        let p = transfer.store().complete_path(id).unwrap();
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
    };
    age("vmstate-old");
    age("img-old-vmlinuz");
    assert_eq!(
        sweep_stale_states(&transfer, std::time::Duration::from_secs(3600)),
        1
    );
    let store = transfer.store();
    assert!(!store.is_complete("vmstate-old").unwrap());
    assert!(
        store.is_complete("vmstate-new").unwrap(),
        "a fresh state stays"
    );
    assert!(
        store.is_complete("img-old-vmlinuz").unwrap(),
        "not a saved state"
    );
}
