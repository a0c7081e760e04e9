//! The host side of grid networking on the overlay (issue 7, part 3): the
//! grid bridge of this host's slice, the nftables filtering that keeps the
//! grid on the overlay, guest addresses from the slice, and per-subtask
//! network namespaces for the process runtime.
//!
//! - [`config`]: the `[overlay]` section (bridge name, MTU, `allow`).
//! - [`lease`]: the controller's lease checked, guest addresses allocated.
//! - [`ruleset`]: the nftables table (what it drops and why), counters.
//! - [`ops`]: `ip`/`nft`/sysctl behind [`NetOps`], a recorder for tests.
//! - [`attach`]: a grid namespace (netns + veth on the bridge) for one
//!   subtask, and a grid VM's NIC lease; both give their address back and
//!   tear down on drop.
//! - [`vm`]: hot-plugging a grid VM's overlay NIC ([`NicPlug`], libvirt).
//!
//! [`HostNet`] ties them together. The daemon makes one when the tunnel is
//! configured, calls [`HostNet::apply_lease`] with every lease the
//! controller sends (the same lease again is a no-op; a changed one
//! re-applies), hands it to the runner ([`crate::grid::runner::Runner::with_overlay`])
//! and calls [`HostNet::teardown`] on shutdown (dropping the last handle
//! does it too). [`HostNet::status`] gives the drop counters for status.
//!
//! Order of [`HostNet::apply_lease`]: the nftables table first (so the
//! bridge never exists unfiltered), then the bridge (created if missing,
//! its old addresses flushed, the host's slice address added, up, IPv6
//! off), then IPv4 forwarding on the bridge, on the interfaces given with
//! [`HostNet::forward_from`] (the tunnel's TUN device: traffic from other
//! slices comes in there) and on those the `allow` CIDRs are routed
//! through when the lease is applied (`ip route get`; their replies come in
//! there): per interface, so the host does not start routing between its
//! other networks (`net.ipv4.ip_forward` is left alone; the kernel checks
//! the flag of the interface a packet arrives on).

pub mod attach;
pub mod config;
pub mod lease;
pub mod ops;
pub mod ruleset;
pub mod vm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;
use serde::Serialize;
use sparegrid_proto::overlay::OverlayLease;

pub use attach::{Attachment, VmNic};
pub use config::OverlaySection;
pub use lease::{Lease, SliceAddrs};
pub use ops::{NetOps, Recorder, SystemOps};
pub use ruleset::Count;
#[cfg(feature = "libvirt")]
pub use vm::LibvirtNics;
pub use vm::NicPlug;

/// What can go wrong on the host side of the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay lease field `{field}`: {message}")]
    Lease {
        field: &'static str,
        message: String,
    },
    #[error("network = overlay, but this agent has no overlay (no [tunnel] configured)")]
    NotConfigured,
    #[error("network = overlay, but the controller has not leased this host an overlay slice yet")]
    NoLease,
    #[error("overlay slice {slice} is full: all {capacity} grid addresses are in use")]
    SliceFull { slice: String, capacity: usize },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("cannot write {}: {source}", path.display())]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// The overlay as this host has it, for status.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OverlayStatus {
    pub bridge: String,
    /// The leased slice, once applied.
    pub slice: Option<String>,
    /// The host's address on the bridge.
    pub address: Option<String>,
    /// Guest addresses in use and the slice's capacity.
    pub guests: usize,
    pub capacity: usize,
    /// nft drop counters by name (see [`ruleset`]); empty when they could
    /// not be read.
    pub dropped: BTreeMap<String, Count>,
}

/// The applied lease and its addresses in use.
struct Applied {
    lease: Lease,
    addrs: SliceAddrs,
    /// Bumped whenever a lease is applied: a guest of an older one gives
    /// its address back to nobody.
    generation: u64,
}

/// What [`HostNet`] shares with its attachments.
pub(crate) struct Inner {
    bridge: String,
    mtu: u32,
    allow: Vec<Ipv4Net>,
    ops: Arc<dyn NetOps>,
    /// Names of grid namespaces: `<prefix><n>`.
    netns_prefix: String,
    /// Where `ip netns` keeps them (iproute2's `/run/netns`).
    netns_dir: PathBuf,
    forward_from: Vec<String>,
    /// Numbers grid namespaces and their veths.
    seq: AtomicU32,
    state: Mutex<Option<Applied>>,
    generations: AtomicU32,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Option<Applied>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a guest address: (address, prefix length, gateway, generation).
    fn take_address(
        &self,
    ) -> Result<(std::net::Ipv4Addr, u8, std::net::Ipv4Addr, u64), OverlayError> {
        let mut st = self.lock();
        let applied = st.as_mut().ok_or(OverlayError::NoLease)?;
        let addr = applied.addrs.take()?;
        Ok((
            addr,
            applied.lease.slice.prefix_len(),
            applied.lease.host,
            applied.generation,
        ))
    }

    /// Gives a guest address back, if its lease is still the applied one.
    fn release(&self, addr: std::net::Ipv4Addr, generation: u64) {
        if let Some(a) = self.lock().as_mut() {
            if a.generation == generation {
                a.addrs.release(addr);
            }
        }
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed) % 100_000
    }
}

/// `sg-grid-<id>-`, where `<id>` is the inode of the calling thread's
/// network namespace: named namespaces live in one directory for the whole
/// machine, so agents in different network namespaces (test labs) must not
/// share names, while an agent restarted in the same one finds (and
/// removes) its predecessor's leftovers under the same names.
pub fn default_netns_prefix() -> String {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    format!("sg-grid-{id}-")
}

/// The interface `net` is routed through now (`ip route get`), unless it
/// is the host itself (`lo`) or there is no route.
fn route_dev(ops: &dyn NetOps, net: &Ipv4Net) -> Option<String> {
    let addr = net.network().to_string();
    let out = ops
        .run(&["ip", "-o", "-4", "route", "get", &addr], None)
        .ok()?;
    let mut words = out.split_whitespace();
    let dev = words.find(|w| *w == "dev").and_then(|_| words.next())?;
    (dev != "lo" && config::valid_ifname(dev)).then(|| dev.to_owned())
}

/// The grid bridge, its filtering and its guests (see the module docs).
pub struct HostNet {
    inner: Arc<Inner>,
}

impl HostNet {
    /// A host net for `[overlay]` on the real host (`ip`, `nft`,
    /// `/proc/sys`). Nothing is touched until a lease is applied.
    pub fn new(cfg: &OverlaySection) -> Result<HostNet, OverlayError> {
        HostNet::with_ops(cfg, Arc::new(SystemOps::default()))
    }

    /// The same on any [`NetOps`] (tests use [`Recorder`]).
    pub fn with_ops(cfg: &OverlaySection, ops: Arc<dyn NetOps>) -> Result<HostNet, OverlayError> {
        cfg.validate()?;
        Ok(HostNet {
            inner: Arc::new(Inner {
                bridge: cfg.bridge.clone(),
                mtu: cfg.mtu,
                allow: cfg.allowed()?,
                ops,
                netns_prefix: default_netns_prefix(),
                netns_dir: PathBuf::from("/run/netns"),
                forward_from: Vec::new(),
                seq: AtomicU32::new(0),
                state: Mutex::new(None),
                generations: AtomicU32::new(0),
            }),
        })
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configured before any attachment exists")
    }

    /// Names grid namespaces `<prefix><n>` (default: see
    /// [`default_netns_prefix`]).
    pub fn netns_prefix(mut self, prefix: &str) -> HostNet {
        self.inner_mut().netns_prefix = prefix.to_owned();
        self
    }

    /// Where named namespaces are entered from (default `/run/netns`,
    /// iproute2's; tests point elsewhere).
    pub fn netns_dir(mut self, dir: impl Into<PathBuf>) -> HostNet {
        self.inner_mut().netns_dir = dir.into();
        self
    }

    /// Also enables IPv4 forwarding on these interfaces (the tunnel's TUN
    /// device: traffic from other slices comes in there).
    pub fn forward_from(mut self, interfaces: &[&str]) -> HostNet {
        self.inner_mut().forward_from = interfaces.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn bridge(&self) -> &str {
        &self.inner.bridge
    }

    /// The applied lease, if any.
    pub fn lease(&self) -> Option<Lease> {
        self.inner.lock().as_ref().map(|a| a.lease)
    }

    /// Applies the controller's lease (see the module docs for the order).
    /// Returns false, doing nothing, when it is the lease already applied.
    /// On an error the host may be half set up; applying again retries.
    pub fn apply_lease(&self, l: &OverlayLease) -> Result<bool, OverlayError> {
        let lease = Lease::parse(l)?;
        let inner = &self.inner;
        let mut st = inner.lock();
        if st.as_ref().map(|a| a.lease) == Some(lease) {
            return Ok(false);
        }
        let ops = &inner.ops;
        let br = inner.bridge.as_str();
        let rules = ruleset::ruleset(br, &lease, &inner.allow);
        ops.run(&["nft", "-f", "-"], Some(&rules))?;
        if ops.run(&["ip", "link", "show", "dev", br], None).is_err() {
            ops.run(&["ip", "link", "add", "name", br, "type", "bridge"], None)?;
        }
        // No IPv6 on the grid: no link-local address, no neighbour discovery.
        ops.sysctl(&format!("net/ipv6/conf/{br}/disable_ipv6"), "1")?;
        let mtu = inner.mtu.to_string();
        ops.run(&["ip", "link", "set", "dev", br, "mtu", &mtu], None)?;
        ops.run(&["ip", "-4", "addr", "flush", "dev", br], None)?;
        ops.run(&["ip", "addr", "add", &lease.host_cidr(), "dev", br], None)?;
        ops.run(&["ip", "link", "set", "dev", br, "up"], None)?;
        let mut forward: Vec<String> = std::iter::once(br.to_owned())
            .chain(inner.forward_from.iter().cloned())
            .collect();
        for net in &inner.allow {
            // Replies from an allowed network come in where it is routed.
            match route_dev(ops.as_ref(), net) {
                Some(dev) if !forward.contains(&dev) => forward.push(dev),
                Some(_) => {}
                None => tracing::warn!(
                    "overlay.allow {net}: no route to it now; grid traffic to it cannot return"
                ),
            }
        }
        for dev in &forward {
            ops.sysctl(&format!("net/ipv4/conf/{dev}/forwarding"), "1")?;
        }
        let generation = u64::from(inner.generations.fetch_add(1, Ordering::Relaxed)) + 1;
        if let Some(old) = st.as_ref() {
            tracing::warn!(
                "overlay slice changed from {} to {}: grid guests started before keep their \
                 old addresses, which the filter now drops",
                old.lease.slice,
                lease.slice
            );
        }
        *st = Some(Applied {
            lease,
            addrs: SliceAddrs::new(lease.slice),
            generation,
        });
        tracing::info!(
            "overlay: bridge {br} with {} (slice {} of {}), grid filtered by nft table inet {}",
            lease.host_cidr(),
            lease.slice,
            lease.cidr,
            ruleset::TABLE
        );
        Ok(true)
    }

    /// Removes the nft table and the bridge (what [`HostNet::apply_lease`]
    /// made); both already gone is fine. Grid namespaces still attached
    /// lose their network (their own teardown still runs).
    pub fn teardown(&self) -> Result<(), OverlayError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        let had = st.take().is_some();
        let table = inner
            .ops
            .run(&["nft", "delete", "table", "inet", ruleset::TABLE], None);
        let bridge = inner
            .ops
            .run(&["ip", "link", "del", "dev", &inner.bridge], None);
        if had {
            tracing::info!("overlay: bridge {} and its filtering removed", inner.bridge);
        }
        // Missing already (never applied, or removed by hand) is no error.
        let missing = |e: &OverlayError| {
            matches!(e, OverlayError::Command { message, .. }
                if message.contains("No such file") || message.contains("Cannot find device")
                    || message.contains("does not exist"))
        };
        match (table, bridge) {
            (Err(e), _) if !missing(&e) => Err(e),
            (_, Err(e)) if !missing(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// The nft drop counters of the table (empty when it is not loaded).
    pub fn counters(&self) -> Result<BTreeMap<String, Count>, OverlayError> {
        let argv = [
            "nft",
            "-j",
            "list",
            "counters",
            "table",
            "inet",
            ruleset::TABLE,
        ];
        let json = self.inner.ops.run(&argv, None)?;
        ruleset::parse_counters(&json).ok_or_else(|| OverlayError::Command {
            command: argv.join(" "),
            message: "output is not nft's JSON".into(),
        })
    }

    /// The bridge, the slice, guests and drop counters.
    pub fn status(&self) -> OverlayStatus {
        let mut s = OverlayStatus {
            bridge: self.inner.bridge.clone(),
            ..Default::default()
        };
        if let Some(a) = self.inner.lock().as_ref() {
            s.slice = Some(a.lease.slice.to_string());
            s.address = Some(a.lease.host_cidr());
            s.guests = a.addrs.in_use();
            s.capacity = a.addrs.capacity();
        } else {
            return s;
        }
        match self.counters() {
            Ok(c) => s.dropped = c,
            Err(e) => tracing::debug!("overlay status: {e}"),
        }
        s
    }

    /// A fresh grid namespace for subtask `label` (see [`attach`]).
    pub fn attach_namespace(&self, label: &str) -> Result<Attachment, OverlayError> {
        attach::namespace(&self.inner, label)
    }

    /// A guest address for a grid VM's NIC (see [`attach`]).
    pub fn attach_vm(&self) -> Result<VmNic, OverlayError> {
        attach::vm_nic(&self.inner)
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        if self.inner.lock().is_some() {
            if let Err(e) = self.teardown() {
                tracing::warn!("overlay teardown: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
