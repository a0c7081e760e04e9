//! SRV discovery against a real DNS server on loopback: a minimal UDP
//! responder written here (test-only; it answers SRV questions for one
//! zone from a table and NXDOMAIN otherwise), so the lookup goes through
//! hickory-resolver's real wire path.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Answers SRV questions for names in `records` until dropped.
struct TinyDns {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for TinyDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// (name, priority, weight, port, target) — names in lower case, no trailing dot.
type Rec = (&'static str, u16, u16, u16, &'static str);

fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// The question's name (lower case, no trailing dot), its type and where the question ends.
fn parse_question(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn answer(q: &[u8], records: &[Rec]) -> Option<Vec<u8>> {
    let (name, qtype, end) = parse_question(q)?;
    let hits: Vec<&Rec> = records
        .iter()
        .filter(|r| qtype == 33 && r.0 == name)
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(&q[0..2]); // id
    let rcode = if hits.is_empty() { 3 } else { 0 }; // NXDOMAIN / NOERROR
    out.extend_from_slice(&[0x81 | (q[2] & 0x01), 0x80 | rcode]); // QR, AA, RD copied; RA
    out.extend_from_slice(&[0, 1]); // QDCOUNT
    out.extend_from_slice(&(hits.len() as u16).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(&q[12..end]); // the question
    for (_, prio, weight, port, target) in hits {
        out.extend_from_slice(&[0xC0, 12]); // pointer to the question's name
        out.extend_from_slice(&33u16.to_be_bytes()); // SRV
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&60u32.to_be_bytes()); // TTL
        let mut rdata = Vec::new();
        rdata.extend_from_slice(&prio.to_be_bytes());
        rdata.extend_from_slice(&weight.to_be_bytes());
        rdata.extend_from_slice(&port.to_be_bytes());
        encode_name(&mut rdata, target);
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}

fn tiny_dns(records: &'static [Rec]) -> TinyDns {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::SeqCst) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if let Some(reply) = answer(&buf[..n], records) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        }
    });
    TinyDns { addr, stop }
}

const ZONE: &[Rec] = &[
    ("_sparegrid._tcp.grid.test", 10, 5, 7001, "backup.grid.test"),
    ("_sparegrid._tcp.grid.test", 0, 1, 7000, "ctl-b.grid.test"),
    ("_sparegrid._tcp.grid.test", 0, 9, 7443, "ctl-a.grid.test"),
    ("_sparegrid._tcp.off.test", 0, 0, 0, "."),
];

#[test]
fn the_lowest_priority_highest_weight_target_becomes_the_url() {
    let dns = tiny_dns(ZONE);
    let t = Duration::from_secs(2);
    let url = controller_url("grid.test", Some(dns.addr), false, t).unwrap();
    assert_eq!(url, "http://ctl-a.grid.test:7443");
    let url = controller_url("grid.test.", Some(dns.addr), true, t).unwrap();
    assert_eq!(url, "https://ctl-a.grid.test:7443");
    let all = lookup("_sparegrid._tcp.grid.test", Some(dns.addr), t).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.contains(&SrvTarget {
        priority: 10,
        weight: 5,
        port: 7001,
        target: "backup.grid.test".into()
    }));
}

#[test]
fn no_record_or_a_dot_target_is_a_clear_error() {
    let dns = tiny_dns(ZONE);
    let t = Duration::from_secs(2);
    let e = controller_url("nothing.test", Some(dns.addr), false, t).unwrap_err();
    assert!(
        e.to_string().contains("_sparegrid._tcp.nothing.test"),
        "{e}"
    );
    let e = controller_url("off.test", Some(dns.addr), false, t).unwrap_err();
    assert!(matches!(e, DiscoverError::NoRecord { .. }), "{e}");
}

#[test]
fn an_unreachable_nameserver_times_out_with_an_error() {
    // A bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let e = controller_url(
        "grid.test",
        Some(silent.local_addr().unwrap()),
        false,
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(matches!(e, DiscoverError::Lookup { .. }), "{e}");
}

#[test]
fn choice_and_names() {
    assert_eq!(srv_name(""), "_sparegrid._tcp");
    assert_eq!(srv_name("example.org."), "_sparegrid._tcp.example.org");
    let r = |p, w, t: &str| SrvTarget {
        priority: p,
        weight: w,
        port: 1,
        target: t.into(),
    };
    assert_eq!(choose(&[]), None);
    assert_eq!(choose(&[r(0, 0, ".")]), None);
    let list = [r(1, 100, "z"), r(0, 0, "b"), r(0, 0, "a"), r(0, 1, "c")];
    assert_eq!(choose(&list).unwrap().target, "c");
}

#[test]
fn resolve_fills_an_empty_url_only_when_asked_to() {
    let dns = tiny_dns(ZONE);
    let mut cfg = crate::config::Config::default();
    assert_eq!(resolve(&mut cfg).unwrap(), None, "discover = none");
    cfg.controller.discover = crate::config::Discover::Srv;
    cfg.controller.discover_domain = "grid.test".into();
    cfg.controller.discover_nameserver = dns.addr.to_string();
    assert_eq!(
        resolve(&mut cfg).unwrap().as_deref(),
        Some("http://ctl-a.grid.test:7443")
    );
    assert_eq!(cfg.controller.url, "http://ctl-a.grid.test:7443");
    assert!(cfg.controller.enabled());
    // A configured URL wins; nothing is looked up.
    cfg.controller.url = "http://10.0.0.1:7000".into();
    assert_eq!(resolve(&mut cfg).unwrap(), None);
    assert_eq!(cfg.controller.url, "http://10.0.0.1:7000");
}
