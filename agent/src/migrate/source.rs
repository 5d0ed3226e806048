//! The source side: moves a running VM to a destination agent.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
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
use crate::transport::{tune_socket, FrameReader, FrameWriter, IoPath, RecvError};
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
    progress(Progress::new("connecting", 0, 0, 0));
    let sock = TcpStream::connect_timeout(&dest, Duration::from_secs(5)).map_err(|cause| {
        MigrateError::Connect {
            addr: dest.to_string(),
            cause,
        }
    })?;
    tune_socket(&sock)?;
    cancel.set_socket(Some(sock.try_clone()?));
    let bandwidth = opts.bandwidth_mibs.map(|m| m * 1048576.0);
    let mut link = Link {
        writer: FrameWriter::new(sock.try_clone()?, opts.io, bandwidth)?,
        reader: FrameReader::new(sock, IoPath::Plain, REPLY_TIMEOUT)?,
        inject: opts.inject,
    };
    let vm = out.vm;
    let result = run(out, &mut link, dest_name, opts, cancel, progress, t0);
    cancel.set_socket(None);
    match result {
        Ok(report) => Ok(report),
        Err(e) => {
            let e = if cancel.is_cancelled() {
                MigrateError::Cancelled
            } else {
                link.explain(e)
            };
            if matches!(e, MigrateError::CommitUnknown(_)) {
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
    let hello = wire::messages::Hello {
        version: wire::VERSION,
        agent: out.agent.into(),
        page_size: PAGE_SIZE as u32,
        cpu: cpu_digest(),
    };
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
    // The probes only serve pre-copy decisions: detach them before the pause.
    let kernel_rates_off = probes.off_reason().map(String::from);
    drop(probes);
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
    let (last, ready, verification) = match &postcopy_why {
        None => stop_and_copy(out, link, opts, &mut pending, round, progress, cancel)?,
        Some(why) => postcopy_switch(out, link, opts, &mut pending, round, why, progress)?,
    };
    rounds.push(last);
    // 5. Commitment: from Go on the destination owns the VM.
    cancel.set_socket(None);
    link.send(Kind::Go, &msg::Go {})?;
    let running = link
        .recv()
        .and_then(|f| Ok(f.expect::<msg::Running>(Kind::Running)?));
    let t_run = Instant::now();
    let running = running.map_err(|e| MigrateError::CommitUnknown(e.to_string()))?;
    let downtime = (t_run - t_pause).as_secs_f64() - rtt.as_secs_f64() / 2.0;
    let (postcopy, verification) = match &postcopy_why {
        None => (None, verification),
        Some(_) => {
            vm.devices()
                .log_line(&format!("post-copy to {dest_name}: serving pages"));
            let (stats, v) = serve_postcopy(vm, link, opts, &pending, progress).map_err(|e| {
                tracing::error!(cause = %e, "post-copy incomplete: the VM stays paused on the source");
                vm.devices().log_line(&format!(
                    "post-copy to {dest_name} incomplete: {e}; paused here with all its memory"
                ));
                MigrateError::CommitUnknown(format!(
                    "post-copy incomplete: VM paused on source, destination holds a partial VM ({e})"
                ))
            })?;
            // Memory digests from PostcopyDone, vCPU digests from the switch.
            let v = match (v, verification) {
                (Some(m), Some(c)) => Some(Verification {
                    source_vcpus: c.source_vcpus,
                    dest_vcpus: c.dest_vcpus,
                    vcpus_equal: c.vcpus_equal,
                    dest_verify_ms: c.dest_verify_ms,
                    ..m
                }),
                (m, c) => m.or(c),
            };
            (Some(stats), v)
        }
    };
    let _ = link.send(Kind::Released, &msg::Released {});
    let _ = vm.dirty().stop();
    let (entries1, full1) = vm.dirty().ring_counters();
    vm.devices().log_line(&format!("migrated to {dest_name}"));
    tracing::info!(
        resume_us = running.resume_us,
        ready_verify_ms = ready.verify_ms,
        "destination runs the VM"
    );
    let total = t0.elapsed().as_secs_f64();
    let bytes_sent = link.writer.bytes_sent();
    Ok(Report {
        vm: out.def.name.clone(),
        from: out.agent.into(),
        to: dest_name.into(),
        total_ms: total * 1e3,
        downtime_ms: downtime * 1e3,
        pause_ms: pause.as_secs_f64() * 1e3,
        rtt_us: rtt.as_secs_f64() * 1e6,
        pages_sent: rounds.iter().map(|r| r.pages).sum(),
        zero_pages: rounds.iter().map(|r| r.zero_pages).sum(),
        rounds,
        stop_reason,
        bytes_sent,
        memory_bytes: vm.ram().size(),
        memory_touched_bytes: touched * PAGE_SIZE,
        achieved_mibs: bytes_sent as f64 / 1048576.0 / total,
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
        mode: if postcopy.is_some() {
            "post-copy"
        } else {
            "pre-copy"
        }
        .into(),
        postcopy_policy: opts.postcopy.to_string(),
        decisions,
        postcopy,
        kernel_rates_off,
    })
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
    let source_memory = if opts.verify {
        Some(vm.ram().digest()?)
    } else {
        None
    };
    let ready: msg::Ready = link.recv()?.expect(Kind::Ready)?;
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
fn postcopy_switch(
    out: &Outgoing<'_>,
    link: &mut Link,
    opts: &MigrateOptions,
    pending: &mut Vec<u64>,
    round: u32,
    why: &str,
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

/// Events of the post-copy reader thread.
enum PcEvent {
    Request(Vec<u64>),
    Done(msg::PostcopyDone),
    Failed(String),
}

/// Pages per background push frame: small, so a demand page never waits long behind one.
const PUSH_PAGES: usize = 32;
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
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut reader = FrameReader::new(
        link.writer.socket().try_clone()?,
        IoPath::Plain,
        Duration::from_millis(500),
    )?;
    let stop_r = stop.clone();
    let reader_thread = std::thread::Builder::new()
        .name("postcopy-requests".into())
        .spawn(move || loop {
            let f = match reader.read_frame() {
                Ok(f) => f,
                Err(RecvError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    if stop_r.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(PcEvent::Failed(e.to_string()));
                    return;
                }
            };
            let ev = match f
                .verify()
                .map_err(|e| e.to_string())
                .and_then(|_| match f.header.kind {
                    Kind::PageRequest => f
                        .decode::<msg::PageRequest>()
                        .map(|r| PcEvent::Request(r.pages))
                        .map_err(|e| e.to_string()),
                    Kind::PostcopyDone => f
                        .decode::<msg::PostcopyDone>()
                        .map(PcEvent::Done)
                        .map_err(|e| e.to_string()),
                    Kind::Abort | Kind::Error => Ok(PcEvent::Failed(
                        f.decode::<msg::Abort>()
                            .map(|a| a.reason)
                            .unwrap_or_else(|e| e.to_string()),
                    )),
                    other => Err(format!("unexpected {other:?} frame during post-copy")),
                }) {
                Ok(ev) => ev,
                Err(e) => PcEvent::Failed(e),
            };
            let last = !matches!(ev, PcEvent::Request(_));
            if tx.send(ev).is_err() || last {
                return;
            }
        })?;
    let result = push_and_answer(vm, link, stale, &rx, progress);
    stop.store(true, Ordering::SeqCst);
    let _ = reader_thread.join();
    let (mut stats, done) = result?;
    stats.duration_ms = done.stats.duration_ms;
    let source_sum = match digest {
        Some(h) => Some(
            h.join()
                .map_err(|_| MigrateError::Verify("the digest thread panicked".into()))??,
        ),
        None => None,
    };
    let verification = match (source_sum, done.memory_digest) {
        (Some(sm), Some(dm)) => {
            let equal = sm == dm;
            if !equal {
                tracing::error!(source = %sm, dest = %dm, "post-copy memory digests differ");
            }
            Some(Verification {
                memory_equal: equal,
                source_memory: sm,
                dest_memory: dm,
                ..Default::default()
            })
        }
        (Some(_), None) => {
            tracing::error!("the destination sent no post-copy memory digest");
            None
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

fn push_and_answer(
    vm: &Vm,
    link: &mut Link,
    stale: &[u64],
    rx: &mpsc::Receiver<PcEvent>,
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
    let done = loop {
        // Take every request that arrived; block only when nothing is left to push.
        let mut next = if unsent == 0 && demand.is_empty() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => Some(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Peer("the request reader ended".into()))
                }
            }
        } else {
            rx.try_recv().ok()
        };
        let mut finished = None;
        while let Some(ev) = next.take() {
            last_frame = Instant::now();
            match ev {
                PcEvent::Request(pages) => {
                    stats.source_requested += pages.len() as u64;
                    demand.extend(pages);
                }
                PcEvent::Done(d) => {
                    finished = Some(d);
                    break;
                }
                PcEvent::Failed(why) => return Err(MigrateError::Peer(why)),
            }
            next = rx.try_recv().ok();
        }
        if let Some(d) = finished {
            break d;
        }
        if unsent == 0 && demand.is_empty() && last_frame.elapsed() > POSTCOPY_IDLE {
            return Err(MigrateError::Peer(format!(
                "no PostcopyDone {} s after the last page",
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
        } else if unsent > 0 {
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
        // SAFETY: every pointer is a page of guest memory, which lives as long as the VM; the
        // VM outlives this migration (the caller holds it).
        unsafe { link.writer.send_pages(head, &ptrs) }?;
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

/// Sends one file of the VM folder in chunks, skipping all-zero chunks.
fn send_file(link: &mut Link, dir: &Path, name: &str) -> Result<(), MigrateError> {
    let data = fs::read(dir.join(name)).unwrap_or_default();
    let size = data.len() as u64;
    let mut sent_any = false;
    for (i, chunk) in data.chunks(FILE_CHUNK).enumerate() {
        if chunk.iter().all(|b| *b == 0) {
            continue;
        }
        send_chunk(link, name, size, (i * FILE_CHUNK) as u64, chunk)?;
        sent_any = true;
    }
    if !sent_any {
        send_chunk(link, name, size, 0, &[])?;
    }
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
