//! Lifting the grid partition to a normal CPU weight while a grid VM obeys a
//! control request. libvirt's suspend, save and destroy need QEMU itself to
//! run (a monitor command, a migration to file, a SIGTERM handler); at the
//! lowest weight under a busy customer that can take seconds. Holding a
//! [`BoostGuard`] for the length of the call cuts it to milliseconds, and a
//! paused VM uses no CPU afterwards. Nested holds (control loop and worker at
//! once) are counted, so the weight drops only when the last one ends.

use std::sync::{Arc, Mutex};

use crate::cgroup::GridCgroup;

pub struct Booster {
    cgroup: Arc<GridCgroup>,
    holders: Mutex<u32>,
}

/// While alive, the partition runs at a normal CPU weight.
pub struct BoostGuard {
    booster: Arc<Booster>,
}

impl Booster {
    pub fn new(cgroup: Arc<GridCgroup>) -> Arc<Booster> {
        Arc::new(Booster {
            cgroup,
            holders: Mutex::new(0),
        })
    }

    pub fn hold(self: &Arc<Self>) -> BoostGuard {
        let mut n = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            if let Err(e) = self.cgroup.as_partition().set_boost(true) {
                tracing::warn!("cannot lift the grid partition's CPU weight: {e}");
            }
        }
        *n += 1;
        BoostGuard {
            booster: self.clone(),
        }
    }
}

impl Drop for BoostGuard {
    fn drop(&mut self) {
        let mut n = self
            .booster
            .holders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            if let Err(e) = self.booster.cgroup.as_partition().set_boost(false) {
                tracing::error!("cannot put the grid partition back to the lowest CPU weight: {e}");
            }
        }
    }
}
