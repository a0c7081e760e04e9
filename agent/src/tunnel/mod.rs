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
//!
//! The agent daemon wires it in with [`Tunnel::from_config`],
//! [`Tunnel::update_peers`] (when the controller's peer list changes) and
//! [`Tunnel::stats`] (status and metrics). See docs/tunnel.md.

pub mod config;
pub mod control;
pub mod device;
pub mod endpoint;
pub mod keys;
pub mod peers;

pub use config::{PeerConfig, TunnelConfig};
pub use endpoint::{EndpointError, Tunnel, TunnelStats};
pub use keys::Key;
pub use peers::{PeerChange, PeerStats};

#[cfg(test)]
mod tests;
