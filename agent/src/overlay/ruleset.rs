//! The nftables ruleset that keeps the grid on the overlay, as text for
//! `nft -f -` ([`ruleset`]), and the drop counters read back from
//! `nft -j list counters` ([`parse_counters`]).
//!
//! Why a generated ruleset through `nft -f -` and not netlink by hand: nft
//! applies a whole file as one transaction (the old table goes and the new
//! one comes atomically, so there is never a moment without filtering),
//! and the text is what an operator reads with `nft list table inet
//! sparegrid`. The idiom `table …; delete table …; table … { … }` makes the
//! load work whether or not the table exists.
//!
//! What the table does (`inet sparegrid`, base chains at priority
//! `filter - 10`, before the distribution's own filter chains):
//!
//! - **input**: everything that arrives on the grid bridge and is for the
//!   host itself is dropped (counter `grid_to_host`): any host address,
//!   the bridge's own (the gateway only routes, it serves nothing to the
//!   grid), the underlay's, loopback's. Grid addresses are static (no
//!   DHCP), ARP is not IP, and IPv6 is off on the bridge, so the grid needs
//!   nothing from the host. Also dropped (`overlay_to_host`): packets for
//!   the host from an overlay address that is not a host's (the first
//!   address of its slice), i.e. other hosts' grid VMs coming through the
//!   tunnel; host-to-host traffic over the overlay stays open.
//! - **forward, from the bridge**: IPv6 is dropped (`grid_ipv6`: the
//!   overlay is IPv4; grid namespaces still send router solicitations), a
//!   source outside this host's slice (spoofed) too (`grid_spoofed`); a
//!   destination in
//!   the overlay (other grid VMs here or, through the tunnel, elsewhere) or
//!   in `allow` is accepted; anything else (customers, the internet) is
//!   dropped (`grid_to_outside`).
//! - **forward, to the bridge**: replies to connections the grid made and
//!   packets from the overlay are accepted; anything else is dropped
//!   (`to_grid`), so nothing outside the overlay can open connections
//!   into the grid either.
//! - **postrouting**: grid traffic to `allow` leaves masqueraded behind
//!   the host's address (those networks have no route to the overlay).
//!
//! An `accept` here does not override other tables: a distribution's
//! forward chain with policy drop (Docker's, for instance) must also let
//! the overlay through. Drops here are final.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use serde::Serialize;

use super::lease::Lease;

/// The nft table (family `inet`).
pub const TABLE: &str = "sparegrid";

/// The drop counters, in the order the ruleset declares them.
pub const COUNTERS: [&str; 5] = [
    "grid_to_host",
    "overlay_to_host",
    "grid_spoofed",
    "grid_ipv6",
    "grid_to_outside",
];
/// Counter of packets dropped on their way into the grid.
pub const TO_GRID: &str = "to_grid";

/// The whole table for one lease.
pub fn ruleset(bridge: &str, lease: &Lease, allow: &[Ipv4Net]) -> String {
    let cidr = lease.cidr;
    let slice = lease.slice;
    let mask = lease.host_mask();
    let mut s = String::new();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line(&format!("table inet {TABLE} {{\n}}"));
    line(&format!("delete table inet {TABLE}"));
    line(&format!("table inet {TABLE} {{"));
    for c in COUNTERS.iter().chain([&TO_GRID]) {
        line(&format!("\tcounter {c} {{ }}"));
    }
    line("\tset allow {");
    line("\t\ttype ipv4_addr");
    line("\t\tflags interval");
    if !allow.is_empty() {
        let list: Vec<String> = allow.iter().map(|n| n.to_string()).collect();
        line(&format!("\t\telements = {{ {} }}", list.join(", ")));
    }
    line("\t}");
    line("\tchain input {");
    line("\t\ttype filter hook input priority filter - 10; policy accept;");
    line(&format!(
        "\t\tiifname \"{bridge}\" counter name grid_to_host drop"
    ));
    line(&format!(
        "\t\tip saddr {cidr} ip saddr & {mask} != 0.0.0.1 counter name overlay_to_host drop"
    ));
    line("\t}");
    line("\tchain forward {");
    line("\t\ttype filter hook forward priority filter - 10; policy accept;");
    line(&format!("\t\tiifname \"{bridge}\" jump from_grid"));
    line(&format!("\t\toifname \"{bridge}\" jump to_grid"));
    line("\t}");
    line("\tchain from_grid {");
    line("\t\tmeta nfproto != ipv4 counter name grid_ipv6 drop");
    line(&format!(
        "\t\tip saddr != {slice} counter name grid_spoofed drop"
    ));
    line(&format!("\t\tip daddr {cidr} accept"));
    line("\t\tip daddr @allow accept");
    line("\t\tcounter name grid_to_outside drop");
    line("\t}");
    line("\tchain to_grid {");
    line("\t\tct state established,related accept");
    line(&format!("\t\tip saddr {cidr} accept"));
    line(&format!("\t\tcounter name {TO_GRID} drop"));
    line("\t}");
    line("\tchain postrouting {");
    line("\t\ttype nat hook postrouting priority srcnat; policy accept;");
    line(&format!(
        "\t\tip saddr {slice} ip daddr != {cidr} ip daddr @allow masquerade"
    ));
    line("\t}");
    line("}");
    s
}

/// One nft counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// The table's counters by name, from `nft -j list counters table inet
/// sparegrid`; counters of other tables are ignored. None when the text is
/// not nft's JSON.
pub fn parse_counters(json: &str) -> Option<BTreeMap<String, Count>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let mut out = BTreeMap::new();
    for item in items {
        let Some(c) = item.get("counter") else {
            continue;
        };
        if c.get("table").and_then(|t| t.as_str()) != Some(TABLE) {
            continue;
        }
        let name = c.get("name")?.as_str()?.to_owned();
        let count = Count {
            packets: c.get("packets")?.as_u64()?,
            bytes: c.get("bytes")?.as_u64()?,
        };
        out.insert(name, count);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            cidr: "100.96.0.0/16".parse().unwrap(),
            slice: "100.96.3.0/24".parse().unwrap(),
            host: "100.96.3.1".parse().unwrap(),
        }
    }

    #[test]
    fn ruleset_filters_the_bridge() {
        let r = ruleset("sgbr0", &lease(), &[]);
        // Replaces the table atomically, whether or not it exists.
        assert!(r.starts_with("table inet sparegrid {\n}\ndelete table inet sparegrid\n"));
        assert!(r.contains("iifname \"sgbr0\" counter name grid_to_host drop"));
        assert!(r.contains("ip saddr 100.96.0.0/16 ip saddr & 0.0.0.255 != 0.0.0.1"));
        assert!(r.contains("ip saddr != 100.96.3.0/24 counter name grid_spoofed drop"));
        assert!(r.contains("ip daddr 100.96.0.0/16 accept"));
        // Without `allow` the set is empty: no elements line.
        assert!(!r.contains("elements"));
        // Every counter used is declared.
        for c in COUNTERS.iter().chain([&TO_GRID]) {
            assert!(
                r.contains(&format!("counter {c} {{ }}")),
                "{c} not declared"
            );
            assert!(
                r.contains(&format!("counter name {c} drop")),
                "{c} not used"
            );
        }
        // The last rule of from_grid drops what nothing accepted.
        let from_grid = r.split("chain from_grid {").nth(1).unwrap();
        let body = from_grid.split('}').next().unwrap();
        assert_eq!(
            body.trim().lines().last().unwrap().trim(),
            "counter name grid_to_outside drop"
        );
    }

    #[test]
    fn allow_goes_into_the_set() {
        let allow = [
            "192.0.2.0/24".parse().unwrap(),
            "198.51.100.7/32".parse().unwrap(),
        ];
        let r = ruleset("grid1", &lease(), &allow);
        assert!(r.contains("elements = { 192.0.2.0/24, 198.51.100.7/32 }"));
        assert!(r.contains("iifname \"grid1\" jump from_grid"));
        assert!(r.contains(
            "ip saddr 100.96.3.0/24 ip daddr != 100.96.0.0/16 ip daddr @allow masquerade"
        ));
    }

    #[test]
    fn counters_parse_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"counter": {"family": "inet", "name": "grid_to_host", "table": "sparegrid", "handle": 6, "packets": 3, "bytes": 180}},
          {"counter": {"family": "inet", "name": "other", "table": "firewalld", "handle": 2, "packets": 9, "bytes": 9}},
          {"counter": {"family": "inet", "name": "grid_to_outside", "table": "sparegrid", "handle": 7, "packets": 0, "bytes": 0}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c["grid_to_host"],
            Count {
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(c["grid_to_outside"].packets, 0);
        assert!(parse_counters("table inet sparegrid {").is_none());
    }
}
