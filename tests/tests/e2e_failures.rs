//! Failed migrations: whatever goes wrong before commitment, the VM keeps running on the
//! source with its memory intact, and the destination keeps nothing (not registered, no VM
//! folder, no staging folder).
//!
//! "Memory intact": an idle guest (`--workload idle --vcpus 1`) does not write its memory
//! once booted (`e2e_idle_guest_memory_is_stable` checks that), so `vm digest` before and
//! after a failed migration must be equal.

use std::time::Duration;

use vmig_tests::{AgentOpts, Cluster};

fn two_hosts() -> Cluster {
    Cluster::new(&[("hostA", AgentOpts::new()), ("hostB", AgentOpts::new())])
}

/// Two agents; hostA's outgoing migrations inject `fault`.
fn injecting(fault: &str) -> Cluster {
    Cluster::new(&[
        ("hostA", AgentOpts::injecting(fault)),
        ("hostB", AgentOpts::new()),
    ])
}

const IDLE: &[&str] = &["--memory-mib", "512", "--vcpus", "1", "--workload", "idle"];
const COUNTING: &[&str] = &[
    "--memory-mib",
    "512",
    "--vcpus",
    "2",
    "--workload",
    "idle,counter",
];
const BUSY: &[&str] = &[
    "--memory-mib",
    "512",
    "--vcpus",
    "2",
    "--workload",
    "dirty,counter",
    "--dirty-mib",
    "64",
];

/// Waits until the destination reserved the VM (its staging folder exists).
fn wait_staged(c: &Cluster, staged: &std::path::Path) {
    let ok = vmig_tests::wait_for(Duration::from_secs(10), || staged.exists().then_some(()));
    assert!(
        ok.is_some(),
        "the destination never staged {}\n{}",
        staged.display(),
        c.logs()
    );
}

/// The migration of `vm` from hostA is still in progress.
fn bg_running(c: &Cluster, vm: &str) -> bool {
    c.show("hostA", vm)
        .is_some_and(|s| s["state"] == "migrating")
}

/// An idle VM once booted does not change its memory: the base of the other tests' proof.
#[test]
fn e2e_idle_guest_memory_is_stable() {
    let c = Cluster::new(&[("hostA", AgentOpts::new())]);
    c.create_vm("hostA", "vm1", IDLE);
    std::thread::sleep(Duration::from_millis(500));
    let (d1, _) = c.digest("hostA", "vm1");
    std::thread::sleep(Duration::from_secs(1));
    let (d2, _) = c.digest("hostA", "vm1");
    assert!(!d1.is_empty());
    assert_eq!(d1, d2, "the idle guest wrote its memory");
}

/// A destination that cannot hold the VM refuses the reservation before any page moves.
#[test]
fn e2e_destination_refuses_reservation_without_memory() {
    let c = Cluster::new(&[
        ("hostA", AgentOpts::new()),
        ("hostB", AgentOpts::memory_mib(256)),
    ]);
    c.create_vm("hostA", "vm1", COUNTING);
    c.assert_counting("hostA", "vm1", 0);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &[]);
    eprintln!("{o}");
    assert!(!o.success(), "{o}");
    assert!(o.text().contains("not enough memory"), "{o}");
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
    // And the VM can still migrate elsewhere afterwards: the source released its lock.
    assert!(c.show("hostA", "vm1").is_some());
}

/// The destination agent dies in the middle of pre-copy: the source notices, resumes the
/// VM, and a restarted destination drops what it had staged.
#[test]
fn e2e_destination_killed_during_precopy_keeps_source_running() {
    let mut c = two_hosts();
    c.create_vm("hostA", "vm1", BUSY);
    c.assert_counting("hostA", "vm1", 0);
    let bg = c.spawn_migrate("hostA", "vm1", "hostB", &["--bandwidth", "20"]);
    c.wait_migrating("hostA", "vm1", Duration::from_secs(10));
    let staged = c.datastore("hostB").join(".incoming").join("vm1");
    wait_staged(&c, &staged);
    std::thread::sleep(Duration::from_millis(500));
    assert!(bg_running(&c, "vm1"), "pre-copy ended before the kill");
    c.kill("hostB");
    assert!(staged.exists(), "a killed agent cannot clean up");
    let o = bg.wait(Duration::from_secs(60));
    eprintln!("{o}");
    assert!(
        o.status.is_some() && !o.success(),
        "the migration must fail: {o}\n{}",
        c.logs()
    );
    assert!(o.text().contains("failed"), "{o}");
    c.assert_stayed("vm1", "hostA", None, true);
    let (d, _) = c.digest("hostA", "vm1");
    assert!(!d.is_empty());
    // What the dead agent staged is dropped when it starts again.
    c.restart("hostB");
    assert!(!staged.exists(), "{} survived a restart", staged.display());
    c.assert_clean("vm1", "hostB");
    // The VM can still migrate after all that.
    let r = c.migrate(
        "hostA",
        "vm1",
        "hostB",
        &["--max-downtime", "500", "--max-rounds", "5"],
    );
    c.assert_migrated(&r, "vm1", "hostA", "hostB");
}

/// `migrate --cancel` during pre-copy: the migration stops, the source keeps the VM with its
/// memory unchanged, and the destination drops everything.
#[test]
fn e2e_cancel_during_precopy_keeps_source_running() {
    let c = two_hosts();
    c.create_vm("hostA", "vm1", IDLE);
    std::thread::sleep(Duration::from_millis(500));
    let (before, _) = c.digest("hostA", "vm1");
    // 131072 zero-page markers and the files at 0.25 MiB/s: several seconds of pre-copy.
    let bg = c.spawn_migrate("hostA", "vm1", "hostB", &["--bandwidth", "0.25"]);
    c.wait_migrating("hostA", "vm1", Duration::from_secs(10));
    wait_staged(&c, &c.datastore("hostB").join(".incoming").join("vm1"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(bg_running(&c, "vm1"), "pre-copy ended before the cancel");
    let cancel = c.ok(&["--host", "hostA", "migrate", "--cancel", "vm1"]);
    assert!(cancel.stdout.contains("cancel"), "{cancel}");
    let o = bg.wait(Duration::from_secs(30));
    eprintln!("{o}");
    assert!(o.status.is_some() && !o.success(), "{o}\n{}", c.logs());
    assert!(o.text().to_lowercase().contains("cancel"), "{o}");
    assert!(
        o.elapsed < Duration::from_secs(10),
        "the cancel took effect late: {o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), false);
    let (after, _) = c.digest("hostA", "vm1");
    assert_eq!(
        before, after,
        "the memory changed through the cancelled migration"
    );
    // Nothing to cancel any more.
    let again = c.fails(&["--host", "hostA", "migrate", "--cancel", "vm1"]);
    assert!(again.text().contains("no migration"), "{again}");
}

/// A page frame corrupted on the wire fails its checksum at the destination, which refuses
/// it; the source keeps the VM running.
#[test]
fn e2e_corrupt_frame_is_refused_and_source_keeps_running() {
    let c = injecting("corrupt-frame");
    c.create_vm("hostA", "vm1", COUNTING);
    c.assert_counting("hostA", "vm1", 0);
    let o = c.migrate_raw("hostA", "vm1", "hostB", &[]);
    eprintln!("{o}");
    assert!(!o.success(), "{o}");
    let t = o.text();
    assert!(
        t.contains("checksum") || t.contains("bad page frame"),
        "{o}"
    );
    c.assert_stayed("vm1", "hostA", Some("hostB"), true);
}

/// A source speaking another protocol version is refused at the hello; the idle VM's memory
/// is unchanged.
#[test]
fn e2e_wrong_protocol_version_is_refused() {
    let c = injecting("bad-version");
    c.create_vm("hostA", "vm1", IDLE);
    std::thread::sleep(Duration::from_millis(500));
    let (before, _) = c.digest("hostA", "vm1");
    let o = c.migrate_raw("hostA", "vm1", "hostB", &[]);
    eprintln!("{o}");
    assert!(!o.success(), "{o}");
    assert!(o.text().contains("protocol version"), "{o}");
    c.assert_stayed("vm1", "hostA", Some("hostB"), false);
    let (after, _) = c.digest("hostA", "vm1");
    assert_eq!(before, after);
}
