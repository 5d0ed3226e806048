//! Stage 3, iterative pre-copy: round 1 sends every page (zero pages as markers), each later
//! round the pages dirtied since, and the disk blocks written since; after each round the controller measures and decides:
//! another round, throttle, stop and copy, switch to post-copy, or give up.

use std::time::{Duration, Instant};

use super::disk::DiskMirror;
use super::stream::{self, Batch};
use super::Run;
use crate::migrate::controller::{Controller, Decision};
use crate::migrate::holdback::Holdback;
use crate::migrate::probe::RoundProbes;
use crate::migrate::report::{Decided, ProgressNote, ProgressPhase, StopReason};
use crate::migrate::{MigrateError, Phase, Progress, RoundStats};
use crate::wire::messages as msg;
use crate::wire::pages::PageFrameKind;

/// How pre-copy ended.
#[derive(Debug, Clone)]
pub(super) enum End {
    /// Stop and copy, and why.
    StopAndCopy(StopReason),
    /// Switch to post-copy, and why.
    Postcopy(StopReason),
}

/// What pre-copy leaves to the pause and the commitment.
pub(super) struct Precopied {
    /// The rounds so far (the pause adds the last).
    pub(super) rounds: Vec<RoundStats>,
    /// The controller's decisions that changed something.
    pub(super) decisions: Vec<Decided>,
    /// Pages dirty and not sent yet (held back included).
    pub(super) pending: Vec<u64>,
    /// The dirty-rate probes: detached only once the destination runs the VM.
    pub(super) probes: RoundProbes,
    /// Pages the guest had touched when pre-copy began.
    pub(super) touched: u64,
    /// Dirty-ring counters (entries, full exits) when pre-copy began.
    pub(super) ring_before: (u64, u64),
    /// The round trip measured at the hello.
    pub(super) rtt: Duration,
    /// How it ended.
    pub(super) end: End,
}

/// Runs pre-copy rounds until the controller ends them.
pub(super) fn rounds(run: &mut Run<'_>, rtt: Duration) -> Result<Precopied, MigrateError> {
    let (vm, opts) = (run.out.vm, run.opts);
    vm.dirty().mode().check(opts.dirty_tracking)?;
    let ring_before = vm.dirty().ring_counters();
    let mut probes = RoundProbes::attach(vm);
    let mut holdback = Holdback::new(opts.holdback_rounds, vm.ram().pages());
    vm.dirty().start()?;
    let populated = vm.ram().populated()?;
    let touched = populated.iter().filter(|p| **p).count() as u64;
    let state_bytes = bincode::serialized_size(&vm.devices().save()).unwrap_or(0)
        + 8192 * vm.spec().programs.len() as u64;
    let mut controller = Controller::new(opts, state_bytes, rtt);
    let mut decisions = Vec::new();
    let mut rounds = Vec::new();
    let mut pending: Vec<u64> = (0..vm.ram().pages()).collect();
    let mut populated = Some(populated);
    let end = loop {
        let round = rounds.len() as u32 + 1;
        let t = Instant::now();
        let first = populated.take();
        let batch = Batch {
            kind: PageFrameKind::Pages,
            paused: false,
            round,
            populated: first.as_deref(),
            // `--timeout` acts inside a round too: a long round (a large VM under a low
            // `--bandwidth`) stops at the deadline, and what it did not send stays pending.
            deadline: Some(run.t0 + Duration::from_secs(opts.timeout_s)),
        };
        let sendable = holdback.sendable(&pending);
        let mut stats = stream::send_pages(
            &mut run.link,
            vm,
            &sendable,
            batch,
            run.progress,
            run.cancel,
        )?;
        let sent = stats.pages as usize;
        let unsent = &sendable[sent..];
        if !unsent.is_empty() {
            tracing::warn!(
                round,
                sent,
                unsent = unsent.len(),
                timeout_s = opts.timeout_s,
                "the timeout came in the middle of the round"
            );
        }
        // The disk's blocks written since the last round go beside the round's pages (not in a
        // round the timeout cut: they stay in the device's log for the pause).
        if let Some(disk) = run.disk.as_mut().filter(|_| unsent.is_empty()) {
            let before = run.link.writer.bytes_sent();
            let resent = disk.send_written(&mut run.link, run.out)?;
            run.link.flush()?;
            stats.disk_blocks = resent.blocks;
            stats.disk_bytes = resent.bytes;
            stats.bytes += run.link.writer.bytes_sent() - before;
        }
        run.link.send(&msg::RoundEnd {
            round,
            pages: stats.pages,
        })?;
        run.link.flush()?;
        // The round ends when the destination has placed it: its time, and the link rate
        // it gives, count what the destination still had to do.
        let placed: msg::RoundPlaced = run.link.recv_in(Phase::Precopy)?;
        if placed.round != round {
            return Err(crate::wire::WireError::Decode {
                kind: crate::wire::Kind::RoundPlaced,
                cause: format!("round {} placed at the end of round {round}", placed.round),
            }
            .into());
        }
        let dirty = vm.dirty().harvest()?;
        stats.secs = t.elapsed().as_secs_f64();
        stats.kernel = probes.end_round(round);
        stats.dirty_pages = dirty.len() as u64;
        stats.disk_dirty_blocks = DiskMirror::pending(run.out);
        pending = holdback.after_harvest(round, dirty);
        if !unsent.is_empty() {
            pending.extend_from_slice(unsent);
            pending.sort_unstable();
            pending.dedup();
        }
        stats.held_pages = holdback.held();
        stats.bandwidth = stats.bytes as f64 / stats.secs;
        controller.assess(
            &mut stats,
            pending.len() as u64,
            holdback.sendable_count(&pending),
        );
        stats.throttle_pct = vm.throttle();
        tracing::info!(
            round,
            pages = stats.pages,
            dirty = stats.dirty_pages,
            disk_blocks = stats.disk_blocks,
            disk_dirty = stats.disk_dirty_blocks,
            bandwidth = stats.bandwidth,
            predicted_ms = stats.predicted_downtime_ms,
            "pre-copy round done"
        );
        let decision = controller.decide(&stats, run.t0.elapsed());
        stats.decision = Some(decision.clone());
        let changed = decision != Decision::Continue;
        if changed {
            decisions.push(Decided {
                round,
                decision: decision.clone(),
            });
        }
        rounds.push(stats.clone());
        let mut ev = Progress::new(ProgressPhase::PreCopy, round, stats.pages, stats.pages);
        ev.last = Some(stats);
        ev.decision = changed.then(|| ProgressNote::Decided(decision.clone()));
        (run.progress)(ev);
        if run.cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        match decision {
            Decision::Continue => probes.pre_copy_goes_on(),
            Decision::Throttle { pct, .. } => {
                vm.set_throttle(pct);
                probes.pre_copy_goes_on();
            }
            Decision::StopAndCopy(why) => break End::StopAndCopy(why),
            Decision::Postcopy(why) => break End::Postcopy(why),
            Decision::Abort(why) => {
                tracing::warn!(%why, "aborting");
                if run.t0.elapsed().as_secs() >= opts.timeout_s {
                    return Err(MigrateError::Timeout(opts.timeout_s));
                }
                return Err(MigrateError::NoConvergence(why.to_string()));
            }
        }
    };
    match &end {
        End::StopAndCopy(why) => tracing::info!(reason = %why, "stop-and-copy"),
        End::Postcopy(why) => tracing::info!(reason = %why, "switching to post-copy"),
    }
    // The probes only serve pre-copy decisions, but detaching takes tens of milliseconds:
    // not between the last harvest and the pause (the guest would dirty on meanwhile), nor
    // during the pause; after the destination runs the VM.
    Ok(Precopied {
        rounds,
        decisions,
        pending,
        probes,
        touched,
        ring_before,
        rtt,
        end,
    })
}
