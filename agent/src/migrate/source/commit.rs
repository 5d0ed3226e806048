//! Stage 5, commitment: `Go` → `Running`. From `Go` on the destination owns the VM: with no
//! `Running` the outcome is unknown and the VM stays paused here. Then the source releases
//! the VM (`Released`), or, after a post-copy switch, first serves the pages the destination
//! still lacks (it keeps every page until the destination holds them all).

use std::time::{Duration, Instant};

use super::precopy::Precopied;
use super::stop_and_copy::Paused;
use super::{finished, resume, Outcome, Run};
use crate::guest::layout::PAGE_SIZE;
use crate::migrate::report::{IoUsed, MemoryCheck, Mode};
use crate::migrate::{MigrateError, PageSum, Phase, Report, Verification};
use crate::wire::messages as msg;

/// Sends `Go`, waits for `Running`, writes the report; releases the VM or serves post-copy.
pub(super) fn go(
    run: &mut Run<'_>,
    mut pre: Precopied,
    paused: Paused,
) -> Result<Outcome, MigrateError> {
    let (out, vm) = (run.out, run.out.vm);
    let t_go = Instant::now();
    let running = run
        .link
        .send(&msg::Go {})
        .and_then(|()| run.link.recv::<msg::Running>());
    let t_run = Instant::now();
    let running = running.map_err(|e| MigrateError::CommitUnknown(e.to_string()))?;
    let downtime = downtime_of(
        t_go - paused.t_pause,
        t_run - t_go,
        Duration::from_micros(running.resume_us),
    );
    // The verification inside the pause: the longer of the two sides' digests (they run
    // side by side).
    // side by side), or the destination's alone when this side hashes after the resume.
    let verify_at_pause = paused.verification.as_ref().map_or(0.0, |v| {
        let ms = match v.memory_checked {
            MemoryCheck::Pause => v.dest_verify_ms.max(v.source_verify_ms),
            MemoryCheck::AfterResume | MemoryCheck::Postcopy => v.dest_verify_ms,
        };
        (ms / 1e3).min(downtime.as_secs_f64())
    });
    let downtime = downtime.as_secs_f64();
    // Why the kernel's dirty rates were not used, if they were not (an attach still running
    // is not waited for: it finishes, and detaches, on its own thread).
    let kernel_rates_off = pre.probes.final_off_reason();
    let t_detach = Instant::now();
    drop(pre.probes);
    tracing::debug!(
        ms = t_detach.elapsed().as_secs_f64() * 1e3,
        "dirty-rate probes detached"
    );
    tracing::info!(
        resume_us = running.resume_us,
        ready_verify_ms = paused.ready.verify_ms,
        "destination runs the VM"
    );
    let _ = vm.dirty().stop();
    let (entries1, full1) = vm.dirty().ring_counters();
    let (entries0, full0) = pre.ring_before;
    let rounds = pre.rounds;
    let stop_reason = match pre.end {
        super::precopy::End::StopAndCopy(why) | super::precopy::End::Postcopy(why) => why,
    };
    let report = Report {
        vm: out.def.name.clone(),
        from: out.agent.into(),
        to: run.dest_name.into(),
        downtime_ms: downtime * 1e3,
        verify_at_pause_ms: verify_at_pause * 1e3,
        downtime_without_verify_ms: (downtime - verify_at_pause) * 1e3,
        pause_ms: paused.pause.as_secs_f64() * 1e3,
        rtt_us: pre.rtt.as_secs_f64() * 1e6,
        pages_sent: rounds.iter().map(|r| r.pages).sum(),
        zero_pages: rounds.iter().map(|r| r.zero_pages).sum(),
        rounds,
        stop_reason,
        memory_bytes: vm.ram().size(),
        memory_touched_bytes: pre.touched * PAGE_SIZE,
        io_path: if run.link.writer.encrypted() {
            IoUsed::Tls
        } else if run.link.writer.uses_uring() {
            IoUsed::IoUring
        } else {
            IoUsed::Plain
        },
        dirty_tracking: vm.dirty().mode().into(),
        ring_entries: entries1 - entries0,
        ring_full_exits: full1 - full0,
        counter_at_pause: paused.counter_at_pause,
        verification: paused.verification,
        mode: if paused.session.is_some() {
            Mode::PostCopy
        } else {
            Mode::PreCopy
        },
        postcopy_policy: run.opts.postcopy.to_string(),
        decisions: pre.decisions,
        kernel_rates_off,
        compression: run.link.compressor.as_ref().map(|c| c.stats()),
        disk: run
            .disk
            .as_ref()
            .map(|d| d.report.clone())
            .or_else(|| run.shared.clone()),
        ..Default::default()
    };
    let Some(session) = paused.session else {
        let mut report = report;
        if let Some(v) = report.verification.as_mut() {
            if v.memory_checked == MemoryCheck::AfterResume {
                if let Err(why) = check_after_resume(vm, v) {
                    return refuse_copy(run, report, why);
                }
            }
        }
        run.cancel.enter(Phase::Done)?;
        let _ = run.link.send(&msg::Released {});
        vm.devices()
            .log_line(&format!("migrated to {}", run.dest_name));
        return Ok(Outcome::Committed(Box::new(finished(
            report,
            run.link.writer.bytes_sent(),
            run.t0,
        ))));
    };
    run.cancel.enter(Phase::Postcopy)?;
    vm.devices()
        .log_line(&format!("post-copy to {}: serving pages", run.dest_name));
    let parked = resume::park(run, session, pre.pending, report);
    Ok(resume::finish(
        out,
        parked,
        Some(&mut run.link),
        run.progress,
    ))
}

/// `--verify` after the resume: this side's memory, paused since the pause and untouched
/// since, hashed now (while the guest runs on the destination) against the page sum the
/// destination kept as it placed pages (`Ready`). A dirty-tracking miss shows here: the
/// destination holds the page as last sent, this side as last written.
fn check_after_resume(vm: &crate::vm::Vm, v: &mut Verification) -> Result<(), String> {
    let t = Instant::now();
    let sum = PageSum::of_ram(vm.ram(), |_| true).map_err(|e| e.to_string())?;
    v.source_verify_ms = t.elapsed().as_secs_f64() * 1e3;
    v.source_memory = sum.hex();
    v.memory_equal = v.source_memory == v.dest_memory;
    tracing::info!(
        ms = v.source_verify_ms,
        equal = v.memory_equal,
        "memory checked after the resume"
    );
    if v.memory_equal {
        Ok(())
    } else {
        Err(format!(
            "memory {} here vs {} on the destination",
            v.source_memory, v.dest_memory
        ))
    }
}

/// The check after the resume failed: the destination is told (`Abort`) and removes its
/// copy; on its `Discarded` the VM is this side's again and runs here (the migration fails
/// as any failure before `Go`); without it (no answer) the VM stays paused here, parked for
/// `--rollback`, since the destination's copy may still run.
fn refuse_copy(run: &mut Run<'_>, report: Report, why: String) -> Result<Outcome, MigrateError> {
    let vm = run.out.vm;
    tracing::error!(cause = %why, "verification after the resume failed: the VM is not released");
    let discarded = run
        .link
        .send(&msg::Abort {
            reason: format!("verification failed: {why}"),
        })
        .and_then(|()| {
            run.link.reader.set_timeout(DISCARD_TIMEOUT)?;
            run.link.recv::<msg::Discarded>()
        });
    match discarded {
        Ok(_) => {
            run.taken_back = true;
            Err(MigrateError::Verify(format!(
                "{why}; {} removed its copy",
                run.dest_name
            )))
        }
        Err(e) => {
            tracing::error!(cause = %e, "the destination did not confirm it removed its copy: the VM stays paused here");
            let mut parked = resume::park(run, 0, Vec::new(), report);
            parked.verify_failed(format!(
                "{why}; {} did not confirm it removed its copy ({e})",
                run.dest_name
            ));
            vm.devices().log_line(&format!(
                "migration to {} failed verification: paused here with all its memory",
                run.dest_name
            ));
            Ok(Outcome::Parked(parked))
        }
    }
}

/// How long the source waits for the destination to remove a copy it refused.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The downtime from each side's own events: the source's pause to its Go (`stop_to_go`,
/// source clock), the destination's Go to its vCPUs running (`resume`, destination clock),
/// and Go's transit, half of what the Go/Running exchange (`exchange`, source clock) took
/// beyond the destination's own time. Every term is at least zero.
fn downtime_of(stop_to_go: Duration, exchange: Duration, resume: Duration) -> Duration {
    stop_to_go + exchange.saturating_sub(resume) / 2 + resume
}

#[cfg(test)]
mod downtime_tests {
    use super::downtime_of;
    use std::time::Duration;

    #[test]
    fn downtime_adds_each_sides_own_interval_and_is_never_negative() {
        let ms = Duration::from_millis;
        // 10 ms paused before Go, a 4 ms exchange of which the destination took 2 ms to run
        // the vCPUs: 1 ms each way on the wire.
        assert_eq!(downtime_of(ms(10), ms(4), ms(2)), ms(13));
        // A destination whose clock says it took longer than the whole exchange: no negative
        // transit.
        assert_eq!(downtime_of(ms(1), ms(2), ms(5)), ms(6));
        assert_eq!(
            downtime_of(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            Duration::ZERO
        );
    }
}
