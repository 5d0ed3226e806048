//! Fault statistics: counters and a fault-latency histogram, updated lock-free from any thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: latencies are recorded within 1/8 (12.5 %) of their value.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for latencies up to 2^40 µs (about 12 days).
const BUCKETS: usize = ((40 - SUB_BITS + 1) as usize + 1) * SUB as usize;

/// A snapshot of what the fault handler and `place` have done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Missing-page fault events read from the userfaultfd (several vCPUs faulting on one page
    /// count once each).
    pub faults: u64,
    /// Faults on a page another fault had already requested (not requested again).
    pub duplicate_faults: u64,
    /// Faults on a page that had been placed meanwhile: resolved with `UFFDIO_WAKE`.
    pub already_present: u64,
    /// Faults on known (zero) pages resolved locally with `UFFDIO_ZEROPAGE`, never asked of the source.
    pub zero_local: u64,
    /// Successful [`PageSource::request`](crate::PageSource::request) calls.
    pub requests: u64,
    /// Failed [`PageSource::request`](crate::PageSource::request) calls (the page stays pending).
    pub request_errors: u64,
    /// Pages placed with [`Placement::Demand`](crate::Placement::Demand).
    pub pages_demand: u64,
    /// Pages placed with [`Placement::Push`](crate::Placement::Push).
    pub pages_pushed: u64,
    /// Bytes copied for demand placements (zero pages count no bytes).
    pub bytes_demand: u64,
    /// Bytes copied for pushed placements (zero pages count no bytes).
    pub bytes_pushed: u64,
    /// Placements of pages that were already present (returned `Ok(false)`).
    pub redundant_places: u64,
    /// Latency from a page's first fault to its placement, for every faulted page placed.
    pub latency: LatencySummary,
}

/// Percentiles of the fault latency, in microseconds (bucket upper bounds, within 12.5 %).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of latencies recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest latency recorded (exact).
    pub max_us: u64,
}

/// Live counters behind [`FaultStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub duplicate_faults: AtomicU64,
    pub already_present: AtomicU64,
    pub zero_local: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub pages_demand: AtomicU64,
    pub pages_pushed: AtomicU64,
    pub bytes_demand: AtomicU64,
    pub bytes_pushed: AtomicU64,
    pub redundant_places: AtomicU64,
    pub latency: LatencyHistogram,
}

impl Counters {
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FaultStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            faults: get(&self.faults),
            duplicate_faults: get(&self.duplicate_faults),
            already_present: get(&self.already_present),
            zero_local: get(&self.zero_local),
            requests: get(&self.requests),
            request_errors: get(&self.request_errors),
            pages_demand: get(&self.pages_demand),
            pages_pushed: get(&self.pages_pushed),
            bytes_demand: get(&self.bytes_demand),
            bytes_pushed: get(&self.bytes_pushed),
            redundant_places: get(&self.redundant_places),
            latency: self.latency.summary(),
        }
    }
}

/// A log-linear histogram of microsecond latencies (HDR-histogram style, 8 sub-buckets per
/// power of two).
#[derive(Debug)]
pub(crate) struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    max_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = bucket_of(us).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let max_us = self.max_us.load(Ordering::Relaxed);
        let percentile = |p: u64| -> u64 {
            if count == 0 {
                return 0;
            }
            // The rank of the p-th percentile, 1-based, rounded up.
            let rank = (count * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (bucket, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return upper_bound(bucket).min(max_us);
                }
            }
            max_us
        };
        LatencySummary {
            count,
            p50_us: percentile(50),
            p99_us: percentile(99),
            max_us,
        }
    }
}

/// Values below `SUB` get one bucket each; above, each power of two splits into `SUB` buckets.
fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as usize) * SUB as usize + sub as usize
}

/// The largest value that falls in `bucket`.
fn upper_bound(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let exp = bucket / SUB - 1 + u64::from(SUB_BITS);
    let sub = bucket % SUB;
    let low = (1u64 << exp) + (sub << (exp - u64::from(SUB_BITS)));
    low + (1u64 << (exp - u64::from(SUB_BITS))) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_that_bounds_it() {
        for us in (0..5000).chain([1 << 20, (1 << 30) + 12345, 1 << 39]) {
            let bucket = bucket_of(us);
            assert!(upper_bound(bucket) >= us, "{us} in {bucket}");
            if bucket > 0 {
                assert!(upper_bound(bucket - 1) < us, "{us} in {bucket}");
            }
        }
    }

    #[test]
    fn percentiles_come_within_an_eighth() {
        let h = LatencyHistogram::default();
        for us in 1..=1000 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max_us, 1000);
        assert!((500..=563).contains(&s.p50_us), "{s:?}");
        assert!((990..=1000).contains(&s.p99_us), "{s:?}");
    }

    #[test]
    fn empty_histogram_reports_zero() {
        assert_eq!(
            LatencyHistogram::default().summary(),
            LatencySummary::default()
        );
    }
}
