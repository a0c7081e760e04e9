//! One grid guest on the bridge: an [`Attachment`] is a fresh network
//! namespace for a process-runtime subtask, a [`VmNic`] is a grid VM's
//! address (libvirt makes its tap on the bridge). Both hold a guest
//! address of the slice and give it back on drop.
//!
//! A grid namespace is a named namespace (`ip netns add <prefix><n>`, so
//! it can be entered by path before exec) with a veth: `sgv<n>` on the
//! bridge, `eth0` inside with the guest address, the slice's prefix, the
//! overlay MTU and a default route via the host's slice address. Dropping
//! the attachment deletes the veth (both ends) and the namespace's name;
//! the namespace itself goes when its last process has. A leftover of an
//! earlier agent under the same name is removed first.
//!
//! The namespace places a subtask on the grid network; it is not a
//! security boundary for a subtask running as root on the host, which
//! could enter another namespace. Grid VMs are the isolated runtime.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Inner, OverlayError};

/// A grid namespace with a veth on the bridge, for one subtask.
pub struct Attachment {
    inner: Arc<Inner>,
    generation: u64,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    netns: String,
    host_if: String,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("netns", &self.netns)
            .field("address", &self.address)
            .field("host_if", &self.host_if)
            .finish()
    }
}

pub(super) fn namespace(inner: &Arc<Inner>, label: &str) -> Result<Attachment, OverlayError> {
    let (address, prefix, gateway, generation) = inner.take_address()?;
    let n = inner.next_seq();
    let att = Attachment {
        inner: Arc::clone(inner),
        generation,
        address,
        prefix,
        gateway,
        netns: format!("{}{n}", inner.netns_prefix),
        host_if: format!("sgv{n}"),
    };
    // Leftovers of an earlier agent under these names (absent: fine).
    att.remove();
    // On an error, dropping `att` removes what was made and frees the address.
    att.setup()?;
    tracing::debug!(subtask = label, netns = %att.netns, address = %att.address,
        "grid namespace attached to {}", inner.bridge);
    Ok(att)
}

impl Attachment {
    fn setup(&self) -> Result<(), OverlayError> {
        let ops = &self.inner.ops;
        let ns = self.netns.as_str();
        let mtu = self.inner.mtu;
        ops.run(&["ip", "netns", "add", ns], None)?;
        let host = format!(
            "link add name {hif} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {ns}\n\
             link set dev {hif} master {br}\n\
             link set dev {hif} up\n",
            hif = self.host_if,
            br = self.inner.bridge,
        );
        ops.run(&["ip", "-batch", "-"], Some(&host))?;
        let inside = format!(
            "link set dev lo up\n\
             addr add {addr}/{prefix} dev eth0\n\
             link set dev eth0 up\n\
             route add default via {gw} dev eth0\n",
            addr = self.address,
            prefix = self.prefix,
            gw = self.gateway,
        );
        ops.run(&["ip", "-n", ns, "-batch", "-"], Some(&inside))?;
        Ok(())
    }

    /// Deletes the veth and the namespace's name; what is absent is skipped.
    fn remove(&self) {
        let ops = &self.inner.ops;
        let _ = ops.run(&["ip", "link", "del", "dev", &self.host_if], None);
        let _ = ops.run(&["ip", "netns", "del", &self.netns], None);
    }

    /// The guest's address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// `address/prefix`, e.g. `100.96.3.2/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix)
    }

    /// The default route's gateway: the host's slice address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The namespace's name (`ip netns`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host end of the veth (on the bridge).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace's file, to enter with `setns`.
    pub fn netns_path(&self) -> PathBuf {
        self.inner.netns_dir.join(&self.netns)
    }

    /// Opens the namespace (close-on-exec) for `setns(fd, CLONE_NEWNET)`.
    pub fn open_netns(&self) -> std::io::Result<File> {
        File::open(self.netns_path())
    }

    /// Environment telling the subtask its overlay address.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("SPAREGRID_OVERLAY_ADDRESS", self.cidr()),
            ("SPAREGRID_OVERLAY_GATEWAY", self.gateway.to_string()),
        ]
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.remove();
        self.inner.release(self.address, self.generation);
    }
}

/// A grid VM's place on the bridge: its guest address. The VM's NIC is a
/// libvirt `<interface type='bridge'>` on [`VmNic::bridge`]; the guest
/// configures the address itself. Dropping it gives the address back.
pub struct VmNic {
    inner: Arc<Inner>,
    generation: u64,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
}

pub(super) fn vm_nic(inner: &Arc<Inner>) -> Result<VmNic, OverlayError> {
    let (address, prefix, gateway, generation) = inner.take_address()?;
    Ok(VmNic {
        inner: Arc::clone(inner),
        generation,
        address,
        prefix,
        gateway,
    })
}

impl VmNic {
    pub fn bridge(&self) -> &str {
        &self.inner.bridge
    }

    pub fn mtu(&self) -> u32 {
        self.inner.mtu
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// `address/prefix`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The NIC's MAC: QEMU's prefix `52:54:00` and the address's last three
    /// bytes, so it is unique on the bridge (addresses are) and the guest
    /// can find the NIC by it.
    pub fn mac(&self) -> String {
        let o = self.address.octets();
        format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
    }

    /// What the guest worker configures the NIC from (the subtask's env;
    /// the first two are what a process-runtime subtask gets too).
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            ("SPAREGRID_OVERLAY_ADDRESS", self.cidr()),
            ("SPAREGRID_OVERLAY_GATEWAY", self.gateway.to_string()),
            ("SPAREGRID_OVERLAY_MAC", self.mac()),
            ("SPAREGRID_OVERLAY_MTU", self.mtu().to_string()),
        ]
    }
}

impl std::fmt::Debug for VmNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmNic")
            .field("bridge", &self.inner.bridge)
            .field("address", &self.address)
            .finish()
    }
}

impl Drop for VmNic {
    fn drop(&mut self) {
        self.inner.release(self.address, self.generation);
    }
}
