//! `sparegrid-agent` as a library: everything the daemon does, split into
//! one module per concern so tests and benchmarks can drive each part alone.
//!
//! - [`config`]: the TOML schema and validation.
//! - [`sampler`]: procfs readings → customer load per metric, normalised.
//! - [`load`]: weights, combination and smoothing into one load factor.
//! - [`policy`]: the pure grid VM state machine.
//! - [`cgroup`]: the low-priority grid partition (v1 and v2).
//! - [`runtime`]: libvirt and process backends behind one trait.
//! - [`subtask`]: runs a pushed subtask as a host process in the grid cgroup.
//! - [`grid`]: joins a controller: register, heartbeat, run pushed or
//!   leased subtasks (in grid VMs, or as processes).
//! - [`guestlink`]: the host side of the guest channel to grid VMs.
//! - [`daemon`]: control loop, HTTP status/metrics, signals, systemd.
//! - [`check`]: what this host supports.
//! - [`workload`]: workload files (image, vCPUs, memory, interpreters).
//! - [`discover`]: finding the controller through a DNS SRV record.
//! - [`transfer`]: the transfer endpoint (tus uploads, Range downloads,
//!   checkpoint journals), the `sparegrid-transfer` crate re-exported;
//!   served with `[transfer] enabled`.
//! - [`peer`]: p2p work stealing's durable queue and trade protocol.
//! - [`overlay`]: the grid bridge of this host's overlay slice, its
//!   nftables filtering, grid namespaces for overlay subtasks.
//! - [`tunnel`]: the WireGuard tunnel endpoint (`[tunnel] enabled`; see
//!   docs/tunnel.md).
//! - [`images`]: the image catalog: serving this host's grid VM image to
//!   peers, fetching a missing one from a peer, checked against its
//!   manifest digest.
//! - [`migrate`]: `reclaim_mode = "migrate"`, moving a saved grid VM with
//!   its subtask to an idle host over the transfer endpoint.

pub mod cgroup;
pub mod check;
pub mod config;
pub mod daemon;
pub mod discover;
pub mod grid;
pub mod guestlink;
pub mod images;
pub mod load;
pub mod migrate;
pub mod overlay;
pub mod peer;
pub mod policy;
pub mod runtime;
pub mod sampler;
pub mod subtask;
/// The transfer endpoint lives in its own crate (the controller serves it
/// too); re-exported so agent code keeps its `crate::transfer` paths.
pub use sparegrid_transfer as transfer;
pub mod tunnel;
pub mod workload;
