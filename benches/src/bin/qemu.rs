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
}

fn vmig_run(c: &Cluster, vm: &str, create: &[&str], dirty_pages: u64, migrate: &[&str]) -> VmigRun {
    c.create("hostA", vm, create);
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
    }
}

fn qemu_run(
    dir: &std::path::Path,
    work: Work,
    caps: &[&str],
    params: Value,
    postcopy: bool,
) -> QemuRun {
    let r = qemu::migrate(dir, work, 1024, caps, params, postcopy)
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
            "vmig": {"total_ms": vt, "downtime_ms": vd, "bytes": vb, "guest_pages_per_s": vr},
            "ratio": {"total": vt / qt, "downtime": vd / qd, "bytes": vb / qb},
        })
    }
}

fn main() {
    let version =
        qemu::ensure_qemu().unwrap_or_else(|e| panic!("QEMU is needed for this bench: {e}"));
    let exe = exe();
    println!("vmig against {version}, both with -accel kvm on this machine");
    println!("(downtime: source STOP to destination RESUME for QEMU; pause to run for vmig)");
    let dir = std::env::temp_dir().join(format!("vmig-bench-qemu-{}", std::process::id()));
    let c = Cluster::start(&exe, &["hostA", "hostB"]);
    // QEMU's defaults cap bandwidth at 128 MiB/s; its best settings here lift the cap and
    // ask for the same downtime limit as vmig's --max-downtime.
    let best = json!({"downtime-limit": 50, "max-bandwidth": 100u64 << 30});
    let mut results = json!({"qemu_version": version});

    let mut idle = Row {
        name: "idle 1 GiB",
        q: vec![],
        v: vec![],
    };
    for i in 0..PAIRS {
        idle.q
            .push(qemu_run(&dir, Work::Idle, &[], best.clone(), false));
        idle.v.push(vmig_run(
            &c,
            &format!("idle{i}"),
            &["--memory-mib", "1024", "--workload", "idle"],
            0,
            &["--max-downtime", "50"],
        ));
    }
    results["idle_1g"] = idle.print();
    // `cargo xtask bench qemu idle`: only this row.
    if std::env::args().nth(1).as_deref() == Some("idle") {
        let out = results_path("bench-qemu-idle.json");
        let _ = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"));
        println!("\nresults: {}", out.display());
        return;
    }

    // 64 MiB flat out: QEMU's guest first; vmig's held to its rate if it would write faster.
    let pages = 16384u32;
    let mut dirty = Row {
        name: "1 GiB, 64 MiB working set rewritten flat out (matched guest rates)",
        q: vec![],
        v: vec![],
    };
    for i in 0..PAIRS {
        let q = qemu_run(&dir, Work::Dirty { pages }, &[], best.clone(), false);
        let rate = (q.guest_pages_per_s as u64).max(1).to_string();
        dirty.q.push(q);
        dirty.v.push(vmig_run(
            &c,
            &format!("dirty{i}"),
            &[
                "--memory-mib",
                "1024",
                "--vcpus",
                "2",
                "--workload",
                "dirty,counter",
                "--dirty-mib",
                "64",
                "--dirty-rate",
                &rate,
            ],
            pages as u64,
            &["--max-downtime", "50"],
        ));
    }
    results["dirty64_1g"] = dirty.print();

    let out = results_path("bench-qemu.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"));
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nresults written to {}", out.display());
}
