//! Kernel-measured dirty rates for the pre-copy controller.
//!
//! During a migration the source attaches (on a thread of its own, [`ATTACH_DELAY`] into a
//! round 1 still running: attaching takes tens of milliseconds that an idle VM's whole
//! migration should not pay for) the
//! `vmig-ebpf` dirty-ring probes
//! ([`ProbeSet::DirtyRing`]: counters only, no event ring, nothing on the per-instruction or
//! per-ioctl tracepoints) to the VM being migrated, filtered to this process (the VMM), the
//! VM's vCPU threads and its guest memory. After every pre-copy round, right after the dirty log's harvest,
//! [`RoundProbes::end_round`] reads what the kernel counted since the previous harvest: the
//! dirty-ring pushes, the distinct pages they named and the ring-full exits, then starts a new
//! distinct-page window. Round 1 is cut into [`SAMPLE`]-long windows: the guest's sustained
//! dirtying rate at its end lets the controller judge convergence after round 1. The
//! controller weighs the distinct pages against the log's own count
//! (see `controller.rs`), and the report shows both per round.
//!
//! When the probes cannot run (no CAP_BPF, no tracefs or BTF, a binary built without clang, or a
//! VM tracking dirty pages with the bitmap, where KVM pushes nothing onto a ring) the migration
//! goes on without them and [`RoundProbes::off_reason`] says why, once, for the report.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vmig_ebpf::{Counters, ProbeSet, VmFilter, VmProbes};

use super::KernelRound;
use crate::dirty::DirtyMode;
use crate::vm::Vm;

/// Length of one rate sample in round 1. Short enough that two fit in the first round of any
/// VM worth judging early (a round that ends sooner has no kernel figures and is judged by the
/// dirty log), long enough for thousands of pages at the rates a guest reaches here.
pub const SAMPLE: Duration = Duration::from_millis(50);

/// The probes of one outgoing migration, or why there are none.
#[derive(Debug)]
pub struct RoundProbes {
    state: State,
}

/// The round-1 thread's outcome: the probes, the counters at the attach, round 1's rate
/// samples, and the window that starts when the sampling stops.
#[derive(Debug)]
struct Sampled {
    probes: VmProbes,
    /// Counters when the probes were attached, and when that was.
    first: Counters,
    /// Distinct pages of each sample, and its length in seconds.
    samples: Vec<(u64, f64)>,
    /// Counters when the sampling stopped (a new distinct window starts there), and when.
    last: Counters,
    since: Instant,
}

type Attached = Result<Sampled, String>;

/// What the migration tells the round-1 thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// Round 1 ended (stop sampling).
    RoundEnded,
    /// Round 1 ended before the attach began, and pre-copy goes on: attach for later rounds.
    GoOn,
}

/// Where the round-1 thread is: waiting for [`ATTACH_DELAY`], attaching, or attached.
const WAITING: u8 = 0;
const ATTACHING: u8 = 1;
const ATTACHED: u8 = 2;

/// How long round 1 runs before the probes attach. An idle VM's whole migration (a 1 GiB one
/// takes ~20 ms here) is over by then and never pays for the probes; a busy VM's round 1 runs
/// long after it, and the attach, at full priority, leaves room for the rate samples.
pub const ATTACH_DELAY: Duration = Duration::from_millis(40);

#[derive(Debug)]
enum State {
    /// The round-1 thread: it waits [`ATTACH_DELAY`], attaches (tens of milliseconds of
    /// program loads and the verifier, which pre-copy does not wait for), then samples round
    /// 1's dirtying rate; rounds that end before the attach have no kernel figures.
    Round1 {
        thread: std::thread::JoinHandle<Attached>,
        /// Dropped when pre-copy is over.
        signal: Option<mpsc::Sender<Signal>>,
        round_ended: bool,
        /// [`WAITING`], [`ATTACHING`] or [`ATTACHED`].
        phase: Arc<AtomicU8>,
    },
    On {
        probes: Box<VmProbes>,
        /// Counters at the start of the current window.
        last: Counters,
        /// When the current window started.
        since: Instant,
    },
    Off(String),
}

impl RoundProbes {
    /// Starts the probes' thread for `vm` (a VM of this process) and returns at once: after
    /// [`ATTACH_DELAY`] of round 1 it attaches them, then samples the guest's dirtying rate
    /// every [`SAMPLE`] until round 1 ends. Never fails: a failure becomes the off reason.
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
        let (signal, signals) = mpsc::channel();
        let phase = Arc::new(AtomicU8::new(WAITING));
        let at = phase.clone();
        match std::thread::Builder::new()
            .name("probe-attach".into())
            .spawn(move || round1_thread(&filter, &signals, &at))
        {
            Ok(thread) => Self {
                state: State::Round1 {
                    thread,
                    signal: Some(signal),
                    round_ended: false,
                    phase,
                },
            },
            Err(e) => off(format!("cannot start attaching the BPF probes: {e}")),
        }
    }

    /// Round 1 is over and pre-copy goes on: a thread that did not attach yet (round 1 was
    /// shorter than [`ATTACH_DELAY`]) attaches now, at low priority, for the later rounds.
    pub fn pre_copy_goes_on(&mut self) {
        if let State::Round1 {
            signal: Some(s),
            round_ended: true,
            ..
        } = &self.state
        {
            let _ = s.send(Signal::GoOn);
        }
    }

    /// Tells the thread that round 1 ended (`end` is [`Signal::RoundEnded`]) or that pre-copy
    /// is over (`None`), and takes its outcome when it is attached (joining it then waits only
    /// for its last sample) or done.
    fn settle(&mut self, end: Option<Signal>) -> Option<Sampled> {
        let State::Round1 {
            thread,
            signal,
            round_ended,
            phase,
        } = &mut self.state
        else {
            return None;
        };
        match end {
            Some(Signal::RoundEnded) if !*round_ended => {
                *round_ended = true;
                if let Some(s) = signal {
                    let _ = s.send(Signal::RoundEnded);
                }
            }
            Some(_) => {}
            None => *round_ended = signal.take().is_some() || *round_ended,
        }
        let attached = phase.load(Ordering::Acquire) == ATTACHED;
        if !(thread.is_finished() || (*round_ended && attached)) {
            return None;
        }
        let State::Round1 { thread, .. } =
            std::mem::replace(&mut self.state, State::Off(String::new()))
        else {
            unreachable!("checked above");
        };
        match thread.join() {
            Ok(Ok(s)) => Some(s),
            Ok(Err(why)) => {
                tracing::info!(%why, "kernel-measured dirty rates off");
                self.state = State::Off(why);
                None
            }
            Err(_) => {
                self.state = State::Off("attaching the BPF probes panicked".into());
                None
            }
        }
    }

    fn try_attach(filter: &VmFilter) -> Result<(VmProbes, (Counters, Instant)), String> {
        let mut probes = VmProbes::attach_set(filter, false, ProbeSet::DirtyRing)
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        probes
            .start_dirty_window()
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        let first = probes
            .counters()
            .map_err(|e| vmig_ebpf::chain_to_string(&e))?;
        Ok((probes, (first, Instant::now())))
    }

    /// Why the kernel's figures were off, for the report, once the VM runs on the destination.
    /// An attach still running then came too late for any round; it is not waited for (the
    /// migration's end would wait with it; dropping the probes lets it finish and detach on
    /// its own thread), but one that already failed says why.
    pub fn final_off_reason(&mut self) -> Option<String> {
        let waited = match &self.state {
            State::Round1 { phase, .. } => Some(phase.load(Ordering::Acquire) == WAITING),
            _ => None,
        };
        if let Some(s) = self.settle(None) {
            self.state = State::On {
                probes: Box::new(s.probes),
                last: s.last,
                since: s.since,
            };
        }
        match (&self.state, waited) {
            (State::Off(why), _) => Some(why.clone()),
            (State::On { .. }, None) => None,
            // The thread, told just now, has not returned yet.
            (_, Some(true)) => Some(not_needed()),
            // Still attaching, or attached since pre-copy ended.
            _ => Some(
                "pre-copy ended before the BPF probes were attached (they attach beside round 1)"
                    .into(),
            ),
        }
    }

    /// Ends round `round`: returns the kernel's counts since the previous call (or since the
    /// attach) over that window's length, and starts the next window. Round 1 also ends the
    /// rate sampling and carries its rate. `None` when the probes are off or still attaching;
    /// a failure to read them turns them off for the rest of the migration.
    pub fn end_round(&mut self, round: u32) -> Option<KernelRound> {
        if let Some(s) = self.settle(Some(Signal::RoundEnded)) {
            // Attached during round 1 (or, if round 1 ended before the attach, during a later
            // round, which then has no sampled figures: its window starts here).
            let in_round1 = s.samples.iter().map(|(_, secs)| secs).sum::<f64>() > 0.0;
            let k = in_round1.then(|| round1_of(&s.first, &s.last, &s.samples));
            self.state = State::On {
                probes: Box::new(s.probes),
                last: s.last,
                since: s.since,
            };
            if let Some(k) = k {
                return Some(k);
            }
        }
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

/// Why there are no kernel figures when pre-copy ended within round 1, before the attach.
fn not_needed() -> String {
    format!(
        "pre-copy ended before the BPF probes were needed (they attach {} ms into a round 1 still running)",
        ATTACH_DELAY.as_millis()
    )
}

/// The round-1 thread: waits [`ATTACH_DELAY`] (or, if round 1 ends first, for pre-copy to go
/// on), attaches, then samples round 1.
fn round1_thread(
    filter: &VmFilter,
    signals: &mpsc::Receiver<Signal>,
    phase: &AtomicU8,
) -> Attached {
    let late = match signals.recv_timeout(ATTACH_DELAY) {
        Err(mpsc::RecvTimeoutError::Timeout) => false,
        Err(mpsc::RecvTimeoutError::Disconnected) => return Err(not_needed()),
        Ok(_) => match signals.recv() {
            Ok(Signal::GoOn) => true,
            _ => return Err(not_needed()),
        },
    };
    phase.store(ATTACHING, Ordering::Release);
    // Attaching after round 1 is for short rounds, whose pauses it must not slow down.
    if late {
        lower_priority();
    }
    let t = Instant::now();
    let r = RoundProbes::try_attach(filter);
    if r.is_ok() {
        tracing::info!(
            attach_ms = t.elapsed().as_secs_f64() * 1e3,
            late,
            "kernel-measured dirty rates on (BPF probes attached)"
        );
    }
    phase.store(ATTACHED, Ordering::Release);
    let (probes, (first, at)) = r?;
    if late {
        return Ok(Sampled {
            probes,
            first: first.clone(),
            samples: Vec::new(),
            last: first,
            since: at,
        });
    }
    sample_round1(probes, (first, at), signals)
}

/// Samples the guest's dirtying rate every [`SAMPLE`] (each sample a distinct-page window of
/// its own) until round 1 ends, then starts the window of the next round.
fn sample_round1(
    mut probes: VmProbes,
    (first, at): (Counters, Instant),
    stop: &mpsc::Receiver<Signal>,
) -> Attached {
    let err = |e: vmig_ebpf::EbpfError| vmig_ebpf::chain_to_string(&e);
    let mut samples = Vec::new();
    let (mut prev, mut prev_at) = (first.dirty_pages_distinct, at);
    loop {
        let ended = !matches!(
            stop.recv_timeout(SAMPLE),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        let now = probes.counters().map_err(err)?;
        probes.start_dirty_window().map_err(err)?;
        let t = Instant::now();
        let secs = t.duration_since(prev_at).as_secs_f64();
        // The last, partial sample counts only if it is long enough to mean something.
        if !ended || secs >= SAMPLE.as_secs_f64() / 2.0 {
            samples.push((now.dirty_pages_distinct.saturating_sub(prev), secs));
        }
        (prev, prev_at) = (now.dirty_pages_distinct, t);
        if ended {
            return Ok(Sampled {
                probes,
                first,
                samples,
                last: now,
                since: t,
            });
        }
    }
}

/// Round 1's figures from its samples: pushes and ring-full exits over the whole window since
/// the attach; distinct pages the largest sample's (the samples are windows of their own, so
/// the round's distinct count is not known, only this lower bound); the rate the lower of the
/// last two samples' (a sustained rate, not a burst).
fn round1_of(first: &Counters, last: &Counters, samples: &[(u64, f64)]) -> KernelRound {
    let secs = samples.iter().map(|(_, secs)| secs).sum::<f64>();
    let mut k = round_of(first, last, secs);
    k.distinct_pages = samples.iter().map(|(d, _)| *d).max().unwrap_or(0);
    k.rate_samples = samples.len() as u32;
    if let [.., (a, sa), (b, sb)] = samples[..] {
        k.rate_pages_per_s = (a as f64 / sa).min(b as f64 / sb);
    }
    k
}

/// Nice value of the attaching thread: the program loads and the verifier take tens of
/// milliseconds of CPU, which an idle VM's whole migration (its pause included) is shorter
/// than; at nice 0 they took the pause's CPU on a 2-core host (idle 1 GiB downtime 3.5 ->
/// 5-7 ms). At 10 they yield to the migration and the vCPUs and still finish within a busy
/// VM's first round.
const ATTACH_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`ATTACH_NICE`] (best effort: a failure
/// only leaves it at the process's).
pub(crate) fn lower_priority() {
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
        ..KernelRound::default()
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
                ..Default::default()
            }
        );
        assert_eq!(round_of(&before, &after, 0.0).pushes_per_s, 0.0);
    }

    #[test]
    fn round_1_takes_its_rate_from_the_last_two_samples() {
        let first = Counters::default();
        let last = Counters {
            dirty_ring_pushes: 9000,
            dirty_pages_distinct: 2600,
            ..Default::default()
        };
        // A burst, then a steady 10,000 pages/s, the last sample partial (30 ms).
        let samples = [(2000, 0.05), (500, 0.05), (500, 0.05), (300, 0.03)];
        let k = round1_of(&first, &last, &samples);
        assert_eq!(k.pushes, 9000);
        assert!((k.window_s - 0.18).abs() < 1e-9);
        assert_eq!(k.distinct_pages, 2000, "the largest sample: a lower bound");
        assert_eq!(k.rate_samples, 4);
        assert!((k.rate_pages_per_s - 10_000.0).abs() < 1e-6);
        // One sample is no sustained rate.
        assert_eq!(
            round1_of(&first, &last, &samples[..1]).rate_pages_per_s,
            0.0
        );
    }
}
