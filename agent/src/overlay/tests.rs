//! [`HostNet`] on a [`Recorder`]: the commands a lease, a teardown and an
//! attachment generate, without root. The real thing runs in
//! tests/tests/overlay_filter.rs.

use std::sync::Arc;

use sparegrid_proto::overlay::OverlayLease;

use super::*;

fn lease(slice: &str, address: &str) -> OverlayLease {
    OverlayLease {
        cidr: "100.96.0.0/16".into(),
        slice: slice.into(),
        address: address.into(),
    }
}

fn host(allow: &[&str]) -> (HostNet, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let cfg = OverlaySection {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let net = HostNet::with_ops(&cfg, rec.clone())
        .unwrap()
        .netns_prefix("sg-grid-")
        .forward_from(&["sgtun0"]);
    (net, rec)
}

#[test]
fn apply_lease_filters_first_then_builds_the_bridge() {
    let (net, rec) = host(&["192.0.2.0/24"]);
    assert!(net
        .apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap());
    let log = rec.take();
    assert_eq!(
        log,
        [
            "nft -f - <<stdin",
            "ip link show dev sgbr0",
            "sysctl net/ipv6/conf/sgbr0/disable_ipv6=1",
            "ip link set dev sgbr0 mtu 1420",
            "ip -4 addr flush dev sgbr0",
            "ip addr add 100.96.3.1/24 dev sgbr0",
            "ip link set dev sgbr0 up",
            // No answer from the recorder: no route to the allowed CIDR.
            "ip -o -4 route get 192.0.2.0",
            "sysctl net/ipv4/conf/sgbr0/forwarding=1",
            "sysctl net/ipv4/conf/sgtun0/forwarding=1",
        ]
    );
    let rules = rec.take_stdin();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].contains("elements = { 192.0.2.0/24 }"));
    assert!(rules[0].contains("ip saddr != 100.96.3.0/24"));
    assert_eq!(net.lease().unwrap().slice.to_string(), "100.96.3.0/24");
}

#[test]
fn the_same_lease_is_a_no_op_and_a_new_slice_re_applies() {
    let (net, rec) = host(&[]);
    let l = lease("100.96.3.0/24", "100.96.3.1/24");
    assert!(net.apply_lease(&l).unwrap());
    rec.take();
    // Re-applying would reset the drop counters: nothing is run.
    assert!(!net.apply_lease(&l).unwrap());
    assert!(rec.take().is_empty());
    assert!(net
        .apply_lease(&lease("100.96.9.0/24", "100.96.9.1/24"))
        .unwrap());
    let log = rec.take();
    assert!(
        log.contains(&"ip addr add 100.96.9.1/24 dev sgbr0".to_string()),
        "{log:?}"
    );
    assert!(rec.take_stdin().last().unwrap().contains("100.96.9.0/24"));
}

#[test]
fn forwarding_follows_the_route_to_allowed_networks() {
    let (net, rec) = host(&["192.0.2.0/24", "198.51.100.0/24"]);
    rec.answer(
        "ip -o -4 route get 192.0.2.0",
        "192.0.2.0 via 10.0.0.1 dev eth1 src 10.0.0.5 uid 0 \\    cache \n",
    );
    rec.answer(
        "ip -o -4 route get 198.51.100.0",
        "local 198.51.100.0 dev lo src 127.0.0.1\n",
    );
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    let fwd: Vec<String> = rec
        .take()
        .into_iter()
        .filter(|l| l.ends_with("forwarding=1"))
        .collect();
    assert_eq!(
        fwd,
        [
            "sysctl net/ipv4/conf/sgbr0/forwarding=1",
            "sysctl net/ipv4/conf/sgtun0/forwarding=1",
            "sysctl net/ipv4/conf/eth1/forwarding=1",
        ]
    );
}

#[test]
fn a_missing_bridge_is_created() {
    let (net, rec) = host(&[]);
    rec.fail_on("ip link show");
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    let log = rec.take();
    assert_eq!(log[1], "ip link show dev sgbr0");
    assert_eq!(log[2], "ip link add name sgbr0 type bridge");
}

#[test]
fn a_failing_nft_stops_before_the_bridge() {
    let (net, rec) = host(&[]);
    rec.fail_on("nft");
    let e = net
        .apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap_err();
    assert!(matches!(e, OverlayError::Command { .. }), "{e}");
    assert_eq!(rec.take(), ["nft -f - <<stdin"]);
    assert!(net.lease().is_none());
}

#[test]
fn a_bad_lease_names_its_field_and_touches_nothing() {
    let (net, rec) = host(&[]);
    let e = net
        .apply_lease(&lease("100.96.3.0/24", "100.96.3.7/24"))
        .unwrap_err();
    assert!(e.to_string().contains("`address`"), "{e}");
    assert!(rec.take().is_empty());
}

#[test]
fn attach_before_a_lease_is_a_clear_error() {
    let (net, _rec) = host(&[]);
    let e = net.attach_namespace("j/0#1").unwrap_err();
    assert!(matches!(e, OverlayError::NoLease));
    assert!(e.to_string().contains("not leased"), "{e}");
    assert!(matches!(net.attach_vm(), Err(OverlayError::NoLease)));
}

#[test]
fn a_namespace_is_wired_to_the_bridge_and_removed_on_drop() {
    let (net, rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    rec.take();
    rec.take_stdin();
    let a = net.attach_namespace("j/0#1").unwrap();
    assert_eq!(a.cidr(), "100.96.3.2/24");
    assert_eq!(a.gateway().to_string(), "100.96.3.1");
    assert_eq!(a.netns(), "sg-grid-0");
    assert_eq!(a.netns_path(), std::path::Path::new("/run/netns/sg-grid-0"));
    assert_eq!(
        rec.take(),
        [
            // Leftovers of an earlier agent go first.
            "ip link del dev sgv0",
            "ip netns del sg-grid-0",
            "ip netns add sg-grid-0",
            "ip -batch - <<stdin",
            "ip -n sg-grid-0 -batch - <<stdin",
        ]
    );
    let batches = rec.take_stdin();
    assert_eq!(
        batches[0],
        "link add name sgv0 mtu 1420 type veth peer name eth0 mtu 1420 netns sg-grid-0\n\
         link set dev sgv0 master sgbr0\nlink set dev sgv0 up\n"
    );
    assert!(batches[1].contains("addr add 100.96.3.2/24 dev eth0\n"));
    assert!(batches[1].contains("route add default via 100.96.3.1 dev eth0\n"));
    let b = net.attach_namespace("j/1#1").unwrap();
    assert_eq!(b.cidr(), "100.96.3.3/24");
    assert_eq!(net.status().guests, 2);
    drop(a);
    rec.take();
    drop(b);
    assert_eq!(
        rec.take(),
        ["ip link del dev sgv1", "ip netns del sg-grid-1"]
    );
    assert_eq!(net.status().guests, 0);
    // The lowest address is free again.
    let vm = net.attach_vm().unwrap();
    assert_eq!(vm.cidr(), "100.96.3.2/24");
    assert_eq!(vm.mac(), "52:54:00:60:03:02");
    let env: Vec<String> = vm.env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(
        env,
        [
            "SPAREGRID_OVERLAY_ADDRESS=100.96.3.2/24",
            "SPAREGRID_OVERLAY_GATEWAY=100.96.3.1",
            "SPAREGRID_OVERLAY_MAC=52:54:00:60:03:02",
            "SPAREGRID_OVERLAY_MTU=1420",
        ]
    );
}

#[test]
fn a_failed_attachment_gives_its_address_back() {
    let (net, rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    rec.fail_on("ip -n");
    let e = net.attach_namespace("j/0#1").unwrap_err();
    assert!(e.to_string().contains("ip -n sg-grid-0 -batch -"), "{e}");
    let log = rec.take();
    assert_eq!(
        &log[log.len() - 2..],
        ["ip link del dev sgv0", "ip netns del sg-grid-0"]
    );
    assert_eq!(net.status().guests, 0);
}

#[test]
fn a_guest_of_an_old_slice_frees_nothing_in_the_new_one() {
    let (net, _rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    let old = net.attach_vm().unwrap();
    net.apply_lease(&lease("100.96.4.0/24", "100.96.4.1/24"))
        .unwrap();
    let new = net.attach_vm().unwrap();
    assert_eq!(new.cidr(), "100.96.4.2/24");
    drop(old);
    assert_eq!(net.status().guests, 1);
}

#[test]
fn teardown_removes_table_and_bridge_and_tolerates_their_absence() {
    let (net, rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    rec.take();
    net.teardown().unwrap();
    assert_eq!(
        rec.take(),
        ["nft delete table inet sparegrid", "ip link del dev sgbr0"]
    );
    assert!(net.lease().is_none());
    // Dropping after a teardown does not run it again.
    drop(net);
    assert!(rec.take().is_empty());
}

#[test]
fn status_reads_the_counters() {
    let (net, rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    rec.answer(
        "nft -j list counters",
        r#"{"nftables":[{"counter":{"family":"inet","name":"grid_to_host","table":"sparegrid","packets":4,"bytes":240}}]}"#,
    );
    let s = net.status();
    assert_eq!(s.slice.as_deref(), Some("100.96.3.0/24"));
    assert_eq!(s.address.as_deref(), Some("100.96.3.1/24"));
    assert_eq!(s.capacity, 253);
    assert_eq!(s.dropped["grid_to_host"].packets, 4);
}

#[test]
fn a_vm_nic_is_a_virtio_nic_on_the_bridge() {
    let (net, _rec) = host(&[]);
    net.apply_lease(&lease("100.96.3.0/24", "100.96.3.1/24"))
        .unwrap();
    let nic = net.attach_vm().unwrap();
    assert_eq!(
        vm::nic_xml(&nic),
        "<interface type='bridge'>\n  <mac address='52:54:00:60:03:02'/>\n  \
         <source bridge='sgbr0'/>\n  <model type='virtio'/>\n  <mtu size='1420'/>\n\
         </interface>\n"
    );
}

#[test]
fn the_default_netns_prefix_names_this_network_namespace() {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_eq!(default_netns_prefix(), format!("sg-grid-{ino}-"));
}
