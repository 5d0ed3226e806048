//! Kernel-measured dirty rates for the pre-copy controller.
//!
//! During a migration the source attaches (on a thread of its own, beside round 1: attaching
//! takes tens of milliseconds that an idle VM's whole migration should not wait for) the
//! `vmig-ebpf` dirty-ring probes
//! ([`ProbeSet::DirtyRing`]: counters only, no event ring, nothing on the per-instruction or
//! per-ioctl tracepoints) to the VM being migrated, filtered to this process (the VMM), the
//! VM's vCPU threads and its guest memory. After every pre-copy round, right after the dirty log's harvest,
//! [`RoundProbes::end_round`] reads what the kernel counted since the previous harvest: the
//! dirty-ring pushes, the distinct pages they named and the ring-full exits, then starts a new
//! distinct-page window. The controller weighs the distinct pages against the log's own count
//! (see `controller.rs`), and the report shows both per round.
//!
//! When the probes cannot run (no CAP_BPF, no tracefs or BTF, a binary built without clang, or a
//! VM tracking dirty pages with the bitmap, where KVM pushes nothing onto a ring) the migration
//! goes on without them and [`RoundProbes::off_reason`] says why, once, for the report.

use std::time::Instant;

use vmig_ebpf::{Counters, ProbeSet, VmFilter, VmProbes};

use super::KernelRound;
use crate::dirty::DirtyMode;
use crate::vm::Vm;

/// The probes of one outgoing migration, or why there are none.
#[derive(Debug)]
pub struct RoundProbes {
    state: State,
}

/// The probes, their counters when attached, and when that was.
type Attached = Result<(VmProbes, Counters, Instant), String>;

#[derive(Debug)]
enum State {
    /// Attaching on a thread of its own (tens of milliseconds: program loads and the
    /// verifier), so that pre-copy does not wait for it; rounds that end meanwhile have no
    /// kernel figures.
    Attaching(std::thread::JoinHandle<Attached>),
    On {
        probes: Box<VmProbes>,
        /// Counters at the start of the current window.
        last: Counters,
        /// When the current window started (the first starts when the attach is done).
        since: Instant,
    },
    Off(String),
}

impl RoundProbes {
    /// Starts attaching the probes to `vm` (a VM of this process) on a thread of its own and
    /// returns at once: the first window starts when they are attached. Never fails: a
    /// failure becomes the off reason.
    pub fn attach(vm: &Vm) -> Self {
        let off = |why: String| {
            tracing::info!(%why, "kernel-measured dirty rates off");
            Self {
                state: State::Off(why),
            }
        };
        if vm.dirty().mode() == DirtyMode::Bitmap {
            return off(
                "the VM tracks dirty pages with the KVM dirty bitmap, where KVM pushes \
                 no dirty-ring entries for the probes to count (dirty_tracking = \"ring\" \
                 turns them on)"
                    .into(),
            );
        }
        let filter = filter_of(vm);
        match std::thread::Builder::new()
            .name("probe-attach".into())
            .spawn(move || {
                lower_priority();
                let t = Instant::now();
                let r = Self::try_attach(&filter);
                if r.is_ok() {
                    tracing::info!(
                        attach_ms = t.elapsed().as_secs_f64() * 1e3,
                        "kernel-measured dirty rates on (BPF probes attached)"
                    );
                }
                r
            }) {
            Ok(h) => Self {
                state: State::Attaching(h),
            },
            Err(e) => off(format!("cannot start attaching the BPF probes: {e}")),
        }
    }

    /// Takes the attach's outcome if it is done.
    fn settle(&mut self) {
        let State::Attaching(h) = &self.state else {
            return;
        };
        if !h.is_finished() {
            return;
        }
        let State::Attaching(h) = std::mem::replace(&mut self.state, State::Off(String::new()))
        else {
            unreachable!("checked above");
        };
        self.state = match h.join() {
            Ok(Ok((probes, last, since))) => State::On {
                probes: Box::new(probes),
                last,
                since,
            },
            Ok(Err(why)) => {
                tracing::info!(%why, "kernel-measured dirty rates off");
                State::Off(why)
            }
            Err(_) => State::Off("attaching the BPF probes panicked".into()),
        };
    }

    fn try_attach(filter: &VmFilter) -> Attached {
        let mut probes = VmProbes::attach_set(filter, false, ProbeSet::DirtyRing)
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        probes
            .start_dirty_window()
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        let last = probes
            .counters()
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        Ok((probes, last, Instant::now()))
    }

    /// Why the kernel's figures were off, for the report, once the VM runs on the destination.
    /// An attach still running then came too late for any round; it is not waited for (the
    /// migration's end would wait with it; dropping the probes lets it finish and detach on
    /// its own thread), but one that already failed says why.
    pub fn final_off_reason(&mut self) -> Option<String> {
        let late = matches!(self.state, State::Attaching(_));
        self.settle();
        match &self.state {
            State::Off(why) => Some(why.clone()),
            State::On { .. } if !late => None,
            // Still attaching, or attached since pre-copy ended.
            _ => Some(
                "pre-copy ended before the BPF probes were attached (they attach beside round 1)"
                    .into(),
            ),
        }
    }

    /// Ends round `round`: returns the kernel's counts since the previous call (or since the
    /// attach) over that window's length, and starts the next window. `None` when the probes
    /// are off or still attaching; a failure to read them turns them off for the rest of the
    /// migration.
    pub fn end_round(&mut self, round: u32) -> Option<KernelRound> {
        self.settle();
        let State::On {
            probes,
            last,
            since,
        } = &mut self.state
        else {
            return None;
        };
        // The round's figures cover the window since the previous harvest, or since the
        // probes were attached if that was during this round.
        let read = probes
            .start_dirty_window()
            .and_then(|()| probes.counters())
            .map_err(|e| vmig_ebpf::chain_to_string(&e));
        match read {
            Ok(now) => {
                let k = round_of(last, &now, since.elapsed().as_secs_f64());
                *last = now;
                *since = Instant::now();
                Some(k)
            }
            Err(why) => {
                let why = format!("reading the BPF probes failed in round {round}: {why}");
                tracing::warn!(%why, "kernel-measured dirty rates off");
                self.state = State::Off(why);
                None
            }
        }
    }
}

/// Nice value of the attaching thread: the program loads and the verifier take tens of
/// milliseconds of CPU, which an idle VM's whole migration (its pause included) is shorter
/// than; at nice 0 they took the pause's CPU on a 2-core host (idle 1 GiB downtime 3.5 ->
/// 5-7 ms). At 10 they yield to the migration and the vCPUs and still finish within a busy
/// VM's first round.
const ATTACH_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`ATTACH_NICE`] (best effort: a failure
/// only leaves it at the process's).
fn lower_priority() {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority reads no memory of this process; with PRIO_PROCESS and a thread id
    // Linux sets that one thread's nice value, and the thread is the caller.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, ATTACH_NICE) };
    if r != 0 {
        tracing::debug!(cause = %std::io::Error::last_os_error(), "cannot lower the probe attach's priority");
    }
}

/// This process, the VM's vCPU threads (those started) and its guest memory.
pub fn filter_of(vm: &Vm) -> VmFilter {
    VmFilter {
        pid: std::process::id(),
        vcpu_tids: vm
            .vcpu_tids()
            .into_iter()
            .map(|t| u32::try_from(t).unwrap_or(0))
            .collect(),
        mem_start: vm.ram().host_base() as u64,
        mem_len: vm.ram().size(),
    }
}

/// The round between two counter readings.
fn round_of(before: &Counters, after: &Counters, secs: f64) -> KernelRound {
    let pushes = after
        .dirty_ring_pushes
        .saturating_sub(before.dirty_ring_pushes);
    KernelRound {
        pushes,
        window_s: secs,
        pushes_per_s: if secs > 0.0 {
            pushes as f64 / secs
        } else {
            0.0
        },
        distinct_pages: after
            .dirty_pages_distinct
            .saturating_sub(before.dirty_pages_distinct),
        ring_full_exits: after.dirty_ring_full.saturating_sub(before.dirty_ring_full),
    }
}

#[cfg(test)]
pub(crate) mod test_hook {
    //! A test's look at the destination of an in-process post-copy migration: called with the
    //! VM after its memory is registered with userfaultfd and before its vCPUs run.

    use std::sync::Mutex;

    use crate::vm::Vm;

    type Hook = Box<dyn FnMut(&Vm) + Send>;
    static BEFORE_POSTCOPY_RUN: Mutex<Option<Hook>> = Mutex::new(None);

    /// Installs `f` for the next post-copy destination (taken when it runs).
    pub fn set(f: impl FnMut(&Vm) + Send + 'static) {
        *BEFORE_POSTCOPY_RUN
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Runs the installed hook, if any (once).
    pub fn before_postcopy_run(vm: &Vm) {
        let hook = BEFORE_POSTCOPY_RUN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut f) = hook {
            f(vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_the_difference_of_two_readings() {
        let before = Counters {
            dirty_ring_pushes: 1000,
            dirty_pages_distinct: 300,
            dirty_ring_full: 2,
            ..Default::default()
        };
        let after = Counters {
            dirty_ring_pushes: 5000,
            dirty_pages_distinct: 700,
            dirty_ring_full: 3,
            ..Default::default()
        };
        let k = round_of(&before, &after, 0.5);
        assert_eq!(
            k,
            KernelRound {
                pushes: 4000,
                window_s: 0.5,
                pushes_per_s: 8000.0,
                distinct_pages: 400,
                ring_full_exits: 1,
            }
        );
        assert_eq!(round_of(&before, &after, 0.0).pushes_per_s, 0.0);
    }
}
