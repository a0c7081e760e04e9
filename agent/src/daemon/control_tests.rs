//! The control loop with a guest pool, driven tick by tick over a fake
//! runtime: a guest that never answers makes the next launch use TCG, and a
//! guest the pool gives up on is reclaimed with reason `guest_failure`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sparegrid_proto::{AgentStatus, Reason, VmState};

use super::control::ControlLoop;
use super::status::Shared;
use crate::config::{Config, Weights};
use crate::guestlink::{GuestPool, LinkOptions};
use crate::runtime::{RunState, Runtime, RuntimeError, VmInfo, VmSpec};

/// What the fake runtime was asked to do.
#[derive(Debug, Default)]
struct Calls {
    /// `force_tcg` of each launch, in order.
    launches: Vec<bool>,
    destroyed: Vec<String>,
    live: Vec<String>,
}

/// A runtime whose VMs "run" at once, talk over a channel socket nobody
/// serves, and claim hardware acceleration.
struct FakeRuntime {
    calls: Arc<Mutex<Calls>>,
    run_dir: PathBuf,
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn launch(&mut self, spec: &VmSpec) -> Result<(), RuntimeError> {
        let mut c = self.calls.lock().unwrap();
        c.launches.push(spec.force_tcg);
        c.live.push(spec.name.clone());
        Ok(())
    }
    fn suspend(&mut self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn resume(&mut self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn destroy(&mut self, name: &str) -> Result<(), RuntimeError> {
        let mut c = self.calls.lock().unwrap();
        c.destroyed.push(name.to_string());
        c.live.retain(|n| n != name);
        Ok(())
    }
    fn save(&mut self, name: &str) -> Result<(), RuntimeError> {
        self.destroy(name)
    }
    fn restore(&mut self, name: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound { vm: name.into() })
    }
    fn stats(&mut self, name: &str) -> Result<VmInfo, RuntimeError> {
        if !self.calls.lock().unwrap().live.iter().any(|n| n == name) {
            return Err(RuntimeError::NotFound { vm: name.into() });
        }
        Ok(VmInfo {
            name: name.into(),
            state: RunState::Running,
            vcpus: 1,
            memory_mib: 64,
            cpu_time_ns: 0,
        })
    }
    fn list(&mut self) -> Result<Vec<VmInfo>, RuntimeError> {
        Ok(Vec::new())
    }
    fn guest_channel(&self, name: &str) -> Option<PathBuf> {
        Some(self.run_dir.join(format!("{name}.channel.sock")))
    }
    fn hw_accelerated(&self) -> bool {
        true
    }
}

/// A config that launches at once on this machine whatever else runs on
/// it: only memory use counts, and one 64 MiB VM at a time.
fn config(boot_timeout: Duration) -> Config {
    let mut cfg = Config::default();
    cfg.sampler.interval = Duration::from_millis(50);
    cfg.load.weights = Weights {
        cpu: 0.0,
        load_avg: 0.0,
        memory: 1.0,
        network: 0.0,
        disk: 0.0,
        psi_cpu: 0.0,
        psi_memory: 0.0,
        psi_io: 0.0,
        rtt: 0.0,
    };
    cfg.policy.suspend_above = 1.0;
    cfg.policy.resume_below = 1.0;
    cfg.policy.launch_below = 1.0;
    cfg.policy.launch_after = Duration::ZERO;
    cfg.policy.boot_timeout = boot_timeout;
    cfg.policy.memory_reserve_mib = 1;
    cfg.policy.max_grid_vms = 1;
    cfg.vm.memory_mib = 64;
    cfg
}

struct Rig {
    control: ControlLoop,
    calls: Arc<Mutex<Calls>>,
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
}

fn rig(boot_timeout: Duration, hello_timeout: Duration) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(Mutex::new(Calls::default()));
    let runtime = FakeRuntime {
        calls: calls.clone(),
        run_dir: dir.path().to_path_buf(),
    };
    let shared = Arc::new(Shared::new(AgentStatus {
        grid_net: None,
        tunnel: None,
        version: "test".into(),
        host: "h".into(),
        runtime: "fake".into(),
        draining: false,
        load: None,
        vms: Vec::new(),
        transitions: Vec::new(),
    }));
    let cfg = config(boot_timeout);
    let pool = GuestPool::new(LinkOptions {
        spill: None,
        host: "h".into(),
        hello_timeout,
        heartbeat: Duration::from_secs(1),
        dead_after: Duration::from_secs(5),
        output_cap: 1 << 20,
    });
    let control = ControlLoop::new(
        cfg,
        "h".into(),
        Box::new(runtime),
        false,
        None,
        shared.clone(),
    )
    .unwrap()
    .with_guest_pool(pool);
    Rig {
        control,
        calls,
        shared,
        _dir: dir,
    }
}

/// Ticks every 50 ms until `done` holds; panics after 30 s.
fn tick_until(r: &mut Rig, what: &str, mut done: impl FnMut(&Calls, &AgentStatus) -> bool) {
    let start = Instant::now();
    loop {
        r.control.tick();
        if done(&r.calls.lock().unwrap(), &r.shared.status()) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}\n{:?}",
            r.calls.lock().unwrap(),
            r.shared.status().transitions
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_stays_launching_until_its_guest_answers_then_kvm_falls_back_to_tcg() {
    // The policy's boot timeout comes first; the pool would wait longer.
    let mut r = rig(Duration::from_millis(600), Duration::from_secs(60));
    tick_until(&mut r, "the first launch", |c, _| !c.launches.is_empty());
    // No Hello: still launching, not started.
    r.control.tick();
    let st = r.shared.status();
    assert_eq!(st.vms.len(), 1, "{st:?}");
    assert_eq!(st.vms[0].state, VmState::Launching);
    assert_eq!(st.vms[0].guest.as_deref(), Some("connecting"));
    tick_until(&mut r, "a second launch", |c, _| c.launches.len() >= 2);
    let c = r.calls.lock().unwrap();
    assert_eq!(c.launches[..2], [false, true], "second launch under TCG");
    assert!(!c.destroyed.is_empty(), "the stuck VM was destroyed");
    let st = r.shared.status();
    assert!(st
        .transitions
        .iter()
        .any(|t| t.reason == Reason::BootTimeout && t.to == VmState::Reclaimed));
    assert!(!st.transitions.iter().any(|t| t.reason == Reason::Started));
}

#[test]
fn a_guest_the_pool_gives_up_on_is_reclaimed_as_guest_failure() {
    // Now the pool's Hello deadline comes first.
    let mut r = rig(Duration::from_secs(60), Duration::from_millis(300));
    tick_until(&mut r, "a guest_failure reclaim", |_, st| {
        st.transitions
            .iter()
            .any(|t| t.reason == Reason::GuestFailure && t.to == VmState::Reclaimed)
    });
    let c = r.calls.lock().unwrap();
    assert_eq!(c.destroyed.len(), 1, "{c:?}");
    assert!(!c.launches[0], "no TCG fallback without a boot timeout");
}
