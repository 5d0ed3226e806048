//! The source side: moves a running VM to a destination agent.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::controller::{Controller, Decision};
use super::holdback::Holdback;
use super::probe::RoundProbes;
use super::{
    cpu_digest, Cancel, Fault, MigrateError, MigrateOptions, PageSum, PostcopyStats, Progress,
    Report, RoundStats, Verification,
};
use crate::guest::layout::PAGE_SIZE;
use crate::inventory::{self, VmDef};
use crate::transport::{tune_socket, FrameReader, FrameWriter, IoPath};
use crate::vm::Vm;
use crate::wire::{self, messages as msg, pages, Frame, Header, Kind};

/// File pieces are sent in chunks of this size; all-zero chunks are skipped (sparse disks).
const FILE_CHUNK: usize = 1 << 20;
/// How long to wait for a control reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the source needs to know about the VM.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Its definition.
    pub def: &'a VmDef,
    /// Its folder.
    pub dir: &'a Path,
    /// This agent's name.
    pub agent: &'a str,
}

struct Link {
    writer: FrameWriter,
    reader: FrameReader,
    inject: Option<Fault>,
}

impl Link {
    /// Connects to the agent at `dest`.
    fn connect(dest: SocketAddr, opts: &MigrateOptions) -> Result<Link, MigrateError> {
        let sock = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).map_err(|cause| {
            MigrateError::Connect {
                addr: dest.to_string(),
                cause,
            }
        })?;
        tune_socket(&sock)?;
        let bandwidth = opts.bandwidth_mibs.map(|m| m * 1048576.0);
        Ok(Link {
            writer: FrameWriter::new(sock.try_clone()?, opts.io, bandwidth)?,
            reader: FrameReader::new(sock, IoPath::Plain, REPLY_TIMEOUT)?,
            inject: None,
        })
    }

    fn send<T: serde::Serialize>(&mut self, kind: Kind, m: &T) -> Result<(), MigrateError> {
        Ok(self.writer.send_bytes(wire::control_frame(kind, m))?)
    }

    /// Reads the next control frame; an `Error`/`Abort`/`Refused` from the peer becomes an
    /// error carrying its reason.
    fn recv(&mut self) -> Result<Frame, MigrateError> {
        let f = self.reader.read_frame()?;
        f.verify()?;
        match f.header.kind {
            Kind::Error | Kind::Abort => Err(MigrateError::Peer(f.decode::<msg::Abort>()?.reason)),
            Kind::Refused => Err(MigrateError::Refused(f.decode::<msg::Refused>()?.reason)),
            _ => Ok(f),
        }
    }

    /// After a send failed: the peer may have said why before closing.
    fn explain(&mut self, e: MigrateError) -> MigrateError {
        if !matches!(e, MigrateError::Io(_)) {
            return e;
        }
        let _ = self.reader.set_timeout(Duration::from_secs(2));
        match self.recv() {
            Err(peer @ (MigrateError::Peer(_) | MigrateError::Refused(_))) => peer,
            _ => e,
        }
    }
}

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

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Migrates `out.vm` to the agent at `dest`. On error the VM is running on the source as
/// before (unless the error is [`MigrateError::CommitUnknown`]).
pub fn migrate(
    out: &Outgoing<'_>,
    dest: SocketAddr,
    dest_name: &str,
    opts: &MigrateOptions,
    cancel: &Cancel,
    progress: &dyn Fn(Progress),
) -> Result<Report, MigrateError> {
    let t0 = Instant::now();
    opts.validate()?;
    progress(Progress::new("connecting", 0, 0, 0));
    let mut link = Link::connect(dest, opts)?;
    link.inject = opts.inject;
    cancel.set_socket(Some(link.writer.socket().try_clone()?));
    let vm = out.vm;
    // A panic (a bug) must not strand the VM: before Go it is an error like any other, and the
    // VM runs on here again; after Go the outcome is unknown and the VM stays paused.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(out, &mut link, dest_name, opts, cancel, progress, t0)
    }))
    .unwrap_or_else(|panic| {
        let what = panic_message(&panic);
        tracing::error!(panic = %what, "the migration thread panicked");
        Err(if cancel.is_committed() {
            MigrateError::CommitUnknown(format!("internal error after Go: {what}"))
        } else {
            MigrateError::Internal(what)
        })
    });
    cancel.set_socket(None);
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            let e = if cancel.is_cancelled() {
                MigrateError::Cancelled
            } else {
                link.explain(e).name_silent_peer(dest_name)
            };
            if matches!(
                e,
                MigrateError::CommitUnknown(_)
                    | MigrateError::PostcopyInterrupted { .. }
                    | MigrateError::PostcopyVerifyFailed { .. }
            ) {
                // Past Go: the destination may run the VM; it must never run here too.
                return Err(e);
            }
            vm.set_throttle(0);
            // Until Go the source owns the VM: tell the peer, stop logging, run again.
            let _ = link.send(
                Kind::Abort,
                &msg::Abort {
                    reason: e.to_string(),
                },
            );
            let _ = vm.dirty().stop();
            vm.resume();
            vm.devices().log_line(&format!(
                "migration to {dest_name} failed: {e}; running on the source"
            ));
            Err(e)
        }
    }
}

fn run(
    out: &Outgoing<'_>,
    link: &mut Link,
    dest_name: &str,
    opts: &MigrateOptions,
    cancel: &Cancel,
    progress: &dyn Fn(Progress),
    t0: Instant,
) -> Result<Report, MigrateError> {
    let vm = out.vm;
    // 1. Pre-migration: version, page size, CPU.
    let hello = hello(out);
    let t_hello = Instant::now();
    if link.inject == Some(Fault::BadVersion) {
        let mut f = wire::control_frame(Kind::Hello, &hello);
        let h = Header::parse(f[..wire::HEADER_LEN].try_into().expect("header"))?;
        f[..wire::HEADER_LEN].copy_from_slice(&h.encode_version(99));
        link.writer.send_bytes(f)?;
    } else {
        link.send(Kind::Hello, &hello)?;
    }
    let welcome: msg::Welcome = link.recv()?.expect(Kind::Welcome)?;
    let rtt = t_hello.elapsed();
    tracing::info!(dest = %welcome.agent, rtt_us = rtt.as_micros() as u64, "destination accepted the protocol");

    // 2. Reservation.
    link.send(
        Kind::Reserve,
        &msg::Reserve {
            name: out.def.name.clone(),
            spec: vm.spec().clone(),
            definition: out.def.to_toml(),
        },
    )?;
    let _: msg::Reserved = link.recv()?.expect(Kind::Reserved)?;
    progress(Progress::new("reserved", 0, 0, 0));
    // Every write to the disk from now on is logged, and re-sent at the pause (send_state).
    if let Some(blk) = vm.devices().blk() {
        blk.start_block_log(DISK_BLOCK);
    }
    for name in [inventory::DEFINITION, inventory::NVRAM, inventory::DISK] {
        send_file(link, out.dir, name)?;
    }

    // 3. Iterative pre-copy.
    vm.dirty().mode().check(opts.dirty_tracking)?;
    let (entries0, full0) = vm.dirty().ring_counters();
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
        let mut stats = send_pages(
            link,
            vm,
            &holdback.sendable(&pending),
            populated.take().as_deref(),
            Kind::Pages,
            false,
            round,
            progress,
            cancel,
        )?;
        link.send(
            Kind::RoundEnd,
            &msg::RoundEnd {
                round,
                pages: stats.pages,
            },
        )?;
        let dirty = vm.dirty().harvest()?;
        stats.secs = t.elapsed().as_secs_f64();
        stats.kernel = probes.end_round(round, stats.secs);
        stats.dirty_pages = dirty.len() as u64;
        pending = holdback.after_harvest(round, dirty);
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
            bandwidth = stats.bandwidth,
            predicted_ms = stats.predicted_downtime_ms,
            "pre-copy round done"
        );
        let decision = controller.decide(&stats, t0.elapsed());
        stats.decision = decision.describe();
        let changed = decision != Decision::Continue;
        if changed {
            decisions.push(format!("after round {round}: {}", decision.describe()));
        }
        rounds.push(stats.clone());
        let mut ev = Progress::new("pre-copy", round, stats.pages, stats.pages);
        ev.last = Some(stats);
        ev.decision = changed.then(|| decision.describe());
        progress(ev);
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        match decision {
            Decision::Continue => {}
            Decision::Throttle(p, _) => vm.set_throttle(p),
            Decision::StopAndCopy(why) => break End::StopAndCopy(why),
            Decision::Postcopy(why) => break End::Postcopy(why),
            Decision::Abort(why) => {
                tracing::warn!(%why, "aborting");
                if t0.elapsed().as_secs() >= opts.timeout_s {
                    return Err(MigrateError::Timeout(opts.timeout_s));
                }
                return Err(MigrateError::NoConvergence(why));
            }
        }
    };
    // The probes only serve pre-copy decisions, but detaching takes tens of milliseconds:
    // not between the last harvest and the pause (the guest would dirty on meanwhile), nor
    // during the pause; after the destination runs the VM.
    let kernel_rates_off = probes.off_reason().map(String::from);
    let (stop_reason, postcopy_why) = match end {
        End::StopAndCopy(why) => {
            tracing::info!(reason = %why, "stop-and-copy");
            (why, None)
        }
        End::Postcopy(why) => {
            tracing::info!(reason = %why, "switching to post-copy");
            (why.clone(), Some(why))
        }
    };

    // 4. Stop and copy.
    let t_pause = Instant::now();
    let pause = vm.pause();
    vm.set_throttle(0);
    let counter_at_pause = vm.stats().counter;
    let round = rounds.len() as u32 + 1;
    let session = session_id();
    let (last, ready, verification) = match &postcopy_why {
        None => stop_and_copy(out, link, opts, &mut pending, round, progress, cancel)?,
        Some(why) => postcopy_switch(out, link, opts, &mut pending, round, why, session, progress)?,
    };
    rounds.push(last);
    // 5. Commitment: from Go on the destination owns the VM.
    if !cancel.commit() {
        return Err(MigrateError::Cancelled);
    }
    link.send(Kind::Go, &msg::Go {})?;
    let t_go = Instant::now();
    let running = link
        .recv()
        .and_then(|f| Ok(f.expect::<msg::Running>(Kind::Running)?));
    let t_run = Instant::now();
    let running = running.map_err(|e| MigrateError::CommitUnknown(e.to_string()))?;
    let downtime = downtime_of(
        t_go - t_pause,
        t_run - t_go,
        Duration::from_micros(running.resume_us),
    );
    // The verification inside the pause: the longer of the two sides' digests (they run
    // side by side).
    let verify_at_pause = verification.as_ref().map_or(0.0, |v| {
        (v.dest_verify_ms.max(v.source_verify_ms) / 1e3).min(downtime.as_secs_f64())
    });
    let downtime = downtime.as_secs_f64();
    let t_detach = Instant::now();
    drop(probes);
    tracing::debug!(
        ms = t_detach.elapsed().as_secs_f64() * 1e3,
        "dirty-rate probes detached"
    );
    tracing::info!(
        resume_us = running.resume_us,
        ready_verify_ms = ready.verify_ms,
        "destination runs the VM"
    );
    let _ = vm.dirty().stop();
    let (entries1, full1) = vm.dirty().ring_counters();
    let report = Report {
        vm: out.def.name.clone(),
        from: out.agent.into(),
        to: dest_name.into(),
        downtime_ms: downtime * 1e3,
        verify_at_pause_ms: verify_at_pause * 1e3,
        downtime_without_verify_ms: (downtime - verify_at_pause) * 1e3,
        pause_ms: pause.as_secs_f64() * 1e3,
        rtt_us: rtt.as_secs_f64() * 1e6,
        pages_sent: rounds.iter().map(|r| r.pages).sum(),
        zero_pages: rounds.iter().map(|r| r.zero_pages).sum(),
        rounds,
        stop_reason,
        memory_bytes: vm.ram().size(),
        memory_touched_bytes: touched * PAGE_SIZE,
        io_path: if link.writer.uses_uring() {
            "io_uring"
        } else {
            "plain"
        }
        .into(),
        dirty_tracking: vm.dirty().mode().to_string(),
        ring_entries: entries1 - entries0,
        ring_full_exits: full1 - full0,
        counter_at_pause,
        verification,
        mode: if postcopy_why.is_some() {
            "post-copy"
        } else {
            "pre-copy"
        }
        .into(),
        postcopy_policy: opts.postcopy.to_string(),
        decisions,
        kernel_rates_off,
        ..Default::default()
    };
    if postcopy_why.is_none() {
        let _ = link.send(Kind::Released, &msg::Released {});
        vm.devices().log_line(&format!("migrated to {dest_name}"));
        return Ok(finished(report, link.writer.bytes_sent(), t0));
    }
    vm.devices()
        .log_line(&format!("post-copy to {dest_name}: serving pages"));
    let parked = Box::new(Parked {
        dest: link.writer.socket().peer_addr()?,
        dest_name: dest_name.into(),
        session,
        stale: pending,
        opts: MigrateOptions {
            inject: None,
            ..opts.clone()
        },
        t0,
        report,
        bytes: 0,
        interruptions: 0,
    });
    finish_postcopy(out, parked, Some(link), progress)
}

/// Completes a report's totals.
fn finished(mut report: Report, bytes_sent: u64, t0: Instant) -> Report {
    let total = t0.elapsed().as_secs_f64();
    report.total_ms = total * 1e3;
    report.bytes_sent = bytes_sent;
    report.achieved_mibs = bytes_sent as f64 / 1048576.0 / total;
    report
}

/// The hello of this agent.
fn hello(out: &Outgoing<'_>) -> msg::Hello {
    msg::Hello {
        version: wire::VERSION,
        agent: out.agent.into(),
        page_size: PAGE_SIZE as u32,
        cpu: cpu_digest(),
    }
}

/// What the source keeps of a post-copy in progress: enough to reconnect and finish it.
/// The VM itself stays paused in the inventory with all of its memory.
#[derive(Debug)]
pub struct Parked {
    dest: SocketAddr,
    dest_name: String,
    session: u64,
    /// Pages the destination lacked at the last contact (at the switch: the stale set).
    stale: Vec<u64>,
    opts: MigrateOptions,
    t0: Instant,
    /// The report so far (pre-copy rounds, downtime, vCPU verification).
    report: Report,
    /// Bytes sent over every connection so far.
    bytes: u64,
    /// Connections lost during post-copy.
    interruptions: u32,
}

impl Parked {
    /// The destination agent's name.
    pub fn dest_name(&self) -> &str {
        &self.dest_name
    }

    /// Seconds to keep reconnecting when the connection drops (see `MigrateOptions`).
    pub fn set_resume_window(&mut self, secs: u64) {
        self.opts.resume_window_s = secs;
    }
}

/// Finishes an interrupted post-copy: reconnects to the destination and serves the pages it
/// still lacks. On failure the migration is parked again (see [`MigrateError::PostcopyInterrupted`]).
pub fn resume(
    out: &Outgoing<'_>,
    parked: Box<Parked>,
    progress: &dyn Fn(Progress),
) -> Result<Report, MigrateError> {
    progress(Progress::new("connecting", 0, 0, 0));
    finish_postcopy(out, parked, None, progress)
}

/// Gives up an interrupted post-copy: runs the VM here again from the switch point. Only for
/// a destination known to be lost: whatever the guest did there since the switch is gone,
/// and if the destination still runs, two copies of the guest now run.
pub fn rollback(out: &Outgoing<'_>, parked: Box<Parked>) {
    let vm = out.vm;
    tracing::warn!(vm = %out.def.name, dest = %parked.dest_name, "rolling back an interrupted post-copy: resuming the VM on the source from the switch point");
    vm.devices().log_line(&format!(
        "post-copy to {} abandoned: running here again from the switch point",
        parked.dest_name
    ));
    vm.resume();
}

/// Serves post-copy over `first` (if any), then reconnects within the resume window whenever
/// the connection fails. Never lets the VM's pages go before the destination holds them all.
fn finish_postcopy(
    out: &Outgoing<'_>,
    mut parked: Box<Parked>,
    first: Option<&mut Link>,
    progress: &dyn Fn(Progress),
) -> Result<Report, MigrateError> {
    let mut failure = match first {
        Some(link) => match serve_link(out, link, &mut parked, progress) {
            Ok(r) => return Ok(r),
            Err(MigrateError::Verify(why)) => return Err(refused_copy(out, parked, why)),
            Err(e) => Some(e),
        },
        None => None,
    };
    let until = Instant::now() + Duration::from_secs(parked.opts.resume_window_s);
    let mut delay = Duration::from_millis(100);
    loop {
        if let Some(e) = &failure {
            let now = Instant::now();
            if now >= until {
                break;
            }
            tracing::warn!(cause = %e, missing = parked.stale.len(), retry_in_ms = delay.as_millis() as u64,
                "post-copy connection lost: the VM waits on the destination; reconnecting");
            std::thread::sleep(delay.min(until - now));
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        let attempt = reconnect(out, &mut parked, progress)
            .and_then(|mut link| serve_link(out, &mut link, &mut parked, progress));
        match attempt {
            Ok(r) => return Ok(r),
            Err(MigrateError::Verify(why)) => return Err(refused_copy(out, parked, why)),
            Err(e) => failure = Some(e),
        }
    }
    let e = failure
        .expect("the loop ends after a failure")
        .name_silent_peer(&parked.dest_name);
    tracing::error!(cause = %e, missing = parked.stale.len(), "post-copy interrupted: the VM stays paused on the source with all its memory");
    out.vm.devices().log_line(&format!(
        "post-copy to {} interrupted ({e}): paused here with all its memory",
        parked.dest_name
    ));
    Err(MigrateError::PostcopyInterrupted {
        vm: out.def.name.clone(),
        dest: parked.dest_name.clone(),
        missing: parked.stale.len() as u64,
        reason: e.to_string(),
        parked,
    })
}

/// Post-copy completed but verification failed: the VM stays paused here with its memory as
/// of the switch (parked, for `--rollback`), the destination's copy is fenced.
fn refused_copy(out: &Outgoing<'_>, parked: Box<Parked>, why: String) -> MigrateError {
    tracing::error!(cause = %why, "post-copy verification failed: the VM is not released");
    out.vm.devices().log_line(&format!(
        "post-copy to {} failed verification ({why}): paused here with all its memory",
        parked.dest_name
    ));
    MigrateError::PostcopyVerifyFailed {
        vm: out.def.name.clone(),
        dest: parked.dest_name.clone(),
        reason: why,
        parked,
    }
}

/// Reconnects to the destination of `parked` and asks it to resume; learns which pages it
/// still lacks.
fn reconnect(
    out: &Outgoing<'_>,
    parked: &mut Parked,
    progress: &dyn Fn(Progress),
) -> Result<Link, MigrateError> {
    let mut link = Link::connect(parked.dest, &parked.opts)?;
    link.send(Kind::Hello, &hello(out))?;
    let _: msg::Welcome = link.recv()?.expect(Kind::Welcome)?;
    link.send(
        Kind::Resume,
        &msg::Resume {
            name: out.def.name.clone(),
            session: parked.session,
        },
    )?;
    let r: msg::Resumed = link.recv()?.expect(Kind::Resumed)?;
    let pages = out.vm.ram().pages();
    // An empty bitmap says nothing is missing (the destination completed and only the
    // `PostcopyDone` that follows was lost on the way).
    if !(r.missing.is_empty() && r.count == 0) && r.missing.len() as u64 != pages.div_ceil(64) {
        return Err(wire::WireError::BadPages(format!(
            "missing-page bitmap of {} words for {pages} pages",
            r.missing.len()
        ))
        .into());
    }
    let missing: Vec<u64> = (0..pages)
        .filter(|&i| {
            r.missing
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
        .collect();
    tracing::info!(
        missing = missing.len(),
        waiting_faults = r.waiting,
        "the destination resumes post-copy"
    );
    let mut ev = Progress::new("post-copy", 0, 0, missing.len() as u64);
    ev.remaining = missing.len() as u64;
    ev.decision = Some(format!(
        "resumed: {} pages still missing, {} faults waiting",
        missing.len(),
        r.waiting
    ));
    progress(ev);
    parked.stale = missing;
    parked.interruptions += 1;
    Ok(link)
}

/// Serves post-copy over one connection to its end; then releases the VM.
fn serve_link(
    out: &Outgoing<'_>,
    link: &mut Link,
    parked: &mut Parked,
    progress: &dyn Fn(Progress),
) -> Result<Report, MigrateError> {
    let served = serve_postcopy(out.vm, link, &parked.opts, &parked.stale, progress);
    parked.bytes += link.writer.bytes_sent();
    if let Err(MigrateError::Verify(why)) = &served {
        // Not released: the destination fences (pauses) its copy on this Abort.
        let _ = link.send(
            Kind::Abort,
            &msg::Abort {
                reason: format!("verification failed: {why}"),
            },
        );
    }
    let (mut stats, v) = served?;
    stats.interruptions = parked.interruptions;
    let _ = link.send(Kind::Released, &msg::Released {});
    out.vm
        .devices()
        .log_line(&format!("migrated to {}", parked.dest_name));
    let mut report = parked.report.clone();
    // Memory digests from PostcopyDone, vCPU digests from the switch.
    report.verification = match (v, report.verification.take()) {
        (Some(m), Some(c)) => Some(Verification {
            source_vcpus: c.source_vcpus,
            dest_vcpus: c.dest_vcpus,
            vcpus_equal: c.vcpus_equal,
            dest_verify_ms: c.dest_verify_ms,
            ..m
        }),
        (m, c) => m.or(c),
    };
    report.postcopy = Some(stats);
    Ok(finished(report, parked.bytes, parked.t0))
}

/// A fresh post-copy session id (random, so a resume never finds a stale session).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// How pre-copy ended.
enum End {
    StopAndCopy(String),
    Postcopy(String),
}

/// Sends the last dirty pages, the log and the state with the vCPUs paused; waits for the
/// destination's Ready and checks its digests.
fn stop_and_copy(
    out: &Outgoing<'_>,
    link: &mut Link,
    opts: &MigrateOptions,
    pending: &mut Vec<u64>,
    round: u32,
    progress: &dyn Fn(Progress),
    cancel: &Cancel,
) -> Result<(RoundStats, msg::Ready, Option<Verification>), MigrateError> {
    let vm = out.vm;
    let t = Instant::now();
    pending.extend(vm.dirty().harvest()?);
    pending.sort_unstable();
    pending.dedup();
    progress(Progress::new(
        "stop-and-copy",
        round,
        0,
        pending.len() as u64,
    ));
    let mut stats = send_pages(
        link,
        vm,
        pending,
        None,
        Kind::Pages,
        true,
        round,
        progress,
        cancel,
    )?;
    let source_vcpus = send_state(out, link, opts, "stop-and-copy")?;
    stats.secs = t.elapsed().as_secs_f64();
    stats.bandwidth = stats.bytes as f64 / stats.secs;
    // The source hashes its paused memory while the destination hashes its own.
    let source_digest = opts.verify.then(|| {
        let ram = vm.ram().clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            ram.digest().map(|d| (d, t.elapsed().as_secs_f64() * 1e3))
        })
    });
    let ready: msg::Ready = link.recv()?.expect(Kind::Ready)?;
    let (source_memory, source_verify_ms) = match source_digest {
        Some(h) => {
            let (d, ms) = h
                .join()
                .map_err(|_| MigrateError::Verify("the digest thread panicked".into()))??;
            (Some(d), ms)
        }
        None => (None, 0.0),
    };
    let verification = match (source_memory, &ready.memory_digest, &ready.vcpu_digest) {
        (Some(sm), Some(dm), Some(dv)) => {
            let v = Verification {
                memory_equal: &sm == dm,
                vcpus_equal: &source_vcpus == dv,
                source_memory: sm,
                dest_memory: dm.clone(),
                source_vcpus,
                dest_vcpus: dv.clone(),
                dest_verify_ms: ready.verify_ms,
                source_verify_ms,
            };
            if !v.memory_equal || !v.vcpus_equal {
                return Err(MigrateError::Verify(format!(
                    "memory {} vs {}, vCPUs {} vs {}",
                    v.source_memory, v.dest_memory, v.source_vcpus, v.dest_vcpus
                )));
            }
            Some(v)
        }
        (Some(_), _, _) => {
            return Err(MigrateError::Verify(
                "the destination sent no digests".into(),
            ))
        }
        _ => None,
    };
    Ok((stats, ready, verification))
}

/// Switches to post-copy with the vCPUs paused: sends the stale-page bitmap, the log and the
/// state, waits for Ready and checks the vCPU digest. `pending` becomes the stale set.
#[allow(clippy::too_many_arguments)]
fn postcopy_switch(
    out: &Outgoing<'_>,
    link: &mut Link,
    opts: &MigrateOptions,
    pending: &mut Vec<u64>,
    round: u32,
    why: &str,
    session: u64,
    progress: &dyn Fn(Progress),
) -> Result<(RoundStats, msg::Ready, Option<Verification>), MigrateError> {
    let vm = out.vm;
    let t = Instant::now();
    let before = link.writer.bytes_sent();
    pending.extend(vm.dirty().harvest()?);
    pending.sort_unstable();
    pending.dedup();
    let pages = vm.ram().pages();
    let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
    for &p in pending.iter() {
        dirty[(p / 64) as usize] |= 1 << (p % 64);
    }
    let mut ev = Progress::new("post-copy", round, 0, pending.len() as u64);
    ev.remaining = pending.len() as u64;
    ev.decision = Some(format!("switch to post-copy: {why}"));
    progress(ev);
    link.send(
        Kind::Postcopy,
        &msg::Postcopy {
            dirty,
            count: pending.len() as u64,
            reason: why.into(),
            session,
        },
    )?;
    let source_vcpus = send_state(out, link, opts, "post-copy")?;
    let ready: msg::Ready = link.recv()?.expect(Kind::Ready)?;
    let stats = RoundStats {
        round,
        bytes: link.writer.bytes_sent() - before,
        secs: t.elapsed().as_secs_f64(),
        dirty_pages: pending.len() as u64,
        decision: format!(
            "post-copy: {} pages left to the destination's faults and the push",
            pending.len()
        ),
        ..Default::default()
    };
    let verification = if opts.verify {
        let Some(dv) = &ready.vcpu_digest else {
            return Err(MigrateError::Verify(
                "the destination sent no vCPU digest".into(),
            ));
        };
        if &source_vcpus != dv {
            return Err(MigrateError::Verify(format!(
                "vCPUs {source_vcpus} vs {dv}"
            )));
        }
        // Memory digests come at PostcopyDone.
        Some(Verification {
            vcpus_equal: true,
            source_vcpus,
            dest_vcpus: dv.clone(),
            dest_verify_ms: ready.verify_ms,
            ..Default::default()
        })
    } else {
        None
    };
    Ok((stats, ready, verification))
}

/// What the destination says during post-copy.
enum PcEvent {
    Request(Vec<u64>),
    /// The destination placed this many page-frame bytes (`PagesPlaced`).
    Placed(u64),
    Done(msg::PostcopyDone),
}

/// Pages per background push frame: small, so a demand page never waits long behind one.
const PUSH_PAGES: usize = 32;
/// Push bytes the source keeps in flight beyond the destination's last `PagesPlaced`. Without a
/// bound the push fills both socket buffers (megabytes), and every answer to a page request
/// queues behind them; with it, an answer waits behind at most this much. It also bounds the
/// push to this much per round trip (512 MiB/s at 1 ms), far above what the destination places.
pub(super) const PUSH_WINDOW: u64 = 512 << 10;
/// How long the source waits for the destination to finish post-copy without any frame.
const POSTCOPY_IDLE: Duration = Duration::from_secs(60);

/// Serves post-copy: answers page requests first, pushes every other stale page in the
/// background (starting after the latest fault), until the destination's `PostcopyDone`.
/// The VM stays paused throughout, so its memory is the final memory.
fn serve_postcopy(
    vm: &Vm,
    link: &mut Link,
    opts: &MigrateOptions,
    stale: &[u64],
    progress: &dyn Fn(Progress),
) -> Result<(PostcopyStats, Option<Verification>), MigrateError> {
    let t = Instant::now();
    // The source digest over the paused memory, computed meanwhile.
    let digest = opts.verify.then(|| {
        let ram = vm.ram().clone();
        std::thread::spawn(move || PageSum::of_ram(&ram, |_| true).map(|s| s.hex()))
    });
    let result = push_and_answer(vm, link, stale, progress);
    let (mut stats, done) = result?;
    stats.duration_ms = done.stats.duration_ms;
    let source_sum = match digest {
        Some(h) => Some(
            h.join()
                .map_err(|_| MigrateError::Verify("the digest thread panicked".into()))??,
        ),
        None => None,
    };
    // As in pre-copy, a mismatch fails the migration before the source lets the VM go.
    let verification = match (source_sum, done.memory_digest) {
        (Some(sm), Some(dm)) if sm == dm => Some(Verification {
            memory_equal: true,
            source_memory: sm,
            dest_memory: dm,
            ..Default::default()
        }),
        (Some(sm), Some(dm)) => {
            tracing::error!(source = %sm, dest = %dm, "post-copy memory digests differ");
            return Err(MigrateError::Verify(format!(
                "post-copy memory digests differ (source {sm}, destination {dm})"
            )));
        }
        (Some(_), None) => {
            return Err(MigrateError::Verify(
                "the destination sent no post-copy memory digest".into(),
            ))
        }
        _ => None,
    };
    tracing::info!(
        demand = stats.pages_demand,
        pushed = stats.pages_pushed,
        p50_us = stats.latency_p50_us,
        p99_us = stats.latency_p99_us,
        secs = t.elapsed().as_secs_f64(),
        "post-copy complete"
    );
    Ok((stats, verification))
}

/// Flow control of the post-copy push: the page-frame bytes sent since the push began that the
/// destination has not reported placed, against a window.
#[derive(Debug)]
struct PushWindow {
    /// The writer's byte count when the push began.
    base: u64,
    /// Bytes the destination reported placed (`PagesPlaced`), counted from `base`.
    placed: u64,
    window: u64,
}

impl PushWindow {
    fn new(sent: u64, window: u64) -> Self {
        Self {
            base: sent,
            placed: 0,
            window,
        }
    }

    /// Whether another push frame may go, with the writer at `sent` bytes.
    fn open(&self, sent: u64) -> bool {
        (sent - self.base).saturating_sub(self.placed) < self.window
    }

    /// The destination placed `bytes` (reports may arrive out of date, never out of order).
    fn placed(&mut self, bytes: u64) {
        self.placed = self.placed.max(bytes);
    }
}

/// Whether `sock` has something to read (a frame, or the end of the stream) within `wait`.
fn readable(sock: &TcpStream, wait: Duration) -> Result<bool, MigrateError> {
    let mut fds = [libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a live array of one pollfd, its length passed with it; the fd is the
    // migration socket, open for the call's duration.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e.into())
        };
    }
    Ok(fds[0].revents != 0)
}

/// The destination's next post-copy frame, if one arrives within `wait`. Read on the serving
/// thread itself: a page request is answered with no hand-off between threads.
fn next_event(link: &mut Link, wait: Duration) -> Result<Option<PcEvent>, MigrateError> {
    if !readable(link.writer.socket(), wait)? {
        return Ok(None);
    }
    let f = link.reader.read_frame()?;
    f.verify()?;
    Ok(Some(match f.header.kind {
        Kind::PageRequest => PcEvent::Request(f.decode::<msg::PageRequest>()?.pages),
        Kind::PagesPlaced => PcEvent::Placed(f.decode::<msg::PagesPlaced>()?.bytes),
        Kind::PostcopyDone => PcEvent::Done(f.decode()?),
        Kind::Abort | Kind::Error => {
            return Err(MigrateError::Peer(f.decode::<msg::Abort>()?.reason))
        }
        other => {
            return Err(MigrateError::Peer(format!(
                "unexpected {other:?} frame during post-copy"
            )))
        }
    }))
}

/// Whether a push frame may go now: pages left, room in the window, and (under a bandwidth
/// limit) its turn. The push waits for its turn in the serving loop, where a request wakes
/// it, not asleep in the pacer.
fn may_push(link: &Link, window: &PushWindow, unsent: usize) -> bool {
    unsent > 0 && window.open(link.writer.bytes_sent()) && link.writer.pace_delay().is_zero()
}

fn push_and_answer(
    vm: &Vm,
    link: &mut Link,
    stale: &[u64],
    progress: &dyn Fn(Progress),
) -> Result<(PostcopyStats, msg::PostcopyDone), MigrateError> {
    let no_cancel = Cancel::default();
    let quiet = |_: Progress| {};
    let mut sent = vec![false; stale.len()];
    let mut unsent = stale.len();
    let mut cursor = 0usize;
    let mut demand: Vec<u64> = Vec::new();
    let mut stats = PostcopyStats {
        pages_missing: stale.len() as u64,
        ..Default::default()
    };
    let mut last_progress = Instant::now();
    let mut requests_at_progress = 0u64;
    let mut last_frame = Instant::now();
    let mut window = PushWindow::new(link.writer.bytes_sent(), PUSH_WINDOW);
    let done = loop {
        // Take every request and report that arrived; block only when there is nothing to
        // push (all sent, or a window's worth not placed yet): a request or report wakes it.
        let can_push = may_push(link, &window, unsent);
        let wait = if !can_push && demand.is_empty() {
            match link.writer.pace_delay() {
                d if d.is_zero() || unsent == 0 => Duration::from_millis(100),
                d => d.min(Duration::from_millis(100)),
            }
        } else {
            Duration::ZERO
        };
        let mut next = next_event(link, wait)?;
        let mut finished = None;
        while let Some(ev) = next.take() {
            last_frame = Instant::now();
            match ev {
                PcEvent::Request(pages) => {
                    stats.source_requested += pages.len() as u64;
                    demand.extend(pages);
                }
                PcEvent::Placed(bytes) => window.placed(bytes),
                PcEvent::Done(d) => {
                    if link.inject == Some(Fault::LosePostcopyDone) {
                        link.inject = None;
                        tracing::warn!("injected fault: losing PostcopyDone and the connection");
                        let _ = link.writer.socket().shutdown(std::net::Shutdown::Both);
                        return Err(MigrateError::Peer(
                            "injected: PostcopyDone lost with the connection".into(),
                        ));
                    }
                    finished = Some(d);
                    break;
                }
            }
            next = next_event(link, Duration::ZERO)?;
        }
        if let Some(d) = finished {
            break d;
        }
        let can_push = may_push(link, &window, unsent);
        if !can_push && demand.is_empty() && last_frame.elapsed() > POSTCOPY_IDLE {
            return Err(MigrateError::Peer(format!(
                "no word from the destination for {} s ({unsent} pages not sent yet)",
                POSTCOPY_IDLE.as_secs()
            )));
        }
        if !demand.is_empty() {
            // Answer requests for stale pages not sent yet; others are on their way.
            let mut answer = Vec::new();
            for p in demand.drain(..) {
                if let Ok(i) = stale.binary_search(&p) {
                    if !sent[i] {
                        sent[i] = true;
                        unsent -= 1;
                        answer.push(p);
                        // Push on from just after the latest fault: locality.
                        cursor = i + 1;
                    }
                }
            }
            if !answer.is_empty() {
                send_pages(
                    link,
                    vm,
                    &answer,
                    None,
                    Kind::DemandPages,
                    true,
                    0,
                    &quiet,
                    &no_cancel,
                )?;
                stats.source_demand_sent += answer.len() as u64;
            }
        } else if can_push {
            let mut batch = Vec::with_capacity(PUSH_PAGES);
            let mut scanned = 0;
            while batch.len() < PUSH_PAGES && scanned < stale.len() {
                if cursor >= stale.len() {
                    cursor = 0;
                }
                if !sent[cursor] {
                    sent[cursor] = true;
                    unsent -= 1;
                    batch.push(stale[cursor]);
                }
                cursor += 1;
                scanned += 1;
            }
            send_pages(
                link,
                vm,
                &batch,
                None,
                Kind::Pages,
                true,
                0,
                &quiet,
                &no_cancel,
            )?;
            stats.source_pushed += batch.len() as u64;
        }
        // After any page frame, pushed or demanded (faults may take most of the pages).
        if link.inject == Some(Fault::CutPostcopy) && unsent <= stale.len() / 2 {
            link.inject = None;
            tracing::warn!(
                pushed = stats.source_pushed,
                demanded = stats.source_demand_sent,
                "injected fault: cutting the post-copy connection"
            );
            let _ = link.writer.socket().shutdown(std::net::Shutdown::Both);
        }
        if last_progress.elapsed() > Duration::from_millis(200) {
            let dt = last_progress.elapsed().as_secs_f64();
            last_progress = Instant::now();
            let mut ev = Progress::new(
                "post-copy",
                0,
                (stale.len() - unsent) as u64,
                stale.len() as u64,
            );
            ev.remaining = unsent as u64;
            ev.faults_per_s = (stats.source_requested - requests_at_progress) as f64 / dt;
            requests_at_progress = stats.source_requested;
            progress(ev);
        }
    };
    let d = &done.stats;
    let src = (
        stats.source_requested,
        stats.source_demand_sent,
        stats.source_pushed,
    );
    stats = d.clone();
    (
        stats.source_requested,
        stats.source_demand_sent,
        stats.source_pushed,
    ) = src;
    let mut ev = Progress::new("post-copy", 0, stale.len() as u64, stale.len() as u64);
    ev.decision = Some("post-copy complete".into());
    progress(ev);
    Ok((stats, done))
}

/// Sends the given pages in frames of up to 256, straight from guest memory. `populated`
/// (round 1) marks pages never touched in the host, which are zero without reading them.
#[allow(clippy::too_many_arguments)]
fn send_pages(
    link: &mut Link,
    vm: &Vm,
    list: &[u64],
    populated: Option<&[bool]>,
    kind: Kind,
    paused: bool,
    round: u32,
    progress: &dyn Fn(Progress),
    cancel: &Cancel,
) -> Result<RoundStats, MigrateError> {
    let ram = vm.ram();
    let before = link.writer.bytes_sent();
    let mut stats = RoundStats {
        round,
        ..Default::default()
    };
    let mut entries = Vec::with_capacity(pages::MAX_PAGES);
    let mut ptrs: Vec<*const u8> = Vec::with_capacity(pages::MAX_PAGES);
    let mut meta = Vec::new();
    let mut last_progress = Instant::now();
    for (n, chunk) in list.chunks(pages::MAX_PAGES).enumerate() {
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        entries.clear();
        ptrs.clear();
        for &p in chunk {
            let zero = populated.is_some_and(|pop| !pop[p as usize]) || ram.is_zero_page(p);
            entries.push(pages::PageEntry { index: p, zero });
            if !zero {
                ptrs.push(ram.page_ptr(p));
            }
        }
        pages::encode(&entries, &mut meta);
        let data_len = ptrs.len() * PAGE_SIZE as usize;
        let mut header = Header {
            kind,
            flags: if paused { wire::DATA_CRC } else { 0 },
            payload_len: (meta.len() + data_len) as u32,
            meta_len: meta.len() as u32,
            crc: 0,
        };
        header.crc = if paused {
            // SAFETY: the vCPUs are paused, so nothing writes these guest pages while they
            // are read as slices; each pointer is a whole page inside guest memory.
            let slices = ptrs
                .iter()
                .map(|&p| unsafe { std::slice::from_raw_parts(p, PAGE_SIZE as usize) });
            wire::frame_crc(&header, &meta, slices)
        } else {
            wire::frame_crc(&header, &meta, [])
        };
        let mut head = header.encode().to_vec();
        head.extend_from_slice(&meta);
        if link.inject == Some(Fault::CorruptFrame) && n == 0 {
            let last = head.len() - 1;
            head[last] ^= 0x40;
            link.inject = None;
        }
        if kind == Kind::DemandPages {
            // A vCPU waits for these: no wait for the bandwidth limit.
            // SAFETY: every pointer is a page of guest memory, which lives as long as the VM;
            // the VM outlives this migration (the caller holds it).
            unsafe { link.writer.send_pages_now(head, &ptrs) }?;
        } else {
            // SAFETY: as above.
            unsafe { link.writer.send_pages(head, &ptrs) }?;
        }
        stats.pages += chunk.len() as u64;
        stats.zero_pages += (chunk.len() - ptrs.len()) as u64;
        if last_progress.elapsed() > Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(Progress::new(
                if paused { "stop-and-copy" } else { "pre-copy" },
                round,
                stats.pages,
                list.len() as u64,
            ));
        }
    }
    link.writer.flush()?;
    stats.bytes = link.writer.bytes_sent() - before;
    Ok(stats)
}

/// Sends one file of the VM folder in chunks, skipping holes and all-zero chunks; a file
/// that cannot be read fails the migration.
fn send_file(link: &mut Link, dir: &Path, name: &str) -> Result<(), MigrateError> {
    let file = fs::File::open(dir.join(name))?;
    let size = file.metadata()?.len();
    let mut sent_any = false;
    crate::storage::for_each_data_chunk(&file, FILE_CHUNK, |offset, chunk| {
        sent_any = true;
        send_chunk(link, name, size, offset, chunk)
    })?;
    if !sent_any {
        send_chunk(link, name, size, 0, &[])?;
    }
    Ok(())
}

/// Granularity of the disk's written-block log during a migration.
const DISK_BLOCK: u64 = 64 << 10;

/// With the VM paused (the disk drained): sends the disk blocks written since the disk was
/// sent, so the destination's image equals the source's at the pause.
fn send_written_blocks(out: &Outgoing<'_>, link: &mut Link) -> Result<(), MigrateError> {
    let Some(blk) = out.vm.devices().blk() else {
        return Ok(());
    };
    let blocks = blk.take_written_blocks();
    blk.stop_block_log();
    let file = fs::File::open(out.dir.join(inventory::DISK))?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; DISK_BLOCK as usize];
    for b in &blocks {
        let offset = b * DISK_BLOCK;
        let n = DISK_BLOCK.min(size.saturating_sub(offset)) as usize;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..n], offset)?;
        send_chunk(link, inventory::DISK, size, offset, &buf[..n])?;
    }
    tracing::info!(
        blocks = blocks.len(),
        "disk blocks written during the migration sent"
    );
    Ok(())
}

fn send_chunk(
    link: &mut Link,
    name: &str,
    size: u64,
    offset: u64,
    chunk: &[u8],
) -> Result<(), MigrateError> {
    let meta = bincode::serialize(&msg::FileChunk {
        name: name.into(),
        size,
        offset,
    })
    .expect("serializes");
    let mut header = Header {
        kind: Kind::FileChunk,
        flags: wire::DATA_CRC,
        payload_len: (meta.len() + chunk.len()) as u32,
        meta_len: meta.len() as u32,
        crc: 0,
    };
    header.crc = wire::frame_crc(&header, &meta, [chunk]);
    let mut f = header.encode().to_vec();
    f.extend_from_slice(&meta);
    f.extend_from_slice(chunk);
    Ok(link.writer.send_bytes(f)?)
}

/// With the vCPUs paused: notes the pause in the VM log, sends the log and the vCPU and device
/// state; returns the digest of the vCPU state sent.
fn send_state(
    out: &Outgoing<'_>,
    link: &mut Link,
    opts: &MigrateOptions,
    phase: &str,
) -> Result<String, MigrateError> {
    out.vm
        .devices()
        .log_line(&format!("paused for migration: {phase}"));
    send_file(link, out.dir, inventory::LOG)?;
    send_written_blocks(out, link)?;
    let machine = out.vm.save()?;
    let digest = machine.vcpu_digest();
    link.send(
        Kind::State,
        &msg::State {
            machine,
            verify: opts.verify,
        },
    )?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::PushWindow;

    #[test]
    fn push_waits_once_a_window_is_unplaced() {
        // The writer had sent 1000 bytes (pre-copy, state) when the push began.
        let mut w = PushWindow::new(1000, 100);
        assert!(w.open(1000));
        assert!(w.open(1099));
        assert!(!w.open(1100), "a full window is not placed yet");
        w.placed(50);
        assert!(w.open(1100));
        assert!(!w.open(1150));
    }

    #[test]
    fn an_older_report_does_not_shrink_what_was_placed() {
        let mut w = PushWindow::new(0, 100);
        w.placed(80);
        w.placed(30);
        assert!(w.open(179));
        assert!(!w.open(180));
    }
}
