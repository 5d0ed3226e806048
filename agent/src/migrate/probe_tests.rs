//! The BPF probes during real in-process migrations: the source's kernel-measured dirty rates
//! next to the dirty log's, and the destination's user faults during post-copy next to the
//! fault handler's own counts. Each test prints `SKIPPED: <test>: <why>` and returns when the
//! probes cannot run here (no root / CAP_BPF, no tracefs, built without clang).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use vmig_ebpf::{Event, EventStream, VmProbes};

use super::report::{Cause, EstimateFrom};
use super::tests::{
    busy_opts, migrate, pair_paced, pair_with, postcopy_landed, print, runs_on_destination, serial,
};
use super::{probe, MigrateOptions, Mode, PostcopyPolicy};
use crate::dirty::DirtyTracking;

/// Why the probes cannot run here (after printing a loud SKIPPED line), or `None`.
fn skip_reason(test: &str) -> Option<String> {
    if !std::path::Path::new("/sys/kernel/tracing/events").is_dir() {
        // The tests' own set-up, as in the ebpf crate's tests: the library never mounts.
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    match vmig_ebpf::available() {
        Ok(()) => None,
        Err(e) => {
            eprintln!("SKIPPED: {test}: kernel-assisted tracing unavailable: {e}");
            Some(e.to_string())
        }
    }
}

/// A guest writing a 16 MiB working set (4,096 pages) flat out, in ring mode, over a slow
/// link: every pre-copy round carries the kernel's distinct pages and push rate, and the
/// kernel's distinct pages agree with the dirty log's count within 10 % (they count the same
/// pages over the same window: the log from harvest to harvest, the probe from the window
/// started at each harvest; the few pages written between the harvest and the window switch
/// land in one round or the next).
#[test]
fn ring_mode_rounds_carry_kernel_rates_that_match_the_dirty_log() {
    const TEST: &str = "ring_mode_rounds_carry_kernel_rates_that_match_the_dirty_log";
    if skip_reason(TEST).is_some() {
        return;
    }
    let _serial = serial();
    let p = pair_with("kring", 64, &["dirty", "counter"], 16, DirtyTracking::Ring);
    let opts = MigrateOptions {
        dirty_tracking: DirtyTracking::Ring,
        // Several rounds to compare: the kernel's rate would end pre-copy after round 1.
        kernel_judge: false,
        ..busy_opts(20.0)
    };
    let (r, _) = migrate(&p, "kring", &opts);
    let report = r.unwrap();
    print(&report);
    assert_eq!(report.dirty_tracking, super::TrackingUsed::Ring);
    assert_eq!(report.kernel_rates_off, None, "the probes ran");
    let json = serde_json::to_value(&report).unwrap();
    let (precopy, last) = report.rounds.split_at(report.rounds.len() - 1);
    assert!(
        precopy.len() >= 2,
        "a few pre-copy rounds over a 20 MiB/s link"
    );
    assert!(
        last[0].kernel.is_none(),
        "stop-and-copy runs without probes"
    );
    // The probes attach beside round 1: it may end before they are on; every later round
    // carries kernel figures.
    assert!(
        precopy.iter().skip(1).all(|r| r.kernel.is_some()),
        "every pre-copy round after the first has kernel figures"
    );
    for (i, r) in precopy.iter().enumerate() {
        let Some(k) = r.kernel else {
            eprintln!("round {}: the probes were still attaching", r.round);
            continue;
        };
        // A window that began during the round (the attach) covers only part of it; round 1's
        // is cut into rate samples, and its distinct count is the largest sample's.
        let whole = k.window_s >= 0.9 * r.secs && k.rate_samples == 0;
        assert_eq!(k.rate_samples > 0, r.round == 1, "only round 1 is sampled");
        let log = r.dirty_pages as f64;
        let kernel = k.distinct_pages as f64;
        eprintln!(
            "round {}: log {} dirty, kernel {} distinct ({:.3} x), {} pushes ({:.0}/s, {:.1} per page), {} ring-full exits",
            r.round,
            r.dirty_pages,
            k.distinct_pages,
            kernel / log,
            k.pushes,
            k.pushes_per_s,
            k.pushes as f64 / kernel.max(1.0),
            k.ring_full_exits
        );
        // The working set, the counter's page, the stack: never more than 4,096 + a few.
        assert!(
            log >= 1.0 && r.dirty_pages <= 4096 + 16,
            "{}",
            r.dirty_pages
        );
        assert!(
            !whole || (0.9..=1.1).contains(&(kernel / log)),
            "round {}: kernel {kernel} vs log {log} distinct pages",
            r.round
        );
        assert!(
            kernel <= log * 1.1,
            "a part of the round counts no more than the round"
        );
        assert!(
            k.pushes >= k.distinct_pages,
            "every distinct page was pushed"
        );
        assert!(
            k.window_s > 0.0 && k.window_s <= r.secs * 1.5 + 0.05,
            "{} s window of a {} s round",
            k.window_s,
            r.secs
        );
        assert!(
            (k.pushes_per_s - k.pushes as f64 / k.window_s).abs() < 1e-6 * k.pushes_per_s.max(1.0)
        );
        let want = Some(if k.distinct_pages > r.dirty_pages {
            EstimateFrom::Kernel
        } else {
            EstimateFrom::Log
        });
        assert_eq!(r.estimate_from, want, "the larger count wins");
        let rate = k.distinct_pages.max(r.dirty_pages) as f64 / r.secs;
        assert!((r.dirty_rate - rate).abs() < 1e-6 * rate);
        // Both figures are in the JSON report.
        let j = &json["rounds"][i];
        assert_eq!(j["dirty_pages"], r.dirty_pages);
        assert_eq!(j["kernel"]["distinct_pages"], k.distinct_pages);
        assert!(j["kernel"]["pushes_per_s"].as_f64().unwrap() > 0.0);
    }
    assert!(report.render().contains("kernel: "));
    runs_on_destination(&p, "kring", &report);
}

/// Round 1 over an 8 MiB/s link takes 2 s for the 16 MiB working set: long enough for the
/// probes to attach and take their rate samples.
fn judged_opts() -> MigrateOptions {
    MigrateOptions {
        dirty_tracking: DirtyTracking::Ring,
        postcopy: PostcopyPolicy::Auto,
        ..busy_opts(8.0)
    }
}

/// A guest rewriting its 16 MiB working set flat out (tens of thousands of pages/s) over an
/// 8 MiB/s link (2,000 pages/s): the kernel's rate at the end of round 1 says pre-copy cannot
/// converge, and post-copy starts after round 1, not after the three rounds the dirty log's
/// judgement needs (`--min-rounds`).
#[test]
fn a_guest_that_outruns_the_link_switches_to_postcopy_after_round_1() {
    const TEST: &str = "a_guest_that_outruns_the_link_switches_to_postcopy_after_round_1";
    if skip_reason(TEST).is_some() {
        return;
    }
    let _serial = serial();
    let p = pair_with("khot", 64, &["dirty", "counter"], 16, DirtyTracking::Ring);
    let (r, _) = migrate(&p, "khot", &judged_opts());
    let report = r.unwrap();
    print(&report);
    assert_eq!(
        report.stop_reason.cause,
        Cause::KernelRate,
        "{:?}",
        report.stop_reason
    );
    // Round 1, then the switch pass.
    assert_eq!(report.rounds.len(), 2);
    let k = report.rounds[0]
        .kernel
        .expect("round 1 carries the kernel's figures");
    assert!(k.rate_samples >= 2, "{k:?}");
    let link_pages = 8.0 * 1048576.0 / 4104.0;
    assert!(
        k.rate_pages_per_s >= 0.8 * link_pages,
        "{} pages/s against {link_pages:.0} pages/s of link",
        k.rate_pages_per_s
    );
    postcopy_landed(&report);
    runs_on_destination(&p, "khot", &report);
}

/// The same link and working set, the guest held to 1,000 pages/s (half of what the link
/// carries): the kernel's rate is measured in round 1 and says go on; pre-copy converges.
#[test]
fn a_guest_the_link_outruns_is_never_switched_by_the_kernels_rate() {
    const TEST: &str = "a_guest_the_link_outruns_is_never_switched_by_the_kernels_rate";
    if skip_reason(TEST).is_some() {
        return;
    }
    let _serial = serial();
    let p = pair_paced(
        "kcalm",
        64,
        &["dirty", "counter"],
        16,
        DirtyTracking::Ring,
        1000,
    );
    // The state alone takes ~50 ms at 8 MiB/s: a limit the tail rounds can reach.
    let opts = MigrateOptions {
        max_downtime_ms: 150.0,
        ..judged_opts()
    };
    let (r, _) = migrate(&p, "kcalm", &opts);
    let report = r.unwrap();
    print(&report);
    assert_eq!(report.mode, Mode::PreCopy);
    assert!(report.postcopy.is_none());
    assert_eq!(
        report.stop_reason.cause,
        Cause::Converged,
        "{:?}",
        report.stop_reason
    );
    let k = report.rounds[0]
        .kernel
        .expect("round 1 carries the kernel's figures");
    assert!(k.rate_samples >= 2, "the rate was measured: {k:?}");
    assert!(
        (500.0..2000.0).contains(&k.rate_pages_per_s),
        "{} pages/s for a guest held to 1,000",
        k.rate_pages_per_s
    );
    assert!(report.verification.as_ref().unwrap().memory_equal);
    runs_on_destination(&p, "kcalm", &report);
}

/// In bitmap mode KVM pushes nothing onto a ring: the migration works, no round carries kernel
/// figures, and the report says once that kernel rates are off, and why.
#[test]
fn bitmap_mode_migrates_and_says_once_why_kernel_rates_are_off() {
    let _serial = serial();
    let p = pair_with(
        "kbitmap",
        64,
        &["idle", "counter"],
        16,
        DirtyTracking::Bitmap,
    );
    let (r, _) = migrate(&p, "kbitmap", &busy_opts(200.0));
    let report = r.unwrap();
    print(&report);
    let why = report.kernel_rates_off.clone().expect("kernel rates off");
    assert!(why.contains("bitmap"), "{why}");
    assert!(report.rounds.iter().all(|r| r.kernel.is_none()));
    assert!(report
        .rounds
        .iter()
        .all(|r| r.estimate_from != Some(EstimateFrom::Kernel)));
    let text = report.render();
    assert_eq!(text.matches("kernel rates").count(), 1, "{text}");
    assert!(text.contains(&format!("kernel rates           off: {why}")));
    runs_on_destination(&p, "kbitmap", &report);
}

/// What the destination's probes saw during post-copy.
struct Traced {
    probes: VmProbes,
    events: EventStream,
    mem_start: u64,
}

/// Post-copy traced end to end: the user-fault probes, attached to the destination VM after its
/// memory is registered with userfaultfd and before its vCPUs run, see the vCPUs' faults on
/// missing pages (`exceptions:page_fault_*`; the guest is emulated here, so KVM's emulator
/// faults on the host address) and pair each with the `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` that
/// mapped it.
///
/// What is compared, in distinct guest pages:
/// - probe faulting pages F (fault events), probe resolved pages R (resolution events, each with
///   its fault-to-ioctl-return latency), and the handler's pages waited for W (`latency_count`:
///   pages whose uffd fault message the handler read and requested from the source, plus
///   `zero_local`) and faulting pages H (`faults - duplicate_faults`);
/// - one fault event and one resolution per page; R within F; |R| >= W and |F| >= H.
///
/// The probe sees more than the handler: a vCPU faulting on a page that the background push
/// places before the handler reads the fault message is woken by that `UFFDIO_COPY`, and the
/// kernel drops its queued message, so the handler never counts it, while the exception and the
/// copy's return still pair it (the handler saw 20 to 55 % of the probe's pages in the runs
/// here). F \ R, faults with no resolution, are write faults on a page that was absent when the
/// CPU faulted but whose `UFFDIO_COPY` returned before the fault's tracepoint ran (the fault
/// then finds the page mapped and sends no uffd message): 1 to 4 % of F in the runs here,
/// where the host kernel itself runs nested and a CPU can be held between the two; at most 10 %.
#[test]
fn postcopy_destination_faults_are_traced_with_their_latency() {
    const TEST: &str = "postcopy_destination_faults_are_traced_with_their_latency";
    if skip_reason(TEST).is_some() {
        return;
    }
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let traced: Arc<Mutex<Option<Traced>>> = Arc::default();
    let handle = rt.handle().clone();
    let slot = traced.clone();
    probe::test_hook::set(move |vm| {
        let _rt = handle.enter();
        let filter = probe::filter_of(vm);
        let mut probes = VmProbes::attach(&filter, true).expect("attach to the destination");
        let events = probes.event_stream().expect("event stream");
        *slot.lock().unwrap() = Some(Traced {
            probes,
            events,
            mem_start: filter.mem_start,
        });
    });
    let p = pair_with(
        "kpost",
        64,
        &["counter", "dirty"],
        16,
        DirtyTracking::Bitmap,
    );
    let opts = MigrateOptions {
        postcopy: PostcopyPolicy::Always,
        ..busy_opts(20.0)
    };
    let (r, _) = migrate(&p, "kpost", &opts);
    let report = r.unwrap();
    let Traced {
        probes,
        mut events,
        mem_start,
    } = traced
        .lock()
        .unwrap()
        .take()
        .expect("the destination hook ran");
    let counters = probes.counters().unwrap();
    let events = {
        let _rt = rt.enter();
        events.drain()
    };
    drop(probes);
    print(&report);
    let pc = report.postcopy.clone().expect("post-copy ran");

    let page = |addr: u64| (addr - mem_start) / 4096;
    let mut faulted = BTreeSet::new();
    let mut resolved: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for e in &events {
        match *e {
            Event::UserFault { addr, .. } => {
                faulted.insert(page(addr));
            }
            Event::UserFaultResolved {
                addr, latency_ns, ..
            } => resolved.entry(page(addr)).or_default().push(latency_ns),
            _ => {}
        }
    }
    let handler_pages = pc.faults - pc.duplicate_faults;
    let mut lat: Vec<u64> = resolved.values().flatten().copied().collect();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    eprintln!(
        "probe: {} fault events on {} distinct pages ({} kernel-mode), {} resolutions on {} pages, \
         latency p50 {} µs p99 {} µs max {} µs, {} events dropped; handler: {} faults, {} duplicates, \
         {} zero local, {} requests, {} waited for (p50 {} µs, p99 {} µs)",
        counters.user_faults,
        faulted.len(),
        counters.kernel_mode_faults,
        counters.user_faults_resolved,
        resolved.len(),
        pct(0.5) / 1000,
        pct(0.99) / 1000,
        lat.last().unwrap() / 1000,
        counters.events_dropped,
        pc.faults,
        pc.duplicate_faults,
        pc.zero_local,
        pc.requests,
        pc.latency_count,
        pc.latency_p50_us,
        pc.latency_p99_us,
    );
    assert_eq!(counters.events_dropped, 0, "every event was read");
    assert!(pc.faults > 0 && !faulted.is_empty(), "the vCPUs faulted");
    // One fault event a page: a second one only when a second vCPU faults on the same page
    // (a handler duplicate) or a write follows a read-mapped zero page.
    assert!(
        counters.user_faults - faulted.len() as u64 <= pc.duplicate_faults + pc.zero_local,
        "{} fault events on {} pages",
        counters.user_faults,
        faulted.len()
    );
    // One resolution a page, with a latency, and only on pages that faulted.
    assert!(
        resolved.values().all(|l| l.len() == 1),
        "one resolution a page"
    );
    assert!(resolved.keys().all(|p| faulted.contains(p)));
    let post_ns = (pc.duration_ms * 1e6) as u64 + 1_000_000_000;
    // A latency of 0 is a fault whose probe ran after the copy that resolved it (it waited
    // for nothing); none may exceed the post-copy's duration (a wrapped difference did).
    assert!(
        lat.iter().all(|&l| l < post_ns),
        "latencies within post-copy: max {:?} ns",
        lat.iter().max()
    );
    assert!(lat.iter().any(|&l| l > 0), "some faults waited");
    // Every page the handler waited for (each sent to the source as a page request, or resolved
    // locally as a zero page) is among the probe's resolved pages; the probe resolves more:
    // pages whose fault the background push answered before the handler read the fault message.
    let waited = pc.latency_count + pc.zero_local;
    assert_eq!(pc.requests, pc.latency_count, "each request answered once");
    assert!(
        resolved.len() as u64 >= waited,
        "probe resolved {} pages, the handler waited for {waited}",
        resolved.len()
    );
    assert!(faulted.len() as u64 >= handler_pages);
    // Faults never resolved: the page was mapped between the exception and its tracepoint.
    let unresolved = faulted.len() - resolved.len();
    assert!(
        unresolved <= faulted.len() / 10 + 2,
        "{unresolved} of {} faulting pages never resolved",
        faulted.len()
    );
    runs_on_destination(&p, "kpost", &report);
}

/// Removes CAP_SYS_ADMIN, CAP_PERFMON and CAP_BPF from the calling thread's effective set
/// (capabilities are per thread; threads it starts inherit the reduced set).
fn drop_bpf_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` (version 3) into `data`, which has room for them.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for cap in [21u32, 38, 39] {
        data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    }
    // SAFETY: capset reads the header and two `Data`; it only changes this thread's credentials.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Without CAP_BPF (nor CAP_PERFMON or CAP_SYS_ADMIN) the kernel refuses to load the programs:
/// the ring-mode migration runs all the same, with the log's counts only, and the report says
/// once why kernel rates are off. Runs on its own thread, whose capabilities are dropped.
#[test]
fn without_cap_bpf_the_migration_runs_and_says_once_why_kernel_rates_are_off() {
    const TEST: &str = "without_cap_bpf_the_migration_runs_and_says_once_why_kernel_rates_are_off";
    if skip_reason(TEST).is_some() {
        return;
    }
    let _serial = serial();
    let p = pair_with("knocap", 64, &["dirty", "counter"], 16, DirtyTracking::Ring);
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            drop_bpf_capabilities().expect("capset");
            let (r, _) = migrate(&p, "knocap", &busy_opts(200.0));
            r.unwrap()
        })
        .join()
        .unwrap()
    });
    print(&report);
    assert_eq!(report.dirty_tracking, super::TrackingUsed::Ring);
    let why = report.kernel_rates_off.clone().expect("kernel rates off");
    assert!(why.starts_with("permission denied"), "{why}");
    assert!(report.rounds.iter().all(|r| r.kernel.is_none()));
    let text = report.render();
    assert_eq!(text.matches("kernel rates").count(), 1, "{text}");
    runs_on_destination(&p, "knocap", &report);
}
