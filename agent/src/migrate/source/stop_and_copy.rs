//! Stage 4, stop and copy: pause the vCPUs, send the last dirty pages (their data
//! checksummed), the VM log and the vCPU and device state; the destination loads it and
//! answers `Ready` (with digests under `--verify`: vCPUs and disk compared here before `Go`,
//! memory too on shared storage, else after `Running`, see [`super::commit`]).

use std::time::{Duration, Instant};

use super::disk::DiskMirror;
use super::precopy::Precopied;
use super::stream::{self, Batch};
use super::{Outgoing, Run};
use crate::inventory;
use crate::migrate::link::Link;
use crate::migrate::report::MemoryCheck;
use crate::migrate::report::ProgressPhase;
use crate::migrate::{MigrateError, MigrateOptions, PageSum, Progress, RoundStats, Verification};
use crate::vm::{self, Vm};
use crate::wire::messages as msg;
use crate::wire::pages::PageFrameKind;

/// What the pause leaves to the commitment.
pub(super) struct Paused {
    /// When the pause began.
    pub(super) t_pause: Instant,
    /// How long pausing the vCPUs took.
    pub(super) pause: Duration,
    /// The guest counter at the pause.
    pub(super) counter_at_pause: u64,
    /// The destination's `Ready`.
    pub(super) ready: msg::Ready,
    /// The digests compared, under `--verify`.
    pub(super) verification: Option<Verification>,
    /// Post-copy: the session's id (none for stop-and-copy).
    pub(super) session: Option<u64>,
}

/// The pause itself: the vCPUs stop, the throttle goes.
pub(super) struct Pause {
    pub(super) t_pause: Instant,
    pub(super) pause: Duration,
    pub(super) counter_at_pause: u64,
}

/// The proof that the VM is paused (it is, from the pause to the end of the migration).
pub(super) fn held(vm: &Vm) -> Result<vm::Paused<'_>, MigrateError> {
    vm.paused()
        .ok_or_else(|| vm::VmError::Invalid("the VM runs: its state cannot be sent".into()).into())
}

/// Pauses the VM's vCPUs.
pub(super) fn pause(vm: &Vm) -> Pause {
    let t_pause = Instant::now();
    let pause = vm.pause().took();
    vm.set_throttle(0);
    Pause {
        t_pause,
        pause,
        counter_at_pause: vm.stats().counter,
    }
}

/// Pauses, sends the rest, waits for `Ready`.
pub(super) fn run(run: &mut Run<'_>, pre: &mut Precopied) -> Result<Paused, MigrateError> {
    let p = pause(run.out.vm);
    let round = pre.rounds.len() as u32 + 1;
    let (last, ready, verification) = last_pages(run, &mut pre.pending, round)?;
    pre.rounds.push(last);
    Ok(Paused {
        t_pause: p.t_pause,
        pause: p.pause,
        counter_at_pause: p.counter_at_pause,
        ready,
        verification,
        session: None,
    })
}

/// Sends the last dirty pages, the log and the state with the vCPUs paused; waits for the
/// destination's Ready and checks its digests.
fn last_pages(
    run: &mut Run<'_>,
    pending: &mut Vec<u64>,
    round: u32,
) -> Result<(RoundStats, msg::Ready, Option<Verification>), MigrateError> {
    let (vm, opts, progress) = (run.out.vm, run.opts, run.progress);
    let link = &mut run.link;
    let t = Instant::now();
    pending.extend(vm.dirty().harvest()?);
    pending.sort_unstable();
    pending.dedup();
    #[cfg(any(test, feature = "fault-injection"))]
    if link.tap_last_round() {
        pending.clear();
    }
    progress(Progress::new(
        ProgressPhase::StopAndCopy,
        round,
        0,
        pending.len() as u64,
    ));
    let batch = Batch {
        kind: PageFrameKind::Pages,
        paused: true,
        round,
        populated: None,
        deadline: None,
    };
    let mut stats = stream::send_pages(link, vm, pending, batch, progress, run.cancel)?;
    let before = link.writer.bytes_sent();
    let shared = run.shared.is_some();
    let sent = send_state(
        run.out,
        link,
        run.disk.as_mut(),
        shared,
        opts,
        "stop-and-copy",
    )?;
    stats.bytes += link.writer.bytes_sent() - before;
    if let Some(d) = &run.disk {
        stats.disk_blocks = d.report.blocks_at_pause;
    }
    let source_vcpus = sent.vcpus;
    stats.secs = t.elapsed().as_secs_f64();
    stats.bandwidth = stats.bytes as f64 / stats.secs;
    // Under `--verify` the memories are compared after the destination's `Running` (its
    // page sum is ready at `Ready`, this side's full hash waits till then, off the
    // downtime), except on shared storage: a copy that ran on the shared disk could not be
    // undone, so there this side hashes its paused memory now, beside the destination.
    let at_pause = opts.verify && shared;
    let source_digest = at_pause.then(|| {
        let ram = vm.ram().clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            PageSum::of_ram(&ram, |_| true).map(|d| (d.hex(), t.elapsed().as_secs_f64() * 1e3))
        })
    });
    let ready: msg::Ready = link.recv()?;
    let source_memory = match source_digest {
        Some(h) => Some(
            h.join()
                .map_err(|_| MigrateError::Verify("the digest thread panicked".into()))??,
        ),
        None => None,
    };
    let verification = match (opts.verify, &ready.memory_digest, &ready.vcpu_digest) {
        (true, Some(dm), Some(dv)) => {
            let disk_equal = disk_equal(&sent.disk, &ready)?;
            let (memory, source_verify_ms) = source_memory.unwrap_or_default();
            let v = Verification {
                memory_equal: !at_pause || &memory == dm,
                memory_checked: if at_pause {
                    MemoryCheck::Pause
                } else {
                    MemoryCheck::AfterResume
                },
                vcpus_equal: &source_vcpus == dv,
                disk_equal,
                source_disk: sent.disk.clone(),
                dest_disk: ready.disk_digest.clone(),
                source_memory: memory,
                dest_memory: dm.clone(),
                source_vcpus,
                dest_vcpus: dv.clone(),
                dest_verify_ms: ready.verify_ms,
                source_verify_ms,
            };
            if !v.memory_equal || !v.vcpus_equal || v.disk_equal == Some(false) {
                return Err(MigrateError::Verify(format!(
                    "memory {} vs {}, vCPUs {} vs {}, disk {:?} vs {:?}",
                    v.source_memory,
                    v.dest_memory,
                    v.source_vcpus,
                    v.dest_vcpus,
                    v.source_disk,
                    v.dest_disk
                )));
            }
            Some(v)
        }
        (true, _, _) => {
            return Err(MigrateError::Verify(
                "the destination sent no digests".into(),
            ))
        }
        _ => None,
    };
    Ok((stats, ready, verification))
}

/// The digests of what the source sent with the VM paused.
pub(super) struct Sent {
    /// The vCPU state.
    pub(super) vcpus: String,
    /// The disk image (under `--verify`, with a copied disk).
    pub(super) disk: Option<String>,
}

/// With the vCPUs paused: notes the pause in the VM log, sends the log, the disk's last
/// written blocks and the vCPU and device state; returns the digests of what it sent. On
/// shared storage (`shared`) neither the log nor the disk travels: the image is flushed and
/// closed here before the state goes, so the destination opens it only once this side let go.
pub(super) fn send_state(
    out: &Outgoing<'_>,
    link: &mut Link,
    disk: Option<&mut DiskMirror>,
    shared: bool,
    opts: &MigrateOptions,
    phase: &str,
) -> Result<Sent, MigrateError> {
    out.vm
        .devices()
        .log_line(&format!("paused for migration: {phase}"));
    if shared {
        if let Some(blk) = out.vm.devices().blk() {
            blk.release().map_err(|e| {
                MigrateError::Disk(format!("releasing the image for the destination: {e}"))
            })?;
        }
    } else {
        stream::send_file(link, out.dir, inventory::LOG)?;
    }
    let disk = match disk {
        Some(d) => {
            d.finish(link, out)?;
            d.digest()
        }
        None => None,
    };
    let machine = held(out.vm)?.save()?;
    let vcpus = machine.vcpu_digest();
    link.send(&msg::State {
        machine: (&machine).into(),
        verify: opts.verify,
    })?;
    Ok(Sent { vcpus, disk })
}

/// Compares the disk digests of both sides, if a disk was copied (none if not).
pub(super) fn disk_equal(
    source: &Option<String>,
    ready: &msg::Ready,
) -> Result<Option<bool>, MigrateError> {
    match (source, &ready.disk_digest) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(MigrateError::Verify(
            "the destination sent no disk digest".into(),
        )),
        (Some(s), Some(d)) => Ok(Some(s == d)),
    }
}
