//! The overlay NIC of a grid VM: a subtask whose environment carries
//! `SPAREGRID_OVERLAY_ADDRESS` (the job asked for `network = "overlay"`)
//! gets the VM's virtio NIC configured before its command starts: the
//! address with its prefix, the MTU, up, and a default route via the
//! host's slice address. The same variables a process-runtime subtask
//! finds in its environment (see the agent's `overlay` module):
//!
//! | variable | example | |
//! |---|---|---|
//! | `SPAREGRID_OVERLAY_ADDRESS` | `100.96.3.2/24` | required: turns this on |
//! | `SPAREGRID_OVERLAY_GATEWAY` | `100.96.3.1` | required |
//! | `SPAREGRID_OVERLAY_MAC` | `52:54:00:60:03:02` | which NIC; absent: the first one that is not `lo` |
//! | `SPAREGRID_OVERLAY_MTU` | `1420` | optional |
//!
//! The NIC may be hot-plugged just before the subtask is sent, so it is
//! waited for ([`NIC_WAIT`]) under `/sys/class/net` (an injected root).
//! Links are set with busybox `ip` (the initramfs has busybox and nothing
//! else; netlink by hand would be more code than the four commands). A bad
//! value or a failed command ends the subtask with an error naming it, and
//! the command does not run.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the kernel lists network interfaces.
pub const CLASS_NET: &str = "/sys/class/net";

/// How long to wait for the NIC to appear (hot-plug).
pub const NIC_WAIT: Duration = Duration::from_secs(10);

/// What the subtask's environment asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRequest {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// Lower-case `aa:bb:…`.
    pub mac: Option<String>,
    pub mtu: Option<u32>,
}

fn ip_of(var: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{var}: not an IPv4 address: {s:?}"))
}

impl NetRequest {
    /// The request in `env`, if the subtask asks for the overlay.
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Option<NetRequest>, String> {
        let Some(addr) = env.get("SPAREGRID_OVERLAY_ADDRESS") else {
            return Ok(None);
        };
        let var = "SPAREGRID_OVERLAY_ADDRESS";
        let (ip, prefix) = addr
            .split_once('/')
            .ok_or_else(|| format!("{var}: must be address/prefix, got {addr:?}"))?;
        let address = ip_of(var, ip)?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| format!("{var}: prefix must be 1 to 30, got {addr:?}"))?;
        let gw = env
            .get("SPAREGRID_OVERLAY_GATEWAY")
            .ok_or("SPAREGRID_OVERLAY_GATEWAY: missing (needed with SPAREGRID_OVERLAY_ADDRESS)")?;
        let gateway = ip_of("SPAREGRID_OVERLAY_GATEWAY", gw)?;
        let mac = match env.get("SPAREGRID_OVERLAY_MAC") {
            None => None,
            Some(m) => {
                let ok = m.len() == 17
                    && m.split(':')
                        .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
                if !ok {
                    return Err(format!("SPAREGRID_OVERLAY_MAC: not a MAC address: {m:?}"));
                }
                Some(m.to_ascii_lowercase())
            }
        };
        let mtu = match env.get("SPAREGRID_OVERLAY_MTU") {
            None => None,
            Some(m) => Some(
                m.parse()
                    .ok()
                    .filter(|v| (576..=9000).contains(v))
                    .ok_or_else(|| {
                        format!("SPAREGRID_OVERLAY_MTU: must be 576 to 9000, got {m:?}")
                    })?,
            ),
        };
        Ok(Some(NetRequest {
            address,
            prefix,
            gateway,
            mac,
            mtu,
        }))
    }

    /// The `ip` commands that configure `nic`, in order.
    pub fn commands(&self, nic: &str) -> Vec<Vec<String>> {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut out = Vec::new();
        if let Some(mtu) = self.mtu {
            out.push(v(&["link", "set", "dev", nic, "mtu", &mtu.to_string()]));
        }
        out.push(v(&["addr", "flush", "dev", nic]));
        let cidr = format!("{}/{}", self.address, self.prefix);
        out.push(v(&["addr", "add", &cidr, "dev", nic]));
        out.push(v(&["link", "set", "dev", nic, "up"]));
        let gw = self.gateway.to_string();
        out.push(v(&["route", "replace", "default", "via", &gw, "dev", nic]));
        out
    }
}

/// The interface under `class_net` (`/sys/class/net`) with `mac`, or the
/// first one that is not `lo` (by name) when `mac` is None.
pub fn find_nic(class_net: &Path, mac: Option<&str>) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(class_net)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find(|n| match mac {
        None => true,
        Some(m) => std::fs::read_to_string(class_net.join(n).join("address"))
            .is_ok_and(|a| a.trim().eq_ignore_ascii_case(m)),
    })
}

/// Waits up to `wait` for the NIC, then configures it with `ip`.
pub fn configure(req: &NetRequest, class_net: &Path, wait: Duration) -> Result<String, String> {
    let deadline = Instant::now() + wait;
    let nic = loop {
        if let Some(n) = find_nic(class_net, req.mac.as_deref()) {
            break n;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no network interface{} appeared in {wait:?}",
                req.mac
                    .as_deref()
                    .map(|m| format!(" with MAC {m}"))
                    .unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for args in req.commands(&nic) {
        let out = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_address_means_no_network() {
        assert_eq!(NetRequest::from_env(&env(&[("X", "1")])).unwrap(), None);
    }

    #[test]
    fn a_full_request_parses_and_gives_the_commands() {
        let r = NetRequest::from_env(&env(&[
            ("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2/24"),
            ("SPAREGRID_OVERLAY_GATEWAY", "100.96.3.1"),
            ("SPAREGRID_OVERLAY_MAC", "52:54:00:60:03:02"),
            ("SPAREGRID_OVERLAY_MTU", "1420"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.prefix, 24);
        let cmds: Vec<String> = r.commands("eth0").iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "link set dev eth0 mtu 1420",
                "addr flush dev eth0",
                "addr add 100.96.3.2/24 dev eth0",
                "link set dev eth0 up",
                "route replace default via 100.96.3.1 dev eth0",
            ]
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (pairs, var) in [
            (
                vec![("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2")],
                "SPAREGRID_OVERLAY_ADDRESS",
            ),
            (
                vec![("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2/24")],
                "SPAREGRID_OVERLAY_GATEWAY",
            ),
            (
                vec![
                    ("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2/24"),
                    ("SPAREGRID_OVERLAY_GATEWAY", "gw"),
                ],
                "SPAREGRID_OVERLAY_GATEWAY",
            ),
            (
                vec![
                    ("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2/24"),
                    ("SPAREGRID_OVERLAY_GATEWAY", "100.96.3.1"),
                    ("SPAREGRID_OVERLAY_MAC", "52:54:00"),
                ],
                "SPAREGRID_OVERLAY_MAC",
            ),
            (
                vec![
                    ("SPAREGRID_OVERLAY_ADDRESS", "100.96.3.2/24"),
                    ("SPAREGRID_OVERLAY_GATEWAY", "100.96.3.1"),
                    ("SPAREGRID_OVERLAY_MTU", "70000"),
                ],
                "SPAREGRID_OVERLAY_MTU",
            ),
        ] {
            let e = NetRequest::from_env(&env(&pairs)).unwrap_err();
            assert!(e.starts_with(var), "{var}: {e}");
        }
    }

    #[test]
    fn the_nic_is_found_by_mac_or_as_the_first_non_loopback() {
        let dir = tempfile::tempdir().unwrap();
        for (n, mac) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth1", "52:54:00:60:03:02"),
            ("eth0", "52:54:00:aa:bb:cc"),
        ] {
            std::fs::create_dir(dir.path().join(n)).unwrap();
            std::fs::write(dir.path().join(n).join("address"), format!("{mac}\n")).unwrap();
        }
        assert_eq!(
            find_nic(dir.path(), Some("52:54:00:60:03:02")).as_deref(),
            Some("eth1")
        );
        assert_eq!(find_nic(dir.path(), None).as_deref(), Some("eth0"));
        assert_eq!(find_nic(dir.path(), Some("52:54:00:00:00:01")), None);
        // A NIC that never appears: a clear error after the wait.
        let req = NetRequest {
            address: Ipv4Addr::new(100, 96, 3, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(100, 96, 3, 1),
            mac: Some("52:54:00:00:00:01".into()),
            mtu: None,
        };
        let e = configure(&req, dir.path(), Duration::from_millis(100)).unwrap_err();
        assert!(e.contains("52:54:00:00:00:01"), "{e}");
    }
}
