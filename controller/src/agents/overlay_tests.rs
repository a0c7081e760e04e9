//! The overlay through the real router on a real listener (served with
//! connect info, as `serve_on` does): registration leases slices and
//! refuses bad or duplicate keys, heartbeat replies carry the peer list
//! only on a version mismatch, `GET /v1/hosts` and `/metrics` show the
//! tunnels, pull leases give overlay jobs only to hosts with a tunnel, a
//! lost host leaves the list and its slice is released, and a controller
//! restart keeps slices and the list's version.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{json, Value};
use sparegrid_proto::grid::{
    Heartbeat, HeartbeatReply, LeaseGrant, LeaseRequest, Register, Registered,
};
use sparegrid_proto::overlay::{TunnelInfo, TunnelPeerStatus, TunnelReport};
use sparegrid_proto::Network;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::tests::{enc, ADMIN, TOKEN};
use super::*;
use crate::api::router;
use crate::store::SqliteStore;

const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const K3: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

struct Ctl {
    url: String,
    store: Arc<SqliteStore>,
    client: reqwest::Client,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn config(tweak: impl FnOnce(&mut ControllerConfig)) -> ControllerConfig {
    let mut c = ControllerConfig::default();
    c.registry.heartbeat_interval = Duration::from_millis(100);
    c.registry.host_timeout = Duration::from_millis(400);
    c.auth.agent_token = Some(TOKEN.to_owned());
    c.auth.admin_tokens = vec![ADMIN.to_owned()];
    c.dispatch.interval = Duration::from_millis(20);
    c.overlay.cidr = "100.96.0.0/16".to_owned();
    tweak(&mut c);
    c.validate().unwrap();
    c
}

async fn start(store: Arc<SqliteStore>, config: &ControllerConfig) -> Ctl {
    let dyn_store: Arc<dyn Store> = store.clone();
    let state = AppState::new(dyn_store, config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let dispatcher = spawn_dispatcher(state.agents.clone());
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ctl {
        url,
        store,
        client: reqwest::Client::new(),
        tasks: vec![dispatcher, server],
    }
}

fn register(host: &str, tunnel: Option<(&str, Option<&str>)>) -> Vec<u8> {
    enc(&Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: tunnel.map(|(key, endpoint)| TunnelInfo {
            public_key: key.into(),
            listen_port: 51820,
            endpoint: endpoint.map(Into::into),
        }),
        p2p: false,
        host: host.into(),
        version: "t".into(),
        agent_url: None,
        slots: 2,
    })
}

fn heartbeat(host: &str, tunnel: Option<TunnelReport>) -> Vec<u8> {
    enc(&Heartbeat {
        tunnel,
        steals: Vec::new(),
        host: host.into(),
        load: 0.1,
        dominant: None,
        breakdown: BTreeMap::new(),
        free_slots: 2,
        running: Vec::new(),
        vms: BTreeMap::new(),
        suspended_ms: 0,
        renew: Vec::new(),
    })
}

fn report(version: u64, peers: Vec<TunnelPeerStatus>) -> Option<TunnelReport> {
    Some(TunnelReport {
        peers_version: version,
        peers,
        rejected_handshakes: 3,
    })
}

impl Ctl {
    async fn post(&self, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", MSGPACK)
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status(), r.bytes().await.unwrap().to_vec())
    }

    async fn register_ok(&self, body: Vec<u8>) -> Registered {
        let (status, bytes) = self.post("/v1/agents/register", body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        rmp_serde::from_slice(&bytes).unwrap()
    }

    async fn register_err(&self, body: Vec<u8>) -> (StatusCode, Value) {
        let (status, bytes) = self.post("/v1/agents/register", body).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn heartbeat(&self, body: Vec<u8>) -> HeartbeatReply {
        let (status, bytes) = self.post("/v1/agents/heartbeat", body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        rmp_serde::from_slice(&bytes).unwrap()
    }

    async fn get(&self, path: &str) -> String {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap()
    }

    async fn submit(&self, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn lease(&self, host: &str) -> LeaseGrant {
        let body = enc(&LeaseRequest {
            host: host.into(),
            max: 10,
            wait_ms: 0,
        });
        let (status, bytes) = self.post("/v1/leases", body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        rmp_serde::from_slice(&bytes).unwrap()
    }
}

fn overlay_job(mode: &str) -> Value {
    json!({
        "command": {"argv": ["echo", "{start}"]},
        "split": {"range": {"start": 0, "end": 2, "chunk": 1}},
        "mode": mode,
        "network": "overlay"
    })
}

#[tokio::test]
async fn slices_keys_peer_lists_status_and_eligibility_through_the_router() {
    let ctl = start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        &config(|_| {}),
    )
    .await;
    // a: no endpoint given, so the register's source address with the
    // listen port; b: its own endpoint.
    let a = ctl.register_ok(register("a", Some((K1, None)))).await;
    let lease_a = a.overlay.expect("a gets a slice");
    assert_eq!(
        (
            lease_a.cidr.as_str(),
            lease_a.slice.as_str(),
            lease_a.address.as_str()
        ),
        ("100.96.0.0/16", "100.96.1.0/24", "100.96.1.1/24")
    );
    let b = ctl
        .register_ok(register("b", Some((K2, Some("203.0.113.2:51000")))))
        .await;
    assert_eq!(b.overlay.unwrap().slice, "100.96.2.0/24");
    // No tunnel: registered, no slice.
    let c = ctl.register_ok(register("c", None)).await;
    assert_eq!(c.overlay, None);

    // Bad and duplicate keys are refused, naming the field; c is unchanged.
    let (status, e) = ctl.register_err(register("c", Some(("short", None)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str()),
        (Some("invalid_field"), Some("tunnel.public_key"))
    );
    let (status, e) = ctl.register_err(register("c", Some((K1, None)))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "public_key_in_use");
    assert_eq!(e["field"], "tunnel.public_key");
    assert!(e["message"].as_str().unwrap().contains("\"a\""), "{e}");
    let (status, e) = ctl
        .register_err(register("c", Some((K3, Some("nowhere")))))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["field"], "tunnel.endpoint");
    assert_eq!(ctl.store.slices().unwrap().len(), 2, "c got no slice");

    // First heartbeats (version 0): the list of the others.
    let ra = ctl.heartbeat(heartbeat("a", report(0, vec![]))).await;
    let pa = ra.overlay_peers.expect("a gets the list");
    assert_eq!(pa.peers.len(), 1);
    assert_eq!(pa.peers[0].host, "b");
    assert_eq!(pa.peers[0].public_key, K2);
    assert_eq!(pa.peers[0].endpoint.as_deref(), Some("203.0.113.2:51000"));
    assert_eq!(pa.peers[0].allowed_ips, ["100.96.2.0/24"]);
    let rb = ctl.heartbeat(heartbeat("b", report(0, vec![]))).await;
    let pb = rb.overlay_peers.expect("b gets the list");
    assert_eq!(pb.version, pa.version);
    assert_eq!(pb.peers[0].host, "a");
    assert_eq!(pb.peers[0].endpoint.as_deref(), Some("127.0.0.1:51820"));
    // The current version: nothing. No tunnel report: nothing.
    let peer_b = TunnelPeerStatus {
        host: None,
        public_key: K2.into(),
        endpoint: Some("203.0.113.2:51000".into()),
        last_handshake_secs: Some(5),
        rx_bytes: 4096,
        tx_bytes: 1000,
    };
    let ra = ctl
        .heartbeat(heartbeat("a", report(pa.version, vec![peer_b.clone()])))
        .await;
    assert_eq!(ra.overlay_peers, None);
    assert_eq!(
        ctl.heartbeat(heartbeat("c", None)).await.overlay_peers,
        None
    );
    assert_eq!(
        ctl.heartbeat(heartbeat("c", report(0, vec![])))
            .await
            .overlay_peers,
        None,
        "a host without a slice gets no list"
    );

    // b moves: a's version is stale now, and the list says where b went.
    let b = ctl
        .register_ok(register("b", Some((K2, Some("203.0.113.9:51000")))))
        .await;
    assert_eq!(
        b.overlay.unwrap().slice,
        "100.96.2.0/24",
        "same host, same slice"
    );
    let ra = ctl
        .heartbeat(heartbeat("a", report(pa.version, vec![peer_b])))
        .await;
    let pa2 = ra.overlay_peers.expect("a's list is stale");
    assert_ne!(pa2.version, pa.version);
    assert_eq!(pa2.peers[0].endpoint.as_deref(), Some("203.0.113.9:51000"));

    // GET /v1/hosts: slice, key, endpoint, and a's report, its peer named.
    let hosts: Value = serde_json::from_str(&ctl.get("/v1/hosts").await).unwrap();
    let by_id = |id: &str| {
        hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == id)
            .unwrap()
            .clone()
    };
    let oa = &by_id("a")["overlay"];
    assert_eq!(oa["slice"], "100.96.1.0/24");
    assert_eq!(oa["address"], "100.96.1.1/24");
    assert_eq!(oa["public_key"], K1);
    assert_eq!(oa["endpoint"], "127.0.0.1:51820");
    assert_eq!(oa["listed"], true);
    assert_eq!(oa["peers_current"], false);
    assert_eq!(oa["rejected_handshakes"], 3);
    assert_eq!(oa["peers"][0]["host"], "b", "named from its key: {oa}");
    assert_eq!(oa["peers"][0]["rx_bytes"], 4096);
    assert_eq!(oa["peers"][0]["last_handshake_secs"], 5);
    assert!(by_id("c")["overlay"].is_null());

    // Metrics.
    let m = ctl.get("/metrics").await;
    for line in [
        "sparegrid_overlay_slices_in_use 2",
        "sparegrid_overlay_slices_capacity 255",
        "sparegrid_overlay_listed_hosts 2",
        "sparegrid_overlay_peer_rx_bytes_total{host=\"a\",peer=\"b\"} 4096",
        "sparegrid_overlay_peer_tx_bytes_total{host=\"a\",peer=\"b\"} 1000",
        "sparegrid_overlay_rejected_handshakes_total{host=\"a\"} 3",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing in:\n{m}");
    }
    assert!(
        m.contains("sparegrid_overlay_peer_last_handshake_seconds{host=\"a\",peer=\"b\"}"),
        "{m}"
    );

    // An overlay pull job: c (no tunnel) leases nothing, a gets it all,
    // marked overlay.
    let (status, v) = ctl.submit(overlay_job("pull")).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!(ctl.lease("c").await.leases.is_empty());
    let grant = ctl.lease("a").await;
    assert_eq!(grant.leases.len(), 2);
    assert!(grant
        .leases
        .iter()
        .all(|l| l.assignment.network == Network::Overlay));
}

#[tokio::test]
async fn an_overlay_job_is_refused_without_an_overlay() {
    let ctl = start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        &config(|c| c.overlay.cidr.clear()),
    )
    .await;
    let (status, v) = ctl.submit(overlay_job("push")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "network");
    // And a tunnel registers fine, without a slice.
    let a = ctl.register_ok(register("a", Some((K1, None)))).await;
    assert_eq!(a.overlay, None);
    let mut job = overlay_job("push");
    job["network"] = json!("none");
    assert_eq!(ctl.submit(job).await.0, StatusCode::CREATED);
}

async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_lost_host_leaves_the_list_and_its_slice_is_released() {
    let ctl = start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        &config(|c| c.overlay.release_after = Duration::from_secs(1)),
    )
    .await;
    ctl.register_ok(register("a", Some((K1, None)))).await;
    ctl.register_ok(register("b", Some((K2, None)))).await;
    let v0 = ctl
        .heartbeat(heartbeat("a", report(0, vec![])))
        .await
        .overlay_peers
        .unwrap();
    assert_eq!(v0.peers.len(), 1);
    // b goes silent; a keeps heartbeating with the version it has.
    let mut version = v0.version;
    wait_for("b to leave a's list", 10, async || {
        if let Some(p) = ctl
            .heartbeat(heartbeat("a", report(version, vec![])))
            .await
            .overlay_peers
        {
            assert!(p.peers.is_empty(), "{p:?}");
            version = p.version;
            return true;
        }
        false
    })
    .await;
    assert_ne!(version, v0.version);
    // Until the grace has run out b still holds its slice.
    assert!(ctl.store.slices().unwrap().iter().any(|s| s.host == "b"));
    wait_for("b's slice to be released", 10, async || {
        ctl.heartbeat(heartbeat("a", report(version, vec![]))).await;
        !ctl.store.slices().unwrap().iter().any(|s| s.host == "b")
    })
    .await;
    // The slice goes to a new host.
    let c = ctl.register_ok(register("c", Some((K3, None)))).await;
    assert_eq!(c.overlay.unwrap().slice, "100.96.2.0/24");
}

#[tokio::test]
async fn a_controller_restart_keeps_slices_and_the_list_version() {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("c.db");
    let cfg = config(|_| {});
    let version = {
        let ctl = start(Arc::new(SqliteStore::open(path).unwrap()), &cfg).await;
        ctl.register_ok(register("a", Some((K1, None)))).await;
        ctl.register_ok(register("b", Some((K2, None)))).await;
        ctl.heartbeat(heartbeat("a", report(0, vec![])))
            .await
            .overlay_peers
            .unwrap()
            .version
    };
    let ctl = start(Arc::new(SqliteStore::open(path).unwrap()), &cfg).await;
    // Wait for the restore, then a registers again: its slice, and its
    // list is still current.
    wait_for("the restore", 10, async || {
        let hosts: Value = serde_json::from_str(&ctl.get("/v1/hosts").await).unwrap();
        hosts["hosts"][0]["overlay"]["slice"] == "100.96.1.0/24"
    })
    .await;
    let a = ctl.register_ok(register("a", Some((K1, None)))).await;
    assert_eq!(a.overlay.unwrap().slice, "100.96.1.0/24");
    assert_eq!(
        ctl.heartbeat(heartbeat("a", report(version, vec![])))
            .await
            .overlay_peers,
        None,
        "the same list has the same version after a restart"
    );
    let fresh = ctl
        .heartbeat(heartbeat("a", report(0, vec![])))
        .await
        .overlay_peers
        .unwrap();
    assert_eq!(fresh.version, version);
    assert_eq!(fresh.peers[0].host, "b");
}

#[tokio::test]
async fn a_host_back_without_its_tunnel_keeps_its_slice_but_leaves_the_list() {
    let ctl = start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        &config(|_| {}),
    )
    .await;
    ctl.register_ok(register("a", Some((K1, None)))).await;
    ctl.register_ok(register("b", Some((K2, None)))).await;
    let v = ctl
        .heartbeat(heartbeat("a", report(0, vec![])))
        .await
        .overlay_peers
        .unwrap();
    assert_eq!(v.peers.len(), 1);
    // b restarts without [tunnel].
    assert_eq!(ctl.register_ok(register("b", None)).await.overlay, None);
    let p = ctl
        .heartbeat(heartbeat("a", report(v.version, vec![])))
        .await
        .overlay_peers
        .expect("a's list changed");
    assert!(p.peers.is_empty(), "{p:?}");
    let hosts: Value = serde_json::from_str(&ctl.get("/v1/hosts").await).unwrap();
    let b = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == "b")
        .unwrap();
    assert_eq!(b["overlay"]["slice"], "100.96.2.0/24");
    assert_eq!(b["overlay"]["listed"], false);
    assert!(b["overlay"]["public_key"].is_null());
    // No overlay work for it; with its tunnel back, the same slice.
    ctl.heartbeat(heartbeat("b", None)).await;
    let (status, _) = ctl.submit(overlay_job("pull")).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut plain = overlay_job("pull");
    plain["network"] = json!("none");
    plain["split"]["range"]["end"] = json!(1);
    assert_eq!(ctl.submit(plain).await.0, StatusCode::CREATED);
    // It may lease (the plain job), but nothing of the overlay job.
    let got = ctl.lease("b").await.leases;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].assignment.network, Network::None);
    let back = ctl.register_ok(register("b", Some((K2, None)))).await;
    assert_eq!(back.overlay.unwrap().slice, "100.96.2.0/24");
    ctl.heartbeat(heartbeat("b", None)).await;
    assert_eq!(ctl.lease("b").await.leases.len(), 2);
    let p2 = ctl
        .heartbeat(heartbeat("a", report(p.version, vec![])))
        .await
        .overlay_peers
        .expect("b is back in a's list");
    assert_eq!(p2.version, v.version, "the same list as before");
}

#[tokio::test]
async fn a_full_pool_registers_without_a_slice_and_counts_it() {
    // A /29 of /30s: one slice (slice 0 is kept unused).
    let ctl = start(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        &config(|c| {
            c.overlay.cidr = "10.9.0.0/29".into();
            c.overlay.slice_prefix = 30;
        }),
    )
    .await;
    let a = ctl.register_ok(register("a", Some((K1, None)))).await;
    let lease = a.overlay.unwrap();
    assert_eq!(
        (lease.slice.as_str(), lease.address.as_str()),
        ("10.9.0.4/30", "10.9.0.5/30")
    );
    let b = ctl.register_ok(register("b", Some((K2, None)))).await;
    assert_eq!(b.overlay, None, "registered, without a slice");
    assert_eq!(
        ctl.heartbeat(heartbeat("b", report(0, vec![])))
            .await
            .overlay_peers,
        None
    );
    let m = ctl.get("/metrics").await;
    for line in [
        "sparegrid_overlay_pool_exhausted_total 1",
        "sparegrid_overlay_slices_in_use 1",
        "sparegrid_overlay_slices_capacity 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing in:\n{m}");
    }
}
