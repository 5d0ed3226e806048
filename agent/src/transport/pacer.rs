//! Holds a sender to a bandwidth limit (`--bandwidth`).

use std::time::{Duration, Instant};

/// A byte-rate limiter: call [`Pacer::wait`] before sending each frame.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: f64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    /// A limit of `bytes_per_sec`.
    pub fn new(bytes_per_sec: f64) -> Self {
        Self {
            bytes_per_sec,
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Sleeps until `bytes` more may go.
    pub fn wait(&mut self, bytes: u64) {
        let delay = self.delay();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.charge(bytes);
    }

    /// How long until the next bytes may go (zero: now).
    pub fn delay(&self) -> Duration {
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec);
        due.saturating_duration_since(Instant::now())
    }

    /// Counts `bytes` as sent now, without waiting: an urgent frame goes at once, and the
    /// frames after it wait for it instead.
    pub fn charge(&mut self, bytes: u64) {
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec);
        let now = Instant::now();
        if now > due && now - due > Duration::from_millis(100) {
            // Idle for a while: no credit for the past.
            self.start = now;
            self.sent = 0;
        }
        self.sent += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_delays_what_follows_by_its_share_of_the_rate() {
        let mut p = Pacer::new(1000.0);
        assert!(p.delay().is_zero(), "nothing sent: no delay");
        // 100 bytes at 1000 B/s: the next frame is due 100 ms after the start.
        p.charge(100);
        let d = p.delay();
        assert!(
            d > Duration::from_millis(50) && d <= Duration::from_millis(100),
            "{d:?}"
        );
        // Charging does not wait, and the debt adds up.
        p.charge(100);
        assert!(p.delay() > Duration::from_millis(150), "{:?}", p.delay());
    }
}
