//! The BPF probes during real in-process migrations: the source's kernel-measured dirty rates
//! next to the dirty log's. Each test prints `SKIPPED: <test>: <why>` and returns when the
//! probes cannot run here (no root / CAP_BPF, no tracefs, built without clang).

use super::tests::{busy_opts, migrate, pair_with, print, runs_on_destination, serial};
use super::MigrateOptions;
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
        ..busy_opts(20.0)
    };
    let (r, _) = migrate(&p, "kring", &opts);
    let report = r.unwrap();
    print(&report);
    assert_eq!(report.dirty_tracking, "ring");
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
    for (i, r) in precopy.iter().enumerate() {
        let k = r.kernel.expect("every pre-copy round has kernel figures");
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
            (0.9..=1.1).contains(&(kernel / log)),
            "round {}: kernel {kernel} vs log {log} distinct pages",
            r.round
        );
        assert!(
            k.pushes >= k.distinct_pages,
            "every distinct page was pushed"
        );
        assert!((k.pushes_per_s - k.pushes as f64 / r.secs).abs() < 1e-6 * k.pushes_per_s.max(1.0));
        let want = if k.distinct_pages > r.dirty_pages {
            "kernel"
        } else {
            "log"
        };
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
    assert!(report.rounds.iter().all(|r| r.estimate_from != "kernel"));
    let text = report.render();
    assert_eq!(text.matches("kernel rates").count(), 1, "{text}");
    assert!(text.contains(&format!("kernel rates           off: {why}")));
    runs_on_destination(&p, "kbitmap", &report);
}
