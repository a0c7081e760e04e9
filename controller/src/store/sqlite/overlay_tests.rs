//! Tests of the overlay's slices in the SQLite store: allocation, the same
//! host keeping its slice (also across a reopen of the file), exhaustion,
//! key uniqueness, release after a host is lost, and that overlay jobs are
//! claimed only by hosts with a tunnel (push, pull and p2p claims).

use super::*;
use crate::job::{Command, DispatchMode, Network, Resources, Split};
use crate::overlay::pool::Pool;

const K1: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const K3: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

fn pool(cidr: &str, prefix: u8) -> Pool {
    Pool::new(cidr.parse().unwrap(), prefix).unwrap()
}

fn lease(store: &dyn Store, p: &Pool, host: &str, key: &str) -> Result<SliceLease> {
    let pick = |used: &[String]| {
        p.first_free(used.iter().map(String::as_str))
            .map(|s| s.to_string())
    };
    store.lease_slice(host, key, Some("192.0.2.1:51820"), &pick)
}

fn slice_of(l: SliceLease) -> String {
    match l {
        SliceLease::Leased { record, .. } => record.slice,
        SliceLease::Exhausted => panic!("pool exhausted"),
    }
}

#[test]
fn hosts_get_the_lowest_free_slice_and_keep_it() {
    let store = SqliteStore::open_in_memory().unwrap();
    let p = pool("100.96.0.0/16", 24);
    for h in ["a", "b"] {
        store.upsert_host(h, "").unwrap();
    }
    let a = lease(&store, &p, "a", K1).unwrap();
    assert!(matches!(a, SliceLease::Leased { new: true, .. }), "{a:?}");
    assert_eq!(slice_of(a), "100.96.1.0/24");
    assert_eq!(
        slice_of(lease(&store, &p, "b", K2).unwrap()),
        "100.96.2.0/24"
    );
    // Again (an agent restart), with a new key: the same slice, not new.
    let again = lease(&store, &p, "a", K3).unwrap();
    match &again {
        SliceLease::Leased { record, new } => {
            assert!(!new);
            assert_eq!(record.slice, "100.96.1.0/24");
            assert_eq!(record.public_key.as_deref(), Some(K3));
        }
        other => panic!("{other:?}"),
    }
    let all = store.slices().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].public_key.as_deref(), Some(K3));
}

#[test]
fn exhaustion_changes_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    // A /29 of /30s: slice 0 is kept unused, so one slice.
    let p = pool("10.0.0.0/29", 30);
    assert_eq!(slice_of(lease(&store, &p, "a", K1).unwrap()), "10.0.0.4/30");
    assert_eq!(lease(&store, &p, "b", K2).unwrap(), SliceLease::Exhausted);
    assert_eq!(store.slices().unwrap().len(), 1);
}

#[test]
fn a_key_belongs_to_one_live_host() {
    let store = SqliteStore::open_in_memory().unwrap();
    let p = pool("100.96.0.0/16", 24);
    for h in ["a", "b"] {
        store.upsert_host(h, "").unwrap();
    }
    lease(&store, &p, "a", K1).unwrap();
    match lease(&store, &p, "b", K1) {
        Err(StoreError::PublicKeyInUse { host, other }) => {
            assert_eq!((host.as_str(), other.as_str()), ("b", "a"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.slices().unwrap().len(), 1, "b got nothing");
    // Once a is lost, the key may move (a keeps its slice, keyless).
    store.mark_lost("a").unwrap();
    assert_eq!(
        slice_of(lease(&store, &p, "b", K1).unwrap()),
        "100.96.2.0/24"
    );
    let all = store.slices().unwrap();
    assert_eq!(all[0].host, "a");
    assert_eq!(all[0].public_key, None);
    assert_eq!(all[1].public_key.as_deref(), Some(K1));
}

#[test]
fn lost_hosts_release_their_slice_after_the_grace() {
    let store = SqliteStore::open_in_memory().unwrap();
    let p = pool("100.96.0.0/16", 24);
    for h in ["a", "b"] {
        store.upsert_host(h, "").unwrap();
    }
    lease(&store, &p, "a", K1).unwrap();
    lease(&store, &p, "b", K2).unwrap();
    let beat: BTreeMap<String, i64> = store
        .list_hosts()
        .unwrap()
        .into_iter()
        .map(|h| (h.id, h.last_heartbeat_ms))
        .collect();
    // Not lost: never released, however old.
    assert!(store.release_slices(i64::MAX).unwrap().is_empty());
    store.mark_lost("a").unwrap();
    // Lost, but the grace has not run out (its last beat is not before).
    assert!(store.release_slices(beat["a"]).unwrap().is_empty());
    let gone = store.release_slices(beat["a"] + 1).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(
        (gone[0].host.as_str(), gone[0].slice.as_str()),
        ("a", "100.96.1.0/24")
    );
    // The slice goes to the next new host.
    store.upsert_host("c", "").unwrap();
    assert_eq!(
        slice_of(lease(&store, &p, "c", K3).unwrap()),
        "100.96.1.0/24"
    );
    // a comes back: a new slice.
    store.upsert_host("a", "").unwrap();
    assert_eq!(
        slice_of(lease(&store, &p, "a", K1).unwrap()),
        "100.96.3.0/24"
    );
}

#[test]
fn slices_survive_a_reopen_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let p = pool("100.96.0.0/16", 24);
    {
        let store = SqliteStore::open(&path).unwrap();
        for h in ["a", "b", "c"] {
            store.upsert_host(h, "").unwrap();
            lease(
                &store,
                &p,
                h,
                [K1, K2, K3][(h.as_bytes()[0] - b'a') as usize],
            )
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    let held: Vec<(String, String)> = store
        .slices()
        .unwrap()
        .into_iter()
        .map(|r| (r.host, r.slice))
        .collect();
    assert_eq!(
        held,
        [
            ("a".to_owned(), "100.96.1.0/24".to_owned()),
            ("b".to_owned(), "100.96.2.0/24".to_owned()),
            ("c".to_owned(), "100.96.3.0/24".to_owned()),
        ]
    );
    // b registers again after the restart: the same slice.
    assert_eq!(
        slice_of(lease(&store, &p, "b", K2).unwrap()),
        "100.96.2.0/24"
    );
    assert_eq!(store.drop_slices(&["c".to_owned()]).unwrap(), 1);
    assert_eq!(store.slices().unwrap().len(), 2);
}

fn overlay_job(store: &dyn Store, mode: DispatchMode, network: Network, n: i64) -> JobId {
    store
        .create_planned_job(&JobRequest {
            name: format!("{network:?}"),
            command: Command::Argv(vec!["echo".into(), "{start}".into()]),
            split: Split::Range {
                start: 0,
                end: n,
                chunk: 1,
            },
            resources: Resources::default(),
            max_attempts: 3,
            priority: 10,
            mode,
            reduce: None,
            network,
        })
        .unwrap()
}

#[test]
fn overlay_jobs_go_only_to_hosts_with_a_tunnel() {
    for mode in [DispatchMode::Push, DispatchMode::Pull, DispatchMode::P2p] {
        let store = SqliteStore::open_in_memory().unwrap();
        let p = pool("100.96.0.0/16", 24);
        for h in ["plain", "tunnel"] {
            store.upsert_host(h, "").unwrap();
        }
        lease(&store, &p, "tunnel", K1).unwrap();
        // The overlay job has the higher priority: claimed first where allowed.
        let ov = overlay_job(&store, mode, Network::Overlay, 3);
        let none = overlay_job(&store, mode, Network::None, 3);
        let claim = |host: &str| match mode {
            DispatchMode::Push => store.claim(host, 10).unwrap(),
            DispatchMode::Pull => store
                .claim_leases(host, 10, Duration::from_secs(30), 1_000)
                .unwrap(),
            DispatchMode::P2p => store.claim_seeds(host, 10).unwrap(),
        };
        let plain = claim("plain");
        assert_eq!(plain.len(), 3, "{mode:?}");
        assert!(
            plain
                .iter()
                .all(|a| a.job == none && a.network == Network::None),
            "{mode:?}: {plain:?}"
        );
        assert_eq!(store.get_job(&ov).unwrap().counts.queued, 3, "{mode:?}");
        let tunnel = claim("tunnel");
        assert_eq!(tunnel.len(), 3, "{mode:?}");
        assert!(
            tunnel
                .iter()
                .all(|a| a.job == ov && a.network == Network::Overlay),
            "{mode:?}: {tunnel:?}"
        );
        // Without its tunnel (registered without one) it takes none.
        let ov2 = overlay_job(&store, mode, Network::Overlay, 1);
        store.detach_slice(Some("tunnel")).unwrap();
        assert!(claim("tunnel").is_empty(), "{mode:?}");
        assert!(claim("plain").is_empty(), "{mode:?}");
        assert_eq!(store.get_job(&ov2).unwrap().counts.queued, 1);
    }
}

#[test]
fn detach_all_clears_every_key() {
    let store = SqliteStore::open_in_memory().unwrap();
    let p = pool("100.96.0.0/16", 24);
    lease(&store, &p, "a", K1).unwrap();
    lease(&store, &p, "b", K2).unwrap();
    store.detach_slice(None).unwrap();
    let all = store.slices().unwrap();
    assert_eq!(all.len(), 2, "the slices stay");
    assert!(all
        .iter()
        .all(|r| r.public_key.is_none() && r.endpoint.is_none()));
}
