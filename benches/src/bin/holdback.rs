//! `cargo xtask bench holdback`: does holding hot pages back until stop-and-copy cut the bytes
//! a migration sends, and what does it do to the downtime?
//!
//! In-process migrations (source and destination inventories in this process, loopback TCP, a
//! 40 MiB/s cap) of the same workloads with holdback off and on (`holdback_rounds` 2: a page dirty
//! in two consecutive rounds is held), interleaved off, on, on, off, off, on so that a drift of the
//! machine's speed weighs on both sides alike. Workloads:
//! - `hot`: 16 MiB rewritten flat out (the guest outruns the link; pre-copy is forced to stop);
//! - `sweep`: 64 MiB swept at 5,000 pages/s (the link keeps up; pre-copy converges).
//!
//! Prints every migration and the means, and writes target/bench-holdback.json.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmig::dirty::DirtyTracking;
use vmig::inventory::{Inventory, VmDef};
use vmig::migrate::registry::Registry;
use vmig::migrate::{dest, source, Cancel, MigrateOptions, Report};
use vmig::transport::IoPath;

const MIB: f64 = 1048576.0;
/// Runs per workload and setting.
const RUNS: usize = 3;

struct Workload {
    name: &'static str,
    dirty_mib: u64,
    dirty_rate: u64,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "hot",
        dirty_mib: 16,
        dirty_rate: 0,
    },
    Workload {
        name: "sweep",
        dirty_mib: 64,
        dirty_rate: 5000,
    },
];

/// Starts the workload's VM in a fresh source inventory, migrates it to a fresh destination
/// inventory with `holdback_rounds`, and returns the source's report.
fn migrate_once(root: &Path, run: usize, w: &Workload, holdback_rounds: u32) -> Report {
    let dir = root.join(format!("{}-{run}-{holdback_rounds}", w.name));
    let src = Inventory::open(&dir.join("a"), 2 << 30).expect("source inventory");
    let dst = Inventory::open(&dir.join("b"), 2 << 30).expect("destination inventory");
    src.create(VmDef {
        name: w.name.into(),
        memory_mib: 128,
        vcpus: 2,
        workload: vec!["dirty".into(), "counter".into()],
        dirty_mib: w.dirty_mib,
        dirty_rate: w.dirty_rate,
        dirty_tracking: DirtyTracking::Ring,
        disk_mib: 1,
        disk_rate: 0,
        disk_region_mib: 0,
        generation: 0,
    })
    .expect("create");
    src.start(w.name).expect("start");
    let (_, vm) = src.running(w.name).expect("running");
    let t = Instant::now();
    while vm.stats().dirty_pages_written < 2 * (w.dirty_mib << 8) {
        assert!(t.elapsed() < Duration::from_secs(120), "the guest is stuck");
        std::thread::sleep(Duration::from_millis(20));
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dst2: Arc<Inventory> = dst.clone();
    let receiver = std::thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        let registry = Registry::default();
        let to = dest::Destination {
            inv: &dst2,
            registry: &registry,
            agent: "dst",
            io: IoPath::Auto,
        };
        dest::receive(vmig::transport::Channel::plain(sock), &to)
    });
    let (def, vm) = src.begin_migration(w.name).expect("begin");
    let folder = src.dir(w.name);
    let out = source::Outgoing {
        vm: &vm,
        def: &def,
        dir: &folder,
        agent: "src",
        security: &vmig::transport::Security::Insecure,
        shared_datastore: None,
    };
    let opts = MigrateOptions {
        bandwidth_mibs: Some(40.0),
        holdback_rounds,
        timeout_s: 120,
        ..Default::default()
    };
    let outcome =
        source::migrate(&out, addr, "dst", &opts, &Cancel::default(), &|_| {}).expect("migration");
    let source::Outcome::Committed(report) = outcome else {
        panic!("a pre-copy migration parked: {outcome:?}");
    };
    receiver.join().expect("receiver").expect("destination");
    src.end_migration(w.name, true);
    drop(vm);
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&dir);
    *report
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn main() {
    let root = std::env::temp_dir().join(format!("vmig-bench-holdback-{}", std::process::id()));
    println!("hot-page holdback: in-process migrations of a 128 MiB VM (dirty + counter vCPUs) at 40 MiB/s, ring mode");
    // off, on, on, off, off, on
    let order = [0u32, 2, 2, 0, 0, 2];
    let mut results = serde_json::Map::new();
    for w in &WORKLOADS {
        println!(
            "\n{}: {} MiB working set, {}",
            w.name,
            w.dirty_mib,
            if w.dirty_rate == 0 {
                "flat out".to_string()
            } else {
                format!("{} pages/s", w.dirty_rate)
            }
        );
        let mut by = [
            (Vec::new(), Vec::new(), Vec::new()),
            (Vec::new(), Vec::new(), Vec::new()),
        ];
        let mut rows = Vec::new();
        for (run, &h) in order.iter().enumerate().take(2 * RUNS) {
            let r = migrate_once(&root, run, w, h);
            let rounds: Vec<String> = r
                .rounds
                .iter()
                .map(|x| {
                    if x.held_pages > 0 {
                        format!("{}({} held)", x.pages, x.held_pages)
                    } else {
                        x.pages.to_string()
                    }
                })
                .collect();
            println!(
                "  holdback {:<3}  bytes sent {:>7.1} MiB  downtime {:>8.2} ms  total {:>7.0} ms  pages per round [{}]  stop: {}",
                if h == 0 { "off" } else { "on" },
                r.bytes_sent as f64 / MIB,
                r.downtime_ms,
                r.total_ms,
                rounds.join(", "),
                r.stop_reason
            );
            let slot = &mut by[usize::from(h > 0)];
            slot.0.push(r.bytes_sent as f64 / MIB);
            slot.1.push(r.downtime_ms);
            slot.2.push(r.total_ms);
            rows.push(json!({
                "holdback_rounds": h,
                "bytes_sent": r.bytes_sent,
                "downtime_ms": r.downtime_ms,
                "total_ms": r.total_ms,
                "rounds": r.rounds.len(),
                "stop_reason": r.stop_reason,
            }));
        }
        let (off, on) = (&by[0], &by[1]);
        println!(
            "  mean: bytes sent {:.1} MiB off, {:.1} MiB on ({:+.1} %); downtime {:.1} ms off, {:.1} ms on; total {:.0} ms off, {:.0} ms on",
            mean(&off.0),
            mean(&on.0),
            (mean(&on.0) / mean(&off.0) - 1.0) * 100.0,
            mean(&off.1),
            mean(&on.1),
            mean(&off.2),
            mean(&on.2)
        );
        results.insert(w.name.into(), json!(rows));
    }
    let _ = std::fs::remove_dir_all(&root);
    let out = vmig_benches::results_path("bench-holdback.json");
    if let Err(e) = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json")) {
        eprintln!("cannot write {}: {e}", out.display());
    }
    println!("\nresults written to {}", out.display());
}
