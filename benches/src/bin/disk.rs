//! `cargo xtask bench disk`: the live disk mirror (`--storage copy`) measured in the same run
//! against a plain copy of the same image, and its memory.
//!
//! 1. Throughput: an idle VM (64 MiB) with a 1 GiB image full of data migrates between two
//!    agents over loopback with mutual TLS; against it, a plain sequential copy of the same
//!    file over loopback TCP (read 1 MiB at a time, written on the other side, `fdatasync`ed),
//!    which is the floor any mirror pays. Interleaved runs, medians. The comparable ratio is the
//!    whole migration's (image bytes over its total time, which includes the destination's
//!    sync) over the plain copy's; the first pass alone is timed at the source until its last
//!    chunk is on the socket, before the destination synced, so it reads high.
//! 2. A guest writing its 1 GiB disk (the `disk` program, flat out) during the migration: total
//!    time, downtime, disk bytes sent over bytes written by the guest meanwhile.
//! 3. Memory: the source agent's peak resident set (`VmHWM`) over a migration of a VM with a
//!    4 GiB image (1 GiB of data) against the same VM with a 16 MiB image, each in a fresh
//!    agent.

use serde_json::{json, Value};
use vmig_benches::{
    fill, median, plain_copy, plain_copy_direct, results_path, target_dir, Cluster,
};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

/// A stopped VM on hostA whose image holds `data_mib` MiB of data, then started.
fn vm_with_image(
    c: &Cluster,
    vm: &str,
    workload: &str,
    disk_mib: u64,
    data_mib: u64,
    extra: &[&str],
) {
    let disk = disk_mib.to_string();
    let mut args = vec![
        "--host",
        "hostA",
        "vm",
        "create",
        vm,
        "--memory-mib",
        "64",
        "--workload",
        workload,
        "--disk-mib",
        &disk,
    ];
    args.extend_from_slice(extra);
    c.ok(&args);
    fill(&c.datastore("hostA").join(vm).join("disk.img"), data_mib);
    c.ok(&["--host", "hostA", "vm", "start", vm]);
}

fn migrate(c: &Cluster, vm: &str) -> Value {
    c.json(&["--host", "hostA", "migrate", vm, "hostB", "--json"])
}

fn hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

fn main() {
    let exe = target_dir().join("release/vmig");
    assert!(
        exe.exists(),
        "{} missing: `cargo xtask bench disk` builds it",
        exe.display()
    );
    let mibs = |b: f64| b / MIB as f64;

    // 1. Throughput against a plain copy, interleaved.
    let (mut mirror, mut whole, mut plain, mut direct) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let c = vmig_benches::cluster(&exe, &["hostA", "hostB"]);
        let vm = format!("img{run}");
        vm_with_image(&c, &vm, "idle", 1024, 1024, &[]);
        let img = c.datastore("hostA").join(&vm).join("disk.img");
        plain.push(plain_copy(&img));
        direct.push(plain_copy_direct(&img));
        let r = migrate(&c, &vm);
        let d = &r["disk"];
        let copied = f(d, &["copied_bytes"]);
        mirror.push(copied / (f(d, &["copy_ms"]) / 1e3));
        whole.push(copied / (f(&r, &["total_ms"]) / 1e3));
    }
    let (m, w, p, dp) = (
        median(&mirror),
        median(&whole),
        median(&plain),
        median(&direct),
    );
    println!("disk mirror of an idle VM's 1 GiB image (all data), mutual TLS, loopback, median of {RUNS} interleaved runs");
    println!(
        "  plain copy (read, TCP, write, fdatasync)  {:>7.0} MiB/s",
        mibs(p)
    );
    println!(
        "  plain copy, direct writes (O_DIRECT)      {:>7.0} MiB/s",
        mibs(dp)
    );
    println!(
        "  mirror first pass (source side, unsynced)  {:>7.0} MiB/s = {:.2} x plain copy",
        mibs(m),
        m / p
    );
    println!(
        "  whole migration (image bytes / total time) {:>7.0} MiB/s = {:.2} x plain copy (target >= 0.8), {:.2} x the direct-write copy",
        mibs(w),
        w / p,
        w / dp
    );

    // 2. The guest writes its disk during the migration: flat out, then at a fixed rate.
    let mut writers = Vec::new();
    for (rate, what) in [
        ("0", "the `disk` program flat out"),
        ("2048", "the `disk` program at 2048 blocks/s, 8 MiB/s"),
    ] {
        let c = vmig_benches::cluster(&exe, &["hostA", "hostB"]);
        vm_with_image(&c, "writer", "disk", 1024, 256, &["--disk-rate", rate]);
        std::thread::sleep(std::time::Duration::from_secs(2));
        let r = migrate(&c, "writer");
        let d = &r["disk"];
        let written = f(d, &["guest_written_bytes"]);
        println!("\na guest writing its 1 GiB disk (256 MiB of data at the start; {what})");
        println!(
            "  total {:.0} ms, downtime {:.1} ms, {:.1} MiB written by the guest during the migration, {} blocks sent again ({} paused)",
            f(&r, &["total_ms"]),
            f(&r, &["downtime_ms"]),
            written / MIB as f64,
            d["resent_blocks"],
            d["blocks_at_pause"]
        );
        println!(
            "  disk bytes sent again / bytes the guest wrote: {:.2} (64 KiB blocks for the guest's 4 KiB writes)",
            f(d, &["resent_bytes"]) / written.max(1.0)
        );
        drop(c);
        writers.push(json!({ "disk_rate": rate, "report": r }));
    }

    // 3. Peak memory of the source agent, with and without a large image.
    let mut peak = Vec::new();
    for (disk_mib, data_mib) in [(16u64, 0u64), (4096, 1024)] {
        let c = vmig_benches::cluster(&exe, &["hostA", "hostB"]);
        vm_with_image(&c, "mem", "counter", disk_mib, data_mib, &[]);
        let r = migrate(&c, "mem");
        assert_eq!(r["vm"], "mem");
        peak.push(hwm_kib(c.pid("hostA")));
    }
    println!("\nsource agent peak RSS (VmHWM) over one migration of a 64 MiB counter VM");
    println!("  16 MiB image                 {:>7} KiB", peak[0]);
    println!(
        "  4 GiB image (1 GiB of data)  {:>7} KiB = {:+} KiB (target: a few MiB)",
        peak[1],
        peak[1] as i64 - peak[0] as i64
    );

    let out = json!({
        "plain_copy_mibs": plain.iter().map(|x| mibs(*x)).collect::<Vec<_>>(),
        "plain_copy_direct_mibs": direct.iter().map(|x| mibs(*x)).collect::<Vec<_>>(),
        "mirror_first_pass_mibs": mirror.iter().map(|x| mibs(*x)).collect::<Vec<_>>(),
        "whole_migration_mibs": whole.iter().map(|x| mibs(*x)).collect::<Vec<_>>(),
        "ratio_first_pass": m / p,
        "ratio_whole": w / p,
        "writers": writers,
        "peak_rss_kib": { "image_16m": peak[0], "image_4g": peak[1] },
    });
    let path = results_path("bench-disk.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nresults: {}", path.display());
}
