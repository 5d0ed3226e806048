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
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > Duration::from_millis(100) {
            // Idle for a while: no credit for the past.
            self.start = now;
            self.sent = 0;
        }
        self.sent += bytes;
    }
}
