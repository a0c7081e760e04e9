//! Wire types shared by `sparegrid-agent`, `sparegrid-controller` and the guest
//! worker. Everything here is plain data with serde derives and no I/O; the
//! one piece of logic is the guest channel's framing ([`guest`]). JSON
//! (status API) and MessagePack (agent↔controller, host↔guest) encode these
//! types.

pub mod grid;
pub mod guest;
pub mod images;
pub mod load;
pub mod migrate;
pub mod overlay;
pub mod status;
pub mod vm;

pub use load::{LoadBreakdown, Metric, MetricReading};
pub use overlay::Network;
pub use status::{AgentStatus, DropCount, GridNetStatus, GridVmStatus};
pub use vm::{Reason, Transition, VmState};
