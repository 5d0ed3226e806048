//! `cargo xtask bench qemu`: vmig against QEMU on this machine, side by side in one run.
//!
//! Each case runs as interleaved pairs (QEMU, then vmig, three times) and prints the medians
//! and the ratio vmig / QEMU (below 1: vmig is faster or smaller). Both guests' own dirty
//! rates are measured and printed; the vmig guest is held to the QEMU guest's rate when it
//! would write faster, so the two migrate the same load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmig_benches::qemu::{self, QemuRun, Work};
use vmig_benches::{assert_verified, median, results_path, Cluster};

const PAIRS: usize = 3;

fn exe() -> PathBuf {
    let p = vmig_benches::target_dir().join("release/vmig");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask bench qemu` (it builds it)",
        p.display()
    );
    p
}

/// vmig's figures of one migration.
struct VmigRun {
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
    guest_pages_per_s: f64,
    /// vmig's whole report.
    report: Value,
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn vmig_run(c: &Cluster, vm: &str, create: &[&str], dirty_pages: u64, migrate: &[&str]) -> VmigRun {
    c.create_vm("hostA", vm, create);
    let written = |c: &Cluster| {
        c.json(&["--host", "hostA", "vm", "show", vm, "--json"])["stats"]["dirty_pages_written"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut rate = 0.0;
    if dirty_pages > 0 {
        let t = Instant::now();
        while written(c) < 2 * dirty_pages {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{vm}: the guest did not write"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (w0, t0) = (written(c), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        rate = (written(c) - w0) as f64 / t0.elapsed().as_secs_f64();
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut args = vec![
        "--host", "hostA", "migrate", vm, "hostB", "--json", "--verify",
    ];
    args.extend_from_slice(migrate);
    let r = c.json(&args);
    assert_verified(vm, &r);
    c.remove("hostB", vm);
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    VmigRun {
        total_ms: f("total_ms"),
        downtime_ms: f("downtime_ms"),
        bytes: f("bytes_sent"),
        guest_pages_per_s: rate,
        report: r,
    }
}

fn qemu_run(
    dir: &std::path::Path,
    work: Work,
    mem_mib: u64,
    caps: &[&str],
    params: Value,
    postcopy: bool,
) -> QemuRun {
    let r = qemu::migrate(dir, work, mem_mib, caps, params, postcopy)
        .unwrap_or_else(|e| panic!("QEMU migration failed: {e}"));
    assert!(
        r.continued,
        "the QEMU guest did not go on on the destination: {}",
        r.info
    );
    r
}

struct Row {
    name: &'static str,
    q: Vec<QemuRun>,
    v: Vec<VmigRun>,
}

impl Row {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            q: vec![],
            v: vec![],
        }
    }

    fn print(&self) -> Value {
        let qm = |f: fn(&QemuRun) -> f64| median(&self.q.iter().map(f).collect::<Vec<_>>());
        let vm = |f: fn(&VmigRun) -> f64| median(&self.v.iter().map(f).collect::<Vec<_>>());
        let (qt, vt) = (qm(|r| r.total_ms), vm(|r| r.total_ms));
        let (qd, vd) = (qm(|r| r.downtime_ms), vm(|r| r.downtime_ms));
        let (qb, vb) = (qm(|r| r.bytes as f64), vm(|r| r.bytes));
        let (qr, vr) = (qm(|r| r.guest_pages_per_s), vm(|r| r.guest_pages_per_s));
        println!("\n{}", self.name);
        println!(
            "  {:<22} {:>10} {:>10} {:>8}",
            "median of 3 pairs", "QEMU", "vmig", "vmig/QEMU"
        );
        println!(
            "  {:<22} {:>10.1} {:>10.1} {:>8.2}",
            "total time, ms",
            qt,
            vt,
            vt / qt
        );
        println!(
            "  {:<22} {:>10.2} {:>10.2} {:>8.2}",
            "downtime, ms",
            qd,
            vd,
            vd / qd
        );
        println!(
            "  {:<22} {:>10.1} {:>10.1} {:>8.2}",
            "bytes sent, MiB",
            qb / 1048576.0,
            vb / 1048576.0,
            vb / qb
        );
        if qr > 0.0 {
            println!(
                "  {:<22} {:>10.0} {:>10.0} {:>8.2}",
                "guest pages/s",
                qr,
                vr,
                vr / qr
            );
        }
        json!({
            "qemu": {"total_ms": qt, "downtime_ms": qd, "bytes": qb, "guest_pages_per_s": qr,
                     "qemu_own_downtime_ms": median(&self.q.iter().map(|r| r.qemu_downtime_ms).collect::<Vec<_>>())},
            "vmig": {"total_ms": vt, "downtime_ms": vd, "bytes": vb, "guest_pages_per_s": vr,
                     "reports": self.v.iter().map(|r| r.report.clone()).collect::<Vec<_>>()},
            "ratio": {"total": vt / qt, "downtime": vd / qd, "bytes": vb / qb},
        })
    }
}

/// The rows `cargo xtask bench qemu [ROW]` runs: all, or the one named.
const ROWS: [&str; 4] = ["idle", "dirty", "postcopy", "throttle"];

fn main() {
    let only = std::env::args().nth(1);
    if let Some(o) = only.as_deref().filter(|o| !ROWS.contains(o)) {
        eprintln!("unknown row {o:?}: one of {ROWS:?}, or none for all");
        std::process::exit(2);
    }
    let run = |row: &str| only.as_deref().is_none_or(|o| o == row);
    let version =
        qemu::ensure_qemu().unwrap_or_else(|e| panic!("QEMU is needed for this bench: {e}"));
    let exe = exe();
    println!("vmig against {version}, both with -accel kvm on this machine");
    println!("(downtime: source STOP to destination RESUME for QEMU; pause to run for vmig)");
    let dir = std::env::temp_dir().join(format!("vmig-bench-qemu-{}", std::process::id()));
    let c = vmig_benches::cluster(&exe, &["hostA", "hostB"]);
    // QEMU's defaults cap bandwidth at 128 MiB/s; its best settings here lift the cap and
    // ask for the same downtime limit as vmig's --max-downtime.
    let best = json!({"downtime-limit": 50, "max-bandwidth": 100u64 << 30});
    let mut results = json!({"qemu_version": version});

    if run("idle") {
        let mut idle = Row::new("idle 1 GiB");
        for i in 0..PAIRS {
            idle.q
                .push(qemu_run(&dir, Work::Idle, 1024, &[], best.clone(), false));
            idle.v.push(vmig_run(
                &c,
                &format!("idle{i}"),
                &["--memory-mib", "1024", "--workload", "idle"],
                0,
                &["--max-downtime", "50"],
            ));
        }
        results["idle_1g"] = idle.print();
    }

    // 64 MiB flat out: QEMU's guest first; vmig's held to its rate if it would write faster.
    if run("dirty") {
        let q = QemuSide {
            mem_mib: 1024,
            caps: &[],
            params: best.clone(),
            postcopy_after_first_pass: false,
        };
        results["dirty64_1g"] = matched_row(
            &c,
            &dir,
            "1 GiB, 64 MiB working set rewritten flat out (matched guest rates)",
            16384,
            &q,
            "dirty",
            &["--max-downtime", "50"],
        );
    }

    // A guest that cannot converge: 128 MiB, a 32 MiB working set rewritten flat out, a
    // 64 MiB/s link. QEMU's best: post-copy started as soon as its first pass is done (what
    // a management layer does when it knows the guest will not converge); vmig decides by
    // itself, `--postcopy auto`.
    // The cap is the link's: QEMU's post-copy phase has a cap of its own, unlimited by default.
    let capped = json!({"downtime-limit": 50, "max-bandwidth": 64u64 << 20,
                        "max-postcopy-bandwidth": 64u64 << 20});
    let pages = 8192u32;
    if run("postcopy") {
        let q = QemuSide {
            mem_mib: 128,
            caps: &["postcopy-ram"],
            params: capped.clone(),
            postcopy_after_first_pass: true,
        };
        results["postcopy_128m"] = matched_row(
            &c,
            &dir,
            "128 MiB, 32 MiB working set flat out, 64 MiB/s link: post-copy (QEMU after its first pass, vmig --postcopy auto)",
            pages,
            &q,
            "hot",
            &["--max-downtime", "50", "--bandwidth", "64", "--postcopy", "auto"],
        );
    }
    // The same guest with auto-converge (QEMU) against vmig's throttle.
    if run("throttle") {
        let q = QemuSide {
            mem_mib: 128,
            caps: &["auto-converge"],
            params: capped.clone(),
            postcopy_after_first_pass: false,
        };
        results["throttle_128m"] = matched_row(
            &c,
            &dir,
            "the same guest, auto-converge (QEMU) vs --on-no-converge throttle (vmig)",
            pages,
            &q,
            "slow",
            &[
                "--max-downtime",
                "50",
                "--bandwidth",
                "64",
                "--on-no-converge",
                "throttle",
            ],
        );
    }

    let name = match only.as_deref() {
        None => "bench-qemu.json".to_string(),
        Some(o) => format!("bench-qemu-{o}.json"),
    };
    let out = results_path(&name);
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"));
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nresults written to {}", out.display());
}

/// QEMU's side of a row: memory, capabilities, parameters, and whether the bench starts
/// post-copy after the first pass.
struct QemuSide {
    mem_mib: u64,
    caps: &'static [&'static str],
    params: Value,
    postcopy_after_first_pass: bool,
}

/// A row of [`PAIRS`] interleaved pairs over a `dirty` guest of `pages` pages: QEMU first
/// (`q`), then vmig with the same memory, its guest held to the QEMU guest's rate, migrated
/// with `migrate`; VMs named `prefix0`, `prefix1`, ... Returns the printed medians.
fn matched_row(
    c: &Cluster,
    dir: &std::path::Path,
    name: &'static str,
    pages: u32,
    q: &QemuSide,
    prefix: &str,
    migrate: &[&str],
) -> Value {
    let mut row = Row::new(name);
    for i in 0..PAIRS {
        let qr = qemu_run(
            dir,
            Work::Dirty { pages },
            q.mem_mib,
            q.caps,
            q.params.clone(),
            q.postcopy_after_first_pass,
        );
        row.v.push(vmig_run(
            c,
            &format!("{prefix}{i}"),
            &strs(&dirty_guest(q.mem_mib, pages, &qr)),
            pages as u64,
            migrate,
        ));
        row.q.push(qr);
    }
    row.print()
}

/// `vmig vm create` arguments of a guest doing what QEMU's `q` did: `mem_mib` of memory, a
/// `dirty` vCPU over `pages` pages held to the QEMU guest's rate, and a counter.
fn dirty_guest(mem_mib: u64, pages: u32, q: &QemuRun) -> Vec<String> {
    let rate = (q.guest_pages_per_s as u64).max(1);
    let ws_mib = pages as u64 * 4096 / 1048576;
    [
        "--memory-mib",
        &mem_mib.to_string(),
        "--vcpus",
        "2",
        "--workload",
        "dirty,counter",
        "--dirty-mib",
        &ws_mib.to_string(),
        "--dirty-rate",
        &rate.to_string(),
    ]
    .map(String::from)
    .to_vec()
}
