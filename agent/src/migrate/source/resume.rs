//! Finishing a post-copy across lost connections: the source keeps what it needs
//! ([`Parked`]), reconnects within the resume window (`Hello`, `Resume` → `Resumed` with the
//! pages still missing) and serves the rest; or parks the migration for `--resume`, or gives
//! it up (`--rollback`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{finished, handshake, postcopy, Outcome, Outgoing, Run};
use crate::migrate::link::Link;
use crate::migrate::report::{ProgressNote, ProgressPhase};
use crate::migrate::{Cancel, MigrateError, MigrateOptions, Phase, Progress, Report, Verification};
use crate::wire::messages as msg;

/// What the source keeps of a post-copy in progress: enough to reconnect and finish it.
/// The VM itself stays paused in the inventory with all of its memory.
#[derive(Debug)]
pub struct Parked {
    vm: String,
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
    /// Why the last connection failed (or what verification found).
    reason: String,
    /// Why it is parked.
    why: ParkedWhy,
}

/// Why a post-copy out is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedWhy {
    /// Its connection was lost and reconnecting failed within the resume window.
    Interrupted,
    /// Every page arrived but `--verify` found the destination's memory differs: the VM was
    /// not released; the destination paused its copy.
    VerifyFailed,
}

impl Parked {
    /// The destination agent's name.
    pub fn dest_name(&self) -> &str {
        &self.dest_name
    }

    /// Why it is parked.
    pub fn why(&self) -> ParkedWhy {
        self.why
    }

    /// Pages the destination lacked at the last contact.
    pub fn missing(&self) -> u64 {
        self.stale.len() as u64
    }

    /// Marks it parked for a failed verification (`why`): the destination's copy is refused.
    pub(super) fn verify_failed(&mut self, why: String) {
        self.why = ParkedWhy::VerifyFailed;
        self.reason = why;
    }

    /// Seconds to keep reconnecting when the connection drops (see `MigrateOptions`).
    pub fn set_resume_window(&mut self, secs: u64) {
        self.opts.resume_window_s = secs;
    }
}

impl std::fmt::Display for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (vm, dest) = (&self.vm, &self.dest_name);
        if self.why == ParkedWhy::VerifyFailed {
            return write!(
                f,
                "migration to {dest} failed verification ({}): the VM was not released; {dest} was told to stop its copy; {vm} is paused here with its memory as of the pause: `vmig migrate --rollback {vm}` runs it here again (what it did on {dest} is lost), then `vmig vm stop {vm}` on {dest} removes the bad copy",
                self.reason
            );
        }
        write!(
            f,
            "post-copy to {dest} interrupted ({}); the VM runs on {dest} and waits for pages held here ({} missing at the last contact): run `vmig migrate --resume {vm}` once {dest} is reachable (or `vmig migrate --rollback {vm}` if {dest} is lost)",
            self.reason,
            self.missing()
        )
    }
}

/// Finishes an interrupted post-copy: reconnects to the destination and serves the pages it
/// still lacks; parks it again if that fails within the resume window. A cancel is refused
/// throughout (the destination runs the VM).
pub fn resume(
    out: &Outgoing<'_>,
    parked: Box<Parked>,
    cancel: &Cancel,
    progress: &dyn Fn(Progress),
) -> Result<Outcome, MigrateError> {
    cancel.enter(Phase::Postcopy)?;
    progress(Progress::new(ProgressPhase::Connecting, 0, 0, 0));
    Ok(finish(out, parked, None, progress))
}

/// After `Running` in post-copy: what the source keeps to serve the pages, across
/// reconnections.
pub(super) fn park(run: &Run<'_>, session: u64, stale: Vec<u64>, report: Report) -> Box<Parked> {
    Box::new(Parked {
        vm: run.out.def.name.clone(),
        dest: run.dest,
        dest_name: run.dest_name.into(),
        session,
        stale,
        opts: run.opts.clone(),
        t0: run.t0,
        report,
        bytes: 0,
        interruptions: 0,
        reason: String::new(),
        why: ParkedWhy::Interrupted,
    })
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
    if let Some(blk) = vm.devices().blk() {
        // On shared storage the image was released at the switch; it is this side's again
        // (holding what the destination wrote since, as its memory does not).
        if !blk.is_open() {
            tracing::warn!(vm = %out.def.name, "reopening the shared disk image: it holds the destination's writes since the switch");
        }
        if let Err(e) = blk.reacquire() {
            tracing::error!(error = %e, "cannot reopen the disk image: the guest's disk requests fail");
        }
    }
    vm.resume();
}

/// Serves post-copy over `first` (if any), then reconnects within the resume window whenever
/// the connection fails. Never lets the VM's pages go before the destination holds them all.
pub(super) fn finish(
    out: &Outgoing<'_>,
    mut parked: Box<Parked>,
    first: Option<&mut Link>,
    progress: &dyn Fn(Progress),
) -> Outcome {
    let mut failure = match first {
        Some(link) => match serve_link(out, link, &mut parked, progress) {
            Ok(r) => return Outcome::Committed(Box::new(r)),
            Err(MigrateError::Verify(why)) => return refused_copy(out, parked, why),
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
            Ok(r) => return Outcome::Committed(Box::new(r)),
            Err(MigrateError::Verify(why)) => return refused_copy(out, parked, why),
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
    parked.reason = e.to_string();
    Outcome::Parked(parked)
}

/// Post-copy completed but verification failed: the VM stays paused here with its memory as
/// of the switch (parked, for `--rollback`), the destination's copy is fenced.
fn refused_copy(out: &Outgoing<'_>, mut parked: Box<Parked>, why: String) -> Outcome {
    tracing::error!(cause = %why, "post-copy verification failed: the VM is not released");
    out.vm.devices().log_line(&format!(
        "post-copy to {} failed verification ({why}): paused here with all its memory",
        parked.dest_name
    ));
    parked.why = ParkedWhy::VerifyFailed;
    parked.reason = why;
    Outcome::Parked(parked)
}

/// Reconnects to the destination of `parked` and asks it to resume; learns which pages it
/// still lacks.
fn reconnect(
    out: &Outgoing<'_>,
    parked: &mut Parked,
    progress: &dyn Fn(Progress),
) -> Result<Link, MigrateError> {
    let mut link = Link::connect(out.security, parked.dest, &parked.dest_name, &parked.opts)?;
    handshake::greet(&mut link, out.agent)?;
    link.send(&msg::Resume {
        name: out.def.name.clone(),
        session: parked.session,
    })?;
    let r: msg::Resumed = link.recv()?;
    // An empty bitmap says nothing is missing (the destination completed and only the
    // `PostcopyDone` that follows was lost on the way).
    let missing = if r.missing.is_empty() && r.count == 0 {
        Vec::new()
    } else {
        r.missing.pages(out.vm.ram().pages())?
    };
    tracing::info!(
        missing = missing.len(),
        waiting_faults = r.waiting,
        "the destination resumes post-copy"
    );
    let mut ev = Progress::new(ProgressPhase::PostCopy, 0, 0, missing.len() as u64);
    ev.remaining = missing.len() as u64;
    ev.decision = Some(ProgressNote::Resumed {
        missing: missing.len() as u64,
        waiting: r.waiting,
    });
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
    let served = postcopy::serve(out.vm, link, &parked.opts, &parked.stale, progress);
    parked.bytes += link.writer.bytes_sent();
    if let Some(c) = link.compressor.as_ref().map(|c| c.stats()) {
        // The first connection's counters include pre-copy's (the report has them from the
        // commit); a reconnection's add to what came before.
        let r = &mut parked.report;
        r.compression = Some(match (parked.interruptions, r.compression) {
            (0, _) | (_, None) => c,
            (_, Some(before)) => crate::wire::pages::CompressionStats {
                raw_bytes: before.raw_bytes + c.raw_bytes,
                wire_bytes: before.wire_bytes + c.wire_bytes,
                frames_compressed: before.frames_compressed + c.frames_compressed,
                frames_raw: before.frames_raw + c.frames_raw,
                secs: before.secs + c.secs,
                ..c
            },
        });
    }
    if let Err(MigrateError::Verify(why)) = &served {
        // Not released: the destination fences (pauses) its copy on this Abort.
        let _ = link.send(&msg::Abort {
            reason: format!("verification failed: {why}"),
        });
    }
    let (mut stats, v) = served?;
    stats.interruptions = parked.interruptions;
    let _ = link.send(&msg::Released {});
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
            source_disk: c.source_disk,
            dest_disk: c.dest_disk,
            disk_equal: c.disk_equal,
            ..m
        }),
        (m, c) => m.or(c),
    };
    report.postcopy = Some(stats);
    Ok(finished(report, parked.bytes, parked.t0))
}
