//! `cargo xtask bench probes`: what the migration's BPF probes cost the guest.
//!
//! One VM of this process dirties a 16 MiB working set flat out with dirty logging on (the
//! dirty ring, as during pre-copy, so every guest write fires the probes). The guest's own
//! dirtying rate (pages/s it reports) is measured in windows alternately without and with the
//! probes attached, in ABBA order so that a drift of the machine's speed weighs on both sides
//! alike: first the set a migration attaches (`ProbeSet::DirtyRing`, counters only, as
//! `RoundProbes` does), then every program (what `vmig trace --counters-only` attaches). Prints
//! every window, the ratio of the means, the target (at most 2 % slower) and writes
//! target/bench-probes.json.

use std::time::{Duration, Instant};

use serde_json::json;
use vmig::dirty::DirtyTracking;
use vmig::inventory::{Inventory, VmDef};
use vmig::migrate::probe::filter_of;
use vmig::vm::Vm;
use vmig_ebpf::{ProbeSet, VmProbes};

/// Length of one measuring window.
const WINDOW: Duration = Duration::from_millis(1500);
/// ABBA groups (each: off, on, on, off).
const GROUPS: usize = 5;
/// The target: the guest at most this much slower with the probes attached.
const TARGET_SLOWDOWN: f64 = 0.02;

/// The guest's dirtying rate over about `WINDOW`, pages/s. The guest reports whole passes over
/// its working set (4,096 pages at a time), so the rate is taken between the first and the last
/// report seen in the window (polled every millisecond), not over the window's edges.
fn guest_rate(vm: &Vm) -> f64 {
    let start = Instant::now();
    let mut last = vm.stats().dirty_pages_written;
    let mut first: Option<(Instant, u64)> = None;
    let mut latest = None;
    while start.elapsed() < WINDOW {
        std::thread::sleep(Duration::from_millis(1));
        let n = vm.stats().dirty_pages_written;
        if n != last {
            last = n;
            let now = (Instant::now(), n);
            first.get_or_insert(now);
            latest = Some(now);
        }
    }
    match (first, latest) {
        (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f64 / (t1 - t0).as_secs_f64(),
        _ => 0.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// One ABBA series with the probes of `set`: prints every window and the summary, returns the
/// figures as JSON.
fn series(vm: &Vm, set: ProbeSet, what: &str) -> serde_json::Value {
    println!(
        "\n  probes: {what}; {} windows of {:.1} s, ABBA order (off, on, on, off) x {GROUPS}",
        4 * GROUPS,
        WINDOW.as_secs_f64()
    );
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut pushes = Vec::new();
    let mut attach_ms = Vec::new();
    let mut push_program = None;
    // Per ABBA group: (on1 + on2) / (off1 + off2), which cancels a linear drift of the machine.
    let mut group_ratios = Vec::new();
    let (mut g_off, mut g_on) = (0.0, 0.0);
    for i in 0..4 * GROUPS {
        let with_probes = matches!(i % 4, 1 | 2);
        if with_probes {
            let t = Instant::now();
            let probes =
                VmProbes::attach_set(&filter_of(vm), false, set).expect("attach the probes");
            attach_ms.push(t.elapsed().as_secs_f64() * 1e3);
            push_program.get_or_insert(probes.push_program());
            let c0 = probes.counters().expect("counters").dirty_ring_pushes;
            let t0 = Instant::now();
            let r = guest_rate(vm);
            let c1 = probes.counters().expect("counters").dirty_ring_pushes;
            let p = (c1 - c0) as f64 / t0.elapsed().as_secs_f64();
            drop(probes);
            println!(
                "  window {:>2}  probes on   {r:>10.0} pages/s   (probes counted {p:>9.0} ring pushes/s)",
                i + 1
            );
            on.push(r);
            pushes.push(p);
            g_on += r;
        } else {
            let r = guest_rate(vm);
            println!("  window {:>2}  probes off  {r:>10.0} pages/s", i + 1);
            off.push(r);
            g_off += r;
        }
        if i % 4 == 3 {
            group_ratios.push(g_on / g_off);
            (g_off, g_on) = (0.0, 0.0);
        }
    }
    let ratio = mean(&on) / mean(&off);
    let mut sorted = group_ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        (hi - lo) / mean(v) * 100.0
    };
    println!(
        "  mean off {:.0} pages/s, mean on {:.0} pages/s: on/off = {ratio:.4} ({:+.2} %); \
         per ABBA group {}: median {median:.4}",
        mean(&off),
        mean(&on),
        (ratio - 1.0) * 100.0,
        group_ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!("  dirty-ring push counted by: {push_program:?}");
    println!(
        "  target: at most {:.0} % slower (on/off >= {:.2}): {}; window spread off {:.1} %, on {:.1} % (max - min over mean); attach {:.0} ms (mean)",
        TARGET_SLOWDOWN * 100.0,
        1.0 - TARGET_SLOWDOWN,
        if ratio >= 1.0 - TARGET_SLOWDOWN {
            "met"
        } else {
            "NOT met"
        },
        spread(&off),
        spread(&on),
        mean(&attach_ms)
    );
    json!({
        "guest_pages_per_s_off": off,
        "guest_pages_per_s_on": on,
        "probe_pushes_per_s": pushes,
        "attach_ms": attach_ms,
        "ratio_on_off": ratio,
        "group_ratios": group_ratios,
        "median_group_ratio": median,
        "push_program": format!("{push_program:?}"),
    })
}

fn main() {
    if !std::path::Path::new("/sys/kernel/tracing/events").is_dir() {
        eprintln!("tracefs not mounted: run `cargo xtask setup` (or mount -t tracefs nodev /sys/kernel/tracing)");
    }
    if let Err(e) = vmig_ebpf::available() {
        println!("probe overhead: SKIPPED: kernel-assisted tracing unavailable: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmig-bench-probes-{}", std::process::id()));
    let inv = Inventory::open(&dir, 1 << 30).expect("inventory");
    inv.create(VmDef {
        name: "dirty".into(),
        memory_mib: 64,
        vcpus: 1,
        workload: vec!["dirty".into()],
        dirty_mib: 16,
        dirty_rate: 0,
        dirty_tracking: DirtyTracking::Ring,
        disk_mib: 1,
        disk_rate: 0,
        disk_region_mib: 0,
        generation: 0,
    })
    .expect("create the VM");
    inv.start("dirty").expect("start the VM");
    let (_, vm) = inv.running("dirty").expect("running");
    vm.dirty().start().expect("dirty logging on");
    // Let the guest reach its pace.
    let _ = guest_rate(&vm);

    println!("probe overhead: guest dirtying rate (pages/s the guest reports), 16 MiB working set flat out, dirty ring on");
    let controller = series(
        &vm,
        ProbeSet::DirtyRing,
        "the controller's (dirty-ring programs)",
    );
    let trace = series(
        &vm,
        ProbeSet::All,
        "vmig trace's (all 10 programs, counters only)",
    );
    let _ = vm.dirty().stop();
    drop(vm);
    drop(inv);
    let _ = std::fs::remove_dir_all(&dir);

    let out = vmig_benches::results_path("bench-probes.json");
    let results = json!({
        "controller_set": controller,
        "all_programs": trace,
        "target_slowdown": TARGET_SLOWDOWN,
    });
    if let Err(e) = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json")) {
        eprintln!("cannot write {}: {e}", out.display());
    }
    println!("  results written to {}", out.display());
}
