//! The tunnel endpoint: a WireGuard overlay that joins the grid VMs of all
//! hosts (issue 7). It speaks the WireGuard protocol (boringtun's
//! `noise::Tunn`) over one UDP socket, on a TUN device, to a live list of
//! peers, and interoperates with standard WireGuard (wireguard-go).
//!
//! - [`config`]: the TOML schema (`[tunnel]` in the agent, or the file of
//!   `sparegrid-tunnel`) and validation.
//! - [`keys`]: the host key pair (generated on first start, stored 0600),
//!   `wg`-style base64.
//! - [`device`]: the packet device trait, the Linux TUN device with GSO/GRO
//!   offload and its routes, an in-memory device for tests.
//! - [`peers`]: the live peer set: cryptokey routing, live updates,
//!   per-peer stats, rejection counters.
//! - [`endpoint`]: the engine: packet loops and WireGuard's timers.
//! - [`control`]: a small unix-socket control channel (stats, reload) for
//!   the standalone `sparegrid-tunnel` binary.
//! - [`service`]: the tunnel as the agent daemon runs it: the key at
//!   start, the endpoint brought up on the controller's overlay lease, the
//!   controller's peer list applied live, the heartbeat's report and the
//!   status.
//!
//! The agent daemon wires it in through [`TunnelService`] (with
//! `[tunnel] enabled`, driven by the grid client, [`crate::grid`]); the
//! endpoint itself is [`Tunnel::from_config`], [`Tunnel::update_peers`] and
//! [`Tunnel::stats`]. See docs/tunnel.md.

pub mod config;
pub mod control;
pub mod device;
pub mod endpoint;
pub mod keys;
pub mod peers;
pub mod service;

pub use config::{AgentTunnelSection, PeerConfig, TunnelConfig};
pub use endpoint::{EndpointError, Tunnel, TunnelStats};
pub use keys::Key;
pub use peers::{PeerChange, PeerStats};
pub use service::{ServiceError, TunnelService};

#[cfg(test)]
mod tests;
