//! The pre-copy controller: after every round it predicts the downtime of stopping now from
//! measured figures and decides whether to go on.

use std::time::Duration;

use super::{MigrateOptions, RoundStats};
use crate::guest::layout::PAGE_SIZE;

/// Bytes of a page on the wire (data plus its 8-byte entry).
const PAGE_WIRE_BYTES: f64 = PAGE_SIZE as f64 + 8.0;

/// What to do after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Another pre-copy round.
    Continue,
    /// Pause and send the rest; the reason goes into the report.
    StopAndCopy(String),
    /// Give up; the VM stays on the source.
    Abort(String),
}

/// Decides, round by round.
#[derive(Debug)]
pub struct Controller {
    opts: MigrateOptions,
    /// Expected size of the vCPU and device state, bytes.
    state_bytes: f64,
    rtt: Duration,
}

impl Controller {
    /// A controller for these options.
    pub fn new(opts: &MigrateOptions, state_bytes: u64, rtt: Duration) -> Self {
        Self {
            opts: opts.clone(),
            state_bytes: state_bytes as f64,
            rtt,
        }
    }

    /// Predicted downtime of stopping now: remaining bytes over the measured bandwidth, plus
    /// the state, plus the commit round trips (Ready, Go/Running).
    pub fn predict_ms(&self, dirty_pages: u64, bandwidth: f64) -> f64 {
        let bw = bandwidth.max(1.0);
        let bytes = dirty_pages as f64 * PAGE_WIRE_BYTES + self.state_bytes;
        (bytes / bw + 2.0 * self.rtt.as_secs_f64()) * 1e3
    }

    /// Decides after `r`, `elapsed` into the migration.
    pub fn decide(&self, r: &RoundStats, elapsed: Duration) -> Decision {
        if elapsed.as_secs() >= self.opts.timeout_s {
            return Decision::Abort(format!(
                "timeout of {} s reached in round {}",
                self.opts.timeout_s, r.round
            ));
        }
        if r.predicted_downtime_ms <= self.opts.max_downtime_ms {
            return Decision::StopAndCopy(format!(
                "converged: predicted downtime {:.2} ms <= {} ms with {} dirty pages at {:.0} MiB/s",
                r.predicted_downtime_ms,
                self.opts.max_downtime_ms,
                r.dirty_pages,
                r.bandwidth / 1048576.0
            ));
        }
        if r.round >= self.opts.max_rounds {
            return Decision::StopAndCopy(format!(
                "max rounds ({}) reached: forcing stop-and-copy with predicted downtime {:.2} ms",
                self.opts.max_rounds, r.predicted_downtime_ms
            ));
        }
        tracing::debug!(
            round = r.round,
            dirty = r.dirty_pages,
            dirty_rate = r.dirty_rate,
            bandwidth = r.bandwidth,
            predicted_ms = r.predicted_downtime_ms,
            "pre-copy goes on"
        );
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(round: u32, predicted: f64) -> RoundStats {
        RoundStats {
            round,
            predicted_downtime_ms: predicted,
            ..Default::default()
        }
    }

    #[test]
    fn decisions_follow_the_limits() {
        let opts = MigrateOptions {
            max_downtime_ms: 50.0,
            max_rounds: 5,
            timeout_s: 10,
            ..Default::default()
        };
        let c = Controller::new(&opts, 10_000, Duration::from_micros(100));
        let d = Duration::from_secs(1);
        assert_eq!(c.decide(&round(1, 80.0), d), Decision::Continue);
        assert!(
            matches!(c.decide(&round(2, 20.0), d), Decision::StopAndCopy(r) if r.starts_with("converged"))
        );
        assert!(
            matches!(c.decide(&round(5, 80.0), d), Decision::StopAndCopy(r) if r.starts_with("max rounds"))
        );
        assert!(matches!(
            c.decide(&round(2, 80.0), Duration::from_secs(10)),
            Decision::Abort(_)
        ));
    }

    #[test]
    fn prediction_is_bytes_over_bandwidth_plus_round_trips() {
        let c = Controller::new(&MigrateOptions::default(), 0, Duration::from_millis(1));
        // 256 pages of 4104 wire bytes at 1 MiB/s: ~1002 ms, plus 2 ms of round trips.
        let p = c.predict_ms(256, 1048576.0);
        assert!((p - (256.0 * 4104.0 / 1048576.0 * 1e3 + 2.0)).abs() < 1e-6);
    }
}
