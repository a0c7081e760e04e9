//! Daemon (placeholder: being written).
