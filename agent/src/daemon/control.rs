//! The control loop: one dedicated thread that samples, evaluates the policy
//! and carries out its decisions through the runtime. All blocking runtime
//! calls (libvirt included) happen here, never on the async runtime.
//!
//! Each tick: grid usage (runtime stats + grid cgroup) → sampler → load
//! model → policy → runtime actions → a saved VM's move started
//! (`reclaim_mode = "migrate"`, [`crate::migrate`]) → transitions logged,
//! counted and kept → status published → watchdog ping. Commands (drain,
//! reload, shutdown; a move's progress; a VM arriving from another host)
//! arrive on a channel and are handled between ticks.
//!
//! **Guest channel.** When subtasks run inside the VMs ([`GuestPool`], the
//! libvirt runtime), a launched or restored VM stays Launching until its
//! guest worker answers on the channel (then Started), so `boot_timeout`
//! covers the whole boot; a KVM guest that times out makes later launches
//! use TCG. The loop tells the pool what it does to each VM (paused,
//! resumed, saving, reclaimed) and reclaims the VMs whose guest failed
//! (reason GuestFailure); the pool hands their subtasks back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::migrate::IncomingVm;
use sparegrid_proto::{AgentStatus, GridVmStatus, LoadBreakdown, Reason, Transition, VmState};

use crate::cgroup::GridCgroup;
use crate::config::Config;
use crate::grid::runner::Runner;
use crate::guestlink::{GuestPool, HeldSubtask};
use crate::load::LoadModel;
use crate::migrate::outgoing::{self, Outcome, OutgoingVm};
use crate::migrate::MigrateSetup;
use crate::policy::{Action, Decision, Observation, Policy, PolicyConfig, VmSlot};
use crate::runtime::{RunState, Runtime, VmSpec};
use crate::sampler::{GridUsage, Sampler};

use super::boost::Booster;
use super::status::{History, Shared};
use super::systemd::Notifier;
use super::worker::{save_or_destroy, SlowDone, SlowOp, Worker};
use super::DaemonError;

/// What the HTTP server and signal handlers can ask of the control loop.
#[derive(Debug)]
pub enum Command {
    /// Reclaim every grid VM and launch none until `Undrain`.
    Drain,
    Undrain,
    /// Apply a new, already validated config (SIGHUP).
    Reload(Box<Config>),
    /// Drain with reason Shutdown (saving VMs where the runtime can) and stop.
    Shutdown,
    /// A move's target accepted saved VM `vm` (see [`crate::migrate`]):
    /// let go of it here; `reply` says whether it was still here to let go.
    MigrationReady {
        vm: String,
        reply: SyncSender<bool>,
    },
    /// A move of saved VM `vm` (holding `attempt`) ended.
    MigrationOver {
        vm: String,
        attempt: AttemptRef,
        outcome: crate::migrate::outgoing::Outcome,
    },
    /// A saved VM from another host: with `attempt` `None`, only whether
    /// it fits now; with the attempt (under this host's epoch), restore it
    /// from `file` and run its subtask on. `reply` carries why not.
    MigrateIn {
        incoming: Box<IncomingVm>,
        file: PathBuf,
        attempt: Option<AttemptRef>,
        reply: SyncSender<Result<(), String>>,
    },
}

/// What `reclaim_mode = "migrate"` (and taking VMs in) needs in the loop.
pub struct Migration {
    pub setup: Arc<MigrateSetup>,
    /// The grid runner: attempts leave and arrive with their VMs.
    pub runner: Arc<Runner>,
    /// Where the move threads report back.
    pub commands: Sender<Command>,
    /// Whether this host moves its saved VMs away (it may only take them in).
    pub sends: bool,
    /// The saved VM being moved now (one at a time).
    in_flight: Option<String>,
    /// No new move before this (after a failed one).
    retry_at: Option<Instant>,
}

impl Migration {
    pub fn new(
        setup: Arc<MigrateSetup>,
        runner: Arc<Runner>,
        commands: Sender<Command>,
        sends: bool,
    ) -> Migration {
        Migration {
            setup,
            runner,
            commands,
            sends,
            in_flight: None,
            retry_at: None,
        }
    }
}

/// Everything the control loop owns.
pub struct ControlLoop {
    cfg: Config,
    host: String,
    sampler: Sampler,
    load: LoadModel,
    policy: Policy,
    runtime: Box<dyn Runtime>,
    /// Launches, destroys and saves, when the runtime offers a second handle.
    worker: Option<Worker>,
    /// Lifts the partition's CPU weight while a VM obeys suspend/resume.
    booster: Option<Arc<Booster>>,
    can_save: bool,
    cgroup: Option<Arc<GridCgroup>>,
    shared: Arc<Shared>,
    notifier: Notifier,
    origin: Instant,
    history: History,
    last_load: Option<LoadBreakdown>,
    /// Last cumulative CPU time seen per VM, and the grid's monotonic total.
    vm_cpu: BTreeMap<String, u64>,
    grid_cpu_total: u64,
    /// Whether the grid's CPU time comes from the cgroup (see `grid_cpu_ns`).
    grid_cpu_from_cgroup: bool,
    grid_cgroup_cpu: u64,
    last_grid: Option<(Instant, u64)>,
    /// Runs subtasks inside the VMs over their guest channels, if they do.
    pool: Option<Arc<GuestPool>>,
    /// Launch under TCG from now on (a KVM guest did not come up).
    force_tcg: bool,
    /// Moving saved VMs between hosts, when set up.
    migration: Option<Migration>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CPU time this agent process has used, nanoseconds. The agent is grid
/// overhead, not customer load, so it is counted with the grid.
fn own_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The prefix of this host's grid VM names.
pub fn vm_name_prefix(host: &str) -> String {
    format!("sg-{host}-")
}

impl ControlLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        host: String,
        runtime: Box<dyn Runtime>,
        can_save: bool,
        cgroup: Option<Arc<GridCgroup>>,
        shared: Arc<Shared>,
    ) -> Result<ControlLoop, DaemonError> {
        let sampler = Sampler::new(&cfg.sampler, &cfg.agent.proc_root)?;
        let booster = cgroup
            .as_ref()
            .filter(|_| runtime.control_needs_cpu())
            .map(|cg| Booster::new(cg.clone()));
        let worker = match runtime.second_handle().map_err(DaemonError::Runtime)? {
            Some(handle) => Some(Worker::start(handle, booster.clone())?),
            None => None,
        };
        // The process runtime puts every task in each hierarchy of the
        // partition. libvirt does not use cpuacct on every host (here: v1
        // with separate cpu and cpuacct mounts), where the partition's
        // counter stays 0; so libvirt VMs are measured through libvirt.
        let grid_cpu_from_cgroup = runtime.kind() == "process"
            && cgroup
                .as_ref()
                .is_some_and(|cg| cg.as_partition().usage().is_ok());
        let policy = Policy::new(PolicyConfig::new(
            &cfg.policy,
            &cfg.vm,
            &vm_name_prefix(&host),
        ));
        Ok(ControlLoop {
            load: LoadModel::new(cfg.load.clone()),
            history: History::new(cfg.agent.transition_history),
            cfg,
            host,
            sampler,
            policy,
            runtime,
            worker,
            booster,
            can_save,
            cgroup,
            shared,
            notifier: Notifier::from_env(),
            origin: Instant::now(),
            last_load: None,
            vm_cpu: BTreeMap::new(),
            grid_cpu_total: 0,
            grid_cpu_from_cgroup,
            grid_cgroup_cpu: 0,
            last_grid: None,
            pool: None,
            force_tcg: false,
            migration: None,
        })
    }

    /// Run subtasks in the VMs through `pool` (libvirt runtime).
    pub fn with_guest_pool(mut self, pool: Arc<GuestPool>) -> ControlLoop {
        self.pool = Some(pool);
        self
    }

    /// Move saved VMs away (`reclaim_mode = "migrate"`) and take them in.
    pub fn with_migration(mut self, m: Migration) -> ControlLoop {
        self.migration = Some(m);
        self
    }

    /// The pool, when this VM talks over a guest channel.
    fn link(&self, name: &str) -> Option<(&Arc<GuestPool>, std::path::PathBuf)> {
        let pool = self.pool.as_ref()?;
        Some((pool, self.runtime.guest_channel(name)?))
    }

    /// The VM is up at the runtime level: with a guest channel, connect and
    /// wait for its Hello (the tick records Started then); otherwise it is
    /// Started now.
    fn vm_up(&mut self, name: &str) {
        if let Some((pool, socket)) = self.link(name) {
            pool.attach(name, socket);
        } else if let Some(started) = self.policy.on_started(name, self.now()) {
            self.record(&started);
        }
    }

    /// Guest channel news: VMs whose guest answered become Running; VMs
    /// whose guest failed are reclaimed.
    fn collect_guests(&mut self) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        for vm in pool.take_ready() {
            if let Some(started) = self.policy.on_started(&vm, self.now()) {
                self.record(&started);
            }
        }
        for (vm, why) in pool.take_failed() {
            tracing::warn!("grid VM {vm}: guest failed: {why}; reclaiming it");
            if let Some(d) = self.policy.on_guest_failure(&vm, self.now()) {
                self.apply(d);
            }
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs until `Shutdown` (or every sender is gone), then drains.
    pub fn run(mut self, commands: Receiver<Command>) -> Result<(), DaemonError> {
        self.reconcile()?;
        self.tick();
        self.notifier.ready(&format!(
            "sampling every {:?}, {} grid VMs",
            self.cfg.sampler.interval,
            self.policy.vms().count()
        ));
        let mut next_tick = Instant::now() + self.cfg.sampler.interval;
        let mut marked = false;
        loop {
            // Shortly before each tick, mark the CPU counters so the tick
            // also sees a load step that began just before it.
            let interval = self.cfg.sampler.interval;
            let lead = (interval / 4).min(Duration::from_millis(50));
            let mark_at = next_tick.checked_sub(lead).filter(|_| !marked);
            let wake = mark_at.unwrap_or(next_tick);
            match commands.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(cmd) => self.handle(cmd),
                Err(RecvTimeoutError::Timeout) if mark_at.is_some() => {
                    self.mark();
                    marked = true;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    marked = false;
                    next_tick += interval;
                    // After a long stall, don't fire a burst of catch-up ticks.
                    let now = Instant::now();
                    if next_tick < now {
                        next_tick = now + interval;
                    }
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Drain => {
                tracing::info!("drain requested: reclaiming every grid VM");
                self.policy.drain(Reason::Drain);
                self.tick();
            }
            Command::Undrain => {
                tracing::info!("drain lifted: grid VMs may launch again");
                self.policy.undrain();
            }
            Command::Reload(cfg) => self.reload(*cfg),
            Command::Shutdown => {}
            Command::MigrationReady { vm, reply } => {
                let _ = reply.send(self.let_go(&vm));
            }
            Command::MigrationOver {
                vm,
                attempt,
                outcome,
            } => self.migration_over(&vm, attempt, outcome),
            Command::MigrateIn {
                incoming,
                file,
                attempt,
                reply,
            } => {
                let verdict = match attempt {
                    None => self.policy.check_incoming(
                        &incoming.vm,
                        incoming.vcpus,
                        incoming.memory_mib,
                    ),
                    Some(a) => self.take_in(&incoming, &file, a),
                };
                let _ = reply.send(verdict);
            }
        }
    }

    /// Starts moving the oldest saved VM away, when this host sends and no
    /// move is in flight. A VM whose save has not finished yet, that holds
    /// no subtask, or whose subtask cannot move (peer-to-peer, overlay)
    /// stays saved here.
    fn maybe_migrate(&mut self) {
        let Some(m) = &self.migration else {
            return;
        };
        if !m.sends
            || m.in_flight.is_some()
            || m.retry_at.is_some_and(|t| Instant::now() < t)
            || self.policy.draining()
        {
            return;
        }
        let Some(pool) = self.pool.clone() else {
            return;
        };
        for vm in self.policy.saved_not_migrating() {
            let Some(held) = pool.held(&vm) else {
                continue;
            };
            if !m.runner.can_migrate(&held.attempt) {
                continue;
            }
            // Fails while the worker is still saving it: next tick.
            let Ok(state_file) = self.runtime.saved_state(&vm) else {
                continue;
            };
            let Some(slot) = self.policy.vm(&vm) else {
                continue;
            };
            let out = OutgoingVm {
                vm: vm.clone(),
                state_file,
                held,
                vcpus: slot.vcpus,
                memory_mib: slot.memory_mib,
            };
            match outgoing::spawn(m.setup.clone(), out, m.commands.clone()) {
                Ok(()) => {
                    self.policy.set_migrating(&vm, true);
                    if let Some(m) = &mut self.migration {
                        m.in_flight = Some(vm);
                    }
                }
                Err(e) => tracing::warn!("cannot start moving grid VM {vm}: {e}"),
            }
            return;
        }
    }

    /// The target accepted saved VM `vm`: drop it here (libvirt undefines
    /// it with its saved state) and forget its subtask without reporting
    /// it. False when it is no longer here saved and moving.
    fn let_go(&mut self, vm: &str) -> bool {
        let moving = self
            .policy
            .vm(vm)
            .is_some_and(|v| v.state == VmState::Saved)
            && self
                .migration
                .as_ref()
                .is_some_and(|m| m.in_flight.as_deref() == Some(vm));
        if !moving {
            return false;
        }
        if let Err(e) = self.runtime.destroy(vm) {
            tracing::warn!("grid VM {vm}: dropping the saved VM after its move: {e}");
            self.shared.metrics.record_runtime_error("destroy");
            return false;
        }
        let held = self.pool.as_ref().and_then(|p| p.migrated(vm));
        if let (Some(m), Some(h)) = (&self.migration, &held) {
            m.runner.migrated_out(&h.attempt);
        }
        self.vm_cpu.remove(vm);
        if let Some(d) = self.policy.migrated_out(vm, self.now()) {
            self.record(&d);
        }
        true
    }

    fn migration_over(&mut self, vm: &str, attempt: AttemptRef, outcome: Outcome) {
        let Some(m) = &mut self.migration else {
            return;
        };
        m.in_flight = None;
        match outcome {
            Outcome::Moved { target } => {
                tracing::info!("grid VM {vm} moved to {target} with its subtask");
                self.shared.metrics.record_migration("out", "moved");
            }
            Outcome::Kept(e) => {
                m.retry_at = Some(Instant::now() + crate::migrate::RETRY_AFTER);
                tracing::warn!(
                    "grid VM {vm} stays saved here: {e}; trying again in {:?}",
                    crate::migrate::RETRY_AFTER
                );
                self.policy.set_migrating(vm, false);
                self.shared.metrics.record_migration("out", "kept");
            }
            Outcome::Lost(e) => {
                tracing::warn!("grid VM {vm} left this host but did not arrive: {e}; handing subtask {}/{} back", attempt.job, attempt.index);
                m.runner.hand_back(attempt);
                self.shared.metrics.record_migration("out", "lost");
            }
        }
    }

    /// Restores a VM arriving from another host holding `attempt` (this
    /// host's epoch). On failure the attempt is handed back.
    fn take_in(
        &mut self,
        incoming: &IncomingVm,
        file: &std::path::Path,
        attempt: AttemptRef,
    ) -> Result<(), String> {
        let Some(m) = &self.migration else {
            return Err("this agent does not take saved VMs".to_owned());
        };
        let runner = m.runner.clone();
        let fail = |why: String| {
            runner.hand_back(attempt.clone());
            Err(why)
        };
        if let Err(why) =
            self.policy
                .check_incoming(&incoming.vm, incoming.vcpus, incoming.memory_mib)
        {
            self.shared.metrics.record_migration("in", "refused");
            return fail(why);
        }
        let Some(pool) = self.pool.clone() else {
            return fail("grid VMs here have no guest channel".to_owned());
        };
        let mut spec = self.spec(&incoming.vm);
        spec.vcpus = incoming.vcpus;
        spec.memory_mib = incoming.memory_mib;
        if let Err(e) = self.runtime.restore_moved(&spec, file) {
            self.shared.metrics.record_runtime_error("restore");
            self.shared.metrics.record_migration("in", "failed");
            return fail(e.to_string());
        }
        let d = self.policy.arrive(
            &incoming.vm,
            incoming.vcpus,
            incoming.memory_mib,
            self.now(),
        );
        self.record(&d);
        runner.adopt_in_vm(attempt.clone());
        if let Some(socket) = self.runtime.guest_channel(&incoming.vm) {
            pool.adopt(
                &incoming.vm,
                socket,
                HeldSubtask {
                    id: incoming.guest_subtask,
                    attempt,
                    timeout_ms: incoming.timeout_ms,
                },
            );
        }
        self.shared.metrics.record_migration("in", "restored");
        Ok(())
    }

    fn reload(&mut self, cfg: Config) {
        self.notifier.reloading();
        for (section, same) in [
            (
                "agent",
                cfg.agent.listen == self.cfg.agent.listen
                    && cfg.agent.proc_root == self.cfg.agent.proc_root
                    && cfg.agent.cgroup_root == self.cfg.agent.cgroup_root
                    && cfg.agent.host_name == self.cfg.agent.host_name,
            ),
            ("runtime", cfg.runtime == self.cfg.runtime),
            ("cgroup", cfg.cgroup == self.cfg.cgroup),
        ] {
            if !same {
                tracing::warn!(
                    "config reload: changes to [{section}] take effect only after a restart"
                );
            }
        }
        if cfg.sampler != self.cfg.sampler {
            match Sampler::new(&cfg.sampler, &self.cfg.agent.proc_root) {
                Ok(s) => self.sampler = s,
                Err(e) => tracing::error!("config reload: keeping the old sampler: {e}"),
            }
        }
        self.load.reconfigure(cfg.load.clone());
        self.policy.reconfigure(PolicyConfig::new(
            &cfg.policy,
            &cfg.vm,
            &vm_name_prefix(&self.host),
        ));
        self.history.resize(cfg.agent.transition_history);
        self.cfg.sampler = cfg.sampler;
        self.cfg.load = cfg.load;
        self.cfg.policy = cfg.policy;
        self.cfg.vm = cfg.vm;
        self.cfg.agent.transition_history = cfg.agent.transition_history;
        tracing::info!("config reloaded");
        self.notifier.reloaded("config reloaded");
    }

    /// Adopts this agent's VMs left by an earlier run: every VM the runtime
    /// lists, which are only those tagged with this host as their owner.
    /// Their names carry this host's prefix, or another host's when they
    /// arrived from there (`reclaim_mode = "migrate"`: libvirt keeps a
    /// saved domain's name).
    fn reconcile(&mut self) -> Result<(), DaemonError> {
        let found = self.runtime.list().map_err(DaemonError::Runtime)?;
        let now = self.now();
        for vm in found {
            let state = match vm.state {
                RunState::Running | RunState::Other => VmState::Running,
                RunState::Paused => VmState::Suspended,
                RunState::Stopped { saved: true } => match self.runtime.restore(&vm.name) {
                    Ok(()) => VmState::Running,
                    Err(e) => {
                        tracing::warn!(
                            "cannot restore saved grid VM {}: {e}; destroying it",
                            vm.name
                        );
                        self.destroy_quietly(&vm.name);
                        continue;
                    }
                },
                RunState::Stopped { saved: false } => {
                    tracing::info!(
                        "removing stopped grid VM {} left by an earlier run",
                        vm.name
                    );
                    self.destroy_quietly(&vm.name);
                    continue;
                }
            };
            self.vm_cpu.insert(vm.name.clone(), vm.cpu_time_ns);
            if let Some((pool, socket)) = self.link(&vm.name) {
                pool.attach(&vm.name, socket);
                if state == VmState::Suspended {
                    pool.paused(&vm.name);
                }
            }
            let d = self.policy.adopt(VmSlot {
                name: vm.name.clone(),
                state,
                since: now,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            });
            self.record(&d);
        }
        Ok(())
    }

    fn destroy_quietly(&mut self, name: &str) {
        if let Err(e) = self.runtime.destroy(name) {
            tracing::warn!("{e}");
            self.shared.metrics.record_runtime_error("destroy");
        }
    }

    /// Reads every VM's CPU time into one monotonic grid counter (a VM
    /// that disappears does not make it go back). Returns the VMs that went
    /// away and the memory the VMs hold.
    fn refresh_grid_cpu(&mut self) -> (Vec<String>, u64) {
        // Launching VMs count too: QEMU starting up is the grid's load. They
        // may not exist yet, which is not an exit.
        // Saved VMs are stopped on purpose (their state is on disk): no
        // CPU to count, and not an exit.
        let names: Vec<(String, bool)> = self
            .policy
            .vms()
            .filter(|v| v.state != VmState::Saved)
            .map(|v| (v.name.clone(), v.state == VmState::Launching))
            .collect();
        let mut exited = Vec::new();
        let mut memory_bytes = 0u64;
        for (name, launching) in names {
            match self.runtime.stats(&name) {
                Ok(info) => {
                    let prev = self
                        .vm_cpu
                        .insert(name.clone(), info.cpu_time_ns)
                        .unwrap_or(0);
                    self.grid_cpu_total += info.cpu_time_ns.saturating_sub(prev);
                    if let Some(pool) = &self.pool {
                        // So a starved guest is not taken for a dead one.
                        pool.vm_cpu(&name, info.cpu_time_ns);
                    }
                    memory_bytes += info.memory_mib * 1024 * 1024;
                    if !launching && matches!(info.state, RunState::Stopped { .. }) {
                        exited.push(name);
                    }
                }
                Err(crate::runtime::RuntimeError::NotFound { .. }) if launching => {}
                Err(crate::runtime::RuntimeError::NotFound { .. }) => exited.push(name),
                Err(e) => {
                    tracing::debug!("stats: {e}");
                    self.shared.metrics.record_runtime_error("stats");
                }
            }
        }
        (exited, memory_bytes)
    }

    /// The grid's cumulative CPU time. For the process runtime, the grid
    /// cgroup's own accounting (exact to the nanosecond); otherwise the
    /// runtime's per-VM figures (10 ms ticks for libvirt) summed. One source is used for the agent's lifetime so
    /// the counter never jumps.
    fn grid_cpu_ns(&mut self) -> u64 {
        if let Some(cg) = self.cgroup.as_ref().filter(|_| self.grid_cpu_from_cgroup) {
            match cg.as_partition().usage() {
                Ok(u) => self.grid_cgroup_cpu = u.cpu_ns,
                Err(e) => tracing::debug!("grid cgroup usage: {e}"),
            }
            self.grid_cgroup_cpu
        } else {
            self.grid_cpu_total
        }
    }

    /// Marks the sampler's CPU counters a short while before the tick.
    fn mark(&mut self) {
        if !self.grid_cpu_from_cgroup {
            self.refresh_grid_cpu();
        }
        let grid = GridUsage {
            cpu_ns: self.grid_cpu_ns() + own_cpu_ns(),
            ..GridUsage::default()
        };
        if let Err(e) = self.sampler.mark(&grid) {
            tracing::debug!("mark: {e}");
        }
    }

    /// Grid usage for a sample: CPU from the runtime, memory and CPU stall
    /// from the grid cgroup. VMs that went away are reclaimed here.
    fn grid_usage(&mut self) -> GridUsage {
        let now_d = self.now();
        let (exited, memory_bytes) = self.refresh_grid_cpu();
        for name in exited {
            tracing::warn!("grid VM {name} went away on its own");
            if let Some(d) = self.policy.on_exited(&name, now_d) {
                self.apply(d);
            }
        }
        let mut usage = GridUsage {
            cpu_ns: self.grid_cpu_ns() + own_cpu_ns(),
            memory_bytes,
            cpu_stall_us: None,
            runnable: 0.0,
        };
        if let Some(cg) = &self.cgroup {
            match cg.as_partition().usage() {
                Ok(u) => {
                    usage.memory_bytes = usage.memory_bytes.max(u.memory_bytes);
                    usage.cpu_stall_us = u.cpu_stall_us;
                }
                Err(e) => tracing::debug!("grid cgroup usage: {e}"),
            }
        }
        // Cores the grid kept busy since the last tick: its share of the load average.
        let now = Instant::now();
        if let Some((t, cpu)) = self.last_grid {
            let dt = now.duration_since(t).as_nanos() as f64;
            if dt > 0.0 {
                usage.runnable = (usage.cpu_ns.saturating_sub(cpu)) as f64 / dt;
            }
        }
        self.last_grid = Some((now, usage.cpu_ns));
        usage
    }

    /// Feeds the worker's finished operations back into the policy.
    fn collect_worker(&mut self, done: Vec<SlowDone>) {
        for SlowDone { vm, op, result } in done {
            match result {
                Ok(()) if op == "launch" || op == "restore" => self.vm_up(&vm),
                Ok(()) => {}
                Err(crate::runtime::RuntimeError::NotFound { .. }) if op == "destroy" => {}
                Err(e) => {
                    tracing::error!("{e}");
                    self.shared.metrics.record_runtime_error(op);
                    if matches!(op, "launch" | "restore" | "save") {
                        if let Some(reclaim) = self.policy.on_runtime_error(&vm, self.now()) {
                            self.apply(reclaim);
                        }
                    }
                }
            }
        }
    }

    /// One sample → evaluate → act step.
    pub fn tick(&mut self) {
        let started = Instant::now();
        if let Some(done) = self.worker.as_ref().map(Worker::finished) {
            self.collect_worker(done);
        }
        self.collect_guests();
        let grid = self.grid_usage();
        let sample = match self.sampler.sample(&grid) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("sample failed: {e}");
                self.shared.metrics.record_sample_error();
                self.notifier.tick(Instant::now());
                return;
            }
        };
        let breakdown = self.load.evaluate(&sample);
        let obs = Observation {
            now: self.now(),
            load: breakdown.smoothed,
            peak: breakdown.peak,
            dominant: breakdown.dominant,
            mem_available_bytes: sample.mem_available_bytes,
        };
        self.shared
            .metrics
            .record_load(&breakdown, started.elapsed().as_secs_f64());
        self.last_load = Some(breakdown);
        for d in self.policy.evaluate(&obs, self.can_save) {
            self.apply(d);
        }
        self.maybe_migrate();
        self.publish();
        self.notifier.tick(Instant::now());
    }

    fn spec(&self, name: &str) -> VmSpec {
        let vm = &self.cfg.vm;
        VmSpec {
            name: name.to_string(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel: vm.kernel.clone(),
            initrd: vm.initrd.clone(),
            cmdline: vm.cmdline.clone(),
            command: vm.command.clone(),
            force_tcg: self.force_tcg,
        }
    }

    /// Before an action: tell the guest pool what is about to happen to the VM.
    fn tell_pool_before(&mut self, d: &Decision) {
        if d.reason == Reason::BootTimeout && !self.force_tcg && self.runtime.hw_accelerated() {
            tracing::warn!(
                "grid VM {}: its guest did not answer within boot_timeout under KVM; \
                 launching grid VMs under TCG (domain type qemu) from now on",
                d.vm
            );
            self.force_tcg = true;
        }
        let Some(pool) = &self.pool else { return };
        match d.action {
            Action::Destroy => pool.reclaimed(&d.vm),
            Action::Save => pool.saving(&d.vm),
            _ => {}
        }
    }

    /// After a suspend or resume the runtime carried out.
    fn tell_pool_after(&self, d: &Decision) {
        let Some(pool) = &self.pool else { return };
        match d.action {
            Action::Suspend => pool.paused(&d.vm),
            Action::Resume => pool.resumed(&d.vm),
            _ => {}
        }
    }

    /// Carries out one decision and records it. A failed action reclaims the VM.
    fn apply(&mut self, d: Decision) {
        let name = d.vm.clone();
        // Suspend and resume are recorded once the runtime has done them, so
        // a transition's time is when the VM really paused or ran again.
        let record_after = matches!(d.action, Action::Suspend | Action::Resume);
        if !record_after {
            self.record(&d);
        }
        self.tell_pool_before(&d);
        if let Some(worker) = &self.worker {
            let op = match d.action {
                Action::Launch => Some(SlowOp::Launch(self.spec(&name))),
                Action::Destroy => Some(SlowOp::Destroy(name.clone())),
                Action::Save => Some(SlowOp::Save(name.clone())),
                Action::Restore => Some(SlowOp::Restore(name.clone())),
                _ => None,
            };
            if let Some(op) = op {
                if !matches!(op, SlowOp::Launch(_)) {
                    self.vm_cpu.remove(&name);
                }
                worker.submit(op);
                return;
            }
        }
        let result = match d.action {
            Action::Record => Ok(()),
            Action::Launch => {
                let spec = self.spec(&name);
                self.runtime.launch(&spec)
            }
            Action::Suspend => {
                let _boost = self.booster.as_ref().map(|b| b.hold());
                self.runtime.suspend(&name)
            }
            Action::Resume => {
                let _boost = self.booster.as_ref().map(|b| b.hold());
                self.runtime.resume(&name)
            }
            Action::Destroy => {
                self.vm_cpu.remove(&name);
                self.runtime.destroy(&name)
            }
            Action::Save => {
                self.vm_cpu.remove(&name);
                save_or_destroy(self.runtime.as_mut(), &name)
            }
            Action::Restore => self.runtime.restore(&name),
        };
        if record_after {
            if result.is_ok() {
                self.policy.confirm(&name, self.now());
                self.tell_pool_after(&d);
            }
            self.record(&d);
        }
        let op = match d.action {
            Action::Launch => "launch",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
            Action::Destroy => "destroy",
            Action::Save => "save",
            Action::Restore => "restore",
            Action::Record => "record",
        };
        match result {
            Ok(()) => {
                if matches!(d.action, Action::Launch | Action::Restore) {
                    self.vm_up(&name);
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                self.shared.metrics.record_runtime_error(op);
                if let Some(reclaim) = self.policy.on_runtime_error(&name, self.now()) {
                    self.record(&reclaim);
                    if let Some(pool) = &self.pool {
                        pool.reclaimed(&name);
                    }
                    self.vm_cpu.remove(&name);
                    if let Err(e) = self.runtime.destroy(&name) {
                        if !matches!(e, crate::runtime::RuntimeError::NotFound { .. }) {
                            tracing::warn!("{e}");
                            self.shared.metrics.record_runtime_error("destroy");
                        }
                    }
                }
            }
        }
    }

    fn record(&mut self, d: &Decision) {
        // The load the decision used: a suspend acts on the peak too.
        let load = self.last_load.as_ref().map_or(0.0, |b| {
            if d.to == VmState::Suspended {
                b.smoothed.max(b.peak)
            } else {
                b.smoothed
            }
        });
        tracing::info!(
            vm = %d.vm,
            from = %d.from,
            to = %d.to,
            reason = %d.reason,
            load = format!("{load:.3}"),
            "grid VM {} → {} ({})",
            d.from,
            d.to,
            d.reason
        );
        let t = Transition {
            vm: d.vm.clone(),
            from: d.from,
            to: d.to,
            reason: d.reason,
            at_unix_ms: unix_ms(),
            load,
        };
        self.shared.metrics.record_transition(&t);
        self.history.push(t);
    }

    fn publish(&self) {
        let now = self.now();
        let links: BTreeMap<String, crate::guestlink::VmLinkStatus> = self
            .pool
            .as_ref()
            .map(|p| {
                p.snapshot()
                    .into_iter()
                    .map(|l| (l.vm.clone(), l))
                    .collect()
            })
            .unwrap_or_default();
        let vms = self
            .policy
            .vms()
            .map(|v| GridVmStatus {
                name: v.name.clone(),
                state: v.state,
                in_state_ms: now.saturating_sub(v.since).as_millis() as u64,
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
                cpu_time_ns: self.vm_cpu.get(&v.name).copied().unwrap_or(0),
                guest: links.get(&v.name).map(|l| l.state.to_string()),
                subtask: links
                    .get(&v.name)
                    .and_then(|l| l.attempt.as_ref())
                    .map(crate::subtask::label),
            })
            .collect();
        self.shared
            .metrics
            .record_vms(self.policy.vms().map(|v| v.state), self.policy.draining());
        self.shared.publish(AgentStatus {
            grid_net: None,
            tunnel: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: self.host.clone(),
            runtime: self.runtime.kind().to_string(),
            draining: self.policy.draining(),
            load: self.last_load.clone(),
            vms,
            transitions: self.history.to_vec(),
        });
    }

    /// SIGTERM: save or destroy every grid VM, then publish the final status.
    fn shutdown(&mut self) {
        self.notifier.stopping();
        tracing::info!("shutting down: draining grid VMs");
        self.policy.drain(Reason::Shutdown);
        let obs = Observation {
            now: self.now(),
            load: self.last_load.as_ref().map_or(0.0, |b| b.smoothed),
            peak: 0.0,
            dominant: None,
            mem_available_bytes: u64::MAX,
        };
        for d in self.policy.evaluate(&obs, self.can_save) {
            self.apply(d);
        }
        if let Some(worker) = self.worker.take() {
            tracing::info!("waiting for pending runtime operations");
            for SlowDone { vm, op, result } in worker.finish() {
                if let Err(e) = result {
                    tracing::error!("shutdown: {op} of {vm} failed: {e}");
                    self.shared.metrics.record_runtime_error(op);
                }
            }
        }
        self.publish();
    }
}
