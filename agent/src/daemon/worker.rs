//! The slow-operation worker: launches, destroys and saves run on their own
//! thread with their own runtime handle, so a launch that takes long (QEMU
//! starting at idle CPU priority while customers are busy) never delays the
//! control loop's next suspend. Suspend, resume and stats stay on the
//! control loop; they are quick.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use std::sync::Arc;

use super::boost::Booster;
use crate::runtime::{Runtime, RuntimeError, VmSpec};

/// Saves a VM; a failed save still has to free the host, so it destroys,
/// and returns the save's error (the VM is gone, not saved).
pub fn save_or_destroy(runtime: &mut dyn Runtime, vm: &str) -> Result<(), RuntimeError> {
    runtime.save(vm).inspect_err(|e| {
        tracing::warn!("{e}; destroying instead");
        if let Err(d) = runtime.destroy(vm) {
            tracing::warn!("{d}");
        }
    })
}

/// One operation for the worker.
#[derive(Debug)]
pub enum SlowOp {
    Launch(VmSpec),
    Destroy(String),
    Save(String),
    Restore(String),
}

impl SlowOp {
    pub fn vm(&self) -> &str {
        match self {
            SlowOp::Launch(spec) => &spec.name,
            SlowOp::Destroy(name) | SlowOp::Save(name) | SlowOp::Restore(name) => name,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SlowOp::Launch(_) => "launch",
            SlowOp::Destroy(_) => "destroy",
            SlowOp::Save(_) => "save",
            SlowOp::Restore(_) => "restore",
        }
    }
}

/// The outcome of one operation.
#[derive(Debug)]
pub struct SlowDone {
    pub vm: String,
    pub op: &'static str,
    pub result: Result<(), RuntimeError>,
}

/// Handle on the worker thread.
pub struct Worker {
    ops: Option<Sender<SlowOp>>,
    done: Receiver<SlowDone>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// `booster` lifts the partition's CPU weight during destroy and save.
    pub fn start(
        mut runtime: Box<dyn Runtime>,
        booster: Option<Arc<Booster>>,
    ) -> std::io::Result<Worker> {
        let (ops_tx, ops_rx) = mpsc::channel::<SlowOp>();
        let (done_tx, done_rx) = mpsc::channel::<SlowDone>();
        let thread = std::thread::Builder::new()
            .name("sparegrid-runtime".into())
            .spawn(move || {
                for op in ops_rx {
                    let vm = op.vm().to_string();
                    let name = op.name();
                    let _boost = match op {
                        SlowOp::Launch(_) | SlowOp::Restore(_) => None,
                        _ => booster.as_ref().map(|b| b.hold()),
                    };
                    let result = match op {
                        SlowOp::Launch(spec) => runtime.launch(&spec),
                        SlowOp::Destroy(vm) => runtime.destroy(&vm),
                        SlowOp::Save(vm) => save_or_destroy(runtime.as_mut(), &vm),
                        SlowOp::Restore(vm) => runtime.restore(&vm),
                    };
                    if done_tx
                        .send(SlowDone {
                            vm,
                            op: name,
                            result,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            ops: Some(ops_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, op: SlowOp) {
        if let Some(tx) = &self.ops {
            // The thread only ends when `ops` is dropped, so this cannot fail
            // while `self` is alive.
            let _ = tx.send(op);
        }
    }

    /// Outcomes that arrived since the last call.
    pub fn finished(&self) -> Vec<SlowDone> {
        self.done.try_iter().collect()
    }

    /// Waits for every submitted operation, then returns their outcomes.
    pub fn finish(mut self) -> Vec<SlowDone> {
        self.ops = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.done.try_iter().collect()
    }
}
