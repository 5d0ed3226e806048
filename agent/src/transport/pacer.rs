//! Holds a sender to a bandwidth limit (`--bandwidth`): a token bucket with a small burst.
//!
//! The bucket fills at the limit and holds at most [`Pacer::burst`] bytes, so over any window
//! of `w` seconds the sender puts at most `burst + rate × w + one frame` bytes on the wire: a
//! short round cannot borrow from the idle time before it, and an urgent frame (a post-copy
//! answer) is ordered first but paid for like any other.

use std::time::{Duration, Instant};

/// The burst: this much of a second at the limit, but at least [`MIN_BURST`].
const BURST_SECONDS: f64 = 0.005;
/// The smallest burst (one small frame goes at once after idling).
const MIN_BURST: f64 = 64.0 * 1024.0;

/// A bandwidth limit that is not a positive finite number of bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("invalid bandwidth limit {0} bytes/s: it must be a positive finite number")]
pub struct InvalidRate(pub f64);

/// A byte-rate limiter: call [`Pacer::wait`] before sending each frame.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: f64,
    burst: f64,
    /// Bytes that may go now; negative: the debt of a frame larger than what was there.
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// A limit of `bytes_per_sec`, which must be positive and finite.
    pub fn new(bytes_per_sec: f64) -> Result<Self, InvalidRate> {
        if !(bytes_per_sec.is_finite() && bytes_per_sec > 0.0) {
            return Err(InvalidRate(bytes_per_sec));
        }
        let burst = (bytes_per_sec * BURST_SECONDS).max(MIN_BURST);
        Ok(Self {
            bytes_per_sec,
            burst,
            tokens: burst,
            at: Instant::now(),
        })
    }

    /// The most bytes that can go back to back after an idle time.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.bytes_per_sec).min(self.burst);
        self.at = now;
    }

    /// Sleeps until the bucket is out of debt, then takes `bytes` from it.
    pub fn wait(&mut self, bytes: u64) {
        let delay = self.delay();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.charge(bytes);
    }

    /// How long until the next frame may go (zero: now).
    pub fn delay(&self) -> Duration {
        let elapsed = Instant::now()
            .saturating_duration_since(self.at)
            .as_secs_f64();
        let tokens = (self.tokens + elapsed * self.bytes_per_sec).min(self.burst);
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.bytes_per_sec)
        }
    }

    /// Takes `bytes` from the bucket now, without waiting (the caller has waited for
    /// [`Pacer::delay`] in its own way).
    pub fn charge(&mut self, bytes: u64) {
        self.refill(Instant::now());
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_must_be_positive_and_finite() {
        for bad in [0.0, -5.0, f64::NAN, f64::INFINITY, -0.0] {
            assert_eq!(Pacer::new(bad).unwrap_err().0.to_bits(), bad.to_bits());
        }
        assert!(Pacer::new(1.0).is_ok());
    }

    #[test]
    fn a_charge_beyond_the_burst_delays_what_follows_by_its_share_of_the_rate() {
        let mut p = Pacer::new(1_000_000.0).unwrap();
        assert!(p.delay().is_zero(), "nothing sent: no delay");
        // The burst (64 KiB) goes at once; 100 kB more is 100 ms of debt at 1 MB/s.
        p.charge(p.burst() + 100_000);
        let d = p.delay();
        assert!(
            d > Duration::from_millis(80) && d <= Duration::from_millis(100),
            "{d:?}"
        );
        p.charge(100_000);
        assert!(p.delay() > Duration::from_millis(180), "{:?}", p.delay());
    }

    #[test]
    fn idle_time_earns_no_more_than_the_burst() {
        let mut p = Pacer::new(10.0 * 1048576.0).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // 200 ms idle at 10 MiB/s would be 2 MiB of credit; the bucket holds 64 KiB.
        p.charge(p.burst() + 1048576);
        let d = p.delay();
        assert!(
            d >= Duration::from_millis(90),
            "idle time became credit: {d:?}"
        );
    }

    #[test]
    fn the_rate_over_a_window_stays_at_the_limit() {
        // 20 MiB/s with 256 KiB frames for 300 ms: at most burst + 6 MiB + one frame.
        let rate = 20.0 * 1048576.0;
        let mut p = Pacer::new(rate).unwrap();
        let frame = 256 * 1024;
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            p.wait(frame);
            sent += frame;
        }
        let secs = start.elapsed().as_secs_f64();
        let bound = p.burst() as f64 + rate * secs + frame as f64;
        assert!(
            (sent as f64) <= bound,
            "sent {sent} B in {secs:.3} s, over the cap's bound {bound:.0}"
        );
        assert!(
            sent as f64 >= rate * secs * 0.8,
            "far below the limit: {sent} B in {secs:.3} s"
        );
    }
}
