//! The source side: moves a running VM to a destination agent, one phase after another.
//!
//! The five stages, each a file of this module:
//! 1. **Pre-migration** ([`handshake`]): `Hello`/`Welcome`: a common protocol version, the page
//!    size, the CPU features; the round trip the controller predicts with.
//! 2. **Reservation** ([`reservation`]): `Reserve`/`Reserved`, then the VM's files.
//! 3. **Iterative pre-copy** ([`precopy`]): rounds of dirty pages while the VM runs, until the
//!    controller stops, switches to post-copy, or gives up.
//! 4. **Stop and copy** ([`stop_and_copy`]): pause, last pages, state, `Ready`; or, instead,
//!    the switch to **post-copy** ([`postcopy`]): the stale-page bitmap, state, `Ready`.
//! 5. **Commitment** ([`commit`]): `Go`/`Running`; the source releases the VM, or (post-copy)
//!    serves the pages the destination still lacks, across reconnections ([`resume`]).
//!
//! Until `Go` the source owns the VM: any failure resumes it here. The phase is kept by the
//! migration's [`Cancel`], which refuses a cancel from `Go` on.

mod commit;
mod disk;
pub(super) mod handshake;
mod postcopy;
mod precopy;
mod reservation;
mod resume;
mod stop_and_copy;
pub(super) mod stream;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use super::link::Link;
use super::{Cancel, MigrateError, MigrateOptions, Phase, Progress, Report};
use crate::inventory::VmDef;
use crate::migrate::report::ProgressPhase;
use crate::vm::Vm;
use crate::wire::messages as msg;

pub(super) use postcopy::PUSH_WINDOW;
pub use resume::{resume, rollback, Parked, ParkedWhy};

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
    /// How to secure the connections to the destination (mutual TLS, or `--insecure`).
    pub security: &'a crate::transport::Security,
    /// The name of the VM's datastore, if it is shared with other hosts.
    pub shared_datastore: Option<&'a str>,
}

/// How a migration that did not fail ended.
#[derive(Debug)]
pub enum Outcome {
    /// The VM runs on the destination; the source released it.
    Committed(Box<Report>),
    /// Post-copy lost its connection and reconnecting failed within the resume window: the VM
    /// runs on the destination, which waits for the pages this source still holds (paused
    /// here with all of its memory) until `--resume` or `--rollback`.
    Parked(Box<Parked>),
}

/// One outgoing migration under way: what each phase works with.
struct Run<'a> {
    out: &'a Outgoing<'a>,
    link: Link,
    dest: SocketAddr,
    dest_name: &'a str,
    opts: &'a MigrateOptions,
    cancel: &'a Cancel,
    progress: &'a dyn Fn(Progress),
    t0: Instant,
    /// The disk mirror, from the reservation on.
    disk: Option<disk::DiskMirror>,
    /// The disk stays on shared storage (the destination opens it in place): its figures.
    shared: Option<super::report::DiskReport>,
    /// After `Go`, the destination gave the VM back (it removed a copy `--verify` refused):
    /// a failure then is one before `Go`, and the VM runs here again.
    taken_back: bool,
}

/// Migrates `out.vm` to the agent at `dest`. On error the VM is running on the source as
/// before, unless the error is [`MigrateError::CommitUnknown`] (then it stays paused here).
pub fn migrate(
    out: &Outgoing<'_>,
    dest: SocketAddr,
    dest_name: &str,
    opts: &MigrateOptions,
    cancel: &Cancel,
    progress: &dyn Fn(Progress),
) -> Result<Outcome, MigrateError> {
    let t0 = Instant::now();
    opts.validate()?;
    progress(Progress::new(ProgressPhase::Connecting, 0, 0, 0));
    #[allow(unused_mut)]
    let mut link = Link::connect(out.security, dest, dest_name, opts)?;
    #[cfg(any(test, feature = "fault-injection"))]
    link.inject(super::fault::take());
    cancel.set_socket(Some(link.socket().try_clone()?));
    let mut run = Run {
        out,
        link,
        dest,
        dest_name,
        opts,
        cancel,
        progress,
        t0,
        disk: None,
        shared: None,
        taken_back: false,
    };
    // A panic (a bug) must not strand the VM: before Go it is an error like any other, and the
    // VM runs on here again; after Go the outcome is unknown and the VM stays paused.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.stages()))
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
    result.map_err(|e| run.fail(e))
}

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Run<'_> {
    /// The five stages, in order.
    fn stages(&mut self) -> Result<Outcome, MigrateError> {
        // 1. Pre-migration: version, page size, CPU.
        let rtt = handshake::hello(self)?;
        // 2. Reservation: memory and the name on the destination; the VM's files.
        self.cancel.enter(Phase::Reservation)?;
        reservation::reserve(self)?;
        // 3. Iterative pre-copy.
        self.cancel.enter(Phase::Precopy)?;
        let mut pre = precopy::rounds(self, rtt)?;
        // 4. Stop and copy, or the switch to post-copy.
        self.cancel.enter(Phase::StopAndCopy)?;
        let paused = match pre.end.clone() {
            precopy::End::StopAndCopy(_) => stop_and_copy::run(self, &mut pre)?,
            precopy::End::Postcopy(why) => postcopy::switch(self, &mut pre, &why)?,
        };
        // 5. Commitment: from `Go` on the destination owns the VM.
        self.cancel.enter(Phase::Commit)?;
        commit::go(self, pre, paused)
    }

    /// A failure: until `Go` the source owns the VM, so it runs here again; past it the
    /// destination may run it, so it must never run here too.
    fn fail(&mut self, e: MigrateError) -> MigrateError {
        let owned = self.cancel.phase().source_owns() || self.taken_back;
        let e = if self.cancel.is_cancelled() && owned {
            MigrateError::Cancelled
        } else {
            self.link.explain(e).name_silent_peer(self.dest_name)
        };
        if !owned {
            return match e {
                e @ MigrateError::CommitUnknown(_) => e,
                e => MigrateError::CommitUnknown(e.to_string()),
            };
        }
        let vm = self.out.vm;
        vm.set_throttle(0);
        // Tell the peer, stop logging, run again.
        let _ = self.link.send(&msg::Abort {
            reason: e.to_string(),
        });
        let _ = vm.dirty().stop();
        if let Some(blk) = vm.devices().blk() {
            blk.stop_block_log();
            // Released for the destination at the pause (shared storage): this side's again.
            if let Err(err) = blk.reacquire() {
                tracing::error!(error = %err, "cannot reopen the disk image: the guest's disk requests fail");
                vm.devices()
                    .log_line(&format!("cannot reopen the disk image: {err}"));
            }
        }
        vm.resume();
        vm.devices().log_line(&format!(
            "migration to {} failed: {e}; running on the source",
            self.dest_name
        ));
        e
    }
}

/// Completes a report's totals.
fn finished(mut report: Report, bytes_sent: u64, t0: Instant) -> Report {
    let total = t0.elapsed().as_secs_f64();
    report.total_ms = total * 1e3;
    report.bytes_sent = bytes_sent;
    report.achieved_mibs = bytes_sent as f64 / 1048576.0 / total;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_refuses_to_skip_a_phase() {
        let c = Cancel::default();
        assert!(matches!(
            c.enter(Phase::Commit),
            Err(MigrateError::NotAllowed {
                phase: Phase::Handshake,
                ..
            })
        ));
        for p in [Phase::Reservation, Phase::Precopy, Phase::StopAndCopy] {
            c.enter(p).unwrap();
        }
        c.cancel().unwrap();
        assert!(
            matches!(c.enter(Phase::Commit), Err(MigrateError::Cancelled)),
            "a cancel before Go wins"
        );
    }

    #[test]
    fn a_cancel_after_go_is_refused() {
        let c = Cancel::default();
        for p in [
            Phase::Reservation,
            Phase::Precopy,
            Phase::StopAndCopy,
            Phase::Commit,
        ] {
            c.enter(p).unwrap();
        }
        assert!(matches!(
            c.cancel(),
            Err(MigrateError::NotAllowed {
                phase: Phase::Commit,
                event: crate::migrate::Event::Cancel
            })
        ));
        assert!(!c.is_cancelled());
    }
}
