//! The pre-copy controller: after every round it predicts the downtime of stopping now from
//! measured figures and decides whether to go on.
//!
//! ## Which dirty count the prediction uses
//!
//! Two independent counts of the pages dirtied in a round are available: the dirty log's
//! (pages harvested from KVM's ring or bitmap) and, when the BPF probes are on
//! ([`super::probe`]), the kernel's (distinct pages KVM pushed onto the dirty rings during the
//! round's window, counted in BPF). Both should agree; each can only err low for reasons the
//! other does not share: the log loses pages if harvesting has a bug or a ring overflows
//! (entries KVM never pushed, or entries the harvester skipped), while the probe can only
//! over-count (its LRU map evicting a page). A prediction that errs low stops too early and
//! overshoots `--max-downtime`; one that errs high costs one more round. So
//! [`Controller::assess`] takes the **larger** of the two, the conservative estimate, and
//! records which one won (`RoundStats::estimate_from`). Dirty-ring pushes per second are shown
//! but not used: they count writes, not pages (an emulated guest pushes one entry per write).

use std::time::Duration;

pub use super::report::Decision;
use super::report::{Cause, EstimateFrom, KernelRound, StopReason};
use super::{MigrateOptions, NoConverge, PostcopyPolicy, RoundStats};
use crate::guest::layout::PAGE_SIZE;
use crate::storage::DISK_BLOCK;

/// Bytes of a page on the wire (data plus its 8-byte entry).
const PAGE_WIRE_BYTES: f64 = PAGE_SIZE as f64 + 8.0;

/// Throttle steps of auto-converge, percent of each interval the vCPUs sleep.
pub const THROTTLE_STEPS: [u32; 5] = [20, 40, 60, 80, 99];

/// Decides, round by round.
#[derive(Debug)]
pub struct Controller {
    opts: MigrateOptions,
    /// Expected size of the vCPU and device state, bytes.
    state_bytes: f64,
    rtt: Duration,
    /// Rounds seen so far.
    history: Vec<RoundStats>,
    /// Current throttle step (index into [`THROTTLE_STEPS`] + 1; 0 = none).
    throttle_step: usize,
    /// Round at which the throttle last changed (the judgement restarts from it).
    throttle_round: u32,
    /// Pending pages the next round would send (all but those held back), from `assess`.
    sendable: Option<u64>,
    /// The link's rate, bytes/s, from the last round that sent enough to measure it.
    link_rate: Option<f64>,
    /// The rate the last `assess` predicted with, bytes/s.
    assessed_rate: f64,
    /// The kernel's round-1 rate, kept for round 2 when round 1's link rate was not the
    /// link's (no `--bandwidth` cap held it): see [`Controller::kernel_hopeless`].
    kernel_round1: Option<KernelRound>,
    /// Under `--verify`: seconds the destination spends per page of the last round on its
    /// memory digest with the VM paused (one page hash), measured on this host at the start.
    verify_page_s: f64,
}

/// Seconds to hash one page into a page sum (BLAKE3, as the destination does for each page of
/// the last round), measured over a few hundred pages of varied content.
fn verify_cost_per_page() -> f64 {
    const PAGES: usize = 256;
    let page: Vec<u8> = (0..crate::guest::layout::PAGE_SIZE as usize)
        .map(|i| (i * 31 % 251) as u8 | 1)
        .collect();
    let mut sum = crate::migrate::PageSum::default();
    let t = std::time::Instant::now();
    for i in 0..PAGES as u64 {
        sum.add(i, &page);
    }
    std::hint::black_box(sum);
    t.elapsed().as_secs_f64() / PAGES as f64
}

/// A round that sent less than this measures nothing about the link (a few headers in a
/// fraction of a millisecond): the prediction keeps the rate measured before.
const MIN_MEASURED_BYTES: u64 = 256 << 10;
/// The rate assumed before any round measured one, bytes/s, when no `--bandwidth` cap says
/// better (loopback and 10 GbE are faster; the first real round replaces it).
const PRIOR_RATE: f64 = 100.0 * 1048576.0;

impl Controller {
    /// A controller for these options.
    pub fn new(opts: &MigrateOptions, state_bytes: u64, rtt: Duration) -> Self {
        Self {
            opts: opts.clone(),
            state_bytes: state_bytes as f64,
            rtt,
            history: Vec::new(),
            throttle_step: 0,
            throttle_round: 0,
            sendable: None,
            link_rate: None,
            assessed_rate: PRIOR_RATE,
            kernel_round1: None,
            verify_page_s: if opts.verify {
                verify_cost_per_page()
            } else {
                0.0
            },
        }
    }

    /// The link rate the prediction uses after round `r`: its own if it sent enough to
    /// measure one, else the last measured, else the `--bandwidth` cap, else [`PRIOR_RATE`].
    ///
    /// Under `--compress` the rate is the data pages' (their uncompressed wire size over the
    /// round's time): what is predicted is how long the remaining pages take, and the bytes they take
    /// on the wire depend on their content.
    fn link_rate(&mut self, r: &RoundStats) -> f64 {
        let (bytes, rate) = match self.opts.compress {
            super::Compression::Off => (r.bytes, r.bandwidth),
            super::Compression::Zstd { .. } => {
                // Data pages only: a zero page is an 8-byte entry, compressed or not.
                let page_bytes = r.pages.saturating_sub(r.zero_pages) as f64 * PAGE_WIRE_BYTES;
                (page_bytes as u64, page_bytes / r.secs.max(1e-9))
            }
        };
        if bytes >= MIN_MEASURED_BYTES && rate.is_finite() && rate > 0.0 {
            self.link_rate = Some(rate);
        }
        self.link_rate
            .or(self.opts.bandwidth_mibs.map(|m| m * 1048576.0))
            .unwrap_or(PRIOR_RATE)
    }

    /// Predicted downtime of stopping now: remaining bytes over the measured bandwidth, plus
    /// the state, plus the commit round trips (Ready, Go/Running), plus under `--verify` the
    /// destination's hashing of those pages (the rest of the check is off the pause).
    pub fn predict_ms(&self, dirty_pages: u64, bandwidth: f64) -> f64 {
        let bw = bandwidth.max(1.0);
        let bytes = dirty_pages as f64 * PAGE_WIRE_BYTES + self.state_bytes;
        let verify = dirty_pages as f64 * self.verify_page_s;
        (bytes / bw + 2.0 * self.rtt.as_secs_f64() + verify) * 1e3
    }

    /// Fills in the round's dirty rate, dirty ratio and predicted downtime from the dirty log's
    /// count (`r.dirty_pages`), the kernel's (`r.kernel`, if any) and `pending`, the pages that
    /// stopping now would send (the log's dirty pages plus any held back earlier and not
    /// dirtied again). The larger of the two dirty counts wins (module docs). `sendable` is how
    /// many of the pending pages the next round would send (hot-page holdback keeps the rest
    /// for stop-and-copy): with none, pre-copy has nothing left to do.
    pub fn assess(&mut self, r: &mut RoundStats, pending: u64, sendable: u64) {
        self.sendable = Some(sendable);
        let held_extra = pending.saturating_sub(r.dirty_pages);
        let kernel = r.kernel.map(|k| k.distinct_pages);
        let (dirty, from) = match kernel {
            Some(k) if k > r.dirty_pages => (k, EstimateFrom::Kernel),
            _ => (r.dirty_pages, EstimateFrom::Log),
        };
        r.estimate_from = Some(from);
        r.dirty_rate = dirty as f64 / r.secs.max(1e-9);
        let rate = self.link_rate(r);
        self.assessed_rate = rate;
        // The disk's blocks written during the round go at the pause too, and its writes eat
        // the link like dirty pages do.
        let disk_bytes = (r.disk_dirty_blocks * DISK_BLOCK) as f64;
        r.predicted_downtime_ms =
            self.predict_ms(dirty + held_extra, rate) + disk_bytes / rate.max(1.0) * 1e3;
        r.dirty_ratio =
            Self::dirty_ratio(r.dirty_rate, rate) + disk_bytes / r.secs.max(1e-9) / rate.max(1.0);
    }

    /// dirty rate × page bytes / bandwidth: the fraction of the link the guest's writes eat.
    pub fn dirty_ratio(dirty_rate: f64, bandwidth: f64) -> f64 {
        dirty_rate * PAGE_WIRE_BYTES / bandwidth.max(1.0)
    }

    /// The throttle in force, percent.
    pub fn throttle_pct(&self) -> u32 {
        match self.throttle_step {
            0 => 0,
            n => THROTTLE_STEPS[n - 1],
        }
    }

    /// Whether pre-copy is hopeless after the rounds seen: `Some(why)` once at least
    /// `min_rounds` rounds ran (and 2 since the last throttle change) and either the dirty ratio
    /// stayed at or above the threshold for the last 2 rounds, or the dirty set did not shrink
    /// by 10 % over the last 2 rounds.
    fn hopeless(&self) -> Option<StopReason> {
        let n = self.history.len();
        let last = self.history.last()?;
        if last.round < self.opts.min_rounds.max(1) || n < 3 {
            return None;
        }
        if last.round < self.throttle_round + 2 {
            return None;
        }
        let (a, b) = (&self.history[n - 2], &self.history[n - 1]);
        let r = self.opts.converge_threshold;
        if a.dirty_ratio >= r && b.dirty_ratio >= r {
            return Some(StopReason::new(Cause::DirtyRatio, format!(
                "dirty ratio {:.2} and {:.2} >= threshold {r} in rounds {} and {} ({:.0} pages/s dirtied vs {:.1} MiB/s)",
                a.dirty_ratio, b.dirty_ratio, a.round, b.round, b.dirty_rate, b.bandwidth / 1048576.0
            )));
        }
        let before = &self.history[n - 3];
        if b.dirty_pages as f64 > 0.9 * before.dirty_pages as f64 {
            return Some(StopReason::new(Cause::NoShrink, format!(
                "dirty set did not shrink by 10 % over 2 rounds: {} pages after round {}, {} after round {}",
                before.dirty_pages, before.round, b.dirty_pages, b.round
            )));
        }
        None
    }

    /// Whether round 1 already shows pre-copy hopeless from the kernel's rate: the guest's
    /// distinct dirtying rate at the end of round 1, sustained over two samples (see
    /// [`super::probe`]), eats at least `--converge-threshold` of the link, so every later
    /// round would leave at least that fraction of itself to the next. Needs the probes on
    /// (ring mode), `kernel_judge`, no throttle yet, and a dirty log that saw at least one
    /// sample's pages (the two counts agree on the order of magnitude).
    ///
    /// Why this is sound where the log's own round-1 figure is not: the log's count is the
    /// union of everything written during round 1, whose rate (that count over the round's
    /// length) is low for any guest rewriting a working set smaller than what it writes in a
    /// round; a 50 ms sample is shorter than that, and it is taken at the round's end, so a
    /// burst at the start of the migration has passed.
    ///
    /// Which link rate it is judged against: round 1's only if a `--bandwidth` cap held it
    /// (the round ran at 90 % of the cap or more), since then it is the link's. Otherwise
    /// round 1 measured less than the link carries: the destination touches each page for the
    /// first time, the disk's image goes, and the guest's vCPUs share the CPU with a sender
    /// that has most of memory to scan (measured: 156-184 MiB/s in round 1 against over
    /// 1,000 MiB/s in round 2 of the same loopback migration). The kernel's round-1 rate is
    /// then judged against round 2's link rate, at the end of round 2: still a round before the
    /// dirty log's own judgement can come.
    fn kernel_hopeless(&mut self, r: &RoundStats) -> Option<StopReason> {
        if !self.opts.kernel_judge || self.throttle_step > 0 {
            return None;
        }
        let (k, link_from) = match r.round {
            1 => {
                let k = r.kernel.as_ref()?;
                if k.rate_samples < 2 {
                    return None;
                }
                // The log's round-1 set holds every page of every sample (the probe can
                // over-count only by its LRU map's evictions).
                if k.rate_pages_per_s <= 0.0
                    || (r.dirty_pages as f64) < 0.9 * k.distinct_pages as f64
                {
                    return None;
                }
                let capped = self
                    .opts
                    .bandwidth_mibs
                    .is_some_and(|cap| r.bandwidth >= 0.9 * cap * 1048576.0);
                if !capped {
                    self.kernel_round1 = Some(*k);
                    return None;
                }
                (*k, "round 1, at the --bandwidth cap")
            }
            2 => (self.kernel_round1.take()?, "round 2"),
            _ => return None,
        };
        let ratio = Self::dirty_ratio(k.rate_pages_per_s, self.assessed_rate);
        let t = self.opts.converge_threshold;
        (ratio >= t).then(|| StopReason::new(Cause::KernelRate, format!(
            "kernel-measured dirty rate {:.0} pages/s ({:.1} MiB/s) at the end of round 1 is {ratio:.2} of the link's {:.1} MiB/s (measured in {link_from}) >= threshold {t} (predicted downtime {:.2} ms)",
            k.rate_pages_per_s,
            k.rate_pages_per_s * PAGE_WIRE_BYTES / 1048576.0,
            self.assessed_rate / 1048576.0,
            r.predicted_downtime_ms
        )))
    }

    /// What to do when pre-copy cannot go on (`why`), per policy.
    fn give_up(&mut self, why: StopReason, round: u32) -> Decision {
        match (self.opts.postcopy, self.opts.on_no_converge) {
            (PostcopyPolicy::Auto | PostcopyPolicy::Always, _) => Decision::Postcopy(why),
            (PostcopyPolicy::Never, NoConverge::Force) => Decision::StopAndCopy(why),
            (PostcopyPolicy::Never, NoConverge::Abort) => Decision::Abort(why),
            (PostcopyPolicy::Never, NoConverge::Throttle) => {
                if self.throttle_step < THROTTLE_STEPS.len() {
                    self.throttle_step += 1;
                    self.throttle_round = round;
                    Decision::Throttle {
                        pct: self.throttle_pct(),
                        why,
                    }
                } else {
                    Decision::StopAndCopy(StopReason::new(
                        Cause::ThrottleExhausted,
                        format!(
                            "{why}; throttle already at {} %: forcing stop-and-copy",
                            self.throttle_pct()
                        ),
                    ))
                }
            }
        }
    }

    /// Decides after `r`, `elapsed` into the migration. Every decision is logged with the
    /// figures behind it.
    pub fn decide(&mut self, r: &RoundStats, elapsed: Duration) -> Decision {
        self.history.push(r.clone());
        let d = self.decide_inner(r, elapsed);
        tracing::info!(
            round = r.round,
            dirty = r.dirty_pages,
            dirty_rate = r.dirty_rate,
            bandwidth = r.bandwidth,
            dirty_ratio = r.dirty_ratio,
            predicted_ms = r.predicted_downtime_ms,
            throttle = r.throttle_pct,
            decision = %d,
            "controller decision"
        );
        d
    }

    fn decide_inner(&mut self, r: &RoundStats, elapsed: Duration) -> Decision {
        if elapsed.as_secs() >= self.opts.timeout_s {
            let why = StopReason::new(
                Cause::Timeout,
                format!(
                    "timeout of {} s reached in round {}",
                    self.opts.timeout_s, r.round
                ),
            );
            return match self.opts.postcopy {
                PostcopyPolicy::Never => Decision::Abort(why),
                _ => Decision::Postcopy(why),
            };
        }
        if self.opts.postcopy == PostcopyPolicy::Always {
            return Decision::Postcopy(StopReason::new(
                Cause::PolicyAlways,
                format!(
                    "policy always: post-copy after round {} (predicted downtime {:.2} ms)",
                    r.round, r.predicted_downtime_ms
                ),
            ));
        }
        if r.predicted_downtime_ms <= self.opts.max_downtime_ms {
            return Decision::StopAndCopy(StopReason::new(
                Cause::Converged,
                format!(
                    "converged: predicted downtime {:.2} ms <= {} ms with {} dirty pages at {:.0} MiB/s{}",
                    r.predicted_downtime_ms,
                    self.opts.max_downtime_ms,
                    r.dirty_pages,
                    // The rate the prediction used (under `--compress`: of the pages' own
                    // size, not of the bytes they took on the wire).
                    self.assessed_rate / 1048576.0,
                    match self.opts.compress {
                        super::Compression::Off => "",
                        super::Compression::Zstd { .. } => " of pages (compressed)",
                    }
                ),
            ));
        }
        if r.round >= self.opts.max_rounds {
            let why = StopReason::new(
                Cause::MaxRounds,
                format!(
                    "max rounds ({}) reached with predicted downtime {:.2} ms",
                    self.opts.max_rounds, r.predicted_downtime_ms
                ),
            );
            return match (self.opts.postcopy, self.opts.on_no_converge) {
                (PostcopyPolicy::Never, NoConverge::Abort) => Decision::Abort(why),
                (PostcopyPolicy::Never, _) => Decision::StopAndCopy(StopReason::new(
                    Cause::MaxRounds,
                    format!(
                        "max rounds ({}) reached: forcing stop-and-copy with predicted downtime {:.2} ms",
                        self.opts.max_rounds, r.predicted_downtime_ms
                    ),
                )),
                _ => Decision::Postcopy(why),
            };
        }
        if self.sendable == Some(0) && r.held_pages > 0 {
            let why = StopReason::new(Cause::NothingLeft, format!(
                "hot-page holdback: all {} pending pages are held back until the end, pre-copy has nothing left to send (predicted downtime {:.2} ms)",
                r.held_pages, r.predicted_downtime_ms
            ));
            return self.give_up(why, r.round);
        }
        if let Some(why) = self.kernel_hopeless(r) {
            return self.give_up(why, r.round);
        }
        if let Some(why) = self.hopeless() {
            return self.give_up(why, r.round);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests;
