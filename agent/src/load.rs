//! The composite load factor: per-metric weights applied to the sampler's
//! normalised readings, combined (`max` or `weighted_mean`) and smoothed with
//! a fast attack and a slow decay, so a spike shows at once and a lull shows
//! slowly. Pure arithmetic; no I/O.

use std::time::Duration;

use sparegrid_proto::{LoadBreakdown, Metric, MetricReading};

use crate::config::{Combine, LoadSection};
use crate::sampler::RawSample;

/// Turns samples into [`LoadBreakdown`]s. Holds only the smoothed value.
#[derive(Debug, Clone)]
pub struct LoadModel {
    cfg: LoadSection,
    smoothed: Option<f64>,
}

/// Fraction of the gap to close after `dt` with time constant `tau`
/// (exponential smoothing; `tau = 0` closes it at once).
fn step(dt: Duration, tau: Duration) -> f64 {
    if tau.is_zero() {
        1.0
    } else {
        1.0 - (-dt.as_secs_f64() / tau.as_secs_f64()).exp()
    }
}

impl LoadModel {
    pub fn new(cfg: LoadSection) -> LoadModel {
        LoadModel {
            cfg,
            smoothed: None,
        }
    }

    /// Replaces weights, combination and time constants (SIGHUP); keeps the smoothed value.
    pub fn reconfigure(&mut self, cfg: LoadSection) {
        self.cfg = cfg;
    }

    /// Weighs, combines and smooths one sample.
    pub fn evaluate(&mut self, sample: &RawSample) -> LoadBreakdown {
        let mut metrics = Vec::with_capacity(Metric::ALL.len());
        let mut best: Option<(Metric, f64)> = None;
        let (mut sum, mut weight_sum) = (0.0, 0.0);
        for m in Metric::ALL {
            let weight = self.cfg.weights.get(m);
            let reading = sample.get(m);
            let available = reading.is_some();
            let r = reading.unwrap_or(crate::sampler::RawReading {
                raw: 0.0,
                grid: 0.0,
                normalised: 0.0,
            });
            let normalised = r.normalised.clamp(0.0, 1.0);
            if available && weight > 0.0 {
                let contribution = weight * normalised;
                sum += contribution;
                weight_sum += weight;
                if best.is_none_or(|(_, b)| contribution > b) {
                    best = Some((m, contribution));
                }
            }
            metrics.push(MetricReading {
                metric: m,
                raw: r.raw,
                grid: r.grid,
                normalised,
                weight,
                available,
            });
        }
        let instant = match self.cfg.combine {
            Combine::Max => best.map_or(0.0, |(_, c)| c),
            Combine::WeightedMean if weight_sum > 0.0 => sum / weight_sum,
            Combine::WeightedMean => 0.0,
        };
        // The same with the CPU's short pre-sample window, where it is higher.
        let w = self.cfg.weights.get(Metric::Cpu);
        let cpu = &metrics[Metric::Cpu.index()];
        let peak = match sample.cpu_window {
            Some(win) if cpu.available && w > 0.0 && win.normalised > cpu.normalised => {
                let extra = w * (win.normalised.clamp(0.0, 1.0) - cpu.normalised);
                match self.cfg.combine {
                    Combine::Max => instant.max(w * win.normalised.clamp(0.0, 1.0)),
                    Combine::WeightedMean => (sum + extra) / weight_sum,
                }
            }
            _ => instant,
        };
        let smoothed = match self.smoothed {
            None => instant,
            Some(prev) => {
                let tau = if instant >= prev {
                    self.cfg.attack
                } else {
                    self.cfg.decay
                };
                prev + (instant - prev) * step(sample.elapsed, tau)
            }
        };
        self.smoothed = Some(smoothed);
        LoadBreakdown {
            instant,
            smoothed,
            peak,
            dominant: best.filter(|(_, c)| *c > 0.0).map(|(m, _)| m),
            combine: self.cfg.combine.as_str().to_string(),
            metrics,
            mem_available_bytes: sample.mem_available_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Weights;
    use crate::sampler::RawReading;

    fn sample(values: &[(Metric, f64)], elapsed_ms: u64) -> RawSample {
        let mut s = RawSample {
            elapsed: Duration::from_millis(elapsed_ms),
            ..RawSample::default()
        };
        for (m, v) in values {
            s.set(
                *m,
                RawReading {
                    raw: *v,
                    grid: 0.0,
                    normalised: *v,
                },
            );
        }
        s
    }

    fn cfg(combine: Combine) -> LoadSection {
        LoadSection {
            combine,
            weights: Weights {
                cpu: 1.0,
                load_avg: 0.5,
                memory: 1.0,
                network: 1.0,
                disk: 1.0,
                psi_cpu: 1.0,
                psi_memory: 1.0,
                psi_io: 1.0,
                rtt: 0.0,
            },
            attack: Duration::ZERO,
            decay: Duration::from_secs(5),
        }
    }

    #[test]
    fn max_picks_the_largest_weighted_metric() {
        let mut lm = LoadModel::new(cfg(Combine::Max));
        let b = lm.evaluate(&sample(
            &[
                (Metric::Cpu, 0.3),
                (Metric::LoadAvg, 0.9),
                (Metric::Disk, 0.6),
            ],
            250,
        ));
        // load_avg 0.9 × 0.5 = 0.45 < disk 0.6.
        assert!((b.instant - 0.6).abs() < 1e-9, "{b:?}");
        assert_eq!(b.dominant, Some(Metric::Disk));
        assert_eq!(b.metrics.len(), Metric::ALL.len());
        let la = &b.metrics[Metric::LoadAvg.index()];
        assert_eq!((la.normalised, la.weight, la.available), (0.9, 0.5, true));
        assert!(!b.metrics[Metric::Rtt.index()].available);
    }

    #[test]
    fn weighted_mean_ignores_unavailable_and_zero_weight_metrics() {
        let mut lm = LoadModel::new(cfg(Combine::WeightedMean));
        let b = lm.evaluate(&sample(
            &[
                (Metric::Cpu, 0.8),
                (Metric::LoadAvg, 0.2),
                (Metric::Rtt, 1.0),
            ],
            250,
        ));
        // (0.8×1 + 0.2×0.5) / 1.5 = 0.6; rtt has weight 0.
        assert!((b.instant - 0.6).abs() < 1e-9, "{b:?}");
        assert_eq!(b.dominant, Some(Metric::Cpu));
    }

    #[test]
    fn spikes_show_at_once_and_lulls_decay_slowly() {
        let mut lm = LoadModel::new(cfg(Combine::Max));
        assert_eq!(
            lm.evaluate(&sample(&[(Metric::Cpu, 0.1)], 250)).smoothed,
            0.1
        );
        assert_eq!(
            lm.evaluate(&sample(&[(Metric::Cpu, 0.95)], 250)).smoothed,
            0.95
        );
        // One 250 ms step of a 5 s decay closes 1 − e^(−0.05) ≈ 4.9 % of the gap.
        let b = lm.evaluate(&sample(&[(Metric::Cpu, 0.0)], 250));
        let expected = 0.95 * (-0.05f64).exp();
        assert!((b.smoothed - expected).abs() < 1e-9, "{}", b.smoothed);
        assert_eq!(b.instant, 0.0);
        // After 5 s of quiet it is down to about e^-1 of the peak.
        let mut last = b.smoothed;
        for _ in 0..19 {
            last = lm.evaluate(&sample(&[(Metric::Cpu, 0.0)], 250)).smoothed;
        }
        assert!((last - 0.95 * (-1.0f64).exp()).abs() < 1e-6, "{last}");
    }

    #[test]
    fn a_slow_attack_smooths_rises_too() {
        let mut c = cfg(Combine::Max);
        c.attack = Duration::from_secs(1);
        let mut lm = LoadModel::new(c);
        lm.evaluate(&sample(&[(Metric::Cpu, 0.0)], 250));
        let b = lm.evaluate(&sample(&[(Metric::Cpu, 1.0)], 1000));
        assert!((b.smoothed - (1.0 - (-1.0f64).exp())).abs() < 1e-9);
    }

    #[test]
    fn the_cpu_window_raises_peak_only() {
        for combine in [Combine::Max, Combine::WeightedMean] {
            let mut lm = LoadModel::new(cfg(combine));
            let mut s = sample(&[(Metric::Cpu, 0.2), (Metric::Disk, 0.2)], 250);
            s.cpu_window = Some(RawReading {
                raw: 0.9,
                grid: 0.0,
                normalised: 0.9,
            });
            let b = lm.evaluate(&s);
            assert!((b.instant - 0.2).abs() < 1e-9, "{combine:?}: {b:?}");
            assert!((b.smoothed - 0.2).abs() < 1e-9, "{combine:?}: {b:?}");
            let want = match combine {
                Combine::Max => 0.9,
                Combine::WeightedMean => (0.9 + 0.2) / 2.0,
            };
            assert!((b.peak - want).abs() < 1e-9, "{combine:?}: {b:?}");
            // A window below the interval reading changes nothing.
            s.cpu_window = Some(RawReading {
                raw: 0.1,
                grid: 0.0,
                normalised: 0.1,
            });
            assert!((lm.evaluate(&s).peak - 0.2).abs() < 1e-9);
        }
    }

    #[test]
    fn nothing_available_is_zero_load_with_no_dominant() {
        let mut lm = LoadModel::new(cfg(Combine::WeightedMean));
        let b = lm.evaluate(&sample(&[], 250));
        assert_eq!((b.instant, b.dominant), (0.0, None));
    }

    #[test]
    fn out_of_range_readings_are_clamped() {
        let mut lm = LoadModel::new(cfg(Combine::Max));
        let b = lm.evaluate(&sample(&[(Metric::Network, 3.0)], 250));
        assert_eq!(b.instant, 1.0);
        assert_eq!(b.metrics[Metric::Network.index()].raw, 3.0);
    }
}
