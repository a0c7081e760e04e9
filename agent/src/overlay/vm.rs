//! Grid VMs on the overlay: the NIC a grid VM gets while it runs a
//! `network = "overlay"` subtask. Grid VMs are launched without a NIC; the
//! runner takes a guest address ([`super::VmNic`]), puts it in the
//! subtask's environment (the guest worker configures the NIC from it, see
//! `agent/guest/src/net.rs`), sends the subtask to an idle VM and then
//! hot-plugs the NIC into that VM through [`NicPlug`]; when the subtask
//! ends the NIC is unplugged and the address given back. So a VM has a
//! network only while a job that asked for one runs in it, and a network =
//! none subtask never shares a VM with a NIC (one subtask per VM).
//!
//! Hot-plug rather than a NIC at launch: idle VMs are launched before
//! anyone knows which job they will run, and a NIC present all the time
//! would put every job on the grid network. The guest waits for the NIC
//! (found by its MAC) for a few seconds, so sending the subtask first and
//! plugging right after is fine.
//!
//! [`LibvirtNics`] plugs with libvirt (`virDomainAttachDeviceFlags`, live
//! only: the VM's persistent definition never has a NIC), a connection per
//! call (plugs are rare next to a subtask's run; the runtime's own
//! connection belongs to the control loop's thread).

use super::{OverlayError, VmNic};

/// Hot-plugs and unplugs grid VMs' overlay NICs.
pub trait NicPlug: Send + Sync {
    /// Adds `nic` to running VM `vm`.
    fn plug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError>;
    /// Removes it again (a VM already gone is fine).
    fn unplug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError>;
}

/// The NIC as a libvirt device: virtio, on the grid bridge, its MAC and the
/// overlay MTU.
pub fn nic_xml(nic: &VmNic) -> String {
    // Bridge names are checked (`valid_ifname`) and MACs are hex: nothing
    // to escape.
    format!(
        "<interface type='bridge'>\n  <mac address='{}'/>\n  <source bridge='{}'/>\n  \
         <model type='virtio'/>\n  <mtu size='{}'/>\n</interface>\n",
        nic.mac(),
        nic.bridge(),
        nic.mtu()
    )
}

/// [`NicPlug`] through libvirt at `uri`.
#[cfg(feature = "libvirt")]
#[derive(Debug, Clone)]
pub struct LibvirtNics {
    uri: String,
}

#[cfg(feature = "libvirt")]
impl LibvirtNics {
    pub fn new(uri: &str) -> LibvirtNics {
        LibvirtNics {
            uri: uri.to_owned(),
        }
    }

    fn with_domain(
        &self,
        vm: &str,
        what: &str,
        f: impl FnOnce(&virt::domain::Domain) -> Result<(), virt::error::Error>,
    ) -> Result<(), OverlayError> {
        let failed = |e: virt::error::Error| OverlayError::Command {
            command: format!("libvirt {what} on {vm} ({})", self.uri),
            message: e.message().to_string(),
        };
        // Closed on drop.
        let conn = virt::connect::Connect::open(Some(&self.uri)).map_err(failed)?;
        conn.lookup_domain_by_name(vm)
            .and_then(|d| f(&d))
            .map_err(failed)
    }
}

#[cfg(feature = "libvirt")]
impl NicPlug for LibvirtNics {
    fn plug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
        let xml = nic_xml(nic);
        self.with_domain(vm, "attach overlay NIC", |d| {
            d.attach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
        })
    }

    fn unplug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
        let xml = nic_xml(nic);
        let res = self.with_domain(vm, "detach overlay NIC", |d| {
            d.detach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
        });
        match res {
            // The VM is gone (reclaimed, destroyed): so is its NIC.
            Err(OverlayError::Command { message, .. })
                if message.contains("Domain not found") || message.contains("not running") =>
            {
                Ok(())
            }
            other => other,
        }
    }
}
