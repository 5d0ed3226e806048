//! `cargo xtask bench tls`: what mutual TLS costs, measured against plaintext in the same run.
//!
//! 1. The sender alone: page frames (256 pages each, straight from a buffer standing in for
//!    guest memory) through `FrameWriter` to a reader on the other core, plaintext (io_uring
//!    zero-copy, and writev) against TLS (rustls with its aws-lc-rs provider, TLS 1.3,
//!    AES-128-GCM; the receiver decrypts every frame). Medians of interleaved runs.
//! 2. The 64 MiB dirtying case (1 GiB VM, vCPU0 rewriting 64 MiB flat out, vCPU1 the counter):
//!    downtime and total time over TLS against `--insecure`, verified.
//!
//! There is no kernel TLS on this kernel (`CONFIG_TLS` is off): the encrypted sender copies
//! each page into the TLS records in user space; kTLS would let io_uring send from guest
//! memory again, and cannot be tried here.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmig::transport::IoPath;
use vmig_benches::{assert_verified, frame_sender, median, target_dir, tls_frame_sender, Cluster};

const GIB: u64 = 1 << 30;
const MIB: f64 = 1048576.0;
const RUNS: usize = 3;

fn dirty64(c: &Cluster) -> Value {
    c.create_vm(
        "hostA",
        "dirty1g",
        &[
            "--memory-mib",
            "1024",
            "--vcpus",
            "2",
            "--workload",
            "dirty,counter",
            "--dirty-mib",
            "64",
        ],
    );
    let t = Instant::now();
    loop {
        let v = c.json(&["--host", "hostA", "vm", "show", "dirty1g", "--json"]);
        if v["stats"]["dirty_pages_written"].as_u64().unwrap_or(0) >= 2 * 16384 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest did not start dirtying"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = c.json(&[
        "--host",
        "hostA",
        "migrate",
        "dirty1g",
        "hostB",
        "--json",
        "--verify",
        "--max-downtime",
        "50",
    ]);
    assert_verified("dirty 64 MiB", &r);
    c.remove("hostB", "dirty1g");
    r
}

fn main() {
    let exe = target_dir().join("release/vmig");
    println!("mutual TLS cost (rustls 0.23, aws-lc-rs provider, TLS 1.3 AES-128-GCM; no kernel TLS here: CONFIG_TLS is off)");

    // 1. The sender alone.
    let (mut uring, mut writev, mut tls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        uring.push(frame_sender(GIB, IoPath::Uring));
        writev.push(frame_sender(GIB, IoPath::Plain));
        tls.push(tls_frame_sender(GIB));
    }
    let (u, w, t) = (median(&uring), median(&writev), median(&tls));
    println!("\nsender, 1 GiB of page frames, median of {RUNS} interleaved runs");
    println!("  plain io_uring  {:>7.0} MiB/s", u / MIB);
    println!("  plain writev    {:>7.0} MiB/s", w / MIB);
    println!(
        "  TLS             {:>7.0} MiB/s = {:.2} x plain io_uring, {:.2} x plain writev (target >= 0.70)",
        t / MIB,
        t / u,
        t / w
    );
    let mut results = json!({
        "provider": "rustls 0.23 aws-lc-rs, TLS13_AES_128_GCM_SHA256",
        "ktls": "unavailable (CONFIG_TLS off)",
        "sender_plain_uring_mibs": u / MIB,
        "sender_plain_writev_mibs": w / MIB,
        "sender_tls_mibs": t / MIB,
        "sender_tls_ratio_to_uring": t / u,
        "sender_tls_ratio_to_writev": t / w,
        "runs": { "uring": uring, "writev": writev, "tls": tls },
    });

    // 2. The 64 MiB dirtying case, interleaved.
    if !exe.exists() {
        println!(
            "\nSKIPPED: the 64 MiB dirtying case: {} missing (`cargo xtask bench tls` builds it)",
            exe.display()
        );
    } else {
        let mut by_mode: Vec<(&str, Vec<Value>)> = vec![("plain", vec![]), ("tls", vec![])];
        for _ in 0..2 {
            for (mode, runs) in by_mode.iter_mut() {
                let c = vmig_benches::cluster_with(&exe, &["hostA", "hostB"], *mode == "plain");
                runs.push(dirty64(&c));
            }
        }
        println!("\n1 GiB VM dirtying 64 MiB flat out, --max-downtime 50, verified, 2 runs each");
        for (mode, runs) in &by_mode {
            let f = |k: &str| {
                runs.iter()
                    .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>()
            };
            println!(
                "  {mode:<5} downtime {:?} ms  total {:?} ms  achieved {:?} MiB/s",
                f("downtime_ms")
                    .iter()
                    .map(|x| (x * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                f("total_ms").iter().map(|x| x.round()).collect::<Vec<_>>(),
                f("achieved_mibs")
                    .iter()
                    .map(|x| x.round())
                    .collect::<Vec<_>>(),
            );
            results[format!("dirty64_{mode}")] = json!(runs
                .iter()
                .map(|r| json!({
                    "downtime_ms": r["downtime_ms"],
                    "total_ms": r["total_ms"],
                    "achieved_mibs": r["achieved_mibs"],
                    "rounds": r["rounds"].as_array().map_or(0, |a| a.len()),
                }))
                .collect::<Vec<_>>());
        }
    }
    let out = target_dir().join("bench-tls.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json"));
    println!("\nresults written to {}", out.display());
}
