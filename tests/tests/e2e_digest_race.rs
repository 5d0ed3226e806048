//! `vm digest` pauses and resumes a VM: it must not resume a VM a migration has paused.

use std::time::{Duration, Instant};

use vmig_tests::{counter_of, AgentOpts, Cluster};

/// During stop-and-copy the source VM is paused; a `vm digest` then must neither resume it
/// (its guest would write pages after the final dirty pass) nor break the migration.
#[test]
fn e2e_digest_during_stop_and_copy_keeps_the_source_paused() {
    let c = Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())]);
    c.create_vm(
        "hostA",
        "vm1",
        &[
            "--memory-mib",
            "128",
            "--vcpus",
            "2",
            "--workload",
            "dirty,counter",
            "--dirty-mib",
            "8",
        ],
    );
    c.assert_counting("hostA", "vm1", 0);
    // One pre-copy round, then a stop-and-copy pass of the whole working set at 4 MiB/s:
    // the VM stays paused for about two seconds.
    let bg = c.spawn_migrate(
        "hostA",
        "vm1",
        "hostB",
        &[
            "--bandwidth",
            "4",
            "--max-rounds",
            "1",
            "--max-downtime",
            "1",
        ],
    );
    c.wait_migrating("hostA", "vm1", Duration::from_secs(10));
    // The pause: every vCPU shows "paused" (twice in a row, 100 ms apart).
    let paused = |s: &serde_json::Value| {
        s["stats"]["vcpus"]
            .as_array()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|x| x == "paused"))
    };
    let t = Instant::now();
    let mut seen = 0;
    let paused_at = loop {
        assert!(t.elapsed() < Duration::from_secs(30), "never saw the pause");
        let Some(s) = c.show("hostA", "vm1") else {
            panic!("vm1 left hostA before its pause was seen\n{}", c.logs())
        };
        seen = if paused(&s) { seen + 1 } else { 0 };
        if seen == 2 {
            break counter_of(&s).0;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let d = c.cli(&["--host", "hostA", "vm", "digest", "vm1"]);
    eprintln!("digest during stop-and-copy: {d}");
    std::thread::sleep(Duration::from_millis(300));
    if let Some(s) = c.show("hostA", "vm1") {
        assert!(
            paused(&s) && counter_of(&s).0 == paused_at,
            "the source VM ran again during stop-and-copy after `vm digest` \
             (counter {paused_at} at the pause): {s:#}"
        );
    }
    let o = bg.wait(Duration::from_secs(60));
    eprintln!("{o}");
    assert!(o.success(), "the migration failed: {o}\n{}", c.logs());
    let r: serde_json::Value = serde_json::from_str(&o.stdout).expect("report");
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}
