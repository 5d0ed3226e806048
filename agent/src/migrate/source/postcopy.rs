//! Post-copy on the source: the switch (stage 4's alternative: the pages the destination
//! must not trust, then the state) and, once the destination runs the VM, serving its page
//! requests first while pushing every other stale page in the background, under a window of
//! unplaced bytes, until `PostcopyDone`. Reconnections are [`super::resume`]'s.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::precopy::Precopied;
use super::stop_and_copy::{self, Paused};
use super::stream::{self, Batch};
use super::Run;
use crate::migrate::link::Link;
use crate::migrate::report::{Decision, ProgressNote, ProgressPhase, StopReason};
use crate::migrate::{
    Cancel, MigrateError, MigrateOptions, PageSum, PostcopyStats, Progress, RoundStats,
    Verification,
};
use crate::vm::Vm;
use crate::wire::bitmap::Bitmap;
use crate::wire::messages as msg;
use crate::wire::pages::PageFrameKind;
use crate::wire::Kind;

/// Pauses and switches to post-copy: sends the stale-page bitmap, the log and the state, waits
/// for `Ready` and checks the vCPU digest. `pre.pending` becomes the stale set.
pub(super) fn switch(
    run: &mut Run<'_>,
    pre: &mut Precopied,
    why: &StopReason,
) -> Result<Paused, MigrateError> {
    let p = stop_and_copy::pause(run.out.vm);
    let round = pre.rounds.len() as u32 + 1;
    let session = session_id();
    let (last, ready, verification) = send_switch(run, &mut pre.pending, round, why, session)?;
    pre.rounds.push(last);
    Ok(Paused {
        t_pause: p.t_pause,
        pause: p.pause,
        counter_at_pause: p.counter_at_pause,
        ready,
        verification,
        session: Some(session),
    })
}

fn send_switch(
    run: &mut Run<'_>,
    pending: &mut Vec<u64>,
    round: u32,
    why: &StopReason,
    session: u64,
) -> Result<(RoundStats, msg::Ready, Option<Verification>), MigrateError> {
    let (out, opts, progress) = (run.out, run.opts, run.progress);
    let link = &mut run.link;
    let vm = out.vm;
    let t = Instant::now();
    let before = link.writer.bytes_sent();
    pending.extend(vm.dirty().harvest()?);
    pending.sort_unstable();
    pending.dedup();
    let dirty = Bitmap::of(vm.ram().pages(), pending.iter().copied());
    let mut ev = Progress::new(ProgressPhase::PostCopy, round, 0, pending.len() as u64);
    ev.remaining = pending.len() as u64;
    ev.decision = Some(ProgressNote::Decided(Decision::Postcopy(why.clone())));
    progress(ev);
    link.send(&msg::Postcopy {
        dirty,
        count: pending.len() as u64,
        reason: why.to_string(),
        session,
    })?;
    // The disk is brought in sync before the switch: the destination's device must never
    // read a block the source still holds (docs/storage.md).
    let shared = run.shared.is_some();
    let sent = stop_and_copy::send_state(out, link, run.disk.as_mut(), shared, opts, "post-copy")?;
    let source_vcpus = sent.vcpus;
    let ready: msg::Ready = link.recv()?;
    let stats = RoundStats {
        round,
        bytes: link.writer.bytes_sent() - before,
        secs: t.elapsed().as_secs_f64(),
        dirty_pages: pending.len() as u64,
        disk_blocks: run.disk.as_ref().map_or(0, |d| d.report.blocks_at_pause),
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
        let disk_equal = stop_and_copy::disk_equal(&sent.disk, &ready)?;
        if disk_equal == Some(false) {
            return Err(MigrateError::Verify(format!(
                "disk {:?} vs {:?}",
                sent.disk, ready.disk_digest
            )));
        }
        // Memory digests come at PostcopyDone.
        Some(Verification {
            vcpus_equal: true,
            source_vcpus,
            dest_vcpus: dv.clone(),
            dest_verify_ms: ready.verify_ms,
            disk_equal,
            source_disk: sent.disk,
            dest_disk: ready.disk_digest.clone(),
            ..Default::default()
        })
    } else {
        None
    };
    Ok((stats, ready, verification))
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
pub(crate) const PUSH_WINDOW: u64 = 512 << 10;
/// How long the source waits for the destination to finish post-copy without any frame.
const POSTCOPY_IDLE: Duration = Duration::from_secs(60);

/// Serves post-copy: answers page requests first, pushes every other stale page in the
/// background (starting after the latest fault), until the destination's `PostcopyDone`.
/// The VM stays paused throughout, so its memory is the final memory.
pub(super) fn serve(
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
    if !link.reader.buffered() && !readable(link.writer.socket(), wait)? {
        return Ok(None);
    }
    let f = link.next()?;
    Ok(Some(match f.kind() {
        Kind::PageRequest => PcEvent::Request(f.decode::<msg::PageRequest>()?.pages),
        Kind::PagesPlaced => PcEvent::Placed(f.decode::<msg::PagesPlaced>()?.bytes),
        Kind::PostcopyDone => PcEvent::Done(f.decode()?),
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
                let demand = Batch {
                    kind: PageFrameKind::Demand,
                    paused: true,
                    round: 0,
                    populated: None,
                    deadline: None,
                };
                stream::send_pages(link, vm, &answer, demand, &quiet, &no_cancel)?;
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
            let push = Batch {
                kind: PageFrameKind::Pages,
                paused: true,
                round: 0,
                populated: None,
                deadline: None,
            };
            stream::send_pages(link, vm, &batch, push, &quiet, &no_cancel)?;
            stats.source_pushed += batch.len() as u64;
        }
        if last_progress.elapsed() > Duration::from_millis(200) {
            let dt = last_progress.elapsed().as_secs_f64();
            last_progress = Instant::now();
            let mut ev = Progress::new(
                ProgressPhase::PostCopy,
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
    stats = PostcopyStats::from(d);
    (
        stats.source_requested,
        stats.source_demand_sent,
        stats.source_pushed,
    ) = src;
    let mut ev = Progress::new(
        ProgressPhase::PostCopy,
        0,
        stale.len() as u64,
        stale.len() as u64,
    );
    ev.decision = Some(ProgressNote::PostcopyComplete);
    progress(ev);
    Ok((stats, done))
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
