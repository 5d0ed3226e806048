//! `cargo xtask bench compress`: `--compress zstd` against none on a slow link, on a
//! compressible working set and on an incompressible one.
//!
//! In-process migrations (source and destination inventories in this process, loopback TCP,
//! `--bandwidth 64`, `--verify`) of a 256 MiB VM whose `dirty` vCPU sweeps a 64 MiB working set
//! at 4,000 pages/s beside a `counter` vCPU, compression off and on interleaved (off, on, on,
//! off, off, on) so that a drift of the machine weighs on both alike. Workloads:
//! - `dirty`: each page holds its pass number in its first 8 bytes, zeros after (compresses);
//! - `noise`: the same over pages of random bytes (does not: the frames go raw).
//!
//! Prints every migration, the means and the ratios (on / off) of bytes sent and total time,
//! and writes target/bench-compress.json.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmig::dirty::DirtyTracking;
use vmig::inventory::{Inventory, VmDef};
use vmig::migrate::registry::Registry;
use vmig::migrate::{dest, source, Cancel, Compression, MigrateOptions, Report};
use vmig::transport::IoPath;

const MIB: f64 = 1048576.0;
/// Runs per workload and setting.
const RUNS: usize = 3;
/// The link, MiB/s.
const BANDWIDTH: f64 = 64.0;

/// Starts a VM running `program` in a fresh source inventory, migrates it to a fresh
/// destination inventory with `compress`, and returns the source's report.
fn migrate_once(root: &Path, run: usize, program: &str, compress: Compression) -> Report {
    let dir = root.join(format!("{program}-{run}"));
    let src = Inventory::open(&dir.join("a"), 2 << 30).expect("source inventory");
    let dst = Inventory::open(&dir.join("b"), 2 << 30).expect("destination inventory");
    let dirty_mib = 64;
    src.create(VmDef {
        name: program.into(),
        memory_mib: 256,
        vcpus: 2,
        workload: vec![program.into(), "counter".into()],
        dirty_mib,
        dirty_rate: 4000,
        dirty_tracking: DirtyTracking::Auto,
        disk_mib: 1,
        disk_rate: 0,
        disk_region_mib: 0,
        generation: 0,
    })
    .expect("create");
    src.start(program).expect("start");
    let (_, vm) = src.running(program).expect("running");
    let t = Instant::now();
    // One pass over the working set: round 1 finds it all written.
    while vm.stats().dirty_pages_written < dirty_mib << 8 {
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
    let (def, vm) = src.begin_migration(program).expect("begin");
    let folder = src.dir(program);
    let out = source::Outgoing {
        vm: &vm,
        def: &def,
        dir: &folder,
        agent: "src",
        security: &vmig::transport::Security::Insecure,
        shared_datastore: None,
    };
    let opts = MigrateOptions {
        bandwidth_mibs: Some(BANDWIDTH),
        compress,
        verify: true,
        timeout_s: 300,
        ..Default::default()
    };
    let outcome =
        source::migrate(&out, addr, "dst", &opts, &Cancel::default(), &|_| {}).expect("migration");
    let source::Outcome::Committed(report) = outcome else {
        panic!("a pre-copy migration parked: {outcome:?}");
    };
    receiver.join().expect("receiver").expect("destination");
    let v = report.verification.as_ref().expect("--verify");
    assert!(v.memory_equal && v.vcpus_equal, "digests differ: {v:?}");
    src.end_migration(program, true);
    drop(vm);
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&dir);
    *report
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn main() {
    let root = std::env::temp_dir().join(format!("vmig-bench-compress-{}", std::process::id()));
    println!(
        "compression: in-process migrations of a 256 MiB VM (a 64 MiB working set swept at 4,000 pages/s, a counter) at {BANDWIDTH} MiB/s, --verify"
    );
    let zstd = Compression::Zstd { level: 1 };
    let order = [
        Compression::Off,
        zstd,
        zstd,
        Compression::Off,
        Compression::Off,
        zstd,
    ];
    let mut results = serde_json::Map::new();
    for program in ["dirty", "noise"] {
        println!("\n{program}:");
        // (bytes MiB, total ms, downtime ms) for off, on.
        let mut by = [
            (Vec::new(), Vec::new(), Vec::new()),
            (Vec::new(), Vec::new(), Vec::new()),
        ];
        let mut rows = Vec::new();
        for (run, &c) in order.iter().enumerate().take(2 * RUNS) {
            let r = migrate_once(&root, run, program, c);
            let comp = r.compression.map_or(String::new(), |s| {
                format!(
                    "  pages {:.1} MiB -> {:.1} MiB ({} frames compressed, {} raw, {:.0} ms compressing)",
                    s.raw_bytes as f64 / MIB,
                    s.wire_bytes as f64 / MIB,
                    s.frames_compressed,
                    s.frames_raw,
                    s.secs * 1e3
                )
            });
            let last = r.rounds.last();
            println!(
                "  compress {:<7} bytes sent {:>7.1} MiB  total {:>7.0} ms  downtime {:>7.2} ms (verify {:.1} ms of it; predicted {:.1} ms)  rounds {:>2}{comp}\n      stop: {}",
                c.to_string(),
                r.bytes_sent as f64 / MIB,
                r.total_ms,
                r.downtime_ms,
                r.verify_at_pause_ms,
                last.map_or(0.0, |l| l.predicted_downtime_ms),
                r.rounds.len(),
                r.stop_reason,
            );
            let slot = &mut by[usize::from(c != Compression::Off)];
            slot.0.push(r.bytes_sent as f64 / MIB);
            slot.1.push(r.total_ms);
            slot.2.push(r.downtime_ms);
            rows.push(json!({
                "compress": c.to_string(),
                "bytes_sent": r.bytes_sent,
                "total_ms": r.total_ms,
                "downtime_ms": r.downtime_ms,
                "rounds": r.rounds.len(),
                "compression": r.compression,
            }));
        }
        let (off, on) = (&by[0], &by[1]);
        println!(
            "  mean: bytes sent {:.1} MiB off, {:.1} MiB on (ratio {:.3}); total {:.0} ms off, {:.0} ms on (ratio {:.2}); downtime {:.1} ms off, {:.1} ms on",
            mean(&off.0),
            mean(&on.0),
            mean(&on.0) / mean(&off.0),
            mean(&off.1),
            mean(&on.1),
            mean(&on.1) / mean(&off.1),
            mean(&off.2),
            mean(&on.2),
        );
        results.insert(program.into(), json!(rows));
    }
    let _ = std::fs::remove_dir_all(&root);
    let out = vmig_benches::results_path("bench-compress.json");
    if let Err(e) = std::fs::write(&out, serde_json::to_string_pretty(&results).expect("json")) {
        eprintln!("cannot write {}: {e}", out.display());
    }
    println!("\nresults written to {}", out.display());
}
