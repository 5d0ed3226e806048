//! In-process migrations between two inventories ("agents") in one test process: the
//! controller's policies and post-copy, end to end over loopback TCP.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    fault::{self, Fault},
    report::{Cause, Decision, ProgressNote, ProgressPhase},
    source::{self, Outcome},
    Cancel, MigrateError, MigrateOptions, Mode, NoConverge, PostcopyPolicy, Report,
};
use crate::inventory::{Inventory, VmDef};
use crate::transport::IoPath;

pub(super) struct Pair {
    _dir: tempfile::TempDir,
    pub(super) src: Arc<Inventory>,
    pub(super) dst: Arc<Inventory>,
}

pub(super) fn pair(name: &str, memory_mib: u64, workload: &[&str], dirty_mib: u64) -> Pair {
    // The bitmap: on this platform the dirty ring stops reporting after a few wraps
    // under a flat-out dirtier (ring-full exits loop with nothing to harvest).
    pair_with(
        name,
        memory_mib,
        workload,
        dirty_mib,
        crate::dirty::DirtyTracking::Bitmap,
    )
}

/// Like [`pair`], with the dirty-tracking mechanism of the VM chosen.
pub(super) fn pair_with(
    name: &str,
    memory_mib: u64,
    workload: &[&str],
    dirty_mib: u64,
    dirty_tracking: crate::dirty::DirtyTracking,
) -> Pair {
    pair_paced(name, memory_mib, workload, dirty_mib, dirty_tracking, 0)
}

/// Like [`pair_with`], the `dirty` vCPU held to `dirty_rate` pages/s (0: flat out).
pub(super) fn pair_paced(
    name: &str,
    memory_mib: u64,
    workload: &[&str],
    dirty_mib: u64,
    dirty_tracking: crate::dirty::DirtyTracking,
    dirty_rate: u64,
) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let src = Inventory::open(&dir.path().join("a"), 4 << 30).unwrap();
    let dst = Inventory::open(&dir.path().join("b"), 4 << 30).unwrap();
    let def = VmDef {
        name: name.into(),
        memory_mib,
        vcpus: workload.len() as u32,
        workload: workload.iter().map(|w| w.to_string()).collect(),
        dirty_mib,
        dirty_rate,
        dirty_tracking,
        disk_mib: 1,
        disk_rate: 0,
        disk_region_mib: 0,
        generation: 0,
    };
    src.create(def).unwrap();
    src.start(name).unwrap();
    Pair {
        _dir: dir,
        src,
        dst,
    }
}

/// The tests below each run two flat-out guests and a migration on a 2-core machine: run them
/// one at a time so each migration's timing is its own.
pub(super) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `name` runs on `p.src`: its counter reported twice and, for a flat-out
/// dirtier, its working set written.
fn wait_running(p: &Pair, name: &str) {
    let (_, vm) = p.src.running(name).unwrap();
    // A flat-out `dirty` vCPU makes 3 passes over 4,096 pages; a paced one covers its working
    // set once (the migration's round 1 then sends all of it).
    let spec = vm.spec();
    let written = match (
        spec.programs.contains(&crate::guest::Program::Dirty),
        spec.dirty_rate,
    ) {
        (false, _) => 0,
        (true, 0) => 3 * 4096,
        (true, _) => spec.dirty_bytes / 4096,
    };
    wait_for("the guest runs", Duration::from_secs(60), || {
        let s = vm.stats();
        s.counter_reports >= 2 && s.dirty_pages_written >= written
    });
}

/// A progress event's phase and what it announced, if anything.
pub(super) type Step = (ProgressPhase, Option<ProgressNote>);

/// Migrates `name` from `p.src` to `p.dst` with `opts`; returns the result and the phases
/// seen in progress events.
pub(super) fn migrate(
    p: &Pair,
    name: &str,
    opts: &MigrateOptions,
) -> (Result<Report, MigrateError>, Vec<Step>) {
    wait_running(p, name);
    let incoming = Incoming::start(p.dst.clone());
    let addr = incoming.addr;
    let (def, vm) = p.src.begin_migration(name).unwrap();
    let dir = p.src.dir(name);
    let out = source::Outgoing {
        vm: &vm,
        def: &def,
        dir: &dir,
        agent: "src",
        security: &crate::transport::Security::Insecure,
        shared_datastore: None,
    };
    let phases = Mutex::new(Vec::<Step>::new());
    let progress = |ev: super::Progress| record(&phases, ev);
    let result =
        source::migrate(&out, addr, "dst", opts, &Cancel::default(), &progress).map(|outcome| {
            match outcome {
                Outcome::Committed(report) => *report,
                Outcome::Parked(p) => panic!("the migration parked: {p}"),
            }
        });
    let dest = incoming.finish().pop().expect("one incoming connection");
    match &result {
        Ok(_) => {
            assert!(dest.is_ok(), "destination failed: {dest:?}");
            p.src.end_migration(name, true);
        }
        Err(_) => {
            assert!(dest.is_err(), "destination kept a VM the source still owns");
            p.src.end_migration(name, false);
        }
    }
    (result, phases.into_inner().unwrap())
}

/// Records a progress event's phase (and decision) when it changes; every event of every
/// migration test is checked to count within its total (a bar never shows `131072/32770`).
fn record(phases: &Mutex<Vec<Step>>, ev: super::Progress) {
    assert!(
        ev.sent <= ev.total && ev.remaining <= ev.total,
        "a progress event counts past its total: {ev:?}"
    );
    let mut ph = phases.lock().unwrap();
    let step = (ev.phase, ev.decision);
    if ph.last() != Some(&step) {
        ph.push(step);
    }
}

/// The destination "agent": accepts every migration connection on a loopback port, each in its
/// own thread, until `finish`, which returns their results in order of arrival.
struct Incoming {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Result<String, MigrateError>>>,
}

impl Incoming {
    fn start(dst: Arc<Inventory>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // The destination agent's migrations (its post-copy sessions, across connections).
        let registry = Arc::new(super::registry::Registry::default());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        sock.set_nonblocking(false).unwrap();
                        let (dst, registry) = (dst.clone(), registry.clone());
                        conns.push(std::thread::spawn(move || {
                            let to = super::dest::Destination {
                                inv: &dst,
                                registry: &registry,
                                agent: "dst",
                                io: IoPath::Auto,
                            };
                            super::dest::receive(crate::transport::Channel::plain(sock), &to)
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            conns.into_iter().map(|c| c.join().unwrap()).collect()
        });
        Self { addr, stop, thread }
    }

    fn finish(self) -> Vec<Result<String, MigrateError>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

pub(super) fn print(report: &Report) {
    eprintln!("{}", report.render());
    eprintln!(
        "{}",
        serde_json::to_string(&report.postcopy).unwrap_or_default()
    );
}

/// The VM runs on the destination and its counter goes on past the value at the pause.
pub(super) fn runs_on_destination(p: &Pair, name: &str, report: &Report) {
    let (_, vm) = p.dst.running(name).unwrap();
    wait_for(
        "the counter goes on at the destination",
        Duration::from_secs(30),
        || vm.stats().counter > report.counter_at_pause,
    );
    assert_eq!(vm.stats().counter_failures, 0);
    assert!(p.src.running(name).is_err(), "the source released the VM");
}

/// A post-copy report's proof: memory and vCPU digests equal, every page missing at the
/// switch placed once (on demand or pushed). Returns the post-copy figures.
pub(super) fn postcopy_landed(report: &Report) -> super::PostcopyStats {
    assert_eq!(report.mode, Mode::PostCopy);
    let v = report.verification.clone().unwrap();
    assert!(v.memory_equal, "{} vs {}", v.source_memory, v.dest_memory);
    assert!(v.vcpus_equal, "{} vs {}", v.source_vcpus, v.dest_vcpus);
    let pc = report.postcopy.clone().unwrap();
    assert_eq!(pc.pages_demand + pc.pages_pushed, pc.pages_missing);
    pc
}

pub(super) fn busy_opts(bandwidth: f64) -> MigrateOptions {
    MigrateOptions {
        bandwidth_mibs: Some(bandwidth),
        verify: true,
        timeout_s: 120,
        ..Default::default()
    }
}

#[test]
fn auto_switches_to_postcopy_when_the_guest_outruns_the_link() {
    let _serial = serial();
    let p = pair("hot", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        ..busy_opts(10.0)
    };
    let (r, phases) = migrate(&p, "hot", &opts);
    let report = r.unwrap();
    print(&report);
    eprintln!("phases: {phases:?}");
    postcopy_landed(&report);
    assert!(matches!(
        report.stop_reason.cause,
        Cause::DirtyRatio | Cause::NoShrink
    ));
    assert!(report.rounds.len() >= 3, "min rounds before the switch");
    assert!(report
        .decisions
        .iter()
        .any(|d| matches!(d.decision, Decision::Postcopy(_))));
    assert!(phases.iter().any(|(ph, _)| *ph == ProgressPhase::PostCopy));
    runs_on_destination(&p, "hot", &report);
}

#[test]
fn always_runs_one_round_then_postcopy_with_demand_faults() {
    let _serial = serial();
    let p = pair("always", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Always,
        ..busy_opts(20.0)
    };
    let (r, _) = migrate(&p, "always", &opts);
    let report = r.unwrap();
    print(&report);
    let pc = postcopy_landed(&report);
    // One pre-copy round, then the switch pass.
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.stop_reason.cause, Cause::PolicyAlways);
    // The dirty vCPU faults on its working set. Whether a faulting page is then counted as
    // demanded or pushed depends on which answer lands first (the background push races the
    // request), so the faults and their latencies are what is certain.
    assert!(pc.faults > 0, "the dirty vCPU faults on its working set");
    assert!(pc.requests > 0, "faults turned into page requests");
    assert!(
        pc.latency_count > 0 && pc.latency_p50_us > 0 && pc.latency_p99_us >= pc.latency_p50_us
    );
    runs_on_destination(&p, "always", &report);
}

#[test]
fn never_with_throttle_converges_by_slowing_the_guest() {
    let _serial = serial();
    let p = pair("throttled", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        on_no_converge: NoConverge::Throttle,
        ..busy_opts(50.0)
    };
    let (r, _) = migrate(&p, "throttled", &opts);
    let report = r.unwrap();
    print(&report);
    assert_eq!(report.mode, Mode::PreCopy);
    assert!(report.postcopy.is_none());
    assert!(report
        .decisions
        .iter()
        .any(|d| matches!(d.decision, Decision::Throttle { .. })));
    assert!(report.rounds.iter().any(|r| r.throttle_pct > 0));
    assert!(report.verification.as_ref().unwrap().memory_equal);
    // The throttle does not follow the VM: it runs at full speed on the destination.
    let (_, vm) = p.dst.running("throttled").unwrap();
    assert_eq!(vm.throttle(), 0);
    runs_on_destination(&p, "throttled", &report);
}

#[test]
fn never_with_abort_keeps_the_vm_on_the_source() {
    let _serial = serial();
    let p = pair("stays", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        on_no_converge: NoConverge::Abort,
        ..busy_opts(10.0)
    };
    let (r, _) = migrate(&p, "stays", &opts);
    let err = r.unwrap_err();
    eprintln!("aborted: {err}");
    assert!(matches!(err, MigrateError::NoConvergence(_)), "{err}");
    stayed_on_the_source(&p, "stays");
}

/// After a failed migration: `name` runs on the source, its counter going on, and the
/// destination holds nothing of it.
fn stayed_on_the_source(p: &Pair, name: &str) {
    let (_, vm) = p.src.running(name).unwrap();
    assert!(vm.is_running());
    let c = vm.stats().counter;
    wait_for(
        "the counter goes on at the source",
        Duration::from_secs(20),
        || vm.stats().counter > c,
    );
    assert!(p.dst.running(name).is_err());
    assert!(p.dst.incoming().is_empty());
}

#[test]
fn a_memory_mismatch_found_after_the_resume_removes_the_copy_and_the_vm_runs_here_again() {
    let _serial = serial();
    let p = pair("missed", 64, &["counter", "dirty"], 16);
    // The last round's dirty pages never go: what a dirty-tracking miss would do. Only the
    // memory check can see it, and it comes after the destination ran the VM.
    fault::arm(Fault::MissLastDirty);
    let (r, phases) = migrate(&p, "missed", &busy_opts(200.0));
    let err = match r {
        Ok(report) => {
            print(&report);
            panic!("the missed pages went unnoticed: {phases:?}");
        }
        Err(e) => e,
    };
    eprintln!("refused: {err}");
    match &err {
        MigrateError::Verify(why) => {
            assert!(
                why.contains("memory") && why.contains("removed its copy"),
                "{why}"
            )
        }
        other => panic!("not a verification failure: {other}"),
    }
    stayed_on_the_source(&p, "missed");
    assert!(
        p.dst.info("missed").is_err(),
        "the refused copy is not registered on the destination"
    );
    assert!(!p.dst.dir("missed").exists(), "its folder is gone");
}

#[test]
fn verification_hashes_only_the_last_round_in_the_pause() {
    let _serial = serial();
    let p = pair("checked", 64, &["counter"], 0);
    let (r, _) = migrate(&p, "checked", &busy_opts(200.0));
    let report = r.unwrap();
    print(&report);
    let v = report.verification.clone().unwrap();
    assert_eq!(
        v.memory_checked,
        crate::migrate::report::MemoryCheck::AfterResume
    );
    assert!(v.memory_equal && v.vcpus_equal, "{v:?}");
    assert_eq!(v.source_memory, v.dest_memory);
    // The source's full hash came after the resume: the pause holds only the destination's
    // share (the last round's pages and the vCPU digest), so the two downtimes are apart by it.
    assert!(v.source_verify_ms > 0.0, "{v:?}");
    assert_eq!(
        report.verify_at_pause_ms,
        v.dest_verify_ms.min(report.downtime_ms)
    );
    assert!(
        (report.downtime_ms - report.downtime_without_verify_ms - report.verify_at_pause_ms).abs()
            < 1e-6
    );
    runs_on_destination(&p, "checked", &report);
}

/// A round longer than `--timeout` (16 MiB touched at 4 MiB/s: at least 4 s for round 1)
/// under a 1 s timeout.
fn slow_round_opts(postcopy: PostcopyPolicy) -> MigrateOptions {
    MigrateOptions {
        postcopy,
        timeout_s: 1,
        ..busy_opts(4.0)
    }
}

#[test]
fn the_timeout_stops_a_round_in_its_middle_and_the_vm_stays() {
    let _serial = serial();
    let p = pair("slowround", 64, &["counter", "dirty"], 16);
    let t = Instant::now();
    let (r, _) = migrate(&p, "slowround", &slow_round_opts(PostcopyPolicy::Never));
    let took = t.elapsed();
    let err = r.unwrap_err();
    eprintln!("after {took:?}: {err}");
    assert!(matches!(err, MigrateError::Timeout(1)), "{err}");
    // Round 1 alone needs at least 4 s at the cap: the timeout did not wait for its end.
    assert!(took < Duration::from_millis(3500), "{took:?}");
    stayed_on_the_source(&p, "slowround");
}

#[test]
fn the_timeout_in_the_middle_of_a_round_switches_to_postcopy_with_the_rest_missing() {
    let _serial = serial();
    let p = pair("cutround", 64, &["counter", "dirty"], 16);
    let (r, _) = migrate(&p, "cutround", &slow_round_opts(PostcopyPolicy::Auto));
    let report = r.unwrap();
    print(&report);
    assert_eq!(
        report.stop_reason.cause,
        Cause::Timeout,
        "{:?}",
        report.stop_reason
    );
    let round1 = &report.rounds[0];
    assert!(
        round1.pages < 16384,
        "round 1 was cut: {} of 16384 pages",
        round1.pages
    );
    let pc = postcopy_landed(&report);
    // What round 1 did not send is missing at the switch, with what the guest dirtied.
    assert!(
        pc.pages_missing >= 16384 - round1.pages,
        "{} pages missing, {} sent in round 1",
        pc.pages_missing,
        round1.pages
    );
    runs_on_destination(&p, "cutround", &report);
}

#[test]
fn auto_never_switches_for_a_converging_guest() {
    let _serial = serial();
    let p = pair("calm", 64, &["idle", "counter"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Auto,
        verify: true,
        ..Default::default()
    };
    let (r, _) = migrate(&p, "calm", &opts);
    let report = r.unwrap();
    print(&report);
    assert_eq!(report.mode, Mode::PreCopy);
    assert!(report.postcopy.is_none());
    assert_eq!(report.stop_reason.cause, Cause::Converged);
    assert!(report.verification.as_ref().unwrap().memory_equal);
    runs_on_destination(&p, "calm", &report);
}

/// A post-copy migration of `name` with `fault` injected, which loses the connection once:
/// the source reconnects within its window and the migration lands whole (`resumed` says
/// whether a progress note is the one the reconnection must show).
fn lands_after_one_reconnection(
    name: &str,
    fault: Fault,
    bandwidth: f64,
    resumed: fn(&ProgressNote) -> bool,
) {
    let _serial = serial();
    let p = pair(name, 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Always,
        ..busy_opts(bandwidth)
    };
    fault::arm(fault);
    let (r, phases) = migrate(&p, name, &opts);
    let report = r.unwrap();
    print(&report);
    // Counted across both connections: every missing page placed exactly once.
    let pc = postcopy_landed(&report);
    assert_eq!(pc.interruptions, 1, "one cut, one reconnection");
    assert!(
        phases.iter().any(|(_, n)| n.as_ref().is_some_and(resumed)),
        "{phases:?}"
    );
    runs_on_destination(&p, name, &report);
}

#[test]
fn postcopy_link_cut_reconnects_within_the_window_and_loses_no_page() {
    lands_after_one_reconnection("cut", Fault::CutPostcopy, 20.0, |n| {
        matches!(n, ProgressNote::Resumed { .. })
    });
}

#[test]
fn postcopy_link_cut_parks_then_resume_finishes_it() {
    let _serial = serial();
    let p = pair("parked", 64, &["counter", "dirty"], 16);
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Always,
        resume_window_s: 0,
        ..busy_opts(20.0)
    };
    wait_running(&p, "parked");
    let incoming = Incoming::start(p.dst.clone());
    let (def, vm) = p.src.begin_migration("parked").unwrap();
    let dir = p.src.dir("parked");
    let out = source::Outgoing {
        vm: &vm,
        def: &def,
        dir: &dir,
        agent: "src",
        security: &crate::transport::Security::Insecure,
        shared_datastore: None,
    };
    let phases = Mutex::new(Vec::<Step>::new());
    let progress = |ev: super::Progress| record(&phases, ev);
    fault::arm(Fault::CutPostcopy);
    let outcome = source::migrate(
        &out,
        incoming.addr,
        "dst",
        &opts,
        &Cancel::default(),
        &progress,
    )
    .unwrap();
    let Outcome::Parked(parked) = outcome else {
        panic!("expected an interrupted post-copy, got {outcome:?}");
    };
    eprintln!("interrupted: {parked}");
    assert!(parked.missing() > 0, "the cut came before the last page");
    // Both sides keep the VM: paused here with its memory, running there and waiting.
    assert!(!vm.is_running(), "the source keeps the VM paused");
    let (_, there) = p.dst.running("parked").unwrap();
    let mut last = there.stats().dirty_pages_written;
    wait_for(
        "the destination's dirtying vCPU blocks on a missing page",
        Duration::from_secs(20),
        || {
            std::thread::sleep(Duration::from_millis(300));
            let now = there.stats().dirty_pages_written;
            std::mem::replace(&mut last, now) == now
        },
    );
    let Outcome::Committed(report) =
        source::resume(&out, parked, &Cancel::default(), &progress).unwrap()
    else {
        panic!("the resume parked again");
    };
    print(&report);
    let results = incoming.finish();
    assert_eq!(results.len(), 2, "the first connection and the resumed one");
    assert!(results[0].is_err() && results[1].is_ok(), "{results:?}");
    p.src.end_migration("parked", true);
    assert_eq!(postcopy_landed(&report).interruptions, 1);
    runs_on_destination(&p, "parked", &report);
}

/// The destination had every page: the resume finds nothing missing, gets the same
/// `PostcopyDone`, and the digests still compare.
#[test]
fn postcopy_done_lost_then_the_resume_gets_it_again() {
    lands_after_one_reconnection("done", Fault::LosePostcopyDone, 40.0, |n| {
        matches!(n, ProgressNote::Resumed { missing: 0, .. })
    });
}
