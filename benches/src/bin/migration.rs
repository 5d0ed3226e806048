//! `cargo xtask bench`: live-migration figures for 1 GiB VMs, each next to the loopback
//! baseline measured in the same run. Prints a table and writes target/bench-results.json.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmig::transport::IoPath;
use vmig_benches::{frame_sender, loopback_rtt_us, loopback_tcp, Cluster};

const GIB: u64 = 1 << 30;
const MIB: f64 = 1048576.0;

fn exe() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("target"));
    let p = target.join("release/vmig");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask bench` (it builds it)",
        p.display()
    );
    p
}

fn wait_until(c: &Cluster, host: &str, vm: &str, what: &str, f: impl Fn(&Value) -> bool) {
    let t = Instant::now();
    loop {
        let v = c.json(&["--host", host, "vm", "show", vm, "--json"]);
        if f(&v["stats"]) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn migrate(c: &Cluster, vm: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--host", "hostA", "migrate", vm, "hostB", "--json"];
    args.extend_from_slice(extra);
    c.json(&args)
}

fn main() {
    let exe = exe();
    println!("vmig migration benchmarks ({})", exe.display());
    // Baselines, measured now, on this machine.
    let tcp = (0..3).map(|_| loopback_tcp(2 * GIB)).fold(0.0, f64::max);
    let rtt = loopback_rtt_us(2000);
    let uring = (0..3)
        .map(|_| frame_sender(2 * GIB, IoPath::Uring))
        .fold(0.0, f64::max);
    let plain = (0..3)
        .map(|_| frame_sender(2 * GIB, IoPath::Plain))
        .fold(0.0, f64::max);
    println!("\nbaselines");
    println!(
        "  loopback TCP (write_all 1 MiB)        {:>8.0} MiB/s",
        tcp / MIB
    );
    println!("  loopback round trip (median)          {:>8.1} µs", rtt);
    println!(
        "  frame sender io_uring (from memory)   {:>8.0} MiB/s  = {:.2} x loopback",
        uring / MIB,
        uring / tcp
    );
    println!(
        "  frame sender plain writev             {:>8.0} MiB/s  = {:.2} x loopback",
        plain / MIB,
        plain / tcp
    );

    let c = Cluster::start(&exe, &["hostA", "hostB"]);
    let mut results = json!({
        "loopback_tcp_mibs": tcp / MIB,
        "loopback_rtt_us": rtt,
        "sender_uring_mibs": uring / MIB,
        "sender_plain_mibs": plain / MIB,
        "sender_uring_ratio": uring / tcp,
    });

    // 1. Idle 1 GiB.
    c.cli(&[
        "--host",
        "hostA",
        "vm",
        "create",
        "idle1g",
        "--memory-mib",
        "1024",
        "--workload",
        "idle",
        "--start",
    ])
    .expect("create idle");
    std::thread::sleep(Duration::from_millis(300));
    let r = migrate(&c, "idle1g", &[]);
    line("idle 1 GiB", &r, tcp);
    results["idle_1g"] = r;

    // 2. 1 GiB dirtying 64 MiB flat out.
    c.cli(&[
        "--host",
        "hostA",
        "vm",
        "create",
        "dirty1g",
        "--memory-mib",
        "1024",
        "--vcpus",
        "2",
        "--workload",
        "dirty,counter",
        "--dirty-mib",
        "64",
        "--start",
    ])
    .expect("create dirty");
    wait_until(&c, "hostA", "dirty1g", "one pass over 64 MiB", |s| {
        s["dirty_pages_written"].as_u64().unwrap_or(0) >= 2 * 16384
    });
    let r = migrate(&c, "dirty1g", &["--max-downtime", "50"]);
    line("dirty 64 MiB of 1 GiB", &r, tcp);
    results["dirty64_1g"] = r;

    // 3. 1 GiB with 896 MiB of data written once (round 1 measures the sender end to end).
    c.cli(&[
        "--host",
        "hostA",
        "vm",
        "create",
        "full1g",
        "--memory-mib",
        "1024",
        "--workload",
        "fill",
        "--dirty-mib",
        "896",
        "--start",
    ])
    .expect("create fill");
    wait_until(&c, "hostA", "full1g", "896 MiB filled", |s| {
        s["dirty_pages_written"].as_u64().unwrap_or(0) >= 896 * 256
    });
    let r = migrate(&c, "full1g", &[]);
    line("896 MiB of data in 1 GiB", &r, tcp);
    let r1 = &r["rounds"][0];
    let round1 = r1["bytes"].as_f64().unwrap_or(0.0) / r1["secs"].as_f64().unwrap_or(1.0);
    println!(
        "  round 1 end to end (agent to agent)   {:>8.0} MiB/s  = {:.2} x loopback",
        round1 / MIB,
        round1 / tcp
    );
    results["full896_1g"] = r;
    results["round1_ratio"] = json!(round1 / tcp);

    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"));
    println!("\nresults written to {}", out.display());
}

fn line(name: &str, r: &Value, tcp: f64) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let bytes = f("bytes_sent");
    let touched = f("memory_touched_bytes").max(1.0);
    println!("\n{name}");
    println!(
        "  total time {:>9.1} ms   downtime {:>7.2} ms   rounds {}",
        f("total_ms"),
        f("downtime_ms"),
        r["rounds"].as_array().map_or(0, |a| a.len())
    );
    println!(
        "  bytes sent {:>9.1} MiB  memory touched {:.1} MiB  bytes/touched {:.2}",
        bytes / MIB,
        touched / MIB,
        bytes / touched
    );
    println!(
        "  achieved {:>9.0} MiB/s = {:.2} x loopback   zero pages {}",
        f("achieved_mibs"),
        f("achieved_mibs") * MIB / tcp,
        r["zero_pages"]
    );
    println!("  stop: {}", r["stop_reason"].as_str().unwrap_or(""));
}
