//! systemd integration: `Type=notify` readiness, status text and the
//! watchdog. Every call is a no-op when NOTIFY_SOCKET is unset (not under
//! systemd), so the agent runs the same by hand.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends readiness, status and watchdog pings to systemd.
pub struct Notifier {
    watchdog_every: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let mut usec = 0u64;
        let watchdog_every = if sd_notify::watchdog_enabled(false, &mut usec) {
            // Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
            Some(Duration::from_micros(usec / 2))
        } else {
            None
        };
        Notifier {
            watchdog_every,
            last_ping: None,
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::debug!("sd_notify failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn reloaded(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("draining grid VMs"),
        ]);
    }

    /// Pings the watchdog when due. Called from the control loop every
    /// tick, so a stuck loop stops the pings and systemd restarts the agent.
    pub fn tick(&mut self, now: Instant) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if self
            .last_ping
            .is_none_or(|t| now.duration_since(t) >= every)
        {
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Some(now);
        }
    }
}
