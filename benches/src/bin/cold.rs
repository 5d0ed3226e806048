//! `cargo xtask bench cold`: cold migration (`migrate --offline`) of a stopped VM with a 1 GiB
//! disk full of data between two agents over loopback with mutual TLS, against a plain copy of
//! the same image over loopback TCP (read 1 MiB at a time, written on the other side,
//! `fdatasync`ed), and against the same copy written with `O_DIRECT` (as vmig's receiver
//! writes), in the same run: interleaved runs, medians. The cold migration's rate is the
//! bytes it sent over its whole time (offer, every file, the destination's syncs and
//! registration, the source's delete).

use serde_json::{json, Value};
use vmig_benches::{fill, median, plain_copy, plain_copy_direct, results_path, target_dir};

const MIB: f64 = 1048576.0;
const RUNS: usize = 3;

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn main() {
    let exe = target_dir().join("release/vmig");
    assert!(
        exe.exists(),
        "{} missing: `cargo xtask bench cold` builds it",
        exe.display()
    );
    let (mut cold, mut plain, mut direct, mut reports) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let c = vmig_benches::cluster(&exe, &["hostA", "hostB"]);
        let vm = format!("cold{run}");
        c.ok(&[
            "--host",
            "hostA",
            "vm",
            "create",
            &vm,
            "--memory-mib",
            "64",
            "--workload",
            "idle",
            "--disk-mib",
            "1024",
        ]);
        let img = c.datastore("hostA").join(&vm).join("disk.img");
        fill(&img, 1024);
        plain.push(plain_copy(&img));
        direct.push(plain_copy_direct(&img));
        let r = c.json(&[
            "--host",
            "hostA",
            "migrate",
            &vm,
            "hostB",
            "--offline",
            "--json",
        ]);
        assert_eq!(r["all_equal"], true, "digests: {r:#}");
        cold.push(f(&r, "sent_bytes") / (f(&r, "total_ms") / 1e3));
        reports.push(r);
    }
    let (c, p, d) = (median(&cold), median(&plain), median(&direct));
    println!("cold migration of a stopped VM with a 1 GiB disk (all data), mutual TLS, loopback, median of {RUNS} interleaved runs");
    println!(
        "  plain copy (read, TCP, write, fdatasync)   {:>6.0} MiB/s",
        p / MIB
    );
    println!(
        "  plain copy, direct writes (O_DIRECT)       {:>6.0} MiB/s",
        d / MIB
    );
    println!(
        "  cold migration (bytes sent / total time)   {:>6.0} MiB/s = {:.2} x plain copy (target >= 0.8), {:.2} x the direct-write copy",
        c / MIB,
        c / p,
        c / d
    );
    let out = json!({
        "plain_copy_mibs": plain.iter().map(|x| x / MIB).collect::<Vec<_>>(),
        "plain_copy_direct_mibs": direct.iter().map(|x| x / MIB).collect::<Vec<_>>(),
        "ratio_direct": c / d,
        "cold_mibs": cold.iter().map(|x| x / MIB).collect::<Vec<_>>(),
        "ratio": c / p,
        "reports": reports,
    });
    let path = results_path("bench-cold.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nresults: {}", path.display());
}
