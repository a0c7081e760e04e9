//! The grid policy: one state machine per grid VM
//! (Absent → Launching → Running ⇄ Suspended → Reclaimed) plus the host-wide
//! timers that gate resuming and launching.
//!
//! With `reclaim_mode = "save"` a VM suspended longer than `reclaim_after`
//! is saved to disk (Suspended → Saved, [`Action::Save`]) instead of
//! destroyed: it keeps its subtask and holds no CPU or memory. Once the host
//! has been calm for `resume_after` (the resume rule) and the VM fits the
//! budgets again, it is restored (Saved → Launching, [`Action::Restore`])
//! and becomes Running when its guest answers, like a fresh launch. No new
//! VM launches while one is saved: the saved work comes first. A drain
//! destroys saved VMs; a shutdown leaves them saved (the next start
//! restores them).
//!
//! With `reclaim_mode = "migrate"` the VM is saved the same way and is also
//! a candidate to move to an idle host ([`crate::migrate`]): while a move is
//! in flight ([`Policy::set_migrating`]) it is not restored here; once it
//! arrived elsewhere it leaves (Saved → Reclaimed, reason `migrated`,
//! [`Policy::migrated_out`]). On the receiving host
//! [`Policy::check_incoming`] decides whether one more VM fits now and
//! [`Policy::arrive`] tracks it (Absent → Launching, reason `migrated`)
//! until its guest answers.
//!
//! [`Policy`] does no I/O and reads no clock: every call takes the time as a
//! [`Duration`] since an arbitrary origin, and returns [`Decision`]s for the
//! daemon to carry out. The same (state, observation, time) always gives the
//! same decisions, so table-driven tests drive it through flapping loads,
//! spikes and memory emergencies.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sparegrid_proto::{Metric, Reason, VmState};

use crate::config::{PolicySection, ReclaimMode, VmTemplate};

/// The policy's thresholds and budgets, from `[policy]` and `[vm]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub policy: PolicySection,
    pub vm_vcpus: u32,
    pub vm_memory_mib: u64,
    /// New VMs are named `<prefix><n>`.
    pub name_prefix: String,
}

impl PolicyConfig {
    pub fn new(policy: &PolicySection, vm: &VmTemplate, name_prefix: &str) -> PolicyConfig {
        PolicyConfig {
            policy: policy.clone(),
            vm_vcpus: vm.vcpus,
            vm_memory_mib: vm.memory_mib,
            name_prefix: name_prefix.to_string(),
        }
    }
}

/// What the policy sees at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub now: Duration,
    /// Smoothed composite load factor, 0..1 (resume and launch use it).
    pub load: f64,
    /// The load with the CPU's short pre-sample window, 0..1; suspend uses
    /// the larger of this and `load` (see `LoadBreakdown::peak`).
    pub peak: f64,
    /// The metric that dominates the load factor.
    pub dominant: Option<Metric>,
    pub mem_available_bytes: u64,
}

/// What the daemon must do to carry out a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Launch,
    Suspend,
    Resume,
    /// Destroy the VM and hand its subtask back.
    Destroy,
    /// Save the VM's state to disk and stop it (shutdown with a runtime
    /// that can save, or `reclaim_mode = "save"`).
    Save,
    /// Start a saved VM again from its saved state.
    Restore,
    /// Nothing to do: the runtime already did it (started, exited).
    Record,
}

/// One transition of one VM, with the action that carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vm: String,
    pub from: VmState,
    pub to: VmState,
    pub reason: Reason,
    pub action: Action,
}

/// One grid VM as the policy tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSlot {
    pub name: String,
    pub state: VmState,
    /// When it entered `state`.
    pub since: Duration,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Host-wide state plus every live grid VM (reclaimed ones are dropped).
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    vms: BTreeMap<String, VmSlot>,
    /// Load has been below `resume_below` since then.
    calm_since: Option<Duration>,
    /// Load has been below `launch_below` since then (reset by each launch).
    spare_since: Option<Duration>,
    /// Set by [`Policy::drain`]: reclaim everything, launch nothing.
    draining: Option<Reason>,
    next_id: u64,
    /// Saved VMs whose move to another host is in flight: not restored here.
    migrating: BTreeSet<String>,
    /// The last observation [`Policy::evaluate`] saw (for incoming VMs).
    last_obs: Option<Observation>,
}

const MIB: u64 = 1024 * 1024;

/// The reason a load above `suspend_above` gives, from the dominant metric.
pub fn pressure_reason(dominant: Option<Metric>) -> Reason {
    match dominant {
        Some(Metric::Cpu | Metric::LoadAvg | Metric::PsiCpu) | None => Reason::CpuPressure,
        Some(Metric::Memory | Metric::PsiMemory) => Reason::MemoryPressure,
        Some(Metric::Network) => Reason::NetworkPressure,
        Some(Metric::Disk | Metric::PsiIo) => Reason::DiskPressure,
        Some(Metric::Rtt) => Reason::Latency,
    }
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            vms: BTreeMap::new(),
            calm_since: None,
            spare_since: None,
            draining: None,
            next_id: 1,
            migrating: BTreeSet::new(),
            last_obs: None,
        }
    }

    /// New thresholds (SIGHUP). VMs and timers are kept.
    pub fn reconfigure(&mut self, cfg: PolicyConfig) {
        self.cfg = cfg;
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn vms(&self) -> impl Iterator<Item = &VmSlot> {
        self.vms.values()
    }

    pub fn vm(&self, name: &str) -> Option<&VmSlot> {
        self.vms.get(name)
    }

    pub fn draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Takes over a VM found at start-up (reconciliation). Returns the
    /// Absent → `state` transition to record.
    pub fn adopt(&mut self, slot: VmSlot) -> Decision {
        if let Some(n) = slot
            .name
            .strip_prefix(&self.cfg.name_prefix)
            .and_then(|s| s.parse::<u64>().ok())
        {
            self.next_id = self.next_id.max(n + 1);
        }
        let d = Decision {
            vm: slot.name.clone(),
            from: VmState::Absent,
            to: slot.state,
            reason: Reason::Adopted,
            action: Action::Record,
        };
        self.vms.insert(slot.name.clone(), slot);
        d
    }

    /// Stop launching and reclaim every VM on the next [`Policy::evaluate`].
    /// `reason` is `Drain` (operator) or `Shutdown` (SIGTERM; VMs are saved
    /// when `can_save`, see [`Policy::evaluate`]).
    pub fn drain(&mut self, reason: Reason) {
        self.draining = Some(reason);
    }

    /// Accept new work again after a drain.
    pub fn undrain(&mut self) {
        self.draining = None;
        self.spare_since = None;
    }

    fn transition(
        &mut self,
        name: &str,
        to: VmState,
        reason: Reason,
        action: Action,
        now: Duration,
    ) -> Decision {
        let slot = self.vms.get_mut(name).expect("transition of a tracked VM");
        let d = Decision {
            vm: name.to_string(),
            from: slot.state,
            to,
            reason,
            action,
        };
        if to == VmState::Reclaimed {
            self.vms.remove(name);
        } else {
            slot.state = to;
            slot.since = now;
        }
        d
    }

    fn names_in(&self, state: VmState) -> Vec<String> {
        self.vms
            .values()
            .filter(|v| v.state == state)
            .map(|v| v.name.clone())
            .collect()
    }

    /// The runtime has finished carrying out the VM's last transition (a
    /// suspend or resume): its time in the new state counts from `now`, so
    /// `reclaim_after` measures time actually paused.
    pub fn confirm(&mut self, name: &str, now: Duration) {
        if let Some(slot) = self.vms.get_mut(name) {
            slot.since = now;
        }
    }

    /// The runtime has started a launching VM.
    pub fn on_started(&mut self, name: &str, now: Duration) -> Option<Decision> {
        match self.vms.get(name)?.state {
            VmState::Launching => {
                Some(self.transition(name, VmState::Running, Reason::Started, Action::Record, now))
            }
            _ => None,
        }
    }

    /// The runtime failed to carry out an action on a VM: reclaim it.
    pub fn on_runtime_error(&mut self, name: &str, now: Duration) -> Option<Decision> {
        self.vms.get(name)?;
        Some(self.transition(
            name,
            VmState::Reclaimed,
            Reason::RuntimeError,
            Action::Destroy,
            now,
        ))
    }

    /// The VM went away on its own.
    pub fn on_exited(&mut self, name: &str, now: Duration) -> Option<Decision> {
        self.vms.get(name)?;
        Some(self.transition(
            name,
            VmState::Reclaimed,
            Reason::Exited,
            Action::Destroy,
            now,
        ))
    }

    /// One policy step. `can_save` says whether the runtime can save VM state
    /// (used when shutting down, and by `reclaim_mode = "save"`).
    pub fn evaluate(&mut self, obs: &Observation, can_save: bool) -> Vec<Decision> {
        let now = obs.now;
        let p = self.cfg.policy.clone();
        let mut out = Vec::new();
        self.last_obs = Some(*obs);

        // Drain or shutdown: everything goes, nothing starts.
        if let Some(reason) = self.draining {
            let names: Vec<String> = self.vms.keys().cloned().collect();
            for name in names {
                let state = self.vms[&name].state;
                if state == VmState::Saved && reason == Reason::Shutdown {
                    // Already on disk; the next start restores it.
                    continue;
                }
                let action = if reason == Reason::Shutdown
                    && can_save
                    && matches!(state, VmState::Running | VmState::Suspended)
                {
                    Action::Save
                } else {
                    Action::Destroy
                };
                out.push(self.transition(&name, VmState::Reclaimed, reason, action, now));
            }
            self.calm_since = None;
            self.spare_since = None;
            return out;
        }

        // Memory emergency: a paused VM still holds its memory, so reclaim
        // until the estimated freed memory covers the deficit. Suspended VMs
        // go first (longest suspended first), then the newest others.
        let reserve = p.memory_reserve_mib * MIB;
        if obs.mem_available_bytes < reserve {
            let mut deficit = reserve - obs.mem_available_bytes;
            let mut victims: Vec<&VmSlot> = self
                .vms
                .values()
                .filter(|v| v.state != VmState::Saved)
                .collect();
            victims.sort_by_key(|v| {
                (
                    v.state != VmState::Suspended,
                    if v.state == VmState::Suspended {
                        v.since
                    } else {
                        Duration::MAX - v.since
                    },
                )
            });
            let victims: Vec<String> = victims.into_iter().map(|v| v.name.clone()).collect();
            for name in victims {
                if deficit == 0 {
                    break;
                }
                let mem = self.vms[&name].memory_mib * MIB;
                deficit = deficit.saturating_sub(mem);
                out.push(self.transition(
                    &name,
                    VmState::Reclaimed,
                    Reason::MemoryReserve,
                    Action::Destroy,
                    now,
                ));
            }
            self.calm_since = None;
            self.spare_since = None;
        }

        // Pressure: suspend every running VM at once.
        if obs.load.max(obs.peak) > p.suspend_above {
            // Above only through the CPU window: the CPU is what rose.
            let reason = if obs.load > p.suspend_above {
                pressure_reason(obs.dominant)
            } else {
                Reason::CpuPressure
            };
            for name in self.names_in(VmState::Running) {
                out.push(self.transition(&name, VmState::Suspended, reason, Action::Suspend, now));
            }
            self.calm_since = None;
            self.spare_since = None;
        } else if obs.mem_available_bytes >= reserve {
            if obs.load < p.resume_below {
                self.calm_since.get_or_insert(now);
            } else {
                self.calm_since = None;
            }
            // Spare capacity counts only while nothing is suspended: a
            // suspended VM means the host was busy recently.
            if obs.load < p.launch_below && self.names_in(VmState::Suspended).is_empty() {
                self.spare_since.get_or_insert(now);
            } else {
                self.spare_since = None;
            }
        }

        // Calm long enough: resume.
        if self
            .calm_since
            .is_some_and(|t| now.saturating_sub(t) >= p.resume_after)
        {
            let suspended = self.names_in(VmState::Suspended);
            if !suspended.is_empty() {
                // Launching more waits for another `launch_after` from here.
                self.spare_since = Some(now);
            }
            for name in suspended {
                out.push(self.transition(
                    &name,
                    VmState::Running,
                    Reason::Idle,
                    Action::Resume,
                    now,
                ));
            }
        }

        // Calm long enough: restore saved VMs that fit the budgets again.
        if self
            .calm_since
            .is_some_and(|t| now.saturating_sub(t) >= p.resume_after)
        {
            for name in self.names_in(VmState::Saved) {
                if self.migrating.contains(&name) {
                    continue;
                }
                if !self.fits_budget_without(&name, obs.mem_available_bytes) {
                    break;
                }
                self.spare_since = Some(now);
                out.push(self.transition(
                    &name,
                    VmState::Launching,
                    Reason::Idle,
                    Action::Restore,
                    now,
                ));
            }
        }

        // Suspended too long, or stuck launching: reclaim (or save).
        for name in self.names_in(VmState::Suspended) {
            if now.saturating_sub(self.vms[&name].since) >= p.reclaim_after {
                let (to, action) = match p.reclaim_mode {
                    ReclaimMode::Save | ReclaimMode::Migrate if can_save => {
                        (VmState::Saved, Action::Save)
                    }
                    _ => (VmState::Reclaimed, Action::Destroy),
                };
                out.push(self.transition(&name, to, Reason::SuspendedTooLong, action, now));
            }
        }
        for name in self.names_in(VmState::Launching) {
            if now.saturating_sub(self.vms[&name].since) >= p.boot_timeout {
                out.push(self.transition(
                    &name,
                    VmState::Reclaimed,
                    Reason::BootTimeout,
                    Action::Destroy,
                    now,
                ));
            }
        }

        // Spare capacity long enough, and room in every budget: launch one more.
        if self
            .spare_since
            .is_some_and(|t| now.saturating_sub(t) >= p.launch_after)
            && self.names_in(VmState::Suspended).is_empty()
            && self.names_in(VmState::Launching).is_empty()
            && self.names_in(VmState::Saved).is_empty()
            && self.fits_budget(obs.mem_available_bytes)
        {
            let name = format!("{}{}", self.cfg.name_prefix, self.next_id);
            self.next_id += 1;
            self.vms.insert(
                name.clone(),
                VmSlot {
                    name: name.clone(),
                    state: VmState::Absent,
                    since: now,
                    vcpus: self.cfg.vm_vcpus,
                    memory_mib: self.cfg.vm_memory_mib,
                },
            );
            out.push(self.transition(
                &name,
                VmState::Launching,
                Reason::SpareCapacity,
                Action::Launch,
                now,
            ));
            // The next launch needs another `launch_after` of spare capacity.
            self.spare_since = Some(now);
        }
        out
    }

    /// Whether one more VM fits `max_grid_vms`, the memory and vCPU budgets,
    /// and leaves the memory reserve intact.
    fn fits_budget(&self, mem_available_bytes: u64) -> bool {
        let count = self.vms.len() as u64;
        count < u64::from(self.cfg.policy.max_grid_vms)
            && self.fits_resources(
                self.cfg.vm_memory_mib,
                self.cfg.vm_vcpus,
                mem_available_bytes,
            )
    }

    /// Whether saved VM `name` fits the memory and vCPU budgets and the
    /// reserve once restored (saved VMs hold neither).
    fn fits_budget_without(&self, name: &str, mem_available_bytes: u64) -> bool {
        let v = &self.vms[name];
        self.fits_resources(v.memory_mib, v.vcpus, mem_available_bytes)
    }

    /// Whether one more VM of this size fits beside the VMs that hold
    /// memory and vCPUs now (every one but the saved).
    fn fits_resources(&self, memory_mib: u64, vcpus: u32, mem_available_bytes: u64) -> bool {
        let p = &self.cfg.policy;
        let live = self.vms.values().filter(|v| v.state != VmState::Saved);
        let (mem, cpus) = live.fold((0u64, 0u64), |(m, c), v| {
            (m + v.memory_mib, c + u64::from(v.vcpus))
        });
        mem + memory_mib <= p.memory_budget_mib
            && cpus + u64::from(vcpus) <= u64::from(p.vcpu_budget)
            && mem_available_bytes >= (p.memory_reserve_mib + memory_mib) * MIB
    }

    /// Marks saved VM `name` as moving to another host (`true`: not
    /// restored here meanwhile) or no longer (`false`: the move failed, it
    /// stays saved here as with `reclaim_mode = "save"`).
    pub fn set_migrating(&mut self, name: &str, on: bool) {
        if on {
            self.migrating.insert(name.to_owned());
        } else {
            self.migrating.remove(name);
        }
    }

    /// Saved VMs whose move is not in flight, oldest saved first: the
    /// candidates for `reclaim_mode = "migrate"`.
    pub fn saved_not_migrating(&self) -> Vec<String> {
        let mut v: Vec<&VmSlot> = self
            .vms
            .values()
            .filter(|v| v.state == VmState::Saved && !self.migrating.contains(&v.name))
            .collect();
        v.sort_by_key(|v| v.since);
        v.into_iter().map(|v| v.name.clone()).collect()
    }

    /// Saved VM `name` arrived on another host: it leaves this one (its
    /// saved state was dropped by the caller).
    pub fn migrated_out(&mut self, name: &str, now: Duration) -> Option<Decision> {
        if self.vms.get(name)?.state != VmState::Saved {
            return None;
        }
        self.migrating.remove(name);
        Some(self.transition(
            name,
            VmState::Reclaimed,
            Reason::Migrated,
            Action::Record,
            now,
        ))
    }

    /// Whether a VM of this size arriving from another host fits now: not
    /// draining, no VM of that name, nothing suspended, saved or launching
    /// (a busy host is no idle host), the last load below `launch_below`
    /// (and its peak not above `suspend_above`), and room in
    /// `max_grid_vms`, the budgets and the memory reserve. `Err` says why
    /// not.
    pub fn check_incoming(&self, name: &str, vcpus: u32, memory_mib: u64) -> Result<(), String> {
        let p = &self.cfg.policy;
        if let Some(r) = self.draining {
            return Err(format!("the host is draining ({r})"));
        }
        if self.vms.contains_key(name) {
            return Err(format!("a grid VM named {name} is already here"));
        }
        for state in [VmState::Suspended, VmState::Saved, VmState::Launching] {
            if !self.names_in(state).is_empty() {
                return Err(format!("a grid VM here is {state}"));
            }
        }
        let Some(obs) = self.last_obs else {
            return Err("no load sample yet".to_owned());
        };
        if obs.load >= p.launch_below || obs.peak > p.suspend_above {
            return Err(format!(
                "load {:.2} is not below policy.launch_below ({})",
                obs.load.max(obs.peak),
                p.launch_below
            ));
        }
        if self.vms.len() as u64 >= u64::from(p.max_grid_vms) {
            return Err(format!("policy.max_grid_vms ({}) reached", p.max_grid_vms));
        }
        if !self.fits_resources(memory_mib, vcpus, obs.mem_available_bytes) {
            return Err(format!(
                "{vcpus} vCPU and {memory_mib} MiB do not fit the vCPU or memory budget or the memory reserve"
            ));
        }
        Ok(())
    }

    /// Tracks a VM restored from another host's saved state: Launching
    /// until its guest answers ([`Policy::on_started`]), like a restore
    /// here. The next launch waits another `launch_after`.
    pub fn arrive(&mut self, name: &str, vcpus: u32, memory_mib: u64, now: Duration) -> Decision {
        self.vms.insert(
            name.to_owned(),
            VmSlot {
                name: name.to_owned(),
                state: VmState::Absent,
                since: now,
                vcpus,
                memory_mib,
            },
        );
        self.spare_since = Some(now);
        self.transition(
            name,
            VmState::Launching,
            Reason::Migrated,
            Action::Record,
            now,
        )
    }

    /// The guest channel failed on a VM: reclaim it (its subtask has
    /// already been handed back).
    pub fn on_guest_failure(&mut self, name: &str, now: Duration) -> Option<Decision> {
        match self.vms.get(name)?.state {
            VmState::Saved => None,
            _ => Some(self.transition(
                name,
                VmState::Reclaimed,
                Reason::GuestFailure,
                Action::Destroy,
                now,
            )),
        }
    }
}
