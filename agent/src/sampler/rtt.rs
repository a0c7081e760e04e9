//! Round-trip time to the configured `host:port`, measured as the time a TCP
//! connect takes (SYN → SYN-ACK), on a background thread.
//!
//! The probe thread connects at most every `rtt_every`, with `rtt_max` as the
//! timeout, and publishes its latest outcome; `sample()` only copies that
//! outcome, so it never waits on the network or on DNS. A failed or timed-out
//! connect (or a name that does not resolve) counts as full load (1.0).
//! Normalised = (rtt − baseline) / (max − baseline), clamped to 0..1; the raw
//! value is in milliseconds. The thread ends on its own once the sampler that
//! started it is dropped (its stop channel disconnects).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{RawReading, SampleError};

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    Connected(Duration),
    Failed,
}

/// Probe settings, from `[sampler]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RttConfig {
    pub target: String,
    pub baseline: Duration,
    pub max: Duration,
    pub every: Duration,
}

/// Handle on the probe thread and its latest outcome.
#[derive(Debug)]
pub(crate) struct Rtt {
    latest: Arc<Mutex<Option<Outcome>>>,
    baseline: Duration,
    max: Duration,
    /// Dropping this stops the thread.
    _stop: Sender<()>,
}

impl Rtt {
    pub(crate) fn start(cfg: RttConfig) -> Result<Rtt, SampleError> {
        let latest = Arc::new(Mutex::new(None));
        let (stop, stopped) = mpsc::channel();
        let (published, target) = (latest.clone(), cfg.target.clone());
        let (max, every) = (cfg.max, cfg.every);
        std::thread::Builder::new()
            .name("sparegrid-rtt".into())
            .spawn(move || run(&target, max, every, &published, &stopped))
            .map_err(|source| SampleError::RttProbe {
                target: cfg.target.clone(),
                source,
            })?;
        Ok(Rtt {
            latest,
            baseline: cfg.baseline,
            max: cfg.max,
            _stop: stop,
        })
    }

    /// The latest probe as a reading; None until the first probe finishes.
    pub(crate) fn reading(&self) -> Option<RawReading> {
        let outcome = *self.latest.lock().unwrap_or_else(|e| e.into_inner());
        outcome.map(|o| normalise(o, self.baseline, self.max))
    }
}

pub(crate) fn normalise(outcome: Outcome, baseline: Duration, max: Duration) -> RawReading {
    let (raw, normalised) = match outcome {
        Outcome::Failed => (max.as_secs_f64() * 1e3, 1.0),
        Outcome::Connected(rtt) => {
            let span = max.as_secs_f64() - baseline.as_secs_f64();
            let over = rtt.as_secs_f64() - baseline.as_secs_f64();
            let n = if span > 0.0 {
                over / span
            } else if over > 0.0 {
                1.0
            } else {
                0.0
            };
            (rtt.as_secs_f64() * 1e3, n.clamp(0.0, 1.0))
        }
    };
    RawReading {
        raw,
        grid: 0.0,
        normalised,
    }
}

/// One connect attempt over `addrs` in order, all within `timeout`; the time
/// of the connect that succeeded. A working address moves to the front.
pub(crate) fn probe(addrs: &mut [SocketAddr], timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    for i in 0..addrs.len() {
        let started = Instant::now();
        let left = deadline.saturating_duration_since(started);
        if left.is_zero() {
            break;
        }
        if TcpStream::connect_timeout(&addrs[i], left).is_ok() {
            let rtt = started.elapsed();
            addrs[..=i].rotate_right(1);
            return Outcome::Connected(rtt);
        }
    }
    Outcome::Failed
}

fn resolve(target: &str) -> Vec<SocketAddr> {
    match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            tracing::debug!("RTT target {target}: cannot resolve: {e}");
            Vec::new()
        }
    }
}

fn run(
    target: &str,
    max: Duration,
    every: Duration,
    latest: &Mutex<Option<Outcome>>,
    stop: &Receiver<()>,
) {
    let mut addrs = Vec::new();
    let mut was_failing = false;
    loop {
        let started = Instant::now();
        if addrs.is_empty() {
            addrs = resolve(target);
        }
        let outcome = probe(&mut addrs, max);
        let failing = outcome == Outcome::Failed;
        if failing {
            // Resolve again next time: the name may point elsewhere now.
            addrs.clear();
        }
        if failing != was_failing {
            if failing {
                tracing::info!(
                    "RTT target {target} unreachable within {max:?}; counting it as full load"
                );
            } else {
                tracing::info!("RTT target {target} reachable again");
            }
            was_failing = failing;
        }
        *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        match stop.recv_timeout(every.saturating_sub(started.elapsed())) {
            Err(RecvTimeoutError::Timeout) => {}
            // The sampler is gone (or, never sent, asked to stop).
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn normalisation() {
        let ms = Duration::from_millis;
        let n = |o| normalise(o, ms(10), ms(110)).normalised;
        assert_eq!(n(Outcome::Connected(ms(5))), 0.0);
        assert!((n(Outcome::Connected(ms(60))) - 0.5).abs() < 1e-12);
        assert_eq!(n(Outcome::Connected(ms(500))), 1.0);
        assert_eq!(n(Outcome::Failed), 1.0);
        assert_eq!(normalise(Outcome::Failed, ms(10), ms(110)).raw, 110.0);
        assert_eq!(
            normalise(Outcome::Connected(ms(60)), ms(10), ms(110)).raw,
            60.0
        );
    }

    #[test]
    fn probe_open_and_closed_ports() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut open = vec![l.local_addr().unwrap()];
        assert!(matches!(
            probe(&mut open, Duration::from_secs(2)),
            Outcome::Connected(_)
        ));
        drop(l);
        assert_eq!(probe(&mut open, Duration::from_secs(2)), Outcome::Failed);
        assert_eq!(probe(&mut [], Duration::from_secs(2)), Outcome::Failed);
    }

    #[test]
    fn working_address_moves_to_the_front() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut addrs = vec![closed, l.local_addr().unwrap()];
        assert!(matches!(
            probe(&mut addrs, Duration::from_secs(2)),
            Outcome::Connected(_)
        ));
        assert_eq!(addrs[0], l.local_addr().unwrap());
    }
}
