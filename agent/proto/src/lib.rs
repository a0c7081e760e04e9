//! Wire types shared by `sparegrid-agent`, `sparegrid-controller` and the guest
//! worker. Everything here is plain data with serde derives: no I/O, no logic
//! beyond naming. JSON (status API) and MessagePack (agent↔controller) both
//! encode these types.

pub mod grid;
pub mod load;
pub mod status;
pub mod vm;

pub use load::{LoadBreakdown, Metric, MetricReading};
pub use status::{AgentStatus, GridVmStatus};
pub use vm::{Reason, Transition, VmState};
