//! `sparegrid-guest`: the worker inside a grid VM. It owns the guest end of
//! the guest channel (the virtio-serial port `org.sparegrid.guest.0`) and
//! runs the agent's subtasks one at a time; the wire contract is
//! [`sparegrid_proto::guest`] (read its header for the protocol).
//!
//! - [`port`]: finding and opening the channel (virtio port, device, unix socket).
//! - [`worker`]: read loop, dispatch, writer and heartbeat threads.
//! - [`state`]: the shared state and the order of frames on the wire.
//! - [`run`]: spawning and supervising one subtask.
//! - [`net`]: the overlay NIC, configured for subtasks that ask for it.
//! - [`sysinfo`]: interpreters, vCPUs, memory, monotonic uptime.
//!
//! Std threads only, no async runtime: the binary is built static
//! (crt-static) for an initramfs that has nothing but busybox. It runs as a
//! child of the image's `/init`, which restarts it if it exits; it is written
//! never to exit or panic on anything the host sends.

pub mod net;
pub mod port;
pub mod run;
pub mod state;
pub mod sysinfo;
pub mod worker;

/// Whether per-subtask lines are logged (`--verbose`). Off by default: in a
/// TCG guest every console line costs real time on the serial port.
pub static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One line on stderr (the guest console), prefixed `sparegrid-guest worker:`.
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {
        eprintln!("sparegrid-guest worker: {}", format_args!($($t)*))
    };
}

/// [`log!`] only with `--verbose` (per-subtask events).
#[macro_export]
macro_rules! vlog {
    ($($t:tt)*) => {
        if $crate::VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
            $crate::log!($($t)*)
        }
    };
}
